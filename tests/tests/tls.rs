//! TLS in the cloud (security issue): `iotronic serve` without `--plaintext` makes its own CA,
//! serves REST over HTTPS and WAMP and tunnels over WSS, and everyone pins the CA by the
//! fingerprint it prints (and writes to `DATA_DIR/ca.fingerprint`):
//!
//! - `s4t login --ca-fingerprint` works, and the pin is stored; without a pin, or with a wrong
//!   one, it fails and says how to pin;
//! - a real `lightning-rod` behind NAT enrolls over wss with the pin, comes online over wss
//!   (it is handed `wss://` URLs of the address it dialed: the cloud runs with its defaults,
//!   every address bound and no public host), answers a DevicePing, and a service exposed
//!   through its tunnel carries data over wss;
//! - a wrong pin makes enrollment fail with its own exit code and stores nothing;
//! - a man in the middle (socat terminating TLS with its own CA, re-encrypting to the cloud)
//!   makes enrollment and `s4t login` fail, although it relays faithfully (a client pinning the
//!   MITM's certificate gets through it);
//! - plain http to the HTTPS port gets a 400 that says to use https; a plain WebSocket to the
//!   WAMP port gets no upgrade.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use s4t_tests::fixtures::{ADMIN_PASSWORD as PASSWORD, board_config, ok, s4t, send_pattern, tcp_sink};
use s4t_tests::{CLOUD_ADDR, Host, Lab, require_root, run, workspace_bin};

/// lightning-rod's exit code when the cloud does not hold the pinned CA.
const EXIT_UNTRUSTED: i32 = 76;

fn enroll(host: &Host, config: &Path, url: &str, code: &str, pin: &str) -> Output {
    let mut cmd = host.command(workspace_bin("lightning-rod").unwrap());
    cmd.args(["enroll", "--force", "--url", url, "--code", code, "--ca-fingerprint", pin, "--config"])
        .arg(config)
        .env_remove("NOTIFY_SOCKET");
    cmd.output().unwrap()
}

/// A self-signed certificate and key for `cn` (the man in the middle's), and its pin.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let (key, pem) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pem")));
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={CLOUD_ADDR}"), "-addext", &format!("subjectAltName=IP:{CLOUD_ADDR}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&pem))
    .unwrap();
    let fp = run(Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(&pem)).unwrap();
    let hex: String = fp.trim().rsplit('=').next().unwrap().chars().filter(|c| *c != ':').collect();
    (pem, key, format!("sha256:{}", hex.to_lowercase()))
}

/// What a plain-text client gets from `addr`: everything until the server closes.
fn plain_exchange(host: &Host, addr: SocketAddr, request: &str) -> String {
    host.run(|| {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = s.take(64 << 10).read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    })
    .unwrap()
}

#[test]
fn the_cloud_serves_tls_and_everyone_pins_its_ca() {
    require_root!();
    let mut lab = Lab::new("tls").unwrap();
    let board = lab.add_board("b").unwrap();
    let laptop = lab.add_public_host("laptop").unwrap();
    let cloud = lab.cloud().clone();
    let dir = lab.dir().to_path_buf();
    let data = dir.join("cloud");

    // Default serve: no --plaintext, no --bind (every address), no --public-host: boards are
    // answered with URLs of the address they dialed, which the certificate names.
    let mut iot = cloud.command(workspace_bin("iotronic").unwrap());
    iot.args(["serve", "--data-dir"]).arg(&data).env("IOTRONIC_ADMIN_PASSWORD", PASSWORD);
    lab.spawn("iotronic", iot).unwrap();
    let rest = SocketAddr::from((CLOUD_ADDR, 8812));
    laptop.wait_tcp(rest, Duration::from_secs(30)).unwrap();
    let pin = fs::read_to_string(data.join("ca.fingerprint")).unwrap().trim().to_owned();
    assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64, "{pin}");
    let log = lab.proc("iotronic").unwrap();
    log.wait_for_log(&pin, Duration::from_secs(30)).unwrap();
    log.wait_for_log("REST API on https://0.0.0.0:8812/v1", Duration::from_secs(30)).unwrap();
    log.wait_for_log("boards dial the host they enroll at", Duration::from_secs(30)).unwrap();
    let key_mode =
        |f: &str| fs::metadata(data.join(f)).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(key_mode("ca.key").unwrap(), 0o600);
    assert_eq!(key_mode("server.key").unwrap(), 0o600);

    // Plain text to the TLS ports is refused.
    let answer = plain_exchange(&laptop, rest, "GET /v1 HTTP/1.1\r\nHost: cloud\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("https://"), "plain http got: {answer:?}");
    let upgrade = "GET / HTTP/1.1\r\nHost: cloud\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: wamp.2.json\r\n\r\n";
    let answer = plain_exchange(&laptop, SocketAddr::from((CLOUD_ADDR, 8181)), upgrade);
    assert!(!answer.contains("101"), "a plain WebSocket was upgraded on the WAMP port: {answer:?}");

    // s4t: no pin, a wrong pin, then the right one (stored by login).
    let url = format!("https://{rest}");
    let cfg = dir.join("laptop").join("s4t.toml");
    let out = s4t(&laptop, &cfg, &["login", "--url", &url, "--user", "admin"]);
    assert_eq!(out.status.code(), Some(10), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-fingerprint"), "{out:?}");
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = s4t(&laptop, &cfg, &["login", "--url", &url, "--user", "admin", "--ca-fingerprint", &wrong]);
    assert_eq!(out.status.code(), Some(10), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("pinned CA"), "{out:?}");
    assert!(!cfg.exists() || !fs::read_to_string(&cfg).unwrap().contains("token"), "a failed login stored a token");
    ok(s4t(&laptop, &cfg, &["login", "--url", &url, "--user", "admin", "--ca-fingerprint", &pin]));
    assert!(fs::read_to_string(&cfg).unwrap().contains(&pin), "the pin is stored with the login");
    ok(s4t(&laptop, &cfg, &["board", "create", "b", "--code", "CODE-TLS-b-4k2m9x"]));

    // A wrong pin: enrollment fails with its own exit code and stores nothing.
    let bcfg = board_config(&dir, "b").unwrap();
    let wamp = format!("wss://{CLOUD_ADDR}:8181/");
    let out = enroll(&board, &bcfg, &wamp, "CODE-TLS-b-4k2m9x", &wrong);
    assert_eq!(out.status.code(), Some(EXIT_UNTRUSTED), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("pinned CA"), "{out:?}");
    assert!(!dir.join("b/state/identity.json").exists(), "an identity was stored");

    // A man in the middle with its own CA, relaying to the real cloud over TLS.
    let mitm = dir.join("mitm");
    fs::create_dir_all(&mitm).unwrap();
    let (mitm_pem, mitm_key, mitm_pin) = self_signed(&mitm, "mitm");
    for (listen, to) in [(8443, 8181), (8444, 8812)] {
        let mut proxy = cloud.command("socat");
        proxy
            .arg(format!(
                "OPENSSL-LISTEN:{listen},bind={CLOUD_ADDR},reuseaddr,fork,verify=0,cert={},key={}",
                mitm_pem.display(),
                mitm_key.display()
            ))
            .arg(format!("OPENSSL:{CLOUD_ADDR}:{to},verify=0"));
        lab.spawn(&format!("mitm-{listen}"), proxy).unwrap();
        laptop.wait_tcp(SocketAddr::from((CLOUD_ADDR, listen)), Duration::from_secs(10)).unwrap();
    }
    let out = enroll(&board, &bcfg, &format!("wss://{CLOUD_ADDR}:8443/"), "CODE-TLS-b-4k2m9x", &pin);
    assert_eq!(out.status.code(), Some(EXIT_UNTRUSTED), "enrollment through the MITM: {out:?}");
    assert!(!dir.join("b/state/identity.json").exists(), "an identity was stored");
    let mitm_cfg = dir.join("laptop").join("mitm.toml");
    let mitm_url = format!("https://{CLOUD_ADDR}:8444");
    let out = s4t(&laptop, &mitm_cfg, &["login", "--url", &mitm_url, "--user", "admin", "--ca-fingerprint", &pin]);
    assert_eq!(out.status.code(), Some(10), "login through the MITM: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("pinned CA"), "{out:?}");
    // The proxy does relay: whoever pins the MITM's own certificate gets through it.
    ok(s4t(&laptop, &mitm_cfg, &["login", "--url", &mitm_url, "--user", "admin", "--ca-fingerprint", &mitm_pin]));

    // The right pin: enroll over wss, get wss URLs, come online, answer a ping.
    ok(enroll(&board, &bcfg, &wamp, "CODE-TLS-b-4k2m9x", &pin));
    let identity = fs::read_to_string(dir.join("b/state/identity.json")).unwrap();
    assert!(identity.contains(&format!("\"{wamp}\"")), "the board was not handed the wss agent URL: {identity}");
    assert!(!identity.contains("ws://"), "a plaintext URL was handed out: {identity}");
    let tunnels = format!("\"wss://{CLOUD_ADDR}:8080/\"");
    assert!(identity.contains(&tunnels), "the board was not handed the tunnel URL of the host it dialed: {identity}");
    let mut agent = board.command(workspace_bin("lightning-rod").unwrap());
    agent.args(["run", "--config"]).arg(&bcfg).env_remove("NOTIFY_SOCKET");
    lab.spawn("lightning-rod", agent).unwrap();
    ok(s4t(&laptop, &cfg, &["board", "wait", "b", "--timeout", "30s"]));
    ok(s4t(&laptop, &cfg, &["board", "action", "b", "DevicePing"]));

    // A service exposed through the board's wss tunnel carries data end to end.
    let (sink, received) = tcp_sink(&board, Ipv4Addr::LOCALHOST).unwrap();
    ok(s4t(&laptop, &cfg, &["service", "create", "sink", &sink.port().to_string()]));
    let port = ok(s4t(&laptop, &cfg, &["-q", "service", "expose", "b", "sink"]));
    let public = SocketAddr::from((CLOUD_ADDR, port.trim().parse::<u16>().unwrap()));
    // The sink takes one connection: wait for the listener in the cloud's log, not by probing.
    let cloud_log = lab.proc("iotronic").unwrap();
    cloud_log.wait_for_log("public listener opened", Duration::from_secs(30)).unwrap();
    assert!(cloud_log.output().contains("tunnel server on wss://"), "no wss tunnel server");
    let (sent, _) = send_pattern(&laptop, public, 4 << 20).unwrap();
    let got = received.join().unwrap().unwrap();
    assert_eq!((got.bytes, got.sha256), (sent.bytes, sent.sha256), "the tunnel corrupted or lost data");
}
