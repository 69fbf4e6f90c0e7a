//! Tokens, projects and users; the [`Caller`] every authenticated handler acts for.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, ApiResult, Body};
use crate::Error;
use crate::auth::{hash_password, issue_token_for, token_hash};
use crate::db::{Project, Role};

/// Who is calling: the user and the project the token is scoped to.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub user_name: String,
    pub project: String,
    pub project_name: String,
    pub role: Role,
    /// Cloud administrator: may see and act on every project.
    pub is_admin: bool,
}

impl Caller {
    /// The project filter for lists and lookups: the caller's project, or none for an admin.
    pub fn scope(&self) -> Option<&str> {
        if self.is_admin { None } else { Some(&self.project) }
    }

    /// Fails with 403 unless the caller has `min` in its project (admins always pass).
    pub fn require(&self, min: Role, what: &str) -> Result<(), Error> {
        if self.is_admin || self.role >= min {
            Ok(())
        } else {
            Err(Error::Forbidden(format!("{what} needs the {} role in project {}", min.as_str(), self.project_name)))
        }
    }

    pub fn require_admin(&self, what: &str) -> Result<(), Error> {
        if self.is_admin { Ok(()) } else { Err(Error::Forbidden(format!("{what} is for cloud administrators"))) }
    }
}

/// When the token of a request expires (ms since the epoch), beside its [`Caller`].
#[derive(Debug, Clone, Copy)]
pub struct TokenExpiry(pub i64);

/// Resolves `Authorization: Bearer` or `X-Auth-Token` for every non-public path.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if super::is_public(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let Some(token) = presented_token(req.headers()) else {
        return ApiError(Error::Unauthorized(
            "authentication required: POST /v1/auth/tokens, then send Authorization: Bearer <token>".into(),
        ))
        .into_response();
    };
    match state.db.token(&token_hash(&token)).await {
        Ok(Some(info)) => {
            req.extensions_mut().insert(Caller {
                user: info.user_uuid,
                user_name: info.user_name,
                project: info.project_uuid,
                project_name: info.project_name,
                role: info.role,
                is_admin: info.is_admin,
            });
            req.extensions_mut().insert(TokenExpiry(info.expires_at));
            next.run(req).await
        }
        Ok(None) => {
            ApiError(Error::Unauthorized("the token is unknown or expired: get a new one".into())).into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

/// The token of a request: `Authorization: Bearer` or `X-Auth-Token`.
pub fn presented_token(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| headers.get("x-auth-token").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .map(str::to_owned)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    username: String,
    password: String,
    #[serde(default)]
    project: Option<String>,
    /// Lifetime in seconds, for a shorter-lived token than the default 12 hours.
    #[serde(default)]
    ttl: Option<i64>,
}

/// Longest user name (bytes): [`check_name`] refuses longer ones when users are created.
pub const MAX_NAME_BYTES: usize = 255;

/// `POST /v1/auth/tokens`. Throttled per user name (lock-out) and per peer address; every
/// checked attempt, granted or not, goes to the audit log, and attempts refused unchecked
/// (throttled, oversized) as far as `audited_refusals` allows. A user name or password longer than any a
/// user can have is a 400 before the throttles (which then never hold a key for it) and before
/// any hashing: that rule is public (the API document says it), and no account exists behind
/// such a name, so the 400 tells nothing a 401 would hide.
pub async fn create_token(
    State(state): State<AppState>,
    connect: Option<Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    Body(b): Body<TokenBody>,
) -> ApiResult<Response> {
    let ttl_ms = b.ttl.map_or(crate::auth::TOKEN_TTL_MS, |s| s.saturating_mul(1000));
    if ttl_ms <= 0 {
        return Err(Error::Invalid("ttl must be a positive number of seconds".into()).into());
    }
    let peer = connect.as_ref().map(|c| c.0.0.ip().to_string()).unwrap_or_default();
    // What the per-peer budgets count by (an IPv6 peer's /64).
    let source = connect.as_ref().map(|c| s4t_shared::limits::source_of(c.0.0.ip()).to_string()).unwrap_or_default();
    if b.username.len() > MAX_NAME_BYTES || b.password.len() > crate::auth::MAX_PASSWORD_BYTES {
        let entry = crate::db::NewAudit {
            user_name: b.username.chars().take(MAX_NAME_BYTES).collect(),
            action: "auth.login".into(),
            target: "/v1/auth/tokens".into(),
            source: peer,
            status: 400,
            detail: "user name or password too long".into(),
            ..Default::default()
        };
        record_refusal(&state, &source, entry).await;
        return Err(Error::Invalid(format!(
            "a user name has at most {MAX_NAME_BYTES} bytes and a password at most {} bytes",
            crate::auth::MAX_PASSWORD_BYTES
        ))
        .into());
    }
    let (user_key, peer_key) = (format!("user:{}", b.username), format!("peer:{source}"));
    let throttle = &state.login_throttle;
    // Each attempt is taken before the password is checked (concurrent guesses stay within the
    // budget) and given back when it succeeds.
    let waited = throttle
        .per_user
        .take(&user_key)
        .and_then(|()| throttle.per_peer.take(&peer_key).inspect_err(|_| throttle.per_user.refund(&user_key)));
    let mut entry = crate::db::NewAudit {
        user_name: b.username.clone(),
        action: "auth.login".into(),
        target: "/v1/auth/tokens".into(),
        source: peer,
        ..Default::default()
    };
    if let Err(retry_after_s) = waited {
        entry.status = 429;
        record_refusal(&state, &source, entry).await;
        return Err(Error::Throttled { retry_after_s }.into());
    }
    match issue_token_for(&state.db, &b.username, &b.password, b.project.as_deref(), ttl_ms).await {
        Ok(issued) => {
            throttle.per_user.refund(&user_key);
            throttle.per_peer.refund(&peer_key);
            entry.status = 201;
            entry.detail = format!("project {}", issued.project);
            crate::audit::record(&state.db, entry).await;
            let body =
                json!({"token": issued.token, "expires_at": issued.expires_at / 1000, "project": issued.project});
            Ok((StatusCode::CREATED, Json(body)).into_response())
        }
        Err(e) => {
            if !matches!(e, Error::Unauthorized(_)) {
                // Not a wrong password (e.g. the database failed): it does not count.
                throttle.per_user.refund(&user_key);
                throttle.per_peer.refund(&peer_key);
            }
            entry.status = i64::from(super::error::status_of(&e).as_u16());
            crate::audit::record(&state.db, entry).await;
            Err(e.into())
        }
    }
}

/// `GET /v1/auth/tokens`: whom the token of this call belongs to (user, project, role, expiry),
/// as `s4t whoami` shows it. Read-only; it tells the caller nothing its token does not carry.
pub async fn show_token(
    Extension(c): Extension<Caller>,
    Extension(TokenExpiry(expires_at)): Extension<TokenExpiry>,
) -> Json<Value> {
    Json(json!({"user": c.user_name, "user_uuid": c.user, "project": c.project_name, "project_uuid": c.project,
                "role": c.role.as_str(), "admin": c.is_admin, "expires_at": expires_at / 1000}))
}

/// Audits a login refused before any check, within the `audited_refusals` budget of the
/// sender's `source`.
async fn record_refusal(state: &AppState, source: &str, entry: crate::db::NewAudit) {
    if state.login_throttle.audited_refusals.take(&format!("peer:{source}")).is_ok() {
        crate::audit::record(&state.db, entry).await;
    }
}

fn project_json(p: &Project) -> Value {
    json!({"uuid": p.uuid, "name": p.name, "created_at": p.created_at / 1000})
}

pub async fn list_projects(State(state): State<AppState>, Extension(c): Extension<Caller>) -> ApiResult<Json<Value>> {
    let all = state.db.list_projects().await?;
    let visible: Vec<Value> = all.iter().filter(|p| c.is_admin || p.uuid == c.project).map(project_json).collect();
    Ok(Json(json!({"projects": visible})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectBody {
    name: String,
}

pub async fn create_project(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Body(b): Body<ProjectBody>,
) -> ApiResult<Response> {
    c.require_admin("creating projects")?;
    check_name(&b.name, "project name")?;
    let p = state.db.create_project(&b.name).await?;
    Ok((StatusCode::CREATED, Json(project_json(&p))).into_response())
}

pub async fn list_users(State(state): State<AppState>, Extension(c): Extension<Caller>) -> ApiResult<Json<Value>> {
    let users = state.db.list_users(c.scope()).await?;
    let users: Vec<Value> = users
        .iter()
        .map(|m| json!({"uuid": m.user_uuid, "name": m.user_name, "project": m.project_uuid, "role": m.role.as_str()}))
        .collect();
    Ok(Json(json!({"users": users})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    name: String,
    password: String,
    project: String,
    #[serde(default = "default_role")]
    role: String,
}

fn default_role() -> String {
    "user".into()
}

pub async fn create_user(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Body(b): Body<UserBody>,
) -> ApiResult<Response> {
    c.require_admin("creating users")?;
    check_name(&b.name, "user name")?;
    if b.password.len() < 8 {
        return Err(Error::Invalid("the password must have at least 8 characters".into()).into());
    }
    if b.password.len() > crate::auth::MAX_PASSWORD_BYTES {
        let max = crate::auth::MAX_PASSWORD_BYTES;
        return Err(Error::Invalid(format!("the password must have at most {max} bytes")).into());
    }
    let role = Role::parse(&b.role)
        .ok_or_else(|| Error::Invalid(format!("unknown role {:?}: use admin, manager or user", b.role)))?;
    let project = state
        .db
        .project(&b.project)
        .await?
        .ok_or_else(|| Error::NotFound(format!("project {} not found", b.project)))?;
    let password = b.password;
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| Error::Invalid(format!("password hashing failed: {e}")))??;
    let user = state.db.create_user(&b.name, &hash, false).await?;
    state.db.set_membership(&user.uuid, &project.uuid, role).await?;
    let body = json!({"uuid": user.uuid, "name": user.name, "project": project.uuid, "role": role.as_str()});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Names travel in URLs and logs: keep them printable and short.
pub fn check_name(name: &str, what: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.chars().all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '));
    if !ok {
        return Err(Error::Invalid(format!("{what} {name:?} must be 1-255 letters, digits, '-', '_', '.' or spaces")));
    }
    // Objects are looked up by uuid or name: a name that reads as a uuid would be a decoy for
    // whoever acts on the object with that uuid.
    if uuid::Uuid::try_parse(name).is_ok() {
        return Err(Error::Invalid(format!("{what} {name:?} reads as a uuid; uuids are the cloud's to give")));
    }
    Ok(())
}
