//! Memory tier: a moka cache of slices, bounded in bytes.

use moka::future::Cache;

use super::{CachedSlice, SliceKey};

/// Per-entry bookkeeping moka cannot see (key, `Bytes` header, its own node), so the
/// byte budget is not exceeded by many small slices.
const ENTRY_OVERHEAD: u32 = 128;

/// Slices held in RAM. Cloning a value clones a `Bytes` handle and an `Arc`, never the
/// bytes.
#[derive(Clone)]
pub struct MemoryTier {
    cache: Cache<SliceKey, CachedSlice>,
}

impl MemoryTier {
    /// `max_bytes` may exceed 4 GiB: moka's capacity is a u64 sum of u32 weights, and a
    /// single slice is at most 64 MiB (checked in config).
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .name("slices")
            .max_capacity(max_bytes)
            .weigher(|_k: &SliceKey, v: &CachedSlice| {
                u32::try_from(v.bytes.len())
                    .unwrap_or(u32::MAX)
                    .saturating_add(ENTRY_OVERHEAD)
            })
            .build();
        Self { cache }
    }

    pub async fn get(&self, key: &SliceKey) -> Option<CachedSlice> {
        self.cache.get(key).await
    }

    pub fn contains(&self, key: &SliceKey) -> bool {
        self.cache.contains_key(key)
    }

    /// The underlying cache, for coalesced fills (`entry().or_try_insert_with`).
    pub fn cache(&self) -> &Cache<SliceKey, CachedSlice> {
        &self.cache
    }

    /// Bytes currently weighed (payload plus per-entry overhead).
    pub fn weighted_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub fn entries(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Applies pending evictions now, so the counters above are exact (tests, /status).
    pub async fn sync(&self) {
        self.cache.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{ObjectId, ObjectMeta};
    use bytes::Bytes;
    use std::sync::Arc;

    fn slice(bytes: Bytes) -> CachedSlice {
        let id = ObjectId::new("o", "v");
        CachedSlice {
            meta: Arc::new(ObjectMeta::new(&id, 1 << 20, None)),
            bytes,
        }
    }

    fn key(i: u64) -> SliceKey {
        SliceKey {
            object: ObjectId::new("o", "v"),
            index: i,
        }
    }

    #[tokio::test]
    async fn stays_within_its_byte_budget() {
        let tier = MemoryTier::new(10 * 4096);
        for i in 0..100 {
            tier.cache()
                .insert(key(i), slice(Bytes::from(vec![0u8; 4000])))
                .await;
        }
        tier.sync().await;
        assert!(
            tier.weighted_bytes() <= 10 * 4096,
            "{}",
            tier.weighted_bytes()
        );
        assert!(tier.entries() <= 10);
    }

    #[tokio::test]
    async fn budget_over_4_gib_holds_entries() {
        let tier = MemoryTier::new(8 << 30);
        tier.cache()
            .insert(key(1), slice(Bytes::from_static(b"abc")))
            .await;
        tier.sync().await;
        assert_eq!(
            tier.get(&key(1)).await.unwrap().bytes,
            Bytes::from_static(b"abc")
        );
        assert!(tier.contains(&key(1)));
    }
}
