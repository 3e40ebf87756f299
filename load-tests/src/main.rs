//! `vitalstream-load`: replays device traffic into a vitalstream it starts, as deployed
//! (MQTT in, PostgreSQL, socket.io out), and measures the whole path.
//!
//! ```sh
//! cargo build --release
//! cargo run --release -p vitalstream-load -- run --scenario load-tests/scenarios/steady-ward.toml
//! ```
//!
//! One run: a database of its own, vitalstream started against it, a socket.io observer
//! connected, the scenario's traffic sent open-loop ([`mqtt`]), then a settling wait until
//! every acknowledged reading is stored and every expected alert has arrived (or `settle`
//! passes); the [`report`] compares what was sent with what was stored and seen.

mod broker;
mod kafka;
mod mqtt;
mod observe;
mod recording;
mod report;
mod scenario;
mod service;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one scenario and report.
    Run {
        #[arg(long)]
        scenario: PathBuf,
        /// The vitalstream binary to start.
        #[arg(long, default_value = "target/release/vitalstream")]
        vitalstream: PathBuf,
        /// Where the run's files and reports go (a directory per run).
        #[arg(long, default_value = "target/load-reports")]
        out: PathBuf,
        /// Keep the run's database afterwards (to look into it).
        #[arg(long)]
        keep_database: bool,
    },
    /// Record device traffic from an MQTT broker, to replay (`traffic.recording`).
    Record {
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker: String,
        #[arg(long, default_value = "devices/+/vitals")]
        topic: String,
        /// How long to listen (`60s`, `10m`).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (scenario, vitalstream, out, keep_database) = match Cli::parse().command {
        Command::Run {
            scenario,
            vitalstream,
            out,
            keep_database,
        } => (scenario, vitalstream, out, keep_database),
        Command::Record {
            broker,
            topic,
            duration,
            out,
        } => {
            let recording = recording::record(&broker, &topic, duration, &out);
            let (written, skipped) = runtime.block_on(recording)?;
            eprintln!(
                "{written} readings recorded to {} ({skipped} messages were not JSON objects)",
                out.display()
            );
            return Ok(());
        }
    };
    let report = runtime.block_on(run(scenario, vitalstream, out, keep_database))?;
    if !report.ok {
        anyhow::bail!("the run lost readings or missed or added alerts");
    }
    Ok(())
}

async fn run(
    scenario: PathBuf,
    binary: PathBuf,
    out: PathBuf,
    keep_database: bool,
) -> anyhow::Result<report::Report> {
    let mut scenario = scenario::Scenario::load(&scenario)?;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let run = format!("lt{:x}", millis % 0xffff_ffff);
    let dir = out.join(format!("{}-{run}", scenario.name));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "{}: {} (files in {})",
        scenario.name,
        scenario.description,
        dir.display()
    );
    // A broker of the run's own, unless the scenario names one.
    let mut _broker = None;
    if scenario.traffic.transport == scenario::Transport::Mqtt && scenario.traffic.broker == "start"
    {
        let broker = broker::Broker::start(&dir).await?;
        scenario.traffic.broker = broker.address.clone();
        _broker = Some(broker);
    }
    let scenario = Arc::new(scenario);

    // Kafka: the brokers named, or a mock cluster of librdkafka's (the real protocol over
    // TCP) for as long as the run lasts.
    let mut _cluster = None;
    let brokers = match (scenario.traffic.transport, &scenario.traffic.kafka_brokers) {
        (scenario::Transport::Mqtt, _) => None,
        (scenario::Transport::Kafka, Some(brokers)) => Some(kafka::Brokers {
            list: brokers.clone(),
            mock: false,
        }),
        (scenario::Transport::Kafka, None) => {
            let cluster = rdkafka::mocking::MockCluster::new(1)?;
            cluster.create_topic(kafka::TOPIC, 4, 1)?;
            let list = cluster.bootstrap_servers();
            _cluster = Some(cluster);
            Some(kafka::Brokers { list, mock: true })
        }
    };
    let service = service::Service::start(&scenario, &run, &binary, &dir, brokers.as_ref()).await?;
    let observer = observe::Observer::start(&service.base, &service.observer_token()).await?;
    let plan = Arc::new(mqtt::Plan::new(&scenario, &run));
    let sent = Arc::new(mqtt::Sent::default());
    // CPU over the sending time: vitalstream's, and the broker's and the harness's, which
    // share the machine with it.
    let broker_pid = _broker.as_ref().map(|b: &broker::Broker| b.pid);
    let cpu = || {
        let (vitalstream, _) = service.usage();
        let (harness, _) = service::usage(std::process::id());
        (
            vitalstream,
            harness,
            broker_pid.map(|p| service::usage(p).0),
        )
    };
    let cpu_before = cpu();

    let started = Instant::now();
    let mut driving = match brokers {
        Some(brokers) => tokio::spawn(kafka::drive(
            scenario.clone(),
            plan.clone(),
            sent.clone(),
            brokers.list,
        )),
        None => {
            let (scenario, plan, sent) = (scenario.clone(), plan.clone(), sent.clone());
            tokio::spawn(async move {
                mqtt::drive(scenario, plan, sent).await;
                Ok(())
            })
        }
    };
    let total = scenario.duration().as_secs_f64();
    loop {
        tokio::select! {
            done = &mut driving => { done??; break; }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                progress(started.elapsed().as_secs_f64(), total, &sent, observer.seen.lock().unwrap().len());
            }
        }
    }
    let send_seconds = started.elapsed().as_secs_f64().min(total + 1.0);
    let cpu_after = cpu();
    eprintln!();

    // Settle: every acknowledged reading stored and every expected alert seen, or time out.
    // Acknowledged readings are checked by name: the count alone can be made up by readings
    // sent during a reconnect whose acknowledgements never came.
    let acked: HashSet<(u32, u64)> = (sent.acked_readings.lock().unwrap())
        .iter()
        .copied()
        .collect();
    let deadline = Instant::now() + scenario.service.settle;
    let stored = loop {
        let stored = service.stored(&run).await?;
        let alerts = {
            let seen = observer.seen.lock().unwrap();
            report::Alerts::tally(&plan, &sent, &acked, &seen)
        };
        let stored_acked = stored.iter().filter(|r| acked.contains(*r)).count();
        let unstored = acked.len() - stored_acked;
        let enough = unstored == 0 && alerts.complete();
        if enough || Instant::now() >= deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // An alert storm shows as alerts beyond the expected ones: give any a moment to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = service.metrics().await.unwrap_or_default();
    let (_, peak_rss_mb) = service.usage();
    let seen = observer.seen.lock().unwrap().clone();
    observer.stop().await;
    service.stop(keep_database).await?;

    let report = report::Report::build(report::Inputs {
        scenario: &scenario,
        plan: &plan,
        sent: &sent,
        seen: &seen,
        acked: &acked,
        stored: &stored,
        metrics: &metrics,
        send_seconds,
        cpu_seconds: cpu_after.0 - cpu_before.0,
        harness_cpu_seconds: cpu_after.1 - cpu_before.1,
        broker_cpu_seconds: cpu_after.2.zip(cpu_before.2).map(|(a, b)| a - b),
        peak_rss_mb,
    });
    println!("{}", report.table());
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(dir.join("report.html"), report.html())?;
    eprintln!("report: {}", dir.join("report.html").display());
    Ok(report)
}

/// One line, rewritten each second: a bar for the time sent so far, and the counts.
fn progress(elapsed: f64, total: f64, sent: &mqtt::Sent, alerts: usize) {
    let share = (elapsed / total).clamp(0.0, 1.0);
    let filled = (share * 30.0) as usize;
    eprint!(
        "\r[{}{}] {:>3.0}%  sent {}  acknowledged {}  alerts {}   ",
        "#".repeat(filled),
        ".".repeat(30 - filled),
        share * 100.0,
        sent.sent.load(Relaxed),
        sent.acked.load(Relaxed),
        alerts,
    );
}
