//! One plugin run, whatever its kind: what it gets ([`Job`]), how it is told to stop
//! ([`StopSignal`]) and how it ended ([`End`]). Runs never execute on the agent's event loop:
//! WebAssembly runs on a thread of its own, processes are children the runtime only waits on.

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
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("uuid", &self.uuid).field("name", &self.name).finish_non_exhaustive()
    }
}

impl Job {
    /// Queues `data` for publication; false when the queue is full (the message is dropped).
    pub fn publish(&self, data: Value) -> bool {
        let t = Telemetry { plugin: self.uuid.clone(), name: self.name.clone(), data };
        self.telemetry.try_send(t).is_ok()
    }
}

/// Output of a plugin as a result: JSON when it parses, text otherwise.
pub fn output_value(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim_end_matches(['\n', '\r']);
    serde_json::from_str(trimmed).unwrap_or_else(|_| Value::String(trimmed.to_owned()))
}
