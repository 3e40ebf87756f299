//! Test helpers shared by the integration tests: an engine with in-memory outputs, and a
//! way to feed it readings.

#![allow(dead_code)]

pub mod broker;
pub mod kafka;
pub mod mqtt_client;
pub mod pg;
pub mod reference;
pub mod server;

use crossbeam_channel::{Receiver, bounded, unbounded};
use std::time::Duration;
use vitalstream::alerts::{AlertEvent, Transition};
use vitalstream::api::AlertBus;
use vitalstream::engine::{EndOfInput, Engine, EngineConfig, Outputs, ReadingBatch, RejectBatch};
use vitalstream::model::{ClockMode, now_micros};
use vitalstream::rules::{RuleSet, parse_pipeline};
use vitalstream::sources::SourceHandle;

/// One threshold rule: heart rate above 120, no delay.
pub const HR_RULE: &str = r#"
[[rule]]
id = "hr_high"
kind = "threshold"
priority = "high"
message = "HR high"
condition = "hr > 120"
"#;

/// SpO2 averaging under 90 over a 10 s tumbling window.
pub const SPO2_WINDOW: &str = r#"
[[rule]]
id = "spo2_low"
kind = "window"
priority = "high"
message = "SpO2 low"
condition = "avg(spo2) < 90"
window = "10s"
"#;

pub fn rules(toml: &str) -> RuleSet {
    parse_pipeline(toml).expect("valid test pipeline")
}

/// A small engine config for tests: 2 shards, 2 parse workers.
pub fn config() -> EngineConfig {
    EngineConfig {
        shards: 2,
        parse_workers: 2,
        ..EngineConfig::default()
    }
}

/// An engine whose outputs are plain channels the test reads.
pub struct Harness {
    pub engine: Engine,
    pub alerts: Receiver<AlertEvent>,
    pub readings: Receiver<ReadingBatch>,
    pub rejects: Receiver<RejectBatch>,
}

impl Harness {
    pub fn start(config: &EngineConfig, rules: RuleSet) -> Harness {
        Self::with_storage(config, rules, None, None)
    }

    /// Like `start`, but storage accepts only `capacity` batches until someone reads them.
    pub fn with_slow_storage(config: &EngineConfig, rules: RuleSet, capacity: usize) -> Harness {
        Self::with_storage(config, rules, Some(capacity), None)
    }

    /// Like `start`, with the engine pushing every alert transition onto `live` as the
    /// service does for socket.io.
    pub fn with_live(config: &EngineConfig, rules: RuleSet, live: AlertBus) -> Harness {
        Self::with_storage(config, rules, None, Some(live))
    }

    fn with_storage(
        config: &EngineConfig,
        rules: RuleSet,
        capacity: Option<usize>,
        live: Option<AlertBus>,
    ) -> Harness {
        let (alerts_tx, alerts) = unbounded();
        let (readings_tx, readings) = capacity.map_or_else(unbounded, bounded);
        let (rejects_tx, rejects) = unbounded();
        let outputs = Outputs {
            alerts: alerts_tx,
            live,
            readings: Some(readings_tx),
            rejects: Some(rejects_tx),
            latest: None,
        };
        Harness {
            engine: Engine::start(config, rules, outputs),
            alerts,
            readings,
            rejects,
        }
    }

    pub fn replay_source(&mut self) -> SourceHandle {
        self.engine.source(ClockMode::Replay { speed: 0.0 })
    }

    /// Stops the engine and returns every alert transition it emitted.
    pub fn finish(self) -> (vitalstream::metrics::Snapshot, Vec<AlertEvent>, usize) {
        let metrics = self.engine.metrics.clone();
        self.engine.join(EndOfInput::CloseWindows);
        let alerts: Vec<AlertEvent> = self.alerts.try_iter().collect();
        let stored = self.readings.try_iter().map(|b| b.readings.len()).sum();
        (metrics.snapshot(), alerts, stored)
    }
}

/// Sends lines as one batch each `per_batch` lines.
pub fn send_lines(handle: &mut SourceHandle, lines: &[String], per_batch: usize) {
    for chunk in lines.chunks(per_batch.max(1)) {
        let mut batch = handle.batch();
        for line in chunk {
            batch.push(line.as_bytes(), now_micros(), None);
        }
        assert!(handle.send(batch), "engine accepts input");
    }
}

pub fn reading(device: &str, ts: i64, field: &str, value: f64) -> String {
    format!(r#"{{"device_id":"{device}","ts":{ts},"{field}":{value}}}"#)
}

pub fn count(events: &[AlertEvent], rule: &str, t: Transition) -> usize {
    events
        .iter()
        .filter(|e| &*e.alert.rule_id == rule && e.event == t)
        .count()
}

pub const WAIT: Duration = Duration::from_secs(10);

/// Log lines (`RUST_LOG`) go to the test's output, shown when it fails.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_thread_names(true)
        .with_test_writer()
        .try_init();
}

/// Rows in the complete Parquet files under `dir` whose names start with `prefix`; fails on
/// a half-written one.
pub fn parquet_rows(dir: &std::path::Path, prefix: &str) -> usize {
    let mut rows = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            !name.ends_with(".tmp"),
            "a half-written file was left: {name}"
        );
        if name.starts_with(prefix) && name.ends_with(".parquet") {
            let file = std::fs::File::open(&path).unwrap();
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .unwrap_or_else(|e| panic!("{name} is not a complete Parquet file: {e}"))
                    .build()
                    .unwrap();
            rows += reader.map(|b| b.unwrap().num_rows()).sum::<usize>();
        }
    }
    rows
}
