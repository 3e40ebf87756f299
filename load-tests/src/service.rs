//! The vitalstream under test, started by the harness as it would be deployed: MQTT in, a
//! database of the run's own on PostgreSQL, REST and socket.io out, the alert rule the
//! episodes expect (`lt_hr_high`: hr > 130, high priority, no delay).

use crate::scenario::Scenario;
use anyhow::Context;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PIPELINE: &str = r#"
[[rule]]
id = "lt_hr_high"
kind = "threshold"
priority = "high"
message = "heart rate above 130"
condition = "hr > 130"
"#;

pub struct Service {
    child: tokio::process::Child,
    pub pid: u32,
    /// `http://host:port`.
    pub base: String,
    secret: String,
    pub database: String,
    admin: String,
    pub log: PathBuf,
    /// Over MQTT: the broker (host, port) and vitalstream's client id. Its session is
    /// persistent, so it is ended after the run, or the broker would queue every later
    /// run's readings for it.
    mqtt_session: Option<(String, u16, String)>,
}

impl Service {
    pub async fn start(
        scenario: &Scenario,
        run: &str,
        binary: &Path,
        dir: &Path,
        kafka: Option<&crate::kafka::Brokers>,
    ) -> anyhow::Result<Service> {
        let s = &scenario.service;
        // Over MQTT: the broker, and vitalstream's session there.
        let mqtt_session = match kafka {
            Some(_) => None,
            None => {
                let (host, port) = (scenario.traffic.broker.rsplit_once(':'))
                    .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                    .context("traffic.broker is host:port")?;
                Some((host, port, format!("{run}-vitalstream")))
            }
        };
        let name = format!("vs_load_{}", run.replace('-', "_"));
        let admin = format!("{}/postgres", s.postgres);
        let client = connect(&admin).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let database = format!("{}/{name}", s.postgres);
        // At least 32 bytes: vitalstream refuses a shorter secret outside development mode.
        let secret = format!("load-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        std::fs::write(dir.join("pipeline.toml"), PIPELINE)?;
        let linger = s.batch_linger.as_millis();
        let source = match kafka {
            Some(brokers) => format!(
                "type = \"kafka\"\nbrokers = \"{}\"\ngroup_id = \"{run}-vitalstream\"\n\
                 topics = [\"{}\"]\nbatch_linger = \"{linger}ms\"\n{}",
                brokers.list,
                crate::kafka::TOPIC,
                // The mock cluster holds a fetch that finds nothing for the whole wait.
                if brokers.mock {
                    "fetch_wait = \"5ms\""
                } else {
                    ""
                },
            ),
            None => {
                let (host, port, id) = mqtt_session.as_ref().expect("over MQTT");
                format!(
                    "type = \"mqtt\"\nhost = \"{host}\"\nport = {port}\n\
                     client_id = \"{id}\"\nbatch_linger = \"{linger}ms\""
                )
            }
        };
        let config = format!(
            r#"
pipeline = "{pipeline}"
status_interval = "5s"
[engine]
shards = {shards}
[log]
format = "json"
[[sources]]
{source}
[storage]
type = "postgres"
url = "{database}"
spool_dir = "{spool}"
[alert_log]
path = "{alerts}"
[dead_letter]
path = "{dead}"
[api]
enabled = true
listen = "{listen}"
jwt_secret = "{secret}"
dev_token = false
rate_limit_per_minute = 100000
"#,
            pipeline = dir.join("pipeline.toml").display(),
            shards = s.shards,
            spool = dir.join("spool").display(),
            alerts = dir.join("alerts.ndjson").display(),
            dead = dir.join("dead-letter.ndjson").display(),
            listen = s.listen,
        );
        std::fs::write(dir.join("vitalstream.toml"), config)?;
        let log = dir.join("vitalstream.log");
        let child = tokio::process::Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(dir.join("vitalstream.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let service = Service {
            pid: child.id().unwrap_or_default(),
            child,
            base: format!("http://{}", s.listen),
            secret,
            database,
            admin,
            log,
            mqtt_session,
        };
        // Ready: the database answers and the MQTT subscription (or the Kafka assignment)
        // is up.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if service
                .get("/ready")
                .await
                .is_ok_and(|(status, _)| status == 200)
            {
                return Ok(service);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "vitalstream was not ready within 60 s (see {})",
                service.log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            let mut response = agent.get(&url).call()?;
            let status = response.status().as_u16();
            Ok((status, response.body_mut().read_to_string()?))
        })
        .await?
    }

    /// A token for a clinician who may see every patient (so in `role:clinician`), valid
    /// for 12 h: vitalstream's longest token lifetime (`[api] max_token_lifetime`), and
    /// longer than any run.
    pub fn observer_token(&self) -> String {
        #[derive(serde::Serialize)]
        struct Claims {
            sub: &'static str,
            role: &'static str,
            iat: u64,
            exp: u64,
        }
        let iat = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &Claims {
                sub: "load-observer",
                role: "clinician",
                iat,
                exp: iat + 12 * 3600,
            },
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .expect("a token")
    }

    /// The counters of `/metrics` (labelled series summed by name; a summary's quantiles
    /// also under their whole series, `name{quantile="0.99"}`).
    pub async fn metrics(&self) -> anyhow::Result<HashMap<String, f64>> {
        let (_, text) = self.get("/metrics").await?;
        let mut out = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if let Ok(v) = value.parse::<f64>() {
                *out.entry(name.to_string()).or_default() += v;
                if series.contains("quantile=") {
                    out.insert(series.to_string(), v);
                }
            }
        }
        Ok(out)
    }

    /// CPU seconds used and peak resident memory (MiB) so far.
    pub fn usage(&self) -> (f64, f64) {
        usage(self.pid)
    }

    /// (device index, seq) of every stored reading of the run.
    pub async fn stored(&self, run: &str) -> anyhow::Result<Vec<(u32, u64)>> {
        let client = connect(&self.database).await?;
        let prefix = format!("{run}-bed-");
        let rows = client
            .query(
                "SELECT device_id, seq FROM device_vitals WHERE device_id LIKE $1 || '%'",
                &[&prefix],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let device: &str = r.get(0);
                let seq: Option<i64> = r.get(1);
                Some((device.strip_prefix(&prefix)?.parse().ok()?, seq? as u64))
            })
            .collect())
    }

    /// Stops it (SIGINT, as an operator would) and drops the run's database.
    pub async fn stop(mut self, keep_database: bool) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.pid.to_string()])
            .status();
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        anyhow::ensure!(
            matches!(status, Ok(Ok(s)) if s.success()),
            "vitalstream did not stop cleanly (see {})",
            self.log.display()
        );
        if let Some((host, port, id)) = &self.mqtt_session {
            end_session(host, *port, id).await;
        }
        if !keep_database {
            let name = self.database.rsplit('/').next().unwrap_or_default();
            connect(&self.admin)
                .await?
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                .await?;
        }
        Ok(())
    }
}

/// Connects as `id` with a clean session, which ends the broker's stored session of that
/// id, and leaves.
async fn end_session(host: &str, port: u16, id: &str) {
    let mut options = rumqttc::MqttOptions::new(id, host, port);
    options.set_clean_session(true);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client.disconnect().await;
                }
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    if ended.await.is_err() {
        eprintln!("warning: vitalstream's MQTT session {id} may still be on the broker");
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A process's CPU seconds used and peak resident memory (MiB) so far, from /proc.
pub fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid)).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime
    // the 13th, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid)).unwrap_or_default();
    let peak_kb = (status.lines())
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, peak_kb / 1024.0)
}
