//! Kafka domain events and dead letters, on librdkafka's mock cluster (the real protocol
//! over TCP): the platform's envelope and headers exactly, keyed by patient.

mod common;

use common::{HR_RULE, Harness, WAIT, reading, rules};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use vitalstream::alerts::Transition;
use vitalstream::model::now_millis;
use vitalstream::sinks::events::{EventPublisher, KafkaConfig};

struct Received {
    key: Option<String>,
    headers: BTreeMap<String, String>,
    payload: Vec<u8>,
}

fn consume(brokers: &str, topic: &str, n: usize) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{topic}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_string(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Received {
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                headers,
                payload: m.payload().unwrap_or_default().to_vec(),
            });
        }
    }
    out
}

#[test]
fn alert_transitions_and_dead_letters_go_out_in_the_platforms_conventions() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("alert.events", 3, 1).unwrap();
    cluster.create_topic("vitals.dlq", 1, 1).unwrap();
    cluster.create_topic("device.events", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let events = EventPublisher::new(&KafkaConfig {
        brokers: brokers.clone(),
        ..KafkaConfig::default()
    })
    .unwrap();

    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let mut source = h.replay_source();
    let t = now_millis() - 10_000;
    let with_patient =
        |ts: i64, hr: f64| reading("bed-k", ts, "hr", hr).replace('{', r#"{"patient_id":"pat-k","#);
    let bad = format!(r#"{{"device_id":"bed-k","ts":{t},"hr":"fast"}}"#);
    common::send_lines(&mut source, &[with_patient(t, 150.0), bad.clone()], 1);
    let raised = h.alerts.recv_timeout(WAIT).unwrap();
    h.engine
        .book
        .acknowledge(&raised.alert.alert_id, "nurse-k")
        .unwrap();
    let acked = h.alerts.recv_timeout(WAIT).unwrap();
    common::send_lines(&mut source, &[with_patient(t + 1000, 80.0)], 1);
    let resolved = h.alerts.recv_timeout(WAIT).unwrap();
    assert_eq!(
        (raised.event, acked.event, resolved.event),
        (
            Transition::Raised,
            Transition::Acknowledged,
            Transition::Resolved
        )
    );
    for e in [&raised, &acked, &resolved] {
        events.alert(e).unwrap();
    }
    let rejects = h.rejects.recv_timeout(WAIT).unwrap();
    for r in &rejects.rejects {
        events.dead_letter(r, "replay").unwrap();
    }
    // Device changes, as the registry reports them.
    let changes = h.engine.devices.listen().unwrap();
    h.engine.devices.seen("bed-k", now_millis());
    h.engine
        .devices
        .assigned("bed-k", Some("pat-k"), "nurse-k", now_millis());
    for change in changes.try_iter() {
        events.device(&change).unwrap();
    }
    events.flush(Duration::from_secs(10)).unwrap();
    assert_eq!(
        events
            .metrics
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    let got = consume(&brokers, "alert.events", 3);
    assert_eq!(got.len(), 3);
    let mut types = Vec::new();
    for m in &got {
        let envelope: Value = serde_json::from_slice(&m.payload).unwrap();
        let keys: BTreeSet<&str> = envelope
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected: BTreeSet<&str> = [
            "event_id",
            "event_type",
            "event_version",
            "timestamp",
            "source_service",
            "correlation_id",
            "data",
            "metadata",
        ]
        .into();
        // user_id only when a person did it: the acknowledgement (the engine resolved it).
        if envelope["event_type"] == "alert.acknowledged" {
            expected.insert("user_id");
        }
        assert_eq!(keys, expected, "{envelope}");
        assert_eq!(envelope["event_version"], "1.0");
        assert_eq!(envelope["source_service"], "vitalstream");
        assert_eq!(envelope["data"]["alert_id"], raised.alert.alert_id.as_str());
        assert_eq!(envelope["event_id"].as_str().unwrap().len(), 36);
        assert!(envelope["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(m.key.as_deref(), Some("pat-k"));
        assert_eq!(
            m.headers["event-type"],
            envelope["event_type"].as_str().unwrap()
        );
        assert_eq!(m.headers["event-version"], "1.0");
        assert_eq!(
            m.headers["correlation-id"],
            envelope["correlation_id"].as_str().unwrap()
        );
        assert_eq!(
            envelope["correlation_id"],
            raised.alert.trigger.correlation_id.to_string()
        );
        if envelope["event_type"] == "alert.acknowledged" {
            assert_eq!(envelope["user_id"], "nurse-k");
        }
        types.push(envelope["event_type"].as_str().unwrap().to_string());
    }
    types.sort();
    assert_eq!(
        types,
        ["alert.acknowledged", "alert.raised", "alert.resolved"]
    );

    let devices = consume(&brokers, "device.events", 2);
    let kinds: Vec<(String, Option<String>)> = devices
        .iter()
        .map(|m| (m.headers["event-type"].clone(), m.key.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("device.online".to_string(), Some("bed-k".to_string())),
            ("device.assigned".to_string(), Some("pat-k".to_string()))
        ]
    );
    let assigned: Value = serde_json::from_slice(&devices[1].payload).unwrap();
    assert_eq!(assigned["data"]["patient_id"], "pat-k");
    assert_eq!(assigned["user_id"], "nurse-k");
    assert_eq!(assigned["event_version"], "1.0");

    let dlq = consume(&brokers, "vitals.dlq", 1);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload, bad.as_bytes(), "the original bytes");
    assert_eq!(dlq[0].headers["dlq-reason"], "bad_type:hr");
    assert_eq!(dlq[0].headers["dlq-source"], "replay");
    drop(source);
    h.finish();
}

/// Readings consumed from `vitals.raw` reach the engine (and raise alerts); offsets are
/// committed only once the batches carrying them are durable.
#[test]
fn offsets_are_committed_only_behind_durable_readings() {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use rdkafka::{Offset, TopicPartitionList};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use vitalstream::sources::kafka::{KafkaSource, KafkaSourceConfig};

    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("vitals.raw", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let t0 = now_millis() - 60_000;
    let total = 200;
    for i in 0..total {
        let device = format!("bed-{}", i % 4);
        let hr = if i == 100 { 150 } else { 70 };
        let payload = format!(
            r#"{{"device_id":"{device}","ts":{},"seq":{i},"hr":{hr}}}"#,
            t0 + i as i64 * 100
        );
        producer
            .send(
                BaseRecord::to("vitals.raw")
                    .key(device.as_str())
                    .payload(payload.as_bytes()),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let config = KafkaSourceConfig {
        brokers: brokers.clone(),
        group_id: "rule-nodes".into(),
        batch_size: 50,
        ..KafkaSourceConfig::default()
    };
    let source = KafkaSource::new(&config).unwrap();
    let handle = h.engine.source(vitalstream::model::ClockMode::Live);
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let stop = stop.clone();
        std::thread::spawn(move || source.run(handle, &stop))
    };
    // Hold every batch: nothing is durable yet.
    let mut held = Vec::new();
    let mut readings = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while readings < total && Instant::now() < deadline {
        if let Ok(b) = h.readings.recv_timeout(Duration::from_millis(100)) {
            readings += b.readings.len();
            held.push(b);
        }
    }
    assert_eq!(readings, total);
    let alert = h.alerts.recv_timeout(WAIT).expect("hr 150 raises");
    assert_eq!(alert.alert.trigger.device_id.as_str(), "bed-0");

    let committed = || -> i64 {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "rule-nodes")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("vitals.raw", 0);
        tpl.add_partition("vitals.raw", 1);
        let got = probe
            .committed_offsets(tpl, Duration::from_secs(5))
            .unwrap();
        got.elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum()
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(committed(), 0, "nothing durable, nothing committed");
    for b in held {
        if let Some(ack) = b.ack {
            ack.done();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while committed() < total as i64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(committed(), total as i64, "every durable record committed");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let stats = runner.join().unwrap();
    assert_eq!(stats.records, total as u64);
    h.finish();
}
