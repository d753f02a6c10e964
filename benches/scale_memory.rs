//! What the caches' bookkeeping takes per cached slice, beyond the slice's own bytes.
//!
//! Informs: how much memory a node needs next to its slices when it holds 10k, 100k or
//! 1M of them, and whether the memory tier's per-entry weight (`ENTRY_OVERHEAD` in
//! `cache::memory`) covers what an entry really costs. A counting allocator (around
//! mimalloc, the edge's allocator) measures the real structures, filled as the edge
//! fills them:
//!
//! - objects: per object, its metadata as learnt from an origin answer (ETag, and a
//!   `Content-Type` that Pingora hands over as a slice of the answer's header buffer),
//!   its entry in the metadata cache, and its name (`purge::Names`);
//! - memory: per slice, the memory tier's entry for a heap slice (key, `CachedSlice`,
//!   moka's own bookkeeping, the `Bytes` header a shared slice gets);
//! - pool: the same for a slice in the page pool (its `Bytes` owns a pool slot);
//! - disk: per slice, the disk tier's index entry.
//!
//! Each structure at each size is built in a fresh child process, which reports the
//! bytes still allocated (as requested, and as mimalloc rounds them), the allocations,
//! and its RSS growth. `cargo bench --bench scale_memory` runs 10k, 100k and 1M slices
//! with 1 and 64 slices per object; `SCALE_N=100000 SCALE_S=64` picks sizes; under
//! `cargo test` it runs 1,000 slices. Last results are in docs/performance.md ("How
//! cost grows").
#![allow(clippy::print_stdout)]

use std::process::Command;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderValue;

use cdn_edge::cache::disk::new_index;
use cdn_edge::cache::memory::{MemoryTier, ENTRY_OVERHEAD};
use cdn_edge::cache::meta::{Answer, Validator};
use cdn_edge::cache::pages::{PagePool, SENDFILE_MIN};
use cdn_edge::cache::purge::Purges;
use cdn_edge::cache::{metadata_cache, CachedSlice, ObjectId, ObjectMeta, SliceKey};
use cdn_edge::config::MemoryPolicy;

#[path = "../tests/counting/mod.rs"]
mod counting;
use counting::Live;

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

/// Bytes of each tiny slice: small next to the bookkeeping, and subtracted from it.
const PAYLOAD: usize = 16;
/// Length each disk index entry weighs (a 1 MiB slice file).
const FILE_LEN: u32 = (1 << 20) + 200;

/// A byte budget that `n` entries of `weight` fill to two thirds: past half full, where
/// moka sizes its frequency sketch, as in a node that has been running a while.
fn two_thirds_full(n: u64, weight: u64) -> u64 {
    n * weight * 3 / 2
}

/// An origin's ETag, as long as a typical one (an MD5 in quotes).
fn etag(o: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{o:032x}\"")).unwrap()
}

/// What a 206 from an origin says, its `Content-Type` as Pingora's HTTP/1 client gives
/// it: a slice of the frozen buffer the response header was read into (4 KiB at least).
fn answer(o: u64, slices: u64) -> Answer {
    let head = b"HTTP/1.1 206 Partial Content\r\nContent-Type: video/mp4\r\n\r\n";
    let mut buf = BytesMut::with_capacity(4096);
    buf.put_slice(head);
    // The read that brought the header brought the body's first bytes too.
    buf.put_bytes(0x5a, 4096 - head.len());
    let buf = buf.freeze();
    let at = head.len() - "video/mp4\r\n\r\n".len();
    Answer {
        size: slices * (1 << 20),
        validator: Validator::from_headers(Some(&etag(o)), None),
        content_type: Some(HeaderValue::from_maybe_shared(buf.slice(at..at + 9)).unwrap()),
    }
}

fn object_name(o: u64) -> String {
    format!("{:08}", 10_000_000 + o)
}

/// A slice's bytes on the heap, as the origin client reads them.
fn heap_slice(i: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(PAYLOAD);
    b.put_slice(&[i as u8; PAYLOAD]);
    b.freeze()
}

/// Runs one structure with `n` slices, `s` per object, and prints what it took.
fn child(what: &str, n: u64, s: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let objects = n.div_ceil(s);
    let ids: Vec<ObjectId> = (0..objects)
        .map(|o| ObjectId::new(&object_name(o), "1080p"))
        .collect();
    let key = |i: u64| SliceKey {
        object: ids[(i / s) as usize],
        index: i % s,
    };
    // Metadata every slice points at; made before the slices are measured.
    let metas: Vec<Arc<ObjectMeta>> = if what == "objects" {
        Vec::new()
    } else {
        (0..objects)
            .map(|o| Arc::new(ObjectMeta::new(&ids[o as usize], s << 20, None)))
            .collect()
    };
    let before = Live::now();
    let (taken, payload, entries) = match what {
        "objects" => rt.block_on(async {
            let cache = metadata_cache();
            let purges = Purges::in_memory();
            let mut held = Vec::with_capacity(objects as usize);
            let start = Live::now();
            for o in 0..objects {
                // As `record_answer` learns an object from its first fill.
                let id = ids[o as usize];
                let meta = Arc::new(ObjectMeta::learnt(&id, &answer(o, s), 1, 60_000));
                cache.entry(id).or_insert(meta.clone()).await;
                purges.names().note(id, &object_name(o));
                // Slices keep their object's metadata after the cache forgets it.
                held.push(meta);
            }
            cache.run_pending_tasks().await;
            let taken = start.since();
            println!(
                "  (metadata cache holds {} of {objects} objects)",
                cache.entry_count()
            );
            (taken, 0, objects)
        }),
        "memory" | "pool" => rt.block_on(async {
            let len = if what == "pool" { 0 } else { PAYLOAD as u64 };
            let tier = MemoryTier::new(
                two_thirds_full(n, len + u64::from(ENTRY_OVERHEAD)),
                MemoryPolicy::TinyLfu,
            );
            let made = Live::now();
            let pool = (what == "pool").then(|| {
                PagePool::for_tier(SENDFILE_MIN as u64, n * SENDFILE_MIN as u64)
                    .expect("a page pool on this machine")
            });
            if pool.is_some() {
                let made = made.since();
                println!(
                    "  (page pool for {n} slices: {} B allocated at start, {:.1} B per slice)",
                    made.usable,
                    made.usable as f64 / n as f64
                );
            }
            let start = Live::now();
            for i in 0..n {
                let bytes = match &pool {
                    // A slot's bookkeeping is the same however much of it is written.
                    Some(p) => p.writer(SENDFILE_MIN).expect("a free slot").finish(),
                    None => heap_slice(i),
                };
                let slice = CachedSlice {
                    bytes,
                    meta: metas[(i / s) as usize].clone(),
                };
                // As a fill inserts it: the caller gets a clone of the value.
                let got = tier
                    .fills()
                    .entry(key(i))
                    .or_try_insert_with(async { Ok::<_, ()>(slice) })
                    .await
                    .unwrap();
                drop(got);
            }
            tier.sync().await;
            let taken = start.since();
            assert_eq!(tier.entries(), n);
            let payload = if pool.is_some() {
                0
            } else {
                n * PAYLOAD as u64
            };
            std::mem::forget(tier);
            std::mem::forget(pool);
            (taken, payload, n)
        }),
        "disk" => {
            let index = new_index(two_thirds_full(n, u64::from(FILE_LEN)), |_, _| {});
            let start = Live::now();
            for i in 0..n {
                index.insert(key(i), FILE_LEN);
            }
            index.run_pending_tasks();
            let taken = start.since();
            assert_eq!(index.entry_count(), n);
            std::mem::forget(index);
            (taken, 0, n)
        }
        other => panic!("unknown structure {other}"),
    };
    let total = before.since();
    let per = |v: isize| (v - payload as isize) as f64 / entries as f64;
    println!(
        "{what:<8} n={n:>8} s={s:>3} per {}: {:>6.1} B requested, {:>6.1} B usable, {:.2} allocations; RSS {:>6.1} B",
        if what == "objects" { "object" } else { "slice " },
        per(taken.requested),
        per(taken.usable),
        taken.blocks as f64 / entries as f64,
        per(total.rss),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        let what = &args[at + 1];
        let n = args[at + 2].parse().unwrap();
        let s = args[at + 3].parse().unwrap();
        child(what, n, s);
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let list = |var: &str, default: &[u64]| -> Vec<u64> {
        std::env::var(var).map_or_else(
            |_| default.to_vec(),
            |v| v.split(',').map(|x| x.trim().parse().unwrap()).collect(),
        )
    };
    let sizes = list(
        "SCALE_N",
        if full {
            &[10_000, 100_000, 1_000_000]
        } else {
            &[1_000]
        },
    );
    let layouts = list("SCALE_S", &[1, 64]);
    let exe = std::env::current_exe().unwrap();
    println!("scale_memory: bytes per entry beyond the slices' own ({PAYLOAD}-byte heap slices)");
    let run = |what: &str, n: u64, s: u64| {
        let status = Command::new(&exe)
            .args(["--child", what, &n.to_string(), &s.to_string()])
            .status()
            .expect("run a child");
        assert!(status.success(), "{what} n={n} s={s} failed");
    };
    for &n in &sizes {
        // Per slice, whatever the layout (the slices of an object share its metadata).
        for what in ["memory", "pool", "disk"] {
            run(what, n, 64);
        }
        for &s in &layouts {
            run("objects", n, s);
        }
    }
}
