//! Rules: what the shards evaluate, one file per rule kind.
//!
//! A [`RuleSet`] is an immutable value. The engine holds it in an `ArcSwap`; replacing it
//! is atomic, shards pick up the new set at their next batch, and rules whose definition did
//! not change keep their state.
//!
//! Pipeline files (`pipelines/*.toml`) hold a list of `[[rule]]` tables; see the README.

pub mod expr;
pub mod sql;
pub mod threshold;
pub mod window;

use crate::model::{Millis, Vital};
use expr::{Expr, Operand};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Alarm priority, after IEC 60601-1-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    Medium,
    High,
}

impl Priority {
    /// The name in pipelines and outputs.
    pub const fn name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
        }
    }
}

/// A rule as written in a pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Stable identifier: `^[a-z0-9_]{1,64}$`.
    pub id: String,
    /// `threshold`, `window` or `sql`.
    pub kind: RuleKindName,
    pub priority: Priority,
    /// Shown to clinicians with the alert.
    pub message: String,
    /// The alarm condition. Threshold: on the reading's vital (`hr > 120 or hr < 40`);
    /// window: on aggregates of one vital (`avg(spo2) < 90`). SQL rules have `sql` instead.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub condition: String,
    /// When the alarm clears; by default when the condition no longer holds. A clear
    /// condition stricter than `not condition` gives hysteresis.
    #[serde(default)]
    pub clear: Option<String>,
    /// Threshold only: the condition must hold this long (event time) before the alarm fires.
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub for_duration: Option<Duration>,
    /// Window only: window length, aligned to the epoch.
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    /// Window only: how far consecutive windows advance; equal to `window` (tumbling) by default.
    #[serde(default, with = "humantime_serde")]
    pub slide: Option<Duration>,
    /// SQL only: the SELECT run over the window's readings (table `vitals`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// SQL only, in pipeline files: the statement's file in `sql/rules/` beside the
    /// pipeline's directory, read when the pipeline loads (then held as `sql`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_file: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKindName {
    Threshold,
    Window,
    Sql,
}

/// A validated, ready-to-run rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: Arc<str>,
    pub priority: Priority,
    pub message: Arc<str>,
    pub kind: RuleKind,
    pub spec: RuleSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    Threshold(threshold::ThresholdRule),
    Window(window::WindowRule),
    /// Evaluated centrally over every device's readings, not by the shards.
    Sql(sql::SqlRule),
}

impl Rule {
    /// The one vital a shard's rule reads; SQL rules read the whole window, so none.
    pub fn vital(&self) -> Option<Vital> {
        match &self.kind {
            RuleKind::Threshold(t) => Some(t.vital),
            RuleKind::Window(w) => Some(w.vital),
            RuleKind::Sql(_) => None,
        }
    }
}

/// The rules in force, swapped as a whole.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub rules: Vec<Arc<Rule>>,
    /// Rule id → why its definition failed before a restart: the engine starts it disabled.
    pub failed: std::collections::HashMap<String, String>,
}

impl RuleSet {
    pub fn get(&self, id: &str) -> Option<&Arc<Rule>> {
        self.rules.iter().find(|r| &*r.id == id)
    }

    /// The longest stretch of event time any rule looks back over (a window's size, a
    /// threshold's `for`): how much history rebuilds a device's state.
    pub fn memory(&self) -> std::time::Duration {
        let longest = (self.rules.iter())
            .map(|r| match &r.kind {
                RuleKind::Threshold(t) => t.for_ms,
                RuleKind::Window(w) => w.size,
                RuleKind::Sql(s) => s.size,
            })
            .max()
            .unwrap_or(0);
        std::time::Duration::from_millis(longest.max(0) as u64)
    }
}

impl RuleSet {
    /// The rules the shards evaluate, per device.
    pub fn native(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.rules
            .iter()
            .filter(|r| !matches!(r.kind, RuleKind::Sql(_)))
    }

    /// The SQL rules, evaluated centrally.
    pub fn sql(&self) -> impl Iterator<Item = (&Arc<Rule>, &sql::SqlRule)> {
        self.rules.iter().filter_map(|r| match &r.kind {
            RuleKind::Sql(s) => Some((r, s)),
            _ => None,
        })
    }
}

/// A pipeline file: `[[rule]]` tables.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// What the pipeline is for.
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
}

/// Every problem found in a pipeline, reported together.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct PipelineError {
    pub problems: Vec<String>,
}

fn to_millis(d: Duration) -> Millis {
    d.as_millis().min(i64::MAX as u128) as Millis
}

fn valid_rule_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Validates one rule spec; pushes every problem it finds.
pub fn compile_rule(spec: &RuleSpec, problems: &mut Vec<String>) -> Option<Rule> {
    let before = problems.len();
    let id = &spec.id;
    let mut problem = |msg: String| problems.push(format!("rule `{id}`: {msg}"));
    if !valid_rule_id(id) {
        problem("id must be 1-64 characters of a-z, 0-9 and _".into());
    }
    if spec.message.trim().is_empty() {
        problem("message must not be empty".into());
    }
    if spec.kind == RuleKindName::Sql {
        let sql = compile_sql(spec, &mut problem);
        return (problems.len() == before).then(|| Rule {
            id: Arc::from(spec.id.as_str()),
            priority: spec.priority,
            message: Arc::from(spec.message.as_str()),
            kind: RuleKind::Sql(sql),
            spec: spec.clone(),
        });
    }
    if spec.sql.is_some() || spec.sql_file.is_some() {
        problem("`sql` and `sql_file` belong to SQL rules (kind = \"sql\")".into());
    }
    let mut parse = |what: &str, src: &str| match expr::parse(src) {
        Ok(e) => Some(e),
        Err(e) => {
            problem(format!("{what} `{src}`: {e}"));
            None
        }
    };
    let condition = parse("condition", &spec.condition);
    let clear = spec.clear.as_deref().and_then(|c| parse("clear", c));
    let mut problem = |msg: String| problems.push(format!("rule `{id}`: {msg}"));
    let (Some(condition), clear_ok) = (condition, spec.clear.is_none() || clear.is_some()) else {
        return None;
    };
    if !clear_ok {
        return None;
    }
    let operands: Vec<Operand> = condition
        .operands()
        .into_iter()
        .chain(clear.iter().flat_map(Expr::operands))
        .collect();
    let vital = operands[0].vital();
    if operands.iter().any(|o| o.vital() != vital) {
        problem("condition and clear must read one vital".into());
    }
    let kind = match spec.kind {
        RuleKindName::Threshold => {
            if operands.iter().any(|o| matches!(o, Operand::Agg(..))) {
                problem("a threshold rule compares the reading's vital, not aggregates (use kind = \"window\")".into());
            }
            if spec.window.is_some() || spec.slide.is_some() {
                problem("`window` and `slide` belong to window rules".into());
            }
            RuleKind::Threshold(threshold::ThresholdRule {
                vital,
                condition,
                clear,
                for_ms: spec.for_duration.map_or(0, to_millis),
            })
        }
        RuleKindName::Window => {
            if operands.iter().any(|o| matches!(o, Operand::Vital(_))) {
                problem(
                    "a window rule compares aggregates such as avg(spo2), not a bare vital".into(),
                );
            }
            if spec.for_duration.is_some() {
                problem(
                    "`for` belongs to threshold rules; a window rule already spans time".into(),
                );
            }
            let (size, slide) = window_of(spec, &mut problem);
            RuleKind::Window(window::WindowRule {
                vital,
                condition,
                clear,
                size,
                slide,
            })
        }
        RuleKindName::Sql => unreachable!("SQL rules were compiled above"),
    };
    (problems.len() == before).then(|| Rule {
        id: Arc::from(spec.id.as_str()),
        priority: spec.priority,
        message: Arc::from(spec.message.as_str()),
        kind,
        spec: spec.clone(),
    })
}

/// A window rule's size and slide (ms), checked.
fn window_of(spec: &RuleSpec, problem: &mut impl FnMut(String)) -> (Millis, Millis) {
    let size = spec.window.map(to_millis).unwrap_or(0);
    let slide = spec.slide.map(to_millis).unwrap_or(size);
    if size <= 0 {
        problem("`window` is required and must be at least 1ms".into());
    } else if slide <= 0 || slide > size || size % slide != 0 {
        problem("`slide` must be positive, at most `window`, and divide it evenly".into());
    } else if size / slide > 1000 {
        problem("`window` / `slide` must be at most 1000".into());
    }
    (size, slide)
}

fn compile_sql(spec: &RuleSpec, problem: &mut impl FnMut(String)) -> sql::SqlRule {
    if !spec.condition.is_empty() || spec.clear.is_some() || spec.for_duration.is_some() {
        problem(
            "a SQL rule has `sql`, not `condition`, `clear` or `for`: its rows are its matches"
                .into(),
        );
    }
    let (size, slide) = window_of(spec, problem);
    for p in sql::policy().problems(size, slide) {
        problem(p);
    }
    let text = match (&spec.sql, &spec.sql_file) {
        (Some(text), _) => text.as_str(),
        (None, Some(file)) => {
            problem(format!(
                "`sql_file` {file:?} is read only when a pipeline file loads; send the SQL itself as `sql`"
            ));
            ""
        }
        (None, None) => {
            problem("`sql` is required: a SELECT over `vitals`".into());
            ""
        }
    };
    if !text.is_empty()
        && let Err(e) = sql::validate(text)
    {
        problem(format!("sql: {e}"));
    }
    sql::SqlRule {
        sql: Arc::from(text),
        size,
        slide,
    }
}

/// Validates a list of rule specs into a rule set, or every problem found.
pub fn compile(specs: &[RuleSpec]) -> Result<RuleSet, PipelineError> {
    let mut problems = Vec::new();
    let sql_rules = (specs.iter())
        .filter(|s| s.kind == RuleKindName::Sql)
        .count();
    if sql_rules > sql::max_rules() {
        // Refused before any is planned: validating each costs time too.
        problems.push(format!(
            "{sql_rules} SQL rules, over the limit of {} for one rule set",
            sql::max_rules()
        ));
        return Err(PipelineError { problems });
    }
    let mut rules = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.id == spec.id) {
            problems.push(format!("rule `{}`: id used more than once", spec.id));
        }
        if let Some(rule) = compile_rule(spec, &mut problems) {
            rules.push(Arc::new(rule));
        }
    }
    if problems.is_empty() {
        Ok(RuleSet {
            rules,
            failed: Default::default(),
        })
    } else {
        Err(PipelineError { problems })
    }
}

/// Parses and validates pipeline text.
pub fn parse_pipeline(text: &str) -> Result<RuleSet, PipelineError> {
    let file: PipelineFile = toml::from_str(text).map_err(|e| PipelineError {
        problems: vec![e.to_string()],
    })?;
    compile_file(file)
}

fn compile_file(file: PipelineFile) -> Result<RuleSet, PipelineError> {
    if file.rules.is_empty() {
        return Err(PipelineError {
            problems: vec!["the pipeline has no [[rule]]".into()],
        });
    }
    compile(&file.rules)
}

/// Reads each rule's `sql_file` into its `sql`: a plain file name in `sql/rules/` beside
/// the pipeline's directory (`pipelines/x.toml` reads `sql/rules/…`).
fn read_sql_files(file: &mut PipelineFile, pipeline: &Path) -> Result<(), PipelineError> {
    let dir = pipeline
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .join("sql/rules");
    let mut problems = Vec::new();
    for spec in &mut file.rules {
        let Some(name) = spec.sql_file.take() else {
            continue;
        };
        let plain = !name.contains(['/', '\\']) && name.ends_with(".sql") && !name.starts_with('.');
        if !plain {
            problems.push(format!(
                "rule `{}`: `sql_file` must be a file name ending in .sql in {}, not {name:?}",
                spec.id,
                dir.display()
            ));
        } else if spec.sql.is_some() {
            problems.push(format!(
                "rule `{}`: give `sql` or `sql_file`, not both",
                spec.id
            ));
        } else {
            match std::fs::read_to_string(dir.join(&name)) {
                Ok(text) => spec.sql = Some(text),
                Err(e) => problems.push(format!(
                    "rule `{}`: {}: {e}",
                    spec.id,
                    dir.join(&name).display()
                )),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PipelineError { problems })
    }
}

/// Loads and validates a pipeline file.
pub fn load_pipeline(path: &Path) -> Result<RuleSet, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError {
        problems: vec![format!("{}: {e}", path.display())],
    })?;
    let file = toml::from_str(&text)
        .map_err(|e| PipelineError {
            problems: vec![e.to_string()],
        })
        .and_then(|mut file: PipelineFile| {
            read_sql_files(&mut file, path)?;
            compile_file(file)
        });
    file.map_err(|mut e| {
        for p in &mut e.problems {
            *p = format!("{}: {p}", path.display());
        }
        e
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_at_once() {
        let text = r#"
            [[rule]]
            id = "Bad Id"
            kind = "threshold"
            priority = "high"
            message = ""
            condition = "hr > 120"

            [[rule]]
            id = "w"
            kind = "window"
            priority = "low"
            message = "m"
            condition = "avg(spo2) < 90 or hr > 3"
            window = "10s"
            slide = "3s"

            [[rule]]
            id = "w"
            kind = "threshold"
            priority = "medium"
            message = "m"
            condition = "hr >> 1"
        "#;
        let err = parse_pipeline(text).unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("`Bad Id`: id must be"), "{all}");
        assert!(all.contains("message must not be empty"), "{all}");
        assert!(all.contains("one vital"), "{all}");
        assert!(all.contains("`slide` must"), "{all}");
        assert!(all.contains("id used more than once"), "{all}");
        assert!(all.contains("at position 4"), "{all}");
        assert_eq!(err.problems.len(), 7, "{all}");
    }

    #[test]
    fn sql_rules_past_their_limit_are_refused() {
        let rule = |i: usize| {
            format!(
                "[[rule]]\nid='s{i}'\nkind='sql'\npriority='high'\nmessage='m'\nwindow='10s'\n\
                 sql=\"SELECT device_id FROM vitals WHERE hr > {i}\"\n"
            )
        };
        let text: String = (0..sql::DEFAULT_MAX_RULES + 1).map(rule).collect();
        let err = parse_pipeline(&text).unwrap_err();
        assert!(
            err.problems[0].contains("33 SQL rules, over the limit of 32"),
            "{err}"
        );
        let text: String = (0..sql::DEFAULT_MAX_RULES).map(rule).collect();
        parse_pipeline(&text).unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = parse_pipeline(
            "[[rule]]\nid='a'\nkind='threshold'\npriority='high'\nmessage='m'\ncondition='hr>1'\nthreshold=5\n",
        )
        .unwrap_err();
        assert!(err.problems[0].contains("unknown field"), "{err}");
    }

    #[test]
    fn shipped_pipelines_are_valid() {
        for name in ["reference", "icu", "reference-sql", "analyst"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("pipelines/{name}.toml"));
            let set = load_pipeline(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!set.rules.is_empty());
        }
        let reference =
            load_pipeline(&Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/reference.toml"))
                .unwrap();
        let ids: Vec<&str> = reference.rules.iter().map(|r| &*r.id).collect();
        assert_eq!(ids, ["r1_hr_abnormal", "r2_spo2_low_10s", "r3_fever_60s"]);
    }

    #[test]
    fn sql_windows_are_bounded_and_slide_at_least_a_second() {
        let rule = |window: &str, slide: &str| {
            format!(
                "[[rule]]\nid = 'q'\nkind = 'sql'\npriority = 'low'\nmessage = 'm'\n\
                 window = '{window}'\nslide = '{slide}'\nsql = 'SELECT device_id FROM vitals'\n"
            )
        };
        let all = |text: String| parse_pipeline(&text).unwrap_err().problems.join("\n");
        let e = all(rule("1000days", "1000days"));
        assert!(
            e.contains("at most 1h for a SQL rule (engine.sql_max_window)"),
            "{e}"
        );
        let e = all(rule("10s", "10ms"));
        assert!(
            e.contains("at least 1s for a SQL rule (engine.sql_min_slide)"),
            "{e}"
        );
        let e = all(rule("500ms", "500ms"));
        assert!(e.contains("engine.sql_min_slide"), "{e}");
        parse_pipeline(&rule("1h", "10s")).unwrap();
        // Native window rules keep per-device aggregates, not readings: not bounded so.
        parse_pipeline(
            "[[rule]]\nid = 'w'\nkind = 'window'\npriority = 'low'\nmessage = 'm'\n\
             condition = 'avg(hr) > 1'\nwindow = '2h'\nslide = '10s'\n",
        )
        .unwrap();
    }
}
