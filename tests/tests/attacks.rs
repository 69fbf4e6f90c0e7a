//! The attack suite (security issue): real `iotronic serve`, real `lightning-rod` boards behind
//! NAT, users on the Internet, each trying what an attacker would:
//!
//! - a user of project beta iterates over **every route of `/v1/openapi.json`** with the ids of
//!   project alpha's board, service, fleet, lease, VPN, request and user: nothing of alpha is
//!   read or changed, and alpha's objects are intact afterwards;
//! - audit entries are project-scoped (a manager sees only his project's, a user none);
//! - expired and revoked (logged out) tokens are refused;
//! - brute force of passwords locks the user out (429 with `Retry-After`) even for the right
//!   password, and brute force of enrollment codes is throttled the same way;
//! - a board logging in as another board (its own secret, the other's uuid) is refused;
//! - a revoked board is disconnected within seconds and cannot log in again; its code cannot
//!   be reused; `rotate-secret` hands out a fresh code that works once;
//! - a man in the middle presenting a certificate that is not the pinned one makes enrollment
//!   fail, with a message naming the pin;
//! - a board asking for another board's public port with its own valid tunnel token is
//!   refused, and a public port answers only while its exposure exists.
//!
//! `tunnel_attacks_are_refused` (a lab of its own) attacks the public ports:
//!
//! - an exposure with a source-address allow-list: an allowed host reaches the board's sshd,
//!   another host is closed at accept and audited (`tunnel.refused`, its address); the same
//!   after a cloud restart;
//! - a tunnel token replayed after its expiry (minted with the cloud's real key), and a valid
//!   token whose port was altered, are refused;
//! - a board registering procedures under another board's prefix (its uuid or its name, in its
//!   own session or in the other board's) is refused, with its own valid credentials;
//! - a revoked board's tunnel token no longer opens its public port, nor after the board's
//!   credentials were rotated and it enrolled again.
//!
//! Figures (attempts let through, time to disconnect) are printed for docs/security.md.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use s4t_tests::fixtures::{sshd_files, start_cloud, start_sshd};
use s4t_tests::rest::Rest;
use s4t_tests::{CLOUD_ADDR, Host, Lab, read_to_end_limited, require_root, run, wait_a_little, workspace_bin};
use serde_json::{Value, json};

const PASSWORD: &str = "lab-admin-password";

fn board_config(dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(name);
    fs::create_dir_all(&d).unwrap();
    let p = d.join("config.toml");
    let cfg = format!(
        "[cloud]\nlegacy_settings = \"{0}/none.json\"\nlegacy_conf = \"{0}/none.conf\"\n[board]\nstate_dir = \"{0}/state\"\n\
         [hal]\nbackend = \"sim\"\n[timers]\nbackoff_initial_ms = 50\nbackoff_max_s = 1\n",
        d.display()
    );
    fs::write(&p, cfg).unwrap();
    p
}

fn enroll(host: &Host, config: &Path, code: &str) -> std::process::Output {
    let mut cmd = host.command(workspace_bin("lightning-rod").unwrap());
    cmd.args([
        "enroll",
        "--force",
        "--url",
        &format!("ws://{CLOUD_ADDR}:8181/"),
        &format!("--code={code}"),
        "--config",
    ])
    .arg(config)
    .env_remove("NOTIFY_SOCKET");
    cmd.output().unwrap()
}

fn must_enroll(host: &Host, config: &Path, code: &str) {
    let out = enroll(host, config, code);
    assert!(out.status.success(), "enroll with {code} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn run_board(lab: &mut Lab, host: &Host, config: &Path, name: &str) {
    let mut agent = host.command(workspace_bin("lightning-rod").unwrap());
    agent.args(["run", "--config"]).arg(config).env_remove("NOTIFY_SOCKET");
    lab.spawn(name, agent).unwrap();
}

fn user(laptop: &Host, rest: SocketAddr, name: &str, password: &str) -> Rest {
    let mut r = Rest::new(laptop, rest);
    r.login(name, password).unwrap();
    r
}

/// Waits until `f` holds, or fails naming `what`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < timeout, "{what}: not within {timeout:?}");
        wait_a_little();
    }
    started.elapsed()
}

/// Asserts that `attempt` fails because the cloud looked the code up and refused it (an audit
/// entry `board.enroll.refused` appears), not merely because code guessing is throttled.
fn refused_for_real(admin: &Rest, attempt: impl Fn() -> std::process::Output) {
    let refusals = || {
        let v = admin.expect(200, "GET", "/v1/audit?limit=1000", None).unwrap();
        v["audit"].as_array().unwrap().iter().filter(|e| e["action"] == "board.enroll.refused").count()
    };
    let before = refusals();
    wait_until("a used code is looked up and refused", Duration::from_secs(30), || {
        let out = attempt();
        assert!(!out.status.success(), "a used code enrolled again");
        refusals() > before
    });
}

#[test]
fn attacks_are_refused() {
    require_root!();
    let mut lab = Lab::new("atk").unwrap();
    let a = lab.add_board("a").unwrap();
    let b = lab.add_board("b").unwrap();
    let laptop = lab.add_public_host("laptop").unwrap();
    let cloud = lab.cloud().clone();
    let dir = lab.dir().to_path_buf();

    let mut iot = cloud.command(workspace_bin("iotronic").unwrap());
    iot.args(["serve", "--plaintext", "--bind", &CLOUD_ADDR.to_string(), "--data-dir"])
        .arg(dir.join("cloud"))
        .env("IOTRONIC_ADMIN_PASSWORD", PASSWORD);
    lab.spawn("iotronic", iot).unwrap();
    let rest = SocketAddr::from((CLOUD_ADDR, 8812));
    laptop.wait_tcp(rest, Duration::from_secs(30)).unwrap();
    let admin = user(&laptop, rest, "admin", PASSWORD);
    admin.wait_ready(Duration::from_secs(30)).unwrap();

    // Two tenants: ann manages alpha, bob manages beta, carl is a plain user of beta.
    for p in ["alpha", "beta"] {
        admin.expect(201, "POST", "/v1/projects", Some(&json!({"name": p}))).unwrap();
    }
    for (u, p, role) in [("ann", "alpha", "manager"), ("bob", "beta", "manager"), ("carl", "beta", "user")] {
        let body = json!({"name": u, "password": "password-1", "project": p, "role": role});
        admin.expect(201, "POST", "/v1/users", Some(&body)).unwrap();
    }
    let ann = user(&laptop, rest, "ann", "password-1");
    let bob = user(&laptop, rest, "bob", "password-1");
    let carl = user(&laptop, rest, "carl", "password-1");

    // Each enrolls a real board.
    let a_uuid = ann.create_board("a", "CODE-ALPHA-a-7f3k9q").unwrap()["uuid"].as_str().unwrap().to_owned();
    let b_uuid = bob.create_board("b", "CODE-BETA-b-2m8x4w").unwrap()["uuid"].as_str().unwrap().to_owned();
    let (a_cfg, b_cfg) = (board_config(&dir, "a"), board_config(&dir, "b"));
    must_enroll(&a, &a_cfg, "CODE-ALPHA-a-7f3k9q");
    must_enroll(&b, &b_cfg, "CODE-BETA-b-2m8x4w");
    run_board(&mut lab, &a, &a_cfg, "lr-a");
    run_board(&mut lab, &b, &b_cfg, "lr-b");
    ann.wait_status("a", "online", Duration::from_secs(30)).unwrap();
    bob.wait_status("b", "online", Duration::from_secs(30)).unwrap();

    // Alpha's objects, one of every kind a route can name.
    let svc = ann.expect(201, "POST", "/v1/services", Some(&json!({"name": "ssh", "port": 22, "protocol": "TCP"})));
    let svc = svc.unwrap()["uuid"].as_str().unwrap().to_owned();
    let fleet = ann.expect(201, "POST", "/v1/fleets", Some(&json!({"name": "fa"}))).unwrap();
    let fleet = fleet["uuid"].as_str().unwrap().to_owned();
    let vpn = ann.expect(201, "POST", "/v1/vpns", Some(&json!({"name": "va", "type": "l2", "cidr": "10.9.0.0/24"})));
    let vpn = vpn.unwrap()["uuid"].as_str().unwrap().to_owned();
    let plugin = ann.call("POST", "/v1/plugins", Some(&json!({"name": "pa", "code": "print(1)"}))).unwrap();
    let plugin = plugin.1["uuid"].as_str().unwrap_or("no-plugin").to_owned();
    let lease = ann.expect(201, "POST", "/v1/leases", Some(&json!({"boards": ["a"], "duration": 3600}))).unwrap();
    let lease = lease["uuid"].as_str().unwrap().to_owned();
    ann.expect(200, "POST", "/v1/boards/a/action", Some(&json!({"action": "DevicePing", "parameters": {}}))).unwrap();
    let requests = ann.expect(200, "GET", "/v1/requests", None).unwrap();
    let request = requests["requests"][0]["uuid"].as_str().expect("ann's ping left a request").to_owned();
    let ann_uuid = ann.expect(200, "GET", "/v1/users", None).unwrap()["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "ann")
        .unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    let secrets = [&a_uuid, &svc, &fleet, &vpn, &lease, &request, &ann_uuid];

    // 1. Bob against every route of the OpenAPI document, with alpha's ids.
    let doc = bob.expect(200, "GET", "/v1/openapi.json", None).unwrap();
    let mut tried = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            if (m.as_str(), path.as_str()) == ("DELETE", "/v1/auth/tokens") {
                continue; // bob's own logout: tested below
            }
            let concrete = path
                .replace("{board}", &a_uuid)
                .replace("{service}", &svc)
                .replace("{fleet}", &fleet)
                .replace("{plugin}", &plugin)
                .replace("{lease}", &lease)
                .replace("{vpn}", &vpn)
                .replace("{request}", &request)
                .replace("{user}", &ann_uuid)
                .replace("{line}", "GPIO5")
                .replace("{bus}", "1")
                .replace("{addr}", "0x48");
            let names_alpha = concrete != *path;
            let body = matches!(m.as_str(), "POST" | "PUT" | "PATCH").then(|| json!({}));
            let (status, v) = bob.call(&m, &concrete, body.as_ref()).unwrap();
            tried += 1;
            assert!(status < 500, "{m} {concrete} answered {status}: {v}");
            if names_alpha {
                assert!(!(200..300).contains(&status), "bob reached alpha's object: {m} {concrete} → {status}: {v}");
            }
            let text = v.to_string();
            // An error may echo the id bob sent; nothing else of alpha may show.
            for s in secrets.iter().filter(|s| !concrete.contains(s.as_str())) {
                assert!(!text.contains(s.as_str()), "{m} {concrete} leaked alpha's {s}: {text}");
            }
        }
    }
    println!("cross-project: {tried} route × method combinations tried, none reached project alpha");
    // Alpha is intact: every object still there, the board still online and booked by ann.
    for p in [
        format!("/v1/boards/{a_uuid}"),
        format!("/v1/services/{svc}"),
        format!("/v1/fleets/{fleet}"),
        format!("/v1/vpns/{vpn}"),
        format!("/v1/leases/{lease}"),
        format!("/v1/requests/{request}"),
    ] {
        ann.expect(200, "GET", &p, None).unwrap();
    }
    ann.wait_status("a", "online", Duration::from_secs(5)).unwrap();

    // 2. The audit log: admin sees everything, managers their project, users nothing.
    let all = admin.expect(200, "GET", "/v1/audit?limit=1000", None).unwrap();
    let actions: Vec<&str> = all["audit"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for want in ["auth.login", "board.enroll", "POST /v1/boards", "POST /v1/leases", "POST /v1/vpns"] {
        assert!(actions.contains(&want), "no {want} in the audit log: {actions:?}");
    }
    let alpha_project = ann.expect(200, "GET", "/v1/projects", None).unwrap()["projects"][0]["uuid"].clone();
    let bobs = bob.expect(200, "GET", "/v1/audit?limit=1000", None).unwrap();
    let bobs = bobs["audit"].as_array().unwrap();
    assert!(!bobs.is_empty(), "bob's own calls are in his view");
    assert!(bobs.iter().all(|e| e["project"] != alpha_project), "bob sees alpha's audit entries");
    let anns = ann.expect(200, "GET", "/v1/audit?limit=1000", None).unwrap();
    assert!(
        anns["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "board.enroll" && e["target"] == a_uuid.as_str()),
        "ann sees the enrollment of her board: {anns}"
    );
    assert_eq!(carl.call("GET", "/v1/audit", None).unwrap().0, 403);

    // 3. Expired and revoked tokens.
    let mut short = Rest::new(&laptop, rest);
    let t = short.expect(
        201,
        "POST",
        "/v1/auth/tokens",
        Some(&json!({"username": "carl", "password": "password-1", "ttl": 1})),
    );
    short.set_token(t.unwrap()["token"].as_str());
    short.expect(200, "GET", "/v1/boards", None).unwrap();
    wait_until("a 1 s token expires", Duration::from_secs(10), || {
        short.call("GET", "/v1/boards", None).unwrap().0 == 401
    });
    let mut gone = user(&laptop, rest, "bob", "password-1");
    gone.expect(204, "DELETE", "/v1/auth/tokens", None).unwrap();
    assert_eq!(gone.call("GET", "/v1/boards", None).unwrap().0, 401, "a revoked token still works");
    gone.set_token(None);

    // 4. Password brute force: after 5 wrong guesses even the right password is refused (429).
    let mut evaluated = 0;
    let mut throttled = 0;
    let started = Instant::now();
    for i in 0..40 {
        let body = json!({"username": "carl", "password": format!("guess-{i}")});
        match gone.call("POST", "/v1/auth/tokens", Some(&body)).unwrap().0 {
            401 => evaluated += 1,
            429 => throttled += 1,
            s => panic!("a wrong password answered {s}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let right = json!({"username": "carl", "password": "password-1"});
    assert_eq!(gone.call("POST", "/v1/auth/tokens", Some(&right)).unwrap().0, 429, "carl is locked out");
    assert!(evaluated <= 6, "{evaluated} password guesses were evaluated");
    println!("password brute force: {evaluated} of 40 guesses evaluated in {secs:.2} s ({throttled} answered 429)");

    // 5. Enrollment code brute force: four guessers flood the agent with wrong codes. The
    // audit log says how many guesses were looked up (`board.enroll.refused`) and how many
    // were throttled; the looked-up ones stay within the throttle's burst and rate. A right
    // code tried during the flood is (almost always) refused too, and works once it stops.
    let c_cfg = board_config(&dir, "c");
    admin.create_board("c", "CODE-C-right-9v1p").unwrap();
    let count = |action: &str| {
        let v = admin.expect(200, "GET", "/v1/audit?limit=1000", None).unwrap();
        v["audit"].as_array().unwrap().iter().filter(|e| e["action"] == action).count()
    };
    let (refused0, throttled0) = (count("board.enroll.refused"), count("board.enroll.throttled"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let guesses = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let (right_refused, secs) = std::thread::scope(|scope| {
        for t in 0..4 {
            let (stop, guesses, b, c_cfg) = (&stop, &guesses, &b, &c_cfg);
            scope.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = guesses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    assert!(!enroll(b, c_cfg, &format!("GUESS-{t}-{n}")).status.success());
                }
            });
        }
        wait_until("the guessers are throttled", Duration::from_secs(60), || {
            count("board.enroll.throttled") > throttled0
        });
        let right_refused = !enroll(&b, &c_cfg, "CODE-C-right-9v1p").status.success();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (right_refused, started.elapsed().as_secs_f64())
    });
    let secs = secs.max(started.elapsed().as_secs_f64());
    let looked_up = count("board.enroll.refused") - refused0;
    let throttled = count("board.enroll.throttled") - throttled0;
    let guesses = guesses.load(std::sync::atomic::Ordering::Relaxed);
    // The throttle: a burst of 20, then 2 per second (auth::enrollment_throttle); attempts are
    // taken before the lookup, so concurrency does not stretch it.
    let bound = 20 + (2.0 * secs).ceil() as usize;
    assert!(looked_up <= bound, "{looked_up} codes looked up in {secs:.1} s (bound {bound})");
    assert!(throttled > 0);
    if !right_refused {
        refused_for_real(&admin, || enroll(&b, &c_cfg, "CODE-C-right-9v1p"));
    } else {
        wait_until("the throttle lets the right code in again", Duration::from_secs(30), || {
            enroll(&b, &c_cfg, "CODE-C-right-9v1p").status.success()
        });
    }
    println!(
        "code brute force: {guesses} guesses in {secs:.2} s, {looked_up} looked up, {throttled} throttled; \
         the right code during the flood was {}",
        if right_refused { "refused" } else { "accepted" }
    );

    // 6. Board b logs in as board a (its own secret, a's uuid): refused, exit 77.
    let fake_cfg = board_config(&dir, "fake");
    let fake_state = dir.join("fake/state");
    fs::create_dir_all(&fake_state).unwrap();
    let mut id: Value = serde_json::from_str(&fs::read_to_string(dir.join("b/state/identity.json")).unwrap()).unwrap();
    id["uuid"] = json!(a_uuid);
    if let Some(c) = id.get_mut("credentials").and_then(|c| c.as_object_mut())
        && c.contains_key("authid")
    {
        c.insert("authid".into(), json!(a_uuid));
    }
    fs::write(fake_state.join("identity.json"), id.to_string()).unwrap();
    run_board(&mut lab, &b, &fake_cfg, "lr-fake");
    let mut status = None;
    wait_until("the impersonator gives up", Duration::from_secs(20), || {
        status = lab.proc("lr-fake").unwrap().try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.unwrap().code(), Some(77), "{}", lab.proc("lr-fake").unwrap().output());
    ann.wait_status("a", "online", Duration::from_secs(5)).unwrap();

    // 7. Revocation: a is disconnected within seconds, cannot log in, its code is gone.
    let started = Instant::now();
    ann.expect(200, "POST", "/v1/boards/a/revoke", None).unwrap();
    ann.wait_status("a", "offline", Duration::from_secs(10)).unwrap();
    let offline = started.elapsed();
    let mut status = None;
    wait_until("the revoked board's agent stops", Duration::from_secs(20), || {
        status = lab.proc("lr-a").unwrap().try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.unwrap().code(), Some(77), "refused, not retried: {}", lab.proc("lr-a").unwrap().output());
    println!("revocation: board offline {:.2} s after the call; its agent exited 77", offline.as_secs_f64());
    refused_for_real(&admin, || enroll(&a, &a_cfg, "CODE-ALPHA-a-7f3k9q"));
    assert_eq!(bob.call("POST", "/v1/boards/a/rotate-secret", None).unwrap().0, 404, "bob rotates alpha's board");
    let rotated = ann.expect(200, "POST", "/v1/boards/a/rotate-secret", Some(&json!({"ttl": 600}))).unwrap();
    let code = rotated["code"].as_str().unwrap().to_owned();
    // The guesses above may still throttle enrollment for a moment: retry within a deadline.
    wait_until("the rotated code enrolls", Duration::from_secs(30), || enroll(&a, &a_cfg, &code).status.success());
    refused_for_real(&admin, || enroll(&a, &c_cfg, &code));
    run_board(&mut lab, &a, &a_cfg, "lr-a2");
    ann.wait_status("a", "online", Duration::from_secs(30)).unwrap();
    let _ = b_uuid;

    // 9. Tunnels: board b, with a valid token of its own, asks for a's public port: refused.
    // A public port answers only while its exposure exists.
    let on = json!({"action": "ServiceEnable"});
    let exposed = ann.expect(201, "POST", "/v1/boards/a/services/ssh/action", Some(&on)).unwrap();
    let a_port = exposed["public_port"].as_u64().unwrap() as u16;
    bob.expect(201, "POST", "/v1/services", Some(&json!({"name": "echo", "port": 7, "protocol": "TCP"}))).unwrap();
    bob.expect(201, "POST", "/v1/boards/b/services/echo/action", Some(&on)).unwrap();
    let a_public = SocketAddr::from((CLOUD_ADDR, a_port));
    laptop.wait_tcp(a_public, Duration::from_secs(20)).unwrap();
    let services: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("b/state/services.json")).unwrap()).unwrap();
    let b_token = services
        .as_object()
        .unwrap()
        .values()
        .find_map(|s| s["token"].as_str())
        .expect("b holds a tunnel token")
        .to_owned();
    let mut thief = b.command(workspace_bin("wstunnel").unwrap());
    thief
        .args(["client", "--server", &format!("ws://{CLOUD_ADDR}:8080/"), "-R"])
        .arg(format!("{a_port}:127.0.0.1:7"))
        .args(["--token", &b_token]);
    lab.spawn("thief", thief).unwrap().wait_for_log("exposure refused", Duration::from_secs(20)).unwrap();
    let thief_log = lab.proc("thief").unwrap().output();
    // Refused by the token (bound to b's own port) or, failing that, by the allocation.
    assert!(
        thief_log.contains("token is for port") || thief_log.contains("not allocated to this board"),
        "{thief_log}"
    );
    assert!(!thief_log.contains("exposed "), "{thief_log}");
    let off = json!({"action": "ServiceDisable"});
    ann.expect(200, "POST", "/v1/boards/a/services/ssh/action", Some(&off)).unwrap();
    wait_until("a's public port closes with its exposure", Duration::from_secs(20), || {
        laptop.connect(a_public, Duration::from_secs(2)).is_err()
    });

    // 8. A man in the middle: a TLS server whose certificate is not the pinned one.
    let mitm = dir.join("mitm");
    fs::create_dir_all(&mitm).unwrap();
    for name in ["mitm", "real"] {
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", &format!("/CN={CLOUD_ADDR}"), "-keyout"])
            .arg(mitm.join(format!("{name}.key")))
            .arg("-out")
            .arg(mitm.join(format!("{name}.pem"))))
        .unwrap();
    }
    let der = run(Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(mitm.join("real.pem")))
    .unwrap();
    let hex: String = der.trim().rsplit('=').next().unwrap().chars().filter(|c| *c != ':').collect();
    let pinned = format!("sha256:{}", hex.to_lowercase());
    let mut server = cloud.command("openssl");
    server
        .args(["s_server", "-quiet", "-accept", &format!("{CLOUD_ADDR}:8443"), "-cert"])
        .arg(mitm.join("mitm.pem"))
        .arg("-key")
        .arg(mitm.join("mitm.key"));
    lab.spawn("mitm", server).unwrap();
    laptop.wait_tcp(SocketAddr::from((CLOUD_ADDR, 8443)), Duration::from_secs(10)).unwrap();
    let d_cfg = board_config(&dir, "d");
    let mut cmd = b.command(workspace_bin("lightning-rod").unwrap());
    cmd.args(["enroll", "--url", &format!("wss://{CLOUD_ADDR}:8443/"), "--code", "CODE-C-right-9v1p"])
        .args(["--ca-fingerprint", &pinned, "--config"])
        .arg(&d_cfg);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "enrollment through a MITM succeeded");
    assert!(err.contains("pinned CA") || err.contains("ca-fingerprint"), "the failure names the pin: {err}");
    assert!(!dir.join("d/state/identity.json").exists(), "an identity was stored");
}

/// What a connection from `host` to `addr` reads within a few seconds (sshd's banner through a
/// tunnel; nothing when the cloud closed it at accept).
fn first_bytes(host: &Host, addr: SocketAddr) -> Vec<u8> {
    let Ok(s) = host.connect(addr, Duration::from_secs(5)) else { return Vec::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut s = std::io::BufReader::new(s);
    let mut line = Vec::new();
    let _ = std::io::BufRead::read_until(&mut s, b'\n', &mut line);
    if line.is_empty() {
        let _ = read_to_end_limited(s.get_mut(), 64).map(|rest| line.extend(rest));
    }
    line
}

/// A tunnel token made with python3: `expired BOARD PORT` mints one that expired an hour ago
/// with the cloud's real key (read from its database); `port TOKEN PORT` changes the port of a
/// valid token without re-signing it.
fn craft_token(db: &Path, args: &[&str]) -> String {
    const SCRIPT: &str = r#"
import base64, hashlib, hmac, sqlite3, struct, sys, time
b64e = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
b64d = lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
db, mode = sys.argv[1], sys.argv[2]
if mode == "expired":
    key = sqlite3.connect(db).execute("SELECT value FROM settings WHERE name = 'tunnel_key'").fetchone()[0]
    board, port = sys.argv[3].encode(), int(sys.argv[4])
    body = bytes([1, len(board)]) + board + struct.pack(">H", port) + bytes([0]) + struct.pack(">Q", int(time.time()) - 3600)
    print(b64e(body + hmac.new(key.encode(), body, hashlib.sha256).digest()))
else:
    raw = bytearray(b64d(sys.argv[3]))
    n = raw[1]
    raw[2 + n:4 + n] = struct.pack(">H", int(sys.argv[4]))
    print(b64e(bytes(raw)))
"#;
    run(Command::new("python3").args(["-c", SCRIPT]).arg(db).args(args)).unwrap().trim().to_owned()
}

/// Logs in to the router from `host` with the credentials of the board whose identity file is
/// `identity` (a real board's own secret) and registers `procedure`, where `{session}` stands
/// for the new session's id.
fn register_as(host: &Host, identity: &Path, procedure: &str) -> Result<(), String> {
    let id: Value = serde_json::from_str(&fs::read_to_string(identity).unwrap()).unwrap();
    let creds = &id["credentials"];
    let auth = s4t_wamp::ClientAuth::WampCra {
        authid: creds["authid"].as_str().expect("an authid").to_owned(),
        secret: s4t_wamp::Secret::new(creds["secret"].as_str().expect("a secret")),
    };
    let cfg = s4t_wamp::ClientConfig::new(&format!("ws://{CLOUD_ADDR}:8181/"), "s4t", auth);
    host.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let session = s4t_wamp::connect(&cfg).await.map_err(|e| format!("login: {e}"))?;
            let procedure = procedure.replace("{session}", &session.id().to_string());
            let r = session
                .register(&procedure, |_| async { Err(s4t_wamp::WampError::new("wamp.error.canceled", "stolen")) })
                .await;
            session.leave().await;
            r.map(|_| ()).map_err(|e| format!("{procedure}: {e}"))
        })
    })
    .unwrap()
}

/// Runs `wstunnel client -R PORT:127.0.0.1:22 --token TOKEN` on `host` until the server refuses
/// the exposure; returns its log.
fn refused_tunnel(lab: &mut Lab, host: &Host, name: &str, port: u16, token: &str) -> String {
    let mut thief = host.command(workspace_bin("wstunnel").unwrap());
    thief
        .args(["client", "--server", &format!("ws://{CLOUD_ADDR}:8080/"), "-R"])
        .arg(format!("{port}:127.0.0.1:22"))
        .args(["--token", token]);
    let p = lab.spawn(name, thief).unwrap();
    p.wait_for_log("exposure refused", Duration::from_secs(20)).unwrap();
    let log = p.output();
    assert!(!log.contains("exposed "), "{log}");
    log
}

#[test]
fn tunnel_attacks_are_refused() {
    require_root!();
    let mut lab = Lab::new("atkt").unwrap();
    let a = lab.add_board("a").unwrap();
    let b = lab.add_board("b").unwrap();
    let friend = lab.add_public_host("friend").unwrap();
    let eve = lab.add_public_host("eve").unwrap();
    let dir = lab.dir().to_path_buf();
    start_cloud(&mut lab, "iotronic").unwrap();
    let rest = SocketAddr::from((CLOUD_ADDR, 8812));
    friend.wait_tcp(rest, Duration::from_secs(30)).unwrap();
    let admin = user(&friend, rest, "admin", PASSWORD);
    admin.wait_ready(Duration::from_secs(30)).unwrap();
    let (sshd_config, _) = sshd_files(&dir).unwrap();
    start_sshd(&mut lab, &a, "sshd-a", &sshd_config).unwrap();
    let a_uuid = admin.create_board("a", "CODE-TUN-a-4h7d2k").unwrap()["uuid"].as_str().unwrap().to_owned();
    admin.create_board("b", "CODE-TUN-b-9w3m5p").unwrap();
    let (a_cfg, b_cfg) = (board_config(&dir, "a"), board_config(&dir, "b"));
    must_enroll(&a, &a_cfg, "CODE-TUN-a-4h7d2k");
    must_enroll(&b, &b_cfg, "CODE-TUN-b-9w3m5p");
    run_board(&mut lab, &a, &a_cfg, "lr-a");
    run_board(&mut lab, &b, &b_cfg, "lr-b");
    admin.wait_status("a", "online", Duration::from_secs(30)).unwrap();
    admin.wait_status("b", "online", Duration::from_secs(30)).unwrap();
    admin.expect(201, "POST", "/v1/services", Some(&json!({"name": "ssh", "port": 22, "protocol": "TCP"}))).unwrap();

    // 1. Allow-lists. Bad lists are refused before anything is allocated.
    let action = "/v1/boards/a/services/ssh/action";
    for bad in [json!(["10.0.0.0/33"]), json!(["anywhere"]), json!(vec!["10.0.0.0/8"; 65])] {
        let body = json!({"action": "ServiceEnable", "allow": bad});
        assert_eq!(admin.call("POST", action, Some(&body)).unwrap().0, 400, "allow {bad}");
    }
    let off_with_allow = json!({"action": "ServiceDisable", "allow": ["10.0.0.0/8"]});
    assert_eq!(admin.call("POST", action, Some(&off_with_allow)).unwrap().0, 400);
    let allow = json!([format!("{}/32", friend.addr), "2001:db8::/32"]);
    let exposed = admin.expect(201, "POST", action, Some(&json!({"action": "ServiceEnable", "allow": allow})));
    let exposed = exposed.unwrap();
    assert_eq!(exposed["allow"], allow);
    let listed = admin.expect(200, "GET", "/v1/boards/a/services", None).unwrap();
    assert_eq!(listed["exposed"][0]["allow"], allow, "{listed}");
    let a_port = exposed["public_port"].as_u64().unwrap() as u16;
    let public = SocketAddr::from((CLOUD_ADDR, a_port));
    let refusals = |source: &Host| {
        let v = admin.expect(200, "GET", "/v1/audit?action=tunnel.refused&limit=1000", None).unwrap();
        let entries = v["audit"].as_array().unwrap().clone();
        assert!(entries.iter().all(|e| e["action"] == "tunnel.refused"), "the action filter: {v}");
        entries.iter().filter(|e| e["source"] == source.addr.to_string().as_str()).count()
    };
    for round in ["first start", "after a cloud restart"] {
        wait_until("the allowed host reaches sshd", Duration::from_secs(30), || {
            first_bytes(&friend, public).starts_with(b"SSH-")
        });
        let before = refusals(&eve);
        let got = first_bytes(&eve, public);
        assert!(!got.starts_with(b"SSH-"), "{round}: a source outside the allow-list got through: {got:?}");
        wait_until("the refusal is audited", Duration::from_secs(10), || refusals(&eve) > before);
        assert!(first_bytes(&friend, public).starts_with(b"SSH-"), "{round}: the allowed host after a refusal");
        assert_eq!(refusals(&friend), 0, "the allowed host was refused");
        if round == "first start" {
            // The allow-list lives with the exposure: a restarted cloud enforces it again.
            lab.proc("iotronic").unwrap().terminate(Duration::from_secs(20)).unwrap();
            start_cloud(&mut lab, "iotronic-2").unwrap();
            admin.wait_ready(Duration::from_secs(30)).unwrap();
        }
    }
    println!("allow-list: the allowed host reached sshd, the other was closed at accept and audited");

    // 2. Tunnel tokens: an expired one (minted with the real key) and a valid one whose port
    // was changed are refused, whatever port they name.
    let services: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("a/state/services.json")).unwrap()).unwrap();
    let a_token = services
        .as_object()
        .unwrap()
        .values()
        .find_map(|s| s["token"].as_str())
        .expect("a holds a tunnel token")
        .to_owned();
    let db = dir.join("cloud/iotronic.sqlite");
    let expired = craft_token(&db, &["expired", &a_uuid, &a_port.to_string()]);
    let log = refused_tunnel(&mut lab, &b, "replay", a_port, &expired);
    assert!(log.contains("expired"), "{log}");
    let other_port = if a_port == 60000 { a_port - 1 } else { a_port + 1 };
    let forged = craft_token(&db, &["port", &a_token, &other_port.to_string()]);
    let log = refused_tunnel(&mut lab, &b, "forged", other_port, &forged);
    assert!(log.contains("signature does not match"), "{log}");

    // 3. Board b, with its own valid credentials, registers a's procedures: under a's uuid or
    // a's name in its own session, or under a's session: refused. Its own prefix works (so the
    // refusals are the policy, not a broken client).
    let b_identity = dir.join("b/state/identity.json");
    let b_uuid = admin.expect(200, "GET", "/v1/boards/b", None).unwrap()["uuid"].as_str().unwrap().to_owned();
    let a_session = admin.expect(200, "GET", "/v1/boards/a", None).unwrap()["session"].clone();
    let a_session = a_session.as_str().map(str::to_owned).unwrap_or_else(|| a_session.to_string());
    register_as(&b, &b_identity, &format!("iotronic.{{session}}.{b_uuid}.Probe")).expect("b's own prefix");
    for (what, procedure) in [
        ("a's uuid in b's session", format!("iotronic.{{session}}.{a_uuid}.DevicePing")),
        ("a's name in b's session", "iotronic.{session}.a.DevicePing".to_owned()),
        ("a's session", format!("iotronic.{a_session}.{a_uuid}.DevicePing")),
    ] {
        let r = register_as(&b, &b_identity, &procedure);
        assert!(r.as_ref().is_err_and(|e| e.contains("not_authorized")), "b registered under {what}: {r:?}");
    }
    admin.expect(200, "POST", "/v1/boards/a/action", Some(&json!({"action": "DevicePing", "parameters": {}}))).unwrap();
    println!("procedure prefixes: b's own credentials could not register under a's uuid, name or session");

    // 4. Revocation: a's own, still unexpired token no longer opens its port.
    admin.expect(200, "POST", "/v1/boards/a/revoke", None).unwrap();
    admin.wait_status("a", "offline", Duration::from_secs(10)).unwrap();
    wait_until("the revoked board's port closes", Duration::from_secs(10), || {
        friend.connect(public, Duration::from_secs(2)).is_err()
    });
    let log = refused_tunnel(&mut lab, &a, "revoked", a_port, &a_token);
    assert!(log.contains("revoked"), "{log}");
    assert!(friend.connect(public, Duration::from_secs(2)).is_err(), "the revoked board's port opened");

    // 5. Rotation re-admits the board, not the tunnel tokens it held before: they sat beside
    // the replaced secret.
    let rotated = admin.expect(200, "POST", "/v1/boards/a/rotate-secret", Some(&json!({"ttl": 600}))).unwrap();
    must_enroll(&a, &a_cfg, rotated["code"].as_str().unwrap());
    let log = refused_tunnel(&mut lab, &a, "rotated", a_port, &a_token);
    assert!(log.contains("issued before the board's credentials were last revoked or rotated"), "{log}");
    assert!(friend.connect(public, Duration::from_secs(2)).is_err(), "a pre-rotation token opened the port");
    println!("tunnel tokens: expired, altered, revoked-board and pre-rotation tokens refused");
}
