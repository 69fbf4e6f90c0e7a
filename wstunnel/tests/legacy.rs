//! The MDSLab wstun 1.0.11 protocol (S4T-REFERENCE §7): a hand-written client that speaks
//! exactly that protocol against our server, and our wstun-compatible client against it.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;
use wstunnel::server::{DefaultHooks, ListenOn};
use wstunnel::wstun::LegacyClient;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// The wstun protocol forces the client to choose the public port: find one that is free now.
fn free_port() -> u16 {
    common::free_fixed_port()
}

async fn legacy_server(port: u16, enabled: bool) -> TestServer {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.legacy = enabled;
    start_server_with(cfg, DefaultHooks { legacy_ports: Some(port..=port) }).await
}

/// Opens a wstun socket: `ws://server/?<query>` with subprotocol `tunnel-protocol`.
async fn wstun_socket(srv: &TestServer, query: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{}/?{query}", srv.addr).into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("tunnel-protocol"));
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "tunnel-protocol");
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_written_wstun_client_gets_nc_ids_and_pipes_bytes() {
    let port = free_port();
    let srv = legacy_server(port, true).await;
    let echo = echo_server().await;
    // 1. Control socket: the server listens on the port named in dst.
    let mut control = within("control", wstun_socket(&srv, &format!("dst=127.0.0.1:{port}"))).await.unwrap();
    within("listener up", async {
        while srv.handle.listeners().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(srv.handle.listeners()[0].legacy);
    for round in 0..3 {
        // 2. A user connects to the public port: the control socket gets the text NC:<id>.
        let mut user = connect(port).await;
        let id = match within("NC frame", control.next()).await.unwrap().unwrap() {
            Message::Text(t) => t.as_str().strip_prefix("NC:").expect("NC:<id>").to_owned(),
            other => panic!("expected NC:<id>, got {other:?}"),
        };
        assert_eq!(id.len(), 36, "a uuid v4: {id}");
        // 3. Data socket ?id=<id>, piped to the board's service as binary frames.
        let data = within("data socket", wstun_socket(&srv, &format!("id={id}"))).await.unwrap();
        let target = TcpStream::connect(echo).await.unwrap();
        tokio::spawn(pipe(data, target));
        let msg = format!("round {round}");
        assert_eq!(echo_once(&mut user, msg.as_bytes()).await, msg.as_bytes());
    }
    // Closing the control socket closes the public listener.
    control.close(None).await.unwrap();
    within("listener closed", async {
        while !srv.handle.listeners().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Bytes both ways between a wstun data socket and a TCP connection, as the original does.
async fn pipe(ws: Ws, tcp: TcpStream) {
    let (mut sink, mut stream) = ws.split();
    let (mut r, mut w) = tcp.into_split();
    let a = async {
        while let Some(Ok(m)) = stream.next().await {
            if let Message::Binary(b) = m
                && w.write_all(&b).await.is_err()
            {
                break;
            }
        }
    };
    let b = async {
        let mut buf = vec![0u8; 16384];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 || sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    tokio::select! { _ = a => {}, _ = b => {} }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_requests_are_refused_unless_enabled_and_allowed() {
    let port = free_port();
    let off = legacy_server(port, false).await;
    let err = wstun_socket(&off, &format!("dst=127.0.0.1:{port}")).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let on = legacy_server(port, true).await;
    let other = if port == 65_535 { port - 1 } else { port + 1 };
    let err = wstun_socket(&on, &format!("dst=127.0.0.1:{other}")).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    // An unknown data id is refused too.
    let err = wstun_socket(&on, "id=00000000-0000-4000-8000-000000000000").await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    assert!(on.handle.listeners().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_wstun_compatible_client_works_against_our_server() {
    let port = free_port();
    let srv = legacy_server(port, true).await;
    let echo = echo_server().await;
    let client = LegacyClient {
        public_port: port,
        target: echo.to_string(),
        url: format!("ws://{}", srv.addr),
        board: Some("3f1c9a52-0000-4000-8000-000000000001".into()),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { client.run(stop).await }
    });
    within("listener up", async {
        while srv.handle.listeners().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        tasks.push(tokio::spawn(async move {
            let mut s = connect(port).await;
            let msg = vec![i; 50_000];
            assert_eq!(echo_once(&mut s, &msg).await, msg);
        }));
    }
    for t in tasks {
        within("echo", t).await.unwrap();
    }
    // When the server drops the control socket, the client exits with an error (the
    // lightning-rod respawns it).
    srv.shutdown.cancel();
    let res = within("client exits", task).await.unwrap();
    assert!(res.is_err(), "{res:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_is_a_409_our_client_waits_out_and_a_refusal_ends_it_at_once() {
    // The port is still held (the tunnel this one replaces has not been torn down yet). Bound
    // first: a port found free and bound later may be taken by another test meanwhile.
    let blocker = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = blocker.local_addr().unwrap().port();
    let srv = legacy_server(port, true).await;
    let echo = echo_server().await;
    let err = wstun_socket(&srv, &format!("dst=127.0.0.1:{port}")).await.unwrap_err();
    assert!(err.to_string().contains("409"), "{err}");
    let client = |public_port| LegacyClient {
        public_port,
        target: echo.to_string(),
        url: format!("ws://{}", srv.addr),
        board: None,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (stop, c) = (stop.clone(), client(port));
        async move { c.run(stop).await }
    });
    // Once the port is free, the waiting client takes it.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "the client gave up on a busy port");
    drop(blocker);
    within("listener up", async {
        while srv.handle.listeners().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut s = connect(port).await;
    assert_eq!(echo_once(&mut s, b"after the wait").await, b"after the wait");
    // A port the server refuses (403) ends the client at once, with the server's reason.
    let other = if port == 65_535 { port - 1 } else { port + 1 };
    let err = within("refused client exits", client(other).run(CancellationToken::new())).await.unwrap_err();
    assert!(err.to_string().contains("403") && err.to_string().contains("not allocated"), "{err}");
    stop.cancel();
    within("client stops", task).await.unwrap().unwrap();
}

/// A wstun control socket whose peer went silent (a NAT dropped it: no pongs, no close) is
/// closed after the idle timeout and its public port freed, so the board's reconnect is not
/// refused as a busy port for as long as TCP takes to give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_wstun_control_socket_frees_its_port() {
    let port = free_port();
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.legacy = true;
    cfg.limits.ping_interval = std::time::Duration::from_millis(100);
    cfg.limits.idle_timeout = std::time::Duration::from_millis(500);
    let srv = start_server_with(cfg, DefaultHooks { legacy_ports: Some(port..=port) }).await;
    // Opened, then never read again: its pings go unanswered.
    let _silent = within("control", wstun_socket(&srv, &format!("dst=127.0.0.1:{port}"))).await.unwrap();
    within("listener up", async {
        while srv.handle.listeners().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    within("the silent socket's listener closed", async {
        while !srv.handle.listeners().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Our wstun client takes a control socket that brings nothing (no ping, no pong to its own
/// pings: a NAT dropped the connection without a word) for dead after its idle timeout, and
/// ends with an error (the lightning-rod starts a new one) instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The handshake callback signature (and its large error type) is tungstenite's.
#[allow(clippy::result_large_err)]
async fn our_wstun_client_ends_when_its_control_socket_falls_silent() {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    // A server that completes the upgrade, then neither reads nor writes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let subprotocol = |_: &Request, mut resp: Response| {
            resp.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("tunnel-protocol"));
            Ok(resp)
        };
        let ws = tokio_tungstenite::accept_hdr_async(tcp, subprotocol).await.unwrap();
        std::future::pending::<()>().await;
        drop(ws);
    });
    let client = LegacyClient {
        public_port: 50_022, // the silent server binds nothing
        target: "127.0.0.1:9".into(),
        url: format!("ws://{addr}"),
        board: None,
    };
    let idle = std::time::Duration::from_millis(300);
    let res = tokio::time::timeout(idle * 10, client.run_with_idle_timeout(CancellationToken::new(), idle)).await;
    let err = res.expect("the client still waits on a silent control socket").unwrap_err();
    assert!(err.to_string().contains("silent"), "{err}");
    server.abort();
}

/// Connections waiting for their data socket are capped per port as well as in all: users
/// piling up on one board's port (whose board never opens data sockets) leave room for the
/// other legacy boards' connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ports_waiting_connections_leave_room_for_the_others() {
    let (p1, p2) = (free_port(), free_port());
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.legacy = true;
    cfg.limits.legacy_max_pending = 16;
    let srv = start_server_with(cfg, DefaultHooks { legacy_ports: Some(p1.min(p2)..=p1.max(p2)) }).await;
    let _ignoring = within("control 1", wstun_socket(&srv, &format!("dst=127.0.0.1:{p1}"))).await.unwrap();
    let mut answering = within("control 2", wstun_socket(&srv, &format!("dst=127.0.0.1:{p2}"))).await.unwrap();
    within("listeners up", async {
        while srv.handle.listeners().len() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // More than the whole server may hold wait on port 1; the last is refused (closed) once
    // every one before it was taken or refused.
    let mut users = Vec::new();
    for _ in 0..17 {
        users.push(connect(p1).await);
    }
    let mut last = users.pop().unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(within("the 17th is refused", last.read(&mut buf)).await.unwrap_or(0), 0);
    // Port 2's user is still announced to its board.
    let _user = connect(p2).await;
    match within("NC on port 2", answering.next()).await.unwrap().unwrap() {
        Message::Text(t) => assert!(t.as_str().starts_with("NC:"), "{t}"),
        other => panic!("expected NC:<id>, got {other:?}"),
    }
}

/// One legacy port holds only so many connections, waiting or piped: beyond, a new one is
/// closed at once. And a data socket, once attached, holds none of the server's connection
/// slots: else one legacy port's users could take every board's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_legacy_port_holds_only_so_many_connections_and_no_connection_slots() {
    let port = free_port();
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.legacy = true;
    cfg.limits.max_connections = 3;
    cfg.limits.legacy_max_per_port = 2;
    // A connection parked for good would outlive the test's deadline.
    cfg.limits.legacy_pending_timeout = std::time::Duration::from_secs(300);
    let srv = start_server_with(cfg, DefaultHooks { legacy_ports: Some(port..=port) }).await;
    let echo = echo_server().await;
    let mut control = within("control", wstun_socket(&srv, &format!("dst=127.0.0.1:{port}"))).await.unwrap();
    wait_until("listener up", || !srv.handle.listeners().is_empty()).await;
    let mut users = Vec::new();
    for round in 0..2 {
        let mut user = connect(port).await;
        let id = match within("NC frame", control.next()).await.unwrap().unwrap() {
            Message::Text(t) => t.as_str().strip_prefix("NC:").expect("NC:<id>").to_owned(),
            other => panic!("expected NC:<id>, got {other:?}"),
        };
        let data = within("data socket", wstun_socket(&srv, &format!("id={id}"))).await.unwrap();
        tokio::spawn(pipe(data, TcpStream::connect(echo).await.unwrap()));
        let msg = format!("user {round}");
        assert_eq!(echo_once(&mut user, msg.as_bytes()).await, msg.as_bytes());
        users.push(user);
    }
    // The control socket and two data sockets are open: the server's three slots, were the
    // data sockets counted.
    let channel = within("a board channel", try_raw_channel(&srv)).await;
    assert!(channel.is_ok(), "the legacy data sockets hold the server's connection slots");
    assert_closed_at_once(&mut connect(port).await, "a third connection on the port").await;
}
