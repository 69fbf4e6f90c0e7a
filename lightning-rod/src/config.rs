//! Configuration: a TOML file (default [`DEFAULT_CONFIG_PATH`]), overlaid by command-line flags
//! and `LR_*` environment variables ([`Overrides`]), then checked by [`Config::validate`].
//!
//! Unknown keys are rejected everywhere (`deny_unknown_fields`), so a typo fails loudly at start
//! instead of silently falling back to a default. Every default is a named function.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::secret::Secret;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/lightning-rod/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lightning-rod";
pub const LEGACY_SETTINGS_PATH: &str = "/etc/iotronic/settings.json";
pub const LEGACY_CONF_PATH: &str = "/etc/iotronic/iotronic.conf";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub cloud: CloudConfig,
    #[serde(default)]
    pub board: BoardConfig,
    #[serde(default)]
    pub hal: HalConfig,
    #[serde(default)]
    pub timers: TimersConfig,
    #[serde(default)]
    pub device: DeviceConfig,
    #[serde(default)]
    pub plugins: crate::plugins::PluginsConfig,
}

/// Where to enroll. After enrollment the identity (agent URL, credentials) lives in the state
/// directory, not here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Registration agent, `ws[s]://host:8181/`; used by `enroll` and by a first boot with `code`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_realm")]
    pub realm: String,
    /// One-time registration code: lets a first boot enroll without `lightning-rod enroll`.
    #[serde(default)]
    pub code: Option<Secret>,
    /// Pin of the cloud's CA, `sha256:HEX` (for `wss://`).
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
    /// The original lightning-rod's settings, imported when this board has no identity yet.
    #[serde(default = "default_legacy_settings")]
    pub legacy_settings: PathBuf,
    #[serde(default = "default_legacy_conf")]
    pub legacy_conf: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardConfig {
    /// Identity, exposed services and VPN memberships (written atomically, secrets mode 0600).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HalKind {
    /// Linux GPIO character devices and `/dev/i2c-*`.
    Cdev,
    /// An in-memory board: `GPIO0`..`GPIO27` on `gpiochip0`, I2C bus 1 with a sensor at 0x48.
    Sim,
    /// Legacy `/sys/class/gpio` (kernels before 4.8, e.g. the Arduino Yún) and `/dev/i2c-*`.
    Sysfs,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HalConfig {
    #[serde(default = "default_hal")]
    pub backend: HalKind,
    /// GPIO chips the cloud may drive (names such as `gpiochip0`); empty means every chip.
    #[serde(default)]
    pub gpio_chips: Vec<String>,
    /// I2C bus numbers the cloud may use; empty means every `/dev/i2c-N`.
    #[serde(default)]
    pub i2c_buses: Vec<u32>,
    /// Largest I2C read or write, in bytes.
    #[serde(default = "default_max_transfer")]
    pub max_transfer: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimersConfig {
    /// Opening the WebSocket and joining the realm.
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: u64,
    /// Any call to the cloud (`register`, `connection`, `notify_result`).
    #[serde(default = "default_call_timeout_s")]
    pub call_timeout_s: u64,
    /// Period of `wamp_alive`; a failed or late alive drops the session and reconnects.
    #[serde(default = "default_alive_interval_s")]
    pub alive_interval_s: u64,
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max_s")]
    pub backoff_max_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// argv run by `DeviceReboot`.
    #[serde(default = "default_reboot_command")]
    pub reboot_command: Vec<String>,
    /// argv run by `DeviceRestartLR`; empty: the agent exits with [`crate::EXIT_RESTART`] and
    /// systemd (`Restart=on-failure`) starts it again.
    #[serde(default)]
    pub restart_command: Vec<String>,
    /// Shortest delay before a reboot or restart, so the reply reaches the cloud first.
    #[serde(default = "default_min_delay_s")]
    pub min_delay_s: u64,
    /// Package managers `DevicePkgOperation` may run: name → program argv and allowed commands.
    #[serde(default = "default_package_managers")]
    pub package_managers: BTreeMap<String, PackageManager>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageManager {
    /// Program and fixed leading arguments, e.g. `["apt-get", "-y", "-q"]`.
    pub argv: Vec<String>,
    /// Sub-commands the cloud may ask for, e.g. `["install", "remove"]`.
    pub commands: Vec<String>,
    /// How a version is attached to a package name: `"{package}={version}"` for apt.
    #[serde(default = "default_version_format")]
    pub version_format: String,
    /// Directories the manager writes into. An operation is refused up front, with a message
    /// naming the directory, when one of them is not writable (e.g. a read-only `/usr` under
    /// systemd's `ProtectSystem=`), instead of letting the manager fail half-way through.
    #[serde(default)]
    pub writes: Vec<PathBuf>,
}

fn default_realm() -> String {
    "s4t".into()
}
fn default_legacy_settings() -> PathBuf {
    LEGACY_SETTINGS_PATH.into()
}
fn default_legacy_conf() -> PathBuf {
    LEGACY_CONF_PATH.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_hal() -> HalKind {
    HalKind::Cdev
}
fn default_max_transfer() -> usize {
    32
}
fn default_connect_timeout_s() -> u64 {
    10
}
fn default_call_timeout_s() -> u64 {
    10
}
fn default_alive_interval_s() -> u64 {
    60
}
fn default_backoff_initial_ms() -> u64 {
    500
}
fn default_backoff_max_s() -> u64 {
    60
}
fn default_reboot_command() -> Vec<String> {
    vec!["/sbin/reboot".into()]
}
fn default_min_delay_s() -> u64 {
    3
}
fn default_version_format() -> String {
    "{package}={version}".into()
}
fn default_package_managers() -> BTreeMap<String, PackageManager> {
    let apt = |argv: &[&str]| PackageManager {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        commands: ["install", "remove", "update", "upgrade"].map(String::from).to_vec(),
        version_format: default_version_format(),
        writes: vec!["/usr".into()],
    };
    let pip = PackageManager {
        argv: vec!["pip3".into()],
        commands: ["install", "uninstall"].map(String::from).to_vec(),
        version_format: "{package}=={version}".into(),
        writes: vec!["/usr".into()],
    };
    // Unattended: a changed conffile (such as /etc/lightning-rod/config.toml) keeps the
    // board's version instead of stopping at a prompt that stdin (/dev/null) cannot answer.
    let keep = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"];
    BTreeMap::from([
        ("apt".into(), apt(&[&["apt", "-y", "-q"][..], &keep].concat())),
        ("apt-get".into(), apt(&[&["apt-get", "-y", "-q"][..], &keep].concat())),
        ("pip3".into(), pip),
    ])
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            url: None,
            realm: default_realm(),
            code: None,
            ca_fingerprint: None,
            legacy_settings: default_legacy_settings(),
            legacy_conf: default_legacy_conf(),
        }
    }
}
impl Default for BoardConfig {
    fn default() -> Self {
        BoardConfig { state_dir: default_state_dir() }
    }
}
impl Default for HalConfig {
    fn default() -> Self {
        HalConfig {
            backend: default_hal(),
            gpio_chips: vec![],
            i2c_buses: vec![],
            max_transfer: default_max_transfer(),
        }
    }
}
impl Default for TimersConfig {
    fn default() -> Self {
        TimersConfig {
            connect_timeout_s: default_connect_timeout_s(),
            call_timeout_s: default_call_timeout_s(),
            alive_interval_s: default_alive_interval_s(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_s: default_backoff_max_s(),
        }
    }
}
impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            reboot_command: default_reboot_command(),
            restart_command: vec![],
            min_delay_s: default_min_delay_s(),
            package_managers: default_package_managers(),
        }
    }
}

impl Config {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let at = e.span().map(|s| {
                let before = text.get(..s.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("line {line}, column {column}: ")
            });
            // serde's "invalid type: integer `1234`, expected a string" quotes the value too.
            let message = match e.message().split_once(": ").zip(e.message().split_once(", expected ")) {
                Some(((kind @ ("invalid type" | "invalid value" | "invalid length"), _), (_, expected))) => {
                    format!("{kind}, expected {expected}")
                }
                _ => e.message().to_owned(),
            };
            Error::ConfigSyntax { path: origin.to_owned(), message: format!("{}{message}", at.unwrap_or_default()) }
        })
    }

    /// Reads `path`. A missing file at the default path is not an error (an unconfigured board
    /// runs on defaults and its legacy settings); a missing file named explicitly is.
    pub fn load(path: &Path, explicit: bool) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_toml(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Config::default()),
            Err(source) => Err(Error::Read { path: path.to_owned(), source }),
        }
    }

    /// Checks what the types cannot: URL schemes, ranges, non-empty commands.
    pub fn validate(&self) -> Result<()> {
        if let Some(url) = &self.cloud.url {
            validate_ws_url(url, "cloud.url")?;
        }
        if self.cloud.realm.is_empty() || !self.cloud.realm.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::invalid(format!("cloud.realm {:?}: letters, digits and _ only", self.cloud.realm)));
        }
        if let Some(code) = &self.cloud.code
            && code.is_empty()
        {
            return Err(Error::invalid("cloud.code is empty"));
        }
        if let Some(fp) = &self.cloud.ca_fingerprint {
            validate_fingerprint(fp)?;
        }
        if !self.board.state_dir.is_absolute() {
            return Err(Error::invalid(format!("board.state_dir {} must be absolute", self.board.state_dir.display())));
        }
        if !(1..=4096).contains(&self.hal.max_transfer) {
            return Err(Error::invalid(format!("hal.max_transfer {} not in 1..=4096", self.hal.max_transfer)));
        }
        for chip in &self.hal.gpio_chips {
            if !crate::hal::is_chip_name(chip) {
                return Err(Error::invalid(format!("hal.gpio_chips: {chip:?} is not a chip name like gpiochip0")));
            }
        }
        self.timers.validate()?;
        self.device.validate()?;
        self.plugins.validate()
    }
}

impl TimersConfig {
    fn validate(&self) -> Result<()> {
        let positive = [
            ("timers.connect_timeout_s", self.connect_timeout_s),
            ("timers.call_timeout_s", self.call_timeout_s),
            ("timers.alive_interval_s", self.alive_interval_s),
            ("timers.backoff_initial_ms", self.backoff_initial_ms),
            ("timers.backoff_max_s", self.backoff_max_s),
        ];
        for (name, v) in positive {
            if v == 0 || v > 86_400_000 {
                return Err(Error::invalid(format!("{name} = {v}: must be positive and sane")));
            }
        }
        if self.backoff_initial_ms > self.backoff_max_s * 1000 {
            return Err(Error::invalid("timers.backoff_initial_ms exceeds timers.backoff_max_s"));
        }
        Ok(())
    }
}

impl DeviceConfig {
    fn validate(&self) -> Result<()> {
        if self.reboot_command.is_empty() || self.reboot_command[0].is_empty() {
            return Err(Error::invalid("device.reboot_command must name a program"));
        }
        if self.restart_command.first().is_some_and(|p| p.is_empty()) {
            return Err(Error::invalid("device.restart_command must name a program or be empty"));
        }
        for (name, pm) in &self.package_managers {
            if pm.argv.is_empty() || pm.argv[0].is_empty() {
                return Err(Error::invalid(format!("device.package_managers.{name}.argv is empty")));
            }
            if pm.commands.iter().any(|c| c.is_empty() || c.starts_with('-')) {
                return Err(Error::invalid(format!("device.package_managers.{name}.commands: empty or option")));
            }
            if !pm.version_format.contains("{package}") || !pm.version_format.contains("{version}") {
                return Err(Error::invalid(format!(
                    "device.package_managers.{name}.version_format needs {{package}} and {{version}}"
                )));
            }
        }
        Ok(())
    }
}

/// `ws://` or `wss://` with a host.
pub fn validate_ws_url(url: &str, key: &str) -> Result<()> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| Error::invalid(format!("{key} {url:?}: must start with ws:// or wss://")))?;
    let host = rest.split(['/', '?']).next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(Error::invalid(format!("{key} {url:?}: no host")));
    }
    Ok(())
}

/// `sha256:` and 64 hex digits (colons between bytes allowed).
pub fn validate_fingerprint(fp: &str) -> Result<()> {
    let hex: String = fp.strip_prefix("sha256:").unwrap_or("").chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!("ca fingerprint {fp:?}: expected sha256:<64 hex digits>")));
    }
    Ok(())
}

/// Flags and environment variables that override the file, key by key.
// No `Debug`: `cloud_code` is a secret in a plain String until `apply` wraps it.
#[derive(Clone, Default, clap::Args)]
pub struct Overrides {
    /// cloud.url: the registration agent, ws[s]://HOST:8181/
    #[arg(long = "cloud-url", env = "LR_CLOUD_URL")]
    pub cloud_url: Option<String>,
    /// cloud.realm
    #[arg(long, env = "LR_REALM")]
    pub realm: Option<String>,
    /// cloud.code: one-time registration code for a first boot
    #[arg(long = "cloud-code", env = "LR_CODE", hide_env_values = true)]
    pub cloud_code: Option<String>,
    /// cloud.ca_fingerprint: sha256:HEX
    #[arg(long = "ca-fingerprint", env = "LR_CA_FINGERPRINT")]
    pub ca_fingerprint: Option<String>,
    /// cloud.legacy_settings
    #[arg(long, env = "LR_LEGACY_SETTINGS")]
    pub legacy_settings: Option<PathBuf>,
    /// cloud.legacy_conf
    #[arg(long, env = "LR_LEGACY_CONF")]
    pub legacy_conf: Option<PathBuf>,
    /// board.state_dir
    #[arg(long, env = "LR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// hal.backend
    #[arg(long, env = "LR_HAL", value_enum)]
    pub hal: Option<HalKind>,
    /// hal.gpio_chips (comma-separated)
    #[arg(long, env = "LR_GPIO_CHIPS", value_delimiter = ',')]
    pub gpio_chips: Option<Vec<String>>,
    /// hal.i2c_buses (comma-separated)
    #[arg(long, env = "LR_I2C_BUSES", value_delimiter = ',')]
    pub i2c_buses: Option<Vec<u32>>,
    /// hal.max_transfer
    #[arg(long, env = "LR_MAX_TRANSFER")]
    pub max_transfer: Option<usize>,
    /// timers.connect_timeout_s
    #[arg(long, env = "LR_CONNECT_TIMEOUT_S")]
    pub connect_timeout_s: Option<u64>,
    /// timers.call_timeout_s
    #[arg(long, env = "LR_CALL_TIMEOUT_S")]
    pub call_timeout_s: Option<u64>,
    /// timers.alive_interval_s
    #[arg(long, env = "LR_ALIVE_INTERVAL_S")]
    pub alive_interval_s: Option<u64>,
    /// timers.backoff_initial_ms
    #[arg(long, env = "LR_BACKOFF_INITIAL_MS")]
    pub backoff_initial_ms: Option<u64>,
    /// timers.backoff_max_s
    #[arg(long, env = "LR_BACKOFF_MAX_S")]
    pub backoff_max_s: Option<u64>,
    /// device.reboot_command (comma-separated argv)
    #[arg(long, env = "LR_REBOOT_COMMAND", value_delimiter = ',')]
    pub reboot_command: Option<Vec<String>>,
    /// device.restart_command (comma-separated argv)
    #[arg(long, env = "LR_RESTART_COMMAND", value_delimiter = ',')]
    pub restart_command: Option<Vec<String>>,
    /// device.min_delay_s
    #[arg(long, env = "LR_MIN_DELAY_S")]
    pub min_delay_s: Option<u64>,
}

impl Overrides {
    pub fn apply(self, c: &mut Config) {
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        if self.cloud_url.is_some() {
            c.cloud.url = self.cloud_url;
        }
        set(&mut c.cloud.realm, self.realm);
        if let Some(code) = self.cloud_code {
            c.cloud.code = Some(Secret::new(code));
        }
        if self.ca_fingerprint.is_some() {
            c.cloud.ca_fingerprint = self.ca_fingerprint;
        }
        set(&mut c.cloud.legacy_settings, self.legacy_settings);
        set(&mut c.cloud.legacy_conf, self.legacy_conf);
        set(&mut c.board.state_dir, self.state_dir);
        set(&mut c.hal.backend, self.hal);
        set(&mut c.hal.gpio_chips, self.gpio_chips);
        set(&mut c.hal.i2c_buses, self.i2c_buses);
        set(&mut c.hal.max_transfer, self.max_transfer);
        set(&mut c.timers.connect_timeout_s, self.connect_timeout_s);
        set(&mut c.timers.call_timeout_s, self.call_timeout_s);
        set(&mut c.timers.alive_interval_s, self.alive_interval_s);
        set(&mut c.timers.backoff_initial_ms, self.backoff_initial_ms);
        set(&mut c.timers.backoff_max_s, self.backoff_max_s);
        set(&mut c.device.reboot_command, self.reboot_command);
        set(&mut c.device.restart_command, self.restart_command);
        set(&mut c.device.min_delay_s, self.min_delay_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_and_validates() {
        let c = Config::from_toml("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
        assert_eq!(c.cloud.realm, "s4t");
        assert_eq!(c.board.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_file_name() {
        let err = Config::from_toml("[cloud]\nrelam = \"s4t\"\n", Path::new("/etc/x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/etc/x.toml") && msg.contains("relam"), "{msg}");
    }

    /// A syntax or type error says where, never the line itself: it may hold the registration
    /// code, and the message goes to the log (toml's own quoted the line).
    #[test]
    fn syntax_errors_do_not_quote_the_code() {
        for text in ["[cloud]\ncode = SECRET-123\n", "[cloud]\ncode = 123456789\n", "[cloud]\ncod = \"SECRET-123\"\n"] {
            let msg = Config::from_toml(text, Path::new("/etc/x.toml")).unwrap_err().to_string();
            assert!(!msg.contains("SECRET-123") && !msg.contains("123456789"), "{msg}");
            assert!(msg.contains("/etc/x.toml") && msg.contains("line 2"), "{msg}");
        }
    }

    #[test]
    fn overrides_win_over_the_file() {
        let mut c =
            Config::from_toml("[hal]\nbackend = \"cdev\"\n[timers]\nalive_interval_s = 5\n", Path::new("x")).unwrap();
        let o = Overrides {
            hal: Some(HalKind::Sim),
            alive_interval_s: Some(7),
            cloud_code: Some("CODE-1".into()),
            ..Default::default()
        };
        o.apply(&mut c);
        assert_eq!(c.hal.backend, HalKind::Sim);
        assert_eq!(c.timers.alive_interval_s, 7);
        assert_eq!(c.cloud.code.as_ref().map(Secret::expose), Some("CODE-1"));
        assert!(!format!("{c:?}").contains("CODE-1"), "the code leaked into Debug");
    }

    #[test]
    fn validate_rejects_bad_values() {
        let cases: &[(&str, &str)] = &[
            ("[cloud]\nurl = \"http://x/\"", "ws://"),
            ("[cloud]\nurl = \"ws:///\"", "no host"),
            ("[cloud]\nca_fingerprint = \"md5:00\"", "sha256"),
            ("[board]\nstate_dir = \"relative\"", "absolute"),
            ("[hal]\nmax_transfer = 0", "max_transfer"),
            ("[timers]\nalive_interval_s = 0", "alive_interval_s"),
            ("[device]\nreboot_command = []", "reboot_command"),
        ];
        for (text, needle) in cases {
            let c = Config::from_toml(text, Path::new("x")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
