//! The notifier: alert transitions in, notification tasks out to RabbitMQ. Raised alerts
//! become the tasks the policy names; once a second the escalator says which unacknowledged
//! alerts escalate, the alert book records each escalation (every output sees an `escalated`
//! transition) and the escalated transition becomes its level's tasks. It runs on a thread
//! of its own, so a slow or absent broker delays only notifications, never the alert's
//! other outputs.

use super::escalation::{Escalation, Escalator};
use super::policy::{NotificationPolicy, Route};
use super::publisher::{Publisher, Task};
use crate::alerts::{AlertBook, AlertEvent};
use crate::model::now_millis;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// The alert book escalations are recorded in. The engine that owns it starts after its
/// outputs (the notifier among them), so it is handed over once there; until then nothing
/// escalates. Held weakly: the book sends to the alert outputs, which end only when it is
/// gone.
pub type BookSlot = Arc<OnceLock<Weak<AlertBook>>>;

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
    /// Where tasks still unconfirmed at `drain_timeout` are kept until the next start,
    /// which sends them first.
    #[serde(default = "default_spool")]
    pub spool: PathBuf,
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

fn default_spool() -> PathBuf {
    PathBuf::from("data/notifications-spool.ndjson")
}

impl NotificationsConfig {
    pub fn policy(&self) -> NotificationPolicy {
        NotificationPolicy {
            routes: self.routes.clone(),
        }
    }

    /// The tasks a transition calls for: the policy's for a raised alert, the escalation
    /// level's for an escalated one.
    pub fn tasks_for(&self, event: &AlertEvent) -> Vec<Task> {
        let mut tasks = self.policy().tasks_for(event);
        if let Some(e) = &self.escalation {
            tasks.extend(e.tasks_for(event));
        }
        tasks
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
    book: BookSlot,
) -> std::io::Result<(mpsc::Sender<AlertEvent>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(config.buffer.max(1));
    let thread = std::thread::Builder::new()
        .name("notifier".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the notifier");
            runtime.block_on(run(config, book, rx));
        })?;
    Ok((tx, thread))
}

async fn run(config: NotificationsConfig, book: BookSlot, mut rx: mpsc::Receiver<AlertEvent>) {
    let mut escalator = config.escalation.clone().map(Escalator::new);
    let (publisher, running) = Publisher::start(config.url.clone(), config.buffer);
    // What the last run could not publish goes first.
    match take_spool(&config.spool) {
        Ok(spooled) => {
            if !spooled.is_empty() {
                tracing::info!(tasks = spooled.len(), spool = %config.spool.display(), "sending the tasks kept at the last stop");
            }
            for task in spooled {
                if publisher.send(task).await.is_err() {
                    return;
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, spool = %config.spool.display(), "the task spool cannot be read; it is left as it is")
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let mut tasks = Vec::new();
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                tasks = config.tasks_for(&event);
                if let Some(e) = &mut escalator {
                    e.observe(&event);
                }
            }
            _ = tick.tick() => {
                if let (Some(e), Some(book)) = (&mut escalator, book.get().and_then(Weak::upgrade)) {
                    // Each escalation comes back as an `escalated` transition, with its tasks.
                    for (alert_id, level) in e.due(now_millis()) {
                        book.escalate(&alert_id, level);
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
    drop(publisher);
    let left = running.finish(config.drain_timeout).await;
    if left.is_empty() {
        return;
    }
    match keep_spool(&config.spool, &left) {
        Ok(()) => tracing::warn!(
            tasks = left.len(), spool = %config.spool.display(),
            "RabbitMQ did not confirm every task before stopping; they are kept for the next start"
        ),
        Err(e) => tracing::error!(
            error = %e, tasks = left.len(), spool = %config.spool.display(),
            "RabbitMQ did not confirm every task before stopping, and they could not be kept"
        ),
    }
}

/// Reads and removes the spool (missing: nothing to send).
fn take_spool(path: &Path) -> std::io::Result<Vec<Task>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut tasks = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str(line) {
            Ok(task) => tasks.push(task),
            // Only a crash mid-write cuts a line short; the rest is still good.
            Err(e) => {
                tracing::error!(line = i + 1, error = %e, "a spooled task cannot be read; skipped")
            }
        }
    }
    std::fs::remove_file(path)?;
    Ok(tasks)
}

/// Writes the tasks to the spool, durably (a whole file or none).
fn keep_spool(path: &Path, tasks: &[Task]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial)?;
    for task in tasks {
        serde_json::to_writer(&mut file, task)?;
        file.write_all(b"\n")?;
    }
    file.sync_all()?;
    std::fs::rename(&partial, path)
}
