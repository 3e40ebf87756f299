//! The ingest node's one job: forward device readings, as they came, to `vitals.raw` keyed by
//! device id, so that the rule nodes of a consumer group each own a set of devices.
//!
//! Nothing is parsed here (the rule nodes parse, reject and dead-letter). A batch's ack is
//! shared by its records and completes once Kafka has every one of them (`acks=all`,
//! idempotent): only then does the MQTT source acknowledge the messages to the broker. A
//! record Kafka never takes fails the ack, and the broker delivers the messages again.

use crate::ack::Ack;
use crate::model::FrameBatch;
use crate::sinks::events::KafkaConfig;
use crossbeam_channel::Receiver;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// What the forwarder did.
#[derive(Debug, Default)]
pub struct ForwardMetrics {
    pub forwarded: AtomicU64,
    pub failed: AtomicU64,
}

struct Context {
    metrics: Arc<ForwardMetrics>,
}

impl ClientContext for Context {}

impl ProducerContext for Context {
    /// A share of the batch's ack (if it has one), done once Kafka has the record.
    type DeliveryOpaque = Box<Option<Ack>>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Box<Option<Ack>>) {
        match result {
            Ok(_) => {
                self.metrics.forwarded.fetch_add(1, Relaxed);
                if let Some(ack) = *ack {
                    ack.done();
                }
            }
            Err((e, _)) => {
                // The dropped share fails the batch: its messages are not acknowledged.
                self.metrics.failed.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "a reading was not forwarded to Kafka; the device's broker delivers it again");
            }
        }
    }
}

pub struct Forwarder {
    producer: ThreadedProducer<Context>,
    topic: String,
    pub metrics: Arc<ForwardMetrics>,
}

impl Forwarder {
    pub fn new(config: &KafkaConfig, topic: &str) -> Result<Forwarder, KafkaError> {
        let metrics = Arc::new(ForwardMetrics::default());
        let producer = config
            .producer(&format!("{}-ingest", config.client_id))
            .create_with_context(Context {
                metrics: metrics.clone(),
            })?;
        Ok(Forwarder {
            producer,
            topic: topic.to_string(),
            metrics,
        })
    }

    /// Forwards every batch until the sources close the channel, then waits (up to
    /// `drain`) for Kafka to confirm what is in flight.
    pub fn run(&self, batches: Receiver<FrameBatch>, drain: Duration) {
        for mut batch in batches {
            let ack = batch.ack.take();
            for frame in &batch.frames {
                let share = Box::new(ack.as_ref().map(Ack::share));
                let key = frame.device_hint.as_deref().unwrap_or_default();
                let mut record = BaseRecord::with_opaque_to(&self.topic, share)
                    .key(key)
                    .payload(batch.payload(frame));
                // librdkafka's queue is full: wait for room rather than drop.
                loop {
                    match self.producer.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err((e, _)) => {
                            // The record's share is dropped with it: the batch fails.
                            self.metrics.failed.fetch_add(1, Relaxed);
                            tracing::error!(error = %e, "a reading could not be queued for Kafka");
                            break;
                        }
                    }
                }
            }
            if let Some(ack) = ack {
                ack.done();
            }
        }
        if let Err(e) = self.producer.flush(drain) {
            tracing::warn!(error = %e, "Kafka did not confirm every forwarded reading before stopping");
        }
    }
}
