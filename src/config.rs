//! Configuration: the embedded `config/default.toml`, then an optional file given with
//! `--config` (only the keys it names change), then `VITALSTREAM__SECTION__KEY` environment
//! variables. Unknown keys are errors, and [`Config::validate`] reports every problem at once.
//!
//! One key is not inherited: the embedded default is development mode (`[api] dev_token =
//! true`: the public development secret, and an admin token printed at start), and only the
//! embedded default alone is. A config file, or any `VITALSTREAM__` variable but the `[log]`
//! ones, leaves development mode unless it writes `dev_token = true` itself; and development
//! mode listening on anything but loopback is refused unless `dev_token = true` was written.

use crate::api::ApiConfig;
use crate::engine::EngineConfig;
use crate::rules::{self, RuleSet};
use crate::sinks::alert_log::AlertLogConfig;
use crate::sinks::dead_letter::DeadLetterConfig;
use crate::sinks::events::KafkaConfig;
use crate::sinks::parquet::ParquetConfig;
use crate::sinks::postgres::PostgresConfig;
use crate::sources::mqtt::MqttConfig;
use crate::sources::simulator::SimulatorConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// The embedded defaults.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Built-in pipelines, usable as `pipeline = "builtin:<name>"`.
pub const BUILTIN_PIPELINES: [(&str, &str); 2] = [
    ("icu", include_str!("../pipelines/icu.toml")),
    ("reference", include_str!("../pipelines/reference.toml")),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What this node does: `engine` (the default: evaluate, store, alert) or `ingest`
    /// (forward MQTT readings to Kafka for the rule nodes, and nothing else).
    #[serde(default)]
    pub role: Role,
    /// The rule set: a pipeline file path, or `builtin:icu` / `builtin:reference`.
    pub pipeline: String,
    /// How often the status line is printed.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    pub engine: EngineConfig,
    pub log: LogConfig,
    /// Where readings come from. A config file that names `[[sources]]` replaces this list.
    pub sources: Vec<SourceConfig>,
    /// Where readings and alerts are stored; absent = not stored.
    #[serde(default)]
    pub storage: Option<StorageConfig>,
    pub alert_log: AlertLogConfig,
    pub dead_letter: DeadLetterConfig,
    /// REST (and later socket.io) on one HTTP server.
    #[serde(default)]
    pub api: ApiConfig,
    /// Domain events and dead letters on Kafka; absent = no Kafka.
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
    /// Notification tasks (and escalations) on RabbitMQ; absent = none.
    #[serde(default)]
    pub notifications: Option<crate::tasks::notifier::NotificationsConfig>,
    /// What `vitalstream worker` consumes and how it delivers; absent = no worker.
    #[serde(default)]
    pub worker: Option<crate::tasks::worker::WorkerConfig>,
}

/// A node's part in a scaled-out deployment (MQTT → ingest nodes → Kafka → rule nodes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sources → engine → storage, alerts, API: a whole service, or a rule node when its
    /// source is Kafka.
    #[default]
    Engine,
    /// MQTT (or simulated) readings, as they came, → `vitals.raw` keyed by device id.
    Ingest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter (`vitalstream=debug`).
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Source kinds; each entry of `[[sources]]` picks one with `type`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    /// Synthetic bedside devices with seeded anomaly episodes.
    Simulator(SimulatorConfig),
    /// Devices publishing to `devices/{id}/vitals` on an MQTT broker.
    Mqtt(MqttConfig),
    /// Readings on Kafka topics (`vitals.raw`, keyed by device id), in a consumer group.
    Kafka(crate::sources::kafka::KafkaSourceConfig),
}

/// Storage back ends; one is chosen with `type`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// Parquet files under a directory: the embedded default.
    Parquet(ParquetConfig),
    /// TimescaleDB, or PostgreSQL partitioned by day when the extension is not there.
    Postgres(PostgresConfig),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Defaults, then `file`, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with(file, &vars)
    }

    pub fn load_with(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(DEFAULT_TOML)
            .map_err(|e| ConfigError::Parse(format!("embedded defaults: {e}")))?;
        // Whether the operator wrote `[api] dev_token` (file or environment), and whether
        // they configured the API's secret or anything at all (a file).
        let mut dev_token_written = false;
        let mut dev_token_written_true = false;
        let mut configured = file.is_some();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let overlay: toml::Table = toml::from_str(&text)
                .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?;
            let written = overlay.get("api").and_then(|a| a.get("dev_token"));
            dev_token_written = written.is_some();
            dev_token_written_true = written == Some(&toml::Value::Boolean(true));
            merge(&mut value, overlay);
        }
        for (key, raw) in env {
            let Some(path) = key.strip_prefix("VITALSTREAM__") else {
                continue;
            };
            let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            let parsed = parse_env_value(raw);
            match parts.as_slice() {
                [api, key] if api == "api" && key == "dev_token" => {
                    dev_token_written = true;
                    dev_token_written_true = parsed == toml::Value::Boolean(true);
                }
                // Log settings alone leave the embedded default as it is.
                [log, ..] if log == "log" => {}
                _ => configured = true,
            }
            set_path(&mut value, &parts, parsed);
        }
        // Development mode is the embedded default's alone: whoever configures the service
        // leaves it unless they write `dev_token = true` themselves.
        if configured && !dev_token_written {
            set_path(
                &mut value,
                &["api".into(), "dev_token".into()],
                toml::Value::Boolean(false),
            );
        }
        let config: Config = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        let mut problems = match config.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(problems)) => problems,
            Err(e) => return Err(e),
        };
        // The public secret and an admin token in the log are for a developer's own machine.
        if config.api.enabled
            && config.api.dev_token
            && !dev_token_written_true
            && !config.api.listen.ip().is_loopback()
        {
            problems.push(format!(
                "[api] development mode (the public secret) listening on {}: listen on \
                 loopback, set a secret, or write `dev_token = true` to mean it",
                config.api.listen
            ));
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(config)
    }

    /// Every problem with the configuration, reported together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = self.engine.problems();
        problems.extend(self.api.problems());
        if let Err(e) = self.rules() {
            problems.extend(e.problems);
        }
        if let Some(n) = &self.notifications {
            problems.extend(n.problems());
        }
        if let Some(w) = &self.worker {
            problems.extend(w.problems());
        }
        if self.status_interval.is_zero() {
            problems.push("status_interval must be positive".into());
        }
        if self.role == Role::Ingest {
            if self.kafka.is_none() {
                problems.push("role = \"ingest\" forwards to Kafka: [kafka] is required".into());
            }
            if self.sources.is_empty()
                || (self.sources.iter()).any(|s| matches!(s, SourceConfig::Kafka(_)))
            {
                problems.push(
                    "role = \"ingest\" forwards device traffic: its sources must be mqtt (or simulator)"
                        .into(),
                );
            }
        }
        for (i, source) in self.sources.iter().enumerate() {
            let (kind, found) = match source {
                SourceConfig::Simulator(sim) => ("simulator", sim.validate()),
                SourceConfig::Mqtt(mqtt) => ("mqtt", mqtt.validate()),
                SourceConfig::Kafka(kafka) => ("kafka", kafka.validate()),
            };
            problems.extend(
                found
                    .into_iter()
                    .map(|p| format!("sources[{i}] ({kind}): {p}")),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Loads the configured rule set.
    pub fn rules(&self) -> Result<RuleSet, rules::PipelineError> {
        load_rules(&self.pipeline)
    }
}

/// Loads a pipeline by path or `builtin:<name>`.
pub fn load_rules(pipeline: &str) -> Result<RuleSet, rules::PipelineError> {
    match pipeline.strip_prefix("builtin:") {
        Some(name) => match BUILTIN_PIPELINES.iter().find(|(n, _)| *n == name) {
            Some((_, text)) => rules::parse_pipeline(text),
            None => Err(rules::PipelineError {
                problems: vec![format!(
                    "no built-in pipeline `{name}` (have: icu, reference)"
                )],
            }),
        },
        None => rules::load_pipeline(Path::new(pipeline)),
    }
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            // A table that names another `type` (storage = postgres over the default parquet)
            // replaces the default instead of mixing keys of two kinds.
            (Some(toml::Value::Table(b)), toml::Value::Table(o))
                if o.get("type").is_none_or(|t| b.get("type") == Some(t)) =>
            {
                merge(b, o)
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = entry {
                set_path(t, rest, value);
            }
        }
    }
}

/// An environment value is read as TOML when it parses as one (numbers, booleans), else as a
/// string.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_load() {
        let c = Config::load_with(None, &[]).unwrap();
        assert_eq!(c.pipeline, "builtin:icu");
        assert!(matches!(c.sources[..], [SourceConfig::Simulator(_)]));
        assert!(matches!(c.storage, Some(StorageConfig::Parquet(_))));
    }

    #[test]
    fn a_storage_of_another_type_replaces_the_default_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[storage]\ntype = \"postgres\"\nurl = \"postgres://u@db/vitals\"\n",
        )
        .unwrap();
        let c = Config::load_with(Some(&path), &[]).unwrap();
        let Some(StorageConfig::Postgres(pg)) = c.storage else {
            panic!("{:?}", c.storage)
        };
        assert_eq!(pg.url, "postgres://u@db/vitals");
        assert_eq!(pg.batch_rows, PostgresConfig::default().batch_rows);
        std::fs::write(
            &path,
            "[storage]\ntype = \"parquet\"\ndir = \"elsewhere\"\n",
        )
        .unwrap();
        let c = Config::load_with(Some(&path), &[]).unwrap();
        let Some(StorageConfig::Parquet(p)) = c.storage else {
            panic!("{:?}", c.storage)
        };
        assert_eq!(
            (p.dir.to_str(), p.max_rows_per_file),
            (Some("elsewhere"), 1_000_000)
        );
    }

    #[test]
    fn file_then_environment_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[engine]\nshards = 3\n[[sources]]\ntype = \"simulator\"\ndevices = 7\n",
        )
        .unwrap();
        let env = vec![
            ("VITALSTREAM__ENGINE__SHARDS".to_string(), "5".to_string()),
            ("VITALSTREAM__LOG__LEVEL".to_string(), "debug".to_string()),
        ];
        let c = Config::load_with(Some(&path), &env).unwrap();
        assert_eq!(c.engine.shards, 5);
        let SourceConfig::Simulator(sim) = &c.sources[0] else {
            panic!("a simulator source");
        };
        assert_eq!(sim.devices, 7);
        assert_eq!(c.log.level, "debug");
        assert_eq!(
            c.engine.allowed_lateness,
            Duration::from_secs(5),
            "untouched keys keep defaults"
        );
    }

    #[test]
    fn the_mqtt_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mqtt.example.toml");
        let c = Config::load_with(Some(&path), &[]).unwrap();
        assert!(
            matches!(&c.sources[..], [SourceConfig::Mqtt(m)] if m.client_id == "vitalstream-ward-7")
        );
    }

    #[test]
    fn only_the_embedded_default_or_a_written_dev_token_is_development_mode() {
        let strong = "s3cret-s3cret-s3cret-s3cret-s3cret!";
        let env = |k: &str, v: &str| vec![(format!("VITALSTREAM__API__{k}"), v.to_string())];
        // The embedded default: development, with the public secret, and it may start.
        let c = Config::load_with(None, &[]).unwrap();
        assert!(c.api.dev_token && c.api.secret_problem().is_none());
        // A secret from the environment ends development mode (no admin token in the log).
        let c = Config::load_with(None, &env("JWT_SECRET", strong)).unwrap();
        assert!(!c.api.dev_token && c.api.secret_problem().is_none());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        // A file that says nothing of dev_token is not development, whatever else it says:
        // the public secret is refused...
        let mqtt = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mqtt.example.toml");
        let c = Config::load_with(Some(&mqtt), &[]).unwrap();
        assert!(!c.api.dev_token);
        let problem = c
            .api
            .secret_problem()
            .expect("the public secret is refused");
        assert!(problem.contains("public development secret"), "{problem}");
        // ...and so are a short secret and an empty one.
        let c = Config::load_with(Some(&mqtt), &env("JWT_SECRET", "short")).unwrap();
        assert!(c.api.secret_problem().unwrap().contains("at least 32"));
        std::fs::write(&path, "[api]\njwt_secret = \"\"\ndev_token = false\n").unwrap();
        let c = Config::load_with(Some(&path), &[]).unwrap();
        assert!(c.api.secret_problem().unwrap().contains("empty"));
        // A real secret: it starts, and prints no token.
        let c = Config::load_with(Some(&mqtt), &env("JWT_SECRET", strong)).unwrap();
        assert!(!c.api.dev_token && c.api.secret_problem().is_none());
        // Development mode written in the file (or the environment): the public secret will do,
        // an empty one still will not.
        std::fs::write(&path, "[api]\ndev_token = true\n").unwrap();
        let c = Config::load_with(Some(&path), &[]).unwrap();
        assert!(c.api.dev_token && c.api.secret_problem().is_none());
        let c = Config::load_with(Some(&mqtt), &env("DEV_TOKEN", "true")).unwrap();
        assert!(c.api.dev_token);
        std::fs::write(&path, "[api]\ndev_token = true\njwt_secret = \" \"\n").unwrap();
        let c = Config::load_with(Some(&path), &[]).unwrap();
        assert!(c.api.secret_problem().is_some());
    }

    #[test]
    fn configuring_by_the_environment_alone_leaves_development_mode() {
        let var = |k: &str, v: &str| (format!("VITALSTREAM__{k}"), v.to_string());
        // Any setting but the log's is configuring the service.
        let c = Config::load_with(None, &[var("API__LISTEN", "0.0.0.0:7000")]).unwrap();
        assert!(!c.api.dev_token);
        assert!(
            c.api.secret_problem().is_some(),
            "the public secret is refused"
        );
        let c = Config::load_with(None, &[var("ENGINE__SHARDS", "2")]).unwrap();
        assert!(!c.api.dev_token);
        let c = Config::load_with(None, &[var("LOG__LEVEL", "debug")]).unwrap();
        assert!(c.api.dev_token);
        // Development mode written in the environment: it is.
        let c = Config::load_with(
            None,
            &[
                var("API__DEV_TOKEN", "true"),
                var("API__LISTEN", "0.0.0.0:7000"),
            ],
        )
        .unwrap();
        assert!(c.api.dev_token);
        // Development mode beyond loopback only when written: a file that names another
        // address and not dev_token is not development.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[api]\nlisten = \"0.0.0.0:7000\"\n").unwrap();
        assert!(!Config::load_with(Some(&path), &[]).unwrap().api.dev_token);
        std::fs::write(
            &path,
            "[api]\ndev_token = true\nlisten = \"0.0.0.0:7000\"\n",
        )
        .unwrap();
        assert!(Config::load_with(Some(&path), &[]).unwrap().api.dev_token);
    }

    #[test]
    fn the_production_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/production.example.toml");
        let c = Config::load_with(Some(&path), &[]).unwrap();
        assert!(matches!(&c.storage, Some(StorageConfig::Postgres(p)) if p.connections == 4));
        assert_eq!(c.kafka.unwrap().alert_topic, "alert.events");
        assert!(!c.api.dev_token && c.api.redis_url.is_some());
    }

    #[test]
    fn the_scale_out_examples_load_and_pass_validation() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let ingest = Config::load_with(Some(&dir.join("ingest-node.example.toml")), &[]).unwrap();
        assert_eq!(ingest.role, Role::Ingest);
        ingest.validate().unwrap();
        let rules = Config::load_with(Some(&dir.join("rule-node.example.toml")), &[]).unwrap();
        assert_eq!(rules.role, Role::Engine);
        assert!(
            matches!(&rules.sources[..], [SourceConfig::Kafka(k)] if k.group_id == "vitalstream-rules")
        );
        rules.validate().unwrap();
    }

    #[test]
    fn an_ingest_node_needs_kafka_and_device_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "role = \"ingest\"\n[[sources]]\ntype = \"kafka\"\n").unwrap();
        let err = Config::load_with(Some(&path), &[]).unwrap_err().to_string();
        assert!(
            err.contains("[kafka] is required") && err.contains("must be mqtt"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[engine]\nshardz = 3\n").unwrap();
        let err = Config::load_with(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains("shardz"), "{err}");

        std::fs::write(
            &path,
            "pipeline = \"builtin:nope\"\n[engine]\nqueue_batches = 0\n",
        )
        .unwrap();
        let err = Config::load_with(Some(&path), &[]).unwrap_err().to_string();
        assert!(
            err.contains("queue_batches") && err.contains("builtin:nope") || err.contains("`nope`"),
            "{err}"
        );
    }
}
