//! `VpnJoin` / `VpnLeave`: overlay interfaces ([`crate::overlay`]) on a packet channel of the
//! tunnel, opened through a [`PacketOpener`], persisted in `vpns.json` and restored on boot and
//! after every reconnect.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::args::{Params, bad};
use super::services::BoxFuture;
use super::{Call, Context, Method, Outcome, Reply, message};
use crate::error::{Error, Result};
use crate::overlay::{DEFAULT_MTU, Layer, Overlay, OverlaySpec, PacketPipe, valid_ifname};
use crate::secret::Secret;
use crate::state::{StateStore, VPNS_FILE};

/// Opens a packet channel for a VPN on the tunnel server. The agent's implementation uses the
/// `wstunnel` client library.
pub trait PacketOpener: Send + Sync + 'static {
    fn open(&self, url: String, vpn: String, token: Option<Secret>) -> BoxFuture<'_, Result<PacketPipe>>;
}

/// Refuses every packet channel: for agents run without a tunnel client.
pub struct NoPackets;

impl PacketOpener for NoPackets {
    fn open(&self, _url: String, vpn: String, _token: Option<Secret>) -> BoxFuture<'_, Result<PacketPipe>> {
        Box::pin(async move { Err(Error::Tunnel(format!("no packet channel client in this agent (vpn {vpn})"))) })
    }
}

/// One VPN membership as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Membership {
    pub layer: Layer,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub interface: String,
    #[serde(default)]
    pub tunnel_url: Option<String>,
    #[serde(default)]
    pub token: Option<Secret>,
}

pub struct VpnManager {
    store: StateStore,
    opener: Box<dyn PacketOpener>,
    default_url: String,
    live: Mutex<HashMap<String, Overlay>>,
    edit: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for VpnManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VpnManager").field("default_url", &self.default_url).finish_non_exhaustive()
    }
}

impl VpnManager {
    pub fn new(store: StateStore, opener: Box<dyn PacketOpener>, default_url: String) -> VpnManager {
        VpnManager { store, opener, default_url, live: Mutex::new(HashMap::new()), edit: tokio::sync::Mutex::new(()) }
    }

    fn saved(&self) -> Result<BTreeMap<String, Membership>> {
        Ok(self.store.load(VPNS_FILE)?.unwrap_or_default())
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Overlay>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn bring_up(&self, vpn: &str, m: &Membership) -> Result<Overlay> {
        let url = m.tunnel_url.clone().unwrap_or_else(|| self.default_url.clone());
        let pipe = self.opener.open(url, vpn.to_owned(), m.token.clone()).await?;
        let spec = OverlaySpec {
            interface: m.interface.clone(),
            layer: m.layer,
            address: m.address,
            prefix_len: m.prefix_len,
            mtu: DEFAULT_MTU,
        };
        Overlay::create(&spec, pipe).await
    }

    /// Joins (or re-joins with new parameters) and records the membership.
    pub async fn join(&self, vpn: &str, m: Membership) -> Result<()> {
        let _guard = self.edit.lock().await;
        let mut saved = self.saved()?;
        if let Some((other, _)) = saved.iter().find(|(v, s)| *v != vpn && s.interface == m.interface) {
            return Err(bad(format!("interface {} is already used by vpn {other}", m.interface)));
        }
        let old = self.live().remove(vpn);
        if let Some(o) = old {
            o.remove().await;
        }
        let overlay = self.bring_up(vpn, &m).await?;
        saved.insert(vpn.to_owned(), m);
        self.store.save(VPNS_FILE, &saved)?;
        self.live().insert(vpn.to_owned(), overlay);
        Ok(())
    }

    /// Removes the interface and forgets the membership; `Ok(false)` when not a member.
    pub async fn leave(&self, vpn: &str) -> Result<bool> {
        let _guard = self.edit.lock().await;
        let old = self.live().remove(vpn);
        let was_live = old.is_some();
        if let Some(o) = old {
            o.remove().await;
        }
        let mut saved = self.saved()?;
        let was_saved = saved.remove(vpn).is_some();
        if was_saved {
            self.store.save(VPNS_FILE, &saved)?;
        }
        Ok(was_live || was_saved)
    }

    /// Brings back every saved membership whose overlay is not running; returns the failures.
    pub async fn restore_all(&self) -> usize {
        let _guard = self.edit.lock().await;
        let saved = match self.saved() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(cause = %e, "cannot read the VPN memberships");
                return 1;
            }
        };
        let mut failed = 0;
        for (vpn, m) in saved {
            if self.live().get(&vpn).is_some_and(Overlay::is_alive) {
                continue;
            }
            let stale = self.live().remove(&vpn);
            if let Some(o) = stale {
                o.remove().await;
            }
            match self.bring_up(&vpn, &m).await {
                Ok(o) => {
                    self.live().insert(vpn, o);
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(vpn = %vpn, cause = %e, "VPN not restored yet");
                }
            }
        }
        failed
    }

    /// Removes every interface (at exit); memberships stay saved for the next start.
    pub async fn close_all(&self) {
        let all: Vec<Overlay> = self.live().drain().map(|(_, o)| o).collect();
        for o in all {
            o.remove().await;
        }
    }

    pub fn is_up(&self, vpn: &str) -> bool {
        self.live().get(vpn).is_some_and(Overlay::is_alive)
    }
}

fn parse_join(call: &Call) -> Result<(String, Membership)> {
    let p = Params::at(&call.args, 0, "parameters", true)?;
    let vpn = p.str("vpn")?.to_owned();
    let layer = match p.choice("type", &["l2", "l3"])? {
        Some("l2") => Layer::L2,
        Some(_) => Layer::L3,
        None => return Err(bad("parameters.type is missing".into())),
    };
    let address: Ipv4Addr = p
        .str("address")?
        .parse()
        .map_err(|_| bad(format!("parameters.address {:?} is not an IPv4 address", p.str("address").unwrap_or(""))))?;
    let prefix_len = p.int("prefix_len", 1..=32)? as u8;
    let interface = p.str("interface")?.to_owned();
    if !valid_ifname(&interface) {
        return Err(bad(format!("parameters.interface {interface:?}: 1-15 characters of A-Za-z0-9_.-")));
    }
    let tunnel_url = p.opt_str("tunnel_url")?.map(str::to_owned);
    if let Some(u) = &tunnel_url {
        crate::config::validate_ws_url(u, "parameters.tunnel_url").map_err(|e| bad(e.to_string()))?;
    }
    let token = p.opt_str("token")?.map(Secret::new);
    Ok((vpn, Membership { layer, address, prefix_len, interface, tunnel_url, token }))
}

pub(super) async fn call(ctx: &Arc<Context>, method: Method, call: &Call) -> Result<Reply> {
    match method {
        Method::VpnJoin => {
            let (vpn, m) = parse_join(call)?;
            let (interface, address) = (m.interface.clone(), format!("{}/{}", m.address, m.prefix_len));
            ctx.vpns.join(&vpn, m).await?;
            message(json!({"interface": interface, "address": address}))
        }
        Method::VpnLeave => {
            let p = Params::at(&call.args, 0, "parameters", true)?;
            let vpn = p.str("vpn")?;
            if ctx.vpns.leave(vpn).await? {
                message(json!({ "vpn": vpn }))
            } else {
                Ok(Reply {
                    message: json!(format!("not a member of vpn {vpn}")),
                    result: Outcome::Warning,
                    req_id: None,
                })
            }
        }
        _ => Err(bad(format!("{} is not a VPN procedure", method.name()))),
    }
}
