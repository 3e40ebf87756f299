//! Publishes tasks to RabbitMQ: persistent, prioritised, with the alert's correlation id,
//! each confirmed by the broker before it leaves the local buffer. While RabbitMQ is away
//! the tasks wait in that buffer (bounded: a full one makes the caller wait) and go out, in
//! order, once a connection is back; none are dropped.

use super::topology;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::mpsc;

/// One job for a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The same for the same job (an alert, a level, an audience): receivers drop repeats
    /// by it (the message id, and a webhook's `Idempotency-Key`).
    pub id: String,
    /// Exchange and routing key (the queue's name), from the topology.
    pub exchange: String,
    pub queue: String,
    /// 0–10; higher is taken first.
    pub priority: u8,
    /// The alert's (or request's) correlation id, carried in the headers.
    pub correlation_id: String,
    /// What the job is, e.g. `notify.sms`, `report.pdf`.
    pub kind: String,
    pub body: serde_json::Value,
}

/// What the publisher did.
#[derive(Debug, Default)]
pub struct PublisherMetrics {
    /// Confirmed by the broker.
    pub published: AtomicU64,
    /// Waiting in the local buffer.
    pub buffered: AtomicU64,
    pub reconnects: AtomicU64,
}

/// A handle to send tasks to the publishing loop.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Task>,
    pub metrics: Arc<PublisherMetrics>,
}

/// The publishing loop, to stop.
pub struct Running {
    done: tokio::task::JoinHandle<Vec<Task>>,
    give_up: tokio::sync::oneshot::Sender<()>,
}

impl Running {
    /// Once every handle is dropped: waits up to `timeout` for the waiting tasks to be
    /// confirmed, and returns those that were not (to keep them elsewhere).
    pub async fn finish(self, timeout: Duration) -> Vec<Task> {
        let mut done = self.done;
        if let Ok(left) = tokio::time::timeout(timeout, &mut done).await {
            return left.unwrap_or_default();
        }
        let _ = self.give_up.send(());
        done.await.unwrap_or_default()
    }
}

impl Publisher {
    /// Starts the loop on the current tokio runtime; it connects (and reconnects) to `url`,
    /// declares the topology and publishes in order. `buffer` tasks (and a few in hand) may
    /// wait locally. The
    /// loop ends, once every waiting task is confirmed, when every handle is dropped (or
    /// earlier, through [`Running::finish`]).
    pub fn start(url: String, buffer: usize) -> (Publisher, Running) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let metrics = Arc::new(PublisherMetrics::default());
        let (give_up, given_up) = tokio::sync::oneshot::channel();
        let counters = metrics.clone();
        let done = tokio::spawn(async move {
            let mut pending = VecDeque::new();
            let mut rx = rx;
            tokio::select! {
                _ = run(url, &mut rx, &mut pending, counters) => {}
                // Only a sent signal gives up: a dropped `Running` lets the loop run on.
                Ok(()) = given_up => {}
            }
            // What was not confirmed: in hand, then still in the channel.
            rx.close();
            while let Ok(task) = rx.try_recv() {
                pending.push_back(task);
            }
            pending.into()
        });
        (Publisher { tx, metrics }, Running { done, give_up })
    }

    /// Queues a task; waits while the local buffer is full. Fails only if the loop is gone.
    pub async fn send(&self, task: Task) -> Result<(), Task> {
        self.metrics.buffered.fetch_add(1, Relaxed);
        self.tx.send(task).await.map_err(|e| {
            self.metrics.buffered.fetch_sub(1, Relaxed);
            e.0
        })
    }
}

/// A confirmed channel with the topology declared.
async fn connect(url: &str) -> lapin::Result<(Connection, Channel)> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    topology::declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

fn properties(task: &Task) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "correlation-id".into(),
        AMQPValue::LongString(LongString::from(task.correlation_id.as_str())),
    );
    headers.insert(
        "task".into(),
        AMQPValue::LongString(LongString::from(task.kind.as_str())),
    );
    headers.insert("x-retry-count".into(), AMQPValue::LongInt(0));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_priority(task.priority.min(topology::MAX_PRIORITY))
        .with_correlation_id(task.correlation_id.as_str().into())
        .with_message_id(task.id.as_str().into())
        .with_headers(headers)
}

/// Publishes one task and waits for the broker's confirm.
async fn publish(channel: &Channel, task: &Task) -> Result<(), String> {
    let payload = serde_json::to_vec(&task.body).map_err(|e| e.to_string())?;
    let confirm = channel
        .basic_publish(
            task.exchange.as_str().into(),
            task.queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &payload,
            properties(task),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if !confirm.is_ack() {
        return Err("the broker did not accept the task (nack)".into());
    }
    if confirm.take_message().is_some() {
        return Err(format!(
            "no queue took the task ({} → {})",
            task.exchange, task.queue
        ));
    }
    Ok(())
}

/// Tasks taken off the channel at a time, to publish in order.
const IN_HAND: usize = 64;

/// Publishes in order. A few tasks are in hand at a time; the rest wait in the channel, and
/// a full channel makes senders wait: what waits locally stays bounded.
async fn run(
    url: String,
    rx: &mut mpsc::Receiver<Task>,
    pending: &mut VecDeque<Task>,
    metrics: Arc<PublisherMetrics>,
) {
    let mut link: Option<(Connection, Channel)> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        // Take whatever has arrived; wait for more only when nothing is pending.
        if pending.is_empty() {
            match rx.recv().await {
                Some(task) => pending.push_back(task),
                None => return,
            }
        }
        while pending.len() < IN_HAND {
            match rx.try_recv() {
                Ok(task) => pending.push_back(task),
                Err(_) => break,
            }
        }
        if link.is_none() {
            match connect(&url).await {
                Ok(l) => {
                    tracing::info!("RabbitMQ connected; task topology declared");
                    link = Some(l);
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(error = %e, waiting = pending.len(), "RabbitMQ unreachable; tasks wait in the local buffer");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let Some((_, channel)) = &link else {
            continue;
        };
        let task = pending.front().expect("a pending task");
        match publish(channel, task).await {
            Ok(()) => {
                pending.pop_front();
                metrics.buffered.fetch_sub(1, Relaxed);
                metrics.published.fetch_add(1, Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, correlation_id = %task.correlation_id, "task not confirmed; reconnecting and publishing it again");
                metrics.reconnects.fetch_add(1, Relaxed);
                link = None;
            }
        }
    }
}
