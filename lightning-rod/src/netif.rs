//! The board's network interfaces and their addresses, read over rtnetlink with every length
//! checked (what `getifaddrs(3)` reports, for `DeviceNetConfig` and the login's
//! `connectivity`).
//!
//! Not `getifaddrs(3)`: musl's trusts each attribute's length (its `RTA_OK` checks only that
//! 4 bytes remain, not that the attribute fits in its message), so one wrong length walks it
//! off the message into whatever memory follows, until it meets a zero length and loops
//! forever. qemu-user (7.2 here) produces exactly that on a big-endian guest: its
//! `host_to_target_for_each_rtattr` loops `while (len > sizeof(struct rtattr))`, so a
//! message's last attribute stays in the host's byte order when it is an empty one, and Linux
//! 6.x ends each `RTM_NEWLINK` with an empty nested `IFLA_DPLL_PIN` (`04 00 41 80`, read by the
//! MIPS guest as a 1,024-byte attribute). The MIPS (musl) agent under qemu-mips spun there
//! before its login. A real board's kernel writes its own byte order, but a parser that stops at
//! an attribute that does not fit (as the kernel's `nla_ok` and glibc's `RTA_OK` do) costs
//! nothing and cannot hang on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, sockopt};
use nix::sys::time::TimeVal;

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
/// `struct ifinfomsg` and `struct ifaddrmsg`.
const IFINFOMSG: usize = 16;
const IFADDRMSG: usize = 8;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// A dump that has not ended after this many reads is abandoned (no interface list is that long).
const MAX_READS: usize = 4096;

/// One interface: what `getifaddrs` reports for its link and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub up: bool,
    /// The first 6 bytes of the link-layer address (as `getifaddrs` reports a link address).
    pub mac: Option<[u8; 6]>,
    /// Addresses and prefix lengths, in the kernel's order.
    pub addrs: Vec<(IpAddr, u8)>,
}

/// The interfaces in the kernel's order, each with its addresses.
pub fn interfaces() -> std::io::Result<Vec<Interface>> {
    let fd = socket::socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(5, 0))?;
    let mut ifaces = Vec::new();
    dump(&fd, RTM_GETLINK, IFINFOMSG, 1, |msg| {
        if let Some(i) = parse_link(msg) {
            ifaces.push(i);
        }
    })?;
    dump(&fd, RTM_GETADDR, IFADDRMSG, 2, |msg| {
        if let Some((index, addr)) = parse_addr(msg)
            && let Some(i) = ifaces.iter_mut().find(|i| i.index == index)
        {
            i.addrs.push(addr);
        }
    })?;
    Ok(ifaces)
}

/// Sends a dump request and hands each reply message of the dumped kind (header included) to
/// `each`, until `NLMSG_DONE`.
fn dump(fd: &OwnedFd, kind: u16, body: usize, seq: u32, mut each: impl FnMut(&[u8])) -> std::io::Result<()> {
    let mut req = vec![0u8; NLMSG_HDR + body];
    req[0..4].copy_from_slice(&((NLMSG_HDR + body) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&kind.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    socket::send(fd.as_raw_fd(), &req, MsgFlags::empty())?;
    let mut buf = vec![0u8; 32 * 1024];
    for _ in 0..MAX_READS {
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            break;
        }
        for msg in messages(&buf[..n]) {
            let ty = u16::from_ne_bytes([msg[4], msg[5]]);
            if u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]) != seq {
                continue;
            }
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = msg.get(16..20).map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                    return Err(std::io::Error::from_raw_os_error(errno.checked_neg().unwrap_or(libc::EIO)));
                }
                _ => each(msg),
            }
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the rtnetlink dump did not end"))
}

/// The netlink messages in `buf`, up to the first whose length does not fit.
fn messages(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        if len < NLMSG_HDR || len > rest.len() {
            return None;
        }
        let msg = &rest[..len];
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some(msg)
    })
}

/// `(type, payload)` of the attributes in `buf`, up to the first whose length does not fit
/// (the kernel's `nla_ok`).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let len = u16::from_ne_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(rest.get(2..4)?.try_into().ok()?);
        if len < 4 || len > rest.len() {
            return None;
        }
        let payload = &rest[4..len];
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some((ty & 0x3fff, payload))
    })
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

fn parse_link(msg: &[u8]) -> Option<Interface> {
    if u16::from_ne_bytes([msg[4], msg[5]]) != RTM_NEWLINK {
        return None;
    }
    let info = msg.get(NLMSG_HDR..NLMSG_HDR + IFINFOMSG)?;
    let index = u32::from_ne_bytes(info[4..8].try_into().ok()?);
    let flags = u32::from_ne_bytes(info[8..12].try_into().ok()?);
    let (mut name, mut mac) = (None, None);
    for (ty, data) in attrs(&msg[NLMSG_HDR + IFINFOMSG..]) {
        match ty {
            IFLA_IFNAME => name = Some(String::from_utf8_lossy(data.split(|&b| b == 0).next()?).into_owned()),
            IFLA_ADDRESS => {
                let mut m = [0u8; 6];
                let n = data.len().min(6);
                m[..n].copy_from_slice(&data[..n]);
                mac = Some(m);
            }
            _ => {}
        }
    }
    Some(Interface { index, name: name?, up: flags & libc::IFF_UP as u32 != 0, mac, addrs: Vec::new() })
}

fn parse_addr(msg: &[u8]) -> Option<(u32, (IpAddr, u8))> {
    if u16::from_ne_bytes([msg[4], msg[5]]) != RTM_NEWADDR {
        return None;
    }
    let info = msg.get(NLMSG_HDR..NLMSG_HDR + IFADDRMSG)?;
    let (family, prefix) = (info[0] as i32, info[1]);
    let index = u32::from_ne_bytes(info[4..8].try_into().ok()?);
    let (mut address, mut local) = (None, None);
    for (ty, data) in attrs(&msg[NLMSG_HDR + IFADDRMSG..]) {
        let ip = match (family, data.len()) {
            (libc::AF_INET, 4) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?)),
            (libc::AF_INET6, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => continue,
        };
        match ty {
            IFA_ADDRESS => address = Some(ip),
            IFA_LOCAL => local = Some(ip),
            _ => {}
        }
    }
    // The interface's own address: IFA_LOCAL where there is one (IFA_ADDRESS is then the peer
    // of a point-to-point link), as getifaddrs reports it.
    Some((index, (local.or(address)?, prefix)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut a = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(data);
        a.resize(align4(a.len()), 0);
        a
    }

    /// The message qemu-user hands a big-endian guest: its last, empty attribute left in the
    /// other byte order, so its length reads as 1,024.
    #[test]
    fn an_attribute_that_does_not_fit_ends_the_list() {
        let mut buf = attr(IFLA_IFNAME, b"eth0\0");
        buf.extend(attr(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1]));
        let mut last = attr(0x8041, &[]);
        last[..2].reverse();
        buf.extend(&last);
        let got: Vec<_> = attrs(&buf).map(|(t, _)| t).collect();
        assert_eq!(got, [IFLA_IFNAME, IFLA_ADDRESS]);
        // Lengths below a header or beyond the buffer, and truncated headers, end it too.
        for (len, body) in [(0u16, 0usize), (3, 0), (9, 1)] {
            let mut b = len.to_ne_bytes().to_vec();
            b.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
            b.resize(4 + body, 0);
            assert_eq!(attrs(&b).count(), 0, "{b:?}");
        }
        assert_eq!(attrs(&8u16.to_ne_bytes()).count(), 0);
        // A message whose length does not fit ends the message list the same way.
        let mut msgs = vec![0u8; NLMSG_HDR];
        msgs[..4].copy_from_slice(&(NLMSG_HDR as u32 + 1).to_ne_bytes());
        assert_eq!(messages(&msgs).count(), 0);
    }

    /// The same interfaces, flags, link and IP addresses as the C library's `getifaddrs`.
    #[test]
    fn matches_getifaddrs() {
        let ours = interfaces().unwrap();
        assert!(!ours.is_empty(), "no interface at all (not even lo)");
        let mut libc_view: Vec<Interface> = Vec::new();
        for a in nix::ifaddrs::getifaddrs().unwrap() {
            let idx = match libc_view.iter().position(|i| i.name == a.interface_name) {
                Some(i) => i,
                None => {
                    let up = a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
                    libc_view.push(Interface {
                        index: 0,
                        name: a.interface_name.clone(),
                        up,
                        mac: None,
                        addrs: Vec::new(),
                    });
                    libc_view.len() - 1
                }
            };
            let Some(addr) = a.address else { continue };
            if let Some(link) = addr.as_link_addr() {
                libc_view[idx].mac = link.addr();
            } else if let Some(v4) = addr.as_sockaddr_in() {
                let p = a.netmask.and_then(|m| m.as_sockaddr_in().map(|m| m.ip().to_bits().count_ones() as u8));
                libc_view[idx].addrs.push((IpAddr::V4(v4.ip()), p.unwrap_or(32)));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                let p = a.netmask.and_then(|m| m.as_sockaddr_in6().map(|m| m.ip().to_bits().count_ones() as u8));
                libc_view[idx].addrs.push((IpAddr::V6(v6.ip()), p.unwrap_or(128)));
            }
        }
        // getifaddrs does not report the index.
        let ours: Vec<_> = ours.into_iter().map(|i| Interface { index: 0, ..i }).collect();
        assert_eq!(ours, libc_view);
    }
}
