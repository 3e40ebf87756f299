//! The notifier: alert transitions in, notification tasks out to RabbitMQ. Raised alerts
//! become the tasks the policy names; once a second the escalator says which unacknowledged
//! alerts escalate. It runs on a thread of its own, so a slow or absent broker delays only
//! notifications, never the alert's other outputs.

use super::escalation::{Escalation, Escalator};
use super::policy::{NotificationPolicy, Route};
use super::publisher::Publisher;
use crate::alerts::AlertEvent;
use crate::model::now_millis;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::mpsc;

/// The `[notifications]` section: where RabbitMQ is, who hears of what, and escalation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsConfig {
    /// `amqp://user:password@host:port/vhost`.
    pub url: String,
    /// Tasks that may wait locally while RabbitMQ is away (then alerts wait for room).
    #[serde(default = "default_buffer")]
    pub buffer: usize,
    /// How long stopping waits for waiting tasks to be confirmed.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub escalation: Option<Escalation>,
}

fn default_buffer() -> usize {
    10_000
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}

impl NotificationsConfig {
    pub fn policy(&self) -> NotificationPolicy {
        NotificationPolicy {
            routes: self.routes.clone(),
        }
    }

    pub fn problems(&self) -> Vec<String> {
        let mut out = self.policy().problems();
        if let Some(e) = &self.escalation
            && (e.after.is_zero() || e.levels.is_empty())
        {
            out.push(
                "notifications.escalation: `after` must be positive and a `level` given".into(),
            );
        }
        out
    }
}

/// Starts the notifier thread; send it every alert transition. It ends when the sender is
/// dropped, after publishing what waits (for up to `drain_timeout`).
pub fn start(
    config: NotificationsConfig,
) -> std::io::Result<(mpsc::Sender<AlertEvent>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(config.buffer.max(1));
    let thread = std::thread::Builder::new()
        .name("notifier".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the notifier");
            runtime.block_on(run(config, rx));
        })?;
    Ok((tx, thread))
}

async fn run(config: NotificationsConfig, mut rx: mpsc::Receiver<AlertEvent>) {
    let policy = config.policy();
    let mut escalator = config.escalation.clone().map(Escalator::new);
    let (publisher, done) = Publisher::start(config.url.clone(), config.buffer);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let mut tasks = Vec::new();
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                tasks = policy.tasks_for(&event);
                if let Some(e) = &mut escalator {
                    e.observe(&event);
                }
            }
            _ = tick.tick() => {
                if let Some(e) = &mut escalator {
                    for (alert_id, level, due) in e.due(now_millis()) {
                        tracing::warn!(%alert_id, level, "alert unacknowledged: escalated");
                        tasks.extend(due);
                    }
                }
            }
        }
        for task in tasks {
            if publisher.send(task).await.is_err() {
                tracing::error!("the task publisher stopped; notifications are not sent");
                return;
            }
        }
    }
    let waiting = publisher
        .metrics
        .buffered
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(publisher);
    if tokio::time::timeout(config.drain_timeout, done)
        .await
        .is_err()
    {
        tracing::error!(
            waiting,
            "RabbitMQ did not take every waiting task before stopping"
        );
    }
}
