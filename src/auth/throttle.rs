//! A per-client budget of bad signatures. Past it, a client's URLs that are not already
//! verified are refused without a signature check, so an address sending forged URLs
//! costs the edge a parse per request instead of an Ed25519 verification.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::connection::client_address;

/// Clients remembered at once; the least used are forgotten first.
const MAX_CLIENTS: u64 = 65_536;
/// A client with no bad signature for this long is forgotten.
const IDLE: Duration = Duration::from_secs(10);

pub(crate) struct FailureThrottle {
    per_sec: u32,
    /// Client address (IPv6 as its /64) → the current second and its count of bad
    /// signatures, packed as `second << 32 | count`. `None` when the budget is off.
    clients: Option<moka::sync::Cache<IpAddr, Arc<AtomicU64>>>,
}

impl FailureThrottle {
    /// `per_sec` bad signatures a second per client address; `0` turns the budget off.
    pub(crate) fn new(per_sec: u32) -> Self {
        let clients = (per_sec > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(MAX_CLIENTS)
                .time_to_idle(IDLE)
                .build()
        });
        Self { per_sec, clients }
    }

    /// Whether `client` may still have a signature checked in second `now`.
    pub(crate) fn allows(&self, client: IpAddr, now: u64) -> bool {
        let Some(clients) = &self.clients else {
            return true;
        };
        clients.get(&client_address(client)).is_none_or(|window| {
            let (second, count) = unpack(window.load(Ordering::Relaxed));
            second != now as u32 || count < self.per_sec
        })
    }

    /// Counts a bad signature from `client` in second `now`.
    pub(crate) fn note_failure(&self, client: IpAddr, now: u64) {
        let Some(clients) = &self.clients else {
            return;
        };
        let window = clients.get_with(client_address(client), || Arc::new(AtomicU64::new(0)));
        let now = now as u32;
        // The closure always returns Some: the update cannot fail.
        let _ = window.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            let (second, count) = unpack(old);
            Some(if second == now {
                pack(second, count.saturating_add(1))
            } else {
                pack(now, 1)
            })
        });
    }
}

fn pack(second: u32, count: u32) -> u64 {
    (u64::from(second) << 32) | u64::from(count)
}

fn unpack(window: u64) -> (u32, u32) {
    ((window >> 32) as u32, window as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_client_over_its_budget_waits_for_the_next_second() {
        let t = FailureThrottle::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(t.allows(a, NOW));
            t.note_failure(a, NOW);
        }
        assert!(!t.allows(a, NOW));
        assert!(t.allows(b, NOW), "another address keeps its own budget");
        assert!(t.allows(a, NOW + 1));
        t.note_failure(a, NOW + 1);
        assert!(t.allows(a, NOW + 1), "the count starts again each second");
    }

    #[test]
    fn an_ipv6_slash_64_shares_one_budget() {
        let t = FailureThrottle::new(1);
        t.note_failure("2001:db8:1:2::1".parse().unwrap(), NOW);
        assert!(!t.allows("2001:db8:1:2::ffff".parse().unwrap(), NOW));
        assert!(t.allows("2001:db8:1:3::1".parse().unwrap(), NOW));
    }

    #[test]
    fn zero_turns_the_budget_off() {
        let t = FailureThrottle::new(0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..100 {
            t.note_failure(a, NOW);
        }
        assert!(t.allows(a, NOW));
    }
}
