//! The live ward page at `/` in headless Chromium (Debian's `chromium`, driven by
//! playwright-core from npm; `.ci/run` installs both): a reading pushed through the engine
//! shows up as a live alert over Server-Sent Events, and the page's button acknowledges it.

mod common;

use common::server::{Server, token};
use common::{HR_RULE, WAIT, reading, rules};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use vitalstream::alerts::{AlertState, Transition};
use vitalstream::api::auth::Role;
use vitalstream::api::{ApiConfig, ApiState};
use vitalstream::engine::{EndOfInput, Engine, Outputs};
use vitalstream::model::{ClockMode, now_millis};

#[test]
fn a_live_alert_appears_on_the_page_and_its_button_acknowledges_it() {
    let (alerts_tx, alerts) = crossbeam_channel::unbounded();
    let outputs = Outputs {
        alerts: alerts_tx,
        live: None,
        readings: None,
        rejects: None,
        latest: Some(Default::default()),
    };
    let mut engine = Engine::start(&common::config(), rules(HR_RULE), outputs);
    let config = ApiConfig::default();
    let (bus, _) = tokio::sync::broadcast::channel(1024);
    let state = ApiState::with_bus(&config, engine.control(), None, Some(bus.clone()));
    let token = token(&state, "charge-nurse", Role::Clinician, None);
    let server = Server::start(&config, state);
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for e in alerts {
            let _ = bus.send(Arc::new(e.clone()));
            let _ = seen_tx.send(e);
        }
    });

    let mut source = engine.source(ClockMode::Replay { speed: 0.0 });
    let t = now_millis() - 5_000;
    let line =
        |ts: i64, hr: f64| reading("bed-4", ts, "hr", hr).replace('{', r#"{"patient_id":"p4","#);
    // A first, normal reading so the patient is on the page.
    common::send_lines(&mut source, &[line(t, 80.0)], 1);

    let mut browser = Command::new("node")
        .arg("page.mjs")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser"))
        .env("VS_PAGE", format!("{}/?token={token}", server.url()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node (`.ci/run` installs it, playwright-core and chromium)");
    let mut steps: Vec<Value> = Vec::new();
    let mut lines = BufReader::new(browser.stdout.take().unwrap()).lines();
    while let Some(Ok(l)) = lines.next() {
        let step: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
        if step["step"] == "ready" {
            // The page is live: now the alarm.
            std::thread::sleep(std::time::Duration::from_millis(1200));
            common::send_lines(&mut source, &[line(t + 1000, 150.0)], 1);
        }
        steps.push(step);
    }
    let status = browser.wait().unwrap();
    assert!(status.success(), "{steps:#?}");
    let by = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no {name}: {steps:#?}"))
    };
    let shown = by("alert_shown");
    assert!(
        shown["text"].as_str().unwrap().contains("HR high"),
        "{shown}"
    );
    assert!(
        by("acknowledged")["text"]
            .as_str()
            .unwrap()
            .contains("acknowledged by charge-nurse"),
        "{steps:#?}"
    );
    assert!(by("patients")["rows"].as_u64().unwrap() >= 1, "{steps:#?}");

    let raised = seen.recv_timeout(WAIT).expect("the alert");
    assert_eq!(raised.event, Transition::Raised);
    assert_eq!(shown["id"].as_str(), Some(raised.alert.alert_id.as_str()));
    let acked = seen.recv_timeout(WAIT).expect("the acknowledgement");
    assert_eq!(
        (acked.event, acked.alert.acknowledged_by.as_deref()),
        (Transition::Acknowledged, Some("charge-nurse"))
    );
    assert_eq!(
        engine.book.get(&raised.alert.alert_id).unwrap().state,
        AlertState::Acknowledged
    );

    drop(source);
    server.stop();
    engine.join(EndOfInput::KeepOpen);
}
