//! Channel-level behaviour: TLS, packet channels, malformed input and version mismatch from a
//! raw peer, and isolation between boards.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use s4t_shared::tunnel::frame::{Frame, PROTOCOL_VERSION, code};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use wstunnel::client::{self, ClientConfig};
use wstunnel::packet::PacketChannel;
use wstunnel::server::{DefaultHooks, ListenOn, Refusal, ServerHooks};

/// A raw peer speaking our subprotocol by hand (tungstenite does the WebSocket part).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_mismatch_gets_an_actionable_goaway() {
    let srv = start_server().await;
    let mut ws = raw_channel(&srv).await;
    let hello = Frame::Hello { version: PROTOCOL_VERSION + 1, agent: "future".into() };
    ws.send(Message::binary(hello.encode())).await.unwrap();
    match next_frame(&mut ws).await {
        Some(Frame::GoAway { code: c, reason }) => {
            assert_eq!(c, code::VERSION);
            assert!(reason.contains("upgrade"), "{reason}");
        }
        other => panic!("expected GoAway, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_that_boards_channel() {
    let srv = start_server().await;
    let echo = echo_server().await;
    // Board A, a well-behaved client with a working tunnel.
    let (client, _stop) = start_client(&srv.url());
    let port = within("expose", client.expose(token("a", 0), 0, echo.to_string())).await.unwrap().port;
    // Board B, a raw peer that sends garbage after a proper Hello.
    for garbage in [vec![0x99u8, 0, 0, 0, 1], vec![0x21, 0, 0], vec![0x10, 0, 0, 0, 1, 0xff]] {
        let mut ws = raw_channel(&srv).await;
        let hello = Frame::Hello { version: PROTOCOL_VERSION, agent: "raw".into() };
        ws.send(Message::binary(hello.encode())).await.unwrap();
        assert!(matches!(next_frame(&mut ws).await, Some(Frame::Welcome { .. })));
        ws.send(Message::binary(garbage)).await.unwrap();
        match next_frame(&mut ws).await {
            Some(Frame::GoAway { code: c, reason }) => {
                assert_eq!(c, code::PROTOCOL);
                assert!(reason.contains("malformed"), "{reason}");
            }
            other => panic!("expected GoAway, got {other:?}"),
        }
        // Text on the channel is refused the same way.
    }
    let mut s = connect(port).await;
    assert_eq!(echo_once(&mut s, b"A is unaffected").await, b"A is unaffected");
    assert_eq!(srv.handle.boards(), vec!["a".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_for_unknown_streams_is_ignored() {
    let srv = start_server().await;
    let mut ws = raw_channel(&srv).await;
    ws.send(Message::binary(Frame::Hello { version: PROTOCOL_VERSION, agent: "raw".into() }.encode())).await.unwrap();
    assert!(matches!(next_frame(&mut ws).await, Some(Frame::Welcome { .. })));
    for f in [
        Frame::Data { stream: 42, payload: Bytes::from_static(b"x") },
        Frame::Window { stream: 42, increment: 5 },
        Frame::Fin { stream: 42 },
        Frame::Reset { stream: 42, code: 0 },
    ] {
        ws.send(Message::binary(f.encode())).await.unwrap();
    }
    // The channel still answers: a listener request with a bad token gets its refusal.
    ws.send(Message::binary(Frame::Listen { listener: 1, port: 0, token: "x".into() }.encode())).await.unwrap();
    assert!(matches!(next_frame(&mut ws).await, Some(Frame::ListenErr { listener: 1, .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_over_wss_with_a_verified_certificate() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let mut cfg = config(ListenOn::Addr("127.0.0.1:0".parse().unwrap()));
    cfg.tls = Some(wstunnel::tls::server_config_der(vec![cert.clone()], key).unwrap());
    let srv = start_server_with(cfg, DefaultHooks::default()).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut ccfg = client_config(&format!("wss://localhost:{}/", srv.addr.port()));
    ccfg.tls = Some(wstunnel::tls::client_config_with_roots(roots).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let c = client::start(ccfg, stop.clone()).unwrap();
    let echo = echo_server().await;
    let port = within("expose", c.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
    let mut s = connect(port).await;
    let msg = vec![7u8; 300_000];
    assert_eq!(echo_once(&mut s, &msg).await, msg);

    // A client that does not trust the certificate never connects.
    let mut bad = ClientConfig::new(format!("wss://localhost:{}/", srv.addr.port()));
    bad.tls = Some(wstunnel::tls::client_config_with_roots(rustls::RootCertStore::empty()).unwrap());
    let b = client::start(bad, stop.clone()).unwrap();
    // A client dials once it has something to ask for.
    let b2 = b.clone();
    tokio::spawn(async move { b2.expose(token("b", 0), 0, echo.to_string()).await });
    let mut st = b.state();
    let s = within("tls failure", st.wait_for(|s| s.last_error.is_some())).await.unwrap().clone();
    assert!(!s.connected && s.last_error.unwrap().contains("TLS"));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_channels_carry_whole_packets_and_need_a_vpn_token() {
    let srv = start_server_with(config(ListenOn::Addr("127.0.0.1:0".parse().unwrap())), EchoPackets).await;
    let (client, _stop) = start_client(&srv.url());
    let ch = within("open", client.open_packet_channel(vpn_token("b", "vpn-1"), "vpn-1".into())).await.unwrap();
    let PacketChannel { sender, mut receiver } = ch;
    let frame = s4t_shared::gre::encapsulate(&[0xffu8; 60]);
    for len in [1usize, 64, 1500, 9000] {
        let pkt: Vec<u8> = (0..len).map(|i| i as u8).collect();
        sender.send(&pkt).await.unwrap();
        assert_eq!(within("echoed packet", receiver.recv()).await.unwrap(), pkt);
    }
    sender.send(&frame).await.unwrap();
    let back = within("gre", receiver.recv()).await.unwrap();
    assert_eq!(s4t_shared::gre::decapsulate(&back).unwrap(), &[0xffu8; 60][..]);
    // A listener token, a token for another VPN, and a VPN the cloud refuses.
    let e = within("open", client.open_packet_channel(token("b", 0), "vpn-1".into())).await.unwrap_err();
    assert!(e.to_string().contains("VPN"), "{e}");
    let e = within("open", client.open_packet_channel(vpn_token("b", "vpn-2"), "vpn-1".into())).await.unwrap_err();
    assert!(e.to_string().contains("VPN"), "{e}");
    let e = within("open", client.open_packet_channel(vpn_token("b", "vpn-9"), "vpn-9".into())).await.unwrap_err();
    assert!(e.to_string().contains("no such VPN"), "{e}");
}

/// Echoes packets like [`EchoPackets`], counting the channels its hook took (`taken`) and those
/// whose receiver has not ended yet (`live`); a request waits at `token_gate` (its token being
/// checked) and `hook_gate` (the hook deciding) until they have permits.
struct GatedEcho {
    token_gate: Arc<Semaphore>,
    hook_gate: Arc<Semaphore>,
    asked: Arc<AtomicUsize>,
    taken: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
}

impl GatedEcho {
    fn new(token_permits: usize, hook_permits: usize) -> GatedEcho {
        GatedEcho {
            token_gate: Arc::new(Semaphore::new(token_permits)),
            hook_gate: Arc::new(Semaphore::new(hook_permits)),
            asked: Arc::default(),
            taken: Arc::default(),
            live: Arc::default(),
        }
    }

    fn handles(&self) -> GatedEcho {
        GatedEcho {
            token_gate: self.token_gate.clone(),
            hook_gate: self.hook_gate.clone(),
            asked: self.asked.clone(),
            taken: self.taken.clone(),
            live: self.live.clone(),
        }
    }
}

impl ServerHooks for GatedEcho {
    async fn token_accepted(&self, _board: &str, _expiry: u64) -> Result<(), Refusal> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        drop(self.token_gate.acquire().await.unwrap());
        Ok(())
    }

    async fn packet_channel(&self, _board: &str, _vpn: &str, ch: PacketChannel) -> Result<(), Refusal> {
        drop(self.hook_gate.acquire().await.unwrap());
        self.taken.fetch_add(1, Ordering::SeqCst);
        self.live.fetch_add(1, Ordering::SeqCst);
        let live = self.live.clone();
        let PacketChannel { sender, mut receiver } = ch;
        tokio::spawn(async move {
            while let Some(p) = receiver.recv().await {
                let _ = sender.send(&p).await;
            }
            live.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(())
    }
}

/// A packet channel the board drops is closed on both ends: the client forgets it and the
/// server drops its end (the hook's receiver ends) and makes room for the next one, so a board
/// can join and leave VPNs for ever on one channel (the server allows 8 packet channels on
/// one). The channel closes when its last handle goes, whichever that is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_packet_channels_are_closed_on_both_ends() {
    let hooks = GatedEcho::new(1, 1);
    let h = hooks.handles();
    let srv = start_server_with(config(ListenOn::Addr("127.0.0.1:0".parse().unwrap())), hooks).await;
    let (client, _stop) = start_client(&srv.url());
    for i in 0..12u8 {
        let ch = within("open", client.open_packet_channel(vpn_token("b", "vpn-1"), "vpn-1".into())).await;
        let PacketChannel { sender, mut receiver } = ch.unwrap_or_else(|e| panic!("open {i}: {e}"));
        sender.send(&[i; 40]).await.unwrap();
        assert_eq!(within("echo", receiver.recv()).await.unwrap(), vec![i; 40]);
        assert_eq!(srv.handle.stats().packet_channels_open, 1);
        assert_eq!(client.packet_channels(), 1);
        // Either half may go first; a sender clone alone keeps the channel.
        let kept = sender.clone();
        if i % 2 == 0 {
            drop(sender);
            drop(receiver);
        } else {
            drop(receiver);
            drop(sender);
        }
        assert_eq!(client.packet_channels(), 1, "a sender is left");
        assert!(kept.is_connected());
        drop(kept);
        assert_eq!(client.packet_channels(), 0);
        wait_until("server closed it", || srv.handle.stats().packet_channels_open == 0).await;
    }
    wait_until("hook's receivers ended", || h.live.load(Ordering::SeqCst) == 0).await;
    assert_eq!(h.taken.load(Ordering::SeqCst), 12);
    assert_eq!(srv.handle.stats().refusals_total, 0);
}

/// An open whose future is dropped (the caller's timeout) leaves nothing behind, whether the
/// server had it already (its hook deciding) or not yet (its token being checked: the server
/// opens it after the board gave up, and the board's answer to its `PacketOk` closes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_packet_channel_open_leaves_nothing_behind() {
    let hooks = GatedEcho::new(1, 0);
    let h = hooks.handles();
    let srv = start_server_with(config(ListenOn::Addr("127.0.0.1:0".parse().unwrap())), hooks).await;
    let (client, _stop) = start_client(&srv.url());
    let open = || client.open_packet_channel(vpn_token("b", "vpn-1"), "vpn-1".into());

    // The server holds it while its hook decides; the board gives up.
    let gave_up = async {
        tokio::select! {
            r = open() => panic!("answered: {r:?}"),
            () = wait_until("server has it", || srv.handle.stats().packet_channels_open == 1) => {}
        }
    };
    within("give up", gave_up).await;
    assert_eq!(client.packet_channels(), 0);
    wait_until("server dropped it", || srv.handle.stats().packet_channels_open == 0).await;
    h.hook_gate.add_permits(1);
    wait_until("hook answered", || h.taken.load(Ordering::SeqCst) == 1).await;
    wait_until("hook's receiver ended", || h.live.load(Ordering::SeqCst) == 0).await;
    assert_eq!(srv.handle.stats().packet_channels_open, 0);

    // The server has not got it yet (the token is being checked) when the board gives up.
    h.token_gate.forget_permits(1);
    let asked = h.asked.load(Ordering::SeqCst);
    let gave_up = async {
        tokio::select! {
            r = open() => panic!("answered: {r:?}"),
            () = wait_until("token asked", || h.asked.load(Ordering::SeqCst) == asked + 1) => {}
        }
    };
    within("give up", gave_up).await;
    assert_eq!(client.packet_channels(), 0);
    h.token_gate.add_permits(1);
    wait_until("hook answered", || h.taken.load(Ordering::SeqCst) == 2).await;
    wait_until("server dropped it", || srv.handle.stats().packet_channels_open == 0).await;
    wait_until("hook's receiver ended", || h.live.load(Ordering::SeqCst) == 0).await;

    // Nothing is re-opened after a reconnect, and the channel still opens packet channels.
    assert_eq!(srv.handle.close_board("b"), 1);
    let ch = within("open", open()).await.unwrap();
    let PacketChannel { sender, mut receiver } = ch;
    sender.send(b"still works").await.unwrap();
    assert_eq!(&within("echo", receiver.recv()).await.unwrap()[..], b"still works");
    assert_eq!((client.packet_channels(), h.taken.load(Ordering::SeqCst)), (1, 3));
    assert_eq!(srv.handle.stats().packet_channels_open, 1);
}
