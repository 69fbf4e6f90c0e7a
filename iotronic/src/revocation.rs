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

/// Every how many sweeps the tunnel guard also checks the public listeners.
const LISTENER_SWEEP_EVERY: u32 = 5;

/// Closes the tunnel channels (and so the public ports and packet channels) of revoked
/// boards on this tunnel server until `shutdown`, and every [`LISTENER_SWEEP_EVERY`] sweeps
/// the public listeners whose exposure is gone: a service deleted, disabled while its board
/// was unreachable, a lease's teardown, or a board that ignores `ServiceDisable` must not
/// leave a port open (nor held, when the conductor gives it to another board).
pub fn spawn_tunnel_guard(db: Db, handle: ServerHandle, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweeps = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            sweeps = sweeps.wrapping_add(1);
            if sweeps.is_multiple_of(LISTENER_SWEEP_EVERY) {
                close_stale_listeners(&db, &handle).await;
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

async fn close_stale_listeners(db: &Db, handle: &ServerHandle) {
    let listeners: Vec<(String, u16)> = handle.listeners().into_iter().map(|l| (l.board, l.port)).collect();
    if listeners.is_empty() {
        return;
    }
    match db.stale_listeners(&listeners).await {
        Ok(stale) => {
            for port in stale {
                let Some(board) = listeners.iter().find(|(_, p)| *p == port).map(|(b, _)| b.clone()) else { continue };
                if handle.close_listener_of(port, &board) {
                    info!(board = %board, port, "public listener closed: its exposure is gone");
                    let entry = audit::system("tunnel.close", &board, &format!("public port {port}: not exposed"));
                    audit::record(db, entry).await;
                }
            }
        }
        Err(e) => warn!(cause = %e, "listener sweep failed"),
    }
}
