//! The agent's main loop: identity (or first-boot enrollment), hardware, then sessions forever:
//! connect, log in, register every procedure, restore tunnels, serve; on any transient failure
//! wait a capped, jittered backoff and start again. Only a permanent error (bad configuration,
//! board refused by the cloud) ends it, with a distinct exit code.

pub mod enroll;
pub mod link;
pub mod session;
pub mod tunnels;
pub mod wamp;

use std::sync::Arc;
use std::time::Duration;

use s4t_shared::backoff::Backoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::hal::{GPIO_EVENT_CAPACITY, Hal};
use crate::plugins::PluginManager;
use crate::rpc::services::{ServiceManager, TunnelOpener};
use crate::rpc::vpn::{PacketOpener, VpnManager};
use crate::rpc::{Context, Lifecycle, NOTIFY_CAPACITY};
use crate::state::{Identity, StateStore};
use link::{Auth, ConnectOptions, Connector};
use session::{Queues, SessionEnd, Timers};

/// How `run` ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT.
    Shutdown,
    /// `DeviceRestartLR` without a restart command: exit with [`crate::EXIT_RESTART`].
    Restart,
}

/// Tells systemd (when it started us with `Type=notify`) that start-up is over.
fn notify_ready(status: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
}

fn backoff(config: &Config) -> Backoff {
    Backoff::new(
        Duration::from_millis(config.timers.backoff_initial_ms),
        Duration::from_secs(config.timers.backoff_max_s),
    )
}

/// Sleeps `d` unless shut down first (then returns false).
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// The stored identity; else the original's; else first-boot enrollment with the configured
/// code (retried on transient errors). A failed enrollment reports READY (`ready` records
/// it): with `Type=notify`, systemd would otherwise hold the boot, then kill the agent and
/// start it again, while the cloud is unreachable.
async fn identity(
    config: &Config,
    store: &StateStore,
    connector: &dyn Connector,
    shutdown: &CancellationToken,
    ready: &mut bool,
) -> Result<Option<Identity>> {
    if let Some(id) = crate::load::identity(config, store)? {
        return Ok(Some(id));
    }
    let (Some(url), Some(code)) = (&config.cloud.url, &config.cloud.code) else { return Err(Error::NotEnrolled) };
    let mut delays = backoff(config);
    loop {
        match enroll::enroll(connector, config, url, code, store).await {
            Ok(id) => return Ok(Some(id)),
            Err(e) if e.exit_code().is_some() => return Err(e),
            Err(e) => tracing::warn!(cause = %e, "first-boot enrollment failed; retrying"),
        }
        if !*ready {
            notify_ready("enrolling");
            *ready = true;
        }
        if !pause(delays.next_delay(), shutdown).await {
            return Ok(None);
        }
    }
}

/// The network clients the agent uses: WAMP sessions, reverse tunnels, VPN packet channels.
pub struct Clients {
    pub wamp: Arc<dyn Connector>,
    pub tunnels: Box<dyn TunnelOpener>,
    pub packets: Box<dyn PacketOpener>,
}

/// Runs the agent until shutdown, a restart request or a permanent error.
pub async fn run(config: Config, shutdown: CancellationToken, clients: Clients) -> Result<Exit> {
    let Clients { wamp: connector, tunnels: opener, packets } = clients;
    let store = StateStore::open(&config.board.state_dir)?;
    let mut ready = false;
    let Some(id) = identity(&config, &store, connector.as_ref(), &shutdown, &mut ready).await? else {
        return Ok(Exit::Shutdown);
    };
    let hal = Hal::from_config(&config.hal);
    hal.start()?;
    let (ntx, nrx) = mpsc::channel(NOTIFY_CAPACITY);
    let (gtx, grx) = mpsc::channel(GPIO_EVENT_CAPACITY);
    let (ltx, lrx) = mpsc::channel(1);
    let services = Arc::new(ServiceManager::new(store.clone(), opener, crate::load::tunnel_url(&id)));
    let vpns = Arc::new(VpnManager::new(store.clone(), packets, crate::load::tunnel_url(&id)));
    let (ttx, trx) = mpsc::channel(crate::plugins::TELEMETRY_CAPACITY);
    let plugin_stop = shutdown.child_token();
    let plugins = Arc::new(PluginManager::new(
        store.clone(),
        config.plugins.clone(),
        hal.clone(),
        id.uuid.clone(),
        ttx,
        plugin_stop.clone(),
    ));
    let ctx = Arc::new(Context {
        board_uuid: id.uuid.clone(),
        hal: hal.clone(),
        device: config.device.clone(),
        notify: ntx,
        gpio_events: gtx,
        lifecycle: ltx,
        services: services.clone(),
        vpns: vpns.clone(),
        plugins: plugins.clone(),
        shutdown: shutdown.child_token(),
        package_operation: Arc::default(),
        power: Default::default(),
    });
    let mut queues = Queues { notify: nrx, gpio: grx, lifecycle: lrx, telemetry: trx, pending: None };
    spawn_onboot(&plugins, &ctx.shutdown);
    let result = sessions(&config, &id, &ctx, &mut queues, connector.as_ref(), &shutdown, ready).await;
    ctx.shutdown.cancel();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    plugins.close_all().await;
    plugin_stop.cancel();
    services.close_all();
    vpns.close_all().await;
    if let Err(e) = hal.stop() {
        tracing::warn!(cause = %e, "hardware teardown incomplete");
    }
    result
}

fn connect_options(config: &Config, id: &Identity) -> ConnectOptions {
    let auth = match &id.credentials {
        Some(c) => Auth::WampCra { authid: c.authid.clone(), secret: c.secret.clone() },
        None => Auth::Anonymous,
    };
    ConnectOptions {
        url: id.url.clone(),
        realm: id.realm.clone(),
        auth,
        ca_fingerprint: id.ca_fingerprint.clone().or_else(|| config.cloud.ca_fingerprint.clone()),
        timeout: Duration::from_secs(config.timers.connect_timeout_s),
    }
}

/// Connect, log in, register, restore, serve; forever, until shutdown, a restart or a permanent
/// error. `ready`: READY was already sent to systemd.
async fn sessions(
    config: &Config,
    id: &Identity,
    ctx: &Arc<Context>,
    queues: &mut Queues,
    connector: &dyn Connector,
    shutdown: &CancellationToken,
    mut ready: bool,
) -> Result<Exit> {
    let timers = Timers {
        call: Duration::from_secs(config.timers.call_timeout_s),
        alive: Duration::from_secs(config.timers.alive_interval_s),
    };
    let mut delays = backoff(config);
    let restorer = Arc::new(Restorer::default());
    // Tunnels do not need the WAMP session: restore them at boot right away.
    restorer.request(ctx);
    loop {
        let attempt = async {
            let link = connector.connect(connect_options(config, id)).await?;
            let done = async {
                session::login(link.as_ref(), id, &timers).await?;
                session::register_all(link.as_ref(), ctx).await?;
                Ok::<_, Error>(())
            }
            .await;
            Ok::<_, Error>((link, done))
        };
        // A restart is taken at once, also while connecting or waiting to reconnect: its
        // sender holds the package lock until then, and no package operation runs meanwhile.
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
            Some(Lifecycle::Restart) = queues.lifecycle.recv() => return Ok(Exit::Restart),
            r = attempt => r,
        };
        let end = match outcome {
            Ok((link, Ok(()))) => {
                tracing::info!(session = link.session_id(), uuid = %id.uuid, "logged in; procedures registered");
                if !ready {
                    notify_ready("online");
                    ready = true;
                }
                // The backoff starts over only once the session has proved healthy (lived an
                // alive interval): one the cloud ends right after login must not be retried
                // at the initial delay, each round a TLS and WAMP login, forever.
                let logged_in = tokio::time::Instant::now();
                // Fresh tokens first, so what the restore re-opens presents them; beside the
                // session, not before it: the renewal waits for any restore still opening
                // tunnels (up to 20 s each when the tunnel server is unreachable), and the
                // session must answer alives and calls meanwhile.
                let renew_then_restore = async {
                    session::renew_tunnel_tokens(link.as_ref(), id, &timers, ctx).await;
                    restorer.request(ctx);
                    std::future::pending::<std::convert::Infallible>().await
                };
                let end = tokio::select! {
                    end = session::serve(link.as_ref(), id, &timers, queues, ctx, shutdown) => end,
                    never = renew_then_restore => match never {},
                };
                link.close().await;
                if logged_in.elapsed() >= timers.alive {
                    delays.reset();
                }
                end
            }
            Ok((link, Err(e))) => {
                link.close().await;
                if e.exit_code().is_some() {
                    return Err(e);
                }
                SessionEnd::Lost(e)
            }
            Err(e) if e.exit_code().is_some() => return Err(e),
            Err(e) => SessionEnd::Lost(e),
        };
        match end {
            SessionEnd::Shutdown => return Ok(Exit::Shutdown),
            SessionEnd::Restart => return Ok(Exit::Restart),
            SessionEnd::Lost(e) => {
                let delay = delays.next_delay();
                tracing::warn!(cause = %e, retry_in = ?delay, "session lost; reconnecting");
                if !ready {
                    notify_ready("retrying");
                    ready = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
                    Some(Lifecycle::Restart) = queues.lifecycle.recv() => return Ok(Exit::Restart),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// `onboot` plugins that were running start again at boot (they need no WAMP session).
fn spawn_onboot(plugins: &Arc<PluginManager>, shutdown: &CancellationToken) {
    let (plugins, shutdown) = (plugins.clone(), shutdown.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            failed = plugins.restore_onboot() => if failed > 0 {
                tracing::warn!(failed, "some onboot plugins did not start");
            }
        }
    });
}

/// Restores services and VPNs on a task of its own, one restore at a time: a request while
/// one runs makes it go round once more when done (however many came meanwhile), so a board
/// that reconnects often does not pile up restores that each wait for the one before. A round
/// that leaves some not restored (the tunnel server unreachable) is followed by another after
/// a capped backoff, until none fails: a session lasts weeks, and waiting for the next login
/// left exposures and VPNs down as long.
#[derive(Default)]
struct Restorer {
    running: std::sync::atomic::AtomicBool,
    again: std::sync::atomic::AtomicBool,
    /// Wakes a task waiting to retry when a request comes (a login), to go round at once.
    wake: tokio::sync::Notify,
}

/// The first and the longest wait before a restore that left some failed goes round again.
const RESTORE_RETRY_FIRST: Duration = Duration::from_secs(5);
const RESTORE_RETRY_MAX: Duration = Duration::from_secs(300);

impl Restorer {
    fn request(self: &Arc<Self>, ctx: &Arc<Context>) {
        use std::sync::atomic::Ordering::SeqCst;
        self.again.store(true, SeqCst);
        self.wake.notify_waiters();
        if self.running.swap(true, SeqCst) {
            return;
        }
        let (me, ctx) = (self.clone(), ctx.clone());
        tokio::spawn(async move {
            let mut delays = Backoff::new(RESTORE_RETRY_FIRST, RESTORE_RETRY_MAX);
            loop {
                let mut failed = 0;
                while me.again.swap(false, SeqCst) {
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return,
                        f = async { ctx.services.restore_all().await + ctx.vpns.restore_all().await } => failed = f,
                    }
                }
                if failed > 0 {
                    let delay = delays.next_delay();
                    tracing::warn!(failed, retry_in = ?delay, "some services or VPNs are not restored yet");
                    // Registered before `again` is read: a request after that wakes it.
                    let woken = me.wake.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    if !me.again.load(SeqCst) {
                        tokio::select! {
                            _ = ctx.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                            _ = woken => {}
                        }
                    }
                    me.again.store(true, SeqCst);
                    continue;
                }
                delays.reset();
                me.running.store(false, SeqCst);
                // A request between the last round and the line above found us running and
                // left it to us: take it, unless its own task already did.
                if !me.again.load(SeqCst) || me.running.swap(true, SeqCst) {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests;
