//! The strict parse from a decoded WAMP list to a [`Message`]: element counts, element types,
//! id ranges and URI rules. A defect in a request whose type and id could be read yields a
//! [`DecodeError::Invalid`] that can be answered with a WAMP ERROR; anything else means the
//! peer does not speak WAMP properly and the session must be aborted.

use serde_json::Value;

use super::codec::kind;
use super::message::{Dict, Id, Message, Payload, code, name_of, uri, valid_id};
use super::validate::{excerpt, valid_uri};

/// Why bytes from a peer are not a valid WAMP message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Not well-formed JSON, MessagePack or CBOR, or nested too deeply.
    #[error("malformed {format}: {reason}")]
    Syntax { format: &'static str, reason: String },
    /// Well-formed, but not a list starting with a message type code.
    #[error("not a WAMP message: {0}")]
    NotAMessage(String),
    /// Larger than the receiver accepts (reported by the transport).
    #[error("message too large: {0}")]
    TooLarge(String),
    /// A type code WAMP does not define.
    #[error("unknown WAMP message type {0}")]
    UnknownType(u64),
    /// A known message with wrong elements. `request` is set when the request id was read, so
    /// that requests can be answered with an ERROR of `error` instead of an ABORT.
    #[error("invalid {} message: {reason}", name_of(*code))]
    Invalid { code: u64, request: Option<Id>, error: &'static str, reason: String },
}

impl DecodeError {
    /// The WAMP ERROR that answers this defect, when the message was a request whose id is
    /// known. `None` means: abort the session with `wamp.error.protocol_violation`.
    pub fn error_reply(&self) -> Option<Message> {
        match self {
            DecodeError::Invalid { code, request: Some(request), error, reason } if answerable(*code) => {
                Some(Message::error(*code, *request, error, reason.clone()))
            }
            _ => None,
        }
    }
}

/// Request types answered with ERROR rather than by aborting the session.
fn answerable(code: u64) -> bool {
    matches!(
        code,
        code::SUBSCRIBE
            | code::UNSUBSCRIBE
            | code::PUBLISH
            | code::REGISTER
            | code::UNREGISTER
            | code::CALL
            | code::INVOCATION
    )
}

/// Parses a decoded WAMP list.
pub fn from_array(items: Vec<Value>) -> Result<Message, DecodeError> {
    let mut items = items.into_iter();
    let code = match items.next() {
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| DecodeError::NotAMessage(format!("type code {n}")))?,
        Some(other) => return Err(DecodeError::NotAMessage(format!("type code is a {}", kind(&other)))),
        None => return Err(DecodeError::NotAMessage("empty list".into())),
    };
    let mut p = Parser { code, items, request: None };
    let msg = p.message()?;
    p.finish()?;
    Ok(msg)
}

struct Parser {
    code: u64,
    items: std::vec::IntoIter<Value>,
    request: Option<Id>,
}

impl Parser {
    fn message(&mut self) -> Result<Message, DecodeError> {
        use Message::*;
        Ok(match self.code {
            code::HELLO => Hello { realm: self.uri("realm")?, details: self.dict("details")? },
            code::WELCOME => Welcome { session: self.id("session")?, details: self.dict("details")? },
            code::ABORT => {
                Abort { details: self.dict("details")?, reason: self.uri("reason")?, payload: self.payload()? }
            }
            code::CHALLENGE => Challenge { method: self.string("authmethod")?, extra: self.dict("extra")? },
            code::AUTHENTICATE => Authenticate { signature: self.string("signature")?, extra: self.dict("extra")? },
            code::GOODBYE => Goodbye { details: self.dict("details")?, reason: self.uri("reason")? },
            code::ERROR => {
                let request_type = self.uint("request type")?;
                let request = self.request()?;
                Error {
                    request_type,
                    request,
                    details: self.dict("details")?,
                    error: self.uri("error")?,
                    payload: self.payload()?,
                }
            }
            code::PUBLISH => Publish {
                request: self.request()?,
                options: self.dict("options")?,
                topic: self.uri("topic")?,
                payload: self.payload()?,
            },
            code::PUBLISHED => Published { request: self.request()?, publication: self.id("publication")? },
            code::SUBSCRIBE => {
                Subscribe { request: self.request()?, options: self.dict("options")?, topic: self.uri("topic")? }
            }
            code::SUBSCRIBED => Subscribed { request: self.request()?, subscription: self.id("subscription")? },
            code::UNSUBSCRIBE => Unsubscribe { request: self.request()?, subscription: self.id("subscription")? },
            code::UNSUBSCRIBED => Unsubscribed { request: self.request()? },
            code::EVENT => Event {
                subscription: self.id("subscription")?,
                publication: self.id("publication")?,
                details: self.dict("details")?,
                payload: self.payload()?,
            },
            code::CALL => Call {
                request: self.request()?,
                options: self.dict("options")?,
                procedure: self.uri("procedure")?,
                payload: self.payload()?,
            },
            code::CANCEL => Cancel { request: self.request()?, options: self.dict("options")? },
            code::RESULT => {
                Result { request: self.request()?, details: self.dict("details")?, payload: self.payload()? }
            }
            code::REGISTER => {
                Register { request: self.request()?, options: self.dict("options")?, procedure: self.uri("procedure")? }
            }
            code::REGISTERED => Registered { request: self.request()?, registration: self.id("registration")? },
            code::UNREGISTER => Unregister { request: self.request()?, registration: self.id("registration")? },
            code::UNREGISTERED => Unregistered { request: self.request()? },
            code::INVOCATION => Invocation {
                request: self.request()?,
                registration: self.id("registration")?,
                details: self.dict("details")?,
                payload: self.payload()?,
            },
            code::INTERRUPT => Interrupt { request: self.request()?, options: self.dict("options")? },
            code::YIELD => Yield { request: self.request()?, options: self.dict("options")?, payload: self.payload()? },
            other => return Err(DecodeError::UnknownType(other)),
        })
    }

    fn invalid(&self, error: &'static str, reason: String) -> DecodeError {
        DecodeError::Invalid { code: self.code, request: self.request, error, reason }
    }

    fn next(&mut self, what: &str) -> Result<Value, DecodeError> {
        self.items.next().ok_or_else(|| self.invalid(uri::PROTOCOL_VIOLATION, format!("missing {what}")))
    }

    fn uint(&mut self, what: &str) -> Result<u64, DecodeError> {
        match self.next(what)? {
            Value::Number(n) if n.is_u64() => Ok(n.as_u64().unwrap_or_default()),
            other => {
                Err(self.invalid(uri::PROTOCOL_VIOLATION, format!("{what} must be an integer, got {}", kind(&other))))
            }
        }
    }

    fn id(&mut self, what: &str) -> Result<Id, DecodeError> {
        let id = self.uint(what)?;
        if valid_id(id) {
            Ok(id)
        } else {
            Err(self.invalid(uri::PROTOCOL_VIOLATION, format!("{what} {id} out of range")))
        }
    }

    /// The request id: once read, defects after it are answerable with an ERROR.
    fn request(&mut self) -> Result<Id, DecodeError> {
        let id = self.id("request id")?;
        self.request = Some(id);
        Ok(id)
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        match self.next(what)? {
            Value::String(s) => Ok(s),
            other => {
                Err(self.invalid(uri::PROTOCOL_VIOLATION, format!("{what} must be a string, got {}", kind(&other))))
            }
        }
    }

    fn uri(&mut self, what: &str) -> Result<String, DecodeError> {
        let s = self.string(what)?;
        if valid_uri(&s) {
            Ok(s)
        } else {
            Err(self.invalid(uri::INVALID_URI, format!("invalid {what} URI {}", excerpt(&s))))
        }
    }

    fn dict(&mut self, what: &str) -> Result<Dict, DecodeError> {
        match self.next(what)? {
            Value::Object(d) => Ok(d),
            other => Err(self.invalid(uri::PROTOCOL_VIOLATION, format!("{what} must be a dict, got {}", kind(&other)))),
        }
    }

    /// Optional `Arguments|list` then optional `ArgumentsKw|dict`.
    fn payload(&mut self) -> Result<Payload, DecodeError> {
        let mut payload = Payload::default();
        match self.items.next() {
            None => return Ok(payload),
            Some(Value::Array(args)) => payload.args = args,
            Some(other) => {
                let reason = format!("arguments must be a list, got {}", kind(&other));
                return Err(self.invalid(uri::INVALID_ARGUMENT, reason));
            }
        }
        match self.items.next() {
            None => {}
            Some(Value::Object(kwargs)) => payload.kwargs = kwargs,
            Some(other) => {
                let reason = format!("keyword arguments must be a dict, got {}", kind(&other));
                return Err(self.invalid(uri::INVALID_ARGUMENT, reason));
            }
        }
        Ok(payload)
    }

    fn finish(&mut self) -> Result<(), DecodeError> {
        match self.items.len() {
            0 => Ok(()),
            n => Err(self.invalid(uri::PROTOCOL_VIOLATION, format!("{n} unexpected trailing elements"))),
        }
    }
}
