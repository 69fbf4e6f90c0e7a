//! Our client against our router, in process, over real WebSockets on 127.0.0.1:0.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use s4t_wamp::{CloseReason, Error, Payload, RouterConfig, Serializer, WampError, connect};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn calls_both_ways_with_every_serializer() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    agent
        .register("agent.stack4things.connection", |inv| async move {
            // The router tells the agent who calls: the board cannot lie about its identity.
            Ok(Payload::args(vec![json!({
                "caller": inv.caller(), "authid": inv.caller_authid(), "role": inv.caller_authrole(),
                "kwargs": inv.kwargs,
            })]))
        })
        .await
        .unwrap();
    for serializer in Serializer::ALL {
        let board = within("board connects", connect(&r.board(serializer))).await.unwrap();
        assert_eq!(board.authrole(), "board");
        let ping = format!("iotronic.{}.{BOARD}.DevicePing", board.id());
        board.register(&ping, |inv| async move { Ok(Payload::new(inv.args, inv.kwargs)) }).await.unwrap();
        let blob = s4t_shared::wamp::codec::binary_to_json(&[0, 159, 255]);
        let out = agent.call(&ping, vec![json!({"uuid": "r1"}), json!(blob)], kw(json!({"k": 1})), T).await.unwrap();
        assert_eq!(out.args, vec![json!({"uuid": "r1"}), json!(blob)], "{serializer:?}");
        assert_eq!(out.kwargs, kw(json!({"k": 1})));
        let reply = board
            .call("agent.stack4things.connection", vec![], kw(json!({"uuid": BOARD, "session": board.id()})), T)
            .await
            .unwrap();
        let seen = &reply.args[0];
        assert_eq!(seen["caller"], json!(board.id()));
        assert_eq!(seen["authid"], json!(BOARD));
        assert_eq!(seen["role"], json!("board"));
        board.leave().await;
    }
}

#[tokio::test]
async fn pubsub_and_session_meta_api() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let mut joins = agent.subscribe("wamp.session.on_join", 16).await.unwrap();
    let mut leaves = agent.subscribe("wamp.session.on_leave", 16).await.unwrap();
    let topic = format!("board.{BOARD}.gpio");
    let mut gpio = agent.subscribe(&topic, 16).await.unwrap();

    let board = connect(&r.board(Serializer::MsgPack)).await.unwrap();
    let joined = within("on_join", joins.recv()).await.unwrap();
    let details = &joined.args[0];
    assert_eq!(details["session"], json!(board.id()));
    assert_eq!((details["authid"].as_str(), details["authrole"].as_str()), (Some(BOARD), Some("board")));
    assert_eq!(details["authmethod"], "wampcra");
    assert_eq!(details["transport"]["serializer"], "msgpack");

    board.publish(&topic, vec![json!({"line": "GPIO4", "edge": "rising"})], Default::default()).await.unwrap();
    let event = within("gpio event", gpio.recv()).await.unwrap();
    assert_eq!(event.args[0]["line"], "GPIO4");

    let list = agent.call("wamp.session.list", vec![], Default::default(), T).await.unwrap();
    let ids: Vec<u64> = list.args[0].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    assert!(ids.contains(&board.id()) && ids.contains(&agent.id()), "{ids:?}");
    let boards = agent.call("wamp.session.count", vec![json!(["board"])], Default::default(), T).await.unwrap();
    assert_eq!(boards.args, vec![json!(1)]);
    let got = agent.call("wamp.session.get", vec![json!(board.id())], Default::default(), T).await.unwrap();
    assert_eq!(got.args[0]["authid"], json!(BOARD));
    let missing = agent.call("wamp.session.get", vec![json!(12345)], Default::default(), T).await.unwrap_err();
    assert_eq!(missing.wamp_uri(), Some("wamp.error.no_such_session"));

    let id = board.id();
    board.leave().await;
    let left = within("on_leave", leaves.recv()).await.unwrap();
    assert_eq!(left.args, vec![json!(id)], "on_leave carries only the session id, as crossbar sends it");
}

#[tokio::test]
async fn authorization_refusals() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    agent.register("agent.stack4things.connection", |_| async { Ok(Payload::default()) }).await.unwrap();
    let other = connect(&r.config(other_board_auth())).await.unwrap();
    let other_proc = format!("iotronic.{}.{OTHER_BOARD}.DevicePing", other.id());
    other.register(&other_proc, |_| async { Ok(Payload::default()) }).await.unwrap();

    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    let refused = |e: Error| assert_eq!(e.wamp_uri(), Some("wamp.error.not_authorized"), "{e}");
    let noop = |_| async { Ok(Payload::default()) };
    refused(board.register(&format!("iotronic.{}.{OTHER_BOARD}.DevicePing", board.id()), noop).await.unwrap_err());
    refused(board.register(&format!("iotronic.{}.{BOARD}.X", other.id()), noop).await.unwrap_err());
    refused(board.register("agent.stack4things.connection", noop).await.unwrap_err());
    refused(board.call(&other_proc, vec![], Default::default(), T).await.unwrap_err());
    refused(board.call("wamp.session.list", vec![], Default::default(), T).await.unwrap_err());
    refused(board.subscribe("wamp.session.on_join", 4).await.unwrap_err());
    refused(board.publish_acked(&format!("board.{OTHER_BOARD}.gpio"), vec![], Default::default()).await.unwrap_err());
    board.call("agent.stack4things.connection", vec![], Default::default(), T).await.unwrap();

    let enrolling = connect(&r.config(enroll_auth())).await.unwrap();
    assert_eq!(enrolling.authrole(), "enrollment");
    refused(enrolling.call("agent.stack4things.connection", vec![], Default::default(), T).await.unwrap_err());
    let absent = enrolling.call("stack4things.register", vec![], Default::default(), T).await.unwrap_err();
    assert_eq!(absent.wamp_uri(), Some("wamp.error.no_such_procedure"), "allowed, just not registered here");
    // The refused board session is still usable.
    board.register(&format!("iotronic.{}.{BOARD}.DevicePing", board.id()), noop).await.unwrap();
}

#[tokio::test]
async fn authentication_failures_abort() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let aborted = |e: Error, reason: &str| match e {
        Error::Handshake(s4t_shared::wamp::session::HandshakeError::Aborted { reason: got, .. }) => {
            assert_eq!(got, reason)
        }
        other => panic!("expected an ABORT {reason}, got {other:?}"),
    };
    let wrong_secret = s4t_wamp::ClientAuth::WampCra { authid: BOARD.into(), secret: "guess".into() };
    aborted(connect(&r.config(wrong_secret)).await.unwrap_err(), "wamp.error.authentication_failed");
    let unknown = s4t_wamp::ClientAuth::WampCra { authid: "nobody".into(), secret: "x".into() };
    aborted(connect(&r.config(unknown)).await.unwrap_err(), "wamp.error.authentication_failed");
    let wrong_code = s4t_wamp::ClientAuth::Ticket { authid: "enroll".into(), ticket: "CODE-999".into() };
    aborted(connect(&r.config(wrong_code)).await.unwrap_err(), "wamp.error.authentication_failed");
    aborted(connect(&r.config(s4t_wamp::ClientAuth::Anonymous)).await.unwrap_err(), "wamp.error.no_auth_method");
    let mut other_realm = r.board(Serializer::Json);
    other_realm.realm = "elsewhere".into();
    aborted(connect(&other_realm).await.unwrap_err(), "wamp.error.no_such_realm");
    assert!(r.router.sessions().is_empty());
}

#[tokio::test]
async fn legacy_board_is_confined_until_bound() {
    let r = TestRouter::start(RouterConfig::default(), true).await;
    let legacy = connect(&r.config(s4t_wamp::ClientAuth::Anonymous)).await.unwrap();
    assert_eq!(legacy.authrole(), "legacy");
    let proc = format!("iotronic.{}.{BOARD}.DevicePing", legacy.id());
    let noop = |_| async { Ok(Payload::default()) };
    let e = legacy.register(&proc, noop).await.unwrap_err();
    assert_eq!(e.wamp_uri(), Some("wamp.error.not_authorized"));
    r.router.bind_board(legacy.id(), BOARD).unwrap();
    legacy.register(&proc, noop).await.unwrap();
    let e = legacy.register(&format!("iotronic.{}.{OTHER_BOARD}.X", legacy.id()), noop).await.unwrap_err();
    assert_eq!(e.wamp_uri(), Some("wamp.error.not_authorized"));
    assert_eq!(r.router.session(legacy.id()).unwrap().board.as_deref(), Some(BOARD));
    // Once bound, the agent learns the board of its legacy callers from the router.
    let agent = r.router.local_session("agent").await.unwrap();
    agent
        .register("agent.stack4things.wamp_alive", |inv| async move { Ok(Payload::args(vec![json!(inv.details)])) })
        .await
        .unwrap();
    let seen = legacy.call("agent.stack4things.wamp_alive", vec![], Default::default(), T).await.unwrap();
    assert_eq!(seen.args[0]["_caller_board"], json!(BOARD));
    assert_eq!(seen.args[0]["caller"], json!(legacy.id()));
    assert!(r.router.bind_board(12345, BOARD).is_err());
    assert!(r.router.bind_board(agent.id(), BOARD).is_err(), "only legacy sessions are bound");
}

#[tokio::test]
async fn call_timeout_interrupts_the_callee() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let board = connect(&r.board(Serializer::Cbor)).await.unwrap();
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
    let dropped_tx = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    struct Guard(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(tx) = self.0.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
    }
    let slow = format!("iotronic.{}.{BOARD}.Slow", board.id());
    board
        .register(&slow, move |_| {
            let guard = Guard(dropped_tx.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok(Payload::default())
            }
        })
        .await
        .unwrap();
    let e = agent.call(&slow, vec![], Default::default(), Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    within("the handler is interrupted", dropped_rx).await.unwrap();
    // The board still serves other calls.
    let fast = format!("iotronic.{}.{BOARD}.Fast", board.id());
    board.register(&fast, |_| async { Ok(Payload::args(vec![json!("ok")])) }).await.unwrap();
    assert_eq!(agent.call(&fast, vec![], Default::default(), T).await.unwrap().args, vec![json!("ok")]);
}

#[tokio::test]
async fn a_slow_handler_does_not_block_other_invocations() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let slow = format!("iotronic.{}.{BOARD}.Slow", board.id());
    board
        .register(&slow, move |_| {
            let g = g.clone();
            async move {
                g.notified().await;
                Ok(Payload::args(vec![json!("slow")]))
            }
        })
        .await
        .unwrap();
    let fast = format!("iotronic.{}.{BOARD}.Fast", board.id());
    board.register(&fast, |_| async { Ok(Payload::args(vec![json!("fast")])) }).await.unwrap();
    let pending = tokio::spawn({
        let agent = agent.clone();
        async move { agent.call(&slow, vec![], Default::default(), T).await }
    });
    assert_eq!(agent.call(&fast, vec![], Default::default(), T).await.unwrap().args, vec![json!("fast")]);
    assert!(!pending.is_finished());
    gate.notify_one();
    assert_eq!(within("slow call", pending).await.unwrap().unwrap().args, vec![json!("slow")]);
}

#[tokio::test]
async fn handler_errors_reach_the_caller() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    let p = format!("iotronic.{}.{BOARD}.Fail", board.id());
    board.register(&p, |_| async { Err(WampError::new("s4t.error.gpio", "no such line")) }).await.unwrap();
    let e = agent.call(&p, vec![], Default::default(), T).await.unwrap_err();
    assert_eq!(e.wamp_uri(), Some("s4t.error.gpio"));
    assert!(e.to_string().contains("no such line"), "{e}");
    let missing = agent.call("iotronic.1.x.Nothing", vec![], Default::default(), T).await.unwrap_err();
    assert_eq!(missing.wamp_uri(), Some("wamp.error.no_such_procedure"));
}

/// A call too large for a board (its client closes its session on a message over 1 MiB)
/// gets `wamp.error.payload_size_exceeded` from the router; the board stays connected and
/// takes the next call. The agent, in process, has no such limit.
#[tokio::test]
async fn a_call_too_large_for_a_board_is_refused_and_the_board_stays() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    let p = format!("iotronic.{}.{BOARD}.DeviceEcho", board.id());
    board.register(&p, |inv| async move { Ok(Payload::args(vec![json!(inv.args.len())])) }).await.unwrap();
    let big = json!("x".repeat(1 << 20));
    let e = agent.call(&p, vec![big], Default::default(), T).await.unwrap_err();
    assert_eq!(e.wamp_uri(), Some("wamp.error.payload_size_exceeded"), "{e}");
    let ok = agent.call(&p, vec![json!("x".repeat(512 * 1024))], Default::default(), T).await.unwrap();
    assert_eq!(ok.args, vec![json!(1)]);
    agent
        .register("agent.stack4things.big", |inv| async move { Ok(Payload::args(vec![json!(inv.args.len())])) })
        .await
        .unwrap();
    let to_agent = agent.call("agent.stack4things.big", vec![json!("x".repeat(2 << 20))], Default::default(), T).await;
    assert_eq!(to_agent.unwrap().args, vec![json!(1)], "the in-process agent takes any size");
}

/// The router keeps the host a peer dialed (its Host header): the cloud answers enrolling
/// boards with URLs of that host when it was told no public host.
#[tokio::test]
async fn a_session_knows_the_host_its_peer_dialed() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    let info = r.router.session(board.id()).unwrap();
    assert_eq!(info.transport.host.as_deref(), Some("127.0.0.1"), "{info:?}");
    let agent = r.router.local_session("agent").await.unwrap();
    assert_eq!(r.router.session(agent.id()).unwrap().transport.host, None);
}

#[tokio::test]
async fn killed_sessions_end_and_callers_of_their_procedures_get_errors() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    let p = format!("iotronic.{}.{BOARD}.Hang", board.id());
    let (invoked_tx, mut invoked) = tokio::sync::mpsc::channel::<()>(1);
    board
        .register(&p, move |_| {
            let invoked_tx = invoked_tx.clone();
            async move {
                let _ = invoked_tx.send(()).await;
                std::future::pending().await
            }
        })
        .await
        .unwrap();
    let call = tokio::spawn({
        let agent = agent.clone();
        async move { agent.call(&p, vec![], Default::default(), T).await }
    });
    within("the invocation reaches the board", invoked.recv()).await.unwrap();
    assert_eq!(r.router.kill_board(BOARD), vec![board.id()]);
    assert_eq!(within("closed", board.closed()).await, CloseReason::Goodbye("wamp.close.killed".into()));
    let e = within("call fails", call).await.unwrap().unwrap_err();
    assert!(matches!(e.wamp_uri(), Some("wamp.error.canceled") | Some("wamp.error.no_such_procedure")), "{e:?}");
    wait_until("the board left", || r.router.session(board.id()).is_none()).await;
}

#[tokio::test]
async fn reconnect_with_backoff_after_failures() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let mut config = s4t_wamp::ClientConfig::new(&url, "s4t", board_auth());
    config.connect_timeout = Duration::from_secs(2);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let client = tokio::spawn({
        let (config, shutdown) = (config.clone(), shutdown.clone());
        async move {
            let mut backoff = s4t_shared::backoff::Backoff::new(Duration::from_millis(5), Duration::from_millis(50));
            s4t_wamp::connect_with_retry(&config, &mut backoff, &shutdown).await
        }
    });
    // Refuse the first two attempts by closing the connections, then serve.
    for _ in 0..2 {
        let (tcp, _) = within("attempt", listener.accept()).await.unwrap();
        drop(tcp);
    }
    let r = TestRouter::start_on(listener, RouterConfig::default(), false);
    let first = within("connected", client).await.unwrap().expect("a session");
    assert!(r.router.session(first.id()).is_some());
    // The router drops it; the board notices and reconnects under a new id.
    r.router.kill_session(first.id());
    within("closed", first.closed()).await;
    let mut backoff = s4t_shared::backoff::Backoff::default();
    let second = within("reconnected", s4t_wamp::connect_with_retry(&config, &mut backoff, &shutdown)).await.unwrap();
    assert_ne!(first.id(), second.id());
    second
        .register(&format!("iotronic.{}.{BOARD}.DevicePing", second.id()), |_| async { Ok(Payload::default()) })
        .await
        .unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn router_shutdown_says_goodbye() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    r.shutdown.cancel();
    assert_eq!(within("closed", board.closed()).await, CloseReason::Goodbye("wamp.close.system_shutdown".into()));
    within("serve returns", r.task).await.unwrap();
}

#[tokio::test]
async fn wss_with_a_pinned_certificate() {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = s4t_wamp::Router::new(RouterConfig::default(), Arc::new(authenticator(false)));
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let (router, shutdown) = (router.clone(), shutdown.clone());
        async move { router.serve(listener, Some(Arc::new(server)), shutdown).await }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = s4t_wamp::ClientConfig::new(&format!("wss://localhost:{port}/"), "s4t", board_auth());
    // Without the TLS configuration, wss is refused before dialing.
    assert!(matches!(connect(&config).await.unwrap_err(), Error::Url { .. }));
    config.tls = Some(Arc::new(client_tls));
    let board = within("wss connect", connect(&config)).await.unwrap();
    let info = router.session(board.id()).unwrap();
    assert!(info.transport.tls);
    // Plain WebSocket against the TLS port fails.
    let plain = s4t_wamp::ClientConfig::new(&format!("ws://localhost:{port}/"), "s4t", board_auth());
    assert!(connect(&plain).await.is_err());
    shutdown.cancel();
}

#[tokio::test]
async fn the_agent_is_not_held_to_the_board_in_flight_limit() {
    let limits = s4t_wamp::Limits { max_in_flight_calls: 4, ..s4t_wamp::Limits::default() };
    let r = TestRouter::start(RouterConfig { limits, ..RouterConfig::default() }, false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let mut config = r.board(Serializer::Json);
    config.max_concurrent_invocations = 32;
    let board = connect(&config).await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(32);
    let p = format!("iotronic.{}.{BOARD}.Slow", board.id());
    let g = gate.clone();
    board
        .register(&p, move |_| {
            let (g, started_tx) = (g.clone(), started_tx.clone());
            async move {
                let _ = started_tx.send(()).await;
                let _permit = g.acquire().await;
                Ok(Payload::default())
            }
        })
        .await
        .unwrap();
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let (agent, p) = (agent.clone(), p.clone());
            tokio::spawn(async move { agent.call(&p, vec![], Default::default(), T).await })
        })
        .collect();
    for _ in 0..10 {
        within("all ten invocations reach the board", started.recv()).await.unwrap();
    }
    gate.add_permits(10);
    for call in calls {
        within("call", call).await.unwrap().unwrap();
    }
}

/// After a cloud restart the whole fleet logs in at once: the agent serves every `connection`
/// (each waits on the database) instead of refusing those beyond a few handler slots.
#[tokio::test]
async fn a_fleet_logging_in_at_once_is_served_not_refused() {
    const BOARDS: usize = 100;
    // The fleet shares one board's credentials here.
    let r = TestRouter::start(RouterConfig { max_sessions_per_board: BOARDS, ..RouterConfig::default() }, false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(BOARDS);
    let g = gate.clone();
    agent
        .register("agent.stack4things.connection", move |_| {
            let (g, started_tx) = (g.clone(), started_tx.clone());
            async move {
                let _ = started_tx.send(()).await;
                let _permit = g.acquire().await;
                Ok(Payload::args(vec![json!("SUCCESS")]))
            }
        })
        .await
        .unwrap();
    let mut boards = Vec::new();
    for _ in 0..BOARDS {
        boards.push(connect(&r.board(Serializer::Json)).await.unwrap());
    }
    let calls: Vec<_> = boards
        .iter()
        .map(|b| {
            let b = b.clone();
            tokio::spawn(async move { b.call("agent.stack4things.connection", vec![], Default::default(), T).await })
        })
        .collect();
    for _ in 0..BOARDS {
        within("every login reaches the agent at once", started.recv()).await.unwrap();
    }
    gate.add_permits(BOARDS);
    for call in calls {
        assert_eq!(within("login", call).await.unwrap().unwrap().args, vec![json!("SUCCESS")]);
    }
}

/// The cloud's in-process session with many calls queued towards the router and many results
/// due back at once (both directions of its link full) must not deadlock.
#[tokio::test]
async fn the_local_session_survives_a_burst_of_concurrent_calls() {
    let r = TestRouter::start(RouterConfig { queue_capacity: 16, ..RouterConfig::default() }, false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let mut config = r.board(Serializer::MsgPack);
    config.max_concurrent_invocations = 1024;
    let board = connect(&config).await.unwrap();
    let p = format!("iotronic.{}.{BOARD}.DeviceEcho", board.id());
    board.register(&p, |inv| async move { Ok(Payload::args(inv.args)) }).await.unwrap();
    let calls: Vec<_> = (0..500)
        .map(|i| {
            let (agent, p) = (agent.clone(), p.clone());
            tokio::spawn(async move { (i, agent.call(&p, vec![json!(i)], Default::default(), T).await) })
        })
        .collect();
    let (mut ok, mut unavailable) = (0, 0);
    for call in calls {
        match within("500 concurrent calls from the local session", call).await.unwrap() {
            (i, Ok(out)) => {
                assert_eq!(out.args, vec![json!(i)]);
                ok += 1;
            }
            // The board's queue may be full during the burst: that fails fast, it does not hang.
            (_, Err(e)) if e.wamp_uri() == Some("wamp.error.unavailable") => unavailable += 1,
            (_, Err(e)) => panic!("{e:?}"),
        }
    }
    assert!(ok > 0, "{unavailable} calls found the board's queue full, none got through");
    assert!(!agent.is_closed());
    assert_eq!(agent.call(&p, vec![json!("after")], Default::default(), T).await.unwrap().args, vec![json!("after")]);
}

/// A board's procedure named like an agent's (`iotronic.<s>.<uuid>.stack4things.connection`)
/// would be callable by every other board: it cannot be registered.
#[tokio::test]
async fn boards_cannot_register_procedures_named_like_the_agents() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let a = connect(&r.config(other_board_auth())).await.unwrap();
    let b = connect(&r.board(Serializer::Json)).await.unwrap();
    for name in ["connection", "wamp_alive", "notify_result"] {
        let p = format!("iotronic.{}.{OTHER_BOARD}.stack4things.{name}", a.id());
        let e = a.register(&p, |_| async { Ok(Payload::args(vec![json!("board A")])) }).await.unwrap_err();
        assert_eq!(e.wamp_uri(), Some("wamp.error.not_authorized"), "{p}: {e}");
        let e = b.call(&p, vec![], Default::default(), T).await.unwrap_err();
        assert_ne!(e.wamp_uri(), None, "{p}: {e}");
    }
}

/// One board's credentials cannot take every session slot (nor multiply its share of the
/// agent's handler slots): beyond its cap its oldest session goes, so a board that reconnects
/// is not locked out by its own half-dead sessions. Other boards and agents are not affected.
#[tokio::test]
async fn a_board_over_its_session_cap_loses_its_oldest_session() {
    let r = TestRouter::start(RouterConfig { max_sessions_per_board: 2, ..RouterConfig::default() }, false).await;
    let agents = [
        connect(&r.config(agent_auth())).await.unwrap(),
        connect(&r.config(agent_auth())).await.unwrap(),
        connect(&r.config(agent_auth())).await.unwrap(),
    ];
    let first = connect(&r.board(Serializer::Json)).await.unwrap();
    let second = connect(&r.board(Serializer::Json)).await.unwrap();
    let third = connect(&r.board(Serializer::Json)).await.unwrap();
    let reason = within("the oldest session closes", first.closed()).await;
    assert_eq!(reason, CloseReason::Goodbye("s4t.close.replaced".into()));
    let board_sessions = || {
        let mut ids: Vec<u64> = r.router.sessions().iter().filter(|s| s.authid == BOARD).map(|s| s.id).collect();
        ids.sort_unstable();
        ids
    };
    let mut open = vec![second.id(), third.id()];
    open.sort_unstable();
    wait_until("the oldest session left", || board_sessions() == open).await;
    for board in [&second, &third] {
        let p = format!("iotronic.{}.{BOARD}.DevicePing", board.id());
        board.register(&p, |_| async { Ok(Payload::default()) }).await.unwrap();
        assert!(!board.is_closed());
    }
    let other = connect(&r.config(other_board_auth())).await.unwrap();
    assert!(r.router.session(other.id()).is_some());
    // Agents are not capped: the first of three still works.
    let count = agents[0].call("wamp.session.count", vec![], Default::default(), T).await.unwrap();
    assert_eq!(count.args, vec![json!(6)], "three agents, two sessions of one board, one of another");
}

/// Anonymous (legacy) sessions are capped per source address: beyond the cap they are refused
/// with a clear reason, while boards that authenticate still connect from that address.
#[tokio::test]
async fn anonymous_sessions_beyond_the_cap_per_address_are_refused() {
    let r = TestRouter::start(RouterConfig { max_anonymous_per_source: 2, ..RouterConfig::default() }, true).await;
    let anonymous = r.config(s4t_wamp::ClientAuth::Anonymous);
    let legacy = [connect(&anonymous).await.unwrap(), connect(&anonymous).await.unwrap()];
    match connect(&anonymous).await.unwrap_err() {
        Error::Handshake(s4t_shared::wamp::session::HandshakeError::Aborted { reason, message }) => {
            assert_eq!(reason, "s4t.error.limit_exceeded");
            assert!(message.as_deref().is_some_and(|m| m.contains("anonymous")), "{message:?}");
        }
        other => panic!("expected an ABORT, got {other:?}"),
    }
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    assert_eq!(board.authrole(), "board");
    for s in &legacy {
        assert!(r.router.session(s.id()).is_some());
    }
    assert_eq!(r.router.sessions().len(), 3);
}

/// Enrollment sessions are capped per source address: whoever holds a registration code
/// cannot take every session slot. Beyond the cap they are refused with a clear reason, while
/// boards still connect from that address.
#[tokio::test]
async fn enrollment_sessions_beyond_the_cap_per_address_are_refused() {
    let r = TestRouter::start(RouterConfig { max_enrollment_per_source: 2, ..RouterConfig::default() }, false).await;
    let enroll = r.config(enroll_auth());
    let enrolling = [connect(&enroll).await.unwrap(), connect(&enroll).await.unwrap()];
    match connect(&enroll).await.unwrap_err() {
        Error::Handshake(s4t_shared::wamp::session::HandshakeError::Aborted { reason, message }) => {
            assert_eq!(reason, "s4t.error.limit_exceeded");
            assert!(message.as_deref().is_some_and(|m| m.contains("enrollment")), "{message:?}");
        }
        other => panic!("expected an ABORT, got {other:?}"),
    }
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    assert_eq!(board.authrole(), "board");
    for s in &enrolling {
        assert!(r.router.session(s.id()).is_some());
    }
    assert_eq!(r.router.sessions().len(), 3);
}

/// Enrollment sessions are capped on the whole router too: a peer with many source addresses
/// (an IPv6 /48 holds 65,536 /64 sources) is not held off by the per-address bound.
#[tokio::test]
async fn enrollment_sessions_beyond_the_routers_cap_are_refused() {
    let config = RouterConfig { max_enrollment_per_source: 16, max_enrollment_sessions: 2, ..RouterConfig::default() };
    let r = TestRouter::start(config, false).await;
    let enroll = r.config(enroll_auth());
    let _enrolling = [connect(&enroll).await.unwrap(), connect(&enroll).await.unwrap()];
    match connect(&enroll).await.unwrap_err() {
        Error::Handshake(s4t_shared::wamp::session::HandshakeError::Aborted { reason, message }) => {
            assert_eq!(reason, "s4t.error.limit_exceeded");
            assert!(message.as_deref().is_some_and(|m| m.contains("on this router")), "{message:?}");
        }
        other => panic!("expected an ABORT, got {other:?}"),
    }
    assert!(connect(&r.board(Serializer::Json)).await.is_ok(), "a board was refused");
}

/// An idle enrollment session (the ticket is checked only at the handshake) is closed when
/// its lifetime is over; a board's session is not.
#[tokio::test]
async fn an_idle_enrollment_session_is_closed_after_its_lifetime() {
    let config = RouterConfig { enrollment_lifetime: Duration::from_millis(200), ..RouterConfig::default() };
    let r = TestRouter::start(config, false).await;
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    let enrolling = connect(&r.config(enroll_auth())).await.unwrap();
    assert_eq!(enrolling.authrole(), "enrollment");
    let reason = within("the enrollment session is closed", enrolling.closed()).await;
    assert_eq!(reason, CloseReason::Goodbye("s4t.close.expired".into()));
    wait_until("the enrollment session left", || r.router.session(enrolling.id()).is_none()).await;
    assert!(!board.is_closed());
    assert!(r.router.session(board.id()).is_some());
}

/// Records when each credential was read, then answers as the common authenticator does.
struct Clocked {
    inner: s4t_wamp::StaticAuthenticator,
    read: std::sync::Mutex<Vec<std::time::SystemTime>>,
}

impl s4t_wamp::Authenticator for Clocked {
    fn ticket<'a>(
        &'a self,
        realm: &'a str,
        authid: &'a str,
        ticket: &'a s4t_wamp::Secret,
    ) -> s4t_wamp::AuthFuture<'a, Option<s4t_wamp::Role>> {
        self.read.lock().unwrap().push(std::time::SystemTime::now());
        self.inner.ticket(realm, authid, ticket)
    }

    fn wampcra<'a>(
        &'a self,
        realm: &'a str,
        authid: &'a str,
    ) -> s4t_wamp::AuthFuture<'a, Option<(s4t_wamp::Role, s4t_wamp::CraCredential)>> {
        self.read.lock().unwrap().push(std::time::SystemTime::now());
        self.inner.wampcra(realm, authid)
    }

    fn anonymous(&self, realm: &str) -> bool {
        self.inner.anonymous(realm)
    }
}

/// A session counts as admitted when its credential was read, not when the peer finished
/// the handshake: one begun before a board's secret was rotated and answered (with the old
/// key) up to the handshake timeout later must still count as admitted before the rotation,
/// which closes the sessions admitted up to then.
#[tokio::test]
async fn a_session_is_admitted_when_its_credential_is_read() {
    let clocked = Arc::new(Clocked { inner: authenticator(false), read: std::sync::Mutex::default() });
    let router = s4t_wamp::Router::new(RouterConfig::default(), clocked.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let (router, shutdown) = (router.clone(), shutdown.clone());
        async move { router.serve(listener, None, shutdown).await.unwrap() }
    });
    for auth in [board_auth(), agent_auth()] {
        let session = within("connected", connect(&s4t_wamp::ClientConfig::new(&url, "s4t", auth))).await.unwrap();
        let read = clocked.read.lock().unwrap().pop().expect("the credential was read");
        let joined = router.session(session.id()).unwrap().joined;
        assert!(joined <= read, "admitted at {joined:?}, after its credential was read at {read:?}");
        session.leave().await;
    }
    shutdown.cancel();
}
