//! The `vitalstream` command: reads flags and config, then calls the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use vitalstream::config::{Config, LogFormat, load_rules};
use vitalstream::service::{self, ReplayOptions};
use vitalstream::sinks::alert_log::AlertLogConfig;
use vitalstream::sinks::dead_letter::DeadLetterConfig;
use vitalstream::sinks::postgres::{self, TimescaleMode};

#[derive(Parser)]
#[command(version, about = "Ingest tier for bedside vital signs")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default): with no config, simulator → engine → Parquet + alert log.
    Run {
        /// A config file; only the keys it names override the embedded defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Push a recording through the engine and write a JSON report.
    Replay {
        /// NDJSON recording, or `-` for stdin.
        #[arg(long)]
        input: String,
        /// Pipeline file (or builtin:reference, builtin:icu).
        #[arg(long)]
        pipeline: String,
        /// Where the report goes (`-` = stdout).
        #[arg(long, default_value = "-")]
        report: String,
        /// Write rejected lines here (NDJSON with the original bytes).
        #[arg(long)]
        rejects: Option<PathBuf>,
        /// Write alert transitions here (NDJSON).
        #[arg(long)]
        alerts: Option<PathBuf>,
        /// Replay at this multiple of event time (default: as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        speed: f64,
        /// Engine settings from this config file's [engine] section (and [storage] with --store).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also write readings and alerts to the configured [storage].
        #[arg(long)]
        store: bool,
    },
    /// Create or update the database schema (safe to re-run).
    Migrate {
        /// postgres://user@host:port/database
        #[arg(long, env = "VITALSTREAM_DATABASE_URL")]
        database_url: String,
        /// auto (TimescaleDB when available), require, or off.
        #[arg(long, default_value = "auto")]
        timescaledb: String,
    },
    /// Deliver the notification tasks on RabbitMQ, as the config's [worker] says.
    Worker {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a pipeline file and list every problem.
    Check {
        #[arg(long)]
        pipeline: String,
    },
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config } => {
            let config = Config::load(config.as_deref())?;
            init_logging(&config.log.level, config.log.format);
            let stop = Arc::new(AtomicBool::new(false));
            service::stop_on_signal(stop.clone());
            service::run(&config, stop)?;
        }
        Command::Worker { config } => {
            let config = Config::load(Some(&config))?;
            init_logging(&config.log.level, config.log.format);
            let mut worker = (config.worker)
                .context("`vitalstream worker` needs a [worker] section in its config")?;
            worker.wards = config.engine.wards.clone();
            let stop = Arc::new(AtomicBool::new(false));
            service::stop_on_signal(stop.clone());
            let metrics = Arc::new(vitalstream::tasks::worker::WorkerMetrics::default());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(vitalstream::tasks::worker::run(
                    worker,
                    metrics,
                    None,
                    async move {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    },
                ));
        }
        Command::Replay {
            input,
            pipeline,
            report,
            rejects,
            alerts,
            speed,
            config,
            store,
        } => {
            let config = Config::load(config.as_deref())?;
            init_logging("warn", config.log.format);
            let rules = load_rules(&pipeline)?;
            let options = ReplayOptions {
                engine: config.engine,
                rules,
                speed,
                rejects: rejects.map(|p| DeadLetterConfig { path: Some(p) }),
                alerts: alerts.map(|p| AlertLogConfig { path: Some(p) }),
                storage: if store { config.storage } else { None },
            };
            let result = if input == "-" {
                service::replay(std::io::stdin().lock(), options)?
            } else {
                let file =
                    std::fs::File::open(&input).with_context(|| format!("opening {input}"))?;
                service::replay(file, options)?
            };
            let json = serde_json::to_string_pretty(&result)?;
            if report == "-" {
                println!("{json}");
            } else {
                std::fs::write(&report, json + "\n")
                    .with_context(|| format!("writing {report}"))?;
            }
        }
        Command::Migrate {
            database_url,
            timescaledb,
        } => {
            init_logging("info", LogFormat::Text);
            let mode = match timescaledb.as_str() {
                "auto" => TimescaleMode::Auto,
                "require" => TimescaleMode::Require,
                "off" => TimescaleMode::Off,
                other => anyhow::bail!("--timescaledb {other}: expected auto, require or off"),
            };
            let flavour = postgres::migrate_url(&database_url, mode)?;
            println!("schema up to date ({})", flavour.name());
        }
        Command::Check { pipeline } => match load_rules(&pipeline) {
            Ok(set) => {
                println!("{pipeline}: {} rules, all valid", set.rules.len());
                for rule in &set.rules {
                    // A SQL rule shows its statement on one line, without comment lines.
                    let what = match &rule.spec.sql {
                        Some(sql) => (sql.lines())
                            .filter(|l| !l.trim_start().starts_with("--"))
                            .flat_map(str::split_whitespace)
                            .collect::<Vec<_>>()
                            .join(" "),
                        None => rule.spec.condition.clone(),
                    };
                    println!(
                        "  {} ({:?}, {:?}): {what}",
                        rule.id, rule.spec.kind, rule.priority
                    );
                }
            }
            Err(e) => {
                eprintln!("{pipeline}: {} problem(s)", e.problems.len());
                for p in &e.problems {
                    eprintln!("  - {p}");
                }
                std::process::exit(1);
            }
        },
    }
    Ok(())
}
