//! One disk-tier hit of a 1 MiB slice, whole or a 310 KB range of it, and what putting
//! it in the page pool adds.
//!
//! Informs: what a range hit served from the disk tier costs the edge besides sending,
//! and whether a slice read from disk should be copied into the memory tier's page pool
//! (so that later memory hits leave by `sendfile`) or kept in the buffer it was read
//! into; and what reading only the blocks a range lies in saves. `read_1MiB` is
//! `DiskTier::read` (open, read the whole file, check its CRC-32s) on a file in the page
//! cache; `read_310KB_part` is `DiskTier::read_part` of a 310,491-byte range, as a range
//! hit that the memory tier would not keep reads it (six 64 KiB blocks; the file is in
//! the page cache, so it is read on the calling thread, not the blocking pool);
//! `read_1MiB_into_pool` adds `PagePool::adopt`, the copy into fresh
//! shmem pages that every disk hit made before, including freeing the slot again when
//! the slice is dropped. The files go to `DISK_HIT_DIR` (default the system's temporary
//! directory). Last results are in docs/performance.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};

use cdn_edge::cache::disk::DiskTier;
use cdn_edge::cache::pages::PagePool;
use cdn_edge::cache::purge::Purges;
use cdn_edge::cache::{CachedSlice, ObjectId, ObjectMeta, ObjectRef, SliceKey};
use cdn_edge::config::DiskCache;
use cdn_edge::metrics::Metrics;

const SLICE: u64 = 1 << 20;

fn disk_hit(c: &mut Criterion) {
    // As the edge's `main` does: with transparent huge pages a fresh read buffer can
    // fault in a whole 2 MiB page (`THP=1` keeps them, to see that cost).
    if std::env::var_os("THP").is_none() {
        rustix::thread::disable_transparent_huge_pages(true).unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let base = std::env::var_os("DISK_HIT_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let cfg = DiskCache {
        path: dir.path().to_path_buf(),
        max_bytes: 1 << 30,
        policy: cdn_edge::config::DiskPolicy::Video,
    };
    let metrics = Arc::new(Metrics::new());
    let purges = Arc::new(Purges::in_memory());
    let tier = DiskTier::open(&cfg, SLICE, metrics.clone(), purges.clone()).unwrap();
    let object = ObjectId::new("movie", "v1");
    let key = SliceKey { object, index: 3 };
    let payload: Vec<u8> = (0..SLICE).map(|i| (i * 31 % 251) as u8).collect();
    let slice = CachedSlice {
        bytes: Bytes::from(payload),
        meta: Arc::new(ObjectMeta::new(&object, 8 * SLICE, None)),
    };
    tier.store(key, &slice, &ObjectRef::new("movie", "v1"), purges.now());
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics.disk_writes.get() == 0 {
        assert!(Instant::now() < deadline, "the slice was not written");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pool = PagePool::for_tier(SLICE, 64 * SLICE).ok();

    let mut g = c.benchmark_group("disk_hit");
    g.bench_function("read_1MiB", |b| {
        b.to_async(&rt).iter(|| async {
            let (read, _) = tier.read(&key).await.expect("a disk hit");
            assert_eq!(read.bytes.len(), SLICE as usize);
        })
    });
    g.bench_function("read_310KB_part", |b| {
        b.to_async(&rt).iter(|| async {
            let part = tier
                .read_part(&key, 300_000..610_491)
                .await
                .expect("a disk hit");
            assert_eq!(part.slice.bytes.len(), 6 << 16);
        })
    });
    if let Some(pool) = pool {
        g.bench_function("read_1MiB_into_pool", |b| {
            b.to_async(&rt).iter(|| async {
                let (read, _) = tier.read(&key).await.expect("a disk hit");
                let held = pool.adopt(read.bytes);
                assert!(cdn_edge::cache::pages::locate(&held).is_some());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, disk_hit);
criterion_main!(benches);
