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
//! Figures (attempts let through, time to disconnect) are printed for docs/security.md.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use s4t_tests::rest::Rest;
use s4t_tests::{CLOUD_ADDR, Host, Lab, require_root, run, wait_a_little, workspace_bin};
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
