//! WAMP v2 over WebSocket: the router embedded in the cloud's wamp-agent and the client the
//! board agent uses. Messages, serializers, authentication math and session rules come from
//! `s4t_shared::wamp` (sans-I/O); this crate adds the sockets, tasks and timers.
//!
//! # Router (cloud)
//!
//! - [`Router::new`]`(RouterConfig, Arc<dyn Authenticator>)`; [`Router::serve`] accepts
//!   WebSocket connections (path `/`, subprotocols `wamp.2.json`, `wamp.2.msgpack`,
//!   `wamp.2.cbor`; TLS when given an `Arc<rustls::ServerConfig>`) until a
//!   `CancellationToken` fires.
//! - [`Router::local_session`]: the cloud's own session (role `agent`), an ordinary
//!   [`Session`] over an in-memory link.
//! - [`Router::bind_board`] (legacy sessions, after `connection`), [`Router::kill_session`],
//!   [`Router::kill_authid`], [`Router::kill_board`], [`Router::sessions`].
//! - Authentication: [`Authenticator`] (ticket, WAMP-CRA derived keys, anonymous = legacy);
//!   authorization: the Stack4Things policy in [`policy`] (roles `agent`, `enrollment`,
//!   `board`, `legacy`); refusals are `wamp.error.not_authorized`.
//! - Meta API as crossbar sends it: `wamp.session.on_join` (details dict),
//!   `wamp.session.on_leave` (session id), `wamp.session.{count,list,get,kill,kill_by_authid}`.
//!
//! # Client (board)
//!
//! [`connect`]`(&ClientConfig)` → [`Session`]: `id()`, `register(uri, handler)` (handlers run
//! concurrently, bounded), `call(uri, args, kwargs, timeout)` (cancelled on timeout),
//! `publish`, `subscribe` (bounded stream), `closed()` (resolves when the session ends, to
//! reconnect and re-register), and [`connect_with_retry`] with `s4t_shared::backoff::Backoff`.
//!
//! # Limits and backpressure
//!
//! Every session has a bounded outbound queue. A call to a callee whose queue is full fails at
//! once with `wamp.error.unavailable`; an event for a full subscriber is dropped (meta events
//! to agents never are); a session whose queue stays full for `Limits::stuck_timeout` is
//! closed (`s4t.close.overloaded`). A connection may send 64 KiB before its session is
//! established; messages over `max_message_size` close the session; in-flight calls,
//! registrations and subscriptions per session are capped (`s4t.error.limit_exceeded`); every
//! call has a timeout (`wamp.error.timeout`, with INTERRUPT to the callee); WebSocket pings
//! detect dead peers.
//!
//! # Layout
//!
//! - `link.rs`: WebSocket and in-memory message links, keepalive.
//! - `router/`: `mod.rs` (API, config), `session.rs` (per-connection task), `auth.rs`
//!   (authenticator, handshake), `realm.rs` (state, delivery), `dealer.rs`, `broker.rs`,
//!   `meta.rs`.
//! - `client/`: `mod.rs` (API), `connect.rs` (dial, handshake, retry), `actor.rs` (session
//!   task).
//! - `policy.rs`: roles and the authorization rules.
//! - `bin/wamp-bench.rs`: the benchmark (docs/benchmarks.md).

pub mod client;
mod error;
mod link;
pub mod policy;
pub mod router;

pub use client::{
    ClientConfig, CloseReason, Event, Invocation, Registration, Session, Subscription, connect, connect_with_retry,
};
pub use error::{Error, WampError};
pub use link::Keepalive;
pub use policy::Role;
pub use router::{
    AuthFuture, Authenticator, Limits, Router, RouterConfig, SessionInfo, StaticAuthenticator, TransportInfo,
};
pub use s4t_shared::wamp::session::ClientAuth;
pub use s4t_shared::wamp::{CraCredential, Dict, Id, Message, Payload, Secret, Serializer};

/// An error and its causes on one line, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
