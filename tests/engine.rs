//! The engine end to end on in-memory inputs: lateness, duplicates, windows, rule swaps,
//! idle devices, backpressure and the future-time guard.

mod common;

use common::*;
use std::time::Duration;
use vitalstream::alerts::Transition;
use vitalstream::engine::EngineConfig;
use vitalstream::model::{ClockMode, now_micros, now_millis};

const T0: i64 = 1_767_225_600_000;

#[test]
fn late_readings_are_counted_stored_and_not_evaluated() {
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let mut src = h.replay_source();
    let lines = vec![
        reading("a", T0 + 10_000, "hr", 80.0),
        // 6 s behind the newest event time: past the 5 s allowed lateness.
        reading("b", T0 + 4_000, "hr", 150.0),
        // 4 s behind: on time.
        reading("c", T0 + 6_000, "hr", 150.0),
    ];
    send_lines(&mut src, &lines, 1);
    drop(src);
    let (m, alerts, stored) = h.finish();
    assert_eq!(m.accepted, 3);
    assert_eq!(m.late, 1);
    assert_eq!(stored, 3, "late readings are still stored");
    assert_eq!(m.rules["hr_high"].matches, 1);
    assert_eq!(count(&alerts, "hr_high", Transition::Raised), 1);
    assert_eq!(alerts[0].alert.trigger.device_id, "c");
}

#[test]
fn duplicates_are_not_evaluated_twice() {
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let mut src = h.replay_source();
    let a = r#"{"device_id":"a","ts":1767225600000,"seq":1,"hr":150}"#.to_string();
    let b = r#"{"device_id":"a","ts":1767225601000,"seq":1,"hr":150}"#.to_string();
    let c = r#"{"device_id":"a","ts":1767225602000,"seq":2,"hr":80}"#.to_string();
    send_lines(&mut src, &[a.clone(), a, b, c], 2);
    drop(src);
    let (m, alerts, stored) = h.finish();
    assert_eq!(m.accepted, 4);
    assert_eq!(m.duplicates, 2, "same ts, then same seq");
    assert_eq!(stored, 2, "duplicates are not stored twice");
    assert_eq!(m.rules["hr_high"].matches, 1);
    assert_eq!(count(&alerts, "hr_high", Transition::Raised), 1);
    assert_eq!(count(&alerts, "hr_high", Transition::Resolved), 1);
}

#[test]
fn a_persisting_condition_raises_one_alert() {
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let mut src = h.replay_source();
    let lines: Vec<String> = (0..100)
        .map(|i| reading("a", T0 + i * 1000, "hr", 150.0))
        .collect();
    send_lines(&mut src, &lines, 7);
    drop(src);
    let (m, alerts, _) = h.finish();
    assert_eq!(m.rules["hr_high"].matches, 100);
    assert_eq!(alerts.len(), 1, "one alert, no storm: {alerts:?}");
}

#[test]
fn windows_close_on_the_watermark_and_at_end_of_input() {
    let mut h = Harness::start(&config(), rules(SPO2_WINDOW));
    let mut src = h.replay_source();
    // Device a: window [T0, T0+10s) averages 85; device b's averages 95.
    let mut lines = Vec::new();
    for i in 0..10 {
        lines.push(reading("a", T0 + i * 1000, "spo2", 85.0));
        lines.push(reading("b", T0 + i * 1000, "spo2", 95.0));
    }
    // Pushes the watermark past T0 + 10 s for the first window.
    lines.push(reading("c", T0 + 16_000, "spo2", 99.0));
    send_lines(&mut src, &lines, 4);
    let deadline = std::time::Instant::now() + WAIT;
    while h.engine.metrics.snapshot().rules["spo2_low"].matches == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "window did not close on the watermark"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(src);
    let (m, alerts, _) = h.finish();
    assert_eq!(m.rules["spo2_low"].matches, 1, "only a's window matches");
    let raised: Vec<_> = alerts
        .iter()
        .filter(|e| e.event == Transition::Raised)
        .collect();
    assert_eq!(raised.len(), 1);
    assert_eq!(raised[0].alert.subject, "a");
    assert_eq!(raised[0].alert.trigger.window, Some((T0, T0 + 10_000)));
    assert_eq!(raised[0].alert.trigger.value, 85.0);
}

#[test]
fn results_do_not_depend_on_the_number_of_shards() {
    let text = format!("{HR_RULE}\n{SPO2_WINDOW}");
    let mut lines = Vec::new();
    for i in 0..300i64 {
        for d in 0..20 {
            let hr = if (i + d) % 17 == 0 { 130.0 } else { 80.0 };
            let spo2 = if i % 40 < 12 && d % 3 == 0 {
                86.0
            } else {
                97.0
            };
            lines.push(format!(
                r#"{{"device_id":"d{d}","ts":{},"hr":{hr},"spo2":{spo2}}}"#,
                T0 + i * 1000 + d * 7
            ));
        }
    }
    let run = |shards: usize| {
        let config = EngineConfig {
            shards,
            parse_workers: 2,
            ..EngineConfig::default()
        };
        let mut h = Harness::start(&config, rules(&text));
        let mut src = h.replay_source();
        send_lines(&mut src, &lines, 100);
        drop(src);
        let (m, alerts, _) = h.finish();
        (
            m.rules["hr_high"].matches,
            m.rules["spo2_low"].matches,
            alerts.len(),
        )
    };
    let one = run(1);
    assert!(one.0 > 0 && one.1 > 0, "{one:?}");
    assert_eq!(one, run(3));
    assert_eq!(one, run(8));
}

#[test]
fn swapping_rules_keeps_state_of_unchanged_rules() {
    let delayed = r#"
[[rule]]
id = "hr_delayed"
kind = "threshold"
priority = "medium"
message = "HR high for 10 s"
condition = "hr > 120"
for = "10s"
"#;
    let mut h = Harness::start(&config(), rules(delayed));
    let mut src = h.replay_source();
    let lines: Vec<String> = (0..6)
        .map(|i| reading("a", T0 + i * 1000, "hr", 150.0))
        .collect();
    send_lines(&mut src, &lines, 1);
    // Wait until those readings are evaluated, then add a rule beside the unchanged one.
    let deadline = std::time::Instant::now() + WAIT;
    while h.engine.metrics.snapshot().rules["hr_delayed"].matches < 6 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    h.engine.set_rules(rules(&format!("{delayed}\n{HR_RULE}")));
    let lines: Vec<String> = (6..12)
        .map(|i| reading("a", T0 + i * 1000, "hr", 150.0))
        .collect();
    send_lines(&mut src, &lines, 1);
    drop(src);
    let (m, alerts, _) = h.finish();
    // The delayed rule kept its pending state: it fires at T0+10s, not 10 s after the swap.
    let raised = alerts
        .iter()
        .find(|e| &*e.alert.rule_id == "hr_delayed" && e.event == Transition::Raised)
        .expect("delayed rule fired");
    assert_eq!(raised.alert.trigger.event_ts, T0 + 10_000);
    assert_eq!(
        m.rules["hr_high"].matches, 6,
        "the new rule sees only readings after the swap"
    );
}

#[test]
fn removing_a_rule_resolves_its_alerts() {
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let mut src = h.replay_source();
    send_lines(&mut src, &[reading("a", T0, "hr", 150.0)], 1);
    let deadline = std::time::Instant::now() + WAIT;
    while h.engine.book.active().is_empty() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    h.engine.set_rules(rules(SPO2_WINDOW));
    drop(src);
    let (_, alerts, _) = h.finish();
    assert_eq!(count(&alerts, "hr_high", Transition::Resolved), 1);
    assert_eq!(
        alerts.last().unwrap().alert.resolved_by.as_deref(),
        Some("rule removed")
    );
}

#[test]
fn idle_devices_have_their_windows_closed_and_state_evicted() {
    let config = EngineConfig {
        idle_timeout: Duration::from_millis(600),
        state_ttl: Duration::from_millis(1500),
        ..config()
    };
    let mut h = Harness::start(&config, rules(SPO2_WINDOW));
    let mut src = h.engine.source(ClockMode::Live);
    // Live readings: their window stays open until the device goes quiet.
    let now = now_millis();
    send_lines(&mut src, &[reading("quiet", now, "spo2", 80.0)], 1);
    let deadline = std::time::Instant::now() + WAIT;
    while h.engine.metrics.snapshot().rules["spo2_low"].matches == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle window never closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    while h.engine.metrics.snapshot().evicted == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle device never evicted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(src);
    let (m, alerts, _) = h.finish();
    assert_eq!(m.rules["spo2_low"].matches, 1);
    assert_eq!(count(&alerts, "spo2_low", Transition::Raised), 1);
}

#[test]
fn a_full_sink_pushes_back_and_nothing_is_dropped() {
    let config = EngineConfig {
        queue_batches: 1,
        ..config()
    };
    let mut h = Harness::with_slow_storage(&config, rules(HR_RULE), 1);
    let mut src = h.replay_source();
    let lines: Vec<String> = (0..2000)
        .map(|i| reading(&format!("d{}", i % 50), T0 + i, "hr", 80.0))
        .collect();
    let feeder = std::thread::spawn(move || {
        send_lines(&mut src, &lines, 10);
    });
    // Storage is not read: the feeder must block, not drop.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !feeder.is_finished(),
        "the source should be blocked by backpressure"
    );
    let mut stored = 0;
    while stored < 2000 {
        let batch = h
            .readings
            .recv_timeout(WAIT)
            .expect("readings keep flowing once drained");
        stored += batch.readings.len();
    }
    feeder.join().unwrap();
    let (m, _, rest) = h.finish();
    assert_eq!(stored + rest, 2000);
    assert_eq!(m.accepted, 2000);
}

#[test]
fn readings_from_the_future_are_rejected() {
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let mut src = h.replay_source();
    let lines = vec![
        reading("a", T0, "hr", 80.0),
        // An hour ahead of the recording's clock: a bad device clock.
        reading("b", T0 + 3_600_000, "hr", 150.0),
        reading("a", T0 + 1000, "hr", 80.0),
    ];
    send_lines(&mut src, &lines, 3);
    let mut live = h.engine.source(ClockMode::Live);
    let mut batch = live.batch();
    let ahead = now_millis() + 10 * 60_000;
    batch.push(
        reading("c", ahead, "hr", 80.0).as_bytes(),
        now_micros(),
        None,
    );
    assert!(live.send(batch));
    drop(src);
    drop(live);
    let rejects = h.rejects.clone();
    let (m, _, _) = h.finish();
    assert_eq!(m.accepted, 2);
    assert_eq!(m.rejected_by_reason["future_ts"], 2);
    assert_eq!(m.late, 0, "the bad clock did not make the others late");
    let dead: Vec<_> = rejects.try_iter().flat_map(|b| b.rejects).collect();
    assert_eq!(dead.len(), 2);
    // The two sources are parsed in parallel, so their rejects may come in either order.
    assert!(
        dead.iter().any(|r| r.payload == lines[1].as_bytes()),
        "original bytes kept"
    );
}

#[test]
fn bad_input_is_rejected_without_harming_good_data() {
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let mut src = h.replay_source();
    let mut lines = vec![
        "not json".to_string(),
        r#"{"device_id":"a","ts":1767225600000,"hr":"fast"}"#.to_string(),
        String::new(),
        r#"{"device_id":"../etc","ts":1767225600000,"hr":80}"#.to_string(),
    ];
    lines.push(reading("a", T0, "hr", 150.0));
    send_lines(&mut src, &lines, 5);
    drop(src);
    let rejects = h.rejects.clone();
    let (m, alerts, _) = h.finish();
    assert_eq!(m.accepted, 1);
    assert_eq!(m.rejected, 4);
    assert_eq!(m.rejected_by_reason["invalid_json"], 2);
    assert_eq!(m.rejected_by_reason["bad_type:hr"], 1);
    assert_eq!(m.rejected_by_reason["bad_device_id"], 1);
    assert_eq!(rejects.try_iter().flat_map(|b| b.rejects).count(), 4);
    assert_eq!(count(&alerts, "hr_high", Transition::Raised), 1);
}

#[test]
fn a_batch_is_acknowledged_only_once_every_piece_is_durable() {
    use vitalstream::ack::Ack;
    let mut h = Harness::start(&config(), rules(HR_RULE));
    let mut src = h.replay_source();
    let (acked_tx, acked) = crossbeam_channel::unbounded();
    // Two batches, each with readings for devices on both shards and one bad line.
    for b in 0..2i64 {
        let mut batch = src.batch();
        for d in 0..10 {
            let line = reading(&format!("d{d}"), T0 + b * 1000, "hr", 80.0);
            batch.push(line.as_bytes(), now_micros(), None);
        }
        batch.push(format!("junk-{b}").as_bytes(), now_micros(), None);
        let tx = acked_tx.clone();
        batch.ack = Some(Ack::new(move |durable| tx.send((b, durable)).unwrap()));
        assert!(src.send(batch));
    }
    // Collect the pieces the "storage" and "dead-letter output" (the test) now hold.
    let mut stored = Vec::new();
    while stored
        .iter()
        .map(|p: &vitalstream::engine::ReadingBatch| p.readings.len())
        .sum::<usize>()
        < 20
    {
        stored.push(
            h.readings
                .recv_timeout(WAIT)
                .expect("readings reach storage"),
        );
    }
    let mut dead = vec![
        h.rejects.recv_timeout(WAIT).unwrap(),
        h.rejects.recv_timeout(WAIT).unwrap(),
    ];
    assert!(
        acked.recv_timeout(Duration::from_millis(300)).is_err(),
        "nothing is acknowledged before storage and the dead-letter output are done"
    );
    let batch_of = |ts: i64| (ts - T0) / 1000;
    // Batch 0: every piece becomes durable → acknowledged.
    for piece in stored.extract_if(.., |p| batch_of(p.readings[0].ts) == 0) {
        piece.ack.unwrap().done();
    }
    let junk0 = dead
        .iter()
        .position(|p| p.rejects[0].payload == b"junk-0")
        .unwrap();
    dead.remove(junk0).ack.unwrap().done();
    assert_eq!(acked.recv_timeout(WAIT), Ok((0, true)));
    // Batch 1: its readings are stored, but writing its dead letter fails (the piece is
    // dropped undone) → the source must not acknowledge; the upstream will redeliver.
    for piece in stored {
        piece.ack.unwrap().done();
    }
    assert!(acked.recv_timeout(Duration::from_millis(200)).is_err());
    drop(dead);
    assert_eq!(acked.recv_timeout(WAIT), Ok((1, false)));
    drop(src);
    h.finish();
}
