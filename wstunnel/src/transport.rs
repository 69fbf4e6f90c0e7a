//! The byte streams a channel runs over (TCP, or TLS over TCP), split into boxed halves.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::io::{BoxRead, BoxWrite};

/// A connection a channel can run over.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn split_box(self) -> (BoxRead, BoxWrite);
}

impl Transport for TcpStream {
    fn split_box(self) -> (BoxRead, BoxWrite) {
        // Owned halves of a TCP stream need no lock.
        let (r, w) = self.into_split();
        (Box::new(r), Box::new(w))
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn split_box(self) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(self);
        (Box::new(r), Box::new(w))
    }
}

impl Transport for tokio_rustls::client::TlsStream<TcpStream> {
    fn split_box(self) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(self);
        (Box::new(r), Box::new(w))
    }
}
