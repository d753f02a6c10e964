//! Which client connections are let in: at most `limits.max_connections` open on the
//! public listeners, and at most `limits.max_connections_per_ip` from one client address.
//!
//! Invariants:
//! 1. A connection is counted as soon as it is accepted, before its TLS handshake, so
//!    handshakes in progress count against both caps.
//! 2. A count is taken back only by dropping the [`Slot`] that took it: an error or a
//!    panic anywhere in the connection's task gives its slot back.
//! 3. A client address is an IPv4 address or an IPv6 /64 (one subscriber's prefix; an
//!    IPv4-mapped IPv6 address is its IPv4 address). Its entry is removed with its last
//!    connection, so the table never holds more than the open connections.
//!
//! Performance: per connection (not per request) an atomic add, and a short lock on one
//! of [`SHARDS`] maps when the per-address cap can bite.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Limits;
use crate::metrics::{Metrics, Refusal};

/// Locks the per-address counts are spread over, so accepts on different threads
/// rarely wait for each other.
const SHARDS: usize = 16;

/// The connection caps, and what is open now.
pub struct Admission {
    max_connections: usize,
    open: AtomicUsize,
    /// `None` when the per-address cap is no lower than the process-wide one.
    per_ip: Option<PerIp>,
    metrics: Arc<Metrics>,
}

struct PerIp {
    max: usize,
    shards: [Mutex<HashMap<IpAddr, usize>>; SHARDS],
}

/// One admitted connection; dropping it gives its place back.
#[must_use = "the connection is counted only while its slot lives"]
pub struct Slot<'a> {
    admission: &'a Admission,
    ip: Option<IpAddr>,
}

impl Admission {
    pub fn new(limits: &Limits, metrics: Arc<Metrics>) -> Self {
        let per_ip = (limits.max_connections_per_ip < limits.max_connections).then(|| PerIp {
            max: limits.max_connections_per_ip,
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        });
        Self {
            max_connections: limits.max_connections,
            open: AtomicUsize::new(0),
            per_ip,
            metrics,
        }
    }

    /// Counts a new connection from `peer`, or says which cap it is over (and counts
    /// the refusal).
    pub fn admit(&self, peer: Option<IpAddr>) -> Result<Slot<'_>, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.connections_refused.inc();
            self.metrics.record_refusal(Refusal::MaxConnections);
            return Err(Refusal::MaxConnections);
        }
        self.metrics.connections_open.inc();
        let mut slot = Slot {
            admission: self,
            ip: None,
        };
        if let (Some(per_ip), Some(peer)) = (&self.per_ip, peer) {
            let ip = client_address(peer);
            if !per_ip.acquire(ip) {
                self.metrics.record_refusal(Refusal::MaxConnectionsPerIp);
                return Err(Refusal::MaxConnectionsPerIp);
            }
            slot.ip = Some(ip);
        }
        Ok(slot)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections open now from `peer`'s address (0 without a per-address cap).
    #[cfg(test)]
    fn open_from(&self, peer: IpAddr) -> usize {
        self.per_ip.as_ref().map_or(0, |p| {
            let ip = client_address(peer);
            p.shard(ip).get(&ip).copied().unwrap_or(0)
        })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let (Some(per_ip), Some(ip)) = (&self.admission.per_ip, self.ip) {
            per_ip.release(ip);
        }
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
        self.admission.metrics.connections_open.dec();
    }
}

impl PerIp {
    fn shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        let bits = match ip {
            IpAddr::V4(v4) => u64::from(v4.to_bits()),
            IpAddr::V6(v6) => (v6.to_bits() >> 64) as u64,
        };
        // Fibonacci hashing: the top bits of the product mix every bit of the address.
        let i = (bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquire(&self, ip: IpAddr) -> bool {
        let mut shard = self.shard(ip);
        let count = shard.entry(ip).or_insert(0);
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut shard = self.shard(ip);
        if let Some(count) = shard.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&ip);
            }
        }
    }
}

/// The address a client is counted under: IPv4 as is, IPv6 cut to its /64.
pub fn client_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, per_ip: usize) -> Admission {
        let limits = crate::config::Config::from_toml(&format!(
            "[listen]\nhttp = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n[signing]\n\
             [[signing.keys]]\nid = \"k\"\nsecret = \"s\"\n[origin]\nurls = [\"http://127.0.0.1:3\"]\n\
             [limits]\nmax_connections = {max}\nmax_connections_per_ip = {per_ip}\n"
        ))
        .unwrap()
        .limits;
        Admission::new(&limits, Arc::new(Metrics::new()))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn client_addresses_are_ipv4_or_an_ipv6_slash_64() {
        for (addr, key) in [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::"),
            ("2001:db8:1:2::1", "2001:db8:1:2::"),
            ("2001:db8:1:3::1", "2001:db8:1:3::"),
        ] {
            assert_eq!(
                client_address(addr.parse().unwrap()),
                key.parse::<IpAddr>().unwrap()
            );
        }
    }

    #[test]
    fn each_address_gets_its_share_and_slots_come_back_when_dropped() {
        let a = admission(5, 2);
        let first = a.admit(ip("192.0.2.1")).unwrap();
        let second = a.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(
            a.admit(ip("192.0.2.1")).err(),
            Some(Refusal::MaxConnectionsPerIp)
        );
        let v6 = [
            a.admit(ip("2001:db8::1")).unwrap(),
            a.admit(ip("2001:db8::2")).unwrap(),
        ];
        assert_eq!(
            a.admit(ip("2001:db8::3")).err(),
            Some(Refusal::MaxConnectionsPerIp),
            "one /64 is one client"
        );
        let other = a.admit(ip("198.51.100.9")).unwrap();
        assert_eq!(a.open(), 5);
        assert_eq!(a.admit(None).err(), Some(Refusal::MaxConnections));
        drop(second);
        assert_eq!(a.open_from("192.0.2.1".parse().unwrap()), 1);
        let again = a.admit(ip("192.0.2.1")).unwrap();
        drop((first, again, v6, other));
        assert_eq!(a.open(), 0);
        assert_eq!(a.open_from("192.0.2.1".parse().unwrap()), 0);
        assert!(a
            .per_ip
            .as_ref()
            .unwrap()
            .shards
            .iter()
            .all(|s| s.lock().unwrap().is_empty()));
        assert_eq!(a.metrics.connections_open.get(), 0);
    }

    #[test]
    fn a_per_address_cap_as_high_as_the_total_keeps_no_table() {
        let a = admission(3, 3);
        assert!(a.per_ip.is_none());
        let slots: Vec<_> = (0..3).map(|_| a.admit(ip("192.0.2.1")).unwrap()).collect();
        assert_eq!(
            a.admit(ip("192.0.2.2")).err(),
            Some(Refusal::MaxConnections)
        );
        drop(slots);
        assert_eq!(a.open(), 0);
    }
}
