//! What can go wrong, what the user should do about it, and the exit code of each.

use std::fmt;

use serde_json::{Value, json};

use super::output::safe_text;

/// The kind of a failure; each has its own exit code (listed by `s4t --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Something unexpected (a bug, a cloud error 500).
    Internal,
    /// Bad arguments, or a request the cloud rejected as invalid (400).
    Usage,
    /// Not logged in, wrong password, expired token (401).
    Auth,
    /// Logged in, but the role or project does not allow it (403).
    Forbidden,
    /// No such board, service, lease… in the caller's project (404).
    NotFound,
    /// Leased by another project, already exposed, name taken (409).
    Conflict,
    /// The board is offline or not reachable (503).
    Offline,
    /// The board answered with an error (502).
    Board,
    /// Nothing happened within the deadline (504, or a wait of this CLI).
    Timeout,
    /// The cloud cannot be reached at all.
    Unreachable,
    /// The cloud refuses for now: too many attempts (429); wait, then try again.
    Throttled,
}

impl Kind {
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Internal => 1,
            Kind::Usage => 2,
            Kind::Auth => 3,
            Kind::Forbidden => 4,
            Kind::NotFound => 5,
            Kind::Conflict => 6,
            Kind::Offline => 7,
            Kind::Board => 8,
            Kind::Timeout => 9,
            Kind::Unreachable => 10,
            Kind::Throttled => 11,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Internal => "internal",
            Kind::Usage => "usage",
            Kind::Auth => "auth",
            Kind::Forbidden => "forbidden",
            Kind::NotFound => "not_found",
            Kind::Conflict => "conflict",
            Kind::Offline => "offline",
            Kind::Board => "board",
            Kind::Timeout => "timeout",
            Kind::Unreachable => "unreachable",
            Kind::Throttled => "throttled",
        }
    }
}

/// A failure with a message that says what happened and, when we know, what to do.
#[derive(Debug)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
    pub hint: Option<String>,
    /// How many seconds the cloud asked to wait (429 `Retry-After`), when it said.
    pub retry_after: Option<u64>,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Failure { kind, message: message.into(), hint: None, retry_after: None }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(Kind::Usage, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Failure::new(Kind::Internal, message)
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn not_logged_in() -> Self {
        Failure::new(Kind::Auth, "not logged in")
            .with_hint("run `s4t login --url http://CLOUD:8812 --user NAME` (or set S4T_URL and S4T_TOKEN)")
    }

    /// The error as `--json` prints it on stderr (`retry_after`, in seconds, only when the
    /// cloud said how long to wait). Message and hint are text for people, often the cloud's or
    /// a board's, so their control characters are escaped as on a terminal ([`safe_text`]):
    /// serde_json would leave C1 (U+0080–U+009F) raw.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"error": self.kind.name(), "message": safe_text(&self.message),
                           "hint": self.hint.as_deref().map(safe_text), "exit_code": self.kind.exit_code()});
        if let Some(s) = self.retry_after {
            v["retry_after"] = json!(s);
        }
        v
    }
}

/// What stderr shows; the message often carries the cloud's or a board's text, so its control
/// characters are escaped ([`safe_text`]).
impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&safe_text(&self.message))?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {}", safe_text(h))?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

pub type Result<T, E = Failure> = std::result::Result<T, E>;
