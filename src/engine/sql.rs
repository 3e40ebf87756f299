//! The SQL stage: evaluates analysts' SQL rules over every device's readings together, so a
//! rule that compares patients or devices sees all of them, however many shards run.
//!
//! Each shard sends the readings it evaluated (not duplicates, not late) and its watermark
//! after them. The stage's watermark is the lowest of the shards': every reading before it
//! has arrived. A window `[start, start + window)` (starts at multiples of `slide`) that holds
//! at least one reading is evaluated once, when that watermark passes its end, when no
//! reading has arrived for `idle_timeout`, or when a recording ends. A rule added while the
//! engine runs starts with the first window not yet due.
//!
//! Readings are kept in panes (`slide`-long stretches of event time) as Arrow columns,
//! shared by every rule with that slide: a reading is appended once and sorted once, and a
//! window hands DataFusion its panes' batches, whatever the overlap of sliding windows.
//!
//! No rule may slow the others: each has a budget of engine time per minute of readings
//! (`engine.sql_rule_budget`), and one over it is disabled with the reason, as one that
//! fails is. The stage runs on a thread with the stack SQL needs
//! ([`crate::rules::sql::SQL_STACK_BYTES`]). Trials (`POST /api/v1/rules/test`) run off the
//! engine and off the API's threads, each on its own such thread, at most
//! `engine.sql_trials` at once ([`SqlShared::trial`]).

use super::EngineConfig;
use crate::alerts::{AlertBook, Cause, Signal, Trigger};
use crate::metrics::{Metrics, RuleCounters};
use crate::model::{CorrelationId, Id, Millis, Sample};
use crate::rules::sql::{
    Columns, Evaluator, Limits, Match, Policy, SqlError, SqlRule, Wards, spawn_sql_thread,
    to_batch, with_bounds,
};
use crate::rules::threshold::Edge;
use crate::rules::{Rule, RuleKind, RuleSet, RuleSpec};
use arc_swap::ArcSwap;
use crossbeam_channel::Receiver;
use dashmap::DashMap;
use datafusion::arrow::array::{Array, RecordBatch, StringViewArray, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::AcqRel, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Readings one shard evaluated, and its watermark after them.
#[derive(Debug)]
pub(crate) struct SqlMsg {
    pub shard: usize,
    pub readings: Vec<Sample>,
    pub watermark: Millis,
    pub now_ms: Millis,
}

/// What the API sees of the SQL stage: rules it disabled, and recent readings to try a
/// candidate rule on ([`SqlShared::trial`]).
pub struct SqlShared {
    /// Rule id → the error that disabled it. Replacing the rule enables it again.
    pub disabled: DashMap<Arc<str>, SqlError>,
    /// Where each rule the stage disables is told, with why (the service records it in
    /// PostgreSQL, so a restart loads that definition disabled).
    pub failures: std::sync::OnceLock<crossbeam_channel::Sender<(Arc<Rule>, String)>>,
    pub limits: Limits,
    pub wards: Arc<Wards>,
    recent: Mutex<Recent>,
    /// How much event time of readings `recent` keeps, ms, and at most how many.
    recent_ms: Millis,
    recent_max: usize,
    /// Trials running, and at most how many may.
    trials: AtomicUsize,
    max_trials: usize,
}

/// Recent readings, oldest first, and the newest event time among them.
#[derive(Default)]
struct Recent {
    readings: VecDeque<Sample>,
    newest: Millis,
}

impl SqlShared {
    pub(crate) fn new(config: &EngineConfig) -> SqlShared {
        let wards = (config.wards.iter())
            .flat_map(|(ward, devices)| devices.iter().map(move |d| (Id::from(d), Id::from(ward))))
            .collect();
        // Rules validated from now on (the API's) meet this engine's window policy.
        crate::rules::sql::set_policy(config.sql_policy());
        SqlShared {
            disabled: DashMap::new(),
            failures: Default::default(),
            limits: config.sql_limits(),
            wards: Arc::new(wards),
            recent: Mutex::new(Recent::default()),
            recent_ms: config.sql_recent.as_millis() as Millis,
            recent_max: config.sql_recent_readings,
            trials: AtomicUsize::new(0),
            max_trials: config.sql_trials,
        }
    }

    fn remember(&self, readings: &[Sample]) {
        if self.recent_ms == 0 {
            return;
        }
        let mut recent = self.recent.lock().expect("recent readings lock");
        for r in readings.iter().filter(|r| !r.warmup) {
            recent.newest = recent.newest.max(r.ts);
            recent.readings.push_back(r.clone());
        }
        let oldest = recent.newest - self.recent_ms;
        while recent.readings.len() > self.recent_max
            || (recent.readings.front()).is_some_and(|r| r.ts <= oldest)
        {
            recent.readings.pop_front();
        }
    }

    /// The readings of the last `size` of event time up to the newest one, and that
    /// window's bounds: it ends at the first multiple of `slide` after the newest reading.
    pub fn recent_window(&self, size: Millis, slide: Millis) -> (Vec<Sample>, Millis, Millis) {
        let recent = self.recent.lock().expect("recent readings lock");
        if recent.readings.is_empty() {
            return (Vec::new(), 0, 0);
        }
        let end = recent.newest.div_euclid(slide) * slide + slide;
        let start = end - size;
        let rows = (recent.readings.iter())
            .filter(|r| (start..end).contains(&r.ts))
            .cloned()
            .collect();
        (rows, start, end)
    }
}

/// What a trial of a candidate rule found: where its readings came from (`sample` or
/// `recent`), how many there were, and each window's rows.
#[derive(Debug)]
pub struct Trial {
    pub source: &'static str,
    pub readings: usize,
    pub windows: Vec<(Millis, Millis, Vec<Match>)>,
}

/// Why a trial gave no rows.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error(
        "{0} SQL trials are running, as many as may at once (engine.sql_trials); try again shortly"
    )]
    Busy(usize),
    #[error("the rule is not valid")]
    Invalid(Vec<String>),
    #[error("only SQL rules (kind = \"sql\") can be tried here")]
    NotSql,
    #[error("the rule failed: {0}")]
    Failed(SqlError),
}

/// A running trial's place among the `engine.sql_trials`.
struct TrialPermit(Arc<SqlShared>);

impl TrialPermit {
    fn take(shared: &Arc<SqlShared>) -> Result<TrialPermit, TrialError> {
        let max = shared.max_trials;
        (shared.trials)
            .fetch_update(AcqRel, Relaxed, |n| (n < max).then_some(n + 1))
            .map_err(|_| TrialError::Busy(max))?;
        Ok(TrialPermit(shared.clone()))
    }
}

impl Drop for TrialPermit {
    fn drop(&mut self) {
        self.0.trials.fetch_sub(1, AcqRel);
    }
}

impl SqlShared {
    /// Tries a candidate rule without raising anything: over `sample`, or without one over
    /// the most recent window of live readings. It is validated and run on a thread of its
    /// own (never the caller's), within the time limit as a whole; at most
    /// `engine.sql_trials` run at once, and one more is refused ([`TrialError::Busy`]).
    pub async fn trial(
        self: &Arc<Self>,
        rule: RuleSpec,
        sample: Option<Vec<Sample>>,
    ) -> Result<Trial, TrialError> {
        let permit = TrialPermit::take(self)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = self.clone();
        spawn_sql_thread("sql-trial", move || {
            let _permit = permit;
            let _ = tx.send(shared.run_trial(&rule, sample));
        })
        .map_err(|e| TrialError::Failed(SqlError::new(format!("no thread for the trial: {e}"))))?;
        rx.await.unwrap_or_else(|_| {
            Err(TrialError::Failed(SqlError::new(
                "the trial stopped without an answer",
            )))
        })
    }

    fn run_trial(&self, spec: &RuleSpec, sample: Option<Vec<Sample>>) -> Result<Trial, TrialError> {
        let deadline = Instant::now() + self.limits.time;
        let mut problems = Vec::new();
        let rule = match crate::rules::compile_rule(spec, &mut problems).map(|r| r.kind) {
            Some(RuleKind::Sql(sql)) => sql,
            Some(_) => return Err(TrialError::NotSql),
            None => return Err(TrialError::Invalid(problems)),
        };
        let (readings, source) = match sample {
            Some(sample) => (sample, "sample"),
            None => (self.recent_window(rule.size, rule.slide).0, "recent"),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| TrialError::Failed(SqlError::new(format!("no runtime: {e}"))))?;
        let evaluator = Evaluator::new(self.limits);
        let windows = runtime
            .block_on(try_rule_until(
                &evaluator,
                &rule,
                &readings,
                &self.wards,
                deadline,
            ))
            .map_err(TrialError::Failed)?;
        Ok(Trial {
            source,
            readings: readings.len(),
            windows,
        })
    }
}

/// Every window of `rule` holding any of `readings` (a sample, not a stream), in order,
/// with the rows each returned: what the rule would have matched. Each window has the
/// evaluator's time limit.
pub async fn try_rule(
    evaluator: &Evaluator,
    rule: &SqlRule,
    readings: &[Sample],
    wards: &Wards,
) -> Result<Vec<(Millis, Millis, Vec<Match>)>, SqlError> {
    try_rule_until(evaluator, rule, readings, wards, far_future()).await
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// [`try_rule`], all of it stopped at `deadline`.
pub async fn try_rule_until(
    evaluator: &Evaluator,
    rule: &SqlRule,
    readings: &[Sample],
    wards: &Wards,
    deadline: Instant,
) -> Result<Vec<(Millis, Millis, Vec<Match>)>, SqlError> {
    let mut panes: BTreeMap<Millis, Vec<&Sample>> = BTreeMap::new();
    for r in readings {
        panes.entry(pane_of(rule, r.ts)).or_default().push(r);
    }
    let (mut out, mut total) = (Vec::new(), 0);
    let mut next = Millis::MIN;
    while let Some((&first, _)) = panes.first_key_value() {
        let start = next_window(rule, first, next);
        let end = start + rule.size;
        let rows = window_rows(panes.range(start..end).flat_map(|(_, v)| v.iter().copied()));
        if Instant::now() >= deadline {
            return Err(SqlError::new(format!(
                "the trial ran longer than its limit of {:?} and was stopped",
                evaluator.limits().time
            )));
        }
        let batch = to_batch(&rows, wards, start, end);
        let matches = evaluator
            .run_until(&rule.sql, vec![batch], deadline)
            .await?;
        total += matches.len();
        if total > crate::rules::sql::MAX_RESULT_ROWS {
            return Err(SqlError::new(format!(
                "the trial returned more than {} rows (the limit) and was stopped",
                crate::rules::sql::MAX_RESULT_ROWS
            )));
        }
        out.push((start, end, matches));
        next = start + rule.slide;
        panes = panes.split_off(&next);
    }
    Ok(out)
}

fn pane_of(rule: &SqlRule, ts: Millis) -> Millis {
    ts.div_euclid(rule.slide) * rule.slide
}

/// The start of the next window to evaluate: the first holding the earliest pane left
/// (`first`), unless that one was already evaluated (every window before `next` was).
fn next_window(rule: &SqlRule, first: Millis, next: Millis) -> Millis {
    next.max(first - rule.size + rule.slide)
}

/// A window's readings in table order (stable: one device's readings at the same time keep
/// their arrival order, which the shard count does not change).
fn window_rows<'a>(rows: impl Iterator<Item = &'a Sample>) -> Vec<&'a Sample> {
    let mut rows: Vec<&Sample> = rows.collect();
    rows.sort_by_cached_key(|r| table_order(r));
    rows
}

/// Table order: by event time, then by a hash of the device id — an order fixed by the
/// readings alone (not by the shard count or arrival), and cheap to sort by.
fn table_order(r: &Sample) -> (Millis, u64) {
    (r.ts, rustc_hash::FxBuildHasher.hash_one(&r.device_id))
}

/// The readings of one `slide`-long stretch of event time, as the columns of `vitals`:
/// appended as they arrive (while the reading is still in cache), put in table order when
/// a window first reads them.
#[derive(Default)]
struct Pane {
    columns: Columns,
    /// Per row, in arrival order: its table-order key, and what an alert would point at.
    keys: Vec<(Millis, u64)>,
    refs: Vec<(CorrelationId, i64)>,
    sorted: Option<Sorted>,
}

/// A pane in table order: its batch, and for each row its arrival index (into `refs`).
struct Sorted {
    batch: RecordBatch,
    order: Vec<u32>,
}

impl Pane {
    fn push(&mut self, r: &Sample, wards: &Wards) {
        self.columns.push(r, wards);
        self.keys.push(table_order(r));
        self.refs.push((r.correlation_id.clone(), r.received_us));
        self.sorted = None;
    }

    fn sorted(&mut self) -> &Sorted {
        self.sorted.get_or_insert_with(|| {
            let mut order: Vec<u32> = (0..self.keys.len() as u32).collect();
            // The index breaks ties: as stable as a stable sort, and quicker.
            order.sort_unstable_by_key(|&i| (self.keys[i as usize], i));
            let batch = self.columns.finish_cloned();
            let in_order = order.iter().enumerate().all(|(i, &o)| i as u32 == o);
            let batch = if in_order {
                batch
            } else {
                let indices = UInt32Array::from(order.clone());
                take_record_batch(&batch, &indices).expect("indices within the batch")
            };
            Sorted { batch, order }
        })
    }

    /// The pane in table order, once [`Pane::sorted`] has put it so.
    fn table(&self) -> &Sorted {
        self.sorted
            .as_ref()
            .expect("sorted before a window reads it")
    }
}

/// A window's rows, newest first: (device, patient, correlation id, received µs).
fn rows_newest_first<'a>(
    panes: &'a [&'a Pane],
) -> impl Iterator<Item = (&'a str, Option<&'a str>, &'a (CorrelationId, i64))> {
    panes.iter().rev().flat_map(|pane| {
        let sorted = pane.table();
        let column = |i: usize| {
            (sorted.batch.column(i).as_any())
                .downcast_ref::<StringViewArray>()
                .expect("a text column")
        };
        let (device, patient) = (column(0), column(1));
        (0..sorted.order.len()).rev().map(move |i| {
            let patient = patient.is_valid(i).then(|| patient.value(i));
            (
                device.value(i),
                patient,
                &pane.refs[sorted.order[i] as usize],
            )
        })
    })
}

/// One SQL rule's windows and alarms.
struct SqlRuntime {
    rule: Arc<Rule>,
    sql: SqlRule,
    counters: Arc<RuleCounters>,
    /// Every window starting before this has been evaluated.
    next_start: Millis,
    /// Subject (patient, else device) → the device its alert is held by.
    alarming: HashMap<Id, Id>,
    disabled: bool,
    /// Engine time of the windows ending in the last minute of event time: (window end,
    /// time), oldest first, and their sum.
    spent: VecDeque<(Millis, Duration)>,
    spent_total: Duration,
}

impl SqlRuntime {
    /// A rule added while the stage's watermark is at `watermark`: its first window is the
    /// first not yet due, so it does not judge the past it was not there for.
    fn new(rule: Arc<Rule>, sql: SqlRule, metrics: &Metrics, watermark: Millis) -> SqlRuntime {
        let next_start = match watermark {
            Millis::MIN | Millis::MAX => Millis::MIN,
            w => (w - sql.size).div_euclid(sql.slide) * sql.slide + sql.slide,
        };
        SqlRuntime {
            counters: metrics.rule(&rule.id),
            rule,
            sql,
            next_start,
            alarming: HashMap::new(),
            disabled: false,
            spent: VecDeque::new(),
            spent_total: Duration::ZERO,
        }
    }

    /// Counts `took`, the engine time of the window ending at `end`, against `budget`: the
    /// windows ending in the minute up to `end` may take that much together. Their total if
    /// it is over.
    fn charge(&mut self, end: Millis, took: Duration, budget: Duration) -> Option<Duration> {
        self.spent.push_back((end, took));
        self.spent_total += took;
        while let Some(&(old, t)) = self.spent.front()
            && old <= end.saturating_sub(60_000)
        {
            self.spent.pop_front();
            self.spent_total = self.spent_total.saturating_sub(t);
        }
        (self.spent_total > budget).then_some(self.spent_total)
    }
}

/// Panes by start, shared by every rule with the same slide: a reading is added once.
#[derive(Default)]
struct PaneStore {
    panes: BTreeMap<Millis, Pane>,
    /// Panes before this belong to no window still to evaluate.
    floor: Millis,
}

pub(crate) struct SqlStage {
    rules_source: Arc<ArcSwap<RuleSet>>,
    rules: Arc<RuleSet>,
    runtimes: Vec<SqlRuntime>,
    /// Slide → the panes of the rules with that slide.
    stores: BTreeMap<Millis, PaneStore>,
    /// Each shard's watermark.
    marks: Vec<Millis>,
    watermark: Millis,
    book: Arc<AlertBook>,
    metrics: Arc<Metrics>,
    shared: Arc<SqlShared>,
    /// Whether shards should send readings (not only watermarks).
    wants: Arc<AtomicBool>,
    evaluator: Evaluator,
    runtime: tokio::runtime::Runtime,
    /// What a rule's window may be, and the engine time each may spend per minute.
    policy: Policy,
    budget: Duration,
    lateness_ms: Millis,
    idle_ms: Millis,
    /// Processing time of the last reading.
    last_input: Millis,
    /// Windows ending by this event time were evaluated by the node that owned their
    /// devices before: their edges are not announced again (see [`Sample::warmup`]).
    warm_until: Millis,
    close_at_end: Arc<AtomicBool>,
}

impl SqlStage {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: &EngineConfig,
        shards: usize,
        rules_source: Arc<ArcSwap<RuleSet>>,
        book: Arc<AlertBook>,
        metrics: Arc<Metrics>,
        shared: Arc<SqlShared>,
        wants: Arc<AtomicBool>,
        close_at_end: Arc<AtomicBool>,
    ) -> SqlStage {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime for the SQL stage");
        let mut stage = SqlStage {
            rules_source,
            rules: Arc::new(RuleSet::default()),
            runtimes: Vec::new(),
            stores: BTreeMap::new(),
            marks: vec![Millis::MIN; shards],
            watermark: Millis::MIN,
            book,
            metrics,
            evaluator: Evaluator::new(shared.limits),
            shared,
            wants,
            runtime,
            policy: config.sql_policy(),
            budget: config.sql_rule_budget,
            lateness_ms: config.allowed_lateness.as_millis() as Millis,
            idle_ms: config.idle_timeout.as_millis() as Millis,
            last_input: 0,
            warm_until: Millis::MIN,
            close_at_end,
        };
        stage.refresh_rules();
        stage
    }

    /// Runs until `input` closes, on a thread with the stack SQL needs.
    pub(crate) fn run(self, input: Receiver<SqlMsg>) {
        let stage = spawn_sql_thread("sql-rules", move || self.run_here(input))
            .expect("spawning the SQL stage");
        if let Err(panic) = stage.join() {
            std::panic::resume_unwind(panic);
        }
    }

    fn run_here(mut self, input: Receiver<SqlMsg>) {
        for msg in input {
            self.refresh_rules();
            let readings = msg.readings;
            if !readings.is_empty() {
                self.last_input = msg.now_ms;
                self.shared.remember(&readings);
            }
            for reading in &readings {
                if reading.warmup {
                    self.warm_until = (self.warm_until).max(reading.ts - self.lateness_ms);
                }
                for (&slide, store) in &mut self.stores {
                    let pane = reading.ts.div_euclid(slide) * slide;
                    // Otherwise every window holding it was evaluated already.
                    if pane >= store.floor {
                        let pane = store.panes.entry(pane).or_default();
                        pane.push(reading, &self.shared.wards);
                    }
                }
            }
            let mark = &mut self.marks[msg.shard];
            *mark = (*mark).max(msg.watermark);
            let watermark = self.marks.iter().copied().min().unwrap_or(Millis::MIN);
            if watermark > self.watermark {
                self.watermark = watermark;
                self.close(watermark);
            }
            if msg.now_ms - self.last_input >= self.idle_ms {
                // Nothing arrives: the open windows are as complete as they will get.
                self.close(Millis::MAX);
            }
        }
        if self.close_at_end.load(Relaxed) {
            self.close(Millis::MAX);
        }
    }

    /// Switches to a new rule set, keeping the windows of SQL rules that did not change.
    fn refresh_rules(&mut self) {
        let latest = self.rules_source.load();
        if Arc::ptr_eq(&latest, &self.rules) {
            return;
        }
        let latest = arc_swap::Guard::into_inner(latest);
        let mut old: Vec<Option<SqlRuntime>> = self.runtimes.drain(..).map(Some).collect();
        for (rule, sql) in latest.sql() {
            let same = (old.iter_mut())
                .find(|rt| rt.as_ref().is_some_and(|rt| *rt.rule == **rule))
                .and_then(Option::take);
            let runtime = same.unwrap_or_else(|| {
                self.shared.disabled.remove(&rule.id);
                let mut rt =
                    SqlRuntime::new(rule.clone(), sql.clone(), &self.metrics, self.watermark);
                // This definition failed before a restart: it starts disabled, with why.
                if let Some(why) = latest.failed.get(&*rule.id) {
                    tracing::error!(rule = %rule.id, error = %why, "SQL rule loaded disabled: it failed before the restart");
                    rt.disabled = true;
                    self.shared.disabled.insert(
                        rule.id.clone(),
                        SqlError::new(format!("failed before a restart: {why}")),
                    );
                }
                // Validated before this engine's policy was in force (a pipeline read at
                // start): it is held to it all the same.
                if let Some(why) = self.policy.problems(sql.size, sql.slide).pop() {
                    tracing::error!(rule = %rule.id, error = %why, "SQL rule disabled");
                    rt.disabled = true;
                    self.shared
                        .disabled
                        .insert(rule.id.clone(), SqlError::new(why));
                }
                rt
            });
            self.runtimes.push(runtime);
        }
        let slides: Vec<Millis> = self.runtimes.iter().map(|rt| rt.sql.slide).collect();
        self.stores.retain(|slide, _| slides.contains(slide));
        for slide in slides {
            self.stores.entry(slide).or_default();
            self.prune(slide);
        }
        for gone in old.into_iter().flatten() {
            if latest.get(&gone.rule.id).is_none() {
                self.shared.disabled.remove(&gone.rule.id);
            }
        }
        let wants = !self.runtimes.is_empty() || self.shared.recent_ms > 0;
        self.wants.store(wants, Relaxed);
        self.rules = latest;
    }

    /// Evaluates every window of every rule that ends by `watermark`.
    fn close(&mut self, watermark: Millis) {
        for r in 0..self.runtimes.len() {
            while let Some(start) = self.next_window(r, watermark) {
                self.evaluate(r, start);
            }
        }
    }

    /// The start of rule `r`'s next window to evaluate, if it holds readings and ends by
    /// `watermark`.
    fn next_window(&self, r: usize, watermark: Millis) -> Option<Millis> {
        let rt = &self.runtimes[r];
        if rt.disabled {
            return None;
        }
        let (&first, _) = self.stores[&rt.sql.slide]
            .panes
            .range(rt.next_start..)
            .next()?;
        let start = next_window(&rt.sql, first, rt.next_start);
        (start.saturating_add(rt.sql.size) <= watermark).then_some(start)
    }

    fn evaluate(&mut self, r: usize, start: Millis) {
        let rt = &mut self.runtimes[r];
        let (size, slide) = (rt.sql.size, rt.sql.slide);
        let end = start + size;
        let store = self.stores.get_mut(&slide).expect("a store per slide");
        for (_, pane) in store.panes.range_mut(start..end) {
            pane.sorted();
        }
        // Each pane is in table order and the panes follow each other in time: so is this.
        let panes: Vec<&Pane> = store.panes.range(start..end).map(|(_, p)| p).collect();
        let batches = (panes.iter())
            .map(|pane| with_bounds(&pane.table().batch, start, end))
            .collect();
        let started = Instant::now();
        // A panic inside DataFusion fails this rule, not the stage.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.runtime
                .block_on(self.evaluator.run(&rt.sql.sql, batches))
        }))
        .unwrap_or_else(|panic| Err(panicked(panic)));
        let took = started.elapsed();
        match result {
            Ok(matches) => {
                rt.counters.matches.fetch_add(matches.len() as u64, Relaxed);
                let quiet = end <= self.warm_until;
                signal(
                    &self.book,
                    rt.rule.as_ref(),
                    &mut rt.alarming,
                    &panes,
                    &matches,
                    (start, end),
                    quiet,
                );
            }
            Err(e) => {
                self.disable(r, e, start, "rule disabled: its SQL failed");
                return;
            }
        }
        rt.next_start = start + slide;
        if let Some(spent) = rt.charge(end, took, self.budget) {
            let why = SqlError::new(format!(
                "the rule took {spent:.1?} of engine time in a minute of readings, over its \
                 budget of {:?} (engine.sql_rule_budget)",
                self.budget
            ));
            self.disable(r, why, start, "rule disabled: over its engine time budget");
            return;
        }
        self.prune(slide);
    }

    /// Stops evaluating rule `r` until it is replaced: `error` is what the API shows, and
    /// its alerts are resolved with `resolved_by`.
    fn disable(&mut self, r: usize, error: SqlError, start: Millis, resolved_by: &str) {
        let rt = &mut self.runtimes[r];
        tracing::error!(rule = %rt.rule.id, error = %error, window_start = start,
            "SQL rule disabled until it is replaced");
        rt.disabled = true;
        if let Some(failures) = self.shared.failures.get() {
            let _ = failures.send((rt.rule.clone(), error.to_string()));
        }
        self.shared.disabled.insert(rt.rule.id.clone(), error);
        self.book.retire_rule(&rt.rule.id, resolved_by);
        rt.alarming.clear();
        let slide = rt.sql.slide;
        self.prune(slide);
    }

    /// Drops the panes no rule with this slide will read again.
    fn prune(&mut self, slide: Millis) {
        let floor = (self.runtimes.iter())
            .filter(|rt| rt.sql.slide == slide && !rt.disabled)
            .map(|rt| rt.next_start)
            .min()
            .unwrap_or(Millis::MAX);
        if let Some(store) = self.stores.get_mut(&slide) {
            store.floor = floor;
            store.panes = store.panes.split_off(&floor);
        }
    }
}

/// Turns one window's matches into alert edges: a subject (patient, else device) with a
/// row raises (or keeps) its alert; one alarming before, with readings in this window but
/// no row, clears. A subject with no readings in the window keeps its state.
fn signal(
    book: &AlertBook,
    rule: &Rule,
    alarming: &mut HashMap<Id, Id>,
    panes: &[&Pane],
    matches: &[Match],
    window: (Millis, Millis),
    quiet: bool,
) {
    let Some((_, _, newest)) = rows_newest_first(panes).next() else {
        return;
    };
    // Each subject's first row, and the subjects not alarming yet, in row order.
    let mut matched: FxHashMap<&str, &Match> = FxHashMap::default();
    let mut raising: Vec<&str> = Vec::new();
    for m in matches {
        let Some(subject) = m.subject() else {
            tracing::warn!(rule = %rule.id, "a SQL rule's row has neither patient_id nor device_id; skipped");
            continue;
        };
        if let Entry::Vacant(first) = matched.entry(subject.as_str()) {
            first.insert(m);
            if !alarming.contains_key(subject.as_str()) {
                raising.push(subject);
            }
        }
    }
    // One pass back from the newest reading finds each raising subject's latest reading
    // (what its alert points at: its device and correlation id) and which alarming subjects
    // without a row have readings here (they clear); it stops as soon as it has both. A
    // subject the statement names but without readings here points at the newest one.
    let mut latest: FxHashMap<&str, (&str, &(CorrelationId, i64))> = FxHashMap::default();
    let mut wanted: FxHashSet<&str> = raising.iter().copied().collect();
    let mut unmatched: FxHashSet<&str> = (alarming.keys())
        .map(|s| s.as_str())
        .filter(|s| !matched.contains_key(s))
        .collect();
    let mut cleared: Vec<Id> = Vec::new();
    let mut newest_device = "";
    for (device, patient, refs) in rows_newest_first(panes) {
        if newest_device.is_empty() {
            newest_device = device;
        }
        if wanted.is_empty() && unmatched.is_empty() {
            break;
        }
        for id in std::iter::once(device).chain(patient) {
            if wanted.remove(id) {
                latest.insert(id, (device, refs));
            }
            if unmatched.remove(id) {
                cleared.push(Id::from(id));
            }
        }
    }
    for subject in raising {
        let m = matched[subject];
        let (device, (correlation_id, received_us)) = latest
            .get(subject)
            .copied()
            .unwrap_or((newest_device, newest));
        let holder = m.device_id.clone().unwrap_or_else(|| Id::from(device));
        alarming.insert(Id::from(subject), holder.clone());
        book.signal(Signal {
            cause: Cause {
                id: rule.id.clone(),
                priority: rule.priority,
                message: m.message.as_deref().map_or(rule.message.clone(), Arc::from),
            },
            patient_id: m.patient_id.clone(),
            edge: Edge::Raise,
            trigger: Trigger {
                device_id: holder,
                value: m.value.unwrap_or(f64::NAN),
                window: Some(window),
                correlation_id: correlation_id.clone(),
                event_ts: window.1,
            },
            received_us: *received_us,
            quiet,
        });
    }
    for subject in cleared {
        let holder = alarming.remove(&subject).expect("alarming subject");
        book.signal(Signal {
            cause: Cause::of(rule),
            patient_id: None,
            edge: Edge::Clear,
            trigger: Trigger {
                device_id: holder,
                value: f64::NAN,
                window: Some(window),
                correlation_id: newest.0.clone(),
                event_ts: window.1,
            },
            received_us: newest.1,
            quiet,
        });
    }
}

/// A panic caught in an evaluation, as the error that disables its rule.
pub(crate) fn panicked(panic: Box<dyn std::any::Any + Send>) -> SqlError {
    let what = (panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    SqlError::new(format!("the evaluation failed inside DataFusion: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_the_windows_ending_in_the_last_minute() {
        let set = crate::rules::parse_pipeline(
            "[[rule]]\nid = 'q'\nkind = 'sql'\npriority = 'low'\nmessage = 'm'\n\
             window = '10s'\nsql = 'SELECT device_id FROM vitals'\n",
        )
        .unwrap();
        let (rule, sql) = set.sql().next().unwrap();
        let mut rt = SqlRuntime::new(rule.clone(), sql.clone(), &Metrics::default(), 0);
        let (s, budget) = (Duration::from_secs, Duration::from_secs(6));
        assert_eq!(rt.charge(10_000, s(3), budget), None);
        assert_eq!(
            rt.charge(20_000, s(3), budget),
            None,
            "at the budget is not over it"
        );
        // The window ending at 10 s is more than a minute before 70 s: it no longer counts.
        assert_eq!(rt.charge(70_000, s(3), budget), None);
        assert_eq!(rt.charge(75_000, s(1), budget), Some(s(7)));
    }
}
