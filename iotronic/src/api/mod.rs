//! REST API v1.
//!
//! Paths, collection keys and headers follow the original IoTronic v1 API
//! (S4T-REFERENCE §3): responses carry `X-OpenStack-Iotronic-API-Minimum-Version` and
//! `-Maximum-Version`, and a request for an unsupported version gets 406. Additions: auth,
//! projects and users, leases, VPNs, GPIO/I2C, queued commands, `/v1/openapi.json`, `/metrics`.
//!
//! # Layout
//! - [`error`]: the one error shape and the status of every error.
//! - `auth`: tokens, projects, users; the `Caller` every handler acts for.
//! - `boards`: boards, board actions, GPIO/I2C, services on boards.
//! - `objects`: services, fleets, VPNs, leases, requests.
//! - `plugins`: plugins (code, kinds, grants), injections into boards and plugin actions.
//! - `calls`: how a REST call becomes a request, waits for it or returns 202.
//! - `schemas`: the request-body schemas of the OpenAPI document.
//! - `metrics`: Prometheus text.
//!
//! The route table below is the single source of both the router and the OpenAPI document.

mod auth;
mod boards;
pub(crate) mod bounds;
mod calls;
pub mod error;
mod metrics;
mod objects;
mod paging;
mod plugins;
mod schemas;
mod security;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use axum::{Json, Router};
use serde_json::{Value, json};
use tracing::{Instrument, info_span};

pub use auth::Caller;
/// Board actions `POST /v1/boards/{b}/action` accepts (the `s4t` CLI offers them).
pub use boards::ACTIONS as BOARD_ACTIONS;
pub use metrics::Metrics;

use crate::bus::Bus;
use crate::db::Db;

pub const API_VERSION: &str = "1.0";
const VERSION_HEADER: &str = "x-openstack-iotronic-api-version";
const MIN_VERSION_HEADER: &str = "x-openstack-iotronic-api-minimum-version";
const MAX_VERSION_HEADER: &str = "x-openstack-iotronic-api-maximum-version";
const REQUEST_ID_HEADER: &str = "x-openstack-request-id";

/// Everything a handler needs; cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub db: Db,
    pub bus: Bus,
    pub metrics: Arc<Metrics>,
    /// How long a synchronous board call waits before answering 202 with its request.
    pub call_timeout: Duration,
    /// Tunnel tokens for services exposed on boards (`None`: boards get no token).
    pub tunnels: Option<crate::wstun_agent::TunnelMint>,
    /// Wrong passwords per user name and per peer address.
    pub login_throttle: Arc<crate::auth::LoginThrottle>,
    /// The ranges VPNs must lie in ([`crate::config::DEFAULT_VPN_RANGES`] unless configured).
    pub vpn_ranges: Arc<Vec<String>>,
    /// Public ports one project may hold ([`crate::config::DEFAULT_PORTS_PER_PROJECT`]).
    pub ports_per_project: u32,
    /// Boards refused per project because their name or code is taken ([`board_conflicts`]).
    pub board_conflicts: Arc<crate::auth::Throttle>,
}

/// Registration codes are unique across the cloud, so a refused `POST /v1/boards` tells that
/// some board, perhaps another project's, still waits to enroll with that code: without a
/// bound, a manager could test codes there far faster than the agent lets anyone guess them
/// (its enrollment throttle). The same bound, per project: 20 refusals, then 2 per second;
/// boards that are created do not count.
pub fn board_conflicts() -> crate::auth::Throttle {
    crate::auth::enrollment_throttle()
}

impl AppState {
    pub fn new(db: Db, bus: Bus) -> Self {
        AppState {
            db,
            bus,
            metrics: Arc::new(Metrics::default()),
            call_timeout: Duration::from_secs(30),
            tunnels: None,
            login_throttle: Arc::default(),
            vpn_ranges: Arc::new(crate::config::DEFAULT_VPN_RANGES.iter().map(|s| (*s).to_owned()).collect()),
            ports_per_project: crate::config::DEFAULT_PORTS_PER_PROJECT,
            board_conflicts: Arc::new(board_conflicts()),
        }
    }
}

macro_rules! route_table {
    ($( $method:ident $path:literal => $handler:path, $tag:literal, $summary:literal; )*) => {
        fn add_routes(router: Router<AppState>) -> Router<AppState> {
            $( let router = router.route($path, $method($handler)); )*
            router
        }

        /// (method, path, tag, summary) of every route, for the OpenAPI document.
        pub const ROUTES: &[(&str, &str, &str, &str)] = &[ $( (stringify!($method), $path, $tag, $summary), )* ];
    };
}

route_table! {
    get "/" => root, "meta", "Version document (public)";
    get "/v1" => v1, "meta", "API v1 document (public)";
    get "/v1/openapi.json" => openapi, "meta", "This OpenAPI document (public)";
    post "/v1/auth/tokens" => auth::create_token, "auth", "Issue a bearer token for a user and project (public)";
    get "/v1/auth/tokens" => auth::show_token, "auth", "Whom this token belongs to: {user, project, role, admin, expires_at}";
    get "/v1/projects" => auth::list_projects, "auth", "List projects (admin: all; others: their own)";
    post "/v1/projects" => auth::create_project, "auth", "Create a project (admin)";
    get "/v1/users" => auth::list_users, "auth", "List users of the caller's project (admin: all)";
    post "/v1/users" => auth::create_user, "auth", "Create a user with a role in a project (admin)";
    get "/v1/boards" => boards::list, "boards", "List boards of the caller's project";
    get "/v1/boards/detail" => boards::list_detail, "boards", "List boards with every field";
    post "/v1/boards" => boards::create, "boards", "Create a board with its registration code";
    get "/v1/boards/{board}" => boards::show, "boards", "Show a board (uuid or name)";
    patch "/v1/boards/{board}" => boards::update, "boards", "Update a board (partial object)";
    delete "/v1/boards/{board}" => boards::destroy, "boards", "Delete a board";
    post "/v1/boards/{board}/action" => boards::action, "boards", "Run a board action (?async=true, ?queue=true)";
    get "/v1/boards/{board}/gpio" => boards::gpio_list, "gpio", "List GPIO lines";
    get "/v1/boards/{board}/gpio/{line}" => boards::gpio_read, "gpio", "Read a GPIO line";
    put "/v1/boards/{board}/gpio/{line}" => boards::gpio_write, "gpio", "Write a GPIO line";
    post "/v1/boards/{board}/i2c/{bus}/{addr}/read" => boards::i2c_read, "i2c", "Read bytes from an I2C device";
    post "/v1/boards/{board}/i2c/{bus}/{addr}/write" => boards::i2c_write, "i2c", "Write bytes to an I2C device";
    get "/v1/boards/{board}/services" => boards::exposed, "services", "Services exposed on a board";
    get "/v1/boards/{board}/services/restore" => boards::restore_services, "services", "Restore every exposed service";
    post "/v1/boards/{board}/services/{service}/action" => boards::service_action, "services", "ServiceEnable, ServiceDisable or ServiceRestore";
    get "/v1/boards/{board}/plugins" => plugins::injections, "plugins", "Plugins injected on a board";
    put "/v1/boards/{board}/plugins" => plugins::inject, "plugins", "Inject a plugin into a board {plugin, onboot[, grants]}";
    get "/v1/boards/{board}/plugins/{plugin}" => plugins::injection, "plugins", "One plugin injected on a board";
    post "/v1/boards/{board}/plugins/{plugin}" => plugins::action, "plugins", "PluginCall, PluginStart, PluginStop, PluginStatus or PluginReboot";
    delete "/v1/boards/{board}/plugins/{plugin}" => plugins::remove, "plugins", "Remove a plugin from a board";
    get "/v1/services" => objects::list_services, "services", "List services";
    get "/v1/services/detail" => objects::list_services, "services", "List services (as the original's /detail: every field)";
    post "/v1/services" => objects::create_service, "services", "Create a service";
    get "/v1/services/{service}" => objects::show_service, "services", "Show a service";
    patch "/v1/services/{service}" => objects::update_service, "services", "Update a service";
    delete "/v1/services/{service}" => objects::delete_service, "services", "Delete a service";
    get "/v1/fleets" => objects::list_fleets, "fleets", "List fleets";
    get "/v1/fleets/detail" => objects::list_fleets, "fleets", "List fleets (as the original's /detail: every field)";
    post "/v1/fleets" => objects::create_fleet, "fleets", "Create a fleet";
    get "/v1/fleets/{fleet}" => objects::show_fleet, "fleets", "Show a fleet";
    patch "/v1/fleets/{fleet}" => objects::update_fleet, "fleets", "Update a fleet";
    delete "/v1/fleets/{fleet}" => objects::delete_fleet, "fleets", "Delete a fleet";
    get "/v1/fleets/{fleet}/boards" => objects::fleet_boards, "fleets", "Boards in a fleet";
    get "/v1/plugins" => plugins::list, "plugins", "List plugins (?with_public=true)";
    get "/v1/plugins/detail" => plugins::list, "plugins", "List plugins (as the original's /detail: every field)";
    post "/v1/plugins" => plugins::create, "plugins", "Create a plugin with its code (wasm, process or python)";
    get "/v1/plugins/{plugin}" => plugins::show, "plugins", "Show a plugin with its code";
    patch "/v1/plugins/{plugin}" => plugins::update, "plugins", "Update a plugin (partial object)";
    delete "/v1/plugins/{plugin}" => plugins::delete, "plugins", "Delete a plugin injected nowhere";
    get "/v1/leases" => objects::list_leases, "leases", "List leases";
    post "/v1/leases" => objects::create_lease, "leases", "Book boards exclusively until an expiry";
    get "/v1/leases/{lease}" => objects::show_lease, "leases", "Show a lease";
    patch "/v1/leases/{lease}" => objects::extend_lease, "leases", "Extend a lease";
    delete "/v1/leases/{lease}" => objects::release_lease, "leases", "Release a lease";
    get "/v1/vpns" => objects::list_vpns, "vpns", "List VPNs";
    post "/v1/vpns" => objects::create_vpn, "vpns", "Create a VPN";
    get "/v1/vpns/{vpn}" => objects::show_vpn, "vpns", "Show a VPN";
    delete "/v1/vpns/{vpn}" => objects::delete_vpn, "vpns", "Delete a VPN";
    get "/v1/vpns/{vpn}/boards" => objects::vpn_members, "vpns", "Members of a VPN";
    post "/v1/vpns/{vpn}/boards" => objects::add_vpn_member, "vpns", "Add a board to a VPN";
    delete "/v1/vpns/{vpn}/boards/{board}" => objects::remove_vpn_member, "vpns", "Remove a board from a VPN";
    get "/v1/requests" => objects::list_requests, "requests", "List requests";
    get "/v1/requests/detail" => objects::list_requests, "requests", "List requests (as the original's /detail: every field)";
    get "/v1/requests/{request}" => objects::show_request, "requests", "Show a request";
    get "/v1/requests/{request}/results" => objects::request_results, "requests", "Results of a request";
    get "/metrics" => metrics::metrics, "meta", "Prometheus metrics (admin)";
    delete "/v1/auth/tokens" => security::revoke_token, "auth", "Revoke this token (log out), or X-Subject-Token's (admin)";
    delete "/v1/users/{user}/tokens" => security::revoke_user_tokens, "auth", "Revoke every token of a user (admin, or oneself)";
    post "/v1/boards/{board}/revoke" => security::revoke_board, "boards", "Revoke a board's credentials; it is disconnected within seconds";
    post "/v1/boards/{board}/rotate-secret" => security::rotate_secret, "boards", "Replace a board's secret: returns a one-time code to enroll again";
    get "/v1/audit" => security::list_audit, "audit", "The audit log (admin; managers: their project)";
}

/// Paths answered without a token.
fn is_public(method: &axum::http::Method, path: &str) -> bool {
    let path = path.trim_end_matches('/');
    matches!(
        (method.as_str(), path),
        ("GET", "") | ("GET", "/v1") | ("POST", "/v1/auth/tokens") | ("GET", "/v1/openapi.json")
    )
}

/// The router of the REST API.
pub fn router(state: AppState) -> Router {
    add_routes(Router::new())
        .route("/v1/", get(v1))
        .fallback(error::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), security::record_calls))
        .layer(middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(api_version))
        .with_state(state)
}

async fn root() -> Json<Value> {
    Json(json!({
        "name": "OpenStack Iotronic API (Stack4Things in Rust)",
        "description": "IoT boards behind NAT: booking, GPIO/I2C, reverse tunnels, virtual networks.",
        "default_version": version_doc(),
        "versions": [version_doc()],
    }))
}

async fn v1() -> Json<Value> {
    let mut doc = version_doc();
    doc["media_types"] = json!([{"base": "application/json", "type": "application/vnd.openstack.iotronic.v1+json"}]);
    Json(doc)
}

fn version_doc() -> Value {
    json!({
        "id": "v1",
        "status": "CURRENT",
        "min_version": API_VERSION,
        "version": API_VERSION,
        "links": [{"href": "/v1/", "rel": "self"}],
    })
}

/// The OpenAPI 3.1 document, generated from [`ROUTES`].
pub fn openapi_document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, tag, summary) in ROUTES {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let public = is_public(&method.to_uppercase().parse().unwrap_or_default(), path);
        let mut op = json!({
            "summary": summary,
            "tags": [tag],
            "parameters": params,
            "responses": {
                "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "200": {"description": "success"}
            }
        });
        let more: &[&str] = match *method {
            "post" => &["201", "202", "204"],
            "get" | "put" => &["202"],
            "delete" => &["202", "204"],
            _ => &[],
        };
        for code in more {
            let description = match *code {
                "201" => "created",
                "202" => "accepted: a board request still under way (or queued, or ?async=true)",
                _ => "done, nothing to return",
            };
            op["responses"][*code] = json!({"description": description});
        }
        if public {
            op["security"] = json!([]);
        }
        if let Some((schema, required)) = schemas::request_body(method, path) {
            op["requestBody"] = json!({"required": required, "content": {"application/json": {"schema": schema}}});
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Stack4Things iotronic API", "version": API_VERSION},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "token": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"}
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error_message", "code"], "properties": {
                    "error_message": {"type": "string"}, "code": {"type": "integer"},
                    "lease": {"type": "string"}, "board": {"type": "string"},
                    "expires_at": {"type": "integer", "description": "Unix seconds: when the lease ends"},
                    "request": {"type": "string"}}}
            }
        },
        "security": [{"bearer": []}, {"token": []}]
    })
}

async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

/// A request id and tracing span per request; metrics of every answer.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let request_id = format!("req-{}", uuid::Uuid::new_v4());
    let span = info_span!("http", request_id = %request_id, method = %req.method(), path = %req.uri().path());
    let started = Instant::now();
    let mut response = next.run(req).instrument(span).await;
    state.metrics.observe_http(response.status().as_u16(), started.elapsed());
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
    response
}

/// Version negotiation as in the original: only 1.0 exists; a request asking for a version
/// outside [1.0, 1.0] gets 406; "latest" means 1.0. Every response names the range.
async fn api_version(req: Request, next: Next) -> Response {
    let requested = req.headers().get(VERSION_HEADER).and_then(|v| v.to_str().ok()).map(str::trim).map(str::to_owned);
    let mut response = match requested.as_deref() {
        None | Some("latest") | Some("1.0") | Some("1") => next.run(req).await,
        Some(other) => (
            StatusCode::NOT_ACCEPTABLE,
            Json(json!({
                "error_message": format!(
                    "API version {other} is not supported; this server supports {API_VERSION} to {API_VERSION}"
                ),
                "code": 406
            })),
        )
            .into_response(),
    };
    let headers = response.headers_mut();
    for name in [MIN_VERSION_HEADER, MAX_VERSION_HEADER] {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_static(API_VERSION));
    }
    response
}
