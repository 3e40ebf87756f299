//! Wiring: starts the sink threads, the engine and the sources for `vitalstream run` and
//! `vitalstream replay`, and shuts them down in order — sources first, then the engine
//! drains, then every sink flushes and closes.

use crate::ack::{self, Ack};
use crate::alerts::AlertEvent;
use crate::api;
use crate::config::{Config, Role, SourceConfig, StorageConfig};
use crate::engine::Control;
use crate::engine::{EndOfInput, Engine, EngineConfig, Outputs, ReadingBatch, RejectBatch};
use crate::metrics::{LatencySnapshot, Snapshot};
use crate::model::{ClockMode, FrameBatch};
use crate::rules::RuleSet;
use crate::rules::{self, RuleSpec};
use crate::sinks::Storage;
use crate::sinks::alert_log::{AlertLog, AlertLogConfig};
use crate::sinks::dead_letter::{DeadLetter, DeadLetterConfig};
use crate::sinks::events::EventPublisher;
use crate::sinks::parquet::ParquetStorage;
use crate::sinks::postgres::PostgresStorage;
use crate::sinks::postgres::query::Db;
use crate::sources::{SourceHandle, SourceNames, mqtt, replay, simulator};
use anyhow::Context;
use crossbeam_channel::{Receiver, bounded, select};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The sink threads, joined after the engine has drained.
struct Sinks {
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
    /// Where the notifier finds the engine's alert book, to record escalations.
    book: crate::tasks::notifier::BookSlot,
}

impl Sinks {
    fn join(self) -> anyhow::Result<()> {
        let mut result = Ok(());
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!("sink failed: {e:#}");
                    result = Err(e);
                }
                Err(_) => result = Err(anyhow::anyhow!("a sink thread panicked")),
            }
        }
        result
    }
}

/// Starts the sinks and returns the engine outputs that feed them.
fn start_sinks(
    alert_log: Option<&AlertLogConfig>,
    dead_letter: Option<&DeadLetterConfig>,
    storage: Option<Box<dyn Storage>>,
    bus: Option<api::AlertBus>,
    kafka: Option<(Arc<EventPublisher>, Arc<SourceNames>)>,
    notifications: Option<&crate::tasks::notifier::NotificationsConfig>,
) -> anyhow::Result<(Outputs, Sinks)> {
    let events = kafka.as_ref().map(|k| k.0.clone());
    let mut threads = Vec::new();
    let book = crate::tasks::notifier::BookSlot::default();
    let notifier = notifications
        .map(|n| crate::tasks::notifier::start(n.clone(), book.clone()))
        .transpose()
        .context("starting the notifier")?;
    let (notify, notifier_thread) = notifier.unzip();
    let (alert_tx, alert_rx) = bounded::<AlertEvent>(4096);
    let (stored_alerts_tx, stored_alerts_rx) = bounded::<Vec<AlertEvent>>(64);
    let mut log = alert_log
        .map(AlertLog::open)
        .transpose()
        .context("opening the alert log")?;
    let to_storage = storage.is_some().then_some(stored_alerts_tx);
    // The live push is not here: the engine puts each transition on the bus itself (see
    // `Outputs::live`), a thread wake-up sooner.
    threads.push(spawn("alert-sink", move || {
        for event in &alert_rx {
            let mut batch = vec![event];
            batch.extend(alert_rx.try_iter().take(1023));
            if let Some(events) = &events {
                for e in &batch {
                    if let Err(err) = events.alert(e) {
                        tracing::error!(error = %err, alert_id = %e.alert.alert_id, "alert event not queued for Kafka");
                    }
                }
            }
            if let Some(log) = &mut log {
                for e in &batch {
                    log.write(e).context("writing the alert log")?;
                }
                log.flush().context("flushing the alert log")?;
            }
            if let Some(notify) = &notify {
                for e in &batch {
                    if notify.blocking_send(e.clone()).is_err() {
                        tracing::error!(alert_id = %e.alert.alert_id, "the notifier stopped; no notification task for this alert");
                    }
                }
            }
            if let Some(tx) = &to_storage {
                let _ = tx.send(batch);
            }
        }
        // The notifier publishes what waits, then ends.
        drop(notify);
        if let Some(thread) = notifier_thread
            && thread.join().is_err()
        {
            tracing::error!("the notifier panicked");
        }
        Ok(())
    }));

    let readings = match storage {
        Some(storage) => {
            let (tx, rx) = bounded::<ReadingBatch>(16);
            threads.push(spawn("storage", move || {
                run_storage(storage, rx, stored_alerts_rx)
            }));
            Some(tx)
        }
        None => None,
    };

    let rejects = match dead_letter {
        Some(config) => {
            let mut dlq = DeadLetter::open(config).context("opening the dead-letter output")?;
            let (tx, rx) = bounded::<RejectBatch>(64);
            threads.push(spawn("dead-letter", move || {
                for batch in rx {
                    for r in &batch.rejects {
                        dlq.write(r).context("writing the dead-letter output")?;
                        if let Some((events, names)) = &kafka {
                            let source = names.get(r.source);
                            let source = source.as_deref().unwrap_or("unknown");
                            if let Err(err) = events.dead_letter(r, source) {
                                tracing::error!(error = %err, "dead letter not queued for Kafka");
                            }
                        }
                    }
                    dlq.flush().context("flushing the dead-letter output")?;
                    if let Some(ack) = batch.ack {
                        ack.done();
                    }
                }
                Ok(())
            }));
            Some(tx)
        }
        None => None,
    };
    let outputs = Outputs {
        alerts: alert_tx,
        live: bus,
        readings,
        rejects,
        latest: None,
    };
    Ok((outputs, Sinks { threads, book }))
}

fn spawn(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> JoinHandle<anyhow::Result<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawning a sink thread")
}

/// The storage thread: writes readings and alerts as they come, flushes what it holds at
/// least once per the store's `flush_interval`, and closes the store when both inputs have
/// ended. A batch's ack is done only after the flush that makes it durable; if a write or
/// flush fails, the thread stops and the acks it holds are dropped undone, so their sources
/// do not acknowledge.
fn run_storage(
    mut storage: Box<dyn Storage>,
    readings: Receiver<ReadingBatch>,
    alerts: Receiver<Vec<AlertEvent>>,
) -> anyhow::Result<()> {
    let mut unflushed: Vec<Ack> = Vec::new();
    let mut readings_open = true;
    let mut alerts_open = true;
    let mut last_flush = Instant::now();
    let mut dirty = false;
    let linger = storage.flush_interval();
    while readings_open || alerts_open {
        // Holding something: until its flush is due. Idle: a whole interval.
        let wait = if dirty {
            linger.saturating_sub(last_flush.elapsed())
        } else {
            linger
        };
        let timeout = crossbeam_channel::after(wait);
        let (no_readings, no_alerts) = (crossbeam_channel::never(), crossbeam_channel::never());
        select! {
            recv(if readings_open { &readings } else { &no_readings }) -> msg => match msg {
                Ok(batch) => {
                    storage.write_readings(&batch.readings)?;
                    unflushed.extend(batch.ack);
                    dirty = true;
                }
                Err(_) => readings_open = false,
            },
            recv(if alerts_open { &alerts } else { &no_alerts }) -> msg => match msg {
                Ok(batch) => { storage.write_alerts(&batch)?; dirty = true; }
                Err(_) => alerts_open = false,
            },
            recv(timeout) -> _ => {},
        }
        if dirty && last_flush.elapsed() >= linger {
            storage.flush()?;
            ack::all_done(unflushed.drain(..));
            dirty = false;
            last_flush = Instant::now();
        }
    }
    storage.close()?;
    ack::all_done(unflushed);
    Ok(())
}

/// The pipeline's rules with the changes made at runtime (REST) and kept in PostgreSQL.
/// When the database cannot be read, the pipeline's rules alone (and a warning).
fn with_runtime_rules(config: &Config, pipeline: RuleSet) -> RuleSet {
    let Some(StorageConfig::Postgres(pg)) = &config.storage else {
        return pipeline;
    };
    let changes = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let db = tokio::time::timeout(pg.connect_timeout, Db::connect(pg)).await??;
                Ok::<_, anyhow::Error>((db.runtime_rules().await?, db.rule_failures().await?))
            })
        });
    let (changes, failures) = match changes {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "rules changed at runtime could not be read; using the pipeline's");
            return pipeline;
        }
    };
    let mut specs: Vec<RuleSpec> = pipeline.rules.iter().map(|r| r.spec.clone()).collect();
    for (id, spec) in changes {
        // A stored rule that no longer passes (saved before a limit existed, say) is left
        // out on its own, loudly; it does not take the other runtime rules with it.
        if let Some(spec) = &spec {
            let mut problems = Vec::new();
            if rules::compile_rule(spec, &mut problems).is_none() {
                tracing::error!(rule = %id, ?problems, "a rule stored at runtime no longer passes validation: not loaded (replace it through the API)");
                continue;
            }
        }
        specs.retain(|s| s.id != id);
        specs.extend(spec);
    }
    match rules::compile(&specs) {
        Ok(mut set) => {
            // A definition that failed before the restart starts disabled, with its reason.
            for (id, definition, reason) in failures {
                let same = set.get(&id).is_some_and(|rule| {
                    serde_json::to_value(&rule.spec).is_ok_and(|spec| spec == definition)
                });
                if same {
                    set.failed.insert(id, reason);
                }
            }
            set
        }
        Err(e) => {
            tracing::error!(problems = ?e.problems, "rules changed at runtime do not compile; using the pipeline's");
            pipeline
        }
    }
}

/// With PostgreSQL storage, records each SQL rule the engine disables (its definition and
/// why), so a restart loads that definition disabled instead of failing the same way.
/// The thread ends with the engine's SQL stage (it is not waited for at a stop).
fn record_rule_failures(config: &Config, engine: &Engine) {
    let Some(StorageConfig::Postgres(pg)) = &config.storage else {
        return;
    };
    let (tx, rx) = crossbeam_channel::unbounded::<(Arc<crate::rules::Rule>, String)>();
    if engine.control().sql.failures.set(tx).is_err() {
        return;
    }
    let pg = pg.clone();
    spawn_source("rule-failures", move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        for (rule, reason) in rx {
            let recorded = rt.block_on(async {
                let db = tokio::time::timeout(pg.connect_timeout, Db::connect(&pg)).await??;
                Ok::<_, anyhow::Error>(db.rule_failed(&rule.spec, &reason).await?)
            });
            if let Err(e) = recorded {
                tracing::error!(rule = %rule.id, error = %e, "a disabled rule could not be recorded: a restart runs it again");
            }
        }
    });
}

/// The HTTP server, on its own thread and runtime.
struct ApiServer {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<std::io::Result<()>>,
    /// `notification:new` to socket.io rooms (the worker tells of reports this way).
    notices: crate::tasks::worker::Announce,
}

impl ApiServer {
    fn stop(self) {
        let _ = self.stop.send(());
        match self.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "API server failed"),
            Err(_) => tracing::error!("API server thread panicked"),
        }
    }
}

fn start_api(
    config: &Config,
    control: Control,
    bus: api::AlertBus,
    mqtt: Option<(mqtt::Commands, Arc<crate::link::Link>)>,
    kafka_up: Option<Arc<AtomicBool>>,
) -> anyhow::Result<ApiServer> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("api")
        .enable_all()
        .build()?;
    let listen = config.api.listen;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| format!("binding the API to {listen}"))?;
    let addr = listener.local_addr()?;
    let storage = match &config.storage {
        Some(StorageConfig::Postgres(pg)) => Some(pg.clone()),
        _ => None,
    };
    // Report requests go to RabbitMQ through a publisher of the API's own.
    let tasks = config.notifications.as_ref().map(|n| {
        let _runtime = rt.enter();
        crate::tasks::publisher::Publisher::start(n.url.clone(), n.buffer).0
    });
    let state = api::ApiState::with_bus(&config.api, control, storage, Some(bus.clone()))
        .with_mqtt(mqtt.clone().map(|m| m.0), mqtt.map(|m| m.1))
        .with_kafka(kafka_up)
        .with_tasks(tasks);
    let notices = state.notices.clone();
    if config.api.dev_token {
        let lifetime = state.keys.max_lifetime();
        let token = state.keys.sign(&api::auth::Claims::issue(
            "developer",
            api::auth::Role::Admin,
            None,
            lifetime,
        ));
        let page = format!("http://{addr}/?token={token}");
        tracing::info!(
            url = %format!("http://{addr}/api/v1"),
            dev_token = %token,
            page = %page,
            "API listening. Live ward page: {page} (development mode: an admin token for {}; \
             a config file without `dev_token = true` turns it off)",
            humantime::format_duration(lifetime)
        );
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "development mode on an address other machines can reach: anyone can sign \
                 an admin token with the public development secret"
            );
        }
    } else {
        tracing::info!(url = %format!("http://{addr}/api/v1"), "API listening");
    }
    let router = rt
        .block_on(api::app(&config.api, state))
        .context("starting socket.io (is [api] redis_url reachable?)")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let api_config = config.api.clone();
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            rt.block_on(api::serve(listener, router, &api_config, async {
                let _ = stopped.await;
            }))
        })?;
    Ok(ApiServer {
        stop,
        thread,
        notices,
    })
}

/// Opens the configured store.
pub fn open_storage(config: &StorageConfig) -> anyhow::Result<Box<dyn Storage>> {
    Ok(match config {
        StorageConfig::Parquet(p) => Box::new(
            ParquetStorage::open(p)
                .with_context(|| format!("opening Parquet storage in {}", p.dir.display()))?,
        ),
        StorageConfig::Postgres(p) => {
            Box::new(PostgresStorage::open(p).context("opening PostgreSQL storage")?)
        }
    })
}

fn spawn_source(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawning a source thread")
}

/// `vitalstream run`: the service, until `stop` is set.
pub fn run(config: &Config, stop: Arc<AtomicBool>) -> anyhow::Result<Snapshot> {
    if config.role == Role::Ingest {
        return run_ingest(config, stop);
    }
    // Outside development mode, no API with a secret anyone can sign tokens with.
    if config.api.enabled
        && let Some(problem) = config.api.secret_problem()
    {
        anyhow::bail!("refusing to start the API: {problem}");
    }
    let storage = config.storage.as_ref().map(open_storage).transpose()?;
    // SQL rules are checked against this config's window and slide limits, from the first
    // one loaded.
    crate::rules::sql::set_policy(config.engine.sql_policy());
    let rules = with_runtime_rules(config, config.rules()?);
    tracing::info!(pipeline = %config.pipeline, rules = rules.rules.len(), "starting");
    let bus = config
        .api
        .enabled
        .then(|| tokio::sync::broadcast::channel(16_384).0);
    // Each source's name, by engine source id (a Kafka source has one per partition), for
    // the dead letters on Kafka.
    let names = Arc::new(SourceNames::default());
    let kafka = match &config.kafka {
        Some(k) => {
            let events = EventPublisher::new(k).context("creating the Kafka producer")?;
            Some((Arc::new(events), names.clone()))
        }
        None => None,
    };
    let (mut outputs, sinks) = start_sinks(
        Some(&config.alert_log),
        Some(&config.dead_letter),
        storage,
        bus.clone(),
        kafka.clone(),
        config.notifications.as_ref(),
    )?;
    // Screens want each patient's latest vitals: gathered only when the API is on.
    outputs.latest = bus.is_some().then(Default::default);
    let mut engine = Engine::start(&config.engine, rules, outputs);
    record_rule_failures(config, &engine);
    let _ = sinks.book.set(Arc::downgrade(&engine.book));
    // Device changes to Kafka (device.events).
    let device_events = kafka.as_ref().and_then(|(events, _)| {
        let (events, changes) = (events.clone(), engine.devices.listen()?);
        Some(spawn_source("device-events", move || {
            for change in changes {
                if let Err(e) = events.device(&change) {
                    tracing::error!(error = %e, "device event not queued for Kafka");
                }
            }
        }))
    });
    // MQTT connections are made first: the API sends device commands through the first.
    let mut mqtt_sources: Vec<mqtt::MqttSource> = config
        .sources
        .iter()
        .filter_map(|s| match s {
            SourceConfig::Mqtt(c) => Some(mqtt::MqttSource::with_frame_limit(
                c,
                config.engine.max_frame_bytes,
            )),
            _ => None,
        })
        .collect();
    let commands = mqtt_sources.first().map(|m| (m.commands(), m.link()));
    // Kafka consumers too, so that `/ready` can report them.
    let mut kafka_sources = Vec::new();
    for source in &config.sources {
        if let SourceConfig::Kafka(k) = source {
            // Partitions arriving here are re-read far enough back for every rule.
            let needed = engine.rules().memory() + config.engine.allowed_lateness;
            let k = crate::sources::kafka::KafkaSourceConfig {
                rebuild: k.rebuild.max(needed),
                ..k.clone()
            };
            kafka_sources.push(
                crate::sources::kafka::KafkaSource::new(&k)
                    .context("creating the Kafka consumer")?,
            );
        }
    }
    let kafka_up = kafka_sources.first().map(|k| k.connected());
    let api = match bus {
        Some(bus) => Some(start_api(
            config,
            engine.control(),
            bus,
            commands,
            kafka_up,
        )?),
        None => None,
    };
    // The worker, when configured, runs beside the service and tells of reports through
    // its socket.io.
    let worker = config.worker.clone().map(|mut w| {
        w.wards = config.engine.wards.clone();
        let announce = api.as_ref().map(|a| a.notices.clone());
        let stop = stop.clone();
        spawn_source("worker", move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the worker");
            let metrics = Arc::new(crate::tasks::worker::WorkerMetrics::default());
            runtime.block_on(crate::tasks::worker::run(
                w,
                metrics,
                announce,
                async move {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            ));
        })
    });
    let mut sources = Vec::new();
    for source in &config.sources {
        match source {
            SourceConfig::Simulator(sim) => {
                let handle = engine.source(ClockMode::Live).named(&names, "simulator");
                let (sim, stop) = (sim.clone(), stop.clone());
                sources.push(spawn_source("simulator", move || {
                    let stats = simulator::run(&sim, handle, &stop);
                    tracing::info!(
                        readings = stats.readings,
                        episodes = stats.episodes,
                        "simulator stopped"
                    );
                }));
            }
            SourceConfig::Kafka(_) => {
                let source = kafka_sources.remove(0);
                let handle = engine.source(ClockMode::Live).named(&names, "kafka");
                let stop = stop.clone();
                sources.push(spawn_source("kafka", move || {
                    let stats = source.run(handle, &stop);
                    tracing::info!(
                        records = stats.records,
                        rebuilt = stats.warmup_records,
                        commits = stats.commits,
                        pauses = stats.pauses,
                        rebalances = stats.rebalances,
                        "Kafka source stopped"
                    );
                }));
            }
            SourceConfig::Mqtt(_) => {
                let source = mqtt_sources.remove(0);
                let handle = engine.source(ClockMode::Live).named(&names, "mqtt");
                let (devices, stop) = (engine.device_context(), stop.clone());
                sources.push(spawn_source("mqtt", move || {
                    source.run(handle, &devices, &stop);
                }));
            }
        }
    }
    let mut last = (Instant::now(), engine.metrics.snapshot());
    while !stop.load(Ordering::Relaxed) && !sources.iter().all(|s| s.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        if last.0.elapsed() >= config.status_interval {
            let now = engine.metrics.snapshot();
            let secs = last.0.elapsed().as_secs_f64();
            let (input_q, shard_q) = engine.queue_depths();
            tracing::info!(
                readings_per_s = ((now.accepted - last.1.accepted) as f64 / secs).round(),
                accepted = now.accepted,
                rejected = now.rejected,
                late = now.late,
                duplicates = now.duplicates,
                alert_events = now.alert_events,
                active_alerts = engine.book.active().len(),
                input_queue = input_q,
                shard_queues = shard_q,
                "status"
            );
            last = (Instant::now(), now);
        }
    }
    tracing::info!("stopping: draining sources, engine and sinks");
    stop.store(true, Ordering::Relaxed);
    for s in sources {
        let _ = s.join();
    }
    // A task in the worker's hands when it stops is not acknowledged: RabbitMQ keeps it.
    if let Some(w) = worker {
        let _ = w.join();
    }
    if let Some(api) = api {
        api.stop();
    }
    let metrics = engine.metrics.clone();
    drop(device_events);
    engine.join(EndOfInput::KeepOpen);
    sinks.join()?;
    if let Some((events, _)) = &kafka
        && let Err(e) = events.flush(Duration::from_secs(10))
    {
        tracing::error!(error = %e, "Kafka events not all delivered at shutdown");
    }
    let snapshot = metrics.snapshot();
    tracing::info!(
        accepted = snapshot.accepted,
        rejected = snapshot.rejected,
        "stopped cleanly"
    );
    Ok(snapshot)
}

/// `vitalstream run` with `role = "ingest"`: device traffic in, `vitals.raw` out, keyed by
/// device id, for the rule nodes of a consumer group. No engine and no storage: device
/// status and technical alerts still become `device.events` and `alert.events`, and
/// messages it cannot read go to the dead-letter topic.
fn run_ingest(config: &Config, stop: Arc<AtomicBool>) -> anyhow::Result<Snapshot> {
    let kafka = (config.kafka.as_ref()).context("role = \"ingest\" needs a [kafka] section")?;
    let forwarder = crate::sinks::forward::Forwarder::new(kafka, &kafka.raw_topic)
        .context("creating the Kafka producer")?;
    let events = Arc::new(EventPublisher::new(kafka).context("creating the Kafka producer")?);
    tracing::info!(brokers = %kafka.brokers, topic = %kafka.raw_topic, "ingest node starting");

    // What devices say about themselves, published as the rule nodes would.
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let (alerts_tx, alerts) = crossbeam_channel::bounded::<crate::alerts::AlertEvent>(1024);
    let (rejects_tx, rejects) = crossbeam_channel::bounded::<RejectBatch>(64);
    let registry = Arc::new(crate::devices::DeviceRegistry::default());
    let devices = crate::sources::DeviceContext {
        book: Arc::new(crate::alerts::AlertBook::new(alerts_tx, metrics.clone())),
        registry: registry.clone(),
        metrics: metrics.clone(),
        dead_letter: Some(rejects_tx),
        // An ingest node knows no assignments: device alerts are the device's own here.
        assignments: Default::default(),
    };
    let mut helpers = Vec::new();
    let changes = registry
        .listen()
        .context("device registry listened to twice")?;
    {
        let events = events.clone();
        helpers.push(spawn_source("device-events", move || {
            loop {
                let published = select! {
                    recv(alerts) -> e => match e {
                        Ok(e) => events.alert(&e),
                        Err(_) => break,
                    },
                    recv(changes) -> c => match c {
                        Ok(c) => events.device(&c),
                        Err(_) => continue,
                    },
                };
                if let Err(e) = published {
                    tracing::error!(error = %e, "device event not queued for Kafka");
                }
            }
            for change in changes.try_iter() {
                let _ = events.device(&change);
            }
        }));
    }
    {
        let events = events.clone();
        helpers.push(spawn_source("dead-letter", move || {
            for batch in rejects {
                let sent = (batch.rejects.iter()).all(|r| events.dead_letter(r, "mqtt").is_ok());
                if let (true, Some(ack)) = (sent, batch.ack) {
                    ack.done();
                }
            }
        }));
    }

    let (tx, rx) = crossbeam_channel::bounded::<FrameBatch>(64);
    let mut sources = Vec::new();
    for (i, source) in config.sources.iter().enumerate() {
        let handle = SourceHandle::to_channel(tx.clone(), i as u16, ClockMode::Live);
        let stop = stop.clone();
        match source {
            SourceConfig::Mqtt(c) => {
                // An ingest node parses nothing: a valid device's vitals topic marks it present.
                let source = mqtt::MqttSource::with_frame_limit(c, config.engine.max_frame_bytes)
                    .marking_presence_from_topics();
                let devices = devices.clone();
                sources.push(spawn_source("mqtt", move || {
                    source.run(handle, &devices, &stop);
                }));
            }
            SourceConfig::Simulator(sim) => {
                let sim = sim.clone();
                sources.push(spawn_source("simulator", move || {
                    simulator::run(&sim, handle, &stop);
                }));
            }
            SourceConfig::Kafka(_) => anyhow::bail!("an ingest node does not read Kafka"),
        }
    }
    drop((tx, devices));
    let forwarding = {
        let metrics = forwarder.metrics.clone();
        let thread = spawn_source("forward", move || {
            forwarder.run(rx, Duration::from_secs(30));
        });
        (thread, metrics)
    };
    let mut last = (Instant::now(), 0);
    while !stop.load(Ordering::Relaxed) && !sources.iter().all(|s| s.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        if last.0.elapsed() >= config.status_interval {
            let forwarded = forwarding.1.forwarded.load(Ordering::Relaxed);
            let secs = last.0.elapsed().as_secs_f64();
            tracing::info!(
                readings_per_s = ((forwarded - last.1) as f64 / secs).round(),
                forwarded,
                failed = forwarding.1.failed.load(Ordering::Relaxed),
                "status"
            );
            last = (Instant::now(), forwarded);
        }
    }
    tracing::info!("stopping: draining sources and the forwarder");
    stop.store(true, Ordering::Relaxed);
    for s in sources {
        let _ = s.join();
    }
    let _ = forwarding.0.join();
    for h in helpers {
        let _ = h.join();
    }
    if let Err(e) = events.flush(Duration::from_secs(10)) {
        tracing::error!(error = %e, "Kafka events not all delivered at shutdown");
    }
    let snapshot = metrics.snapshot();
    tracing::info!(
        forwarded = forwarding.1.forwarded.load(Ordering::Relaxed),
        failed = forwarding.1.failed.load(Ordering::Relaxed),
        "stopped cleanly"
    );
    Ok(snapshot)
}

/// Options for `vitalstream replay`.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub engine: EngineConfig,
    pub rules: RuleSet,
    /// Replay at this multiple of event time; 0 = as fast as possible.
    pub speed: f64,
    pub rejects: Option<DeadLetterConfig>,
    pub alerts: Option<AlertLogConfig>,
    /// Also store readings and alerts here.
    pub storage: Option<StorageConfig>,
}

/// The replay report.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub lines: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub late: u64,
    pub duplicates: u64,
    pub rules: BTreeMap<String, RuleReport>,
    pub elapsed_s: f64,
    pub readings_per_s: f64,
    /// Microseconds from a reading's receipt to the alert it raised.
    pub alert_latency_us: LatencySnapshot,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleReport {
    pub matches: u64,
    pub alerts_raised: u64,
    pub alerts_resolved: u64,
}

/// `vitalstream replay`: pushes a recording through the engine and reports what happened.
pub fn replay(input: impl Read, options: ReplayOptions) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let storage = options.storage.as_ref().map(open_storage).transpose()?;
    let (outputs, sinks) = start_sinks(
        options.alerts.as_ref(),
        options.rejects.as_ref(),
        storage,
        None,
        None,
        None,
    )?;
    let rule_ids: Vec<String> = options
        .rules
        .rules
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    let mut engine = Engine::start(&options.engine, options.rules, outputs);
    let handle = engine.source(ClockMode::Replay {
        speed: options.speed,
    });
    let stats = replay::run(input, handle, options.speed > 0.0).context("reading the recording")?;
    let metrics = engine.metrics.clone();
    engine.join(EndOfInput::CloseWindows);
    sinks.join()?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let snap = metrics.snapshot();
    let rules = rule_ids
        .into_iter()
        .map(|id| {
            let r = snap.rules.get(&id).cloned().unwrap_or_default();
            (
                id,
                RuleReport {
                    matches: r.matches,
                    alerts_raised: r.alerts_raised,
                    alerts_resolved: r.alerts_resolved,
                },
            )
        })
        .collect();
    Ok(ReplayReport {
        lines: stats.lines,
        accepted: snap.accepted,
        rejected: snap.rejected,
        rejected_by_reason: snap.rejected_by_reason,
        late: snap.late,
        duplicates: snap.duplicates,
        rules,
        elapsed_s,
        readings_per_s: if elapsed_s > 0.0 {
            stats.lines as f64 / elapsed_s
        } else {
            0.0
        },
        alert_latency_us: snap.alert_latency_us,
    })
}

/// Waits for SIGINT or SIGTERM, then sets `stop`.
pub fn stop_on_signal(stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot listen for signals: {e}");
                    return;
                }
            };
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing the SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                }
            });
            stop.store(true, Ordering::Relaxed);
        })
        .expect("spawning the signal thread");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CorrelationId, Sample, Vitals};
    use crate::sinks::StorageError;
    use std::sync::Mutex;

    /// A store that records what happens to it, and can be told to fail.
    #[derive(Clone, Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<&'static str>>>,
        fail_writes: bool,
    }

    impl Storage for Recorder {
        fn write_readings(&mut self, _: &[Sample]) -> Result<(), StorageError> {
            if self.fail_writes {
                return Err(std::io::Error::other("disk full").into());
            }
            self.log.lock().unwrap().push("write");
            Ok(())
        }
        fn write_alerts(&mut self, _: &[AlertEvent]) -> Result<(), StorageError> {
            Ok(())
        }
        fn flush(&mut self) -> Result<(), StorageError> {
            self.log.lock().unwrap().push("flush");
            Ok(())
        }
        fn close(&mut self) -> Result<(), StorageError> {
            self.log.lock().unwrap().push("close");
            Ok(())
        }
    }

    fn batch(log: &Arc<Mutex<Vec<&'static str>>>) -> ReadingBatch {
        let sample = Sample {
            device_id: "d1".into(),
            patient_id: None,
            ts: 0,
            device_ts: true,
            received_us: 0,
            vitals: Vitals::default(),
            seq: None,
            correlation_id: CorrelationId::Generated(0),
            late: false,
            warmup: false,
        };
        let log = log.clone();
        ReadingBatch {
            readings: vec![sample],
            ack: Some(Ack::new(move |durable| {
                log.lock()
                    .unwrap()
                    .push(if durable { "acked" } else { "not acked" })
            })),
        }
    }

    #[test]
    fn readings_are_acknowledged_after_the_flush_that_makes_them_durable() {
        let store = Recorder::default();
        let log = store.log.clone();
        let (readings_tx, readings) = bounded(4);
        let (_alerts_tx, alerts) = bounded(4);
        let thread = std::thread::spawn(move || run_storage(Box::new(store), readings, alerts));
        readings_tx.send(batch(&log)).unwrap();
        // The flush comes after the linger; the ack only after it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.lock().unwrap().contains(&"acked") {
            assert!(
                Instant::now() < deadline,
                "never acknowledged: {:?}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(readings_tx);
        drop(_alerts_tx);
        thread.join().unwrap().unwrap();
        assert_eq!(*log.lock().unwrap(), ["write", "flush", "acked", "close"]);
    }

    #[test]
    fn a_failed_write_is_not_acknowledged() {
        let store = Recorder {
            fail_writes: true,
            ..Recorder::default()
        };
        let log = store.log.clone();
        let (readings_tx, readings) = bounded(4);
        let (_alerts_tx, alerts) = bounded(4);
        let thread = std::thread::spawn(move || run_storage(Box::new(store), readings, alerts));
        readings_tx.send(batch(&log)).unwrap();
        let err = thread.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(*log.lock().unwrap(), ["not acked"]);
    }
}
