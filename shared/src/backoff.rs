//! Capped, jittered exponential backoff.
//!
//! Board links flap: cellular modems drop, NAT mappings expire, the cloud restarts. Every
//! reconnecting loop (WAMP session, tunnel channel) waits `Backoff::next_delay()` between
//! attempts and calls `Backoff::reset()` once a connection has proved healthy. Jitter spreads a
//! fleet's reconnects after a cloud restart instead of having every board knock at once.

use std::time::Duration;

/// Backoff policy: delays grow from `initial` by `factor` up to `max`, each drawn uniformly
/// from `[delay / 2, delay]` ("equal jitter").
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    factor: u32,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff { initial, max: max.max(initial), factor: 2, current: initial }
    }

    /// The delay to wait before the next attempt; advances the policy.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = self.current.saturating_mul(self.factor).min(self.max);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_micros() as u64;
        let jitter = if spread == 0 { 0 } else { rand::random_range(0..=spread) };
        half + Duration::from_micros(jitter)
    }

    /// Back to the initial delay, after a connection proved healthy.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

impl Default for Backoff {
    /// 500 ms growing to 30 s: quick after a blip, gentle on a cloud that is down.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for d in &delays {
            assert!(*d <= Duration::from_secs(1), "{d:?} exceeds the cap");
        }
        // After enough steps the ceiling is the cap: every delay is in [max/2, max].
        assert!(delays[9] >= Duration::from_millis(500));
    }

    #[test]
    fn reset_returns_to_initial() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(10));
        for _ in 0..8 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }
}
