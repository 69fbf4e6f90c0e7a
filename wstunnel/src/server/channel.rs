//! One board channel on the server: the handshake, listener and packet-channel requests, the
//! public listeners' accept loops, and the teardown that frees every port when it dies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::BytesMut;
use s4t_shared::tunnel::frame::{Frame, PROTOCOL_VERSION, code};
use s4t_shared::tunnel::ws::{Message, Opcode, Role, close_payload};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::registry::{ChannelLife, Holder, Registry, Unproved};
use super::{Auth, Refusal, ServerConfig, ServerHooks};
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
    life: Arc<ChannelLife>,
    /// Lanes the board asked for in its upgrade, within the server's limit. They are offered
    /// (`Lanes`) only once the channel has proved itself: a lane joins with the channel's key
    /// and is then counted as proved, so an anonymous channel must not hand keys out.
    lanes: u16,
    /// The board this channel belongs to, fixed by the first token that passed every check
    /// (the hooks' [`ServerHooks::token_accepted`] included).
    board: Mutex<Option<String>>,
    /// A request presented a token that passed every check (or whose age the cloud could not
    /// check for now): the channel is a board's, and neither [`super::Limits::token_timeout`]
    /// nor [`super::Limits::max_unproved_message`] applies any longer (the reader sees it).
    proved: Arc<AtomicBool>,
    /// This channel's count among its source's unproved connections, dropped when it proves.
    /// Its lock is held while the channel proves itself (see [`prove`]).
    unproved: Mutex<Option<Unproved>>,
    /// Requests refused for their token while the channel had not proved itself.
    bad_tokens: AtomicUsize,
    refusal_log: Mutex<RefusalLog>,
    /// Listeners by id, from their `Listen` on: a request still being processed holds its id
    /// (and counts against [`super::Limits::max_listeners_per_channel`]).
    listeners: Mutex<HashMap<u32, Listener>>,
    /// Numbers the `Listen` requests, for [`Listener::ticket`].
    next_ticket: portable_atomic::AtomicU64,
    packets: Mutex<HashMap<u32, PacketEnd>>,
    /// Listen/PacketOpen requests being processed (token check, hooks, bind).
    in_flight: AtomicUsize,
}

/// A channel that has presented this many invalid tokens and no valid one is closed: a peer
/// guessing tokens, or a board whose tokens all expired (it is told why, and fetches fresh
/// ones from the cloud at its next login).
const MAX_BAD_TOKENS: usize = 8;

/// At most this many refusals of one channel are logged per [`REFUSAL_LOG_EVERY`]; the rest
/// are counted into the next line, so a peer sending bad requests cannot flood the log.
const REFUSAL_LOG_BURST: u32 = 8;
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Which of a channel's refusals (or another source of repeated warnings) are logged.
#[derive(Default)]
pub(super) struct RefusalLog {
    since: Option<Instant>,
    logged: u32,
    unlogged: u64,
}

impl RefusalLog {
    /// `Some(n)`: log this refusal, saying that `n` before it were not.
    pub(super) fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.since.is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY) {
            self.since = Some(now);
            self.logged = 0;
        }
        if self.logged < REFUSAL_LOG_BURST {
            self.logged += 1;
            Some(std::mem::take(&mut self.unlogged))
        } else {
            self.unlogged += 1;
            None
        }
    }
}

/// Decrements the in-flight count when a request task ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The server's end of a packet channel.
struct PacketEnd {
    /// Where received packets go.
    inbox: packet::Inbox,
    /// The sender's link.
    link: Arc<Link>,
    /// Its entry in the registry: (board, VPN, entry id).
    claim: (String, String, u64),
}

impl PacketEnd {
    /// Disconnects the hook's sender and frees the board's claim on the VPN.
    fn close(self, reg: &Registry) {
        self.link.set(None);
        let (board, vpn, id) = self.claim;
        reg.remove_vpn(&board, &vpn, id);
    }
}

struct Listener {
    /// Its public port; 0 while its request is being processed.
    port: u16,
    /// Its entry in the registry; 0 while its request is being processed.
    entry: u64,
    /// The request that asked for it: tells it from a later request that reused its id after
    /// an `Unlisten`.
    ticket: u64,
    /// Cancelled when it is withdrawn (`Unlisten`), revoked or its channel dies; a request
    /// still being processed then binds nothing.
    cancel: CancellationToken,
}

/// A `Listen` request's hold on its listener id, from the frame until its answer.
struct Slot {
    ticket: u64,
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
    unproved: Option<Unproved>,
) {
    let (out, w) = io::outbound_on(wr, false, sock);
    let mut writer = tokio::spawn(io::write_loop(w));
    let proved = Arc::new(AtomicBool::new(false));
    let mut reader =
        WsReader::new(rd, Role::Server, leftover, unmasked).unproved(cfg.limits.max_unproved_message, proved.clone());
    if let Err(e) = hello(&cfg, &mut reader, &out).await {
        tracing::warn!(%peer, cause = %e, "channel handshake failed");
        let code = if matches!(e, Error::Version(_)) { code::VERSION } else { code::PROTOCOL };
        finish(&out, &mut writer, code, &e.to_string()).await;
        return;
    }
    let cancel = shutdown.child_token();
    let (window, max_streams) = (cfg.limits.window, cfg.limits.max_streams_per_channel);
    let budget = cfg.limits.max_buffered_per_channel;
    let mux = Arc::new(Mux::new(out.clone(), window, max_streams, cancel.clone(), reg.counters.clone(), budget));
    let life = ChannelLife::new(cancel.clone(), out.clone());
    let chan_id = reg.add_channel(life.clone());
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        reg,
        hooks,
        mux,
        chan_id,
        life,
        lanes: lanes.min(u16::try_from(cfg.limits.max_lanes_per_channel).unwrap_or(u16::MAX)),
        board: Mutex::new(None),
        proved,
        unproved: Mutex::new(unproved),
        bad_tokens: AtomicUsize::new(0),
        refusal_log: Mutex::default(),
        listeners: Mutex::new(HashMap::new()),
        next_ticket: portable_atomic::AtomicU64::new(1),
        packets: Mutex::new(HashMap::new()),
        in_flight: AtomicUsize::new(0),
    });
    tracing::debug!(%peer, lanes, "channel open");
    // A board that takes nothing we send for the idle timeout is dead even if it sends a
    // frame now and then (which keeps the reader from timing out).
    let (interval, idle) = (cfg.limits.ping_interval, cfg.limits.idle_timeout);
    let mut pinger = tokio::spawn(io::keep_alive(out.clone(), interval, idle));
    let res = tokio::select! {
        r = read_loop(&ctx, &mut reader) => r,
        _ = cancel.cancelled() => Err(Error::Closed),
        () = close_unless_proved(&ctx) => Err(Error::Closed),
        Ok(Err(e @ Error::Timeout(_))) = &mut pinger => Err(e),
    };
    pinger.abort();
    let (code, reason) = match (&res, ctx.life.closed_because()) {
        (Ok(()), _) => (code::NORMAL, String::new()),
        (Err(Error::Closed), Some(why)) => why,
        (Err(Error::Closed), None) => (code::REVOKED, "closed by the server".to_owned()),
        (Err(e), _) => (code::PROTOCOL, e.to_string()),
    };
    let board = ctx.board.lock().expect("board").clone();
    match &res {
        Ok(()) => tracing::info!(board, "channel closed by the board"),
        // Anonymous peers can open channels at will: what becomes of theirs is not worth a
        // warning each.
        Err(_) if board.is_none() => tracing::debug!(%peer, code, reason, "channel closed before any valid token"),
        Err(_) => tracing::warn!(board, code, reason, "channel closed"),
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

/// Closes the channel once [`super::Limits::token_timeout`] has passed, unless it has
/// presented a valid token by then.
async fn close_unless_proved<H>(ctx: &Ctx<H>) {
    let timeout = ctx.cfg.limits.token_timeout;
    tokio::time::sleep(timeout).await;
    if ctx.proved.load(Ordering::Acquire) {
        return std::future::pending().await;
    }
    let reason = format!("no valid token presented within {timeout:?} of the handshake");
    ctx.life.close(code::UNAUTHORIZED, reason);
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
        ctx.life.heard();
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
            // The id is held from here, before any await: an `Unlisten` that follows finds it
            // whatever the request is waiting for, and a second `Listen` with it is refused.
            let slot = match reserve_listener(ctx, listener) {
                Ok(slot) => slot,
                Err((code, reason)) => {
                    ctx.in_flight.fetch_sub(1, Ordering::AcqRel);
                    log_listen_refusal(ctx, port, code, &reason);
                    ctx.mux.out.try_ctrl(&Frame::ListenErr { listener, code, reason })?;
                    return Ok(());
                }
            };
            let ctx = ctx.clone();
            tokio::spawn(
                async move {
                    let _done = InFlight(&ctx.in_flight);
                    listen(ctx.clone(), listener, port, token, slot).await
                }
                .in_current_span(),
            );
        }
        Frame::Unlisten { listener } => {
            // Cancelled under the lock: a request still being processed sees its slot gone
            // and cancelled at once, and binds nothing (or drops what it bound).
            let mut l = ctx.listeners.lock().expect("listeners");
            if let Some(l) = l.remove(&listener) {
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
            if let Some(end) = ctx.packets.lock().expect("packets").get(&channel) {
                end.inbox.deliver(payload);
            }
        }
        Frame::PacketClose { channel, .. } => {
            // The board closed it (its last handle was dropped): dropping our end's inbox ends
            // the hook's receiver, and the channel's count makes room for another. One still
            // being opened is not here yet: the board answers its `PacketOk` with another
            // `PacketClose`.
            let end = ctx.packets.lock().expect("packets").remove(&channel);
            if let Some(end) = end {
                end.close(&ctx.reg);
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
        match ctx.hooks.token_accepted(&board, expiry).await {
            Ok(()) => {}
            // Before the board is fixed: a token the cloud no longer honours (minted before a
            // rotate-secret) makes the channel no board's, nor keeps another token out.
            Err(Refusal::Denied(r)) => return Err((code::UNAUTHORIZED, r)),
            Err(Refusal::Unavailable(r)) => {
                // The token is genuine (our key signed it), only its age cannot be checked now:
                // the channel is a board's, which asks again later; closing it at the token
                // timeout would make every board reconnect while the cloud is unwell.
                fix_board(ctx, &board)?;
                prove(ctx);
                return Err((code::UNAVAILABLE, r));
            }
        }
    }
    fix_board(ctx, &board)?;
    prove(ctx);
    Ok(board)
}

/// Makes the channel `board`'s, unless it is another board's already (one channel serves one
/// board). Checked again here, after the hooks: two requests may have passed
/// [`check_claims`] with tokens of two boards before either was accepted.
fn fix_board<H>(ctx: &Ctx<H>, board: &str) -> Result<(), (u16, String)> {
    let mut b = ctx.board.lock().expect("board");
    match b.as_deref() {
        Some(existing) if existing != board => Err(another_board(board, existing)),
        Some(_) => Ok(()),
        None => {
            *b = Some(board.to_owned());
            ctx.reg.set_channel_board(ctx.chan_id, board);
            Ok(())
        }
    }
}

fn another_board(board: &str, existing: &str) -> (u16, String) {
    (code::UNAUTHORIZED, format!("token is for board {board}, this channel belongs to {existing}"))
}

/// The channel has presented a genuine token: the token deadline no longer applies, it no
/// longer counts among its source's unproved connections, and it is offered the lanes its
/// board asked for. The first time only; under the `unproved` lock, so that a request proving
/// it at the same time answers only after `Lanes` is queued: the board has its lanes' key
/// before any `ListenOk` or `PacketOk`, and its first stream can go on a lane.
fn prove<H>(ctx: &Ctx<H>) {
    let mut unproved = ctx.unproved.lock().expect("unproved");
    if ctx.proved.load(Ordering::Acquire) {
        return;
    }
    if ctx.lanes > 0 {
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
        ctx.reg.open_lane_door(ctx.chan_id, &key, Arc::downgrade(&ctx.mux));
        let _ = ctx.mux.out.try_ctrl(&Frame::Lanes { count: ctx.lanes, key });
    }
    ctx.proved.store(true, Ordering::Release);
    drop(unproved.take());
}

/// Counts a refused request; `Some(n)` if it is to be logged, `n` refusals before it not.
fn note_refusal<H>(ctx: &Ctx<H>, code: u16) -> Option<u64> {
    Counters::add(&ctx.reg.counters.refused, 1);
    if code == code::UNAUTHORIZED && !ctx.proved.load(Ordering::Acquire) {
        ctx.bad_tokens.fetch_add(1, Ordering::AcqRel);
    }
    ctx.refusal_log.lock().expect("refusal log").admit(Instant::now())
}

/// Closes the channel if it has presented [`MAX_BAD_TOKENS`] invalid tokens and no valid one
/// (after the refusal was sent, so the peer reads both).
fn close_if_guessing<H>(ctx: &Ctx<H>) {
    if !ctx.proved.load(Ordering::Acquire) && ctx.bad_tokens.load(Ordering::Acquire) >= MAX_BAD_TOKENS {
        ctx.life.close(code::UNAUTHORIZED, format!("{MAX_BAD_TOKENS} requests with invalid tokens and no valid one"));
    }
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
            // A port-0 token is for a port the server assigns: it may ask for one again (a
            // reconnect keeps its port), not for any port of the host (5432, 22…).
            if c.port == 0 && vpn.is_none() && port != 0 && !assignable(&ctx.cfg, port) {
                return Err((
                    code::UNAUTHORIZED,
                    format!("token is for a server-assigned port; {port} is not one the server assigns"),
                ));
            }
            (c.board, Some(c.expiry))
        }
    };
    // The board is fixed only once the hooks accept the token ([`fix_board`]).
    match ctx.board.lock().expect("board").as_deref() {
        Some(existing) if existing != board => Err(another_board(&board, existing)),
        _ => Ok((board, expiry)),
    }
}

/// Answers a `Listen` whose id `slot` holds: every request gets one answer. One withdrawn
/// before it completed binds nothing and is answered `ListenErr` with code `NORMAL`, which
/// the board ignores (it no longer holds the id).
async fn listen<H: ServerHooks>(ctx: Arc<Ctx<H>>, id: u32, port: u16, token: String, slot: Slot) {
    let res = async {
        let board = check_token(&ctx, &token, port, None).await?;
        bind_listener(&ctx, id, port, &board, &slot).await
    }
    .await;
    let reply = match res {
        Ok(bound) => Frame::ListenOk { listener: id, port: bound },
        Err((code, reason)) => {
            // Frees the id, unless an `Unlisten` or the channel's end did already (and a later
            // request may hold it now).
            let mut l = ctx.listeners.lock().expect("listeners");
            if l.get(&id).is_some_and(|l| l.ticket == slot.ticket) {
                l.remove(&id);
            }
            drop(l);
            if code != code::NORMAL {
                log_listen_refusal(&ctx, port, code, &reason);
            }
            Frame::ListenErr { listener: id, code, reason }
        }
    };
    let _ = ctx.mux.out.ctrl(&reply).await;
    close_if_guessing(&ctx);
}

/// Holds listener id `id` for a new `Listen`; checked and held in one step, so concurrent
/// requests cannot overshoot the limit nor share an id.
fn reserve_listener<H>(ctx: &Ctx<H>, id: u32) -> Result<Slot, (u16, String)> {
    let mut l = ctx.listeners.lock().expect("listeners");
    if l.contains_key(&id) {
        return Err((code::PROTOCOL, format!("listener id {id} already in use")));
    }
    if l.len() >= ctx.cfg.limits.max_listeners_per_channel {
        return Err((code::LIMIT, "too many listeners on this channel".into()));
    }
    let slot = Slot { ticket: ctx.next_ticket.fetch_add(1, Ordering::Relaxed), cancel: ctx.mux.cancel.child_token() };
    l.insert(id, Listener { port: 0, entry: 0, ticket: slot.ticket, cancel: slot.cancel.clone() });
    Ok(slot)
}

/// Counts a refused `Listen`, and logs it unless the channel's refusals are being logged too
/// often.
fn log_listen_refusal<H>(ctx: &Ctx<H>, port: u16, code: u16, reason: &str) {
    if let Some(unlogged) = note_refusal(ctx, code) {
        let board = ctx.board.lock().expect("board").clone();
        tracing::warn!(board, port, code, %reason, unlogged, "listener refused");
    }
}

/// Why a listener request whose slot was cancelled stops: its channel is closing, or the board
/// withdrew it (code `NORMAL`: not a refusal).
fn abandoned<H>(ctx: &Ctx<H>) -> (u16, String) {
    if ctx.mux.cancel.is_cancelled() {
        (code::SHUTDOWN, "the channel is closing".into())
    } else {
        (code::NORMAL, "withdrawn by the board".into())
    }
}

/// The code a hook's refusal of a listener or packet channel is sent to the board with.
fn refusal_code(r: Refusal) -> (u16, String) {
    match r {
        Refusal::Denied(r) => (code::FORBIDDEN, r),
        Refusal::Unavailable(r) => (code::UNAVAILABLE, r),
    }
}

async fn bind_listener<H: ServerHooks>(
    ctx: &Arc<Ctx<H>>,
    id: u32,
    port: u16,
    board: &str,
    slot: &Slot,
) -> Result<u16, (u16, String)> {
    let board = board.to_owned();
    // A request withdrawn, or whose channel died, while its token was checked or the hooks
    // were deciding binds nothing (nor takes a port over).
    if slot.cancel.is_cancelled() {
        return Err(abandoned(ctx));
    }
    ctx.hooks.authorize_listener(&board, port).await.map_err(refusal_code)?;
    if slot.cancel.is_cancelled() {
        return Err(abandoned(ctx));
    }
    let listener = match bind_public(&ctx.cfg, port).await {
        Err((code::IN_USE, reason)) if port != 0 => {
            take_over(ctx, port, &board, &slot.cancel).await?;
            bind_retry(&ctx.cfg, port).await.map_err(|_| (code::IN_USE, reason))?
        }
        other => other?,
    };
    let bound = listener.local_addr().map(|a| a.port()).map_err(|e| (code::OTHER, e.to_string()))?;
    let cancel = slot.cancel.clone();
    let Some(entry) = ctx.reg.add_port(bound, &board, false, ctx.chan_id, cancel.clone()) else {
        return Err((code::IN_USE, format!("port {bound} is already in use")));
    };
    {
        // Withdrawn or torn down while it bound: its slot is gone (perhaps another request's
        // now), and dropping `listener` frees the port.
        let mut l = ctx.listeners.lock().expect("listeners");
        match l.get_mut(&id) {
            Some(l) if l.ticket == slot.ticket => (l.port, l.entry) = (bound, entry),
            _ => {
                drop(l);
                ctx.reg.remove_port(bound, entry);
                return Err(abandoned(ctx));
            }
        }
    }
    ctx.hooks.listener_opened(&board, bound, false);
    let c2 = ctx.clone();
    tokio::spawn(
        async move { accept_loop(c2, id, entry, listener, cancel, board).await }
            .instrument(tracing::info_span!("listener", port = bound)),
    );
    Ok(bound)
}

/// Decides whether this channel may have `port`, which it could not bind. The board may have
/// reconnected before the server noticed its old channel died: an older channel of the same
/// board that does not answer a ping within [`super::Limits::liveness_probe`] is closed, and
/// its ports are free to take (it is told with a `GoAway`, and our client reconnects and keeps
/// its exposures). A live channel keeps its port whoever asks (a leaked token must not take it
/// from the board), and a newer one too (an old channel's late request must not take it back).
/// `Ok`: the port is closing, try to bind it again. `cancel`: the request's slot (a request
/// withdrawn meanwhile closes nothing).
async fn take_over<H>(ctx: &Ctx<H>, port: u16, board: &str, cancel: &CancellationToken) -> Result<(), (u16, String)> {
    let busy = || (code::IN_USE, format!("port {port} is held by another live listener"));
    let old = match ctx.reg.holder(port, board, ctx.chan_id) {
        Holder::Gone => return Ok(()),
        Holder::Live => return Err(busy()),
        Holder::Older(old) => old,
    };
    let probe = ctx.cfg.limits.liveness_probe;
    if old.answers(probe).await {
        return Err(busy());
    }
    if cancel.is_cancelled() {
        return Err(abandoned(ctx));
    }
    tracing::info!(board, port, "an older channel of the board did not answer: closing it to take its port over");
    let reason =
        format!("another channel of this board asked for port {port}, and this one did not answer within {probe:?}");
    old.close(code::OTHER, reason);
    Ok(())
}

/// Claims the board's packet channel for `vpn` for this channel (the registry entry's id),
/// as [`take_over`] decides for ports: a live channel of the board keeps it whoever asks
/// (with a leaked VPN token, another peer would otherwise take over the board's place in the
/// VPN: its traffic and its address), and a newer one too; an older one that does not answer
/// a ping is closed. The asking channel may replace its own.
async fn claim_vpn<H>(ctx: &Ctx<H>, board: &str, vpn: &str) -> Result<u64, (u16, String)> {
    let old = match ctx.reg.claim_vpn(board, vpn, ctx.chan_id) {
        Ok(entry) => return Ok(entry),
        Err(Holder::Older(old)) => old,
        Err(_) => return Err(vpn_busy(vpn)),
    };
    let probe = ctx.cfg.limits.liveness_probe;
    if old.answers(probe).await {
        return Err(vpn_busy(vpn));
    }
    if ctx.mux.cancel.is_cancelled() {
        return Err((code::SHUTDOWN, "the channel is closing".into()));
    }
    tracing::info!(board, vpn, "an older channel of the board did not answer: closing it to take its VPN over");
    old.close(
        code::OTHER,
        format!("another channel of this board opened VPN {vpn}, and this one did not answer within {probe:?}"),
    );
    // A closed holder is replaced; one that took it meanwhile is newer, and keeps it.
    ctx.reg.claim_vpn(board, vpn, ctx.chan_id).map_err(|_| vpn_busy(vpn))
}

fn vpn_busy(vpn: &str) -> (u16, String) {
    (code::IN_USE, format!("another live channel of this board carries VPN {vpn}"))
}

/// Whether the server could have assigned `port`: in `assign_ports`, or else in the host's
/// ephemeral range (where the OS picks when asked for port 0).
fn assignable(cfg: &ServerConfig, port: u16) -> bool {
    match &cfg.assign_ports {
        Some(range) => range.contains(&port),
        None => {
            let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| {
                let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
                Some(it.next()??..=it.next()??)
            });
            range.unwrap_or(32768..=60999).contains(&port)
        }
    }
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
    // The streams accepted here that are still open: a revoked listener takes them along.
    let accepted: Arc<Mutex<std::collections::HashSet<u32>>> = Arc::default();
    let mut failures = RefusalLog::default();
    loop {
        let (tcp, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning, and say so
                    // now and then, not every 50 ms of every listener.
                    if let Some(unlogged) = failures.admit(Instant::now()) {
                        tracing::warn!(cause = %e, unlogged, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => break,
        };
        if !ctx.hooks.connection_allowed(&board, port, peer, false) {
            continue; // dropping `tcp` closes it
        }
        // Dropping `tcp` closes it: its board never hears of it.
        let Some(slot) = ctx.reg.admit_public(port, peer, None) else { continue };
        let Some(s) = ctx.mux.open_stream() else {
            ctx.reg.public_refused(port, peer, "stream limit of the channel reached");
            continue;
        };
        let open = Frame::Open { stream: s.id, listener: id, peer: peer.to_string() };
        // Watching `cancel` too: a board that stops reading must not keep a revoked
        // listener's port bound.
        let announced = tokio::select! {
            biased;
            _ = cancel.cancelled() => false,
            r = ctx.mux.announce(&s, &open, &tcp) => r.is_ok(),
        };
        if !announced {
            ctx.mux.reset(s.id, code::REVOKED);
            break;
        }
        accepted.lock().expect("accepted streams").insert(s.id);
        let (mux, accepted) = (ctx.mux.clone(), accepted.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let sid = s.id;
            run_stream(mux, s, tcp).await;
            accepted.lock().expect("accepted streams").remove(&sid);
        });
    }
    drop(l);
    ctx.reg.remove_port(port, entry);
    // Only if it is still this listener's: after an `Unlisten` the id may be a later request's.
    let removed = {
        let mut l = ctx.listeners.lock().expect("listeners");
        l.get(&id).is_some_and(|l| l.entry == entry) && l.remove(&id).is_some()
    };
    if removed && !ctx.mux.cancel.is_cancelled() {
        // Revoked through the handle (a lease ended, a service was deleted), not asked by the
        // board: its connections end with it (a former tenant's SSH session must not go on
        // into the next lease), and the board is told.
        let streams: Vec<u32> = accepted.lock().expect("accepted streams").drain().collect();
        for sid in streams {
            ctx.mux.reset(sid, code::REVOKED);
        }
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
        let (chan, tx) = packet::new_channel(id, link.clone(), None);
        let no_room = |p: &HashMap<u32, PacketEnd>| {
            if p.contains_key(&id) {
                Err((code::PROTOCOL, format!("packet channel id {id} already in use")))
            } else if p.len() >= ctx.cfg.limits.max_packet_channels_per_channel {
                Err((code::LIMIT, "too many packet channels on this channel".into()))
            } else {
                Ok(())
            }
        };
        no_room(&ctx.packets.lock().expect("packets"))?;
        let claim = (board.clone(), vpn.clone(), claim_vpn(&ctx, &board, &vpn).await?);
        {
            let mut p = ctx.packets.lock().expect("packets");
            // Again: the channel's other requests went on while this one claimed the VPN. A
            // channel that died meanwhile has been torn down: nothing may be added to it.
            let closing = || Err((code::SHUTDOWN, "the channel is closing".to_owned()));
            let room = if ctx.mux.cancel.is_cancelled() { closing() } else { no_room(&p) };
            if let Err(refused) = room {
                ctx.reg.remove_vpn(&claim.0, &claim.1, claim.2);
                return Err(refused);
            }
            p.insert(id, PacketEnd { inbox: tx, link, claim });
            // Counted with its entry, so that every removal takes out exactly what was put in.
            ctx.mux.packet_channels_changed(true);
        }
        if let Err(refusal) = ctx.hooks.packet_channel(&board, &vpn, chan).await {
            let end = ctx.packets.lock().expect("packets").remove(&id);
            if let Some(end) = end {
                end.close(&ctx.reg);
                ctx.mux.packet_channels_changed(false);
            }
            return Err(refusal_code(refusal));
        }
        tracing::info!(board, vpn, "packet channel open");
        Ok(())
    }
    .await;
    let reply = match res {
        Ok(()) => Frame::PacketOk { channel: id },
        Err((code, reason)) => {
            if let Some(unlogged) = note_refusal(&ctx, code) {
                tracing::warn!(vpn, code, %reason, unlogged, "packet channel refused");
            }
            Frame::PacketErr { channel: id, code, reason }
        }
    };
    let _ = ctx.mux.out.ctrl(&reply).await;
    close_if_guessing(&ctx);
}

fn teardown<H: ServerHooks>(ctx: &Ctx<H>) {
    for (_, l) in ctx.listeners.lock().expect("listeners").drain() {
        l.cancel.cancel();
        // The accept loop frees the port and notifies the hooks as it ends; make sure the
        // registry forgets the port even if that task never runs again.
        ctx.reg.remove_port(l.port, l.entry);
    }
    let ends: Vec<PacketEnd> = ctx.packets.lock().expect("packets").drain().map(|(_, end)| end).collect();
    for end in ends {
        end.close(&ctx.reg);
        ctx.mux.packet_channels_changed(false);
    }
    ctx.reg.remove_channel(ctx.chan_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_in_bursts_and_the_rest_counted() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        for _ in 0..REFUSAL_LOG_BURST {
            assert_eq!(log.admit(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(log.admit(t0 + Duration::from_secs(1)), None);
        }
        // The next period's first line says how many were left out.
        assert_eq!(log.admit(t0 + REFUSAL_LOG_EVERY), Some(5));
        assert_eq!(log.admit(t0 + REFUSAL_LOG_EVERY), Some(0));
    }
}
