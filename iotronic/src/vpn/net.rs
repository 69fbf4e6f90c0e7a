//! The few rtnetlink operations the cloud end of VPNs needs: bridges, enslaving, addresses,
//! host routes, link removal, and the kernel `gretap` probe.

use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkGre, LinkUnspec, RouteMessageBuilder};

use crate::Error;

fn err(what: String, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("{what}: {e}"))
}

const EEXIST: i32 = 17;
const ENODEV: i32 = 19;

/// `EEXIST` from the kernel: the thing is already there.
fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -EEXIST)
}

/// The host-wide reverse-path filter: Linux filters an interface by the higher of this and
/// the interface's own setting, and 2 (loose) is higher than 1 (strict).
const RP_FILTER_ALL: &str = "/proc/sys/net/ipv4/conf/all/rp_filter";

/// Fails (`Unavailable`) unless VPN interface `name` can filter reverse paths strictly: not
/// while `net.ipv4.conf.all.rp_filter` is 2 (Ubuntu's default), which makes every interface
/// loose whatever its own setting, so that an L2 member could send the host packets from any
/// routable source. The host-wide setting is the operator's, never changed here.
fn strict_rp_filter_possible(name: &str) -> Result<(), Error> {
    let all = std::fs::read_to_string(RP_FILTER_ALL).map_err(|e| err(format!("reading {RP_FILTER_ALL}"), e))?;
    match all.trim() {
        "0" | "1" => Ok(()),
        v => Err(Error::Unavailable(format!(
            "net.ipv4.conf.all.rp_filter is {v}: the VPN interface {name} would filter reverse paths loosely; \
             set it to 0 or 1 (the VPN interfaces are then strict) to run VPNs on this host"
        ))),
    }
}

/// Makes the host refuse what a board could forge through VPN interface `name`: strict
/// reverse-path filtering (a packet whose source the host would not route back through this
/// interface is dropped, so a member cannot send as an address of another VPN, of the host's
/// networks or of the internet) and no IPv6 on it (no router advertisements or link-local
/// traffic from boards reach the host), and no forwarding of what comes in on it (on a host
/// with `ip_forward` on, as many are, a board could otherwise reach another VPN's members,
/// another project's, through the host's routes to them). Packets between members never
/// reach the kernel (the pump routes them), so only what is meant for the host is filtered.
/// Refused while the filter cannot be strict ([`strict_rp_filter_possible`]).
pub fn harden(name: &str) -> Result<(), Error> {
    strict_rp_filter_possible(name)?;
    wstunnel::packet::harden_interface(name).map_err(|(path, e)| err(format!("writing {path}"), e))
}

/// A netlink connection; its task ends when the `Net` is dropped.
pub struct Net {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Net {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn name_of(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

impl Net {
    pub fn open() -> Result<Net, Error> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| err("rtnetlink".into(), e))?;
        Ok(Net { handle, conn: tokio::spawn(conn) })
    }

    /// The index of interface `name`, if it exists.
    pub async fn index(&self, name: &str) -> Result<Option<u32>, Error> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(m)) => Ok(Some(m.header.index)),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -ENODEV => Ok(None),
            Err(e) => Err(err(format!("looking up {name}"), e)),
        }
    }

    /// Every interface whose name starts with `prefix`: its name and its alias (`ip link set
    /// … alias`), if it has one.
    pub async fn links_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Option<String>)>, Error> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = links.try_next().await.map_err(|e| err("listing links".into(), e))? {
            if let Some(n) = name_of(&m).filter(|n| n.starts_with(prefix)) {
                let alias = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfAlias(a) => Some(a.clone()),
                    _ => None,
                });
                out.push((n.to_owned(), alias));
            }
        }
        Ok(out)
    }

    /// Creates bridge `name` (up, [hardened](harden)) unless it exists, and gives it `alias`
    /// (the owner's mark: an existing bridge is adopted); returns its index.
    pub async fn ensure_bridge(&self, name: &str, alias: &str) -> Result<u32, Error> {
        // Checked first too: a bridge that cannot be hardened is not made.
        strict_rp_filter_possible(name)?;
        let index = match self.index(name).await? {
            Some(i) => i,
            None => {
                let m = LinkBridge::new(name).address(super::names::mac(name).to_vec()).build();
                match self.handle.link().add(m).execute().await {
                    Ok(()) => {}
                    Err(e) if exists(&e) => {}
                    Err(e) => return Err(err(format!("creating bridge {name}"), e)),
                }
                self.index(name).await?.ok_or_else(|| err(format!("bridge {name}"), "vanished after creation"))?
            }
        };
        // Set on every call: a bridge made before bridges carried marks is adopted too.
        let m = LinkUnspec::new_with_index(index).alias(alias).build();
        self.handle.link().set(m).execute().await.map_err(|e| err(format!("naming bridge {name}'s owner"), e))?;
        harden(name)?;
        Ok(index)
    }

    /// Sets the MAC of `index`, puts it into `bridge` (or none) and brings it up.
    pub async fn attach(&self, index: u32, mac: Option<[u8; 6]>, bridge: Option<u32>) -> Result<(), Error> {
        let mut m = LinkUnspec::new_with_index(index).up();
        if let Some(mac) = mac {
            m = m.address(mac.to_vec());
        }
        if let Some(b) = bridge {
            m = m.controller(b);
        }
        self.handle.link().set(m.build()).execute().await.map_err(|e| err(format!("link {index} up"), e))
    }

    /// Adds `addr/prefix` to `index` (already there is fine).
    pub async fn add_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), Error> {
        match self.handle.address().add(index, addr.into(), prefix).execute().await {
            Ok(()) => Ok(()),
            Err(e) if exists(&e) => Ok(()),
            Err(e) => Err(err(format!("adding {addr}/{prefix} to link {index}"), e)),
        }
    }

    /// Routes `dest/32` through `index` (replacing an older route).
    pub async fn host_route(&self, dest: Ipv4Addr, index: u32) -> Result<(), Error> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dest, 32).output_interface(index).build();
        self.handle.route().add(r).replace().execute().await.map_err(|e| err(format!("route {dest}/32"), e))
    }

    /// Deletes interface `name` if it exists.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        if let Some(i) = self.index(name).await? {
            match self.handle.link().del(i).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -ENODEV => {}
                Err(e) => return Err(err(format!("deleting {name}"), e)),
            }
        }
        Ok(())
    }

    /// Whether link `index` is a bridge port in the forwarding state. A port enabled by the
    /// kernel's link watch (its device's carrier) may be a moment late.
    #[cfg(test)]
    pub async fn forwarding(&self, index: u32) -> Result<bool, Error> {
        use rtnetlink::packet_route::link::{BridgePortState, InfoBridgePort, InfoPortData, LinkInfo};
        let mut links = self.handle.link().get().match_index(index).execute();
        let m = links.try_next().await.map_err(|e| err(format!("link {index}"), e))?;
        let port = m.iter().flat_map(|m| &m.attributes).find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::PortData(InfoPortData::BridgePort(p)) => Some(p),
                _ => None,
            }),
            _ => None,
        });
        Ok(port.is_some_and(|p| p.contains(&InfoBridgePort::State(BridgePortState::Forwarding))))
    }

    /// How many MAC addresses a bridge learned on its port `index` (the entries of its
    /// forwarding database there that are neither permanent nor static).
    #[cfg(test)]
    pub async fn learned_on(&self, index: u32) -> Result<usize, Error> {
        use rtnetlink::packet_route::AddressFamily;
        use rtnetlink::packet_route::neighbour::NeighbourState;
        let mut fdb = self.handle.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
        let mut n = 0;
        while let Some(m) = fdb.try_next().await.map_err(|e| err("listing the bridge FDB".into(), e))? {
            let learned = !matches!(m.header.state, NeighbourState::Permanent | NeighbourState::Noarp);
            n += usize::from(m.header.ifindex == index && learned);
        }
        Ok(n)
    }

    /// Whether this kernel can create `gretap` links (the `ip_gre` module): creates a probe
    /// link and deletes it at once.
    pub async fn gretap_available(&self) -> Result<(), String> {
        // Per process, so that two clouds probing in one namespace do not meet.
        let probe = format!("s4tg{:08x}", std::process::id());
        let m = LinkGre::new_gretap(&probe).local(Ipv4Addr::LOCALHOST).remote(Ipv4Addr::LOCALHOST).build();
        let r = self.handle.link().add(m).execute().await.map_err(|e| e.to_string());
        let _ = self.delete(&probe).await;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctl(path: &str) -> String {
        std::fs::read_to_string(path).unwrap().trim().to_owned()
    }

    /// The cloud's VPN interfaces filter forged sources and carry no IPv6, in a private
    /// network namespace (needs root). On a host whose reverse-path filter is loose for every
    /// interface (`all` 2) none is made: it could not be strict.
    #[test]
    fn vpn_interfaces_refuse_forged_sources_and_ipv6() {
        super::super::in_private_netns(|| async {
            let net = Net::open().unwrap();
            std::fs::write(RP_FILTER_ALL, "2").unwrap();
            match net.ensure_bridge("s4btest0", "s4t test").await {
                Err(Error::Unavailable(m)) => assert!(m.contains("net.ipv4.conf.all.rp_filter is 2"), "{m}"),
                r => panic!("a bridge was made under a loose reverse-path filter: {r:?}"),
            }
            assert_eq!(net.index("s4btest0").await.unwrap(), None, "the refused bridge was made");
            assert!(harden("lo").is_err(), "a device hardened under a loose reverse-path filter");
            std::fs::write(RP_FILTER_ALL, "0").unwrap();
            // New interfaces inherit the default: a host that forwards.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
            std::fs::write("/proc/sys/net/ipv4/conf/default/forwarding", "1").unwrap();
            net.ensure_bridge("s4btest0", "s4t test").await.unwrap();
            assert_eq!(sysctl("/proc/sys/net/ipv4/conf/s4btest0/rp_filter"), "1");
            assert_eq!(sysctl("/proc/sys/net/ipv4/conf/s4btest0/forwarding"), "0");
            if std::path::Path::new("/proc/sys/net/ipv6").exists() {
                assert_eq!(sysctl("/proc/sys/net/ipv6/conf/s4btest0/disable_ipv6"), "1");
            }
        });
    }
}
