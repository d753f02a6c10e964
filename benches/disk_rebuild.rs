//! Disk index rebuild after a restart.
//!
//! Informs: whether a large disk tier delays start-up. `DiskTier::open` must return at
//! once (the rebuild runs in the background), and the rebuild itself should index
//! 100k slice files in a few seconds. `cargo bench --bench disk_rebuild` writes 100,000
//! slice files (4 KiB payloads, ~420 MB) into a temporary directory, reopens it and
//! reports both times; under `cargo test` it runs the same with 1,000 files.
//! Last results are in README.md ("Performance").

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use cdn_edge::cache::disk::DiskTier;
use cdn_edge::cache::purge::Purges;
use cdn_edge::cache::{CachedSlice, ObjectId, ObjectMeta, ObjectRef, SliceKey};
use cdn_edge::config::DiskCache;
use cdn_edge::metrics::Metrics;

const PAYLOAD: usize = 4096;

fn wait(what: &str, limit: Duration, cond: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
    started.elapsed()
}

#[allow(clippy::print_stdout)]
fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let files: u64 = if full { 100_000 } else { 1_000 };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let cfg = DiskCache {
        path: dir.path().to_path_buf(),
        max_bytes: 1 << 40,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = rt.enter();

    let metrics = Arc::new(Metrics::new());
    let purges = Arc::new(Purges::in_memory());
    let tier = DiskTier::open(&cfg, PAYLOAD as u64, metrics.clone(), purges.clone())
        .expect("open disk tier");
    let payload = Bytes::from(vec![0x5a; PAYLOAD]);
    let written = Instant::now();
    for n in 0..files {
        let o = format!("object-{}", n / 64);
        let obj = ObjectRef::new(&o, "v1");
        let object = ObjectId::new(&o, "v1");
        let slice = CachedSlice {
            bytes: payload.clone(),
            meta: Arc::new(ObjectMeta::new(&object, 64 * PAYLOAD as u64, None)),
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
    wait("writes", Duration::from_secs(600), || {
        metrics.disk_writes.get() == files
    });
    let write_secs = written.elapsed().as_secs_f64();
    drop(tier);
    // A restart after a reboot finds no file in the page cache; emulate it where allowed.
    let cold = full
        && std::process::Command::new("sync")
            .status()
            .is_ok_and(|s| s.success())
        && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();

    let metrics = Arc::new(Metrics::new());
    let opened = Instant::now();
    let tier =
        DiskTier::open(&cfg, PAYLOAD as u64, metrics.clone(), purges).expect("reopen disk tier");
    let open_time = opened.elapsed();
    let rebuild = wait("rebuild", Duration::from_secs(600), || {
        tier.stats().index_ready
    }) + open_time;
    tier.sync_blocking();
    let stats = tier.stats();
    assert_eq!(stats.entries, files, "every file is indexed");
    println!(
        "disk_rebuild: {files} slice files written in {write_secs:.2} s; \
         open returned in {:.1} ms; index rebuilt in {:.3} s ({:.0} files/s, page cache {})",
        open_time.as_secs_f64() * 1e3,
        rebuild.as_secs_f64(),
        files as f64 / rebuild.as_secs_f64(),
        if cold { "dropped first" } else { "warm" }
    );
}
