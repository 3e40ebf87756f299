//! The Mosquitto a run starts for itself (`traffic.broker = "start"`, the default), set up as
//! the README asks for vitalstream's broker: no limit on the QoS 1 messages queued for a
//! subscriber that is behind (`max_queued_messages 0`; the packaged default, 1,000, makes
//! the broker drop beyond that messages it has already acknowledged to the devices), and
//! messages sent without delay (`set_tcp_nodelay true`; by default Nagle's algorithm holds a
//! message back while the one before is unacknowledged, up to 40 ms at low rates).

use anyhow::Context;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Broker {
    /// host:port
    pub address: String,
    pub pid: u32,
    _child: tokio::process::Child,
}

impl Broker {
    /// Starts one on a free port, its configuration and log in `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Broker> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n\
                 max_queued_messages 0\nset_tcp_nodelay true\npersistence false\n\
                 log_dest file {}\n",
                dir.join("mosquitto.log").display()
            ),
        )?;
        // Debian puts it in /usr/sbin, which not every PATH has.
        let binary = ["mosquitto", "/usr/sbin/mosquitto"]
            .into_iter()
            .find(|b| {
                std::process::Command::new(b)
                    .arg("-h")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok()
            })
            .context("mosquitto is not installed")?;
        let child = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting mosquitto")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(Instant::now() < deadline, "mosquitto did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Broker {
            address: format!("127.0.0.1:{port}"),
            pid: child.id().unwrap_or_default(),
            _child: child,
        })
    }
}
