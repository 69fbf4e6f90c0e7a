//! The paper's scenario end to end, with real processes: `iotronic serve` in the cloud
//! namespace, two `lightning-rod` boards behind NAT each with a real key-only `sshd`, and a
//! user's laptop on the Internet. Each step asserts what a user would observe:
//!
//! 1. the boards enroll and come online;
//! 2. project P leases them; project Q cannot use them, nor can another project's admin;
//! 3. an L2 VPN: A pings B, a UDP broadcast sent on A arrives on B, ARP resolves B's MAC, and
//!    the cloud host (address on the bridge) reaches both;
//! 4. an L3 VPN: A reaches B;
//! 5. SSH exposed on A and B: `ssh -p PORT cloud` from the laptop runs a command on each board;
//! 6. 100 MB over the SSH tunnel and over the L2 VPN, checksums verified;
//! 7. the cloud is killed and restarted: the boards come back online, SSH works on the same
//!    public ports and the VPNs pass traffic again, nobody touching the boards;
//! 8. a board is killed and restarted: its exposure and VPN memberships come back;
//! 9. removing a member, deleting a VPN and ending the lease remove the interfaces on both
//!    ends.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use s4t_tests::fixtures::{
    ADMIN_PASSWORD, board_config, eventually, hex, pattern_file, same, send_pattern, ssh_command, sshd_files,
    start_board, start_cloud, start_sshd, tcp_sink,
};
use s4t_tests::rest::Rest;
use s4t_tests::{CLOUD_ADDR, Host, Lab, require_root, run};
use serde_json::{Value, json};

const MB100: u64 = 100 << 20;
const ONLINE: Duration = Duration::from_secs(30);

fn rest_as(laptop: &Host, user: &str, password: &str) -> Result<Rest> {
    let mut r = Rest::new(laptop, SocketAddr::from((CLOUD_ADDR, 8812)));
    r.login(user, password)?;
    Ok(r)
}

/// `ping` from `host` until one answer comes back (the first ARP or channel set-up may lose one).
/// The sum of the samples of `metric` whose labels contain `filter` in Prometheus text.
fn metric_sum(text: &str, metric: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with(['{', ' '])) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn ping(host: &Host, to: &str) -> Result<()> {
    eventually(&format!("{} pings {to}", host.name), Duration::from_secs(20), || {
        host.sh(&format!("ping -c 1 -W 1 {to}")).map(|_| ())
    })
}

/// Interfaces of `host` whose name starts with `prefix`.
fn links(host: &Host, prefix: &str) -> Result<Vec<String>> {
    let out = host.sh("ip -o link show")?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// A UDP broadcast from `a` (bound to its VPN address) to the VPN's broadcast address,
/// received on `b`: returns the payload and sender `b` saw.
fn broadcast(a: &Host, a_addr: Ipv4Addr, b: &Host, bcast: Ipv4Addr) -> Result<(String, SocketAddr)> {
    let (tx, rx) = mpsc::channel();
    let b2 = b.clone();
    let receiver = std::thread::spawn(move || -> Result<(String, SocketAddr)> {
        b2.run(|| -> Result<(String, SocketAddr)> {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_read_timeout(Some(Duration::from_millis(300)))?;
            tx.send(s.local_addr()?.port()).ok();
            let mut buf = [0u8; 256];
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => return Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from)),
                    Err(_) if Instant::now() < deadline => continue,
                    Err(e) => bail!("no broadcast arrived: {e}"),
                }
            }
        })?
    });
    let port = rx.recv_timeout(Duration::from_secs(10)).context("receiver did not bind")?;
    // Send a few times until the receiver has one (datagrams may be lost; it stops at the first).
    a.run(|| -> Result<()> {
        let s = UdpSocket::bind((a_addr, 0))?;
        s.set_broadcast(true)?;
        for _ in 0..30 {
            s.send_to(b"hello segment", (bcast, port))?;
            if receiver.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })??;
    receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?
}

fn ssh_output(laptop: &Host, key: &std::path::Path, port: u16, remote: &str) -> Result<String> {
    run(&mut ssh_command(laptop, key, port, remote))
}

/// The address of `eth0` on the board the command ran on.
const WHERE: &str = "ip -4 -o addr show eth0";

struct Member {
    address: String,
    interface: String,
}

fn join(p: &Rest, vpn: &str, board: &str) -> Result<Member> {
    let m = p.expect(201, "POST", &format!("/v1/vpns/{vpn}/boards"), Some(&json!({"board": board})))?;
    Ok(Member {
        address: m["address"].as_str().context("address")?.to_owned(),
        interface: m["interface"].as_str().context("interface")?.to_owned(),
    })
}

fn expose_ssh(p: &Rest, board: &str) -> Result<u16> {
    let e = p.expect(
        201,
        "POST",
        &format!("/v1/boards/{board}/services/ssh/action"),
        Some(&json!({"action": "ServiceEnable"})),
    )?;
    let port = e["public_port"].as_u64().context("public_port")?;
    Ok(u16::try_from(port)?)
}

#[test]
fn boards_behind_nat_bridged_reached_by_ssh_and_recovering_alone() {
    require_root!();
    let t0 = Instant::now();
    let step = |n: &str| eprintln!("[{:>6.1}s] step {n}", t0.elapsed().as_secs_f64());
    let mut lab = Lab::new("scenario").unwrap();
    let a = lab.add_board("a").unwrap();
    let b = lab.add_board("b").unwrap();
    let laptop = lab.add_public_host("laptop").unwrap();
    let cloud = lab.cloud().clone();
    let dir = lab.dir().to_path_buf();

    // 1. Enrollment.
    step("1: enroll");
    start_cloud(&mut lab, "iotronic").unwrap();
    let admin = Rest::new(&laptop, SocketAddr::from((CLOUD_ADDR, 8812)));
    admin.wait_ready(ONLINE).unwrap();
    let admin = rest_as(&laptop, "admin", ADMIN_PASSWORD).unwrap();
    for (project, user) in [("P", "pat"), ("Q", "quinn")] {
        admin.expect(201, "POST", "/v1/projects", Some(&json!({"name": project}))).unwrap();
        let body = json!({"name": user, "password": "password-1", "project": project, "role": "manager"});
        admin.expect(201, "POST", "/v1/users", Some(&body)).unwrap();
    }
    let p = rest_as(&laptop, "pat", "password-1").unwrap();
    let q = rest_as(&laptop, "quinn", "password-1").unwrap();
    let configs: Vec<_> = ["a", "b"].iter().map(|n| board_config(&dir, n).unwrap()).collect();
    for ((host, name), cfg) in [(&a, "a"), (&b, "b")].into_iter().zip(&configs) {
        let code = format!("CODE-{name}");
        let v = p.create_board(name, &code).unwrap();
        assert_eq!(v["status"], "registered", "{v}");
        start_board(&mut lab, host, &format!("lightning-rod-{name}"), cfg, Some(&code)).unwrap();
    }
    for n in ["a", "b"] {
        p.wait_status(n, "online", ONLINE).unwrap();
    }

    // 2. Leases.
    step("2: leases");
    let lease = p.expect(201, "POST", "/v1/leases", Some(&json!({"boards": ["a", "b"], "duration": 3600}))).unwrap();
    let lease_id = lease["uuid"].as_str().unwrap().to_owned();
    let (s, v) = q.call("POST", "/v1/boards/a/action", Some(&json!({"action": "DevicePing"}))).unwrap();
    assert_eq!(s, 404, "project Q does not even see P's board: {v}");
    let (s, v) = q.call("POST", "/v1/leases", Some(&json!({"boards": ["a"], "duration": 60}))).unwrap();
    assert_eq!(s, 404, "{v}");
    let a_uuid = p.expect(200, "GET", "/v1/boards/a", None).unwrap()["uuid"].as_str().unwrap().to_owned();
    let (s, v) =
        admin.call("POST", &format!("/v1/boards/{a_uuid}/action"), Some(&json!({"action": "DevicePing"}))).unwrap();
    assert_eq!(
        (s, v["lease"].as_str()),
        (409, Some(lease_id.as_str())),
        "another project is refused, naming the lease: {v}"
    );
    let v = p.expect(200, "POST", "/v1/boards/a/action", Some(&json!({"action": "DevicePing"}))).unwrap();
    assert!(v.as_str().is_some_and(|s| s.contains(" @ ")), "P uses its board (ping answers host @ time): {v}");

    // 3. L2 VPN with the cloud host on the segment.
    step("3: L2 VPN");
    let body = json!({"name": "lab2", "type": "l2", "cidr": "10.77.0.0/24", "cloud_address": true});
    let l2 = p.expect(201, "POST", "/v1/vpns", Some(&body)).unwrap();
    assert_eq!(l2["cloud_address"], "10.77.0.1", "{l2}");
    let a2 = join(&p, "lab2", "a").unwrap();
    let b2 = join(&p, "lab2", "b").unwrap();
    assert_eq!((a2.address.as_str(), b2.address.as_str()), ("10.77.0.2", "10.77.0.3"));
    assert!(links(&a, &a2.interface).unwrap().len() == 1, "A has its VPN interface {}", a2.interface);
    ping(&a, &b2.address).unwrap();
    let neigh = a.sh(&format!("ip neigh show {} dev {}", b2.address, a2.interface)).unwrap();
    let b_mac = b.sh(&format!("cat /sys/class/net/{}/address", b2.interface)).unwrap();
    assert!(neigh.contains(b_mac.trim()), "ARP on A resolved B's MAC {}: {neigh}", b_mac.trim());
    let (payload, from) = broadcast(&a, a2.address.parse().unwrap(), &b, Ipv4Addr::new(10, 77, 0, 255)).unwrap();
    assert_eq!(
        (payload.as_str(), from.ip().to_string()),
        ("hello segment", a2.address.clone()),
        "broadcast from A on B"
    );
    ping(&cloud, &a2.address).unwrap();
    ping(&cloud, &b2.address).unwrap();
    let bridges = links(&cloud, "s4b").unwrap();
    assert_eq!(bridges.len(), 1, "one bridge per L2 VPN: {bridges:?}");
    assert_eq!(links(&cloud, "s4v").unwrap().len(), 2, "one TAP per member");

    // 4. L3 VPN.
    step("4: L3 VPN");
    let l3 = p
        .expect(201, "POST", "/v1/vpns", Some(&json!({"name": "lab3", "type": "l3", "cidr": "10.78.0.0/24"})))
        .unwrap();
    let a3 = join(&p, "lab3", "a").unwrap();
    let b3 = join(&p, "lab3", "b").unwrap();
    assert_ne!(a3.interface, a2.interface);
    ping(&a, &b3.address).unwrap();
    ping(&b, &a3.address).unwrap();
    let l3_link = a.sh(&format!("ip -o link show {}", a3.interface)).unwrap();
    assert!(l3_link.contains("link/none"), "the L3 interface is a TUN, not Ethernet: {l3_link}");

    // 5. SSH through the tunnels.
    step("5: SSH");
    let (sshd_config, key) = sshd_files(&dir).unwrap();
    start_sshd(&mut lab, &a, "sshd-a", &sshd_config).unwrap();
    start_sshd(&mut lab, &b, "sshd-b", &sshd_config).unwrap();
    p.expect(201, "POST", "/v1/services", Some(&json!({"name": "ssh", "port": 22, "protocol": "TCP"}))).unwrap();
    let port_a = expose_ssh(&p, "a").unwrap();
    let port_b = expose_ssh(&p, "b").unwrap();
    assert_ne!(port_a, port_b);
    let out = ssh_output(&laptop, &key, port_a, WHERE).unwrap();
    assert!(out.contains(&format!("{}/", a.addr)) && !out.contains(&b.addr.to_string()), "ran on A: {out}");
    let out = ssh_output(&laptop, &key, port_b, WHERE).unwrap();
    assert!(out.contains(&format!("{}/", b.addr)), "ran on B: {out}");

    // 6. 100 MB over SSH and over the L2 VPN, checksummed at the far end.
    step("6: 100 MB transfers");
    let file = dir.join("100mb");
    let digest = hex(&pattern_file(&file, MB100).unwrap());
    let started = Instant::now();
    let mut ssh = ssh_command(&laptop, &key, port_a, "sha256sum");
    let out = run(ssh.stdin(std::fs::File::open(&file).unwrap())).unwrap();
    eprintln!("100 MB over the SSH tunnel in {:?}", started.elapsed());
    assert!(out.starts_with(&digest), "A received what the laptop sent: {out} vs {digest}");
    let (addr, sink) = tcp_sink(&b, b2.address.parse().unwrap()).unwrap();
    let (sent, took) = send_pattern(&a, addr, MB100).unwrap();
    eprintln!("100 MB over the L2 VPN in {took:?}");
    same("L2 VPN A -> B", &sent, &sink.join().unwrap().unwrap()).unwrap();
    std::fs::remove_file(&file).unwrap();
    // The operator sees that traffic in /metrics (each wstun-agent reports every few seconds).
    eventually("the data plane's counters in /metrics", Duration::from_secs(20), || {
        let (status, v) = admin.call("GET", "/metrics", None)?;
        let text = v.as_str().with_context(|| format!("/metrics answered {status}: {v}"))?;
        let to_boards = metric_sum(text, "iotronic_tunnel_bytes_total", "direction=\"to_boards\"");
        let streams = metric_sum(text, "iotronic_tunnel_streams_total", "");
        let forwarded = metric_sum(text, "iotronic_vpn_packets_total", "kind=\"forwarded\"");
        let channels = metric_sum(text, "iotronic_tunnel_channels", "");
        if to_boards >= MB100 as f64 && streams >= 3.0 && forwarded >= 1.0 && channels == 2.0 {
            Ok(())
        } else {
            bail!("to boards {to_boards} B, {streams} streams, {forwarded} packets forwarded, {channels} channels")
        }
    })
    .unwrap();

    // 7. The cloud dies and comes back; nobody touches the boards.
    step("7: cloud restart");
    lab.proc("iotronic").unwrap().kill().unwrap();
    let restarted = Instant::now();
    start_cloud(&mut lab, "iotronic-restarted").unwrap();
    admin.wait_ready(ONLINE).unwrap();
    for n in ["a", "b"] {
        p.wait_status(n, "online", ONLINE).unwrap();
    }
    eventually("SSH to A on the same port", ONLINE, || ssh_output(&laptop, &key, port_a, WHERE)).unwrap();
    eventually("SSH to B on the same port", ONLINE, || ssh_output(&laptop, &key, port_b, WHERE)).unwrap();
    ping(&a, &b2.address).unwrap();
    ping(&a, &b3.address).unwrap();
    eprintln!("after the cloud restart: online, SSH and VPNs usable again in {:?}", restarted.elapsed());
    assert!(restarted.elapsed() < Duration::from_secs(60), "recovery took {:?}", restarted.elapsed());

    // 8. Board A dies and comes back: its exposure and memberships are restored.
    step("8: board restart");
    lab.proc("lightning-rod-a").unwrap().kill().unwrap();
    p.wait_status("a", "offline", ONLINE).unwrap();
    eventually("A's VPN interfaces gone with its agent", ONLINE, || match links(&a, "s4t")?.len() {
        0 => Ok(()),
        n => bail!("{n} left"),
    })
    .unwrap();
    start_board(&mut lab, &a, "lightning-rod-a-restarted", &configs[0], None).unwrap();
    p.wait_status("a", "online", ONLINE).unwrap();
    let out = eventually("SSH to A after its restart", ONLINE, || ssh_output(&laptop, &key, port_a, WHERE)).unwrap();
    assert!(out.contains(&format!("{}/", a.addr)), "{out}");
    ping(&b, &a2.address).unwrap();
    ping(&b, &a3.address).unwrap();

    // 9. Teardown on both ends.
    step("9: teardown");
    p.expect(204, "DELETE", "/v1/vpns/lab2/boards/b", None).unwrap();
    assert!(links(&b, &b2.interface).unwrap().is_empty(), "B left the L2 VPN");
    eventually("the cloud's TAP of B removed", Duration::from_secs(10), || match links(&cloud, "s4v")?.len() {
        3 => Ok(()),
        n => bail!("{n} cloud devices"),
    })
    .unwrap();
    p.expect(204, "DELETE", &format!("/v1/vpns/{}", l3["uuid"].as_str().unwrap()), None).unwrap();
    assert!(links(&a, &a3.interface).unwrap().is_empty() && links(&b, &b3.interface).unwrap().is_empty());
    p.expect(204, "DELETE", &format!("/v1/leases/{lease_id}"), None).unwrap();
    eventually("every VPN interface gone", Duration::from_secs(15), || {
        let left = [links(&cloud, "s4v")?, links(&cloud, "s4b")?, links(&a, "s4t")?, links(&b, "s4t")?].concat();
        if left.is_empty() { Ok(()) } else { bail!("left: {left:?}") }
    })
    .unwrap();
    let members = p.expect(200, "GET", "/v1/vpns/lab2/boards", None).unwrap();
    assert_eq!(members["members"], json!([]), "{members}");
    let exposed = p.expect(200, "GET", "/v1/boards/a/services", None).unwrap();
    assert_eq!(exposed["exposed"], Value::Array(vec![]), "the lease took the exposure with it");
    step("done");
}
