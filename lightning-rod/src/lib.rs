//! The Stack4Things board agent: keeps one authenticated WAMP session to its cloud agent,
//! answers board procedures (device, GPIO, I2C, services, network) and keeps reverse tunnels
//! and overlays up across reconnects and reboots.
//!
//! # Layout
//!
//! - [`agent`]: enrollment, login, re-registration and the reconnect loop, over the `Link` seam.
//! - [`config`]: the TOML configuration, its flag/env overlay and validation.
//! - [`legacy`]: import of the original lightning-rod's `settings.json` and `iotronic.conf`.
//! - [`secret`]: [`Secret`], the redacting wrapper for codes, board secrets and tokens.
//! - [`state`]: the state directory, written atomically (identity, services, VPNs).
//! - [`hal`]: the `GpioBackend` and `I2cBus` traits and their `sim` and `cdev` backends.
//! - [`load`]: start-up: the configuration pipeline and the board identity.
//! - [`overlay`]: TUN/TAP devices pumped over a tunnel packet channel (GRE-TAP for L2).
//! - [`plugins`]: user code: sandboxed WebAssembly (`wasmi`), process and legacy Python plugins.
//! - [`rpc`]: the board procedures as a dispatch table independent of WAMP.
//! - [`tls`]: `wss://` trusting only the cloud CA pinned by its SHA-256 fingerprint.
//! - [`error`]: the crate's error type and the exit codes it maps to.

pub mod agent;
pub mod config;
pub mod error;
pub mod hal;
pub mod legacy;
pub mod load;
pub mod netif;
pub mod overlay;
pub mod plugins;
pub mod rpc;
pub mod secret;
pub mod state;
pub mod tls;

pub use error::{Error, Result};
pub use secret::Secret;

/// The agent's version (`DeviceInfo`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What `connection` reports as `lr_version`. An original cloud omits the request dict for
/// boards older than 0.4.9 (S4T-REFERENCE §4, §11.9), so we report the original protocol level
/// we implement, 0.5.0, with our own version as a PEP 440 local label.
pub const WIRE_LR_VERSION: &str = concat!("0.5.0+rs.", env!("CARGO_PKG_VERSION"));

/// Exit code for a permanent configuration problem (sysexits `EX_CONFIG`): systemd must not
/// restart the agent (`RestartPreventExitStatus=`).
pub const EXIT_CONFIG: i32 = 78;
/// Exit code when the cloud refused this board for good (revoked, deleted, bad credentials;
/// sysexits `EX_NOPERM`): restarting cannot help until an operator re-enrolls it.
pub const EXIT_REVOKED: i32 = 77;
/// Exit code of `enroll` when the cloud did not prove it holds the pinned CA (wrong
/// `--ca-fingerprint`, or a man in the middle; sysexits `EX_PROTOCOL`): nothing was stored.
pub const EXIT_UNTRUSTED: i32 = 76;
/// Exit code of `DeviceRestartLR` without a restart command (sysexits `EX_TEMPFAIL`):
/// `Restart=on-failure` starts the agent again.
pub const EXIT_RESTART: i32 = 75;

#[cfg(test)]
pub(crate) mod test_support {
    use std::path::Path;

    use nix::mount::{MsFlags, mount};

    /// Runs `f` on a thread of its own in a private mount namespace, with a tmpfs mounted with
    /// `flags` on a fresh directory that `f` gets: the mount is never seen outside. Needs root.
    pub(crate) fn in_private_tmpfs<T: Send + 'static>(
        flags: MsFlags,
        f: impl FnOnce(&Path) -> T + Send + 'static,
    ) -> T {
        if !nix::unistd::geteuid().is_root() {
            panic!("needs root (CI runs as root): mounts a tmpfs in a private mount namespace");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).unwrap();
            mount(Some("tmpfs"), &path, Some("tmpfs"), flags, None::<&str>).unwrap();
            f(&path)
        })
        .join()
        .unwrap()
    }
}
