//! A message link between a client and the router: a WebSocket carrying one serialized WAMP
//! message per WebSocket message, with ping/pong keepalive; or an in-memory pair of bounded
//! channels for sessions inside the router's own process (the cloud's agent).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use s4t_shared::wamp::{DecodeError, Message, Serializer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use crate::Error;

/// Any byte stream a WebSocket can run over (TCP, TLS over TCP).
pub(crate) trait IoStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> IoStream for T {}
pub(crate) type BoxStream = Box<dyn IoStream>;

/// How many bytes may still be read from a [`Budgeted`] stream; lifted (unlimited) once the
/// session is established.
#[derive(Debug, Clone)]
pub(crate) struct ReadBudget(Arc<AtomicUsize>);

const UNLIMITED: usize = usize::MAX;

impl ReadBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        ReadBudget(Arc::new(AtomicUsize::new(bytes.min(UNLIMITED - 1))))
    }

    pub(crate) fn lift(&self) {
        self.0.store(UNLIMITED, Ordering::Release);
    }
}

/// The error a [`Budgeted`] stream fails reads with once its budget is spent.
#[derive(Debug, thiserror::Error)]
#[error("more than {0} bytes before the session was established")]
pub(crate) struct OverBudget(usize);

/// A byte stream whose reads fail once more than a budget was read, until the budget is
/// lifted. It bounds what a connection can make the router buffer and decode before it has
/// authenticated: the whole budget, not a message of `max_message_size`.
pub(crate) struct Budgeted<S> {
    inner: S,
    budget: ReadBudget,
    limit: usize,
}

impl<S> Budgeted<S> {
    pub(crate) fn new(inner: S, budget: ReadBudget) -> Self {
        let limit = budget.0.load(Ordering::Acquire);
        Budgeted { inner, budget, limit }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let left = this.budget.0.load(Ordering::Acquire);
        if left == UNLIMITED {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        match left.checked_sub(read) {
            Some(rest) => {
                // Only this connection's task reads; a lift meanwhile is not undone.
                let _ = this.budget.0.compare_exchange(left, rest, Ordering::AcqRel, Ordering::Acquire);
                Poll::Ready(Ok(()))
            }
            None => Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, OverBudget(this.limit)))),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// WebSocket keepalive: a ping after `interval` without traffic from the peer; the link is
/// declared dead when nothing arrives within `timeout` of that ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive { interval: Duration::from_secs(30), timeout: Duration::from_secs(15) }
    }
}

/// Bytes read from the socket at a time. tungstenite allocates this eagerly for every
/// connection (and grows it for larger frames), so it dominates an idle session's footprint:
/// 1 KiB holds the typical board message; larger ones take a few more reads.
const READ_BUFFER: usize = 1024;

/// WebSocket buffer sizes: small eager reads keep an idle session cheap; writes go out
/// message by message.
pub(crate) fn ws_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(max_message_size.saturating_mul(2).max(64 * 1024))
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// What went wrong receiving a message.
#[derive(Debug)]
pub(crate) enum RecvError {
    /// The bytes were not a valid message; the link itself is fine.
    Decode(DecodeError),
    /// The link is broken (I/O error, keepalive timeout, oversized message...).
    Fatal(Error),
}

impl From<Error> for RecvError {
    fn from(e: Error) -> Self {
        RecvError::Fatal(e)
    }
}

pub(crate) struct WsLink {
    ws: WebSocketStream<BoxStream>,
    serializer: Serializer,
    keepalive: Option<Keepalive>,
    write_timeout: Duration,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl WsLink {
    pub(crate) fn new(
        ws: WebSocketStream<BoxStream>,
        serializer: Serializer,
        keepalive: Option<Keepalive>,
        write_timeout: Duration,
    ) -> Self {
        let now = Instant::now();
        let first = keepalive.map_or(now + Duration::from_secs(86_400 * 365), |k| now + k.interval);
        WsLink {
            ws,
            serializer,
            keepalive,
            write_timeout,
            last_rx: now,
            ping_sent: None,
            timer: Box::pin(sleep_until(first)),
        }
    }

    /// The next message; `Ok(None)` when the peer closed the WebSocket. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Result<Option<Message>, RecvError> {
        loop {
            tokio::select! {
                frame = self.ws.next() => {
                    let frame = match frame {
                        None => return Ok(None),
                        Some(Err(WsError::Capacity(e))) => return Err(RecvError::Decode(DecodeError::TooLarge(e.to_string()))),
                        Some(Err(WsError::Io(e))) if e.get_ref().is_some_and(|e| e.is::<OverBudget>()) => {
                            return Err(RecvError::Decode(DecodeError::TooLarge(e.to_string())));
                        }
                        Some(Err(e)) => return Err(RecvError::Fatal(e.into())),
                        Some(Ok(frame)) => frame,
                    };
                    self.last_rx = Instant::now();
                    let binary = self.serializer.is_binary();
                    let bytes: &[u8] = match &frame {
                        WsMessage::Text(t) if !binary => t.as_bytes(),
                        WsMessage::Binary(b) if binary => b,
                        WsMessage::Text(_) | WsMessage::Binary(_) => {
                            let why = format!("wrong WebSocket frame type for {}", self.serializer.subprotocol());
                            return Err(RecvError::Decode(DecodeError::NotAMessage(why)));
                        }
                        WsMessage::Close(_) => return Ok(None),
                        WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
                    };
                    return self.serializer.decode(bytes).map(Some).map_err(RecvError::Decode);
                }
                () = &mut self.timer => self.keepalive_tick().await?,
            }
        }
    }

    async fn keepalive_tick(&mut self) -> Result<(), Error> {
        let Some(k) = self.keepalive else { return Ok(()) };
        let now = Instant::now();
        if let Some(sent) = self.ping_sent {
            if self.last_rx < sent {
                return Err(Error::Timeout("WebSocket keepalive (no pong)"));
            }
            self.ping_sent = None;
        }
        let idle_until = self.last_rx + k.interval;
        if now >= idle_until {
            self.write(WsMessage::Ping(Default::default())).await?;
            self.ping_sent = Some(now);
            self.timer.as_mut().reset(now + k.timeout);
        } else {
            self.timer.as_mut().reset(idle_until);
        }
        Ok(())
    }

    pub(crate) async fn send(&mut self, msg: &Message) -> Result<(), Error> {
        let bytes = self.serializer.encode(msg)?;
        let frame = if self.serializer.is_binary() {
            WsMessage::Binary(bytes.into())
        } else {
            let text = String::from_utf8(bytes).map_err(|e| Error::Protocol(format!("JSON encoder produced {e}")))?;
            WsMessage::Text(text.into())
        };
        self.write(frame).await
    }

    async fn write(&mut self, frame: WsMessage) -> Result<(), Error> {
        match timeout(self.write_timeout, self.ws.send(frame)).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Timeout("writing to the WebSocket")),
        }
    }

    /// Sends a close frame and waits briefly for the peer's.
    pub(crate) async fn close(&mut self) {
        let _ = timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }
}

/// The router's end or the client's end of an in-process session.
pub(crate) struct LocalLink {
    pub(crate) rx: mpsc::Receiver<Arc<Message>>,
    pub(crate) tx: mpsc::Sender<Arc<Message>>,
}

impl LocalLink {
    /// Two connected ends, each direction bounded to `capacity` messages.
    pub(crate) fn pair(capacity: usize) -> (LocalLink, LocalLink) {
        let (a_tx, a_rx) = mpsc::channel(capacity);
        let (b_tx, b_rx) = mpsc::channel(capacity);
        (LocalLink { rx: a_rx, tx: b_tx }, LocalLink { rx: b_rx, tx: a_tx })
    }

    /// The next message; `None` when the other end went away. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await.map(LocalLink::take)
    }

    /// A received message, copied only if another session shares it (an EVENT).
    pub(crate) fn take(msg: Arc<Message>) -> Message {
        Arc::try_unwrap(msg).unwrap_or_else(|m| (*m).clone())
    }
}

/// Either kind of link.
pub(crate) enum Link {
    Ws(Box<WsLink>),
    Local(LocalLink),
}

impl Link {
    /// The next message; `Ok(None)` when the peer went away. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Result<Option<Message>, RecvError> {
        match self {
            Link::Ws(ws) => ws.recv().await,
            Link::Local(l) => Ok(l.recv().await),
        }
    }

    pub(crate) async fn send(&mut self, msg: Arc<Message>) -> Result<(), Error> {
        match self {
            Link::Ws(ws) => ws.send(&msg).await,
            Link::Local(l) => l.tx.send(msg).await.map_err(|_| Error::Closed),
        }
    }

    pub(crate) async fn close(&mut self) {
        if let Link::Ws(ws) = self {
            ws.close().await;
        }
    }
}
