//! socket.io (v4 clients) on the API's port: alerts pushed to the people who should see them.
//!
//! - Handshake: `auth.token` is the platform JWT; a missing or bad token refuses the
//!   connection (`connect_error` with the reason), and counts against the client address's
//!   failed-authentication limit as a REST request would.
//! - Expiry: a connection does not outlive its token. When the token expires the server
//!   emits `auth:expired` and disconnects the socket; the client reconnects with a new token.
//! - Rooms: `user:{sub}` and `role:{role}` on connect (the role room only for tokens without
//!   a `patients` list, since it carries every patient's alerts); `subscribe:patient` /
//!   `unsubscribe:patient` (`{patient_id}`) join or leave `patient:{id}` when the token's
//!   role reads patients (admin, clinician, service), the token covers that patient and the
//!   id is valid, up to [`MAX_ROOMS_PER_SOCKET`] rooms, answering with an ack `{ok, error?}`.
//!   Each socket's events are rate limited (a burst of 20, then 5 a second).
//! - Events out: `alert:critical` (a high-priority alert raised) and `alert:updated` (any
//!   other transition: lower-priority raises, acknowledgements, resolutions), to the
//!   patient's room and `role:clinician`, each socket once.
//! - `notification:new` to a `user:`, `role:` or `patient:` room, from
//!   `POST /api/v1/notifications` (services, admins) and the task workers.
//! - Events in: `alert:acknowledge` (`{alert_id}`), answered with an ack `{ok, alert | error}`.

use super::ApiState;
use super::auth::{Claims, Role};
use crate::alerts::{AlertEvent, Transition};
use crate::rules::Priority;
use serde::Deserialize;
use serde_json::json;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, Extension, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide_redis::{RedisAdapter, RedisAdapterCtr};
use std::sync::Arc;
use tokio::sync::broadcast;

#[derive(Debug, Deserialize)]
struct Handshake {
    token: String,
}

#[derive(Debug, Deserialize)]
struct PatientRequest {
    patient_id: String,
}

#[derive(Debug, Deserialize)]
struct AlertRequest {
    alert_id: String,
}

/// Adds socket.io to `router` and starts pushing alerts and vitals. With `redis_url`, rooms
/// are shared with every other instance through Redis (socketioxide's adapter; Redis ≥ 7), so
/// an alert raised on one instance reaches a client connected to another.
pub async fn attach(
    router: axum::Router,
    state: &ApiState,
    redis_url: Option<&str>,
) -> anyhow::Result<axum::Router> {
    let builder = SocketIo::builder().with_state(state.clone());
    Ok(match redis_url {
        None => {
            let (layer, io) = builder.build_layer();
            io.ns("/", on_connect.with(authenticate));
            start_pushers(io, state);
            router.layer(layer)
        }
        Some(url) => {
            // The adapter speaks RESP3.
            let url = if url.contains("protocol=") {
                url.to_string()
            } else {
                format!(
                    "{url}{}protocol=resp3",
                    if url.contains('?') { '&' } else { '?' }
                )
            };
            let client = redis::Client::open(url.as_str())?;
            let adapter = RedisAdapterCtr::new_with_redis(&client).await?;
            let (layer, io) = builder
                .with_adapter::<RedisAdapter<_>>(adapter)
                .build_layer();
            io.ns("/", on_connect.with(authenticate)).await?;
            start_pushers(io, state);
            router.layer(layer)
        }
    })
}

/// A notification for people: `notification:new` to one room (`user:…`, `role:…` or
/// `patient:…`).
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct Notice {
    #[serde(default)]
    pub id: String,
    pub to: String,
    pub title: String,
    pub message: String,
    #[serde(default)]
    pub priority: Option<Priority>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub created_at: crate::model::Millis,
}

impl Notice {
    /// The room is one of the platform's kinds.
    pub fn valid_room(&self) -> bool {
        ["user:", "role:", "patient:"]
            .iter()
            .any(|p| self.to.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
    }
}

async fn push_notices<A: Adapter>(io: SocketIo<A>, mut notices: broadcast::Receiver<Arc<Notice>>) {
    loop {
        match notices.recv().await {
            Ok(n) => {
                if let Err(e) = io.to(n.to.clone()).emit("notification:new", &*n).await {
                    tracing::warn!(error = %e, to = %n.to, "notification emit failed");
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::error!(missed, "notifications fell behind");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn start_pushers<A: Adapter>(io: SocketIo<A>, state: &ApiState) {
    tokio::spawn(push_notices(io.clone(), state.notices.subscribe()));
    if let Some(bus) = &state.bus {
        tokio::spawn(push_alerts(io.clone(), bus.subscribe()));
    }
    if let Some(latest) = state.engine.latest.clone() {
        tokio::spawn(push_vitals(io, latest));
    }
}

async fn authenticate<A: Adapter>(
    s: SocketRef<A>,
    State(state): State<ApiState>,
    TryData(auth): TryData<Handshake>,
) -> Result<(), String> {
    let client = (s.req_parts().extensions)
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let auth = auth.map_err(|_| {
        let refusal = super::envelope::ApiError::unauthorized("missing auth.token");
        state.failed(refusal, client).message
    })?;
    let claims = (state.authenticate(Some(&auth.token), client)).map_err(|e| e.message)?;
    s.extensions.insert(claims);
    Ok(())
}

/// Disconnects the socket when its token expires, after telling the client
/// (`auth:expired`); the timer goes when the socket does.
fn close_at_expiry<A: Adapter>(s: &SocketRef<A>, claims: &Claims) {
    let gone = Arc::new(tokio::sync::Notify::new());
    let on_gone = gone.clone();
    s.on_disconnect(move || async move { on_gone.notify_one() });
    let (s, remaining) = (s.clone(), claims.remaining());
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(remaining) => {
                let _ = s.emit(
                    "auth:expired",
                    &json!({ "message": "token expired: reconnect with a new token" }),
                );
                let _ = s.disconnect();
            }
            () = gone.notified() => {}
        }
    });
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Analyst => "analyst",
        Role::Clinician => "clinician",
        Role::Service => "service",
    }
}

async fn on_connect<A: Adapter>(s: SocketRef<A>, Extension(claims): Extension<Claims>) {
    close_at_expiry(&s, &claims);
    s.join(format!("user:{}", claims.sub));
    // Role rooms carry every patient's alerts: only tokens that may see every patient join.
    if claims.patients.is_none() {
        s.join(format!("role:{}", role_name(claims.role)));
    }
    s.extensions
        .insert(Arc::new(std::sync::Mutex::new(PerSocket::new())));
    s.on(
        "subscribe:patient",
        async |s: SocketRef<A>,
               Extension(claims): Extension<Claims>,
               Extension(mine): Extension<Arc<std::sync::Mutex<PerSocket>>>,
               TryData(req): TryData<PatientRequest>,
               ack: AckSender<A>| {
            let answer = {
                let mut mine = mine.lock().unwrap_or_else(|e| e.into_inner());
                match req {
                    Err(_) => Err("expected {patient_id}"),
                    Ok(r) => mine
                        .subscribe(&claims, &r.patient_id)
                        .map(|()| r.patient_id),
                }
            };
            let _ = ack.send(&room_answer(answer, |room| s.join(room)));
        },
    );
    s.on(
        "unsubscribe:patient",
        async |s: SocketRef<A>,
               Extension(mine): Extension<Arc<std::sync::Mutex<PerSocket>>>,
               TryData(req): TryData<PatientRequest>,
               ack: AckSender<A>| {
            let answer = {
                let mut mine = mine.lock().unwrap_or_else(|e| e.into_inner());
                match req {
                    Err(_) => Err("expected {patient_id}"),
                    Ok(r) => mine.unsubscribe(&r.patient_id).map(|()| r.patient_id),
                }
            };
            let _ = ack.send(&room_answer(answer, |room| s.leave(room)));
        },
    );
    s.on(
        "alert:acknowledge",
        async |Extension(claims): Extension<Claims>,
               Extension(mine): Extension<Arc<std::sync::Mutex<PerSocket>>>,
               State(state): State<ApiState>,
               TryData(req): TryData<AlertRequest>,
               ack: AckSender<A>| {
            let admitted = (mine.lock().unwrap_or_else(|e| e.into_inner())).admit();
            let answer = match (admitted, req) {
                (Err(e), _) => json!({ "ok": false, "error": e }),
                (Ok(()), Err(_)) => json!({ "ok": false, "error": "expected {alert_id}" }),
                (Ok(()), Ok(r)) => acknowledge(&state, &claims, &r.alert_id),
            };
            let _ = ack.send(&answer);
        },
    );
}

/// Patients' rooms one socket may be in at once.
pub const MAX_ROOMS_PER_SOCKET: usize = 64;
/// Events a socket may send in a burst, and a second after that.
const EVENT_BURST: f64 = 20.0;
const EVENTS_PER_SECOND: f64 = 5.0;

/// What one socket has asked for: the patients' rooms it joined, and its event budget.
pub struct PerSocket {
    rooms: std::collections::HashSet<String>,
    tokens: f64,
    last: std::time::Instant,
}

impl Default for PerSocket {
    fn default() -> Self {
        PerSocket::new()
    }
}

impl PerSocket {
    pub fn new() -> PerSocket {
        PerSocket {
            rooms: std::collections::HashSet::new(),
            tokens: EVENT_BURST,
            last: std::time::Instant::now(),
        }
    }

    /// Takes one event from the socket's budget.
    pub fn admit(&mut self) -> Result<(), &'static str> {
        let now = std::time::Instant::now();
        let refilled =
            self.tokens + now.duration_since(self.last).as_secs_f64() * EVENTS_PER_SECOND;
        self.tokens = refilled.min(EVENT_BURST);
        self.last = now;
        if self.tokens < 1.0 {
            return Err("too many events from this socket: slow down");
        }
        self.tokens -= 1.0;
        Ok(())
    }

    /// Whether `claims` may join `patient:{id}`: a role that reads patients, a token that
    /// covers the patient, a valid id, and fewer than [`MAX_ROOMS_PER_SOCKET`] rooms.
    pub fn subscribe(&mut self, claims: &Claims, id: &str) -> Result<(), &'static str> {
        self.admit()?;
        if !super::routes::PATIENT_READERS.contains(&claims.role) {
            return Err("this role may not read patients' data");
        }
        if crate::parse::valid_id(id).is_none() {
            return Err("patient_id is not a valid id");
        }
        if !claims.may_see(Some(id)) {
            return Err("this token does not cover that patient");
        }
        if !self.rooms.contains(id) {
            if self.rooms.len() >= MAX_ROOMS_PER_SOCKET {
                return Err("too many patients on this socket: unsubscribe from some first");
            }
            self.rooms.insert(id.to_string());
        }
        Ok(())
    }

    pub fn unsubscribe(&mut self, id: &str) -> Result<(), &'static str> {
        self.admit()?;
        self.rooms.remove(id);
        Ok(())
    }
}

fn acknowledge(state: &ApiState, claims: &Claims, alert_id: &str) -> serde_json::Value {
    if !matches!(claims.role, Role::Clinician | Role::Admin) {
        return json!({ "ok": false, "error": "only clinicians acknowledge alerts" });
    }
    match state.engine.book.get(alert_id) {
        None => json!({ "ok": false, "error": format!("no active alert {alert_id}") }),
        Some(a) if !claims.may_see(a.patient_id.as_deref()) => {
            json!({ "ok": false, "error": "this token does not cover that patient" })
        }
        Some(_) => match state.engine.book.acknowledge(alert_id, &claims.sub) {
            Ok(alert) => json!({ "ok": true, "alert": alert }),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        },
    }
}

/// Once a second, `vitals:update` to each patient's room for the patients whose vitals
/// changed. A slow client misses updates instead of queueing them (the next one supersedes).
pub async fn push_vitals<A: Adapter>(io: SocketIo<A>, latest: Arc<crate::latest::Latest>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seen = 0;
    loop {
        tick.tick().await;
        let now = latest.version();
        for vitals in latest.changed_since(seen) {
            let room = format!("patient:{}", vitals.patient_id);
            // Errors are full or closed sockets: that client skips this update.
            let _ = io.to(room).emit("vitals:update", &vitals).await;
            // A ward's updates take a while in all; an alert waiting for this thread goes
            // between two of them, not after the lot.
            tokio::task::yield_now().await;
        }
        seen = now;
    }
}

/// Emits every alert transition from the bus until it closes.
pub async fn push_alerts<A: Adapter>(
    io: SocketIo<A>,
    mut bus: broadcast::Receiver<Arc<AlertEvent>>,
) {
    loop {
        let event = match bus.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::error!(
                    missed = n,
                    "socket.io push fell behind the alert bus; clients must re-read /api/v1/alerts"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let name = match (event.event, event.alert.priority) {
            (Transition::Raised, Priority::High) => "alert:critical",
            _ => "alert:updated",
        };
        let mut rooms = vec!["role:clinician".to_string()];
        if let Some(p) = &event.alert.patient_id {
            rooms.push(format!("patient:{p}"));
        }
        if let Err(e) = io.to(rooms).emit(name, &*event).await {
            tracing::warn!(error = %e, alert_id = %event.alert.alert_id, "socket.io emit failed");
        }
    }
}

/// The answer to a patient-room request: on success, `change` joins or leaves the patient's
/// room.
fn room_answer(result: Result<String, &str>, change: impl FnOnce(String)) -> serde_json::Value {
    match result {
        Ok(id) => {
            change(format!("patient:{id}"));
            json!({ "ok": true })
        }
        Err(e) => json!({ "ok": false, "error": e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn claims(role: Role, patients: Option<&[&str]>) -> Claims {
        Claims::issue(
            "u",
            role,
            patients.map(|p| p.iter().map(|s| s.to_string()).collect()),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn subscribing_checks_role_scope_id_rooms_and_rate() {
        let mut s = PerSocket::new();
        assert!(s.subscribe(&claims(Role::Analyst, None), "p1").is_err());
        let mut s = PerSocket::new();
        let scoped = claims(Role::Clinician, Some(&["p1"]));
        assert!(s.subscribe(&scoped, "p1").is_ok());
        assert!(s.subscribe(&scoped, "p2").is_err());
        let mut s = PerSocket::new();
        let all = claims(Role::Clinician, None);
        assert!(s.subscribe(&all, &"x".repeat(100_000)).is_err());
        // The room cap (the rate limit refilled by hand, to test the cap alone).
        let mut s = PerSocket::new();
        for n in 0..MAX_ROOMS_PER_SOCKET {
            s.tokens = EVENT_BURST;
            assert!(s.subscribe(&all, &format!("p{n}")).is_ok(), "{n}");
        }
        s.tokens = EVENT_BURST;
        assert!(s.subscribe(&all, "one-more").is_err());
        s.tokens = EVENT_BURST;
        assert!(s.subscribe(&all, "p0").is_ok(), "already in: fine");
        s.tokens = EVENT_BURST;
        s.unsubscribe("p0").unwrap();
        assert!(s.subscribe(&all, "one-more").is_ok());
        // The event rate limit.
        let mut s = PerSocket::new();
        let refused = (0..100).filter(|_| s.admit().is_err()).count();
        assert!(refused >= 70, "{refused}");
    }
}
