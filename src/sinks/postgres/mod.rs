//! The TimescaleDB / PostgreSQL reading store.
//!
//! [`PostgresStorage`] implements the [`Storage`] contract: readings are gathered into
//! batches of `batch_rows` (or whatever arrived within the storage thread's linger) and each
//! batch goes to the database on its own connection, up to `connections` at once, by binary
//! COPY with conflict skipping ([`write`](mod@write)). A failed call is retried with exponential backoff
//! and jitter; after `retries` it — and, while the circuit breaker is open, every batch — goes
//! to the local [`spool`] instead. `flush` returns once every batch handed over is in the
//! database or in the spool, which is when the storage thread acknowledges upstream. The
//! spool is drained, oldest first, whenever the database answers again.
//!
//! [`schema`] holds the migrations and the day partitions of the PostgreSQL fallback;
//! [`query`] the reads the REST API makes.

pub mod breaker;
pub mod query;
pub mod schema;
pub mod spool;
pub mod write;

use super::{Storage, StorageError};
use crate::alerts::AlertEvent;
use crate::model::{Sample, now_micros};
use breaker::Breaker;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use schema::{Flavour, Partitions};
use serde::{Deserialize, Serialize};
use spool::{Spool, SpoolError};
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;
use write::{AlertRow, Batch, VitalRow};

/// Whether to use TimescaleDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimescaleMode {
    /// TimescaleDB when the extension is available, else PostgreSQL partitioning.
    Auto,
    /// Refuse to start without TimescaleDB.
    Require,
    /// PostgreSQL partitioning even when TimescaleDB is available.
    Off,
}

/// Settings of the PostgreSQL store (`[storage] type = "postgres"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/database`, or a key=value connection string.
    pub url: String,
    /// Connections writing in parallel.
    pub connections: usize,
    /// A batch is sent once this many readings are waiting, and everything waiting at least
    /// every `flush_interval`: a reading's source is acknowledged after that flush.
    pub batch_rows: usize,
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit on every database call (also set as the session's `statement_timeout`).
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Retries of a failed batch before it goes to the spool.
    pub retries: u32,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Failures in a row that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the open breaker sends everything to the spool before probing again.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Where batches wait while the database is unreachable.
    pub spool_dir: PathBuf,
    /// When the spool holds this much, the writer stops taking input (backpressure).
    pub spool_max_bytes: u64,
    pub timescaledb: TimescaleMode,
    /// Apply pending migrations at start.
    pub migrate_on_start: bool,
    /// PostgreSQL fallback: day partitions created this many days ahead.
    pub partitions_ahead_days: u32,
    /// Drop readings older than this ("90d"); absent = keep everything.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// TimescaleDB: compress chunks older than this.
    #[serde(with = "humantime_serde")]
    pub compress_after: Duration,
    /// At shutdown, how long to wait for room in a full spool before giving up (the batches
    /// that did not fit are then not acknowledged, so their sources send them again).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://postgres@127.0.0.1:5432/vitalstream".into(),
            connections: 4,
            batch_rows: 10_000,
            flush_interval: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            retries: 3,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5),
            spool_dir: PathBuf::from("data/spool"),
            spool_max_bytes: 1 << 30,
            timescaledb: TimescaleMode::Auto,
            migrate_on_start: true,
            partitions_ahead_days: 2,
            retention: None,
            compress_after: Duration::from_secs(7 * 86_400),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a database call failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("postgres: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("postgres connection pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("postgres call timed out after {0:?}")]
    Timeout(Duration),
    #[error("circuit open: the database failed repeatedly and is not being called")]
    CircuitOpen,
    #[error("schema: {0}")]
    Schema(String),
    #[error("postgres configuration: {0}")]
    Config(String),
}

impl PgError {
    /// The database refused the data itself (SQLSTATE class 22 or 23): sending it again
    /// will not help.
    pub fn is_data_error(&self) -> bool {
        let PgError::Db(e) = self else { return false };
        e.code()
            .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
    }
}

/// The writer's counters.
#[derive(Debug, Default)]
pub struct StorageMetrics {
    /// Readings stored for the first time.
    pub rows_written: AtomicU64,
    /// Readings sent again (retry, spool replay, replayed stream) and skipped as stored.
    pub rows_already_stored: AtomicU64,
    pub alert_events_written: AtomicU64,
    /// Failed database calls (each is retried, or its batch spooled).
    pub failed_calls: AtomicU64,
    pub rows_spooled: AtomicU64,
    pub rows_replayed: AtomicU64,
    /// Rows the database refused as data (kept in `spool_dir/refused-*.json`).
    pub rows_refused: AtomicU64,
    pub spool_records: AtomicU64,
    pub spool_bytes: AtomicU64,
}

/// What the writer's tasks share.
struct Shared {
    config: PostgresConfig,
    pool: Pool,
    breaker: Breaker,
    /// Set up (migrated, partitions known) once the database first answers.
    flavour: OnceCell<Flavour>,
    partitions: Partitions,
    /// `patient_devices` rows already stored by this process.
    linked: std::sync::Mutex<std::collections::HashSet<write::Link>>,
    metrics: Arc<StorageMetrics>,
}

impl Shared {
    async fn setup(&self) -> Result<Flavour, PgError> {
        self.flavour
            .get_or_try_init(|| async {
                let mut client = self.pool.get().await?;
                let flavour = if self.config.migrate_on_start {
                    schema::migrate(&mut client, self.config.timescaledb).await?
                } else {
                    schema::flavour(&client).await?
                };
                match flavour {
                    Flavour::Postgres => {
                        self.partitions.load(&client).await?;
                        self.maintain_partitions(&mut client).await?;
                    }
                    Flavour::TimescaleDb => self.timescale_policies(&client).await?,
                }
                tracing::info!(flavour = flavour.name(), "postgres storage ready");
                Ok(flavour)
            })
            .await
            .copied()
    }

    /// PostgreSQL fallback: partitions from yesterday to `partitions_ahead_days` ahead, and
    /// retention.
    async fn maintain_partitions(
        &self,
        client: &mut tokio_postgres::Client,
    ) -> Result<(), PgError> {
        let today = schema::day_of(now_micros());
        let ahead = self.config.partitions_ahead_days as i32;
        self.partitions
            .ensure(client, today - 1..=today + ahead)
            .await?;
        if let Some(keep) = self.config.retention {
            let cutoff = today - (keep.as_secs() / 86_400) as i32;
            self.partitions.drop_before(client, cutoff).await?;
        }
        Ok(())
    }

    async fn timescale_policies(&self, client: &tokio_postgres::Client) -> Result<(), PgError> {
        let compress = self.config.compress_after.as_secs_f64();
        client
            .execute(
                "SELECT add_compression_policy('device_vitals', make_interval(secs => $1), if_not_exists => true)",
                &[&compress],
            )
            .await?;
        if let Some(keep) = self.config.retention {
            client
                .execute(
                    "SELECT add_retention_policy('device_vitals', make_interval(secs => $1), if_not_exists => true)",
                    &[&keep.as_secs_f64()],
                )
                .await?;
        }
        Ok(())
    }

    /// One attempt at writing a batch.
    async fn write_once(&self, batch: &Batch) -> Result<(), PgError> {
        let flavour = self.setup().await?;
        let mut client = self.pool.get().await?;
        let result = async {
            match batch {
                Batch::Readings(rows) => {
                    if flavour == Flavour::Postgres {
                        let days = rows.iter().map(|r| schema::day_of(r.time_us));
                        self.partitions.ensure(&mut client, days).await?;
                    }
                    // Links this process has not stored yet (the table skips the rest anyway).
                    let links: Vec<write::Link> = {
                        let linked = self.linked.lock().expect("links lock");
                        write::links_of(rows)
                            .into_iter()
                            .filter(|l| !linked.contains(l))
                            .collect()
                    };
                    let new = write::store_readings(&mut client, rows, &links).await?;
                    let mut linked = self.linked.lock().expect("links lock");
                    if linked.len() > 1_000_000 {
                        linked.clear();
                    }
                    linked.extend(links);
                    self.metrics.rows_written.fetch_add(new, Relaxed);
                    self.metrics
                        .rows_already_stored
                        .fetch_add(rows.len() as u64 - new, Relaxed);
                }
                Batch::Alerts(rows) => {
                    let new = write::write_alerts(&mut client, rows).await?;
                    self.metrics.alert_events_written.fetch_add(new, Relaxed);
                }
            }
            Ok::<(), PgError>(())
        }
        .await;
        if result.is_err() {
            // The connection may be mid-transaction or dead: never hand it out again.
            let _ = deadpool_postgres::Object::take(client);
        }
        result
    }

    /// One attempt, bounded by `call_timeout` and gated by the breaker.
    async fn attempt(&self, batch: &Batch) -> Result<(), PgError> {
        if !self.breaker.allow() {
            return Err(PgError::CircuitOpen);
        }
        let limit = self.config.call_timeout;
        let result = match tokio::time::timeout(limit, self.write_once(batch)).await {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout(limit)),
        };
        match &result {
            Ok(()) => self.breaker.success(),
            // The database answered; the data is what it refused.
            Err(e) if e.is_data_error() => self.breaker.success(),
            Err(e) => {
                self.metrics.failed_calls.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, rows = batch.len(), "database write failed");
                self.breaker.failure();
            }
        }
        result
    }

    /// Writes a batch, retrying with backoff; gives the batch back when it cannot.
    async fn write(self: Arc<Self>, batch: Batch) -> Result<(), (Batch, PgError)> {
        let mut retry = 0;
        loop {
            match self.attempt(&batch).await {
                Ok(()) => return Ok(()),
                Err(e @ PgError::CircuitOpen) => return Err((batch, e)),
                Err(e) if e.is_data_error() || retry >= self.config.retries => {
                    return Err((batch, e));
                }
                Err(_) => {
                    let c = &self.config;
                    tokio::time::sleep(breaker::backoff(retry, c.backoff_initial, c.backoff_max))
                        .await;
                    retry += 1;
                }
            }
        }
    }
}

/// Builds the connection pool; connections are opened on first use.
fn pool(config: &PostgresConfig) -> Result<Pool, PgError> {
    let mut pg: tokio_postgres::Config = config
        .url
        .parse()
        .map_err(|e| PgError::Config(format!("url {:?}: {e}", redact(&config.url))))?;
    pg.connect_timeout(config.connect_timeout);
    pg.keepalives_idle(Duration::from_secs(30));
    pg.application_name("vitalstream");
    pg.options(format!(
        "-c statement_timeout={} -c client_min_messages=warning",
        config.call_timeout.as_millis()
    ));
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.connections.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.call_timeout))
        .create_timeout(Some(config.connect_timeout))
        .recycle_timeout(Some(config.connect_timeout))
        .build()
        .map_err(|e| PgError::Config(e.to_string()))
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}:***{}", &url[..scheme + 3 + colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `vitalstream migrate`: applies pending migrations; returns the flavour.
pub fn migrate_url(url: &str, mode: TimescaleMode) -> Result<Flavour, PgError> {
    let config = PostgresConfig {
        url: url.into(),
        connections: 1,
        ..PostgresConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PgError::Config(format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        let pool = pool(&config)?;
        let mut client = pool.get().await?;
        schema::migrate(&mut client, mode).await
    })
}

/// The PostgreSQL writer. See the module docs.
pub struct PostgresStorage {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    /// Readings waiting for a batch, one lane per connection by device: batches written at
    /// the same time touch different devices, so their connections do not contend for the
    /// same index pages (measured: twice the rate of mixed batches on 2 cores).
    readings: Vec<Vec<VitalRow>>,
    alerts: Vec<AlertRow>,
    /// Batches being written, oldest first.
    in_flight: VecDeque<JoinHandle<Result<(), (Batch, PgError)>>>,
    spool: Spool,
    /// Set by `close`: how long a full spool may hold up shutdown.
    deadline: Option<Instant>,
    maintained_day: i32,
}

impl PostgresStorage {
    /// Opens the spool and the pool, and sets the database up if it answers. An unreachable
    /// database is not an error (readings go to the spool until it is back); a bad URL or a
    /// schema that cannot be migrated is.
    pub fn open(config: &PostgresConfig) -> Result<PostgresStorage, StorageError> {
        if config.batch_rows == 0 || config.connections == 0 {
            return Err(
                PgError::Config("batch_rows and connections must be at least 1".into()).into(),
            );
        }
        if config.flush_interval.is_zero() {
            return Err(PgError::Config("flush_interval must be positive".into()).into());
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("postgres")
            .enable_all()
            .build()?;
        let spool = Spool::open(&config.spool_dir, config.spool_max_bytes)?;
        let metrics = Arc::new(StorageMetrics::default());
        let shared = Arc::new(Shared {
            pool: rt.block_on(async { pool(config) })?,
            config: config.clone(),
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            flavour: OnceCell::new(),
            partitions: Partitions::default(),
            linked: Default::default(),
            metrics,
        });
        let setup =
            rt.block_on(async { tokio::time::timeout(config.call_timeout, shared.setup()).await });
        match setup {
            Ok(Ok(_)) => {}
            Ok(Err(e @ (PgError::Schema(_) | PgError::Config(_)))) => return Err(e.into()),
            Ok(Err(e)) if e.is_data_error() => return Err(e.into()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, url = %redact(&config.url), "database unreachable at start: readings go to the spool until it answers");
            }
            Err(_) => {
                tracing::error!(url = %redact(&config.url), "database did not answer at start: readings go to the spool until it does")
            }
        }
        let storage = PostgresStorage {
            rt,
            shared,
            readings: (0..config.connections)
                .map(|_| Vec::with_capacity(config.batch_rows))
                .collect(),
            alerts: Vec::new(),
            in_flight: VecDeque::new(),
            spool,
            deadline: None,
            maintained_day: schema::day_of(now_micros()),
        };
        storage.publish_spool_size();
        Ok(storage)
    }

    /// The writer's counters, live.
    pub fn metrics(&self) -> Arc<StorageMetrics> {
        self.shared.metrics.clone()
    }

    fn publish_spool_size(&self) {
        let m = &self.shared.metrics;
        m.spool_records.store(self.spool.records(), Relaxed);
        m.spool_bytes.store(self.spool.bytes(), Relaxed);
    }

    /// Starts writing a batch on a free connection; waits for the oldest batch in flight
    /// when all connections are busy.
    fn dispatch(&mut self, batch: Batch) -> Result<(), StorageError> {
        while self.in_flight.len() >= self.shared.config.connections {
            let oldest = self.in_flight.pop_front().expect("in_flight is not empty");
            self.settle(oldest)?;
        }
        let task = self.rt.spawn(self.shared.clone().write(batch));
        self.in_flight.push_back(task);
        Ok(())
    }

    /// Waits for a batch in flight; one the database did not take goes to the spool.
    fn settle(
        &mut self,
        task: JoinHandle<Result<(), (Batch, PgError)>>,
    ) -> Result<(), StorageError> {
        let result = self.rt.block_on(task).map_err(|e| {
            StorageError::Io(std::io::Error::other(format!("postgres writer task: {e}")))
        })?;
        match result {
            Ok(()) => Ok(()),
            Err((batch, e)) if e.is_data_error() => self.isolate(batch, &e),
            Err((batch, _)) => self.spool_batch(&batch),
        }
    }

    /// The database refused a batch as data: halves it until the refused rows are alone,
    /// so one bad row does not take good ones down with it.
    fn isolate(&mut self, batch: Batch, error: &PgError) -> Result<(), StorageError> {
        let halves = match batch {
            Batch::Readings(mut rows) if rows.len() > 1 => {
                let tail = rows.split_off(rows.len() / 2);
                [Batch::Readings(rows), Batch::Readings(tail)]
            }
            Batch::Alerts(mut rows) if rows.len() > 1 => {
                let tail = rows.split_off(rows.len() / 2);
                [Batch::Alerts(rows), Batch::Alerts(tail)]
            }
            single => return self.refuse(&single, error),
        };
        for half in halves {
            match self.rt.block_on(self.shared.clone().write(half)) {
                Ok(()) => {}
                Err((half, e)) if e.is_data_error() => self.isolate(half, &e)?,
                Err((half, _)) => self.spool_batch(&half)?,
            }
        }
        Ok(())
    }

    /// Puts a batch in the spool. A full spool holds the caller (and so, through the
    /// bounded queues, the sources) until draining makes room.
    fn spool_batch(&mut self, batch: &Batch) -> Result<(), StorageError> {
        let payload = serde_json::to_vec(batch).map_err(std::io::Error::other)?;
        let mut warned = false;
        loop {
            match self.spool.append(&payload) {
                Ok(()) => break,
                Err(SpoolError::Full { bytes, max }) => {
                    if !warned {
                        tracing::error!(
                            bytes,
                            max,
                            "spool full: holding input until the database takes the backlog"
                        );
                        warned = true;
                    }
                    if self.deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(SpoolError::Full { bytes, max }.into());
                    }
                    if self.drain(Duration::from_secs(1), true)? == 0 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                Err(SpoolError::Io(e)) => return Err(e.into()),
            }
        }
        self.shared
            .metrics
            .rows_spooled
            .fetch_add(batch.len() as u64, Relaxed);
        self.publish_spool_size();
        Ok(())
    }

    /// Keeps a batch the database refused as data beside the spool, for a person.
    fn refuse(&mut self, batch: &Batch, error: &PgError) -> Result<(), StorageError> {
        let path = self
            .shared
            .config
            .spool_dir
            .join(format!("refused-{}.json", now_micros()));
        let record = serde_json::json!({ "error": error.to_string(), "batch": batch });
        std::fs::write(
            &path,
            serde_json::to_vec(&record).map_err(std::io::Error::other)?,
        )?;
        self.shared
            .metrics
            .rows_refused
            .fetch_add(batch.len() as u64, Relaxed);
        tracing::error!(error = %error, rows = batch.len(), kept = %path.display(), "database refused a batch as data");
        Ok(())
    }

    /// Writes spooled batches, oldest first, for up to `budget`; returns how many went. With
    /// `wait`, a failure or an open breaker pauses the drain instead of ending it.
    fn drain(&mut self, budget: Duration, wait: bool) -> Result<usize, StorageError> {
        let started = Instant::now();
        let (mut drained, mut failures) = (0, 0);
        while !self.spool.is_empty() && started.elapsed() < budget {
            let Some(payload) = self.spool.peek()? else {
                break;
            };
            let batch: Batch = match serde_json::from_slice(&payload) {
                Ok(b) => b,
                Err(e) => {
                    let kept = self
                        .shared
                        .config
                        .spool_dir
                        .join(format!("unreadable-{}.json", now_micros()));
                    std::fs::write(&kept, &payload)?;
                    tracing::error!(error = %e, kept = %kept.display(), "spooled batch unreadable; kept aside");
                    self.spool.pop()?;
                    continue;
                }
            };
            match self.rt.block_on(self.shared.attempt(&batch)) {
                Ok(()) => {}
                Err(e) if e.is_data_error() => self.isolate(batch.clone(), &e)?,
                // Waiting: for the breaker's cooldown, and through up to three failed probes.
                Err(PgError::CircuitOpen) if wait => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(_) if wait && failures < 2 => {
                    failures += 1;
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(_) => break,
            }
            failures = 0;
            self.spool.pop()?;
            self.shared
                .metrics
                .rows_replayed
                .fetch_add(batch.len() as u64, Relaxed);
            drained += 1;
            if self.spool.is_empty() {
                tracing::info!("spool drained");
            }
        }
        self.publish_spool_size();
        Ok(drained)
    }

    /// Sends lane `lane`'s readings as a batch.
    fn dispatch_lane(&mut self, lane: usize) -> Result<(), StorageError> {
        let rows = std::mem::replace(
            &mut self.readings[lane],
            Vec::with_capacity(self.shared.config.batch_rows),
        );
        self.dispatch(Batch::Readings(rows))
    }

    fn dispatch_pending(&mut self) -> Result<(), StorageError> {
        for lane in 0..self.readings.len() {
            if !self.readings[lane].is_empty() {
                self.dispatch_lane(lane)?;
            }
        }
        if !self.alerts.is_empty() {
            let rows = std::mem::take(&mut self.alerts);
            self.dispatch(Batch::Alerts(rows))?;
        }
        Ok(())
    }

    /// Daily: the next partitions (PostgreSQL fallback) and retention.
    fn maintain(&mut self) {
        let today = schema::day_of(now_micros());
        if today == self.maintained_day || !self.shared.breaker.is_closed() {
            return;
        }
        let shared = self.shared.clone();
        let done = self.rt.block_on(async move {
            if shared.setup().await? == Flavour::Postgres {
                let mut client = shared.pool.get().await?;
                shared.maintain_partitions(&mut client).await?;
            }
            Ok::<(), PgError>(())
        });
        match done {
            Ok(()) => self.maintained_day = today,
            Err(e) => {
                tracing::warn!(error = %e, "partition maintenance failed; retried at the next flush")
            }
        }
    }
}

impl Storage for PostgresStorage {
    fn write_readings(&mut self, readings: &[Sample]) -> Result<(), StorageError> {
        for s in readings {
            let lane = rustc_hash::FxBuildHasher.hash_one(s.device_id.as_str()) as usize
                % self.readings.len();
            self.readings[lane].push(VitalRow::from(s));
            if self.readings[lane].len() >= self.shared.config.batch_rows {
                self.dispatch_lane(lane)?;
            }
        }
        Ok(())
    }

    fn write_alerts(&mut self, events: &[AlertEvent]) -> Result<(), StorageError> {
        self.alerts.extend(events.iter().map(AlertRow::from));
        Ok(())
    }

    fn flush_interval(&self) -> Duration {
        self.shared.config.flush_interval
    }

    /// Returns once everything handed over is in the database or the spool; then gives the
    /// spool up to a second to drain.
    fn flush(&mut self) -> Result<(), StorageError> {
        self.dispatch_pending()?;
        while let Some(task) = self.in_flight.pop_front() {
            self.settle(task)?;
        }
        self.maintain();
        if !self.spool.is_empty() {
            self.drain(Duration::from_secs(1), false)?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), StorageError> {
        self.deadline = Some(Instant::now() + self.shared.config.shutdown_timeout);
        self.flush()?;
        if !self.spool.is_empty() {
            self.drain(self.shared.config.shutdown_timeout, true)?;
        }
        if !self.spool.is_empty() {
            tracing::warn!(
                records = self.spool.records(),
                dir = %self.shared.config.spool_dir.display(),
                "stopping with batches in the spool; they are written at the next start"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=h user=u"), "host=h user=u");
    }

    #[test]
    fn the_flush_interval_is_the_stores_and_must_be_positive() {
        let config = PostgresConfig {
            flush_interval: Duration::ZERO,
            ..PostgresConfig::default()
        };
        let err = PostgresStorage::open(&config).err().expect("refused");
        assert!(err.to_string().contains("flush_interval"), "{err}");
        let parsed: PostgresConfig = toml::from_str("flush_interval = \"20ms\"").unwrap();
        assert_eq!(parsed.flush_interval, Duration::from_millis(20));
        assert_eq!(
            PostgresConfig::default().flush_interval,
            Duration::from_millis(50)
        );
    }
}
