//! Requests to boards and their results.

use std::fmt;

use serde_json::Value;
use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::{Db, Page, col, db_err, json_col, new_uuid, now_ms};
use crate::Error;

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    /// Accepted, not yet sent to the board.
    Pending,
    /// The board was offline: waits for its next login, until `expires_at`.
    Queued,
    /// Sent to the board; waiting for its result.
    Running,
    Completed,
    Failed,
    /// Queued past its expiry without the board logging in.
    Expired,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "PENDING",
            RequestStatus::Queued => "QUEUED",
            RequestStatus::Running => "RUNNING",
            RequestStatus::Completed => "COMPLETED",
            RequestStatus::Failed => "FAILED",
            RequestStatus::Expired => "EXPIRED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PENDING" => RequestStatus::Pending,
            "QUEUED" => RequestStatus::Queued,
            "RUNNING" => RequestStatus::Running,
            "COMPLETED" => RequestStatus::Completed,
            "FAILED" => RequestStatus::Failed,
            "EXPIRED" => RequestStatus::Expired,
            _ => return None,
        })
    }

    /// No further change will happen.
    pub fn is_final(self) -> bool {
        matches!(self, RequestStatus::Completed | RequestStatus::Failed | RequestStatus::Expired)
    }
}

/// Keys of request arguments that hold bearer secrets: the tunnel token of a ServiceEnable or
/// ServiceRestore (`tunnel_token`, valid for days) and of a VpnJoin (`token`). They are
/// dropped from the stored arguments once the request is final (nothing reads them after).
pub const SECRET_ARG_KEYS: &[&str] = &["tunnel_token", "token"];

/// `Debug` leaves out `args`: they may hold tunnel tokens (until the request is final) and
/// a plugin's code (up to 512 KiB).
#[derive(Clone)]
pub struct Request {
    pub uuid: String,
    pub project: String,
    pub destination: String,
    pub main_request: Option<String>,
    pub pending_requests: i64,
    pub status: RequestStatus,
    pub action: String,
    pub args: Value,
    pub agent: Option<String>,
    pub expires_at: Option<i64>,
    /// The lease of the caller's project on the board when the request was made, if any.
    pub lease: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone)]
pub struct ResultRow {
    pub request: String,
    pub board: String,
    pub result: String,
    pub message: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("uuid", &self.uuid)
            .field("project", &self.project)
            .field("destination", &self.destination)
            .field("main_request", &self.main_request)
            .field("pending_requests", &self.pending_requests)
            .field("status", &self.status)
            .field("action", &self.action)
            .field("agent", &self.agent)
            .field("expires_at", &self.expires_at)
            .field("lease", &self.lease)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish_non_exhaustive()
    }
}

/// What a final request of `action` keeps of its `args`, if that differs from them: no
/// [`SECRET_ARG_KEYS`] in any object, and a PluginInject's code (up to 512 KiB, kept in the
/// plugin itself) replaced by its length, `code_len`: finished requests stay for
/// [`REQUEST_RETENTION`](crate::conductor::REQUEST_RETENTION), and repeated injections would
/// otherwise fill the database.
pub fn final_args(action: &str, args: &Value) -> Option<Value> {
    fn strip(v: &mut Value) -> bool {
        match v {
            Value::Object(m) => {
                let mut changed = false;
                for k in SECRET_ARG_KEYS {
                    changed |= m.remove(*k).is_some();
                }
                for v in m.values_mut() {
                    changed |= strip(v);
                }
                changed
            }
            Value::Array(a) => a.iter_mut().fold(false, |changed, v| strip(v) | changed),
            _ => false,
        }
    }
    let mut out = args.clone();
    let mut changed = strip(&mut out);
    if action == "PluginInject"
        && let Some(plugin) = out.get_mut(0).and_then(Value::as_object_mut)
        && let Some(code) = plugin.remove("code")
    {
        let len = code.as_str().map_or(0, str::len);
        plugin.insert("code_len".into(), len.into());
        changed = true;
    }
    changed.then_some(out)
}

fn request_row(r: &AnyRow) -> Result<Request, Error> {
    let status: String = col(r, "status")?;
    Ok(Request {
        uuid: col(r, "uuid")?,
        project: col(r, "project_uuid")?,
        destination: col(r, "destination_uuid")?,
        main_request: col(r, "main_request_uuid")?,
        pending_requests: col(r, "pending_requests")?,
        status: RequestStatus::parse(&status).unwrap_or(RequestStatus::Failed),
        action: col(r, "action")?,
        args: json_col(r, "args")?,
        agent: col(r, "agent")?,
        expires_at: col(r, "expires_at")?,
        lease: col(r, "lease_uuid")?,
        created_at: col(r, "created_at")?,
        updated_at: col(r, "updated_at")?,
    })
}

fn result_row(r: &AnyRow) -> Result<ResultRow, Error> {
    Ok(ResultRow {
        request: col(r, "request_uuid")?,
        board: col(r, "board_uuid")?,
        result: col(r, "result")?,
        message: col(r, "message")?,
        created_at: col(r, "created_at")?,
        updated_at: col(r, "updated_at")?,
    })
}

impl Db {
    /// The most requests one board may have waiting to be delivered (queued for its login, or
    /// made to be queued and not yet handed to it): each may hold up to 512 KiB (a plugin's
    /// code), and a board offline for long must not gather them without end.
    pub const MAX_QUEUED_PER_BOARD: i64 = 256;

    /// Records a new request (PENDING, or QUEUED with an expiry).
    pub async fn create_request(
        &self,
        project: &str,
        board: &str,
        action: &str,
        args: &Value,
        queue_until: Option<i64>,
    ) -> Result<Request, Error> {
        self.create_request_under(project, board, action, args, queue_until, None).await
    }

    /// [`Db::create_request`] by a project acting under `lease` on the board. A request to be
    /// queued (`queue_until`) is refused (409) while the board has
    /// [`Db::MAX_QUEUED_PER_BOARD`] waiting already; the count and the insert are one
    /// statement (concurrent inserts on PostgreSQL may pass the cap by their number).
    pub async fn create_request_under(
        &self,
        project: &str,
        board: &str,
        action: &str,
        args: &Value,
        queue_until: Option<i64>,
        lease: Option<&str>,
    ) -> Result<Request, Error> {
        let (uuid, now) = (new_uuid(), now_ms());
        let r = sqlx::query(
            "INSERT INTO requests (uuid, project_uuid, destination_uuid, status, type, action, args, expires_at, \
             created_at, updated_at, lease_uuid) SELECT $1, $2, $3, 'PENDING', 0, $4, $5, $6, $7, $8, $9 \
             WHERE $10 = 0 OR (SELECT COUNT(*) FROM requests WHERE destination_uuid = $11 \
             AND status IN ('PENDING', 'QUEUED') AND expires_at IS NOT NULL) < $12",
        )
        .bind(&uuid)
        .bind(project)
        .bind(board)
        .bind(action)
        .bind(args.to_string())
        .bind(queue_until)
        .bind(now)
        .bind(now)
        .bind(lease.map(str::to_owned))
        .bind(i64::from(queue_until.is_some()))
        .bind(board)
        .bind(Self::MAX_QUEUED_PER_BOARD)
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        if r.rows_affected() == 0 {
            return Err(Error::Conflict(format!(
                "board {board} has {} commands waiting for it already: queue more once it has logged in \
                 and taken them (or they have expired)",
                Self::MAX_QUEUED_PER_BOARD
            )));
        }
        self.request(&uuid, None).await?.ok_or_else(|| Error::NotFound(format!("request {uuid} vanished")))
    }

    pub async fn request(&self, uuid: &str, project: Option<&str>) -> Result<Option<Request>, Error> {
        let row = sqlx::query("SELECT * FROM requests WHERE uuid = $1 AND ($2 = '' OR project_uuid = $3)")
            .bind(uuid)
            .bind(project.unwrap_or(""))
            .bind(project.unwrap_or(""))
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        row.as_ref().map(request_row).transpose()
    }

    /// One page of the requests of `project` (all: `None`), to `board` if given, without
    /// their arguments (`args` is null): a list never shows them, and up to a thousand of
    /// them read and parsed for each page made lists cost far more than they show.
    pub async fn list_requests_page(
        &self,
        project: Option<&str>,
        board: Option<&str>,
        page: &Page,
    ) -> Result<Vec<Request>, Error> {
        let (sql, f) = Self::requests_page_sql(project, board, page);
        let rows = f.query(sql).fetch_all(self.pool()).await.map_err(db_err)?;
        rows.iter().map(request_row).collect()
    }

    /// The query of [`Db::list_requests_page`] and its values: a project's page is a range of
    /// the `(project_uuid, created_at)` index.
    pub(crate) fn requests_page_sql(
        project: Option<&str>,
        board: Option<&str>,
        page: &Page,
    ) -> (String, super::page::Filters) {
        let mut f = super::page::Filters::default();
        f.eq("project_uuid", project);
        f.eq("destination_uuid", board);
        let sql = format!(
            "SELECT uuid, project_uuid, destination_uuid, main_request_uuid, pending_requests, status, action, \
             'null' AS args, agent, expires_at, lease_uuid, created_at, updated_at FROM requests{}",
            page.clause(&mut f, "requests", "uuid", "")
        );
        (sql, f)
    }

    /// Compare-and-set of a request's status: moves it to `to` only from one of `from`, so
    /// two processes handling the same request (a redelivered message) do the work once. A
    /// request made final loses the secrets of its arguments ([`SECRET_ARG_KEYS`]).
    pub async fn transition_request(
        &self,
        uuid: &str,
        from: &[RequestStatus],
        to: RequestStatus,
        agent: Option<&str>,
    ) -> Result<bool, Error> {
        let scrubbed = if to.is_final() { self.final_args(uuid).await? } else { None };
        let mut conn = self.pool().acquire().await.map_err(db_err)?;
        set_status(&mut conn, uuid, from, to, agent, scrubbed).await
    }

    /// [`Db::transition_request`] to a final `to` and, in the same transaction, `board`'s
    /// result set to `result` and `message`: a request failed or expired by the cloud never
    /// stays without the result that says why (a write failing between the two left it so,
    /// and the compare-and-set, done, kept every retry from writing it).
    pub async fn end_request(
        &self,
        uuid: &str,
        from: &[RequestStatus],
        to: RequestStatus,
        (board, result, message): (&str, &str, &str),
    ) -> Result<bool, Error> {
        let scrubbed = if to.is_final() { self.final_args(uuid).await? } else { None };
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        if !set_status(&mut tx, uuid, from, to, None, scrubbed).await? {
            return Ok(false); // rolled back: nothing was written
        }
        upsert_result(&mut tx, uuid, board, result, message).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    /// What the request keeps of its arguments once final ([`final_args`]), as text, if that
    /// differs. The database sends only arguments that may change (a key ending in `token`, or
    /// an injection), not every request's.
    async fn final_args(&self, uuid: &str) -> Result<Option<String>, Error> {
        let row = sqlx::query(
            "SELECT action, args FROM requests WHERE uuid = $1 AND (args LIKE '%token\"%' OR action = 'PluginInject')",
        )
        .bind(uuid)
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        let Some(row) = row else { return Ok(None) };
        let action: String = col(&row, "action")?;
        Ok(final_args(&action, &json_col(&row, "args")?).map(|v| v.to_string()))
    }

    /// Records a board's result for a request (insert or update).
    pub async fn set_result(&self, request: &str, board: &str, result: &str, message: &str) -> Result<(), Error> {
        let mut conn = self.pool().acquire().await.map_err(db_err)?;
        upsert_result(&mut conn, request, board, result, message).await
    }

    pub async fn results(&self, request: &str) -> Result<Vec<ResultRow>, Error> {
        let rows = sqlx::query("SELECT * FROM results WHERE request_uuid = $1 ORDER BY created_at")
            .bind(request)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(result_row).collect()
    }

    /// The oldest request queued for `board` that has not expired: the next to deliver. A
    /// PENDING one that may be queued (it has an expiry) counts: taken from the queue, it was
    /// not handed to the board yet (a delivery cut by an error), or its own `Execute` is on
    /// its way; either way it goes before the younger ones. A RUNNING one made to be queued
    /// comes before all: the board is running it, and the next waits for its end.
    pub async fn next_queued_for_board(&self, board: &str) -> Result<Option<Request>, Error> {
        let row = sqlx::query(
            "SELECT * FROM requests WHERE destination_uuid = $1 \
             AND ((status = 'RUNNING' AND expires_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM results s \
             WHERE s.request_uuid = requests.uuid AND s.result = 'RUNNING' AND s.message <> '')) \
             OR ((status = 'QUEUED' OR (status = 'PENDING' AND expires_at IS NOT NULL)) \
             AND (expires_at IS NULL OR expires_at > $2))) \
             ORDER BY CASE WHEN status = 'RUNNING' THEN 0 ELSE 1 END, created_at, uuid LIMIT 1",
        )
        .bind(board)
        .bind(now_ms())
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        row.as_ref().map(request_row).transpose()
    }

    /// Requests queued for `board` that have not expired, oldest first (at most
    /// [`Db::MAX_QUEUED_PER_BOARD`] or a few more).
    pub async fn queued_for_board(&self, board: &str) -> Result<Vec<Request>, Error> {
        let rows = sqlx::query(
            "SELECT * FROM requests WHERE destination_uuid = $1 AND status = 'QUEUED' \
             AND (expires_at IS NULL OR expires_at > $2) ORDER BY created_at, uuid",
        )
        .bind(board)
        .bind(now_ms())
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        rows.iter().map(request_row).collect()
    }

    /// The online boards (with a session on an agent) that have queued requests not expired:
    /// the sweep delivers them when a delivery stopped (a hand-over that failed).
    pub async fn online_boards_with_queued(&self) -> Result<Vec<String>, Error> {
        let rows = sqlx::query(
            "SELECT DISTINCT r.destination_uuid FROM requests r JOIN boards b ON b.uuid = r.destination_uuid \
             WHERE r.status = 'QUEUED' AND (r.expires_at IS NULL OR r.expires_at > $1) AND b.status = 'online' \
             AND b.session_id IS NOT NULL AND b.agent IS NOT NULL",
        )
        .bind(now_ms())
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        rows.iter().map(|r| col(r, "destination_uuid")).collect()
    }

    /// Requests in `status`, oldest first (recovery after a restart).
    pub async fn requests_in(&self, status: RequestStatus) -> Result<Vec<Request>, Error> {
        let rows = sqlx::query("SELECT * FROM requests WHERE status = $1 ORDER BY created_at, uuid")
            .bind(status.as_str())
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(request_row).collect()
    }

    /// Requests in `status` since before `before` (ms): the last change of their status.
    pub async fn requests_in_since(&self, status: RequestStatus, before: i64) -> Result<Vec<Request>, Error> {
        let rows = sqlx::query("SELECT * FROM requests WHERE status = $1 AND updated_at <= $2 ORDER BY updated_at")
            .bind(status.as_str())
            .bind(before)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(request_row).collect()
    }

    /// Queued requests whose expiry has passed, now EXPIRED. Returns them.
    pub async fn expire_queued(&self) -> Result<Vec<Request>, Error> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT * FROM requests WHERE status = 'QUEUED' AND expires_at IS NOT NULL AND expires_at <= $1",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows.iter().map(request_row) {
            let r = r?;
            let why = "the board did not log in before the command expired";
            let result = (r.destination.as_str(), "ERROR", why);
            if self.end_request(&r.uuid, &[RequestStatus::Queued], RequestStatus::Expired, result).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Deletes up to `batch` finished requests (COMPLETED, FAILED, EXPIRED) last changed
    /// before `before` (ms), with their results; returns how many. One a `pending` plugin
    /// injection still names is kept: the injection learns its outcome from it when next read.
    pub async fn purge_finished_requests(&self, before: i64, batch: i64) -> Result<u64, Error> {
        // The same rows both times: final requests do not change, and the order is total.
        let chosen = "SELECT uuid FROM requests WHERE status IN ('COMPLETED', 'FAILED', 'EXPIRED') \
                      AND updated_at < $1 AND uuid NOT IN \
                      (SELECT request_uuid FROM plugin_injections WHERE request_uuid IS NOT NULL) \
                      ORDER BY updated_at, uuid LIMIT $2";
        let delete = |from: &str| {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {from} IN ({chosen})"))).bind(before).bind(batch)
        };
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        delete("results WHERE request_uuid").execute(&mut *tx).await.map_err(db_err)?;
        let r = delete("requests WHERE uuid").execute(&mut *tx).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(r.rows_affected())
    }

    pub async fn count_requests_by_status(&self) -> Result<Vec<(String, i64)>, Error> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM requests GROUP BY status")
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(|r| Ok((col(r, "status")?, col(r, "n")?))).collect()
    }
}

/// The compare-and-set of [`Db::transition_request`] on `conn`. Arguments never change after
/// the insert: `scrubbed` (what a final request keeps of them) is read before, written with it.
async fn set_status(
    conn: &mut AnyConnection,
    uuid: &str,
    from: &[RequestStatus],
    to: RequestStatus,
    agent: Option<&str>,
    scrubbed: Option<String>,
) -> Result<bool, Error> {
    for f in from {
        let r = sqlx::query(
            "UPDATE requests SET status = $1, agent = COALESCE($2, agent), args = COALESCE($3, args), \
             updated_at = $4 WHERE uuid = $5 AND status = $6",
        )
        .bind(to.as_str())
        .bind(agent.map(str::to_owned))
        .bind(scrubbed.clone())
        .bind(now_ms())
        .bind(uuid)
        .bind(f.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        if r.rows_affected() > 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// [`Db::set_result`] on `conn`.
async fn upsert_result(
    conn: &mut AnyConnection,
    request: &str,
    board: &str,
    result: &str,
    message: &str,
) -> Result<(), Error> {
    let now = now_ms();
    let r = sqlx::query(
        "UPDATE results SET result = $1, message = $2, updated_at = $3 WHERE request_uuid = $4 AND board_uuid = $5",
    )
    .bind(result)
    .bind(message)
    .bind(now)
    .bind(request)
    .bind(board)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    if r.rows_affected() == 0 {
        sqlx::query(
            "INSERT INTO results (request_uuid, board_uuid, result, message, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(request)
        .bind(board)
        .bind(result)
        .bind(message)
        .bind(now)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    }
    Ok(())
}
