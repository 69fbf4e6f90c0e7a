//! The cloud end of VPNs, run by the wstun-agent: for every board in a VPN a TAP (L2) or TUN
//! (L3) device fed by that board's packet channel; for every L2 VPN one Linux bridge joining
//! its TAPs (so the boards share one broadcast domain: ARP, DHCP, mDNS, UDP broadcast); for L3
//! VPNs packets from one board to another are routed between their channels here.
//!
//! # Lifecycle
//!
//! - A device is created when its board opens the packet channel (`VpnJoin` on the board,
//!   and again after every reconnect of the board or restart of the cloud); a new channel of
//!   the same member takes over the existing device.
//! - [`Fabric::reconcile`] (every [`RECONCILE_EVERY`]) compares the devices with the
//!   database: a member removed, a VPN deleted, a lease ended or a board deleted (the rows
//!   cascade) removes the device, and the bridge once its VPN has no member left. The API or
//!   conductor that changed the rows may be another process: the database is the truth.
//! - TAP/TUN devices are not persistent (they vanish with this process); bridges are, so a
//!   restarted cloud adopts the bridges of its VPNs (with their cloud address) and deletes
//!   those of VPNs without members, and those of VPNs deleted while it was down. A bridge
//!   carries its cloud's mark as its alias (`s4t cloud <id>`, the id a setting of the
//!   database): a host may run several clouds (tests do), and a bridge of a VPN this cloud
//!   does not know is removed only when the mark is this cloud's.
//!
//! GRE-TAP encapsulation is done in user space ([`wstunnel::packet::pump_routed`],
//! `s4t_shared::gre`) because the frames travel inside the board's WebSocket channel, not as
//! IP packets the kernel could decapsulate; whether the kernel has `gretap` is probed at start
//! and logged (it matters only for peers reached over plain IP, which this cloud has none of).
//!
//! # Fast paths between members
//!
//! Traffic from one board to another does not go through the kernel when the cloud knows where
//! it goes: the pump of the sending member forwards the packet, as it came, to the other
//! member's channel ([`Segment`]). L3: by destination address. L2: a learning switch in user
//! space; a unicast frame whose destination MAC was seen as the source of another member's
//! frames goes straight to that member, skipping the TAP write, the bridge and the other TAP's
//! read. Broadcast, multicast, unknown unicast and frames for the cloud host (the bridge's MAC)
//! still go through the TAP and the bridge, which floods and answers them as before. What a
//! member may not send is dropped in the pump, wherever it goes: L3 packets from any source
//! but the member's address, L2 frames from a source MAC it may not teach the switch.
//!
//! # Names
//!
//! [`names`]: deterministic from the ids, 15 characters (IFNAMSIZ).

pub mod names;
mod net;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wstunnel::packet::{DeviceSpec, Hop, Layer, PacketChannel, PacketSender, PumpStats};

use crate::Error;
use crate::db::{Db, Vpn, cloud_host, parse_cidr};
use net::Net;

/// The setting naming this cloud on the host's interfaces (see the lifecycle above).
const CLOUD_ID: &str = "cloud_id";

/// How often devices are compared with the database.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// MTU of the cloud's devices: the board's overlay default (lightning-rod `DEFAULT_MTU`, just
/// under 64 KiB because the packets travel inside the board's TCP channel, where the path MTU
/// does not apply and every packet costs a trip through the pumps).
pub const MTU: u16 = 65000;

/// MAC addresses an L2 VPN learns at most: beyond, frames from new source addresses are
/// dropped (they would teach the kernel bridge, whose table has no bound, as well).
const MAX_LEARNED: usize = 4096;
/// MAC addresses one member's frames may teach (beyond, its frames from new addresses are
/// dropped): one member sending random source addresses must not fill the table (nothing
/// ages out) and send every other member's unicast through the bridge for good.
const MAX_LEARNED_PER_MEMBER: usize = 512;

/// What the cloud knows of a VPN's members for forwarding between them in user space.
#[derive(Default)]
struct Segment {
    /// Board → its channel.
    members: HashMap<String, PacketSender>,
    /// L3: member address → board.
    addresses: HashMap<Ipv4Addr, String>,
    /// L2: MAC → the board whose frames carried it as source.
    macs: HashMap<[u8; 6], String>,
    /// L2: how many of `macs` each board holds.
    learned: HashMap<String, usize>,
}

impl Segment {
    fn learn(&mut self, mac: [u8; 6], board: &str) {
        if let Some(old) = self.macs.insert(mac, board.to_owned())
            && let Some(n) = self.learned.get_mut(&old)
        {
            *n = n.saturating_sub(1);
        }
        *self.learned.entry(board.to_owned()).or_default() += 1;
    }

    fn forget_macs_of(&mut self, board: &str) {
        self.macs.retain(|_, b| b != board);
        self.learned.remove(board);
    }
}

/// Segments by VPN.
type Segments = Arc<RwLock<HashMap<String, Segment>>>;

/// One member's device and the pump feeding it.
struct Port {
    name: String,
    layer: Layer,
    address: Ipv4Addr,
    device: Arc<tun_rs::AsyncDevice>,
    pump: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Port {
    async fn stop_pump(&mut self) {
        if let Some((cancel, task)) = self.pump.take() {
            cancel.cancel();
            let _ = task.await;
        }
    }
}

struct State {
    net: Net,
    /// By (vpn, board).
    ports: HashMap<(String, String), Port>,
    /// L2 bridges by VPN: name and index.
    bridges: HashMap<String, (String, u32)>,
}

/// The VPN data plane of one wstun-agent.
pub struct Fabric {
    db: Db,
    /// This cloud's mark on its bridges (their alias).
    owner: String,
    state: tokio::sync::Mutex<State>,
    segments: Segments,
    /// Packet counters by VPN, summed over its members' pumps since this process started.
    stats: std::sync::Mutex<HashMap<String, Arc<PumpStats>>>,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric").finish_non_exhaustive()
    }
}

fn layer_of(v: &Vpn) -> Layer {
    if v.vpn_type == "l3" { Layer::L3 } else { Layer::L2 }
}

impl Fabric {
    /// Opens netlink, logs whether the kernel has `gretap`, adopts or removes the bridges a
    /// previous run left.
    pub async fn start(db: Db) -> Result<Arc<Fabric>, Error> {
        let net = Net::open()?;
        match net.gretap_available().await {
            Ok(()) => info!(
                "kernel gretap available; VPN frames still travel GRE-TAP-encapsulated in user space over the board channels"
            ),
            Err(e) => info!(cause = %e, "kernel gretap unavailable; GRE-TAP is done in user space"),
        }
        let id = db.setting_or_init(CLOUD_ID, || uuid::Uuid::new_v4().to_string()).await?;
        let fabric = Arc::new(Fabric {
            db,
            owner: format!("s4t cloud {id}"),
            state: tokio::sync::Mutex::new(State { net, ports: HashMap::new(), bridges: HashMap::new() }),
            segments: Arc::default(),
            stats: std::sync::Mutex::default(),
        });
        if let Err(e) = fabric.adopt_bridges().await {
            warn!(cause = %e, "cannot check the VPN bridges of a previous run");
        }
        Ok(fabric)
    }

    async fn adopt_bridges(&self) -> Result<(), Error> {
        let vpns = self.db.list_vpns(None).await?;
        let members = self.db.all_vpn_members().await?;
        let mut st = self.state.lock().await;
        let left = st.net.links_with_prefix(names::BRIDGE_PREFIX).await?;
        let known: HashSet<String> = vpns.iter().map(|v| names::bridge(&v.uuid)).collect();
        for (name, _) in left.iter().filter(|(n, alias)| !known.contains(n) && alias.as_ref() == Some(&self.owner)) {
            match st.net.delete(name).await {
                Ok(()) => info!(bridge = %name, "bridge of a deleted VPN removed"),
                Err(e) => warn!(bridge = %name, cause = %e, "cannot remove the bridge of a deleted VPN"),
            }
        }
        for v in vpns.iter().filter(|v| layer_of(v) == Layer::L2) {
            let name = names::bridge(&v.uuid);
            if !left.iter().any(|(n, _)| *n == name) {
                continue;
            }
            if members.iter().any(|m| m.vpn == v.uuid) {
                let index = st.net.ensure_bridge(&name, &self.owner).await?;
                if v.cloud_address {
                    st.net.add_address(index, cloud_host(&v.cidr)?, parse_cidr(&v.cidr)?.1).await?;
                }
                info!(vpn = %v.uuid, bridge = %name, "VPN bridge restored");
                st.bridges.insert(v.uuid.clone(), (name, index));
            } else {
                st.net.delete(&name).await?;
                info!(vpn = %v.uuid, bridge = %name, "stale VPN bridge removed");
            }
        }
        Ok(())
    }

    /// A board opened the packet channel of `vpn` (its token checked): creates or takes over
    /// its device. Refuses boards that are not members.
    pub async fn attach(&self, board: &str, vpn: &str, channel: PacketChannel) -> Result<(), Error> {
        let v = self.db.vpn(vpn, None).await?.filter(|v| v.uuid == vpn);
        let v = v.ok_or_else(|| Error::NotFound(format!("VPN {vpn} does not exist")))?;
        let m = self.db.vpn_member(vpn, board).await?;
        let m = m.ok_or_else(|| Error::Forbidden(format!("the board is not a member of VPN {}", v.name)))?;
        let address: Ipv4Addr =
            m.address.parse().map_err(|_| Error::Invalid(format!("bad member address {:?}", m.address)))?;
        let layer = layer_of(&v);
        let key = (vpn.to_owned(), board.to_owned());
        let mut st = self.state.lock().await;
        // The tunnel server lets a channel replace only a dead or its own holder of the VPN;
        // one that closed while waiting for the lock must not replace the one that followed.
        if !channel.sender.is_connected() {
            return Err(Error::Unavailable("the packet channel closed before it was attached".into()));
        }
        let stale = st.ports.get(&key).is_some_and(|p| p.address != address || p.layer != layer);
        if stale {
            self.remove_port(&mut st, &key).await;
        }
        if !st.ports.contains_key(&key) {
            let port = self.create_port(&mut st, &v, board, address).await?;
            st.ports.insert(key.clone(), port);
        }
        let port = st.ports.get_mut(&key).expect("just inserted");
        port.stop_pump().await;
        let cancel = CancellationToken::new();
        let device = port.device.clone();
        {
            let mut segs = self.segments_write();
            let seg = segs.entry(vpn.to_owned()).or_default();
            seg.members.insert(board.to_owned(), channel.sender.clone());
            seg.forget_macs_of(board);
            if layer == Layer::L3 {
                seg.addresses.insert(address, board.to_owned());
            }
        }
        let route = Route {
            segments: self.segments.clone(),
            vpn: vpn.to_owned(),
            board: board.to_owned(),
            address,
            bridge_mac: names::mac(&names::bridge(vpn)),
        };
        let stop = cancel.clone();
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).entry(vpn.to_owned()).or_default().clone();
        let task = tokio::spawn(async move {
            let r = wstunnel::packet::pump_routed(&device, channel, layer, stop, &stats, |p| route.next_hop(layer, p));
            if let Err(e) = r.await {
                warn!(cause = %e, "VPN pump stopped");
            }
        });
        port.pump = Some((cancel, task));
        info!(vpn, board, interface = %port.name, %address, layer = ?layer, "VPN member attached");
        Ok(())
    }

    fn segments_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Segment>> {
        self.segments.write().unwrap_or_else(|e| e.into_inner())
    }

    async fn create_port(&self, st: &mut State, v: &Vpn, board: &str, address: Ipv4Addr) -> Result<Port, Error> {
        let name = names::port(&v.uuid, board);
        let layer = layer_of(v);
        // A device of a previous run of this process cannot survive it, but another tool may
        // hold the name: fail clearly rather than adopt it.
        let spec = DeviceSpec { name: name.clone(), layer, mtu: MTU, ipv4: None };
        let device = wstunnel::packet::create_device(&spec)
            .map_err(|e| Error::Unavailable(format!("cannot create the VPN device {name}: {e}")))?;
        let index = device.if_index().map_err(|e| Error::Unavailable(format!("{name}: {e}")))?;
        net::harden(&name)?;
        let (_, prefix) = parse_cidr(&v.cidr)?;
        match layer {
            Layer::L2 => {
                let bridge = match st.bridges.get(&v.uuid) {
                    Some((_, i)) => *i,
                    None => {
                        let bname = names::bridge(&v.uuid);
                        let i = st.net.ensure_bridge(&bname, &self.owner).await?;
                        // Tracked at once: `reconcile` removes it, or gives it the cloud
                        // address, even if this attach fails below.
                        st.bridges.insert(v.uuid.clone(), (bname.clone(), i));
                        if v.cloud_address {
                            st.net.add_address(i, cloud_host(&v.cidr)?, prefix).await?;
                        }
                        info!(vpn = %v.uuid, bridge = %bname, cloud_address = v.cloud_address, "VPN bridge up");
                        i
                    }
                };
                st.net.attach(index, Some(names::mac(&name)), Some(bridge)).await?;
            }
            Layer::L3 => {
                st.net.attach(index, None, None).await?;
                // Without a cloud address the host has nothing to say to the member, and no
                // route to it: the reverse-path filter then drops whatever the member sends
                // the host (its other addresses included), and VPNs of different projects
                // over the same range do not take each other's routes.
                if v.cloud_address {
                    st.net.add_address(index, cloud_host(&v.cidr)?, 32).await?;
                    st.net.host_route(address, index).await?;
                }
            }
        }
        Ok(Port { name, layer, address, device: Arc::new(device), pump: None })
    }

    async fn remove_port(&self, st: &mut State, key: &(String, String)) {
        let Some(mut port) = st.ports.remove(key) else { return };
        port.stop_pump().await;
        {
            let mut segs = self.segments_write();
            if let Some(seg) = segs.get_mut(&key.0) {
                seg.members.remove(&key.1);
                seg.addresses.retain(|_, b| *b != key.1);
                seg.forget_macs_of(&key.1);
                if seg.members.is_empty() {
                    segs.remove(&key.0);
                }
            }
        }
        // The last handle: closing it removes the interface (and its bridge port and routes).
        drop(port.device);
        info!(vpn = %key.0, board = %key.1, interface = %port.name, "VPN member detached; device removed");
    }

    /// Removes devices and bridges the database no longer has (member removed, VPN deleted,
    /// lease ended, board deleted), and takes the cloud address on or off.
    pub async fn reconcile(&self) -> Result<(), Error> {
        // The lock before the reads: `attach` checks the membership in the database, then
        // takes the lock to add the port. Read first, and a member added and attached between
        // the read and the lock would be removed as unknown a moment after it joined.
        let mut st = self.state.lock().await;
        let members = self.db.all_vpn_members().await?;
        let vpns: HashMap<String, Vpn> =
            self.db.list_vpns(None).await?.into_iter().map(|v| (v.uuid.clone(), v)).collect();
        let wanted: HashSet<(String, String, String)> =
            members.iter().map(|m| (m.vpn.clone(), m.board.clone(), m.address.clone())).collect();
        let gone: Vec<(String, String)> = st
            .ports
            .iter()
            .filter(|((v, b), p)| !wanted.contains(&(v.clone(), b.clone(), p.address.to_string())))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.remove_port(&mut st, &key).await;
        }
        let used: HashSet<&String> = members.iter().map(|m| &m.vpn).collect();
        // A deleted VPN's packet counters go too (they would stay in `/metrics` for good).
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).retain(|v, _| vpns.contains_key(v));
        let empty: Vec<String> =
            st.bridges.keys().filter(|v| !used.contains(v) || !vpns.contains_key(*v)).cloned().collect();
        for vpn in empty {
            let name = st.bridges[&vpn].0.clone();
            // Forgotten only once gone: one that could not be removed is tried again next time.
            match st.net.delete(&name).await {
                Ok(()) => {
                    st.bridges.remove(&vpn);
                    info!(vpn = %vpn, bridge = %name, "VPN bridge removed");
                }
                Err(e) => warn!(vpn = %vpn, bridge = %name, cause = %e, "cannot remove the VPN bridge"),
            }
        }
        for (vpn, (_, index)) in &st.bridges {
            if let Some(v) = vpns.get(vpn).filter(|v| v.cloud_address) {
                st.net.add_address(*index, cloud_host(&v.cidr)?, parse_cidr(&v.cidr)?.1).await?;
            }
        }
        Ok(())
    }

    /// Reconciles every [`RECONCILE_EVERY`] until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.reconcile().await {
                        warn!(cause = %e, "VPN reconcile failed");
                    }
                }
            }
        }
        let mut st = self.state.lock().await;
        let keys: Vec<_> = st.ports.keys().cloned().collect();
        for k in keys {
            self.remove_port(&mut st, &k).await;
        }
    }

    /// Packet counters by VPN since this process started, sorted by VPN.
    pub fn packet_stats(&self) -> Vec<(String, VpnPackets)> {
        use portable_atomic::Ordering::Relaxed;
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = stats
            .iter()
            .map(|(vpn, s)| {
                let p = VpnPackets {
                    sent: s.sent.load(Relaxed),
                    received: s.received.load(Relaxed),
                    forwarded: s.forwarded.load(Relaxed),
                    dropped: s.dropped.load(Relaxed),
                    malformed: s.malformed.load(Relaxed),
                };
                (vpn.clone(), p)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Interfaces of live members, for tests and metrics: (vpn, board, interface).
    pub async fn ports(&self) -> Vec<(String, String, String)> {
        let st = self.state.lock().await;
        st.ports.iter().map(|((v, b), p)| (v.clone(), b.clone(), p.name.clone())).collect()
    }
}

/// Packets of one VPN through the cloud (see [`PumpStats`]): `sent` to boards, `received`
/// from boards into the cloud's device, `forwarded` from board to board, `dropped`,
/// `malformed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VpnPackets {
    pub sent: u64,
    pub received: u64,
    pub forwarded: u64,
    pub dropped: u64,
    pub malformed: u64,
}

/// The IPv4 destination of a packet, if it is one.
fn ipv4_dst(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= 20 && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[16], p[17], p[18], p[19]))
}

fn ipv4_src(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= 20 && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[12], p[13], p[14], p[15]))
}

/// Destination and source MAC of an Ethernet frame.
fn macs(f: &[u8]) -> Option<([u8; 6], [u8; 6])> {
    let dst = f.get(..6)?.try_into().ok()?;
    let src = f.get(6..12)?.try_into().ok()?;
    Some((dst, src))
}

/// Group (broadcast or multicast) MAC addresses have the lowest bit of the first octet set.
fn is_group(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

/// The forwarding decision of one member's pump.
struct Route {
    segments: Segments,
    vpn: String,
    /// The member this pump serves (packets from it are routed).
    board: String,
    /// Its address: on an L3 VPN, the only source its packets may carry.
    address: Ipv4Addr,
    /// The cloud host's MAC on an L2 VPN: never learned from a board.
    bridge_mac: [u8; 6],
}

impl Route {
    /// Where a packet from this member goes: straight to another member, to the device (the
    /// cloud host, the bridge, or nowhere known), or nowhere.
    ///
    /// L3: only an IPv4 packet from the member's own address goes anywhere: the cloud is the
    /// VPN's router and knows each member's one address, so no member sends as another, or
    /// as anyone else (the host's reverse-path filter is not relied on: it may be loose).
    ///
    /// L2: a frame goes anywhere only from a source MAC already this member's or one it may
    /// still learn ([`Route::learns`]), which it then teaches the switch: the kernel bridge
    /// behind the device learns every source it sees, with no bound of its own, so a member
    /// sending from ever new addresses must not reach it.
    fn next_hop(&self, layer: Layer, p: &[u8]) -> Hop {
        match layer {
            Layer::L3 => {
                if ipv4_src(p) != Some(self.address) {
                    return Hop::Drop;
                }
                let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
                let to = segs.get(&self.vpn).and_then(|seg| {
                    let to = seg.addresses.get(&ipv4_dst(p)?)?;
                    (*to != self.board).then(|| seg.members.get(to).cloned()).flatten()
                });
                to.map_or(Hop::Device, Hop::Forward)
            }
            Layer::L2 => {
                let Some((dst, src)) = macs(p) else { return Hop::Drop };
                {
                    let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
                    let Some(seg) = segs.get(&self.vpn) else { return Hop::Drop };
                    if seg.macs.get(&src) == Some(&self.board) {
                        return self.l2_hop(seg, &dst);
                    }
                    if !self.learns(seg, &src) {
                        return Hop::Drop;
                    }
                }
                let mut segs = self.segments.write().unwrap_or_else(|e| e.into_inner());
                let Some(seg) = segs.get_mut(&self.vpn) else { return Hop::Drop };
                if seg.macs.get(&src) != Some(&self.board) {
                    // Checked again: another pump may have taken the room meanwhile.
                    if !self.learns(seg, &src) || !seg.members.contains_key(&self.board) {
                        return Hop::Drop;
                    }
                    seg.learn(src, &self.board);
                }
                self.l2_hop(seg, &dst)
            }
        }
    }

    /// Whether `src` may be learned as this member's (new, or taken from another member): a
    /// unicast address other than the cloud host's, within the table's bounds.
    fn learns(&self, seg: &Segment, src: &[u8; 6]) -> bool {
        !is_group(src)
            && *src != self.bridge_mac
            && (seg.macs.len() < MAX_LEARNED || seg.macs.contains_key(src))
            && seg.learned.get(&self.board).copied().unwrap_or(0) < MAX_LEARNED_PER_MEMBER
    }

    /// The member a frame to `dst` goes to directly, else the device.
    fn l2_hop(&self, seg: &Segment, dst: &[u8; 6]) -> Hop {
        let to = seg.macs.get(dst).filter(|to| !is_group(dst) && **to != self.board);
        to.and_then(|to| seg.members.get(to)).cloned().map_or(Hop::Device, Hop::Forward)
    }
}

/// Runs `test` on a thread of its own in a fresh network namespace (its devices exist only
/// there and die with it), on a runtime of that thread; skipped without root, except under CI.
#[cfg(test)]
fn in_private_netns<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F + Send + 'static) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "this test needs root and CI is set");
        eprintln!("SKIPPED: needs root (network namespace)");
        return;
    }
    std::thread::spawn(|| {
        // SAFETY: unshare on this thread only; the namespace dies with it.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(test());
    })
    .join()
    .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deleted VPN's packet counters leave `/metrics` at the next reconcile; a live one's
    /// stay. In a private network namespace (netlink; needs root).
    #[test]
    fn a_deleted_vpns_counters_go() {
        in_private_netns(|| async {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(&crate::db::DatabaseUrl::sqlite_in(dir.path())).await.unwrap();
            let p = db.create_project("p").await.unwrap();
            let kept = db.create_vpn("kept", &p.uuid, "l2", "10.50.0.0/24").await.unwrap();
            let gone = db.create_vpn("gone", &p.uuid, "l2", "10.51.0.0/24").await.unwrap();
            let fabric = Fabric::start(db.clone()).await.unwrap();
            for v in [&kept.uuid, &gone.uuid] {
                fabric.stats.lock().unwrap().entry(v.clone()).or_default();
            }
            db.delete_vpn(&gone.uuid).await.unwrap();
            fabric.reconcile().await.unwrap();
            let left: Vec<String> = fabric.packet_stats().into_iter().map(|(v, _)| v).collect();
            assert_eq!(left, vec![kept.uuid.clone()]);
        });
    }

    /// An L2 VPN deleted while the cloud was down leaves its bridge: the next start removes
    /// it, and leaves alone the bridges of another cloud on the host and one it did not make.
    #[test]
    fn a_restarted_cloud_removes_the_bridges_of_vpns_deleted_while_it_was_down() {
        in_private_netns(|| async {
            async fn cloud_with_bridge(dir: &std::path::Path) -> (Db, Vpn, String) {
                let db = Db::open(&crate::db::DatabaseUrl::sqlite_in(dir)).await.unwrap();
                let p = db.create_project("p").await.unwrap();
                let v = db.create_vpn("v", &p.uuid, "l2", "10.50.0.0/24").await.unwrap();
                let nb =
                    crate::db::NewBoard { name: "b".into(), code: "c".into(), project: p.uuid, ..Default::default() };
                let b = db.insert_board(nb).await.unwrap();
                db.add_vpn_member(&v, &b.uuid, None, None).await.unwrap();
                let fabric = Fabric::start(db.clone()).await.unwrap();
                let (chan, _out, _in) = PacketChannel::in_memory(4);
                fabric.attach(&b.uuid, &v.uuid, chan).await.unwrap();
                (db, v, b.uuid)
            }
            let bridges = || async {
                let mut names: Vec<String> = Net::open()
                    .unwrap()
                    .links_with_prefix(names::BRIDGE_PREFIX)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|l| l.0)
                    .collect();
                names.sort();
                names
            };
            let (dir, other_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let (db, gone, _) = cloud_with_bridge(dir.path()).await;
            let (_other, theirs, _) = cloud_with_bridge(other_dir.path()).await;
            let unmarked = names::bridge("made by someone else");
            Net::open().unwrap().ensure_bridge(&unmarked, "").await.unwrap();
            let mut before = vec![names::bridge(&gone.uuid), names::bridge(&theirs.uuid), unmarked.clone()];
            before.sort();
            assert_eq!(bridges().await, before);
            // The first cloud is down (its fabric dropped) while its VPN is deleted.
            db.delete_vpn(&gone.uuid).await.unwrap();
            let _restarted = Fabric::start(db.clone()).await.unwrap();
            let mut after = vec![names::bridge(&theirs.uuid), unmarked];
            after.sort();
            assert_eq!(bridges().await, after);
        });
    }

    /// A cloud with one VPN (`vpn_type`, with the cloud address over `cidr`) and one member
    /// attached over an in-memory channel: the fabric, the VPN, the member's board, its
    /// address, what reaches the board and what it sends.
    async fn one_member(
        dir: &std::path::Path,
        vpn_type: &str,
        cidr: &str,
    ) -> (
        Arc<Fabric>,
        Vpn,
        String,
        Ipv4Addr,
        tokio::sync::mpsc::Receiver<bytes::Bytes>,
        tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) {
        let db = Db::open(&crate::db::DatabaseUrl::sqlite_in(dir)).await.unwrap();
        let p = db.create_project("p").await.unwrap();
        let v = db.create_vpn_with("v", &p.uuid, vpn_type, cidr, true).await.unwrap();
        let nb = crate::db::NewBoard { name: "b".into(), code: "c".into(), project: p.uuid, ..Default::default() };
        let b = db.insert_board(nb).await.unwrap();
        let m = db.add_vpn_member(&v, &b.uuid, None, None).await.unwrap();
        let fabric = Fabric::start(db).await.unwrap();
        let (chan, to_board, from_board) = PacketChannel::in_memory(64);
        fabric.attach(&b.uuid, &v.uuid, chan).await.unwrap();
        (fabric, v, b.uuid, m.address.parse().unwrap(), to_board, from_board)
    }

    /// The Internet checksum of `b`.
    fn checksum(b: &[u8]) -> [u8; 2] {
        let mut sum: u32 = b.chunks(2).map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))).sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        (!(sum as u16)).to_be_bytes()
    }

    /// An ICMP echo request from `src` to `dst`.
    fn echo(src: Ipv4Addr, dst: Ipv4Addr) -> bytes::Bytes {
        let mut p = [0u8; 28];
        p[..4].copy_from_slice(&[0x45, 0, 0, 28]);
        p[8..10].copy_from_slice(&[64, 1]);
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c);
        p[20] = 8;
        let c = checksum(&p[20..]);
        p[22..24].copy_from_slice(&c);
        bytes::Bytes::copy_from_slice(&p)
    }

    /// An L3 member's echo from a source not its own goes nowhere, not even to the device
    /// (the host's reverse-path filter may be loose; here it would pass, as the host routes
    /// that source through the member's device); from its own address it is answered. In a
    /// private network namespace (needs root).
    #[test]
    fn an_l3_member_cannot_reach_the_host_with_a_forged_source() {
        in_private_netns(|| async {
            let dir = tempfile::tempdir().unwrap();
            let (fabric, v, board, member, mut to_board, from_board) =
                one_member(dir.path(), "l3", "10.60.0.0/24").await;
            let host = cloud_host(&v.cidr).unwrap();
            let forged = Ipv4Addr::new(198, 51, 100, 7);
            let net = Net::open().unwrap();
            let tun = net.index(&names::port(&v.uuid, &board)).await.unwrap().unwrap();
            net.host_route(forged, tun).await.unwrap();
            from_board.send(echo(forged, host)).await.unwrap();
            from_board.send(echo(member, host)).await.unwrap();
            // The answer to the member's own echo comes after whatever the forged one brought.
            loop {
                let p = to_board.recv().await.unwrap();
                assert_ne!(ipv4_dst(&p), Some(forged), "the host answered the forged source");
                if ipv4_dst(&p) == Some(member) {
                    break;
                }
            }
            let (_, counted) = fabric.packet_stats().into_iter().find(|(id, _)| *id == v.uuid).unwrap();
            assert_eq!((counted.dropped, counted.received), (1, 1), "dropped, and written to the device");
        });
    }

    /// One L2 member sending broadcast frames from 2,000 source MACs teaches the kernel bridge
    /// no more of them than the switch in user space takes from it. In a private network
    /// namespace (needs root).
    #[test]
    fn an_l2_member_cannot_fill_the_kernel_bridge() {
        in_private_netns(|| async {
            let dir = tempfile::tempdir().unwrap();
            let (_fabric, v, board, member, mut to_board, from_board) =
                one_member(dir.path(), "l2", "10.61.0.0/24").await;
            let net = Net::open().unwrap();
            let tap = net.index(&names::port(&v.uuid, &board)).await.unwrap().unwrap();
            // The bridge drops what comes before its port forwards (the kernel enables it when
            // it sees the TAP's carrier, a moment after the attach).
            while !net.forwarding(tap).await.unwrap() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let first = [2, 1, 0, 0, 0, 0];
            for i in 0..2000u16 {
                let [x, y] = i.to_be_bytes();
                // An EtherType the host ignores (local experimental): Linux drops malformed IPv4
                // before the bridge sees it.
                let f = [&[0xff; 6][..], &[2, 1, 0, 0, x, y], &[0x88, 0xb5], &[0; 46]].concat();
                from_board.send(s4t_shared::gre::encapsulate(&f).into()).await.unwrap();
            }
            // An ARP request for the host's address: its answer comes once the frames before
            // it went through the bridge.
            let host = cloud_host(&v.cidr).unwrap();
            let arp = [
                &[0xff; 6][..],
                &first,
                &[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1],
                &first,
                &member.octets(),
                &[0; 6],
                &host.octets(),
                &[0; 18],
            ]
            .concat();
            from_board.send(s4t_shared::gre::encapsulate(&arp).into()).await.unwrap();
            loop {
                let p = to_board.recv().await.unwrap();
                let f = s4t_shared::gre::decapsulate(&p).unwrap();
                if f.get(12..14) == Some(&[0x08, 0x06]) && f.get(20..22) == Some(&[0, 2]) {
                    break;
                }
            }
            let learned = net.learned_on(tap).await.unwrap();
            // The switch took the first 512; those reached the bridge, the others nothing.
            assert_eq!(learned, MAX_LEARNED_PER_MEMBER, "the bridge learned {learned} addresses from one member");
        });
    }

    /// A bridge the kernel refuses to remove stays known, so the next reconcile tries again.
    /// Loopback plays the bridge: the kernel never deletes it. In a private network namespace
    /// (needs root).
    #[test]
    fn a_bridge_that_could_not_be_removed_is_tried_again() {
        in_private_netns(|| async {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(&crate::db::DatabaseUrl::sqlite_in(dir.path())).await.unwrap();
            let fabric = Fabric::start(db).await.unwrap();
            fabric.state.lock().await.bridges.insert("gone".into(), ("lo".into(), 1));
            fabric.reconcile().await.unwrap();
            assert!(fabric.state.lock().await.bridges.contains_key("gone"), "forgotten after a failed removal");
        });
    }

    #[test]
    fn ipv4_destinations_are_read_only_from_ipv4_packets() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 0, 0, 3]);
        assert_eq!(ipv4_dst(&p), Some(Ipv4Addr::new(10, 0, 0, 3)));
        p[0] = 0x60;
        assert_eq!(ipv4_dst(&p), None, "IPv6");
        assert_eq!(ipv4_dst(&[0x45; 19]), None, "truncated");
    }

    /// The other member a [`Hop`] forwards to, if it does.
    fn forwarded(h: Hop) -> Option<PacketSender> {
        match h {
            Hop::Forward(to) => Some(to),
            _ => None,
        }
    }

    fn to_device(h: Hop) -> bool {
        matches!(h, Hop::Device)
    }

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        [&dst[..], &src[..], &[0x08, 0x00], &[0u8; 46][..]].concat()
    }

    #[tokio::test]
    async fn the_l2_switch_forwards_learned_unicast_and_leaves_the_rest_to_the_bridge() {
        let segments = Segments::default();
        let (chan_a, mut out_a, _in_a) = PacketChannel::in_memory(4);
        let (chan_b, mut out_b, _in_b) = PacketChannel::in_memory(4);
        {
            let mut segs = segments.write().unwrap();
            let seg = segs.entry("v".into()).or_default();
            seg.members.insert("a".into(), chan_a.sender.clone());
            seg.members.insert("b".into(), chan_b.sender.clone());
        }
        let bridge_mac = [2, 0, 0, 0, 0, 0xbb];
        let route = |board: &str| Route {
            segments: segments.clone(),
            vpn: "v".into(),
            board: board.into(),
            address: Ipv4Addr::UNSPECIFIED,
            bridge_mac,
        };
        let (from_a, from_b) = (route("a"), route("b"));
        let (mac_a, mac_b, bcast) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb], [0xff; 6]);
        assert!(to_device(from_b.next_hop(Layer::L2, &frame(mac_a, mac_b))), "A's MAC is not known yet");
        assert!(to_device(from_a.next_hop(Layer::L2, &frame(bcast, mac_a))), "broadcast takes the bridge");
        let to_a = forwarded(from_b.next_hop(Layer::L2, &frame(mac_a, mac_b)))
            .expect("A's MAC was learned from its broadcast");
        to_a.send(b"to a").await.unwrap();
        assert_eq!(&out_a.recv().await.unwrap()[..], b"to a", "forwarded on A's channel");
        let to_b =
            forwarded(from_a.next_hop(Layer::L2, &frame(mac_b, mac_a))).expect("B's MAC was learned from its frame");
        to_b.send(b"to b").await.unwrap();
        assert_eq!(&out_b.recv().await.unwrap()[..], b"to b");
        assert!(to_device(from_a.next_hop(Layer::L2, &frame(bridge_mac, mac_a))), "the cloud host takes the bridge");
        assert!(to_device(from_a.next_hop(Layer::L2, &frame(mac_a, mac_a))), "never back to the sender");
        // A board claiming the cloud host's MAC or a group address is dropped and teaches the
        // switch nothing.
        assert!(matches!(from_b.next_hop(Layer::L2, &frame(bcast, bridge_mac)), Hop::Drop), "the host's MAC");
        assert!(matches!(from_b.next_hop(Layer::L2, &frame(bcast, [3, 0, 0, 0, 0, 1])), Hop::Drop), "a group MAC");
        assert!(to_device(from_a.next_hop(Layer::L2, &frame(bridge_mac, mac_a))));
        assert!(to_device(from_a.next_hop(Layer::L2, &frame([3, 0, 0, 0, 0, 1], mac_a))));
        assert!(matches!(from_a.next_hop(Layer::L2, &[0u8; 11]), Hop::Drop), "runt frames");
    }

    /// Two members of a VPN, as `attach` records them: a at .2 and b at .3.
    fn two_members(vpn: &str) -> (Segments, PacketChannel, PacketChannel) {
        let segments = Segments::default();
        let (chan_a, _, _) = PacketChannel::in_memory(4);
        let (chan_b, _, _) = PacketChannel::in_memory(4);
        {
            let mut segs = segments.write().unwrap();
            let seg = segs.entry(vpn.into()).or_default();
            seg.members.insert("a".into(), chan_a.sender.clone());
            seg.members.insert("b".into(), chan_b.sender.clone());
            seg.addresses.insert(Ipv4Addr::new(10, 0, 0, 2), "a".into());
            seg.addresses.insert(Ipv4Addr::new(10, 0, 0, 3), "b".into());
        }
        (segments, chan_a, chan_b)
    }

    fn route(segments: &Segments, board: &str, address: Ipv4Addr) -> Route {
        Route {
            segments: segments.clone(),
            vpn: "v".into(),
            board: board.into(),
            address,
            bridge_mac: [2, 0, 0, 0, 0, 0xbb],
        }
    }

    /// On an L3 VPN a member sends only as its own address: a packet with another member's
    /// (or anyone's) source is dropped, neither forwarded to the other member nor left to
    /// the device (see also `an_l3_member_cannot_reach_the_host_with_a_forged_source`).
    #[test]
    fn an_l3_member_cannot_send_as_another() {
        let (segments, _a, _b) = two_members("v");
        let c = Ipv4Addr::new(10, 0, 0, 4);
        {
            let (chan_c, _, _) = PacketChannel::in_memory(4);
            let mut segs = segments.write().unwrap();
            let seg = segs.get_mut("v").unwrap();
            seg.members.insert("c".into(), chan_c.sender);
            seg.addresses.insert(c, "c".into());
        }
        let from_a = route(&segments, "a", Ipv4Addr::new(10, 0, 0, 2));
        let packet = |src: [u8; 4], dst: Ipv4Addr| {
            let mut p = [0u8; 28];
            p[0] = 0x45;
            p[12..16].copy_from_slice(&src);
            p[16..20].copy_from_slice(&dst.octets());
            p
        };
        assert!(forwarded(from_a.next_hop(Layer::L3, &packet([10, 0, 0, 2], c))).is_some(), "its own source");
        let host = Ipv4Addr::new(10, 0, 0, 1);
        assert!(to_device(from_a.next_hop(Layer::L3, &packet([10, 0, 0, 2], host))), "to the host");
        assert!(matches!(from_a.next_hop(Layer::L3, &packet([10, 0, 0, 3], c)), Hop::Drop), "b's source");
        assert!(matches!(from_a.next_hop(Layer::L3, &packet([192, 0, 2, 1], host)), Hop::Drop), "a foreign source");
        assert!(matches!(from_a.next_hop(Layer::L3, &[0x60; 40]), Hop::Drop), "IPv6");
    }

    /// One member sending frames from ever new MAC addresses fills only its share of the
    /// table: the others' addresses are still learned and switched directly.
    #[test]
    fn one_member_cannot_fill_the_mac_table() {
        let (segments, _a, _b) = two_members("v");
        let (from_a, from_b) =
            (route(&segments, "a", Ipv4Addr::UNSPECIFIED), route(&segments, "b", Ipv4Addr::UNSPECIFIED));
        for i in 0..MAX_LEARNED as u32 {
            let [_, x, y, z] = i.to_be_bytes();
            from_a.next_hop(Layer::L2, &frame([0xff; 6], [2, 1, 0, x, y, z]));
        }
        let learned_by_a = segments.read().unwrap()["v"].macs.len();
        assert_eq!(learned_by_a, MAX_LEARNED_PER_MEMBER);
        let mac_b = [2, 0, 0, 0, 0, 0xb];
        from_b.next_hop(Layer::L2, &frame([0xff; 6], mac_b));
        assert!(
            forwarded(from_a.next_hop(Layer::L2, &frame(mac_b, [2, 1, 0, 0, 0, 1]))).is_some(),
            "b's MAC was learned"
        );
        // Beyond its share, a's frames from new addresses go nowhere (the kernel bridge would
        // learn them); from its learned ones they still go.
        assert!(matches!(from_a.next_hop(Layer::L2, &frame([0xff; 6], [2, 1, 0, 0xff, 0, 0])), Hop::Drop));
        assert!(to_device(from_a.next_hop(Layer::L2, &frame([0xff; 6], [2, 1, 0, 0, 0, 1]))));
        // A member that re-attaches starts afresh.
        segments.write().unwrap().get_mut("v").unwrap().forget_macs_of("a");
        assert_eq!(segments.read().unwrap()["v"].learned.get("a"), None);
        assert_eq!(segments.read().unwrap()["v"].macs.len(), 1);
    }
}
