//! What the writer sends to PostgreSQL, and how: rows, and one call per batch.
//!
//! Readings go by binary COPY straight into `device_vitals`, in one transaction. If any of
//! them is already stored — a batch retried after a lost commit, replayed from the spool, or
//! sent again by a replayed stream — the unique key (device_id, time) refuses the COPY, the
//! transaction rolls back, and the batch goes again through a temporary table and
//! `INSERT … SELECT … ON CONFLICT DO NOTHING`. Either way no reading is stored twice; the
//! common case pays only for the COPY (the bench measures both). Alert transitions are few; they go row by row, each into
//! `alert_events` and onto the alert's current state in `alerts`.

use crate::alerts::AlertEvent;
use crate::model::{Id, Sample};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error};

/// One row of `device_vitals`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitalRow {
    /// Event time, µs since the epoch: the device's `ts`, else the receive time at full
    /// precision (so two readings of a clock-less device in one millisecond stay apart).
    pub time_us: i64,
    pub device_id: Id,
    pub patient_id: Option<Id>,
    /// hr, spo2, temp, sys_bp, dia_bp, rr.
    pub vitals: [Option<f64>; 6],
    pub seq: Option<i64>,
    pub received_us: i64,
}

impl From<&Sample> for VitalRow {
    fn from(s: &Sample) -> VitalRow {
        VitalRow {
            time_us: if s.device_ts {
                s.ts.saturating_mul(1000)
            } else {
                s.received_us
            },
            device_id: s.device_id.clone(),
            patient_id: s.patient_id.clone(),
            vitals: s.vitals.0.map(|v| (!v.is_nan()).then_some(v)),
            // Sequence numbers above i64::MAX do not fit PostgreSQL's bigint; the reading is
            // kept, without its seq (the unique key is device and time).
            seq: s.seq.and_then(|n| i64::try_from(n).ok()),
            received_us: s.received_us,
        }
    }
}

/// One alert transition: a row of `alert_events`, and the alert's state after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRow {
    pub alert_id: String,
    pub event: String,
    pub at_ms: i64,
    pub rule_id: String,
    pub priority: String,
    pub message: String,
    pub state: String,
    pub subject: Id,
    pub patient_id: Option<Id>,
    pub device_id: Id,
    pub value: Option<f64>,
    pub window_ms: Option<(i64, i64)>,
    pub correlation_id: String,
    pub event_ts_ms: i64,
    pub raised_at_ms: Option<i64>,
    #[serde(default)]
    pub escalation: u32,
    #[serde(default)]
    pub escalated_at_ms: Option<i64>,
    pub acknowledged_at_ms: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub resolved_at_ms: Option<i64>,
    pub resolved_by: Option<String>,
}

impl From<&AlertEvent> for AlertRow {
    fn from(e: &AlertEvent) -> AlertRow {
        let a = &e.alert;
        AlertRow {
            alert_id: a.alert_id.clone(),
            event: e.event.name().into(),
            at_ms: e.at,
            rule_id: a.rule_id.to_string(),
            priority: a.priority.name().into(),
            message: a.message.to_string(),
            state: a.state.name().into(),
            subject: a.subject.clone(),
            patient_id: a.patient_id.clone(),
            device_id: a.trigger.device_id.clone(),
            value: a.trigger.value.is_finite().then_some(a.trigger.value),
            window_ms: a.trigger.window,
            correlation_id: a.trigger.correlation_id.to_string(),
            event_ts_ms: a.trigger.event_ts,
            raised_at_ms: a.raised_at,
            escalation: a.escalation,
            escalated_at_ms: a.escalated_at,
            acknowledged_at_ms: a.acknowledged_at,
            acknowledged_by: a.acknowledged_by.clone(),
            resolved_at_ms: a.resolved_at,
            resolved_by: a.resolved_by.clone(),
        }
    }
}

impl AlertRow {
    fn actor(&self) -> Option<&str> {
        match self.event.as_str() {
            "acknowledged" => self.acknowledged_by.as_deref(),
            "resolved" => self.resolved_by.as_deref(),
            _ => None,
        }
    }

    /// 1 raised, 2 escalated, 3 acknowledged, 4 resolved: the current state never moves
    /// backwards when an older transition arrives late (from the spool).
    fn rank(&self) -> i16 {
        match self.event.as_str() {
            "raised" => 1,
            "escalated" => 2,
            "acknowledged" => 3,
            _ => 4,
        }
    }

    /// The escalation level of an `escalated` event; 0 for the others.
    fn level(&self) -> i32 {
        match self.event.as_str() {
            "escalated" => self.escalation as i32,
            _ => 0,
        }
    }
}

/// A unit of work for the database, and of the spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Batch {
    Readings(Vec<VitalRow>),
    Alerts(Vec<AlertRow>),
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Batch::Readings(r) => r.len(),
            Batch::Alerts(a) => a.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn micros_to_time(us: i64) -> SystemTime {
    let d = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

fn millis_to_time(ms: i64) -> SystemTime {
    micros_to_time(ms.saturating_mul(1000))
}

pub fn time_to_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

const COLUMNS: &str =
    "time, device_id, patient_id, hr, spo2, temp, sys_bp, dia_bp, rr, seq, received_at";
const TYPES: [Type; 11] = [
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::INT8,
    Type::TIMESTAMPTZ,
];

/// A reading's values in [`COLUMNS`] order, as statement parameters.
struct Params<'a> {
    row: &'a VitalRow,
    device_id: &'a str,
    patient_id: Option<&'a str>,
    time: SystemTime,
    received: SystemTime,
}

impl<'a> Params<'a> {
    fn of(row: &'a VitalRow) -> Params<'a> {
        Params {
            row,
            device_id: row.device_id.as_str(),
            patient_id: row.patient_id.as_deref(),
            time: micros_to_time(row.time_us),
            received: micros_to_time(row.received_us),
        }
    }

    fn values(&self) -> [&(dyn ToSql + Sync); 11] {
        let [hr, spo2, temp, sys, dia, rr] = &self.row.vitals;
        [
            &self.time,
            &self.device_id,
            &self.patient_id,
            hr,
            spo2,
            temp,
            sys,
            dia,
            rr,
            &self.row.seq,
            &self.received,
        ]
    }
}

/// How a batch of readings goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// COPY into a temporary table, then insert with conflict skipping: never a duplicate.
    Staged,
    /// COPY straight into `device_vitals`: fastest, but a batch with a reading already
    /// stored fails as a whole (and changes nothing).
    Direct,
}

/// What the writer does: [`CopyMode::Direct`], and [`CopyMode::Staged`] when the batch
/// holds a reading already stored. Returns how many readings were new.
pub async fn store_readings(
    client: &mut Client,
    rows: &[VitalRow],
    links: &[Link],
) -> Result<u64, Error> {
    match copy_readings(client, rows, links, CopyMode::Direct).await {
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            copy_readings(client, rows, links, CopyMode::Staged).await
        }
        result => result,
    }
}

/// A row of `patient_devices`: a patient, a UTC day (days since the epoch), a device.
pub type Link = (Id, i32, Id);

/// The distinct links of a batch's readings.
pub fn links_of(rows: &[VitalRow]) -> Vec<Link> {
    let mut links: Vec<Link> = rows
        .iter()
        .filter_map(|r| {
            let patient = r.patient_id.clone()?;
            Some((
                patient,
                super::schema::day_of(r.time_us),
                r.device_id.clone(),
            ))
        })
        .collect();
    links.sort_unstable();
    links.dedup();
    links
}

/// Writes readings, and the `links` they bring to `patient_devices`, in one transaction;
/// returns how many readings were new (the rest were already stored).
pub async fn copy_readings(
    client: &mut Client,
    rows: &[VitalRow],
    links: &[Link],
    mode: CopyMode,
) -> Result<u64, Error> {
    let tx = client.transaction().await?;
    if !links.is_empty() {
        let patients: Vec<&str> = links.iter().map(|l| l.0.as_str()).collect();
        let days: Vec<i32> = links.iter().map(|l| l.1).collect();
        let devices: Vec<&str> = links.iter().map(|l| l.2.as_str()).collect();
        tx.execute(
            "INSERT INTO patient_devices (patient_id, day, device_id) \
             SELECT p, DATE '1970-01-01' + d, v \
             FROM unnest($1::text[], $2::int4[], $3::text[]) AS t(p, d, v) \
             ON CONFLICT DO NOTHING",
            &[&patients, &days, &devices],
        )
        .await?;
    }
    let target = match mode {
        CopyMode::Staged => {
            tx.batch_execute(
                "CREATE TEMP TABLE IF NOT EXISTS vitals_staging \
                 (LIKE device_vitals INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
            )
            .await?;
            "vitals_staging"
        }
        CopyMode::Direct => "device_vitals",
    };
    let sink = tx
        .copy_in(&format!("COPY {target} ({COLUMNS}) FROM STDIN BINARY"))
        .await?;
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &TYPES));
    for r in rows {
        writer.as_mut().write(&Params::of(r).values()).await?;
    }
    let copied = writer.as_mut().finish().await?;
    let inserted = match mode {
        CopyMode::Staged => {
            tx.execute(
                &format!(
                    "INSERT INTO device_vitals ({COLUMNS}) SELECT {COLUMNS} FROM vitals_staging \
                     ON CONFLICT DO NOTHING"
                ),
                &[],
            )
            .await?
        }
        CopyMode::Direct => copied,
    };
    tx.commit().await?;
    Ok(inserted)
}

/// The seed's pattern, kept only for the benchmark: one INSERT statement per reading.
pub async fn insert_reading(client: &Client, r: &VitalRow) -> Result<u64, Error> {
    client
        .execute(
            &format!(
                "INSERT INTO device_vitals ({COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING"
            ),
            &Params::of(r).values(),
        )
        .await
}

/// Writes alert transitions in one transaction; returns how many were new.
pub async fn write_alerts(client: &mut Client, rows: &[AlertRow]) -> Result<u64, Error> {
    let tx = client.transaction().await?;
    let event = tx
        .prepare(
            "INSERT INTO alert_events (alert_id, event, at, rule_id, priority, patient_id, \
             device_id, value, correlation_id, actor, level) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
        )
        .await?;
    let state = tx
        .prepare(
            "INSERT INTO alerts AS a (alert_id, rule_id, priority, message, state, subject, \
             patient_id, device_id, value, window_start, window_end, correlation_id, event_time, \
             raised_at, acknowledged_at, acknowledged_by, resolved_at, resolved_by, updated_at, \
             state_rank, escalation, escalated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20, $21, $22) \
             ON CONFLICT (alert_id) DO UPDATE SET state = EXCLUDED.state, \
             escalation = GREATEST(a.escalation, EXCLUDED.escalation), \
             escalated_at = COALESCE(EXCLUDED.escalated_at, a.escalated_at), \
             acknowledged_at = EXCLUDED.acknowledged_at, acknowledged_by = EXCLUDED.acknowledged_by, \
             resolved_at = EXCLUDED.resolved_at, resolved_by = EXCLUDED.resolved_by, \
             updated_at = EXCLUDED.updated_at, state_rank = EXCLUDED.state_rank \
             WHERE a.state_rank <= EXCLUDED.state_rank",
        )
        .await?;
    let mut new = 0;
    for r in rows {
        let at = millis_to_time(r.at_ms);
        new += tx
            .execute(
                &event,
                &[
                    &r.alert_id,
                    &r.event,
                    &at,
                    &r.rule_id,
                    &r.priority,
                    &r.patient_id.as_deref(),
                    &r.device_id.as_str(),
                    &r.value,
                    &r.correlation_id,
                    &r.actor(),
                    &r.level(),
                ],
            )
            .await?;
        let opt = |ms: Option<i64>| ms.map(millis_to_time);
        tx.execute(
            &state,
            &[
                &r.alert_id,
                &r.rule_id,
                &r.priority,
                &r.message,
                &r.state,
                &r.subject.as_str(),
                &r.patient_id.as_deref(),
                &r.device_id.as_str(),
                &r.value,
                &opt(r.window_ms.map(|w| w.0)),
                &opt(r.window_ms.map(|w| w.1)),
                &r.correlation_id,
                &millis_to_time(r.event_ts_ms),
                &opt(r.raised_at_ms),
                &opt(r.acknowledged_at_ms),
                &r.acknowledged_by,
                &opt(r.resolved_at_ms),
                &r.resolved_by,
                &at,
                &r.rank(),
                &(r.escalation as i32),
                &opt(r.escalated_at_ms),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_on_both_sides_of_the_epoch() {
        for ms in [0, 1, -1, 1_795_000_000_123, -86_400_000] {
            assert_eq!(time_to_millis(millis_to_time(ms)), ms);
        }
    }
}
