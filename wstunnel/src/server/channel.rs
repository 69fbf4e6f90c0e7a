//! One board channel on the server: the handshake, listener and packet-channel requests, the
//! public listeners' accept loops, and the teardown that frees every port when it dies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::BytesMut;
use s4t_shared::tunnel::frame::{Frame, PROTOCOL_VERSION, code};
use s4t_shared::tunnel::ws::{Message, Opcode, Role, close_payload};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::registry::Registry;
use super::{Auth, ServerConfig, ServerHooks};
use crate::error::Error;
use crate::io::{self, Outbound, WsReader};
use crate::mux::{Mux, run_stream};
use crate::packet::{self, Link};
use crate::stats::Counters;
use crate::transport::Split;

struct Ctx<H> {
    cfg: Arc<ServerConfig>,
    reg: Arc<Registry>,
    hooks: Arc<H>,
    mux: Arc<Mux>,
    chan_id: u64,
    /// The board this channel belongs to, fixed by the first valid token.
    board: Mutex<Option<String>>,
    listeners: Mutex<HashMap<u32, Listener>>,
    packets: Mutex<HashMap<u32, PacketEnd>>,
    /// Listen/PacketOpen requests being processed (token check, hooks, bind).
    in_flight: AtomicUsize,
}

/// Decrements the in-flight count when a request task ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The server's end of a packet channel: where received packets go, and the sender's link.
type PacketEnd = (packet::Inbox, Arc<Link>);

struct Listener {
    port: u16,
    entry: u64,
    cancel: CancellationToken,
}

/// Runs a channel from just after the upgrade until it closes.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve<H: ServerHooks>(
    cfg: Arc<ServerConfig>,
    reg: Arc<Registry>,
    hooks: Arc<H>,
    (rd, wr, sock): Split,
    leftover: BytesMut,
    (unmasked, lanes): (bool, u16),
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let (out, w) = io::outbound_on(wr, false, sock);
    let mut writer = tokio::spawn(io::write_loop(w));
    let mut reader = WsReader::new(rd, Role::Server, leftover, unmasked);
    if let Err(e) = hello(&cfg, &mut reader, &out).await {
        tracing::warn!(%peer, cause = %e, "channel handshake failed");
        finish(&out, &mut writer, code::VERSION, &e.to_string()).await;
        return;
    }
    let cancel = shutdown.child_token();
    let (window, max_streams) = (cfg.limits.window, cfg.limits.max_streams_per_channel);
    let budget = cfg.limits.max_buffered_per_channel;
    let mux = Arc::new(Mux::new(out.clone(), window, max_streams, cancel.clone(), reg.counters.clone(), budget));
    let chan_id = reg.add_channel(cancel.clone());
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        reg,
        hooks,
        mux,
        chan_id,
        board: Mutex::new(None),
        listeners: Mutex::new(HashMap::new()),
        packets: Mutex::new(HashMap::new()),
        in_flight: AtomicUsize::new(0),
    });
    let lanes = lanes.min(u16::try_from(cfg.limits.max_lanes_per_channel).unwrap_or(u16::MAX));
    if lanes > 0 {
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
        ctx.reg.open_lane_door(chan_id, &key, Arc::downgrade(&ctx.mux));
        let _ = out.try_ctrl(&Frame::Lanes { count: lanes, key });
    }
    tracing::debug!(%peer, lanes, "channel open");
    let pinger = tokio::spawn(io::ping_loop(out.clone(), cfg.limits.ping_interval));
    let res = tokio::select! {
        r = read_loop(&ctx, &mut reader) => r,
        _ = cancel.cancelled() => Err(Error::Closed),
    };
    pinger.abort();
    let (code, reason) = match &res {
        Ok(()) => (code::NORMAL, String::new()),
        Err(Error::Closed) => (code::REVOKED, "closed by the server".to_owned()),
        Err(e) => (code::PROTOCOL, e.to_string()),
    };
    let board = ctx.board.lock().expect("board").clone();
    match &res {
        Ok(()) => tracing::info!(board, "channel closed by the board"),
        Err(e) => tracing::warn!(board, cause = %e, "channel closed"),
    }
    cancel.cancel();
    teardown(&ctx);
    finish(&out, &mut writer, code, &reason).await;
}

/// Waits for `Hello`, checks the version, answers `Welcome`.
async fn hello(cfg: &ServerConfig, reader: &mut WsReader, out: &Outbound) -> Result<(), Error> {
    let msg = tokio::time::timeout(cfg.limits.handshake_timeout, reader.next())
        .await
        .map_err(|_| Error::Timeout("no Hello from the client".into()))??;
    let Some(Message::Binary(b)) = msg else {
        return Err(Error::Protocol("expected a Hello frame".into()));
    };
    match Frame::decode(&b)? {
        Frame::Hello { version, agent } if version == PROTOCOL_VERSION => {
            tracing::debug!(agent, "hello");
            out.ctrl(&Frame::Welcome { version: PROTOCOL_VERSION, initial_window: cfg.limits.window }).await
        }
        Frame::Hello { version, agent } => Err(Error::Version(format!(
            "client {agent:?} speaks tunnel protocol v{version}, this server v{PROTOCOL_VERSION}: upgrade the older side"
        ))),
        other => Err(Error::Protocol(format!("expected Hello, got {other:?}"))),
    }
}

/// Says goodbye (best effort) and lets the writer flush, but not forever.
pub(super) async fn finish(
    out: &Outbound,
    writer: &mut tokio::task::JoinHandle<Result<(), Error>>,
    code: u16,
    reason: &str,
) {
    let _ = out.try_ctrl(&Frame::GoAway { code, reason: reason.to_owned() });
    let _ = out.try_ctrl_raw(out.ws_control(Opcode::Close, &close_payload(1000, "")));
    out.close();
    if tokio::time::timeout(Duration::from_secs(1), &mut *writer).await.is_err() {
        writer.abort();
    }
}

async fn read_loop<H: ServerHooks>(ctx: &Arc<Ctx<H>>, reader: &mut WsReader) -> Result<(), Error> {
    let idle = ctx.cfg.limits.idle_timeout;
    loop {
        let msg = ctx.mux.next_message(reader, idle).await?;
        match msg {
            None | Some(Message::Close(_)) => return Ok(()),
            Some(Message::Binary(b)) => on_frame(ctx, Frame::decode(&b)?)?,
            Some(Message::Ping(p)) => ctx.mux.out.try_ctrl_raw(ctx.mux.out.ws_control(Opcode::Pong, &p))?,
            Some(Message::Pong(_)) => {}
            Some(Message::Text(_)) => return Err(Error::Protocol("text message on a tunnel channel".into())),
        }
    }
}

fn on_frame<H: ServerHooks>(ctx: &Arc<Ctx<H>>, f: Frame) -> Result<(), Error> {
    match f {
        Frame::Data { .. } | Frame::Fin { .. } | Frame::Reset { .. } | Frame::Window { .. } => ctx.mux.on_frame(f)?,
        Frame::Listen { listener, port, token } => {
            if !admit_request(ctx) {
                let reason = "too many requests in flight".to_owned();
                ctx.mux.out.try_ctrl(&Frame::ListenErr { listener, code: code::LIMIT, reason })?;
                return Ok(());
            }
            let ctx = ctx.clone();
            tokio::spawn(
                async move {
                    let _done = InFlight(&ctx.in_flight);
                    listen(ctx.clone(), listener, port, token).await
                }
                .in_current_span(),
            );
        }
        Frame::Unlisten { listener } => {
            if let Some(l) = ctx.listeners.lock().expect("listeners").remove(&listener) {
                l.cancel.cancel();
            }
        }
        Frame::PacketOpen { channel, vpn, token } => {
            if !admit_request(ctx) {
                let reason = "too many requests in flight".to_owned();
                ctx.mux.out.try_ctrl(&Frame::PacketErr { channel, code: code::LIMIT, reason })?;
                return Ok(());
            }
            let ctx = ctx.clone();
            tokio::spawn(
                async move {
                    let _done = InFlight(&ctx.in_flight);
                    open_packets(ctx.clone(), channel, vpn, token).await
                }
                .in_current_span(),
            );
        }
        Frame::Packet { channel, payload } => {
            if let Some((tx, _)) = ctx.packets.lock().expect("packets").get(&channel) {
                tx.deliver(payload);
            }
        }
        Frame::PacketClose { channel, .. } => {
            if let Some((_, link)) = ctx.packets.lock().expect("packets").remove(&channel) {
                link.set(None);
                ctx.mux.packet_channels_changed(false);
            }
        }
        Frame::GoAway { code, reason } => {
            tracing::info!(code, reason, "the board is going away");
            return Err(Error::Closed);
        }
        other => return Err(Error::Protocol(format!("unexpected frame from a client: {other:?}"))),
    }
    Ok(())
}

/// Counts a Listen/PacketOpen request in. At most as many may be in flight as the channel may
/// hold listeners and packet channels (a reconnecting board re-sends all of them at once), so a
/// flood of requests cannot race far past those limits.
fn admit_request<H>(ctx: &Ctx<H>) -> bool {
    let max = ctx.cfg.limits.max_listeners_per_channel + ctx.cfg.limits.max_packet_channels_per_channel;
    ctx.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Checks a token for this channel: signature and expiry, then that it names `port` (or any
/// port) and `vpn`, and the channel's board, then that the cloud still honours tokens of
/// that age for the board ([`ServerHooks::token_accepted`]). Returns the board.
async fn check_token<H: ServerHooks>(
    ctx: &Ctx<H>,
    token: &str,
    port: u16,
    vpn: Option<&str>,
) -> Result<String, (u16, String)> {
    let (board, expiry) = check_claims(ctx, token, port, vpn)?;
    if let Some(expiry) = expiry {
        ctx.hooks.token_accepted(&board, expiry).await.map_err(|r| (code::UNAUTHORIZED, r))?;
    }
    Ok(board)
}

/// The token's board and expiry (`None` without authentication) if it is valid for this
/// channel and request.
fn check_claims<H>(
    ctx: &Ctx<H>,
    token: &str,
    port: u16,
    vpn: Option<&str>,
) -> Result<(String, Option<u64>), (u16, String)> {
    let (board, expiry) = match &ctx.cfg.auth {
        Auth::Insecure => ("insecure".to_owned(), None),
        Auth::Disabled => {
            return Err((code::UNAUTHORIZED, "the server has no token secret: start it with --secret-file".into()));
        }
        Auth::Token(key) => {
            let c = key.verify(token, now()).map_err(|e| (code::UNAUTHORIZED, e.to_string()))?;
            if c.vpn.as_deref() != vpn {
                return Err((code::UNAUTHORIZED, "token is for another VPN (or for a listener)".into()));
            }
            if c.port != 0 && c.port != port {
                return Err((code::UNAUTHORIZED, format!("token is for port {}, not {port}", c.port)));
            }
            (c.board, Some(c.expiry))
        }
    };
    let mut b = ctx.board.lock().expect("board");
    match b.as_deref() {
        Some(existing) if existing != board => {
            Err((code::UNAUTHORIZED, format!("token is for board {board}, this channel belongs to {existing}")))
        }
        Some(_) => Ok((board, expiry)),
        None => {
            *b = Some(board.clone());
            ctx.reg.set_channel_board(ctx.chan_id, &board);
            Ok((board, expiry))
        }
    }
}

async fn listen<H: ServerHooks>(ctx: Arc<Ctx<H>>, id: u32, port: u16, token: String) {
    let reply = match open_listener(&ctx, id, port, &token).await {
        Ok(bound) => Frame::ListenOk { listener: id, port: bound },
        Err((code, reason)) => {
            let board = ctx.board.lock().expect("board").clone();
            tracing::warn!(board, port, code, %reason, "listener refused");
            Counters::add(&ctx.reg.counters.refused, 1);
            Frame::ListenErr { listener: id, code, reason }
        }
    };
    let _ = ctx.mux.out.ctrl(&reply).await;
}

async fn open_listener<H: ServerHooks>(
    ctx: &Arc<Ctx<H>>,
    id: u32,
    port: u16,
    token: &str,
) -> Result<u16, (u16, String)> {
    let board = check_token(ctx, token, port, None).await?;
    {
        // Check and reserve the slot in one step, so concurrent requests cannot overshoot.
        let mut l = ctx.listeners.lock().expect("listeners");
        if l.contains_key(&id) {
            return Err((code::PROTOCOL, format!("listener id {id} already in use")));
        }
        if l.len() >= ctx.cfg.limits.max_listeners_per_channel {
            return Err((code::LIMIT, "too many listeners on this channel".into()));
        }
        l.insert(id, Listener { port: 0, entry: 0, cancel: CancellationToken::new() });
    }
    let res = bind_listener(ctx, id, port, &board).await;
    if res.is_err() {
        ctx.listeners.lock().expect("listeners").remove(&id);
    }
    res
}

async fn bind_listener<H: ServerHooks>(
    ctx: &Arc<Ctx<H>>,
    id: u32,
    port: u16,
    board: &str,
) -> Result<u16, (u16, String)> {
    let board = board.to_owned();
    ctx.hooks.authorize_listener(&board, port).await.map_err(|r| (code::FORBIDDEN, r))?;
    let listener = match bind_public(&ctx.cfg, port).await {
        Err((code::IN_USE, reason)) if port != 0 => {
            // The same board reconnected before the server noticed its old channel died, or the
            // previous listener is still closing: take the port over, briefly retrying.
            ctx.reg.take_over(port, &board);
            bind_retry(&ctx.cfg, port).await.map_err(|_| (code::IN_USE, reason))?
        }
        other => other?,
    };
    let bound = listener.local_addr().map(|a| a.port()).map_err(|e| (code::OTHER, e.to_string()))?;
    let cancel = ctx.mux.cancel.child_token();
    let Some(entry) = ctx.reg.add_port(bound, &board, false, cancel.clone()) else {
        return Err((code::IN_USE, format!("port {bound} is already in use")));
    };
    ctx.listeners.lock().expect("listeners").insert(id, Listener { port: bound, entry, cancel: cancel.clone() });
    ctx.hooks.listener_opened(&board, bound, false);
    let c2 = ctx.clone();
    tokio::spawn(
        async move { accept_loop(c2, id, entry, listener, cancel, board).await }
            .instrument(tracing::info_span!("listener", port = bound)),
    );
    Ok(bound)
}

/// Binds a public listener on `port`, or on a server-assigned one for 0.
async fn bind_public(cfg: &ServerConfig, port: u16) -> Result<TcpListener, (u16, String)> {
    let bind = |p: u16| TcpListener::bind(SocketAddr::new(cfg.public_bind, p));
    let in_use = |p: u16, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            (code::IN_USE, format!("port {p} is already in use"))
        } else {
            (code::OTHER, format!("cannot listen on port {p}: {e}"))
        }
    };
    match (port, &cfg.assign_ports) {
        (0, Some(range)) => {
            let (lo, hi) = (*range.start() as u32, *range.end() as u32);
            let span = hi - lo + 1;
            let start = rand::random_range(0..span);
            for i in 0..span.min(256) {
                let p = (lo + (start + i) % span) as u16;
                if let Ok(l) = bind(p).await {
                    return Ok(l);
                }
            }
            Err((code::IN_USE, "no free port in the assignable range".into()))
        }
        (p, _) => bind(p).await.map_err(|e| in_use(p, e)),
    }
}

/// Retries binding `port` for up to a second (a listener that is closing frees it soon).
async fn bind_retry(cfg: &ServerConfig, port: u16) -> Result<TcpListener, ()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        if let Ok(l) = TcpListener::bind(SocketAddr::new(cfg.public_bind, port)).await {
            return Ok(l);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn accept_loop<H: ServerHooks>(
    ctx: Arc<Ctx<H>>,
    id: u32,
    entry: u64,
    l: TcpListener,
    cancel: CancellationToken,
    board: String,
) {
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let (tcp, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => break,
        };
        if !ctx.hooks.connection_allowed(&board, port, peer, false) {
            continue; // dropping `tcp` closes it
        }
        let Some(s) = ctx.mux.open_stream() else {
            tracing::warn!(%peer, "stream limit reached: connection dropped");
            continue;
        };
        let open = Frame::Open { stream: s.id, listener: id, peer: peer.to_string() };
        if ctx.mux.announce(&s, &open, &tcp).await.is_err() {
            break;
        }
        tokio::spawn(run_stream(ctx.mux.clone(), s, tcp));
    }
    drop(l);
    ctx.reg.remove_port(port, entry);
    let removed = ctx.listeners.lock().expect("listeners").remove(&id).is_some();
    if removed && !ctx.mux.cancel.is_cancelled() {
        // Revoked through the handle, not asked by the board: tell it.
        let _ = ctx
            .mux
            .out
            .ctrl(&Frame::ListenerClosed { listener: id, code: code::REVOKED, reason: "revoked".into() })
            .await;
    }
    ctx.hooks.listener_closed(&board, port, false);
}

async fn open_packets<H: ServerHooks>(ctx: Arc<Ctx<H>>, id: u32, vpn: String, token: String) {
    let res = async {
        let board = check_token(&ctx, &token, 0, Some(&vpn)).await?;
        let link = Arc::new(Link::default());
        link.set(Some(ctx.mux.out.clone()));
        let (chan, tx) = packet::new_channel(id, link.clone());
        {
            let mut p = ctx.packets.lock().expect("packets");
            if p.contains_key(&id) {
                return Err((code::PROTOCOL, format!("packet channel id {id} already in use")));
            }
            if p.len() >= ctx.cfg.limits.max_packet_channels_per_channel {
                return Err((code::LIMIT, "too many packet channels on this channel".into()));
            }
            p.insert(id, (tx, link));
            // Counted with its entry, so that every removal takes out exactly what was put in.
            ctx.mux.packet_channels_changed(true);
        }
        if let Err(reason) = ctx.hooks.packet_channel(&board, &vpn, chan).await {
            if ctx.packets.lock().expect("packets").remove(&id).is_some() {
                ctx.mux.packet_channels_changed(false);
            }
            return Err((code::FORBIDDEN, reason));
        }
        tracing::info!(board, vpn, "packet channel open");
        Ok(())
    }
    .await;
    let reply = match res {
        Ok(()) => Frame::PacketOk { channel: id },
        Err((code, reason)) => {
            tracing::warn!(vpn, code, %reason, "packet channel refused");
            Counters::add(&ctx.reg.counters.refused, 1);
            Frame::PacketErr { channel: id, code, reason }
        }
    };
    let _ = ctx.mux.out.ctrl(&reply).await;
}

fn teardown<H: ServerHooks>(ctx: &Ctx<H>) {
    for (_, l) in ctx.listeners.lock().expect("listeners").drain() {
        l.cancel.cancel();
        // The accept loop frees the port and notifies the hooks as it ends; make sure the
        // registry forgets the port even if that task never runs again.
        ctx.reg.remove_port(l.port, l.entry);
    }
    for (_, (_, link)) in ctx.packets.lock().expect("packets").drain() {
        link.set(None);
    }
    ctx.reg.remove_channel(ctx.chan_id);
}
