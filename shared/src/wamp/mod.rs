//! WAMP v2: messages, serializers, validation, authentication helpers and session state
//! machines, without I/O. The router and client in the `s4t-wamp` crate drive these over
//! WebSocket; the fuzz targets in `wamp/fuzz` drive the decoders directly.
//!
//! # Layout
//!
//! - [`message`]: the [`Message`] enum (Basic Profile plus CHALLENGE, AUTHENTICATE, CANCEL,
//!   INTERRUPT), type codes, error URIs.
//! - [`codec`]: [`Serializer`] (JSON, MessagePack, CBOR; subprotocol names), encode/decode.
//! - [`parse`]: the strict parse of a decoded list into a [`Message`] and [`DecodeError`],
//!   which says whether a defect can be answered with an ERROR or needs an ABORT.
//! - [`validate`]: URI rules and limits.
//! - [`auth`]: ticket and WAMP-CRA (salted PBKDF2 keys, HMAC signatures, challenges),
//!   [`Secret`] with a redacted `Debug`.
//! - [`session`]: client and router opening handshakes, and which messages each side may
//!   receive once established.

pub mod auth;
pub mod codec;
pub mod message;
pub mod parse;
pub mod session;
pub mod validate;

pub use auth::{CraCredential, Secret};
pub use codec::Serializer;
pub use message::{Dict, Id, Message, Payload};
pub use parse::DecodeError;
