//! The cloud's REST listener: its HTTP/1 accept loop ([`serve`]) with time limits on reading
//! a request (headers, idle keep-alive, body) and on a client that stops reading its
//! response, and per-source-address bounds on TLS
//! handshakes in progress ([`crate::tls`]) and open connections ([`PerSource`]), so one peer
//! can neither take every slot or descriptor nor hold connections without sending.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

pub use s4t_shared::limits::{SourceSlot, SourceSlots};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

/// Open REST connections one source address may hold; more are closed at once.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 256;

/// A listener whose connections count against their source address: beyond
/// [`MAX_CONNECTIONS_PER_SOURCE`], a new one is closed at once (a peer could otherwise open
/// connections faster than [`HttpTimeouts`] closes the idle ones).
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

/// How long the REST listener waits for a client.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// For a request's headers, from the connection's start or, on a kept-alive connection,
    /// from the end of the previous response: a connection that sends no (whole) request
    /// within it is closed.
    pub header: Duration,
    /// For a request's body, from its headers; the request then fails (400) and the
    /// connection is closed.
    pub body: Duration,
    /// For the client to take response bytes: a write that has waited this long for room
    /// fails and the connection is closed (a client that stops reading would otherwise hold
    /// its connection and response for ever).
    pub write: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts { header: Duration::from_secs(30), body: Duration::from_secs(60), write: Duration::from_secs(60) }
    }
}

/// Serves `app` over HTTP/1 on `listener` until `shutdown`, then waits for the requests in
/// progress. Like `axum::serve` (which sets no timer, so a connection that never sends a
/// request stays open for ever) plus [`HttpTimeouts`]; each request carries the peer's
/// address as axum's `ConnectInfo<SocketAddr>`.
pub async fn serve<L>(mut listener: L, app: Router, timeouts: HttpTimeouts, shutdown: CancellationToken)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(timeouts.header);
    let graceful = GracefulShutdown::new();
    loop {
        let (io, peer) = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(ConnectInfo(peer));
            let body = Deadline { body, at: Instant::now() + timeouts.body, sleep: None };
            app.clone().oneshot(Request::from_parts(parts, body))
        });
        let io = WriteDeadline { io, limit: timeouts.write, sleep: None, armed: false };
        let conn = graceful.watch(http.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "REST connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection whose write fails once it has waited [`HttpTimeouts::write`] for room; any
/// progress starts the wait again. hyper has no write timer.
struct WriteDeadline<Io> {
    io: Io,
    limit: Duration,
    /// Made at the first wait, reset at each.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The current wait is timed (`sleep` is set for it).
    armed: bool,
}

impl<Io> WriteDeadline<Io> {
    /// Passes on a write's result; a pending one fails once the client has taken nothing for
    /// `limit`.
    fn timed<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        let at = Instant::now() + self.limit;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if !self.armed {
            sleep.as_mut().reset(at);
            self.armed = true;
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no response bytes in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for WriteDeadline<Io> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<Io> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.timed(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.timed(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.timed(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.timed(cx, r)
    }
}

/// A request body that fails once its time is up ([`HttpTimeouts::body`]).
struct Deadline {
    body: Incoming,
    at: Instant,
    /// Armed when the body first has to wait.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimeout;

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let at = self.at;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
