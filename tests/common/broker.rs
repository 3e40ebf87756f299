//! A Mosquitto of a test's or bench's own (shared by `tests/mqtt.rs` and
//! `benches/mqtt_ingest.rs`).

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// A Mosquitto of a test's (or bench's) own, on its own port, so stopping it disturbs no
/// other test.
pub struct Broker {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<std::process::Child>,
}

impl Broker {
    /// Starts a broker; `extra` is appended to its configuration.
    pub fn start(extra: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence_location {dir}/\nlog_dest file {dir}/mosquitto.log\nlog_type all\n{extra}",
                dir = dir.path().display()
            ),
        )
        .unwrap();
        let mut broker = Broker {
            dir,
            port,
            child: None,
        };
        broker.resume();
        broker
    }

    /// Starts the broker (again); it reloads the sessions it saved when stopped.
    pub fn resume(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let child = std::process::Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto is installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker the way an operator would (SIGTERM: it saves its sessions).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Mosquitto from PATH, or where Debian installs it (`/usr/sbin` is not on every PATH).
fn mosquitto_binary() -> &'static str {
    let on_path = std::process::Command::new("mosquitto")
        .arg("-h")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if on_path {
        "mosquitto"
    } else {
        "/usr/sbin/mosquitto"
    }
}
