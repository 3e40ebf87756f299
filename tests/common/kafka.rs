//! A Kafka for a test: librdkafka's mock cluster (in-process, the real protocol over TCP), or,
//! when `VITALSTREAM_TEST_KAFKA` names one (`host:port`), a real broker. On a real broker each
//! test gets its own topics and groups (names prefixed), so tests can share it.

#![allow(dead_code)]

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use vitalstream::sinks::events::KafkaConfig;

pub struct TestKafka {
    pub brokers: String,
    prefix: String,
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl TestKafka {
    pub fn start() -> TestKafka {
        match std::env::var("VITALSTREAM_TEST_KAFKA") {
            Ok(brokers) if !brokers.is_empty() => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos();
                TestKafka {
                    brokers,
                    prefix: format!("t{}x{nanos}.", std::process::id()),
                    mock: None,
                }
            }
            _ => TestKafka::mock(),
        }
    }

    /// librdkafka's mock cluster whatever `VITALSTREAM_TEST_KAFKA` says: for a test that
    /// makes the brokers fail (see [`TestKafka::cluster`]).
    pub fn mock() -> TestKafka {
        let mock = MockCluster::new(1).unwrap();
        TestKafka {
            brokers: mock.bootstrap_servers(),
            prefix: String::new(),
            mock: Some(mock),
        }
    }

    /// The mock cluster, to inject errors; only for a [`TestKafka::mock`].
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        self.mock
            .as_ref()
            .expect("a mock cluster (TestKafka::mock)")
    }

    /// This test's name for a topic or group.
    pub fn t(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let name = self.t(name);
        match &self.mock {
            Some(mock) => mock.create_topic(&name, partitions, 1).unwrap(),
            None => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &self.brokers)
                    .create()
                    .unwrap();
                let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
                let results = block_on(admin.create_topics(&[topic], &AdminOptions::new()))
                    .expect("the broker answers");
                for r in results {
                    r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
                }
            }
        }
    }

    /// `[kafka]` settings naming this test's topics.
    pub fn events_config(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            alert_topic: self.t("alert.events"),
            device_topic: self.t("device.events"),
            dlq_topic: self.t("vitals.dlq"),
            raw_topic: self.t("vitals.raw"),
            ..KafkaConfig::default()
        }
    }
}

/// Runs a future to completion on this thread (the admin client's futures need no runtime).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}
