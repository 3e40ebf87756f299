//! Drives Kafka: readings produced to `vitals.raw`, keyed by device id, as ingest nodes
//! (or devices' gateways) do. Open-loop like the MQTT driver: each message has a due time
//! fixed by the rate and carries it. A reading counts as acknowledged when the broker
//! confirms it (acks = all).

use crate::mqtt::{Plan, Schedule, Sent, message, wait_until_due};
use crate::scenario::Scenario;
use rdkafka::ClientConfig;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

pub const TOPIC: &str = "vitals.raw";

/// Where the readings go: the brokers a scenario names, or a mock cluster the run started.
pub struct Brokers {
    pub list: String,
    pub mock: bool,
}

pub async fn drive(
    scenario: Arc<Scenario>,
    plan: Arc<Plan>,
    sent: Arc<Sent>,
    brokers: String,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()?;
    let n = scenario.traffic.connections.min(plan.devices).max(1);
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..n {
        let devices: Vec<usize> = (i..plan.devices).step_by(n).collect();
        let (scenario, plan, sent, producer) = (
            scenario.clone(),
            plan.clone(),
            sent.clone(),
            producer.clone(),
        );
        senders.spawn(async move { send(i, devices, &scenario, &plan, &sent, &producer).await });
    }
    while senders.join_next().await.is_some() {}
    Ok(())
}

/// One sender's share of the devices, in due order; a second task waits for the broker's
/// confirmations, in the order they were sent.
async fn send(
    id: usize,
    devices: Vec<usize>,
    scenario: &Scenario,
    plan: &Plan,
    sent: &Arc<Sent>,
    producer: &FutureProducer,
) {
    let mut rng = fastrand::Rng::with_seed(scenario.traffic.seed ^ id as u64);
    let mut schedule = Schedule::new(devices, scenario, &mut rng);
    let (confirm, mut confirmations) =
        tokio::sync::mpsc::unbounded_channel::<(DeliveryFuture, Option<(u32, u64)>)>();
    let counter = sent.clone();
    let start = plan.start;
    let acker = tokio::spawn(async move {
        let mut acked = Vec::new();
        while let Some((delivery, reading)) = confirmations.recv().await {
            if let (Ok(Ok(_)), Some(reading)) = (delivery.await, reading) {
                acked.push(reading);
                counter.count_ack(start);
            }
        }
        counter.acked_readings.lock().unwrap().extend(acked);
    });
    while let Some(next) = schedule.next(scenario) {
        wait_until_due(plan, sent, next.due).await;
        let (payload, reading) = message(scenario, plan, sent, &next, &mut rng, true);
        let key = plan.device(next.device);
        // A full local queue makes the sender wait (and fall behind, which the due times
        // record); nothing is dropped.
        let delivery = loop {
            match producer.send_result(FutureRecord::to(TOPIC).key(&key).payload(&payload)) {
                Ok(delivery) => break Some(delivery),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err((e, _)) => {
                    eprintln!("warning: a reading was not produced: {e}");
                    break None;
                }
            }
        };
        if let Some(delivery) = delivery {
            let _ = confirm.send((delivery, reading));
        }
        sent.sent.fetch_add(1, Relaxed);
    }
    drop(confirm);
    let _ = acker.await;
}
