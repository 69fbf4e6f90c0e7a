//! One plugin run, whatever its kind: what it gets ([`Job`]), how it is told to stop
//! ([`StopSignal`]) and how it ended ([`End`]). Runs never execute on the agent's event loop:
//! WebAssembly runs on a thread of its own, processes are children the runtime only waits on.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use s4t_shared::plugin::Grants;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::PluginsConfig;
use crate::hal::Hal;

/// Tells a run to stop: wakes a sleeping WebAssembly plugin at once, is seen by a busy one at
/// its next fuel slice, and makes the supervisor of a process send SIGTERM.
#[derive(Debug, Default)]
pub struct StopSignal {
    flag: Mutex<bool>,
    cv: Condvar,
    token: CancellationToken,
}

impl StopSignal {
    pub fn stop(&self) {
        *self.flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
        self.token.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Blocks the calling (plugin) thread for `d`; true when woken by [`StopSignal::stop`].
    pub fn sleep(&self, d: Duration) -> bool {
        let guard = self.flag.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self.cv.wait_timeout_while(guard, d, |stopped| !*stopped).unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// It returned: status 0 is success; `result` is what it reported (JSON, or text).
    Done { status: i32, result: Option<Value> },
    /// The board stopped it or it broke: trap, fuel or time limit, memory, bad output.
    Failed(String),
    /// Stopped on request (`PluginStop`, `PluginRemove`, shutdown).
    Stopped,
}

/// A result or error message from a run, for a reply.
pub fn describe(end: &End) -> Value {
    match end {
        End::Done { result: Some(r), .. } => r.clone(),
        End::Done { status, result: None } => Value::String(format!("returned {status}")),
        End::Failed(why) => Value::String(why.clone()),
        End::Stopped => Value::String("stopped".into()),
    }
}

/// A call runs once against a deadline; a started plugin runs until it returns or is stopped.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Call { deadline: Instant },
    Start,
}

impl Mode {
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Mode::Call { deadline } => Some(deadline),
            Mode::Start => None,
        }
    }
}

/// What a plugin publishes: `board.<uuid>.telemetry`, one positional argument
/// `{"plugin","name","data"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub plugin: String,
    pub name: String,
    pub data: Value,
}

/// Bounded queue of telemetry between plugins and the WAMP session; full means dropped.
pub const TELEMETRY_CAPACITY: usize = 64;

/// What a telemetry message takes on the wire besides the JSON of its data, of the plugin's
/// uuid and name and the board's uuid: the WAMP PUBLISH around it
/// (`[16,<id>,{},"board.<uuid>.telemetry",[{"plugin":…,"name":…,"data":…}]]` is 73 bytes
/// more with a 16-digit request id) and a WebSocket frame header (at most 14), rounded up.
/// Charged with every message: charging the data alone let a plugin publishing `1` send a
/// hundred times its rate.
pub const TELEMETRY_MESSAGE_OVERHEAD: usize = 96;

/// Everything a run may use besides its code.
pub struct Job {
    pub uuid: String,
    pub name: String,
    pub board: String,
    pub params: Value,
    pub grants: Grants,
    pub mode: Mode,
    pub signal: Arc<StopSignal>,
    pub hal: Hal,
    pub limits: PluginsConfig,
    pub telemetry: mpsc::Sender<Telemetry>,
    /// The run's share of the uplink: what it publishes beyond it is dropped.
    pub rate: TelemetryRate,
}

/// Token bucket on the bytes a run's telemetry puts on the wire ([`Job::wire_len`];
/// `plugins.telemetry_bytes_per_s`, burst
/// `plugins.telemetry_burst_bytes`): telemetry must not queue up ahead of the agent's own
/// messages (keepalives, replies) on a slow uplink. What exceeds it is dropped and counted;
/// the first drop and, at the run's end, the count are logged.
#[derive(Debug)]
pub struct TelemetryRate {
    per_s: f64,
    burst: f64,
    bucket: Mutex<(f64, Instant)>,
    dropped: AtomicU32,
}

impl TelemetryRate {
    pub fn new(limits: &PluginsConfig) -> TelemetryRate {
        let burst = limits.telemetry_burst_bytes as f64;
        TelemetryRate {
            per_s: limits.telemetry_bytes_per_s as f64,
            burst,
            bucket: Mutex::new((burst, Instant::now())),
            dropped: AtomicU32::new(0),
        }
    }

    /// Takes `bytes` from the bucket; false (and counted) when it does not hold them.
    pub fn take(&self, bytes: usize) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, last) = *b;
        let tokens = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.per_s).min(self.burst);
        let cost = bytes as f64;
        if tokens >= cost {
            *b = (tokens - cost, now);
            return true;
        }
        *b = (tokens, now);
        drop(b);
        self.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Messages dropped so far.
    pub fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("uuid", &self.uuid).field("name", &self.name).finish_non_exhaustive()
    }
}

impl Job {
    /// What publishing `data` puts on the wire: the session sends
    /// `{"plugin":uuid,"name":name,"data":data}` on `board.<board>.telemetry`.
    pub fn wire_len(&self, data: &Value) -> usize {
        use s4t_shared::wamp::message::json_len;
        json_len(data) + json_len(&self.uuid) + json_len(&self.name) + self.board.len() + TELEMETRY_MESSAGE_OVERHEAD
    }

    /// Queues `data` for publication; false when it exceeds the run's rate or the queue is
    /// full (the message is dropped).
    pub fn publish(&self, data: Value) -> bool {
        if !self.rate.take(self.wire_len(&data)) {
            if self.rate.dropped() == 1 {
                tracing::warn!(
                    plugin = %self.name,
                    per_s = self.limits.telemetry_bytes_per_s,
                    burst = self.limits.telemetry_burst_bytes,
                    "plugin telemetry over its rate limit (plugins.telemetry_bytes_per_s); dropping the excess"
                );
            }
            return false;
        }
        let t = Telemetry { plugin: self.uuid.clone(), name: self.name.clone(), data };
        self.telemetry.try_send(t).is_ok()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let dropped = self.rate.dropped();
        if dropped > 0 {
            tracing::warn!(plugin = %self.name, dropped, "telemetry messages of this run dropped over its rate limit");
        }
    }
}

/// Output of a plugin as a result: JSON when it parses, text otherwise.
pub fn output_value(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim_end_matches(['\n', '\r']);
    serde_json::from_str(trimmed).unwrap_or_else(|_| Value::String(trimmed.to_owned()))
}
