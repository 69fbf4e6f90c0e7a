//! The conductor: turns accepted requests into board calls on the right agent, records
//! results, delivers queued commands when a board logs in, and enforces leases (expiry tears
//! down what the lease created).
//!
//! Every handler is idempotent: request state moves by compare-and-set in the database, so a
//! message delivered twice (a conductor killed before its ack) does its work once.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::Error;
use crate::bus::{AgentCall, Bus, ConductorMsg};
use crate::db::{Board, Db, Lease, Request, RequestStatus};

/// How often queued requests and leases are checked for expiry.
pub const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// A request still PENDING this long was lost on its way to the conductor (the bus failed
/// after the API stored it, or a database error dropped the in-process message): it fails.
pub const PENDING_LIMIT: Duration = Duration::from_secs(15 * 60);
/// A request RUNNING this long gets no result any more: the board answered RUNNING and was to
/// report later (a package operation, at most 30 min on lightning-rod; a delayed plugin stop,
/// at most 1 h), but it restarted or rebooted meanwhile, or the call was lost. It fails.
pub const RUNNING_LIMIT: Duration = Duration::from_secs(2 * 3600);

/// How long finished requests (COMPLETED, FAILED, EXPIRED) and their results stay listed
/// before the sweep deletes them.
pub const REQUEST_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the sweep deletes finished requests past [`REQUEST_RETENTION`]: each time at most
/// [`PURGE_BATCHES`] batches of [`PURGE_BATCH`], so that one sweep stays short however many
/// have piled up (the rest goes next time).
pub const PURGE_EVERY: Duration = Duration::from_secs(60);
pub const PURGE_BATCH: i64 = 500;
pub const PURGE_BATCHES: usize = 20;

/// Public ports handed out for exposed services (the original's pool, ends excluded).
pub const PUBLIC_PORTS: (u16, u16) = (50001, 59999);

/// The results a board may give a request (the `results` table's CHECK).
pub const BOARD_RESULTS: &[&str] = &["RUNNING", "SUCCESS", "ERROR", "WARNING"];

#[derive(Clone, Debug)]
pub struct Conductor {
    db: Db,
    bus: Bus,
    /// When (ms, the sweep's clock) finished requests were last purged.
    purged_at: Arc<AtomicI64>,
    /// Requests the sweep expired whose end it could not finish (an error giving back their
    /// allocation or publishing their completion): tried again at each sweep. Kept here, not
    /// looked for again in the database: while its allocation is there, it is that
    /// request's (a new enable of the service, a new join, is refused meanwhile); once
    /// freed, the same port or address may go to the next, which must stay.
    unfinished: Arc<Mutex<Vec<Request>>>,
}

impl Conductor {
    pub fn new(db: Db, bus: Bus) -> Self {
        Conductor { db, bus, purged_at: Arc::new(AtomicI64::new(i64::MIN)), unfinished: Arc::default() }
    }

    /// Runs until `shutdown`. With the in-process bus, first recovers what a previous run left
    /// half-done (RabbitMQ redelivers unacked messages by itself).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut rx = self.bus.conductor_deliveries().await?;
        if self.bus.is_in_process() {
            self.recover().await?;
        }
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    if let Err(e) = self.sweep().await {
                        warn!(cause = %e, "sweep failed");
                    }
                }
                d = rx.recv() => {
                    let Some(d) = d else { return Err(Error::Bus("the conductor queue closed".into())) };
                    let span = info_span!("conductor", request = msg_request(&d.msg));
                    let handled = self.handle_retrying(&d.msg, d.redelivered, &shutdown).instrument(span);
                    match handled.await {
                        Some(Ok(())) => {}
                        // Stopping: unacknowledged, RabbitMQ gives it to the next conductor
                        // (in-process, `recover` at the next start sends PENDING requests).
                        None => return Ok(()),
                        // The effect of a message that cannot be handled is not waited for
                        // for ever: a request left PENDING or RUNNING is failed by the sweep.
                        Some(Err(e)) => warn!(cause = %e, "conductor message failed; dropped"),
                    }
                    // An ack lost with the broker connection is not a reason to stop (`serve`
                    // would stop the whole cloud): the message comes back, and handling it
                    // again does nothing new.
                    if let Err(e) = d.ack().await {
                        warn!(cause = %e, "ack failed");
                    }
                }
            }
        }
    }

    /// After a restart of the whole cloud (in-process bus): requests that were at a board
    /// when the process died are marked failed; accepted requests are sent again. In that
    /// order: one sent here is not taken for one of the dead process's, and a queued one
    /// does not wait behind a RUNNING one that will never answer.
    async fn recover(&self) -> Result<(), Error> {
        for r in self.db.requests_in(RequestStatus::Running).await? {
            self.fail(&r.uuid, &r.destination, "the cloud restarted while the board was running this request").await?;
        }
        // Executed here, not sent to our own queue: nobody reads it yet, and more than its
        // capacity would block the start for ever.
        for r in self.db.requests_in(RequestStatus::Pending).await? {
            self.execute(&r.uuid, false, Origin::Made).await?;
        }
        Ok(())
    }

    pub async fn handle(&self, msg: ConductorMsg, redelivered: bool) -> Result<(), Error> {
        match msg {
            ConductorMsg::Execute { request } => self.execute(&request, redelivered, Origin::Made).await,
            // Only the end of a queued request sends the next queued one: the end of any other
            // (a user's read, the conductor's own notifications) sent it while the one before
            // was still running.
            ConductorMsg::Result { request, board, result, message } => {
                if self.record_result(&request, &board, &result, &message).await? {
                    self.deliver_queued(&board).await?;
                }
                Ok(())
            }
            ConductorMsg::BoardOnline { board } => self.deliver_queued(&board).await,
            ConductorMsg::Failed { request, board, reason } => {
                let queued = match self.db.request(&request, None).await? {
                    Some(r) if r.status.is_final() => {
                        self.after_final(&r).await?;
                        r.expires_at.is_some()
                    }
                    Some(r) => {
                        self.fail(&request, &board, &reason).await?;
                        r.expires_at.is_some()
                    }
                    None => false,
                };
                if queued {
                    self.deliver_queued(&board).await?;
                }
                Ok(())
            }
        }
    }

    /// Handles `msg` as [`Conductor::handle`] does, again while it fails with a transient error
    /// ([`crate::bus::retry_transient`]); an attempt after a failed one counts as a redelivery
    /// (an `Execute` that failed after marking its request RUNNING hands it to the agent then,
    /// which drops a request id it has already taken). `None` on shutdown.
    pub async fn handle_retrying(
        &self,
        msg: &ConductorMsg,
        redelivered: bool,
        shutdown: &CancellationToken,
    ) -> Option<Result<(), Error>> {
        let mut failed_before = false;
        crate::bus::retry_transient(shutdown, || {
            let again = redelivered || failed_before;
            failed_before = true;
            self.handle(msg.clone(), again)
        })
        .await
    }

    /// Sends a PENDING request to its board's agent (or queues or fails it). `redelivered`:
    /// a previous conductor died holding this message, maybe between marking the request
    /// RUNNING and handing it to the agent; then a RUNNING request is handed over again (the
    /// agent drops a request id it has already taken). A request made to be queued goes
    /// through its board's queue ([`Conductor::enqueue`]) unless taken from it.
    async fn execute(&self, uuid: &str, redelivered: bool, origin: Origin) -> Result<(), Error> {
        let Some(req) = self.db.request(uuid, None).await? else {
            warn!("execute: unknown request");
            return Ok(());
        };
        if req.status.is_final() {
            // Handled; maybe cut after its final state (a retry): what follows it, again.
            return self.after_final(&req).await;
        }
        let again = redelivered && req.status == RequestStatus::Running;
        if req.status != RequestStatus::Pending && !again {
            return Ok(()); // already handled (redelivery)
        }
        if req.expires_at.is_some() && !again && origin == Origin::Made {
            return self.enqueue(&req).await;
        }
        let board = self.db.board_by_uuid(&req.destination).await?;
        let Some(board) = board.filter(is_online) else {
            if req.expires_at.is_some() && !again {
                // Taken from the queue as the board left: back in it, for its next login.
                self.db.transition_request(uuid, &[RequestStatus::Pending], RequestStatus::Queued, None).await?;
                info!("board offline: request queued again");
                return Ok(());
            }
            return self.fail(uuid, &req.destination, "the board is offline").await;
        };
        // Leases come and go while a request waits: queued for days, or only behind a backlog
        // (or in RabbitMQ while no conductor runs, up to `PENDING_LIMIT`) after the API
        // checked it. The conductor's own notifications (a lease's teardown) are not bound
        // by leases.
        if !again
            && origin != Origin::Conductor
            && let Some(reason) = self.lease_refusal(&req).await?
        {
            info!(request = %uuid, %reason, "request refused at delivery");
            return self.fail(uuid, &req.destination, &reason).await;
        }
        let (agent, session) = (board.agent.clone().unwrap_or_default(), board.session.clone().unwrap_or_default());
        if !again {
            let from = [RequestStatus::Pending];
            if !self.db.transition_request(uuid, &from, RequestStatus::Running, Some(&agent)).await? {
                return Ok(());
            }
            self.db.set_result(uuid, &board.uuid, "RUNNING", "").await?;
        }
        let args = match req.args {
            Value::Array(a) => a,
            Value::Null => vec![],
            other => vec![other],
        };
        let omit_req = !crate::agent::takes_request_dict(board.lr_version.as_deref());
        let call = AgentCall {
            request: uuid.into(),
            board: board.uuid.clone(),
            session,
            procedure: req.action,
            // The conductor's own calls (a lease's teardown) take no share of the project's.
            project: if origin == Origin::Conductor { String::new() } else { req.project },
            args,
            omit_req,
        };
        if let Err(e) = self.bus.to_agent(&agent, &call).await {
            // A queued request may have waited days for this login: a hand-over that failed
            // for a moment (the agent's queue full, the broker) puts it back first in line,
            // and the delivery stops (it failed, and every one after it with it); the next
            // login or the sweep delivers again.
            if req.expires_at.is_some()
                && self.db.transition_request(uuid, &[RequestStatus::Running], RequestStatus::Queued, None).await?
            {
                warn!(request = %uuid, cause = %e, "cannot reach agent {agent}: request queued again");
                return Err(e);
            }
            self.fail(uuid, &board.uuid, &format!("cannot reach agent {agent}: {e}")).await?;
        }
        Ok(())
    }

    /// Puts a PENDING request made to be queued (`?queue=true`) in its board's queue, behind
    /// the older ones (sent at once, it went ahead of them, and beside one still running),
    /// and delivers the queue if the board is online. The caller is told (a completion) if
    /// it is still queued then; one that went out is waited for as any other.
    async fn enqueue(&self, req: &Request) -> Result<(), Error> {
        let from = [RequestStatus::Pending];
        if !self.db.transition_request(&req.uuid, &from, RequestStatus::Queued, None).await? {
            return Ok(()); // taken by a delivery already
        }
        // Read after the request is queued: a board that logged in meanwhile, its login
        // handled (by another conductor) before this was queued, gets it now, not at its
        // next login.
        let delivered = match self.db.board_by_uuid(&req.destination).await? {
            Some(b) if is_online(&b) => Box::pin(self.deliver_queued(&req.destination)).await,
            _ => Ok(()),
        };
        if self.db.request(&req.uuid, None).await?.is_some_and(|r| r.status == RequestStatus::Queued) {
            info!("request queued");
            self.bus.completed(&req.uuid).await?;
        }
        delivered
    }

    /// Records a board's answer; whether the request was made to be queued (its end sends
    /// the next queued one).
    async fn record_result(&self, request: &str, board: &str, result: &str, message: &Value) -> Result<bool, Error> {
        // Refused, not retried: the database's CHECK would refuse it as an error taken for a
        // passing one, and the message was tried again for half a minute, every conductor
        // waiting meanwhile (a board's `notify_result` carried any string).
        if !BOARD_RESULTS.contains(&result) {
            return Err(Error::Invalid(format!(
                "request {request}: a board result is one of {BOARD_RESULTS:?}, not {result:?}"
            )));
        }
        let Some(req) = self.db.request(request, None).await? else { return Ok(false) };
        let queued = req.expires_at.is_some();
        if req.status.is_final() {
            self.after_final(&req).await?;
            return Ok(queued);
        }
        let text = match message {
            Value::String(s) if s.is_empty() && result == "RUNNING" => result.to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        // A board's RUNNING answer is never empty: the queue tells it from the conductor's own
        // mark (`execute`), and the next queued request goes once the board has taken this
        // one (a package operation may run for hours).
        self.db.set_result(request, board, result, &text).await?;
        if result != "RUNNING" {
            // As the original: the request is COMPLETED; its result says SUCCESS or ERROR.
            let from = [RequestStatus::Running, RequestStatus::Pending];
            self.db.transition_request(request, &from, RequestStatus::Completed, None).await?;
        }
        self.finish(&req, result == "ERROR").await?;
        Ok(queued)
    }

    /// Why `req` may not reach its board now, if a lease stands in between: the board is
    /// leased by another project than the one that made the request (a command queued before
    /// the lease must not run inside it), or the lease it was made under has ended.
    async fn lease_refusal(&self, req: &Request) -> Result<Option<String>, Error> {
        let now = self.db.active_lease_of_board(&req.destination).await?;
        Ok(match (&req.lease, now) {
            (Some(made), Some(now)) if *made == now.uuid => None,
            // Requests record the board's project: made outside a lease, by that project.
            (None, Some(now)) if now.project == req.project => None,
            (_, Some(now)) => Some(format!("the board is under lease {} of another project", now.uuid)),
            (Some(made), None) => Some(format!("lease {made}, under which the request was made, has ended")),
            (None, None) => None,
        })
    }

    /// Fails a request that is not final yet (one that completed meanwhile keeps its result),
    /// then does what follows a final state whoever made it final: a retry after a transient
    /// error past the compare-and-set gives the allocation back then (it returned at the
    /// compare-and-set, done, and a refused enable kept its port for good).
    async fn fail(&self, request: &str, board: &str, why: &str) -> Result<(), Error> {
        let from = [RequestStatus::Pending, RequestStatus::Running, RequestStatus::Queued];
        self.db.end_request(request, &from, RequestStatus::Failed, (board, "ERROR", why)).await?;
        match self.db.request(request, None).await? {
            Some(req) => self.after_final(&req).await,
            None => self.bus.completed(request).await,
        }
    }

    /// Done again for a message about a request that is final already (a retry after a
    /// transient error, a redelivery): the steps after its final compare-and-set may not have
    /// run, and nothing else would run them (the sweep looks at PENDING and RUNNING ones). A
    /// request that failed, or completed with an ERROR, gives back its allocation (as
    /// [`Conductor::undo_allocation`] checks, only if it is still that request's), and its
    /// completion is published again (waiters read the request from the database).
    async fn after_final(&self, req: &Request) -> Result<(), Error> {
        let failed = match req.status {
            RequestStatus::Failed | RequestStatus::Expired => true,
            RequestStatus::Completed => self.db.results(&req.uuid).await?.iter().any(|r| r.result == "ERROR"),
            _ => false,
        };
        self.finish(req, failed).await
    }

    /// What follows a board's result: a `failed` request gives its allocation back, and its
    /// completion (or progress) is published.
    async fn finish(&self, req: &Request, failed: bool) -> Result<(), Error> {
        if failed {
            self.undo_allocation(req).await?;
        }
        self.bus.completed(&req.uuid).await
    }

    /// A ServiceEnable or VpnJoin that did not happen (the board answered ERROR, or the
    /// request failed or expired after the API had answered 202) gives back what was
    /// allocated for it: the exposure on the port it named, the membership at the address it
    /// named, if they are still those (a later enable or join has its own). Otherwise the
    /// port would stay allocated and the membership listed for nothing that exists.
    async fn undo_allocation(&self, req: &Request) -> Result<(), Error> {
        let first = req.args.get(0);
        let text = |v: Option<&Value>, key: &str| v.and_then(|d| d.get(key)).and_then(Value::as_str).map(str::to_owned);
        let board = &req.destination;
        match req.action.as_str() {
            "ServiceEnable" => {
                let (Some(service), Some(port)) = (text(first, "uuid"), req.args.get(1).and_then(Value::as_i64)) else {
                    return Ok(());
                };
                // The one read, on the request's port, is deleted, not whatever holds the key then.
                if let Some(e) = self.db.exposure(board, &service).await?.filter(|e| e.public_port == port)
                    && self.db.delete_exposure_as_read(&e).await?
                {
                    info!(request = %req.uuid, port, "ServiceEnable did not happen: exposure freed");
                }
            }
            "VpnJoin" => {
                let (Some(vpn), Some(address)) = (text(first, "vpn"), text(first, "address")) else { return Ok(()) };
                if let Some(m) = self.db.vpn_member(&vpn, board).await?.filter(|m| m.address == address)
                    && self.db.remove_vpn_member_as_read(&m).await?
                {
                    info!(request = %req.uuid, vpn = %vpn, "VpnJoin did not happen: membership removed");
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Sends `board`'s queued requests in the order they were made, one at a time: the oldest
    /// goes out (at login), and the board's answer to it (or its failure) sends the next, so
    /// two queued GPIO writes land in the order they were made (sent together, the board ran
    /// them at once). Nothing goes while one is RUNNING. One that ends at delivery (refused,
    /// failed) makes way at once; one another conductor took first is left to it, whose end
    /// sends the next.
    async fn deliver_queued(&self, board: &str) -> Result<(), Error> {
        while let Some(r) = self.db.next_queued_for_board(board).await? {
            if r.status == RequestStatus::Running {
                return Ok(()); // its end sends the next
            }
            // A PENDING one is handed over as it is (`execute`'s compare-and-set makes a
            // second hand-over nothing): a delivery cut by an error left it stranded, and
            // the younger ones went first.
            if r.status == RequestStatus::Queued
                && !self.db.transition_request(&r.uuid, &[RequestStatus::Queued], RequestStatus::Pending, None).await?
            {
                return Ok(());
            }
            info!(request = %r.uuid, "delivering a queued request");
            self.execute(&r.uuid, false, Origin::Queue).await?;
            let now = self.db.request(&r.uuid, None).await?.map(|r| r.status);
            if !now.is_some_and(|s| s.is_final()) {
                return Ok(()); // at the board, or queued again (the board left)
            }
        }
        Ok(())
    }

    /// Expires queued requests and leases whose time has come, fails requests stuck PENDING
    /// or RUNNING, finishes lease teardowns that failed half way, and deletes finished
    /// requests older than [`REQUEST_RETENTION`]. Ended leases are kept: they are the
    /// project's lease history (`GET /v1/leases`, `s4t lease list --all`).
    pub async fn sweep(&self) -> Result<(), Error> {
        self.sweep_at(crate::db::now_ms()).await
    }

    /// [`Conductor::sweep`] as at `now` (ms) for the stuck and the finished requests.
    pub async fn sweep_at(&self, now: i64) -> Result<(), Error> {
        // Each ended in turn, past another's error: one error left every later one EXPIRED
        // with its exposure or membership for good.
        let expired = self.db.expire_queued().await?;
        let owed = std::mem::take(&mut *self.unfinished.lock().unwrap_or_else(PoisonError::into_inner));
        let mut unfinished = Vec::new();
        for r in owed.into_iter().chain(expired) {
            if let Err(e) = self.finish(&r, true).await {
                warn!(request = %r.uuid, cause = %e, "ending an expired request failed: again at the next sweep");
                unfinished.push(r);
            }
        }
        self.unfinished.lock().unwrap_or_else(PoisonError::into_inner).extend(unfinished);
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let stuck = [
            (RequestStatus::Pending, PENDING_LIMIT, "the cloud lost the request before sending it to the board"),
            (RequestStatus::Running, RUNNING_LIMIT, "no result from the board (it may have restarted meanwhile)"),
        ];
        for (status, limit, why) in stuck {
            for r in self.db.requests_in_since(status, now.saturating_sub(ms(limit))).await? {
                warn!(request = %r.uuid, action = %r.action, status = ?status, "request failed after {limit:?}: {why}");
                self.fail(&r.uuid, &r.destination, &format!("{why} within {} min", limit.as_secs() / 60)).await?;
            }
        }
        // A delivery that stopped (a hand-over that failed, a queued request failed above)
        // goes on; one board's failure does not stop the others'.
        for board in self.db.online_boards_with_queued().await? {
            if let Err(e) = self.deliver_queued(&board).await {
                warn!(board = %board, cause = %e, "delivering queued requests failed");
            }
        }
        self.expire_leases().await?;
        for lease in self.db.ended_leases_with_leftovers().await? {
            info!(lease = %lease.uuid, "finishing the teardown of an ended lease");
            self.teardown_lease(&lease).await?;
        }
        self.purge_finished(now).await
    }

    /// Deletes finished requests older than [`REQUEST_RETENTION`] as at `now`, at most every
    /// [`PURGE_EVERY`] and at most [`PURGE_BATCHES`] × [`PURGE_BATCH`] at a time.
    async fn purge_finished(&self, now: i64) -> Result<(), Error> {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let last = self.purged_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) < ms(PURGE_EVERY) {
            return Ok(());
        }
        self.purged_at.store(now, Ordering::Relaxed);
        let before = now.saturating_sub(ms(REQUEST_RETENTION));
        let mut total = 0;
        for _ in 0..PURGE_BATCHES {
            let n = self.db.purge_finished_requests(before, PURGE_BATCH).await?;
            total += n;
            if n < PURGE_BATCH as u64 {
                break;
            }
        }
        if total > 0 {
            info!(requests = total, "finished requests past their retention deleted");
        }
        Ok(())
    }

    /// Ends every due lease and tears down what it created: exposed services and VPN
    /// memberships (rows freed at once; the boards are told when online). Returns the leases.
    pub async fn expire_leases(&self) -> Result<Vec<Lease>, Error> {
        let mut ended = Vec::new();
        for lease in self.db.due_leases().await? {
            if !self.db.end_lease(&lease.uuid, "expired").await? {
                continue; // another conductor got it
            }
            info!(lease = %lease.uuid, "lease expired");
            self.teardown_lease(&lease).await?;
            ended.push(lease);
        }
        Ok(ended)
    }

    /// Frees what `lease` created (also on release). May run again, or twice at once (the
    /// sweep finishing one that failed half way): a board is told what this run removed.
    pub async fn teardown_lease(&self, lease: &Lease) -> Result<(), Error> {
        for e in self.db.exposures_of_lease(&lease.uuid).await? {
            // As read: one made since by the board's next lease stays.
            if !self.db.delete_exposure_as_read(&e).await? {
                continue;
            }
            if let Some(s) = self.db.service(&e.service, None).await? {
                let svc = json!({"uuid": s.uuid, "name": s.name, "port": s.port, "protocol": s.protocol});
                self.notify_board(&lease.project, &e.board, "ServiceDisable", json!([svc])).await?;
            }
        }
        for m in self.db.vpn_members_of_lease(&lease.uuid).await? {
            if self.db.remove_vpn_member_as_read(&m).await? {
                self.notify_board(&lease.project, &m.board, "VpnLeave", json!([{"vpn": m.vpn}])).await?;
            }
        }
        Ok(())
    }

    /// Fire-and-forget board call recorded as a request (dropped if the board is offline: its
    /// state is restored from the database at its next login). Executed here rather than sent
    /// to the conductor's queue: the conductor itself calls this while it does not read that
    /// queue (a lease of many boards ending would fill it and block the conductor for ever).
    async fn notify_board(&self, project: &str, board: &str, action: &str, args: Value) -> Result<(), Error> {
        let r = self.db.create_request(project, board, action, &args, None).await?;
        self.execute(&r.uuid, false, Origin::Conductor).await
    }
}

/// Who hands a request to [`Conductor::execute`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Its `Execute` message, or the recovery at a start.
    Made,
    /// [`Conductor::deliver_queued`], which took it from its board's queue.
    Queue,
    /// [`Conductor::notify_board`]: the conductor's own call (a lease's teardown).
    Conductor,
}

/// Online on an agent, with a session to call.
fn is_online(b: &Board) -> bool {
    b.status == "online" && b.session.is_some() && b.agent.is_some()
}

fn msg_request(m: &ConductorMsg) -> String {
    match m {
        ConductorMsg::Execute { request }
        | ConductorMsg::Result { request, .. }
        | ConductorMsg::Failed { request, .. } => request.clone(),
        ConductorMsg::BoardOnline { board } => format!("board-online:{board}"),
    }
}
