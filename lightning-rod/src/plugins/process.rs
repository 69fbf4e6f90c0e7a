//! Process plugins (an executable or script) and legacy Python plugins (the original `Worker`
//! class run by `python3` through `python_runner.py`): children of the agent, never inside it.
//!
//! Each run gets a private scratch directory holding its code, owned by `plugins.run_as`,
//! removed afterwards. The plugin runs as that user, with an empty environment but `PATH`,
//! `HOME` and `S4T_*`, parameters as JSON on stdin. A call's result is its stdout (at most
//! `plugins.max_output_bytes`); a started plugin's stdout lines are telemetry. Of stderr only
//! the last 4 KiB are kept, as the error of a run that fails.
//!
//! **Who runs it.** Only as a separate user: [`run_as`] refuses unless `plugins.run_as` is a
//! user that is neither root (uid or group 0) nor the agent's own uid, and the agent can switch
//! to it and signal it (`CAP_SETUID`, `CAP_SETGID`, `CAP_KILL`, and `CAP_CHOWN` and
//! `CAP_DAC_OVERRIDE` for the scratch directory: root, or the shipped unit's bounding set). A
//! plugin running as the agent could read the board's secret (`identity.json`), rewrite
//! `plugins.json` or kill and trace the agent, so a board that cannot do this runs no process
//! or Python plugin at all, and says why.
//!
//! **Nothing of a run outlives it.** A plugin's process may `setsid`, double-fork or change its
//! process group, so neither its process group nor its parent chain holds all its processes.
//! Each run therefore has a reaper of its own: the agent's child `R` (still root, it runs no
//! plugin code and ignores every signal it can) makes itself a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`), forks the plugin `P` (which drops to `run_as` and execs), and
//! reaps until it has no child left. An orphan of the run is re-parented to `R`, never to init,
//! and the plugin's user cannot signal `R`, so while `R` lives every process of the run
//! descends from it: a walk of `/proc` (`ppid` chains up to `R`, identified by pid and start
//! time) finds them all, and stop/removal sends SIGKILL to every one, again until none is left
//! (a process forked during a round is re-parented to `R` and found by the next). `R` reports
//! `P`'s wait status on a pipe: the run ends when `P` ends, and what it left behind is killed
//! then, so a background process holding its stdout does not keep a run alive. A run whose
//! future is dropped (a backstop timeout, shutdown) kills its tree from a thread. Only the
//! agent's own children are subreaped: the agent itself is no subreaper, so nothing else it
//! runs (package managers, reboot commands) is affected. cgroups are not used: the shipped unit
//! mounts them read-only (`ProtectControlGroups=`), `cgroup.kill` needs Linux 5.14, and many
//! boards have cgroup v1 only; this works on every Linux kernel since 3.4.
//!
//! **Limits** (`setrlimit` in `P` before it drops to `run_as`): `RLIMIT_NPROC` =
//! `plugins.max_processes`, `RLIMIT_FSIZE` = `plugins.max_file_bytes`, `RLIMIT_CORE` = 0, and
//! `no_new_privs` (a setuid program does not give a plugin root back). `RLIMIT_NPROC` counts
//! every process and thread of the user, so it bounds all runs together (and other processes of
//! that user, if `run_as` is shared: give plugins a user of their own); a run started while the
//! user is at its limit fails to start.
//!
//! Not covered: a process that other daemons start on a plugin's behalf (cron, `at`, D-Bus
//! activation) is not the run's; a pid of the run reused in the microseconds between a `/proc`
//! walk and its `kill` would be signalled (pids are allocated cyclically, so this needs the
//! pid space to wrap around in between).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use super::PluginsConfig;
use super::run::{End, Job, Mode, output_value};

const RUNNER: &str = include_str!("python_runner.py");
/// How long a stopped child has between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the processes of a run have, after SIGKILL, to be gone and reaped. Stop grace and
/// this stay within the manager's wait for a stop (`STOP_WAIT`, 10 s).
const KILL_WAIT: Duration = Duration::from_secs(3);
/// How long a thread keeps killing the processes of a run that was dropped or did not end.
const ABANDONED_KILL_WAIT: Duration = Duration::from_secs(60);
/// Between two rounds of SIGKILL over a run's processes.
const KILL_ROUND: Duration = Duration::from_millis(10);
/// How much of a plugin's stderr is kept: its end, where the error (a traceback) is. The rest
/// is dropped as it is read, so a plugin that logs to stderr for days costs no memory.
const STDERR_KEEP: usize = 4096;

/// What to run.
pub enum Program<'a> {
    /// The executable's bytes.
    Process(&'a [u8]),
    /// Python source defining `Worker`, and the interpreter.
    Python { source: &'a str, python: &'a str },
}

/// The user a process plugin runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Capabilities the agent needs to run process plugins: switch to `run_as` (`SETUID`,
/// `SETGID`, and `setgroups`), signal its processes (`KILL`), hand it the scratch directory and
/// remove it afterwards (`CHOWN`, `DAC_OVERRIDE`).
pub(crate) const NEEDED_CAPS: [(u32, &str); 5] =
    [(0, "CAP_CHOWN"), (1, "CAP_DAC_OVERRIDE"), (5, "CAP_KILL"), (6, "CAP_SETGID"), (7, "CAP_SETUID")];

/// The user process and Python plugins run as, or why this agent cannot run them: `run_as` must
/// name a user that is not root (uid and group not 0) and not the agent's own uid, and the
/// agent must hold the capabilities to switch to it and signal it ([`NEEDED_CAPS`]).
pub fn run_as(config: &PluginsConfig) -> Result<RunAs, String> {
    let name = &config.run_as;
    let user = match User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => return Err(format!("plugins.run_as {name:?} is not a user on this board")),
        Err(e) => return Err(format!("cannot look up plugins.run_as {name:?}: {e}")),
    };
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    if uid == 0 || gid == 0 {
        return Err(format!(
            "plugins.run_as {name:?} is root (uid {uid}, group {gid}): process plugins never run as root"
        ));
    }
    let (me, euid) = (nix::unistd::getuid().as_raw(), nix::unistd::geteuid().as_raw());
    if uid == me || uid == euid {
        return Err(format!(
            "plugins.run_as {name:?} is the agent's own user (uid {uid}): a plugin would reach the agent's \
             secret and state; give plugins a user of their own"
        ));
    }
    let caps = effective_caps().map_err(|e| format!("cannot read the agent's capabilities: {e}"))?;
    let missing: Vec<&str> = NEEDED_CAPS.iter().filter(|(bit, _)| caps & (1 << bit) == 0).map(|(_, n)| *n).collect();
    if !missing.is_empty() {
        return Err(format!(
            "process and Python plugins run as plugins.run_as {name:?}, and the agent (uid {euid}) cannot switch \
             to it: it lacks {} (run the agent as root with systemd/lightning-rod.service, or disable \
             plugins.process and plugins.python)",
            missing.join(", ")
        ));
    }
    Ok(RunAs { uid, gid })
}

/// `CapEff` of this process.
fn effective_caps() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| std::io::Error::other("no CapEff in /proc/self/status"))
}

pub async fn run(job: Arc<Job>, program: Program<'_>) -> End {
    let user = match run_as(&job.limits) {
        Ok(u) => u,
        Err(e) => return End::Failed(e),
    };
    let dir = match scratch(&program, user) {
        Ok(d) => d,
        Err(e) => return End::Failed(format!("cannot prepare the plugin's directory: {e}")),
    };
    let mut cmd = match &program {
        Program::Process(_) => Command::new(dir.path().join("plugin")),
        Program::Python { python, .. } => {
            let mut c = Command::new(python);
            c.arg(dir.path().join("runner.py")).arg(dir.path().join("plugin.py"));
            c
        }
    };
    cmd.current_dir(dir.path())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", dir.path())
        .env("S4T_PLUGIN_UUID", &job.uuid)
        .env("S4T_PLUGIN_NAME", &job.name)
        .env("S4T_BOARD_UUID", &job.board)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The reaper's own group, away from the agent's (a terminal's ^C): it ignores signals.
        .process_group(0)
        // Killing the reaper would hand the run's processes to init: a dropped run kills its
        // tree instead ([`Tree`]), and the reaper then ends by itself.
        .kill_on_drop(false);
    let (status_rx, status_tx) = match status_pipe() {
        Ok(p) => p,
        Err(e) => return End::Failed(format!("cannot start the plugin: {e}")),
    };
    let reaper = Reaper {
        status_fd: status_tx.as_raw_fd(),
        user,
        max_processes: job.limits.max_processes,
        max_file_bytes: job.limits.max_file_bytes,
    };
    // SAFETY: `Reaper::pre_exec` makes only async-signal-safe calls (no allocation, no lock).
    unsafe {
        cmd.pre_exec(move || reaper.pre_exec());
    }
    let spawned = cmd.spawn();
    // The reaper holds the write end now: the read end sees end-of-file when it is gone.
    drop(status_tx);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return End::Failed(format!("cannot start the plugin: {e}")),
    };
    let mut tree = Tree::new(child.id());
    let mut exit = match tokio::net::unix::pipe::Receiver::from_owned_fd(status_rx) {
        Ok(rx) => Exit { rx, buf: [0; 4], got: 0, status: None },
        // The tree's guard kills what may have started.
        Err(e) => return End::Failed(format!("cannot watch the plugin: {e}")),
    };
    let input = match &program {
        Program::Process(_) => json!(job.params),
        Program::Python { .. } => json!({"uuid": job.uuid, "name": job.name, "board": job.board, "params": job.params,
                                         "mode": if matches!(job.mode, Mode::Call { .. }) { "call" } else { "start" }}),
    };
    // Written while the output is read and the stop signal and deadline are watched: a plugin
    // that never reads its parameters (more than a pipe holds) is still stopped, and one that
    // writes before it reads does not wait on the agent. Dropped, the pipe closes.
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A plugin that does not read its parameters closes the pipe: not an error.
            let _ = stdin.write_all(format!("{input}\n").as_bytes()).await;
        }
    };
    let end = match job.mode {
        Mode::Call { deadline } => call(&job, &mut child, &mut exit, &tree, feed, deadline.into()).await,
        Mode::Start => supervise(&job, &mut child, &mut exit, &tree, feed).await,
    };
    if end == End::Stopped {
        terminate(&tree, &mut exit).await;
    }
    // Whatever ended the run, nothing of it survives it: SIGKILL to every process left, then
    // the reaper (which ends once it has no child) is reaped. Both bounded.
    let deadline = Instant::now() + KILL_WAIT;
    let killed = tree.kill(deadline).await;
    let reaped = killed && tokio::time::timeout_at(deadline.into(), child.wait()).await.is_ok();
    drop(dir);
    if !reaped {
        // Left to the tree's guard (a thread that keeps killing for a while) and tokio's reaping.
        tracing::error!(plugin = %job.name, "processes of the plugin did not end within {KILL_WAIT:?} of SIGKILL");
        return End::Failed(format!(
            "killed, but processes of the plugin did not end within {} s ({})",
            KILL_WAIT.as_secs(),
            super::run::describe(&end)
        ));
    }
    tree.disarm();
    end
}

/// A pipe whose read end is the agent's and write end the reaper's, both close-on-exec.
fn status_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors this function owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `prctl` arguments, passed through C varargs: full `unsigned long`s (an `int` would leave the
/// upper half of a 64-bit argument undefined, and `PR_SET_NO_NEW_PRIVS` checks all of it).
const ONE: libc::c_ulong = 1;
const ZERO: libc::c_ulong = 0;

/// What the run's reaper needs, copied into the forked child.
#[derive(Clone, Copy)]
struct Reaper {
    status_fd: i32,
    user: RunAs,
    max_processes: u64,
    max_file_bytes: u64,
}

impl Reaper {
    /// Runs in the agent's forked child, before exec: forks the plugin, which returns here to
    /// be exec'd, and stays the run's reaper (never returns). Async-signal-safe calls only.
    fn pre_exec(&self) -> std::io::Result<()> {
        // SAFETY: plain system calls on values of this process; no allocation, no lock.
        unsafe {
            if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, ONE, ZERO, ZERO, ZERO) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let plugin = libc::fork();
            if plugin < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if plugin == 0 {
                return self.become_plugin();
            }
            self.reap(plugin)
        }
    }

    /// The plugin's side: limits, then the unprivileged user, then back to std, which execs.
    unsafe fn become_plugin(&self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        // SAFETY: plain system calls; the rlimit structs live on this stack.
        unsafe {
            libc::close(self.status_fd);
            // Its own process group, apart from the reaper's.
            if libc::setpgid(0, 0) != 0 {
                return Err(err());
            }
            let limits = [
                (libc::RLIMIT_NPROC, self.max_processes as libc::rlim_t),
                (libc::RLIMIT_FSIZE, self.max_file_bytes as libc::rlim_t),
                (libc::RLIMIT_CORE, 0),
            ];
            for (resource, value) in limits {
                let l = libc::rlimit { rlim_cur: value, rlim_max: value };
                if libc::setrlimit(resource, &l) != 0 {
                    return Err(err());
                }
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(self.user.gid) != 0
                || libc::setuid(self.user.uid) != 0
            {
                return Err(err());
            }
            if libc::getuid() != self.user.uid || libc::geteuid() != self.user.uid || libc::getegid() != self.user.gid {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, ONE, ZERO, ZERO, ZERO) != 0 {
                return Err(err());
            }
        }
        Ok(())
    }

    /// The reaper's side: ignores the signals it can, closes every descriptor but the status
    /// pipe (stdio and the pipes of other runs must close when their plugins' processes end),
    /// reaps every child, re-parented orphans included, writes the plugin's wait status, and
    /// exits once it has no child left.
    unsafe fn reap(&self, plugin: libc::pid_t) -> ! {
        // SAFETY: plain system calls on this process's own state.
        unsafe {
            for sig in [
                libc::SIGHUP,
                libc::SIGINT,
                libc::SIGQUIT,
                libc::SIGTERM,
                libc::SIGUSR1,
                libc::SIGUSR2,
                libc::SIGPIPE,
                libc::SIGALRM,
                libc::SIGTSTP,
                libc::SIGTTIN,
                libc::SIGTTOU,
            ] {
                libc::signal(sig, libc::SIG_IGN);
            }
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            close_all_but(self.status_fd);
            let mut reported = false;
            loop {
                let mut status = 0;
                let pid = libc::waitpid(-1, &mut status, 0);
                if pid == plugin && !reported {
                    let bytes = status.to_ne_bytes();
                    libc::write(self.status_fd, bytes.as_ptr().cast(), bytes.len());
                    reported = true;
                } else if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    // ECHILD: nothing of the run is left.
                    libc::_exit(0);
                }
            }
        }
    }
}

/// Closes every descriptor of this (forked) process but `keep`. Async-signal-safe.
unsafe fn close_all_but(keep: i32) {
    // SAFETY: closing descriptors of this process, which uses none of them afterwards.
    unsafe {
        for fd in 0..3 {
            if fd != keep {
                libc::close(fd);
            }
        }
        let below = keep <= 3 || libc::syscall(libc::SYS_close_range, 3u32, (keep - 1) as u32, 0u32) == 0;
        let ranged = below && libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0u32) == 0;
        if !ranged {
            // Before Linux 5.9: one by one, up to the descriptor limit.
            let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            let max =
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 { l.rlim_cur.min(1 << 20) as i32 } else { 4096 };
            for fd in 3..max {
                if fd != keep {
                    libc::close(fd);
                }
            }
        }
    }
}

/// The plugin's wait status as its reaper reports it; read in a cancel-safe way.
struct Exit {
    rx: tokio::net::unix::pipe::Receiver,
    buf: [u8; 4],
    got: usize,
    /// Once known: the status, or None when the reaper ended without one.
    status: Option<Option<i32>>,
}

impl Exit {
    async fn wait(&mut self) -> Option<i32> {
        if let Some(s) = self.status {
            return s;
        }
        while self.got < self.buf.len() {
            match self.rx.read(&mut self.buf[self.got..]).await {
                Ok(0) | Err(_) => {
                    self.status = Some(None);
                    return None;
                }
                Ok(n) => self.got += n,
            }
        }
        let s = Some(i32::from_ne_bytes(self.buf));
        self.status = Some(s);
        s
    }
}

/// The processes of one run: the descendants of its reaper. Dropped while armed (the run's
/// future was dropped, or the processes did not end in time), a thread keeps killing them.
struct Tree {
    /// The reaper's pid and start time (which tell it from a later process with its pid).
    root: Option<(i32, u64)>,
}

impl Tree {
    fn new(pid: Option<u32>) -> Tree {
        let root = pid.map(|p| p as i32).and_then(|p| proc_stat(p).map(|s| (p, s.start)));
        Tree { root }
    }

    /// Sends `sig` to every process of the run (never the reaper).
    async fn signal(&self, sig: Signal) {
        let Some(root) = self.root else { return };
        let _ = tokio::task::spawn_blocking(move || signal_tree(root, sig)).await;
    }

    /// SIGKILL to every process of the run, round after round until none is left; false if
    /// some were still there at `deadline`.
    async fn kill(&self, deadline: Instant) -> bool {
        let Some(root) = self.root else { return true };
        tokio::task::spawn_blocking(move || kill_tree(root, deadline)).await.unwrap_or(false)
    }

    fn disarm(&mut self) {
        self.root = None;
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let Some(root) = self.root.take() else { return };
        let deadline = Instant::now() + ABANDONED_KILL_WAIT;
        let spawned = std::thread::Builder::new().name("plugin-kill".into()).spawn(move || {
            if !kill_tree(root, deadline) {
                tracing::error!(reaper = root.0, "processes of a plugin did not end after SIGKILL");
            }
        });
        if spawned.is_err() {
            signal_tree(root, Signal::SIGKILL);
        }
    }
}

/// A process as `/proc/<pid>/stat` tells it.
struct Stat {
    ppid: i32,
    zombie: bool,
    /// Start time after boot, in clock ticks.
    start: u64,
}

fn proc_stat(pid: i32) -> Option<Stat> {
    let mut text = String::new();
    std::fs::File::open(format!("/proc/{pid}/stat")).ok()?.read_to_string(&mut text).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses; it ends at the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields from 3 on: state(3) ppid(4) ... starttime(22).
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        zombie: *fields.first()? == "Z",
        start: fields.get(19)?.parse().ok()?,
    })
}

/// The living (not zombie) descendants of `root`; None when `root` is no longer the reaper
/// (gone, a zombie, or its pid taken by another process).
fn descendants((root, start): (i32, u64)) -> Option<Vec<i32>> {
    match proc_stat(root) {
        Some(s) if s.start == start && !s.zombie => {}
        _ => return None,
    }
    let mut children: std::collections::HashMap<i32, Vec<(i32, bool)>> = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if let Some(s) = proc_stat(pid) {
            children.entry(s.ppid).or_default().push((pid, s.zombie));
        }
    }
    let (mut found, mut queue) = (Vec::new(), vec![root]);
    while let Some(p) = queue.pop() {
        for &(child, zombie) in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            queue.push(child);
            if !zombie {
                found.push(child);
            }
        }
    }
    Some(found)
}

/// Sends `sig` to the living descendants of `root`; how many there were.
fn signal_tree(root: (i32, u64), sig: Signal) -> usize {
    let pids = descendants(root).unwrap_or_default();
    for &pid in &pids {
        let _ = kill(Pid::from_raw(pid), sig);
    }
    pids.len()
}

/// SIGKILL to the descendants of `root` until none is left (true) or `deadline` (false).
fn kill_tree(root: (i32, u64), deadline: Instant) -> bool {
    loop {
        if signal_tree(root, Signal::SIGKILL) == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(KILL_ROUND);
    }
}

/// Writes the code into a fresh private directory the plugin's user owns.
fn scratch(program: &Program<'_>, user: RunAs) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("s4t-plugin-").tempdir()?;
    let files: Vec<(&str, &[u8], u32)> = match program {
        Program::Process(bytes) => vec![("plugin", bytes, 0o700)],
        Program::Python { source, .. } => {
            vec![("runner.py", RUNNER.as_bytes(), 0o600), ("plugin.py", source.as_bytes(), 0o600)]
        }
    };
    for (name, bytes, mode) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        chown(&path, user)?;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    chown(dir.path(), user)?;
    Ok(dir)
}

fn chown(path: &Path, user: RunAs) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
}

/// At most `max` bytes of `r`, then `Err(())` if more followed (the rest is drained).
async fn read_bounded(r: Option<impl AsyncRead + Unpin>, max: u64) -> Result<Vec<u8>, ()> {
    let Some(mut r) = r else { return Ok(vec![]) };
    let mut buf = Vec::new();
    let _ = (&mut r).take(max.saturating_add(1)).read_to_end(&mut buf).await;
    let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
    if buf.len() as u64 > max { Err(()) } else { Ok(buf) }
}

/// The last bytes of a stream, in at most twice `keep` bytes of memory however much flows.
#[derive(Debug)]
struct Tail {
    buf: Vec<u8>,
    keep: usize,
}

impl Tail {
    fn new(keep: usize) -> Tail {
        Tail { buf: Vec::new(), keep }
    }

    fn push(&mut self, mut data: &[u8]) {
        if data.len() >= self.keep {
            self.buf.clear();
            data = &data[data.len() - self.keep..];
        }
        if self.buf.len() + data.len() > 2 * self.keep {
            // Drop the oldest bytes; a move of at most `keep` bytes per `keep` bytes read.
            self.buf.drain(..self.buf.len() + data.len() - self.keep);
        }
        self.buf.extend_from_slice(data);
    }

    fn into_bytes(mut self) -> Vec<u8> {
        let excess = self.buf.len().saturating_sub(self.keep);
        self.buf.drain(..excess);
        self.buf
    }
}

/// The last `keep` bytes of `r` up to its end (or a read error).
async fn read_tail(r: Option<impl AsyncRead + Unpin>, keep: usize) -> Vec<u8> {
    let Some(mut r) = r else { return vec![] };
    let mut tail = Tail::new(keep);
    let mut chunk = vec![0; 8192];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return tail.into_bytes(),
            Ok(n) => tail.push(&chunk[..n]),
        }
    }
}

/// Waits for the plugin's main process to end while `io` (its pipes) is served, then kills
/// what it left behind (so the pipes close) and gives `io` a bounded time to finish. Returns
/// `io`'s output (None if it did not finish) and the plugin's wait status (None: unknown).
async fn until_exit<T>(io: impl Future<Output = T>, exit: &mut Exit, tree: &Tree) -> (Option<T>, Option<i32>) {
    tokio::pin!(io);
    let first = tokio::select! {
        s = exit.wait() => Err(s),
        out = &mut io => Ok(out),
    };
    let (mut out, status) = match first {
        Err(s) => (None, s),
        Ok(out) => (Some(out), exit.wait().await),
    };
    let deadline = Instant::now() + KILL_WAIT;
    tree.kill(deadline).await;
    if out.is_none() {
        out = tokio::time::timeout_at(deadline.into(), io).await.ok();
    }
    (out, status)
}

/// The exit code of a wait status (-1 for a signal).
fn code(status: i32) -> i32 {
    std::process::ExitStatus::from_raw(status).code().unwrap_or(-1)
}

async fn call(
    job: &Job,
    child: &mut Child,
    exit: &mut Exit,
    tree: &Tree,
    feed: impl Future<Output = ()>,
    deadline: tokio::time::Instant,
) -> End {
    let max = job.limits.max_output_bytes as u64;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let io = async {
        let ((), o, e) = tokio::join!(feed, read_bounded(out, max), read_tail(err, STDERR_KEEP));
        (o, e)
    };
    let (io, status) = tokio::select! {
        _ = job.signal.token().cancelled() => return End::Stopped,
        r = tokio::time::timeout_at(deadline, until_exit(io, exit, tree)) => match r {
            Ok(r) => r,
            Err(_) => return End::Failed(format!("exceeded its time limit of {} s", job.limits.call_timeout_s)),
        },
    };
    let Some(status) = status else { return End::Failed("the plugin's reaper ended without its status".into()) };
    let Some((out, err)) = io else {
        return End::Failed("the plugin's output did not end after its processes were killed".into());
    };
    let Ok(out) = out else { return End::Failed(format!("wrote more than {max} bytes of output")) };
    if !err.is_empty() {
        tracing::info!(plugin = %job.name, stderr = %String::from_utf8_lossy(&err).trim_end(), "plugin wrote to stderr");
    }
    let status = code(status);
    let result = if out.is_empty() && status != 0 && !err.is_empty() { output_value(&err) } else { output_value(&out) };
    let result = if out.is_empty() && err.is_empty() { None } else { Some(result) };
    End::Done { status, result }
}

/// A started plugin: its stdout lines become telemetry until it exits or is stopped.
async fn supervise(job: &Job, child: &mut Child, exit: &mut Exit, tree: &Tree, feed: impl Future<Output = ()>) -> End {
    let max = job.limits.max_output_bytes as u64;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let lines = async {
        let Some(out) = stdout else { return };
        let mut r = BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut r).take(max + 1).read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) if line.len() as u64 > max => tracing::warn!(plugin = %job.name, "output line too long; dropped"),
                Ok(_) => {
                    if !job.publish(output_value(&line)) {
                        tracing::debug!(plugin = %job.name, "telemetry queue full; line dropped");
                    }
                }
            }
        }
    };
    let io = async {
        let ((), (), err) = tokio::join!(feed, lines, read_tail(stderr, STDERR_KEEP));
        err
    };
    tokio::select! {
        (err, status) = until_exit(io, exit, tree) => match status {
            Some(s) => {
                let status = code(s);
                let err = err.unwrap_or_default();
                if !err.is_empty() {
                    tracing::info!(plugin = %job.name, status, stderr = %String::from_utf8_lossy(&err).trim_end(),
                        "started plugin ended; the end of its stderr");
                }
                // A failure is reported with the end of what it wrote to stderr.
                let result = (status != 0 && !err.is_empty()).then(|| output_value(&err));
                End::Done { status, result }
            }
            None => End::Failed("the plugin's reaper ended without its status".into()),
        },
        _ = job.signal.token().cancelled() => End::Stopped,
    }
}

/// Stops a started run: SIGTERM to every process of it, then up to [`STOP_GRACE`] for the
/// plugin to end (the caller sends SIGKILL to whatever is left).
async fn terminate(tree: &Tree, exit: &mut Exit) {
    tree.signal(Signal::SIGTERM).await;
    let _ = tokio::time::timeout(STOP_GRACE, exit.wait()).await;
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[test]
    fn a_tail_holds_at_most_twice_what_it_keeps() {
        let mut tail = Tail::new(STDERR_KEEP);
        let mut written = Vec::new();
        // 64 MiB in pieces of every size around the bound.
        let sizes = [1, 100, STDERR_KEEP - 1, STDERR_KEEP, STDERR_KEEP + 1, 3 * STDERR_KEEP, 8192];
        let (mut total, mut i) = (0usize, 0usize);
        while total < 64 << 20 {
            let n = sizes[i % sizes.len()];
            let piece: Vec<u8> = (0..n).map(|j| (total + j) as u8).collect();
            tail.push(&piece);
            assert!(tail.buf.len() <= 2 * STDERR_KEEP && tail.buf.capacity() <= 4 * STDERR_KEEP, "{}", tail.buf.len());
            if total + n > (64 << 20) - 3 * STDERR_KEEP {
                written.extend_from_slice(&piece);
            }
            total += n;
            i += 1;
        }
        assert_eq!(tail.into_bytes(), written[written.len() - STDERR_KEEP..]);
    }

    #[tokio::test]
    async fn read_tail_keeps_the_end_of_a_long_stream() {
        let long = tokio::io::repeat(b'x').take(64 << 20).chain(&b"\nthe error\n"[..]);
        let tail = read_tail(Some(long), STDERR_KEEP).await;
        assert_eq!(tail.len(), STDERR_KEEP);
        assert!(tail.ends_with(b"x\nthe error\n"));
        assert_eq!(read_tail(Some(&b"short"[..]), STDERR_KEEP).await, b"short");
    }
}
