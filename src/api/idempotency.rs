//! `Idempotency-Key` on POST: the same key with the same body gets the stored answer (the
//! action is not done twice); the same key with another body is refused (422). Keys are per
//! caller (per Authorization header) and kept for `ttl`.

use super::ApiState;
use super::envelope::{ApiError, Outcome};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use std::hash::{BuildHasher, Hash};
use std::time::{Duration, Instant};

struct Stored {
    request_hash: u64,
    status: StatusCode,
    outcome: Outcome,
    at: Instant,
}

pub struct Idempotency {
    entries: DashMap<(u64, String), Stored>,
    ttl: Duration,
    body_limit: usize,
}

impl Idempotency {
    pub fn new(ttl: Duration, body_limit: usize) -> Idempotency {
        Idempotency {
            entries: DashMap::new(),
            ttl,
            body_limit,
        }
    }
}

fn hash_of(parts: impl Hash) -> u64 {
    rustc_hash::FxBuildHasher.hash_one(parts)
}

pub async fn idempotency(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get("idempotency-key").cloned() else {
        return next.run(request).await;
    };
    let Some(key) = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
    else {
        return ApiError::invalid("Idempotency-Key must be 1-255 visible characters")
            .into_response();
    };
    let store = &state.idempotency;
    let caller = hash_of(
        request
            .headers()
            .get("authorization")
            .map(HeaderValue::as_bytes),
    );
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, store.body_limit).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "request body too large",
        )
        .into_response();
    };
    let request_hash = hash_of((parts.method.as_str(), parts.uri.path(), &bytes[..]));
    let slot = (caller, key.to_string());
    store.entries.retain(|_, s| s.at.elapsed() < store.ttl);
    if let Some(stored) = store.entries.get(&slot) {
        if stored.request_hash != request_hash {
            return ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "IDEMPOTENCY_KEY_REUSED",
                "this Idempotency-Key was used with another request",
            )
            .into_response();
        }
        let mut response = stored.status.into_response();
        response.extensions_mut().insert(stored.outcome.clone());
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return response;
    }
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if !response.status().is_server_error()
        && let Some(outcome) = response.extensions().get::<Outcome>()
    {
        store.entries.insert(
            slot,
            Stored {
                request_hash,
                status: response.status(),
                outcome: outcome.clone(),
                at: Instant::now(),
            },
        );
    }
    response
}
