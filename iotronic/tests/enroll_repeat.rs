//! The database side of a repeated enrollment (docs/protocols.md, "Enrollment and login"), on
//! both back-ends: an authenticated enrollment records the hash of the code it consumed and
//! when; the board is found by it within the window; revoke and rotate-secret forget it.

mod common;

use common::TestDb;
use iotronic::db::{NewBoard, now_ms};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumed_code_finds_its_board_until_revoke_or_rotation() {
    for t in TestDb::all().await {
        let db = &t.db;
        let p = db.create_project("p").await.unwrap();
        let mut uuids = Vec::new();
        for name in ["a", "b", "legacy"] {
            let nb = NewBoard {
                name: name.into(),
                code: format!("CODE-{name}"),
                board_type: "generic".into(),
                project: p.uuid.clone(),
                extra: json!({}),
                location: Some(("38.1".into(), "15.5".into(), "10".into())),
                ..Default::default()
            };
            uuids.push(db.insert_board(nb).await.unwrap().uuid);
        }
        let hash = iotronic::auth::token_hash;
        let hour_ago = now_ms() - 3_600_000;
        assert!(db.board_by_enroll_code(&hash("CODE-a"), hour_ago).await.unwrap().is_none(), "{}", t.name);
        for uuid in &uuids[..2] {
            let code = db.board_by_uuid(uuid).await.unwrap().unwrap().code.unwrap();
            let doc = json!({"iotronic": {}});
            assert!(db.enroll_board(uuid, &code, "agent-1", &doc, Some(("salt$1000$32", "key")), true).await.unwrap());
        }
        // An anonymous (legacy) enrollment consumes nothing and records nothing.
        let doc = json!({"iotronic": {}});
        assert!(db.enroll_board(&uuids[2], "CODE-legacy", "agent-1", &doc, None, false).await.unwrap());
        assert!(db.board_by_enroll_code(&hash("CODE-legacy"), hour_ago).await.unwrap().is_none(), "{}", t.name);

        let found = db.board_by_enroll_code(&hash("CODE-a"), hour_ago).await.unwrap().unwrap();
        assert_eq!((found.uuid.as_str(), found.code.as_deref()), (uuids[0].as_str(), None), "{}", t.name);
        assert!(db.board_by_enroll_code(&hash("CODE-a"), now_ms() + 1).await.unwrap().is_none(), "{}", t.name);
        assert!(db.board_by_enroll_code(&hash("CODE-x"), hour_ago).await.unwrap().is_none(), "{}", t.name);

        assert!(db.rotate_board(&uuids[0], "CODE-a2", now_ms() + 60_000).await.unwrap());
        assert!(db.board_by_enroll_code(&hash("CODE-a"), hour_ago).await.unwrap().is_none(), "{}", t.name);
        assert!(db.revoke_board(&uuids[1]).await.unwrap());
        assert!(db.board_by_enroll_code(&hash("CODE-b"), hour_ago).await.unwrap().is_none(), "{}", t.name);
        // Enrolled again with the new code: that one is recorded.
        let key2 = Some(("salt$1000$32", "key2"));
        assert!(db.enroll_board(&uuids[0], "CODE-a2", "agent-1", &doc, key2, true).await.unwrap());
        let found = db.board_by_enroll_code(&hash("CODE-a2"), hour_ago).await.unwrap().unwrap();
        assert_eq!(found.uuid, uuids[0], "{}", t.name);
        assert!(db.board_by_enroll_code(&hash("CODE-a"), hour_ago).await.unwrap().is_none(), "{}", t.name);
    }
}

async fn new_board(db: &iotronic::db::Db, project: &str, name: &str) -> String {
    let nb = NewBoard {
        name: name.into(),
        code: format!("CODE-{name}"),
        board_type: "generic".into(),
        project: project.into(),
        extra: json!({}),
        ..Default::default()
    };
    db.insert_board(nb).await.unwrap().uuid
}

/// A revoke or a rotate-secret that lands between the lookup of a board by its code and the
/// enrollment stands: the enrollment with the old code writes nothing. (It used to clear the
/// revocation and wipe the new code, and give whoever holds a leaked code a secret.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_or_rotation_after_the_lookup_stands() {
    for t in TestDb::all().await {
        let (db, who) = (&t.db, t.name);
        let p = db.create_project("p").await.unwrap();
        let doc = json!({"iotronic": {}});
        let thief = Some(("salt$1000$32", "thief"));
        let hour_ago = now_ms() - 3_600_000;
        let hash = iotronic::auth::token_hash;

        let rotated = new_board(db, &p.uuid, "rot").await;
        assert!(db.board_by_code("CODE-rot").await.unwrap().is_some());
        assert!(db.rotate_board(&rotated, "CODE-rot2", now_ms() + 60_000).await.unwrap());
        assert!(!db.enroll_board(&rotated, "CODE-rot", "agent-1", &doc, thief, true).await.unwrap(), "{who}");
        let b = db.board_by_uuid(&rotated).await.unwrap().unwrap();
        assert_eq!((b.code.as_deref(), b.secret_key.as_deref()), (Some("CODE-rot2"), None), "{who}");
        assert_eq!((b.status.as_str(), b.agent.as_deref()), ("registered", None), "{who}");
        assert!(db.board_revoked_at(&rotated).await.unwrap().is_some(), "{who}: the rotation was undone");
        assert!(db.board_by_enroll_code(&hash("CODE-rot"), hour_ago).await.unwrap().is_none(), "{who}");
        // The new code enrolls the board (and ends the revocation rotate-secret began).
        assert!(db.enroll_board(&rotated, "CODE-rot2", "agent-1", &doc, Some(("s", "k")), true).await.unwrap());
        assert_eq!(db.board_revoked_at(&rotated).await.unwrap(), None, "{who}");

        let revoked = new_board(db, &p.uuid, "rev").await;
        assert!(db.board_by_code("CODE-rev").await.unwrap().is_some());
        assert!(db.revoke_board(&revoked).await.unwrap());
        assert!(!db.enroll_board(&revoked, "CODE-rev", "agent-1", &doc, thief, true).await.unwrap(), "{who}");
        assert!(!db.enroll_board(&revoked, "CODE-rev", "agent-1", &doc, None, false).await.unwrap(), "{who}");
        let b = db.board_by_uuid(&revoked).await.unwrap().unwrap();
        assert_eq!((b.secret_key.as_deref(), b.agent.as_deref(), b.status.as_str()), (None, None, "registered"));
        assert!(db.board_revoked_at(&revoked).await.unwrap().is_some(), "{who}: the revocation was undone");
    }
}

/// Two enrollments with one code, from two processes: exactly one enrolls the board, and the
/// board holds the winner's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_enrollments_with_one_code_have_one_winner() {
    for t in TestDb::all().await {
        let p = t.db.create_project("p").await.unwrap();
        let second = t.reopen().await;
        for round in 0..4 {
            let uuid = new_board(&t.db, &p.uuid, &format!("race{round}")).await;
            let code = format!("CODE-race{round}");
            let mut tasks = Vec::new();
            for (db, key) in [(t.db.clone(), "key-1"), (second.clone(), "key-2")] {
                let (uuid, code) = (uuid.clone(), code.clone());
                tasks.push(tokio::spawn(async move {
                    let doc = json!({"iotronic": {}});
                    let won = db.enroll_board(&uuid, &code, "agent-1", &doc, Some(("salt", key)), true).await.unwrap();
                    won.then_some(key)
                }));
            }
            let mut winners = Vec::new();
            for task in tasks {
                winners.extend(task.await.unwrap());
            }
            assert_eq!(winners.len(), 1, "{}: {winners:?}", t.name);
            let b = t.db.board_by_uuid(&uuid).await.unwrap().unwrap();
            assert_eq!((b.secret_key.as_deref(), b.code), (Some(winners[0]), None), "{}", t.name);
        }
    }
}
