//! The handlers. Each checks the caller's role (and patient scope) first, then answers from
//! the engine's live state or, for history, from storage.

use super::ApiState;
use super::auth::{Auth, Role};
use super::envelope::{ApiError, Reply};
use crate::alerts::{Alert, LifecycleError};
use crate::rules::{self, RuleSpec};
use crate::sinks::postgres::query::AlertQuery;
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::fmt::Write;
use std::time::Duration;

type Result<T = Reply> = std::result::Result<T, ApiError>;

/// Who reads alerts: everyone with a token (each within its patients).
const ALERT_READERS: &[Role] = &[Role::Admin, Role::Clinician, Role::Service, Role::Analyst];
/// Who reads a patient's vitals: the people and services that care for patients. Analysts
/// work on rules and see readings only through rule trials.
pub(super) const PATIENT_READERS: &[Role] = &[Role::Admin, Role::Clinician, Role::Service];

/// Routes under `/api/v1` (enveloped).
pub fn api() -> Router<ApiState> {
    Router::new()
        .route(
            "/health",
            get(|| async { Reply::ok("alive", json!({ "status": "ok" })) }),
        )
        .route("/ready", get(ready_enveloped))
        .route("/alerts", get(list_alerts))
        .route("/alerts/{id}", get(get_alert))
        .route("/alerts/{id}/acknowledge", post(acknowledge))
        .route("/alerts/{id}/resolve", post(resolve))
        .route("/rules", get(list_rules).post(create_rule))
        .route("/rules/test", post(try_rule))
        .route(
            "/rules/{id}",
            get(get_rule).put(replace_rule).delete(delete_rule),
        )
        .route("/devices", get(list_devices))
        .route("/devices/{id}/assign", post(assign_device))
        .route("/devices/{id}/release", post(release_device))
        .route("/devices/{id}/commands", post(device_command))
        .route("/notifications", post(notify))
        .route("/reports", post(request_report))
        .route("/patients", get(list_patients))
        .route("/patients/{id}/latest", get(patient_latest))
        .route("/patients/{id}/vitals", get(patient_vitals))
        .route("/stream", get(super::live::stream))
        .fallback(|| async { ApiError::not_found("no such route") })
}

/// Routes outside the envelope, for orchestrators and Prometheus.
pub fn plain() -> Router<ApiState> {
    Router::new()
        .route("/", get(super::live::page))
        .route(
            "/api/v1/openapi.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    include_str!("openapi.json"),
                )
            }),
        )
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/ready", get(ready_plain))
        .route("/metrics", get(metrics))
}

/// Every configured dependency, "ok" or "unavailable" (why goes to the log), checked at most
/// once a second: callers in between get the last answer.
async fn readiness(state: &ApiState) -> (bool, serde_json::Value) {
    let mut cache = state.ready_cache.lock().await;
    if let Some((at, ready, checks)) = &*cache
        && at.elapsed() < Duration::from_secs(1)
    {
        return (*ready, checks.clone());
    }
    let (ready, checks) = check_dependencies(state).await;
    let shown: serde_json::Map<_, _> = (checks.into_iter())
        .map(|(name, result)| {
            let shown = match result {
                Ok(()) => "ok",
                Err(why) => {
                    tracing::warn!(dependency = %name, error = %why, "not ready");
                    "unavailable"
                }
            };
            (name, json!(shown))
        })
        .collect();
    let shown = serde_json::Value::Object(shown);
    *cache = Some((std::time::Instant::now(), ready, shown.clone()));
    (ready, shown)
}

/// Every configured dependency, and whether it answers (with why not).
async fn check_dependencies(
    state: &ApiState,
) -> (bool, Vec<(String, std::result::Result<(), String>)>) {
    let mut checks = Vec::new();
    checks.push(("engine".to_string(), Ok(())));
    let mut ready = true;
    if state.storage.is_some() {
        let result = match state.db().await {
            Ok(db) => tokio::time::timeout(Duration::from_secs(2), db.ping())
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            Err(e) => Err(e.internal.unwrap_or(e.message)),
        };
        ready &= result.is_ok();
        checks.push(("postgres".into(), result));
    }
    if let Some(link) = &state.mqtt_up {
        let status = link.status();
        ready &= status.is_ok();
        checks.push(("mqtt".into(), status));
    }
    if let Some(up) = &state.kafka_up {
        let ok = up.load(std::sync::atomic::Ordering::Relaxed);
        ready &= ok;
        checks.push((
            "kafka".into(),
            if ok {
                Ok(())
            } else {
                Err("not connected".into())
            },
        ));
    }
    if let Some(url) = &state.redis_url {
        let ping = async {
            let client = redis::Client::open(url.as_str())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        let result = match tokio::time::timeout(Duration::from_secs(2), ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_string()),
        };
        ready &= result.is_ok();
        checks.push(("redis".into(), result));
    }
    (ready, checks)
}

async fn ready_enveloped(State(state): State<ApiState>) -> Result {
    match readiness(&state).await {
        (true, checks) => Ok(Reply::ok("ready", checks)),
        (false, checks) => {
            Err(ApiError::unavailable("a dependency is not reachable").details(checks))
        }
    }
}

async fn ready_plain(State(state): State<ApiState>) -> Response {
    let (ready, checks) = readiness(&state).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready, "checks": checks }))).into_response()
}

/// Prometheus text exposition.
async fn metrics(State(state): State<ApiState>) -> Response {
    let snap = state.engine.metrics.snapshot();
    let (input_q, shard_q) = state.engine.queue_depths();
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP vitalstream_{name} {help}\n# TYPE vitalstream_{name} counter\nvitalstream_{name} {value}"
        );
    };
    counter(
        "frames_total",
        "Frames received from every source.",
        snap.frames,
    );
    counter(
        "readings_accepted_total",
        "Readings accepted.",
        snap.accepted,
    );
    counter(
        "readings_late_total",
        "Readings behind their source's watermark (stored, not evaluated).",
        snap.late,
    );
    counter(
        "readings_duplicate_total",
        "Readings recognised as duplicates.",
        snap.duplicates,
    );
    counter(
        "alert_events_total",
        "Alert lifecycle transitions.",
        snap.alert_events,
    );
    let _ = writeln!(
        out,
        "# HELP vitalstream_readings_rejected_total Frames rejected, by reason.\n# TYPE vitalstream_readings_rejected_total counter"
    );
    for (reason, n) in &snap.rejected_by_reason {
        let _ = writeln!(
            out,
            "vitalstream_readings_rejected_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP vitalstream_rule_matches_total Rule condition matches.\n# TYPE vitalstream_rule_matches_total counter"
    );
    for (rule, r) in &snap.rules {
        let _ = writeln!(
            out,
            "vitalstream_rule_matches_total{{rule=\"{rule}\"}} {}",
            r.matches
        );
    }
    let _ = writeln!(
        out,
        "# HELP vitalstream_rule_disabled SQL rules disabled after failing (1 each).\n# TYPE vitalstream_rule_disabled gauge"
    );
    for entry in state.engine.sql.disabled.iter() {
        let _ = writeln!(
            out,
            "vitalstream_rule_disabled{{rule=\"{}\"}} 1",
            entry.key()
        );
    }
    let _ = writeln!(
        out,
        "# HELP vitalstream_queue_batches Batches waiting in the engine's queues.\n# TYPE vitalstream_queue_batches gauge"
    );
    let _ = writeln!(
        out,
        "vitalstream_queue_batches{{queue=\"parse\"}} {input_q}\nvitalstream_queue_batches{{queue=\"shards\"}} {shard_q}"
    );
    let _ = writeln!(
        out,
        "# HELP vitalstream_active_alerts Alerts pending, firing or acknowledged.\n# TYPE vitalstream_active_alerts gauge\nvitalstream_active_alerts {}",
        state.engine.book.active().len()
    );
    let devices = &state.engine.devices;
    let _ = writeln!(
        out,
        "# HELP vitalstream_devices Devices in the registry.\n# TYPE vitalstream_devices gauge\nvitalstream_devices {}\n# HELP vitalstream_devices_untracked_total New devices not tracked because the registry was full (engine.max_devices).\n# TYPE vitalstream_devices_untracked_total counter\nvitalstream_devices_untracked_total {}",
        devices.len(),
        devices.untracked()
    );
    let _ = writeln!(
        out,
        "# HELP vitalstream_readings_unevaluated_total Readings stored but not evaluated: their shard held engine.max_devices devices.\n# TYPE vitalstream_readings_unevaluated_total counter\nvitalstream_readings_unevaluated_total {}",
        state
            .engine
            .metrics
            .unevaluated
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let l = &snap.alert_latency_us;
    let _ = writeln!(
        out,
        "# HELP vitalstream_alert_latency_seconds Reading receipt to alert, from an HDR histogram.\n# TYPE vitalstream_alert_latency_seconds summary"
    );
    for (q, v) in [("0.5", l.p50), ("0.99", l.p99), ("1", l.max)] {
        let _ = writeln!(
            out,
            "vitalstream_alert_latency_seconds{{quantile=\"{q}\"}} {}",
            v as f64 / 1e6
        );
    }
    let _ = writeln!(out, "vitalstream_alert_latency_seconds_count {}", l.count);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertFilter {
    patient: Option<String>,
    /// pending, firing, escalated, acknowledged, resolved
    status: Option<String>,
    priority: Option<String>,
    /// ms since the epoch: raised at or after.
    since: Option<i64>,
    limit: Option<usize>,
}

/// Active alerts from the engine; resolved ones from storage when it is PostgreSQL.
async fn list_alerts(
    auth: Auth,
    State(state): State<ApiState>,
    Query(f): Query<AlertFilter>,
) -> Result {
    auth.require(ALERT_READERS)?;
    if let Some(t) = f.since {
        valid_millis("since", t)?;
    }
    if let Some(s) = f.status.as_deref()
        && !["pending", "firing", "escalated", "acknowledged", "resolved"].contains(&s)
    {
        return Err(ApiError::invalid(format!(
            "status {s:?}: expected pending, firing, escalated, acknowledged or resolved"
        )));
    }
    if let Some(p) = f.priority.as_deref()
        && !["high", "medium", "low"].contains(&p)
    {
        return Err(ApiError::invalid(format!(
            "priority {p:?}: expected high, medium or low"
        )));
    }
    let limit = f.limit.unwrap_or(100).min(1000);
    let mut alerts: Vec<serde_json::Value> = state
        .engine
        .book
        .active()
        .into_iter()
        .filter(|a| auth.0.may_see(a.patient_id.as_deref()))
        .filter(|a| {
            f.patient
                .as_deref()
                .is_none_or(|p| a.patient_id.as_deref() == Some(p))
        })
        .filter(|a| f.status.as_deref().is_none_or(|s| a.state.name() == s))
        .filter(|a| f.priority.as_deref().is_none_or(|p| a.priority.name() == p))
        .filter(|a| {
            f.since
                .is_none_or(|t| a.raised_at.or(a.pending_at).is_some_and(|r| r >= t))
        })
        .map(|a| serde_json::to_value(&a).unwrap_or_default())
        .collect();
    let wants_resolved = f.status.as_deref().is_none_or(|s| s == "resolved");
    if wants_resolved && state.storage.is_some() {
        let db = state.db().await?;
        let stored = db
            .alerts(&AlertQuery {
                patient_id: f.patient.clone(),
                state: Some("resolved".into()),
                priority: f.priority.clone(),
                since: f.since,
                limit: Some(limit as i64),
            })
            .await
            .map_err(ApiError::storage)?;
        alerts.extend(
            stored
                .into_iter()
                .filter(|a| auth.0.may_see(a.patient_id.as_deref()))
                .map(|a| serde_json::to_value(&a).unwrap_or_default()),
        );
    }
    alerts.truncate(limit);
    Ok(Reply::ok(format!("{} alerts", alerts.len()), alerts))
}

fn visible(auth: &Auth, alert: Option<Alert>, id: &str) -> Result<Alert> {
    let alert = alert.ok_or_else(|| ApiError::not_found(format!("no active alert {id}")))?;
    auth.may_see(alert.patient_id.as_deref())?;
    Ok(alert)
}

async fn get_alert(auth: Auth, State(state): State<ApiState>, Path(id): Path<String>) -> Result {
    auth.require(ALERT_READERS)?;
    let alert = visible(&auth, state.engine.book.get(&id), &id)?;
    Ok(Reply::ok("alert", alert))
}

fn lifecycle_error(e: LifecycleError) -> ApiError {
    match e {
        LifecycleError::NotFound(_) => ApiError::not_found(e.to_string()),
        LifecycleError::NotFiring(_) | LifecycleError::ConditionActive(_) => {
            ApiError::new(StatusCode::CONFLICT, "INVALID_STATE", e.to_string())
        }
    }
}

async fn acknowledge(auth: Auth, State(state): State<ApiState>, Path(id): Path<String>) -> Result {
    auth.require(&[Role::Clinician, Role::Admin])?;
    visible(&auth, state.engine.book.get(&id), &id)?;
    let alert = state
        .engine
        .book
        .acknowledge(&id, &auth.0.sub)
        .map_err(lifecycle_error)?;
    Ok(Reply::ok("alert acknowledged", alert))
}

async fn resolve(auth: Auth, State(state): State<ApiState>, Path(id): Path<String>) -> Result {
    auth.require(&[Role::Clinician, Role::Admin])?;
    visible(&auth, state.engine.book.get(&id), &id)?;
    let alert = state
        .engine
        .book
        .resolve(&id, &auth.0.sub)
        .map_err(lifecycle_error)?;
    Ok(Reply::ok("alert resolved", alert))
}

/// A rule as the API shows it: its definition, and why it is disabled if it is.
#[derive(serde::Serialize)]
struct RuleView {
    #[serde(flatten)]
    spec: RuleSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled: Option<crate::rules::sql::SqlError>,
}

fn views(state: &ApiState) -> Vec<RuleView> {
    let disabled = &state.engine.sql.disabled;
    (state.engine.rules().rules.iter())
        .map(|r| RuleView {
            spec: r.spec.clone(),
            disabled: disabled.get(&r.id).map(|e| e.clone()),
        })
        .collect()
}

fn specs(state: &ApiState) -> Vec<RuleSpec> {
    state
        .engine
        .rules()
        .rules
        .iter()
        .map(|r| r.spec.clone())
        .collect()
}

async fn list_rules(auth: Auth, State(state): State<ApiState>) -> Result {
    auth.require(&[Role::Analyst, Role::Admin, Role::Clinician, Role::Service])?;
    let all = views(&state);
    Ok(Reply::ok(format!("{} rules", all.len()), all))
}

async fn get_rule(auth: Auth, State(state): State<ApiState>, Path(id): Path<String>) -> Result {
    auth.require(&[Role::Analyst, Role::Admin, Role::Clinician, Role::Service])?;
    views(&state)
        .into_iter()
        .find(|v| v.spec.id == id)
        .map(|v| Reply::ok("rule", v))
        .ok_or_else(|| ApiError::not_found(format!("no rule {id}")))
}

/// The longest a rule set's validation may take before a change is given up on.
const VALIDATION_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Validates the new rule set as `vitalstream check` does, persists the change when storage
/// is configured, then swaps it into the running engine.
async fn apply(
    state: &ApiState,
    auth: &Auth,
    new: Vec<RuleSpec>,
    change: Change<'_>,
) -> Result<()> {
    // Validating SQL plans it: off this worker, on a blocking thread (SQL on its own stack).
    // Bounded in time too: a validation still running then is given up on (it runs on).
    let validating = tokio::task::spawn_blocking(move || rules::compile(&new));
    let compiled = tokio::time::timeout(VALIDATION_TIME, validating).await;
    let compiled = compiled
        .map_err(|_| {
            ApiError::unavailable(format!(
                "validating the rules took longer than {VALIDATION_TIME:?}; nothing was changed"
            ))
        })?
        .map_err(|e| ApiError::unavailable(format!("validation failed: {e}")))?;
    let set = compiled.map_err(|e| {
        ApiError::invalid("the rule is not valid").details(json!({ "problems": e.problems }))
    })?;
    if state.storage.is_some() {
        let db = state.db().await?;
        let result = match change {
            Change::Save(spec) => db.save_rule(spec, &auth.0.sub).await,
            Change::Delete(id) => db.delete_rule(id, &auth.0.sub).await,
        };
        result.map_err(|e| ApiError::unavailable(format!("the rule could not be saved: {e}")))?;
    }
    state.engine.set_rules(set);
    Ok(())
}

enum Change<'a> {
    Save(&'a RuleSpec),
    Delete(&'a str),
}

async fn create_rule(
    auth: Auth,
    State(state): State<ApiState>,
    Json(spec): Json<RuleSpec>,
) -> Result {
    auth.require(&[Role::Analyst, Role::Admin])?;
    auth.unscoped()?;
    let _guard = state.rule_edits.lock().await;
    let mut all = specs(&state);
    if all.iter().any(|s| s.id == spec.id) {
        return Err(ApiError::conflict(format!(
            "rule {} exists; PUT /rules/{} replaces it",
            spec.id, spec.id
        )));
    }
    all.push(spec.clone());
    apply(&state, &auth, all, Change::Save(&spec)).await?;
    Ok(Reply::created("rule created and applied", spec))
}

async fn replace_rule(
    auth: Auth,
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Json(spec): Json<RuleSpec>,
) -> Result {
    auth.require(&[Role::Analyst, Role::Admin])?;
    auth.unscoped()?;
    if spec.id != id {
        return Err(ApiError::invalid(format!(
            "the body's id {:?} is not the path's {id:?}",
            spec.id
        )));
    }
    let _guard = state.rule_edits.lock().await;
    let mut all = specs(&state);
    let Some(slot) = all.iter_mut().find(|s| s.id == id) else {
        return Err(ApiError::not_found(format!(
            "no rule {id}; POST /rules creates one"
        )));
    };
    *slot = spec.clone();
    apply(&state, &auth, all, Change::Save(&spec)).await?;
    Ok(Reply::ok("rule replaced and applied", spec))
}

async fn delete_rule(auth: Auth, State(state): State<ApiState>, Path(id): Path<String>) -> Result {
    auth.require(&[Role::Analyst, Role::Admin])?;
    auth.unscoped()?;
    let _guard = state.rule_edits.lock().await;
    let mut all = specs(&state);
    let before = all.len();
    all.retain(|s| s.id != id);
    if all.len() == before {
        return Err(ApiError::not_found(format!("no rule {id}")));
    }
    apply(&state, &auth, all, Change::Delete(&id)).await?;
    Ok(Reply::ok(
        "rule deleted; its alerts are resolved",
        json!({ "id": id }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TryRule {
    /// A candidate SQL rule, as it would be POSTed to `/rules`.
    rule: RuleSpec,
    /// NDJSON readings to run it over; without them, the most recent window of live
    /// readings is used.
    #[serde(default)]
    sample: Option<String>,
}

/// Runs a candidate SQL rule without raising anything: over the most recent window of
/// readings, or over every window of an uploaded NDJSON sample. Returns each window's rows.
async fn try_rule(auth: Auth, State(state): State<ApiState>, Json(body): Json<TryRule>) -> Result {
    use crate::engine::sql::TrialError;
    auth.require(&[Role::Analyst, Role::Admin])?;
    auth.unscoped()?;
    let sample = body.sample.as_deref().map(parse_sample).transpose()?;
    // Validated and run on a thread of its own, not this one.
    let trial = state.engine.sql.trial(body.rule, sample).await;
    let trial = trial.map_err(|e| match e {
        TrialError::Busy(_) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", e.to_string())
        }
        TrialError::Invalid(ref problems) => {
            ApiError::invalid(e.to_string()).details(json!({ "problems": problems }))
        }
        TrialError::NotSql => ApiError::invalid(e.to_string()),
        TrialError::Failed(ref error) => {
            ApiError::invalid(e.to_string()).details(json!({ "error": error }))
        }
    })?;
    let matched: usize = trial.windows.iter().map(|(_, _, rows)| rows.len()).sum();
    let windows: Vec<_> = (trial.windows.into_iter())
        .map(|(start, end, rows)| json!({ "window_start": start, "window_end": end, "rows": rows }))
        .collect();
    Ok(Reply::ok(
        format!(
            "{matched} rows in {} windows; nothing was raised",
            windows.len()
        ),
        json!({ "source": trial.source, "readings": trial.readings, "windows": windows }),
    ))
}

/// Parses an NDJSON sample as a replay would (event time required); every bad line is
/// reported with its number.
fn parse_sample(text: &str) -> Result<Vec<crate::model::Sample>> {
    let options = crate::parse::ParseOptions {
        max_frame_bytes: 1 << 20,
        require_ts: true,
    };
    let mut parser = crate::parse::Parser::new(options, 0);
    let now = crate::model::now_micros();
    let mut readings = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parser.parse(line.as_bytes(), None, now) {
            Ok(sample) => readings.push(sample),
            Err(reason) => problems.push(format!("line {}: {reason}", n + 1)),
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid("the sample has invalid readings")
            .details(json!({ "problems": problems })));
    }
    Ok(readings)
}

/// `?limit=&after=` on a list endpoint: at most `limit` items (500 by default, at most
/// 1,000) whose id sorts after `after`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    limit: Option<usize>,
    after: Option<String>,
}

const PAGE_DEFAULT: usize = 500;
const PAGE_MAX: usize = 1000;

impl Page {
    /// One page of `items` (sorted by the id `key` gives). The data is the page's items;
    /// `X-Total-Count` says how many there are in all, and `X-Next-After`, when more
    /// follow, the `after` of the next page.
    fn answer<T: Serialize>(
        &self,
        items: Vec<T>,
        key: impl Fn(&T) -> &str,
        what: &str,
    ) -> Result<Response> {
        let limit = self.limit.unwrap_or(PAGE_DEFAULT);
        if !(1..=PAGE_MAX).contains(&limit) {
            return Err(ApiError::invalid(format!("limit must be 1 to {PAGE_MAX}")));
        }
        let total = items.len();
        let start = match &self.after {
            Some(after) => items.partition_point(|i| key(i) <= after.as_str()),
            None => 0,
        };
        let mut page: Vec<T> = items.into_iter().skip(start).take(limit + 1).collect();
        let next = (page.len() > limit).then(|| {
            page.truncate(limit);
            page.last().map(|i| key(i).to_string())
        });
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-total-count", total.into());
        if let Some(Some(next)) = next
            && let Ok(v) = axum::http::HeaderValue::from_str(&next)
        {
            headers.insert("x-next-after", v);
        }
        let message = format!("{} of {total} {what}", page.len());
        Ok((headers, Reply::ok(message, page)).into_response())
    }
}

async fn list_devices(
    auth: Auth,
    State(state): State<ApiState>,
    Query(page): Query<Page>,
) -> Result<Response> {
    auth.require(&[Role::Admin, Role::Clinician, Role::Service, Role::Analyst])?;
    let devices: Vec<_> = state
        .engine
        .devices
        .list()
        .into_iter()
        .map(|(id, s)| {
            let patient = state.engine.assignments.patient_of(&id);
            (id, s, patient)
        })
        .filter(|(_, _, p)| auth.0.may_see(p.as_deref()))
        .map(|(id, s, patient)| {
            json!({ "device_id": id, "online": s.online, "last_seen": s.last_seen,
                    "changed_at": s.changed_at, "patient_id": patient })
        })
        .collect();
    page.answer(
        devices,
        |d| d["device_id"].as_str().unwrap_or(""),
        "devices",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Assign {
    patient_id: String,
}

/// Attaches a device to a patient: its readings without a patient id count for that
/// patient from now on (and the assignment is recorded when storage is PostgreSQL).
async fn assign_device(
    auth: Auth,
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Json(body): Json<Assign>,
) -> Result {
    auth.require(&[Role::Clinician, Role::Admin])?;
    auth.may_see(Some(&body.patient_id))?;
    let device = crate::parse::valid_id(&id)
        .ok_or_else(|| ApiError::invalid(format!("`{id}` is not a valid device id")))?;
    let patient = crate::parse::valid_id(&body.patient_id).ok_or_else(|| {
        ApiError::invalid(format!("`{}` is not a valid patient id", body.patient_id))
    })?;
    // Taking a device from its patient is acting on that patient: a token scoped to other
    // patients may not (it would then see that device's readings as its own patient's).
    if let Some(current) = state.engine.assignments.patient_of(&device) {
        auth.may_see(Some(&current))?;
    }
    if state.storage.is_some() {
        state
            .db()
            .await?
            .assign_device(&device, Some(&patient), &auth.0.sub)
            .await
            .map_err(ApiError::storage)?;
    }
    (state.engine).assign_device(device.clone(), Some(patient.clone()), &auth.0.sub);
    Ok(Reply::ok(
        "device assigned",
        json!({ "device_id": device, "patient_id": patient }),
    ))
}

async fn release_device(
    auth: Auth,
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result {
    auth.require(&[Role::Clinician, Role::Admin])?;
    let current = state.engine.assignments.patient_of(&id);
    let Some(patient) = current else {
        return Err(ApiError::not_found(format!("device {id} is not assigned")));
    };
    auth.may_see(Some(&patient))?;
    if state.storage.is_some() {
        state
            .db()
            .await?
            .assign_device(&id, None, &auth.0.sub)
            .await
            .map_err(ApiError::storage)?;
    }
    (state.engine).assign_device(id.as_str().into(), None, &auth.0.sub);
    Ok(Reply::ok(
        "device released",
        json!({ "device_id": id, "patient_id": patient }),
    ))
}

/// Publishes a JSON command to `devices/{id}/commands` (MQTT, QoS 1).
async fn device_command(
    auth: Auth,
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Result {
    auth.require(&[Role::Clinician, Role::Admin, Role::Service])?;
    // A device at a patient's bedside is that patient's: a scoped token commands only its
    // own patients' devices (and no unassigned one).
    auth.may_see(state.engine.assignments.patient_of(&id).as_deref())?;
    if !body.get("command").is_some_and(|c| c.is_string()) {
        return Err(ApiError::invalid(
            "expected a JSON object with a string `command`",
        ));
    }
    let commands = state
        .commands
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("no MQTT source: commands cannot be sent"))?;
    commands
        .send(&id, body.to_string().as_bytes())
        .map_err(|e| match e {
            crate::sources::mqtt::CommandError::BadDevice(_) => ApiError::invalid(e.to_string()),
            crate::sources::mqtt::CommandError::Busy(_) => ApiError::unavailable(e.to_string()),
        })?;
    Ok(Reply::with_status(
        StatusCode::ACCEPTED,
        "command queued for the device",
        json!({ "device_id": id, "topic": format!("devices/{id}/commands") }),
    ))
}

/// Sends `notification:new` to a socket.io room.
async fn notify(
    auth: Auth,
    State(state): State<ApiState>,
    Json(mut notice): Json<super::socket::Notice>,
) -> Result {
    auth.require(&[Role::Service, Role::Admin])?;
    if !notice.valid_room() {
        return Err(ApiError::invalid(
            "`to` must be user:<id>, role:<role> or patient:<id>",
        ));
    }
    if let Some(patient) = notice.to.strip_prefix("patient:") {
        auth.may_see(Some(patient))?;
    }
    notice.id = format!("ntf-{:016x}", fastrand::u64(..));
    notice.created_at = crate::model::now_millis();
    let _ = state.notices.send(std::sync::Arc::new(notice.clone()));
    Ok(Reply::with_status(
        StatusCode::ACCEPTED,
        "notification sent",
        notice,
    ))
}

/// `POST /reports`: a shift report for a ward or a patient over a period, in one or both
/// formats. The worker renders it; the requester hears of it by `notification:new`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportBody {
    #[serde(default)]
    ward: Option<String>,
    #[serde(default)]
    patient_id: Option<String>,
    from: crate::model::Millis,
    to: crate::model::Millis,
    /// `excel`, `pdf` (default both).
    #[serde(default)]
    formats: Option<Vec<crate::tasks::report::Format>>,
}

async fn request_report(
    auth: Auth,
    State(state): State<ApiState>,
    axum::Extension(request_id): axum::Extension<super::envelope::RequestId>,
    Json(body): Json<ReportBody>,
) -> Result {
    use crate::tasks::report::{Format, ReportRequest};
    auth.require(&[Role::Clinician, Role::Admin])?;
    if body.patient_id.is_some() && !auth.0.may_see(body.patient_id.as_deref()) {
        return Err(ApiError::forbidden(
            "this token does not cover that patient",
        ));
    }
    if body.ward.is_some() && auth.0.patients.is_some() {
        return Err(ApiError::forbidden(
            "a ward report needs a token for every patient",
        ));
    }
    let Some(tasks) = &state.tasks else {
        return Err(ApiError::unavailable(
            "reports go through RabbitMQ: this service has no [notifications]",
        ));
    };
    let request = ReportRequest {
        report_id: format!(
            "rpt-{}-{:08x}",
            crate::model::now_millis(),
            fastrand::u32(..)
        ),
        ward: body.ward,
        patient_id: body.patient_id,
        from: body.from,
        to: body.to,
        requested_by: Some(auth.0.sub.clone()),
    };
    let problems = request.problems();
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems.join("; ")));
    }
    let formats = body
        .formats
        .unwrap_or_else(|| vec![Format::Excel, Format::Pdf]);
    for task in request.tasks(&formats, &request_id.0) {
        tasks
            .send(task)
            .await
            .map_err(|_| ApiError::unavailable("the task publisher has stopped"))?;
    }
    Ok(Reply::with_status(
        StatusCode::ACCEPTED,
        "report requested",
        json!({ "report_id": request.report_id, "formats": formats }),
    ))
}

fn latest(state: &ApiState) -> Result<&crate::latest::Latest> {
    state
        .engine
        .latest
        .as_deref()
        .ok_or_else(|| ApiError::unavailable("latest vitals are not gathered by this engine"))
}

/// Patients with their latest vitals (those the token covers).
async fn list_patients(
    auth: Auth,
    State(state): State<ApiState>,
    Query(page): Query<Page>,
) -> Result<Response> {
    auth.require(PATIENT_READERS)?;
    let mut all: Vec<_> = latest(&state)?
        .all()
        .into_iter()
        .filter(|p| auth.0.may_see(Some(&p.patient_id)))
        .collect();
    all.sort_by(|a, b| a.patient_id.cmp(&b.patient_id));
    page.answer(all, |p| &p.patient_id, "patients")
}

async fn patient_latest(
    auth: Auth,
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result {
    auth.require(PATIENT_READERS)?;
    auth.may_see(Some(&id))?;
    latest(&state)?
        .get(&id)
        .map(|v| Reply::ok("latest vitals", v))
        .ok_or_else(|| ApiError::not_found(format!("no readings for patient {id}")))
}

/// The widest bucket of `/patients/{id}/vitals`.
const MAX_BUCKET: Duration = Duration::from_secs(366 * 86_400);

/// Latest time a query may name: 9999-12-31T23:59:59.999Z, as far as storage goes.
const MAX_MILLIS: i64 = 253_402_300_799_999;

/// A time in a query: ms since the epoch, from 1970 to the end of year 9999.
fn valid_millis(name: &str, t: i64) -> Result<()> {
    if (0..=MAX_MILLIS).contains(&t) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{name} must be ms since the epoch, from 0 to {MAX_MILLIS} (year 9999)"
        )))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VitalsRange {
    /// ms since the epoch
    from: i64,
    to: i64,
    /// "1m", "5m", "1h"
    bucket: Option<String>,
}

async fn patient_vitals(
    auth: Auth,
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(range): Query<VitalsRange>,
) -> Result {
    auth.require(PATIENT_READERS)?;
    auth.may_see(Some(&id))?;
    valid_millis("from", range.from)?;
    valid_millis("to", range.to)?;
    let bucket = match range.bucket.as_deref() {
        None => Duration::from_secs(60),
        Some(b) => humantime::parse_duration(b)
            .map_err(|e| ApiError::invalid(format!("bucket {b:?}: {e}")))?,
    };
    if bucket < Duration::from_secs(1) || bucket > MAX_BUCKET || range.to <= range.from {
        return Err(ApiError::invalid(
            "need from < to and a bucket from 1s to 366d",
        ));
    }
    // Both are within the epoch's first ten thousand years, so neither overflows.
    if (range.to - range.from) as u128 / bucket.as_millis() > 10_000 {
        return Err(ApiError::invalid(
            "more than 10,000 buckets: choose a wider bucket",
        ));
    }
    let db = state.db().await?;
    let buckets = db
        .vitals(&id, range.from, range.to, bucket)
        .await
        .map_err(ApiError::storage)?;
    Ok(Reply::ok(format!("{} buckets", buckets.len()), buckets))
}
