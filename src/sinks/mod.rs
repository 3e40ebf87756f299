//! Sinks: where readings, alerts and rejects go. Each runs on its own thread behind a
//! bounded queue, so a slow sink slows only what must wait for it.
//!
//! - [`Storage`] is the contract every reading store implements: the embedded Parquet
//!   writer ([`parquet`]) and the TimescaleDB / PostgreSQL writer ([`postgres`]).
//! - [`alert_log`] writes alert transitions as NDJSON (stdout or a file).
//! - [`dead_letter`] writes rejected frames, original bytes included, as NDJSON.
//! - [`events`] publishes domain events and dead letters to Kafka.
//! - [`forward`] is the ingest node's output: readings, as they came, to `vitals.raw`.

pub mod alert_log;
pub mod dead_letter;
pub mod events;
pub mod forward;
pub mod parquet;
pub mod postgres;

use crate::alerts::AlertEvent;
use crate::model::Sample;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Postgres(#[from] postgres::PgError),
    #[error(transparent)]
    Spool(#[from] postgres::spool::SpoolError),
}

/// The storage contract. Calls come from one thread, in order. `Ok` from `write_readings`
/// or `write_alerts` means the data is handed over and will be durable once `flush` returns.
pub trait Storage: Send {
    /// Appends readings (accepted, non-duplicate; late ones included).
    fn write_readings(&mut self, readings: &[Sample]) -> Result<(), StorageError>;
    /// Appends alert lifecycle transitions.
    fn write_alerts(&mut self, events: &[AlertEvent]) -> Result<(), StorageError>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> Result<(), StorageError>;
    /// How long written data may wait for `flush`. Sources are acknowledged only after it,
    /// so this is also how long a broker keeps a reading in flight to vitalstream: with
    /// MQTT's `receive_maximum` it bounds the rate one session can take.
    fn flush_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    /// Flushes and releases resources; called once, at shutdown.
    fn close(&mut self) -> Result<(), StorageError>;
}

/// Opens `path` for appending, creating it and its directory if needed; errors name `what`
/// and the path.
pub(crate) fn open_append(path: &std::path::Path, what: &str) -> std::io::Result<std::fs::File> {
    let named = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(named)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(named)
}

#[cfg(test)]
mod tests {
    #[test]
    fn open_append_creates_the_directory_and_names_failures() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/deeper/out.ndjson");
        super::open_append(&path, "test output").unwrap();
        assert!(path.exists());
        let blocked = dir.path().join("nested/deeper/out.ndjson/child");
        let err = super::open_append(&blocked, "test output").unwrap_err();
        assert!(err.to_string().starts_with("test output "), "{err}");
    }
}
