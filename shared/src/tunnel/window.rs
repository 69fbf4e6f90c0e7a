//! Per-stream credit-based flow control, sans-I/O.
//!
//! Each side of a stream may send at most the credit the other side granted: the initial
//! window from `Welcome`, plus every `Window` increment. The receiver grants more only as it
//! drains bytes to the TCP socket, so what one stream can make its receiver buffer is bounded
//! by the window, whatever the TCP reader's speed.

/// The receiving half: checks the peer stays within its credit and decides when to grant more.
#[derive(Debug, Clone)]
pub struct RecvWindow {
    window: u32,
    /// Bytes the peer may still send before it needs more credit.
    remaining: u32,
    /// Bytes drained to the socket and not yet granted back.
    drained: u32,
}

/// The peer sent more than its credit allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer sent {len} bytes with only {remaining} bytes of credit")]
pub struct Overrun {
    pub len: usize,
    pub remaining: u32,
}

impl RecvWindow {
    pub fn new(window: u32) -> RecvWindow {
        RecvWindow { window, remaining: window, drained: 0 }
    }

    /// `len` bytes arrived; fails if that overruns the credit.
    pub fn on_data(&mut self, len: usize) -> Result<(), Overrun> {
        match u32::try_from(len) {
            Ok(n) if n <= self.remaining => {
                self.remaining -= n;
                Ok(())
            }
            _ => Err(Overrun { len, remaining: self.remaining }),
        }
    }

    /// `len` bytes were written to the socket. Returns the increment to send to the peer once
    /// a quarter of the window has drained (batching updates), or `None`.
    pub fn on_drained(&mut self, len: usize) -> Option<u32> {
        self.drained = self.drained.saturating_add(u32::try_from(len).unwrap_or(u32::MAX));
        if self.drained >= (self.window / 4).max(1) {
            let inc = self.drained.min(self.window - self.remaining);
            self.drained = 0;
            self.remaining += inc;
            (inc > 0).then_some(inc)
        } else {
            None
        }
    }
}

/// The sending half: the credit left.
#[derive(Debug, Clone)]
pub struct SendWindow {
    credit: u64,
}

/// A `Window` increment pushed the credit past what any sane receiver grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("window update overflows the credit")]
pub struct CreditOverflow;

/// No receiver may grant more than this in total outstanding credit.
pub const MAX_CREDIT: u64 = 1 << 31;

impl SendWindow {
    pub fn new(initial: u32) -> SendWindow {
        SendWindow { credit: initial as u64 }
    }

    pub fn credit(&self) -> u64 {
        self.credit
    }

    pub fn on_window(&mut self, increment: u32) -> Result<(), CreditOverflow> {
        let c = self.credit + increment as u64;
        if c > MAX_CREDIT {
            return Err(CreditOverflow);
        }
        self.credit = c;
        Ok(())
    }

    /// Takes up to `want` bytes of credit; returns how much was taken (0 when blocked).
    pub fn take(&mut self, want: usize) -> usize {
        let n = (want as u64).min(self.credit);
        self.credit -= n;
        n as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_enforces_credit_and_grants_back_what_drained() {
        let mut r = RecvWindow::new(1000);
        r.on_data(600).unwrap();
        r.on_data(400).unwrap();
        assert_eq!(r.on_data(1), Err(Overrun { len: 1, remaining: 0 }));
        assert_eq!(r.on_drained(100), None, "below a quarter of the window");
        assert_eq!(r.on_drained(200), Some(300));
        r.on_data(300).unwrap();
        assert!(r.on_data(1).is_err());
        assert_eq!(r.on_drained(700), Some(700));
        // Never grants more than the window in total.
        assert_eq!(r.on_drained(1000), Some(300));
    }

    #[test]
    fn sender_takes_only_what_it_has() {
        let mut s = SendWindow::new(10);
        assert_eq!(s.take(4), 4);
        assert_eq!(s.take(100), 6);
        assert_eq!(s.take(1), 0);
        s.on_window(5).unwrap();
        assert_eq!(s.take(100), 5);
        assert_eq!(s.on_window(u32::MAX).and_then(|_| s.on_window(u32::MAX)), Err(CreditOverflow));
    }
}
