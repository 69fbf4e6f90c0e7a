//! MDSLab wstun 1.0.11 compatibility: its command line (when the binary is called as `wstun`
//! or as `wstunnel wstun …`) and its reverse client, so the original Python lightning-rod can
//! use this binary as its `wstun_bin` (S4T-REFERENCE §6.3, §7).
//!
//! Accepted command lines:
//! - `wstun -r -s <port> [--ssl=true --key=<pem> --cert=<pem>]`: reverse server. Legacy mode
//!   is on, for public ports `1024-65535`; our own protocol on the same port refuses every
//!   tunnel (no secret), as `wstunnel server` without `--secret-file` does.
//! - `wstun -r<public>:<host>:<port> ws[s]://server:port [-u <board>]`: reverse client. The
//!   process exits when its control socket closes or falls silent ([`CONTROL_IDLE_TIMEOUT`];
//!   the lightning-rod respawns it); opening it, the client retries for [`CONTROL_RETRY_FOR`]
//!   while the server is unreachable or the port is busy (a restarted tunnel racing the old
//!   one's teardown). Like wstun, `wss://` does not verify the server certificate.
//!
//! Forward mode (`-t`, `-s` without `-r`) is not supported.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::handshake::LEGACY_SUBPROTOCOL;

/// A parsed wstun command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Server { port: u16, tls: Option<(PathBuf, PathBuf)> },
    Client(LegacyClient),
}

/// A wstun reverse client: expose `target` on `public_port` of the server at `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyClient {
    pub public_port: u16,
    pub target: String,
    pub url: String,
    /// `-u <id>` (the lightning-rod passes its board uuid); sent as `&board=` for the logs.
    pub board: Option<String>,
}

/// Parses wstun's arguments (without the program name).
pub fn parse(args: &[String]) -> Result<Command, Error> {
    let bad = |m: String| Error::Config(format!("wstun: {m}"));
    let (mut reverse, mut spec, mut server_port, mut url, mut board) = (false, None, None, None, None);
    let (mut ssl, mut key, mut cert) = (false, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| -> Result<String, Error> {
            match a.strip_prefix(flag).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v.trim_start_matches('=').to_owned()),
                None => it.next().cloned().ok_or_else(|| bad(format!("{flag} needs a value"))),
            }
        };
        match a.as_str() {
            "-r" | "--reverse" => reverse = true,
            s if s.starts_with("-r") => {
                reverse = true;
                spec = Some(s[2..].to_owned());
            }
            s if s.starts_with("-s") || s.starts_with("--server") => {
                let flag = if s.starts_with("--server") { "--server" } else { "-s" };
                server_port = Some(value(flag)?.parse::<u16>().map_err(|_| bad("bad server port".into()))?);
            }
            s if s.starts_with("-u") => board = Some(value("-u")?),
            s if s.starts_with("--ssl") => ssl = !matches!(value("--ssl")?.as_str(), "false" | "0"),
            s if s.starts_with("--key") => key = Some(PathBuf::from(value("--key")?)),
            s if s.starts_with("--cert") => cert = Some(PathBuf::from(value("--cert")?)),
            s if s.starts_with("-t") || s.starts_with("--tunnel") => {
                return Err(bad("forward mode (-t) is not supported; use -r".into()));
            }
            s if s.starts_with("ws://") || s.starts_with("wss://") => url = Some(s.to_owned()),
            other => return Err(bad(format!("unexpected argument {other:?}"))),
        }
    }
    if !reverse {
        return Err(bad("only reverse mode (-r) is supported".into()));
    }
    if let Some(port) = server_port {
        let tls = match (ssl, key, cert) {
            (false, _, _) => None,
            (true, Some(k), Some(c)) => Some((c, k)),
            (true, _, _) => return Err(bad("--ssl=true needs --key and --cert".into())),
        };
        return Ok(Command::Server { port, tls });
    }
    let spec = spec.ok_or_else(|| bad("give -r<public>:<host>:<port> or -r -s <port>".into()))?;
    let url = url.ok_or_else(|| bad("missing ws://server:port".into()))?;
    let mut parts = spec.splitn(2, ':');
    let public_port = parts.next().and_then(|p| p.parse::<u16>().ok()).ok_or_else(|| bad(format!("bad -r{spec}")))?;
    let target = parts.next().filter(|t| t.contains(':')).ok_or_else(|| bad(format!("bad -r{spec}")))?.to_owned();
    Ok(Command::Client(LegacyClient { public_port, target, url, board }))
}

/// The connection id of a control-socket text frame `NC:<id>`; `None` for anything else
/// (an id must be 1 to 64 characters of `[0-9A-Za-z-]`, as the uuids wstun sends are).
pub fn nc_id(text: &str) -> Option<&str> {
    let id = text.strip_prefix("NC:")?;
    let ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    ok.then_some(id)
}

fn request(url: &str, query: &str) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, Error> {
    let base = url.trim_end_matches('/');
    let mut req = format!("{base}/?{query}")
        .into_client_request()
        .map_err(|e| Error::Url { url: url.to_owned(), reason: e.to_string() })?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(LEGACY_SUBPROTOCOL));
    Ok(req)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a wstun client keeps trying to open its control socket while the server is
/// unreachable or its public port is still held by the tunnel this one replaces (HTTP 409);
/// a refusal (403: not a port of this board) ends it at once. Once open, a closed control
/// socket ends the client, as with wstun (the lightning-rod starts a new one).
pub const CONTROL_RETRY_FOR: Duration = Duration::from_secs(20);
const CONTROL_RETRY_MAX_PAUSE: Duration = Duration::from_secs(2);

/// How long an open control socket may bring nothing (no announcement, no ping, no pong)
/// before the client takes it for dead (a NAT dropped it without a word) and ends, so that the
/// lightning-rod starts a new one. Our server pings every 20 s; the client pings every third
/// of this as well, which any server answers (one that never pings too).
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(65);
/// How long a dial (TCP, TLS and the upgrade) or a data socket's connect to its target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message (and frame) taken on a data socket: wstun peers send what one read
/// of a TCP socket brought (64 KiB at most), and tungstenite's defaults (64 MiB messages,
/// 16 MiB frames) would let a server make the board set aside that much per socket.
const DATA_MAX: usize = 1 << 20;
/// The largest message (and frame) taken on a control socket, which brings only `NC:<id>`
/// announcements and pings.
const CONTROL_MAX: usize = 16 * 1024;

async fn dial_raw(url: &str, query: &str, max: usize) -> Result<Result<Ws, WsError>, Error> {
    let req = request(url, query)?;
    let connector = if url.starts_with("wss://") {
        Some(Connector::Rustls(crate::tls::client_config_insecure()?))
    } else {
        Some(Connector::Plain)
    };
    // tungstenite allocates what a frame header announces below `max_frame_size` before it
    // checks `max_message_size`: both are `max`.
    let cfg = WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max));
    let dial = tokio_tungstenite::connect_async_tls_with_config(req, Some(cfg), true, connector);
    Ok(match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
        Ok(res) => res.map(|(ws, _)| ws),
        // An I/O error: worth another try, as an unreachable server is.
        Err(_) => Err(WsError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))),
    })
}

/// The error of a failed dial, with the server's reason for an HTTP refusal.
fn dial_error(url: &str, e: &WsError) -> Error {
    match e {
        WsError::Http(resp) => {
            let reason = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            Error::Legacy(format!("{url} refused the tunnel ({}): {}", resp.status(), reason.trim()))
        }
        e => Error::Legacy(format!("connect to {url}: {e}")),
    }
}

/// Worth another try: the server is not reachable (yet), or the port is busy.
fn retryable(e: &WsError) -> bool {
    match e {
        WsError::Http(resp) => resp.status().as_u16() == 409,
        WsError::Io(_) => true,
        _ => false,
    }
}

async fn dial(url: &str, query: &str) -> Result<Ws, Error> {
    dial_raw(url, query, DATA_MAX).await?.map_err(|e| dial_error(url, &e))
}

/// Opens the control socket, retrying as [`CONTROL_RETRY_FOR`] says; `None` on `shutdown`.
async fn dial_control(url: &str, query: &str, shutdown: &CancellationToken) -> Result<Option<Ws>, Error> {
    let deadline = tokio::time::Instant::now() + CONTROL_RETRY_FOR;
    let mut pause = Duration::from_millis(100);
    loop {
        match dial_raw(url, query, CONTROL_MAX).await? {
            Ok(ws) => return Ok(Some(ws)),
            Err(e) if retryable(&e) && tokio::time::Instant::now() + pause < deadline => {
                tracing::info!(cause = %dial_error(url, &e), "wstun control socket not open yet; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
                pause = (pause * 2).min(CONTROL_RETRY_MAX_PAUSE);
            }
            Err(e) => return Err(dial_error(url, &e)),
        }
    }
}

impl LegacyClient {
    /// Runs until the control socket closes or brings nothing for [`CONTROL_IDLE_TIMEOUT`]
    /// (an error: the caller exits non-zero, and the lightning-rod respawns the tunnel) or
    /// `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), Error> {
        self.run_with_idle_timeout(shutdown, CONTROL_IDLE_TIMEOUT).await
    }

    /// [`run`](Self::run), taking the control socket for dead after `idle` without a message.
    pub async fn run_with_idle_timeout(&self, shutdown: CancellationToken, idle: Duration) -> Result<(), Error> {
        let host = tokio_tungstenite::tungstenite::http::Uri::try_from(self.url.as_str())
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_else(|| "localhost".into());
        let mut query = format!("dst={host}:{}", self.public_port);
        if let Some(b) = &self.board {
            query.push_str(&format!("&board={b}"));
        }
        let Some(mut control) = dial_control(&self.url, &query, &shutdown).await? else { return Ok(()) };
        tracing::info!(url = self.url, port = self.public_port, target = self.target, "wstun control socket open");
        let conns = Arc::new(tokio::sync::Semaphore::new(4096));
        // Without a word from the server for `idle` (its pings, or its pongs to ours, which a
        // server that does not ping answers too) the connection is gone: a NAT dropped it
        // silently, and no close will ever come.
        let mut ping = tokio::time::interval((idle / 3).max(Duration::from_millis(1)));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut heard = tokio::time::Instant::now();
        loop {
            let msg = tokio::select! {
                m = control.next() => m,
                _ = tokio::time::sleep_until(heard + idle) => {
                    return Err(Error::Legacy(format!("control socket silent for {idle:?}: presumed dead")));
                }
                _ = ping.tick() => {
                    if !matches!(tokio::time::timeout(idle, control.send(Message::Ping(Default::default()))).await, Ok(Ok(()))) {
                        return Err(Error::Legacy("control socket: cannot send a ping".into()));
                    }
                    continue;
                }
                _ = shutdown.cancelled() => {
                    let _ = control.close(None).await;
                    return Ok(());
                }
            };
            heard = tokio::time::Instant::now();
            match msg {
                Some(Ok(Message::Text(t))) => match nc_id(t.as_str()) {
                    Some(id) => self.spawn_data(id.to_owned(), conns.clone()),
                    None => tracing::warn!(len = t.len(), "unexpected text on the wstun control socket"),
                },
                Some(Ok(Message::Ping(p))) => {
                    let _ = control.send(Message::Pong(p)).await;
                }
                Some(Ok(Message::Close(_))) | None => {
                    return Err(Error::Legacy("control socket closed by the server".into()));
                }
                Some(Err(e)) => return Err(Error::Legacy(format!("control socket: {e}"))),
                Some(Ok(_)) => {}
            }
        }
    }

    fn spawn_data(&self, id: String, conns: Arc<tokio::sync::Semaphore>) {
        let (url, target) = (self.url.clone(), self.target.clone());
        let Ok(permit) = conns.try_acquire_owned() else {
            tracing::warn!("too many tunneled connections: refusing one");
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let res = async {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.as_str()))
                    .await
                    .map_err(|_| Error::Legacy(format!("connect to {target}: timed out")))?
                    .map_err(|e| Error::Legacy(format!("connect to {target}: {e}")))?;
                let ws = dial(&url, &format!("id={id}")).await?;
                crate::server::pipe_legacy(ws, tcp, None).await.map_err(Error::Legacy)
            }
            .await;
            if let Err(e) = res {
                tracing::warn!(cause = %e, "wstun data connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn lightning_rod_command_lines_parse() {
        assert_eq!(parse(&args("-r -s 8080")).unwrap(), Command::Server { port: 8080, tls: None });
        assert_eq!(
            parse(&args("-r -s 8080 --ssl=true --key=/k.pem --cert=/c.pem")).unwrap(),
            Command::Server { port: 8080, tls: Some(("/c.pem".into(), "/k.pem".into())) }
        );
        assert_eq!(
            parse(&args("-r50022:127.0.0.1:22 ws://cloud:8080 -u 3f1c")).unwrap(),
            Command::Client(LegacyClient {
                public_port: 50022,
                target: "127.0.0.1:22".into(),
                url: "ws://cloud:8080".into(),
                board: Some("3f1c".into()),
            })
        );
        assert!(parse(&args("-t 8080 ws://x:1")).is_err());
        assert!(parse(&args("-r50022 ws://x:1")).is_err());
        assert!(parse(&args("-r50022:127.0.0.1:22")).is_err());
        assert!(parse(&args("-s 8080")).is_err());
    }

    #[test]
    fn control_text_yields_only_plausible_ids() {
        assert_eq!(nc_id("NC:6f1c9a52-0000-4000-8000-000000000001"), Some("6f1c9a52-0000-4000-8000-000000000001"));
        assert_eq!(nc_id("NC:"), None);
        assert_eq!(nc_id("NC:../../etc"), None);
        assert_eq!(nc_id("XX:abc"), None);
        assert_eq!(nc_id(&format!("NC:{}", "a".repeat(65))), None);
    }
}
