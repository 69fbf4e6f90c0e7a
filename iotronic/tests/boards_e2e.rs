//! The whole cloud (`iotronic::serve`: REST, conductor, wamp-agent with the real router) and
//! real `lightning-rod` processes with the sim HAL as boards: create → enroll → online →
//! action → GPIO → I2C → offline on disconnect → queued command delivered on reconnect.
//! The lightning-rod binary must be built (`cargo build --workspace --bins`, as .ci/test does).

mod common;

use common::rest::Api;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iotronic::ServeConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn lightning_rod() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = match std::env::var_os("S4T_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => exe.parent().unwrap().parent().unwrap().to_path_buf(),
    };
    let p = dir.join("lightning-rod");
    assert!(p.is_file(), "{} not found: run `cargo build --workspace --bins` first", p.display());
    p
}

/// Kills the board process when the test ends, however it ends.
struct Board(Child);

impl Drop for Board {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn board_config(dir: &Path) -> PathBuf {
    let p = dir.join("config.toml");
    let cfg = format!(
        "[cloud]\nlegacy_settings = \"{0}/none.json\"\nlegacy_conf = \"{0}/none.conf\"\n[board]\nstate_dir = \"{0}/state\"\n\
         [hal]\nbackend = \"sim\"\n[timers]\nalive_interval_s = 5\nbackoff_initial_ms = 50\nbackoff_max_s = 1\n",
        dir.display()
    );
    std::fs::write(&p, cfg).unwrap();
    p
}

fn run_board(config: &Path, log: &Path) -> Board {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(lightning_rod())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Board(child)
}

impl Api {
    async fn wait_status(&self, board: &str, status: &str, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = self.req("GET", &format!("/v1/boards/{board}"), None).await;
            if v["status"] == status {
                return;
            }
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            assert!(Instant::now() < deadline, "board never became {status}: {v}\nboard log:\n{tail}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_board_enrolls_answers_goes_offline_and_gets_its_queued_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::new(dir.path().join("cloud"));
    config.bind = "127.0.0.1".parse().unwrap();
    config.plaintext = true;
    config.rest_port = 0;
    config.wamp_port = 0;
    config.admin_password = Some("admin-password".into());
    // One connection per source to the public ports (`--public-connections-per-source`).
    config.public_per_source = 1;
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(iotronic::serve(config, stop.clone(), Some(tx)));
    let listening = rx.await.unwrap();
    let wamp = listening.wamp.unwrap();
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

    let body = json!({"name": "lr1", "code": "CODE-LR1", "type": "generic",
                      "location": [{"latitude": "38.2", "longitude": "15.5", "altitude": "3"}]});
    let (s, b) = api.req("POST", "/v1/boards", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let board_dir = dir.path().join("board");
    std::fs::create_dir_all(&board_dir).unwrap();
    let cfg = board_config(&board_dir);
    let log = board_dir.join("lr.log");

    // A wrong code is refused; the right one enrolls (and is consumed).
    let enroll = |code: &str| {
        Command::new(lightning_rod())
            .args(["enroll", "--url", &format!("ws://{wamp}/"), "--code", code, "--config"])
            .arg(&cfg)
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap()
    };
    assert!(!enroll("WRONG").status.success());
    let out = enroll("CODE-LR1");
    assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
    let (_, b) = api.req("GET", "/v1/boards/lr1", None).await;
    assert_eq!((b["status"].as_str(), &b["code"]), (Some("offline"), &Value::Null), "{b}");

    let board = run_board(&cfg, &log);
    api.wait_status("lr1", "online", &log).await;
    let (_, b) = api.req("GET", "/v1/boards/lr1", None).await;
    assert_eq!(b["agent"], "agent");
    assert!(b["lr_version"].is_string(), "{b}");

    let (s, v) =
        api.req("POST", "/v1/boards/lr1/action", Some(json!({"action": "DevicePing", "parameters": {}}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api.req("PUT", "/v1/boards/lr1/gpio/GPIO5", Some(json!({"value": 1, "direction": "out"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api.req("GET", "/v1/boards/lr1/gpio/GPIO5", None).await;
    assert_eq!((s, v["value"].as_u64()), (StatusCode::OK, Some(1)), "{v}");
    let (s, v) = api.req("GET", "/v1/boards/lr1/gpio", None).await;
    assert!(s == StatusCode::OK && v["lines"].as_array().is_some_and(|l| l.len() >= 28), "{v}");
    let (s, v) = api.req("POST", "/v1/boards/lr1/i2c/1/0x48/write", Some(json!({"register": 0, "data": [42]}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api.req("POST", "/v1/boards/lr1/i2c/1/72/read", Some(json!({"register": 0, "length": 1}))).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"data": [42]})));
    let (s, v) = api.req("PUT", "/v1/boards/lr1/gpio/NOPE", Some(json!({"value": 1}))).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "the board's ERROR for a bad line: {v}");

    // Expose a TCP service of the board through the tunnel server; reach it on the public port.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let (s, v) =
        api.req("POST", "/v1/services", Some(json!({"name": "echo", "port": echo_port, "protocol": "TCP"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, ex) =
        api.req("POST", "/v1/boards/lr1/services/echo/action", Some(json!({"action": "ServiceEnable"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{ex}");
    let public = ex["public_port"].as_u64().unwrap() as u16;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", public)).await {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "public port {public} never opened: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"through the tunnel").await.unwrap();
    let mut buf = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"through the tunnel");
    // A second one from the same address is closed at once: the configured bound holds.
    let mut second = tokio::net::TcpStream::connect(("127.0.0.1", public)).await.unwrap();
    let _ = second.write_all(b"again").await;
    let read = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "a second connection from one source was served: {read:?}");
    drop(conn);
    let (s, v) =
        api.req("POST", "/v1/boards/lr1/services/echo/action", Some(json!({"action": "ServiceDisable"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = api.req("GET", "/v1/boards/lr1/services", None).await;
    assert_eq!(v["exposed"], json!([]));

    // The board dies: offline. A queued command waits for it and runs when it is back.
    drop(board);
    api.wait_status("lr1", "offline", &log).await;
    let (s, q) = api.req("POST", "/v1/boards/lr1/action?queue=true", Some(json!({"action": "DevicePing"}))).await;
    assert_eq!((s, q["status"].as_str()), (StatusCode::ACCEPTED, Some("QUEUED")), "{q}");
    let _board = run_board(&cfg, &log);
    api.wait_status("lr1", "online", &log).await;
    let uuid = q["uuid"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, r) = api.req("GET", &format!("/v1/requests/{uuid}"), None).await;
        if r["status"] == "COMPLETED" {
            let (_, res) = api.req("GET", &format!("/v1/requests/{uuid}/results"), None).await;
            assert_eq!(res["results"][0]["result"], "SUCCESS", "{res}");
            break;
        }
        assert!(Instant::now() < deadline, "queued request not delivered: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
