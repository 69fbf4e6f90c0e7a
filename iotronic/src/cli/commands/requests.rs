//! `s4t request list|show`: what was sent to boards and what they answered.

use clap::Subcommand;
use serde_json::json;

use super::{items, print_message};
use crate::cli::Ctx;
use crate::cli::client::seg;
use crate::cli::error::Result;
use crate::cli::output::{field, kv_rows, time_field};

#[derive(Subcommand, Debug)]
pub enum RequestCmd {
    /// List requests, newest first, optionally of one board: the newest 50 unless told.
    #[command(after_help = "Examples:\n  s4t request list --board pi1 --limit 10\n  s4t request list --all --json")]
    List {
        #[arg(long)]
        board: Option<String>,
        /// At most this many requests (the newest).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        /// Every request, page after page (instead of --limit).
        #[arg(long, conflicts_with = "limit")]
        all: bool,
    },
    /// Show a request and its results.
    Show { request: String },
}

pub async fn run(ctx: &Ctx, cmd: RequestCmd) -> Result<()> {
    let client = ctx.client()?;
    match cmd {
        RequestCmd::List { board, limit, all } => {
            let mut q = String::from("?sort_dir=desc");
            if let Some(b) = board {
                q.push_str(&format!("&board={}", seg(&b)));
            }
            let v = if all {
                client.get_all(&format!("/v1/requests{q}"), "requests").await?
            } else {
                client.get(&format!("/v1/requests{q}&limit={limit}")).await?
            };
            if v.get("next").is_some_and(|n| !n.is_null()) && !ctx.out.json && !ctx.out.quiet {
                eprintln!("(the newest {limit}; --limit N or --all for more)");
            }
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "requests").iter().for_each(|r| println!("{}", field(r, "uuid")));
            } else {
                let rows: Vec<Vec<String>> = items(&v, "requests")
                    .iter()
                    .map(|r| {
                        vec![
                            field(r, "uuid"),
                            field(r, "action"),
                            field(r, "status"),
                            field(r, "destination_uuid"),
                            time_field(r, "created_at"),
                        ]
                    })
                    .collect();
                ctx.out.table(&["UUID", "ACTION", "STATUS", "BOARD", "CREATED"], &rows);
            }
        }
        RequestCmd::Show { request } => {
            let r = client.get(&format!("/v1/requests/{}", seg(&request))).await?;
            let res = client.get(&format!("/v1/requests/{}/results", seg(&request))).await?;
            let both = json!({"request": r, "results": items(&res, "results")});
            ctx.out.result(&both, Some(&field(&r, "status")), || {
                let mut rows = kv_rows(&r, &["uuid", "action", "status", "destination_uuid", "project", "agent"]);
                rows.push(vec!["created_at".into(), time_field(&r, "created_at")]);
                rows.push(vec!["updated_at".into(), time_field(&r, "updated_at")]);
                if r.get("expires_at").is_some_and(|e| !e.is_null()) {
                    rows.push(vec!["expires_at".into(), time_field(&r, "expires_at")]);
                }
                ctx.out.table(&["FIELD", "VALUE"], &rows);
                for x in items(&res, "results") {
                    println!("\nresult from board {}: {}", field(x, "board_uuid"), field(x, "result"));
                    print_message(x.get("message").unwrap_or(&serde_json::Value::Null));
                }
            });
        }
    }
    Ok(())
}
