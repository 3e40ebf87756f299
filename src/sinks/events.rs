//! Domain events and dead letters on Kafka, in the platform's conventions.
//!
//! Alert transitions go to `alert.events` as `alert.raised`, `alert.acknowledged`,
//! `alert.resolved`, each in the platform envelope
//! `{event_id, event_type, event_version: "1.0", timestamp, source_service: "vitalstream",
//! correlation_id, user_id?, data, metadata?}`, with headers `event-type`, `event-version`,
//! `correlation-id`, keyed by patient id (the device id when there is no patient). Rejected
//! frames go to `vitals.dlq` with their original bytes and headers naming the reason and the
//! source. Device changes go to `device.events` as `device.online`, `device.offline` and
//! `device.assigned`.
//!
//! The producer is idempotent with `acks=all`, lz4-compressed and batched; librdkafka retries
//! a failed delivery until `delivery_timeout`, and a final failure is counted and logged —
//! never ignored.

use crate::alerts::{AlertEvent, Transition};
use crate::devices::DeviceEvent;
use crate::model::Rejected;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// `[kafka]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port,host:port`.
    pub brokers: String,
    pub client_id: String,
    pub alert_topic: String,
    pub device_topic: String,
    pub dlq_topic: String,
    /// Where an ingest node forwards readings (and rule nodes read them).
    pub raw_topic: String,
    /// `lz4`, `zstd` is not built in; `none` to turn compression off.
    pub compression: String,
    /// How long the producer waits to fill a batch.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// How long librdkafka retries a delivery before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "vitalstream".into(),
            alert_topic: "alert.events".into(),
            device_topic: "device.events".into(),
            dlq_topic: "vitals.dlq".into(),
            raw_topic: "vitals.raw".into(),
            compression: "lz4".into(),
            linger: Duration::from_millis(5),
            delivery_timeout: Duration::from_secs(120),
        }
    }
}

impl KafkaConfig {
    /// Producer settings: idempotent, `acks=all`, compressed and batched, retried until
    /// `delivery_timeout`.
    pub fn producer(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &self.compression)
            .set("linger.ms", self.linger.as_millis().to_string())
            .set(
                "delivery.timeout.ms",
                self.delivery_timeout.as_millis().to_string(),
            );
        c
    }
}

/// Delivery outcomes, counted by the producer's background thread.
#[derive(Debug, Default)]
pub struct KafkaMetrics {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

struct Context {
    metrics: Arc<KafkaMetrics>,
}

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.metrics.delivered.fetch_add(1, Relaxed);
            }
            Err((e, message)) => {
                self.metrics.failed.fetch_add(1, Relaxed);
                tracing::error!(topic = message.topic(), error = %e, "Kafka delivery failed after retries");
            }
        }
    }
}

/// Publishes domain events and dead letters.
pub struct EventPublisher {
    producer: ThreadedProducer<Context>,
    config: KafkaConfig,
    pub metrics: Arc<KafkaMetrics>,
}

fn new_event_id() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    // A version 4 UUID.
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// A domain event, before it is put in the platform envelope.
struct DomainEvent {
    event_id: String,
    event_type: &'static str,
    at: i64,
    correlation_id: String,
    /// The person who caused it, if one did.
    user_id: Option<String>,
    data: serde_json::Value,
    metadata: Option<serde_json::Value>,
}

impl DomainEvent {
    fn envelope(&self) -> serde_json::Value {
        let mut envelope = json!({
            "event_id": self.event_id,
            "event_type": self.event_type,
            "event_version": "1.0",
            "timestamp": rfc3339(self.at),
            "source_service": "vitalstream",
            "correlation_id": self.correlation_id,
            "data": self.data,
        });
        if let Some(user) = &self.user_id {
            envelope["user_id"] = json!(user);
        }
        if let Some(metadata) = &self.metadata {
            envelope["metadata"] = metadata.clone();
        }
        envelope
    }
}

impl EventPublisher {
    pub fn new(config: &KafkaConfig) -> Result<EventPublisher, KafkaError> {
        let metrics = Arc::new(KafkaMetrics::default());
        let producer: ThreadedProducer<Context> = config
            .producer(&config.client_id)
            .create_with_context(Context {
                metrics: metrics.clone(),
            })?;
        Ok(EventPublisher {
            producer,
            config: config.clone(),
            metrics,
        })
    }

    /// Queues a record; when librdkafka's queue is full, waits for room (backpressure)
    /// rather than dropping.
    fn send(&self, mut record: BaseRecord<'_, str, [u8], ()>) -> Result<(), KafkaError> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Publishes an event in the envelope, with the platform's headers, keyed by `key`.
    fn publish(&self, topic: &str, key: &str, event: &DomainEvent) -> Result<(), KafkaError> {
        let body = event.envelope().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-type",
                value: Some(event.event_type),
            })
            .insert(Header {
                key: "event-version",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "correlation-id",
                value: Some(event.correlation_id.as_str()),
            });
        self.send(
            BaseRecord::to(topic)
                .key(key)
                .payload(body.as_bytes())
                .headers(headers),
        )
    }

    /// Publishes an alert transition to the alert topic, keyed by patient (the device when
    /// there is no patient).
    pub fn alert(&self, e: &AlertEvent) -> Result<(), KafkaError> {
        let a = &e.alert;
        let (event_type, user_id) = match e.event {
            Transition::Raised => ("alert.raised", None),
            Transition::Escalated => ("alert.escalated", None),
            Transition::Acknowledged => ("alert.acknowledged", a.acknowledged_by.clone()),
            Transition::Resolved => ("alert.resolved", a.resolved_by.clone()),
        };
        let event = DomainEvent {
            event_id: new_event_id(),
            event_type,
            at: e.at,
            correlation_id: a.trigger.correlation_id.to_string(),
            user_id,
            data: json!(a),
            metadata: Some(json!({
                "alert_id": a.alert_id,
                "rule_id": &*a.rule_id,
                "priority": a.priority.name(),
            })),
        };
        let key = a
            .patient_id
            .as_deref()
            .unwrap_or(a.trigger.device_id.as_str());
        self.publish(&self.config.alert_topic, key, &event)
    }

    /// Publishes a device change to the device topic, keyed by patient (assignments) or
    /// device.
    pub fn device(&self, e: &DeviceEvent) -> Result<(), KafkaError> {
        let (event_type, device, patient, user, at) = match e {
            DeviceEvent::Online { device_id, at } => ("device.online", device_id, None, None, *at),
            DeviceEvent::Offline { device_id, at } => {
                ("device.offline", device_id, None, None, *at)
            }
            DeviceEvent::Assigned {
                device_id,
                patient_id,
                by,
                at,
            } => (
                "device.assigned",
                device_id,
                patient_id.as_ref(),
                Some(by.clone()),
                *at,
            ),
        };
        let event_id = new_event_id();
        let event = DomainEvent {
            // A device change starts its own chain of events.
            correlation_id: event_id.clone(),
            event_id,
            event_type,
            at,
            user_id: user,
            data: json!({ "device_id": device, "patient_id": patient }),
            metadata: None,
        };
        self.publish(&self.config.device_topic, patient.unwrap_or(device), &event)
    }

    /// Publishes a rejected frame, original bytes as the payload, to the dead-letter topic.
    pub fn dead_letter(&self, r: &Rejected, source: &str) -> Result<(), KafkaError> {
        let reason = r.reason.to_string();
        let received = r.received_us.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "dlq-reason",
                value: Some(reason.as_str()),
            })
            .insert(Header {
                key: "dlq-source",
                value: Some(source),
            })
            .insert(Header {
                key: "dlq-received-us",
                value: Some(received.as_str()),
            });
        if let Some(origin) = &r.origin {
            let (partition, offset) = (origin.partition.to_string(), origin.offset.to_string());
            for (key, value) in [
                ("dlq-kafka-topic", &*origin.topic),
                ("dlq-kafka-partition", partition.as_str()),
                ("dlq-kafka-offset", offset.as_str()),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
        }
        self.send(
            BaseRecord::to(&self.config.dlq_topic)
                .payload(&r.payload[..])
                .headers(headers),
        )
    }

    /// Waits until everything queued is delivered (or `timeout`).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
