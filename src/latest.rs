//! The latest vitals of each patient, for screens: each vital's most recent value (readings
//! may carry only some vitals), the device and the time. Shards gather them locally and
//! publish at most once a second, so keeping them costs the hot path a local map insert, and
//! readers (REST, `vitals:update`, the page) never touch shard state.

use crate::model::{Id, Millis, Sample, Vital, Vitals};
use dashmap::DashMap;
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One patient's latest vitals, as published.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatientVitals {
    pub patient_id: Id,
    /// The device of the newest reading.
    pub device_id: Id,
    /// Event time of the newest reading, ms.
    pub ts: Millis,
    pub hr: Option<f64>,
    pub spo2: Option<f64>,
    pub temp: Option<f64>,
    pub sys_bp: Option<f64>,
    pub dia_bp: Option<f64>,
    pub rr: Option<f64>,
    /// The publication that last changed it (see [`Latest::version`]).
    #[serde(skip)]
    pub version: u64,
    /// Event time of each vital's value: an older reading published later (by another
    /// shard: the patient's other device) does not overwrite a newer value.
    #[serde(skip)]
    vital_ts: [Millis; 6],
    /// Wall time of the last publication that changed it, ms.
    #[serde(skip)]
    updated_ms: Millis,
}

/// How many patients are kept, and for how long after their last reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatestLimits {
    /// Patients kept at most; a new patient past this is counted, not kept.
    pub max_patients: usize,
    /// A patient with no reading for this long (wall time) is dropped.
    pub ttl: Millis,
}

impl Default for LatestLimits {
    fn default() -> Self {
        LatestLimits {
            max_patients: 20_000,
            ttl: 24 * 3_600_000,
        }
    }
}

/// How often publication also drops patients past their time to live.
const SWEEP_EVERY_MS: Millis = 60_000;

/// Every patient's latest vitals, readable from any thread. Bounded: at most
/// `max_patients`, each dropped `ttl` after its last reading.
#[derive(Default)]
pub struct Latest {
    map: DashMap<Id, PatientVitals>,
    version: AtomicU64,
    limits: std::sync::OnceLock<LatestLimits>,
    last_sweep: std::sync::atomic::AtomicI64,
    /// New patients not kept because the map was full.
    untracked: AtomicU64,
}

impl Latest {
    /// Sets the bounds (once; the defaults otherwise).
    pub fn set_limits(&self, limits: LatestLimits) {
        let _ = self.limits.set(limits);
    }

    /// New patients not kept because the map was full.
    pub fn untracked(&self) -> u64 {
        self.untracked.load(Relaxed)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drops patients with no reading for `ttl`, at most once a minute.
    fn sweep(&self, now_ms: Millis) {
        let last = self.last_sweep.load(Relaxed);
        if now_ms - last < SWEEP_EVERY_MS
            || self
                .last_sweep
                .compare_exchange(last, now_ms, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let cutoff = now_ms - self.limits.get().copied().unwrap_or_default().ttl;
        self.map.retain(|_, v| v.updated_ms >= cutoff);
    }
    pub fn get(&self, patient: &str) -> Option<PatientVitals> {
        self.map.get(patient).map(|e| e.value().clone())
    }

    /// Every patient, sorted by id.
    pub fn all(&self) -> Vec<PatientVitals> {
        let mut all: Vec<PatientVitals> = self.map.iter().map(|e| e.value().clone()).collect();
        all.sort_by(|a, b| a.patient_id.cmp(&b.patient_id));
        all
    }

    /// The current publication number; entries changed after `since` have a higher one.
    pub fn version(&self) -> u64 {
        self.version.load(Relaxed)
    }

    /// Patients whose vitals changed after publication `since`.
    pub fn changed_since(&self, since: u64) -> Vec<PatientVitals> {
        self.map
            .iter()
            .filter(|e| e.value().version > since)
            .map(|e| e.value().clone())
            .collect()
    }

    fn publish(&self, pending: &mut FxHashMap<Id, Pending>, now_ms: Millis) {
        self.sweep(now_ms);
        if pending.is_empty() {
            return;
        }
        let version = self.version.fetch_add(1, Relaxed) + 1;
        let max = self.limits.get().copied().unwrap_or_default().max_patients;
        for (patient, p) in pending.drain() {
            if self.map.len() >= max && !self.map.contains_key(&patient) {
                if self.untracked.fetch_add(1, Relaxed) == 0 {
                    tracing::error!(
                        max_patients = max,
                        "latest vitals full: new patients are not shown until others expire"
                    );
                }
                continue;
            }
            let mut entry = self
                .map
                .entry(patient.clone())
                .or_insert_with(|| PatientVitals {
                    patient_id: patient,
                    device_id: p.device_id.clone(),
                    ts: p.ts,
                    hr: None,
                    spo2: None,
                    temp: None,
                    sys_bp: None,
                    dia_bp: None,
                    rr: None,
                    version,
                    vital_ts: [Millis::MIN; 6],
                    updated_ms: now_ms,
                });
            let e = entry.value_mut();
            e.updated_ms = now_ms;
            if p.ts >= e.ts {
                e.ts = p.ts;
                e.device_id = p.device_id;
            }
            let slots = [
                &mut e.hr,
                &mut e.spo2,
                &mut e.temp,
                &mut e.sys_bp,
                &mut e.dia_bp,
                &mut e.rr,
            ];
            for (i, slot) in slots.into_iter().enumerate() {
                let v = p.vitals.0[i];
                if !v.is_nan() && p.vital_ts[i] >= e.vital_ts[i] {
                    *slot = Some(v);
                    e.vital_ts[i] = p.vital_ts[i];
                }
            }
            e.version = version;
        }
    }
}

/// What a shard gathers between publications.
struct Pending {
    device_id: Id,
    ts: Millis,
    vitals: Vitals,
    vital_ts: [Millis; 6],
}

/// A shard's side: gathers readings, publishes at most once a second.
pub(crate) struct Gatherer {
    shared: std::sync::Arc<Latest>,
    pending: FxHashMap<Id, Pending>,
    last_publish: Millis,
}

impl Gatherer {
    pub(crate) fn new(shared: std::sync::Arc<Latest>) -> Gatherer {
        Gatherer {
            shared,
            pending: FxHashMap::default(),
            last_publish: 0,
        }
    }

    pub(crate) fn add(&mut self, patient: &Id, sample: &Sample) {
        let p = self
            .pending
            .entry(patient.clone())
            .or_insert_with(|| Pending {
                device_id: sample.device_id.clone(),
                ts: sample.ts,
                vitals: Vitals::default(),
                vital_ts: [Millis::MIN; 6],
            });
        if sample.ts >= p.ts {
            p.ts = sample.ts;
            p.device_id.clone_from(&sample.device_id);
        }
        for v in Vital::ALL {
            if let Some(x) = sample.vitals.get(v)
                && sample.ts >= p.vital_ts[v.index()]
            {
                p.vitals.set(v, x);
                p.vital_ts[v.index()] = sample.ts;
            }
        }
    }

    /// Publishes when a second has passed since the last time.
    pub(crate) fn maybe_publish(&mut self, now_ms: Millis) {
        if now_ms - self.last_publish >= 1000 {
            self.shared.publish(&mut self.pending, now_ms);
            self.last_publish = now_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CorrelationId;
    use std::sync::Arc;

    fn sample(device: &str, ts: Millis, vitals: &[(Vital, f64)]) -> Sample {
        let mut v = Vitals::default();
        for (vital, x) in vitals {
            v.set(*vital, *x);
        }
        Sample {
            device_id: device.into(),
            patient_id: None,
            ts,
            device_ts: true,
            received_us: 0,
            vitals: v,
            seq: None,
            correlation_id: CorrelationId::Generated(0),
            late: false,
            warmup: false,
        }
    }

    #[test]
    fn each_vital_keeps_its_latest_value_and_publication_is_at_most_once_a_second() {
        let shared = Arc::new(Latest::default());
        let mut g = Gatherer::new(shared.clone());
        let p: Id = "p1".into();
        g.add(
            &p,
            &sample("monitor", 1_000, &[(Vital::Hr, 80.0), (Vital::Spo2, 97.0)]),
        );
        g.maybe_publish(5_000);
        let v1 = shared.version();
        g.add(&p, &sample("oximeter", 2_000, &[(Vital::Spo2, 91.0)]));
        g.maybe_publish(5_500);
        assert_eq!(
            shared.get("p1").unwrap().spo2,
            Some(97.0),
            "not yet: under a second"
        );
        g.maybe_publish(6_000);
        let got = shared.get("p1").unwrap();
        assert_eq!(
            (got.hr, got.spo2, got.ts, got.device_id.as_str()),
            (Some(80.0), Some(91.0), 2_000, "oximeter")
        );
        assert_eq!(shared.changed_since(v1).len(), 1);
        assert!(shared.changed_since(shared.version()).is_empty());
        // Another shard publishes an older spo2 after the newer one: it does not win.
        let mut other = Gatherer::new(shared.clone());
        other.add(
            &p,
            &sample("monitor", 1_500, &[(Vital::Spo2, 99.0), (Vital::Rr, 14.0)]),
        );
        other.maybe_publish(7_000);
        let got = shared.get("p1").unwrap();
        assert_eq!(
            (got.spo2, got.rr, got.ts, got.device_id.as_str()),
            (Some(91.0), Some(14.0), 2_000, "oximeter")
        );
    }

    #[test]
    fn patients_are_bounded_and_expire() {
        let shared = Arc::new(Latest::default());
        shared.set_limits(LatestLimits {
            max_patients: 2,
            ttl: 120_000,
        });
        let mut g = Gatherer::new(shared.clone());
        for p in ["p1", "p2", "p3"] {
            g.add(&p.into(), &sample("d", 1_000, &[(Vital::Hr, 80.0)]));
        }
        g.maybe_publish(100_000);
        assert_eq!((shared.len(), shared.untracked()), (2, 1));
        // Two minutes without a reading: gone, at the next sweep (at most a minute later).
        g.add(&"p9".into(), &sample("d", 1_000, &[(Vital::Hr, 80.0)]));
        g.maybe_publish(230_000);
        let left: Vec<String> = shared
            .all()
            .into_iter()
            .map(|p| p.patient_id.to_string())
            .collect();
        assert_eq!(left, vec!["p9".to_string()]);
    }
}
