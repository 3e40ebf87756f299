//! The notification policy: which alert priorities notify whom, through which channel. An
//! alert raised becomes one task per route and audience, on the queue its priority calls
//! for (the `[[notifications.route]]` tables of the config).

use super::publisher::Task;
use crate::alerts::{Alert, AlertEvent, Transition};
use crate::rules::Priority;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Routes from alert priorities to audiences.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationPolicy {
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
}

/// Alerts of these priorities notify these audiences through this channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub priorities: Vec<Priority>,
    pub channel: Channel,
    /// `role:<name>`, `user:<id>` or `rota:<name>` (an on-call rota).
    pub to: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Sms,
    Email,
    /// An HTTP POST of the task's JSON to the worker's configured endpoint.
    Webhook,
}

/// The exchange, queue and message priority for a channel and an alert priority.
pub fn queue_for(channel: Channel, priority: Priority) -> (&'static str, &'static str, u8) {
    match (channel, priority) {
        (Channel::Sms, Priority::High) => ("nilecare.sms", "sms.urgent", 9),
        (Channel::Sms, Priority::Medium) => ("nilecare.sms", "sms.normal", 5),
        (Channel::Sms, Priority::Low) => ("nilecare.sms", "sms.normal", 1),
        (Channel::Email, Priority::High) => ("nilecare.email", "email.high", 9),
        (Channel::Email, Priority::Medium) => ("nilecare.email", "email.normal", 5),
        (Channel::Email, Priority::Low) => ("nilecare.email", "email.low", 1),
        (Channel::Webhook, Priority::High) => ("nilecare.webhook", "webhook.urgent", 9),
        (Channel::Webhook, Priority::Medium) => ("nilecare.webhook", "webhook.normal", 5),
        (Channel::Webhook, Priority::Low) => ("nilecare.webhook", "webhook.normal", 1),
    }
}

/// The task telling `to` of an alert through `channel`, at its escalation level (0 when it
/// was just raised).
pub(super) fn notification(
    alert: &Alert,
    channel: Channel,
    to: &str,
    priority: u8,
    kind: &str,
) -> Task {
    let (exchange, queue, _) = queue_for(channel, alert.priority);
    Task {
        id: format!("{}/{}/{to}", alert.alert_id, alert.escalation),
        exchange: exchange.into(),
        queue: queue.into(),
        priority,
        correlation_id: alert.trigger.correlation_id.to_string(),
        kind: kind.into(),
        body: json!({
            "to": to,
            "alert_id": alert.alert_id,
            "rule_id": alert.rule_id,
            "priority": alert.priority,
            "subject": alert.subject,
            "patient_id": alert.patient_id,
            "device_id": alert.trigger.device_id,
            "message": alert.message,
            "value": alert.trigger.value,
            "raised_at": alert.raised_at,
            "escalation": alert.escalation,
        }),
    }
}

impl NotificationPolicy {
    /// Every problem with the policy.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("notifications.route[{i}]");
            if route.priorities.is_empty() {
                out.push(format!("{at}: `priorities` is empty"));
            }
            if route.to.is_empty() {
                out.push(format!("{at}: `to` is empty"));
            }
            for who in &route.to {
                let valid = ["role:", "user:", "rota:"]
                    .iter()
                    .any(|p| who.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
                if !valid {
                    out.push(format!(
                        "{at}: `{who}` is not role:<name>, user:<id> or rota:<name>"
                    ));
                }
            }
        }
        out
    }

    /// The tasks an alert transition calls for: when it is raised, one per route for its
    /// priority and audience; nothing for other transitions.
    pub fn tasks_for(&self, event: &AlertEvent) -> Vec<Task> {
        if event.event != Transition::Raised {
            return Vec::new();
        }
        let alert = &event.alert;
        let routes = (self.routes.iter()).filter(|r| r.priorities.contains(&alert.priority));
        routes
            .flat_map(|route| {
                let (_, queue, priority) = queue_for(route.channel, alert.priority);
                let kind = format!("notify.{}", queue.split('.').next().unwrap_or("notify"));
                (route.to.iter())
                    .map(move |to| notification(alert, route.channel, to, priority, &kind))
            })
            .collect()
    }
}
