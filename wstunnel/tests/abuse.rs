//! What peers that hold no valid token, or a token of a board that is connected already, can
//! make the server do: not hold connection slots, not take a live board's ports, not flood
//! the log; and a cloud that cannot decide for a while does not make boards drop tunnels.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use s4t_shared::tunnel::frame::{Frame, PROTOCOL_VERSION, code};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use wstunnel::Error;
use wstunnel::packet::{PacketChannel, PacketReceiver, PacketSender};
use wstunnel::server::{DefaultHooks, ListenOn, ListenerInfo, Refusal, ServerHooks};

/// A raw peer that has said Hello and got its Welcome.
async fn hello_channel(srv: &TestServer) -> Ws {
    let mut ws = raw_channel(srv).await;
    ws.send(Message::binary(Frame::Hello { version: PROTOCOL_VERSION, agent: "raw".into() }.encode())).await.unwrap();
    assert!(matches!(next_frame(&mut ws).await, Some(Frame::Welcome { .. })));
    ws
}

async fn send(ws: &mut Ws, f: Frame) {
    ws.send(Message::binary(f.encode())).await.unwrap();
}

async fn goaway(ws: &mut Ws) -> (u16, String) {
    match next_frame(ws).await {
        Some(Frame::GoAway { code: c, reason }) => (c, reason),
        other => panic!("expected GoAway, got {other:?}"),
    }
}

async fn assert_echo(port: u16) {
    let mut s = connect(port).await;
    assert_eq!(echo_once(&mut s, b"still here").await, b"still here");
}

fn short_token_timeout() -> wstunnel::server::ServerConfig {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.token_timeout = Duration::from_millis(300);
    cfg
}

/// A peer that says Hello and nothing else (it answers pings) is closed once the token
/// timeout passes; a board that opened a listener before it stays, on its first channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_valid_token_is_closed_and_a_board_stays() {
    let srv = start_server_with(short_token_timeout(), DefaultHooks::default()).await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    // Opened after the board's channel: its timeout passes after the board's.
    let mut ws = hello_channel(&srv).await;
    let (c, reason) = goaway(&mut ws).await;
    assert_eq!(c, code::UNAUTHORIZED);
    assert!(reason.contains("no valid token"), "{reason}");
    assert!(next_frame(&mut ws).await.is_none(), "the socket closes");
    wait_until("anonymous channel gone", || srv.handle.channel_count() == 1).await;
    assert_eq!(srv.handle.stats().channels_total, 2, "the board never had to reconnect");
    assert!(client.state().borrow().connected);
    assert_eq!(srv.handle.boards(), vec!["b".to_owned()]);
    assert_echo(port).await;
}

/// A client whose only request was refused has nothing left to ask for: the server closes
/// its channel at the token timeout, and it does not dial again (it would every few
/// milliseconds here) until it is asked for something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dials_only_while_it_has_something_to_ask_for() {
    let srv = start_server_with(short_token_timeout(), DefaultHooks::default()).await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let err = within("expose", client.expose("bad".into(), 0, echo.to_string())).await.unwrap_err();
    assert!(matches!(err, Error::Refused { code: code::UNAUTHORIZED, .. }), "{err:?}");
    let mut st = client.state();
    let closed = |s: &wstunnel::client::ClientState| {
        !s.connected && s.last_error.as_deref().is_some_and(|e| e.contains("no valid token"))
    };
    within("closed at the token timeout", st.wait_for(closed)).await.unwrap();
    // Reconnects come 20-200 ms apart in these tests: half a second would see several.
    let redialed = tokio::time::timeout(Duration::from_millis(500), st.wait_for(|s| s.connected)).await;
    assert!(redialed.is_err(), "an idle client dialed again");
    assert_eq!(srv.handle.stats().channels_total, 1);
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    assert_echo(port).await;
}

/// Another channel of the same board (a second process, a leaked token) asking for a port a
/// live channel holds is refused, and the live channel keeps its listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_channel_does_not_take_a_port_from_a_live_one() {
    let srv = start_server().await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    let mut ws = hello_channel(&srv).await;
    send(&mut ws, Frame::Listen { listener: 1, port, token: token("b", port) }).await;
    match next_frame(&mut ws).await {
        Some(Frame::ListenErr { listener: 1, code: c, .. }) => assert_eq!(c, code::IN_USE),
        other => panic!("expected ListenErr, got {other:?}"),
    }
    assert_eq!(srv.handle.listeners(), vec![ListenerInfo { board: "b".into(), port, legacy: false }]);
    let s = client.state().borrow().clone();
    assert_eq!(s.exposures.iter().map(|e| e.port).collect::<Vec<_>>(), vec![Some(port)]);
    assert_eq!(s.last_refusal, None);
    assert_echo(port).await;
}

/// An older channel of the board (one whose request was still with the hooks when the board
/// reconnected) does not take a port back from the newer channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_channel_does_not_take_a_port_from_a_newer_one() {
    let srv = start_server().await;
    let echo = echo_server().await;
    let mut old = hello_channel(&srv).await;
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    send(&mut old, Frame::Listen { listener: 1, port, token: token("b", port) }).await;
    match next_frame(&mut old).await {
        Some(Frame::ListenErr { listener: 1, code: c, .. }) => assert_eq!(c, code::IN_USE),
        other => panic!("expected ListenErr, got {other:?}"),
    }
    assert_eq!(srv.handle.listeners(), vec![ListenerInfo { board: "b".into(), port, legacy: false }]);
    assert_eq!(client.state().borrow().last_refusal, None);
    assert_echo(port).await;
}

/// The board reconnected before the server noticed its old channel died: the old one does
/// not answer the ping, is closed with a reason, and the new channel gets the port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_does_not_answer_gives_its_port_to_its_boards_new_one() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.liveness_probe = Duration::from_millis(200);
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let echo = echo_server().await;
    let mut old = hello_channel(&srv).await;
    send(&mut old, Frame::Listen { listener: 1, port: 0, token: token("b", 0) }).await;
    let port = match next_frame(&mut old).await {
        Some(Frame::ListenOk { listener: 1, port }) => port,
        other => panic!("expected ListenOk, got {other:?}"),
    };
    // From here the old peer reads nothing, so it answers no ping.
    let (client, _stop) = start_client(&srv.url());
    let got = within("expose", client.expose(token("b", port), port, echo.to_string())).await.unwrap();
    assert_eq!(got.port, port);
    assert_echo(port).await;
    let (c, reason) = goaway(&mut old).await;
    assert_eq!(c, code::OTHER);
    assert!(reason.contains("did not answer"), "{reason}");
}

/// Another peer holding a board's VPN token (leaked: it is not bound to the board's secret)
/// cannot take the board's place in the VPN while the board's channel is live: its open is
/// refused, and the board's packet channel keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_channel_does_not_take_a_vpn_from_a_live_one() {
    let srv = start_server_with(config(ListenOn::Addr("127.0.0.1:0".parse().unwrap())), EchoPackets).await;
    let (client, _stop) = start_client(&srv.url());
    let ch = within("open", client.open_packet_channel(vpn_token("b", "vpn-1"), "vpn-1".into())).await.unwrap();
    let PacketChannel { sender, mut receiver } = ch;
    let mut ws = hello_channel(&srv).await;
    send(&mut ws, Frame::PacketOpen { channel: 1, vpn: "vpn-1".into(), token: vpn_token("b", "vpn-1") }).await;
    match next_frame(&mut ws).await {
        Some(Frame::PacketErr { channel: 1, code: c, reason }) => {
            assert_eq!(c, code::IN_USE, "{reason}");
            assert!(reason.contains("vpn-1"), "{reason}");
        }
        other => panic!("expected PacketErr, got {other:?}"),
    }
    sender.send(&[7u8; 40]).await.unwrap();
    assert_eq!(within("echo", receiver.recv()).await.unwrap(), vec![7u8; 40]);
    assert_eq!(srv.handle.stats().packet_channels_open, 1);
    // Once the board has closed its packet channel, the VPN is free to open elsewhere.
    drop((sender, receiver));
    wait_until("closed", || srv.handle.stats().packet_channels_open == 0).await;
    send(&mut ws, Frame::PacketOpen { channel: 2, vpn: "vpn-1".into(), token: vpn_token("b", "vpn-1") }).await;
    assert!(matches!(next_frame(&mut ws).await, Some(Frame::PacketOk { channel: 2 })));
}

/// The board reconnected before the server noticed its old channel died: the old channel
/// does not answer the ping and is closed with a reason, and the new one carries the VPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_does_not_answer_gives_its_vpn_to_its_boards_new_one() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.liveness_probe = Duration::from_millis(200);
    let srv = start_server_with(cfg, EchoPackets).await;
    let mut old = hello_channel(&srv).await;
    send(&mut old, Frame::PacketOpen { channel: 1, vpn: "vpn-1".into(), token: vpn_token("b", "vpn-1") }).await;
    assert!(matches!(next_frame(&mut old).await, Some(Frame::PacketOk { channel: 1 })));
    // From here the old peer reads nothing, so it answers no ping.
    let (client, _stop) = start_client(&srv.url());
    let ch = within("open", client.open_packet_channel(vpn_token("b", "vpn-1"), "vpn-1".into())).await.unwrap();
    ch.sender.send(&[9u8; 40]).await.unwrap();
    let mut receiver = ch.receiver;
    assert_eq!(within("echo", receiver.recv()).await.unwrap(), vec![9u8; 40]);
    let (c, reason) = goaway(&mut old).await;
    assert_eq!(c, code::OTHER);
    assert!(reason.contains("did not answer"), "{reason}");
}

/// A peer sending invalid tokens is closed after a few, with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_guessing_tokens_is_closed() {
    let srv = start_server().await;
    let mut ws = hello_channel(&srv).await;
    for id in 1..=8 {
        send(&mut ws, Frame::Listen { listener: id, port: 0, token: format!("guess-{id}") }).await;
    }
    // The Listens are checked concurrently: the one that makes eight may send the GoAway
    // before the others' refusals, which may still follow it. Then the channel closes.
    let (mut refused, mut goaway) = (0, None);
    while let Some(f) = next_frame(&mut ws).await {
        match f {
            Frame::ListenErr { code: c, .. } => {
                assert_eq!(c, code::UNAUTHORIZED);
                refused += 1;
            }
            Frame::GoAway { code: c, reason } if goaway.is_none() => {
                assert_eq!(c, code::UNAUTHORIZED);
                goaway = Some(reason);
            }
            other => panic!("expected ListenErr or one GoAway, got {other:?}"),
        }
    }
    assert!(refused <= 8, "{refused}");
    let reason = goaway.expect("closed without a GoAway");
    assert!(reason.contains("invalid tokens"), "{reason}");
}

/// Hooks whose database can be down: they can decide nothing then.
struct Flaky {
    down: Arc<AtomicBool>,
}

impl ServerHooks for Flaky {
    fn authorize_listener(&self, _board: &str, _port: u16) -> impl Future<Output = Result<(), Refusal>> + Send {
        let down = self.down.load(Ordering::SeqCst);
        async move { if down { Err(Refusal::Unavailable("database unreachable".into())) } else { Ok(()) } }
    }

    fn packet_channel(
        &self,
        board: &str,
        vpn: &str,
        ch: PacketChannel,
    ) -> impl Future<Output = Result<(), Refusal>> + Send {
        let down = self.down.load(Ordering::SeqCst);
        let echo = EchoPackets.packet_channel(board, vpn, ch);
        async move { if down { Err(Refusal::Unavailable("database unreachable".into())) } else { echo.await } }
    }
}

/// A board behind a cloud whose hooks can be made to answer `UNAVAILABLE` (`down`), holding
/// an exposure of an echo service and a packet channel.
struct FlakyBoard {
    down: Arc<AtomicBool>,
    srv: TestServer,
    echo: std::net::SocketAddr,
    client: wstunnel::client::ClientHandle,
    _stop: tokio_util::sync::CancellationToken,
    kept: wstunnel::client::Exposed,
    vpn: PacketChannel,
}

async fn flaky_board() -> FlakyBoard {
    let down = Arc::new(AtomicBool::new(false));
    let hooks = Flaky { down: down.clone() };
    let srv = start_server_with(config(ListenOn::Addr("127.0.0.1:0".parse().unwrap())), hooks).await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let kept = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap();
    let vpn = within("packets", client.open_packet_channel(vpn_token("b", "vpn-1"), "vpn-1".into())).await.unwrap();
    FlakyBoard { down, srv, echo, client, _stop, kept, vpn }
}

/// Waits until a ping sent on the packet channel comes back (it is re-established).
async fn packets_flow_again(sender: &PacketSender, receiver: &mut PacketReceiver) {
    within("packets back", async {
        loop {
            let _ = sender.send(b"ping").await; // fails while the channel is down
            if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(200), receiver.recv()).await {
                assert_eq!(p, b"ping"[..]);
                return;
            }
        }
    })
    .await;
}

/// While the cloud cannot decide, a new exposure is refused with `UNAVAILABLE`, and an
/// established one is kept and asked for again until the cloud answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_cannot_decide_for_a_while_does_not_take_tunnels_down() {
    let FlakyBoard { down, srv, echo, client, _stop, kept, vpn } = flaky_board().await;
    down.store(true, Ordering::SeqCst);
    let err = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap_err();
    assert!(matches!(err, Error::Refused { code: code::UNAVAILABLE, .. }), "{err:?}");
    let err = within("packets", client.open_packet_channel(vpn_token("b", "vpn-1"), "vpn-1".into())).await.unwrap_err();
    assert!(matches!(err, Error::Refused { code: code::UNAVAILABLE, .. }), "{err:?}");
    // The board reconnects and asks for its port and its VPN again while the database is down.
    assert_eq!(srv.handle.close_board("b"), 1);
    // Two refusals before, one each for the port and the VPN after (more if the board retries).
    wait_until("asked again while down", || srv.handle.stats().refusals_total >= 4).await;
    down.store(false, Ordering::SeqCst);
    wait_until("listener back", || srv.handle.listeners().iter().any(|l| l.port == kept.port)).await;
    let s = client.state().borrow().clone();
    assert_eq!(s.exposures.iter().map(|e| (e.id, e.port)).collect::<Vec<_>>(), vec![(kept.id, Some(kept.port))]);
    assert_echo(kept.port).await;
    // The packet channel the board had is the one carrying packets again.
    let PacketChannel { sender, mut receiver } = vpn;
    packets_flow_again(&sender, &mut receiver).await;
}

/// A request refused with `UNAVAILABLE` is asked for again on the connection that refused it
/// only: once the board has reconnected (and asked for everything on the new connection), the
/// retry would be a second request for an id the server holds there, refused for good, and
/// the board would drop an exposure and a VPN that the server keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_armed_before_a_reconnect_does_not_drop_what_the_reconnect_restored() {
    let FlakyBoard { down, srv, client, _stop, kept, vpn, .. } = flaky_board().await;
    // The board reconnects while the cloud cannot decide: both are refused, and each refusal
    // arms a retry on that connection.
    down.store(true, Ordering::SeqCst);
    assert_eq!(srv.handle.close_board("b"), 1);
    wait_until("both refused", || srv.handle.stats().refusals_total >= 2).await;
    // The cloud is back and the board reconnects again: both are re-established at once.
    down.store(false, Ordering::SeqCst);
    assert_eq!(srv.handle.close_board("b"), 1);
    wait_until("listener back", || srv.handle.listeners().iter().any(|l| l.port == kept.port)).await;
    let PacketChannel { sender, mut receiver } = vpn;
    packets_flow_again(&sender, &mut receiver).await;
    // The retries come due 5 to 10 s after the refusals (the client's jittered
    // `UNAVAILABLE_RETRY`): neither is sent, the connection that refused them is gone.
    let refusals = srv.handle.stats().refusals_total;
    wait_until("both retries due", || client.retries().0 + client.retries().1 >= 2).await;
    assert_eq!(client.retries(), (0, 2), "a retry went to the new connection");
    assert_eq!(srv.handle.stats().refusals_total, refusals);
    let s = client.state().borrow().clone();
    assert_eq!(s.exposures.iter().map(|e| (e.id, e.port)).collect::<Vec<_>>(), vec![(kept.id, Some(kept.port))]);
    assert_eq!(s.last_refusal, None);
    assert_eq!(srv.handle.listeners(), vec![ListenerInfo { board: "b".into(), port: kept.port, legacy: false }]);
    assert_echo(kept.port).await;
    assert_eq!(client.packet_channels(), 1);
    sender.send(b"still").await.unwrap();
    assert_eq!(within("echo", receiver.recv()).await.unwrap(), b"still"[..]);
}

/// A token for a server-assigned port (port 0) may ask again for a port the server assigns
/// (a reconnect keeps its port: tunnel.rs, `the_client_reconnects_after_the_server_restarts…`),
/// but not for a port of its choosing elsewhere on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_an_assigned_port_cannot_pick_any_port() {
    let srv = start_server().await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let assigned = within("expose", client.expose(token("board-a", 0), 0, echo.to_string())).await.unwrap();
    let err = within("expose", client.expose(token("board-a", 0), 1, echo.to_string())).await.unwrap_err();
    assert!(err.to_string().contains("server-assigned"), "{err}");
    assert!(srv.handle.listeners().iter().all(|l| l.port != 1), "port 1 was bound");
    assert_eq!(srv.handle.listeners().len(), 1, "the assigned one stays");
    assert_ne!(assigned.port, 1);
}

/// One source may hold only so many connections that have not proved themselves: beyond,
/// its new ones are dropped at accept, so it cannot take every slot of the server before the
/// token timeout. A connection that proves itself (a board's first valid token) stops
/// counting, and a closed one frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holds_only_so_many_unproved_connections() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.max_unproved_per_source = 2;
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let echo = echo_server().await;
    // A board proves itself: it does not count.
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    let first = hello_channel(&srv).await;
    let _second = hello_channel(&srv).await;
    // The third is dropped before its upgrade.
    assert!(within("third connect", try_raw_channel(&srv)).await.is_err(), "a third unproved connection");
    // A closed one frees its place.
    drop(first);
    within("a place again", async {
        loop {
            if try_raw_channel(&srv).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_echo(port).await;
}

/// What a full-sized data frame announces: the most the server takes in one message.
const FULL_FRAME: u64 = 256 * 1024;

/// The header of a masked binary WebSocket frame announcing `len` payload bytes, and a few of
/// them: what a peer sends to make the server set room aside for a whole large message.
fn large_frame_start(len: u64) -> Vec<u8> {
    let mut f = vec![0x82, 0x80 | 127];
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[1, 2, 3, 4]);
    f.extend_from_slice(&[0x5a; 4096]);
    f
}

/// Writes `bytes` on the raw socket under the WebSocket, as they are.
async fn write_raw(ws: &mut Ws, bytes: &[u8]) {
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_mut() else { panic!("plain TCP") };
    tcp.write_all(bytes).await.unwrap();
}

/// The server closes `ws` with a protocol error about a message too large before proof.
async fn assert_closed_as_too_large(ws: &mut Ws, what: &str) {
    let (c, reason) = goaway(ws).await;
    assert_eq!(c, code::PROTOCOL, "{what}: {reason}");
    assert!(reason.contains("before the connection proved itself"), "{what}: {reason}");
    assert!(next_frame(ws).await.is_none(), "{what}: the socket closes");
}

/// Before a connection has proved itself (a channel before its first valid token, a lane
/// before its key), a frame announcing more than a small limit closes it at its header: the
/// server neither sets the announced 256 KiB aside nor waits for them (each of these peers
/// sent 4 KiB, and gets its answer without sending more). Once proved, a channel sends
/// large messages as before, and a board's tunnels carry bulk data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unproved_connections_cannot_send_large_messages() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    // Without the size limit, these peers would be closed only for want of a token: a failure
    // then takes seconds, not a minute (with it, each is closed within milliseconds).
    (cfg.limits.handshake_timeout, cfg.limits.token_timeout) = (Duration::from_secs(5), Duration::from_secs(5));
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    const N: usize = 32;
    let mut peers = Vec::new();
    for _ in 0..N {
        let mut ws = hello_channel(&srv).await;
        write_raw(&mut ws, &large_frame_start(FULL_FRAME)).await;
        peers.push(ws);
    }
    for (i, ws) in peers.iter_mut().enumerate() {
        assert_closed_as_too_large(ws, &format!("channel {i} after Hello")).await;
    }
    wait_until("channels gone", || srv.handle.channel_count() == 0).await;
    // In place of Hello, and on a lane in place of its key.
    let mut ws = raw_channel(&srv).await;
    write_raw(&mut ws, &large_frame_start(FULL_FRAME)).await;
    assert_closed_as_too_large(&mut ws, "channel before Hello").await;
    let mut ws = raw_lane(&srv).await;
    write_raw(&mut ws, &large_frame_start(FULL_FRAME)).await;
    assert_closed_as_too_large(&mut ws, "lane before its key").await;
    // A whole message over the limit too: a 60 KiB packet (for no packet channel).
    let packet = Frame::Packet { channel: 1, payload: vec![7u8; 60 * 1024].into() };
    let mut ws = hello_channel(&srv).await;
    send(&mut ws, packet.clone()).await;
    assert_closed_as_too_large(&mut ws, "a packet before any token").await;

    // Proved by a valid token, the same packet is taken (and ignored), and the channel goes on.
    let mut ws = hello_channel(&srv).await;
    send(&mut ws, Frame::Listen { listener: 1, port: 0, token: token("b", 0) }).await;
    assert!(matches!(next_frame(&mut ws).await, Some(Frame::ListenOk { listener: 1, .. })));
    send(&mut ws, packet).await;
    send(&mut ws, Frame::Listen { listener: 2, port: 0, token: token("b", 0) }).await;
    assert!(matches!(next_frame(&mut ws).await, Some(Frame::ListenOk { listener: 2, .. })));
    // A board's channel and lane carry full-sized data frames both ways.
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("c", 0), 0, echo.to_string())).await.unwrap().port;
    echo_checksummed(port, 4 << 20).await;
    assert_eq!(srv.handle.stats().refusals_total, 1, "the lane's, and nothing of the board's");
}

/// A raw lane (subprotocol `s4t-tunnel-lane`), nothing sent yet.
async fn raw_lane(srv: &TestServer) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut req = srv.url().into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("s4t-tunnel-lane"));
    within("raw connect", tokio_tungstenite::connect_async(req)).await.unwrap().0
}

/// A wstun socket (`?<query>`, subprotocol `tunnel-protocol`).
async fn wstun_socket(srv: &TestServer, query: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut req = format!("ws://{}/?{query}", srv.addr).into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("tunnel-protocol"));
    within("wstun connect", tokio_tungstenite::connect_async(req)).await.unwrap().0
}

/// The server ends `ws` (a close frame, an error or the end of the stream) without waiting
/// for more of what it announced.
async fn assert_ended(ws: &mut Ws, what: &str) {
    use futures_util::StreamExt;
    loop {
        match within(what, ws.next()).await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_)) | Err(_)) | None => return,
            Some(Ok(other)) => panic!("{what}: {other:?}"),
        }
    }
}

/// A wstun (legacy) socket is refused a frame over its limit at the header: a control socket
/// (on which a board sends nothing but pongs) anything over 16 KiB, a data socket anything over
/// 1 MiB, which tungstenite would otherwise set aside whole up to 16 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_sockets_refuse_large_frames_at_their_header() {
    use futures_util::StreamExt;
    // wstun makes its client choose the public port: one that is free now.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.legacy = true;
    // No ping may end the reads below: only the server closing the sockets.
    cfg.limits.ping_interval = Duration::from_secs(600);
    let srv = start_server_with(cfg, DefaultHooks { legacy_ports: Some(port..=port) }).await;
    let mut control = wstun_socket(&srv, &format!("dst=127.0.0.1:{port}")).await;
    wait_until("listener up", || !srv.handle.listeners().is_empty()).await;
    // A user connects: the control socket announces it, and the board opens its data socket.
    let _user = connect(port).await;
    let id = match within("NC frame", control.next()).await.unwrap().unwrap() {
        Message::Text(t) => t.as_str().strip_prefix("NC:").expect("NC:<id>").to_owned(),
        other => panic!("expected NC:<id>, got {other:?}"),
    };
    let mut data = wstun_socket(&srv, &format!("id={id}")).await;
    write_raw(&mut data, &large_frame_start(2 << 20)).await;
    assert_ended(&mut data, "data socket after a 2 MiB header").await;
    write_raw(&mut control, &large_frame_start(64 * 1024)).await;
    assert_ended(&mut control, "control socket after a 64 KiB header").await;
    wait_until("listener closed", || srv.handle.listeners().is_empty()).await;
}

/// Hooks whose `authorize_listener` answers (yes) only as the test lets it, one request per
/// permit added to `gate`; they count the requests that reached it and the listeners opened.
#[derive(Clone)]
struct HeldListeners {
    gate: Arc<tokio::sync::Semaphore>,
    entered: Arc<AtomicUsize>,
    opened: Arc<AtomicUsize>,
}

impl Default for HeldListeners {
    fn default() -> Self {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        HeldListeners { gate, entered: Arc::default(), opened: Arc::default() }
    }
}

impl ServerHooks for HeldListeners {
    async fn authorize_listener(&self, _board: &str, _port: u16) -> Result<(), Refusal> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        self.gate.acquire().await.unwrap().forget();
        Ok(())
    }

    fn listener_opened(&self, _board: &str, _port: u16, _legacy: bool) {
        self.opened.fetch_add(1, Ordering::SeqCst);
    }
}

/// Returns once the server has read everything sent on `ws` so far: its reader answers a
/// ping after the frames before it.
async fn read_so_far(ws: &mut Ws) {
    use futures_util::StreamExt;
    ws.send(Message::Ping(bytes::Bytes::from_static(b"so far"))).await.unwrap();
    loop {
        match within("pong", ws.next()).await {
            Some(Ok(Message::Pong(p))) if &p[..] == b"so far" => return,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected Pong, got {other:?}"),
        }
    }
}

/// A channel that asked for listener 1 and withdrew it (`Unlisten` sent) while the server's
/// hooks still hold the request.
async fn listen_then_withdraw() -> (HeldListeners, TestServer, Ws) {
    let hooks = HeldListeners::default();
    let srv = start_server_with(config(ListenOn::Addr("127.0.0.1:0".parse().unwrap())), hooks.clone()).await;
    let mut ws = hello_channel(&srv).await;
    send(&mut ws, Frame::Listen { listener: 1, port: 0, token: token("b", 0) }).await;
    wait_until("with the hooks", || hooks.entered.load(Ordering::SeqCst) == 1).await;
    send(&mut ws, Frame::Unlisten { listener: 1 }).await;
    (hooks, srv, ws)
}

/// A `Listen` the board withdraws (`Unlisten`) while the server is still processing it (here
/// while the hooks decide) binds nothing: it is answered with code `NORMAL`, which the board
/// ignores, and no port is left bound until the channel dies. The id can be used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_withdrawn_while_in_flight_binds_nothing() {
    let (hooks, srv, mut ws) = listen_then_withdraw().await;
    read_so_far(&mut ws).await;
    hooks.gate.add_permits(1);
    match next_frame(&mut ws).await {
        Some(Frame::ListenErr { listener: 1, code: c, reason }) => assert_eq!(c, code::NORMAL, "{reason}"),
        other => panic!("expected the withdrawn Listen's answer, got {other:?}"),
    }
    assert_eq!(srv.handle.listeners(), vec![]);
    assert_eq!(hooks.opened.load(Ordering::SeqCst), 0, "a port was bound");
    assert_eq!(srv.handle.stats().refusals_total, 0, "a withdrawal is no refusal");

    send(&mut ws, Frame::Listen { listener: 1, port: 0, token: token("b", 0) }).await;
    hooks.gate.add_permits(1);
    let port = match next_frame(&mut ws).await {
        Some(Frame::ListenOk { listener: 1, port }) => port,
        other => panic!("expected ListenOk, got {other:?}"),
    };
    assert_eq!(srv.handle.listeners(), vec![ListenerInfo { board: "b".into(), port, legacy: false }]);
}

/// `Listen`, `Unlisten`, `Listen` with one id, the first still in flight: one listener results,
/// the one the channel holds under that id (an orphan would stay bound until the channel dies,
/// outside the channel's listener limit). A `Listen` for an id still in flight is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_id_withdrawn_and_asked_for_again_holds_one_listener() {
    let (hooks, srv, mut ws) = listen_then_withdraw().await;
    send(&mut ws, Frame::Listen { listener: 1, port: 0, token: token("b", 0) }).await;
    wait_until("both with the hooks", || hooks.entered.load(Ordering::SeqCst) == 2).await;
    send(&mut ws, Frame::Listen { listener: 1, port: 0, token: token("b", 0) }).await;
    match next_frame(&mut ws).await {
        Some(Frame::ListenErr { listener: 1, code: c, reason }) => {
            assert_eq!(c, code::PROTOCOL);
            assert!(reason.contains("already in use"), "{reason}");
        }
        other => panic!("expected the third Listen refused, got {other:?}"),
    }
    hooks.gate.add_permits(2);
    let (mut withdrawn, mut ports) = (0, Vec::new());
    for _ in 0..2 {
        match next_frame(&mut ws).await {
            Some(Frame::ListenErr { listener: 1, code: code::NORMAL, .. }) => withdrawn += 1,
            Some(Frame::ListenOk { listener: 1, port }) => ports.push(port),
            other => panic!("expected ListenOk or the withdrawn Listen's answer, got {other:?}"),
        }
    }
    assert_eq!((withdrawn, ports.len()), (1, 1), "{ports:?}");
    assert_eq!(srv.handle.listeners(), vec![ListenerInfo { board: "b".into(), port: ports[0], legacy: false }]);
    assert_eq!(hooks.opened.load(Ordering::SeqCst), 1);
    // Withdrawn, it goes.
    send(&mut ws, Frame::Unlisten { listener: 1 }).await;
    wait_until("closed", || srv.handle.listeners().is_empty()).await;
}

/// Refuses the tokens of board `old` (as the cloud refuses tokens minted before a
/// rotate-secret), accepts the others.
struct RefusesOld;

impl ServerHooks for RefusesOld {
    async fn token_accepted(&self, board: &str, _expiry: u64) -> Result<(), Refusal> {
        if board == "old" { Err(Refusal::Denied("token too old".into())) } else { Ok(()) }
    }
}

/// A genuinely signed token the cloud no longer honours makes the channel no board's: it is
/// not listed as the board's (nor revoked with it), and a valid token of another board is
/// taken. One channel still serves one board.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_cloud_refuses_does_not_make_the_channel_its_boards() {
    let srv = start_server_with(config(ListenOn::Addr("127.0.0.1:0".parse().unwrap())), RefusesOld).await;
    let mut ws = hello_channel(&srv).await;
    send(&mut ws, Frame::Listen { listener: 1, port: 0, token: token("old", 0) }).await;
    match next_frame(&mut ws).await {
        Some(Frame::ListenErr { listener: 1, code: c, reason }) => {
            assert_eq!(c, code::UNAUTHORIZED);
            assert_eq!(reason, "token too old");
        }
        other => panic!("expected ListenErr, got {other:?}"),
    }
    assert_eq!(srv.handle.boards(), Vec::<String>::new());
    assert_eq!(srv.handle.board_channels(), vec![]);
    assert_eq!(srv.handle.close_board("old"), 0);

    send(&mut ws, Frame::Listen { listener: 2, port: 0, token: token("b", 0) }).await;
    assert!(matches!(next_frame(&mut ws).await, Some(Frame::ListenOk { listener: 2, .. })));
    assert_eq!(srv.handle.boards(), vec!["b".to_owned()]);
    send(&mut ws, Frame::Listen { listener: 3, port: 0, token: token("c", 0) }).await;
    match next_frame(&mut ws).await {
        Some(Frame::ListenErr { listener: 3, code: c, reason }) => {
            assert_eq!(c, code::UNAUTHORIZED);
            assert!(reason.contains("belongs to b"), "{reason}");
        }
        other => panic!("expected ListenErr, got {other:?}"),
    }
}

/// A stand-in for the tunnel server, for what a real one rarely says: accepts the board's next
/// connection on `listener` (choosing `s4t-tunnel`, as an older server does) and answers its
/// `Hello`.
async fn accept_board(listener: &tokio::net::TcpListener) -> Ws {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    #[allow(clippy::result_large_err, reason = "the signature tungstenite's callback has")]
    fn choose(_: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
        response.headers_mut().insert("Sec-WebSocket-Protocol", "s4t-tunnel".parse().unwrap());
        Ok(response)
    }
    let (tcp, _) = within("the board connects", listener.accept()).await.unwrap();
    let plain = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    let mut ws = within("upgrade", tokio_tungstenite::accept_hdr_async(plain, choose)).await.unwrap();
    assert!(matches!(next_frame(&mut ws).await, Some(Frame::Hello { .. })));
    let welcome = Frame::Welcome { version: PROTOCOL_VERSION, initial_window: 256 * 1024 };
    ws.send(Message::binary(welcome.encode())).await.unwrap();
    ws
}

/// The next `Listen` the board sends: its listener id and port.
async fn next_listen(ws: &mut Ws) -> (u32, u16) {
    loop {
        match next_frame(ws).await {
            Some(Frame::Listen { listener, port, .. }) => return (listener, port),
            Some(_) => continue,
            None => panic!("closed before a Listen"),
        }
    }
}

/// An exposure that worked before is kept when the server refuses it again for a passing
/// reason: `SHUTDOWN` (that channel was closing; the reconnect asks again) or `OTHER` (its
/// port could not be bound now, say the server was out of descriptors; asked again after a
/// delay on that connection). The board dropped it for good, and with it its service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposure_refused_again_for_a_passing_reason_is_kept() {
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (client, _stop) = start_client(&format!("ws://{}/", fake.local_addr().unwrap()));
    let expose = tokio::spawn({
        let client = client.clone();
        async move { client.expose(token("b", 0), 0, "127.0.0.1:9".into()).await }
    });
    let mut ws = accept_board(&fake).await;
    let (id, asked) = next_listen(&mut ws).await;
    assert_eq!(asked, 0);
    ws.send(Message::binary(Frame::ListenOk { listener: id, port: 40_000 }.encode())).await.unwrap();
    assert_eq!(within("exposed", expose).await.unwrap().unwrap().port, 40_000);
    let refuse =
        |code, reason: &str| Message::binary(Frame::ListenErr { listener: id, code, reason: reason.into() }.encode());

    // The server goes away; at the reconnect, that channel is closing as it answers.
    drop(ws);
    let mut ws = accept_board(&fake).await;
    assert_eq!(next_listen(&mut ws).await, (id, 40_000));
    ws.send(refuse(code::SHUTDOWN, "the channel is closing")).await.unwrap();
    drop(ws);
    let mut ws = accept_board(&fake).await;
    assert_eq!(next_listen(&mut ws).await, (id, 40_000), "dropped after SHUTDOWN");
    // The port cannot be bound now: asked again on the same connection.
    ws.send(refuse(code::OTHER, "cannot listen on port 40000: Too many open files")).await.unwrap();
    assert_eq!(next_listen(&mut ws).await, (id, 40_000), "dropped after OTHER");
    ws.send(Message::binary(Frame::ListenOk { listener: id, port: 40_000 }.encode())).await.unwrap();
    let held = || client.state().borrow().exposures.iter().map(|e| (e.id, e.port)).collect::<Vec<_>>();
    wait_until("re-established", || held() == vec![(id, Some(40_000))]).await;
    assert_eq!(client.state().borrow().last_refusal, None);
}

/// Whether a new connection from `source` to public `port` is served (echoed), or closed.
async fn served_from(source: &str, port: u16) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncReadExt;
    let mut s = connect_from(source, port).await;
    s.write_all(b"ping").await.ok()?;
    let mut back = [0u8; 4];
    within("echo", s.read_exact(&mut back)).await.ok()?;
    assert_eq!(&back, b"ping");
    Some(s)
}

/// Public ports take only so many connections from one source, all ports together, and so
/// many in all: beyond, a new one is closed at once (its board never hears of it), while
/// another source is still served; a closed connection gives its place back. Without these
/// an anonymous peer could hold a descriptor per connection until the process had none left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ports_hold_only_so_many_connections_per_source_and_in_all() {
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.limits.max_public_per_source = 4;
    cfg.limits.max_public_streams = 6;
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let echo = echo_server().await;
    let (client, _stop) = start_client(&srv.url());
    let a = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    let b = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    let mut held = Vec::new();
    for port in [a, a, b, b] {
        held.push(served_from("127.0.0.1", port).await.expect("a connection within the source's limit"));
    }
    for port in [a, b] {
        assert_closed_at_once(&mut connect(port).await, "a fifth connection from 127.0.0.1").await;
    }
    held.push(served_from("127.0.0.2", a).await.expect("another source is served"));
    held.push(served_from("127.0.0.3", b).await.expect("the sixth connection of the server"));
    assert_closed_at_once(&mut connect_from("127.0.0.4", a).await, "a seventh connection of the server").await;
    assert_eq!(srv.handle.stats().public_refusals_total, 3, "the operator's count of refusals");
    // A closed connection gives its place back (once its stream has ended).
    drop(held.remove(0));
    within("a place again", async {
        while served_from("127.0.0.4", a).await.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
