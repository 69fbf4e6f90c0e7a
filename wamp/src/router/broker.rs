//! The broker: SUBSCRIBE/UNSUBSCRIBE, PUBLISH → EVENT, and the router's own meta events.
//!
//! Exact-match subscriptions only; all subscribers of a topic share one subscription id, so
//! one EVENT message (behind an `Arc`) serves them all. Events are best effort: a subscriber
//! whose queue is full misses the event (and is closed if it stays full).

use std::sync::Arc;

use s4t_shared::wamp::message::{Dict, code, dict_bool, dict_str, uri};
use s4t_shared::wamp::validate::excerpt;
use s4t_shared::wamp::{Id, Message, Payload};
use serde_json::Value;
use tracing::debug;

use super::realm::{Delivery, Member, State, random_id};
use crate::policy::Action;

pub(crate) fn subscribe(st: &mut State, sid: Id, request: Id, options: &Dict, topic: String) {
    let fail =
        |st: &mut State, error: &str, why: String| st.reply(sid, Message::error(code::SUBSCRIBE, request, error, why));
    if !st.allowed(sid, Action::Subscribe, &topic) {
        return fail(st, uri::NOT_AUTHORIZED, format!("session {sid} may not subscribe to {topic}"));
    }
    if let Some(m) = dict_str(options, "match").filter(|m| *m != "exact") {
        return fail(st, uri::INVALID_ARGUMENT, format!("match policy {} is not supported", excerpt(m)));
    }
    let id = match st.topics.get(&topic) {
        Some(&id) => id,
        None => {
            let id = st.next_router_id();
            st.topics.insert(topic.clone(), id);
            st.subscriptions.insert(id, super::realm::Subscription { topic, subscribers: Vec::new() });
            id
        }
    };
    let max = st.limits.max_subscriptions;
    let Some(member) = st.sessions.get_mut(&sid) else { return };
    if !member.subscriptions.contains(&id) {
        if member.subscriptions.len() >= max {
            drop_if_unused(st, id);
            return fail(st, uri::LIMIT_EXCEEDED, format!("at most {max} subscriptions per session"));
        }
        member.subscriptions.push(id);
        if let Some(sub) = st.subscriptions.get_mut(&id) {
            sub.subscribers.push(sid);
        }
    }
    st.reply(sid, Message::Subscribed { request, subscription: id });
}

fn drop_if_unused(st: &mut State, id: Id) {
    if st.subscriptions.get(&id).is_some_and(|s| s.subscribers.is_empty())
        && let Some(sub) = st.subscriptions.remove(&id)
    {
        st.topics.remove(&sub.topic);
    }
}

fn remove_subscriber(st: &mut State, sid: Id, id: Id) {
    if let Some(sub) = st.subscriptions.get_mut(&id) {
        sub.subscribers.retain(|s| *s != sid);
    }
    drop_if_unused(st, id);
}

pub(crate) fn unsubscribe(st: &mut State, sid: Id, request: Id, subscription: Id) {
    let owned = st.sessions.get(&sid).is_some_and(|m| m.subscriptions.contains(&subscription));
    if !owned {
        let why = format!("no subscription {subscription} of this session");
        return st.reply(sid, Message::error(code::UNSUBSCRIBE, request, uri::NO_SUCH_SUBSCRIPTION, why));
    }
    remove_subscriber(st, sid, subscription);
    if let Some(m) = st.sessions.get_mut(&sid) {
        m.subscriptions.retain(|s| *s != subscription);
    }
    st.reply(sid, Message::Unsubscribed { request });
}

pub(crate) fn publish(st: &mut State, sid: Id, request: Id, options: &Dict, topic: &str, payload: Payload) {
    let acknowledge = dict_bool(options, "acknowledge").unwrap_or(false);
    if !st.allowed(sid, Action::Publish, topic) {
        if acknowledge {
            let why = format!("session {sid} may not publish to {topic}");
            st.reply(sid, Message::error(code::PUBLISH, request, uri::NOT_AUTHORIZED, why));
        } else {
            debug!(session = sid, topic, "unacknowledged publication refused");
        }
        return;
    }
    let (rate, burst) = (st.limits.publish_rate, st.limits.publish_burst);
    if !st.sessions.get_mut(&sid).is_some_and(|m| m.may_publish(rate, burst)) {
        if acknowledge {
            let why = format!("at most {rate} publications per second (bursts of {burst})");
            st.reply(sid, Message::error(code::PUBLISH, request, uri::LIMIT_EXCEEDED, why));
        } else {
            debug!(session = sid, topic, "publication over the rate limit dropped");
        }
        return;
    }
    let exclude_me = dict_bool(options, "exclude_me").unwrap_or(true);
    let publication = random_id();
    dispatch(st, topic, publication, payload, exclude_me.then_some(sid), false);
    if acknowledge {
        st.reply(sid, Message::Published { request, publication });
    }
}

/// Sends an EVENT to every subscriber of `topic` but `exclude`; `meta`: a router meta event
/// (see [`State::deliver_meta`]).
fn dispatch(st: &mut State, topic: &str, publication: Id, payload: Payload, exclude: Option<Id>, meta: bool) {
    let Some(&subscription) = st.topics.get(topic) else { return };
    let targets: Vec<Id> =
        st.subscriptions[&subscription].subscribers.iter().copied().filter(|s| Some(*s) != exclude).collect();
    if targets.is_empty() {
        return;
    }
    let event = Arc::new(Message::Event { subscription, publication, details: Dict::new(), payload });
    let mut dropped = 0;
    for target in targets {
        let delivery =
            if meta { st.deliver_meta(target, event.clone()) } else { st.deliver_arc(target, event.clone()) };
        if delivery == Delivery::Full {
            dropped += 1;
        }
    }
    if dropped > 0 {
        debug!(topic, dropped, "event not delivered to subscribers with full queues");
    }
}

/// Publishes a router event (`wamp.session.on_join`, `wamp.session.on_leave`).
pub(crate) fn publish_meta(st: &mut State, topic: &str, args: Vec<Value>) {
    dispatch(st, topic, random_id(), Payload::args(args), None, true);
}

pub(crate) fn session_gone(st: &mut State, sid: Id, member: &Member) {
    for subscription in &member.subscriptions {
        remove_subscriber(st, sid, *subscription);
    }
}
