//! Sources turn the outside world into [`FrameBatch`]es. A source never parses; it reads,
//! stamps the receive time, and hands batches to the engine through a [`SourceHandle`].
//!
//! - [`replay`]: an NDJSON recording (file or stdin), as fast as possible or paced.
//! - [`simulator`]: synthetic bedside devices with seeded anomaly episodes.
//! - [`mqtt`]: devices publishing to `devices/{id}/vitals` on an MQTT broker.

pub mod kafka;
pub mod mqtt;
pub mod replay;
pub mod simulator;

use crate::alerts::AlertBook;
use crate::devices::DeviceRegistry;
use crate::engine::RejectBatch;
use crate::metrics::Metrics;
use crate::model::{ClockMode, FrameBatch, RejectReason, Rejected, SourceId};
use crossbeam_channel::Sender;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering::Relaxed};

/// What a source that speaks for devices — their status and technical alerts, not only
/// readings — needs from the engine.
#[derive(Clone)]
pub struct DeviceContext {
    pub book: Arc<AlertBook>,
    pub registry: Arc<DeviceRegistry>,
    pub metrics: Arc<Metrics>,
    pub dead_letter: Option<Sender<RejectBatch>>,
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

/// The engine's input, for one source: stamps each batch with the source and its order.
#[derive(Debug)]
pub struct SourceHandle {
    pub(crate) id: SourceId,
    pub(crate) mode: ClockMode,
    pub(crate) next_seq: u64,
    pub(crate) tx: Sender<FrameBatch>,
    /// The engine's source ids, for [`SourceHandle::another`].
    pub(crate) ids: Arc<AtomicU16>,
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
        }
    }

    pub fn id(&self) -> SourceId {
        self.id
    }

    /// A new source of the same kind, with its own clock and watermark: a Kafka partition
    /// is read at its own pace, so each gets one (the engine's watermark is the slowest).
    pub fn another(&self) -> SourceHandle {
        SourceHandle {
            id: self.ids.fetch_add(1, Relaxed),
            mode: self.mode,
            next_seq: 0,
            tx: self.tx.clone(),
            ids: self.ids.clone(),
        }
    }

    /// An empty batch for this source.
    pub fn batch(&self) -> FrameBatch {
        FrameBatch::new(self.id, self.mode)
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
