//! MQTT helpers shared by the tests that publish as devices do: a source feeding a test
//! engine, unique client ids, QoS 1 publishing that waits for every PUBACK, and waiting.

use super::Harness;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Client, Event, MqttOptions};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use vitalstream::model::ClockMode;
use vitalstream::sources::mqtt;

/// Runs an MQTT source feeding the harness's engine; returns its stop flag and thread.
pub fn spawn_source(
    h: &mut Harness,
    source: mqtt::MqttSource,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<mqtt::MqttStats>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = h.engine.source(ClockMode::Live);
    let devices = h.engine.device_context();
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || source.run(handle, &devices, &stop))
    };
    (stop, thread)
}

/// A name no other run of the tests uses, so broker sessions never mix.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// Publishes `(topic, payload)` pairs at QoS 1 from one client and waits for every PUBACK.
pub fn publish_all(client_id: &str, messages: Vec<(String, String)>) {
    publish_all_to(1883, client_id, messages)
}

/// Like `publish_all`, to the broker on `port`.
pub fn publish_all_to(port: u16, client_id: &str, messages: Vec<(String, String)>) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut connection) = Client::new(options, messages.len() + 10);
    let expected = messages.len();
    for (topic, payload) in messages {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap();
    }
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked < expected {
        assert!(
            Instant::now() < deadline,
            "{client_id}: only {acked}/{expected} PUBACKs"
        );
        match connection.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Err(e)) => panic!("{client_id}: {e}"),
            _ => {}
        }
    }
    client.disconnect().unwrap();
}

/// Publishes one message at QoS 1, optionally retained.
pub fn publish_one(client_id: &str, topic: &str, payload: &str, retain: bool) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", 1883);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = Client::new(options, 10);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload.to_string())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no PUBACK for {topic}");
        if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
            connection.recv_timeout(Duration::from_millis(200))
        {
            break;
        }
    }
    client.disconnect().unwrap();
}

pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the source on the broker at `port` is subscribed, by publishing a probe
/// reading until the engine sees it; then until late probes have settled. Returns how many
/// probe readings the engine saw.
pub fn await_subscription(h: &Harness, run: &str, port: u16) -> u64 {
    let frames = || h.engine.metrics.snapshot().frames;
    let probe = (
        format!("devices/{run}-probe/vitals"),
        r#"{"hr":70}"#.to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while frames() == 0 {
        assert!(
            Instant::now() < deadline,
            "the MQTT source never subscribed"
        );
        publish_all_to(port, &format!("{run}-probe"), vec![probe.clone()]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut probes = frames();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if frames() == probes {
            return probes;
        }
        probes = frames();
    }
}
