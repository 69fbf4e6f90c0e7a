//! Boards, their sessions and the agents they are on.

use serde_json::Value;
use sqlx::any::AnyRow;

use super::{Db, Page, col, db_err, json_col, new_uuid, now_ms, unique_or};
use crate::Error;

/// A board row. `secret_key` (a derived key, not the secret) stays out of `Debug`.
#[derive(Clone)]
pub struct Board {
    pub uuid: String,
    pub name: String,
    pub code: Option<String>,
    pub status: String,
    pub board_type: String,
    pub agent: Option<String>,
    pub owner: String,
    pub project: String,
    pub fleet: Option<String>,
    pub lr_version: Option<String>,
    pub connectivity: Value,
    pub mobile: bool,
    pub config: Value,
    pub extra: Value,
    pub latitude: Option<String>,
    pub longitude: Option<String>,
    pub altitude: Option<String>,
    pub session: Option<String>,
    pub last_seen: Option<i64>,
    pub secret_salt: Option<String>,
    pub secret_key: Option<String>,
    /// When (ms) the board was last revoked or rotated: tunnel tokens issued before are void.
    pub tokens_after: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board")
            .field("uuid", &self.uuid)
            .field("name", &self.name)
            .field("status", &self.status)
            .field("agent", &self.agent)
            .field("project", &self.project)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// What `POST /v1/boards` creates.
#[derive(Debug, Clone, Default)]
pub struct NewBoard {
    pub name: String,
    pub code: String,
    pub board_type: String,
    pub owner: String,
    pub project: String,
    pub fleet: Option<String>,
    pub mobile: bool,
    pub extra: Value,
    pub location: Option<(String, String, String)>,
}

/// A partial update (PATCH): `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct BoardUpdate {
    pub name: Option<String>,
    pub board_type: Option<String>,
    pub mobile: Option<bool>,
    pub fleet: Option<Option<String>>,
    pub extra: Option<Value>,
    pub location: Option<(String, String, String)>,
}

/// A cloud agent, by configured name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub name: String,
    pub kind: String,
    pub url: String,
    pub online: bool,
    pub ragent: bool,
    pub last_seen: i64,
}

macro_rules! board_query {
    ($tail:literal) => {
        concat!(
            "SELECT uuid, name, code, status, type, agent, owner_uuid, project_uuid, fleet_uuid, lr_version, ",
            "connectivity, mobile, config, extra, latitude, longitude, altitude, session_id, last_seen, secret_salt, ",
            "secret_key, tokens_after, created_at, updated_at FROM boards ",
            $tail
        )
    };
}

fn board_row(row: &AnyRow) -> Result<Board, Error> {
    Ok(Board {
        uuid: col(row, "uuid")?,
        name: col(row, "name")?,
        code: col(row, "code")?,
        status: col(row, "status")?,
        board_type: col(row, "type")?,
        agent: col(row, "agent")?,
        owner: col(row, "owner_uuid")?,
        project: col(row, "project_uuid")?,
        fleet: col(row, "fleet_uuid")?,
        lr_version: col(row, "lr_version")?,
        connectivity: json_col(row, "connectivity")?,
        mobile: col::<i64>(row, "mobile")? != 0,
        config: json_col(row, "config")?,
        extra: json_col(row, "extra")?,
        latitude: col(row, "latitude")?,
        longitude: col(row, "longitude")?,
        altitude: col(row, "altitude")?,
        session: col(row, "session_id")?,
        last_seen: col(row, "last_seen")?,
        secret_salt: col(row, "secret_salt")?,
        secret_key: col(row, "secret_key")?,
        tokens_after: col(row, "tokens_after")?,
        created_at: col(row, "created_at")?,
        updated_at: col(row, "updated_at")?,
    })
}

fn agent_row(row: &AnyRow) -> Result<Agent, Error> {
    Ok(Agent {
        name: col(row, "name")?,
        kind: col(row, "kind")?,
        url: col(row, "url")?,
        online: col::<i64>(row, "online")? != 0,
        ragent: col::<i64>(row, "ragent")? != 0,
        last_seen: col(row, "last_seen")?,
    })
}

impl Board {
    /// The host of the WAMP URL the board was given at enrollment (the original's `wstun_ip`:
    /// its wstun connects to port 8080 of that host); IPv6 without brackets.
    pub fn dialed_host(&self) -> Option<String> {
        let url = self.config.pointer("/iotronic/wamp/main-agent/url").and_then(Value::as_str)?;
        let rest = url.split_once("://").map(|(_, r)| r)?;
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        (!host.is_empty()).then(|| host.to_owned())
    }
}

impl Db {
    pub async fn insert_board(&self, b: NewBoard) -> Result<Board, Error> {
        let uuid = new_uuid();
        let now = now_ms();
        let (lat, lon, alt) = b.location.clone().map_or((None, None, None), |(a, b, c)| (Some(a), Some(b), Some(c)));
        sqlx::query(
            "INSERT INTO boards (uuid, name, code, status, type, owner_uuid, project_uuid, fleet_uuid, mobile, extra, \
             latitude, longitude, altitude, created_at, updated_at) \
             VALUES ($1, $2, $3, 'registered', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&uuid)
        .bind(&b.name)
        .bind(&b.code)
        .bind(&b.board_type)
        .bind(&b.owner)
        .bind(&b.project)
        .bind(b.fleet.clone())
        .bind(i64::from(b.mobile))
        .bind(b.extra.to_string())
        .bind(lat)
        .bind(lon)
        .bind(alt)
        .bind(now)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(|e| unique_or(e, || format!("a board named {:?} or with this code already exists", b.name)))?;
        self.board_by_uuid(&uuid).await?.ok_or_else(|| Error::NotFound(format!("board {uuid} vanished")))
    }

    pub async fn board_by_uuid(&self, uuid: &str) -> Result<Option<Board>, Error> {
        let row = sqlx::query(board_query!("WHERE uuid = $1"))
            .bind(uuid)
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        row.as_ref().map(board_row).transpose()
    }

    /// A board by uuid or name, within `project` when given (another project's board is absent).
    pub async fn board(&self, ident: &str, project: Option<&str>) -> Result<Option<Board>, Error> {
        let row = self.row_by_ident(board_query!(""), ident, project).await?;
        row.as_ref().map(board_row).transpose()
    }

    pub async fn board_by_code(&self, code: &str) -> Result<Option<Board>, Error> {
        // A code works until it expires (default: `auth::CODE_TTL_MS` after the board's creation).
        let row = sqlx::query(board_query!(
            "WHERE code = $1 AND COALESCE(code_expires_at, created_at + $2) > $3 AND code IS NOT NULL"
        ))
        .bind(code)
        .bind(crate::auth::CODE_TTL_MS)
        .bind(now_ms())
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        row.as_ref().map(board_row).transpose()
    }

    pub async fn board_by_session(&self, session: &str) -> Result<Option<Board>, Error> {
        let row = sqlx::query(board_query!("WHERE session_id = $1"))
            .bind(session)
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        row.as_ref().map(board_row).transpose()
    }

    /// Boards of `project` (all when `None`), optionally with one status or in one fleet.
    pub async fn list_boards(
        &self,
        project: Option<&str>,
        status: Option<&str>,
        fleet: Option<&str>,
    ) -> Result<Vec<Board>, Error> {
        let rows = sqlx::query(board_query!(
            "WHERE ($1 = '' OR project_uuid = $2) AND ($3 = '' OR status = $4) AND ($5 = '' OR fleet_uuid = $6) \
             ORDER BY created_at, uuid"
        ))
        .bind(project.unwrap_or(""))
        .bind(project.unwrap_or(""))
        .bind(status.unwrap_or(""))
        .bind(status.unwrap_or(""))
        .bind(fleet.unwrap_or(""))
        .bind(fleet.unwrap_or(""))
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        rows.iter().map(board_row).collect()
    }

    /// One page of [`list_boards`](Self::list_boards) (no fleet filter).
    pub async fn list_boards_page(
        &self,
        project: Option<&str>,
        status: Option<&str>,
        page: &Page,
    ) -> Result<Vec<Board>, Error> {
        self.boards_page(project, status, None, page).await
    }

    /// One page of the boards of `fleet` (within `project` when given).
    pub async fn fleet_boards_page(
        &self,
        project: Option<&str>,
        fleet: &str,
        page: &Page,
    ) -> Result<Vec<Board>, Error> {
        self.boards_page(project, None, Some(fleet), page).await
    }

    async fn boards_page(
        &self,
        project: Option<&str>,
        status: Option<&str>,
        fleet: Option<&str>,
        page: &Page,
    ) -> Result<Vec<Board>, Error> {
        let (sql, f) = Self::boards_page_sql(project, status, fleet, page);
        let rows = f.query(sql).fetch_all(self.pool()).await.map_err(db_err)?;
        rows.iter().map(board_row).collect()
    }

    /// The query of `boards_page` and its values.
    pub(crate) fn boards_page_sql(
        project: Option<&str>,
        status: Option<&str>,
        fleet: Option<&str>,
        page: &Page,
    ) -> (String, super::page::Filters) {
        let mut f = super::page::Filters::default();
        f.eq("project_uuid", project);
        f.eq("status", status);
        f.eq("fleet_uuid", fleet);
        let sql = format!("{}{}", board_query!(""), page.clause(&mut f, "boards", "uuid", ""));
        (sql, f)
    }

    /// Writes the fields `u` gives, and only those, in one statement: concurrent updates of
    /// different fields never undo each other.
    pub async fn update_board(&self, uuid: &str, u: BoardUpdate) -> Result<Board, Error> {
        let (lat, lon, alt) = match u.location {
            Some((a, b, c)) => (Some(a), Some(b), Some(c)),
            None => (None, None, None),
        };
        let name = u.name;
        let r = sqlx::query(
            "UPDATE boards SET name = COALESCE($1, name), type = COALESCE($2, type), mobile = COALESCE($3, mobile), \
             fleet_uuid = CASE WHEN $4 = 1 THEN $5 ELSE fleet_uuid END, extra = COALESCE($6, extra), \
             latitude = COALESCE($7, latitude), longitude = COALESCE($8, longitude), \
             altitude = COALESCE($9, altitude), updated_at = $10 WHERE uuid = $11",
        )
        .bind(&name)
        .bind(u.board_type)
        .bind(u.mobile.map(i64::from))
        .bind(i64::from(u.fleet.is_some()))
        .bind(u.fleet.flatten())
        .bind(u.extra.map(|e| e.to_string()))
        .bind(lat)
        .bind(lon)
        .bind(alt)
        .bind(now_ms())
        .bind(uuid)
        .execute(self.pool())
        .await
        .map_err(|e| unique_or(e, || format!("a board named {:?} already exists", name.unwrap_or_default())))?;
        if r.rows_affected() == 0 {
            return Err(Error::NotFound(format!("board {uuid} not found")));
        }
        self.board_by_uuid(uuid).await?.ok_or_else(|| Error::NotFound(format!("board {uuid} not found")))
    }

    pub async fn delete_board(&self, uuid: &str) -> Result<bool, Error> {
        let r =
            sqlx::query("DELETE FROM boards WHERE uuid = $1").bind(uuid).execute(self.pool()).await.map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Enrollment with `code`, the registration code the board presented: a `registered`
    /// board gets its agent, its config and (for authenticated enrollment) its derived key; it
    /// becomes `offline`. `consume_code` clears the code and records its SHA-256 and the time
    /// (`enroll_code_hash`, `enrolled_at`), with which the board may repeat an enrollment whose
    /// reply it lost ([`Db::board_by_enroll_code`]).
    ///
    /// One statement, on condition that `code` is still the board's unexpired code: false, and
    /// nothing written, when it is not (a revoke or rotate-secret since the board was looked
    /// up by it, or another enrollment that consumed it first). Looked up and written apart,
    /// a revocation or a rotated code landing in between was undone, and two enrollments with
    /// one code both got a secret.
    pub async fn enroll_board(
        &self,
        uuid: &str,
        code: &str,
        agent: &str,
        config: &Value,
        secret: Option<(&str, &str)>,
        consume_code: bool,
    ) -> Result<bool, Error> {
        let (salt, key) = secret.map_or((None, None), |(s, k)| (Some(s.to_owned()), Some(k.to_owned())));
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE boards SET status = CASE WHEN status = 'registered' THEN 'offline' ELSE status END, agent = $1, \
             config = $2, secret_salt = COALESCE($3, secret_salt), secret_key = COALESCE($4, secret_key), \
             code = CASE WHEN $5 = 1 THEN NULL ELSE code END, \
             revoked_at = CASE WHEN $5 = 1 THEN NULL ELSE revoked_at END, \
             enroll_code_hash = CASE WHEN $5 = 1 THEN $6 ELSE enroll_code_hash END, \
             enrolled_at = CASE WHEN $5 = 1 THEN $7 ELSE enrolled_at END, \
             updated_at = $7 WHERE uuid = $8 AND code = $9 AND COALESCE(code_expires_at, created_at + $10) > $7",
        )
        .bind(agent)
        .bind(config.to_string())
        .bind(salt)
        .bind(key)
        .bind(i64::from(consume_code))
        .bind(crate::auth::token_hash(code))
        .bind(now)
        .bind(uuid)
        .bind(code)
        .bind(crate::auth::CODE_TTL_MS)
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// The board whose enrollment consumed the code with SHA-256 `code_hash` (hex) after
    /// `since` (Unix ms), if it still holds the credential issued then (revoke and
    /// rotate-secret forget the hash).
    pub async fn board_by_enroll_code(&self, code_hash: &str, since: i64) -> Result<Option<Board>, Error> {
        let row = sqlx::query(board_query!(
            "WHERE enroll_code_hash = $1 AND enrolled_at > $2 AND revoked_at IS NULL \
             AND secret_salt IS NOT NULL AND secret_key IS NOT NULL ORDER BY enrolled_at DESC LIMIT 1"
        ))
        .bind(code_hash)
        .bind(since)
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        row.as_ref().map(board_row).transpose()
    }

    /// Login: the board is online on `agent` with WAMP session `session`. A previous session
    /// of any board with the same id is cleared first (ids are reused only after restarts).
    pub async fn board_online(
        &self,
        uuid: &str,
        agent: &str,
        session: &str,
        lr_version: Option<&str>,
        connectivity: &Value,
    ) -> Result<bool, Error> {
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        sqlx::query("UPDATE boards SET session_id = NULL, status = 'offline' WHERE session_id = $1 AND uuid <> $2")
            .bind(session)
            .bind(uuid)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE boards SET status = 'online', agent = $1, session_id = $2, lr_version = COALESCE($3, lr_version), \
             connectivity = $4, last_seen = $5, updated_at = $6 WHERE uuid = $7 AND revoked_at IS NULL",
        )
        .bind(agent)
        .bind(session)
        .bind(lr_version.map(str::to_owned))
        .bind(connectivity.to_string())
        .bind(now)
        .bind(now)
        .bind(uuid)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// The session left: its board (if any) goes offline. Returns that board.
    pub async fn session_left(&self, session: &str) -> Result<Option<Board>, Error> {
        let Some(board) = self.board_by_session(session).await? else { return Ok(None) };
        sqlx::query("UPDATE boards SET status = 'offline', session_id = NULL, updated_at = $1 WHERE session_id = $2")
            .bind(now_ms())
            .bind(session)
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        Ok(Some(board))
    }

    /// Marks offline every board of `agent` recorded online with a session `is_live` does not
    /// know; returns how many. Each board is asked about after it is read, and updated only if
    /// its session is still the one read: the boards of a restarted cloud log in while it
    /// reconciles, and one that did must keep its new session (a snapshot of the live sessions
    /// taken first, or an unconditional update, marked such a board offline).
    pub async fn reconcile_sessions(&self, agent: &str, is_live: impl Fn(&str) -> bool) -> Result<u64, Error> {
        let boards = sqlx::query("SELECT uuid, session_id FROM boards WHERE agent = $1 AND status = 'online'")
            .bind(agent)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        let mut n = 0;
        for row in &boards {
            let session: Option<String> = col(row, "session_id")?;
            let session = session.unwrap_or_default();
            if is_live(&session) {
                continue;
            }
            let uuid: String = col(row, "uuid")?;
            let done = sqlx::query(
                "UPDATE boards SET status = 'offline', session_id = NULL, updated_at = $1 \
                 WHERE uuid = $2 AND status = 'online' AND COALESCE(session_id, '') = $3",
            )
            .bind(now_ms())
            .bind(&uuid)
            .bind(&session)
            .execute(self.pool())
            .await
            .map_err(db_err)?;
            n += done.rows_affected();
        }
        Ok(n)
    }

    pub async fn touch_board(&self, uuid: &str) -> Result<(), Error> {
        sqlx::query("UPDATE boards SET last_seen = $1 WHERE uuid = $2")
            .bind(now_ms())
            .bind(uuid)
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        Ok(())
    }

    pub async fn count_boards_by_status(&self) -> Result<Vec<(String, i64)>, Error> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM boards GROUP BY status")
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(|r| Ok((col(r, "status")?, col(r, "n")?))).collect()
    }

    /// Registers or refreshes an agent.
    pub async fn upsert_agent(
        &self,
        name: &str,
        kind: &str,
        url: &str,
        online: bool,
        ragent: bool,
    ) -> Result<(), Error> {
        // One statement: a delete and an insert raced (a restart beside a still-running
        // agent of the same name) and the loser failed on the primary key.
        sqlx::query(
            "INSERT INTO agents (name, kind, url, online, ragent, last_seen) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (name, kind) DO UPDATE SET url = excluded.url, online = excluded.online, \
             ragent = excluded.ragent, last_seen = excluded.last_seen",
        )
        .bind(name)
        .bind(kind)
        .bind(url)
        .bind(i64::from(online))
        .bind(i64::from(ragent))
        .bind(now_ms())
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// Stores what agent `name` of `kind` has carried (JSON), stamped now.
    pub async fn set_agent_stats(&self, name: &str, kind: &str, stats: &str) -> Result<(), Error> {
        sqlx::query("UPDATE agents SET stats = $1, stats_at = $2 WHERE name = $3 AND kind = $4")
            .bind(stats)
            .bind(now_ms())
            .bind(name)
            .bind(kind)
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// The last stats of each agent of `kind` that reported: (name, JSON, when in Unix ms).
    pub async fn agent_stats(&self, kind: &str) -> Result<Vec<(String, String, i64)>, Error> {
        let rows = sqlx::query(
            "SELECT name, stats, stats_at FROM agents WHERE kind = $1 AND stats IS NOT NULL AND stats_at IS NOT NULL \
             ORDER BY name",
        )
        .bind(kind)
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        rows.iter().map(|r| Ok((col(r, "name")?, col(r, "stats")?, col(r, "stats_at")?))).collect()
    }

    pub async fn agents(&self, kind: &str) -> Result<Vec<Agent>, Error> {
        let rows =
            sqlx::query("SELECT name, kind, url, online, ragent, last_seen FROM agents WHERE kind = $1 ORDER BY name")
                .bind(kind)
                .fetch_all(self.pool())
                .await
                .map_err(db_err)?;
        rows.iter().map(agent_row).collect()
    }

    /// The online agent of `kind` with the fewest boards: where a newly enrolled board goes.
    pub async fn pick_agent(&self, kind: &str) -> Result<Option<Agent>, Error> {
        let row = sqlx::query(
            "SELECT a.name, a.kind, a.url, a.online, a.ragent, a.last_seen, \
             (SELECT COUNT(*) FROM boards b WHERE b.agent = a.name) AS n \
             FROM agents a WHERE a.kind = $1 AND a.online = 1 ORDER BY n, a.name LIMIT 1",
        )
        .bind(kind)
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        row.as_ref().map(agent_row).transpose()
    }
}
