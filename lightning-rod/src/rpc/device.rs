//! `Device*` procedures (S4T-REFERENCE §5.4) and `DeviceInfo`.
//!
//! Reboot and restart run configurable argv (tests point them at harmless commands) after a
//! delay, so the reply reaches the cloud first. `DevicePkgOperation` runs an allow-listed
//! manager and command with the package as one argv element (never a shell string), replies
//! RUNNING and reports the outcome through `notify_result`.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use super::args::{Params, bad};
use super::{Call, Context, Lifecycle, Method, Outcome, Reply, message, ok};
use crate::error::{Error, Result};

/// Output of a package operation kept for the reply (the tail beyond is discarded).
const PKG_OUTPUT_LIMIT: u64 = 16 * 1024;
/// After this long a package operation is reported still running (RUNNING, which the cloud
/// records without ending the request). It is never killed for its time: killing apt leaves
/// dpkg half way, and "dpkg was interrupted" is beyond what any allowed command repairs.
const PKG_STILL_RUNNING: Duration = Duration::from_secs(30 * 60);
/// How long the output is still read once the manager has exited: a daemon that a maintainer
/// script started may hold the pipes open for as long as it runs.
const PKG_DRAIN: Duration = Duration::from_secs(2);
const MAX_DELAY_S: u64 = 24 * 3600;
/// Set (to `1`) in a package manager's environment. dpkg passes it on to maintainer scripts:
/// the agent's own postinst then leaves the restart to the agent, which restarts once the
/// operation is over (a restart by systemd would stop the unit, and apt and dpkg with it).
const PACKAGE_OPERATION_ENV: &str = "S4T_LR_PACKAGE_OPERATION";

pub(super) async fn call(ctx: &Arc<Context>, method: Method, call: &Call) -> Result<Reply> {
    match method {
        Method::DevicePing => ok(format!("{} @ {}", hostname(), iso8601_now())),
        Method::DeviceEcho => {
            let p = Params::at(&call.args, 0, "parameters", true)?;
            let say = p.get("say").ok_or_else(|| bad("parameters.say is missing".into()))?;
            message(say.clone())
        }
        Method::DeviceInfo => message(device_info()),
        Method::DeviceNetConfig => message(net_config()?),
        Method::DeviceReboot => delayed(ctx, call, "reboot", ctx.device.reboot_command.clone()),
        Method::DeviceRestartLR => delayed(ctx, call, "restart", ctx.device.restart_command.clone()),
        Method::DevicePkgOperation => pkg_operation(ctx, call),
        _ => Err(bad(format!("{} is not a device procedure", method.name()))),
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_default()
}

fn hostname() -> String {
    read_trim("/proc/sys/kernel/hostname")
}

fn device_info() -> Value {
    let uptime = read_trim("/proc/uptime").split_whitespace().next().and_then(|s| s.parse::<f64>().ok());
    let load: Vec<f64> = read_trim("/proc/loadavg").split_whitespace().take(3).filter_map(|s| s.parse().ok()).collect();
    let meminfo = read_trim("/proc/meminfo");
    let mem = |key: &str| -> Option<u64> {
        meminfo.lines().find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse().ok())
    };
    json!({
        "hostname": hostname(),
        "arch": std::env::consts::ARCH,
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "uptime_s": uptime.map(|u| u as u64),
        "load": load,
        "mem_total_kb": mem("MemTotal:"),
        "mem_available_kb": mem("MemAvailable:"),
        "lr_version": crate::VERSION,
    })
}

/// Interfaces with their MAC and addresses (the original returned `ifconfig` text).
fn net_config() -> Result<Value> {
    let ifaces = crate::netif::interfaces()
        .map_err(|e| Error::Net { what: "the interface list (rtnetlink)".into(), reason: e.to_string() })?;
    let ifaces: Vec<Value> = ifaces
        .into_iter()
        .map(|i| {
            let addrs: Vec<String> = i.addrs.iter().map(|(ip, prefix)| format!("{ip}/{prefix}")).collect();
            let mut entry = json!({"name": i.name, "up": i.up, "addresses": addrs});
            if let Some(mac) = i.mac {
                entry["mac"] = json!(mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"));
            }
            entry
        })
        .collect();
    Ok(json!({"interfaces": ifaces}))
}

/// `connection`'s `info.connectivity` (S4T-REFERENCE §5.2): the first interface that is up,
/// not loopback and has an IPv4 address: `{"iface","local_ip","mac"}`, or `{}`.
pub fn connectivity() -> Value {
    let Ok(net) = net_config() else { return json!({}) };
    let ifaces = net["interfaces"].as_array().cloned().unwrap_or_default();
    for i in ifaces {
        let name = i["name"].as_str().unwrap_or_default();
        let v4 = i["addresses"].as_array().and_then(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .find(|s| !s.contains(':'))
                .map(|s| s.split('/').next().unwrap_or(s).to_owned())
        });
        if let (true, false, Some(ip)) = (i["up"] == true, name == "lo", v4) {
            return json!({"iface": name, "local_ip": ip, "mac": i["mac"].as_str().unwrap_or_default()});
        }
    }
    json!({})
}

/// Reboot or restart after `max(delay, min_delay_s)` seconds, and after any package
/// operation running then. At most one waits: a new one replaces it (each used to wait on its
/// own, up to a day, beyond the lease of the user who asked), and `{"cancel": true}` calls it
/// off.
fn delayed(ctx: &Arc<Context>, call: &Call, what: &'static str, argv: Vec<String>) -> Result<Reply> {
    let p = Params::at(&call.args, 0, "parameters", false)?;
    let cancel = match p.get("cancel") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => {
            return Err(bad(format!("parameters.cancel must be true or false, not {}", super::args::kind(other))));
        }
    };
    let delay = p.opt_int("delay", 0..=MAX_DELAY_S)?.unwrap_or(0).max(ctx.device.min_delay_s);
    let mut pending = ctx.power.lock().expect("power");
    let replaced = pending.take().inspect(CancellationToken::cancel).is_some();
    if cancel {
        return ok(if replaced {
            "the pending reboot or restart is called off"
        } else {
            "no reboot or restart is pending"
        });
    }
    let token = ctx.shutdown.child_token();
    *pending = Some(token.clone());
    drop(pending);
    let ctx2 = ctx.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(delay)) => {}
        }
        // A reboot or restart in the middle of a package operation would kill dpkg (the
        // agent's child) and could leave the package database broken: wait for it to end
        // (however long: it is never killed for its time), and hold the lock so none starts
        // meanwhile.
        let no_package_operation = match ctx2.package_operation.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                tracing::info!("{what} waits for the running package operation to end");
                tokio::select! {
                    _ = token.cancelled() => return,
                    guard = ctx2.package_operation.clone().lock_owned() => guard,
                }
            }
        };
        if argv.is_empty() {
            tracing::info!("restart requested by the cloud");
            let _ = ctx2.lifecycle.send(Lifecycle::Restart).await;
        } else {
            tracing::info!(command = ?argv, "{what} requested by the cloud");
            match tokio::process::Command::new(&argv[0]).args(&argv[1..]).stdin(Stdio::null()).status().await {
                Ok(s) if s.success() => {}
                Ok(s) => {
                    tracing::error!(command = ?argv, status = %s, "{what} command failed");
                    return;
                }
                Err(e) => {
                    tracing::error!(command = ?argv, cause = %e, "{what} command could not start");
                    return;
                }
            }
        }
        hold_until_stopped(&ctx2, no_package_operation).await;
    });
    let note = if replaced { " (the one pending is called off)" } else { "" };
    ok(format!("{what} in {delay} s{note}"))
}

/// Keeps the package lock until the agent stops. Once a restart is asked of the main loop
/// (read only by a live session, maybe minutes later) or the reboot command has run, a
/// package operation started meanwhile would be killed half way by the restart or reboot.
async fn hold_until_stopped(ctx: &Context, guard: tokio::sync::OwnedMutexGuard<()>) {
    ctx.shutdown.cancelled().await;
    drop(guard);
}

/// How a package manager reads its package argument, told by its program's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PackageRules {
    /// apt, apt-get, aptitude: Debian package names and versions.
    Debian,
    /// pip (`pip3`, `pip3.11`, `python3 -m pip`): PyPI project names and PEP 440 versions.
    Python,
    /// Any other manager: the intersection of the two, roughly.
    Other,
}

impl PackageRules {
    fn of(argv: &[String]) -> PackageRules {
        let name = |a: &String| Path::new(a).file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let program = argv.first().map(name).unwrap_or_default();
        if ["apt", "apt-get", "aptitude"].contains(&program.as_str()) {
            PackageRules::Debian
        } else if program.starts_with("pip") || argv.windows(2).any(|w| w[0] == "-m" && w[1] == "pip") {
            PackageRules::Python
        } else {
            PackageRules::Other
        }
    }

    /// Whether `s` is a package name, and nothing a manager would take for something else: a
    /// path (`/`, a leading `.`), a URL (`:`, `git+https:`, `@`), an option (a leading `-`),
    /// a local archive (`x.whl` next to the agent) or apt's `name-` (remove).
    fn name(self, s: &str) -> bool {
        let first_alnum = s.starts_with(|c: char| c.is_ascii_alphanumeric());
        let ok = match self {
            // Debian policy: lower case, digits, `+-.`, at least 2, starting alphanumeric.
            PackageRules::Debian => {
                s.len() >= 2 && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
            }
            // PEP 508 names: letters, digits, `._-`, starting and ending alphanumeric.
            PackageRules::Python => {
                s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                    && s.ends_with(|c: char| c.is_ascii_alphanumeric())
                    && !ARCHIVES.iter().any(|a| s.to_ascii_lowercase().ends_with(a))
            }
            PackageRules::Other => s.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c)),
        };
        ok && first_alnum && s.len() <= MAX_PACKAGE && !s.ends_with('-')
    }

    /// Whether `s` is a version: Debian (`[epoch:]upstream[-revision]`), PEP 440 (`1.2.*`,
    /// `1!2.0+local`), or for other managers letters, digits and `.+~_-`.
    fn version(self, s: &str) -> bool {
        let (body, extra) = match self {
            PackageRules::Debian => match s.split_once(':') {
                Some((epoch, rest)) if !epoch.is_empty() && epoch.chars().all(|c| c.is_ascii_digit()) => (rest, ".+~-"),
                Some(_) => return false,
                None => (s, ".+~-"),
            },
            PackageRules::Python => (s, ".+!*_-"),
            PackageRules::Other => (s, ".+~_-"),
        };
        s.len() <= MAX_PACKAGE
            && body.starts_with(|c: char| c.is_ascii_alphanumeric())
            && body.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
    }
}

/// Longest package name or version accepted.
const MAX_PACKAGE: usize = 200;
/// Endings pip takes for a local archive when such a file exists.
const ARCHIVES: [&str; 10] = [".whl", ".zip", ".tar", ".tgz", ".tbz", ".txz", ".tlz", ".tar.gz", ".tar.bz2", ".tar.xz"];

fn pkg_operation(ctx: &Arc<Context>, call: &Call) -> Result<Reply> {
    let p = Params::at(&call.args, 0, "parameters", true)?;
    let manager_name = p.str("manager")?;
    let manager = ctx.device.package_managers.get(manager_name).ok_or_else(|| {
        let known: Vec<&String> = ctx.device.package_managers.keys().collect();
        bad(format!("parameters.manager {manager_name:?} is not allowed (allowed: {known:?})"))
    })?;
    let command = p.str("command")?;
    if !manager.commands.iter().any(|c| c == command) {
        return Err(bad(format!(
            "parameters.command {command:?} is not allowed for {manager_name} (allowed: {:?})",
            manager.commands
        )));
    }
    if p.opt_str("options")?.is_some() {
        return Err(bad("parameters.options is not accepted: options come from the board's configuration".into()));
    }
    let mut argv = manager.argv.clone();
    argv.push(command.to_owned());
    let rules = PackageRules::of(&manager.argv);
    if let Some(pkg) = p.opt_str("package")? {
        // Names only: never a URL, path or file a manager would install from instead.
        if !rules.name(pkg) {
            return Err(bad(format!("parameters.package {pkg:?} is not a package name for {manager_name}")));
        }
        let arg = match p.opt_str("version")? {
            Some(v) if rules.version(v) => manager.version_format.replace("{package}", pkg).replace("{version}", v),
            Some(v) => return Err(bad(format!("parameters.version {v:?} is not a version for {manager_name}"))),
            None => pkg.to_owned(),
        };
        argv.push(arg);
    } else if command != "update" && command != "upgrade" {
        return Err(bad(format!("parameters.package is required for {command}")));
    }
    for dir in &manager.writes {
        writable(dir).map_err(|e| bad(format!("{manager_name} {command}: {e}")))?;
    }
    let Ok(running) = ctx.package_operation.clone().try_lock_owned() else {
        return Err(bad("another package operation is running: try again when it has finished".into()));
    };
    let (ctx2, req_id) = (ctx.clone(), call.req_id());
    tokio::spawn(async move {
        let reply = run(&argv, rules, &ctx2, &req_id).await;
        let replaced = std::fs::read_link("/proc/self/exe").is_ok_and(|exe| binary_replaced(&exe));
        // The lock is let go now, unless the agent restarts below.
        let restart = replaced.then_some(running);
        let reply = Reply { req_id, ..reply };
        if ctx2.notify.send(reply).await.is_err() {
            tracing::warn!("package operation finished after the session task stopped");
        }
        if let Some(running) = restart {
            // The operation upgraded the agent itself (its postinst left the restart to us):
            // restart into the new binary, as `DeviceRestartLR` does.
            tracing::info!("the agent's binary was replaced: restarting");
            let _ = ctx2.lifecycle.send(Lifecycle::Restart).await;
            hold_until_stopped(&ctx2, running).await;
        }
    });
    Ok(Reply { message: json!("RUNNING"), result: Outcome::Running, req_id: None })
}

/// Whether this process may write into `dir` (mount flags included: `access(2)` answers EROFS
/// for a read-only mount even to root).
fn writable(dir: &Path) -> std::result::Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    match access(dir, AccessFlags::W_OK) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EROFS) => Err(format!(
            "{} is mounted read-only for the agent (systemd ProtectSystem=); package operations need \
             systemd/lightning-rod.service.d/package-operations.conf",
            dir.display()
        )),
        Err(e) => Err(format!("{} is not writable by the agent: {e}", dir.display())),
    }
}

/// Whether the agent's binary was replaced on disk since it started, from the text of the
/// `/proc/self/exe` link (the kernel appends ` (deleted)` once the file is unlinked or
/// renamed over, as dpkg does).
fn binary_replaced(exe: &Path) -> bool {
    exe.as_os_str().as_encoded_bytes().ends_with(b" (deleted)")
}

/// Reads the first [`PKG_OUTPUT_LIMIT`] bytes into `buf`, then drains the rest so the child
/// never blocks on a full pipe.
async fn read_limited(r: Option<impl AsyncRead + Unpin>, buf: &mut Vec<u8>) {
    let Some(mut r) = r else { return };
    let _ = (&mut r).take(PKG_OUTPUT_LIMIT).read_to_end(buf).await;
    let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
}

/// Runs a package manager to its end (killed only when the agent shuts down) and makes its
/// reply; reports RUNNING for `req_id` after [`PKG_STILL_RUNNING`].
async fn run(argv: &[String], rules: PackageRules, ctx: &Context, req_id: &Option<String>) -> Reply {
    let mut command = tokio::process::Command::new(&argv[0]);
    command.args(&argv[1..]).env(PACKAGE_OPERATION_ENV, "1");
    // Nothing may wait for an answer on stdin (/dev/null): a conffile prompt leaves the
    // package unconfigured, `pip uninstall` stops at "Proceed (Y/n)?".
    let unattended = match rules {
        PackageRules::Debian => Some(("DEBIAN_FRONTEND", "noninteractive")),
        PackageRules::Python => Some(("PIP_YES", "1")),
        PackageRules::Other => None,
    };
    command.envs(unattended);
    let spawned = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Reply::error(None, format!("cannot run {}: {e}", argv[0])),
    };
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let status = {
        let reading = async { tokio::join!(read_limited(out, &mut o), read_limited(err, &mut e)) };
        tokio::pin!(reading);
        let still_running = tokio::time::sleep(PKG_STILL_RUNNING);
        tokio::pin!(still_running);
        let (mut read, mut told) = (false, false);
        // The exit status ends the operation, not the pipes' end: whatever inherited them may
        // hold them open.
        let status = loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Reply::error(None, "interrupted: the agent is shutting down"),
                status = child.wait() => break status,
                _ = &mut reading, if !read => read = true,
                _ = &mut still_running, if !told => {
                    told = true;
                    tracing::warn!(command = ?argv, "the package operation is still running after {PKG_STILL_RUNNING:?}");
                    let message = format!("still running after {PKG_STILL_RUNNING:?}");
                    // A progress note: dropped rather than waited for when the queue is full.
                    let _ = ctx.notify.try_send(Reply { message: json!(message), result: Outcome::Running, req_id: req_id.clone() });
                }
            }
        };
        if !read {
            let _ = tokio::time::timeout(PKG_DRAIN, reading).await;
        }
        status
    };
    let (o, e) = (String::from_utf8_lossy(&o).into_owned(), String::from_utf8_lossy(&e).into_owned());
    match status {
        Err(e) => Reply::error(None, format!("waiting for {}: {e}", argv[0])),
        Ok(status) if status.success() => Reply::success(None, json!({"status": 0, "output": o, "errors": e})),
        Ok(status) => Reply {
            message: json!({"status": status.code(), "output": o, "errors": e}),
            result: Outcome::Error,
            req_id: None,
        },
    }
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SS.ffffff`, like the original's `datetime.now()`.
pub(crate) fn iso8601_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant), valid for any date after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{PackageRules, binary_replaced, writable};

    /// The agent restarts after a package operation only when its own binary was replaced
    /// (the kernel marks the `/proc/self/exe` link of an unlinked file ` (deleted)`).
    #[test]
    fn a_replaced_binary_is_told_from_the_exe_link() {
        assert!(binary_replaced(Path::new("/usr/bin/lightning-rod (deleted)")));
        assert!(!binary_replaced(Path::new("/usr/bin/lightning-rod")));
        assert!(!binary_replaced(Path::new("/opt/x (deleted)/lightning-rod")));
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(!binary_replaced(&exe), "{}", exe.display());
    }

    /// Package operations take names and versions only: no URL, path, option or local file,
    /// for each kind of manager (`pip3 install https://…`, `git+https://…`, `x @ https://…`,
    /// `apt install /tmp/x.deb`, `./x.deb`).
    #[test]
    fn package_operations_take_names_never_urls_or_paths() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let apt = PackageRules::of(&argv(&["apt-get", "-y", "-q"]));
        let pip = PackageRules::of(&argv(&["pip3"]));
        assert_eq!(apt, PackageRules::Debian);
        assert_eq!(PackageRules::of(&argv(&["/usr/bin/apt", "-y"])), PackageRules::Debian);
        assert_eq!(pip, PackageRules::Python);
        assert_eq!(PackageRules::of(&argv(&["python3", "-m", "pip"])), PackageRules::Python);
        let other = PackageRules::of(&argv(&["opkg"]));
        assert_eq!(other, PackageRules::Other);
        for name in ["nano", "g++", "libstdc++6", "python3.11", "lib32gcc-s1"] {
            assert!(apt.name(name), "apt refused {name}");
        }
        for name in ["requests", "Django", "zope.interface", "typing_extensions", "pyyaml", "a"] {
            assert!(pip.name(name), "pip refused {name}");
        }
        for name in ["busybox", "kmod-usb2", "luci-app_x"] {
            assert!(other.name(name), "opkg refused {name}");
        }
        let hostile = [
            "https://evil.example/x.whl",
            "git+https://evil.example/x.git",
            "x@https://evil.example/x.whl",
            "x @ https://evil.example/x.whl",
            "/tmp/x.deb",
            "./x.deb",
            "../x",
            ".",
            "x/y",
            "file:x",
            "x:amd64",
            "-y",
            "--index-url=https://evil.example",
            "x;id",
            "$(id)",
            "x y",
            "x==1.0",
            "x[extra]",
            "nano-",
            "",
            "é",
        ];
        for rules in [apt, pip, other] {
            for name in hostile {
                assert!(!rules.name(name), "{rules:?} took {name:?} for a package name");
            }
        }
        for name in ["x.whl", "x.tar.gz", "x.zip", "X.WHL"] {
            assert!(!pip.name(name), "pip took the local archive {name:?}");
        }
        assert!(!apt.name("Nano") && !apt.name("x"), "Debian names are lower case, two characters or more");
        assert!(!pip.name("x.") && !pip.name("x_"), "PyPI names end alphanumeric");
        assert!(!other.name(&"x".repeat(201)));
        for v in ["2.1", "1:2.3-1ubuntu1", "1.0~rc1+dfsg"] {
            assert!(apt.version(v), "apt refused version {v}");
        }
        for v in ["2.1", "1.*", "1!2.0", "1.0+local.7", "2.0rc1", "1.0.post1"] {
            assert!(pip.version(v), "pip refused version {v}");
        }
        for v in ["2.1", "1.0-r3", "1.0~x"] {
            assert!(other.version(v), "opkg refused version {v}");
        }
        for v in ["", "-1", ">=1", "1 @ https://evil.example/x", "https://x", "1/2", "a:1", ":1", "1;id", "1,2", "1@x"]
        {
            for rules in [apt, pip, other] {
                assert!(!rules.version(v), "{rules:?} took {v:?} for a version");
            }
        }
        assert!(!pip.version("1:2") && !other.version("1:2"), "an epoch is Debian's");
    }

    #[test]
    fn writable_dirs_pass_and_missing_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        writable(dir.path()).unwrap();
        let gone = dir.path().join("gone");
        let e = writable(&gone).unwrap_err();
        assert!(e.contains("gone") && e.contains("not writable"), "{e}");
    }

    /// A read-only mount (what `ProtectSystem=full` makes of `/usr`) is refused even for root.
    /// Runs on its own thread in a private mount namespace, so the mount is never seen outside.
    #[test]
    fn a_read_only_mount_is_refused_with_the_fix_named() {
        let e =
            crate::test_support::in_private_tmpfs(nix::mount::MsFlags::MS_RDONLY, |path| writable(path).unwrap_err());
        assert!(e.contains("read-only") && e.contains("package-operations.conf"), "{e}");
    }
}
