//! `s4t service list|create|delete|expose|unexpose|restore`: TCP services of boards and their
//! public ports on the cloud.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::{CallFlags, Called, board_call, items};
use crate::cli::Ctx;
use crate::cli::client::{Client, seg};
use crate::cli::error::{Failure, Kind, Result};
use crate::cli::output::{field, safe_line, time_field};

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// List services, or with --board the services exposed on that board and their public ports.
    #[command(after_help = "Examples:\n  s4t service list\n  s4t service list --board pi1")]
    List {
        #[arg(long)]
        board: Option<String>,
    },
    /// Define a service: a TCP port on boards (e.g. ssh 22).
    #[command(after_help = "Example:\n  s4t service create ssh 22")]
    Create {
        name: String,
        port: u16,
        #[arg(long, default_value = "TCP", value_parser = ["TCP", "UDP"])]
        protocol: String,
    },
    /// Delete services.
    Delete {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Expose a board's service on a public port of the cloud (prints the port).
    #[command(after_help = "Examples:\n  s4t service expose pi1 ssh      # then: ssh -p PORT CLOUD\n  \
                            s4t service expose pi1 ssh --allow 192.0.2.0/24,2001:db8::/32")]
    Expose(ExposeArgs),
    /// Close a service's public port.
    Unexpose(BoardService),
    /// Ask the board to re-open the tunnel of one exposed service, or of all of them.
    Restore { board: String, service: Option<String> },
}

#[derive(Args, Debug)]
pub struct ExposeArgs {
    #[command(flatten)]
    target: BoardService,
    /// Only these sources may connect to the public port (CIDRs or addresses; repeat or
    /// separate with commas). Others are closed at accept and audited. Default: anyone.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    allow: Vec<String>,
}

#[derive(Args, Debug)]
pub struct BoardService {
    board: String,
    service: String,
    #[command(flatten)]
    call: CallFlags,
}

pub async fn run(ctx: &Ctx, cmd: ServiceCmd) -> Result<()> {
    let client = ctx.client()?;
    match cmd {
        ServiceCmd::List { board: None } => {
            let v = client.get_all("/v1/services", "services").await?;
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "services").iter().for_each(|s| println!("{}", field(s, "name")));
            } else {
                let rows: Vec<Vec<String>> = items(&v, "services")
                    .iter()
                    .map(|s| vec![field(s, "name"), field(s, "port"), field(s, "protocol"), field(s, "uuid")])
                    .collect();
                ctx.out.table(&["NAME", "PORT", "PROTOCOL", "UUID"], &rows);
            }
        }
        ServiceCmd::List { board: Some(b) } => {
            let exposed = exposed_on(&client, &b).await?;
            if ctx.out.json {
                ctx.out.json(&json!({"exposed": exposed}));
            } else if ctx.out.quiet {
                exposed.iter().for_each(|e| println!("{}", field(e, "public_port")));
            } else {
                let host = client.host();
                let rows: Vec<Vec<String>> = exposed
                    .iter()
                    .map(|e| {
                        let h =
                            e.get("host").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| host.clone());
                        let allow = field(e, "allow");
                        vec![
                            field(e, "service_name"),
                            field(e, "port"),
                            format!("{h}:{}", field(e, "public_port")),
                            if allow.is_empty() { "anyone".to_owned() } else { allow },
                            time_field(e, "created_at"),
                        ]
                    })
                    .collect();
                ctx.out.table(&["SERVICE", "BOARD_PORT", "PUBLIC", "ALLOW", "SINCE"], &rows);
            }
        }
        ServiceCmd::Create { name, port, protocol } => {
            let v = client.post("/v1/services", &json!({"name": name, "port": port, "protocol": protocol})).await?.body;
            ctx.out
                .result(&v, Some(&field(&v, "uuid")), || println!("created service {name} (port {port}/{protocol})"));
        }
        ServiceCmd::Delete { services } => {
            for s in &services {
                client.delete(&format!("/v1/services/{}", seg(s))).await?;
                ctx.out.say(format!("deleted service {s}"));
            }
            if ctx.out.json {
                ctx.out.json(&json!({"deleted": services}));
            }
        }
        ServiceCmd::Expose(ExposeArgs { target: a, allow }) => {
            let mut body = json!({"action": "ServiceEnable"});
            if !allow.is_empty() {
                body["allow"] = json!(allow);
            }
            let v = service_call(ctx, &client, &a.board, &a.service, &body, &a.call).await?;
            let public = format!(
                "{}:{}",
                safe_line(v.get("host").and_then(Value::as_str).unwrap_or(&client.host())),
                field(&v, "public_port")
            );
            ctx.out.result(&v, Some(&field(&v, "public_port")), || {
                println!("{} of board {} is exposed on {public}", a.service, a.board);
            });
        }
        ServiceCmd::Unexpose(a) => {
            let v = service_action(ctx, &client, &a.board, &a.service, "ServiceDisable", &a.call).await?;
            ctx.out.result(&v, None, || println!("{} of board {} is no longer exposed", a.service, a.board));
        }
        ServiceCmd::Restore { board, service: None } => {
            let path = format!("/v1/boards/{}/services/restore", seg(&board));
            let called = board_call(ctx, &client, &board, Method::GET, &path, None, &CallFlags::default()).await?;
            let v = match called {
                Called::Done(v) | Called::Accepted(v) => v,
            };
            ctx.out
                .result(&v, None, || println!("restored {} exposed service(s) on {board}", items(&v, "exposed").len()));
        }
        ServiceCmd::Restore { board, service: Some(s) } => {
            let v = service_action(ctx, &client, &board, &s, "ServiceRestore", &CallFlags::default()).await?;
            ctx.out.result(&v, None, || println!("restored {s} on {board} (public port {})", field(&v, "public_port")));
        }
    }
    Ok(())
}

/// ServiceEnable / ServiceDisable / ServiceRestore; the exposure the cloud answers.
pub async fn service_action(
    ctx: &Ctx,
    client: &Client,
    board: &str,
    service: &str,
    action: &str,
    flags: &CallFlags,
) -> Result<Value> {
    service_call(ctx, client, board, service, &json!({"action": action}), flags).await
}

/// `POST …/services/{s}/action` with `body` (`{"action", …}`).
async fn service_call(
    ctx: &Ctx,
    client: &Client,
    board: &str,
    service: &str,
    body: &Value,
    flags: &CallFlags,
) -> Result<Value> {
    let action = field(body, "action");
    let path = format!("/v1/boards/{}/services/{}/action", seg(board), seg(service));
    match board_call(ctx, client, board, Method::POST, &path, Some(body), flags).await? {
        Called::Done(v) => Ok(v),
        Called::Accepted(v) if field(&v, "status") == "QUEUED" => Ok(v),
        Called::Accepted(v) => Err(Failure::new(Kind::Timeout, format!("board {board} has not answered {action} yet"))
            .with_hint(format!("see `s4t request show {}`", field(&v, "uuid")))),
    }
}

/// The board's exposures, each with its service's name and board port added.
pub async fn exposed_on(client: &Client, board: &str) -> Result<Vec<Value>> {
    let ex = client.get(&format!("/v1/boards/{}/services", seg(board))).await?;
    let services = client.get_all("/v1/services", "services").await?;
    Ok(items(&ex, "exposed")
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let id = field(&e, "service");
            if let Some(s) =
                items(&services, "services").iter().find(|s| field(s, "uuid") == id || field(s, "name") == id)
            {
                e["service_name"] = json!(field(s, "name"));
                e["port"] = s.get("port").cloned().unwrap_or(Value::Null);
            }
            e
        })
        .collect())
}
