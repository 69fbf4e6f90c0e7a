//! Footprint benchmark (run by `bench/footprint.sh`): starts a WAMP router with a minimal
//! cloud agent and a `wstunnel` server in this process, enrolls and runs the given
//! `lightning-rod` binary against them (sim HAL), exposes two services through reverse tunnels,
//! lets it idle and prints its resident memory. Prints figures; asserts nothing about them.
//!
//! Usage: `cargo run --release -p lightning-rod --example footprint -- PATH/TO/lightning-rod [IDLE_S]`

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use s4t_shared::token::{Claims, TokenKey};
use s4t_wamp::{Dict, Payload, Role, Router, RouterConfig, Secret, StaticAuthenticator};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wstunnel::server::{Auth, DefaultHooks, Server, ServerConfig};

const BOARD: &str = "9d3c0e1a-7b2f-4c5d-8e6f-0a1b2c3d4e5f";
const SECRET: &str = "footprint-secret";
const CODE: &str = "FOOTPRINT";

fn reply(v: Value) -> std::result::Result<Payload, s4t_wamp::WampError> {
    Ok(Payload::new(vec![Value::String(v.to_string())], Dict::new()))
}

fn rss_kib(pid: u32) -> Result<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |k: &str| -> u64 {
        status.lines().find_map(|l| l.strip_prefix(k)?.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:"), field("Threads:")))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let bin = args.next().context("usage: footprint PATH/TO/lightning-rod [IDLE_S]")?;
    let idle: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let dir = tempfile::tempdir()?;

    // The cloud: router + agent + tunnel server.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/", listener.local_addr()?);
    let auth = StaticAuthenticator::new().with_ticket("enroll", Secret::new(CODE), Role::Enrollment).with_cra(
        BOARD,
        &Secret::new(SECRET),
        Role::Board,
    );
    let router = Router::new(RouterConfig::default(), Arc::new(auth));
    let stop = CancellationToken::new();
    let (r, s) = (router.clone(), stop.clone());
    tokio::spawn(async move { r.serve(listener, None, s).await });
    let agent = router.local_session("agent").await?;
    let u = url.clone();
    agent
        .register("stack4things.register", move |_| {
            let u = u.clone();
            async move {
                reply(json!({"result": "SUCCESS", "message": {"iotronic": {
                    "board": {"uuid": BOARD, "name": "footprint", "agent": "agent"},
                    "wamp": {"main-agent": {"url": u, "realm": "s4t"}},
                    "credentials": {"authid": BOARD, "secret": SECRET}}}}))
            }
        })
        .await?;
    let (ltx, mut logins) = mpsc::channel(4);
    agent
        .register("agent.stack4things.connection", move |inv| {
            let ltx = ltx.clone();
            async move {
                let _ = ltx.send(inv.kwargs.get("session").and_then(Value::as_u64).unwrap_or(0)).await;
                reply(json!({"result": "SUCCESS", "message": ""}))
            }
        })
        .await?;
    agent
        .register("agent.stack4things.wamp_alive", |_| async { Ok(Payload::new(vec![json!("alive")], Dict::new())) })
        .await?;
    let key = TokenKey::new(b"footprint-key".to_vec())?;
    let mut tcfg = ServerConfig::new("127.0.0.1:0".parse()?, Auth::Token(key.clone()));
    tcfg.public_bind = "127.0.0.1".parse()?;
    let tserver = Server::bind(tcfg).await?;
    let tunnel_url = format!("ws://{}/", tserver.local_addr());
    tokio::spawn(tserver.run(Arc::new(DefaultHooks::default()), stop.clone()));

    // The board.
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[cloud]\nlegacy_settings = \"{0}/none.json\"\nlegacy_conf = \"{0}/none.conf\"\n[board]\nstate_dir = \"{0}/state\"\n[hal]\nbackend = \"sim\"\n",
            dir.path().display()
        ),
    )?;
    let st = tokio::process::Command::new(&bin)
        .args(["enroll", "--url", &url, "--code", CODE, "--config"])
        .arg(&config)
        .status()
        .await?;
    if !st.success() {
        bail!("enroll failed: {st}");
    }
    let mut child = tokio::process::Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;
    let session = tokio::time::timeout(Duration::from_secs(20), logins.recv()).await?.context("no login")?;
    let uri = format!("iotronic.{session}.{BOARD}.ServiceEnable");
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let token = key.mint(&Claims { board: BOARD.into(), port: 0, vpn: None, expiry })?;
    let mut services = Vec::new();
    for i in 0..2 {
        let local = TcpListener::bind("127.0.0.1:0").await?;
        let svc = json!({"uuid": format!("svc-{i}"), "name": format!("svc-{i}"), "port": local.local_addr()?.port(),
                         "tunnel_url": tunnel_url, "tunnel_token": token});
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let r = loop {
            match agent
                .call(&uri, vec![json!({"uuid": "r"}), svc.clone(), json!(0)], Dict::new(), Duration::from_secs(20))
                .await
            {
                Ok(p) => break p,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => bail!("ServiceEnable: {e}"),
            }
        };
        let r: Value = serde_json::from_str(r.args[0].as_str().unwrap_or("{}"))?;
        let msg = r["message"].as_str().unwrap_or_default().to_owned();
        let port: u16 =
            msg.rsplit(' ').next().and_then(|p| p.parse().ok()).context(format!("ServiceEnable said {r}"))?;
        // One connection through each tunnel proves it is up.
        let _c = TcpStream::connect(("127.0.0.1", port)).await?;
        let _ = local.accept().await?;
        services.push((local, port));
    }
    // Idle, then measure (a benchmark: waiting here is the measurement, not synchronisation).
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let (rss, hwm, threads) = rss_kib(pid)?;
    let size = std::fs::metadata(&bin)?.len();
    println!("binary            {bin}");
    println!("binary_size_bytes {size}");
    println!("idle_s            {idle}");
    println!("sessions          1 (WAMP, board role, WAMP-CRA)");
    println!(
        "tunnels           {} idle reverse tunnels (ports {:?})",
        services.len(),
        services.iter().map(|s| s.1).collect::<Vec<_>>()
    );
    println!("threads           {threads}");
    println!("idle_rss_kib      {rss}");
    println!("peak_rss_kib      {hwm}");
    println!("idle_rss_mb       {:.2} (target <= 6)", rss as f64 / 1024.0);
    child.start_kill()?;
    let _ = child.wait().await;
    stop.cancel();
    Ok(())
}
