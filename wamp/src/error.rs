//! The crate's error type.

use s4t_shared::wamp::codec::EncodeError;
use s4t_shared::wamp::session::HandshakeError;
use s4t_shared::wamp::{DecodeError, Dict, Id};
use serde_json::Value;

/// An error reply from a WAMP peer (ERROR message): the error URI and its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct WampError {
    pub error: String,
    pub args: Vec<Value>,
    pub kwargs: Dict,
}

impl WampError {
    pub fn new(error: impl Into<String>, message: impl Into<String>) -> Self {
        WampError { error: error.into(), args: vec![Value::String(message.into())], kwargs: Dict::new() }
    }

    /// Just an error URI, without a payload.
    pub fn uri(error: impl Into<String>) -> Self {
        WampError { error: error.into(), args: Vec::new(), kwargs: Dict::new() }
    }
}

impl std::fmt::Display for WampError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)?;
        if let Some(Value::String(message)) = self.args.first() {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for WampError {}

/// Everything that can go wrong in the router or the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot open a WebSocket to {url}")]
    Connect {
        url: String,
        #[source]
        source: tokio_tungstenite::tungstenite::Error,
    },
    #[error("the peer agreed on no WAMP subprotocol we speak (offered: {0})")]
    Subprotocol(String),
    #[error("opening the WAMP session failed")]
    Handshake(#[from] HandshakeError),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the WAMP session is closed")]
    Closed,
    #[error("the peer answered with an error: {0}")]
    Wamp(#[from] WampError),
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("WebSocket failure")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("I/O failure")]
    Io(#[from] std::io::Error),
    #[error("TLS failure")]
    Tls(#[from] rustls::Error),
    /// The authenticator could not look credentials up (database down...); the session is
    /// refused with `wamp.error.authentication_failed`.
    #[error("credential lookup failed: {0}")]
    Authenticator(String),
    #[error("no session {0} in the router")]
    NoSuchSession(Id),
    #[error("a limit was reached: {0}")]
    Limit(&'static str),
}

impl Error {
    /// The WAMP error URI, when the peer answered a request with an ERROR.
    pub fn wamp_uri(&self) -> Option<&str> {
        match self {
            Error::Wamp(e) => Some(&e.error),
            _ => None,
        }
    }
}
