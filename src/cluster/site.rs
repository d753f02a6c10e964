//! This node's view of its site and parent tier: the two rings, the client that asks
//! their members for slices, and the background task that health-checks them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::auth::Kind;
use super::client::{PeerClient, PeerFailure};
use super::metrics::ClusterMetrics;
use super::ring::{MemberState, Ring, RingError};
use crate::cache::pages::{Landing, PagePool};
use crate::cache::ObjectRef;
use crate::config::{Cluster, KeepNonOwned};
use crate::metrics::Metrics;
use crate::origin::{OriginError, SliceBody};
use crate::range::ByteRange;
use crate::upstream::ConnectorSettings;

/// Parent tiers a request may come through before it is refused (a loop in the
/// configured tiers would otherwise go round for ever).
pub const MAX_HOPS: u8 = 4;

/// Parents asked for one slice before the origin is.
const PARENT_TRIES: usize = 2;

pub struct Site {
    pub me: SocketAddr,
    pub ring: Ring,
    pub parents: Option<Ring>,
    client: PeerClient,
    secret: Vec<u8>,
    parent_secret: Vec<u8>,
    pub keep_non_owned: KeepNonOwned,
    health_check: Duration,
    pub metrics: Arc<ClusterMetrics>,
}

impl Site {
    pub fn new(
        cfg: &Cluster,
        connect_timeout: Duration,
        connectors: &ConnectorSettings,
        pages: Option<PagePool>,
        metrics: &Metrics,
    ) -> Result<Self, RingError> {
        let members: Vec<SocketAddr> = cfg.peers.iter().chain(&cfg.parents).copied().collect();
        let cluster_metrics = Arc::new(ClusterMetrics::new(metrics, &members));
        let ring = Ring::checked(&cfg.peers, Some(cfg.self_addr), cfg.health_check, "site")?;
        let parents = (!cfg.parents.is_empty())
            .then(|| Ring::checked(&cfg.parents, None, cfg.health_check, "parent"))
            .transpose()?;
        Ok(Self {
            me: cfg.self_addr,
            ring,
            parents,
            client: PeerClient::new(
                cfg.self_addr,
                cfg.peer_timeout,
                connect_timeout,
                connectors,
                pages,
                cluster_metrics.clone(),
            ),
            secret: cfg.secret.clone(),
            parent_secret: cfg.parent_secret.clone(),
            keep_non_owned: cfg.keep_non_owned,
            health_check: cfg.health_check,
            metrics: cluster_metrics,
        })
    }

    /// The secret peer requests to this node are checked with.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// The client of peer requests (and of the parent tier's).
    pub fn client(&self) -> &PeerClient {
        &self.client
    }

    /// Time between two health checks of each member.
    pub fn health_check(&self) -> Duration {
        self.health_check
    }

    /// The other nodes of the site.
    pub fn others(&self) -> Vec<SocketAddr> {
        self.ring
            .states()
            .into_iter()
            .map(|m| m.addr)
            .filter(|&a| a != self.me)
            .collect()
    }

    /// Whether this node owns slice `index` of `obj` in the site's ring as it is now.
    pub fn owns(&self, obj: &ObjectRef<'_>, index: u64) -> bool {
        self.ring.owner(&obj.id, index).is_none_or(|o| o == self.me)
    }

    /// Asks the slice's owner, when that is another node. `None` when this node owns
    /// it, or the owner could not be reached (it is then out of the ring until its next
    /// health check passes): the caller fills the slice itself.
    pub async fn from_owner(
        &self,
        obj: &ObjectRef<'_>,
        index: u64,
        range: ByteRange,
        landing: Landing,
    ) -> Option<Result<SliceBody, OriginError>> {
        let owner = self.ring.owner(&obj.id, index).filter(|&o| o != self.me)?;
        match self
            .client
            .fetch(
                owner,
                Kind::Sibling,
                &self.secret,
                obj,
                index,
                range,
                landing,
            )
            .await
        {
            Ok(body) => Some(Ok(body)),
            Err(PeerFailure::Answer(e)) => Some(Err(e)),
            Err(PeerFailure::Down(why)) => {
                tracing::warn!(peer = %owner, error = %why, slice = index,
                    "owner unreachable: out of the ring until it passes a health check; filling the slice here");
                self.ring.mark_failed(owner);
                None
            }
        }
    }

    /// Asks the parent tier: the parent that owns the slice in the parents' ring, then
    /// the next. `None` when there is no parent tier or no parent gave a definite
    /// answer: the caller asks the origin.
    pub async fn from_parents(
        &self,
        obj: &ObjectRef<'_>,
        index: u64,
        range: ByteRange,
        landing: Landing,
    ) -> Option<Result<SliceBody, OriginError>> {
        let parents = self.parents.as_ref()?;
        if obj.via.hops >= MAX_HOPS {
            tracing::warn!(
                hops = obj.via.hops,
                "request came through too many tiers; not passed to a parent"
            );
            return None;
        }
        let mut tried = Vec::with_capacity(PARENT_TRIES);
        for _ in 0..PARENT_TRIES {
            let parent = parents.owner_except(&obj.id, index, &tried)?;
            tried.push(parent);
            match self
                .client
                .fetch(
                    parent,
                    Kind::Child,
                    &self.parent_secret,
                    obj,
                    index,
                    range,
                    landing,
                )
                .await
            {
                Ok(body) => return Some(Ok(body)),
                Err(PeerFailure::Answer(e)) if e.is_final() => return Some(Err(e)),
                Err(PeerFailure::Answer(e)) => {
                    tracing::warn!(parent = %parent, error = %e, slice = index, "parent could not fill the slice; trying the next");
                }
                Err(PeerFailure::Down(why)) => {
                    tracing::warn!(parent = %parent, error = %why, slice = index,
                        "parent unreachable: out of its ring until it passes a health check");
                    parents.mark_failed(parent);
                }
            }
        }
        None
    }

    /// The site's and the parents' members with their state, for `/status`.
    pub fn states(&self) -> (Vec<MemberState>, Vec<MemberState>) {
        (
            self.ring.states(),
            self.parents.as_ref().map(Ring::states).unwrap_or_default(),
        )
    }

    /// Copies member states into their gauges; called before each metrics scrape.
    pub fn refresh_gauges(&self) {
        let (peers, parents) = self.states();
        for (gauge, members) in [
            (&self.metrics.peers, peers),
            (&self.metrics.parents, parents),
        ] {
            let up = members.iter().filter(|m| m.state == "healthy").count() as i64;
            gauge.with_label_values(&["healthy"]).set(up);
            gauge
                .with_label_values(&["down"])
                .set(members.len() as i64 - up);
        }
    }
}

/// Health-checks the site's peers and the parents every `cluster.health_check_ms`.
pub struct SiteHealth(pub Arc<Site>);

#[async_trait]
impl BackgroundService for SiteHealth {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let site = &self.0;
        let mut tick = tokio::time::interval(site.health_check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let parents = async {
                if let Some(p) = &site.parents {
                    p.check_health().await;
                }
            };
            tokio::join!(site.ring.check_health(), parents);
        }
    }
}
