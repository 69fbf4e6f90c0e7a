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
            db.enroll_board(uuid, "agent-1", &json!({"iotronic": {}}), Some(("salt$1000$32", "key")), true)
                .await
                .unwrap();
        }
        // An anonymous (legacy) enrollment consumes nothing and records nothing.
        db.enroll_board(&uuids[2], "agent-1", &json!({"iotronic": {}}), None, false).await.unwrap();
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
        db.enroll_board(&uuids[0], "agent-1", &json!({"iotronic": {}}), Some(("salt$1000$32", "key2")), true)
            .await
            .unwrap();
        let found = db.board_by_enroll_code(&hash("CODE-a2"), hour_ago).await.unwrap().unwrap();
        assert_eq!(found.uuid, uuids[0], "{}", t.name);
        assert!(db.board_by_enroll_code(&hash("CODE-a"), hour_ago).await.unwrap().is_none(), "{}", t.name);
    }
}
