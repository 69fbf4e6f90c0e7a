//! Reverse WebSocket tunnels: the data plane between boards behind NAT and the cloud.
//!
//! A board (the [`client`]) dials the cloud's tunnel [`server`] once and keeps one WebSocket,
//! the *channel*, which carries everything multiplexed: each TCP connection accepted on a
//! public port the board asked for becomes a *stream* (opened by the server, optimistic: data
//! may follow the open at once), and each VPN the board joined a *packet channel*. Streams
//! have credit-based flow control, so a slow reader makes the sender wait instead of anyone
//! buffering without bound. Listener requests and packet channels need a tunnel token
//! ([`s4t_shared::token`]) minted by the cloud. The wire format lives in
//! [`s4t_shared::tunnel`]; this crate does the I/O.
//!
//! The server also speaks MDSLab wstun 1.0.11 (when configured), and the binary also answers
//! as `wstun` ([`wstun`]), so the original Python lightning-rod can use it.
//!
//! # Layout
//!
//! - [`server`]: [`server::Server`] (bind, run), [`server::ServerHandle`] (revoke, list,
//!   [`TrafficStats`]), [`server::ServerHooks`] (the cloud's policy and notifications).
//! - [`client`]: [`client::start`] → [`client::ClientHandle`] (expose, unexpose, packet
//!   channels, observable state).
//! - [`packet`]: packet channels and the TUN/TAP pump.
//! - [`wstun`]: the wstun-compatible command line and client.
//! - [`process`]: plumbing every Stack4Things binary shares (tracing set-up, the signal-driven
//!   shutdown token). It lives here because this is the lowest crate with a runtime that every
//!   binary links.
//! - internals: `io` (the channel's WebSocket reader and its shared sink), `handshake` (HTTP
//!   upgrade and routing), `mux` (streams, flow control, the TCP pumps), `splice` (zero-copy payload on plain TCP),
//!   `transport`.

pub mod cli;
pub mod client;
mod error;
mod handshake;
mod io;
mod mux;
pub mod packet;
pub mod process;
pub mod server;
mod splice;
mod stats;
pub mod tls;
mod transport;
pub mod wstun;

pub use error::Error;
pub use handshake::{LEGACY_SUBPROTOCOL, SUBPROTOCOL, fuzz_legacy_route};
pub use stats::TrafficStats;
