//! `vitalstream replay` and `vitalstream check` as a user runs them, against recordings whose
//! counts come from an independent reference implementation (tests/reference/).

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

use common::reference::vitalstream;

fn replay_with(input: &Path, args: &[&str]) -> Value {
    common::reference::replay(input, args)
}

fn replay(input: &Path) -> Value {
    replay_with(input, &["--pipeline", "pipelines/reference.toml"])
}

/// The fields an independent implementation must agree on exactly.
fn assert_same_counts(ours: &Value, reference: &Value) {
    for key in [
        "lines",
        "accepted",
        "rejected",
        "late",
        "duplicates",
        "rejected_by_reason",
    ] {
        assert_eq!(
            ours[key], reference[key],
            "`{key}` differs\nours: {ours:#}\nreference: {reference:#}"
        );
    }
    for rule in ["r1_hr_abnormal", "r2_spo2_low_10s", "r3_fever_60s"] {
        assert_eq!(
            ours["rules"][rule]["matches"], reference["rules"][rule]["matches"],
            "matches of {rule} differ"
        );
    }
}

#[test]
fn the_checked_in_fixture_gives_the_reference_counts() {
    let report = replay(&root().join("tests/fixtures/small.ndjson"));
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/small.expected.json")).unwrap(),
    )
    .unwrap();
    assert_same_counts(&report, &expected);
    assert!(
        report["rules"]["r1_hr_abnormal"]["alerts_raised"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(report["elapsed_s"].as_f64().unwrap() > 0.0);
    assert!(report["readings_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn fresh_recordings_match_the_reference_implementation() {
    let dir = tempfile::tempdir().unwrap();
    // The second recording is out of order by up to 8 s, past the 5 s allowed lateness, so
    // late readings are exercised too.
    for (seed, disorder_ms) in [(11, 2000), (12, 8000)] {
        let recording = dir.path().join(format!("rec-{seed}.ndjson"));
        common::reference::recording(&recording, 300, 120, seed, disorder_ms);
        let reference = common::reference::counts(&recording);
        if disorder_ms == 8000 {
            assert!(
                reference["late"].as_u64().unwrap() > 0,
                "the disordered recording has late readings"
            );
        }
        assert_same_counts(&replay(&recording), &reference);
    }
}

#[test]
fn rejects_are_written_with_their_original_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ndjson");
    let rejects = dir.path().join("rejects.ndjson");
    std::fs::write(
        &input,
        b"{\"device_id\":\"a\",\"ts\":1767225600000,\"hr\":80}\n{\"device_id\":\"a\",\"hr\":\"x\",\"ts\":1}\n\xff\xfe\n",
    )
    .unwrap();
    let report = replay_with(
        &input,
        &[
            "--pipeline",
            "builtin:reference",
            "--rejects",
            rejects.to_str().unwrap(),
        ],
    );
    assert_eq!(report["accepted"], 1);
    assert_eq!(report["rejected"], 2);
    let text = std::fs::read_to_string(&rejects).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let by_reason = |r: &str| {
        lines
            .iter()
            .find(|l| l["reason"] == r)
            .unwrap_or_else(|| panic!("{r} in {text}"))
    };
    assert_eq!(
        by_reason("bad_type:hr")["payload"],
        r#"{"device_id":"a","hr":"x","ts":1}"#
    );
    assert_eq!(by_reason("invalid_json")["payload_hex"], "fffe");
}

#[test]
fn check_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nid='a'\nkind='threshold'\npriority='high'\nmessage='m'\ncondition='pulse > 1'\n\
         [[rule]]\nid='b'\nkind='window'\npriority='low'\nmessage='m'\ncondition='avg(hr) > 1'\n",
    )
    .unwrap();
    let out = vitalstream(&["check", "--pipeline", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
    assert!(stderr.contains("unknown name `pulse`"), "{stderr}");
    assert!(stderr.contains("`window` is required"), "{stderr}");

    // SQL rules: the planner's message with its place; what is not a SELECT over vitals; a
    // statement file that is not there.
    std::fs::write(
        &bad,
        "[[rule]]\nid='typo'\nkind='sql'\npriority='low'\nmessage='m'\nwindow='10s'\n\
         sql='''SELECT device_id,\n  avg(sp02) AS value FROM vitals GROUP BY device_id'''\n\
         [[rule]]\nid='file'\nkind='sql'\npriority='low'\nmessage='m'\nwindow='10s'\n\
         sql=\"SELECT device_id FROM '/etc/passwd'\"\n\
         [[rule]]\nid='missing'\nkind='sql'\npriority='low'\nmessage='m'\nwindow='10s'\n\
         sql_file='nope.sql'\n",
    )
    .unwrap();
    let out = vitalstream(&["check", "--pipeline", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 problem(s)") && stderr.contains("nope.sql"),
        "{stderr}"
    );
    std::fs::write(
        &bad,
        std::fs::read_to_string(&bad)
            .unwrap()
            .replace("sql_file='nope.sql'", "sql='DROP TABLE vitals'"),
    )
    .unwrap();
    let out = vitalstream(&["check", "--pipeline", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
    assert!(
        stderr.contains("No field named sp02") && stderr.contains("(line 2, column 7)"),
        "{stderr}"
    );
    assert!(stderr.contains("/etc/passwd' not found"), "{stderr}");
    assert!(stderr.contains("only a SELECT over `vitals`"), "{stderr}");

    for good in ["pipelines/icu.toml", "pipelines/analyst.toml"] {
        let out = vitalstream(&["check", "--pipeline", good]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn speed_paces_the_replay_at_a_multiple_of_event_time() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("paced.ndjson");
    let t0 = 1_767_225_600_000i64;
    let lines: String = (0..4)
        .map(|i| {
            format!(
                "{{\"device_id\":\"a\",\"ts\":{},\"hr\":80}}\n",
                t0 + i * 1000
            )
        })
        .collect();
    std::fs::write(&input, lines).unwrap();
    let started = std::time::Instant::now();
    let report = replay_with(
        &input,
        &["--pipeline", "builtin:reference", "--speed", "10"],
    );
    // 3 s of event time at 10× takes at least 0.3 s; as fast as possible it takes far less.
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(report["accepted"], 4);
}
