//! The worker: takes tasks off the queues and delivers them — SMS and webhook tasks as an
//! HTTP POST of their JSON, email over SMTP, or to the log (the embedded default) — and
//! renders the shift reports asked for on the report queues.
//!
//! At most `prefetch` tasks are in hand at once. A delivery that fails is retried after a
//! growing delay (`retry_delay`, doubled each time): the task is published again, through a
//! delay queue, with its `x-retry-count` (the failures so far) one higher, and only then is
//! the delivery acknowledged. After `tries` failures — or at once for a failure no retry can
//! mend, such as an audience without an address — it goes to `failed.jobs` with the reason
//! in `x-failure-reason`. A worker that dies mid-task leaves it unacknowledged, and RabbitMQ
//! hands it out again: no task is lost, and receivers drop repeats by the message id.

use super::report::{Format, ReportRequest, ShiftReport};
use super::topology::{self, DEAD_LETTER_EXCHANGE, EXCHANGES, FAILED_JOBS};
use crate::api::socket::Notice;
use crate::sinks::postgres::query::Db;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The `[worker]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// `amqp://user:password@host:port/vhost`.
    pub url: String,
    /// Tasks in hand at once.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Deliveries tried before a task goes to `failed.jobs`.
    #[serde(default = "default_tries")]
    pub tries: u32,
    /// The wait before the first retry; each later one waits twice the one before.
    #[serde(default = "default_retry_delay", with = "humantime_serde")]
    pub retry_delay: Duration,
    /// How each channel's tasks leave.
    #[serde(default)]
    pub sms: Delivery,
    #[serde(default)]
    pub email: Delivery,
    #[serde(default)]
    pub webhook: Delivery,
    /// Shift reports (`reports.excel`, `reports.pdf`); absent = their queues are not taken.
    #[serde(default)]
    pub reports: Option<ReportsConfig>,
    /// Each ward's devices, from the config's `[engine.wards]`, for ward reports.
    #[serde(skip)]
    pub wards: BTreeMap<String, Vec<String>>,
}

/// Where reports are read from and written to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsConfig {
    pub dir: std::path::PathBuf,
    /// The store the service writes: `postgres://user@host:port/database`.
    pub database_url: String,
}

fn default_prefetch() -> u16 {
    5
}

fn default_tries() -> u32 {
    3
}

fn default_retry_delay() -> Duration {
    Duration::from_secs(5)
}

/// Where a channel's tasks go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Delivery {
    /// Written to the log: for the embedded default and for trying a policy out.
    #[default]
    Log,
    /// An HTTP POST of the task's JSON (an SMS gateway, a paging system, a chat hook).
    Webhook {
        url: String,
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
    /// Email through an SMTP relay (plain SMTP: the relay is on the hospital's network).
    Smtp {
        host: String,
        #[serde(default = "default_smtp_port")]
        port: u16,
        from: String,
        /// The address of each audience (`role:…`, `user:…`, `rota:…`).
        addresses: BTreeMap<String, String>,
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_smtp_port() -> u16 {
    25
}

impl WorkerConfig {
    /// The delay before retry `n` (1, 2, …).
    pub fn delay(&self, n: u32) -> Duration {
        self.retry_delay * 2u32.saturating_pow(n.saturating_sub(1))
    }

    fn delays(&self) -> Vec<Duration> {
        (1..self.tries).map(|n| self.delay(n)).collect()
    }

    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.prefetch == 0 || self.tries == 0 || self.retry_delay.is_zero() {
            out.push("worker: prefetch, tries and retry_delay must be positive".into());
        }
        for (name, d) in [
            ("sms", &self.sms),
            ("email", &self.email),
            ("webhook", &self.webhook),
        ] {
            match d {
                Delivery::Webhook { url, .. } if !url.starts_with("http://") => out.push(format!(
                    "worker.{name}: url `{url}` is not http:// (no TLS stack is built in; put a proxy in front)"
                )),
                Delivery::Smtp { from, .. } if from.parse::<lettre::Address>().is_err() => {
                    out.push(format!("worker.{name}: from `{from}` is not an email address"))
                }
                _ => {}
            }
        }
        out
    }

    /// How the tasks of `queue` leave: by its exchange's channel.
    fn delivery_for(&self, queue: &str) -> &Delivery {
        match queue.split('.').next() {
            Some("sms") => &self.sms,
            Some("email") => &self.email,
            Some("webhook") => &self.webhook,
            _ => &Delivery::Log,
        }
    }
}

/// What the worker did.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    /// Sent to `failed.jobs`.
    pub failed: AtomicU64,
}

/// Why a delivery failed, and whether trying again may help.
#[derive(Debug)]
pub enum Failure {
    Retry(String),
    Permanent(String),
}

/// One task taken off a queue.
#[derive(Debug, Serialize)]
pub struct Job {
    pub id: String,
    pub queue: String,
    pub kind: String,
    pub correlation_id: String,
    /// Failures before this try.
    pub retry_count: u32,
    pub body: serde_json::Value,
}

impl Job {
    fn of(delivery: &lapin::message::Delivery) -> Result<Job, String> {
        let p = &delivery.properties;
        let text =
            |v: Option<&lapin::types::ShortString>| v.map(|s| s.to_string()).unwrap_or_default();
        let headers = p.headers().clone().unwrap_or_default();
        let header = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => None,
        };
        Ok(Job {
            id: text(p.message_id().as_ref()),
            queue: delivery.routing_key.to_string(),
            kind: header("task").unwrap_or_default(),
            correlation_id: text(p.correlation_id().as_ref()),
            retry_count: retry_count(&headers),
            body: serde_json::from_slice(&delivery.data)
                .map_err(|e| format!("the task is not JSON: {e}"))?,
        })
    }
}

fn retry_count(headers: &FieldTable) -> u32 {
    match headers.inner().get("x-retry-count") {
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::ShortInt(n)) => (*n).max(0) as u32,
        _ => 0,
    }
}

/// Delivers one job.
pub async fn deliver(delivery: &Delivery, job: &Job) -> Result<(), Failure> {
    match delivery {
        Delivery::Log => {
            tracing::info!(id = %job.id, queue = %job.queue, kind = %job.kind,
                correlation_id = %job.correlation_id, body = %job.body, "notification (log channel)");
            Ok(())
        }
        Delivery::Webhook { url, timeout } => post(url, *timeout, job).await,
        Delivery::Smtp {
            host,
            port,
            from,
            addresses,
            timeout,
        } => {
            let to = job.body["to"].as_str().unwrap_or_default();
            let Some(address) = addresses.get(to) else {
                return Err(Failure::Permanent(format!("no email address for `{to}`")));
            };
            send_mail(host, *port, from, address, *timeout, job).await
        }
    }
}

/// POSTs the job as JSON; 2xx is delivered, 4xx (but 408 and 429) will not improve.
async fn post(url: &str, timeout: Duration, job: &Job) -> Result<(), Failure> {
    let (url, body) = (
        url.to_string(),
        serde_json::to_vec(job).expect("a job is JSON"),
    );
    let (id, correlation_id) = (job.id.clone(), job.correlation_id.clone());
    let status = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", &id)
            .header("X-Correlation-ID", &correlation_id)
            .send(&body[..])
            .map(|r| r.status().as_u16())
    })
    .await
    .map_err(|e| Failure::Retry(format!("webhook call did not finish: {e}")))?
    .map_err(|e| Failure::Retry(format!("webhook unreachable: {e}")))?;
    match status {
        200..=299 => Ok(()),
        408 | 429 => Err(Failure::Retry(format!("webhook answered {status}"))),
        400..=499 => Err(Failure::Permanent(format!(
            "webhook refused the task: {status}"
        ))),
        _ => Err(Failure::Retry(format!("webhook answered {status}"))),
    }
}

async fn send_mail(
    host: &str,
    port: u16,
    from: &str,
    to: &str,
    timeout: Duration,
    job: &Job,
) -> Result<(), Failure> {
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let b = &job.body;
    let subject = format!(
        "[{}] {} — {}",
        b["priority"].as_str().unwrap_or("alert").to_uppercase(),
        b["message"].as_str().unwrap_or("alert"),
        b["subject"].as_str().unwrap_or("unknown"),
    );
    let text = format!(
        "{subject}\n\nAlert {}, rule {}, escalation {}.\nCorrelation id {}.\n\n{}\n",
        b["alert_id"].as_str().unwrap_or("-"),
        b["rule_id"].as_str().unwrap_or("-"),
        b["escalation"],
        job.correlation_id,
        serde_json::to_string_pretty(b).unwrap_or_default(),
    );
    let permanent =
        |what: &str, e: &dyn std::fmt::Display| Failure::Permanent(format!("{what}: {e}"));
    let message = Message::builder()
        .from(from.parse().map_err(|e| permanent("from address", &e))?)
        .to(to.parse().map_err(|e| permanent("to address", &e))?)
        .message_id(Some(format!(
            "<{}@vitalstream>",
            job.id.replace(['/', ':'], ".")
        )))
        .subject(subject)
        .body(text)
        .map_err(|e| permanent("email", &e))?;
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .timeout(Some(timeout))
        .build();
    match mailer.send(message).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_permanent() => Err(permanent("the SMTP server refused the email", &e)),
        Err(e) => Err(Failure::Retry(format!("email not sent: {e}"))),
    }
}

/// Where the worker tells of reports written: `notification:new` to the requester's room
/// (`vitalstream run`'s socket.io), when it runs inside the service.
pub type Announce = tokio::sync::broadcast::Sender<Arc<Notice>>;

/// What every job of a worker shares.
struct Worker {
    config: WorkerConfig,
    metrics: Arc<WorkerMetrics>,
    announce: Option<Announce>,
}

/// Does one job: a report, or a notification through its channel's delivery.
async fn perform(worker: &Worker, job: &Job) -> Result<(), Failure> {
    match (Format::of_queue(&job.queue), &worker.config.reports) {
        (Some(format), Some(reports)) => render(worker, reports, format, job).await,
        _ => deliver(worker.config.delivery_for(&job.queue), job).await,
    }
}

/// Renders a shift report into the reports directory and tells the requester.
async fn render(
    worker: &Worker,
    reports: &ReportsConfig,
    format: Format,
    job: &Job,
) -> Result<(), Failure> {
    let config = &worker.config;
    let request: ReportRequest = serde_json::from_value(job.body.clone())
        .map_err(|e| Failure::Permanent(format!("not a report request: {e}")))?;
    let problems = request.problems();
    if !problems.is_empty() {
        return Err(Failure::Permanent(problems.join("; ")));
    }
    let devices = match &request.ward {
        Some(ward) => Some(
            (config.wards.get(ward).cloned())
                .ok_or_else(|| Failure::Permanent(format!("unknown ward `{ward}`")))?,
        ),
        None => None,
    };
    let store = crate::sinks::postgres::PostgresConfig {
        url: reports.database_url.clone(),
        ..Default::default()
    };
    let db = Db::connect(&store)
        .await
        .map_err(|e| Failure::Retry(format!("the store is unreachable: {e}")))?;
    let report = ShiftReport::load(&db, request, devices)
        .await
        .map_err(|e| Failure::Retry(format!("reading the report's rows: {e}")))?;
    let request = report.request.clone();
    let dir = reports.dir.clone();
    let path = tokio::task::spawn_blocking(move || report.write(&dir, format))
        .await
        .map_err(|e| Failure::Retry(format!("rendering stopped: {e}")))?
        .map_err(|e| Failure::Retry(format!("writing the report: {e:#}")))?;
    tracing::info!(report_id = %request.report_id, path = %path.display(), correlation_id = %job.correlation_id, "report ready");
    if let (Some(announce), Some(by)) = (&worker.announce, &request.requested_by) {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
        let _ = announce.send(Arc::new(Notice {
            id: format!("ntf-{:016x}", fastrand::u64(..)),
            to: format!("user:{by}"),
            title: "Shift report ready".into(),
            message: format!("{} ({})", request.report_id, format.extension()),
            priority: None,
            correlation_id: Some(job.correlation_id.clone()),
            data: serde_json::json!({
                "report_id": request.report_id,
                "format": format,
                "file": file,
                "path": path,
            }),
            created_at: crate::model::now_millis(),
        }));
    }
    Ok(())
}

/// Runs the worker until `stop` resolves, reconnecting whenever RabbitMQ goes away.
pub async fn run(
    config: WorkerConfig,
    metrics: Arc<WorkerMetrics>,
    announce: Option<Announce>,
    stop: impl std::future::Future<Output = ()>,
) {
    let worker = Arc::new(Worker {
        config,
        metrics,
        announce,
    });
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            ended = consume(worker.clone()) => {
                match ended {
                    Ok(()) => tracing::warn!("RabbitMQ closed the worker's consumers; reconnecting"),
                    Err(e) => tracing::warn!(error = %e, "worker lost RabbitMQ; reconnecting"),
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection's life: declare, consume every task queue, handle deliveries.
async fn consume(worker: Arc<Worker>) -> lapin::Result<()> {
    let config = &worker.config;
    let connection = Connection::connect(&config.url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    topology::declare(&channel).await?;
    topology::declare_retries(&channel, &config.delays()).await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    // Retries and failed jobs are published on a channel of their own, with confirms.
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumers = Vec::new();
    for queue in EXCHANGES.iter().flat_map(|(_, queues)| queues.iter()) {
        if queue.starts_with("reports.") && config.reports.is_none() {
            continue;
        }
        let consumer = channel
            .basic_consume(
                (*queue).into(),
                format!("vitalstream-worker-{queue}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(consumer);
    }
    tracing::info!(
        prefetch = config.prefetch,
        "worker consuming the task queues"
    );
    let mut deliveries = futures_util::stream::select_all(consumers);
    let mut in_hand = tokio::task::JoinSet::new();
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let (worker, publish) = (worker.clone(), publish.clone());
        let acker = delivery.acker.clone();
        in_hand.spawn(async move {
            if let Err(e) = handle(&worker, &publish, delivery).await {
                // Back on its queue (or, with the connection gone, RabbitMQ requeues it).
                tracing::warn!(error = %e, "task outcome not recorded; it will be delivered again");
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                let _ = acker.nack(requeue).await;
            }
        });
        while in_hand.try_join_next().is_some() {}
    }
    Ok(())
}

/// Delivers one task and records the outcome: acknowledged when delivered, or once its
/// retry (or its failed job) is confirmed by the broker.
async fn handle(
    worker: &Worker,
    publish: &Channel,
    delivery: lapin::message::Delivery,
) -> anyhow::Result<()> {
    let (config, metrics) = (&worker.config, &worker.metrics);
    let outcome = match Job::of(&delivery) {
        Ok(job) => perform(worker, &job)
            .await
            .map_err(|f| (f, job.retry_count)),
        Err(e) => Err((Failure::Permanent(e), 0)),
    };
    match outcome {
        Ok(()) => {
            metrics.delivered.fetch_add(1, Relaxed);
        }
        Err((Failure::Retry(reason), failures)) if failures + 1 < config.tries => {
            let n = failures + 1;
            tracing::warn!(queue = %delivery.routing_key, retry = n, %reason, "task failed; retrying");
            let exchange = topology::retry_exchange(config.delay(n));
            republish(
                publish,
                &delivery,
                &exchange,
                delivery.routing_key.as_str(),
                n,
                &reason,
            )
            .await?;
            metrics.retried.fetch_add(1, Relaxed);
        }
        Err((Failure::Retry(reason) | Failure::Permanent(reason), failures)) => {
            let n = failures + 1;
            tracing::error!(queue = %delivery.routing_key, tries = n, %reason, "task failed; sent to failed.jobs");
            republish(
                publish,
                &delivery,
                DEAD_LETTER_EXCHANGE,
                FAILED_JOBS,
                n,
                &reason,
            )
            .await?;
            metrics.failed.fetch_add(1, Relaxed);
        }
    }
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// Publishes the delivery again, with `x-retry-count` = `failures`, the reason and the
/// queue it came from, and waits for the broker's confirm.
async fn republish(
    channel: &Channel,
    delivery: &lapin::message::Delivery,
    exchange: &str,
    routing_key: &str,
    failures: u32,
    reason: &str,
) -> anyhow::Result<()> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert("x-retry-count".into(), AMQPValue::LongInt(failures as i32));
    headers.insert(
        "x-failure-reason".into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers.insert(
        "x-original-queue".into(),
        AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
    );
    let properties: BasicProperties = delivery.properties.clone().with_headers(headers);
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            &delivery.data,
            properties.with_delivery_mode(2),
        )
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "the broker refused the republished task");
    Ok(())
}
