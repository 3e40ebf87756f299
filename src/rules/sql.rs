//! SQL rules: a SELECT an analyst writes, run by DataFusion at each window close over the
//! window's readings, the table `vitals`. Every row it returns is a match. The contract
//! (columns, what a row means, limits) is in the README's "SQL rules".
//!
//! A statement is accepted only if it is one query whose every table is `vitals`: no DDL,
//! DML, COPY, `SET`, recursive CTEs, table functions or other tables, so nothing reads a file
//! or the network. Each evaluation runs under a memory limit and a time limit.

use crate::model::{Id, Millis, Sample, Vital};
use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, Float64Builder, RecordBatch, StringArray, StringViewBuilder,
    TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::MemTable;
use datafusion::common::config::Dialect;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, collect,
};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;
use futures_util::StreamExt;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
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
    fn new(message: impl Into<String>) -> SqlError {
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

/// Runs statements over windows, in one DataFusion session with its limits.
pub struct Evaluator {
    ctx: SessionContext,
    limits: Limits,
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
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .build();
        Evaluator {
            ctx: SessionContext::new_with_state(state),
            limits,
        }
    }

    /// Plans `sql` over `vitals` holding `batches`, refusing anything but one query over it.
    async fn plan(&self, sql: &str, batches: Vec<RecordBatch>) -> Result<LogicalPlan, SqlError> {
        self.ctx.deregister_table(TABLE)?;
        let table = MemTable::try_new(schema(), vec![batches])?;
        self.ctx.register_table(TABLE, Arc::new(table))?;
        let state = self.ctx.state();
        let statement = (state.sql_to_statement(sql, &Dialect::Generic))
            .map_err(|e| SqlError::at_end_of(e, sql))?;
        match &statement {
            DfStatement::Statement(s) if matches!(**s, Statement::Query(_)) => {}
            _ => {
                return Err(SqlError::new(
                    "only a SELECT over `vitals` is allowed (no DDL, DML, COPY, SET or EXPLAIN)",
                ));
            }
        }
        let plan = state.statement_to_plan(statement).await?;
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
            None => Ok(plan),
        }
    }

    /// Checks a statement without data: it must plan over `vitals` and return a string
    /// column `patient_id` or `device_id`; `value` must be numeric and `message` text.
    pub async fn validate(&self, sql: &str) -> Result<(), SqlError> {
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
        Ok(())
    }

    /// Runs `sql` over one window's readings (batches of [`schema`]); every row it returns
    /// is a match.
    pub async fn run(&self, sql: &str, batches: Vec<RecordBatch>) -> Result<Vec<Match>, SqlError> {
        let deadline = Instant::now() + self.limits.time;
        let overrun = format!(
            "the statement ran longer than its limit of {:?} and was stopped",
            self.limits.time
        );
        let work = async {
            let plan = self.plan(sql, batches).await?;
            let frame = self.ctx.execute_logical_plan(plan).await?;
            let task = frame.task_ctx();
            let physical = frame.create_physical_plan().await?;
            let physical = with_deadline(physical, deadline, &overrun)?;
            Ok::<_, SqlError>(collect(physical, Arc::new(task)).await?)
        };
        // The timer stops a statement that waits; the deadline on every operator stops one
        // that computes without ever waiting.
        let batches = match tokio::time::timeout(self.limits.time, work).await {
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

/// Validates a statement (for pipelines and the API), outside any async runtime's worker.
pub fn validate(sql: &str) -> Result<(), SqlError> {
    let evaluator = Evaluator::new(Limits::default());
    futures_executor::block_on(evaluator.validate(sql))
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(Evaluator::new(limits).run(sql, batch))
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
}
