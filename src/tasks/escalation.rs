//! Escalation: an alert still unacknowledged `after` its raising is escalated — its next
//! level's audience is notified, at a higher message priority — and again every `after`,
//! up to `limit` times. Acknowledging or resolving it stops the escalation. Time is given
//! to [`Escalator::due`], so tests (and replays) drive the clock.

use super::policy::{Channel, queue_for};
use super::publisher::Task;
use crate::alerts::{Alert, AlertEvent, Transition};
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
    alert: Alert,
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
                        alert: event.alert.clone(),
                        raised_at,
                        level: 0,
                    },
                );
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

    /// The escalations due at `now`: for each, the level reached and its tasks.
    pub fn due(&mut self, now: Millis) -> Vec<(String, u32, Vec<Task>)> {
        let step = self.policy.after.as_millis() as Millis;
        let mut out = Vec::new();
        for (id, w) in &mut self.waiting {
            if w.level >= self.policy.limit || now < w.raised_at + step * (w.level as Millis + 1) {
                continue;
            }
            w.level += 1;
            let Some(level) = (self.policy.levels)
                .get(w.level as usize - 1)
                .or(self.policy.levels.last())
            else {
                continue;
            };
            let (exchange, queue, base) = queue_for(level.channel, w.alert.priority);
            let priority = (base + w.level as u8).min(super::topology::MAX_PRIORITY);
            let tasks = (level.to.iter())
                .map(|to| Task {
                    exchange: exchange.into(),
                    queue: queue.into(),
                    priority,
                    correlation_id: w.alert.trigger.correlation_id.to_string(),
                    kind: "notify.escalation".into(),
                    body: json!({
                        "to": to,
                        "alert_id": w.alert.alert_id,
                        "rule_id": w.alert.rule_id,
                        "priority": w.alert.priority,
                        "subject": w.alert.subject,
                        "message": w.alert.message,
                        "raised_at": w.raised_at,
                        "escalation": w.level,
                        "unacknowledged_ms": now - w.raised_at,
                    }),
                })
                .collect();
            out.push((id.clone(), w.level, tasks));
        }
        out
    }
}
