//! Sans-I/O session state machines: the opening handshake on both sides (HELLO, CHALLENGE,
//! AUTHENTICATE, WELCOME or ABORT) and the rules for which messages each side may receive
//! once the session is established.
//!
//! The machines take messages and return messages to send or outcomes; the caller does the
//! I/O and, on the router side, the (asynchronous) credential lookups between steps.

use std::time::SystemTime;

use serde_json::{Value, json};

use super::auth::{self, ChallengeError, ChallengeFor, CraCredential, Salting, Secret};
use super::message::{Dict, Id, Message, code, dict_str, uri};

/// Authentication methods this implementation speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    Anonymous,
    Ticket,
    WampCra,
}

impl AuthMethod {
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::Anonymous => "anonymous",
            AuthMethod::Ticket => "ticket",
            AuthMethod::WampCra => "wampcra",
        }
    }

    pub fn from_name(name: &str) -> Option<AuthMethod> {
        match name {
            "anonymous" => Some(AuthMethod::Anonymous),
            "ticket" => Some(AuthMethod::Ticket),
            "wampcra" => Some(AuthMethod::WampCra),
            _ => None,
        }
    }
}

/// How a client authenticates.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    Anonymous,
    Ticket { authid: String, ticket: Secret },
    WampCra { authid: String, secret: Secret },
}

/// The outcome of a successful opening handshake, as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Welcome {
    pub session: Id,
    pub authid: String,
    pub authrole: String,
    pub authmethod: String,
    pub details: Dict,
}

/// Why an opening handshake failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer sent ABORT.
    #[error("session refused: {reason}{}", message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Aborted { reason: String, message: Option<String> },
    /// The peer broke the protocol; send the given ABORT.
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error(transparent)]
    Challenge(#[from] ChallengeError),
}

/// What the client must do after a handshake step.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientStep {
    Send(Message),
    Joined(Welcome),
}

/// The client side of the opening handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    auth: ClientAuth,
    challenged: bool,
    /// A derived key from an earlier handshake with the same salting, to skip PBKDF2.
    key_cache: Option<(Salting, Secret)>,
}

impl ClientHandshake {
    /// Starts a handshake; returns the machine and the HELLO to send.
    pub fn new(realm: &str, auth: ClientAuth, key_cache: Option<(Salting, Secret)>) -> (Self, Message) {
        let mut details = Dict::new();
        details.insert("roles".into(), client_roles());
        details.insert("agent".into(), Value::String(concat!("s4t-wamp/", env!("CARGO_PKG_VERSION")).into()));
        let (methods, authid) = match &auth {
            ClientAuth::Anonymous => (vec!["anonymous"], None),
            ClientAuth::Ticket { authid, .. } => (vec!["ticket"], Some(authid.clone())),
            ClientAuth::WampCra { authid, .. } => (vec!["wampcra"], Some(authid.clone())),
        };
        details.insert("authmethods".into(), json!(methods));
        if let Some(authid) = authid {
            details.insert("authid".into(), Value::String(authid));
        }
        let hello = Message::Hello { realm: realm.to_owned(), details };
        (ClientHandshake { auth, challenged: false, key_cache }, hello)
    }

    /// The WAMP-CRA derived key computed during this handshake, to reuse on reconnect.
    pub fn key_cache(&self) -> Option<&(Salting, Secret)> {
        self.key_cache.as_ref()
    }

    /// Feeds a message from the router.
    pub fn handle(&mut self, msg: Message) -> Result<ClientStep, HandshakeError> {
        match msg {
            Message::Welcome { session, details } => {
                let text = |k| dict_str(&details, k).unwrap_or_default().to_owned();
                let (authid, authrole, authmethod) = (text("authid"), text("authrole"), text("authmethod"));
                Ok(ClientStep::Joined(Welcome { session, authid, authrole, authmethod, details }))
            }
            Message::Abort { details, reason, .. } => {
                Err(HandshakeError::Aborted { reason, message: dict_str(&details, "message").map(str::to_owned) })
            }
            Message::Challenge { method, extra } if !self.challenged => {
                self.challenged = true;
                self.answer(&method, &extra).map(ClientStep::Send)
            }
            other => Err(HandshakeError::Protocol(format!("unexpected {} during the opening handshake", other.name()))),
        }
    }

    fn answer(&mut self, method: &str, extra: &Dict) -> Result<Message, HandshakeError> {
        let signature = match (&self.auth, method) {
            (ClientAuth::Ticket { ticket, .. }, "ticket") => ticket.expose().to_owned(),
            (ClientAuth::WampCra { secret, .. }, "wampcra") => {
                let (challenge, salting) = auth::read_cra_challenge(extra)?;
                let key = match salting {
                    None => secret.clone(),
                    Some(s) => match &self.key_cache {
                        Some((cached, key)) if *cached == s => key.clone(),
                        _ => {
                            let key = auth::derive_key(secret, &s.salt, s.iterations, s.keylen);
                            self.key_cache = Some((s, key.clone()));
                            key
                        }
                    },
                };
                auth::sign(&key, challenge)
            }
            _ => {
                return Err(HandshakeError::Protocol(format!(
                    "router challenged with {method:?}, which we did not offer"
                )));
            }
        };
        Ok(Message::Authenticate { signature, extra: Dict::new() })
    }
}

fn client_roles() -> Value {
    json!({
        "caller": {"features": {"call_canceling": true, "call_timeout": true}},
        "callee": {"features": {"call_canceling": true, "caller_identification": true}},
        "publisher": {"features": {"publisher_exclusion": true}},
        "subscriber": {"features": {}},
    })
}

/// The router's roles and features, announced in WELCOME.
pub fn router_roles() -> Value {
    json!({
        "broker": {"features": {"publisher_exclusion": true, "session_meta_api": true}},
        "dealer": {"features": {
            "call_canceling": true, "call_timeout": true, "caller_identification": true, "session_meta_api": true
        }},
    })
}

/// What the router keeps of a HELLO while the handshake goes on: only what it needs, not the
/// details a client may have filled up to the message size limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub realm: String,
    pub authid: Option<String>,
    /// The methods the client offers that we speak, in the client's order, each once.
    pub methods: Vec<AuthMethod>,
}

/// The identity a router grants a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub authid: String,
    pub authrole: String,
    pub authmethod: AuthMethod,
    pub authprovider: String,
}

/// The client's answer to a challenge, once read by [`RouterHandshake::authenticate`].
#[derive(Debug)]
pub enum AuthResponse {
    /// A ticket for the caller to verify (asynchronously).
    Ticket(Secret),
    /// A WAMP-CRA signature that checked out.
    CraVerified,
}

/// The router side of the opening handshake.
#[derive(Debug)]
pub struct RouterHandshake {
    session: Id,
    pending: Pending,
}

#[derive(Debug)]
enum Pending {
    Hello,
    Ticket,
    Cra { challenge: String, cred: CraCredential },
    Done,
}

impl RouterHandshake {
    /// A handshake for the session id the router will assign on success.
    pub fn new(session: Id) -> Self {
        RouterHandshake { session, pending: Pending::Hello }
    }

    pub fn session(&self) -> Id {
        self.session
    }

    /// Reads the first message, which must be a HELLO. On error, send the returned ABORT.
    pub fn hello(&mut self, msg: Message) -> Result<Hello, Message> {
        let Message::Hello { realm, details } = msg else {
            return Err(Message::abort(uri::PROTOCOL_VIOLATION, format!("expected HELLO, got {}", msg.name())));
        };
        if !matches!(self.pending, Pending::Hello) {
            return Err(Message::abort(uri::PROTOCOL_VIOLATION, "second HELLO"));
        }
        let methods = match details.get("authmethods") {
            None => vec![AuthMethod::Anonymous],
            Some(Value::Array(names)) => {
                let mut methods = Vec::new();
                for method in names.iter().filter_map(Value::as_str).filter_map(AuthMethod::from_name) {
                    if !methods.contains(&method) {
                        methods.push(method);
                    }
                }
                methods
            }
            Some(_) => return Err(Message::abort(uri::PROTOCOL_VIOLATION, "authmethods must be a list")),
        };
        let authid = match details.get("authid") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
            Some(_) => return Err(Message::abort(uri::PROTOCOL_VIOLATION, "authid must be a non-empty string")),
        };
        self.pending = Pending::Done;
        Ok(Hello { realm, authid, methods })
    }

    /// The CHALLENGE for ticket authentication.
    pub fn challenge_ticket(&mut self) -> Message {
        self.pending = Pending::Ticket;
        Message::Challenge { method: "ticket".into(), extra: Dict::new() }
    }

    /// The CHALLENGE for WAMP-CRA authentication with the stored credential.
    pub fn challenge_cra(&mut self, who: &ChallengeFor<'_>, cred: CraCredential, now: SystemTime) -> Message {
        let (challenge, extra) = auth::cra_challenge(who, &cred, now);
        self.pending = Pending::Cra { challenge, cred };
        Message::Challenge { method: "wampcra".into(), extra }
    }

    /// Reads the AUTHENTICATE answering our challenge. On error, send the returned ABORT.
    pub fn authenticate(&mut self, msg: Message) -> Result<AuthResponse, Message> {
        let pending = std::mem::replace(&mut self.pending, Pending::Done);
        let Message::Authenticate { signature, .. } = msg else {
            return Err(Message::abort(uri::PROTOCOL_VIOLATION, format!("expected AUTHENTICATE, got {}", msg.name())));
        };
        match pending {
            Pending::Ticket => Ok(AuthResponse::Ticket(Secret::new(signature))),
            Pending::Cra { challenge, cred } if cred.verify(&challenge, &signature) => Ok(AuthResponse::CraVerified),
            Pending::Cra { .. } => Err(Message::abort(uri::AUTHENTICATION_FAILED, "WAMP-CRA signature is invalid")),
            Pending::Hello | Pending::Done => {
                Err(Message::abort(uri::PROTOCOL_VIOLATION, "AUTHENTICATE without CHALLENGE"))
            }
        }
    }

    /// The WELCOME for a granted identity.
    pub fn welcome(&self, identity: &Identity) -> Message {
        let mut details = Dict::new();
        details.insert("authid".into(), Value::String(identity.authid.clone()));
        details.insert("authrole".into(), Value::String(identity.authrole.clone()));
        details.insert("authmethod".into(), Value::String(identity.authmethod.name().into()));
        details.insert("authprovider".into(), Value::String(identity.authprovider.clone()));
        details.insert("roles".into(), router_roles());
        details.insert("_router".into(), Value::String(concat!("s4t-wamp/", env!("CARGO_PKG_VERSION")).into()));
        Message::Welcome { session: self.session, details }
    }
}

/// Checks a message a router received from a client in an established session. `Err` holds
/// the reason for an ABORT with `wamp.error.protocol_violation`.
pub fn router_may_receive(msg: &Message) -> Result<(), String> {
    match msg {
        Message::Goodbye { .. }
        | Message::Abort { .. }
        | Message::Publish { .. }
        | Message::Subscribe { .. }
        | Message::Unsubscribe { .. }
        | Message::Call { .. }
        | Message::Cancel { .. }
        | Message::Register { .. }
        | Message::Unregister { .. }
        | Message::Yield { .. } => Ok(()),
        Message::Error { request_type: code::INVOCATION, .. } => Ok(()),
        Message::Error { request_type, .. } => Err(format!("ERROR for request type {request_type} sent to a router")),
        other => Err(format!("{} is not allowed from a client in an established session", other.name())),
    }
}

/// Checks a message a client received from the router in an established session.
pub fn client_may_receive(msg: &Message) -> Result<(), String> {
    match msg {
        Message::Hello { .. }
        | Message::Welcome { .. }
        | Message::Challenge { .. }
        | Message::Authenticate { .. }
        | Message::Publish { .. }
        | Message::Subscribe { .. }
        | Message::Unsubscribe { .. }
        | Message::Call { .. }
        | Message::Cancel { .. }
        | Message::Register { .. }
        | Message::Unregister { .. }
        | Message::Yield { .. } => {
            Err(format!("{} is not allowed from a router in an established session", msg.name()))
        }
        Message::Error { request_type, .. } => match *request_type {
            code::SUBSCRIBE | code::UNSUBSCRIBE | code::PUBLISH | code::REGISTER | code::UNREGISTER | code::CALL => {
                Ok(())
            }
            other => Err(format!("ERROR for request type {other} sent to a client")),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
