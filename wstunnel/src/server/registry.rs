//! Server-wide state: live channels, public listeners, and legacy connections waiting for
//! their data socket. Every entry holds the cancellation token of what it names, so the
//! [`ServerHandle`] can revoke it.

use portable_atomic::{AtomicU64, Ordering};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::mux::Mux;
use crate::stats::{Counters, TrafficStats};

pub(crate) struct Registry {
    pub(crate) local_addr: SocketAddr,
    channels: Mutex<HashMap<u64, ChannelEntry>>,
    /// Channels that offered lanes, by the key their lanes present.
    lane_doors: Mutex<HashMap<String, Weak<Mux>>>,
    ports: Mutex<HashMap<u16, PortEntry>>,
    pending: Mutex<HashMap<String, TcpStream>>,
    max_pending: usize,
    next_channel: AtomicU64,
    pub(crate) counters: Arc<Counters>,
}

struct ChannelEntry {
    board: Option<String>,
    cancel: CancellationToken,
    /// The key of its lanes, if it offered lanes.
    lane_key: Option<String>,
}

struct PortEntry {
    id: u64,
    board: String,
    legacy: bool,
    cancel: CancellationToken,
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
    pub(crate) fn new(local_addr: SocketAddr, max_pending: usize) -> Registry {
        Registry {
            local_addr,
            channels: Mutex::new(HashMap::new()),
            lane_doors: Mutex::new(HashMap::new()),
            ports: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            max_pending,
            next_channel: AtomicU64::new(1),
            counters: Arc::default(),
        }
    }

    pub(crate) fn add_channel(&self, cancel: CancellationToken) -> u64 {
        let id = self.next_channel.fetch_add(1, Ordering::Relaxed);
        Counters::add(&self.counters.channels, 1);
        self.channels.lock().expect("registry").insert(id, ChannelEntry { board: None, cancel, lane_key: None });
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
    pub(crate) fn add_port(&self, port: u16, board: &str, legacy: bool, cancel: CancellationToken) -> Option<u64> {
        let mut p = self.ports.lock().expect("registry");
        if p.get(&port).is_some_and(|e| !e.cancel.is_cancelled()) {
            return None;
        }
        let id = self.next_channel.fetch_add(1, Ordering::Relaxed);
        p.insert(port, PortEntry { id, board: board.to_owned(), legacy, cancel });
        Some(id)
    }

    /// Closes the listener on `port` if `board` owns it (a stale channel of the same board).
    pub(crate) fn take_over(&self, port: u16, board: &str) -> bool {
        match self.ports.lock().expect("registry").get(&port) {
            Some(p) if !p.legacy && p.board == board => {
                p.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Forgets the listener entry `id` on `port` (not a newer one that took the port over).
    pub(crate) fn remove_port(&self, port: u16, id: u64) {
        let mut p = self.ports.lock().expect("registry");
        if p.get(&port).is_some_and(|e| e.id == id) {
            p.remove(&port);
        }
    }

    /// Parks an accepted legacy connection until its data socket arrives; false when full.
    pub(crate) fn park(&self, id: String, tcp: TcpStream) -> bool {
        let mut p = self.pending.lock().expect("registry");
        if p.len() >= self.max_pending {
            return false;
        }
        p.insert(id, tcp);
        true
    }

    pub(crate) fn take_pending(&self, id: &str) -> Option<TcpStream> {
        self.pending.lock().expect("registry").remove(id)
    }

    pub(crate) fn close_all(&self) {
        for c in self.channels.lock().expect("registry").values() {
            c.cancel.cancel();
        }
        for p in self.ports.lock().expect("registry").values() {
            p.cancel.cancel();
        }
        self.pending.lock().expect("registry").clear();
    }
}

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

    /// Closes every channel of `board` (its listeners and streams go with them). Returns how
    /// many channels were closed.
    pub fn close_board(&self, board: &str) -> usize {
        let ch = self.reg.channels.lock().expect("registry");
        let mut n = 0;
        for c in ch.values().filter(|c| c.board.as_deref() == Some(board)) {
            c.cancel.cancel();
            n += 1;
        }
        n
    }

    /// Closes the public listener on `port` (lease ended, service disabled); the board is told.
    /// Streams already accepted on it stay up. Returns false when nothing listens there.
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
