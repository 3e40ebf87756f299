//! The PostgreSQL writer against the real server on 127.0.0.1:5432 (no TimescaleDB here, so
//! the partitioned fallback): schema, exact storage, faults, the spool, and the queries.

mod common;

use common::pg::{Outage, TestDb};
use common::{HR_RULE, Harness, reading, rules};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};
use vitalstream::engine::EndOfInput;
use vitalstream::model::{CorrelationId, Id, Sample, Vitals, now_micros, now_millis};
use vitalstream::sinks::Storage;
use vitalstream::sinks::postgres::query::{AlertQuery, Db};
use vitalstream::sinks::postgres::schema::Flavour;
use vitalstream::sinks::postgres::{PostgresConfig, PostgresStorage, TimescaleMode, migrate_url};

fn config(db: &TestDb, spool: &Path) -> PostgresConfig {
    PostgresConfig {
        url: db.url.clone(),
        spool_dir: spool.to_path_buf(),
        batch_rows: 2_000,
        connect_timeout: Duration::from_secs(2),
        call_timeout: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        breaker_cooldown: Duration::from_millis(300),
        ..PostgresConfig::default()
    }
}

/// Reading `i` of a deterministic stream over `devices` devices, one per second per device
/// ending now; every fourth has no spo2, every seventh no patient.
fn sample(i: u64, devices: u64) -> Sample {
    let device = i % devices;
    let base = now_millis() - 86_400_000;
    let mut vitals = Vitals::default();
    vitals.0[0] = 60.0 + (i % 50) as f64;
    if !i.is_multiple_of(4) {
        vitals.0[1] = 90.0 + (i % 10) as f64 * 0.5;
    }
    vitals.0[2] = 36.5 + (i % 3) as f64 * 0.1;
    Sample {
        device_id: Id::from(format!("dev-{device:04}")),
        patient_id: (!i.is_multiple_of(7)).then(|| Id::from(format!("pat-{device:04}"))),
        ts: base + (i / devices) as i64 * 1000,
        device_ts: true,
        received_us: now_micros(),
        vitals,
        seq: Some(i / devices),
        correlation_id: CorrelationId::Generated(i),
        late: false,
        warmup: false,
    }
}

fn stream(range: std::ops::Range<u64>) -> Vec<Sample> {
    range.map(|i| sample(i, 50)).collect()
}

/// Every stored reading as text, in key order.
fn stored(db: &TestDb) -> Vec<Vec<String>> {
    db.rows(
        "SELECT device_id, (extract(epoch from time) * 1000)::bigint, patient_id, hr, spo2, temp, \
         seq FROM device_vitals ORDER BY device_id, time",
    )
}

/// The same, computed from the samples.
fn expected(samples: &[Sample]) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = samples
        .iter()
        .map(|s| {
            let v = |i: usize| {
                let x = s.vitals.0[i];
                if x.is_nan() {
                    "null".into()
                } else {
                    x.to_string()
                }
            };
            vec![
                s.device_id.to_string(),
                s.ts.to_string(),
                s.patient_id.as_deref().unwrap_or("null").to_string(),
                v(0),
                v(1),
                v(2),
                s.seq.unwrap().to_string(),
            ]
        })
        .collect();
    rows.sort_by(|a, b| (&a[0], a[1].parse::<i64>().unwrap()).cmp(&(&b[0], b[1].parse().unwrap())));
    rows
}

fn spool_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("spool-"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn migrations_build_the_partitioned_fallback_and_refuse_an_edited_history() {
    let db = TestDb::create();
    assert_eq!(
        migrate_url(&db.url, TimescaleMode::Auto).unwrap(),
        Flavour::Postgres
    );
    assert_eq!(
        migrate_url(&db.url, TimescaleMode::Auto).unwrap(),
        Flavour::Postgres,
        "re-run"
    );
    assert_eq!(
        db.rows("SELECT version::text, flavour FROM vitalstream_schema ORDER BY version"),
        [
            ["1", "any"],
            ["2", "postgres"],
            ["3", "postgres"],
            ["4", "any"],
            ["5", "any"]
        ]
    );
    // device_vitals is range-partitioned on time, with (device_id, time) unique.
    assert_eq!(
        db.rows(
            "SELECT p.partstrat::text FROM pg_partitioned_table p \
             WHERE p.partrelid = 'device_vitals'::regclass"
        ),
        [["r"]]
    );
    // The writer creates day partitions from yesterday to two days ahead.
    let spool = tempfile::tempdir().unwrap();
    let storage = PostgresStorage::open(&config(&db, spool.path())).unwrap();
    let today = now_millis().div_euclid(86_400_000);
    let mut names: Vec<String> = (today - 1..=today + 2)
        .map(|d| {
            let date = chrono::DateTime::from_timestamp(d * 86_400, 0).unwrap();
            format!("device_vitals_p{}", date.format("%Y%m%d"))
        })
        .collect();
    names.sort();
    let existing: Vec<String> = db
        .rows(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'device_vitals'::regclass ORDER BY 1",
        )
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(existing, names);
    drop(storage);

    let err = migrate_url(&db.url, TimescaleMode::Require).unwrap_err();
    assert!(err.to_string().contains("without TimescaleDB"), "{err}");
    db.execute("UPDATE vitalstream_schema SET checksum = 'deadbeef' WHERE version = 1");
    let err = migrate_url(&db.url, TimescaleMode::Auto).unwrap_err();
    assert!(err.to_string().contains("must not be edited"), "{err}");
}

#[test]
fn every_reading_is_stored_once_with_its_values_even_when_sent_twice() {
    let db = TestDb::create();
    let spool = tempfile::tempdir().unwrap();
    let mut storage = PostgresStorage::open(&config(&db, spool.path())).unwrap();
    let metrics = storage.metrics();
    let samples = stream(0..25_000);
    for chunk in samples.chunks(1_000) {
        storage.write_readings(chunk).unwrap();
    }
    storage.flush().unwrap();
    assert_eq!(stored(&db), expected(&samples));
    // A replayed stream: the second half again, plus new readings.
    let more = stream(25_000..30_000);
    storage.write_readings(&samples[12_500..]).unwrap();
    storage.write_readings(&more).unwrap();
    storage.close().unwrap();
    let all: Vec<Sample> = samples.iter().chain(&more).cloned().collect();
    assert_eq!(stored(&db), expected(&all));
    assert_eq!(metrics.rows_written.load(Relaxed), 30_000);
    assert_eq!(metrics.rows_already_stored.load(Relaxed), 12_500);
    assert_eq!(metrics.rows_spooled.load(Relaxed), 0);
}

#[test]
fn connections_killed_mid_stream_lose_and_duplicate_nothing() {
    let db = TestDb::create();
    let spool = tempfile::tempdir().unwrap();
    let mut storage = PostgresStorage::open(&config(&db, spool.path())).unwrap();
    let metrics = storage.metrics();
    let samples = stream(0..200_000);
    let stop = Arc::new(AtomicBool::new(false));
    let killer = std::thread::scope(|scope| {
        let killer = scope.spawn(|| {
            let mut killed = 0;
            while !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(40));
                killed += db.terminate_sessions();
            }
            killed
        });
        for chunk in samples.chunks(5_000) {
            storage.write_readings(chunk).unwrap();
            storage.flush().unwrap();
        }
        stop.store(true, Relaxed);
        killer.join().unwrap()
    });
    // What could not be written between kills waits in the spool; close drains it.
    storage.close().unwrap();
    assert_eq!(metrics.spool_records.load(Relaxed), 0, "{metrics:?}");
    assert!(killer > 0, "the test killed no session");
    assert!(
        metrics.failed_calls.load(Relaxed) > 0,
        "no write was cut off"
    );
    assert_eq!(db.count("SELECT count(*) FROM device_vitals"), 200_000);
    assert_eq!(stored(&db), expected(&samples));
}

#[test]
fn a_postgres_stop_and_start_mid_stream_loses_and_duplicates_nothing() {
    let db = TestDb::create();
    let spool = tempfile::tempdir().unwrap();
    let cfg = PostgresConfig {
        retries: 1,
        breaker_failures: 2,
        ..config(&db, spool.path())
    };
    let mut storage = PostgresStorage::open(&cfg).unwrap();
    let metrics = storage.metrics();
    let samples = stream(0..60_000);
    let mut chunks = samples.chunks(2_000);
    for chunk in chunks.by_ref().take(10) {
        storage.write_readings(chunk).unwrap();
        storage.flush().unwrap();
    }
    let outage = Outage::begin();
    for chunk in chunks.by_ref().take(10) {
        storage.write_readings(chunk).unwrap();
        // Returns: the readings are in the spool, durable, so they may be acknowledged.
        storage.flush().unwrap();
    }
    assert!(metrics.rows_spooled.load(Relaxed) >= 18_000, "{metrics:?}");
    assert!(spool_files(spool.path()) > 0);
    outage.end();
    for chunk in chunks {
        storage.write_readings(chunk).unwrap();
        storage.flush().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while metrics.spool_records.load(Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        storage.flush().unwrap();
    }
    storage.close().unwrap();
    assert_eq!(metrics.spool_records.load(Relaxed), 0, "{metrics:?}");
    assert_eq!(spool_files(spool.path()), 0);
    assert_eq!(stored(&db), expected(&samples));
}

fn vitalstream(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_vitalstream"))
        .args(args)
        .output()
        .expect("running vitalstream");
    assert!(
        out.status.success(),
        "vitalstream {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn storage_config(dir: &Path, url: &str, spool: &Path) -> String {
    let path = dir.join("storage.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\ntype = \"postgres\"\nurl = \"{url}\"\nspool_dir = \"{}\"\n\
             connect_timeout = \"1s\"\nretries = 0\nbreaker_failures = 1\n\
             breaker_cooldown = \"200ms\"\n",
            spool.display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn replay_report(recording: &str, config: &str) -> serde_json::Value {
    let out = vitalstream(&[
        "replay",
        "--input",
        recording,
        "--pipeline",
        "builtin:reference",
        "--config",
        config,
        "--store",
    ]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_replay_stores_what_it_accepted_and_replaying_it_again_adds_nothing() {
    let db = TestDb::create();
    let dir = tempfile::tempdir().unwrap();
    let config = storage_config(dir.path(), &db.url, &dir.path().join("spool"));
    let report = replay_report("tests/fixtures/small.ndjson", &config);
    let stored = report["accepted"].as_i64().unwrap() - report["duplicates"].as_i64().unwrap();
    assert!(stored > 5_000, "{report}");
    assert_eq!(db.count("SELECT count(*) FROM device_vitals"), stored);
    let rules = report["rules"].as_object().unwrap();
    let sum = |field: &str| {
        rules
            .values()
            .map(|r| r[field].as_i64().unwrap())
            .sum::<i64>()
    };
    let (raised, resolved) = (sum("alerts_raised"), sum("alerts_resolved"));
    assert_eq!(db.count("SELECT count(*) FROM alerts"), raised);
    assert_eq!(
        db.count("SELECT count(*) FROM alert_events"),
        raised + resolved
    );
    assert_eq!(
        db.count("SELECT count(*) FROM alerts WHERE state = 'resolved'"),
        resolved
    );

    replay_report("tests/fixtures/small.ndjson", &config);
    assert_eq!(db.count("SELECT count(*) FROM device_vitals"), stored);
    assert_eq!(
        db.count("SELECT count(*) FROM alert_events"),
        raised + resolved
    );
}

#[test]
fn the_spool_outlives_the_process_and_drains_at_the_next_start() {
    let db = TestDb::create();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // First run: nothing listens on port 1, so every reading goes to the spool.
    let down = storage_config(
        dir.path(),
        "postgres://postgres@127.0.0.1:1/nowhere",
        &spool,
    );
    let report = replay_report("tests/fixtures/small.ndjson", &down);
    let stored = report["accepted"].as_i64().unwrap() - report["duplicates"].as_i64().unwrap();
    assert!(spool_files(&spool) > 0, "the first run left no spool");
    // Second run, another process, with the database reachable and nothing to replay.
    let up = storage_config(dir.path(), &db.url, &spool);
    let empty = dir.path().join("empty.ndjson");
    std::fs::write(&empty, "").unwrap();
    replay_report(empty.to_str().unwrap(), &up);
    assert_eq!(spool_files(&spool), 0, "the spool was not drained");
    assert_eq!(db.count("SELECT count(*) FROM device_vitals"), stored);
    assert!(db.count("SELECT count(*) FROM alert_events") > 0);
}

#[test]
fn a_full_spool_holds_input_until_the_database_is_back_and_loses_nothing() {
    let db = TestDb::create();
    let spool = tempfile::tempdir().unwrap();
    let cfg = PostgresConfig {
        spool_max_bytes: 1_000_000,
        retries: 0,
        breaker_failures: 1,
        ..config(&db, spool.path())
    };
    let mut storage = PostgresStorage::open(&cfg).unwrap();
    let metrics = storage.metrics();
    let samples = stream(0..40_000);
    let outage = Outage::begin();
    let returned = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // ~8 MB of readings against a 1 MB spool: this call must wait, not drop.
            for chunk in samples.chunks(2_000) {
                storage.write_readings(chunk).unwrap();
            }
            storage.flush().unwrap();
            returned.store(true, Relaxed);
        });
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !returned.load(Relaxed),
            "input was taken while the spool was full"
        );
        assert!(metrics.spool_bytes.load(Relaxed) <= 1_000_000);
        assert!(metrics.rows_spooled.load(Relaxed) > 0);
        outage.end();
    });
    assert!(returned.load(Relaxed));
    storage.close().unwrap();
    assert_eq!(metrics.spool_records.load(Relaxed), 0, "{metrics:?}");
    assert_eq!(stored(&db), expected(&samples));
}

#[test]
fn shutdown_with_a_full_spool_fails_so_nothing_unkept_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PostgresConfig {
        url: "postgres://postgres@127.0.0.1:1/nowhere".into(),
        spool_dir: dir.path().to_path_buf(),
        spool_max_bytes: 300_000,
        batch_rows: 1_000,
        connect_timeout: Duration::from_millis(200),
        retries: 0,
        breaker_failures: 1,
        breaker_cooldown: Duration::from_millis(100),
        shutdown_timeout: Duration::from_secs(1),
        ..PostgresConfig::default()
    };
    let mut storage = PostgresStorage::open(&cfg).unwrap();
    let metrics = storage.metrics();
    storage.write_readings(&stream(0..1_000)).unwrap();
    storage.flush().unwrap();
    assert_eq!(metrics.rows_spooled.load(Relaxed), 1_000);
    // Another 999 readings do not fit beside the first 1,000: close says so instead of
    // returning Ok, so the storage thread does not acknowledge them and their sources
    // send them again.
    storage.write_readings(&stream(1_000..1_999)).unwrap();
    let started = Instant::now();
    let err = storage.close().unwrap_err();
    assert!(err.to_string().contains("spool is full"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    // The new readings go in batches (one lane of devices each); some fit, not all.
    let spooled = metrics.rows_spooled.load(Relaxed);
    assert!((1_000..1_999).contains(&spooled), "{spooled}");
}

#[test]
fn a_row_the_database_refuses_is_set_aside_without_its_batch() {
    let db = TestDb::create();
    let spool = tempfile::tempdir().unwrap();
    let mut storage = PostgresStorage::open(&config(&db, spool.path())).unwrap();
    let metrics = storage.metrics();
    let mut samples = stream(0..1_000);
    // A NUL byte: PostgreSQL refuses it in text (the parser never lets one through; the
    // writer must not rely on that).
    samples[500].device_id = Id::from("bad\0id");
    storage.write_readings(&samples).unwrap();
    storage.close().unwrap();
    assert_eq!(metrics.rows_refused.load(Relaxed), 1);
    assert_eq!(db.count("SELECT count(*) FROM device_vitals"), 999);
    let kept: Vec<_> = std::fs::read_dir(spool.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("refused-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
}

/// An alert escalated twice, then acknowledged: one event row per level, and the current
/// row remembers how far it escalated.
#[test]
fn an_escalated_alert_is_stored_with_each_level() {
    let db = TestDb::create();
    let spool = tempfile::tempdir().unwrap();
    let mut storage = PostgresStorage::open(&config(&db, spool.path())).unwrap();
    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let mut source = h.replay_source();
    let t0 = now_millis() - 60_000;
    common::send_lines(&mut source, &[reading("d1", t0, "hr", 150.0)], 1);
    let raised = h.alerts.recv_timeout(common::WAIT).unwrap();
    let id = raised.alert.alert_id.clone();
    h.engine.book.escalate(&id, 1).unwrap();
    h.engine.book.escalate(&id, 2).unwrap();
    h.engine.book.acknowledge(&id, "dr").unwrap();
    let events: Vec<_> = (0..3)
        .map(|_| h.alerts.recv_timeout(common::WAIT).unwrap())
        .collect();
    // The last transition first, as a late spool could deliver them: the state holds.
    storage.write_alerts(&events[2..]).unwrap();
    storage.write_alerts(&[raised]).unwrap();
    storage.write_alerts(&events[..2]).unwrap();
    storage.close().unwrap();
    drop(source);
    h.finish();

    assert_eq!(
        db.count("SELECT count(*) FROM alert_events WHERE event = 'escalated'"),
        2
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM alerts WHERE alert_id = '{id}' AND state = 'acknowledged' \
             AND escalation = 2 AND escalated_at IS NOT NULL"
        )),
        1
    );
}

#[test]
fn vitals_come_back_in_buckets_and_alerts_by_patient_state_and_time() {
    let db = TestDb::create();
    let spool = tempfile::tempdir().unwrap();
    let mut storage = PostgresStorage::open(&config(&db, spool.path())).unwrap();
    // Through the engine: p1's heart rate goes high then normal (raised, resolved); p2's
    // stays high (firing).
    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let mut source = h.replay_source();
    let t0 = (now_millis() / 60_000 - 10) * 60_000; // a minute boundary, 10 minutes ago
    let line = |dev: &str, pat: &str, ts: i64, hr: f64| {
        reading(dev, ts, "hr", hr).replace('{', &format!(r#"{{"patient_id":"{pat}","#))
    };
    let lines = vec![
        line("d1", "p1", t0, 80.0),
        line("d1", "p1", t0 + 20_000, 130.0),
        line("d2", "p2", t0 + 30_000, 140.0),
        line("d1", "p1", t0 + 61_000, 90.0),
        line("d1", "p1", t0 + 62_000, 100.0),
    ];
    common::send_lines(&mut source, &lines, 1);
    drop(source);
    h.engine.join(EndOfInput::KeepOpen);
    for batch in h.readings.try_iter() {
        storage.write_readings(&batch.readings).unwrap();
    }
    let events: Vec<_> = h.alerts.try_iter().collect();
    storage.write_alerts(&events).unwrap();
    storage.close().unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt
        .block_on(Db::connect(&config(&db, spool.path())))
        .unwrap();
    let buckets = rt
        .block_on(store.vitals("p1", t0 - 60_000, t0 + 120_000, Duration::from_secs(60)))
        .unwrap();
    let summary: Vec<_> = buckets
        .iter()
        .map(|b| {
            (
                b.start - t0,
                b.readings,
                b.hr.avg,
                b.hr.min,
                b.hr.max,
                b.spo2.avg,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (0, 2, Some(105.0), Some(80.0), Some(130.0), None),
            (60_000, 2, Some(95.0), Some(90.0), Some(100.0), None)
        ]
    );
    let alerts = |q: AlertQuery| {
        rt.block_on(store.alerts(&q))
            .unwrap()
            .into_iter()
            .map(|a| (a.patient_id.unwrap_or_default(), a.state))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        alerts(AlertQuery::default()).len(),
        2,
        "one alert per patient"
    );
    let p1 = AlertQuery {
        patient_id: Some("p1".into()),
        ..AlertQuery::default()
    };
    assert_eq!(alerts(p1), [("p1".to_string(), "resolved".to_string())]);
    let firing = AlertQuery {
        state: Some("firing".into()),
        priority: Some("high".into()),
        ..AlertQuery::default()
    };
    assert_eq!(alerts(firing), [("p2".to_string(), "firing".to_string())]);
    let later = AlertQuery {
        since: Some(now_millis() + 60_000),
        ..AlertQuery::default()
    };
    assert!(alerts(later).is_empty());

    // The same buckets through REST, for a token that covers p1 only.
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    use vitalstream::api::auth::Role;
    use vitalstream::api::{ApiConfig, ApiState, router};
    let other = Harness::start(&common::config(), rules(HR_RULE));
    let api_config = ApiConfig::default();
    let state = ApiState::new(
        &api_config,
        other.engine.control(),
        Some(config(&db, spool.path())),
    );
    let app = router(&api_config, state.clone());
    let token = common::server::token(&state, "nurse", Role::Clinician, Some(&["p1"]));
    let get = |uri: String| {
        let req = Request::get(uri)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        rt.block_on(async {
            let r = app.clone().oneshot(req).await.unwrap();
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
        })
    };
    let range = format!("from={}&to={}&bucket=1m", t0 - 60_000, t0 + 120_000);
    let body = get(format!("/api/v1/patients/p1/vitals?{range}"));
    assert_eq!(body["status"], 200, "{body}");
    let rest: Vec<(i64, i64, f64)> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["start"].as_i64().unwrap() - t0,
                b["readings"].as_i64().unwrap(),
                b["hr"]["avg"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rest, [(0, 2, 105.0), (60_000, 2, 95.0)]);
    let refused = get(format!("/api/v1/patients/p2/vitals?{range}"));
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    drop(app);
    other.finish();
}

/// The whole path, as deployed: a device publishes over MQTT (QoS 1), `vitalstream run`
/// stores into PostgreSQL. PostgreSQL goes down mid-stream, and while it is down the
/// service is killed (SIGKILL) and started again. Every reading must end up stored exactly
/// once: what was acknowledged to the broker was in the spool, what was not is redelivered.
#[test]
fn mqtt_to_postgres_loses_nothing_through_an_outage_and_a_crash() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{Client, MqttOptions};

    let broker = common::broker::Broker::start("");
    let db = TestDb::create();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"pipeline = "builtin:reference"
status_interval = "1s"
[[sources]]
type = "mqtt"
port = {port}
client_id = "vs-e2e-ingest"
session_expiry = "1h"
batch_linger = "10ms"
reconnect_min = "50ms"
reconnect_max = "500ms"
[storage]
type = "postgres"
url = "{url}"
spool_dir = "{spool}"
connect_timeout = "1s"
retries = 0
breaker_failures = 1
breaker_cooldown = "200ms"
[alert_log]
path = "{alerts}"
[dead_letter]
path = "{dead}"
[api]
listen = "127.0.0.1:0"
dev_token = true
"#,
            port = broker.port,
            url = db.url,
            spool = dir.path().join("spool").display(),
            alerts = dir.path().join("alerts.ndjson").display(),
            dead = dir.path().join("dead.ndjson").display(),
        ),
    )
    .unwrap();
    let log = |n: u32| dir.path().join(format!("run-{n}.log"));
    let start = |n: u32| {
        Command::new(env!("CARGO_BIN_EXE_vitalstream"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log(n)).unwrap())
            .spawn()
            .unwrap()
    };
    let mut service = start(1);

    let mut options = MqttOptions::new("vs-e2e-bed-1", "127.0.0.1", broker.port);
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(3600));
    let (client, mut connection) = Client::new(options, 1000);
    let running = Arc::new(AtomicBool::new(true));
    let poller = {
        let running = running.clone();
        std::thread::spawn(move || {
            while running.load(Relaxed) {
                if let Ok(Err(_)) = connection.recv_timeout(Duration::from_millis(100)) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    let stored = |device: &str| {
        db.try_count(&format!(
            "SELECT count(*) FROM device_vitals WHERE device_id = '{device}'"
        ))
        .unwrap_or(0)
    };
    // The service's subscription exists once a probe reading reaches the database.
    let probe_deadline = Instant::now() + Duration::from_secs(30);
    while stored("vs-e2e-probe") == 0 {
        assert!(
            Instant::now() < probe_deadline,
            "the service never stored a probe reading"
        );
        client
            .publish(
                "devices/vs-e2e-probe/vitals",
                QoS::AtLeastOnce,
                false,
                r#"{"hr":70}"#,
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }

    let total = 600u64;
    let t0 = now_millis() - 3_600_000;
    let publisher = {
        let client = client.clone();
        std::thread::spawn(move || {
            for seq in 0..total {
                let payload = format!(r#"{{"ts":{},"seq":{seq},"hr":80}}"#, t0 + seq as i64 * 1000);
                client
                    .publish(
                        "devices/vs-e2e-bed-1/vitals",
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let outage = Outage::begin();
    std::thread::sleep(Duration::from_millis(1500));
    service.kill().unwrap();
    service.wait().unwrap();
    let mut service = start(2);
    std::thread::sleep(Duration::from_millis(1500));
    outage.end();
    publisher.join().unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    while stored("vs-e2e-bed-1") < total as i64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &service.id().to_string()])
        .status();
    service.wait().unwrap();
    running.store(false, Relaxed);
    poller.join().unwrap();
    assert_eq!(
        stored("vs-e2e-bed-1"),
        total as i64,
        "logs in {}",
        dir.path().display()
    );
    assert_eq!(
        db.count("SELECT count(DISTINCT seq) FROM device_vitals WHERE device_id = 'vs-e2e-bed-1'"),
        total as i64
    );
    // The scenario happened as intended: the first run spooled, the second drained.
    let text = |n| std::fs::read_to_string(log(n)).unwrap();
    assert!(text(1).contains("circuit open"), "{}", text(1));
    assert!(text(2).contains("spool drained"), "{}", text(2));
}

/// Rules changed through the API are kept in `rules` and come back at the next start.
#[test]
fn rules_changed_through_the_api_survive_a_restart() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    use vitalstream::api::auth::Role;
    use vitalstream::api::{ApiConfig, ApiState, router};

    let db = TestDb::create();
    migrate_url(&db.url, TimescaleMode::Auto).unwrap();
    let spool = tempfile::tempdir().unwrap();
    let h = Harness::start(&common::config(), rules(HR_RULE));
    let api_config = ApiConfig::default();
    let storage = config(&db, spool.path());
    let state = ApiState::new(&api_config, h.engine.control(), Some(storage));
    let app = router(&api_config, state.clone());
    let token = common::server::token(&state, "ana", Role::Analyst, None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let call = |method: &str, uri: &str, body: Option<serde_json::Value>| {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        rt.block_on(app.clone().oneshot(req))
            .unwrap()
            .status()
            .as_u16()
    };
    let rule = serde_json::json!({"id": "hr_low", "kind": "threshold", "priority": "high",
        "message": "HR low", "condition": "hr < 40"});
    assert_eq!(call("POST", "/api/v1/rules", Some(rule)), 201);
    let sql = "SELECT device_id, patient_id, min(spo2) AS value FROM vitals GROUP BY 1, 2 HAVING min(spo2) < 85";
    let sql_rule = serde_json::json!({"id": "spo2_sql", "kind": "sql", "priority": "high",
        "message": "SpO2 under 85", "window": "30s", "slide": "10s", "sql": sql});
    assert_eq!(call("POST", "/api/v1/rules", Some(sql_rule)), 201);
    assert_eq!(call("DELETE", "/api/v1/rules/hr_high", None), 200);
    assert_eq!(
        db.rows("SELECT rule_id, enabled::text, updated_by FROM rules ORDER BY 1"),
        [
            ["hr_high", "false", "ana"],
            ["hr_low", "true", "ana"],
            ["spo2_sql", "true", "ana"]
        ]
    );
    drop(app);
    h.finish();
    // The SQL rule failed in that run (the engine records its definition and why): the next
    // start loads it disabled, with the reason.
    db.execute(
        "INSERT INTO rule_failures (rule_id, definition, reason) \
         SELECT rule_id, definition, 'boom' FROM rules WHERE rule_id = 'spo2_sql'",
    );

    // A new process on the same database: the pipeline file says hr_high only; the database
    // says hr_high was deleted and hr_low added.
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, HR_RULE).unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "pipeline = \"{}\"\n[log]\nformat = \"json\"\n[[sources]]\ntype = \"simulator\"\ndevices = 1\n\
             [storage]\ntype = \"postgres\"\nurl = \"{}\"\nspool_dir = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\ndev_token = true\n\
             [alert_log]\npath = \"{}\"\n",
            pipeline.display(),
            db.url,
            spool.path().display(),
            dir.path().join("alerts.ndjson").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vitalstream"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let started = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["fields"]["url"].is_string())
        {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "the service did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let url = started["fields"]["url"].as_str().unwrap();
    let dev = started["fields"]["dev_token"].as_str().unwrap();
    let mut answer = ureq::get(format!("{url}/rules"))
        .header("Authorization", format!("Bearer {dev}"))
        .call()
        .unwrap();
    let body: serde_json::Value =
        serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["hr_low", "spo2_sql"], "{body}");
    let kept = &body["data"][1];
    assert_eq!(
        (
            kept["sql"].as_str(),
            kept["window"].as_str(),
            kept["slide"].as_str()
        ),
        (Some(sql), Some("30s"), Some("10s")),
        "{body}"
    );
    assert!(
        kept["disabled"]
            .to_string()
            .contains("failed before a restart: boom"),
        "{body}"
    );
}
