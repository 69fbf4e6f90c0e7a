//! `s4t vpn create|list|show|delete|add|remove` and `s4t bridge`: boards joined in virtual
//! networks.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::{CallFlags, Called, board_call, items, parse_duration};
use crate::cli::Ctx;
use crate::cli::client::{Client, seg};
use crate::cli::error::{Failure, Kind, Result};
use crate::cli::output::{field, kv_rows, time_field};

#[derive(Subcommand, Debug)]
pub enum VpnCmd {
    /// Create a VPN: an L2 segment (one broadcast domain) or an L3 network.
    #[command(after_help = "Example:\n  s4t vpn create lab-net --cidr 10.10.0.0/24")]
    Create {
        name: String,
        #[arg(long)]
        cidr: String,
        #[arg(long = "type", default_value = "l2", value_parser = ["l2", "l3"])]
        vpn_type: String,
    },
    /// List VPNs.
    List,
    /// Show a VPN and its members' addresses.
    Show { vpn: String },
    /// Delete VPNs (their members leave first).
    Delete {
        #[arg(required = true)]
        vpns: Vec<String>,
    },
    /// Add a board to a VPN (address allocated from the CIDR unless given).
    #[command(after_help = "Example:\n  s4t vpn add lab-net pi1 --address 10.10.0.10")]
    Add {
        vpn: String,
        board: String,
        #[arg(long)]
        address: Option<String>,
    },
    /// Remove a board from a VPN.
    Remove { vpn: String, board: String },
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  s4t bridge pi1 pi2\n  s4t bridge pi1 pi2 pi3 --cidr 10.10.0.0/24 --name lab-net --duration 4h"
)]
pub struct BridgeArgs {
    #[arg(required = true)]
    boards: Vec<String>,
    /// Addresses of the network.
    #[arg(long, default_value = "10.42.0.0/24")]
    cidr: String,
    /// The VPN's name (default bridge-BOARD-BOARD…); an existing VPN of that name is reused.
    #[arg(long)]
    name: Option<String>,
    #[arg(long = "type", default_value = "l2", value_parser = ["l2", "l3"])]
    vpn_type: String,
    /// How long to book boards that are not yet leased to your project.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    duration: u64,
}

pub async fn run(ctx: &Ctx, cmd: VpnCmd) -> Result<()> {
    let client = ctx.client()?;
    match cmd {
        VpnCmd::Create { name, cidr, vpn_type } => {
            let v = client.post("/v1/vpns", &json!({"name": name, "type": vpn_type, "cidr": cidr})).await?.body;
            ctx.out.result(&v, Some(&field(&v, "uuid")), || {
                println!(
                    "created {} VPN {name} ({}) on {}",
                    vpn_type.to_uppercase(),
                    field(&v, "uuid"),
                    field(&v, "cidr")
                );
            });
        }
        VpnCmd::List => {
            let v = client.get_all("/v1/vpns", "vpns").await?;
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "vpns").iter().for_each(|x| println!("{}", field(x, "name")));
            } else {
                let rows: Vec<Vec<String>> = items(&v, "vpns")
                    .iter()
                    .map(|x| vec![field(x, "name"), field(x, "type"), field(x, "cidr"), field(x, "uuid")])
                    .collect();
                ctx.out.table(&["NAME", "TYPE", "CIDR", "UUID"], &rows);
            }
        }
        VpnCmd::Show { vpn } => {
            let v = client.get(&format!("/v1/vpns/{}", seg(&vpn))).await?;
            let members = members_named(&client, &vpn).await?;
            let both = json!({"vpn": v, "members": members});
            ctx.out.result(&both, Some(&field(&v, "uuid")), || {
                let mut rows = kv_rows(&v, &["name", "uuid", "type", "cidr", "project"]);
                rows.push(vec!["created_at".into(), time_field(&v, "created_at")]);
                ctx.out.table(&["FIELD", "VALUE"], &rows);
                println!();
                print_members(ctx, &members);
            });
        }
        VpnCmd::Delete { vpns } => {
            for v in &vpns {
                client.delete(&format!("/v1/vpns/{}", seg(v))).await?;
                ctx.out.say(format!("deleted VPN {v}"));
            }
            if ctx.out.json {
                ctx.out.json(&json!({"deleted": vpns}));
            }
        }
        VpnCmd::Add { vpn, board, address } => {
            let m = add_member(ctx, &client, &vpn, &board, address.as_deref()).await?;
            ctx.out.result(&m, Some(&field(&m, "address")), || {
                println!("{board} joined {vpn} as {} (interface {})", field(&m, "address"), field(&m, "interface"));
            });
        }
        VpnCmd::Remove { vpn, board } => {
            let path = format!("/v1/vpns/{}/boards/{}", seg(&vpn), seg(&board));
            board_call(ctx, &client, &board, Method::DELETE, &path, None, &CallFlags::default()).await?;
            ctx.out.result(&json!({"vpn": vpn, "removed": board}), None, || println!("{board} left {vpn}"));
        }
    }
    Ok(())
}

async fn add_member(ctx: &Ctx, client: &Client, vpn: &str, board: &str, address: Option<&str>) -> Result<Value> {
    let mut body = json!({"board": board});
    if let Some(a) = address {
        body["address"] = json!(a);
    }
    let path = format!("/v1/vpns/{}/boards", seg(vpn));
    match board_call(ctx, client, board, Method::POST, &path, Some(&body), &CallFlags::default()).await? {
        Called::Done(v) | Called::Accepted(v) => Ok(v),
    }
}

/// The members of a VPN with their board names.
async fn members_named(client: &Client, vpn: &str) -> Result<Vec<Value>> {
    let m = client.get_all(&format!("/v1/vpns/{}/boards", seg(vpn)), "members").await?;
    let boards = client.get_all("/v1/boards", "boards").await?;
    Ok(items(&m, "members")
        .iter()
        .map(|x| {
            let mut x = x.clone();
            let id = field(&x, "board");
            let name = items(&boards, "boards").iter().find(|b| field(b, "uuid") == id).map(|b| field(b, "name"));
            x["board_name"] = json!(name.unwrap_or(id));
            x
        })
        .collect())
}

fn print_members(ctx: &Ctx, members: &[Value]) {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| vec![field(m, "board_name"), field(m, "address"), field(m, "interface"), field(m, "board")])
        .collect();
    ctx.out.table(&["BOARD", "ADDRESS", "INTERFACE", "UUID"], &rows);
}

/// What `s4t bridge` created, so that a failure half-way can undo it.
#[derive(Default)]
struct Created {
    lease: Option<String>,
    vpn: Option<String>,
}

pub async fn bridge(ctx: &Ctx, a: BridgeArgs) -> Result<()> {
    let client = ctx.client()?;
    let mut boards = Vec::new();
    for b in &a.boards {
        boards.push(client.get(&format!("/v1/boards/{}", seg(b))).await?);
    }
    let names: Vec<String> = boards.iter().map(|b| field(b, "name")).collect();
    let mut created = Created::default();
    let result = bridge_steps(ctx, &client, &a, &boards, &mut created).await;
    match result {
        Ok(out) => {
            ctx.out.result(&out, None, || {
                if let Some(l) = &created.lease {
                    println!("booked {} with lease {l}", names.join(", "));
                }
                println!(
                    "{} VPN {} on {}:",
                    a.vpn_type.to_uppercase(),
                    field(&out["vpn"], "name"),
                    field(&out["vpn"], "cidr")
                );
                print_members(ctx, items(&out, "members"));
            });
            if ctx.out.quiet {
                items(&out, "members")
                    .iter()
                    .for_each(|m| println!("{} {}", field(m, "board_name"), field(m, "address")));
            }
            Ok(())
        }
        Err(f) => {
            // Undo what this run created; keep what existed before it.
            if let Some(v) = &created.vpn {
                let _ = client.delete(&format!("/v1/vpns/{}", seg(v))).await;
            }
            if let Some(l) = &created.lease {
                let _ = client.delete(&format!("/v1/leases/{}", seg(l))).await;
            }
            Err(f)
        }
    }
}

async fn bridge_steps(
    ctx: &Ctx,
    client: &Client,
    a: &BridgeArgs,
    boards: &[Value],
    created: &mut Created,
) -> Result<Value> {
    let uuids: Vec<String> = boards.iter().map(|b| field(b, "uuid")).collect();
    // 1. Book the boards not yet leased to this project.
    let unbooked = unbooked(ctx, client, &uuids).await?;
    if !unbooked.is_empty() {
        let l = client
            .post("/v1/leases", &json!({"boards": unbooked, "duration": a.duration}))
            .await
            .map_err(|f| match f.kind {
                Kind::Conflict => Failure { hint: Some("another project has booked one of these boards; `s4t board show BOARD` tells which lease holds it".into()), ..f },
                _ => f,
            })?
            .body;
        created.lease = Some(field(&l, "uuid"));
    }
    // 2. The VPN: reuse one of that name, else create it.
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("bridge-{}", boards.iter().map(|b| field(b, "name")).collect::<Vec<_>>().join("-")));
    let vpn = match client.get(&format!("/v1/vpns/{}", seg(&name))).await {
        Ok(v) => v,
        Err(f) if f.kind == Kind::NotFound => {
            let v = client.post("/v1/vpns", &json!({"name": name, "type": a.vpn_type, "cidr": a.cidr})).await?.body;
            created.vpn = Some(field(&v, "uuid"));
            v
        }
        Err(f) => return Err(f),
    };
    // 3. Add every board that is not yet a member.
    let vpn_id = field(&vpn, "uuid");
    let before = client.get_all(&format!("/v1/vpns/{}/boards", seg(&vpn_id)), "members").await?;
    for (b, id) in boards.iter().zip(&uuids) {
        if !items(&before, "members").iter().any(|m| &field(m, "board") == id) {
            add_member(ctx, client, &vpn_id, &field(b, "name"), None).await?;
        }
    }
    let members: Vec<Value> =
        members_named(client, &vpn_id).await?.into_iter().filter(|m| uuids.contains(&field(m, "board"))).collect();
    Ok(json!({"vpn": vpn, "lease": created.lease, "members": members}))
}

/// The boards (uuids) that no active lease of the caller's project holds.
async fn unbooked(ctx: &Ctx, client: &Client, uuids: &[String]) -> Result<Vec<String>> {
    let leases = client.get_all("/v1/leases?status=active", "leases").await?;
    let projects = client.get("/v1/projects").await?;
    let projects = items(&projects, "projects");
    let mine = match projects {
        [only] => Some(field(only, "uuid")),
        all => ctx
            .config
            .project
            .as_ref()
            .and_then(|p| all.iter().find(|x| &field(x, "name") == p))
            .map(|x| field(x, "uuid")),
    };
    let booked = |id: &String| {
        items(&leases, "leases").iter().any(|l| {
            mine.as_ref().is_none_or(|m| &field(l, "project") == m)
                && l.get("boards").and_then(Value::as_array).is_some_and(|bs| bs.iter().any(|b| b.as_str() == Some(id)))
        })
    };
    Ok(uuids.iter().filter(|id| !booked(id)).cloned().collect())
}
