//! The byte streams a channel runs over (TCP, or TLS over TCP), split into boxed halves.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::io::{ChanRead, ChanWrite};

/// A connection a channel can run over.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The read and write halves, and a handle on the TCP socket (see [`Split`]).
    fn split_box(self) -> Split;
}

/// A transport split in halves, and a second descriptor of its TCP socket through which the
/// channel's sink tunes the socket to its link ([`crate::io::outbound`]); `None` when the
/// system has no descriptor to spare (the socket then keeps its defaults).
pub(crate) type Split = (ChanRead, ChanWrite, Option<socket2::Socket>);

fn handle(tcp: &TcpStream) -> Option<socket2::Socket> {
    socket2::SockRef::from(tcp).try_clone().ok()
}

impl Transport for TcpStream {
    fn split_box(self) -> Split {
        let sock = handle(&self);
        // Owned halves of a TCP stream need no lock.
        let (r, w) = self.into_split();
        (ChanRead::Tcp(r), Box::new(w), sock)
    }
}

/// TLS runs over a [`Buffered`] socket.
pub(crate) type TlsServerStream = tokio_rustls::server::TlsStream<Buffered>;
pub(crate) type TlsClientStream = tokio_rustls::client::TlsStream<Buffered>;

impl Transport for TlsServerStream {
    fn split_box(self) -> Split {
        let sock = handle(&self.get_ref().0.tcp);
        let (r, w) = tokio::io::split(self);
        (ChanRead::Boxed(Box::new(r)), Box::new(w), sock)
    }
}

impl Transport for TlsClientStream {
    fn split_box(self) -> Split {
        let sock = handle(&self.get_ref().0.tcp);
        let (r, w) = tokio::io::split(self);
        (ChanRead::Boxed(Box::new(r)), Box::new(w), sock)
    }
}

/// The most TLS output rustls queues before it writes to the socket (its default: 64 KiB).
/// Three full 16 KiB records, 49,218 bytes on the wire, fit one loopback segment (MSS 65,483):
/// four, 65,624 bytes, went out as a full segment plus a 141-byte one (the socket has
/// `TCP_NODELAY`), which cost a third more segments per byte and 10-13 % more CPU per GB over
/// wss (docs/benchmarks.md). On a 1,500-byte MTU path either size is a run of full segments.
pub(crate) const TLS_WRITE_BUFFER: usize = 3 * 16 * 1024;

/// How much [`Buffered`] reads from the socket at once.
const TLS_READ: usize = 64 * 1024;

/// A TCP socket read through a buffer, for rustls: rustls asks for at most 4 KiB per read, so
/// without it a TLS channel makes four or more `read` calls per 16 KiB record. The buffer
/// exists only while data flows: it is freed whenever the socket has nothing more to read, so
/// an idle channel holds none.
pub(crate) struct Buffered {
    tcp: TcpStream,
    buf: BytesMut,
}

impl Buffered {
    pub(crate) fn new(tcp: TcpStream) -> Buffered {
        Buffered { tcp, buf: BytesMut::new() }
    }
}

impl AsyncRead for Buffered {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.buf.is_empty() {
            if out.remaining() >= TLS_READ {
                return Pin::new(&mut me.tcp).poll_read(cx, out);
            }
            me.buf.reserve(TLS_READ);
            if let Poll::Ready(r) = tokio_util::io::poll_read_buf(Pin::new(&mut me.tcp), cx, &mut me.buf) {
                r?;
            } else {
                // Drained: do not hold a buffer while the socket is quiet.
                me.buf = BytesMut::new();
                return Poll::Pending;
            }
        }
        let n = me.buf.len().min(out.remaining());
        out.put_slice(&me.buf[..n]);
        me.buf.advance(n);
        Ok(()).into()
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, b)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
