//! `s4t`, the command-line client of the Stack4Things cloud (issue 8).
//!
//! # Layout
//!
//! - [`Cli`] and [`Command`]: the command line (clap derive). Nouns with verbs
//!   (`s4t board list`), plus the one-shot commands people use most (`s4t ssh`, `s4t bridge`).
//! - `commands/`: one file per noun, each with its clap `…Cmd` enum and a `run(ctx, cmd)`.
//!   A new noun (e.g. `plugin`) is a new file, one variant in [`Command`] and one match arm
//!   in [`run`].
//! - `client`: the REST client and the mapping of API errors to [`error::Failure`].
//! - `config`: the stored login (0600). `tls`: https with a pinned CA.
//! - `output`: tables, `--json`, `--quiet`, progress on a terminal.
//! - `error`: failure kinds and exit codes.
//!
//! REST shapes are the cloud's (`iotronic::api`, docs `/v1/openapi.json`); the CLI sends JSON
//! bodies built here and reads answers as `serde_json::Value`, so a field the cloud adds never
//! breaks it. The end-to-end tests (`iotronic/tests/cli.rs`, `tests/tests/cli.rs`) run this
//! binary against the real cloud and real boards.

mod client;
mod commands;
mod config;
pub mod error;
mod output;
mod tls;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use commands::completions::print_completions;
use config::{Config, Token};
use error::{Failure, Kind, Result};
pub use iotronic::api::BOARD_ACTIONS;
use output::Out;

/// The examples `s4t --help` ends with.
macro_rules! examples {
    () => {
        "Examples:
  S4T_PASSWORD=… s4t login --url http://cloud:8812 --user alice
  s4t board list
  s4t lease create pi1 pi2 --duration 2h
  s4t ssh pi1                      # a shell on the board, through the cloud
  s4t ssh pi1 -- uname -a          # one command
  s4t bridge pi1 pi2 --cidr 10.10.0.0/24
  s4t gpio pi1 write GPIO17 1
"
    };
}

/// The exit codes (docs/cli.md repeats them).
macro_rules! exit_codes {
    () => {
        "Exit codes:
  0  success
  1  unexpected error (a bug, or the cloud failed internally)
  2  bad arguments, or the cloud rejected the request as invalid
  3  not logged in, wrong password or expired token: run `s4t login`
  4  permission denied (role or project)
  5  not found (board, service, lease, VPN... in your project)
  6  conflict (board leased by another project, already exposed, name taken)
  7  board offline or unreachable (queue board commands with --queue)
  8  the board answered with an error
  9  timed out (the request may still complete: see `s4t request list`)
 10  cannot reach the cloud (check --url / S4T_URL)
 11  the cloud refuses for now: too many attempts (wait the time it says, then try again)
`s4t ssh` ends with the exit status of ssh (255: ssh's own error)."
    };
}

macro_rules! exit_codes_short {
    () => {
        "Exit codes: 0 ok, 1 unexpected, 2 bad arguments, 3 not logged in, 4 permission denied,
5 not found, 6 conflict, 7 board offline, 8 board error, 9 timed out, 10 cloud unreachable,
11 too many attempts (`s4t --help` explains them)."
    };
}

/// Options every command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Print JSON (for scripts) instead of tables and sentences.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only identifiers (or nothing); errors still go to stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// The cloud's REST endpoint, e.g. http://cloud:8812 (default: the one `s4t login` stored).
    #[arg(long, global = true, env = "S4T_URL", value_name = "URL")]
    pub url: Option<String>,
    /// A bearer token to use instead of the stored one.
    #[arg(long, global = true, env = "S4T_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Trust only the cloud CA with this SHA-256 fingerprint (https), as `iotronic serve` prints it.
    #[arg(long, global = true, env = "S4T_CA_FINGERPRINT", value_name = "sha256:HEX")]
    pub ca_fingerprint: Option<String>,
    /// Configuration file (default: ~/.config/s4t/config.toml).
    #[arg(long, global = true, env = "S4T_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Parser, Debug)]
#[command(
    name = "s4t",
    version,
    about = "Book, bridge and reach IoT boards through a Stack4Things cloud",
    after_help = concat!(examples!(), "\n", exit_codes_short!()),
    after_long_help = concat!(examples!(), "\n", exit_codes!())
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Log in: store the cloud's URL and a token in ~/.config/s4t/config.toml (mode 0600).
    Login(commands::auth::LoginArgs),
    /// Log out: revoke the token at the cloud, then forget the stored one.
    Logout,
    /// Show who the stored (or given) token belongs to.
    Whoami,
    /// Boards: list, show, create, update, delete, run actions, wait for a status.
    #[command(subcommand)]
    Board(commands::boards::BoardCmd),
    /// Leases: book boards for your project only, for a while.
    #[command(subcommand)]
    Lease(commands::leases::LeaseCmd),
    /// Services (TCP ports on boards) and their exposure on the cloud's public ports.
    #[command(subcommand)]
    Service(commands::services::ServiceCmd),
    /// Virtual networks joining boards (L2 or L3).
    #[command(subcommand)]
    Vpn(commands::vpns::VpnCmd),
    /// GPIO lines of a board: `s4t gpio BOARD list|read|write|watch`.
    Gpio(commands::pins::GpioArgs),
    /// I2C devices of a board: `s4t i2c BOARD read|write`.
    I2c(commands::pins::I2cArgs),
    /// Fleets: named groups of boards.
    #[command(subcommand)]
    Fleet(commands::fleets::FleetCmd),
    /// Plugins: user code run sandboxed on boards (create, inject, call, start, stop, status, remove).
    #[command(subcommand)]
    Plugin(commands::plugins::PluginCmd),
    /// Requests sent to boards and their results.
    #[command(subcommand)]
    Request(commands::requests::RequestCmd),
    /// Projects (administrators).
    #[command(subcommand)]
    Project(commands::auth::ProjectCmd),
    /// Users (administrators).
    #[command(subcommand)]
    User(commands::auth::UserCmd),
    /// Open SSH on a board: exposes its sshd if needed, waits for the tunnel, runs ssh.
    Ssh(commands::ssh::SshArgs),
    /// Carry stdin/stdout to a board's sshd, for `ssh -o ProxyCommand='s4t ssh-proxy %n'`.
    SshProxy(commands::ssh::SshProxyArgs),
    /// Print ~/.ssh/config entries so `ssh`, `scp` and `rsync` reach boards by name.
    SshConfig(commands::ssh::SshConfigArgs),
    /// Book boards if needed, join them in one new L2 VPN, print each board's address.
    Bridge(commands::vpns::BridgeArgs),
    /// The audit log, newest first (administrators: every project; managers: their own).
    Audit(commands::audit::AuditArgs),
    /// Print a shell completion script: `s4t completions bash > /etc/bash_completion.d/s4t`.
    Completions(commands::completions::CompletionsArgs),
}

/// What every command needs: the options, the stored login, how to print.
pub struct Ctx {
    pub global: Global,
    pub out: Out,
    pub config_path: PathBuf,
    pub config: Config,
}

impl Ctx {
    pub fn new(global: Global) -> Result<Ctx> {
        let config_path = match &global.config {
            Some(p) => p.clone(),
            None => config::default_path()?,
        };
        let config = Config::load(&config_path)?;
        let out = Out::new(global.json, global.quiet);
        Ok(Ctx { global, out, config_path, config })
    }

    /// The cloud's URL: `--url`/`S4T_URL`, else the stored one.
    pub fn url(&self) -> Result<String> {
        self.global.url.clone().or_else(|| self.config.url.clone()).ok_or_else(Failure::not_logged_in)
    }

    /// The CA pin: `--ca-fingerprint`, else the stored one if the stored login is for this URL.
    fn ca_fingerprint(&self) -> Option<&str> {
        let stored = self.stored_login_applies().then_some(self.config.ca_fingerprint.as_deref()).flatten();
        self.global.ca_fingerprint.as_deref().or(stored)
    }

    /// Whether the stored login was made at the cloud this run talks to. Its token and CA pin
    /// belong to that cloud only: with `--url`/`S4T_URL` naming another one, the token would
    /// hand that host the user's session (over plain http, maybe) and the pin would be wrong.
    fn stored_login_applies(&self) -> bool {
        match (&self.global.url, &self.config.url) {
            (None, _) => true,
            (Some(given), Some(stored)) => client::same_cloud(given, stored),
            (Some(_), None) => false,
        }
    }

    /// A client without a token (login).
    pub fn anonymous_client(&self) -> Result<client::Client> {
        client::Client::new(&self.url()?, None, self.ca_fingerprint())
    }

    /// A client with the token: `--token`/`S4T_TOKEN`, else the stored one, which goes only to
    /// the cloud that issued it.
    pub fn client(&self) -> Result<client::Client> {
        let url = self.url()?;
        let token = match &self.global.token {
            Some(t) => Token::new(t.clone()),
            None => {
                let stored = self.config.token.clone().ok_or_else(Failure::not_logged_in)?;
                if !self.stored_login_applies() {
                    let there = self.config.url.as_deref().unwrap_or("no URL");
                    return Err(Failure::new(Kind::Auth, format!("the stored login is for {there}, not {url}"))
                        .with_hint(format!(
                            "give a token for {url} with --token (or S4T_TOKEN), or log in there: \
                             s4t login --url {url} --user NAME"
                        )));
                }
                stored
            }
        };
        client::Client::new(&url, Some(token), self.ca_fingerprint())
    }
}

/// Runs one command line.
pub async fn run(cli: Cli) -> Result<()> {
    let mut ctx = Ctx::new(cli.global)?;
    use commands::*;
    match cli.command {
        Command::Login(a) => auth::login(&mut ctx, a).await,
        Command::Logout => auth::logout(&mut ctx).await,
        Command::Whoami => auth::whoami(&ctx).await,
        Command::Board(c) => boards::run(&ctx, c).await,
        Command::Lease(c) => leases::run(&ctx, c).await,
        Command::Service(c) => services::run(&ctx, c).await,
        Command::Vpn(c) => vpns::run(&ctx, c).await,
        Command::Gpio(a) => pins::gpio(&ctx, a).await,
        Command::I2c(a) => pins::i2c(&ctx, a).await,
        Command::Fleet(c) => fleets::run(&ctx, c).await,
        Command::Plugin(c) => plugins::run(&ctx, c).await,
        Command::Request(c) => requests::run(&ctx, c).await,
        Command::Project(c) => auth::project(&ctx, c).await,
        Command::User(c) => auth::user(&ctx, c).await,
        Command::Ssh(a) => ssh::ssh(&ctx, a).await,
        Command::SshProxy(a) => ssh::proxy(&ctx, a).await,
        Command::SshConfig(a) => ssh::config(&ctx, a).await,
        Command::Bridge(a) => vpns::bridge(&ctx, a).await,
        Command::Audit(a) => audit::run(&ctx, a).await,
        Command::Completions(a) => {
            print_completions(a.shell);
            Ok(())
        }
    }
}
