//! One connection of the client: dial, upgrade, Hello/Welcome, re-issue every exposure and
//! packet channel, then dispatch frames until the channel dies.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use s4t_shared::backoff::Backoff;
use s4t_shared::tunnel::frame::{Frame, PROTOCOL_VERSION, code};
use s4t_shared::tunnel::ws::{Message, Opcode, Role};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::error::{Error, IoContext};
use crate::handshake::{self, Dial};
use crate::io::{self, Outbound, WsReader};
use crate::mux::{Lane, Mux, read_lane, run_stream};
use crate::transport::{Buffered, Split, Transport};

/// A parsed server URL.
pub(crate) struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Target, Error> {
        let bad = |reason: &str| Error::Url { url: url.to_owned(), reason: reason.to_owned() };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("scheme must be ws or wss")),
        };
        let host = uri.host().map(|h| h.trim_matches(['[', ']'])).filter(|h| !h.is_empty());
        let host = host.ok_or_else(|| bad("no host"))?.to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
        Ok(Target { tls, host, port, path })
    }
}

/// Dials the server and completes the WebSocket upgrade; returns the split transport and any
/// bytes read past the upgrade response.
async fn dial(inner: &Inner, how: Dial) -> Result<(Split, handshake::Upgraded), Error> {
    let t = Target::parse(&inner.cfg.url)?;
    let tcp =
        TcpStream::connect((t.host.as_str(), t.port)).await.ctx(|| format!("connect to {}:{}", t.host, t.port))?;
    let _ = tcp.set_nodelay(true);
    let host_header = format!("{}:{}", t.host, t.port);
    if t.tls {
        let cfg = inner.cfg.tls.clone().ok_or_else(|| Error::Config("wss:// needs a TLS configuration".into()))?;
        let name = rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|e| Error::Tls(e.to_string()))?;
        let mut s = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, Buffered::new(tcp))
            .await
            .map_err(|e| Error::Tls(e.to_string()))?;
        s.get_mut().1.set_buffer_limit(Some(crate::transport::TLS_WRITE_BUFFER));
        let left = handshake::connect(&mut s, &host_header, &t.path, how).await?;
        Ok((s.split_box(), left))
    } else {
        let mut s = tcp;
        let left = handshake::connect(&mut s, &host_header, &t.path, how).await?;
        Ok((s.split_box(), left))
    }
}

/// Runs one connection until it ends.
pub(crate) async fn session(inner: &Arc<Inner>, backoff: &mut Backoff) -> Result<(), Error> {
    let how = Dial::Channel { lanes: inner.cfg.lanes };
    let ((rd, wr, sock), up) = tokio::time::timeout(inner.cfg.connect_timeout, dial(inner, how))
        .await
        .map_err(|_| Error::Timeout(format!("connecting to {}", inner.cfg.url)))??;
    let (out, w) = io::outbound_on(wr, !up.unmasked, sock);
    // Aborts the writer and pinger and kills every stream also when this future is dropped
    // (client shutdown), so the socket closes and the server frees the board's ports at once.
    let mut guard = Guard { writer: tokio::spawn(io::write_loop(w)), pinger: None, cancel: CancellationToken::new() };
    let mut reader = WsReader::new(rd, Role::Client, up.leftover, false);
    let res = async {
        let window = hello(inner, &mut reader, &out).await?;
        backoff.reset();
        let cancel = guard.cancel.clone();
        let (max_streams, budget) = (inner.cfg.max_streams, inner.cfg.max_buffered);
        let mux = Arc::new(Mux::new(out.clone(), window, max_streams, cancel.clone(), Arc::default(), budget));
        restore(inner, &mux);
        inner.state.send_modify(|s| {
            s.connected = true;
            s.last_error = None;
        });
        tracing::info!(url = %inner.cfg.url, "tunnel channel up");
        guard.pinger = Some(tokio::spawn(io::ping_loop(out.clone(), inner.cfg.ping_interval)));
        let r = read_loop(inner, &mux, &Arc::default(), &mut reader).await;
        cancel.cancel();
        r
    }
    .await;
    inner.conn.lock().expect("conn").take();
    guard.close(out).await;
    res
}

struct Guard {
    writer: tokio::task::JoinHandle<Result<(), Error>>,
    pinger: Option<tokio::task::JoinHandle<()>>,
    cancel: CancellationToken,
}

impl Guard {
    /// Says goodbye on `out` and lets the writer flush it, but not forever.
    async fn close(&mut self, out: Outbound) {
        let _ = out.try_ctrl_raw(out.ws_control(Opcode::Close, &[]));
        out.close();
        drop(out);
        if let Some(p) = self.pinger.take() {
            p.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.writer).await;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.writer.abort();
        if let Some(p) = &self.pinger {
            p.abort();
        }
        self.cancel.cancel();
    }
}

async fn hello(inner: &Inner, reader: &mut WsReader, out: &Outbound) -> Result<u32, Error> {
    let agent = format!("wstunnel/{}", env!("CARGO_PKG_VERSION"));
    out.ctrl(&Frame::Hello { version: PROTOCOL_VERSION, agent }).await?;
    let msg = tokio::time::timeout(inner.cfg.connect_timeout, reader.next())
        .await
        .map_err(|_| Error::Timeout("no Welcome from the server".into()))??;
    let Some(Message::Binary(b)) = msg else {
        return Err(Error::Protocol("the server closed the channel before Welcome".into()));
    };
    match Frame::decode(&b)? {
        Frame::Welcome { version: PROTOCOL_VERSION, initial_window } => Ok(initial_window),
        Frame::Welcome { version, .. } => Err(Error::Version(format!(
            "server speaks tunnel protocol v{version}, this client v{PROTOCOL_VERSION}: upgrade the older side"
        ))),
        Frame::GoAway { code: code::VERSION, reason } => Err(Error::Version(reason)),
        Frame::GoAway { code, reason } => Err(Error::Refused { code, reason }),
        other => Err(Error::Protocol(format!("expected Welcome, got {other:?}"))),
    }
}

/// Makes this connection the live one and asks again for everything the board wants.
fn restore(inner: &Inner, mux: &Arc<Mux>) {
    // Under the exposure lock, so that a concurrent `expose` either lands in this snapshot
    // or sees the connection and sends its own request: never both, never neither.
    let ex = inner.exposures.lock().expect("exposures");
    let pk = inner.packets.lock().expect("packets");
    *inner.conn.lock().expect("conn") = Some(mux.clone());
    let out = &mux.out;
    for (id, e) in ex.iter() {
        let port = e.assigned.unwrap_or(e.requested);
        let _ = out.try_ctrl(&Frame::Listen { listener: *id, port, token: e.token.clone() });
    }
    for (id, p) in pk.iter() {
        let _ = out.try_ctrl(&Frame::PacketOpen { channel: *id, vpn: p.vpn.clone(), token: p.token.clone() });
    }
}

async fn read_loop(inner: &Arc<Inner>, mux: &Arc<Mux>, lanes: &Arc<Lanes>, reader: &mut WsReader) -> Result<(), Error> {
    let idle = inner.cfg.idle_timeout;
    loop {
        let msg = mux.next_message(reader, idle).await?;
        match msg {
            None | Some(Message::Close(_)) => return Ok(()),
            Some(Message::Binary(b)) => on_frame(inner, mux, lanes, Frame::decode(&b)?)?,
            Some(Message::Ping(p)) => mux.out.try_ctrl_raw(mux.out.ws_control(Opcode::Pong, &p))?,
            Some(Message::Pong(_)) => {}
            Some(Message::Text(_)) => return Err(Error::Protocol("text message on a tunnel channel".into())),
        }
    }
}

fn on_frame(inner: &Arc<Inner>, mux: &Arc<Mux>, lanes: &Arc<Lanes>, f: Frame) -> Result<(), Error> {
    match f {
        Frame::Data { .. } | Frame::Fin { .. } | Frame::Reset { .. } | Frame::Window { .. } => mux.on_frame(f)?,
        Frame::Open { stream, listener, peer } => open(inner, mux, lanes, &mux.main_lane(), stream, listener, peer),
        Frame::Lanes { count, key } => {
            *lanes.offer.lock().expect("lanes") = Some((key.into(), count.min(inner.cfg.lanes)));
            if !mux.is_idle() {
                lanes.ensure(inner, mux);
            }
        }
        Frame::ListenOk { listener, port } => listen_result(inner, mux, listener, Ok(port)),
        Frame::ListenErr { listener, code, reason } => listen_result(inner, mux, listener, Err((code, reason))),
        Frame::ListenerClosed { listener, code, reason } => listen_result(inner, mux, listener, Err((code, reason))),
        Frame::PacketOk { channel } => packet_result(inner, mux, lanes, channel, Ok(())),
        Frame::PacketErr { channel, code, reason } => packet_result(inner, mux, lanes, channel, Err((code, reason))),
        Frame::PacketClose { channel, code, reason } => packet_result(inner, mux, lanes, channel, Err((code, reason))),
        Frame::Packet { channel, payload } => {
            if let Some(p) = inner.packets.lock().expect("packets").get(&channel) {
                p.tx.deliver(payload);
            }
        }
        Frame::GoAway { code, reason } => return Err(Error::Refused { code, reason }),
        other => return Err(Error::Protocol(format!("unexpected frame from the server: {other:?}"))),
    }
    Ok(())
}

fn open(
    inner: &Arc<Inner>,
    mux: &Arc<Mux>,
    lanes: &Arc<Lanes>,
    lane: &Arc<Lane>,
    stream: u32,
    listener: u32,
    peer: String,
) {
    let target = inner.exposures.lock().expect("exposures").get(&listener).map(|e| e.target.clone());
    let Some(target) = target else {
        mux.reset(stream, code::CONNECT_FAILED);
        return;
    };
    let s = match mux.accept_stream(stream, lane) {
        Ok(s) => s,
        Err(code) => {
            mux.reset(stream, code);
            return;
        }
    };
    lanes.ensure(inner, mux);
    let (mux, timeout) = (mux.clone(), inner.cfg.target_connect_timeout);
    tokio::spawn(async move {
        // A stream reset meanwhile (or whose lane or channel died: its `dead` is their child)
        // gives up its connect at once: a server repeating Open and Reset against a slow
        // target would otherwise pile up connects, and the data they hold, until each timed out.
        let res = tokio::select! {
            res = tokio::time::timeout(timeout, TcpStream::connect(target.as_str())) => res,
            _ = s.dead.cancelled() => return,
        };
        match res {
            Ok(Ok(tcp)) => run_stream(mux, s, tcp).await,
            // Reset by now: the id may be another stream's already.
            _ if s.dead.is_cancelled() => {}
            res => {
                let cause = match res {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(target, peer, cause, "local connect failed");
                mux.reset(stream, code::CONNECT_FAILED);
            }
        }
    });
}

/// The lanes the server offered this connection, and how many are kept up now. Lanes are
/// dialled as streams open (a board with no streams holds none: the server retires them once
/// the channel has been idle for a while, and they come back with the next stream).
#[derive(Default)]
struct Lanes {
    /// The key, and how many lanes to keep (the server's offer, within the configuration).
    offer: Mutex<Option<(Arc<str>, u16)>>,
    kept: AtomicU16,
}

impl Lanes {
    /// Dials the lanes that are not up.
    fn ensure(self: &Arc<Self>, inner: &Arc<Inner>, mux: &Arc<Mux>) {
        let Some((key, count)) = self.offer.lock().expect("lanes").clone() else { return };
        while self.kept.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < count).then_some(n + 1)).is_ok() {
            tokio::spawn(keep_lane(inner.clone(), mux.clone(), self.clone(), key.clone()));
        }
    }
}

/// Keeps one lane of the channel `mux` up while the channel lives and has streams: dials,
/// presents `key`, carries the streams the server opens on it; when it ends (the server
/// retires an idle lane, or it failed) and the channel still has streams, dials again with
/// backoff.
async fn keep_lane(inner: Arc<Inner>, mux: Arc<Mux>, lanes: Arc<Lanes>, key: Arc<str>) {
    let mut backoff = Backoff::new(inner.cfg.reconnect_initial, inner.cfg.reconnect_max);
    loop {
        let res = tokio::select! {
            r = lane(&inner, &mux, &lanes, &key, &mut backoff) => r,
            _ = mux.cancel.cancelled() => break,
        };
        match res {
            Ok(()) | Err(Error::Refused { code: code::NORMAL, .. }) => {}
            Err(e) => tracing::warn!(cause = %e, "tunnel lane lost"),
        }
        if mux.is_idle() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = mux.cancel.cancelled() => break,
        }
    }
    lanes.kept.fetch_sub(1, Ordering::AcqRel);
}

/// A lane up at least this long was working: the next dial after it ends waits only the
/// initial backoff. One refused or failing at once (a server over its lane limit) backs off
/// further each time.
const LANE_STABLE: Duration = Duration::from_secs(10);

/// Runs one lane connection until it ends.
async fn lane(
    inner: &Arc<Inner>,
    mux: &Arc<Mux>,
    lanes: &Arc<Lanes>,
    key: &str,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    let ((rd, wr, sock), up) = tokio::time::timeout(inner.cfg.connect_timeout, dial(inner, Dial::Lane))
        .await
        .map_err(|_| Error::Timeout(format!("connecting a lane to {}", inner.cfg.url)))??;
    let (out, w) = io::outbound_on(wr, false, sock);
    let mut guard = Guard { writer: tokio::spawn(io::write_loop(w)), pinger: None, cancel: CancellationToken::new() };
    out.ctrl(&Frame::Lane { key: key.to_owned() }).await?;
    let lane = mux.add_lane(out.clone(), usize::MAX).ok_or(Error::Closed)?;
    let since = tokio::time::Instant::now();
    guard.pinger = Some(tokio::spawn(io::ping_loop(out.clone(), inner.cfg.ping_interval)));
    let mut reader = WsReader::new(rd, Role::Client, up.leftover, false);
    let res = read_lane(mux, &lane, &mut reader, inner.cfg.idle_timeout, |f| match f {
        Frame::Open { stream, listener, peer } => {
            open(inner, mux, lanes, &lane, stream, listener, peer);
            Ok(())
        }
        Frame::GoAway { code, reason } => Err(Error::Refused { code, reason }),
        other => Err(Error::Protocol(format!("unexpected frame on a lane: {other:?}"))),
    })
    .await;
    mux.drop_lane(&lane);
    if since.elapsed() >= LANE_STABLE {
        backoff.reset();
    }
    drop(lane);
    guard.close(out).await;
    res
}

/// How long an established exposure waits before asking again for a port that was busy.
const IN_USE_RETRY: Duration = Duration::from_secs(2);

/// How long an established exposure or packet channel waits before asking again when the
/// cloud could not decide (code `UNAVAILABLE`), plus up to as much again at random, so that
/// a recovering cloud is not asked by every board at once.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(5);

/// Asks again for `id` after `delay` (`again` builds the request from what the board holds
/// then, with the token it last renewed), but only on `refused_on`, the connection that
/// refused it: after a reconnect, `restore` has asked for it on the new connection already,
/// and a second request for an id the server holds there would be refused for good
/// (`PROTOCOL`), dropping the exposure or packet channel on the board while the server kept it.
fn ask_again(inner: &Arc<Inner>, refused_on: &Arc<Mux>, delay: Duration, id: u32, again: fn(&Inner, &Weak<Mux>, u32)) {
    let (inner, refused_on) = (inner.clone(), Arc::downgrade(refused_on));
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        again(&inner, &refused_on, id);
    });
}

/// [`ask_again`] for exposure `id`, if the board still holds it.
fn listen_again(inner: &Inner, refused_on: &Weak<Mux>, id: u32) {
    // Under the exposure lock, which `restore` holds while it makes a new connection the live
    // one: either this sees the new connection (and sends nothing) or `restore` comes after.
    let ex = inner.exposures.lock().expect("exposures");
    let frame = ex.get(&id).map(|e| Frame::Listen {
        listener: id,
        port: e.assigned.unwrap_or(e.requested),
        token: e.token.clone(),
    });
    inner.send_if_live(refused_on, frame.as_ref());
}

/// [`ask_again`] for packet channel `id`, if the board still holds it.
fn packets_again(inner: &Inner, refused_on: &Weak<Mux>, id: u32) {
    // Under the packets lock, for the same reason as `listen_again`.
    let pk = inner.packets.lock().expect("packets");
    let frame = pk.get(&id).map(|p| Frame::PacketOpen { channel: id, vpn: p.vpn.clone(), token: p.token.clone() });
    inner.send_if_live(refused_on, frame.as_ref());
}

fn jittered(d: Duration) -> Duration {
    d + d.mul_f64(rand::random::<f64>())
}

/// The server's answer to a `Listen`, or its closing of a listener. A `ListenOk` for an
/// exposure the board no longer holds (removed while the server was opening it) is answered
/// with `Unlisten`, so the server closes what it just opened.
fn listen_result(inner: &Arc<Inner>, mux: &Arc<Mux>, id: u32, res: Result<u16, (u16, String)>) {
    let mut ex = inner.exposures.lock().expect("exposures");
    let Some(e) = ex.get_mut(&id) else {
        if res.is_ok() {
            let _ = mux.out.try_ctrl(&Frame::Unlisten { listener: id });
        }
        return;
    };
    match res {
        Ok(port) => {
            e.assigned = Some(port);
            for w in e.waiters.drain(..) {
                let _ = w.send(Ok(port));
            }
            tracing::info!(port, target = e.target, "exposed");
        }
        Err((c @ (code::IN_USE | code::UNAVAILABLE | code::SHUTDOWN | code::OTHER), reason))
            if e.assigned.is_some() =>
        {
            // An exposure that worked before and now finds its port busy (the server has not
            // yet found our previous channel dead), the cloud unable to decide (its database
            // is down), the channel closing (the reconnect asks again) or the port not bound
            // for another reason (the server out of descriptors): keep it and ask again. A new
            // one is refused below, and its caller decides.
            let delay = if c == code::IN_USE { IN_USE_RETRY } else { jittered(UNAVAILABLE_RETRY) };
            tracing::warn!(code = c, %reason, target = e.target, "exposure not re-established yet: retrying");
            ask_again(inner, mux, delay, id, listen_again);
        }
        Err((code, reason)) => {
            tracing::warn!(code, %reason, target = e.target, "exposure refused or closed by the server");
            let e = ex.remove(&id).expect("present");
            for w in e.waiters {
                let _ = w.send(Err(Error::Refused { code, reason: reason.clone() }));
            }
            inner.state.send_modify(|s| s.last_refusal = Some(reason));
        }
    }
    drop(ex);
    inner.publish();
}

/// The server's answer to a packet channel request, or its closing of one. An open packet
/// channel brings the lanes up, so that streams need not share lane 0 with its packets.
///
/// A `PacketOk` for a channel the board no longer holds (its handles, or its opener's future,
/// were dropped while the server was opening it) is answered with `PacketClose`, so the server
/// drops what it just opened.
fn packet_result(inner: &Arc<Inner>, mux: &Arc<Mux>, lanes: &Arc<Lanes>, id: u32, res: Result<(), (u16, String)>) {
    let mut pk = inner.packets.lock().expect("packets");
    let Some(p) = pk.get_mut(&id) else {
        if res.is_ok() {
            let reason = "closed by the board".to_owned();
            let _ = mux.out.try_ctrl(&Frame::PacketClose { channel: id, code: code::NORMAL, reason });
        }
        return;
    };
    match res {
        Ok(()) => {
            if !p.link.is_set() {
                mux.packet_channels_changed(true);
            }
            p.link.set(Some(mux.out.clone()));
            for w in p.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
            drop(pk);
            lanes.ensure(inner, mux);
        }
        Err((code::UNAVAILABLE | code::SHUTDOWN, reason)) if p.waiters.is_empty() => {
            // A packet channel that was open before (its opener has its answer), and the cloud
            // cannot decide now or the channel is closing (the reconnect asks again): keep it
            // and ask again.
            tracing::warn!(%reason, vpn = p.vpn, "packet channel not re-established yet: retrying");
            ask_again(inner, mux, jittered(UNAVAILABLE_RETRY), id, packets_again);
        }
        Err((code, reason)) => {
            tracing::warn!(code, %reason, vpn = p.vpn, "packet channel refused or closed by the server");
            let p = pk.remove(&id).expect("present");
            if p.link.is_set() {
                mux.packet_channels_changed(false);
            }
            p.link.set(None);
            for w in p.waiters {
                let _ = w.send(Err(Error::Refused { code, reason: reason.clone() }));
            }
            inner.state.send_modify(|s| s.last_refusal = Some(reason));
        }
    }
}
