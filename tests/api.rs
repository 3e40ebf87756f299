//! The REST API through its router (and once over a real socket), on a running engine.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{HR_RULE, Harness, WAIT, reading, rules};
use serde_json::{Value, json};
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
    let forged = vitalstream::api::auth::Keys::new("another-secret").sign(&Claims {
        sub: "mallory".into(),
        role: Role::Admin,
        patients: None,
        exp: (now_millis() / 1000 + 600) as u64,
    });
    assert_eq!(api.get("/api/v1/alerts", &forged).status, 401);
    let expired = api.state.keys.sign(&Claims {
        sub: "late".into(),
        role: Role::Admin,
        patients: None,
        exp: (now_millis() / 1000 - 3600) as u64,
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
    let server = common::server::Server::start_rest(&config, state);
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
