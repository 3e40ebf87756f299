//! Device traffic from Kafka: a consumer group on `vitals.raw` (keyed by device id), the same
//! payload contract as MQTT.
//!
//! At-least-once: offsets are committed only up to the last record whose reading is durable
//! (in storage or the spool), per partition, in order. Each batch carries an [`Ack`]; when it
//! completes, the batch is marked done, and the done prefix of the batches in flight is
//! committed. A batch whose ack fails (never durable) is never committed past: after a
//! restart, Kafka delivers it again and storage skips what it already has.

use crate::ack::Ack;
use crate::model::Id;
use crate::model::now_micros;
use crate::parse::valid_id;
use crate::sources::SourceHandle;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// `[[sources]] type = "kafka"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSourceConfig {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    /// A batch goes to the engine after this many records…
    pub batch_size: usize,
    /// …or this long after its first record.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        KafkaSourceConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "vitalstream".into(),
            topics: vec!["vitals.raw".into()],
            batch_size: 2048,
            batch_linger: Duration::from_millis(20),
        }
    }
}

impl KafkaSourceConfig {
    /// Every problem with these settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.brokers.is_empty() {
            problems.push("brokers must name at least one host:port".into());
        }
        if self.topics.is_empty() {
            problems.push("topics must name at least one topic".into());
        }
        if self.batch_size == 0 {
            problems.push("batch_size must be at least 1".into());
        }
        problems
    }
}

/// What the source did.
#[derive(Debug, Default, Clone, Copy)]
pub struct KafkaStats {
    pub records: u64,
    pub batches: u64,
    pub commits: u64,
    pub failed_batches: u64,
}

/// The highest offset of each (topic, partition) a batch carries.
type Offsets = BTreeMap<(String, i32), i64>;

/// Batches in flight, oldest first, and the commits their completion allows.
struct InFlight {
    batches: VecDeque<(u64, Offsets, Option<bool>)>,
    next: u64,
    /// Once a batch failed, nothing after it may be committed.
    blocked: bool,
}

impl InFlight {
    /// Records a completion; returns the offsets that may now be committed.
    fn complete(&mut self, id: u64, ok: bool) -> Offsets {
        if let Some(b) = self.batches.iter_mut().find(|b| b.0 == id) {
            b.2 = Some(ok);
        }
        let mut commit = Offsets::new();
        while !self.blocked {
            match self.batches.front() {
                Some((_, _, Some(true))) => {
                    let (_, offsets, _) = self.batches.pop_front().expect("front exists");
                    commit.extend(offsets);
                }
                Some((_, _, Some(false))) => self.blocked = true,
                _ => break,
            }
        }
        commit
    }
}

pub struct KafkaSource {
    consumer: BaseConsumer,
    config: KafkaSourceConfig,
}

impl KafkaSource {
    pub fn new(config: &KafkaSourceConfig) -> Result<KafkaSource, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .create()?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(KafkaSource {
            consumer,
            config: config.clone(),
        })
    }

    /// Reads until `stop` is set or the engine stops; commits behind durable batches.
    pub fn run(self, mut handle: SourceHandle, stop: &AtomicBool) -> KafkaStats {
        let mut stats = KafkaStats::default();
        // (batch id, durable?) from the acks, which complete on other threads.
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<(u64, bool)>();
        let mut in_flight = InFlight {
            batches: VecDeque::new(),
            next: 0,
            blocked: false,
        };
        let mut batch = handle.batch();
        let mut offsets = Offsets::new();
        let mut started: Option<Instant> = None;
        let mut stopping = false;
        loop {
            if stop.load(Relaxed) {
                stopping = true;
            }
            if !stopping {
                match self.consumer.poll(Duration::from_millis(20)) {
                    Some(Ok(m)) => {
                        let hint: Option<Id> = m
                            .key()
                            .and_then(|k| std::str::from_utf8(k).ok())
                            .map(|k| valid_id(k).unwrap_or_default());
                        batch.push(m.payload().unwrap_or_default(), now_micros(), hint);
                        offsets.insert((m.topic().to_string(), m.partition()), m.offset());
                        stats.records += 1;
                        started.get_or_insert_with(Instant::now);
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error"),
                    None => {}
                }
            }
            let full = batch.len() >= self.config.batch_size;
            let lingered = started.is_some_and(|s| s.elapsed() >= self.config.batch_linger);
            if !batch.is_empty() && (full || lingered || stopping) {
                let id = in_flight.next;
                in_flight.next += 1;
                in_flight
                    .batches
                    .push_back((id, std::mem::take(&mut offsets), None));
                let tx = done_tx.clone();
                let mut full_batch = std::mem::replace(&mut batch, handle.batch());
                full_batch.ack = Some(Ack::new(move |ok| {
                    let _ = tx.send((id, ok));
                }));
                started = None;
                stats.batches += 1;
                if !handle.send(full_batch) {
                    break;
                }
            }
            for (id, ok) in done_rx.try_iter() {
                if !ok {
                    stats.failed_batches += 1;
                    tracing::error!(
                        batch = id,
                        "a Kafka batch was not stored; offsets are not committed past it"
                    );
                }
                let commit = in_flight.complete(id, ok);
                if !commit.is_empty() {
                    let mut tpl = TopicPartitionList::new();
                    for ((topic, partition), offset) in &commit {
                        let _ =
                            tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1));
                    }
                    match self.consumer.commit(&tpl, CommitMode::Async) {
                        Ok(()) => stats.commits += 1,
                        Err(e) => {
                            tracing::warn!(error = %e, "Kafka commit failed; the next one covers it")
                        }
                    }
                }
            }
            if stopping && batch.is_empty() {
                break;
            }
        }
        // Commits of batches that finish after this are left to the next run (redelivery).
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(p: i32, o: i64) -> Offsets {
        [(("t".to_string(), p), o)].into()
    }

    #[test]
    fn only_the_done_prefix_is_committed_and_a_failure_blocks_what_follows() {
        let mut f = InFlight {
            batches: VecDeque::new(),
            next: 3,
            blocked: false,
        };
        f.batches.push_back((0, offsets(0, 10), None));
        f.batches.push_back((1, offsets(0, 20), None));
        f.batches.push_back((2, offsets(1, 5), None));
        assert!(f.complete(1, true).is_empty(), "batch 0 is not done yet");
        assert_eq!(f.complete(0, true), offsets(0, 20));
        f.batches.push_back((3, offsets(1, 9), None));
        assert!(f.complete(2, false).is_empty());
        assert!(
            f.complete(3, true).is_empty(),
            "nothing after a failed batch"
        );
    }
}
