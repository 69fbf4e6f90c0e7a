//! One session's task: accept (TLS, WebSocket with subprotocol negotiation, WAMP opening
//! handshake, all under one deadline), join the realm, then loop: say the farewell when
//! killed or (enrollment sessions) when the session's lifetime is over, drain the outbound
//! queue, read and route the next message. In-process sessions
//! have a loop of their own that never waits on a send (see [`run_local`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use s4t_shared::wamp::message::{Dict, uri};
use s4t_shared::wamp::session::{RouterHandshake, router_may_receive, router_roles};
use s4t_shared::wamp::{Id, Message, Serializer};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::header::{HOST, SEC_WEBSOCKET_PROTOCOL};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::realm::{Farewell, Kill, Outbox};
use super::{Inner, SessionInfo, TransportInfo, auth};
use crate::link::{BoxStream, Budgeted, Link, LocalLink, ReadBudget, RecvError, WsLink, ws_config};
use crate::{Error, Role};

/// Bytes a connection may send before its session is established: the HTTP upgrade, HELLO,
/// AUTHENTICATE (a few KiB at most). `max_message_size` applies only afterwards: a HELLO of
/// 1 MiB in MessagePack or CBOR decodes to 30 MiB or more of values, and an unauthenticated
/// peer must not make the router buffer or decode that.
pub(crate) const HANDSHAKE_READ_LIMIT: usize = 64 * 1024;

/// GOODBYE reason of an enrollment session closed at the end of its lifetime
/// (`RouterConfig::enrollment_lifetime`).
pub(crate) const CLOSE_EXPIRED: &str = "s4t.close.expired";

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
    opening: s4t_shared::limits::SourceSlot,
) {
    let span = info_span!("wamp", %peer, session = tracing::field::Empty);
    async move {
        let _ = tcp.set_nodelay(true);
        let deadline = inner.config.handshake_timeout;
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = timeout(deadline, open(&inner, tcp, peer, tls.as_ref())) => opened,
        };
        drop(opening);
        match opened {
            // An anonymous or enrollment session's slot is held until it ends.
            Ok(Ok(Some(Opened { link, info, hs, slot: _slot }))) => establish(inner, link, info, hs.session()).await,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => debug!(cause = %e, "connection failed before the session opened"),
            Err(_) => info!(?deadline, "opening handshake timed out"),
        }
    }
    .instrument(span)
    .await
}

/// A connection whose opening handshake succeeded, up to (not including) WELCOME.
struct Opened {
    link: Link,
    info: SessionInfo,
    hs: RouterHandshake,
    /// An anonymous or enrollment session's slot among its source address's
    /// ([`super::RouterConfig::max_anonymous_per_source`],
    /// [`super::RouterConfig::max_enrollment_per_source`]) and among the router's.
    slot: Option<(s4t_shared::limits::SourceSlot, s4t_shared::limits::KeyedSlot<()>)>,
}

/// TLS, WebSocket and WAMP handshakes. `Ok(None)`: refused (the ABORT was sent).
// The handshake callback's signature (and its large error type) is tungstenite's.
#[allow(clippy::result_large_err)]
async fn open(
    inner: &Inner,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<Option<Opened>, Error> {
    let budget = ReadBudget::new(HANDSHAKE_READ_LIMIT);
    let stream: BoxStream = match tls {
        Some(acceptor) => Box::new(Budgeted::new(acceptor.accept(tcp).await?, budget.clone())),
        None => Box::new(Budgeted::new(tcp, budget.clone())),
    };
    let (mut chosen, mut host) = (None, None);
    let negotiate = |req: &Request, resp: Response| {
        host = req.headers().get(HOST).and_then(|v| v.to_str().ok()).and_then(super::host_of_header);
        negotiate(req, resp, &mut chosen)
    };
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
    // Anonymous sessions (anyone may open them) and enrollment sessions (anyone with a code,
    // and a code serves again for an hour) are counted per source address; boards are
    // counted per identity by the realm.
    // So are they on the whole router: a peer with many addresses (an IPv6 /48) is not held
    // off by the per-address bound.
    let c = &inner.config;
    let bounds = match granted.role {
        Role::Legacy => Some((
            &inner.anonymous,
            c.max_anonymous_per_source,
            &inner.anonymous_total,
            c.max_anonymous_sessions,
            "anonymous",
        )),
        Role::Enrollment => Some((
            &inner.enrollment,
            c.max_enrollment_per_source,
            &inner.enrollment_total,
            c.max_enrollment_sessions,
            "enrollment",
        )),
        _ => None,
    };
    let mut slot = None;
    if let Some((per_source, max, total, max_total, kind)) = bounds {
        let taken = per_source
            .take(peer.ip())
            .ok_or_else(|| format!("too many {kind} sessions from this address (at most {max})"));
        let counted = taken.and_then(|t| {
            total
                .take(())
                .map(|c| (t, c))
                .ok_or_else(|| format!("too many {kind} sessions on this router (at most {max_total})"))
        });
        match counted {
            Ok(slots) => slot = Some(slots),
            Err(why) => {
                info!(reason = uri::LIMIT_EXCEEDED, kind, "session refused: {why}");
                let _ = link.send(Message::abort(uri::LIMIT_EXCEEDED, why).into()).await;
                return Ok(None);
            }
        }
    }
    budget.lift();
    let board = (granted.role == Role::Board).then(|| granted.authid.clone());
    let info = SessionInfo {
        id: 0,
        authid: granted.authid,
        role: granted.role,
        authmethod: granted.method.name(),
        authprovider: inner.config.authprovider.clone(),
        board,
        transport: TransportInfo { peer: Some(peer), serializer: Some(serializer), tls: tls.is_some(), host },
        joined: granted.admitted,
    };
    Ok(Some(Opened { link, info, hs, slot }))
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
        transport: TransportInfo { peer: None, serializer: None, tls: false, host: None },
        joined: std::time::SystemTime::now(),
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
    let kill = Arc::new(Kill::default());
    let (authid, role) = (info.authid.clone(), info.role);
    let welcome_info = info.clone();
    // An enrollment needs one call: its session does not stay.
    let lifetime = (role == Role::Enrollment).then_some(inner.config.enrollment_lifetime);
    let (id, mut outbox) = inner.realm.join(info, kill.clone(), reserved);
    tracing::Span::current().record("session", id);
    info!(%authid, role = role.name(), "session opened");
    if link.send(welcome(id, &welcome_info).into()).await.is_ok() {
        match &mut link {
            Link::Local(local) => run_local(&inner, local, id, &mut outbox, &kill).await,
            ws => run(&inner, ws, id, &mut outbox, &kill, lifetime).await,
        }
    }
    inner.realm.leave(id);
    link.close().await;
    info!("session closed");
}

/// The loop of a WebSocket session; one with a `lifetime` is closed when it is over.
async fn run(
    inner: &Arc<Inner>,
    link: &mut Link,
    id: Id,
    outbox: &mut Outbox,
    kill: &Kill,
    lifetime: Option<Duration>,
) {
    let expired = async {
        match lifetime {
            Some(lifetime) => tokio::time::sleep(lifetime).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    loop {
        tokio::select! {
            biased;
            () = kill.token.cancelled() => {
                let _ = link.send(farewell(kill).into()).await;
                return;
            }
            () = &mut expired => {
                info!(?lifetime, reason = CLOSE_EXPIRED, "closing the session: its lifetime is over");
                let _ = link.send(Message::goodbye(CLOSE_EXPIRED).into()).await;
                return;
            }
            out = outbox.recv() => {
                let Some(msg) = out else { return };
                if let Err(e) = link.send(msg).await {
                    info!(cause = %e, "cannot write to the peer");
                    return;
                }
            }
            incoming = link.recv() => match step(inner, id, incoming) {
                Step::Continue => {}
                Step::End => return,
                Step::Reply(msg) => if link.send(msg.into()).await.is_err() { return },
                Step::Close(msg) => {
                    let _ = link.send(msg.into()).await;
                    return;
                }
            },
        }
    }
}

/// The loop of an in-process session (the cloud's agent). A send on the in-process link waits
/// for the client to read, and the client may itself be waiting for this task to read what it
/// sends (CALLs): both links full, each side waiting on the other. So this task never waits on
/// a send: it holds at most one message the client has no room for (and takes no more from
/// its queue meanwhile, so that the realm's admission rules apply), hands it over when room
/// appears, and keeps reading; answers to what it reads go into its own bounded queue.
async fn run_local(inner: &Arc<Inner>, link: &mut LocalLink, id: Id, outbox: &mut Outbox, kill: &Kill) {
    let mut held: Option<Arc<Message>> = None;
    let last = loop {
        tokio::select! {
            biased;
            () = kill.token.cancelled() => break farewell(kill),
            room = link.tx.reserve(), if held.is_some() => {
                let Ok(room) = room else { return };
                if let Some(msg) = held.take() {
                    room.send(msg);
                }
            }
            out = outbox.recv(), if held.is_none() => {
                let Some(msg) = out else { return };
                match link.tx.try_send(msg) {
                    Ok(()) => {}
                    Err(TrySendError::Full(msg)) => held = Some(msg),
                    Err(TrySendError::Closed(_)) => return,
                }
            }
            incoming = link.rx.recv() => match step(inner, id, Ok(incoming.map(LocalLink::take))) {
                Step::Continue => {}
                Step::End => return,
                // Behind what is queued already; a queue without room closes the session.
                Step::Reply(msg) => inner.realm.reply(id, msg),
                Step::Close(msg) => break msg,
            },
        }
    };
    say_last_local(link, last, inner.config.write_timeout).await;
}

/// Sends the last message of an in-process session, within `limit`. What the client sends
/// meanwhile is read and dropped, so a client blocked on sending gets to read it.
async fn say_last_local(link: &mut LocalLink, msg: Message, limit: Duration) {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let LocalLink { rx, tx } = link;
    loop {
        tokio::select! {
            biased;
            room = tx.reserve() => {
                if let Ok(room) = room {
                    room.send(Arc::new(msg));
                }
                return;
            }
            incoming = rx.recv() => if incoming.is_none() { return },
            () = &mut deadline => {
                info!(?limit, "the in-process client did not take the session's last message");
                return;
            }
        }
    }
}

/// The message that ends a session the router closes.
fn farewell(kill: &Kill) -> Message {
    let farewell = kill.farewell();
    info!(?farewell, "closing the session");
    match farewell {
        Farewell::Goodbye(reason) => Message::goodbye(reason),
        Farewell::Abort(reason, why) => Message::abort(reason, why),
    }
}

/// What to do about what was read from the peer.
fn step(inner: &Arc<Inner>, id: Id, incoming: Result<Option<Message>, RecvError>) -> Step {
    match incoming {
        Ok(Some(msg)) => route(inner, id, msg),
        Ok(None) => Step::End,
        Err(RecvError::Decode(e)) => match e.error_reply() {
            // Answered, and the session goes on: not worth a warning per message.
            Some(reply) => {
                debug!(error = %e, "invalid request");
                Step::Reply(reply)
            }
            None => {
                warn!(error = %e, "invalid message");
                Step::Close(Message::abort(uri::PROTOCOL_VIOLATION, e.to_string()))
            }
        },
        Err(RecvError::Fatal(e)) => {
            info!(cause = %e, "session link failed");
            Step::End
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{Router, RouterConfig, StaticAuthenticator};
    use s4t_shared::wamp::Payload;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// An in-process session whose client sends without reading still reads everything it is
    /// sent, and still ends at once when killed; the client then finds the GOODBYE last.
    #[tokio::test]
    async fn a_local_session_whose_client_does_not_read_keeps_reading_and_can_be_killed() {
        let router = Router::new(RouterConfig::default(), Arc::new(StaticAuthenticator::new()));
        let (router_end, mut client) = LocalLink::pair(4);
        let trusted = Trusted { authid: "agent".into() };
        let task = tokio::spawn(serve_local(router.inner.clone(), router_end, trusted));
        client.tx.send(Arc::new(Message::Hello { realm: "s4t".into(), details: Dict::new() })).await.unwrap();
        let Some(Message::Welcome { session, .. }) = client.recv().await else { panic!("no WELCOME") };
        // 100 calls answered by the router itself, none of the answers read yet.
        let calls = async {
            for request in 1..=100 {
                let procedure = "wamp.session.count".to_owned();
                let call = Message::Call { request, options: Dict::new(), procedure, payload: Payload::default() };
                client.tx.send(Arc::new(call)).await.unwrap();
            }
        };
        tokio::time::timeout(DEADLINE, calls).await.expect("the router stopped reading the client");
        assert!(router.kill_session(session));
        let mut last = None;
        let read_all = async {
            while let Some(msg) = client.recv().await {
                last = Some(msg);
            }
        };
        tokio::time::timeout(DEADLINE, read_all).await.expect("the killed session did not end");
        assert_eq!(last, Some(Message::goodbye(uri::CLOSE_KILLED)));
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    }
}
