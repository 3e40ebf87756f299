//! Sources turn the outside world into [`FrameBatch`]es. A source never parses; it reads,
//! stamps the receive time, and hands batches to the engine through a [`SourceHandle`].
//!
//! - [`replay`]: an NDJSON recording (file or stdin), as fast as possible or paced.
//! - [`simulator`]: synthetic bedside devices with seeded anomaly episodes.
//! - [`mqtt`]: devices publishing to `devices/{id}/vitals` on an MQTT broker.

pub mod kafka;
pub mod mqtt;
mod presence;
pub mod replay;
pub mod simulator;

use crate::alerts::AlertBook;
use crate::devices::DeviceRegistry;
use crate::engine::RejectBatch;
use crate::metrics::Metrics;
use crate::model::{ClockMode, FrameBatch, RejectReason, Rejected, SourceId};
use crossbeam_channel::Sender;
use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicU16, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

/// What a source that speaks for devices — their status and technical alerts, not only
/// readings — needs from the engine.
#[derive(Clone)]
pub struct DeviceContext {
    pub book: Arc<AlertBook>,
    pub registry: Arc<DeviceRegistry>,
    pub metrics: Arc<Metrics>,
    pub dead_letter: Option<Sender<RejectBatch>>,
    /// Which patient each device is assigned to: a device's technical alerts are its
    /// assigned patient's, whatever patient the message names (empty on an ingest node).
    pub assignments: Arc<crate::engine::Assignments>,
}

impl DeviceContext {
    /// Counts a message the source itself rejects and writes it to the dead-letter output.
    pub fn reject(&self, source: SourceId, reason: RejectReason, payload: &[u8], received_us: i64) {
        self.metrics.reject(reason, 1);
        tracing::warn!(%reason, source, "device message rejected");
        if let Some(out) = &self.dead_letter {
            let rejects = vec![Rejected {
                source,
                reason,
                received_us,
                payload: payload.to_vec(),
                origin: None,
            }];
            let _ = out.send(RejectBatch { rejects, ack: None });
        }
    }
}

/// The name of the configured source each engine source belongs to, by [`SourceId`], for
/// what carries only the id (a dead letter). One configured source may be many engine
/// sources: a Kafka source gives each partition its own ([`SourceHandle::another`]).
/// Bounded by the id space.
#[derive(Debug, Default)]
pub struct SourceNames(RwLock<HashMap<SourceId, Arc<str>>>);

impl SourceNames {
    /// The name of source `id`, if it was given one.
    pub fn get(&self, id: SourceId) -> Option<Arc<str>> {
        let names = self.0.read().unwrap_or_else(|e| e.into_inner());
        names.get(&id).cloned()
    }

    fn insert(&self, id: SourceId, name: Arc<str>) {
        let mut names = self.0.write().unwrap_or_else(|e| e.into_inner());
        names.insert(id, name);
    }
}

/// The engine's input, for one source: stamps each batch with the source and its order.
#[derive(Debug)]
pub struct SourceHandle {
    pub(crate) id: SourceId,
    pub(crate) mode: ClockMode,
    pub(crate) next_seq: u64,
    pub(crate) tx: Sender<FrameBatch>,
    /// The engine's source ids, for [`SourceHandle::another`].
    pub(crate) ids: Arc<AtomicU16>,
    /// Where this source's name, and that of every source made from it, is registered.
    pub(crate) names: Option<Arc<SourceNames>>,
    /// Accepted readings mark their device as heard (see [`FrameBatch::presence`]).
    pub(crate) presence: bool,
}

impl SourceHandle {
    /// A handle onto a plain channel instead of an engine (an ingest node forwards what its
    /// sources read).
    pub fn to_channel(tx: Sender<FrameBatch>, id: SourceId, mode: ClockMode) -> SourceHandle {
        SourceHandle {
            id,
            mode,
            next_seq: 0,
            tx,
            ids: Arc::new(AtomicU16::new(id + 1)),
            names: None,
            presence: false,
        }
    }

    pub fn id(&self) -> SourceId {
        self.id
    }

    /// Registers this source under `name` in `names`, and with it every source made from
    /// it by [`SourceHandle::another`].
    pub fn named(mut self, names: &Arc<SourceNames>, name: &str) -> SourceHandle {
        names.insert(self.id, name.into());
        self.names = Some(names.clone());
        self
    }

    /// A new source of the same kind and name, with its own clock and watermark: a Kafka
    /// partition is read at its own pace, so each gets one (the engine's watermark is the
    /// slowest).
    pub fn another(&self) -> SourceHandle {
        let id = self.ids.fetch_add(1, Relaxed);
        if let Some(names) = &self.names
            && let Some(name) = names.get(self.id)
        {
            names.insert(id, name);
        }
        SourceHandle {
            id,
            mode: self.mode,
            next_seq: 0,
            tx: self.tx.clone(),
            ids: self.ids.clone(),
            names: self.names.clone(),
            presence: self.presence,
        }
    }

    /// From now on this source speaks for devices that are present: the engine marks the
    /// device of each reading it accepts as heard in the device registry.
    pub fn track_presence(&mut self) {
        self.presence = true;
    }

    /// An empty batch for this source.
    pub fn batch(&self) -> FrameBatch {
        let mut batch = FrameBatch::new(self.id, self.mode);
        batch.presence = self.presence;
        batch
    }

    /// Hands a batch to the engine; blocks while the engine is full (backpressure).
    /// Returns false when the engine has shut down.
    pub fn send(&mut self, mut batch: FrameBatch) -> bool {
        if batch.is_empty() && batch.forget.is_empty() && !batch.last {
            return true;
        }
        batch.seq = self.next_seq;
        self.next_seq += 1;
        self.tx.send(batch).is_ok()
    }

    /// Announces this source to the engine before its first reading: from now on its clock
    /// holds the engine's watermark back (until it reads something, or idles), so readings
    /// it has not yet delivered are not overtaken. Returns false when the engine has shut down.
    pub fn open(&mut self) -> bool {
        let mut batch = self.batch();
        batch.seq = self.next_seq;
        self.next_seq += 1;
        self.tx.send(batch).is_ok()
    }

    /// Hands a batch to the engine if it has room soon; a source that can hold its input
    /// back upstream (pause a Kafka partition) uses this instead of blocking.
    /// Waits up to `wait` for room.
    pub fn try_send(&mut self, mut batch: FrameBatch, wait: std::time::Duration) -> Offer {
        use crossbeam_channel::SendTimeoutError;
        batch.seq = self.next_seq;
        match self.tx.send_timeout(batch, wait) {
            Ok(()) => {
                self.next_seq += 1;
                Offer::Taken
            }
            Err(SendTimeoutError::Timeout(batch)) => Offer::Full(batch),
            Err(SendTimeoutError::Disconnected(_)) => Offer::Closed,
        }
    }
}

/// What became of a batch offered with [`SourceHandle::try_send`].
#[derive(Debug)]
pub enum Offer {
    Taken,
    /// The engine is full; here is the batch back.
    Full(FrameBatch),
    /// The engine has shut down.
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_made_from_a_named_one_has_its_name() {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let names = Arc::new(SourceNames::default());
        let mqtt = SourceHandle::to_channel(tx.clone(), 0, ClockMode::Live).named(&names, "mqtt");
        let kafka = SourceHandle {
            ids: mqtt.ids.clone(),
            ..SourceHandle::to_channel(tx.clone(), 1, ClockMode::Live)
        }
        .named(&names, "kafka");
        mqtt.ids.store(2, Relaxed);
        let partitions: Vec<SourceHandle> = (0..3).map(|_| kafka.another()).collect();
        assert_eq!(names.get(mqtt.id()).as_deref(), Some("mqtt"));
        assert_eq!(names.get(kafka.id()).as_deref(), Some("kafka"));
        for p in &partitions {
            assert!(p.id() >= 2);
            assert_eq!(names.get(p.id()).as_deref(), Some("kafka"));
            assert_eq!(names.get(p.another().id()).as_deref(), Some("kafka"));
        }
        let unnamed = SourceHandle::to_channel(tx, 9, ClockMode::Live);
        assert_eq!(names.get(unnamed.another().id()), None);
    }
}
