//! Helpers for the in-process integration tests: a server and clients bound to port 0, an echo
//! target, tokens. Every wait has a deadline.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use s4t_shared::token::{Claims, TokenKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wstunnel::client::{self, ClientConfig, ClientHandle};
use wstunnel::packet::PacketChannel;
use wstunnel::server::{Auth, DefaultHooks, ListenOn, Server, ServerConfig, ServerHandle, ServerHooks};

pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn key() -> TokenKey {
    TokenKey::new(b"test-secret".to_vec()).unwrap()
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub fn token(board: &str, port: u16) -> String {
    key().mint(&Claims { board: board.into(), port, vpn: None, expiry: now() + 600 }).unwrap()
}

pub fn vpn_token(board: &str, vpn: &str) -> String {
    key().mint(&Claims { board: board.into(), port: 0, vpn: Some(vpn.into()), expiry: now() + 600 }).unwrap()
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: ServerHandle,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), wstunnel::Error>>,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

pub fn config(listen: ListenOn) -> ServerConfig {
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap(), Auth::Token(key()));
    cfg.listen = listen;
    cfg.public_bind = "127.0.0.1".parse().unwrap();
    cfg
}

pub async fn start_server_with<H: ServerHooks>(cfg: ServerConfig, hooks: H) -> TestServer {
    let server = Server::bind(cfg).await.unwrap();
    let (addr, handle) = (server.local_addr(), server.handle());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(Arc::new(hooks), shutdown.clone()));
    TestServer { addr, handle, shutdown, task }
}

pub async fn start_server() -> TestServer {
    start_server_with(config(ListenOn::Addr("127.0.0.1:0".parse().unwrap())), DefaultHooks::default()).await
}

pub fn client_config(url: &str) -> ClientConfig {
    let mut c = ClientConfig::new(url);
    c.reconnect_initial = Duration::from_millis(20);
    c.reconnect_max = Duration::from_millis(200);
    c
}

pub fn start_client(url: &str) -> (ClientHandle, CancellationToken) {
    let shutdown = CancellationToken::new();
    (client::start(client_config(url), shutdown.clone()).unwrap(), shutdown)
}

/// An echo server on 127.0.0.1:0 that echoes until EOF, then half-closes.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

pub async fn connect(port: u16) -> TcpStream {
    tokio::time::timeout(DEADLINE, TcpStream::connect(("127.0.0.1", port))).await.unwrap().unwrap()
}

/// Connects to public `port` on 127.0.0.1 from `source` (another loopback address: another
/// source address to the server).
pub async fn connect_from(source: &str, port: u16) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    within("connect", sock.connect(SocketAddr::from(([127, 0, 0, 1], port)))).await.unwrap()
}

/// Asserts that the server closed `s` without passing anything on: what is sent gets no
/// echo, the connection ends (or is reset).
pub async fn assert_closed_at_once(s: &mut TcpStream, what: &str) {
    let _ = s.write_all(b"anyone?").await;
    let mut buf = [0u8; 16];
    match within("the connection's end", s.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("{what}: the connection was served ({:?} came back)", String::from_utf8_lossy(&buf[..n])),
    }
}

/// Sends `msg` and reads the same number of bytes back.
pub async fn echo_once(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut back)).await.expect("echo timed out").unwrap();
    back
}

/// Awaits `f` under the test deadline.
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Polls `ready` until it holds, under the test deadline.
pub async fn wait_until(what: &str, ready: impl Fn() -> bool) {
    within(what, async {
        while !ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Sends `total` pseudo-random bytes (in odd-sized writes, so frames do not line up with
/// them) through the echo behind public `port`, half-closes, and checks that exactly the same
/// bytes come back (SHA-256) before the end of stream.
pub async fn echo_checksummed(port: u16, total: usize) {
    use sha2::{Digest, Sha256};
    let s = connect(port).await;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut x: u32 = 7;
        let mut buf = vec![0u8; 61_441];
        let mut sent = 0;
        while sent < total {
            let n = buf.len().min(total - sent);
            for b in &mut buf[..n] {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *b = (x >> 16) as u8;
            }
            w.write_all(&buf[..n]).await.unwrap();
            h.update(&buf[..n]);
            sent += n;
        }
        w.shutdown().await.unwrap();
        h.finalize()
    });
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 100_000];
    let mut got = 0;
    loop {
        let n = within("read", r.read(&mut buf)).await.unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    assert_eq!(got, total);
    assert_eq!(h.finalize(), within("writer", writer).await.unwrap());
}

/// Hooks that echo every packet of every packet channel into `vpn-1` back to the board, and
/// refuse other VPNs.
pub struct EchoPackets;

impl ServerHooks for EchoPackets {
    fn packet_channel(
        &self,
        _board: &str,
        vpn: &str,
        ch: PacketChannel,
    ) -> impl Future<Output = Result<(), wstunnel::server::Refusal>> + Send {
        let ok = vpn == "vpn-1";
        async move {
            if !ok {
                return Err(wstunnel::server::Refusal::Denied("no such VPN".into()));
            }
            let PacketChannel { sender, mut receiver } = ch;
            tokio::spawn(async move {
                while let Some(p) = receiver.recv().await {
                    let _ = sender.send(&p).await;
                }
            });
            Ok(())
        }
    }
}

/// A raw WebSocket to the tunnel server, for tests that speak the frames themselves.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens a raw channel (subprotocol `s4t-tunnel`), nothing sent yet.
pub async fn raw_channel(srv: &TestServer) -> Ws {
    within("raw connect", try_raw_channel(srv)).await.unwrap()
}

/// [`raw_channel`], failing when the server drops the connection.
pub async fn try_raw_channel(srv: &TestServer) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = srv.url().into_client_request().unwrap();
    let proto = tokio_tungstenite::tungstenite::http::HeaderValue::from_static(wstunnel::SUBPROTOCOL);
    req.headers_mut().insert("Sec-WebSocket-Protocol", proto);
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

/// Runs `test` on a thread of its own that entered a fresh network namespace (with `lo` up):
/// its devices and sockets exist only there and die with it. Needs root: skipped without,
/// except under CI.
pub fn in_private_netns<F: Future<Output = ()>>(test: impl FnOnce() -> F + Send + 'static) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "this test needs root and CI is set");
        eprintln!("SKIPPED: needs root (network namespace)");
        return;
    }
    std::thread::spawn(|| {
        // SAFETY: unshare on this thread only; the namespace dies with it.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        let st = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
        assert!(st.success());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(test());
    })
    .join()
    .unwrap();
}

/// The next tunnel frame (pings are answered by tungstenite as it reads); `None` once closed.
pub async fn next_frame(ws: &mut Ws) -> Option<s4t_shared::tunnel::frame::Frame> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match within("next frame", ws.next()).await {
            Some(Ok(Message::Binary(b))) => return Some(s4t_shared::tunnel::frame::Frame::decode(&b).unwrap()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return None,
        }
    }
}

/// A port free now for a test that must name its public port (the wstun protocol makes the
/// client choose): below the kernel's ephemeral range, so that the port-0 binds of the tests
/// running beside it (which take ports from that range) cannot take it before it is used.
pub fn free_fixed_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (first, span) = (10_000u16, low.saturating_sub(10_000).max(1));
    // Spread the tests of different processes over the range.
    let seed =
        std::process::id() as u64 ^ SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    for i in 0..u64::from(span) {
        let port = first + ((seed + i * 7919) % u64::from(span)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}
