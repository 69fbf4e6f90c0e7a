//! A lane joining a board channel: it presents the key its channel's `Lanes` gave, then
//! carries the streams the channel opens on it until it or the channel dies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use s4t_shared::tunnel::frame::{Frame, code};
use s4t_shared::tunnel::ws::{Message, Role};

use super::ServerConfig;
use super::channel::finish;
use super::registry::{Registry, Unproved};
use crate::error::Error;
use crate::io::{self, Outbound, WsReader};
use crate::mux::{Lane, Mux, read_lane};
use crate::stats::Counters;
use crate::transport::Split;

/// Runs a lane from just after the upgrade until it closes.
pub(crate) async fn serve(
    cfg: Arc<ServerConfig>,
    reg: Arc<Registry>,
    (rd, wr, sock): Split,
    leftover: BytesMut,
    peer: SocketAddr,
    unproved: Option<Unproved>,
) {
    let (out, w) = io::outbound_on(wr, false, sock);
    let mut writer = tokio::spawn(io::write_loop(w));
    let proved = Arc::new(AtomicBool::new(false));
    let mut reader =
        WsReader::new(rd, Role::Server, leftover, true).unproved(cfg.limits.max_unproved_message, proved.clone());
    let (mux, lane) = match join(&cfg, &reg, &mut reader, &out).await {
        Ok(joined) => joined,
        Err((code, reason)) => {
            tracing::warn!(%peer, code, %reason, "lane refused");
            Counters::add(&reg.counters.refused, 1);
            finish(&out, &mut writer, code, &reason).await;
            return;
        }
    };
    drop(unproved);
    proved.store(true, Ordering::Release);
    tracing::debug!(%peer, "lane joined");
    Counters::add(&reg.counters.lanes_joined, 1);
    let pinger = tokio::spawn(io::ping_loop(out.clone(), cfg.limits.ping_interval));
    let unexpected = |f: Frame| Err(Error::Protocol(format!("unexpected frame on a lane: {f:?}")));
    let (code, reason) = tokio::select! {
        r = read_lane(&mux, &lane, &mut reader, cfg.limits.idle_timeout, unexpected) => match r {
            Ok(()) | Err(Error::Closed) => (code::NORMAL, String::new()),
            Err(e) => {
                tracing::warn!(%peer, cause = %e, "lane closed");
                (code::PROTOCOL, e.to_string())
            }
        },
        () = retire_when_idle(&mux, &lane, cfg.limits.lane_idle) => {
            (code::NORMAL, "idle: the channel has no streams".to_owned())
        }
    };
    pinger.abort();
    mux.drop_lane(&lane);
    Counters::add(&reg.counters.lanes_left, 1);
    finish(&out, &mut writer, code, &reason).await;
}

/// Returns once the lane is retired: its channel had no stream for a while.
async fn retire_when_idle(mux: &Mux, lane: &Arc<Lane>, every: std::time::Duration) {
    let mut seen = mux.opened();
    loop {
        tokio::time::sleep(every).await;
        if mux.retire_if_idle(lane, &mut seen) {
            return;
        }
    }
}

/// Waits for `Lane` and joins the channel whose key it presents.
async fn join(
    cfg: &ServerConfig,
    reg: &Registry,
    reader: &mut WsReader,
    out: &Outbound,
) -> Result<(Arc<Mux>, Arc<Lane>), (u16, String)> {
    let msg = tokio::time::timeout(cfg.limits.handshake_timeout, reader.next())
        .await
        .map_err(|_| (code::PROTOCOL, "no Lane frame from the client".to_owned()))?
        .map_err(|e| (code::PROTOCOL, e.to_string()))?;
    let Some(Message::Binary(b)) = msg else {
        return Err((code::PROTOCOL, "expected a Lane frame".into()));
    };
    let key = match Frame::decode(&b) {
        Ok(Frame::Lane { key }) => key,
        Ok(other) => return Err((code::PROTOCOL, format!("expected Lane, got {other:?}"))),
        Err(e) => return Err((code::PROTOCOL, e.to_string())),
    };
    let mux = reg.lane_door(&key).ok_or((code::UNAUTHORIZED, "no channel has this lane key".to_owned()))?;
    let max = cfg.limits.max_lanes_per_channel;
    let lane = mux.add_lane(out.clone(), max).ok_or((code::LIMIT, format!("the channel has {max} lanes already")))?;
    Ok((mux, lane))
}
