//! WAMP v2 messages: the Basic Profile plus the Advanced Profile messages we use
//! (CHALLENGE/AUTHENTICATE for ticket and WAMP-CRA, CANCEL/INTERRUPT for call canceling).
//!
//! Application payloads (`Arguments|list`, `ArgumentsKw|dict`) and `Details`/`Options`
//! dictionaries are held as `serde_json` values. Binary data travels inside them in the WAMP
//! JSON convention (a string starting with `\0` followed by base64); the MessagePack and CBOR
//! codecs translate it to and from native binary, so one in-memory form serves every
//! serializer and the router can forward between peers that speak different ones.

use serde_json::{Map, Value};

/// WAMP ids: sessions, publications, subscriptions, registrations and requests, all in
/// `[1, 2^53]`.
pub type Id = u64;

/// A WAMP dictionary (`Details`, `Options`, `ArgumentsKw`).
pub type Dict = Map<String, Value>;

/// The largest valid WAMP id, 2^53.
pub const MAX_ID: Id = 1 << 53;

/// True when `id` is in the range WAMP allows.
pub fn valid_id(id: Id) -> bool {
    (1..=MAX_ID).contains(&id)
}

/// An application payload: positional and keyword arguments. Empty parts are omitted on the
/// wire, as the specification recommends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Payload {
    pub args: Vec<Value>,
    pub kwargs: Dict,
}

/// The length of `v` as JSON text, counted without building it (a `str` counts with its
/// quotes and escapes, as it travels inside a message).
pub fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    // Writing to a counter fails only where serializing fails (a map with non-string keys),
    // which JSON values and strings never do.
    let _ = serde_json::to_writer(&mut n, v);
    n.0
}

impl Payload {
    /// The length of `args` and `kwargs` as JSON ([`json_len`]): about what they take in any
    /// serializer's message (MessagePack and CBOR are not longer).
    pub fn json_len(&self) -> usize {
        json_len(&self.args) + json_len(&self.kwargs)
    }

    pub fn new(args: Vec<Value>, kwargs: Dict) -> Self {
        Payload { args, kwargs }
    }

    pub fn args(args: Vec<Value>) -> Self {
        Payload { args, kwargs: Dict::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.args.is_empty() && self.kwargs.is_empty()
    }
}

/// Message type codes.
pub mod code {
    pub const HELLO: u64 = 1;
    pub const WELCOME: u64 = 2;
    pub const ABORT: u64 = 3;
    pub const CHALLENGE: u64 = 4;
    pub const AUTHENTICATE: u64 = 5;
    pub const GOODBYE: u64 = 6;
    pub const ERROR: u64 = 8;
    pub const PUBLISH: u64 = 16;
    pub const PUBLISHED: u64 = 17;
    pub const SUBSCRIBE: u64 = 32;
    pub const SUBSCRIBED: u64 = 33;
    pub const UNSUBSCRIBE: u64 = 34;
    pub const UNSUBSCRIBED: u64 = 35;
    pub const EVENT: u64 = 36;
    pub const CALL: u64 = 48;
    pub const CANCEL: u64 = 49;
    pub const RESULT: u64 = 50;
    pub const REGISTER: u64 = 64;
    pub const REGISTERED: u64 = 65;
    pub const UNREGISTER: u64 = 66;
    pub const UNREGISTERED: u64 = 67;
    pub const INVOCATION: u64 = 68;
    pub const INTERRUPT: u64 = 69;
    pub const YIELD: u64 = 70;
}

/// Error and close reason URIs used by the router and the client.
pub mod uri {
    pub const NOT_AUTHORIZED: &str = "wamp.error.not_authorized";
    pub const AUTHENTICATION_FAILED: &str = "wamp.error.authentication_failed";
    pub const NO_AUTH_METHOD: &str = "wamp.error.no_auth_method";
    pub const NO_SUCH_REALM: &str = "wamp.error.no_such_realm";
    pub const PROTOCOL_VIOLATION: &str = "wamp.error.protocol_violation";
    pub const INVALID_URI: &str = "wamp.error.invalid_uri";
    pub const INVALID_ARGUMENT: &str = "wamp.error.invalid_argument";
    pub const NO_SUCH_PROCEDURE: &str = "wamp.error.no_such_procedure";
    pub const PROCEDURE_ALREADY_EXISTS: &str = "wamp.error.procedure_already_exists";
    pub const NO_SUCH_REGISTRATION: &str = "wamp.error.no_such_registration";
    pub const NO_SUCH_SUBSCRIPTION: &str = "wamp.error.no_such_subscription";
    pub const NO_SUCH_SESSION: &str = "wamp.error.no_such_session";
    pub const CANCELED: &str = "wamp.error.canceled";
    pub const TIMEOUT: &str = "wamp.error.timeout";
    /// The callee cannot take the invocation now (its queue is full or it is busy).
    pub const UNAVAILABLE: &str = "wamp.error.unavailable";
    /// A payload larger than the peer it is for takes (WAMP advanced profile).
    pub const PAYLOAD_SIZE_EXCEEDED: &str = "wamp.error.payload_size_exceeded";
    /// A per-session limit (in-flight calls, registrations, subscriptions) was reached.
    pub const LIMIT_EXCEEDED: &str = "s4t.error.limit_exceeded";
    pub const CLOSE_NORMAL: &str = "wamp.close.normal";
    pub const GOODBYE_AND_OUT: &str = "wamp.close.goodbye_and_out";
    pub const SYSTEM_SHUTDOWN: &str = "wamp.close.system_shutdown";
    pub const CLOSE_KILLED: &str = "wamp.close.killed";
    /// The session could not keep up (its outbound queue stayed full) and was dropped.
    pub const CLOSE_OVERLOADED: &str = "s4t.close.overloaded";
}

/// One WAMP message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello { realm: String, details: Dict },
    Welcome { session: Id, details: Dict },
    Abort { details: Dict, reason: String, payload: Payload },
    Challenge { method: String, extra: Dict },
    Authenticate { signature: String, extra: Dict },
    Goodbye { details: Dict, reason: String },
    Error { request_type: u64, request: Id, details: Dict, error: String, payload: Payload },
    Publish { request: Id, options: Dict, topic: String, payload: Payload },
    Published { request: Id, publication: Id },
    Subscribe { request: Id, options: Dict, topic: String },
    Subscribed { request: Id, subscription: Id },
    Unsubscribe { request: Id, subscription: Id },
    Unsubscribed { request: Id },
    Event { subscription: Id, publication: Id, details: Dict, payload: Payload },
    Call { request: Id, options: Dict, procedure: String, payload: Payload },
    Cancel { request: Id, options: Dict },
    Result { request: Id, details: Dict, payload: Payload },
    Register { request: Id, options: Dict, procedure: String },
    Registered { request: Id, registration: Id },
    Unregister { request: Id, registration: Id },
    Unregistered { request: Id },
    Invocation { request: Id, registration: Id, details: Dict, payload: Payload },
    Interrupt { request: Id, options: Dict },
    Yield { request: Id, options: Dict, payload: Payload },
}

impl Message {
    /// The message type code.
    pub fn code(&self) -> u64 {
        use Message::*;
        match self {
            Hello { .. } => code::HELLO,
            Welcome { .. } => code::WELCOME,
            Abort { .. } => code::ABORT,
            Challenge { .. } => code::CHALLENGE,
            Authenticate { .. } => code::AUTHENTICATE,
            Goodbye { .. } => code::GOODBYE,
            Error { .. } => code::ERROR,
            Publish { .. } => code::PUBLISH,
            Published { .. } => code::PUBLISHED,
            Subscribe { .. } => code::SUBSCRIBE,
            Subscribed { .. } => code::SUBSCRIBED,
            Unsubscribe { .. } => code::UNSUBSCRIBE,
            Unsubscribed { .. } => code::UNSUBSCRIBED,
            Event { .. } => code::EVENT,
            Call { .. } => code::CALL,
            Cancel { .. } => code::CANCEL,
            Result { .. } => code::RESULT,
            Register { .. } => code::REGISTER,
            Registered { .. } => code::REGISTERED,
            Unregister { .. } => code::UNREGISTER,
            Unregistered { .. } => code::UNREGISTERED,
            Invocation { .. } => code::INVOCATION,
            Interrupt { .. } => code::INTERRUPT,
            Yield { .. } => code::YIELD,
        }
    }

    /// The message's name, for logs.
    pub fn name(&self) -> &'static str {
        name_of(self.code())
    }

    /// An ABORT with a human-readable message in `Details.message`.
    pub fn abort(reason: &str, message: impl Into<String>) -> Message {
        let mut details = Dict::new();
        details.insert("message".into(), Value::String(message.into()));
        Message::Abort { details, reason: reason.to_owned(), payload: Payload::default() }
    }

    /// A GOODBYE with `reason`.
    pub fn goodbye(reason: &str) -> Message {
        Message::Goodbye { details: Dict::new(), reason: reason.to_owned() }
    }

    /// An ERROR replying to request `request` of type `request_type`, with a human-readable
    /// message as its first positional argument (as crossbar and autobahn do).
    pub fn error(request_type: u64, request: Id, error: &str, message: impl Into<String>) -> Message {
        Message::Error {
            request_type,
            request,
            details: Dict::new(),
            error: error.to_owned(),
            payload: Payload::args(vec![Value::String(message.into())]),
        }
    }
}

/// The name of a message type code, for logs; `"UNKNOWN"` for codes WAMP does not define.
pub fn name_of(code: u64) -> &'static str {
    match code {
        code::HELLO => "HELLO",
        code::WELCOME => "WELCOME",
        code::ABORT => "ABORT",
        code::CHALLENGE => "CHALLENGE",
        code::AUTHENTICATE => "AUTHENTICATE",
        code::GOODBYE => "GOODBYE",
        code::ERROR => "ERROR",
        code::PUBLISH => "PUBLISH",
        code::PUBLISHED => "PUBLISHED",
        code::SUBSCRIBE => "SUBSCRIBE",
        code::SUBSCRIBED => "SUBSCRIBED",
        code::UNSUBSCRIBE => "UNSUBSCRIBE",
        code::UNSUBSCRIBED => "UNSUBSCRIBED",
        code::EVENT => "EVENT",
        code::CALL => "CALL",
        code::CANCEL => "CANCEL",
        code::RESULT => "RESULT",
        code::REGISTER => "REGISTER",
        code::REGISTERED => "REGISTERED",
        code::UNREGISTER => "UNREGISTER",
        code::UNREGISTERED => "UNREGISTERED",
        code::INVOCATION => "INVOCATION",
        code::INTERRUPT => "INTERRUPT",
        code::YIELD => "YIELD",
        _ => "UNKNOWN",
    }
}

/// Reads a string option or detail.
pub fn dict_str<'a>(dict: &'a Dict, key: &str) -> Option<&'a str> {
    dict.get(key).and_then(Value::as_str)
}

/// Reads an unsigned integer option or detail.
pub fn dict_u64(dict: &Dict, key: &str) -> Option<u64> {
    dict.get(key).and_then(Value::as_u64)
}

/// Reads a boolean option or detail.
pub fn dict_bool(dict: &Dict, key: &str) -> Option<bool> {
    dict.get(key).and_then(Value::as_bool)
}
