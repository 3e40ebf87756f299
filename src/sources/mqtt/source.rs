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
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{Client, Connection, Event, MqttOptions};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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

/// A message, with the connection it arrived on: it is acknowledged on that connection
/// only (see [`Acks`]).
type Received = (u64, Publish);

/// The batch being filled, with the messages it carries (acknowledged when it is durable).
struct Pending {
    batch: FrameBatch,
    messages: Vec<Received>,
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

    /// Adds a reading that arrived on connection `conn`; `device` is the id segment of its
    /// topic.
    fn push(&mut self, device: Id, conn: u64, publish: Publish) {
        self.batch
            .push(&publish.payload, now_micros(), Some(device));
        if publish.qos != QoS::AtMostOnce {
            self.messages.push((conn, publish));
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
    fn flush(&mut self, handle: &mut SourceHandle, durable: &Sender<Vec<Received>>) -> bool {
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

/// What the connection thread passes to the source loop. Each connection made has its own
/// number (`conn`), counted by the connection thread.
enum Wire {
    Message(u64, Publish),
    Connected {
        conn: u64,
        session_present: bool,
    },
    /// The broker answered the subscription: `Ok`, or the filters it refused.
    Subscribed(Result<(), String>),
    Down(String),
}

/// The connection thread: polls the client's event loop without ever cutting a poll short
/// (a poll cut short in the middle of connecting starts the connection over, forever, when
/// the broker has a large backlog to send), and passes messages and connection changes on.
/// A failed connection waits (exponential backoff with jitter) before the next attempt.
/// Ends once `stop` is set and the client has disconnected, or when the source loop is gone.
fn pump(
    mut connection: Connection,
    tx: Sender<Wire>,
    stop: Arc<AtomicBool>,
    conn: Arc<AtomicU64>,
    config: MqttConfig,
) {
    let mut backoff = config.reconnect_min;
    loop {
        let wire = match connection.recv() {
            Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                Wire::Message(conn.load(Relaxed), publish)
            }
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                backoff = config.reconnect_min;
                Wire::Connected {
                    conn: conn.fetch_add(1, Relaxed) + 1,
                    session_present: ack.session_present,
                }
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                let refused: Vec<String> = (ack.return_codes.iter())
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .map(|c| format!("{c:?}"))
                    .collect();
                Wire::Subscribed(if refused.is_empty() {
                    Ok(())
                } else {
                    Err(refused.join(", "))
                })
            }
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => return,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => {
                // Whatever arrived on the connection that failed is not acknowledged on the
                // next one (its packet ids mean other messages there).
                conn.fetch_add(1, Relaxed);
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

/// Acknowledgements owed to the broker: messages whose readings are durable, in order of
/// arrival. A message is acknowledged only on the connection it arrived on: once that
/// connection is gone its packet id means nothing (or, in a session the broker lost, another
/// message), and the broker delivers it again if it still holds it — the engine then
/// recognises the duplicate. So nothing is acknowledged while the broker is away, and what
/// came on an earlier connection is dropped, never sent on a new one.
struct Acks {
    waiting: VecDeque<Received>,
    /// The connection thread's current connection number.
    conn: Arc<AtomicU64>,
}

impl Acks {
    /// Acknowledges what it can on connection `current` (when up); returns how many.
    fn send(&mut self, client: &Client, durable: &Receiver<Vec<Received>>, up: Option<u64>) -> u64 {
        self.waiting.extend(durable.try_iter().flatten());
        let Some(current) = up else {
            return 0;
        };
        let mut n = 0;
        while let Some((conn, message)) = self.waiting.front() {
            if *conn != current || self.conn.load(Relaxed) != current {
                if self.conn.load(Relaxed) != current {
                    break; // the connection just failed: the source hears of it next
                }
                self.waiting.pop_front(); // an earlier connection's: the broker resends it
                continue;
            }
            if client.try_ack(message).is_err() {
                break;
            }
            self.waiting.pop_front();
            n += 1;
        }
        n
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
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
    /// Whether the broker connection is up and subscribed (and why not), for readiness.
    link: Arc<Link>,
    /// Mark devices present from their topics (an ingest node, which forwards readings
    /// unparsed); otherwise the engine marks them from accepted readings.
    presence_from_topics: bool,
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
            presence_from_topics: false,
        }
    }

    /// For an ingest node, which forwards readings without parsing them: a message on a
    /// valid device's vitals topic marks the device present.
    pub fn marking_presence_from_topics(mut self) -> MqttSource {
        self.presence_from_topics = true;
        self
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
    /// unreachable (and why) and when it is back. Ready only once subscribed.
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
            presence_from_topics,
        } = self;
        let config = &config;
        let client = &client;
        if !presence_from_topics {
            handle.track_presence();
        }
        let (durable_tx, durable_rx) = crossbeam_channel::unbounded::<Vec<Received>>();
        // Room for everything the broker may send ahead of acknowledgements
        // (receive_maximum), so the connection thread never blocks for long on it and keeps
        // the connection alive (pings) while the engine is full.
        let (wire_tx, wire_rx) =
            crossbeam_channel::bounded::<Wire>(config.receive_maximum as usize + 64);
        let conn = Arc::new(AtomicU64::new(0));
        let pump_stop = Arc::new(AtomicBool::new(false));
        let pump_thread = {
            let (stop, conn, config) = (pump_stop.clone(), conn.clone(), config.clone());
            std::thread::Builder::new()
                .name("mqtt-connection".into())
                .spawn(move || pump(connection, wire_tx, stop, conn, config))
                .expect("spawning the MQTT connection thread")
        };
        let mut acks = Acks {
            waiting: VecDeque::new(),
            conn,
        };
        let mut pending = Pending::new(&handle);
        let mut stats = MqttStats::default();
        let mut down_since: Option<Instant> = None;
        let mut connected_once = false;
        // The connection now up, if one is; whether its subscription is still to be sent.
        let mut up: Option<u64> = None;
        let mut subscribe = false;
        let mut last_expiry = Instant::now();
        let offline_after_ms = config.offline_after.as_millis() as i64;
        let source_name: Id = valid_id(&config.client_id).unwrap_or_else(|| "mqtt".into());
        let filters = config.filters();
        tracing::info!(host = %config.host, port = config.port, client_id = %config.client_id, ?filters, "MQTT source starting");
        while !stop.load(Relaxed) {
            stats.acknowledged += acks.send(client, &durable_rx, up);
            if up.is_some() && subscribe {
                let wanted = filters.iter().map(|f| Filter::new(f, QoS::AtLeastOnce));
                // The client's queue may be full for a moment: tried again next round.
                subscribe = client.try_subscribe_many(wanted).is_err();
            }
            // Idle, wake for acknowledgements and the once-a-second offline check; sooner
            // while acknowledgements wait for room in the client's queue.
            let wait = if !pending.batch.is_empty() {
                pending.wait(config.batch_linger)
            } else if !acks.is_empty() && up.is_some() || subscribe {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(250)
            };
            let wire = crossbeam_channel::select! {
                recv(wire_rx) -> wire => match wire {
                    Ok(wire) => Some(wire),
                    Err(_) => break, // the connection thread ended
                },
                recv(durable_rx) -> durable => {
                    acks.waiting.extend(durable.into_iter().flatten());
                    None
                }
                default(wait) => None,
            };
            match wire {
                Some(Wire::Message(conn, publish)) => {
                    stats.messages += 1;
                    let topic = std::str::from_utf8(&publish.topic)
                        .ok()
                        .and_then(parse_topic);
                    match topic {
                        Some((device, TopicKind::Vitals)) => {
                            if presence_from_topics && let Some(id) = valid_id(device) {
                                devices.heard(&id, crate::model::now_millis());
                            }
                            pending.push(device.into(), conn, publish)
                        }
                        Some((device, kind @ (TopicKind::Status | TopicKind::Alerts))) => {
                            if kind == TopicKind::Status {
                                device::status(devices, handle.id(), device, &publish.payload);
                            } else {
                                device::alert(devices, handle.id(), device, &publish.payload);
                            }
                            // Handled in full: the alert book and the registry have it.
                            acks.waiting.push_back((conn, publish));
                        }
                        // Nothing else is subscribed; an empty device id makes the parser
                        // reject the odd topic as `bad_device_id`.
                        _ => pending.push(Id::default(), conn, publish),
                    }
                }
                Some(Wire::Connected {
                    conn,
                    session_present,
                }) => {
                    up = Some(conn);
                    subscribe = true;
                    link.down("connected; subscribing");
                    match down_since.take() {
                        Some(since) if connected_once => {
                            stats.reconnects += 1;
                            tracing::info!(down_for = ?since.elapsed(), session_present, "MQTT broker is back");
                        }
                        _ => tracing::info!(session_present, "MQTT connected"),
                    }
                    connected_once = true;
                }
                Some(Wire::Subscribed(Ok(()))) => link.up(),
                Some(Wire::Subscribed(Err(refused))) => {
                    tracing::error!(%refused, ?filters, "MQTT broker refused the subscription");
                    link.down(format!("subscription refused: {refused}"));
                }
                Some(Wire::Down(why)) => {
                    up = None;
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
        // What became durable by now is acknowledged (for a moment, as room allows); the
        // rest stays unacknowledged: the broker keeps it for the session and delivers it
        // again when this client comes back.
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            stats.acknowledged += acks.send(client, &durable_rx, up);
            if acks.is_empty() || up.is_none() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        link.down("stopped");
        pump_stop.store(true, Relaxed);
        let disconnect = Instant::now() + Duration::from_millis(500);
        while client.try_disconnect().is_err() && Instant::now() < disconnect {
            std::thread::sleep(Duration::from_millis(5));
        }
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
