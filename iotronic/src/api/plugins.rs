//! Plugins (S4T-REFERENCE §3, §6.2; issue 11): user code stored by the cloud, injected into
//! boards and run there sandboxed, and the REST resources that call it.
//!
//! - `/v1/plugins`: CRUD as the original (`name, code, public, callable, parameters, extra`)
//!   plus `kind` (`wasm` default, `process`, `python`) and `grants` (the GPIO lines and I2C
//!   devices the plugin asks for). Code is checked on upload: at most
//!   [`MAX_CODE_BYTES`] decoded, a WebAssembly module must validate, export `memory` and
//!   `run: () -> i32` and import only the board's host functions; its SHA-256 is recorded.
//! - `PUT /v1/boards/{b}/plugins` `{plugin, onboot[, grants]}` → `PluginInject`;
//!   `POST /v1/boards/{b}/plugins/{p}` `{action, parameters}` → `PluginCall|Start|Stop|Status|
//!   Reboot`; `DELETE` → `PluginRemove`. Every one is a request (`/v1/requests`) like any other
//!   board command, so `?async=true` and `?queue=true` work here too.
//!
//! Parameter keys: when a plugin declares `parameters` (an object whose keys, or a list of
//! names), `PluginCall` and `PluginStart` must give every declared key and no other; a
//! `PluginReboot` without parameters restarts with the saved ones.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use s4t_shared::plugin::{
    Grants, HOST_FUNCTIONS, HOST_MODULE, MAX_CODE_BYTES, PluginKind, is_wasm, pickle0_decode, pickle0_encode,
};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::auth::check_name;
use super::boards::visible_board;
use super::bounds;
use super::calls::{CallOpts, Outcome, call_board, request_json};
use super::error::{ApiResult, Body};
use super::{AppState, Caller};
use crate::Error;
use crate::db::{Board, Injection, Plugin, PluginCode, PluginUpdate, RequestStatus, Role};

/// Plugin actions of `POST /v1/boards/{b}/plugins/{p}` (the original's).
pub const ACTIONS: &[&str] = &["PluginCall", "PluginStart", "PluginStop", "PluginStatus", "PluginReboot"];

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn plugin_json(p: &Plugin, with_code: bool) -> Value {
    let mut v = json!({"uuid": p.uuid, "name": p.name, "owner": p.owner, "project": p.project, "public": p.public,
           "callable": p.callable, "parameters": p.parameters, "extra": p.extra, "kind": p.kind,
           "grants": p.grants, "code_sha256": p.code_sha256, "code_size": p.code_size,
           "created_at": p.created_at / 1000, "updated_at": p.updated_at / 1000,
           "links": [{"href": format!("/v1/plugins/{}", p.uuid), "rel": "self"}]});
    if with_code {
        v["code"] = json!(p.code);
    }
    v
}

fn injection_json(i: &Injection, p: Option<&Plugin>) -> Value {
    let stale = p.is_some_and(|p| !i.code_sha256.is_empty() && p.code_sha256 != i.code_sha256);
    json!({"board_uuid": i.board, "plugin": i.plugin, "plugin_uuid": i.plugin,
           "plugin_name": p.map(|p| p.name.clone()), "kind": p.map(|p| p.kind.clone()),
           "onboot": i.onboot, "status": i.status, "grants": i.grants, "code_sha256": i.code_sha256,
           "outdated": stale, "request": i.request,
           "created_at": i.created_at / 1000, "updated_at": i.updated_at / 1000})
}

async fn visible_plugin(state: &AppState, c: &Caller, ident: &str) -> Result<Plugin, Error> {
    state.db.plugin(ident, c.scope()).await?.ok_or_else(|| Error::NotFound(format!("plugin {ident} not found")))
}

/// Code as boards receive it, and its digest.
#[derive(Debug)]
struct Code {
    kind: PluginKind,
    stored: String,
    sha256: String,
    size: usize,
}

fn too_large(n: usize) -> Error {
    Error::Invalid(format!("the plugin code is {n} bytes; the limit is {MAX_CODE_BYTES} bytes"))
}

/// Checks `code` for `kind` (absent: a base64 WebAssembly module is `wasm`, anything else the
/// original format, Python source) and turns it into what boards receive.
fn prepare_code(kind: Option<&str>, code: &str) -> Result<Code, Error> {
    if code.is_empty() {
        return Err(Error::Invalid("code is empty: give the plugin's code".into()));
    }
    // base64 is 4/3 of the bytes: refuse what cannot fit before decoding it.
    if code.len() > MAX_CODE_BYTES / 3 * 4 + 8 && kind != Some("python") {
        return Err(too_large(code.len() / 4 * 3));
    }
    let kind = match kind {
        Some(k) => {
            PluginKind::parse(k).ok_or_else(|| Error::Invalid(format!("kind {k:?}: use wasm, process or python")))?
        }
        None => match b64().decode(code.trim()) {
            Ok(bytes) if is_wasm(&bytes) => PluginKind::Wasm,
            _ => PluginKind::Python,
        },
    };
    let digest = |bytes: &[u8]| format!("{:x}", Sha256::digest(bytes));
    match kind {
        PluginKind::Wasm | PluginKind::Process => {
            let bytes = b64().decode(code.trim()).map_err(|e| {
                Error::Invalid(format!("code must be the base64 of the {} for kind {}: {e}", what(kind), kind.as_str()))
            })?;
            if bytes.len() > MAX_CODE_BYTES {
                return Err(too_large(bytes.len()));
            }
            if kind == PluginKind::Wasm {
                validate_wasm(&bytes).map_err(Error::Invalid)?;
            }
            Ok(Code { kind, stored: b64().encode(&bytes), sha256: digest(&bytes), size: bytes.len() })
        }
        PluginKind::Python => {
            // Python source as the original API takes it, or text it already pickled.
            let source = match pickle0_decode(code) {
                Ok(s) if code.trim_end().ends_with('.') => s,
                _ => code.to_owned(),
            };
            if source.len() > MAX_CODE_BYTES {
                return Err(too_large(source.len()));
            }
            Ok(Code { kind, stored: pickle0_encode(&source), sha256: digest(source.as_bytes()), size: source.len() })
        }
    }
}

fn what(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Wasm => "WebAssembly module",
        _ => "executable or script",
    }
}

/// What a board checks again at injection, refused here already: the module validates,
/// exports `memory` and `run: () -> i32`, imports only host functions.
fn validate_wasm(bytes: &[u8]) -> Result<(), String> {
    if !is_wasm(bytes) {
        return Err("code is not a WebAssembly binary module (no \\0asm header)".into());
    }
    let engine = wasmi::Engine::default();
    let module =
        wasmi::Module::new(&engine, bytes).map_err(|e| format!("code is not a valid WebAssembly module: {e}"))?;
    let run_ok = module.exports().any(|e| {
        e.name() == "run"
            && matches!(e.ty(), wasmi::ExternType::Func(f) if f.params().is_empty() && f.results() == [wasmi::ValType::I32])
    });
    let memory_ok = module.exports().any(|e| e.name() == "memory" && matches!(e.ty(), wasmi::ExternType::Memory(_)));
    if !run_ok || !memory_ok {
        return Err("the module must export `memory` and `run: () -> i32`".into());
    }
    if let Some(i) = module.imports().find(|i| i.module() != HOST_MODULE || !HOST_FUNCTIONS.contains(&i.name())) {
        return Err(format!(
            "the module imports {}.{}, which boards do not offer; host functions are {HOST_MODULE}.{{{}}}",
            i.module(),
            i.name(),
            HOST_FUNCTIONS.join(",")
        ));
    }
    Ok(())
}

fn parse_grants(v: &Value) -> Result<Grants, Error> {
    let g: Grants = serde_json::from_value(v.clone()).map_err(|e| {
        Error::Invalid(format!("grants must be {{\"gpio\":[line names],\"i2c\":[{{\"bus\":n,\"address\":n}}]}}: {e}"))
    })?;
    if let Some(l) = g.gpio.iter().find(|l| l.is_empty() || l.len() > 64) {
        return Err(Error::Invalid(format!("grants: GPIO line name {l:?} must have 1 to 64 characters")));
    }
    if let Some(d) = g.i2c.iter().find(|d| d.address > 0x7f) {
        return Err(Error::Invalid(format!("grants: I2C address {} is not 0..=0x7f", d.address)));
    }
    Ok(g)
}

/// The keys a plugin declares: an object's keys or a list of names.
fn declared_keys(parameters: &Value) -> Result<Vec<String>, Error> {
    match parameters {
        Value::Null => Ok(vec![]),
        Value::Object(m) => Ok(m.keys().cloned().collect()),
        Value::Array(a) => a
            .iter()
            .map(|k| k.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Invalid("parameters: a list of parameter names must hold only strings".into())),
        _ => {
            Err(Error::Invalid("parameters must be an object (its keys are the parameters) or a list of names".into()))
        }
    }
}

/// Every declared key is given, and nothing else (when the plugin declares any).
fn check_keys(p: &Plugin, given: &Value) -> Result<(), Error> {
    let declared = declared_keys(&p.parameters)?;
    let Value::Object(given) = given else {
        return Err(Error::Invalid("parameters must be a JSON object".into()));
    };
    let missing: Vec<&str> = declared.iter().filter(|k| !given.contains_key(*k)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(Error::Invalid(format!("plugin {} needs the parameters {}", p.name, missing.join(", "))));
    }
    if !declared.is_empty()
        && let Some(k) = given.keys().find(|k| !declared.contains(k))
    {
        return Err(Error::Invalid(format!(
            "plugin {} has no parameter {k:?}; it takes {}",
            p.name,
            declared.join(", ")
        )));
    }
    Ok(())
}

/// Sort keys of the plugin list.
const LIST_KEYS: &[(&str, &str)] = &[
    ("id", "created_at"),
    ("created_at", "created_at"),
    ("updated_at", "updated_at"),
    ("name", "name"),
    ("uuid", "uuid"),
    ("kind", "kind"),
];

/// One page of the caller's plugins ([`super::paging`]); `?with_public=true` adds other
/// projects' public plugins, `?public=true` lists those and the caller's public ones only,
/// `?all_plugins=true` (admin) every project's.
pub async fn list(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    uri: axum::http::Uri,
) -> ApiResult<Json<Value>> {
    let on = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let scope = if on("all_plugins") {
        c.require_admin("?all_plugins")?;
        None
    } else {
        Some(c.project.as_str())
    };
    let mut page = super::paging::page(&q, LIST_KEYS)?;
    if let Some(m) = &page.marker {
        let p = state.db.plugin(m, scope).await?;
        page.marker = Some(p.ok_or_else(|| super::paging::unknown_marker(m, "plugin"))?.uuid);
    }
    let p = state.db.list_plugins_page(scope, on("with_public") || on("public"), on("public"), &page).await?;
    let next = super::paging::next(uri.path(), &q, &page, p.len(), p.last().map(|x| x.uuid.as_str()));
    Ok(Json(super::paging::list_json("plugins", p.iter().map(|p| plugin_json(p, false)).collect(), next)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    code: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    public: bool,
    #[serde(default)]
    callable: bool,
    #[serde(default, deserialize_with = "bounds::small")]
    parameters: Option<Value>,
    #[serde(default, deserialize_with = "bounds::small")]
    extra: Option<Value>,
    #[serde(default, deserialize_with = "bounds::small")]
    grants: Option<Value>,
}

pub async fn create(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Body(b): Body<CreateBody>,
) -> ApiResult<Response> {
    c.require(Role::Manager, "creating plugins")?;
    check_name(&b.name, "plugin name")?;
    if state.db.plugin_name_taken(&c.project, &b.name, "").await? {
        return Err(
            Error::Conflict(format!("project {} has a plugin called {} already", c.project_name, b.name)).into()
        );
    }
    let code = prepare_code(b.kind.as_deref(), &b.code)?;
    let parameters = b.parameters.unwrap_or_else(|| json!({}));
    declared_keys(&parameters)?;
    let grants = parse_grants(&b.grants.unwrap_or_else(|| json!({})))?;
    let p = Plugin {
        uuid: String::new(),
        name: b.name,
        owner: c.user.clone(),
        project: c.project.clone(),
        public: b.public,
        code: code.stored,
        callable: b.callable,
        parameters,
        extra: b.extra.unwrap_or_else(|| json!({})),
        kind: code.kind.as_str().to_owned(),
        grants: json!(grants),
        code_sha256: code.sha256,
        code_size: code.size as i64,
        created_at: 0,
        updated_at: 0,
    };
    let p = state.db.create_plugin(&p).await?;
    tracing::info!(plugin = %p.uuid, name = %p.name, kind = %p.kind, size = p.code_size, "plugin created");
    Ok((StatusCode::CREATED, Json(plugin_json(&p, false))).into_response())
}

pub async fn show(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(plugin_json(&visible_plugin(&state, &c, &ident).await?, true)))
}

/// Only the owning project (or an administrator) changes a plugin; others may only use a
/// public one.
/// The boards `p` is injected on: the names of those of its own project, and how many of
/// other projects' (a public plugin injected elsewhere; never named to the owner).
async fn injected_on(state: &AppState, p: &Plugin) -> Result<(Vec<String>, usize), Error> {
    let (mut own, mut others) = (Vec::new(), 0);
    for uuid in state.db.boards_with_plugin(&p.uuid).await? {
        match state.db.board_by_uuid(&uuid).await? {
            Some(b) if b.project == p.project => own.push(b.name),
            Some(_) => others += 1,
            None => {}
        }
    }
    Ok((own, others))
}

fn check_owner(c: &Caller, p: &Plugin, what: &str) -> Result<(), Error> {
    if c.is_admin || p.project == c.project {
        Ok(())
    } else {
        Err(Error::Forbidden(format!("plugin {} belongs to another project: it cannot be {what}", p.name)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    name: Option<String>,
    code: Option<String>,
    kind: Option<String>,
    public: Option<bool>,
    callable: Option<bool>,
    #[serde(default, deserialize_with = "bounds::small")]
    parameters: Option<Value>,
    #[serde(default, deserialize_with = "bounds::small")]
    extra: Option<Value>,
    #[serde(default, deserialize_with = "bounds::small")]
    grants: Option<Value>,
}

pub async fn update(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Body(b): Body<PatchBody>,
) -> ApiResult<Json<Value>> {
    c.require(Role::Manager, "changing plugins")?;
    let p = visible_plugin(&state, &c, &ident).await?;
    check_owner(&c, &p, "changed")?;
    let mut u = PluginUpdate::default();
    if let Some(n) = b.name {
        check_name(&n, "plugin name")?;
        if state.db.plugin_name_taken(&p.project, &n, &p.uuid).await? {
            return Err(Error::Conflict(format!("the project has a plugin called {n} already")).into());
        }
        u.name = Some(n);
    }
    match (b.code, b.kind) {
        (Some(code), kind) => {
            let code = prepare_code(kind.as_deref().or(Some(p.kind.as_str())), &code)?;
            u.code = Some(PluginCode {
                kind: code.kind.as_str().to_owned(),
                code: code.stored,
                sha256: code.sha256,
                size: code.size as i64,
            });
        }
        (None, Some(k)) if k != p.kind => {
            return Err(Error::Invalid("changing kind needs the new code too".into()).into());
        }
        (None, _) => {}
    }
    if b.public == Some(false) && p.public {
        // Other projects could no longer see it, nor so stop or remove it from their boards.
        let (_, others) = injected_on(&state, &p).await?;
        if others > 0 {
            return Err(Error::Conflict(format!(
                "plugin {} is injected on {others} board(s) of other projects: it stays public until they remove it",
                p.name
            ))
            .into());
        }
    }
    u.public = b.public;
    u.callable = b.callable;
    if let Some(v) = &b.parameters {
        declared_keys(v)?;
    }
    u.parameters = b.parameters;
    u.extra = b.extra;
    if let Some(g) = b.grants {
        u.grants = Some(json!(parse_grants(&g)?));
    }
    state.db.update_plugin(&p.uuid, u).await?;
    let p = visible_plugin(&state, &c, &p.uuid).await?;
    Ok(Json(plugin_json(&p, false)))
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Role::Manager, "deleting plugins")?;
    let p = visible_plugin(&state, &c, &ident).await?;
    check_owner(&c, &p, "deleted")?;
    still_injected(&state, &p).await?;
    // The check above names the boards; the delete checks again in the same statement, so a
    // plugin injected meanwhile is not deleted (nor its new injection with it).
    if !state.db.delete_plugin(&p.uuid).await? {
        if state.db.plugin(&p.uuid, None).await?.is_none() {
            return Err(Error::NotFound(format!("plugin {ident} not found")).into());
        }
        still_injected(&state, &p).await?;
        return Err(
            Error::Conflict(format!("plugin {} is injected on a board: it must be removed first", p.name)).into()
        );
    }
    Ok(StatusCode::NO_CONTENT)
}

/// 409 naming the boards that hold `p`, if any do.
async fn still_injected(state: &AppState, p: &Plugin) -> Result<(), Error> {
    let (own, others) = injected_on(state, p).await?;
    if own.is_empty() && others == 0 {
        return Ok(());
    }
    let mut on = own.join(", ");
    if others > 0 {
        on = format!("{on}{}{others} board(s) of other projects", if own.is_empty() { "" } else { " and " });
    }
    Err(Error::Conflict(format!("plugin {} is injected on {on}: it must be removed first", p.name)))
}

/// A `pending` injection learns how its PluginInject request ended. The write is a
/// compare-and-set on that request ([`Db::settle_injection`](crate::db::Db::settle_injection)):
/// when the injection moved on meanwhile (injected again on another request, settled by
/// another reader) it is read again and settled as it is now; `None`: it was removed.
async fn settle(state: &AppState, mut i: Injection) -> Result<Option<Injection>, Error> {
    // Each round follows a write that happened since the previous one: a few are plenty.
    for _ in 0..3 {
        let Some(req) = i.request.clone().filter(|_| i.status == "pending") else { return Ok(Some(i)) };
        let Some(r) = state.db.request(&req, None).await? else { return Ok(Some(i)) };
        if !r.status.is_final() {
            return Ok(Some(i));
        }
        let results = state.db.results(&req).await?;
        let res = results.iter().find(|x| x.board == i.board);
        let ok = r.status == RequestStatus::Completed && res.is_some_and(|x| x.result == "SUCCESS");
        let status = if !ok {
            "failed"
        } else if res.is_some_and(|x| x.message.contains("UPDATED")) {
            "updated"
        } else {
            "injected"
        };
        if state.db.settle_injection(&i.board, &i.plugin, &req, status).await? {
            i.status = status.into();
            i.request = None;
            return Ok(Some(i));
        }
        match state.db.injection(&i.board, &i.plugin).await? {
            Some(now) => i = now,
            None => return Ok(None),
        }
    }
    Ok(Some(i))
}

pub async fn injections(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    let b = visible_board(&state, &c, &ident).await?;
    let mut out = Vec::new();
    for i in state.db.injections_of_board(&b.uuid).await? {
        let Some(i) = settle(&state, i).await? else { continue };
        let p = state.db.plugin(&i.plugin, None).await?;
        out.push(injection_json(&i, p.as_ref()));
    }
    Ok(Json(json!({"injections": out})))
}

async fn board_and_plugin(
    state: &AppState,
    c: &Caller,
    board: &str,
    plugin: &str,
) -> Result<(Board, Plugin, Injection), Error> {
    let b = visible_board(state, c, board).await?;
    let p = visible_plugin(state, c, plugin).await?;
    let absent = || Error::NotFound(format!("plugin {} is not injected on board {}", p.name, b.name));
    let i = state.db.injection(&b.uuid, &p.uuid).await?.ok_or_else(absent)?;
    let i = settle(state, i).await?.ok_or_else(absent)?;
    Ok((b, p, i))
}

pub async fn injection(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((board, plugin)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (_, p, i) = board_and_plugin(&state, &c, &board, &plugin).await?;
    Ok(Json(injection_json(&i, Some(&p))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectBody {
    plugin: String,
    #[serde(default)]
    onboot: Value,
    /// The hardware this board gives the plugin (default: what the plugin asks for).
    #[serde(default, deserialize_with = "bounds::small")]
    grants: Option<Value>,
}

/// `onboot` as the original clients send it: a boolean or "true"/"false".
fn onboot_flag(v: &Value) -> Result<bool, Error> {
    match v {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") || s.is_empty() => Ok(false),
        other => Err(Error::Invalid(format!("onboot must be true or false, not {other}"))),
    }
}

/// The plugin dict a board receives (`PluginInject`): the original's keys plus ours.
fn plugin_dict(p: &Plugin, grants: &Value) -> Value {
    json!({"uuid": p.uuid, "name": p.name, "code": p.code, "callable": p.callable, "kind": p.kind,
           "grants": grants, "parameters": p.parameters})
}

pub async fn inject(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Body(body): Body<InjectBody>,
) -> ApiResult<Response> {
    c.require(Role::User, "injecting plugins")?;
    let onboot = onboot_flag(&body.onboot)?;
    let b = visible_board(&state, &c, &ident).await?;
    let p = visible_plugin(&state, &c, &body.plugin).await?;
    let grants = match &body.grants {
        Some(g) => json!(parse_grants(g)?),
        None => p.grants.clone(),
    };
    let opts = CallOpts::from_query(&q)?;
    let mut i = Injection {
        board: b.uuid.clone(),
        plugin: p.uuid.clone(),
        onboot,
        status: String::new(),
        grants: grants.clone(),
        code_sha256: p.code_sha256.clone(),
        request: None,
        created_at: 0,
        updated_at: 0,
    };
    // The board's place is held before it is asked (a first injection's plugin cannot be
    // deleted while the board takes it), and given up if it does not take the plugin.
    let reserved = state.db.reserve_injection(&i).await?;
    let outcome = call_board(&state, &c, &b, "PluginInject", json!([plugin_dict(&p, &grants), onboot]), opts).await;
    if outcome.is_err()
        && reserved
        && let Err(e) = state.db.release_injection(&b.uuid, &p.uuid).await
    {
        tracing::warn!(board = %b.uuid, plugin = %p.uuid, cause = %e, "cannot drop a refused injection's reservation");
    }
    match outcome? {
        Outcome::Done(message) => {
            let updated = message.as_str().is_some_and(|m| m.contains("UPDATED"));
            i.status = if updated { "updated" } else { "injected" }.into();
            state.db.upsert_injection(&i).await?;
            let i = state.db.injection(&b.uuid, &p.uuid).await?.unwrap_or(i);
            Ok(Json(injection_json(&i, Some(&p))).into_response())
        }
        Outcome::Accepted(r) => {
            i.status = "pending".into();
            i.request = Some(r.uuid.clone());
            state.db.upsert_injection(&i).await?;
            Ok((StatusCode::ACCEPTED, Json(request_json(&r))).into_response())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    action: String,
    #[serde(default, deserialize_with = "bounds::call")]
    parameters: Option<Value>,
    #[serde(default)]
    queue: Option<bool>,
}

pub async fn action(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((board, plugin)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    Body(a): Body<ActionBody>,
) -> ApiResult<Outcome> {
    if !ACTIONS.contains(&a.action.as_str()) {
        return Err(
            Error::Invalid(format!("unknown plugin action {:?}; one of: {}", a.action, ACTIONS.join(", "))).into()
        );
    }
    c.require(Role::User, "running plugins")?;
    let (b, p, i) = board_and_plugin(&state, &c, &board, &plugin).await?;
    if i.status == "pending" {
        return Err(Error::Conflict(format!(
            "plugin {} is still being injected into {} (request {})",
            p.name,
            b.name,
            i.request.as_deref().unwrap_or("?")
        ))
        .into());
    }
    let params = a.parameters.clone().unwrap_or_else(|| json!({}));
    if !params.is_object() {
        return Err(Error::Invalid("parameters must be a JSON object".into()).into());
    }
    let args = match a.action.as_str() {
        "PluginCall" | "PluginStart" => {
            match (a.action.as_str(), p.callable) {
                ("PluginCall", false) => {
                    return Err(Error::Invalid(format!(
                        "plugin {} is not callable: start it with PluginStart (or make it callable)",
                        p.name
                    ))
                    .into());
                }
                ("PluginStart", true) => {
                    return Err(
                        Error::Invalid(format!("plugin {} is callable: call it with PluginCall", p.name)).into()
                    );
                }
                _ => {}
            }
            check_keys(&p, &params)?;
            json!([p.uuid, params])
        }
        "PluginReboot" => {
            if p.callable {
                return Err(Error::Invalid(format!("plugin {} is callable: there is nothing to reboot", p.name)).into());
            }
            match &a.parameters {
                Some(v) if v.as_object().is_some_and(|m| !m.is_empty()) => {
                    check_keys(&p, v)?;
                    json!([p.uuid, v])
                }
                _ => json!([p.uuid, null]),
            }
        }
        "PluginStop" => {
            if let Some(k) = params.as_object().and_then(|m| m.keys().find(|k| *k != "delay")) {
                return Err(Error::Invalid(format!("PluginStop takes only {{\"delay\": seconds}}, not {k:?}")).into());
            }
            json!([p.uuid, params])
        }
        _ => json!([p.uuid]),
    };
    let opts = CallOpts::from_query(&q)?.with_body_flag(&json!({"queue": a.queue}));
    let args = match args {
        Value::Array(v) => Value::Array(v),
        other => json!([other]),
    };
    let outcome = call_board(&state, &c, &b, &a.action, args, opts).await?;
    if let Outcome::Done(message) = &outcome {
        let status = match a.action.as_str() {
            "PluginStart" | "PluginReboot" => Some("operative"),
            "PluginStop" if message.as_str() != Some("RUNNING") => Some("stopped"),
            "PluginStatus" if message.as_str() == Some("ALIVE") => Some("operative"),
            "PluginStatus" if i.status == "operative" => Some("stopped"),
            _ => None,
        };
        if let Some(s) = status {
            // Not over a pending injection: a re-injection that began since the check above
            // decides the status (its request's outcome, which the 409 above waits for); the
            // board did carry out this action, so its answer stands all the same.
            state.db.set_injection_status(&b.uuid, &p.uuid, s).await?;
        }
    }
    Ok(outcome)
}

pub async fn remove(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((board, plugin)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    c.require(Role::User, "removing plugins")?;
    let (b, p, i) = board_and_plugin(&state, &c, &board, &plugin).await?;
    let opts = CallOpts::from_query(&q)?;
    match call_board(&state, &c, &b, "PluginRemove", json!([p.uuid]), opts).await? {
        Outcome::Done(_) => {
            state.db.delete_injection(&b.uuid, &p.uuid).await?;
            Ok(Json(injection_json(&Injection { status: "removed".into(), ..i }, Some(&p))).into_response())
        }
        Outcome::Accepted(r) => {
            // The board forgets it when the request runs; the cloud forgets it now, so a
            // queued removal never leaves a plugin that cannot be deleted.
            state.db.delete_injection(&b.uuid, &p.uuid).await?;
            Ok((StatusCode::ACCEPTED, Json(request_json(&r))).into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE: &str = r#"(module (import "s4t" "log" (func (param i32 i32 i32)))
        (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#;

    fn b64wat(wat: &str) -> String {
        b64().encode(wat::parse_str(wat).unwrap())
    }

    #[test]
    fn code_is_checked_by_kind() {
        let c = prepare_code(None, &b64wat(MODULE)).unwrap();
        assert_eq!((c.kind, c.sha256.len()), (PluginKind::Wasm, 64));
        let bad_import = r#"(module (import "env" "system" (func)) (memory (export "memory") 1)
            (func (export "run") (result i32) (i32.const 0)))"#;
        let e = prepare_code(Some("wasm"), &b64wat(bad_import)).unwrap_err().to_string();
        assert!(e.contains("env.system"), "{e}");
        let no_run = r#"(module (memory (export "memory") 1))"#;
        assert!(prepare_code(Some("wasm"), &b64wat(no_run)).unwrap_err().to_string().contains("run"));
        assert!(prepare_code(Some("wasm"), "not base64!").is_err());
        assert!(prepare_code(Some("wasm"), &b64().encode(b"\0asm\x01\0\0\0garbage")).is_err());
        assert!(prepare_code(Some("cobol"), "x").is_err());
        let huge = b64().encode(vec![0u8; MAX_CODE_BYTES + 1]);
        assert!(prepare_code(Some("process"), &huge).unwrap_err().to_string().contains("limit"));
        // The original format: source is pickled; pickled text is kept as it is.
        let src = "from iotronic_lightningrod.plugins import Plugin\nclass Worker(Plugin.Plugin):\n    pass\n";
        let c = prepare_code(None, src).unwrap();
        assert_eq!((c.kind, pickle0_decode(&c.stored).unwrap()), (PluginKind::Python, src.to_owned()));
        assert_eq!(prepare_code(Some("python"), &c.stored).unwrap().stored, c.stored);
        assert!(prepare_code(None, "").is_err());
    }

    #[test]
    fn parameter_keys_are_checked() {
        let mut p = Plugin {
            uuid: "u".into(),
            name: "p".into(),
            owner: String::new(),
            project: String::new(),
            public: false,
            code: String::new(),
            callable: true,
            parameters: json!({"times": 3, "line": "GPIO17"}),
            extra: json!({}),
            kind: "wasm".into(),
            grants: json!({}),
            code_sha256: String::new(),
            code_size: 0,
            created_at: 0,
            updated_at: 0,
        };
        assert!(check_keys(&p, &json!({"times": 1, "line": "GPIO4"})).is_ok());
        let e = check_keys(&p, &json!({"times": 1})).unwrap_err().to_string();
        assert!(e.contains("line"), "{e}");
        assert!(check_keys(&p, &json!({"times": 1, "line": "x", "oops": 1})).is_err());
        p.parameters = json!(["a"]);
        assert!(check_keys(&p, &json!({"a": 1})).is_ok());
        p.parameters = json!({});
        assert!(check_keys(&p, &json!({"anything": 1})).is_ok());
        assert!(declared_keys(&json!([1])).is_err());
        assert!(parse_grants(&json!({"gpio": ["GPIO17"], "i2c": [{"bus": 1, "address": 72}]})).is_ok());
        assert!(parse_grants(&json!({"pins": []})).is_err());
        assert!(parse_grants(&json!({"i2c": [{"bus": 1, "address": 300}]})).is_err());
    }
}
