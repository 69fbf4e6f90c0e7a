//! The wstun-agent: embeds the tunnel server (`wstunnel::server`) with hooks backed by the
//! database: a board may open a public listener only on a port the conductor allocated to it
//! (an `exposed_services` row), legacy wstun clients only on allocated ports. Tokens are
//! minted by the API/conductor with the cloud's tunnel key (a setting shared by every process).
//! Packet channels of VPN members end in the [`crate::vpn::Fabric`] (TAP/TUN devices,
//! bridges), which this agent runs and reconciles with the database.

use std::net::SocketAddr;
use std::sync::Arc;

use s4t_shared::token::{Claims, TokenKey};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wstunnel::packet::PacketChannel;
use wstunnel::server::{Auth, Server, ServerConfig, ServerHooks};

use crate::Error;
use crate::db::{Db, now_ms};
use crate::vpn::Fabric;

/// How long a tunnel token minted for an exposure stays valid.
pub const TOKEN_TTL_S: u64 = 7 * 24 * 3600;

/// Mints tunnel tokens for boards and knows where the tunnel server is.
#[derive(Clone)]
pub struct TunnelMint {
    pub url: String,
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
        Ok(TunnelMint { url, key })
    }

    pub fn key(&self) -> TokenKey {
        self.key.clone()
    }

    /// A token letting `board` listen on `port` (0: a packet channel for `vpn`).
    pub fn mint(&self, board: &str, port: u16, vpn: Option<&str>) -> Result<String, Error> {
        let expiry = (now_ms() / 1000) as u64 + TOKEN_TTL_S;
        let claims = Claims { board: board.to_owned(), port, vpn: vpn.map(str::to_owned), expiry };
        self.key.mint(&claims).map_err(|e| Error::Invalid(format!("cannot mint a tunnel token: {e}")))
    }
}

/// The database's say on listeners, and the VPN data plane for packet channels.
struct DbHooks {
    db: Db,
    fabric: Arc<Fabric>,
}

impl ServerHooks for DbHooks {
    async fn authorize_listener(&self, board: &str, port: u16) -> Result<(), String> {
        match self.db.exposure_by_port(i64::from(port)).await {
            Ok(Some(e)) if e.board == board => Ok(()),
            Ok(_) => Err(format!("public port {port} is not allocated to this board")),
            Err(e) => Err(format!("cannot check the allocation: {e}")),
        }
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
        b.secret_salt.is_none().then_some(b.uuid)
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

    async fn packet_channel(&self, board: &str, vpn: &str, channel: PacketChannel) -> Result<(), String> {
        self.fabric.attach(board, vpn, channel).await.map_err(|e| e.to_string())
    }
}

/// Runs the tunnel server on `listener` until `shutdown`; public listeners bind `public_bind`.
pub async fn run(
    db: Db,
    mint: &TunnelMint,
    listener: TcpListener,
    public_bind: std::net::IpAddr,
    legacy: bool,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let std_listener = listener.into_std().map_err(Error::Serve)?;
    let mut cfg = ServerConfig::new(SocketAddr::from(([0, 0, 0, 0], 0)), Auth::Token(mint.key()));
    cfg.listen = wstunnel::server::ListenOn::Listener(std_listener);
    cfg.public_bind = public_bind;
    cfg.legacy = legacy;
    let server = Server::bind(cfg).await.map_err(|e| Error::Unavailable(format!("tunnel server: {e}")))?;
    crate::revocation::spawn_tunnel_guard(db.clone(), server.handle(), shutdown.clone());
    let fabric = Fabric::start(db.clone()).await?;
    let stop = shutdown.child_token();
    let reconciler = tokio::spawn(fabric.clone().run(stop.clone()));
    let r = server.run(Arc::new(DbHooks { db, fabric }), shutdown).await;
    stop.cancel();
    let _ = reconciler.await;
    if let Err(e) = &r {
        warn!(cause = %e, "the tunnel server stopped");
    }
    r.map_err(|e| Error::Unavailable(format!("tunnel server: {e}")))
}
