//! The site's metrics: requests to peers and parents by peer and result, requests served
//! to them, bytes both ways, and how many members are up.

use std::net::SocketAddr;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};

use crate::metrics::Metrics;

/// The result of a request this node made to a peer or parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// The slice.
    Ok,
    /// The object does not exist (an origin's 404/410, or past its end).
    NotFound,
    /// Directed mode: it does not hold the slice.
    NotHeld,
    /// It answered, with an error: its upstream failed, it refused the request, or its
    /// answer was unusable.
    Error,
    /// No answer: connection refused or lost, or timeout.
    Unreachable,
}

impl Asked {
    const ALL: [Asked; 5] = [
        Asked::Ok,
        Asked::NotFound,
        Asked::NotHeld,
        Asked::Error,
        Asked::Unreachable,
    ];

    fn label(self) -> &'static str {
        match self {
            Asked::Ok => "ok",
            Asked::NotFound => "not_found",
            Asked::NotHeld => "not_held",
            Asked::Error => "error",
            Asked::Unreachable => "unreachable",
        }
    }
}

/// The result of a peer request this node answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// From its cache.
    Hit,
    /// Filled from upstream to answer it.
    Fill,
    /// Refused (403): unauthenticated, stale, addressed to another node, or too many hops.
    Denied,
    NotHeld,
    NotFound,
    /// Its upstream failed, or the request was malformed.
    Error,
}

impl Served {
    const ALL: [Served; 6] = [
        Served::Hit,
        Served::Fill,
        Served::Denied,
        Served::NotHeld,
        Served::NotFound,
        Served::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Fill => "fill",
            Served::Denied => "denied",
            Served::NotHeld => "not_held",
            Served::NotFound => "not_found",
            Served::Error => "error",
        }
    }
}

pub struct ClusterMetrics {
    /// Per member (peers, then parents): one counter per [`Asked`].
    asked: Vec<(SocketAddr, Vec<IntCounter>)>,
    served: Vec<IntCounter>,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    pub peers: IntGaugeVec,
    pub parents: IntGaugeVec,
}

impl ClusterMetrics {
    pub fn new(metrics: &Metrics, members: &[SocketAddr]) -> Self {
        let asked_vec = metrics.register(
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_peer_requests_total",
                    "Slice requests this node made to peers and parents, by peer and result: ok, not_found, not_held, error (answered with an error), unreachable.",
                ),
                &["peer", "result"],
            )
            .expect("valid metric"),
        );
        let asked = members
            .iter()
            .map(|&addr| {
                let peer = addr.to_string();
                let counters = Asked::ALL
                    .iter()
                    .map(|r| asked_vec.with_label_values(&[peer.as_str(), r.label()]))
                    .collect();
                (addr, counters)
            })
            .collect();
        let served_vec = metrics.register(
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_peer_served_total",
                    "Slice requests from peers and child sites answered on the peer listener, by result: hit, fill, denied, not_held, not_found, error.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let served = Served::ALL
            .iter()
            .map(|r| served_vec.with_label_values(&[r.label()]))
            .collect();
        let bytes = metrics.register(
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_peer_bytes_total",
                    "Slice body bytes exchanged with peers and parents: received (this node asked) and sent (on the peer listener).",
                ),
                &["direction"],
            )
            .expect("valid metric"),
        );
        let gauge = |name: &str, help: &str| {
            let g = metrics.register(
                IntGaugeVec::new(Opts::new(name, help), &["state"]).expect("valid metric"),
            );
            g.with_label_values(&["healthy"]);
            g.with_label_values(&["down"]);
            g
        };
        Self {
            asked,
            served,
            bytes_received: bytes.with_label_values(&["received"]),
            bytes_sent: bytes.with_label_values(&["sent"]),
            peers: gauge(
                "cdn_edge_peers",
                "Members of this node's site (itself included), by state: healthy or down.",
            ),
            parents: gauge(
                "cdn_edge_parents",
                "Nodes of the parent tier, by state: healthy or down.",
            ),
        }
    }

    pub fn record_asked(&self, peer: SocketAddr, result: Asked) {
        if let Some((_, counters)) = self.asked.iter().find(|(a, _)| *a == peer) {
            let i = Asked::ALL
                .iter()
                .position(|r| *r == result)
                .expect("every result is listed");
            counters[i].inc();
        }
    }

    pub fn record_served(&self, result: Served) {
        let i = Served::ALL
            .iter()
            .position(|r| *r == result)
            .expect("every result is listed");
        self.served[i].inc();
    }
}
