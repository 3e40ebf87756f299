//! The device simulator: synthetic bedside monitors streaming vitals in real time.
//!
//! Each device (`sim-00000`, `sim-00001`, …) has a seeded baseline and reports every
//! `1 / rate_hz` seconds, the devices staggered over that period. Now and then a device
//! goes through an anomaly episode — tachycardia, desaturation, fever or hypotension —
//! lasting 30 to 120 s, so the default rules raise and resolve alerts. Everything but the
//! timestamps follows from the seed: the same seed gives the same devices and episodes.

use crate::model::{Vital, now_micros};
use crate::sources::SourceHandle;
use fastrand::Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Settings of the simulated devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Number of simulated devices.
    pub devices: u32,
    /// Readings per second of each device.
    pub rate_hz: f64,
    /// Seed of the baselines and anomaly episodes.
    pub seed: u64,
    /// Probability, per device and per minute without an episode, that an anomaly episode
    /// starts (0 to 1).
    pub anomaly_rate: f64,
    /// Whether devices carry a patient (`sim-00042` → `pat-00042`).
    pub patients: bool,
    /// Stop after this long ("10m"); run until stopped when not set.
    #[serde(with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// How long readings are gathered before a batch is handed to the engine ("50ms").
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            devices: 200,
            rate_hz: 1.0,
            seed: 42,
            anomaly_rate: 0.5,
            patients: true,
            duration: None,
            batch_linger: Duration::from_millis(50),
        }
    }
}

impl SimulatorConfig {
    /// Every problem with the settings; empty when they are usable.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.devices == 0 {
            problems.push("simulator.devices must be at least 1".to_string());
        }
        if !(self.rate_hz.is_finite() && self.rate_hz > 0.0) {
            problems.push(format!(
                "simulator.rate_hz must be above 0, not {}",
                self.rate_hz
            ));
        }
        if !(0.0..=1.0).contains(&self.anomaly_rate) {
            problems.push(format!(
                "simulator.anomaly_rate is a probability (0 to 1), not {}",
                self.anomaly_rate
            ));
        }
        problems
    }
}

/// What a run produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    pub readings: u64,
    /// Anomaly episodes started.
    pub episodes: u64,
}

/// A batch is handed over early when it holds this many frames.
const MAX_BATCH_FRAMES: usize = 4096;
/// Shortest sleep: bounds the wake-ups per second however many devices there are.
const MIN_SLEEP: Duration = Duration::from_millis(2);
/// Longest sleep, so `stop` is seen promptly even at low rates.
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// Runs the devices on the calling thread until `stop` is set, `duration` elapses or the
/// engine shuts down. Readings are timed in real time; when the engine pushes back for
/// longer than one reading period, the missed readings are skipped rather than sent in a
/// burst.
pub fn run(config: &SimulatorConfig, mut handle: SourceHandle, stop: &AtomicBool) -> RunStats {
    let mut stats = RunStats::default();
    let problems = config.validate();
    if !problems.is_empty() {
        tracing::error!(?problems, "simulator: not started");
        return stats;
    }
    let mut devices: Vec<Device> = (0..config.devices)
        .map(|i| Device::new(config.seed, i, config.patients))
        .collect();
    let start_chance = episode_chance(config.anomaly_rate, config.rate_hz);
    let period = Duration::from_secs_f64(1.0 / config.rate_hz);
    // Consecutive readings, device after device, are this far apart.
    let step = period / config.devices;
    let linger = config.batch_linger.max(MIN_SLEEP);
    tracing::info!(
        devices = config.devices,
        rate_hz = config.rate_hz,
        seed = config.seed,
        "simulator: started"
    );

    let start = Instant::now();
    let deadline = config.duration.map(|d| start + d);
    let mut next_due = start;
    let mut next_device = 0;
    let mut next_send = start + linger;
    let mut batch = handle.batch();
    let mut line = Vec::with_capacity(256);
    let mut engine_open = true;
    'run: while !stop.load(Relaxed) {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if now.saturating_duration_since(next_due) > period {
            next_due = now;
        }
        let received_us = now_micros();
        let ts = received_us / 1000;
        while next_due <= now {
            let device = &mut devices[next_device];
            let (vitals, started) = device.next_reading(start_chance, config.rate_hz);
            stats.episodes += u64::from(started);
            line.clear();
            device.write_json(&mut line, ts, &vitals);
            batch.push(&line, received_us, Some(device.id.as_str().into()));
            stats.readings += 1;
            next_device = (next_device + 1) % devices.len();
            next_due += step;
            if batch.len() >= MAX_BATCH_FRAMES {
                let full = std::mem::replace(&mut batch, handle.batch());
                if !handle.send(full) {
                    engine_open = false;
                    break 'run;
                }
            }
        }
        if now >= next_send {
            let full = std::mem::replace(&mut batch, handle.batch());
            if !handle.send(full) {
                engine_open = false;
                break;
            }
            next_send = now + linger;
        }
        let mut wake = next_due.min(next_send).min(now + MAX_SLEEP);
        if let Some(deadline) = deadline {
            wake = wake.min(deadline);
        }
        let sleep = wake.saturating_duration_since(Instant::now());
        if !sleep.is_zero() {
            std::thread::sleep(sleep.max(MIN_SLEEP));
        }
    }
    if engine_open {
        handle.send(batch);
    }
    stats
}

/// The chance per reading that an episode starts, from the chance per minute.
fn episode_chance(per_minute: f64, rate_hz: f64) -> f64 {
    let readings_per_minute = 60.0 * rate_hz;
    1.0 - (1.0 - per_minute).powf(1.0 / readings_per_minute)
}

/// Normal range of each vital's baseline, in [`Vital::ALL`] order.
const BASELINE: [(f64, f64); 6] = [
    (60.0, 90.0),   // hr
    (95.0, 99.0),   // spo2
    (36.4, 37.2),   // temp
    (110.0, 130.0), // sys_bp
    (70.0, 85.0),   // dia_bp
    (12.0, 18.0),   // rr
];

/// Reading-to-reading noise: each value is its target ± this much.
const NOISE: [f64; 6] = [2.0, 0.6, 0.05, 3.0, 2.0, 1.0];

/// An anomaly and the range each affected vital is held in.
struct Anomaly {
    name: &'static str,
    effects: &'static [(Vital, f64, f64)],
}

const ANOMALIES: [Anomaly; 4] = [
    Anomaly {
        name: "tachycardia",
        effects: &[(Vital::Hr, 130.0, 170.0)],
    },
    Anomaly {
        name: "desaturation",
        effects: &[(Vital::Spo2, 82.0, 88.0)],
    },
    Anomaly {
        name: "fever",
        effects: &[(Vital::Temp, 39.2, 40.2)],
    },
    Anomaly {
        name: "hypotension",
        effects: &[(Vital::SysBp, 75.0, 85.0), (Vital::DiaBp, 40.0, 50.0)],
    },
];

/// Episodes last 30 to 120 s.
const EPISODE_SECONDS: (f64, f64) = (30.0, 120.0);

/// One simulated device.
struct Device {
    id: String,
    patient_id: Option<String>,
    seq: u64,
    baseline: [f64; 6],
    rng: Rng,
    episode: Option<Episode>,
}

/// An anomaly in progress: the affected vitals stay near their targets, within range.
struct Episode {
    remaining_readings: u64,
    /// (target, low, high) of each affected vital.
    held: [Option<(f64, f64, f64)>; 6],
}

fn uniform(rng: &mut Rng, (lo, hi): (f64, f64)) -> f64 {
    lo + rng.f64() * (hi - lo)
}

/// SplitMix64: spreads (seed, device) over the seed space so neighbouring devices differ.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Device {
    fn new(seed: u64, index: u32, patients: bool) -> Self {
        let mut rng = Rng::with_seed(mix(seed ^ mix(u64::from(index))));
        let baseline = BASELINE.map(|range| uniform(&mut rng, range));
        Device {
            id: format!("sim-{index:05}"),
            patient_id: patients.then(|| format!("pat-{index:05}")),
            seq: 0,
            baseline,
            rng,
            episode: None,
        }
    }

    /// The next reading, in [`Vital::ALL`] order, and whether an episode started with it.
    fn next_reading(&mut self, start_chance: f64, rate_hz: f64) -> ([f64; 6], bool) {
        let started = self.episode.is_none() && self.rng.f64() < start_chance;
        if started {
            self.episode = Some(self.start_episode(rate_hz));
        }
        let mut vitals = self.baseline;
        if let Some(episode) = &self.episode {
            for (value, held) in vitals.iter_mut().zip(episode.held) {
                if let Some((target, _, _)) = held {
                    *value = target;
                }
            }
        }
        for (i, value) in vitals.iter_mut().enumerate() {
            *value += (self.rng.f64() * 2.0 - 1.0) * NOISE[i];
        }
        vitals[Vital::Spo2.index()] = vitals[Vital::Spo2.index()].min(100.0);
        if let Some(episode) = &mut self.episode {
            for (value, held) in vitals.iter_mut().zip(episode.held) {
                if let Some((_, lo, hi)) = held {
                    *value = value.clamp(lo, hi);
                }
            }
            episode.remaining_readings -= 1;
            if episode.remaining_readings == 0 {
                self.episode = None;
            }
        }
        self.seq += 1;
        (vitals, started)
    }

    fn start_episode(&mut self, rate_hz: f64) -> Episode {
        let anomaly = &ANOMALIES[self.rng.usize(..ANOMALIES.len())];
        let seconds = uniform(&mut self.rng, EPISODE_SECONDS);
        let mut held = [None; 6];
        for &(vital, lo, hi) in anomaly.effects {
            held[vital.index()] = Some((uniform(&mut self.rng, (lo, hi)), lo, hi));
        }
        tracing::debug!(device = %self.id, anomaly = anomaly.name, seconds = seconds.round(), "simulator: episode started");
        Episode {
            remaining_readings: ((seconds * rate_hz).round() as u64).max(1),
            held,
        }
    }

    /// Writes the reading as a JSON object, the way a bedside monitor would send it.
    fn write_json(&self, out: &mut Vec<u8>, ts: i64, v: &[f64; 6]) {
        // Writing to a Vec cannot fail.
        let _ = write!(out, r#"{{"device_id":"{}","#, self.id);
        if let Some(patient) = &self.patient_id {
            let _ = write!(out, r#""patient_id":"{patient}","#);
        }
        let _ = write!(
            out,
            r#""ts":{ts},"seq":{},"hr":{:.0},"spo2":{:.0},"temp":{:.1},"sys_bp":{:.0},"dia_bp":{:.0},"rr":{:.0}}}"#,
            self.seq, v[0], v[1], v[2], v[3], v[4], v[5]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClockMode, FrameBatch, Sample};
    use crate::parse::{ParseOptions, Parser};
    use std::collections::HashMap;

    fn test_handle(capacity: usize) -> (SourceHandle, crossbeam_channel::Receiver<FrameBatch>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let handle = SourceHandle {
            id: 7,
            mode: ClockMode::Live,
            next_seq: 0,
            tx,
            ids: Default::default(),
            names: None,
            presence: false,
        };
        (handle, rx)
    }

    fn parse_all(batches: &[FrameBatch]) -> Vec<Sample> {
        let mut parser = Parser::new(ParseOptions::default(), 0);
        let mut samples = Vec::new();
        for batch in batches {
            assert_eq!(batch.source, 7);
            for frame in &batch.frames {
                let payload = batch.payload(frame);
                match parser.parse(payload, None, frame.received_us) {
                    Ok(sample) => samples.push(sample),
                    Err(reason) => panic!("{reason}: {}", String::from_utf8_lossy(payload)),
                }
            }
        }
        samples
    }

    fn is_anomalous(s: &Sample) -> bool {
        let v = |vital| s.vitals.get(vital).unwrap();
        v(Vital::Hr) >= 130.0
            || v(Vital::Spo2) <= 88.0
            || v(Vital::Temp) >= 39.2
            || v(Vital::SysBp) <= 85.0
    }

    #[test]
    fn emits_parseable_readings_in_order_per_device() {
        let config = SimulatorConfig {
            devices: 20,
            rate_hz: 50.0,
            anomaly_rate: 1.0,
            duration: Some(Duration::from_millis(300)),
            ..SimulatorConfig::default()
        };
        let (handle, rx) = test_handle(1024);
        let stats = run(&config, handle, &AtomicBool::new(false));
        let batches: Vec<FrameBatch> = rx.try_iter().collect();
        assert!(batches.len() > 1, "readings are sent in several batches");
        assert!(batches.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        let samples = parse_all(&batches);
        assert_eq!(samples.len() as u64, stats.readings);
        assert!(stats.readings >= 20 * 5, "{stats:?}");
        assert!(stats.episodes >= 20, "{stats:?}");

        let mut last_seq: HashMap<String, u64> = HashMap::new();
        for s in &samples {
            let n = s.device_id.strip_prefix("sim-").unwrap();
            assert_eq!(s.patient_id.as_deref(), Some(format!("pat-{n}").as_str()));
            assert!(Vital::ALL.iter().all(|&v| s.vitals.get(v).is_some()));
            let seq = s.seq.unwrap();
            let last = last_seq.insert(s.device_id.to_string(), seq);
            assert_eq!(seq, last.unwrap_or(0) + 1, "{}", s.device_id);
            assert!(
                is_anomalous(s),
                "with anomaly_rate 1 every reading is in an episode: {s:?}"
            );
        }
        assert_eq!(last_seq.len(), 20);
    }

    #[test]
    fn the_same_seed_gives_the_same_devices() {
        let baselines = |seed| {
            (0..50)
                .map(|i| Device::new(seed, i, true).baseline)
                .collect::<Vec<_>>()
        };
        assert_eq!(baselines(42), baselines(42));
        assert_ne!(baselines(42), baselines(43));
        let devices = baselines(42);
        assert_ne!(devices[0], devices[1]);
        for baseline in &devices {
            for (value, (lo, hi)) in baseline.iter().zip(BASELINE) {
                assert!((lo..=hi).contains(value), "{value} outside {lo}..{hi}");
            }
        }

        let readings = |seed| {
            let mut device = Device::new(seed, 3, false);
            (0..500)
                .map(|_| device.next_reading(0.05, 1.0))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            readings(7),
            readings(7),
            "episodes follow from the seed too"
        );
    }

    #[test]
    fn episodes_hold_their_ranges_then_end() {
        let mut device = Device::new(1, 0, false);
        let mut episodes = 0;
        for _ in 0..20_000 {
            let (v, started) = device.next_reading(0.01, 1.0);
            episodes += u32::from(started);
            for (i, value) in v.iter().enumerate() {
                let (lo, hi) = Vital::ALL[i].range();
                assert!((lo..=hi).contains(value));
            }
            if let Some(episode) = &device.episode {
                assert!(episode.remaining_readings <= 120);
                for (value, held) in v.iter().zip(episode.held) {
                    if let Some((_, lo, hi)) = held {
                        assert!((lo..=hi).contains(value));
                    }
                }
            }
        }
        assert!(episodes > 50, "{episodes}");
        assert_eq!(episode_chance(0.0, 1.0), 0.0);
        assert_eq!(episode_chance(1.0, 1.0), 1.0);
        assert!((episode_chance(0.5, 1.0) - (1.0 - 0.5f64.powf(1.0 / 60.0))).abs() < 1e-12);
    }

    #[test]
    fn without_patients_the_json_has_no_patient_id() {
        let device = Device::new(42, 42, false);
        let mut out = Vec::new();
        device.write_json(
            &mut out,
            1_700_000_000_000,
            &[72.0, 97.6, 36.84, 120.2, 80.0, 14.0],
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"device_id":"sim-00042","ts":1700000000000,"seq":0,"hr":72,"spo2":98,"temp":36.8,"sys_bp":120,"dia_bp":80,"rr":14}"#
        );
    }

    #[test]
    fn stops_when_asked_or_when_the_engine_is_gone() {
        let (handle, _rx) = test_handle(16);
        let stats = run(&SimulatorConfig::default(), handle, &AtomicBool::new(true));
        assert_eq!(stats.readings, 0);

        let (handle, rx) = test_handle(16);
        drop(rx);
        let stats = run(&SimulatorConfig::default(), handle, &AtomicBool::new(false));
        assert!(stats.readings > 0 && stats.readings < 1000, "{stats:?}");
    }

    #[test]
    fn config_reads_human_durations_and_rejects_unknown_fields() {
        let c: SimulatorConfig =
            toml::from_str("devices = 5\nduration = '10m'\nbatch_linger = '20ms'").unwrap();
        assert_eq!(c.devices, 5);
        assert_eq!(c.duration, Some(Duration::from_secs(600)));
        assert_eq!(c.batch_linger, Duration::from_millis(20));
        assert_eq!(c.rate_hz, 1.0);
        assert!(c.validate().is_empty());
        assert!(toml::from_str::<SimulatorConfig>("device = 5").is_err());
        let bad = SimulatorConfig {
            devices: 0,
            rate_hz: 0.0,
            anomaly_rate: 2.0,
            ..SimulatorConfig::default()
        };
        assert_eq!(bad.validate().len(), 3);
    }
}
