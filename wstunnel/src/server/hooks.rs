//! What the embedding cloud decides beyond the token check.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use crate::packet::PacketChannel;

/// Why a hook refused a request, and whether asking again may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The cloud's policy says no (port not allocated to the board, token revoked): the board
    /// is told so and drops the request.
    Denied(String),
    /// The cloud cannot decide now (its database is unreachable, …): the board is told to ask
    /// again later and keeps the exposures and packet channels it has.
    Unavailable(String),
}

impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal::Denied(reason)
    }
}

/// Policy and notifications the cloud implements. Every method has a default suited to the
/// `wstunnel server` command line: allow what the token allows, refuse legacy ports unless
/// they are in [`DefaultHooks::legacy_ports`], refuse packet channels.
pub trait ServerHooks: Send + Sync + 'static {
    /// May `board` (proved by its token) listen on `port` (0: server-assigned)? A refusal is
    /// logged and sent to the board: [`Refusal::Denied`] for good (the board drops the
    /// exposure), [`Refusal::Unavailable`] for now (it keeps a working one and asks again).
    fn authorize_listener(&self, board: &str, port: u16) -> impl Future<Output = Result<(), Refusal>> + Send {
        let _ = (board, port);
        async { Ok(()) }
    }

    /// Does the cloud still honour a valid token of `board`'s that expires at `expiry` (Unix
    /// seconds)? Lets it refuse tokens issued before it last revoked or rotated the board's
    /// credentials, which would otherwise stay usable until they expire. A refusal refuses the
    /// request the token came with, for good or for now as in `authorize_listener`.
    fn token_accepted(&self, board: &str, expiry: u64) -> impl Future<Output = Result<(), Refusal>> + Send {
        let _ = (board, expiry);
        async { Ok(()) }
    }

    /// May an (unauthenticated) wstun client listen on `port`? Called only when legacy mode is
    /// on; the cloud answers yes only for ports it allocated.
    fn legacy_port_allowed(&self, port: u16) -> impl Future<Output = bool> + Send {
        let _ = port;
        async { false }
    }

    /// The board a legacy port was allocated to, if the cloud knows: the wstun listener is
    /// then accounted to that board (listings, revocation), and a client naming another board
    /// (`-u`) is refused.
    fn legacy_port_board(&self, port: u16) -> impl Future<Output = Option<String>> + Send {
        let _ = port;
        async { None }
    }

    /// A public listener opened (`legacy`: for a wstun client; `board` is the port's board when
    /// [`ServerHooks::legacy_port_board`] knows it).
    fn listener_opened(&self, board: &str, port: u16, legacy: bool) {
        tracing::info!(board, port, legacy, "public listener opened");
    }

    /// A connection from `peer` was accepted on `board`'s public `port` (`legacy`: a wstun
    /// listener). `false` closes it at once, before the board hears of it. Called on the
    /// listener's accept loop, so it must not block: keep the policy in memory (the cloud
    /// loads a port's source-address allow-list when it authorizes the listener).
    fn connection_allowed(&self, board: &str, port: u16, peer: SocketAddr, legacy: bool) -> bool {
        let _ = (board, port, peer, legacy);
        true
    }

    /// A public listener closed (unexposed, revoked, or its channel died).
    fn listener_closed(&self, board: &str, port: u16, legacy: bool) {
        tracing::info!(board, port, legacy, "public listener closed");
    }

    /// A board opened a packet channel for `vpn` (token checked). Take it and pump it into a
    /// TUN/TAP device (see [`crate::packet`]); a refusal is sent to the board as in
    /// `authorize_listener`: [`Refusal::Denied`] for good (it drops the channel),
    /// [`Refusal::Unavailable`] for now (a channel that was open keeps its place and is asked
    /// for again).
    fn packet_channel(
        &self,
        board: &str,
        vpn: &str,
        channel: PacketChannel,
    ) -> impl Future<Output = Result<(), Refusal>> + Send {
        let _ = (board, vpn, channel);
        async { Err(Refusal::Denied("this server does not terminate packet channels".to_owned())) }
    }
}

/// The command line's policy.
#[derive(Debug, Clone, Default)]
pub struct DefaultHooks {
    /// Ports wstun clients may listen on when legacy mode is on (`None`: none).
    pub legacy_ports: Option<RangeInclusive<u16>>,
}

impl ServerHooks for DefaultHooks {
    fn legacy_port_allowed(&self, port: u16) -> impl Future<Output = bool> + Send {
        let ok = self.legacy_ports.as_ref().is_some_and(|r| r.contains(&port));
        async move { ok }
    }
}
