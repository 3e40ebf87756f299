//! The MQTT source loop: read messages, batch them, hand them to the engine, and
//! acknowledge each once the engine reports it durable.

use super::config::MqttConfig;
use super::device;
use super::topic::{TopicKind, parse_topic};
use crate::ack::Ack;
use crate::model::{FrameBatch, Id, now_micros};
use crate::parse::valid_id;
use crate::sources::DeviceContext;
use crate::sources::SourceHandle;
use crossbeam_channel::{Receiver, Sender};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{Client, Connection, Event, MqttOptions, RecvTimeoutError};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// What a run of the source saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqttStats {
    /// Messages received on the readings topics.
    pub messages: u64,
    /// Messages acknowledged to the broker.
    pub acknowledged: u64,
    /// Times the connection was lost and made again.
    pub reconnects: u64,
}

/// The batch being filled, with the messages it carries (acknowledged when it is durable).
struct Pending {
    batch: FrameBatch,
    messages: Vec<Publish>,
    started: Option<Instant>,
}

impl Pending {
    fn new(handle: &SourceHandle) -> Self {
        Pending {
            batch: handle.batch(),
            messages: Vec::new(),
            started: None,
        }
    }

    /// Adds a reading; `device` is the id segment of its topic.
    fn push(&mut self, device: Id, publish: Publish) {
        self.batch
            .push(&publish.payload, now_micros(), Some(device));
        if publish.qos != QoS::AtMostOnce {
            self.messages.push(publish);
        }
        self.started.get_or_insert_with(Instant::now);
    }

    /// Time left before the batch must go, or the full linger when it is empty.
    fn wait(&self, linger: Duration) -> Duration {
        self.started
            .map_or(linger, |s| linger.saturating_sub(s.elapsed()))
    }

    fn due(&self, config: &MqttConfig) -> bool {
        self.batch.len() >= config.batch_size
            || self
                .started
                .is_some_and(|s| s.elapsed() >= config.batch_linger)
    }

    /// Hands the batch to the engine (blocking while it is full). Returns false when the
    /// engine has stopped.
    fn flush(&mut self, handle: &mut SourceHandle, durable: &Sender<Vec<Publish>>) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        let mut batch = std::mem::replace(&mut self.batch, handle.batch());
        let messages = std::mem::take(&mut self.messages);
        self.started = None;
        let durable = durable.clone();
        batch.ack = Some(Ack::new(move |ok| {
            if ok {
                let _ = durable.send(messages);
            } else {
                tracing::warn!(
                    messages = messages.len(),
                    "MQTT messages not acknowledged: their readings are not durable; the broker will deliver them again"
                );
            }
        }));
        handle.send(batch)
    }
}

fn options(config: &MqttConfig) -> MqttOptions {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(
            config.session_expiry.as_secs().min(u32::MAX as u64) as u32
        ))
        .set_manual_acks(true)
        .set_receive_maximum(Some(config.receive_maximum));
    // Acknowledgements and commands go out at once, not held back by Nagle's algorithm.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    if let Some(user) = &config.username {
        options.set_credentials(user, config.password.clone().unwrap_or_default());
    }
    options
}

/// Acknowledges, in order, the messages whose readings are durable. A message the client
/// cannot take right now (its queue is full) waits for the next round.
fn acknowledge(
    client: &Client,
    durable: &Receiver<Vec<Publish>>,
    waiting: &mut VecDeque<Publish>,
) -> u64 {
    waiting.extend(durable.try_iter().flatten());
    let mut n = 0;
    while let Some(message) = waiting.front() {
        if client.try_ack(message).is_err() {
            break;
        }
        waiting.pop_front();
        n += 1;
    }
    n
}

/// Sends commands to devices on `devices/{device_id}/commands` (QoS 1), through the MQTT
/// source's connection.
#[derive(Clone)]
pub struct Commands {
    client: Client,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("`{0}` is not a valid device id")]
    BadDevice(String),
    #[error("the MQTT client cannot take the command now: {0}")]
    Busy(String),
}

impl Commands {
    /// Queues a command for a device; it is delivered when the broker is reachable.
    pub fn send(&self, device_id: &str, payload: &[u8]) -> Result<(), CommandError> {
        let device =
            valid_id(device_id).ok_or_else(|| CommandError::BadDevice(device_id.into()))?;
        self.client
            .try_publish(
                format!("devices/{device}/commands"),
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
            )
            .map_err(|e| CommandError::Busy(e.to_string()))
    }
}

/// A connection to the broker, not yet reading.
pub struct MqttSource {
    config: MqttConfig,
    client: Client,
    connection: Connection,
    /// Whether the broker connection is up, for readiness checks.
    up: std::sync::Arc<AtomicBool>,
}

impl MqttSource {
    pub fn new(config: &MqttConfig) -> MqttSource {
        let (client, connection) = Client::new(options(config), 1024);
        MqttSource {
            config: config.clone(),
            client,
            connection,
            up: Default::default(),
        }
    }

    /// True while the broker connection is up.
    pub fn connected(&self) -> std::sync::Arc<AtomicBool> {
        self.up.clone()
    }

    /// A handle for sending commands to devices.
    pub fn commands(&self) -> Commands {
        Commands {
            client: self.client.clone(),
        }
    }

    /// Reads from the broker until `stop` is set or the engine stops: readings go to the
    /// engine, status and technical alerts to the device registry and the alert book.
    /// Reconnects with exponential backoff and jitter; says once when the broker is
    /// unreachable and when it is back.
    pub fn run(
        mut self,
        mut handle: SourceHandle,
        devices: &DeviceContext,
        stop: &AtomicBool,
    ) -> MqttStats {
        let config = &self.config;
        let client = &self.client;
        let (durable_tx, durable_rx) = crossbeam_channel::unbounded::<Vec<Publish>>();
        let mut waiting = VecDeque::new();
        let mut pending = Pending::new(&handle);
        let mut stats = MqttStats::default();
        let mut backoff = config.reconnect_min;
        let mut down_since: Option<Instant> = None;
        let mut last_expiry = Instant::now();
        let offline_after_ms = config.offline_after.as_millis() as i64;
        let filters = config.filters();
        tracing::info!(host = %config.host, port = config.port, client_id = %config.client_id, ?filters, "MQTT source starting");
        while !stop.load(Relaxed) {
            stats.acknowledged += acknowledge(client, &durable_rx, &mut waiting);
            match self
                .connection
                .recv_timeout(pending.wait(config.batch_linger))
            {
                Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                    stats.messages += 1;
                    let topic = std::str::from_utf8(&publish.topic)
                        .ok()
                        .and_then(parse_topic);
                    match topic {
                        Some((device, TopicKind::Vitals)) => {
                            device::heard(devices, device);
                            pending.push(device.into(), publish);
                        }
                        Some((device, kind @ (TopicKind::Status | TopicKind::Alerts))) => {
                            if kind == TopicKind::Status {
                                device::status(devices, handle.id(), device, &publish.payload);
                            } else {
                                device::alert(devices, handle.id(), device, &publish.payload);
                            }
                            // Handled in full: the alert book and the registry have it.
                            waiting.push_back(publish);
                        }
                        // Nothing else is subscribed; an empty device id makes the parser
                        // reject the odd topic as `bad_device_id`.
                        _ => pending.push(Id::default(), publish),
                    }
                }
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    self.up.store(true, Relaxed);
                    match down_since.take() {
                        Some(since) => {
                            stats.reconnects += 1;
                            tracing::info!(down_for = ?since.elapsed(), session_present = ack.session_present, "MQTT broker is back");
                        }
                        None => {
                            tracing::info!(session_present = ack.session_present, "MQTT connected")
                        }
                    }
                    backoff = config.reconnect_min;
                    for filter in &filters {
                        if let Err(e) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                            tracing::error!("MQTT subscribe to {filter} failed: {e}");
                        }
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    self.up.store(false, Relaxed);
                    if down_since.is_none() {
                        tracing::warn!(
                            "MQTT broker {}:{} unreachable: {e}; retrying",
                            config.host,
                            config.port
                        );
                        down_since = Some(Instant::now());
                    }
                    // What was read before the outage goes on to the engine; then wait.
                    if !pending.flush(&mut handle, &durable_tx) {
                        break;
                    }
                    let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
                    std::thread::sleep((backoff + jitter).min(config.reconnect_max));
                    backoff = (backoff * 2).min(config.reconnect_max);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if pending.due(config) && !pending.flush(&mut handle, &durable_tx) {
                break;
            }
            if last_expiry.elapsed() >= Duration::from_secs(1) {
                last_expiry = Instant::now();
                device::expire_silent(devices, offline_after_ms);
            }
        }
        pending.flush(&mut handle, &durable_tx);
        drop(handle);
        // Messages not yet durable stay unacknowledged: the broker keeps them for the
        // session and delivers them again when this client comes back.
        stats.acknowledged += acknowledge(client, &durable_rx, &mut waiting);
        let _ = client.try_disconnect();
        let _ = self.connection.recv_timeout(Duration::from_millis(200));
        tracing::info!(
            messages = stats.messages,
            acknowledged = stats.acknowledged,
            "MQTT source stopped"
        );
        stats
    }
}
