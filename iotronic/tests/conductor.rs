//! Conductor handlers against the real database: idempotence under redelivery, queued
//! delivery, lease expiry teardown.

mod common;

use std::time::Duration;

use common::TestDb;
use iotronic::Error;
use iotronic::bus::{AgentCall, Bus, ConductorMsg, Delivery};
use iotronic::conductor::{Conductor, REQUEST_RETENTION};
use iotronic::db::{Board, Db, Injection, NewBoard, Plugin, Project, RequestStatus, now_ms};
use serde_json::{Value, json};

/// Project "p" and its board "b" (offline).
async fn project_and_board(t: &TestDb) -> (Project, Board) {
    let p = t.db.create_project("p").await.unwrap();
    let nb = NewBoard { name: "b".into(), code: "c".into(), project: p.uuid.clone(), ..Default::default() };
    let b = t.db.insert_board(nb).await.unwrap();
    (p, b)
}

/// Board "b" of project "p", online on agent "agent" (session 7), and a conductor.
struct Online {
    t: TestDb,
    p: Project,
    b: Board,
    /// What the conductor hands the agent.
    agent: tokio::sync::mpsc::Receiver<Delivery<AgentCall>>,
    c: Conductor,
}

/// A board's answer to `request`.
fn answer(request: &str, board: &str, result: &str, message: Value) -> ConductorMsg {
    ConductorMsg::Result { request: request.into(), board: board.into(), result: result.into(), message }
}

async fn online() -> Online {
    let t = TestDb::sqlite().await;
    let (p, b) = project_and_board(&t).await;
    t.db.board_online(&b.uuid, "agent", "7", None, &json!({})).await.unwrap();
    let bus = Bus::in_process();
    let agent = bus.agent_deliveries("agent").await.unwrap();
    let c = Conductor::new(t.db.clone(), bus);
    Online { t, p, b, agent, c }
}

#[tokio::test]
async fn redelivered_execute_hands_a_running_request_over_again_and_nothing_else_twice() {
    let Online { t, p, b, mut agent, c } = online().await;

    let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([{}]), None).await.unwrap();
    let exec = ConductorMsg::Execute { request: r.uuid.clone() };
    c.handle(exec.clone(), false).await.unwrap();
    let call = agent.recv().await.unwrap().msg;
    assert_eq!((call.session.as_str(), call.procedure.as_str()), ("7", "DevicePing"));
    assert_eq!(t.db.request(&r.uuid, None).await.unwrap().unwrap().status, RequestStatus::Running);
    // A plain duplicate does nothing; a redelivery (the conductor died before acking, maybe
    // before the hand-over) hands it over again.
    c.handle(exec.clone(), false).await.unwrap();
    assert!(agent.try_recv().is_err());
    c.handle(exec.clone(), true).await.unwrap();
    assert_eq!(agent.recv().await.unwrap().msg.request, r.uuid);

    let result = answer(&r.uuid, &b.uuid, "SUCCESS", json!("pong"));
    c.handle(result.clone(), false).await.unwrap();
    c.handle(result, true).await.unwrap();
    let failed = ConductorMsg::Failed { request: r.uuid.clone(), board: b.uuid.clone(), reason: "late".into() };
    c.handle(failed, true).await.unwrap();
    assert_eq!(t.db.request(&r.uuid, None).await.unwrap().unwrap().status, RequestStatus::Completed);
    assert_eq!(t.db.results(&r.uuid).await.unwrap()[0].result, "SUCCESS", "a late failure must not overwrite");
    c.handle(exec, true).await.unwrap();
    assert!(agent.try_recv().is_err(), "a completed request is never sent again");
}

#[tokio::test]
async fn queued_requests_go_out_at_login_and_expired_leases_free_what_they_held() {
    let t = TestDb::sqlite().await;
    let (p, b) = project_and_board(&t).await;
    let bus = Bus::in_process();
    let mut agent = bus.agent_deliveries("agent").await.unwrap();
    let c = Conductor::new(t.db.clone(), bus.clone());

    let q = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), Some(now_ms() + 60_000)).await.unwrap();
    c.handle(ConductorMsg::Execute { request: q.uuid.clone() }, false).await.unwrap();
    assert_eq!(t.db.request(&q.uuid, None).await.unwrap().unwrap().status, RequestStatus::Queued);
    let plain = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
    c.handle(ConductorMsg::Execute { request: plain.uuid.clone() }, false).await.unwrap();
    assert_eq!(t.db.request(&plain.uuid, None).await.unwrap().unwrap().status, RequestStatus::Failed);

    t.db.board_online(&b.uuid, "agent", "9", None, &json!({})).await.unwrap();
    c.handle(ConductorMsg::BoardOnline { board: b.uuid.clone() }, false).await.unwrap();
    let call = tokio::time::timeout(Duration::from_secs(5), agent.recv()).await.unwrap().unwrap().msg;
    assert_eq!((call.request.as_str(), call.session.as_str()), (q.uuid.as_str(), "9"));

    let svc = t.db.create_service("ssh", &p.uuid, 22, "TCP", &json!({})).await.unwrap();
    let lease = t.db.create_lease(&p.uuid, "u", std::slice::from_ref(&b.uuid), now_ms() - 1).await.unwrap();
    t.db.allocate_exposure(&b.uuid, &svc.uuid, (50001, 50010), Some(&lease.uuid), &[]).await.unwrap();
    let vpn = t.db.create_vpn("v", &p.uuid, "l2", "10.0.0.0/24").await.unwrap();
    t.db.add_vpn_member(&vpn, &b.uuid, None, Some(&lease.uuid)).await.unwrap();
    let ended = c.expire_leases().await.unwrap();
    assert_eq!(ended.len(), 1);
    assert!(t.db.exposures_of_board(&b.uuid).await.unwrap().is_empty());
    assert!(t.db.vpn_members(&vpn.uuid).await.unwrap().is_empty());
    assert!(c.expire_leases().await.unwrap().is_empty(), "a lease ends once");
    assert!(t.db.active_lease_of_board(&b.uuid).await.unwrap().is_none());
}

/// A queued command runs only under the lease situation it was made in: one queued before
/// another project leased the board is failed at delivery (it must not run inside that
/// lease), as is one made under a lease that has ended since; one queued by the lessee under
/// its lease goes out.
#[tokio::test]
async fn queued_requests_do_not_cross_leases() {
    let t = TestDb::sqlite().await;
    let owner = t.db.create_project("owner").await.unwrap();
    let lessee = t.db.create_project("lessee").await.unwrap();
    let nb = NewBoard { name: "b".into(), code: "c".into(), project: owner.uuid.clone(), ..Default::default() };
    let b = t.db.insert_board(nb).await.unwrap();
    let bus = Bus::in_process();
    let mut agent = bus.agent_deliveries("agent").await.unwrap();
    let c = Conductor::new(t.db.clone(), bus.clone());
    let later = Some(now_ms() + 60_000);
    let queue = |lease: Option<String>| {
        let db = t.db.clone();
        let (project, board) = (owner.uuid.clone(), b.uuid.clone());
        async move {
            db.create_request_under(&project, &board, "DeviceReboot", &json!([]), later, lease.as_deref())
                .await
                .unwrap()
        }
    };
    // Queued by the owner, then another project leases the board.
    let before = queue(None).await;
    c.handle(ConductorMsg::Execute { request: before.uuid.clone() }, false).await.unwrap();
    let lease = t.db.create_lease(&lessee.uuid, "u", std::slice::from_ref(&b.uuid), now_ms() + 60_000).await.unwrap();
    let under = queue(Some(lease.uuid.clone())).await;
    c.handle(ConductorMsg::Execute { request: under.uuid.clone() }, false).await.unwrap();
    t.db.board_online(&b.uuid, "agent", "7", None, &json!({})).await.unwrap();
    c.handle(ConductorMsg::BoardOnline { board: b.uuid.clone() }, false).await.unwrap();
    let status = |uuid: String| {
        let db = t.db.clone();
        async move { db.request(&uuid, None).await.unwrap().unwrap().status }
    };
    assert_eq!(status(before.uuid.clone()).await, RequestStatus::Failed, "ran inside another project's lease");
    let call = tokio::time::timeout(Duration::from_secs(5), agent.recv()).await.unwrap().unwrap().msg;
    assert_eq!(call.request, under.uuid, "the lessee's own request goes out");
    c.handle(answer(&under.uuid, &b.uuid, "SUCCESS", json!("ok")), false).await.unwrap();
    // Made under the lease, delivered after it ended.
    t.db.session_left("7").await.unwrap();
    let stale = queue(Some(lease.uuid.clone())).await;
    c.handle(ConductorMsg::Execute { request: stale.uuid.clone() }, false).await.unwrap();
    assert!(t.db.end_lease(&lease.uuid, "released").await.unwrap());
    t.db.board_online(&b.uuid, "agent", "8", None, &json!({})).await.unwrap();
    c.handle(ConductorMsg::BoardOnline { board: b.uuid.clone() }, false).await.unwrap();
    assert_eq!(status(stale.uuid.clone()).await, RequestStatus::Failed, "ran after its lease ended");
}

/// A request sent at once is checked against leases when the conductor runs it, as a queued
/// one is: one made before another project leased the board (it waited behind a backlog, or
/// in RabbitMQ while no conductor ran), or under a lease that has ended since, fails.
#[tokio::test]
async fn plain_requests_do_not_cross_leases() {
    let Online { t, p, b, mut agent, c } = online().await;
    let other = t.db.create_project("other").await.unwrap();
    let status = |uuid: String| {
        let db = t.db.clone();
        async move { db.request(&uuid, None).await.unwrap().unwrap().status }
    };
    let before = t.db.create_request(&p.uuid, &b.uuid, "DeviceReboot", &json!([]), None).await.unwrap();
    let lease = t.db.create_lease(&other.uuid, "u", std::slice::from_ref(&b.uuid), now_ms() + 60_000).await.unwrap();
    c.handle(ConductorMsg::Execute { request: before.uuid.clone() }, false).await.unwrap();
    assert_eq!(status(before.uuid.clone()).await, RequestStatus::Failed, "ran inside another project's lease");
    let none = json!([]);
    let under = |lease: &str| {
        let (db, p, b, none, lease) = (t.db.clone(), p.uuid.clone(), b.uuid.clone(), none.clone(), lease.to_owned());
        async move { db.create_request_under(&p, &b, "DeviceReboot", &none, None, Some(&lease)).await.unwrap() }
    };
    let ok = under(&lease.uuid).await;
    c.handle(ConductorMsg::Execute { request: ok.uuid.clone() }, false).await.unwrap();
    assert_eq!(agent.recv().await.unwrap().msg.request, ok.uuid, "the lessee's own request goes out");
    let stale = under(&lease.uuid).await;
    assert!(t.db.end_lease(&lease.uuid, "released").await.unwrap());
    c.handle(ConductorMsg::Execute { request: stale.uuid.clone() }, false).await.unwrap();
    assert_eq!(status(stale.uuid.clone()).await, RequestStatus::Failed, "ran after its lease ended");
    assert!(agent.try_recv().is_err());
}

/// At a start with more accepted requests than the conductor's queue holds (the in-process
/// bus: a cloud restarted with a backlog), every one is handled: they were sent to the
/// conductor's own queue before it read it, and the start blocked for ever at the 1,025th.
#[tokio::test]
async fn a_backlog_larger_than_the_queue_does_not_block_the_start() {
    let t = TestDb::sqlite().await;
    let (p, b) = project_and_board(&t).await;
    let n = iotronic::bus::QUEUE_CAPACITY + 8;
    for _ in 0..n {
        t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
    }
    let bus = Bus::in_process();
    // Each request that ends is announced: waited for here, not polled.
    let mut done = bus.completions().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(Conductor::new(t.db.clone(), bus.clone()).run(stop.clone()));
    // The board is offline: each is failed, and then a new one is handled too.
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(60), done.recv()).await.expect("the backlog was not handled").unwrap();
    }
    assert!(t.db.requests_in(RequestStatus::Pending).await.unwrap().is_empty());
    assert_eq!(t.db.requests_in(RequestStatus::Failed).await.unwrap().len(), n);
    let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
    bus.to_conductor(&ConductorMsg::Execute { request: r.uuid.clone() }).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(60), done.recv()).await;
    assert_eq!(next.expect("the conductor does not read its queue").unwrap(), r.uuid);
    assert_eq!(t.db.request(&r.uuid, None).await.unwrap().unwrap().status, RequestStatus::Failed);
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// A lease marked ended whose teardown failed half way (a database or bus error after
/// `end_lease`) is finished by the sweep: its exposures and memberships go, each board is
/// told once. Before, nothing ever looked at an ended lease again.
#[tokio::test]
async fn a_teardown_that_failed_half_way_is_finished_by_the_sweep() {
    let Online { t, p, b, mut agent, c } = online().await;
    let svc = t.db.create_service("ssh", &p.uuid, 22, "TCP", &json!({})).await.unwrap();
    let lease = t.db.create_lease(&p.uuid, "u", std::slice::from_ref(&b.uuid), now_ms() + 60_000).await.unwrap();
    t.db.allocate_exposure(&b.uuid, &svc.uuid, (50001, 50010), Some(&lease.uuid), &[]).await.unwrap();
    let vpn = t.db.create_vpn("v", &p.uuid, "l2", "10.0.0.0/24").await.unwrap();
    t.db.add_vpn_member(&vpn, &b.uuid, None, Some(&lease.uuid)).await.unwrap();
    // Ended, and then the process died before the teardown.
    assert!(t.db.end_lease(&lease.uuid, "released").await.unwrap());
    c.sweep().await.unwrap();
    assert!(t.db.exposures_of_board(&b.uuid).await.unwrap().is_empty());
    assert!(t.db.vpn_members(&vpn.uuid).await.unwrap().is_empty());
    let mut told = Vec::new();
    while let Ok(d) = agent.try_recv() {
        // The cloud's own calls: not counted against the project's share of the agent.
        assert_eq!(d.msg.project, "", "{} counted as the project's", d.msg.procedure);
        told.push(d.msg.procedure);
    }
    told.sort();
    assert_eq!(told, ["ServiceDisable", "VpnLeave"]);
    c.sweep().await.unwrap();
    assert!(agent.try_recv().is_err(), "a finished teardown is not done again");
}

/// Requests that can no longer end by themselves fail: one left PENDING (its message lost)
/// after 15 minutes, one RUNNING (the board answered RUNNING, then restarted) after 2 hours;
/// younger ones, and finished ones, are left alone.
#[tokio::test]
async fn requests_stuck_pending_or_running_fail_in_the_end() {
    let Online { t, p, b, mut agent, c } = online().await;
    let lost = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
    let running = t.db.create_request(&p.uuid, &b.uuid, "DevicePkgOperation", &json!([]), None).await.unwrap();
    c.handle(ConductorMsg::Execute { request: running.uuid.clone() }, false).await.unwrap();
    agent.recv().await.unwrap();
    let result = |r: &str| answer(r, &b.uuid, "RUNNING", json!("RUNNING"));
    c.handle(result(&running.uuid), false).await.unwrap();
    let status = |uuid: String| {
        let db = t.db.clone();
        async move { db.request(&uuid, None).await.unwrap().unwrap().status }
    };
    let minutes = |m: i64| now_ms() + m * 60_000;
    c.sweep_at(minutes(14)).await.unwrap();
    assert_eq!(status(lost.uuid.clone()).await, RequestStatus::Pending, "too young to be lost");
    c.sweep_at(minutes(16)).await.unwrap();
    assert_eq!(status(lost.uuid.clone()).await, RequestStatus::Failed);
    assert_eq!(t.db.results(&lost.uuid).await.unwrap()[0].result, "ERROR");
    assert_eq!(status(running.uuid.clone()).await, RequestStatus::Running, "a package operation takes time");
    c.sweep_at(minutes(121)).await.unwrap();
    assert_eq!(status(running.uuid.clone()).await, RequestStatus::Failed);
    let why = &t.db.results(&running.uuid).await.unwrap()[0].message;
    assert!(why.contains("no result from the board"), "{why}");
    // A late report changes nothing.
    c.handle(result(&running.uuid), false).await.unwrap();
    assert_eq!(status(running.uuid.clone()).await, RequestStatus::Failed);
}

/// In-process, an agent whose queue is full (its calls are waiting to report to this very
/// conductor) makes a request fail at once as overloaded: waiting for room, the conductor
/// and the agent could each wait on the other for ever.
#[tokio::test]
async fn a_full_agent_queue_fails_the_request_instead_of_blocking_the_conductor() {
    let Online { t, p, b, agent: _agent, c } = online().await;
    for _ in 0..iotronic::bus::QUEUE_CAPACITY {
        let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
        c.handle(ConductorMsg::Execute { request: r.uuid }, false).await.unwrap();
    }
    let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
    let handled = c.handle(ConductorMsg::Execute { request: r.uuid.clone() }, false);
    tokio::time::timeout(Duration::from_secs(10), handled).await.expect("the conductor blocked").unwrap();
    assert_eq!(t.db.request(&r.uuid, None).await.unwrap().unwrap().status, RequestStatus::Failed);
    let why = &t.db.results(&r.uuid).await.unwrap()[0].message;
    assert!(why.contains("overloaded"), "{why}");
}

/// Takes the board offline and queues two GPIO writes for it (1, then 0): their uuids.
async fn queue_two_gpio_writes(t: &TestDb, p: &Project, b: &Board, c: &Conductor) -> Vec<String> {
    t.db.session_left("7").await.unwrap();
    let later = Some(now_ms() + 60_000);
    let mut queued = Vec::new();
    for value in [1, 0] {
        let args = json!([{"line": "GPIO17", "value": value}]);
        let r = t.db.create_request(&p.uuid, &b.uuid, "GpioWrite", &args, later).await.unwrap();
        c.handle(ConductorMsg::Execute { request: r.uuid.clone() }, false).await.unwrap();
        queued.push(r.uuid);
    }
    queued
}

/// Queued requests go out in the order they were made, one at a time: the board's answer to
/// one sends the next (sent together at login, the board ran them at once, in any order).
/// Only that answer: the end of another request of the board, or a second login, sent the
/// next while the first still ran; and a request queued while the board is online goes
/// behind the older ones (it was sent at once, ahead of them).
#[tokio::test]
async fn queued_requests_go_out_one_after_the_other() {
    let Online { t, p, b, mut agent, c } = online().await;
    let queued = queue_two_gpio_writes(&t, &p, &b, &c).await;
    t.db.board_online(&b.uuid, "agent", "8", None, &json!({})).await.unwrap();
    c.handle(ConductorMsg::BoardOnline { board: b.uuid.clone() }, false).await.unwrap();
    let first = agent.recv().await.unwrap().msg;
    assert_eq!(first.request, queued[0]);
    assert!(agent.try_recv().is_err(), "the second went out before the first was answered");
    // A user's ping answered, the board's login seen again, a third write queued now.
    let ping = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
    c.handle(ConductorMsg::Execute { request: ping.uuid.clone() }, false).await.unwrap();
    assert_eq!(agent.recv().await.unwrap().msg.request, ping.uuid);
    c.handle(answer(&ping.uuid, &b.uuid, "SUCCESS", json!("pong")), false).await.unwrap();
    let early = agent.try_recv().map(|d| d.msg.request);
    assert!(early.is_err(), "{early:?} went out at the answer to a ping while the first queued one was running");
    c.handle(ConductorMsg::BoardOnline { board: b.uuid.clone() }, false).await.unwrap();
    let args = json!([{"line": "GPIO17", "value": 1}]);
    let third = t.db.create_request(&p.uuid, &b.uuid, "GpioWrite", &args, Some(now_ms() + 60_000)).await.unwrap();
    c.handle(ConductorMsg::Execute { request: third.uuid.clone() }, false).await.unwrap();
    let early = agent.try_recv().map(|d| d.msg.request);
    assert!(early.is_err(), "{early:?} went out while the first queued one was running");
    assert_eq!(t.db.request(&third.uuid, None).await.unwrap().unwrap().status, RequestStatus::Queued);
    c.handle(answer(&first.request, &b.uuid, "SUCCESS", json!("ok")), false).await.unwrap();
    assert_eq!(agent.recv().await.unwrap().msg.request, queued[1]);
    assert!(agent.try_recv().is_err(), "the third went out before the second was answered");
    c.handle(answer(&queued[1], &b.uuid, "SUCCESS", json!("ok")), false).await.unwrap();
    assert_eq!(agent.recv().await.unwrap().msg.request, third.uuid);
}

/// A queued request the board answers RUNNING (it runs on, a package operation for hours)
/// lets the next one go: it holds the queue only until the board has taken it.
#[tokio::test]
async fn a_queued_request_the_board_runs_on_lets_the_next_go() {
    let Online { t, p, b, mut agent, c } = online().await;
    let queued = queue_two_gpio_writes(&t, &p, &b, &c).await;
    t.db.board_online(&b.uuid, "agent", "8", None, &json!({})).await.unwrap();
    c.handle(ConductorMsg::BoardOnline { board: b.uuid.clone() }, false).await.unwrap();
    assert_eq!(agent.recv().await.unwrap().msg.request, queued[0]);
    c.sweep().await.unwrap();
    assert!(agent.try_recv().is_err(), "the second went out before the board took the first");
    c.handle(answer(&queued[0], &b.uuid, "RUNNING", json!("")), false).await.unwrap();
    assert_eq!(agent.try_recv().expect("the queue waited for a request the board runs on").msg.request, queued[1]);
    assert_eq!(t.db.request(&queued[0], None).await.unwrap().unwrap().status, RequestStatus::Running);
}

/// A queued request whose hand-over to the agent fails (its queue full) goes back in the
/// queue, and the delivery stops: the sweep (or the next login) delivers it, first. Before,
/// it failed, and so did every one queued after it, in the same loop.
#[tokio::test]
async fn a_failed_hand_over_keeps_queued_requests_queued() {
    let Online { t, p, b, mut agent, c } = online().await;
    let queued = queue_two_gpio_writes(&t, &p, &b, &c).await;
    t.db.board_online(&b.uuid, "agent", "8", None, &json!({})).await.unwrap();
    for _ in 0..iotronic::bus::QUEUE_CAPACITY {
        let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
        c.handle(ConductorMsg::Execute { request: r.uuid }, false).await.unwrap();
    }
    let handed = c.handle(ConductorMsg::BoardOnline { board: b.uuid.clone() }, false).await;
    for q in &queued {
        let status = t.db.request(q, None).await.unwrap().unwrap().status;
        assert_eq!(status, RequestStatus::Queued, "a queued request was lost to a full agent queue");
    }
    assert!(handed.is_err(), "the failed hand-over was not reported: {handed:?}");
    // The agent catches up; the sweep delivers, the oldest first and alone.
    while agent.try_recv().is_ok() {}
    c.sweep().await.unwrap();
    assert_eq!(agent.try_recv().expect("the sweep did not deliver").msg.request, queued[0]);
    assert!(agent.try_recv().is_err(), "the second went out before the first was answered");
}

/// A queued request whose delivery was cut after it left the queue (the database refused to
/// mark it RUNNING) goes out first at the next delivery, still in order: the next delivery
/// took the next QUEUED one, and the first waited PENDING until the sweep failed it.
#[tokio::test]
async fn a_queued_request_whose_delivery_was_cut_goes_out_first() {
    let Online { t, p, b, mut agent, c } = online().await;
    let queued = queue_two_gpio_writes(&t, &p, &b, &c).await;
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(t.url.expose()).await.unwrap();
    let trigger = format!(
        "CREATE TRIGGER cut BEFORE UPDATE OF status ON requests WHEN NEW.status = 'RUNNING' \
         AND NEW.uuid = '{}' BEGIN SELECT RAISE(ABORT, 'injected'); END",
        queued[0]
    );
    sqlx::query(sqlx::AssertSqlSafe(trigger)).execute(&mut conn).await.unwrap();
    t.db.board_online(&b.uuid, "agent", "8", None, &json!({})).await.unwrap();
    let cut = c.handle(ConductorMsg::BoardOnline { board: b.uuid.clone() }, false).await;
    assert!(cut.is_err(), "the delivery was not cut: {cut:?}");
    sqlx::query("DROP TRIGGER cut").execute(&mut conn).await.unwrap();
    c.handle(ConductorMsg::BoardOnline { board: b.uuid.clone() }, false).await.unwrap();
    assert_eq!(agent.recv().await.unwrap().msg.request, queued[0], "the first went out first");
    assert!(agent.try_recv().is_err(), "the second went out before the first was answered");
}

/// A ServiceEnable request for a new "ssh" service on the port allocated for it: (the
/// service, the request).
async fn enable_request(t: &TestDb, p: &Project, b: &Board) -> (iotronic::db::Service, iotronic::db::Request) {
    let svc = t.db.create_service("ssh", &p.uuid, 22, "TCP", &json!({})).await.unwrap();
    let e = t.db.allocate_exposure(&b.uuid, &svc.uuid, (50001, 50010), None, &[]).await.unwrap();
    let args = json!([{"uuid": svc.uuid, "name": "ssh", "port": 22, "protocol": "TCP"}, e.public_port]);
    let r = t.db.create_request(&p.uuid, &b.uuid, "ServiceEnable", &args, None).await.unwrap();
    (svc, r)
}

/// A connection of the test's own, after it made the database refuse to delete exposures
/// (until `DROP TRIGGER keep` on it): the undo of an allocation fails half way.
async fn keep_exposures(t: &TestDb) -> sqlx::SqliteConnection {
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(t.url.expose()).await.unwrap();
    let trigger = "CREATE TRIGGER keep BEFORE DELETE ON exposed_services BEGIN SELECT RAISE(ABORT, 'injected'); END";
    sqlx::query(trigger).execute(&mut conn).await.unwrap();
    conn
}

/// A ServiceEnable the board refused gives its port back even when that step failed the
/// first time (the request was COMPLETED already): the message tried again finds the request
/// final and undoes the allocation then. It returned at "already final", and the port stayed
/// allocated (and counted in the project's quota) for good.
#[tokio::test]
async fn a_refused_enable_frees_its_port_even_if_the_first_try_failed_half_way() {
    let Online { t, p, b, mut agent, c } = online().await;
    let (svc, r) = enable_request(&t, &p, &b).await;
    c.handle(ConductorMsg::Execute { request: r.uuid.clone() }, false).await.unwrap();
    agent.recv().await.unwrap();
    let mut conn = keep_exposures(&t).await;
    let refused = answer(&r.uuid, &b.uuid, "ERROR", json!("no such port"));
    assert!(c.handle(refused.clone(), false).await.is_err(), "the undo did not fail");
    assert_eq!(t.db.request(&r.uuid, None).await.unwrap().unwrap().status, RequestStatus::Completed);
    sqlx::query("DROP TRIGGER keep").execute(&mut conn).await.unwrap();
    c.handle(refused, false).await.unwrap();
    assert!(t.db.exposure(&b.uuid, &svc.uuid).await.unwrap().is_none(), "the port stayed allocated");
}

/// A ServiceEnable failed by the cloud (its board went offline) gives its port back even when
/// that step failed the first time: the `Execute` tried again finds the request FAILED and
/// undoes the allocation then. It took the request for handled, and the port stayed
/// allocated (and counted in the project's quota) for good.
#[tokio::test]
async fn an_enable_failed_by_the_cloud_frees_its_port_even_if_the_first_try_failed_half_way() {
    let Online { t, p, b, agent: _agent, c } = online().await;
    t.db.session_left("7").await.unwrap();
    let (svc, r) = enable_request(&t, &p, &b).await;
    let mut conn = keep_exposures(&t).await;
    let exec = ConductorMsg::Execute { request: r.uuid.clone() };
    assert!(c.handle(exec.clone(), false).await.is_err(), "the undo did not fail");
    assert_eq!(t.db.request(&r.uuid, None).await.unwrap().unwrap().status, RequestStatus::Failed);
    sqlx::query("DROP TRIGGER keep").execute(&mut conn).await.unwrap();
    c.handle(exec, true).await.unwrap();
    assert!(t.db.exposure(&b.uuid, &svc.uuid).await.unwrap().is_none(), "the port stayed allocated");
}

/// Queued ServiceEnables that expire all give their ports back even when that failed for
/// the first (the database refused): the sweep goes on to the others and tries the failed
/// ones again at its next run. The first error stopped the sweep, and the requests, EXPIRED
/// already, kept their ports for good.
#[tokio::test]
async fn expired_enables_free_their_ports_even_if_the_first_try_failed() {
    let Online { t, p, b, agent: _agent, c } = online().await;
    t.db.session_left("7").await.unwrap();
    let mut services = Vec::new();
    for name in ["ssh", "web"] {
        let svc = t.db.create_service(name, &p.uuid, 22, "TCP", &json!({})).await.unwrap();
        let e = t.db.allocate_exposure(&b.uuid, &svc.uuid, (50001, 50010), None, &[]).await.unwrap();
        let args = json!([{"uuid": svc.uuid, "name": name, "port": 22, "protocol": "TCP"}, e.public_port]);
        let r = t.db.create_request(&p.uuid, &b.uuid, "ServiceEnable", &args, Some(now_ms() - 1)).await.unwrap();
        t.db.transition_request(&r.uuid, &[RequestStatus::Pending], RequestStatus::Queued, None).await.unwrap();
        services.push(svc.uuid);
    }
    let mut conn = keep_exposures(&t).await;
    let _ = c.sweep().await;
    sqlx::query("DROP TRIGGER keep").execute(&mut conn).await.unwrap();
    c.sweep().await.unwrap();
    for s in &services {
        assert!(t.db.exposure(&b.uuid, s).await.unwrap().is_none(), "the port stayed allocated");
    }
}

/// A request the cloud fails is never left FAILED without the result saying why: the two
/// writes are one transaction, so when the second fails the first is undone and the retry
/// does both. The retry found the request FAILED already and wrote nothing, and the caller
/// read a failed request with no reason (or the board's RUNNING).
#[tokio::test]
async fn a_request_failed_by_the_cloud_always_keeps_its_reason() {
    let Online { t, p, b, agent: _agent, c } = online().await;
    t.db.session_left("7").await.unwrap();
    let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(t.url.expose()).await.unwrap();
    let trigger = "CREATE TRIGGER no_reason BEFORE INSERT ON results WHEN NEW.result = 'ERROR' \
                   BEGIN SELECT RAISE(ABORT, 'injected'); END";
    sqlx::query(trigger).execute(&mut conn).await.unwrap();
    let exec = ConductorMsg::Execute { request: r.uuid.clone() };
    assert!(c.handle(exec.clone(), false).await.is_err(), "the result's write did not fail");
    sqlx::query("DROP TRIGGER no_reason").execute(&mut conn).await.unwrap();
    c.handle(exec, true).await.unwrap();
    assert_eq!(t.db.request(&r.uuid, None).await.unwrap().unwrap().status, RequestStatus::Failed);
    let results = t.db.results(&r.uuid).await.unwrap();
    assert!(
        results.iter().any(|x| x.result == "ERROR" && x.message.contains("offline")),
        "no reason kept: {results:?}"
    );
}

/// A board result outside RUNNING/SUCCESS/ERROR/WARNING is refused as invalid, not taken
/// for a database failure: the database's CHECK refused it, the error counted as transient,
/// and the message was tried again for half a minute while every other conductor message
/// waited. The request keeps waiting for a real answer.
#[tokio::test]
async fn an_unknown_board_result_is_refused_not_retried() {
    let Online { t, p, b, mut agent, c } = online().await;
    let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
    c.handle(ConductorMsg::Execute { request: r.uuid.clone() }, false).await.unwrap();
    agent.recv().await.unwrap();
    let bogus = c.handle(answer(&r.uuid, &b.uuid, "BOGUS", json!("x")), false).await;
    assert!(matches!(bogus, Err(Error::Invalid(_))), "{bogus:?}");
    assert_eq!(t.db.request(&r.uuid, None).await.unwrap().unwrap().status, RequestStatus::Running);
    c.handle(answer(&r.uuid, &b.uuid, "SUCCESS", json!("pong")), false).await.unwrap();
    assert_eq!(t.db.request(&r.uuid, None).await.unwrap().unwrap().status, RequestStatus::Completed);
}

/// An `Execute` that fails after marking its request RUNNING (the database refused the next
/// write) is tried again as a redelivery: the call reaches the agent. Tried again as a new
/// message, it found the request RUNNING, took it for handled, and the call never went out
/// (the request sat RUNNING for 2 h).
#[tokio::test]
async fn an_execute_retried_after_a_failure_still_reaches_the_agent() {
    let Online { t, p, b, mut agent, c } = online().await;
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(t.url.expose()).await.unwrap();
    let trigger = "CREATE TRIGGER running_fails BEFORE INSERT ON results WHEN NEW.result = 'RUNNING' \
                   BEGIN SELECT RAISE(ABORT, 'injected'); END";
    sqlx::query(trigger).execute(&mut conn).await.unwrap();
    let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let handled = c.handle_retrying(&ConductorMsg::Execute { request: r.uuid.clone() }, false, &stop).await;
    assert!(matches!(handled, Some(Ok(()))), "{handled:?}");
    let call = agent.try_recv().expect("the call did not reach the agent");
    assert_eq!(call.msg.request, r.uuid);
}

/// A board that logs in between the conductor's look at it and the queueing of a request
/// (its login handled by another conductor, which found nothing queued yet) gets the request
/// at once, not at its next login. The database plays the other conductor: a trigger puts
/// the board online as the request becomes QUEUED.
#[tokio::test]
async fn a_request_queued_as_its_board_logs_in_goes_out() {
    let Online { t, p, b, mut agent, c } = online().await;
    t.db.session_left("7").await.unwrap();
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(t.url.expose()).await.unwrap();
    let trigger = "CREATE TRIGGER login_meanwhile AFTER UPDATE OF status ON requests \
                   WHEN NEW.status = 'QUEUED' BEGIN \
                   UPDATE boards SET status = 'online', agent = 'agent', session_id = '9' \
                   WHERE uuid = NEW.destination_uuid; END";
    sqlx::query(trigger).execute(&mut conn).await.unwrap();
    let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), Some(now_ms() + 60_000)).await.unwrap();
    c.handle(ConductorMsg::Execute { request: r.uuid.clone() }, false).await.unwrap();
    let call = agent.try_recv().expect("the request waits for the next login").msg;
    assert_eq!((call.request.as_str(), call.session.as_str()), (r.uuid.as_str(), "9"));
}

/// A board offline for long gathers at most `Db::MAX_QUEUED_PER_BOARD` commands waiting for
/// it (each may hold a plugin's code, 512 KiB): the next is refused with a 409 (Conflict)
/// until one has gone. Before, there was no cap, and every delivery read all of them.
/// Commands sent at once, and other boards, are not counted.
#[tokio::test]
async fn queued_requests_per_board_are_capped() {
    for t in TestDb::all().await {
        let (p, b) = project_and_board(&t).await;
        let later = Some(now_ms() + 60_000);
        let mut first = None;
        for i in 0..Db::MAX_QUEUED_PER_BOARD {
            let r = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), later).await.unwrap();
            // Both a QUEUED one and a PENDING one made to be queued count.
            if i % 2 == 0 {
                t.db.transition_request(&r.uuid, &[RequestStatus::Pending], RequestStatus::Queued, None).await.unwrap();
            }
            first.get_or_insert(r.uuid);
        }
        match t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), later).await {
            Err(Error::Conflict(why)) => assert!(why.contains("waiting for it already"), "{}: {why}", t.name),
            other => panic!("{}: the cap let one more in: {other:?}", t.name),
        }
        // Not queued, or for another board: not counted.
        t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), None).await.unwrap();
        let nb = NewBoard { name: "b2".into(), code: "c2".into(), project: p.uuid.clone(), ..Default::default() };
        let b2 = t.db.insert_board(nb).await.unwrap();
        t.db.create_request(&p.uuid, &b2.uuid, "DevicePing", &json!([]), later).await.unwrap();
        // One gone (expired), one more fits.
        let gone = first.unwrap();
        assert!(t.db.transition_request(&gone, &[RequestStatus::Queued], RequestStatus::Expired, None).await.unwrap());
        t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), later).await.unwrap();
    }
}

/// Finished requests (and their results) are deleted by the sweep once older than
/// `REQUEST_RETENTION`, a bounded batch at a time; younger ones, unfinished ones and one a
/// pending plugin injection still waits on stay. Before, requests were never deleted.
#[tokio::test]
async fn finished_requests_are_purged_after_their_retention() {
    for t in TestDb::all().await {
        let (p, b) = project_and_board(&t).await;
        let c = Conductor::new(t.db.clone(), Bus::in_process());
        let finish = |to: RequestStatus| {
            let (db, p, b) = (t.db.clone(), p.uuid.clone(), b.uuid.clone());
            async move {
                let r = db.create_request(&p, &b, "DevicePing", &json!([]), None).await.unwrap();
                assert!(db.transition_request(&r.uuid, &[RequestStatus::Pending], to, None).await.unwrap());
                db.set_result(&r.uuid, &b, "ERROR", "x").await.unwrap();
                r.uuid
            }
        };
        let mut done = Vec::new();
        for to in [RequestStatus::Completed, RequestStatus::Failed, RequestStatus::Expired] {
            done.push(finish(to).await);
        }
        // A queued one that waits longer than the retention.
        let far = Some(now_ms() + 2 * REQUEST_RETENTION.as_millis() as i64);
        let queued = t.db.create_request(&p.uuid, &b.uuid, "DevicePing", &json!([]), far).await.unwrap().uuid;
        t.db.transition_request(&queued, &[RequestStatus::Pending], RequestStatus::Queued, None).await.unwrap();
        // A PluginInject answered after the API gave up waiting: the injection learns how it
        // ended from the request when next read.
        let inject = finish(RequestStatus::Completed).await;
        let plugin = Plugin {
            uuid: String::new(),
            name: "blink".into(),
            owner: "o".into(),
            project: p.uuid.clone(),
            public: false,
            code: String::new(),
            callable: true,
            parameters: json!({}),
            extra: json!({}),
            kind: "wasm".into(),
            grants: json!({}),
            code_sha256: String::new(),
            code_size: 0,
            created_at: 0,
            updated_at: 0,
        };
        let plugin = t.db.create_plugin(&plugin).await.unwrap();
        let injection = Injection {
            board: b.uuid.clone(),
            plugin: plugin.uuid,
            onboot: false,
            status: "pending".into(),
            grants: json!({}),
            code_sha256: String::new(),
            request: Some(inject.clone()),
            created_at: 0,
            updated_at: 0,
        };
        t.db.upsert_injection(&injection).await.unwrap();

        let retention = REQUEST_RETENTION.as_millis() as i64;
        c.sweep_at(now_ms() + retention - 120_000).await.unwrap();
        for r in &done {
            assert!(t.db.request(r, None).await.unwrap().is_some(), "{}: purged before its time", t.name);
        }
        // A batch is bounded.
        assert_eq!(t.db.purge_finished_requests(now_ms() + 1, 1).await.unwrap(), 1, "{}", t.name);
        // The sweep purges at most once a minute (of its clock): three minutes later.
        c.sweep_at(now_ms() + retention + 60_000).await.unwrap();
        for r in &done {
            assert!(t.db.request(r, None).await.unwrap().is_none(), "{}: kept past its retention", t.name);
            assert!(t.db.results(r).await.unwrap().is_empty(), "{}: its results stayed", t.name);
        }
        assert_eq!(t.db.request(&queued, None).await.unwrap().unwrap().status, RequestStatus::Queued);
        assert!(t.db.request(&inject, None).await.unwrap().is_some(), "{}: a pending injection's request", t.name);
    }
}

/// A finished PluginInject keeps its code's length, not its code (up to 512 KiB, kept in the
/// plugin itself): finished requests stay for 30 days, and injections repeated by a tenant
/// would fill the database. While it runs the board gets the code; other requests' args stay.
#[tokio::test]
async fn a_finished_injection_keeps_no_plugin_code() {
    let Online { t, p, b, mut agent, c } = online().await;
    let code = "x".repeat(100_000);
    let inject = json!([{"uuid": "p1", "name": "big", "code": code, "callable": true, "kind": "wasm",
                         "grants": {}, "parameters": {}}, false]);
    let r = t.db.create_request(&p.uuid, &b.uuid, "PluginInject", &inject, None).await.unwrap();
    c.handle(ConductorMsg::Execute { request: r.uuid.clone() }, false).await.unwrap();
    let call = agent.recv().await.unwrap().msg;
    assert_eq!(call.args[0]["code"], code.as_str(), "the board gets the code");
    c.handle(answer(&r.uuid, &b.uuid, "SUCCESS", json!("ok")), false).await.unwrap();
    let done = t.db.request(&r.uuid, None).await.unwrap().unwrap();
    assert_eq!(done.status, RequestStatus::Completed);
    assert_eq!(
        done.args,
        json!([{"uuid": "p1", "name": "big", "code_len": 100_000, "callable": true, "kind": "wasm",
                "grants": {}, "parameters": {}}, false])
    );
}

/// Tunnel tokens (valid for days) travel in the arguments of ServiceEnable and VpnJoin; once
/// the request is final (answered, failed or expired) they are gone from the database, and a
/// request's `Debug` never shows its arguments. Before, they stayed in `requests.args`.
#[tokio::test]
async fn a_finished_request_keeps_no_tunnel_token() {
    let Online { t, p, b, mut agent, c } = online().await;
    let enable = json!([{"uuid": "s1", "name": "ssh", "port": 22, "protocol": "TCP",
                         "tunnel_url": "ws://cloud", "tunnel_token": "SECRET-ENABLE"}, 50001]);
    let join = json!([{"vpn": "v1", "address": "10.0.0.2", "tunnel_url": "ws://cloud", "token": "SECRET-JOIN"}]);
    let stored = |uuid: String| {
        let db = t.db.clone();
        async move { db.request(&uuid, None).await.unwrap().unwrap() }
    };

    // Answered by the board.
    let r = t.db.create_request(&p.uuid, &b.uuid, "ServiceEnable", &enable, None).await.unwrap();
    assert!(!format!("{r:?}").contains("SECRET"), "{r:?}");
    c.handle(ConductorMsg::Execute { request: r.uuid.clone() }, false).await.unwrap();
    let call = agent.recv().await.unwrap().msg;
    assert_eq!(call.args[0]["tunnel_token"], "SECRET-ENABLE", "the board gets its token");
    assert_eq!(stored(r.uuid.clone()).await.args, enable, "kept while running");
    c.handle(answer(&r.uuid, &b.uuid, "SUCCESS", json!("ok")), false).await.unwrap();
    let done = stored(r.uuid.clone()).await;
    assert_eq!(done.status, RequestStatus::Completed);
    assert_eq!(
        done.args,
        json!([{"uuid": "s1", "name": "ssh", "port": 22, "protocol": "TCP",
                                  "tunnel_url": "ws://cloud"}, 50001])
    );

    // Failed on its way.
    let r = t.db.create_request(&p.uuid, &b.uuid, "VpnJoin", &join, None).await.unwrap();
    c.handle(ConductorMsg::Execute { request: r.uuid.clone() }, false).await.unwrap();
    agent.recv().await.unwrap();
    let failed = ConductorMsg::Failed { request: r.uuid.clone(), board: b.uuid.clone(), reason: "gone".into() };
    c.handle(failed, false).await.unwrap();
    let done = stored(r.uuid.clone()).await;
    assert_eq!(done.status, RequestStatus::Failed);
    assert!(!done.args.to_string().contains("SECRET"), "{}", done.args);
    assert_eq!(done.args[0]["vpn"], "v1", "the rest stays");

    // Queued for a board that never came back.
    t.db.session_left("7").await.unwrap();
    let r = t.db.create_request(&p.uuid, &b.uuid, "VpnJoin", &join, Some(now_ms() - 1)).await.unwrap();
    t.db.transition_request(&r.uuid, &[RequestStatus::Pending], RequestStatus::Queued, None).await.unwrap();
    c.sweep().await.unwrap();
    let done = stored(r.uuid.clone()).await;
    assert_eq!(done.status, RequestStatus::Expired);
    assert!(!done.args.to_string().contains("SECRET"), "{}", done.args);
}
