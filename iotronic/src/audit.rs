//! Recording audit entries. Recording never fails the action it records: a failure to write
//! is logged as an error (the database being down fails the action anyway).

use tracing::error;

use crate::db::{Db, NewAudit};

/// Appends `entry` to the audit log.
pub async fn record(db: &Db, entry: NewAudit) {
    if let Err(e) = db.insert_audit(&entry).await {
        error!(cause = %e, action = %entry.action, "cannot write an audit entry");
    }
}

/// Records in the background (for synchronous hooks).
pub fn spawn_record(db: &Db, entry: NewAudit) {
    let db = db.clone();
    tokio::spawn(async move { record(&db, entry).await });
}

/// An entry for something the cloud did by itself, or a board did (`source` says where).
pub fn system(action: &str, target: &str, source: &str) -> NewAudit {
    NewAudit {
        user_name: "iotronic".into(),
        action: action.into(),
        target: target.into(),
        source: source.into(),
        ..NewAudit::default()
    }
}
