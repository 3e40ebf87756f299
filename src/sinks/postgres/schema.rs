//! The database schema: migrations under `sql/migrations/`, compiled into the binary and
//! recorded in `vitalstream_schema`, and the day partitions of `device_vitals` on plain
//! PostgreSQL.
//!
//! A migration file is `NNNN_name.sql` (both flavours), or `NNNN_name.timescaledb.sql` and
//! `NNNN_name.postgres.sql` (one per flavour). A file whose first line is
//! `-- vitalstream: no-transaction` runs outside a transaction (TimescaleDB's continuous
//! aggregates require it). Applied migrations are checked against their checksum, so an
//! edited migration is an error, not a silent divergence.

use super::{PgError, TimescaleMode};
use chrono::{DateTime, NaiveDate};
use std::collections::HashSet;
use std::sync::Mutex;
use tokio_postgres::Client;

/// Where readings live: a TimescaleDB hypertable, or a PostgreSQL table partitioned by day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    TimescaleDb,
    Postgres,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::TimescaleDb => "timescaledb",
            Flavour::Postgres => "postgres",
        }
    }
}

struct Migration {
    version: i32,
    name: &'static str,
    /// `None`: the same SQL on both flavours.
    flavour: Option<Flavour>,
    sql: &'static str,
}

macro_rules! migration {
    ($version:expr, $name:expr, $flavour:expr, $file:expr) => {
        Migration {
            version: $version,
            name: $name,
            flavour: $flavour,
            sql: include_str!(concat!("../../../sql/migrations/", $file)),
        }
    };
}

const MIGRATIONS: &[Migration] = &[
    migration!(
        1,
        "alerts_rules_assignments",
        None,
        "0001_alerts_rules_assignments.sql"
    ),
    migration!(
        2,
        "device_vitals",
        Some(Flavour::TimescaleDb),
        "0002_device_vitals.timescaledb.sql"
    ),
    migration!(
        2,
        "device_vitals",
        Some(Flavour::Postgres),
        "0002_device_vitals.postgres.sql"
    ),
    migration!(
        3,
        "device_vitals_1m",
        Some(Flavour::TimescaleDb),
        "0003_device_vitals_1m.timescaledb.sql"
    ),
    migration!(
        3,
        "device_vitals_1m",
        Some(Flavour::Postgres),
        "0003_device_vitals_1m.postgres.sql"
    ),
    migration!(4, "alert_escalation", None, "0004_alert_escalation.sql"),
    migration!(5, "rule_failures", None, "0005_rule_failures.sql"),
];

const NO_TRANSACTION: &str = "-- vitalstream: no-transaction";

/// Brings the schema up to date and returns its flavour. Safe to re-run, and safe when
/// several instances start at once (they take turns on an advisory lock).
pub async fn migrate(client: &mut Client, mode: TimescaleMode) -> Result<Flavour, PgError> {
    client
        .batch_execute(
            "SELECT pg_advisory_lock(hashtext('vitalstream.migrate'));
             CREATE TABLE IF NOT EXISTS vitalstream_schema (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 flavour    text NOT NULL,
                 checksum   text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await?;
    let result = apply_pending(client, mode).await;
    let unlock = client
        .batch_execute("SELECT pg_advisory_unlock(hashtext('vitalstream.migrate'))")
        .await;
    let flavour = result?;
    unlock?;
    Ok(flavour)
}

async fn apply_pending(client: &mut Client, mode: TimescaleMode) -> Result<Flavour, PgError> {
    let applied: Vec<(i32, String, String)> = client
        .query(
            "SELECT version, flavour, checksum FROM vitalstream_schema ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // A database keeps the flavour it was created with.
    let flavour = match applied.iter().find(|(_, f, _)| f != "any") {
        Some((_, f, _)) if f == Flavour::TimescaleDb.name() => Flavour::TimescaleDb,
        Some(_) => Flavour::Postgres,
        None => detect(client, mode).await?,
    };
    if flavour == Flavour::Postgres && mode == TimescaleMode::Require {
        return Err(PgError::Schema(
            "timescaledb = \"require\", but this database was set up without TimescaleDB".into(),
        ));
    }
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.flavour.is_none_or(|f| f == flavour))
    {
        let checksum = format!("{:08x}", crc32fast::hash(m.sql.as_bytes()));
        if let Some((_, _, sum)) = applied.iter().find(|(v, _, _)| *v == m.version) {
            if *sum != checksum {
                return Err(PgError::Schema(format!(
                    "migration {:04}_{} differs from the one applied to this database \
                     (checksum {sum}, now {checksum}); migrations must not be edited once applied",
                    m.version, m.name
                )));
            }
            continue;
        }
        let record = "INSERT INTO vitalstream_schema (version, name, flavour, checksum) \
                      VALUES ($1, $2, $3, $4)";
        let recorded_flavour = m.flavour.map_or("any", Flavour::name);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&m.version, &m.name, &recorded_flavour, &checksum];
        if m.sql.starts_with(NO_TRANSACTION) {
            client.batch_execute(m.sql).await?;
            client.execute(record, &params).await?;
        } else {
            let tx = client.transaction().await?;
            tx.batch_execute(m.sql).await?;
            tx.execute(record, &params).await?;
            tx.commit().await?;
        }
        tracing::info!(
            version = m.version,
            name = m.name,
            flavour = flavour.name(),
            "migration applied"
        );
    }
    Ok(flavour)
}

/// Decides the flavour of a new database: TimescaleDB when its extension is (or can be)
/// installed and `mode` allows it.
async fn detect(client: &Client, mode: TimescaleMode) -> Result<Flavour, PgError> {
    if mode == TimescaleMode::Off {
        return Ok(Flavour::Postgres);
    }
    let available = !client
        .query(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await?
        .is_empty();
    let installed = if available {
        match client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "TimescaleDB is available but could not be loaded");
                false
            }
        }
    } else {
        false
    };
    match (installed, mode) {
        (true, _) => Ok(Flavour::TimescaleDb),
        (false, TimescaleMode::Require) => Err(PgError::Schema(
            "timescaledb = \"require\", but the TimescaleDB extension is not available".into(),
        )),
        (false, _) => {
            tracing::info!("TimescaleDB not available: using PostgreSQL partitioning by day");
            Ok(Flavour::Postgres)
        }
    }
}

/// The flavour recorded by an earlier [`migrate`]; an error if the schema is not there yet.
pub async fn flavour(client: &Client) -> Result<Flavour, PgError> {
    let rows = client
        .query(
            "SELECT flavour FROM vitalstream_schema WHERE version = 2",
            &[],
        )
        .await
        .map_err(|e| {
            PgError::Schema(format!(
                "no vitalstream schema (run `vitalstream migrate`): {e}"
            ))
        })?;
    match rows.first().map(|r| r.get::<_, String>(0)) {
        Some(f) if f == Flavour::TimescaleDb.name() => Ok(Flavour::TimescaleDb),
        Some(_) => Ok(Flavour::Postgres),
        None => Err(PgError::Schema(
            "no vitalstream schema (run `vitalstream migrate`)".into(),
        )),
    }
}

const DAY_US: i64 = 86_400_000_000;

/// The UTC day (days since the epoch) of a time in microseconds.
pub fn day_of(micros: i64) -> i32 {
    micros.div_euclid(DAY_US) as i32
}

fn date_of(day: i32) -> NaiveDate {
    DateTime::from_timestamp(i64::from(day) * 86_400, 0)
        .expect("a day from an i32 day count is in chrono's range")
        .date_naive()
}

/// The day partitions of `device_vitals` on plain PostgreSQL, created before any reading
/// needs them. Shared by the writer's connections.
#[derive(Default)]
pub struct Partitions {
    known: Mutex<HashSet<i32>>,
}

impl Partitions {
    /// Learns the partitions that already exist.
    pub async fn load(&self, client: &Client) -> Result<(), PgError> {
        let rows = client
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'device_vitals'::regclass",
                &[],
            )
            .await?;
        let mut known = self.known.lock().expect("partition set lock");
        for row in rows {
            let name: String = row.get(0);
            if let Some(date) = name
                .strip_prefix("device_vitals_p")
                .and_then(|d| NaiveDate::parse_from_str(d, "%Y%m%d").ok())
            {
                let day = date.signed_duration_since(date_of(0)).num_days() as i32;
                known.insert(day);
            }
        }
        Ok(())
    }

    /// Creates the partitions for `days` that do not exist yet.
    pub async fn ensure(
        &self,
        client: &mut Client,
        days: impl IntoIterator<Item = i32>,
    ) -> Result<(), PgError> {
        let missing: Vec<i32> = {
            let known = self.known.lock().expect("partition set lock");
            let mut m: Vec<i32> = days.into_iter().filter(|d| !known.contains(d)).collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        for day in missing {
            let (from, to) = (date_of(day), date_of(day + 1));
            let sql = format!(
                "SELECT pg_advisory_xact_lock(hashtext('vitalstream.partitions'));
                 CREATE TABLE IF NOT EXISTS device_vitals_p{} PARTITION OF device_vitals
                 FOR VALUES FROM ('{} 00:00:00+00') TO ('{} 00:00:00+00');",
                from.format("%Y%m%d"),
                from.format("%Y-%m-%d"),
                to.format("%Y-%m-%d"),
            );
            let tx = client.transaction().await?;
            tx.batch_execute(&sql).await?;
            tx.commit().await?;
            tracing::debug!(day = %from, "partition created");
            self.known.lock().expect("partition set lock").insert(day);
        }
        Ok(())
    }

    /// Drops the partitions that end before `cutoff_day`; returns how many.
    pub async fn drop_before(&self, client: &Client, cutoff_day: i32) -> Result<usize, PgError> {
        let old: Vec<i32> = {
            let known = self.known.lock().expect("partition set lock");
            known.iter().copied().filter(|d| *d < cutoff_day).collect()
        };
        for day in &old {
            client
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS device_vitals_p{}",
                    date_of(*day).format("%Y%m%d")
                ))
                .await?;
            self.known.lock().expect("partition set lock").remove(day);
            tracing::info!(day = %date_of(*day), "partition dropped by retention");
        }
        Ok(old.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_and_floor_before_the_epoch() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(DAY_US - 1), 0);
        assert_eq!(day_of(-1), -1);
        assert_eq!(
            date_of(day_of(1_795_000_000_000_000)).to_string(),
            "2026-11-18"
        );
    }

    #[test]
    fn every_migration_has_both_flavours_or_none() {
        let versions: HashSet<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        for v in versions {
            let of = |f: Option<Flavour>| {
                MIGRATIONS
                    .iter()
                    .filter(|m| m.version == v && m.flavour == f)
                    .count()
            };
            let shared = of(None);
            let (ts, pg) = (of(Some(Flavour::TimescaleDb)), of(Some(Flavour::Postgres)));
            assert!(
                (shared == 1 && ts == 0 && pg == 0) || (shared == 0 && ts == 1 && pg == 1),
                "migration {v}: {shared} shared, {ts} timescaledb, {pg} postgres"
            );
        }
    }
}
