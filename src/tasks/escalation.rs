//! Escalation: an alert still unacknowledged `after` its raising is escalated — the alert
//! book moves it to `escalated` and its next level's audience is notified, at a higher
//! message priority — and again every `after`, up to `limit` times. Acknowledging or
//! resolving it stops the escalation. Time is given to [`Escalator::due`], so tests (and
//! replays) drive the clock.

use super::policy::{Channel, notification, queue_for};
use super::publisher::Task;
use super::topology::MAX_PRIORITY;
use crate::alerts::{AlertEvent, Transition};
use crate::model::Millis;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// The `[escalation]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Escalation {
    /// How long an alert may stay unacknowledged before each escalation.
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    /// At most this many escalations per alert.
    pub limit: u32,
    /// Who each level adds: level 1 is the first; levels past the last reuse the last.
    #[serde(rename = "level")]
    pub levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Level {
    pub channel: Channel,
    pub to: Vec<String>,
}

/// An alert waiting for acknowledgement.
struct Waiting {
    raised_at: Millis,
    level: u32,
}

/// Follows alert transitions and says which escalations are due.
pub struct Escalator {
    policy: Escalation,
    /// By alert id, in id order (so escalations come out in a stable order).
    waiting: BTreeMap<String, Waiting>,
}

impl Escalator {
    pub fn new(policy: Escalation) -> Escalator {
        Escalator {
            policy,
            waiting: BTreeMap::new(),
        }
    }

    /// Notes a transition: a raised alert starts waiting; acknowledged or resolved, it stops.
    pub fn observe(&mut self, event: &AlertEvent) {
        let id = &event.alert.alert_id;
        match event.event {
            Transition::Raised => {
                let raised_at = event.alert.raised_at.unwrap_or(event.at);
                self.waiting.insert(
                    id.clone(),
                    Waiting {
                        raised_at,
                        level: 0,
                    },
                );
            }
            Transition::Escalated => {
                if let Some(w) = self.waiting.get_mut(id) {
                    w.level = w.level.max(event.alert.escalation);
                }
            }
            Transition::Acknowledged | Transition::Resolved => {
                self.waiting.remove(id);
            }
        }
    }

    /// Alerts waiting for acknowledgement.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The escalations due at `now`: each alert id with the level it reaches. Each level is
    /// due once; the alert book then records it and the notifier sends its tasks.
    pub fn due(&mut self, now: Millis) -> Vec<(String, u32)> {
        let step = self.policy.after.as_millis() as Millis;
        let mut out = Vec::new();
        for (id, w) in &mut self.waiting {
            if w.level >= self.policy.limit || now < w.raised_at + step * (w.level as Millis + 1) {
                continue;
            }
            w.level += 1;
            out.push((id.clone(), w.level));
        }
        out
    }
}

impl Escalation {
    /// The tasks of an `escalated` transition: its level's audience, on the queue the alert's
    /// priority calls for, one message priority higher per level.
    pub fn tasks_for(&self, event: &AlertEvent) -> Vec<Task> {
        let alert = &event.alert;
        if event.event != Transition::Escalated || alert.escalation == 0 {
            return Vec::new();
        }
        let Some(level) = (self.levels.get(alert.escalation as usize - 1)).or(self.levels.last())
        else {
            return Vec::new();
        };
        let (_, _, base) = queue_for(level.channel, alert.priority);
        let priority = (base as u32 + alert.escalation).min(MAX_PRIORITY as u32) as u8;
        let unacknowledged_ms = event.at - alert.raised_at.unwrap_or(event.at);
        (level.to.iter())
            .map(|to| {
                let mut task =
                    notification(alert, level.channel, to, priority, "notify.escalation");
                task.body["unacknowledged_ms"] = json!(unacknowledged_ms);
                task
            })
            .collect()
    }
}
