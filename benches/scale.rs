//! The lookups a hit makes, with 10k, 100k and 1M slices cached and random keys.
//!
//! Informs: whether a hit costs more CPU as the caches grow. A memory hit looks up the
//! object's metadata, asks whether the slices are held (for `Cache-Status`) and gets
//! each slice; a disk hit also notes the object's name (`purge::Names`) and looks the
//! slice up in the disk index. Each is measured on the real structure with N entries,
//! each iteration with the next of a million keys drawn at random from those held, so
//! that at large N the lookups miss the CPU caches as a busy node's would. At 10k entries
//! a structure (about 4 MB) fits a 32 MiB L3; from 100k (about 36 MB) it does not.
//! Metadata is per object: its cache holds at most 262,144 objects, so it is measured
//! with N objects up to that.
//!
//! What is measured is the CPU time of the benchmark's thread (`CLOCK_THREAD_CPUTIME_ID`),
//! not wall-clock time: on a shared machine a wall clock counts the time other work held
//! the CPU. `cargo bench --bench scale`; last results are in docs/performance.md ("How
//! cost grows").
#![allow(unsafe_code)]

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};

use cdn_edge::cache::disk::new_index;
use cdn_edge::cache::memory::{MemoryTier, ENTRY_OVERHEAD};
use cdn_edge::cache::purge::Purges;
use cdn_edge::cache::{metadata_cache, CachedSlice, ObjectId, ObjectMeta, SliceKey};
use cdn_edge::config::MemoryPolicy;

const SIZES: [u64; 3] = [10_000, 100_000, 1_000_000];
/// Slices per object: a 64 MiB rendition in 1 MiB slices.
const SLICES_PER_OBJECT: u64 = 64;
/// Most objects the metadata cache keeps (`METADATA_ENTRIES` in `cache`).
const METADATA_ENTRIES: u64 = 262_144;
/// Keys drawn for the lookups (a power of two).
const DRAWN: usize = 1 << 20;

/// The CPU time this thread has used.
struct ThreadCpu;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, now: *mut Timespec) -> i32;
}

/// Linux's `CLOCK_THREAD_CPUTIME_ID`.
const CLOCK_THREAD_CPUTIME_ID: i32 = 3;

fn thread_cpu() -> Duration {
    let mut now = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `now` is a valid, writable `struct timespec` (two 64-bit fields on 64-bit
    // Linux) for the call's duration.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(now.sec as u64, now.nsec as u32)
}

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }

    fn end(&self, started: Duration) -> Duration {
        thread_cpu().saturating_sub(started)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuNanos
    }
}

/// Shows CPU nanoseconds as criterion shows wall-clock ones, with "cpu" to tell them apart.
struct CpuNanos;

impl ValueFormatter for CpuNanos {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical < 1e3 {
            (1.0, "ns cpu")
        } else if typical < 1e6 {
            (1e-3, "µs cpu")
        } else {
            (1e-6, "ms cpu")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(&self, _: f64, _: &Throughput, values: &mut [f64]) -> &'static str {
        values.iter_mut().for_each(|v| *v = 1e9 / *v);
        "per cpu s"
    }

    fn scale_for_machines(&self, _: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn object(o: u64) -> ObjectId {
    ObjectId::new(&format!("{:08}", 10_000_000 + o), "1080p")
}

fn slice_key(ids: &[ObjectId], i: u64) -> SliceKey {
    SliceKey {
        object: ids[(i / SLICES_PER_OBJECT) as usize],
        index: i % SLICES_PER_OBJECT,
    }
}

/// `DRAWN` numbers below `n`, at random (seeded: every run draws the same).
fn drawn(n: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(n);
    (0..DRAWN).map(|_| rng.gen_range(0..n)).collect()
}

/// The next drawn key on each call.
fn cycle<T: Copy>(keys: &[T]) -> impl FnMut() -> T + '_ {
    let at = Cell::new(0usize);
    move || {
        let i = at.get();
        at.set(i.wrapping_add(1));
        keys[i & (DRAWN - 1)]
    }
}

fn slices(c: &mut Criterion<ThreadCpu>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("scale");
    for n in SIZES {
        let objects = n.div_ceil(SLICES_PER_OBJECT);
        let ids: Vec<ObjectId> = (0..objects).map(object).collect();
        let keys: Vec<SliceKey> = drawn(n).into_iter().map(|i| slice_key(&ids, i)).collect();

        // Two thirds full: past half, where moka starts its frequency sketch, as in a
        // node that has run a while.
        let tier = MemoryTier::new(
            n * u64::from(ENTRY_OVERHEAD + 5) * 3 / 2,
            MemoryPolicy::TinyLfu,
        );
        let metas: Vec<Arc<ObjectMeta>> = ids
            .iter()
            .map(|id| Arc::new(ObjectMeta::new(id, SLICES_PER_OBJECT << 20, None)))
            .collect();
        rt.block_on(async {
            for i in 0..n {
                let slice = CachedSlice {
                    bytes: Bytes::from_static(b"slice"),
                    meta: metas[(i / SLICES_PER_OBJECT) as usize].clone(),
                };
                tier.fills().insert(slice_key(&ids, i), slice).await;
            }
            tier.sync().await;
        });
        let mut next = cycle(&keys);
        g.bench_function(BenchmarkId::new("memory_get", n), |b| {
            b.to_async(&rt).iter(|| {
                let key = next();
                let tier = &tier;
                async move { tier.get(black_box(&key)).await }
            })
        });
        let mut next = cycle(&keys);
        g.bench_function(BenchmarkId::new("memory_contains", n), |b| {
            b.iter(|| tier.contains(black_box(&next())))
        });
        drop(tier);

        let index = new_index(n * (1 << 20) * 3 / 2, |_, _| {});
        for i in 0..n {
            index.insert(slice_key(&ids, i), 1 << 20);
        }
        index.run_pending_tasks();
        let mut next = cycle(&keys);
        g.bench_function(BenchmarkId::new("disk_index_get", n), |b| {
            b.iter(|| index.get(black_box(&next())))
        });
        let mut next = cycle(&keys);
        g.bench_function(BenchmarkId::new("disk_index_contains", n), |b| {
            b.iter(|| index.contains_key(black_box(&next())))
        });
    }
    g.finish();
}

/// Lookups keyed by object, with N objects (the metadata cache keeps at most
/// `METADATA_ENTRIES`).
fn objects(c: &mut Criterion<ThreadCpu>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("scale");
    for n in SIZES.map(|n| n.min(METADATA_ENTRIES)) {
        let ids: Vec<ObjectId> = (0..n).map(object).collect();
        let keys: Vec<ObjectId> = drawn(n).into_iter().map(|i| ids[i as usize]).collect();
        let cache = metadata_cache();
        let purges = Purges::in_memory();
        rt.block_on(async {
            for (o, id) in ids.iter().enumerate() {
                cache
                    .insert(*id, Arc::new(ObjectMeta::new(id, 64 << 20, None)))
                    .await;
                purges.names().note(*id, &format!("{:08}", 10_000_000 + o));
            }
            cache.run_pending_tasks().await;
        });
        let mut next = cycle(&keys);
        g.bench_function(BenchmarkId::new("metadata_get", n), |b| {
            b.to_async(&rt).iter(|| {
                let key = next();
                let cache = &cache;
                async move { cache.get(black_box(&key)).await }
            })
        });
        let mut next = cycle(&keys);
        g.bench_function(BenchmarkId::new("names_note", n), |b| {
            b.iter(|| purges.names().note(black_box(next()), "10000000"))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = slices, objects
}
criterion_main!(benches);
