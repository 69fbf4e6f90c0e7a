//! Requests to boards and their results.

use serde_json::Value;
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

#[derive(Debug, Clone)]
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

    /// [`Db::create_request`] by a project acting under `lease` on the board.
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
        sqlx::query(
            "INSERT INTO requests (uuid, project_uuid, destination_uuid, status, type, action, args, expires_at, \
             created_at, updated_at, lease_uuid) VALUES ($1, $2, $3, 'PENDING', 0, $4, $5, $6, $7, $8, $9)",
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
        .execute(self.pool())
        .await
        .map_err(db_err)?;
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

    /// One page of the requests of `project` (all: `None`), to `board` if given.
    pub async fn list_requests_page(
        &self,
        project: Option<&str>,
        board: Option<&str>,
        page: &Page,
    ) -> Result<Vec<Request>, Error> {
        let sql = format!(
            "SELECT * FROM requests WHERE ($1 = '' OR project_uuid = $2) AND ($3 = '' OR destination_uuid = $4){}",
            page.sql("requests", 5)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(project.unwrap_or(""))
            .bind(project.unwrap_or(""))
            .bind(board.unwrap_or(""))
            .bind(board.unwrap_or(""))
            .bind(page.marker())
            .bind(page.marker())
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(request_row).collect()
    }

    /// Compare-and-set of a request's status: moves it to `to` only from one of `from`, so
    /// two processes handling the same request (a redelivered message) do the work once.
    pub async fn transition_request(
        &self,
        uuid: &str,
        from: &[RequestStatus],
        to: RequestStatus,
        agent: Option<&str>,
    ) -> Result<bool, Error> {
        let mut total = 0;
        for f in from {
            let r = sqlx::query(
                "UPDATE requests SET status = $1, agent = COALESCE($2, agent), updated_at = $3 \
                 WHERE uuid = $4 AND status = $5",
            )
            .bind(to.as_str())
            .bind(agent.map(str::to_owned))
            .bind(now_ms())
            .bind(uuid)
            .bind(f.as_str())
            .execute(self.pool())
            .await
            .map_err(db_err)?;
            total += r.rows_affected();
            if total > 0 {
                break;
            }
        }
        Ok(total > 0)
    }

    /// Records a board's result for a request (insert or update).
    pub async fn set_result(&self, request: &str, board: &str, result: &str, message: &str) -> Result<(), Error> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE results SET result = $1, message = $2, updated_at = $3 WHERE request_uuid = $4 AND board_uuid = $5",
        )
        .bind(result)
        .bind(message)
        .bind(now)
        .bind(request)
        .bind(board)
        .execute(self.pool())
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
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        }
        Ok(())
    }

    pub async fn results(&self, request: &str) -> Result<Vec<ResultRow>, Error> {
        let rows = sqlx::query("SELECT * FROM results WHERE request_uuid = $1 ORDER BY created_at")
            .bind(request)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(result_row).collect()
    }

    /// Requests queued for `board` that have not expired, oldest first.
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
            if self.transition_request(&r.uuid, &[RequestStatus::Queued], RequestStatus::Expired, None).await? {
                self.set_result(
                    &r.uuid,
                    &r.destination,
                    "ERROR",
                    "the board did not log in before the command expired",
                )
                .await?;
                out.push(r);
            }
        }
        Ok(out)
    }

    pub async fn count_requests_by_status(&self) -> Result<Vec<(String, i64)>, Error> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM requests GROUP BY status")
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(|r| Ok((col(r, "status")?, col(r, "n")?))).collect()
    }
}
