//! Legacy mode at wire level (S4T-REFERENCE §5, §11), in process: `iotronic::serve` with
//! `legacy_boards`, and anonymous WAMP sessions speaking as the original lightning-rod does
//! (kwargs, JSON-string replies). The real original runs in `tests/tests/legacy.rs`; this
//! covers what it cannot show: exact reply shapes, the `req` dict omitted below 0.4.9, and an
//! anonymous session refused the identity of a board that holds a credential.

mod common;

use common::rest::Api;

use std::time::{Duration, Instant};

use iotronic::ServeConfig;
use reqwest::StatusCode;
use s4t_wamp::{ClientAuth, ClientConfig, Dict, Payload, Secret, Session};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const CALL: Duration = Duration::from_secs(10);

impl Api {
    async fn create_board(&self, name: &str, code: &str) -> String {
        let body = json!({"name": name, "code": code, "type": "generic",
                          "location": [{"latitude": "38.2", "longitude": "15.5", "altitude": "3"}]});
        let (s, b) = self.req("POST", "/v1/boards", Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["uuid"].as_str().unwrap().to_owned()
    }
}

fn kwargs(v: Value) -> Dict {
    match v {
        Value::Object(m) => m.into_iter().collect(),
        _ => panic!("kwargs must be an object"),
    }
}

/// Calls a cloud procedure with kwargs, as the original does, and parses the reply, which
/// must be a JSON string of exactly `message` and `result` (the original does
/// `WampMessage(**json.loads(reply))`).
async fn call_original(s: &Session, procedure: &str, kw: Value) -> (String, Value) {
    let p = s.call(procedure, vec![], kwargs(kw), CALL).await.unwrap();
    let text = p.args.first().and_then(Value::as_str).unwrap_or_else(|| panic!("{procedure}: not a string: {p:?}"));
    let v: Value = serde_json::from_str(text).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["message", "result"], "{procedure}: {text}");
    (v["result"].as_str().unwrap().to_owned(), v["message"].clone())
}

async fn anonymous(url: &str) -> Session {
    s4t_wamp::client::connect(&ClientConfig::new(url, "s4t", ClientAuth::Anonymous)).await.unwrap()
}

/// Logs `uuid` in on `s` as the original does; returns the reply.
async fn login(s: &Session, uuid: &str, lr_version: &str) -> (String, Value) {
    let info = json!({"lr_version": lr_version, "connectivity": {"iface": "eth0", "local_ip": "10.0.0.2", "mac": "02:00:00:00:00:01"}});
    call_original(s, "agent.stack4things.connection", json!({"uuid": uuid, "session": s.id(), "info": info})).await
}

/// Registers `DeviceEcho` under the session's prefix; every call's positional args go to the
/// returned channel and the reply is the original's WampMessage string (RUNNING for
/// `say: "running"`, to be completed by `notify_result`).
async fn serve_echo(s: &Session, uuid: &str) -> mpsc::Receiver<Vec<Value>> {
    let (tx, rx) = mpsc::channel(8);
    s.register(&format!("iotronic.{}.{uuid}.DeviceEcho", s.id()), move |inv| {
        let tx = tx.clone();
        async move {
            let say = inv.args.last().and_then(|p| p.get("say")).cloned().unwrap_or(Value::Null);
            let _ = tx.send(inv.args.clone()).await;
            // "running": answer as the original does for work it finishes later.
            let reply = match say.as_str().unwrap_or("") {
                "running" => json!({"message": "DeviceEcho", "result": "RUNNING"}),
                say => json!({"message": format!("{say} @ now"), "result": "SUCCESS"}),
            };
            Ok(Payload::new(vec![json!(reply.to_string())], Dict::new()))
        }
    })
    .await
    .unwrap();
    rx
}

async fn wait_online(api: &Api, board: &str, session: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = api.req("GET", &format!("/v1/boards/{board}"), None).await;
        if v["status"] == "online" && v["session"].as_str() == Some(session.to_string().as_str()) {
            return;
        }
        assert!(Instant::now() < deadline, "board {board} not online on session {session}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_boards_speak_the_original_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::new(dir.path().join("cloud"));
    config.bind = "127.0.0.1".parse().unwrap();
    config.plaintext = true;
    config.rest_port = 0;
    config.wamp_port = 0;
    config.tunnel_port = 0;
    config.legacy_boards = true;
    config.admin_password = Some("admin-password".into());
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(iotronic::serve(config, stop.clone(), Some(tx)));
    let listening = rx.await.unwrap();
    let wamp = format!("ws://{}/", listening.wamp.unwrap());
    let http = reqwest::Client::new();
    let url = format!("http://{}", listening.rest);
    let t: Value = http
        .post(format!("{url}/v1/auth/tokens"))
        .json(&json!({"username": "admin", "password": "admin-password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api = Api { url, http, token: t["token"].as_str().unwrap().to_owned() };
    let old = api.create_board("old", "CODE-OLD").await;
    let older = api.create_board("older", "CODE-OLDER").await;
    let secure = api.create_board("secure", "CODE-SECURE").await;

    // Registration as the original: kwargs code and session, the config document back.
    let reg = anonymous(&wamp).await;
    let (result, message) =
        call_original(&reg, "stack4things.register", json!({"code": "CODE-OLD", "session": reg.id()})).await;
    assert_eq!(result, "SUCCESS", "{message}");
    let board = &message["iotronic"]["board"];
    assert_eq!(
        (&board["uuid"], &board["status"], &board["agent"]),
        (&json!(old), &json!("registered"), &json!("agent"))
    );
    for key in ["code", "name", "type", "mobile", "extra", "created_at", "updated_at", "location"] {
        assert!(board.get(key).is_some(), "config lacks iotronic.board.{key}: {message}");
    }
    assert_eq!(message["iotronic"]["extra"], json!({}));
    assert_eq!(message["iotronic"]["wamp"]["main-agent"], json!({"url": wamp, "realm": "s4t"}));
    assert!(message["iotronic"].get("credentials").is_none(), "no secret for an anonymous board: {message}");
    let (result, message) =
        call_original(&reg, "stack4things.register", json!({"code": "NOPE", "session": reg.id()})).await;
    assert_eq!(result, "ERROR", "{message}");
    reg.leave().await;

    // The board enrolled with a credential (ticket) cannot be taken over anonymously.
    let mut enroll = ClientConfig::new(
        &wamp,
        "s4t",
        ClientAuth::Ticket { authid: "enroll".into(), ticket: Secret::new("CODE-SECURE") },
    );
    enroll.connect_timeout = CALL;
    let e = s4t_wamp::client::connect(&enroll).await.unwrap();
    let p = e.call("stack4things.register", vec![], kwargs(json!({"code": "CODE-SECURE", "session": e.id()})), CALL);
    let reply: Value = serde_json::from_str(p.await.unwrap().args[0].as_str().unwrap()).unwrap();
    assert_eq!(reply["result"], "SUCCESS", "{reply}");
    e.leave().await;
    let thief = anonymous(&wamp).await;
    let (result, message) = login(&thief, &secure, "0.5.0").await;
    assert_eq!((result.as_str(), &message), ("ERROR", &json!("this board authenticates: anonymous login refused")));
    let (_, b) = api.req("GET", "/v1/boards/secure", None).await;
    assert_ne!(b["status"], "online", "{b}");
    // Nor may it register procedures under that board's name.
    let uri = format!("iotronic.{}.{secure}.DevicePing", thief.id());
    let stolen = thief.register(&uri, |_| async { Ok(Payload::new(vec![], Dict::new())) }).await;
    assert!(stolen.is_err(), "an anonymous session registered a procedure of another board");

    // 0.5.0: login answers the exact shape, the board is online and legacy, and every call
    // carries the request dict first.
    let lr = anonymous(&wamp).await;
    assert_eq!(login(&lr, &old, "0.5.0").await, ("SUCCESS".to_owned(), json!("")));
    let mut calls = serve_echo(&lr, &old).await;
    wait_online(&api, "old", lr.id()).await;
    let (_, b) = api.req("GET", "/v1/boards/old", None).await;
    assert_eq!(
        (&b["lr_version"], &b["legacy"], &b["connectivity"]["local_ip"]),
        (&json!("0.5.0"), &json!(true), &json!("10.0.0.2"))
    );
    let (s, v) = api
        .req("POST", "/v1/boards/old/action", Some(json!({"action": "DeviceEcho", "parameters": {"say": "hi"}})))
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!("hi @ now")));
    let args = calls.recv().await.unwrap();
    assert_eq!(args.len(), 2, "{args:?}");
    assert!(args[0]["uuid"].is_string() && args[0]["main_request_uuid"].is_null(), "{args:?}");
    assert_eq!(args[1], json!({"say": "hi"}));
    // wamp_alive answers the original's plain string.
    let alive =
        lr.call("agent.stack4things.wamp_alive", vec![], kwargs(json!({"board_uuid": old, "board_name": "old"})), CALL);
    assert!(alive.await.unwrap().args[0].as_str().unwrap().starts_with("Iotronic alive @ "));
    // notify_result completes a RUNNING request of this board, in the exact reply shape; the
    // board's own request only, and only from that board's session.
    let (s, accepted) = api
        .req(
            "POST",
            "/v1/boards/old/action?async=true",
            Some(json!({"action": "DeviceEcho", "parameters": {"say": "running"}})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{accepted}");
    let request = accepted["uuid"].as_str().unwrap().to_owned();
    calls.recv().await.unwrap();
    let wm = |m: &str| json!({"message": m, "result": "SUCCESS", "req_id": request}).to_string();
    let forged = json!({"board_uuid": old, "wampmessage": wm("forged")});
    let (result, _) = call_original(&thief, "agent.stack4things.notify_result", forged).await;
    assert_eq!(result, "ERROR", "another session reported the board's result");
    let late = json!({"board_uuid": old, "wampmessage": wm("late")});
    let (result, message) = call_original(&lr, "agent.stack4things.notify_result", late).await;
    assert_eq!((result.as_str(), message), ("SUCCESS", json!("notification_received")));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, r) = api.req("GET", &format!("/v1/requests/{request}/results"), None).await;
        if r["results"][0]["message"] == "late" {
            break;
        }
        assert!(Instant::now() < deadline, "the notified result never arrived: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bogus = json!({"message": "m", "result": "SUCCESS", "req_id": "no-such-request"}).to_string();
    let bogus = json!({"board_uuid": old, "wampmessage": bogus});
    assert_eq!(call_original(&lr, "agent.stack4things.notify_result", bogus).await.0, "ERROR");

    // Below 0.4.9 the request dict is omitted, as the original cloud does.
    let lr_old = anonymous(&wamp).await;
    let (result, message) =
        call_original(&lr_old, "stack4things.register", json!({"code": "CODE-OLDER", "session": lr_old.id()})).await;
    assert_eq!(result, "SUCCESS", "{message}");
    assert_eq!(login(&lr_old, &older, "0.4.8").await.0, "SUCCESS");
    let mut calls = serve_echo(&lr_old, &older).await;
    wait_online(&api, "older", lr_old.id()).await;
    let (s, v) = api
        .req("POST", "/v1/boards/older/action", Some(json!({"action": "DeviceEcho", "parameters": {"say": "old"}})))
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!("old @ now")));
    assert_eq!(calls.recv().await.unwrap(), vec![json!({"say": "old"})]);

    // A service of the original board: the original argument shape (service dict, public
    // port), and the wstun tunnel server opens that port only for this board.
    let (tx, mut enables) = mpsc::channel(4);
    let enable = format!("iotronic.{}.{old}.ServiceEnable", lr.id());
    lr.register(&enable, move |inv| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(inv.args.clone()).await;
            let reply = json!({"message": "exposed", "result": "SUCCESS"}).to_string();
            Ok(Payload::new(vec![json!(reply)], Dict::new()))
        }
    })
    .await
    .unwrap();
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let svc = json!({"name": "echo", "port": echo_addr.port(), "protocol": "TCP"});
    assert_eq!(api.req("POST", "/v1/services", Some(svc)).await.0, StatusCode::CREATED);
    let (s, ex) =
        api.req("POST", "/v1/boards/old/services/echo/action", Some(json!({"action": "ServiceEnable"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{ex}");
    let public = u16::try_from(ex["public_port"].as_u64().unwrap()).unwrap();
    let args = enables.recv().await.unwrap();
    assert_eq!(args[1]["port"], echo_addr.port(), "{args:?}");
    assert!(args[1].get("tunnel_token").is_none(), "the original gets the original service dict: {args:?}");
    assert_eq!(args[2], public);
    let tunnel = format!("ws://{}", listening.tunnel.unwrap());
    let wstun = |board: &str| wstunnel::wstun::LegacyClient {
        public_port: public,
        target: echo_addr.to_string(),
        url: tunnel.clone(),
        board: Some(board.to_owned()),
    };
    let refused = tokio::time::timeout(CALL, wstun(&secure).run(CancellationToken::new())).await;
    assert!(refused.unwrap().is_err(), "a wstun client naming another board got the port");
    let client_stop = CancellationToken::new();
    let client = wstun(&old);
    let stop_client = client_stop.clone();
    tokio::spawn(async move { client.run(stop_client).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", public)).await {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "public port {public} never opened: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"through wstun").await.unwrap();
    let mut buf = [0u8; 13];
    tokio::time::timeout(CALL, conn.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"through wstun");
    client_stop.cancel();

    // Leaving marks the board offline.
    lr.leave().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, b) = api.req("GET", "/v1/boards/old", None).await;
        if b["status"] == "offline" {
            break;
        }
        assert!(Instant::now() < deadline, "still {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
