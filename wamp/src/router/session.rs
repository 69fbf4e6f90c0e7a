//! One session's task: accept (TLS, WebSocket with subprotocol negotiation, WAMP opening
//! handshake, all under one deadline), join the realm, then loop: say the farewell when
//! killed, drain the outbound queue, read and route the next message.

use std::net::SocketAddr;
use std::sync::Arc;

use s4t_shared::wamp::message::{Dict, uri};
use s4t_shared::wamp::session::{RouterHandshake, router_may_receive, router_roles};
use s4t_shared::wamp::{Id, Message, Serializer};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header::SEC_WEBSOCKET_PROTOCOL};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::realm::{Farewell, Kill};
use super::{Inner, SessionInfo, TransportInfo, auth};
use crate::link::{BoxStream, Link, LocalLink, RecvError, WsLink, ws_config};
use crate::{Error, Role};

/// Identity of an in-process session.
pub(crate) struct Trusted {
    pub(crate) authid: String,
}

/// Serves one TCP connection until its session ends.
pub(crate) async fn serve_connection(
    inner: Arc<Inner>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let span = info_span!("wamp", %peer, session = tracing::field::Empty);
    async move {
        let _ = tcp.set_nodelay(true);
        let deadline = inner.config.handshake_timeout;
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = timeout(deadline, open(&inner, tcp, peer, tls.as_ref())) => opened,
        };
        match opened {
            Ok(Ok(Some((link, info, hs)))) => establish(inner, link, info, hs.session()).await,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => debug!(cause = %e, "connection failed before the session opened"),
            Err(_) => info!(?deadline, "opening handshake timed out"),
        }
    }
    .instrument(span)
    .await
}

/// TLS, WebSocket and WAMP handshakes. `Ok(None)`: refused (the ABORT was sent).
// The handshake callback's signature (and its large error type) is tungstenite's.
#[allow(clippy::result_large_err)]
async fn open(
    inner: &Inner,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<Option<(Link, SessionInfo, RouterHandshake)>, Error> {
    let stream: BoxStream = match tls {
        Some(acceptor) => Box::new(acceptor.accept(tcp).await?),
        None => Box::new(tcp),
    };
    let mut chosen = None;
    let negotiate = |req: &Request, resp: Response| negotiate(req, resp, &mut chosen);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        negotiate,
        Some(ws_config(inner.config.max_message_size)),
    )
    .await?;
    let serializer = chosen.ok_or_else(|| Error::Subprotocol("none".into()))?;
    let ws = WsLink::new(ws, serializer, inner.config.keepalive, inner.config.write_timeout);
    let mut link = Link::Ws(Box::new(ws));
    let mut hs = RouterHandshake::new(auth::provisional_id());
    let Some(granted) = auth::open(inner, &mut link, &mut hs).await else { return Ok(None) };
    let board = (granted.role == Role::Board).then(|| granted.authid.clone());
    let info = SessionInfo {
        id: 0,
        authid: granted.authid,
        role: granted.role,
        authmethod: granted.method.name(),
        authprovider: inner.config.authprovider.clone(),
        board,
        transport: TransportInfo { peer: Some(peer), serializer: Some(serializer), tls: tls.is_some() },
    };
    Ok(Some((link, info, hs)))
}

/// Picks the first WAMP subprotocol the client offers that we speak; refuses other paths.
#[allow(clippy::result_large_err)]
fn negotiate(req: &Request, mut resp: Response, chosen: &mut Option<Serializer>) -> Result<Response, ErrorResponse> {
    let refuse = |status: StatusCode, why: &str| {
        let mut r = ErrorResponse::new(Some(why.to_owned()));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/" {
        return Err(refuse(StatusCode::NOT_FOUND, "WAMP is served on / only"));
    }
    let offered = req.headers().get_all(SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok());
    let Some(serializer) = offered.flat_map(|v| v.split(',')).find_map(Serializer::from_subprotocol) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "no supported WAMP subprotocol (wamp.2.json, wamp.2.msgpack, wamp.2.cbor)",
        ));
    };
    *chosen = Some(serializer);
    resp.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(serializer.subprotocol()));
    Ok(resp)
}

/// Serves an in-process session: the client's HELLO is answered with a WELCOME as `agent`.
pub(crate) async fn serve_local(inner: Arc<Inner>, end: LocalLink, trusted: Trusted) {
    let mut link = Link::Local(end);
    match link.recv().await {
        Ok(Some(Message::Hello { .. })) => {}
        _ => return,
    }
    let info = SessionInfo {
        id: 0,
        authid: trusted.authid,
        role: Role::Agent,
        authmethod: "trusted",
        authprovider: inner.config.authprovider.clone(),
        board: None,
        transport: TransportInfo { peer: None, serializer: None, tls: false },
    };
    let span = info_span!("wamp", peer = "local", session = tracing::field::Empty);
    establish(inner, link, info, auth::provisional_id()).instrument(span).await
}

fn welcome(id: Id, info: &SessionInfo) -> Message {
    let mut details = Dict::new();
    details.insert("authid".into(), Value::String(info.authid.clone()));
    details.insert("authrole".into(), Value::String(info.role.name().into()));
    details.insert("authmethod".into(), Value::String(info.authmethod.into()));
    details.insert("authprovider".into(), Value::String(info.authprovider.clone()));
    details.insert("roles".into(), router_roles());
    Message::Welcome { session: id, details }
}

/// Joins the realm, sends WELCOME, runs the session, leaves.
async fn establish(inner: Arc<Inner>, mut link: Link, info: SessionInfo, reserved: Id) {
    // Unsolicited messages may use `queue_capacity` slots; the rest is reserved for answers
    // to the session's own requests (see `State::deliver`).
    let capacity = inner.config.queue_capacity + inner.config.limits.in_flight_for(info.role) + 1;
    let (tx, mut rx) = mpsc::channel(capacity);
    let kill = Arc::new(Kill::default());
    let (authid, role) = (info.authid.clone(), info.role);
    let welcome_info = info.clone();
    let id = inner.realm.join(info, tx, kill.clone(), reserved);
    tracing::Span::current().record("session", id);
    info!(%authid, role = role.name(), "session opened");
    if link.send(welcome(id, &welcome_info).into()).await.is_ok() {
        run(&inner, &mut link, id, &mut rx, &kill).await;
    }
    inner.realm.leave(id);
    link.close().await;
    info!("session closed");
}

async fn run(inner: &Arc<Inner>, link: &mut Link, id: Id, rx: &mut mpsc::Receiver<Arc<Message>>, kill: &Kill) {
    loop {
        tokio::select! {
            biased;
            () = kill.token.cancelled() => {
                let farewell = kill.farewell();
                info!(?farewell, "closing the session");
                let msg = match farewell {
                    Farewell::Goodbye(reason) => Message::goodbye(reason),
                    Farewell::Abort(reason, why) => Message::abort(reason, why),
                };
                let _ = link.send(msg.into()).await;
                return;
            }
            out = rx.recv() => {
                let Some(msg) = out else { return };
                if let Err(e) = link.send(msg).await {
                    info!(cause = %e, "cannot write to the peer");
                    return;
                }
            }
            incoming = link.recv() => {
                let reply = match incoming {
                    Ok(Some(msg)) => route(inner, id, msg),
                    Ok(None) => return,
                    Err(RecvError::Decode(e)) => {
                        warn!(error = %e, "invalid message");
                        match e.error_reply() {
                            Some(reply) => Step::Reply(reply),
                            None => Step::Close(Message::abort(uri::PROTOCOL_VIOLATION, e.to_string())),
                        }
                    }
                    Err(RecvError::Fatal(e)) => {
                        info!(cause = %e, "session link failed");
                        return;
                    }
                };
                match reply {
                    Step::Continue => {}
                    Step::End => return,
                    Step::Reply(msg) => if link.send(msg.into()).await.is_err() { return },
                    Step::Close(msg) => {
                        let _ = link.send(msg.into()).await;
                        return;
                    }
                }
            }
        }
    }
}

enum Step {
    Continue,
    End,
    Reply(Message),
    Close(Message),
}

fn route(inner: &Arc<Inner>, id: Id, msg: Message) -> Step {
    if let Err(why) = router_may_receive(&msg) {
        warn!(message = msg.name(), %why, "protocol violation");
        return Step::Close(Message::abort(uri::PROTOCOL_VIOLATION, why));
    }
    match msg {
        Message::Goodbye { .. } => Step::Close(Message::goodbye(uri::GOODBYE_AND_OUT)),
        Message::Abort { reason, .. } => {
            debug!(%reason, "peer aborted");
            Step::End
        }
        msg => {
            inner.realm.handle(id, msg);
            Step::Continue
        }
    }
}
