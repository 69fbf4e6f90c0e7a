//! The audit log: who did what, when and from where. Append-only: this module has an insert
//! and a select, nothing else, and [`Db::protect_audit`] installs a trigger that makes the
//! database itself refuse an UPDATE or DELETE of an entry.

use sqlx::any::AnyRow;

use super::{Backend, Db, col, db_err, new_uuid, now_ms};
use crate::Error;

/// An entry to record. Empty strings where a field does not apply.
#[derive(Debug, Clone, Default)]
pub struct NewAudit {
    pub user_uuid: String,
    pub user_name: String,
    /// The project the action concerns (what a manager's view is filtered by).
    pub project_uuid: String,
    /// `POST /v1/boards`, `auth.login`, `board.enroll`, `tunnel.open`, …
    pub action: String,
    /// The path or the object acted on.
    pub target: String,
    /// The peer address, or the WAMP session for board actions.
    pub source: String,
    /// HTTP status for REST calls; 0 for success and 1 for refusal elsewhere.
    pub status: i64,
    pub detail: String,
}

/// A recorded entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: String,
    pub at: i64,
    pub user_uuid: String,
    pub user_name: String,
    pub project_uuid: String,
    pub action: String,
    pub target: String,
    pub source: String,
    pub status: i64,
    pub detail: String,
}

/// Which entries to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this project's entries (a manager's view).
    pub project: Option<String>,
    /// Only entries at or after this time (ms).
    pub since: i64,
    /// Only entries strictly before this time (ms); 0: no bound.
    pub before: i64,
    /// Only entries whose action starts with this (`tunnel.`, `POST /v1/boards`), case
    /// included; "": all.
    pub action: String,
    /// Only entries listed after the entry with this id (newest first; `None`: from the
    /// newest): the next page, exact even when many entries share a millisecond.
    pub marker: Option<String>,
    pub limit: i64,
}

fn entry_row(r: &AnyRow) -> Result<AuditEntry, Error> {
    Ok(AuditEntry {
        id: col(r, "id")?,
        at: col(r, "at")?,
        user_uuid: col(r, "user_uuid")?,
        user_name: col(r, "user_name")?,
        project_uuid: col(r, "project_uuid")?,
        action: col(r, "action")?,
        target: col(r, "target")?,
        source: col(r, "source")?,
        status: col(r, "status")?,
        detail: col(r, "detail")?,
    })
}

/// Longest text kept per field: entries are evidence, not storage.
const MAX_FIELD: usize = 1024;

fn clip(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_owned();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl Db {
    pub async fn insert_audit(&self, e: &NewAudit) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO audit (id, at, user_uuid, user_name, project_uuid, action, target, source, status, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(new_uuid())
        .bind(now_ms())
        .bind(clip(&e.user_uuid))
        .bind(clip(&e.user_name))
        .bind(clip(&e.project_uuid))
        .bind(clip(&e.action))
        .bind(clip(&e.target))
        .bind(clip(&e.source))
        .bind(e.status)
        .bind(clip(&e.detail))
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// Entries matching `q`, newest first (by time, then id). A `marker` that names no entry
    /// of the log (of `q.project`'s entries, when set) is [`Error::NotFound`].
    pub async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, Error> {
        // The page starts after (at, id) of the marker; without one, at the newest.
        let marker = match &q.marker {
            None => None,
            Some(id) => {
                let project = q.project.clone().unwrap_or_default();
                let row = sqlx::query("SELECT at FROM audit WHERE id = $1 AND ($2 = '' OR project_uuid = $3)")
                    .bind(id)
                    .bind(&project)
                    .bind(&project)
                    .fetch_optional(self.pool())
                    .await
                    .map_err(db_err)?
                    .ok_or_else(|| Error::NotFound(format!("audit entry {id} not found")))?;
                Some((col::<i64>(&row, "at")?, id.as_str()))
            }
        };
        let (sql, f) = Self::audit_sql(q, marker);
        let rows = f.query(sql).fetch_all(self.pool()).await.map_err(db_err)?;
        rows.iter().map(entry_row).collect()
    }

    /// The query of [`Db::list_audit`] and its values, given the marker's `(at, id)`: a range
    /// of `audit_project_at` for a project, of `audit_at` for the whole log, that ends at the
    /// marker (every bound on `at` folded into one, which the index range uses).
    pub(crate) fn audit_sql(q: &AuditQuery, marker: Option<(i64, &str)>) -> (String, super::page::Filters) {
        let mut f = super::page::Filters::default();
        f.eq("project_uuid", q.project.as_deref());
        // at < before, and at <= the marker's at (at < at + 1; every at is <= i64::MAX).
        let mut end = if q.before > 0 { q.before } else { i64::MAX };
        if let Some(after) = marker.and_then(|(at, _)| at.checked_add(1)) {
            end = end.min(after);
        }
        let (since, end) = (f.arg(q.since), f.arg(end));
        f.and(format!("at >= {since} AND at < {end}"));
        if !q.action.is_empty() {
            // A prefix compared as text (LIKE ignores ASCII case on SQLite, not on PostgreSQL).
            let len = f.arg(i64::try_from(q.action.chars().count()).unwrap_or(i64::MAX).min(i64::from(i32::MAX)));
            let action = f.arg(q.action.as_str());
            f.and(format!("substr(action, 1, CAST({len} AS INTEGER)) = {action}"));
        }
        if let Some((at, id)) = marker {
            // Within the marker's millisecond, the entries listed after it.
            let (at, id) = (f.arg(at), f.arg(id));
            f.and(format!("(at < {at} OR id < {id})"));
        }
        let sql = format!(
            "SELECT id, at, user_uuid, user_name, project_uuid, action, target, source, status, detail FROM audit{} \
             ORDER BY at DESC, id DESC LIMIT {}",
            f.sql(),
            q.limit.clamp(1, 1000)
        );
        (sql, f)
    }

    /// Makes the database refuse UPDATE and DELETE on `audit` (idempotent; every process
    /// calls it at start).
    pub async fn protect_audit(&self) -> Result<(), Error> {
        let statements: &[&str] = match self.backend() {
            Backend::Sqlite => &[
                "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit \
                 BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
                "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit \
                 BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
            ],
            // The block holds a transaction-level advisory lock (its key: "S4TAudit" as a
            // big-endian i64), so that processes starting together install it one after the
            // other: each check then sees what the one before installed (the check and the
            // CREATE were a race that could end in duplicate_function or duplicate_object).
            Backend::Postgres => &["DO $$ BEGIN \
                 PERFORM pg_advisory_xact_lock(5995509644056095092); \
                 IF NOT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'audit_append_only') THEN \
                 CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS \
                 'BEGIN RAISE EXCEPTION ''the audit log is append-only''; END'; END IF; \
                 IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_no_change') THEN \
                 CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit \
                 FOR EACH ROW EXECUTE FUNCTION audit_append_only(); END IF; END $$"],
        };
        for sql in statements {
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(*sql)).execute(self.pool()).await {
                // Belt and braces (a process of a version without the lock may be starting
                // too): a racing winner installed it (unique violation in the catalog,
                // duplicate_function, duplicate_object); anything else is a real failure.
                let installed =
                    matches!(&e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c == "42723" || c == "42710"));
                if !installed && !super::is_unique_violation(&e) {
                    return Err(db_err(e));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::DatabaseUrl;

    #[tokio::test]
    async fn entries_are_scoped_and_cannot_be_changed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&DatabaseUrl::sqlite_in(dir.path())).await.unwrap();
        db.protect_audit().await.unwrap(); // idempotent: open() did it already
        for (p, action) in [("alpha", "POST /v1/boards"), ("beta", "DELETE /v1/vpns/x"), ("alpha", "auth.login")] {
            let e = NewAudit { project_uuid: p.into(), action: action.into(), ..NewAudit::default() };
            db.insert_audit(&e).await.unwrap();
        }
        let q = AuditQuery { project: Some("alpha".into()), limit: 10, ..Default::default() };
        let alpha = db.list_audit(&q).await.unwrap();
        assert_eq!(alpha.len(), 2);
        assert!(alpha.iter().all(|e| e.project_uuid == "alpha"));
        let all = db.list_audit(&AuditQuery { limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(all.len(), 3);
        let by_action = |a: &str| AuditQuery { action: a.into(), limit: 10, ..Default::default() };
        let posts = db.list_audit(&by_action("POST /v1/")).await.unwrap();
        assert_eq!(posts.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["POST /v1/boards"]);
        assert!(db.list_audit(&by_action("auth_")).await.unwrap().is_empty(), "'_' is not a wildcard");
        assert!(db.list_audit(&by_action("%")).await.unwrap().is_empty(), "'%' is not a wildcard");
        for sql in ["UPDATE audit SET action = 'nothing'", "DELETE FROM audit"] {
            let r = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(db.pool()).await;
            assert!(r.is_err(), "{sql} was allowed");
        }
        assert_eq!(db.list_audit(&AuditQuery { limit: 10, ..Default::default() }).await.unwrap(), all);
        let long = NewAudit { action: "x".repeat(5000), ..NewAudit::default() };
        db.insert_audit(&long).await.unwrap();
    }
}
