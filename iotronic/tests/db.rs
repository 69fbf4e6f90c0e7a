//! The database layer against both back-ends: SQLite and the real PostgreSQL server.
//! Concurrent allocations use two independent pools, as two conductor processes would.

mod common;

use common::TestDb;
use iotronic::Error;
use iotronic::db::{Db, NewBoard, Page, PortQuota, RequestStatus, Role, now_ms};
use serde_json::json;

async fn project_and_board(db: &Db, name: &str) -> (String, String) {
    let p = db.create_project(&format!("p-{name}")).await.unwrap();
    let b = db
        .insert_board(NewBoard {
            name: name.into(),
            code: format!("code-{name}"),
            board_type: "generic".into(),
            owner: "owner".into(),
            project: p.uuid.clone(),
            extra: json!({}),
            location: Some(("38.1".into(), "15.5".into(), "10".into())),
            ..Default::default()
        })
        .await
        .unwrap();
    (p.uuid, b.uuid)
}

/// Processes starting together on a fresh SQLite database all open it: the migrations run
/// under a lock of their own (sqlx's does nothing on SQLite, and the loser of the race failed
/// with "table already exists").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_on_a_fresh_sqlite_database_all_succeed() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let url = iotronic::db::DatabaseUrl::sqlite_in(dir.path());
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { Db::open(&url).await })
            })
            .collect();
        for (i, open) in opens.into_iter().enumerate() {
            open.await.unwrap().unwrap_or_else(|e| panic!("round {round}, start {i}: {e}"));
        }
    }
}

#[tokio::test]
async fn migrations_are_idempotent_and_auth_rows_round_trip() {
    for t in TestDb::all().await {
        t.db.migrate().await.unwrap();
        let p = t.db.create_project("alpha").await.unwrap();
        assert!(matches!(t.db.create_project("alpha").await, Err(Error::Conflict(_))), "{}", t.name);
        let u = t.db.create_user("alice", "hash", false).await.unwrap();
        t.db.set_membership(&u.uuid, &p.uuid, Role::Manager).await.unwrap();
        t.db.set_membership(&u.uuid, &p.uuid, Role::User).await.unwrap();
        let m = t.db.memberships(&u.uuid).await.unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].1, Role::User);
        t.db.insert_token("h1", &u.uuid, &p.uuid, now_ms() + 60_000).await.unwrap();
        t.db.insert_token("h2", &u.uuid, &p.uuid, now_ms() - 1).await.unwrap();
        let info = t.db.token("h1").await.unwrap().expect("valid token");
        assert_eq!((info.user_name.as_str(), info.project_name.as_str()), ("alice", "alpha"));
        assert!(t.db.token("h2").await.unwrap().is_none(), "{}: an expired token was accepted", t.name);
        assert!(t.db.token("nope").await.unwrap().is_none());
    }
}

/// Keyset pages cover a list exactly once, in order, whatever the sort key and direction, and
/// even when rows share a sort value (boards created in the same millisecond).
#[tokio::test]
async fn lists_come_in_pages_that_cover_them_exactly_once() {
    for t in TestDb::all().await {
        let db = &t.db;
        let (p, _) = project_and_board(db, "zz-first").await;
        let (_, foreign) = project_and_board(db, "other-project").await;
        for i in 0..6 {
            let nb = NewBoard {
                name: format!("b{}", (i * 7) % 6),
                code: format!("c{i}"),
                project: p.clone(),
                ..Default::default()
            };
            db.insert_board(nb).await.unwrap();
        }
        for (key, desc) in
            [("created_at", false), ("created_at", true), ("name", false), ("name", true), ("uuid", true)]
        {
            let mut all = db.list_boards_page(Some(&p), None, &Page { key, desc, ..Page::first(key) }).await.unwrap();
            assert_eq!(all.len(), 7, "{}", t.name);
            assert!(all.iter().all(|b| b.uuid != foreign), "{}: another project's board", t.name);
            let mut paged = Vec::new();
            let mut page = Page { limit: 3, marker: None, key, desc };
            loop {
                let got = db.list_boards_page(Some(&p), None, &page).await.unwrap();
                assert!(got.len() <= 3);
                paged.extend(got.iter().map(|b| b.uuid.clone()));
                match got.last() {
                    Some(last) if got.len() == 3 => page.marker = Some(last.uuid.clone()),
                    _ => break,
                }
            }
            let whole: Vec<_> = all.iter().map(|b| b.uuid.clone()).collect();
            assert_eq!(paged, whole, "{}: {key} desc={desc}", t.name);
            if key == "name" {
                all.sort_by(|a, b| a.name.cmp(&b.name));
                if desc {
                    all.reverse();
                }
                let names: Vec<_> = all.iter().map(|b| b.name.clone()).collect();
                let got: Vec<_> =
                    db.list_boards_page(Some(&p), None, &Page { key, desc, ..Page::first(key) }).await.unwrap();
                assert_eq!(got.iter().map(|b| b.name.clone()).collect::<Vec<_>>(), names, "{}", t.name);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boards_are_scoped_and_follow_sessions() {
    for t in TestDb::all().await {
        let db = &t.db;
        let (p, b) = project_and_board(db, "board-a").await;
        let other = db.create_project("other").await.unwrap();
        assert!(db.board("board-a", Some(&p)).await.unwrap().is_some());
        assert!(db.board(&b, Some(&other.uuid)).await.unwrap().is_none(), "{}: cross-project read", t.name);
        assert!(db.board("board-a", None).await.unwrap().is_some());
        let dup = NewBoard { name: "board-a".into(), code: "c2".into(), project: p.clone(), ..Default::default() };
        assert!(matches!(db.insert_board(dup).await, Err(Error::Conflict(_))));

        let board = db.board_by_code("code-board-a").await.unwrap().unwrap();
        assert_eq!(board.status, "registered");
        let doc = json!({"iotronic": {}});
        assert!(db.enroll_board(&b, "code-board-a", "agent-1", &doc, Some(("salt", "key")), true).await.unwrap());
        let board = db.board_by_uuid(&b).await.unwrap().unwrap();
        assert_eq!((board.status.as_str(), board.code.as_deref()), ("offline", None));
        assert!(db.board_online(&b, "agent-1", "s1", Some("0.5.0"), &json!({"iface": "eth0"})).await.unwrap());
        assert_eq!(db.board_by_uuid(&b).await.unwrap().unwrap().status, "online");
        assert_eq!(db.list_boards(Some(&p), Some("online"), None).await.unwrap().len(), 1);
        let left = db.session_left("s1").await.unwrap().unwrap();
        assert_eq!(left.uuid, b);
        assert_eq!(db.board_by_uuid(&b).await.unwrap().unwrap().status, "offline");
        assert!(db.session_left("s1").await.unwrap().is_none());

        db.board_online(&b, "agent-1", "s2", None, &json!({})).await.unwrap();
        assert_eq!(db.reconcile_sessions("agent-1", |s| s == "s2").await.unwrap(), 0);
        // The board logs in again while the cloud reconciles (between reading it and updating
        // it): its new session stands.
        let relogin = || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(db.board_online(&b, "agent-1", "s3", None, &json!({})))
            })
            .unwrap();
            false
        };
        assert_eq!(db.reconcile_sessions("agent-1", |_| relogin()).await.unwrap(), 0, "{}", t.name);
        let board = db.board_by_uuid(&b).await.unwrap().unwrap();
        assert_eq!((board.status.as_str(), board.session.as_deref()), ("online", Some("s3")), "{}", t.name);
        assert_eq!(db.reconcile_sessions("agent-1", |_| false).await.unwrap(), 1);
        assert_eq!(db.board_by_uuid(&b).await.unwrap().unwrap().status, "offline");
    }
}

#[tokio::test]
async fn concurrent_conductors_never_share_a_public_port() {
    for t in TestDb::all().await {
        let (p, _) = project_and_board(&t.db, "ports").await;
        let second = t.reopen().await;
        // Ten boards, one service each, a pool of exactly ten ports, two "conductors" racing.
        let svc = t.db.create_service("ssh", &p, 22, "TCP", &json!({})).await.unwrap();
        let mut boards = Vec::new();
        for i in 0..10 {
            let nb =
                NewBoard { name: format!("pb{i}"), code: format!("pc{i}"), project: p.clone(), ..Default::default() };
            boards.push(t.db.insert_board(nb).await.unwrap().uuid);
        }
        let mut tasks = Vec::new();
        for (i, b) in boards.iter().enumerate() {
            let db = if i % 2 == 0 { t.db.clone() } else { second.clone() };
            let (b, s) = (b.clone(), svc.uuid.clone());
            tasks.push(tokio::spawn(async move { db.allocate_exposure(&b, &s, (50001, 50010), None, &[]).await }));
        }
        let mut ports = Vec::new();
        for task in tasks {
            ports.push(task.await.unwrap().unwrap().public_port);
        }
        ports.sort();
        ports.dedup();
        assert_eq!(ports, (50001..=50010).collect::<Vec<_>>(), "{}", t.name);
        // The pool is exhausted; a board already exposed is a conflict.
        let nb =
            NewBoard { name: "pb-extra".into(), code: "pc-extra".into(), project: p.clone(), ..Default::default() };
        let extra = t.db.insert_board(nb).await.unwrap();
        assert!(matches!(
            t.db.allocate_exposure(&extra.uuid, &svc.uuid, (50001, 50010), None, &[]).await,
            Err(Error::Unavailable(_))
        ));
        assert!(matches!(
            t.db.allocate_exposure(&boards[0], &svc.uuid, (50001, 50010), None, &[]).await,
            Err(Error::Conflict(_))
        ));
        assert!(t.db.delete_exposure(&boards[0], &svc.uuid).await.unwrap());
        assert_eq!(t.db.count_exposures().await.unwrap(), 9);
    }
}

/// Concurrent enables of one project (two conductors) never take it past its quota of public
/// ports: counted and inserted apart, all of them counted below the quota, then all inserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocations_never_exceed_the_project_quota() {
    for t in TestDb::all().await {
        let (p, first) = project_and_board(&t.db, "quota").await;
        let second = t.reopen().await;
        let svc = t.db.create_service("ssh", &p, 22, "TCP", &json!({})).await.unwrap();
        let mut boards = vec![first];
        for i in 0..15 {
            let nb =
                NewBoard { name: format!("qb{i}"), code: format!("qc{i}"), project: p.clone(), ..Default::default() };
            boards.push(t.db.insert_board(nb).await.unwrap().uuid);
        }
        const QUOTA: i64 = 3;
        let mut tasks = Vec::new();
        for (i, b) in boards.iter().enumerate() {
            let db = if i % 2 == 0 { t.db.clone() } else { second.clone() };
            let (b, s, p) = (b.clone(), svc.uuid.clone(), p.clone());
            tasks.push(tokio::spawn(async move {
                let refusal = |held| Error::Conflict(format!("over quota: {held} held"));
                let quota = PortQuota { project: &p, max: QUOTA, refusal: &refusal };
                db.allocate_exposure_within(&b, &s, (50001, 50100), None, &[], Some(quota)).await
            }));
        }
        let mut granted = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(e) => granted.push(e.board),
                Err(Error::Conflict(m)) => assert_eq!(m, format!("over quota: {QUOTA} held"), "{}", t.name),
                Err(e) => panic!("{}: {e:?}", t.name),
            }
        }
        assert_eq!(granted.len() as i64, QUOTA, "{}", t.name);
        assert_eq!(t.db.exposures_held_by(&p).await.unwrap(), QUOTA, "{}", t.name);
        // A port freed can be taken again, once.
        assert!(t.db.delete_exposure(&granted[0], &svc.uuid).await.unwrap());
        let idle: Vec<_> = boards.iter().filter(|b| !granted.contains(b)).collect();
        let refusal = |held| Error::Conflict(format!("over quota: {held} held"));
        let quota = || Some(PortQuota { project: &p, max: QUOTA, refusal: &refusal });
        let db = &t.db;
        db.allocate_exposure_within(idle[0], &svc.uuid, (50001, 50100), None, &[], quota()).await.unwrap();
        let again = db.allocate_exposure_within(idle[1], &svc.uuid, (50001, 50100), None, &[], quota()).await;
        assert!(matches!(again, Err(Error::Conflict(_))), "{}", t.name);
    }
}

/// Concurrent upserts of one membership, or of one agent (two processes), all succeed: a
/// delete and an insert raced and the loser failed on the primary key (a 500).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_upserts_all_succeed() {
    for t in TestDb::all().await {
        let p = t.db.create_project("upserts").await.unwrap();
        let u = t.db.create_user("bob", "hash", false).await.unwrap();
        let second = t.reopen().await;
        let mut tasks = Vec::new();
        for i in 0..16 {
            let db = if i % 2 == 0 { t.db.clone() } else { second.clone() };
            let (user, project) = (u.uuid.clone(), p.uuid.clone());
            let role = if i % 3 == 0 { Role::Manager } else { Role::User };
            tasks.push(tokio::spawn(async move {
                db.set_membership(&user, &project, role).await?;
                db.upsert_agent("agent-1", "wamp", &format!("wss://cloud/{i}"), i % 2 == 0, true).await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap_or_else(|e| panic!("{}: {e:?}", t.name));
        }
        assert_eq!(t.db.memberships(&u.uuid).await.unwrap().len(), 1, "{}", t.name);
        assert_eq!(t.db.agents("wamp").await.unwrap().len(), 1, "{}", t.name);
        // The last write wins, whole.
        t.db.set_membership(&u.uuid, &p.uuid, Role::Admin).await.unwrap();
        assert_eq!(t.db.memberships(&u.uuid).await.unwrap()[0].1, Role::Admin, "{}", t.name);
        t.db.upsert_agent("agent-1", "wamp", "wss://cloud/last", false, false).await.unwrap();
        let a = t.db.agents("wamp").await.unwrap().remove(0);
        assert_eq!((a.url.as_str(), a.online, a.ragent), ("wss://cloud/last", false, false), "{}", t.name);
    }
}

/// Updating a service deleted meanwhile is a 404, not the 409 of a port change refused
/// while the service is exposed.
#[tokio::test]
async fn updating_a_deleted_service_is_not_found() {
    use iotronic::db::ServiceUpdate;
    for t in TestDb::all().await {
        let (p, b) = project_and_board(&t.db, "svc-upd").await;
        let exposed = t.db.create_service("ssh", &p, 22, "TCP", &json!({})).await.unwrap();
        t.db.allocate_exposure(&b, &exposed.uuid, (50001, 50010), None, &[]).await.unwrap();
        let port = |port| ServiceUpdate { port: Some(port), ..Default::default() };
        assert!(matches!(t.db.update_service(&exposed.uuid, port(2222)).await, Err(Error::Conflict(_))), "{}", t.name);
        let gone = t.db.create_service("http", &p, 80, "TCP", &json!({})).await.unwrap();
        t.db.delete_service(&gone.uuid).await.unwrap();
        assert!(matches!(t.db.update_service(&gone.uuid, port(8080)).await, Err(Error::NotFound(_))), "{}", t.name);
        let name = ServiceUpdate { name: Some("web".into()), ..Default::default() };
        assert!(matches!(t.db.update_service(&gone.uuid, name).await, Err(Error::NotFound(_))), "{}", t.name);
    }
}

#[tokio::test]
async fn concurrent_leases_on_one_board_have_one_winner() {
    for t in TestDb::all().await {
        let (p, b) = project_and_board(&t.db, "leased").await;
        let second = t.reopen().await;
        let until = now_ms() + 60_000;
        let (a, bb) = (t.db.clone(), second.clone());
        let (pa, pb, b1, b2) = (p.clone(), p.clone(), vec![b.clone()], vec![b.clone()]);
        let r1 = tokio::spawn(async move { a.create_lease(&pa, "u1", &b1, until).await });
        let r2 = tokio::spawn(async move { bb.create_lease(&pb, "u2", &b2, until).await });
        let (r1, r2) = (r1.await.unwrap(), r2.await.unwrap());
        let (won, lost) = match (r1, r2) {
            (Ok(l), Err(e)) | (Err(e), Ok(l)) => (l, e),
            other => panic!("{}: expected one winner, got {other:?}", t.name),
        };
        match lost {
            Error::LeaseConflict { lease, board, .. } => assert_eq!((lease, board), (won.uuid.clone(), b.clone())),
            e => panic!("{}: {e:?}", t.name),
        }
        assert_eq!(t.db.active_lease_of_board(&b).await.unwrap().unwrap().uuid, won.uuid);
        assert!(t.db.end_lease(&won.uuid, "released").await.unwrap());
        assert!(!t.db.end_lease(&won.uuid, "released").await.unwrap());
        assert!(t.db.active_lease_of_board(&b).await.unwrap().is_none());
        // Freed: it can be booked again; an expired one is due.
        let l2 = t.db.create_lease(&p, "u1", std::slice::from_ref(&b), now_ms() - 1).await.unwrap();
        assert_eq!(t.db.due_leases().await.unwrap().iter().map(|l| l.uuid.clone()).collect::<Vec<_>>(), vec![l2.uuid]);
    }
}

/// An exposure or membership is deleted as it was read (its port or address, its lease): one
/// made since under the board's next lease stays. A lease torn down twice at once (release and
/// sweep) deleted by the key alone and could take the next lease's exposure with it.
#[tokio::test]
async fn deletes_take_only_what_was_read() {
    for t in TestDb::all().await {
        let (p, b) = project_and_board(&t.db, "as-read").await;
        let svc = t.db.create_service("ssh", &p, 22, "TCP", &json!({})).await.unwrap();
        let l1 = t.db.create_lease(&p, "u", std::slice::from_ref(&b), now_ms() + 60_000).await.unwrap();
        let read = t.db.allocate_exposure(&b, &svc.uuid, (50001, 50010), Some(&l1.uuid), &[]).await.unwrap();
        let vpn = t.db.create_vpn("net", &p, "l2", "10.9.1.0/24").await.unwrap();
        let member = t.db.add_vpn_member(&vpn, &b, None, Some(&l1.uuid)).await.unwrap();
        // The first teardown deletes them; the board's next lease makes them again.
        assert!(t.db.delete_exposure_as_read(&read).await.unwrap());
        assert!(t.db.remove_vpn_member_as_read(&member).await.unwrap());
        assert!(t.db.end_lease(&l1.uuid, "released").await.unwrap());
        let l2 = t.db.create_lease(&p, "u", std::slice::from_ref(&b), now_ms() + 60_000).await.unwrap();
        t.db.allocate_exposure(&b, &svc.uuid, (50001, 50010), Some(&l2.uuid), &[]).await.unwrap();
        t.db.add_vpn_member(&vpn, &b, None, Some(&l2.uuid)).await.unwrap();
        // The second teardown of the first lease, with what it read then, takes nothing.
        assert!(!t.db.delete_exposure_as_read(&read).await.unwrap(), "{}", t.name);
        assert!(!t.db.remove_vpn_member_as_read(&member).await.unwrap(), "{}", t.name);
        assert_eq!(t.db.exposure(&b, &svc.uuid).await.unwrap().unwrap().lease.as_deref(), Some(l2.uuid.as_str()));
        assert_eq!(t.db.vpn_member(&vpn.uuid, &b).await.unwrap().unwrap().lease.as_deref(), Some(l2.uuid.as_str()));
    }
}

#[tokio::test]
async fn vpn_addresses_are_unique_under_concurrency() {
    for t in TestDb::all().await {
        let (p, _) = project_and_board(&t.db, "vpn0").await;
        let second = t.reopen().await;
        let vpn = t.db.create_vpn("net", &p, "l2", "10.9.0.77/29").await.unwrap();
        assert_eq!(vpn.cidr, "10.9.0.72/29");
        let mut boards = Vec::new();
        for i in 0..5 {
            let nb =
                NewBoard { name: format!("vb{i}"), code: format!("vc{i}"), project: p.clone(), ..Default::default() };
            boards.push(t.db.insert_board(nb).await.unwrap().uuid);
        }
        let mut tasks = Vec::new();
        for (i, b) in boards.iter().enumerate() {
            let db = if i % 2 == 0 { t.db.clone() } else { second.clone() };
            let (b, v) = (b.clone(), vpn.clone());
            tasks.push(tokio::spawn(async move { db.add_vpn_member(&v, &b, None, None).await }));
        }
        let mut addrs = Vec::new();
        for task in tasks {
            addrs.push(task.await.unwrap().unwrap().address);
        }
        addrs.sort();
        assert_eq!(addrs, ["10.9.0.74", "10.9.0.75", "10.9.0.76", "10.9.0.77", "10.9.0.78"], "{}", t.name);
        let nb = NewBoard { name: "vb-x".into(), code: "vc-x".into(), project: p.clone(), ..Default::default() };
        let x = t.db.insert_board(nb).await.unwrap();
        assert!(matches!(t.db.add_vpn_member(&vpn, &x.uuid, None, None).await, Err(Error::Unavailable(_))));
        assert!(matches!(t.db.add_vpn_member(&vpn, &x.uuid, Some("10.9.0.99"), None).await, Err(Error::Invalid(_))));
        let holder = t.db.vpn_members(&vpn.uuid).await.unwrap().into_iter().find(|m| m.address == "10.9.0.74").unwrap();
        assert!(matches!(t.db.add_vpn_member(&vpn, &x.uuid, Some("10.9.0.74"), None).await, Err(Error::Conflict(_))));
        assert!(t.db.remove_vpn_member(&vpn.uuid, &holder.board).await.unwrap());
        let m = t.db.add_vpn_member(&vpn, &x.uuid, Some("10.9.0.74"), None).await.unwrap();
        assert_eq!(m.address, "10.9.0.74");
    }
}

#[tokio::test]
async fn requests_move_by_compare_and_set_and_queued_ones_expire() {
    for t in TestDb::all().await {
        let (p, b) = project_and_board(&t.db, "req").await;
        let r = t.db.create_request(&p, &b, "DevicePing", &json!([{}]), None).await.unwrap();
        assert_eq!(r.status, RequestStatus::Pending);
        assert!(
            t.db.transition_request(&r.uuid, &[RequestStatus::Pending], RequestStatus::Running, Some("a"))
                .await
                .unwrap()
        );
        assert!(
            !t.db.transition_request(&r.uuid, &[RequestStatus::Pending], RequestStatus::Running, None).await.unwrap()
        );
        t.db.set_result(&r.uuid, &b, "RUNNING", "").await.unwrap();
        t.db.set_result(&r.uuid, &b, "SUCCESS", "pong").await.unwrap();
        let res = t.db.results(&r.uuid).await.unwrap();
        assert_eq!((res.len(), res[0].result.as_str(), res[0].message.as_str()), (1, "SUCCESS", "pong"));

        let q1 = t.db.create_request(&p, &b, "DevicePing", &json!([]), Some(now_ms() + 60_000)).await.unwrap();
        let q2 = t.db.create_request(&p, &b, "DevicePing", &json!([]), Some(now_ms() - 1)).await.unwrap();
        for q in [&q1, &q2] {
            t.db.transition_request(&q.uuid, &[RequestStatus::Pending], RequestStatus::Queued, None).await.unwrap();
        }
        let queued: Vec<_> = t.db.queued_for_board(&b).await.unwrap().into_iter().map(|r| r.uuid).collect();
        assert_eq!(queued, vec![q1.uuid.clone()], "{}", t.name);
        let expired = t.db.expire_queued().await.unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(t.db.request(&q2.uuid, None).await.unwrap().unwrap().status, RequestStatus::Expired);
        assert!(t.db.request(&q1.uuid, Some("another-project")).await.unwrap().is_none());
    }
}

/// A lookup by uuid finds the object with that uuid even when objects of other projects (seen
/// by an administrator's unscoped lookup) are named like it: a decoy named after a victim's
/// uuid must not be what an administrator acting on the victim reaches. Eight decoys, so that
/// some sort before the victim by uuid (the order the lookups used to take).
#[tokio::test]
async fn a_uuid_finds_its_object_before_ones_named_like_it() {
    for t in TestDb::all().await {
        let db = &t.db;
        let e = json!({});
        let (victim_p, victim_b) = project_and_board(db, "victim").await;
        let s = db.create_service("ssh", &victim_p, 22, "TCP", &e).await.unwrap();
        let f = db.create_fleet("f", &victim_p, "", &e).await.unwrap();
        let v = db.create_vpn("v", &victim_p, "l2", "10.77.0.0/24").await.unwrap();
        for i in 0..8 {
            let (attacker_p, _) = project_and_board(db, &format!("attacker-{i}")).await;
            db.create_service(&s.uuid, &attacker_p, 22, "TCP", &e).await.unwrap();
            db.create_fleet(&f.uuid, &attacker_p, "", &e).await.unwrap();
            db.create_vpn(&v.uuid, &attacker_p, "l2", &format!("10.78.{i}.0/24")).await.unwrap();
        }
        // Board and project names are global: one decoy each.
        let decoy = NewBoard {
            name: victim_b.clone(),
            code: "code-decoy".into(),
            project: victim_p.clone(),
            ..Default::default()
        };
        db.insert_board(decoy).await.unwrap();
        db.create_project(&victim_p).await.unwrap();
        let who = t.name;
        assert_eq!(db.service(&s.uuid, None).await.unwrap().unwrap().uuid, s.uuid, "{who}");
        assert_eq!(db.fleet(&f.uuid, None).await.unwrap().unwrap().uuid, f.uuid, "{who}");
        assert_eq!(db.vpn(&v.uuid, None).await.unwrap().unwrap().uuid, v.uuid, "{who}");
        assert_eq!(db.board(&victim_b, None).await.unwrap().unwrap().uuid, victim_b, "{who}");
        assert_eq!(db.project(&victim_p).await.unwrap().unwrap().uuid, victim_p, "{who}");
    }
}

/// Processes starting together on PostgreSQL all install the audit log's trigger without
/// error (its check-then-create raced: duplicate_function or duplicate_object failed
/// `Db::open`). Replayed many times on one database, the trigger dropped before each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_all_protect_the_audit_log_on_postgres() {
    let t = TestDb::postgres().await;
    let mut dbs = Vec::new();
    for _ in 0..8 {
        dbs.push(Db::connect(&t.url).await.unwrap());
    }
    // A row for the trigger to refuse to change.
    dbs[0].insert_audit(&iotronic::db::NewAudit { action: "x".into(), ..Default::default() }).await.unwrap();
    let raw = sqlx::AnyPool::connect(t.url.expose()).await.unwrap();
    for round in 0..100 {
        sqlx::raw_sql("DROP TRIGGER audit_no_change ON audit; DROP FUNCTION audit_append_only()")
            .execute(&raw)
            .await
            .unwrap();
        let results = futures_util::future::join_all(dbs.iter().map(|db| db.protect_audit())).await;
        for r in results {
            assert!(r.is_ok(), "round {round}: {r:?}");
        }
        let r = sqlx::query("UPDATE audit SET action = 'nothing'").execute(&raw).await;
        assert!(r.is_err(), "round {round}: the audit log is not protected");
    }
    raw.close().await;
    for db in dbs {
        db.close().await;
    }
}

/// Requests and audit entries page exactly once and in order, scoped to a project, a board or
/// both, in both directions, when many share a millisecond: each filter and the page start are
/// in the query only when given (a range of an index, no longer `($1 = '' OR …)`).
#[tokio::test]
async fn requests_and_audit_entries_page_exactly_by_whatever_scope() {
    for t in TestDb::all().await {
        let db = &t.db;
        sqlx::any::install_default_drivers();
        let mut raw = <sqlx::AnyConnection as sqlx::Connection>::connect(t.url.expose()).await.unwrap();
        let (p, b) = project_and_board(db, "req-a").await;
        let (q, c) = project_and_board(db, "req-b").await;
        let b2 = db
            .insert_board(NewBoard {
                name: "req-a2".into(),
                code: "code-a2".into(),
                project: p.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .uuid;
        let mut made = Vec::new();
        for i in 0..14i64 {
            let (project, board) = [(&p, &b), (&p, &b2), (&q, &c)][(i % 3) as usize];
            let r = db.create_request(project, board, "DevicePing", &json!([]), None).await.unwrap();
            let at = 1000 + (i % 4) * 1000; // four milliseconds, shared
            sqlx::query("UPDATE requests SET created_at = $1 WHERE uuid = $2")
                .bind(at)
                .bind(&r.uuid)
                .execute(&mut raw)
                .await
                .unwrap();
            made.push((at, r.uuid, project.clone(), board.clone()));
        }
        for (project, board) in [(Some(&p), None), (Some(&p), Some(&b)), (None, Some(&b2)), (None, None)] {
            for desc in [false, true] {
                let mut want: Vec<_> = made
                    .iter()
                    .filter(|m| project.is_none_or(|p| *p == m.2) && board.is_none_or(|b| *b == m.3))
                    .map(|m| (m.0, m.1.clone()))
                    .collect();
                want.sort();
                if desc {
                    want.reverse();
                }
                let want: Vec<_> = want.into_iter().map(|w| w.1).collect();
                let (project, board) = (project.map(String::as_str), board.map(String::as_str));
                let first = Page { desc, ..Page::first("created_at") };
                let whole = db.list_requests_page(project, board, &first).await.unwrap();
                let whole: Vec<_> = whole.into_iter().map(|r| r.uuid).collect();
                assert_eq!(whole, want, "{}: {project:?} {board:?} desc={desc}", t.name);
                let (mut page, mut paged) = (Page { limit: 2, ..first }, Vec::new());
                loop {
                    let got = db.list_requests_page(project, board, &page).await.unwrap();
                    paged.extend(got.iter().map(|r| r.uuid.clone()));
                    match got.last() {
                        Some(last) if got.len() == 2 => page.marker = Some(last.uuid.clone()),
                        _ => break,
                    }
                }
                assert_eq!(paged, want, "{}: paged, {project:?} {board:?} desc={desc}", t.name);
            }
        }
        // Audit entries of two projects, three to a millisecond.
        for i in 0..12 {
            sqlx::query(
                "INSERT INTO audit (id, at, user_uuid, user_name, project_uuid, action, target, source, status, \
                 detail) VALUES ($1, $2, '', '', $3, $4, '', '', 200, '')",
            )
            .bind(format!("id-{i:02}"))
            .bind(5000 + (i / 3) * 10)
            .bind(if i % 2 == 0 { "pa" } else { "pb" })
            .bind(if i % 4 < 2 { "tunnel.open" } else { "auth.login" })
            .execute(&mut raw)
            .await
            .unwrap();
        }
        for (project, action, before, want) in [
            (Some("pa"), "", 0, vec![10, 8, 6, 4, 2, 0]),
            (Some("pb"), "tunnel.", 0, vec![9, 5, 1]),
            (None, "", 5030, vec![8, 7, 6, 5, 4, 3, 2, 1, 0]),
            (Some("pa"), "auth.", 5020, vec![2]),
        ] {
            let want: Vec<_> = want.into_iter().map(|i| format!("id-{i:02}")).collect();
            let mut a = iotronic::db::AuditQuery {
                project: project.map(str::to_owned),
                action: action.into(),
                before,
                limit: 2,
                ..Default::default()
            };
            let mut seen = Vec::new();
            loop {
                let page = db.list_audit(&a).await.unwrap();
                let Some(last) = page.last() else { break };
                a.marker = Some(last.id.clone());
                seen.extend(page.into_iter().map(|e| e.id));
            }
            assert_eq!(seen, want, "{}: {project:?} {action:?} before {before}", t.name);
        }
        let a = iotronic::db::AuditQuery {
            project: Some("pb".into()),
            marker: Some("id-00".into()),
            limit: 2,
            ..Default::default()
        };
        assert!(matches!(db.list_audit(&a).await, Err(Error::NotFound(_))), "{}: another project's marker", t.name);
    }
}
