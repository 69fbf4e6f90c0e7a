//! Projects, users, memberships and bearer tokens.

use std::collections::HashMap;

use sqlx::any::AnyRow;

use super::{Db, col, db_err, new_uuid, now_ms, unique_or};
use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub uuid: String,
    pub name: String,
    pub created_at: i64,
}

/// A user. `password_hash` is an argon2 PHC string; `Debug` leaves it out.
#[derive(Clone)]
pub struct User {
    pub uuid: String,
    pub name: String,
    pub password_hash: String,
    pub is_admin: bool,
    pub created_at: i64,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("uuid", &self.uuid)
            .field("name", &self.name)
            .field("is_admin", &self.is_admin)
            .finish()
    }
}

/// A role within a project, as the original's `admin_iot_project`, `manager_iot_project`, `user_iot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    User,
    Manager,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Manager => "manager",
            Role::User => "user",
        }
    }

    /// Accepts our names and the original's.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" | "admin_iot_project" => Some(Role::Admin),
            "manager" | "manager_iot_project" => Some(Role::Manager),
            "user" | "user_iot" | "member" => Some(Role::User),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub user_uuid: String,
    pub user_name: String,
    pub project_uuid: String,
    pub role: Role,
}

/// What a valid token stands for.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub user_uuid: String,
    pub user_name: String,
    pub is_admin: bool,
    pub project_uuid: String,
    pub project_name: String,
    pub role: Role,
    pub expires_at: i64,
}

fn project_row(row: &AnyRow) -> Result<Project, Error> {
    Ok(Project { uuid: col(row, "uuid")?, name: col(row, "name")?, created_at: col(row, "created_at")? })
}

fn user_row(row: &AnyRow) -> Result<User, Error> {
    Ok(User {
        uuid: col(row, "uuid")?,
        name: col(row, "name")?,
        password_hash: col(row, "password_hash")?,
        is_admin: col::<i64>(row, "is_admin")? != 0,
        created_at: col(row, "created_at")?,
    })
}

impl Db {
    pub async fn create_project(&self, name: &str) -> Result<Project, Error> {
        let p = Project { uuid: new_uuid(), name: name.to_owned(), created_at: now_ms() };
        sqlx::query("INSERT INTO projects (uuid, name, created_at) VALUES ($1, $2, $3)")
            .bind(&p.uuid)
            .bind(&p.name)
            .bind(p.created_at)
            .execute(self.pool())
            .await
            .map_err(|e| unique_or(e, || format!("a project named {name:?} already exists")))?;
        Ok(p)
    }

    /// A project by uuid or name.
    pub async fn project(&self, ident: &str) -> Result<Option<Project>, Error> {
        let row = sqlx::query(
            "SELECT uuid, name, created_at FROM projects WHERE uuid = $1 OR name = $2 ORDER BY uuid <> $1 LIMIT 1",
        )
        .bind(ident)
        .bind(ident)
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        row.as_ref().map(project_row).transpose()
    }

    pub async fn list_projects(&self) -> Result<Vec<Project>, Error> {
        let rows = sqlx::query("SELECT uuid, name, created_at FROM projects ORDER BY name")
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?;
        rows.iter().map(project_row).collect()
    }

    pub async fn create_user(&self, name: &str, password_hash: &str, is_admin: bool) -> Result<User, Error> {
        let u = User {
            uuid: new_uuid(),
            name: name.to_owned(),
            password_hash: password_hash.to_owned(),
            is_admin,
            created_at: now_ms(),
        };
        sqlx::query("INSERT INTO users (uuid, name, password_hash, is_admin, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&u.uuid)
            .bind(&u.name)
            .bind(&u.password_hash)
            .bind(i64::from(is_admin))
            .bind(u.created_at)
            .execute(self.pool())
            .await
            .map_err(|e| unique_or(e, || format!("a user named {name:?} already exists")))?;
        Ok(u)
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>, Error> {
        let row = sqlx::query("SELECT uuid, name, password_hash, is_admin, created_at FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        row.as_ref().map(user_row).transpose()
    }

    pub async fn count_users(&self) -> Result<i64, Error> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM users").fetch_one(self.pool()).await.map_err(db_err)?;
        col(&row, "n")
    }

    /// Adds (or changes) a user's role in a project, in one statement (a delete and an insert
    /// raced, and the loser failed on the primary key).
    pub async fn set_membership(&self, user_uuid: &str, project_uuid: &str, role: Role) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO memberships (user_uuid, project_uuid, role) VALUES ($1, $2, $3) \
             ON CONFLICT (user_uuid, project_uuid) DO UPDATE SET role = excluded.role",
        )
        .bind(user_uuid)
        .bind(project_uuid)
        .bind(role.as_str())
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// The projects a user belongs to, with the role in each (first by name).
    pub async fn memberships(&self, user_uuid: &str) -> Result<Vec<(Project, Role)>, Error> {
        let rows = sqlx::query(
            "SELECT p.uuid, p.name, p.created_at, m.role FROM memberships m \
             JOIN projects p ON p.uuid = m.project_uuid WHERE m.user_uuid = $1 ORDER BY p.name",
        )
        .bind(user_uuid)
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let role: String = col(r, "role")?;
                Ok((project_row(r)?, Role::parse(&role).unwrap_or(Role::User)))
            })
            .collect()
    }

    pub async fn list_users(&self, project_uuid: Option<&str>) -> Result<Vec<Membership>, Error> {
        let rows = sqlx::query(
            "SELECT u.uuid AS user_uuid, u.name AS user_name, m.project_uuid, m.role FROM memberships m \
             JOIN users u ON u.uuid = m.user_uuid WHERE ($1 = '' OR m.project_uuid = $2) ORDER BY u.name",
        )
        .bind(project_uuid.unwrap_or(""))
        .bind(project_uuid.unwrap_or(""))
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let role: String = col(r, "role")?;
                Ok(Membership {
                    user_uuid: col(r, "user_uuid")?,
                    user_name: col(r, "user_name")?,
                    project_uuid: col(r, "project_uuid")?,
                    role: Role::parse(&role).unwrap_or(Role::User),
                })
            })
            .collect()
    }

    /// Stores a token by its hash.
    pub async fn insert_token(&self, hash: &str, user: &str, project: &str, expires_at: i64) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO tokens (hash, user_uuid, project_uuid, expires_at, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(hash)
        .bind(user)
        .bind(project)
        .bind(expires_at)
        .bind(now_ms())
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// The unexpired token with this hash and what it stands for.
    pub async fn token(&self, hash: &str) -> Result<Option<TokenInfo>, Error> {
        let row = sqlx::query(
            "SELECT t.user_uuid, u.name AS user_name, u.is_admin, t.project_uuid, p.name AS project_name, \
             m.role, t.expires_at FROM tokens t JOIN users u ON u.uuid = t.user_uuid \
             JOIN projects p ON p.uuid = t.project_uuid \
             JOIN memberships m ON m.user_uuid = t.user_uuid AND m.project_uuid = t.project_uuid \
             WHERE t.hash = $1 AND t.expires_at > $2",
        )
        .bind(hash)
        .bind(now_ms())
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        let Some(r) = row else { return Ok(None) };
        let role: String = col(&r, "role")?;
        Ok(Some(TokenInfo {
            user_uuid: col(&r, "user_uuid")?,
            user_name: col(&r, "user_name")?,
            is_admin: col::<i64>(&r, "is_admin")? != 0,
            project_uuid: col(&r, "project_uuid")?,
            project_name: col(&r, "project_name")?,
            role: Role::parse(&role).unwrap_or(Role::User),
            expires_at: col(&r, "expires_at")?,
        }))
    }

    pub async fn purge_expired_tokens(&self) -> Result<u64, Error> {
        let r = sqlx::query("DELETE FROM tokens WHERE expires_at <= $1")
            .bind(now_ms())
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected())
    }
}

/// What `rotate-secret` hands out: the board's fresh one-time code.
#[derive(Clone)]
pub struct BoardCredentials {
    pub code: String,
    pub code_expires_at: i64,
}

impl std::fmt::Debug for BoardCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoardCredentials")
            .field("code", &"***")
            .field("code_expires_at", &self.code_expires_at)
            .finish()
    }
}

/// Token revocation and board credentials (security issue).
impl Db {
    /// Revokes one token (by hash). True if it existed.
    pub async fn delete_token(&self, hash: &str) -> Result<bool, Error> {
        let r =
            sqlx::query("DELETE FROM tokens WHERE hash = $1").bind(hash).execute(self.pool()).await.map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Revokes every token of a user; returns how many.
    pub async fn delete_user_tokens(&self, user_uuid: &str) -> Result<u64, Error> {
        let r = sqlx::query("DELETE FROM tokens WHERE user_uuid = $1")
            .bind(user_uuid)
            .execute(self.pool())
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected())
    }

    /// A user by uuid or name.
    pub async fn user(&self, ident: &str) -> Result<Option<User>, Error> {
        let row = sqlx::query(
            "SELECT uuid, name, password_hash, is_admin, created_at FROM users WHERE uuid = $1 OR name = $2 \
             ORDER BY uuid <> $1 LIMIT 1",
        )
        .bind(ident)
        .bind(ident)
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)?;
        row.as_ref().map(user_row).transpose()
    }

    /// Revokes a board: its secret, code and tunnel tokens stop working at once, and the agents
    /// close its sessions and tunnels at their next sweep. Idempotent.
    pub async fn revoke_board(&self, uuid: &str) -> Result<bool, Error> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE boards SET revoked_at = COALESCE(revoked_at, $1), tokens_after = $1, secret_salt = NULL, \
             secret_key = NULL, code = NULL, code_expires_at = NULL, enroll_code_hash = NULL, updated_at = $2 \
             WHERE uuid = $3",
        )
        .bind(now)
        .bind(now)
        .bind(uuid)
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Rotates a board's credentials: the old secret and tunnel tokens stop working (the board
    /// is disconnected like a revoked one) and a fresh one-time code, valid until
    /// `expires_at`, lets the board enroll again and receive a new secret.
    pub async fn rotate_board(&self, uuid: &str, code: &str, expires_at: i64) -> Result<bool, Error> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE boards SET revoked_at = COALESCE(revoked_at, $1), tokens_after = $1, secret_salt = NULL, \
             secret_key = NULL, code = $2, code_expires_at = $3, enroll_code_hash = NULL, updated_at = $4 \
             WHERE uuid = $5",
        )
        .bind(now)
        .bind(code)
        .bind(expires_at)
        .bind(now)
        .bind(uuid)
        .execute(self.pool())
        .await
        .map_err(|e| super::unique_or(e, || "that code is in use: try again".to_owned()))?;
        Ok(r.rows_affected() > 0)
    }

    /// Since when the board's tunnel tokens count (Unix ms): its last revocation or rotation
    /// (None: never, or no such board).
    pub async fn board_tokens_after(&self, uuid: &str) -> Result<Option<i64>, Error> {
        self.board_time(uuid, "tokens_after").await
    }

    /// When the board was revoked (None: not revoked, or no such board).
    pub async fn board_revoked_at(&self, uuid: &str) -> Result<Option<i64>, Error> {
        self.board_time(uuid, "revoked_at").await
    }

    /// A nullable time column of a board (None: NULL, or no such board). `column` is always
    /// one of the names above, never input.
    async fn board_time(&self, uuid: &str, column: &'static str) -> Result<Option<i64>, Error> {
        let sql = format!("SELECT {column} FROM boards WHERE uuid = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(uuid).fetch_optional(self.pool()).await.map_err(db_err)?;
        match row {
            Some(r) => col::<Option<i64>>(&r, column),
            None => Ok(None),
        }
    }

    /// For `boards` (uuids with a live session or channel), which of their connections may
    /// stay ([`Cutoff`]); a board missing from the answer was deleted (all go).
    pub async fn connection_cutoffs(&self, boards: &[String]) -> Result<HashMap<String, Cutoff>, Error> {
        let mut out = HashMap::new();
        for chunk in boards.chunks(200) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!("SELECT uuid, revoked_at, tokens_after FROM boards WHERE uuid IN ({})", marks.join(", "));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for b in chunk {
                q = q.bind(b);
            }
            for r in q.fetch_all(self.pool()).await.map_err(db_err)? {
                let cutoff = match col::<Option<i64>>(&r, "revoked_at")? {
                    Some(_) => Cutoff::Revoked,
                    None => Cutoff::Since(col::<Option<i64>>(&r, "tokens_after")?.unwrap_or(0)),
                };
                out.insert(col::<String>(&r, "uuid")?, cutoff);
            }
        }
        Ok(out)
    }
}

/// Which connections of a board may stay up ([`Db::connection_cutoffs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cutoff {
    /// Revoked: none.
    Revoked,
    /// Those made after this time (ms; the board's last revoke or rotate-secret): one made
    /// before holds a credential that was withdrawn since, even when the board has enrolled
    /// again in the meantime.
    Since(i64),
}
