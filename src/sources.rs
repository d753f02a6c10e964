//! Where the cache fills a miss from (SPEC 2.3, 6): the slice's owner in the site, the
//! parent tier, the origin, in that order.
//!
//! - A client's miss (or a child site's) on a slice another node owns goes to that
//!   owner. If the owner cannot be reached, this node fills the slice itself.
//! - A sibling's request (it takes this node for the owner) is never passed on to
//!   another node of the site: it is filled from the parent tier or the origin.
//! - In directed mode nothing is pulled for a miss: a slice the site does not hold is
//!   [`OriginError::NotHeld`].
//! - A fill job's miss ([`crate::cache::Via::fill`]) is for a slice this node owns: it
//!   is pulled from the parent tier or the origin, in directed mode too, and never asked
//!   of a peer.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::pages::Landing;
use crate::cache::ObjectRef;
use crate::cluster::site::Site;
use crate::config::OriginMode;
use crate::origin::{OriginClient, OriginError, SliceBody};
use crate::range::ByteRange;

/// Where a slice came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The origin or the parent tier.
    Upstream,
    /// The slice's owner in this site.
    Peer,
}

pub struct Sources {
    origin: Arc<OriginClient>,
    site: Option<Arc<Site>>,
    mode: OriginMode,
}

impl Sources {
    pub fn new(origin: Arc<OriginClient>, site: Option<Arc<Site>>, mode: OriginMode) -> Self {
        Self { origin, site, mode }
    }

    /// How long an origin's 404 or 410 is remembered.
    pub fn negative_ttl(&self) -> Duration {
        self.origin.negative_ttl()
    }

    pub fn site(&self) -> Option<&Site> {
        self.site.as_deref()
    }

    /// Fetches slice `index` (bytes `range`) of `obj` for a miss, its body landing as
    /// `landing` says.
    pub async fn fetch(
        &self,
        obj: &ObjectRef<'_>,
        index: u64,
        range: ByteRange,
        landing: Landing,
    ) -> Result<(SliceBody, Filled), OriginError> {
        if let Some(site) = &self.site {
            if !obj.via.sibling && !obj.via.fill {
                if let Some(answer) = site.from_owner(obj, index, range, landing).await {
                    return answer.map(|b| (b, Filled::Peer));
                }
            }
        }
        if self.mode == OriginMode::Directed && !obj.via.fill {
            return Err(OriginError::NotHeld);
        }
        self.pull(obj, index, range, landing)
            .await
            .map(|b| (b, Filled::Upstream))
    }

    /// What the object is now, for a re-check of its metadata: a one-byte origin answer,
    /// or slice 0 from whoever would fill it.
    pub async fn probe(
        &self,
        obj: &ObjectRef<'_>,
        slice_bytes: u64,
    ) -> Result<SliceBody, OriginError> {
        let asks_peer = !obj.via.sibling && !obj.via.fill;
        let asks_site = self
            .site
            .as_ref()
            .is_some_and(|s| (asks_peer && !s.owns(obj, 0)) || s.parents.is_some());
        if asks_site || (self.mode == OriginMode::Directed && !obj.via.fill) {
            let slice0 = ByteRange {
                start: 0,
                end: slice_bytes - 1,
            };
            return self
                .fetch(obj, 0, slice0, Landing::Pool)
                .await
                .map(|(b, _)| b);
        }
        self.origin
            .fetch_slice(obj.o, obj.v, ByteRange { start: 0, end: 0 }, Landing::Heap)
            .await
    }

    /// The parent tier, else the origin.
    async fn pull(
        &self,
        obj: &ObjectRef<'_>,
        index: u64,
        range: ByteRange,
        landing: Landing,
    ) -> Result<SliceBody, OriginError> {
        if let Some(site) = &self.site {
            if let Some(answer) = site.from_parents(obj, index, range, landing).await {
                return answer;
            }
        }
        self.origin.fetch_slice(obj.o, obj.v, range, landing).await
    }
}
