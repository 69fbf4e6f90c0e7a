//! Plugins (user code for boards) and their injections onto boards.

use serde_json::Value;
use sqlx::any::AnyRow;

use super::{Db, Page, col, db_err, json_col, new_uuid, now_ms, unique_or};
use crate::Error;

/// The 409 of a plugin name its project has already (the unique index on `(project_uuid,
/// name)` decides between concurrent creates and renames).
fn name_taken(name: &str) -> String {
    format!("the project has a plugin called {name} already")
}

/// A plugin: its code and what calling it needs. `code` is what boards receive: base64 of a
/// WebAssembly module or an executable, or (kind `python`) the pickle-0 text of Python source.
#[derive(Debug, Clone)]
pub struct Plugin {
    pub uuid: String,
    pub name: String,
    pub owner: String,
    pub project: String,
    pub public: bool,
    pub code: String,
    pub callable: bool,
    pub parameters: Value,
    pub extra: Value,
    /// `wasm`, `process` or `python`.
    pub kind: String,
    /// The hardware it asks for: `{"gpio":[names],"i2c":[{"bus","address"}]}`.
    pub grants: Value,
    /// SHA-256 (hex) of the decoded code: module bytes, executable bytes or Python source.
    pub code_sha256: String,
    pub code_size: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The fields of a plugin a PATCH changes (`None`: left as it is).
#[derive(Debug, Default)]
pub struct PluginUpdate {
    pub name: Option<String>,
    pub public: Option<bool>,
    pub callable: Option<bool>,
    pub parameters: Option<Value>,
    pub extra: Option<Value>,
    pub grants: Option<Value>,
    pub code: Option<PluginCode>,
}

/// New code for a plugin, as stored, with what describes it.
#[derive(Debug)]
pub struct PluginCode {
    pub kind: String,
    pub code: String,
    pub sha256: String,
    pub size: i64,
}

/// A plugin held by a board.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    pub board: String,
    pub plugin: String,
    pub onboot: bool,
    /// `injected`, `updated`, `pending`, `operative`, `stopped`, `failed`.
    pub status: String,
    pub grants: Value,
    pub code_sha256: String,
    /// The PluginInject request while `pending`.
    pub request: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

fn plugin_row(r: &AnyRow) -> Result<Plugin, Error> {
    Ok(Plugin {
        uuid: col(r, "uuid")?,
        name: col(r, "name")?,
        owner: col(r, "owner_uuid")?,
        project: col(r, "project_uuid")?,
        public: col::<i64>(r, "public")? != 0,
        code: col(r, "code")?,
        callable: col::<i64>(r, "callable")? != 0,
        parameters: json_col(r, "parameters")?,
        extra: json_col(r, "extra")?,
        kind: col(r, "kind")?,
        grants: json_col(r, "grants")?,
        code_sha256: col(r, "code_sha256")?,
        code_size: col(r, "code_size")?,
        created_at: col(r, "created_at")?,
        updated_at: col(r, "updated_at")?,
    })
}

fn injection_row(r: &AnyRow) -> Result<Injection, Error> {
    Ok(Injection {
        board: col(r, "board_uuid")?,
        plugin: col(r, "plugin_uuid")?,
        onboot: col::<i64>(r, "onboot")? != 0,
        status: col(r, "status")?,
        grants: json_col(r, "grants")?,
        code_sha256: col(r, "code_sha256")?,
        request: col(r, "request_uuid")?,
        created_at: col(r, "created_at")?,
        updated_at: col(r, "updated_at")?,
    })
}

impl Db {
    pub async fn create_plugin(&self, p: &Plugin) -> Result<Plugin, Error> {
        let (uuid, now) = (new_uuid(), now_ms());
        sqlx::query(
            "INSERT INTO plugins (uuid, name, owner_uuid, project_uuid, public, code, callable, parameters, extra, \
             kind, grants, code_sha256, code_size, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&uuid)
        .bind(&p.name)
        .bind(&p.owner)
        .bind(&p.project)
        .bind(i64::from(p.public))
        .bind(&p.code)
        .bind(i64::from(p.callable))
        .bind(p.parameters.to_string())
        .bind(p.extra.to_string())
        .bind(&p.kind)
        .bind(p.grants.to_string())
        .bind(&p.code_sha256)
        .bind(p.code_size)
        .bind(now)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(|e| unique_or(e, || name_taken(&p.name)))?;
        Ok(Plugin { uuid, created_at: now, updated_at: now, ..p.clone() })
    }

    /// A plugin by uuid or name, visible to `project` (its own or public) when given. A uuid
    /// match comes first, then the caller's own plugin of that name (names are unique per
    /// project); a name that several other projects' plugins visible to the caller have
    /// (public ones, or any for an administrator's unscoped lookup) is [`Error::Conflict`],
    /// as for every other object ([`Db::row_by_ident`]): the oldest of them was taken, so a
    /// project could rename its plugin to reach an administrator's injection by name.
    pub async fn plugin(&self, ident: &str, project: Option<&str>) -> Result<Option<Plugin>, Error> {
        let rows = sqlx::query(
            "SELECT * FROM plugins WHERE (uuid = $1 OR name = $2) AND ($3 = '' OR project_uuid = $4 OR public = 1) \
             ORDER BY CASE WHEN uuid = $5 THEN 0 WHEN project_uuid = $6 THEN 1 ELSE 2 END, uuid LIMIT 2",
        )
        .bind(ident)
        .bind(ident)
        .bind(project.unwrap_or(""))
        .bind(project.unwrap_or(""))
        .bind(ident)
        .bind(project.unwrap_or(""))
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        let mut found = rows.iter().map(plugin_row).collect::<Result<Vec<_>, _>>()?;
        if let [first, _] = found.as_slice()
            && first.uuid != ident
            && project.is_none_or(|p| first.project != p)
        {
            return Err(Error::Conflict(format!("several projects have a plugin named {ident}: use its uuid")));
        }
        Ok((!found.is_empty()).then(|| found.swap_remove(0)))
    }

    /// Whether `project` already has a plugin called `name` (other than `except`).
    pub async fn plugin_name_taken(&self, project: &str, name: &str, except: &str) -> Result<bool, Error> {
        let row = sqlx::query("SELECT uuid FROM plugins WHERE project_uuid = $1 AND name = $2 AND uuid <> $3 LIMIT 1")
            .bind(project)
            .bind(name)
            .bind(except)
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        Ok(row.is_some())
    }

    /// The plugins of `project` (and the public ones, with `with_public`), without their code
    /// (`code` is empty): a list of many plugins must not read every one's code (up to
    /// 512 KiB each) to show none of it.
    pub async fn list_plugins(&self, project: Option<&str>, with_public: bool) -> Result<Vec<Plugin>, Error> {
        let rows = sqlx::query(
            "SELECT uuid, name, owner_uuid, project_uuid, public, '' AS code, callable, parameters, extra, kind, \
             grants, code_sha256, code_size, created_at, updated_at FROM plugins \
             WHERE ($1 = '' OR project_uuid = $2 OR ($3 = 1 AND public = 1)) ORDER BY created_at, uuid",
        )
        .bind(project.unwrap_or(""))
        .bind(project.unwrap_or(""))
        .bind(i64::from(with_public))
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        rows.iter().map(plugin_row).collect()
    }

    /// One page of [`list_plugins`](Self::list_plugins); `only_public`: of those, the public
    /// ones only (filtered here, so that a page is never cut short after the database filled it).
    pub async fn list_plugins_page(
        &self,
        project: Option<&str>,
        with_public: bool,
        only_public: bool,
        page: &Page,
    ) -> Result<Vec<Plugin>, Error> {
        // Only the filters given (`super::page::Filters`: an index can serve them).
        let mut f = super::page::Filters::default();
        if let Some(p) = project.filter(|p| !p.is_empty()) {
            let p = f.arg(p);
            f.and(if with_public {
                format!("(project_uuid = {p} OR public = 1)")
            } else {
                format!("project_uuid = {p}")
            });
        }
        if only_public {
            f.and("public = 1".into());
        }
        let sql = format!(
            "SELECT uuid, name, owner_uuid, project_uuid, public, '' AS code, callable, parameters, extra, kind, \
             grants, code_sha256, code_size, created_at, updated_at FROM plugins{}",
            page.clause(&mut f, "plugins", "uuid", "")
        );
        let rows = f.query(sql).fetch_all(self.pool()).await.map_err(db_err)?;
        rows.iter().map(plugin_row).collect()
    }

    /// Writes the fields given, and only those, in one statement (concurrent PATCHes of
    /// different fields both land; code, kind and their digest change together).
    pub async fn update_plugin(&self, uuid: &str, u: PluginUpdate) -> Result<(), Error> {
        let (kind, code, sha, size) = match u.code {
            Some(c) => (Some(c.kind), Some(c.code), Some(c.sha256), Some(c.size)),
            None => (None, None, None, None),
        };
        let name = u.name.clone();
        sqlx::query(
            "UPDATE plugins SET name = COALESCE($1, name), public = COALESCE($2, public), code = COALESCE($3, code), \
             callable = COALESCE($4, callable), parameters = COALESCE($5, parameters), extra = COALESCE($6, extra), \
             kind = COALESCE($7, kind), grants = COALESCE($8, grants), code_sha256 = COALESCE($9, code_sha256), \
             code_size = COALESCE($10, code_size), updated_at = $11 WHERE uuid = $12",
        )
        .bind(u.name)
        .bind(u.public.map(i64::from))
        .bind(code)
        .bind(u.callable.map(i64::from))
        .bind(u.parameters.map(|v| v.to_string()))
        .bind(u.extra.map(|v| v.to_string()))
        .bind(kind)
        .bind(u.grants.map(|v| v.to_string()))
        .bind(sha)
        .bind(size)
        .bind(now_ms())
        .bind(uuid)
        .execute(self.pool())
        .await
        .map_err(|e| unique_or(e, || name_taken(name.as_deref().unwrap_or_default())))?;
        Ok(())
    }

    /// Deletes a plugin that no board holds; false if it was not deleted (absent, or injected:
    /// [`Db::plugin`] tells which). The check and the delete are one statement, so an injection
    /// recorded meanwhile is never cascaded away with the plugin. PostgreSQL: the plugin's row
    /// is locked first, which waits for an injection being inserted (its foreign-key check
    /// holds a share lock on that row) so that the statement then sees it; an injection
    /// inserted after waits for the delete and fails on its foreign key.
    pub async fn delete_plugin(&self, uuid: &str) -> Result<bool, Error> {
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        if self.backend() == super::Backend::Postgres {
            sqlx::query("SELECT uuid FROM plugins WHERE uuid = $1 FOR UPDATE")
                .bind(uuid)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        let r = sqlx::query(
            "DELETE FROM plugins WHERE uuid = $1 \
             AND NOT EXISTS (SELECT 1 FROM plugin_injections WHERE plugin_uuid = $2)",
        )
        .bind(uuid)
        .bind(uuid)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Holds `i.board`'s place for `i.plugin` while the board is asked to take it, unless it
    /// has one (status `pending`, no request): a plugin a board is taking for the first time
    /// is not deleted meanwhile ([`Db::delete_plugin`] finds the row), so the board never
    /// keeps code the cloud no longer knows. True if this call made the reservation (its
    /// caller then records the answer, or [`Db::release_injection`] drops it); a plugin
    /// deleted since it was read is `NotFound`.
    pub async fn reserve_injection(&self, i: &Injection) -> Result<bool, Error> {
        let now = now_ms();
        let r = sqlx::query(
            "INSERT INTO plugin_injections (board_uuid, plugin_uuid, onboot, status, grants, code_sha256, \
             request_uuid, created_at, updated_at) VALUES ($1, $2, $3, 'pending', $4, $5, NULL, $6, $7) \
             ON CONFLICT (board_uuid, plugin_uuid) DO NOTHING",
        )
        .bind(&i.board)
        .bind(&i.plugin)
        .bind(i64::from(i.onboot))
        .bind(i.grants.to_string())
        .bind(&i.code_sha256)
        .bind(now)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(|e| {
            if super::is_foreign_key_violation(&e) {
                Error::NotFound(format!("plugin {} (deleted meanwhile)", i.plugin))
            } else {
                db_err(e)
            }
        })?;
        Ok(r.rows_affected() > 0)
    }

    /// Drops a reservation of [`Db::reserve_injection`] that no answer replaced (the board
    /// did not take the plugin): only the reservation, never a row an answer wrote.
    pub async fn release_injection(&self, board: &str, plugin: &str) -> Result<bool, Error> {
        let r = sqlx::query(
            "DELETE FROM plugin_injections WHERE board_uuid = $1 AND plugin_uuid = $2 \
             AND status = 'pending' AND request_uuid IS NULL",
        )
        .bind(board)
        .bind(plugin)
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Records that `i.board` holds `i.plugin` (inserted, or replaced on re-injection).
    pub async fn upsert_injection(&self, i: &Injection) -> Result<(), Error> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO plugin_injections (board_uuid, plugin_uuid, onboot, status, grants, code_sha256, \
             request_uuid, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (board_uuid, plugin_uuid) DO UPDATE SET onboot = excluded.onboot, status = excluded.status, \
             grants = excluded.grants, code_sha256 = excluded.code_sha256, request_uuid = excluded.request_uuid, \
             updated_at = excluded.updated_at",
        )
        .bind(&i.board)
        .bind(&i.plugin)
        .bind(i64::from(i.onboot))
        .bind(&i.status)
        .bind(i.grants.to_string())
        .bind(&i.code_sha256)
        .bind(i.request.as_deref())
        .bind(now)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(())
    }

    pub async fn injection(&self, board: &str, plugin: &str) -> Result<Option<Injection>, Error> {
        let row = sqlx::query("SELECT * FROM plugin_injections WHERE board_uuid = $1 AND plugin_uuid = $2")
            .bind(board)
            .bind(plugin)
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        row.as_ref().map(injection_row).transpose()
    }

    pub async fn injections_of_board(&self, board: &str) -> Result<Vec<Injection>, Error> {
        let rows =
            sqlx::query("SELECT * FROM plugin_injections WHERE board_uuid = $1 ORDER BY created_at, plugin_uuid")
                .bind(board)
                .fetch_all(self.pool())
                .await
                .map_err(db_err)?;
        rows.iter().map(injection_row).collect()
    }

    /// The boards holding `plugin`.
    pub async fn boards_with_plugin(&self, plugin: &str) -> Result<Vec<String>, Error> {
        let rows = sqlx::query("SELECT board_uuid FROM plugin_injections WHERE plugin_uuid = $1 ORDER BY board_uuid")
            .bind(plugin)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(|r| col(r, "board_uuid")).collect()
    }

    /// Sets the status an action on the board found (`operative`, `stopped`) unless the
    /// injection is `pending`: a re-injection under way decides its status (its request's
    /// outcome, [`Db::settle_injection`]). False if absent or pending.
    pub async fn set_injection_status(&self, board: &str, plugin: &str, status: &str) -> Result<bool, Error> {
        self.write_injection_status(board, plugin, status, None).await
    }

    /// Records how the PluginInject request `request` ended (`status`), and clears it, if the
    /// injection is still pending on that request: false if it is not (settled already, removed,
    /// or injected again meanwhile, whose own request decides).
    pub async fn settle_injection(
        &self,
        board: &str,
        plugin: &str,
        request: &str,
        status: &str,
    ) -> Result<bool, Error> {
        self.write_injection_status(board, plugin, status, Some(request)).await
    }

    /// The compare-and-set of both: the row pending on `pending_on`, or (`None`) not pending.
    async fn write_injection_status(
        &self,
        board: &str,
        plugin: &str,
        status: &str,
        pending_on: Option<&str>,
    ) -> Result<bool, Error> {
        let only =
            if pending_on.is_some() { "status = 'pending' AND request_uuid = $5" } else { "status <> 'pending'" };
        let sql = format!(
            "UPDATE plugin_injections SET status = $1, request_uuid = NULL, updated_at = $2 \
             WHERE board_uuid = $3 AND plugin_uuid = $4 AND {only}"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(status).bind(now_ms()).bind(board).bind(plugin);
        if let Some(request) = pending_on {
            q = q.bind(request);
        }
        let r = q.execute(self.pool()).await.map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn delete_injection(&self, board: &str, plugin: &str) -> Result<bool, Error> {
        let r = sqlx::query("DELETE FROM plugin_injections WHERE board_uuid = $1 AND plugin_uuid = $2")
            .bind(board)
            .bind(plugin)
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }
}
