//! Security endpoints: token revocation, board revocation and secret rotation, the audit log
//! (`GET /v1/audit`) and the middleware that records every state-changing call.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::Caller;
use super::error::ApiResult;
use crate::Error;
use crate::audit;
use crate::auth::token_hash;
use crate::db::{AuditQuery, NewAudit, Role, now_ms};

/// The peer of a request: `ConnectInfo` when the server provides it.
pub fn peer(req_ext: &axum::http::Extensions) -> String {
    req_ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string()).unwrap_or_default()
}

/// Records every state-changing call (anything but GET/HEAD/OPTIONS, and the one GET that
/// acts, [`acting_get`]) once it has an answer: who (the token's user and project), what
/// (method and path), when, from where, outcome. Runs inside authentication, so a call
/// refused with 401 is not recorded here (failed logins are, by the token handler).
pub async fn record_calls(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if reads && !(*req.method() == Method::GET && acting_get(req.uri().path())) {
        return next.run(req).await;
    }
    let caller = req.extensions().get::<Caller>().cloned();
    let source = peer(req.extensions());
    let action = format!("{} {}", req.method(), req.uri().path());
    let target = req.uri().path().to_owned();
    let response = next.run(req).await;
    // The login handler records itself, with the user name.
    if target.trim_end_matches('/') != "/v1/auth/tokens" || caller.is_some() {
        let c = caller.unwrap_or_else(anonymous);
        let entry = NewAudit {
            user_uuid: c.user,
            user_name: c.user_name,
            project_uuid: c.project,
            action,
            target,
            source,
            status: i64::from(response.status().as_u16()),
            detail: String::new(),
        };
        audit::record(&state.db, entry).await;
    }
    response
}

/// `GET /v1/boards/{board}/services/restore`, the original API's, mints tunnel tokens and
/// sends every exposure to the board again: a GET that changes state, audited like a POST.
fn acting_get(path: &str) -> bool {
    path.trim_end_matches('/').strip_prefix("/v1/boards/").is_some_and(|rest| rest.ends_with("/services/restore"))
}

fn anonymous() -> Caller {
    Caller {
        user: String::new(),
        user_name: String::new(),
        project: String::new(),
        project_name: String::new(),
        role: Role::User,
        is_admin: false,
    }
}

/// `DELETE /v1/auth/tokens`: revokes the token of this call (log out), or, for an
/// administrator, the token named by `X-Subject-Token` (as Keystone does).
pub async fn revoke_token(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let subject = headers.get("x-subject-token").and_then(|v| v.to_str().ok()).map(str::trim).map(str::to_owned);
    let token = match subject {
        Some(t) => {
            c.require_admin("revoking another user's token")?;
            t
        }
        None => super::auth::presented_token(&headers)
            .ok_or_else(|| Error::Unauthorized("no token in this request".into()))?,
    };
    if !state.db.delete_token(&token_hash(&token)).await? {
        return Err(Error::NotFound("no such token (already revoked or expired)".into()).into());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /v1/users/{user}/tokens` (administrators; anyone for themselves): revokes every
/// token of the user.
pub async fn revoke_user_tokens(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    let user = state.db.user(&ident).await?;
    // Anyone but an administrator gets the same 403 for another user and for no user at all:
    // the answer must not tell which names exist.
    if user.as_ref().is_none_or(|u| u.uuid != c.user) {
        c.require_admin("revoking another user's tokens")?;
    }
    let user = user.ok_or_else(|| Error::NotFound(format!("user {ident} not found")))?;
    let n = state.db.delete_user_tokens(&user.uuid).await?;
    Ok(Json(json!({"user": user.uuid, "revoked": n})))
}

/// `POST /v1/boards/{board}/revoke` (manager): the board's secret and code stop working, its
/// sessions and tunnels are closed within seconds. `rotate-secret` re-admits it.
pub async fn revoke_board(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    c.require(Role::Manager, "revoking boards")?;
    let b = super::boards::visible_board(&state, &c, &ident).await?;
    state.db.revoke_board(&b.uuid).await?;
    let at = state.db.board_revoked_at(&b.uuid).await?.unwrap_or_else(now_ms);
    Ok(Json(json!({"uuid": b.uuid, "name": b.name, "revoked_at": at / 1000})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// Lifetime of the new code, seconds (default 1 day, at most 30 days).
    #[serde(default)]
    ttl: Option<i64>,
}

/// Default and longest lifetime of a code from `rotate-secret`.
const ROTATE_CODE_TTL_S: i64 = 24 * 3600;
const MAX_CODE_TTL_S: i64 = 30 * 24 * 3600;

/// `POST /v1/boards/{board}/rotate-secret` (manager): the old secret stops working at once
/// (sessions closed as for a revocation) and a fresh one-time code is returned once; the
/// board enrolls with it (`lightning-rod enroll --code`) and receives a new secret.
pub async fn rotate_secret(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    c.require(Role::Manager, "rotating board secrets")?;
    let b = super::boards::visible_board(&state, &c, &ident).await?;
    let parsed: RotateBody = if body.iter().all(u8::is_ascii_whitespace) {
        RotateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| Error::Invalid(format!("invalid request body: {e}")))?
    };
    let ttl = parsed.ttl.unwrap_or(ROTATE_CODE_TTL_S);
    if !(1..=MAX_CODE_TTL_S).contains(&ttl) {
        return Err(Error::Invalid(format!("ttl must be 1 to {MAX_CODE_TTL_S} seconds")).into());
    }
    // Hex: safe on any command line (a base64url code may start with '-', which reads as a flag).
    let code: String = rand::random::<[u8; 20]>().iter().map(|b| format!("{b:02x}")).collect();
    let expires_at = now_ms() + ttl * 1000;
    state.db.rotate_board(&b.uuid, &code, expires_at).await?;
    let body = json!({"uuid": b.uuid, "name": b.name, "code": code, "code_expires_at": expires_at / 1000});
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// `GET /v1/audit` (administrators: everything, `?project=` to filter; managers: their
/// project's entries): newest first, `?limit=` (≤ 1000, default 100), `?since=`/`?before=`
/// (Unix seconds), `?action=` (a prefix of the action: `tunnel.`, `POST /v1/boards`),
/// `?marker=` (the id of the last entry of the previous page: the next page, exact even where
/// many entries share a second); a full page carries `next`, the query of the page after it.
pub async fn list_audit(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let num = |name: &str, default: i64| -> Result<i64, Error> {
        match q.get(name) {
            Some(v) => v.parse::<i64>().map_err(|_| Error::Invalid(format!("{name} must be an integer"))),
            None => Ok(default),
        }
    };
    let project = if c.is_admin {
        match q.get("project") {
            Some(p) => {
                Some(state.db.project(p).await?.ok_or_else(|| Error::NotFound(format!("project {p} not found")))?.uuid)
            }
            None => None,
        }
    } else {
        c.require(Role::Manager, "reading the audit log")?;
        Some(c.project.clone())
    };
    let query = AuditQuery {
        project,
        since: num("since", 0)?.saturating_mul(1000),
        before: num("before", 0)?.saturating_mul(1000),
        action: q.get("action").cloned().unwrap_or_default(),
        marker: q.get("marker").cloned(),
        limit: num("limit", 100)?,
    };
    let found = state.db.list_audit(&query).await?;
    let page = crate::db::Page { limit: query.limit.clamp(1, 1000), marker: None, key: "at", desc: true };
    let next = super::paging::next("/v1/audit", &q, &page, found.len(), found.last().map(|e| e.id.as_str()));
    let entries: Vec<Value> = found
        .into_iter()
        .map(|e| {
            json!({"id": e.id, "at": e.at as f64 / 1000.0, "user": e.user_uuid, "user_name": e.user_name,
                   "project": e.project_uuid, "action": e.action, "target": e.target, "source": e.source,
                   "status": e.status, "detail": e.detail})
        })
        .collect();
    let mut body = json!({"audit": entries});
    if let Some(next) = next {
        body["next"] = json!(next);
    }
    Ok(Json(body))
}
