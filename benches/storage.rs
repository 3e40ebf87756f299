//! Sustained ingest into PostgreSQL: vitalstream's writer against the seed's pattern (one
//! INSERT per reading), on the same rows, in one run. Needs the PostgreSQL on
//! 127.0.0.1:5432 (trust auth); each measurement gets a fresh database.
//!
//! ```sh
//! cargo bench --bench storage                       # 1,000,000 rows through the writer
//! STORAGE_BENCH_ROWS=3000000 cargo bench --bench storage
//! ```
//! Rows are 1,000 devices at 1 Hz with all six vitals, a patient and a seq, in the
//! partitioned fallback schema (no TimescaleDB here), with its primary key on
//! (device_id, time) and the (patient_id, time) index. Measured:
//! - `per-row INSERT`: the seed's handler — one autocommitted INSERT per reading, one
//!   connection (20,000 rows; it is slow).
//! - `COPY direct, 1 conn`: binary COPY straight into the table, 10,000-row transactions —
//!   the ceiling, but a retried batch would fail on its duplicates.
//! - `COPY staged, 1 conn`: COPY into a temporary table, then INSERT … ON CONFLICT DO
//!   NOTHING — what the writer does, so retries and replays never duplicate.
//! - `writer`: `PostgresStorage` as the service runs it — direct COPY (staged only for a
//!   batch that holds stored readings) on 4 connections, each batch one lane of devices,
//!   flushed every 100,000 rows (the storage thread flushes at least once a second).
//! - `writer, replayed`: the same rows once more, all already stored: every batch falls back
//!   to staging and adds nothing.

use std::time::{Duration, Instant};
use tokio_postgres::NoTls;
use vitalstream::model::{CorrelationId, Id, Sample, Vitals};
use vitalstream::sinks::Storage;
use vitalstream::sinks::postgres::write::{self, CopyMode, VitalRow};
use vitalstream::sinks::postgres::{PostgresConfig, PostgresStorage, TimescaleMode, migrate_url};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

fn samples(n: usize) -> Vec<Sample> {
    let mut rng = fastrand::Rng::with_seed(7);
    let t0 = vitalstream::model::now_millis() - 86_400_000;
    (0..n)
        .map(|i| {
            let d = i % 1000;
            let v = Vitals([
                rng.i32(55..140) as f64,
                rng.i32(85..100) as f64,
                36.0 + rng.f64() * 4.0,
                rng.i32(90..150) as f64,
                rng.i32(55..95) as f64,
                rng.i32(10..25) as f64,
            ]);
            Sample {
                device_id: Id::from(format!("bed-{d:05}")),
                patient_id: Some(Id::from(format!("pat-{d:05}"))),
                ts: t0 + (i / 1000) as i64 * 1000 + rng.i64(0..1000),
                device_ts: true,
                received_us: vitalstream::model::now_micros(),
                vitals: v,
                seq: Some((i / 1000) as u64),
                correlation_id: CorrelationId::Generated(i as u64),
                late: false,
                warmup: false,
            }
        })
        .collect()
}

/// A fresh, migrated database with its day partitions; returns its URL.
fn fresh_db(rt: &tokio::runtime::Runtime, name: &str) -> String {
    rt.block_on(async {
        let (admin, conn) = tokio_postgres::connect(&format!("{SERVER}/postgres"), NoTls)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432");
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    });
    let url = format!("{SERVER}/{name}");
    migrate_url(&url, TimescaleMode::Auto).unwrap();
    // Opening the writer creates the day partitions; close it at once.
    let spool = tempfile::tempdir().unwrap();
    let config = PostgresConfig {
        url: url.clone(),
        spool_dir: spool.path().to_path_buf(),
        ..PostgresConfig::default()
    };
    PostgresStorage::open(&config).unwrap().close().unwrap();
    url
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn count(rt: &tokio::runtime::Runtime, url: &str) -> i64 {
    rt.block_on(async {
        connect(url)
            .await
            .query_one("SELECT count(*) FROM device_vitals", &[])
            .await
            .unwrap()
            .get(0)
    })
}

fn report(name: &str, rows: usize, elapsed: Duration) -> f64 {
    let rate = rows as f64 / elapsed.as_secs_f64();
    println!(
        "{name:<22} {rows:>10} rows {:>8.2} s {:>12.0} rows/s",
        elapsed.as_secs_f64(),
        rate
    );
    rate
}

fn main() {
    // `cargo bench` passes --bench; this is not a criterion bench and takes no filter.
    let rows: usize = std::env::var("STORAGE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data = samples(rows);
    let vital_rows: Vec<VitalRow> = data.iter().map(VitalRow::from).collect();
    println!(
        "storage bench: {rows} readings, PostgreSQL partitioned fallback, same rows in each run"
    );

    let per_row_n = 20_000.min(rows);
    let url = fresh_db(&rt, "vs_bench_insert");
    let started = Instant::now();
    rt.block_on(async {
        let client = connect(&url).await;
        for r in &vital_rows[..per_row_n] {
            write::insert_reading(&client, r).await.unwrap();
        }
    });
    let insert = report("per-row INSERT", per_row_n, started.elapsed());
    assert_eq!(count(&rt, &url), per_row_n as i64);

    let copy = |name: &str, db: &str, mode: CopyMode| {
        let url = fresh_db(&rt, db);
        let started = Instant::now();
        rt.block_on(async {
            let mut client = connect(&url).await;
            for batch in vital_rows.chunks(10_000) {
                let links = write::links_of(batch);
                write::copy_readings(&mut client, batch, &links, mode)
                    .await
                    .unwrap();
            }
        });
        let rate = report(name, rows, started.elapsed());
        assert_eq!(count(&rt, &url), rows as i64);
        rate
    };
    copy("COPY direct, 1 conn", "vs_bench_direct", CopyMode::Direct);
    copy("COPY staged, 1 conn", "vs_bench_staged", CopyMode::Staged);

    let url = fresh_db(&rt, "vs_bench_writer");
    let spool = tempfile::tempdir().unwrap();
    let config = PostgresConfig {
        url: url.clone(),
        spool_dir: spool.path().to_path_buf(),
        ..PostgresConfig::default()
    };
    let mut storage = PostgresStorage::open(&config).unwrap();
    let started = Instant::now();
    for chunk in data.chunks(100_000) {
        storage.write_readings(chunk).unwrap();
        storage.flush().unwrap();
    }
    storage.close().unwrap();
    let writer = report("writer (4 conns)", rows, started.elapsed());
    assert_eq!(count(&rt, &url), rows as i64);

    // The same stream again (a replay): every batch finds its readings stored, rolls back
    // and goes through staging; nothing is added.
    let mut storage = PostgresStorage::open(&config).unwrap();
    let started = Instant::now();
    for chunk in data.chunks(100_000) {
        storage.write_readings(chunk).unwrap();
        storage.flush().unwrap();
    }
    storage.close().unwrap();
    report("writer, replayed", rows, started.elapsed());
    assert_eq!(count(&rt, &url), rows as i64);
    let skipped = storage
        .metrics()
        .rows_already_stored
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(skipped, rows as u64);
    println!("writer / per-row INSERT: {:.1}x", writer / insert);

    for db in [
        "vs_bench_insert",
        "vs_bench_direct",
        "vs_bench_staged",
        "vs_bench_writer",
    ] {
        rt.block_on(async {
            let admin = connect(&format!("{SERVER}/postgres")).await;
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await;
        });
    }
}
