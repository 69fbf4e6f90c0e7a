//! The original Python lightning-rod (`iotronic-lightningrod` 0.5.0 from PyPI, installed by
//! `.ci/setup` into `$S4T_LR_VENV`) joins our cloud unchanged: it runs on a board behind NAT
//! with the `settings.json` and `iotronic.conf` an operator would write, and our `wstunnel`
//! (called as `wstun`) as its `wstun_bin`, against `iotronic serve --legacy-boards`.
//!
//! Proves: it registers with its code and comes online with its version and connectivity;
//! `DevicePing` and `DeviceEcho` through REST return the board's own answers (synchronously
//! and as request results); exposing SSH gives a public port through which `ssh` from a laptop
//! reaches the board's real sshd; a wstun client cannot open a port the cloud did not allocate;
//! after the cloud restarts the board comes back online and its SSH tunnel returns by itself;
//! disabling the service closes the port.
//!
//! The original hard-codes `/etc/iotronic/settings.json`, so it runs in a private mount
//! namespace where `/etc/iotronic` is the test's folder (an empty `/etc/iotronic` is created
//! on the host as the mount point if there is none), and in a private UTS namespace with the
//! hostname `legacy-a`, which its `DevicePing` reports.

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use s4t_tests::rest::Rest;
use s4t_tests::{CLOUD_ADDR, Host, Lab, require, require_root, run, workspace_bin};
use serde_json::{Value, json};

const PASSWORD: &str = "lab-admin-password";
const CODE: &str = "LEGACY-CODE-A";
const HOSTNAME: &str = "legacy-a";

/// The venv `.ci/setup` builds with the original lightning-rod, if it is there.
fn legacy_lightning_rod() -> Option<PathBuf> {
    let venv = std::env::var_os("S4T_LR_VENV").map(PathBuf::from).unwrap_or_else(|| "/var/cache/s4t/venv-lr".into());
    let bin = venv.join("bin/lightning-rod");
    bin.is_file().then_some(bin)
}

/// The files an operator writes on a board: settings.json with the registration code and the
/// registration agent, iotronic.conf (home, log file, our binary as wstun, the shipped
/// timers), and the empty services and plugins documents.
fn board_files(dir: &Path, wstunnel: &Path) -> PathBuf {
    let etc = dir.join("etc");
    let home = dir.join("home");
    let bin = dir.join("bin");
    for d in [&etc, &home, &bin] {
        fs::create_dir_all(d).unwrap();
    }
    std::os::unix::fs::symlink(wstunnel, bin.join("wstun")).unwrap();
    let settings = json!({"iotronic": {
        "board": {"code": CODE},
        "wamp": {"registration-agent": {"url": format!("ws://{CLOUD_ADDR}:8181/"), "realm": "s4t"}},
    }});
    fs::write(etc.join("settings.json"), serde_json::to_string_pretty(&settings).unwrap()).unwrap();
    fs::write(
        etc.join("iotronic.conf"),
        format!(
            "[DEFAULT]\nlightningrod_home = {home}\nskip_cert_verify = True\nlog_level = info\n\
             log_file = {log}\n\n[services]\nwstun_bin = {wstun}\n\n[webservices]\nproxy = nginx\n\n\
             [autobahn]\nconnection_timer = 30\nalive_timer = 600\nrpc_alive_timer = 10\n\
             connection_failure_timer = 300\n",
            home = home.display(),
            log = dir.join("lightning-rod.log").display(),
            wstun = bin.join("wstun").display(),
        ),
    )
    .unwrap();
    fs::write(home.join("services.json"), "{\"services\": {}}\n").unwrap();
    fs::write(home.join("plugins.json"), "{\"plugins\": {}}\n").unwrap();
    etc
}

/// Host and user keys, and an sshd configuration that accepts only the user key, as root.
fn sshd_files(dir: &Path) -> (PathBuf, PathBuf) {
    let d = dir.join("sshd");
    fs::create_dir_all(&d).unwrap();
    for key in ["host_key", "user_key"] {
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(d.join(key))).unwrap();
    }
    fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    let config = d.join("sshd_config");
    fs::write(
        &config,
        format!(
            "Port 22\nHostKey {0}/host_key\nPidFile {0}/sshd.pid\nAuthorizedKeysFile {0}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n",
            d.display()
        ),
    )
    .unwrap();
    fs::create_dir_all("/run/sshd").unwrap();
    (config, d.join("user_key"))
}

fn spawn_cloud(lab: &mut Lab, name: &str) {
    let cloud = lab.cloud().clone();
    let mut iot = cloud.command(workspace_bin("iotronic").unwrap());
    iot.args(["serve", "--plaintext", "--legacy-boards", "--bind", &CLOUD_ADDR.to_string(), "--data-dir"])
        .arg(lab.dir().join("cloud"))
        .env("IOTRONIC_ADMIN_PASSWORD", PASSWORD);
    lab.spawn(name, iot).unwrap();
}

/// Waits until `addr`, reached from `host`, answers with an SSH banner (the tunnel reaches a
/// live sshd).
fn wait_ssh_banner(host: &Host, addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match host.connect(addr, Duration::from_secs(2)) {
            Ok(mut c) => {
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 64];
                match c.read(&mut buf) {
                    Ok(n) if buf[..n].starts_with(b"SSH-") => return,
                    Ok(n) => last = format!("answered {:?}", String::from_utf8_lossy(&buf[..n])),
                    Err(e) => last = format!("read: {e}"),
                }
            }
            Err(e) => last = format!("connect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no SSH banner through {addr} within {timeout:?}: {last}");
}

/// Waits until nothing accepts connections on `addr` any more.
fn wait_closed(host: &Host, addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while host.connect(addr, Duration::from_secs(2)).is_ok() {
        assert!(Instant::now() < deadline, "{addr} still accepts connections after {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `ssh` from `host` to the public port and returns the remote command's output.
fn ssh(host: &Host, port: u16, key: &Path, command: &[&str]) -> String {
    let mut cmd = host.command("ssh");
    cmd.args(["-p", &port.to_string(), "-i"])
        .arg(key)
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "ConnectTimeout=10", "-l", "root", &CLOUD_ADDR.to_string()])
        .args(command);
    run(&mut cmd).unwrap()
}

/// A board action through REST; returns the board's message.
fn action(rest: &Rest, board: &str, name: &str, parameters: Value) -> Value {
    rest.expect(
        200,
        "POST",
        &format!("/v1/boards/{board}/action"),
        Some(&json!({"action": name, "parameters": parameters})),
    )
    .unwrap()
}

/// Polls the board until `check` accepts its JSON.
fn wait_board(rest: &Rest, board: &str, what: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = rest.expect(200, "GET", &format!("/v1/boards/{board}"), None).unwrap();
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "board {board} not {what} within {timeout:?}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_original_lightning_rod_joins_our_cloud() {
    require_root!();
    let original =
        require!(legacy_lightning_rod(), "the original lightning-rod venv (run .ci/setup or set S4T_LR_VENV)");
    let mut lab = Lab::new("legacy").unwrap();
    let a = lab.add_board("a").unwrap();
    let laptop = lab.add_public_host("laptop").unwrap();
    let dir = lab.dir().to_path_buf();
    let wstunnel = workspace_bin("wstunnel").unwrap();

    spawn_cloud(&mut lab, "iotronic");
    let mut rest = Rest::new(&laptop, SocketAddr::from((CLOUD_ADDR, 8812)));
    rest.wait_ready(Duration::from_secs(30)).unwrap();
    rest.login("admin", PASSWORD).unwrap();
    let uuid = rest.create_board("leg", CODE).unwrap()["uuid"].as_str().unwrap().to_owned();

    // A real sshd on the board, reachable only through the tunnel.
    let (sshd_config, key) = sshd_files(&dir);
    let mut sshd = a.command("/usr/sbin/sshd");
    sshd.args(["-D", "-e", "-f"]).arg(&sshd_config);
    lab.spawn("sshd-a", sshd).unwrap();
    a.wait_tcp(SocketAddr::from(([127, 0, 0, 1], 22)), Duration::from_secs(10)).unwrap();

    // The original lightning-rod, as installed on a board, with its /etc/iotronic.
    let board_dir = dir.join("board-a");
    let etc = board_files(&board_dir, &wstunnel);
    fs::create_dir_all("/etc/iotronic").unwrap();
    let script = format!(
        "mount --make-rprivate / && mount --bind '{}' /etc/iotronic && hostname {HOSTNAME} && exec '{}'",
        etc.display(),
        original.display()
    );
    let mut lr = a.command("unshare");
    lr.args(["--mount", "--uts", "sh", "-c", &script]).env("PYTHONUNBUFFERED", "1");
    lab.spawn("original-lightning-rod", lr).unwrap();

    // Registration: the cloud hands over the board's config, the original stores it, re-execs
    // itself, logs in on the main agent and is online with its version and connectivity.
    let online = |v: &Value| v["status"] == "online";
    let b = wait_board(&rest, "leg", "online", Duration::from_secs(60), online);
    let stored: Value = serde_json::from_str(&fs::read_to_string(etc.join("settings.json")).unwrap()).unwrap();
    assert_eq!(stored["iotronic"]["board"]["uuid"], uuid.as_str(), "settings.json: {stored}");
    assert_eq!(stored["iotronic"]["board"]["status"], "operative", "settings.json: {stored}");
    assert_eq!(stored["iotronic"]["wamp"]["main-agent"]["url"], format!("ws://{CLOUD_ADDR}:8181/"));
    assert_eq!(b["lr_version"], "0.5.0", "{b}");
    assert_eq!(b["connectivity"]["local_ip"], a.addr.to_string(), "the board's own address behind NAT: {b}");
    assert_eq!(b["connectivity"]["iface"], "eth0", "{b}");
    assert_eq!((&b["legacy"], &b["wstun_ip"]), (&json!(true), &json!(CLOUD_ADDR.to_string())), "{b}");

    // Board actions through REST answer with the board's own messages.
    let ping = action(&rest, "leg", "DevicePing", json!({}));
    assert!(ping.as_str().is_some_and(|s| s.starts_with(&format!("{HOSTNAME} @ "))), "DevicePing: {ping}");
    let echo = action(&rest, "leg", "DeviceEcho", json!({"say": "hello from the cloud"}));
    assert!(echo.as_str().is_some_and(|s| s.starts_with("hello from the cloud @ ")), "DeviceEcho: {echo}");
    // The same as a request whose result is read afterwards.
    let accepted = rest
        .expect(
            202,
            "POST",
            "/v1/boards/leg/action?async=true",
            Some(&json!({"action": "DeviceEcho", "parameters": {"say": "later"}})),
        )
        .unwrap();
    let request = accepted["uuid"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = rest.expect(200, "GET", &format!("/v1/requests/{request}"), None).unwrap();
        if r["status"] == "COMPLETED" {
            break;
        }
        assert!(Instant::now() < deadline && r["status"] != "FAILED", "request not completed: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let results = rest.expect(200, "GET", &format!("/v1/requests/{request}/results"), None).unwrap();
    let result = &results["results"][0];
    assert_eq!((&result["board_uuid"], &result["result"]), (&json!(uuid), &json!("SUCCESS")), "{results}");
    assert!(result["message"].as_str().is_some_and(|m| m.starts_with("later @ ")), "{results}");

    // SSH: the cloud allocates a public port, the original spawns our binary as wstun, and a
    // laptop on the Internet logs into the board's sshd through it.
    rest.expect(201, "POST", "/v1/services", Some(&json!({"name": "ssh", "port": 22, "protocol": "TCP"}))).unwrap();
    let exposed = rest
        .expect(201, "POST", "/v1/boards/leg/services/ssh/action", Some(&json!({"action": "ServiceEnable"})))
        .unwrap();
    let port = u16::try_from(exposed["public_port"].as_u64().unwrap()).unwrap();
    let public = SocketAddr::from((CLOUD_ADDR, port));
    wait_ssh_banner(&laptop, public, Duration::from_secs(30));
    let out = ssh(&laptop, port, &key, &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(out.contains(&format!("{}/", a.addr)), "the command did not run on the board: {out}");
    let list = rest.expect(200, "GET", "/v1/boards/leg/services", None).unwrap();
    assert_eq!(list["exposed"][0]["public_port"], port, "{list}");
    // The cloud accounts the wstun listener to the board (its wstun passes `-u <uuid>`).
    let opened = format!("public listener opened board=\"{uuid}\" port={port} legacy=true");
    assert!(lab.proc("iotronic").unwrap().output().contains(&opened), "no {opened:?} in the cloud's log");

    // Legacy tunnels are unauthenticated, so the cloud opens only ports it allocated.
    let stray = if port < 59999 { port + 1 } else { port - 1 };
    let mut rogue = a.command(board_dir.join("bin/wstun"));
    rogue.args([format!("-r{stray}:127.0.0.1:22"), format!("ws://{CLOUD_ADDR}:8080")]);
    let out = rogue.output().unwrap();
    assert!(!out.status.success(), "a wstun client opened unallocated port {stray}");
    assert!(laptop.connect(SocketAddr::from((CLOUD_ADDR, stray)), Duration::from_secs(2)).is_err());

    // An action only our lightning-rod has fails with a reason naming it (once
    // the board has had time to register its procedures), not a hang.
    let (status, err) =
        rest.call("POST", "/v1/boards/leg/action", Some(&json!({"action": "DeviceInfo", "parameters": {}}))).unwrap();
    assert_ne!(status, 200, "{err}");
    assert!(err.to_string().contains("DeviceInfo"), "{err}");

    // The cloud restarts: the board logs in again by itself (a new session), and its tunnel
    // comes back on the same public port.
    let before = rest.expect(200, "GET", "/v1/boards/leg", None).unwrap()["session"].clone();
    let status = lab.proc("iotronic").unwrap().terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "the cloud did not stop cleanly: {status}");
    spawn_cloud(&mut lab, "iotronic-restarted");
    rest.wait_ready(Duration::from_secs(30)).unwrap();
    rest.login("admin", PASSWORD).unwrap();
    wait_board(&rest, "leg", "back online", Duration::from_secs(60), |v| {
        v["status"] == "online" && v["session"] != before
    });
    let ping = action(&rest, "leg", "DevicePing", json!({}));
    assert!(ping.as_str().is_some_and(|s| s.starts_with(&format!("{HOSTNAME} @ "))), "DevicePing: {ping}");
    wait_ssh_banner(&laptop, public, Duration::from_secs(60));
    let out = ssh(&laptop, port, &key, &["hostname", "-I"]);
    assert!(out.contains(&a.addr.to_string()), "after the restart: {out}");
    // The original's ServiceRestore (kill and respawn its wstun) through the restore call.
    let restored = rest.expect(200, "GET", "/v1/boards/leg/services/restore", None).unwrap();
    assert_eq!(restored["exposed"][0]["public_port"], port, "{restored}");
    wait_ssh_banner(&laptop, public, Duration::from_secs(60));
    assert!(ssh(&laptop, port, &key, &["hostname", "-I"]).contains(&a.addr.to_string()));

    // Disabling the service closes the public port.
    rest.expect(200, "POST", "/v1/boards/leg/services/ssh/action", Some(&json!({"action": "ServiceDisable"}))).unwrap();
    wait_closed(&laptop, public, Duration::from_secs(30));
    let list = rest.expect(200, "GET", "/v1/boards/leg/services", None).unwrap();
    assert_eq!(list["exposed"], json!([]), "{list}");
    assert!(lab.proc("original-lightning-rod").unwrap().try_wait().unwrap().is_none(), "the original exited");
}
