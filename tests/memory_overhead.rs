//! The memory tier's per-entry weight covers what an entry really costs, so a budget of
//! many small slices is kept (`cache::memory::ENTRY_OVERHEAD`).

mod counting;

use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use cdn_edge::cache::memory::{MemoryTier, ENTRY_OVERHEAD};
use cdn_edge::cache::{CachedSlice, ObjectId, ObjectMeta, SliceKey};
use cdn_edge::config::MemoryPolicy;
use counting::Live;

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

#[tokio::test]
async fn an_entry_costs_no_more_than_it_weighs() {
    const N: u64 = 20_000;
    const SLICES_PER_OBJECT: u64 = 64;
    const PAYLOAD: usize = 16;
    // Two thirds full: past half, where moka sizes its frequency sketch.
    let tier = MemoryTier::new(
        N * (PAYLOAD as u64 + u64::from(ENTRY_OVERHEAD)) * 3 / 2,
        MemoryPolicy::TinyLfu,
    );
    let ids: Vec<ObjectId> = (0..N.div_ceil(SLICES_PER_OBJECT))
        .map(|o| ObjectId::new(&o.to_string(), "v"))
        .collect();
    let metas: Vec<Arc<ObjectMeta>> = ids
        .iter()
        .map(|id| Arc::new(ObjectMeta::new(id, 1 << 26, None)))
        .collect();
    let start = Live::now();
    for i in 0..N {
        let meta = &metas[(i / SLICES_PER_OBJECT) as usize];
        let mut bytes = BytesMut::with_capacity(PAYLOAD);
        bytes.put_bytes(i as u8, PAYLOAD);
        let slice = CachedSlice {
            bytes: bytes.freeze(),
            meta: meta.clone(),
        };
        let key = SliceKey {
            object: ids[(i / SLICES_PER_OBJECT) as usize],
            index: i % SLICES_PER_OBJECT,
        };
        // As a fill inserts a slice: its requester gets a clone (the `Bytes` is shared).
        let got = tier
            .fills()
            .entry(key)
            .or_try_insert_with(async { Ok::<_, ()>(slice) })
            .await
            .unwrap();
        drop(got);
    }
    tier.sync().await;
    let taken = start.since();
    assert_eq!(tier.entries(), N, "nothing evicted");
    let per_entry = (taken.usable - (N as isize) * PAYLOAD as isize) / N as isize;
    assert!(
        per_entry <= ENTRY_OVERHEAD as isize,
        "an entry costs {per_entry} bytes besides its slice, but weighs {ENTRY_OVERHEAD}"
    );
    // Not far below either, or the budget would leave memory unused.
    assert!(per_entry * 3 >= ENTRY_OVERHEAD as isize * 2, "{per_entry}");
}
