//! The MQTT source against the Mosquitto on 127.0.0.1:1883, with real publishing clients:
//! one connection per device, QoS 1, as bedside devices publish.

mod common;

use common::broker::Broker;
use common::mqtt_client::*;

use common::*;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Client, Event, MqttOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vitalstream::alerts::AlertState;
use vitalstream::alerts::Transition;
use vitalstream::sources::mqtt::{self, MqttConfig};

#[test]
fn readings_from_many_device_connections_arrive_and_raise_alerts() {
    let run = unique("vs-test");
    let mut h = Harness::start(&config(), rules(HR_RULE));
    // "Storage": makes every piece durable at once and counts the readings.
    let readings = h.readings.clone();
    let stored = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let storage = {
        let stored = stored.clone();
        std::thread::spawn(move || {
            for batch in readings {
                stored.fetch_add(batch.readings.len(), Ordering::Relaxed);
                if let Some(ack) = batch.ack {
                    ack.done();
                }
            }
        })
    };
    let source_config = MqttConfig {
        client_id: format!("{run}-ingest"),
        // Short, so sessions of finished test runs do not pile up in the shared broker.
        session_expiry: Duration::from_secs(30),
        batch_linger: Duration::from_millis(10),
        ..MqttConfig::default()
    };
    let (stop, source) = spawn_source(&mut h, mqtt::MqttSource::new(&source_config));

    let probes = await_subscription(&h, &run, 1883);

    // 20 devices × 50 readings, each device on its own connection; two are tachycardic.
    let devices = 20;
    let per_device = 50;
    let publishers: Vec<_> = (0..devices)
        .map(|d| {
            let run = run.clone();
            std::thread::spawn(move || {
                let device = format!("{run}-bed-{d}");
                let hr = if d < 2 { 150 } else { 75 };
                let messages = (0..per_device)
                    .map(|seq| {
                        let payload = format!(r#"{{"seq":{seq},"hr":{hr},"spo2":97}}"#);
                        (format!("devices/{device}/vitals"), payload)
                    })
                    .collect();
                publish_all(&device, messages);
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    // Bad input beside it: a device speaking for another, a bad id in the topic, bad JSON.
    publish_all(
        &format!("{run}-bad"),
        vec![
            (
                format!("devices/{run}-bed-0/vitals"),
                format!(r#"{{"device_id":"{run}-bed-1","hr":80}}"#),
            ),
            (
                format!("devices/{run}-bad*id/vitals"),
                r#"{"hr":80}"#.into(),
            ),
            (format!("devices/{run}-bed-3/vitals"), "not json".into()),
        ],
    );

    let expected = probes + (devices * per_device) as u64 + 3;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.engine.metrics.snapshot().frames < expected {
        assert!(
            Instant::now() < deadline,
            "frames: {:?}",
            h.engine.metrics.snapshot()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let stats = source.join().unwrap();
    let rejects = h.rejects.clone();
    let (m, alerts, _) = h.finish();
    storage.join().unwrap();

    assert_eq!(m.frames, expected, "each message exactly once");
    assert_eq!(m.accepted, probes + (devices * per_device) as u64);
    assert_eq!(m.rejected_by_reason.get("device_id_mismatch"), Some(&1));
    assert_eq!(m.rejected_by_reason.get("bad_device_id"), Some(&1));
    assert_eq!(m.rejected_by_reason.get("invalid_json"), Some(&1));
    assert_eq!(
        rejects.try_iter().map(|b| b.rejects.len()).sum::<usize>(),
        3
    );
    assert_eq!(stored.load(Ordering::Relaxed) as u64, m.accepted);
    assert_eq!(
        count(&alerts, "hr_high", Transition::Raised),
        2,
        "one alert per tachycardic device"
    );
    assert_eq!(stats.messages, expected);
    assert!(
        stats.acknowledged > 0,
        "durable messages are acknowledged to the broker"
    );
}

#[test]
fn a_broker_restart_mid_stream_loses_and_duplicates_nothing() {
    let run = unique("vs-fault");
    let mut broker = Broker::start("persistence true\n");
    let mut h = Harness::start(&config(), rules(HR_RULE));
    // "Storage": records every stored (device, seq) and makes it durable at once.
    let readings = h.readings.clone();
    let stored = Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let storage = {
        let stored = stored.clone();
        std::thread::spawn(move || {
            for batch in readings {
                let mut s = stored.lock().unwrap();
                s.extend(
                    batch
                        .readings
                        .iter()
                        .map(|r| (r.device_id.to_string(), r.seq.unwrap_or(u64::MAX))),
                );
                drop(s);
                if let Some(ack) = batch.ack {
                    ack.done();
                }
            }
        })
    };
    let source_config = MqttConfig {
        port: broker.port,
        client_id: format!("{run}-ingest"),
        // Short, so sessions of finished test runs do not pile up in the shared broker.
        session_expiry: Duration::from_secs(30),
        batch_linger: Duration::from_millis(10),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        ..MqttConfig::default()
    };
    let (stop, source) = spawn_source(&mut h, mqtt::MqttSource::new(&source_config));
    // The source's session must exist before devices publish: wait for its subscription.
    await_subscription(&h, &run, broker.port);

    // Three devices publish 150 readings each at ~50 Hz, QoS 1, persistent sessions; the
    // broker is stopped and restarted in the middle.
    let devices = 3u64;
    let per_device = 150u64;
    let port = broker.port;
    let devices_done = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..devices)
        .map(|d| {
            let run = run.clone();
            let devices_done = devices_done.clone();
            std::thread::spawn(move || {
                let device = format!("{run}-bed-{d}");
                let mut options = MqttOptions::new(device.clone(), "127.0.0.1", port);
                options
                    .set_keep_alive(Duration::from_secs(5))
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(3600));
                let (client, mut connection) = Client::new(options, 1000);
                let sender = {
                    let client = client.clone();
                    let topic = format!("devices/{device}/vitals");
                    std::thread::spawn(move || {
                        for seq in 0..per_device {
                            let payload = format!(r#"{{"seq":{seq},"hr":80}}"#);
                            client
                                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                                .unwrap();
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    })
                };
                // Keep the connection going (reconnecting after the outage, resending what
                // was not acknowledged) until the test has seen everything stored.
                while !devices_done.load(Ordering::Relaxed) {
                    if let Ok(Err(_)) = connection.recv_timeout(Duration::from_millis(100)) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                sender.join().unwrap();
                client.disconnect().unwrap();
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1200));
    broker.stop();
    std::thread::sleep(Duration::from_millis(1000));
    broker.resume();

    let wanted = (devices * per_device) as usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = stored
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _)| d.contains("-bed-"))
            .count();
        if n >= wanted {
            break;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            let source = source.join().unwrap();
            let log = std::fs::read_to_string(broker.dir.path().join("mosquitto.log"))
                .unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("PUBLISH") && !l.contains("PUBACK"))
                .collect();
            panic!(
                "only {n}/{wanted} stored; source: {source:?}; engine: {:?}\nbroker log:\n{}",
                h.engine.metrics.snapshot(),
                lines.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Anything resent late would show up now as a second copy.
    std::thread::sleep(Duration::from_millis(500));
    devices_done.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let stats = source.join().unwrap();
    h.finish();
    storage.join().unwrap();

    let mut got: Vec<(String, u64)> = stored
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| d.contains("-bed-"))
        .cloned()
        .collect();
    got.sort();
    let mut expected: Vec<(String, u64)> = Vec::new();
    for d in 0..devices {
        expected.extend((0..per_device).map(|s| (format!("{run}-bed-{d}"), s)));
    }
    expected.sort();
    assert_eq!(
        got.len(),
        expected.len(),
        "every reading stored exactly once"
    );
    assert_eq!(got, expected);
    assert!(
        stats.reconnects >= 1,
        "the source saw the outage and came back"
    );
}

#[test]
fn device_status_technical_alerts_and_commands() {
    let run = unique("vs-dev");
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let readings = h.readings.clone();
    let storage = std::thread::spawn(move || {
        for batch in readings {
            if let Some(ack) = batch.ack {
                ack.done();
            }
        }
    });
    let source = mqtt::MqttSource::new(&MqttConfig {
        client_id: format!("{run}-ingest"),
        // Short, so sessions of finished test runs do not pile up in the shared broker.
        session_expiry: Duration::from_secs(30),
        batch_linger: Duration::from_millis(10),
        offline_after: Duration::from_millis(1500),
        ..MqttConfig::default()
    });
    let commands = source.commands();
    let (stop, reader) = spawn_source(&mut h, source);
    let registry = h.engine.devices.clone();
    let book = h.engine.book.clone();
    let monitor = format!("{run}-monitor");
    // Wait for the subscription with a reading the test can see arrive: a device enters
    // the registry with its first accepted reading.
    wait_for("the source to subscribe", || {
        publish_one(
            &format!("{run}-p"),
            &format!("devices/{monitor}/vitals"),
            r#"{"hr":70}"#,
            false,
        );
        std::thread::sleep(Duration::from_millis(100));
        registry.get(&monitor).is_some()
    });
    assert!(registry.get(&monitor).unwrap().online);

    // The device's last will says it is gone: offline, with a technical alert.
    publish_one(
        &format!("{run}-p"),
        &format!("devices/{monitor}/status"),
        r#"{"status":"offline"}"#,
        false,
    );
    wait_for("offline", || {
        registry.get(&monitor).is_some_and(|s| !s.online)
    });
    let offline = |book: &vitalstream::alerts::AlertBook| {
        book.active()
            .into_iter()
            .find(|a| &*a.rule_id == "device.offline" && a.subject == monitor.as_str())
    };
    wait_for("the offline alert", || offline(&book).is_some());
    assert_eq!(offline(&book).unwrap().state, AlertState::Firing);
    // A reading brings it back, and the alert resolves.
    publish_one(
        &format!("{run}-p"),
        &format!("devices/{monitor}/vitals"),
        r#"{"hr":70}"#,
        false,
    );
    wait_for("online again", || {
        registry.get(&monitor).is_some_and(|s| s.online)
    });
    wait_for("the offline alert to resolve", || offline(&book).is_none());
    // Silence past `offline_after` takes it offline again, by itself.
    wait_for("silence to count as offline", || offline(&book).is_some());

    // The device raises and clears a technical alert of its own, with its own priority.
    let topic = format!("devices/{monitor}/alerts");
    publish_one(
        &format!("{run}-p"),
        &topic,
        r#"{"code":"lead_off","priority":"medium","message":"ECG lead off"}"#,
        false,
    );
    let lead_off = |book: &vitalstream::alerts::AlertBook| {
        book.active()
            .into_iter()
            .find(|a| &*a.rule_id == "device.lead_off")
    };
    wait_for("the lead-off alert", || lead_off(&book).is_some());
    let alert = lead_off(&book).unwrap();
    assert_eq!(alert.priority, vitalstream::rules::Priority::Medium);
    assert_eq!(&*alert.message, "ECG lead off");
    publish_one(
        &format!("{run}-p"),
        &topic,
        r#"{"code":"lead_off","priority":"medium","active":false}"#,
        false,
    );
    wait_for("the lead-off alert to clear", || lead_off(&book).is_none());
    // Messages that break the contracts are rejected with reasons.
    publish_one(
        &format!("{run}-p"),
        &topic,
        r#"{"code":"Lead Off!","priority":"medium"}"#,
        false,
    );
    publish_one(
        &format!("{run}-p"),
        &format!("devices/{monitor}/status"),
        "sleepy",
        false,
    );
    let metrics = h.engine.metrics.clone();
    wait_for("the rejects", || {
        let m = metrics.snapshot();
        m.rejected_by_reason.get("bad_device_alert") == Some(&1)
            && m.rejected_by_reason.get("bad_status") == Some(&1)
    });

    // Commands reach the device on its commands topic.
    let mut options = MqttOptions::new(format!("{run}-device"), "127.0.0.1", 1883);
    options.set_keep_alive(Duration::from_secs(5));
    let (device, mut inbox) = Client::new(options, 10);
    device
        .subscribe(format!("devices/{monitor}/commands"), QoS::AtLeastOnce)
        .unwrap();
    let mut got = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.is_none() {
        assert!(Instant::now() < deadline, "the command never arrived");
        match inbox.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                commands
                    .send(&monitor, br#"{"command":"silence_audio"}"#)
                    .unwrap();
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got = Some(p.payload.to_vec()),
            _ => {}
        }
    }
    assert_eq!(got.unwrap(), br#"{"command":"silence_audio"}"#);
    assert!(commands.send("bad id", b"{}").is_err());

    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    h.finish();
    storage.join().unwrap();
}

#[test]
fn instances_in_a_shared_group_split_the_readings() {
    let run = unique("vs-share");
    let group = format!("{run}-group");
    // Two vitalstream instances (two engines), one shared subscription group.
    let instances: Vec<_> = (0..2)
        .map(|i| {
            let mut h = Harness::start(&config(), rules(HR_RULE));
            let readings = h.readings.clone();
            std::thread::spawn(move || {
                for batch in readings {
                    if let Some(ack) = batch.ack {
                        ack.done();
                    }
                }
            });
            let source = mqtt::MqttSource::new(&MqttConfig {
                client_id: format!("{run}-ingest-{i}"),
                // Short, so sessions of finished test runs do not pile up in the shared broker.
                session_expiry: Duration::from_secs(30),
                shared_group: Some(group.clone()),
                batch_linger: Duration::from_millis(10),
                ..MqttConfig::default()
            });
            let (stop, reader) = spawn_source(&mut h, source);
            (h, stop, reader)
        })
        .collect();
    let frames = |instances: &[(
        Harness,
        Arc<AtomicBool>,
        std::thread::JoinHandle<mqtt::MqttStats>,
    )]| {
        instances
            .iter()
            .map(|(h, _, _)| h.engine.metrics.snapshot().frames)
            .collect::<Vec<_>>()
    };
    // Both must be subscribed before the real traffic: probe until each has seen a message.
    wait_for("both instances to subscribe", || {
        publish_one(
            &format!("{run}-p"),
            &format!("devices/{run}-probe/vitals"),
            r#"{"hr":70}"#,
            false,
        );
        frames(&instances).iter().all(|&n| n > 0)
    });
    std::thread::sleep(Duration::from_millis(300));
    let before_each = frames(&instances);
    let before: u64 = before_each.iter().sum();
    let messages = (0..200)
        .map(|i| {
            (
                format!("devices/{run}-bed-{}/vitals", i % 10),
                format!(r#"{{"seq":{i},"hr":80}}"#),
            )
        })
        .collect();
    publish_all(&format!("{run}-pub"), messages);
    wait_for("all readings", || {
        frames(&instances).iter().sum::<u64>() == before + 200
    });
    let after = frames(&instances);
    let shares: Vec<u64> = after.iter().zip(&before_each).map(|(a, b)| a - b).collect();
    assert!(
        shares.iter().all(|&n| n >= 40),
        "each instance took a fair share: {shares:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        frames(&instances).iter().sum::<u64>(),
        before + 200,
        "no reading went to both"
    );
    for (h, stop, reader) in instances {
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        h.finish();
    }
}

#[test]
fn a_full_engine_stops_the_socket_and_the_broker_holds_the_rest() {
    let run = unique("vs-bp");
    // Storage takes one batch and then nothing until the test drains it.
    let config = vitalstream::engine::EngineConfig {
        queue_batches: 1,
        ..config()
    };
    let mut h = Harness::with_slow_storage(&config, rules(HR_RULE), 1);
    let source = mqtt::MqttSource::new(&MqttConfig {
        client_id: format!("{run}-ingest"),
        // Short, so sessions of finished test runs do not pile up in the shared broker.
        session_expiry: Duration::from_secs(30),
        batch_size: 50,
        batch_linger: Duration::from_millis(5),
        ..MqttConfig::default()
    });
    let (stop, reader) = spawn_source(&mut h, source);
    let probes = await_subscription(&h, &run, 1883);
    // Fewer than `receive_maximum` (4096), so the shared broker never has to queue past its
    // default limit of 1,000 for us: what it holds is in flight to this session.
    let total = 3000u64;
    let messages = (0..total)
        .map(|i| {
            (
                format!("devices/{run}-bed-{}/vitals", i % 20),
                format!(r#"{{"seq":{i},"hr":80}}"#),
            )
        })
        .collect();
    publish_all(&format!("{run}-pub"), messages);
    // The broker took everything, but the engine is full: the source has stopped reading.
    std::thread::sleep(Duration::from_millis(1000));
    let stalled = h.engine.metrics.snapshot().frames - probes;
    assert!(
        stalled < total,
        "with storage blocked, not everything can have been read ({stalled})"
    );
    // Storage catches up: every reading arrives, none twice.
    let mut stored = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored < total + probes {
        let batch = h
            .readings
            .recv_timeout(Duration::from_secs(10))
            .expect("readings keep coming");
        stored += batch.readings.len() as u64;
        if let Some(ack) = batch.ack {
            ack.done();
        }
        assert!(
            Instant::now() < deadline,
            "stored {stored} of {}",
            total + probes
        );
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let (m, _, rest) = h.finish();
    assert_eq!(
        stored + rest as u64,
        total + probes,
        "every reading exactly once"
    );
    assert_eq!(m.frames, total + probes);
}
