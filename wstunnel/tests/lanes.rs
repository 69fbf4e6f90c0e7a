//! Lanes: a board channel's extra connections, over which the server spreads its streams. The
//! client reaches the server through a counting relay (a middlebox on 127.0.0.1, port 0) that
//! shows which connection carried what, and can cut one of them.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use s4t_shared::tunnel::frame::{Frame, code};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;
use wstunnel::client::{self, ClientHandle};
use wstunnel::server::{DefaultHooks, ListenOn};

/// One connection through the relay: bytes it carried towards the client, and a switch that
/// cuts it.
struct Relayed {
    to_client: Arc<AtomicU64>,
    cut: CancellationToken,
}

/// A TCP relay in front of the tunnel server, keeping every connection it relayed in order.
struct Relay {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Relayed>>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Relayed>>> = Arc::default();
        let c2 = conns.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = l.accept().await {
                let up = TcpStream::connect(upstream).await.unwrap();
                let (to_client, cut) = (Arc::new(AtomicU64::new(0)), CancellationToken::new());
                c2.lock().unwrap().push(Relayed { to_client: to_client.clone(), cut: cut.clone() });
                tokio::spawn(async move {
                    let (mut ur, mut uw) = up.into_split();
                    let (mut dr, mut dw) = down.into_split();
                    let counted = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match ur.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    to_client.fetch_add(n as u64, Ordering::Relaxed);
                                    if tokio::io::AsyncWriteExt::write_all(&mut dw, &buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = counted => {}
                        _ = tokio::io::copy(&mut dr, &mut uw) => {}
                        _ = cut.cancelled() => {}
                    }
                    // Dropping both halves of both sockets closes the connection on both ends.
                });
            }
        });
        Relay { addr, conns }
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Bytes each relayed connection carried towards the client, in the order they came.
    fn carried(&self) -> Vec<u64> {
        self.conns.lock().unwrap().iter().map(|c| c.to_client.load(Ordering::Relaxed)).collect()
    }

    fn cut(&self, i: usize) {
        self.conns.lock().unwrap()[i].cut.cancel();
    }
}

/// A board client with `lanes` lanes, dialling `url`, that exposes an echo service; returns the
/// client, its stop switch and the public port.
async fn board_with_echo(url: &str, lanes: u16) -> (ClientHandle, CancellationToken, u16) {
    let echo = echo_server().await;
    let mut cfg = client_config(url);
    cfg.lanes = lanes;
    let stop = CancellationToken::new();
    let client = client::start(cfg, stop.clone()).unwrap();
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    (client, stop, port)
}

/// Polls `ready` until it holds, within the test deadline.
async fn wait_lanes(srv: &TestServer, n: u64) {
    wait_until(&format!("{n} lanes open"), || srv.handle.stats().lanes_open == n).await;
}

async fn wait_no_streams(srv: &TestServer) {
    wait_until("no streams open", || srv.handle.stats().streams_open == 0).await;
}

/// Lanes are dialled with the first stream: one connection through `port` brings them up.
async fn bring_up_lanes(srv: &TestServer, port: u16, n: u64) {
    let mut s = connect(port).await;
    assert_eq!(echo_once(&mut s, b"wake").await, b"wake");
    wait_lanes(srv, n).await;
    drop(s);
    wait_no_streams(srv).await;
}

/// Four concurrent bulk connections go one per connection of the board (the channel and its
/// three lanes), and every byte arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_spread_over_the_lanes_and_arrive_intact() {
    let srv = start_server().await;
    let relay = Relay::start(srv.addr).await;
    let (_client, _stop, port) = board_with_echo(&relay.url(), 3).await;
    assert_eq!(srv.handle.stats().lanes_open, 0, "no lane before the first stream");
    bring_up_lanes(&srv, port, 3).await;
    let size = 8 * 1024 * 1024;
    let transfers: Vec<_> = (0..4).map(|_| tokio::spawn(echo_checksummed(port, size))).collect();
    for t in transfers {
        within("transfer", t).await.unwrap();
    }
    let carried = relay.carried();
    assert_eq!(carried.len(), 4, "the channel and three lanes: {carried:?}");
    for (i, bytes) in carried.iter().enumerate() {
        assert!(*bytes >= size as u64, "connection {i} carried {bytes} bytes to the board, not one stream's");
    }
    let st = srv.handle.stats();
    assert_eq!((st.channels_open, st.streams_total), (1, 5), "{st:?}");
}

/// A lane that dies takes the streams on it, and only those; the board dials it again and
/// new connections use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_that_dies_takes_only_its_streams_and_comes_back() {
    let srv = start_server().await;
    let relay = Relay::start(srv.addr).await;
    let (_client, _stop, port) = board_with_echo(&relay.url(), 1).await;
    let mut on_channel = connect(port).await;
    assert_eq!(echo_once(&mut on_channel, b"first").await, b"first");
    wait_lanes(&srv, 1).await;
    let mut on_lane = connect(port).await;
    assert_eq!(echo_once(&mut on_lane, b"second").await, b"second");
    let before = relay.carried();
    assert!(before[1] > 0, "the second connection went on the lane: {before:?}");

    relay.cut(1);
    let mut rest = Vec::new();
    let end = within("the lane's stream ends", on_lane.read_to_end(&mut rest)).await;
    assert!(end.is_err() || rest.is_empty(), "{end:?} {rest:?}");
    assert_eq!(echo_once(&mut on_channel, b"still here").await, b"still here");

    // The board dials the lane again (the third connection the relay sees) and the next
    // connection, with the channel still busy, goes on it.
    wait_until("lane back", || relay.carried().len() >= 3 && srv.handle.stats().lanes_open == 1).await;
    let mut third = connect(port).await;
    assert_eq!(echo_once(&mut third, b"third").await, b"third");
    assert!(relay.carried()[2] > 0, "{:?}", relay.carried());
}

/// Lanes die with their channel; when the board reconnects it opens them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_close_with_their_channel_and_return_with_it() {
    let srv = start_server().await;
    let (_client, _stop, port) = board_with_echo(&srv.url(), 2).await;
    let mut s = connect(port).await;
    assert_eq!(echo_once(&mut s, b"first").await, b"first");
    wait_lanes(&srv, 2).await;
    assert_eq!(srv.handle.close_board("b"), 1);
    // The old channel is gone once only one is open of the two seen (it removes its ports
    // before itself); the port listed then is the new channel's.
    let back = || {
        let st = srv.handle.stats();
        st.channels_total >= 2 && st.channels_open == 1 && srv.handle.listeners().iter().any(|l| l.port == port)
    };
    wait_until("channel and listener back", back).await;
    wait_lanes(&srv, 0).await;
    let mut s = connect(port).await;
    assert_eq!(echo_once(&mut s, b"again").await, b"again");
    wait_lanes(&srv, 2).await;
}

/// Once its channel has had no stream for a while, a lane is retired (an idle board holds one
/// connection); the next stream brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_lanes_are_retired_and_come_back_with_the_next_stream() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.lane_idle = Duration::from_millis(100);
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let relay = Relay::start(srv.addr).await;
    let (_client, _stop, port) = board_with_echo(&relay.url(), 1).await;
    bring_up_lanes(&srv, port, 1).await;
    wait_lanes(&srv, 0).await;
    let mut s = connect(port).await;
    assert_eq!(echo_once(&mut s, b"back").await, b"back");
    wait_lanes(&srv, 1).await;
    assert_eq!(relay.carried().len(), 3, "the channel, the retired lane, the new one");
    let mut on_lane = connect(port).await;
    assert_eq!(echo_once(&mut on_lane, b"on the new lane").await, b"on the new lane");
    assert!(relay.carried()[2] > 0, "{:?}", relay.carried());
}

/// Bytes the relayed connections carried to the board while `f` ran.
async fn carried_during<T>(relay: &Relay, f: impl std::future::Future<Output = T>) -> (T, Vec<u64>) {
    let before = relay.carried();
    let t = f.await;
    let after = relay.carried();
    (t, after.iter().zip(before.iter().chain(std::iter::repeat(&0))).map(|(a, b)| a - b).collect())
}

/// A new connection does not queue behind a transfer: with a bulk transfer on the channel and
/// a quiet session on the lane, the third connection goes on the lane, not on the channel
/// (where the fewest streams alone would put it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_avoids_the_connection_carrying_a_transfer() {
    let srv = start_server().await;
    let relay = Relay::start(srv.addr).await;
    let (_client, _stop, port) = board_with_echo(&relay.url(), 1).await;
    let mut transfer = connect(port).await;
    assert_eq!(echo_once(&mut transfer, b"first").await, b"first");
    wait_lanes(&srv, 1).await;
    let mut session = connect(port).await;
    let ((), moved) = carried_during(&relay, async {
        assert_eq!(echo_once(&mut session, b"quiet").await, b"quiet");
    })
    .await;
    assert!(moved[1] > 0 && moved[0] < 1000, "the session went on the lane: {moved:?}");
    // The first connection becomes a bulk transfer (2 MiB each way)...
    let big = vec![7u8; 2 << 20];
    assert_eq!(echo_once(&mut transfer, &big).await, big);
    // ... and the next connection joins the quiet session.
    let probe = vec![9u8; 100_000];
    let (mut third, moved) = carried_during(&relay, async {
        let mut third = connect(port).await;
        assert_eq!(echo_once(&mut third, &probe).await, probe);
        third
    })
    .await;
    assert!(moved[1] >= probe.len() as u64, "the third connection went on the lane: {moved:?}");
    assert!(moved[0] < 10_000, "nothing of it on the channel: {moved:?}");
    assert_eq!(echo_once(&mut third, b"still").await, b"still");
}

/// A packet channel brings the board's lanes up before any stream, and keeps them: its
/// packets travel on the channel, the board's connections on the lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_channel_brings_the_lanes_up_and_streams_use_them() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.lane_idle = Duration::from_millis(50);
    let srv = start_server_with(cfg, EchoPackets).await;
    let relay = Relay::start(srv.addr).await;
    let (client, _stop, port) = board_with_echo(&relay.url(), 1).await;
    let ch = within("open", client.open_packet_channel(vpn_token("b", "vpn-1"), "vpn-1".into())).await.unwrap();
    wait_lanes(&srv, 1).await;
    let packet = vec![5u8; 1400];
    let mut receiver = ch.receiver;
    let (back, moved) = carried_during(&relay, async {
        ch.sender.send(&packet).await.unwrap();
        within("echoed packet", receiver.recv()).await.unwrap()
    })
    .await;
    assert_eq!(back, packet);
    assert!(moved[0] >= packet.len() as u64, "packets travel on the channel: {moved:?}");

    let probe = vec![3u8; 100_000];
    let (s, moved) = carried_during(&relay, async {
        let mut s = connect(port).await;
        assert_eq!(echo_once(&mut s, &probe).await, probe);
        s
    })
    .await;
    assert!(moved[1] >= probe.len() as u64, "the first connection went on the lane: {moved:?}");
    assert!(moved[0] < 10_000, "not on the channel with the packets: {moved:?}");
    // With the stream closed, the lane stays while the packet channel is open. The clock: a
    // second board's lane, joined after ours and idle, is retired by the same periodic check
    // (every 50 ms from its join); twice in a row, so that ours, which needs two checks (the
    // first sees the streams opened since it joined), has been checked as often. Ours retired
    // would show as a new connection through the relay carrying the next stream.
    drop(s);
    wait_no_streams(&srv).await;
    let mut cfg = client_config(&srv.url());
    cfg.lanes = 1;
    let other = client::start(cfg, CancellationToken::new()).unwrap();
    let echo = echo_server().await;
    let other_port = within("expose", other.expose(token("c", 0), 0, echo.to_string())).await.unwrap().port;
    for _ in 0..2 {
        bring_up_lanes(&srv, other_port, 2).await;
        wait_lanes(&srv, 1).await;
    }
    ch.sender.send(&packet).await.unwrap();
    assert_eq!(within("echoed packet", receiver.recv()).await.unwrap(), packet);
    let (_s, moved) = carried_during(&relay, async {
        let mut s = connect(port).await;
        assert_eq!(echo_once(&mut s, &probe).await, probe);
        s
    })
    .await;
    assert_eq!(moved.len(), 2, "the channel and one lane, never dialled again: {moved:?}");
    assert!(moved[1] >= probe.len() as u64, "the same lane carried the next stream: {moved:?}");
}

/// A server that offers no lanes carries everything on the channel, whatever the board asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_offers_no_lanes_carries_everything_on_the_channel() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.max_lanes_per_channel = 0;
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let relay = Relay::start(srv.addr).await;
    let (_client, _stop, port) = board_with_echo(&relay.url(), 3).await;
    let mut conns = Vec::new();
    for i in 0..3u8 {
        let mut s = connect(port).await;
        assert_eq!(echo_once(&mut s, &[i; 1000]).await, [i; 1000]);
        conns.push(s);
    }
    assert_eq!(relay.carried().len(), 1, "only the channel");
    assert_eq!(srv.handle.stats().lanes_open, 0);
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn raw_lane(srv: &TestServer) -> Ws {
    let mut req = srv.url().into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("s4t-tunnel-lane"));
    within("raw connect", tokio_tungstenite::connect_async(req)).await.unwrap().0
}

async fn goaway(ws: &mut Ws) -> (u16, String) {
    loop {
        match within("next frame", ws.next()).await {
            Some(Ok(Message::Binary(b))) => match Frame::decode(&b).unwrap() {
                Frame::GoAway { code, reason } => return (code, reason),
                other => panic!("expected GoAway, got {other:?}"),
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected GoAway, got {other:?}"),
        }
    }
}

/// A lane must present the key of a live channel, first thing: otherwise it is refused with a
/// reason and counted, and no channel gains a lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_without_a_valid_key_are_refused() {
    let srv = start_server().await;
    let mut ws = raw_lane(&srv).await;
    ws.send(Message::binary(Frame::Lane { key: "not-a-key".into() }.encode())).await.unwrap();
    let (c, reason) = goaway(&mut ws).await;
    assert_eq!(c, code::UNAUTHORIZED);
    assert!(reason.contains("lane key"), "{reason}");

    let mut ws = raw_lane(&srv).await;
    ws.send(Message::binary(Frame::Fin { stream: 1 }.encode())).await.unwrap();
    let (c, reason) = goaway(&mut ws).await;
    assert_eq!(c, code::PROTOCOL);
    assert!(reason.contains("expected Lane"), "{reason}");

    let st = srv.handle.stats();
    assert_eq!((st.lanes_open, st.refusals_total), (0, 2), "{st:?}");
}

/// A raw channel asking for `lanes` lanes in its upgrade, that has said Hello and got its
/// Welcome.
async fn raw_channel_with_lanes(srv: &TestServer, lanes: &'static str) -> Ws {
    let mut req = srv.url().into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(wstunnel::SUBPROTOCOL));
    req.headers_mut().insert("S4T-Tunnel-Lanes", HeaderValue::from_static(lanes));
    let mut chan = within("raw connect", tokio_tungstenite::connect_async(req)).await.unwrap().0;
    let hello = Frame::Hello { version: s4t_shared::tunnel::frame::PROTOCOL_VERSION, agent: "raw".into() };
    chan.send(Message::binary(hello.encode())).await.unwrap();
    assert!(matches!(next_frame(&mut chan).await, Some(Frame::Welcome { .. })));
    chan
}

/// A channel is offered at most the server's lane limit, and a lane beyond it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_gets_at_most_the_servers_lane_limit() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.max_lanes_per_channel = 2;
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let mut chan = raw_channel_with_lanes(&srv, "9").await;
    // Offered with the first valid token, before its answer.
    let listen = Frame::Listen { listener: 1, port: 0, token: token("b", 0) };
    chan.send(Message::binary(listen.encode())).await.unwrap();
    let frames = [next_frame(&mut chan).await, next_frame(&mut chan).await];
    let [Some(Frame::Lanes { count: 2, key }), Some(Frame::ListenOk { listener: 1, .. })] = frames.clone() else {
        panic!("expected two lanes offered, then the listener: {frames:?}")
    };
    let mut lanes = Vec::new();
    for _ in 0..2 {
        let mut ws = raw_lane(&srv).await;
        ws.send(Message::binary(Frame::Lane { key: key.clone() }.encode())).await.unwrap();
        lanes.push(ws);
    }
    wait_lanes(&srv, 2).await;
    let mut third = raw_lane(&srv).await;
    third.send(Message::binary(Frame::Lane { key }.encode())).await.unwrap();
    let (c, reason) = goaway(&mut third).await;
    assert_eq!(c, code::LIMIT, "{reason}");
    drop(chan);
    wait_lanes(&srv, 0).await;
}

/// A channel is offered its lanes only once it has presented a valid token: a joined lane
/// counts as proved (it escapes the per-source cap on unproved connections and the size limit
/// on their messages), so an anonymous channel must not get a key to join them with. A
/// refused token proves nothing; the first valid one brings the offer, and its lanes join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_are_offered_only_once_the_channel_proves_itself() {
    let srv = start_server().await;
    let mut chan = raw_channel_with_lanes(&srv, "4").await;
    // The next frame is the refusal: no `Lanes` came before it.
    let listen = Frame::Listen { listener: 1, port: 0, token: "guess".into() };
    chan.send(Message::binary(listen.encode())).await.unwrap();
    match next_frame(&mut chan).await {
        Some(Frame::ListenErr { listener: 1, code: c, .. }) => assert_eq!(c, code::UNAUTHORIZED),
        other => panic!("expected ListenErr and no lanes, got {other:?}"),
    }
    let mut guessed = raw_lane(&srv).await;
    guessed.send(Message::binary(Frame::Lane { key: "AAAAAAAAAAAAAAAAAAAAAA".into() }.encode())).await.unwrap();
    assert_eq!(goaway(&mut guessed).await.0, code::UNAUTHORIZED);

    let listen = Frame::Listen { listener: 2, port: 0, token: token("b", 0) };
    chan.send(Message::binary(listen.encode())).await.unwrap();
    let frames = [next_frame(&mut chan).await, next_frame(&mut chan).await];
    let [Some(Frame::Lanes { count: 4, key }), Some(Frame::ListenOk { listener: 2, .. })] = frames.clone() else {
        panic!("expected four lanes offered, then the listener: {frames:?}")
    };
    // A second valid token offers nothing more.
    let listen = Frame::Listen { listener: 3, port: 0, token: token("b", 0) };
    chan.send(Message::binary(listen.encode())).await.unwrap();
    assert!(matches!(next_frame(&mut chan).await, Some(Frame::ListenOk { listener: 3, .. })));
    let mut lane = raw_lane(&srv).await;
    lane.send(Message::binary(Frame::Lane { key }.encode())).await.unwrap();
    wait_lanes(&srv, 1).await;
    let st = srv.handle.stats();
    assert_eq!(st.refusals_total, 2, "the guessed token and the guessed key: {st:?}");
}
