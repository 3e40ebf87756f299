//! Threshold rules: a condition on each reading's vital, with an optional delay (`for`) and
//! an optional clear condition (hysteresis).

use super::expr::{Expr, Operand};
use crate::model::{Millis, Vital};

#[derive(Debug, Clone, PartialEq)]
pub struct ThresholdRule {
    pub vital: Vital,
    pub condition: Expr,
    /// `None`: the alarm clears as soon as the condition no longer holds.
    pub clear: Option<Expr>,
    /// The condition must hold this long (event time) before the alarm fires.
    pub for_ms: Millis,
}

/// Where one device stands against one threshold rule.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum ThresholdState {
    #[default]
    Normal,
    /// The condition holds since this event time, not yet for long enough.
    Pending { since: Millis },
    /// The alarm is on until the clear condition holds.
    Alarm,
}

/// What one reading changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// The condition started to hold but must persist (`for`) before the alarm fires.
    Pending,
    /// The alarm fires.
    Raise,
    /// The condition stopped holding before the alarm fired.
    Cancel,
    /// The alarm condition cleared.
    Clear,
}

/// The outcome of evaluating one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    /// The condition held for this reading.
    pub matched: bool,
    pub edge: Option<Edge>,
}

impl ThresholdRule {
    /// Evaluates a reading's value of the rule's vital at event time `ts`.
    pub fn evaluate(&self, state: &mut ThresholdState, value: f64, ts: Millis) -> Evaluation {
        let read = |o: Operand| (o.vital() == self.vital).then_some(value);
        let matched = self.condition.eval(&read);
        let edge = match *state {
            ThresholdState::Alarm => {
                let cleared = match &self.clear {
                    Some(clear) => clear.eval(&read),
                    None => !matched,
                };
                cleared.then(|| {
                    *state = ThresholdState::Normal;
                    Edge::Clear
                })
            }
            ThresholdState::Pending { since } if matched => {
                (ts - since >= self.for_ms).then(|| {
                    *state = ThresholdState::Alarm;
                    Edge::Raise
                })
            }
            ThresholdState::Pending { .. } => {
                *state = ThresholdState::Normal;
                Some(Edge::Cancel)
            }
            ThresholdState::Normal if matched => {
                if self.for_ms == 0 {
                    *state = ThresholdState::Alarm;
                    Some(Edge::Raise)
                } else {
                    *state = ThresholdState::Pending { since: ts };
                    Some(Edge::Pending)
                }
            }
            ThresholdState::Normal => None,
        };
        Evaluation { matched, edge }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::expr::parse;

    fn rule(cond: &str, clear: Option<&str>, for_ms: Millis) -> ThresholdRule {
        ThresholdRule {
            vital: Vital::Hr,
            condition: parse(cond).unwrap(),
            clear: clear.map(|c| parse(c).unwrap()),
            for_ms,
        }
    }

    fn run(rule: &ThresholdRule, readings: &[(Millis, f64)]) -> Vec<Option<Edge>> {
        let mut state = ThresholdState::default();
        readings
            .iter()
            .map(|&(ts, v)| rule.evaluate(&mut state, v, ts).edge)
            .collect()
    }

    #[test]
    fn raises_once_and_clears() {
        let r = rule("hr > 120 or hr < 40", None, 0);
        let edges = run(
            &r,
            &[(0, 80.0), (1, 130.0), (2, 140.0), (3, 90.0), (4, 30.0)],
        );
        assert_eq!(
            edges,
            [
                None,
                Some(Edge::Raise),
                None,
                Some(Edge::Clear),
                Some(Edge::Raise)
            ]
        );
    }

    #[test]
    fn delay_must_be_held() {
        let r = rule("hr > 120", None, 15_000);
        let edges = run(
            &r,
            &[
                (0, 130.0),
                (10_000, 130.0),
                (12_000, 100.0),
                (20_000, 130.0),
                (34_999, 130.0),
                (35_000, 125.0),
            ],
        );
        assert_eq!(
            edges,
            [
                Some(Edge::Pending),
                None,
                Some(Edge::Cancel),
                Some(Edge::Pending),
                None,
                Some(Edge::Raise)
            ]
        );
    }

    #[test]
    fn hysteresis_keeps_the_alarm_until_clear() {
        let r = rule("hr > 120", Some("hr <= 110"), 0);
        let edges = run(&r, &[(0, 121.0), (1, 115.0), (2, 125.0), (3, 110.0)]);
        assert_eq!(edges, [Some(Edge::Raise), None, None, Some(Edge::Clear)]);
    }

    #[test]
    fn matches_count_readings_whose_condition_held() {
        let r = rule("hr > 120", Some("hr <= 110"), 0);
        let mut state = ThresholdState::default();
        let matched: Vec<bool> = [121.0, 115.0, 125.0]
            .iter()
            .map(|&v| r.evaluate(&mut state, v, 0).matched)
            .collect();
        assert_eq!(matched, [true, false, true]);
    }
}
