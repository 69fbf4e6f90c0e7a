//! The session meta API, shaped as crossbar sends it (the original IoTronic agent relies on
//! it): `wamp.session.on_join` with the session details dict as its one positional argument,
//! `wamp.session.on_leave` with the session id as its one positional argument, and the
//! procedures `wamp.session.{count,list,get,kill,kill_by_authid}`.

use s4t_shared::wamp::message::{Dict, code, uri};
use s4t_shared::wamp::{Id, Message, Payload};
use serde_json::{Value, json};

use super::SessionInfo;
use super::realm::{Farewell, State};

pub(crate) const ON_JOIN: &str = "wamp.session.on_join";
pub(crate) const ON_LEAVE: &str = "wamp.session.on_leave";

/// The details dict of a session (on_join and `wamp.session.get`).
pub(crate) fn session_details(info: &SessionInfo, realm: &str) -> Dict {
    let transport = match info.transport.peer {
        Some(peer) => json!({
            "type": "websocket",
            "peer": format!("tcp{}:{}:{}", if peer.is_ipv4() { 4 } else { 6 }, peer.ip(), peer.port()),
            "serializer": info.transport.serializer.map(|s| s.name()),
            "tls": info.transport.tls,
        }),
        None => json!({"type": "function"}),
    };
    let mut d = Dict::new();
    d.insert("session".into(), info.id.into());
    d.insert("realm".into(), Value::String(realm.to_owned()));
    d.insert("authid".into(), Value::String(info.authid.clone()));
    d.insert("authrole".into(), Value::String(info.role.name().into()));
    d.insert("authmethod".into(), Value::String(info.authmethod.into()));
    d.insert("authprovider".into(), Value::String(info.authprovider.clone()));
    d.insert("transport".into(), transport);
    d
}

/// Answers a call to a `wamp.*` procedure (the caller was authorized already).
pub(crate) fn call(st: &mut State, caller: Id, request: Id, procedure: &str, payload: Payload) -> Message {
    let ok = |args: Vec<Value>| Message::Result { request, details: Dict::new(), payload: Payload::args(args) };
    let err = |error: &str, why: String| Message::error(code::CALL, request, error, why);
    match procedure {
        "wamp.session.count" | "wamp.session.list" => {
            let roles = match payload.args.first() {
                None | Some(Value::Null) => None,
                Some(Value::Array(roles)) => Some(roles.iter().filter_map(Value::as_str).collect::<Vec<_>>()),
                Some(_) => return err(uri::INVALID_ARGUMENT, "filter_authroles must be a list".into()),
            };
            let ids: Vec<Value> = st
                .sessions
                .values()
                .filter(|m| roles.as_ref().is_none_or(|r| r.contains(&m.info.role.name())))
                .map(|m| m.info.id.into())
                .collect();
            if procedure.ends_with("count") { ok(vec![ids.len().into()]) } else { ok(vec![Value::Array(ids)]) }
        }
        "wamp.session.get" => match session_arg(&payload) {
            Some(id) => match st.sessions.get(&id) {
                Some(m) => ok(vec![Value::Object(session_details(&m.info, &st.realm))]),
                None => err(uri::NO_SUCH_SESSION, format!("no session {id}")),
            },
            None => err(uri::INVALID_ARGUMENT, "expected a session id".into()),
        },
        "wamp.session.kill" => match session_arg(&payload) {
            Some(id) if id != caller && st.kill(id, farewell(&payload)) => ok(vec![]),
            Some(id) => err(uri::NO_SUCH_SESSION, format!("no other session {id}")),
            None => err(uri::INVALID_ARGUMENT, "expected a session id".into()),
        },
        "wamp.session.kill_by_authid" => match payload.args.first().and_then(Value::as_str) {
            Some(authid) => {
                let targets: Vec<Id> = st
                    .sessions
                    .values()
                    .filter(|m| m.info.authid == authid && m.info.id != caller)
                    .map(|m| m.info.id)
                    .collect();
                let farewell = farewell(&payload);
                for id in &targets {
                    st.kill(*id, farewell.clone());
                }
                ok(vec![targets.into_iter().map(Value::from).collect()])
            }
            None => err(uri::INVALID_ARGUMENT, "expected an authid".into()),
        },
        _ => err(uri::NO_SUCH_PROCEDURE, format!("no procedure {procedure}")),
    }
}

fn session_arg(payload: &Payload) -> Option<Id> {
    payload.args.first().and_then(Value::as_u64)
}

/// Killed sessions always get `wamp.close.killed` (a caller-chosen `reason` is not supported:
/// nothing in Stack4Things needs it).
fn farewell(_payload: &Payload) -> Farewell {
    Farewell::Goodbye(uri::CLOSE_KILLED)
}
