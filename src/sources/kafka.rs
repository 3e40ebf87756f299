//! Device traffic from Kafka: a consumer group on `vitals.raw` (keyed by device id), the same
//! payload contract as MQTT.
//!
//! At-least-once: offsets are committed only up to the last record whose reading is durable
//! (in storage or the spool), per partition, in order. Each batch carries an [`Ack`]; when it
//! completes, the batch is marked done, and the done prefix of the batches in flight is
//! durable and committed. A batch whose ack fails (never durable) is never committed past:
//! after a restart, Kafka delivers it again and storage skips what it already has. What is
//! durable stays to be committed until a synchronous commit confirms it (an asynchronous
//! commit may fail unseen, as during a rebalance): each commit carries it again, and a
//! revoke and the shutdown commit it synchronously.
//!
//! Backpressure: when the engine is full, the source pauses its partitions (librdkafka stops
//! fetching) and resumes them once the engine takes the batch; nothing piles up in between.
//!
//! Rebalances: before partitions leave, everything read from them is handed to the engine,
//! waited on until durable and committed, and the engine drops the state of their devices.
//! When partitions arrive, the source first re-reads the records before the committed offset
//! that the rules' windows still need (by timestamp, or a number of records where the broker
//! cannot look up by time), flagged as warm-up: they rebuild windows and alarm state without
//! raising, storing or dead-lettering anything again. Then evaluation continues from the
//! committed offset exactly where the previous owner stopped: no alert missed, none doubled.
//! Warm-up records are never committed (they are committed already): a partition's commits
//! start from its committed offset and only ever move it forward. Were they committed, a
//! rebalance or crash during the warm-up would hand the next owner records already
//! evaluated as new, and it would raise their alerts again.

use crate::ack::Ack;
use crate::model::{FrameBatch, Id, Origin};
use crate::model::{now_micros, now_millis};
use crate::parse::valid_id;
use crate::sources::{Offer, SourceHandle};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// How much history a partition arriving here is re-read for, to rebuild windows: at
    /// least the longest rule window plus the allowed lateness.
    #[serde(with = "humantime_serde")]
    pub rebuild: Duration,
    /// Where the broker cannot find an offset by time: how many records back to re-read.
    pub rebuild_records: i64,
    /// How long a rebalance waits for the readings of departing partitions to be durable
    /// before letting them go uncommitted (the next owner then reads them again).
    #[serde(with = "humantime_serde")]
    pub revoke_timeout: Duration,
    /// librdkafka's `partition.assignment.strategy`; `cooperative-sticky` moves only the
    /// partitions that must move.
    pub assignment_strategy: String,
    /// A node silent this long leaves the group and its partitions move.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// librdkafka's `fetch.wait.max.ms`: the longest a broker holds a fetch that finds
    /// nothing new. A real broker answers as soon as records arrive, so this costs no
    /// latency there; librdkafka's mock cluster always waits the whole time, so a test or
    /// load run against it sets this to a few milliseconds.
    #[serde(with = "humantime_serde")]
    pub fetch_wait: Duration,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        KafkaSourceConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "vitalstream".into(),
            topics: vec!["vitals.raw".into()],
            batch_size: 2048,
            batch_linger: Duration::from_millis(20),
            rebuild: Duration::from_secs(300),
            rebuild_records: 50_000,
            revoke_timeout: Duration::from_secs(10),
            assignment_strategy: "cooperative-sticky".into(),
            session_timeout: Duration::from_secs(45),
            fetch_wait: Duration::from_millis(500),
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
        if self.session_timeout < Duration::from_secs(1) {
            problems.push("session_timeout must be at least 1s".into());
        }
        if self.fetch_wait > Duration::from_secs(300) {
            problems.push("fetch_wait must be at most 300s".into());
        }
        if self.rebuild_records < 0 {
            problems.push("rebuild_records must not be negative".into());
        }
        problems
    }
}

/// What the source did.
#[derive(Debug, Default, Clone, Copy)]
pub struct KafkaStats {
    pub records: u64,
    /// Records read again to rebuild state after partitions arrived.
    pub warmup_records: u64,
    pub batches: u64,
    pub commits: u64,
    pub failed_batches: u64,
    /// Times the partitions were paused because the engine was full.
    pub pauses: u64,
    pub rebalances: u64,
    /// Offsets the broker jumped over (on a topic that is neither compacted nor written in
    /// transactions, records lost before they reached this node).
    pub skipped: u64,
    /// Records polled just before a rebalance moved their partition, dropped (they are read
    /// again from the committed offset).
    pub stale: u64,
}

/// A topic and partition.
type Partition = (Arc<str>, i32);

/// The highest offset of each partition a batch carries.
type Offsets = BTreeMap<Partition, i64>;

/// Batches in flight, oldest first, and per partition how far its records are durable and
/// how far that is known to be committed.
///
/// The two differ because an asynchronous commit may fail — a rebalance makes the broker
/// refuse commits of the generation before ("Specified group generation id is not valid")
/// — and its outcome is not reported (rust-rdkafka gives librdkafka no callback for a
/// manual commit). So what is durable stays here until a synchronous commit confirms it:
/// every commit carries it again, and a revoke or the shutdown commits it synchronously.
///
/// A partition arriving here starts at its committed offset ([`InFlight::open`]): both
/// `durable` and `committed` begin just before it, and only ever grow, so no commit moves
/// a partition's offset back, and a batch of records before it (the warm-up) has no place
/// here at all ([`InFlight::track`]).
#[derive(Default)]
struct InFlight {
    batches: VecDeque<(u64, Offsets, Option<bool>)>,
    next: u64,
    /// Once a batch failed, nothing after it may be committed.
    blocked: bool,
    /// Per partition, the highest offset whose record, and every one before it here, is
    /// durable: what may be committed.
    durable: Offsets,
    /// Per partition, the highest offset a commit is known to have committed.
    committed: Offsets,
}

impl InFlight {
    /// Every batch handed over has completed (or there were none).
    fn is_settled(&self) -> bool {
        self.batches.iter().all(|b| b.2.is_some())
    }

    /// Forgets partitions this node no longer owns. A failed batch stops blocking once
    /// none of its partitions is left here: their next owner starts from the last commit.
    fn drop_partitions(&mut self, gone: &HashSet<Partition>) {
        for (_, offsets, _) in &mut self.batches {
            offsets.retain(|p, _| !gone.contains(p));
        }
        self.batches.retain(|(_, offsets, _)| !offsets.is_empty());
        self.blocked = self.batches.iter().any(|b| b.2 == Some(false));
        self.durable.retain(|p, _| !gone.contains(p));
        self.committed.retain(|p, _| !gone.contains(p));
    }

    /// Records a completion; returns true when more is durable than before.
    fn complete(&mut self, id: u64, ok: bool) -> bool {
        if let Some(b) = self.batches.iter_mut().find(|b| b.0 == id) {
            b.2 = Some(ok);
        }
        let mut advanced = false;
        while !self.blocked {
            match self.batches.front() {
                Some((_, _, Some(true))) => {
                    let (_, offsets, _) = self.batches.pop_front().expect("front exists");
                    for (partition, offset) in offsets {
                        let durable = self.durable.entry(partition).or_insert(-1);
                        advanced |= offset > *durable;
                        *durable = offset.max(*durable);
                    }
                }
                Some((_, _, Some(false))) => self.blocked = true,
                _ => break,
            }
        }
        advanced
    }

    /// A partition arrives whose group has committed up to `next` (the offset of the first
    /// record not yet evaluated): what is committed is durable and committed here too.
    /// Neither ever goes back, also when the broker reports less than is known here.
    fn open(&mut self, partition: &Partition, next: i64) {
        let last = next - 1;
        for known in [&mut self.durable, &mut self.committed] {
            let offset = known.entry(partition.clone()).or_insert(last);
            *offset = last.max(*offset);
        }
    }

    /// A batch whose records of `partition` end at `offset` is handed to the engine: its
    /// place among the batches in flight, whose completion is waited for. `None` when it
    /// carries nothing that may be committed: records no later than what is durable
    /// already, such as the warm-up of an arriving partition.
    fn track(&mut self, partition: &Partition, offset: i64) -> Option<u64> {
        if self.durable.get(partition).is_some_and(|d| offset <= *d) {
            return None;
        }
        let id = self.next;
        self.next += 1;
        let offsets = [(partition.clone(), offset)].into();
        self.batches.push_back((id, offsets, None));
        Some(id)
    }

    /// What is durable but not known to be committed, per partition.
    fn uncommitted(&self) -> Offsets {
        (self.durable.iter())
            .filter(|(p, o)| self.committed.get(*p).is_none_or(|c| c < *o))
            .map(|(p, o)| (p.clone(), *o))
            .collect()
    }

    /// A commit of `offsets` succeeded.
    fn confirm(&mut self, offsets: &Offsets) {
        for (partition, offset) in offsets {
            let committed = self.committed.entry(partition.clone()).or_insert(-1);
            *committed = (*offset).max(*committed);
        }
    }
}

/// One partition's way into the engine: its own source, so its own clock and watermark
/// (partitions are read at different paces; the engine's watermark is the slowest one's).
struct Lane {
    handle: SourceHandle,
    batch: FrameBatch,
    /// Highest offset in `batch`.
    offset: i64,
    /// The offset the next record should have (-1 until the first).
    next: i64,
    /// The rebalance generation that assigned the partition.
    opened: u64,
    /// Records below this offset are re-read only to rebuild state (see `Pipeline::assign`).
    rebuild_until: i64,
    /// Devices seen here, whose state goes when the partition does.
    devices: HashSet<Id>,
    started: Option<Instant>,
}

/// Everything the read loop keeps between records. It lives in the consumer's context, so
/// that a rebalance — which librdkafka runs inside `poll` — can settle it.
struct Pipeline {
    /// Where new lanes come from.
    source: SourceHandle,
    config: KafkaSourceConfig,
    lanes: HashMap<Partition, Lane>,
    /// Sealed batches the engine has not taken yet; the partitions are paused meanwhile.
    held: VecDeque<(Partition, FrameBatch)>,
    paused: bool,
    in_flight: InFlight,
    done_tx: crossbeam_channel::Sender<(u64, bool)>,
    done_rx: crossbeam_channel::Receiver<(u64, bool)>,
    topics: Vec<Arc<str>>,
    /// When lingering batches were last looked for.
    checked: Instant,
    /// The latest rebalance.
    generation: u64,
    /// The engine has shut down.
    closed: bool,
    stats: KafkaStats,
}

impl Pipeline {
    fn topic(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.topics.iter().find(|t| &***t == name) {
            return t.clone();
        }
        let t: Arc<str> = name.into();
        self.topics.push(t.clone());
        t
    }

    /// Adds a record polled in rebalance `generation` to its partition's batch. A record
    /// whose partition has left, or was assigned afresh since it was polled, is stale and
    /// dropped: that partition is read again from its committed offset (here or elsewhere).
    fn push(&mut self, m: &BorrowedMessage<'_>, generation: u64, received_us: i64) {
        let topic = self.topic(m.topic());
        let partition = (topic, m.partition());
        let Some(lane) = (self.lanes.get_mut(&partition)).filter(|l| l.opened <= generation) else {
            self.stats.stale += 1;
            return;
        };
        let hint: Option<Id> = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(|k| valid_id(k).unwrap_or_default());
        if let Some(device) = &hint
            && !device.is_empty()
            && !lane.devices.contains(device)
        {
            lane.devices.insert(device.clone());
        }
        let warmup = m.offset() < lane.rebuild_until;
        // `vitals.raw` is neither compacted nor transactional (ingest nodes are idempotent
        // producers): a jump in offsets means the broker skipped records.
        if lane.next >= 0 && m.offset() > lane.next {
            let skipped = (m.offset() - lane.next) as u64;
            self.stats.skipped += skipped;
            tracing::error!(
                topic = m.topic(),
                partition = m.partition(),
                expected = lane.next,
                got = m.offset(),
                skipped,
                "the broker skipped records of this partition"
            );
        }
        lane.next = m.offset() + 1;
        let origin = Origin {
            topic: partition.0.clone(),
            partition: m.partition(),
            offset: m.offset(),
        };
        let payload = m.payload().unwrap_or_default();
        lane.batch
            .push_record(payload, received_us, hint, origin, warmup);
        lane.offset = m.offset();
        lane.started.get_or_insert_with(Instant::now);
        self.stats.records += 1;
        self.stats.warmup_records += warmup as u64;
        if lane.batch.len() >= self.config.batch_size {
            self.seal(&partition);
        }
    }

    /// A partition's own source in the engine, announced at once so that its clock holds the
    /// watermark back before its first record arrives.
    fn open_lane(&mut self, partition: &Partition) {
        let mut handle = self.source.another();
        self.closed |= !handle.open();
        let lane = Lane {
            batch: handle.batch(),
            handle,
            offset: -1,
            next: -1,
            opened: self.generation,
            rebuild_until: -1,
            devices: HashSet::default(),
            started: None,
        };
        self.lanes.insert(partition.clone(), lane);
    }

    /// Closes a lane's batch: it gets an ack and a place among the batches in flight —
    /// unless it carries nothing to commit (only warm-up records): then it is evaluated,
    /// and nothing waits for it or commits it.
    fn seal(&mut self, partition: &Partition) {
        let Some(lane) = self.lanes.get_mut(partition) else {
            return;
        };
        if lane.batch.is_empty() {
            return;
        }
        let tx = self.done_tx.clone();
        let ack = (self.in_flight.track(partition, lane.offset)).map(|id| {
            Ack::new(move |ok| {
                let _ = tx.send((id, ok));
            })
        });
        let mut batch = std::mem::replace(&mut lane.batch, lane.handle.batch());
        batch.ack = ack;
        lane.started = None;
        self.stats.batches += 1;
        self.held.push_back((partition.clone(), batch));
    }

    /// Seals every batch that has lingered long enough (or all of them). Looks at most
    /// every millisecond, not after every record.
    fn seal_due(&mut self, all: bool) {
        if !all && self.checked.elapsed() < Duration::from_millis(1) {
            return;
        }
        self.checked = Instant::now();
        let linger = self.config.batch_linger;
        let due: Vec<Partition> = (self.lanes.iter())
            .filter(|(_, l)| all || l.started.is_some_and(|s| s.elapsed() >= linger))
            .map(|(p, _)| p.clone())
            .collect();
        for partition in due {
            self.seal(&partition);
        }
    }

    /// Offers the held batches to the engine, oldest first; pauses the partitions while it
    /// has no room and resumes them once it has taken them all.
    fn offer(&mut self, consumer: &BaseConsumer<Context>) {
        while let Some((partition, batch)) = self.held.pop_front() {
            let Some(lane) = self.lanes.get_mut(&partition) else {
                continue; // its partition left; the next owner reads it again
            };
            // A moment's wait absorbs the engine's ordinary bursts; pausing is for an engine
            // that stays full (librdkafka drops what it prefetched, and fetches it again).
            let wait = if self.paused {
                Duration::ZERO
            } else {
                PAUSE_AFTER
            };
            match lane.handle.try_send(batch, wait) {
                Offer::Taken => {}
                Offer::Full(batch) => {
                    self.held.push_front((partition, batch));
                    if !self.paused {
                        self.paused = true;
                        self.stats.pauses += 1;
                        set_paused(consumer, true);
                    }
                    return;
                }
                Offer::Closed => {
                    self.closed = true;
                    return;
                }
            }
        }
        if self.paused {
            self.paused = false;
            set_paused(consumer, false);
        }
    }

    /// Records a completed batch.
    fn completed(&mut self, id: u64, ok: bool) -> bool {
        if !ok {
            self.stats.failed_batches += 1;
            tracing::error!(
                batch = id,
                "a Kafka batch was not stored; offsets are not committed past it"
            );
        }
        self.in_flight.complete(id, ok)
    }

    /// Commits, asynchronously, what the completed acks allow: whenever more is durable,
    /// everything durable not known to be committed (so it also covers an earlier commit
    /// that failed).
    fn commit_done(&mut self, consumer: &BaseConsumer<Context>) {
        let mut advanced = false;
        while let Ok((id, ok)) = self.done_rx.try_recv() {
            advanced |= self.completed(id, ok);
        }
        if advanced {
            self.commit(consumer, CommitMode::Async);
        }
    }

    /// Waits (up to `revoke_timeout`) until every batch handed to the engine has completed.
    fn settle(&mut self) {
        let deadline = Instant::now() + self.config.revoke_timeout;
        while !self.in_flight.is_settled() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((id, ok)) = self.done_rx.recv_timeout(left) else {
                tracing::warn!(
                    batches = self.in_flight.batches.len(),
                    "Kafka: readings not durable in time; whoever reads the partitions next reads them again"
                );
                return;
            };
            self.completed(id, ok);
        }
    }

    /// Commits everything durable that is not known to be committed. A synchronous commit
    /// that succeeds confirms it; an asynchronous one may yet fail, so what it carries is
    /// carried again by the next commit.
    fn commit(&mut self, consumer: &BaseConsumer<Context>, mode: CommitMode) {
        let offsets = self.in_flight.uncommitted();
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &offsets {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1));
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                self.stats.commits += 1;
                if matches!(mode, CommitMode::Sync) {
                    self.in_flight.confirm(&offsets);
                }
            }
            Err(e) => tracing::warn!(error = %e, "Kafka commit failed; the next one covers it"),
        }
    }

    /// Partitions are leaving: hands everything read to the engine, waits (up to
    /// `revoke_timeout`) until it is durable, commits all that is durable, and has the
    /// engine drop the state of the partitions' devices.
    fn revoke(&mut self, consumer: &BaseConsumer<Context>, leaving: &TopicPartitionList) {
        self.seal_due(true);
        while let Some((partition, batch)) = self.held.pop_front() {
            if let Some(lane) = self.lanes.get_mut(&partition) {
                self.closed |= !lane.handle.send(batch);
            }
        }
        self.settle();
        // Everything durable, also what became durable before the rebalance but whose
        // asynchronous commit failed (as commits do while the group rebalances).
        self.commit(consumer, CommitMode::Sync);
        let mut gone = HashSet::default();
        for e in leaving.elements() {
            let partition = (self.topic(e.topic()), e.partition());
            // Behind the partition's last readings, on its own lane: drop its devices' state,
            // and its clock, which must no longer hold the watermark back.
            if let Some(mut lane) = self.lanes.remove(&partition) {
                let mut batch = lane.handle.batch();
                batch.forget = lane.devices.into_iter().collect();
                batch.last = true;
                self.closed |= !lane.handle.send(batch);
            }
            gone.insert(partition);
        }
        // What was not committed of departing partitions, the next owner reads again.
        self.in_flight.drop_partitions(&gone);
    }

    /// Partitions are arriving: each starts far enough before its committed offset to
    /// rebuild the windows the rules need.
    fn assign(&mut self, consumer: &BaseConsumer<Context>, arriving: &mut TopicPartitionList) {
        for e in arriving.elements() {
            let partition = (self.topic(e.topic()), e.partition());
            if !self.lanes.contains_key(&partition) {
                self.open_lane(&partition);
            }
        }
        let timeout = Duration::from_secs(10);
        let committed = match consumer.committed_offsets(arriving.clone(), timeout) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "rebalance: committed offsets unknown; no rebuild");
                return;
            }
        };
        let since = now_millis() - self.config.rebuild.as_millis() as i64;
        let mut by_time = TopicPartitionList::new();
        for e in committed.elements() {
            let _ = by_time.add_partition_offset(e.topic(), e.partition(), Offset::Offset(since));
        }
        let by_time = consumer.offsets_for_times(by_time, timeout).ok();
        for e in committed.elements() {
            let Offset::Offset(until) = e.offset() else {
                continue; // nothing committed: auto.offset.reset decides, nothing to rebuild
            };
            let found = by_time
                .as_ref()
                .and_then(|t| t.find_partition(e.topic(), e.partition()))
                .and_then(|p| match p.offset() {
                    Offset::Offset(o) if o >= 0 => Some(o),
                    _ => None,
                });
            let from = match found {
                Some(o) => o.min(until),
                // No offset by time: no record that recent, or a broker that cannot look up
                // by time (librdkafka's mock). Re-reading more than needed is harmless (warm-up
                // raises and stores nothing), so fall back to a count of records.
                None => {
                    let low = consumer
                        .fetch_watermarks(e.topic(), e.partition(), timeout)
                        .map_or(0, |(low, _)| low);
                    (until - self.config.rebuild_records).max(low)
                }
            };
            let _ = arriving.set_partition_offset(e.topic(), e.partition(), Offset::Offset(from));
            let partition = (self.topic(e.topic()), e.partition());
            if let Some(lane) = self.lanes.get_mut(&partition) {
                lane.next = from;
                lane.rebuild_until = until;
            }
            // Commits go on from `until`, never back: warm-up records are not committable.
            self.in_flight.open(&partition, until);
            if from < until {
                tracing::info!(
                    topic = e.topic(),
                    partition = e.partition(),
                    from,
                    until,
                    "rebalance: rebuilding state from earlier records"
                );
            }
        }
    }
}

/// Pauses (or resumes) every partition assigned to this consumer.
fn set_paused(consumer: &BaseConsumer<Context>, pause: bool) {
    let result = consumer.assignment().and_then(|a| {
        if pause {
            consumer.pause(&a)
        } else {
            consumer.resume(&a)
        }
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, pause, "Kafka pause/resume failed");
    }
}

/// The consumer's context: runs rebalances against the pipeline.
struct Context {
    pipeline: Mutex<Option<Pipeline>>,
    /// Counts rebalances, so the read loop knows when what it holds went stale.
    generation: AtomicU64,
    /// The brokers answer and the group has assigned this node its share, for readiness.
    up: Arc<AtomicBool>,
}

impl Context {
    fn pipeline(&self) -> MutexGuard<'_, Option<Pipeline>> {
        self.pipeline.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for Context {
    /// librdkafka reports that no broker answers: the source is down until one does.
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            self.up.store(false, Relaxed);
        }
        tracing::warn!(%error, reason, "Kafka client error");
    }
}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let generation = self.generation.fetch_add(1, Relaxed) + 1;
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(?err, ?partitions, cooperative, "Kafka rebalance");
        let mut guard = self.pipeline();
        let result = match (err, guard.as_mut()) {
            (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, pipeline) => {
                if let Some(p) = pipeline {
                    p.stats.rebalances += 1;
                    p.generation = generation;
                    p.assign(consumer, tpl);
                }
                self.up.store(true, Relaxed);
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                // Arriving partitions wait too while the engine is full.
                if guard.as_ref().is_some_and(|p| p.paused) {
                    let _ = consumer.pause(tpl);
                }
                assigned
            }
            (RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS, pipeline) => {
                if let Some(p) = pipeline {
                    p.revoke(consumer, tpl);
                }
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            (err, _) => {
                let _ = consumer.unassign();
                Err(KafkaError::Rebalance(err.into()))
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "Kafka rebalance failed");
        }
    }
}

/// How long the engine may stay full before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_millis(200);

/// Records taken from librdkafka per turn of the read loop.
const POLL_MAX: usize = 512;

pub struct KafkaSource {
    consumer: BaseConsumer<Context>,
    config: KafkaSourceConfig,
}

impl KafkaSource {
    pub fn new(config: &KafkaSourceConfig) -> Result<KafkaSource, KafkaError> {
        let consumer: BaseConsumer<Context> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // librdkafka's prefetch is the only buffer: bounded here (64 MiB); past it the
            // fetcher waits. Its default wait (`fetch.queue.backoff.ms`, 1 s) starves a fast
            // consumer: this node drains the queue in milliseconds (4x the throughput).
            .set("queued.max.messages.kbytes", "65536")
            .set("fetch.queue.backoff.ms", "10")
            .set(
                "fetch.wait.max.ms",
                config.fetch_wait.as_millis().to_string(),
            )
            .set("partition.assignment.strategy", &config.assignment_strategy)
            .set(
                "session.timeout.ms",
                config.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (config.session_timeout.as_millis() / 3).to_string(),
            )
            .create_with_context(Context {
                pipeline: Mutex::new(None),
                generation: AtomicU64::new(0),
                up: Arc::default(),
            })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(KafkaSource {
            consumer,
            config: config.clone(),
        })
    }

    /// True while the brokers answer and the group has given this node its partitions
    /// (for `/ready`).
    pub fn connected(&self) -> Arc<AtomicBool> {
        self.consumer.context().up.clone()
    }

    /// Reads until `stop` is set or the engine stops; commits behind durable batches.
    pub fn run(self, source: SourceHandle, stop: &AtomicBool) -> KafkaStats {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        *self.consumer.context().pipeline() = Some(Pipeline {
            source,
            config: self.config.clone(),
            lanes: HashMap::default(),
            held: VecDeque::new(),
            paused: false,
            in_flight: InFlight::default(),
            done_tx,
            done_rx,
            topics: Vec::new(),
            checked: Instant::now(),
            generation: 0,
            closed: false,
            stats: KafkaStats::default(),
        });
        let consumer = &self.consumer;
        let lock = || consumer.context().pipeline();
        let mut messages = Vec::with_capacity(POLL_MAX);
        let mut probed = Instant::now();
        loop {
            let stopping = stop.load(Relaxed);
            let held = {
                let mut guard = lock();
                let p = guard.as_mut().expect("pipeline set");
                if stopping {
                    p.seal_due(true);
                }
                p.offer(consumer);
                if p.closed || (stopping && p.held.is_empty()) {
                    break;
                }
                !p.held.is_empty()
            };
            // Polled even while paused: it serves the group (rebalances). Records polled
            // just before a pause took effect join their lanes' next batches. What is ready
            // is taken in one go (up to `POLL_MAX`), then handled under one lock.
            // Each record is tagged with the rebalance generation it was polled in: one taken
            // before a rebalance that moved its partition is stale (see `Pipeline::push`).
            messages.clear();
            if !stopping {
                let generation = &consumer.context().generation;
                let mut wait = Duration::from_millis(if held { 5 } else { 20 });
                while messages.len() < POLL_MAX {
                    let message = consumer.poll(wait);
                    match message {
                        Some(Ok(m)) => messages.push((m, generation.load(Relaxed))),
                        Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error"),
                        None => break,
                    }
                    wait = Duration::ZERO;
                }
            }
            let context = consumer.context();
            if !messages.is_empty() {
                context.up.store(true, Relaxed);
            } else if !context.up.load(Relaxed) && probed.elapsed() >= Duration::from_secs(1) {
                // Down, and nothing arriving: ask a broker whether it is back.
                probed = Instant::now();
                let back = (consumer.client())
                    .fetch_metadata(None, Duration::from_secs(1))
                    .is_ok();
                context.up.store(back, Relaxed);
            }
            let received_us = now_micros();
            let mut guard = lock();
            let p = guard.as_mut().expect("pipeline set");
            for (m, generation) in &messages {
                p.push(m, *generation, received_us);
            }
            p.seal_due(false);
            p.commit_done(consumer);
        }
        // What the engine holds becomes durable (up to `revoke_timeout`) and is committed;
        // what does not, is read again by whoever reads the partitions next.
        let pipeline = self.consumer.context().pipeline().take();
        pipeline.map_or_else(KafkaStats::default, |mut p| {
            p.settle();
            p.commit(consumer, CommitMode::Sync);
            p.stats
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(p: i32, o: i64) -> Offsets {
        [(("t".into(), p), o)].into()
    }

    fn in_flight(batches: &[(i32, i64)]) -> InFlight {
        let mut f = InFlight::default();
        for &(p, o) in batches {
            f.batches.push_back((f.next, offsets(p, o), None));
            f.next += 1;
        }
        f
    }

    #[test]
    fn only_the_done_prefix_is_durable_and_a_failure_blocks_what_follows() {
        let mut f = in_flight(&[(0, 10), (0, 20), (1, 5)]);
        assert!(!f.complete(1, true), "batch 0 is not done yet");
        assert!(f.complete(0, true));
        assert_eq!(f.uncommitted(), offsets(0, 20));
        f.batches.push_back((3, offsets(1, 9), None));
        assert!(!f.complete(2, false));
        assert!(!f.complete(3, true), "nothing after a failed batch");
        assert_eq!(f.uncommitted(), offsets(0, 20));
        // Partition 1 moves to another node: the failed batch no longer blocks partition 0.
        f.drop_partitions(&[("t".into(), 1)].into_iter().collect());
        assert!(!f.blocked);
        f.batches.push_back((4, offsets(0, 30), None));
        assert!(f.complete(4, true));
        assert_eq!(f.uncommitted(), offsets(0, 30));
    }

    /// The reported double alert: durable offsets whose asynchronous commit failed were
    /// forgotten, so the revoke committed only what completed while it waited, and the next
    /// owner evaluated the rest again.
    #[test]
    fn what_is_durable_stays_to_commit_until_a_commit_confirms_it() {
        let mut f = in_flight(&[(0, 10), (1, 5)]);
        assert!(f.complete(0, true) && f.complete(1, true));
        let mut both = offsets(0, 10);
        both.extend(offsets(1, 5));
        // Committed asynchronously, and refused (the group is rebalancing): nothing is
        // confirmed, so the next commit carries both partitions again.
        assert_eq!(f.uncommitted(), both);
        f.batches.push_back((2, offsets(0, 12), None));
        assert!(f.complete(2, true));
        both.extend(offsets(0, 12));
        assert_eq!(f.uncommitted(), both, "partition 1's offset is not lost");
        // Partition 1 leaves with nothing left in flight: the revoke still commits what
        // became durable before it.
        assert!(f.is_settled());
        f.confirm(&both);
        assert!(f.uncommitted().is_empty());
        f.drop_partitions(&[("t".into(), 1)].into_iter().collect());
        assert_eq!(f.durable, offsets(0, 12));
        // A confirmation of an older commit arriving late takes nothing back.
        f.confirm(&offsets(0, 10));
        assert!(f.uncommitted().is_empty());
        f.batches.push_back((3, offsets(0, 15), None));
        assert!(f.complete(3, true));
        assert_eq!(f.uncommitted(), offsets(0, 15));
    }

    /// The reported doubled alerts: the warm-up of an arriving partition (records before
    /// its committed offset, read again only to rebuild state) was acknowledged like any
    /// batch and committed, which moved the group's offset back below the previous
    /// owner's; whoever read the partition next evaluated those records again, as new.
    #[test]
    fn warm_up_records_never_become_committable() {
        let mut f = InFlight::default();
        let p: Partition = ("t".into(), 0);
        // The previous owner committed records 0..=99: the partition is read here from 0,
        // records 0..=99 as warm-up.
        f.open(&p, 100);
        assert!(f.uncommitted().is_empty(), "what is committed is not again");
        assert_eq!(
            f.track(&p, 63),
            None,
            "a warm-up batch has nothing to commit"
        );
        assert_eq!(
            f.track(&p, 99),
            None,
            "up to the last record before the offset"
        );
        assert!(f.uncommitted().is_empty());
        // The first batch that reaches past the committed offset is committed once durable.
        let id = f.track(&p, 120).expect("records past the committed offset");
        assert!(!f.is_settled());
        assert!(f.complete(id, true));
        assert_eq!(f.uncommitted(), offsets(0, 120));
    }

    /// Whatever completes, and whatever the broker says when a partition arrives (again),
    /// no commit moves a partition's offset back.
    #[test]
    fn a_commit_never_moves_a_partition_back() {
        let p: Partition = ("t".into(), 0);
        // A batch of the partition's earlier records completes after it arrived with a
        // later committed offset: nothing to commit.
        let mut f = in_flight(&[(0, 50)]);
        f.open(&p, 100);
        assert!(!f.complete(0, true));
        assert!(f.uncommitted().is_empty(), "nothing below offset 100");
        // More is durable here than the broker reports (its commit went unconfirmed) when
        // the partition is given here again: the durable offset stands.
        let id = f.track(&p, 120).unwrap();
        assert!(f.complete(id, true));
        f.open(&p, 80);
        assert_eq!(f.uncommitted(), offsets(0, 120));
        f.confirm(&offsets(0, 120));
        f.open(&p, 80);
        assert!(
            f.uncommitted().is_empty(),
            "offset 121 is not taken back to 80"
        );
        assert_eq!(
            f.track(&p, 110),
            None,
            "re-read records are committed already"
        );
    }
}
