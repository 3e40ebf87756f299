//! The alert lifecycle, per (rule, patient) — or (rule, device) when the device has no
//! patient: pending → firing → (escalated) → acknowledged → resolved. A firing alert left
//! unacknowledged is escalated, level by level, by the notifier's clock.
//!
//! Shards send [`Signal`]s: edges of a rule's condition for one device. The book turns them
//! into at most one active alert per key, however long the condition persists and however many
//! devices of the patient report it, and emits an [`AlertEvent`] for each transition.
//! Clinicians (REST, socket.io) acknowledge and resolve through the same book.

use crate::metrics::Metrics;
use crate::model::{CorrelationId, Id, Millis, now_micros, now_millis};
use crate::rules::threshold::Edge;
use crate::rules::{Priority, Rule};
use crossbeam_channel::Sender;
use dashmap::DashMap;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The condition holds but has not yet held for the rule's delay.
    Pending,
    Firing,
    /// Firing and left unacknowledged past the escalation policy's delay.
    Escalated,
    Acknowledged,
    Resolved,
}

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    Raised,
    Escalated,
    Acknowledged,
    Resolved,
}

// The same names the JSON outputs use (`#[serde(rename_all = "lowercase")]`), for the
// outputs that are not JSON (Parquet, SQL, query filters).

impl AlertState {
    pub const fn name(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
            AlertState::Escalated => "escalated",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Resolved => "resolved",
        }
    }
}

impl Transition {
    pub const fn name(self) -> &'static str {
        match self {
            Transition::Raised => "raised",
            Transition::Escalated => "escalated",
            Transition::Acknowledged => "acknowledged",
            Transition::Resolved => "resolved",
        }
    }
}

/// One alert, as clinicians and other services see it.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub alert_id: String,
    pub rule_id: Arc<str>,
    pub priority: Priority,
    pub message: Arc<str>,
    pub state: AlertState,
    /// The patient, or the device when the device has no patient.
    pub subject: Id,
    pub patient_id: Option<Id>,
    #[serde(flatten)]
    pub trigger: Trigger,
    pub pending_at: Option<Millis>,
    pub raised_at: Option<Millis>,
    /// How many times it was escalated (0: never), and when last.
    pub escalation: u32,
    pub escalated_at: Option<Millis>,
    pub acknowledged_at: Option<Millis>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<Millis>,
    /// Who resolved it; `None` when the condition cleared by itself.
    pub resolved_by: Option<String>,
    /// Devices whose condition currently holds.
    #[serde(skip)]
    holding: Vec<Id>,
}

/// What set an alert off: the reading (threshold rules) or window (window rules).
#[derive(Debug, Clone, Serialize)]
pub struct Trigger {
    pub device_id: Id,
    /// The vital's value, or the window's aggregate.
    pub value: f64,
    /// The window `[start, end)` for window rules.
    pub window: Option<(Millis, Millis)>,
    /// The reading that caused the alert.
    pub correlation_id: CorrelationId,
    /// Event time of the reading (threshold) or the window's end (window).
    pub event_ts: Millis,
}

/// One lifecycle transition, as written to the alert outputs.
#[derive(Debug, Clone, Serialize)]
pub struct AlertEvent {
    pub event: Transition,
    /// Wall-clock time of the transition, ms.
    pub at: Millis,
    #[serde(flatten)]
    pub alert: Alert,
}

/// What an alert is about: a rule's condition, or a technical condition a device reports
/// about itself (lead off, low battery, offline).
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// A rule id, or `device.<code>` for a device's technical alert.
    pub id: Arc<str>,
    pub priority: Priority,
    pub message: Arc<str>,
}

impl Cause {
    pub fn of(rule: &Rule) -> Cause {
        Cause {
            id: rule.id.clone(),
            priority: rule.priority,
            message: rule.message.clone(),
        }
    }
}

/// An edge of one cause's condition for one device.
#[derive(Debug, Clone)]
pub struct Signal {
    pub cause: Cause,
    pub patient_id: Option<Id>,
    pub edge: Edge,
    pub trigger: Trigger,
    /// When the triggering reading was received, µs since the epoch.
    pub received_us: i64,
    /// State being rebuilt from readings another node already evaluated: the book follows
    /// the edge but announces nothing (that node did).
    pub quiet: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AlertKey {
    rule_id: Arc<str>,
    subject: Id,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    #[error("no active alert with id {0}")]
    NotFound(String),
    #[error("alert {0} is pending: there is nothing to acknowledge yet")]
    NotFiring(String),
    #[error("alert {0} cannot be resolved while its condition still holds; acknowledge it instead")]
    ConditionActive(String),
}

/// Active alerts, readable from any thread.
pub struct AlertBook {
    active: DashMap<AlertKey, Alert>,
    by_id: DashMap<String, AlertKey>,
    /// (rule, device) → the alert that device's condition holds.
    holders: DashMap<(Arc<str>, Id), AlertKey>,
    out: Sender<AlertEvent>,
    /// The live push (socket.io, the page): each transition goes onto it from the thread
    /// that made it, ahead of `out`, without waiting for the alert sink's thread to wake.
    live: Option<crate::api::AlertBus>,
    metrics: Arc<Metrics>,
}

impl AlertBook {
    /// Transitions are sent on `out`; a full queue blocks, alerts are never dropped.
    pub fn new(out: Sender<AlertEvent>, metrics: Arc<Metrics>) -> Self {
        AlertBook {
            active: DashMap::new(),
            by_id: DashMap::new(),
            holders: DashMap::new(),
            out,
            live: None,
            metrics,
        }
    }

    /// Also puts every transition on `live` as it happens.
    pub fn with_live(mut self, live: Option<crate::api::AlertBus>) -> Self {
        self.live = live;
        self
    }

    fn emit(&self, event: Transition, alert: &Alert) {
        self.metrics.alert_events.fetch_add(1, Relaxed);
        let counters = self.metrics.rule(&alert.rule_id);
        match event {
            Transition::Raised => counters.alerts_raised.fetch_add(1, Relaxed),
            Transition::Resolved => counters.alerts_resolved.fetch_add(1, Relaxed),
            Transition::Escalated | Transition::Acknowledged => 0,
        };
        let event = AlertEvent {
            event,
            at: now_millis(),
            alert: alert.clone(),
        };
        // People first. No receiver (no client connected) is not an error.
        if let Some(live) = &self.live {
            let _ = live.send(Arc::new(event.clone()));
        }
        if self.out.send(event).is_err() {
            tracing::error!(alert_id = %alert.alert_id, "alert output is closed; transition not delivered");
        }
    }

    /// Applies one edge from a shard.
    pub fn signal(&self, s: Signal) {
        let device = s.trigger.device_id.clone();
        let holder = (s.cause.id.clone(), device.clone());
        let now = now_millis();
        match s.edge {
            Edge::Pending | Edge::Raise => {
                let subject = s.patient_id.clone().unwrap_or_else(|| device.clone());
                let key = AlertKey {
                    rule_id: s.cause.id.clone(),
                    subject: subject.clone(),
                };
                // A device whose patient changed while its condition held lets go of the
                // old patient's alert.
                if let Some(previous) = self.holders.insert(holder, key.clone())
                    && previous != key
                {
                    self.release(&previous, &device, now);
                }
                let mut entry = self.active.entry(key.clone()).or_insert_with(|| {
                    let alert_id = alert_id(&key, s.trigger.event_ts);
                    self.by_id.insert(alert_id.clone(), key);
                    Alert {
                        alert_id,
                        rule_id: s.cause.id.clone(),
                        priority: s.cause.priority,
                        message: s.cause.message.clone(),
                        state: AlertState::Pending,
                        subject,
                        patient_id: s.patient_id.clone(),
                        trigger: s.trigger.clone(),
                        pending_at: Some(now),
                        raised_at: None,
                        escalation: 0,
                        escalated_at: None,
                        acknowledged_at: None,
                        acknowledged_by: None,
                        resolved_at: None,
                        resolved_by: None,
                        holding: Vec::new(),
                    }
                });
                let alert = entry.value_mut();
                if !alert.holding.contains(&device) {
                    alert.holding.push(device);
                }
                if s.edge == Edge::Raise && alert.state == AlertState::Pending {
                    alert.state = AlertState::Firing;
                    alert.raised_at = Some(now);
                    alert.trigger = s.trigger;
                    if s.quiet {
                        return;
                    }
                    self.metrics
                        .record_alert_latency(now_micros() - s.received_us);
                    tracing::info!(
                        alert_id = %alert.alert_id, rule = %alert.rule_id, subject = %alert.subject,
                        correlation_id = %alert.trigger.correlation_id, value = alert.trigger.value, "alert raised"
                    );
                    self.emit(Transition::Raised, alert);
                }
            }
            Edge::Cancel | Edge::Clear => {
                // The alert the device holds, whatever its patient is now.
                if let Some((_, key)) = self.holders.remove(&holder) {
                    if s.quiet {
                        self.hand_over_key(&key, &device);
                    } else {
                        self.release(&key, &device, now);
                    }
                }
            }
        }
    }

    /// A device's condition stopped holding (or its state was evicted).
    fn release(&self, key: &AlertKey, device: &Id, now: Millis) {
        let Some(mut entry) = self.active.get_mut(key) else {
            return;
        };
        let alert = entry.value_mut();
        alert.holding.retain(|d| d != device);
        if !alert.holding.is_empty() {
            return;
        }
        let was_firing = alert.state != AlertState::Pending;
        if was_firing {
            alert.state = AlertState::Resolved;
            alert.resolved_at = Some(now);
            tracing::info!(alert_id = %alert.alert_id, rule = %alert.rule_id, subject = %alert.subject,
                correlation_id = %alert.trigger.correlation_id, "alert resolved: condition cleared");
            self.emit(Transition::Resolved, alert);
        }
        let id = alert.alert_id.clone();
        drop(entry);
        self.active.remove(key);
        self.by_id.remove(&id);
    }

    /// Forgets a device whose state was evicted: a pending alert it alone held goes away; a
    /// firing one stays until someone resolves it, which is then allowed.
    pub fn forget_device(&self, rule_id: &Arc<str>, device: &Id) {
        let Some((_, key)) = self.holders.remove(&(rule_id.clone(), device.clone())) else {
            return;
        };
        let Some(mut entry) = self.active.get_mut(&key) else {
            return;
        };
        entry.holding.retain(|d| d != device);
        if entry.holding.is_empty() && entry.state == AlertState::Pending {
            let id = entry.alert_id.clone();
            drop(entry);
            self.active.remove(&key);
            self.by_id.remove(&id);
        }
    }

    /// Lets go of a device another node now evaluates (its Kafka partition moved): its
    /// alerts leave this book without a transition, since the condition has not changed;
    /// the other node rebuilds them from the same readings.
    pub fn hand_over(&self, rule_id: &Arc<str>, device: &Id) {
        if let Some((_, key)) = self.holders.remove(&(rule_id.clone(), device.clone())) {
            self.hand_over_key(&key, device);
        }
    }

    fn hand_over_key(&self, key: &AlertKey, device: &Id) {
        let Some(mut entry) = self.active.get_mut(key) else {
            return;
        };
        entry.holding.retain(|d| d != device);
        if entry.holding.is_empty() {
            let id = entry.alert_id.clone();
            drop(entry);
            self.active.remove(key);
            self.by_id.remove(&id);
        }
    }

    /// The active alert with this id, locked for update.
    fn find(
        &self,
        alert_id: &str,
    ) -> Result<(AlertKey, dashmap::mapref::one::RefMut<'_, AlertKey, Alert>), LifecycleError> {
        let not_found = || LifecycleError::NotFound(alert_id.to_string());
        let key = self
            .by_id
            .get(alert_id)
            .map(|k| k.clone())
            .ok_or_else(not_found)?;
        let entry = self.active.get_mut(&key).ok_or_else(not_found)?;
        Ok((key, entry))
    }

    /// A clinician acknowledges a firing alert. Acknowledging twice is harmless.
    pub fn acknowledge(&self, alert_id: &str, by: &str) -> Result<Alert, LifecycleError> {
        let (_, mut entry) = self.find(alert_id)?;
        let alert = entry.value_mut();
        match alert.state {
            AlertState::Pending => return Err(LifecycleError::NotFiring(alert_id.to_string())),
            AlertState::Firing | AlertState::Escalated => {
                alert.state = AlertState::Acknowledged;
                alert.acknowledged_at = Some(now_millis());
                alert.acknowledged_by = Some(by.to_string());
                tracing::info!(alert_id, by, correlation_id = %alert.trigger.correlation_id, "alert acknowledged");
                self.emit(Transition::Acknowledged, alert);
            }
            AlertState::Acknowledged | AlertState::Resolved => {}
        }
        Ok(alert.clone())
    }

    /// Escalates a firing alert left unacknowledged to `level` (the notifier's clock says
    /// when). Returns `None`, changing nothing, when it was acknowledged or resolved meanwhile
    /// or is already at that level.
    pub fn escalate(&self, alert_id: &str, level: u32) -> Option<Alert> {
        let (_, mut entry) = self.find(alert_id).ok()?;
        let alert = entry.value_mut();
        let waiting = matches!(alert.state, AlertState::Firing | AlertState::Escalated);
        if !waiting || level <= alert.escalation {
            return None;
        }
        alert.state = AlertState::Escalated;
        alert.escalation = level;
        alert.escalated_at = Some(now_millis());
        tracing::warn!(alert_id, level, correlation_id = %alert.trigger.correlation_id, "alert unacknowledged: escalated");
        self.emit(Transition::Escalated, alert);
        Some(alert.clone())
    }

    /// Resolves an alert by hand; refused while its condition still holds, so a resolved
    /// alarm cannot hide a live one.
    pub fn resolve(&self, alert_id: &str, by: &str) -> Result<Alert, LifecycleError> {
        let (key, mut entry) = self.find(alert_id)?;
        let alert = entry.value_mut();
        if !alert.holding.is_empty() {
            return Err(LifecycleError::ConditionActive(alert_id.to_string()));
        }
        alert.state = AlertState::Resolved;
        alert.resolved_at = Some(now_millis());
        alert.resolved_by = Some(by.to_string());
        tracing::info!(alert_id, by, correlation_id = %alert.trigger.correlation_id, "alert resolved by hand");
        self.emit(Transition::Resolved, alert);
        let resolved = alert.clone();
        drop(entry);
        self.active.remove(&key);
        self.by_id.remove(alert_id);
        Ok(resolved)
    }

    /// Resolves every alert of a rule that was removed from the rule set, or whose
    /// definition changed (`why` says which; it is recorded as `resolved_by`).
    pub fn retire_rule(&self, rule_id: &str, why: &str) {
        self.holders.retain(|(rule, _), _| &**rule != rule_id);
        let keys: Vec<AlertKey> = self
            .active
            .iter()
            .filter(|e| &*e.key().rule_id == rule_id)
            .map(|e| e.key().clone())
            .collect();
        for key in keys {
            if let Some((_, mut alert)) = self.active.remove(&key) {
                self.by_id.remove(&alert.alert_id);
                if alert.state != AlertState::Pending {
                    alert.state = AlertState::Resolved;
                    alert.resolved_at = Some(now_millis());
                    alert.resolved_by = Some(why.into());
                    self.emit(Transition::Resolved, &alert);
                }
            }
        }
    }

    /// Every active alert (pending, firing, escalated or acknowledged).
    pub fn active(&self) -> Vec<Alert> {
        let mut all: Vec<Alert> = self.active.iter().map(|e| e.value().clone()).collect();
        all.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.pending_at.cmp(&b.pending_at))
        });
        all
    }

    pub fn get(&self, alert_id: &str) -> Option<Alert> {
        let key = self.by_id.get(alert_id)?.clone();
        self.active.get(&key).map(|a| a.clone())
    }
}

/// An alert's id follows from what raised it — the rule, the subject and the event time of
/// the first reading (or window) that met the condition — so replaying a stream gives its
/// alerts the same ids and storage does not count them twice.
fn alert_id(key: &AlertKey, event_ts: Millis) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    key.rule_id.hash(&mut h);
    key.subject.as_str().hash(&mut h);
    event_ts.hash(&mut h);
    format!("alr-{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::parse_pipeline;

    fn setup() -> (
        AlertBook,
        crossbeam_channel::Receiver<AlertEvent>,
        Arc<Rule>,
    ) {
        let (tx, rx) = crossbeam_channel::bounded(64);
        let set = parse_pipeline(
            "[[rule]]\nid='hr_high'\nkind='threshold'\npriority='high'\nmessage='HR high'\ncondition='hr > 120'\n",
        )
        .unwrap();
        (AlertBook::new(tx, Arc::default()), rx, set.rules[0].clone())
    }

    fn signal(rule: &Arc<Rule>, device: &str, patient: Option<&str>, edge: Edge) -> Signal {
        Signal {
            cause: Cause::of(rule),
            patient_id: patient.map(Into::into),
            edge,
            trigger: Trigger {
                device_id: device.into(),
                value: 130.0,
                window: None,
                correlation_id: CorrelationId::Given("c-1".into()),
                event_ts: 1,
            },
            received_us: now_micros(),
            quiet: false,
        }
    }

    fn events(rx: &crossbeam_channel::Receiver<AlertEvent>) -> Vec<Transition> {
        rx.try_iter().map(|e| e.event).collect()
    }

    #[test]
    fn full_lifecycle() {
        let (book, rx, rule) = setup();
        book.signal(signal(&rule, "d1", Some("p1"), Edge::Pending));
        assert_eq!(book.active()[0].state, AlertState::Pending);
        assert!(events(&rx).is_empty(), "pending emits nothing");
        let id = book.active()[0].alert_id.clone();
        assert_eq!(
            book.acknowledge(&id, "nurse").unwrap_err(),
            LifecycleError::NotFiring(id.clone())
        );
        book.signal(signal(&rule, "d1", Some("p1"), Edge::Raise));
        assert_eq!(book.get(&id).unwrap().state, AlertState::Firing);
        let acked = book.acknowledge(&id, "nurse").unwrap();
        assert_eq!(acked.state, AlertState::Acknowledged);
        assert_eq!(acked.acknowledged_by.as_deref(), Some("nurse"));
        book.acknowledge(&id, "nurse").unwrap();
        book.signal(signal(&rule, "d1", Some("p1"), Edge::Clear));
        assert!(book.active().is_empty());
        assert_eq!(
            events(&rx),
            [
                Transition::Raised,
                Transition::Acknowledged,
                Transition::Resolved
            ]
        );
    }

    #[test]
    fn the_live_bus_gets_every_transition_the_output_gets() {
        let (book, rx, rule) = setup();
        let (bus, mut live) = tokio::sync::broadcast::channel(16);
        let book = book.with_live(Some(bus));
        book.signal(signal(&rule, "d1", Some("p1"), Edge::Raise));
        book.signal(signal(&rule, "d1", Some("p1"), Edge::Clear));
        let pushed: Vec<_> = std::iter::from_fn(|| live.try_recv().ok())
            .map(|e| (e.event, e.alert.alert_id.clone()))
            .collect();
        let written: Vec<_> = (rx.try_iter())
            .map(|e| (e.event, e.alert.alert_id.clone()))
            .collect();
        assert_eq!(pushed.len(), 2);
        assert_eq!(pushed, written);
    }

    #[test]
    fn one_alert_per_patient_across_devices() {
        let (book, rx, rule) = setup();
        book.signal(signal(&rule, "monitor", Some("p1"), Edge::Raise));
        book.signal(signal(&rule, "wearable", Some("p1"), Edge::Raise));
        assert_eq!(book.active().len(), 1);
        book.signal(signal(&rule, "monitor", Some("p1"), Edge::Clear));
        assert_eq!(book.active().len(), 1, "still held by the wearable");
        book.signal(signal(&rule, "wearable", Some("p1"), Edge::Clear));
        assert!(book.active().is_empty());
        assert_eq!(events(&rx), [Transition::Raised, Transition::Resolved]);
    }

    #[test]
    fn unassigned_devices_are_their_own_subject() {
        let (book, _rx, rule) = setup();
        book.signal(signal(&rule, "d1", None, Edge::Raise));
        book.signal(signal(&rule, "d2", None, Edge::Raise));
        assert_eq!(book.active().len(), 2);
        assert_eq!(book.active()[0].subject, book.active()[0].trigger.device_id);
    }

    #[test]
    fn resolve_is_refused_while_the_condition_holds() {
        let (book, rx, rule) = setup();
        book.signal(signal(&rule, "d1", Some("p1"), Edge::Raise));
        let id = book.active()[0].alert_id.clone();
        assert_eq!(
            book.resolve(&id, "dr").unwrap_err(),
            LifecycleError::ConditionActive(id.clone())
        );
        book.forget_device(&rule.id, &"d1".into());
        let resolved = book.resolve(&id, "dr").unwrap();
        assert_eq!(resolved.resolved_by.as_deref(), Some("dr"));
        assert_eq!(
            book.resolve(&id, "dr").unwrap_err(),
            LifecycleError::NotFound(id)
        );
        assert_eq!(events(&rx), [Transition::Raised, Transition::Resolved]);
    }

    #[test]
    fn a_device_moved_to_another_patient_releases_the_old_alert() {
        let (book, rx, rule) = setup();
        book.signal(signal(&rule, "d1", None, Edge::Raise));
        // The device is assigned to a patient while its condition still holds.
        book.signal(signal(&rule, "d1", Some("p1"), Edge::Raise));
        let active = book.active();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].subject, "p1");
        // The clear reaches the alert the device holds now, whatever the signal says.
        book.signal(signal(&rule, "d1", None, Edge::Clear));
        assert!(book.active().is_empty());
        assert_eq!(
            events(&rx),
            [
                Transition::Raised,
                Transition::Resolved,
                Transition::Raised,
                Transition::Resolved
            ]
        );
    }

    #[test]
    fn a_cancelled_pending_alert_leaves_no_trace() {
        let (book, rx, rule) = setup();
        book.signal(signal(&rule, "d1", None, Edge::Pending));
        book.signal(signal(&rule, "d1", None, Edge::Cancel));
        assert!(book.active().is_empty());
        assert!(events(&rx).is_empty());
    }

    #[test]
    fn retiring_a_rule_resolves_its_alerts() {
        let (book, rx, rule) = setup();
        book.signal(signal(&rule, "d1", None, Edge::Raise));
        book.retire_rule("hr_high", "rule removed");
        assert!(book.active().is_empty());
        assert_eq!(events(&rx), [Transition::Raised, Transition::Resolved]);
    }
}
