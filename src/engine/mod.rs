//! The engine: parse workers → router → shards, wired with bounded queues.
//!
//! ```text
//! SourceHandle ─FrameBatch─▶ parse workers (N) ─ParsedBatch─▶ router (1) ─ShardMsg─▶ shards (N)
//!                               │ rejects                        │ future_ts            │ readings
//!                               ▼                                ▼                      ▼
//!                            dead letter                      dead letter            storage
//! ```
//! Parse workers decode batches in parallel; the router puts them back in source order, keeps
//! each source's clock and watermark, and hashes each reading to the shard that owns its
//! device. Every queue is bounded: a full one blocks the stage before it, back to the source.

mod dedup;
mod route;
mod shard;
pub mod sql;

pub(crate) use shard::prefetch;

use crate::ack::Ack;
use crate::alerts::{AlertBook, AlertEvent};
use crate::devices::DeviceRegistry;
use crate::latest::Latest;
use crate::metrics::Metrics;
use crate::model::{ClockMode, FrameBatch, Id, Millis, Rejected, Sample, SourceId};
use crate::parse::{ParseOptions, Parser};
use crate::rules::RuleSet;
use crate::sources::{DeviceContext, SourceHandle};
use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, bounded};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

/// Engine settings (the `[engine]` section of the config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Shard threads, each owning the state of its devices. 0 = one per core.
    pub shards: usize,
    /// Parse threads. 0 = one per core.
    pub parse_workers: usize,
    /// Batches each queue holds before the stage feeding it waits.
    pub queue_batches: usize,
    /// How far behind the newest event time a reading may arrive and still be evaluated.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// A device silent this long (processing time) has its open windows closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A device silent this long has its state dropped, so memory stays bounded.
    #[serde(with = "humantime_serde")]
    pub state_ttl: Duration,
    /// Readings further than this ahead of their source's clock are rejected (`future_ts`).
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// Readings older than this behind their source's clock are rejected (`too_old`): a
    /// device clock reset to 1970 or 2001 cannot reach storage (or make a partition for
    /// every day it names).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Frames larger than this are rejected (`too_large`) unparsed.
    pub max_frame_bytes: usize,
    /// Devices (and patients) held at most: the device registry and the latest vitals keep
    /// this many, each shard its share (plus a quarter for an uneven spread). Past it a new
    /// device is counted and logged; its readings are still stored but, when its shard is
    /// full, not evaluated, and a high-priority technical alarm (`engine.device_limit`) says
    /// so. A flood of device ids so degrades into one alarm, never into memory growth.
    pub max_devices: usize,
    /// A device offline this long is forgotten by the registry, and a patient with no
    /// reading this long by the latest vitals.
    #[serde(with = "humantime_serde")]
    pub forget_devices_after: Duration,
    /// SQL rules: wall time one window's evaluation may take before the rule is stopped
    /// and disabled.
    #[serde(with = "humantime_serde")]
    pub sql_timeout: Duration,
    /// SQL rules: memory one window's evaluation may hold (aggregates, sorts, joins), MiB.
    pub sql_memory_mb: usize,
    /// How much event time of recent readings is kept to try candidate SQL rules on
    /// (`POST /api/v1/rules/test`); 0 keeps none.
    #[serde(with = "humantime_serde")]
    pub sql_recent: Duration,
    /// At most this many recent readings are kept for that.
    pub sql_recent_readings: usize,
    /// SQL rules: the longest `window` (the SQL stage keeps every reading of it); a longer
    /// one is refused when the rule is validated.
    #[serde(with = "humantime_serde")]
    pub sql_max_window: Duration,
    /// SQL rules: the shortest `slide` (a rule is evaluated at most once per slide); a
    /// shorter one is refused when the rule is validated.
    #[serde(with = "humantime_serde")]
    pub sql_min_slide: Duration,
    /// SQL rules: engine time one rule may spend per minute of readings (event time: per
    /// minute of wall time for live data); a rule over it is disabled, with the reason.
    #[serde(with = "humantime_serde")]
    pub sql_rule_budget: Duration,
    /// SQL trials (`POST /api/v1/rules/test`) that may run at once, each on a thread of its
    /// own; more are refused with 429.
    pub sql_trials: usize,
    /// Ward → its devices: the `ward` column SQL rules read.
    pub wards: std::collections::BTreeMap<String, Vec<String>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shards: 0,
            parse_workers: 0,
            queue_batches: 4,
            allowed_lateness: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            state_ttl: Duration::from_secs(600),
            max_clock_skew: Duration::from_secs(300),
            max_age: Duration::from_secs(7 * 86_400),
            max_frame_bytes: 1 << 20,
            max_devices: 20_000,
            forget_devices_after: Duration::from_secs(86_400),
            sql_timeout: Duration::from_secs(2),
            sql_memory_mb: 64,
            sql_recent: Duration::ZERO,
            sql_recent_readings: 200_000,
            sql_max_window: Duration::from_millis(
                crate::rules::sql::Policy::DEFAULT.max_window as u64,
            ),
            sql_min_slide: Duration::from_millis(
                crate::rules::sql::Policy::DEFAULT.min_slide as u64,
            ),
            sql_rule_budget: Duration::from_secs(6),
            sql_trials: 2,
            wards: Default::default(),
        }
    }
}

impl EngineConfig {
    fn cores() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }

    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            Self::cores()
        } else {
            self.shards
        }
    }

    /// Devices one shard keeps state for at most: its share of `max_devices`, with room
    /// for an uneven spread of device ids over shards.
    pub fn shard_device_limit(&self) -> usize {
        (self.max_devices + self.max_devices / 4).div_ceil(self.shard_count())
    }

    /// What one SQL rule evaluation may use.
    pub fn sql_limits(&self) -> crate::rules::sql::Limits {
        crate::rules::sql::Limits {
            memory_bytes: self.sql_memory_mb << 20,
            time: self.sql_timeout,
        }
    }

    /// What a SQL rule's window may be.
    pub fn sql_policy(&self) -> crate::rules::sql::Policy {
        crate::rules::sql::Policy {
            max_window: self.sql_max_window.as_millis().min(i64::MAX as u128) as Millis,
            min_slide: self.sql_min_slide.as_millis().min(i64::MAX as u128) as Millis,
        }
    }

    pub fn parse_worker_count(&self) -> usize {
        if self.parse_workers == 0 {
            Self::cores()
        } else {
            self.parse_workers
        }
    }

    /// Every problem with the settings.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.queue_batches == 0 {
            out.push("engine.queue_batches must be at least 1".into());
        }
        if self.idle_timeout.is_zero() {
            out.push("engine.idle_timeout must be positive".into());
        }
        if self.state_ttl < self.idle_timeout {
            out.push("engine.state_ttl must be at least engine.idle_timeout".into());
        }
        if self.max_age <= self.allowed_lateness {
            out.push("engine.max_age must be longer than engine.allowed_lateness".into());
        }
        if self.max_devices == 0 {
            out.push("engine.max_devices must be at least 1".into());
        }
        if self.max_frame_bytes < 64 {
            out.push("engine.max_frame_bytes must be at least 64".into());
        }
        if self.sql_timeout.is_zero() || self.sql_memory_mb == 0 {
            out.push("engine.sql_timeout and engine.sql_memory_mb must be positive".into());
        }
        if self.sql_min_slide.is_zero() || self.sql_max_window < self.sql_min_slide {
            out.push(
                "engine.sql_min_slide must be positive and at most engine.sql_max_window".into(),
            );
        }
        if self.sql_rule_budget.is_zero() || self.sql_trials == 0 {
            out.push("engine.sql_rule_budget and engine.sql_trials must be positive".into());
        }
        out
    }
}

/// Where the engine's results go. Each is a bounded queue read by a sink thread.
pub struct Outputs {
    /// Alert transitions; never dropped (a full queue blocks).
    pub alerts: Sender<AlertEvent>,
    /// The live push's bus, if anyone listens (the API): every transition goes onto it
    /// straight from the engine, ahead of `alerts`.
    pub live: Option<crate::api::AlertBus>,
    /// Accepted readings for storage, if any storage is configured.
    pub readings: Option<Sender<ReadingBatch>>,
    /// Rejected frames for the dead-letter output.
    pub rejects: Option<Sender<RejectBatch>>,
    /// Where shards publish each patient's latest vitals (once a second), if anyone reads
    /// them (the API); `None` saves the hot path the bookkeeping.
    pub latest: Option<Arc<Latest>>,
}

/// Readings for storage. The storage sink calls `ack.done()` once they are durable.
#[derive(Debug)]
pub struct ReadingBatch {
    pub readings: Vec<Sample>,
    pub ack: Option<Ack>,
}

/// Rejected frames for the dead-letter output, which calls `ack.done()` once they are written.
#[derive(Debug)]
pub struct RejectBatch {
    pub rejects: Vec<Rejected>,
    pub ack: Option<Ack>,
}

/// Sends rejects to the dead-letter output with a share of the batch's ack; without a
/// dead-letter output they are only counted, which is all there is to do.
fn dead_letter(out: &Option<Sender<RejectBatch>>, rejects: Vec<Rejected>, ack: &Option<Ack>) {
    if let (Some(out), false) = (out, rejects.is_empty()) {
        let ack = ack.as_ref().map(Ack::share);
        if out.send(RejectBatch { rejects, ack }).is_err() {
            tracing::error!("dead-letter queue closed; rejects not written");
        }
    }
}

/// Device → patient assignments, readable from every shard. Shards cache lookups per device
/// and re-read only after `version` changes.
#[derive(Debug, Default)]
pub struct Assignments {
    map: DashMap<Id, Id>,
    version: AtomicU64,
}

impl Assignments {
    pub fn assign(&self, device: Id, patient: Id) {
        self.map.insert(device, patient);
        self.version.fetch_add(1, Relaxed);
    }

    pub fn unassign(&self, device: &str) {
        self.map.remove(device);
        self.version.fetch_add(1, Relaxed);
    }

    pub fn patient_of(&self, device: &str) -> Option<Id> {
        self.map.get(device).map(|p| p.clone())
    }

    pub fn version(&self) -> u64 {
        self.version.load(Relaxed)
    }
}

/// What happens to open windows when the input ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndOfInput {
    /// The data is complete (a recording): evaluate every open window.
    CloseWindows,
    /// The service is stopping: open windows are incomplete, leave them unevaluated.
    KeepOpen,
}

/// Parsed frames of one batch, still in source order.
struct ParsedBatch {
    source: SourceId,
    mode: ClockMode,
    seq: u64,
    samples: Vec<Sample>,
    /// Original bytes of each sample, for readings the router rejects (`future_ts`).
    raw: FrameBatch,
    sample_frames: Vec<u32>,
    ack: Option<Ack>,
}

/// A running engine. Feed it through [`Engine::source`]; stop it by dropping every source
/// handle and calling [`Engine::join`], which drains every stage.
pub struct Engine {
    input: Option<Sender<FrameBatch>>,
    next_source: Arc<AtomicU16>,
    threads: Vec<JoinHandle<()>>,
    rules: Arc<ArcSwap<RuleSet>>,
    pub book: Arc<AlertBook>,
    pub metrics: Arc<Metrics>,
    pub assignments: Arc<Assignments>,
    /// Which devices are online, fed by the sources that know.
    pub devices: Arc<DeviceRegistry>,
    /// Each patient's latest vitals, when the outputs asked for them.
    pub latest: Option<Arc<Latest>>,
    /// SQL rules: those disabled after failing, recent readings to try rules on.
    pub sql: Arc<sql::SqlShared>,
    dead_letter: Option<Sender<RejectBatch>>,
    queues: Arc<QueueDepths>,
    close_at_end: Arc<AtomicBool>,
}

/// What other threads may do with a running engine: read its state, swap its rules.
#[derive(Clone)]
pub struct Control {
    rules: Arc<ArcSwap<RuleSet>>,
    pub book: Arc<AlertBook>,
    pub metrics: Arc<Metrics>,
    pub assignments: Arc<Assignments>,
    pub devices: Arc<DeviceRegistry>,
    pub latest: Option<Arc<Latest>>,
    pub sql: Arc<sql::SqlShared>,
    queues: Arc<QueueDepths>,
}

impl Control {
    /// Replaces the rule set; shards switch at their next batch. Rules whose definition is
    /// unchanged keep their state. Alerts of removed rules are resolved, and so are those of
    /// rules whose definition changed: the new definition starts from a clean state and
    /// raises again where its condition holds.
    pub fn set_rules(&self, rules: RuleSet) {
        let old = self.rules.load_full();
        for rule in &rules.rules {
            self.metrics.rule(&rule.id);
        }
        self.rules.store(Arc::new(rules));
        let new = self.rules.load();
        for rule in &old.rules {
            match new.get(&rule.id) {
                None => self.book.retire_rule(&rule.id, "rule removed"),
                Some(n) if n.spec != rule.spec => self.book.retire_rule(&rule.id, "rule changed"),
                Some(_) => {}
            }
        }
    }

    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    /// Attaches a device to a patient (or releases it, with `None`), on behalf of `by`;
    /// listeners to the device registry hear of it (`device.assigned`).
    pub fn assign_device(&self, device: Id, patient: Option<Id>, by: &str) {
        match &patient {
            Some(p) => self.assignments.assign(device.clone(), p.clone()),
            None => self.assignments.unassign(&device),
        }
        self.devices
            .assigned(&device, patient.as_deref(), by, crate::model::now_millis());
    }

    /// Batches waiting: (parse input, sum over shard inputs).
    pub fn queue_depths(&self) -> (usize, usize) {
        self.queues.depths()
    }
}

/// Queue depths, for the status line.
#[derive(Default)]
pub struct QueueDepths {
    input: std::sync::OnceLock<Receiver<FrameBatch>>,
    shards: std::sync::OnceLock<Vec<Receiver<shard::ShardMsg>>>,
}

impl QueueDepths {
    /// Batches waiting: (parse input, sum over shard inputs).
    pub fn depths(&self) -> (usize, usize) {
        let input = self.input.get().map_or(0, |r| r.len());
        let shards = self
            .shards
            .get()
            .map_or(0, |v| v.iter().map(|r| r.len()).sum());
        (input, shards)
    }
}

impl Engine {
    pub fn start(config: &EngineConfig, rules: RuleSet, outputs: Outputs) -> Engine {
        let metrics = Arc::new(Metrics::default());
        if let Some(latest) = &outputs.latest {
            latest.set_limits(crate::latest::LatestLimits {
                max_patients: config.max_devices,
                ttl: config.forget_devices_after.as_millis() as Millis,
            });
        }
        for rule in &rules.rules {
            metrics.rule(&rule.id);
        }
        let rules = Arc::new(ArcSwap::from_pointee(rules));
        let book =
            Arc::new(AlertBook::new(outputs.alerts, metrics.clone()).with_live(outputs.live));
        let assignments = Arc::new(Assignments::default());
        let workers = config.parse_worker_count();
        let shards = config.shard_count();
        let (input_tx, input_rx) = bounded::<FrameBatch>(config.queue_batches * workers);
        let (parsed_tx, parsed_rx) = bounded::<ParsedBatch>(config.queue_batches * workers);
        let queues = Arc::new(QueueDepths::default());
        let close_at_end = Arc::new(AtomicBool::new(true));
        let _ = queues.input.set(input_rx.clone());
        let mut threads = Vec::new();

        for w in 0..workers {
            let rx = input_rx.clone();
            let tx = parsed_tx.clone();
            let rejects = outputs.rejects.clone();
            let metrics = metrics.clone();
            let options = ParseOptions {
                max_frame_bytes: config.max_frame_bytes,
                require_ts: false,
            };
            // Each worker generates correlation ids in its own range.
            let base = (fastrand::u64(..) & 0xffff_0000_0000_0000) | ((w as u64) << 40);
            threads.push(spawn(&format!("parse-{w}"), move || {
                parse_worker(rx, tx, rejects, metrics, Parser::new(options, base))
            }));
        }
        drop(parsed_tx);

        let sql_shared = Arc::new(sql::SqlShared::new(config));
        let wants_readings = Arc::new(AtomicBool::new(false));
        let (sql_tx, sql_rx) = bounded::<sql::SqlMsg>(config.queue_batches * shards);
        let stage = sql::SqlStage::new(
            config,
            shards,
            rules.clone(),
            book.clone(),
            metrics.clone(),
            sql_shared.clone(),
            wants_readings.clone(),
            close_at_end.clone(),
        );
        threads.push(spawn("sql-rules", move || stage.run(sql_rx)));

        let mut shard_txs = Vec::new();
        let mut shard_rxs = Vec::new();
        for s in 0..shards {
            let (tx, rx) = bounded::<shard::ShardMsg>(config.queue_batches);
            shard_txs.push(tx);
            shard_rxs.push(rx.clone());
            let shard = shard::Shard::new(
                config,
                rules.clone(),
                book.clone(),
                metrics.clone(),
                assignments.clone(),
                outputs.readings.clone(),
                close_at_end.clone(),
            )
            .named(s)
            .with_latest(outputs.latest.clone().map(crate::latest::Gatherer::new))
            .with_sql(shard::SqlFeed {
                shard: s,
                tx: sql_tx.clone(),
                wants: wants_readings.clone(),
            });
            threads.push(spawn(&format!("shard-{s}"), move || shard.run(rx)));
        }
        drop(sql_tx);
        let _ = queues.shards.set(shard_rxs);

        let devices = Arc::new(DeviceRegistry::with_limits(
            crate::devices::RegistryLimits {
                max_devices: config.max_devices,
                forget_after: config.forget_devices_after.as_millis() as Millis,
            },
        ));
        let presence = DeviceContext {
            book: book.clone(),
            registry: devices.clone(),
            metrics: metrics.clone(),
            dead_letter: outputs.rejects.clone(),
            assignments: assignments.clone(),
        };
        let router = route::Router::new(
            config,
            shard_txs,
            outputs.rejects.clone(),
            metrics.clone(),
            presence,
        );
        threads.push(spawn("router", move || router.run(parsed_rx)));

        Engine {
            input: Some(input_tx),
            next_source: Arc::new(AtomicU16::new(0)),
            threads,
            rules,
            book,
            metrics,
            assignments,
            devices,
            latest: outputs.latest.clone(),
            sql: sql_shared,
            dead_letter: outputs.rejects.clone(),
            queues,
            close_at_end,
        }
    }

    /// A handle for a new source; each keeps its own clock and watermark.
    pub fn source(&mut self, mode: ClockMode) -> SourceHandle {
        let id = self.next_source.fetch_add(1, Relaxed);
        SourceHandle {
            id,
            mode,
            next_seq: 0,
            ids: self.next_source.clone(),
            names: None,
            tx: self
                .input
                .clone()
                .expect("sources are added before the engine is joined"),
            presence: false,
        }
    }

    /// What a source that speaks for devices (status, technical alerts) needs.
    pub fn device_context(&self) -> DeviceContext {
        DeviceContext {
            book: self.book.clone(),
            registry: self.devices.clone(),
            metrics: self.metrics.clone(),
            dead_letter: self.dead_letter.clone(),
            assignments: self.assignments.clone(),
        }
    }

    /// Replaces the rule set; see [`Control::set_rules`].
    pub fn set_rules(&self, rules: RuleSet) {
        self.control().set_rules(rules)
    }

    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    pub fn queue_depths(&self) -> (usize, usize) {
        self.queues.depths()
    }

    /// A handle on the running engine's state for other threads (the API).
    pub fn control(&self) -> Control {
        Control {
            rules: self.rules.clone(),
            book: self.book.clone(),
            metrics: self.metrics.clone(),
            assignments: self.assignments.clone(),
            devices: self.devices.clone(),
            latest: self.latest.clone(),
            sql: self.sql.clone(),
            queues: self.queues.clone(),
        }
    }

    /// Waits until every source handle is dropped and every stage has drained: all alerts
    /// emitted, all readings handed to storage. With [`EndOfInput::CloseWindows`] (a
    /// recording has ended) every open window is evaluated first; with
    /// [`EndOfInput::KeepOpen`] (a live service stops) windows still open are not evaluated,
    /// since they are incomplete, not over.
    pub fn join(mut self, end: EndOfInput) {
        self.close_at_end
            .store(end == EndOfInput::CloseWindows, Relaxed);
        self.input.take();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("an engine thread panicked");
            }
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .expect("spawning an engine thread")
}

fn parse_worker(
    rx: Receiver<FrameBatch>,
    tx: Sender<ParsedBatch>,
    rejects: Option<Sender<RejectBatch>>,
    metrics: Arc<Metrics>,
    mut parser: Parser,
) {
    for mut batch in rx {
        let ack = batch.ack.take();
        let mut samples = Vec::with_capacity(batch.len());
        let mut sample_frames = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        parser.set_require_ts(matches!(batch.mode, ClockMode::Replay { .. }));
        for (i, frame) in batch.frames.iter().enumerate() {
            let payload = batch.payload(frame);
            match parser.parse(payload, frame.device_hint.as_deref(), frame.received_us) {
                Ok(mut sample) => {
                    sample.warmup = frame.warmup;
                    samples.push(sample);
                    sample_frames.push(i as u32);
                }
                // Read again to rebuild state: it was counted and dead-lettered the first time.
                Err(_) if frame.warmup => {}
                Err(reason) => {
                    metrics.reject(reason, 1);
                    tracing::debug!(%reason, source = batch.source, "frame rejected");
                    rejected.push(Rejected {
                        source: batch.source,
                        reason,
                        received_us: frame.received_us,
                        payload: payload.to_vec(),
                        origin: frame.origin.clone(),
                    });
                }
            }
        }
        metrics.frames.fetch_add(batch.len() as u64, Relaxed);
        dead_letter(&rejects, rejected, &ack);
        let parsed = ParsedBatch {
            source: batch.source,
            mode: batch.mode,
            seq: batch.seq,
            samples,
            raw: batch,
            sample_frames,
            ack,
        };
        if tx.send(parsed).is_err() {
            return;
        }
    }
}
