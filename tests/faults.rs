//! The fault suite: ordinary events that once broke the promise — nothing acknowledged lost,
//! one alarm per condition, ingest never stalled — created against real brokers.
//!
//! - frames of every size class mixed into an MQTT stream, up to past what the connection
//!   carries;
//! - a restart with a large session backlog (the connect handshake is not cut short);
//! - topic device ids that are not ids, a flood of new ids, a mass disconnect;
//! - device clocks in 1970 and 2001, and a replay whose first line has a wrong clock.
//!
//! Each MQTT test runs a Mosquitto of its own ([`Broker`]), so its sessions and queues
//! disturb no other test.

mod common;

use common::broker::Broker;
use common::mqtt_client::*;
use common::*;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Client, Event, MqttOptions};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vitalstream::engine::EngineConfig;
use vitalstream::model::now_millis;
use vitalstream::sources::mqtt::{self, MqttConfig};

/// "Storage" for a test engine: makes every piece durable at once (readings and dead
/// letters, so their MQTT messages are acknowledged) and keeps (device, seq) of each
/// stored reading.
/// (device, seq) of each stored reading.
type Stored = Arc<Mutex<Vec<(String, Option<u64>)>>>;

struct Store {
    stored: Stored,
    rejected: Arc<AtomicUsize>,
}

impl Store {
    fn start(h: &Harness) -> Store {
        let stored: Stored = Arc::default();
        let rejected = Arc::new(AtomicUsize::new(0));
        let (readings, rejects) = (h.readings.clone(), h.rejects.clone());
        {
            let stored = stored.clone();
            std::thread::spawn(move || {
                for batch in readings {
                    let mut s = stored.lock().unwrap();
                    for r in &batch.readings {
                        s.push((r.device_id.to_string(), r.seq));
                    }
                    drop(s);
                    if let Some(ack) = batch.ack {
                        ack.done();
                    }
                }
            });
        }
        {
            let rejected = rejected.clone();
            std::thread::spawn(move || {
                for batch in rejects {
                    rejected.fetch_add(batch.rejects.len(), Ordering::Relaxed);
                    if let Some(ack) = batch.ack {
                        ack.done();
                    }
                }
            });
        }
        Store { stored, rejected }
    }

    fn count(&self) -> usize {
        self.stored.lock().unwrap().len()
    }

    fn has(&self, device: &str) -> bool {
        self.stored.lock().unwrap().iter().any(|(d, _)| d == device)
    }
}

fn source_config(run: &str, port: u16) -> MqttConfig {
    MqttConfig {
        port,
        client_id: format!("{run}-ingest"),
        session_expiry: Duration::from_secs(600),
        offline_after: Duration::from_millis(1500),
        ..MqttConfig::default()
    }
}

/// Publishes QoS 1 messages through one connection that takes packets of any size, keeping
/// at most `window` unacknowledged; returns when the broker has acknowledged all of them.
fn publish_acked(port: u16, client_id: &str, messages: Vec<(String, Vec<u8>)>, window: usize) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(Some(16 << 20));
    let (client, mut connection) = Client::new(options, window + 10);
    let expected = messages.len();
    let (mut sent, mut acked) = (0, 0);
    let mut queue = messages.into_iter();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < expected {
        assert!(
            Instant::now() < deadline,
            "{client_id}: only {acked}/{expected} PUBACKs"
        );
        while sent - acked < window {
            let Some((topic, payload)) = queue.next() else {
                break;
            };
            client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .unwrap();
            sent += 1;
        }
        match connection.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Err(e)) => panic!("{client_id}: {e}"),
            _ => {}
        }
    }
    client.disconnect().unwrap();
    let _ = connection.recv_timeout(Duration::from_millis(200));
}

/// A reading of `device` on its vitals topic, `size` bytes long.
fn vitals(device: &str, seq: u64, size: usize) -> (String, Vec<u8>) {
    (
        format!("devices/{device}/vitals"),
        padded(device, seq, size),
    )
}

/// A valid reading of `device`, padded with an ignored key to `size` bytes.
fn padded(device: &str, seq: u64, size: usize) -> Vec<u8> {
    let head = format!(r#"{{"device_id":"{device}","seq":{seq},"hr":70,"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let mut out = head.into_bytes();
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

#[test]
fn frames_of_every_size_class_neither_stop_the_stream_nor_are_lost() {
    let broker = Broker::start("max_queued_messages 0\n");
    let run = unique("vs-size");
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let store = Store::start(&h);
    let source = mqtt::MqttSource::with_frame_limit(&source_config(&run, broker.port), 1 << 20);
    let (stop, reader) = spawn_source(&mut h, source);
    await_subscription(&h, &run, broker.port);

    // Small readings with large frames among them: 1 KB, 20 KB, 512 KB and exactly the
    // engine's limit are readings; 2 MiB is over the limit (dead-lettered, acknowledged);
    // 3 MiB is past what this client takes at all (the broker must not send it).
    let sizes = [1_000, 20_000, 512_000, 1 << 20, 2 << 20, 3 << 20];
    let device = format!("{run}-d");
    let mut messages = Vec::new();
    let mut seq = 0;
    for (i, &size) in sizes.iter().enumerate() {
        for _ in 0..50 {
            seq += 1;
            messages.push(vitals(&device, seq, 60));
        }
        let big = format!("{run}-big{i}");
        messages.push(vitals(&big, 1, size));
    }
    for _ in 0..50 {
        seq += 1;
        messages.push(vitals(&device, seq, 60));
    }
    publish_acked(broker.port, &format!("{run}-pub"), messages, 20);

    wait_for("every small reading and the large ones that fit", || {
        // The small ones, the four large ones that fit, and the probe reading.
        store.count() > seq as usize + 4
    });
    for i in 0..4 {
        assert!(store.has(&format!("{run}-big{i}")), "size class {i} stored");
    }
    wait_for("the too-large frame dead-lettered", || {
        store.rejected.load(Ordering::Relaxed) >= 1
    });
    let m = h.engine.metrics.snapshot();
    assert_eq!(m.rejected_by_reason.get("too_large"), Some(&1));
    assert!(!store.has(&format!("{run}-big4")) && !store.has(&format!("{run}-big5")));
    // Each small reading once, in spite of everything around it.
    let smalls: Vec<u64> = (store.stored.lock().unwrap().iter())
        .filter(|(d, _)| d == &device)
        .filter_map(|(_, s)| *s)
        .collect();
    assert_eq!(smalls.len(), seq as usize);
    assert_eq!(smalls.iter().collect::<HashSet<_>>().len(), seq as usize);
    stop.store(true, Ordering::Relaxed);
    let stats = reader.join().unwrap();
    assert_eq!(stats.reconnects, 0, "no frame broke the connection");
    h.finish();
}

#[test]
fn a_restart_with_a_large_session_backlog_drains_it() {
    let broker = Broker::start("max_queued_messages 0\nmax_inflight_messages 0\n");
    let run = unique("vs-backlog");
    let config = MqttConfig {
        batch_linger: Duration::from_millis(2),
        ..source_config(&run, broker.port)
    };
    // A first run makes the persistent session and its subscription, then stops.
    {
        let mut h = Harness::start(&self::config(), rules(HR_RULE));
        let _store = Store::start(&h);
        let (stop, reader) = spawn_source(&mut h, mqtt::MqttSource::new(&config));
        await_subscription(&h, &run, broker.port);
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        h.finish();
    }
    // While vitalstream is away, a ward publishes: the broker queues it all.
    const BACKLOG: usize = 100_000;
    let devices = 200;
    let messages: Vec<(String, Vec<u8>)> = (0..BACKLOG)
        .map(|i| {
            let device = format!("{run}-{}", i % devices);
            let seq = (i / devices) as u64;
            vitals(&device, seq, 90)
        })
        .collect();
    publish_acked(broker.port, &format!("{run}-ward"), messages, 1000);

    // Started again, it connects, drains the backlog and is ready.
    let mut h = Harness::start(&self::config(), rules(HR_RULE));
    let store = Store::start(&h);
    let source = mqtt::MqttSource::new(&config);
    let link = source.link();
    let started = Instant::now();
    let (stop, reader) = spawn_source(&mut h, source);
    let deadline = Instant::now() + Duration::from_secs(90);
    while store.count() < BACKLOG {
        assert!(
            Instant::now() < deadline,
            "only {} of {BACKLOG} backlog readings after {:?} (link: {:?})",
            store.count(),
            started.elapsed(),
            link.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(link.is_up(), "{:?}", link.status());
    let stored = store.stored.lock().unwrap().clone();
    let distinct: HashSet<_> = stored.iter().collect();
    assert_eq!(distinct.len(), BACKLOG, "each backlog reading exactly once");
    stop.store(true, Ordering::Relaxed);
    let stats = reader.join().unwrap();
    assert_eq!(stats.reconnects, 0, "connected once, no reconnect loop");
    h.finish();
}

#[test]
fn topic_ids_that_are_not_ids_never_reach_the_registry_or_raise_alarms() {
    let broker = Broker::start("");
    let run = unique("vs-ids");
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let store = Store::start(&h);
    let (stop, reader) = spawn_source(
        &mut h,
        mqtt::MqttSource::new(&source_config(&run, broker.port)),
    );
    await_subscription(&h, &run, broker.port);
    let good = format!("{run}-good");
    let long = "a".repeat(65);
    let bad_topics = ["bad id", "-DEV1", long.as_str(), "x*y", ""];
    let mut messages: Vec<(String, Vec<u8>)> = bad_topics
        .iter()
        .map(|id| (format!("devices/{id}/vitals"), br#"{"hr":70}"#.to_vec()))
        .collect();
    // A valid id whose reading is not valid does not enter either.
    let garbage = format!("{run}-garbage");
    messages.push((format!("devices/{garbage}/vitals"), b"{not json".to_vec()));
    messages.push((format!("devices/{garbage}/status"), b"online".to_vec()));
    messages.push((format!("devices/{good}/vitals"), br#"{"hr":70}"#.to_vec()));
    publish_acked(broker.port, &format!("{run}-pub"), messages, 10);
    wait_for("the good reading", || store.has(&good));
    wait_for("the rejects", || {
        store.rejected.load(Ordering::Relaxed) >= 6
    });

    let registry = h.engine.devices.clone();
    let known: Vec<String> = registry
        .list()
        .into_iter()
        .map(|(d, _)| d.to_string())
        .collect();
    assert!(known.contains(&good));
    assert_eq!(
        known.len(),
        2,
        "the probe and the good device only: {known:?}"
    );
    // Silence past offline_after: offline alarms for the two real devices only.
    std::thread::sleep(Duration::from_millis(3_000));
    let offline: Vec<String> = (h.engine.book.active().into_iter())
        .filter(|a| &*a.rule_id == "device.offline")
        .map(|a| a.subject.to_string())
        .collect();
    assert_eq!(offline.len(), 2, "{offline:?}");
    assert!(offline.contains(&good));
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    h.finish();
}

#[test]
fn a_flood_of_device_ids_is_bounded_and_raises_one_aggregated_alarm() {
    let broker = Broker::start("max_queued_messages 0\n");
    let run = unique("vs-flood");
    let engine = EngineConfig {
        max_devices: 300,
        ..config()
    };
    let mut h = Harness::start(&engine, rules(HR_RULE));
    let store = Store::start(&h);
    let (stop, reader) = spawn_source(
        &mut h,
        mqtt::MqttSource::new(&source_config(&run, broker.port)),
    );
    await_subscription(&h, &run, broker.port);
    const IDS: usize = 2_000;
    let messages: Vec<(String, Vec<u8>)> = (0..IDS)
        .map(|i| {
            let device = format!("{run}-{i}");
            vitals(&device, 0, 60)
        })
        .collect();
    publish_acked(broker.port, &format!("{run}-pub"), messages, 500);
    wait_for("every reading stored", || store.count() > IDS);
    let registry = h.engine.devices.clone();
    assert_eq!(registry.len(), 300, "bounded by engine.max_devices");
    assert!(registry.untracked() >= (IDS + 1 - 300) as u64);
    // The shards hold at most their share (with a quarter's slack): the rest of the
    // readings are stored but not evaluated, and one high-priority technical alarm per
    // full shard says so.
    let per_shard = engine.shard_device_limit();
    let book = h.engine.book.clone();
    wait_for("the device-limit alarm", || {
        (book.active().into_iter()).any(|a| &*a.rule_id == "engine.device_limit")
    });
    // Counted once a second per shard: wait until every shard has counted.
    let metrics = h.engine.metrics.clone();
    let unevaluated = || metrics.unevaluated.load(Ordering::Relaxed) as usize;
    let at_least = IDS + 1 - per_shard * engine.shard_count();
    wait_for("every unevaluated reading counted", || {
        unevaluated() >= at_least
    });
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(
        unevaluated() <= IDS + 1 - 300,
        "{} unevaluated, {per_shard} per shard",
        unevaluated()
    );

    // All of them go silent at once: one aggregated technical alarm, no storm.
    // (The probe device went silent on its own before the flood: its alarm is its own.)
    let probe = format!("{run}-probe");
    let technical = |rule: &str| {
        (book.active().into_iter())
            .filter(|a| &*a.rule_id == rule && a.subject.as_str() != probe.as_str())
            .count()
    };
    wait_for("the aggregated alarm", || {
        technical("source.devices_offline") == 1
    });
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(technical("source.devices_offline"), 1);
    assert_eq!(technical("device.offline"), 0, "no alarm per device");
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    h.finish();
}

#[test]
fn device_clocks_far_in_the_past_are_rejected_as_too_old() {
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let mut live = h.engine.source(vitalstream::model::ClockMode::Live);
    let now = now_millis();
    let day = 86_400_000;
    let mut lines = vec![reading("a", 0, "hr", 80.0)];
    // A week apart, back to 2001: none of these may reach storage.
    lines.extend((1..300).map(|i| reading("a", now - i * 7 * day - 60_000, "hr", 80.0)));
    // Late but within engine.max_age (7 days): stored, counted late.
    lines.push(reading("a", now - 6 * day, "hr", 80.0));
    lines.push(reading("a", now, "hr", 80.0));
    send_lines(&mut live, &lines, 50);
    drop(live);
    let (m, _, stored) = h.finish();
    assert_eq!(m.rejected_by_reason.get("too_old"), Some(&300));
    assert_eq!(m.accepted, 2);
    assert_eq!(stored, 2);
}

#[test]
fn one_wrong_clock_at_the_start_of_a_replay_does_not_poison_it() {
    const T0: i64 = 1_767_225_600_000;
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let mut src = h.replay_source();
    let mut lines = vec![reading("a", 1, "hr", 80.0)];
    lines.extend((0..1_000).map(|i| reading("a", T0 + i * 1_000, "hr", 80.0)));
    send_lines(&mut src, &lines, 7);
    drop(src);
    let (m, _, stored) = h.finish();
    assert_eq!(m.accepted, 1_000, "{:?}", m.rejected_by_reason);
    assert_eq!(m.rejected_by_reason.get("too_old"), Some(&1));
    assert_eq!(m.rejected_by_reason.get("future_ts"), None);
    assert_eq!(stored, 1_000);
}

#[test]
fn offline_alarms_from_last_wills_are_aggregated_and_every_way_back_clears_them() {
    let broker = Broker::start("");
    let run = unique("vs-wills");
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let store = Store::start(&h);
    let source = mqtt::MqttSource::new(&MqttConfig {
        offline_after: Duration::from_secs(3),
        ..source_config(&run, broker.port)
    });
    let (stop, reader) = spawn_source(&mut h, source);
    await_subscription(&h, &run, broker.port);
    let ward: Vec<String> = (0..25).map(|i| format!("{run}-{i}")).collect();
    let steady = format!("{run}-steady");
    let reading = |d: &str| (format!("devices/{d}/vitals"), br#"{"hr":70}"#.to_vec());
    let status = |d: &str, s: &str| (format!("devices/{d}/status"), s.as_bytes().to_vec());
    let publish = |messages: Vec<(String, Vec<u8>)>| {
        publish_acked(broker.port, &format!("{run}-pub"), messages, 100)
    };
    publish(ward.iter().chain([&steady]).map(|d| reading(d)).collect());
    wait_for("the ward's readings", || store.count() > ward.len());

    // A network fault: every device's last will says offline. One aggregated alarm.
    publish(ward.iter().map(|d| status(d, "offline")).collect());
    let book = h.engine.book.clone();
    let probe = format!("{run}-probe");
    let active = |rule: &str| -> Vec<String> {
        (book.active().into_iter())
            .filter(|a| &*a.rule_id == rule && a.subject.as_str() != probe.as_str())
            .map(|a| a.subject.to_string())
            .collect()
    };
    wait_for("the aggregated alarm", || {
        active("source.devices_offline").len() == 1
    });
    assert!(active("device.offline").is_empty(), "no alarm per device");

    // Past the fold window, one more device going offline is its own alarm, although the
    // aggregated one is still open.
    for _ in 0..8 {
        publish(vec![reading(&steady)]);
        std::thread::sleep(Duration::from_millis(500));
    }
    publish(vec![status(&steady, "offline")]);
    wait_for("the steady device's own alarm", || {
        active("device.offline") == vec![steady.clone()]
    });

    // The ward comes back by status messages alone: the aggregated alarm clears. (The probe
    // reading of the subscription went silent too, perhaps in the same sweep: it reads
    // again.)
    let mut back: Vec<(String, Vec<u8>)> = ward.iter().map(|d| status(d, "online")).collect();
    back.push(reading(&probe));
    publish(back);
    wait_for("the aggregated alarm to clear", || {
        active("source.devices_offline").is_empty()
    });
    assert_eq!(active("device.offline"), vec![steady.clone()]);
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    h.finish();
}

#[test]
fn a_broker_that_lost_the_session_gets_the_subscription_again_before_ready() {
    // No persistence: a restarted broker has forgotten vitalstream's session and
    // subscription, and numbers its messages from 1 again.
    let mut broker = Broker::start("max_queued_messages 0\n");
    let run = unique("vs-lost");
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let store = Store::start(&h);
    let source = mqtt::MqttSource::new(&source_config(&run, broker.port));
    let link = source.link();
    let (stop, reader) = spawn_source(&mut h, source);
    await_subscription(&h, &run, broker.port);
    assert!(link.is_up());
    // Readings in flight when the broker goes.
    let device = format!("{run}-d");
    let first: Vec<(String, Vec<u8>)> = (0..2_000).map(|i| vitals(&device, i, 80)).collect();
    publish_acked(broker.port, &format!("{run}-pub"), first, 500);
    broker.stop();
    std::thread::sleep(Duration::from_millis(500));
    wait_for("/ready to say the broker is away", || !link.is_up());
    broker.resume();
    wait_for("subscribed again", || link.is_up());
    // Everything published from now on arrives, exactly once.
    let after = format!("{run}-after");
    let second: Vec<(String, Vec<u8>)> = (0..2_000).map(|i| vitals(&after, i, 80)).collect();
    publish_acked(broker.port, &format!("{run}-pub2"), second, 500);
    wait_for("every reading after the restart", || {
        (store.stored.lock().unwrap().iter())
            .filter(|(d, _)| d == &after)
            .count()
            >= 2_000
    });
    let seqs: HashSet<Option<u64>> = (store.stored.lock().unwrap().iter())
        .filter(|(d, _)| d == &after)
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(seqs.len(), 2_000);
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    h.finish();
}
