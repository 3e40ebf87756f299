//! Sources turn the outside world into [`FrameBatch`]es. A source never parses; it reads,
//! stamps the receive time, and hands batches to the engine through a [`SourceHandle`].
//!
//! - [`replay`]: an NDJSON recording (file or stdin), as fast as possible or paced.
//! - [`simulator`]: synthetic bedside devices with seeded anomaly episodes.
//! - [`mqtt`]: devices publishing to `devices/{id}/vitals` on an MQTT broker.

pub mod mqtt;
pub mod replay;
pub mod simulator;

use crate::model::{ClockMode, FrameBatch, SourceId};
use crossbeam_channel::Sender;

/// The engine's input, for one source: stamps each batch with the source and its order.
#[derive(Debug)]
pub struct SourceHandle {
    pub(crate) id: SourceId,
    pub(crate) mode: ClockMode,
    pub(crate) next_seq: u64,
    pub(crate) tx: Sender<FrameBatch>,
}

impl SourceHandle {
    /// An empty batch for this source.
    pub fn batch(&self) -> FrameBatch {
        FrameBatch::new(self.id, self.mode)
    }

    /// Hands a batch to the engine; blocks while the engine is full (backpressure).
    /// Returns false when the engine has shut down.
    pub fn send(&mut self, mut batch: FrameBatch) -> bool {
        if batch.is_empty() {
            return true;
        }
        batch.seq = self.next_seq;
        self.next_seq += 1;
        self.tx.send(batch).is_ok()
    }
}
