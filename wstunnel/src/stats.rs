//! Traffic counters for operators: what a tunnel server (or a client) has carried since it
//! started. One atomic add per frame; read with [`crate::server::ServerHandle::stats`].

use portable_atomic::{AtomicU64, Ordering};

/// Counters shared by every channel of one server or client.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) channels: AtomicU64,
    pub(crate) streams_opened: AtomicU64,
    pub(crate) streams_closed: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) public_refused: AtomicU64,
    pub(crate) lanes_joined: AtomicU64,
    pub(crate) lanes_left: AtomicU64,
    pub(crate) packet_channels_opened: AtomicU64,
    pub(crate) packet_channels_closed: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// A snapshot of a server's traffic since it started. Totals only grow; `*_open` are gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrafficStats {
    /// Board channels accepted (after the upgrade and version check).
    pub channels_total: u64,
    /// Board channels connected now.
    pub channels_open: u64,
    /// Lanes (a channel's extra connections) connected now.
    pub lanes_open: u64,
    /// Packet channels (a board's end of a VPN) open now, counting those whose hook has not
    /// answered yet.
    pub packet_channels_open: u64,
    /// Public listeners open now.
    pub listeners_open: u64,
    /// TCP connections carried over channels (streams opened).
    pub streams_total: u64,
    /// Streams open now.
    pub streams_open: u64,
    /// Stream payload bytes received from the peers (for a server: from the boards).
    pub bytes_received: u64,
    /// Stream payload bytes sent to the peers (for a server: to the boards).
    pub bytes_sent: u64,
    /// Listener and packet-channel requests refused (bad or stale token, port not allowed,
    /// limits).
    pub refusals_total: u64,
    /// Connections to the public ports closed at accept, beyond a bound (a source's, the
    /// server's, a legacy port's, a channel's streams).
    pub public_refusals_total: u64,
}

impl TrafficStats {
    pub(crate) fn read(c: &Counters, channels_open: usize, listeners_open: usize) -> TrafficStats {
        let opened = Counters::get(&c.streams_opened);
        TrafficStats {
            channels_total: Counters::get(&c.channels),
            channels_open: channels_open as u64,
            lanes_open: Counters::get(&c.lanes_joined).saturating_sub(Counters::get(&c.lanes_left)),
            packet_channels_open: Counters::get(&c.packet_channels_opened)
                .saturating_sub(Counters::get(&c.packet_channels_closed)),
            listeners_open: listeners_open as u64,
            streams_total: opened,
            streams_open: opened.saturating_sub(Counters::get(&c.streams_closed)),
            bytes_received: Counters::get(&c.bytes_received),
            bytes_sent: Counters::get(&c.bytes_sent),
            refusals_total: Counters::get(&c.refused),
            public_refusals_total: Counters::get(&c.public_refused),
        }
    }
}
