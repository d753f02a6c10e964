//! Which peers are up: Pingora's HTTP health check against each peer's
//! `/peer/v1/health`, plus marks left by failed peer requests.
//!
//! A peer is down when its last health check failed, or when a request to it failed
//! after its last successful check began (SPEC 6.2: a peer that fails a check or a
//! request leaves the ring). The next check that starts after such a failure and passes
//! brings it back. This node is always up in its own ring: it never checks itself, so
//! that a slow peer listener cannot make it disagree with the other nodes about what it
//! owns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::Backend;

/// Path of the peer listener's health answer.
pub const HEALTH_PATH: &str = "/peer/v1/health";

/// Longest a health check waits to connect or for the answer.
const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Request failures per member: when the last one happened.
pub struct Marks {
    base: Instant,
    members: Vec<(SocketAddr, AtomicU64)>,
}

impl Marks {
    pub fn new(peers: &[SocketAddr]) -> Self {
        Self {
            base: Instant::now(),
            members: peers.iter().map(|&a| (a, AtomicU64::new(0))).collect(),
        }
    }

    /// Milliseconds since the marks were made, plus one (0 means "never").
    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn slot(&self, addr: SocketAddr) -> Option<&AtomicU64> {
        self.members
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, at)| at)
    }

    /// A request to `addr` failed: it is down until a check that starts later passes.
    pub fn mark_failed(&self, addr: SocketAddr) {
        self.mark_at(addr, self.now());
    }

    fn mark_at(&self, addr: SocketAddr, at_ms: u64) {
        if let Some(at) = self.slot(addr) {
            at.store(at_ms, Ordering::Relaxed);
        }
    }

    pub fn is_marked(&self, addr: SocketAddr) -> bool {
        self.slot(addr)
            .is_some_and(|at| at.load(Ordering::Relaxed) != 0)
    }

    /// A check that started at `started` passed: clears a mark older than it.
    fn passed(&self, addr: SocketAddr, started: u64) {
        if let Some(at) = self.slot(addr) {
            let _ = at.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t != 0 && t < started).then_some(0)
            });
        }
    }
}

/// The health check of one ring's members.
pub struct PeerCheck {
    http: HttpHealthCheck,
    me: Option<SocketAddr>,
    marks: Arc<Marks>,
    tier: &'static str,
}

impl PeerCheck {
    /// Checks every `period` (each check waits at most that long, and at most 1 s).
    pub fn new(
        me: Option<SocketAddr>,
        marks: Arc<Marks>,
        period: Duration,
        tier: &'static str,
    ) -> Self {
        let mut http = HttpHealthCheck::new("cdn-edge-peer", false);
        let mut req = RequestHeader::build("GET", HEALTH_PATH.as_bytes(), None)
            .expect("a static path is a valid request line");
        req.insert_header(http::header::HOST, "cdn-edge-peer")
            .expect("a static header is valid");
        http.req = req;
        let timeout = period.min(MAX_CHECK_TIMEOUT);
        http.peer_template.options.connection_timeout = Some(timeout);
        http.peer_template.options.total_connection_timeout = Some(timeout);
        http.peer_template.options.read_timeout = Some(timeout);
        http.peer_template.options.write_timeout = Some(timeout);
        http.consecutive_success = 1;
        http.consecutive_failure = 1;
        Self {
            http,
            me,
            marks,
            tier,
        }
    }
}

#[async_trait]
impl HealthCheck for PeerCheck {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let addr = target.as_inet().copied();
        if addr.is_some() && addr == self.me {
            return Ok(());
        }
        let started = self.marks.now();
        self.http.check(target).await?;
        if let Some(addr) = addr {
            self.marks.passed(addr, started);
        }
        Ok(())
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        if healthy {
            tracing::info!(peer = %target.addr, tier = self.tier, "peer is up: back in the ring");
        } else {
            tracing::warn!(peer = %target.addr, tier = self.tier, "peer failed its health check: out of the ring");
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.http.health_threshold(success)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_cleared_only_by_a_check_that_started_after_it() {
        let a: SocketAddr = "10.0.0.1:7080".parse().unwrap();
        let marks = Marks::new(&[a]);
        marks.mark_at(a, 100);
        assert!(marks.is_marked(a));
        marks.passed(a, 100);
        assert!(marks.is_marked(a), "a check that started with the failure");
        marks.passed(a, 101);
        assert!(!marks.is_marked(a));
    }

    #[test]
    fn unknown_addresses_are_ignored() {
        let marks = Marks::new(&["10.0.0.1:7080".parse().unwrap()]);
        let other: SocketAddr = "10.0.0.2:7080".parse().unwrap();
        marks.mark_failed(other);
        assert!(!marks.is_marked(other));
    }
}
