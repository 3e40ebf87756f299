//! Tasks on the RabbitMQ at 127.0.0.1:5672: the platform's topology and the publisher. Each
//! test works in a virtual host of its own (made with rabbitmqctl), so tests do not share
//! queues; a TCP proxy in front of the broker stands for RabbitMQ going away and coming back.

mod common;

use common::{HR_RULE, Harness, WAIT, reading, rules};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use vitalstream::alerts::{AlertEvent, AlertState, Transition};
use vitalstream::sources::SourceHandle;
use vitalstream::tasks::escalation::{Escalation, Escalator};
use vitalstream::tasks::policy::NotificationPolicy;
use vitalstream::tasks::publisher::{Publisher, Task};
use vitalstream::tasks::topology;
use vitalstream::tasks::worker::{self, WorkerConfig, WorkerMetrics};

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (RabbitMQ's Debian package)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A virtual host of the test's own, deleted afterwards.
struct Vhost(String);

impl Vhost {
    fn create() -> Vhost {
        let name = format!("vs-test-{:016x}", fastrand::u64(..));
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost(name)
    }

    fn url(&self, port: u16) -> String {
        format!("amqp://guest:guest@127.0.0.1:{port}/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_topology_carries_the_platforms_arguments_and_can_be_declared_again() {
    let vhost = Vhost::create();
    runtime().block_on(async {
        let conn = Connection::connect(&vhost.url(5672), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        topology::declare(&channel).await.unwrap();
        topology::declare(&channel)
            .await
            .expect("declaring again is harmless");
        // The broker refuses the same queue with other arguments: what it holds is ours.
        let other = conn.create_channel().await.unwrap();
        let refused = other
            .queue_declare(
                "sms.urgent".into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect_err("sms.urgent without its arguments");
        assert!(
            refused.to_string().contains("PRECONDITION_FAILED"),
            "{refused}"
        );
    });
    let listed = rabbitmqctl(&[
        "list_queues",
        "-p",
        &vhost.0,
        "name",
        "durable",
        "arguments",
        "--no-table-headers",
        "-q",
    ]);
    let queues: Vec<&str> = topology::EXCHANGES
        .iter()
        .flat_map(|(_, q)| q.iter().copied())
        .collect();
    // The platform's seven, and the webhook channel's two.
    assert_eq!(
        queues,
        [
            "sms.urgent",
            "sms.normal",
            "email.high",
            "email.normal",
            "email.low",
            "webhook.urgent",
            "webhook.normal",
            "reports.pdf",
            "reports.excel"
        ]
    );
    for queue in queues {
        let line = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(queue))
            .unwrap_or_else(|| panic!("{queue} missing:\n{listed}"));
        assert!(line.contains("true"), "{queue} is durable: {line}");
        for arg in [
            "x-max-priority",
            "10",
            "x-dead-letter-exchange",
            "nilecare.dlq",
            "failed.jobs",
        ] {
            assert!(line.contains(arg), "{queue} has {arg}: {line}");
        }
    }
    assert!(
        listed.lines().any(|l| l.starts_with("failed.jobs")),
        "{listed}"
    );
    let bindings = rabbitmqctl(&[
        "list_bindings",
        "-p",
        &vhost.0,
        "source_name",
        "destination_name",
        "routing_key",
        "--no-table-headers",
        "-q",
    ]);
    for (exchange, queues) in topology::EXCHANGES {
        for queue in queues {
            assert!(
                bindings
                    .lines()
                    .any(|l| l.split_whitespace().collect::<Vec<_>>() == [exchange, queue, queue]),
                "{exchange} → {queue}:\n{bindings}"
            );
        }
    }
}

fn task(n: usize) -> Task {
    Task {
        id: format!("task-{n}"),
        exchange: "nilecare.sms".into(),
        queue: "sms.urgent".into(),
        priority: 9,
        correlation_id: format!("corr-{n}"),
        kind: "notify.sms".into(),
        body: serde_json::json!({ "n": n, "to": "on-call-icu" }),
    }
}

/// Every message in `queue`, taken with basic.get: (correlation id, properties, body).
async fn drain(url: &str, queue: &str) -> Vec<(String, lapin::BasicProperties, serde_json::Value)> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let props = m.delivery.properties.clone();
        let corr = props
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default();
        out.push((
            corr,
            props,
            serde_json::from_slice(&m.delivery.data).unwrap(),
        ));
    }
    out
}

#[test]
fn a_task_is_persistent_prioritised_and_carries_its_correlation_id() {
    let vhost = Vhost::create();
    let url = vhost.url(5672);
    runtime().block_on(async {
        let (publisher, _) = Publisher::start(url.clone(), 16);
        publisher.send(task(1)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while publisher.metrics.published.load(Relaxed) < 1 {
            assert!(Instant::now() < deadline, "not confirmed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = drain(&url, "sms.urgent").await;
        assert_eq!(got.len(), 1);
        let (corr, props, body) = &got[0];
        assert_eq!(corr, "corr-1");
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        assert_eq!(*props.priority(), Some(9));
        let headers = props.headers().as_ref().expect("headers");
        let header = |k: &str| headers.inner().get(k).cloned();
        assert_eq!(
            header("correlation-id"),
            Some(AMQPValue::LongString("corr-1".into()))
        );
        assert_eq!(header("x-retry-count"), Some(AMQPValue::LongInt(0)));
        assert_eq!(body["n"], 1);
    });
}

/// A TCP proxy to the broker that can be taken down (listener closed, every connection
/// cut) and brought back on the same port.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        tokio::spawn(serve(listener, port, up.clone()));
        Proxy { port, up }
    }
}

async fn serve(listener: TcpListener, port: u16, up: Arc<AtomicBool>) {
    let mut listener = Some(listener);
    loop {
        match &listener {
            Some(l) if up.load(Relaxed) => {
                if let Ok(Ok((client, _))) =
                    tokio::time::timeout(Duration::from_millis(20), l.accept()).await
                {
                    tokio::spawn(pipe(client, up.clone()));
                }
            }
            // Going down: nothing listens until it is back.
            Some(_) => listener = None,
            None if up.load(Relaxed) => {
                listener = TcpListener::bind(("127.0.0.1", port)).await.ok();
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Carries one connection to the broker until either side ends or the proxy goes down.
async fn pipe(mut client: TcpStream, up: Arc<AtomicBool>) {
    let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await else {
        return;
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut broker);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            _ = &mut copy => return,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if !up.load(Relaxed) {
                    return; // both ends dropped: the connection is cut
                }
            }
        }
    }
}

#[test]
fn tasks_sent_while_rabbitmq_is_away_wait_and_are_published_when_it_returns() {
    let vhost = Vhost::create();
    runtime().block_on(async {
        let proxy = Proxy::start().await;
        let (publisher, _) = Publisher::start(vhost.url(proxy.port), 1000);
        for n in 0..100 {
            publisher.send(task(n)).await.unwrap();
        }
        // Away while tasks keep coming.
        proxy.up.store(false, Relaxed);
        for n in 100..300 {
            publisher.send(task(n)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let during = publisher.metrics.published.load(Relaxed);
        assert!(
            during < 300,
            "nothing can be confirmed while RabbitMQ is away"
        );
        assert_eq!(publisher.metrics.buffered.load(Relaxed), 300 - during);
        proxy.up.store(true, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while publisher.metrics.published.load(Relaxed) < 300 {
            assert!(
                Instant::now() < deadline,
                "published {} of 300",
                publisher.metrics.published.load(Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every task is there; one whose confirm was lost with the connection may be there
        // twice (at least once, never lost).
        let got = drain(&vhost.url(5672), "sms.urgent").await;
        let ids: std::collections::BTreeSet<String> =
            got.iter().map(|(c, _, _)| c.clone()).collect();
        let want: std::collections::BTreeSet<String> =
            (0..300).map(|n| format!("corr-{n}")).collect();
        assert_eq!(ids, want);
        assert!(got.len() <= 301, "{} messages for 300 tasks", got.len());
    });
}

const POLICY: &str = r#"
[[route]]
priorities = ["high"]
channel = "sms"
to = ["rota:icu-on-call", "role:charge-nurse"]

[[route]]
priorities = ["high", "medium"]
channel = "email"
to = ["role:physician"]
"#;

const SPO2_MEDIUM: &str = r#"
[[rule]]
id = "spo2_low"
kind = "threshold"
priority = "medium"
message = "SpO2 low"
condition = "spo2 < 92"
"#;

/// An engine that has raised two alerts: `hr_high` (high) for bed-1 and `spo2_low`
/// (medium) for bed-2, returned in that order. The source is returned so the engine keeps
/// running.
fn raise_a_high_and_a_medium_alert() -> (Harness, SourceHandle, [AlertEvent; 2]) {
    let mut h = Harness::start(&common::config(), rules(&format!("{HR_RULE}{SPO2_MEDIUM}")));
    let mut source = h.replay_source();
    let t0 = vitalstream::model::now_millis() - 10_000;
    let lines = [
        reading("bed-1", t0, "hr", 130.0),
        reading("bed-2", t0, "spo2", 90.0),
    ];
    common::send_lines(&mut source, &lines, 1);
    let mut raised: Vec<AlertEvent> = (0..2)
        .map(|_| h.alerts.recv_timeout(WAIT).expect("raised"))
        .collect();
    assert!(raised.iter().all(|e| e.event == Transition::Raised));
    raised.sort_by_key(|e| e.alert.rule_id.to_string());
    let [high, medium]: [AlertEvent; 2] = raised.try_into().expect("two alerts");
    assert_eq!(
        (&*high.alert.rule_id, &*medium.alert.rule_id),
        ("hr_high", "spo2_low")
    );
    (h, source, [high, medium])
}

/// Alerts raised by the engine become the tasks the policy names for their priority, on
/// the queues and with the message priorities the platform expects; other transitions
/// notify no one.
#[test]
fn an_alert_becomes_the_tasks_its_priority_calls_for() {
    let policy: NotificationPolicy = toml::from_str(POLICY).unwrap();
    assert_eq!(policy.problems(), Vec::<String>::new());
    let (h, source, raised) = raise_a_high_and_a_medium_alert();
    let [high, medium] = &raised;
    h.engine
        .book
        .acknowledge(&high.alert.alert_id, "nurse")
        .unwrap();
    let acknowledged = h.alerts.recv_timeout(WAIT).unwrap();
    assert!(policy.tasks_for(&acknowledged).is_empty());

    let vhost = Vhost::create();
    let url = vhost.url(5672);
    runtime().block_on(async {
        let (publisher, _) = Publisher::start(url.clone(), 16);
        let tasks: Vec<Task> = raised.iter().flat_map(|e| policy.tasks_for(e)).collect();
        assert_eq!(
            tasks.len(),
            4,
            "2 SMS and an email for the high alert, an email for the medium"
        );
        for task in tasks {
            publisher.send(task).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while publisher.metrics.published.load(Relaxed) < 4 {
            assert!(Instant::now() < deadline, "not confirmed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sms = drain(&url, "sms.urgent").await;
        let mut to: Vec<&str> = sms
            .iter()
            .map(|(_, _, b)| b["to"].as_str().unwrap())
            .collect();
        to.sort();
        assert_eq!(to, ["role:charge-nurse", "rota:icu-on-call"]);
        for (corr, props, body) in &sms {
            assert_eq!(*corr, high.alert.trigger.correlation_id.to_string());
            assert_eq!(*props.priority(), Some(9));
            assert_eq!(body["alert_id"], high.alert.alert_id);
            assert_eq!(body["subject"], "bed-1");
        }
        let email_high = drain(&url, "email.high").await;
        assert_eq!(email_high.len(), 1);
        assert_eq!(*email_high[0].1.priority(), Some(9));
        assert_eq!(email_high[0].2["to"], "role:physician");
        let email_normal = drain(&url, "email.normal").await;
        assert_eq!(email_normal.len(), 1);
        assert_eq!(*email_normal[0].1.priority(), Some(5));
        assert_eq!(email_normal[0].2["alert_id"], medium.alert.alert_id);
        assert!(drain(&url, "sms.normal").await.is_empty());
    });
    drop(source);
    h.finish();
}

#[test]
fn a_policy_names_its_problems() {
    let policy: NotificationPolicy = toml::from_str(
        "[[route]]\npriorities = []\nchannel = \"sms\"\nto = [\"nurse\", \"role:\"]\n",
    )
    .unwrap();
    let problems = policy.problems().join("\n");
    assert!(problems.contains("`priorities` is empty"), "{problems}");
    assert!(problems.contains("`nurse` is not"), "{problems}");
    assert!(problems.contains("`role:` is not"), "{problems}");
    assert!(
        toml::from_str::<NotificationPolicy>(
            "[[route]]\npriorities = [\"high\"]\nchannel = \"fax\"\nto = []\n"
        )
        .is_err()
    );
}

const ESCALATION: &str = r#"
after = "5m"
limit = 2

[[level]]
channel = "sms"
to = ["role:charge-nurse"]

[[level]]
channel = "sms"
to = ["user:dr-on-call", "role:charge-nurse"]
"#;

/// With the clock given, not slept: an alert left unacknowledged escalates at 5 and 10
/// minutes — the book moves it to `escalated`, and its level's wider audience is notified
/// at a higher priority — and no further than its limit; one acknowledged in time does not
/// escalate, and an escalated alert can still be acknowledged.
#[test]
fn an_unacknowledged_alert_escalates_on_time_up_to_its_limit() {
    let policy: Escalation = toml::from_str(ESCALATION).unwrap();
    let mut escalator = Escalator::new(policy.clone());
    let (h, source, raised) = raise_a_high_and_a_medium_alert();
    for event in &raised {
        escalator.observe(event);
    }
    let [high, medium] = &raised;
    let at = |e: &AlertEvent| e.alert.raised_at.unwrap();
    let (first, last) = (at(high).min(at(medium)), at(high).max(at(medium)));
    const MINUTE: i64 = 60_000;
    // What the notifier does with a due escalation: the book records it, and the
    // transition it emits carries the level's tasks.
    let escalate = |escalator: &mut Escalator, id: &str, level: u32| {
        assert!(h.engine.book.escalate(id, level).is_some());
        let event = h.alerts.recv_timeout(WAIT).unwrap();
        escalator.observe(&event);
        assert_eq!(event.event, Transition::Escalated);
        assert_eq!(event.alert.state, AlertState::Escalated);
        assert_eq!(event.alert.escalation, level);
        policy.tasks_for(&event)
    };

    assert!(escalator.due(first + 5 * MINUTE - 1).is_empty(), "not yet");
    // The medium alert is acknowledged in time.
    h.engine
        .book
        .acknowledge(&medium.alert.alert_id, "nurse")
        .unwrap();
    escalator.observe(&h.alerts.recv_timeout(WAIT).unwrap());

    let due = escalator.due(last + 5 * MINUTE);
    assert_eq!(
        due,
        [(high.alert.alert_id.clone(), 1)],
        "only the unacknowledged alert"
    );
    let tasks = escalate(&mut escalator, &high.alert.alert_id, 1);
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        (tasks[0].queue.as_str(), tasks[0].priority),
        ("sms.urgent", 10)
    );
    assert_eq!(tasks[0].body["to"], "role:charge-nurse");
    assert_eq!(tasks[0].body["escalation"], 1);
    assert_eq!(
        tasks[0].correlation_id,
        high.alert.trigger.correlation_id.to_string()
    );
    assert!(
        escalator.due(last + 5 * MINUTE + 1).is_empty(),
        "once per level"
    );
    assert!(
        h.engine.book.escalate(&high.alert.alert_id, 1).is_none(),
        "the book records a level once"
    );

    let due = escalator.due(last + 10 * MINUTE);
    assert_eq!(due, [(high.alert.alert_id.clone(), 2)]);
    let tasks = escalate(&mut escalator, &high.alert.alert_id, 2);
    let to: Vec<&str> = tasks
        .iter()
        .map(|t| t.body["to"].as_str().unwrap())
        .collect();
    assert_eq!(to, ["user:dr-on-call", "role:charge-nurse"]);
    assert!(
        escalator.due(last + 60 * MINUTE).is_empty(),
        "no further than the limit"
    );
    assert_eq!(escalator.waiting(), 1);

    let acked = h
        .engine
        .book
        .acknowledge(&high.alert.alert_id, "dr")
        .unwrap();
    assert_eq!(
        (acked.state, acked.escalation),
        (AlertState::Acknowledged, 2)
    );
    escalator.observe(&h.alerts.recv_timeout(WAIT).unwrap());
    assert_eq!(escalator.waiting(), 0);
    assert!(
        h.engine.book.escalate(&high.alert.alert_id, 3).is_none(),
        "an acknowledged alert does not escalate"
    );
    drop(source);
    h.finish();
}

/// 40 simulated patients, each with an anomaly episode early on.
const SIMULATOR: &str = r#"
[[sources]]
type = "simulator"
devices = 40
rate_hz = 10.0
anomaly_rate = 1.0
"#;

/// `vitalstream run` with `[notifications]` sending an email task to `role:nurse` for
/// every alert.
struct Service {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Service {
    fn start(vhost: &Vhost) -> Service {
        Service::start_in(
            tempfile::tempdir().unwrap(),
            &vhost.url(5672),
            SIMULATOR,
            "",
        )
    }

    /// `sources` is the config's first lines (`[[sources]]` tables, or `sources = []`);
    /// `more` is added at the end.
    fn start_in(dir: tempfile::TempDir, url: &str, sources: &str, more: &str) -> Service {
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"
{sources}
[log]
format = "json"
[storage]
dir = "{data}"
[alert_log]
path = "{data}/alerts.ndjson"
[dead_letter]
path = "{data}/dead-letter.ndjson"
[api]
dev_token = true
[notifications]
url = "{url}"
drain_timeout = "{drain}"
spool = "{data}/notifications-spool.ndjson"
[[notifications.route]]
priorities = ["high", "medium", "low"]
channel = "email"
to = ["role:nurse"]
{more}
"#,
                data = dir.path().join("data").display(),
                // Long enough for a broker that is back; short where none will answer.
                drain = if url.contains(":1/") { "1s" } else { "30s" },
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vitalstream"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap())
            .spawn()
            .unwrap();
        Service { child, dir }
    }

    fn raised(&self) -> BTreeSet<String> {
        raised_in(self.dir.path())
    }

    fn wait_for_alerts(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.raised().len() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} alerts within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Asks it to stop, as an operator would (SIGINT).
    fn interrupt(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-INT", &pid]).status();
        assert!(sent.unwrap().success());
    }

    /// Stops it and returns what it raised and its log.
    fn stop(self) -> (BTreeSet<String>, String) {
        self.interrupt();
        let (raised, log, _) = self.wait();
        (raised, log)
    }

    /// Waits for it to end; returns what it raised, its log and its directory.
    fn wait(self) -> (BTreeSet<String>, String, tempfile::TempDir) {
        let out = self.child.wait_with_output().unwrap();
        let log = std::fs::read_to_string(self.dir.path().join("run.log")).unwrap();
        assert!(out.status.success(), "{log}");
        (raised_in(self.dir.path()), log, self.dir)
    }
}

/// The ids of the alerts raised so far, from the alert log of a service in `dir`.
fn raised_in(dir: &std::path::Path) -> BTreeSet<String> {
    let log = dir.join("data/alerts.ndjson");
    (std::fs::read_to_string(log).unwrap_or_default().lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "raised")
        .map(|e| e["alert_id"].as_str().unwrap().to_string())
        .collect()
}

/// The (alert id, message id) of each email task waiting in `vhost`'s queues.
fn emailed(vhost: &Vhost) -> Vec<(String, String)> {
    runtime().block_on(async {
        let url = vhost.url(5672);
        let mut all = Vec::new();
        for queue in ["email.high", "email.normal", "email.low"] {
            all.extend(drain(&url, queue).await);
        }
        (all.iter())
            .map(|(_, props, body)| {
                let id = props.message_id().as_ref().map(|m| m.to_string());
                (body["alert_id"].as_str().unwrap().to_string(), id.unwrap())
            })
            .collect()
    })
}

/// `vitalstream run` with `[notifications]`: every alert the simulator's patients raise
/// becomes an email task on RabbitMQ, and stopping waits for them to be confirmed.
#[test]
fn the_service_sends_a_notification_task_for_every_alert_it_raises() {
    let vhost = Vhost::create();
    let service = Service::start(&vhost);
    service.wait_for_alerts(3);
    let (raised, log) = service.stop();
    let tasks = emailed(&vhost);
    let notified: BTreeSet<String> = tasks.iter().map(|(alert, _)| alert.clone()).collect();
    assert_eq!(notified, raised, "one task per raised alert\n{log}");
    assert_eq!(tasks.len(), raised.len());
}

/// Stopped while RabbitMQ is unreachable: the tasks it could not publish within its
/// `drain_timeout` are kept in the spool, and the next start (here with nothing to ingest)
/// sends them first.
#[test]
fn tasks_unconfirmed_at_stop_are_spooled_and_sent_at_the_next_start() {
    let vhost = Vhost::create();
    let unreachable = "amqp://guest:guest@127.0.0.1:1/%2f";
    let first = Service::start_in(tempfile::tempdir().unwrap(), unreachable, SIMULATOR, "");
    first.wait_for_alerts(3);
    first.interrupt();
    let (raised, log, dir) = first.wait();
    let spool = dir.path().join("data/notifications-spool.ndjson");
    let kept: BTreeSet<String> = (std::fs::read_to_string(&spool).unwrap().lines())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|t| t["body"]["alert_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, raised, "every raised alert's task is kept\n{log}");

    let second = Service::start_in(dir, &vhost.url(5672), "sources = []", "");
    let (_, log, dir) = second.wait();
    assert!(!spool.exists(), "the spool is emptied\n{log}");
    let sent: BTreeSet<String> = emailed(&vhost).into_iter().map(|(a, _)| a).collect();
    assert_eq!(sent, raised, "{log}");
    drop(dir);
}

/// RabbitMQ itself stopped (`rabbitmqctl stop_app`) and started again on a guard that
/// always starts it, even when the test fails.
struct BrokerOutage;

impl BrokerOutage {
    fn begin() -> BrokerOutage {
        rabbitmqctl(&["stop_app"]);
        BrokerOutage
    }
}

impl Drop for BrokerOutage {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "60"])
            .output();
    }
}

/// RabbitMQ stopped and started while the simulator's patients keep raising alerts: the
/// tasks of the alerts raised meanwhile wait in the service and are published once it is
/// back; every alert has its task. (A task whose confirm the outage cut off is published
/// again: at least once, under the same message id, which receivers drop repeats by.)
#[test]
fn rabbitmq_stopped_and_started_while_alerts_flow_loses_no_task() {
    let vhost = Vhost::create();
    let service = Service::start(&vhost);
    service.wait_for_alerts(3);
    let outage = BrokerOutage::begin();
    let before = service.raised().len();
    service.wait_for_alerts(before + 5);
    drop(outage);
    let after = service.raised().len();
    service.wait_for_alerts(after + 3);
    let (raised, log) = service.stop();
    assert!(
        log.contains("RabbitMQ unreachable") || log.contains("task not confirmed"),
        "the service never saw RabbitMQ go away\n{log}"
    );
    let tasks = emailed(&vhost);
    let notified: BTreeSet<String> = tasks.iter().map(|(alert, _)| alert.clone()).collect();
    assert_eq!(notified, raised, "one task per raised alert\n{log}");
    let jobs: BTreeSet<&String> = tasks.iter().map(|(_, id)| id).collect();
    assert_eq!(jobs.len(), raised.len(), "one job per alert\n{log}");
}

/// A webhook receiver that answers `fail_first` calls with 503 (`usize::MAX`: every call),
/// then 200; it records each call's idempotency key, body and time.
async fn webhook(fail_first: usize) -> (String, Calls) {
    use axum::http::{HeaderMap, StatusCode};
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = calls.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: HeaderMap, axum::Json(body): axum::Json<serde_json::Value>| {
                let seen = seen.clone();
                async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_string();
                    let mut calls = seen.lock().unwrap();
                    calls.push((key, body, Instant::now()));
                    if calls.len() <= fail_first {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    }
                }
            },
        ),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

/// A worker for `url` whose webhook tasks go to `hook`, retrying after 100 ms, then 200 ms;
/// it runs until the returned sender is dropped.
fn start_worker(url: &str, hook: &str) -> (Arc<WorkerMetrics>, tokio::sync::oneshot::Sender<()>) {
    start_worker_with(&format!(
        r#"
url = "{url}"
retry_delay = "100ms"
[webhook]
kind = "webhook"
url = "{hook}"
"#
    ))
}

fn start_worker_with(config: &str) -> (Arc<WorkerMetrics>, tokio::sync::oneshot::Sender<()>) {
    let config: WorkerConfig = toml::from_str(config).unwrap();
    assert_eq!(
        (config.prefetch, config.tries),
        (5, 3),
        "the platform's defaults"
    );
    let metrics = Arc::new(WorkerMetrics::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(worker::run(config, metrics.clone(), None, async move {
        let _ = stopped.await;
    }));
    (metrics, stop)
}

type Calls = Arc<std::sync::Mutex<Vec<(String, serde_json::Value, Instant)>>>;

fn webhook_task(n: usize) -> Task {
    Task {
        id: format!("alert-{n}/0/role:rapid-response"),
        exchange: "nilecare.webhook".into(),
        queue: "webhook.urgent".into(),
        priority: 9,
        correlation_id: format!("corr-{n}"),
        kind: "notify.webhook".into(),
        body: serde_json::json!({ "n": n, "to": "role:rapid-response" }),
    }
}

async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A webhook that fails twice then succeeds: tried three times, with growing delays and
/// the retry count in each try, the same idempotency key every time, and delivered once.
#[test]
fn a_webhook_that_fails_twice_then_succeeds_is_retried_and_delivered_once() {
    let vhost = Vhost::create();
    let url = vhost.url(5672);
    runtime().block_on(async {
        let (hook, calls) = webhook(2).await;
        let (metrics, _stop) = start_worker(&url, &hook);
        let (publisher, _) = Publisher::start(url.clone(), 16);
        publisher.send(webhook_task(1)).await.unwrap();
        wait_for("delivered", || metrics.delivered.load(Relaxed) == 1).await;
        // Nothing more arrives after the success.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 3, "{calls:?}");
        let retry_counts: Vec<_> = calls
            .iter()
            .map(|(_, b, _)| b["retry_count"].clone())
            .collect();
        assert_eq!(retry_counts, [0, 1, 2]);
        // Growing delays: at least 100 ms, then at least 200 ms.
        assert!(calls[1].2 - calls[0].2 >= Duration::from_millis(100));
        assert!(calls[2].2 - calls[1].2 >= Duration::from_millis(200));
        assert!(
            calls
                .iter()
                .all(|(key, b, _)| key == "alert-1/0/role:rapid-response"
                    && b["correlation_id"] == "corr-1"
                    && b["body"]["n"] == 1)
        );
        assert_eq!(metrics.retried.load(Relaxed), 2);
        assert_eq!(metrics.failed.load(Relaxed), 0);
        assert!(drain(&url, "failed.jobs").await.is_empty());
        assert!(
            drain(&url, "webhook.urgent").await.is_empty(),
            "acknowledged"
        );
    });
}

/// A webhook that always fails: after three tries the task is in `failed.jobs`, with its
/// correlation id, the number of failures and the reason.
#[test]
fn a_webhook_that_always_fails_lands_in_failed_jobs_after_three_tries() {
    let vhost = Vhost::create();
    let url = vhost.url(5672);
    runtime().block_on(async {
        let (hook, calls) = webhook(usize::MAX).await;
        let (metrics, _stop) = start_worker(&url, &hook);
        let (publisher, _) = Publisher::start(url.clone(), 16);
        publisher.send(webhook_task(2)).await.unwrap();
        wait_for("failed", || metrics.failed.load(Relaxed) == 1).await;
        assert_eq!(calls.lock().unwrap().len(), 3);
        let failed = drain(&url, "failed.jobs").await;
        assert_eq!(failed.len(), 1);
        let (corr, props, body) = &failed[0];
        assert_eq!((corr.as_str(), body["n"].as_i64()), ("corr-2", Some(2)));
        let headers = props.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get("x-retry-count"), Some(&AMQPValue::LongInt(3)));
        assert_eq!(
            headers.get("x-original-queue"),
            Some(&AMQPValue::LongString("webhook.urgent".into()))
        );
        let Some(AMQPValue::LongString(reason)) = headers.get("x-failure-reason") else {
            panic!("no reason: {headers:?}")
        };
        assert!(reason.to_string().contains("503"), "{reason}");
        assert_eq!(metrics.delivered.load(Relaxed), 0);
    });
}

/// A real SMTP server (aiosmtpd, from PyPI) that keeps what it receives in a Maildir.
struct SmtpServer {
    child: std::process::Child,
    port: u16,
    maildir: tempfile::TempDir,
}

impl SmtpServer {
    fn start() -> SmtpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let maildir = tempfile::tempdir().unwrap();
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir.path().join("mail"))
            .spawn()
            .expect("python3 -m aiosmtpd (pip install aiosmtpd)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        SmtpServer {
            child,
            port,
            maildir,
        }
    }

    /// Every message received, as text.
    fn messages(&self) -> Vec<String> {
        let new = self.maildir.path().join("mail/new");
        (std::fs::read_dir(new).into_iter().flatten())
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Email over SMTP: a task for an audience with an address arrives at the server, with the
/// alert in its subject; one for an audience the directory lacks goes to `failed.jobs` at
/// once, since no retry would find the address.
#[test]
fn an_email_task_is_sent_over_smtp_and_one_without_an_address_fails_at_once() {
    let vhost = Vhost::create();
    let url = vhost.url(5672);
    let smtp = SmtpServer::start();
    runtime().block_on(async {
        let (metrics, _stop) = start_worker_with(&format!(
            r#"
url = "{url}"
retry_delay = "100ms"
[email]
kind = "smtp"
host = "127.0.0.1"
port = {port}
from = "vitalstream@nilecare.example"
addresses = {{ "role:charge-nurse" = "charge.nurse@ward7.example" }}
"#,
            port = smtp.port
        ));
        let (publisher, _) = Publisher::start(url.clone(), 16);
        for to in ["role:charge-nurse", "role:nobody"] {
            publisher
                .send(Task {
                    id: format!("alert-9/0/{to}"),
                    exchange: "nilecare.email".into(),
                    queue: "email.high".into(),
                    priority: 9,
                    correlation_id: "corr-9".into(),
                    kind: "notify.email".into(),
                    body: serde_json::json!({
                        "to": to, "alert_id": "alert-9", "rule_id": "hr_high",
                        "priority": "high", "message": "heart rate above 120",
                        "subject": "p-7", "escalation": 0,
                    }),
                })
                .await
                .unwrap();
        }
        wait_for("both outcomes", || {
            metrics.delivered.load(Relaxed) == 1 && metrics.failed.load(Relaxed) == 1
        })
        .await;
        assert_eq!(metrics.retried.load(Relaxed), 0);
        let failed = drain(&url, "failed.jobs").await;
        assert_eq!(failed.len(), 1);
        let (_, props, body) = &failed[0];
        assert_eq!(body["to"], "role:nobody");
        let headers = props.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get("x-retry-count"), Some(&AMQPValue::LongInt(1)));
        assert_eq!(
            headers.get("x-failure-reason"),
            Some(&AMQPValue::LongString(
                "no email address for `role:nobody`".into()
            ))
        );
    });
    let messages = smtp.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let mail = &messages[0];
    for expected in [
        "To: charge.nurse@ward7.example",
        "From: vitalstream@nilecare.example",
        "Subject: [HIGH] heart rate above 120",
        "corr-9",
    ] {
        assert!(mail.contains(expected), "{expected} in\n{mail}");
    }
}

/// Prints each sheet of an .xlsx file as JSON rows, read back with openpyxl (from PyPI).
const READ_XLSX: &str = r#"
import json, sys, openpyxl
book = openpyxl.load_workbook(sys.argv[1])
print(json.dumps({s.title: [[c for c in row] for row in s.iter_rows(values_only=True)] for s in book}))
"#;

/// A shift report for a ward, asked for through REST (`POST /api/v1/reports`): the worker
/// reads the ward's alerts and vitals from PostgreSQL, writes an Excel file that a
/// spreadsheet reader reads back with the expected rows and a PDF that renders (pdftoppm)
/// and holds them, and tells the requester of each by `notification:new`.
#[test]
fn a_ward_shift_report_is_rendered_as_excel_and_pdf() {
    use vitalstream::sinks::Storage;
    use vitalstream::sinks::postgres::{PostgresConfig, PostgresStorage};
    let vhost = Vhost::create();
    let url = vhost.url(5672);
    let db = common::pg::TestDb::create();
    let dir = tempfile::tempdir().unwrap();
    // p1 (d1) and p2 (d2) are in icu-3, p3 (d3) is not. Everyone's heart rate goes high;
    // only p1's alert is acknowledged.
    let mut h = Harness::start(&common::config(), rules(HR_RULE));
    let mut source = h.replay_source();
    let t0 = vitalstream::model::now_millis() - 120_000;
    let line = |dev: &str, pat: &str, ts: i64, hr: f64| {
        reading(dev, ts, "hr", hr).replace('{', &format!(r#"{{"patient_id":"{pat}","#))
    };
    let lines = vec![
        line("d1", "p1", t0, 80.0),
        line("d1", "p1", t0 + 1_000, 130.0),
        line("d2", "p2", t0 + 2_000, 140.0),
        line("d3", "p3", t0 + 3_000, 150.0),
    ];
    common::send_lines(&mut source, &lines, 1);
    let mut events: Vec<AlertEvent> = (0..3)
        .map(|_| h.alerts.recv_timeout(WAIT).unwrap())
        .collect();
    let p1 = events
        .iter()
        .find(|e| e.alert.patient_id.as_deref() == Some("p1"))
        .unwrap();
    h.engine
        .book
        .acknowledge(&p1.alert.alert_id.clone(), "nurse")
        .unwrap();
    events.push(h.alerts.recv_timeout(WAIT).unwrap());
    drop(source);
    h.engine.join(vitalstream::engine::EndOfInput::KeepOpen);
    let mut storage = PostgresStorage::open(&PostgresConfig {
        url: db.url.clone(),
        spool_dir: dir.path().join("spool"),
        ..PostgresConfig::default()
    })
    .unwrap();
    for batch in h.readings.try_iter() {
        storage.write_readings(&batch.readings).unwrap();
    }
    storage.write_alerts(&events).unwrap();
    storage.close().unwrap();

    let reports = dir.path().join("reports");
    let api_engine = Harness::start(&common::config(), rules(HR_RULE));
    let report_id = runtime().block_on(async {
        use axum::body::Body;
        use axum::http::Request;
        use tower::ServiceExt;
        use vitalstream::api::auth::Role;
        use vitalstream::api::{ApiConfig, ApiState, router};
        // The service's side: REST, with a task publisher.
        let (publisher, _) = Publisher::start(url.clone(), 16);
        let api_config = ApiConfig::default();
        let state = ApiState::new(&api_config, api_engine.engine.control(), None)
            .with_tasks(Some(publisher));
        let mut notices = state.notices.subscribe();
        let app = router(&api_config, state.clone());
        let token = common::server::token(&state, "nurse-7", Role::Clinician, None);
        // The worker, announcing through the service's socket.io.
        let mut config: WorkerConfig = toml::from_str(&format!(
            r#"
url = "{url}"
[reports]
dir = "{dir}"
database_url = "{db}"
"#,
            dir = reports.display(),
            db = db.url
        ))
        .unwrap();
        config.wards = [(
            "icu-3".to_string(),
            vec!["d1".to_string(), "d2".to_string()],
        )]
        .into();
        let metrics = Arc::new(WorkerMetrics::default());
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let announce = Some(state.notices.clone());
        tokio::spawn(worker::run(config, metrics.clone(), announce, async move {
            let _ = stopped.await;
        }));

        let request = serde_json::json!({
            "ward": "icu-3",
            "from": t0 - 60_000,
            "to": vitalstream::model::now_millis() + 60_000,
        });
        let response = app
            .clone()
            .oneshot(
                Request::post("/api/v1/reports")
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", "application/json")
                    .header("x-request-id", "req-shift-1")
                    .body(Body::from(request.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["status"], 202, "{body}");
        assert_eq!(body["data"]["formats"], serde_json::json!(["excel", "pdf"]));
        let report_id = body["data"]["report_id"].as_str().unwrap().to_string();

        // The requester hears of each file in their own room.
        let mut told = Vec::new();
        for _ in 0..2 {
            let notice = tokio::time::timeout(Duration::from_secs(20), notices.recv())
                .await
                .expect("a notification:new within 20 s")
                .unwrap();
            assert_eq!(notice.to, "user:nurse-7");
            assert_eq!(notice.data["report_id"], report_id.as_str());
            assert_eq!(notice.correlation_id.as_deref(), Some("req-shift-1"));
            told.push(notice.data["file"].as_str().unwrap().to_string());
        }
        told.sort();
        assert_eq!(
            told,
            [format!("{report_id}.pdf"), format!("{report_id}.xlsx")]
        );
        assert_eq!(metrics.failed.load(Relaxed), 0);
        report_id
    });
    api_engine.finish();

    let out = Command::new("python3")
        .args(["-c", READ_XLSX])
        .arg(reports.join(format!("{report_id}.xlsx")))
        .output()
        .expect("python3 with openpyxl (pip install openpyxl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sheets: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let alerts = sheets["Alerts"].as_array().unwrap();
    assert!(
        alerts[0][0]
            .as_str()
            .unwrap()
            .starts_with("Shift report: ward icu-3")
    );
    assert_eq!(alerts[2][0], "Patient");
    let rows: Vec<_> = alerts[3..]
        .iter()
        .map(|r| {
            (
                r[0].clone(),
                r[1].clone(),
                r[2].clone(),
                r[3].clone(),
                r[6].clone(),
            )
        })
        .collect();
    use serde_json::json;
    assert_eq!(
        rows,
        [
            (json!("p1"), json!("high"), json!(1), json!(1), json!(0)),
            (json!("p2"), json!("high"), json!(1), json!(0), json!(0)),
        ],
        "p3 is not in the ward"
    );
    assert_eq!(alerts[4][4], "-", "p2 was never acknowledged");
    let vitals = sheets["Vitals"].as_array().unwrap();
    let rows: Vec<_> = vitals[3..]
        .iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[4].clone()))
        .collect();
    assert_eq!(
        rows,
        [
            (json!("p1"), json!(2), json!(130)),
            (json!("p2"), json!(1), json!(140))
        ]
    );

    let pdf = reports.join(format!("{report_id}.pdf"));
    let png = dir.path().join("page");
    let rendered = Command::new("pdftoppm")
        .args(["-png", "-r", "50", "-f", "1", "-l", "1"])
        .arg(&pdf)
        .arg(&png)
        .status()
        .expect("pdftoppm (Debian's poppler-utils)");
    assert!(rendered.success());
    let page = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "png"))
        .expect("a rendered page");
    assert!(std::fs::metadata(page).unwrap().len() > 1_000);
    let text = Command::new("pdftotext")
        .args(["-layout"])
        .arg(&pdf)
        .arg("-")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    let squeezed: Vec<String> = (text.lines())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for expected in ["p1 high 1 1", "p2 high 1 0 - - 0", "p1 2 105.0 80.0 130.0"] {
        assert!(
            squeezed.iter().any(|l| l.starts_with(expected)),
            "{expected:?} in\n{text}"
        );
    }
    assert!(!text.contains("p3"), "{text}");
}

/// `vitalstream run` with `[worker]`: the worker inside the service delivers the tasks of
/// the alerts it raises (here email through an email gateway's HTTP API); whatever it had not
/// taken when the service stopped still waits on the queue.
#[test]
fn the_worker_inside_the_service_delivers_its_alerts_notifications() {
    let vhost = Vhost::create();
    let rt = runtime();
    let (hook, calls) = rt.block_on(webhook(0));
    let service = Service::start_in(
        tempfile::tempdir().unwrap(),
        &vhost.url(5672),
        SIMULATOR,
        &format!(
            r#"
[worker]
url = "{url}"
[worker.email]
kind = "webhook"
url = "{hook}"
"#,
            url = vhost.url(5672)
        ),
    );
    let delivered = || -> BTreeSet<String> {
        (calls.lock().unwrap().iter())
            .map(|(_, b, _)| b["body"]["alert_id"].as_str().unwrap().to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 deliveries within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (raised, log) = service.stop();
    let mut accounted = delivered();
    accounted.extend(emailed(&vhost).into_iter().map(|(alert, _)| alert));
    assert_eq!(accounted, raised, "every alert delivered or waiting\n{log}");
}
