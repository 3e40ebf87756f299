//! Settings of the MQTT source (`[[sources]] type = "mqtt"`).

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id; keep it stable, so the broker keeps this instance's session across restarts.
    pub client_id: String,
    /// Optional user name and password.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Subscribe as `$share/{group}/devices/+/vitals`, so several instances split the devices
    /// (per-device windows then need the Kafka path: see the README).
    pub shared_group: Option<String>,
    /// How long the broker keeps the session (and queues QoS 1 messages) while vitalstream is
    /// away ("1h").
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    /// MQTT keep-alive interval ("30s").
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Most unacknowledged messages the broker may send before waiting for acknowledgements.
    pub receive_maximum: u16,
    /// Messages per batch handed to the engine.
    pub batch_size: usize,
    /// Longest a message waits for its batch to fill ("2ms"). Every reading's alert pays up
    /// to this much at low rates; the load tests held 47,000 readings/s with it.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// A device silent this long is marked offline and raises a technical alert ("60s").
    #[serde(with = "humantime_serde")]
    pub offline_after: Duration,
    /// This many devices or more going silent in one check are a mass disconnect: one
    /// aggregated technical alarm instead of one per device.
    pub offline_storm: usize,
    /// Longest wait for the broker to accept a connection (TCP and CONNACK, whole seconds;
    /// a broker with a large session backlog can take a while), before backing off and
    /// trying again ("10s").
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First and longest wait between reconnection attempts; the wait doubles, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "vitalstream".into(),
            username: None,
            password: None,
            shared_group: None,
            session_expiry: Duration::from_secs(3600),
            keep_alive: Duration::from_secs(30),
            receive_maximum: 4096,
            batch_size: 2048,
            batch_linger: Duration::from_millis(2),
            offline_after: Duration::from_secs(60),
            offline_storm: 20,
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

impl MqttConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.host.is_empty() {
            out.push("mqtt.host must not be empty".into());
        }
        if self.client_id.is_empty() || self.client_id.len() > 64 {
            out.push("mqtt.client_id must be 1 to 64 characters".into());
        }
        if self.username.is_none() && self.password.is_some() {
            out.push("mqtt.password needs mqtt.username".into());
        }
        if let Some(group) = &self.shared_group
            && (group.is_empty() || group.contains(['/', '+', '#']))
        {
            out.push("mqtt.shared_group must be a plain name (no / + #)".into());
        }
        if self.batch_size == 0 || self.receive_maximum == 0 {
            out.push("mqtt.batch_size and mqtt.receive_maximum must be at least 1".into());
        }
        if self.offline_after.is_zero() {
            out.push("mqtt.offline_after must be positive".into());
        }
        if self.offline_storm < 2 {
            out.push("mqtt.offline_storm must be at least 2".into());
        }
        if self.keep_alive < Duration::from_secs(5) {
            out.push("mqtt.keep_alive must be at least 5s".into());
        }
        if self.connect_timeout < Duration::from_secs(1) {
            out.push("mqtt.connect_timeout must be at least 1s".into());
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            out.push("mqtt.reconnect_min must be positive and at most mqtt.reconnect_max".into());
        }
        out
    }

    /// The subscription filters: readings, technical alerts and status of every device.
    pub fn filters(&self) -> Vec<String> {
        ["vitals", "alerts", "status"]
            .iter()
            .map(|kind| match &self.shared_group {
                Some(group) => format!("$share/{group}/devices/+/{kind}"),
                None => format!("devices/+/{kind}"),
            })
            .collect()
    }
}
