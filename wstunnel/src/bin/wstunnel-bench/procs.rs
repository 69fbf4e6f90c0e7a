//! Starting the tunnel processes under test and reading their CPU time and memory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// A tunnel process; killed on drop.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(program: &Path, args: &[String]) -> Result<Proc> {
        Proc::spawn_env(program, args, &[])
    }

    /// [`spawn`](Proc::spawn) with extra environment variables.
    pub fn spawn_env(program: &Path, args: &[String], env: &[(&str, &str)]) -> Result<Proc> {
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", std::env::var("BENCH_LOG").unwrap_or_else(|_| "error".into()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {} {args:?}", program.display()))?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).await.is_err() {
                    // Nobody listens any more: keep draining so the child never blocks.
                    while let Ok(Some(_)) = lines.next_line().await {}
                    return;
                }
            }
        });
        Ok(Proc { child, lines: rx })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Waits for a stdout line starting with `prefix` and returns the rest.
    pub async fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .with_context(|| format!("no line starting with {prefix:?} within {timeout:?}"))?
                .context("the process exited")?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.to_owned());
            }
        }
    }
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// User + system CPU time in seconds.
pub fn cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

pub fn sum_rss(pids: &[u32]) -> u64 {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

pub fn sum_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_s(*p)).sum()
}

/// The `wstunnel` binary next to this one.
pub fn our_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe dir")?.join("wstunnel");
    if !p.is_file() {
        bail!("{} not found: build it with `cargo build --release -p wstunnel`", p.display());
    }
    Ok(p)
}

/// A free port on 127.0.0.1 (for tools that cannot be told to use port 0).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Raises the open-file limit so a thousand held connections fit.
pub fn raise_nofile() {
    let lim = libc::rlimit { rlim_cur: 65_536, rlim_max: 65_536 };
    // SAFETY: setrlimit with a valid struct; failure is harmless (the hold test reports it).
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}
