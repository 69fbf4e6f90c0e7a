//! Leases: exclusive bookings of boards by a project until an expiry.

use std::collections::HashMap;

use sqlx::any::AnyRow;

use super::{Db, Page, col, db_err, is_unique_violation, new_uuid, now_ms};
use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub uuid: String,
    pub project: String,
    pub owner: String,
    pub status: String,
    pub expires_at: i64,
    pub boards: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

fn lease_row(r: &AnyRow) -> Result<Lease, Error> {
    Ok(Lease {
        uuid: col(r, "uuid")?,
        project: col(r, "project_uuid")?,
        owner: col(r, "owner_uuid")?,
        status: col(r, "status")?,
        expires_at: col(r, "expires_at")?,
        boards: Vec::new(),
        created_at: col(r, "created_at")?,
        updated_at: col(r, "updated_at")?,
    })
}

impl Db {
    /// Books `boards` for `project` until `expires_at`. If another active lease holds one of
    /// them, nothing is booked and the error names that lease. The partial unique index on
    /// `lease_boards` decides races between conductors.
    pub async fn create_lease(
        &self,
        project: &str,
        owner: &str,
        boards: &[String],
        expires_at: i64,
    ) -> Result<Lease, Error> {
        let (uuid, now) = (new_uuid(), now_ms());
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        sqlx::query(
            "INSERT INTO leases (uuid, project_uuid, owner_uuid, status, expires_at, created_at, updated_at) \
             VALUES ($1, $2, $3, 'active', $4, $5, $6)",
        )
        .bind(&uuid)
        .bind(project)
        .bind(owner)
        .bind(expires_at)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        for board in boards {
            let r = sqlx::query("INSERT INTO lease_boards (lease_uuid, board_uuid, active) VALUES ($1, $2, 1)")
                .bind(&uuid)
                .bind(board)
                .execute(&mut *tx)
                .await;
            match r {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    drop(tx);
                    return Err(self.lease_conflict(board).await);
                }
                Err(e) => return Err(db_err(e)),
            }
        }
        tx.commit().await.map_err(|e| {
            if is_unique_violation(&e) { Error::Conflict("a board was booked concurrently".into()) } else { db_err(e) }
        })?;
        let mut boards = boards.to_vec();
        boards.sort();
        boards.dedup();
        Ok(Lease {
            uuid,
            project: project.into(),
            owner: owner.into(),
            status: "active".into(),
            expires_at,
            boards,
            created_at: now,
            updated_at: now,
        })
    }

    async fn lease_conflict(&self, board: &str) -> Error {
        match self.active_lease_of_board(board).await {
            Ok(Some(l)) => Error::LeaseConflict { lease: l.uuid, board: board.to_owned(), expires_at: l.expires_at },
            Ok(None) => Error::Conflict(format!("board {board} was booked concurrently")),
            Err(e) => e,
        }
    }

    async fn lease_boards(&self, lease: &mut Lease) -> Result<(), Error> {
        let rows = sqlx::query("SELECT board_uuid FROM lease_boards WHERE lease_uuid = $1 ORDER BY board_uuid")
            .bind(&lease.uuid)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        lease.boards = rows.iter().map(|r| col(r, "board_uuid")).collect::<Result<_, _>>()?;
        Ok(())
    }

    /// The active, unexpired lease holding `board`, if any.
    pub async fn active_lease_of_board(&self, board: &str) -> Result<Option<Lease>, Error> {
        let row = sqlx::query(
            "SELECT l.* FROM leases l JOIN lease_boards lb ON lb.lease_uuid = l.uuid \
             WHERE lb.board_uuid = $1 AND lb.active = 1 AND l.status = 'active' AND l.expires_at > $2",
        )
        .bind(board)
        .bind(now_ms())
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        let Some(row) = row else { return Ok(None) };
        let mut l = lease_row(&row)?;
        self.lease_boards(&mut l).await?;
        Ok(Some(l))
    }

    pub async fn lease(&self, uuid: &str, project: Option<&str>) -> Result<Option<Lease>, Error> {
        let row = sqlx::query("SELECT * FROM leases WHERE uuid = $1 AND ($2 = '' OR project_uuid = $3)")
            .bind(uuid)
            .bind(project.unwrap_or(""))
            .bind(project.unwrap_or(""))
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        let Some(row) = row else { return Ok(None) };
        let mut l = lease_row(&row)?;
        self.lease_boards(&mut l).await?;
        Ok(Some(l))
    }

    pub async fn list_leases(&self, project: Option<&str>, only_active: bool) -> Result<Vec<Lease>, Error> {
        let rows = sqlx::query(
            "SELECT * FROM leases WHERE ($1 = '' OR project_uuid = $2) AND ($3 = 0 OR status = 'active') \
             ORDER BY created_at, uuid",
        )
        .bind(project.unwrap_or(""))
        .bind(project.unwrap_or(""))
        .bind(i64::from(only_active))
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        self.leases_of_rows(&rows).await
    }

    /// Moves an active lease's expiry. Returns false when the lease is no longer active.
    pub async fn extend_lease(&self, uuid: &str, expires_at: i64) -> Result<bool, Error> {
        // Not one past its end that the sweep has not ended yet: extended, it came back to
        // life without its teardown (exposures and memberships made under it kept).
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE leases SET expires_at = $1, updated_at = $2 WHERE uuid = $3 AND status = 'active' AND expires_at > $4",
        )
        .bind(expires_at)
        .bind(now)
        .bind(uuid)
        .bind(now)
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Ends an active lease (`released` or `expired`) and frees its boards. Returns false when
    /// it was not active (someone else ended it first).
    pub async fn end_lease(&self, uuid: &str, status: &str) -> Result<bool, Error> {
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        let r = sqlx::query("UPDATE leases SET status = $1, updated_at = $2 WHERE uuid = $3 AND status = 'active'")
            .bind(status)
            .bind(now_ms())
            .bind(uuid)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query("UPDATE lease_boards SET active = 0 WHERE lease_uuid = $1")
            .bind(uuid)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Active leases whose expiry has passed.
    pub async fn due_leases(&self) -> Result<Vec<Lease>, Error> {
        let rows = sqlx::query("SELECT * FROM leases WHERE status = 'active' AND expires_at <= $1 ORDER BY expires_at")
            .bind(now_ms())
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        self.leases_of_rows(&rows).await
    }

    /// Ended leases that still have exposures or VPN memberships: their teardown failed half
    /// way (a database or bus error after the lease was marked ended).
    pub async fn ended_leases_with_leftovers(&self) -> Result<Vec<Lease>, Error> {
        let rows = sqlx::query(
            "SELECT * FROM leases WHERE status <> 'active' AND \
             (uuid IN (SELECT lease_uuid FROM exposed_services WHERE lease_uuid IS NOT NULL) \
              OR uuid IN (SELECT lease_uuid FROM vpn_members WHERE lease_uuid IS NOT NULL)) \
             ORDER BY updated_at",
        )
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        self.leases_of_rows(&rows).await
    }

    /// One page of the leases of `project` (all: `None`), only the active ones if asked, with
    /// their boards: two queries for the whole page.
    pub async fn list_leases_page(
        &self,
        project: Option<&str>,
        only_active: bool,
        page: &Page,
    ) -> Result<Vec<Lease>, Error> {
        // Only the filters given (`super::page::Filters`: an index can serve them).
        let mut f = super::page::Filters::default();
        f.eq("project_uuid", project);
        if only_active {
            f.and("status = 'active'".into());
        }
        let sql = format!("SELECT * FROM leases{}", page.clause(&mut f, "leases", "uuid", ""));
        let rows = f.query(sql).fetch_all(self.pool()).await.map_err(db_err)?;
        self.leases_of_rows(&rows).await
    }

    /// The leases of `rows` with their boards, loaded in one query per [`BOARDS_BATCH`] leases
    /// (not one per lease).
    async fn leases_of_rows(&self, rows: &[AnyRow]) -> Result<Vec<Lease>, Error> {
        let mut out = rows.iter().map(lease_row).collect::<Result<Vec<_>, _>>()?;
        for chunk in out.chunks_mut(BOARDS_BATCH) {
            let marks = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT lease_uuid, board_uuid FROM lease_boards WHERE lease_uuid IN ({marks}) \
                 ORDER BY lease_uuid, board_uuid"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for l in chunk.iter() {
                q = q.bind(l.uuid.clone());
            }
            let found = q.fetch_all(self.pool()).await.map_err(db_err)?;
            let mut by_lease: HashMap<String, Vec<String>> = HashMap::new();
            for r in &found {
                by_lease.entry(col(r, "lease_uuid")?).or_default().push(col(r, "board_uuid")?);
            }
            for l in chunk.iter_mut() {
                l.boards = by_lease.remove(&l.uuid).unwrap_or_default();
            }
        }
        Ok(out)
    }
}

/// Leases whose boards one query loads: one page ([`super::MAX_LIMIT`]), well within the bound
/// parameters both back-ends take (SQLite 32,766, PostgreSQL 65,535).
const BOARDS_BATCH: usize = 1000;
