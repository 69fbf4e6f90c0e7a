//! The seam between the agent and its WAMP client: the few operations the board needs from a
//! session. The agent's logic (enrollment, login, re-registration, liveness, notifications)
//! is written against these traits; `wamp.rs` implements them with `s4t_wamp`, and the unit
//! tests with an in-memory fake.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::Result;
use crate::rpc::services::BoxFuture;
use crate::secret::Secret;

/// How a session authenticates (docs/protocols.md, "WAMP authentication and roles").
#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    /// Legacy boards migrated from the original lightning-rod, and enrollment with an original
    /// cloud.
    Anonymous,
    Ticket {
        authid: String,
        ticket: Secret,
    },
    WampCra {
        authid: String,
        secret: Secret,
    },
}

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub url: String,
    pub realm: String,
    pub auth: Auth,
    pub ca_fingerprint: Option<String>,
    pub timeout: Duration,
}

/// What a registered procedure answers: positional results, or a WAMP error URI and message.
pub type HandlerResult = std::result::Result<Vec<Value>, (String, String)>;

/// Handles one invocation: positional and keyword arguments in, result out.
pub type Handler = Arc<dyn Fn(Vec<Value>, Map<String, Value>) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// One joined WAMP session.
pub trait Link: Send + Sync {
    fn session_id(&self) -> u64;
    /// Calls `procedure`; returns the first positional result (`Null` when there is none).
    fn call(&self, procedure: String, args: Vec<Value>, kwargs: Map<String, Value>) -> BoxFuture<'_, Result<Value>>;
    fn register(&self, procedure: String, handler: Handler) -> BoxFuture<'_, Result<()>>;
    fn publish(&self, topic: String, args: Vec<Value>, kwargs: Map<String, Value>) -> BoxFuture<'_, Result<()>>;
    /// Resolves when the session has ended (router gone, network down, closed).
    fn closed(&self) -> BoxFuture<'_, ()>;
    /// Leaves the realm and closes the transport.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Opens sessions. Errors must distinguish a refusal by the router (authentication failed,
/// not authorized: [`crate::Error::Revoked`]) from transient trouble ([`crate::Error::Wamp`]).
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, options: ConnectOptions) -> BoxFuture<'_, Result<Box<dyn Link>>>;
}
