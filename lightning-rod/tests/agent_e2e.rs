//! A real `lightning-rod` process against the real WAMP router (`s4t_wamp`) with a small fake
//! cloud agent registered in-process (stack4things.register / connection / wamp_alive /
//! notify_result as docs/protocols.md says): enroll, login, every procedure on the sim HAL,
//! ERROR replies for bad arguments, GPIO events, RUNNING + notify_result, re-registration
//! after the router restarts, SIGTERM, and the permanent-error exit codes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use s4t_shared::token::{Claims, TokenKey};
use s4t_wamp::{Dict, Payload, Role, Router, RouterConfig, Secret, Session, StaticAuthenticator, WampError};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wstunnel::server::{Auth as TunnelAuth, DefaultHooks, Server, ServerConfig};

const BOARD: &str = "5c1b7a52-8f0e-4c3a-9d2b-7e6f5a4b3c2d";
const SECRET: &str = "issued-board-secret";
const CODE: &str = "ENROLL-42";
const DEADLINE: Duration = Duration::from_secs(20);

struct Cloud {
    router: Router,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    agent: Session,
    logins: mpsc::Receiver<u64>,
    notifications: mpsc::Receiver<Value>,
    alive: Arc<Mutex<u32>>,
}

fn kwarg<'a>(kw: &'a Dict, k: &str) -> &'a Value {
    kw.get(k).unwrap_or(&Value::Null)
}

fn reply(v: Value) -> Result<Payload, WampError> {
    Ok(Payload::new(vec![Value::String(v.to_string())], Dict::new()))
}

async fn cloud(listener: TcpListener) -> Cloud {
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    cloud_with_tls(listener, url, None).await
}

async fn cloud_with_tls(listener: TcpListener, url: String, tls: Option<Arc<rustls::ServerConfig>>) -> Cloud {
    let auth = StaticAuthenticator::new().with_ticket("enroll", Secret::new(CODE), Role::Enrollment).with_cra(
        BOARD,
        &Secret::new(SECRET),
        Role::Board,
    );
    let router = Router::new(RouterConfig::default(), Arc::new(auth));
    let stop = CancellationToken::new();
    let (r, s) = (router.clone(), stop.clone());
    let task = tokio::spawn(async move { r.serve(listener, tls, s).await.unwrap() });
    let agent = router.local_session("agent").await.unwrap();
    agent
        .register("stack4things.register", move |inv| {
            let url = url.clone();
            async move {
                if kwarg(&inv.kwargs, "code") != CODE {
                    return reply(json!({"result": "ERROR", "message": "unknown code"}));
                }
                reply(json!({"result": "SUCCESS", "message": {"iotronic": {
                    "board": {"uuid": BOARD, "name": "board-a", "agent": "agent", "status": "registered"},
                    "wamp": {"main-agent": {"url": url, "realm": "s4t"}, "registration-agent": {"url": url, "realm": "s4t"}},
                    "credentials": {"authid": BOARD, "secret": SECRET}}}}))
            }
        })
        .await
        .unwrap();
    let (ltx, logins) = mpsc::channel(8);
    agent
        .register("agent.stack4things.connection", move |inv| {
            let ltx = ltx.clone();
            async move {
                assert_eq!(kwarg(&inv.kwargs, "uuid"), BOARD);
                let v = kwarg(&inv.kwargs, "info")["lr_version"].as_str().unwrap_or_default().to_owned();
                assert!(v.starts_with("0.5.0+rs."), "lr_version {v:?} would make an original cloud drop req");
                assert!(kwarg(&inv.kwargs, "info")["connectivity"].is_object());
                let _ = ltx.send(kwarg(&inv.kwargs, "session").as_u64().unwrap()).await;
                reply(json!({"result": "SUCCESS", "message": ""}))
            }
        })
        .await
        .unwrap();
    let alive = Arc::new(Mutex::new(0));
    let a = alive.clone();
    agent
        .register("agent.stack4things.wamp_alive", move |_| {
            *a.lock().unwrap() += 1;
            async { Ok(Payload::new(vec![json!("Iotronic alive")], Dict::new())) }
        })
        .await
        .unwrap();
    let (ntx, notifications) = mpsc::channel(8);
    agent
        .register("agent.stack4things.notify_result", move |inv| {
            let ntx = ntx.clone();
            async move {
                let msg: Value = serde_json::from_str(kwarg(&inv.kwargs, "wampmessage").as_str().unwrap()).unwrap();
                let _ = ntx.send(msg).await;
                reply(json!({"result": "SUCCESS", "message": "notification_received"}))
            }
        })
        .await
        .unwrap();
    Cloud { router, stop, task, agent, logins, notifications, alive }
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lightning-rod"));
    c.env("RUST_LOG", "info").env_remove("NOTIFY_SOCKET").stdin(Stdio::null());
    c
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(
        &p,
        format!(
            "[cloud]\nlegacy_settings = \"{0}/none.json\"\nlegacy_conf = \"{0}/none.conf\"\n[board]\nstate_dir = \"{0}/state\"\n\
             [hal]\nbackend = \"sim\"\n[timers]\nalive_interval_s = 1\nbackoff_initial_ms = 50\nbackoff_max_s = 1\n\
             [device]\nreboot_command = [\"touch\", \"{0}/rebooted\"]\nmin_delay_s = 0\n\
             [device.package_managers.echo]\nargv = [\"echo\"]\ncommands = [\"install\"]\n",
            dir.display()
        ),
    )
    .unwrap();
    p
}

async fn call(agent: &Session, session: u64, method: &str, args: Vec<Value>) -> Value {
    let mut positional = vec![json!({"uuid": format!("req-{method}"), "main_request_uuid": null})];
    positional.extend(args);
    let uri = format!("iotronic.{session}.{BOARD}.{method}");
    let p = agent.call(&uri, positional, Dict::new(), DEADLINE).await.unwrap_or_else(|e| panic!("{uri}: {e}"));
    let r: Value = serde_json::from_str(p.args[0].as_str().unwrap()).unwrap();
    assert_eq!(r["req_id"], format!("req-{method}"));
    r
}

async fn ok(agent: &Session, session: u64, method: &str, args: Vec<Value>) -> Value {
    let r = call(agent, session, method, args).await;
    assert_eq!(r["result"], "SUCCESS", "{method}: {r}");
    r["message"].clone()
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f).await.unwrap_or_else(|_| panic!("{what} not within {DEADLINE:?}"))
}

async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// Waits until a connection to `port` echoes `msg`.
async fn echo_through(port: u16, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.write_all(msg).await?;
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).await?;
            Ok::<_, std::io::Error>(got)
        };
        if let Ok(Ok(got)) = tokio::time::timeout(Duration::from_secs(2), attempt).await
            && got == msg
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "public port {port} does not reach the service");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn tunnel_server() -> (String, TokenKey, CancellationToken) {
    let key = TokenKey::new(b"e2e-tunnel-key".to_vec()).unwrap();
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap(), TunnelAuth::Token(key.clone()));
    cfg.public_bind = "127.0.0.1".parse().unwrap();
    let server = Server::bind(cfg).await.unwrap();
    let url = format!("ws://{}/", server.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(server.run(Arc::new(DefaultHooks::default()), stop.clone()));
    (url, key, stop)
}

/// Registration follows login, in `Method::ALL` order: waits until the last one answers.
async fn wait_registered(agent: &Session, session: u64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let uri = format!("iotronic.{session}.{BOARD}.VpnLeave");
    while agent.call(&uri, vec![json!({"uuid": "x"}), json!({"vpn": "none"})], Dict::new(), DEADLINE).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "procedures not registered under session {session}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A lightning-rod process, killed when the test ends (also when it panics), so no agent
/// outlives its test.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child) -> i32 {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(std::time::Instant::now() < deadline, "lightning-rod did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_board_enrolls_serves_and_survives_a_router_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let url = format!("ws://{addr}/");
    let mut cloud = cloud(listener).await;

    // Enrollment: a wrong code is refused (77), the right one stores the identity.
    let bad = bin().args(["enroll", "--url", &url, "--code", "WRONG", "--config"]).arg(&config).output().unwrap();
    assert_eq!(bad.status.code(), Some(77), "{}", String::from_utf8_lossy(&bad.stderr));
    let out = bin().args(["enroll", "--url", &url, "--code", CODE, "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let identity = std::fs::read_to_string(dir.path().join("state/identity.json")).unwrap();
    assert!(identity.contains(BOARD) && identity.contains(SECRET));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(SECRET), "the secret was logged");

    // Run: login, then every procedure. systemd (Type=notify) hears READY=1 once logged in.
    let notify_path = dir.path().join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let mut child = Agent(
        bin()
            .args(["run", "--hal", "sim", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let s1 = within("login", cloud.logins.recv()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = within("sd_notify READY", notify.recv(&mut buf)).await.unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "READY=1\nSTATUS=online\n");
    let mut gpio = cloud.agent.subscribe(&format!("board.{BOARD}.gpio"), 8).await.unwrap();
    wait_registered(&cloud.agent, s1).await;
    let a = &cloud.agent;
    assert!(ok(a, s1, "DevicePing", vec![json!({})]).await.as_str().unwrap().contains(" @ "));
    assert_eq!(ok(a, s1, "DeviceEcho", vec![json!({"say": "hello"})]).await, "hello");
    assert_eq!(ok(a, s1, "DeviceInfo", vec![json!({})]).await["lr_version"], env!("CARGO_PKG_VERSION"));
    assert!(ok(a, s1, "DeviceNetConfig", vec![]).await["interfaces"].is_array());
    assert_eq!(ok(a, s1, "GpioList", vec![]).await["lines"].as_array().unwrap().len(), 28);
    ok(a, s1, "GpioWatch", vec![json!({"line": "GPIO17", "edge": "both"})]).await;
    assert_eq!(
        ok(a, s1, "GpioWrite", vec![json!({"line": "GPIO17", "value": 1})]).await,
        json!({"name": "GPIO17", "value": 1})
    );
    assert_eq!(ok(a, s1, "GpioRead", vec![json!({"line": "GPIO17"})]).await["value"], 1);
    let ev = within("GPIO event", gpio.recv()).await.unwrap();
    assert_eq!((ev.args[0]["line"].as_str(), ev.args[0]["edge"].as_str()), (Some("GPIO17"), Some("rising")));
    ok(a, s1, "GpioDirection", vec![json!({"line": "GPIO3", "direction": "in", "bias": "pull-up"})]).await;
    assert_eq!(ok(a, s1, "I2cList", vec![]).await, json!({"buses": [1]}));
    ok(a, s1, "I2cWrite", vec![json!({"bus": 1, "address": "0x48", "register": 0, "data": [42]})]).await;
    assert_eq!(
        ok(a, s1, "I2cRead", vec![json!({"bus": 1, "address": 72, "register": 0, "length": 1})]).await,
        json!({"data": [42]})
    );
    assert_eq!(ok(a, s1, "ServicesStatus", vec![]).await, json!({"services": []}));
    // A service through a real tunnel server, with a token for this board (any port).
    let (turl, key, _tstop) = tunnel_server().await;
    let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let token = key.mint(&Claims { board: BOARD.into(), port: 0, vpn: None, expiry }).unwrap();
    let local = echo_server().await;
    let svc = json!({"uuid": "svc-echo", "name": "echo", "port": local, "tunnel_url": turl, "tunnel_token": token});
    let msg = ok(a, s1, "ServiceEnable", vec![svc.clone(), json!(0)]).await;
    let public: u16 = msg.as_str().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    echo_through(public, b"ping").await;
    assert_eq!(ok(a, s1, "ServicesStatus", vec![]).await["services"][0]["active"], true);
    assert_eq!(call(a, s1, "VpnLeave", vec![json!({"vpn": "none"})]).await["result"], "WARNING");
    let r =
        call(a, s1, "DevicePkgOperation", vec![json!({"manager": "echo", "command": "install", "package": "htop"})])
            .await;
    assert_eq!(r["result"], "RUNNING");
    let n = within("notify_result", cloud.notifications.recv()).await.unwrap();
    assert_eq!((n["result"].as_str(), n["req_id"].as_str()), (Some("SUCCESS"), Some("req-DevicePkgOperation")));
    assert_eq!(ok(a, s1, "DeviceReboot", vec![json!({"delay": 0})]).await, "reboot in 0 s");
    // Bad arguments: ERROR replies over the wire, the agent keeps serving.
    for (m, args) in [
        ("DeviceEcho", vec![json!(5)]),
        ("GpioWrite", vec![json!({"line": "GPIO99", "value": 1})]),
        ("I2cRead", vec![json!({"bus": 1, "address": 72, "length": 4096})]),
        ("ServiceEnable", vec![json!({"uuid": "s"}), json!(1)]),
        ("VpnJoin", vec![json!({"vpn": "v"})]),
        ("DevicePkgOperation", vec![json!({"manager": "sh", "command": "-c", "package": "reboot"})]),
    ] {
        assert_eq!(call(a, s1, m, args).await["result"], "ERROR", "{m}");
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while *cloud.alive.lock().unwrap() == 0 || !dir.path().join("rebooted").exists() {
        assert!(tokio::time::Instant::now() < deadline, "no wamp_alive, or the reboot command did not run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The router restarts on the same address: the board logs in again under a new session
    // and registers every procedure under it.
    cloud.stop.cancel();
    let _ = cloud.task.await;
    drop(cloud.router);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "cannot rebind {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut cloud2 = self::cloud(listener).await;
    let s2 = within("second login", cloud2.logins.recv()).await.unwrap();
    assert_ne!(s1, s2);
    wait_registered(&cloud2.agent, s2).await;
    assert_eq!(ok(&cloud2.agent, s2, "DeviceEcho", vec![json!({"say": 2})]).await, 2);
    assert_eq!(ok(&cloud2.agent, s2, "GpioRead", vec![json!({"line": "GPIO17"})]).await["value"], 1);
    echo_through(public, b"still up after the router restart").await;

    // SIGTERM: a clean exit.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut child.0), 0);
    let mut log = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(!log.contains(SECRET), "the board secret reached the log");
    assert!(log.contains("logged in"), "{log}");
    assert!(!log.contains(&token), "a tunnel token reached the log");

    // A reboot: the exposure comes back from services.json on the same public port.
    let child = Agent(bin().args(["run", "--config"]).arg(&config).stderr(Stdio::null()).spawn().unwrap());
    echo_through(public, b"restored on boot").await;
    let s3 = within("third login", cloud2.logins.recv()).await.unwrap();
    wait_registered(&cloud2.agent, s3).await;
    assert_eq!(ok(&cloud2.agent, s3, "ServicesStatus", vec![]).await["services"][0]["public_port"], public);
    drop(child);

    // A board the cloud no longer accepts (wrong secret) exits 77 instead of retrying.
    let state = dir.path().join("state/identity.json");
    std::fs::write(&state, std::fs::read_to_string(&state).unwrap().replace(SECRET, "revoked")).unwrap();
    let mut child =
        Agent(bin().args(["run", "--hal", "sim", "--config"]).arg(&config).stderr(Stdio::null()).spawn().unwrap());
    assert_eq!(wait_exit(&mut child.0), 77);
    cloud2.stop.cancel();
}

/// With the cloud unreachable the agent reports READY (so boot goes on) and keeps retrying.
#[tokio::test]
async fn ready_on_entering_retry_and_never_exits_on_transient_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    // An address where nothing listens: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let id = json!({"uuid": BOARD, "name": "b", "agent": "agent", "url": format!("ws://127.0.0.1:{port}/"), "realm": "s4t",
                    "credentials": {"authid": BOARD, "secret": SECRET}});
    std::fs::write(dir.path().join("state/identity.json"), id.to_string()).unwrap();
    assert_eq!(first_notification(dir.path(), &config).await, "READY=1\nSTATUS=retrying\n");
}

/// A first boot with the cloud unreachable reports READY too (status "enrolling") while
/// enrollment is retried: with `Type=notify`, systemd held the boot, then killed and started
/// the agent again, every 90 s.
#[tokio::test]
async fn ready_while_first_boot_enrollment_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    // An address where nothing listens: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let text = std::fs::read_to_string(&config).unwrap();
    let cloud = format!("[cloud]\nurl = \"ws://127.0.0.1:{port}/\"\ncode = \"CODE-1\"\n");
    std::fs::write(&config, text.replacen("[cloud]\n", &cloud, 1)).unwrap();
    assert_eq!(first_notification(dir.path(), &config).await, "READY=1\nSTATUS=enrolling\n");
    assert!(!dir.path().join("state/identity.json").exists());
}

/// Runs the agent with `config` under a `NOTIFY_SOCKET` in `dir`: its first sd_notify message.
/// It must still be running then (nothing it met is permanent), and exit 0 on SIGTERM.
async fn first_notification(dir: &std::path::Path, config: &std::path::Path) -> String {
    let notify_path = dir.join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let mut child = Agent(
        bin()
            .args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &notify_path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let n = within("sd_notify READY", notify.recv(&mut buf)).await.unwrap();
    assert!(child.0.try_wait().unwrap().is_none(), "exited on a transient error");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut child.0), 0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `wss://` with the cloud's CA pinned at enrollment: enroll, then log in; a wrong pin fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_and_login_over_wss_with_a_pinned_ca() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("wss://localhost:{}/", listener.local_addr().unwrap().port());
    let mut cloud = cloud_with_tls(listener, url.clone(), Some(Arc::new(server))).await;
    let pin = lightning_rod::tls::fingerprint_of(ca.der());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    // Without a pin, wss is a configuration error; with a wrong one the handshake fails.
    let out = bin().args(["enroll", "--url", &url, "--code", CODE, "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    let wrong = lightning_rod::tls::fingerprint_of(b"not the CA");
    let out = bin()
        .args(["enroll", "--url", &url, "--code", CODE, "--ca-fingerprint", &wrong, "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(lightning_rod::EXIT_UNTRUSTED), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bin()
        .args(["enroll", "--url", &url, "--code", CODE, "--ca-fingerprint", &pin, "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // `run` needs no flag: the pin was stored with the identity.
    let _child = Agent(bin().args(["run", "--config"]).arg(&config).stderr(Stdio::null()).spawn().unwrap());
    let session = within("login over wss", cloud.logins.recv()).await.unwrap();
    wait_registered(&cloud.agent, session).await;
    assert!(cloud.router.session(session).unwrap().transport.tls);
    cloud.stop.cancel();
}

/// First boot: no identity, a URL and a code in the configuration: the agent enrolls by
/// itself, then logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_boot_enrolls_from_the_configuration() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let mut cloud = cloud(listener).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replacen("[cloud]\n", &format!("[cloud]\nurl = \"{url}\"\ncode = \"{CODE}\"\n"), 1))
        .unwrap();
    let _child = Agent(bin().args(["run", "--config"]).arg(&config).stderr(Stdio::null()).spawn().unwrap());
    let session = within("first-boot login", cloud.logins.recv()).await.unwrap();
    wait_registered(&cloud.agent, session).await;
    assert!(dir.path().join("state/identity.json").exists());
    cloud.stop.cancel();
}

/// A board migrated from the original lightning-rod: no config.toml identity, only the
/// original settings.json with its uuid. It logs in anonymously to a cloud that allows legacy
/// boards; the cloud binds the session to the uuid after `connection`, then the procedures
/// register under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_board_logs_in_as_legacy_with_its_original_identity() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let auth = StaticAuthenticator::new().allow_anonymous(true);
    let router = Router::new(RouterConfig::default(), Arc::new(auth));
    let stop = CancellationToken::new();
    let (r, s) = (router.clone(), stop.clone());
    tokio::spawn(async move { r.serve(listener, None, s).await });
    let agent = router.local_session("agent").await.unwrap();
    let (ltx, mut logins) = mpsc::channel(4);
    let binder = router.clone();
    agent
        .register("agent.stack4things.connection", move |inv| {
            let (ltx, binder) = (ltx.clone(), binder.clone());
            async move {
                let session = kwarg(&inv.kwargs, "session").as_u64().unwrap();
                binder.bind_board(session, kwarg(&inv.kwargs, "uuid").as_str().unwrap()).unwrap();
                let _ = ltx.send(session).await;
                reply(json!({"result": "SUCCESS", "message": ""}))
            }
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    std::fs::write(
        dir.path().join("none.json"),
        json!({"iotronic": {"board": {"uuid": BOARD, "code": "OLD", "name": "old-pi", "agent": "agent"},
               "wamp": {"main-agent": {"url": url, "realm": "s4t"}, "registration-agent": {"url": url, "realm": "s4t"}}}})
        .to_string(),
    )
    .unwrap();
    let _child = Agent(bin().args(["run", "--config"]).arg(&config).stderr(Stdio::null()).spawn().unwrap());
    let session = within("legacy login", logins.recv()).await.unwrap();
    wait_registered(&agent, session).await;
    assert_eq!(ok(&agent, session, "DeviceEcho", vec![json!({"say": "legacy"})]).await, "legacy");
    let id = std::fs::read_to_string(dir.path().join("state/identity.json")).unwrap();
    assert!(id.contains("old-pi") && !id.contains("credentials\": {"), "{id}");
    stop.cancel();
}

#[test]
fn check_config_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let out = bin().args(["check-config", "--config"]).arg(&config).env("LR_CODE", "TOP-SECRET-CODE").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("code: Some(") && text.contains("***"), "{text}");
    assert!(!text.contains("TOP-SECRET-CODE"), "{text}");
}

#[test]
fn bad_configuration_and_missing_identity_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[hal]\nbackend = \"gpio-sysfs\"\n").unwrap();
    let out = bin().args(["run", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml"));
    let config = write_config(dir.path());
    let out = bin().args(["run", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not enrolled"));
}
