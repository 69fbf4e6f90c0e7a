//! In-process integration tests of our protocol: a real server and real clients on 127.0.0.1,
//! port 0, real TCP targets.

mod common;

use std::time::Duration;

use common::*;
use s4t_shared::token::{Claims, TokenKey};
use s4t_shared::tunnel::frame::code;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wstunnel::Error;
use wstunnel::server::{DefaultHooks, ListenOn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_a_reverse_tunnel_on_a_server_assigned_port() {
    let srv = start_server().await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let exposed = within("expose", client.expose(token("board-a", 0), 0, echo.to_string())).await.unwrap();
    assert_ne!(exposed.port, 0, "the server assigned a port");
    let listeners = srv.handle.listeners();
    assert_eq!(listeners.len(), 1);
    assert_eq!((listeners[0].board.as_str(), listeners[0].port), ("board-a", exposed.port));
    assert_eq!(srv.handle.boards(), vec!["board-a".to_owned()]);
    let mut s = connect(exposed.port).await;
    assert_eq!(echo_once(&mut s, b"hello board").await, b"hello board");
    let state = client.state().borrow().clone();
    assert!(state.connected);
    assert_eq!(state.exposures[0].port, Some(exposed.port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parallel_connections_over_several_tunnels() {
    // All 300 come from 127.0.0.1: above the default bound of one source (256), which
    // `abuse.rs` tests.
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.max_public_per_source = 1024;
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let mut ports = Vec::new();
    for _ in 0..3 {
        ports.push(within("expose", client.expose(token("board-a", 0), 0, echo.to_string())).await.unwrap().port);
    }
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let port = ports[i as usize % ports.len()];
        tasks.push(tokio::spawn(async move {
            let mut s = connect(port).await;
            let msg: Vec<u8> = (0..10_000u32).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
            assert_eq!(echo_once(&mut s, &msg).await, msg);
        }));
    }
    for t in tasks {
        within("parallel echo", t).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_propagates_both_ways() {
    let srv = start_server().await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    let mut s = connect(port).await;
    s.write_all(b"last words").await.unwrap();
    // Our write side closes; the board's target sees EOF, echoes, and closes its side: we read
    // everything and then EOF, although we closed our side first.
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("read to EOF", s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"last words");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_arrive_intact_in_both_directions() {
    let srv = start_server().await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    echo_checksummed(port, 48 * 1024 * 1024).await;
}

/// The operator's counters ([`wstunnel::TrafficStats`]) follow what the tunnel carries: the
/// channel, the listener, each connection as a stream, the payload both ways, refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_is_counted_for_the_operator() {
    let srv = start_server().await;
    let echo = echo_server().await;
    assert_eq!(srv.handle.stats(), wstunnel::TrafficStats::default(), "nothing carried yet");
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("board-a", 0), 0, echo.to_string())).await.unwrap().port;
    let err = within("expose", client.expose(token("board-a", 1), 2, echo.to_string())).await.unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err:?}");
    let msg = vec![7u8; 300_000];
    for _ in 0..3 {
        let mut s = connect(port).await;
        assert_eq!(echo_once(&mut s, &msg).await, msg);
    }
    let held = connect(port).await;
    let st = srv.handle.stats();
    assert_eq!((st.channels_total, st.channels_open, st.listeners_open), (1, 1, 1), "{st:?}");
    assert_eq!(st.refusals_total, 1, "{st:?}");
    assert_eq!(st.bytes_sent, 3 * msg.len() as u64, "user → board payload: {st:?}");
    assert_eq!(st.bytes_received, 3 * msg.len() as u64, "board → user payload: {st:?}");
    // Connections are counted as the server accepts them; the held one may still be in the
    // accept queue, and the finished ones are removed as their pumps end.
    within("streams counted", async {
        while srv.handle.stats().streams_total < 4 || srv.handle.stats().streams_open != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    drop(held);
    within("held stream closed", async {
        while srv.handle.stats().streams_open != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_a_reason_and_good_ones_still_work() {
    let srv = start_server().await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let target = echo.to_string();
    let forged = TokenKey::new(b"wrong".to_vec()).unwrap();
    let expired = key().mint(&Claims { board: "b".into(), port: 0, vpn: None, expiry: now() - 10 }).unwrap();
    let cases = [
        (String::new(), 0, "malformed"),
        ("garbage!".to_owned(), 0, "base64"),
        (forged.mint(&Claims { board: "b".into(), port: 0, vpn: None, expiry: now() + 60 }).unwrap(), 0, "signature"),
        (expired, 0, "expired"),
        (vpn_token("b", "vpn1"), 0, "VPN"),
    ];
    for (tok, port, why) in cases {
        match within("expose", client.expose(tok, port, target.clone())).await {
            Err(Error::Refused { code: c, reason }) => {
                assert_eq!(c, code::UNAUTHORIZED);
                assert!(reason.contains(why), "{reason:?} should mention {why}");
            }
            other => panic!("expected a refusal ({why}), got {other:?}"),
        }
    }
    // A token for one port does not open another: ask for port 1 with a token for port 2.
    let err = within("expose", client.expose(token("b", 2), 1, target.clone())).await.unwrap_err();
    assert!(matches!(err, Error::Refused { code: code::UNAUTHORIZED, .. }), "{err:?}");
    assert!(client.state().borrow().last_refusal.is_some());
    // The channel is bound to the first board that proved itself; another board's token fails.
    let ok = within("expose", client.expose(token("b", 0), 0, target.clone())).await.unwrap();
    let err = within("expose", client.expose(token("other-board", 0), 0, target.clone())).await.unwrap_err();
    assert!(err.to_string().contains("belongs to b"), "{err}");
    let mut s = connect(ok.port).await;
    assert_eq!(echo_once(&mut s, b"still fine").await, b"still fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_secret_refuses_every_tunnel() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.auth = wstunnel::server::Auth::Disabled;
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let (client, _stop) = start_client(&srv.url());
    let err = within("expose", client.expose(token("b", 0), 0, "127.0.0.1:9".into())).await.unwrap_err();
    assert!(err.to_string().contains("--secret-file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_the_server_restarts_and_reopens_its_tunnels() {
    // The test keeps a duplicate of the listening socket so the restarted server gets the same
    // address without racing anyone for the port.
    let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dup = std_l.try_clone().unwrap();
    let srv = start_server_with(config(ListenOn::Listener(std_l)), DefaultHooks::default()).await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    let mut s = connect(port).await;
    assert_eq!(echo_once(&mut s, b"before").await, b"before");

    srv.shutdown.cancel();
    within("server stop", srv.task).await.unwrap().unwrap();
    let mut state = client.state();
    within("client notices", state.wait_for(|s| !s.connected)).await.unwrap();

    let srv2 = start_server_with(config(ListenOn::Listener(dup)), DefaultHooks::default()).await;
    within("client reconnects", state.wait_for(|s| s.connected)).await.unwrap();
    // The exposure comes back on the same public port.
    within("listener restored", async {
        let mut st = client.state();
        st.wait_for(|s| s.exposures.iter().any(|e| e.port == Some(port)) && srv2.handle.listeners().len() == 1)
            .await
            .unwrap();
        while srv2.handle.listeners().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(srv2.handle.listeners()[0].port, port);
    let mut s = connect(port).await;
    assert_eq!(echo_once(&mut s, b"after").await, b"after");
}

/// Refuses tokens that expire before `min_expiry` (as the cloud refuses old ones), echoes
/// packets of `vpn-1`.
struct FreshTokensOnly {
    min_expiry: u64,
}

impl wstunnel::server::ServerHooks for FreshTokensOnly {
    async fn token_accepted(&self, _board: &str, expiry: u64) -> Result<(), wstunnel::server::Refusal> {
        if expiry < self.min_expiry { Err(wstunnel::server::Refusal::Denied("token too old".into())) } else { Ok(()) }
    }

    fn packet_channel(
        &self,
        board: &str,
        vpn: &str,
        ch: wstunnel::packet::PacketChannel,
    ) -> impl std::future::Future<Output = Result<(), wstunnel::server::Refusal>> + Send {
        EchoPackets.packet_channel(board, vpn, ch)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_tokens_are_the_ones_presented_after_a_reconnect() {
    let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dup = std_l.try_clone().unwrap();
    let srv = start_server_with(config(ListenOn::Listener(std_l)), EchoPackets).await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let minted = |port, vpn: Option<&str>, expiry| {
        key().mint(&Claims { board: "b".into(), port, vpn: vpn.map(str::to_owned), expiry }).unwrap()
    };
    let old = now() + 600;
    let renewed = within("expose", client.expose(minted(0, None, old), 0, echo.to_string())).await.unwrap();
    let kept = within("expose", client.expose(minted(0, None, old), 0, echo.to_string())).await.unwrap();
    let mut packets =
        within("packets", client.open_packet_channel(minted(0, Some("vpn-1"), old), "vpn-1".into())).await.unwrap();
    let fresh = now() + 1200;
    assert!(client.renew_exposure_token(renewed.id, minted(renewed.port, None, fresh)));
    assert!(!client.renew_exposure_token(9_999, minted(renewed.port, None, fresh)), "no such exposure");
    assert_eq!(client.renew_packet_token("vpn-1", &minted(0, Some("vpn-1"), fresh)), 1);
    assert_eq!(client.renew_packet_token("vpn-2", &minted(0, Some("vpn-2"), fresh)), 0);

    srv.shutdown.cancel();
    within("server stop", srv.task).await.unwrap().unwrap();
    let mut state = client.state();
    within("client notices", state.wait_for(|s| !s.connected)).await.unwrap();
    let srv2 = start_server_with(config(ListenOn::Listener(dup)), FreshTokensOnly { min_expiry: now() + 900 }).await;
    // The exposure whose token was renewed comes back on its port; the other one presented
    // its old token and was refused.
    within("renewed restored, old refused", async {
        let mut st = client.state();
        st.wait_for(|s| {
            s.exposures.len() == 1
                && s.exposures[0].id == renewed.id
                && s.last_refusal.as_deref() == Some("token too old")
        })
        .await
        .unwrap();
        while srv2.handle.listeners().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(srv2.handle.listeners().iter().map(|l| l.port).collect::<Vec<_>>(), vec![renewed.port]);
    assert!(!client.state().borrow().exposures.iter().any(|e| e.id == kept.id));
    let mut s = connect(renewed.port).await;
    assert_eq!(echo_once(&mut s, b"after").await, b"after");
    // The packet channel was re-opened with its renewed token (packets sent before it is
    // re-opened are lost, as on any network: send until one comes back).
    within("packet echo", async {
        loop {
            packets.sender.send(b"ping").await.unwrap();
            if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(100), packets.receiver.recv()).await {
                assert_eq!(&p[..], b"ping");
                break;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_listener_closes_it_and_its_connections_and_tells_the_board() {
    let srv = start_server().await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    let mut open = connect(port).await;
    assert_eq!(echo_once(&mut open, b"before").await, b"before");
    assert!(srv.handle.close_listener(port));
    // The connection accepted before ends with it (a lease's end must end its sessions).
    let mut buf = [0u8; 16];
    let read = within("connection closed", tokio::io::AsyncReadExt::read(&mut open, &mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let mut st = client.state();
    within("board told", st.wait_for(|s| s.exposures.is_empty() && s.last_refusal.as_deref() == Some("revoked")))
        .await
        .unwrap();
    within("port freed", async {
        while !srv.handle.listeners().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(), "nothing listens any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_port_is_freed_when_its_board_channel_dies() {
    let srv = start_server().await;
    let echo = echo_server().await;
    let (client, stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    assert_eq!(srv.handle.channel_count(), 1);
    stop.cancel();
    within("channel gone", async {
        while srv.handle.channel_count() != 0 || !srv.handle.listeners().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_local_connect_resets_only_that_stream() {
    let srv = start_server().await;
    let echo = echo_server().await;
    // A port nothing listens on: bind, read the port, close.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (client, _stop) = start_client(&srv.url());
    let bad = within("expose", client.expose(token("b", 0), 0, dead.to_string())).await.unwrap().port;
    let good = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    let mut s = connect(bad).await;
    let _ = s.write_all(b"anyone?").await;
    let mut buf = [0u8; 16];
    let n = within("reset", s.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "the connection is closed without data");
    let mut s = connect(good).await;
    assert_eq!(echo_once(&mut s, b"ok").await, b"ok");
}

/// Sockets of this process's network namespace still connecting (SYN_SENT) to 127.0.0.1:`port`.
fn connecting_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let remote = format!("0100007F:{port:04X}");
    table.lines().skip(1).filter(|l| l.split_whitespace().skip(2).take(2).eq([remote.as_str(), "02"])).count()
}

/// A stream the server resets while the board is still connecting to its target (one that
/// does not answer) gives up that connect at once: a server repeating Open and Reset would
/// otherwise pile connects (and the data sent with each Open) up on the board until each
/// timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_while_its_target_does_not_answer_gives_up_the_connect() {
    use socket2::{Domain, SockRef, Socket, Type};
    let srv = start_server().await;
    // A target whose accept queue is full: the kernel drops the SYNs of further connects,
    // which wait (SYN_SENT) for as long as their caller lets them.
    let target = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    target.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    target.listen(0).unwrap();
    let addr = target.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    while let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await {
        queued.push(s);
        assert!(queued.len() < 16, "the accept queue does not fill");
    }
    wait_until("the probe's connect gone", || connecting_to(addr.port()) == 0).await;

    let mut cfg = client_config(&srv.url());
    cfg.target_connect_timeout = Duration::from_secs(600);
    let stop = tokio_util::sync::CancellationToken::new();
    let client = wstunnel::client::start(cfg, stop.clone()).unwrap();
    let port = within("expose", client.expose(token("b", 0), 0, addr.to_string())).await.unwrap().port;
    let mut user = connect(port).await;
    user.write_all(b"hello?").await.unwrap();
    wait_until("the board connects to the target", || connecting_to(addr.port()) == 1).await;
    // The user leaves with a TCP reset: the server resets the stream.
    SockRef::from(&user).set_linger(Some(Duration::ZERO)).unwrap();
    drop(user);
    wait_until("the board gave up its connect", || connecting_to(addr.port()) == 0).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_does_not_make_anyone_buffer_without_bound() {
    let srv = start_server().await;
    // A target that accepts and then never reads.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let (held_tx, mut held_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let (s, _) = sink.accept().await.unwrap();
        held_tx.send(s).await.unwrap();
    });
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, sink_addr.to_string())).await.unwrap().port;
    let mut s = connect(port).await;
    let _held = within("target accepted", held_rx.recv()).await;
    // Push until writes stop completing. Without flow control the tunnel would swallow all
    // 512 MiB into its buffers; with it, only the window plus kernel socket buffers fit.
    let chunk = vec![0u8; 64 * 1024];
    let mut pushed = 0usize;
    while pushed < 512 * 1024 * 1024 {
        match tokio::time::timeout(Duration::from_millis(500), s.write_all(&chunk)).await {
            Ok(Ok(())) => pushed += chunk.len(),
            _ => break,
        }
    }
    assert!(pushed < 64 * 1024 * 1024, "{pushed} bytes went into a tunnel whose reader never reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_limits_hold_even_when_requests_arrive_at_once() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.max_listeners_per_channel = 3;
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (c, t) = (client.clone(), echo.to_string());
            tokio::spawn(async move { c.expose(token("b", 0), 0, t).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match within("expose", t).await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::Refused { code: c, .. }) => assert_eq!(c, code::LIMIT),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 3, "listeners opened with a limit of 3");
    assert_eq!(srv.handle.listeners().len(), 3);
}
