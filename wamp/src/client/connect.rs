//! Opening a session: TCP, optional TLS (rustls), WebSocket with the WAMP subprotocol, the
//! WAMP opening handshake; and a reconnect helper.

use s4t_shared::backoff::Backoff;
use s4t_shared::wamp::Message;
use s4t_shared::wamp::session::{ClientHandshake, ClientStep, HandshakeError};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header::SEC_WEBSOCKET_PROTOCOL};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ClientConfig, Session, actor};
use crate::Error;
use crate::link::{BoxStream, Link, LocalLink, RecvError, WsLink, ws_config};

/// Opens a session as `config` says, within `config.connect_timeout`.
pub async fn connect(config: &ClientConfig) -> Result<Session, Error> {
    match tokio::time::timeout(config.connect_timeout, connect_inner(config)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout("opening the WAMP session")),
    }
}

/// Connects, retrying with `backoff` after every failure (logged) until it succeeds or
/// `shutdown` fires (`None`). The caller resets `backoff` once a session proved healthy.
pub async fn connect_with_retry(
    config: &ClientConfig,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> Option<Session> {
    loop {
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return None,
            r = connect(config) => r,
        };
        match attempt {
            Ok(session) => return Some(session),
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(url = %config.url, cause = %crate::error_chain(&e), ?delay, "cannot open the WAMP session; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn connect_inner(config: &ClientConfig) -> Result<Session, Error> {
    let url_error = |reason: &str| Error::Url { url: config.url.clone(), reason: reason.to_owned() };
    let mut request = config.url.as_str().into_client_request().map_err(|e| url_error(&e.to_string()))?;
    let secure = match request.uri().scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(url_error("the scheme must be ws or wss")),
    };
    let host = request.uri().host().ok_or_else(|| url_error("no host"))?.trim_matches(['[', ']']).to_owned();
    let port = request.uri().port_u16().unwrap_or(if secure { 443 } else { 80 });
    request.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(config.serializer.subprotocol()));

    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let stream: BoxStream = if secure {
        let tls = config.tls.clone().ok_or_else(|| url_error("wss:// needs a TLS client configuration"))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| url_error(&e.to_string()))?;
        Box::new(tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?)
    } else {
        Box::new(tcp)
    };
    let (ws, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config(config.max_message_size)))
            .await
            .map_err(|source| Error::Connect { url: config.url.clone(), source })?;
    let agreed = response.headers().get(SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok());
    if agreed != Some(config.serializer.subprotocol()) {
        return Err(Error::Subprotocol(agreed.unwrap_or("none").to_owned()));
    }
    let link = Link::Ws(Box::new(WsLink::new(ws, config.serializer, config.keepalive, config.write_timeout)));
    let session = join(link, config).await?;
    info!(url = %config.url, session = session.id(), authrole = session.authrole(), "WAMP session opened");
    Ok(session)
}

/// Joins over an in-process link (the router's agent sessions).
pub(crate) async fn join_local(end: LocalLink, config: &ClientConfig) -> Result<Session, Error> {
    join(Link::Local(end), config).await
}

/// The WAMP opening handshake over `link`, then the session task.
async fn join(mut link: Link, config: &ClientConfig) -> Result<Session, Error> {
    let cache = config.key_cache.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (mut hs, hello) = ClientHandshake::new(&config.realm, config.auth.clone(), cache);
    link.send(hello.into()).await?;
    let welcome = loop {
        let msg = match link.recv().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err(Error::Closed),
            Err(RecvError::Fatal(e)) => return Err(e),
            Err(RecvError::Decode(e)) => {
                let _ = link
                    .send(Message::abort(s4t_shared::wamp::message::uri::PROTOCOL_VIOLATION, e.to_string()).into())
                    .await;
                return Err(e.into());
            }
        };
        match hs.handle(msg) {
            Ok(ClientStep::Send(reply)) => link.send(reply.into()).await?,
            Ok(ClientStep::Joined(welcome)) => break welcome,
            Err(e @ HandshakeError::Aborted { .. }) => return Err(e.into()),
            Err(e) => {
                let _ = link
                    .send(Message::abort(s4t_shared::wamp::message::uri::PROTOCOL_VIOLATION, e.to_string()).into())
                    .await;
                return Err(e.into());
            }
        }
    };
    if let Some(key) = hs.key_cache() {
        *config.key_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(key.clone());
    }
    let (commands, command_rx) = mpsc::channel(64);
    let (closed_tx, closed_rx) = watch::channel(None);
    let session = Session::new(welcome, commands, closed_rx, config.request_timeout);
    let task = actor::Actor::new(link, command_rx, closed_tx, config, session.shared());
    tokio::spawn(task.run());
    Ok(session)
}
