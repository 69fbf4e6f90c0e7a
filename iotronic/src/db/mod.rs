//! The database: the only module that sees SQL (ARCHITECTURE invariant).
//!
//! One code path for both back-ends through sqlx's `Any` driver: SQLite (a file in the data
//! directory, the embedded default) and PostgreSQL (`--database-url postgres://…`). The schema
//! (`migrations/*.sql`) is portable SQL and embedded in the binary; [`Db::migrate`] applies it
//! under a lock (sqlx's advisory lock on PostgreSQL, a lock file beside the SQLite database,
//! for which sqlx's does nothing), so several processes may start at once.
//!
//! Records are plain structs mapped from rows by hand; REST DTOs live in `api`, bus messages in
//! `bus`, and conversions between them are written out.

mod audit;
mod auth;
mod boards;
mod leases;
mod objects;
mod page;
mod plugins;
mod requests;

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};

pub use audit::{AuditEntry, AuditQuery, NewAudit};
pub use auth::{BoardCredentials, Cutoff, Membership, Project, Role, TokenInfo, User};
pub use boards::{Agent, Board, BoardUpdate, NewBoard};
pub use leases::Lease;
pub use objects::{
    Exposure, Fleet, MAX_ALLOW, PortQuota, Service, ServiceUpdate, Vpn, VpnMember, admits, cidr_within_any, cloud_host,
    parse_allow_list, parse_cidr,
};
pub use page::{MAX_LIMIT, Page};
pub use plugins::{Injection, Plugin, PluginCode, PluginUpdate};
pub use requests::{Request, RequestStatus, ResultRow};

use crate::Error;

/// The embedded schema, in order. Never edit an applied migration: add a new one.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (2, "settings", include_str!("../../migrations/0002_settings.sql")),
    (3, "security", include_str!("../../migrations/0003_security.sql")),
    (4, "plugins", include_str!("../../migrations/0004_plugins.sql")),
    (5, "vpn cloud address", include_str!("../../migrations/0005_vpn_cloud_address.sql")),
    (6, "exposure allow-list", include_str!("../../migrations/0006_exposure_allow.sql")),
    (7, "tunnel tokens after", include_str!("../../migrations/0007_tunnel_tokens_after.sql")),
    (8, "agent stats", include_str!("../../migrations/0008_agent_stats.sql")),
    (9, "request lease", include_str!("../../migrations/0009_request_lease.sql")),
    (10, "enroll repeat", include_str!("../../migrations/0010_enroll_repeat.sql")),
    (11, "bounds", include_str!("../../migrations/0011_bounds.sql")),
    (12, "list indexes", include_str!("../../migrations/0012_list_indexes.sql")),
];

/// The SQLite database's file name in the data directory (the default back-end).
pub const SQLITE_FILE: &str = "iotronic.sqlite";

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle to the database: a connection pool, cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl fmt::Debug for Db {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db").field("backend", &self.backend).finish_non_exhaustive()
    }
}

/// A database URL whose `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    /// The SQLite file `dir/iotronic.sqlite`, created on first use (`serve::open_database`
    /// creates it first, owner-only).
    pub fn sqlite_in(dir: &Path) -> Self {
        DatabaseUrl(format!("sqlite://{}?mode=rwc", dir.join(SQLITE_FILE).display()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `scheme://user:pass@host/…` → `scheme://user:***@host/…`. The password runs from the
/// first `:` after the user to the last `@`: a password not percent-encoded may hold `/` or
/// `@` (one from `openssl rand -base64` often does), and cutting the authority at the first
/// `/` printed it whole. A URL with an `@` further on (in its query) loses its host too:
/// hiding too much beats printing a password.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((user, _)) = rest.split_once(':') else { return url.to_owned() };
    match rest.rfind('@') {
        // `user` holding `/` or `@`: that `:` is a port's or the path's, there is no password.
        Some(at) if !user.contains(['/', '@']) => format!("{scheme}://{user}:***{}", &rest[at..]),
        _ => url.to_owned(),
    }
}

impl Db {
    /// Connects (creating the SQLite file if needed). Does not migrate: call [`Db::migrate`].
    pub async fn connect(url: &DatabaseUrl) -> Result<Db, Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.expose().starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.expose().starts_with("postgres:") || url.expose().starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::Invalid(format!(
                "unsupported database URL {}: use sqlite://FILE or postgres://…",
                url.redacted()
            )));
        };
        let max = if backend == Backend::Sqlite { 4 } else { 10 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url.expose())
            .await
            .map_err(|source| Error::DbConnect { url: url.redacted(), source })?;
        if backend == Backend::Sqlite {
            // WAL lets readers run beside the writer; the setting persists in the file.
            sqlx::query("PRAGMA journal_mode=WAL").execute(&pool).await.map_err(db_err)?;
        }
        Ok(Db { pool, backend })
    }

    /// Connects and applies the embedded migrations.
    pub async fn open(url: &DatabaseUrl) -> Result<Db, Error> {
        let db = Db::connect(url).await?;
        db.migrate().await?;
        db.protect_audit().await?;
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies every embedded migration not applied yet.
    pub async fn migrate(&self) -> Result<(), Error> {
        let _lock = self.sqlite_migration_lock().await?;
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, name, sql)| {
                Migration::new(*version, Cow::Borrowed(*name), MigrationType::Simple, (*sql).into_sql_str(), false)
            })
            .collect();
        let migrator = Migrator::with_migrations(migrations);
        migrator.run(&self.pool).await.map_err(Error::Migrate)
    }

    /// On SQLite, an exclusive lock on `<database file>-migrate.lock`, held while the returned
    /// file lives: sqlx's migration lock does nothing there, so two processes starting on a
    /// fresh database both applied the first migration and one failed ("table already
    /// exists"). A file of its own, not the database's: SQLite's POSIX locks are dropped when
    /// the process closes any descriptor of the database file. `None` for PostgreSQL (sqlx
    /// locks) and an in-memory database.
    async fn sqlite_migration_lock(&self) -> Result<Option<std::fs::File>, Error> {
        if self.backend != Backend::Sqlite {
            return Ok(None);
        }
        let row = sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        let file: String = col(&row, "file")?;
        if file.is_empty() {
            return Ok(None);
        }
        let path = format!("{file}-migrate.lock");
        let at = path.clone();
        let locked = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new().create(true).write(true).truncate(false).mode(0o600).open(&at)?;
            f.lock()?;
            Ok::<_, std::io::Error>(f)
        })
        .await
        .map_err(|e| Error::Invalid(format!("cannot lock {path}: {e}")))?;
        locked.map(Some).map_err(|e| Error::Invalid(format!("cannot lock {path}: {e}")))
    }

    /// PostgreSQL administration for throw-away databases (tests, `db` tooling). The name
    /// must be a plain identifier.
    pub async fn create_database(&self, name: &str) -> Result<(), Error> {
        let sql = format!("CREATE DATABASE {}", plain_identifier(name)?);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&self.pool).await.map_err(db_err)?;
        Ok(())
    }

    pub async fn drop_database(&self, name: &str) -> Result<(), Error> {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", plain_identifier(name)?);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&self.pool).await.map_err(db_err)?;
        Ok(())
    }

    /// The setting `name`, created with `init()` if absent (the first writer wins a race).
    pub async fn setting_or_init(&self, name: &str, init: impl FnOnce() -> String) -> Result<String, Error> {
        let get = || sqlx::query("SELECT value FROM settings WHERE name = $1").bind(name);
        if let Some(row) = get().fetch_optional(&self.pool).await.map_err(db_err)? {
            return col(&row, "value");
        }
        let r = sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2)")
            .bind(name)
            .bind(init())
            .execute(&self.pool)
            .await;
        match r {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {}
            Err(e) => return Err(db_err(e)),
        }
        let row = get().fetch_one(&self.pool).await.map_err(db_err)?;
        col(&row, "value")
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

use sqlx::SqlSafeStr as _;

fn plain_identifier(name: &str) -> Result<&str, Error> {
    let ok = !name.is_empty()
        && name.len() < 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok { Ok(name) } else { Err(Error::Invalid(format!("{name:?} is not a plain identifier"))) }
}

/// Milliseconds since the Unix epoch: the representation of every time in the database.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub(crate) fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Db {
    /// The row `select` (a `SELECT … FROM <table>` with a `uuid`, a `name` and a
    /// `project_uuid`) finds for `ident`, a uuid or a name, within `project` when given. A uuid
    /// match comes before name matches: an object of another project named after a uuid (seen
    /// by an administrator's unscoped lookup) is never what acting on that uuid reaches. A name
    /// that several projects use (seen by an unscoped lookup) is [`Error::Conflict`]: acting
    /// on whichever came first could reach another project's object.
    pub(crate) async fn row_by_ident(
        &self,
        select: &str,
        ident: &str,
        project: Option<&str>,
    ) -> Result<Option<sqlx::any::AnyRow>, Error> {
        let sql = format!(
            "{select} WHERE (uuid = $1 OR name = $2) AND ($3 = '' OR project_uuid = $4) ORDER BY uuid <> $1, uuid LIMIT 2"
        );
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(ident)
            .bind(ident)
            .bind(project.unwrap_or(""))
            .bind(project.unwrap_or(""))
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        if rows.len() == 2 {
            let uuid = |r: &sqlx::any::AnyRow| col::<String>(r, "uuid");
            if uuid(&rows[0])? != ident {
                return Err(Error::Conflict(format!("several projects have an object named {ident}: use its uuid")));
            }
        }
        Ok((!rows.is_empty()).then(|| rows.swap_remove(0)))
    }
}

/// A database error that is not the caller's fault.
pub(crate) fn db_err(e: sqlx::Error) -> Error {
    Error::Db(e)
}

/// Maps a unique-constraint violation to a 409 with `conflict`; anything else is a DB error.
pub(crate) fn unique_or(e: sqlx::Error, conflict: impl FnOnce() -> String) -> Error {
    if is_unique_violation(&e) { Error::Conflict(conflict()) } else { Error::Db(e) }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation() || d.code().is_some_and(|c| c == "23505" || c == "2067" || c == "1555")
        }
        _ => false,
    }
}

/// A foreign key naming a row that is gone (PostgreSQL 23503, SQLite 787).
pub(crate) fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_foreign_key_violation() || d.code().is_some_and(|c| c == "23503" || c == "787")
        }
        _ => false,
    }
}

/// Reads a column, naming it in the error.
pub(crate) fn col<'r, T>(row: &'r sqlx::any::AnyRow, name: &str) -> Result<T, Error>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    use sqlx::Row;
    row.try_get(name).map_err(db_err)
}

/// Parses a JSON column, falling back to `null` for text that is not JSON (never a panic).
pub(crate) fn json_col(row: &sqlx::any::AnyRow, name: &str) -> Result<serde_json::Value, Error> {
    let text: String = col(row, name)?;
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite:///tmp/x.sqlite?mode=rwc"), "sqlite:///tmp/x.sqlite?mode=rwc");
        assert_eq!(redact_url("postgres://h:5432/db"), "postgres://h:5432/db");
        assert_eq!(redact_url("postgres://u@h:5432/db?a=b:c"), "postgres://u@h:5432/db?a=b:c");
        // A password that is not percent-encoded may hold `/` and `@`.
        assert_eq!(redact_url("postgres://u:ab/c@d@db:5432/x"), "postgres://u:***@db:5432/x");
        assert_eq!(redact_url("amqp://guest:a/b@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        let url = DatabaseUrl::new("amqp://guest:hunter2@127.0.0.1:5672/%2f");
        assert!(!format!("{url:?} {url}").contains("hunter2"));
    }
}
