//! socket.io with the official client (Node, `socket.io-client` v4 from npm, installed by
//! `.ci/run` into tests/socketio/node_modules): JWT handshake, patient rooms and their
//! scope, `alert:critical` for a reading pushed through the engine, `alert:acknowledge`.

mod common;

use common::server::{Server, token};
use common::{HR_RULE, Harness, WAIT, reading, rules};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use vitalstream::alerts::{AlertState, Transition};
use vitalstream::api::auth::Role;
use vitalstream::api::{ApiConfig, ApiState};
use vitalstream::model::now_millis;

#[test]
fn the_official_client_gets_its_patients_critical_alerts_and_acknowledges_them() {
    let (bus, _) = tokio::sync::broadcast::channel(1024);
    let mut h = Harness::with_live(&common::config(), rules(HR_RULE), bus.clone());
    let config = ApiConfig::default();
    let state = ApiState::with_bus(&config, h.engine.control(), None, Some(bus));
    let service = token(&state, "reports", Role::Service, None);
    let token = token(&state, "nurse-7", Role::Clinician, Some(&["p1"]));
    let server = Server::start(&config, state);
    let addr = server.addr;
    // The engine puts every transition on the bus; the same ones come out on `h.alerts`.
    let seen = h.alerts.clone();

    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/socketio");
    let mut node = Command::new("node")
        .arg("client.mjs")
        .current_dir(dir)
        .env("VS_URL", format!("http://{addr}"))
        .env("VS_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node (`.ci/run` installs it, and the client with npm)");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut steps: Vec<Value> = Vec::new();
    let mut next = || -> Value {
        let line = lines.next().expect("the client ended early").unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    loop {
        let step = next();
        let ready = step["step"] == "ready";
        steps.push(step);
        if ready {
            break;
        }
    }
    // p2's alert first: this client may not see it. Then p1's.
    let mut source = h.replay_source();
    let t = now_millis() - 5_000;
    let line = |dev: &str, pat: &str| {
        reading(dev, t, "hr", 150.0).replace('{', &format!(r#"{{"patient_id":"{pat}","#))
    };
    common::send_lines(&mut source, &[line("d2", "p2")], 1);
    let p2 = seen.recv_timeout(WAIT).expect("p2's alert");
    assert_eq!(p2.alert.patient_id.as_deref(), Some("p2"));
    common::send_lines(&mut source, &[line("d1", "p1")], 1);
    for step in std::iter::from_fn(|| {
        lines
            .next()
            .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
    }) {
        if step["step"] == "acknowledged" {
            // A service tells this user something, through REST.
            let mut answer = ureq::post(format!("http://{addr}/api/v1/notifications"))
                .header("Authorization", format!("Bearer {service}"))
                .header("Content-Type", "application/json")
                .send(
                    serde_json::json!({
                        "to": "user:nurse-7", "title": "Shift report", "message": "ready to read"
                    })
                    .to_string(),
                )
                .unwrap();
            let body: Value =
                serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
            assert_eq!(body["status"], 202, "{body}");
        }
        steps.push(step);
    }
    let status = node.wait().unwrap();
    let by = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no {name} in {steps:#?}"))
    };
    assert!(status.success(), "{steps:#?}");

    assert!(
        by("refused_bad_token")["message"]
            .as_str()
            .unwrap()
            .contains("invalid token"),
        "{steps:#?}"
    );
    assert!(
        by("refused_no_token")["message"]
            .as_str()
            .unwrap()
            .contains("auth.token"),
        "{steps:#?}"
    );
    assert_eq!(by("subscribe_p2")["answer"]["ok"], false);
    assert_eq!(by("subscribe_p1")["answer"]["ok"], true);
    let critical: Vec<&Value> = steps.iter().filter(|s| s["step"] == "critical").collect();
    assert_eq!(critical.len(), 1, "{steps:#?}");
    let event = &critical[0]["event"];
    assert_eq!(
        (
            event["patient_id"].as_str(),
            event["event"].as_str(),
            event["priority"].as_str()
        ),
        (Some("p1"), Some("raised"), Some("high"))
    );
    let answer = &by("acknowledged")["answer"];
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["alert"]["acknowledged_by"], "nurse-7");
    let notice = &by("notification")["notice"];
    assert_eq!(
        (notice["title"].as_str(), notice["to"].as_str()),
        (Some("Shift report"), Some("user:nurse-7"))
    );

    // The engine's book agrees, and the acknowledgement went out as a transition.
    let id = event["alert_id"].as_str().unwrap();
    assert_eq!(
        h.engine.book.get(id).unwrap().state,
        AlertState::Acknowledged
    );
    let raised = seen.recv_timeout(WAIT).expect("p1's alert");
    assert_eq!(
        (raised.event, raised.alert.alert_id.as_str()),
        (Transition::Raised, id)
    );
    let acked = seen
        .recv_timeout(WAIT)
        .expect("the acknowledgement transition");
    assert_eq!(
        (acked.event, acked.alert.alert_id.as_str()),
        (Transition::Acknowledged, id)
    );

    drop(source);
    server.stop();
    h.engine.join(vitalstream::engine::EndOfInput::KeepOpen);
}

/// Two instances sharing rooms through the Redis on 127.0.0.1:6379: a client connected to
/// the first gets an alert that the second raised.
#[test]
fn an_alert_raised_on_one_instance_reaches_a_client_of_another_through_redis() {
    // Instance 2's bus, where the engine raises the alert.
    let (bus, _) = tokio::sync::broadcast::channel(1024);
    let mut h = Harness::with_live(&common::config(), rules(HR_RULE), bus.clone());
    let config = ApiConfig {
        redis_url: Some("redis://127.0.0.1:6379".into()),
        ..ApiConfig::default()
    };
    // Instance 1: the client's. Its bus stays silent.
    let (quiet, _) = tokio::sync::broadcast::channel(16);
    let one = ApiState::with_bus(&config, h.engine.control(), None, Some(quiet));
    // Instance 2: where the alert is raised.
    let two = ApiState::with_bus(&config, h.engine.control(), None, Some(bus));
    let token = token(&one, "nurse-remote", Role::Clinician, Some(&["p-redis"]));
    let servers = [Server::start(&config, one), Server::start(&config, two)];

    let mut node = Command::new("node")
        .arg("listen.mjs")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/socketio"))
        .env("VS_URL", servers[0].url())
        .env("VS_TOKEN", &token)
        .env("VS_PATIENT", "p-redis")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let mut steps: Vec<Value> = Vec::new();
    let mut source = h.replay_source();
    for line in BufReader::new(node.stdout.take().unwrap()).lines() {
        let step: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if step["step"] == "ready" {
            let t = now_millis() - 1000;
            let l = reading("bed-r", t, "hr", 150.0).replace('{', r#"{"patient_id":"p-redis","#);
            common::send_lines(&mut source, &[l], 1);
        }
        steps.push(step);
    }
    assert!(node.wait().unwrap().success(), "{steps:#?}");
    let got = steps
        .iter()
        .find(|s| s["step"] == "critical")
        .unwrap_or_else(|| panic!("{steps:#?}"));
    assert_eq!(got["event"]["patient_id"], "p-redis");
    drop(source);
    for server in servers {
        server.stop();
    }
    h.engine.join(vitalstream::engine::EndOfInput::KeepOpen);
}

/// `vitals:update` carries a patient's latest vitals to its room, once a second at most.
#[test]
fn a_patients_room_gets_its_latest_vitals() {
    let (alerts_tx, _alerts) = crossbeam_channel::unbounded();
    let outputs = vitalstream::engine::Outputs {
        alerts: alerts_tx,
        live: None,
        readings: None,
        rejects: None,
        latest: Some(Default::default()),
    };
    let mut engine = vitalstream::engine::Engine::start(&common::config(), rules(HR_RULE), outputs);
    let config = ApiConfig::default();
    let state = ApiState::new(&config, engine.control(), None);
    let token = token(&state, "nurse-v", Role::Clinician, Some(&["p5"]));
    let server = Server::start(&config, state);
    let mut node = Command::new("node")
        .arg("listen.mjs")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/socketio"))
        .env("VS_URL", server.url())
        .env("VS_TOKEN", &token)
        .env("VS_PATIENT", "p5")
        .env("VS_EVENT", "vitals:update")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let mut source = engine.source(vitalstream::model::ClockMode::Replay { speed: 0.0 });
    let mut steps: Vec<Value> = Vec::new();
    for line in BufReader::new(node.stdout.take().unwrap()).lines() {
        let step: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if step["step"] == "ready" {
            let t = now_millis() - 2000;
            let lines = [
                r#"{"device_id":"mon-5","patient_id":"p5","ts":TS,"hr":72,"spo2":97}"#
                    .replace("TS", &t.to_string()),
                r#"{"device_id":"ox-5","patient_id":"p5","ts":TS,"spo2":95}"#
                    .replace("TS", &(t + 500).to_string()),
            ];
            common::send_lines(&mut source, &lines, 2);
        }
        steps.push(step);
    }
    assert!(node.wait().unwrap().success(), "{steps:#?}");
    let update = &steps
        .iter()
        .find(|s| s["step"] == "event")
        .unwrap_or_else(|| panic!("{steps:#?}"))["event"];
    assert_eq!(
        (
            update["patient_id"].as_str(),
            update["hr"].as_f64(),
            update["spo2"].as_f64(),
            update["device_id"].as_str()
        ),
        (Some("p5"), Some(72.0), Some(95.0), Some("ox-5"))
    );
    drop(source);
    server.stop();
    engine.join(vitalstream::engine::EndOfInput::KeepOpen);
}

/// A socket.io connection does not outlive its token: at expiry the server says so
/// (`auth:expired`) and disconnects it.
#[test]
fn a_connection_is_closed_when_its_token_expires() {
    let (bus, _) = tokio::sync::broadcast::channel(16);
    let h = Harness::with_live(&common::config(), rules(HR_RULE), bus.clone());
    let config = ApiConfig::default();
    let state = ApiState::with_bus(&config, h.engine.control(), None, Some(bus));
    let lifetime = std::time::Duration::from_secs(3);
    let token = common::server::token_for(&state, "nurse-x", Role::Clinician, None, lifetime);
    let server = Server::start(&config, state);
    let mut node = Command::new("node")
        .arg("expiry.mjs")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/socketio"))
        .env("VS_URL", server.url())
        .env("VS_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let steps: Vec<Value> = BufReader::new(node.stdout.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert!(node.wait().unwrap().success(), "{steps:#?}");
    let at = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no {name} in {steps:#?}"))
    };
    assert_eq!(
        at("disconnected")["reason"],
        "io server disconnect",
        "{steps:#?}"
    );
    assert!(
        at("expired")["event"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    // Connected for (nearly) the token's lifetime, not cut short and not kept past it.
    let held = at("disconnected")["at"].as_i64().unwrap() - at("connected")["at"].as_i64().unwrap();
    assert!((1_000..6_000).contains(&held), "{held} ms");
    server.stop();
    h.engine.join(vitalstream::engine::EndOfInput::KeepOpen);
}
