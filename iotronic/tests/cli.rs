//! The `s4t` binary against the whole cloud (`iotronic::serve` on 127.0.0.1, ports chosen by
//! the system) and a real `lightning-rod` (sim HAL): every command family, its `--json` and
//! `--quiet` forms, and the error paths with their exit codes (offline board, another
//! project's lease, no permission, not logged in, bad arguments, unreachable cloud).
//! The lightning-rod binary must be built (`cargo build --workspace --bins`, as .ci/test does).
//! SSH to a real sshd behind NAT is tested in `tests/tests/cli.rs` (root, network namespaces).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use iotronic::ServeConfig;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const ADMIN_PASSWORD: &str = "admin-password";

/// One run of `s4t`.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "s4t failed: {self:#?}");
        self
    }

    fn code(self, code: i32) -> Self {
        assert_eq!(self.code, code, "wrong exit code: {self:#?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }
}

/// A user of the CLI: their own configuration file.
struct User {
    config: PathBuf,
}

impl User {
    fn new(dir: &Path, name: &str) -> User {
        User { config: dir.join(name).join("config.toml") }
    }

    async fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_s4t"));
        cmd.args(args)
            .env("S4T_CONFIG", &self.config)
            .env_remove("S4T_URL")
            .env_remove("S4T_TOKEN")
            .env_remove("S4T_PASSWORD")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output()).await.expect("s4t hung").unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[]).await
    }

    async fn login(&self, url: &str, user: &str, password: &str) {
        self.run_env(&["login", "--url", url, "--user", user], &[("S4T_PASSWORD", password)]).await.ok();
    }

    /// The token `s4t login` stored.
    fn stored_token(&self) -> String {
        let stored = std::fs::read_to_string(&self.config).unwrap();
        let token = stored.lines().find_map(|l| l.strip_prefix("token = "));
        token.unwrap_or_else(|| panic!("no token stored: {stored}")).trim_matches('"').to_owned()
    }
}

struct Cloud {
    url: String,
    wamp: std::net::SocketAddr,
    dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

async fn cloud() -> Cloud {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::new(dir.path().join("cloud"));
    config.bind = "127.0.0.1".parse().unwrap();
    config.plaintext = true;
    config.rest_port = 0;
    config.wamp_port = 0;
    config.tunnel_port = 0;
    config.admin_password = Some(ADMIN_PASSWORD.into());
    config.call_timeout = Duration::from_secs(20);
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(iotronic::serve(config, stop.clone(), Some(tx)));
    let l = rx.await.unwrap();
    Cloud { url: format!("http://{}", l.rest), wamp: l.wamp.unwrap(), dir, _stop: stop.drop_guard() }
}

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

/// A board: its configuration, and its agent process while it runs.
struct Board {
    config: PathBuf,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Board {
    async fn enroll(cloud: &Cloud, name: &str, code: &str) -> Board {
        let dir = cloud.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.toml");
        let cfg = format!(
            "[cloud]\nlegacy_settings = \"{0}/none.json\"\nlegacy_conf = \"{0}/none.conf\"\n[board]\nstate_dir = \"{0}/state\"\n\
             [hal]\nbackend = \"sim\"\n[timers]\nalive_interval_s = 5\nbackoff_initial_ms = 50\nbackoff_max_s = 1\n",
            dir.display()
        );
        std::fs::write(&config, cfg).unwrap();
        let out = tokio::process::Command::new(lightning_rod())
            .args(["enroll", "--url", &format!("ws://{}/", cloud.wamp), "--code", code, "--config"])
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        Board { config, log: dir.join("lr.log"), child: None }
    }

    /// Created by `u` (with `code`), enrolled, started, and online.
    async fn online(cloud: &Cloud, u: &User, name: &str, code: &str) -> Board {
        u.run(&["board", "create", name, "--code", code, "--location", "38.2,15.5,3"]).await.ok();
        let mut board = Board::enroll(cloud, name, code).await;
        board.start();
        u.run(&["board", "wait", name, "--timeout", "30s"]).await.ok();
        board
    }

    fn start(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let child = tokio::process::Command::new(lightning_rod())
            .args(["run", "--config"])
            .arg(&self.config)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A TCP echo server on 127.0.0.1 (a board service).
async fn echo_server() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_whoami_admin_commands_and_their_errors() {
    let c = cloud().await;
    let admin = User::new(c.dir.path(), "admin");

    // Bad arguments and no login.
    admin.run(&["board", "list", "--status", "sleepy"]).await.code(2);
    let r = admin.run(&["board", "list"]).await.code(3);
    assert!(r.stderr.contains("not logged in") && r.stderr.contains("s4t login"), "{r:#?}");
    let r = admin.run_env(&["login", "--url", &c.url, "--user", "admin"], &[("S4T_PASSWORD", "wrong")]).await.code(3);
    assert!(r.stderr.contains("password"), "{r:#?}");
    let r = admin.run_env(&["login", "--url", &c.url, "--user", "admin"], &[]).await.code(2);
    assert!(r.stderr.contains("S4T_PASSWORD"), "no password and no terminal: {r:#?}");

    admin.login(&c.url, "admin", ADMIN_PASSWORD).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&admin.config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the stored token must be private");
    let stored = std::fs::read_to_string(&admin.config).unwrap();
    assert!(stored.contains("token = ") && stored.contains(&c.url), "{stored}");

    let me = admin.run(&["whoami", "--json"]).await.ok().json();
    assert_eq!((me["user"].as_str(), me["project"].as_str()), (Some("admin"), Some("admin")), "{me}");

    // Projects and users (administrators only).
    admin.run(&["project", "create", "lab"]).await.ok();
    let r = admin.run(&["project", "list"]).await.ok();
    assert!(r.stdout.starts_with("NAME") && r.stdout.contains("lab"), "{r:#?}");
    admin
        .run_env(
            &["user", "create", "bob", "--project", "lab", "--role", "manager"],
            &[("S4T_NEW_PASSWORD", "bob-password")],
        )
        .await
        .ok();
    let users = admin.run(&["user", "list", "--json"]).await.ok().json();
    assert!(users["users"].as_array().unwrap().iter().any(|u| u["name"] == "bob" && u["role"] == "manager"), "{users}");

    let bob = User::new(c.dir.path(), "bob");
    bob.login(&c.url, "bob", "bob-password").await;
    let r = bob.run(&["project", "create", "mine"]).await.code(4);
    assert!(r.stderr.contains("administrators") && r.stderr.contains("hint"), "{r:#?}");
    let r = bob.run(&["board", "show", "nope"]).await.code(5);
    assert!(r.stderr.contains("not found"), "{r:#?}");

    // --json errors on stderr.
    let r = bob.run(&["board", "show", "nope", "--json"]).await.code(5);
    let e: Value = serde_json::from_str(r.stderr.trim()).unwrap();
    assert_eq!((e["error"].as_str(), e["exit_code"].as_u64()), (Some("not_found"), Some(5)), "{e}");

    // S4T_URL and S4T_TOKEN instead of a stored login.
    let token = stored.lines().find_map(|l| l.strip_prefix("token = ")).unwrap().trim_matches('"').to_owned();
    let nobody = User::new(c.dir.path(), "nobody");
    let r = nobody.run_env(&["project", "list", "-q"], &[("S4T_URL", &c.url), ("S4T_TOKEN", &token)]).await.ok();
    assert!(r.stdout.lines().any(|l| l == "lab"), "{r:#?}");
    nobody.run_env(&["project", "list"], &[("S4T_URL", &c.url), ("S4T_TOKEN", "forged")]).await.code(3);

    // Unreachable cloud (with a token for it: the stored one is not sent there), logout.
    let r = admin.run(&["board", "list", "--url", "http://127.0.0.1:1", "--token", &token]).await.code(10);
    assert!(r.stderr.contains("cannot reach the cloud"), "{r:#?}");
    admin.run(&["logout"]).await.ok();
    admin.run(&["board", "list"]).await.code(3);
}

/// `s4t logout` revokes the token at the cloud, not only in the file; an unreachable cloud gets
/// a warning and the token is still forgotten; it fails only when it could do neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_revokes_the_token_at_the_cloud() {
    let c = cloud().await;
    let admin = User::new(c.dir.path(), "admin");
    let other = User::new(c.dir.path(), "other");
    admin.login(&c.url, "admin", ADMIN_PASSWORD).await;
    let token = admin.stored_token();
    let with_token = [("S4T_URL", c.url.as_str()), ("S4T_TOKEN", token.as_str())];
    other.run_env(&["project", "list"], &with_token).await.ok();

    let out = admin.run(&["logout", "--json"]).await.ok().json();
    assert_eq!((&out["revoked"], &out["forgotten"]), (&Value::Bool(true), &Value::Bool(true)), "{out}");
    let stored = std::fs::read_to_string(&admin.config).unwrap();
    assert!(!stored.contains("token = ") && stored.contains(&c.url), "token forgotten, URL kept: {stored}");
    let r = other.run_env(&["project", "list"], &with_token).await.code(3);
    assert!(r.stderr.contains("unknown or expired"), "the kept token is refused (401): {r:#?}");

    // The cloud cannot be reached (it moved away from the stored URL): a warning, the token is
    // forgotten here all the same.
    admin.login(&c.url, "admin", ADMIN_PASSWORD).await;
    let token = admin.stored_token();
    let stored = std::fs::read_to_string(&admin.config).unwrap();
    std::fs::write(&admin.config, stored.replace(&c.url, "http://127.0.0.1:1")).unwrap();
    let r = admin.run(&["logout"]).await.ok();
    assert!(r.stderr.contains("warning") && r.stderr.contains("cannot reach the cloud"), "{r:#?}");
    assert!(!std::fs::read_to_string(&admin.config).unwrap().contains("token = "));
    let with_token = [("S4T_URL", c.url.as_str()), ("S4T_TOKEN", token.as_str())];
    other.run_env(&["project", "list"], &with_token).await.ok();
    // Neither revoked nor forgotten (a token from the environment, no stored one): a failure.
    let r = other.run_env(&["logout"], &[("S4T_URL", "http://127.0.0.1:1"), ("S4T_TOKEN", &token)]).await.code(10);
    assert!(r.stderr.contains("cannot reach the cloud"), "{r:#?}");
    // A token from the environment is revoked; the stored login is left alone.
    admin.login(&c.url, "admin", ADMIN_PASSWORD).await;
    let out = admin.run_env(&["logout", "--json"], &[("S4T_TOKEN", &token)]).await.ok().json();
    assert_eq!((&out["revoked"], &out["forgotten"]), (&Value::Bool(true), &Value::Bool(false)), "{out}");
    other.run_env(&["project", "list"], &with_token).await.code(3);
    admin.run(&["project", "list"]).await.ok();
}

/// The stored token goes only to the cloud that issued it: `--url`/`S4T_URL` naming another
/// host is refused before any connection (exit 3, like any login problem), not handed the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stored_token_goes_only_to_the_cloud_that_issued_it() {
    let c = cloud().await;
    let admin = User::new(c.dir.path(), "admin");
    admin.login(&c.url, "admin", ADMIN_PASSWORD).await;
    // Another host: it records every connection and what came on it, then hangs up.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_url = format!("http://{}", other.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = other.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            record.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
        }
    });

    let r = admin.run(&["--url", &other_url, "board", "list"]).await.code(3);
    assert!(r.stderr.contains("stored login is for") && r.stderr.contains("--token"), "{r:#?}");
    admin.run_env(&["board", "list", "--json"], &[("S4T_URL", &other_url)]).await.code(3);
    admin.run(&["whoami", "--url", &other_url]).await.code(3);
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|h| h.to_ascii_lowercase().contains("authorization")),
        "the token went elsewhere: {seen:?}"
    );
    assert!(seen.is_empty(), "no connection to another host at all: {seen:?}");
    // The same cloud, written another way, still gets it.
    admin.run(&["board", "list", "--url", &format!("{}/v1/", c.url)]).await.ok();
}

/// Text from the cloud reaches the terminal without control characters: a user name that
/// anyone can try at the login (here with ESC and CSI, U+009B, sequences) is listed by
/// `s4t audit` escaped, in tables and in `--json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_text_cannot_drive_the_terminal() {
    let c = cloud().await;
    let evil = "eve\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31mX\u{85}";
    let stranger = User::new(c.dir.path(), "stranger");
    stranger.run_env(&["login", "--url", &c.url, "--user", evil], &[("S4T_PASSWORD", "guess")]).await.code(3);
    let admin = User::new(c.dir.path(), "admin");
    admin.login(&c.url, "admin", ADMIN_PASSWORD).await;

    let clean = |r: &Run| {
        let bytes = r.stdout.as_bytes();
        assert!(!bytes.contains(&0x1b) && !bytes.windows(2).any(|w| w == [0xc2, 0x9b]), "raw controls: {r:#?}");
        assert!(!r.stdout.contains(|ch: char| ch.is_control() && ch != '\n'), "{r:#?}");
    };
    let r = admin.run(&["audit", "--action", "auth.login"]).await.ok();
    clean(&r);
    assert!(r.stdout.contains("eve\\u{1b}]0;pwned"), "the attempt is listed, escaped: {r:#?}");
    let r = admin.run(&["audit", "--action", "auth.login", "--json"]).await.ok();
    clean(&r);
    let listed = r.json();
    let names: Vec<&str> = listed["audit"].as_array().unwrap().iter().filter_map(|e| e["user_name"].as_str()).collect();
    assert!(names.contains(&evil), "JSON still carries the name exactly: {listed}");
}

/// The administrator and bob, a manager of project "lab", both logged in.
async fn admin_and_bob(c: &Cloud) -> (User, User) {
    let admin = User::new(c.dir.path(), "admin");
    admin.login(&c.url, "admin", ADMIN_PASSWORD).await;
    admin.run(&["project", "create", "lab"]).await.ok();
    admin
        .run_env(
            &["user", "create", "bob", "--project", "lab", "--role", "manager"],
            &[("S4T_NEW_PASSWORD", "bob-password")],
        )
        .await
        .ok();
    let bob = User::new(c.dir.path(), "bob");
    bob.login(&c.url, "bob", "bob-password").await;
    (admin, bob)
}

/// `s4t whoami` reports the identity of the token in use, not the stored login's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_reports_the_identity_of_the_token_in_use() {
    let c = cloud().await;
    let (admin, bob) = admin_and_bob(&c).await;

    let me = admin.run(&["whoami", "--json"]).await.ok().json();
    assert_eq!(
        (me["user"].as_str(), me["project"].as_str(), &me["admin"]),
        (Some("admin"), Some("admin"), &Value::Bool(true)),
        "{me}"
    );
    let bob_token = bob.stored_token();
    let bobs = [("S4T_TOKEN", bob_token.as_str())];
    let me = admin.run_env(&["whoami", "--json"], &bobs).await.ok().json();
    assert_eq!(
        (me["user"].as_str(), me["project"].as_str(), me["role"].as_str(), me["token_from"].as_str()),
        (Some("bob"), Some("lab"), Some("manager"), Some("S4T_TOKEN")),
        "{me}"
    );
    assert!(me["expires_at"].as_i64().is_some_and(|t| t > 1_700_000_000), "{me}");
    let r = admin.run_env(&["whoami"], &bobs).await.ok();
    let user_row = r.stdout.lines().find(|l| l.starts_with("user ")).unwrap_or_else(|| panic!("{r:#?}"));
    assert_eq!(user_row.split_whitespace().nth(1), Some("bob"), "{r:#?}");
    assert_eq!(admin.run_env(&["whoami", "-q"], &bobs).await.ok().stdout, "bob\n");
}

/// `s4t request list` shows the newest requests first, 50 unless told (`--limit`, `--all`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_list_is_newest_first_and_limited() {
    let c = cloud().await;
    let u = User::new(c.dir.path(), "admin");
    u.login(&c.url, "admin", ADMIN_PASSWORD).await;
    u.run(&["board", "create", "b1", "--code", "CODE-RQ"]).await.ok();
    let mut sent = Vec::new();
    for action in ["DevicePing", "DeviceInfo"] {
        let q = u.run(&["board", "action", "b1", action, "--queue", "-q"]).await.ok();
        sent.push(q.stdout.trim().to_owned());
    }
    let (older, newer) = (&sent[0], &sent[1]);
    let r = u.run(&["request", "list"]).await.ok();
    let rows: Vec<&str> = r.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{r:#?}");
    assert!(rows[0].starts_with(newer.as_str()) && rows[0].contains("DeviceInfo"), "newest first: {r:#?}");
    assert!(rows[1].starts_with(older.as_str()), "{r:#?}");
    let r = u.run(&["request", "list", "--limit", "1", "-q"]).await.ok();
    assert_eq!(r.stdout, format!("{newer}\n"), "{r:#?}");
    let r = u.run(&["request", "list", "--board", "b1", "--limit", "1", "--json"]).await.ok().json();
    assert_eq!(r["requests"].as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(r["requests"][0]["uuid"], newer.as_str(), "{r}");
    let all = u.run(&["request", "list", "--all", "--json"]).await.ok().json();
    let ids: Vec<&str> = all["requests"].as_array().unwrap().iter().map(|x| x["uuid"].as_str().unwrap()).collect();
    assert_eq!(ids, [newer.as_str(), older.as_str()], "{all}");
    u.run(&["request", "list", "--all", "--limit", "1"]).await.code(2);
}

/// 429 (here: the login throttle, 5 wrong passwords per user name) is its own exit code, 11,
/// and the message says how long to wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_attempts_exit_11_and_say_how_long_to_wait() {
    let c = cloud().await;
    let u = User::new(c.dir.path(), "u");
    let wrong = [("S4T_PASSWORD", "wrong-password")];
    for _ in 0..5 {
        u.run_env(&["login", "--url", &c.url, "--user", "admin"], &wrong).await.code(3);
    }
    let r = u.run_env(&["login", "--url", &c.url, "--user", "admin"], &wrong).await.code(11);
    assert!(r.stderr.contains("too many attempts") && r.stderr.contains(" s, then try again"), "{r:#?}");
    let r = u.run_env(&["login", "--url", &c.url, "--user", "admin", "--json"], &wrong).await.code(11);
    let e: Value = serde_json::from_str(r.stderr.trim()).unwrap();
    assert_eq!((e["error"].as_str(), e["exit_code"].as_u64()), (Some("throttled"), Some(11)), "{e}");
    let wait = e["retry_after"].as_u64().unwrap_or_else(|| panic!("the cloud's Retry-After: {e}"));
    assert!(wait > 0 && e["message"].as_str().unwrap().contains(&format!("wait {wait} s")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_fleets_services_and_vpns_as_two_projects() {
    let c = cloud().await;
    let (admin, bob) = admin_and_bob(&c).await;

    // Bob's board; the administrator books it for project admin.
    let b = bob.run(&["board", "create", "b1", "--code", "CODE-B1", "--json"]).await.ok().json();
    assert_eq!(b["status"], "registered", "{b}");
    let lease = admin.run(&["lease", "create", "b1", "--duration", "10m", "-q"]).await.ok().stdout.trim().to_owned();
    assert_eq!(lease.len(), 36, "a uuid: {lease}");
    let r = admin.run(&["lease", "list"]).await.ok();
    assert!(r.stdout.contains(&lease) && r.stdout.contains("active"), "{r:#?}");
    let extended = admin.run(&["lease", "extend", &lease, "--duration", "20m", "--json"]).await.ok().json();
    assert_eq!(extended["uuid"], lease.as_str());
    let r = bob.run(&["board", "update", "b1", "--name", "b2"]).await.code(6);
    assert!(r.stderr.contains("booked it until"), "another project's lease says until when: {r:#?}");
    let r = bob.run(&["board", "action", "b1", "DevicePing"]).await.code(6);
    assert!(r.stderr.contains("lease"), "{r:#?}");
    admin.run(&["lease", "release", &lease]).await.ok();
    let all = admin.run(&["lease", "list", "--all", "--json"]).await.ok().json();
    assert_eq!(all["leases"][0]["status"], "released", "{all}");

    // A never-enrolled board: the error says what to do.
    let r = bob.run(&["board", "action", "b1", "DevicePing"]).await.code(7);
    assert!(r.stderr.contains("never logged in") && r.stderr.contains("lightning-rod enroll"), "{r:#?}");
    let q = bob.run(&["board", "action", "b1", "DevicePing", "--queue", "--json"]).await.ok().json();
    assert_eq!(q["status"], "QUEUED", "{q}");
    let shown = bob.run(&["request", "show", q["uuid"].as_str().unwrap(), "--json"]).await.ok().json();
    assert_eq!(shown["request"]["status"], "QUEUED", "{shown}");
    let r = bob.run(&["request", "list", "--board", "b1", "-q"]).await.ok();
    assert!(r.stdout.contains(q["uuid"].as_str().unwrap()), "{r:#?}");

    // Fleets.
    bob.run(&["fleet", "create", "bench", "--description", "on the bench"]).await.ok();
    bob.run(&["board", "update", "b1", "--fleet", "bench", "--location", "1,2,3"]).await.ok();
    let r = bob.run(&["board", "list", "--fleet", "bench", "-q"]).await.ok();
    assert_eq!(r.stdout.trim(), "b1");
    let r = bob.run(&["fleet", "boards", "bench"]).await.ok();
    assert!(r.stdout.contains("b1") && r.stdout.contains("registered"), "{r:#?}");
    bob.run(&["fleet", "update", "bench", "--description", "moved"]).await.ok();
    assert_eq!(bob.run(&["fleet", "show", "bench", "--json"]).await.ok().json()["description"], "moved");
    bob.run(&["board", "update", "b1", "--no-fleet"]).await.ok();
    let b = bob.run(&["board", "show", "b1", "--json"]).await.ok().json();
    assert_eq!((&b["fleet"], &b["location"][0]["altitude"]), (&Value::Null, &Value::from("3")), "{b}");
    bob.run(&["fleet", "delete", "bench"]).await.ok();
    assert!(bob.run(&["fleet", "list", "-q"]).await.ok().stdout.trim().is_empty());

    // Services (definitions; exposure needs an online board: see the next test).
    bob.run(&["service", "create", "web", "8080"]).await.ok();
    let r = bob.run(&["service", "list"]).await.ok();
    assert!(r.stdout.contains("web") && r.stdout.contains("8080") && r.stdout.contains("TCP"), "{r:#?}");
    let r = bob.run(&["service", "expose", "b1", "web"]).await.code(7);
    assert!(r.stderr.contains("never logged in"), "{r:#?}");
    bob.run(&["service", "delete", "web"]).await.ok();

    // VPNs (memberships of running boards are tested with real TAPs in tests/tests/cli.rs).
    bob.run(&["vpn", "create", "net1", "--cidr", "10.9.0.0/24"]).await.ok();
    let r = bob.run(&["vpn", "list"]).await.ok();
    assert!(r.stdout.contains("net1") && r.stdout.contains("10.9.0.0/24") && r.stdout.contains("l2"), "{r:#?}");
    let shown = bob.run(&["vpn", "show", "net1", "--json"]).await.ok().json();
    assert_eq!(shown["vpn"]["cidr"], "10.9.0.0/24", "{shown}");
    bob.run(&["vpn", "create", "net1", "--cidr", "10.9.0.0/24"]).await.code(6);
    bob.run(&["vpn", "delete", "net1"]).await.ok();

    // Boards: delete.
    bob.run(&["board", "delete", "b1"]).await.ok();
    bob.run(&["board", "show", "b1"]).await.code(5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_board_through_the_cli() {
    let c = cloud().await;
    let u = User::new(c.dir.path(), "admin");
    u.login(&c.url, "admin", ADMIN_PASSWORD).await;
    let mut board = Board::online(&c, &u, "lr1", "CODE-LR1").await;

    let r = u.run(&["board", "list"]).await.ok();
    let row = r.stdout.lines().find(|l| l.starts_with("lr1")).unwrap_or_else(|| panic!("{r:#?}"));
    assert!(row.contains("online"), "{row}");
    assert_eq!(u.run(&["board", "list", "-q"]).await.ok().stdout, "lr1\n");
    let shown = u.run(&["board", "show", "lr1", "--json"]).await.ok().json();
    assert_eq!(shown["location"][0]["latitude"], "38.2", "{shown}");

    // Actions.
    let r = u.run(&["board", "action", "lr1", "DeviceEcho", "-p", "say=hello from the cli"]).await.ok();
    assert!(r.stdout.contains("hello from the cli"), "{r:#?}");
    let info = u.run(&["board", "action", "lr1", "DeviceInfo", "--json"]).await.ok().json();
    assert!(info["hostname"].is_string(), "{info}");
    u.run(&["board", "action", "lr1", "DeviceFly"]).await.code(2);
    let sent = u.run(&["board", "action", "lr1", "DevicePing", "--async", "-q"]).await.ok().stdout.trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = u.run(&["request", "show", &sent, "--json"]).await.ok().json();
        if v["request"]["status"] == "COMPLETED" {
            assert_eq!(v["results"][0]["result"], "SUCCESS", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the async request never completed: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // GPIO and I2C on the sim HAL.
    let r = u.run(&["gpio", "lr1", "write", "GPIO5", "1"]).await.ok();
    assert_eq!(r.stdout.trim(), "GPIO5 = 1");
    assert_eq!(u.run(&["gpio", "lr1", "read", "GPIO5", "-q"]).await.ok().stdout.trim(), "1");
    let lines = u.run(&["gpio", "lr1", "list", "--json"]).await.ok().json();
    assert!(lines["lines"].as_array().is_some_and(|l| l.len() >= 28), "{lines}");
    let r = u.run(&["gpio", "lr1", "list"]).await.ok();
    assert!(r.stdout.lines().any(|l| l.starts_with("GPIO5 ") && l.trim_end().ends_with('1')), "{r:#?}");
    let r = u.run(&["gpio", "lr1", "watch", "GPIO5", "GPIO6", "--count", "2", "--json"]).await.ok();
    let events: Vec<Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!((events[0]["line"].as_str(), events[0]["value"].as_u64()), (Some("GPIO5"), Some(1)), "{r:#?}");
    u.run(&["gpio", "lr1", "write", "GPIO5", "2"]).await.code(2);
    let r = u.run(&["gpio", "lr1", "read", "NOPE"]).await.code(8);
    assert!(r.stderr.contains("NOPE"), "the board's error names the line: {r:#?}");
    u.run(&["i2c", "lr1", "write", "1", "0x48", "42", "--register", "0"]).await.ok();
    let r = u.run(&["i2c", "lr1", "read", "1", "72", "--register", "0"]).await.ok();
    assert_eq!(r.stdout.trim(), "0x2a");
    u.run(&["i2c", "lr1", "read", "1", "0x48", "--register", "0x100"]).await.code(2);

    // A service exposed on a public port; ssh-proxy carries stdin/stdout through it.
    let echo = echo_server().await;
    u.run(&["service", "create", "echo", &echo.to_string()]).await.ok();
    let port: u16 = u.run(&["service", "expose", "lr1", "echo", "-q"]).await.ok().stdout.trim().parse().unwrap();
    let listed = u.run(&["service", "list", "--board", "lr1", "--json"]).await.ok().json();
    assert_eq!(listed["exposed"][0]["public_port"], port, "{listed}");
    assert_eq!(listed["exposed"][0]["service_name"], "echo", "{listed}");
    let mut proxy = tokio::process::Command::new(env!("CARGO_BIN_EXE_s4t"))
        .args(["ssh-proxy", "lr1", "--service", "echo"])
        .env("S4T_CONFIG", &u.config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = proxy.stdin.take().unwrap();
    stdin.write_all(b"through the tunnel\n").await.unwrap();
    drop(stdin);
    let mut echoed = String::new();
    let mut stdout = proxy.stdout.take().unwrap();
    tokio::time::timeout(Duration::from_secs(20), stdout.read_to_string(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, "through the tunnel\n");
    let status = tokio::time::timeout(Duration::from_secs(10), proxy.wait()).await.unwrap().unwrap();
    assert!(status.success(), "ssh-proxy ends when the board side closes");
    // `s4t ssh` wants an SSH server behind the port: an echo service is not one.
    let r = u.run(&["ssh", "lr1", "--service", "echo", "--wait", "2s"]).await.code(9);
    assert!(r.stderr.contains("SSH banner") && r.stderr.contains("is sshd running"), "{r:#?}");
    u.run(&["service", "restore", "lr1", "echo"]).await.ok();
    u.run(&["service", "restore", "lr1"]).await.ok();
    u.run(&["service", "unexpose", "lr1", "echo"]).await.ok();
    let listed = u.run(&["service", "list", "--board", "lr1", "--json"]).await.ok().json();
    assert_eq!(listed["exposed"], Value::Array(vec![]), "{listed}");
    // Deleting an exposed service removes its exposures without a word to the board: the
    // tunnel server closes the public port itself once its exposure is gone.
    let port: u16 = u.run(&["service", "expose", "lr1", "echo", "-q"]).await.ok().stdout.trim().parse().unwrap();
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("exposed again");
    u.run(&["service", "delete", "echo"]).await.ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
        assert!(Instant::now() < deadline, "public port {port} still open after its service was deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Offline: a clear error, then a queued command that runs when the board is back.
    board.stop().await;
    u.run(&["board", "wait", "lr1", "--status", "offline", "--timeout", "30s"]).await.ok();
    let r = u.run(&["board", "action", "lr1", "DevicePing"]).await.code(7);
    assert!(r.stderr.contains("board lr1 is offline since") && r.stderr.contains("--queue"), "{r:#?}");
    u.run(&["ssh", "lr1"]).await.code(7);
    let queued = u.run(&["board", "action", "lr1", "DeviceEcho", "-p", "say=later", "--queue", "-q"]).await.ok();
    let id = queued.stdout.trim().to_owned();
    board.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let v = u.run(&["request", "show", &id, "--json"]).await.ok().json();
        if ["COMPLETED", "FAILED"].contains(&v["request"]["status"].as_str().unwrap_or_default()) {
            break v;
        }
        assert!(Instant::now() < deadline, "the queued command was never delivered: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Delivered on BoardOnline, which comes before the board has registered its procedures:
    // the agent waits out the registration (wamp_agent::REGISTRATION_GRACE), so it completes.
    assert_eq!(done["request"]["status"], "COMPLETED", "{done}");
    assert_eq!(done["results"][0]["message"], "later", "{done}");
    let r = u.run(&["request", "show", &id]).await.ok();
    let status = done["request"]["status"].as_str().unwrap();
    assert!(r.stdout.contains(status) && r.stdout.contains("result from board"), "{r:#?}");
    board.stop().await;
}

/// Tunnel tokens expire (after a week): a board asks for fresh ones at every login (and
/// daily), so what it re-opens after a reconnect is not refused once the first ones expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_renews_its_tunnel_tokens_at_every_login() {
    let c = cloud().await;
    let u = User::new(c.dir.path(), "admin");
    u.login(&c.url, "admin", ADMIN_PASSWORD).await;
    let mut board = Board::online(&c, &u, "lr-tok", "CODE-TOK").await;
    let echo = echo_server().await;
    u.run(&["service", "create", "echo-tok", &echo.to_string()]).await.ok();
    u.run(&["service", "expose", "lr-tok", "echo-tok", "-q"]).await.ok();
    let saved = board.config.parent().unwrap().join("state/services.json");
    let token = || {
        let v: Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
        let svc = v.as_object().and_then(|m| m.values().next()).cloned().unwrap_or_else(|| panic!("{v}"));
        svc["token"].as_str().unwrap_or_else(|| panic!("no token saved: {svc}")).to_owned()
    };
    let first = token();
    // A token carries its expiry in whole seconds: one minted in the same second would be the
    // same. Let the clock pass the second in which the first one was minted.
    let minted = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() <= minted {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    board.stop().await;
    board.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while token() == first {
        assert!(Instant::now() < deadline, "the board never renewed its token; log: {}", board.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    board.stop().await;
}

#[tokio::test]
async fn completions_for_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    let u = User::new(dir.path(), "u");
    let bash = u.run(&["completions", "bash"]).await.ok();
    assert!(bash.stdout.contains("ssh-proxy") && bash.stdout.contains("complete -F"), "bash script");
    let path = dir.path().join("s4t.bash");
    std::fs::write(&path, &bash.stdout).unwrap();
    let syntax = std::process::Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(syntax.status.success(), "bash -n: {}", String::from_utf8_lossy(&syntax.stderr));
    let zsh = u.run(&["completions", "zsh"]).await.ok();
    assert!(zsh.stdout.starts_with("#compdef s4t") && zsh.stdout.contains("bridge"), "zsh script");
    let fish = u.run(&["completions", "fish"]).await.ok();
    assert!(fish.stdout.contains("complete -c s4t") && fish.stdout.contains("DevicePing"), "fish script");
    u.run(&["completions", "tcsh"]).await.code(2);
    let help = u.run(&["--help"]).await.ok();
    assert!(help.stdout.contains("Exit codes:") && help.stdout.contains("s4t ssh pi1"), "{help:#?}");
}

/// A fleet longer than one page (1,000 boards): `s4t board list` follows the cloud's `next`
/// links and shows every board once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn board_list_shows_fleets_longer_than_a_page() {
    let c = cloud().await;
    let db = iotronic::db::Db::open(&iotronic::db::DatabaseUrl::sqlite_in(&c.dir.path().join("cloud"))).await.unwrap();
    let project = db.project("admin").await.unwrap().unwrap().uuid;
    let total = iotronic::db::MAX_LIMIT as usize + 7;
    for i in 0..total {
        let b = iotronic::db::NewBoard {
            name: format!("pi-{i:04}"),
            code: format!("code-{i}"),
            project: project.clone(),
            ..Default::default()
        };
        db.insert_board(b).await.unwrap();
    }
    let admin = User::new(c.dir.path(), "admin");
    admin.login(&c.url, "admin", ADMIN_PASSWORD).await;
    let v = admin.run(&["board", "list", "--json"]).await.ok().json();
    let names: std::collections::BTreeSet<_> =
        v["boards"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!((v["boards"].as_array().unwrap().len(), names.len()), (total, total), "every board once");
    assert!(v.get("next").is_none(), "{}", v["next"]);
}
