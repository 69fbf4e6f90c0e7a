//! Board procedures, independent of WAMP: a closed set of [`Method`]s, each an async handler
//! taking the request dict and the positional arguments and returning a [`Reply`], the
//! `{"message","result","req_id"}` JSON string of docs/protocols.md.
//!
//! **Invariant:** no input makes a handler panic; every bad argument becomes an ERROR reply
//! naming the procedure and the argument, and the agent goes on serving.

mod args;
pub(crate) mod device;
mod hw;
mod plugins;
pub mod services;
pub mod vpn;

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::DeviceConfig;
use crate::error::Error;
use crate::hal::{GpioEvent, Hal};
pub use services::{ServiceManager, TunnelOpener};
pub use vpn::{PacketOpener, VpnManager};

/// `result` of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    Success,
    Error,
    Warning,
    Running,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reply {
    pub message: Value,
    pub result: Outcome,
    pub req_id: Option<String>,
}

impl Reply {
    pub fn success(req_id: Option<String>, message: impl Serialize) -> Reply {
        Reply { message: serde_json::to_value(message).unwrap_or(Value::Null), result: Outcome::Success, req_id }
    }
    pub fn error(req_id: Option<String>, message: impl std::fmt::Display) -> Reply {
        Reply { message: Value::String(message.to_string()), result: Outcome::Error, req_id }
    }
    /// The wire form: a JSON string (the original cloud does `json.loads` on it). A reply
    /// longer than [`MAX_REPLY_LEN`] as it travels becomes an error reply saying so: the
    /// cloud's router closes a board's session on a message over 1 MiB, which would end every
    /// other call in flight and make the board reconnect.
    pub fn to_wire(&self) -> String {
        let wire =
            serde_json::to_string(self).unwrap_or_else(|_| r#"{"message":"unserializable","result":"ERROR"}"#.into());
        let len = s4t_shared::wamp::message::json_len(wire.as_str());
        if len <= MAX_REPLY_LEN {
            return wire;
        }
        let why = format!("the reply is {len} bytes, more than the cloud takes ({MAX_REPLY_LEN})");
        serde_json::to_string(&Reply::error(self.req_id.clone(), why)).unwrap_or_default()
    }
}

/// Longest reply (or notification) a board sends, counted as it travels: the wire string
/// escaped inside a WAMP message. The rest of the 1 MiB is room for the message's header.
pub const MAX_REPLY_LEN: usize = (1 << 20) - 16 * 1024;

/// The board's procedures. Names are the wire names of S4T-REFERENCE §5.4 and docs/protocols.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    DevicePing,
    DeviceEcho,
    DeviceInfo,
    DeviceNetConfig,
    DeviceReboot,
    DeviceRestartLR,
    DevicePkgOperation,
    GpioList,
    GpioRead,
    GpioWrite,
    GpioDirection,
    GpioWatch,
    I2cList,
    I2cRead,
    I2cWrite,
    ServiceEnable,
    ServiceDisable,
    ServiceRestore,
    ServicesStatus,
    VpnJoin,
    VpnLeave,
    PluginInject,
    PluginStart,
    PluginStop,
    PluginCall,
    PluginStatus,
    PluginReboot,
    PluginRemove,
}

impl Method {
    pub const ALL: [Method; 28] = [
        Method::DevicePing,
        Method::DeviceEcho,
        Method::DeviceInfo,
        Method::DeviceNetConfig,
        Method::DeviceReboot,
        Method::DeviceRestartLR,
        Method::DevicePkgOperation,
        Method::GpioList,
        Method::GpioRead,
        Method::GpioWrite,
        Method::GpioDirection,
        Method::GpioWatch,
        Method::I2cList,
        Method::I2cRead,
        Method::I2cWrite,
        Method::ServiceEnable,
        Method::ServiceDisable,
        Method::ServiceRestore,
        Method::ServicesStatus,
        Method::VpnJoin,
        Method::VpnLeave,
        Method::PluginInject,
        Method::PluginStart,
        Method::PluginStop,
        Method::PluginCall,
        Method::PluginStatus,
        Method::PluginReboot,
        Method::PluginRemove,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::DevicePing => "DevicePing",
            Method::DeviceEcho => "DeviceEcho",
            Method::DeviceInfo => "DeviceInfo",
            Method::DeviceNetConfig => "DeviceNetConfig",
            Method::DeviceReboot => "DeviceReboot",
            Method::DeviceRestartLR => "DeviceRestartLR",
            Method::DevicePkgOperation => "DevicePkgOperation",
            Method::GpioList => "GpioList",
            Method::GpioRead => "GpioRead",
            Method::GpioWrite => "GpioWrite",
            Method::GpioDirection => "GpioDirection",
            Method::GpioWatch => "GpioWatch",
            Method::I2cList => "I2cList",
            Method::I2cRead => "I2cRead",
            Method::I2cWrite => "I2cWrite",
            Method::ServiceEnable => "ServiceEnable",
            Method::ServiceDisable => "ServiceDisable",
            Method::ServiceRestore => "ServiceRestore",
            Method::ServicesStatus => "ServicesStatus",
            Method::VpnJoin => "VpnJoin",
            Method::VpnLeave => "VpnLeave",
            Method::PluginInject => "PluginInject",
            Method::PluginStart => "PluginStart",
            Method::PluginStop => "PluginStop",
            Method::PluginCall => "PluginCall",
            Method::PluginStatus => "PluginStatus",
            Method::PluginReboot => "PluginReboot",
            Method::PluginRemove => "PluginRemove",
        }
    }

    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A notification for `<agent>.stack4things.notify_result`: the final reply of a RUNNING call.
pub type Notification = Reply;

/// Bounded queue capacities between procedures and the WAMP session task.
pub const NOTIFY_CAPACITY: usize = 64;

/// What a process-level procedure asks of the agent's main loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Exit with [`crate::EXIT_RESTART`] so systemd starts the agent again.
    Restart,
}

/// Everything the handlers need; shared by every call.
pub struct Context {
    pub board_uuid: String,
    pub hal: Hal,
    pub device: DeviceConfig,
    /// RUNNING calls report here; the session task forwards to `notify_result` (and keeps
    /// them while offline, up to the channel's bound).
    pub notify: mpsc::Sender<Notification>,
    /// GPIO edges from the HAL; the session task publishes them on `board.<uuid>.gpio`.
    pub gpio_events: mpsc::Sender<GpioEvent>,
    pub lifecycle: mpsc::Sender<Lifecycle>,
    pub services: Arc<ServiceManager>,
    pub vpns: Arc<VpnManager>,
    /// Injected plugins and their runs (`Plugin*`).
    pub plugins: Arc<crate::plugins::PluginManager>,
    /// Cancelled at shutdown: background work (reboot timers, package operations) stops.
    pub shutdown: CancellationToken,
    /// Held by the running package operation: one at a time (package managers take their own
    /// locks and fail, or worse, when run side by side; each runs until it ends), and by a
    /// reboot or restart from when it happens until the agent stops.
    pub package_operation: Arc<tokio::sync::Mutex<()>>,
    /// The reboot or restart waiting for its delay, if any (cancelled to call it off): at most
    /// one waits, a new one replaces it.
    pub power: std::sync::Mutex<Option<CancellationToken>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("board_uuid", &self.board_uuid).finish_non_exhaustive()
    }
}

/// One call: the request dict (first positional argument) and the rest.
#[derive(Debug, Clone, Default)]
pub struct Call {
    pub req: Value,
    pub args: Vec<Value>,
}

impl Call {
    /// From the WAMP positional arguments: `[req, arg1, ...]`.
    pub fn from_positional(mut positional: Vec<Value>) -> Call {
        if positional.is_empty() {
            return Call { req: Value::Null, args: vec![] };
        }
        let req = positional.remove(0);
        Call { req, args: positional }
    }

    /// `req["uuid"]`, echoed as `req_id`.
    pub fn req_id(&self) -> Option<String> {
        self.req.get("uuid").and_then(Value::as_str).map(str::to_owned)
    }
}

/// Runs `method`. Never panics on input; bad arguments give an ERROR reply.
pub async fn dispatch(ctx: &Arc<Context>, method: Method, call: Call) -> Reply {
    let req_id = call.req_id();
    if !call.req.is_object() {
        return Reply::error(
            req_id,
            format!("{}: the first argument must be the request dict {{\"uuid\", ...}}", method.name()),
        );
    }
    // Each module's future boxed: its state machine is not inlined into this one (which every
    // procedure's handler polls), keeping the board binary within its size budget.
    let result = match method {
        Method::DevicePing
        | Method::DeviceEcho
        | Method::DeviceInfo
        | Method::DeviceNetConfig
        | Method::DeviceReboot
        | Method::DeviceRestartLR
        | Method::DevicePkgOperation => Box::pin(device::call(ctx, method, &call)).await,
        Method::GpioList
        | Method::GpioRead
        | Method::GpioWrite
        | Method::GpioDirection
        | Method::GpioWatch
        | Method::I2cList
        | Method::I2cRead
        | Method::I2cWrite => Box::pin(hw::call(ctx, method, &call)).await,
        Method::ServiceEnable | Method::ServiceDisable | Method::ServiceRestore | Method::ServicesStatus => {
            Box::pin(services::call(ctx, method, &call)).await
        }
        Method::VpnJoin | Method::VpnLeave => Box::pin(vpn::call(ctx, method, &call)).await,
        Method::PluginInject
        | Method::PluginStart
        | Method::PluginStop
        | Method::PluginCall
        | Method::PluginStatus
        | Method::PluginReboot
        | Method::PluginRemove => Box::pin(plugins::call(ctx, method, &call)).await,
    };
    match result {
        Ok(reply) => Reply { req_id, ..reply },
        Err(e) => {
            tracing::warn!(method = method.name(), cause = %e, "procedure failed");
            Reply::error(req_id, format!("{}: {e}", method.name()))
        }
    }
}

/// Shorthand for handlers: a SUCCESS reply whose `req_id` `dispatch` fills in.
pub(crate) fn ok(message: impl Serialize) -> Result<Reply, Error> {
    Ok(Reply::success(None, message))
}

pub(crate) fn message(v: Value) -> Result<Reply, Error> {
    ok(v)
}

#[allow(dead_code)]
pub(crate) fn running() -> Reply {
    Reply { message: json!("RUNNING"), result: Outcome::Running, req_id: None }
}

#[cfg(test)]
mod tests;
