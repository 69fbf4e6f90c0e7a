//! The `wstunnel` command line: `server`, `client`, `token`, `wstun`.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use s4t_shared::token::{Claims, TokenKey};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::server::{Auth, DefaultHooks, Server, ServerConfig};
use crate::{client, tls, wstun};

#[derive(Parser, Debug)]
#[command(name = "wstunnel", version, about = "Reverse WebSocket tunnels for boards behind NAT")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the tunnel server (the cloud side).
    Server(ServerArgs),
    /// Run a tunnel client (the board side) exposing local ports on the server.
    Client(ClientArgs),
    /// Mint a tunnel token.
    Token(TokenArgs),
    /// The MDSLab wstun 1.0.11 command line (`-r -s PORT`, `-rPUBLIC:HOST:PORT ws://…`).
    Wstun {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Address the server accepts channels on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address public listeners bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub public_bind: IpAddr,
    /// File holding the token secret. Without it every tunnel is refused unless --insecure.
    #[arg(long, env = "WSTUNNEL_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Accept tunnels without tokens (tests, private labs).
    #[arg(long, conflicts_with = "secret_file")]
    pub insecure: bool,
    /// Also serve the wstun 1.0.11 protocol (unauthenticated) for --legacy-ports.
    #[arg(long)]
    pub legacy: bool,
    /// Ports wstun clients may listen on, as LOW-HIGH (default: the cloud's public ports, as
    /// the original draws them from 50000-60000: 50001-59999).
    #[arg(long, value_parser = parse_range, default_value = "50001-59999")]
    pub legacy_ports: RangeInclusive<u16>,
    /// Server-assigned ports (requests for port 0) come from LOW-HIGH; default: the OS picks.
    #[arg(long, value_parser = parse_range)]
    pub assign_ports: Option<RangeInclusive<u16>>,
    /// Serve wss:// with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Lanes (extra connections) a board channel may open to spread its streams over; 0
    /// offers none.
    #[arg(long, default_value_t = 4)]
    pub max_lanes: usize,
}

#[derive(Args)]
pub struct ClientArgs {
    /// The server, ws://HOST:PORT or wss://HOST:PORT.
    #[arg(long)]
    pub server: String,
    /// Expose HOST:PORT on the server's PUBLIC port (0: server-assigned). BIND is accepted for
    /// compatibility and ignored: the server decides the bind address.
    #[arg(short = 'R', value_name = "[BIND:]PUBLIC:HOST:PORT", required = true)]
    pub remote: Vec<String>,
    /// The tunnel token (from `wstunnel token` or the cloud).
    #[arg(long, env = "WSTUNNEL_TOKEN", default_value = "")]
    pub token: String,
    /// Trust only the CA certificates in this PEM file for wss:// (default: the system's CA
    /// bundle, `$SSL_CERT_FILE` or /etc/ssl/certs/ca-certificates.crt and the like).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Do not verify the server certificate (as wstun does).
    #[arg(long)]
    pub tls_insecure: bool,
    /// Open up to N lanes besides the channel (if the server offers them): the server spreads
    /// connections over them, so that an interactive session does not queue behind a bulk
    /// transfer on one TCP connection. 0: the channel alone.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub lanes: u16,
}

impl std::fmt::Debug for ClientArgs {
    /// Leaves out the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientArgs")
            .field("server", &self.server)
            .field("remote", &self.remote)
            .field("token", &if self.token.is_empty() { "" } else { "<hidden>" })
            .field("ca_file", &self.ca_file)
            .field("tls_insecure", &self.tls_insecure)
            .field("lanes", &self.lanes)
            .finish()
    }
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[arg(long)]
    pub secret_file: PathBuf,
    #[arg(long)]
    pub board: String,
    /// Public port (0: any port, or a packet channel with --vpn).
    #[arg(long)]
    pub port: u16,
    /// Validity in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// For a packet channel: the VPN.
    #[arg(long)]
    pub vpn: Option<String>,
}

fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or("expected LOW-HIGH")?;
    let (a, b) = (a.parse::<u16>().map_err(|e| e.to_string())?, b.parse::<u16>().map_err(|e| e.to_string())?);
    if a == 0 || a > b {
        return Err("expected 1 <= LOW <= HIGH".into());
    }
    Ok(a..=b)
}

fn read_secret(path: &Path) -> Result<TokenKey, Error> {
    let raw = std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let trimmed = raw.trim_ascii_end().to_vec();
    Ok(TokenKey::new(trimmed)?)
}

/// Runs a parsed command until it ends or `shutdown`.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Server(a) => run_server(a, shutdown).await,
        Cmd::Client(a) => run_client(a, shutdown).await,
        Cmd::Token(a) => {
            let key = read_secret(&a.secret_file)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let claims = Claims { board: a.board, port: a.port, vpn: a.vpn, expiry: now.saturating_add(a.ttl) };
            println!("{}", key.mint(&claims)?);
            Ok(())
        }
        Cmd::Wstun { args } => run_wstun(&args, shutdown).await,
    }
}

async fn run_server(a: ServerArgs, shutdown: CancellationToken) -> Result<(), Error> {
    let auth = match (&a.secret_file, a.insecure) {
        (Some(f), _) => Auth::Token(read_secret(f)?),
        (None, true) => Auth::Insecure,
        (None, false) => {
            tracing::warn!("no --secret-file: every tunnel will be refused (use --insecure for tests)");
            Auth::Disabled
        }
    };
    let mut cfg = ServerConfig::new(a.listen, auth);
    cfg.public_bind = a.public_bind;
    cfg.legacy = a.legacy;
    cfg.assign_ports = a.assign_ports;
    cfg.limits.max_lanes_per_channel = a.max_lanes;
    if let (Some(c), Some(k)) = (&a.tls_cert, &a.tls_key) {
        cfg.tls = Some(tls::server_config(c, k)?);
    }
    let hooks = DefaultHooks { legacy_ports: a.legacy.then_some(a.legacy_ports) };
    let server = Server::bind(cfg).await?;
    println!("listening on {}", server.local_addr());
    server.run(Arc::new(hooks), shutdown).await
}

/// Splits `[BIND:]PUBLIC:HOST:PORT` into (public port, `HOST:PORT`).
pub fn parse_remote(spec: &str) -> Result<(u16, String), Error> {
    let bad = || Error::Config(format!("-R {spec}: expected [BIND:]PUBLIC:HOST:PORT"));
    let parts: Vec<&str> = spec.split(':').collect();
    let (public, host, port) = match parts.as_slice() {
        [p, h, t] => (*p, *h, *t),
        [_bind, p, h, t] => (*p, *h, *t),
        _ => return Err(bad()),
    };
    let public = public.parse::<u16>().map_err(|_| bad())?;
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((public, format!("{host}:{port}")))
}

async fn run_client(a: ClientArgs, shutdown: CancellationToken) -> Result<(), Error> {
    let mut cfg = client::ClientConfig::new(a.server.clone());
    cfg.lanes = a.lanes;
    if a.server.starts_with("wss://") {
        cfg.tls = Some(match (&a.ca_file, a.tls_insecure) {
            (Some(ca), _) => tls::client_config_with_ca(ca)?,
            (None, true) => tls::client_config_insecure()?,
            (None, false) => tls::client_config_system()?,
        });
    }
    let remotes = a.remote.iter().map(|r| parse_remote(r)).collect::<Result<Vec<_>, _>>()?;
    let handle = client::start(cfg, shutdown.clone())?;
    for (public, target) in remotes {
        let (h, token) = (handle.clone(), a.token.clone());
        tokio::spawn(async move {
            match h.expose(token, public, target.clone()).await {
                Ok(e) => println!("exposed {target} on port {}", e.port),
                Err(e) => tracing::error!(target, cause = %e, "exposure refused"),
            }
        });
    }
    shutdown.cancelled().await;
    Ok(())
}

/// Whether the command line runs a tunnel server (the cloud side) rather than the board
/// side or a one-shot command: `cli`, or when the binary was called as `wstun`, wstun's
/// `args`. The server runs one worker per core, the rest on one thread.
pub fn runs_server(cli: Option<&Cli>, wstun_args: &[String]) -> bool {
    let wstun_args = match cli.map(|c| &c.cmd) {
        Some(Cmd::Server(_)) => return true,
        Some(Cmd::Wstun { args }) => args.as_slice(),
        Some(_) => return false,
        None => wstun_args,
    };
    matches!(wstun::parse(wstun_args), Ok(wstun::Command::Server { .. }))
}

/// Runs the wstun command line.
pub async fn run_wstun(args: &[String], shutdown: CancellationToken) -> Result<(), Error> {
    match wstun::parse(args)? {
        wstun::Command::Server { port, tls } => {
            let mut cfg = ServerConfig::new(SocketAddr::from(([0, 0, 0, 0], port)), Auth::Disabled);
            cfg.legacy = true;
            if let Some((c, k)) = tls {
                cfg.tls = Some(tls::server_config(&c, &k)?);
            }
            let hooks = DefaultHooks { legacy_ports: Some(1024..=65535) };
            let server = Server::bind(cfg).await?;
            println!("wstun-compatible server listening on {}", server.local_addr());
            server.run(Arc::new(hooks), shutdown).await
        }
        wstun::Command::Client(c) => c.run(shutdown).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_specs_parse() {
        assert_eq!(parse_remote("50022:127.0.0.1:22").unwrap(), (50022, "127.0.0.1:22".into()));
        assert_eq!(parse_remote("0.0.0.0:0:localhost:80").unwrap(), (0, "localhost:80".into()));
        assert!(parse_remote("22").is_err());
        assert!(parse_remote("x:127.0.0.1:22").is_err());
        assert_eq!(parse_range("50000-60000").unwrap(), 50000..=60000);
        assert!(parse_range("6-5").is_err());
    }

    #[test]
    fn servers_are_told_from_the_board_side() {
        let cli = |line: &str| Cli::parse_from(line.split(' '));
        let words = |line: &str| line.split(' ').map(String::from).collect::<Vec<_>>();
        assert!(runs_server(Some(&cli("wstunnel server --listen 127.0.0.1:0")), &[]));
        assert!(runs_server(Some(&cli("wstunnel wstun -r -s 8080")), &[]));
        assert!(!runs_server(Some(&cli("wstunnel wstun -r50022:127.0.0.1:22 ws://cloud:8080")), &[]));
        assert!(!runs_server(Some(&cli("wstunnel client --server ws://cloud:8080 --token t -R 0:127.0.0.1:22")), &[]));
        assert!(runs_server(None, &words("-r -s 8080")));
        assert!(!runs_server(None, &words("-r50022:127.0.0.1:22 ws://cloud:8080")));
    }

    #[test]
    fn the_client_command_line_shows_no_token_and_opens_one_lane_by_default() {
        let cli =
            Cli::parse_from("wstunnel client --server ws://cloud:8080 --token s3cr3t -R 0:127.0.0.1:22".split(' '));
        let shown = format!("{cli:?}");
        assert!(!shown.contains("s3cr3t") && shown.contains("ws://cloud:8080"), "{shown}");
        let Cmd::Client(a) = cli.cmd else { panic!("expected the client command") };
        assert_eq!(a.lanes, 1);
    }
}
