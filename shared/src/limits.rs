//! Per-source-address bounds, shared by the cloud's listeners (REST, WAMP) and the tunnel server.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// What per-source bounds count by: an IPv4 address (also written as an IPv4-mapped IPv6
/// one), or the /64 network of an IPv6 address. One IPv6 host usually has a whole /64 to
/// itself (SLAAC, privacy addresses), so a bound per IPv6 address would bound nobody.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

/// Counts per key, up to a maximum each: what one peer, board or session holds of something
/// shared.
#[derive(Debug)]
pub struct KeyedSlots<K> {
    counts: Mutex<HashMap<K, usize>>,
    max: usize,
}

/// One slot of a key, given back when dropped.
#[derive(Debug)]
pub struct KeyedSlot<K: Eq + Hash> {
    slots: Arc<KeyedSlots<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> KeyedSlots<K> {
    pub fn new(max: usize) -> Arc<KeyedSlots<K>> {
        Arc::new(KeyedSlots { counts: Mutex::new(HashMap::new()), max })
    }

    /// A slot for `key`, unless it holds `max` already.
    pub fn take(self: &Arc<Self>, key: K) -> Option<KeyedSlot<K>> {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.clone()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeyedSlot { slots: self.clone(), key })
    }
}

impl<K: Eq + Hash> Drop for KeyedSlot<K> {
    fn drop(&mut self) {
        let mut m = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Counts per source ([`source_of`]), up to a maximum each.
#[derive(Debug)]
pub struct SourceSlots(Arc<KeyedSlots<IpAddr>>);

/// One slot of a source, given back when dropped.
pub type SourceSlot = KeyedSlot<IpAddr>;

impl SourceSlots {
    pub fn new(max: usize) -> Arc<SourceSlots> {
        Arc::new(SourceSlots(KeyedSlots::new(max)))
    }

    /// A slot for `ip`'s source, unless it holds `max` already.
    pub fn take(&self, ip: IpAddr) -> Option<SourceSlot> {
        self.0.take(source_of(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Addresses of one IPv6 /64 share their source's slots; IPv4, written either way, counts
    /// by address.
    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let slots = SourceSlots::new(2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let held: Vec<_> =
            ["2001:db8:1:2::1", "2001:db8:1:2:aaaa::7"].iter().map(|a| slots.take(ip(a)).unwrap()).collect();
        assert!(slots.take(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")).is_none(), "a third address of the /64");
        assert!(slots.take(ip("2001:db8:1:3::1")).is_some(), "another /64");
        let _v4 = slots.take(ip("192.0.2.1")).unwrap();
        let _mapped = slots.take(ip("::ffff:192.0.2.1")).unwrap();
        assert!(slots.take(ip("192.0.2.1")).is_none(), "an IPv4-mapped address is its IPv4 address");
        assert!(slots.take(ip("192.0.2.2")).is_some());
        drop(held);
        assert!(slots.take(ip("2001:db8:1:2::9")).is_some(), "slots come back when dropped");
    }
}
