//! The tunnel channel's wire format, sans-I/O.
//!
//! - [`ws`]: RFC 6455 framing (headers, masking, reassembly) for the channel's WebSocket.
//! - [`frame`]: the multiplexing frames carried one per WebSocket binary message.
//! - [`window`]: per-stream credit-based flow control.

pub mod frame;
pub mod window;
pub mod ws;

pub use frame::{Frame, FrameError, PROTOCOL_VERSION};
