//! Procedure tests on the sim HAL with a fake tunnel opener: every procedure's success shape
//! and an ERROR reply for every kind of bad argument.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::services::{BoxFuture, Tunnel, TunnelOpener, TunnelSpec};
use super::*;
use crate::Secret;
use crate::config::{DeviceConfig, PackageManager};
use crate::hal::Hal;
use crate::state::StateStore;

#[derive(Default)]
struct FakeOpener {
    opened: Mutex<Vec<TunnelSpec>>,
    alive: Arc<AtomicBool>,
    refuse: AtomicBool,
    /// Tokens handed to live tunnels by `Tunnel::renew`, by public port.
    renewed: Arc<Mutex<Vec<(u16, String)>>>,
}

struct FakeTunnel(Arc<AtomicBool>, u16, Arc<Mutex<Vec<(u16, String)>>>);
impl Tunnel for FakeTunnel {
    fn is_alive(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn public_port(&self) -> u16 {
        self.1
    }
    fn renew(&self, token: &Secret) -> bool {
        self.2.lock().unwrap().push((self.1, token.expose().to_owned()));
        true
    }
}

impl TunnelOpener for Arc<FakeOpener> {
    fn open(&self, spec: TunnelSpec) -> BoxFuture<'_, crate::Result<Box<dyn Tunnel>>> {
        Box::pin(async move {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(crate::Error::Tunnel("refused".into()));
            }
            let port = if spec.public_port == 0 { 50999 } else { spec.public_port };
            self.opened.lock().unwrap().push(spec);
            self.alive.store(true, Ordering::SeqCst);
            Ok(Box::new(FakeTunnel(self.alive.clone(), port, self.renewed.clone())) as Box<dyn Tunnel>)
        })
    }
}

struct Harness {
    ctx: Arc<Context>,
    notify: mpsc::Receiver<Notification>,
    events: mpsc::Receiver<crate::hal::GpioEvent>,
    lifecycle: mpsc::Receiver<Lifecycle>,
    opener: Arc<FakeOpener>,
    dir: tempfile::TempDir,
    /// Programs for the managers (the state directory holds the agent's files only).
    _bin: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut device = DeviceConfig {
        reboot_command: vec!["touch".into(), dir.path().join("rebooted").display().to_string()],
        min_delay_s: 0,
        ..DeviceConfig::default()
    };
    device.package_managers.insert(
        "echo".into(),
        PackageManager {
            argv: vec!["echo".into(), "pkg".into()],
            commands: vec!["install".into(), "update".into()],
            version_format: "{package}=={version}".into(),
            writes: vec![dir.path().to_owned()],
        },
    );
    device.package_managers.insert(
        "false".into(),
        PackageManager {
            argv: vec!["false".into()],
            commands: vec!["install".into()],
            version_format: "{package}={version}".into(),
            writes: vec![],
        },
    );
    // Runs until something is written into the FIFO `release` (that a test creates).
    let release = dir.path().join("release").display().to_string();
    device.package_managers.insert(
        "slow".into(),
        PackageManager {
            argv: vec!["sh".into(), "-c".into(), "cat \"$0\" >/dev/null".into(), release.clone()],
            commands: vec!["install".into()],
            version_format: "{package}".into(),
            writes: vec![],
        },
    );
    // Exits at once, leaving behind a process that holds its output open (as a daemon started
    // by a maintainer script does) until something is written into the FIFO `release`.
    device.package_managers.insert(
        "daemon".into(),
        PackageManager {
            argv: vec!["sh".into(), "-c".into(), "cat \"$0\" >/dev/null & echo started".into(), release],
            commands: vec!["install".into()],
            version_format: "{package}".into(),
            writes: vec![],
        },
    );
    // A shell under the name of apt-get and of pip3 (a link): the environment they are given.
    let bin = tempfile::tempdir().unwrap();
    for (name, variable) in [("apt-get", "DEBIAN_FRONTEND"), ("pip3", "PIP_YES")] {
        let program = bin.path().join(name);
        std::os::unix::fs::symlink("/bin/sh", &program).unwrap();
        let show = format!("echo \"${variable}|$S4T_LR_PACKAGE_OPERATION\"");
        device.package_managers.insert(
            format!("env-{name}"),
            PackageManager {
                argv: vec![program.display().to_string(), "-c".into(), show],
                commands: vec!["install".into()],
                version_format: "{package}".into(),
                writes: vec![],
            },
        );
    }
    let opener = Arc::new(FakeOpener::default());
    let store = StateStore::open(dir.path()).unwrap();
    let services = ServiceManager::new(store.clone(), Box::new(opener.clone()), "ws://cloud:8080/".into());
    let vpns = VpnManager::new(store.clone(), Box::new(vpn::NoPackets), "ws://cloud:8080/".into());
    let (ctx, (notify, events, lifecycle)) = context(store, device, services, vpns);
    Harness { ctx, notify, events, lifecycle, opener, dir, _bin: bin }
}

/// The receivers of a test context's queues: notifications, GPIO events, lifecycle requests.
type Queues = (mpsc::Receiver<Notification>, mpsc::Receiver<crate::hal::GpioEvent>, mpsc::Receiver<Lifecycle>);

/// A context of board "b1" on the sim HAL around `store` and these managers.
pub(super) fn context(
    store: StateStore,
    device: DeviceConfig,
    services: ServiceManager,
    vpns: VpnManager,
) -> (Arc<Context>, Queues) {
    let (ntx, notify) = mpsc::channel(8);
    let (gtx, events) = mpsc::channel(8);
    let (ltx, lifecycle) = mpsc::channel(1);
    let (ttx, _) = mpsc::channel(1);
    let plugins = crate::plugins::PluginManager::new(
        store,
        Default::default(),
        Hal::sim(32),
        "b1".into(),
        ttx,
        CancellationToken::new(),
    );
    let ctx = Arc::new(Context {
        board_uuid: "b1".into(),
        hal: Hal::sim(32),
        device,
        notify: ntx,
        gpio_events: gtx,
        lifecycle: ltx,
        services: Arc::new(services),
        vpns: Arc::new(vpns),
        plugins: Arc::new(plugins),
        shutdown: CancellationToken::new(),
        package_operation: Arc::default(),
        power: Default::default(),
    });
    (ctx, (notify, events, lifecycle))
}

/// [`context`] around `store` and `vpns`, with no tunnels and the default device: for the
/// procedure tests of `vpn.rs` and `plugins.rs`.
pub(super) fn bare_context(store: StateStore, vpns: VpnManager) -> Arc<Context> {
    let services = ServiceManager::new(store.clone(), Box::new(services::NoTunnels), "ws://127.0.0.1:8080/".into());
    context(store, DeviceConfig::default(), services, vpns).0
}

/// `method(arg)` with a request dict first, as the cloud calls it.
pub(super) async fn procedure(ctx: &Arc<Context>, method: Method, arg: Value) -> Reply {
    dispatch(ctx, method, Call::from_positional(vec![json!({"uuid": "r"}), arg])).await
}

fn req() -> Value {
    json!({"uuid": "r-1", "main_request_uuid": null})
}

async fn call(h: &Harness, name: &str, args: Vec<Value>) -> Reply {
    let method = Method::from_name(name).unwrap_or_else(|| panic!("no method {name}"));
    let mut positional = vec![req()];
    positional.extend(args);
    let reply = dispatch(&h.ctx, method, Call::from_positional(positional)).await;
    // Every reply is the wire JSON string with exactly these keys.
    let wire: Value = serde_json::from_str(&reply.to_wire()).unwrap();
    let mut keys: Vec<_> = wire.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["message", "req_id", "result"]);
    assert_eq!(wire["req_id"], "r-1");
    reply
}

async fn ok_msg(h: &Harness, name: &str, args: Vec<Value>) -> Value {
    let r = call(h, name, args).await;
    assert_eq!(r.result, Outcome::Success, "{name}: {:?}", r.message);
    r.message
}

#[tokio::test]
async fn device_procedures_answer() {
    let h = harness();
    assert!(ok_msg(&h, "DevicePing", vec![json!({})]).await.as_str().unwrap().contains(" @ 20"));
    assert_eq!(ok_msg(&h, "DeviceEcho", vec![json!({"say": "hi"})]).await, "hi");
    let info = ok_msg(&h, "DeviceInfo", vec![json!({})]).await;
    for key in ["hostname", "arch", "kernel", "uptime_s", "load", "mem_total_kb", "mem_available_kb", "lr_version"] {
        assert!(!info[key].is_null(), "DeviceInfo.{key} missing: {info}");
    }
    let net = ok_msg(&h, "DeviceNetConfig", vec![]).await;
    assert!(net["interfaces"].as_array().unwrap().iter().any(|i| i["name"] == "lo"), "{net}");
    let c = device::connectivity();
    assert!(c.is_object(), "{c}");
    if let Some(ip) = c.get("local_ip") {
        assert!(ip.as_str().unwrap().parse::<std::net::Ipv4Addr>().is_ok(), "{c}");
        assert_ne!(c["iface"], "lo");
    }
}

#[tokio::test]
async fn reboot_runs_the_configured_command_and_restart_asks_the_main_loop() {
    let h = harness();
    let msg = ok_msg(&h, "DeviceReboot", vec![json!({"delay": 0})]).await;
    assert_eq!(msg, "reboot in 0 s");
    let marker = h.dir.path().join("rebooted");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(tokio::time::Instant::now() < deadline, "reboot command did not run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A board that reboots restarts no more (the reboot keeps the package lock): a new one.
    let mut h = harness();
    ok_msg(&h, "DeviceRestartLR", vec![json!({})]).await;
    let got = tokio::time::timeout(Duration::from_secs(10), h.lifecycle.recv()).await.unwrap();
    assert_eq!(got, Some(Lifecycle::Restart));
}

/// At most one reboot or restart waits for its delay: a new one replaces it, and
/// `{"cancel": true}` calls it off. Each used to wait on its own, up to a day (beyond the
/// lease of the user who asked), and none could be called off.
#[tokio::test(start_paused = true)]
async fn one_delayed_restart_waits_and_it_can_be_called_off() {
    let mut h = harness();
    assert_eq!(ok_msg(&h, "DeviceRestartLR", vec![json!({"delay": 100})]).await, "restart in 100 s");
    let msg = ok_msg(&h, "DeviceRestartLR", vec![json!({"delay": 200})]).await;
    assert_eq!(msg, "restart in 200 s (the one pending is called off)");
    let got = tokio::time::timeout(Duration::from_secs(300), h.lifecycle.recv()).await.unwrap();
    assert_eq!(got, Some(Lifecycle::Restart));
    let again = tokio::time::timeout(Duration::from_secs(3600), h.lifecycle.recv()).await;
    assert!(again.is_err(), "the replaced restart ran too: {again:?}");
    ok_msg(&h, "DeviceRestartLR", vec![json!({"delay": 100})]).await;
    let msg = ok_msg(&h, "DeviceReboot", vec![json!({"cancel": true})]).await;
    assert_eq!(msg, "the pending reboot or restart is called off");
    let none = tokio::time::timeout(Duration::from_secs(3600), h.lifecycle.recv()).await;
    assert!(none.is_err(), "a called-off restart ran: {none:?}");
    assert_eq!(ok_msg(&h, "DeviceReboot", vec![json!({"cancel": true})]).await, "no reboot or restart is pending");
}

#[tokio::test]
async fn package_operation_replies_running_then_notifies() {
    let mut h = harness();
    let r = call(
        &h,
        "DevicePkgOperation",
        vec![json!({"manager": "echo", "command": "install", "package": "nano", "version": "2.1"})],
    )
    .await;
    assert_eq!(r.result, Outcome::Running);
    let n = tokio::time::timeout(Duration::from_secs(10), h.notify.recv()).await.unwrap().unwrap();
    assert_eq!((n.result, n.req_id.as_deref()), (Outcome::Success, Some("r-1")));
    assert_eq!(n.message["output"], "pkg install nano==2.1\n");
    // A failing manager reports ERROR with its status.
    call(&h, "DevicePkgOperation", vec![json!({"manager": "false", "command": "install", "package": "x"})]).await;
    let n = tokio::time::timeout(Duration::from_secs(10), h.notify.recv()).await.unwrap().unwrap();
    assert_eq!((n.result, &n.message["status"]), (Outcome::Error, &json!(1)));
}

/// One package operation at a time: a second while one runs is refused, and once the first
/// has finished the next one runs.
#[tokio::test]
async fn package_operations_run_one_at_a_time() {
    let mut h = harness();
    let fifo = h.dir.path().join("release");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let op = |manager: &str| vec![json!({"manager": manager, "command": "install", "package": "x"})];
    let first = call(&h, "DevicePkgOperation", op("slow")).await;
    assert_eq!(first.result, Outcome::Running);
    let second = call(&h, "DevicePkgOperation", op("echo")).await;
    assert_eq!(second.result, Outcome::Error);
    assert!(second.message.to_string().contains("another package operation is running"), "{:?}", second.message);
    // Opening the FIFO waits for the manager to read it: on a blocking thread.
    tokio::fs::write(&fifo, b"done").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), h.notify.recv()).await.unwrap().unwrap();
    assert_eq!(n.result, Outcome::Success, "{:?}", n.message);
    let third = call(&h, "DevicePkgOperation", op("echo")).await;
    assert_eq!(third.result, Outcome::Running, "{:?}", third.message);
    let n = tokio::time::timeout(Duration::from_secs(10), h.notify.recv()).await.unwrap().unwrap();
    assert_eq!(n.result, Outcome::Success);
}

/// A reboot or restart waits for a running package operation (killing dpkg midway can leave
/// the package database broken), then goes ahead; one called off while it waits never runs.
#[tokio::test]
async fn reboot_and_restart_wait_for_a_running_package_operation() {
    let mut h = harness();
    let fifo = h.dir.path().join("release");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let slow = vec![json!({"manager": "slow", "command": "install", "package": "x"})];
    assert_eq!(call(&h, "DevicePkgOperation", slow.clone()).await.result, Outcome::Running);
    assert_eq!(ok_msg(&h, "DeviceReboot", vec![json!({"delay": 0})]).await, "reboot in 0 s");
    let marker = h.dir.path().join("rebooted");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!marker.exists(), "the reboot ran during the package operation");
    tokio::fs::write(&fifo, b"done").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), h.notify.recv()).await.unwrap().unwrap();
    assert_eq!(n.result, Outcome::Success, "the package operation was interrupted: {:?}", n.message);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the reboot did not run after the package operation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A restart waiting for a package operation can still be called off (on a board that has
    // not rebooted: a reboot keeps the package lock).
    let mut h = harness();
    let fifo = h.dir.path().join("release");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let running = call(&h, "DevicePkgOperation", slow.clone()).await;
    assert_eq!(running.result, Outcome::Running, "{:?}", running.message);
    ok_msg(&h, "DeviceRestartLR", vec![json!({"delay": 0})]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let msg = ok_msg(&h, "DeviceRestartLR", vec![json!({"cancel": true})]).await;
    assert_eq!(msg, "the pending reboot or restart is called off");
    tokio::fs::write(&fifo, b"done").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), h.notify.recv()).await.unwrap().unwrap();
    assert_eq!(n.result, Outcome::Success, "{:?}", n.message);
    let restart = tokio::time::timeout(Duration::from_millis(500), h.lifecycle.recv()).await;
    assert!(restart.is_err(), "a called-off restart ran: {restart:?}");
}

/// A package operation is never killed for its time (apt killed half way leaves dpkg
/// interrupted, beyond what any allowed command repairs): past 30 minutes it is reported still
/// running, keeps the lock (no other operation starts), a restart waits for it however long
/// it takes, and it ends with its result.
#[tokio::test(start_paused = true)]
async fn a_long_package_operation_is_reported_still_running_never_killed() {
    let mut h = harness();
    let fifo = h.dir.path().join("release");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let op = |manager: &str| vec![json!({"manager": manager, "command": "install", "package": "x"})];
    assert_eq!(call(&h, "DevicePkgOperation", op("slow")).await.result, Outcome::Running);
    ok_msg(&h, "DeviceRestartLR", vec![json!({"delay": 0})]).await;
    // The paused clock runs ahead while the manager waits for the FIFO.
    let n = h.notify.recv().await.unwrap();
    assert_eq!(n.result, Outcome::Running, "the operation ended at 30 minutes: {:?}", n.message);
    assert!(n.message.as_str().unwrap().starts_with("still running after"), "{:?}", n.message);
    assert_eq!(n.req_id.as_deref(), Some("r-1"));
    let second = call(&h, "DevicePkgOperation", op("echo")).await;
    assert_eq!(second.result, Outcome::Error, "the lock was let go: {:?}", second.message);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let restart = h.lifecycle.try_recv();
    assert!(restart.is_err(), "restarted during the package operation: {restart:?}");
    tokio::fs::write(&fifo, b"done").await.unwrap();
    let n = h.notify.recv().await.unwrap();
    assert_eq!((n.result, n.req_id.as_deref()), (Outcome::Success, Some("r-1")), "{:?}", n.message);
    assert_eq!(h.lifecycle.recv().await, Some(Lifecycle::Restart));
}

/// The result comes when the manager exits, not when its output closes: a daemon started by
/// a maintainer script inherits the output and may hold it open for as long as it runs.
#[tokio::test]
async fn the_result_does_not_wait_for_a_daemon_holding_the_output() {
    let mut h = harness();
    let fifo = h.dir.path().join("release");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let op = vec![json!({"manager": "daemon", "command": "install", "package": "x"})];
    assert_eq!(call(&h, "DevicePkgOperation", op).await.result, Outcome::Running);
    let n = tokio::time::timeout(Duration::from_secs(20), h.notify.recv()).await;
    // The daemon ends once the FIFO is written.
    tokio::fs::write(&fifo, b"done").await.unwrap();
    let n = n.expect("the result waited for the output to close").unwrap();
    assert_eq!(n.result, Outcome::Success, "{:?}", n.message);
    assert_eq!(n.message["output"], "started\n");
}

/// Managers run unattended (stdin is /dev/null: a question would stop them): apt with
/// `DEBIAN_FRONTEND=noninteractive` and the defaults keeping changed conffiles, pip with
/// `PIP_YES`; and every manager with the marker that tells the agent's own postinst to leave
/// the restart to the agent. (Where the tests run with `DEBIAN_FRONTEND` set already, as in
/// many CI images, apt's half proves nothing.)
#[tokio::test]
async fn package_managers_run_unattended_and_marked() {
    let mut h = harness();
    for (manager, seen) in [("env-apt-get", "noninteractive|1\n"), ("env-pip3", "1|1\n")] {
        let op = vec![json!({"manager": manager, "command": "install", "package": "nano"})];
        assert_eq!(call(&h, "DevicePkgOperation", op).await.result, Outcome::Running);
        let n = tokio::time::timeout(Duration::from_secs(10), h.notify.recv()).await.unwrap().unwrap();
        assert_eq!(n.result, Outcome::Success, "{:?}", n.message);
        assert_eq!(n.message["output"], seen, "{manager}");
    }
    let defaults = DeviceConfig::default().package_managers;
    for apt in ["apt", "apt-get"] {
        let argv = defaults[apt].argv.join(" ");
        assert!(argv.contains("-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"), "{argv}");
    }
}

/// A restart asked of the main loop keeps the package lock until the agent stops: the main
/// loop reads it only in a live session (maybe minutes later), and an operation started
/// meanwhile would be killed half way.
#[tokio::test]
async fn a_restart_keeps_the_package_lock_until_the_agent_stops() {
    let mut h = harness();
    ok_msg(&h, "DeviceRestartLR", vec![json!({"delay": 0})]).await;
    let got = tokio::time::timeout(Duration::from_secs(10), h.lifecycle.recv()).await.unwrap();
    assert_eq!(got, Some(Lifecycle::Restart));
    let op = vec![json!({"manager": "echo", "command": "install", "package": "x"})];
    let r = call(&h, "DevicePkgOperation", op).await;
    assert_eq!(r.result, Outcome::Error, "a package operation started before the restart: {:?}", r.message);
    assert!(r.message.to_string().contains("another package operation is running"), "{:?}", r.message);
}

#[tokio::test]
async fn gpio_procedures_on_the_sim() {
    let mut h = harness();
    let lines = ok_msg(&h, "GpioList", vec![]).await;
    assert_eq!(lines["lines"].as_array().unwrap().len(), 28);
    assert_eq!(
        lines["lines"][0],
        json!({"name": "GPIO0", "chip": "gpiochip0", "offset": 0, "direction": "in", "value": 0})
    );
    assert_eq!(
        ok_msg(&h, "GpioWatch", vec![json!({"line": "GPIO5", "edge": "rising"})]).await,
        json!({"name": "GPIO5", "edge": "rising"})
    );
    assert_eq!(
        ok_msg(&h, "GpioWrite", vec![json!({"line": "GPIO5", "value": 1, "direction": "out"})]).await,
        json!({"name": "GPIO5", "value": 1})
    );
    assert_eq!(ok_msg(&h, "GpioRead", vec![json!({"line": "GPIO5"})]).await, json!({"name": "GPIO5", "value": 1}));
    let ev = h.events.try_recv().unwrap();
    assert_eq!((ev.line.as_str(), ev.value), ("GPIO5", 1));
    assert_eq!(
        ok_msg(&h, "GpioDirection", vec![json!({"line": "GPIO6", "direction": "in", "bias": "pull-up"})]).await,
        json!({"name": "GPIO6", "direction": "in"})
    );
    assert_eq!(ok_msg(&h, "GpioRead", vec![json!({"line": "GPIO6"})]).await["value"], 1);
}

#[tokio::test]
async fn i2c_procedures_on_the_sim() {
    let h = harness();
    assert_eq!(ok_msg(&h, "I2cList", vec![]).await, json!({"buses": [1]}));
    assert_eq!(
        ok_msg(&h, "I2cRead", vec![json!({"bus": 1, "address": 72, "register": 0, "length": 2})]).await,
        json!({"data": [0x19, 0]})
    );
    assert_eq!(
        ok_msg(&h, "I2cWrite", vec![json!({"bus": 1, "address": "0x48", "register": 0, "data": [7]})]).await,
        json!({"written": 1})
    );
    assert_eq!(
        ok_msg(&h, "I2cRead", vec![json!({"bus": 1, "address": "0x48", "register": 0, "length": 1})]).await,
        json!({"data": [7]})
    );
}

#[tokio::test]
async fn services_are_opened_persisted_and_restored() {
    let h = harness();
    let svc = json!({"uuid": "s-ssh", "name": "ssh", "port": 22, "tunnel_token": "tok-secret"});
    ok_msg(&h, "ServiceEnable", vec![svc.clone(), json!(50022)]).await;
    let spec = h.opener.opened.lock().unwrap()[0].clone();
    assert_eq!((spec.server_url.as_str(), spec.public_port, spec.local_port), ("ws://cloud:8080/", 50022, 22));
    assert_eq!(spec.token.as_ref().map(Secret::expose), Some("tok-secret"));
    let status = ok_msg(&h, "ServicesStatus", vec![]).await;
    assert_eq!(status["services"][0]["active"], true);
    // The tunnel dies (cloud restart): restore reopens it from services.json.
    h.opener.alive.store(false, Ordering::SeqCst);
    assert_eq!(h.ctx.services.restore_all().await, 0);
    assert_eq!(h.opener.opened.lock().unwrap().len(), 2);
    // A fresh manager on the same state directory (a reboot) restores it too.
    let store = StateStore::open(h.dir.path()).unwrap();
    let again = ServiceManager::new(store, Box::new(h.opener.clone()), "ws://x:8080/".into());
    assert_eq!(again.restore_all().await, 0);
    assert_eq!(h.opener.opened.lock().unwrap().len(), 3);
    ok_msg(&h, "ServiceDisable", vec![svc.clone()]).await;
    assert_eq!(call(&h, "ServiceDisable", vec![svc.clone()]).await.result, Outcome::Warning);
    assert_eq!(ok_msg(&h, "ServicesStatus", vec![]).await, json!({"services": []}));
    h.opener.refuse.store(true, Ordering::SeqCst);
    let r = call(&h, "ServiceEnable", vec![svc, json!(50022)]).await;
    assert_eq!(r.result, Outcome::Error);
    assert!(!r.message.to_string().contains("tok-secret"));
}

/// Opens a tunnel only when as many opens as its barrier counts are waiting together.
struct GatedOpener(Arc<tokio::sync::Barrier>);

impl TunnelOpener for GatedOpener {
    fn open(&self, spec: TunnelSpec) -> BoxFuture<'_, crate::Result<Box<dyn Tunnel>>> {
        Box::pin(async move {
            self.0.wait().await;
            let t = FakeTunnel(Arc::new(AtomicBool::new(true)), spec.public_port, Arc::default());
            Ok(Box::new(t) as Box<dyn Tunnel>)
        })
    }
}

/// A restore opens a board's exposures at once, not one after the other: a tunnel server
/// that does not answer costs one open timeout, not one per service, while ServiceEnable
/// waits for the restore (fails when the opens are made in turn: the first never returns).
#[tokio::test]
async fn a_restore_opens_every_exposure_at_once() {
    let h = harness();
    for (i, name) in ["ssh", "http", "mqtt"].into_iter().enumerate() {
        let svc = json!({"uuid": format!("s-{name}"), "name": name, "port": 22 + i, "tunnel_token": "t"});
        ok_msg(&h, "ServiceEnable", vec![svc, json!(50022 + i)]).await;
    }
    let store = StateStore::open(h.dir.path()).unwrap();
    let gate = Arc::new(tokio::sync::Barrier::new(3));
    let rebooted = ServiceManager::new(store, Box::new(GatedOpener(gate)), "ws://x:8080/".into());
    let failed = tokio::time::timeout(Duration::from_secs(10), rebooted.restore_all()).await;
    assert_eq!(failed.expect("the three opens never ran at the same time"), 0);
    let status = rebooted.status().unwrap();
    let active: Vec<bool> =
        status["services"].as_array().unwrap().iter().map(|s| s["active"].as_bool().unwrap()).collect();
    assert_eq!(active, [true, true, true], "{status}");
}

#[tokio::test]
async fn renewed_tunnel_tokens_are_saved_and_reach_the_live_tunnels() {
    let h = harness();
    let svc = json!({"uuid": "s-ssh", "name": "ssh", "port": 22, "tunnel_token": "tok-1"});
    ok_msg(&h, "ServiceEnable", vec![svc, json!(50022)]).await;
    let renewed = [
        ("s-ssh".to_owned(), 50022, Secret::new("tok-2")),
        // Another port (the cloud moved the service) or an unknown service: ignored.
        ("s-ssh".to_owned(), 50023, Secret::new("tok-wrong-port")),
        ("s-other".to_owned(), 50024, Secret::new("tok-other")),
    ];
    assert_eq!(h.ctx.services.renew_tokens(&renewed).await.unwrap(), 1);
    assert_eq!(*h.opener.renewed.lock().unwrap(), vec![(50022, "tok-2".to_owned())]);
    assert_eq!(h.opener.opened.lock().unwrap().len(), 1, "the live tunnel is kept, not re-opened");
    // What a restore (or the next boot) re-opens presents the renewed token.
    h.opener.alive.store(false, Ordering::SeqCst);
    assert_eq!(h.ctx.services.restore_all().await, 0);
    let spec = h.opener.opened.lock().unwrap()[1].clone();
    assert_eq!((spec.public_port, spec.token.as_ref().map(Secret::expose)), (50022, Some("tok-2")));
    // VPN memberships keep theirs too (none joined here: nothing to renew, nothing saved).
    assert_eq!(h.ctx.vpns.renew_tokens(&[("v".to_owned(), Secret::new("t"))]).await.unwrap(), 0);
}

/// The cloud's token answer is the complete list of the board's exposures and memberships:
/// those saved before it was asked and missing from it are forgotten (tunnel closed, state
/// removed); those saved since, and those listed, stay.
#[tokio::test]
async fn exposures_and_memberships_the_cloud_no_longer_has_are_forgotten() {
    let h = harness();
    for (uuid, port) in [("s-kept", 50022), ("s-gone", 50023), ("s-moved", 50024)] {
        let svc = json!({"uuid": uuid, "name": uuid, "port": 22, "tunnel_token": "tok"});
        ok_msg(&h, "ServiceEnable", vec![svc, json!(port)]).await;
    }
    let m = |i: &str| vpn::Membership {
        layer: crate::overlay::Layer::L2,
        address: "10.9.0.2".parse().unwrap(),
        prefix_len: 24,
        interface: i.into(),
        tunnel_url: None,
        token: None,
    };
    let store = StateStore::open(h.dir.path()).unwrap();
    let vpns: std::collections::BTreeMap<String, vpn::Membership> =
        [("v-kept".to_owned(), m("s4v0")), ("v-gone".to_owned(), m("s4v1"))].into();
    store.save(crate::state::VPNS_FILE, &vpns).unwrap();
    let (services_before, vpns_before) = (h.ctx.services.saved_ids().unwrap(), h.ctx.vpns.saved_ids().unwrap());
    // Enabled after the question: the answer may predate it.
    let svc = json!({"uuid": "s-new", "name": "new", "port": 22, "tunnel_token": "tok"});
    ok_msg(&h, "ServiceEnable", vec![svc, json!(50025)]).await;

    let listed = [("s-kept".to_owned(), 50022), ("s-moved".to_owned(), 50030)];
    assert_eq!(h.ctx.services.prune(&services_before, &listed).await.unwrap(), 2);
    assert_eq!(h.ctx.vpns.prune(&vpns_before, &["v-kept".to_owned()]).await.unwrap(), 1);
    let mut left = h.ctx.services.saved_ids().unwrap();
    left.sort();
    assert_eq!(left, ["s-kept", "s-new"]);
    assert_eq!(h.ctx.vpns.saved_ids().unwrap(), ["v-kept"]);
    let status = ok_msg(&h, "ServicesStatus", vec![]).await;
    assert_eq!(status["services"].as_array().unwrap().len(), 2, "{status}");
}

/// Every bad argument gives an ERROR reply naming the procedure, and the agent keeps serving.
#[tokio::test]
async fn bad_arguments_give_error_replies() {
    let h = harness();
    let p = |v: Value| vec![v];
    let cases: Vec<(&str, Vec<Value>)> = vec![
        ("DeviceEcho", vec![]),
        ("DeviceEcho", p(json!("say"))),
        ("DeviceEcho", p(json!({}))),
        ("DeviceReboot", p(json!({"delay": -1}))),
        ("DeviceReboot", p(json!({"delay": "soon"}))),
        ("DeviceReboot", p(json!([1]))),
        ("DeviceRestartLR", p(json!({"delay": 1e9}))),
        ("DeviceRestartLR", p(json!({"cancel": "yes"}))),
        ("DevicePkgOperation", vec![]),
        ("DevicePkgOperation", p(json!({"manager": "sh", "command": "install", "package": "x"}))),
        ("DevicePkgOperation", p(json!({"manager": "echo", "command": "purge", "package": "x"}))),
        ("DevicePkgOperation", p(json!({"manager": "echo", "command": "install", "package": "x; rm -rf /"}))),
        ("DevicePkgOperation", p(json!({"manager": "echo", "command": "install", "package": "--force"}))),
        ("DevicePkgOperation", p(json!({"manager": "echo", "command": "install"}))),
        ("DevicePkgOperation", p(json!({"manager": "echo", "command": "install", "package": "x", "options": "-y"}))),
        ("DevicePkgOperation", p(json!({"manager": "echo", "command": "install", "package": "x", "version": "$(id)"}))),
        ("GpioRead", vec![]),
        ("GpioRead", p(json!({}))),
        ("GpioRead", p(json!({"line": 4}))),
        ("GpioRead", p(json!({"line": "GPIO99"}))),
        ("GpioRead", p(json!({"line": "x".repeat(1000)}))),
        ("GpioWrite", p(json!({"line": "GPIO1"}))),
        ("GpioWrite", p(json!({"line": "GPIO1", "value": 2}))),
        ("GpioWrite", p(json!({"line": "GPIO1", "value": "high"}))),
        ("GpioWrite", p(json!({"line": "GPIO1", "value": 1, "direction": "in"}))),
        ("GpioDirection", p(json!({"line": "GPIO1"}))),
        ("GpioDirection", p(json!({"line": "GPIO1", "direction": "sideways"}))),
        ("GpioDirection", p(json!({"line": "GPIO1", "direction": "in", "bias": "strong"}))),
        ("GpioWatch", p(json!({"line": "GPIO1"}))),
        ("GpioWatch", p(json!({"line": "GPIO1", "edge": "up"}))),
        ("GpioWatch", p(json!({"line": "NOPE", "edge": "both"}))),
        ("I2cRead", p(json!({"bus": 1, "address": 72}))),
        ("I2cRead", p(json!({"bus": 1, "address": 72, "length": 0}))),
        ("I2cRead", p(json!({"bus": 1, "address": 72, "length": 33}))),
        ("I2cRead", p(json!({"bus": 1, "address": 200, "length": 1}))),
        ("I2cRead", p(json!({"bus": 1, "address": "0xzz", "length": 1}))),
        ("I2cRead", p(json!({"bus": 1, "address": 72, "register": 256, "length": 1}))),
        ("I2cRead", p(json!({"bus": 7, "address": 72, "length": 1}))),
        ("I2cRead", p(json!({"bus": 1, "address": 0x50, "length": 1}))),
        ("I2cRead", p(json!({"address": 72, "length": 1}))),
        ("I2cWrite", p(json!({"bus": 1, "address": 72}))),
        ("I2cWrite", p(json!({"bus": 1, "address": 72, "data": []}))),
        ("I2cWrite", p(json!({"bus": 1, "address": 72, "data": [256]}))),
        ("I2cWrite", p(json!({"bus": 1, "address": 72, "data": "abc"}))),
        ("I2cWrite", p(json!({"bus": 1, "address": 72, "data": vec![0; 33]}))),
        ("ServiceEnable", vec![]),
        ("ServiceEnable", vec![json!({"uuid": "s"}), json!(50000)]),
        ("ServiceEnable", vec![json!({"uuid": "s", "port": 22})]),
        ("ServiceEnable", vec![json!({"uuid": "s", "port": 70000}), json!(50000)]),
        ("ServiceEnable", vec![json!({"uuid": "s", "port": 22}), json!("50000")]),
        ("ServiceEnable", vec![json!({"uuid": "s", "port": 22}), json!(65536)]),
        ("ServiceEnable", vec![json!({"uuid": "s", "port": 22, "tunnel_url": "http://x"}), json!(50000)]),
        ("ServiceRestore", vec![json!({"port": 22}), json!(50000)]),
        ("ServiceDisable", vec![json!("s")]),
        ("VpnJoin", vec![]),
        ("VpnJoin", p(json!({"type": "l2", "address": "192.0.2.1", "prefix_len": 24, "interface": "vpn0"}))),
        (
            "VpnJoin",
            p(json!({"vpn": "v", "type": "l4", "address": "192.0.2.1", "prefix_len": 24, "interface": "vpn0"})),
        ),
        ("VpnJoin", p(json!({"vpn": "v", "type": "l2", "address": "192.0.2", "prefix_len": 24, "interface": "vpn0"}))),
        (
            "VpnJoin",
            p(json!({"vpn": "v", "type": "l2", "address": "192.0.2.1", "prefix_len": 33, "interface": "vpn0"})),
        ),
        ("VpnJoin", p(json!({"vpn": "v", "type": "l2", "address": "192.0.2.1", "prefix_len": 24, "interface": "a/b"}))),
        (
            "VpnJoin",
            p(
                json!({"vpn": "v", "type": "l2", "address": "192.0.2.1", "prefix_len": 24, "interface": "much-too-long-name"}),
            ),
        ),
        (
            "VpnJoin",
            p(
                json!({"vpn": "v", "type": "l2", "address": "192.0.2.1", "prefix_len": 24, "interface": "vpn0", "tunnel_url": "ftp://x"}),
            ),
        ),
        // Well-formed, but this agent has no packet channel client: an ERROR, not a crash.
        (
            "VpnJoin",
            p(json!({"vpn": "v", "type": "l3", "address": "192.0.2.1", "prefix_len": 24, "interface": "vpn0"})),
        ),
        ("VpnLeave", p(json!({}))),
    ];
    for (name, args) in cases {
        let shown = format!("{name} {args:?}");
        let r = call(&h, name, args).await;
        assert_eq!(r.result, Outcome::Error, "{shown} gave {:?}", r.message);
        assert!(r.message.as_str().unwrap().starts_with(name), "{shown}: {}", r.message);
    }
    // A request that is not a dict.
    let r = dispatch(&h.ctx, Method::DevicePing, Call::from_positional(vec![json!("nope")])).await;
    assert_eq!(r.result, Outcome::Error);
    let r = dispatch(&h.ctx, Method::DevicePing, Call::from_positional(vec![])).await;
    assert_eq!(r.result, Outcome::Error);
    // Still serving.
    assert_eq!(ok_msg(&h, "DeviceEcho", vec![json!({"say": 1})]).await, 1);
}

#[test]
fn method_names_round_trip() {
    for m in Method::ALL {
        assert_eq!(Method::from_name(m.name()), Some(m));
    }
    assert_eq!(Method::from_name("DeviceUpgradeLR"), None);
}

/// A reply too long for the cloud's router (which would close the board's session) goes out
/// as an error reply saying so; one that fits goes out whole. The length counts the escaping
/// of the wire string inside the WAMP message (a `"` takes two bytes there).
#[test]
fn replies_too_long_for_the_router_become_errors() {
    let quotes = "\"".repeat(MAX_REPLY_LEN / 3);
    let big = Reply::success(Some("r".into()), &quotes);
    let wire = big.to_wire();
    assert!(serde_json::to_string(&big).unwrap().len() < MAX_REPLY_LEN, "short before escaping");
    let sent: Value = serde_json::from_str(&wire).unwrap();
    assert_eq!(sent["result"], "ERROR", "{}", &wire[..wire.len().min(200)]);
    assert!(sent["message"].as_str().unwrap().contains("more than the cloud takes"), "{sent}");
    assert_eq!(sent["req_id"], "r");
    let fits = Reply::success(None, "x".repeat(MAX_REPLY_LEN / 2));
    assert_eq!(fits.to_wire(), serde_json::to_string(&fits).unwrap());
    for s in ["", "plain", "q\"b\\n\n\r\t\u{8}\u{c}\u{1}\u{1f}é€😀"] {
        assert_eq!(s4t_shared::wamp::message::json_len(s), serde_json::to_string(s).unwrap().len(), "{s:?}");
    }
}
