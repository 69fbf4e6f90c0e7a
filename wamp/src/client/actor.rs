//! The session task: owns the link, matches answers to requests, runs invocation handlers on
//! their own tasks (bounded by a semaphore) and feeds subscriptions (bounded queues).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use s4t_shared::wamp::message::{Dict, code, dict_str, uri};
use s4t_shared::wamp::session::client_may_receive;
use s4t_shared::wamp::{Id, Message, Payload};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::{ClientConfig, CloseReason, Command, Event, Handler, Install, Invocation, Shared};
use crate::link::{Link, RecvError};
use crate::{Error, WampError};

struct PendingRequest {
    code: u64,
    install: Install,
    reply: oneshot::Sender<Result<Message, Error>>,
}

type Done = (Id, Result<Payload, WampError>);

pub(crate) struct Actor {
    link: Link,
    commands: mpsc::Receiver<Command>,
    commands_open: bool,
    closed: watch::Sender<Option<CloseReason>>,
    session: Id,
    pending: HashMap<Id, PendingRequest>,
    registrations: HashMap<Id, Handler>,
    subscriptions: HashMap<Id, mpsc::Sender<Event>>,
    running: HashMap<Id, AbortHandle>,
    permits: Arc<Semaphore>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    /// Shared with the handles: the request id counter.
    shared: Arc<Shared>,
    /// When our GOODBYE went out: the router has [`LEAVE_WAIT`] to answer it.
    leaving: Option<tokio::time::Instant>,
}

/// How long a router may take to answer our GOODBYE before the link is closed anyway: one
/// that never does (but answers pings) kept the session's task, its connection and its
/// handlers alive for ever, one more at every reconnect.
const LEAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Actor {
    pub(crate) fn new(
        link: Link,
        commands: mpsc::Receiver<Command>,
        closed: watch::Sender<Option<CloseReason>>,
        config: &ClientConfig,
        shared: Arc<Shared>,
    ) -> Self {
        let session = shared.welcome.session;
        let n = config.max_concurrent_invocations.max(1);
        let (done_tx, done_rx) = mpsc::channel(n);
        Actor {
            link,
            commands,
            commands_open: true,
            closed,
            session,
            pending: HashMap::new(),
            registrations: HashMap::new(),
            subscriptions: HashMap::new(),
            running: HashMap::new(),
            permits: Arc::new(Semaphore::new(n)),
            done_tx,
            done_rx,
            shared,
            leaving: None,
        }
    }

    pub(crate) async fn run(mut self) {
        let reason = self.serve().await;
        info!(session = self.session, ?reason, "WAMP session ended");
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(Error::Closed));
        }
        for (_, task) in self.running.drain() {
            task.abort();
        }
        self.subscriptions.clear();
        self.link.close().await;
        let _ = self.closed.send(Some(reason));
    }

    async fn serve(&mut self) -> CloseReason {
        loop {
            let left = self.leaving;
            let step = tokio::select! {
                biased;
                () = async { tokio::time::sleep_until(left.unwrap_or_else(tokio::time::Instant::now)).await }, if left.is_some() => {
                    Err(CloseReason::Goodbye(format!("no answer to our GOODBYE within {LEAVE_WAIT:?}")))
                }
                Some((request, result)) = self.done_rx.recv() => self.finished(request, result).await,
                cmd = self.commands.recv(), if self.commands_open => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => {
                        // Every handle is gone: leave.
                        self.commands_open = false;
                        self.command(Command::Leave).await
                    }
                },
                incoming = self.link.recv() => match incoming {
                    Ok(Some(msg)) => self.on_message(msg).await,
                    Ok(None) => Err(CloseReason::Lost("the router closed the connection".into())),
                    Err(RecvError::Fatal(e)) => Err(CloseReason::Lost(crate::error_chain(&e))),
                    Err(RecvError::Decode(e)) => {
                        warn!(session = self.session, error = %e, "invalid message from the router");
                        match e.error_reply() {
                            Some(reply) => self.send(reply).await,
                            None => self.violation(e.to_string()).await,
                        }
                    }
                },
            };
            if let Err(reason) = step {
                return reason;
            }
        }
    }

    async fn send(&mut self, msg: Message) -> Result<(), CloseReason> {
        self.link.send(Arc::new(msg)).await.map_err(|e| CloseReason::Lost(crate::error_chain(&e)))
    }

    async fn violation(&mut self, why: String) -> Result<(), CloseReason> {
        let _ = self.send(Message::abort(uri::PROTOCOL_VIOLATION, why.clone())).await;
        Err(CloseReason::Lost(format!("protocol violation: {why}")))
    }

    async fn command(&mut self, cmd: Command) -> Result<(), CloseReason> {
        match cmd {
            Command::Request { request, msg, install, reply } => {
                if let Message::Unregister { registration, .. } = &msg {
                    self.registrations.remove(registration);
                }
                self.pending.insert(request, PendingRequest { code: msg.code(), install, reply });
                self.send(msg).await
            }
            Command::Send(msg) => self.send(msg).await,
            Command::Cancel(request) => {
                if self.pending.remove(&request).is_none() {
                    return Ok(());
                }
                let mut options = Dict::new();
                options.insert("mode".into(), Value::String("killnowait".into()));
                self.send(Message::Cancel { request, options }).await
            }
            Command::Forget(request) => {
                // An answer that still comes is one for an unknown request: ignored.
                self.pending.remove(&request);
                Ok(())
            }
            Command::Leave => {
                if self.leaving.is_some() {
                    return Ok(()); // said already (the handle's leave, then its drop)
                }
                self.leaving = Some(tokio::time::Instant::now() + LEAVE_WAIT);
                self.send(Message::goodbye(uri::CLOSE_NORMAL)).await
            }
        }
    }

    async fn on_message(&mut self, msg: Message) -> Result<(), CloseReason> {
        if let Err(why) = client_may_receive(&msg) {
            return self.violation(why).await;
        }
        match msg {
            Message::Goodbye { reason, .. } => {
                if self.leaving.is_none() {
                    let _ = self.send(Message::goodbye(uri::GOODBYE_AND_OUT)).await;
                }
                Err(CloseReason::Goodbye(reason))
            }
            Message::Abort { reason, details, .. } => {
                Err(CloseReason::Aborted { reason, message: dict_str(&details, "message").map(str::to_owned) })
            }
            Message::Invocation { request, registration, details, payload } => {
                self.invoke(request, registration, details, payload).await
            }
            Message::Interrupt { request, options } => {
                if let Some(task) = self.running.remove(&request) {
                    task.abort();
                    if dict_str(&options, "mode") == Some("kill") {
                        return self
                            .send(Message::error(code::INVOCATION, request, uri::CANCELED, "interrupted"))
                            .await;
                    }
                }
                Ok(())
            }
            Message::Event { subscription, publication, details, payload } => {
                self.event(subscription, Event { publication, args: payload.args, kwargs: payload.kwargs, details })
                    .await
            }
            answer => self.answer(answer).await,
        }
    }

    /// RESULT, ERROR, REGISTERED, UNREGISTERED, SUBSCRIBED, UNSUBSCRIBED, PUBLISHED.
    async fn answer(&mut self, msg: Message) -> Result<(), CloseReason> {
        let (request, asked) = match &msg {
            Message::Result { request, .. } => (*request, code::CALL),
            Message::Error { request, request_type, .. } => (*request, *request_type),
            Message::Registered { request, .. } => (*request, code::REGISTER),
            Message::Unregistered { request } => (*request, code::UNREGISTER),
            Message::Subscribed { request, .. } => (*request, code::SUBSCRIBE),
            Message::Unsubscribed { request } => (*request, code::UNSUBSCRIBE),
            Message::Published { request, .. } => (*request, code::PUBLISH),
            other => return self.violation(format!("unexpected {}", other.name())).await,
        };
        let Some(pending) = self.pending.remove(&request) else {
            debug!(session = self.session, request, message = msg.name(), "answer to a request no one waits for");
            return Ok(());
        };
        if pending.code != asked {
            return self
                .violation(format!("{} answers request {request}, which was not a {}", msg.name(), asked))
                .await;
        }
        match (&msg, pending.install) {
            (Message::Registered { registration, .. }, Install::Handler(h)) => {
                self.registrations.insert(*registration, h);
            }
            (Message::Subscribed { subscription, .. }, Install::Events(tx)) => {
                self.subscriptions.insert(*subscription, tx);
            }
            _ => {}
        }
        let _ = pending.reply.send(Ok(msg));
        Ok(())
    }

    async fn invoke(
        &mut self,
        request: Id,
        registration: Id,
        details: Dict,
        payload: Payload,
    ) -> Result<(), CloseReason> {
        let Some(handler) = self.registrations.get(&registration).cloned() else {
            let why = format!("no registration {registration} here");
            return self.send(Message::error(code::INVOCATION, request, uri::NO_SUCH_REGISTRATION, why)).await;
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            warn!(session = self.session, "invocation refused: every handler slot is busy");
            return self.send(Message::error(code::INVOCATION, request, uri::UNAVAILABLE, "the callee is busy")).await;
        };
        let done = self.done_tx.clone();
        let invocation = Invocation { args: payload.args, kwargs: payload.kwargs, details };
        let task = tokio::spawn(async move {
            let result = match AssertUnwindSafe(handler(invocation)).catch_unwind().await {
                Ok(result) => result,
                Err(_) => Err(WampError::new("wamp.error.runtime_error", "the procedure failed unexpectedly")),
            };
            let _ = done.send((request, result)).await;
            drop(permit);
        });
        self.running.insert(request, task.abort_handle());
        Ok(())
    }

    async fn finished(&mut self, request: Id, result: Result<Payload, WampError>) -> Result<(), CloseReason> {
        if self.running.remove(&request).is_none() {
            return Ok(()); // interrupted meanwhile: the router no longer wants an answer
        }
        let msg = match result {
            Ok(payload) => Message::Yield { request, options: Dict::new(), payload },
            Err(e) => Message::Error {
                request_type: code::INVOCATION,
                request,
                details: Dict::new(),
                error: e.error,
                payload: Payload::new(e.args, e.kwargs),
            },
        };
        self.send(msg).await
    }

    async fn event(&mut self, subscription: Id, event: Event) -> Result<(), CloseReason> {
        let Some(tx) = self.subscriptions.get(&subscription) else { return Ok(()) };
        match tx.try_send(event) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(session = self.session, subscription, "subscriber is not keeping up: event dropped");
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The Subscription was dropped: unsubscribe.
                self.subscriptions.remove(&subscription);
                let request = super::next_id(&self.shared.next_request);
                self.send(Message::Unsubscribe { request, subscription }).await
            }
        }
    }
}
