//! Benchmark of plugin calls as a user sees them (issue 11): REST `PluginCall` → conductor →
//! agent → WAMP → a real `lightning-rod` process (sim HAL) → WebAssembly → result → REST,
//! against `DevicePing` on the same path (the difference is the plugin's own cost). Also the
//! board's resident memory before and after injecting plugins, and `DevicePing` latency while
//! a runaway plugin call burns the board's CPU until its time limit. Prints figures; asserts
//! nothing about them.
//!
//! `cargo run --release -p iotronic --example bench_plugins -- PATH/TO/lightning-rod [N]`
//! (default 300 calls of each kind; build the agent with `cargo build --release -p lightning-rod`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use iotronic::ServeConfig;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const ECHO: &str = r#"(module
  (import "s4t" "params_len" (func $plen (result i32)))
  (import "s4t" "params_read" (func $pread (param i32 i32) (result i32)))
  (import "s4t" "set_result" (func $res (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (drop (call $pread (i32.const 0) (call $plen)))
    (drop (call $res (i32.const 0) (call $plen)))
    (i32.const 0)))"#;

const RUNAWAY: &str = r#"(module (memory (export "memory") 1)
  (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

struct Api {
    base: String,
    http: reqwest::Client,
    token: String,
}

impl Api {
    async fn req(&self, method: reqwest::Method, path: &str, body: Value) -> Result<(u16, Value)> {
        let r = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token).json(&body);
        let r = r.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    async fn must(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value> {
        let (s, v) = self.req(method.clone(), path, body).await?;
        if !(200..300).contains(&s) {
            bail!("{method} {path}: {s} {v}");
        }
        Ok(v)
    }

    /// `n` sequential calls of `path` with `body`; latencies in ms.
    async fn time(&self, path: &str, body: &Value, n: usize) -> Result<Vec<f64>> {
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.must(reqwest::Method::POST, path, body.clone()).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(lat)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let lr = args.next().context("usage: bench_plugins PATH/TO/lightning-rod [N]")?;
    let n: usize = args.next().map_or(Ok(300), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let mut config = ServeConfig::new(dir.path().join("cloud"));
    config.bind = "127.0.0.1".parse()?;
    config.plaintext = true;
    config.rest_port = 0;
    config.wamp_port = 0;
    config.tunnel_port = 0;
    config.admin_password = Some("bench-password".into());
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(iotronic::serve(config, stop.clone(), Some(tx)));
    let l = rx.await?;
    let wamp = l.wamp.context("no WAMP listener")?;
    let base = format!("http://{}", l.rest);
    let http = reqwest::Client::new();
    let t: Value = http
        .post(format!("{base}/v1/auth/tokens"))
        .json(&json!({"username": "admin", "password": "bench-password"}))
        .send()
        .await?
        .json()
        .await?;
    let api = Api { base, http, token: t["token"].as_str().unwrap_or_default().to_owned() };
    let body = json!({"name": "bench", "code": "BENCH", "location": [{"latitude": 0, "longitude": 0, "altitude": 0}]});
    api.must(reqwest::Method::POST, "/v1/boards", body).await?;

    let bdir = dir.path().join("board");
    std::fs::create_dir_all(&bdir)?;
    let cfg = bdir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cloud]\nlegacy_settings = \"{0}/none.json\"\nlegacy_conf = \"{0}/none.conf\"\n[board]\nstate_dir = \"{0}/state\"\n\
             [hal]\nbackend = \"sim\"\n[plugins]\ncall_timeout_s = 3\nfuel = 1000000000000\n",
            bdir.display()
        ),
    )?;
    let out = Command::new(&lr)
        .args(["enroll", "--url", &format!("ws://{wamp}/"), "--code", "BENCH", "--config"])
        .arg(&cfg)
        .output()?;
    if !out.status.success() {
        bail!("enroll failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut child = Command::new(&lr)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let result = bench(&api, pid, n, Path::new(&lr)).await;
    let _ = child.kill();
    let _ = child.wait();
    stop.cancel();
    result
}

async fn bench(api: &Api, pid: u32, n: usize, lr: &Path) -> Result<()> {
    use reqwest::Method;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, b) = api.req(Method::GET, "/v1/boards/bench", json!({})).await?;
        if b["status"] == "online" {
            break;
        }
        if Instant::now() > deadline {
            bail!("the board did not come online");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ping = json!({"action": "DevicePing"});
    api.time("/v1/boards/bench/action", &ping, 20).await?;
    let rss0 = rss_kib(pid);
    let b64 = |w: &str| -> Result<String> { Ok(base64::engine::general_purpose::STANDARD.encode(wat::parse_str(w)?)) };
    for (name, code) in [("echo", b64(ECHO)?), ("runaway", b64(RUNAWAY)?)] {
        let body = json!({"name": name, "code": code, "callable": true});
        api.must(Method::POST, "/v1/plugins", body).await?;
        api.must(Method::PUT, "/v1/boards/bench/plugins", json!({"plugin": name, "onboot": false})).await?;
    }
    let call = json!({"action": "PluginCall", "parameters": {"say": "hello"}});
    api.time("/v1/boards/bench/plugins/echo", &call, 20).await?;
    let mut pings = api.time("/v1/boards/bench/action", &ping, n).await?;
    let mut calls = api.time("/v1/boards/bench/plugins/echo", &call, n).await?;
    let rss1 = rss_kib(pid);
    println!("agent {} (pid {pid}), {n} sequential calls each, cloud on SQLite + in-process bus", lr.display());
    println!("DevicePing via REST:       p50 {:.2} ms, p99 {:.2} ms", pct(&mut pings, 50.0), pct(&mut pings, 99.0));
    println!("PluginCall echo via REST:  p50 {:.2} ms, p99 {:.2} ms", pct(&mut calls, 50.0), pct(&mut calls, 99.0));
    println!("board RSS: {rss0} KiB idle, {rss1} KiB after 2 injected plugins and {n} calls");

    // DevicePing while a runaway call runs until its 3 s limit.
    let runaway = api.http.post(format!("{}/v1/boards/bench/plugins/runaway?async=true", api.base));
    let r: Value = runaway
        .bearer_auth(&api.token)
        .json(&json!({"action": "PluginCall", "parameters": {}}))
        .send()
        .await?
        .json()
        .await?;
    let req = r["uuid"].as_str().context("no request")?.to_owned();
    let mut during = Vec::new();
    loop {
        let t = Instant::now();
        api.must(Method::POST, "/v1/boards/bench/action", ping.clone()).await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let (_, st) = api.req(Method::GET, &format!("/v1/requests/{req}"), json!({})).await?;
        if st["status"] != "RUNNING" && st["status"] != "PENDING" {
            break;
        }
        during.push(ms);
    }
    let peak = rss_kib(pid);
    if during.is_empty() {
        println!("DevicePing during a runaway call: none completed before the runaway ended");
    } else {
        println!(
            "DevicePing during a runaway call (3 s limit): {} pings, p50 {:.2} ms, p99 {:.2} ms; board RSS {peak} KiB",
            during.len(),
            pct(&mut during, 50.0),
            pct(&mut during, 99.0)
        );
    }
    Ok(())
}
