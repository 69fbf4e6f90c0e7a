//! Process plugins (an executable or script) and legacy Python plugins (the original `Worker`
//! class run by `python3` through `python_runner.py`): children of the agent, never inside it.
//!
//! Each run gets a private scratch directory holding its code, owned by `plugins.run_as` when
//! the agent is root, removed afterwards. The child runs as that user (when root), with an
//! empty environment but `PATH`, `HOME` and `S4T_*`, in its own process group (stop and
//! timeout signal the whole group), parameters as JSON on stdin. A call's result is its stdout
//! (at most `plugins.max_output_bytes`); a started plugin's stdout lines are telemetry. Of
//! stderr only the last 4 KiB are kept, as the error of a run that fails.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, Uid, User};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use super::run::{End, Job, Mode, output_value};

const RUNNER: &str = include_str!("python_runner.py");
/// How long a stopped child has between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
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

pub async fn run(job: Arc<Job>, program: Program<'_>) -> End {
    let dir = match scratch(&job, &program) {
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
        .process_group(0)
        .kill_on_drop(true);
    if let Some((uid, gid)) = drop_to(&job) {
        cmd.uid(uid).gid(gid);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return End::Failed(format!("cannot start the plugin: {e}")),
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
        Mode::Call { deadline } => call(&job, &mut child, feed, deadline.into()).await,
        Mode::Start => supervise(&job, &mut child, feed).await,
    };
    if end == End::Stopped {
        terminate(&mut child).await;
    }
    kill_group(&child, Signal::SIGKILL);
    let _ = child.wait().await;
    drop(dir);
    end
}

/// Writes the code into a fresh private directory the plugin's user owns.
fn scratch(job: &Job, program: &Program<'_>) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("s4t-plugin-").tempdir()?;
    let files: Vec<(&str, &[u8], u32)> = match program {
        Program::Process(bytes) => vec![("plugin", bytes, 0o700)],
        Program::Python { source, .. } => {
            vec![("runner.py", RUNNER.as_bytes(), 0o600), ("plugin.py", source.as_bytes(), 0o600)]
        }
    };
    let owner = drop_to(job);
    for (name, bytes, mode) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        chown(&path, owner)?;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    chown(dir.path(), owner)?;
    Ok(dir)
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

/// The user and group to run as: `plugins.run_as` when the agent is root (else it already runs
/// unprivileged, as itself).
fn drop_to(job: &Job) -> Option<(u32, u32)> {
    if !Uid::effective().is_root() {
        return None;
    }
    match User::from_name(&job.limits.run_as) {
        Ok(Some(u)) => Some((u.uid.as_raw(), u.gid.as_raw())),
        // Never run user code as root: an unknown user is the nobody uid.
        _ => Some((65534, 65534)),
    }
}

fn kill_group(child: &Child, sig: Signal) {
    if let Some(pid) = child.id() {
        let _ = killpg(Pid::from_raw(pid as i32), sig);
    }
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

async fn call(job: &Job, child: &mut Child, feed: impl Future<Output = ()>, deadline: tokio::time::Instant) -> End {
    let max = job.limits.max_output_bytes as u64;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let work = async {
        let ((), o, e) = tokio::join!(feed, read_bounded(out, max), read_tail(err, STDERR_KEEP));
        (child.wait().await, o, e)
    };
    let (status, out, err) = tokio::select! {
        _ = job.signal.token().cancelled() => return End::Stopped,
        r = tokio::time::timeout_at(deadline, work) => match r {
            Ok(r) => r,
            Err(_) => return End::Failed(format!("exceeded its time limit of {} s", job.limits.call_timeout_s)),
        },
    };
    let Ok(out) = out else { return End::Failed(format!("wrote more than {max} bytes of output")) };
    if !err.is_empty() {
        tracing::info!(plugin = %job.name, stderr = %String::from_utf8_lossy(&err).trim_end(), "plugin wrote to stderr");
    }
    match status {
        Err(e) => End::Failed(format!("waiting for the plugin: {e}")),
        Ok(s) => {
            let status = s.code().unwrap_or(-1);
            let result =
                if out.is_empty() && status != 0 && !err.is_empty() { output_value(&err) } else { output_value(&out) };
            let result = if out.is_empty() && err.is_empty() { None } else { Some(result) };
            End::Done { status, result }
        }
    }
}

/// A started plugin: its stdout lines become telemetry until it exits or is stopped.
async fn supervise(job: &Job, child: &mut Child, feed: impl Future<Output = ()>) -> End {
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
    let exited = async {
        let ((), (), err) = tokio::join!(feed, lines, read_tail(stderr, STDERR_KEEP));
        (child.wait().await, err)
    };
    tokio::select! {
        (status, err) = exited => match status {
            Ok(s) => {
                let status = s.code().unwrap_or(-1);
                if !err.is_empty() {
                    tracing::info!(plugin = %job.name, status, stderr = %String::from_utf8_lossy(&err).trim_end(),
                        "started plugin ended; the end of its stderr");
                }
                // A failure is reported with the end of what it wrote to stderr.
                let result = (status != 0 && !err.is_empty()).then(|| output_value(&err));
                End::Done { status, result }
            }
            Err(e) => End::Failed(format!("waiting for the plugin: {e}")),
        },
        _ = job.signal.token().cancelled() => End::Stopped,
    }
}

/// Stops a started child: SIGTERM to its group, SIGKILL after [`STOP_GRACE`].
async fn terminate(child: &mut Child) {
    kill_group(child, Signal::SIGTERM);
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        kill_group(child, Signal::SIGKILL);
    }
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
