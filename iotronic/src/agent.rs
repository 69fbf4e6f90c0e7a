//! The agent side of board calls: a worker that takes [`AgentCall`]s from this agent's queue,
//! calls the board through a [`BoardCaller`] (the WAMP router's in-process session in the
//! wamp-agent; a fake in unit tests) and puts the board's answer on the conductor queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::Error;
use crate::bus::{AgentCall, Bus, ConductorMsg};

/// Calls in flight per agent.
pub const MAX_CALLS_IN_FLIGHT: usize = 256;

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
    let mut rx = bus.agent_deliveries(&name).await?;
    let slots = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
    let mut seen = Recent::default();
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            d = rx.recv() => d.ok_or_else(|| Error::Bus(format!("the queue of agent {name} closed")))?,
        };
        if !seen.insert(&d.msg.request) {
            // A conductor handed this request over twice (it died before acking): run it once.
            d.ack().await?;
            continue;
        }
        let permit = slots.clone().acquire_owned().await.map_err(|_| Error::Bus("agent stopped".into()))?;
        let (bus, caller, stop) = (bus.clone(), caller.clone(), shutdown.clone());
        let span =
            info_span!("agent_call", request = %d.msg.request, board = %d.msg.board, procedure = %d.msg.procedure);
        tokio::spawn(
            async move {
                let _permit = permit;
                let (request, board) = (d.msg.request.clone(), d.msg.board.clone());
                let msg = if d.redelivered {
                    // We may have died after the board ran it: do not run it twice.
                    let reason = "the agent restarted while this call was in flight; it may or may not have run".into();
                    ConductorMsg::Failed { request, board, reason }
                } else {
                    match call_board(caller.as_ref(), &d.msg).await {
                        Ok((result, message)) => ConductorMsg::Result { request, board, result, message },
                        Err(reason) => ConductorMsg::Failed { request, board, reason },
                    }
                };
                // Reported again after a broker blip: the board did it, and a redelivery of
                // the call would only say that it may or may not have run.
                match crate::bus::retry_transient(&stop, || bus.to_conductor(&msg)).await {
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
