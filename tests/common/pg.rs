//! A fresh database per test on the PostgreSQL at 127.0.0.1:5432, dropped afterwards, and a
//! way to stop and start that server.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio_postgres::{Client, NoTls};

pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

pub struct TestDb {
    pub name: String,
    pub url: String,
    rt: tokio::runtime::Runtime,
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e} (is PostgreSQL running?)"));
    tokio::spawn(connection);
    client
}

impl TestDb {
    pub fn create() -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vs_test_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let admin = connect(&format!("{SERVER}/postgres")).await;
            for sql in [
                format!("DROP DATABASE IF EXISTS {name}"),
                format!("CREATE DATABASE {name}"),
            ] {
                admin.batch_execute(&sql).await.unwrap();
            }
        });
        let url = format!("{SERVER}/{name}");
        TestDb { name, url, rt }
    }

    /// Runs a query whose single result is a number.
    pub fn count(&self, sql: &str) -> i64 {
        self.rt.block_on(async {
            let client = connect(&self.url).await;
            client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
        })
    }

    /// Like `count`, but `None` when the query fails (the table is not there yet).
    pub fn try_count(&self, sql: &str) -> Option<i64> {
        self.rt.block_on(async {
            let client = connect(&self.url).await;
            client
                .query_one(sql, &[])
                .await
                .ok()
                .map(|r| r.get::<_, i64>(0))
        })
    }

    /// Runs a query and returns every row's columns as text (NULL as "null").
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        self.rt.block_on(async {
            let client = connect(&self.url).await;
            client
                .simple_query(sql)
                .await
                .unwrap()
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                        (0..r.len())
                            .map(|i| r.get(i).unwrap_or("null").to_string())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect()
        })
    }

    pub fn execute(&self, sql: &str) {
        self.rt.block_on(async {
            connect(&self.url).await.batch_execute(sql).await.unwrap();
        })
    }

    /// Terminates every other session on this database; returns how many.
    pub fn terminate_sessions(&self) -> i64 {
        self.rt.block_on(async {
            let admin = connect(&format!("{SERVER}/postgres")).await;
            admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&self.name],
                )
                .await
                .map(|rows| rows.len() as i64)
                .unwrap_or(0)
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        self.rt.block_on(async move {
            if let Ok((admin, connection)) =
                tokio_postgres::connect(&format!("{SERVER}/postgres"), NoTls).await
            {
                tokio::spawn(connection);
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        });
    }
}

fn cluster(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql: the Debian PostgreSQL cluster")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().into_string().unwrap())
        .next()
        .expect("a PostgreSQL version under /etc/postgresql");
    let mut cmd = Command::new("pg_ctlcluster");
    cmd.args(["--skip-systemctl-redirect", &version, "main", action]);
    if action == "stop" {
        cmd.args(["-m", "fast"]);
    }
    let status = cmd.status().expect("running pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster {action}: {status}");
}

/// Stops the PostgreSQL server; it is started again when the guard is dropped (also when
/// the test fails), or earlier with [`Outage::end`].
pub struct Outage {
    over: bool,
}

impl Outage {
    pub fn begin() -> Outage {
        cluster("stop");
        Outage { over: false }
    }

    pub fn end(mut self) {
        self.restart();
    }

    fn restart(&mut self) {
        if !self.over {
            self.over = true;
            cluster("start");
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        self.restart();
    }
}
