//! Objects that do not exist, and objects not known yet (SPEC §2.3): a burst of
//! requests for a missing object costs one origin request.
//!
//! Invariants:
//! 1. An origin's 404 or 410 for a slice of (o, v) is remembered for
//!    `origin.negative_ttl_secs` ([`MissingObjects`]); meanwhile a slice fetch of that
//!    object that would go to the origin is answered 404 at once. After the TTL the next
//!    fetch asks the origin again.
//! 2. A remembered 404 only ever stands in for an origin request: slices and metadata the
//!    tiers hold are served as before, and a valid slice answer for the object forgets
//!    the 404. It lives in memory only, never on disk, and never enters a slice tier.
//! 3. Entries are dropped per (o, v) or for every version of o (purge), and there are at
//!    most [`MISSING_ENTRIES`] of them.
//! 4. While an object is not known (no metadata), the first request for it is its only
//!    origin request ([`ColdObjects`]): a request for any slice of it that arrives while
//!    that answer is awaited waits for it instead of asking the origin itself. It costs
//!    such a request one round trip when the object exists; a request's own second slice
//!    (a range across a slice boundary) is still fetched alongside its first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ObjectId;

/// Most missing objects remembered at once.
pub const MISSING_ENTRIES: u64 = 65_536;

/// What is remembered of a missing object: its name, so that a purge of every version of
/// `o` finds it.
#[derive(Debug, Clone)]
struct Missing {
    o: Arc<str>,
}

/// Objects an origin answered 404 or 410 for, each for `origin.negative_ttl_secs`.
pub struct MissingObjects {
    /// `None` when the TTL is zero: nothing is remembered.
    entries: Option<moka::future::Cache<ObjectId, Missing>>,
}

impl MissingObjects {
    pub fn new(ttl: Duration) -> Self {
        let entries = (!ttl.is_zero()).then(|| {
            moka::future::Cache::builder()
                .name("missing-objects")
                .max_capacity(MISSING_ENTRIES)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build()
        });
        Self { entries }
    }

    /// Whether an origin said (o, v) does not exist less than the TTL ago.
    pub async fn contains(&self, id: &ObjectId) -> bool {
        match &self.entries {
            Some(e) => e.get(id).await.is_some(),
            None => false,
        }
    }

    /// Remembers that an origin answered 404 or 410 for object `o` with id `id`.
    pub async fn remember(&self, id: ObjectId, o: &str) {
        if let Some(e) = &self.entries {
            e.insert(id, Missing { o: o.into() }).await;
        }
    }

    /// Forgets (o, v): a valid answer for it came, or it was purged.
    pub async fn forget(&self, id: &ObjectId) {
        if let Some(e) = &self.entries {
            if e.contains_key(id) {
                e.invalidate(id).await;
            }
        }
    }

    /// Forgets every version of object `o` (a purge without a version).
    pub fn forget_object(&self, o: &str) {
        if let Some(e) = &self.entries {
            let o: Arc<str> = o.into();
            // Fails only without support_invalidation_closures, which `new` sets.
            let _ = e.invalidate_entries_if(move |_, m| m.o == o);
        }
    }

    /// Objects remembered (after [`MissingObjects::sync`]).
    pub fn entries(&self) -> u64 {
        self.entries.as_ref().map_or(0, |e| e.entry_count())
    }

    /// Applies pending expiry and invalidation so [`MissingObjects::entries`] is exact.
    pub async fn sync(&self) {
        if let Some(e) = &self.entries {
            e.run_pending_tasks().await;
        }
    }
}

/// Objects not known yet whose first origin request is in flight, each with the slice
/// that request asks for.
#[derive(Default)]
pub struct ColdObjects {
    // No await while the lock is held: it guards a map update.
    in_flight: Mutex<HashMap<ObjectId, u64>>,
}

/// Who asks the origin about a cold object.
pub enum Turn<'a> {
    /// This request does; others follow it until the guard is dropped.
    Lead(LeadGuard<'a>),
    /// Another request is asking for this slice: fetch it too (the slice cache makes
    /// that a wait for the same origin request).
    Follow(u64),
}

impl ColdObjects {
    /// Joins the first origin request about `id`, or becomes it (asking for slice
    /// `index`).
    pub fn join(&self, id: ObjectId, index: u64) -> Turn<'_> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        match in_flight.get(&id) {
            Some(&leading) => Turn::Follow(leading),
            None => {
                in_flight.insert(id, index);
                Turn::Lead(LeadGuard { cold: self, id })
            }
        }
    }
}

/// Held by the request that asks the origin about a cold object; dropping it (answered,
/// or the request went away) lets the next request lead.
pub struct LeadGuard<'a> {
    cold: &'a ColdObjects,
    id: ObjectId,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        let mut in_flight = self
            .cold
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        in_flight.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn a_missing_object_is_remembered_per_version_until_the_ttl() {
        let missing = MissingObjects::new(Duration::from_millis(200));
        let (v1, v2) = (ObjectId::new("o", "1"), ObjectId::new("o", "2"));
        missing.remember(v1, "o").await;
        assert!(missing.contains(&v1).await);
        assert!(
            !missing.contains(&v2).await,
            "another version is not missing"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while missing.contains(&v1).await {
            assert!(Instant::now() < deadline, "still remembered after 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn entries_are_forgotten_per_version_or_per_object() {
        let missing = MissingObjects::new(Duration::from_secs(60));
        let ids = [("o", "1"), ("o", "2"), ("p", "1")].map(|(o, v)| (ObjectId::new(o, v), o));
        for (id, o) in ids {
            missing.remember(id, o).await;
        }
        missing.forget(&ids[0].0).await;
        assert!(!missing.contains(&ids[0].0).await);
        assert!(missing.contains(&ids[1].0).await);
        missing.forget_object("o");
        missing.sync().await;
        assert!(!missing.contains(&ids[1].0).await);
        assert!(missing.contains(&ids[2].0).await, "another object stays");
        assert_eq!(missing.entries(), 1);
    }

    #[tokio::test]
    async fn a_zero_ttl_remembers_nothing() {
        let missing = MissingObjects::new(Duration::ZERO);
        let id = ObjectId::new("o", "1");
        missing.remember(id, "o").await;
        assert!(!missing.contains(&id).await);
    }

    #[test]
    fn the_first_request_leads_until_its_guard_drops() {
        let cold = ColdObjects::default();
        let (a, b) = (ObjectId::new("a", "1"), ObjectId::new("b", "1"));
        let lead = cold.join(a, 3);
        assert!(matches!(lead, Turn::Lead(_)));
        assert!(matches!(cold.join(a, 7), Turn::Follow(3)));
        assert!(
            matches!(cold.join(b, 7), Turn::Lead(_)),
            "objects are independent"
        );
        drop(lead);
        assert!(matches!(cold.join(a, 7), Turn::Lead(_)));
    }
}
