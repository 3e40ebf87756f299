//! Sustained Kafka ingest: readings consumed from `vitals.raw` on librdkafka's mock cluster
//! (in-process, the real protocol over TCP) and processed by the engine with the reference
//! rules, with offsets committed behind the (immediately durable) batches.
//!
//! ```sh
//! cargo bench --bench kafka_ingest                    # 1,000,000 readings, 1,000 devices
//! KAFKA_BENCH_BROKERS=127.0.0.1:19092 cargo bench --bench kafka_ingest   # a real broker
//! ```
//! On a real broker the topic is created fresh for the run (`KAFKA_BENCH_PARTITIONS`, 16).
//! The readings are produced first (not timed; the producer's delivery reports are checked),
//! into 64 partitions because the mock cluster keeps only about 30,000 records of this size
//! per partition. The rate is readings over the time from the first reading processed (after
//! the group join) to the last.

mod common;

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vitalstream::engine::{EndOfInput, Engine, EngineConfig, Outputs};
use vitalstream::model::ClockMode;
use vitalstream::rules::parse_pipeline;
use vitalstream::sources::kafka::{KafkaSource, KafkaSourceConfig};

/// Counts deliveries that failed, and says why (once).
struct Counting(Arc<std::sync::atomic::AtomicU64>);
impl rdkafka::ClientContext for Counting {}
impl rdkafka::producer::ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = r
            && self.0.fetch_add(1, Ordering::Relaxed) == 0
        {
            eprintln!("delivery failed: {e}");
        }
    }
}

/// Produces `n` readings (1,000 devices at 1 Hz) keyed by device; returns failed deliveries.
fn produce(brokers: &str, topic: &str, n: usize) -> u64 {
    let lines = common::lines(1000, n.div_ceil(1000));
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producer: ThreadedProducer<Counting> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("acks", "all")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Counting(failures.clone()))
        .unwrap();
    for line in lines.iter().take(n) {
        let key = &line[14..23]; // "bed-NNNNN"
        let mut record = BaseRecord::to(topic).key(key).payload(line.as_bytes());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    failures.load(Ordering::Relaxed)
}

fn main() {
    let n: usize = std::env::var("KAFKA_BENCH_READINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // librdkafka's mock cluster, or a real broker with a topic of this run's own.
    let external = std::env::var("KAFKA_BENCH_BROKERS").ok();
    let partitions: i32 = std::env::var("KAFKA_BENCH_PARTITIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if external.is_some() { 16 } else { 64 });
    let (_cluster, brokers, topic) = match external {
        Some(brokers) => {
            let topic = format!("vitals.raw.bench-{}", std::process::id());
            create_topic(&brokers, &topic, partitions);
            (None, brokers, topic)
        }
        None => {
            let cluster = MockCluster::new(1).unwrap();
            cluster.create_topic("vitals.raw", partitions, 1).unwrap();
            let brokers = cluster.bootstrap_servers();
            (Some(cluster), brokers, "vitals.raw".to_string())
        }
    };
    let (alerts_tx, alerts_rx) = crossbeam_channel::unbounded();
    let (readings_tx, readings_rx) =
        crossbeam_channel::bounded::<vitalstream::engine::ReadingBatch>(64);
    let outputs = Outputs {
        alerts: alerts_tx,
        live: None,
        readings: Some(readings_tx),
        rejects: None,
        latest: None,
    };
    let config = EngineConfig::default();
    let rules = parse_pipeline(include_str!("../pipelines/reference.toml")).unwrap();
    let mut engine = Engine::start(&config, rules, outputs);
    std::thread::spawn(move || for _ in alerts_rx {});
    // "Storage" that makes each batch durable at once, counting readings.
    let processed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let processed = processed.clone();
        std::thread::spawn(move || {
            for b in readings_rx {
                processed.fetch_add(b.readings.len(), Ordering::Relaxed);
                if let Some(ack) = b.ack {
                    ack.done();
                }
            }
        });
    }
    // Produced first, not timed. The mock cluster keeps only about 30,000 of these records
    // per partition, hence many partitions.
    let failed = produce(&brokers, &topic, n);
    println!("kafka ingest: {n} readings produced to {brokers} {topic} ({partitions} partitions)");
    let source = KafkaSource::new(&KafkaSourceConfig {
        brokers,
        group_id: format!("bench-{}", std::process::id()),
        topics: vec![topic.clone()],
        batch_size: 4096,
        ..KafkaSourceConfig::default()
    })
    .unwrap();
    let handle = engine.source(ClockMode::Live);
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("kafka-source".into())
            .spawn(move || source.run(handle, &stop))
            .unwrap()
    };
    // The clock starts at the first reading processed (after the group join).
    while processed.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_micros(200));
    }
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_print = Instant::now();
    while processed.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
        if last_print.elapsed() >= Duration::from_secs(5) {
            let m = engine.metrics.snapshot();
            eprintln!(
                "  … {} processed; engine: {} frames, {} accepted, {} rejected, {} stored",
                processed.load(Ordering::Relaxed),
                m.frames,
                m.accepted,
                m.rejected,
                m.stored
            );
            last_print = Instant::now();
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let stats = runner.join().unwrap();
    engine.join(EndOfInput::KeepOpen);
    let done = processed.load(Ordering::Relaxed);
    println!(
        "consumed + processed {done} readings in {:.2} s: {:.0} readings/s ({} commits, {} batches, {} pauses)",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64(),
        stats.commits,
        stats.batches,
        stats.pauses
    );
    assert_eq!(failed, 0, "the producer lost nothing");
    assert_eq!(done, n, "every reading processed");
}

/// Creates a topic on a real broker.
fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(admin.create_topics(&[new], &AdminOptions::new()))
        .unwrap();
    for r in results {
        r.unwrap();
    }
}
