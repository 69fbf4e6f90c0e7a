//! Revocation takes effect on live connections: every agent sweeps its own sessions and
//! channels each [`SWEEP_INTERVAL`] and closes those of boards that were revoked, rotated or
//! deleted (through the database, so it works whichever process took the REST call). A
//! revoked board cannot come back: its secret is gone and `connection` refuses it.

use std::time::Duration;

use s4t_wamp::Router;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wstunnel::server::ServerHandle;

use crate::audit;
use crate::db::Db;

/// How often an agent looks for revoked boards among its live connections.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Closes the WAMP sessions of revoked boards on this router until `shutdown`.
pub fn spawn_wamp_guard(db: Db, router: Router, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let live: Vec<String> = router.sessions().into_iter().filter_map(|s| s.board).collect();
            if live.is_empty() {
                continue;
            }
            match db.boards_to_disconnect(&live).await {
                Ok(gone) => {
                    for board in gone {
                        let killed = router.kill_board(&board);
                        for id in &killed {
                            if let Err(e) = db.session_left(&id.to_string()).await {
                                warn!(cause = %e, "cannot record a killed session");
                            }
                        }
                        info!(board = %board, sessions = killed.len(), "revoked board disconnected from WAMP");
                        audit::record(&db, audit::system("board.disconnect", &board, "wamp")).await;
                    }
                }
                Err(e) => warn!(cause = %e, "revocation sweep failed"),
            }
        }
    });
}

/// Closes the tunnel channels (and so the public ports and packet channels) of revoked
/// boards on this tunnel server until `shutdown`.
pub fn spawn_tunnel_guard(db: Db, handle: ServerHandle, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let live = handle.boards();
            if live.is_empty() {
                continue;
            }
            match db.boards_to_disconnect(&live).await {
                Ok(gone) => {
                    for board in gone {
                        let n = handle.close_board(&board);
                        info!(board = %board, channels = n, "revoked board disconnected from the tunnel server");
                        audit::record(&db, audit::system("board.disconnect", &board, "tunnel")).await;
                    }
                }
                Err(e) => warn!(cause = %e, "revocation sweep failed"),
            }
        }
    });
}
