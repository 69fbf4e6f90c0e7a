//! `[plugins]` of the board configuration: limits on user code, and the hardware and plugin
//! kinds the board owner allows.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// User code on the board (`Plugin*` procedures): limits, and what the board owner allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Plugin runs at once (calls and started plugins of every kind); more are refused.
    #[serde(default = "default_plugin_max_running")]
    pub max_running: usize,
    /// Largest plugin `code` accepted by `PluginInject`, in bytes after base64 decoding.
    #[serde(default = "default_plugin_max_code_bytes")]
    pub max_code_bytes: usize,
    /// Plugins injected at once: each holds its code on disk and, for WebAssembly, its
    /// compiled module in memory. Injecting another is refused until one is removed.
    #[serde(default = "default_plugin_max_plugins")]
    pub max_plugins: usize,
    /// Largest linear memory a WebAssembly plugin may have.
    #[serde(default = "default_plugin_memory_bytes")]
    pub memory_limit_bytes: usize,
    /// Fuel (about one per WebAssembly instruction) a run may hold: a call's budget, and what
    /// a started plugin may spend without sleeping. Sleeping earns it back in proportion to the
    /// time slept (all of it per second of sleep), so a run never executes more than `fuel`
    /// plus `fuel` a second slept. A plugin that burns it is stopped and reported. Fuel
    /// catches a plugin that never sleeps; what it costs in CPU depends on the board's speed,
    /// so the CPU a plugin may use is bounded by `cpu_share`.
    #[serde(default = "default_plugin_fuel")]
    pub fuel: u64,
    /// Share of one core a WebAssembly run may use on average, measured in the CPU time of its
    /// thread (0.01 to 1): after a burst of one second of CPU, a run that uses more is made to
    /// wait (not stopped) until its average is back within the share. Together, plugins use at
    /// most `max_running` times this.
    #[serde(default = "default_plugin_cpu_share")]
    pub cpu_share: f64,
    /// Wall-clock limit of one `PluginCall`, every kind.
    #[serde(default = "default_plugin_call_timeout_s")]
    pub call_timeout_s: u64,
    /// Largest result, telemetry message or output line a plugin may produce.
    #[serde(default = "default_plugin_max_output_bytes")]
    pub max_output_bytes: usize,
    /// Telemetry one run may publish, in bytes on the wire a second on average (each message
    /// costs its data, the plugin's uuid and name and about 100 bytes of framing); more is
    /// dropped (the plugin's `publish` fails), so plugins cannot crowd the agent's own
    /// messages off a slow uplink.
    #[serde(default = "default_plugin_telemetry_bytes_per_s")]
    pub telemetry_bytes_per_s: u64,
    /// Telemetry one run may publish at once, in bytes, before `telemetry_bytes_per_s` applies.
    /// A message costing more than this is always dropped.
    #[serde(default = "default_plugin_telemetry_burst_bytes")]
    pub telemetry_burst_bytes: u64,
    /// GPIO lines a plugin may be granted (the injection names which it gets).
    #[serde(default)]
    pub allow_gpio: Vec<String>,
    /// I2C devices a plugin may be granted, e.g. `[{ bus = 1, address = 0x48 }]`.
    #[serde(default)]
    pub allow_i2c: Vec<s4t_shared::plugin::I2cGrant>,
    /// Accept process plugins (an executable run as `run_as` with a timeout). Off by default.
    #[serde(default)]
    pub process: bool,
    /// Accept legacy Python plugins (the original pickled `Worker` class, run by `python_bin`).
    #[serde(default)]
    pub python: bool,
    #[serde(default = "default_plugin_python_bin")]
    pub python_bin: String,
    /// Unprivileged user process and Python plugins run as: not root, not the agent's user. The
    /// agent must be able to switch to it (root, or the capabilities of
    /// systemd/lightning-rod.service); otherwise process and Python plugins are refused. Best a
    /// user of their own: every process of this user counts against `max_processes`.
    #[serde(default = "default_plugin_run_as")]
    pub run_as: String,
    /// `RLIMIT_NPROC` of process and Python plugins: processes and threads of `run_as`, counted
    /// over all its processes (every run of every plugin together, and anything else running
    /// as that user). A fork bomb stops there; a run that starts while the user is at the
    /// limit fails.
    #[serde(default = "default_plugin_max_processes")]
    pub max_processes: u64,
    /// `RLIMIT_FSIZE` of process and Python plugins: the largest file one may write (a larger
    /// write fails and the process gets SIGXFSZ). Core dumps are off (`RLIMIT_CORE` 0).
    #[serde(default = "default_plugin_max_file_bytes")]
    pub max_file_bytes: u64,
}

fn default_plugin_max_running() -> usize {
    4
}
fn default_plugin_max_code_bytes() -> usize {
    768 * 1024
}
fn default_plugin_max_plugins() -> usize {
    32
}
fn default_plugin_memory_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_plugin_fuel() -> u64 {
    500_000_000
}
fn default_plugin_cpu_share() -> f64 {
    0.25
}
fn default_plugin_call_timeout_s() -> u64 {
    30
}
fn default_plugin_max_output_bytes() -> usize {
    64 * 1024
}
fn default_plugin_telemetry_bytes_per_s() -> u64 {
    16 * 1024
}
fn default_plugin_telemetry_burst_bytes() -> u64 {
    64 * 1024
}
fn default_plugin_python_bin() -> String {
    "python3".into()
}
fn default_plugin_run_as() -> String {
    "nobody".into()
}
fn default_plugin_max_processes() -> u64 {
    128
}
fn default_plugin_max_file_bytes() -> u64 {
    16 << 20
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            max_running: default_plugin_max_running(),
            max_code_bytes: default_plugin_max_code_bytes(),
            max_plugins: default_plugin_max_plugins(),
            memory_limit_bytes: default_plugin_memory_bytes(),
            fuel: default_plugin_fuel(),
            cpu_share: default_plugin_cpu_share(),
            call_timeout_s: default_plugin_call_timeout_s(),
            max_output_bytes: default_plugin_max_output_bytes(),
            telemetry_bytes_per_s: default_plugin_telemetry_bytes_per_s(),
            telemetry_burst_bytes: default_plugin_telemetry_burst_bytes(),
            allow_gpio: vec![],
            allow_i2c: vec![],
            process: false,
            python: false,
            python_bin: default_plugin_python_bin(),
            run_as: default_plugin_run_as(),
            max_processes: default_plugin_max_processes(),
            max_file_bytes: default_plugin_max_file_bytes(),
        }
    }
}

impl PluginsConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        // The rlimits fit a 32-bit `rlim_t` (32-bit glibc boards).
        let ranges: [(&str, u64, std::ops::RangeInclusive<u64>); 11] = [
            ("plugins.max_running", self.max_running as u64, 1..=256),
            ("plugins.max_code_bytes", self.max_code_bytes as u64, 1024..=64 << 20),
            ("plugins.max_plugins", self.max_plugins as u64, 1..=4096),
            ("plugins.memory_limit_bytes", self.memory_limit_bytes as u64, 65_536..=1 << 30),
            ("plugins.fuel", self.fuel, 1_000..=u64::MAX / 2),
            ("plugins.call_timeout_s", self.call_timeout_s, 1..=3600),
            ("plugins.max_output_bytes", self.max_output_bytes as u64, 64..=16 << 20),
            ("plugins.telemetry_bytes_per_s", self.telemetry_bytes_per_s, 1..=16 << 20),
            ("plugins.telemetry_burst_bytes", self.telemetry_burst_bytes, 64..=16 << 20),
            ("plugins.max_processes", self.max_processes, 1..=1 << 20),
            ("plugins.max_file_bytes", self.max_file_bytes, 4096..=1 << 31),
        ];
        for (name, v, range) in ranges {
            if !range.contains(&v) {
                return Err(Error::invalid(format!("{name} = {v}: not in {}..={}", range.start(), range.end())));
            }
        }
        // Written this way round, NaN is refused too.
        if !(0.01..=1.0).contains(&self.cpu_share) {
            return Err(Error::invalid(format!("plugins.cpu_share = {}: not in 0.01..=1", self.cpu_share)));
        }
        if let Some(a) = self.allow_i2c.iter().find(|g| !(0x03..=0x77).contains(&g.address)) {
            return Err(Error::invalid(format!("plugins.allow_i2c: address {:#04x} is not 0x03..=0x77", a.address)));
        }
        if self.python_bin.is_empty() || self.run_as.is_empty() {
            return Err(Error::invalid("plugins.python_bin and plugins.run_as must not be empty"));
        }
        Ok(())
    }
}
