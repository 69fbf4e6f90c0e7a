//! Pieces the end-to-end scenario and its benchmark share: board configuration, a key-only
//! `sshd`, the cloud and board processes, and checksummed TCP transfers between namespaces.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{CLOUD_ADDR, Host, Lab, run, workspace_bin};

/// The admin password every lab cloud starts with.
pub const ADMIN_PASSWORD: &str = "lab-admin-password";

/// Runs `s4t ARGS` on `host` with the configuration file `config` and the lab's admin
/// password; nothing else from the environment (no URL, token or CA pin).
pub fn s4t(host: &Host, config: &Path, args: &[&str]) -> Output {
    let mut cmd = host.command(workspace_bin("s4t").expect("the s4t binary is built"));
    cmd.args(args)
        .env("S4T_CONFIG", config)
        .env("S4T_PASSWORD", ADMIN_PASSWORD)
        .env_remove("S4T_URL")
        .env_remove("S4T_TOKEN")
        .env_remove("S4T_CA_FINGERPRINT");
    cmd.output().expect("s4t runs")
}

/// The stdout of a command that must have succeeded (else a panic showing both outputs).
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A lightning-rod configuration in `dir/NAME/` with the sim HAL and fast reconnects.
pub fn board_config(dir: &Path, name: &str) -> Result<PathBuf> {
    let d = dir.join(name);
    fs::create_dir_all(&d)?;
    let p = d.join("config.toml");
    let cfg = format!(
        "[cloud]\nlegacy_settings = \"{0}/none.json\"\nlegacy_conf = \"{0}/none.conf\"\n[board]\nstate_dir = \"{0}/state\"\n\
         [hal]\nbackend = \"sim\"\n[timers]\nbackoff_initial_ms = 50\nbackoff_max_s = 1\n",
        d.display()
    );
    fs::write(&p, cfg)?;
    Ok(p)
}

/// Host and user keys and an sshd configuration accepting only the user key (as root), in
/// `dir/sshd/`. Returns the configuration and the user's private key.
pub fn sshd_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let d = dir.join("sshd");
    fs::create_dir_all(&d)?;
    for key in ["host_key", "user_key"] {
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(d.join(key)))?;
    }
    fs::copy(d.join("user_key.pub"), d.join("authorized_keys"))?;
    let config = d.join("sshd_config");
    fs::write(
        &config,
        format!(
            "Port 22\nHostKey {0}/host_key\nAuthorizedKeysFile {0}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n",
            d.display()
        ),
    )?;
    // sshd insists on its privilege-separation directory.
    fs::create_dir_all("/run/sshd")?;
    Ok((config, d.join("user_key")))
}

/// Starts a key-only sshd on `host` port 22 under `name` and waits until it listens.
pub fn start_sshd(lab: &mut Lab, host: &Host, name: &str, config: &Path) -> Result<()> {
    let mut sshd = host.command("/usr/sbin/sshd");
    sshd.args(["-D", "-e", "-f"]).arg(config);
    lab.spawn(name, sshd)?;
    host.wait_tcp(SocketAddr::from(([127, 0, 0, 1], 22)), Duration::from_secs(10))
}

/// `ssh` options for a lab: no host key prompts, no password prompts.
pub fn ssh_command(from: &Host, key: &Path, port: u16, remote: &str) -> Command {
    let mut cmd = from.command("ssh");
    cmd.args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-i"])
        .arg(key)
        .args(["-p", &port.to_string(), &format!("root@{CLOUD_ADDR}"), remote]);
    cmd
}

/// Starts `iotronic serve` (plaintext, all listeners on the cloud address) under `name`.
pub fn start_cloud(lab: &mut Lab, name: &str) -> Result<()> {
    let dir = lab.dir().join("cloud");
    let mut iot = lab.cloud().command(workspace_bin("iotronic")?);
    iot.args(["serve", "--plaintext", "--bind", &CLOUD_ADDR.to_string(), "--data-dir"])
        .arg(dir)
        .env("IOTRONIC_ADMIN_PASSWORD", ADMIN_PASSWORD);
    lab.spawn(name, iot)?;
    Ok(())
}

/// Enrolls (when `code` is given) and starts `lightning-rod run` on `host` under `name`.
pub fn start_board(lab: &mut Lab, host: &Host, name: &str, config: &Path, code: Option<&str>) -> Result<()> {
    if let Some(code) = code {
        let mut enroll = host.command(workspace_bin("lightning-rod")?);
        enroll.args(["enroll", "--url", &format!("ws://{CLOUD_ADDR}:8181/"), "--code", code, "--config"]).arg(config);
        run(&mut enroll)?;
    }
    let mut agent = host.command(workspace_bin("lightning-rod")?);
    agent.args(["run", "--config"]).arg(config);
    lab.spawn(name, agent)?;
    Ok(())
}

/// Retries `f` until it succeeds or `timeout` passes; the last error explains the failure.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e.context(format!("{what}: not within {timeout:?}"))),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The bytes [`send_pattern`] sends: a xorshift stream (incompressible, reproducible).
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// What a sink received: byte count and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// A one-connection TCP sink on `host` at `bind` (port 0: any): returns the bound address and
/// a thread that yields what the first connection sent until EOF.
pub fn tcp_sink(host: &Host, bind: Ipv4Addr) -> Result<(SocketAddr, JoinHandle<Result<Received>>)> {
    let (tx, rx) = mpsc::channel();
    let host = host.clone();
    let t = std::thread::spawn(move || -> Result<Received> {
        host.run(|| -> Result<Received> {
            let l = TcpListener::bind((bind, 0))?;
            tx.send(l.local_addr()?).ok();
            let (mut s, _) = l.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            let (mut h, mut n, mut buf) = (Sha256::new(), 0u64, vec![0u8; 256 << 10]);
            loop {
                let k = s.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                n += k as u64;
            }
            Ok(Received { bytes: n, sha256: h.finalize().into() })
        })?
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).context("the sink did not bind")?;
    Ok((addr, t))
}

/// Sends `bytes` of the pattern from `host` to `to`; returns what was sent and how long it took.
pub fn send_pattern(host: &Host, to: SocketAddr, bytes: u64) -> Result<(Received, Duration)> {
    host.run(|| -> Result<(Received, Duration)> {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        let (mut h, mut p, mut buf) = (Sha256::new(), Pattern(0x5eed_cafe_f00d), vec![0u8; 256 << 10]);
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            p.fill(&mut buf[..k]);
            s.write_all(&buf[..k])?;
            h.update(&buf[..k]);
            left -= k as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        // Wait for the sink to close: everything arrived.
        let _ = s.read(&mut [0u8; 1]);
        Ok((Received { bytes, sha256: h.finalize().into() }, start.elapsed()))
    })?
}

/// Writes `bytes` of the pattern into a file (for transfers through programs like ssh).
pub fn pattern_file(path: &Path, bytes: u64) -> Result<[u8; 32]> {
    let mut f = fs::File::create(path)?;
    let (mut h, mut p, mut buf) = (Sha256::new(), Pattern(0x5eed_cafe_f00d), vec![0u8; 256 << 10]);
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..k]);
        f.write_all(&buf[..k])?;
        h.update(&buf[..k]);
        left -= k as u64;
    }
    Ok(h.finalize().into())
}

/// Lower-case hex.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fails unless `got` equals `want`, naming the path.
pub fn same(path: &str, want: &Received, got: &Received) -> Result<()> {
    if want != got {
        bail!(
            "{path}: sent {} bytes sha256 {}, received {} bytes sha256 {}",
            want.bytes,
            hex(&want.sha256),
            got.bytes,
            hex(&got.sha256)
        );
    }
    Ok(())
}
