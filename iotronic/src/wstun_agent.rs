//! The wstun-agent: embeds the tunnel server (`wstunnel::server`) with hooks backed by the
//! database: a board may open a public listener only on a port the conductor allocated to it
//! (an `exposed_services` row), legacy wstun clients only on allocated ports. Tokens are
//! minted by the API/conductor with the cloud's tunnel key (a setting shared by every process).
//! Packet channels of VPN members end in the [`crate::vpn::Fabric`] (TAP/TUN devices,
//! bridges), which this agent runs and reconciles with the database. An exposure's
//! source-address allow-list is loaded when its listener is authorized and enforced at accept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use s4t_shared::token::{Claims, TokenKey};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wstunnel::packet::PacketChannel;
use wstunnel::server::{Auth, Refusal, Server, ServerConfig, ServerHandle, ServerHooks};

use crate::Error;
use crate::db::{Db, Exposure, NewAudit, admits, now_ms, parse_allow_list};
use crate::vpn::Fabric;

/// How long a tunnel token minted for an exposure stays valid.
pub const TOKEN_TTL_S: u64 = 7 * 24 * 3600;

/// Mints tunnel tokens for boards and knows where the tunnel server is.
#[derive(Clone)]
pub struct TunnelMint {
    pub url: String,
    /// Boards dial back the host they enrolled at ([`crate::ServeConfig::boards_dial_back`]):
    /// a board's tunnel URL is `url` with that host ([`TunnelMint::url_for`]).
    pub dial_back: bool,
    key: TokenKey,
}

impl std::fmt::Debug for TunnelMint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelMint").field("url", &self.url).finish_non_exhaustive()
    }
}

impl TunnelMint {
    /// The cloud's tunnel key from the database (created on first use).
    pub async fn load(db: &Db, url: String) -> Result<TunnelMint, Error> {
        let secret = db.setting_or_init("tunnel_key", crate::auth::random_secret).await?;
        let key = TokenKey::new(secret.into_bytes()).map_err(|e| Error::Invalid(format!("tunnel key: {e}")))?;
        Ok(TunnelMint { url, dial_back: false, key })
    }

    /// [`TunnelMint::load`] for a cloud whose boards dial back the host they enrolled at.
    pub fn dialing_back(mut self, dial_back: bool) -> TunnelMint {
        self.dial_back = dial_back;
        self
    }

    /// The tunnel server's URL for `board`: with the host it enrolled at when boards dial
    /// back, else the configured one.
    pub fn url_for(&self, board: &crate::db::Board) -> String {
        match board.dialed_host().filter(|_| self.dial_back) {
            Some(host) => with_host(&self.url, &host),
            None => self.url.clone(),
        }
    }

    pub fn key(&self) -> TokenKey {
        self.key.clone()
    }

    /// A token letting `board` listen on `port` (0: a packet channel for `vpn`), for a board
    /// last revoked or rotated at `tokens_after` (ms). Its issue time is in whole seconds, and
    /// one issued in the second of a rotation is refused ([`DbHooks::token_accepted`]: it may
    /// have been minted before it): a token minted after the rotation in that second is dated
    /// the next one.
    pub fn mint(&self, board: &str, port: u16, vpn: Option<&str>, tokens_after: Option<i64>) -> Result<String, Error> {
        let after_rotation = tokens_after.map_or(0, |ms| (ms + 999).div_euclid(1000));
        let issued = (now_ms() / 1000).max(after_rotation);
        let expiry = u64::try_from(issued).unwrap_or(0) + TOKEN_TTL_S;
        let claims = Claims { board: board.to_owned(), port, vpn: vpn.map(str::to_owned), expiry };
        self.key.mint(&claims).map_err(|e| Error::Invalid(format!("cannot mint a tunnel token: {e}")))
    }
}

/// `url` (`scheme://host:port/…`) with `host` instead of its host (an IPv6 address is
/// bracketed); `url` as it is when it has no host part.
pub fn with_host(url: &str, host: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let port = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(_, p)| p),
        None => authority.rfind(':').map_or("", |i| &authority[i..]),
    };
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
    format!("{scheme}://{host}{port}{tail}")
}

/// How often a wstun-agent stores its counters for `/metrics` ([`AgentStats`]).
pub const STATS_EVERY: Duration = Duration::from_secs(5);

/// What a wstun-agent has carried since it started, as it stores it (JSON in `agents.stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AgentStats {
    pub tunnel: wstunnel::TrafficStats,
    /// Packet counters by VPN.
    pub vpns: std::collections::BTreeMap<String, crate::vpn::VpnPackets>,
}

/// Stores the agent's counters now and every [`STATS_EVERY`], and once more when stopped.
async fn report_stats(db: Db, agent: String, server: ServerHandle, fabric: Arc<Fabric>, stop: CancellationToken) {
    loop {
        let stats = AgentStats { tunnel: server.stats(), vpns: fabric.packet_stats().into_iter().collect() };
        match serde_json::to_string(&stats) {
            Ok(json) => {
                if let Err(e) = db.set_agent_stats(&agent, "wstun", &json).await {
                    warn!(cause = %e, "cannot store the tunnel counters");
                }
            }
            Err(e) => warn!(cause = %e, "cannot encode the tunnel counters"),
        }
        if stop.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(STATS_EVERY) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// At most one log line and one audit entry per public port this often for refused sources
/// (a scan must not flood either); the entry counts the refusals since the previous one.
const REFUSAL_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// The allow-list of a public port, as loaded when its listener was authorized.
struct PortPolicy {
    allow: Vec<ipnet::IpNet>,
    project: String,
    refused: u64,
    reported: Option<Instant>,
}

/// The database's say on listeners, and the VPN data plane for packet channels.
struct DbHooks {
    db: Db,
    fabric: Arc<Fabric>,
    /// Port → policy, written before each listener opens (so never stale for an open one)
    /// and read synchronously at accept. A port without an entry admits nobody.
    policies: Mutex<HashMap<u16, PortPolicy>>,
}

impl DbHooks {
    /// Loads `e`'s allow-list for its port; `Err` (the listener is refused) if it cannot, or
    /// if the board is revoked (its tunnel tokens stay valid until they expire, its ports must
    /// not: nor may they look like a legacy board's, which has no secret either).
    async fn load_policy(&self, e: &Exposure) -> Result<(), Refusal> {
        let port =
            u16::try_from(e.public_port).map_err(|_| Refusal::Denied(format!("bad public port {}", e.public_port)))?;
        let allow = parse_allow_list(&e.allow).map_err(|err| Refusal::Denied(err.to_string()))?;
        // The database failing is no answer: the board keeps a working exposure and asks again.
        let unreadable = |err: Error| Refusal::Unavailable(format!("cannot read the board: {err}"));
        let project = match self.db.board_by_uuid(&e.board).await.map_err(unreadable)? {
            Some(b) => b.project,
            None => return Err(Refusal::Denied("the board no longer exists".into())),
        };
        if self.db.board_revoked_at(&e.board).await.map_err(unreadable)?.is_some() {
            return Err(Refusal::Denied("the board is revoked".into()));
        }
        let policy = PortPolicy { allow, project, refused: 0, reported: None };
        self.policies.lock().expect("policies").insert(port, policy);
        Ok(())
    }
}

impl ServerHooks for DbHooks {
    async fn authorize_listener(&self, board: &str, port: u16) -> Result<(), Refusal> {
        match self.db.exposure_by_port(i64::from(port)).await {
            Ok(Some(e)) if e.board == board => self.load_policy(&e).await,
            Ok(_) => Err(Refusal::Denied(format!("public port {port} is not allocated to this board"))),
            Err(e) => Err(Refusal::Unavailable(format!("cannot check the allocation: {e}"))),
        }
    }

    /// Tokens minted before the board's last revocation or rotation are refused: they were
    /// kept beside the secret that was replaced. A token's issue time is its expiry less
    /// [`TOKEN_TTL_S`], in whole seconds (rounded down): a token issued in the second of the
    /// rotation may have been minted before it, so it is refused too. A board's own tokens
    /// are not: it enrolls again with a code the operator hands over, seconds later at least.
    async fn token_accepted(&self, board: &str, expiry: u64) -> Result<(), Refusal> {
        let after = self
            .db
            .board_tokens_after(board)
            .await
            .map_err(|e| Refusal::Unavailable(format!("cannot read the board: {e}")))?;
        let issued_ms = i64::try_from(expiry.saturating_sub(TOKEN_TTL_S)).unwrap_or(i64::MAX).saturating_mul(1000);
        match after {
            Some(ms) if issued_ms < ms => {
                Err(Refusal::Denied("token issued before the board's credentials were last revoked or rotated".into()))
            }
            _ => Ok(()),
        }
    }

    fn connection_allowed(&self, board: &str, port: u16, peer: SocketAddr, legacy: bool) -> bool {
        let mut policies = self.policies.lock().expect("policies");
        let Some(p) = policies.get_mut(&port) else {
            warn!(board, port, %peer, "no policy loaded for this public port: connection closed");
            return false;
        };
        if admits(&p.allow, peer.ip()) {
            return true;
        }
        p.refused += 1;
        if p.reported.is_some_and(|t| t.elapsed() < REFUSAL_REPORT_INTERVAL) {
            return false;
        }
        let refused = std::mem::take(&mut p.refused);
        p.reported = Some(Instant::now());
        warn!(board, port, %peer, legacy, refused, "source not in the exposure's allow-list: connection closed");
        let entry = NewAudit {
            user_name: "iotronic".into(),
            project_uuid: p.project.clone(),
            action: "tunnel.refused".into(),
            target: board.into(),
            source: peer.ip().to_canonical().to_string(),
            status: 1,
            detail: format!("public port {port}: source not allowed ({refused} refused since the last entry)"),
            ..NewAudit::default()
        };
        drop(policies);
        crate::audit::spawn_record(&self.db, entry);
        false
    }

    async fn legacy_port_allowed(&self, port: u16) -> bool {
        self.legacy_port_board(port).await.is_some()
    }

    /// Unauthenticated wstun clients get only ports allocated to a legacy board (one without a
    /// credential): a board with a credential tunnels with its token, and its ports must not
    /// be claimable by anyone else.
    async fn legacy_port_board(&self, port: u16) -> Option<String> {
        let e = self.db.exposure_by_port(i64::from(port)).await.ok()??;
        let b = self.db.board_by_uuid(&e.board).await.ok()??;
        if b.secret_salt.is_some() {
            return None;
        }
        self.load_policy(&e).await.ok()?;
        Some(b.uuid)
    }

    fn listener_opened(&self, board: &str, port: u16, legacy: bool) {
        info!(board, port, legacy, "public listener opened");
        let entry = crate::audit::system("tunnel.open", board, &format!("public port {port}"));
        crate::audit::spawn_record(&self.db, entry);
    }

    fn listener_closed(&self, board: &str, port: u16, legacy: bool) {
        info!(board, port, legacy, "public listener closed");
        let entry = crate::audit::system("tunnel.close", board, &format!("public port {port}"));
        crate::audit::spawn_record(&self.db, entry);
    }

    /// Policy says no for good (no such VPN, not a member, a bad row); anything else (the
    /// database, the host's devices) may pass, and the board keeps a channel it had.
    async fn packet_channel(&self, board: &str, vpn: &str, channel: PacketChannel) -> Result<(), Refusal> {
        self.fabric.attach(board, vpn, channel).await.map_err(|e| match e {
            Error::NotFound(_) | Error::Forbidden(_) | Error::Invalid(_) => Refusal::Denied(e.to_string()),
            e => Refusal::Unavailable(e.to_string()),
        })
    }
}

/// Ports of `pool` inside the host's ephemeral range (`range`, from
/// `net.ipv4.ip_local_port_range`) that `reserved` (`net.ipv4.ip_local_reserved_ports`, e.g.
/// `50001-59999,60100`) does not reserve: the host may use them for outgoing connections, and
/// a board's listener on one then fails.
fn unreserved_pool_ports(pool: (u16, u16), range: &str, reserved: &str) -> usize {
    let mut it = range.split_whitespace().filter_map(|n| n.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (it.next(), it.next()) else { return 0 };
    let reserved: Vec<(u16, u16)> = reserved
        .trim()
        .split(',')
        .filter_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect();
    (pool.0.max(lo)..=pool.1.min(hi)).filter(|p| !reserved.iter().any(|(a, b)| (*a..=*b).contains(p))).count()
}

fn warn_unless_pool_reserved() {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}")).unwrap_or_default();
    let (lo, hi) = crate::conductor::PUBLIC_PORTS;
    let n = unreserved_pool_ports((lo, hi), &read("ip_local_port_range"), &read("ip_local_reserved_ports"));
    if n > 0 {
        warn!(
            ports = n,
            "{n} public ports of {lo}-{hi} are in the host's ephemeral range and not reserved: an outgoing \
             connection may hold one when a board needs it; reserve them with \
             `sysctl -w net.ipv4.ip_local_reserved_ports={lo}-{hi}`"
        );
    }
}

/// Runs the tunnel server on `listener` (wss with `tls`) until `shutdown`, as agent
/// `config.agent_name`; public listeners bind `config.bind`, legacy wstun clients are served
/// when `config.legacy_boards`.
pub async fn run(
    db: Db,
    config: &crate::ServeConfig,
    mint: &TunnelMint,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (agent, public_bind, legacy) = (config.agent_name.as_str(), config.bind, config.legacy_boards);
    let std_listener = listener.into_std().map_err(Error::Serve)?;
    let mut cfg = ServerConfig::new(SocketAddr::from(([0, 0, 0, 0], 0)), Auth::Token(mint.key()));
    cfg.listen = wstunnel::server::ListenOn::Listener(std_listener);
    cfg.public_bind = public_bind;
    cfg.legacy = legacy;
    cfg.tls = tls;
    cfg.limits.max_public_per_source = config.public_per_source;
    let server = Server::bind(cfg).await.map_err(|e| Error::Unavailable(format!("tunnel server: {e}")))?;
    warn_unless_pool_reserved();
    crate::revocation::spawn_tunnel_guard(db.clone(), server.handle(), shutdown.clone());
    let fabric = Fabric::start(db.clone()).await?;
    let stop = shutdown.child_token();
    let reconciler = tokio::spawn(fabric.clone().run(stop.clone()));
    let reporter =
        tokio::spawn(report_stats(db.clone(), agent.to_owned(), server.handle(), fabric.clone(), stop.clone()));
    let hooks = DbHooks { db, fabric, policies: Mutex::default() };
    let r = server.run(Arc::new(hooks), shutdown).await;
    stop.cancel();
    let _ = reconciler.await;
    let _ = reporter.await;
    if let Err(e) = &r {
        warn!(cause = %e, "the tunnel server stopped");
    }
    r.map_err(|e| Error::Unavailable(format!("tunnel server: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_take_the_host_a_board_dialed() {
        assert_eq!(with_host("wss://cloud:8080/", "10.0.0.1"), "wss://10.0.0.1:8080/");
        assert_eq!(with_host("ws://cloud:8181/", "2001:db8::1"), "ws://[2001:db8::1]:8181/");
        assert_eq!(with_host("wss://[::1]:8080/x?y", "[2001:db8::1]"), "wss://[2001:db8::1]:8080/x?y");
        assert_eq!(with_host("wss://cloud/", "h.example"), "wss://h.example/");
        assert_eq!(with_host("not a url", "h"), "not a url");
    }

    /// A token's issue time is in whole seconds, so one issued in the second of a rotation
    /// may have been minted before it: refused. One of the next second is accepted, and so
    /// is one issued at a rotation that fell on a whole second (minted at or after it).
    #[tokio::test]
    async fn tokens_issued_in_the_second_of_a_rotation_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&crate::db::DatabaseUrl::sqlite_in(dir.path())).await.unwrap();
        let p = db.create_project("p").await.unwrap();
        let nb = crate::db::NewBoard { name: "b".into(), code: "CODE-B".into(), project: p.uuid, ..Default::default() };
        let board = db.insert_board(nb).await.unwrap().uuid;
        let hooks =
            DbHooks { db: db.clone(), fabric: Fabric::start(db.clone()).await.unwrap(), policies: Mutex::default() };
        let rotate_at = |ms: i64| {
            let q = sqlx::query("UPDATE boards SET tokens_after = $1 WHERE uuid = $2").bind(ms).bind(board.clone());
            async { q.execute(db.pool()).await.unwrap() }
        };
        // The expiry of a token minted in second `s` (as `TunnelMint::mint` computes it).
        let minted_in = |s: i64| s as u64 + TOKEN_TTL_S;
        let second = now_ms() / 1000;
        rotate_at(second * 1000 + 500).await;
        let refused = hooks.token_accepted(&board, minted_in(second)).await;
        assert!(matches!(refused, Err(Refusal::Denied(_))), "a token issued in the rotation's second: {refused:?}");
        assert!(matches!(hooks.token_accepted(&board, minted_in(second - 1)).await, Err(Refusal::Denied(_))));
        assert!(hooks.token_accepted(&board, minted_in(second + 1)).await.is_ok(), "a token of the next second");
        // Minted after the rotation, in its second: dated the next one, so accepted.
        let mint = TunnelMint::load(&db, "wss://t:8080/".into()).await.unwrap();
        let claims = |t: String| mint.key().verify(&t, 0).unwrap();
        let after = claims(mint.mint(&board, 50_000, None, Some(second * 1000 + 500)).unwrap());
        assert!(hooks.token_accepted(&board, after.expiry).await.is_ok(), "a token minted after the rotation");
        rotate_at(second * 1000).await;
        assert!(hooks.token_accepted(&board, minted_in(second)).await.is_ok(), "issued at a whole-second rotation");
        assert!(matches!(hooks.token_accepted(&board, minted_in(second - 1)).await, Err(Refusal::Denied(_))));
    }

    #[test]
    fn the_public_pool_is_checked_against_the_ephemeral_range() {
        let pool = (50001, 59999);
        assert_eq!(unreserved_pool_ports(pool, "32768\t60999\n", "\n"), 9999);
        assert_eq!(unreserved_pool_ports(pool, "32768\t60999\n", "50001-59999\n"), 0);
        assert_eq!(unreserved_pool_ports(pool, "32768 60999", "50001-55000,55002-59999"), 1);
        assert_eq!(unreserved_pool_ports(pool, "32768 50100", "8080"), 100);
        assert_eq!(unreserved_pool_ports(pool, "1024 40000", ""), 0, "ephemeral range below the pool");
        assert_eq!(unreserved_pool_ports(pool, "", ""), 0, "unreadable: nothing to say");
    }
}
