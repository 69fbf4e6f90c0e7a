//! Authentication: the [`Authenticator`] the cloud implements, a static one for tests and
//! benchmarks, and the router side of the opening handshake.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use s4t_shared::wamp::auth::{ChallengeFor, CraCredential, Secret};
use s4t_shared::wamp::message::uri;
use s4t_shared::wamp::session::{AuthMethod, AuthResponse, RouterHandshake};
use s4t_shared::wamp::{Id, Message};
use tracing::{info, warn};

use super::Inner;
use crate::link::{Link, RecvError};
use crate::{Error, Role};

/// A boxed future returned by [`Authenticator`] methods.
pub type AuthFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// Credential lookups the router needs; the cloud implements it over its database.
///
/// Returning `Ok(None)` refuses the session (`wamp.error.authentication_failed`; for
/// WAMP-CRA only after a decoy challenge has been answered, as a wrong signature is); `Err` is
/// a failure of the lookup itself (logged, and the session is refused at once).
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies `ticket` presented by `authid` (e.g. `authid = "enroll"` with a one-time
    /// registration code, or the cloud's own agent ticket); returns the role it grants.
    fn ticket<'a>(&'a self, realm: &'a str, authid: &'a str, ticket: &'a Secret) -> AuthFuture<'a, Option<Role>>;

    /// The stored WAMP-CRA credential of `authid` (a board uuid) and the role it grants.
    fn wampcra<'a>(&'a self, realm: &'a str, authid: &'a str) -> AuthFuture<'a, Option<(Role, CraCredential)>>;

    /// Whether anonymous sessions (the `legacy` role) are accepted: `--legacy-boards`.
    fn anonymous(&self, realm: &str) -> bool;
}

/// A fixed set of credentials, for tests, benchmarks and the cloud's own agent ticket.
#[derive(Debug, Default, Clone)]
pub struct StaticAuthenticator {
    tickets: HashMap<String, (Secret, Role)>,
    cra: HashMap<String, (Role, CraCredential)>,
    anonymous: bool,
}

impl StaticAuthenticator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_ticket(mut self, authid: &str, ticket: Secret, role: Role) -> Self {
        self.tickets.insert(authid.to_owned(), (ticket, role));
        self
    }

    /// Adds a WAMP-CRA identity, storing only the salted derived key of `secret`.
    pub fn with_cra(self, authid: &str, secret: &Secret, role: Role) -> Self {
        self.with_cra_credential(authid, CraCredential::derive(secret), role)
    }

    pub fn with_cra_credential(mut self, authid: &str, credential: CraCredential, role: Role) -> Self {
        self.cra.insert(authid.to_owned(), (role, credential));
        self
    }

    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.anonymous = allow;
        self
    }
}

impl Authenticator for StaticAuthenticator {
    fn ticket<'a>(&'a self, _realm: &'a str, authid: &'a str, ticket: &'a Secret) -> AuthFuture<'a, Option<Role>> {
        let role = self.tickets.get(authid).filter(|(t, _)| t.ct_eq(ticket.expose())).map(|(_, r)| *r);
        Box::pin(async move { Ok(role) })
    }

    fn wampcra<'a>(&'a self, _realm: &'a str, authid: &'a str) -> AuthFuture<'a, Option<(Role, CraCredential)>> {
        let found = self.cra.get(authid).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn anonymous(&self, _realm: &str) -> bool {
        self.anonymous
    }
}

/// What the handshake granted.
pub(crate) struct Granted {
    pub(crate) authid: String,
    pub(crate) role: Role,
    pub(crate) method: AuthMethod,
    /// When the credential that admitted it was read: a handshake may finish seconds later,
    /// after that credential was withdrawn, so revocation judges the session by this time.
    pub(crate) admitted: SystemTime,
}

/// Runs the router side of the opening handshake up to (not including) WELCOME. On refusal
/// the ABORT has been sent and `None` is returned.
pub(crate) async fn open(inner: &Inner, link: &mut Link, hs: &mut RouterHandshake) -> Option<Granted> {
    match open_inner(inner, link, hs).await {
        Ok(granted) => Some(granted),
        Err(Some(abort)) => {
            if let Message::Abort { reason, .. } = &abort {
                info!(reason = %reason, "session refused");
            }
            let _ = link.send(abort.into()).await;
            None
        }
        Err(None) => None,
    }
}

/// `Err(Some(abort))` to refuse, `Err(None)` when the peer went away.
async fn open_inner(inner: &Inner, link: &mut Link, hs: &mut RouterHandshake) -> Result<Granted, Option<Message>> {
    let config = &inner.config;
    let hello = hs.hello(next(link).await?).map_err(Some)?;
    if hello.realm != config.realm {
        return Err(Some(Message::abort(uri::NO_SUCH_REALM, format!("no realm {}", hello.realm))));
    }
    let realm = hello.realm.as_str();
    let authid = hello.authid.as_deref();
    for method in &hello.methods {
        match (method, authid) {
            (AuthMethod::Ticket, Some(authid)) => {
                link.send(hs.challenge_ticket().into()).await.map_err(|_| None)?;
                let AuthResponse::Ticket(ticket) = hs.authenticate(next(link).await?).map_err(Some)? else {
                    return Err(Some(refused("unexpected answer")));
                };
                let admitted = SystemTime::now();
                let role = lookup(inner.authenticator.ticket(realm, authid, &ticket).await)?;
                return Ok(Granted { authid: authid.to_owned(), role, method: AuthMethod::Ticket, admitted });
            }
            (AuthMethod::WampCra, Some(authid)) => {
                // An unknown authid is challenged like a known one and refused only after its
                // answer, as a wrong signature is: the refusal must not tell which it was.
                let admitted = SystemTime::now();
                let (role, cred, known) = match inner.authenticator.wampcra(realm, authid).await {
                    Ok(Some((role, cred))) => (role, cred, true),
                    Ok(None) => (Role::Board, CraCredential::decoy(&inner.decoy_key, authid), false),
                    Err(e) => return Err(lookup::<()>(Err(e)).err().flatten()),
                };
                let who = ChallengeFor {
                    authid,
                    authrole: role.name(),
                    authprovider: &config.authprovider,
                    session: hs.session(),
                };
                link.send(hs.challenge_cra(&who, cred, SystemTime::now()).into()).await.map_err(|_| None)?;
                let verified = hs.authenticate(next(link).await?).map_err(Some);
                if !known {
                    info!(authid, "WAMP-CRA for an unknown authid");
                    // The decoy's key matches no signature: this is the refusal a wrong one gets.
                    return Err(verified.err().unwrap_or_else(|| Some(refused("WAMP-CRA signature is invalid"))));
                }
                verified?;
                return Ok(Granted { authid: authid.to_owned(), role, method: AuthMethod::WampCra, admitted });
            }
            (AuthMethod::Anonymous, _) if inner.authenticator.anonymous(realm) => {
                let (authid, role, method) = ("anonymous".into(), Role::Legacy, AuthMethod::Anonymous);
                return Ok(Granted { authid, role, method, admitted: SystemTime::now() });
            }
            _ => {}
        }
    }
    let offered: Vec<&str> = hello.methods.iter().map(|m| m.name()).collect();
    Err(Some(Message::abort(uri::NO_AUTH_METHOD, format!("no acceptable authentication method among {offered:?}"))))
}

fn refused(why: &str) -> Message {
    Message::abort(uri::AUTHENTICATION_FAILED, why)
}

fn lookup<T>(found: Result<Option<T>, Error>) -> Result<T, Option<Message>> {
    match found {
        Ok(Some(t)) => Ok(t),
        Ok(None) => Err(Some(refused("unknown authid or wrong credentials"))),
        Err(e) => {
            warn!(cause = %e, "authenticator failed");
            Err(Some(refused("authentication is unavailable")))
        }
    }
}

/// The next handshake message; a malformed one aborts, a closed link ends quietly.
async fn next(link: &mut Link) -> Result<Message, Option<Message>> {
    match link.recv().await {
        Ok(Some(msg)) => Ok(msg),
        Ok(None) | Err(RecvError::Fatal(_)) => Err(None),
        Err(RecvError::Decode(e)) => Err(Some(Message::abort(uri::PROTOCOL_VIOLATION, e.to_string()))),
    }
}

/// The session id a session is offered during the handshake (and kept if still free).
pub(crate) fn provisional_id() -> Id {
    super::realm::random_id()
}
