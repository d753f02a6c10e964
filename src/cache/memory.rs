//! Memory tier: moka caches of slices, bounded in bytes.
//!
//! With the `windowed` policy it is two caches, as in W-TinyLFU: every
//! filled slice enters an LRU window; a slice pushed out of the window competes by
//! TinyLFU for the main part, which keeps it only if it was asked for more often lately
//! than what it would replace. Video players read titles in consecutive segments, so a
//! slice at a segment's end is asked for again a few seconds later by the same player:
//! the window keeps those, the main part keeps what many players ask for.
//!
//! With the `video` policy (the default) it is one moka cache whose evictions
//! [`VideoPolicy`] chooses, from how players read titles (the slice store tells it of
//! each read through [`MemoryTier::video_policy`]).

use std::sync::Arc;

use moka::future::Cache;
use moka::notification::{ListenerFuture, RemovalCause};
use moka::policy::EvictionPolicy;

use super::video_policy::VideoPolicy;
use super::{CachedSlice, SliceKey};
use crate::config::MemoryPolicy;

/// Bytes weighed per entry besides the slice's own: what an entry costs in memory (moka's
/// records of it, the key, the `Bytes` header, its share of moka's frequency sketch;
/// about 360 bytes measured with `cargo bench --bench scale_memory`), so the byte budget
/// is not exceeded by many small slices. `tests/memory_overhead.rs` checks it covers the
/// real cost.
pub const ENTRY_OVERHEAD: u32 = 384;

/// The window's share of the budget with the `windowed` policy, in percent. Chosen on
/// the hit-ratio replay (docs/performance.md): a window too small to span the time
/// between a player's consecutive segments loses their shared slices.
const WINDOW_PERCENT: u64 = 50;

/// Slices held in RAM. Cloning a value clones a `Bytes` handle and an `Arc`, never the
/// bytes.
#[derive(Clone)]
pub struct MemoryTier {
    /// Where filled slices enter: the whole tier, or the window of a windowed tier.
    fills: Cache<SliceKey, CachedSlice>,
    /// The main part of a windowed tier.
    main: Option<Cache<SliceKey, CachedSlice>>,
    /// What a `video` tier keeps.
    video: Option<Arc<VideoPolicy>>,
}

/// Bytes the `video` policy's own records of a slice cost besides [`ENTRY_OVERHEAD`]: its
/// place in the sample vector and in the index of places (48 bytes each, about 160 with
/// the spare room of a growing `Vec` and `HashMap`; from the types' sizes).
const VIDEO_ENTRY_OVERHEAD: u32 = 160;

/// A moka cache of slices, each weighing its length plus [`ENTRY_OVERHEAD`] and `extra`.
fn slices(
    name: &str,
    max_bytes: u64,
    eviction: EvictionPolicy,
    extra: u32,
) -> moka::future::CacheBuilder<SliceKey, CachedSlice, Cache<SliceKey, CachedSlice>> {
    Cache::builder()
        .name(name)
        .max_capacity(max_bytes)
        .eviction_policy(eviction)
        .weigher(move |_k: &SliceKey, v: &CachedSlice| weight(v.bytes.len(), extra))
}

/// What a slice of `len` bytes weighs against the budget.
fn weight(len: usize, extra: u32) -> u32 {
    u32::try_from(len)
        .unwrap_or(u32::MAX)
        .saturating_add(ENTRY_OVERHEAD)
        .saturating_add(extra)
}

/// The keys `pick` picks in `part`, with their slices' lengths.
fn matching(
    part: &Cache<SliceKey, CachedSlice>,
    pick: impl Fn(&SliceKey) -> bool,
) -> Vec<(SliceKey, u64)> {
    part.iter()
        .filter(|(k, _)| pick(k))
        .map(|(k, s)| (*k, s.bytes.len() as u64))
        .collect()
}

impl MemoryTier {
    /// `max_bytes` may exceed 4 GiB: moka's capacity is a u64 sum of u32 weights, and a
    /// single slice is at most 64 MiB (checked in config).
    pub fn new(max_bytes: u64, policy: MemoryPolicy) -> Self {
        match policy {
            MemoryPolicy::Lru => Self {
                fills: slices("slices", max_bytes, EvictionPolicy::lru(), 0).build(),
                main: None,
                video: None,
            },
            MemoryPolicy::TinyLfu => Self {
                fills: slices("slices", max_bytes, EvictionPolicy::tiny_lfu(), 0).build(),
                main: None,
                video: None,
            },
            MemoryPolicy::Video => {
                let policy = Arc::new(VideoPolicy::new(max_bytes));
                let told = policy.clone();
                // The policy evicts before moka's own LRU would; what moka still evicts
                // (a fill landing before its admission ran) the policy forgets.
                let fills = slices(
                    "slices",
                    max_bytes,
                    EvictionPolicy::lru(),
                    VIDEO_ENTRY_OVERHEAD,
                )
                .eviction_listener(move |key: Arc<SliceKey>, _, cause| {
                    if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                        told.forget(&key);
                    }
                })
                .build();
                Self {
                    fills,
                    main: None,
                    video: Some(policy),
                }
            }
            MemoryPolicy::Windowed => {
                let window_bytes = max_bytes / 100 * WINDOW_PERCENT;
                let main = slices(
                    "slices-main",
                    max_bytes - window_bytes,
                    EvictionPolicy::tiny_lfu(),
                    0,
                )
                .build();
                let to_main = main.clone();
                let fills = slices("slices-window", window_bytes, EvictionPolicy::lru(), 0)
                    .async_eviction_listener(
                        move |key: Arc<SliceKey>, slice, cause| -> ListenerFuture {
                            let main = to_main.clone();
                            Box::pin(async move {
                                if cause == RemovalCause::Size {
                                    main.insert(*key, slice).await;
                                }
                            })
                        },
                    )
                    .build();
                Self {
                    fills,
                    main: Some(main),
                    video: None,
                }
            }
        }
    }

    pub async fn get(&self, key: &SliceKey) -> Option<CachedSlice> {
        // The main part is asked first, hit or not: its TinyLFU counts every request,
        // including those the window answers.
        if let Some(main) = &self.main {
            if let Some(slice) = main.get(key).await {
                return Some(slice);
            }
        }
        self.fills.get(key).await
    }

    pub fn contains(&self, key: &SliceKey) -> bool {
        self.fills.contains_key(key) || self.main.as_ref().is_some_and(|m| m.contains_key(key))
    }

    /// Where a fill inserts its slice (`entry().or_try_insert_with`, coalesced).
    pub fn fills(&self) -> &Cache<SliceKey, CachedSlice> {
        &self.fills
    }

    /// A fill put `key`'s slice of `len` bytes in the tier (`entry().is_fresh()`). With
    /// the `video` policy this drops what it displaces, or the slice itself.
    pub async fn filled(&self, key: &SliceKey, len: usize) {
        let Some(policy) = &self.video else {
            return;
        };
        for doomed in policy.filled(*key, u64::from(weight(len, VIDEO_ENTRY_OVERHEAD))) {
            self.fills.invalidate(&doomed).await;
        }
    }

    /// Whether a slice of `len` bytes not in the tier would be kept if filled now (see
    /// [`VideoPolicy::would_keep`]); always with the moka-only policies, which
    /// decide after the insert.
    pub fn would_keep(&self, key: &SliceKey, len: usize) -> bool {
        self.video.as_ref().is_none_or(|policy| {
            policy.would_keep(key, u64::from(weight(len, VIDEO_ENTRY_OVERHEAD)))
        })
    }

    /// [`MemoryTier::would_keep`] for a slice the disk tier holds
    /// ([`VideoPolicy::would_keep_held_elsewhere`]).
    pub fn would_keep_from_disk(&self, key: &SliceKey, len: usize) -> bool {
        self.video.as_ref().is_none_or(|policy| {
            policy.would_keep_held_elsewhere(key, u64::from(weight(len, VIDEO_ENTRY_OVERHEAD)))
        })
    }

    /// What a `video` tier keeps, to be told of client reads ([`VideoPolicy::read`]);
    /// none with the other policies.
    pub fn video_policy(&self) -> Option<&VideoPolicy> {
        self.video.as_deref()
    }

    /// Drops the slice from every part of the tier.
    pub async fn invalidate(&self, key: &SliceKey) {
        if let Some(policy) = &self.video {
            policy.forget(key);
        }
        self.fills.invalidate(key).await;
        if let Some(main) = &self.main {
            main.invalidate(key).await;
        }
    }

    /// Drops every slice whose key `doomed` picks, and returns them with their lengths.
    /// A slice on its way from the window to the main part while this runs is dropped
    /// too: the window's pending work (and with it the move) is finished before the main
    /// part is looked at again.
    pub async fn remove_where(&self, doomed: impl Fn(&SliceKey) -> bool) -> Vec<(SliceKey, u64)> {
        let mut removed = Vec::new();
        for part in std::iter::once(&self.fills).chain(self.main.as_ref()) {
            for (key, len) in matching(part, &doomed) {
                self.invalidate(&key).await;
                removed.push((key, len));
            }
        }
        if let Some(main) = &self.main {
            self.fills.run_pending_tasks().await;
            for (key, len) in matching(main, &doomed) {
                main.invalidate(&key).await;
                removed.push((key, len));
            }
        }
        removed
    }

    /// The keys of every slice held.
    pub fn keys(&self) -> impl Iterator<Item = SliceKey> + '_ {
        self.fills
            .iter()
            .chain(self.main.iter().flat_map(|m| m.iter()))
            .map(|(k, _)| *k)
    }

    /// Bytes currently weighed (payload plus per-entry overhead).
    pub fn weighted_bytes(&self) -> u64 {
        self.fills.weighted_size() + self.main.as_ref().map_or(0, |m| m.weighted_size())
    }

    pub fn entries(&self) -> u64 {
        self.fills.entry_count() + self.main.as_ref().map_or(0, |m| m.entry_count())
    }

    /// Applies pending evictions now, so the counters above are exact (tests, /status).
    pub async fn sync(&self) {
        self.fills.run_pending_tasks().await;
        if let Some(main) = &self.main {
            main.run_pending_tasks().await;
        }
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
        let tier = MemoryTier::new(10 * 4096, MemoryPolicy::default());
        for i in 0..100 {
            tier.fills()
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
    async fn a_windowed_tier_moves_what_leaves_the_window_to_its_main_part() {
        // 2 slices of window, 2 of main.
        let tier = MemoryTier::new(
            4 * (4000 + u64::from(ENTRY_OVERHEAD)) + 200,
            MemoryPolicy::Windowed,
        );
        let bytes = |i: u64| Bytes::from(vec![i as u8; 4000]);
        for i in 0..3 {
            tier.fills().insert(key(i), slice(bytes(i))).await;
            tier.sync().await;
        }
        // Slice 0 left the window for the main part, which had room: all three are held.
        for i in 0..3 {
            assert_eq!(
                tier.get(&key(i)).await.unwrap().bytes,
                bytes(i),
                "slice {i}"
            );
            assert!(tier.contains(&key(i)));
        }
        assert_eq!(tier.entries(), 3);
        assert_eq!(tier.keys().count(), 3);
        assert!(tier.weighted_bytes() <= 4 * (4000 + u64::from(ENTRY_OVERHEAD)) + 200);
    }

    #[tokio::test]
    async fn removal_reaches_both_parts_of_a_windowed_tier() {
        let tier = MemoryTier::new(
            4 * (4000 + u64::from(ENTRY_OVERHEAD)) + 200,
            MemoryPolicy::Windowed,
        );
        for i in 0..3 {
            tier.fills()
                .insert(key(i), slice(Bytes::from(vec![0u8; 4000])))
                .await;
            tier.sync().await;
        }
        let mut removed = tier.remove_where(|k| k.index != 1).await;
        removed.sort_by_key(|(k, _)| k.index);
        assert_eq!(
            removed
                .iter()
                .map(|(k, n)| (k.index, *n))
                .collect::<Vec<_>>(),
            [(0, 4000), (2, 4000)]
        );
        tier.sync().await;
        assert!(tier.get(&key(0)).await.is_none());
        assert!(tier.get(&key(1)).await.is_some());
        assert!(tier.get(&key(2)).await.is_none());
        tier.invalidate(&key(1)).await;
        assert!(!tier.contains(&key(1)));
    }

    #[tokio::test]
    async fn a_video_tier_keeps_a_popular_title_over_a_title_read_once() {
        // Room for 2 slices; the popular title's 2 are held.
        let s = u64::from(weight(4000, VIDEO_ENTRY_OVERHEAD));
        let tier = MemoryTier::new(2 * s + 200, MemoryPolicy::Video);
        let popular = ObjectId::new("popular", "v");
        let once = ObjectId::new("once", "v");
        let at = |object, index| SliceKey { object, index };
        for _ in 0..5 {
            tier.video_policy()
                .unwrap()
                .read(popular, 0, 1, false, 1 << 20);
        }
        for i in 0..2 {
            let key = at(popular, i);
            tier.fills()
                .insert(key, slice(Bytes::from(vec![0u8; 4000])))
                .await;
            tier.filled(&key, 4000).await;
        }
        // A title nobody read before: its slice is served but not kept (LRU would
        // have dropped the popular title's slice 0 for it).
        tier.video_policy()
            .unwrap()
            .read(once, 0, 0, false, 1 << 20);
        let key = at(once, 0);
        tier.fills()
            .insert(key, slice(Bytes::from(vec![1u8; 4000])))
            .await;
        tier.filled(&key, 4000).await;
        tier.sync().await;
        assert!(tier.contains(&at(popular, 0)) && tier.contains(&at(popular, 1)));
        assert!(!tier.contains(&key));
        // A read that stopped inside a slice keeps it for the next segment, whatever
        // its title's count.
        tier.video_policy().unwrap().read(once, 0, 0, true, 1 << 20);
        tier.fills()
            .insert(key, slice(Bytes::from(vec![1u8; 4000])))
            .await;
        tier.filled(&key, 4000).await;
        tier.sync().await;
        assert!(tier.contains(&key));
        assert_eq!(tier.entries(), 2);
        assert_eq!(tier.keys().count(), 2);
        assert!(tier.weighted_bytes() <= 2 * s + 200);
        // Purges reach it, and free its room in the policy.
        let removed = tier.remove_where(|k| k.object == once).await;
        assert_eq!(removed, [(key, 4000)]);
        let back = at(popular, 5);
        tier.fills()
            .insert(back, slice(Bytes::from(vec![2u8; 4000])))
            .await;
        tier.filled(&back, 4000).await;
        tier.sync().await;
        assert!(tier.contains(&back), "the purged slice's room was free");
        assert_eq!(tier.entries(), 2);
    }

    #[tokio::test]
    async fn budget_over_4_gib_holds_entries() {
        let tier = MemoryTier::new(8 << 30, MemoryPolicy::default());
        tier.fills()
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
