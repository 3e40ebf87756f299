//! vitalstream: the ingest tier for bedside vital signs. It takes readings in at device
//! rate, decides within milliseconds whether a patient needs someone, stores every reading,
//! and tells the people and services who care.
//!
//! # Layout
//!
//! The path of one reading, in the order it meets the modules:
//!
//! 1. [`sources`] — a source (the [`sources::simulator`], an NDJSON [`sources::replay`],
//!    devices over [`sources::mqtt`]; Kafka later) reads bytes, stamps the receive time, and hands a
//!    [`model::FrameBatch`] to the engine through a [`sources::SourceHandle`]. It never parses.
//! 2. [`parse`] — a parse worker decodes each frame with simd-json into a [`model::Sample`],
//!    or rejects it with a named [`model::RejectReason`]; rejects are counted
//!    ([`metrics`]) and go to the dead-letter output with their original bytes.
//! 3. [`engine`] — the router puts batches back in source order, rejects readings from the
//!    future, marks late ones against the source's watermark, and hashes each reading to
//!    the shard that owns its device. A shard (one thread, no locks on the hot path) drops
//!    duplicates, evaluates the [`rules`] — threshold rules per reading, window rules when
//!    the watermark closes a window — and sends alert edges to the [`alerts`] book. What
//!    the shards evaluated also goes to one SQL stage ([`engine::sql`]), which runs the
//!    analysts' SQL rules ([`rules::sql`], DataFusion) over each window of every device's
//!    readings, once the slowest shard's watermark has passed it.
//! 4. [`alerts`] — the lifecycle per (rule, patient): pending → firing → (escalated) →
//!    acknowledged → resolved; one active alert per key, however long the condition lasts.
//! 5. [`sinks`] — alert transitions go to the alert log (NDJSON); readings and alerts to
//!    [`sinks::Storage`] — Parquet files by default, or TimescaleDB / PostgreSQL
//!    ([`sinks::postgres`]: binary COPY, retries, a circuit breaker and a local spool while
//!    the database is away); rejects to the dead-letter output.
//! 6. [`tasks`] — slow work through RabbitMQ: alert transitions become notification tasks
//!    (and escalations); a worker delivers them (webhook, SMTP, log) with retries and a
//!    dead-letter queue, and renders shift reports.
//!
//! Sources that must acknowledge upstream attach an [`ack::Ack`] to a batch; every piece of
//! it carries a share until it is durable, so nothing is acknowledged before it is safe.
//!
//! [`service`] wires these together for `vitalstream run` and `vitalstream replay`;
//! [`config`] loads the settings. Every queue between stages is bounded: a full queue blocks
//! the stage before it, back to the source, and nothing is dropped to make room.

pub mod ack;
pub mod alerts;
pub mod api;
pub mod config;
pub mod devices;
pub mod engine;
pub mod latest;
pub mod link;
pub mod metrics;
pub mod model;
pub mod parse;
pub mod rules;
pub mod service;
pub mod sinks;
pub mod sources;
pub mod tasks;
