//! Wire types and sans-I/O protocol logic shared by every Stack4Things crate.
//!
//! # Layout
//!
//! - [`ids`]: identifiers of boards, requests and sessions, and the rules that make them valid.
//! - [`backoff`]: capped, jittered exponential backoff, used by every reconnecting client.
//! - [`tunnel`]: the tunnel channel's wire format (WebSocket framing, multiplexing frames,
//!   flow-control windows).
//! - [`gre`]: GRE-TAP framing (RFC 2784, protocol 0x6558) for L2 overlays.
//! - [`token`]: tunnel tokens (HMAC-SHA256 over board, port, vpn, expiry).
//! - [`plugin`]: plugin kinds, hardware grants and the pickle-0 text of legacy Python plugins.
//! - [`wamp`]: WAMP v2 messages, serializers, authentication and session state machines.
//!
//! # Invariant
//!
//! Nothing in this crate performs I/O or depends on an async runtime. Codecs take bytes and
//! return values or errors; state machines take events and return actions. That keeps them
//! testable without sockets and lets the board, the cloud and the tunnel share one definition
//! of every wire format.

pub mod backoff;
pub mod gre;
pub mod ids;
pub mod limits;
pub mod plugin;
pub mod token;
pub mod tunnel;
pub mod wamp;
