//! Disk index rebuild after a restart.
//!
//! Informs: whether a large disk tier delays start-up. `DiskTier::open` must return at
//! once (the rebuild runs in the background), and the rebuild itself should index
//! 100k slice files in a few seconds. `cargo bench --bench disk_rebuild` writes 100,000
//! slice files (4 KiB payloads, ~420 MB) into a temporary directory, reopens it twice
//! (first with the page cache dropped, where allowed, then with it warm) and reports
//! both times and what the index took in RSS; under `cargo test` it runs the same with
//! 1,000 files. `DISK_REBUILD_FILES` and `DISK_REBUILD_PAYLOAD` (bytes) change the
//! count and size of the files (mind the disk: each takes at least one block);
//! `DISK_REBUILD_DIR` puts them under another directory than the target's;
//! `DISK_REBUILD_POLICY=lru` opens the tier with `cache.disk.policy = "lru"` (default
//! `video`, whose records of each file the RSS figure then includes).
//! Last results are in docs/performance.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use cdn_edge::cache::disk::DiskTier;
use cdn_edge::cache::purge::Purges;
use cdn_edge::cache::{CachedSlice, ObjectId, ObjectMeta, ObjectRef, SliceKey};
use cdn_edge::config::{DiskCache, DiskPolicy};
use cdn_edge::metrics::Metrics;

#[path = "../tests/counting/mod.rs"]
mod counting;
use counting::rss;

/// Default payload of each slice file, in bytes.
const PAYLOAD: usize = 4096;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number"))
    })
}

/// Empties the page cache (root only), after writing back what is dirty; false if not
/// allowed.
fn drop_page_cache() -> bool {
    std::process::Command::new("sync")
        .status()
        .is_ok_and(|s| s.success())
        && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn wait(what: &str, limit: Duration, cond: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
    started.elapsed()
}

/// Opens the tier over the files written, waits for the rebuild and reports it.
#[allow(clippy::print_stdout)]
fn reopen(cfg: &DiskCache, payload: u64, purges: &Arc<Purges>, files: u64, page_cache: &str) {
    let metrics = Arc::new(Metrics::new());
    let rss_before = rss();
    let opened = Instant::now();
    let tier =
        DiskTier::open(cfg, payload, metrics.clone(), purges.clone()).expect("reopen disk tier");
    let open_time = opened.elapsed();
    let rebuild = wait("rebuild", Duration::from_secs(3600), || {
        tier.stats().index_ready
    }) + open_time;
    tier.sync_blocking();
    let stats = tier.stats();
    assert_eq!(stats.entries, files, "every file is indexed");
    let grown = (rss() - rss_before).max(0);
    println!(
        "disk_rebuild: {files} files, page cache {page_cache}: open returned in {:.1} ms; \
         index rebuilt in {:.3} s ({:.0} files/s); RSS grew {:.1} MB ({:.0} B per file)",
        open_time.as_secs_f64() * 1e3,
        rebuild.as_secs_f64(),
        files as f64 / rebuild.as_secs_f64(),
        grown as f64 / 1e6,
        grown as f64 / files as f64,
    );
}

#[allow(clippy::print_stdout)]
fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let files = env_or("DISK_REBUILD_FILES", if full { 100_000 } else { 1_000 });
    let payload = env_or("DISK_REBUILD_PAYLOAD", PAYLOAD as u64);
    let under = std::env::var("DISK_REBUILD_DIR")
        .unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_string());
    let dir = tempfile::tempdir_in(under).expect("temp dir");
    let cfg = DiskCache {
        path: dir.path().to_path_buf(),
        max_bytes: 1 << 50,
        policy: match std::env::var("DISK_REBUILD_POLICY").as_deref() {
            Ok("lru") => DiskPolicy::Lru,
            Ok("video") | Err(_) => DiskPolicy::Video,
            Ok(other) => panic!("DISK_REBUILD_POLICY: video or lru, not {other}"),
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = rt.enter();

    let metrics = Arc::new(Metrics::new());
    let purges = Arc::new(Purges::in_memory());
    let tier =
        DiskTier::open(&cfg, payload, metrics.clone(), purges.clone()).expect("open disk tier");
    let bytes = Bytes::from(vec![0x5a; payload as usize]);
    let written = Instant::now();
    for n in 0..files {
        let o = format!("object-{}", n / 64);
        let obj = ObjectRef::new(&o, "v1");
        let object = ObjectId::new(&o, "v1");
        let slice = CachedSlice {
            bytes: bytes.clone(),
            meta: Arc::new(ObjectMeta::new(&object, 64 * payload, None)),
        };
        let key = SliceKey {
            object,
            index: n % 64,
        };
        // The write queue is bounded: wait for room rather than count drops.
        loop {
            let before = metrics.disk_writes_dropped.get();
            tier.store(key, &slice, &obj, purges.now());
            if metrics.disk_writes_dropped.get() == before {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    wait("writes", Duration::from_secs(3600), || {
        metrics.disk_writes.get() == files
    });
    let write_secs = written.elapsed().as_secs_f64();
    drop(tier);
    println!(
        "disk_rebuild: {files} slice files of {payload} B written in {write_secs:.2} s \
         ({:.0} files/s)",
        files as f64 / write_secs
    );
    // A restart after a reboot finds no file in the page cache; emulate it where allowed.
    let cold = full && drop_page_cache();
    reopen(
        &cfg,
        payload,
        &purges,
        files,
        if cold { "dropped first" } else { "warm" },
    );
    if cold {
        // A restart of the process alone: the files' metadata is still cached.
        reopen(&cfg, payload, &purges, files, "warm");
    }
}
