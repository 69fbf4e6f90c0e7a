//! The WAMP router the cloud's wamp-agent embeds.
//!
//! ```no_run
//! # async fn f(listener: tokio::net::TcpListener, auth: std::sync::Arc<dyn s4t_wamp::Authenticator>) -> Result<(), s4t_wamp::Error> {
//! use s4t_wamp::{Router, RouterConfig};
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let router = Router::new(RouterConfig::default(), auth);
//! let agent = router.local_session("agent").await?; // the cloud's own session, role `agent`
//! tokio::spawn({ let r = router.clone(); let s = shutdown.clone(); async move { r.serve(listener, None, s).await } });
//! # Ok(()) }
//! ```

mod auth;
mod broker;
mod dealer;
mod meta;
mod realm;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use s4t_shared::limits::{KeyedSlots, SourceSlots};
use s4t_shared::wamp::auth::Secret;
use s4t_shared::wamp::message::uri;
use s4t_shared::wamp::{Id, Serializer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use auth::{AuthFuture, Authenticator, StaticAuthenticator};

use crate::link::Keepalive;
use crate::{Error, Role, Session};
use realm::{Farewell, Realm};

/// Per-session limits and call timeouts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Calls a session may have in flight; more are refused with `s4t.error.limit_exceeded`.
    /// Boards call only the agent (login, liveness, results: a few at a time), so this also
    /// caps the agent's handler slots one board can hold (`RouterConfig::agent_invocations`).
    pub max_in_flight_calls: usize,
    /// The same for `agent` sessions: the cloud calls every board through them.
    pub max_in_flight_calls_agent: usize,
    /// Registrations per session (the original lightning-rod registers about 40 procedures).
    pub max_registrations: usize,
    /// Subscriptions per session.
    pub max_subscriptions: usize,
    /// Publications per second a non-agent session may make (sustained); more are refused
    /// (`s4t.error.limit_exceeded` when acknowledged, dropped otherwise).
    pub publish_rate: u32,
    /// Publications a non-agent session may make in a burst.
    pub publish_burst: u32,
    /// A session whose outbound queue stays full this long is closed (`s4t.close.overloaded`).
    pub stuck_timeout: Duration,
    /// Timeout of a call whose caller gave none (`CALL.Options.timeout`).
    pub default_call_timeout: Duration,
    /// Upper bound on any call timeout.
    pub max_call_timeout: Duration,
    /// Largest payload (args and kwargs, as JSON: [`s4t_shared::wamp::message::Payload::json_len`])
    /// of a call forwarded to a callee that is not an agent; a larger call gets ERROR
    /// `wamp.error.payload_size_exceeded`. Boards close their session on a message over their
    /// own limit (1 MiB for ours, as for the router), which would end every other call of
    /// theirs and make them reconnect: the room left is for the INVOCATION's header.
    pub max_invocation_payload: usize,
}

impl Limits {
    /// The in-flight call limit of a session with `role`.
    pub fn in_flight_for(&self, role: Role) -> usize {
        if role == Role::Agent { self.max_in_flight_calls_agent } else { self.max_in_flight_calls }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight_calls: 32,
            max_in_flight_calls_agent: 16_384,
            publish_rate: 100,
            publish_burst: 200,
            max_registrations: 256,
            max_subscriptions: 64,
            stuck_timeout: Duration::from_secs(10),
            default_call_timeout: Duration::from_secs(120),
            max_call_timeout: Duration::from_secs(3600),
            max_invocation_payload: (1 << 20) - 16 * 1024,
        }
    }
}

/// Router configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The one realm served (`s4t`).
    pub realm: String,
    /// `authprovider` reported in WELCOME, challenges and the meta API.
    pub authprovider: String,
    pub limits: Limits,
    /// Largest WAMP message accepted (bigger ones close the session). Before the session is
    /// established a connection may send 64 KiB in all, whatever this says.
    pub max_message_size: usize,
    /// Concurrent connections accepted; more are closed at once.
    pub max_sessions: usize,
    /// Established sessions one board (one authid with the `board` role) may have at once
    /// (default 4; at least 1). A new session beyond it closes the board's oldest
    /// (GOODBYE `s4t.close.replaced`) instead of being refused: a board that reconnects after
    /// a network change must not be locked out by its own half-dead sessions until pings
    /// notice them. Without it one board's credentials could take every `max_sessions` slot,
    /// and each of its sessions may hold `limits.max_in_flight_calls` of the agent's handler
    /// slots. `agent` sessions are not counted.
    pub max_sessions_per_board: usize,
    /// Established anonymous (`legacy`) sessions one source address may have at once
    /// (default 128); more are refused with ABORT `s4t.error.limit_exceeded`, which our
    /// lightning-rod retries. Without it one peer could take every `max_sessions` slot when
    /// anonymous boards are allowed; 128 leaves room for legacy boards behind one NAT address.
    pub max_anonymous_per_source: usize,
    /// Established enrollment sessions (ticket with a registration code, role `enrollment`)
    /// one source address may have at once (default 16); more are refused with ABORT
    /// `s4t.error.limit_exceeded`. Without it whoever holds one valid code could take every
    /// `max_sessions` slot; a board needs one enrollment session, briefly.
    pub max_enrollment_per_source: usize,
    /// Established anonymous sessions on the whole router (default 10,000, half of
    /// `max_sessions`): the per-source bound alone does not hold a peer with many addresses
    /// (an IPv6 /48 holds 65,536 /64 sources) off every slot.
    pub max_anonymous_sessions: usize,
    /// Established enrollment sessions on the whole router (default 1,024), for the same
    /// reason: a registration code used from many addresses.
    pub max_enrollment_sessions: usize,
    /// How long an enrollment session may stay after WELCOME (default 120 s); then the router
    /// closes it (GOODBYE `s4t.close.expired`). The ticket is checked only at the handshake and
    /// an enrollment needs one call, so nothing else would end an idle one.
    pub enrollment_lifetime: Duration,
    /// Unsolicited messages (INVOCATION, EVENT) queued towards one session before it counts as
    /// not keeping up; room for answers to its own requests is reserved on top.
    pub queue_capacity: usize,
    /// TLS + WebSocket + WAMP opening handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Connections one source address may have in their opening handshake at once; more are
    /// closed at once. Without it one peer with idle sockets (renewed every
    /// `handshake_timeout`) could hold all `max_sessions` slots, and boards could not log in.
    pub max_opening_per_source: usize,
    /// Writing one message to a peer must finish within this, or the session is closed.
    pub write_timeout: Duration,
    /// WebSocket pings towards idle peers; `None` disables them.
    pub keepalive: Option<Keepalive>,
    /// Invocations the in-process (agent) session runs at once. Every board's login,
    /// liveness and results go to it: after a cloud restart a whole fleet logs in at once,
    /// and an invocation beyond this is refused (`wamp.error.unavailable`), which the
    /// original lightning-rod answers by restarting itself. Each board session may have
    /// `limits.max_in_flight_calls` of them, so no one board takes them all.
    pub agent_invocations: usize,
    /// Keys the salts of the decoy WAMP-CRA challenges unknown authids get
    /// ([`s4t_shared::wamp::auth::CraCredential::decoy`]); keep it across restarts, or a
    /// decoy's salt changes when the router restarts while a real board's does not. `None`: a
    /// random key per router.
    pub decoy_key: Option<Secret>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            realm: "s4t".into(),
            authprovider: "s4t".into(),
            limits: Limits::default(),
            max_message_size: 1 << 20,
            max_sessions: 20_000,
            max_sessions_per_board: 4,
            max_anonymous_per_source: 128,
            max_enrollment_per_source: 16,
            max_anonymous_sessions: 10_000,
            max_enrollment_sessions: 1024,
            enrollment_lifetime: Duration::from_secs(120),
            queue_capacity: 64,
            handshake_timeout: Duration::from_secs(10),
            max_opening_per_source: 128,
            write_timeout: Duration::from_secs(10),
            keepalive: Some(Keepalive::default()),
            agent_invocations: 4096,
            decoy_key: None,
        }
    }
}

/// How a session reached the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportInfo {
    /// The remote address; `None` for in-process sessions.
    pub peer: Option<SocketAddr>,
    pub serializer: Option<Serializer>,
    pub tls: bool,
    /// The host the peer dialed (its `Host` header, without the port; a name or an address,
    /// IPv6 in brackets), when it is a plain host name or address; `None` otherwise and for
    /// in-process sessions. The cloud answers enrolling boards with URLs of this host when it
    /// was told no public host.
    pub host: Option<String>,
}

/// The host part of a `Host` header value, if it is a DNS name or an IP address (IPv6 in
/// brackets) of at most 253 characters; anything else is `None`.
pub fn host_of_header(value: &str) -> Option<String> {
    let value = value.trim();
    let host = match value.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest.split_once(']')?;
            if !(after.is_empty() || after.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok())) {
                return None;
            }
            return v6.parse::<std::net::Ipv6Addr>().ok().map(|a| format!("[{a}]"));
        }
        None => match value.rsplit_once(':') {
            Some((h, port)) if port.parse::<u16>().is_ok() => h,
            Some(_) => return None,
            None => value,
        },
    };
    let name_like = |h: &str| {
        h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
    };
    (!host.is_empty() && host.len() <= 253 && name_like(host)).then(|| host.to_ascii_lowercase())
}

/// A joined session, as the router reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: Id,
    pub authid: String,
    pub role: Role,
    /// `ticket`, `wampcra`, `anonymous` or `trusted` (in-process).
    pub authmethod: &'static str,
    pub authprovider: String,
    /// The board uuid: the authid of a `board` session, or the uuid bound to a `legacy`
    /// session with [`Router::bind_board`].
    pub board: Option<String>,
    pub transport: TransportInfo,
    /// When it was admitted: when the credential it authenticated with was read.
    pub joined: std::time::SystemTime,
}

pub(crate) struct Inner {
    pub(crate) config: RouterConfig,
    pub(crate) authenticator: Arc<dyn Authenticator>,
    pub(crate) realm: Arc<Realm>,
    tasks: TaskTracker,
    connections: Arc<Semaphore>,
    /// [`RouterConfig::decoy_key`], or a random one.
    pub(crate) decoy_key: Secret,
    /// Connections in their opening handshake, by source address.
    opening: Arc<SourceSlots>,
    /// Established anonymous sessions, by source address
    /// ([`RouterConfig::max_anonymous_per_source`]).
    pub(crate) anonymous: Arc<SourceSlots>,
    /// Established enrollment sessions, by source address
    /// ([`RouterConfig::max_enrollment_per_source`]).
    pub(crate) enrollment: Arc<SourceSlots>,
    /// Established anonymous and enrollment sessions in all, by role
    /// ([`RouterConfig::max_anonymous_sessions`], [`RouterConfig::max_enrollment_sessions`]).
    pub(crate) anonymous_total: Arc<KeyedSlots<()>>,
    pub(crate) enrollment_total: Arc<KeyedSlots<()>>,
}

/// The router: a cheap handle; clones share one router.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Router {
    pub fn new(config: RouterConfig, authenticator: Arc<dyn Authenticator>) -> Router {
        let realm = Realm::new(
            config.realm.clone(),
            config.limits.clone(),
            config.queue_capacity,
            config.agent_invocations,
            config.max_sessions_per_board,
        );
        let connections = Arc::new(Semaphore::new(config.max_sessions));
        let opening = SourceSlots::new(config.max_opening_per_source);
        let anonymous = SourceSlots::new(config.max_anonymous_per_source);
        let enrollment = SourceSlots::new(config.max_enrollment_per_source);
        let anonymous_total = KeyedSlots::new(config.max_anonymous_sessions);
        let enrollment_total = KeyedSlots::new(config.max_enrollment_sessions);
        let decoy_key = config.decoy_key.clone().unwrap_or_else(|| {
            let bytes: [u8; 32] = rand::random();
            Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
        });
        Router {
            inner: Arc::new(Inner {
                config,
                authenticator,
                realm,
                tasks: TaskTracker::new(),
                connections,
                decoy_key,
                opening,
                anonymous,
                enrollment,
                anonymous_total,
                enrollment_total,
            }),
        }
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    /// Serves WebSocket connections (path `/`; TLS when `tls` is given) from `listener` until
    /// `shutdown` fires; then says GOODBYE (`wamp.close.system_shutdown`) to every session and
    /// waits up to 5 s for them to close.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        info!(addr = ?listener.local_addr().ok(), tls = acceptor.is_some(), realm = %self.inner.config.realm, "WAMP router listening");
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(cause = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(opening) = self.inner.opening.take(peer.ip()) else {
                debug!(%peer, "connection refused: too many opening handshakes from this address");
                continue;
            };
            let Ok(permit) = self.inner.connections.clone().try_acquire_owned() else {
                warn!(%peer, max = self.inner.config.max_sessions, "connection refused: too many sessions");
                continue;
            };
            let inner = self.inner.clone();
            let acceptor = acceptor.clone();
            let stop = shutdown.clone();
            self.inner.tasks.spawn(async move {
                session::serve_connection(inner, tcp, peer, acceptor, stop, opening).await;
                drop(permit);
            });
        }
        self.shutdown().await;
        Ok(())
    }

    /// Closes every session and waits (up to 5 s) for them to finish.
    async fn shutdown(&self) {
        self.inner.realm.kill_where(&Farewell::Goodbye(uri::SYSTEM_SHUTDOWN), |_| true);
        self.inner.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait()).await.is_err() {
            warn!("some sessions did not close within 5 s of shutdown");
        }
        self.inner.tasks.reopen();
    }

    /// Opens an in-process session with role `agent` (the cloud's own wamp-agent). It has the
    /// same API as a remote [`Session`] and lives until closed or the router shuts down.
    pub async fn local_session(&self, authid: &str) -> Result<Session, Error> {
        let (router_end, client_end) = crate::link::LocalLink::pair(self.inner.config.queue_capacity);
        let inner = self.inner.clone();
        let identity = session::Trusted { authid: authid.to_owned() };
        self.inner.tasks.spawn(session::serve_local(inner, router_end, identity));
        let mut config = crate::ClientConfig::new("local:", &self.inner.config.realm, crate::ClientAuth::Anonymous);
        config.max_concurrent_invocations = self.inner.config.agent_invocations;
        crate::client::join_local(client_end, &config).await
    }

    /// Binds board `board` to legacy session `session` after its `connection` call succeeded:
    /// from then on it may register `iotronic.<session>.<board>.*` and publish under
    /// `board.<board>.`. Only `legacy` sessions can be bound; others keep their authid.
    pub fn bind_board(&self, session: Id, board: &str) -> Result<(), Error> {
        match self.inner.realm.bind_board(session, board) {
            None => Err(Error::NoSuchSession(session)),
            Some(Role::Legacy) => Ok(()),
            Some(role) => Err(Error::Protocol(format!("session {session} has role {}, not legacy", role.name()))),
        }
    }

    /// Closes a session (GOODBYE `wamp.close.killed`). False if there is no such session.
    pub fn kill_session(&self, session: Id) -> bool {
        self.inner.realm.kill(session, Farewell::Goodbye(uri::CLOSE_KILLED))
    }

    /// Closes every session of `authid`; returns their ids.
    pub fn kill_authid(&self, authid: &str) -> Vec<Id> {
        self.inner.realm.kill_where(&Farewell::Goodbye(uri::CLOSE_KILLED), |s| s.authid == authid)
    }

    /// Closes every session of board `board` (authenticated or bound legacy), e.g. when the
    /// board is revoked; returns their ids.
    pub fn kill_board(&self, board: &str) -> Vec<Id> {
        self.inner.realm.kill_where(&Farewell::Goodbye(uri::CLOSE_KILLED), |s| s.board.as_deref() == Some(board))
    }

    /// Every joined session.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.inner.realm.sessions()
    }

    pub fn session(&self, id: Id) -> Option<SessionInfo> {
        self.inner.realm.session(id)
    }
}

#[cfg(test)]
mod tests {
    use super::host_of_header;

    #[test]
    fn host_headers_give_plain_hosts_only() {
        let cases = [
            ("10.0.0.1:8181", Some("10.0.0.1")),
            ("10.0.0.1", Some("10.0.0.1")),
            ("Cloud.Example.org:8181", Some("cloud.example.org")),
            ("[2001:db8::1]:8181", Some("[2001:db8::1]")),
            ("[2001:DB8::1]", Some("[2001:db8::1]")),
            ("cloud", Some("cloud")),
            ("", None),
            (":8181", None),
            ("a b:8181", None),
            ("evil.org/x:1", None),
            ("host:port", None),
            ("[::1]x", None),
            ("[nope]:1", None),
            ("-bad.org", None),
            ("a..b", None),
            ("user@host:1", None),
        ];
        for (header, want) in cases {
            assert_eq!(host_of_header(header).as_deref(), want, "{header:?}");
        }
        assert_eq!(host_of_header(&"a".repeat(254)), None);
    }
}
