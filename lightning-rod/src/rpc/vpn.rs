//! `VpnJoin` / `VpnLeave`: overlay interfaces ([`crate::overlay`]) on a packet channel of the
//! tunnel, opened through a [`PacketOpener`], persisted in `vpns.json` and restored on boot and
//! after every reconnect.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::args::{Params, bad};
use super::services::BoxFuture;
use super::{Call, Context, Method, Outcome, Reply, message};
use crate::error::{Error, Result};
use crate::overlay::{
    DEFAULT_MTU, Layer, Overlay, OverlaySpec, PacketPipe, subnet_contains, system_default_gateways, valid_ifname,
};
use crate::secret::Secret;
use crate::state::{SERVICES_FILE, Services, StateStore, VPNS_FILE};

/// How long resolving a cloud host name for [`VpnManager`]'s route check may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a packet channel for a VPN on the tunnel server. The agent's implementation uses the
/// `wstunnel` client library.
pub trait PacketOpener: Send + Sync + 'static {
    fn open(&self, url: String, vpn: String, token: Option<Secret>) -> BoxFuture<'_, Result<PacketPipe>>;
    /// The packet channels into `vpn` on `url` present `token` from now on when they are
    /// re-opened (after a reconnect). False if there is no such channel.
    fn renew(&self, url: &str, vpn: &str, token: &Secret) -> bool {
        let _ = (url, vpn, token);
        false
    }
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
    /// The board's name servers ([`crate::overlay::system_nameservers`]; tests give theirs).
    resolvers: fn() -> Vec<Ipv4Addr>,
}

impl std::fmt::Debug for VpnManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VpnManager").field("default_url", &self.default_url).finish_non_exhaustive()
    }
}

impl VpnManager {
    pub fn new(store: StateStore, opener: Box<dyn PacketOpener>, default_url: String) -> VpnManager {
        VpnManager {
            store,
            opener,
            default_url,
            live: Mutex::new(HashMap::new()),
            edit: tokio::sync::Mutex::new(()),
            resolvers: crate::overlay::system_nameservers,
        }
    }

    fn saved(&self) -> Result<BTreeMap<String, Membership>> {
        Ok(self.store.load(VPNS_FILE)?.unwrap_or_default())
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Overlay>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tunnel server of membership `m`: its own, else the board's.
    fn tunnel_url(&self, m: &Membership) -> String {
        m.tunnel_url.clone().unwrap_or_else(|| self.default_url.clone())
    }

    /// Refuses a membership whose subnet would capture the board's way to the cloud: the
    /// addresses of the WAMP server and of every tunnel server the board uses, the default
    /// gateway and the name servers (which resolve the cloud's names at the next reconnect).
    /// The overlay's connected route would send that traffic into the VPN, which itself rides
    /// on that traffic: the board would be cut off, at every boot too.
    async fn spares_the_cloud(&self, vpn: &str, m: &Membership) -> Result<()> {
        let subnet = format!("{}/{}", m.address, m.prefix_len);
        let refuse = |what: String| {
            bad(format!(
                "vpn {vpn}: the subnet {subnet} contains {what}; the board would reach the cloud through the VPN \
                 itself and be cut off. Choose a subnet that does not contain it"
            ))
        };
        for (iface, gw) in system_default_gateways() {
            if iface != m.interface && subnet_contains(m.address, m.prefix_len, gw) {
                return Err(refuse(format!("{gw}, the board's default gateway (on {iface})")));
            }
        }
        if let Some(ns) = (self.resolvers)().into_iter().find(|ns| subnet_contains(m.address, m.prefix_len, *ns)) {
            return Err(refuse(format!("{ns}, the board's name server")));
        }
        // The board's default tunnel server stays protected when this VPN uses another.
        let mut urls = vec![("tunnel server", self.tunnel_url(m)), ("tunnel server", self.default_url.clone())];
        if let Some(id) = self.store.identity()? {
            urls.push(("WAMP server", id.url));
        }
        // Exposed services may use other tunnel servers; their file is the services' business.
        if let Ok(Some(services)) = self.store.load::<Services>(SERVICES_FILE) {
            urls.extend(services.into_values().filter_map(|s| s.tunnel_url).map(|u| ("tunnel server", u)));
        }
        urls.sort_by(|a, b| a.1.cmp(&b.1));
        urls.dedup_by(|a, b| a.1 == b.1);
        for (what, url) in urls {
            for ip in resolve_v4(&url).await.map_err(|reason| Error::Net {
                what: format!("vpn {vpn}: checking that {subnet} spares the {what} {url}"),
                reason,
            })? {
                if subnet_contains(m.address, m.prefix_len, ip) {
                    return Err(refuse(format!("{ip}, the address of the {what} {url}")));
                }
            }
        }
        Ok(())
    }

    async fn bring_up(&self, vpn: &str, m: &Membership) -> Result<Overlay> {
        let pipe = self.opener.open(self.tunnel_url(m), vpn.to_owned(), m.token.clone()).await?;
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
        self.spares_the_cloud(vpn, &m).await?;
        let old = self.live().remove(vpn);
        if let Some(o) = old {
            o.remove().await;
        }
        let overlay = self.bring_up(vpn, &m).await?;
        saved.insert(vpn.to_owned(), m);
        self.store.save_async(VPNS_FILE, &saved).await?;
        self.live().insert(vpn.to_owned(), overlay);
        Ok(())
    }

    /// Takes fresh tokens from the cloud (vpn, token): each replaces the saved one of that
    /// membership and the one its packet channel presents at its next reconnect. Unknown
    /// VPNs are ignored. Returns how many memberships took one.
    pub async fn renew_tokens(&self, renewed: &[(String, Secret)]) -> Result<usize> {
        let _guard = self.edit.lock().await;
        let mut saved = self.saved()?;
        let mut took = 0;
        for (vpn, token) in renewed {
            let Some(m) = saved.get_mut(vpn) else { continue };
            m.token = Some(token.clone());
            self.opener.renew(&self.tunnel_url(m), vpn, token);
            took += 1;
        }
        if took > 0 {
            self.store.save_async(VPNS_FILE, &saved).await?;
        }
        Ok(took)
    }

    /// The VPNs this board is a member of now (saved).
    pub fn saved_ids(&self) -> Result<Vec<String>> {
        Ok(self.saved()?.into_keys().collect())
    }

    /// Leaves the VPNs of `known_before` (saved before the cloud was asked) that the cloud's
    /// complete list `listed` no longer has (a VPN deleted, or a membership removed, while
    /// this board could not be told): their interfaces, addresses and routes go. A membership
    /// saved since the question was asked is kept.
    pub async fn prune(&self, known_before: &[String], listed: &[String]) -> Result<usize> {
        let _guard = self.edit.lock().await;
        let mut saved = self.saved()?;
        let gone: Vec<String> =
            saved.keys().filter(|v| known_before.contains(v) && !listed.contains(v)).cloned().collect();
        for vpn in &gone {
            let old = self.live().remove(vpn);
            if let Some(o) = old {
                o.remove().await;
            }
            saved.remove(vpn);
            tracing::warn!(vpn = %vpn, "membership the cloud no longer has: left");
        }
        if !gone.is_empty() {
            self.store.save_async(VPNS_FILE, &saved).await?;
        }
        Ok(gone.len())
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
            self.store.save_async(VPNS_FILE, &saved).await?;
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
            // Saved by an older agent, or the cloud moved: never bring back a board-isolating VPN.
            if let Err(e) = self.spares_the_cloud(&vpn, &m).await {
                failed += 1;
                tracing::error!(vpn = %vpn, cause = %e, "VPN not restored");
                continue;
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

/// The IPv4 addresses `url`'s host stands for (an IPv6-only host has none to check).
async fn resolve_v4(url: &str) -> std::result::Result<Vec<Ipv4Addr>, String> {
    let (host, port) = wstunnel::client::server_address(url).map_err(|e| e.to_string())?;
    let host = host.as_str();
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(match ip {
            IpAddr::V4(v4) => vec![v4],
            IpAddr::V6(_) => vec![],
        });
    }
    let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| format!("resolving {host} took more than {RESOLVE_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    Ok(found
        .filter_map(|a| match a.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect())
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
            let vpns = ctx.vpns.clone();
            super::services::detached(async move { vpns.join(&vpn, m).await }, Error::Tunnel).await?;
            message(json!({"interface": interface, "address": address}))
        }
        Method::VpnLeave => {
            let p = Params::at(&call.args, 0, "parameters", true)?;
            let vpn = p.str("vpn")?.to_owned();
            let (vpns, name) = (ctx.vpns.clone(), vpn.clone());
            if super::services::detached(async move { vpns.leave(&name).await }, Error::Tunnel).await? {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::Value;

    use super::*;
    use crate::rpc::tests::{bare_context as context, procedure};

    /// Counts the packet channels asked for and refuses them all (no device is ever made).
    #[derive(Clone, Default)]
    struct Counting(Arc<AtomicUsize>);

    impl PacketOpener for Counting {
        fn open(&self, _url: String, vpn: String, _token: Option<Secret>) -> BoxFuture<'_, Result<PacketPipe>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Err(Error::Tunnel(format!("test: no packet channel for {vpn}"))) })
        }
    }

    /// The tunnel server this board uses by default.
    const TUNNEL: &str = "ws://203.0.113.50:8080/";

    fn manager() -> (tempfile::TempDir, StateStore, Counting, VpnManager) {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let opened = Counting::default();
        let vpns = VpnManager::new(store.clone(), Box::new(opened.clone()), TUNNEL.into());
        (dir, store, opened, vpns)
    }

    fn join(address: &str, prefix_len: u8, tunnel_url: Option<&str>) -> Value {
        let mut p =
            json!({"vpn": "v", "type": "l3", "address": address, "prefix_len": prefix_len, "interface": "s4tguard0"});
        if let Some(u) = tunnel_url {
            p["tunnel_url"] = json!(u);
        }
        p
    }

    fn text(r: &Reply) -> String {
        r.message.as_str().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn a_vpn_whose_subnet_holds_the_cloud_is_refused_before_any_channel_opens() {
        let (dir, store, opened, vpns) = manager();
        let id = crate::state::Identity {
            uuid: "b1".into(),
            name: "b".into(),
            agent: "agent".into(),
            url: "wss://198.51.100.9:8181/".into(),
            realm: "s4t".into(),
            tunnel_url: Some(TUNNEL.into()),
            credentials: None,
            ca_fingerprint: None,
        };
        store.save_identity(&id).unwrap();
        let ctx = context(store, vpns);
        let cases = [
            (join("203.0.113.1", 24, None), "203.0.113.50, the address of the tunnel server"),
            (join("198.51.100.200", 24, None), "198.51.100.9, the address of the WAMP server"),
            (join("100.64.7.1", 16, Some("ws://100.64.0.2:9000/")), "100.64.0.2, the address of the tunnel server"),
            // The board's default tunnel server stays protected when a VPN uses another.
            (join("203.0.113.1", 24, Some("ws://100.64.0.2:9000/")), "203.0.113.50"),
        ];
        for (args, why) in cases {
            let r = procedure(&ctx, Method::VpnJoin, args.clone()).await;
            assert_eq!(r.result, Outcome::Error, "{args}: {r:?}");
            assert!(text(&r).contains(why) && text(&r).contains("cut off"), "{args}: {}", text(&r));
            assert_eq!(opened.0.load(Ordering::SeqCst), 0, "{args}: a packet channel was opened");
        }
        assert!(!dir.path().join(VPNS_FILE).exists(), "a refused VPN was saved");
        // A subnet next to them passes the check (and reaches the packet channel).
        let r = procedure(&ctx, Method::VpnJoin, join("203.0.113.1", 28, None)).await;
        assert!(text(&r).contains("test: no packet channel"), "{r:?}");
        assert_eq!(opened.0.load(Ordering::SeqCst), 1);
    }

    /// A VPN holding one of the board's name servers is refused: its route would send the
    /// board's DNS queries into the VPN, and the next reconnect could not resolve the cloud.
    #[tokio::test]
    async fn a_vpn_holding_a_name_server_is_refused() {
        let (_dir, _store, opened, mut vpns) = manager();
        vpns.resolvers = || vec![Ipv4Addr::new(10, 88, 0, 53)];
        let m = |prefix_len| Membership {
            layer: Layer::L3,
            address: Ipv4Addr::new(10, 88, 0, 9),
            prefix_len,
            interface: "s4tguard0".into(),
            tunnel_url: None,
            token: None,
        };
        let refused = vpns.join("v", m(24)).await.unwrap_err().to_string();
        assert!(refused.contains("10.88.0.53, the board's name server") && refused.contains("cut off"), "{refused}");
        assert_eq!(opened.0.load(Ordering::SeqCst), 0, "a packet channel was opened");
        let passed = vpns.join("v", m(29)).await.unwrap_err().to_string();
        assert!(passed.contains("test: no packet channel"), "{passed}");
        let text = "# comment\nnameserver 10.88.0.53\nnameserver ::1\n  nameserver 192.0.2.1 \nsearch lan\n";
        assert_eq!(crate::overlay::nameservers(text), [Ipv4Addr::new(10, 88, 0, 53), Ipv4Addr::new(192, 0, 2, 1)]);
    }

    #[tokio::test]
    async fn a_saved_vpn_holding_the_tunnel_server_is_not_restored() {
        let (_dir, store, opened, vpns) = manager();
        let m = Membership {
            layer: Layer::L3,
            address: Ipv4Addr::new(203, 0, 113, 1),
            prefix_len: 24,
            interface: "s4tguard0".into(),
            tunnel_url: None,
            token: None,
        };
        store.save(VPNS_FILE, &BTreeMap::from([("v".to_owned(), m)])).unwrap();
        assert_eq!(vpns.restore_all().await, 1);
        assert_eq!(opened.0.load(Ordering::SeqCst), 0, "a packet channel was opened");
        assert!(!vpns.is_up("v"));
    }

    /// A default route in a network namespace of its own: a VPN holding its gateway is refused.
    #[test]
    fn a_vpn_holding_the_default_gateway_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            panic!("needs root (CI runs as root): adds a default route in a private network namespace");
        }
        let (_dir, _store, opened, vpns) = manager();
        let r = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // A TUN stands in for the LAN interface (the dummy driver may be missing); it goes
            // away with the namespace.
            for args in [
                &["tuntap", "add", "s4tgw0", "mode", "tun"][..],
                &["addr", "add", "10.77.0.2/24", "dev", "s4tgw0"],
                &["link", "set", "s4tgw0", "up"],
                &["route", "add", "default", "via", "10.77.0.1", "dev", "s4tgw0", "onlink"],
            ] {
                let ok = std::process::Command::new("ip").args(args).status().unwrap();
                assert!(ok.success(), "ip {args:?}");
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let m = |prefix_len| Membership {
                layer: Layer::L3,
                address: Ipv4Addr::new(10, 77, 0, 9),
                prefix_len,
                interface: "s4tguard0".into(),
                tunnel_url: None,
                token: None,
            };
            let refused = rt.block_on(vpns.join("v", m(24))).unwrap_err().to_string();
            let passed = rt.block_on(vpns.join("v", m(30))).unwrap_err().to_string();
            (refused, passed)
        })
        .join()
        .unwrap();
        assert!(r.0.contains("10.77.0.1, the board's default gateway (on s4tgw0)"), "{}", r.0);
        assert!(r.1.contains("test: no packet channel"), "{}", r.1);
        assert_eq!(opened.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn route_table_and_urls_are_read() {
        let hex = |ip: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(ip));
        let table = format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t{}\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             eth0\t{}\t00000000\t0001\t0\t0\t0\t{}\t0\t0\t0\n\
             wlan0\t00000000\t{}\t0001\t0\t0\t0\t00000000\t0\t0\t0\n",
            hex([192, 0, 2, 1]),
            hex([192, 0, 2, 0]),
            hex([255, 255, 255, 0]),
            hex([10, 0, 0, 1]),
        );
        assert_eq!(crate::overlay::default_gateways(&table), [("eth0".to_owned(), Ipv4Addr::new(192, 0, 2, 1))]);
        assert!(subnet_contains(Ipv4Addr::new(10, 0, 0, 9), 8, Ipv4Addr::new(10, 255, 0, 1)));
        assert!(!subnet_contains(Ipv4Addr::new(10, 0, 0, 9), 30, Ipv4Addr::new(10, 0, 0, 12)));
        assert!(subnet_contains(Ipv4Addr::new(10, 0, 0, 9), 32, Ipv4Addr::new(10, 0, 0, 9)));
        let host = |url: &str| wstunnel::client::server_address(url).ok();
        assert_eq!(host("wss://cloud.example/ws"), Some(("cloud.example".into(), 443)));
        assert_eq!(host("ws://u@10.0.0.1:8080?x"), Some(("10.0.0.1".into(), 8080)));
        assert_eq!(host("ws://[2001:db8::1]:8181/"), Some(("2001:db8::1".into(), 8181)));
        assert_eq!(host("ws://:80/"), None);
    }
}
