//! `s4t login|logout|whoami`, and the administrators' `project` and `user` commands.

use std::io::IsTerminal;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::items;
use crate::cli::Ctx;
use crate::cli::client::normalize_url;
use crate::cli::config::Token;
use crate::cli::error::{Failure, Kind, Result};
use crate::cli::output::{field, fmt_time, time_field};

#[derive(Args, Debug)]
#[command(
    after_help = "The password comes from S4T_PASSWORD, else it is asked on the terminal.\n\nExample:\n  s4t login --url http://cloud:8812 --user alice --project lab"
)]
pub struct LoginArgs {
    /// User name.
    #[arg(long, short)]
    user: String,
    /// Project to work in (default: the user's first project).
    #[arg(long, short)]
    project: Option<String>,
}

pub async fn login(ctx: &mut Ctx, a: LoginArgs) -> Result<()> {
    let url = normalize_url(
        &ctx.url()
            .map_err(|_| Failure::usage("give the cloud's URL: s4t login --url http://CLOUD:8812 --user NAME"))?,
    )?;
    let password = password("S4T_PASSWORD", &format!("password for {} at {url}: ", a.user))?;
    let client = ctx.anonymous_client()?;
    let mut body = json!({"username": a.user, "password": password});
    if let Some(p) = &a.project {
        body["project"] = json!(p);
    }
    let v = client
        .post("/v1/auth/tokens", &body)
        .await
        .map_err(|f| match f.kind {
            Kind::Auth => {
                Failure::new(Kind::Auth, f.message).with_hint("check the user name and password (S4T_PASSWORD)")
            }
            _ => f,
        })?
        .body;
    let token = v.get("token").and_then(Value::as_str).ok_or_else(|| Failure::internal("the cloud issued no token"))?;
    let c = &mut ctx.config;
    c.url = Some(url.clone());
    c.user = Some(a.user.clone());
    c.project = v.get("project").and_then(Value::as_str).map(str::to_owned).or(a.project);
    c.token = Some(Token::new(token));
    c.expires_at = v.get("expires_at").and_then(Value::as_i64);
    if let Some(fp) = &ctx.global.ca_fingerprint {
        c.ca_fingerprint = Some(fp.clone());
    }
    c.save(&ctx.config_path)?;
    let summary = json!({"url": url, "user": a.user, "project": c.project, "expires_at": c.expires_at,
                         "config": ctx.config_path.display().to_string()});
    ctx.out.result(&summary, None, || {
        let until = c.expires_at.map(fmt_time).unwrap_or_default();
        println!(
            "logged in to {url} as {} (project {}); token valid until {until}",
            a.user,
            field(&summary, "project")
        );
    });
    Ok(())
}

/// A password from `env`, else from the terminal without echo.
fn password(env: &str, prompt: &str) -> Result<String> {
    if let Ok(p) = std::env::var(env) {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::usage(format!("no password: set {env} or run on a terminal")));
    }
    rpassword::prompt_password(prompt).map_err(|e| Failure::usage(format!("cannot read the password: {e}")))
}

pub fn logout(ctx: &mut Ctx) -> Result<()> {
    ctx.config.token = None;
    ctx.config.expires_at = None;
    ctx.config.save(&ctx.config_path)?;
    ctx.out
        .result(&json!({"logged_out": true}), None, || println!("token forgotten; the URL is kept for the next login"));
    Ok(())
}

pub async fn whoami(ctx: &Ctx) -> Result<()> {
    let client = ctx.client()?;
    // The token is checked by any authenticated call; the project list shows its project.
    let projects = client.get("/v1/projects").await?;
    let users = client.get("/v1/users").await.unwrap_or(Value::Null);
    let user = ctx.config.user.clone();
    let me = items(&users, "users").iter().find(|u| user.as_deref() == u.get("name").and_then(Value::as_str)).cloned();
    let project = ctx.config.project.clone();
    let v = json!({"url": client.base(), "user": user, "project": project, "role": me.as_ref().map(|m| field(m, "role")),
                   "expires_at": ctx.config.expires_at, "token_from": if ctx.global.token.is_some() { "S4T_TOKEN" } else { "config" },
                   "projects": items(&projects, "projects").iter().map(|p| field(p, "name")).collect::<Vec<_>>()});
    ctx.out.result(&v, user.as_deref(), || {
        let rows = [
            vec!["url".to_string(), field(&v, "url")],
            vec!["user".into(), field(&v, "user")],
            vec!["project".into(), field(&v, "project")],
            vec!["role".into(), field(&v, "role")],
            vec!["token valid until".into(), ctx.config.expires_at.map(fmt_time).unwrap_or_default()],
            vec!["token from".into(), field(&v, "token_from")],
            vec!["visible projects".into(), field(&v, "projects")],
        ];
        ctx.out.table(&["", ""], &rows);
    });
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum ProjectCmd {
    /// List projects (administrators see all).
    List,
    /// Create a project (administrators).
    Create { name: String },
}

pub async fn project(ctx: &Ctx, cmd: ProjectCmd) -> Result<()> {
    let client = ctx.client()?;
    match cmd {
        ProjectCmd::List => {
            let v = client.get("/v1/projects").await?;
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "projects").iter().for_each(|p| println!("{}", field(p, "name")));
            } else {
                let rows: Vec<Vec<String>> = items(&v, "projects")
                    .iter()
                    .map(|p| vec![field(p, "name"), field(p, "uuid"), time_field(p, "created_at")])
                    .collect();
                ctx.out.table(&["NAME", "UUID", "CREATED"], &rows);
            }
        }
        ProjectCmd::Create { name } => {
            let v = client.post("/v1/projects", &json!({"name": name})).await?.body;
            ctx.out.result(&v, Some(&field(&v, "uuid")), || println!("created project {name} ({})", field(&v, "uuid")));
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// List users of your project (administrators: all).
    List,
    /// Create a user with a role in a project (administrators). The password comes from
    /// S4T_NEW_PASSWORD, else it is asked on the terminal.
    #[command(after_help = "Example:\n  S4T_NEW_PASSWORD=… s4t user create bob --project lab --role manager")]
    Create {
        name: String,
        #[arg(long)]
        project: String,
        #[arg(long, default_value = "user", value_parser = ["user", "manager", "admin"])]
        role: String,
    },
}

pub async fn user(ctx: &Ctx, cmd: UserCmd) -> Result<()> {
    let client = ctx.client()?;
    match cmd {
        UserCmd::List => {
            let v = client.get("/v1/users").await?;
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "users").iter().for_each(|u| println!("{}", field(u, "name")));
            } else {
                let rows: Vec<Vec<String>> = items(&v, "users")
                    .iter()
                    .map(|u| vec![field(u, "name"), field(u, "role"), field(u, "project"), field(u, "uuid")])
                    .collect();
                ctx.out.table(&["NAME", "ROLE", "PROJECT", "UUID"], &rows);
            }
        }
        UserCmd::Create { name, project, role } => {
            let pw = password("S4T_NEW_PASSWORD", &format!("password for the new user {name}: "))?;
            let body = json!({"name": name, "password": pw, "project": project, "role": role});
            let v = client.post("/v1/users", &body).await?.body;
            ctx.out.result(&v, Some(&field(&v, "uuid")), || {
                println!("created user {name} ({}) as {role} in project {project}", field(&v, "uuid"));
            });
        }
    }
    Ok(())
}
