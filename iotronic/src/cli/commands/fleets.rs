//! `s4t fleet list|show|create|update|delete|boards`.

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::items;
use crate::cli::Ctx;
use crate::cli::client::seg;
use crate::cli::error::{Failure, Result};
use crate::cli::output::{field, kv_rows, time_field};

#[derive(Subcommand, Debug)]
pub enum FleetCmd {
    /// List fleets.
    List,
    /// Show one fleet.
    Show { fleet: String },
    /// Create a fleet.
    #[command(
        after_help = "Example:\n  s4t fleet create lab --description 'boards on the lab bench'\n  s4t board update pi1 --fleet lab"
    )]
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// Rename a fleet or change its description.
    Update {
        fleet: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete fleets.
    Delete {
        #[arg(required = true)]
        fleets: Vec<String>,
    },
    /// The boards of a fleet (same as `s4t board list --fleet F`).
    Boards { fleet: String },
}

pub async fn run(ctx: &Ctx, cmd: FleetCmd) -> Result<()> {
    let client = ctx.client()?;
    match cmd {
        FleetCmd::List => {
            let v = client.get_all("/v1/fleets", "fleets").await?;
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "fleets").iter().for_each(|f| println!("{}", field(f, "name")));
            } else {
                let rows: Vec<Vec<String>> = items(&v, "fleets")
                    .iter()
                    .map(|f| vec![field(f, "name"), field(f, "uuid"), field(f, "description")])
                    .collect();
                ctx.out.table(&["NAME", "UUID", "DESCRIPTION"], &rows);
            }
        }
        FleetCmd::Show { fleet } => print_one(ctx, &client.get(&format!("/v1/fleets/{}", seg(&fleet))).await?),
        FleetCmd::Create { name, description } => {
            let mut body = json!({"name": name});
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            print_one(ctx, &client.post("/v1/fleets", &body).await?.body);
        }
        FleetCmd::Update { fleet, name, description } => {
            if name.is_none() && description.is_none() {
                return Err(Failure::usage("nothing to update: give --name or --description"));
            }
            let body = json!({"name": name, "description": description});
            let body: serde_json::Map<String, Value> = body
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let path = format!("/v1/fleets/{}", seg(&fleet));
            print_one(ctx, &client.call(Method::PATCH, &path, Some(&Value::Object(body))).await?.body);
        }
        FleetCmd::Delete { fleets } => {
            for f in &fleets {
                client.delete(&format!("/v1/fleets/{}", seg(f))).await?;
                ctx.out.say(format!("deleted fleet {f}"));
            }
            if ctx.out.json {
                ctx.out.json(&json!({"deleted": fleets}));
            }
        }
        FleetCmd::Boards { fleet } => {
            let cmd = super::boards::BoardCmd::List(super::boards::ListArgs::of_fleet(fleet));
            return super::boards::run(ctx, cmd).await;
        }
    }
    Ok(())
}

fn print_one(ctx: &Ctx, v: &Value) {
    ctx.out.result(v, Some(&field(v, "uuid")), || {
        let mut rows = kv_rows(v, &["name", "uuid", "project", "description", "extra"]);
        rows.push(vec!["created_at".into(), time_field(v, "created_at")]);
        ctx.out.table(&["FIELD", "VALUE"], &rows);
    });
}
