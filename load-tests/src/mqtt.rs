//! Drives MQTT: each sender is one connection carrying one device (the `connections` mode)
//! or many (`multiplexed`). Sending is open-loop: message `i` of a sender is due at a time
//! fixed in advance by the rate, whatever happened to the ones before; a message sent late
//! still carries its due time, so latencies measured from it include the wait
//! (coordinated-omission correction). Each message carries its device, `seq`, `ts` (the due
//! time) and a correlation id that names it.

use crate::scenario::{Mode, Scenario};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The devices of a run and the episodes they take part in.
pub struct Plan {
    pub run: String,
    pub devices: usize,
    /// For each episode, its devices.
    pub episodes: Vec<Vec<usize>>,
    /// When sending starts (half a second after the plan is made), and the same as µs
    /// since the epoch: due times count from it.
    pub start: Instant,
    pub start_epoch_us: u64,
}

impl Plan {
    pub fn new(scenario: &Scenario, run: &str) -> Plan {
        let mut rng = fastrand::Rng::with_seed(scenario.traffic.seed);
        let devices =
            (scenario.recorded.as_ref()).map_or(scenario.traffic.devices, |r| r.devices.len());
        let episodes = (scenario.episodes.iter())
            .map(|e| {
                let n = ((devices as f64) * e.devices).round() as usize;
                let mut chosen: Vec<usize> = (0..devices).collect();
                rng.shuffle(&mut chosen);
                chosen.truncate(n);
                chosen.sort_unstable();
                chosen
            })
            .collect();
        Plan {
            run: run.into(),
            devices,
            episodes,
            start: Instant::now() + Duration::from_millis(500),
            start_epoch_us: epoch_us(SystemTime::now()) + 500_000,
        }
    }

    pub fn device(&self, d: usize) -> String {
        format!("{}-bed-{d}", self.run)
    }

    pub fn patient(&self, d: usize) -> String {
        format!("{}-p-{d}", self.run)
    }
}

/// What the senders did, shared while they run.
#[derive(Default)]
pub struct Sent {
    /// Messages handed to the client, due so far.
    pub sent: AtomicU64,
    /// Acknowledged by the broker (PUBACK), well-formed ones.
    pub acked: AtomicU64,
    /// Malformed on purpose.
    pub bad: AtomicU64,
    /// How late sends ran behind their due time, µs.
    pub lag_max_us: AtomicU64,
    pub reconnects: AtomicU64,
    /// (device, seq) of every acknowledged well-formed reading.
    pub acked_readings: Mutex<Vec<(u32, u64)>>,
    /// (device, seq) of each anomalous reading → (episode, due time µs).
    pub anomalies: Mutex<HashMap<(u32, u64), (usize, u64)>>,
    /// Acknowledged readings per second of the run.
    pub per_second: Mutex<Vec<u64>>,
}

impl Sent {
    /// One more reading acknowledged, in this second of the run.
    pub fn count_ack(&self, start: Instant) {
        self.acked.fetch_add(1, Relaxed);
        let second = start.elapsed().as_secs() as usize;
        let mut per_second = self.per_second.lock().unwrap();
        if per_second.len() <= second {
            per_second.resize(second + 1, 0);
        }
        per_second[second] += 1;
    }
}

fn epoch_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// Sends the scenario's traffic; returns once every sender is done and acknowledgements
/// have had `grace` to arrive.
pub async fn drive(scenario: Arc<Scenario>, plan: Arc<Plan>, sent: Arc<Sent>) {
    let t = &scenario.traffic;
    let groups: Vec<Vec<usize>> = match t.mode {
        Mode::Connections => (0..plan.devices).map(|d| vec![d]).collect(),
        Mode::Multiplexed => {
            let n = t.connections.min(plan.devices);
            (0..n)
                .map(|c| (c..plan.devices).step_by(n).collect())
                .collect()
        }
    };
    let mut senders = tokio::task::JoinSet::new();
    for (i, devices) in groups.into_iter().enumerate() {
        let (scenario, plan, sent) = (scenario.clone(), plan.clone(), sent.clone());
        senders.spawn(async move {
            let sender = Sender {
                id: i,
                devices,
                start: plan.start,
            };
            sender.run(&scenario, &plan, &sent).await;
        });
    }
    while senders.join_next().await.is_some() {}
}

struct Sender {
    id: usize,
    devices: Vec<usize>,
    start: Instant,
}

/// What each publish carries, in the order they are made (None: malformed), until the
/// connection sends it.
type Queue = Arc<Mutex<VecDeque<Option<(u32, u64)>>>>;

/// One MQTT connection and the task that reads its acknowledgements.
struct Link {
    client: AsyncClient,
    queue: Queue,
    /// Published and not yet acknowledged.
    outstanding: Arc<AtomicU64>,
    events: tokio::task::JoinHandle<()>,
}

impl Sender {
    fn connect(&self, plan: &Plan, scenario: &Scenario, sent: &Arc<Sent>, n: u64) -> Link {
        let (host, port) = (scenario.traffic.broker.rsplit_once(':'))
            .map(|(h, p)| (h.to_string(), p.parse().unwrap_or(1883)))
            .unwrap_or((scenario.traffic.broker.clone(), 1883));
        let mut options = MqttOptions::new(format!("{}-c{}-{n}", plan.run, self.id), host, port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(500);
        options.set_clean_session(true);
        let (client, eventloop) = AsyncClient::new(options, 1000);
        let queue = Queue::default();
        let outstanding = Arc::new(AtomicU64::new(0));
        let events = tokio::spawn(acknowledgements(
            eventloop,
            queue.clone(),
            outstanding.clone(),
            sent.clone(),
            self.start,
        ));
        Link {
            client,
            queue,
            outstanding,
            events,
        }
    }

    async fn run(self, scenario: &Scenario, plan: &Plan, sent: &Arc<Sent>) {
        let t = &scenario.traffic;
        let storms: Vec<f64> = t.reconnect_at.iter().map(|s| s.as_secs_f64()).collect();
        let mut next_storm = 0;
        let mut rng = fastrand::Rng::with_seed(t.seed ^ self.id as u64);
        let mut schedule = Schedule::new(self.devices.clone(), scenario, &mut rng);
        let mut link = self.connect(plan, scenario, sent, 0);
        while let Some(next) = schedule.next(scenario) {
            if storms.get(next_storm).is_some_and(|s| next.due >= *s) {
                next_storm += 1;
                // Every connection drops at once, then each comes back after a random wait.
                let _ = link.client.disconnect().await;
                let _ = link.events.await;
                tokio::time::sleep(Duration::from_millis(rng.u64(0..1000))).await;
                sent.reconnects.fetch_add(1, Relaxed);
                link = self.connect(plan, scenario, sent, sent.reconnects.load(Relaxed));
            }
            wait_until_due(plan, sent, next.due).await;
            let (payload, reading) = message(scenario, plan, sent, &next, &mut rng, false);
            link.queue.lock().unwrap().push_back(reading);
            link.outstanding.fetch_add(1, Relaxed);
            let topic = format!("devices/{}/vitals", plan.device(next.device));
            if link
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                // The connection's event loop has ended; the next storm or the end of the
                // run replaces it. The message is not counted as acknowledged.
                link.queue.lock().unwrap().pop_back();
                link.outstanding.fetch_sub(1, Relaxed);
            }
            sent.sent.fetch_add(1, Relaxed);
        }
        // Let the last acknowledgements arrive, then close.
        let deadline = Instant::now() + Duration::from_secs(10);
        while link.outstanding.load(Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = link.client.disconnect().await;
        let _ = link.events.await;
    }
}

/// One sender's open-loop schedule: its devices in turn, each message due at a time the
/// rate (and the phase's multiplier) fixes in advance, whatever happened to the ones before;
/// or, replaying a recording, its devices' recorded readings when they fell due.
pub struct Schedule {
    devices: Vec<usize>,
    seqs: Vec<u64>,
    base_rate: f64,
    total: f64,
    /// Seconds into the run the next message is due.
    due: f64,
    k: usize,
    /// Replaying: this sender's readings of the recording (indices), and each device's slot.
    recorded: Option<(Vec<usize>, HashMap<usize, usize>)>,
}

/// A message to send: device, its seq, when it is due (seconds into the run), and the
/// recorded reading it replays.
#[derive(Debug, PartialEq)]
pub struct Due {
    pub device: usize,
    pub seq: u64,
    pub due: f64,
    pub line: Option<usize>,
}

impl Schedule {
    /// Devices start spread over their first period (the first draw of `rng`).
    pub fn new(devices: Vec<usize>, scenario: &Scenario, rng: &mut fastrand::Rng) -> Schedule {
        let base_rate = devices.len() as f64 * scenario.traffic.rate_hz;
        let recorded = scenario.recorded.as_ref().map(|r| {
            let slots: HashMap<usize, usize> =
                devices.iter().enumerate().map(|(i, d)| (*d, i)).collect();
            let lines = (r.readings.iter().enumerate())
                .filter(|(_, x)| slots.contains_key(&x.device))
                .map(|(i, _)| i)
                .rev()
                .collect();
            (lines, slots)
        });
        Schedule {
            seqs: vec![0; devices.len()],
            due: rng.f64() / base_rate,
            base_rate,
            total: scenario.duration().as_secs_f64(),
            devices,
            k: 0,
            recorded,
        }
    }

    /// The next message, or `None` once the run is over.
    pub fn next(&mut self, scenario: &Scenario) -> Option<Due> {
        if let Some((lines, slots)) = &mut self.recorded {
            let line = lines.pop()?;
            let r = &scenario.recorded.as_ref()?.readings[line];
            let due = r.at / scenario.traffic.speed;
            if due >= self.total {
                return None;
            }
            let seq = &mut self.seqs[slots[&r.device]];
            *seq += 1;
            return Some(Due {
                device: r.device,
                seq: *seq - 1,
                due,
                line: Some(line),
            });
        }
        let multiplier = scenario.multiplier_at(Duration::from_secs_f64(self.due));
        if self.due >= self.total || multiplier <= 0.0 {
            return None;
        }
        let slot = self.k % self.devices.len();
        let next = Due {
            device: self.devices[slot],
            seq: self.seqs[slot],
            due: self.due,
            line: None,
        };
        self.seqs[slot] += 1;
        self.k += 1;
        self.due += 1.0 / (self.base_rate * multiplier);
        Some(next)
    }
}

/// Sleeps until `due` seconds into the run, and notes how late that was.
pub async fn wait_until_due(plan: &Plan, sent: &Sent, due: f64) {
    tokio::time::sleep_until((plan.start + Duration::from_secs_f64(due)).into()).await;
    let late = plan.start.elapsed().as_secs_f64() - due;
    sent.lag_max_us
        .fetch_max((late.max(0.0) * 1e6) as u64, Relaxed);
}

/// The message `next` says is due: a reading (generated, hr high while one of its device's
/// episodes runs; or replayed from the recording) or, now and then, a malformed one.
/// Returns the payload and, for a reading, its (device, seq). `with_device` names the device
/// in the payload (Kafka, where no topic does).
pub fn message(
    scenario: &Scenario,
    plan: &Plan,
    sent: &Sent,
    next: &Due,
    rng: &mut fastrand::Rng,
    with_device: bool,
) -> (String, Option<(u32, u64)>) {
    let &Due {
        device: d,
        seq,
        due,
        line,
    } = next;
    if rng.f64() < scenario.traffic.bad_fraction {
        sent.bad.fetch_add(1, Relaxed);
        // Each kind the parser must refuse: not JSON, a wrong type, out of range.
        let payload = match seq % 3 {
            0 => format!("{{\"seq\":{seq},\"hr\":"),
            1 => format!("{{\"seq\":{seq},\"hr\":\"fast\"}}"),
            _ => format!("{{\"seq\":{seq},\"spo2\":250}}"),
        };
        return (payload, None);
    }
    let due_us = plan.start_epoch_us + (due * 1e6) as u64;
    let device = if with_device {
        format!("\"device_id\":\"{}\",", plan.device(d))
    } else {
        String::new()
    };
    let identity = format!(
        r#"{device}"patient_id":"{}","ts":{},"seq":{seq},"correlation_id":"{}-{d}-{seq}""#,
        plan.patient(d),
        due_us / 1000,
        plan.run,
    );
    let recorded = line.and_then(|i| Some(&scenario.recorded.as_ref()?.readings[i]));
    let (vitals, episode) = match recorded {
        Some(r) => {
            let vitals = serde_json::Value::Object(r.vitals.clone()).to_string();
            // `{}` or `{"hr":…}`: its fields follow the identity's.
            let fields = vitals[1..vitals.len() - 1].to_string();
            (fields, r.episode)
        }
        None => {
            let episode = (scenario.episodes.iter().enumerate()).find(|(e, ep)| {
                let at = ep.at.as_secs_f64();
                due >= at
                    && due < at + ep.duration.as_secs_f64()
                    && plan.episodes[*e].binary_search(&d).is_ok()
            });
            let hr = episode.map_or(70.0 + (seq % 20) as f64, |(_, ep)| ep.hr);
            let fields = format!(r#""hr":{hr},"spo2":{},"temp":36.8,"rr":16"#, 96 + seq % 3);
            (fields, episode.map(|(e, _)| e))
        }
    };
    if let Some(e) = episode {
        (sent.anomalies.lock().unwrap()).insert((d as u32, seq), (e, due_us));
    }
    let separator = if vitals.is_empty() { "" } else { "," };
    (
        format!("{{{identity}{separator}{vitals}}}"),
        Some((d as u32, seq)),
    )
}

/// Reads a connection's events: each outgoing publish takes the next entry of the queue
/// (publishes go out in the order they were made); each PUBACK marks its entry acknowledged.
async fn acknowledgements(
    mut eventloop: EventLoop,
    queue: Queue,
    outstanding: Arc<AtomicU64>,
    sent: Arc<Sent>,
    start: Instant,
) {
    let mut in_flight: HashMap<u16, Option<(u32, u64)>> = HashMap::new();
    let mut acked = Vec::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(item) = queue.lock().unwrap().pop_front() {
                    in_flight.insert(pkid, item);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let Some(item) = in_flight.remove(&ack.pkid) else {
                    continue;
                };
                outstanding.fetch_sub(1, Relaxed);
                if let Some(reading) = item {
                    acked.push(reading);
                    sent.count_ack(start);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!("warning: an MQTT connection ended: {e}");
                break;
            }
        }
    }
    // What was not acknowledged does not count; the sender stops waiting for it.
    outstanding.store(0, Relaxed);
    queue.lock().unwrap().clear();
    sent.acked_readings.lock().unwrap().extend(acked);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episodes_take_the_same_share_of_devices_for_the_same_seed() {
        let s: Scenario = toml::from_str(
            r#"
name = "t"
[traffic]
devices = 200
rate_hz = 1.0
duration = "10s"
[[episode]]
at = "1s"
duration = "2s"
devices = 0.1
"#,
        )
        .unwrap();
        let (a, b) = (Plan::new(&s, "r1"), Plan::new(&s, "r2"));
        assert_eq!(a.episodes[0].len(), 20);
        assert!(
            a.episodes[0].windows(2).all(|w| w[0] < w[1]),
            "sorted, distinct"
        );
        assert_eq!(a.episodes, b.episodes);
        assert_eq!(
            (a.device(3), a.patient(3)),
            ("r1-bed-3".into(), "r1-p-3".into())
        );
    }

    #[test]
    fn a_reading_during_an_episode_is_anomalous_and_named() {
        let s: Scenario = toml::from_str(
            r#"
name = "t"
[traffic]
devices = 1
rate_hz = 1.0
duration = "10s"
[[episode]]
at = "2s"
duration = "2s"
devices = 1.0
"#,
        )
        .unwrap();
        let (plan, sent) = (Plan::new(&s, "r"), Sent::default());
        let mut rng = fastrand::Rng::with_seed(1);
        let due = |seq, due| Due {
            device: 0,
            seq,
            due,
            line: None,
        };
        let (before, _) = message(&s, &plan, &sent, &due(1, 1.0), &mut rng, true);
        let (during, reading) = message(&s, &plan, &sent, &due(2, 2.5), &mut rng, true);
        let v: serde_json::Value = serde_json::from_str(&during).unwrap();
        assert_eq!(v["hr"], 150.0);
        assert_eq!(v["device_id"], "r-bed-0");
        assert_eq!(v["correlation_id"], "r-0-2");
        assert_eq!(
            v["ts"].as_u64(),
            Some((plan.start_epoch_us + 2_500_000) / 1000)
        );
        assert!(
            serde_json::from_str::<serde_json::Value>(&before).unwrap()["hr"].as_f64()
                < Some(130.0)
        );
        assert_eq!(reading, Some((0, 2)));
        assert_eq!(sent.anomalies.lock().unwrap().len(), 1);
    }
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn a_schedule_takes_its_devices_in_turn_at_the_phase_rate() {
        let s: Scenario = toml::from_str(
            r#"
name = "t"
[traffic]
devices = 2
rate_hz = 1.0
[[phase]]
duration = "2s"
rate_multiplier = 1.0
[[phase]]
duration = "1s"
rate_multiplier = 2.0
"#,
        )
        .unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let start = fastrand::Rng::with_seed(7).f64() / 2.0;
        let mut schedule = Schedule::new(vec![4, 9], &s, &mut rng);
        let all: Vec<Due> = std::iter::from_fn(|| schedule.next(&s)).collect();
        let devices: Vec<(usize, u64)> = all.iter().map(|d| (d.device, d.seq)).collect();
        assert_eq!(&devices[..4], [(4, 0), (9, 0), (4, 1), (9, 1)]);
        // 2 messages/s for 2 s, then 4/s until 3 s (the last one if the first came early).
        assert_eq!(all.iter().filter(|d| d.due < 2.0).count(), 4);
        assert_eq!(all.len(), 7 + usize::from(start < 0.25));
        assert!((all[0].due - start).abs() < 1e-9);
        assert!((all[1].due - all[0].due - 0.5).abs() < 1e-9);
        let n = all.len();
        assert!((all[n - 1].due - all[n - 2].due - 0.25).abs() < 1e-9);
        assert!(all.last().unwrap().due < 3.0);
    }

    #[test]
    fn a_recording_is_replayed_at_its_pace_with_the_run_identity() {
        let mut s: Scenario = toml::from_str(
            r#"
name = "t"
[traffic]
recording = "unused"
speed = 2.0
"#,
        )
        .unwrap();
        let text = [
            r#"{"at":0.0,"device":"bed-a","reading":{"hr":80,"spo2":97,"seq":9}}"#,
            r#"{"at":1.0,"device":"bed-b","reading":{"hr":150}}"#,
            r#"{"at":2.0,"device":"bed-a","reading":{"hr":140,"nibp_sys":120}}"#,
            r#"{"at":9.0,"device":"bed-a","reading":{"hr":60}}"#,
        ]
        .join("\n");
        s.recorded = Some(Arc::new(crate::recording::Recording::parse(&text).unwrap()));
        // Played twice as fast: 4.5 s, plus a second to end on.
        assert_eq!(s.duration(), Duration::from_secs_f64(5.5));
        let (plan, sent) = (Plan::new(&s, "r"), Sent::default());
        assert_eq!(plan.devices, 2);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut schedule = Schedule::new(vec![0], &s, &mut rng);
        let all: Vec<Due> = std::iter::from_fn(|| schedule.next(&s)).collect();
        let seen: Vec<(usize, u64, f64)> = all.iter().map(|d| (d.device, d.seq, d.due)).collect();
        assert_eq!(
            seen,
            [(0, 0, 0.0), (0, 1, 1.0), (0, 2, 4.5)],
            "only its devices"
        );
        let (payload, reading) = message(&s, &plan, &sent, &all[1], &mut rng, true);
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(v["device_id"], "r-bed-0");
        assert_eq!(v["seq"], 1);
        assert_eq!(v["correlation_id"], "r-0-1");
        assert_eq!(
            (v["hr"].as_f64(), v["nibp_sys"].as_f64()),
            (Some(140.0), Some(120.0))
        );
        assert_eq!(reading, Some((0, 1)));
        let first = message(&s, &plan, &sent, &all[0], &mut rng, false).0;
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["seq"], 0, "the recorded seq gives way to the run's");
        assert!(v.get("device_id").is_none());
        assert_eq!(
            sent.anomalies.lock().unwrap().keys().collect::<Vec<_>>(),
            [&(0, 1)],
            "the high reading expects an alert"
        );
    }
}
