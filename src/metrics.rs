//! Counters per stage and reject reason, and the ingest → alert latency histogram.
//! Hot paths count locally and add their totals here once per batch.

use crate::model::RejectReason;
use dashmap::DashMap;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Per-rule counters, kept by rule id across rule-set swaps.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Evaluations whose condition held: readings (threshold) or (device, window) pairs.
    pub matches: AtomicU64,
    pub alerts_raised: AtomicU64,
    pub alerts_resolved: AtomicU64,
}

#[derive(Debug)]
pub struct Metrics {
    /// Frames received from every source.
    pub frames: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    rejected_by_reason: [AtomicU64; RejectReason::COUNT],
    /// Accepted readings behind their source's watermark: stored, not evaluated.
    pub late: AtomicU64,
    /// Readings seen before (same device and seq or ts): not evaluated twice.
    pub duplicates: AtomicU64,
    /// Readings handed to the storage sink.
    pub stored: AtomicU64,
    /// Device states evicted after their TTL.
    pub evicted: AtomicU64,
    /// Readings stored but not evaluated: their shard held `engine.max_devices` devices.
    pub unevaluated: AtomicU64,
    /// Alert lifecycle events emitted.
    pub alert_events: AtomicU64,
    rules: DashMap<Arc<str>, Arc<RuleCounters>>,
    /// Microseconds from a reading's receipt to the alert it raised.
    latency_us: Mutex<Histogram<u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            frames: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            rejected_by_reason: std::array::from_fn(|_| AtomicU64::new(0)),
            late: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            unevaluated: AtomicU64::new(0),
            alert_events: AtomicU64::new(0),
            rules: DashMap::new(),
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
        }
    }
}

/// A point-in-time copy of the metrics, for reports and status lines.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Snapshot {
    pub frames: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub late: u64,
    pub duplicates: u64,
    pub stored: u64,
    pub evicted: u64,
    pub alert_events: u64,
    pub rules: BTreeMap<String, RuleSnapshot>,
    pub alert_latency_us: LatencySnapshot,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct RuleSnapshot {
    pub matches: u64,
    pub alerts_raised: u64,
    pub alerts_resolved: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct LatencySnapshot {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Metrics {
    pub fn reject(&self, reason: RejectReason, n: u64) {
        self.rejected.fetch_add(n, Relaxed);
        self.rejected_by_reason[reason.index()].fetch_add(n, Relaxed);
    }

    /// The counters of a rule, created on first use.
    pub fn rule(&self, id: &Arc<str>) -> Arc<RuleCounters> {
        self.rules.entry(id.clone()).or_default().clone()
    }

    pub fn record_alert_latency(&self, micros: i64) {
        if let Ok(mut h) = self.latency_us.lock() {
            h.saturating_record(micros.max(1) as u64);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let rejected_by_reason = RejectReason::all()
            .into_iter()
            .filter_map(|r| {
                let n = self.rejected_by_reason[r.index()].load(Relaxed);
                (n > 0).then(|| (r.to_string(), n))
            })
            .collect();
        let rules = self
            .rules
            .iter()
            .map(|e| {
                let c = e.value();
                (
                    e.key().to_string(),
                    RuleSnapshot {
                        matches: c.matches.load(Relaxed),
                        alerts_raised: c.alerts_raised.load(Relaxed),
                        alerts_resolved: c.alerts_resolved.load(Relaxed),
                    },
                )
            })
            .collect();
        let alert_latency_us = self
            .latency_us
            .lock()
            .map(|h| LatencySnapshot {
                count: h.len(),
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
            })
            .unwrap_or_default();
        Snapshot {
            frames: self.frames.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            rejected_by_reason,
            late: self.late.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            stored: self.stored.load(Relaxed),
            evicted: self.evicted.load(Relaxed),
            alert_events: self.alert_events.load(Relaxed),
            rules,
            alert_latency_us,
        }
    }
}
