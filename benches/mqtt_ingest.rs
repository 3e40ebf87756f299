//! Sustained MQTT ingest: how fast vitalstream takes readings from a Mosquitto, against the
//! rate a bare subscriber gets from the same broker on the same machine. The bench starts a
//! Mosquitto of its own (it needs `mosquitto` on PATH).
//!
//! ```sh
//! cargo bench --bench mqtt_ingest            # 200,000 readings from 4 publishers
//! MQTT_BENCH_MESSAGES=500000 cargo bench --bench mqtt_ingest
//! ```
//! Both runs publish the same messages (QoS 1, 1,000 devices) from the same publishers; the
//! rate is messages over the time from the first message received to the last. vitalstream
//! runs its whole path: MQTT 5 persistent session, manual acks after each batch is done,
//! parsing, routing, the reference rules.

#[path = "../tests/common/broker.rs"]
mod broker;

use broker::Broker;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Client, Event, MqttOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vitalstream::engine::{EndOfInput, Engine, EngineConfig, Outputs};
use vitalstream::model::ClockMode;
use vitalstream::rules::parse_pipeline;
use vitalstream::sources::mqtt::{MqttConfig, MqttSource};

const PUBLISHERS: usize = 4;
const DEVICES: usize = 1000;

static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

fn port() -> u16 {
    *PORT.get().expect("broker started")
}

fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("bench-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// Publishes `total` readings at QoS 1 from several connections; returns when the broker
/// has acknowledged them all.
fn publish(run: &str, total: usize) {
    let per = total / PUBLISHERS;
    let threads: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let run = run.to_string();
            std::thread::spawn(move || {
                let mut options = MqttOptions::new(format!("{run}-pub-{p}"), "127.0.0.1", port());
                options.set_keep_alive(Duration::from_secs(30));
                let (client, mut connection) = Client::new(options, 10_000);
                let sender = std::thread::spawn(move || {
                    for i in 0..per {
                        let device = (p * per + i) % DEVICES;
                        let topic = format!("devices/{run}-bed-{device}/vitals");
                        let seq = (p * per + i) / DEVICES;
                        let payload = format!(
                            r#"{{"seq":{seq},"hr":{},"spo2":97,"temp":36.9}}"#,
                            60 + i % 70
                        );
                        client
                            .publish(topic, QoS::AtLeastOnce, false, payload)
                            .unwrap();
                    }
                });
                let mut acked = 0;
                while acked < per {
                    if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
                        connection.recv_timeout(Duration::from_secs(5))
                    {
                        acked += 1;
                    }
                }
                sender.join().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Time from the first message to the last, for a consumer that reports its count.
fn measure(total: u64, count: impl Fn() -> u64) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(600);
    while count() == 0 {
        assert!(Instant::now() < deadline, "nothing received");
        std::thread::sleep(Duration::from_micros(200));
    }
    let first = Instant::now();
    while count() < total {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} received",
            count()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    first.elapsed()
}

/// A bare subscriber: counts this run's messages, acknowledging each at once.
fn bare(total: usize) -> Duration {
    let run = run_id();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut options = MqttOptions::new(format!("{run}-bare"), "127.0.0.1", port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(options, 100);
    client
        .subscribe("devices/+/vitals", QoS::AtLeastOnce)
        .unwrap();
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let subscriber = {
        let (received, stop, run) = (received.clone(), stop.clone(), run.clone());
        let _ = &run;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match connection.recv_timeout(Duration::from_millis(100)) {
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subscribed_tx.send(()).unwrap(),
                    Ok(Ok(Event::Incoming(Packet::Publish(p))))
                        if String::from_utf8_lossy(&p.topic).contains(&run) =>
                    {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
    };
    subscribed
        .recv_timeout(Duration::from_secs(10))
        .expect("subscribed");
    let publisher = {
        let run = run.clone();
        std::thread::spawn(move || publish(&run, total))
    };
    let took = measure(total as u64, || received.load(Ordering::Relaxed));
    publisher.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    subscriber.join().unwrap();
    took
}

/// vitalstream's MQTT source feeding the engine with the reference rules.
fn vitalstream(total: usize) -> Duration {
    let run = run_id();
    let (alerts_tx, alerts) = crossbeam_channel::unbounded();
    std::thread::spawn(move || for _ in alerts {});
    let outputs = Outputs {
        alerts: alerts_tx,
        live: None,
        readings: None,
        rejects: None,
        latest: None,
    };
    let rules = parse_pipeline(include_str!("../pipelines/reference.toml")).unwrap();
    let mut engine = Engine::start(&EngineConfig::default(), rules, outputs);
    let source = MqttSource::new(&MqttConfig {
        port: port(),
        client_id: format!("{run}-ingest"),
        ..MqttConfig::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (handle, devices, stop) = (
            engine.source(ClockMode::Live),
            engine.device_context(),
            stop.clone(),
        );
        std::thread::spawn(move || source.run(handle, &devices, &stop))
    };
    // A probe reading shows the source is subscribed.
    let metrics = engine.metrics.clone();
    let frames = || metrics.frames.load(Ordering::Relaxed);
    while frames() == 0 {
        let mut options = MqttOptions::new(format!("{run}-probe"), "127.0.0.1", port());
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(options, 10);
        client
            .publish(
                format!("devices/{run}-probe/vitals"),
                QoS::AtLeastOnce,
                false,
                r#"{"hr":70}"#,
            )
            .unwrap();
        for _ in 0..10 {
            if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
                connection.recv_timeout(Duration::from_millis(100))
            {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(300));
    let probes = frames();
    let publisher = {
        let run = run.clone();
        std::thread::spawn(move || publish(&run, total))
    };
    let took = measure(total as u64, || frames().saturating_sub(probes));
    publisher.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    engine.join(EndOfInput::KeepOpen);
    took
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass other flags.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    // A broker of the bench's own: with the packaged defaults Mosquitto drops QoS 1 messages
    // once 1,000 wait for a subscriber, which would measure the drop, not the rate.
    let broker = Broker::start("max_queued_messages 0\nmax_inflight_messages 0\n");
    PORT.set(broker.port).unwrap();
    let total: usize = std::env::var("MQTT_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
        / PUBLISHERS
        * PUBLISHERS;
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    let bare_rate = rate(bare(total));
    let ours = rate(vitalstream(total));
    println!("mqtt_ingest: {total} readings, {PUBLISHERS} publishers, {DEVICES} devices, QoS 1");
    println!("  bare subscriber   {bare_rate:>10.0} readings/s");
    println!(
        "  vitalstream       {ours:>10.0} readings/s  ({:.1}% of bare)",
        100.0 * ours / bare_rate
    );
    drop(broker);
}
