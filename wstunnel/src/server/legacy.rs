//! The MDSLab wstun 1.0.11 reverse protocol (S4T-REFERENCE §7), server side.
//!
//! A control socket `?dst=host:port` makes the server listen on `port`; each accepted TCP
//! connection is parked under a fresh uuid announced as the text frame `NC:<uuid>`; the board
//! opens a data socket `?id=<uuid>` and bytes flow as binary frames. Closing the control socket
//! closes the listener. There is no authentication in that protocol, so it is served only when
//! configured, and only for ports the hooks allow (the cloud allows the ports it allocated).

use std::sync::Arc;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

use super::channel::RefusalLog;
use super::registry::{PublicSlot, Registry};
use super::{ServerConfig, ServerHooks};
use crate::stats::Counters;
use crate::transport::Transport;

/// Board name used in hooks and listings for wstun listeners whose board the hooks do not
/// know (the protocol names no board).
pub(crate) const LEGACY_BOARD: &str = "legacy-wstun";

/// Checks a control request before the upgrade is accepted; returns the board the listener
/// is accounted to. `claimed`: the board the client named (`-u`), refused if the port belongs
/// to another.
pub(crate) async fn admit<H: ServerHooks>(
    cfg: &ServerConfig,
    hooks: &H,
    port: u16,
    claimed: Option<&str>,
) -> Result<String, String> {
    if !cfg.legacy {
        return Err("legacy wstun mode is disabled on this server".into());
    }
    if port == 0 || !hooks.legacy_port_allowed(port).await {
        return Err(format!("port {port} is not allocated to a legacy board"));
    }
    match (hooks.legacy_port_board(port).await, claimed) {
        (Some(owner), Some(c)) if owner != c => Err(format!("port {port} is allocated to another board")),
        (Some(owner), _) => Ok(owner),
        (None, _) => Ok(LEGACY_BOARD.to_owned()),
    }
}

/// The largest message (and frame) a data socket takes: wstun sends what one read of its TCP
/// socket brought (64 KiB at most).
const DATA_MAX: usize = 1 << 20;
/// The largest message (and frame) a control socket takes: the board sends nothing on it but
/// pongs and its close.
const CONTROL_MAX: usize = 16 * 1024;

/// tungstenite refuses a frame over `max_frame_size` at its header, but allocates the whole
/// length a header announces below it (16 MiB by default) before `max_message_size` is
/// checked: both are `max`.
fn ws_config(max: usize) -> WebSocketConfig {
    // Small buffers: one of these exists per tunneled connection.
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Serves a control socket for `port` (its `listener` already bound), accounted to `board`,
/// until it closes.
pub(crate) async fn control<S: Transport, H: ServerHooks>(
    s: S,
    leftover: BytesMut,
    (port, board, listener): (u16, String, TcpListener),
    cfg: Arc<ServerConfig>,
    reg: Arc<Registry>,
    hooks: Arc<H>,
    shutdown: CancellationToken,
) {
    let mut ws =
        WebSocketStream::from_partially_read(s, leftover.to_vec(), Role::Server, Some(ws_config(CONTROL_MAX))).await;
    let cancel = shutdown.child_token();
    let Some(entry) = reg.add_port(port, &board, true, 0, cancel.clone()) else {
        let _ = ws.close(None).await;
        return;
    };
    hooks.listener_opened(&board, port, true);
    let mut ping = tokio::time::interval(cfg.limits.ping_interval);
    ping.tick().await;
    // A board whose NAT dropped the connection without a word would hold the port until TCP
    // gave up (a quarter of an hour) and get 409 at every reconnect meanwhile: a control
    // socket from which nothing (not even a pong) came for `idle_timeout` is closed, and so
    // is one that takes no frame within it.
    let idle = cfg.limits.idle_timeout;
    let mut heard = tokio::time::Instant::now();
    let mut failures = RefusalLog::default();
    // Its connections, waiting or piped ([`super::Limits::legacy_max_per_port`]).
    let per_port = Arc::new(tokio::sync::Semaphore::new(cfg.limits.legacy_max_per_port));
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (tcp, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off a little instead of spinning, and say
                        // so now and then only.
                        if let Some(unlogged) = failures.admit(std::time::Instant::now()) {
                            tracing::warn!(port, cause = %e, unlogged, "accept failed");
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if !hooks.connection_allowed(&board, port, peer, true) {
                    continue; // dropping `tcp` closes it
                }
                let Some(slot) = reg.admit_public(port, peer, Some(&per_port)) else { continue };
                let id = uuid::Uuid::new_v4().to_string();
                if !reg.park(id.clone(), port, tcp, slot) {
                    tracing::warn!(port, "too many legacy connections waiting: dropped one");
                    continue;
                }
                tracing::debug!(port, %peer, id, "legacy connection announced");
                if !matches!(tokio::time::timeout(idle, ws.send(Message::text(format!("NC:{id}")))).await, Ok(Ok(()))) {
                    reg.take_pending(&id);
                    break;
                }
                let (reg2, timeout) = (reg.clone(), cfg.limits.legacy_pending_timeout);
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    if reg2.take_pending(&id).is_some() {
                        tracing::warn!(id, "no data socket for a legacy connection: closed it");
                    }
                });
            }
            m = ws.next() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => heard = tokio::time::Instant::now(),
            },
            _ = ping.tick() => {
                if heard.elapsed() > idle {
                    tracing::warn!(port, board, silent_s = heard.elapsed().as_secs(), "legacy control socket silent: closed");
                    break;
                }
                if !matches!(tokio::time::timeout(idle, ws.send(Message::Ping(Default::default()))).await, Ok(Ok(()))) {
                    break;
                }
            }
            _ = cancel.cancelled() => break,
        }
    }
    drop(listener);
    reg.remove_port(port, entry);
    let _ = ws.close(None).await;
    hooks.listener_closed(&board, port, true);
}

/// Pipes a data socket to the parked TCP connection (holding its place among the public
/// ones) until either side closes.
/// Counted as a stream in the server's traffic.
pub(crate) async fn data<S: Transport>(
    s: S,
    leftover: BytesMut,
    (tcp, _slot): (TcpStream, PublicSlot),
    counters: &Counters,
    shutdown: CancellationToken,
) {
    let ws = WebSocketStream::from_partially_read(s, leftover.to_vec(), Role::Server, Some(ws_config(DATA_MAX))).await;
    Counters::add(&counters.streams_opened, 1);
    tokio::select! {
        r = pipe(ws, tcp, Some(counters)) => if let Err(e) = r { tracing::debug!(cause = %e, "legacy data socket ended") },
        _ = shutdown.cancelled() => {}
    }
    Counters::add(&counters.streams_closed, 1);
}

/// Bytes both ways between a wstun-style WebSocket (binary frames) and a TCP connection.
/// Either side closing closes the other, as wstun does. Backpressure comes from awaiting each
/// write before reading more. Payload bytes are added to `counters` when given.
pub(crate) async fn pipe<S>(ws: WebSocketStream<S>, tcp: TcpStream, counters: Option<&Counters>) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tcp.set_nodelay(true);
    let (mut sink, mut stream) = ws.split();
    let (mut rd, mut wr) = tcp.into_split();
    let to_tcp = async {
        while let Some(m) = stream.next().await {
            match m.map_err(|e| e.to_string())? {
                Message::Binary(b) => {
                    if let Some(c) = counters {
                        Counters::add(&c.bytes_received, b.len() as u64);
                    }
                    wr.write_all(&b).await.map_err(|e| e.to_string())?
                }
                Message::Text(_) => return Err("text frame on a wstun data socket".to_owned()),
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
        Ok::<(), String>(())
    };
    let to_ws = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            sink.send(Message::binary(buf[..n].to_vec())).await.map_err(|e| e.to_string())?;
            if let Some(c) = counters {
                Counters::add(&c.bytes_sent, n as u64);
            }
        }
        let _ = sink.close().await;
        Ok::<(), String>(())
    };
    // wstun closes both when either side ends.
    tokio::select! {
        r = to_tcp => r,
        r = to_ws => r,
    }
}
