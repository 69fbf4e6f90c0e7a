//! Boards, board actions, GPIO/I2C and services on boards.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::check_name;
use super::bounds;
use super::calls::{CallOpts, Outcome, call_board, check_lease};
use super::error::{ApiResult, Body};
use super::paging;
use super::{AppState, Caller};
use crate::Error;
use crate::conductor::PUBLIC_PORTS;
use crate::db::{Board, BoardUpdate, Exposure, NewBoard, Role, Service};

/// Board actions of the original (`objects/board.py ACTIONS`) plus the lightning-rod extras.
pub const ACTIONS: &[&str] = &[
    "DevicePing",
    "DeviceReboot",
    "DeviceRestartLR",
    "DeviceNetConfig",
    "DeviceEcho",
    "DeviceUpgradeLR",
    "DevicePkgOperation",
    "DeviceInfo",
    "DeviceMountFs",
    "DeviceFactoryReset",
];

/// Actions that change what runs on the board (packages, the agent, its file systems, its
/// factory state): the Manager role, as for plugins. A package operation runs the package
/// manager as root on the board.
const MANAGER_ACTIONS: &[&str] = &["DevicePkgOperation", "DeviceUpgradeLR", "DeviceMountFs", "DeviceFactoryReset"];

/// The fields a list shows unless `/detail` (the original's default subset).
const LIST_FIELDS: &[&str] = &[
    "name",
    "code",
    "status",
    "uuid",
    "session",
    "type",
    "fleet",
    "lr_version",
    "connectivity",
    "agent",
    "wstun_ip",
    "links",
];

/// [`board_json`] as `c` may see it: the registration code (set until the board enrolls,
/// and again by rotate-secret) enrolls a device as this board and receives its secret, so
/// only managers (who may re-provision it) see it.
/// A board as `c` may see it: the registration code (which enrolls a device as the board) only
/// for managers.
pub(crate) fn board_json_for(b: &Board, c: &Caller) -> Value {
    let mut v = board_json(b);
    if c.require(Role::Manager, "").is_err() {
        v["code"] = Value::Null;
        // The config document sent at enrollment repeats it (a legacy enrollment leaves the
        // code valid).
        if let Some(board) = v.pointer_mut("/config/iotronic/board").and_then(Value::as_object_mut) {
            board.remove("code");
        }
    }
    v
}

pub fn board_json(b: &Board) -> Value {
    let location = match (&b.latitude, &b.longitude, &b.altitude) {
        (Some(la), Some(lo), Some(al)) => json!([{"latitude": la, "longitude": lo, "altitude": al}]),
        _ => json!([]),
    };
    json!({
        "uuid": b.uuid,
        "name": b.name,
        "code": b.code,
        "status": b.status,
        "type": b.board_type,
        "agent": b.agent,
        "owner": b.owner,
        "project": b.project,
        "fleet": b.fleet,
        "lr_version": b.lr_version,
        "connectivity": b.connectivity,
        "mobile": b.mobile,
        "config": b.config,
        "extra": b.extra,
        "location": location,
        "session": b.session,
        "wstun_ip": wstun_ip(b),
        "legacy": is_legacy(b),
        "created_at": b.created_at / 1000,
        "updated_at": b.updated_at / 1000,
        "links": [{"href": format!("/v1/boards/{}", b.uuid), "rel": "self"}],
    })
}

/// A board that logs in anonymously (the original lightning-rod, or ours keeping an identity
/// the original cloud gave it): it holds no credential of ours although it has enrolled.
pub fn is_legacy(b: &Board) -> bool {
    b.secret_salt.is_none() && b.status != "registered"
}

/// The original lightning-rod (its `lr_version` has no `+rs.` label of ours): it gets the
/// original argument shapes, without our tunnel URL and token.
pub fn runs_original_lr(b: &Board) -> bool {
    b.lr_version.as_deref().is_some_and(|v| !v.contains("+rs."))
}

/// As the original: the host of the WAMP URL the board was given, where its wstun connects
/// (port 8080 of that host).
fn wstun_ip(b: &Board) -> Value {
    b.dialed_host().map_or(Value::Null, Value::String)
}

fn subset(v: Value, fields: &[&str]) -> Value {
    let Value::Object(map) = v else { return v };
    Value::Object(map.into_iter().filter(|(k, _)| fields.contains(&k.as_str())).collect())
}

fn fields_param(q: &HashMap<String, String>) -> Option<Vec<String>> {
    q.get("fields").map(|f| f.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
}

/// A board visible to the caller, or 404 (another project's board does not exist for them).
pub async fn visible_board(state: &AppState, c: &Caller, ident: &str) -> Result<Board, Error> {
    state.db.board(ident, c.scope()).await?.ok_or_else(|| Error::NotFound(format!("board {ident} not found")))
}

/// Sort keys of the board list (`id`, the original's default, is the creation order).
pub(crate) const SORT_KEYS: &[(&str, &str)] = &[
    ("id", "created_at"),
    ("created_at", "created_at"),
    ("updated_at", "updated_at"),
    ("name", "name"),
    ("uuid", "uuid"),
    ("status", "status"),
];

/// One page of the boards the caller may see ([`paging`]), and the `next` link if it is full.
async fn list_boards(
    state: &AppState,
    c: &Caller,
    q: &HashMap<String, String>,
    path: &str,
) -> Result<(Vec<Board>, Option<String>), Error> {
    let project = match q.get("project") {
        Some(p) if c.is_admin => {
            Some(state.db.project(p).await?.ok_or_else(|| Error::NotFound(format!("project {p} not found")))?.uuid)
        }
        Some(_) => return Err(Error::Forbidden("only administrators may list another project's boards".into())),
        None => c.scope().map(str::to_owned),
    };
    let status = q.get("status").map(String::as_str);
    if let Some(s) = status
        && !["registered", "offline", "online"].contains(&s)
    {
        return Err(Error::Invalid(format!("?status={s}: use registered, offline or online")));
    }
    let mut page = paging::page(q, SORT_KEYS)?;
    if let Some(m) = &page.marker {
        let b = state.db.board(m, project.as_deref()).await?;
        page.marker = Some(b.ok_or_else(|| Error::Invalid(format!("?marker={m}: no such board in this list")))?.uuid);
    }
    let boards = state.db.list_boards_page(project.as_deref(), status, &page).await?;
    let next = paging::next(path, q, &page, boards.len(), boards.last().map(|b| b.uuid.as_str()));
    Ok((boards, next))
}

/// `{"boards": [...]}`, with `"next"` when there is a page after this one.
fn board_list(items: Vec<Value>, next: Option<String>) -> Json<Value> {
    let mut out = json!({ "boards": items });
    if let Some(n) = next {
        out["next"] = json!(n);
    }
    Json(out)
}

pub async fn list(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (boards, next) = list_boards(&state, &c, &q, "/v1/boards").await?;
    let fields = fields_param(&q);
    let out: Vec<Value> = boards
        .iter()
        .map(|b| match &fields {
            Some(f) => subset(board_json_for(b, &c), &f.iter().map(String::as_str).collect::<Vec<_>>()),
            None => subset(board_json_for(b, &c), LIST_FIELDS),
        })
        .collect();
    Ok(board_list(out, next))
}

pub async fn list_detail(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (boards, next) = list_boards(&state, &c, &q, "/v1/boards/detail").await?;
    Ok(board_list(boards.iter().map(|b| board_json_for(b, &c)).collect(), next))
}

#[derive(Deserialize)]
pub struct Location {
    latitude: Value,
    longitude: Value,
    altitude: Value,
}

fn location_of(l: &[Location]) -> Result<Option<(String, String, String)>, Error> {
    let text = |v: &Value| match v {
        Value::String(s) => bounds::check_text(s, "a location value").map(|()| s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(Error::Invalid("location values must be numbers or strings".into())),
    };
    match l.first() {
        Some(l) => Ok(Some((text(&l.latitude)?, text(&l.longitude)?, text(&l.altitude)?))),
        None => Ok(None),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBoard {
    name: String,
    code: String,
    #[serde(rename = "type", default = "default_type")]
    board_type: String,
    location: Vec<Location>,
    #[serde(default)]
    mobile: bool,
    #[serde(default)]
    fleet: Option<String>,
    #[serde(default, deserialize_with = "bounds::small")]
    extra: Option<Value>,
}

fn default_type() -> String {
    "generic".into()
}

pub async fn create(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Body(b): Body<CreateBoard>,
) -> ApiResult<Response> {
    c.require(Role::Manager, "creating boards")?;
    check_name(&b.name, "board name")?;
    if s4t_shared::ids::looks_like_uuid(&b.name) {
        return Err(Error::Invalid("a board name must not look like a uuid".into()).into());
    }
    if b.code.is_empty() || b.code.len() > 255 {
        return Err(Error::Invalid("the registration code must have 1 to 255 characters".into()).into());
    }
    bounds::check_text(&b.board_type, "the board's type")?;
    let location = location_of(&b.location)?;
    if location.is_none() {
        return Err(Error::Invalid("location needs one {latitude, longitude, altitude}".into()).into());
    }
    let fleet = match &b.fleet {
        Some(f) => Some(
            state
                .db
                .fleet(f, Some(&c.project))
                .await?
                .ok_or_else(|| Error::NotFound(format!("fleet {f} not found")))?
                .uuid,
        ),
        None => None,
    };
    // Throttled like a guess at the agent even when right (a throttled attempt must not tell
    // anything either); see `board_conflicts`.
    if let Err(retry_after_s) = state.board_conflicts.take(&c.project) {
        return Err(Error::Throttled { retry_after_s }.into());
    }
    let inserted = state
        .db
        .insert_board(NewBoard {
            name: b.name,
            code: b.code,
            board_type: b.board_type,
            owner: c.user.clone(),
            project: c.project.clone(),
            fleet,
            mobile: b.mobile,
            extra: b.extra.unwrap_or_else(|| json!({})),
            location,
        })
        .await;
    if !matches!(inserted, Err(Error::Conflict(_))) {
        state.board_conflicts.refund(&c.project);
    }
    Ok((StatusCode::CREATED, Json(board_json(&inserted?))).into_response())
}

pub async fn show(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let b = visible_board(&state, &c, &ident).await?;
    let v = board_json_for(&b, &c);
    Ok(Json(match fields_param(&q) {
        Some(f) => subset(v, &f.iter().map(String::as_str).collect::<Vec<_>>()),
        None => v,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchBoard {
    name: Option<String>,
    #[serde(rename = "type")]
    board_type: Option<String>,
    mobile: Option<bool>,
    /// Absent: unchanged; `null`: out of its fleet (serde alone reads both as `None`).
    #[serde(default, deserialize_with = "present")]
    fleet: Option<Option<String>>,
    #[serde(default, deserialize_with = "bounds::small")]
    extra: Option<Value>,
    location: Option<Vec<Location>>,
}

/// A field that is present, `null` included.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

pub async fn update(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Body(p): Body<PatchBoard>,
) -> ApiResult<Json<Value>> {
    c.require(Role::Manager, "updating boards")?;
    let b = visible_board(&state, &c, &ident).await?;
    check_lease(&state, &c, &b.uuid).await?;
    if let Some(n) = &p.name {
        check_name(n, "board name")?;
        if s4t_shared::ids::looks_like_uuid(n) {
            return Err(Error::Invalid("a board name must not look like a uuid".into()).into());
        }
    }
    let fleet = match p.fleet {
        Some(Some(f)) => Some(Some(
            state
                .db
                .fleet(&f, Some(&b.project))
                .await?
                .ok_or_else(|| Error::NotFound(format!("fleet {f} not found")))?
                .uuid,
        )),
        Some(None) => Some(None),
        None => None,
    };
    if let Some(t) = &p.board_type {
        bounds::check_text(t, "the board's type")?;
    }
    let location = match &p.location {
        Some(l) => location_of(l)?,
        None => None,
    };
    // Board names are unique across projects: a rename's 409 tells that another project has
    // the name, so renames are throttled like creations (`board_conflicts`).
    let renaming = p.name.is_some();
    if renaming && let Err(retry_after_s) = state.board_conflicts.take(&c.project) {
        return Err(Error::Throttled { retry_after_s }.into());
    }
    let u = BoardUpdate { name: p.name, board_type: p.board_type, mobile: p.mobile, fleet, extra: p.extra, location };
    let updated = state.db.update_board(&b.uuid, u).await;
    if renaming && !matches!(updated, Err(Error::Conflict(_))) {
        state.board_conflicts.refund(&c.project);
    }
    Ok(Json(board_json_for(&updated?, &c)))
}

pub async fn destroy(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Role::Manager, "deleting boards")?;
    let b = visible_board(&state, &c, &ident).await?;
    check_lease(&state, &c, &b.uuid).await?;
    state.db.delete_board(&b.uuid).await?;
    Ok(StatusCode::NO_CONTENT)
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
    Path(ident): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Body(a): Body<ActionBody>,
) -> ApiResult<Outcome> {
    if !ACTIONS.contains(&a.action.as_str()) {
        return Err(Error::Invalid(format!("unknown action {:?}; one of: {}", a.action, ACTIONS.join(", "))).into());
    }
    if MANAGER_ACTIONS.contains(&a.action.as_str()) {
        c.require(Role::Manager, &a.action)?;
    }
    let b = visible_board(&state, &c, &ident).await?;
    let opts = CallOpts::from_query(&q)?.with_body_flag(&json!({"queue": a.queue}));
    let params = a.parameters.unwrap_or_else(|| json!({}));
    Ok(call_board(&state, &c, &b, &a.action, json!([params]), opts).await?)
}

async fn board_call(
    state: &AppState,
    c: &Caller,
    ident: &str,
    q: &HashMap<String, String>,
    action: &str,
    args: Value,
) -> ApiResult<Outcome> {
    let b = visible_board(state, c, ident).await?;
    Ok(call_board(state, c, &b, action, json!([args]), CallOpts::from_query(q)?).await?)
}

pub async fn gpio_list(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Outcome> {
    board_call(&state, &c, &ident, &q, "GpioList", json!({})).await
}

pub async fn gpio_read(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((ident, line)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Outcome> {
    board_call(&state, &c, &ident, &q, "GpioRead", json!({"line": line})).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioWrite {
    value: u8,
    #[serde(default)]
    direction: Option<String>,
}

pub async fn gpio_write(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((ident, line)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    Body(w): Body<GpioWrite>,
) -> ApiResult<Outcome> {
    if w.value > 1 {
        return Err(Error::Invalid(format!("value {} is not 0 or 1", w.value)).into());
    }
    let mut args = json!({"line": line, "value": w.value});
    if let Some(d) = w.direction {
        if d != "out" {
            return Err(Error::Invalid(format!("direction {d:?}: writing needs \"out\"")).into());
        }
        args["direction"] = json!(d);
    }
    board_call(&state, &c, &ident, &q, "GpioWrite", args).await
}

/// `{addr}` in decimal or 0x-hex, a 7-bit I2C address.
fn i2c_address(s: &str) -> Result<u16, Error> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(a) if a <= 0x7f => Ok(a),
        _ => Err(Error::Invalid(format!("I2C address {s:?}: give 0-127 in decimal or 0x-hex"))),
    }
}

fn i2c_bus(s: &str) -> Result<u32, Error> {
    s.parse().map_err(|_| Error::Invalid(format!("I2C bus {s:?} is not a number")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I2cRead {
    #[serde(default)]
    register: Option<u8>,
    length: u16,
}

pub async fn i2c_read(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((ident, bus, addr)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    Body(r): Body<I2cRead>,
) -> ApiResult<Outcome> {
    if r.length == 0 || r.length > 4096 {
        return Err(Error::Invalid("length must be 1 to 4096 bytes".into()).into());
    }
    let mut args = json!({"bus": i2c_bus(&bus)?, "address": i2c_address(&addr)?, "length": r.length});
    if let Some(reg) = r.register {
        args["register"] = json!(reg);
    }
    board_call(&state, &c, &ident, &q, "I2cRead", args).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I2cWrite {
    #[serde(default)]
    register: Option<u8>,
    data: Vec<u8>,
}

pub async fn i2c_write(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((ident, bus, addr)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    Body(w): Body<I2cWrite>,
) -> ApiResult<Outcome> {
    if w.data.is_empty() || w.data.len() > 4096 {
        return Err(Error::Invalid("data must have 1 to 4096 bytes".into()).into());
    }
    let mut args = json!({"bus": i2c_bus(&bus)?, "address": i2c_address(&addr)?, "data": w.data});
    if let Some(reg) = w.register {
        args["register"] = json!(reg);
    }
    board_call(&state, &c, &ident, &q, "I2cWrite", args).await
}

fn exposure_json(e: &Exposure) -> Value {
    json!({"board_uuid": e.board, "service": e.service, "service_uuid": e.service, "public_port": e.public_port,
           "lease": e.lease, "created_at": e.created_at / 1000, "allow": e.allow})
}

/// The service dict a board receives (the original's keys).
pub fn service_dict(s: &Service) -> Value {
    json!({"uuid": s.uuid, "name": s.name, "port": s.port, "protocol": s.protocol})
}

/// The service dict plus where to tunnel and the token for this board and public port; the
/// original lightning-rod gets the original dict (it tunnels with wstun to port 8080 of its
/// WAMP host, and the cloud opens only the port it allocated).
fn exposed_dict(state: &AppState, s: &Service, board: &Board, public_port: i64) -> Result<Value, Error> {
    let mut d = service_dict(s);
    if let Some(t) = state.tunnels.as_ref().filter(|_| !runs_original_lr(board)) {
        let port = u16::try_from(public_port).map_err(|_| Error::Invalid(format!("bad public port {public_port}")))?;
        d["tunnel_url"] = json!(t.url_for(board));
        d["tunnel_token"] = json!(t.mint(&board.uuid, port, None, board.tokens_after)?);
    }
    Ok(d)
}

pub async fn exposed(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    let b = visible_board(&state, &c, &ident).await?;
    let ex = state.db.exposures_of_board(&b.uuid).await?;
    Ok(Json(json!({"exposed": ex.iter().map(exposure_json).collect::<Vec<_>>()})))
}

pub async fn restore_services(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    let b = visible_board(&state, &c, &ident).await?;
    let ex = state.db.exposures_of_board(&b.uuid).await?;
    for e in &ex {
        if let Some(s) = state.db.service(&e.service, None).await? {
            let args = json!([exposed_dict(&state, &s, &b, e.public_port)?, e.public_port]);
            call_board(&state, &c, &b, "ServiceRestore", args, CallOpts::default()).await?;
        }
    }
    Ok(Json(json!({"exposed": ex.iter().map(exposure_json).collect::<Vec<_>>()})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceActionBody {
    action: String,
    /// ServiceEnable only: the sources (CIDRs) that may connect to the public port.
    #[serde(default)]
    allow: Option<Vec<String>>,
}

pub async fn service_action(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((ident, service)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    Body(a): Body<ServiceActionBody>,
) -> ApiResult<Response> {
    let b = visible_board(&state, &c, &ident).await?;
    let s = state
        .db
        .service(&service, Some(&b.project))
        .await?
        .ok_or_else(|| Error::NotFound(format!("service {service} not found")))?;
    let lease = check_lease(&state, &c, &b.uuid).await?;
    let opts = CallOpts::from_query(&q)?;
    if a.allow.is_some() && a.action != "ServiceEnable" {
        return Err(Error::Invalid(format!(
            "allow applies to ServiceEnable only (to change it, ServiceDisable then ServiceEnable), not to {:?}",
            a.action
        ))
        .into());
    }
    match a.action.as_str() {
        "ServiceEnable" => {
            let allow = crate::db::parse_allow_list(a.allow.as_deref().unwrap_or_default())?;
            // One tenant may not take the whole public pool (queued enables on offline boards
            // hold their ports for as long as they wait). Counted in the allocation's own
            // transaction: concurrent enables cannot all pass the check and then all insert.
            let refusal = |held| {
                Error::Conflict(format!(
                    "project {} holds {held} public ports, its most (--ports-per-project): disable a service first",
                    c.project_name
                ))
            };
            let quota = (!c.is_admin).then(|| crate::db::PortQuota {
                project: &c.project,
                max: i64::from(state.ports_per_project),
                refusal: &refusal,
            });
            let e = state
                .db
                .allocate_exposure_within(&b.uuid, &s.uuid, PUBLIC_PORTS, lease.as_deref(), &allow, quota)
                .await?;
            let args = json!([exposed_dict(&state, &s, &b, e.public_port)?, e.public_port]);
            match call_board(&state, &c, &b, "ServiceEnable", args, opts).await {
                Ok(Outcome::Done(_)) | Ok(Outcome::Accepted(_)) => {
                    Ok((StatusCode::CREATED, Json(exposure_json(&e))).into_response())
                }
                Err(err) => {
                    // This allocation, as read: an enable that came in meanwhile keeps its own.
                    state.db.delete_exposure_as_read(&e).await?;
                    Err(err.into())
                }
            }
        }
        "ServiceDisable" => {
            let e = state
                .db
                .exposure(&b.uuid, &s.uuid)
                .await?
                .ok_or_else(|| Error::Conflict(format!("service {} is not exposed on {}", s.name, b.name)))?;
            let outcome = call_board(&state, &c, &b, "ServiceDisable", json!([service_dict(&s)]), opts).await;
            // The port is freed even if the board is unreachable: it forgets the tunnel on
            // its next login (the cloud restores only what is in the database).
            state.db.delete_exposure(&b.uuid, &s.uuid).await?;
            if let Err(err) = outcome
                && !matches!(err, Error::Unavailable(_))
            {
                return Err(err.into());
            }
            Ok(Json(exposure_json(&e)).into_response())
        }
        "ServiceRestore" => {
            let e = state
                .db
                .exposure(&b.uuid, &s.uuid)
                .await?
                .ok_or_else(|| Error::Conflict(format!("service {} is not exposed on {}", s.name, b.name)))?;
            let args = json!([exposed_dict(&state, &s, &b, e.public_port)?, e.public_port]);
            call_board(&state, &c, &b, "ServiceRestore", args, opts).await?;
            Ok(Json(exposure_json(&e)).into_response())
        }
        other => Err(Error::Invalid(format!(
            "unknown service action {other:?}: use ServiceEnable, ServiceDisable or ServiceRestore"
        ))
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(lr_version: Option<&str>, secret: bool, status: &str, url: &str) -> Board {
        Board {
            uuid: "u".into(),
            name: "n".into(),
            code: None,
            status: status.into(),
            board_type: "generic".into(),
            agent: Some("agent".into()),
            owner: "o".into(),
            project: "p".into(),
            fleet: None,
            lr_version: lr_version.map(str::to_owned),
            connectivity: json!({}),
            mobile: false,
            config: json!({"iotronic": {"wamp": {"main-agent": {"url": url, "realm": "s4t"}}}}),
            extra: json!({}),
            latitude: None,
            longitude: None,
            altitude: None,
            session: None,
            last_seen: None,
            secret_salt: secret.then(|| "salt$1000$32".into()),
            secret_key: secret.then(|| "k".into()),
            tokens_after: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    /// The registration code enrolls a device as the board: a project user sees it neither
    /// as `code` nor inside the config document a legacy enrollment stored; a manager does.
    #[test]
    fn only_managers_see_a_boards_code_wherever_it_is() {
        let mut b = board(Some("0.5.0"), false, "online", "ws://cloud:8181/");
        b.code = Some("SECRET".into());
        b.config["iotronic"]["board"] = json!({"uuid": "u", "code": "SECRET"});
        let caller = |role| Caller {
            user: "x".into(),
            user_name: "x".into(),
            project: "p".into(),
            project_name: "p".into(),
            role,
            is_admin: false,
        };
        let shown = board_json_for(&b, &caller(Role::Manager));
        assert_eq!(
            (&shown["code"], &shown["config"]["iotronic"]["board"]["code"]),
            (&json!("SECRET"), &json!("SECRET"))
        );
        let hidden = board_json_for(&b, &caller(Role::User));
        assert!(!hidden.to_string().contains("SECRET"), "{hidden}");
        assert_eq!(hidden["config"]["iotronic"]["board"]["uuid"], "u");
    }

    #[test]
    fn legacy_boards_are_marked_and_get_the_original_shapes() {
        let original = board(Some("0.5.0"), false, "online", "wss://cloud.example:8181/");
        let ours_migrated = board(Some("0.5.0+rs.0.1.0"), false, "online", "ws://10.0.0.1:8181/");
        let ours = board(Some("0.5.0+rs.0.1.0"), true, "online", "ws://[2001:db8::1]:8181/");
        let fresh = board(None, false, "registered", "");
        assert_eq!(
            [&original, &ours_migrated, &ours, &fresh].map(|b| (is_legacy(b), runs_original_lr(b))),
            [(true, true), (true, false), (false, false), (false, false)]
        );
        let j = board_json(&original);
        assert_eq!(
            (&j["legacy"], &j["wstun_ip"], &j["lr_version"]),
            (&json!(true), &json!("cloud.example"), &json!("0.5.0"))
        );
        assert_eq!(board_json(&ours_migrated)["wstun_ip"], "10.0.0.1");
        assert_eq!(board_json(&ours)["wstun_ip"], "2001:db8::1");
        assert_eq!(board_json(&fresh)["wstun_ip"], Value::Null);
        assert_eq!(wstun_ip(&board(None, false, "online", "cloud:8181")), Value::Null);
    }

    #[test]
    fn i2c_addresses_parse() {
        assert_eq!(i2c_address("72").unwrap(), 72);
        assert_eq!(i2c_address("0x48").unwrap(), 0x48);
        for bad in ["0x80", "-1", "x", "", "128"] {
            assert!(i2c_address(bad).is_err(), "{bad}");
        }
    }
}
