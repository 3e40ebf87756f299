//! The SQL stage: evaluates analysts' SQL rules over every device's readings together, so a
//! rule that compares patients or devices sees all of them, however many shards run.
//!
//! Each shard sends the readings it evaluated (not duplicates, not late) and its watermark
//! after them. The stage's watermark is the lowest of the shards': every reading before it
//! has arrived. A window `[start, start + window)` (starts at multiples of `slide`) that holds
//! at least one reading is evaluated once, when that watermark passes its end, when no
//! reading has arrived for `idle_timeout`, or when a recording ends.

use super::EngineConfig;
use crate::alerts::{AlertBook, Cause, Signal, Trigger};
use crate::metrics::{Metrics, RuleCounters};
use crate::model::{Id, Millis, Sample};
use crate::rules::sql::{
    Evaluator, Limits, Match, SqlError, SqlRule, Wards, readings_batch, to_batch, with_bounds,
};
use crate::rules::threshold::Edge;
use crate::rules::{Rule, RuleSet};
use arc_swap::ArcSwap;
use crossbeam_channel::Receiver;
use dashmap::DashMap;
use datafusion::arrow::array::RecordBatch;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Readings one shard evaluated, and its watermark after them.
#[derive(Debug)]
pub(crate) struct SqlMsg {
    pub shard: usize,
    pub readings: Vec<Sample>,
    pub watermark: Millis,
    pub now_ms: Millis,
}

/// What the API sees of the SQL stage: rules it disabled, and recent readings to try a
/// candidate rule on.
pub struct SqlShared {
    /// Rule id → the error that disabled it. Replacing the rule enables it again.
    pub disabled: DashMap<Arc<str>, SqlError>,
    pub limits: Limits,
    pub wards: Arc<Wards>,
    recent: Mutex<Recent>,
    /// How much event time of readings `recent` keeps, ms, and at most how many.
    recent_ms: Millis,
    recent_max: usize,
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
        SqlShared {
            disabled: DashMap::new(),
            limits: config.sql_limits(),
            wards: Arc::new(wards),
            recent: Mutex::new(Recent::default()),
            recent_ms: config.sql_recent.as_millis() as Millis,
            recent_max: config.sql_recent_readings,
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

/// Every window of `rule` holding any of `readings` (a sample, not a stream), in order,
/// with the rows each returned: what the rule would have matched.
pub async fn try_rule(
    evaluator: &Evaluator,
    rule: &SqlRule,
    readings: &[Sample],
    wards: &Wards,
) -> Result<Vec<(Millis, Millis, Vec<Match>)>, SqlError> {
    let mut panes: BTreeMap<Millis, Vec<&Sample>> = BTreeMap::new();
    for r in readings {
        panes.entry(pane_of(rule, r.ts)).or_default().push(r);
    }
    let mut out = Vec::new();
    let mut next = Millis::MIN;
    while let Some((&first, _)) = panes.first_key_value() {
        let start = next.max(first - rule.size + rule.slide);
        let end = start + rule.size;
        let rows = window_rows(panes.range(start..end).flat_map(|(_, v)| v.iter().copied()));
        let matches = evaluator
            .run(&rule.sql, vec![to_batch(&rows, wards, start, end)])
            .await?;
        out.push((start, end, matches));
        next = start + rule.slide;
        panes = panes.split_off(&next);
    }
    Ok(out)
}

fn pane_of(rule: &SqlRule, ts: Millis) -> Millis {
    ts.div_euclid(rule.slide) * rule.slide
}

/// A window's readings in table order: by event time, then device (stable, so one device's
/// readings at the same time keep their arrival order). Shard count does not change it.
fn window_rows<'a>(rows: impl Iterator<Item = &'a Sample>) -> Vec<&'a Sample> {
    let mut rows: Vec<&Sample> = rows.collect();
    rows.sort_by(|a, b| table_order(a, b));
    rows
}

fn table_order(a: &Sample, b: &Sample) -> std::cmp::Ordering {
    a.ts.cmp(&b.ts).then_with(|| a.device_id.cmp(&b.device_id))
}

/// The readings of one `slide`-long stretch of event time.
#[derive(Default)]
struct Pane {
    readings: Vec<Sample>,
    /// The readings, sorted into table order, as columns: built when a window first reads
    /// the pane, dropped if another reading arrives.
    batch: Option<RecordBatch>,
}

impl Pane {
    fn batch(&mut self, wards: &Wards) -> &RecordBatch {
        self.batch.get_or_insert_with(|| {
            self.readings.sort_by(table_order);
            readings_batch(self.readings.iter(), wards)
        })
    }
}

/// One SQL rule's windows and alarms.
struct SqlRuntime {
    rule: Arc<Rule>,
    sql: SqlRule,
    counters: Arc<RuleCounters>,
    /// Readings by pane (`slide`-long stretch of event time) start.
    panes: BTreeMap<Millis, Pane>,
    /// Every window starting before this has been evaluated.
    next_start: Millis,
    /// Subject (patient, else device) → the device its alert is held by.
    alarming: HashMap<Id, Id>,
    disabled: bool,
}

impl SqlRuntime {
    fn new(rule: Arc<Rule>, sql: SqlRule, metrics: &Metrics) -> SqlRuntime {
        SqlRuntime {
            counters: metrics.rule(&rule.id),
            rule,
            sql,
            panes: BTreeMap::new(),
            next_start: Millis::MIN,
            alarming: HashMap::new(),
            disabled: false,
        }
    }

    /// Adds a reading; false when every window holding it was already evaluated.
    fn add(&mut self, reading: &Sample) -> bool {
        let pane = pane_of(&self.sql, reading.ts);
        if pane < self.next_start || self.disabled {
            return false;
        }
        let pane = self.panes.entry(pane).or_default();
        pane.readings.push(reading.clone());
        pane.batch = None;
        true
    }
}

pub(crate) struct SqlStage {
    rules_source: Arc<ArcSwap<RuleSet>>,
    rules: Arc<RuleSet>,
    runtimes: Vec<SqlRuntime>,
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
            marks: vec![Millis::MIN; shards],
            watermark: Millis::MIN,
            book,
            metrics,
            evaluator: Evaluator::new(shared.limits),
            shared,
            wants,
            runtime,
            lateness_ms: config.allowed_lateness.as_millis() as Millis,
            idle_ms: config.idle_timeout.as_millis() as Millis,
            last_input: 0,
            warm_until: Millis::MIN,
            close_at_end,
        };
        stage.refresh_rules();
        stage
    }

    pub(crate) fn run(mut self, input: Receiver<SqlMsg>) {
        for msg in input {
            self.refresh_rules();
            if !msg.readings.is_empty() {
                self.last_input = msg.now_ms;
                self.shared.remember(&msg.readings);
            }
            for reading in &msg.readings {
                if reading.warmup {
                    self.warm_until = (self.warm_until).max(reading.ts - self.lateness_ms);
                }
                for rt in &mut self.runtimes {
                    rt.add(reading);
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
                SqlRuntime::new(rule.clone(), sql.clone(), &self.metrics)
            });
            self.runtimes.push(runtime);
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
        let (&first, _) = rt.panes.first_key_value()?;
        let start = rt.next_start.max(first - rt.sql.size + rt.sql.slide);
        (start.saturating_add(rt.sql.size) <= watermark).then_some(start)
    }

    fn evaluate(&mut self, r: usize, start: Millis) {
        let rt = &mut self.runtimes[r];
        let (size, slide) = (rt.sql.size, rt.sql.slide);
        let end = start + size;
        let batches: Vec<RecordBatch> = (rt.panes.range_mut(start..end))
            .map(|(_, pane)| with_bounds(pane.batch(&self.shared.wards), start, end))
            .collect();
        // Each pane is in table order and the panes follow each other in time: so is this.
        let rows: Vec<&Sample> = (rt.panes.range(start..end))
            .flat_map(|(_, pane)| pane.readings.iter())
            .collect();
        let result = self
            .runtime
            .block_on(self.evaluator.run(&rt.sql.sql, batches));
        match result {
            Ok(matches) => {
                rt.counters.matches.fetch_add(matches.len() as u64, Relaxed);
                let quiet = end <= self.warm_until;
                signal(
                    &self.book,
                    rt.rule.as_ref(),
                    &mut rt.alarming,
                    &rows,
                    &matches,
                    (start, end),
                    quiet,
                );
            }
            Err(e) => {
                tracing::error!(rule = %rt.rule.id, error = %e, window_start = start,
                    "SQL rule failed and is disabled until it is replaced");
                rt.disabled = true;
                self.shared.disabled.insert(rt.rule.id.clone(), e);
                self.book
                    .retire_rule(&rt.rule.id, "rule disabled: its SQL failed");
                rt.alarming.clear();
                rt.panes.clear();
                return;
            }
        }
        rt.next_start = start + slide;
        rt.panes = rt.panes.split_off(&rt.next_start);
    }
}

/// Turns one window's matches into alert edges: a subject (patient, else device) with a
/// row raises (or keeps) its alert; one alarming before, with readings in this window but
/// no row, clears. A subject with no readings in the window keeps its state.
fn signal(
    book: &AlertBook,
    rule: &Rule,
    alarming: &mut HashMap<Id, Id>,
    rows: &[&Sample],
    matches: &[Match],
    window: (Millis, Millis),
    quiet: bool,
) {
    let mut matched: HashSet<&Id> = HashSet::new();
    for m in matches {
        let Some(subject) = m.subject() else {
            tracing::warn!(rule = %rule.id, "a SQL rule's row has neither patient_id nor device_id; skipped");
            continue;
        };
        if !matched.insert(subject) || alarming.contains_key(subject) {
            continue;
        }
        // The subject's latest reading in the window is what the alert points back to.
        let about = |r: &&&Sample| {
            m.device_id.as_ref().is_none_or(|d| *d == r.device_id)
                && m.patient_id
                    .as_ref()
                    .is_none_or(|p| r.patient_id.as_ref() == Some(p))
        };
        let Some(reading) = rows.iter().rev().find(about).or(rows.last()) else {
            continue;
        };
        let holder = m
            .device_id
            .clone()
            .unwrap_or_else(|| reading.device_id.clone());
        alarming.insert(subject.clone(), holder.clone());
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
                correlation_id: reading.correlation_id.clone(),
                event_ts: window.1,
            },
            received_us: reading.received_us,
            quiet,
        });
    }
    let present: HashSet<&Id> = (rows.iter())
        .flat_map(|r| std::iter::once(&r.device_id).chain(r.patient_id.as_ref()))
        .collect();
    let cleared: Vec<Id> = (alarming.keys())
        .filter(|s| !matched.contains(s) && present.contains(s))
        .cloned()
        .collect();
    for subject in cleared {
        let holder = alarming.remove(&subject).expect("alarming subject");
        let reading = rows.last().expect("a window with readings");
        book.signal(Signal {
            cause: Cause::of(rule),
            patient_id: None,
            edge: Edge::Clear,
            trigger: Trigger {
                device_id: holder,
                value: f64::NAN,
                window: Some(window),
                correlation_id: reading.correlation_id.clone(),
                event_ts: window.1,
            },
            received_us: reading.received_us,
            quiet,
        });
    }
}
