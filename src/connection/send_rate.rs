//! The least rate at which a client must take its responses
//! (`limits.min_send_rate_bytes_per_sec`, measured over `limits.send_rate_window_ms`).
//!
//! Only time the edge spends waiting on the client counts: a write the socket does not
//! take because its buffer is full, the client reading no faster. Time spent fetching
//! from an origin, or waiting for the next request, does not. Once the waits add up to a
//! window, the client must have taken `rate × window` bytes since the window began;
//! otherwise the connection is closed. Either way a new window begins.
//!
//! A client that reads one byte now and then keeps the idle deadline from ever passing,
//! and holds the slices of its response for as long as it likes; this bounds that. A
//! player whose buffer is full and pauses reading waits on the idle deadline as before
//! (no bytes at all for a window is also too slow, so `window` should not be shorter than
//! `limits.idle_timeout_ms`).

use std::time::{Duration, Instant};

/// The configured minimum: `bytes_per_sec` over `window` of waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinSendRate {
    pub bytes_per_sec: u64,
    pub window: Duration,
}

/// What a waiting write should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Keep waiting, and look again by then at the latest.
    WaitUntil(Instant),
    /// The client took too few bytes over a whole window.
    TooSlow,
}

/// One connection's window.
#[derive(Debug)]
pub(super) struct SendRate {
    window: Duration,
    min_bytes: u64,
    /// Time spent waiting in this window, before the wait in progress.
    waited: Duration,
    /// When the wait in progress began.
    waiting_since: Option<Instant>,
    /// Bytes the client took since the window began.
    taken: u64,
}

impl SendRate {
    pub fn new(min: MinSendRate) -> Self {
        let millis = u64::try_from(min.window.as_millis()).unwrap_or(u64::MAX);
        Self {
            window: min.window,
            min_bytes: min.bytes_per_sec.saturating_mul(millis) / 1000,
            waited: Duration::ZERO,
            waiting_since: None,
            taken: 0,
        }
    }

    /// The client took `n` bytes at `now`; a wait in progress has ended.
    #[inline]
    pub fn took(&mut self, n: usize, now: Instant) {
        self.taken += n as u64;
        if let Some(since) = self.waiting_since.take() {
            self.waited += now.saturating_duration_since(since);
        }
    }

    /// A write waits on the client at `now`.
    pub fn waiting(&mut self, now: Instant) -> Verdict {
        let since = *self.waiting_since.get_or_insert(now);
        let waited = self.waited + now.saturating_duration_since(since);
        if waited < self.window {
            return Verdict::WaitUntil(since + (self.window - self.waited));
        }
        if self.taken < self.min_bytes {
            return Verdict::TooSlow;
        }
        self.waited = Duration::ZERO;
        self.waiting_since = Some(now);
        self.taken = 0;
        Verdict::WaitUntil(now + self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    /// 1,000 bytes a second over 10 s of waiting: 10,000 bytes a window.
    fn rate() -> SendRate {
        SendRate::new(MinSendRate {
            bytes_per_sec: 1_000,
            window: 10 * SEC,
        })
    }

    #[test]
    fn a_client_taking_a_byte_now_and_then_is_too_slow_after_a_window_of_waiting() {
        let t0 = Instant::now();
        let mut r = rate();
        let mut now = t0;
        let mut verdict = r.waiting(now);
        assert_eq!(verdict, Verdict::WaitUntil(t0 + 10 * SEC));
        // One byte every 4 s: each write waits, and the waits add up.
        while let Verdict::WaitUntil(_) = verdict {
            now += 4 * SEC;
            r.took(1, now);
            verdict = r.waiting(now);
            assert!(now < t0 + 20 * SEC, "never cut off");
        }
        assert_eq!(
            now,
            t0 + 12 * SEC,
            "cut at the first look after 10 s of waiting"
        );
    }

    #[test]
    fn a_slow_but_steady_client_starts_window_after_window() {
        let t0 = Instant::now();
        let mut r = rate();
        let mut now = t0;
        // 2,000 bytes a second, every write waiting on the client, for a minute.
        for _ in 0..60 {
            assert!(matches!(r.waiting(now), Verdict::WaitUntil(_)));
            now += SEC;
            r.took(2_000, now);
        }
        assert!(matches!(r.waiting(now), Verdict::WaitUntil(_)));
    }

    #[test]
    fn time_the_edge_itself_waits_does_not_count() {
        let t0 = Instant::now();
        let mut r = rate();
        // 5 s waiting on the client, a 100-byte write goes through...
        assert_eq!(r.waiting(t0), Verdict::WaitUntil(t0 + 10 * SEC));
        r.took(100, t0 + 5 * SEC);
        // ...then an hour fetching from an origin or between requests: the next wait
        // picks up with 5 s of the window left.
        let later = t0 + 3600 * SEC;
        assert_eq!(r.waiting(later), Verdict::WaitUntil(later + 5 * SEC));
        assert_eq!(r.waiting(later + 5 * SEC), Verdict::TooSlow);
    }

    #[test]
    fn a_wait_looked_at_again_keeps_its_deadline() {
        let t0 = Instant::now();
        let mut r = rate();
        assert_eq!(r.waiting(t0), Verdict::WaitUntil(t0 + 10 * SEC));
        assert_eq!(r.waiting(t0 + 3 * SEC), Verdict::WaitUntil(t0 + 10 * SEC));
        r.took(20_000, t0 + 4 * SEC);
        assert_eq!(r.waiting(t0 + 4 * SEC), Verdict::WaitUntil(t0 + 10 * SEC));
        assert_eq!(
            r.waiting(t0 + 10 * SEC),
            Verdict::WaitUntil(t0 + 20 * SEC),
            "enough taken: a new window"
        );
    }
}
