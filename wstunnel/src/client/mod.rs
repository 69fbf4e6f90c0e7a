//! The board side: one channel to the tunnel server, kept up forever, carrying every exposure
//! (public port → local target) and packet channel the board asked for.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wstunnel::Error> {
//! use wstunnel::client::{ClientConfig, start};
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let client = start(ClientConfig::new("ws://cloud.example:8080/"), shutdown.clone())?;
//! let exposed = client.expose("TOKEN".into(), 0, "127.0.0.1:22".into()).await?; // 0: any port
//! println!("ssh -p {} cloud.example", exposed.port);
//! let mut state = client.state(); // watch: connected, last refusal, exposures
//! # Ok(()) }
//! ```
//!
//! The client dials only while it has something to ask for (an exposure or a packet channel):
//! the server closes a channel that presents no valid token soon after its handshake, and an
//! idle client would otherwise reconnect over and over. Once up, a channel stays up while the
//! client runs, even when everything on it was closed.
//!
//! After every reconnect (capped, jittered backoff) the client asks again for every exposure
//! (the port it had, when the token allows it) and re-opens every packet channel, each with
//! the last token it was given (`renew_*_token`: tokens expire, the cloud renews them); the
//! [`PacketChannel`]s handed out stay valid across reconnects.
//!
//! A packet channel lives as long as its handles: once the [`PacketChannel`]'s receiver and
//! every sender are dropped, the client forgets it and sends `PacketClose`, and the server
//! drops its end. An [`open_packet_channel`](ClientHandle::open_packet_channel) future holds
//! the channel it is opening, so dropping the future (a caller's timeout) withdraws the
//! request the same way; a `PacketOk` that still comes for it is answered with `PacketClose`.

mod conn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use s4t_shared::backoff::Backoff;
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::mux::Mux;
use crate::packet::{self, Link, PacketChannel};

/// How to reach the server and how patient to be.
#[derive(Clone)]
pub struct ClientConfig {
    /// `ws://host:port/path` or `wss://…`.
    pub url: String,
    /// TLS settings for `wss://` (e.g. trusting only the cloud's CA). Required for `wss://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    /// The channel is considered dead when nothing arrives for this long.
    pub idle_timeout: Duration,
    /// How long a local connect to a target may take.
    pub target_connect_timeout: Duration,
    /// Streams the client accepts at once.
    pub max_streams: usize,
    /// The most the channel buffers for streams whose local sockets do not take their data
    /// (each stream also within the server's window): beyond, the stream holding the most is
    /// reset. A board has little memory.
    pub max_buffered: usize,
    /// Lanes to open besides the channel, if the server offers them: each is one more
    /// connection, and the server opens each new stream on the connection with the fewest
    /// streams. One (the default) keeps an SSH session responsive while a bulk transfer runs
    /// to the same board: on one connection its keystrokes wait behind the transfer's queued
    /// bytes (docs/benchmarks.md, "Latency under load"). 0: one connection carries everything.
    pub lanes: u16,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig").field("url", &self.url).field("tls", &self.tls.is_some()).finish_non_exhaustive()
    }
}

impl ClientConfig {
    pub fn new(url: impl Into<String>) -> ClientConfig {
        ClientConfig {
            url: url.into(),
            tls: None,
            reconnect_initial: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(65),
            target_connect_timeout: Duration::from_secs(10),
            max_streams: 2_048,
            max_buffered: 32 * 1024 * 1024,
            lanes: 1,
        }
    }
}

/// What the board agent can observe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientState {
    pub connected: bool,
    /// The last connection failure, for display.
    pub last_error: Option<String>,
    /// The last refusal from the server (bad token, port not allowed, …).
    pub last_refusal: Option<String>,
    /// Exposures and the public port each has now (`None` while not established).
    pub exposures: Vec<ExposureState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposureState {
    pub id: u32,
    pub requested_port: u16,
    pub port: Option<u16>,
    pub target: String,
}

/// An established exposure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exposed {
    pub id: u32,
    pub port: u16,
}

struct Exposure {
    token: String,
    requested: u16,
    target: String,
    assigned: Option<u16>,
    waiters: Vec<oneshot::Sender<Result<u16, Error>>>,
}

/// A packet channel the board holds (open, or being opened): removed when the server refuses
/// or closes it, or when its last handle is dropped ([`Inner::packets_dropped`]).
struct Packets {
    vpn: String,
    token: String,
    link: Arc<Link>,
    tx: packet::Inbox,
    waiters: Vec<oneshot::Sender<Result<(), Error>>>,
}

pub(crate) struct Inner {
    cfg: ClientConfig,
    exposures: Mutex<HashMap<u32, Exposure>>,
    packets: Mutex<HashMap<u32, Packets>>,
    /// The live connection (its `out`: the outbound queues), if connected.
    conn: Mutex<Option<Arc<Mux>>>,
    state: watch::Sender<ClientState>,
    next_id: AtomicU32,
    /// An exposure or packet channel was asked for: a client that had nothing to dial for
    /// dials now.
    wanted: Notify,
    /// Delayed requests (after `IN_USE`/`UNAVAILABLE`) that came due: sent, and not sent
    /// (withdrawn meanwhile, or the connection that refused them is gone).
    retries: [AtomicU32; 2],
}

/// Controls a running client. Cheap to clone.
#[derive(Clone)]
pub struct ClientHandle {
    inner: Arc<Inner>,
}

/// The host and port a client dials for `url` (`ws://` or `wss://`; default ports 80 and 443).
pub fn server_address(url: &str) -> Result<(String, u16), Error> {
    conn::Target::parse(url).map(|t| (t.host, t.port))
}

/// Starts the client: it connects, and reconnects forever until `shutdown` is cancelled.
pub fn start(cfg: ClientConfig, shutdown: CancellationToken) -> Result<ClientHandle, Error> {
    conn::Target::parse(&cfg.url)?;
    let inner = Arc::new(Inner {
        cfg,
        exposures: Mutex::new(HashMap::new()),
        packets: Mutex::new(HashMap::new()),
        conn: Mutex::new(None),
        state: watch::Sender::new(ClientState::default()),
        next_id: AtomicU32::new(1),
        wanted: Notify::new(),
        retries: Default::default(),
    });
    tokio::spawn(run(inner.clone(), shutdown));
    Ok(ClientHandle { inner })
}

impl ClientHandle {
    /// Asks the server to listen on `public_port` (0: any) and forward every connection to
    /// `target` (`host:port`, resolved on each connection). Waits for the first answer, which
    /// may take until the client is connected. A refusal removes the exposure.
    pub async fn expose(&self, token: String, public_port: u16, target: String) -> Result<Exposed, Error> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let listen = s4t_shared::tunnel::Frame::Listen { listener: id, port: public_port, token: token.clone() };
        let e = Exposure { token, requested: public_port, target, assigned: None, waiters: vec![tx] };
        {
            // Insert and send under one lock, so a reconnect's restore sends it exactly once.
            let mut ex = self.inner.exposures.lock().expect("exposures");
            ex.insert(id, e);
            self.inner.send_if_connected(&listen);
        }
        self.inner.wanted.notify_one();
        self.inner.publish();
        let port = rx.await.map_err(|_| Error::Closed)??;
        Ok(Exposed { id, port })
    }

    /// Removes an exposure: the server closes its public listener.
    pub fn unexpose(&self, id: u32) -> bool {
        let removed = self.inner.exposures.lock().expect("exposures").remove(&id).is_some();
        if removed {
            self.inner.send_if_connected(&s4t_shared::tunnel::Frame::Unlisten { listener: id });
            self.inner.publish();
        }
        removed
    }

    /// Opens a packet channel into `vpn`. Waits for the server's answer; the channel then
    /// survives reconnects (packets sent while disconnected are lost) until its last handle
    /// (receiver and senders) is dropped, which closes it on both ends. Dropping this future
    /// before it is ready withdraws the request: nothing is left behind.
    pub async fn open_packet_channel(&self, token: String, vpn: String) -> Result<PacketChannel, Error> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let link = Arc::new(Link::default());
        // Held across the wait below: if this future is dropped, so is `chan`, which closes it.
        let weak = Arc::downgrade(&self.inner);
        let on_close: packet::CloseAction = Box::new(move || Inner::packets_dropped(&weak, id));
        let (chan, tx) = packet::new_channel(id, link.clone(), Some(on_close));
        let (wtx, wrx) = oneshot::channel();
        let open = s4t_shared::tunnel::Frame::PacketOpen { channel: id, vpn: vpn.clone(), token: token.clone() };
        {
            let mut pk = self.inner.packets.lock().expect("packets");
            pk.insert(id, Packets { vpn, token, link, tx, waiters: vec![wtx] });
            self.inner.send_if_connected(&open);
        }
        self.inner.wanted.notify_one();
        wrx.await.map_err(|_| Error::Closed)??;
        Ok(chan)
    }

    /// Replaces the token exposure `id` presents when it is asked for again after a
    /// reconnect (the cloud renews tokens before they expire); the open listener is left as
    /// it is. False if there is no such exposure.
    pub fn renew_exposure_token(&self, id: u32, token: String) -> bool {
        match self.inner.exposures.lock().expect("exposures").get_mut(&id) {
            Some(e) => {
                e.token = token;
                true
            }
            None => false,
        }
    }

    /// Replaces the token every packet channel into `vpn` presents when it is re-opened after
    /// a reconnect. Returns how many channels took it.
    pub fn renew_packet_token(&self, vpn: &str, token: &str) -> usize {
        let mut pk = self.inner.packets.lock().expect("packets");
        let mut renewed = 0;
        for p in pk.values_mut().filter(|p| p.vpn == vpn) {
            p.token = token.to_owned();
            renewed += 1;
        }
        renewed
    }

    /// Packet channels the client holds: open, being opened, or waiting to be re-opened.
    pub fn packet_channels(&self) -> usize {
        self.inner.packets.lock().expect("packets").len()
    }

    /// Delayed requests that came due: (sent again, not sent: withdrawn meanwhile, or asked
    /// for on a new connection already).
    pub fn retries(&self) -> (u32, u32) {
        let [sent, not] = &self.inner.retries;
        (sent.load(Ordering::Relaxed), not.load(Ordering::Relaxed))
    }

    /// Watches the connection state.
    pub fn state(&self) -> watch::Receiver<ClientState> {
        self.inner.state.subscribe()
    }

    /// Waits until the client is connected or `timeout` passes. A client dials only once it
    /// has been asked for an exposure or a packet channel.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        let mut rx = self.state();
        tokio::time::timeout(timeout, rx.wait_for(|s| s.connected))
            .await
            .map_err(|_| Error::Timeout("not connected".into()))?
            .map_err(|_| Error::Closed)?;
        Ok(())
    }
}

impl Inner {
    fn send_if_connected(&self, f: &s4t_shared::tunnel::Frame) {
        if let Some(mux) = self.conn.lock().expect("conn").as_ref() {
            // A full control queue means the connection is about to be torn down; the request
            // is sent again on the next connection.
            let _ = mux.out.try_ctrl(f);
        }
    }

    /// Sends a delayed request `f` (`None`: withdrawn meanwhile) on `mux` if it is still the
    /// live connection (not after a reconnect), and counts it in [`ClientHandle::retries`].
    fn send_if_live(&self, mux: &Weak<Mux>, f: Option<&s4t_shared::tunnel::Frame>) {
        let conn = self.conn.lock().expect("conn");
        let sent = match (f, conn.as_ref(), mux.upgrade()) {
            (Some(f), Some(live), Some(mux)) if Arc::ptr_eq(live, &mux) => {
                // A full control queue: as in `send_if_connected`.
                let _ = mux.out.try_ctrl(f);
                true
            }
            _ => false,
        };
        self.retries[usize::from(!sent)].fetch_add(1, Ordering::Relaxed);
    }

    /// The last handle of packet channel `id` was dropped (or its opener gave up): forget it
    /// and, if connected, tell the server, which drops its end. Nothing if the client is gone
    /// or the channel was already removed (refused or closed by the server).
    fn packets_dropped(inner: &Weak<Inner>, id: u32) {
        let Some(inner) = inner.upgrade() else { return };
        // Under the packets lock, as `restore`: a reconnect either no longer sees the channel or
        // has re-opened it already, on the connection this `PacketClose` then follows it on.
        let mut pk = inner.packets.lock().expect("packets");
        let Some(p) = pk.remove(&id) else { return };
        if let Some(mux) = inner.conn.lock().expect("conn").as_ref() {
            if p.link.is_set() {
                mux.packet_channels_changed(false);
            }
            let close = s4t_shared::tunnel::Frame::PacketClose {
                channel: id,
                code: s4t_shared::tunnel::frame::code::NORMAL,
                reason: "closed by the board".into(),
            };
            // A full control queue: the connection is about to be torn down, and the server
            // drops the channel with it.
            let _ = mux.out.try_ctrl(&close);
        }
        p.link.set(None);
        tracing::debug!(vpn = p.vpn, "packet channel closed");
    }

    /// Whether there is anything to dial the server for.
    fn wants_something(&self) -> bool {
        !self.exposures.lock().expect("exposures").is_empty() || !self.packets.lock().expect("packets").is_empty()
    }

    /// Returns once there is something to dial the server for.
    async fn wait_wanted(&self) {
        // `notify_one` keeps a permit when nobody waits, so a request made between the check
        // and the wait is not missed.
        while !self.wants_something() {
            self.wanted.notified().await;
        }
    }

    fn publish(&self) {
        let ex = self.exposures.lock().expect("exposures");
        let mut list: Vec<ExposureState> = ex
            .iter()
            .map(|(id, e)| ExposureState {
                id: *id,
                requested_port: e.requested,
                port: e.assigned,
                target: e.target.clone(),
            })
            .collect();
        list.sort_by_key(|e| e.id);
        self.state.send_modify(|s| s.exposures = list);
    }
}

async fn run(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(inner.cfg.reconnect_initial, inner.cfg.reconnect_max);
    loop {
        tokio::select! {
            () = inner.wait_wanted() => {}
            _ = shutdown.cancelled() => break,
        }
        let res = tokio::select! {
            r = conn::session(&inner, &mut backoff) => r,
            _ = shutdown.cancelled() => break,
        };
        inner.conn.lock().expect("conn").take();
        for p in inner.packets.lock().expect("packets").values() {
            p.link.set(None);
        }
        inner.state.send_modify(|s| {
            s.connected = false;
            if let Err(e) = &res {
                s.last_error = Some(e.to_string());
            }
        });
        match &res {
            Err(Error::Version(m)) => tracing::error!(reason = %m, "tunnel server speaks another protocol version"),
            Err(e) => tracing::warn!(cause = %e, "tunnel channel lost"),
            Ok(()) => tracing::info!("tunnel channel closed"),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    inner.conn.lock().expect("conn").take();
    for (_, e) in inner.exposures.lock().expect("exposures").drain() {
        for w in e.waiters {
            let _ = w.send(Err(Error::Closed));
        }
    }
    for (_, p) in inner.packets.lock().expect("packets").drain() {
        p.link.set(None);
        for w in p.waiters {
            let _ = w.send(Err(Error::Closed));
        }
    }
    inner.state.send_modify(|s| s.connected = false);
}
