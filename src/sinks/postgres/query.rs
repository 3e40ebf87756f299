//! Reads for the REST API: a patient's vitals over a range in buckets, and alerts by
//! patient, state, priority and time. The same calls work on both flavours: buckets come
//! from `time_bucket` on TimescaleDB and `date_bin` (same origin) on PostgreSQL.

use super::schema::{self, Flavour};
use super::write::{micros_to_time, time_to_millis};
use super::{PgError, PostgresConfig, pool};
use crate::model::Millis;
use crate::rules::RuleSpec;
use deadpool_postgres::Pool;
use serde::Serialize;
use std::time::{Duration, SystemTime};
use tokio_postgres::Row;

/// Read access to the store.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    flavour: Flavour,
}

/// Average, minimum and maximum of one vital in one bucket; `None` when no reading in the
/// bucket had it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub avg: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// One bucket of a patient's vitals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VitalsBucket {
    /// Start of the bucket, ms since the epoch.
    pub start: Millis,
    pub readings: i64,
    pub hr: Stats,
    pub spo2: Stats,
    pub temp: Stats,
    pub sys_bp: Stats,
    pub dia_bp: Stats,
    pub rr: Stats,
}

/// Which alerts to list; every field narrows the list, `None` does not.
#[derive(Debug, Clone, Default)]
pub struct AlertQuery {
    pub patient_id: Option<String>,
    /// `firing`, `escalated`, `acknowledged`, `resolved`.
    pub state: Option<String>,
    /// `high`, `medium`, `low`.
    pub priority: Option<String>,
    /// Raised at or after this time, ms.
    pub since: Option<Millis>,
    /// At most this many, newest first (default 100).
    pub limit: Option<i64>,
}

/// An alert's current state, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredAlert {
    pub alert_id: String,
    pub rule_id: String,
    pub priority: String,
    pub message: String,
    pub state: String,
    pub subject: String,
    pub patient_id: Option<String>,
    pub device_id: String,
    pub value: Option<f64>,
    pub correlation_id: String,
    pub raised_at: Option<Millis>,
    pub acknowledged_at: Option<Millis>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<Millis>,
    pub resolved_by: Option<String>,
    pub escalation: i32,
    pub escalated_at: Option<Millis>,
}

/// Alerts of one patient (or device) and priority over a report's period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertSummary {
    pub subject: String,
    pub priority: String,
    pub alerts: i64,
    pub acknowledged: i64,
    /// Raised → acknowledged, over those acknowledged.
    pub mean_to_ack_s: Option<f64>,
    pub max_to_ack_s: Option<f64>,
    pub escalated: i64,
}

/// One patient's (or device's) vitals over a report's period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VitalsSummary {
    pub subject: String,
    pub readings: i64,
    pub hr_avg: Option<f64>,
    pub hr_min: Option<f64>,
    pub hr_max: Option<f64>,
    pub spo2_avg: Option<f64>,
    pub spo2_min: Option<f64>,
    pub temp_max: Option<f64>,
    pub rr_avg: Option<f64>,
    pub sys_bp_min: Option<f64>,
}

impl Db {
    /// Connects and reads the schema's flavour (the schema must exist: `vitalstream migrate`).
    pub async fn connect(config: &PostgresConfig) -> Result<Db, PgError> {
        let pool = pool(config)?;
        let flavour = schema::flavour(&*pool.get().await?).await?;
        Ok(Db { pool, flavour })
    }

    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// A patient's vitals in `[from, to)` (ms), in buckets of `bucket`, oldest first. Empty
    /// buckets are left out.
    pub async fn vitals(
        &self,
        patient_id: &str,
        from: Millis,
        to: Millis,
        bucket: Duration,
    ) -> Result<Vec<VitalsBucket>, PgError> {
        if bucket.is_zero() {
            return Err(PgError::Config("bucket must be longer than zero".into()));
        }
        let bucketing = match self.flavour {
            Flavour::TimescaleDb => "time_bucket(make_interval(secs => $1), time)",
            Flavour::Postgres => {
                "date_bin(make_interval(secs => $1), time, TIMESTAMPTZ '2000-01-03 00:00:00+00')"
            }
        };
        let stats = ["hr", "spo2", "temp", "sys_bp", "dia_bp", "rr"]
            .map(|v| format!("avg({v}), min({v}), max({v})"))
            .join(", ");
        // The patient's devices on the days of the range, then their readings by the key.
        let sql = format!(
            "SELECT {bucketing} AS bucket, count(*), {stats} FROM device_vitals \
             WHERE device_id IN (SELECT device_id FROM patient_devices WHERE patient_id = $2 \
                 AND day BETWEEN DATE '1970-01-01' + $5::int4 AND DATE '1970-01-01' + $6::int4) \
             AND patient_id = $2 AND time >= $3 AND time < $4 GROUP BY 1 ORDER BY 1"
        );
        let first_day = schema::day_of(from.saturating_mul(1000));
        let last_day = schema::day_of(to.saturating_sub(1).saturating_mul(1000));
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &sql,
                &[
                    &bucket.as_secs_f64(),
                    &patient_id,
                    &micros_to_time(from.saturating_mul(1000)),
                    &micros_to_time(to.saturating_mul(1000)),
                    &first_day,
                    &last_day,
                ],
            )
            .await?;
        Ok(rows.iter().map(bucket_of).collect())
    }

    /// Alerts raised in `[from, to)` per subject and priority, for a patient or a set of
    /// devices (a ward), or everyone.
    pub async fn alert_summary(
        &self,
        patient_id: Option<&str>,
        devices: Option<&[String]>,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<AlertSummary>, PgError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT COALESCE(patient_id, subject), priority, count(*), \
                 count(acknowledged_at), \
                 avg(EXTRACT(EPOCH FROM acknowledged_at - raised_at))::float8, \
                 max(EXTRACT(EPOCH FROM acknowledged_at - raised_at))::float8, \
                 count(*) FILTER (WHERE escalation > 0) FROM alerts \
                 WHERE raised_at >= $1 AND raised_at < $2 \
                 AND ($3::text IS NULL OR patient_id = $3) \
                 AND ($4::text[] IS NULL OR device_id = ANY($4)) \
                 GROUP BY 1, 2 ORDER BY 1, \
                 array_position(ARRAY['high', 'medium', 'low'], priority)",
                &[
                    &micros_to_time(from.saturating_mul(1000)),
                    &micros_to_time(to.saturating_mul(1000)),
                    &patient_id,
                    &devices,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AlertSummary {
                subject: r.get(0),
                priority: r.get(1),
                alerts: r.get(2),
                acknowledged: r.get(3),
                mean_to_ack_s: r.get(4),
                max_to_ack_s: r.get(5),
                escalated: r.get(6),
            })
            .collect())
    }

    /// Readings in `[from, to)` summarised per patient (the device when none), for a
    /// patient or a set of devices (a ward), or everyone.
    pub async fn vitals_summary(
        &self,
        patient_id: Option<&str>,
        devices: Option<&[String]>,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<VitalsSummary>, PgError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT COALESCE(patient_id, device_id), count(*), avg(hr), min(hr), max(hr), \
                 avg(spo2), min(spo2), max(temp), avg(rr), min(sys_bp) FROM device_vitals \
                 WHERE time >= $1 AND time < $2 \
                 AND ($3::text IS NULL OR patient_id = $3) \
                 AND ($4::text[] IS NULL OR device_id = ANY($4)) \
                 GROUP BY 1 ORDER BY 1",
                &[
                    &micros_to_time(from.saturating_mul(1000)),
                    &micros_to_time(to.saturating_mul(1000)),
                    &patient_id,
                    &devices,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| VitalsSummary {
                subject: r.get(0),
                readings: r.get(1),
                hr_avg: r.get(2),
                hr_min: r.get(3),
                hr_max: r.get(4),
                spo2_avg: r.get(5),
                spo2_min: r.get(6),
                temp_max: r.get(7),
                rr_avg: r.get(8),
                sys_bp_min: r.get(9),
            })
            .collect())
    }

    /// Ends a device's current assignment and, with `patient`, starts a new one.
    pub async fn assign_device(
        &self,
        device: &str,
        patient: Option<&str>,
        by: &str,
    ) -> Result<(), PgError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE device_assignments SET valid_to = now() WHERE device_id = $1 AND valid_to IS NULL",
            &[&device],
        )
        .await?;
        if let Some(patient) = patient {
            tx.execute(
                "INSERT INTO device_assignments (device_id, patient_id, valid_from, assigned_by) \
                 VALUES ($1, $2, now(), $3)",
                &[&device, &patient, &by],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A round trip, for readiness.
    pub async fn ping(&self) -> Result<(), PgError> {
        self.pool.get().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Stores a rule submitted at runtime (a new version when it exists).
    pub async fn save_rule(&self, spec: &RuleSpec, by: &str) -> Result<(), PgError> {
        let definition = serde_json::to_string(spec).map_err(|e| PgError::Config(e.to_string()))?;
        let kind = serde_json::to_value(spec.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.pool
            .get()
            .await?
            .execute(
                "INSERT INTO rules (rule_id, kind, definition, enabled, updated_by) \
                 VALUES ($1, $2, $3::text::jsonb, true, $4) \
                 ON CONFLICT (rule_id) DO UPDATE SET kind = EXCLUDED.kind, \
                 definition = EXCLUDED.definition, enabled = true, version = rules.version + 1, \
                 updated_at = now(), updated_by = EXCLUDED.updated_by",
                &[&spec.id, &kind, &definition, &by],
            )
            .await?;
        Ok(())
    }

    /// Marks a rule deleted (kept, disabled, so a restart does not bring back a rule of the
    /// pipeline file that was deleted at runtime).
    pub async fn delete_rule(&self, id: &str, by: &str) -> Result<(), PgError> {
        self.pool
            .get()
            .await?
            .execute(
                "INSERT INTO rules (rule_id, kind, definition, enabled, updated_by) \
                 VALUES ($1, 'deleted', '{}'::jsonb, false, $2) \
                 ON CONFLICT (rule_id) DO UPDATE SET enabled = false, \
                 version = rules.version + 1, updated_at = now(), updated_by = EXCLUDED.updated_by",
                &[&id, &by],
            )
            .await?;
        Ok(())
    }

    /// The engine disabled this rule's definition because it failed: a restart loads it
    /// disabled (see [`Db::rule_failures`]).
    pub async fn rule_failed(&self, spec: &RuleSpec, reason: &str) -> Result<(), PgError> {
        let definition = serde_json::to_string(spec).map_err(|e| PgError::Config(e.to_string()))?;
        self.pool
            .get()
            .await?
            .execute(
                "INSERT INTO rule_failures (rule_id, definition, reason) \
                 VALUES ($1, $2::text::jsonb, $3) \
                 ON CONFLICT (rule_id) DO UPDATE SET definition = EXCLUDED.definition, \
                 reason = EXCLUDED.reason, failed_at = now()",
                &[&spec.id, &definition, &reason],
            )
            .await?;
        Ok(())
    }

    /// Rule definitions that failed before: `(id, definition, reason)`.
    pub async fn rule_failures(&self) -> Result<Vec<(String, serde_json::Value, String)>, PgError> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "SELECT rule_id, definition::text, reason FROM rule_failures",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let (id, text, reason): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                Some((id, serde_json::from_str(&text).ok()?, reason))
            })
            .collect())
    }

    /// Rules changed at runtime: `(id, Some(spec))` to add or replace, `(id, None)` deleted.
    pub async fn runtime_rules(&self) -> Result<Vec<(String, Option<RuleSpec>)>, PgError> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "SELECT rule_id, enabled, definition::text FROM rules ORDER BY rule_id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let (id, enabled, text): (String, bool, String) = (r.get(0), r.get(1), r.get(2));
                let spec = if enabled {
                    Some(serde_json::from_str(&text).map_err(|e| {
                        PgError::Schema(format!("stored rule {id} does not parse: {e}"))
                    })?)
                } else {
                    None
                };
                Ok((id, spec))
            })
            .collect()
    }

    /// Alerts, newest first.
    pub async fn alerts(&self, q: &AlertQuery) -> Result<Vec<StoredAlert>, PgError> {
        let since = q.since.map(|ms| micros_to_time(ms.saturating_mul(1000)));
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT alert_id, rule_id, priority, message, state, subject, patient_id, \
                 device_id, value, correlation_id, raised_at, acknowledged_at, acknowledged_by, \
                 resolved_at, resolved_by, escalation, escalated_at FROM alerts \
                 WHERE ($1::text IS NULL OR patient_id = $1) AND ($2::text IS NULL OR state = $2) \
                 AND ($3::text IS NULL OR priority = $3) AND ($4::timestamptz IS NULL OR raised_at >= $4) \
                 ORDER BY raised_at DESC NULLS LAST, alert_id LIMIT $5",
                &[
                    &q.patient_id,
                    &q.state,
                    &q.priority,
                    &since,
                    &q.limit.unwrap_or(100),
                ],
            )
            .await?;
        Ok(rows.iter().map(alert_of).collect())
    }
}

fn millis(row: &Row, i: usize) -> Option<Millis> {
    row.get::<_, Option<SystemTime>>(i).map(time_to_millis)
}

fn bucket_of(row: &Row) -> VitalsBucket {
    let stats = |i: usize| Stats {
        avg: row.get(i),
        min: row.get(i + 1),
        max: row.get(i + 2),
    };
    VitalsBucket {
        start: millis(row, 0).unwrap_or_default(),
        readings: row.get(1),
        hr: stats(2),
        spo2: stats(5),
        temp: stats(8),
        sys_bp: stats(11),
        dia_bp: stats(14),
        rr: stats(17),
    }
}

fn alert_of(row: &Row) -> StoredAlert {
    StoredAlert {
        alert_id: row.get(0),
        rule_id: row.get(1),
        priority: row.get(2),
        message: row.get(3),
        state: row.get(4),
        subject: row.get(5),
        patient_id: row.get(6),
        device_id: row.get(7),
        value: row.get(8),
        correlation_id: row.get(9),
        raised_at: millis(row, 10),
        acknowledged_at: millis(row, 11),
        acknowledged_by: row.get(12),
        resolved_at: millis(row, 13),
        resolved_by: row.get(14),
        escalation: row.get(15),
        escalated_at: millis(row, 16),
    }
}
