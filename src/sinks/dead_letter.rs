//! The dead-letter output: every rejected frame as one JSON line, with the reason and the
//! original bytes, so it can be inspected and replayed.
//!
//! A line is `{"reason", "source", "received_us", "payload"}` (plus `kafka_topic`,
//! `kafka_partition`, `kafka_offset` for a Kafka record), where `payload` is the frame
//! as a string when it is valid UTF-8; otherwise `payload_hex` holds its bytes in lowercase
//! hex instead. Either way the original bytes come back exactly.

use crate::model::{Rejected, SourceId};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

/// Where rejected frames are written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// File the NDJSON lines are appended to (created when missing); when not set, rejected
    /// frames are only counted, then discarded.
    pub path: Option<PathBuf>,
}

/// Writes rejected frames as NDJSON, buffered; call [`DeadLetter::flush`] to push them out.
pub struct DeadLetter {
    out: Option<BufWriter<File>>,
    /// Reused for the hex form of non-UTF-8 payloads.
    hex: String,
}

/// One dead-letter line.
#[derive(Serialize)]
struct Record<'a> {
    reason: String,
    source: SourceId,
    received_us: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    kafka_topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kafka_partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kafka_offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_hex: Option<&'a str>,
}

impl DeadLetter {
    /// Opens the file for appending; with no path, writes are discarded.
    pub fn open(config: &DeadLetterConfig) -> io::Result<Self> {
        let out = match &config.path {
            None => None,
            Some(path) => Some(BufWriter::new(super::open_append(
                path,
                "dead-letter file",
            )?)),
        };
        Ok(DeadLetter {
            out,
            hex: String::new(),
        })
    }

    /// Appends one rejected frame as a JSON line.
    pub fn write(&mut self, r: &Rejected) -> io::Result<()> {
        let Some(out) = &mut self.out else {
            return Ok(());
        };
        let text = std::str::from_utf8(&r.payload).ok();
        if text.is_none() {
            to_hex(&r.payload, &mut self.hex);
        }
        let record = Record {
            reason: r.reason.to_string(),
            source: r.source,
            received_us: r.received_us,
            kafka_topic: r.origin.as_ref().map(|o| &*o.topic),
            kafka_partition: r.origin.as_ref().map(|o| o.partition),
            kafka_offset: r.origin.as_ref().map(|o| o.offset),
            payload: text,
            payload_hex: text.is_none().then_some(self.hex.as_str()),
        };
        serde_json::to_writer(&mut *out, &record)?;
        out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

/// Lowercase hex of `bytes`, into `out` (cleared first).
fn to_hex(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.clear();
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RejectReason, Vital};
    use serde_json::Value;

    fn from_hex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Writes the frames and reads the lines back.
    fn round_trip(rejected: &[Rejected]) -> Vec<Value> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.ndjson");
        let mut dead = DeadLetter::open(&DeadLetterConfig {
            path: Some(path.clone()),
        })
        .unwrap();
        for r in rejected {
            dead.write(r).unwrap();
        }
        dead.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn rejected(reason: RejectReason, payload: &[u8]) -> Rejected {
        Rejected {
            source: 3,
            reason,
            received_us: 1_700_000_000_123_456,
            payload: payload.to_vec(),
            origin: None,
        }
    }

    #[test]
    fn utf8_payloads_are_kept_as_text() {
        let payload = "{\"device_id\":\"d1\",\"hr\":999,\"note\":\"\u{e9}\\n\"}\n\t".as_bytes();
        let lines = round_trip(&[
            rejected(RejectReason::OutOfRange(Vital::Hr), payload),
            rejected(RejectReason::InvalidJson, b""),
        ]);
        assert_eq!(lines.len(), 2);
        let line = &lines[0];
        assert_eq!(line["reason"], "out_of_range:hr");
        assert_eq!(line["source"], 3);
        assert_eq!(line["received_us"], 1_700_000_000_123_456_i64);
        assert_eq!(line["payload"].as_str().unwrap().as_bytes(), payload);
        assert!(line.get("payload_hex").is_none());
        assert_eq!(lines[1]["payload"], "");
    }

    #[test]
    fn other_payloads_are_kept_as_hex() {
        let payload = [0x7b, 0xff, 0x00, 0xc3, 0x28, 0x0a, 0xab];
        let lines = round_trip(&[rejected(RejectReason::InvalidJson, &payload)]);
        let line = &lines[0];
        assert_eq!(line["reason"], "invalid_json");
        assert!(line.get("payload").is_none());
        assert_eq!(line["payload_hex"], "7bff00c3280aab");
        assert_eq!(from_hex(line["payload_hex"].as_str().unwrap()), payload);
    }

    #[test]
    fn without_a_path_frames_are_discarded() {
        let mut dead = DeadLetter::open(&DeadLetterConfig::default()).unwrap();
        dead.write(&rejected(RejectReason::NoVitals, b"{}"))
            .unwrap();
        dead.flush().unwrap();
    }
}
