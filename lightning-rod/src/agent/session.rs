//! One WAMP session's life: login (`connection`), registration of every procedure under the
//! session id, fresh tunnel tokens (`tunnel_tokens`), then serving until the session ends:
//! periodic `wamp_alive` and token renewal, RUNNING results to `notify_result`, GPIO edges to
//! `board.<uuid>.gpio`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{FusedFuture, FutureExt};
use s4t_shared::backoff::Backoff;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::enroll::parse_wamp_message;
use super::link::{Handler, Link};
use crate::error::{Error, Result};
use crate::hal::GpioEvent;
use crate::rpc::{Call, Context, Lifecycle, Method, Notification, dispatch};
use crate::state::Identity;

/// Why a session ended (a refusal by the cloud is an `Err` instead).
#[derive(Debug)]
pub enum SessionEnd {
    Shutdown,
    Restart,
    Lost(Error),
}

/// The receivers that outlive sessions: work queued while offline is delivered by the next one.
pub struct Queues {
    pub notify: mpsc::Receiver<Notification>,
    pub gpio: mpsc::Receiver<GpioEvent>,
    pub lifecycle: mpsc::Receiver<Lifecycle>,
    /// Plugin telemetry, published on `board.<uuid>.telemetry`.
    pub telemetry: mpsc::Receiver<crate::plugins::Telemetry>,
    /// A notification not delivered yet; sent before any other, again after a backoff while
    /// the cloud does not take it, or by the next session.
    pub pending: Option<Notification>,
}

pub struct Timers {
    pub call: Duration,
    pub alive: Duration,
}

pub fn procedure_uri(session: u64, board: &str, method: Method) -> String {
    format!("iotronic.{session}.{board}.{}", method.name())
}

async fn call_timed(link: &dyn Link, t: Duration, uri: String, kwargs: Map<String, Value>) -> Result<Value> {
    match tokio::time::timeout(t, link.call(uri.clone(), vec![], kwargs)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Wamp(format!("{uri} did not answer within {t:?}"))),
    }
}

/// `<agent>.stack4things.connection(uuid, session, info)`; an ERROR reply means the cloud does
/// not know this board any more.
pub async fn login(link: &dyn Link, id: &Identity, t: &Timers) -> Result<()> {
    let mut kw = Map::new();
    kw.insert("uuid".into(), json!(id.uuid));
    kw.insert("session".into(), json!(link.session_id()));
    kw.insert(
        "info".into(),
        json!({"lr_version": crate::WIRE_LR_VERSION, "connectivity": crate::rpc::device::connectivity()}),
    );
    let reply = call_timed(link, t.call, format!("{}.stack4things.connection", id.agent), kw).await?;
    let (result, message) = parse_wamp_message(&reply)?;
    if result != "SUCCESS" {
        return Err(Error::Revoked(format!("connection answered {result}: {message}")));
    }
    Ok(())
}

/// Registers every procedure under `iotronic.<session>.<uuid>.`.
pub async fn register_all(link: &dyn Link, ctx: &Arc<Context>) -> Result<()> {
    for method in Method::ALL {
        let shared = ctx.clone();
        let handler: Handler = Arc::new(move |args, _kwargs| {
            let ctx = shared.clone();
            Box::pin(async move {
                let reply = dispatch(&ctx, method, Call::from_positional(args)).await;
                Ok(vec![Value::String(reply.to_wire())])
            })
        });
        link.register(procedure_uri(link.session_id(), &ctx.board_uuid, method), handler).await?;
    }
    Ok(())
}

async fn notify(link: &dyn Link, id: &Identity, t: &Timers, n: &Notification) -> Result<()> {
    let mut kw = Map::new();
    kw.insert("board_uuid".into(), json!(id.uuid));
    kw.insert("wampmessage".into(), json!(n.to_wire()));
    call_timed(link, t.call, format!("{}.stack4things.notify_result", id.agent), kw).await.map(drop)
}

async fn alive(link: &dyn Link, id: &Identity, t: &Timers) -> Result<()> {
    let mut kw = Map::new();
    kw.insert("board_uuid".into(), json!(id.uuid));
    kw.insert("board_name".into(), json!(id.name));
    call_timed(link, t.call, format!("{}.stack4things.wamp_alive", id.agent), kw).await.map(drop)
}

/// The first and the longest wait before a result the cloud did not take is sent again.
const NOTIFY_RETRY_FIRST: Duration = Duration::from_secs(1);
const NOTIFY_RETRY_MAX: Duration = Duration::from_secs(60);

/// How often a logged-in board asks for fresh tunnel tokens (the cloud's last a week).
pub const RENEW_TOKENS_EVERY: Duration = Duration::from_secs(24 * 3600);

/// `<agent>.stack4things.tunnel_tokens(board_uuid)`: fresh tunnel tokens for every exposed
/// service and VPN membership, saved and handed to the live tunnels for their next reconnect.
/// Never fatal: a cloud without the procedure (the original has no tokens) or a failed call
/// leaves the tokens as they are; the next login or period asks again.
pub async fn renew_tunnel_tokens(link: &dyn Link, id: &Identity, t: &Timers, ctx: &Context) {
    match renew(link, id, t, ctx).await {
        Ok((services, vpns, pruned)) => tracing::info!(services, vpns, pruned, "tunnel tokens renewed"),
        Err(e) if e.to_string().contains("no_such_procedure") => {
            tracing::debug!("the cloud does not renew tunnel tokens")
        }
        Err(e) => tracing::warn!(cause = %e, "tunnel tokens not renewed; trying again later"),
    }
}

/// Renews the tokens and, the cloud's answer being the complete list of this board's
/// exposures and memberships, forgets those it no longer has. Returns (services renewed,
/// VPNs renewed, entries forgotten).
async fn renew(link: &dyn Link, id: &Identity, t: &Timers, ctx: &Context) -> Result<(usize, usize, usize)> {
    let (services_before, vpns_before) = (ctx.services.saved_ids()?, ctx.vpns.saved_ids()?);
    let mut kw = Map::new();
    kw.insert("board_uuid".into(), json!(id.uuid));
    let reply = call_timed(link, t.call, format!("{}.stack4things.tunnel_tokens", id.agent), kw).await?;
    let (result, message) = parse_wamp_message(&reply)?;
    if result != "SUCCESS" {
        return Err(Error::Wamp(format!("tunnel_tokens answered {result}: {message}")));
    }
    let list = |key: &str| message.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    let token = |v: &Value| v.get("token").and_then(Value::as_str).map(crate::secret::Secret::new);
    let services: Vec<_> = list("services")
        .iter()
        .filter_map(|v| {
            let uuid = v.get("uuid")?.as_str()?.to_owned();
            let port = u16::try_from(v.get("public_port")?.as_u64()?).ok()?;
            Some((uuid, port, token(v)?))
        })
        .collect();
    let vpns: Vec<_> =
        list("vpns").iter().filter_map(|v| Some((v.get("vpn")?.as_str()?.to_owned(), token(v)?))).collect();
    // Only a whole, well-formed answer is the complete list: anything less prunes nothing.
    let all = |key: &str| message.get(key).and_then(Value::as_array);
    let listed: Option<Vec<(String, u16)>> = all("services").and_then(|l| {
        l.iter()
            .map(|v| Some((v.get("uuid")?.as_str()?.to_owned(), u16::try_from(v.get("public_port")?.as_u64()?).ok()?)))
            .collect()
    });
    let member_of: Option<Vec<String>> =
        all("vpns").and_then(|l| l.iter().map(|v| Some(v.get("vpn")?.as_str()?.to_owned())).collect());
    let pruned = match (listed, member_of) {
        (Some(listed), Some(member_of)) => {
            ctx.services.prune(&services_before, &listed).await? + ctx.vpns.prune(&vpns_before, &member_of).await?
        }
        _ => 0,
    };
    Ok((ctx.services.renew_tokens(&services).await?, ctx.vpns.renew_tokens(&vpns).await?, pruned))
}

/// Delivers the results waiting, one try each, before a restart loses them: the result of an
/// upgrade of the agent itself is queued just before the restart it asks for.
async fn deliver_queued(link: &dyn Link, id: &Identity, t: &Timers, q: &mut Queues) {
    while let Some(n) = q.pending.take().or_else(|| q.notify.try_recv().ok()) {
        if let Err(e) = notify(link, id, t, &n).await {
            tracing::warn!(cause = %e, "result not delivered before the restart");
            return;
        }
    }
}

/// Serves a logged-in, registered session until it ends.
pub async fn serve(
    link: &dyn Link,
    id: &Identity,
    t: &Timers,
    q: &mut Queues,
    ctx: &Context,
    shutdown: &tokio_util::sync::CancellationToken,
) -> SessionEnd {
    // A notification the cloud did not take (it answers `iotronic.error.unavailable` while its
    // bus or database is down) stays pending and is retried here, with a backoff of its own,
    // before any other: ending the session instead made a board with a pending result log in
    // again and again. A transport that closed ends the session through `closed` below.
    let mut notify_delays = Backoff::new(NOTIFY_RETRY_FIRST, NOTIFY_RETRY_MAX);
    let retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(retry);
    let closed = link.closed();
    tokio::pin!(closed);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + t.alive, t.alive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renew_tick = tokio::time::interval_at(tokio::time::Instant::now() + RENEW_TOKENS_EVERY, RENEW_TOKENS_EVERY);
    renew_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The daily renewal runs beside the loop, not in it: it waits for the services' and VPNs'
    // locks, which a restore or a `VpnJoin` opening a tunnel may hold for long, and the
    // session must answer alives and forward results meanwhile.
    let renewal = futures_util::future::Fuse::terminated();
    tokio::pin!(renewal);
    let topic = format!("board.{}.gpio", id.uuid);
    let telemetry_topic = format!("board.{}.telemetry", id.uuid);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            Some(Lifecycle::Restart) = q.lifecycle.recv() => {
                deliver_queued(link, id, t, q).await;
                return SessionEnd::Restart;
            }
            _ = &mut closed => return SessionEnd::Lost(Error::Wamp("the session was closed".into())),
            _ = tick.tick() => {
                if let Err(e) = alive(link, id, t).await {
                    return SessionEnd::Lost(e);
                }
            }
            _ = renew_tick.tick(), if renewal.is_terminated() => {
                renewal.set(renew_tunnel_tokens(link, id, t, ctx).fuse());
            }
            () = &mut renewal => {}
            () = &mut retry, if q.pending.is_some() => {
                let Some(n) = q.pending.take() else { continue };
                if let Err(e) = notify(link, id, t, &n).await {
                    let delay = notify_delays.next_delay();
                    tracing::warn!(cause = %e, retry_in = ?delay, "result not delivered; trying again");
                    retry.as_mut().reset(tokio::time::Instant::now() + delay);
                    q.pending = Some(n);
                } else {
                    notify_delays.reset();
                }
            }
            // One at a time and in order: the next waits in the queue while one is pending.
            Some(n) = q.notify.recv(), if q.pending.is_none() => {
                q.pending = Some(n);
                retry.as_mut().reset(tokio::time::Instant::now());
            }
            Some(ev) = q.gpio.recv() => {
                let payload = serde_json::to_value(&ev).unwrap_or(Value::Null);
                if let Err(e) = link.publish(topic.clone(), vec![payload], Map::new()).await {
                    tracing::warn!(cause = %e, "GPIO event not published");
                }
            }
            Some(t) = q.telemetry.recv() => {
                let payload = json!({"plugin": t.plugin, "name": t.name, "data": t.data});
                if let Err(e) = link.publish(telemetry_topic.clone(), vec![payload], Map::new()).await {
                    tracing::warn!(cause = %e, "plugin telemetry not published");
                }
            }
        }
    }
}
