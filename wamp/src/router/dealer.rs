//! The dealer: REGISTER/UNREGISTER, CALL → INVOCATION, YIELD/ERROR → RESULT/ERROR, CANCEL and
//! call timeouts (→ INTERRUPT to the callee, ERROR to the caller).
//!
//! Only exact-match, single-callee registrations exist. Cancel mode `kill` is treated as
//! `killnowait`: the caller gets its ERROR at once and a late answer from the callee is
//! dropped, so a callee that ignores INTERRUPT cannot hold its caller.

use std::sync::Arc;

use s4t_shared::wamp::message::{Dict, code, dict_str, dict_u64, uri};
use s4t_shared::wamp::validate::excerpt;
use s4t_shared::wamp::{Id, Message, Payload};
use serde_json::Value;
use tracing::debug;

use super::realm::{Delivery, Farewell, Member, Pending, Realm, Registration, State, call_timeout};
use crate::policy::{Action, Role};

pub(crate) fn register(st: &mut State, sid: Id, request: Id, options: &Dict, procedure: String) {
    let fail =
        |st: &mut State, error: &str, why: String| st.reply(sid, Message::error(code::REGISTER, request, error, why));
    if !st.allowed(sid, Action::Register, &procedure) {
        return fail(st, uri::NOT_AUTHORIZED, format!("session {sid} may not register {procedure}"));
    }
    if let Some(m) = dict_str(options, "match").filter(|m| *m != "exact") {
        return fail(st, uri::INVALID_ARGUMENT, format!("match policy {} is not supported", excerpt(m)));
    }
    if let Some(i) = dict_str(options, "invoke").filter(|i| *i != "single") {
        return fail(st, uri::INVALID_ARGUMENT, format!("invocation policy {} is not supported", excerpt(i)));
    }
    if st.procedures.contains_key(&procedure) {
        return fail(st, uri::PROCEDURE_ALREADY_EXISTS, format!("{procedure} is already registered"));
    }
    let max = st.limits.max_registrations;
    if st.sessions.get(&sid).is_none_or(|m| m.registrations.len() >= max) {
        return fail(st, uri::LIMIT_EXCEEDED, format!("at most {max} registrations per session"));
    }
    let id = st.next_router_id();
    st.procedures.insert(procedure.clone(), id);
    st.registrations.insert(id, Registration { procedure, callee: sid });
    if let Some(m) = st.sessions.get_mut(&sid) {
        m.registrations.push(id);
    }
    st.reply(sid, Message::Registered { request, registration: id });
}

pub(crate) fn unregister(st: &mut State, sid: Id, request: Id, registration: Id) {
    if st.registrations.get(&registration).is_none_or(|r| r.callee != sid) {
        let why = format!("no registration {registration} of this session");
        return st.reply(sid, Message::error(code::UNREGISTER, request, uri::NO_SUCH_REGISTRATION, why));
    }
    remove_registration(st, registration);
    if let Some(m) = st.sessions.get_mut(&sid) {
        m.registrations.retain(|r| *r != registration);
    }
    st.reply(sid, Message::Unregistered { request });
}

fn remove_registration(st: &mut State, registration: Id) {
    if let Some(reg) = st.registrations.remove(&registration) {
        st.procedures.remove(&reg.procedure);
    }
}

/// A CALL as the dealer receives it.
pub(crate) struct Call {
    pub(crate) caller: Id,
    pub(crate) request: Id,
    pub(crate) options: Dict,
    pub(crate) procedure: String,
    pub(crate) payload: Payload,
}

pub(crate) fn call(realm: &Arc<Realm>, st: &mut State, call: Call) {
    let Call { caller, request, options, procedure, payload } = call;
    let fail =
        |st: &mut State, error: &str, why: String| st.reply(caller, Message::error(code::CALL, request, error, why));
    if st.calls.contains_key(&(caller, request)) {
        let why = format!("CALL request id {request} reused while that call is in flight");
        st.kill(caller, Farewell::Abort(uri::PROTOCOL_VIOLATION, why));
        return;
    }
    if !st.allowed(caller, Action::Call, &procedure) {
        return fail(st, uri::NOT_AUTHORIZED, format!("session {caller} may not call {procedure}"));
    }
    let max = st.sessions.get(&caller).map_or(0, |m| st.limits.in_flight_for(m.info.role));
    if st.sessions.get(&caller).is_none_or(|m| m.in_flight >= max) {
        return fail(st, uri::LIMIT_EXCEEDED, format!("at most {max} calls in flight per session"));
    }
    if s4t_shared::wamp::validate::reserved_uri(&procedure) {
        let reply = super::meta::call(st, caller, request, &procedure, payload);
        return st.reply(caller, reply);
    }
    let Some(&registration) = st.procedures.get(&procedure) else {
        return fail(st, uri::NO_SUCH_PROCEDURE, format!("no procedure {procedure}"));
    };
    let callee = st.registrations[&registration].callee;
    if !may_invoke(st, caller, callee) {
        return fail(st, uri::NOT_AUTHORIZED, format!("session {caller} may not call {procedure}"));
    }
    let to_agent = st.sessions.get(&callee).is_some_and(|m| m.info.role == Role::Agent);
    if !to_agent && payload.json_len() > st.limits.max_invocation_payload {
        let why = format!("the arguments of {procedure} exceed {} bytes", st.limits.max_invocation_payload);
        return fail(st, uri::PAYLOAD_SIZE_EXCEEDED, why);
    }
    let details = invocation_details(st, caller, callee);
    let Some(invocation) = st.sessions.get_mut(&callee).map(Member::next_invocation) else {
        return fail(st, uri::NO_SUCH_PROCEDURE, format!("the callee of {procedure} left"));
    };
    match st.deliver(callee, Message::Invocation { request: invocation, registration, details, payload }) {
        Delivery::Sent => {}
        Delivery::Full => return fail(st, uri::UNAVAILABLE, format!("the callee of {procedure} is not keeping up")),
        Delivery::Gone => return fail(st, uri::NO_SUCH_PROCEDURE, format!("the callee of {procedure} left")),
    }
    let timeout = call_timeout(dict_u64(&options, "timeout"), &st.limits);
    let weak = Arc::downgrade(realm);
    let timer = tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        if let Some(realm) = weak.upgrade() {
            realm.call_timed_out(callee, invocation);
        }
    })
    .abort_handle();
    st.invocations.insert((callee, invocation), Pending { caller, request, timer });
    st.calls.insert((caller, request), (callee, invocation));
    if let Some(m) = st.sessions.get_mut(&caller) {
        m.in_flight += 1;
    }
}

/// Sessions other than agents (boards, legacy boards, enrolling boards) only ever call the
/// cloud: whatever a procedure is named, its callee must be an agent.
fn may_invoke(st: &State, caller: Id, callee: Id) -> bool {
    let role = |id| st.sessions.get(&id).map(|m| m.info.role);
    role(caller) == Some(Role::Agent) || role(callee) == Some(Role::Agent)
}

/// Callees with the `agent` role (the cloud) learn who called: boards are identified by the
/// router, never by what they claim in their arguments.
fn invocation_details(st: &State, caller: Id, callee: Id) -> Dict {
    let mut details = Dict::new();
    let trusted = st.sessions.get(&callee).is_some_and(|m| m.info.role == Role::Agent);
    if let (true, Some(c)) = (trusted, st.sessions.get(&caller)) {
        details.insert("caller".into(), caller.into());
        details.insert("caller_authid".into(), Value::String(c.info.authid.clone()));
        details.insert("caller_authrole".into(), Value::String(c.info.role.name().into()));
        if let Some(board) = &c.info.board {
            details.insert("_caller_board".into(), Value::String(board.clone()));
        }
    }
    details
}

/// Removes a pending call; returns it once (later answers, timeouts and cancels find nothing).
fn take_pending(st: &mut State, callee: Id, invocation: Id) -> Option<Pending> {
    let pending = st.invocations.remove(&(callee, invocation))?;
    pending.timer.abort();
    st.calls.remove(&(pending.caller, pending.request));
    if let Some(m) = st.sessions.get_mut(&pending.caller) {
        m.in_flight = m.in_flight.saturating_sub(1);
    }
    Some(pending)
}

/// A YIELD (`Ok`) or an ERROR (`Err`) from callee `sid` for INVOCATION `invocation`.
pub(crate) fn answer(st: &mut State, sid: Id, invocation: Id, answer: Result<Payload, (Dict, String, Payload)>) {
    let Some(p) = take_pending(st, sid, invocation) else {
        debug!(session = sid, invocation, "answer to an unknown or cancelled invocation dropped");
        return;
    };
    let msg = match answer {
        Ok(payload) => Message::Result { request: p.request, details: Dict::new(), payload },
        Err((details, error, payload)) => {
            Message::Error { request_type: code::CALL, request: p.request, details, error, payload }
        }
    };
    st.reply(p.caller, msg);
}

pub(crate) fn cancel(st: &mut State, sid: Id, request: Id, options: &Dict) {
    let Some(&(callee, invocation)) = st.calls.get(&(sid, request)) else {
        debug!(session = sid, request, "CANCEL of a call that is not in flight ignored");
        return;
    };
    let _ = take_pending(st, callee, invocation);
    let mode = dict_str(options, "mode").unwrap_or("killnowait");
    if mode != "skip" {
        interrupt(st, callee, invocation, "killnowait");
    }
    st.reply(sid, Message::error(code::CALL, request, uri::CANCELED, "call canceled"));
}

pub(crate) fn timed_out(st: &mut State, callee: Id, invocation: Id) {
    if let Some(p) = take_pending(st, callee, invocation) {
        interrupt(st, callee, invocation, "killnowait");
        st.reply(p.caller, Message::error(code::CALL, p.request, uri::TIMEOUT, "call timed out"));
    }
}

fn interrupt(st: &mut State, callee: Id, invocation: Id, mode: &str) {
    let mut options = Dict::new();
    options.insert("mode".into(), Value::String(mode.into()));
    let _ = st.deliver(callee, Message::Interrupt { request: invocation, options });
}

/// Session `sid` left: drop its registrations; its callers get ERROR `wamp.error.canceled`,
/// its own calls are interrupted at their callees.
pub(crate) fn session_gone(st: &mut State, sid: Id, member: &Member) {
    for registration in &member.registrations {
        remove_registration(st, *registration);
    }
    let as_callee: Vec<Id> = st.invocations.keys().filter(|(callee, _)| *callee == sid).map(|(_, inv)| *inv).collect();
    for invocation in as_callee {
        if let Some(p) = take_pending(st, sid, invocation) {
            st.reply(p.caller, Message::error(code::CALL, p.request, uri::CANCELED, "the callee left"));
        }
    }
    let as_caller: Vec<(Id, Id)> = st.calls.iter().filter(|((caller, _), _)| *caller == sid).map(|(_, v)| *v).collect();
    for (callee, invocation) in as_caller {
        let _ = take_pending(st, callee, invocation);
        interrupt(st, callee, invocation, "killnowait");
    }
}
