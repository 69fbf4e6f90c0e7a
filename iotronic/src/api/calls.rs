//! How a REST call becomes a board request: lease check, request row, conductor message,
//! then either 202 with the request (`?async=true`, a queued command, or no answer within
//! the call timeout) or the board's result.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::{AppState, Caller};
use crate::Error;
use crate::bus::ConductorMsg;
use crate::db::{Board, Request, RequestStatus, now_ms};

/// How long a queued command waits for its board by default.
pub const DEFAULT_QUEUE_TTL: Duration = Duration::from_secs(3600);
/// The longest a command may stay queued.
pub const MAX_QUEUE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Clone, Copy, Default)]
pub struct CallOpts {
    /// Queue the command if the board is offline, for this long.
    pub queue_ttl: Option<Duration>,
    /// Answer 202 with the request at once.
    pub asynchronous: bool,
}

fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, Error> {
    match q.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(Error::Invalid(format!("?{name}={other}: use true or false"))),
    }
}

impl CallOpts {
    /// `?async=true`, `?queue=true`, `?queue_ttl=SECONDS` (implies queue).
    pub fn from_query(q: &HashMap<String, String>) -> Result<Self, Error> {
        let ttl = match q.get("queue_ttl") {
            Some(s) => {
                let secs: u64 = s.parse().map_err(|_| Error::Invalid(format!("?queue_ttl={s}: give seconds")))?;
                Some(Duration::from_secs(secs).min(MAX_QUEUE_TTL))
            }
            None if flag(q, "queue")? => Some(DEFAULT_QUEUE_TTL),
            None => None,
        };
        Ok(CallOpts { queue_ttl: ttl, asynchronous: flag(q, "async")? })
    }

    /// Also honours a per-action `"queue": true` in the body.
    pub fn with_body_flag(mut self, body: &Value) -> Self {
        if self.queue_ttl.is_none() && body.get("queue").and_then(Value::as_bool) == Some(true) {
            self.queue_ttl = Some(DEFAULT_QUEUE_TTL);
        }
        self
    }
}

/// What a board call answers.
#[derive(Debug)]
pub enum Outcome {
    /// The board's `message` (SUCCESS or WARNING).
    Done(Value),
    /// Accepted; see `/v1/requests/{uuid}`.
    Accepted(Box<Request>),
}

pub fn request_json(r: &Request) -> Value {
    json!({
        "uuid": r.uuid,
        "destination_uuid": r.destination,
        "main_request_uuid": r.main_request,
        "pending_requests": r.pending_requests,
        "status": r.status.as_str(),
        "type": 0,
        "action": r.action,
        "project": r.project,
        "agent": r.agent,
        "expires_at": r.expires_at.map(|t| t / 1000),
        "created_at": r.created_at / 1000,
        "updated_at": r.updated_at / 1000,
        "links": [{"href": format!("/v1/requests/{}", r.uuid), "rel": "self"},
                  {"href": format!("/v1/requests/{}/results", r.uuid), "rel": "results"}],
    })
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        match self {
            Outcome::Done(v) => Json(v).into_response(),
            Outcome::Accepted(r) => (StatusCode::ACCEPTED, Json(request_json(&r))).into_response(),
        }
    }
}

/// 409 when another project's active lease holds the board.
pub async fn check_lease(state: &AppState, caller: &Caller, board: &str) -> Result<Option<String>, Error> {
    match state.db.active_lease_of_board(board).await? {
        Some(l) if l.project != caller.project => {
            Err(Error::LeaseConflict { lease: l.uuid, board: board.to_owned(), expires_at: l.expires_at })
        }
        Some(l) => Ok(Some(l.uuid)),
        None => Ok(None),
    }
}

/// Sends `action(args…)` to `board` and returns its answer or the accepted request.
pub async fn call_board(
    state: &AppState,
    caller: &Caller,
    board: &Board,
    action: &str,
    args: Value,
    opts: CallOpts,
) -> Result<Outcome, Error> {
    let lease = check_lease(state, caller, &board.uuid).await?;
    if board.status != "online" && opts.queue_ttl.is_none() {
        return Err(Error::Unavailable(format!(
            "board {} is {}: add ?queue=true to queue the command until it logs in",
            board.name, board.status
        )));
    }
    let expires = opts.queue_ttl.map(|t| now_ms() + t.as_millis() as i64);
    let mut completions = state.bus.completions().await?;
    let req =
        state.db.create_request_under(&board.project, &board.uuid, action, &args, expires, lease.as_deref()).await?;
    if let Err(e) = state.bus.to_conductor(&ConductorMsg::Execute { request: req.uuid.clone() }).await {
        // Nothing will run it: failed now, not left PENDING for the sweep, and the caller
        // told to try again (503) rather than "internal error".
        tracing::warn!(request = %req.uuid, cause = %e, "the conductor cannot be reached");
        let result = (board.uuid.as_str(), "ERROR", "the cloud's message bus is unreachable");
        state.db.end_request(&req.uuid, &[RequestStatus::Pending], RequestStatus::Failed, result).await?;
        return Err(Error::Unavailable("the cloud's message bus is unreachable: try again later".into()));
    }
    state.metrics.count_call(action);
    if opts.asynchronous {
        return Ok(Outcome::Accepted(Box::new(req)));
    }
    let deadline = Instant::now() + state.call_timeout;
    loop {
        let r =
            state.db.request(&req.uuid, None).await?.ok_or_else(|| Error::NotFound("the request vanished".into()))?;
        match r.status {
            s if s.is_final() => return finish(state, r).await,
            RequestStatus::Queued => return Ok(Outcome::Accepted(Box::new(r))),
            _ => {}
        }
        loop {
            match tokio::time::timeout_at(deadline, completions.recv()).await {
                Err(_) => return Ok(Outcome::Accepted(Box::new(r))),
                Ok(Ok(id)) if id != req.uuid => continue,
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => break,
                Ok(Err(RecvError::Closed)) => return Err(Error::Bus("the completion stream closed".into())),
            }
        }
    }
}

/// The board's message as JSON when it is JSON text, else as a string.
pub fn message_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

async fn finish(state: &AppState, r: Request) -> Result<Outcome, Error> {
    let results = state.db.results(&r.uuid).await?;
    let res = results.iter().find(|x| x.board == r.destination);
    let message = res.map(|x| x.message.clone()).unwrap_or_default();
    match (r.status, res.map(|x| x.result.as_str())) {
        (RequestStatus::Completed, Some("SUCCESS" | "WARNING")) => Ok(Outcome::Done(message_value(&message))),
        (RequestStatus::Completed, _) => Err(Error::Board(message)),
        _ => Err(Error::Unavailable(format!("request {} {}: {message}", r.uuid, r.status.as_str().to_lowercase()))),
    }
}
