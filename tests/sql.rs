//! SQL rules end to end: the example rules against their golden fixtures, r2 and r3 written
//! as SQL against the native rules and the independent reference, the same answers with 1
//! shard and with 8, and rules that must be refused or stopped while the engine runs on.

mod common;

use common::{Harness, count, rules, send_lines};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vitalstream::alerts::Transition;
use vitalstream::engine::EngineConfig;
use vitalstream::engine::sql::try_rule;
use vitalstream::model::{Id, Sample};
use vitalstream::parse::{ParseOptions, Parser};
use vitalstream::rules::sql::{Evaluator, Limits, Wards};
use vitalstream::rules::{RuleKind, load_pipeline};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn parse_ndjson(text: &str) -> Vec<Sample> {
    let options = ParseOptions {
        max_frame_bytes: 1 << 20,
        require_ts: true,
    };
    let mut parser = Parser::new(options, 0);
    (text.lines().enumerate())
        .map(|(n, line)| {
            (parser.parse(line.as_bytes(), None, 0))
                .unwrap_or_else(|e| panic!("fixture line {}: {e}", n + 1))
        })
        .collect()
}

/// Each rule of `pipelines/analyst.toml` over its fixture `tests/fixtures/sql/<id>.ndjson`
/// gives exactly the rows listed in `<id>.expected.json`, and every `sql/rules/*.sql` is
/// one of those rules.
#[test]
fn every_example_rule_matches_its_golden_fixture() {
    let set = load_pipeline(&root().join("pipelines/analyst.toml")).expect("valid pipeline");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let evaluator = Evaluator::new(Limits::default());
    let mut checked = BTreeSet::new();
    for rule in &set.rules {
        let RuleKind::Sql(sql) = &rule.kind else {
            panic!("{} is not a SQL rule", rule.id)
        };
        let dir = root().join("tests/fixtures/sql");
        let input = std::fs::read_to_string(dir.join(format!("{}.ndjson", rule.id)))
            .unwrap_or_else(|e| panic!("fixture for {}: {e}", rule.id));
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{}.expected.json", rule.id))).unwrap(),
        )
        .unwrap();
        let wards: Wards = (expected["wards"].as_object().into_iter().flatten())
            .flat_map(|(ward, devices)| {
                let devices = devices.as_array().unwrap().iter();
                devices.map(move |d| (Id::from(d.as_str().unwrap()), Id::from(ward.as_str())))
            })
            .collect();
        let windows = runtime
            .block_on(try_rule(&evaluator, sql, &parse_ndjson(&input), &wards))
            .unwrap_or_else(|e| panic!("{}: {e}", rule.id));
        // (window start, subject, value rounded to 0.1)
        let got: BTreeSet<(i64, String, i64)> = (windows.iter())
            .flat_map(|(start, _, rows)| {
                rows.iter().map(move |m| {
                    let value = m.value.map_or(i64::MIN, |v| (v * 10.0).round() as i64);
                    (*start, m.subject().unwrap().to_string(), value)
                })
            })
            .collect();
        let want: BTreeSet<(i64, String, i64)> = (expected["matches"].as_array().unwrap().iter())
            .map(|m| {
                let value = m["value"]
                    .as_f64()
                    .map_or(i64::MIN, |v| (v * 10.0).round() as i64);
                (
                    m["window_start"].as_i64().unwrap(),
                    m["subject"].as_str().unwrap().into(),
                    value,
                )
            })
            .collect();
        assert_eq!(got, want, "rule {}", rule.id);
        assert!(
            !want.is_empty(),
            "{}: a fixture that matches nothing proves little",
            rule.id
        );
        checked.insert(rule.spec.id.clone());
    }
    // Every example statement is covered by a rule of the pipeline, hence by a fixture.
    let text_of: BTreeSet<String> = (set.rules.iter())
        .filter_map(|r| r.spec.sql.clone())
        .collect();
    for file in std::fs::read_dir(root().join("sql/rules")).unwrap() {
        let path = file.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text_of.contains(&text),
            "{} has no rule and fixture",
            path.display()
        );
    }
    assert_eq!(checked.len(), 4);
}

/// `vitalstream replay` with a pipeline and engine settings; the report.
fn replay(input: &Path, pipeline: &str, engine: &str, alerts: Option<&Path>) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[engine]\n{engine}\n")).unwrap();
    let mut args = vec!["--pipeline", pipeline, "--config", config.to_str().unwrap()];
    if let Some(alerts) = alerts {
        args.extend(["--alerts", alerts.to_str().unwrap()]);
    }
    common::reference::replay(input, &args)
}

/// The raised alerts in an alerts file: (rule, subject, window end).
fn raised(alerts: &Path) -> BTreeSet<(String, String, i64)> {
    (std::fs::read_to_string(alerts).unwrap().lines())
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == "raised")
        .map(|a| {
            let end = a["event_ts"].as_i64().unwrap();
            (
                a["rule_id"].as_str().unwrap().into(),
                a["subject"].as_str().unwrap().into(),
                end,
            )
        })
        .collect()
}

#[test]
fn r2_and_r3_as_sql_match_the_native_rules_and_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let recording = dir.path().join("rec.ndjson");
    // Out of order by up to 8 s, past the 5 s allowed lateness: late readings are left out
    // of SQL windows exactly as they are of native ones.
    common::reference::recording(&recording, 300, 180, 21, 8000);
    let reference = common::reference::counts(&recording);

    let native = replay(&recording, "pipelines/reference.toml", "shards = 2", None);
    for shards in [1, 4] {
        let alerts = dir.path().join(format!("alerts-{shards}.ndjson"));
        let sql = replay(
            &recording,
            "pipelines/reference-sql.toml",
            &format!("shards = {shards}"),
            Some(&alerts),
        );
        for rule in ["r1_hr_abnormal", "r2_spo2_low_10s", "r3_fever_60s"] {
            let matches = &sql["rules"][rule]["matches"];
            assert!(matches.as_u64().unwrap() > 0, "{rule} matched nothing");
            assert_eq!(
                *matches, native["rules"][rule]["matches"],
                "{rule}, {shards} shards: SQL vs native"
            );
            assert_eq!(
                *matches, reference["rules"][rule]["matches"],
                "{rule}, {shards} shards: SQL vs reference"
            );
            for edges in ["alerts_raised", "alerts_resolved"] {
                assert_eq!(
                    sql["rules"][rule][edges], native["rules"][rule][edges],
                    "{rule} {edges}"
                );
            }
        }
        assert!(count_raised(&alerts, "r2_spo2_low_10s") > 0);
    }
    assert_eq!(
        raised(&dir.path().join("alerts-1.ndjson")),
        raised(&dir.path().join("alerts-4.ndjson")),
        "the same alerts with 1 shard and 4"
    );
}

fn count_raised(alerts: &Path, rule: &str) -> usize {
    raised(alerts).iter().filter(|(r, _, _)| r == rule).count()
}

const T0: i64 = 1_767_225_600_000;

/// Four wards of six beds, ten minutes at 1 Hz, SpO2 97 but for three episodes, each one
/// whole minute: ward `a` has 3 patients at 85 % in minute 2 (an alarm), ward `b` only 2
/// in minute 4 (none), ward `c` 4 in minute 6 (an alarm). Readings are shuffled within 3 s
/// so each shard count sees its own interleaving.
fn ward_recording() -> (String, String) {
    let mut lines = Vec::new();
    let episodes: [(&str, i64, usize); 3] = [("a", 2, 3), ("b", 4, 2), ("c", 6, 4)];
    for s in 0..600 {
        for ward in ["a", "b", "c", "d"] {
            for bed in 0..6 {
                let low = episodes
                    .iter()
                    .any(|&(w, minute, n)| w == ward && s / 60 == minute && bed < n);
                let spo2 = if low { 85 } else { 97 };
                lines.push((
                    T0 + s * 1000 + fastrand::i64(0..3000),
                    format!(
                        r#"{{"device_id":"bed-{ward}{bed}","patient_id":"pat-{ward}{bed}","ts":{},"spo2":{spo2},"hr":72}}"#,
                        T0 + s * 1000 + bed as i64 * 10
                    ),
                ));
            }
        }
    }
    lines.sort();
    let text: String = lines.into_iter().map(|(_, l)| l + "\n").collect();
    let wards = (["a", "b", "c", "d"].iter())
        .map(|w| {
            format!(
                "{w} = [{}]",
                (0..6)
                    .map(|b| format!("\"bed-{w}{b}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    (text, wards)
}

#[test]
fn a_ward_rule_raises_the_same_alerts_with_one_shard_and_eight() {
    fastrand::seed(7);
    let dir = tempfile::tempdir().unwrap();
    let (text, wards) = ward_recording();
    let recording = dir.path().join("wards.ndjson");
    std::fs::write(&recording, text).unwrap();
    let mut seen = BTreeMap::new();
    for shards in [1, 8] {
        let alerts = dir.path().join(format!("alerts-{shards}.ndjson"));
        let engine = format!("shards = {shards}\n[engine.wards]\n{wards}");
        let report = replay(&recording, "pipelines/analyst.toml", &engine, Some(&alerts));
        assert_eq!(report["late"], 0);
        // 3 patients in ward a's minute and 4 in ward c's; ward b's 2 are not enough.
        assert_eq!(
            report["rules"]["ward_desaturation"]["matches"], 7,
            "{shards} shards"
        );
        let ward: BTreeSet<_> = (raised(&alerts).into_iter())
            .filter(|(rule, _, _)| rule == "ward_desaturation")
            .map(|(_, subject, end)| (subject, end))
            .collect();
        let minute = |m: i64| T0 + (m + 1) * 60_000;
        let want: BTreeSet<_> = (0..3)
            .map(|b| (format!("pat-a{b}"), minute(2)))
            .chain((0..4).map(|b| (format!("pat-c{b}"), minute(6))))
            .collect();
        assert_eq!(ward, want, "{shards} shards");
        seen.insert(shards, raised(&alerts));
    }
    assert_eq!(seen[&1], seen[&8], "every rule's alerts, 1 shard vs 8");
}

/// Beside `hr_high`: a statement that would run for ever, and a sound one.
const RUNAWAY: &str = r#"
[[rule]]
id = "runaway"
kind = "sql"
priority = "low"
message = "never finishes"
window = "10s"
sql = """
SELECT a.device_id FROM vitals a, vitals b, vitals c, vitals d
WHERE a.hr + b.hr + c.hr + d.hr < 0
"""

[[rule]]
id = "hr_avg_sql"
kind = "sql"
priority = "medium"
message = "average HR over 100 in 10 s"
window = "10s"
sql = "SELECT device_id, avg(hr) AS value FROM vitals GROUP BY device_id HAVING avg(hr) > 100"
"#;

/// A rule that would run for ever is stopped at its time limit, reported and disabled;
/// the native rule and the other SQL rule keep working and every reading is accepted.
#[test]
fn a_runaway_rule_is_stopped_and_disabled_while_the_engine_runs_on() {
    common::logs();
    let config = EngineConfig {
        sql_timeout: Duration::from_millis(500),
        ..common::config()
    };
    let mut h = Harness::start(&config, rules(&format!("{}{RUNAWAY}", common::HR_RULE)));
    let mut source = h.replay_source();
    // 100 devices for 60 s; bed-7 runs at 130 bpm.
    let lines: Vec<String> = (0..60)
        .flat_map(|s| {
            (0..100).map(move |d| {
                let hr = if d == 7 { 130.0 } else { 70.0 };
                common::reading(&format!("bed-{d}"), T0 + s * 1000, "hr", hr)
            })
        })
        .collect();
    send_lines(&mut source, &lines, 500);
    drop(source);
    let sql = h.engine.sql.clone();
    let (snap, events, _) = h.finish();
    assert_eq!(snap.accepted, 6000);
    let disabled = sql
        .disabled
        .get("runaway")
        .expect("the runaway rule is disabled");
    assert!(
        disabled.message.contains("longer than its limit"),
        "{}",
        disabled.message
    );
    assert!(sql.disabled.get("hr_avg_sql").is_none());
    assert_eq!(count(&events, "hr_high", Transition::Raised), 1);
    assert_eq!(count(&events, "hr_avg_sql", Transition::Raised), 1);
    // Six 10 s windows, each with bed-7 averaging 130.
    assert_eq!(snap.rules["hr_avg_sql"].matches, 6);
    assert_eq!(count(&events, "runaway", Transition::Raised), 0);
}

/// Beside `hr_high`: a rule whose `repeat` count comes from the data (nothing to refuse
/// when it is validated) and would make gigabytes, and a sound one.
const OUTGROWN: &str = r#"
[[rule]]
id = "outgrown"
kind = "sql"
priority = "low"
message = "makes a string of gigabytes"
window = "10s"
sql = "SELECT device_id, length(repeat(device_id, CAST(hr AS BIGINT) * 100000000)) AS value FROM vitals"

[[rule]]
id = "hr_avg_sql"
kind = "sql"
priority = "medium"
message = "average HR over 100 in 10 s"
window = "10s"
sql = "SELECT device_id, avg(hr) AS value FROM vitals GROUP BY device_id HAVING avg(hr) > 100"
"#;

/// 100 devices for 60 s; bed-7 runs at 130 bpm.
fn hr_minute() -> Vec<String> {
    (0..60)
        .flat_map(|s| {
            (0..100).map(move |d| {
                let hr = if d == 7 { 130.0 } else { 70.0 };
                common::reading(&format!("bed-{d}"), T0 + s * 1000, "hr", hr)
            })
        })
        .collect()
}

/// A function result past its bound fails the evaluation (it used to abort the process on
/// a failed allocation at the first window close): the rule is disabled and says why, and
/// the engine and the other rules run on.
#[test]
fn a_rule_whose_function_outgrows_its_bound_is_disabled_while_the_engine_runs_on() {
    let mut h = Harness::start(
        &common::config(),
        rules(&format!("{}{OUTGROWN}", common::HR_RULE)),
    );
    let mut source = h.replay_source();
    send_lines(&mut source, &hr_minute(), 500);
    drop(source);
    let sql = h.engine.sql.clone();
    let (snap, events, _) = h.finish();
    assert_eq!(snap.accepted, 6000);
    let disabled = sql.disabled.get("outgrown").expect("the rule is disabled");
    assert!(
        disabled.message.contains("repeat() could produce")
            && disabled
                .message
                .contains("over the limit of 16777216 bytes"),
        "{}",
        disabled.message
    );
    assert!(sql.disabled.get("hr_avg_sql").is_none());
    assert_eq!(count(&events, "hr_high", Transition::Raised), 1);
    assert_eq!(snap.rules["hr_avg_sql"].matches, 6);
}

/// A definition that failed before a restart (recorded in PostgreSQL and handed over as
/// `RuleSet::failed`) starts disabled, with why: it never runs into the same failure again,
/// and the engine and the other rules run on.
#[test]
fn a_rule_that_failed_before_a_restart_starts_disabled() {
    let mut set = rules(&format!("{}{OUTGROWN}", common::HR_RULE));
    set.failed
        .insert("outgrown".into(), "repeat() could produce too much".into());
    let mut h = Harness::start(&common::config(), set);
    let mut source = h.replay_source();
    send_lines(&mut source, &hr_minute(), 500);
    drop(source);
    let sql = h.engine.sql.clone();
    let (snap, events, _) = h.finish();
    let disabled = sql.disabled.get("outgrown").expect("loaded disabled");
    assert!(
        disabled
            .message
            .contains("failed before a restart: repeat()"),
        "{}",
        disabled.message
    );
    assert_eq!(snap.rules["outgrown"].matches, 0, "never evaluated");
    assert_eq!(count(&events, "hr_high", Transition::Raised), 1);
}

/// A rule that spends more engine time than its budget per minute of readings is disabled
/// with the reason; the native rule runs on.
#[test]
fn a_rule_over_its_engine_time_budget_is_disabled_with_the_reason() {
    let config = EngineConfig {
        // Less than any evaluation takes.
        sql_rule_budget: Duration::from_micros(1),
        ..common::config()
    };
    let mut h = Harness::start(
        &config,
        rules(&format!(
            "{}{}",
            common::HR_RULE,
            &OUTGROWN[OUTGROWN.find("[[rule]]\nid = \"hr_avg_sql\"").unwrap()..]
        )),
    );
    let mut source = h.replay_source();
    send_lines(&mut source, &hr_minute(), 500);
    drop(source);
    let sql = h.engine.sql.clone();
    let (snap, events, _) = h.finish();
    let disabled = sql
        .disabled
        .get("hr_avg_sql")
        .expect("the rule is disabled");
    assert!(
        disabled
            .message
            .contains("over its budget of 1µs (engine.sql_rule_budget)"),
        "{}",
        disabled.message
    );
    // Its first window ran (and raised); none after it did.
    assert_eq!(snap.rules["hr_avg_sql"].matches, 1);
    assert_eq!(count(&events, "hr_avg_sql", Transition::Raised), 1);
    assert_eq!(count(&events, "hr_avg_sql", Transition::Resolved), 1);
    assert_eq!(count(&events, "hr_high", Transition::Raised), 1);
}
