//! Revocation takes effect on live connections: every agent sweeps its own sessions and
//! channels each [`SWEEP_INTERVAL`] and closes those of boards that were revoked, rotated or
//! deleted (through the database, so it works whichever process took the REST call). A
//! revoked board cannot come back: its secret is gone and `connection` refuses it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use s4t_wamp::Router;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wstunnel::server::ServerHandle;

use crate::audit;
use crate::db::{Cutoff, Db};

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
            let live: Vec<Connection> = router
                .sessions()
                .into_iter()
                .filter_map(|s| Some(Connection { id: s.id, board: s.board?, since: s.joined }))
                .collect();
            for (board, ids) in to_close(&db, &live).await {
                let killed: Vec<u64> = ids.into_iter().filter(|id| router.kill_session(*id)).collect();
                for id in &killed {
                    if let Err(e) = db.session_left(&id.to_string()).await {
                        warn!(cause = %e, "cannot record a killed session");
                    }
                }
                info!(board = %board, sessions = killed.len(), "revoked board disconnected from WAMP");
                audit::record(&db, audit::system("board.disconnect", &board, "wamp")).await;
            }
        }
    });
}

/// A live WAMP session or tunnel channel of a board.
struct Connection {
    id: u64,
    board: String,
    /// When it was admitted as the board's.
    since: SystemTime,
}

/// The connections in `live` to close, by board: all those of a board that was revoked or
/// deleted, and those made before its last revoke or rotate-secret (a board that enrolled
/// again within a sweep is no longer revoked, but what was admitted with the old credential
/// must still go).
async fn to_close(db: &Db, live: &[Connection]) -> Vec<(String, Vec<u64>)> {
    if live.is_empty() {
        return Vec::new();
    }
    let mut boards: Vec<String> = live.iter().map(|c| c.board.clone()).collect();
    boards.sort();
    boards.dedup();
    let cutoffs = match db.connection_cutoffs(&boards).await {
        Ok(c) => c,
        Err(e) => {
            warn!(cause = %e, "revocation sweep failed");
            return Vec::new();
        }
    };
    closing(live, &cutoffs)
}

fn closing(live: &[Connection], cutoffs: &HashMap<String, Cutoff>) -> Vec<(String, Vec<u64>)> {
    let mut out: Vec<(String, Vec<u64>)> = Vec::new();
    for c in live {
        if !may_stay(cutoffs.get(&c.board), c.since) {
            match out.iter_mut().find(|(b, _)| *b == c.board) {
                Some((_, ids)) => ids.push(c.id),
                None => out.push((c.board.clone(), vec![c.id])),
            }
        }
    }
    out
}

/// Whether a connection of a board admitted at `since` may stay, given the board's `cutoff`
/// (None: the board was deleted). `tunnel_tokens` applies the same rule to its caller.
pub fn may_stay(cutoff: Option<&Cutoff>, since: SystemTime) -> bool {
    match cutoff {
        None | Some(Cutoff::Revoked) => false,
        // In the millisecond of the rotation too: no enrollment and login fits in it.
        Some(Cutoff::Since(after)) => millis(since) > *after,
    }
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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
            let live: Vec<Connection> =
                handle.board_channels().into_iter().map(|(id, board, since)| Connection { id, board, since }).collect();
            for (board, ids) in to_close(&db, &live).await {
                let n = ids.into_iter().filter(|id| handle.close_channel(*id)).count();
                info!(board = %board, channels = n, "revoked board disconnected from the tunnel server");
                audit::record(&db, audit::system("board.disconnect", &board, "tunnel")).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A revoked or deleted board loses every connection; one that was rotated (and may have
    /// enrolled again since) loses those made before the rotation only.
    #[test]
    fn connections_made_before_the_last_rotation_go() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let live = [
            Connection { id: 1, board: "rotated".into(), since: at(1_000) },
            Connection { id: 2, board: "rotated".into(), since: at(3_000) },
            Connection { id: 6, board: "rotated".into(), since: at(2_000) },
            Connection { id: 3, board: "revoked".into(), since: at(3_000) },
            Connection { id: 4, board: "deleted".into(), since: at(3_000) },
            Connection { id: 5, board: "fine".into(), since: at(1_000) },
        ];
        let cutoffs = HashMap::from([
            ("rotated".to_owned(), Cutoff::Since(2_000)),
            ("revoked".to_owned(), Cutoff::Revoked),
            ("fine".to_owned(), Cutoff::Since(0)),
        ]);
        let closed = closing(&live, &cutoffs);
        assert_eq!(
            closed,
            vec![("rotated".to_owned(), vec![1, 6]), ("revoked".to_owned(), vec![3]), ("deleted".to_owned(), vec![4])]
        );
    }
}
