//! The realm: every session, registration, subscription and pending call, behind one mutex.
//!
//! **Invariant:** the lock is never held across an `.await`. Session tasks call
//! [`Realm::handle`] synchronously for each message they receive; everything the realm sends
//! goes into the target sessions' bounded outbound queues with `try_send`, so one slow
//! session can never block the realm or another session. What happens when a queue is full
//! is decided here (see [`State::deliver`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use s4t_shared::wamp::message::uri;
use s4t_shared::wamp::message::valid_id;
use s4t_shared::wamp::{Id, Message};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Limits, SessionInfo};
use crate::policy::{Action, Role, Subject, authorize};

/// GOODBYE reason of a board's session closed because the board opened more than
/// `RouterConfig::max_sessions_per_board` (its oldest one goes).
pub(crate) const CLOSE_REPLACED: &str = "s4t.close.replaced";

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

/// Which part of a session's outbound queue a message counts against (see [`State::queue_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Answers to the session's own requests: never counted, their room is what is left.
    Answer,
    /// INVOCATION, EVENT, INTERRUPT.
    Unsolicited,
    /// Meta events to agents.
    Meta,
}

/// A message in a session's outbound queue.
pub(crate) struct Queued {
    msg: Arc<Message>,
    part: Part,
}

/// Messages of each counted part in a session's queue (or being taken out of it by the session
/// task), shared by the realm and the session task.
#[derive(Debug, Default)]
struct Counts {
    unsolicited: AtomicUsize,
    meta: AtomicUsize,
}

impl Counts {
    fn of(&self, part: Part) -> Option<&AtomicUsize> {
        match part {
            Part::Answer => None,
            Part::Unsolicited => Some(&self.unsolicited),
            Part::Meta => Some(&self.meta),
        }
    }

    /// Counts a message of `part` taken out of the queue.
    fn taken(&self, part: Part) {
        if let Some(n) = self.of(part) {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The session task's end of its outbound queue.
pub(crate) struct Outbox {
    rx: mpsc::Receiver<Queued>,
    counts: Arc<Counts>,
}

impl Outbox {
    /// The next message for the peer; `None` once the realm dropped the session. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Option<Arc<Message>> {
        let queued = self.rx.recv().await?;
        self.counts.taken(queued.part);
        Some(queued.msg)
    }
}

/// A joined session, as the realm keeps it.
pub(crate) struct Member {
    pub(crate) info: SessionInfo,
    tx: mpsc::Sender<Queued>,
    /// Unsolicited messages and meta events in the queue.
    counts: Arc<Counts>,
    kill: Arc<Kill>,
    /// Since when the unsolicited part of the outbound queue has been full, if it is.
    stuck_since: Option<Instant>,
    /// Meta events dropped since the meta part of an agent's queue was last found with room.
    meta_dropped: u64,
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
        if self.info.role == Role::Agent {
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

    /// Queues `msg`, counted against `part` of the queue (the caller checked it has room).
    fn send_counted(&self, msg: Arc<Message>, part: Part) -> Delivery {
        let count = self.counts.of(part);
        // Counted before it is sent, so that the session task never takes it out first.
        if let Some(n) = count {
            n.fetch_add(1, Ordering::AcqRel);
        }
        match self.tx.try_send(Queued { msg, part }) {
            Ok(()) => Delivery::Sent,
            Err(e) => {
                if let Some(n) = count {
                    n.fetch_sub(1, Ordering::AcqRel);
                }
                match e {
                    TrySendError::Full(_) => Delivery::Full,
                    TrySendError::Closed(_) => Delivery::Gone,
                }
            }
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
    /// Board uuid → its `board` sessions not closed by the realm, oldest first.
    boards: HashMap<String, VecDeque<Id>>,
    /// `RouterConfig::max_sessions_per_board`.
    max_sessions_per_board: usize,
    next_router_id: Id,
    pub(crate) limits: Limits,
    /// Unsolicited messages a session's queue may hold (`RouterConfig::queue_capacity`).
    pub(crate) queue_capacity: usize,
    /// The same for agent sessions (`RouterConfig::agent_invocations`, if larger): every
    /// board's login comes to the agent, the whole fleet's at once after a cloud restart.
    pub(crate) agent_queue_capacity: usize,
    pub(crate) realm: String,
}

impl State {
    /// A router-scope id for a registration or subscription.
    pub(crate) fn next_router_id(&mut self) -> Id {
        self.next_router_id =
            if self.next_router_id >= s4t_shared::wamp::message::MAX_ID { 1 } else { self.next_router_id + 1 };
        self.next_router_id
    }

    /// Unsolicited messages the queue of a session with `role` may hold.
    pub(crate) fn unsolicited_capacity(&self, role: Role) -> usize {
        if role == Role::Agent { self.queue_capacity.max(self.agent_queue_capacity) } else { self.queue_capacity }
    }

    /// Meta events the queue of a session with `role` may hold apart from its unsolicited
    /// part: for agents as many as unsolicited messages (a mass disconnect sends the agent one
    /// `on_leave` per board, as many as a fleet logging in sends it calls), for others none
    /// (they get meta events as ordinary events). A bound, not an allocation: the queue's
    /// memory is taken only as messages wait in it.
    pub(crate) fn meta_capacity(&self, role: Role) -> usize {
        if role == Role::Agent { self.unsolicited_capacity(role) } else { 0 }
    }

    /// The size of the outbound queue of a session with `role`: its unsolicited capacity, room
    /// reserved for answers to its own requests (its in-flight call limit of results and one
    /// more reply) and, for agents, [`State::meta_capacity`] more for meta events.
    pub(crate) fn queue_size(&self, role: Role) -> usize {
        self.unsolicited_capacity(role) + self.limits.in_flight_for(role) + 1 + self.meta_capacity(role)
    }

    /// Queues an unsolicited message (INVOCATION, EVENT, INTERRUPT) for session `to`.
    ///
    /// At most `queue_capacity` unsolicited messages (for agents: `agent_queue_capacity`) wait
    /// in a queue at once, counted apart from the answers to the session's own requests, which
    /// therefore never compete with them (see [`State::queue_size`]). When the unsolicited
    /// part is full the message is dropped; a queue whose unsolicited part stays full longer
    /// than `stuck_timeout` (found full then and now, with no delivery in between: the session
    /// took nothing out) gets its session closed (`s4t.close.overloaded`), so a board that
    /// stopped reading cannot hold router memory or other sessions' calls hostage. The first
    /// delivery that finds room ends an overflow, however long ago it began.
    pub(crate) fn deliver(&mut self, to: Id, msg: Message) -> Delivery {
        self.deliver_arc(to, Arc::new(msg))
    }

    pub(crate) fn deliver_arc(&mut self, to: Id, msg: Arc<Message>) -> Delivery {
        let stuck_timeout = self.limits.stuck_timeout;
        let (plain, agent) = (self.unsolicited_capacity(Role::Board), self.unsolicited_capacity(Role::Agent));
        let Some(member) = self.sessions.get_mut(&to) else { return Delivery::Gone };
        let capacity = if member.info.role == Role::Agent { agent } else { plain };
        if member.tx.is_closed() {
            return Delivery::Gone;
        }
        if member.counts.unsolicited.load(Ordering::Acquire) < capacity {
            match member.send_counted(msg.clone(), Part::Unsolicited) {
                Delivery::Sent => {
                    // The unsolicited part had room: whatever overflow came before is over.
                    member.stuck_since = None;
                    return Delivery::Sent;
                }
                Delivery::Gone => return Delivery::Gone,
                Delivery::Full => {}
            }
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

    /// Queues a router meta event (`wamp.session.on_join`, `on_leave`) for session `to`. The
    /// cloud learns promptly that a board went offline from these, so agents get them beyond
    /// the unsolicited part, in room of their own ([`State::meta_capacity`]), counted like
    /// the unsolicited part: were they to take whatever room is left, a burst of them would
    /// take the room reserved for the agent's replies, and the next reply would close the
    /// agent's session (see [`State::reply`]), which stops the cloud. When their room is full
    /// (a mass disconnect: thousands of boards leave within a moment) the event is dropped
    /// and counted; the wamp-agent finds boards whose session ended unnoticed by itself
    /// (`iotronic`'s `RECONCILE_SESSIONS_EVERY`, 30 s). Other sessions get them as ordinary
    /// events.
    pub(crate) fn deliver_meta(&mut self, to: Id, msg: Arc<Message>) -> Delivery {
        let capacity = self.meta_capacity(Role::Agent);
        let Some(member) = self.sessions.get_mut(&to) else { return Delivery::Gone };
        if member.info.role != Role::Agent {
            return self.deliver_arc(to, msg);
        }
        let name = msg.name();
        let delivery = if member.counts.meta.load(Ordering::Acquire) < capacity {
            member.send_counted(msg, Part::Meta)
        } else {
            Delivery::Full
        };
        match delivery {
            Delivery::Sent if member.meta_dropped > 0 => {
                warn!(
                    session = to,
                    dropped = member.meta_dropped,
                    "agent queue has room again: meta events were dropped"
                );
                member.meta_dropped = 0;
            }
            Delivery::Full => {
                if member.meta_dropped == 0 {
                    warn!(session = to, message = name, "agent queue full: dropping meta events until it drains");
                } else {
                    debug!(session = to, message = name, "agent queue full: meta event dropped");
                }
                member.meta_dropped += 1;
            }
            Delivery::Sent | Delivery::Gone => {}
        }
        delivery
    }

    /// Answers session `to` about its own request (REGISTERED, RESULT, ERROR...). Room for
    /// these is reserved in every queue; if even that is exhausted the session is not reading
    /// at all: close it.
    pub(crate) fn reply(&mut self, to: Id, msg: Message) {
        let _ = self.push_answer(to, Arc::new(msg));
    }

    /// Queues `msg` outside the unsolicited part; a full queue closes the session.
    fn push_answer(&mut self, to: Id, msg: Arc<Message>) -> Delivery {
        let Some(member) = self.sessions.get_mut(&to) else { return Delivery::Gone };
        match member.tx.try_send(Queued { msg, part: Part::Answer }) {
            Ok(()) => Delivery::Sent,
            Err(TrySendError::Full(q)) => {
                warn!(session = to, message = q.msg.name(), "no room even for replies: closing the session");
                member.kill.fire(Farewell::Goodbye(uri::CLOSE_OVERLOADED));
                Delivery::Full
            }
            Err(TrySendError::Closed(_)) => Delivery::Gone,
        }
    }

    /// Counts session `id` of board `board` (just joined), closing the board's oldest sessions
    /// so that it has at most `max_sessions_per_board` (see there why the oldest go).
    /// Sessions closed by other means (revoked, overloaded) are leaving already and do not
    /// count. Keeps a few ids per board, so a join costs no walk over every session.
    fn admit_board(&mut self, board: &str, id: Id) {
        let max = self.max_sessions_per_board.max(1);
        let sessions = &self.sessions;
        let open = self.boards.entry(board.to_owned()).or_default();
        open.retain(|s| sessions.get(s).is_some_and(|m| !m.kill.token.is_cancelled()));
        while open.len() >= max {
            let Some(oldest) = open.pop_front() else { break };
            if let Some(m) = sessions.get(&oldest) {
                info!(board, session = oldest, max, "closing the board's oldest session: too many open");
                m.kill.fire(Farewell::Goodbye(CLOSE_REPLACED));
            }
        }
        open.push_back(id);
    }

    /// Forgets session `id` of board `board` (it left).
    fn board_gone(&mut self, board: &str, id: Id) {
        if let Some(open) = self.boards.get_mut(board) {
            open.retain(|s| *s != id);
            if open.is_empty() {
                self.boards.remove(board);
            }
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
    pub(crate) fn new(
        name: String,
        limits: Limits,
        queue_capacity: usize,
        agent_queue_capacity: usize,
        max_sessions_per_board: usize,
    ) -> Arc<Realm> {
        let state = State {
            limits,
            queue_capacity,
            agent_queue_capacity,
            max_sessions_per_board,
            realm: name.clone(),
            ..State::default()
        };
        Arc::new(Realm { state: Mutex::new(state), name })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that is
        // worse than losing the router; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a session under a fresh random id (`reserved` if it is free); returns the id and
    /// the session's end of its outbound queue. A board's session beyond
    /// `max_sessions_per_board` closes the board's oldest ([`State::admit_board`]).
    pub(crate) fn join(&self, mut info: SessionInfo, kill: Arc<Kill>, reserved: Id) -> (Id, Outbox) {
        let mut st = self.lock();
        let (tx, rx) = mpsc::channel(st.queue_size(info.role));
        let counts = Arc::new(Counts::default());
        let mut id = reserved;
        while !valid_id(id) || st.sessions.contains_key(&id) {
            id = random_id();
        }
        info.id = id;
        debug!(session = id, authid = %info.authid, role = info.role.name(), "session joined");
        let details = super::meta::session_details(&info, &self.name);
        if let (Role::Board, Some(board)) = (info.role, info.board.as_deref()) {
            st.admit_board(board, id);
        }
        let burst = f64::from(st.limits.publish_burst);
        st.sessions.insert(
            id,
            Member {
                info,
                tx,
                counts: counts.clone(),
                kill,
                stuck_since: None,
                meta_dropped: 0,
                in_flight: 0,
                registrations: Vec::new(),
                subscriptions: Vec::new(),
                next_invocation: 1,
                publish_tokens: burst,
                publish_refill: Instant::now(),
            },
        );
        super::broker::publish_meta(&mut st, super::meta::ON_JOIN, vec![details.into()]);
        (id, Outbox { rx, counts })
    }

    /// Removes a session and everything it owned; pending calls on both sides fail cleanly.
    pub(crate) fn leave(&self, id: Id) {
        let mut st = self.lock();
        let Some(member) = st.sessions.remove(&id) else { return };
        debug!(session = id, "session left");
        if let (Role::Board, Some(board)) = (member.info.role, member.info.board.as_deref()) {
            st.board_gone(board, id);
        }
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

    /// Answers session `id` (see [`State::reply`]).
    pub(crate) fn reply(&self, id: Id, msg: Message) {
        self.lock().reply(id, msg);
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
    pub(crate) fn bind_board(&self, id: Id, board: &str) -> Option<Role> {
        let mut st = self.lock();
        let m = st.sessions.get_mut(&id)?;
        if m.info.role == Role::Legacy {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::TransportInfo;
    use s4t_shared::wamp::Payload;
    use s4t_shared::wamp::message::Dict;
    use serde_json::json;

    const TIMEOUT: Duration = Duration::from_secs(1);

    fn realm(queue_capacity: usize) -> Arc<Realm> {
        let limits = Limits { max_in_flight_calls: 4, stuck_timeout: TIMEOUT, ..Limits::default() };
        Realm::new("s4t".into(), limits, queue_capacity, 0, usize::MAX)
    }

    fn join(realm: &Realm, role: Role) -> (Id, Outbox, Arc<Kill>) {
        let transport = TransportInfo { peer: None, serializer: None, tls: false, host: None };
        let authid = role.name().to_owned();
        let info = SessionInfo {
            id: 0,
            authid,
            role,
            authmethod: "ticket",
            authprovider: "s4t".into(),
            board: None,
            transport,
            joined: std::time::SystemTime::now(),
        };
        let kill = Arc::new(Kill::default());
        let (id, outbox) = realm.join(info, kill.clone(), random_id());
        (id, outbox, kill)
    }

    fn event() -> Message {
        Message::Event { subscription: 1, publication: 1, details: Dict::new(), payload: Payload::default() }
    }

    fn result(request: Id) -> Message {
        Message::Result { request, details: Dict::new(), payload: Payload::default() }
    }

    /// Everything queued for a session, without waiting.
    fn drain(outbox: &mut Outbox) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        while let Ok(q) = outbox.rx.try_recv() {
            outbox.counts.taken(q.part);
            out.push(q.msg);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn replies_do_not_take_the_room_of_unsolicited_messages() {
        let realm = realm(2);
        let (board, _outbox, kill) = join(&realm, Role::Board);
        let mut st = realm.lock();
        // Results of the board's own calls, not read yet: its in-flight limit and one more.
        for request in 1..=5 {
            st.reply(board, result(request));
        }
        assert_eq!(st.deliver(board, event()), Delivery::Sent);
        assert_eq!(st.deliver(board, event()), Delivery::Sent);
        assert_eq!(st.deliver(board, event()), Delivery::Full, "two unsolicited messages at most");
        assert!(!kill.token.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_overflow_does_not_close_the_session_later() {
        let realm = realm(2);
        let (board, mut outbox, kill) = join(&realm, Role::Board);
        {
            let mut st = realm.lock();
            assert_eq!(st.deliver(board, event()), Delivery::Sent);
            assert_eq!(st.deliver(board, event()), Delivery::Sent);
            assert_eq!(st.deliver(board, event()), Delivery::Full);
        }
        assert_eq!(drain(&mut outbox).len(), 2);
        tokio::time::advance(TIMEOUT * 10).await;
        let mut st = realm.lock();
        for request in 1..=5 {
            st.reply(board, result(request));
        }
        assert_eq!(st.deliver(board, event()), Delivery::Sent, "the queue drained long ago");
        assert!(!kill.token.is_cancelled(), "the overflow of long ago is over");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_stops_reading_is_closed_after_the_stuck_timeout() {
        let realm = realm(2);
        let (board, _outbox, kill) = join(&realm, Role::Board);
        let deliver = || realm.lock().deliver(board, event());
        for _ in 0..2 {
            assert_eq!(deliver(), Delivery::Sent);
        }
        assert_eq!(deliver(), Delivery::Full);
        tokio::time::advance(TIMEOUT / 2).await;
        assert_eq!(deliver(), Delivery::Full);
        assert!(!kill.token.is_cancelled(), "not full for long enough yet");
        tokio::time::advance(TIMEOUT).await;
        assert_eq!(deliver(), Delivery::Full);
        assert_eq!(kill.farewell(), Farewell::Goodbye(uri::CLOSE_OVERLOADED));
    }

    #[tokio::test(start_paused = true)]
    async fn agents_get_every_meta_event_even_with_a_full_queue() {
        let realm = realm(2);
        let (agent, mut outbox, kill) = join(&realm, Role::Agent);
        {
            let mut st = realm.lock();
            let topic = crate::router::meta::ON_LEAVE.to_owned();
            super::super::broker::subscribe(&mut st, agent, 1, &Dict::new(), topic);
            let sent = (0..10).take_while(|_| st.deliver(agent, event()) == Delivery::Sent).count();
            assert!(sent <= 2, "the unsolicited part holds two");
            st.reply(agent, result(2));
        }
        let (board, _board_outbox, _) = join(&realm, Role::Board);
        realm.leave(board);
        let queued = drain(&mut outbox);
        let left =
            queued.iter().find(|m| matches!(&***m, Message::Event { payload, .. } if payload.args == [json!(board)]));
        assert!(left.is_some(), "no on_leave for the board among {queued:?}");
        assert!(!kill.token.is_cancelled());
        assert!(matches!(&*queued[0], Message::Subscribed { request: 1, .. }), "{queued:?}");
    }

    /// A realm whose agent (queue of 9: 2 unsolicited, 4 in-flight results + 1 reply, 2 for
    /// meta events) watches `on_leave` while 500 boards leave, none of it read yet.
    fn mass_disconnect_under_an_agent() -> (Arc<Realm>, Id, Outbox, Arc<Kill>) {
        let limits = Limits { max_in_flight_calls_agent: 4, stuck_timeout: TIMEOUT, ..Limits::default() };
        let realm = Realm::new("s4t".into(), limits, 2, 0, usize::MAX);
        let (agent, outbox, kill) = join(&realm, Role::Agent);
        {
            let mut st = realm.lock();
            let topic = crate::router::meta::ON_LEAVE.to_owned();
            super::super::broker::subscribe(&mut st, agent, 1, &Dict::new(), topic);
        }
        let boards: Vec<Id> = (0..500).map(|_| join(&realm, Role::Board).0).collect();
        for b in boards {
            realm.leave(b);
        }
        (realm, agent, outbox, kill)
    }

    /// A mass disconnect overflows even an agent's room for meta events: the events beyond
    /// are dropped, and the agent (the cloud's view of every board) stays connected.
    #[tokio::test(start_paused = true)]
    async fn a_mass_disconnect_does_not_close_the_agents_session() {
        let (realm, _, mut outbox, kill) = mass_disconnect_under_an_agent();
        assert!(!kill.token.is_cancelled(), "the agent was closed");
        let left = drain(&mut outbox).iter().filter(|m| matches!(&***m, Message::Event { .. })).count();
        assert!(left > 0 && left < 500, "{left} on_leave events queued");
        // Once it has read them, it gets the next ones again.
        let (b, _, _) = join(&realm, Role::Board);
        realm.leave(b);
        assert!(
            drain(&mut outbox)
                .iter()
                .any(|m| matches!(&**m, Message::Event { payload, .. } if payload.args == [json!(b)]))
        );
    }

    /// Meta events count against their own share of an agent's queue: a mass disconnect the
    /// agent has not read yet leaves the room reserved for its replies free, so a reply then
    /// is queued, and the agent's session (the cloud's view of every board) is not closed.
    #[tokio::test(start_paused = true)]
    async fn meta_events_do_not_take_the_room_of_the_agents_replies() {
        let (realm, agent, mut outbox, kill) = mass_disconnect_under_an_agent();
        // Not drained: the agent has read nothing since it subscribed. Its calls' results
        // still find their room.
        for request in 7..=10 {
            realm.reply(agent, result(request));
        }
        assert!(!kill.token.is_cancelled(), "a reply closed the agent: meta events took its room");
        let queued = drain(&mut outbox);
        for request in 7..=10 {
            assert!(
                queued.iter().any(|m| matches!(&**m, Message::Result { request: r, .. } if *r == request)),
                "result {request} is not queued: {queued:?}"
            );
        }
        let left = queued.iter().filter(|m| matches!(&***m, Message::Event { .. })).count();
        assert_eq!(left, 2, "meta events beyond their share are dropped");
    }

    #[tokio::test]
    async fn boards_call_only_agents_whatever_the_procedure_is_named() {
        let realm = realm(8);
        let (a, mut a_outbox, _) = join(&realm, Role::Board);
        let (b, mut b_outbox, _) = join(&realm, Role::Legacy);
        // A registration no board can make any more (see `policy`), made anyway.
        let procedure = format!("iotronic.{a}.x.stack4things.connection");
        {
            let mut st = realm.lock();
            let registration = st.next_router_id();
            st.procedures.insert(procedure.clone(), registration);
            st.registrations.insert(registration, Registration { procedure: procedure.clone(), callee: a });
        }
        let call = Message::Call { request: 1, options: Dict::new(), procedure, payload: Payload::default() };
        realm.handle(b, call);
        let answers = drain(&mut b_outbox);
        let refused =
            |m: &Message| matches!(m, Message::Error { request: 1, error, .. } if error == uri::NOT_AUTHORIZED);
        assert!(answers.first().is_some_and(|m| refused(m)), "{answers:?}");
        assert!(!drain(&mut a_outbox).iter().any(|m| matches!(&**m, Message::Invocation { .. })));
    }
}
