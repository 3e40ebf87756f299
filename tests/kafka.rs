//! Kafka domain events and dead letters, on librdkafka's mock cluster (the real protocol
//! over TCP): the platform's envelope and headers exactly, keyed by patient.

mod common;

use common::kafka::TestKafka;
use common::{HR_RULE, Harness, SPO2_WINDOW, WAIT, reading, rules};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vitalstream::alerts::{AlertEvent, Transition};
use vitalstream::model::{ClockMode, now_millis};
use vitalstream::sinks::events::EventPublisher;
use vitalstream::sources::kafka::{KafkaSource, KafkaSourceConfig, KafkaStats};

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
    common::logs();
    let k = TestKafka::start();
    k.create_topic("alert.events", 3);
    k.create_topic("vitals.dlq", 1);
    k.create_topic("device.events", 1);
    let brokers = k.brokers.clone();
    let events = EventPublisher::new(&k.events_config()).unwrap();

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
    assert_eq!(events.metrics.failed.load(Relaxed), 0);

    let got = consume(&brokers, &k.t("alert.events"), 3);
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

    let devices = consume(&brokers, &k.t("device.events"), 2);
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

    let dlq = consume(&brokers, &k.t("vitals.dlq"), 1);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload, bad.as_bytes(), "the original bytes");
    assert_eq!(dlq[0].headers["dlq-reason"], "bad_type:hr");
    assert_eq!(dlq[0].headers["dlq-source"], "replay");
    drop(source);
    h.finish();
}

/// Settings for a source reading this test's `vitals.raw` in group `group`.
fn source_config(k: &TestKafka, group: &str, batch_size: usize) -> KafkaSourceConfig {
    KafkaSourceConfig {
        brokers: k.brokers.clone(),
        group_id: k.t(group),
        topics: vec![k.t("vitals.raw")],
        batch_size,
        ..KafkaSourceConfig::default()
    }
}

/// Starts a Kafka source feeding `h`'s engine on its own thread; set the flag to stop it.
fn start_source(
    name: &str,
    h: &mut Harness,
    config: &KafkaSourceConfig,
) -> (Arc<AtomicBool>, JoinHandle<KafkaStats>) {
    let source = KafkaSource::new(config).unwrap();
    let handle = h.engine.source(ClockMode::Live);
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name(format!("kafka-{name}"))
            .spawn(move || source.run(handle, &stop))
            .unwrap()
    };
    (stop, thread)
}

/// Readings consumed from `vitals.raw` reach the engine (and raise alerts); offsets are
/// committed only once the batches carrying them are durable.
#[test]
fn offsets_are_committed_only_behind_durable_readings() {
    common::logs();

    let k = TestKafka::start();
    k.create_topic("vitals.raw", 2);
    k.create_topic("vitals.dlq", 1);
    let brokers = k.brokers.clone();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let t0 = now_millis() - 60_000;
    let total = 200;
    for i in 0..total {
        let device = format!("bed-{}", i % 4);
        let hr = if i == 100 { 150 } else { 70 };
        let mut payload = format!(
            r#"{{"device_id":"{device}","ts":{},"seq":{i},"hr":{hr}}}"#,
            t0 + i as i64 * 100
        );
        if i == 150 {
            payload = payload.replace("\"hr\":70", "\"hr\":\"fast\"");
        }
        producer
            .send(
                BaseRecord::to(&k.t("vitals.raw"))
                    .key(device.as_str())
                    .payload(payload.as_bytes()),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let (stop, runner) = start_source("rules", &mut h, &source_config(&k, "rule-nodes", 50));
    // Hold every batch: nothing is durable yet.
    let mut held = Vec::new();
    let mut readings = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while readings < total - 1 && Instant::now() < deadline {
        if let Ok(b) = h.readings.recv_timeout(Duration::from_millis(100)) {
            readings += b.readings.len();
            held.push(b);
        }
    }
    assert_eq!(readings, total - 1, "all but the bad one");
    let alert = h.alerts.recv_timeout(WAIT).expect("hr 150 raises");
    // The bad record goes to the dead-letter output with its place in Kafka…
    let rejects = h.rejects.recv_timeout(WAIT).unwrap();
    let origin = rejects.rejects[0].origin.clone().expect("a Kafka record");
    assert_eq!(*origin.topic, k.t("vitals.raw"));
    let events = EventPublisher::new(&k.events_config()).unwrap();
    events.dead_letter(&rejects.rejects[0], "kafka").unwrap();
    events.flush(Duration::from_secs(10)).unwrap();
    // Dead-lettered is done with, like stored: its offset may be committed.
    rejects.ack.unwrap().done();
    // …which the dead-letter topic carries in its headers.
    let dlq = consume(&brokers, &k.t("vitals.dlq"), 1);
    assert_eq!(dlq[0].headers["dlq-reason"], "bad_type:hr");
    assert_eq!(dlq[0].headers["dlq-source"], "kafka");
    assert_eq!(dlq[0].headers["dlq-kafka-topic"], k.t("vitals.raw"));
    assert_eq!(
        dlq[0].headers["dlq-kafka-partition"],
        origin.partition.to_string()
    );
    assert_eq!(
        dlq[0].headers["dlq-kafka-offset"],
        origin.offset.to_string()
    );
    assert!(String::from_utf8_lossy(&dlq[0].payload).contains("\"fast\""));
    assert_eq!(alert.alert.trigger.device_id.as_str(), "bed-0");

    let committed = || -> i64 { committed(&k, "rule-nodes", 2).iter().sum() };
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
    stop.store(true, Relaxed);
    let stats = runner.join().unwrap();
    assert_eq!(stats.records, total as u64);
    h.finish();
}

fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

/// One reading a second from each of eight devices, seconds `from..to`, with episodes:
/// some wholly before the rebalance, some across it, some after it.
fn ward(t0: i64, from: i64, to: i64) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in from..to {
        for d in 0..8 {
            let device = format!("bed-{d}");
            let low_spo2 = (d == 1 && (20..75).contains(&s)) || (d == 2 && (52..68).contains(&s));
            let high_hr = (d == 3 && (55..66).contains(&s))
                || (d == 4 && (80..90).contains(&s))
                || (d == 5 && (10..20).contains(&s));
            let spo2 = if low_spo2 { 85 } else { 97 };
            let hr = if high_hr { 150 } else { 70 };
            let line = format!(
                r#"{{"device_id":"{device}","ts":{},"seq":{s},"hr":{hr},"spo2":{spo2}}}"#,
                t0 + s * 1000
            );
            out.push((device, line));
        }
    }
    out
}

fn produce(k: &TestKafka, lines: &[(String, String)]) {
    let p = producer(&k.brokers);
    for (key, line) in lines {
        p.send(BaseRecord::to(&k.t("vitals.raw")).key(key).payload(line))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

/// A rule node: an engine whose storage makes every reading durable at once, fed by a
/// Kafka source in the `rule-nodes` group.
struct Node {
    h: Harness,
    stop: Arc<AtomicBool>,
    source: JoinHandle<KafkaStats>,
    stored: Arc<AtomicUsize>,
}

impl Node {
    fn start(name: &str, k: &TestKafka, rules_toml: &str, strategy: &str) -> Node {
        Node::with_storage(name, k, rules_toml, strategy, true)
    }

    /// A rule node whose storage takes readings but never makes them durable (it stays
    /// stalled while the node runs): nothing it reads live may be committed.
    fn stalled(name: &str, k: &TestKafka, rules_toml: &str, strategy: &str) -> Node {
        Node::with_storage(name, k, rules_toml, strategy, false)
    }

    fn with_storage(
        name: &str,
        k: &TestKafka,
        rules_toml: &str,
        strategy: &str,
        durable: bool,
    ) -> Node {
        let mut h = Harness::start(&common::config(), rules(rules_toml));
        let stored = Arc::new(AtomicUsize::new(0));
        {
            let (readings, stored) = (h.readings.clone(), stored.clone());
            std::thread::spawn(move || {
                let mut stalled = Vec::new();
                for b in readings {
                    stored.fetch_add(b.readings.len(), Relaxed);
                    match b.ack {
                        Some(ack) if durable => ack.done(),
                        ack => stalled.extend(ack),
                    }
                }
            });
        }
        let config = KafkaSourceConfig {
            rebuild_records: 1000,
            // The mock coordinator waits this long (less a second) for members to rejoin.
            session_timeout: Duration::from_secs(3),
            assignment_strategy: strategy.into(),
            ..source_config(k, "rule-nodes", 64)
        };
        // A stalled node's revokes and shutdown wait only this long for what never comes.
        let config = match durable {
            true => config,
            false => KafkaSourceConfig {
                revoke_timeout: Duration::from_secs(1),
                ..config
            },
        };
        let (stop, source) = start_source(name, &mut h, &config);
        Node {
            h,
            stop,
            source,
            stored,
        }
    }

    fn stored(&self) -> usize {
        self.stored.load(Relaxed)
    }

    fn frames(&self) -> u64 {
        self.h.engine.metrics.snapshot().frames
    }

    fn finish(self) -> (KafkaStats, Vec<AlertEvent>) {
        self.stop.store(true, Relaxed);
        let stats = self.source.join().unwrap();
        let (_, alerts, _) = self.h.finish();
        (stats, alerts)
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (transition, alert id) of every raise and resolve, sorted.
fn edges(events: &[AlertEvent]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.event != Transition::Acknowledged)
        .map(|e| (e.event.name().to_string(), e.alert.alert_id.clone()))
        .collect();
    out.sort();
    out
}

/// Two rule nodes in one group split the partitions: moving only what must move
/// (cooperative-sticky, the default)…
#[test]
fn a_cooperative_rebalance_neither_loses_nor_doubles_alerts() {
    common::logs();
    rebalance_between_two_rule_nodes("cooperative-sticky");
}

/// …or revoking everything and assigning afresh (the eager protocols).
#[test]
fn an_eager_rebalance_neither_loses_nor_doubles_alerts() {
    common::logs();
    rebalance_between_two_rule_nodes("range");
}

/// When the second node joins, partitions move mid-episode, with windows open. Together the
/// nodes raise and resolve exactly the alerts one engine raises over the same readings:
/// none lost, none doubled; and every reading is stored once.
fn rebalance_between_two_rule_nodes(strategy: &str) {
    common::logs();
    let k = TestKafka::start();
    k.create_topic("vitals.raw", 4);
    let rules_toml = format!("{HR_RULE}{SPO2_WINDOW}");
    let t0 = now_millis() - 200_000;
    let before = ward(t0, 0, 60);
    let after = ward(t0, 60, 130);

    let a = Node::start("a", &k, &rules_toml, strategy);
    produce(&k, &before);
    wait_for("node A to store the first minute", || {
        a.stored() == before.len()
    });
    let b = Node::start("b", &k, &rules_toml, strategy);
    // B reads again what it needs to rebuild its partitions' windows before going on.
    wait_for("node B to be assigned partitions", || b.frames() > 0);
    produce(&k, &after);
    let total = before.len() + after.len();
    wait_for("both nodes to store everything", || {
        a.stored() + b.stored() >= total
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.stored() + b.stored(), total, "every reading stored once");
    let (a_stats, a_alerts) = a.finish();
    let (b_stats, b_alerts) = b.finish();
    assert!(a_stats.rebalances >= 2, "A saw B join: {a_stats:?}");
    assert!(b_stats.warmup_records > 0, "B rebuilt state: {b_stats:?}");
    assert_eq!(
        (a_stats.skipped, b_stats.skipped),
        (0, 0),
        "no offset jumped over"
    );
    let live = |s: &KafkaStats| s.records - s.warmup_records;
    assert!(
        live(&a_stats) > before.len() as u64 && live(&b_stats) > 0,
        "the partitions are split: A {a_stats:?}, B {b_stats:?}"
    );

    // The same readings through one engine, in order.
    let mut reference = Harness::start(&common::config(), rules(&rules_toml));
    let mut source = reference.replay_source();
    let lines: Vec<String> = before
        .iter()
        .chain(&after)
        .map(|(_, l)| l.clone())
        .collect();
    common::send_lines(&mut source, &lines, 64);
    drop(source);
    let (_, expected, _) = reference.finish();
    let expected = edges(&expected);
    assert!(
        expected.len() >= 8,
        "the episodes raise and resolve alerts: {expected:?}"
    );

    let mut got = edges(&a_alerts);
    got.extend(edges(&b_alerts));
    got.sort();
    assert_eq!(got, expected, "A and B together, against one engine");
}

/// The number of records committed for each partition of this test's `vitals.raw`, as the
/// group `group` would start from them (nothing committed counts 0).
fn committed(k: &TestKafka, group: &str, partitions: i32) -> Vec<i64> {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &k.brokers)
        .set("group.id", k.t(group))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&k.t("vitals.raw"), p);
    }
    let got = probe
        .committed_offsets(tpl, Duration::from_secs(5))
        .unwrap();
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .collect()
}

/// A second rule node joins while the first one's asynchronous commits are refused (as a
/// rebalance makes the broker refuse them: "Specified group generation id is not valid").
/// What became durable before the rebalance is committed by the revoke all the same, so the
/// new owner re-reads it only as warm-up: the alarm that holds across the handover goes on
/// under the same id, raised once; every reading is stored once.
///
/// Cooperative only: with an eager protocol the revoke commits while the members rejoin,
/// which a broker accepts (`PreparingRebalance`) but librdkafka's mock refuses.
#[test]
fn a_revoke_commits_what_became_durable_while_async_commits_failed() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    common::logs();
    let strategy = "cooperative-sticky";
    // Refusing commits needs the mock cluster, whatever VITALSTREAM_TEST_KAFKA says.
    let k = TestKafka::mock();
    k.create_topic("vitals.raw", 2);
    let t0 = now_millis() - 100_000;
    // One bed per partition, each with high heart rate from second 10 on, before and after
    // the rebalance: whichever partition moves, an ongoing alarm moves with it.
    let ward = |from: i64, to: i64| -> Vec<(i32, String)> {
        let mut out = Vec::new();
        for s in from..to {
            for bed in 0..2 {
                let hr = if s >= 10 { 150 } else { 70 };
                let line = format!(
                    r#"{{"device_id":"bed-{bed}","ts":{},"seq":{s},"hr":{hr}}}"#,
                    t0 + s * 1000
                );
                out.push((bed, line));
            }
        }
        out
    };
    let topic = k.t("vitals.raw");
    let produce_to = |lines: &[(i32, String)]| {
        let p = producer(&k.brokers);
        for (partition, line) in lines {
            let key = format!("bed-{partition}");
            let record = BaseRecord::to(&topic)
                .partition(*partition)
                .key(&key)
                .payload(line);
            p.send(record).map_err(|(e, _)| e).unwrap();
        }
        p.flush(Duration::from_secs(10)).unwrap();
    };
    let (before, after) = (ward(0, 30), ward(30, 40));
    let (per_partition, more) = (before.len() as i64 / 2, after.len() as i64 / 2);

    k.cluster().request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 1000],
    );
    let a = Node::start("a", &k, HR_RULE, strategy);
    produce_to(&before);
    wait_for("node A to store the first half minute", || {
        a.stored() == before.len()
    });
    // A's commits have gone out by now, and were refused.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        committed(&k, "rule-nodes", 2),
        [0, 0],
        "the asynchronous commits failed"
    );
    k.cluster()
        .clear_request_errors(RDKafkaApiKey::OffsetCommit);

    let b = Node::start("b", &k, HR_RULE, strategy);
    wait_for("node B to be assigned a partition", || b.frames() > 0);
    produce_to(&after);
    let total = before.len() + after.len();
    wait_for("both nodes to store everything", || {
        a.stored() + b.stored() >= total
    });
    std::thread::sleep(Duration::from_millis(500));
    let stored = a.stored() + b.stored();
    let on_b = b.h.engine.book.active();
    let (a_stats, a_alerts) = a.finish();
    let (b_stats, b_alerts) = b.finish();
    assert!(a_stats.rebalances >= 2, "A saw B join: {a_stats:?}");
    // The partition that moved was committed up to all A had made durable before B was
    // given it: B re-read those records as warm-up only (and never commits them).
    assert_eq!(
        b_stats.warmup_records, per_partition as u64,
        "B started from the offset after all A had made durable: {b_stats:?}"
    );
    assert_eq!(stored, total, "every reading stored once");
    let raised: Vec<(String, String)> = a_alerts
        .iter()
        .chain(&b_alerts)
        .filter(|e| e.event == Transition::Raised)
        .map(|e| (e.alert.subject.to_string(), e.alert.alert_id.clone()))
        .collect();
    let mut subjects: Vec<&str> = raised.iter().map(|(s, _)| s.as_str()).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        ["bed-0", "bed-1"],
        "each alarm raised once: {raised:?}"
    );
    // B took the moved bed's alarm over: the same alert, not a new one.
    assert!(!on_b.is_empty(), "B holds the alarm of the bed that moved");
    for alert in &on_b {
        assert!(
            raised.contains(&(alert.subject.to_string(), alert.alert_id.clone())),
            "{} on B is the alarm A raised: {raised:?}",
            alert.alert_id
        );
    }
    // At shutdown each node commits all it made durable.
    assert_eq!(
        committed(&k, "rule-nodes", 2),
        [per_partition + more, per_partition + more],
        "every durable record committed"
    );
}

/// Watches the offsets group `group` has committed for this test's `vitals.raw`, every few
/// milliseconds, until `finish`: the lowest seen per partition (nothing committed counts 0).
struct CommitWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<i64>>,
}

impl CommitWatch {
    fn start(k: &TestKafka, group: &str, partitions: i32) -> CommitWatch {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &k.brokers)
            .set("group.id", k.t(group))
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&k.t("vitals.raw"), p);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut lowest = vec![i64::MAX; partitions as usize];
                loop {
                    let last = stop.load(Relaxed);
                    let got = probe.committed_offsets(tpl.clone(), Duration::from_secs(5));
                    for e in got.expect("the coordinator answers").elements() {
                        let offset = match e.offset() {
                            Offset::Offset(o) => o,
                            _ => 0,
                        };
                        let low = &mut lowest[e.partition() as usize];
                        *low = offset.min(*low);
                    }
                    if last {
                        return lowest;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        CommitWatch { stop, thread }
    }

    fn finish(self) -> Vec<i64> {
        self.stop.store(true, Relaxed);
        self.thread.join().unwrap()
    }
}

/// The reported doubled alerts: a node given partitions re-reads records before their
/// committed offsets (warm-up) to rebuild state. Warm-up records must never be committed:
/// committing them moves the group's offset back, and whoever is given the partition next
/// (after a rebalance or a crash) treats records already evaluated as new, and raises their
/// alerts again.
///
/// Node A evaluates a hundred readings per partition, with an episode of high heart rate,
/// and commits them all. Node B takes both partitions over, rebuilds from all of those
/// (warm-up), and reads ten more each, which its stalled storage never makes durable. Just
/// after B's warm-up, node C joins and takes one partition from B. The group's committed
/// offsets never go below A's, C goes on from A's offset, and the episode's alarms are
/// raised once each, by A.
#[test]
fn warm_up_never_moves_committed_offsets_back_nor_doubles_alerts() {
    common::logs();
    let strategy = "cooperative-sticky";
    let k = TestKafka::start();
    k.create_topic("vitals.raw", 2);
    let t0 = now_millis() - 200_000;
    // One bed per partition, heart rate high for seconds 70..80. A hundred records per
    // partition: not a multiple of the batch size (64), so B's warm-up ends mid-batch.
    let ward = |from: i64, to: i64| -> Vec<(i32, String)> {
        let mut out = Vec::new();
        for s in from..to {
            for bed in 0..2 {
                let hr = if (70..80).contains(&s) { 150 } else { 70 };
                let line = format!(
                    r#"{{"device_id":"bed-{bed}","ts":{},"seq":{s},"hr":{hr}}}"#,
                    t0 + s * 1000
                );
                out.push((bed, line));
            }
        }
        out
    };
    let topic = k.t("vitals.raw");
    let produce_to = |lines: &[(i32, String)]| {
        let p = producer(&k.brokers);
        for (partition, line) in lines {
            let key = format!("bed-{partition}");
            let record = BaseRecord::to(&topic)
                .partition(*partition)
                .key(&key)
                .payload(line);
            p.send(record).map_err(|(e, _)| e).unwrap();
        }
        p.flush(Duration::from_secs(10)).unwrap();
    };
    let (n, more) = (100, 10);
    let (before, after) = (ward(0, n), ward(n, n + more));

    let a = Node::start("a", &k, HR_RULE, strategy);
    produce_to(&before);
    wait_for("node A to store the first hundred seconds", || {
        a.stored() == before.len()
    });
    let (_, a_alerts) = a.finish();
    assert_eq!(
        committed(&k, "rule-nodes", 2),
        [n, n],
        "A committed all it read"
    );

    let watch = CommitWatch::start(&k, "rule-nodes", 2);
    produce_to(&after);
    let b = Node::stalled("b", &k, HR_RULE, strategy);
    wait_for("node B to rebuild and read on", || {
        b.stored() == after.len()
    });
    // B's commits, if any, have gone out by now.
    std::thread::sleep(Duration::from_millis(500));
    let c = Node::start("c", &k, HR_RULE, strategy);
    wait_for("node C to be given a partition and read it", || {
        c.stored() >= more as usize
    });
    std::thread::sleep(Duration::from_millis(500));
    let on_c = c.stored();
    let (b_stats, b_alerts) = b.finish();
    let (c_stats, c_alerts) = c.finish();
    let lowest = watch.finish();

    assert!(
        lowest.iter().all(|&o| o >= n),
        "the group's committed offsets went back below A's {n}: lowest {lowest:?}"
    );
    assert_eq!(
        b_stats.warmup_records,
        2 * n as u64,
        "B rebuilt: {b_stats:?}"
    );
    assert_eq!(
        (c_stats.warmup_records, on_c),
        (n as u64, more as usize),
        "C rebuilt from what A evaluated and went on from A's offset: {c_stats:?}"
    );
    let raised = |events: &[AlertEvent]| -> Vec<String> {
        let mut subjects: Vec<String> = (events.iter())
            .filter(|e| e.event == Transition::Raised)
            .map(|e| e.alert.subject.to_string())
            .collect();
        subjects.sort();
        subjects
    };
    assert_eq!(raised(&a_alerts), ["bed-0", "bed-1"], "A raised the alarms");
    assert_eq!(
        (raised(&b_alerts), raised(&c_alerts)),
        (vec![], vec![]),
        "no alarm raised twice"
    );
    // C committed what it made durable; B nothing (its storage never confirmed).
    let mut end = committed(&k, "rule-nodes", 2);
    end.sort();
    assert_eq!(end, [n, n + more], "committed at the end");
}

/// A node that stops commits synchronously all it made durable, also what its refused
/// asynchronous commits carried.
#[test]
fn the_shutdown_commits_what_async_commits_failed_to() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    common::logs();
    let k = TestKafka::mock();
    k.create_topic("vitals.raw", 2);
    k.cluster().request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 1000],
    );
    let node = Node::start("a", &k, HR_RULE, "cooperative-sticky");
    let lines = ward(now_millis() - 100_000, 0, 10);
    produce(&k, &lines);
    wait_for("the node to store everything", || {
        node.stored() == lines.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(committed(&k, "rule-nodes", 2), [0, 0], "commits refused");
    k.cluster()
        .clear_request_errors(RDKafkaApiKey::OffsetCommit);
    node.finish();
    let committed = committed(&k, "rule-nodes", 2);
    assert_eq!(
        committed.iter().sum::<i64>(),
        lines.len() as i64,
        "every durable record committed: {committed:?}"
    );
}

/// An engine that stays full (its storage stalled) makes the source pause its partitions,
/// not buffer: every record still arrives once, in order per device.
#[test]
fn a_full_engine_pauses_the_partitions_and_loses_nothing() {
    common::logs();

    let k = TestKafka::start();
    k.create_topic("vitals.raw", 2);
    let t0 = now_millis() - 100_000;
    let total = 6000;
    let lines: Vec<(String, String)> = (0..total)
        .map(|i| {
            let device = format!("bed-{}", i % 6);
            let line = format!(
                r#"{{"device_id":"{device}","ts":{},"seq":{i},"hr":70}}"#,
                t0 + i as i64 * 10
            );
            (device, line)
        })
        .collect();
    produce(&k, &lines);

    // Storage takes one batch at a time, and slowly.
    let mut h = Harness::with_slow_storage(&common::config(), rules(HR_RULE), 1);
    let (stop, runner) = start_source("slow", &mut h, &source_config(&k, "slow", 20));
    let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
    let mut stored = 0;
    let mut stalled = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored < total && Instant::now() < deadline {
        let Ok(batch) = h.readings.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        // Storage stalls for a second once, then is merely slow.
        if stored > 1000 && !stalled {
            stalled = true;
            std::thread::sleep(Duration::from_secs(1));
        }
        std::thread::sleep(Duration::from_millis(2));
        for r in &batch.readings {
            let seq = r.seq.unwrap();
            if let Some(prev) = last_seq.insert(r.device_id.to_string(), seq) {
                assert!(
                    seq > prev,
                    "{} out of order: {prev} then {seq}",
                    r.device_id
                );
            }
        }
        stored += batch.readings.len();
        batch.ack.unwrap().done();
    }
    stop.store(true, Relaxed);
    let stats = runner.join().unwrap();
    assert_eq!(
        stats.skipped, 0,
        "the broker delivered every offset: {stats:?}"
    );
    assert_eq!(stored, total, "every record, once");
    assert!(stats.pauses > 0, "the source paused: {stats:?}");
    h.finish();
}

/// The scaled-out path: devices publish to MQTT, an ingest node forwards every reading as
/// it came to `vitals.raw` keyed by device id, and a rule node of the group evaluates it.
#[test]
fn an_ingest_node_forwards_mqtt_readings_to_the_rule_nodes() {
    common::logs();

    let k = TestKafka::start();
    k.create_topic("vitals.raw", 4);
    let brokers = k.brokers.clone();
    let mqtt = common::broker::Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ingest.toml");
    std::fs::write(
        &file,
        format!(
            r#"
role = "ingest"
status_interval = "1s"
[[sources]]
type = "mqtt"
port = {port}
client_id = "ingest-test"
batch_linger = "10ms"
[kafka]
brokers = "{brokers}"
raw_topic = "{raw}"
alert_topic = "{alerts}"
device_topic = "{devices}"
dlq_topic = "{dlq}"
"#,
            port = mqtt.port,
            raw = k.t("vitals.raw"),
            alerts = k.t("alert.events"),
            devices = k.t("device.events"),
            dlq = k.t("vitals.dlq"),
        ),
    )
    .unwrap();
    let config = vitalstream::config::Config::load_with(Some(&file), &[]).unwrap();
    config.validate().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ingest = {
        let stop = stop.clone();
        std::thread::spawn(move || vitalstream::service::run(&config, stop))
    };

    let t0 = now_millis() - 30_000;
    let mut sent = Vec::new();
    for s in 0..20 {
        for d in 0..5 {
            let hr = if d == 2 && s == 10 { 160 } else { 72 };
            let body = format!(
                r#"{{"device_id":"bed-{d}","ts":{},"hr":{hr}}}"#,
                t0 + s * 1000
            );
            sent.push((format!("devices/bed-{d}/vitals"), body));
        }
    }
    let mut options = MqttOptions::new("ward-devices", "127.0.0.1", mqtt.port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut connection) = Client::new(options, sent.len() + 10);
    // Publish once the ingest node has subscribed.
    let log = mqtt.dir.path().join("mosquitto.log");
    wait_for("the ingest node to subscribe", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("SUBSCRIBE from ingest-test"))
    });
    for (topic, body) in &sent {
        client
            .publish(topic, QoS::AtLeastOnce, false, body.as_bytes())
            .unwrap();
    }
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked < sent.len() && Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
            connection.recv_timeout(Duration::from_millis(200))
        {
            acked += 1;
        }
    }
    assert_eq!(acked, sent.len());

    // Every reading, as it came, keyed by its device.
    let got = consume(&brokers, &k.t("vitals.raw"), sent.len());
    assert_eq!(got.len(), sent.len());
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &got {
        let key = m.key.clone().unwrap();
        let body = String::from_utf8(m.payload.clone()).unwrap();
        assert!(
            body.contains(&format!(r#""device_id":"{key}""#)),
            "{key}: {body}"
        );
        by_key.entry(key).or_default().push(body);
    }
    assert_eq!(by_key.len(), 5);
    for (topic, body) in &sent {
        let device = topic.split('/').nth(1).unwrap();
        assert!(by_key[device].contains(body), "{body} forwarded");
    }

    // A rule node of the group evaluates them.
    let node = Node::start("rules", &k, HR_RULE, "cooperative-sticky");
    wait_for("the rule node to store every reading", || {
        node.stored() == sent.len()
    });
    stop.store(true, Relaxed);
    ingest.join().unwrap().unwrap();
    let (_, alerts) = node.finish();
    let raised: Vec<&str> = alerts
        .iter()
        .filter(|e| e.event == Transition::Raised)
        .map(|e| e.alert.subject.as_str())
        .collect();
    assert_eq!(raised, ["bed-2"]);
}

/// A rule node as operators run it (`vitalstream run` with a Kafka source): what it consumes
/// is stored, alerted on Kafka and dead-lettered with its place in Kafka.
#[test]
fn a_rule_node_stores_alerts_and_dead_letters_what_it_consumes() {
    common::logs();
    let k = TestKafka::start();
    for (topic, partitions) in [
        ("vitals.raw", 3),
        ("alert.events", 1),
        ("device.events", 1),
        ("vitals.dlq", 1),
    ] {
        k.create_topic(topic, partitions);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pipeline = dir.path().join("rules.toml");
    std::fs::write(&pipeline, HR_RULE).unwrap();
    let file = dir.path().join("rule-node.toml");
    let events = k.events_config();
    std::fs::write(
        &file,
        format!(
            r#"
pipeline = "{pipeline}"
[[sources]]
type = "kafka"
brokers = "{brokers}"
group_id = "{group}"
topics = ["{raw}"]
batch_linger = "10ms"
[storage]
dir = "{data}"
[dead_letter]
path = "{data}/dead-letter.ndjson"
[alert_log]
path = "{data}/alerts.ndjson"
[api]
enabled = false
[kafka]
brokers = "{brokers}"
alert_topic = "{alerts}"
device_topic = "{devices}"
dlq_topic = "{dlq}"
"#,
            pipeline = pipeline.display(),
            brokers = k.brokers,
            group = k.t("rule-node"),
            raw = events.raw_topic,
            data = data.display(),
            alerts = events.alert_topic,
            devices = events.device_topic,
            dlq = events.dlq_topic,
        ),
    )
    .unwrap();
    let config = vitalstream::config::Config::load_with(Some(&file), &[]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let node = {
        let stop = stop.clone();
        std::thread::spawn(move || vitalstream::service::run(&config, stop))
    };

    let t0 = now_millis() - 20_000;
    let lines: Vec<(String, String)> = (0..60)
        .map(|s| {
            let device = format!("bed-{}", s % 3);
            let hr = if s == 31 { 150 } else { 70 };
            let line = format!(
                r#"{{"device_id":"{device}","ts":{},"hr":{hr}}}"#,
                t0 + s * 300
            );
            (device, line)
        })
        .collect();
    produce(&k, &lines);
    // A bad record on the last partition: read by a source the Kafka source opened for that
    // partition, yet dead-lettered in the name of the configured source.
    let p = producer(&k.brokers);
    let bad = BaseRecord::to(&events.raw_topic)
        .partition(2)
        .key("bed-0")
        .payload(r#"{"device_id":"bed-0","ts":"#);
    p.send(bad).map_err(|(e, _)| e).unwrap();
    p.flush(Duration::from_secs(10)).unwrap();

    let raised = consume(&k.brokers, &events.alert_topic, 1);
    let envelope: Value = serde_json::from_slice(&raised[0].payload).unwrap();
    assert_eq!(envelope["event_type"], "alert.raised");
    assert_eq!(envelope["data"]["subject"], "bed-1");
    let dlq = consume(&k.brokers, &events.dlq_topic, 1);
    assert_eq!(dlq[0].headers["dlq-reason"], "invalid_json");
    assert_eq!(dlq[0].headers["dlq-kafka-topic"], events.raw_topic);
    assert_eq!(dlq[0].headers["dlq-kafka-partition"], "2");
    assert_eq!(dlq[0].headers["dlq-source"], "kafka");
    let stored = || common::parquet_rows(&data, "readings-");
    // Parquet files are completed as the node stops.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Relaxed);
    node.join().unwrap().unwrap();
    assert_eq!(stored(), 60, "every good reading stored");
    let dead = std::fs::read_to_string(data.join("dead-letter.ndjson")).unwrap();
    let dead: Value = serde_json::from_str(dead.lines().next().unwrap()).unwrap();
    assert_eq!(dead["kafka_topic"], events.raw_topic.as_str());
    assert_eq!(
        dead["kafka_offset"],
        dlq[0].headers["dlq-kafka-offset"].parse::<i64>().unwrap()
    );
}

/// `/ready` reports the Kafka source: not ready until the group has assigned it partitions,
/// not ready while no broker answers, ready again when one does.
#[test]
fn readiness_follows_the_brokers() {
    common::logs();
    use rdkafka::mocking::MockCluster;
    use vitalstream::api::{ApiConfig, ApiState};
    // Taking brokers down needs the mock cluster, whatever VITALSTREAM_TEST_KAFKA says.
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("vitals.raw", 2, 1).unwrap();
    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let config = KafkaSourceConfig {
        brokers: cluster.bootstrap_servers(),
        group_id: "ready".into(),
        ..KafkaSourceConfig::default()
    };
    let source = KafkaSource::new(&config).unwrap();
    let up = source.connected();
    let api = ApiConfig::default();
    let state = ApiState::new(&api, h.engine.control(), None).with_kafka(Some(up.clone()));
    let server = common::server::Server::start_rest(&api, state);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let ready = || {
        let url = format!("{}/ready", server.url());
        let mut r = agent.get(&url).call().unwrap();
        let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        (r.status().as_u16(), body["checks"]["kafka"].clone())
    };
    assert_eq!(
        ready(),
        (503, Value::from("unavailable")),
        "not yet in the group"
    );

    let handle = h.engine.source(ClockMode::Live);
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let stop = stop.clone();
        std::thread::spawn(move || source.run(handle, &stop))
    };
    wait_for("the group to assign the partitions", || ready().0 == 200);
    assert_eq!(ready().1, "ok");
    cluster.broker_down(1).unwrap();
    wait_for("the source to see the broker gone", || ready().0 == 503);
    cluster.broker_up(1).unwrap();
    wait_for("the source to see the broker back", || ready().0 == 200);

    stop.store(true, Relaxed);
    runner.join().unwrap();
    server.stop();
    h.finish();
}
