//! `iotronic`: the Stack4Things cloud.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use iotronic::ServeConfig;
use iotronic::bus::AmqpUrl;
use iotronic::db::DatabaseUrl;
use iotronic::serve::{
    bind_tunnels, bind_wamp, open_bus, open_database, run_api, run_conductor, run_wamp_agent, run_wstun_agent,
};

#[derive(Parser)]
#[command(name = "iotronic", version, about = "Stack4Things cloud: REST API, conductor, WAMP and tunnel agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Directory for the database, certificates and other state.
    #[arg(long, env = "IOTRONIC_DATA_DIR", default_value = "/var/lib/iotronic")]
    data_dir: PathBuf,
    /// Address of every listener.
    #[arg(long, env = "IOTRONIC_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// REST API port.
    #[arg(long, env = "IOTRONIC_REST_PORT", default_value_t = iotronic::config::REST_PORT)]
    rest_port: u16,
    /// WAMP router port (wamp-agent).
    #[arg(long, env = "IOTRONIC_WAMP_PORT", default_value_t = iotronic::config::WAMP_PORT)]
    wamp_port: u16,
    /// Tunnel server port (wstun-agent).
    #[arg(long, env = "IOTRONIC_TUNNEL_PORT", default_value_t = iotronic::config::TUNNEL_PORT)]
    tunnel_port: u16,
    /// Host name boards are told to dial (default: --bind; with neither, each board is told the
    /// host it enrolled at).
    #[arg(long, env = "IOTRONIC_PUBLIC_HOST")]
    public_host: Option<String>,
    /// PostgreSQL URL (postgres://…); default: a SQLite file in the data directory.
    #[arg(long, env = "IOTRONIC_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// RabbitMQ URL (amqp://…); default: the in-process bus (only with `serve`).
    #[arg(long, env = "IOTRONIC_AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
    /// Prefix of RabbitMQ queue names.
    #[arg(long, env = "IOTRONIC_BUS_PREFIX", default_value = iotronic::config::DEFAULT_BUS_PREFIX)]
    bus_prefix: String,
    /// This wamp-agent's name (used in procedure names; never the hostname by accident).
    #[arg(long, env = "IOTRONIC_AGENT_NAME", default_value = iotronic::config::DEFAULT_AGENT)]
    agent_name: String,
    /// Accept the original Python lightning-rod (anonymous, restricted WAMP; wstun tunnels).
    #[arg(long, env = "IOTRONIC_LEGACY_BOARDS")]
    legacy_boards: bool,
    /// Serve HTTP and WS without TLS (tests, legacy boards on a trusted network). Default:
    /// HTTPS and WSS with the cloud's own CA, whose fingerprint is printed at start.
    #[arg(long, env = "IOTRONIC_PLAINTEXT")]
    plaintext: bool,
    /// Serve this PEM certificate chain (leaf first) instead of the cloud's own CA; boards pin
    /// the last certificate of the chain.
    #[arg(long, env = "IOTRONIC_TLS_CERT", value_name = "FILE", requires = "tls_key", conflicts_with = "plaintext")]
    tls_cert: Option<PathBuf>,
    /// The address ranges VPNs may use, comma-separated CIDRs (default: the private ranges
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 and 100.64.0.0/10). Leave out ranges of the
    /// cloud host's own networks: the host routes VPN addresses.
    #[arg(long, env = "IOTRONIC_VPN_RANGES", value_delimiter = ',', value_parser = parse_range)]
    vpn_ranges: Vec<String>,
    /// Public ports (exposed services) one project may hold at once; administrators are not
    /// limited. The pool has 9,999: one tenant cannot take every other's.
    #[arg(long, env = "IOTRONIC_PORTS_PER_PROJECT", default_value_t = iotronic::config::DEFAULT_PORTS_PER_PROJECT)]
    ports_per_project: u32,
    /// Connections one source address may have open to the boards' public ports, all ports
    /// together (anyone may connect to them). Raise it when the users come through one NAT
    /// address.
    #[arg(long, env = "IOTRONIC_PUBLIC_CONNECTIONS_PER_SOURCE", default_value_t = iotronic::config::DEFAULT_PUBLIC_PER_SOURCE)]
    public_connections_per_source: usize,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "IOTRONIC_TLS_KEY", value_name = "FILE", requires = "tls_cert", conflicts_with = "plaintext")]
    tls_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every cloud process in one, on the embedded default (SQLite + in-process bus).
    Serve(Common),
    /// The REST API alone (needs --amqp-url to reach a conductor).
    Api(Common),
    /// The conductor alone.
    Conductor(Common),
    /// A wamp-agent alone.
    WampAgent(Common),
    /// A wstun-agent alone: the tunnel server.
    WstunAgent(Common),
    /// Database maintenance.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Apply the embedded migrations and exit.
    Migrate(Common),
}

fn parse_range(s: &str) -> Result<String, String> {
    let net: ipnet::Ipv4Net = s.trim().parse().map_err(|_| format!("{s:?} is not an IPv4 CIDR such as 10.0.0.0/8"))?;
    Ok(net.trunc().to_string())
}

fn config(c: Common) -> ServeConfig {
    let mut config = ServeConfig::new(c.data_dir);
    config.bind = c.bind;
    config.rest_port = c.rest_port;
    config.wamp_port = c.wamp_port;
    config.tunnel_port = c.tunnel_port;
    config.public_host = c.public_host;
    config.legacy_boards = c.legacy_boards;
    config.plaintext = c.plaintext;
    config.tls_cert = c.tls_cert;
    config.tls_key = c.tls_key;
    config.database_url = c.database_url.map(DatabaseUrl::new);
    config.amqp_url = c.amqp_url.map(AmqpUrl::new);
    config.bus_prefix = c.bus_prefix;
    config.agent_name = c.agent_name;
    if !c.vpn_ranges.is_empty() {
        config.vpn_ranges = c.vpn_ranges;
    }
    config.ports_per_project = c.ports_per_project;
    config.public_per_source = c.public_connections_per_source;
    config.admin_password = std::env::var("IOTRONIC_ADMIN_PASSWORD").ok();
    config
}

fn main() -> anyhow::Result<()> {
    // Everything the cloud creates (the data directory, the database and its -wal and -shm
    // files, keys, temporary files) is its own: the systemd units say UMask=0077, and a cloud
    // started by hand under the usual 022 would otherwise leave the tunnel key, the boards'
    // derived keys and the password hashes readable by every user of the host. Files meant
    // to be read (certificates, the CA fingerprint) set their mode explicitly.
    // SAFETY: umask only sets the process's file-creation mask; no threads exist yet.
    unsafe { libc::umask(0o077) };
    wstunnel::process::init_tracing();
    wstunnel::process::raise_fd_limit();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = wstunnel::process::shutdown_on_signal();
        match cli.command {
            Command::Serve(c) => iotronic::serve(config(c), shutdown, None).await.context("iotronic serve failed"),
            Command::Db { command: DbCommand::Migrate(c) } => {
                open_database(&config(c)).await.context("migration failed")?;
                println!("iotronic: database migrated");
                Ok(())
            }
            Command::WstunAgent(c) => {
                let config = config(c);
                let db = open_database(&config).await?;
                let listener = bind_tunnels(&config).await?;
                run_wstun_agent(&config, db, listener, shutdown).await.context("iotronic wstun-agent failed")
            }
            Command::Api(c) | Command::Conductor(c) | Command::WampAgent(c) if c.amqp_url.is_none() => {
                anyhow::bail!("separate processes talk over RabbitMQ: give --amqp-url (or run `iotronic serve`)")
            }
            Command::Api(c) => {
                let config = config(c);
                let (db, bus) = (open_database(&config).await?, open_bus(&config).await?);
                run_api(&config, db, bus, shutdown, None).await.context("iotronic api failed")
            }
            Command::Conductor(c) => {
                let config = config(c);
                let (db, bus) = (open_database(&config).await?, open_bus(&config).await?);
                run_conductor(db, bus, shutdown).await.context("iotronic conductor failed")
            }
            Command::WampAgent(c) => {
                let config = config(c);
                let (db, bus) = (open_database(&config).await?, open_bus(&config).await?);
                let listener = bind_wamp(&config).await?;
                run_wamp_agent(&config, db, bus, listener, shutdown).await.context("iotronic wamp-agent failed")
            }
        }
    })
}
