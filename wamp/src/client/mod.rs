//! The WAMP client: what the board agent (and tests, simulators, benchmarks) use.
//!
//! ```no_run
//! # async fn f() -> Result<(), s4t_wamp::Error> {
//! use std::time::Duration;
//! use s4t_wamp::{ClientAuth, ClientConfig, Payload, Secret, connect};
//! let auth = ClientAuth::WampCra { authid: "<board uuid>".into(), secret: Secret::new("<secret>") };
//! let session = connect(&ClientConfig::new("ws://cloud:8181/", "s4t", auth)).await?;
//! let prefix = format!("iotronic.{}.<board uuid>", session.id());
//! session.register(&format!("{prefix}.DevicePing"), |inv| async move { Ok(Payload::args(inv.args)) }).await?;
//! let reply = session.call("agent.stack4things.wamp_alive", vec![], Default::default(), Duration::from_secs(10)).await?;
//! let why = session.closed().await; // then reconnect and register again under the new id
//! # Ok(()) }
//! ```

mod actor;
mod connect;

use portable_atomic::{AtomicU64, Ordering};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use s4t_shared::wamp::auth::{Salting, Secret};
use s4t_shared::wamp::message::{Dict, MAX_ID, uri};
use s4t_shared::wamp::session::{ClientAuth, Welcome};
use s4t_shared::wamp::{Id, Message, Payload, Serializer};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

pub(crate) use connect::join_local;
pub use connect::{connect, connect_with_retry};

use crate::link::Keepalive;
use crate::{Error, WampError};

/// Client configuration. Clones share the WAMP-CRA derived-key cache, so reconnecting with
/// the same configuration skips PBKDF2.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://host:port/` or `wss://host:port/`.
    pub url: String,
    pub realm: String,
    pub auth: ClientAuth,
    /// Required for `wss://`: rustls (ring) configuration, e.g. pinning the cloud's CA.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub serializer: Serializer,
    pub max_message_size: usize,
    /// Invocations handled at once; more are refused with `wamp.error.unavailable`.
    pub max_concurrent_invocations: usize,
    /// Events buffered per subscription; when full, further events are dropped.
    pub event_queue: usize,
    /// TCP + TLS + WebSocket + WAMP handshakes must complete within this.
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    /// How long a REGISTER, UNREGISTER, SUBSCRIBE or acknowledged PUBLISH waits for the
    /// router's answer (a call has its own timeout): a router that never answers one must not
    /// hold the caller (a board's login) for ever.
    pub request_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    key_cache: Arc<Mutex<Option<(Salting, Secret)>>>,
}

impl ClientConfig {
    pub fn new(url: &str, realm: &str, auth: ClientAuth) -> Self {
        ClientConfig {
            url: url.to_owned(),
            realm: realm.to_owned(),
            auth,
            tls: None,
            serializer: Serializer::Json,
            max_message_size: 1 << 20,
            max_concurrent_invocations: 16,
            event_queue: 64,
            connect_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            keepalive: Some(Keepalive::default()),
            key_cache: Arc::default(),
        }
    }

    /// Derives the WAMP-CRA key for the given salting now (PBKDF2), so that the next
    /// handshake announcing this salting skips it. Does nothing for other auth methods.
    pub fn precompute_cra_key(&self, salt: &str, iterations: u32, keylen: u32) {
        if let ClientAuth::WampCra { secret, .. } = &self.auth {
            let key = s4t_shared::wamp::auth::derive_key(secret, salt, iterations, keylen);
            let salting = Salting { salt: salt.to_owned(), iterations, keylen };
            *self.key_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((salting, key));
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// GOODBYE from the router (e.g. `wamp.close.killed`, `wamp.close.system_shutdown`), or
    /// the answer to our own GOODBYE.
    Goodbye(String),
    /// ABORT from the router.
    Aborted { reason: String, message: Option<String> },
    /// The link broke (I/O error, keepalive timeout, protocol violation).
    Lost(String),
}

/// A call delivered to a registered procedure.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub args: Vec<Value>,
    pub kwargs: Dict,
    /// INVOCATION details; for callees with the `agent` role the router adds `caller`,
    /// `caller_authid`, `caller_authrole` (and `_caller_board` once known).
    pub details: Dict,
}

impl Invocation {
    /// The caller's session id, when the router disclosed it.
    pub fn caller(&self) -> Option<Id> {
        self.details.get("caller").and_then(Value::as_u64)
    }

    pub fn caller_authid(&self) -> Option<&str> {
        self.details.get("caller_authid").and_then(Value::as_str)
    }

    pub fn caller_authrole(&self) -> Option<&str> {
        self.details.get("caller_authrole").and_then(Value::as_str)
    }
}

/// An event received on a subscription.
#[derive(Debug, Clone)]
pub struct Event {
    pub publication: Id,
    pub args: Vec<Value>,
    pub kwargs: Dict,
    pub details: Dict,
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Payload, WampError>> + Send>>;
pub(crate) type Handler = Arc<dyn Fn(Invocation) -> HandlerFuture + Send + Sync>;

/// A registration made by [`Session::register`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub id: Id,
    pub procedure: String,
}

/// A subscription made by [`Session::subscribe`]: a bounded stream of events. Dropping it
/// unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pub id: Id,
    pub topic: String,
    events: mpsc::Receiver<Event>,
}

impl Subscription {
    /// The next event; `None` once the session has ended.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

/// What the actor installs once the router acknowledges a request.
pub(crate) enum Install {
    Nothing,
    Handler(Handler),
    Events(mpsc::Sender<Event>),
}

pub(crate) enum Command {
    /// Send a request and deliver the router's answer.
    Request { request: Id, msg: Message, install: Install, reply: oneshot::Sender<Result<Message, Error>> },
    /// Send without waiting for an answer (unacknowledged PUBLISH).
    Send(Message),
    /// Give up on a call (its timeout expired, or its caller left): CANCEL it.
    Cancel(Id),
    /// Give up on another request (its timeout expired, or its caller left): forget it.
    Forget(Id),
    /// Say GOODBYE.
    Leave,
}

pub(crate) struct Shared {
    pub(crate) welcome: Welcome,
    pub(crate) next_request: AtomicU64,
    pub(crate) closed: watch::Receiver<Option<CloseReason>>,
}

/// A WAMP session: a cheap handle (clones share the session) to the task that owns the link.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.id()).field("authid", &self.shared.welcome.authid).finish()
    }
}

impl Session {
    pub(crate) fn new(
        welcome: Welcome,
        commands: mpsc::Sender<Command>,
        closed: watch::Receiver<Option<CloseReason>>,
        request_timeout: Duration,
    ) -> Self {
        let shared = Arc::new(Shared { welcome, next_request: AtomicU64::new(1), closed });
        Session { shared, commands, request_timeout }
    }

    /// The session id the router assigned.
    pub fn id(&self) -> Id {
        self.shared.welcome.session
    }

    pub fn authid(&self) -> &str {
        &self.shared.welcome.authid
    }

    pub fn authrole(&self) -> &str {
        &self.shared.welcome.authrole
    }

    fn next_request(&self) -> Id {
        next_id(&self.shared.next_request)
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Sends request `msg` and waits for the router's answer, at most `within` (then
    /// [`Error::Timeout`] with `what`). A request given up (that timeout, or the caller
    /// dropping this future, as the board's agent does with its own shorter timeouts) is given
    /// up in the actor too: a call is cancelled at the router, any other forgotten. Its entry
    /// stayed until the router answered: for ever, one a call, with a router that never does.
    async fn request(
        &self,
        request: Id,
        msg: Message,
        install: Install,
        within: Duration,
        what: &'static str,
    ) -> Result<Message, Error> {
        struct GiveUp<'a> {
            commands: &'a mpsc::Sender<Command>,
            give_up: Option<Command>,
        }
        impl Drop for GiveUp<'_> {
            fn drop(&mut self) {
                if let Some(c) = self.give_up.take() {
                    let _ = self.commands.try_send(c);
                }
            }
        }
        let give_up =
            if matches!(msg, Message::Call { .. }) { Command::Cancel(request) } else { Command::Forget(request) };
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Request { request, msg, install, reply }).await.map_err(|_| Error::Closed)?;
        let mut guard = GiveUp { commands: &self.commands, give_up: Some(give_up) };
        let answer = tokio::time::timeout(within, answer).await.map_err(|_| Error::Timeout(what))?;
        guard.give_up = None; // answered, or the session is gone
        answer.map_err(|_| Error::Closed)?
    }

    /// Calls `procedure`; the call is cancelled (and fails with [`Error::Timeout`]) if no
    /// answer arrives within `timeout`, which is also passed to the router.
    pub async fn call(
        &self,
        procedure: &str,
        args: Vec<Value>,
        kwargs: Dict,
        timeout: Duration,
    ) -> Result<Payload, Error> {
        let request = self.next_request();
        let mut options = Dict::new();
        options.insert("timeout".into(), (timeout.as_millis().min(u128::from(u32::MAX)) as u64).into());
        let msg =
            Message::Call { request, options, procedure: procedure.to_owned(), payload: Payload::new(args, kwargs) };
        match self.request(request, msg, Install::Nothing, timeout, "call").await? {
            Message::Result { payload, .. } => Ok(payload),
            Message::Error { error, .. } if error == uri::TIMEOUT => Err(Error::Timeout("call")),
            other => Err(error_from(other)),
        }
    }

    /// Registers `procedure`. `handler` runs on its own task for every invocation (at most
    /// `max_concurrent_invocations` at once), so a slow handler blocks nothing else.
    pub async fn register<F, Fut>(&self, procedure: &str, handler: F) -> Result<Registration, Error>
    where
        F: Fn(Invocation) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Payload, WampError>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |inv| Box::pin(handler(inv)));
        let request = self.next_request();
        let msg = Message::Register { request, options: Dict::new(), procedure: procedure.to_owned() };
        match self.request(request, msg, Install::Handler(handler), self.request_timeout, "register").await? {
            Message::Registered { registration, .. } => {
                Ok(Registration { id: registration, procedure: procedure.to_owned() })
            }
            other => Err(error_from(other)),
        }
    }

    pub async fn unregister(&self, registration: &Registration) -> Result<(), Error> {
        let request = self.next_request();
        match self
            .request(
                request,
                Message::Unregister { request, registration: registration.id },
                Install::Nothing,
                self.request_timeout,
                "unregister",
            )
            .await?
        {
            Message::Unregistered { .. } => Ok(()),
            other => Err(error_from(other)),
        }
    }

    /// Publishes without acknowledgement (refusals are not reported).
    pub async fn publish(&self, topic: &str, args: Vec<Value>, kwargs: Dict) -> Result<(), Error> {
        let request = self.next_request();
        let msg = Message::Publish {
            request,
            options: Dict::new(),
            topic: topic.to_owned(),
            payload: Payload::new(args, kwargs),
        };
        self.commands.send(Command::Send(msg)).await.map_err(|_| Error::Closed)
    }

    /// Publishes and waits for the router's acknowledgement (or refusal).
    pub async fn publish_acked(&self, topic: &str, args: Vec<Value>, kwargs: Dict) -> Result<Id, Error> {
        let request = self.next_request();
        let mut options = Dict::new();
        options.insert("acknowledge".into(), true.into());
        let msg = Message::Publish { request, options, topic: topic.to_owned(), payload: Payload::new(args, kwargs) };
        match self.request(request, msg, Install::Nothing, self.request_timeout, "publish").await? {
            Message::Published { publication, .. } => Ok(publication),
            other => Err(error_from(other)),
        }
    }

    /// Subscribes to `topic` (one subscription per topic per session).
    pub async fn subscribe(&self, topic: &str, queue: usize) -> Result<Subscription, Error> {
        let (tx, events) = mpsc::channel(queue.max(1));
        let request = self.next_request();
        let msg = Message::Subscribe { request, options: Dict::new(), topic: topic.to_owned() };
        match self.request(request, msg, Install::Events(tx), self.request_timeout, "subscribe").await? {
            Message::Subscribed { subscription, .. } => {
                Ok(Subscription { id: subscription, topic: topic.to_owned(), events })
            }
            other => Err(error_from(other)),
        }
    }

    /// Resolves when the session has ended, with the reason.
    pub async fn closed(&self) -> CloseReason {
        let mut rx = self.shared.closed.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or(CloseReason::Lost("unknown".into())),
            Err(_) => CloseReason::Lost("session task ended".into()),
        }
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.borrow().is_some()
    }

    /// Says GOODBYE and waits (up to 2 s) for the router's answer.
    pub async fn leave(&self) {
        if self.commands.send(Command::Leave).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.closed()).await;
        }
    }
}

/// The next session-scope request id: sequential from 1, wrapping after 2^53.
pub(crate) fn next_id(counter: &AtomicU64) -> Id {
    (counter.fetch_add(1, Ordering::Relaxed) - 1) % MAX_ID + 1
}

/// Turns a non-success answer into an error.
fn error_from(msg: Message) -> Error {
    match msg {
        Message::Error { error, payload, .. } => {
            Error::Wamp(WampError { error, args: payload.args, kwargs: payload.kwargs })
        }
        other => Error::Protocol(format!("unexpected answer {}", other.name())),
    }
}
