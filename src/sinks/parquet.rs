//! The embedded reading store: Parquet files in one directory, Snappy-compressed.
//!
//! Readings go to `readings-<unix ms of file start>-<n>.parquet`, alert transitions to
//! `alerts-<unix ms>-<n>.parquet`. A file is written as `*.parquet.tmp` and renamed only once
//! it is complete (on roll or [`Storage::close`]), so a reader never sees a half-written file.
//! A new file starts after `max_rows_per_file` rows or `roll_interval`, whichever comes first.

use super::{Storage, StorageError};
use crate::alerts::AlertEvent;
use crate::model::{Sample, Vital, now_millis};
use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, StringBuilder, TimestampMicrosecondBuilder,
    TimestampMillisecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of the Parquet store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParquetConfig {
    /// Directory the files are written to; created when missing.
    pub dir: PathBuf,
    /// A file is closed and a new one started after this many rows.
    pub max_rows_per_file: usize,
    /// A file is closed and a new one started after this long, so recent data becomes
    /// readable even at a low rate ("5m").
    #[serde(with = "humantime_serde")]
    pub roll_interval: Duration,
    /// Rows per Parquet row group; a `flush` also ends the current row group.
    pub row_group_rows: usize,
}

impl Default for ParquetConfig {
    fn default() -> Self {
        ParquetConfig {
            dir: PathBuf::from("data"),
            max_rows_per_file: 1_000_000,
            roll_interval: Duration::from_secs(5 * 60),
            row_group_rows: 65_536,
        }
    }
}

/// Writes readings and alert transitions to rolling Parquet files.
pub struct ParquetStorage {
    files: FileSettings,
    readings: Table<ReadingColumns>,
    alerts: Table<AlertColumns>,
}

impl ParquetStorage {
    /// Creates the directory and checks that it is writable, so a bad path fails at start.
    pub fn open(config: &ParquetConfig) -> Result<Self, StorageError> {
        if config.max_rows_per_file == 0 || config.row_group_rows == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "parquet: max_rows_per_file and row_group_rows must be at least 1",
            )
            .into());
        }
        let dir = &config.dir;
        let context = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("parquet directory {}: {e}", dir.display()),
            )
        };
        fs::create_dir_all(dir).map_err(context)?;
        let probe = dir.join(".vitalstream-write-probe");
        File::create(&probe).map_err(context)?;
        fs::remove_file(&probe).map_err(context)?;
        warn_about_leftovers(dir);

        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(config.row_group_rows))
            .build();
        Ok(ParquetStorage {
            files: FileSettings {
                dir: dir.clone(),
                max_rows: config.max_rows_per_file,
                roll_interval: config.roll_interval,
                props,
            },
            readings: Table::new("readings"),
            alerts: Table::new("alerts"),
        })
    }
}

impl Storage for ParquetStorage {
    fn write_readings(&mut self, readings: &[Sample]) -> Result<(), StorageError> {
        self.readings.write(readings, &self.files)
    }

    fn write_alerts(&mut self, events: &[AlertEvent]) -> Result<(), StorageError> {
        self.alerts.write(events, &self.files)
    }

    fn flush(&mut self) -> Result<(), StorageError> {
        self.readings.flush(&self.files)?;
        self.alerts.flush(&self.files)
    }

    fn close(&mut self) -> Result<(), StorageError> {
        let readings = self.readings.close_file();
        let alerts = self.alerts.close_file();
        readings.and(alerts)
    }
}

impl Drop for ParquetStorage {
    /// Completes the open files if `close` was not called, so their rows are not left in
    /// `.tmp` files.
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "parquet: closing files on drop failed");
        }
    }
}

/// A `.tmp` file left by a crash has no footer, so no reader can open it; say so once at start.
fn warn_about_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let leftovers = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet.tmp"))
        .count();
    if leftovers > 0 {
        tracing::warn!(
            dir = %dir.display(), leftovers,
            "parquet: incomplete .parquet.tmp files from an earlier run were left in place"
        );
    }
}

/// What every file of the store shares.
struct FileSettings {
    dir: PathBuf,
    max_rows: usize,
    roll_interval: Duration,
    props: WriterProperties,
}

/// The Arrow columns of one kind of row, built up and emptied batch by batch.
trait Columns: Default {
    type Row;
    fn schema() -> Schema;
    fn append(&mut self, row: &Self::Row);
    /// The columns of the rows appended so far, in schema order; leaves the builders empty.
    fn finish(&mut self) -> Vec<ArrayRef>;
}

/// One kind of row (readings or alerts): its builders and its open file, if any.
struct Table<C> {
    prefix: &'static str,
    schema: SchemaRef,
    columns: C,
    file: Option<OpenFile>,
    files_started: u64,
}

/// A file being written, under its `.tmp` name.
struct OpenFile {
    writer: ArrowWriter<File>,
    tmp_path: PathBuf,
    path: PathBuf,
    rows: usize,
    started: Instant,
}

impl<C: Columns> Table<C> {
    fn new(prefix: &'static str) -> Self {
        Table {
            prefix,
            schema: Arc::new(C::schema()),
            columns: C::default(),
            file: None,
            files_started: 0,
        }
    }

    fn write(&mut self, rows: &[C::Row], files: &FileSettings) -> Result<(), StorageError> {
        let mut rest = rows;
        while !rest.is_empty() {
            if self
                .file
                .as_ref()
                .is_some_and(|f| f.started.elapsed() >= files.roll_interval)
            {
                self.close_file()?;
            }
            let file = match &mut self.file {
                Some(file) => file,
                none => {
                    let number = self.files_started;
                    self.files_started += 1;
                    none.insert(OpenFile::create(files, self.prefix, number, &self.schema)?)
                }
            };
            let (chunk, tail) = rest.split_at(rest.len().min(files.max_rows - file.rows));
            for row in chunk {
                self.columns.append(row);
            }
            let batch = RecordBatch::try_new(self.schema.clone(), self.columns.finish())?;
            file.writer.write(&batch)?;
            file.rows += chunk.len();
            if file.rows >= files.max_rows {
                self.close_file()?;
            }
            rest = tail;
        }
        Ok(())
    }

    /// Ends the current row group and syncs the file; completes it when its time is up.
    fn flush(&mut self, files: &FileSettings) -> Result<(), StorageError> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        if file.started.elapsed() >= files.roll_interval {
            return self.close_file();
        }
        file.writer.flush()?;
        file.writer.sync()?;
        file.writer.inner().sync_data()?;
        Ok(())
    }

    /// Writes the footer, syncs, and renames the file to its final name. Does nothing when
    /// no file is open.
    fn close_file(&mut self) -> Result<(), StorageError> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        file.writer.finish()?;
        file.writer.inner().sync_all()?;
        fs::rename(&file.tmp_path, &file.path)?;
        // Make the rename itself durable.
        if let Some(dir) = file.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        tracing::debug!(path = %file.path.display(), rows = file.rows, "parquet: file complete");
        Ok(())
    }
}

impl OpenFile {
    fn create(
        files: &FileSettings,
        prefix: &str,
        number: u64,
        schema: &SchemaRef,
    ) -> Result<OpenFile, StorageError> {
        let path = files
            .dir
            .join(format!("{prefix}-{}-{number}.parquet", now_millis()));
        let tmp_path = path.with_extension("parquet.tmp");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)?;
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(files.props.clone()))?;
        Ok(OpenFile {
            writer,
            tmp_path,
            path,
            rows: 0,
            started: Instant::now(),
        })
    }
}

fn utc_millis() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn utc_millis_builder() -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::new().with_timezone("UTC")
}

/// Columns of the `readings-*` files.
struct ReadingColumns {
    time: TimestampMillisecondBuilder,
    device_id: StringBuilder,
    patient_id: StringBuilder,
    vitals: [Float64Builder; 6],
    seq: UInt64Builder,
    received_at: TimestampMicrosecondBuilder,
    correlation_id: StringBuilder,
    late: BooleanBuilder,
    /// Scratch for formatting correlation ids.
    text: String,
}

impl Default for ReadingColumns {
    fn default() -> Self {
        ReadingColumns {
            time: utc_millis_builder(),
            device_id: StringBuilder::new(),
            patient_id: StringBuilder::new(),
            vitals: Default::default(),
            seq: UInt64Builder::new(),
            received_at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            correlation_id: StringBuilder::new(),
            late: BooleanBuilder::new(),
            text: String::new(),
        }
    }
}

impl Columns for ReadingColumns {
    type Row = Sample;

    fn schema() -> Schema {
        let mut fields = vec![
            Field::new("time", utc_millis(), false),
            Field::new("device_id", DataType::Utf8, false),
            Field::new("patient_id", DataType::Utf8, true),
        ];
        fields.extend(Vital::ALL.map(|v| Field::new(v.name(), DataType::Float64, true)));
        fields.extend([
            Field::new("seq", DataType::UInt64, true),
            Field::new(
                "received_at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("correlation_id", DataType::Utf8, false),
            Field::new("late", DataType::Boolean, false),
        ]);
        Schema::new(fields)
    }

    fn append(&mut self, s: &Sample) {
        self.time.append_value(s.ts);
        self.device_id.append_value(&s.device_id);
        self.patient_id.append_option(s.patient_id.as_ref());
        for (builder, vital) in self.vitals.iter_mut().zip(Vital::ALL) {
            builder.append_option(s.vitals.get(vital));
        }
        self.seq.append_option(s.seq);
        self.received_at.append_value(s.received_us);
        append_display(&mut self.correlation_id, &mut self.text, &s.correlation_id);
        self.late.append_value(s.late);
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.device_id.finish()),
            Arc::new(self.patient_id.finish()),
        ];
        columns.extend(
            self.vitals
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        columns.extend([
            Arc::new(self.seq.finish()) as ArrayRef,
            Arc::new(self.received_at.finish()),
            Arc::new(self.correlation_id.finish()),
            Arc::new(self.late.finish()),
        ]);
        columns
    }
}

/// Columns of the `alerts-*` files.
struct AlertColumns {
    at: TimestampMillisecondBuilder,
    event: StringBuilder,
    alert_id: StringBuilder,
    rule_id: StringBuilder,
    priority: StringBuilder,
    state: StringBuilder,
    subject: StringBuilder,
    patient_id: StringBuilder,
    device_id: StringBuilder,
    value: Float64Builder,
    window_start: TimestampMillisecondBuilder,
    window_end: TimestampMillisecondBuilder,
    correlation_id: StringBuilder,
    event_ts: TimestampMillisecondBuilder,
    /// Scratch for formatting correlation ids.
    text: String,
}

impl Default for AlertColumns {
    fn default() -> Self {
        AlertColumns {
            at: utc_millis_builder(),
            event: StringBuilder::new(),
            alert_id: StringBuilder::new(),
            rule_id: StringBuilder::new(),
            priority: StringBuilder::new(),
            state: StringBuilder::new(),
            subject: StringBuilder::new(),
            patient_id: StringBuilder::new(),
            device_id: StringBuilder::new(),
            value: Float64Builder::new(),
            window_start: utc_millis_builder(),
            window_end: utc_millis_builder(),
            correlation_id: StringBuilder::new(),
            event_ts: utc_millis_builder(),
            text: String::new(),
        }
    }
}

impl Columns for AlertColumns {
    type Row = AlertEvent;

    fn schema() -> Schema {
        let text = |name| Field::new(name, DataType::Utf8, false);
        Schema::new(vec![
            Field::new("at", utc_millis(), false),
            text("event"),
            text("alert_id"),
            text("rule_id"),
            text("priority"),
            text("state"),
            text("subject"),
            Field::new("patient_id", DataType::Utf8, true),
            text("device_id"),
            Field::new("value", DataType::Float64, true),
            Field::new("window_start", utc_millis(), true),
            Field::new("window_end", utc_millis(), true),
            text("correlation_id"),
            Field::new("event_ts", utc_millis(), false),
        ])
    }

    fn append(&mut self, e: &AlertEvent) {
        let a = &e.alert;
        self.at.append_value(e.at);
        self.event.append_value(e.event.name());
        self.alert_id.append_value(&a.alert_id);
        self.rule_id.append_value(&a.rule_id);
        self.priority.append_value(a.priority.name());
        self.state.append_value(a.state.name());
        self.subject.append_value(&a.subject);
        self.patient_id.append_option(a.patient_id.as_ref());
        let t = &a.trigger;
        self.device_id.append_value(&t.device_id);
        self.value
            .append_option((!t.value.is_nan()).then_some(t.value));
        self.window_start.append_option(t.window.map(|w| w.0));
        self.window_end.append_option(t.window.map(|w| w.1));
        append_display(&mut self.correlation_id, &mut self.text, &t.correlation_id);
        self.event_ts.append_value(t.event_ts);
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.at.finish()),
            Arc::new(self.event.finish()),
            Arc::new(self.alert_id.finish()),
            Arc::new(self.rule_id.finish()),
            Arc::new(self.priority.finish()),
            Arc::new(self.state.finish()),
            Arc::new(self.subject.finish()),
            Arc::new(self.patient_id.finish()),
            Arc::new(self.device_id.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.window_start.finish()),
            Arc::new(self.window_end.finish()),
            Arc::new(self.correlation_id.finish()),
            Arc::new(self.event_ts.finish()),
        ]
    }
}

/// Appends `value`'s `Display` form, formatted in a reused scratch string.
fn append_display(
    builder: &mut StringBuilder,
    scratch: &mut String,
    value: &impl std::fmt::Display,
) {
    use std::fmt::Write;
    scratch.clear();
    let _ = write!(scratch, "{value}");
    builder.append_value(&*scratch);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{Alert, Transition};
    use crate::model::{CorrelationId, Vitals};
    use arrow::array::{
        Array, BooleanArray, Float64Array, StringArray, TimestampMicrosecondArray,
        TimestampMillisecondArray, UInt64Array,
    };
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn sample(i: u64) -> Sample {
        let mut vitals = Vitals::default();
        vitals.set(Vital::Hr, 70.0 + i as f64);
        if i.is_multiple_of(2) {
            vitals.set(Vital::Spo2, 97.5);
        }
        Sample {
            device_id: format!("dev-{}", i % 3).into(),
            patient_id: i.is_multiple_of(2).then(|| "pat-1".into()),
            ts: 1_700_000_000_000 + i as i64,
            device_ts: true,
            received_us: 1_700_000_000_000_000 + i as i64,
            vitals,
            seq: (i % 2 == 1).then_some(i),
            correlation_id: CorrelationId::Generated(i),
            late: i == 3,
            warmup: false,
        }
    }

    fn alert_event(value: f64, window: Option<(i64, i64)>) -> AlertEvent {
        AlertEvent {
            event: Transition::Raised,
            at: 1_700_000_000_500,
            alert: test_alert(value, window),
        }
    }

    /// A firing alert, made by the alert book (`Alert` has private fields).
    fn test_alert(value: f64, window: Option<(i64, i64)>) -> Alert {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let book = crate::alerts::AlertBook::new(tx, Default::default());
        let rule = crate::rules::parse_pipeline(
            "[[rule]]\nid='hr_high'\nkind='threshold'\npriority='high'\nmessage='HR high'\ncondition='hr > 120'\n",
        )
        .unwrap()
        .rules[0]
            .clone();
        book.signal(crate::alerts::Signal {
            cause: crate::alerts::Cause::of(&rule),
            patient_id: None,
            edge: crate::rules::threshold::Edge::Raise,
            trigger: crate::alerts::Trigger {
                device_id: "dev-1".into(),
                value,
                window,
                correlation_id: CorrelationId::Given("c-1".into()),
                event_ts: 1_700_000_000_000,
            },
            received_us: crate::model::now_micros(),
            quiet: false,
        });
        rx.try_recv().unwrap().alert
    }

    fn config(dir: &Path) -> ParquetConfig {
        ParquetConfig {
            dir: dir.to_path_buf(),
            ..ParquetConfig::default()
        }
    }

    /// Sorted file names in `dir`.
    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn read(path: &Path) -> Vec<RecordBatch> {
        let file = File::open(path).unwrap();
        ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
        batch
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<T>()
            .unwrap()
    }

    #[test]
    fn readings_round_trip_with_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = ParquetStorage::open(&config(dir.path())).unwrap();
        let samples: Vec<Sample> = (0..5).map(sample).collect();
        storage.write_readings(&samples[..2]).unwrap();
        storage.flush().unwrap();
        storage.write_readings(&samples[2..]).unwrap();
        storage.close().unwrap();

        let names = files(dir.path());
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("readings-") && names[0].ends_with("-0.parquet"));
        let batches = read(&dir.path().join(&names[0]));
        let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        assert_eq!(batch.num_rows(), 5);
        assert_eq!(batch.schema().as_ref(), &ReadingColumns::schema());

        let time = column::<TimestampMillisecondArray>(&batch, "time");
        let device = column::<StringArray>(&batch, "device_id");
        let patient = column::<StringArray>(&batch, "patient_id");
        let hr = column::<Float64Array>(&batch, "hr");
        let spo2 = column::<Float64Array>(&batch, "spo2");
        let temp = column::<Float64Array>(&batch, "temp");
        let seq = column::<UInt64Array>(&batch, "seq");
        let received = column::<TimestampMicrosecondArray>(&batch, "received_at");
        let correlation = column::<StringArray>(&batch, "correlation_id");
        let late = column::<BooleanArray>(&batch, "late");
        for (row, s) in samples.iter().enumerate() {
            assert_eq!(time.value(row), s.ts);
            assert_eq!(device.value(row), s.device_id.as_str());
            assert_eq!(
                patient.is_valid(row).then(|| patient.value(row)),
                s.patient_id.as_deref()
            );
            assert_eq!(hr.value(row), s.vitals.get(Vital::Hr).unwrap());
            assert_eq!(
                spo2.is_valid(row).then(|| spo2.value(row)),
                s.vitals.get(Vital::Spo2)
            );
            assert!(temp.is_null(row));
            assert_eq!(seq.is_valid(row).then(|| seq.value(row)), s.seq);
            assert_eq!(received.value(row), s.received_us);
            assert_eq!(correlation.value(row), s.correlation_id.to_string());
            assert_eq!(late.value(row), s.late);
        }
    }

    #[test]
    fn alerts_round_trip_with_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = ParquetStorage::open(&config(dir.path())).unwrap();
        let events = [
            alert_event(131.0, None),
            alert_event(f64::NAN, Some((1_000, 61_000))),
        ];
        storage.write_alerts(&events).unwrap();
        storage.close().unwrap();

        let names = files(dir.path());
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("alerts-"));
        let batches = read(&dir.path().join(&names[0]));
        assert_eq!(batches.len(), 1);
        let batch = &batches[0];
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema().as_ref(), &AlertColumns::schema());

        let text = |name, row| column::<StringArray>(batch, name).value(row).to_string();
        assert_eq!(
            column::<TimestampMillisecondArray>(batch, "at").value(0),
            1_700_000_000_500
        );
        assert_eq!(text("event", 0), "raised");
        assert_eq!(text("rule_id", 0), "hr_high");
        assert_eq!(text("priority", 0), "high");
        assert_eq!(text("state", 0), "firing");
        assert_eq!(text("subject", 0), "dev-1");
        assert_eq!(text("device_id", 1), "dev-1");
        assert_eq!(text("correlation_id", 1), "c-1");
        assert!(text("alert_id", 0).starts_with("alr-"));
        assert!(column::<StringArray>(batch, "patient_id").is_null(0));
        let value = column::<Float64Array>(batch, "value");
        assert_eq!(value.value(0), 131.0);
        assert!(value.is_null(1), "NaN is stored as null");
        let start = column::<TimestampMillisecondArray>(batch, "window_start");
        let end = column::<TimestampMillisecondArray>(batch, "window_end");
        assert!(start.is_null(0) && end.is_null(0));
        assert_eq!((start.value(1), end.value(1)), (1_000, 61_000));
        let event_ts = column::<TimestampMillisecondArray>(batch, "event_ts");
        assert_eq!(event_ts.value(1), 1_700_000_000_000);
    }

    #[test]
    fn rolls_by_rows_and_leaves_no_tmp_after_close() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = ParquetStorage::open(&ParquetConfig {
            max_rows_per_file: 4,
            row_group_rows: 2,
            ..config(dir.path())
        })
        .unwrap();
        let samples: Vec<Sample> = (0..10).map(sample).collect();
        storage.write_readings(&samples[..3]).unwrap();
        storage.write_readings(&samples[3..]).unwrap();

        let names = files(dir.path());
        assert_eq!(
            names.iter().filter(|n| n.ends_with(".parquet")).count(),
            2,
            "{names:?}"
        );
        assert_eq!(
            names.iter().filter(|n| n.ends_with(".parquet.tmp")).count(),
            1
        );

        storage.close().unwrap();
        storage.close().unwrap();
        let names = files(dir.path());
        assert!(names.iter().all(|n| n.ends_with(".parquet")), "{names:?}");
        let mut counts = Vec::new();
        let mut hr = Vec::new();
        for name in &names {
            let batches = read(&dir.path().join(name));
            counts.push(batches.iter().map(RecordBatch::num_rows).sum::<usize>());
            for b in &batches {
                hr.extend(column::<Float64Array>(b, "hr").values().iter().copied());
            }
        }
        counts.sort();
        assert_eq!(counts, [2, 4, 4]);
        hr.sort_by(f64::total_cmp);
        assert_eq!(hr, (0..10).map(|i| 70.0 + i as f64).collect::<Vec<_>>());
    }

    #[test]
    fn rolls_by_time_on_flush() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = ParquetStorage::open(&ParquetConfig {
            roll_interval: Duration::ZERO,
            ..config(dir.path())
        })
        .unwrap();
        storage.write_readings(&[sample(0)]).unwrap();
        storage.flush().unwrap();
        storage.write_readings(&[sample(1)]).unwrap();
        storage.write_readings(&[sample(2)]).unwrap();
        let names = files(dir.path());
        assert_eq!(
            names.iter().filter(|n| n.ends_with(".parquet")).count(),
            2,
            "{names:?}"
        );
        drop(storage);
        assert_eq!(files(dir.path()).len(), 3, "drop completes the open file");
    }

    #[test]
    fn nothing_written_leaves_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = ParquetStorage::open(&config(dir.path())).unwrap();
        storage.flush().unwrap();
        storage.close().unwrap();
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn an_unwritable_directory_fails_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        fs::write(&not_a_dir, b"x").unwrap();
        let err = ParquetStorage::open(&config(&not_a_dir.join("sub")))
            .err()
            .unwrap();
        assert!(err.to_string().contains("sub"), "{err}");
    }

    #[test]
    fn config_reads_human_durations_and_rejects_unknown_fields() {
        let c: ParquetConfig = toml::from_str("dir = 'x'\nroll_interval = '30s'").unwrap();
        assert_eq!(c.roll_interval, Duration::from_secs(30));
        assert_eq!(c.max_rows_per_file, 1_000_000);
        assert!(toml::from_str::<ParquetConfig>("rolls = '30s'").is_err());
    }
}
