//! The REST API through its router (and once over a real socket), on a running engine.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{HR_RULE, Harness, WAIT, reading, rules};
use serde_json::{Value, json};
use std::time::Duration;
use tower::ServiceExt;
use vitalstream::alerts::Transition;
use vitalstream::api::auth::{Claims, Role};
use vitalstream::api::{ApiConfig, ApiState, router};
use vitalstream::model::now_millis;

struct Api {
    router: axum::Router,
    state: ApiState,
    rt: tokio::runtime::Runtime,
}

fn api(h: &Harness, config: ApiConfig) -> Api {
    let state = ApiState::new(&config, h.engine.control(), None);
    Api {
        router: router(&config, state.clone()),
        state,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    }
}

fn token(api: &Api, role: Role, patients: Option<&[&str]>) -> String {
    let sub = format!("{role:?}-user").to_lowercase();
    common::server::token(&api.state, &sub, role, patients)
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Api {
    fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.send(req)
    }

    fn send(&self, req: Request<Body>) -> Answer {
        self.rt.block_on(async {
            let response = self.router.clone().oneshot(req).await.unwrap();
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            Answer {
                status: parts.status,
                headers: parts.headers,
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            }
        })
    }

    fn get(&self, uri: &str, token: &str) -> Answer {
        self.call("GET", uri, Some(token), None, &[])
    }

    /// A GET from the client address `from` (as `serve` tells the router).
    fn get_from(&self, from: &str, uri: &str, token: Option<&str>) -> Answer {
        let mut req = Request::get(uri).extension(axum::extract::ConnectInfo(
            from.parse::<std::net::SocketAddr>().unwrap(),
        ));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        self.send(req.body(Body::empty()).unwrap())
    }
}

fn assert_envelope(a: &Answer, status: u16) {
    let b = &a.body;
    assert_eq!(a.status.as_u16(), status, "{b}");
    assert_eq!(b["status"], status, "{b}");
    assert_eq!(b["success"], status < 400, "{b}");
    assert!(b["message"].is_string(), "{b}");
    assert!(
        b["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{b}"
    );
    let id = b["request_id"].as_str().expect("request_id");
    assert_eq!(a.headers["x-request-id"], id);
    if status < 400 {
        assert!(b.get("data").is_some() && b.get("error").is_none(), "{b}");
    } else {
        assert!(
            b["error"]["code"].is_string() && b.get("data").is_none(),
            "{b}"
        );
    }
}

#[test]
fn every_answer_is_an_envelope_with_the_request_id() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let admin = token(&api, Role::Admin, None);
    let a = api.call(
        "GET",
        "/api/v1/rules",
        Some(&admin),
        None,
        &[("x-request-id", "trace-42")],
    );
    assert_envelope(&a, 200);
    assert_eq!(a.body["request_id"], "trace-42");
    assert_eq!(a.body["data"][0]["id"], "hr_high");
    let b = api.get("/api/v1/rules", &admin);
    assert_envelope(&b, 200);
    assert_eq!(
        b.body["request_id"].as_str().unwrap().len(),
        32,
        "generated when absent"
    );
    // Refusals of every kind, including axum's own, are envelopes with stable codes.
    let cases = [
        (api.get("/api/v1/nowhere", &admin), 404, "NOT_FOUND"),
        (api.get("/api/v1/rules/nope", &admin), 404, "NOT_FOUND"),
        (
            api.call(
                "POST",
                "/api/v1/rules",
                Some(&admin),
                Some(json!({"id": 1})),
                &[],
            ),
            422,
            "INVALID_BODY",
        ),
        (
            api.get("/api/v1/alerts?status=burning", &admin),
            422,
            "VALIDATION_FAILED",
        ),
        (
            api.call("DELETE", "/api/v1/alerts", Some(&admin), None, &[]),
            405,
            "METHOD_NOT_ALLOWED",
        ),
    ];
    for (answer, status, code) in cases {
        assert_envelope(&answer, status);
        assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
    }
    let big = json!({ "id": "x".repeat(300 * 1024) });
    let too_big = api.call("POST", "/api/v1/rules", Some(&admin), Some(big), &[]);
    assert_envelope(&too_big, 413);
    assert_eq!(too_big.body["error"]["code"], "PAYLOAD_TOO_LARGE");
    drop(api);
    h.finish();
}

#[test]
fn tokens_roles_and_patient_scopes_are_enforced() {
    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let no_token = api.call("GET", "/api/v1/alerts", None, None, &[]);
    assert_envelope(&no_token, 401);
    assert_eq!(no_token.body["error"]["code"], "UNAUTHORIZED");
    let ten_minutes = Duration::from_secs(600);
    let forged = vitalstream::api::auth::Keys::new("another-secret").sign(&Claims::issue(
        "mallory",
        Role::Admin,
        None,
        ten_minutes,
    ));
    assert_eq!(api.get("/api/v1/alerts", &forged).status, 401);
    let expired = api.state.keys.sign(&Claims {
        exp: (now_millis() / 1000 - 3600) as u64,
        ..Claims::issue("late", Role::Admin, None, ten_minutes)
    });
    assert_eq!(api.get("/api/v1/alerts", &expired).status, 401);

    // A clinician may not write rules.
    let clinician = token(&api, Role::Clinician, None);
    let rule = json!({"id": "hr_low", "kind": "threshold", "priority": "high", "message": "HR low", "condition": "hr < 40"});
    let refused = api.call("POST", "/api/v1/rules", Some(&clinician), Some(rule), &[]);
    assert_envelope(&refused, 403);
    assert_eq!(refused.body["error"]["code"], "FORBIDDEN");

    // Alerts of two patients; a token scoped to p1 sees only p1's.
    let mut source = h.replay_source();
    let t = now_millis() - 10_000;
    let with_patient = |dev: &str, pat: &str| {
        reading(dev, t, "hr", 150.0).replace('{', &format!(r#"{{"patient_id":"{pat}","#))
    };
    common::send_lines(
        &mut source,
        &[with_patient("d1", "p1"), with_patient("d2", "p2")],
        2,
    );
    for _ in 0..2 {
        h.alerts.recv_timeout(WAIT).expect("an alert");
    }
    let scoped = token(&api, Role::Clinician, Some(&["p1"]));
    let seen = api.get("/api/v1/alerts", &scoped);
    assert_envelope(&seen, 200);
    let patients: Vec<&str> = seen.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["patient_id"].as_str().unwrap())
        .collect();
    assert_eq!(patients, ["p1"]);
    let all = api.get("/api/v1/alerts", &clinician);
    assert_eq!(all.body["data"].as_array().unwrap().len(), 2);
    let p2_alert = all.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["patient_id"] == "p2")
        .unwrap()["alert_id"]
        .as_str()
        .unwrap()
        .to_string();
    let hidden = api.get(&format!("/api/v1/alerts/{p2_alert}"), &scoped);
    assert_envelope(&hidden, 403);
    let ack = api.call(
        "POST",
        &format!("/api/v1/alerts/{p2_alert}/acknowledge"),
        Some(&scoped),
        None,
        &[],
    );
    assert_eq!(ack.status, 403, "{}", ack.body);
    drop(source);
    drop(api);
    h.finish();
}

#[test]
fn the_same_idempotency_key_gives_the_stored_answer_and_another_body_is_refused() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let analyst = token(&api, Role::Analyst, None);
    let rule = json!({"id": "hr_low", "kind": "threshold", "priority": "high", "message": "HR low", "condition": "hr < 40"});
    let key = [("idempotency-key", "create-hr-low-1")];
    let first = api.call(
        "POST",
        "/api/v1/rules",
        Some(&analyst),
        Some(rule.clone()),
        &key,
    );
    assert_envelope(&first, 201);
    let again = api.call(
        "POST",
        "/api/v1/rules",
        Some(&analyst),
        Some(rule.clone()),
        &key,
    );
    assert_envelope(&again, 201);
    assert_eq!(again.body["data"], first.body["data"]);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    // Without the key the same POST is a conflict: the rule was created once.
    let unkeyed = api.call(
        "POST",
        "/api/v1/rules",
        Some(&analyst),
        Some(rule.clone()),
        &[],
    );
    assert_envelope(&unkeyed, 409);
    let mut other = rule.clone();
    other["condition"] = json!("hr < 35");
    let reused = api.call("POST", "/api/v1/rules", Some(&analyst), Some(other), &key);
    assert_envelope(&reused, 422);
    assert_eq!(reused.body["error"]["code"], "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(h.engine.rules().rules.len(), 2);
    drop(api);
    h.finish();
}

#[test]
fn each_token_has_its_own_rate_limit() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(
        &h,
        ApiConfig {
            rate_limit_per_minute: 3,
            ..ApiConfig::default()
        },
    );
    let (a, b) = (
        token(&api, Role::Admin, None),
        token(&api, Role::Analyst, None),
    );
    for _ in 0..3 {
        assert_eq!(api.get("/api/v1/rules", &a).status, 200);
    }
    let limited = api.get("/api/v1/rules", &a);
    assert_envelope(&limited, 429);
    assert_eq!(limited.body["error"]["code"], "RATE_LIMITED");
    assert_eq!(
        api.get("/api/v1/rules", &b).status,
        200,
        "another token is not limited"
    );
    drop(api);
    h.finish();
}

#[test]
fn rules_changed_through_the_api_change_alerts_in_the_running_engine() {
    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let analyst = token(&api, Role::Analyst, None);
    let clinician = token(&api, Role::Clinician, None);
    let mut source = h.replay_source();
    let t0 = now_millis() - 60_000;
    let mut send = |i: i64, hr: f64| {
        common::send_lines(&mut source, &[reading("bed-1", t0 + i * 1000, "hr", hr)], 1)
    };

    // hr 110 raises nothing under hr_high (> 120)...
    send(0, 110.0);
    assert!(
        h.alerts
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err()
    );
    // ...until an analyst adds hr > 100.
    let rule = json!({"id": "hr_over_100", "kind": "threshold", "priority": "medium", "message": "HR over 100", "condition": "hr > 100"});
    let invalid = api.call("POST", "/api/v1/rules", Some(&analyst), Some(json!({"id": "bad", "kind": "threshold", "priority": "high", "message": "m", "condition": "hr >> 1"})), &[]);
    assert_envelope(&invalid, 422);
    assert!(
        invalid.body["error"]["details"]["problems"][0]
            .as_str()
            .unwrap()
            .contains("bad"),
        "{}",
        invalid.body
    );
    assert_envelope(
        &api.call(
            "POST",
            "/api/v1/rules",
            Some(&analyst),
            Some(rule.clone()),
            &[],
        ),
        201,
    );
    send(1, 110.0);
    let raised = h.alerts.recv_timeout(WAIT).expect("the new rule raises");
    assert_eq!(
        (&*raised.alert.rule_id, raised.event),
        ("hr_over_100", Transition::Raised)
    );

    // A clinician acknowledges it through the API.
    let id = raised.alert.alert_id.clone();
    let ack = api.call(
        "POST",
        &format!("/api/v1/alerts/{id}/acknowledge"),
        Some(&clinician),
        None,
        &[],
    );
    assert_envelope(&ack, 200);
    assert_eq!(ack.body["data"]["state"], "acknowledged");
    assert_eq!(ack.body["data"]["acknowledged_by"], "clinician-user");
    assert_eq!(
        h.alerts.recv_timeout(WAIT).unwrap().event,
        Transition::Acknowledged
    );
    // Resolving while the condition holds is refused with a reason.
    let early = api.call(
        "POST",
        &format!("/api/v1/alerts/{id}/resolve"),
        Some(&clinician),
        None,
        &[],
    );
    assert_envelope(&early, 409);
    assert_eq!(early.body["error"]["code"], "INVALID_STATE");

    // Replacing the rule (hr > 115) resolves its alerts; the new definition raises again
    // only where it holds: 110 does not, 120 does.
    let mut stricter = rule.clone();
    stricter["condition"] = json!("hr > 115");
    assert_envelope(
        &api.call(
            "PUT",
            "/api/v1/rules/hr_over_100",
            Some(&analyst),
            Some(stricter),
            &[],
        ),
        200,
    );
    let cleared = h
        .alerts
        .recv_timeout(WAIT)
        .expect("the replaced rule's alert is resolved");
    assert_eq!(
        (&*cleared.alert.rule_id, cleared.event),
        ("hr_over_100", Transition::Resolved)
    );
    assert_eq!(cleared.alert.resolved_by.as_deref(), Some("rule changed"));
    send(2, 110.0);
    assert!(
        h.alerts
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err()
    );
    send(3, 120.0);
    let again = h
        .alerts
        .recv_timeout(WAIT)
        .expect("the new definition raises");
    assert_eq!(
        (&*again.alert.rule_id, again.event),
        ("hr_over_100", Transition::Raised)
    );

    // Deleting a rule resolves its alerts and stops it.
    send(4, 130.0);
    let hr_high = h.alerts.recv_timeout(WAIT).expect("hr_high raises");
    assert_eq!(&*hr_high.alert.rule_id, "hr_high");
    assert_envelope(
        &api.call("DELETE", "/api/v1/rules/hr_high", Some(&analyst), None, &[]),
        200,
    );
    let retired: Vec<_> = std::iter::from_fn(|| {
        h.alerts
            .recv_timeout(std::time::Duration::from_millis(500))
            .ok()
    })
    .collect();
    assert!(
        retired
            .iter()
            .any(|e| &*e.alert.rule_id == "hr_high" && e.event == Transition::Resolved),
        "{retired:?}"
    );
    let left: Vec<String> = api.get("/api/v1/rules", &analyst).body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, ["hr_over_100"]);
    drop(source);
    drop(api);
    h.finish();
}

#[test]
fn health_readiness_and_metrics_over_a_real_socket() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    // Storage that does not answer: the service is alive but not ready.
    let storage = vitalstream::sinks::postgres::PostgresConfig {
        url: "postgres://postgres@127.0.0.1:1/nowhere".into(),
        connect_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    // Redis answers.
    let config = ApiConfig {
        redis_url: Some("redis://127.0.0.1:6379".into()),
        ..ApiConfig::default()
    };
    let state = ApiState::new(&config, h.engine.control(), Some(storage));
    let server = common::server::Server::start_rest(&config, state.clone());
    let addr = server.addr;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let get = |path: &str| {
        let mut r = agent.get(&format!("http://{addr}{path}")).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    assert_eq!(get("/health"), (200, r#"{"status":"ok"}"#.to_string()));
    let (status, body) = get("/ready");
    assert_eq!(status, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], false, "{body}");
    assert_ne!(ready["checks"]["postgres"], "ok", "{body}");
    assert_eq!(ready["checks"]["redis"], "ok", "{body}");
    assert_eq!(ready["checks"]["engine"], "ok", "{body}");
    // Why a dependency is unavailable goes to the log, not to whoever asks.
    assert_eq!(ready["checks"]["postgres"], "unavailable", "{body}");
    // Answered from the last second's checks, not by connecting again.
    let started = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(get("/ready").0, 503);
    }
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    // Storage errors reach clients as "storage unavailable" with the request id, and
    // nothing of the driver's text.
    let clinician = common::server::token(&state, "c", Role::Clinician, None);
    let mut r = agent
        .get(&format!(
            "http://{addr}/api/v1/patients/pp-1/vitals?from=0&to=60000"
        ))
        .header("authorization", &format!("Bearer {clinician}"))
        .call()
        .unwrap();
    let body = r.body_mut().read_to_string().unwrap();
    assert_eq!(r.status().as_u16(), 503, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["message"], "storage unavailable", "{body}");
    assert_eq!(answer["error"]["code"], "STORAGE_UNAVAILABLE", "{body}");
    assert!(answer["request_id"].is_string(), "{body}");
    assert!(
        !body.contains("database") && !body.contains("connect"),
        "{body}"
    );
    let (status, text) = get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "# TYPE vitalstream_readings_accepted_total counter",
        "vitalstream_queue_batches{queue=\"parse\"}",
        "vitalstream_alert_latency_seconds{quantile=\"0.99\"}",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    server.stop();
    h.finish();
}

#[test]
fn devices_are_assigned_and_released_and_commands_need_an_mqtt_source() {
    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let clinician = token(&api, Role::Clinician, None);
    let analyst = token(&api, Role::Analyst, None);
    let changes = h.engine.devices.listen().unwrap();
    let assigned_to = || match changes.try_recv() {
        Ok(vitalstream::devices::DeviceEvent::Assigned {
            device_id,
            patient_id,
            ..
        }) => Some((device_id.to_string(), patient_id.map(|p| p.to_string()))),
        other => panic!("expected a device.assigned, got {other:?}"),
    };
    let assign = json!({ "patient_id": "p9" });
    assert_envelope(
        &api.call(
            "POST",
            "/api/v1/devices/bed-9/assign",
            Some(&analyst),
            Some(assign.clone()),
            &[],
        ),
        403,
    );
    let ok = api.call(
        "POST",
        "/api/v1/devices/bed-9/assign",
        Some(&clinician),
        Some(assign),
        &[],
    );
    assert_envelope(&ok, 200);
    assert_eq!(
        h.engine.assignments.patient_of("bed-9").as_deref(),
        Some("p9")
    );
    assert_eq!(assigned_to(), Some(("bed-9".into(), Some("p9".into()))));
    // A reading without a patient id now raises the alert for the assigned patient.
    let mut source = h.replay_source();
    common::send_lines(
        &mut source,
        &[reading("bed-9", now_millis() - 1000, "hr", 150.0)],
        1,
    );
    let raised = h.alerts.recv_timeout(WAIT).expect("an alert");
    assert_eq!(raised.alert.patient_id.as_deref(), Some("p9"));
    assert_envelope(
        &api.call(
            "POST",
            "/api/v1/devices/bed-9/release",
            Some(&clinician),
            None,
            &[],
        ),
        200,
    );
    assert_eq!(h.engine.assignments.patient_of("bed-9"), None);
    assert_eq!(assigned_to(), Some(("bed-9".into(), None)));
    assert_envelope(
        &api.call(
            "POST",
            "/api/v1/devices/bed-9/release",
            Some(&clinician),
            None,
            &[],
        ),
        404,
    );
    let bad = api.call(
        "POST",
        "/api/v1/devices/bed%209/assign",
        Some(&clinician),
        Some(json!({ "patient_id": "p9" })),
        &[],
    );
    assert!(
        bad.status == 422 || bad.status == 400 || bad.status == 404,
        "{}",
        bad.body
    );
    let command = api.call(
        "POST",
        "/api/v1/devices/bed-9/commands",
        Some(&clinician),
        Some(json!({ "command": "silence", "for_s": 120 })),
        &[],
    );
    assert_envelope(&command, 503);
    let malformed = api.call(
        "POST",
        "/api/v1/devices/bed-9/commands",
        Some(&clinician),
        Some(json!({ "cmd": 1 })),
        &[],
    );
    assert_envelope(&malformed, 422);
    drop(source);
    drop(api);
    h.finish();
}

/// `/api/v1/openapi.json` names every route the router has, and the router answers every
/// operation the document names.
#[test]
fn the_openapi_document_matches_the_routes() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let admin = token(&api, Role::Admin, None);
    let doc = api.call("GET", "/api/v1/openapi.json", None, None, &[]);
    assert_eq!(doc.status, 200);
    assert_eq!(doc.body["openapi"], "3.1.0");
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, ops) in doc.body["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();

    // The routes as written in src/api/routes.rs: each `.route("path", get(…).post(…))`.
    let source = include_str!("../src/api/routes.rs");
    let mut routed: Vec<(String, String)> = Vec::new();
    for (section, prefix) in [("pub fn api()", "/api/v1"), ("pub fn plain()", "")] {
        let body = &source[source.find(section).unwrap()..];
        let body = &body[..body.find("\n}\n").unwrap()];
        for chunk in body.split(".route(").skip(1) {
            let path = chunk.split('"').nth(1).unwrap();
            for method in ["get", "post", "put", "delete"] {
                if chunk.contains(&format!("{method}(")) {
                    routed.push((method.to_uppercase(), format!("{prefix}{path}")));
                }
            }
        }
    }
    routed.sort();
    assert_eq!(routed, documented);

    // And the router answers each (a concrete id for the path parameters).
    for (method, path) in &documented {
        let uri = path.replace("{id}", "x");
        let answer = api.call(method, &uri, Some(&admin), None, &[]);
        assert!(
            answer.status != 404
                || answer.body["error"]["details"].is_null()
                    && answer.body["message"] != "no such route",
            "{method} {uri}: {}",
            answer.body
        );
        assert_ne!(answer.status, 405, "{method} {uri}");
    }
    drop(api);
    h.finish();
}

/// Readings of one device at 1 Hz from second `from` to `to` (exclusive), SpO2 `spo2`.
fn spo2_lines(device: &str, t0: i64, from: i64, to: i64, spo2: f64) -> Vec<String> {
    (from..to)
        .map(|s| reading(device, t0 + s * 1000, "spo2", spo2))
        .collect()
}

#[test]
fn analysts_try_submit_and_replace_sql_rules_in_the_running_engine() {
    let config = vitalstream::engine::EngineConfig {
        sql_recent: std::time::Duration::from_secs(300),
        ..common::config()
    };
    let mut h = Harness::start(&config, rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let analyst = token(&api, Role::Analyst, None);
    let clinician = token(&api, Role::Clinician, None);
    let sql = "SELECT device_id, patient_id, avg(spo2) AS value\nFROM vitals\nGROUP BY device_id, patient_id\nHAVING avg(spo2) < 90";
    let rule = json!({"id": "spo2_low_sql", "kind": "sql", "priority": "high",
        "message": "SpO2 low over 10 s", "window": "10s", "sql": sql});

    // Refused with the planner's message and where in the SQL; and what is not a SELECT.
    let mut bad = rule.clone();
    bad["sql"] = json!("SELECT device_id,\n  nosuch FROM vitals");
    let refused = api.call(
        "POST",
        "/api/v1/rules",
        Some(&analyst),
        Some(bad.clone()),
        &[],
    );
    assert_envelope(&refused, 422);
    let problem = refused.body["error"]["details"]["problems"][0]
        .as_str()
        .unwrap();
    assert!(
        problem.contains("nosuch") && problem.contains("line 2, column 3"),
        "{problem}"
    );
    bad["sql"] = json!("DROP TABLE vitals");
    let refused = api.call("POST", "/api/v1/rules", Some(&analyst), Some(bad), &[]);
    assert_envelope(&refused, 422);
    assert!(
        refused.body.to_string().contains("only a SELECT"),
        "{}",
        refused.body
    );
    // Clinicians read rules but neither write nor try them.
    let try_body = |sample: Option<String>| json!({"rule": rule, "sample": sample});
    assert_envelope(
        &api.call(
            "POST",
            "/api/v1/rules/test",
            Some(&clinician),
            Some(try_body(None)),
            &[],
        ),
        403,
    );

    // Tried on an uploaded sample: bed-1 low, bed-2 fine; nothing is raised.
    let t0 = now_millis() / 10_000 * 10_000 - 60_000;
    let sample: String = (spo2_lines("bed-1", t0, 0, 10, 85.0).into_iter())
        .chain(spo2_lines("bed-2", t0, 0, 10, 97.0))
        .map(|l| l + "\n")
        .collect();
    let tried = api.call(
        "POST",
        "/api/v1/rules/test",
        Some(&analyst),
        Some(try_body(Some(sample))),
        &[],
    );
    assert_envelope(&tried, 200);
    let data = &tried.body["data"];
    assert_eq!(
        (data["source"].as_str(), data["readings"].as_u64()),
        (Some("sample"), Some(20))
    );
    let windows = data["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 1, "{data}");
    assert_eq!(windows[0]["window_start"], t0);
    assert_eq!(windows[0]["rows"].as_array().unwrap().len(), 1, "{data}");
    assert_eq!(windows[0]["rows"][0]["device_id"], "bed-1");
    assert_eq!(windows[0]["rows"][0]["value"], 85.0);
    let bad_sample = try_body(Some(
        "{\"device_id\":\"bed-1\",\"ts\":1}\nnot json\n".into(),
    ));
    let refused = api.call(
        "POST",
        "/api/v1/rules/test",
        Some(&analyst),
        Some(bad_sample),
        &[],
    );
    assert_envelope(&refused, 422);
    assert!(
        refused.body.to_string().contains("line 2: invalid_json"),
        "{}",
        refused.body
    );

    // Tried on the most recent window of live readings.
    let mut source = h.replay_source();
    common::send_lines(&mut source, &spo2_lines("bed-1", t0, 0, 12, 85.0), 4);
    let deadline = std::time::Instant::now() + WAIT;
    let recent = loop {
        let tried = api.call(
            "POST",
            "/api/v1/rules/test",
            Some(&analyst),
            Some(try_body(None)),
            &[],
        );
        assert_envelope(&tried, 200);
        if tried.body["data"]["readings"] == 2 || std::time::Instant::now() > deadline {
            break tried.body["data"].clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(recent["source"], "recent");
    // The window holding the newest reading (11 s): [10 s, 20 s), two readings so far.
    assert_eq!(recent["readings"], 2, "{recent}");
    assert_eq!(
        recent["windows"][0]["window_start"],
        t0 + 10_000,
        "{recent}"
    );
    assert_eq!(
        recent["windows"][0]["rows"][0]["device_id"], "bed-1",
        "{recent}"
    );
    assert!(
        h.alerts
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err()
    );

    // Submitted: it takes effect on the readings that follow.
    assert_envelope(
        &api.call(
            "POST",
            "/api/v1/rules",
            Some(&analyst),
            Some(rule.clone()),
            &[],
        ),
        201,
    );
    let listed = api.get("/api/v1/rules/spo2_low_sql", &clinician);
    assert_envelope(&listed, 200);
    assert_eq!(
        (
            listed.body["data"]["kind"].as_str(),
            listed.body["data"]["sql"].as_str()
        ),
        (Some("sql"), Some(sql))
    );
    common::send_lines(&mut source, &spo2_lines("bed-1", t0, 12, 30, 85.0), 4);
    let raised = h.alerts.recv_timeout(WAIT).expect("the SQL rule raises");
    assert_eq!(
        (&*raised.alert.rule_id, raised.event),
        ("spo2_low_sql", Transition::Raised)
    );
    assert_eq!(&*raised.alert.subject, "bed-1");
    assert_eq!(raised.alert.trigger.value, 85.0);
    assert_eq!(
        raised.alert.trigger.window,
        Some((t0 + 10_000, t0 + 20_000))
    );

    // Replaced by a statement that fails on real data: it is disabled, and says why.
    let mut failing = rule.clone();
    failing["sql"] = json!("SELECT device_id, CAST('x' || device_id AS INT) AS value FROM vitals");
    assert_envelope(
        &api.call(
            "PUT",
            "/api/v1/rules/spo2_low_sql",
            Some(&analyst),
            Some(failing),
            &[],
        ),
        200,
    );
    let resolved = h
        .alerts
        .recv_timeout(WAIT)
        .expect("the replaced rule's alert resolves");
    assert_eq!(resolved.event, Transition::Resolved);
    common::send_lines(&mut source, &spo2_lines("bed-1", t0, 30, 50, 85.0), 4);
    let deadline = std::time::Instant::now() + WAIT;
    let disabled = loop {
        let got = api.get("/api/v1/rules/spo2_low_sql", &analyst).body["data"]["disabled"].clone();
        if !got.is_null() || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        disabled["message"]
            .as_str()
            .is_some_and(|m| m.contains("Cannot cast")),
        "{disabled}"
    );
    // hr_high still works.
    common::send_lines(
        &mut source,
        &[reading("bed-1", t0 + 50_000, "hr", 130.0)],
        1,
    );
    let hr = h.alerts.recv_timeout(WAIT).expect("hr_high raises");
    assert_eq!(&*hr.alert.rule_id, "hr_high");
    drop(source);
    drop(api);
    h.finish();
}

/// Refusals say what is wrong in plain words (nothing of the JWT library's), and `nbf`, a
/// leeway of seconds (not a minute) and the longest lifetime hold.
#[test]
fn tokens_are_checked_for_nbf_leeway_and_lifetime_and_refusals_are_plain() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let now = (now_millis() / 1000) as u64;
    let base = Claims::issue("nurse", Role::Clinician, None, Duration::from_secs(600));
    let sign = |claims: Claims| api.state.keys.sign(&claims);
    let refusal = |token: &str| {
        let a = api.get("/api/v1/alerts", token);
        assert_envelope(&a, 401);
        a.body["message"].as_str().unwrap().to_string()
    };
    // `alg: none`: the library's "unknown variant `none`, expected one of HS256…" stays inside.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.\
                eyJzdWIiOiJtYWxsb3J5Iiwicm9sZSI6ImFkbWluIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
    assert_eq!(refusal(none), "invalid token");
    assert_eq!(refusal("garbage"), "invalid token");
    let not_yet = sign(Claims {
        nbf: Some(now + 120),
        ..base.clone()
    });
    assert_eq!(refusal(&not_yet), "token not yet valid (nbf)");
    // Expired 30 s ago: within the old 60 s leeway, outside the new 5 s.
    let expired = sign(Claims {
        exp: now - 30,
        ..base.clone()
    });
    assert_eq!(refusal(&expired), "token expired");
    // A day-long token, with iat and without: longer than max_token_lifetime (12 h).
    let day = sign(Claims::issue(
        "nurse",
        Role::Clinician,
        None,
        Duration::from_secs(86_400),
    ));
    assert!(refusal(&day).contains("longer than"));
    let no_iat = sign(Claims {
        iat: None,
        exp: now + 86_400,
        ..base.clone()
    });
    assert!(refusal(&no_iat).contains("longer than"));
    // A token within every bound passes.
    assert_envelope(&api.get("/api/v1/alerts", &sign(base)), 200);
    drop(api);
    h.finish();
}

/// Failed authentications are limited per client address; a valid token from the same
/// address is not refused for them.
#[test]
fn failed_authentications_are_rate_limited_per_client_address() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(
        &h,
        ApiConfig {
            auth_failures_per_minute: 3,
            ..ApiConfig::default()
        },
    );
    let admin = token(&api, Role::Admin, None);
    let (mallory, nurse) = ("10.0.0.66:5000", "10.0.0.7:5000");
    for _ in 0..3 {
        assert_envelope(&api.get_from(mallory, "/api/v1/alerts", Some("bad")), 401);
    }
    let limited = api.get_from(mallory, "/api/v1/alerts", None);
    assert_envelope(&limited, 429);
    assert_eq!(limited.body["error"]["code"], "RATE_LIMITED");
    assert!(
        limited.body["error"]["details"]["retry_after_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_envelope(&api.get_from(mallory, "/api/v1/stream", Some("bad")), 429);
    // Another address is not limited, and a good token is never refused for its address.
    assert_envelope(&api.get_from(nurse, "/api/v1/alerts", Some("bad")), 401);
    assert_envelope(&api.get_from(mallory, "/api/v1/alerts", Some(&admin)), 200);
    drop(api);
    h.finish();
}

/// A clinician scoped to pp-1 may neither take pp-2's device (and with it pp-2's readings)
/// nor command it; their own patient's devices they may.
#[test]
fn a_scoped_clinician_cannot_take_or_command_another_patients_device() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let charge = token(&api, Role::Clinician, None);
    let nurse = token(&api, Role::Clinician, Some(&["pp-1"]));
    let post =
        |uri: &str, token: &str, body: Value| api.call("POST", uri, Some(token), Some(body), &[]);
    let assign = |patient: &str| json!({ "patient_id": patient });
    assert_envelope(
        &post("/api/v1/devices/mon-2/assign", &charge, assign("pp-2")),
        200,
    );
    let taken = post("/api/v1/devices/mon-2/assign", &nurse, assign("pp-1"));
    assert_envelope(&taken, 403);
    assert_eq!(
        h.engine.assignments.patient_of("mon-2").as_deref(),
        Some("pp-2"),
        "the device stays with its patient"
    );
    let command = json!({ "command": "silence_audio" });
    let refused = post("/api/v1/devices/mon-2/commands", &nurse, command.clone());
    assert_envelope(&refused, 403);
    // An unassigned device is nobody's patient's: a scoped token does not command it...
    assert_envelope(
        &post("/api/v1/devices/mon-9/commands", &nurse, command.clone()),
        403,
    );
    // ...but may attach it to its own patient, and then command it (503 here: no MQTT).
    assert_envelope(
        &post("/api/v1/devices/mon-9/assign", &nurse, assign("pp-1")),
        200,
    );
    assert_envelope(
        &post("/api/v1/devices/mon-9/commands", &nurse, command),
        503,
    );
    drop(api);
    h.finish();
}

/// Reading patients' vitals needs a role that cares for patients.
#[test]
fn patient_reads_need_a_clinical_role() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let analyst = token(&api, Role::Analyst, None);
    for uri in [
        "/api/v1/patients",
        "/api/v1/patients/pp-1/latest",
        "/api/v1/patients/pp-1/vitals?from=0&to=60000",
    ] {
        let a = api.get(uri, &analyst);
        assert_envelope(&a, 403);
        assert_eq!(a.body["error"]["code"], "FORBIDDEN", "{uri}");
    }
    drop(api);
    h.finish();
}

/// Times out of range are refused (422) before they reach storage, without overflowing.
#[test]
fn out_of_range_times_are_422() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let clinician = token(&api, Role::Clinician, None);
    for uri in [
        "/api/v1/patients/pp-1/vitals?from=-9223372036854775808&to=1000",
        "/api/v1/patients/pp-1/vitals?from=0&to=9223372036854775807",
        "/api/v1/patients/pp-1/vitals?from=0&to=60000&bucket=100000d",
        "/api/v1/alerts?since=-9223372036854775808",
    ] {
        let a = api.get(uri, &clinician);
        assert_envelope(&a, 422);
        assert_eq!(a.body["error"]["code"], "VALIDATION_FAILED", "{uri}");
    }
    drop(api);
    h.finish();
}

/// `/api/v1/stream`'s refusals are envelopes with the request id; the stream itself is not
/// wrapped.
#[test]
fn the_event_stream_refuses_in_the_envelope_and_streams_unwrapped() {
    let (bus, _) = tokio::sync::broadcast::channel(16);
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let config = ApiConfig::default();
    let state = ApiState::with_bus(&config, h.engine.control(), None, Some(bus));
    let api = Api {
        router: router(&config, state.clone()),
        state,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    };
    let no_token = api.call(
        "GET",
        "/api/v1/stream",
        None,
        None,
        &[("x-request-id", "s-1")],
    );
    assert_envelope(&no_token, 401);
    assert_eq!(no_token.body["request_id"], "s-1");
    assert_envelope(
        &api.call("GET", "/api/v1/stream?token=nope", None, None, &[]),
        401,
    );
    assert_envelope(
        &api.call("GET", "/api/v1/stream?tok=x", None, None, &[]),
        400,
    );
    // A good token (in the query, as EventSource sends it): the event stream, as it is.
    let token = token(&api, Role::Clinician, None);
    let response = api.rt.block_on(async {
        let req = Request::get(format!("/api/v1/stream?token={token}"))
            .body(Body::empty())
            .unwrap();
        api.router.clone().oneshot(req).await.unwrap()
    });
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response.headers().contains_key("x-request-id"));
    drop(response);
    drop(api);
    h.finish();
}

/// The event stream carries patients' vitals: an analyst is refused (403), and the stream
/// counts against the token's rate limit.
#[test]
fn the_event_stream_needs_a_clinical_role_and_is_rate_limited() {
    let (bus, _) = tokio::sync::broadcast::channel(16);
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let config = ApiConfig {
        rate_limit_per_minute: 2,
        ..ApiConfig::default()
    };
    let state = ApiState::with_bus(&config, h.engine.control(), None, Some(bus));
    let api = Api {
        router: router(&config, state.clone()),
        state,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    };
    let analyst = token(&api, Role::Analyst, None);
    let refused = api.call(
        "GET",
        &format!("/api/v1/stream?token={analyst}"),
        None,
        None,
        &[],
    );
    assert_envelope(&refused, 403);
    assert_eq!(refused.body["error"]["code"], "FORBIDDEN");
    let clinician = token(&api, Role::Clinician, None);
    let open = |t: &str| {
        api.rt.block_on(async {
            let req = Request::get(format!("/api/v1/stream?token={t}"))
                .body(Body::empty())
                .unwrap();
            api.router.clone().oneshot(req).await.unwrap().status()
        })
    };
    assert_eq!(open(&clinician), StatusCode::OK);
    assert_eq!(open(&clinician), StatusCode::OK);
    assert_eq!(open(&clinician), StatusCode::TOO_MANY_REQUESTS);
    drop(api);
    h.finish();
}

/// Over real sockets: a connection that sends no request head (new or kept alive) is closed
/// after `header_read_timeout`, a silent one after `idle_timeout`; one address holds at most
/// `max_connections_per_client` (the next is answered 429 in the envelope), and past
/// `max_connections` new connections wait for a free slot instead of being served at the
/// expense of the process's file descriptors.
#[test]
fn idle_and_slow_connections_are_closed_and_connections_are_limited() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let closed_within = |stream: &mut TcpStream, limit: Duration| {
        stream.set_read_timeout(Some(limit)).unwrap();
        let mut rest = Vec::new();
        // EOF (or a reset) within the limit: the server closed it. A timeout: still open.
        match stream.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => {
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut
            }
        }
    };
    let health = |stream: &mut TcpStream| {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    // Timeouts.
    let config = ApiConfig {
        header_read_timeout: Duration::from_millis(300),
        ..ApiConfig::default()
    };
    let state = ApiState::new(&config, h.engine.control(), None);
    let server = common::server::Server::start_rest(&config, state);
    let mut silent = TcpStream::connect(server.addr).unwrap();
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nhost:").unwrap();
    let mut kept = TcpStream::connect(server.addr).unwrap();
    assert!(health(&mut kept).starts_with("HTTP/1.1 200"));
    for (what, stream) in [
        ("silent", &mut silent),
        ("slow", &mut slow),
        ("kept alive", &mut kept),
    ] {
        assert!(
            closed_within(stream, Duration::from_secs(3)),
            "{what} connection still open"
        );
    }
    server.stop();
    let config = ApiConfig {
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_millis(300),
        ..ApiConfig::default()
    };
    let state = ApiState::new(&config, h.engine.control(), None);
    let server = common::server::Server::start_rest(&config, state);
    let mut silent = TcpStream::connect(server.addr).unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(3)),
        "idle_timeout"
    );
    server.stop();

    // Per client address.
    let config = ApiConfig {
        max_connections_per_client: 2,
        ..ApiConfig::default()
    };
    let state = ApiState::new(&config, h.engine.control(), None);
    let server = common::server::Server::start_rest(&config, state);
    let first = TcpStream::connect(server.addr).unwrap();
    let mut second = TcpStream::connect(server.addr).unwrap();
    assert!(health(&mut second).starts_with("HTTP/1.1 200"));
    let mut third = TcpStream::connect(server.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut refused = String::new();
    let _ = third.read_to_string(&mut refused);
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    let body: Value = serde_json::from_str(refused.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "TOO_MANY_CONNECTIONS", "{body}");
    assert_eq!(body["success"], false);
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let mut again = TcpStream::connect(server.addr).unwrap();
    assert!(
        health(&mut again).starts_with("HTTP/1.1 200"),
        "a closed one frees its slot"
    );
    drop((second, again));
    server.stop();

    // In all: the next connection waits for a slot, and is served when one frees.
    let config = ApiConfig {
        max_connections: 2,
        max_connections_per_client: 0,
        ..ApiConfig::default()
    };
    let state = ApiState::new(&config, h.engine.control(), None);
    let server = common::server::Server::start_rest(&config, state);
    let hogs = [
        TcpStream::connect(server.addr).unwrap(),
        TcpStream::connect(server.addr).unwrap(),
    ];
    std::thread::sleep(Duration::from_millis(200));
    let mut waiting = TcpStream::connect(server.addr).unwrap();
    waiting
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(
        waiting.read(&mut buf).is_err(),
        "served past max_connections"
    );
    drop(hogs);
    waiting
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let n = waiting.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(waiting);
    server.stop();
    h.finish();
}

/// A request through the router on the current runtime, so that several can be in flight.
async fn send(
    router: &axum::Router,
    method: &str,
    uri: &str,
    token: &str,
    body: Option<Value>,
) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json");
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// What took the whole process down (a flat chain overflowed the serving thread's stack; a
/// `repeat` of 2 GB aborted on the allocation) or let a rule keep every reading or run every
/// 10 ms is refused, by `/rules` and `/rules/test` alike, in the envelope, saying which limit.
#[test]
fn sql_rules_that_could_take_the_service_down_are_refused() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let analyst = token(&api, Role::Analyst, None);
    let rule = |sql: &str, window: &str, slide: &str| {
        json!({"id": "probe", "kind": "sql", "priority": "low", "message": "m",
            "window": window, "slide": slide, "sql": sql})
    };
    let plus = vec!["1"; 2000].join("+");
    let and = vec!["hr > 1"; 2000].join(" AND ");
    let cases = [
        (
            rule(
                &format!("SELECT device_id FROM vitals WHERE hr > {plus}"),
                "10s",
                "10s",
            ),
            "deeper than the limit of 128 levels",
        ),
        (
            rule(
                &format!("SELECT device_id FROM vitals WHERE {and}"),
                "10s",
                "10s",
            ),
            "deeper than the limit of 128 levels",
        ),
        (
            rule(
                "SELECT device_id, length(repeat('x', 2000000000)) AS value FROM vitals",
                "10s",
                "10s",
            ),
            "over the limit of 16777216 bytes",
        ),
        (
            rule("SELECT device_id FROM vitals", "1000days", "1000days"),
            "at most 1h for a SQL rule (engine.sql_max_window)",
        ),
        (
            rule("SELECT device_id FROM vitals", "10s", "10ms"),
            "at least 1s for a SQL rule (engine.sql_min_slide)",
        ),
        // Copied to every row (rows × rows outside the memory pool), or quadratic in one
        // call, or exponential to plan.
        (
            rule(
                "SELECT device_id, array_agg(hr) OVER () AS l FROM vitals",
                "10s",
                "10s",
            ),
            "lists, maps and structs are not allowed",
        ),
        (
            rule(
                "SELECT device_id, string_agg(device_id, ',') OVER () AS message FROM vitals",
                "10s",
                "10s",
            ),
            "not allowed over a window",
        ),
        (
            rule(
                "SELECT device_id, levenshtein(repeat('a', 100000), repeat('b', 100000)) \
                 AS value FROM vitals",
                "10s",
                "10s",
            ),
            "levenshtein() is not allowed",
        ),
        (
            rule(
                &format!(
                    "WITH s0 AS (SELECT device_id FROM vitals){} SELECT device_id FROM s12",
                    (1..=12)
                        .map(|i| format!(
                            ", s{i} AS (SELECT a.device_id FROM s{p} a, s{p} b, s{p} c, s{p} d)",
                            p = i - 1
                        ))
                        .collect::<String>()
                ),
                "10s",
                "10s",
            ),
            "reference CTEs fewer times",
        ),
    ];
    for (spec, expected) in cases {
        let created = api.call(
            "POST",
            "/api/v1/rules",
            Some(&analyst),
            Some(spec.clone()),
            &[],
        );
        assert_envelope(&created, 422);
        assert!(
            created.body.to_string().contains(expected),
            "{}",
            created.body
        );
        let tried = json!({"rule": spec, "sample": ""});
        let tried = api.call(
            "POST",
            "/api/v1/rules/test",
            Some(&analyst),
            Some(tried),
            &[],
        );
        assert_envelope(&tried, 422);
        assert!(tried.body.to_string().contains(expected), "{}", tried.body);
    }
    assert_envelope(&api.get("/api/v1/rules/probe", &analyst), 404);
    assert_envelope(&api.get("/api/v1/health", &analyst), 200);
    drop(api);
    h.finish();
}

/// Trials run on threads of their own, not the API's: while one computes for its whole time
/// limit, the API answers at once; at most `engine.sql_trials` run together and one more is
/// refused with 429; a trial ends at its limit, however many windows its sample has.
#[test]
fn sql_trials_run_off_the_serving_thread_and_at_most_sql_trials_at_once() {
    let config = vitalstream::engine::EngineConfig {
        sql_trials: 1,
        sql_timeout: std::time::Duration::from_secs(3),
        ..common::config()
    };
    let h = Harness::start(&config, rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let analyst = token(&api, Role::Analyst, None);
    let t0 = now_millis() / 10_000 * 10_000 - 60_000;
    let sample: String = (0..200)
        .map(|i| reading(&format!("bed-{}", i % 20), t0 + i * 40, "hr", 70.0) + "\n")
        .collect();
    let trial = |sql: &str| {
        json!({"rule": {"id": "t", "kind": "sql", "priority": "low", "message": "m",
            "window": "10s", "sql": sql}, "sample": sample})
    };
    // Runs until its time limit: 200⁴ rows to look at.
    let runaway = trial(
        "SELECT a.device_id FROM vitals a, vitals b, vitals c, vitals d \
         WHERE a.hr + b.hr + c.hr + d.hr < 0",
    );
    let sound = trial("SELECT device_id, avg(hr) AS value FROM vitals GROUP BY device_id");
    let router = api.router.clone();
    api.rt.block_on(async {
        let started = std::time::Instant::now();
        let running = {
            let (router, analyst) = (router.clone(), analyst.clone());
            tokio::spawn(async move {
                let answer = send(
                    &router,
                    "POST",
                    "/api/v1/rules/test",
                    &analyst,
                    Some(runaway),
                )
                .await;
                (answer, started.elapsed())
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let asked = std::time::Instant::now();
        let health = send(&router, "GET", "/api/v1/health", &analyst, None).await;
        let health_took = asked.elapsed();
        assert_envelope(&health, 200);
        let busy = send(
            &router,
            "POST",
            "/api/v1/rules/test",
            &analyst,
            Some(sound.clone()),
        )
        .await;
        assert!(!running.is_finished(), "the runaway trial is still running");
        assert!(
            health_took < std::time::Duration::from_millis(1500),
            "/health took {health_took:?} beside a trial"
        );
        assert_envelope(&busy, 429);
        assert!(
            busy.body["message"]
                .as_str()
                .unwrap()
                .contains("engine.sql_trials"),
            "{}",
            busy.body
        );

        let (stopped, took) = running.await.unwrap();
        assert_envelope(&stopped, 422);
        assert!(
            stopped.body["message"]
                .as_str()
                .unwrap()
                .contains("longer than its limit of 3s"),
            "{}",
            stopped.body
        );
        assert!(
            took < std::time::Duration::from_secs(5),
            "the trial took {took:?}"
        );
        // Its place is free again.
        let tried = send(&router, "POST", "/api/v1/rules/test", &analyst, Some(sound)).await;
        assert_envelope(&tried, 200);
        assert_eq!(tried.body["data"]["readings"], 200, "{}", tried.body);
    });
    drop(api);
    h.finish();
}

/// Rules act on every patient: a token limited to some patients may not create, replace,
/// delete or try them (403), whatever its role; and it may notify only its patients' rooms.
#[test]
fn patient_scoped_tokens_may_not_touch_rules_or_notify_other_patients() {
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api = api(&h, ApiConfig::default());
    let rule = json!({"id": "scoped_try", "kind": "sql", "priority": "low",
        "message": "m", "window": "10s",
        "sql": "SELECT device_id, patient_id, avg(spo2) AS value FROM vitals GROUP BY device_id, patient_id"});
    for role in [Role::Admin, Role::Analyst] {
        let scoped = token(&api, role, Some(&["pp-1"]));
        for (method, uri, body) in [
            ("POST", "/api/v1/rules/test", Some(json!({ "rule": rule }))),
            ("POST", "/api/v1/rules", Some(rule.clone())),
            ("PUT", "/api/v1/rules/scoped_try", Some(rule.clone())),
            ("DELETE", "/api/v1/rules/scoped_try", None),
        ] {
            let a = api.call(method, uri, Some(&scoped), body, &[]);
            assert_envelope(&a, 403);
            assert_eq!(a.body["error"]["code"], "FORBIDDEN", "{method} {uri}");
        }
    }
    let scoped = token(&api, Role::Service, Some(&["pp-1"]));
    let notice = |to: &str| json!({ "to": to, "title": "t", "message": "m" });
    let a = api.call(
        "POST",
        "/api/v1/notifications",
        Some(&scoped),
        Some(notice("patient:pp-2")),
        &[],
    );
    assert_envelope(&a, 403);
    let a = api.call(
        "POST",
        "/api/v1/notifications",
        Some(&scoped),
        Some(notice("patient:pp-1")),
        &[],
    );
    assert_envelope(&a, 202);
    drop(api);
    h.finish();
}
