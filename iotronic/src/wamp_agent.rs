//! The wamp-agent: embeds the WAMP router boards connect to, authenticates them from the
//! database, implements the cloud procedures of S4T-REFERENCE §5.2 (`stack4things.register`,
//! `<agent>.stack4things.{connection,wamp_alive,notify_result}`, with the original kwargs and
//! reply shapes, and our `tunnel_tokens`), tracks sessions (online/offline) and calls board
//! procedures for the conductor through its in-process session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use s4t_shared::limits::{KeyedSlot, KeyedSlots};
use s4t_wamp::{
    AuthFuture, Authenticator, CraCredential, Dict, Invocation, Payload, Role, Router, RouterConfig, Secret, Session,
    WampError,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Error;
use crate::agent::{BoardCaller, BoxFuture};
use crate::bus::{Bus, ConductorMsg};
use crate::db::Db;
use crate::wstun_agent::{TunnelMint, with_host};

/// Longest a board procedure may run before the agent reports an error.
pub const BOARD_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long after a board's login its procedures may still be missing. Lightning-rods (the
/// original and ours) register them only once `connection` answered (S4T-REFERENCE §5.3 step
/// 5), while the cloud already shows the board online: a call in that window waits for the
/// registration instead of failing.
pub const REGISTRATION_GRACE: Duration = Duration::from_secs(5);
/// The pause between two tries of a call that found no procedure during the grace.
const REGISTRATION_POLL: Duration = Duration::from_millis(100);

/// Which board each live board session logged in as (`connection` answered SUCCESS), and
/// when, by session id. Entries go when the session leaves.
#[derive(Clone, Default)]
struct Logins(Arc<Mutex<HashMap<String, (String, Instant)>>>);

impl Logins {
    fn insert(&self, session: &str, board: &str) {
        let login = (board.to_owned(), Instant::now());
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(session.to_owned(), login);
    }

    /// Has `session` logged in as `board`?
    fn logged_in_as(&self, session: &str, board: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(session).is_some_and(|(b, _)| b == board)
    }

    fn remove(&self, session: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(session);
    }

    /// Is `session` within [`REGISTRATION_GRACE`] of its login?
    fn registering(&self, session: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(session)
            .is_some_and(|(_, t)| t.elapsed() < REGISTRATION_GRACE)
    }
}

/// What the agent tells boards and how it admits them.
#[derive(Debug, Clone)]
pub struct AgentSetup {
    /// The agent's configured name: `<name>.stack4things.*` and `board.agent`.
    pub name: String,
    /// `ws[s]://host:port/` boards use to reach this agent.
    pub url: String,
    /// `ws[s]://host:port/` of the tunnel server, sent to enrolling boards.
    pub tunnel_url: Option<String>,
    /// Accept anonymous (original lightning-rod) sessions.
    pub legacy: bool,
    /// An enrolling board is given `url` and `tunnel_url` with the host it dialed (its Host
    /// header) instead of theirs ([`crate::ServeConfig::boards_dial_back`]).
    pub dial_back: bool,
}

/// Board credentials from the database: enrollment tickets are registration codes, boards
/// authenticate with WAMP-CRA against the stored salted derived key.
pub struct DbAuthenticator {
    db: Db,
    legacy: bool,
    /// Wrong enrollment codes, shared with `stack4things.register` (security issue).
    codes: Arc<crate::auth::Throttle>,
    /// Attempts refused by `codes` are audited this far (10, then one a minute): anyone can
    /// make them as fast as they can open sockets, and the audit table is append-only.
    throttled_audits: crate::auth::Throttle,
}

impl DbAuthenticator {
    pub fn new(db: Db, legacy: bool) -> Self {
        Self::with_throttle(db, legacy, Arc::new(crate::auth::enrollment_throttle()))
    }

    pub fn with_throttle(db: Db, legacy: bool, codes: Arc<crate::auth::Throttle>) -> Self {
        DbAuthenticator { db, legacy, codes, throttled_audits: crate::auth::Throttle::new(10, 1.0 / 60.0) }
    }
}

/// The throttle key of every enrollment code guess.
const ENROLL_KEY: &str = "enroll";

/// How long after its enrollment a board may repeat it (its reply was lost) with the code it
/// used and the secret it proposed.
pub const ENROLL_REPEAT_WINDOW_MS: i64 = 60 * 60 * 1000;
/// The shortest secret a board may propose at enrollment (ours sends 43 characters: 32
/// random bytes, URL-safe base64); a shorter one is ignored and a random one issued.
pub const MIN_PROPOSED_SECRET: usize = 32;

/// The board whose authenticated enrollment consumed `code` within the repeat window.
async fn enrolled_with(db: &Db, code: &str) -> Result<Option<crate::db::Board>, Error> {
    let since = crate::db::now_ms() - ENROLL_REPEAT_WINDOW_MS;
    db.board_by_enroll_code(&crate::auth::token_hash(code), since).await
}

/// True when `secret` derives, with the board's stored salt and parameters, the derived key
/// stored for it (compared in constant time).
fn secret_matches(board: &crate::db::Board, secret: &str) -> bool {
    let Some(cred) =
        decode_credential(board.secret_salt.as_deref().unwrap_or(""), board.secret_key.as_deref().unwrap_or(""))
    else {
        return false;
    };
    if !s4t_shared::wamp::auth::derivation_bounded(cred.iterations.into(), cred.keylen.into()) {
        return false;
    }
    let derived = s4t_shared::wamp::auth::derive_key(&Secret::new(secret), &cred.salt, cred.iterations, cred.keylen);
    derived.ct_eq(cred.derived_key.expose())
}

/// How a derived key is stored: `salt` column = `<salt>$<iterations>$<keylen>`.
pub fn encode_salt(c: &CraCredential) -> String {
    format!("{}${}${}", c.salt, c.iterations, c.keylen)
}

pub fn decode_credential(salt: &str, key: &str) -> Option<CraCredential> {
    let mut parts = salt.split('$');
    let (s, i, k) = (parts.next()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(CraCredential { salt: s.to_owned(), iterations: i, keylen: k, derived_key: Secret::new(key) })
}

impl Authenticator for DbAuthenticator {
    fn ticket<'a>(&'a self, _realm: &'a str, authid: &'a str, ticket: &'a Secret) -> AuthFuture<'a, Option<Role>> {
        Box::pin(async move {
            if authid != "enroll" {
                return Ok(None);
            }
            if self.codes.take(ENROLL_KEY).is_err() {
                // Somebody is guessing: not even a right code is looked at until it calms down.
                if self.throttled_audits.take(ENROLL_KEY).is_ok() {
                    crate::audit::record(&self.db, crate::audit::system("board.enroll.throttled", "", "wamp")).await;
                }
                return Ok(None);
            }
            let found = match self.db.board_by_code(ticket.expose()).await {
                Ok(None) => enrolled_with(&self.db, ticket.expose()).await,
                other => other,
            };
            // A consumed code is admitted again within the repeat window: `register` answers
            // only the board that proves the secret it proposed then.
            match found {
                Ok(Some(_)) => {
                    self.codes.refund(ENROLL_KEY);
                    Ok(Some(Role::Enrollment))
                }
                Ok(None) => {
                    crate::audit::record(&self.db, crate::audit::system("board.enroll.refused", "", "wamp")).await;
                    Ok(None)
                }
                Err(e) => Err(s4t_wamp::Error::Protocol(format!("credential lookup failed: {e}"))),
            }
        })
    }

    fn wampcra<'a>(&'a self, _realm: &'a str, authid: &'a str) -> AuthFuture<'a, Option<(Role, CraCredential)>> {
        Box::pin(async move {
            let board = self
                .db
                .board_by_uuid(authid)
                .await
                .map_err(|e| s4t_wamp::Error::Protocol(format!("credential lookup failed: {e}")))?;
            let cred = board.and_then(|b| decode_credential(b.secret_salt.as_deref()?, b.secret_key.as_deref()?));
            Ok(cred.map(|c| (Role::Board, c)))
        })
    }

    fn anonymous(&self, _realm: &str) -> bool {
        self.legacy
    }
}

/// Board calls through the agent's in-process router session.
pub struct WampCaller {
    session: Session,
    logins: Logins,
}

impl BoardCaller for WampCaller {
    fn call<'a>(&'a self, procedure: &'a str, args: Vec<Value>) -> BoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            // iotronic.<session>.<board>.<Name>
            let mut parts = procedure.splitn(4, '.');
            let (session, name) = (parts.nth(1).unwrap_or(""), parts.nth(1).unwrap_or(procedure));
            loop {
                match self.session.call(procedure, args.clone(), Dict::new(), BOARD_CALL_TIMEOUT).await {
                    Ok(p) => return Ok(p.args.into_iter().next().unwrap_or(Value::Null)),
                    Err(s4t_wamp::Error::Wamp(e)) if e.error == s4t_shared::wamp::message::uri::NO_SUCH_PROCEDURE => {
                        if self.logins.registering(session) {
                            tokio::time::sleep(REGISTRATION_POLL).await;
                            continue;
                        }
                        return Err(Error::Unavailable(format!(
                            "the board does not offer {name}: its lightning-rod registered no such procedure"
                        )));
                    }
                    Err(s4t_wamp::Error::Wamp(e))
                        if e.error == s4t_shared::wamp::message::uri::PAYLOAD_SIZE_EXCEEDED =>
                    {
                        return Err(Error::Invalid(format!("{name}: the arguments are too large for a board ({e})")));
                    }
                    Err(e) => return Err(Error::Unavailable(format!("board call {procedure} failed: {e}"))),
                }
            }
        })
    }
}

/// A running agent: the router, its own session and the procedure context.
pub struct WampAgent {
    pub router: Router,
    pub session: Session,
    logins: Logins,
    /// Why the agent can no longer serve (its router stopped, its session ended) before the
    /// shutdown: the first reason is taken by [`WampAgent::failed`].
    failures: tokio::sync::mpsc::Receiver<String>,
}

/// The reply of the original's cloud procedures: a JSON string of exactly message + result.
fn wamp_message(result: &str, message: Value) -> Result<Payload, WampError> {
    Ok(Payload::new(vec![Value::String(json!({"message": message, "result": result}).to_string())], Dict::new()))
}

/// The error URI of a call the cloud cannot answer now (its database failed, too many
/// attempts): a WAMP error, not an `ERROR` reply, because both lightning-rods take an `ERROR`
/// from `register` or `connection` as final (ours exits for good, the original exits) and
/// retry a failed call (ours with backoff, the original re-executes itself).
pub const UNAVAILABLE: &str = "iotronic.error.unavailable";

/// Refuses a board's call for now; the cause is logged here, the board only hears `what`
/// failed (database details are not the board's business).
fn unavailable(what: &str, cause: Option<&Error>) -> Result<Payload, WampError> {
    warn!(cause = ?cause, "{what}: answered {UNAVAILABLE}");
    Err(WampError::new(UNAVAILABLE, format!("{what}: try again later")))
}

fn kwarg<'a>(inv: &'a Invocation, name: &str) -> Option<&'a Value> {
    inv.kwargs.get(name).or_else(|| match name {
        "code" | "uuid" | "board_uuid" => inv.args.first(),
        "session" | "board_name" | "wampmessage" => inv.args.get(1),
        "info" => inv.args.get(2),
        _ => None,
    })
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[derive(Clone)]
struct Ctx {
    db: Db,
    bus: Bus,
    router: Router,
    setup: AgentSetup,
    logins: Logins,
    codes: Arc<crate::auth::Throttle>,
    /// Mints the tokens `tunnel_tokens` renews (none without a tunnel server).
    mint: Option<TunnelMint>,
    /// Procedure calls running ([`register_procedures`]).
    running: Running,
}

/// The procedure calls running: in all, per calling session, per board (its sessions
/// together) and per role of the callers without an identity of their own (legacy boards,
/// enrollments); beyond any bound a call is answered [`UNAVAILABLE`]. A call counts until its
/// handler ends, whether its caller waits for it or not: the router forgets a cancelled or
/// timed-out call at once (it no longer counts against the caller's in-flight limit), so a
/// session cancelling its calls in a loop while their handlers waited on the database took
/// every slot, and every other board was refused. Per board, because a board may reconnect
/// (a new session, a new share) while its old handlers run; per role, because anonymous
/// sessions cost nothing to open (128 per address): they must not take what boards need.
#[derive(Clone)]
struct Running {
    all: Arc<tokio::sync::Semaphore>,
    sessions: Arc<KeyedSlots<s4t_wamp::Id>>,
    boards: Arc<KeyedSlots<String>>,
    roles: Arc<KeyedSlots<&'static str>>,
}

/// One running call's share of [`Running`], given back when dropped (with its handler).
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _session: KeyedSlot<s4t_wamp::Id>,
    _board: Option<KeyedSlot<String>>,
    _role: Option<KeyedSlot<&'static str>>,
}

impl Running {
    /// `all` in all, `per_session` per session (the router's in-flight limit), twice that per
    /// board, a quarter of `all` per role without identity.
    fn new(all: usize, per_session: usize) -> Self {
        Running {
            all: Arc::new(tokio::sync::Semaphore::new(all)),
            sessions: KeyedSlots::new(per_session),
            boards: KeyedSlots::new(2 * per_session),
            roles: KeyedSlots::new((all / 4).max(1)),
        }
    }

    /// A slot for a call of session `caller` (0: undisclosed) with the router's `role` and
    /// `authid` for it, or why there is none.
    fn take(
        &self,
        caller: Option<s4t_wamp::Id>,
        role: Option<&str>,
        authid: Option<&str>,
    ) -> Result<Slot, &'static str> {
        let session = self.sessions.take(caller.unwrap_or(0)).ok_or("too many calls of this session at once")?;
        let board = match (role, authid) {
            (Some("board"), Some(board)) => {
                Some(self.boards.take(board.to_owned()).ok_or("too many calls of this board at once")?)
            }
            _ => None,
        };
        let role = match role {
            Some("legacy") => Some(self.roles.take("legacy").ok_or("too many calls of anonymous boards at once")?),
            Some("enrollment") => Some(self.roles.take("enrollment").ok_or("too many enrollments at once")?),
            _ => None,
        };
        let permit = self.all.clone().try_acquire_owned().map_err(|_| "the cloud is busy")?;
        Ok(Slot { _permit: permit, _session: session, _board: board, _role: role })
    }
}

impl WampAgent {
    /// Starts the router on `listener` (wss with `tls`), opens the agent's session and registers
    /// the cloud procedures. The router stops with `shutdown`.
    pub async fn start(
        db: Db,
        bus: Bus,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        setup: AgentSetup,
        shutdown: CancellationToken,
    ) -> Result<WampAgent, Error> {
        let codes = Arc::new(crate::auth::enrollment_throttle());
        let auth = Arc::new(DbAuthenticator::with_throttle(db.clone(), setup.legacy, codes.clone()));
        // Decoy WAMP-CRA salts stay the same across restarts, as real boards' do.
        let decoy = db.setting_or_init("cra_decoy_key", crate::auth::random_secret).await?;
        let config = RouterConfig { decoy_key: Some(Secret::new(decoy)), ..RouterConfig::default() };
        let running = Running::new(config.agent_invocations, config.limits.max_in_flight_calls);
        let router = Router::new(config, auth);
        crate::revocation::spawn_wamp_guard(db.clone(), router.clone(), shutdown.clone());
        let stop = shutdown.clone();
        let r = router.clone();
        let (failed, failures) = tokio::sync::mpsc::channel(2);
        let router_failed = failed.clone();
        tokio::spawn(async move {
            let reason = match r.serve(listener, tls, shutdown.clone()).await {
                Ok(()) => "the WAMP router stopped".to_owned(),
                Err(e) => format!("the WAMP router stopped: {e}"),
            };
            if !shutdown.is_cancelled() {
                let _ = router_failed.try_send(reason);
            }
        });
        let session = router.local_session(&setup.name).await.map_err(wamp_err)?;
        tokio::spawn({
            let (session, stop) = (session.clone(), stop.clone());
            async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    reason = session.closed() => {
                        let _ = failed.try_send(format!("the agent's own WAMP session ended: {reason:?}"));
                    }
                }
            }
        });
        let logins = Logins::default();
        let mint = match &setup.tunnel_url {
            Some(url) => Some(TunnelMint::load(&db, url.clone()).await?.dialing_back(setup.dial_back)),
            None => None,
        };
        let ctx = Ctx {
            db: db.clone(),
            bus,
            router: router.clone(),
            setup: setup.clone(),
            logins: logins.clone(),
            codes,
            mint,
            running,
        };
        register_procedures(&session, &ctx).await?;
        track_sessions(&session, &ctx).await?;
        let live = |s: &str| s.parse().is_ok_and(|id| router.session(id).is_some());
        let n = db.reconcile_sessions(&setup.name, live).await?;
        info!(agent = %setup.name, url = %setup.url, offline = n, "wamp-agent ready");
        spawn_reconciler(db, setup.name.clone(), router.clone(), logins.clone(), RECONCILE_SESSIONS_EVERY, stop);
        Ok(WampAgent { router, session, logins, failures })
    }

    /// Resolves, with the reason, once the agent can no longer serve although no shutdown was
    /// asked for: without its router or its own session no board can log in and no call can
    /// reach a board, so the process must stop (and its supervisor restart it) rather than
    /// run on answering REST requests it cannot carry out.
    pub async fn failed(&mut self) -> String {
        match self.failures.recv().await {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    pub fn caller(&self) -> Arc<dyn BoardCaller> {
        Arc::new(WampCaller { session: self.session.clone(), logins: self.logins.clone() })
    }
}

fn wamp_err(e: s4t_wamp::Error) -> Error {
    Error::Unavailable(format!("WAMP: {e}"))
}

async fn register_procedures(session: &Session, ctx: &Ctx) -> Result<(), Error> {
    /// Registers `uri` to run `handler(&ctx, &invocation)` to its end in a task of its own.
    /// The caller can give up on a call at any moment (CANCEL, a `timeout` option, leaving),
    /// and the router then interrupts it, which drops the handler's future where it waits: a
    /// board enrolled without its audit entry, say. Interrupted calls no longer count against
    /// the router's limits (the agent's invocations, the caller's calls in flight), so the
    /// running ones have their own ([`Running`]), held by the task until the handler ends.
    macro_rules! procedure {
        ($uri:expr, $handler:ident) => {{
            let c = ctx.clone();
            session
                .register(&$uri, move |inv| {
                    let c = c.clone();
                    async move {
                        let slot = match c.running.take(inv.caller(), inv.caller_authrole(), inv.caller_authid()) {
                            Ok(slot) => slot,
                            Err(why) => return unavailable(why, None),
                        };
                        let run = tokio::spawn(async move {
                            let _slot = slot;
                            $handler(&c, &inv).await
                        });
                        run.await.unwrap_or_else(|e| Err(WampError::new(UNAVAILABLE, format!("the call failed: {e}"))))
                    }
                })
                .await
                .map_err(wamp_err)?;
        }};
    }
    let prefix = format!("{}.stack4things", ctx.setup.name);
    procedure!("stack4things.register", register);
    procedure!(format!("{prefix}.connection"), connection);
    procedure!(format!("{prefix}.wamp_alive"), wamp_alive);
    procedure!(format!("{prefix}.notify_result"), notify_result);
    procedure!(format!("{prefix}.tunnel_tokens"), tunnel_tokens);
    Ok(())
}

/// `<agent>.stack4things.wamp_alive(board_uuid, board_name)`: the caller's own board was seen.
async fn wamp_alive(c: &Ctx, inv: &Invocation) -> Result<Payload, WampError> {
    if let Some(b) = text(kwarg(inv, "board_uuid"))
        && speaks_for(c, inv, &b)
    {
        let _ = c.db.touch_board(&b).await;
    }
    let now = crate::db::now_ms();
    Ok(Payload::new(vec![json!(format!("Iotronic alive @ {}", iso(now)))], Dict::new()))
}

/// `<agent>.stack4things.tunnel_tokens(board_uuid)` (ours; the original has no tokens): fresh
/// tunnel tokens for every exposed service and VPN membership of the calling board. Tokens
/// expire ([`crate::wstun_agent::TOKEN_TTL_S`]); a board that only kept the ones it was given
/// when a service was exposed or a VPN joined would be refused at its first reconnect after
/// that, so our lightning-rod asks for new ones at every login and daily.
async fn tunnel_tokens(c: &Ctx, inv: &Invocation) -> Result<Payload, WampError> {
    let board = text(kwarg(inv, "board_uuid")).unwrap_or_default();
    if inv.caller_authrole() != Some("board") || !speaks_for(c, inv, &board) {
        return wamp_message("ERROR", json!("a board may only renew its own tunnel tokens"));
    }
    let Some(mint) = &c.mint else {
        return wamp_message("ERROR", json!("this agent has no tunnel server"));
    };
    // A session admitted with a credential withdrawn since (the board revoked, or rotated
    // after the session's credential was read) gets none: the revocation sweep closes it
    // within a second, and tokens minted meanwhile would outlive it (and, carrying an issue
    // time after the rotation, pass the tunnel server's check).
    let admitted = inv.caller().and_then(|id| c.router.session(id)).map(|s| s.joined);
    let tokens_after = match c.db.connection_cutoffs(std::slice::from_ref(&board)).await {
        Ok(cutoffs) if admitted.is_some_and(|t| crate::revocation::may_stay(cutoffs.get(&board), t)) => {
            match cutoffs.get(&board) {
                Some(crate::db::Cutoff::Since(after)) => Some(*after),
                _ => None,
            }
        }
        Ok(_) => {
            return wamp_message("ERROR", json!("the board's credentials were revoked or rotated after this login"));
        }
        Err(e) => return unavailable("cannot renew the tunnel tokens", Some(&e)),
    };
    let renewed = async {
        let mut services = Vec::new();
        for e in c.db.exposures_of_board(&board).await? {
            let port =
                u16::try_from(e.public_port).map_err(|_| Error::Invalid(format!("bad port {}", e.public_port)))?;
            services.push(
                json!({"uuid": e.service, "public_port": port, "token": mint.mint(&board, port, None, tokens_after)?}),
            );
        }
        let mut vpns = Vec::new();
        for m in c.db.vpn_memberships_of_board(&board).await? {
            vpns.push(json!({"vpn": m.vpn, "token": mint.mint(&board, 0, Some(&m.vpn), tokens_after)?}));
        }
        let url = match c.db.board_by_uuid(&board).await? {
            Some(b) => mint.url_for(&b),
            None => mint.url.clone(),
        };
        Ok::<_, Error>(json!({"tunnel_url": url, "services": services, "vpns": vpns}))
    };
    match renewed.await {
        Ok(tokens) => {
            info!(board = %board, "tunnel tokens renewed");
            wamp_message("SUCCESS", tokens)
        }
        Err(e) => wamp_message("ERROR", json!(format!("cannot renew the tunnel tokens: {e}"))),
    }
}

fn iso(ms: i64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `stack4things.register(code, session[, secret])`: the board's config document (§5.3); for
/// an authenticated enrollment also its secret (the one the board proposed with `secret`, at
/// least [`MIN_PROPOSED_SECRET`] characters, else a fresh random one; stored as a salted
/// derived key) and the tunnel URL, and the code is consumed. Within
/// [`ENROLL_REPEAT_WINDOW_MS`] the board that consumed a code may call again with it and the
/// secret it proposed (its reply was lost): it gets the same document, nothing changes.
async fn register(c: &Ctx, inv: &Invocation) -> Result<Payload, WampError> {
    let Some(code) = text(kwarg(inv, "code")) else {
        return wamp_message("ERROR", json!("register needs the code"));
    };
    if c.codes.take(ENROLL_KEY).is_err() {
        return unavailable("too many wrong registration codes", None);
    }
    let authenticated = inv.caller_authrole() == Some("enrollment");
    let proposed = kwarg(inv, "secret")
        .and_then(Value::as_str)
        .filter(|s| authenticated && s.chars().count() >= MIN_PROPOSED_SECRET)
        .map(str::to_owned);
    let source = inv.caller().map(|s| format!("wamp session {s}")).unwrap_or_default();
    let board = match c.db.board_by_code(&code).await {
        Ok(Some(b)) => {
            c.codes.refund(ENROLL_KEY);
            b
        }
        Ok(None) => return not_enrollable(c, &code, proposed.as_deref(), &source, false).await,
        Err(e) => return unavailable("registration failed", Some(&e)),
    };
    // The host this board dialed, when boards dial back (the cloud has no one host to give).
    let dialed = match c.setup.dial_back {
        true => inv.caller().and_then(|id| c.router.session(id)).and_then(|s| s.transport.host),
        false => None,
    };
    let url = dialed.as_deref().map_or_else(|| c.setup.url.clone(), |h| with_host(&c.setup.url, h));
    let mut config = json!({"iotronic": {
        "extra": {},
        "board": {
            "uuid": board.uuid, "code": board.code, "name": board.name, "status": "registered",
            "type": board.board_type, "mobile": board.mobile, "extra": board.extra, "agent": c.setup.name,
            "owner": board.owner, "project": board.project, "fleet": board.fleet, "lr_version": board.lr_version,
            "connectivity": board.connectivity,
            "created_at": iso(board.created_at), "updated_at": iso(board.updated_at),
            "location": {"latitude": board.latitude, "longitude": board.longitude, "altitude": board.altitude,
                         "updated_at": iso(board.updated_at)},
        },
        "wamp": {
            "registration-agent": {"url": url, "realm": "s4t"},
            "main-agent": {"url": url, "realm": "s4t"},
        },
    }});
    let stored = config.clone();
    let mut secret_row = None;
    if authenticated {
        let secret = proposed.clone().unwrap_or_else(crate::auth::random_secret);
        let cred = CraCredential::derive(&Secret::new(secret.clone()));
        secret_row = Some((encode_salt(&cred), cred.derived_key.expose().to_owned()));
        with_credentials(c, &mut config, &board.uuid, &secret, dialed.as_deref());
    }
    let secret_ref = secret_row.as_ref().map(|(s, k)| (s.as_str(), k.as_str()));
    // Written only if the code is still the board's: a revoke, a rotate-secret or another
    // enrollment since the lookup makes this one as if the code were used.
    match c.db.enroll_board(&board.uuid, &code, &c.setup.name, &stored, secret_ref, authenticated).await {
        Ok(true) => {}
        Ok(false) => return not_enrollable(c, &code, proposed.as_deref(), &source, true).await,
        Err(e) => return unavailable("registration failed", Some(&e)),
    }
    info!(board = %board.uuid, authenticated, "board enrolled");
    let mut entry = crate::audit::system("board.enroll", &board.uuid, &source);
    entry.project_uuid = board.project.clone();
    entry.detail = match (authenticated, proposed.is_some()) {
        (false, _) => "legacy (no secret)".into(),
        (true, false) => "secret issued".into(),
        (true, true) => "secret proposed by the board".into(),
    };
    crate::audit::record(&c.db, entry).await;
    wamp_message("SUCCESS", config)
}

/// The answer to a code that enrolls no board (unknown, expired, used, or revoked or rotated
/// away): the repeat of the enrollment that consumed it, for the board that proves the secret
/// it proposed then, else a refusal. `refunded`: the attempt was already found right (the code
/// was the board's when looked up), so a repeat does not refund it twice.
async fn not_enrollable(
    c: &Ctx,
    code: &str,
    proposed: Option<&str>,
    source: &str,
    refunded: bool,
) -> Result<Payload, WampError> {
    if let Some(secret) = proposed {
        match enrolled_with(&c.db, code).await {
            Ok(Some(b)) if b.config["iotronic"].is_object() && secret_matches(&b, secret) => {
                if !refunded {
                    c.codes.refund(ENROLL_KEY);
                }
                return repeated_enrollment(c, &b, secret, source).await;
            }
            Ok(_) => {}
            Err(e) => return unavailable("registration failed", Some(&e)),
        }
    }
    crate::audit::record(&c.db, crate::audit::system("board.enroll.refused", "", source)).await;
    wamp_message("ERROR", json!("unknown, expired or already used registration code"))
}

/// Adds the credentials and the tunnel URL to a config document for an authenticated board.
/// `dialed`: the host the board dialed, for the tunnel URL when boards dial back.
fn with_credentials(c: &Ctx, config: &mut Value, uuid: &str, secret: &str, dialed: Option<&str>) {
    config["iotronic"]["credentials"] = json!({"authid": uuid, "secret": secret});
    if let Some(t) = &c.setup.tunnel_url {
        let t = dialed.map_or_else(|| t.clone(), |h| with_host(t, h));
        config["iotronic"]["tunnel"] = json!({"url": t});
    }
}

/// The answer to a repeated enrollment: the document stored the first time with the secret
/// the board proved; only the audit log changes.
async fn repeated_enrollment(
    c: &Ctx,
    board: &crate::db::Board,
    secret: &str,
    source: &str,
) -> Result<Payload, WampError> {
    let mut config = board.config.clone();
    // The host of the stored document's URLs: the one the board dialed the first time.
    let dialed = board.dialed_host().filter(|_| c.setup.dial_back);
    with_credentials(c, &mut config, &board.uuid, secret, dialed.as_deref());
    info!(board = %board.uuid, "board repeated its enrollment");
    let mut entry = crate::audit::system("board.enroll.repeated", &board.uuid, source);
    entry.project_uuid = board.project.clone();
    crate::audit::record(&c.db, entry).await;
    wamp_message("SUCCESS", config)
}

/// `<agent>.stack4things.connection(uuid, session, info)`: the board is online on this agent.
async fn connection(c: &Ctx, inv: &Invocation) -> Result<Payload, WampError> {
    let (Some(uuid), Some(session)) = (text(kwarg(inv, "uuid")), text(kwarg(inv, "session"))) else {
        return wamp_message("ERROR", json!("connection needs uuid and session"));
    };
    let caller = inv.caller().map(|s| s.to_string());
    if caller.as_deref().is_some_and(|s| s != session) {
        return wamp_message("ERROR", json!("session does not match the calling session"));
    }
    // Logged in already (its answer was lost, or the caller repeats it): nothing to write or
    // tell the conductor again. A session is only recorded as the board it proved (`board`)
    // or was bound to (`legacy`).
    if caller.is_some() && c.logins.logged_in_as(&session, &uuid) {
        return wamp_message("SUCCESS", json!(""));
    }
    match inv.caller_authrole() {
        Some("board") if inv.caller_authid() != Some(uuid.as_str()) => {
            return wamp_message("ERROR", json!("a board may only log in as itself"));
        }
        Some("legacy") => {
            // Legacy mode admits the original lightning-rod, which has no credential; a board
            // enrolled with one must use it, or anyone could take its place anonymously.
            match c.db.board_by_uuid(&uuid).await {
                Ok(Some(b)) if b.secret_salt.is_some() => {
                    warn!(board = %uuid, session = %session, "anonymous login refused for a board with a credential");
                    return wamp_message("ERROR", json!("this board authenticates: anonymous login refused"));
                }
                Ok(_) => {}
                Err(e) => return unavailable("login failed", Some(&e)),
            }
        }
        _ => {}
    }
    let info = kwarg(inv, "info").cloned().unwrap_or(Value::Null);
    let (lr_version, connectivity) = login_info(&uuid, &info);
    match c.db.board_online(&uuid, &c.setup.name, &session, lr_version, &connectivity).await {
        Ok(true) => {}
        Ok(false) => return wamp_message("ERROR", json!(format!("unknown board {uuid}"))),
        Err(e) => return unavailable("login failed", Some(&e)),
    }
    // A legacy session may register the board's procedures only once the board is known
    // and not revoked (bound before, a refused login left it bound to whatever it named).
    if inv.caller_authrole() == Some("legacy")
        && let Ok(id) = session.parse::<u64>()
        && let Err(e) = c.router.bind_board(id, &uuid)
    {
        return wamp_message("ERROR", json!(format!("cannot bind the session: {e}")));
    }
    c.logins.insert(&session, &uuid);
    info!(board = %uuid, session = %session, "board online");
    if let Err(e) = c.bus.to_conductor(&ConductorMsg::BoardOnline { board: uuid.clone() }).await {
        warn!(cause = %e, "cannot tell the conductor a board is online");
    }
    wamp_message("SUCCESS", json!(""))
}

/// The longest `info.lr_version` a login stores (ours sends about 20 bytes).
pub const MAX_LR_VERSION_BYTES: usize = 64;

/// The `lr_version` and `connectivity` of a login's `info`, as stored with the board and parsed
/// at every read of it (lists, handshakes). One beyond its bound (`lr_version`
/// [`MAX_LR_VERSION_BYTES`], `connectivity` [`crate::api::bounds::SMALL`] as other free-form
/// JSON) is dropped with a warning rather than refused: both lightning-rods take an `ERROR`
/// answer as final, and what they send is a few short fields.
fn login_info<'a>(uuid: &str, info: &'a Value) -> (Option<&'a str>, Value) {
    let lr_version = info.get("lr_version").and_then(Value::as_str).filter(|v| {
        let fits = v.len() <= MAX_LR_VERSION_BYTES;
        if !fits {
            let max = MAX_LR_VERSION_BYTES;
            warn!(board = %uuid, bytes = v.len(), "login info.lr_version dropped: more than {max} bytes");
        }
        fits
    });
    let connectivity = match info.get("connectivity") {
        Some(v) => match crate::api::bounds::check(v, crate::api::bounds::SMALL) {
            Ok(()) => v.clone(),
            Err(why) => {
                warn!(board = %uuid, "login info.connectivity dropped: it {why}");
                json!({})
            }
        },
        None => json!({}),
    };
    (lr_version, connectivity)
}

/// May the caller of `inv` speak for `board`? A board session (its authid) and a legacy session
/// (the uuid bound at its `connection`) only for their own board; the cloud's own sessions for
/// any. Identity comes from the router, never from the payload.
fn speaks_for(c: &Ctx, inv: &Invocation, board: &str) -> bool {
    match inv.caller_authrole() {
        Some("board") => inv.caller_authid() == Some(board),
        Some("legacy") => {
            inv.caller().and_then(|id| c.router.session(id)).and_then(|s| s.board).is_some_and(|b| b == board)
        }
        Some("agent") => true,
        _ => false,
    }
}

/// `<agent>.stack4things.notify_result(board_uuid, wampmessage)`: a RUNNING call finished.
/// Only the board a request went to may report its result.
async fn notify_result(c: &Ctx, inv: &Invocation) -> Result<Payload, WampError> {
    let board = text(kwarg(inv, "board_uuid")).unwrap_or_default();
    if !speaks_for(c, inv, &board) {
        return wamp_message("ERROR", json!("a board may only notify its own results"));
    }
    let msg = match kwarg(inv, "wampmessage") {
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).unwrap_or(Value::Null),
        Some(v) => v.clone(),
        None => Value::Null,
    };
    let (Some(req), Some(result)) =
        (msg.get("req_id").and_then(Value::as_str), msg.get("result").and_then(Value::as_str))
    else {
        return wamp_message("ERROR", json!("wampmessage needs req_id and result"));
    };
    if !crate::conductor::BOARD_RESULTS.contains(&result) {
        let why = format!("result is one of {:?}, not {result:?}", crate::conductor::BOARD_RESULTS);
        return wamp_message("ERROR", json!(why));
    }
    match c.db.request(req, None).await {
        Ok(Some(r)) if r.destination == board => {}
        Ok(_) => return wamp_message("ERROR", json!(format!("no request {req} for board {board}"))),
        // An error the board retries (it keeps the result and sends it again); an ERROR
        // answer is final for it, and the result was lost until the sweep failed the
        // request two hours later.
        Err(e) => return unavailable("cannot record the result", Some(&e)),
    }
    let message = msg.get("message").cloned().unwrap_or(Value::Null);
    let m = ConductorMsg::Result { request: req.to_owned(), board, result: result.to_owned(), message };
    if let Err(e) = c.bus.to_conductor(&m).await {
        return unavailable("cannot record the result", Some(&e));
    }
    wamp_message("SUCCESS", json!("notification_received"))
}

/// Session leave → board offline.
/// How often the agent checks the boards it has online against the router's live sessions.
pub const RECONCILE_SESSIONS_EVERY: Duration = Duration::from_secs(30);

/// Every `every`, marks offline the boards this agent has online under a session the router
/// no longer has, and forgets such sessions' logins. `wamp.session.on_leave` normally does
/// it at once; this catches a leave event lost (the subscription's queue was full during a
/// burst of disconnects), which would otherwise leave a board "online" until the next start.
fn spawn_reconciler(db: Db, agent: String, router: Router, logins: Logins, every: Duration, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let live = |s: &str| s.parse().is_ok_and(|id| router.session(id).is_some());
            match db.reconcile_sessions(&agent, live).await {
                Ok(0) => {}
                Ok(n) => warn!(boards = n, "boards marked offline whose session had ended unnoticed"),
                Err(e) => warn!(cause = %e, "cannot reconcile board sessions"),
            }
            logins.0.lock().unwrap_or_else(|e| e.into_inner()).retain(|s, _| live(s));
        }
    });
}

async fn track_sessions(session: &Session, ctx: &Ctx) -> Result<(), Error> {
    let mut leaves = session.subscribe("wamp.session.on_leave", 1024).await.map_err(wamp_err)?;
    let (db, logins) = (ctx.db.clone(), ctx.logins.clone());
    tokio::spawn(async move {
        while let Some(ev) = leaves.recv().await {
            let Some(id) = text(ev.args.first()) else { continue };
            logins.remove(&id);
            match db.session_left(&id).await {
                Ok(Some(b)) => info!(board = %b.uuid, session = %id, "board offline"),
                Ok(None) => {}
                Err(e) => warn!(cause = %e, "cannot record a session leave"),
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A board the database has online under a session the router does not know (its
    /// `on_leave` event was lost) is marked offline by the periodic check.
    #[tokio::test]
    async fn boards_whose_session_ended_unnoticed_go_offline() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&crate::db::DatabaseUrl::sqlite_in(dir.path())).await.unwrap();
        let p = db.create_project("p").await.unwrap();
        let board = crate::db::NewBoard {
            name: "b".into(),
            code: "code-b".into(),
            project: p.uuid.clone(),
            location: Some(("38.1".into(), "15.5".into(), "10".into())),
            ..Default::default()
        };
        let b = db.insert_board(board).await.unwrap();
        assert!(db.enroll_board(&b.uuid, "code-b", "agent-1", &json!({}), None, false).await.unwrap());
        assert!(db.board_online(&b.uuid, "agent-1", "4242", None, &json!({})).await.unwrap());
        let router = Router::new(RouterConfig::default(), Arc::new(s4t_wamp::StaticAuthenticator::new()));
        let logins = Logins::default();
        logins.insert("4242", &b.uuid);
        let stop = CancellationToken::new();
        spawn_reconciler(db.clone(), "agent-1".into(), router, logins.clone(), Duration::from_millis(20), stop.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        while db.board_by_uuid(&b.uuid).await.unwrap().unwrap().status == "online" {
            assert!(Instant::now() < deadline, "the board stayed online");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!logins.registering("4242"), "the dead session's login is forgotten");
        stop.cancel();
    }

    /// Without its own session the agent cannot reach any board: it says so, and
    /// `serve_wamp` (so the process) stops instead of running on.
    #[tokio::test]
    async fn an_agent_whose_session_ends_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&crate::db::DatabaseUrl::sqlite_in(dir.path())).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let setup = AgentSetup {
            name: "agent-1".into(),
            url: "ws://127.0.0.1/".into(),
            tunnel_url: None,
            legacy: false,
            dial_back: false,
        };
        let shutdown = CancellationToken::new();
        let mut agent = WampAgent::start(db, Bus::in_process(), listener, None, setup, shutdown.clone()).await.unwrap();
        assert!(agent.router.kill_session(agent.session.id()));
        let reason = tokio::time::timeout(Duration::from_secs(20), agent.failed()).await.expect("no failure reported");
        assert!(reason.contains("the agent's own WAMP session ended"), "{reason}");
        shutdown.cancel();
    }

    /// An agent on a fresh SQLite database holding project "p" and its boards (name, code).
    struct TestAgent {
        _dir: tempfile::TempDir,
        db: Db,
        /// The boards' uuids, in the order given.
        boards: Vec<String>,
        url: String,
        shutdown: CancellationToken,
        agent: WampAgent,
    }

    async fn test_agent(boards: &[(&str, &str)], tunnel_url: Option<&str>, legacy: bool) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&crate::db::DatabaseUrl::sqlite_in(dir.path())).await.unwrap();
        let p = db.create_project("p").await.unwrap();
        let mut uuids = Vec::new();
        for (name, code) in boards {
            let nb = crate::db::NewBoard {
                name: (*name).into(),
                code: (*code).into(),
                project: p.uuid.clone(),
                location: Some(("38.1".into(), "15.5".into(), "10".into())),
                ..Default::default()
            };
            uuids.push(db.insert_board(nb).await.unwrap().uuid);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let setup = AgentSetup {
            name: "agent-1".into(),
            url: url.clone(),
            tunnel_url: tunnel_url.map(str::to_owned),
            legacy,
            dial_back: false,
        };
        let shutdown = CancellationToken::new();
        let agent =
            WampAgent::start(db.clone(), Bus::in_process(), listener, None, setup, shutdown.clone()).await.unwrap();
        TestAgent { _dir: dir, db, boards: uuids, url, shutdown, agent }
    }

    /// A board's `register`, `connection` or `notify_result` that the cloud cannot answer now
    /// (its database fails) gets a WAMP error, which both lightning-rods retry; an `ERROR`
    /// reply, which they take as final, is kept for what is final (an unknown board). A result
    /// answered `ERROR` was lost until the sweep failed its request two hours later.
    #[tokio::test]
    async fn calls_the_cloud_cannot_answer_now_are_errors_boards_retry() {
        let TestAgent { _dir, db, boards, url, shutdown, agent } = test_agent(&[("b1", "c1")], None, true).await;
        let board =
            s4t_wamp::client::connect(&s4t_wamp::ClientConfig::new(&url, "s4t", s4t_wamp::ClientAuth::Anonymous))
                .await
                .unwrap();
        let call = |procedure: &'static str, kw: Value| {
            let kw: Dict = kw.as_object().unwrap().clone().into_iter().collect();
            board.call(procedure, vec![], kw, Duration::from_secs(10))
        };
        let login = || json!({"uuid": "0b5c7a5e-0000-4000-8000-000000000001", "session": board.id(), "info": {}});
        let reply = call("agent-1.stack4things.connection", login()).await.unwrap();
        let reply: Value = serde_json::from_str(reply.args[0].as_str().unwrap()).unwrap();
        assert_eq!(reply["result"], "ERROR", "an unknown board: {reply}");
        let bound = agent.router.session(board.id()).unwrap().board;
        assert_eq!(bound, None, "a refused login binds the session to no board");
        // A known (legacy) board logs in on this session, to report a result below.
        let reply = call("agent-1.stack4things.connection", json!({"uuid": boards[0], "session": board.id()}));
        let reply: Value = serde_json::from_str(reply.await.unwrap().args[0].as_str().unwrap()).unwrap();
        assert_eq!(reply["result"], "SUCCESS", "{reply}");
        db.close().await;
        let result = json!({"req_id": "r1", "result": "SUCCESS", "message": "done"}).to_string();
        for (procedure, kw) in [
            ("agent-1.stack4things.connection", login()),
            ("stack4things.register", json!({"code": "c", "session": board.id()})),
            ("agent-1.stack4things.notify_result", json!({"board_uuid": boards[0], "wampmessage": result})),
        ] {
            match call(procedure, kw).await {
                Err(s4t_wamp::Error::Wamp(e)) => assert_eq!(e.error, UNAVAILABLE, "{procedure}"),
                other => panic!("{procedure}: {other:?}"),
            }
        }
        shutdown.cancel();
    }

    /// Enrollment attempts refused by the throttle are audited 10 times, then once a minute:
    /// an unauthenticated peer looping on handshakes cannot grow the append-only table.
    #[tokio::test]
    async fn throttled_enrollment_attempts_do_not_flood_the_audit() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&crate::db::DatabaseUrl::sqlite_in(dir.path())).await.unwrap();
        let auth = DbAuthenticator::with_throttle(db.clone(), false, Arc::new(crate::auth::Throttle::new(1, 0.001)));
        for _ in 0..100 {
            assert!(auth.ticket("s4t", "enroll", &Secret::new("guess")).await.unwrap().is_none());
        }
        let q = crate::db::AuditQuery { action: "board.enroll.".into(), limit: 1000, ..Default::default() };
        let actions: Vec<String> = db.list_audit(&q).await.unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(actions.iter().filter(|a| *a == "board.enroll.refused").count(), 1, "the one looked at");
        assert_eq!(actions.iter().filter(|a| *a == "board.enroll.throttled").count(), 10, "{actions:?}");
    }

    /// Enrolls at `url` with `code` as ticket and calls `stack4things.register` with `code`
    /// and `secret` (if any): the reply's result and message, or the handshake's refusal.
    async fn enroll_with(url: &str, code: &str, secret: Option<&str>) -> Result<(String, Value), s4t_wamp::Error> {
        let auth = s4t_wamp::ClientAuth::Ticket { authid: "enroll".into(), ticket: Secret::new(code) };
        let session = s4t_wamp::client::connect(&s4t_wamp::ClientConfig::new(url, "s4t", auth)).await?;
        let mut kw = json!({"code": code, "session": session.id()});
        if let Some(s) = secret {
            kw["secret"] = json!(s);
        }
        let kw: Dict = kw.as_object().unwrap().clone().into_iter().collect();
        let reply = session.call("stack4things.register", vec![], kw, Duration::from_secs(10)).await?;
        session.leave().await;
        let reply: Value = serde_json::from_str(reply.args[0].as_str().unwrap()).unwrap();
        Ok((reply["result"].as_str().unwrap().to_owned(), reply["message"].clone()))
    }

    /// A WAMP-CRA session of board `uuid` with `secret`.
    async fn cra_login(url: &str, uuid: &str, secret: &str) -> s4t_wamp::Session {
        let cra = s4t_wamp::ClientAuth::WampCra { authid: uuid.to_owned(), secret: Secret::new(secret) };
        s4t_wamp::client::connect(&s4t_wamp::ClientConfig::new(url, "s4t", cra)).await.unwrap()
    }

    /// A call the caller gives up on still runs to its end: an enrollment whose caller timed
    /// out while the database was busy enrolls the board and audits it once the database is
    /// free. (The router interrupts an abandoned call; the handler's future was dropped where
    /// it waited, so the board could end up enrolled without its audit entry.)
    #[tokio::test]
    async fn an_abandoned_call_runs_to_its_end() {
        let TestAgent { _dir: dir, db, boards, url, shutdown, .. } = test_agent(&[("b", "CODE-A")], None, false).await;
        // Another connection takes SQLite's write lock: the enrollment's write waits for it.
        sqlx::any::install_default_drivers();
        let db_url = crate::db::DatabaseUrl::sqlite_in(dir.path());
        let mut lock = <sqlx::AnyConnection as sqlx::Connection>::connect(db_url.expose()).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut lock).await.unwrap();
        let auth = s4t_wamp::ClientAuth::Ticket { authid: "enroll".into(), ticket: Secret::new("CODE-A") };
        let session = s4t_wamp::client::connect(&s4t_wamp::ClientConfig::new(&url, "s4t", auth)).await.unwrap();
        let kw: Dict = json!({"code": "CODE-A", "session": session.id(), "secret": "s".repeat(43)})
            .as_object()
            .unwrap()
            .clone()
            .into_iter()
            .collect();
        let gave_up = session.call("stack4things.register", vec![], kw, Duration::from_millis(300)).await;
        assert!(gave_up.is_err(), "the call was answered while the database was locked: {gave_up:?}");
        session.leave().await;
        sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
        let q = crate::db::AuditQuery { action: "board.enroll".into(), limit: 10, ..Default::default() };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let enrolled = db.board_by_uuid(&boards[0]).await.unwrap().unwrap().secret_salt.is_some();
            let audited = db.list_audit(&q).await.unwrap().iter().any(|e| e.action == "board.enroll");
            if enrolled && audited {
                break;
            }
            assert!(Instant::now() < deadline, "enrolled {enrolled}, audited {audited}: the call was cut short");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
    }

    /// `session` calls `connection` as board `uuid` with `info`, giving up after `timeout`:
    /// the reply's message and result.
    async fn log_in(
        session: &s4t_wamp::Session,
        uuid: &str,
        info: Value,
        timeout: Duration,
    ) -> Result<Value, s4t_wamp::Error> {
        let kw = json!({"uuid": uuid, "session": session.id(), "info": info});
        let kw: Dict = kw.as_object().unwrap().clone().into_iter().collect();
        let reply = session.call("agent-1.stack4things.connection", vec![], kw, timeout).await?;
        Ok(serde_json::from_str(reply.args[0].as_str().unwrap()).unwrap())
    }

    async fn anonymous(url: &str) -> s4t_wamp::Session {
        let config = s4t_wamp::ClientConfig::new(url, "s4t", s4t_wamp::ClientAuth::Anonymous);
        s4t_wamp::client::connect(&config).await.unwrap()
    }

    /// A session that gives up on its calls (the router then forgets them, while their
    /// handlers run to their end) has no more handlers running than its in-flight limit: one
    /// more is refused, so a session cancelling in a loop cannot take the agent's 4,096
    /// handler slots, and another session is served.
    #[tokio::test]
    async fn a_session_giving_up_on_its_calls_holds_at_most_its_share_of_the_handlers() {
        let TestAgent { _dir: dir, boards, url, shutdown, agent: _agent, .. } =
            test_agent(&[("b1", "c1"), ("b2", "c2")], None, true).await;
        // Another connection takes SQLite's write lock: every login's write waits for it.
        sqlx::any::install_default_drivers();
        let db_url = crate::db::DatabaseUrl::sqlite_in(dir.path());
        let mut lock = <sqlx::AnyConnection as sqlx::Connection>::connect(db_url.expose()).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut lock).await.unwrap();
        let (greedy, other) = (anonymous(&url).await, anonymous(&url).await);
        let share = RouterConfig::default().limits.max_in_flight_calls;
        let given_up = (0..share).map(|_| log_in(&greedy, &boards[0], json!({}), Duration::from_millis(300)));
        for r in futures_util::future::join_all(given_up).await {
            assert!(r.is_err(), "a login was answered while the database was locked: {r:?}");
        }
        // The router no longer counts them; the agent still runs them.
        match log_in(&greedy, &boards[0], json!({}), Duration::from_secs(10)).await {
            Err(s4t_wamp::Error::Wamp(e)) => {
                assert_eq!(e.error, UNAVAILABLE);
                assert!(format!("{:?}", e.args).contains("too many calls of this session"), "{e:?}");
            }
            other => panic!("a handler beyond the session's share was run: {other:?}"),
        }
        let served = tokio::spawn({
            let (other, board) = (other.clone(), boards[1].clone());
            async move { log_in(&other, &board, json!({}), Duration::from_secs(30)).await }
        });
        sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
        let reply = served.await.unwrap().expect("another session's login was refused");
        assert_eq!(reply["result"], "SUCCESS", "{reply}");
        // The greedy session's handlers ended: its share is free again.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match log_in(&greedy, &boards[0], json!({}), Duration::from_secs(10)).await {
                Ok(reply) => {
                    assert_eq!(reply["result"], "SUCCESS", "{reply}");
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "the session's share stayed taken: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
    }

    /// Beyond a session's share, a board's (its sessions together: a board reconnecting
    /// while its old handlers run) and the share of a role without identity (anonymous
    /// sessions cost nothing to open), a call is refused; the others go on, and a share comes
    /// back with its calls.
    #[test]
    fn handlers_are_shared_per_session_board_and_anonymous_role() {
        let running = Running::new(16, 2);
        let board = |session| running.take(Some(session), Some("board"), Some("b1"));
        let held: Vec<Slot> = [1, 1, 2, 2].into_iter().map(|s| board(s).unwrap()).collect();
        assert_eq!(board(1).err(), Some("too many calls of this session at once"));
        assert_eq!(board(3).err(), Some("too many calls of this board at once"));
        assert!(running.take(Some(3), Some("board"), Some("b2")).is_ok(), "another board");
        let legacy: Vec<Slot> =
            [10, 10, 11, 11].into_iter().map(|s| running.take(Some(s), Some("legacy"), None).unwrap()).collect();
        assert_eq!(
            running.take(Some(12), Some("legacy"), None).err(),
            Some("too many calls of anonymous boards at once")
        );
        assert!(running.take(Some(13), Some("enrollment"), None).is_ok(), "enrollments have their own share");
        drop((held, legacy));
        assert!(board(3).is_ok() && running.take(Some(12), Some("legacy"), None).is_ok(), "shares come back");
    }

    /// A session that logs in again as the board it is logged in as is answered at once:
    /// nothing is written again (nor told to the conductor).
    #[tokio::test]
    async fn a_repeated_login_writes_nothing() {
        let TestAgent { _dir, db, boards, url, shutdown, agent: _agent } =
            test_agent(&[("b1", "c1")], None, true).await;
        let board = anonymous(&url).await;
        let reply = log_in(&board, &boards[0], json!({"connectivity": {"iface": "eth0"}}), Duration::from_secs(10));
        assert_eq!(reply.await.unwrap()["result"], "SUCCESS");
        sqlx::query("UPDATE boards SET connectivity = '{\"marker\": 1}' WHERE uuid = $1")
            .bind(&boards[0])
            .execute(db.pool())
            .await
            .unwrap();
        let reply = log_in(&board, &boards[0], json!({"connectivity": {"iface": "eth1"}}), Duration::from_secs(10));
        assert_eq!(reply.await.unwrap()["result"], "SUCCESS");
        let stored = db.board_by_uuid(&boards[0]).await.unwrap().unwrap().connectivity;
        assert_eq!(stored, json!({"marker": 1}), "the repeated login was written");
        shutdown.cancel();
    }

    /// A login's `info.lr_version` and `info.connectivity` beyond their bounds are not stored
    /// (every read of the board parses them); the login succeeds, small ones are stored.
    #[tokio::test]
    async fn oversized_login_info_is_not_stored() {
        let TestAgent { _dir, db, boards, url, shutdown, agent: _agent } =
            test_agent(&[("b1", "c1")], None, true).await;
        let small = json!({"lr_version": "0.4.17", "connectivity": {"iface": "eth0", "local_ip": "10.0.0.2"}});
        let board = anonymous(&url).await;
        assert_eq!(
            log_in(&board, &boards[0], small.clone(), Duration::from_secs(10)).await.unwrap()["result"],
            "SUCCESS"
        );
        let stored = db.board_by_uuid(&boards[0]).await.unwrap().unwrap();
        assert_eq!((stored.lr_version.as_deref(), &stored.connectivity), (Some("0.4.17"), &small["connectivity"]));
        board.leave().await;
        for connectivity in [json!({"x": "y".repeat(20_000)}), json!(vec![0; 1000])] {
            let big = json!({"lr_version": "9".repeat(MAX_LR_VERSION_BYTES + 1), "connectivity": connectivity});
            let board = anonymous(&url).await;
            let reply = log_in(&board, &boards[0], big, Duration::from_secs(10)).await.unwrap();
            assert_eq!(reply["result"], "SUCCESS", "{reply}");
            let stored = db.board_by_uuid(&boards[0]).await.unwrap().unwrap();
            assert_eq!(stored.lr_version.as_deref(), Some("0.4.17"), "an oversized lr_version was stored");
            assert_eq!(stored.connectivity, json!({}), "an oversized connectivity was stored");
            board.leave().await;
        }
        shutdown.cancel();
    }

    /// A board rotated and enrolled again within one revocation sweep is no longer revoked
    /// when the sweep looks: the session admitted with the old secret (perhaps a thief's) is
    /// closed all the same, and the one admitted with the new secret stays.
    #[tokio::test]
    async fn a_session_from_before_a_rotation_is_closed_even_after_a_quick_enrollment() {
        let TestAgent { _dir, db, boards, url, agent: _agent, .. } =
            test_agent(&[("b", "CODE-R"), ("canary", "CODE-C")], None, false).await;
        let uuid = boards[0].clone();
        let (result, doc) = enroll_with(&url, "CODE-R", None).await.unwrap();
        assert_eq!(result, "SUCCESS", "{doc}");
        let old = cra_login(&url, &uuid, doc["iotronic"]["credentials"]["secret"].as_str().unwrap()).await;
        // Another board's session, revoked later to see a sweep pass.
        let (_, doc) = enroll_with(&url, "CODE-C", None).await.unwrap();
        let canary = cra_login(&url, &boards[1], doc["iotronic"]["credentials"]["secret"].as_str().unwrap()).await;
        // Rotated and enrolled again at once, between two sweeps.
        assert!(db.rotate_board(&uuid, "CODE-R2", crate::db::now_ms() + 60_000).await.unwrap());
        let (result, doc) = enroll_with(&url, "CODE-R2", None).await.unwrap();
        assert_eq!(result, "SUCCESS", "{doc}");
        assert_eq!(db.board_revoked_at(&uuid).await.unwrap(), None, "enrolled again: no longer revoked");
        let new = cra_login(&url, &uuid, doc["iotronic"]["credentials"]["secret"].as_str().unwrap()).await;
        tokio::time::timeout(Duration::from_secs(10), old.closed()).await.expect("the old session stayed");
        // A sweep that began after the new login (it closes the canary, revoked only now)
        // leaves the new session alone.
        assert!(db.revoke_board(&boards[1]).await.unwrap());
        tokio::time::timeout(Duration::from_secs(10), canary.closed()).await.expect("no sweep closed the canary");
        assert!(!new.is_closed(), "the session with the new secret was closed");
    }

    /// A session admitted before its board was revoked or rotated gets no tunnel tokens, not
    /// even once the board has enrolled again (no longer revoked): the revocation sweep closes
    /// it within a second, and tokens minted meanwhile would outlive it. A session admitted
    /// with the new secret gets them. (The handler is called directly: over WAMP the sweep
    /// may close the old session before its call arrives.)
    #[tokio::test]
    async fn a_session_from_before_a_rotation_gets_no_tunnel_tokens() {
        let TestAgent { _dir, db, boards, url, agent, .. } =
            test_agent(&[("b", "CODE-T")], Some("wss://tunnel.example:8443/"), false).await;
        let uuid = boards[0].clone();
        let secret = |doc: &Value| doc["iotronic"]["credentials"]["secret"].as_str().unwrap().to_owned();
        let (result, doc) = enroll_with(&url, "CODE-T", None).await.unwrap();
        assert_eq!(result, "SUCCESS", "{doc}");
        let old = cra_login(&url, &uuid, &secret(&doc)).await;
        let ctx = Ctx {
            db: db.clone(),
            bus: Bus::in_process(),
            router: agent.router.clone(),
            setup: AgentSetup {
                name: "agent-1".into(),
                url: url.clone(),
                tunnel_url: None,
                legacy: false,
                dial_back: false,
            },
            logins: Logins::default(),
            codes: Arc::new(crate::auth::enrollment_throttle()),
            mint: Some(TunnelMint::load(&db, "wss://tunnel.example:8443/".into()).await.unwrap()),
            running: Running::new(16, 16),
        };
        let renew = |session: &s4t_wamp::Session| {
            let details = json!({"caller": session.id(), "caller_authid": uuid, "caller_authrole": "board"});
            let inv = Invocation {
                args: vec![],
                kwargs: json!({"board_uuid": uuid}).as_object().unwrap().clone().into_iter().collect(),
                details: details.as_object().unwrap().clone().into_iter().collect(),
            };
            let ctx = &ctx;
            async move {
                let reply = tunnel_tokens(ctx, &inv).await.unwrap();
                serde_json::from_str::<Value>(reply.args[0].as_str().unwrap()).unwrap()
            }
        };
        assert_eq!(renew(&old).await["result"], "SUCCESS");
        assert!(db.rotate_board(&uuid, "CODE-T2", crate::db::now_ms() + 60_000).await.unwrap());
        let reply = renew(&old).await;
        assert_eq!(reply["result"], "ERROR", "a session of a revoked board got tunnel tokens: {reply}");
        let (result, doc) = enroll_with(&url, "CODE-T2", None).await.unwrap();
        assert_eq!(result, "SUCCESS", "{doc}");
        assert_eq!(db.board_revoked_at(&uuid).await.unwrap(), None, "enrolled again: no longer revoked");
        let reply = renew(&old).await;
        assert_eq!(reply["result"], "ERROR", "a session from before the rotation got tunnel tokens: {reply}");
        let new = cra_login(&url, &uuid, &secret(&doc)).await;
        let reply = renew(&new).await;
        assert_eq!(reply["result"], "SUCCESS", "the session with the new secret: {reply}");
    }

    /// A board whose enrollment reply was lost enrolls again with the same code and the secret
    /// it proposed, within the hour: same identity, same secret, nothing changed. Nobody else
    /// can: not with another secret, not after rotate-secret or revoke, not after the hour.
    #[tokio::test]
    async fn a_board_may_repeat_its_enrollment_with_the_secret_it_proposed() {
        let codes = [("b1", "CODE-REPEAT-1"), ("b2", "CODE-REPEAT-2"), ("b3", "CODE-REPEAT-3")];
        let TestAgent { _dir, db, boards: uuids, url, shutdown, agent: _agent } =
            test_agent(&codes, Some("ws://tunnels/"), false).await;
        let secret = crate::auth::random_secret();
        let refused = json!("unknown, expired or already used registration code");

        // First enrollment: the proposed secret is the board's secret.
        let (result, first) = enroll_with(&url, "CODE-REPEAT-1", Some(&secret)).await.unwrap();
        assert_eq!(result, "SUCCESS", "{first}");
        assert_eq!(first["iotronic"]["credentials"], json!({"authid": uuids[0], "secret": secret}));
        assert_eq!(first["iotronic"]["tunnel"], json!({"url": "ws://tunnels/"}));
        let cra = s4t_wamp::ClientAuth::WampCra { authid: uuids[0].clone(), secret: Secret::new(secret.clone()) };
        let board = s4t_wamp::client::connect(&s4t_wamp::ClientConfig::new(&url, "s4t", cra)).await.unwrap();
        board.leave().await;
        let before = db.board_by_uuid(&uuids[0]).await.unwrap().unwrap();

        // The reply was lost: the same code and secret get the same document again.
        let (result, again) = enroll_with(&url, "CODE-REPEAT-1", Some(&secret)).await.unwrap();
        assert_eq!((result.as_str(), &again), ("SUCCESS", &first));
        let after = db.board_by_uuid(&uuids[0]).await.unwrap().unwrap();
        assert_eq!(
            (&after.secret_salt, &after.secret_key, &after.config, after.updated_at),
            (&before.secret_salt, &before.secret_key, &before.config, before.updated_at),
            "a repeated enrollment changes nothing"
        );
        let q = crate::db::AuditQuery { action: "board.enroll".into(), limit: 100, ..Default::default() };
        let actions: Vec<String> = db.list_audit(&q).await.unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(actions.iter().filter(|a| *a == "board.enroll.repeated").count(), 1, "{actions:?}");

        // Another secret, a short one, or none: refused.
        let other = crate::auth::random_secret();
        for s in [Some(other.as_str()), Some(&secret[..MIN_PROPOSED_SECRET - 1]), None] {
            let (result, message) = enroll_with(&url, "CODE-REPEAT-1", s).await.unwrap();
            assert_eq!((result.as_str(), &message), ("ERROR", &refused));
        }

        // After rotate-secret the old code does not even pass the handshake.
        assert!(db.rotate_board(&uuids[0], "CODE-ROTATED-1", crate::db::now_ms() + 60_000).await.unwrap());
        assert!(enroll_with(&url, "CODE-REPEAT-1", Some(&secret)).await.is_err(), "the old code after rotation");
        let hash = |uuid: String| {
            let db = db.clone();
            async move {
                let row = sqlx::query("SELECT enroll_code_hash FROM boards WHERE uuid = $1")
                    .bind(uuid)
                    .fetch_one(db.pool())
                    .await
                    .unwrap();
                crate::db::col::<Option<String>>(&row, "enroll_code_hash").unwrap()
            }
        };
        assert_eq!(hash(uuids[0].clone()).await, None, "rotate-secret forgets the code");
        // The board enrolls with its new code (and secret); the old code stays refused.
        let (result, _) = enroll_with(&url, "CODE-ROTATED-1", Some(&other)).await.unwrap();
        assert_eq!(result, "SUCCESS");
        assert_eq!(hash(uuids[0].clone()).await, Some(crate::auth::token_hash("CODE-ROTATED-1")));
        assert!(enroll_with(&url, "CODE-REPEAT-1", Some(&secret)).await.is_err(), "the old code after re-enrollment");
        // Nor after revoke.
        let (result, _) = enroll_with(&url, "CODE-REPEAT-2", Some(&secret)).await.unwrap();
        assert_eq!(result, "SUCCESS");
        assert!(db.revoke_board(&uuids[1]).await.unwrap());
        assert_eq!(hash(uuids[1].clone()).await, None, "revoke forgets the code");
        assert!(enroll_with(&url, "CODE-REPEAT-2", Some(&secret)).await.is_err(), "the code after revoke");
        // Nor after the hour.
        let (result, _) = enroll_with(&url, "CODE-REPEAT-3", Some(&secret)).await.unwrap();
        assert_eq!(result, "SUCCESS");
        sqlx::query("UPDATE boards SET enrolled_at = enrolled_at - $1 WHERE uuid = $2")
            .bind(ENROLL_REPEAT_WINDOW_MS)
            .bind(&uuids[2])
            .execute(db.pool())
            .await
            .unwrap();
        assert!(enroll_with(&url, "CODE-REPEAT-3", Some(&secret)).await.is_err(), "the code after the hour");
        shutdown.cancel();
    }

    /// Without a proposed secret (an older lightning-rod), enrollment issues a random one.
    #[tokio::test]
    async fn without_a_proposed_secret_a_random_one_is_issued() {
        let TestAgent { _dir, url, shutdown, agent: _agent, .. } =
            test_agent(&[("b", "CODE-RANDOM")], None, false).await;
        let (result, message) = enroll_with(&url, "CODE-RANDOM", Some("too-short")).await.unwrap();
        assert_eq!(result, "SUCCESS", "{message}");
        let issued = message["iotronic"]["credentials"]["secret"].as_str().unwrap();
        assert!(issued != "too-short" && issued.len() >= MIN_PROPOSED_SECRET, "a random secret");
        shutdown.cancel();
    }

    #[test]
    fn iso_dates_and_salts() {
        assert_eq!(iso(0), "1970-01-01T00:00:00");
        assert_eq!(iso(1_700_000_000_000), "2023-11-14T22:13:20");
        let c = CraCredential::derive(&Secret::new("s"));
        let back = decode_credential(&encode_salt(&c), c.derived_key.expose()).unwrap();
        assert_eq!(back, c);
        assert!(decode_credential("salt-only", "k").is_none());
    }
}
