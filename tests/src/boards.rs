//! Boards for real: lightning-rod binaries cross-built by `cross/build.sh`, run under
//! qemu-user in a lab namespace, and an emulated aarch64 board (qemu-system TCG with gpio-sim
//! and i2c-stub, `cross/vm/`) whose console the test drives.
//!
//! What a test needs and cannot find (a binary not built, no kernel, no qemu) makes it skip with
//! a message for a developer, and fail under `CI` ([`require!`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Host, Lab, Proc, wait_a_little};

/// Unwraps an `Option` of something the test needs, or skips the test (fails it under `CI`).
#[macro_export]
macro_rules! require {
    ($found:expr, $what:expr) => {
        match $found {
            Some(v) => v,
            None => {
                if std::env::var_os("CI").is_some() {
                    panic!("CI is set and this test lacks {}", $what);
                }
                eprintln!("SKIPPED: this test lacks {}", $what);
                return;
            }
        }
    };
}

/// The repository root (the tests crate is one folder below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else two levels above the test executable.
pub fn target_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return Ok(if dir.is_absolute() { dir } else { repo_root().join(dir) });
    }
    let exe = std::env::current_exe().context("current_exe")?;
    Ok(exe.ancestors().nth(3).context("the test executable is not under target/PROFILE/deps")?.to_path_buf())
}

/// The lightning-rod `cross/build.sh TARGET` built (profile `$S4T_CROSS_PROFILE`, default
/// `board`), if it exists.
pub fn cross_bin(target: &str) -> Option<PathBuf> {
    let profile = std::env::var("S4T_CROSS_PROFILE").unwrap_or_else(|_| "board".into());
    let dir = if profile == "dev" { "debug".to_owned() } else { profile };
    let path = target_dir().ok()?.join(target).join(dir).join("lightning-rod");
    path.is_file().then_some(path)
}

/// How to run a binary of `target` under qemu-user: the emulator and its arguments. binfmt_misc
/// is not mounted on CI machines, so the emulator is always called explicitly.
pub fn qemu_user(target: &str) -> Option<Vec<String>> {
    let args: &[&str] = match target {
        "armv7-unknown-linux-gnueabihf" => &["qemu-arm-static", "-L", "/usr/arm-linux-gnueabihf"],
        // Debian's armhf libc is ARMv7, so the ARMv6 glibc build runs on the default CPU here.
        "arm-unknown-linux-gnueabihf" => &["qemu-arm-static", "-L", "/usr/arm-linux-gnueabihf"],
        "aarch64-unknown-linux-gnu" => &["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"],
        "aarch64-unknown-linux-musl" => &["qemu-aarch64-static"],
        "armv7-unknown-linux-musleabihf" => &["qemu-arm-static", "-cpu", "cortex-a7"],
        // The Raspberry Pi Zero/1 CPU.
        "arm-unknown-linux-musleabihf" => &["qemu-arm-static", "-cpu", "arm1176"],
        // The Arduino Yún's AR9331.
        "mips-unknown-linux-musl" => &["qemu-mips-static", "-cpu", "24Kc"],
        _ => return None,
    };
    Some(args.iter().map(|s| s.to_string()).collect())
}

/// A command that runs the cross-built `bin` of `target` under qemu-user inside `host`.
pub fn emulated_command(host: &Host, target: &str, bin: &Path) -> Result<Command> {
    let qemu = qemu_user(target).with_context(|| format!("no qemu-user runner for {target}"))?;
    let mut cmd = host.command(&qemu[0]);
    cmd.args(&qemu[1..]).arg(bin);
    Ok(cmd)
}

/// Is `program` on PATH?
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The directory with the emulated board's kernel, i2c-stub.ko and busybox:
/// `$S4T_VM_KERNEL_DIR`, else what `cross/vm/build-kernel.sh --cached` reports (it never
/// builds: CI builds the kernel in its own stage).
pub fn vm_kernel_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("S4T_VM_KERNEL_DIR") {
        return Some(PathBuf::from(dir));
    }
    let out = Command::new("bash").arg(repo_root().join("cross/vm/build-kernel.sh")).arg("--cached").output().ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && dir.join("Image.gz").is_file()).then_some(dir)
}

/// Packs the emulated board's initramfs around a lightning-rod built for aarch64.
pub fn vm_initramfs(kernel_dir: &Path, lightning_rod: &Path, out: &Path) -> Result<()> {
    crate::run(
        Command::new("bash")
            .arg(repo_root().join("cross/vm/mkinitramfs.sh"))
            .arg(kernel_dir)
            .arg(lightning_rod)
            .arg(out),
    )?;
    Ok(())
}

/// The qemu-system-aarch64 command line of the emulated board: `-M virt` under TCG (this
/// machine's /dev/kvm cannot run guests), virtio-net with user-mode networking (the guest
/// reaches the namespace's loopback as 10.0.2.2, like a board behind NAT), virtio-rng so
/// getrandom() does not wait for entropy, the console on stdio.
pub fn vm_command(host: &Host, kernel_dir: &Path, initrd: &Path, append: &str) -> Command {
    let mut cmd = host.command("qemu-system-aarch64");
    cmd.args(["-M", "virt", "-cpu", "cortex-a53", "-m", "256", "-smp", "1", "-accel", "tcg"])
        .arg("-kernel")
        .arg(kernel_dir.join("Image.gz"))
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &format!("console=ttyAMA0 panic=-1 quiet {append}")])
        .args(["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"])
        .args(["-device", "virtio-rng-device"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"]);
    cmd
}

impl Lab {
    /// Like [`Lab::spawn`], but the process reads its standard input from the returned pipe.
    pub fn spawn_with_stdin(&mut self, name: &str, mut cmd: Command) -> Result<(&mut Proc, ChildStdin)> {
        let log = self.dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        self.procs.push(Proc { name: name.into(), log, child });
        Ok((self.procs.last_mut().expect("just pushed"), stdin))
    }
}

/// The console of an emulated board whose init answers `SEQ OP ARGS` lines with `@@ SEQ
/// RESULT` (cross/vm/init).
pub struct Console {
    log: PathBuf,
    stdin: ChildStdin,
    seq: u32,
}

impl Console {
    pub fn new(proc: &Proc, stdin: ChildStdin) -> Console {
        Console { log: proc.log.clone(), stdin, seq: 0 }
    }

    /// Everything the board printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the console shows `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(needle) {
            if Instant::now() >= deadline {
                bail!("the board's console did not show {needle:?} within {timeout:?}");
            }
            wait_a_little();
        }
        Ok(())
    }

    /// Sends one request to the board's init and returns its answer.
    pub fn ask(&mut self, request: &str, timeout: Duration) -> Result<String> {
        self.seq += 1;
        let tag = format!("@@ {} ", self.seq);
        writeln!(self.stdin, "{} {request}", self.seq).context("write to the board's console")?;
        self.stdin.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            // Kernel or agent output may share the line; the tag is unique.
            if let Some(answer) = out.lines().find_map(|l| l.find(&tag).map(|i| &l[i + tag.len()..])) {
                return Ok(answer.trim().to_owned());
            }
            if Instant::now() >= deadline {
                bail!("the board did not answer {request:?} within {timeout:?}");
            }
            wait_a_little();
        }
    }
}
