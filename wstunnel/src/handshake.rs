//! The HTTP/1.1 WebSocket upgrade (RFC 6455 §4), both ends, and the routing of an incoming
//! upgrade to our channel protocol or to the legacy wstun protocol.

use base64::Engine;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::error::Error;
use crate::io::read_http_head;

/// The subprotocol of our multiplexed channel.
pub const SUBPROTOCOL: &str = "s4t-tunnel";
/// Our channel with unmasked client frames. A client offers it before [`SUBPROTOCOL`]; a
/// server that picks it accepts unmasked frames from that client. Masking (RFC 6455 §5.3)
/// protects intermediaries that misread the stream as HTTP from script-chosen bytes; it costs
/// a pass over every byte the board sends, and erebe/wstunnel leaves it off by default too.
/// Older servers pick [`SUBPROTOCOL`], and the client then masks.
pub const UNMASKED_SUBPROTOCOL: &str = "s4t-tunnel-unmasked";
/// A lane of a channel (frames unmasked both ways): an extra connection that carries some of
/// the channel's streams. Its first frame is `Lane` with the key the channel's `Lanes` gave.
pub const LANE_SUBPROTOCOL: &str = "s4t-tunnel-lane";
/// The request header in which a client asks for up to that many lanes for its channel
/// (servers that do not know it ignore it, and the client then uses the channel alone).
pub const LANES_HEADER: &str = "S4T-Tunnel-Lanes";
/// The subprotocol MDSLab wstun speaks.
pub const LEGACY_SUBPROTOCOL: &str = "tunnel-protocol";
const MAX_HEAD: usize = 8 * 1024;

/// What an incoming connection asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// Our multiplexed channel; `unmasked`: the client offered unmasked frames; `lanes`: how
    /// many lanes it asked for.
    Channel { unmasked: bool, lanes: u16 },
    /// A lane of a channel.
    Lane,
    /// wstun control channel: `?dst=host:port`, with `&board=<uuid>` when our wstun client
    /// was given `-u <uuid>` (the original lightning-rod passes its board uuid).
    LegacyControl { port: u16, board: Option<String> },
    /// wstun data channel: `?id=<uuid>`.
    LegacyData { id: String },
    /// A plain HTTP GET (no upgrade): answered with a status page.
    Status,
}

/// A parsed upgrade request, before we answer it.
pub(crate) struct Incoming {
    pub route: Route,
    key: Option<String>,
    /// Bytes the client sent after its request.
    pub leftover: BytesMut,
}

/// Reads and routes the request. Errors are answered by the caller with [`refuse`].
pub(crate) async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<Incoming, Error> {
    let (head, leftover) = read_http_head(s, MAX_HEAD).await?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Error::Handshake("malformed HTTP request".into())),
    }
    if req.method != Some("GET") {
        return Err(Error::Handshake("only GET is accepted".into()));
    }
    let path = req.path.unwrap_or("/").to_owned();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::to_owned)
    };
    let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return Ok(Incoming { route: Route::Status, key: None, leftover });
    }
    let key = header("sec-websocket-key").ok_or_else(|| Error::Handshake("missing Sec-WebSocket-Key".into()))?;
    if header("sec-websocket-version").as_deref() != Some("13") {
        return Err(Error::Handshake("unsupported Sec-WebSocket-Version (13 required)".into()));
    }
    let protocols = header("sec-websocket-protocol").unwrap_or_default();
    let offers = |p: &str| protocols.split(',').any(|o| o.trim() == p);
    let lanes = header(LANES_HEADER).and_then(|v| v.trim().parse::<u16>().ok()).unwrap_or(0);
    let route = if offers(LANE_SUBPROTOCOL) {
        Route::Lane
    } else if offers(UNMASKED_SUBPROTOCOL) {
        Route::Channel { unmasked: true, lanes }
    } else if offers(SUBPROTOCOL) {
        Route::Channel { unmasked: false, lanes }
    } else {
        legacy_route(&path)?
    };
    Ok(Incoming { route, key: Some(key), leftover })
}

/// For the fuzz targets: routes a request path as the server does for wstun clients.
#[doc(hidden)]
pub fn fuzz_legacy_route(path: &str) -> bool {
    legacy_route(path).is_ok()
}

/// Routes a wstun request by its query: `?dst=host:port[&board=<id>]` or `?id=<id>`.
fn legacy_route(path: &str) -> Result<Route, Error> {
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    let (mut dst, mut board) = (None, None);
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "dst" if dst.is_none() => dst = Some(v),
            // A board id is at most 64 characters of [0-9A-Za-z-] (uuids); anything else is
            // ignored, as wstun ignores unknown parameters.
            "board" if !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
                board = Some(v)
            }
            "id" if dst.is_none() && !v.is_empty() && v.len() <= 64 => return Ok(Route::LegacyData { id: v }),
            _ => {}
        }
    }
    if let Some(v) = dst {
        let port = v
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| Error::Legacy(format!("dst {v:?} has no port")))?;
        return Ok(Route::LegacyControl { port, board });
    }
    Err(Error::Handshake(format!("no {SUBPROTOCOL:?} subprotocol and no wstun dst/id query")))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Accepts the upgrade with `subprotocol`.
pub(crate) async fn accept<S: AsyncWrite + Unpin>(s: &mut S, inc: &Incoming, subprotocol: &str) -> Result<(), Error> {
    let key = inc.key.as_deref().ok_or_else(|| Error::Handshake("not an upgrade".into()))?;
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {subprotocol}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    s.write_all(resp.as_bytes()).await.map_err(|e| Error::io("write the upgrade response", e))
}

/// Answers with an HTTP error status and a one-line reason, then the caller closes.
pub(crate) async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, status: u16, reason: &str) {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Error",
    };
    let body = format!("{reason}\n");
    let resp = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// The page a plain GET gets (wstun answers one too).
pub(crate) async fn status_page<S: AsyncWrite + Unpin>(s: &mut S) {
    let body = "wstunnel (s4t) is running\n";
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A completed client upgrade.
pub(crate) struct Upgraded {
    /// The bytes the server sent after its response.
    pub leftover: BytesMut,
    /// The server accepts unmasked frames from us.
    pub unmasked: bool,
}

/// What a client dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dial {
    /// A channel, asking for up to that many lanes (0: none).
    Channel { lanes: u16 },
    /// A lane of a channel that offered lanes.
    Lane,
}

/// Client side: sends the upgrade request for our subprotocol and checks the answer.
pub(crate) async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
    dial: Dial,
) -> Result<Upgraded, Error> {
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let mut offer = match dial {
        Dial::Channel { .. } => format!("Sec-WebSocket-Protocol: {UNMASKED_SUBPROTOCOL}, {SUBPROTOCOL}"),
        Dial::Lane => format!("Sec-WebSocket-Protocol: {LANE_SUBPROTOCOL}"),
    };
    if let Dial::Channel { lanes: lanes @ 1.. } = dial {
        offer.push_str(&format!("\r\n{LANES_HEADER}: {lanes}"));
    }
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(|e| Error::io("send the upgrade request", e))?;
    let (head, leftover) = read_http_head(s, MAX_HEAD).await?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Error::Handshake("malformed HTTP response".into())),
    }
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        let body = String::from_utf8_lossy(&leftover).trim().chars().take(200).collect::<String>();
        return Err(Error::Handshake(format!("server answered {code}: {body}")));
    }
    let header = |name: &str| {
        resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.to_vec()).unwrap_or_default()
    };
    if header("sec-websocket-accept") != derive_accept_key(key.as_bytes()).as_bytes() {
        return Err(Error::Handshake("wrong Sec-WebSocket-Accept".into()));
    }
    let chosen = header("sec-websocket-protocol");
    let unmasked = [UNMASKED_SUBPROTOCOL, LANE_SUBPROTOCOL].iter().any(|p| chosen.trim_ascii() == p.as_bytes());
    if dial == Dial::Lane && !unmasked {
        return Err(Error::Handshake("the server did not accept a lane".into()));
    }
    Ok(Upgraded { leftover, unmasked })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn route_of(protocols: &str) -> Route {
        route_with(&format!("Sec-WebSocket-Protocol: {protocols}")).await
    }

    async fn route_with(headers: &str) -> Route {
        let req = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n\r\n"
        );
        read_request(&mut req.as_bytes()).await.unwrap().route
    }

    #[tokio::test]
    async fn unmasked_frames_only_when_the_client_offers_them() {
        let both = format!("{UNMASKED_SUBPROTOCOL}, {SUBPROTOCOL}");
        assert_eq!(route_of(&both).await, Route::Channel { unmasked: true, lanes: 0 });
        // An older client offers only the masked channel, and must keep masking.
        assert_eq!(route_of(SUBPROTOCOL).await, Route::Channel { unmasked: false, lanes: 0 });
    }

    /// What our client sends for a channel with lanes and for a lane routes as it should; a
    /// lanes header that is not a number asks for none.
    #[tokio::test]
    async fn lanes_are_asked_for_in_the_upgrade() {
        for (dial, want) in [
            (Dial::Channel { lanes: 0 }, Route::Channel { unmasked: true, lanes: 0 }),
            (Dial::Channel { lanes: 3 }, Route::Channel { unmasked: true, lanes: 3 }),
            (Dial::Lane, Route::Lane),
        ] {
            let (mut client, mut server) = tokio::io::duplex(4096);
            // No answer comes: the request is all this test needs.
            let dialer = tokio::spawn(async move { connect(&mut client, "x", "/", dial).await.map(|_| ()) });
            assert_eq!(read_request(&mut server).await.unwrap().route, want, "{dial:?}");
            dialer.abort();
        }
        let odd = format!("Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n{LANES_HEADER}: many");
        assert_eq!(route_with(&odd).await, Route::Channel { unmasked: false, lanes: 0 });
    }

    #[test]
    fn legacy_queries_route_to_control_or_data() {
        assert_eq!(
            legacy_route("/?dst=cloud.example:50022").unwrap(),
            Route::LegacyControl { port: 50022, board: None }
        );
        assert_eq!(legacy_route("/?dst=cloud%3A50022").unwrap(), Route::LegacyControl { port: 50022, board: None });
        let with_board = Route::LegacyControl { port: 50022, board: Some("3f1c-9a".into()) };
        assert_eq!(legacy_route("/?dst=cloud:50022&board=3f1c-9a").unwrap(), with_board);
        assert_eq!(legacy_route("/?board=3f1c-9a&dst=cloud:50022").unwrap(), with_board);
        let bad_board = Route::LegacyControl { port: 50022, board: None };
        assert_eq!(legacy_route("/?dst=cloud:50022&board=../x").unwrap(), bad_board);
        assert_eq!(legacy_route("/?id=abc-123").unwrap(), Route::LegacyData { id: "abc-123".into() });
        assert!(legacy_route("/?dst=nohost").is_err());
        assert!(legacy_route("/").is_err());
    }
}
