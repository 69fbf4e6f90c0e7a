//! Throughput and latency of the paths of the paper's scenario, in one run on one lab (needs
//! root): `iotronic serve` in the cloud namespace, boards A and B behind NAT, an L2 and an L3
//! VPN with both, TCP services of B exposed through its reverse tunnel, and a real sshd on B.
//!
//! Paths, all from board A unless said otherwise:
//! - `direct`: A to a server in the cloud namespace, through A's NAT, no tunnel (the network
//!   every other path runs over);
//! - `tunnel`: A to the cloud's public port of B's exposed service, through B's reverse tunnel
//!   (what SSH to a board runs over);
//! - `ssh`: the laptop runs `ssh -p PORT cloud 'cat > /dev/null'` into B's sshd through the
//!   tunnel (throughput only; adds SSH's encryption);
//! - `l2-vpn` and `l3-vpn`: A to B's VPN address (A's TAP/TUN, A's channel, the cloud's
//!   TAP + bridge or TUN routing, B's channel, B's TAP/TUN).
//!
//! Throughput: one TCP connection sending `--mb` MiB (default 100) until the receiver has read
//! it all. Latency: `--rtts` (default 500) 1-byte request/response round trips on one TCP
//! connection, p50/p99/max. Prints a table and one JSON line. Uses the binaries of
//! `S4T_BIN_DIR` (default: next to this executable), so build them in the profile to measure:
//!
//! ```sh
//! cargo build --release -p iotronic -p lightning-rod -p s4t-tests --bins
//! sudo ./target/release/scenario-bench --mb 100
//! ```

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use s4t_tests::fixtures::{
    ADMIN_PASSWORD, board_config, eventually, pattern_file, ssh_command, sshd_files, start_board, start_cloud,
    start_sshd,
};
use s4t_tests::rest::Rest;
use s4t_tests::{CLOUD_ADDR, Host, Lab, is_root, run};
use serde_json::json;

/// A server on `host` (all addresses, any port) that serves each connection by its first
/// byte: `S` reads to EOF then answers one byte (sink), `E` echoes every byte (latency).
fn server(host: &Host) -> Result<u16> {
    let (tx, rx) = mpsc::channel();
    let host = host.clone();
    std::thread::spawn(move || {
        let _ = host.run(|| -> Result<()> {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            tx.send(l.local_addr()?.port()).ok();
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || -> std::io::Result<()> {
                    s.set_nodelay(true)?;
                    let mut mode = [0u8; 1];
                    s.read_exact(&mut mode)?;
                    let mut buf = vec![0u8; 256 << 10];
                    if mode[0] == b'S' {
                        while s.read(&mut buf)? > 0 {}
                        s.write_all(b"k")?;
                    } else {
                        loop {
                            let n = s.read(&mut buf)?;
                            if n == 0 {
                                return Ok(());
                            }
                            s.write_all(&buf[..n])?;
                        }
                    }
                    Ok(())
                });
            }
            Ok(())
        });
    });
    rx.recv_timeout(Duration::from_secs(10)).context("server did not bind")
}

/// MiB/s of one connection from `host` to `to` sending `mb` MiB.
fn throughput(host: &Host, to: SocketAddr, mb: u64) -> Result<f64> {
    host.run(|| -> Result<f64> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        let mut buf = vec![0u8; 256 << 10];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        let start = Instant::now();
        s.write_all(b"S")?;
        for _ in 0..mb * 4 {
            s.write_all(&buf)?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut k = [0u8; 1];
        s.read_exact(&mut k).context("the sink did not confirm")?;
        Ok(mb as f64 / start.elapsed().as_secs_f64())
    })?
}

/// p50, p99, max of `n` 1-byte round trips, in microseconds.
fn latency(host: &Host, to: SocketAddr, n: usize) -> Result<(u64, u64, u64)> {
    host.run(|| -> Result<(u64, u64, u64)> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        s.set_nodelay(true)?;
        s.write_all(b"E")?;
        let mut rtts = Vec::with_capacity(n);
        let mut b = [0u8; 1];
        for i in 0..n + 20 {
            let t = Instant::now();
            s.write_all(&[i as u8])?;
            s.read_exact(&mut b)?;
            if i >= 20 {
                rtts.push(t.elapsed().as_micros() as u64); // the first 20 warm up
            }
        }
        rtts.sort_unstable();
        Ok((rtts[n / 2], rtts[n * 99 / 100], rtts[n - 1]))
    })?
}

fn arg(args: &[String], name: &str, default: u64) -> Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).context("missing value")?.parse().with_context(|| name.to_owned()),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("scenario-bench [--mb MIB] [--rtts N]   (root; see the source's header)");
        return Ok(());
    }
    if !is_root() {
        bail!("scenario-bench needs root (network namespaces)");
    }
    let (mb, rtts) = (arg(&args, "--mb", 100)?, arg(&args, "--rtts", 500)? as usize);
    let mut lab = Lab::new("bench")?;
    let a = lab.add_board("a")?;
    let b = lab.add_board("b")?;
    let laptop = lab.add_public_host("laptop")?;
    let dir = lab.dir().to_path_buf();
    start_cloud(&mut lab, "iotronic")?;
    let mut p = Rest::new(&laptop, SocketAddr::from((CLOUD_ADDR, 8812)));
    p.wait_ready(Duration::from_secs(30))?;
    p.login("admin", ADMIN_PASSWORD)?;
    for (host, name) in [(&a, "a"), (&b, "b")] {
        let code = format!("CODE-{name}");
        p.create_board(name, &code)?;
        let cfg = board_config(&dir, name)?;
        start_board(&mut lab, host, &format!("lightning-rod-{name}"), &cfg, Some(&code))?;
    }
    for n in ["a", "b"] {
        p.wait_status(n, "online", Duration::from_secs(30))?;
    }
    let mut vpn_addr = Vec::new();
    for (name, ty, cidr) in [("l2", "l2", "10.77.0.0/24"), ("l3", "l3", "10.78.0.0/24")] {
        p.expect(201, "POST", "/v1/vpns", Some(&json!({"name": name, "type": ty, "cidr": cidr})))?;
        p.expect(201, "POST", &format!("/v1/vpns/{name}/boards"), Some(&json!({"board": "a"})))?;
        let m = p.expect(201, "POST", &format!("/v1/vpns/{name}/boards"), Some(&json!({"board": "b"})))?;
        vpn_addr.push(m["address"].as_str().context("address")?.parse::<Ipv4Addr>()?);
    }
    let on_b = server(&b)?;
    let in_cloud = server(lab.cloud())?;
    p.expect(201, "POST", "/v1/services", Some(&json!({"name": "bench", "port": on_b, "protocol": "TCP"})))?;
    p.expect(201, "POST", "/v1/services", Some(&json!({"name": "ssh", "port": 22, "protocol": "TCP"})))?;
    let mut public = Vec::new();
    for s in ["bench", "ssh"] {
        let e = p.expect(
            201,
            "POST",
            &format!("/v1/boards/b/services/{s}/action"),
            Some(&json!({"action": "ServiceEnable"})),
        )?;
        public.push(u16::try_from(e["public_port"].as_u64().context("public_port")?)?);
    }
    let (sshd_config, key) = sshd_files(&dir)?;
    start_sshd(&mut lab, &b, "sshd-b", &sshd_config)?;

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let paths = [
        ("direct", SocketAddr::from((CLOUD_ADDR, in_cloud))),
        ("tunnel", SocketAddr::from((CLOUD_ADDR, public[0]))),
        ("l2-vpn", SocketAddr::from((vpn_addr[0], on_b))),
        ("l3-vpn", SocketAddr::from((vpn_addr[1], on_b))),
    ];
    for (name, to) in paths {
        eventually(name, Duration::from_secs(20), || latency(&a, to, 5))?; // path up
    }
    println!("scenario-bench: {mb} MiB per transfer, {rtts} round trips, load average {}", load.trim());
    println!("{:<8} {:>10} {:>10} {:>10} {:>10}", "path", "MiB/s", "p50 µs", "p99 µs", "max µs");
    let mut json = serde_json::Map::new();
    for (name, to) in paths {
        let t = throughput(&a, to, mb)?;
        let (p50, p99, max) = latency(&a, to, rtts)?;
        println!("{name:<8} {t:>10.1} {p50:>10} {p99:>10} {max:>10}");
        json.insert(name.into(), json!({"mib_s": t, "p50_us": p50, "p99_us": p99, "max_us": max}));
    }
    let file = dir.join("payload");
    pattern_file(&file, mb << 20)?;
    eventually("ssh up", Duration::from_secs(20), || run(&mut ssh_command(&laptop, &key, public[1], "true")))?;
    let start = Instant::now();
    run(ssh_command(&laptop, &key, public[1], "cat > /dev/null").stdin(std::fs::File::open(&file)?))?;
    let t = mb as f64 / start.elapsed().as_secs_f64();
    println!("{:<8} {t:>10.1} {:>10} {:>10} {:>10}", "ssh", "-", "-", "-");
    json.insert("ssh".into(), json!({"mib_s": t}));
    let ratio = json["l2-vpn"]["mib_s"].as_f64().unwrap_or(0.0) / json["tunnel"]["mib_s"].as_f64().unwrap_or(1.0);
    println!("L2 VPN / plain tunnel throughput: {:.0}% (target >= 50%)", ratio * 100.0);
    json.insert("l2_over_tunnel".into(), json!(ratio));
    json.insert("load_average".into(), json!(load.trim()));
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}
