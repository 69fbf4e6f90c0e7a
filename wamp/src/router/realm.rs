//! The realm: every session, registration, subscription and pending call, behind one mutex.
//!
//! **Invariant:** the lock is never held across an `.await`. Session tasks call
//! [`Realm::handle`] synchronously for each message they receive; everything the realm sends
//! goes into the target sessions' bounded outbound queues with `try_send`, so one slow
//! session can never block the realm or another session. What happens when a queue is full
//! is decided here (see [`State::deliver`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use s4t_shared::wamp::message::uri;
use s4t_shared::wamp::message::valid_id;
use s4t_shared::wamp::{Id, Message};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Limits, SessionInfo};
use crate::policy::{Action, Subject, authorize};

/// How the router ends a session it closes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Farewell {
    /// A normal close (killed by the cloud, router shutdown, overloaded): GOODBYE.
    Goodbye(&'static str),
    /// The peer broke the protocol: ABORT with a message.
    Abort(&'static str, String),
}

/// A session's off switch: cancelled by the realm (kill, overload, protocol violation) or by
/// router shutdown; the session task then says the farewell and leaves.
#[derive(Debug, Default)]
pub(crate) struct Kill {
    pub(crate) token: CancellationToken,
    farewell: OnceLock<Farewell>,
}

impl Kill {
    pub(crate) fn fire(&self, farewell: Farewell) {
        let _ = self.farewell.set(farewell);
        self.token.cancel();
    }

    pub(crate) fn farewell(&self) -> Farewell {
        self.farewell.get().cloned().unwrap_or(Farewell::Goodbye(uri::SYSTEM_SHUTDOWN))
    }
}

/// A joined session, as the realm keeps it.
pub(crate) struct Member {
    pub(crate) info: SessionInfo,
    tx: mpsc::Sender<Arc<Message>>,
    kill: Arc<Kill>,
    /// Since when the outbound queue has been full, if it is.
    stuck_since: Option<Instant>,
    /// Calls this session made that have not completed.
    pub(crate) in_flight: usize,
    pub(crate) registrations: Vec<Id>,
    pub(crate) subscriptions: Vec<Id>,
    /// Next INVOCATION request id towards this session (session scope, sequential).
    next_invocation: Id,
    /// Publication token bucket: tokens left and when it was last refilled.
    publish_tokens: f64,
    publish_refill: Instant,
}

impl Member {
    pub(crate) fn subject(&self) -> Subject<'_> {
        Subject { role: self.info.role, session: self.info.id, board: self.info.board.as_deref() }
    }

    /// Takes a publication token (`rate` per second, bursts of `burst`); false when the
    /// session publishes faster than that. Agents are not limited.
    pub(crate) fn may_publish(&mut self, rate: u32, burst: u32) -> bool {
        if self.info.role == crate::Role::Agent {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.publish_refill).as_secs_f64() * f64::from(rate);
        self.publish_tokens = (self.publish_tokens + refill).min(f64::from(burst));
        self.publish_refill = now;
        if self.publish_tokens >= 1.0 {
            self.publish_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub(crate) fn next_invocation(&mut self) -> Id {
        let id = self.next_invocation;
        self.next_invocation = if id >= s4t_shared::wamp::message::MAX_ID { 1 } else { id + 1 };
        id
    }
}

pub(crate) struct Registration {
    pub(crate) procedure: String,
    pub(crate) callee: Id,
}

pub(crate) struct Subscription {
    pub(crate) topic: String,
    pub(crate) subscribers: Vec<Id>,
}

/// A call routed to a callee and not answered yet.
pub(crate) struct Pending {
    pub(crate) caller: Id,
    /// The caller's CALL request id.
    pub(crate) request: Id,
    pub(crate) timer: tokio::task::AbortHandle,
}

/// Outcome of putting a message in a session's queue.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    Sent,
    /// The queue is full: the message was dropped.
    Full,
    /// No such session (it left).
    Gone,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) sessions: HashMap<Id, Member>,
    pub(crate) procedures: HashMap<String, Id>,
    pub(crate) registrations: HashMap<Id, Registration>,
    pub(crate) topics: HashMap<String, Id>,
    pub(crate) subscriptions: HashMap<Id, Subscription>,
    /// (callee, INVOCATION request id) → the pending call.
    pub(crate) invocations: HashMap<(Id, Id), Pending>,
    /// (caller, CALL request id) → (callee, INVOCATION request id).
    pub(crate) calls: HashMap<(Id, Id), (Id, Id)>,
    next_router_id: Id,
    pub(crate) limits: Limits,
    pub(crate) realm: String,
}

impl State {
    /// A router-scope id for a registration or subscription.
    pub(crate) fn next_router_id(&mut self) -> Id {
        self.next_router_id =
            if self.next_router_id >= s4t_shared::wamp::message::MAX_ID { 1 } else { self.next_router_id + 1 };
        self.next_router_id
    }

    /// Queues an unsolicited message (INVOCATION, EVENT, INTERRUPT) for session `to`.
    ///
    /// Each queue holds `queue_capacity` such messages plus room reserved for answers to the
    /// session's own requests (at most its in-flight call limit of results and one reply), which
    /// therefore never compete with unsolicited traffic. When the unsolicited part is full the
    /// message is dropped; a queue that has stayed full longer than `stuck_timeout` gets its
    /// session closed (`s4t.close.overloaded`), so a board that stopped reading cannot hold
    /// router memory or other sessions' calls hostage.
    pub(crate) fn deliver(&mut self, to: Id, msg: Message) -> Delivery {
        self.deliver_arc(to, Arc::new(msg))
    }

    pub(crate) fn deliver_arc(&mut self, to: Id, msg: Arc<Message>) -> Delivery {
        let stuck_timeout = self.limits.stuck_timeout;
        let Some(member) = self.sessions.get_mut(&to) else { return Delivery::Gone };
        let reserved = self.limits.in_flight_for(member.info.role) + 1;
        if member.tx.is_closed() {
            return Delivery::Gone;
        }
        if member.tx.capacity() > reserved && member.tx.try_send(msg.clone()).is_ok() {
            member.stuck_since = None;
            return Delivery::Sent;
        }
        let now = Instant::now();
        match member.stuck_since {
            None => {
                warn!(session = to, message = msg.name(), "outbound queue full: dropping messages until it drains");
                member.stuck_since = Some(now);
            }
            Some(since) if now.duration_since(since) >= stuck_timeout => {
                warn!(session = to, stuck_for = ?now.duration_since(since), "session is not reading: closing it");
                member.kill.fire(Farewell::Goodbye(uri::CLOSE_OVERLOADED));
            }
            Some(_) => debug!(session = to, message = msg.name(), "outbound queue full: message dropped"),
        }
        Delivery::Full
    }

    /// Answers session `to` about its own request (REGISTERED, RESULT, ERROR...). Room for
    /// these is reserved in every queue; if even that is exhausted the session is not reading
    /// at all: close it.
    pub(crate) fn reply(&mut self, to: Id, msg: Message) {
        let Some(member) = self.sessions.get_mut(&to) else { return };
        if let Err(TrySendError::Full(msg)) = member.tx.try_send(Arc::new(msg)) {
            warn!(session = to, message = msg.name(), "no room even for replies: closing the session");
            member.kill.fire(Farewell::Goodbye(uri::CLOSE_OVERLOADED));
        }
    }

    pub(crate) fn kill(&mut self, id: Id, farewell: Farewell) -> bool {
        match self.sessions.get(&id) {
            Some(m) => {
                m.kill.fire(farewell);
                true
            }
            None => false,
        }
    }

    /// Checks `action` on `uri` for session `sid`.
    pub(crate) fn allowed(&self, sid: Id, action: Action, uri: &str) -> bool {
        self.sessions.get(&sid).is_some_and(|m| authorize(m.subject(), action, uri))
    }
}

/// A realm (Stack4Things uses one, `s4t`).
pub(crate) struct Realm {
    pub(crate) name: String,
    state: Mutex<State>,
}

impl Realm {
    pub(crate) fn new(name: String, limits: Limits) -> Arc<Realm> {
        Arc::new(Realm { state: Mutex::new(State { limits, realm: name.clone(), ..State::default() }), name })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that is
        // worse than losing the router; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a session under a fresh random id; returns the id.
    pub(crate) fn join(
        &self,
        mut info: SessionInfo,
        tx: mpsc::Sender<Arc<Message>>,
        kill: Arc<Kill>,
        reserved: Id,
    ) -> Id {
        let mut st = self.lock();
        let mut id = reserved;
        while !valid_id(id) || st.sessions.contains_key(&id) {
            id = random_id();
        }
        info.id = id;
        debug!(session = id, authid = %info.authid, role = info.role.name(), "session joined");
        let details = super::meta::session_details(&info, &self.name);
        let burst = f64::from(st.limits.publish_burst);
        st.sessions.insert(
            id,
            Member {
                info,
                tx,
                kill,
                stuck_since: None,
                in_flight: 0,
                registrations: Vec::new(),
                subscriptions: Vec::new(),
                next_invocation: 1,
                publish_tokens: burst,
                publish_refill: Instant::now(),
            },
        );
        super::broker::publish_meta(&mut st, super::meta::ON_JOIN, vec![details.into()]);
        id
    }

    /// Removes a session and everything it owned; pending calls on both sides fail cleanly.
    pub(crate) fn leave(&self, id: Id) {
        let mut st = self.lock();
        let Some(member) = st.sessions.remove(&id) else { return };
        debug!(session = id, "session left");
        super::dealer::session_gone(&mut st, id, &member);
        super::broker::session_gone(&mut st, id, &member);
        super::broker::publish_meta(&mut st, super::meta::ON_LEAVE, vec![id.into()]);
    }

    /// Routes one message from session `sid` (already checked against the session rules).
    pub(crate) fn handle(self: &Arc<Self>, sid: Id, msg: Message) {
        let mut st = self.lock();
        match msg {
            Message::Subscribe { request, options, topic } => {
                super::broker::subscribe(&mut st, sid, request, &options, topic)
            }
            Message::Unsubscribe { request, subscription } => {
                super::broker::unsubscribe(&mut st, sid, request, subscription)
            }
            Message::Publish { request, options, topic, payload } => {
                super::broker::publish(&mut st, sid, request, &options, &topic, payload)
            }
            Message::Register { request, options, procedure } => {
                super::dealer::register(&mut st, sid, request, &options, procedure)
            }
            Message::Unregister { request, registration } => {
                super::dealer::unregister(&mut st, sid, request, registration)
            }
            Message::Call { request, options, procedure, payload } => {
                let call = super::dealer::Call { caller: sid, request, options, procedure, payload };
                super::dealer::call(self, &mut st, call)
            }
            Message::Cancel { request, options } => super::dealer::cancel(&mut st, sid, request, &options),
            Message::Yield { request, payload, .. } => super::dealer::answer(&mut st, sid, request, Ok(payload)),
            Message::Error { request, details, error, payload, .. } => {
                super::dealer::answer(&mut st, sid, request, Err((details, error, payload)))
            }
            other => debug!(session = sid, message = other.name(), "ignored"),
        }
    }

    /// A call's timer fired.
    pub(crate) fn call_timed_out(&self, callee: Id, invocation: Id) {
        super::dealer::timed_out(&mut self.lock(), callee, invocation);
    }

    pub(crate) fn kill(&self, id: Id, farewell: Farewell) -> bool {
        self.lock().kill(id, farewell)
    }

    /// Fires the kill switch of every session matching `pred`; returns their ids.
    pub(crate) fn kill_where(&self, farewell: &Farewell, pred: impl Fn(&SessionInfo) -> bool) -> Vec<Id> {
        let st = self.lock();
        st.sessions
            .values()
            .filter(|m| pred(&m.info))
            .map(|m| {
                m.kill.fire(farewell.clone());
                m.info.id
            })
            .collect()
    }

    pub(crate) fn sessions(&self) -> Vec<SessionInfo> {
        self.lock().sessions.values().map(|m| m.info.clone()).collect()
    }

    pub(crate) fn session(&self, id: Id) -> Option<SessionInfo> {
        self.lock().sessions.get(&id).map(|m| m.info.clone())
    }

    /// Sets the board uuid of a session; returns the session's role, or `None` if it is gone.
    pub(crate) fn bind_board(&self, id: Id, board: &str) -> Option<crate::Role> {
        let mut st = self.lock();
        let m = st.sessions.get_mut(&id)?;
        if m.info.role == crate::Role::Legacy {
            m.info.board = Some(board.to_owned());
        }
        Some(m.info.role)
    }
}

/// A random id in `[1, 2^53]` (global scope: sessions, publications).
pub(crate) fn random_id() -> Id {
    rand::random_range(1..=s4t_shared::wamp::message::MAX_ID)
}

/// The call timeout to apply: the caller's `timeout` option (ms) if set and non-zero,
/// otherwise the default; never more than the maximum.
pub(crate) fn call_timeout(option_ms: Option<u64>, limits: &Limits) -> Duration {
    match option_ms {
        Some(ms) if ms > 0 => Duration::from_millis(ms).min(limits.max_call_timeout),
        _ => limits.default_call_timeout,
    }
}
