//! Window rules: aggregates of one vital over tumbling or sliding event-time windows,
//! aligned to the epoch, per device.
//!
//! A window `[start, start + size)` starts at every multiple of `slide`. Readings are kept
//! in panes of length `slide` (one pane per window for tumbling windows, `size / slide`
//! per window for sliding ones), so a reading is added once however many windows hold it.
//! A window is evaluated once, when the watermark passes its end (or its device goes idle),
//! and only if it holds at least one value of the vital.

use super::expr::{Agg, Expr, Operand};
use super::threshold::Edge;
use crate::model::{CorrelationId, Millis, Vital};
use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq)]
pub struct WindowRule {
    pub vital: Vital,
    pub condition: Expr,
    pub clear: Option<Expr>,
    /// Window length, ms.
    pub size: Millis,
    /// Advance between windows, ms; divides `size`.
    pub slide: Millis,
}

/// The aggregates of the values in one pane (or, merged, in one window).
#[derive(Debug, Clone)]
struct Aggregate {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first: (Millis, f64),
    last: (Millis, f64),
}

impl Aggregate {
    fn new(ts: Millis, v: f64) -> Self {
        Aggregate {
            count: 1,
            sum: v,
            min: v,
            max: v,
            first: (ts, v),
            last: (ts, v),
        }
    }

    fn add(&mut self, ts: Millis, v: f64) {
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        // Ties keep the earliest arrival as first and the latest as last.
        if ts < self.first.0 {
            self.first = (ts, v);
        }
        if ts >= self.last.0 {
            self.last = (ts, v);
        }
    }

    fn merge(&mut self, other: &Aggregate) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.first.0 < self.first.0 {
            self.first = other.first;
        }
        if other.last.0 >= self.last.0 {
            self.last = other.last;
        }
    }

    fn get(&self, agg: Agg) -> f64 {
        match agg {
            Agg::Avg => self.sum / self.count as f64,
            Agg::Min => self.min,
            Agg::Max => self.max,
            Agg::Count => self.count as f64,
            Agg::Sum => self.sum,
            Agg::Delta => self.last.1 - self.first.1,
        }
    }
}

#[derive(Debug, Clone)]
struct Pane {
    start: Millis,
    agg: Aggregate,
    /// The latest reading to arrive in this pane: it is what an alert points back to.
    correlation_id: CorrelationId,
    received_us: i64,
}

impl Pane {
    fn add(&mut self, ts: Millis, value: f64, correlation_id: &CorrelationId, received_us: i64) {
        self.agg.add(ts, value);
        self.correlation_id.clone_from(correlation_id);
        self.received_us = received_us;
    }
}

/// One device's state for one window rule.
#[derive(Debug, Clone, Default)]
pub struct WindowState {
    /// Non-empty panes, ordered by start.
    panes: VecDeque<Pane>,
    /// Every window ending at or before this has been evaluated.
    evaluated_through: Millis,
    /// The alarm is on (for edges).
    alarm: bool,
}

/// The outcome of one closed window.
#[derive(Debug, Clone)]
pub struct WindowOutcome {
    pub start: Millis,
    pub end: Millis,
    pub matched: bool,
    pub edge: Option<Edge>,
    /// The first aggregate the condition reads, for the alert's `value`.
    pub value: f64,
    pub correlation_id: CorrelationId,
    pub received_us: i64,
}

impl WindowState {
    pub fn new() -> Self {
        WindowState {
            panes: VecDeque::new(),
            evaluated_through: Millis::MIN,
            alarm: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.panes.is_empty()
    }

    /// Starts loading the newest pane, which the next in-order reading updates.
    pub fn prefetch(&self) {
        if let Some(pane) = self.panes.back() {
            crate::engine::prefetch(pane);
        }
    }

    /// Whether this device's alarm for the rule is on.
    pub fn alarm(&self) -> bool {
        self.alarm
    }

    /// The earliest window end that still needs evaluating, if any.
    pub fn next_end(&self, rule: &WindowRule) -> Option<Millis> {
        let first = self.panes.front()?;
        Some((first.start + rule.slide).max(self.evaluated_through.saturating_add(rule.slide)))
    }
}

impl WindowRule {
    fn pane_start(&self, ts: Millis) -> Millis {
        ts.div_euclid(self.slide) * self.slide
    }

    /// Adds a value at event time `ts`. Returns false when every window that would hold it
    /// has already been evaluated (its device went idle and came back late).
    pub fn add(
        &self,
        state: &mut WindowState,
        ts: Millis,
        value: f64,
        correlation_id: &CorrelationId,
        received_us: i64,
    ) -> bool {
        let start = self.pane_start(ts);
        // The last window holding this pane ends at start + size.
        if start + self.size <= state.evaluated_through {
            return false;
        }
        // Readings mostly arrive in order: the newest pane is checked before searching.
        let at = match state.panes.back() {
            None => 0,
            Some(back) if back.start < start => state.panes.len(),
            Some(back) if back.start == start => state.panes.len() - 1,
            Some(_) => state.panes.partition_point(|p| p.start < start),
        };
        match state.panes.get_mut(at) {
            Some(pane) if pane.start == start => pane.add(ts, value, correlation_id, received_us),
            _ => state.panes.insert(
                at,
                Pane {
                    start,
                    agg: Aggregate::new(ts, value),
                    correlation_id: correlation_id.clone(),
                    received_us,
                },
            ),
        }
        true
    }

    /// Evaluates every window ending at or before `watermark` that holds data, in order,
    /// and drops panes no open window needs.
    pub fn close(&self, state: &mut WindowState, watermark: Millis, out: &mut Vec<WindowOutcome>) {
        // The last window end we may evaluate: aligned, and not beyond the last pane's reach.
        let Some(last) = state.panes.back() else {
            return;
        };
        let limit = watermark
            .div_euclid(self.slide)
            .saturating_mul(self.slide)
            .min(last.start + self.size);
        let Some(mut end) = state.next_end(self) else {
            return;
        };
        while end <= limit {
            let start = end - self.size;
            let mut panes = state
                .panes
                .iter()
                .filter(|p| p.start >= start && p.start < end);
            match panes.next() {
                Some(first) => {
                    let mut agg = first.agg.clone();
                    let mut newest = first;
                    for p in panes {
                        agg.merge(&p.agg);
                        if p.received_us >= newest.received_us {
                            newest = p;
                        }
                    }
                    out.push(self.judge(&mut state.alarm, start, end, &agg, newest));
                    end += self.slide;
                }
                None => {
                    // A gap: skip to the first window holding the next pane.
                    match state.panes.iter().find(|p| p.start >= end) {
                        Some(p) => end = p.start + self.slide,
                        None => break,
                    }
                }
            }
        }
        state.evaluated_through = state.evaluated_through.max(limit);
        let through = state.evaluated_through;
        while state
            .panes
            .front()
            .is_some_and(|p| p.start + self.size <= through)
        {
            state.panes.pop_front();
        }
    }

    fn judge(
        &self,
        alarm: &mut bool,
        start: Millis,
        end: Millis,
        agg: &Aggregate,
        newest: &Pane,
    ) -> WindowOutcome {
        let read = |o: Operand| match o {
            Operand::Agg(a, v) if v == self.vital => Some(agg.get(a)),
            _ => None,
        };
        let matched = self.condition.eval(&read);
        let edge = if *alarm {
            let cleared = match &self.clear {
                Some(clear) => clear.eval(&read),
                None => !matched,
            };
            cleared.then(|| {
                *alarm = false;
                Edge::Clear
            })
        } else {
            matched.then(|| {
                *alarm = true;
                Edge::Raise
            })
        };
        let value = read(self.condition.first_operand()).unwrap_or(f64::NAN);
        WindowOutcome {
            start,
            end,
            matched,
            edge,
            value,
            correlation_id: newest.correlation_id.clone(),
            received_us: newest.received_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::expr::parse;

    fn rule(cond: &str, size: Millis, slide: Millis) -> WindowRule {
        WindowRule {
            vital: Vital::Temp,
            condition: parse(cond).unwrap(),
            clear: None,
            size,
            slide,
        }
    }

    fn feed(
        rule: &WindowRule,
        readings: &[(Millis, f64)],
        watermark: Millis,
    ) -> Vec<WindowOutcome> {
        let mut state = WindowState::new();
        for &(ts, v) in readings {
            assert!(rule.add(&mut state, ts, v, &CorrelationId::Generated(ts as u64), 0));
        }
        let mut out = Vec::new();
        rule.close(&mut state, watermark, &mut out);
        out
    }

    fn bounds(out: &[WindowOutcome]) -> Vec<(Millis, Millis)> {
        out.iter().map(|o| (o.start, o.end)).collect()
    }

    #[test]
    fn tumbling_windows_align_to_the_epoch() {
        let r = rule("count(temp) > 0", 10_000, 10_000);
        let out = feed(
            &r,
            &[(9_999, 37.0), (10_000, 37.0), (25_000, 37.0)],
            i64::MAX,
        );
        assert_eq!(
            bounds(&out),
            [(0, 10_000), (10_000, 20_000), (20_000, 30_000)]
        );
        assert!(out.iter().all(|o| o.matched));
    }

    #[test]
    fn a_reading_belongs_to_every_sliding_window_that_holds_it() {
        let r = rule("count(temp) > 0", 60_000, 10_000);
        let out = feed(&r, &[(59_999, 37.0)], i64::MAX);
        assert_eq!(
            bounds(&out),
            [
                (0, 60_000),
                (10_000, 70_000),
                (20_000, 80_000),
                (30_000, 90_000),
                (40_000, 100_000),
                (50_000, 110_000)
            ]
        );
        let out = feed(&r, &[(60_000, 37.0)], i64::MAX);
        assert_eq!(out.first().map(|o| o.start), Some(10_000));
        assert_eq!(out.len(), 6);
    }

    #[test]
    fn windows_close_only_when_the_watermark_passes_their_end() {
        let r = rule("max(temp) > 39", 60_000, 10_000);
        let mut state = WindowState::new();
        let c = CorrelationId::Generated(1);
        r.add(&mut state, 5_000, 39.5, &c, 0);
        let mut out = Vec::new();
        r.close(&mut state, 9_999, &mut out);
        assert!(out.is_empty());
        r.close(&mut state, 10_000, &mut out);
        assert_eq!(bounds(&out), [(-50_000, 10_000)]);
        r.close(&mut state, 35_000, &mut out);
        assert_eq!(out.len(), 3);
        // Only the first window raises; the others keep the alarm.
        assert_eq!(
            out.iter().filter(|o| o.edge == Some(Edge::Raise)).count(),
            1
        );
        r.close(&mut state, i64::MAX, &mut out);
        assert_eq!(out.len(), 6);
        assert!(state.is_empty());
    }

    #[test]
    fn aggregates() {
        let readings = [(3_000, 38.0), (1_000, 36.0), (2_000, 40.0)];
        let value = |cond: &str| feed(&rule(cond, 10_000, 10_000), &readings, i64::MAX)[0].value;
        assert_eq!(value("avg(temp) > 0"), 38.0);
        assert_eq!(value("min(temp) > 0"), 36.0);
        assert_eq!(value("max(temp) > 0"), 40.0);
        assert_eq!(value("count(temp) > 0"), 3.0);
        assert_eq!(value("sum(temp) > 0"), 114.0);
        // delta is last minus first by event time, not arrival
        assert_eq!(value("delta(temp) > 0"), 2.0);
    }

    #[test]
    fn gaps_skip_empty_windows() {
        let r = rule("count(temp) > 0", 20_000, 10_000);
        let out = feed(&r, &[(0, 37.0), (1_000_000, 37.0)], i64::MAX);
        assert_eq!(
            bounds(&out),
            [
                (-10_000, 10_000),
                (0, 20_000),
                (990_000, 1_010_000),
                (1_000_000, 1_020_000)
            ]
        );
    }

    #[test]
    fn readings_for_evaluated_windows_are_refused() {
        let r = rule("count(temp) > 0", 10_000, 10_000);
        let mut state = WindowState::new();
        let c = CorrelationId::Generated(1);
        r.add(&mut state, 5_000, 37.0, &c, 0);
        r.close(&mut state, 10_000, &mut Vec::new());
        assert!(!r.add(&mut state, 9_000, 37.0, &c, 0));
        assert!(r.add(&mut state, 10_000, 37.0, &c, 0));
    }

    #[test]
    fn clear_resolves_after_a_normal_window() {
        let r = rule("avg(temp) > 39", 10_000, 10_000);
        let out = feed(&r, &[(0, 39.5), (10_000, 39.6), (20_000, 37.0)], i64::MAX);
        let edges: Vec<_> = out.iter().map(|o| o.edge).collect();
        assert_eq!(edges, [Some(Edge::Raise), None, Some(Edge::Clear)]);
    }
}
