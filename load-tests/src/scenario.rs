//! A scenario (`load-tests/scenarios/*.toml`): how many devices send how fast, for how long,
//! through which transport, with which anomaly episodes (each expects one alert per device),
//! bad input and reconnect storms, and the vitalstream it runs against.

use crate::recording::Recording;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub traffic: Traffic,
    /// Rate changes over the run: a burst, or the steps of a ramp. None: one steady phase.
    #[serde(default, rename = "phase")]
    pub phases: Vec<Phase>,
    /// Anomalies with a known expected alert.
    #[serde(default, rename = "episode")]
    pub episodes: Vec<Episode>,
    #[serde(default)]
    pub service: Service,
    /// `traffic.recording`, loaded.
    #[serde(skip)]
    pub recorded: Option<Arc<Recording>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// MQTT (to `broker`) or Kafka (`vitals.raw` on `kafka_brokers`, or on a mock cluster
    /// the harness starts when none are named).
    #[serde(default)]
    pub transport: Transport,
    #[serde(default)]
    pub kafka_brokers: Option<String>,
    /// Simulated bedside devices, one patient each.
    #[serde(default)]
    pub devices: usize,
    /// Readings per second per device.
    #[serde(default)]
    pub rate_hz: f64,
    /// Replay this recording (see [`crate::recording`]; a path relative to the scenario
    /// file) instead of generating readings: its devices and timing replace `devices`,
    /// `rate_hz`, phases and episodes.
    #[serde(default)]
    pub recording: Option<PathBuf>,
    /// How much faster than recorded a recording is replayed.
    #[serde(default = "default_speed")]
    pub speed: f64,
    /// How long traffic is sent (the phases, when given, say instead; for a recording, by
    /// default its length).
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    #[serde(default)]
    pub mode: Mode,
    /// Connections in the multiplexed mode.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Share of messages that are malformed on purpose (they must be rejected, not stored).
    #[serde(default)]
    pub bad_fraction: f64,
    /// At these times every connection drops and reconnects (a reconnect storm).
    #[serde(default)]
    pub reconnect_at: Vec<humantime_serde::Serde<Duration>>,
    /// The MQTT broker, host:port; `start` (the default): one the run starts for itself,
    /// set up as vitalstream's broker should be (see [`crate::broker`]).
    #[serde(default = "default_broker")]
    pub broker: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_speed() -> f64 {
    1.0
}

fn default_connections() -> usize {
    8
}

fn default_broker() -> String {
    "start".into()
}

fn default_seed() -> u64 {
    2026
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Mqtt,
    Kafka,
}

/// How devices reach the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One MQTT connection per device, as on a ward.
    #[default]
    Connections,
    /// A few connections carry every device's topics: for rates one connection per device
    /// cannot reach from one machine.
    Multiplexed,
}

/// A stretch of the run at a multiple of the base rate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub rate_multiplier: f64,
}

/// From `at`, for `duration`, a share of the devices report `vital` = `value`; each such
/// device's patient must get one `alert:critical` (rule `lt_hr_high` for hr > 130).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Episode {
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Share of the devices (0–1).
    pub devices: f64,
    #[serde(default = "default_value")]
    pub hr: f64,
}

fn default_value() -> f64 {
    150.0
}

/// The vitalstream the harness starts (a fresh database, MQTT in, REST and socket.io out).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Service {
    /// The PostgreSQL server; the run gets a database of its own there.
    pub postgres: String,
    /// Where the API listens.
    pub listen: String,
    /// Engine shards (0: one per core).
    pub shards: usize,
    /// The MQTT source's longest wait for a batch to fill: alert latency pays it at low rates.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// How long after the last message the harness waits for readings to be stored and
    /// alerts to arrive.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
}

impl Default for Service {
    fn default() -> Self {
        Service {
            postgres: "postgres://postgres@127.0.0.1:5432".into(),
            listen: "127.0.0.1:7311".into(),
            shards: 0,
            batch_linger: Duration::from_millis(2),
            settle: Duration::from_secs(30),
        }
    }
}

impl Scenario {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)?;
        let mut scenario: Scenario = toml::from_str(&text)?;
        let problems = scenario.problems();
        anyhow::ensure!(
            problems.is_empty(),
            "{}: {}",
            path.display(),
            problems.join("; ")
        );
        if let Some(recording) = &scenario.traffic.recording {
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            scenario.recorded = Some(Arc::new(Recording::load(&dir.join(recording))?));
        }
        Ok(scenario)
    }

    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let t = &self.traffic;
        if t.connections == 0 {
            out.push("traffic.connections must be positive".into());
        }
        if t.recording.is_some() {
            if !self.phases.is_empty() || !self.episodes.is_empty() || t.speed <= 0.0 {
                out.push(
                    "a recording brings its own timing and episodes: no [[phase]] or \
                     [[episode]], and a positive speed"
                        .into(),
                );
            }
        } else {
            if t.devices == 0 || t.rate_hz <= 0.0 {
                out.push("traffic: devices and rate_hz must be positive".into());
            }
            if t.duration.is_none() == self.phases.is_empty() {
                out.push("give traffic.duration or [[phase]]s, not both".into());
            }
        }
        if t.transport == Transport::Kafka
            && (!t.reconnect_at.is_empty() || t.mode == Mode::Connections)
        {
            out.push("kafka: mode = \"multiplexed\" (producers), and no reconnect_at".into());
        }
        if !(0.0..=1.0).contains(&t.bad_fraction) {
            out.push("traffic.bad_fraction is a share (0–1)".into());
        }
        for (i, e) in self.episodes.iter().enumerate() {
            if !(0.0..=1.0).contains(&e.devices) || e.hr <= 130.0 {
                out.push(format!(
                    "episode[{i}]: devices is a share and hr must exceed 130"
                ));
            }
        }
        out
    }

    /// The phases, the single steady one included (a recording's, at its own pace).
    pub fn phases(&self) -> Vec<Phase> {
        let replay = (self.recorded.as_ref())
            .map(|r| Duration::from_secs_f64(r.length() / self.traffic.speed + 1.0));
        match self.traffic.duration.or(replay) {
            Some(duration) => vec![Phase {
                duration,
                rate_multiplier: 1.0,
            }],
            None => self.phases.clone(),
        }
    }

    pub fn duration(&self) -> Duration {
        self.phases().iter().map(|p| p.duration).sum()
    }

    /// The rate multiplier at `t` into the run.
    pub fn multiplier_at(&self, t: Duration) -> f64 {
        let mut end = Duration::ZERO;
        for p in self.phases() {
            end += p.duration;
            if t < end {
                return p.rate_multiplier;
            }
        }
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_file_is_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(scenario.duration() > Duration::ZERO, "{}", path.display());
            names.push(scenario.name);
        }
        names.sort();
        let expected = [
            "bad-input",
            "burst",
            "half-rate",
            "kafka",
            "quarter-rate",
            "ramp",
            "reconnect-storm",
            "replay",
            "smoke",
            "steady-ward",
        ];
        assert_eq!(names, expected);
    }

    #[test]
    fn phases_set_the_rate_over_time() {
        let s: Scenario = toml::from_str(
            r#"
name = "t"
[traffic]
devices = 10
rate_hz = 1.0
[[phase]]
duration = "10s"
rate_multiplier = 1.0
[[phase]]
duration = "5s"
rate_multiplier = 4.0
"#,
        )
        .unwrap();
        assert!(s.problems().is_empty());
        assert_eq!(s.duration(), Duration::from_secs(15));
        let at = |secs: f64| s.multiplier_at(Duration::from_secs_f64(secs));
        assert_eq!(
            [at(0.0), at(9.99), at(10.0), at(14.9), at(15.0)],
            [1.0, 1.0, 4.0, 4.0, 0.0]
        );
    }

    #[test]
    fn a_scenario_names_its_problems() {
        let s: Scenario = toml::from_str(
            r#"
name = "t"
[traffic]
transport = "kafka"
devices = 0
rate_hz = 1.0
bad_fraction = 2.0
[[episode]]
at = "1s"
duration = "1s"
devices = 0.5
hr = 100.0
"#,
        )
        .unwrap();
        assert_eq!(s.problems().len(), 5, "{:?}", s.problems());
    }
}
