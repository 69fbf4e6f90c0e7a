//! `s4t` as a user runs it: from a laptop on the Internet, against `iotronic serve` in the
//! cloud namespace, with `lightning-rod` boards behind NAT and a real `sshd` (key-only) on
//! board a. Proves `s4t ssh BOARD -- CMD` runs CMD on that board, that `ssh-proxy` and
//! `ssh-config` make plain `ssh`, `scp` and `rsync` work, that `s4t bridge` books the boards
//! and puts them in one VPN, and that an offline board gets an error that says so.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use s4t_tests::fixtures::{ok, s4t};
use s4t_tests::{CLOUD_ADDR, Lab, require_root, run, workspace_bin};

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
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n",
            d.display()
        ),
    )
    .unwrap();
    // sshd insists on its privilege-separation directory.
    fs::create_dir_all("/run/sshd").unwrap();
    (config, d.join("user_key"))
}

#[test]
fn s4t_ssh_reaches_a_board_behind_nat_and_bridge_joins_two() {
    require_root!();
    let mut lab = Lab::new("cli").unwrap();
    let a = lab.add_board("a").unwrap();
    let b = lab.add_board("b").unwrap();
    let laptop = lab.add_public_host("laptop").unwrap();
    let cloud = lab.cloud().clone();
    let dir = lab.dir().to_path_buf();
    let cfg = dir.join("laptop").join("s4t.toml");

    let mut iot = cloud.command(workspace_bin("iotronic").unwrap());
    iot.args(["serve", "--plaintext", "--bind", &CLOUD_ADDR.to_string(), "--data-dir"])
        .arg(dir.join("cloud"))
        .env("IOTRONIC_ADMIN_PASSWORD", PASSWORD);
    lab.spawn("iotronic", iot).unwrap();
    laptop.wait_tcp(SocketAddr::from((CLOUD_ADDR, 8812)), Duration::from_secs(30)).unwrap();

    let url = format!("http://{CLOUD_ADDR}:8812");
    ok(s4t(&laptop, &cfg, &["login", "--url", &url, "--user", "admin"]));
    for (host, name) in [(&a, "a"), (&b, "b")] {
        let code = format!("CODE-{name}");
        ok(s4t(&laptop, &cfg, &["board", "create", name, "--code", &code]));
        let bcfg = board_config(&dir, name);
        let mut enroll = host.command(workspace_bin("lightning-rod").unwrap());
        enroll.args(["enroll", "--url", &format!("ws://{CLOUD_ADDR}:8181/"), "--code", &code, "--config"]).arg(&bcfg);
        run(&mut enroll).unwrap();
        let mut agent = host.command(workspace_bin("lightning-rod").unwrap());
        agent.args(["run", "--config"]).arg(&bcfg);
        lab.spawn(&format!("lightning-rod-{name}"), agent).unwrap();
    }
    ok(s4t(&laptop, &cfg, &["board", "wait", "a", "--timeout", "30s"]));
    ok(s4t(&laptop, &cfg, &["board", "wait", "b", "--timeout", "30s"]));

    // A real sshd on board a, reachable only through the tunnel.
    let (sshd_config, key) = sshd_files(&dir);
    let mut sshd = a.command("/usr/sbin/sshd");
    sshd.args(["-D", "-e", "-f"]).arg(&sshd_config);
    lab.spawn("sshd-a", sshd).unwrap();
    a.wait_tcp(SocketAddr::from(([127, 0, 0, 1], 22)), Duration::from_secs(10)).unwrap();
    let key = key.display().to_string();
    let ssh_opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"];

    // One command from nothing to a command on the board: the service and its exposure are
    // created on the way, and the output is a's own LAN address.
    let mut args = vec!["ssh", "a", "-l", "root", "-i", &key];
    for o in ssh_opts.chunks(2) {
        args.extend(["-o", o[1]]);
    }
    args.extend(["--", "ip", "-4", "-o", "addr", "show", "eth0"]);
    let out = ok(s4t(&laptop, &cfg, &args));
    assert!(out.contains(&format!("{}/", a.addr)), "the command did not run on board a: {out}");
    assert!(!out.contains(&b.addr.to_string()));
    let exposed = ok(s4t(&laptop, &cfg, &["service", "list", "--board", "a", "--json"]));
    assert!(exposed.contains("\"service_name\": \"ssh\""), "{exposed}");

    // ssh-config + ssh-proxy: plain ssh, scp and rsync by board name.
    let ssh_config = dir.join("laptop").join("ssh_config");
    fs::write(&ssh_config, ok(s4t(&laptop, &cfg, &["ssh-config", "a", "-l", "root"]))).unwrap();
    let plain = |program: &str, extra: &[&str]| -> String {
        let mut cmd = laptop.command(program);
        cmd.env("S4T_CONFIG", &cfg).args(extra);
        run(&mut cmd).unwrap()
    };
    let f = ssh_config.display().to_string();
    let mut ssh_args = vec!["-F", &f, "-i", &key];
    ssh_args.extend(ssh_opts);
    let mut hostname_args = ssh_args.clone();
    hostname_args.extend(["a", "ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(plain("ssh", &hostname_args).contains(&format!("{}/", a.addr)), "ssh through ssh-proxy");
    let payload = dir.join("payload.txt");
    fs::write(&payload, "sent through the tunnel\n").unwrap();
    let target = dir.join("received-by-scp.txt");
    let mut scp_args = ssh_args.clone();
    let (src, dst) = (payload.display().to_string(), format!("a:{}", target.display()));
    scp_args.extend([src.as_str(), dst.as_str()]);
    plain("scp", &scp_args);
    assert_eq!(fs::read_to_string(&target).unwrap(), "sent through the tunnel\n");
    let rsync_dst = dir.join("received-by-rsync.txt");
    let rsh = format!("ssh {}", ssh_args.join(" "));
    plain("rsync", &["-e", &rsh, &src, &format!("a:{}", rsync_dst.display())]);
    assert_eq!(fs::read_to_string(&rsync_dst).unwrap(), "sent through the tunnel\n");

    // bridge: books both boards and joins them in one L2 VPN.
    let bridged = ok(s4t(&laptop, &cfg, &["bridge", "a", "b", "--cidr", "10.77.0.0/24", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&bridged).unwrap();
    assert!(v["lease"].is_string(), "the boards were booked: {v}");
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{v}");
    for m in members {
        assert!(m["address"].as_str().unwrap().starts_with("10.77.0."), "{v}");
    }
    let again = ok(s4t(&laptop, &cfg, &["bridge", "a", "b", "--cidr", "10.77.0.0/24", "--json"]));
    let w: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!((w["lease"].is_null(), &w["members"]), (true, &v["members"]), "bridge again changes nothing: {w}");

    // An offline board: the error says since when and what to do.
    lab.proc("lightning-rod-a").unwrap().kill().unwrap();
    ok(s4t(&laptop, &cfg, &["board", "wait", "a", "--status", "offline", "--timeout", "30s"]));
    let out = s4t(&laptop, &cfg, &["ssh", "a", "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("board a is offline since"), "{err}");
}
