//! `s4t board list|show|create|update|delete|action|wait|revoke|rotate-secret`.

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::{CallFlags, board_call, items, params_object, parse_duration, report};
use crate::cli::Ctx;
use crate::cli::client::seg;
use crate::cli::error::{Failure, Kind, Result};
use crate::cli::output::{field, kv_rows, time_field};

#[derive(Subcommand, Debug)]
pub enum BoardCmd {
    /// List the boards of your project (administrators: every project).
    #[command(
        after_help = "Examples:\n  s4t board list\n  s4t board list --status online\n  s4t board list -q   # names only"
    )]
    List(ListArgs),
    /// Show one board (name or uuid).
    Show { board: String },
    /// Create a board with its one-time registration code.
    #[command(after_help = "Example:\n  s4t board create pi1 --code CODE1 --location 38.2,15.5,3")]
    Create(CreateArgs),
    /// Change a board's name, type, fleet, location or mobility.
    Update(UpdateArgs),
    /// Delete boards.
    Delete {
        #[arg(required = true)]
        boards: Vec<String>,
    },
    /// Run an action on a board (DevicePing, DeviceEcho, DeviceInfo, DeviceReboot...).
    #[command(
        after_help = "Examples:\n  s4t board action pi1 DevicePing\n  s4t board action pi1 DeviceEcho -p say=hello\n  s4t board action pi1 DeviceReboot --queue   # runs when pi1 is back online"
    )]
    Action(ActionArgs),
    /// Wait until a board has a status (default online).
    #[command(after_help = "Example:\n  s4t board wait pi1 --timeout 60s")]
    Wait(WaitArgs),
    /// Revoke a board's credentials: it is disconnected within seconds and cannot log in
    /// until `rotate-secret` gives it a new code.
    Revoke { board: String },
    /// Replace a board's secret: the old one stops working now; prints a one-time code to
    /// enroll the board again with (`lightning-rod enroll --force --code CODE`).
    #[command(name = "rotate-secret", after_help = "Example:\n  s4t board rotate-secret pi1 --ttl 3600")]
    RotateSecret {
        board: String,
        /// How long the new code works, in seconds (default one day).
        #[arg(long)]
        ttl: Option<i64>,
    },
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only boards with this status.
    #[arg(long, value_parser = ["registered", "offline", "online"])]
    status: Option<String>,
    /// Only boards of this project (administrators).
    #[arg(long)]
    project: Option<String>,
    /// Only boards of this fleet.
    #[arg(long)]
    fleet: Option<String>,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    name: String,
    /// The one-time registration code the board enrolls with.
    #[arg(long)]
    code: String,
    /// The board type (selects the device layout of the original lightning-rod).
    #[arg(long = "type", default_value = "generic")]
    board_type: String,
    /// LATITUDE,LONGITUDE,ALTITUDE
    #[arg(long, default_value = "0,0,0")]
    location: String,
    #[arg(long)]
    fleet: Option<String>,
    /// The board moves (its location changes).
    #[arg(long)]
    mobile: bool,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    board: String,
    #[arg(long)]
    name: Option<String>,
    #[arg(long = "type")]
    board_type: Option<String>,
    /// LATITUDE,LONGITUDE,ALTITUDE
    #[arg(long)]
    location: Option<String>,
    #[arg(long, conflicts_with = "no_fleet")]
    fleet: Option<String>,
    /// Take the board out of its fleet.
    #[arg(long)]
    no_fleet: bool,
    #[arg(long)]
    mobile: Option<bool>,
}

#[derive(Args, Debug)]
pub struct ActionArgs {
    board: String,
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(crate::cli::BOARD_ACTIONS))]
    action: String,
    /// A parameter, key=value (repeatable; values that are JSON keep their type).
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// All parameters as one JSON object.
    #[arg(long = "params", value_name = "JSON")]
    params_json: Option<String>,
    #[command(flatten)]
    call: CallFlags,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    board: String,
    #[arg(long, default_value = "online", value_parser = ["registered", "offline", "online"])]
    status: String,
    /// Give up after this long (exit code 9).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: u64,
}

impl ListArgs {
    pub fn of_fleet(fleet: String) -> Self {
        ListArgs { status: None, project: None, fleet: Some(fleet) }
    }
}

const LIST_COLUMNS: &[&str] = &["NAME", "STATUS", "TYPE", "UUID", "LR_VERSION"];
const SHOW_FIELDS: &[&str] = &[
    "name",
    "uuid",
    "status",
    "type",
    "project",
    "owner",
    "fleet",
    "agent",
    "session",
    "lr_version",
    "connectivity",
    "mobile",
    "location",
    "extra",
];

pub async fn run(ctx: &Ctx, cmd: BoardCmd) -> Result<()> {
    let client = ctx.client()?;
    match cmd {
        BoardCmd::List(a) => {
            let v = match &a.fleet {
                Some(f) => client.get_all(&format!("/v1/fleets/{}/boards", seg(f)), "boards").await?,
                None => {
                    let mut q = Vec::new();
                    if let Some(s) = &a.status {
                        q.push(format!("status={}", seg(s)));
                    }
                    if let Some(p) = &a.project {
                        q.push(format!("project={}", seg(p)));
                    }
                    let q = if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) };
                    client.get_all(&format!("/v1/boards/detail{q}"), "boards").await?
                }
            };
            print_list(ctx, &v, a.status.as_deref());
        }
        BoardCmd::Show { board } => {
            let v = client.get(&format!("/v1/boards/{}", seg(&board))).await?;
            print_one(ctx, &v);
        }
        BoardCmd::Create(a) => {
            let mut body = json!({"name": a.name, "code": a.code, "type": a.board_type,
                                  "location": [location(&a.location)?], "mobile": a.mobile});
            if let Some(f) = a.fleet {
                body["fleet"] = json!(f);
            }
            let v = client.post("/v1/boards", &body).await?.body;
            // The board dials the WAMP port with the scheme of the cloud's REST URL, and pins
            // the CA this CLI pins.
            let url = match (client.base().starts_with("https://"), ctx.ca_fingerprint()) {
                (false, _) => format!("ws://{}:8181/", client.host()),
                (true, fp) => format!("wss://{}:8181/ --ca-fingerprint {}", client.host(), fp.unwrap_or("sha256:HEX")),
            };
            ctx.out.result(&v, Some(&field(&v, "uuid")), || {
                println!("created board {} ({}), status {}", field(&v, "name"), field(&v, "uuid"), field(&v, "status"));
                println!("enroll it on the board: lightning-rod enroll --url {url} --code {}", a.code);
            });
        }
        BoardCmd::Update(a) => {
            let mut body = json!({});
            if let Some(n) = a.name {
                body["name"] = json!(n);
            }
            if let Some(t) = a.board_type {
                body["type"] = json!(t);
            }
            if let Some(l) = a.location {
                body["location"] = json!([location(&l)?]);
            }
            if let Some(f) = a.fleet {
                body["fleet"] = json!(f);
            } else if a.no_fleet {
                body["fleet"] = Value::Null;
            }
            if let Some(m) = a.mobile {
                body["mobile"] = json!(m);
            }
            if body.as_object().is_some_and(|m| m.is_empty()) {
                return Err(Failure::usage("nothing to update: give --name, --type, --location, --fleet or --mobile"));
            }
            let v = client.call(Method::PATCH, &format!("/v1/boards/{}", seg(&a.board)), Some(&body)).await?.body;
            print_one(ctx, &v);
        }
        BoardCmd::Delete { boards } => {
            for b in &boards {
                client.delete(&format!("/v1/boards/{}", seg(b))).await?;
                ctx.out.say(format!("deleted board {b}"));
            }
            if ctx.out.json {
                ctx.out.json(&json!({"deleted": boards}));
            }
        }
        BoardCmd::Action(a) => {
            let params = params_object(&a.params, a.params_json.as_deref())?;
            let body = json!({"action": a.action, "parameters": params});
            let path = format!("/v1/boards/{}/action", seg(&a.board));
            let called = board_call(ctx, &client, &a.board, Method::POST, &path, Some(&body), &a.call).await?;
            report(ctx, &a.board, called, &a.call)?;
        }
        BoardCmd::Wait(a) => wait(ctx, &client, &a).await?,
        BoardCmd::Revoke { board } => {
            let v = client.post(&format!("/v1/boards/{}/revoke", seg(&board)), &json!({})).await?.body;
            ctx.out.result(&v, Some(&field(&v, "uuid")), || {
                println!(
                    "revoked board {} ({}): its sessions close within seconds",
                    field(&v, "name"),
                    field(&v, "uuid")
                );
            });
        }
        BoardCmd::RotateSecret { board, ttl } => {
            let body = ttl.map_or_else(|| json!({}), |t| json!({"ttl": t}));
            let v = client.post(&format!("/v1/boards/{}/rotate-secret", seg(&board)), &body).await?.body;
            ctx.out.result(&v, Some(&field(&v, "code")), || {
                println!("the old secret of board {} no longer works; enroll it again with:", field(&v, "name"));
                println!(
                    "  lightning-rod enroll --force --url ws://{}:8181/ --code {}",
                    client.host(),
                    field(&v, "code")
                );
                println!("the code works once, until {}", time_field(&v, "code_expires_at"));
            });
        }
    }
    Ok(())
}

fn print_list(ctx: &Ctx, v: &Value, status: Option<&str>) {
    // `/v1/fleets/{f}/boards` has no status filter: apply it here.
    let boards: Vec<&Value> =
        items(v, "boards").iter().filter(|b| status.is_none_or(|s| field(b, "status") == s)).collect();
    if ctx.out.json {
        ctx.out.json(&json!({"boards": boards}));
    } else if ctx.out.quiet {
        boards.iter().for_each(|b| println!("{}", field(b, "name")));
    } else {
        let rows: Vec<Vec<String>> = boards
            .iter()
            .map(|b| ["name", "status", "type", "uuid", "lr_version"].iter().map(|k| field(b, k)).collect())
            .collect();
        ctx.out.table(LIST_COLUMNS, &rows);
    }
}

fn print_one(ctx: &Ctx, v: &Value) {
    ctx.out.result(v, Some(&field(v, "uuid")), || {
        let mut rows = kv_rows(v, SHOW_FIELDS);
        rows.push(vec!["created_at".into(), time_field(v, "created_at")]);
        rows.push(vec!["updated_at".into(), time_field(v, "updated_at")]);
        ctx.out.table(&["FIELD", "VALUE"], &rows);
    });
}

/// `LAT,LON,ALT` → the API's location object.
fn location(s: &str) -> Result<Value> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let ok = parts.len() == 3 && parts.iter().all(|p| p.parse::<f64>().is_ok());
    if !ok {
        return Err(Failure::usage(format!("location {s:?} is not LATITUDE,LONGITUDE,ALTITUDE (numbers)")));
    }
    Ok(json!({"latitude": parts[0], "longitude": parts[1], "altitude": parts[2]}))
}

async fn wait(ctx: &Ctx, client: &crate::cli::client::Client, a: &WaitArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let _spin = ctx.out.progress(format!("waiting for board {} to be {}", a.board, a.status));
    loop {
        let v = client.get(&format!("/v1/boards/{}", seg(&a.board))).await?;
        if field(&v, "status") == a.status {
            ctx.out.result(&v, Some(&field(&v, "name")), || println!("board {} is {}", field(&v, "name"), a.status));
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Failure::new(
                Kind::Timeout,
                format!("board {} is still {} after {} s", a.board, field(&v, "status"), a.timeout),
            )
            .with_hint("is its lightning-rod running and able to reach the cloud on port 8181?"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            location("38.2, 15.5,3").unwrap(),
            json!({"latitude": "38.2", "longitude": "15.5", "altitude": "3"})
        );
        assert!(location("1,2").is_err());
        assert!(location("a,b,c").is_err());
    }
}
