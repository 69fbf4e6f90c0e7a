//! Interop with peers no one here wrote: autobahn-python sessions (from the venv at
//! `$S4T_VENV`, default /var/cache/s4t/venv, built by .ci/setup) against our router, and our
//! client calling an autobahn callee through our router; JSON, MessagePack and CBOR.
//!
//! Without the venv the tests skip with a message, except under CI (`CI` set), where they fail.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use s4t_wamp::{ClientConfig, Payload, RouterConfig, Serializer, connect};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const T: Duration = Duration::from_secs(10);
const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/autobahn_peer.py");

fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("S4T_VENV").map(PathBuf::from).unwrap_or_else(|| "/var/cache/s4t/venv".into());
    let python = venv.join("bin/python");
    if python.exists() {
        return Some(python);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{} is missing and CI is set: run .ci/setup", python.display());
    }
    eprintln!("SKIPPED: no Python venv with autobahn at {} (set S4T_VENV or run .ci/setup)", venv.display());
    None
}

/// A running autobahn peer: its stdout lines, its stdin, its stderr kept for failures.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Peer {
    fn spawn(python: &PathBuf, args: &[&str]) -> Peer {
        let mut child = Command::new(python)
            .arg(PEER)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the autobahn peer");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s).await;
            sink.lock().unwrap().push_str(&s);
        });
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Peer { child, stdin, lines, seen: Vec::new(), stderr }
    }

    fn diagnostics(&self) -> String {
        format!("stdout so far: {:?}\nstderr: {}", self.seen, self.stderr.lock().unwrap())
    }

    /// Reads lines until one starts with `prefix`; returns the rest of that line.
    async fn expect(&mut self, prefix: &str) -> String {
        loop {
            let line = match tokio::time::timeout(T, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                Ok(_) => {
                    let _ = tokio::time::timeout(T, self.child.wait()).await;
                    panic!("the peer ended before {prefix:?}\n{}", self.diagnostics());
                }
                Err(_) => panic!("no {prefix:?} from the peer within {T:?}\n{}", self.diagnostics()),
            };
            self.seen.push(line.clone());
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    }

    async fn say(&mut self, line: &str) {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn finish(mut self) {
        self.expect("DONE").await;
        let status = tokio::time::timeout(T, self.child.wait()).await.expect("the peer exits").unwrap();
        assert!(status.success(), "the peer failed: {status}\n{}", self.diagnostics());
    }
}

/// Our client as the cloud's agent, over WebSocket with a ticket.
async fn remote_agent(r: &TestRouter, serializer: Serializer) -> s4t_wamp::Session {
    let mut config: ClientConfig = r.config(agent_auth());
    config.serializer = serializer;
    connect(&config).await.unwrap()
}

#[tokio::test]
async fn autobahn_board_and_our_client_through_our_router() {
    let Some(python) = python() else { return };
    for (theirs, ours) in [("json", Serializer::MsgPack), ("msgpack", Serializer::Cbor), ("cbor", Serializer::Json)] {
        let r = TestRouter::start(RouterConfig::default(), false).await;
        let agent = remote_agent(&r, ours).await;
        assert_eq!(agent.authrole(), "agent");
        agent
            .register("agent.stack4things.connection", |inv| async move {
                Ok(Payload::args(vec![json!({
                    "caller": inv.caller(), "authid": inv.caller_authid(), "role": inv.caller_authrole(),
                    "kwargs": inv.kwargs,
                })]))
            })
            .await
            .unwrap();
        let mut gpio = agent.subscribe(&format!("board.{BOARD}.gpio"), 8).await.unwrap();
        let mut peer = Peer::spawn(&python, &["board", &r.url(), theirs, BOARD, BOARD_SECRET, OTHER_BOARD]);
        peer.expect("OK call").await;
        peer.expect("OK publish").await;
        let event = within("gpio event", gpio.recv()).await.unwrap();
        assert_eq!(event.args, vec![json!({"line": "GPIO4", "value": 1})], "{theirs}");
        peer.expect("OK refusals").await;
        let sid: u64 = peer.expect("READY").await.parse().unwrap();
        // Our client calls the autobahn callee.
        let blob = s4t_shared::wamp::codec::binary_to_json(b"\x00\x01binary\xff");
        let args = vec![json!(1), json!("two"), json!({"x": [1.5, null, true]}), json!(blob)];
        let out = agent
            .call(&format!("iotronic.{sid}.{BOARD}.DeviceEcho"), args.clone(), kw(json!({"k": "v"})), T)
            .await
            .unwrap_or_else(|e| panic!("{theirs}: {e}"));
        assert_eq!(out.args, args, "{theirs}");
        assert_eq!(out.kwargs, kw(json!({"k": "v"})), "{theirs}");
        peer.say("bye").await;
        peer.finish().await;
        wait_until("the board left", || r.router.session(sid).is_none()).await;
    }
}

#[tokio::test]
async fn autobahn_agent_sees_meta_events_and_calls_our_board() {
    let Some(python) = python() else { return };
    for serializer in ["json", "msgpack", "cbor"] {
        let r = TestRouter::start(RouterConfig::default(), false).await;
        let mut peer = Peer::spawn(&python, &["agent", &r.url(), serializer, AGENT_TICKET]);
        peer.expect("READY").await;
        let board = connect(&r.board(Serializer::Json)).await.unwrap();
        let ping = format!("iotronic.{}.{BOARD}.DevicePing", board.id());
        board.register(&ping, |inv| async move { Ok(Payload::new(inv.args, inv.kwargs)) }).await.unwrap();
        peer.say(&format!("board {} {BOARD}", board.id())).await;
        peer.expect("OK on_join").await;
        peer.expect("OK meta").await;
        peer.expect("OK call").await;
        board.leave().await;
        peer.say("left").await;
        peer.expect("OK on_leave").await;
        peer.finish().await;
    }
}

#[tokio::test]
async fn autobahn_refusals_and_enrollment() {
    let Some(python) = python() else { return };
    let r = TestRouter::start(RouterConfig::default(), false).await;
    let agent = r.router.local_session("agent").await.unwrap();
    agent
        .register("stack4things.register", |inv| async move {
            let ok = inv.caller_authrole() == Some("enrollment") && inv.kwargs.get("code") == Some(&json!(ENROLL_CODE));
            let result = if ok { "SUCCESS" } else { "ERROR" };
            Ok(Payload::args(vec![json!(json!({"message": {}, "result": result}).to_string())]))
        })
        .await
        .unwrap();
    agent.register("agent.stack4things.connection", |_| async { Ok(Payload::default()) }).await.unwrap();
    let mut peer = Peer::spawn(&python, &["refused", &r.url(), "json", BOARD, ENROLL_CODE]);
    peer.expect("OK aborts").await;
    peer.expect("OK enrollment").await;
    peer.finish().await;
}

#[tokio::test]
async fn autobahn_legacy_board_is_bound_after_connection() {
    let Some(python) = python() else { return };
    let r = TestRouter::start(RouterConfig::default(), true).await;
    let agent = r.router.local_session("agent").await.unwrap();
    let router = r.router.clone();
    agent
        .register("agent.stack4things.connection", move |inv| {
            // The cloud checks the board and binds it to the caller's session, as the
            // wamp-agent does after a successful login.
            let bound = match (inv.caller(), inv.kwargs.get("uuid").and_then(|u| u.as_str())) {
                (Some(session), Some(uuid)) => router.bind_board(session, uuid).is_ok(),
                _ => false,
            };
            let result = if bound { "SUCCESS" } else { "ERROR" };
            async move { Ok(Payload::args(vec![json!(json!({"message": "", "result": result}).to_string())])) }
        })
        .await
        .unwrap();
    let mut peer = Peer::spawn(&python, &["legacy", &r.url(), "json", BOARD]);
    let sid: u64 = peer.expect("READY").await.parse().unwrap();
    let reply = agent
        .call(&format!("iotronic.{sid}.{BOARD}.DevicePing"), vec![json!({"uuid": "req-9"})], Default::default(), T)
        .await
        .unwrap();
    let message: serde_json::Value = serde_json::from_str(reply.args[0].as_str().unwrap()).unwrap();
    assert_eq!(message, json!({"message": "pong", "result": "SUCCESS", "req_id": "req-9"}));
    assert_eq!(r.router.session(sid).unwrap().board.as_deref(), Some(BOARD));
    peer.say("bye").await;
    peer.finish().await;
}
