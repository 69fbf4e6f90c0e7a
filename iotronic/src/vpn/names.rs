//! Interface names of the cloud end of VPNs: deterministic (the same ids give the same names
//! in every process and after every restart, so a restarted cloud finds its bridges again)
//! and within IFNAMSIZ (15 characters; the original truncated longer names and could collide).
//!
//! A name is a 3-letter prefix and 12 hex digits of SHA-256 over the ids: 48 bits, so two
//! VPNs (or memberships) of one cloud collide with negligible probability, and the prefixes
//! tell our interfaces from anybody else's.

use sha2::{Digest, Sha256};

/// Prefix of per-VPN bridges (L2).
pub const BRIDGE_PREFIX: &str = "s4b";
/// Prefix of per-member TAP (L2) or TUN (L3) devices.
pub const PORT_PREFIX: &str = "s4v";

fn hashed(prefix: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    let hex: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// A stable MAC address for the device or bridge named `name`: locally administered, unicast.
/// Stable so that a restarted cloud answers ARP with the same address as before (a bridge
/// otherwise takes the lowest MAC of its ports, which changes as boards come and go).
pub fn mac(name: &str) -> [u8; 6] {
    let d = Sha256::digest(name.as_bytes());
    [(d[0] & 0xfe) | 0x02, d[1], d[2], d[3], d[4], d[5]]
}

/// The bridge of an L2 VPN.
pub fn bridge(vpn: &str) -> String {
    hashed(BRIDGE_PREFIX, &[vpn])
}

/// The cloud's device for `board` in `vpn`.
pub fn port(vpn: &str, board: &str) -> String {
    hashed(PORT_PREFIX, &[vpn, board])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_distinct_and_fit_ifnamsiz() {
        let (v, b) = ("7f6c1a52-0000-4000-8000-000000000001", "2b1c0e6e-0000-4000-8000-000000000002");
        assert_eq!(bridge(v), bridge(v));
        assert_eq!(port(v, b), port(v, b));
        assert_ne!(port(v, b), port(b, v), "the order of the ids matters");
        assert_ne!(port("ab", "c"), port("a", "bc"), "ids are separated");
        for n in [bridge(v), port(v, b), bridge(""), port("", "")] {
            assert_eq!(n.len(), 15, "{n}");
            assert!(n.chars().all(|c| c.is_ascii_alphanumeric()), "{n}");
        }
        assert!(bridge(v).starts_with(BRIDGE_PREFIX) && port(v, b).starts_with(PORT_PREFIX));
        let m = mac(&bridge(v));
        assert_eq!((m[0] & 1, m[0] & 2), (0, 2), "unicast, locally administered");
        assert_eq!(m, mac(&bridge(v)));
    }
}
