//! SQL rules: a SELECT an analyst writes, run by DataFusion at each window close over the
//! window's readings, the table `vitals`. Every row it returns is a match. The contract
//! (columns, what a row means, limits) is in the README's "SQL rules".
//!
//! A statement is accepted only if it is one query whose every table is `vitals`: no DDL,
//! DML, COPY, `SET`, recursive CTEs, table functions or other tables, so nothing reads a file
//! or the network. Each evaluation runs under a memory limit and a time limit.
//!
//! Nothing an analyst writes can take the process down:
//! - **Shape.** The text, its expressions (count and nesting: a flat chain `1+1+…` or
//!   `a AND b AND …` nests as deep as it is long) and its tables are bounded ([`SHAPE`])
//!   right after parsing, before anything recurses over the tree.
//! - **Stack.** Parsing, planning and running happen only on threads with a stack of
//!   [`SQL_STACK_BYTES`] ([`on_sql_stack`], [`spawn_sql_thread`]), never on a caller's.
//! - **Results.** The string functions that can grow a value (`repeat`, `lpad`, `replace`,
//!   `concat`, `||`, …) are replaced in every plan by bounded ones that refuse, before
//!   allocating, a result over [`Limits::result_bytes`]; a call with literal arguments that
//!   would is refused at validation.
//!   All of them in one evaluation share one budget, its memory limit ([`Spent`]).
//! - **Unbounded values.** Lists, maps, structs, `unnest`, growing aggregates over a window
//!   and super-linear functions are refused at validation ([`check_unbounded`]); CTE
//!   references are counted as expanded ([`SHAPE`]); an evaluation returns at most
//!   [`MAX_RESULT_ROWS`] rows.
//! - **Windows.** [`Policy`]: at most `engine.sql_max_window`, sliding at least
//!   `engine.sql_min_slide`; at most [`max_rules`] SQL rules in a rule set.

use crate::model::{Id, Millis, Sample, Vital};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Float64Builder, RecordBatch, StringArray,
    StringViewBuilder, TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::compute::kernels::concat_elements::concat_elements_dyn;
use datafusion::arrow::compute::kernels::length::length;
use datafusion::arrow::datatypes::{
    DataType, Field, FieldRef, Int64Type, Schema, SchemaRef, TimeUnit,
};
use datafusion::catalog::MemTable;
use datafusion::common::config::{ConfigOptions, Dialect};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ExprSchema, ScalarValue};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::binary::BinaryTypeCoercer;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawBinaryExpr};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ExprSchemable, ExpressionPlacement, LogicalPlan, Operator,
    ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, execute_stream,
};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr as SqlExpr, ObjectName, Query, Select, Statement, Visit, Visitor,
};
use futures_util::StreamExt;
use serde::Serialize;
use std::cell::Cell;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, Instant};

/// The table a rule reads.
pub const TABLE: &str = "vitals";

/// A validated SQL rule.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlRule {
    pub sql: Arc<str>,
    /// Window length, ms.
    pub size: Millis,
    /// Advance between windows, ms; divides `size`.
    pub slide: Millis,
}

/// The most rows one evaluation may return: more is a statement gone wrong (a cross join),
/// and every row is held until the window's evaluation ends.
pub const MAX_RESULT_ROWS: usize = 10_000;

/// What one evaluation may use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    /// Memory the operators that buffer (aggregates, sorts, joins) may hold, bytes.
    pub memory_bytes: usize,
    /// Wall time for planning and running the statement.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            time: Duration::from_secs(2),
        }
    }
}

impl Limits {
    /// The largest result one call of a string function (or `||`) may produce over a batch:
    /// a quarter of the memory limit, so a chain of them stays within reach of it.
    pub fn result_bytes(&self) -> usize {
        (self.memory_bytes / 4).max(1 << 16)
    }
}

/// What a SQL rule's window may be, checked when a rule is validated: the engine's
/// `engine.sql_max_window` and `engine.sql_min_slide`, adopted when it starts
/// ([`set_policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// The longest window, ms: the SQL stage keeps every reading of it.
    pub max_window: Millis,
    /// The shortest slide, ms: a rule is evaluated at most once per slide.
    pub min_slide: Millis,
}

impl Policy {
    /// One hour of window, one second of slide.
    pub const DEFAULT: Policy = Policy {
        max_window: 3_600_000,
        min_slide: 1_000,
    };

    /// Why a window of `size` sliding by `slide` (ms) is refused, if it is.
    pub fn problems(&self, size: Millis, slide: Millis) -> Vec<String> {
        let human =
            |ms: Millis| humantime::format_duration(Duration::from_millis(ms.max(0) as u64));
        let mut out = Vec::new();
        if size > self.max_window {
            out.push(format!(
                "`window` must be at most {} for a SQL rule (engine.sql_max_window), not {}",
                human(self.max_window),
                human(size)
            ));
        }
        if (1..self.min_slide).contains(&slide) {
            out.push(format!(
                "`slide` must be at least {} for a SQL rule (engine.sql_min_slide), not {}",
                human(self.min_slide),
                human(slide)
            ));
        }
        out
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::DEFAULT
    }
}

static POLICY: RwLock<Policy> = RwLock::new(Policy::DEFAULT);

/// The most SQL rules one rule set may hold unless [`set_max_rules`] says otherwise: each
/// has its own engine time budget, and together they share the SQL stage's one thread.
pub const DEFAULT_MAX_RULES: usize = 32;

static MAX_RULES: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_RULES);

/// The most SQL rules a rule set may hold.
pub fn max_rules() -> usize {
    MAX_RULES.load(Relaxed)
}

/// Sets the most SQL rules a rule set may hold, for every validation that follows.
pub fn set_max_rules(n: usize) {
    MAX_RULES.store(n, Relaxed);
}

/// The window policy rules are validated against.
pub fn policy() -> Policy {
    *POLICY.read().unwrap_or_else(|e| e.into_inner())
}

/// Sets the window policy for every validation that follows (the engine does, from its
/// config, when it starts).
pub fn set_policy(policy: Policy) {
    *POLICY.write().unwrap_or_else(|e| e.into_inner()) = policy;
}

/// The stack every thread that parses, plans or runs a statement has. The statement's
/// shape is bounded ([`SHAPE`]), and DataFusion grows its own recursion onto the heap where
/// it can; this covers the rest (derived `Drop`, `Clone`, `Display` of the trees) with a
/// wide margin. Only the pages a thread touches are committed.
pub const SQL_STACK_BYTES: usize = 64 << 20;

thread_local! {
    static ON_SQL_STACK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` on a thread with [`SQL_STACK_BYTES`] of stack: this one if it is such a thread,
/// else a new one, waited for.
pub fn on_sql_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if ON_SQL_STACK.get() {
        return f();
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("sql".into())
            .stack_size(SQL_STACK_BYTES)
            .spawn_scoped(scope, || {
                ON_SQL_STACK.set(true);
                f()
            })
            .expect("spawning a SQL thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Starts a thread with [`SQL_STACK_BYTES`] of stack for SQL work.
pub fn spawn_sql_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(SQL_STACK_BYTES)
        .spawn(move || {
            ON_SQL_STACK.set(true);
            f()
        })
}

/// How big a statement may be, checked on the parsed tree before it is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    /// The SQL text, bytes.
    pub max_bytes: usize,
    /// Expressions nested in one another. Each operator of a flat chain (`1+1+…`,
    /// `a AND b AND …`, `a || b || …`) nests its left side one deeper.
    pub max_depth: usize,
    /// Expressions in the whole statement.
    pub max_exprs: usize,
    /// Table references (`vitals`, CTE names) and SELECTs.
    pub max_tables: usize,
}

/// The bounds every statement is checked against.
pub const SHAPE: Shape = Shape {
    max_bytes: 32 * 1024,
    max_depth: 128,
    max_exprs: 4096,
    max_tables: 64,
};

/// Counts what [`Shape`] bounds, and stops at the first bound passed (so it never recurses
/// deeper than `max_depth`).
#[derive(Default)]
struct ShapeCheck {
    depth: usize,
    exprs: usize,
    tables: usize,
    /// CTE name (lower case) → the table references it expands to.
    ctes: HashMap<String, u64>,
}

impl ShapeCheck {
    fn table(&mut self) -> ControlFlow<String> {
        self.tables += 1;
        if self.tables > SHAPE.max_tables {
            return ControlFlow::Break(format!(
                "the statement has more than {} table references and SELECTs (the limit)",
                SHAPE.max_tables
            ));
        }
        ControlFlow::Continue(())
    }
}

impl Visitor for ShapeCheck {
    type Break = String;

    fn pre_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<String> {
        self.depth += 1;
        self.exprs += 1;
        if self.depth > SHAPE.max_depth {
            return ControlFlow::Break(format!(
                "expressions nest deeper than the limit of {} levels (each operator of a \
                 chain such as `1+1+…` or `a AND b AND …` is one level): shorten the chain, \
                 or use IN (…), a CASE or a CTE",
                SHAPE.max_depth
            ));
        }
        if self.exprs > SHAPE.max_exprs {
            return ControlFlow::Break(format!(
                "the statement has more than {} expressions (the limit)",
                SHAPE.max_exprs
            ));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<String> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, _: &ObjectName) -> ControlFlow<String> {
        self.table()
    }

    fn pre_visit_select(&mut self, _: &Select) -> ControlFlow<String> {
        self.table()
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<String> {
        let Some(with) = &query.with else {
            return ControlFlow::Continue(());
        };
        // Each CTE weighs the tables it reads, a CTE named among them its own weight: what
        // planning it inlines.
        for cte in &with.cte_tables {
            let weight = self.weight_of(&cte.query);
            (self.ctes).insert(cte.alias.name.value.to_lowercase(), weight);
            if weight > SHAPE.max_tables as u64 {
                return ControlFlow::Break(format!(
                    "CTE `{}` expands to more than {} table references, each reference to a \
                     CTE counting all of the CTE's (the limit): reference CTEs fewer times",
                    cte.alias.name.value, SHAPE.max_tables
                ));
            }
        }
        if self.weight_of(&query.body) > SHAPE.max_tables as u64 {
            return ControlFlow::Break(format!(
                "the statement expands to more than {} table references, each reference to a \
                 CTE counting all of the CTE's (the limit): reference CTEs fewer times",
                SHAPE.max_tables
            ));
        }
        ControlFlow::Continue(())
    }
}

impl ShapeCheck {
    /// The table references `node` expands to, a CTE's name counting as the CTE's weight.
    fn weight_of<V: Visit>(&self, node: &V) -> u64 {
        struct Weigh<'a>(&'a HashMap<String, u64>, u64);
        impl Visitor for Weigh<'_> {
            type Break = ();
            fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
                let key = name.to_string().trim_matches('"').to_lowercase();
                self.1 = self
                    .1
                    .saturating_add(self.0.get(&key).copied().unwrap_or(1));
                ControlFlow::Continue(())
            }
        }
        let mut weigh = Weigh(&self.ctes, 0);
        let _ = node.visit(&mut weigh);
        weigh.1
    }
}

/// Refuses a text longer than [`SHAPE`] allows, before it is parsed.
fn check_length(sql: &str) -> Result<(), SqlError> {
    if sql.len() > SHAPE.max_bytes {
        return Err(SqlError::new(format!(
            "the statement is {} bytes, over the limit of {} bytes",
            sql.len(),
            SHAPE.max_bytes
        )));
    }
    Ok(())
}

/// Refuses a parsed statement bigger or deeper than [`SHAPE`] allows.
fn check_shape(statement: &Statement) -> Result<(), SqlError> {
    match statement.visit(&mut ShapeCheck::default()) {
        ControlFlow::Break(why) => Err(SqlError::new(why)),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Why a statement was refused or an evaluation failed; `line` and `column` (from 1) point
/// into the SQL when the parser or planner said where.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("{message}{}", match (line, column) {
    (Some(l), Some(c)) => format!(" (line {l}, column {c})"),
    _ => String::new(),
})]
pub struct SqlError {
    pub message: String,
    pub line: Option<u64>,
    pub column: Option<u64>,
}

impl SqlError {
    /// An error with no place in the SQL.
    pub fn new(message: impl Into<String>) -> SqlError {
        SqlError {
            message: message.into(),
            line: None,
            column: None,
        }
    }
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> SqlError {
        let (mut line, mut column) = (None, None);
        if let Some(span) = e.diagnostic().and_then(|d| d.span) {
            (line, column) = (Some(span.start.line), Some(span.start.column));
        }
        let message = e.find_root().strip_backtrace();
        // The SQL parser names the place in its message: "... at Line: 1, Column: 8".
        if line.is_none() {
            (line, column) = position_in(&message);
        }
        SqlError {
            message,
            line,
            column,
        }
    }
}

impl SqlError {
    /// Like `From`, and when the parser ran out of text, points at its end.
    fn at_end_of(e: DataFusionError, sql: &str) -> SqlError {
        let mut e = SqlError::from(e);
        if e.line.is_none() && e.message.contains("found: EOF") {
            let line = sql.lines().count().max(1);
            let column = sql.lines().last().map_or(0, |l| l.chars().count()) + 1;
            (e.line, e.column) = (Some(line as u64), Some(column as u64));
        }
        e
    }
}

fn position_in(message: &str) -> (Option<u64>, Option<u64>) {
    let number_after = |key: &str| {
        let rest = &message[message.find(key)? + key.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    match (number_after("Line: "), number_after("Column: ")) {
        (Some(l), Some(c)) => (Some(l), Some(c)),
        _ => (None, None),
    }
}

/// The columns of `vitals`: one row per reading, ordered by `ts` (then by a hash of the
/// device id, an order the shard count does not change).
pub fn schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
        let mut fields = vec![
            Field::new("device_id", DataType::Utf8View, false),
            Field::new("patient_id", DataType::Utf8View, true),
            Field::new("ward", DataType::Utf8View, true),
            Field::new("ts", ts(), false),
        ];
        fields.extend(Vital::ALL.map(|v| Field::new(v.name(), DataType::Float64, true)));
        fields.push(Field::new("window_start", ts(), false));
        fields.push(Field::new("window_end", ts(), false));
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

/// Device → ward, from the engine's config: the `ward` column.
pub type Wards = HashMap<Id, Id>;

/// The window `[start, end)` holding `readings` (already in table order) as one batch.
pub fn to_batch(readings: &[&Sample], wards: &Wards, start: Millis, end: Millis) -> RecordBatch {
    with_bounds(&readings_batch(readings.iter().copied(), wards), start, end)
}

/// Readings (in table order) as the columns of `vitals` before the window's bounds.
pub fn readings_batch<'a>(
    readings: impl ExactSizeIterator<Item = &'a Sample>,
    wards: &Wards,
) -> RecordBatch {
    let mut columns = Columns::default();
    for r in readings {
        columns.push(r, wards);
    }
    columns.finish_cloned()
}

/// The columns of `vitals` before the window's bounds, built one reading at a time.
pub struct Columns {
    device: StringViewBuilder,
    patient: StringViewBuilder,
    ward: StringViewBuilder,
    ts: TimestampMillisecondBuilder,
    vitals: [Float64Builder; 6],
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            device: StringViewBuilder::new(),
            patient: StringViewBuilder::new(),
            ward: StringViewBuilder::new(),
            ts: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            vitals: std::array::from_fn(|_| Float64Builder::new()),
        }
    }
}

impl Columns {
    pub fn push(&mut self, r: &Sample, wards: &Wards) {
        self.device.append_value(&r.device_id);
        self.patient.append_option(r.patient_id.as_deref());
        self.ward
            .append_option(wards.get(&r.device_id).map(|w| w.as_str()));
        self.ts.append_value(r.ts);
        for (builder, v) in self.vitals.iter_mut().zip(Vital::ALL) {
            builder.append_option(r.vitals.get(v));
        }
    }

    /// The rows so far as a batch; more may be pushed after.
    pub fn finish_cloned(&self) -> RecordBatch {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.device.finish_cloned()),
            Arc::new(self.patient.finish_cloned()),
            Arc::new(self.ward.finish_cloned()),
            Arc::new(self.ts.finish_cloned()),
        ];
        columns.extend(
            self.vitals
                .iter()
                .map(|b| Arc::new(b.finish_cloned()) as ArrayRef),
        );
        RecordBatch::try_new(readings_schema(), columns).expect("columns follow the schema")
    }
}

/// The schema of [`Columns`]: `vitals` without the window's bounds.
fn readings_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let all = schema();
        Arc::new(Schema::new(all.fields()[..all.fields().len() - 2].to_vec()))
    });
    SCHEMA.clone()
}

/// A batch of [`readings_batch`] with the window's bounds added: a batch of `vitals`.
pub fn with_bounds(readings: &RecordBatch, start: Millis, end: Millis) -> RecordBatch {
    let n = readings.num_rows();
    let bound = |t: Millis| {
        Arc::new(TimestampMillisecondArray::from_value(t, n).with_timezone("UTC")) as ArrayRef
    };
    let mut columns = readings.columns().to_vec();
    columns.push(bound(start));
    columns.push(bound(end));
    RecordBatch::try_new(schema(), columns).expect("columns follow the schema")
}

/// One result row: who it is about, and what to say.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Match {
    pub patient_id: Option<Id>,
    pub device_id: Option<Id>,
    pub value: Option<f64>,
    pub message: Option<String>,
}

impl Match {
    /// Whom the alert is for: the patient, else the device.
    pub fn subject(&self) -> Option<&Id> {
        self.patient_id.as_ref().or(self.device_id.as_ref())
    }
}

/// How the result of a string function can grow with its arguments: what one call over a
/// batch may produce, worked out from the arguments before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// At most `factor` times the bytes of its arguments (`concat`, `||`, `upper`, …).
    Sum(u64),
    /// `concat_ws(sep, a, b, …)`: the arguments, and the separator between each two.
    ConcatWs,
    /// `repeat(s, n)`: `s`, `n` times.
    Repeat,
    /// `lpad(s, n [, fill])`, `rpad`: `n` characters of at most 4 bytes.
    Pad,
    /// `replace(s, from, to)`, `regexp_replace(s, pattern, to [, flags])`: at worst `to`
    /// around every byte of `s`.
    Replace,
    /// `regexp_match(s, pattern)`: at worst a copy of `s` per character of the pattern.
    Match,
}

/// The functions whose result can be much larger than their arguments, and how. `||`
/// becomes a bounded function too ([`ConcatPlanner`]).
const GROWING: &[(&str, Growth)] = &[
    ("concat", Growth::Sum(1)),
    ("concat_ws", Growth::ConcatWs),
    ("overlay", Growth::Sum(1)),
    ("reverse", Growth::Sum(1)),
    ("encode", Growth::Sum(2)),
    ("upper", Growth::Sum(3)),
    ("lower", Growth::Sum(3)),
    ("initcap", Growth::Sum(3)),
    ("translate", Growth::Sum(4)),
    ("to_char", Growth::Sum(16)),
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::Replace),
    ("regexp_match", Growth::Match),
];

/// One number per row of a batch: the same for every row, or one each.
enum PerRow {
    All(u64),
    Each(Vec<u64>),
}

impl PerRow {
    fn at(&self, row: usize) -> u128 {
        match self {
            PerRow::All(v) => *v as u128,
            PerRow::Each(v) => v.get(row).map_or(0, |&v| v as u128),
        }
    }

    fn sum(&self, rows: usize) -> u128 {
        match self {
            PerRow::All(v) => *v as u128 * rows as u128,
            PerRow::Each(v) => v.iter().map(|&v| v as u128).sum(),
        }
    }
}

/// An argument as an array (of one row for a scalar), and whether it was a scalar.
fn as_array(arg: &ColumnarValue) -> DfResult<(ArrayRef, bool)> {
    Ok(match arg {
        ColumnarValue::Array(a) => (a.clone(), false),
        ColumnarValue::Scalar(s) => (s.to_array_of_size(1)?, true),
    })
}

fn per_row(values: Vec<u64>, scalar: bool) -> PerRow {
    match scalar {
        true => PerRow::All(values.first().copied().unwrap_or(0)),
        false => PerRow::Each(values),
    }
}

/// The bytes of each row of an argument: the length of text and binary values, the width
/// of anything else.
fn byte_lengths(arg: &ColumnarValue) -> DfResult<PerRow> {
    let (array, scalar) = as_array(arg)?;
    let Ok(lengths) = length(&array) else {
        let width = array.get_array_memory_size() / array.len().max(1);
        return Ok(PerRow::All(width as u64));
    };
    let lengths = cast(&lengths, &DataType::Int64)?;
    let values = (lengths.as_primitive::<Int64Type>().iter())
        .map(|l| l.unwrap_or(0).max(0) as u64)
        .collect();
    Ok(per_row(values, scalar))
}

/// Each row of an integer argument (a count), null and negative as 0.
fn counts(arg: &ColumnarValue) -> DfResult<PerRow> {
    let (array, scalar) = as_array(arg)?;
    let values = cast(&array, &DataType::Int64)?;
    let values = (values.as_primitive::<Int64Type>().iter())
        .map(|n| n.unwrap_or(0).max(0) as u64)
        .collect();
    Ok(per_row(values, scalar))
}

impl Growth {
    /// The most bytes a call over `rows` rows of `args` may produce.
    fn estimate(self, args: &[ColumnarValue], rows: usize) -> DfResult<u128> {
        let bytes = |i: usize| match args.get(i) {
            Some(a) => byte_lengths(a),
            None => Ok(PerRow::All(0)),
        };
        let count = |i: usize| match args.get(i) {
            Some(a) => counts(a),
            None => Ok(PerRow::All(0)),
        };
        let per_row = |f: &dyn Fn(usize) -> u128| (0..rows).map(f).sum::<u128>();
        Ok(match self {
            Growth::Sum(factor) => {
                let mut total = 0;
                for i in 0..args.len() {
                    total += bytes(i)?.sum(rows);
                }
                total * factor as u128
            }
            Growth::ConcatWs => {
                let mut total = bytes(0)?.sum(rows) * args.len().saturating_sub(2) as u128;
                for i in 1..args.len() {
                    total += bytes(i)?.sum(rows);
                }
                total
            }
            Growth::Repeat => {
                let (s, n) = (bytes(0)?, count(1)?);
                per_row(&|r| s.at(r) * n.at(r))
            }
            Growth::Pad => {
                let (s, n) = (bytes(0)?, count(1)?);
                per_row(&|r| s.at(r).max(4 * n.at(r)))
            }
            Growth::Replace => {
                let (s, to) = (bytes(0)?, bytes(2)?);
                per_row(&|r| (s.at(r) + 1) * (to.at(r) + 1))
            }
            Growth::Match => {
                let (s, pattern) = (bytes(0)?, bytes(1)?);
                per_row(&|r| (s.at(r) + 1) * (pattern.at(r) + 1))
            }
        })
    }
}

/// A string function with a bound on its result: it refuses a call whose result could pass
/// `limit` bytes before making it, and checks the result it made. Everything else is the
/// function's own, but for `simplify` (the built-in ones rewrite to unbounded functions).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    limit: usize,
    /// What every bounded call of the evaluation has produced so far.
    spent: Spent,
}

/// The bytes the bounded calls of one evaluation have produced together, shared by all of
/// an [`Evaluator`]'s bounded functions and reset when an evaluation starts: many calls,
/// each within its own bound, may not together pass the evaluation's memory limit.
#[derive(Debug, Clone)]
struct Spent {
    bytes: Arc<AtomicUsize>,
    limit: usize,
}

impl Spent {
    fn new(limit: usize) -> Spent {
        Spent {
            bytes: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    fn reset(&self) {
        self.bytes.store(0, Relaxed);
    }

    /// Charges `bytes` (`made`: produced; else about to be), refusing past the limit.
    fn charge(&self, name: &str, bytes: usize, made: bool) -> DfResult<()> {
        let total = match made {
            true => self.bytes.fetch_add(bytes, Relaxed).saturating_add(bytes),
            false => self.bytes.load(Relaxed).saturating_add(bytes),
        };
        if total <= self.limit {
            return Ok(());
        }
        Err(DataFusionError::ResourcesExhausted(format!(
            "{name}() would bring the text the statement's functions produced to {total} bytes, \
             over the limit of {} bytes for one evaluation (engine.sql_memory_mb)",
            self.limit
        )))
    }
}

impl PartialEq for Spent {
    fn eq(&self, other: &Spent) -> bool {
        Arc::ptr_eq(&self.bytes, &other.bytes)
    }
}

impl Eq for Spent {}

impl std::hash::Hash for Spent {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.bytes).hash(state)
    }
}

impl Bounded {
    fn udf(inner: Arc<ScalarUDF>, growth: Growth, limit: usize, spent: &Spent) -> Arc<ScalarUDF> {
        Arc::new(ScalarUDF::new_from_impl(Bounded {
            inner,
            growth,
            limit,
            spent: spent.clone(),
        }))
    }

    fn of(udf: &ScalarUDF) -> Option<&Bounded> {
        (udf.inner().as_ref() as &dyn std::any::Any).downcast_ref()
    }

    fn within_limit(&self, bytes: u128, what: &str) -> DfResult<()> {
        if bytes <= self.limit as u128 {
            return Ok(());
        }
        Err(DataFusionError::ResourcesExhausted(format!(
            "{}() {what} {bytes} bytes, over the limit of {} bytes for one function's result \
             (a quarter of engine.sql_memory_mb)",
            self.inner.name(),
            self.limit
        )))
    }

    /// Refuses a call over `rows` rows of `args` that could pass the limit.
    fn check(&self, args: &[ColumnarValue], rows: usize) -> DfResult<()> {
        let estimate = self.growth.estimate(args, rows)?;
        self.within_limit(estimate, "could produce")?;
        self.spent
            .charge(self.inner.name(), estimate as usize, false)
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    #[allow(deprecated)]
    fn display_name(&self, args: &[Expr]) -> DfResult<String> {
        self.inner.inner().display_name(args)
    }

    fn schema_name(&self, args: &[Expr]) -> DfResult<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        self.inner.inner().return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    #[allow(deprecated)]
    fn is_nullable(&self, args: &[Expr], schema: &dyn ExprSchema) -> bool {
        self.inner.inner().is_nullable(args, schema)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        self.check(&args.args, args.number_rows)?;
        let out = self.inner.invoke_with_args(args)?;
        let made = match &out {
            ColumnarValue::Array(a) => a.get_array_memory_size(),
            ColumnarValue::Scalar(s) => s.size(),
        };
        self.within_limit(made as u128, "produced")?;
        self.spent.charge(self.inner.name(), made, true)?;
        Ok(out)
    }

    fn with_updated_config(&self, _config: &ConfigOptions) -> Option<ScalarUDF> {
        None
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> DfResult<Interval> {
        self.inner.evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &Interval,
        inputs: &[&Interval],
    ) -> DfResult<Option<Vec<Interval>>> {
        self.inner.propagate_constraints(interval, inputs)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> DfResult<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> DfResult<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.inner().placement(args)
    }
}

/// `a || b` as a function: text (or binary) joined, NULL when either side is — the
/// operator's meaning and types, so that it can be bounded like the functions. Its column
/// name stays `a || b`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ConcatOperator {
    signature: Signature,
}

impl ConcatOperator {
    fn coercer<'a>(types: &'a [DataType]) -> DfResult<BinaryTypeCoercer<'a>> {
        match types {
            [left, right] => Ok(BinaryTypeCoercer::new(left, &Operator::StringConcat, right)),
            _ => Err(DataFusionError::Plan("|| joins two values".into())),
        }
    }
}

impl ScalarUDFImpl for ConcatOperator {
    fn name(&self) -> &str {
        "||"
    }

    fn schema_name(&self, args: &[Expr]) -> DfResult<String> {
        let names: Vec<String> = (args.iter()).map(|a| a.schema_name().to_string()).collect();
        Ok(names.join(" || "))
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        let (left, right) = Self::coercer(arg_types)?.get_input_types()?;
        Ok(vec![left, right])
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        Self::coercer(arg_types)?.get_result_type()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let [left, right] = &args.args[..] else {
            return Err(DataFusionError::Internal("|| takes two values".into()));
        };
        let scalars = matches!(
            (left, right),
            (ColumnarValue::Scalar(_), ColumnarValue::Scalar(_))
        );
        let rows = if scalars { 1 } else { args.number_rows };
        let joined = concat_elements_dyn(&left.to_array(rows)?, &right.to_array(rows)?)?;
        Ok(match scalars {
            true => ColumnarValue::Scalar(ScalarValue::try_from_array(&joined, 0)?),
            false => ColumnarValue::Array(joined),
        })
    }
}

/// Plans `a || b` over text as the bounded [`ConcatOperator`]; lists are left to the
/// planners after it.
#[derive(Debug)]
struct ConcatPlanner {
    concat: Arc<ScalarUDF>,
}

impl ExprPlanner for ConcatPlanner {
    fn plan_binary_op(
        &self,
        expr: RawBinaryExpr,
        schema: &DFSchema,
    ) -> DfResult<PlannerResult<RawBinaryExpr>> {
        let list = |e: &Expr| {
            e.get_type(schema).is_ok_and(|t| {
                matches!(
                    t,
                    DataType::List(_)
                        | DataType::LargeList(_)
                        | DataType::FixedSizeList(..)
                        | DataType::ListView(_)
                        | DataType::LargeListView(_)
                )
            })
        };
        if expr.op != BinaryOperator::StringConcat || list(&expr.left) || list(&expr.right) {
            return Ok(PlannerResult::Original(expr));
        }
        Ok(PlannerResult::Planned(
            self.concat.call(vec![expr.left, expr.right]),
        ))
    }
}

/// Swaps every call of a growing function in `plan` and its subqueries for its bounded
/// twin in `bounded`, however the call got there (by name, by syntax such as `OVERLAY(…)`).
fn bound_functions(
    plan: LogicalPlan,
    bounded: &HashMap<&'static str, Arc<ScalarUDF>>,
) -> DfResult<LogicalPlan> {
    let swap = |e: Expr| match e {
        Expr::ScalarFunction(call) if Bounded::of(&call.func).is_none() => {
            match bounded.get(call.func.name()) {
                Some(twin) => Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction {
                    func: twin.clone(),
                    args: call.args,
                }))),
                None => Ok(Transformed::no(Expr::ScalarFunction(call))),
            }
        }
        e => Ok(Transformed::no(e)),
    };
    plan.transform_up_with_subqueries(|node| node.map_expressions(|e| e.transform_up(swap)))
        .map(|t| t.data)
}

/// Refuses a bounded call whose arguments are all literals (after constant folding, so
/// `repeat(repeat('x', 1000), 1000000)` is one) and whose result would pass its bound.
fn check_literal_calls(plan: &LogicalPlan) -> Result<(), SqlError> {
    let mut refused = None;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                let Expr::ScalarFunction(call) = e else {
                    return Ok(TreeNodeRecursion::Continue);
                };
                let literals: Option<Vec<ColumnarValue>> = (call.args.iter())
                    .map(|a| match a {
                        Expr::Literal(v, _) => Some(ColumnarValue::Scalar(v.clone())),
                        _ => None,
                    })
                    .collect();
                if let (Some(bounded), Some(args)) = (Bounded::of(&call.func), literals)
                    && let Err(e) = bounded.check(&args, 1)
                {
                    refused = Some(SqlError::from(e));
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    refused.map_or(Ok(()), Err)
}

/// Scalar functions whose cost grows faster than their arguments (`levenshtein` is
/// quadratic in its strings): one call could run past any deadline, which is only checked
/// between batches, so they are refused.
const SUPER_LINEAR: &[&str] = &["levenshtein"];

/// Aggregates whose result grows with their input: over a window (`OVER (…)`) every row gets
/// its own copy, rows × rows in all, outside the memory pool.
const GROWING_AGGREGATES: &[&str] = &["array_agg", "string_agg", "listagg", "group_concat"];

/// Whether a value of type `t` can hold an unbounded number of values (lists, maps,
/// structs of them).
fn nested(t: &DataType) -> bool {
    matches!(
        t,
        DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(..)
            | DataType::ListView(_)
            | DataType::LargeListView(_)
            | DataType::Map(..)
            | DataType::Struct(_)
            | DataType::Union(..)
    )
}

/// Refuses what could produce results of unbounded size outside the memory pool or run
/// without interruption: a list, map or struct anywhere in the plan (every node's output,
/// subqueries too), `unnest`, a growing aggregate over a window, a [`SUPER_LINEAR`]
/// function. Checked before the optimizer runs (it folds constant calls).
fn check_unbounded(plan: &LogicalPlan) -> Result<(), SqlError> {
    let mut refused: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        if matches!(node, LogicalPlan::Unnest(_)) {
            refused = Some("`unnest` is not allowed in a SQL rule".into());
            return Ok(TreeNodeRecursion::Stop);
        }
        if let Some(f) = (node.schema().fields().iter()).find(|f| nested(f.data_type())) {
            refused = Some(format!(
                "`{}` is a {}: lists, maps and structs are not allowed in a SQL rule \
                 (their size is unbounded)",
                f.name(),
                f.data_type()
            ));
            return Ok(TreeNodeRecursion::Stop);
        }
        node.apply_expressions(|e| {
            e.apply(|e| {
                refused = match e {
                    Expr::ScalarFunction(call)
                        if SUPER_LINEAR.contains(&call.func.name().to_lowercase().as_str()) =>
                    {
                        Some(format!(
                            "{}() is not allowed in a SQL rule (its cost grows with the square \
                             of its arguments)",
                            call.func.name()
                        ))
                    }
                    Expr::WindowFunction(w)
                        if GROWING_AGGREGATES.contains(&w.fun.name().to_lowercase().as_str()) =>
                    {
                        Some(format!(
                            "{}() is not allowed over a window (`OVER (…)`): every row would \
                             hold a copy of the whole aggregate",
                            w.fun.name()
                        ))
                    }
                    _ => None,
                };
                Ok(match refused {
                    Some(_) => TreeNodeRecursion::Stop,
                    None => TreeNodeRecursion::Continue,
                })
            })
        })
    })?;
    refused.map_or(Ok(()), |why| Err(SqlError::new(why)))
}

/// The most nodes a planned statement may have, every reference to a CTE counted with
/// the CTE's own nodes (each is planned, optimized and run in full): a chain of CTEs each
/// joining the one before to itself a few times is small to write and exponential to run.
pub const MAX_PLAN_NODES: usize = 4096;

/// Refuses a plan of more than [`MAX_PLAN_NODES`] nodes, counting no further.
fn check_size(plan: &LogicalPlan) -> Result<(), SqlError> {
    let mut nodes = 0usize;
    plan.apply_with_subqueries(|_| {
        nodes += 1;
        Ok(match nodes > MAX_PLAN_NODES {
            true => TreeNodeRecursion::Stop,
            false => TreeNodeRecursion::Continue,
        })
    })?;
    if nodes > MAX_PLAN_NODES {
        return Err(SqlError::new(format!(
            "the statement plans to more than {MAX_PLAN_NODES} steps, each reference to a CTE \
             counting all of the CTE's (the limit): reference CTEs fewer times"
        )));
    }
    Ok(())
}

/// Runs statements over windows, in one DataFusion session with its limits. Use it on a
/// thread of [`on_sql_stack`] or [`spawn_sql_thread`].
pub struct Evaluator {
    ctx: SessionContext,
    limits: Limits,
    /// Growing function → its bounded twin.
    bounded: HashMap<&'static str, Arc<ScalarUDF>>,
    /// What the bounded functions of the current evaluation have produced.
    spent: Spent,
}

impl Evaluator {
    pub fn new(limits: Limits) -> Evaluator {
        let mut config = SessionConfig::new()
            .with_target_partitions(1)
            .with_information_schema(false);
        let options = config.options_mut();
        options.execution.enable_recursive_ctes = false;
        options.sql_parser.collect_spans = true;
        // No spilling: an evaluation that outgrows its memory fails rather than writing
        // temporary files.
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_bytes, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .expect("a memory-limited runtime");
        let result_bytes = limits.result_bytes();
        let concat = ScalarUDF::new_from_impl(ConcatOperator {
            signature: Signature::user_defined(Volatility::Immutable),
        });
        let spent = Spent::new(limits.memory_bytes);
        let concat = Bounded::udf(Arc::new(concat), Growth::Sum(1), result_bytes, &spent);
        let mut planners: Vec<Arc<dyn ExprPlanner>> = vec![Arc::new(ConcatPlanner { concat })];
        planners.extend(SessionStateDefaults::default_expr_planners());
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_expr_planners(planners)
            .build();
        let functions = state.scalar_functions();
        let bounded = (GROWING.iter())
            .filter_map(|&(name, growth)| {
                let udf = functions.get(name)?.clone();
                Some((name, Bounded::udf(udf, growth, result_bytes, &spent)))
            })
            .collect();
        Evaluator {
            ctx: SessionContext::new_with_state(state),
            limits,
            bounded,
            spent,
        }
    }

    /// What one evaluation may use.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Plans `sql` over `vitals` holding `batches`, refusing anything but one query over it.
    /// Bounded in its shape ([`SHAPE`]) before planning, with every growing function bounded
    /// ([`Limits::result_bytes`]).
    async fn plan(&self, sql: &str, batches: Vec<RecordBatch>) -> Result<LogicalPlan, SqlError> {
        check_length(sql)?;
        self.ctx.deregister_table(TABLE)?;
        let table = MemTable::try_new(schema(), vec![batches])?;
        self.ctx.register_table(TABLE, Arc::new(table))?;
        let state = self.ctx.state();
        let statement = (state.sql_to_statement(sql, &Dialect::Generic))
            .map_err(|e| SqlError::at_end_of(e, sql))?;
        match &statement {
            DfStatement::Statement(s) if matches!(**s, Statement::Query(_)) => check_shape(s)?,
            _ => {
                return Err(SqlError::new(
                    "only a SELECT over `vitals` is allowed (no DDL, DML, COPY, SET or EXPLAIN)",
                ));
            }
        }
        let plan = state.statement_to_plan(statement).await?;
        check_size(&plan)?;
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)?;
        let mut refused = None;
        plan.apply_with_subqueries(|node| {
            refused = match node {
                LogicalPlan::TableScan(scan) if scan.table_name.table() == TABLE => None,
                LogicalPlan::TableScan(scan) => Some(format!(
                    "only the table `vitals` may be read, not `{}`",
                    scan.table_name
                )),
                LogicalPlan::RecursiveQuery(_) => Some("recursive queries are not allowed".into()),
                LogicalPlan::Extension(_) | LogicalPlan::Copy(_) | LogicalPlan::Dml(_) => {
                    Some("only a SELECT over `vitals` is allowed".into())
                }
                _ => None,
            };
            Ok(match refused {
                Some(_) => TreeNodeRecursion::Stop,
                None => TreeNodeRecursion::Continue,
            })
        })?;
        match refused {
            Some(why) => Err(SqlError::new(why)),
            None => Ok(bound_functions(plan, &self.bounded)?),
        }
    }

    /// Checks a statement without data: it must plan over `vitals` and return a string
    /// column `patient_id` or `device_id`; `value` must be numeric and `message` text.
    pub async fn validate(&self, sql: &str) -> Result<(), SqlError> {
        self.spent.reset();
        let plan = self.plan(sql, Vec::new()).await?;
        let out = plan.schema();
        let column = |name: &str| {
            out.fields()
                .iter()
                .find(|f| f.name() == name)
                .map(|f| f.data_type().clone())
        };
        let text = |t: &DataType| {
            matches!(
                t,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null
            )
        };
        let (patient, device) = (column("patient_id"), column("device_id"));
        if patient.is_none() && device.is_none() {
            return Err(SqlError::new(
                "the result needs a column `patient_id` or `device_id`: whom each row alerts for",
            ));
        }
        for (name, t) in [("patient_id", patient), ("device_id", device)] {
            if let Some(t) = t.filter(|t| !text(t)) {
                return Err(SqlError::new(format!(
                    "column `{name}` must be text, not {t}"
                )));
            }
        }
        if let Some(t) = column("value").filter(|t| !t.is_numeric() && *t != DataType::Null) {
            return Err(SqlError::new(format!(
                "column `value` must be a number, not {t}"
            )));
        }
        if let Some(t) = column("message").filter(|t| !text(t)) {
            return Err(SqlError::new(format!(
                "column `message` must be text, not {t}"
            )));
        }
        check_unbounded(&plan)?;
        let optimized = self.ctx.state().optimize(&plan)?;
        check_unbounded(&optimized)?;
        check_literal_calls(&optimized)
    }

    /// Runs `sql` over one window's readings (batches of [`schema`]); every row it returns
    /// is a match.
    pub async fn run(&self, sql: &str, batches: Vec<RecordBatch>) -> Result<Vec<Match>, SqlError> {
        self.run_until(sql, batches, Instant::now() + self.limits.time)
            .await
    }

    /// [`Evaluator::run`], stopped at `deadline` (or its time limit, if sooner).
    pub async fn run_until(
        &self,
        sql: &str,
        batches: Vec<RecordBatch>,
        deadline: Instant,
    ) -> Result<Vec<Match>, SqlError> {
        let deadline = deadline.min(Instant::now() + self.limits.time);
        let overrun = format!(
            "the statement ran longer than its limit of {:?} and was stopped",
            self.limits.time
        );
        let work = async {
            self.spent.reset();
            let plan = self.plan(sql, batches).await?;
            let frame = self.ctx.execute_logical_plan(plan).await?;
            let task = frame.task_ctx();
            let physical = frame.create_physical_plan().await?;
            let physical = with_deadline(physical, deadline, &overrun)?;
            let mut stream = execute_stream(physical, Arc::new(task))?;
            // The result is held outside the memory pool: it is counted as it comes.
            let (mut rows, mut bytes, mut out) = (0usize, 0usize, Vec::new());
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                rows += batch.num_rows();
                bytes += batch.get_array_memory_size();
                if rows > MAX_RESULT_ROWS || bytes > self.limits.memory_bytes {
                    return Err(SqlError::new(format!(
                        "the statement returned more than {MAX_RESULT_ROWS} rows or {} bytes \
                         (the limits for one window) and was stopped",
                        self.limits.memory_bytes
                    )));
                }
                out.push(batch);
            }
            Ok::<_, SqlError>(out)
        };
        // The timer stops a statement that waits; the deadline on every operator stops one
        // that computes without ever waiting.
        let time = deadline.saturating_duration_since(Instant::now());
        let batches = match tokio::time::timeout(time, work).await {
            Ok(result) => result?,
            Err(_) => return Err(SqlError::new(overrun)),
        };
        let mut out = Vec::new();
        for batch in &batches {
            read_matches(batch, &mut out)?;
        }
        Ok(out)
    }
}

/// Wraps every operator of `plan` so that its output fails once `deadline` has passed.
fn with_deadline(
    plan: Arc<dyn ExecutionPlan>,
    deadline: Instant,
    overrun: &str,
) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
    let overrun: Arc<str> = Arc::from(overrun);
    plan.transform_up(|node| {
        let wrapped = Deadline {
            input: node,
            deadline,
            overrun: overrun.clone(),
        };
        Ok(Transformed::yes(Arc::new(wrapped) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// An operator's output, cut off at a deadline. Operators that loop without yielding to
/// the runtime (a cross join whose rows a filter drops) never let a timer run, but each
/// still hands batches to its parent: that is where this checks the clock.
#[derive(Debug)]
struct Deadline {
    input: Arc<dyn ExecutionPlan>,
    deadline: Instant,
    overrun: Arc<str>,
}

impl DisplayAs for Deadline {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Deadline")
    }
}

impl ExecutionPlan for Deadline {
    fn name(&self) -> &str {
        "Deadline"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Deadline {
            input: children.swap_remove(0),
            deadline: self.deadline,
            overrun: self.overrun.clone(),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let (deadline, overrun) = (self.deadline, self.overrun.clone());
        let stream = self.input.execute(partition, context)?;
        let schema = stream.schema();
        let checked = stream.map(move |batch| match batch {
            Ok(_) if Instant::now() > deadline => {
                Err(DataFusionError::Execution(overrun.to_string()))
            }
            other => other,
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, checked)))
    }
}

fn read_matches(batch: &RecordBatch, out: &mut Vec<Match>) -> Result<(), SqlError> {
    let column = |name: &str, to: &DataType| -> Result<Option<ArrayRef>, SqlError> {
        match batch.column_by_name(name) {
            None => Ok(None),
            Some(c) => Ok(Some(cast(c, to).map_err(DataFusionError::from)?)),
        }
    };
    fn text(c: &Option<ArrayRef>, row: usize) -> Option<&str> {
        let c = c.as_ref()?.as_any().downcast_ref::<StringArray>()?;
        c.is_valid(row).then(|| c.value(row))
    }
    let patient = column("patient_id", &DataType::Utf8)?;
    let device = column("device_id", &DataType::Utf8)?;
    let message = column("message", &DataType::Utf8)?;
    let value = column("value", &DataType::Float64)?;
    let value = value
        .as_ref()
        .and_then(|c| c.as_any().downcast_ref::<Float64Array>());
    for row in 0..batch.num_rows() {
        out.push(Match {
            patient_id: text(&patient, row).map(Id::from),
            device_id: text(&device, row).map(Id::from),
            value: value.and_then(|c| c.is_valid(row).then(|| c.value(row))),
            message: text(&message, row).map(str::to_string),
        });
    }
    Ok(())
}

/// Validates a statement (for pipelines and the API), on a thread of [`on_sql_stack`].
pub fn validate(sql: &str) -> Result<(), SqlError> {
    on_sql_stack(|| {
        let evaluator = Evaluator::new(Limits::default());
        futures_executor::block_on(evaluator.validate(sql))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sql: &str) -> SqlError {
        validate(sql).expect_err(sql)
    }

    #[test]
    fn accepts_a_query_over_vitals() {
        validate("SELECT device_id, patient_id, avg(spo2) AS value FROM vitals GROUP BY 1, 2")
            .unwrap();
        validate(
            "WITH w AS (SELECT * FROM vitals WHERE ts >= window_end - INTERVAL '5 seconds') \
             SELECT patient_id, 'low' AS message FROM w WHERE spo2 < 90",
        )
        .unwrap();
    }

    #[test]
    fn refuses_what_is_not_one_select_over_vitals() {
        let cases = [
            ("CREATE TABLE t (x INT)", "only a SELECT"),
            ("INSERT INTO vitals VALUES (1)", "only a SELECT"),
            ("COPY vitals TO '/tmp/x.csv'", "only a SELECT"),
            (
                "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'",
                "only a SELECT",
            ),
            ("SET datafusion.execution.batch_size = 1", "only a SELECT"),
            (
                "SELECT device_id FROM vitals; SELECT device_id FROM vitals",
                "single SQL statement",
            ),
            (
                "SELECT * FROM generate_series(1, 10)",
                "not `generate_series",
            ),
            ("SELECT device_id FROM '/etc/passwd'", "/etc/passwd"),
            ("SELECT device_id FROM other", "other"),
            (
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) \
                 SELECT 'x' AS device_id FROM r",
                "ecursive",
            ),
            ("SELECT hr FROM vitals", "patient_id` or `device_id"),
            (
                "SELECT device_id, 'high' AS value FROM vitals",
                "`value` must be a number",
            ),
        ];
        for (sql, expected) in cases {
            let e = refused(sql);
            assert!(e.to_string().contains(expected), "{sql}: {e}");
        }
    }

    /// A window of `n` readings from `n / 10` devices, one a second.
    fn window(n: usize) -> RecordBatch {
        let samples: Vec<Sample> = (0..n)
            .map(|i| {
                let mut vitals = crate::model::Vitals::default();
                vitals.set(Vital::Hr, 60.0 + (i % 50) as f64);
                Sample {
                    device_id: Id::from(format!("bed-{}", i % (n / 10).max(1))),
                    patient_id: None,
                    ts: 1_000 * i as Millis,
                    device_ts: true,
                    received_us: 0,
                    vitals,
                    seq: None,
                    correlation_id: crate::model::CorrelationId::Generated(i as u64),
                    late: false,
                    warmup: false,
                }
            })
            .collect();
        let rows: Vec<&Sample> = samples.iter().collect();
        to_batch(&rows, &Wards::default(), 0, 1_000 * n as Millis)
    }

    fn run(limits: Limits, sql: &str, batch: RecordBatch) -> Result<Vec<Match>, SqlError> {
        let batch = vec![batch];
        on_sql_stack(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(Evaluator::new(limits).run(sql, batch))
        })
    }

    #[test]
    fn rows_become_matches() {
        // bed-3 holds readings 3, 13, …, 93: heart rates 63 to 103.
        let sql = "SELECT device_id, NULL AS patient_id, max(hr) AS value,                    'swing ' || CAST(max(hr) - min(hr) AS VARCHAR) AS message                    FROM vitals GROUP BY device_id HAVING device_id = 'bed-3'";
        let rows = run(Limits::default(), sql, window(100)).unwrap();
        assert_eq!(
            rows,
            [Match {
                patient_id: None,
                device_id: Some("bed-3".into()),
                value: Some(103.0),
                message: Some("swing 40.0".into()),
            }]
        );
    }

    #[test]
    fn an_endless_statement_is_stopped_at_its_time_limit() {
        let limits = Limits {
            time: Duration::from_millis(300),
            ..Limits::default()
        };
        let sql = "SELECT a.device_id FROM vitals a, vitals b, vitals c, vitals d                    WHERE a.hr + b.hr + c.hr + d.hr < 0";
        let started = std::time::Instant::now();
        let e = run(limits, sql, window(2000)).unwrap_err();
        assert!(e.message.contains("longer than its limit"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_statement_that_outgrows_its_memory_fails() {
        let limits = Limits {
            memory_bytes: 1 << 20,
            ..Limits::default()
        };
        let sql =
            "SELECT device_id, array_agg(hr ORDER BY ts) AS hrs FROM vitals GROUP BY device_id";
        let e = run(limits, sql, window(200_000)).unwrap_err();
        assert!(e.message.contains("esources exhausted"), "{e}");
    }

    #[test]
    fn says_where_the_problem_is() {
        let e = refused("SELECT device_id,\n  nosuch FROM vitals");
        assert!(e.message.contains("nosuch"), "{e}");
        assert_eq!((e.line, e.column), (Some(2), Some(3)), "{e}");
        let e = refused("SELECT device_id FROM vitals\nWHERE");
        assert_eq!((e.line, e.column), (Some(2), Some(6)), "{e}");
        let e = refused("SELECT device_id FROM vitals WHERE hr > > 3");
        assert_eq!((e.line, e.column), (Some(1), Some(41)), "{e}");
    }

    /// `terms` joined by `op`: a flat chain, as deep as it is long once parsed.
    fn chain(term: &str, op: &str, terms: usize) -> String {
        vec![term; terms].join(op)
    }

    #[test]
    fn flat_chains_are_refused_before_they_reach_the_planner() {
        // Each of these aborted the process with a stack overflow (4 KB to 16 KB of SQL).
        let cases = [
            format!(
                "SELECT device_id FROM vitals WHERE hr > {}",
                chain("1", "+", 2000)
            ),
            format!(
                "SELECT device_id FROM vitals WHERE {}",
                chain("hr > 1", " AND ", 2000)
            ),
            format!(
                "SELECT device_id FROM vitals WHERE {}",
                chain("hr > 1", " OR ", 2000)
            ),
            format!(
                "SELECT {} AS device_id FROM vitals",
                chain("device_id", " || ", 2000)
            ),
        ];
        for sql in &cases {
            let e = refused(sql);
            assert!(
                e.message.contains("deeper than the limit of 128 levels"),
                "{}…: {e}",
                &sql[..60]
            );
        }
        // The text's length is bounded before it is parsed.
        let e = refused(&format!(
            "SELECT device_id FROM vitals WHERE hr > {}",
            chain("1", "+", 20_000)
        ));
        assert!(e.message.contains("over the limit of 32768 bytes"), "{e}");
        // And the count of expressions: a flat IN list is shallow but large.
        let e = refused(&format!(
            "SELECT device_id FROM vitals WHERE hr IN ({})",
            chain("1", ",", 5000)
        ));
        assert!(e.message.contains("more than 4096 expressions"), "{e}");
        let e = refused(&format!(
            "SELECT device_id FROM vitals {}",
            chain("UNION ALL SELECT device_id FROM vitals", " ", 70)
        ));
        assert!(e.message.contains("more than 64 table references"), "{e}");
    }

    #[test]
    fn a_chain_within_the_limit_plans_and_runs_off_the_callers_stack() {
        // 120 terms: 121 levels with the comparison, within the 128 allowed.
        let sql = format!(
            "SELECT device_id, {} AS message FROM vitals WHERE hr >= 60 + {} AND {}",
            chain("'x'", " || ", 40),
            chain("0", "+", 40),
            chain("hr > 0", " AND ", 35),
        );
        validate(&sql).unwrap();
        let rows = run(Limits::default(), &sql, window(20)).unwrap();
        assert_eq!(rows.len(), 20);
        assert_eq!(rows[0].message.as_deref(), Some("x".repeat(40).as_str()));
    }

    #[test]
    fn growing_functions_with_literal_arguments_past_the_bound_are_refused() {
        for sql in [
            "SELECT device_id, length(repeat('x', 2000000000)) AS value FROM vitals",
            "SELECT device_id, length(lpad('x', 2000000000)) AS value FROM vitals",
            "SELECT device_id, length(repeat(repeat('x', 10000), 100000)) AS value FROM vitals",
            "SELECT device_id FROM vitals WHERE length(rpad(device_id, 5, repeat('ab', 10000000))) > 1",
        ] {
            let e = refused(sql);
            assert!(e.message.contains("over the limit of"), "{sql}: {e}");
            assert!(e.message.contains("engine.sql_memory_mb"), "{sql}: {e}");
        }
        // Within the bound, the same functions are what they always were.
        validate(
            "SELECT device_id, repeat('-', 40) || lpad(device_id, 12, '.') AS message FROM vitals",
        )
        .unwrap();
    }

    #[test]
    fn growing_functions_are_stopped_at_their_bound_when_they_run() {
        let limits = Limits::default();
        let cases = [
            // Counts from the data: nothing to refuse at validation.
            "SELECT device_id, length(repeat(device_id, CAST(hr AS BIGINT) * 100000000)) AS value FROM vitals",
            "SELECT device_id, length(lpad(device_id, CAST(hr AS BIGINT) * 100000000)) AS value FROM vitals",
            "SELECT device_id, length(replace(repeat(device_id, 1000), 'b', repeat(device_id, 1000))) AS value FROM vitals",
            // Doubling through CTEs: each step is small, together they are not.
            &format!(
                "WITH s0 AS (SELECT device_id, repeat(device_id, 1000) AS s FROM vitals) {} \
                 SELECT device_id, length(s) AS value FROM s30",
                (1..=30)
                    .map(|i| format!(", s{i} AS (SELECT device_id, s || s AS s FROM s{})", i - 1))
                    .collect::<String>()
            ),
            &format!(
                "WITH s0 AS (SELECT device_id, repeat(device_id, 1000) AS s FROM vitals) {} \
                 SELECT device_id, length(s) AS value FROM s30",
                (1..=30)
                    .map(|i| format!(
                        ", s{i} AS (SELECT device_id, overlay(s placing s from 1 for 0) AS s FROM s{})",
                        i - 1
                    ))
                    .collect::<String>()
            ),
        ];
        for sql in cases {
            validate(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            let e = run(limits, sql, window(100)).unwrap_err();
            assert!(
                e.message.contains("Resources exhausted") && e.message.contains("over the limit"),
                "{sql}: {e}"
            );
        }
    }

    #[test]
    fn growing_functions_share_one_budget_per_evaluation() {
        let limits = Limits {
            memory_bytes: 1 << 20,
            ..Limits::default()
        };
        // Each call makes about 100 KB, within its own bound of 256 KB; 20 make 2 MB.
        let columns: String = (0..20)
            .map(|i| format!(", repeat(device_id, {}) AS c{i}", 2000 + i))
            .collect();
        let sql = format!("SELECT device_id{columns} FROM vitals");
        validate(&sql).unwrap();
        let e = run(limits, &sql, window(10)).unwrap_err();
        assert!(e.message.contains("for one evaluation"), "{e}");
        // Each evaluation starts afresh.
        let sql = "SELECT device_id, repeat(device_id, 2000) AS message FROM vitals";
        let evaluator = Evaluator::new(limits);
        on_sql_stack(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            for _ in 0..30 {
                assert_eq!(
                    runtime
                        .block_on(evaluator.run(sql, vec![window(10)]))
                        .unwrap()
                        .len(),
                    10
                );
            }
        });
    }

    #[test]
    fn results_of_unbounded_size_are_refused() {
        for (sql, expected) in [
            (
                "SELECT device_id, array_agg(hr) OVER () AS l FROM vitals",
                "lists, maps and structs",
            ),
            (
                "SELECT device_id, array_agg(hr) OVER (ORDER BY ts ROWS UNBOUNDED PRECEDING) \
                 AS l FROM vitals",
                "lists, maps and structs",
            ),
            (
                "SELECT device_id, length(string_agg(device_id, ',') OVER ()) AS value \
                 FROM vitals",
                "not allowed over a window",
            ),
            (
                "SELECT device_id, string_agg(device_id, ',') OVER (ORDER BY ts) AS message \
                 FROM vitals",
                "not allowed over a window",
            ),
            (
                "SELECT v.device_id FROM vitals v, \
                 (SELECT unnest(l) AS x FROM (SELECT array_agg(hr) AS l FROM vitals)) u",
                "not allowed",
            ),
            (
                "SELECT device_id, named_struct('a', hr) AS s FROM vitals",
                "lists, maps and structs",
            ),
        ] {
            let e = refused(sql);
            assert!(e.message.contains(expected), "{sql}: {e}");
        }
        // Aggregates of bounded size stay allowed over a window, and lists in GROUP BY
        // results are not needed by any rule.
        validate(
            "SELECT device_id, avg(hr) OVER (PARTITION BY device_id) AS value, \
             first_value(device_id) OVER (ORDER BY ts) AS message FROM vitals",
        )
        .unwrap();
    }

    #[test]
    fn functions_of_super_linear_cost_are_refused() {
        let started = Instant::now();
        for sql in [
            "SELECT device_id, levenshtein(repeat('a', 100000), repeat('b', 100000)) AS value \
             FROM vitals",
            "SELECT device_id, levenshtein(device_id, ward) AS value FROM vitals",
            "SELECT device_id FROM vitals WHERE LEVENSHTEIN(device_id, 'x') > 1",
        ] {
            let e = refused(sql);
            assert!(
                e.message.contains("levenshtein() is not allowed"),
                "{sql}: {e}"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn exponential_cte_references_are_refused() {
        let sql = format!(
            "WITH s0 AS (SELECT device_id FROM vitals){} SELECT device_id FROM s12",
            (1..=12)
                .map(|i| {
                    let p = i - 1;
                    format!(", s{i} AS (SELECT a.device_id FROM s{p} a, s{p} b, s{p} c, s{p} d)")
                })
                .collect::<String>()
        );
        let started = Instant::now();
        let e = refused(&sql);
        assert!(e.message.contains("reference CTEs fewer times"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // A CTE used a few times is fine.
        validate(
            "WITH h AS (SELECT device_id, hr FROM vitals) \
             SELECT a.device_id FROM h a JOIN h b ON a.device_id = b.device_id",
        )
        .unwrap();
    }

    #[test]
    fn a_result_past_its_row_limit_fails() {
        let sql = "SELECT a.device_id FROM vitals a, vitals b";
        let started = Instant::now();
        let e = run(Limits::default(), sql, window(1000)).unwrap_err();
        assert!(e.message.contains("more than 10000 rows"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            run(Limits::default(), sql, window(100)).unwrap().len(),
            10_000
        );
    }

    #[test]
    fn the_concatenation_operator_keeps_its_meaning_and_its_column_name() {
        let sql = "SELECT device_id, device_id || '/' || ward, NULL || device_id AS message, \
                   'n' || 1 AS patient_id FROM vitals";
        let plan = on_sql_stack(|| {
            futures_executor::block_on(Evaluator::new(Limits::default()).plan(sql, Vec::new()))
        })
        .unwrap();
        let names: Vec<String> = (plan.schema().fields().iter())
            .map(|f| f.name().clone())
            .collect();
        assert!(names[1].contains(" || "), "{names:?}");
        let rows = run(Limits::default(), sql, window(10)).unwrap();
        assert_eq!(rows[0].message, None, "NULL || x is NULL");
        assert_eq!(rows[0].patient_id.as_deref(), Some("n1"));
    }
}
