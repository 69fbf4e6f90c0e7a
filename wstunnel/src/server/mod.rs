//! The tunnel server the cloud's wstun-agent embeds (and `wstunnel server` runs).
//!
//! ```no_run
//! # async fn demo() -> Result<(), wstunnel::Error> {
//! use std::sync::Arc;
//! use wstunnel::server::{Auth, DefaultHooks, Server, ServerConfig};
//! let key = s4t_shared::token::TokenKey::new(b"secret".to_vec())?;
//! let server = Server::bind(ServerConfig::new("127.0.0.1:0".parse().unwrap(), Auth::Token(key))).await?;
//! let handle = server.handle(); // close_board / close_listener / listeners
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(server.run(Arc::new(DefaultHooks::default()), shutdown.clone()));
//! # Ok(()) }
//! ```
//!
//! One TCP port serves three kinds of WebSocket upgrade, told apart by subprotocol and query:
//! our multiplexed channel (subprotocol `s4t-tunnel`), and the two sockets of MDSLab wstun
//! 1.0.11 (`?dst=host:port` control, `?id=<id>` data; subprotocol `tunnel-protocol`), the
//! latter only when [`ServerConfig::legacy`] is set and [`ServerHooks::legacy_port_allowed`]
//! agrees. A plain GET gets a status page.

mod channel;
mod hooks;
mod lane;
mod legacy;
mod registry;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use s4t_shared::token::TokenKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use hooks::{DefaultHooks, Refusal, ServerHooks};
pub(crate) use legacy::pipe as pipe_legacy;
pub use registry::{ListenerInfo, ServerHandle};

use crate::error::{Error, IoContext};
use crate::handshake::{self, LANE_SUBPROTOCOL, LEGACY_SUBPROTOCOL, Route, SUBPROTOCOL, UNMASKED_SUBPROTOCOL};
use crate::transport::{Buffered, Split, Transport};
use registry::{Registry, Unproved};

/// How listener and packet-channel requests are authenticated.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Tokens minted with this key ([`s4t_shared::token`]).
    Token(TokenKey),
    /// Anything goes (tests, a private lab). Every channel's board is `"insecure"`.
    Insecure,
    /// No secret configured: every listener and packet channel is refused.
    Disabled,
}

/// Where the server accepts channels.
#[derive(Debug)]
pub enum ListenOn {
    Addr(SocketAddr),
    /// An already bound listener (socket activation, tests that bound port 0).
    Listener(std::net::TcpListener),
}

/// Limits that bound what one peer can make the server hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Simultaneous connections (channels, legacy sockets, handshakes in progress).
    pub max_connections: usize,
    pub max_listeners_per_channel: usize,
    pub max_streams_per_channel: usize,
    pub max_packet_channels_per_channel: usize,
    /// Lanes a channel may have besides its own connection (0: none are offered). Each is one
    /// more connection of the board, which spreads its streams over several TCP connections.
    pub max_lanes_per_channel: usize,
    /// A lane closes once its channel has had no stream for between one and two of these (the
    /// board dials it again with the next stream), so idle boards hold one connection each.
    pub lane_idle: Duration,
    /// Flow-control window per stream and direction: the most one stream can make the
    /// receiving side buffer.
    pub window: u32,
    /// The most one channel buffers for streams whose users do not read (each stream also
    /// within its window): beyond, the stream holding the most is reset.
    pub max_buffered_per_channel: usize,
    /// TLS + HTTP upgrade + Hello must complete within this.
    pub handshake_timeout: Duration,
    /// A WebSocket ping is sent this often on every channel.
    pub ping_interval: Duration,
    /// A channel on which nothing (not even a pong) arrives for this long is closed.
    pub idle_timeout: Duration,
    /// A channel that has not presented a valid token (with a `Listen` or `PacketOpen`) this
    /// long after its `Welcome` is closed: without it, anonymous peers that only answer pings
    /// could hold every connection slot. A channel that has presented one is kept, even once
    /// it has nothing open: it belongs to a board the cloud can revoke.
    pub token_timeout: Duration,
    /// When a channel asks for a port an older channel of the same board holds, the older one
    /// is pinged and must answer within this, or it is presumed dead (the board reconnected
    /// before the server noticed) and closed so the port can be taken over.
    pub liveness_probe: Duration,
    /// Connections one source address may have open that have not proved themselves yet (a
    /// channel before its first valid token, a lane before its key, a wstun socket before its
    /// upgrade): beyond, new ones from it are dropped at accept. Boards behind one NAT share
    /// it only for the moment between connecting and their first `Listen`.
    pub max_unproved_per_source: usize,
    /// The largest WebSocket message (and frame) a connection may send before it has proved
    /// itself: a larger one closes it at its header, before the server allocates or reads
    /// anything for it (else every unproved connection could make the server hold a full
    /// message, 256 KiB). What a board sends before then is small: `Hello`, `Listen`
    /// and `PacketOpen` (a token and a VPN name of at most 1 KiB each), `Lane`, pings.
    pub max_unproved_message: usize,
    /// How long an accepted legacy connection waits for the board's `?id=` data socket.
    pub legacy_pending_timeout: Duration,
    /// Accepted legacy connections waiting for their data socket, server-wide.
    pub legacy_max_pending: usize,
    /// Connections one legacy listener holds, waiting or piped to their data socket: beyond,
    /// new ones are closed at accept. A data socket is not counted in
    /// [`Limits::max_connections`] once attached (its public connection is counted here and
    /// among the public ones), so one legacy port's users cannot take every board's slots.
    pub legacy_max_per_port: usize,
    /// Connections one source address may have open to the public ports, all ports (legacy
    /// ones included) together: beyond, new ones from it are closed at accept. Users are
    /// anonymous, and without it one peer could hold every public connection the server takes.
    pub max_public_per_source: usize,
    /// Connections open to the public ports, server-wide: beyond, new ones are closed at
    /// accept. Each holds a descriptor (a legacy one two, with its data socket); well below
    /// the process's (`LimitNOFILE` 65,536 for `iotronic serve`) less
    /// [`Limits::max_connections`], so that the board channels, the cloud's API, router and
    /// database keep theirs.
    pub max_public_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16_384,
            max_listeners_per_channel: 64,
            max_streams_per_channel: 2_048,
            max_packet_channels_per_channel: 8,
            max_lanes_per_channel: 4,
            lane_idle: Duration::from_secs(30),
            // 4 MiB: with less, one stream's sender waits for credit while the channel's
            // socket buffers hold the rest. On loopback 2 MiB gained 10-25 % over 512 KiB, and
            // 4 MiB 4-9 % over 2 MiB in five alternating runs (8 MiB no more); the channel's
            // budget, not streams × window, bounds what a channel holds (docs/benchmarks.md).
            window: 4 * 1024 * 1024,
            max_buffered_per_channel: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(65),
            // Our client asks for its listeners right after Welcome and dials only when it has
            // something to ask for; ten seconds leave room for a slow link and a slow cloud.
            token_timeout: Duration::from_secs(10),
            liveness_probe: Duration::from_secs(5),
            max_unproved_per_source: 128,
            // The largest of those messages is a `PacketOpen` of 2,057 bytes.
            max_unproved_message: 16 * 1024,
            legacy_pending_timeout: Duration::from_secs(10),
            legacy_max_pending: 1024,
            legacy_max_per_port: 256,
            max_public_per_source: 256,
            max_public_streams: 16_384,
        }
    }
}

/// Everything the server needs.
#[derive(Debug)]
pub struct ServerConfig {
    pub listen: ListenOn,
    /// Address public listeners bind to.
    pub public_bind: IpAddr,
    pub auth: Auth,
    /// Serve the wstun 1.0.11 protocol too (ports still subject to the hooks).
    pub legacy: bool,
    /// Server-assigned ports (requests for port 0) are drawn from here; `None`: the OS picks.
    pub assign_ports: Option<RangeInclusive<u16>>,
    /// Serve `wss://` with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub limits: Limits,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, auth: Auth) -> ServerConfig {
        ServerConfig {
            listen: ListenOn::Addr(listen),
            public_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            auth,
            legacy: false,
            assign_ports: None,
            tls: None,
            limits: Limits::default(),
        }
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
    reg: Arc<Registry>,
}

impl Server {
    pub async fn bind(mut cfg: ServerConfig) -> Result<Server, Error> {
        let listen = std::mem::replace(&mut cfg.listen, ListenOn::Addr(SocketAddr::from(([0, 0, 0, 0], 0))));
        let listener = match listen {
            ListenOn::Addr(a) => TcpListener::bind(a).await.ctx(|| format!("bind the tunnel server on {a}"))?,
            ListenOn::Listener(l) => {
                l.set_nonblocking(true).ctx(|| "make the listener non-blocking".into())?;
                TcpListener::from_std(l).ctx(|| "adopt the listener".into())?
            }
        };
        let addr = listener.local_addr().ctx(|| "read the listen address".into())?;
        let reg = Arc::new(Registry::new(addr, &cfg.limits));
        Ok(Server { listener, cfg: Arc::new(cfg), reg })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.reg.local_addr
    }

    /// A handle to inspect and revoke channels and listeners while the server runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle::new(self.reg.clone())
    }

    /// Serves until `shutdown` is cancelled; every channel and public listener closes then.
    pub async fn run<H: ServerHooks>(self, hooks: Arc<H>, shutdown: CancellationToken) -> Result<(), Error> {
        let tls = self.cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let slots = Arc::new(Semaphore::new(self.cfg.limits.max_connections));
        let unproved = s4t_shared::limits::SourceSlots::new(self.cfg.limits.max_unproved_per_source);
        tracing::info!(addr = %self.reg.local_addr, tls = tls.is_some(), legacy = self.cfg.legacy, "tunnel server listening");
        let mut failures = channel::RefusalLog::default();
        loop {
            let (tcp, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off a little instead of spinning, and say
                        // so now and then only.
                        if let Some(unlogged) = failures.admit(std::time::Instant::now()) {
                            tracing::warn!(cause = %e, unlogged, "accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "connection limit reached: dropping a connection");
                continue;
            };
            let Some(unproved) = unproved.take(peer.ip()) else {
                tracing::debug!(%peer, "too many unproved connections from this source: dropping one");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let conn = Conn {
                cfg: self.cfg.clone(),
                reg: self.reg.clone(),
                hooks: hooks.clone(),
                shutdown: shutdown.clone(),
                peer,
                unproved: Some(unproved),
                slot: Some(permit),
            };
            let tls = tls.clone();
            tokio::spawn(
                async move {
                    conn.handle(tcp, tls).await;
                }
                .instrument(tracing::info_span!("conn", %peer)),
            );
        }
        self.reg.close_all();
        Ok(())
    }
}

struct Conn<H> {
    cfg: Arc<ServerConfig>,
    reg: Arc<Registry>,
    hooks: Arc<H>,
    shutdown: CancellationToken,
    peer: SocketAddr,
    /// Counts this connection against its source's unproved ones until it proves itself.
    unproved: Option<Unproved>,
    /// Its slot among [`Limits::max_connections`], held as long as it lives (a legacy data
    /// socket gives it up once attached: see [`Limits::legacy_max_per_port`]).
    slot: Option<OwnedSemaphorePermit>,
}

/// What a connection becomes once its upgrade is done.
enum Next {
    /// Served already (status page, legacy wstun) or refused.
    Done,
    /// A board channel: its halves, the bytes read past the upgrade, unmasked frames agreed,
    /// lanes asked for, its count as unproved (dropped at its first valid token), and its
    /// connection slot.
    Channel(Split, BytesMut, (bool, u16), Option<Unproved>, Option<OwnedSemaphorePermit>),
    /// A lane of a board channel, unproved until its key is checked, and its connection slot.
    Lane(Split, BytesMut, Option<Unproved>, Option<OwnedSemaphorePermit>),
}

impl<H: ServerHooks> Conn<H> {
    /// The TLS and HTTP upgrade run in a boxed future that is freed before the channel starts:
    /// a future is as large as its largest state, and the TLS handshake's (about 10 KiB)
    /// would otherwise stay allocated for every idle board channel's lifetime.
    async fn handle(self, tcp: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let (cfg, reg, hooks, peer, shutdown) =
            (self.cfg.clone(), self.reg.clone(), self.hooks.clone(), self.peer, self.shutdown.clone());
        let next = match tls {
            None => Box::pin(self.upgrade(tcp)).await,
            Some(acc) => Box::pin(self.tls_upgrade(acc, tcp)).await,
        };
        match next {
            Next::Channel(split, leftover, how, unproved, _slot) => {
                channel::serve(cfg, reg, hooks, split, leftover, how, peer, shutdown, unproved).await
            }
            Next::Lane(split, leftover, unproved, _slot) => {
                lane::serve(cfg, reg, split, leftover, peer, unproved).await
            }
            Next::Done => {}
        }
    }

    async fn tls_upgrade(self, acc: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> Next {
        match tokio::time::timeout(self.cfg.limits.handshake_timeout, acc.accept(Buffered::new(tcp))).await {
            Ok(Ok(mut s)) => {
                s.get_mut().1.set_buffer_limit(Some(crate::transport::TLS_WRITE_BUFFER));
                self.upgrade(s).await
            }
            Ok(Err(e)) => {
                tracing::debug!(cause = %e, "TLS handshake failed");
                Next::Done
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                Next::Done
            }
        }
    }

    async fn upgrade<S: Transport>(mut self, mut s: S) -> Next {
        let inc = match tokio::time::timeout(self.cfg.limits.handshake_timeout, handshake::read_request(&mut s)).await {
            Ok(Ok(inc)) => inc,
            Ok(Err(e)) => {
                tracing::debug!(cause = %e, "bad upgrade request");
                handshake::refuse(&mut s, 400, &e.to_string()).await;
                return Next::Done;
            }
            Err(_) => return Next::Done,
        };
        match inc.route.clone() {
            Route::Status => handshake::status_page(&mut s).await,
            Route::Channel { unmasked, lanes } => {
                let proto = if unmasked { UNMASKED_SUBPROTOCOL } else { SUBPROTOCOL };
                if handshake::accept(&mut s, &inc, proto).await.is_ok() {
                    let unproved = self.unproved.take();
                    return Next::Channel(s.split_box(), inc.leftover, (unmasked, lanes), unproved, self.slot.take());
                }
            }
            Route::Lane => {
                if handshake::accept(&mut s, &inc, LANE_SUBPROTOCOL).await.is_ok() {
                    return Next::Lane(s.split_box(), inc.leftover, self.unproved.take(), self.slot.take());
                }
            }
            Route::LegacyControl { port, board } => {
                let board = match legacy::admit(&self.cfg, &*self.hooks, port, board.as_deref()).await {
                    Ok(board) => board,
                    Err(reason) => {
                        tracing::warn!(port, %reason, "legacy wstun listener refused");
                        handshake::refuse(&mut s, 403, &reason).await;
                        return Next::Done;
                    }
                };
                // Bound before the upgrade, so a busy port is a refusal the client can tell
                // from a closed tunnel (wstun accepted, then closed the control socket).
                let listener = match tokio::net::TcpListener::bind((self.cfg.public_bind, port)).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(port, cause = %e, "legacy listener cannot bind");
                        handshake::refuse(&mut s, 409, &format!("public port {port} is busy: {e}")).await;
                        return Next::Done;
                    }
                };
                // Admitted: legacy boards are anonymous by design (and behind one NAT, many).
                drop(self.unproved.take());
                if handshake::accept(&mut s, &inc, LEGACY_SUBPROTOCOL).await.is_ok() {
                    legacy::control(
                        s,
                        inc.leftover,
                        (port, board, listener),
                        self.cfg,
                        self.reg,
                        self.hooks,
                        self.shutdown,
                    )
                    .await;
                }
            }
            Route::LegacyData { id } => {
                if !self.cfg.legacy {
                    handshake::refuse(&mut s, 403, "legacy wstun mode is disabled on this server").await;
                    return Next::Done;
                }
                let Some(parked) = self.reg.take_pending(&id) else {
                    handshake::refuse(&mut s, 404, "unknown or expired wstun connection id").await;
                    return Next::Done;
                };
                drop(self.unproved.take());
                // Counted with its public connection from now on (per legacy port and among
                // the public ones), not among the connection slots: one legacy port's users
                // could otherwise take every board's.
                drop(self.slot.take());
                if handshake::accept(&mut s, &inc, LEGACY_SUBPROTOCOL).await.is_ok() {
                    legacy::data(s, inc.leftover, parked, &self.reg.counters, self.shutdown).await;
                }
            }
        }
        Next::Done
    }
}
