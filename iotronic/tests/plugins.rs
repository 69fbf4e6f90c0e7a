//! Plugins end to end (issue 11): the whole cloud (`iotronic::serve`) and a real
//! `lightning-rod` (sim HAL) running real WebAssembly plugins: the Rust examples of
//! `plugins/` (built here for wasm32) and modules written in WAT below.
//!
//! create → inject → call (the result through the REST API, parameter keys checked) → grants
//! (a plugin gets only its lines; the board refuses grants it does not allow) → a runaway call
//! stopped at its time limit while `DevicePing` keeps answering, a trap reported → start /
//! status / stop of a long-running plugin → the board agent killed and started again: the
//! `onboot` plugin runs again by itself → remove and delete; the same through `s4t plugin`.
//! An original-format Python plugin (pickled by the cloud) runs too: python3 must exist.
//! The lightning-rod binary must be built (`cargo build --workspace --bins`, as .ci/test does).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::TestDb;
use iotronic::ServeConfig;
use iotronic::db::{Injection, NewBoard, Plugin};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

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

/// Builds the example plugins of `plugins/` for wasm32; their modules by name.
fn example_plugins(target: &Path) -> (Vec<u8>, Vec<u8>) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-unknown-unknown", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the example plugins failed (is the wasm32-unknown-unknown target installed? \
         `rustup target add wasm32-unknown-unknown`, as .ci/setup does):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = target.join("wasm32-unknown-unknown/release");
    (std::fs::read(dir.join("blink.wasm")).unwrap(), std::fs::read(dir.join("thermometer.wasm")).unwrap())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn wat(text: &str) -> String {
    b64(&wat::parse_str(text).unwrap())
}

/// `plugins_examples/generics/echo.py` of the original lightning-rod 0.5.0.
const ORIGINAL_ECHO: &str = r#"from iotronic_lightningrod.modules.plugins import Plugin
from oslo_log import log as logging
LOG = logging.getLogger(__name__)


class Worker(Plugin.Plugin):
    def __init__(self, uuid, name, q_result, params=None):
        super(Worker, self).__init__(uuid, name, q_result, params)

    def run(self):
        LOG.info("Input parameters: " + str(self.params['name']))
        self.q_result.put("ECHO RESULT: " + str(self.params['name']))
"#;

/// Loops forever without sleeping.
const RUNAWAY: &str = r#"(module (memory (export "memory") 1)
  (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;

const TRAP: &str = r#"(module (memory (export "memory") 1) (func (export "run") (result i32) unreachable))"#;

/// Drives GPIO20 high, then sleeps in a loop until stopped.
const TICKER: &str = r#"(module
  (import "s4t" "gpio_write" (func $gw (param i32 i32 i32) (result i32)))
  (import "s4t" "sleep_ms" (func $sleep (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "GPIO20")
  (func (export "run") (result i32)
    (if (i32.ne (call $gw (i32.const 0) (i32.const 6) (i32.const 1)) (i32.const 0)) (then (return (i32.const 1))))
    (loop $l (call $sleep (i32.const 50)) (br $l))
    (i32.const 0)))"#;

/// Answers with its parameters.
const ECHO: &str = r#"(module
  (import "s4t" "params_len" (func $plen (result i32)))
  (import "s4t" "params_read" (func $pread (param i32 i32) (result i32)))
  (import "s4t" "set_result" (func $res (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (drop (call $pread (i32.const 0) (call $plen)))
    (drop (call $res (i32.const 0) (call $plen)))
    (i32.const 0)))"#;

struct Board(Child);

impl Drop for Board {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn board_config(dir: &Path) -> PathBuf {
    let p = dir.join("config.toml");
    // A huge fuel budget: the runaway call below is ended by its 3 s time limit.
    let cfg = format!(
        "[cloud]\nlegacy_settings = \"{0}/none.json\"\nlegacy_conf = \"{0}/none.conf\"\n[board]\nstate_dir = \"{0}/state\"\n\
         [hal]\nbackend = \"sim\"\n[timers]\nalive_interval_s = 5\nbackoff_initial_ms = 50\nbackoff_max_s = 1\n\
         [plugins]\nmax_running = 8\ncall_timeout_s = 3\nfuel = 1000000000000\npython = true\n\
         allow_gpio = [\"GPIO17\", \"GPIO18\", \"GPIO20\"]\nallow_i2c = [{{ bus = 1, address = 0x48 }}]\n",
        dir.display()
    );
    std::fs::write(&p, cfg).unwrap();
    p
}

fn run_board(config: &Path, log: &Path) -> Board {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
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

struct Api {
    url: String,
    http: reqwest::Client,
    token: String,
    log: PathBuf,
}

impl Api {
    async fn req(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        common::rest::call(&self.http, &self.url, method, path, Some(&self.token), body).await
    }

    /// `method path` must answer `want`; returns the body.
    async fn ok(&self, want: StatusCode, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.req(method, path, body).await;
        if s != want {
            let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("{method} {path}: {s} {v}, wanted {want}\nboard log:\n{tail}");
        }
        v
    }

    async fn action(&self, plugin: &str, action: &str, parameters: Value) -> (StatusCode, Value) {
        let body = json!({"action": action, "parameters": parameters});
        self.req("POST", &format!("/v1/boards/lr1/plugins/{plugin}"), Some(body)).await
    }

    /// Polls `check` until it gives `Some`, or fails after [`DEADLINE`] saying `what`.
    async fn until<T>(&self, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if Instant::now() > deadline {
                let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("timed out waiting for {what}\nboard log:\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_status(&self, status: &str) {
        self.until(&format!("board status {status}"), async || {
            let (_, v) = self.req("GET", "/v1/boards/lr1", None).await;
            (v["status"] == status).then_some(())
        })
        .await
    }

    async fn gpio(&self, line: &str) -> Option<u64> {
        let (s, v) = self.req("GET", &format!("/v1/boards/lr1/gpio/{line}"), None).await;
        if s == StatusCode::OK { v["value"].as_u64() } else { None }
    }

    async fn create(&self, body: Value) -> Value {
        self.ok(StatusCode::CREATED, "POST", "/v1/plugins", Some(body)).await
    }

    async fn inject(&self, plugin: &str, onboot: bool) -> Value {
        let body = json!({"plugin": plugin, "onboot": onboot});
        self.ok(StatusCode::OK, "PUT", "/v1/boards/lr1/plugins", Some(body)).await
    }
}

/// One `s4t` run with this user's configuration.
async fn s4t(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_s4t"))
        .args(args)
        .env("S4T_CONFIG", config)
        .env("S4T_PASSWORD", "admin-password")
        .env_remove("S4T_URL")
        .env_remove("S4T_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out).await.expect("s4t hung").unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_created_injected_called_started_stopped_and_restarted_onboot() {
    let dir = tempfile::tempdir().unwrap();
    let (blink, thermometer) = example_plugins(&dir.path().join("wasm-target"));
    let mut config = ServeConfig::new(dir.path().join("cloud"));
    config.bind = "127.0.0.1".parse().unwrap();
    config.plaintext = true;
    config.rest_port = 0;
    config.wamp_port = 0;
    config.tunnel_port = 0;
    config.admin_password = Some("admin-password".into());
    config.call_timeout = Duration::from_secs(20);
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
    let board_dir = dir.path().join("board");
    std::fs::create_dir_all(&board_dir).unwrap();
    let log = board_dir.join("lr.log");
    let api = Api { url: url.clone(), http, token: t["token"].as_str().unwrap().to_owned(), log: log.clone() };

    let body = json!({"name": "lr1", "code": "CODE-LR1", "type": "generic",
                      "location": [{"latitude": "38.2", "longitude": "15.5", "altitude": "3"}]});
    api.ok(StatusCode::CREATED, "POST", "/v1/boards", Some(body)).await;
    let cfg = board_config(&board_dir);
    let out = Command::new(lightning_rod())
        .args(["enroll", "--url", &format!("ws://{wamp}/"), "--code", "CODE-LR1", "--config"])
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
    let board = run_board(&cfg, &log);
    api.wait_status("online").await;

    // Upload checks: a module importing what boards do not offer, and garbage, are refused.
    let bad = r#"(module (import "env" "system" (func)) (memory (export "memory") 1)
                  (func (export "run") (result i32) (i32.const 0)))"#;
    let (s, v) = api.req("POST", "/v1/plugins", Some(json!({"name": "bad", "code": wat(bad)}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error_message"].as_str().unwrap().contains("env.system"), "{v}");
    let (s, v) =
        api.req("POST", "/v1/plugins", Some(json!({"name": "bad", "code": "AGFzbQEAAAAA", "kind": "wasm"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // The Rust examples: blink GPIO17 (granted) and read the I2C thermometer.
    let p = api
        .create(json!({"name": "blink", "code": b64(&blink), "callable": true, "parameters": {"times": 3, "interval_ms": 20},
                       "grants": {"gpio": ["GPIO17"]}}))
        .await;
    assert_eq!((p["kind"].as_str(), p["code_size"].as_u64()), (Some("wasm"), Some(blink.len() as u64)), "{p}");
    assert_eq!(p["code_sha256"].as_str().map(str::len), Some(64), "{p}");
    let i = api.inject("blink", false).await;
    assert_eq!(i["status"], "injected", "{i}");
    let (s, v) = api.action("blink", "PluginCall", json!({"times": 2, "interval_ms": 5})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"line": "GPIO17", "blinks": 2}));
    assert_eq!(api.gpio("GPIO17").await, Some(0), "blink ends with the line low");
    // Parameter keys: every declared key, and no other.
    let (s, v) = api.action("blink", "PluginCall", json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error_message"].as_str().unwrap().contains("times"), "{v}");
    let (s, _) = api.action("blink", "PluginCall", json!({"times": 1, "interval_ms": 1, "colour": "red"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = api.action("blink", "PluginStart", json!({"times": 1, "interval_ms": 1})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a callable plugin is called, not started");

    api.create(json!({"name": "thermometer", "code": b64(&thermometer), "callable": true,
                      "grants": {"i2c": [{"bus": 1, "address": 72}]}}))
        .await;
    api.inject("thermometer", false).await;
    api.ok(
        StatusCode::OK,
        "POST",
        "/v1/boards/lr1/i2c/1/0x48/write",
        Some(json!({"register": 0, "data": [0x1a, 0x80]})),
    )
    .await;
    let (s, v) = api.action("thermometer", "PluginCall", json!({})).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"celsius": 26.5})));

    // The original format: Python source (the original lightning-rod's echo example), posted
    // as the original clients do, pickled by the cloud, run by python3 on the board.
    let p = api
        .create(json!({"name": "pyecho", "code": ORIGINAL_ECHO, "callable": true, "parameters": {"name": ""}}))
        .await;
    assert_eq!(p["kind"], "python", "{p}");
    api.inject("pyecho", false).await;
    let (s, v) = api.action("pyecho", "PluginCall", json!({"name": "board"})).await;
    assert_eq!((s, v), (StatusCode::OK, json!("ECHO RESULT: board")));

    // Grants: the same blink without a grant cannot touch GPIO17 (set high, it stays high);
    // a grant the board owner does not allow is refused at injection.
    api.create(json!({"name": "blink-nogrant", "code": b64(&blink), "callable": true, "parameters": ["times"]})).await;
    api.inject("blink-nogrant", false).await;
    api.ok(StatusCode::OK, "PUT", "/v1/boards/lr1/gpio/GPIO17", Some(json!({"value": 1, "direction": "out"}))).await;
    let (s, v) = api.action("blink-nogrant", "PluginCall", json!({"times": 1})).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert!(v["error_message"].as_str().unwrap().contains("GPIO line GPIO17 is not granted"), "{v}");
    assert_eq!(api.gpio("GPIO17").await, Some(1), "a plugin without the grant changed the line");
    let body = json!({"plugin": "blink-nogrant", "onboot": false, "grants": {"gpio": ["GPIO5"]}});
    let (s, v) = api.req("PUT", "/v1/boards/lr1/plugins", Some(body)).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert!(v["error_message"].as_str().unwrap().contains("GPIO5 is not allowed"), "{v}");

    // A runaway call is stopped at its time limit; the agent answers DevicePing meanwhile.
    api.create(json!({"name": "runaway", "code": wat(RUNAWAY), "callable": true})).await;
    api.inject("runaway", false).await;
    let body = json!({"action": "PluginCall", "parameters": {}});
    let r = api.ok(StatusCode::ACCEPTED, "POST", "/v1/boards/lr1/plugins/runaway?async=true", Some(body)).await;
    let req = r["uuid"].as_str().unwrap().to_owned();
    let mut pings_while_running = 0;
    let result = api
        .until("the runaway call to end", async || {
            let (s, v) = api.req("POST", "/v1/boards/lr1/action", Some(json!({"action": "DevicePing"}))).await;
            assert_eq!(s, StatusCode::OK, "DevicePing while a plugin runs away: {v}");
            let (_, r) = api.req("GET", &format!("/v1/requests/{req}"), None).await;
            match r["status"].as_str() {
                Some("RUNNING") | Some("PENDING") => {
                    pings_while_running += 1;
                    None
                }
                _ => Some(r),
            }
        })
        .await;
    assert!(pings_while_running > 0, "no DevicePing answered while the runaway ran");
    assert_eq!(result["status"], "COMPLETED", "{result}");
    let res = api.ok(StatusCode::OK, "GET", &format!("/v1/requests/{req}/results"), None).await;
    assert_eq!(res["results"][0]["result"], "ERROR", "{res}");
    let msg = res["results"][0]["message"].as_str().unwrap();
    assert!(msg.contains("time limit of 3 s"), "{msg}");

    api.create(json!({"name": "trap", "code": wat(TRAP), "callable": true})).await;
    api.inject("trap", false).await;
    let (s, v) = api.action("trap", "PluginCall", json!({})).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert!(v["error_message"].as_str().unwrap().contains("trapped"), "{v}");

    // A started runaway: ALIVE until stopped, then DEAD; the agent keeps answering.
    api.create(json!({"name": "spinner", "code": wat(RUNAWAY)})).await;
    api.inject("spinner", false).await;
    assert_eq!(api.action("spinner", "PluginStart", json!({})).await, (StatusCode::OK, json!("STARTED")));
    assert_eq!(api.action("spinner", "PluginStatus", json!({})).await, (StatusCode::OK, json!("ALIVE")));
    api.ok(StatusCode::OK, "POST", "/v1/boards/lr1/action", Some(json!({"action": "DevicePing"}))).await;
    let (s, v) = api.action("spinner", "PluginStart", json!({})).await;
    assert!(s == StatusCode::BAD_GATEWAY && v.to_string().contains("ALREADY STARTED"), "{s} {v}");
    assert_eq!(api.action("spinner", "PluginStop", json!({})).await, (StatusCode::OK, json!("STOPPED")));
    assert_eq!(api.action("spinner", "PluginStatus", json!({})).await, (StatusCode::OK, json!("DEAD")));

    // A long-running onboot plugin comes back by itself after the board agent restarts.
    api.create(json!({"name": "ticker", "code": wat(TICKER), "grants": {"gpio": ["GPIO20"]}})).await;
    let i = api.inject("ticker", true).await;
    assert_eq!(i["onboot"], true, "{i}");
    assert_eq!(api.action("ticker", "PluginStart", json!({})).await, (StatusCode::OK, json!("STARTED")));
    api.until("GPIO20 driven by the ticker", async || (api.gpio("GPIO20").await == Some(1)).then_some(())).await;
    drop(board);
    api.wait_status("offline").await;
    // An injection queued for the offline board is pending until the board takes it.
    api.create(json!({"name": "late", "code": wat(ECHO), "callable": true})).await;
    let body = json!({"plugin": "late", "onboot": false});
    let r = api.ok(StatusCode::ACCEPTED, "PUT", "/v1/boards/lr1/plugins?queue=true", Some(body)).await;
    assert_eq!(r["status"], "QUEUED", "{r}");
    let i = api.ok(StatusCode::OK, "GET", "/v1/boards/lr1/plugins/late", None).await;
    assert_eq!(i["status"], "pending", "{i}");
    let (s, _) = api.action("late", "PluginCall", json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "a pending plugin cannot be called yet");
    let _board = run_board(&cfg, &log);
    api.wait_status("online").await;
    api.until("the queued injection to be taken", async || {
        let (_, i) = api.req("GET", "/v1/boards/lr1/plugins/late", None).await;
        (i["status"] == "injected").then_some(())
    })
    .await;
    assert_eq!(api.action("late", "PluginCall", json!({"x": 1})).await, (StatusCode::OK, json!({"x": 1})));
    // The sim board starts with every line low: only the restarted plugin drives GPIO20.
    api.until("GPIO20 driven again after the restart", async || (api.gpio("GPIO20").await == Some(1)).then_some(()))
        .await;
    assert_eq!(api.action("ticker", "PluginStatus", json!({})).await, (StatusCode::OK, json!("ALIVE")));
    assert_eq!(api.action("spinner", "PluginStatus", json!({})).await, (StatusCode::OK, json!("DEAD")));
    let inj = api.ok(StatusCode::OK, "GET", "/v1/boards/lr1/plugins", None).await;
    let ticker = inj["injections"].as_array().unwrap().iter().find(|i| i["plugin_name"] == "ticker").unwrap();
    assert_eq!(ticker["status"], "operative", "{inj}");

    // Every call is a request with its result.
    let reqs = api.ok(StatusCode::OK, "GET", "/v1/requests?board=lr1", None).await;
    let actions: Vec<&str> = reqs["requests"].as_array().unwrap().iter().filter_map(|r| r["action"].as_str()).collect();
    for a in ["PluginInject", "PluginCall", "PluginStart", "PluginStop", "PluginStatus"] {
        assert!(actions.contains(&a), "no {a} request in {actions:?}");
    }

    // Removal: a plugin on a board cannot be deleted; once removed it can.
    let (s, v) = api.req("DELETE", "/v1/plugins/ticker", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let r = api.ok(StatusCode::OK, "DELETE", "/v1/boards/lr1/plugins/ticker", None).await;
    assert_eq!(r["status"], "removed", "{r}");
    assert_eq!(api.action("ticker", "PluginStatus", json!({})).await.0, StatusCode::NOT_FOUND);
    api.ok(StatusCode::NO_CONTENT, "DELETE", "/v1/plugins/ticker", None).await;

    // The same life through the CLI.
    let conf = dir.path().join("s4t.toml");
    let cli = async |args: &[&str]| s4t(&conf, args).await;
    let (code, _, err) = cli(&["login", "--url", &url, "--user", "admin"]).await;
    assert_eq!(code, 0, "{err}");
    let echo = dir.path().join("echo.wat");
    std::fs::write(&echo, ECHO).unwrap();
    let echo = echo.to_str().unwrap();
    let (code, out, err) = cli(&["plugin", "create", "echo", echo, "--callable", "--param", "say"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&["plugin", "inject", "lr1", "echo"]).await;
    assert!(code == 0 && out.contains("injected"), "{out}{err}");
    let (code, out, err) = cli(&["--json", "plugin", "call", "lr1", "echo", "say=hi"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!({"say": "hi"}));
    let (code, _, err) = cli(&["plugin", "call", "lr1", "echo"]).await;
    assert!(code == 2 && err.contains("say"), "a missing parameter is a usage error: {code} {err}");
    let (code, out, _) = cli(&["plugin", "call", "lr1", "trap"]).await;
    assert_eq!(code, 8, "a failing plugin is a board error: {out}");
    let (code, out, err) = cli(&["--json", "plugin", "injections", "lr1"]).await;
    assert_eq!(code, 0, "{err}");
    let names: Vec<String> = serde_json::from_str::<Value>(&out).unwrap()["injections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["plugin_name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(names.contains(&"echo".to_owned()) && !names.contains(&"ticker".to_owned()), "{names:?}");
    let (code, out, err) = cli(&["plugin", "status", "lr1", "spinner"]).await;
    assert!(code == 0 && out.trim() == "DEAD", "{out}{err}");
    let (code, out, err) = cli(&["plugin", "remove", "lr1", "echo"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&["plugin", "delete", "echo"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&["plugin", "show", "echo"]).await;
    assert_eq!(code, 5, "{out}");
}

/// Plugins and injections on both database back-ends (SQLite and the real PostgreSQL).
#[tokio::test]
async fn plugin_rows_and_injections_on_both_backends() {
    for t in TestDb::all().await {
        let db = &t.db;
        let p = db.create_project("p").await.unwrap();
        let other = db.create_project("q").await.unwrap();
        let b = board_b1(db, &p.uuid).await;
        let new = |name: &str, project: &str, public: bool| Plugin {
            uuid: String::new(),
            name: name.into(),
            owner: "o".into(),
            project: project.into(),
            public,
            code: "AGFzbQEAAAA=".into(),
            callable: true,
            parameters: json!({"x": 1}),
            extra: json!({}),
            kind: "wasm".into(),
            grants: json!({"gpio": ["GPIO17"], "i2c": []}),
            code_sha256: "ab".repeat(32),
            code_size: 8,
            created_at: 0,
            updated_at: 0,
        };
        let mine = db.create_plugin(&new("blink", &p.uuid, false)).await.unwrap();
        let theirs = db.create_plugin(&new("blink", &other.uuid, true)).await.unwrap();
        // A name finds the caller's own plugin before another project's public one.
        let found = db.plugin("blink", Some(&p.uuid)).await.unwrap().unwrap();
        assert_eq!(found.uuid, mine.uuid, "{}", t.name);
        assert_eq!((found.kind.as_str(), &found.grants), ("wasm", &json!({"gpio": ["GPIO17"], "i2c": []})));
        assert_eq!(db.plugin(&theirs.uuid, Some(&p.uuid)).await.unwrap().unwrap().uuid, theirs.uuid);
        assert!(db.plugin_name_taken(&p.uuid, "blink", "").await.unwrap());
        assert!(!db.plugin_name_taken(&p.uuid, "blink", &mine.uuid).await.unwrap());
        assert_eq!(db.list_plugins(Some(&p.uuid), false).await.unwrap().len(), 1);
        let listed = db.list_plugins(Some(&p.uuid), true).await.unwrap();
        assert_eq!(listed.len(), 2);
        // Lists leave the code where it is; the plugin itself has it.
        assert!(listed.iter().all(|p| p.code.is_empty() && p.code_size == 8), "{}", t.name);
        assert_eq!(found.code, "AGFzbQEAAAA=");

        let mut i = Injection {
            board: b.uuid.clone(),
            plugin: mine.uuid.clone(),
            onboot: false,
            status: "pending".into(),
            grants: json!({}),
            code_sha256: mine.code_sha256.clone(),
            request: Some("r1".into()),
            created_at: 0,
            updated_at: 0,
        };
        db.upsert_injection(&i).await.unwrap();
        i.onboot = true;
        i.status = "updated".into();
        db.upsert_injection(&i).await.unwrap();
        let got = db.injection(&b.uuid, &mine.uuid).await.unwrap().unwrap();
        assert_eq!((got.onboot, got.status.as_str(), got.request.as_deref()), (true, "updated", Some("r1")));
        assert!(db.set_injection_status(&b.uuid, &mine.uuid, "operative").await.unwrap());
        let got = db.injection(&b.uuid, &mine.uuid).await.unwrap().unwrap();
        assert_eq!((got.status.as_str(), got.request), ("operative", None), "{}", t.name);
        assert_eq!(db.boards_with_plugin(&mine.uuid).await.unwrap(), vec![b.uuid.clone()]);
        assert_eq!(db.injections_of_board(&b.uuid).await.unwrap().len(), 1);
        assert!(db.delete_injection(&b.uuid, &mine.uuid).await.unwrap());
        assert!(!db.delete_injection(&b.uuid, &mine.uuid).await.unwrap());
        // A board's injections go with it.
        db.upsert_injection(&i).await.unwrap();
        db.delete_board(&b.uuid).await.unwrap();
        assert!(db.boards_with_plugin(&mine.uuid).await.unwrap().is_empty(), "{}", t.name);
    }
}

/// A project holds one plugin of a name: the unique index on `(project_uuid, name)` decides
/// between concurrent creates and renames (the API's check before the insert could not), and
/// its violation is a 409 (Conflict). Migration 0011 renames the duplicates a database may
/// already hold ("<name>-<uuid>", the oldest keeps the name) so that the index can be built:
/// replayed here on a database with the index removed and duplicates inserted.
#[tokio::test]
async fn plugin_names_are_unique_per_project_on_both_backends() {
    for t in TestDb::all().await {
        let db = &t.db;
        let p = db.create_project("p").await.unwrap();
        let other = db.create_project("q").await.unwrap();
        let new = wasm_plugin;
        let blink = db.create_plugin(&new("blink", &p.uuid)).await.unwrap();
        let second = db.create_plugin(&new("blink", &p.uuid)).await;
        assert!(matches!(second, Err(iotronic::Error::Conflict(_))), "{}: {second:?}", t.name);
        db.create_plugin(&new("blink", &other.uuid)).await.unwrap();
        let echo = db.create_plugin(&new("echo", &p.uuid)).await.unwrap();
        let rename = iotronic::db::PluginUpdate { name: Some("blink".into()), ..Default::default() };
        let renamed = db.update_plugin(&echo.uuid, rename).await;
        assert!(matches!(renamed, Err(iotronic::Error::Conflict(_))), "{}: {renamed:?}", t.name);
        assert_eq!(db.plugin(&echo.uuid, None).await.unwrap().unwrap().name, "echo");

        // A database from before 0011 with duplicates (inserted past the API's check).
        let raw = sqlx::AnyPool::connect(t.url.expose()).await.unwrap();
        sqlx::query("DROP INDEX plugins_project_name").execute(&raw).await.unwrap();
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 11").execute(&raw).await.unwrap();
        let mut dups = Vec::new();
        for created_at in [2_i64, 1, 1] {
            let uuid = uuid::Uuid::new_v4().to_string();
            sqlx::query(
                "INSERT INTO plugins (uuid, name, owner_uuid, project_uuid, created_at, updated_at) \
                 VALUES ($1, 'dup', 'o', $2, $3, $3)",
            )
            .bind(&uuid)
            .bind(&p.uuid)
            .bind(created_at)
            .execute(&raw)
            .await
            .unwrap();
            dups.push(uuid);
        }
        raw.close().await;
        let db = t.reopen().await;
        let name = |uuid: String| {
            let db = db.clone();
            async move { db.plugin(&uuid, None).await.unwrap().unwrap().name }
        };
        // The oldest (created first; the lower uuid between two of the same time) keeps it.
        let (older, newer) = if dups[1] < dups[2] { (&dups[1], &dups[2]) } else { (&dups[2], &dups[1]) };
        assert_eq!(name(older.clone()).await, "dup", "{}", t.name);
        assert_eq!(name(newer.clone()).await, format!("dup-{newer}"), "{}", t.name);
        assert_eq!(name(dups[0].clone()).await, format!("dup-{}", dups[0]), "{}", t.name);
        assert_eq!(name(blink.uuid.clone()).await, "blink", "{}", t.name);
        let again = db.create_plugin(&new("dup", &p.uuid)).await;
        assert!(matches!(again, Err(iotronic::Error::Conflict(_))), "{}: {again:?}", t.name);
    }
}

/// A private, callable WebAssembly plugin `name` of `project` (an empty module) to create.
fn wasm_plugin(name: &str, project: &str) -> Plugin {
    Plugin {
        uuid: String::new(),
        name: name.into(),
        owner: "o".into(),
        project: project.into(),
        public: false,
        code: "AGFzbQEAAAA=".into(),
        callable: true,
        parameters: json!({}),
        extra: json!({}),
        kind: "wasm".into(),
        grants: json!({}),
        code_sha256: "ab".repeat(32),
        code_size: 8,
        created_at: 0,
        updated_at: 0,
    }
}

/// Board "b1" of `project`.
async fn board_b1(db: &iotronic::db::Db, project: &str) -> iotronic::db::Board {
    db.insert_board(NewBoard {
        name: "b1".into(),
        code: "c1".into(),
        board_type: "generic".into(),
        owner: "o".into(),
        project: project.into(),
        extra: json!({}),
        location: Some(("1".into(), "2".into(), "3".into())),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A board and a plugin of its project (uuid of the board).
async fn board_and_plugin(db: &iotronic::db::Db) -> (String, Plugin) {
    let p = db.create_project("p").await.unwrap();
    let b = board_b1(db, &p.uuid).await;
    let plugin = db.create_plugin(&wasm_plugin("blink", &p.uuid)).await.unwrap();
    (b.uuid, plugin)
}

/// A pending injection is settled from its own request only: a reader that settles it from
/// R1's outcome after a re-injection made it pending on R2 leaves it (pending, R2), so R2's
/// outcome is still recorded and actions still get the "still being injected" 409; a status
/// written by an action does not overwrite a pending injection either. A plugin is deleted
/// only while no board holds it (one statement: an injection landing in between is never
/// cascaded away).
#[tokio::test]
async fn injection_status_is_written_by_compare_and_set_on_both_backends() {
    for t in TestDb::all().await {
        let db = &t.db;
        let (b, plugin) = board_and_plugin(db).await;
        let pending = |req: &str| Injection {
            board: b.clone(),
            plugin: plugin.uuid.clone(),
            onboot: false,
            status: "pending".into(),
            grants: json!({}),
            code_sha256: plugin.code_sha256.clone(),
            request: Some(req.into()),
            created_at: 0,
            updated_at: 0,
        };
        let state = || async {
            let i = db.injection(&b, &plugin.uuid).await.unwrap().unwrap();
            (i.status, i.request)
        };
        let r2_pending = ("pending".to_owned(), Some("r2".to_owned()));
        db.upsert_injection(&pending("r1")).await.unwrap();
        db.upsert_injection(&pending("r2")).await.unwrap();
        // R1's settle, read before the re-injection, lands after it.
        assert!(!db.settle_injection(&b, &plugin.uuid, "r1", "injected").await.unwrap(), "{}", t.name);
        assert_eq!(state().await, r2_pending, "{}", t.name);
        // An action's status does not overwrite a pending injection either.
        assert!(!db.set_injection_status(&b, &plugin.uuid, "operative").await.unwrap(), "{}", t.name);
        assert_eq!(state().await, r2_pending, "{}", t.name);
        // R2's own outcome is recorded; then an action's status is.
        assert!(db.settle_injection(&b, &plugin.uuid, "r2", "failed").await.unwrap(), "{}", t.name);
        assert_eq!(state().await, ("failed".to_owned(), None), "{}", t.name);
        assert!(!db.settle_injection(&b, &plugin.uuid, "r2", "injected").await.unwrap(), "{}", t.name);
        assert!(db.set_injection_status(&b, &plugin.uuid, "operative").await.unwrap(), "{}", t.name);
        assert_eq!(state().await, ("operative".to_owned(), None), "{}", t.name);

        // Held by a board: not deleted, and the injection stays.
        assert!(!db.delete_plugin(&plugin.uuid).await.unwrap(), "{}", t.name);
        assert!(db.plugin(&plugin.uuid, None).await.unwrap().is_some(), "{}", t.name);
        assert_eq!(state().await, ("operative".to_owned(), None), "{}", t.name);
        assert!(db.delete_injection(&b, &plugin.uuid).await.unwrap());
        assert!(db.delete_plugin(&plugin.uuid).await.unwrap(), "{}", t.name);
        assert!(db.plugin(&plugin.uuid, None).await.unwrap().is_none(), "{}", t.name);
        assert!(!db.delete_plugin(&plugin.uuid).await.unwrap(), "{}", t.name);
    }
}

/// An injection recorded while its plugin is being deleted (its transaction still open when
/// the delete starts) stops the delete: the plugin and the injection both stay. PostgreSQL
/// needed the plugin's row locked first: the delete's check did not see the uncommitted
/// injection, waited on the row, then deleted the plugin and cascaded the injection away.
#[tokio::test]
async fn a_plugin_injected_while_it_is_deleted_stays_on_both_backends() {
    for t in TestDb::all().await {
        let (b, plugin) = board_and_plugin(&t.db).await;
        let raw = sqlx::AnyPool::connect(t.url.expose()).await.unwrap();
        let mut tx = raw.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO plugin_injections (board_uuid, plugin_uuid, status, created_at, updated_at) \
             VALUES ($1, $2, 'injected', 1, 1)",
        )
        .bind(&b)
        .bind(&plugin.uuid)
        .execute(&mut *tx)
        .await
        .unwrap();
        let delete = tokio::spawn({
            let (db, uuid) = (t.db.clone(), plugin.uuid.clone());
            async move { db.delete_plugin(&uuid).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.commit().await.unwrap();
        assert!(!delete.await.unwrap().unwrap(), "{}: deleted", t.name);
        assert!(t.db.plugin(&plugin.uuid, None).await.unwrap().is_some(), "{}", t.name);
        assert!(t.db.injection(&b, &plugin.uuid).await.unwrap().is_some(), "{}: cascaded away", t.name);
        raw.close().await;
    }
}
