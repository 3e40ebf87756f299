//! The alert log: one JSON line per alert transition ([`AlertEvent`]), to stdout or a file.

use crate::alerts::AlertEvent;
use serde::{Deserialize, Serialize};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

/// Where alert transitions are logged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertLogConfig {
    /// File the NDJSON lines are appended to (created when missing); standard output when
    /// not set.
    pub path: Option<PathBuf>,
}

/// Writes alert transitions as NDJSON, buffered; call [`AlertLog::flush`] to push them out.
pub struct AlertLog {
    out: BufWriter<Box<dyn Write + Send>>,
}

impl AlertLog {
    /// Opens the file for appending (or takes standard output).
    pub fn open(config: &AlertLogConfig) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match &config.path {
            None => Box::new(io::stdout()),
            Some(path) => Box::new(super::open_append(path, "alert log")?),
        };
        Ok(AlertLog {
            out: BufWriter::new(out),
        })
    }

    /// Appends one event as a JSON line.
    pub fn write(&mut self, event: &AlertEvent) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, event)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{AlertBook, Cause, Signal, Trigger};
    use crate::model::{CorrelationId, now_micros};
    use crate::rules::parse_pipeline;
    use crate::rules::threshold::Edge;
    use serde_json::Value;

    /// Raises and resolves one alert through the book, returning both transitions.
    fn two_events() -> Vec<AlertEvent> {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let book = AlertBook::new(tx, Default::default());
        let rule = parse_pipeline(
            "[[rule]]\nid='spo2_low'\nkind='threshold'\npriority='medium'\nmessage='SpO2 low'\ncondition='spo2 < 90'\n",
        )
        .unwrap()
        .rules[0]
            .clone();
        for edge in [Edge::Raise, Edge::Clear] {
            book.signal(Signal {
                cause: Cause::of(&rule),
                patient_id: Some("pat-1".into()),
                edge,
                trigger: Trigger {
                    device_id: "dev-1".into(),
                    value: 86.0,
                    window: None,
                    correlation_id: CorrelationId::Given("c-42".into()),
                    event_ts: 1_700_000_000_000,
                },
                received_us: now_micros(),
                quiet: false,
            });
        }
        rx.try_iter().collect()
    }

    #[test]
    fn writes_one_json_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.ndjson");
        let mut log = AlertLog::open(&AlertLogConfig {
            path: Some(path.clone()),
        })
        .unwrap();
        let events = two_events();
        assert_eq!(events.len(), 2);
        for event in &events {
            log.write(event).unwrap();
        }
        log.flush().unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "raised");
        assert_eq!(lines[1]["event"], "resolved");
        for (line, event) in lines.iter().zip(&events) {
            assert_eq!(line["alert_id"], event.alert.alert_id.as_str());
            assert_eq!(line["rule_id"], "spo2_low");
            assert_eq!(line["patient_id"], "pat-1");
            assert_eq!(line["correlation_id"], "c-42");
            assert_eq!(line["value"], 86.0);
            assert_eq!(line["at"], event.at);
        }
    }

    #[test]
    fn appends_to_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = AlertLogConfig {
            path: Some(dir.path().join("alerts.ndjson")),
        };
        let events = two_events();
        for event in &events {
            let mut log = AlertLog::open(&config).unwrap();
            log.write(event).unwrap();
            log.flush().unwrap();
        }
        let text = std::fs::read_to_string(config.path.unwrap()).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
