//! Passwords (argon2), bearer tokens (random, stored as SHA-256) and the admin bootstrap.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::Error;
use crate::db::{Db, Role, now_ms};

/// How long a token is valid.
pub const TOKEN_TTL_MS: i64 = 12 * 3600 * 1000;

/// The argon2 PHC string of `password`.
pub fn hash_password(password: &str) -> Result<String, Error> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| Error::Invalid(format!("cannot hash the password: {e}")))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A fresh random secret: 32 bytes, URL-safe base64.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What the database stores for a token: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token just issued. `Debug` hides the token itself.
pub struct IssuedToken {
    pub token: String,
    pub expires_at: i64,
    pub project: String,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken").field("expires_at", &self.expires_at).field("project", &self.project).finish()
    }
}

/// Checks a user's password and issues a token scoped to `project` (or the user's first
/// project). Every failure is the same 401, so names cannot be probed.
pub async fn issue_token(db: &Db, username: &str, password: &str, project: Option<&str>) -> Result<IssuedToken, Error> {
    let denied = || Error::Unauthorized("wrong user name or password".into());
    let user = db.user_by_name(username).await?.ok_or_else(denied)?;
    let hash = user.password_hash.clone();
    let ok = tokio::task::spawn_blocking({
        let password = password.to_owned();
        move || verify_password(&password, &hash)
    })
    .await
    .unwrap_or(false);
    if !ok {
        return Err(denied());
    }
    let memberships = db.memberships(&user.uuid).await?;
    let chosen = match project {
        Some(p) => memberships.iter().find(|(proj, _)| proj.name == p || proj.uuid == p),
        None => memberships.first(),
    };
    let Some((proj, _)) = chosen else {
        return Err(Error::Unauthorized(match project {
            Some(p) => format!("user {username} is not a member of project {p}"),
            None => format!("user {username} belongs to no project"),
        }));
    };
    let token = random_secret();
    let expires_at = now_ms() + TOKEN_TTL_MS;
    db.insert_token(&token_hash(&token), &user.uuid, &proj.uuid, expires_at).await?;
    Ok(IssuedToken { token, expires_at, project: proj.name.clone() })
}

/// On first start (no users yet) creates project `admin` and user `admin` with `password`, or
/// with a generated one. Returns the generated password so the caller prints it once.
pub async fn bootstrap_admin(db: &Db, password: Option<&str>) -> Result<Option<String>, Error> {
    if db.count_users().await? > 0 {
        return Ok(None);
    }
    let (password, generated) = match password {
        Some(p) if !p.is_empty() => (p.to_owned(), false),
        _ => (random_secret(), true),
    };
    // Several processes may start at once on one database: whoever loses a race reads back.
    let project = match db.project("admin").await? {
        Some(p) => p,
        None => match db.create_project("admin").await {
            Ok(p) => p,
            Err(Error::Conflict(_)) => {
                db.project("admin").await?.ok_or_else(|| Error::NotFound("project admin vanished".into()))?
            }
            Err(e) => return Err(e),
        },
    };
    let hash = tokio::task::spawn_blocking(move || hash_password(&password).map(|h| (h, password)))
        .await
        .map_err(|e| Error::Invalid(format!("password hashing task failed: {e}")))??;
    let user = match db.create_user("admin", &hash.0, true).await {
        Ok(u) => u,
        // Another process bootstrapped at the same time: theirs wins.
        Err(Error::Conflict(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    db.set_membership(&user.uuid, &project.uuid, Role::Admin).await?;
    Ok(generated.then_some(hash.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_and_tokens_hash() {
        let h = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a phc string"));
        assert_eq!(token_hash("abc").len(), 64);
        assert_ne!(random_secret(), random_secret());
    }
}
