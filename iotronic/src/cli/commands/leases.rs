//! `s4t lease create|list|show|extend|release`: booking boards for one project.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::{items, parse_duration};
use crate::cli::Ctx;
use crate::cli::client::seg;
use crate::cli::error::Result;
use crate::cli::output::{field, kv_rows, time_field};

#[derive(Subcommand, Debug)]
pub enum LeaseCmd {
    /// Book boards for your project: others get a refusal (409) until it ends.
    #[command(after_help = "Example:\n  s4t lease create pi1 pi2 --duration 2h")]
    Create(CreateArgs),
    /// List your project's leases (active ones unless --all).
    List {
        /// Also ended (released or expired) leases.
        #[arg(long)]
        all: bool,
    },
    /// Show one lease.
    Show { lease: String },
    /// Make a lease last longer: it ends DURATION from now.
    #[command(after_help = "Example:\n  s4t lease extend 3f2c… --duration 4h")]
    Extend {
        lease: String,
        #[arg(long, value_parser = parse_duration)]
        duration: u64,
    },
    /// End a lease now; exposures and VPN memberships it held are torn down.
    Release { lease: String },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[arg(required = true)]
    pub boards: Vec<String>,
    /// How long, e.g. 30m, 2h, 1d (at most 30 days).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub duration: u64,
}

pub async fn run(ctx: &Ctx, cmd: LeaseCmd) -> Result<()> {
    let client = ctx.client()?;
    match cmd {
        LeaseCmd::Create(a) => {
            let v = client.post("/v1/leases", &json!({"boards": a.boards, "duration": a.duration})).await?.body;
            ctx.out.result(&v, Some(&field(&v, "uuid")), || {
                println!(
                    "lease {} books {} until {}",
                    field(&v, "uuid"),
                    a.boards.join(", "),
                    time_field(&v, "expires_at")
                );
            });
        }
        LeaseCmd::List { all } => {
            let q = if all { "" } else { "?status=active" };
            let v = client.get_all(&format!("/v1/leases{q}"), "leases").await?;
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "leases").iter().for_each(|l| println!("{}", field(l, "uuid")));
            } else {
                let rows: Vec<Vec<String>> = items(&v, "leases")
                    .iter()
                    .map(|l| {
                        vec![field(l, "uuid"), field(l, "status"), time_field(l, "expires_at"), field(l, "boards")]
                    })
                    .collect();
                ctx.out.table(&["UUID", "STATUS", "EXPIRES", "BOARDS"], &rows);
            }
        }
        LeaseCmd::Show { lease } => {
            let v = client.get(&format!("/v1/leases/{}", seg(&lease))).await?;
            print_one(ctx, &v);
        }
        LeaseCmd::Extend { lease, duration } => {
            let path = format!("/v1/leases/{}", seg(&lease));
            let v = client.call(Method::PATCH, &path, Some(&json!({"duration": duration}))).await?.body;
            ctx.out.result(&v, Some(&field(&v, "uuid")), || {
                println!("lease {} now ends {}", field(&v, "uuid"), time_field(&v, "expires_at"));
            });
        }
        LeaseCmd::Release { lease } => {
            client.delete(&format!("/v1/leases/{}", seg(&lease))).await?;
            ctx.out.result(&json!({"released": lease}), None, || println!("released lease {lease}"));
        }
    }
    Ok(())
}

fn print_one(ctx: &Ctx, v: &Value) {
    ctx.out.result(v, Some(&field(v, "uuid")), || {
        let mut rows = kv_rows(v, &["uuid", "status", "project", "owner", "boards"]);
        rows.push(vec!["expires_at".into(), time_field(v, "expires_at")]);
        rows.push(vec!["created_at".into(), time_field(v, "created_at")]);
        ctx.out.table(&["FIELD", "VALUE"], &rows);
    });
}
