//! VPN overlays on the board: a TUN (L3, raw IP packets) or TAP (L2, Ethernet frames in
//! GRE-TAP framing, RFC 2784 protocol 0x6558, done in user space because the kernel may lack
//! `ip_gre`) device, pumped to and from a packet channel of the tunnel.
//!
//! Devices come from `tun-rs` (maintained, async on tokio; `tun-tap`'s default features pull
//! tokio 0.1). Addresses, MTU and link state are set through rtnetlink. A device is not
//! persistent: it disappears with its file descriptor, so dropping the [`Overlay`] (removal,
//! agent exit, even a crash) removes the interface.
//!
//! The device is pumped straight to the packet channel ([`PacketPipe`], the tunnel's
//! [`wstunnel::packet::PacketChannel`]) by [`wstunnel::packet::pump_routed`], the pump the
//! cloud runs too: one task, no queue or task hop between the device and the channel's socket.
//! Sending waits for the channel's socket (TCP's own backpressure); packets the tunnel
//! receives while the overlay lags are dropped at its bounded queue, as a congested link
//! would. A malformed GRE packet from the network is counted and dropped.

use std::net::Ipv4Addr;
use std::sync::Arc;

use futures_util::TryStreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The tunnel side of an overlay: the packet channel (tests and fakes use
/// [`PacketChannel::in_memory`](wstunnel::packet::PacketChannel::in_memory)).
pub type PacketPipe = wstunnel::packet::PacketChannel;
/// Counters of one overlay.
pub type Stats = wstunnel::packet::PumpStats;

/// Overlay MTU. Jumbo, just under the 64 KiB an IP packet can be: the packets travel inside a
/// TCP (WebSocket) connection, never as IP on the path, so the path MTU does not apply, and
/// every packet costs a trip through both agents' pumps and the cloud, so the fewer packets
/// per byte the better (65,000-byte packets move 7 times the data per trip of 9,000-byte
/// ones, 46 times that of 1,400-byte ones). An Ethernet frame of this MTU plus the GRE header
/// fits a packet channel's 65,535 bytes. TCP over the VPN negotiates its MSS from both ends'
/// MTU, so peers with a smaller MTU still interoperate.
pub const DEFAULT_MTU: u16 = 65000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    L2,
    L3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySpec {
    pub interface: String,
    pub layer: Layer,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub mtu: u16,
}

/// A live overlay; dropping it stops the pump and removes the interface.
pub struct Overlay {
    pub interface: String,
    pub stats: Arc<Stats>,
    cancel: CancellationToken,
    /// `None` only while `remove` awaits it.
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("interface", &self.interface).finish_non_exhaustive()
    }
}

/// Linux interface names: 1..=15 characters of `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// True when `ip` lies in the subnet `address/prefix_len` (the route an overlay adds).
pub fn subnet_contains(address: Ipv4Addr, prefix_len: u8, ip: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len.min(32))).unwrap_or(0);
    u32::from(address) & mask == u32::from(ip) & mask
}

/// The gateways of the default routes in `/proc/net/route` text, with their interfaces.
pub fn default_gateways(route_table: &str) -> Vec<(String, Ipv4Addr)> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    route_table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, gw, flags, mask) =
                (f.first()?, hex(f.get(1)?)?, hex(f.get(2)?)?, hex(f.get(3)?)?, hex(f.get(7)?)?);
            // The kernel prints the network-order address as a host-order number.
            let up_default = dest == 0 && mask == 0 && flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY;
            (up_default && gw != 0).then(|| ((*iface).to_owned(), Ipv4Addr::from(gw.to_ne_bytes())))
        })
        .collect()
}

/// The default gateways of the calling thread's network namespace (none when unreadable).
pub fn system_default_gateways() -> Vec<(String, Ipv4Addr)> {
    ["/proc/thread-self/net/route", "/proc/net/route"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| default_gateways(&t))
        .unwrap_or_default()
}

/// The IPv4 name servers `resolv.conf` text lists.
pub fn nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse().ok())
        .collect()
}

/// The name servers the board resolves the cloud's names with: those of `/etc/resolv.conf`,
/// or, where that lists only a local stub (systemd-resolved's 127.0.0.53), the stub's own
/// upstream ones (none when unreadable).
pub fn system_nameservers() -> Vec<Ipv4Addr> {
    let read = |p: &str| std::fs::read_to_string(p).map(|t| nameservers(&t)).unwrap_or_default();
    let listed = read("/etc/resolv.conf");
    if listed.iter().all(Ipv4Addr::is_loopback) {
        return read("/run/systemd/resolve/resolv.conf").into_iter().filter(|ip| !ip.is_loopback()).collect();
    }
    listed
}

fn net_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Net { what: what.to_owned(), reason: e.to_string() }
}

impl Overlay {
    /// Creates the device, configures it and starts pumping packets.
    pub async fn create(spec: &OverlaySpec, pipe: PacketPipe) -> Result<Overlay> {
        let name = spec.interface.clone();
        if !valid_ifname(&name) {
            return Err(net_err(&format!("interface {name:?}"), "not a valid interface name (1-15 of A-Za-z0-9_.-)"));
        }
        if spec.prefix_len == 0 || spec.prefix_len > 32 {
            return Err(net_err(&name, format!("prefix length {} not in 1..=32", spec.prefix_len)));
        }
        let layer = match spec.layer {
            Layer::L2 => tun_rs::Layer::L2,
            Layer::L3 => tun_rs::Layer::L3,
        };
        let device = tun_rs::DeviceBuilder::new()
            .name(&name)
            .layer(layer)
            .build_async()
            .map_err(|e| net_err(&format!("creating {name}"), e))?;
        let index = device.if_index().map_err(|e| net_err(&name, e))?;
        harden(&name)?;
        let mac = (spec.layer == Layer::L2).then(|| stable_mac(&name, spec.address));
        configure(index, &name, spec.address, spec.prefix_len, spec.mtu, mac).await?;
        let stats = Arc::new(Stats::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(pump(device, pipe, spec.layer, stats.clone(), cancel.clone(), name.clone()));
        tracing::info!(interface = %name, layer = ?spec.layer, address = %spec.address, prefix = spec.prefix_len, "overlay up");
        Ok(Overlay { interface: name, stats, cancel, task: Some(task) })
    }

    /// False once the pump stopped (the tunnel channel closed or the device failed).
    pub fn is_alive(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the pump and waits until the device is closed (the interface is gone).
    pub async fn remove(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Makes the board refuse what another member of the VPN could send it through interface
/// `name`, before the link is up: no IPv6 on it (a member's router advertisement would give
/// every other member an address and a default route through that member, ahead of its own
/// LAN's), no forwarding of what comes in on it (on a board with `ip_forward` on, a gateway or
/// one running containers, a member could route packets through it into its LAN or another
/// VPN it belongs to), and strict reverse-path filtering (a packet whose source the board
/// would not route back through the VPN is dropped, so no member makes it answer elsewhere).
fn harden(name: &str) -> Result<()> {
    wstunnel::packet::harden_interface(name).map_err(|(path, e)| net_err(&format!("writing {path}"), e))
}

/// A TAP's MAC address, derived from its name and address: locally administered, unicast,
/// and the same after every restart of the agent, so the VPN's peers keep a valid ARP entry
/// for this board (a random MAC per start would blackhole it until their entries expire).
pub fn stable_mac(interface: &str, address: Ipv4Addr) -> [u8; 6] {
    use sha2::Digest;
    let d = sha2::Sha256::new().chain_update(interface.as_bytes()).chain_update(address.octets()).finalize();
    [(d[0] & 0xfe) | 0x02, d[1], d[2], d[3], d[4], d[5]]
}

/// Address, MTU and link up, over rtnetlink.
async fn configure(
    index: u32,
    name: &str,
    address: Ipv4Addr,
    prefix: u8,
    mtu: u16,
    mac: Option<[u8; 6]>,
) -> Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| net_err("rtnetlink", e))?;
    let conn = tokio::spawn(conn);
    let result = async {
        handle
            .address()
            .add(index, address.into(), prefix)
            .execute()
            .await
            .map_err(|e| net_err(&format!("{name}: adding {address}/{prefix}"), e))?;
        let mut msg = rtnetlink::LinkUnspec::new_with_index(index).mtu(u32::from(mtu)).up();
        if let Some(mac) = mac {
            msg = msg.address(mac.to_vec());
        }
        let msg = msg.build();
        handle.link().set(msg).execute().await.map_err(|e| net_err(&format!("{name}: link up, mtu {mtu}"), e))?;
        // Read it back: the link must exist and be up in this namespace.
        let mut links = handle.link().get().match_index(index).execute();
        links.try_next().await.map_err(|e| net_err(name, e))?.ok_or_else(|| net_err(name, "vanished"))?;
        Ok(())
    }
    .await;
    conn.abort();
    result
}

async fn pump(
    device: tun_rs::AsyncDevice,
    pipe: PacketPipe,
    layer: Layer,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    name: String,
) {
    let layer = match layer {
        Layer::L2 => wstunnel::packet::Layer::L2,
        Layer::L3 => wstunnel::packet::Layer::L3,
    };
    if let Err(e) =
        wstunnel::packet::pump_routed(&device, pipe, layer, cancel, &stats, |_| wstunnel::packet::Hop::Device).await
    {
        tracing::error!(interface = %name, cause = %e, "overlay pump failed");
    }
    tracing::info!(interface = %name, "overlay pump stopped");
}
