//! Services, fleets, leases, VPNs and requests.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::check_name;
use super::boards::{board_json_for, visible_board};
use super::bounds;
use super::calls::{CallOpts, call_board, check_lease, message_value, request_json};
use super::error::{ApiResult, Body};
use super::paging::{self, list_json, unknown_marker};
use super::{AppState, Caller};
use crate::Error;
use crate::conductor::Conductor;
use crate::db::{Fleet, Lease, Role, Service, ServiceUpdate, Vpn, VpnMember, now_ms};

fn created(v: Value) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

fn service_json(s: &Service) -> Value {
    json!({"uuid": s.uuid, "name": s.name, "project": s.project, "port": s.port, "protocol": s.protocol,
           "extra": s.extra, "created_at": s.created_at / 1000, "updated_at": s.updated_at / 1000,
           "links": [{"href": format!("/v1/services/{}", s.uuid), "rel": "self"}]})
}

async fn visible_service(state: &AppState, c: &Caller, ident: &str) -> Result<Service, Error> {
    state.db.service(ident, c.scope()).await?.ok_or_else(|| Error::NotFound(format!("service {ident} not found")))
}

/// Sort keys of the service list (`id`, the original's default, is the creation order).
const SERVICE_KEYS: &[(&str, &str)] = &[
    ("id", "created_at"),
    ("created_at", "created_at"),
    ("updated_at", "updated_at"),
    ("name", "name"),
    ("uuid", "uuid"),
    ("port", "port"),
];

/// One page of the services the caller may see ([`paging`]).
pub async fn list_services(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    let mut page = paging::page(&q, SERVICE_KEYS)?;
    if let Some(m) = &page.marker {
        let s = state.db.service(m, c.scope()).await?;
        page.marker = Some(s.ok_or_else(|| unknown_marker(m, "service"))?.uuid);
    }
    let s = state.db.list_services_page(c.scope(), &page).await?;
    let next = paging::next(uri.path(), &q, &page, s.len(), s.last().map(|x| x.uuid.as_str()));
    Ok(Json(list_json("services", s.iter().map(service_json).collect(), next)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceBody {
    name: String,
    port: u16,
    #[serde(default = "tcp")]
    protocol: String,
    #[serde(default, deserialize_with = "bounds::small")]
    extra: Option<Value>,
}

fn tcp() -> String {
    "TCP".into()
}

fn check_protocol(p: &str) -> Result<(), Error> {
    if ["TCP", "UDP"].contains(&p) { Ok(()) } else { Err(Error::Invalid(format!("protocol {p:?}: use TCP or UDP"))) }
}

pub async fn create_service(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Body(b): Body<ServiceBody>,
) -> ApiResult<Response> {
    c.require(Role::Manager, "creating services")?;
    check_name(&b.name, "service name")?;
    check_protocol(&b.protocol)?;
    if b.port == 0 {
        return Err(Error::Invalid("port must be 1-65535".into()).into());
    }
    let extra = b.extra.unwrap_or_else(|| json!({}));
    let s = state.db.create_service(&b.name, &c.project, i64::from(b.port), &b.protocol, &extra).await?;
    Ok(created(service_json(&s)))
}

pub async fn show_service(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(service_json(&visible_service(&state, &c, &ident).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePatch {
    name: Option<String>,
    port: Option<u16>,
    protocol: Option<String>,
    #[serde(default, deserialize_with = "bounds::small")]
    extra: Option<Value>,
}

pub async fn update_service(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Body(p): Body<ServicePatch>,
) -> ApiResult<Json<Value>> {
    c.require(Role::Manager, "changing services")?;
    let s = visible_service(&state, &c, &ident).await?;
    if let Some(n) = &p.name {
        check_name(n, "service name")?;
    }
    if p.port == Some(0) {
        return Err(Error::Invalid("port must be 1-65535".into()).into());
    }
    if let Some(proto) = &p.protocol {
        check_protocol(proto)?;
    }
    let u = ServiceUpdate { name: p.name, port: p.port.map(i64::from), protocol: p.protocol, extra: p.extra };
    state.db.update_service(&s.uuid, u).await?;
    Ok(Json(service_json(&visible_service(&state, &c, &s.uuid).await?)))
}

pub async fn delete_service(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Role::Manager, "deleting services")?;
    let s = visible_service(&state, &c, &ident).await?;
    state.db.delete_service(&s.uuid).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn fleet_json(f: &Fleet) -> Value {
    json!({"uuid": f.uuid, "name": f.name, "project": f.project, "description": f.description, "extra": f.extra,
           "created_at": f.created_at / 1000, "updated_at": f.updated_at / 1000,
           "links": [{"href": format!("/v1/fleets/{}", f.uuid), "rel": "self"}]})
}

async fn visible_fleet(state: &AppState, c: &Caller, ident: &str) -> Result<Fleet, Error> {
    state.db.fleet(ident, c.scope()).await?.ok_or_else(|| Error::NotFound(format!("fleet {ident} not found")))
}

/// Sort keys of the fleet list.
const FLEET_KEYS: &[(&str, &str)] = &[
    ("id", "created_at"),
    ("created_at", "created_at"),
    ("updated_at", "updated_at"),
    ("name", "name"),
    ("uuid", "uuid"),
];

/// One page of the fleets the caller may see ([`paging`]).
pub async fn list_fleets(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    let mut page = paging::page(&q, FLEET_KEYS)?;
    if let Some(m) = &page.marker {
        let f = state.db.fleet(m, c.scope()).await?;
        page.marker = Some(f.ok_or_else(|| unknown_marker(m, "fleet"))?.uuid);
    }
    let f = state.db.list_fleets_page(c.scope(), &page).await?;
    let next = paging::next(uri.path(), &q, &page, f.len(), f.last().map(|x| x.uuid.as_str()));
    Ok(Json(list_json("fleets", f.iter().map(fleet_json).collect(), next)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetBody {
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, deserialize_with = "bounds::small")]
    extra: Option<Value>,
}

pub async fn create_fleet(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Body(b): Body<FleetBody>,
) -> ApiResult<Response> {
    c.require(Role::Manager, "creating fleets")?;
    let name = b.name.ok_or_else(|| Error::Invalid("a fleet needs a name".into()))?;
    check_name(&name, "fleet name")?;
    bounds::check_text(b.description.as_deref().unwrap_or(""), "a fleet's description")?;
    let extra = b.extra.unwrap_or_else(|| json!({}));
    let f = state.db.create_fleet(&name, &c.project, b.description.as_deref().unwrap_or(""), &extra).await?;
    Ok(created(fleet_json(&f)))
}

pub async fn show_fleet(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(fleet_json(&visible_fleet(&state, &c, &ident).await?)))
}

pub async fn update_fleet(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Body(b): Body<FleetBody>,
) -> ApiResult<Json<Value>> {
    c.require(Role::Manager, "changing fleets")?;
    let f = visible_fleet(&state, &c, &ident).await?;
    if let Some(n) = &b.name {
        check_name(n, "fleet name")?;
    }
    bounds::check_text(b.description.as_deref().unwrap_or(""), "a fleet's description")?;
    state.db.update_fleet(&f.uuid, b.name.as_deref(), b.description.as_deref(), b.extra.as_ref()).await?;
    Ok(Json(fleet_json(&visible_fleet(&state, &c, &f.uuid).await?)))
}

pub async fn delete_fleet(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Role::Manager, "deleting fleets")?;
    let f = visible_fleet(&state, &c, &ident).await?;
    state.db.delete_fleet(&f.uuid).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One page of a fleet's boards ([`paging`], the board list's sort keys; the marker is any
/// board the caller may see).
pub async fn fleet_boards(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let f = visible_fleet(&state, &c, &ident).await?;
    let mut page = paging::page(&q, super::boards::SORT_KEYS)?;
    if let Some(m) = &page.marker {
        page.marker = Some(state.db.board(m, c.scope()).await?.ok_or_else(|| unknown_marker(m, "board"))?.uuid);
    }
    let boards = state.db.fleet_boards_page(c.scope(), &f.uuid, &page).await?;
    let path = format!("/v1/fleets/{}/boards", f.uuid);
    let next = paging::next(&path, &q, &page, boards.len(), boards.last().map(|b| b.uuid.as_str()));
    Ok(Json(list_json("boards", boards.iter().map(|b| board_json_for(b, &c)).collect(), next)))
}

fn lease_json(l: &Lease) -> Value {
    json!({"uuid": l.uuid, "project": l.project, "owner": l.owner, "status": l.status, "boards": l.boards,
           "expires_at": l.expires_at / 1000, "created_at": l.created_at / 1000, "updated_at": l.updated_at / 1000,
           "links": [{"href": format!("/v1/leases/{}", l.uuid), "rel": "self"}]})
}

/// Longest lease: 30 days.
const MAX_LEASE_S: i64 = 30 * 24 * 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseBody {
    #[serde(default)]
    boards: Vec<String>,
    /// Seconds from now.
    duration: Option<i64>,
    /// Seconds since the epoch.
    until: Option<i64>,
}

fn lease_expiry(b: &LeaseBody) -> Result<i64, Error> {
    let now = now_ms();
    let range = || Error::Invalid(format!("a lease lasts from 1 s to {MAX_LEASE_S} s, starting now"));
    let until = match (b.duration, b.until) {
        (Some(d), None) if d > 0 && d <= MAX_LEASE_S => now + d * 1000,
        // Any i64 may come in: multiplied only where it cannot overflow.
        (None, Some(u)) => {
            u.checked_mul(1000).filter(|ms| *ms > now && *ms - now <= MAX_LEASE_S * 1000).ok_or_else(range)?
        }
        (Some(_), Some(_)) => return Err(Error::Invalid("give duration or until, not both".into())),
        (None, None) => return Err(Error::Invalid("give duration (seconds) or until (epoch seconds)".into())),
        (Some(_), None) => return Err(range()),
    };
    Ok(until)
}

/// Sort keys of the lease list.
const LEASE_KEYS: &[(&str, &str)] = &[
    ("id", "created_at"),
    ("created_at", "created_at"),
    ("updated_at", "updated_at"),
    ("expires_at", "expires_at"),
    ("status", "status"),
    ("uuid", "uuid"),
];

/// One page of the leases the caller may see ([`paging`]), `?status=active` for the active ones.
pub async fn list_leases(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    let active = q.get("status").is_some_and(|s| s == "active");
    let mut page = paging::page(&q, LEASE_KEYS)?;
    if let Some(m) = &page.marker {
        let l = state.db.lease(m, c.scope()).await?;
        page.marker = Some(l.ok_or_else(|| unknown_marker(m, "lease"))?.uuid);
    }
    let l = state.db.list_leases_page(c.scope(), active, &page).await?;
    let next = paging::next(uri.path(), &q, &page, l.len(), l.last().map(|x| x.uuid.as_str()));
    Ok(Json(list_json("leases", l.iter().map(lease_json).collect(), next)))
}

pub async fn create_lease(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Body(b): Body<LeaseBody>,
) -> ApiResult<Response> {
    let until = lease_expiry(&b)?;
    if b.boards.is_empty() || b.boards.len() > 1000 {
        return Err(Error::Invalid("a lease books 1 to 1000 boards".into()).into());
    }
    let mut uuids = Vec::with_capacity(b.boards.len());
    for ident in &b.boards {
        let uuid = visible_board(&state, &c, ident).await?.uuid;
        if uuids.contains(&uuid) {
            return Err(Error::Invalid(format!("board {ident} is named twice in the lease")).into());
        }
        uuids.push(uuid);
    }
    // Leases past their expiry free their boards first (and tear down what they held).
    Conductor::new(state.db.clone(), state.bus.clone()).expire_leases().await?;
    let l = state.db.create_lease(&c.project, &c.user, &uuids, until).await?;
    Ok(created(lease_json(&l)))
}

async fn visible_lease(state: &AppState, c: &Caller, ident: &str) -> Result<Lease, Error> {
    state.db.lease(ident, c.scope()).await?.ok_or_else(|| Error::NotFound(format!("lease {ident} not found")))
}

pub async fn show_lease(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(lease_json(&visible_lease(&state, &c, &ident).await?)))
}

pub async fn extend_lease(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Body(b): Body<LeaseBody>,
) -> ApiResult<Json<Value>> {
    let l = visible_lease(&state, &c, &ident).await?;
    let until = lease_expiry(&b)?;
    if !state.db.extend_lease(&l.uuid, until).await? {
        return Err(Error::Conflict(format!("lease {} has ended ({})", l.uuid, l.status)).into());
    }
    Ok(Json(lease_json(&visible_lease(&state, &c, &l.uuid).await?)))
}

pub async fn release_lease(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<StatusCode> {
    let l = visible_lease(&state, &c, &ident).await?;
    if state.db.end_lease(&l.uuid, "released").await? {
        Conductor::new(state.db.clone(), state.bus.clone()).teardown_lease(&l).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

fn vpn_json(v: &Vpn) -> Value {
    let cloud = if v.cloud_address { crate::db::cloud_host(&v.cidr).ok().map(|a| a.to_string()) } else { None };
    json!({"uuid": v.uuid, "name": v.name, "project": v.project, "type": v.vpn_type, "cidr": v.cidr,
           "cloud_address": cloud,
           "created_at": v.created_at / 1000, "links": [{"href": format!("/v1/vpns/{}", v.uuid), "rel": "self"}]})
}

fn member_json(m: &VpnMember) -> Value {
    json!({"vpn": m.vpn, "board": m.board, "address": m.address, "interface": m.interface, "lease": m.lease})
}

async fn visible_vpn(state: &AppState, c: &Caller, ident: &str) -> Result<Vpn, Error> {
    state.db.vpn(ident, c.scope()).await?.ok_or_else(|| Error::NotFound(format!("VPN {ident} not found")))
}

/// Sort keys of the VPN list.
const VPN_KEYS: &[(&str, &str)] =
    &[("id", "created_at"), ("created_at", "created_at"), ("name", "name"), ("uuid", "uuid")];

/// One page of the VPNs the caller may see ([`paging`]).
pub async fn list_vpns(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    let mut page = paging::page(&q, VPN_KEYS)?;
    if let Some(m) = &page.marker {
        let v = state.db.vpn(m, c.scope()).await?;
        page.marker = Some(v.ok_or_else(|| unknown_marker(m, "VPN"))?.uuid);
    }
    let v = state.db.list_vpns_page(c.scope(), &page).await?;
    let next = paging::next(uri.path(), &q, &page, v.len(), v.last().map(|x| x.uuid.as_str()));
    Ok(Json(list_json("vpns", v.iter().map(vpn_json).collect(), next)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpnBody {
    name: String,
    #[serde(rename = "type", default = "l2")]
    vpn_type: String,
    cidr: String,
    /// The cloud host takes the first host address (on the bridge, or on every L3 TUN).
    #[serde(default)]
    cloud_address: bool,
}

fn l2() -> String {
    "l2".into()
}

pub async fn create_vpn(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Body(b): Body<VpnBody>,
) -> ApiResult<Response> {
    c.require(Role::Manager, "creating VPNs")?;
    check_name(&b.name, "VPN name")?;
    if b.vpn_type != "l2" && b.vpn_type != "l3" {
        return Err(Error::Invalid(format!("type {:?}: use l2 or l3", b.vpn_type)).into());
    }
    if !crate::db::cidr_within_any(&b.cidr, &state.vpn_ranges)? {
        return Err(Error::Invalid(format!(
            "{}: a VPN range must lie within {} (the ranges this cloud gives VPNs)",
            b.cidr,
            state.vpn_ranges.join(", ")
        ))
        .into());
    }
    // One transaction: a range that would clash with another VPN's on the cloud host (the
    // cloud address, L3 routes) is refused with 409 before anything exists.
    let v = state.db.create_vpn_with(&b.name, &c.project, &b.vpn_type, &b.cidr, b.cloud_address).await?;
    Ok(created(vpn_json(&v)))
}

pub async fn show_vpn(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(vpn_json(&visible_vpn(&state, &c, &ident).await?)))
}

pub async fn delete_vpn(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Role::Manager, "deleting VPNs")?;
    let v = visible_vpn(&state, &c, &ident).await?;
    // The rows go first, whatever the boards say: a delete half done (some members told,
    // one refusing or unreachable) would leave a VPN nobody can finish deleting. The
    // wstun-agent then removes the cloud's devices and the bridge; members are told now, and
    // one that cannot be forgets the membership at its next login (the token renewal's list
    // lacks it) and has its packet channel refused meanwhile.
    let members = state.db.vpn_members(&v.uuid).await?;
    state.db.delete_vpn(&v.uuid).await?;
    for m in members {
        if let Some(board) = state.db.board_by_uuid(&m.board).await?
            && let Err(e) = leave(&state, &c, &board, &v).await
        {
            tracing::warn!(vpn = %v.uuid, board = %board.uuid, cause = %e, "a member of a deleted VPN was not told");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Sort keys of a VPN's members (by address, as before paging).
const MEMBER_KEYS: &[(&str, &str)] = &[("address", "address"), ("board", "board_uuid"), ("created_at", "created_at")];

/// One page of a VPN's members ([`paging`]); the marker is a member board (uuid or name).
pub async fn vpn_members(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let v = visible_vpn(&state, &c, &ident).await?;
    let mut page = paging::page(&q, MEMBER_KEYS)?;
    if let Some(m) = &page.marker {
        let member = match state.db.board(m, c.scope()).await? {
            Some(b) => state.db.vpn_member(&v.uuid, &b.uuid).await?,
            None => None,
        };
        page.marker = Some(member.ok_or_else(|| unknown_marker(m, "member"))?.board);
    }
    let m = state.db.vpn_members_page(&v.uuid, &page).await?;
    let path = format!("/v1/vpns/{}/boards", v.uuid);
    let next = paging::next(&path, &q, &page, m.len(), m.last().map(|x| x.board.as_str()));
    Ok(Json(list_json("members", m.iter().map(member_json).collect(), next)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    board: String,
    #[serde(default)]
    address: Option<String>,
}

pub async fn add_vpn_member(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
    Body(b): Body<MemberBody>,
) -> ApiResult<Response> {
    let v = visible_vpn(&state, &c, &ident).await?;
    let board = visible_board(&state, &c, &b.board).await?;
    let lease = check_lease(&state, &c, &board.uuid).await?;
    let m = state.db.add_vpn_member(&v, &board.uuid, b.address.as_deref(), lease.as_deref()).await?;
    // The board creates its interface and opens the packet channel; the wstun-agent creates
    // the cloud's end when that channel arrives. A board that cannot join leaves no row.
    let mut join = json!({"vpn": v.uuid, "type": v.vpn_type, "address": m.address,
                          "prefix_len": crate::db::parse_cidr(&v.cidr)?.1, "interface": m.interface});
    if let Some(t) = &state.tunnels {
        join["tunnel_url"] = json!(t.url_for(&board));
        join["token"] = json!(t.mint(&board.uuid, 0, Some(&v.uuid), board.tokens_after)?);
    }
    if let Err(e) = call_board(&state, &c, &board, "VpnJoin", json!([join]), CallOpts::default()).await {
        // This membership, as read: a join that came in meanwhile keeps its own.
        state.db.remove_vpn_member_as_read(&m).await?;
        return Err(e.into());
    }
    Ok(created(member_json(&m)))
}

/// Tells `board` to leave `v`; an offline board is not an error (it is refused at its next
/// attempt to open the packet channel).
async fn leave(state: &AppState, c: &Caller, board: &crate::db::Board, v: &Vpn) -> Result<(), Error> {
    match call_board(state, c, board, "VpnLeave", json!([{"vpn": v.uuid}]), CallOpts::default()).await {
        Ok(_) | Err(Error::Unavailable(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

pub async fn remove_vpn_member(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((ident, board)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let v = visible_vpn(&state, &c, &ident).await?;
    let board = visible_board(&state, &c, &board).await?;
    check_lease(&state, &c, &board.uuid).await?;
    if state.db.vpn_member(&v.uuid, &board.uuid).await?.is_none() {
        return Err(Error::NotFound(format!("board {} is not in VPN {}", board.name, v.name)).into());
    }
    // The row goes first, whatever the board says (as in `delete_vpn`): it is what the data
    // plane and the token renewal go by, and a board answering `VpnLeave` with an error (a
    // hostile one, or one that cannot save its state) kept itself in the VPN.
    state.db.remove_vpn_member(&v.uuid, &board.uuid).await?;
    if let Err(e) = leave(&state, &c, &board, &v).await {
        tracing::warn!(vpn = %v.uuid, board = %board.uuid, cause = %e, "a board removed from a VPN was not told");
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_requests(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    let board = match q.get("board") {
        Some(b) => Some(visible_board(&state, &c, b).await?.uuid),
        None => None,
    };
    const KEYS: &[(&str, &str)] =
        &[("created_at", "created_at"), ("id", "created_at"), ("updated_at", "updated_at"), ("status", "status")];
    let mut page = super::paging::page(&q, KEYS)?;
    if let Some(m) = &page.marker {
        let r = state.db.request(m, c.scope()).await?;
        page.marker = Some(r.ok_or_else(|| Error::Invalid(format!("?marker={m}: no such request")))?.uuid);
    }
    let r = state.db.list_requests_page(c.scope(), board.as_deref(), &page).await?;
    let next = super::paging::next(uri.path(), &q, &page, r.len(), r.last().map(|x| x.uuid.as_str()));
    let mut out = json!({"requests": r.iter().map(request_json).collect::<Vec<_>>()});
    if let Some(n) = next {
        out["next"] = json!(n);
    }
    Ok(Json(out))
}

pub async fn show_request(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    let r = state
        .db
        .request(&ident, c.scope())
        .await?
        .ok_or_else(|| Error::NotFound(format!("request {ident} not found")))?;
    Ok(Json(request_json(&r)))
}

pub async fn request_results(
    State(state): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(ident): Path<String>,
) -> ApiResult<Json<Value>> {
    let r = state
        .db
        .request(&ident, c.scope())
        .await?
        .ok_or_else(|| Error::NotFound(format!("request {ident} not found")))?;
    let results: Vec<Value> = state
        .db
        .results(&r.uuid)
        .await?
        .iter()
        .map(|x| {
            json!({"request_uuid": x.request, "board_uuid": x.board, "result": x.result,
                   "message": message_value(&x.message), "created_at": x.created_at / 1000, "updated_at": x.updated_at / 1000})
        })
        .collect();
    Ok(Json(json!({"results": results})))
}
