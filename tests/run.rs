//! `vitalstream run` as an operator runs it: the simulator feeds the engine, alerts appear,
//! and SIGINT stops it cleanly with every accepted reading in complete Parquet files.

mod common;

use common::parquet_rows;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn runs_the_simulator_and_stops_cleanly_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let alerts = dir.path().join("alerts.ndjson");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
status_interval = "1s"
[log]
format = "json"
[[sources]]
type = "simulator"
devices = 40
rate_hz = 10.0
anomaly_rate = 1.0
[storage]
dir = "{data}"
[alert_log]
path = "{alerts}"
[dead_letter]
path = "{data}/dead-letter.ndjson"
[api]
listen = "127.0.0.1:0"
dev_token = true
"#,
            data = data.display(),
            alerts = alerts.display()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("run.log");
    let child = Command::new(env!("CARGO_BIN_EXE_vitalstream"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log_lines = || -> Vec<Value> {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    };
    // Let it run until alerts have been raised (anomalies start within seconds), and for long
    // enough to print status lines.
    std::thread::sleep(Duration::from_millis(2500));
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&alerts).map_or(true, |t| !t.contains("\"raised\"")) {
        assert!(Instant::now() < deadline, "no alert within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The start-up line names the API and a development token that works at once.
    let api = log_lines()
        .into_iter()
        .find(|l| l["fields"]["url"].is_string())
        .expect("the API's address in the log");
    let (url, token) = (
        api["fields"]["url"].as_str().unwrap().to_string(),
        api["fields"]["dev_token"].as_str().unwrap().to_string(),
    );
    let mut answer = ureq::get(format!("{url}/alerts"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap();
    let alerts_now: Value =
        serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(alerts_now["success"], true, "{alerts_now}");
    assert!(
        !alerts_now["data"].as_array().unwrap().is_empty(),
        "{alerts_now}"
    );

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(out.status.success(), "exit status {:?}\n{log}", out.status);

    let stopped: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "stopped cleanly")
        .unwrap_or_else(|| panic!("no clean stop in the log:\n{log}"));
    let accepted = stopped["fields"]["accepted"].as_u64().unwrap() as usize;
    assert!(accepted > 0);
    assert!(
        log.contains("\"message\":\"status\""),
        "status lines are printed"
    );
    assert_eq!(
        parquet_rows(&data, "readings-"),
        accepted,
        "every accepted reading is stored"
    );
    let alert_lines = std::fs::read_to_string(&alerts).unwrap().lines().count();
    assert_eq!(
        parquet_rows(&data, "alerts-"),
        alert_lines,
        "every alert transition is stored"
    );
}

/// Outside development mode the service refuses to start without a secret of its own, and
/// with one it prints no development token.
#[test]
fn refuses_the_public_or_an_empty_secret_and_prints_no_token_outside_development_mode() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let write = |api: &str| {
        std::fs::write(
            &config,
            format!(
                "[log]\nformat = \"json\"\n[storage]\ndir = \"{data}\"\n[alert_log]\npath = \"{data}/alerts.ndjson\"\n\
                 [dead_letter]\npath = \"{data}/dead.ndjson\"\n[api]\nlisten = \"127.0.0.1:0\"\n{api}",
                data = dir.path().join("data").display()
            ),
        )
        .unwrap();
    };
    let run = |env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vitalstream"));
        command.args(["run", "--config", config.to_str().unwrap()]);
        for (k, v) in env {
            command.env(k, v);
        }
        command
    };
    let refused = |env: &[(&str, &str)], why: &str| {
        let err = dir.path().join("refused.log");
        let mut child = run(env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("started: {}", std::fs::read_to_string(&err).unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stderr = std::fs::read_to_string(&err).unwrap();
        assert!(!status.success(), "{stderr}");
        assert!(stderr.contains(why), "{why} not in\n{stderr}");
    };
    // No dev_token written, no secret: the public development secret is refused.
    write("");
    refused(&[], "public development secret");
    // dev_token = false with a short secret; an empty secret even in development mode.
    write("dev_token = false\njwt_secret = \"hunter2\"\n");
    refused(&[], "at least 32");
    write("dev_token = true\njwt_secret = \"\"\n");
    refused(&[], "empty");

    // A real secret, dev_token unset: it starts, and no admin token is in the log.
    write("");
    let log_path = dir.path().join("run.log");
    let child = run(&[(
        "VITALSTREAM__API__JWT_SECRET",
        "a-secret-of-our-own-at-least-32-bytes",
    )])
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log_path).unwrap())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let listening = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains("API listening")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "the API never started:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!listening.contains("dev_token"), "{listening}");
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
}
