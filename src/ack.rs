//! Delivery acknowledgements: how a source learns that what it handed over is safe.
//!
//! A source that must acknowledge upstream (an MQTT QoS 1 message, a Kafka offset) attaches
//! an [`Ack`] to a batch. The engine splits the batch — rejects to the dead-letter output,
//! readings to several shards, then to storage — and every piece carries a share of the
//! ack. Each holder calls [`Ack::done`] once its piece is durable (written and flushed) or
//! needs no storing; when the last share is done, the source's callback runs with `true`.
//! A share dropped without `done` (a write failed, the process is shutting down on an
//! error) makes the callback run with `false`: the source must not acknowledge, and the
//! upstream will deliver again. Nothing acknowledged is ever lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

type Callback = Box<dyn FnOnce(bool) + Send>;

struct Inner {
    callback: Mutex<Option<Callback>>,
    failed: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let durable = !self.failed.load(Ordering::Acquire);
        if let Some(callback) = self.callback.get_mut().ok().and_then(Option::take) {
            callback(durable);
        }
    }
}

/// One share of a batch's acknowledgement.
pub struct Ack(Option<Arc<Inner>>);

impl Ack {
    /// `callback(true)` runs once every share is done; `callback(false)` if any share was
    /// dropped undone.
    pub fn new(callback: impl FnOnce(bool) + Send + 'static) -> Ack {
        Ack(Some(Arc::new(Inner {
            callback: Mutex::new(Some(Box::new(callback))),
            failed: AtomicBool::new(false),
        })))
    }

    /// Another share, for another piece of the batch.
    pub fn share(&self) -> Ack {
        Ack(self.0.clone())
    }

    /// This share's piece is durable (or needs no storing).
    pub fn done(mut self) {
        self.0.take();
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.failed.store(true, Ordering::Release);
        }
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ack")
    }
}

/// Marks every share done.
pub fn all_done(acks: impl IntoIterator<Item = Ack>) {
    acks.into_iter().for_each(Ack::done);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn tracked() -> (Ack, mpsc::Receiver<bool>) {
        let (tx, rx) = mpsc::channel();
        (Ack::new(move |ok| tx.send(ok).unwrap()), rx)
    }

    #[test]
    fn fires_once_after_every_share_is_done() {
        let (ack, rx) = tracked();
        let a = ack.share();
        let b = ack.share();
        ack.done();
        a.done();
        assert!(rx.try_recv().is_err(), "one share is still out");
        b.done();
        assert_eq!(rx.try_recv(), Ok(true));
        assert!(rx.try_recv().is_err(), "fires once");
    }

    #[test]
    fn a_share_dropped_undone_means_not_durable() {
        let (ack, rx) = tracked();
        let a = ack.share();
        ack.done();
        drop(a);
        assert_eq!(rx.try_recv(), Ok(false));
    }
}
