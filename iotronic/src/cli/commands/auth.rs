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
    // The pin this login trusts, and so the one stored with it: an old pin stays only for the
    // cloud it was given for.
    let pin = ctx.ca_fingerprint().map(str::to_owned);
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
    c.ca_fingerprint = pin;
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

/// What became of a token at the cloud when logging out.
enum Revocation {
    /// `DELETE /v1/auth/tokens` revoked it.
    Revoked,
    /// The cloud no longer accepted it (expired, or revoked already).
    Dead,
    /// The cloud could not be asked (unreachable, no URL, an error).
    Failed(Failure),
}

/// `s4t logout`: revokes the token in use at the cloud (`DELETE /v1/auth/tokens`), then forgets
/// the stored one. A cloud that cannot be reached gets a warning and the token is still
/// forgotten here; only when neither happened does it fail. With `--token`/`S4T_TOKEN`, that
/// token is revoked and the stored login is left alone (unless it is the same token).
pub async fn logout(ctx: &mut Ctx) -> Result<()> {
    let given = ctx.global.token.clone().map(Token::new);
    let stored = ctx.config.token.clone();
    let Some(token) = given.or_else(|| stored.clone()) else {
        let v = json!({"logged_out": true, "revoked": false, "forgotten": false});
        ctx.out.result(&v, None, || println!("not logged in: no token to revoke or forget"));
        return Ok(());
    };
    let revocation = match ctx.client() {
        Err(f) => Revocation::Failed(f),
        Ok(client) => match client.delete("/v1/auth/tokens").await {
            Ok(_) => Revocation::Revoked,
            Err(f) if matches!(f.kind, Kind::Auth | Kind::NotFound) => Revocation::Dead,
            Err(f) => Revocation::Failed(f),
        },
    };
    let forgotten = if stored.as_ref() == Some(&token) {
        ctx.config.token = None;
        ctx.config.expires_at = None;
        ctx.config.save(&ctx.config_path).map(|()| true)
    } else {
        Ok(false)
    };
    let revoked = match revocation {
        Revocation::Failed(f) => match forgotten {
            Ok(false) => return Err(f),
            Ok(true) => {
                eprintln!("s4t: warning: the token was not revoked at the cloud: {f}");
                false
            }
            Err(save) => {
                eprintln!("s4t: warning: the token was not revoked at the cloud: {f}");
                return Err(save);
            }
        },
        Revocation::Revoked | Revocation::Dead => true,
    };
    let forgotten = forgotten.unwrap_or_else(|save| {
        eprintln!("s4t: warning: the token is revoked but still stored: {save}");
        false
    });
    let v = json!({"logged_out": true, "revoked": revoked, "forgotten": forgotten});
    ctx.out.result(&v, None, || match (revoked, forgotten) {
        (true, true) => println!("logged out: the token is revoked and forgotten; the URL is kept for the next login"),
        (true, false) => println!("logged out: the token is revoked at the cloud"),
        _ => println!("token forgotten here, but still valid at the cloud until it expires (see the warning)"),
    });
    Ok(())
}

/// `s4t whoami`: the identity of the token in use (`--token`/`S4T_TOKEN`, else the stored
/// one), as the cloud tells it (`GET /v1/auth/tokens`), not the stored login's.
pub async fn whoami(ctx: &Ctx) -> Result<()> {
    let client = ctx.client()?;
    let me = client.get("/v1/auth/tokens").await?;
    let projects = client.get("/v1/projects").await?;
    let user = me.get("user").and_then(Value::as_str).map(str::to_owned);
    let v = json!({"url": client.base(), "user": user, "project": me.get("project"), "role": me.get("role"),
                   "admin": me.get("admin"), "expires_at": me.get("expires_at"),
                   "token_from": if ctx.global.token.is_some() { "S4T_TOKEN" } else { "config" },
                   "projects": items(&projects, "projects").iter().map(|p| field(p, "name")).collect::<Vec<_>>()});
    ctx.out.result(&v, user.as_deref(), || {
        let mut rows = vec![
            vec!["url".to_string(), field(&v, "url")],
            vec!["user".into(), field(&v, "user")],
            vec!["project".into(), field(&v, "project")],
            vec!["role".into(), field(&v, "role")],
        ];
        if v["admin"] == json!(true) {
            rows.push(vec!["cloud administrator".into(), "yes".into()]);
        }
        rows.extend([
            vec!["token valid until".into(), time_field(&v, "expires_at")],
            vec![
                "token from".into(),
                if ctx.global.token.is_some() {
                    "--token/S4T_TOKEN".into()
                } else {
                    ctx.config_path.display().to_string()
                },
            ],
            vec!["visible projects".into(), field(&v, "projects")],
        ]);
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
