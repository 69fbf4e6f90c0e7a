//! A throw-away network lab for end-to-end tests.
//!
//! # Topology
//!
//! ```text
//!                       cloud namespace  (br0 203.0.113.1/24, "the Internet")
//!             ┌──────────────┼─────────────────┬──────────────────┐
//!   router r1 wan0 203.0.113.11   router r2 wan0 203.0.113.12   public host 203.0.113.101
//!   (MASQUERADE, inbound REJECT)  (same)                        (a user's laptop)
//!             │ lan0 198.51.100.17/28         │ lan0 198.51.100.33/28
//!   board a  eth0 198.51.100.18        board b eth0 198.51.100.34
//! ```
//!
//! Boards reach the cloud through their router's NAT; nothing on the wan side can open a
//! connection to a board, even though the cloud has a route to every board LAN (as an attacker
//! on the path would). Addresses come from the RFC 5737 documentation ranges.
//!
//! # Use
//!
//! [`Lab::new`] requires root; call [`require_root!`] first so a non-root developer run skips
//! with a message, while a CI run (`CI` set) fails instead of silently skipping. Every
//! namespace, process and log file is removed when the [`Lab`] drops, also when the test
//! panics; on a panic the tail of every process log is printed first.

use std::fs;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod boards;
pub mod fixtures;
pub mod rest;

/// The cloud's address on the lab's "Internet".
pub const CLOUD_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// Skips the calling test when not root, unless `CI` is set: there it fails, so that tests
/// which need root can never pass CI by being skipped.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            if std::env::var_os("CI").is_some() {
                panic!("this test needs root and CI is set: run CI as root");
            }
            eprintln!("SKIPPED: this test needs root (network namespaces)");
            return;
        }
    };
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One host of the lab: a network namespace and its address on its own segment.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// The namespace name (under /var/run/netns).
    pub netns: String,
    /// The host's address: on the wan for the cloud and public hosts, on its LAN for a board.
    pub addr: Ipv4Addr,
    /// For a board: its router's wan address, which is what the cloud sees as its source.
    pub public_addr: Ipv4Addr,
}

impl Host {
    /// Runs `f` on a thread that has entered this host's network namespace. Sockets created
    /// inside `f` stay in the namespace wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.netns);
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<T> {
                    let ns = fs::File::open(&path).with_context(|| format!("open {path}"))?;
                    // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error()).context("setns");
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the closure run in {} panicked", self.netns))?
        })
    }

    /// A command that will run inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// Runs a short command in the namespace and returns its stdout; fails on a non-zero exit.
    pub fn sh(&self, script: &str) -> Result<String> {
        run(self.command("sh").args(["-c", script]))
    }

    /// Opens a TCP connection from inside this namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&addr, timeout)).map_err(io::Error::other)?
    }

    /// Waits until a TCP connect from this namespace to `addr` succeeds (the server is ready),
    /// polling until `timeout`.
    pub fn wait_tcp(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.connect(addr, Duration::from_millis(500)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!("{addr} did not accept connections from {} within {timeout:?}: {e}", self.name)
                }
                Err(_) => wait_a_little(),
            }
        }
    }
}

/// A process started in a namespace; killed when the lab drops.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's combined stdout and stderr so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` or the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited with {status} before logging {needle:?}:\n{}", self.name, self.output());
            }
            if Instant::now() >= deadline {
                bail!("{} did not log {needle:?} within {timeout:?}:\n{}", self.name, self.output());
            }
            wait_a_little();
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill()?;
                bail!("{} ignored SIGTERM for {timeout:?}", self.name);
            }
            wait_a_little();
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
}

/// A set of namespaces wired as in the module docs. Dropping it tears everything down.
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    cloud: Host,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    routers: u8,
    publics: u8,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Creates the cloud namespace and the lab's "Internet" bridge. Needs root.
    pub fn new(test_name: &str) -> Result<Lab> {
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("s4t{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{prefix}-{test_name}"));
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let cloud =
            Host { name: "cloud".into(), netns: format!("{prefix}-cloud"), addr: CLOUD_ADDR, public_addr: CLOUD_ADDR };
        let mut lab = Lab {
            prefix,
            dir,
            cloud: cloud.clone(),
            namespaces: Vec::new(),
            procs: Vec::new(),
            routers: 0,
            publics: 0,
        };
        lab.add_namespace(&cloud.netns)?;
        cloud
            .sh(&format!("ip link add br0 type bridge && ip link set br0 up && ip addr add {CLOUD_ADDR}/24 dev br0"))?;
        Ok(lab)
    }

    pub fn cloud(&self) -> &Host {
        &self.cloud
    }

    /// Directory for the lab's logs and any files a test wants to keep beside them.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds a board behind its own NAT router. At most 15 boards per lab.
    pub fn add_board(&mut self, name: &str) -> Result<Host> {
        if self.routers >= 15 {
            bail!("a lab holds at most 15 boards");
        }
        self.routers += 1;
        let i = self.routers;
        let router = format!("{}-r{i}", self.prefix);
        let board = format!("{}-b{i}", self.prefix);
        let wan = Ipv4Addr::new(203, 0, 113, 10 + i);
        let lan_gw = Ipv4Addr::new(198, 51, 100, 16 * i + 1);
        let lan_net = Ipv4Addr::new(198, 51, 100, 16 * i);
        let addr = Ipv4Addr::new(198, 51, 100, 16 * i + 2);
        self.add_namespace(&router)?;
        self.add_namespace(&board)?;
        self.attach_to_wan(&router, "wan0", wan)?;
        run(Command::new("ip")
            .args(["-n", &router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &board]))?;
        let router_host = Host { name: format!("router-{name}"), netns: router.clone(), addr: wan, public_addr: wan };
        router_host.sh(&format!(
            "ip addr add {lan_gw}/28 dev lan0 && ip link set lan0 up && \
             sysctl -qw net.ipv4.ip_forward=1 && \
             iptables -t nat -A POSTROUTING -o wan0 -j MASQUERADE && \
             iptables -P FORWARD DROP && \
             iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && \
             iptables -A FORWARD -i lan0 -o wan0 -j ACCEPT && \
             iptables -A FORWARD -j REJECT && \
             iptables -A INPUT -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && \
             iptables -A INPUT -i wan0 -j REJECT"
        ))?;
        let host = Host { name: name.into(), netns: board, addr, public_addr: wan };
        host.sh(&format!(
            "ip addr add {addr}/28 dev eth0 && ip link set eth0 up && ip route add default via {lan_gw}"
        ))?;
        // The cloud knows a route to the board LAN, as an attacker on the path would: only the
        // router's firewall keeps inbound connections out.
        self.cloud.sh(&format!("ip route add {lan_net}/28 via {wan}"))?;
        Ok(host)
    }

    /// Adds a host directly on the lab's Internet (a user's laptop). At most 100.
    pub fn add_public_host(&mut self, name: &str) -> Result<Host> {
        if self.publics >= 100 {
            bail!("a lab holds at most 100 public hosts");
        }
        self.publics += 1;
        let netns = format!("{}-p{}", self.prefix, self.publics);
        let addr = Ipv4Addr::new(203, 0, 113, 100 + self.publics);
        self.add_namespace(&netns)?;
        self.attach_to_wan(&netns, "eth0", addr)?;
        Ok(Host { name: name.into(), netns, addr, public_addr: addr })
    }

    /// Starts `cmd` (built with [`Host::command`]) with stdout and stderr in a log file.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<&mut Proc> {
        let log = self.dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        self.procs.push(Proc { name: name.into(), log, child });
        Ok(self.procs.last_mut().expect("just pushed"))
    }

    pub fn proc(&mut self, name: &str) -> Option<&mut Proc> {
        self.procs.iter_mut().find(|p| p.name == name)
    }

    fn add_namespace(&mut self, netns: &str) -> Result<()> {
        run(Command::new("ip").args(["netns", "add", netns]))?;
        self.namespaces.push(netns.to_owned());
        run(Command::new("ip").args(["-n", netns, "link", "set", "lo", "up"]))?;
        Ok(())
    }

    fn attach_to_wan(&self, netns: &str, ifname: &str, addr: Ipv4Addr) -> Result<()> {
        let peer = format!("w{}", self.namespaces.len());
        run(Command::new("ip").args([
            "-n",
            &self.cloud.netns,
            "link",
            "add",
            &peer,
            "type",
            "veth",
            "peer",
            "name",
            ifname,
            "netns",
            netns,
        ]))?;
        self.cloud.sh(&format!("ip link set {peer} master br0 && ip link set {peer} up"))?;
        run(Command::new("ip").args(["-n", netns, "addr", "add", &format!("{addr}/24"), "dev", ifname]))?;
        run(Command::new("ip").args(["-n", netns, "link", "set", ifname, "up"]))?;
        Ok(())
    }

    fn print_logs(&self) {
        for p in &self.procs {
            let text = fs::read_to_string(&p.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            eprintln!("===== last {} lines of {} ({}) =====", tail.len(), p.name, p.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        // Anything the processes left behind (children, daemons) dies with its namespace.
        for ns in self.namespaces.iter().rev() {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on a pid inside a namespace this lab created.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs a command to completion; returns stdout, or an error with stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Locates a binary of this workspace (`iotronic`, `lightning-rod`, `wstunnel`, `s4t`):
/// `$S4T_BIN_DIR/NAME`, else next to the test executable's `deps/` folder. Build them first
/// with `cargo build --workspace --bins` (the README's test command does).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("S4T_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("current_exe")?;
            let deps = exe.parent().context("test executable has no parent")?;
            deps.parent().context("deps has no parent")?.to_path_buf()
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!("{} not found: run `cargo build --workspace --bins` first or set S4T_BIN_DIR", path.display());
    }
    Ok(path)
}

/// Reads until EOF or `limit` bytes.
pub fn read_to_end_limited(stream: &mut impl Read, limit: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    stream.take(limit as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// The pause between two polls of a condition that has a deadline.
pub fn wait_a_little() {
    std::thread::sleep(Duration::from_millis(20));
}
