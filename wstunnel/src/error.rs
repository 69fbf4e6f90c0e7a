//! The crate's one error type.

use s4t_shared::token::TokenError;
use s4t_shared::tunnel::FrameError;
use s4t_shared::tunnel::ws::WsError;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid tunnel URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("WebSocket upgrade failed: {0}")]
    Handshake(String),
    #[error("WebSocket framing error: {0}")]
    Ws(#[from] WsError),
    #[error("malformed tunnel frame: {0}")]
    Frame(#[from] FrameError),
    #[error("tunnel protocol error: {0}")]
    Protocol(String),
    #[error("protocol version mismatch: {0}")]
    Version(String),
    #[error("the server refused: {reason} (code {code})")]
    Refused { code: u16, reason: String },
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("the tunnel channel is closed")]
    Closed,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("legacy wstun: {0}")]
    Legacy(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}

/// Adds context to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|e| Error::io(context(), e))
    }
}
