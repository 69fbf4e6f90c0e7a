//! Per-source-address bounds, shared by the cloud's listeners (REST, WAMP) and the tunnel server.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts per source address, up to a maximum each.
#[derive(Debug)]
pub struct SourceSlots {
    counts: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

/// One slot of a source, given back when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    slots: Arc<SourceSlots>,
    ip: IpAddr,
}

impl SourceSlots {
    pub fn new(max: usize) -> Arc<SourceSlots> {
        Arc::new(SourceSlots { counts: Mutex::new(HashMap::new()), max })
    }

    /// A slot for `ip`, unless it holds `max` already.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot { slots: self.clone(), ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}
