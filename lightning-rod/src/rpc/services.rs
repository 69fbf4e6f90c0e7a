//! `Service*` procedures: reverse tunnels from a public port of the cloud to a local TCP port,
//! opened through a [`TunnelOpener`] inside the agent (no child process), persisted in
//! `services.json` and restored on boot and after every reconnect.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::args::{Params, bad, kind};
use super::{Call, Context, Method, Outcome, Reply, message};
use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::state::{ExposedService, SERVICES_FILE, Services, StateStore};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a tunnel needs: the server, the public port it listens on, the local port it reaches.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelSpec {
    pub server_url: String,
    pub public_port: u16,
    pub local_port: u16,
    pub token: Option<Secret>,
}

/// A live reverse tunnel; dropping it closes the public listener.
pub trait Tunnel: Send + Sync {
    /// False once the tunnel ended for good (its client gave up or was refused).
    fn is_alive(&self) -> bool;
    /// The public port the server listens on (the requested one, or the one it assigned).
    fn public_port(&self) -> u16;
    /// Presents `token` from now on when the listener is asked for again (after a
    /// reconnect); the open listener stays. False if the tunnel cannot take it.
    fn renew(&self, token: &Secret) -> bool {
        let _ = token;
        false
    }
}

/// Opens reverse tunnels. The agent's implementation uses the `wstunnel` client library.
pub trait TunnelOpener: Send + Sync + 'static {
    fn open(&self, spec: TunnelSpec) -> BoxFuture<'_, Result<Box<dyn Tunnel>>>;
}

/// Refuses every tunnel: for agents built or run without a tunnel client.
pub struct NoTunnels;

impl TunnelOpener for NoTunnels {
    fn open(&self, spec: TunnelSpec) -> BoxFuture<'_, Result<Box<dyn Tunnel>>> {
        Box::pin(async move {
            Err(Error::Tunnel(format!("no tunnel client in this agent (public port {})", spec.public_port)))
        })
    }
}

pub struct ServiceManager {
    store: StateStore,
    opener: Box<dyn TunnelOpener>,
    /// Tunnel server when the service dict names none: from the identity, or the original's
    /// rule (the WAMP host, port 8080).
    default_url: String,
    live: Mutex<HashMap<String, Box<dyn Tunnel>>>,
    /// Serializes changes so two calls never interleave a load-modify-save of services.json.
    edit: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ServiceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceManager").field("default_url", &self.default_url).finish_non_exhaustive()
    }
}

impl ServiceManager {
    pub fn new(store: StateStore, opener: Box<dyn TunnelOpener>, default_url: String) -> ServiceManager {
        ServiceManager {
            store,
            opener,
            default_url,
            live: Mutex::new(HashMap::new()),
            edit: tokio::sync::Mutex::new(()),
        }
    }

    fn saved(&self) -> Result<Services> {
        Ok(self.store.load::<Services>(SERVICES_FILE)?.unwrap_or_default())
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Box<dyn Tunnel>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the tunnel and records the exposure; replaces an existing one for the service.
    /// Returns the public port (the server's choice when `svc.public_port` is 0).
    pub async fn enable(&self, uuid: &str, mut svc: ExposedService) -> Result<u16> {
        let _guard = self.edit.lock().await;
        self.live().remove(uuid);
        let tunnel = self.opener.open(self.spec(&svc)).await?;
        svc.public_port = tunnel.public_port();
        let port = svc.public_port;
        let mut saved = self.saved()?;
        saved.insert(uuid.to_owned(), svc);
        self.store.save_async(SERVICES_FILE, &saved).await?;
        self.live().insert(uuid.to_owned(), tunnel);
        Ok(port)
    }

    /// Closes and forgets; `Ok(false)` when the service was not exposed.
    pub async fn disable(&self, uuid: &str) -> Result<bool> {
        let _guard = self.edit.lock().await;
        let was_live = self.live().remove(uuid).is_some();
        let mut saved = self.saved()?;
        let was_saved = saved.remove(uuid).is_some();
        if was_saved {
            self.store.save_async(SERVICES_FILE, &saved).await?;
        }
        Ok(was_live || was_saved)
    }

    /// Reopens every saved exposure whose tunnel is not alive, all at once (one that gets no
    /// answer takes the open timeout, 20 s; one after the other, a board with
    /// many would keep a ServiceEnable waiting for the edit lock that many times as long);
    /// returns how many failed (each is logged and retried at the next restore).
    pub async fn restore_all(&self) -> usize {
        let _guard = self.edit.lock().await;
        let saved = match self.saved() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(cause = %e, "cannot read the exposed services");
                return 1;
            }
        };
        let dead: Vec<(String, ExposedService)> =
            saved.into_iter().filter(|(uuid, _)| !self.live().get(uuid).is_some_and(|t| t.is_alive())).collect();
        let opened = futures_util::future::join_all(dead.into_iter().map(|(uuid, svc)| async move {
            let tunnel = self.opener.open(self.spec(&svc)).await;
            (uuid, svc, tunnel)
        }))
        .await;
        let mut failed = 0;
        for (uuid, svc, tunnel) in opened {
            match tunnel {
                Ok(t) => {
                    tracing::info!(service = %svc.name, public_port = svc.public_port, "service restored");
                    self.live().insert(uuid, t);
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(service = %svc.name, cause = %e, "service not restored yet");
                }
            }
        }
        failed
    }

    /// Takes fresh tokens from the cloud (service uuid, public port, token): each replaces the
    /// saved one of that exposure and the one its live tunnel presents at its next
    /// reconnect. Tokens for another port (the cloud moved the service) or an unknown service
    /// are ignored. Returns how many exposures took one.
    pub async fn renew_tokens(&self, renewed: &[(String, u16, Secret)]) -> Result<usize> {
        let _guard = self.edit.lock().await;
        let mut saved = self.saved()?;
        let mut took = 0;
        for (uuid, port, token) in renewed {
            let Some(svc) = saved.get_mut(uuid).filter(|s| s.public_port == *port) else { continue };
            svc.token = Some(token.clone());
            if let Some(t) = self.live().get(uuid) {
                t.renew(token);
            }
            took += 1;
        }
        if took > 0 {
            self.store.save_async(SERVICES_FILE, &saved).await?;
        }
        Ok(took)
    }

    /// The services exposed now (saved), by uuid.
    pub fn saved_ids(&self) -> Result<Vec<String>> {
        Ok(self.saved()?.into_keys().collect())
    }

    /// Forgets the exposures of `known_before` (saved before the cloud was asked) that the
    /// cloud's complete list `listed` (service uuid, public port) no longer has, and closes
    /// their tunnels: a service deleted or disabled while this board could not be told (or
    /// whose ServiceEnable failed after the board had opened it) must not be re-opened at
    /// every boot, nor keep forwarding a port the cloud may give to another service. An
    /// exposure saved since the question was asked is kept (the answer may predate it).
    pub async fn prune(&self, known_before: &[String], listed: &[(String, u16)]) -> Result<usize> {
        let _guard = self.edit.lock().await;
        let mut saved = self.saved()?;
        let gone: Vec<String> = saved
            .iter()
            .filter(|(uuid, svc)| {
                known_before.contains(uuid) && !listed.iter().any(|(u, p)| u == *uuid && *p == svc.public_port)
            })
            .map(|(uuid, _)| uuid.clone())
            .collect();
        for uuid in &gone {
            self.live().remove(uuid);
            if let Some(svc) = saved.remove(uuid) {
                tracing::warn!(service = %svc.name, public_port = svc.public_port, "exposure the cloud no longer has: closed");
            }
        }
        if !gone.is_empty() {
            self.store.save_async(SERVICES_FILE, &saved).await?;
        }
        Ok(gone.len())
    }

    /// Closes every tunnel (at exit); the saved exposures stay for the next start.
    pub fn close_all(&self) {
        self.live().clear();
    }

    pub fn status(&self) -> Result<Value> {
        let saved = self.saved()?;
        let live = self.live();
        let list: Vec<Value> = saved
            .iter()
            .map(|(uuid, s)| {
                json!({"uuid": uuid, "name": s.name, "local_port": s.local_port, "public_port": s.public_port,
                       "active": live.get(uuid).is_some_and(|t| t.is_alive())})
            })
            .collect();
        Ok(json!({ "services": list }))
    }

    fn spec(&self, svc: &ExposedService) -> TunnelSpec {
        TunnelSpec {
            server_url: svc.tunnel_url.clone().unwrap_or_else(|| self.default_url.clone()),
            public_port: svc.public_port,
            local_port: svc.local_port,
            token: svc.token.clone(),
        }
    }
}

/// The service dict (S4T-REFERENCE §11.5: `uuid, name, port`, plus our `tunnel_url` and
/// `tunnel_token`) and, for enable/restore, the public port.
fn parse_service(call: &Call, with_port: bool) -> Result<(String, ExposedService)> {
    let p = Params::at(&call.args, 0, "service", true)?;
    let uuid = p.str("uuid")?.to_owned();
    let name = p.opt_str("name")?.unwrap_or(&uuid).to_owned();
    let local_port = if with_port { p.int("port", 1..=65535)? as u16 } else { 0 };
    let tunnel_url = p.opt_str("tunnel_url")?.map(str::to_owned);
    if let Some(u) = &tunnel_url {
        crate::config::validate_ws_url(u, "service.tunnel_url").map_err(|e| bad(e.to_string()))?;
    }
    let token = p.opt_str("tunnel_token")?.map(Secret::new);
    let public_port = if with_port {
        match call.args.get(1) {
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= 65535)
                .ok_or_else(|| bad(format!("public_port must be a port number (0: any), got {} {v}", kind(v))))?
                as u16,
            None => return Err(bad("public_port (second argument) is missing".into())),
        }
    } else {
        0
    };
    Ok((uuid, ExposedService { name, local_port, public_port, tunnel_url, token }))
}

/// Runs a change of exposures or VPN memberships in a task of its own (its error, if the task
/// fails, made by `error`): a call dropped half way (its WAMP session lost, or the router's
/// interrupt after the cloud's timeout) would otherwise leave it so, an old tunnel closed and
/// the new one opened but neither recorded nor held, its port refused to every later enable.
pub(super) async fn detached<T: Send + 'static>(
    change: impl Future<Output = Result<T>> + Send + 'static,
    error: fn(String) -> Error,
) -> Result<T> {
    tokio::spawn(change).await.map_err(|e| error(format!("the change did not complete: {e}")))?
}

pub(super) async fn call(ctx: &Arc<Context>, method: Method, call: &Call) -> Result<Reply> {
    let services = ctx.services.clone();
    match method {
        Method::ServiceEnable | Method::ServiceRestore => {
            let (uuid, svc) = parse_service(call, true)?;
            let name = svc.name.clone();
            let public_port = detached(async move { services.enable(&uuid, svc).await }, Error::Tunnel).await?;
            message(json!(format!("service {name} exposed on public port {public_port}")))
        }
        Method::ServiceDisable => {
            let (uuid, _) = parse_service(call, false)?;
            let id = uuid.clone();
            if detached(async move { services.disable(&id).await }, Error::Tunnel).await? {
                message(json!(format!("service {uuid} disabled")))
            } else {
                Ok(Reply {
                    message: json!(format!("service {uuid} was not exposed")),
                    result: Outcome::Warning,
                    req_id: None,
                })
            }
        }
        Method::ServicesStatus => message(services.status()?),
        _ => Err(bad(format!("{} is not a service procedure", method.name()))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::sync::Notify;

    use super::super::tests::context;
    use super::super::vpn::{NoPackets, VpnManager};
    use super::super::{Call, dispatch};
    use super::*;
    use crate::config::DeviceConfig;

    /// Opens a tunnel once released, telling when an open has begun.
    #[derive(Clone, Default)]
    struct HeldOpener {
        entered: Arc<Notify>,
        release: Arc<Notify>,
    }

    struct Open(u16);

    impl Tunnel for Open {
        fn is_alive(&self) -> bool {
            true
        }
        fn public_port(&self) -> u16 {
            self.0
        }
    }

    impl TunnelOpener for HeldOpener {
        fn open(&self, spec: TunnelSpec) -> BoxFuture<'_, Result<Box<dyn Tunnel>>> {
            Box::pin(async move {
                self.entered.notify_one();
                self.release.notified().await;
                Ok(Box::new(Open(spec.public_port)) as Box<dyn Tunnel>)
            })
        }
    }

    /// A `ServiceEnable` whose call is dropped while its tunnel opens (the session lost, or
    /// the cloud's timeout) still completes: the exposure is recorded and held. Cut there, the
    /// board had closed the old tunnel and recorded nothing, and the client kept asking the
    /// server for a port nothing held.
    #[tokio::test]
    async fn a_service_enable_whose_call_is_dropped_still_completes() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let opener = HeldOpener::default();
        let services = ServiceManager::new(store.clone(), Box::new(opener.clone()), "ws://cloud:8080/".into());
        let vpns = VpnManager::new(store.clone(), Box::new(NoPackets), String::new());
        let (ctx, _queues) = context(store, DeviceConfig::default(), services, vpns);
        let svc = json!({"uuid": "s1", "name": "ssh", "port": 22, "tunnel_token": "t"});
        let args = vec![json!({"uuid": "r"}), svc, json!(50022)];
        let enable = dispatch(&ctx, Method::ServiceEnable, Call::from_positional(args));
        let returned = AtomicBool::new(false);
        tokio::select! {
            _ = enable => returned.store(true, Ordering::SeqCst),
            () = opener.entered.notified() => {} // the call is dropped here, mid-open
        }
        assert!(!returned.load(Ordering::SeqCst), "the enable returned before its tunnel opened");
        opener.release.notify_one();
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let status = ctx.services.status().unwrap();
                if status["services"][0]["active"] == json!(true) {
                    return status;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the dropped enable never completed");
        assert_eq!(status["services"][0]["public_port"], json!(50022), "{status}");
    }
}
