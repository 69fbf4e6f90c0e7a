//! The agent side of board calls: a worker that takes [`AgentCall`]s from this agent's queue,
//! calls the board through a [`BoardCaller`] (the WAMP router's in-process session in the
//! wamp-agent; a fake in unit tests) and puts the board's answer on the conductor queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use s4t_shared::limits::{KeyedSlot, KeyedSlots};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::Error;
use crate::bus::{AgentCall, Bus, ConductorMsg};

/// Calls in flight per agent.
pub const MAX_CALLS_IN_FLIGHT: usize = 256;
/// Calls in flight per board on an agent: a board that does not answer (each call holds its
/// slot up to the board call timeout) cannot take the slots of the other boards. Twice what a
/// board runs at once (its WAMP client's 16 handlers), so that a burst of quick calls, some
/// on their way, is not refused here.
pub const MAX_CALLS_PER_BOARD: usize = 32;
/// Calls in flight per requesting project on an agent: a project's many silent boards (8 of
/// them at [`MAX_CALLS_PER_BOARD`]) cannot take every slot from the other tenants either.
/// The cloud's own calls (no project) are not bounded so.
pub const MAX_CALLS_PER_PROJECT: usize = MAX_CALLS_IN_FLIGHT / 2;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// "Call procedure P on board B": the seam between the agent logic and the WAMP router.
/// `procedure` is the full URI (`iotronic.<session>.<board>.<Name>`); `args` are positional.
pub trait BoardCaller: Send + Sync + 'static {
    fn call<'a>(&'a self, procedure: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<Value, Error>>;
}

/// The URI of a board procedure (S4T-REFERENCE §5.4).
pub fn board_procedure(session: &str, board: &str, name: &str) -> String {
    format!("iotronic.{session}.{board}.{name}")
}

/// Whether a board whose `connection` reported `lr_version` takes the request dict as the
/// first argument of every procedure. The original cloud omits it below 0.4.9
/// (S4T-REFERENCE §4); an unknown or unparsable version gets it, as the original does for
/// anything its version comparison does not call older.
pub fn takes_request_dict(lr_version: Option<&str>) -> bool {
    let Some(v) = lr_version else { return true };
    // "0.4.8", "0.5.0+rs.0.1.0", "0.4.10.dev3": the release numbers before any label.
    let release = v.trim().split(['+', '-']).next().unwrap_or("");
    let mut parts = release.split('.').map(|p| p.chars().take_while(char::is_ascii_digit).collect::<String>());
    let mut num = || parts.next().and_then(|p| p.parse::<u64>().ok());
    match (num(), num(), num()) {
        (Some(major), Some(minor), patch) => (major, minor, patch.unwrap_or(0)) >= (0, 4, 9),
        _ => true,
    }
}

/// A board reply as (result, message): the JSON-string WampMessage of the original, a bare
/// object with `result`, or any other value (taken as SUCCESS with that message).
pub fn parse_board_reply(reply: &Value) -> (String, Value) {
    let parsed = match reply {
        Value::String(s) => serde_json::from_str::<Value>(s).unwrap_or_else(|_| reply.clone()),
        other => other.clone(),
    };
    match parsed.get("result").and_then(Value::as_str) {
        Some(r @ ("SUCCESS" | "ERROR" | "WARNING" | "RUNNING")) => {
            (r.to_owned(), parsed.get("message").cloned().unwrap_or(Value::Null))
        }
        _ => ("SUCCESS".to_owned(), parsed),
    }
}

/// Serves this agent's queue until `shutdown`.
pub async fn run_worker(
    name: String,
    bus: Bus,
    caller: Arc<dyn BoardCaller>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_worker_with(name, bus, caller, shutdown, ReportRetry::default()).await
}

/// How an agent paces its reports of a board's answer while the bus refuses them (a broker
/// outage): `first`, then twice as long each time, `max` at most.
#[derive(Clone, Copy, Debug)]
pub struct ReportRetry {
    pub first: Duration,
    pub max: Duration,
}

impl Default for ReportRetry {
    fn default() -> Self {
        ReportRetry { first: Duration::from_millis(500), max: Duration::from_secs(30) }
    }
}

/// [`run_worker`] with the pace of its report retries.
pub async fn run_worker_with(
    name: String,
    bus: Bus,
    caller: Arc<dyn BoardCaller>,
    shutdown: CancellationToken,
    retry: ReportRetry,
) -> Result<(), Error> {
    let mut rx = bus.agent_deliveries(&name).await?;
    let slots = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
    // Calls in flight per board and per project ([`MAX_CALLS_PER_BOARD`],
    // [`MAX_CALLS_PER_PROJECT`] each).
    let per_board = KeyedSlots::new(MAX_CALLS_PER_BOARD);
    let per_project = KeyedSlots::new(MAX_CALLS_PER_PROJECT);
    let mut seen = Recent::default();
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            d = rx.recv() => d.ok_or_else(|| Error::Bus(format!("the queue of agent {name} closed")))?,
        };
        if !seen.insert(&d.msg.request) {
            // A conductor handed this request over twice (it died before acking), or the
            // broker gave back a call whose answer is still being reported: run it once. An
            // ack lost with the connection only brings it back once more.
            if let Err(e) = d.ack().await {
                warn!(cause = %e, "ack failed");
            }
            continue;
        }
        // Shares first, in delivery order, so that a board's or a project's calls beyond its
        // share fail at once instead of holding every slot of this agent (hung boards, a flood
        // of async calls).
        let share = match (per_board.take(d.msg.board.clone()), project_share(&per_project, &d.msg.project)) {
            (Some(board), Ok(project)) => Ok((board, project)),
            (None, _) => {
                Err(format!("board {} has {MAX_CALLS_PER_BOARD} calls in flight; try again later", d.msg.board))
            }
            (_, Err(())) => {
                Err(format!("the project has {MAX_CALLS_PER_PROJECT} calls in flight on agent {name}; try again later"))
            }
        };
        let permit = slots.clone().acquire_owned().await.map_err(|_| Error::Bus("agent stopped".into()))?;
        let (bus, caller, stop) = (bus.clone(), caller.clone(), shutdown.clone());
        let span =
            info_span!("agent_call", request = %d.msg.request, board = %d.msg.board, procedure = %d.msg.procedure);
        tokio::spawn(
            async move {
                let _permit = permit;
                let (request, board) = (d.msg.request.clone(), d.msg.board.clone());
                // The shares are given back once the board has answered, before the report.
                let msg = match (d.redelivered, share) {
                    (true, _) => {
                        // We may have died after the board ran it: do not run it twice.
                        let reason =
                            "the agent restarted while this call was in flight; it may or may not have run".into();
                        ConductorMsg::Failed { request, board, reason }
                    }
                    (false, Ok(_share)) => match call_board(caller.as_ref(), &d.msg).await {
                        Ok((result, message)) => ConductorMsg::Result { request, board, result, message },
                        Err(reason) => ConductorMsg::Failed { request, board, reason },
                    },
                    // Failed, not requeued: a requeued call would come straight back while the
                    // board (or the project's boards) are still busy.
                    (false, Err(reason)) => ConductorMsg::Failed { request, board, reason },
                };
                match report(&bus, &msg, retry, &stop).await {
                    Some(Ok(())) => {
                        if let Err(e) = d.ack().await {
                            warn!(cause = %e, "ack failed");
                        }
                    }
                    Some(Err(e)) => warn!(cause = %e, "cannot report a board result; the call stays unacked"),
                    None => {}
                }
            }
            .instrument(span),
        );
    }
}

/// A call's share of its project's ([`MAX_CALLS_PER_PROJECT`]); none needed for the cloud's
/// own calls (no project). `Err` when the project has its share in flight.
fn project_share(slots: &Arc<KeyedSlots<String>>, project: &str) -> Result<Option<KeyedSlot<String>>, ()> {
    if project.is_empty() {
        return Ok(None);
    }
    slots.take(project.to_owned()).map(Some).ok_or(())
}

/// Puts an agent's report on the conductor queue, again while the broker fails, until it is
/// there or `shutdown` (`None`). Not given up after a while: the board has acted and the
/// answer is only here, while a redelivery of the call comes back to this agent, which takes
/// it for a duplicate (a result given up after a broker outage left its request RUNNING for
/// 2 h, and an undo then freed a port or address the board still held).
async fn report(
    bus: &Bus,
    msg: &ConductorMsg,
    retry: ReportRetry,
    shutdown: &CancellationToken,
) -> Option<Result<(), Error>> {
    let mut wait = retry.first;
    loop {
        match bus.to_conductor(msg).await {
            Err(e @ Error::Amqp { .. }) => {
                warn!(cause = %e, retry_in = ?wait, "cannot report a board result: trying again")
            }
            done => return Some(done),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(retry.max);
    }
}

/// Request ids this agent took recently (bounded).
#[derive(Default)]
struct Recent {
    set: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Recent {
    const CAPACITY: usize = 16_384;

    /// False if `id` was seen already.
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == Self::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }
}

async fn call_board(caller: &dyn BoardCaller, call: &AgentCall) -> Result<(String, Value), String> {
    let uri = board_procedure(&call.session, &call.board, &call.procedure);
    let mut args = Vec::with_capacity(call.args.len() + 1);
    if !call.omit_req {
        args.push(json!({"uuid": call.request, "main_request_uuid": null, "destination_uuid": call.board,
                         "action": call.procedure}));
    }
    args.extend(call.args.iter().cloned());
    caller.call(&uri, args).await.map(|reply| parse_board_reply(&reply)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_replies_parse_in_every_shape() {
        let s = json!("{\"message\": \"pong\", \"result\": \"SUCCESS\", \"req_id\": \"r\"}");
        assert_eq!(parse_board_reply(&s), ("SUCCESS".into(), json!("pong")));
        assert_eq!(parse_board_reply(&json!({"result": "ERROR", "message": "no"})), ("ERROR".into(), json!("no")));
        assert_eq!(parse_board_reply(&json!("plain")), ("SUCCESS".into(), json!("plain")));
        assert_eq!(parse_board_reply(&json!({"result": "BOGUS"})), ("SUCCESS".into(), json!({"result": "BOGUS"})));
        assert_eq!(board_procedure("7", "b", "DevicePing"), "iotronic.7.b.DevicePing");
    }

    #[test]
    fn the_request_dict_is_omitted_only_below_0_4_9() {
        for old in ["0.4.8", "0.4.0", "0.3", "0.4.8.dev1", " 0.4.2 "] {
            assert!(!takes_request_dict(Some(old)), "{old}");
        }
        for new in ["0.4.9", "0.4.10", "0.5.0", "0.5.0+rs.0.1.0", "1.0", "No version", "", "x.y"] {
            assert!(takes_request_dict(Some(new)), "{new}");
        }
        assert!(takes_request_dict(None));
    }

    struct Recorder(std::sync::Mutex<Vec<Vec<Value>>>);

    impl BoardCaller for Recorder {
        fn call<'a>(&'a self, _procedure: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<Value, Error>> {
            self.0.lock().unwrap().push(args);
            Box::pin(async { Ok(json!("{\"message\": \"ok\", \"result\": \"SUCCESS\"}")) })
        }
    }

    #[tokio::test]
    async fn old_boards_get_the_original_argument_shape() {
        let rec = Recorder(std::sync::Mutex::new(Vec::new()));
        let mut call = AgentCall {
            request: "r1".into(),
            board: "b".into(),
            session: "7".into(),
            procedure: "DeviceEcho".into(),
            project: String::new(),
            args: vec![json!({"say": "hi"})],
            omit_req: false,
        };
        assert_eq!(call_board(&rec, &call).await.unwrap(), ("SUCCESS".into(), json!("ok")));
        call.omit_req = true;
        call_board(&rec, &call).await.unwrap();
        let seen = rec.0.lock().unwrap();
        assert_eq!(seen[0][0]["uuid"], "r1");
        assert_eq!(seen[0][0]["main_request_uuid"], Value::Null);
        assert_eq!(seen[0][1], json!({"say": "hi"}));
        assert_eq!(seen[1], vec![json!({"say": "hi"})]);
        // An AgentCall from a conductor that predates the field still carries the dict.
        let old: AgentCall = serde_json::from_value(json!({"request": "r", "board": "b", "session": "1",
            "procedure": "DevicePing", "args": []}))
        .unwrap();
        assert!(!old.omit_req);
    }
}
