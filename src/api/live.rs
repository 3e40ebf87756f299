//! The built-in page at `/`, and the Server-Sent Events stream it listens to:
//! `/api/v1/stream?token=…` sends `alert` (every transition, from the same bus as socket.io)
//! and `vitals` (patients whose latest vitals changed, once a second), filtered by the
//! token's patients, for the roles that read patients (admin, clinician, service), within
//! the token's rate limit. EventSource cannot send headers, hence the token in the query (an
//! `Authorization: Bearer` header works too). The stream is under `/api/v1`: its refusals
//! come in the envelope with an `X-Request-ID`, and the stream itself goes out as it is.
//! It ends when its token expires.

use super::ApiState;
use super::envelope::{ApiError, Streamed};
use crate::alerts::AlertEvent;
use axum::Extension;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

pub async fn page() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(default)]
    token: Option<String>,
}

enum Next {
    Alert(Arc<AlertEvent>),
    Vitals,
    Lagged(u64),
    Closed,
}

pub async fn stream(
    State(state): State<ApiState>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    let bearer = (headers.get(header::AUTHORIZATION))
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let token = q.token.as_deref().or(bearer);
    let claims = match state.authenticate(token, client.map(|c| c.0.0)) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    // Vitals and alerts are patients' data: the same roles as patient reads, within the
    // token's rate limit (and, below, its patients).
    let auth = super::auth::Auth(claims);
    if let Err(e) = auth.require(super::routes::PATIENT_READERS) {
        return e.into_response();
    }
    if let Err(wait) = state.limiter.admit(auth.0.sub.clone()) {
        return super::auth::limited(wait, "too many requests for this token").into_response();
    }
    let claims = auth.0;
    let expires = tokio::time::Instant::now() + claims.remaining();
    let Some(bus) = state.bus.clone() else {
        return ApiError::unavailable("no alert bus in this process").into_response();
    };
    let latest = state.engine.latest.clone();
    let start = (
        bus.subscribe(),
        tokio::time::interval(Duration::from_secs(1)),
        latest.as_ref().map_or(0, |l| l.version()),
    );
    let events = futures_util::stream::unfold(start, move |(mut rx, mut tick, mut seen)| {
        let (claims, latest) = (claims.clone(), latest.clone());
        async move {
            loop {
                let next = tokio::select! {
                    () = tokio::time::sleep_until(expires) => Next::Closed,
                    r = rx.recv() => match r {
                        Ok(e) => Next::Alert(e),
                        Err(broadcast::error::RecvError::Lagged(n)) => Next::Lagged(n),
                        Err(broadcast::error::RecvError::Closed) => Next::Closed,
                    },
                    _ = tick.tick() => Next::Vitals,
                };
                let event = match next {
                    Next::Closed => return None,
                    Next::Alert(e) if claims.may_see(e.alert.patient_id.as_deref()) => {
                        Event::default().event("alert").json_data(&*e).ok()
                    }
                    Next::Alert(_) => None,
                    // The page reloads its lists when it falls behind.
                    Next::Lagged(n) => Some(Event::default().event("resync").data(n.to_string())),
                    Next::Vitals => latest.as_ref().and_then(|latest| {
                        let now = latest.version();
                        let changed: Vec<_> = latest
                            .changed_since(seen)
                            .into_iter()
                            .filter(|v| claims.may_see(Some(&v.patient_id)))
                            .collect();
                        seen = now;
                        (!changed.is_empty())
                            .then(|| Event::default().event("vitals").json_data(&changed).ok())
                            .flatten()
                    }),
                };
                if let Some(event) = event {
                    return Some((Ok::<Event, Infallible>(event), (rx, tick, seen)));
                }
            }
        }
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.extensions_mut().insert(Streamed);
    response
}
