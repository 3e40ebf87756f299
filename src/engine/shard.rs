//! A shard owns the state of its devices outright — no locks on the hot path: duplicate
//! history, threshold state machines, open windows. It evaluates the rule set on each
//! reading, closes windows as the watermark passes them, and signals alert edges to the
//! [`AlertBook`].

use super::dedup::Dedup;
use super::sql::SqlMsg;
use super::{Assignments, EngineConfig, ReadingBatch};
use crate::ack::Ack;
use crate::alerts::{AlertBook, Cause, Signal, Trigger};
use crate::latest::Gatherer;
use crate::metrics::{Metrics, RuleCounters};
use crate::model::{CorrelationId, Id, Millis, Sample, Vital};
use crate::rules::threshold::Edge;
use crate::rules::threshold::ThresholdState;
use crate::rules::window::{WindowOutcome, WindowState};
use crate::rules::{Rule, RuleKind, RuleSet};
use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// A shard's line to the SQL stage.
pub(crate) struct SqlFeed {
    pub shard: usize,
    pub tx: Sender<SqlMsg>,
    /// Set by the SQL stage while it needs readings (SQL rules, or recent readings kept
    /// for trying rules out); otherwise only watermarks are sent.
    pub wants: Arc<AtomicBool>,
}

impl SqlFeed {
    fn wants_readings(&self) -> bool {
        self.wants.load(Relaxed)
    }
}

#[derive(Debug)]
pub(crate) enum ShardMsg {
    /// Readings in source order, and the engine watermark after them.
    Batch {
        samples: Vec<Sample>,
        /// Devices to drop before the readings: another node owns them now.
        forget: Arc<[Id]>,
        watermark: Millis,
        now_ms: Millis,
        /// A share of the source batch's ack, done once these readings are stored.
        ack: Option<Ack>,
    },
    /// Time passes with no data.
    Tick { now_ms: Millis, watermark: Millis },
}

/// One device known to this shard, with all of its state in one place, so evaluating a
/// reading touches as little memory as possible. `repr(C)` keeps the fields every reading
/// touches in the first cache lines, in this order, so they can be prefetched together.
#[repr(C)]
struct Device {
    /// One state per rule, in the order of the shard's runtimes.
    rules: Vec<RuleState>,
    /// Processing time of the last reading, ms.
    last_seen: Millis,
    assigned_version: u64,
    id: Id,
    /// Last patient seen in a reading or assignment, for alert keys.
    patient: Option<Id>,
    /// Newest event time seen.
    max_ts: Millis,
    /// Windows ending by this event time were evaluated by the node that owned this
    /// device before (see [`Sample::warmup`]): their edges are not announced again.
    warm_until: Millis,
    /// Cached assignment, read at `assigned_version`.
    assigned: Option<Id>,
    /// Its ring of recent readings comes last: only one slot of it is touched per reading.
    dedup: Dedup,
}

enum RuleState {
    Threshold(ThresholdState),
    Window {
        state: WindowState,
        /// The schedule entry this device waits in, if any.
        scheduled: Option<Millis>,
    },
}

impl RuleState {
    fn new(rule: &Rule) -> Self {
        match rule.kind {
            RuleKind::Threshold(_) => RuleState::Threshold(ThresholdState::default()),
            RuleKind::Window(_) => RuleState::Window {
                state: WindowState::new(),
                scheduled: None,
            },
            RuleKind::Sql(_) => unreachable!("SQL rules run in the SQL stage, not in shards"),
        }
    }

    /// The device's alarm for this rule is on (or pending).
    fn active(&self) -> bool {
        match self {
            RuleState::Threshold(s) => *s != ThresholdState::Normal,
            RuleState::Window { state, .. } => state.alarm(),
        }
    }
}

/// A rule in force in this shard.
struct RuleRuntime {
    rule: Arc<Rule>,
    /// The vital it reads.
    vital: Vital,
    counters: Arc<RuleCounters>,
    matches: u64,
    /// Window rules: window end → device slots with a window ending then (entries whose
    /// device has since been rescheduled are skipped).
    schedule: BTreeMap<Millis, Vec<u32>>,
}

impl RuleRuntime {
    fn new(rule: Arc<Rule>, metrics: &Metrics) -> Self {
        RuleRuntime {
            counters: metrics.rule(&rule.id),
            vital: rule.vital().expect("a shard's rules read one vital"),
            rule,
            matches: 0,
            schedule: BTreeMap::new(),
        }
    }

    fn flush_counters(&mut self) {
        if self.matches > 0 {
            self.counters.matches.fetch_add(self.matches, Relaxed);
            self.matches = 0;
        }
    }
}

pub(crate) struct Shard {
    rules_source: Arc<ArcSwap<RuleSet>>,
    rules: Arc<RuleSet>,
    runtimes: Vec<RuleRuntime>,
    index: FxHashMap<Id, u32>,
    devices: Vec<Option<Device>>,
    free: Vec<u32>,
    book: Arc<AlertBook>,
    metrics: Arc<Metrics>,
    assignments: Arc<Assignments>,
    storage: Option<Sender<ReadingBatch>>,
    /// The SQL stage, which hears this shard's watermark and, when it asks for them
    /// ([`SqlFeed::wants_readings`]), the readings this shard evaluated.
    sql: Option<SqlFeed>,
    /// Readings for the SQL stage from the batch being processed.
    for_sql: Vec<Sample>,
    watermark: Millis,
    lateness_ms: Millis,
    idle_ms: Millis,
    ttl_ms: Millis,
    last_scan: Millis,
    outcomes: Vec<WindowOutcome>,
    /// The device slot of each reading of the batch being processed (reused).
    slots: Vec<u32>,
    /// Read when the input ends: evaluate every open window, or leave them.
    close_at_end: Arc<AtomicBool>,
    /// Each patient's latest vitals, gathered here and published once a second.
    latest: Option<Gatherer>,
    late: u64,
    duplicates: u64,
    /// Devices this shard keeps state for at most (see `EngineConfig::max_devices`).
    max_devices: usize,
    /// Readings stored but not evaluated since the last scan, because the shard was full.
    unevaluated: u64,
    /// Whether this shard's device-limit technical alarm is raised, and under what name.
    limit_alarm: bool,
    name: Id,
}

/// The slot of a reading whose device found its shard full: stored, not evaluated.
const UNTRACKED: u32 = u32::MAX;

impl Shard {
    /// Names the shard (`shard-{n}`): the subject of its device-limit technical alarm.
    pub(crate) fn named(mut self, n: usize) -> Shard {
        self.name = format!("shard-{n}").into();
        self
    }

    /// Tells the SQL stage this shard's watermark, and hands it readings.
    pub(crate) fn with_sql(mut self, sql: SqlFeed) -> Shard {
        self.sql = Some(sql);
        self
    }

    /// Gathers each patient's latest vitals into `latest`.
    pub(crate) fn with_latest(mut self, latest: Option<Gatherer>) -> Shard {
        self.latest = latest;
        self
    }

    pub(crate) fn new(
        config: &EngineConfig,
        rules_source: Arc<ArcSwap<RuleSet>>,
        book: Arc<AlertBook>,
        metrics: Arc<Metrics>,
        assignments: Arc<Assignments>,
        storage: Option<Sender<ReadingBatch>>,
        close_at_end: Arc<AtomicBool>,
    ) -> Shard {
        let rules = rules_source.load_full();
        let runtimes = rules
            .native()
            .map(|r| RuleRuntime::new(r.clone(), &metrics))
            .collect();
        Shard {
            rules_source,
            rules,
            runtimes,
            index: FxHashMap::default(),
            devices: Vec::new(),
            free: Vec::new(),
            book,
            metrics,
            assignments,
            storage,
            sql: None,
            for_sql: Vec::new(),
            watermark: Millis::MIN,
            lateness_ms: config.allowed_lateness.as_millis() as Millis,
            idle_ms: config.idle_timeout.as_millis() as Millis,
            ttl_ms: config.state_ttl.as_millis() as Millis,
            max_devices: config.shard_device_limit(),
            unevaluated: 0,
            limit_alarm: false,
            name: "shard".into(),
            last_scan: 0,
            outcomes: Vec::new(),
            slots: Vec::new(),
            close_at_end,
            latest: None,
            late: 0,
            duplicates: 0,
        }
    }

    pub(crate) fn run(mut self, input: Receiver<ShardMsg>) {
        for msg in input {
            match msg {
                ShardMsg::Batch {
                    samples,
                    forget,
                    watermark,
                    now_ms,
                    ack,
                } => {
                    self.refresh_rules();
                    for device in forget.iter() {
                        self.hand_over(device);
                    }
                    let keep = self.process(samples, now_ms);
                    if let Some(latest) = &mut self.latest {
                        latest.maybe_publish(now_ms);
                    }
                    self.advance(watermark);
                    self.maintain(now_ms);
                    self.flush_counters();
                    self.feed_sql(watermark, now_ms);
                    match &self.storage {
                        Some(storage) if !keep.is_empty() => {
                            self.metrics.stored.fetch_add(keep.len() as u64, Relaxed);
                            let batch = ReadingBatch {
                                readings: keep,
                                ack,
                            };
                            if storage.send(batch).is_err() {
                                tracing::error!("storage queue closed; readings not stored");
                            }
                        }
                        // Nothing to store: evaluating them was all there was to do.
                        _ => {
                            if let Some(ack) = ack {
                                ack.done();
                            }
                        }
                    }
                }
                ShardMsg::Tick { now_ms, watermark } => {
                    self.refresh_rules();
                    self.advance(watermark);
                    self.maintain(now_ms);
                    self.flush_counters();
                    self.feed_sql(watermark, now_ms);
                }
            }
        }
        if self.close_at_end.load(Relaxed) {
            self.advance(Millis::MAX);
        }
        self.flush_counters();
    }

    /// Hands the SQL stage what this shard evaluated, and how far its watermark got.
    fn feed_sql(&mut self, watermark: Millis, now_ms: Millis) {
        let Some(feed) = &self.sql else {
            return;
        };
        let msg = SqlMsg {
            shard: feed.shard,
            readings: std::mem::take(&mut self.for_sql),
            watermark,
            now_ms,
        };
        if feed.tx.send(msg).is_err() {
            tracing::error!("SQL rule stage is gone; SQL rules are not evaluated");
            self.sql = None;
        }
    }

    /// Switches to a new rule set, keeping the state of rules whose definition is unchanged.
    fn refresh_rules(&mut self) {
        let latest = self.rules_source.load();
        if Arc::ptr_eq(&latest, &self.rules) {
            return;
        }
        let latest = arc_swap::Guard::into_inner(latest);
        let native: Vec<&Arc<Rule>> = latest.native().collect();
        let mut old: Vec<Option<RuleRuntime>> = self.runtimes.drain(..).map(Some).collect();
        // For each new rule, the index of the old runtime it keeps, if unchanged.
        let mut kept = Vec::with_capacity(native.len());
        for &rule in &native {
            let same = old
                .iter()
                .position(|rt| rt.as_ref().is_some_and(|rt| *rt.rule == **rule));
            let runtime = match same {
                Some(i) => old[i].take().expect("taken once"),
                None => RuleRuntime::new(rule.clone(), &self.metrics),
            };
            kept.push(same);
            self.runtimes.push(runtime);
        }
        for mut rt in old.into_iter().flatten() {
            rt.flush_counters();
        }
        for device in self.devices.iter_mut().flatten() {
            let mut states: Vec<Option<RuleState>> = device.rules.drain(..).map(Some).collect();
            device.rules = kept
                .iter()
                .zip(&native)
                .map(|(same, rule)| match same {
                    Some(i) => states[*i].take().expect("taken once"),
                    None => RuleState::new(rule),
                })
                .collect();
        }
        tracing::info!(rules = latest.rules.len(), "shard switched rule set");
        self.rules = latest;
    }

    fn slot(&mut self, sample: &Sample, now_ms: Millis) -> u32 {
        if let Some(&i) = self.index.get(&sample.device_id) {
            return i;
        }
        if self.index.len() >= self.max_devices {
            return UNTRACKED;
        }
        let device = Device {
            id: sample.device_id.clone(),
            patient: None,
            max_ts: Millis::MIN,
            warm_until: Millis::MIN,
            assigned: None,
            assigned_version: u64::MAX,
            last_seen: now_ms,
            dedup: Dedup::default(),
            rules: self
                .runtimes
                .iter()
                .map(|rt| RuleState::new(&rt.rule))
                .collect(),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.devices[i as usize] = Some(device);
                i
            }
            None => {
                self.devices.push(Some(device));
                (self.devices.len() - 1) as u32
            }
        };
        self.index.insert(sample.device_id.clone(), i);
        i
    }

    /// Evaluates a batch; returns the readings to store (all but duplicates and warm-up).
    fn process(&mut self, mut samples: Vec<Sample>, now_ms: Millis) -> Vec<Sample> {
        let version = self.assignments.version();
        let feed_sql = self.sql.as_ref().is_some_and(SqlFeed::wants_readings);
        // Readings not to store again, by position.
        let mut not_stored = Vec::new();
        // First find every reading's device: the lookups are independent of each other, so
        // the CPU overlaps their cache misses instead of waiting for each in turn.
        let mut slots = std::mem::take(&mut self.slots);
        slots.clear();
        slots.extend(samples.iter().map(|s| self.slot(s, now_ms)));
        for (n, sample) in samples.iter().enumerate() {
            self.prefetch_ahead(&slots, n);
            let slot = slots[n];
            if slot == UNTRACKED {
                // A flood of new device ids: stored, not evaluated, counted and alarmed
                // (see `maintain`), never unbounded memory.
                self.unevaluated += 1;
                continue;
            }
            let device = self.devices[slot as usize].as_mut().expect("slot in use");
            device.last_seen = now_ms;
            let device_ts = sample.device_ts.then_some(sample.ts);
            if device.dedup.is_duplicate(device_ts, sample.seq) {
                self.duplicates += 1;
                not_stored.push(n);
                continue;
            }
            if sample.late {
                self.late += 1;
                continue;
            }
            device.max_ts = device.max_ts.max(sample.ts);
            if sample.warmup {
                // The node before closed this device's windows up to its newest reading
                // less the allowed lateness when it let go (see `hand_over`).
                device.warm_until = device.max_ts.saturating_sub(self.lateness_ms);
                not_stored.push(n);
            }
            let quiet = sample.warmup;
            if device.assigned_version != version {
                device.assigned = self.assignments.patient_of(&device.id);
                device.assigned_version = version;
            }
            let patient = sample
                .patient_id
                .clone()
                .or_else(|| device.assigned.clone());
            if feed_sql {
                let mut reading = sample.clone();
                reading.patient_id.clone_from(&patient);
                self.for_sql.push(reading);
            }
            if let Some(p) = &patient {
                device.patient.clone_from(&patient);
                if let Some(latest) = &mut self.latest
                    && !sample.warmup
                {
                    latest.add(p, sample);
                }
            }
            for (rt, state) in self.runtimes.iter_mut().zip(&mut device.rules) {
                let Some(value) = sample.vitals.get(rt.vital) else {
                    continue;
                };
                match (&rt.rule.kind, state) {
                    (RuleKind::Threshold(rule), RuleState::Threshold(state)) => {
                        let eval = rule.evaluate(state, value, sample.ts);
                        rt.matches += eval.matched as u64;
                        if let Some(edge) = eval.edge {
                            self.book.signal(Signal {
                                cause: Cause::of(&rt.rule),
                                patient_id: patient.clone(),
                                edge,
                                trigger: Trigger {
                                    device_id: sample.device_id.clone(),
                                    value,
                                    window: None,
                                    correlation_id: sample.correlation_id.clone(),
                                    event_ts: sample.ts,
                                },
                                received_us: sample.received_us,
                                quiet,
                            });
                        }
                    }
                    (RuleKind::Window(rule), RuleState::Window { state, scheduled }) => {
                        if rule.add(
                            state,
                            sample.ts,
                            value,
                            &sample.correlation_id,
                            sample.received_us,
                        ) && let Some(end) = state.next_end(rule)
                            && scheduled.is_none_or(|s| end < s)
                        {
                            *scheduled = Some(end);
                            rt.schedule.entry(end).or_default().push(slot);
                        }
                    }
                    _ => unreachable!("a device's rule state matches its rule kind"),
                }
            }
        }
        self.slots = slots;
        if self.storage.is_none() {
            return Vec::new();
        }
        let mut not_stored = not_stored.into_iter().peekable();
        let mut n = 0;
        samples.retain(|_| {
            let skip = not_stored.next_if_eq(&n).is_some();
            n += 1;
            !skip
        });
        samples
    }

    /// Software prefetch for the readings a few places ahead of `n`, in three steps because
    /// each step needs the memory the previous one brought in: the device, then its rule
    /// states and duplicate history, then its newest window panes.
    fn prefetch_ahead(&self, slots: &[u32], n: usize) {
        let device = |k: usize| {
            slots
                .get(n + k)
                .and_then(|&s| self.devices.get(s as usize))
                .and_then(Option::as_ref)
        };
        if let Some(&slot) = slots.get(n + 12) {
            let device = self
                .devices
                .as_ptr()
                .wrapping_add(slot as usize)
                .cast::<u8>();
            for line in 0..3 {
                prefetch(device.wrapping_add(line * 64));
            }
        }
        if let Some(d) = device(6) {
            prefetch(d.rules.as_ptr());
            d.dedup.prefetch();
        }
        if let Some(d) = device(2) {
            for state in &d.rules {
                if let RuleState::Window { state, .. } = state {
                    state.prefetch();
                }
            }
        }
    }

    /// Closes every window whose end the watermark has passed.
    fn advance(&mut self, watermark: Millis) {
        if watermark <= self.watermark {
            return;
        }
        self.watermark = watermark;
        for r in 0..self.runtimes.len() {
            while let Some(entry) = self.runtimes[r].schedule.first_entry() {
                if *entry.key() > watermark {
                    break;
                }
                let (end, slots) = entry.remove_entry();
                for slot in slots {
                    self.close_device(r, slot, watermark, Some(end));
                }
            }
        }
    }

    /// Evaluates a device's windows for one rule up to `watermark`, then reschedules it.
    /// `due` is the schedule entry being served; a stale entry is skipped.
    fn close_device(&mut self, r: usize, slot: u32, watermark: Millis, due: Option<Millis>) {
        let rt = &mut self.runtimes[r];
        let RuleKind::Window(rule) = &rt.rule.kind else {
            return;
        };
        let Some(device) = self.devices[slot as usize].as_mut() else {
            return;
        };
        let RuleState::Window { state, scheduled } = &mut device.rules[r] else {
            return;
        };
        if due.is_some() && *scheduled != due {
            return;
        }
        *scheduled = None;
        self.outcomes.clear();
        rule.close(state, watermark, &mut self.outcomes);
        if let Some(end) = state.next_end(rule) {
            *scheduled = Some(end);
            rt.schedule.entry(end).or_default().push(slot);
        }
        for outcome in self.outcomes.drain(..) {
            rt.matches += outcome.matched as u64;
            if let Some(edge) = outcome.edge {
                self.book.signal(Signal {
                    cause: Cause::of(&rt.rule),
                    patient_id: device.patient.clone(),
                    edge,
                    trigger: Trigger {
                        device_id: device.id.clone(),
                        value: outcome.value,
                        window: Some((outcome.start, outcome.end)),
                        correlation_id: outcome.correlation_id,
                        event_ts: outcome.end,
                    },
                    received_us: outcome.received_us,
                    quiet: outcome.end <= device.warm_until,
                });
            }
        }
    }

    /// Once a second: closes the windows of idle devices and evicts devices past their TTL.
    fn maintain(&mut self, now_ms: Millis) {
        if now_ms - self.last_scan < 1000 {
            return;
        }
        self.last_scan = now_ms;
        self.device_limit_alarm();
        for slot in 0..self.devices.len() {
            let Some(device) = &self.devices[slot] else {
                continue;
            };
            let silent = now_ms - device.last_seen;
            if silent < self.idle_ms {
                continue;
            }
            let open: Vec<usize> = (device.rules.iter().enumerate())
                .filter(|(_, s)| matches!(s, RuleState::Window { state, .. } if !state.is_empty()))
                .map(|(r, _)| r)
                .collect();
            for r in open {
                self.close_device(r, slot as u32, Millis::MAX, None);
            }
            if silent >= self.ttl_ms {
                self.evict(slot);
            }
        }
    }

    /// Drops a device another node now owns. First its windows are closed up to its newest
    /// reading less the allowed lateness — the point its partition's clock had reached, and
    /// the point up to which the next owner, rebuilding from the same readings, stays quiet.
    /// Its alerts then leave without a transition: the next owner holds them now.
    fn hand_over(&mut self, device: &Id) {
        let Some(&slot) = self.index.get(device) else {
            return;
        };
        let Some(through) = (self.devices[slot as usize].as_ref())
            .map(|d| d.max_ts.saturating_sub(self.lateness_ms))
        else {
            return;
        };
        for r in 0..self.runtimes.len() {
            self.close_device(r, slot, through, None);
        }
        self.index.remove(device);
        let Some(state) = self.devices[slot as usize].take() else {
            return;
        };
        for (rt, rule) in self.runtimes.iter().zip(&state.rules) {
            if rule.active() {
                self.book.hand_over(&rt.rule.id, &state.id);
            }
        }
        self.free.push(slot);
        tracing::debug!(%device, "device state dropped: its partition moved to another node");
    }

    /// Raises a high-priority technical alarm while readings of new devices go
    /// unevaluated because this shard is full, and clears it a scan after they stop.
    fn device_limit_alarm(&mut self) {
        let unevaluated = std::mem::take(&mut self.unevaluated);
        self.metrics.unevaluated.fetch_add(unevaluated, Relaxed);
        let raise = unevaluated > 0;
        if raise == self.limit_alarm {
            return;
        }
        self.limit_alarm = raise;
        if raise {
            tracing::error!(
                shard = %self.name,
                max_devices = self.max_devices,
                unevaluated,
                "device limit reached: readings of new devices are stored but not evaluated"
            );
        }
        self.book.signal(Signal {
            cause: Cause {
                id: "engine.device_limit".into(),
                priority: crate::rules::Priority::High,
                message: format!(
                    "Device limit reached ({} per shard): readings of new devices are stored but not evaluated",
                    self.max_devices
                )
                .into(),
            },
            patient_id: None,
            edge: if raise { Edge::Raise } else { Edge::Clear },
            trigger: Trigger {
                device_id: self.name.clone(),
                value: unevaluated as f64,
                window: None,
                correlation_id: CorrelationId::Given(self.name.clone()),
                event_ts: crate::model::now_millis(),
            },
            received_us: crate::model::now_micros(),
            quiet: false,
        });
    }

    fn evict(&mut self, slot: usize) {
        let Some(device) = self.devices[slot].take() else {
            return;
        };
        for (rt, state) in self.runtimes.iter().zip(&device.rules) {
            if state.active() {
                self.book.forget_device(&rt.rule.id, &device.id);
            }
        }
        self.index.remove(&device.id);
        self.free.push(slot as u32);
        self.metrics.evicted.fetch_add(1, Relaxed);
        tracing::debug!(device = %device.id, "device state evicted after its TTL");
    }

    fn flush_counters(&mut self) {
        for rt in &mut self.runtimes {
            rt.flush_counters();
        }
        if self.late > 0 {
            self.metrics.late.fetch_add(self.late, Relaxed);
            self.late = 0;
        }
        if self.duplicates > 0 {
            self.metrics.duplicates.fetch_add(self.duplicates, Relaxed);
            self.duplicates = 0;
        }
    }
}

/// Asks the CPU to start loading the cache line at `p`. Only a hint: it never faults and
/// does nothing on targets without the instruction.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint and never dereferences or faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p.cast::<i8>(), std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
