//! Recorded device traffic, to replay. A recording is NDJSON, one reading per line:
//!
//! ```json
//! {"at":1.25,"device":"bed-7","reading":{"hr":88,"spo2":97,"temp":36.8,"rr":16}}
//! ```
//!
//! `at` is seconds from the start of the recording. `vitalstream-load record` makes one by
//! listening to a broker's device topics (a ward, a test bench); a scenario whose
//! `traffic.recording` names one replays it: each recorded device becomes one of the run's
//! devices, and each reading is sent when it fell due in the recording (sped up by
//! `traffic.speed`), stamped with the run's patient, time, `seq` and correlation id, so loss
//! and latency are measured as for generated traffic. The alerts it expects are the
//! recording's own: each stretch of a device's readings with hr above 130 (the rule the
//! harness installs) expects one.

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// The hr above which the harness's rule (`lt_hr_high`) fires.
pub const ALERT_HR: f64 = 130.0;

/// What each replayed reading is given by the run, so never taken from a recording.
const IDENTITY: [&str; 5] = ["device_id", "patient_id", "ts", "seq", "correlation_id"];

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    at: f64,
    device: String,
    reading: Map<String, Value>,
}

#[derive(Debug)]
pub struct Recording {
    /// The recorded devices' names, in order of first appearance: device `d` of the run.
    pub devices: Vec<String>,
    /// In time order.
    pub readings: Vec<Recorded>,
}

#[derive(Debug)]
pub struct Recorded {
    pub at: f64,
    pub device: usize,
    /// The vitals, without the identity fields.
    pub vitals: Map<String, Value>,
    /// The device's n-th stretch of hr above [`ALERT_HR`] this reading is part of.
    pub episode: Option<usize>,
}

impl Recording {
    pub fn load(path: &Path) -> anyhow::Result<Recording> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the recording {}", path.display()))?;
        Recording::parse(&text).with_context(|| path.display().to_string())
    }

    /// A recording's text.
    pub fn parse(text: &str) -> anyhow::Result<Recording> {
        let mut lines = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let line: Line =
                serde_json::from_str(line).with_context(|| format!("line {}", n + 1))?;
            anyhow::ensure!(
                line.at.is_finite() && line.at >= 0.0,
                "line {}: at must be seconds from the start",
                n + 1
            );
            lines.push(line);
        }
        anyhow::ensure!(!lines.is_empty(), "no readings");
        Ok(Recording::from_lines(lines))
    }

    fn from_lines(mut lines: Vec<Line>) -> Recording {
        lines.sort_by(|a, b| a.at.total_cmp(&b.at));
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut devices = Vec::new();
        // Per device: episodes begun so far, and whether the last reading was in one.
        let mut state: Vec<(usize, bool)> = Vec::new();
        let readings = (lines.into_iter())
            .map(|mut line| {
                let device = *index.entry(line.device.clone()).or_insert_with(|| {
                    devices.push(line.device.clone());
                    state.push((0, false));
                    devices.len() - 1
                });
                for field in IDENTITY {
                    line.reading.remove(field);
                }
                let high = (line.reading.get("hr"))
                    .and_then(Value::as_f64)
                    .is_some_and(|hr| hr > ALERT_HR);
                let (begun, in_episode) = &mut state[device];
                if high && !*in_episode {
                    *begun += 1;
                }
                *in_episode = high;
                Recorded {
                    at: line.at,
                    device,
                    vitals: line.reading,
                    episode: high.then(|| *begun - 1),
                }
            })
            .collect();
        Recording { devices, readings }
    }

    /// Seconds from the first reading to the last.
    pub fn length(&self) -> f64 {
        self.readings.last().map_or(0.0, |r| r.at)
    }
}

/// Listens to `topic` on the MQTT `broker` (host:port) for `duration` and writes what
/// arrives to `out` as a recording; returns (readings written, messages skipped). The
/// device is the topic level after `devices/` (`devices/<id>/vitals`), else the topic.
pub async fn record(
    broker: &str,
    topic: &str,
    duration: Duration,
    out: &Path,
) -> anyhow::Result<(u64, u64)> {
    let (host, port) = (broker.rsplit_once(':'))
        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
        .context("--broker is host:port")?;
    let id = format!("vitalstream-record-{:08x}", fastrand::u32(..));
    let mut options = MqttOptions::new(id, host, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 100);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    let end = tokio::time::Instant::now() + duration;
    let mut first: Option<Instant> = None;
    let (mut written, mut skipped) = (0, 0);
    loop {
        let event = tokio::select! {
            event = events.poll() => event.context("the MQTT connection")?,
            _ = tokio::time::sleep_until(end) => break,
        };
        let Event::Incoming(Packet::Publish(p)) = event else {
            continue;
        };
        let at = first
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_secs_f64();
        let Ok(Value::Object(reading)) = serde_json::from_slice::<Value>(&p.payload) else {
            skipped += 1;
            continue;
        };
        let device = match p.topic.strip_prefix("devices/") {
            Some(rest) => rest.split('/').next().unwrap_or(rest).to_string(),
            None => p.topic.clone(),
        };
        let line = Line {
            at: (at * 1e6).round() / 1e6,
            device,
            reading,
        };
        serde_json::to_writer(&mut file, &line)?;
        file.write_all(b"\n")?;
        written += 1;
    }
    file.flush()?;
    let _ = client.disconnect().await;
    Ok((written, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at: f64, device: &str, hr: f64) -> Line {
        let reading = serde_json::json!({"hr": hr, "spo2": 97, "seq": 4, "ts": 1});
        Line {
            at,
            device: device.into(),
            reading: reading.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn devices_are_numbered_in_order_and_each_high_stretch_is_one_episode() {
        let r = Recording::from_lines(vec![
            line(0.5, "b", 80.0),
            line(0.0, "a", 140.0),
            line(1.0, "a", 150.0),
            line(2.0, "a", 90.0),
            line(3.0, "a", 135.0),
            line(1.5, "b", 130.0),
        ]);
        assert_eq!(r.devices, ["a", "b"]);
        let seen: Vec<(f64, usize, Option<usize>)> = (r.readings.iter())
            .map(|x| (x.at, x.device, x.episode))
            .collect();
        assert_eq!(
            seen,
            [
                (0.0, 0, Some(0)),
                (0.5, 1, None),
                (1.0, 0, Some(0)),
                (1.5, 1, None), // 130 is not above the threshold
                (2.0, 0, None),
                (3.0, 0, Some(1)),
            ]
        );
        assert!(
            r.readings.iter().all(|x| !x.vitals.contains_key("seq")),
            "the run stamps its own identity"
        );
        assert_eq!(r.length(), 3.0);
    }

    #[test]
    fn a_bad_line_is_named() {
        let text = "{\"at\":0,\"device\":\"a\",\"reading\":{}}\n\n{\"at\":1}\n";
        let err = format!("{:#}", Recording::parse(text).unwrap_err());
        assert!(err.contains("line 3"), "{err}");
        let err = Recording::parse("{\"at\":-1,\"device\":\"a\",\"reading\":{}}").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
