//! The cloud as separate processes (`iotronic api`, `conductor`, `wamp-agent`) over the real
//! RabbitMQ and PostgreSQL, with a real lightning-rod (sim HAL) as the board. The conductor
//! and then the agent are killed (SIGKILL) while requests stream through them: after their
//! restart every accepted request has completed or is marked failed; none is lost. Also: a
//! cloud started by hand (SQLite, under umask 022) keeps its files to itself.

mod common;

use common::rest::Api;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;
use reqwest::StatusCode;
use serde_json::{Value, json};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn bin_dir() -> PathBuf {
    match std::env::var_os("S4T_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf(),
    }
}

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap();
        Proc { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The rest of the first log line containing `needle`, waiting for it.
    async fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.output().lines().find_map(|l| l.split_once(needle).map(|(_, r)| r.to_owned())) {
                return l;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status} before {needle:?}:\n{}", self.log.display(), self.output());
            }
            assert!(Instant::now() < deadline, "no {needle:?} in {}:\n{}", self.log.display(), self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL: no clean-up, no acks
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cloud {
    dir: PathBuf,
    db_url: String,
    prefix: String,
}

impl Cloud {
    /// A cloud on `pg` with its files under `dir` and queues of its own on the broker.
    fn new(pg: &TestDb, dir: &Path) -> Cloud {
        Cloud {
            dir: dir.to_path_buf(),
            db_url: pg.url.expose().to_owned(),
            prefix: format!("t{}", uuid::Uuid::new_v4().simple()),
        }
    }

    fn iotronic(&self, process: &str, extra: &[&str]) -> Proc {
        let mut c = Command::new(env!("CARGO_BIN_EXE_iotronic"));
        c.arg(process)
            .args(["--plaintext", "--bind", "127.0.0.1", "--database-url", &self.db_url, "--bus-prefix", &self.prefix])
            .args(["--amqp-url", &std::env::var("IOTRONIC_TEST_AMQP").unwrap_or_else(|_| AMQP.into())])
            .arg("--data-dir")
            .arg(self.dir.join(process))
            .args(extra)
            .env("IOTRONIC_ADMIN_PASSWORD", "admin-password")
            .env("RUST_LOG", "info");
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        Proc::spawn(c, self.dir.join(format!("{process}-{n}.log")))
    }
}

impl Api {
    /// Waits for `board` to be online; on timeout the failure shows the tail of every log in
    /// `logs` (board, agent), so a flaky run says why.
    async fn wait_online(&self, board: &str, logs: &[&Path]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.req("GET", &format!("/v1/boards/{board}"), None).await.1["status"] != "online" {
            if Instant::now() >= deadline {
                let tails: Vec<String> = logs
                    .iter()
                    .map(|p| {
                        let text = std::fs::read_to_string(p).unwrap_or_default();
                        let lines: Vec<&str> = text.lines().collect();
                        format!("--- {} ---\n{}", p.display(), lines[lines.len().saturating_sub(40)..].join("\n"))
                    })
                    .collect();
                panic!("board {board} did not come online within 60 s\n{}", tails.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn fire(&self, n: usize) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let (s, v) =
                self.req("POST", "/v1/boards/lr/action?async=true", Some(json!({"action": "DevicePing"}))).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{v}");
            ids.push(v["uuid"].as_str().unwrap().to_owned());
        }
        ids
    }

    /// Waits until every request is final; returns (completed with SUCCESS, failed).
    async fn settle(&self, ids: &[String]) -> (usize, usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (mut ok, mut failed, mut open) = (0, 0, Vec::new());
            for id in ids {
                let (_, r) = self.req("GET", &format!("/v1/requests/{id}"), None).await;
                match r["status"].as_str() {
                    Some("COMPLETED") => ok += 1,
                    Some("FAILED") => failed += 1,
                    _ => open.push(r),
                }
            }
            if open.is_empty() {
                return (ok, failed);
            }
            assert!(Instant::now() < deadline, "requests lost or stuck: {open:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_conductor_and_agent_lose_no_accepted_request() {
    let (pg, tmp) = (TestDb::postgres().await, tempfile::tempdir().unwrap());
    let cloud = Cloud::new(&pg, tmp.path());
    let mut api_proc = cloud.iotronic("api", &["--rest-port", "0"]);
    let mut conductor = cloud.iotronic("conductor", &[]);
    let mut agent = cloud.iotronic("wamp-agent", &["--wamp-port", "0"]);
    let rest = api_proc.wait_line("REST API on http://").await;
    let wamp = agent.wait_line("WAMP router on ").await;
    let wamp_url = wamp.split_whitespace().next().unwrap().to_owned();
    let wamp_port = wamp_url.trim_end_matches('/').rsplit(':').next().unwrap().to_owned();
    conductor.wait_line("conductor running").await;

    let http = reqwest::Client::new();
    let url = format!("http://{}", rest.trim_end_matches("/v1"));
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
    let body = json!({"name": "lr", "code": "CODE-LR", "location": [{"latitude": 1, "longitude": 2, "altitude": 3}]});
    assert_eq!(api.req("POST", "/v1/boards", Some(body)).await.0, StatusCode::CREATED);

    let board_dir = tmp.path().join("board");
    std::fs::create_dir_all(&board_dir).unwrap();
    let cfg = board_config(&board_dir);
    let lr = bin_dir().join("lightning-rod");
    assert!(lr.is_file(), "{} not found: run `cargo build --workspace --bins` first", lr.display());
    let out = Command::new(&lr)
        .args(["enroll", "--url", &wamp_url, "--code", "CODE-LR", "--config"])
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
    let mut run = Command::new(&lr);
    run.args(["run", "--config"]).arg(&cfg).env_remove("NOTIFY_SOCKET").env("RUST_LOG", "info");
    let board_log = board_dir.join("lr.log");
    let _board = Proc::spawn(run, board_log.clone());
    api.wait_online("lr", &[&board_log]).await;

    // Synchronous call through RabbitMQ: API → conductor → agent → board → back.
    let (s, v) = api.req("POST", "/v1/boards/lr/action", Some(json!({"action": "DevicePing"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Kill the conductor in the middle of a stream of requests; restart it.
    let mut ids = api.fire(10).await;
    conductor.kill();
    ids.extend(api.fire(20).await);
    let _conductor = cloud.iotronic("conductor", &[]);
    let (ok, failed) = api.settle(&ids).await;
    assert_eq!((ok, failed), (30, 0), "the board stayed online: every request must complete");

    // Kill the agent (and with it the router the board is on) mid-stream; restart it on the
    // same port. Every request completes or is marked failed; the board comes back.
    let mut ids = api.fire(10).await;
    agent.kill();
    ids.extend(api.fire(10).await);
    let mut agent = cloud.iotronic("wamp-agent", &["--wamp-port", &wamp_port]);
    agent.wait_line("WAMP router on ").await;
    let (ok, failed) = api.settle(&ids).await;
    assert_eq!(ok + failed, 20);
    api.wait_online("lr", &[&board_log, &agent.log]).await;
    let (s, v) = api.req("POST", "/v1/boards/lr/action", Some(json!({"action": "DevicePing"}))).await;
    assert_eq!(s, StatusCode::OK, "after the restarts: {v}");
    delete_queues(&cloud.prefix).await;
}

/// `iotronic serve` runs every part in one process. When one of them stops while the others
/// run (here the conductor, whose RabbitMQ queue is deleted under it), the process exits with
/// an error naming it, so that its supervisor restarts it, instead of accepting requests that
/// nothing will carry out.
#[tokio::test]
async fn serve_exits_when_one_of_its_parts_stops() {
    let (pg, tmp) = (TestDb::postgres().await, tempfile::tempdir().unwrap());
    let cloud = Cloud::new(&pg, tmp.path());
    let mut serve = cloud.iotronic("serve", &["--rest-port", "0", "--wamp-port", "0", "--tunnel-port", "0"]);
    serve.wait_line("REST API on http://").await;
    serve.wait_line("wamp-agent ready").await;
    assert!(serve.child.try_wait().unwrap().is_none(), "serve runs:\n{}", serve.output());

    use lapin::options::QueueDeleteOptions;
    let url = std::env::var("IOTRONIC_TEST_AMQP").unwrap_or_else(|_| AMQP.into());
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = format!("{}.conductor", cloud.prefix);
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = serve.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve ran on without its conductor:\n{}", serve.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "a cloud missing a part must exit with an error:\n{}", serve.output());
    let out = serve.output();
    assert!(out.contains("the conductor stopped while the cloud was running"), "{out}");
    assert!(out.contains("the conductor queue closed"), "the cause is shown:\n{out}");
    delete_queues(&cloud.prefix).await;
}

/// `iotronic` as started by hand, outside the systemd units (UMask=0077), on SQLite and the
/// in-process bus, with the usual umask 022 inherited from the shell.
fn by_hand(args: &[&str], data: &Path) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut c = Command::new(env!("CARGO_BIN_EXE_iotronic"));
    c.args(args)
        .arg("--data-dir")
        .arg(data)
        .env_remove("IOTRONIC_DATABASE_URL")
        .env_remove("IOTRONIC_AMQP_URL")
        .env("IOTRONIC_ADMIN_PASSWORD", "admin-password")
        .env("RUST_LOG", "info");
    // SAFETY: umask is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    c
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// A cloud started by hand under umask 022 keeps its data directory, its SQLite database
/// (with the -wal and -shm files) and every other file it makes but the public certificates
/// to its own user: they hold the CA's key, the tunnel HMAC key, the boards' derived keys and
/// the password hashes.
#[tokio::test]
async fn serve_keeps_its_data_private_under_umask_022() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = ["serve", "--bind", "127.0.0.1", "--rest-port", "0", "--wamp-port", "0", "--tunnel-port", "0"];
    let mut serve = Proc::spawn(by_hand(&args, &data), tmp.path().join("serve.log"));
    serve.wait_line("wamp-agent ready").await;
    assert_eq!(mode(&data) & 0o077, 0, "data directory mode {:o}", mode(&data));
    for file in ["iotronic.sqlite", "iotronic.sqlite-wal", "iotronic.sqlite-shm"] {
        let m = mode(&data.join(file));
        assert_eq!(m & 0o077, 0, "{file} mode {m:o}");
    }
    let public = ["ca.crt", "server.crt", "server.names", "ca.fingerprint"];
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !public.contains(&name.as_str()) {
            let m = mode(&entry.path());
            assert_eq!(m & 0o077, 0, "{name} mode {m:o}");
        }
    }
}

/// A data directory or database that is already open to other users (made by an older cloud,
/// or by hand) is kept as it is, with a warning that says how to close it.
#[test]
fn an_open_data_directory_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let migrate = || {
        let out = by_hand(&["db", "migrate"], &data).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let quiet = migrate();
    assert!(!quiet.contains("open to other users"), "a fresh data directory is private:\n{quiet}");
    let db = data.join("iotronic.sqlite");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = migrate();
    let warned = |path: &Path, chmod: &str| {
        out.lines()
            .any(|l| l.contains("open to other users") && l.contains(chmod) && l.contains(&*path.to_string_lossy()))
    };
    assert!(warned(&data, "chmod 700"), "no warning for the data directory:\n{out}");
    assert!(warned(&db, "chmod 600"), "no warning for the database:\n{out}");
}

/// The test's durable queues and exchange would outlive it on the shared broker.
async fn delete_queues(prefix: &str) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let url = std::env::var("IOTRONIC_TEST_AMQP").unwrap_or_else(|_| AMQP.into());
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [format!("{prefix}.conductor"), format!("{prefix}.agent.agent")] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    }
    let ex = format!("{prefix}.completions");
    ch.exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default()).await.unwrap();
}
