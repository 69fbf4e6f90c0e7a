//! Server-wide state: live channels, public listeners, and legacy connections waiting for
//! their data socket. Every entry holds the cancellation token of what it names, so the
//! [`ServerHandle`] can revoke it.

use portable_atomic::{AtomicU64, Ordering};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use s4t_shared::limits::{SourceSlot, SourceSlots};
use s4t_shared::tunnel::ws::Opcode;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::Limits;
use super::channel::RefusalLog;

use crate::io::Outbound;
use crate::mux::Mux;
use crate::stats::{Counters, TrafficStats};

pub(crate) struct Registry {
    pub(crate) local_addr: SocketAddr,
    channels: Mutex<HashMap<u64, ChannelEntry>>,
    /// Channels that offered lanes, by the key their lanes present.
    lane_doors: Mutex<HashMap<String, Weak<Mux>>>,
    ports: Mutex<HashMap<u16, PortEntry>>,
    /// Open packet channels by (board, VPN): a board has one per VPN, on one of its channels.
    vpns: Mutex<HashMap<(String, String), VpnEntry>>,
    /// Legacy connections waiting for their data socket: id → (public port, connection).
    pending: Mutex<HashMap<String, (u16, TcpStream, PublicSlot)>>,
    max_pending: usize,
    /// Connections open to the public ports by source ([`Limits::max_public_per_source`]).
    public_sources: Arc<SourceSlots>,
    /// Connections open to the public ports ([`Limits::max_public_streams`]).
    public_streams: Arc<Semaphore>,
    /// Which refused public connections are logged: a peer connecting in a loop must not
    /// flood the log.
    public_refusals: Mutex<RefusalLog>,
    next_channel: AtomicU64,
    pub(crate) counters: Arc<Counters>,
}

struct ChannelEntry {
    board: Option<String>,
    /// When its first valid token made it the board's.
    board_since: Option<SystemTime>,
    life: Arc<ChannelLife>,
    /// The key of its lanes, if it offered lanes.
    lane_key: Option<String>,
}

struct PortEntry {
    id: u64,
    board: String,
    legacy: bool,
    /// The channel that opened it (0 for a legacy listener). Channel ids grow, so a smaller
    /// one is an older channel.
    chan: u64,
    cancel: CancellationToken,
}

struct VpnEntry {
    id: u64,
    /// The channel carrying it.
    chan: u64,
}

/// What the registry and a channel's own task share: how to close it, and whether its peer
/// still answers.
pub(crate) struct ChannelLife {
    pub(crate) cancel: CancellationToken,
    out: Outbound,
    /// Messages received on the channel so far: a liveness probe watches it move.
    heard: AtomicU64,
    /// Why the server closed the channel, if it did: sent in its `GoAway`.
    closed_because: Mutex<Option<(u16, String)>>,
}

impl ChannelLife {
    pub(crate) fn new(cancel: CancellationToken, out: Outbound) -> Arc<ChannelLife> {
        Arc::new(ChannelLife { cancel, out, heard: AtomicU64::new(0), closed_because: Mutex::new(None) })
    }

    /// Counts a message received from the peer.
    pub(crate) fn heard(&self) {
        self.heard.fetch_add(1, Ordering::Release);
    }

    /// Closes the channel, telling its peer `code` and `reason` (the first reason given wins).
    pub(crate) fn close(&self, code: u16, reason: String) {
        self.closed_because.lock().expect("channel life").get_or_insert((code, reason));
        self.cancel.cancel();
    }

    /// The code and reason [`ChannelLife::close`] was given.
    pub(crate) fn closed_because(&self) -> Option<(u16, String)> {
        self.closed_because.lock().expect("channel life").clone()
    }

    /// Pings the peer and waits up to `within` for anything from it: false when nothing came
    /// (or the channel is closing), so the peer is presumed gone.
    pub(crate) async fn answers(&self, within: Duration) -> bool {
        let before = self.heard.load(Ordering::Acquire);
        if self.cancel.is_cancelled() {
            return false;
        }
        match self.out.try_ctrl_raw(self.out.ws_control(Opcode::Ping, b"probe")) {
            Ok(()) => {}
            Err(crate::error::Error::Closed) => return false,
            // A full control queue: the channel is busy (its peer reads slower than we send),
            // not found dead; a live board must not lose its port to a newer channel.
            Err(_) => return true,
        }
        // Polled rather than notified: a probe is rare (two channels of one board want the
        // same port), and the channel's reader then pays one atomic add per message, no more.
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.heard.load(Ordering::Acquire) != before {
                return true;
            }
            if self.cancel.is_cancelled() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Who holds a port a channel could not bind, as that channel sees it.
pub(crate) enum Holder {
    /// Nobody live: no listener is recorded there, or it is closing.
    Gone,
    /// An older channel of the same board: perhaps one the board left behind when it
    /// reconnected, perhaps a live one.
    Older(Arc<ChannelLife>),
    /// A live listener that must not be taken: another board's, a legacy one, one of the
    /// asking channel's own, or one of a newer channel of the board.
    Live,
}

/// A public listener, as [`ServerHandle::listeners`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    pub board: String,
    pub port: u16,
    /// Opened by a wstun client.
    pub legacy: bool,
}

impl Registry {
    pub(crate) fn new(local_addr: SocketAddr, limits: &Limits) -> Registry {
        Registry {
            local_addr,
            channels: Mutex::new(HashMap::new()),
            lane_doors: Mutex::new(HashMap::new()),
            ports: Mutex::new(HashMap::new()),
            vpns: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            max_pending: limits.legacy_max_pending,
            public_sources: SourceSlots::new(limits.max_public_per_source),
            public_streams: Arc::new(Semaphore::new(limits.max_public_streams)),
            public_refusals: Mutex::default(),
            next_channel: AtomicU64::new(1),
            counters: Arc::default(),
        }
    }

    pub(crate) fn add_channel(&self, life: Arc<ChannelLife>) -> u64 {
        let id = self.next_channel.fetch_add(1, Ordering::Relaxed);
        Counters::add(&self.counters.channels, 1);
        self.channels
            .lock()
            .expect("registry")
            .insert(id, ChannelEntry { board: None, board_since: None, life, lane_key: None });
        id
    }

    /// Lets lanes that present `key` join channel `id`'s `mux` (until the channel is removed).
    pub(crate) fn open_lane_door(&self, id: u64, key: &str, mux: Weak<Mux>) {
        if let Some(c) = self.channels.lock().expect("registry").get_mut(&id) {
            c.lane_key = Some(key.to_owned());
            self.lane_doors.lock().expect("registry").insert(key.to_owned(), mux);
        }
    }

    /// The live channel whose lanes present `key`.
    pub(crate) fn lane_door(&self, key: &str) -> Option<Arc<Mux>> {
        self.lane_doors.lock().expect("registry").get(key).and_then(Weak::upgrade)
    }

    pub(crate) fn set_channel_board(&self, id: u64, board: &str) {
        if let Some(c) = self.channels.lock().expect("registry").get_mut(&id) {
            c.board = Some(board.to_owned());
            c.board_since.get_or_insert_with(SystemTime::now);
        }
    }

    pub(crate) fn remove_channel(&self, id: u64) {
        let removed = self.channels.lock().expect("registry").remove(&id);
        if let Some(key) = removed.and_then(|c| c.lane_key) {
            self.lane_doors.lock().expect("registry").remove(&key);
        }
    }

    /// Records a public listener and returns its entry id; `None` if a live listener already
    /// holds the port (an entry whose listener was cancelled is replaced).
    /// `chan`: the channel opening it, 0 for a legacy listener.
    pub(crate) fn add_port(
        &self,
        port: u16,
        board: &str,
        legacy: bool,
        chan: u64,
        cancel: CancellationToken,
    ) -> Option<u64> {
        let mut p = self.ports.lock().expect("registry");
        if p.get(&port).is_some_and(|e| !e.cancel.is_cancelled()) {
            return None;
        }
        let id = self.next_channel.fetch_add(1, Ordering::Relaxed);
        p.insert(port, PortEntry { id, board: board.to_owned(), legacy, chan, cancel });
        Some(id)
    }

    /// Who holds `port`, which channel `chan` of `board` could not bind.
    pub(crate) fn holder(&self, port: u16, board: &str, chan: u64) -> Holder {
        let owner = match self.ports.lock().expect("registry").get(&port) {
            None => return Holder::Gone,
            Some(e) if e.cancel.is_cancelled() => return Holder::Gone,
            Some(e) if e.legacy || e.board != board || e.chan >= chan => return Holder::Live,
            Some(e) => e.chan,
        };
        match self.channels.lock().expect("registry").get(&owner) {
            Some(c) => Holder::Older(c.life.clone()),
            // Its channel is gone and its accept loop about to free the port.
            None => Holder::Gone,
        }
    }

    /// Records that channel `chan` carries the packet channel of `board` for `vpn` and
    /// returns the entry's id, unless another channel holds it: as [`Registry::holder`] for
    /// ports, except that `chan` may replace its own and that a closing holder is replaced.
    pub(crate) fn claim_vpn(&self, board: &str, vpn: &str, chan: u64) -> Result<u64, Holder> {
        let key = (board.to_owned(), vpn.to_owned());
        let mut v = self.vpns.lock().expect("registry");
        match v.get(&key) {
            Some(e) if e.chan > chan => return Err(Holder::Live),
            Some(e) if e.chan < chan => {
                if let Some(c) = self.channels.lock().expect("registry").get(&e.chan)
                    && !c.life.cancel.is_cancelled()
                {
                    return Err(Holder::Older(c.life.clone()));
                }
            }
            _ => {}
        }
        let id = self.next_channel.fetch_add(1, Ordering::Relaxed);
        v.insert(key, VpnEntry { id, chan });
        Ok(id)
    }

    /// Forgets the packet channel entry `id` (not a newer one that replaced it).
    pub(crate) fn remove_vpn(&self, board: &str, vpn: &str, id: u64) {
        let key = (board.to_owned(), vpn.to_owned());
        let mut v = self.vpns.lock().expect("registry");
        if v.get(&key).is_some_and(|e| e.id == id) {
            v.remove(&key);
        }
    }

    /// Forgets the listener entry `id` on `port` (not a newer one that took the port over).
    pub(crate) fn remove_port(&self, port: u16, id: u64) {
        let mut p = self.ports.lock().expect("registry");
        if p.get(&port).is_some_and(|e| e.id == id) {
            p.remove(&port);
        }
    }

    /// Parks an accepted legacy connection on `port` until its data socket arrives; false
    /// when the server holds `max_pending` such connections, or one port an eighth of them
    /// (a port whose board never answers, or whose users connect faster than it does, must
    /// not take every other legacy board's room).
    pub(crate) fn park(&self, id: String, port: u16, tcp: TcpStream, slot: PublicSlot) -> bool {
        let mut p = self.pending.lock().expect("registry");
        let per_port = (self.max_pending / 8).max(1);
        if p.len() >= self.max_pending || p.values().filter(|(q, ..)| *q == port).count() >= per_port {
            return false;
        }
        p.insert(id, (port, tcp, slot));
        true
    }

    /// A parked legacy connection, with its place among the public ones.
    pub(crate) fn take_pending(&self, id: &str) -> Option<(TcpStream, PublicSlot)> {
        self.pending.lock().expect("registry").remove(id).map(|(_, tcp, slot)| (tcp, slot))
    }

    /// A place for a connection accepted on public `port` from `peer`, or `None` (the caller
    /// closes it) when its source or the server holds as many as the limits allow.
    /// `listener`: the listener's own bound, if it has one (a legacy listener's).
    pub(crate) fn admit_public(
        &self,
        port: u16,
        peer: SocketAddr,
        listener: Option<&Arc<Semaphore>>,
    ) -> Option<PublicSlot> {
        let own = match listener.map(|l| l.clone().try_acquire_owned()) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                self.public_refused(port, peer, "too many connections on this port");
                return None;
            }
        };
        let Some(source) = self.public_sources.take(peer.ip()) else {
            self.public_refused(port, peer, "too many connections from this source");
            return None;
        };
        let Ok(permit) = self.public_streams.clone().try_acquire_owned() else {
            self.public_refused(port, peer, "too many public connections on this server");
            return None;
        };
        Some(PublicSlot { _source: source, _permit: permit, _listener: own })
    }

    /// Logs a public connection refused before its board heard of it, unless such refusals
    /// are being logged too often (they are then counted into the next line).
    pub(crate) fn public_refused(&self, port: u16, peer: SocketAddr, reason: &str) {
        Counters::add(&self.counters.public_refused, 1);
        if let Some(unlogged) = self.public_refusals.lock().expect("registry").admit(Instant::now()) {
            tracing::warn!(port, %peer, reason, unlogged, "public connection closed at accept");
        }
    }

    pub(crate) fn close_all(&self) {
        for c in self.channels.lock().expect("registry").values() {
            c.life.cancel.cancel();
        }
        for p in self.ports.lock().expect("registry").values() {
            p.cancel.cancel();
        }
        self.pending.lock().expect("registry").clear();
    }
}

/// A public connection's place among its source's and the server's
/// ([`Limits::max_public_per_source`], [`Limits::max_public_streams`]): held with the
/// connection, given back when it closes.
pub(crate) struct PublicSlot {
    _source: SourceSlot,
    _permit: OwnedSemaphorePermit,
    /// Its place among its listener's ([`Limits::legacy_max_per_port`]).
    _listener: Option<OwnedSemaphorePermit>,
}

/// A connection counted among its source's unproved ones (no valid token, lane key or legacy
/// admission yet) while held: one source cannot hold every connection slot with peers that
/// never present a token ([`super::Limits::max_unproved_per_source`]).
pub(crate) type Unproved = s4t_shared::limits::SourceSlot;

/// Inspects and revokes what a running server holds. Cheap to clone.
#[derive(Clone)]
pub struct ServerHandle {
    reg: Arc<Registry>,
}

impl ServerHandle {
    pub(crate) fn new(reg: Arc<Registry>) -> ServerHandle {
        ServerHandle { reg }
    }

    /// The address the server accepts channels on.
    pub fn local_addr(&self) -> SocketAddr {
        self.reg.local_addr
    }

    /// The channels that belong to a board: (channel id, board, since when).
    pub fn board_channels(&self) -> Vec<(u64, String, SystemTime)> {
        let ch = self.reg.channels.lock().expect("registry");
        ch.iter().filter_map(|(id, c)| Some((*id, c.board.clone()?, c.board_since?))).collect()
    }

    /// Closes channel `id` (its listeners, streams and packet channels go with it). False if
    /// there is no such channel.
    pub fn close_channel(&self, id: u64) -> bool {
        match self.reg.channels.lock().expect("registry").get(&id) {
            Some(c) => {
                c.life.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Closes every channel of `board` (its listeners and streams go with them). Returns how
    /// many channels were closed.
    pub fn close_board(&self, board: &str) -> usize {
        let ch = self.reg.channels.lock().expect("registry");
        let mut n = 0;
        for c in ch.values().filter(|c| c.board.as_deref() == Some(board)) {
            c.life.cancel.cancel();
            n += 1;
        }
        n
    }

    /// Closes the public listener on `port` (lease ended, service disabled) and the
    /// connections accepted on it; the board is told. Returns false when nothing listens there.
    pub fn close_listener(&self, port: u16) -> bool {
        match self.reg.ports.lock().expect("registry").get(&port) {
            Some(p) => {
                p.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// [`close_listener`](Self::close_listener), only if `board` holds the port: a sweep that
    /// read the listeners a moment ago must not close another board's that opened since.
    pub fn close_listener_of(&self, port: u16, board: &str) -> bool {
        match self.reg.ports.lock().expect("registry").get(&port) {
            Some(p) if p.board == board => {
                p.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Public listeners open now.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        let p = self.reg.ports.lock().expect("registry");
        let mut v: Vec<_> =
            p.iter().map(|(port, e)| ListenerInfo { board: e.board.clone(), port: *port, legacy: e.legacy }).collect();
        v.sort_by_key(|l| l.port);
        v
    }

    /// Boards with a live channel (those that presented a valid token).
    pub fn boards(&self) -> Vec<String> {
        let ch = self.reg.channels.lock().expect("registry");
        let mut v: Vec<String> = ch.values().filter_map(|c| c.board.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Channels connected now, including those that have not presented a token yet.
    pub fn channel_count(&self) -> usize {
        self.reg.channels.lock().expect("registry").len()
    }

    /// What the server has carried since it started, and what is open now.
    pub fn stats(&self) -> TrafficStats {
        let listeners = self.reg.ports.lock().expect("registry").len();
        TrafficStats::read(&self.reg.counters, self.channel_count(), listeners)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{outbound, tcp_pair};

    /// A channel whose control queue is full is busy, not dead: it keeps its ports when a
    /// newer channel of its board asks for them.
    #[tokio::test]
    async fn a_channel_with_a_full_queue_answers() {
        let (sink_end, _peer) = tcp_pair().await;
        // No writer task: nothing drains the queue.
        let (out, _w) = outbound(Box::new(sink_end.into_split().1), false);
        while out.try_ctrl_raw(out.ws_control(Opcode::Ping, b"x")).is_ok() {}
        let life = ChannelLife::new(CancellationToken::new(), out.clone());
        assert!(life.answers(Duration::from_millis(10)).await, "a busy channel was presumed dead");
        out.close();
        assert!(!life.answers(Duration::from_millis(10)).await, "a closed channel answered");
    }
}
