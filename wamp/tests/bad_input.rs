//! Hostile and broken peers, spoken to over raw WebSockets: every defect gets a WAMP ERROR or
//! ABORT, and other sessions keep working.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use s4t_wamp::{Limits, Payload, RouterConfig, Serializer, connect};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Raw = WebSocketStream<MaybeTlsStream<TcpStream>>;
const T: Duration = Duration::from_secs(5);

async fn raw(r: &TestRouter, subprotocol: &str) -> Raw {
    let mut req = r.url().into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", subprotocol.parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

async fn send(ws: &mut Raw, v: Value) {
    ws.send(Ws::Text(v.to_string().into())).await.unwrap();
}

/// The next WAMP message (JSON), skipping pings; `None` once the connection is closed.
async fn next(ws: &mut Raw) -> Option<Value> {
    loop {
        match within("a message from the router", ws.next()).await {
            Some(Ok(Ws::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(Ws::Binary(b))) => panic!("binary frame on a JSON session: {b:?}"),
            Some(Ok(Ws::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// An anonymous (legacy) session over JSON; returns the socket and the session id.
async fn joined(r: &TestRouter) -> (Raw, u64) {
    let mut ws = raw(r, "wamp.2.json").await;
    send(&mut ws, json!([1, "s4t", {"roles": {"caller": {}, "callee": {}}}])).await;
    let welcome = next(&mut ws).await.unwrap();
    assert_eq!(welcome[0], 2, "{welcome}");
    let id = welcome[1].as_u64().unwrap();
    (ws, id)
}

async fn expect_abort(ws: &mut Raw, reason: &str) {
    let msg = next(ws).await.expect("an ABORT before the close");
    assert_eq!((msg[0].as_u64(), msg[2].as_str()), (Some(3), Some(reason)), "{msg}");
    assert!(next(ws).await.is_none(), "the connection must close after ABORT");
}

/// A board that keeps answering: proof that the other sessions are unaffected.
async fn healthy_board(r: &TestRouter) -> (s4t_wamp::Session, s4t_wamp::Session, String) {
    let agent = r.router.local_session("agent").await.unwrap();
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    let p = format!("iotronic.{}.{BOARD}.DeviceEcho", board.id());
    board.register(&p, |inv| async move { Ok(Payload::args(inv.args)) }).await.unwrap();
    (agent, board, p)
}

async fn still_healthy(agent: &s4t_wamp::Session, p: &str) {
    let out = agent.call(p, vec![json!("hi")], Default::default(), T).await.unwrap();
    assert_eq!(out.args, vec![json!("hi")]);
}

#[tokio::test]
async fn malformed_messages_abort_only_their_session() {
    let r = TestRouter::start(RouterConfig::default(), true).await;
    let (agent, _board, p) = healthy_board(&r).await;
    let cases: Vec<(&str, Ws)> = vec![
        ("wamp.2.json", Ws::Text("[48, 1, {}, ".into())),
        ("wamp.2.json", Ws::Text("{\"not\": \"a list\"}".into())),
        ("wamp.2.json", Ws::Text("[4711, 1]".into())),
        ("wamp.2.json", Ws::Binary(vec![0x93, 1, 2, 3].into())),
        ("wamp.2.msgpack", Ws::Binary(vec![0xc1, 0xc1].into())),
        ("wamp.2.cbor", Ws::Binary(vec![0xff, 0x00].into())),
    ];
    for (subprotocol, frame) in cases {
        let mut ws = raw(&r, subprotocol).await;
        ws.send(frame.clone()).await.unwrap();
        let ser = Serializer::from_subprotocol(subprotocol).unwrap();
        let mut aborted = false;
        while let Some(Ok(frame)) = within("the close", ws.next()).await {
            let bytes = match &frame {
                Ws::Text(t) => t.as_bytes().to_vec(),
                Ws::Binary(b) => b.to_vec(),
                _ => continue,
            };
            let msg = ser.decode(&bytes).unwrap();
            assert!(
                matches!(&msg, s4t_wamp::Message::Abort { reason, .. } if reason == "wamp.error.protocol_violation"),
                "{msg:?}"
            );
            aborted = true;
        }
        assert!(aborted, "{subprotocol}: no ABORT before the close");
        still_healthy(&agent, &p).await;
    }
    // Established sessions too.
    let (mut ws, _) = joined(&r).await;
    ws.send(Ws::Text("[48, 2, {}, \"a\", [1], {\"x\": ".into())).await.unwrap();
    expect_abort(&mut ws, "wamp.error.protocol_violation").await;
    still_healthy(&agent, &p).await;
}

#[tokio::test]
async fn invalid_requests_get_errors_and_the_session_goes_on() {
    let r = TestRouter::start(RouterConfig::default(), true).await;
    let agent = r.router.local_session("agent").await.unwrap();
    agent.register("agent.stack4things.connection", |_| async { Ok(Payload::args(vec![json!("ok")])) }).await.unwrap();
    let (mut ws, _) = joined(&r).await;
    send(&mut ws, json!([48, 1, {}, "bad uri with spaces"])).await;
    let e = next(&mut ws).await.unwrap();
    assert_eq!(
        (e[0].as_u64(), e[1].as_u64(), e[2].as_u64(), e[4].as_str()),
        (Some(8), Some(48), Some(1), Some("wamp.error.invalid_uri")),
        "{e}"
    );
    send(&mut ws, json!([64, 2, {}, "a..b"])).await;
    assert_eq!(next(&mut ws).await.unwrap()[4], "wamp.error.invalid_uri");
    send(&mut ws, json!([48, 3, {}, "agent.stack4things.connection", "not a list"])).await;
    assert_eq!(next(&mut ws).await.unwrap()[4], "wamp.error.invalid_argument");
    // A YIELD for an invocation that does not exist is ignored.
    send(&mut ws, json!([70, 99, {}])).await;
    send(&mut ws, json!([48, 4, {}, "agent.stack4things.connection"])).await;
    let result = next(&mut ws).await.unwrap();
    assert_eq!((result[0].as_u64(), result[1].as_u64()), (Some(50), Some(4)), "{result}");
    assert_eq!(result[3], json!(["ok"]));
}

#[tokio::test]
async fn invalid_uris_are_not_echoed_whole() {
    let r = TestRouter::start(RouterConfig::default(), true).await;
    let (mut ws, _) = joined(&r).await;
    let long = format!("bad uri {}", "x".repeat(600));
    send(&mut ws, json!([48, 1, {}, long])).await;
    let e = next(&mut ws).await.unwrap();
    assert_eq!((e[0].as_u64(), e[4].as_str()), (Some(8), Some("wamp.error.invalid_uri")), "{e}");
    let reason = e[5][0].as_str().unwrap();
    assert!(reason.len() < 200, "{} bytes: {reason}", reason.len());
    // Options are echoed the same way (to a session allowed to register at all).
    let mut ws = raw(&r, "wamp.2.json").await;
    send(&mut ws, json!([1, "s4t", {"authid": "agent", "authmethods": ["ticket"]}])).await;
    assert_eq!(next(&mut ws).await.unwrap()[0], 4);
    send(&mut ws, json!([5, AGENT_TICKET, {}])).await;
    assert_eq!(next(&mut ws).await.unwrap()[0], 2);
    send(&mut ws, json!([64, 2, {"match": "y".repeat(600)}, "a.b"])).await;
    let e = next(&mut ws).await.unwrap();
    assert_eq!(e[4], "wamp.error.invalid_argument", "{e}");
    assert!(e[5][0].as_str().unwrap().len() < 200, "{e}");
}

#[tokio::test]
async fn messages_out_of_place_abort() {
    let r = TestRouter::start(RouterConfig::default(), true).await;
    let (agent, _board, p) = healthy_board(&r).await;
    // Before HELLO.
    let mut ws = raw(&r, "wamp.2.json").await;
    send(&mut ws, json!([48, 1, {}, "agent.x"])).await;
    expect_abort(&mut ws, "wamp.error.protocol_violation").await;
    // After WELCOME: HELLO again, a WELCOME, an ERROR for a CALL, a RESULT.
    for bad in [json!([1, "s4t", {}]), json!([2, 5, {}]), json!([8, 48, 1, {}, "wamp.error.x"]), json!([50, 1, {}])] {
        let (mut ws, _) = joined(&r).await;
        send(&mut ws, bad).await;
        expect_abort(&mut ws, "wamp.error.protocol_violation").await;
    }
    still_healthy(&agent, &p).await;
    // A WebSocket without a WAMP subprotocol, or on another path, is refused at the upgrade.
    let req = r.url().into_client_request().unwrap();
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
    let mut req = format!("ws://{}/ws", r.addr).into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "wamp.2.json".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
}

#[tokio::test]
async fn oversized_messages_close_the_session() {
    let config = RouterConfig { max_message_size: 64 * 1024, ..RouterConfig::default() };
    let r = TestRouter::start(config, true).await;
    let (agent, _board, p) = healthy_board(&r).await;
    let (mut ws, id) = joined(&r).await;
    let big = "x".repeat(100 * 1024);
    send(&mut ws, json!([16, 1, {}, "board.x.y", [big]])).await;
    expect_abort(&mut ws, "wamp.error.protocol_violation").await;
    wait_until("the oversized session is gone", || r.router.session(id).is_none()).await;
    still_healthy(&agent, &p).await;
}

/// A HELLO of 1 MiB in MessagePack (a million 1-byte elements) would decode to some 32 MiB of
/// values, held until the client answers the challenge: it is refused unread.
#[tokio::test]
async fn a_huge_hello_is_refused_before_it_is_decoded() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let (agent, _board, p) = healthy_board(&r).await;
    let mut details = kw(json!({"authid": BOARD, "authmethods": ["wampcra"]}));
    details.insert("junk".into(), Value::Array(vec![json!(1); 1_000_000]));
    let hello = Serializer::MsgPack.encode(&s4t_wamp::Message::Hello { realm: "s4t".into(), details }).unwrap();
    assert!(hello.len() <= RouterConfig::default().max_message_size, "{} bytes", hello.len());
    let mut ws = raw(&r, "wamp.2.msgpack").await;
    // The router may close the connection before it has all of it.
    let _ = ws.send(Ws::Binary(hello.into())).await;
    while let Some(Ok(frame)) = within("the refusal", ws.next()).await {
        if let Ws::Binary(b) = frame {
            let msg = Serializer::MsgPack.decode(&b).unwrap();
            assert!(matches!(&msg, s4t_wamp::Message::Abort { .. }), "{msg:?}");
        }
    }
    still_healthy(&agent, &p).await;
}

#[tokio::test]
async fn reusing_an_in_flight_request_id_aborts() {
    let r = TestRouter::start(RouterConfig::default(), true).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    agent
        .register("agent.stack4things.wamp_alive", move |_| {
            let g = g.clone();
            async move {
                g.notified().await;
                Ok(Payload::default())
            }
        })
        .await
        .unwrap();
    let (mut ws, _) = joined(&r).await;
    send(&mut ws, json!([48, 7, {}, "agent.stack4things.wamp_alive"])).await;
    send(&mut ws, json!([48, 7, {}, "agent.stack4things.wamp_alive"])).await;
    expect_abort(&mut ws, "wamp.error.protocol_violation").await;
}

#[tokio::test]
async fn call_floods_hit_the_in_flight_limit() {
    let limits = Limits { max_in_flight_calls: 8, ..Limits::default() };
    let r = TestRouter::start(RouterConfig { limits, ..RouterConfig::default() }, true).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    agent
        .register("agent.stack4things.wamp_alive", move |_| {
            let g = g.clone();
            async move {
                g.notified().await;
                Ok(Payload::default())
            }
        })
        .await
        .unwrap();
    let (mut ws, _) = joined(&r).await;
    for request in 1..=100u64 {
        send(&mut ws, json!([48, request, {}, "agent.stack4things.wamp_alive"])).await;
    }
    let mut limited = 0;
    let mut others = Vec::new();
    while limited + others.len() < 92 {
        let m = next(&mut ws).await.expect("the flooding session stays open");
        if m[0] == 8 && m[4] == "s4t.error.limit_exceeded" {
            limited += 1;
        } else {
            others.push(m);
        }
    }
    assert_eq!(limited, 92, "unexpected answers: {others:?}");
    // Still open and served: answer the 8 in-flight calls (up to 16 handlers run at once).
    for _ in 0..8 {
        gate.notify_one();
    }
    let mut results = 0;
    while results < 8 {
        let m = next(&mut ws).await.expect("results");
        if m[0] == 50 {
            results += 1;
        }
    }
}

#[tokio::test]
async fn a_board_that_stops_reading_is_dropped_and_others_continue() {
    // Calls of 1 MiB, to fill the stuck board's socket and queue quickly.
    let limits =
        Limits { stuck_timeout: Duration::from_millis(300), max_invocation_payload: 4 << 20, ..Limits::default() };
    let config = RouterConfig {
        limits,
        queue_capacity: 4,
        write_timeout: Duration::from_secs(1),
        max_message_size: 4 << 20,
        ..RouterConfig::default()
    };
    let r = TestRouter::start(config, true).await;
    let (agent, _board, p) = healthy_board(&r).await;
    // A legacy board registers a procedure, then never reads again.
    let (mut ws, id) = joined(&r).await;
    r.router.bind_board(id, OTHER_BOARD).unwrap();
    let stuck = format!("iotronic.{id}.{OTHER_BOARD}.DevicePing");
    send(&mut ws, json!([64, 1, {}, stuck])).await;
    assert_eq!(next(&mut ws).await.unwrap()[0], 65);
    let payload = json!("y".repeat(1 << 20));
    let mut unavailable = 0;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while r.router.session(id).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the stuck session was never dropped");
        let e = agent.call(&stuck, vec![payload.clone()], Default::default(), Duration::from_millis(50)).await;
        if e.as_ref().err().and_then(|e| e.wamp_uri()) == Some("wamp.error.unavailable") {
            unavailable += 1;
        }
        still_healthy(&agent, &p).await;
    }
    assert!(unavailable > 0, "calls to a full queue fail fast with wamp.error.unavailable");
    drop(ws);
}

#[tokio::test]
async fn the_router_drops_a_peer_that_stops_answering_pings() {
    let keepalive = s4t_wamp::Keepalive { interval: Duration::from_millis(100), timeout: Duration::from_millis(100) };
    let r = TestRouter::start(RouterConfig { keepalive: Some(keepalive), ..RouterConfig::default() }, true).await;
    let (ws, id) = joined(&r).await;
    // `ws` is never polled again: it answers no ping, yet its TCP connection stays open.
    wait_until("the silent peer is dropped", || r.router.session(id).is_none()).await;
    drop(ws);
}

/// A "router" that welcomes the client (session 42): its URL, and the WebSocket once the
/// session is open, for the test to hold, read or drop.
#[allow(clippy::result_large_err)] // the handshake callback's signature is tungstenite's
async fn fake_router() -> (String, tokio::sync::oneshot::Receiver<WebSocketStream<TcpStream>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let choose = |_: &tokio_tungstenite::tungstenite::handshake::server::Request,
                      mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
            resp.headers_mut().insert("Sec-WebSocket-Protocol", "wamp.2.json".parse().unwrap());
            Ok(resp)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, choose).await.unwrap();
        let _hello = ws.next().await;
        ws.send(Ws::Text(json!([2, 42, {"authrole": "board"}]).to_string().into())).await.unwrap();
        let _ = held_tx.send(ws);
    });
    (url, held_rx)
}

#[tokio::test]
async fn the_client_notices_a_router_that_went_silent() {
    // A "router" that welcomes the client and then never reads its socket again.
    let (url, held_rx) = fake_router().await;
    let mut config = s4t_wamp::ClientConfig::new(&url, "s4t", s4t_wamp::ClientAuth::Anonymous);
    config.keepalive =
        Some(s4t_wamp::Keepalive { interval: Duration::from_millis(100), timeout: Duration::from_millis(100) });
    let session = connect(&config).await.unwrap();
    assert_eq!(session.id(), 42);
    let _held = held_rx.await.unwrap();
    match within("the client gives up on the silent router", session.closed()).await {
        s4t_wamp::CloseReason::Lost(why) => assert!(why.contains("keepalive"), "{why}"),
        other => panic!("{other:?}"),
    }
}

/// A "router" that welcomes the client, then reads (answering pings) and answers nothing:
/// its URL, and what it receives (closed when the client closes the connection).
async fn router_that_never_answers() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (url, held) = fake_router().await;
    let (seen, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let Ok(mut ws) = held.await else { return };
        while let Some(Ok(m)) = ws.next().await {
            if let Ws::Text(t) = m {
                let _ = seen.send(serde_json::from_str::<Value>(t.as_str()).unwrap());
            }
        }
    });
    (url, received)
}

/// A REGISTER (or SUBSCRIBE, UNREGISTER, acknowledged PUBLISH) the router never answers fails
/// after `request_timeout`: it waited for ever, and a board's login with it (the router kept
/// answering pings, so the keepalive saw nothing wrong).
#[tokio::test]
async fn a_request_the_router_never_answers_times_out() {
    let (url, _received) = router_that_never_answers().await;
    let mut config = s4t_wamp::ClientConfig::new(&url, "s4t", s4t_wamp::ClientAuth::Anonymous);
    config.request_timeout = Duration::from_millis(300);
    let session = connect(&config).await.unwrap();
    let handler = |_| async { Ok(Payload::default()) };
    let registered = within("register gives up", session.register("com.example.p", handler)).await;
    assert!(matches!(registered, Err(s4t_wamp::Error::Timeout("register"))), "{registered:?}");
    let subscribed = within("subscribe gives up", session.subscribe("com.example.t", 8)).await;
    assert!(matches!(subscribed, Err(s4t_wamp::Error::Timeout("subscribe"))), "{subscribed:?}");
}

/// A call its caller gives up on (its future dropped before the call's own timeout, as the
/// board's agent does with a shorter timeout of its own) is cancelled at the router: its
/// entry stayed, and the router's work on it went on, until the router answered.
#[tokio::test]
async fn a_call_dropped_by_its_caller_is_cancelled() {
    let (url, mut received) = router_that_never_answers().await;
    let config = s4t_wamp::ClientConfig::new(&url, "s4t", s4t_wamp::ClientAuth::Anonymous);
    let session = connect(&config).await.unwrap();
    let call = session.call("com.example.slow", vec![], Default::default(), Duration::from_secs(30));
    assert!(tokio::time::timeout(Duration::from_millis(100), call).await.is_err(), "answered");
    let request = within("the CALL", async {
        loop {
            let m = received.recv().await.unwrap();
            if m[0] == 48 {
                return m[1].clone();
            }
        }
    })
    .await;
    let cancel = within("the CANCEL", async {
        loop {
            let m = received.recv().await.unwrap();
            if m[0] == 49 {
                return m;
            }
        }
    })
    .await;
    assert_eq!(cancel[1], request, "{cancel}");
}

/// A session that leaves a router that never answers its GOODBYE (but answers pings) still
/// ends, and its connection closes: the session's task, its connection and its handlers
/// stayed for ever, one more at each of a board's reconnects.
#[tokio::test(start_paused = true)]
async fn leaving_a_router_that_never_says_goodbye_closes_the_connection() {
    let (url, mut received) = router_that_never_answers().await;
    let config = s4t_wamp::ClientConfig::new(&url, "s4t", s4t_wamp::ClientAuth::Anonymous);
    let session = connect(&config).await.unwrap();
    session.leave().await;
    drop(session);
    // The router's reader ends (its sender dropped) once the client closes the connection.
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = received.recv().await {
            assert_eq!(m[0], 6, "only GOODBYE: {m}");
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection stayed open");
}

#[tokio::test]
async fn publication_floods_are_rate_limited() {
    let limits = Limits { publish_rate: 50, publish_burst: 20, ..Limits::default() };
    let r = TestRouter::start(RouterConfig { limits, ..RouterConfig::default() }, false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let topic = format!("board.{BOARD}.gpio");
    let mut events = agent.subscribe(&topic, 1024).await.unwrap();
    let board = connect(&r.board(Serializer::Json)).await.unwrap();
    let started = std::time::Instant::now();
    let mut refused = 0;
    for i in 0..100 {
        match board.publish_acked(&topic, vec![json!(i)], Default::default()).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.wamp_uri(), Some("s4t.error.limit_exceeded"), "{e}");
                refused += 1;
            }
        }
    }
    // At most the burst plus what the rate refilled meanwhile got through.
    let allowed = 20 + (started.elapsed().as_secs_f64() * 50.0).ceil() as usize;
    assert!(100 - refused <= allowed, "{} accepted, at most {allowed} allowed", 100 - refused);
    assert!(refused > 0);
    // What was accepted reached the subscriber; the agent itself is never limited.
    for _ in 0..(100 - refused) {
        within("event", events.recv()).await.unwrap();
    }
    for i in 0..100 {
        agent.publish_acked("agent.broadcast", vec![json!(i)], Default::default()).await.unwrap();
    }
}

/// The CHALLENGE and the refusal a WAMP-CRA login gets, answered with a wrong signature.
async fn cra_attempt(r: &TestRouter, authid: &str) -> (Value, Value) {
    let mut ws = raw(r, "wamp.2.json").await;
    let hello = json!([1, "s4t", {"roles": {"caller": {}}, "authmethods": ["wampcra"], "authid": authid}]);
    send(&mut ws, hello).await;
    let challenge = next(&mut ws).await.expect("a CHALLENGE");
    assert_eq!((challenge[0].as_u64(), challenge[1].as_str()), (Some(4), Some("wampcra")), "{challenge}");
    send(&mut ws, json!([5, "bm90IGEgc2lnbmF0dXJl", {}])).await;
    let refusal = next(&mut ws).await.expect("an ABORT");
    assert!(next(&mut ws).await.is_none(), "the connection must close after ABORT");
    (challenge[2].clone(), refusal)
}

/// A peer cannot learn which board uuids exist: an unknown authid is challenged like a known
/// one (the same fields, a salt of the same form that stays the same on the next attempt, as a
/// real board's does) and refused, after its answer, with the same ABORT as a wrong secret.
#[tokio::test]
async fn unknown_cra_identities_look_like_known_ones() {
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let (known, known_refusal) = cra_attempt(&r, BOARD).await;
    let (unknown, unknown_refusal) = cra_attempt(&r, "22222222-2c3d-4e5f-8a9b-0c1d2e3f4a5b").await;
    assert_eq!(unknown_refusal, known_refusal);
    assert_eq!(known_refusal[0], 3, "{known_refusal}");
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&unknown), keys(&known));
    for field in ["iterations", "keylen"] {
        assert_eq!(unknown[field], known[field], "{field}");
    }
    let salt_len = |v: &Value| v["salt"].as_str().unwrap().len();
    assert_eq!(salt_len(&unknown), salt_len(&known), "{unknown} vs {known}");
    let inner = |v: &Value| serde_json::from_str::<Value>(v["challenge"].as_str().unwrap()).unwrap();
    assert_eq!(inner(&unknown)["authrole"], inner(&known)["authrole"]);
    let (again, _) = cra_attempt(&r, "22222222-2c3d-4e5f-8a9b-0c1d2e3f4a5b").await;
    assert_eq!(again["salt"], unknown["salt"], "the salt of an authid must not change between attempts");
    let (other, _) = cra_attempt(&r, "33333333-2c3d-4e5f-8a9b-0c1d2e3f4a5b").await;
    assert_ne!(other["salt"], unknown["salt"]);
    // The real board still logs in.
    connect(&r.board(Serializer::Json)).await.unwrap();
}

/// One address with idle sockets holds at most `max_opening_per_source` opening handshakes
/// (the next is closed at once), so it cannot take every slot: a board from another address
/// still joins.
#[tokio::test]
async fn one_address_cannot_hold_every_opening_handshake() {
    use tokio::io::AsyncReadExt;
    let r = TestRouter::start(RouterConfig { max_opening_per_source: 4, ..RouterConfig::default() }, false).await;
    let addr: std::net::SocketAddr = r.url().trim_start_matches("ws://").trim_end_matches('/').parse().unwrap();
    let from = |ip: &str| {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s.connect(addr)
    };
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(from("127.0.0.2").await.unwrap());
    }
    let mut extra = from("127.0.0.2").await.unwrap();
    let mut buf = [0u8; 1];
    // At once, not at the handshake timeout (10 s).
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "the fifth was held: {read:?}");
    connect(&r.board(Serializer::Json)).await.unwrap();
    drop(idle);
}
