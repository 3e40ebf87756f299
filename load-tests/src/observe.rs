//! Watches as the platform would: the official socket.io client (Node, `socket.io-client`
//! from npm, in `tests/socketio/`) connected as a clinician, so in `role:clinician`, where
//! every `alert:critical` arrives; each one is noted with the time it arrived.

use anyhow::Context;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// An `alert:critical` and when it arrived (µs since the epoch).
#[derive(Debug, Clone)]
pub struct Seen {
    pub at_us: u64,
    pub alert: serde_json::Value,
}

pub struct Observer {
    child: tokio::process::Child,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/socketio/observe.mjs")
}

impl Observer {
    /// Connects and returns once the client is connected.
    pub async fn start(base: &str, token: &str) -> anyhow::Result<Observer> {
        let mut child = tokio::process::Command::new("node")
            .arg(script())
            .env("VS_URL", base)
            .env("VS_TOKEN", token)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the socket.io observer (node; npm ci in tests/socketio)")?;
        let stdout = child.stdout.take().context("the observer's output")?;
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        let notes = seen.clone();
        tokio::spawn(async move {
            let mut ready = Some(ready);
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                match v["step"].as_str() {
                    Some("ready") => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Some("connect_error") => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(v["message"].to_string()));
                        }
                    }
                    Some("alert") => notes.lock().unwrap().push(Seen {
                        at_us: v["at_us"].as_u64().unwrap_or_default(),
                        alert: v["alert"].clone(),
                    }),
                    _ => {}
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(20), is_ready).await {
            Ok(Ok(Ok(()))) => Ok(Observer { child, seen }),
            Ok(Ok(Err(message))) => anyhow::bail!("the observer could not connect: {message}"),
            _ => anyhow::bail!("the observer did not connect within 20 s"),
        }
    }

    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}
