//! The main loop against an in-memory fake cloud (a unit test of the logic; the real router
//! and a real process are in tests/agent_e2e.rs): first-boot enrollment, login, registration
//! under each new session id after the session drops, liveness, notifications kept across a
//! loss, and the permanent errors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::link::{ConnectOptions, Connector, Handler, Link};
use super::*;
use crate::rpc::services::{BoxFuture, NoTunnels};
use crate::rpc::vpn::NoPackets;

fn clients(cloud: &Arc<Cloud>) -> Clients {
    Clients { wamp: Arc::new(cloud.clone()), tunnels: Box::new(NoTunnels), packets: Box::new(NoPackets) }
}

#[derive(Default)]
struct Cloud {
    next: AtomicU64,
    registered: Mutex<HashMap<String, Handler>>,
    calls: Mutex<Vec<(String, Map<String, Value>)>>,
    auths: Mutex<Vec<Auth>>,
    current: Mutex<Option<CancellationToken>>,
    refuse_login: std::sync::atomic::AtomicBool,
    /// Behave like an original cloud: anonymous only, no credentials in the config.
    original: std::sync::atomic::AtomicBool,
    /// Behave like our cloud: the board's proposed `secret` becomes its secret.
    takes_proposals: std::sync::atomic::AtomicBool,
    /// This many `stack4things.register` calls are lost (the connection drops before the
    /// reply), after the cloud acted on them.
    lost_registers: std::sync::atomic::AtomicUsize,
    /// `notify_result` answers the error the cloud sends while its bus or database is down.
    notify_unavailable: std::sync::atomic::AtomicBool,
    /// The session ends right after `connection` (login) answers.
    drop_after_login: std::sync::atomic::AtomicBool,
    /// Connections fail (the cloud is unreachable).
    unreachable: std::sync::atomic::AtomicBool,
}

struct FakeLink {
    id: u64,
    cloud: Arc<Cloud>,
    closed: CancellationToken,
}

impl Cloud {
    fn calls_to(&self, suffix: &str) -> Vec<Map<String, Value>> {
        self.calls.lock().unwrap().iter().filter(|(u, _)| u.ends_with(suffix)).map(|(_, k)| k.clone()).collect()
    }
    fn drop_session(&self) {
        if let Some(t) = self.current.lock().unwrap().take() {
            t.cancel();
        }
    }
    async fn invoke(&self, uri: &str, args: Vec<Value>) -> Value {
        let h = self.registered.lock().unwrap().get(uri).cloned().unwrap_or_else(|| panic!("{uri} not registered"));
        let out = h(args, Map::new()).await.unwrap();
        serde_json::from_str(out[0].as_str().unwrap()).unwrap()
    }
}

impl Link for FakeLink {
    fn session_id(&self) -> u64 {
        self.id
    }
    fn call(&self, procedure: String, _args: Vec<Value>, kwargs: Map<String, Value>) -> BoxFuture<'_, Result<Value>> {
        Box::pin(async move {
            let proposed = kwargs.get("secret").and_then(Value::as_str).map(str::to_owned);
            self.cloud.calls.lock().unwrap().push((procedure.clone(), kwargs));
            if procedure == "stack4things.register"
                && self
                    .cloud
                    .lost_registers
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                self.closed.cancel();
                return Err(crate::Error::Wamp("the connection dropped".into()));
            }
            if procedure.ends_with(".stack4things.notify_result")
                && self.cloud.notify_unavailable.load(Ordering::SeqCst)
            {
                let e = format!("{procedure}: the peer answered with an error: iotronic.error.unavailable");
                return Err(crate::Error::Wamp(e));
            }
            if procedure.ends_with(".stack4things.connection") && self.cloud.drop_after_login.load(Ordering::SeqCst) {
                self.closed.cancel();
            }
            let reply = match procedure.as_str() {
                "stack4things.register" if self.cloud.original.load(Ordering::SeqCst) => {
                    json!({"result": "SUCCESS", "message": {"iotronic": {
                    "board": {"uuid": "u-1", "name": "pi", "agent": "agent"},
                    "wamp": {"main-agent": {"url": "ws://cloud:8181/", "realm": "s4t"}}}}})
                }
                "stack4things.register" => {
                    let secret = proposed
                        .filter(|_| self.cloud.takes_proposals.load(Ordering::SeqCst))
                        .unwrap_or_else(|| "board-secret".into());
                    json!({"result": "SUCCESS", "message": {"iotronic": {
                    "board": {"uuid": "u-1", "name": "pi", "agent": "agent"},
                    "wamp": {"main-agent": {"url": "ws://cloud:8181/", "realm": "s4t"}},
                    "credentials": {"authid": "u-1", "secret": secret}}}})
                }
                "agent.stack4things.connection" if self.cloud.refuse_login.load(Ordering::SeqCst) => {
                    json!({"result": "ERROR", "message": "unknown board"})
                }
                _ => json!({"result": "SUCCESS", "message": ""}),
            };
            Ok(Value::String(reply.to_string()))
        })
    }
    fn register(&self, procedure: String, handler: Handler) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.cloud.registered.lock().unwrap().insert(procedure, handler);
            Ok(())
        })
    }
    fn publish(&self, _t: String, _a: Vec<Value>, _k: Map<String, Value>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn closed(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.closed.cancelled())
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { self.closed.cancel() })
    }
}

impl Connector for Arc<Cloud> {
    fn connect(&self, options: ConnectOptions) -> BoxFuture<'_, Result<Box<dyn Link>>> {
        Box::pin(async move {
            if self.unreachable.load(Ordering::SeqCst) {
                return Err(crate::Error::Wamp("connection refused".into()));
            }
            if self.original.load(Ordering::SeqCst) && !matches!(options.auth, Auth::Anonymous) {
                return Err(crate::Error::AuthMethod("wamp.error.no_auth_method".into()));
            }
            self.auths.lock().unwrap().push(options.auth);
            let closed = CancellationToken::new();
            *self.current.lock().unwrap() = Some(closed.clone());
            let id = 1000 + self.next.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(FakeLink { id, cloud: self.clone(), closed }) as Box<dyn Link>)
        })
    }
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.board.state_dir = dir.to_owned();
    c.hal.backend = crate::config::HalKind::Sim;
    c.cloud.url = Some("ws://cloud:8181/".into());
    c.cloud.code = Some(crate::Secret::new("CODE-1"));
    c.timers.alive_interval_s = 5;
    c
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(start_paused = true)]
async fn enrolls_logs_in_and_re_registers_after_every_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(config(dir.path()), shutdown.clone(), clients(&cloud)));
    wait_for("first registration", || cloud.registered.lock().unwrap().len() == crate::rpc::Method::ALL.len()).await;
    // Enrolled with the code as ticket, then logged in with WAMP-CRA and the issued secret.
    let auths = cloud.auths.lock().unwrap().clone();
    assert!(matches!(&auths[0], Auth::Ticket { authid, ticket } if authid == "enroll" && ticket.expose() == "CODE-1"));
    assert!(
        matches!(&auths[1], Auth::WampCra { authid, secret } if authid == "u-1" && secret.expose() == "board-secret")
    );
    assert_eq!(cloud.calls_to("register")[0]["code"], "CODE-1");
    let login = &cloud.calls_to(".stack4things.connection")[0];
    assert_eq!((login["uuid"].as_str(), login["session"].as_u64()), (Some("u-1"), Some(1001)));
    let echo = cloud.invoke("iotronic.1001.u-1.DeviceEcho", vec![json!({"uuid": "r"}), json!({"say": "x"})]).await;
    assert_eq!(echo, json!({"message": "x", "result": "SUCCESS", "req_id": "r"}));
    // Liveness.
    wait_for("wamp_alive", || !cloud.calls_to(".stack4things.wamp_alive").is_empty()).await;
    assert_eq!(cloud.calls_to(".stack4things.wamp_alive")[0]["board_name"], "pi");
    // The router restarts: a new session, every procedure registered again under its id.
    cloud.registered.lock().unwrap().clear();
    cloud.drop_session();
    wait_for("re-registration", || cloud.registered.lock().unwrap().len() == crate::rpc::Method::ALL.len()).await;
    assert!(cloud.registered.lock().unwrap().keys().all(|k| k.starts_with("iotronic.1002.u-1.")));
    assert_eq!(cloud.calls_to(".stack4things.connection").len(), 2);
    shutdown.cancel();
    assert_eq!(task.await.unwrap().unwrap(), Exit::Shutdown);
    // A second start uses the stored identity: no enrollment.
    assert!(StateStore::open(dir.path()).unwrap().identity().unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn refused_login_is_permanent_and_missing_identity_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    cloud.refuse_login.store(true, Ordering::SeqCst);
    let err = run(config(dir.path()), CancellationToken::new(), clients(&cloud)).await.unwrap_err();
    assert_eq!(err.exit_code(), Some(crate::EXIT_REVOKED), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let mut c = config(empty.path());
    c.cloud.code = None;
    c.cloud.legacy_settings = empty.path().join("none.json");
    let err = run(c, CancellationToken::new(), clients(&cloud)).await.unwrap_err();
    assert_eq!(err.exit_code(), Some(crate::EXIT_CONFIG), "{err}");
}

/// A disk that cannot take the identity fails enrollment before the cloud sees the code
/// (which it uses up when it answers), so the attempt can be repeated once there is room.
#[tokio::test]
async fn enrollment_spends_no_code_when_the_identity_cannot_be_saved() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    let store = StateStore::open(dir.path()).unwrap();
    // Nothing can be put in place of a directory: the disk "refuses" the write.
    let blocker = dir.path().join("write-probe");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("x"), b"x").unwrap();
    let (c, code) = (config(dir.path()), crate::Secret::new("CODE-1"));
    let err = enroll::enroll(&cloud, &c, "ws://cloud:8181/", &code, &store).await.unwrap_err();
    assert!(matches!(err, crate::Error::Write { .. }), "{err}");
    assert!(cloud.calls_to("register").is_empty(), "the code was sent");
    std::fs::remove_dir_all(&blocker).unwrap();
    let id = enroll::enroll(&cloud, &c, "ws://cloud:8181/", &code, &store).await.unwrap();
    assert_eq!(store.identity().unwrap(), Some(id));
    assert_eq!(cloud.calls_to("register").len(), 1);
}

/// The reply to the first `stack4things.register` is lost: the retry proposes the same
/// secret (kept in the state directory, 0600, meanwhile), which the cloud then returns, and
/// the pending file is gone once the identity is saved.
#[tokio::test(start_paused = true)]
async fn a_lost_enrollment_reply_is_retried_with_the_same_secret() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    cloud.takes_proposals.store(true, Ordering::SeqCst);
    cloud.lost_registers.store(1, Ordering::SeqCst);
    let pending = dir.path().join(crate::state::ENROLL_SECRET_FILE);
    let store = StateStore::open(dir.path()).unwrap();
    let (c, code) = (config(dir.path()), crate::Secret::new("CODE-1"));
    let err = enroll::enroll(&cloud, &c, "ws://cloud:8181/", &code, &store).await.unwrap_err();
    assert!(matches!(err, crate::Error::Wamp(_)) && err.exit_code().is_none(), "a retryable error: {err}");
    let mode = std::fs::metadata(&pending).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the pending secret is private");
    assert!(store.identity().unwrap().is_none());
    // The agent's first-boot loop retries.
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(c, shutdown.clone(), clients(&cloud)));
    wait_for("registration", || cloud.registered.lock().unwrap().len() == crate::rpc::Method::ALL.len()).await;
    let registers = cloud.calls_to("stack4things.register");
    assert_eq!(registers.len(), 2);
    let proposed = registers[0]["secret"].as_str().unwrap().to_owned();
    assert!(proposed.len() >= crate::state::MIN_ENROLL_SECRET, "{} characters", proposed.len());
    assert_eq!(registers[1]["secret"], proposed.as_str(), "the retry proposes the same secret");
    let id = store.identity().unwrap().unwrap();
    assert_eq!(id.credentials.unwrap().secret.expose(), proposed);
    let auths = cloud.auths.lock().unwrap().clone();
    assert!(matches!(&auths[2], Auth::WampCra { secret, .. } if secret.expose() == proposed));
    assert!(!pending.exists(), "the pending secret is removed once the identity is saved");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// Power failed between saving the identity and removing the pending secret: a later
/// re-enrollment (`enroll --force --code NEW` after `s4t board rotate-secret`) proposes a new
/// secret, not the board's current (maybe leaked) one left in the pending file.
#[tokio::test]
async fn re_enrollment_never_proposes_the_current_secret_again() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    cloud.takes_proposals.store(true, Ordering::SeqCst);
    let store = StateStore::open(dir.path()).unwrap();
    let c = config(dir.path());
    let id = enroll::enroll(&cloud, &c, "ws://cloud:8181/", &crate::Secret::new("CODE-1"), &store).await.unwrap();
    let current = id.credentials.unwrap().secret;
    let pending = dir.path().join(crate::state::ENROLL_SECRET_FILE);
    std::fs::write(&pending, json!({"secret": current.expose()}).to_string()).unwrap();
    let id = enroll::enroll(&cloud, &c, "ws://cloud:8181/", &crate::Secret::new("CODE-2"), &store).await.unwrap();
    let proposed = cloud.calls_to("stack4things.register")[1]["secret"].as_str().unwrap().to_owned();
    assert_ne!(proposed, current.expose(), "the current secret was proposed again");
    assert_eq!(id.credentials.unwrap().secret.expose(), proposed);
}

/// A cloud that ignores the proposal issues its own secret: the board keeps that one. An
/// original cloud (anonymous) is not sent the proposal, which its `register` would refuse.
#[tokio::test]
async fn the_secret_the_cloud_returns_counts_and_an_original_cloud_gets_no_proposal() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    let store = StateStore::open(dir.path()).unwrap();
    let (c, code) = (config(dir.path()), crate::Secret::new("CODE-1"));
    let id = enroll::enroll(&cloud, &c, "ws://cloud:8181/", &code, &store).await.unwrap();
    assert!(cloud.calls_to("stack4things.register")[0]["secret"].is_string());
    assert_eq!(id.credentials.unwrap().secret.expose(), "board-secret");
    assert!(!dir.path().join(crate::state::ENROLL_SECRET_FILE).exists());
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    cloud.original.store(true, Ordering::SeqCst);
    let store = StateStore::open(dir.path()).unwrap();
    enroll::enroll(&cloud, &c, "ws://cloud:8181/", &code, &store).await.unwrap();
    let kwargs = &cloud.calls_to("stack4things.register")[0];
    assert_eq!(kwargs.keys().collect::<Vec<_>>(), ["code", "session"]);
    assert!(!dir.path().join(crate::state::ENROLL_SECRET_FILE).exists());
}

/// Starts the agent (an `echo` package manager configured) and, once it has registered,
/// runs a `DevicePkgOperation` (request `r-9`), which answers RUNNING and reports its result
/// through `notify_result`.
async fn start_with_a_package_operation(
    cloud: &Arc<Cloud>,
    dir: &std::path::Path,
) -> (CancellationToken, tokio::task::JoinHandle<crate::Result<Exit>>) {
    let shutdown = CancellationToken::new();
    let mut c = config(dir);
    c.device.min_delay_s = 0;
    c.device.package_managers.insert(
        "echo".into(),
        crate::config::PackageManager {
            argv: vec!["echo".into()],
            commands: vec!["install".into()],
            version_format: "{package}={version}".into(),
            writes: vec![],
        },
    );
    let task = tokio::spawn(run(c, shutdown.clone(), clients(cloud)));
    wait_for("registration", || cloud.registered.lock().unwrap().len() == crate::rpc::Method::ALL.len()).await;
    let args = vec![json!({"uuid": "r-9"}), json!({"manager": "echo", "command": "install", "package": "vim"})];
    assert_eq!(cloud.invoke("iotronic.1001.u-1.DevicePkgOperation", args).await["result"], "RUNNING");
    (shutdown, task)
}

#[tokio::test(start_paused = true)]
async fn running_results_reach_notify_result() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    let (shutdown, task) = start_with_a_package_operation(&cloud, dir.path()).await;
    wait_for("notify_result", || !cloud.calls_to(".stack4things.notify_result").is_empty()).await;
    let n = &cloud.calls_to(".stack4things.notify_result")[0];
    assert_eq!(n["board_uuid"], "u-1");
    let msg: Value = serde_json::from_str(n["wampmessage"].as_str().unwrap()).unwrap();
    assert_eq!((msg["result"].as_str(), msg["req_id"].as_str()), (Some("SUCCESS"), Some("r-9")));
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// A result the cloud does not take (`iotronic.error.unavailable` while its bus or database
/// is down) is retried within the session and delivered once the cloud takes it. The session
/// used to end at every failed delivery, and the board logged in again every 250-500 ms.
#[tokio::test(start_paused = true)]
async fn a_result_the_cloud_does_not_take_is_retried_without_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    cloud.notify_unavailable.store(true, Ordering::SeqCst);
    let (shutdown, task) = start_with_a_package_operation(&cloud, dir.path()).await;
    wait_for("retried notify_result", || cloud.calls_to(".stack4things.notify_result").len() >= 3).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let logins = cloud.calls_to(".stack4things.connection").len();
    assert_eq!(logins, 1, "the board logged in again {} times", logins - 1);
    let tries = cloud.calls_to(".stack4things.notify_result").len();
    assert!(tries < 20, "{tries} deliveries in two minutes: no backoff");
    cloud.notify_unavailable.store(false, Ordering::SeqCst);
    wait_for("delivery", || cloud.calls_to(".stack4things.notify_result").len() > tries).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    let calls = cloud.calls_to(".stack4things.notify_result");
    assert_eq!(calls.len(), tries + 1, "delivered once, then no more tries");
    let msg: Value = serde_json::from_str(calls[tries]["wampmessage"].as_str().unwrap()).unwrap();
    assert_eq!((msg["result"].as_str(), msg["req_id"].as_str()), (Some("SUCCESS"), Some("r-9")));
    assert_eq!(cloud.calls_to(".stack4things.connection").len(), 1);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// A session the cloud ends right after login does not count as healthy: the reconnect
/// backoff grows instead of starting over at every login (a login every 250-500 ms).
#[tokio::test(start_paused = true)]
async fn sessions_that_end_at_once_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    cloud.drop_after_login.store(true, Ordering::SeqCst);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(config(dir.path()), shutdown.clone(), clients(&cloud)));
    wait_for("first login", || !cloud.calls_to(".stack4things.connection").is_empty()).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    // 0.5, 1, 2 ... 60 s (halved at worst by the jitter): about a dozen in two minutes.
    let logins = cloud.calls_to(".stack4things.connection").len();
    assert!(logins <= 15, "{logins} logins in two minutes");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// A restart whose delay ends while the cloud is unreachable happens then, not at the next
/// login: it holds the package lock until the agent stops, and operations queued for the
/// next login would wait for it (or start and be killed by it).
#[tokio::test(start_paused = true)]
async fn a_restart_happens_while_the_cloud_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(config(dir.path()), shutdown.clone(), clients(&cloud)));
    wait_for("registration", || cloud.registered.lock().unwrap().len() == crate::rpc::Method::ALL.len()).await;
    let args = vec![json!({"uuid": "r"}), json!({"delay": 30})];
    assert_eq!(cloud.invoke("iotronic.1001.u-1.DeviceRestartLR", args).await["result"], "SUCCESS");
    cloud.unreachable.store(true, Ordering::SeqCst);
    cloud.drop_session();
    let end = tokio::time::timeout(Duration::from_secs(3600), task).await;
    assert_eq!(end.expect("no restart while offline").unwrap().unwrap(), Exit::Restart);
}

/// Results waiting are delivered before a restart (the result of the agent's own upgrade is
/// queued just before the restart it asks for); they were lost with the process.
#[tokio::test(start_paused = true)]
async fn a_restart_delivers_the_results_waiting_first() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    cloud.notify_unavailable.store(true, Ordering::SeqCst);
    let (_shutdown, task) = start_with_a_package_operation(&cloud, dir.path()).await;
    wait_for("a first try of notify_result", || !cloud.calls_to(".stack4things.notify_result").is_empty()).await;
    let tries = cloud.calls_to(".stack4things.notify_result").len();
    cloud.notify_unavailable.store(false, Ordering::SeqCst);
    // Within the result's retry delay (1 s at first): the restart comes first.
    let args = vec![json!({"uuid": "r"}), json!({"delay": 0})];
    assert_eq!(cloud.invoke("iotronic.1001.u-1.DeviceRestartLR", args).await["result"], "SUCCESS");
    assert_eq!(task.await.unwrap().unwrap(), Exit::Restart);
    let calls = cloud.calls_to(".stack4things.notify_result");
    assert_eq!(calls.len(), tries + 1, "the result waiting was not delivered before the restart");
    let msg: Value = serde_json::from_str(calls[tries]["wampmessage"].as_str().unwrap()).unwrap();
    assert_eq!((msg["result"].as_str(), msg["req_id"].as_str()), (Some("SUCCESS"), Some("r-9")));
}

#[tokio::test(start_paused = true)]
async fn an_original_cloud_gets_an_anonymous_enrollment_and_login() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(Cloud::default());
    cloud.original.store(true, Ordering::SeqCst);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(config(dir.path()), shutdown.clone(), clients(&cloud)));
    wait_for("registration", || cloud.registered.lock().unwrap().len() == crate::rpc::Method::ALL.len()).await;
    let auths = cloud.auths.lock().unwrap().clone();
    assert_eq!(auths, [Auth::Anonymous, Auth::Anonymous]);
    let id = StateStore::open(dir.path()).unwrap().identity().unwrap().unwrap();
    assert!(id.credentials.is_none());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// Opens nothing, ever: a tunnel server that does not answer (the agent's opener gives up
/// after 20 s; this one never does).
struct Unanswered;

impl crate::rpc::services::TunnelOpener for Unanswered {
    fn open(
        &self,
        _spec: crate::rpc::services::TunnelSpec,
    ) -> BoxFuture<'_, crate::Result<Box<dyn crate::rpc::services::Tunnel>>> {
        Box::pin(std::future::pending())
    }
}

/// Fails its first `fails` opens (a tunnel server that is unreachable for a while), then
/// opens tunnels that stay up.
struct Flaky {
    fails: std::sync::atomic::AtomicUsize,
    opens: Arc<std::sync::atomic::AtomicUsize>,
}

struct Up;

impl crate::rpc::services::Tunnel for Up {
    fn is_alive(&self) -> bool {
        true
    }
    fn public_port(&self) -> u16 {
        50022
    }
}

impl crate::rpc::services::TunnelOpener for Flaky {
    fn open(
        &self,
        _spec: crate::rpc::services::TunnelSpec,
    ) -> BoxFuture<'_, crate::Result<Box<dyn crate::rpc::services::Tunnel>>> {
        Box::pin(async move {
            self.opens.fetch_add(1, Ordering::SeqCst);
            if self.fails.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(crate::Error::Tunnel("the tunnel server is unreachable".into()));
            }
            Ok(Box::new(Up) as Box<dyn crate::rpc::services::Tunnel>)
        })
    }
}

/// A restore that fails (the tunnel server unreachable at boot and at login) is tried again
/// while the session lasts, with a backoff, until the service is up. It used to wait for the
/// next login, which may be weeks away.
#[tokio::test(start_paused = true)]
async fn a_failed_restore_is_retried_while_the_session_lasts() {
    let opens = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let opener = Flaky { fails: 3.into(), opens: opens.clone() };
    let (_dir, cloud, shutdown, task) = start_with_one_service(Box::new(opener));
    wait_for("registration", || cloud.registered.lock().unwrap().len() == crate::rpc::Method::ALL.len()).await;
    let status = || async {
        let r = cloud.invoke("iotronic.1001.u-1.ServicesStatus", vec![json!({"uuid": "r"})]).await;
        r["message"]["services"][0]["active"].as_bool()
    };
    // Rounds at boot and at login, then after at most 5, 10, 20 s.
    for _ in 0..120 {
        if status().await == Some(true) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(status().await, Some(true), "not restored after {} opens", opens.load(Ordering::SeqCst));
    assert_eq!(cloud.calls_to(".stack4things.connection").len(), 1, "restored by a new login");
    // Once up, no more rounds.
    let opened = opens.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(opens.load(Ordering::SeqCst), opened);
    shutdown.cancel();
    assert_eq!(task.await.unwrap().unwrap(), Exit::Shutdown);
}

/// An agent started with one saved service whose tunnel server never answers: its restore
/// waits for ever, holding the services.
fn start_with_a_restore_that_waits()
-> (tempfile::TempDir, Arc<Cloud>, CancellationToken, tokio::task::JoinHandle<Result<Exit>>) {
    start_with_one_service(Box::new(Unanswered))
}

/// An agent started with one saved service, its tunnels opened by `opener`.
fn start_with_one_service(
    opener: Box<dyn crate::rpc::services::TunnelOpener>,
) -> (tempfile::TempDir, Arc<Cloud>, CancellationToken, tokio::task::JoinHandle<Result<Exit>>) {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let svc = crate::state::ExposedService {
        name: "ssh".into(),
        local_port: 22,
        public_port: 50022,
        tunnel_url: None,
        token: None,
    };
    let saved: crate::state::Services = [("s-1".to_owned(), svc)].into_iter().collect();
    store.save(crate::state::SERVICES_FILE, &saved).unwrap();
    let cloud = Arc::new(Cloud::default());
    let shutdown = CancellationToken::new();
    let clients = Clients { tunnels: opener, ..clients(&cloud) };
    let task = tokio::spawn(run(config(dir.path()), shutdown.clone(), clients));
    (dir, cloud, shutdown, task)
}

/// The daily token renewal runs beside the session: while a restore holds the services
/// (their tunnel server never answers), the renewal waits for them and the board still
/// answers. It used to wait inside the session's loop: no alive, result or event for as long.
#[tokio::test(start_paused = true)]
async fn the_daily_token_renewal_does_not_hold_up_the_session() {
    let (_dir, cloud, shutdown, task) = start_with_a_restore_that_waits();
    wait_for("wamp_alive", || !cloud.calls_to(".stack4things.wamp_alive").is_empty()).await;
    let renewals = cloud.calls_to(".stack4things.tunnel_tokens").len();
    // Virtual time: the day passes at once.
    tokio::time::sleep(super::session::RENEW_TOKENS_EVERY).await;
    wait_for("the daily renewal", || cloud.calls_to(".stack4things.tunnel_tokens").len() > renewals).await;
    let alives = cloud.calls_to(".stack4things.wamp_alive").len();
    wait_for("wamp_alive while the renewal waits", || cloud.calls_to(".stack4things.wamp_alive").len() > alives).await;
    shutdown.cancel();
    assert_eq!(task.await.unwrap().unwrap(), Exit::Shutdown);
}

/// A restore that waits on the tunnel server does not hold up the session: the board logs in
/// and answers (liveness, calls) while its saved services wait for their tunnels.
#[tokio::test(start_paused = true)]
async fn a_restore_waiting_for_tunnels_does_not_hold_up_the_session() {
    let (_dir, cloud, shutdown, task) = start_with_a_restore_that_waits();
    wait_for("wamp_alive", || !cloud.calls_to(".stack4things.wamp_alive").is_empty()).await;
    // A reconnect asks for another restore while the first still waits: the session again.
    cloud.drop_session();
    wait_for("second login", || cloud.calls_to(".stack4things.connection").len() == 2).await;
    let alives = cloud.calls_to(".stack4things.wamp_alive").len();
    wait_for("wamp_alive after the reconnect", || cloud.calls_to(".stack4things.wamp_alive").len() > alives).await;
    shutdown.cancel();
    assert_eq!(task.await.unwrap().unwrap(), Exit::Shutdown);
}
