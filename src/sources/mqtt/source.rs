//! The MQTT source loop: read messages, batch them, hand them to the engine, and
//! acknowledge each once the engine reports it durable.

use super::config::MqttConfig;
use super::device;
use super::topic::{TopicKind, parse_topic};
use crate::ack::Ack;
use crate::link::Link;
use crate::model::{FrameBatch, Id, now_micros};
use crate::parse::valid_id;
use crate::sources::DeviceContext;
use crate::sources::SourceHandle;
use crossbeam_channel::{Receiver, Sender};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{Client, Connection, Event, MqttOptions};
use std::collections::VecDeque;
use std::sync::Arc;
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

/// Room for the topic, properties and header of a PUBLISH beyond its payload.
const PACKET_HEADROOM: usize = 64 << 10;

/// The largest packet this client takes from the broker, advertised in CONNECT (MQTT 5
/// Maximum Packet Size). Payloads up to twice the engine's frame limit still arrive, so
/// oversized readings are dead-lettered as `too_large` and acknowledged; a larger packet the
/// broker must not send at all (MQTT 5 §3.1.2.11.4: it discards it and behaves as if it had
/// delivered it — Mosquitto logs each). Either way no single message can stop the source.
pub fn max_packet_bytes(max_frame_bytes: usize) -> u32 {
    (max_frame_bytes.saturating_mul(2) + PACKET_HEADROOM).min(u32::MAX as usize) as u32
}

fn options(config: &MqttConfig, max_frame_bytes: usize) -> MqttOptions {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(
            config.session_expiry.as_secs().min(u32::MAX as u64) as u32
        ))
        .set_manual_acks(true)
        .set_receive_maximum(Some(config.receive_maximum))
        .set_max_packet_size(Some(max_packet_bytes(max_frame_bytes)))
        // Connecting — the TCP handshake and CONNACK, which a broker with a large session
        // backlog may be slow to send — has its own deadline, apart from batching.
        .set_connection_timeout(config.connect_timeout.as_secs().max(1));
    // Acknowledgements and commands go out at once, not held back by Nagle's algorithm.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(config.connect_timeout.as_secs().max(1));
    options.set_network_options(network);
    if let Some(user) = &config.username {
        options.set_credentials(user, config.password.clone().unwrap_or_default());
    }
    options
}

/// What the connection thread passes to the source loop.
enum Wire {
    Message(Publish),
    Connected { session_present: bool },
    Down(String),
}

/// The connection thread: polls the client's event loop without ever cutting a poll short
/// (a poll cut short in the middle of connecting starts the connection over, forever, when
/// the broker has a large backlog to send), and passes messages and connection changes on.
/// A failed connection waits (exponential backoff with jitter) before the next attempt.
/// Ends once `stop` is set and the client has disconnected, or when the source loop is gone.
fn pump(mut connection: Connection, tx: Sender<Wire>, stop: Arc<AtomicBool>, config: MqttConfig) {
    let mut backoff = config.reconnect_min;
    loop {
        let wire = match connection.recv() {
            Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => Wire::Message(publish),
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                backoff = config.reconnect_min;
                Wire::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => return,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => {
                if tx.send(Wire::Down(e.to_string())).is_err() {
                    return;
                }
                let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
                let wait = Instant::now() + (backoff + jitter).min(config.reconnect_max);
                while Instant::now() < wait {
                    if stop.load(Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20).min(wait - Instant::now()));
                }
                backoff = (backoff * 2).min(config.reconnect_max);
                continue;
            }
            Err(_) => return, // every client handle is gone
        };
        if tx.send(wire).is_err() {
            return;
        }
    }
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
    /// Whether the broker connection is up (and why not), for readiness checks.
    link: Arc<Link>,
}

impl MqttSource {
    /// A source whose readings the engine takes up to `engine.max_frame_bytes` (the default
    /// 1 MiB here; see [`MqttSource::with_frame_limit`]).
    pub fn new(config: &MqttConfig) -> MqttSource {
        Self::with_frame_limit(
            config,
            crate::engine::EngineConfig::default().max_frame_bytes,
        )
    }

    /// A source for an engine that takes frames up to `max_frame_bytes`.
    pub fn with_frame_limit(config: &MqttConfig, max_frame_bytes: usize) -> MqttSource {
        let (client, connection) = Client::new(options(config, max_frame_bytes), 1024);
        MqttSource {
            config: config.clone(),
            client,
            connection,
            link: Default::default(),
        }
    }

    /// The broker connection's state.
    pub fn link(&self) -> Arc<Link> {
        self.link.clone()
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
    /// unreachable (and why) and when it is back.
    pub fn run(
        self,
        mut handle: SourceHandle,
        devices: &DeviceContext,
        stop: &AtomicBool,
    ) -> MqttStats {
        let MqttSource {
            config,
            client,
            connection,
            link,
        } = self;
        let config = &config;
        let client = &client;
        handle.track_presence();
        let (durable_tx, durable_rx) = crossbeam_channel::unbounded::<Vec<Publish>>();
        // receive_maximum bounds what the broker sends ahead of acknowledgements; this
        // queue only decouples the connection from batching.
        let (wire_tx, wire_rx) = crossbeam_channel::bounded::<Wire>(1024);
        let pump_stop = Arc::new(AtomicBool::new(false));
        let pump_thread = {
            let (stop, config) = (pump_stop.clone(), config.clone());
            std::thread::Builder::new()
                .name("mqtt-connection".into())
                .spawn(move || pump(connection, wire_tx, stop, config))
                .expect("spawning the MQTT connection thread")
        };
        let mut waiting = VecDeque::new();
        let mut pending = Pending::new(&handle);
        let mut stats = MqttStats::default();
        let mut down_since: Option<Instant> = None;
        let mut connected_once = false;
        let mut last_expiry = Instant::now();
        let offline_after_ms = config.offline_after.as_millis() as i64;
        let source_name: Id = valid_id(&config.client_id).unwrap_or_else(|| "mqtt".into());
        let filters = config.filters();
        tracing::info!(host = %config.host, port = config.port, client_id = %config.client_id, ?filters, "MQTT source starting");
        while !stop.load(Relaxed) {
            stats.acknowledged += acknowledge(client, &durable_rx, &mut waiting);
            // Idle, wake for acknowledgements and the once-a-second offline check.
            let wait = if pending.batch.is_empty() {
                Duration::from_millis(250)
            } else {
                pending.wait(config.batch_linger)
            };
            let wire = crossbeam_channel::select! {
                recv(wire_rx) -> wire => match wire {
                    Ok(wire) => Some(wire),
                    Err(_) => break, // the connection thread ended
                },
                recv(durable_rx) -> durable => {
                    waiting.extend(durable.into_iter().flatten());
                    None
                }
                default(wait) => None,
            };
            match wire {
                Some(Wire::Message(publish)) => {
                    stats.messages += 1;
                    let topic = std::str::from_utf8(&publish.topic)
                        .ok()
                        .and_then(parse_topic);
                    match topic {
                        Some((device, TopicKind::Vitals)) => pending.push(device.into(), publish),
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
                Some(Wire::Connected { session_present }) => {
                    link.up();
                    match down_since.take() {
                        Some(since) if connected_once => {
                            stats.reconnects += 1;
                            tracing::info!(down_for = ?since.elapsed(), session_present, "MQTT broker is back");
                        }
                        _ => tracing::info!(session_present, "MQTT connected"),
                    }
                    connected_once = true;
                    for filter in &filters {
                        if let Err(e) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                            tracing::error!("MQTT subscribe to {filter} failed: {e}");
                        }
                    }
                }
                Some(Wire::Down(why)) => {
                    link.down(format!("{}:{}: {why}", config.host, config.port));
                    if down_since.is_none() {
                        tracing::warn!(
                            "MQTT broker {}:{} unreachable: {why}; retrying with backoff",
                            config.host,
                            config.port
                        );
                        down_since = Some(Instant::now());
                    }
                    // What was read before the outage goes on to the engine.
                    if !pending.flush(&mut handle, &durable_tx) {
                        break;
                    }
                }
                None => {}
            }
            if pending.due(config) && !pending.flush(&mut handle, &durable_tx) {
                break;
            }
            if last_expiry.elapsed() >= Duration::from_secs(1) {
                last_expiry = Instant::now();
                devices.expire_silent(offline_after_ms, config.offline_storm, &source_name);
            }
        }
        pending.flush(&mut handle, &durable_tx);
        drop(handle);
        // Messages not yet durable stay unacknowledged: the broker keeps them for the
        // session and delivers them again when this client comes back.
        stats.acknowledged += acknowledge(client, &durable_rx, &mut waiting);
        link.down("stopped");
        pump_stop.store(true, Relaxed);
        let _ = client.try_disconnect();
        // The connection thread ends once the DISCONNECT is out (or at once while the broker
        // is away); what it still passes on is not acknowledged, so the broker keeps it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !pump_thread.is_finished() && Instant::now() < deadline {
            let _ = wire_rx.recv_timeout(Duration::from_millis(20));
        }
        drop(wire_rx);
        if pump_thread.is_finished() {
            let _ = pump_thread.join();
        } else {
            tracing::warn!("the MQTT connection did not close within 2 s");
        }
        tracing::info!(
            messages = stats.messages,
            acknowledged = stats.acknowledged,
            "MQTT source stopped"
        );
        stats
    }
}
