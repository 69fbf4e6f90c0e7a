//! Per-source-address bounds on what the cloud's REST listener takes: TLS handshakes in
//! progress ([`crate::tls`]) and open connections ([`PerSource`]), so one peer cannot take
//! every slot or descriptor by itself.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

pub use s4t_shared::limits::{SourceSlot, SourceSlots};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

/// Open REST connections one source address may hold; more are closed at once.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 256;

/// A listener whose connections count against their source address: beyond
/// [`MAX_CONNECTIONS_PER_SOURCE`], a new one is closed at once (the REST API has no header or
/// idle timeout of its own, so idle connections of one peer would otherwise pile up).
pub struct PerSource<L> {
    inner: L,
    slots: Arc<SourceSlots>,
}

impl<L> PerSource<L> {
    pub fn new(inner: L, max: usize) -> PerSource<L> {
        PerSource { inner, slots: SourceSlots::new(max) }
    }
}

impl<L: axum::serve::Listener<Addr = SocketAddr>> axum::serve::Listener for PerSource<L> {
    type Io = Held<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, peer) = self.inner.accept().await;
            match self.slots.take(peer.ip()) {
                Some(slot) => return (Held { io, _slot: slot }, peer),
                None => debug!(%peer, "too many REST connections from this address: closed"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding its source's slot.
pub struct Held<Io> {
    io: Io,
    _slot: SourceSlot,
}

impl<Io: AsyncRead + Unpin> AsyncRead for Held<Io> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Held<Io> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
