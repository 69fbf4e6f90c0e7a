//! Configuration of the cloud processes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::bus::AmqpUrl;
use crate::db::DatabaseUrl;

/// Default ports, fixed by the original Stack4Things deployment.
pub const REST_PORT: u16 = 8812;
pub const WAMP_PORT: u16 = 8181;
pub const TUNNEL_PORT: u16 = 8080;
/// Default agent name (never the hostname: S4T-REFERENCE §9.2).
pub const DEFAULT_AGENT: &str = "agent";
/// Default prefix of RabbitMQ queue and exchange names.
pub const DEFAULT_BUS_PREFIX: &str = "iotronic";

/// Everything the cloud processes need. Plain data; the CLI fills it in `main.rs`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where the SQLite database, the CA and other state live.
    pub data_dir: PathBuf,
    /// Address of every listener.
    pub bind: IpAddr,
    /// Ports; 0 picks a free port (tests).
    pub rest_port: u16,
    pub wamp_port: u16,
    pub tunnel_port: u16,
    /// Accept the original Python lightning-rod (anonymous WAMP, wstun protocol).
    pub legacy_boards: bool,
    /// Serve HTTP and WS without TLS (default: HTTPS and WSS with the cloud's own CA).
    pub plaintext: bool,
    /// The operator's PEM certificate chain and key, served instead of the cloud's own CA.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PostgreSQL (or another SQLite file); default: `data_dir/iotronic.sqlite`.
    pub database_url: Option<DatabaseUrl>,
    /// RabbitMQ; default: the in-process bus.
    pub amqp_url: Option<AmqpUrl>,
    /// Prefix of queue names on RabbitMQ.
    pub bus_prefix: String,
    /// This wamp-agent's name.
    pub agent_name: String,
    /// Password of the bootstrap admin (first start only); generated and printed if unset.
    pub admin_password: Option<String>,
    /// How long a synchronous REST call waits for a board.
    pub call_timeout: Duration,
    /// Host name or address boards are told to dial (default: `bind`, or this machine's
    /// host name when binding all addresses).
    pub public_host: Option<String>,
    /// The address ranges VPNs may use (`--vpn-ranges`; default [`DEFAULT_VPN_RANGES`]).
    pub vpn_ranges: Vec<String>,
    /// Public ports one project may hold (`--ports-per-project`).
    pub ports_per_project: u32,
    /// Connections one source address may have open to the boards' public ports, all
    /// together (`--public-connections-per-source`): a cloud whose users all come through
    /// one NAT address raises it.
    pub public_per_source: usize,
    /// How long the REST API waits for a client's request.
    pub http_timeouts: crate::listen::HttpTimeouts,
}

/// Public ports one project may hold unless the operator says otherwise: a tenth of the pool.
pub const DEFAULT_PORTS_PER_PROJECT: u32 = 1000;

/// Connections one source address may have open to the public ports unless the operator says
/// otherwise (the tunnel server's own default).
pub const DEFAULT_PUBLIC_PER_SOURCE: usize = 256;

/// Where VPN ranges may lie unless the operator says otherwise: the private ranges (RFC 1918)
/// and shared address space (RFC 6598). The cloud host routes VPN addresses (a cloud address,
/// L3 host routes), so a VPN over a public range would take the host's traffic for those
/// addresses (a DNS server, the database, another board's NAT address) to a user's board.
/// An operator whose own networks lie in these ranges narrows the list.
pub const DEFAULT_VPN_RANGES: &[&str] = &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"];

impl ServeConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        ServeConfig {
            data_dir,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            rest_port: REST_PORT,
            wamp_port: WAMP_PORT,
            tunnel_port: TUNNEL_PORT,
            legacy_boards: false,
            plaintext: false,
            tls_cert: None,
            tls_key: None,
            database_url: None,
            amqp_url: None,
            bus_prefix: DEFAULT_BUS_PREFIX.into(),
            agent_name: DEFAULT_AGENT.into(),
            admin_password: None,
            call_timeout: Duration::from_secs(30),
            public_host: None,
            vpn_ranges: DEFAULT_VPN_RANGES.iter().map(|s| (*s).to_owned()).collect(),
            ports_per_project: DEFAULT_PORTS_PER_PROJECT,
            public_per_source: DEFAULT_PUBLIC_PER_SOURCE,
            http_timeouts: crate::listen::HttpTimeouts::default(),
        }
    }

    pub fn rest_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.rest_port)
    }

    /// The host boards dial.
    pub fn public_host(&self) -> String {
        if let Some(h) = &self.public_host {
            return h.clone();
        }
        if !self.bind.is_unspecified() {
            return match self.bind {
                IpAddr::V6(a) => format!("[{a}]"),
                a => a.to_string(),
            };
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }

    /// Whether boards are told to dial the host they enrolled at: no `--public-host` and every
    /// address bound. The cloud then has no one address to give (the host name may not resolve
    /// where the boards are, and a board reached the cloud at the host it dialed).
    pub fn boards_dial_back(&self) -> bool {
        self.public_host.is_none() && self.bind.is_unspecified()
    }

    /// `ws` or `wss`: the scheme of the URLs boards are given.
    pub fn ws_scheme(&self) -> &'static str {
        if self.plaintext { "ws" } else { "wss" }
    }

    pub fn database_url(&self) -> DatabaseUrl {
        self.database_url.clone().unwrap_or_else(|| DatabaseUrl::sqlite_in(&self.data_dir))
    }
}
