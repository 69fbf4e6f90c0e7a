//! Test databases: a SQLite file in a temporary directory, and a throw-away PostgreSQL
//! database on the real server (`IOTRONIC_TEST_PG`, default the local server with trust auth),
//! created per test and dropped afterwards, also when the test panics.
#![allow(dead_code)]

pub mod rest;

use iotronic::db::{DatabaseUrl, Db};

pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn pg_admin_url() -> String {
    std::env::var("IOTRONIC_TEST_PG").unwrap_or_else(|_| DEFAULT_PG.to_owned())
}

/// A database that lives as long as the guard.
pub struct TestDb {
    pub db: Db,
    pub url: DatabaseUrl,
    pub name: &'static str,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::sqlite_in(dir.path());
        let db = Db::open(&url).await.unwrap();
        TestDb { db, url, name: "sqlite", _dir: Some(dir), pg_name: None }
    }

    pub async fn postgres() -> TestDb {
        let admin_url = pg_admin_url();
        let name = format!("iot_test_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx_admin(&admin_url).await;
        admin.0.create_database(&name).await.unwrap();
        let base = admin_url.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap();
        let url = DatabaseUrl::new(format!("{base}/{name}"));
        let db = Db::open(&url).await.unwrap();
        TestDb { db, url, name: "postgres", _dir: None, pg_name: Some(name) }
    }

    /// A second, independent connection pool to the same database (another process).
    pub async fn reopen(&self) -> Db {
        Db::open(&self.url).await.unwrap()
    }

    /// Both back-ends.
    pub async fn all() -> Vec<TestDb> {
        vec![TestDb::sqlite().await, TestDb::postgres().await]
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else { return };
        // Drop runs inside the test's (blocked) runtime: clean up on a thread with its own
        // runtime. WITH (FORCE) ends the test's own connections.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let admin = sqlx_admin(&pg_admin_url()).await;
                admin.0.drop_database(&name).await.unwrap();
            });
        })
        .join();
    }
}

/// A minimal admin connection for CREATE/DROP DATABASE (outside any migration).
pub struct Admin(Db);

pub async fn sqlx_admin(url: &str) -> Admin {
    Admin(Db::connect(&DatabaseUrl::new(url)).await.expect("PostgreSQL must be reachable for the tests"))
}
