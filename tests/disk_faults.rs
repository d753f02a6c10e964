//! The disk fault matrix (docs/reliability.md, "Disk faults"): for each way the disk
//! tier's file system can fail, what the client gets, what happens to the cache, and
//! the metric that counts it. A slice file that cannot be read whole and checked is
//! never served: the slice comes from the origin, byte-exact.
//!
//! Faults a test can make for real (files damaged, replaced or removed while the edge
//! runs, a directory the edge cannot write) run against the real edge process. Faults
//! it cannot (EIO, a full disk, a read that hangs, a file changed between open and
//! read) are injected through the tier's storage (`tests/support/disk.rs`) into the
//! slice store as the edge builds it, in this process, against a real test origin.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdn_edge::cache::disk::{DiskTier, Options};
use cdn_edge::cache::memory::MemoryTier;
use cdn_edge::cache::purge::Purges;
use cdn_edge::cache::{CachedSlice, ObjectId, ObjectMeta, ObjectRef, SliceKey, SliceStore, Source};
use cdn_edge::config::{Config, DiskCache, MemoryPolicy};
use cdn_edge::metrics::Metrics;
use cdn_edge::origin::OriginClient;
use cdn_edge::sources::Sources;
use cdn_edge::upstream::ConnectorSettings;

use support::disk::{Faults, ReadFault};
use support::edge::{signed, Edge, EdgeOptions};
use support::origin::{Mode, TestOrigin};
use support::{flip_byte, object_bytes, slice_file, slice_files};

const SLICE: u64 = 64 * 1024;
/// Five whole slices.
const SIZE: usize = 5 * SLICE as usize;
const SLICES: u64 = 5;
/// A memory tier too small for one (whole) slice: every lookup after a fill reads the
/// disk, once the memory tier's maintenance has run (`/metrics` runs it in an edge).
const NO_MEMORY: u64 = SLICE;
const EIO: i32 = 5;
const EMFILE: i32 = 24;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EDQUOT: i32 = 122;

/// Polls `cond` until it holds (10 s at most).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn range(index: u64) -> std::ops::Range<usize> {
    let start = (index * SLICE) as usize;
    start..SIZE.min(start + SLICE as usize)
}

/// The slice store of an edge whose disk tier uses [`Faults`]' storage, in this process.
struct Store {
    store: SliceStore,
    metrics: Arc<Metrics>,
    faults: Faults,
    dir: tempfile::TempDir,
    bytes: Vec<u8>,
}

impl Store {
    async fn open(origin: &TestOrigin, memory_bytes: u64, tune: impl FnOnce(&mut Options)) -> Self {
        let bytes = object_bytes(41, SIZE);
        origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
        let config = Config::from_toml(&format!(
            "[listen]\nhttp = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n[signing]\n\
             [[signing.keys]]\nid = \"k\"\nsecret = \"s\"\n[origin]\nurls = [\"{}\"]\n\
             path = \"/objects/{{o}}/{{v}}\"\n",
            origin.url()
        ))
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let connectors = ConnectorSettings::from_config(&config);
        let client = OriginClient::new(&config.origin, &connectors, metrics.clone(), None);
        let purges = Arc::new(Purges::in_memory());
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::default();
        let mut options = Options {
            storage: faults.storage(),
            ..Options::default()
        };
        tune(&mut options);
        let cfg = DiskCache {
            path: dir.path().to_path_buf(),
            max_bytes: 1 << 30,
            policy: cdn_edge::config::DiskPolicy::Video,
        };
        let disk = DiskTier::open_with(&cfg, SLICE, metrics.clone(), purges.clone(), options);
        let store = SliceStore::new(
            SLICE,
            MemoryTier::new(memory_bytes, MemoryPolicy::default()),
            Duration::from_secs(3600),
            Some(disk.unwrap()),
            Sources::new(Arc::new(client.unwrap()), None, config.origin.mode),
            metrics.clone(),
            purges,
        );
        Self {
            store,
            metrics,
            faults,
            dir,
            bytes,
        }
    }

    /// Slice `index`, checked against the origin's bytes, as a response gets it: the
    /// object's metadata, then the slice (the one fetched to learn the metadata, when
    /// it was not known).
    async fn get(&self, index: u64) -> Source {
        // Slices over the memory budget leave on the tier's next maintenance: now.
        self.store.sync().await;
        let obj = ObjectRef::new("movie", "v1");
        let lookup = self.store.meta(&obj, index, None).await.unwrap();
        let (bytes, source) = match lookup.slice {
            Some((_, bytes)) => (bytes, Source::Origin),
            None => {
                let slice = self.store.slice(&obj, index, &lookup.meta).await.unwrap();
                (slice.bytes, slice.source)
            }
        };
        assert!(
            bytes == self.bytes[range(index)],
            "slice {index}: wrong bytes"
        );
        source
    }

    /// The bytes `within` of slice `index` as a range response gets them
    /// (`SliceStore::slice_part`), checked against the origin's bytes.
    async fn get_part(&self, index: u64, within: std::ops::Range<u64>) -> Source {
        self.store.sync().await;
        let obj = ObjectRef::new("movie", "v1");
        let lookup = self.store.meta(&obj, index, None).await.unwrap();
        assert!(lookup.slice.is_none(), "the object is known");
        let slice = self
            .store
            .slice_part(&obj, index, &lookup.meta, within.clone())
            .await
            .unwrap();
        let at = slice.part_at.unwrap_or(0);
        let start = range(index).start + at as usize;
        assert!(at <= within.start && within.end <= at + slice.bytes.len() as u64);
        assert!(
            slice.bytes == self.bytes[start..start + slice.bytes.len()],
            "slice {index}: wrong bytes"
        );
        slice.source
    }

    /// Every slice, one origin request each, then waits until each is on disk.
    async fn fill(&self) {
        for index in 0..SLICES {
            self.get(index).await;
            let written = || self.metrics.disk_writes.get() == index + 1;
            until("the slice written", written).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_error_is_a_miss_and_drops_the_file_unless_the_process_is_short_of_descriptors() {
    // (OS error, whether the file is dropped)
    for (errno, dropped) in [(EIO, true), (EMFILE, false)] {
        let origin = TestOrigin::start().await;
        let s = Store::open(&origin, NO_MEMORY, |_| {}).await;
        s.fill().await;
        // The refetched slice cannot be written back: what is on disk is what the read left.
        s.faults.fail_writes(Some(ENOSPC));
        s.faults.on_read(2, ReadFault::Error(errno));
        assert_eq!(s.get(2).await, Source::Origin, "errno {errno}");
        assert_eq!(origin.requests_for("movie", "v1", 2 * SLICE), 2);
        assert_eq!(origin.requests(), SLICES + 1);
        assert_eq!(s.metrics.disk_read_errors_io.get(), 1);
        assert_eq!(s.metrics.cache_corrupt.get(), 0);
        let files = slice_files(s.dir.path()).len() as u64;
        let next = s.get(2).await;
        if dropped {
            assert_eq!(files, SLICES - 1, "errno {errno}: the file is deleted");
            assert_eq!(next, Source::Origin);
            assert_eq!(origin.requests(), SLICES + 2);
        } else {
            assert_eq!(files, SLICES, "errno {errno}: the file is kept");
            assert_eq!(next, Source::Disk);
            assert_eq!(origin.requests(), SLICES + 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_between_open_and_read_is_never_served() {
    /// The fault, given a valid file of another slice.
    type Fault = fn(&Path) -> ReadFault;
    // (fault, where the slice comes from, files found corrupt)
    let cases: [(Fault, Source, u64); 3] = [
        (|_| ReadFault::TruncateAfterOpen(100), Source::Origin, 1),
        (|_| ReadFault::OverwriteAfterOpen, Source::Origin, 1),
        // Renamed over: the open file is the old one, whole and valid.
        (
            |other| ReadFault::ReplaceAfterOpen(other.into()),
            Source::Disk,
            0,
        ),
    ];
    for (fault, source, corrupt) in cases {
        let origin = TestOrigin::start().await;
        let s = Store::open(&origin, NO_MEMORY, |_| {}).await;
        s.fill().await;
        // A valid slice file of another slice, of the same length, to rename over.
        let other = s.dir.path().join("other");
        std::fs::copy(slice_file(s.dir.path(), 3), &other).unwrap();
        let fault = fault(&other);
        s.faults.on_read(2, fault.clone());
        assert_eq!(s.get(2).await, source, "{fault:?}");
        assert_eq!(s.metrics.cache_corrupt.get(), corrupt, "{fault:?}");
        let refetched = u64::from(source == Source::Origin);
        assert_eq!(origin.requests(), SLICES + refetched, "{fault:?}");
        if matches!(fault, ReadFault::ReplaceAfterOpen(_)) {
            // The next read finds slice 3's file under slice 2's name.
            assert_eq!(s.get(2).await, Source::Origin);
            assert_eq!(s.metrics.cache_corrupt.get(), 1);
            assert_eq!(origin.requests(), SLICES + 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_hangs_is_given_up_and_the_slice_refetched() {
    let origin = TestOrigin::start().await;
    let s = Store::open(&origin, NO_MEMORY, |o| {
        o.read_timeout = Duration::from_millis(200);
    })
    .await;
    s.fill().await;
    s.faults.on_read(2, ReadFault::Hang);
    let started = Instant::now();
    assert_eq!(s.get(2).await, Source::Origin);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(s.metrics.disk_read_errors_timeout.get(), 1);
    assert_eq!(origin.requests(), SLICES + 1);
    // Other slices are still read from the disk meanwhile.
    assert_eq!(s.get(3).await, Source::Disk);
    s.faults.release();
}

/// A range's part of a slice the memory tier would not keep is read from disk by the
/// request; when that read hangs it is given up after the read timeout and the slice
/// fetched from the origin, without asking the disk a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_read_that_hangs_is_given_up_once_and_the_slice_refetched() {
    let origin = TestOrigin::start().await;
    let s = Store::open(&origin, NO_MEMORY, |o| {
        o.read_timeout = Duration::from_millis(200);
    })
    .await;
    s.fill().await;
    assert_eq!(s.get_part(3, 100..200).await, Source::Disk);
    let reads = s.faults.reads();
    s.faults.on_read(2, ReadFault::Hang);
    assert_eq!(s.get_part(2, 100..200).await, Source::Origin);
    assert_eq!(s.metrics.disk_read_errors_timeout.get(), 1);
    assert_eq!(s.faults.reads(), reads + 1, "the disk was asked once");
    assert_eq!(origin.requests(), SLICES + 1);
    s.faults.release();
    // A part that fails its check is a miss too: the file is dropped, the slice refetched.
    flip_byte(&slice_file(s.dir.path(), 4), 2000);
    assert_eq!(s.get_part(4, 0..10).await, Source::Origin);
    assert_eq!(s.metrics.cache_corrupt.get(), 1);
    assert_eq!(origin.requests(), SLICES + 2);
}

/// A disk slice the memory tier would not keep (its `video` policy holds slices that
/// score at least as high) is read once for all the requests waiting on it, served
/// byte-exact to each, and left on disk only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_slice_memory_would_not_keep_is_read_once_for_all_its_readers() {
    let origin = TestOrigin::start().await;
    // Room for two slices: the fill keeps slices 0 and 1 (no reads were told to the
    // policy, so no later slice scores higher than they do).
    let s = Store::open(&origin, 2 * (SLICE + 1024), |_| {}).await;
    s.fill().await;
    assert_eq!(s.get(0).await, Source::Memory);
    assert_eq!(s.store.stats().memory_entries, 2);
    let reads = s.faults.reads();
    let misses = s.metrics.memory.misses.get();
    s.faults.on_read(4, ReadFault::Hang);
    // All in this task: when the eighth request has missed memory, it waits on the fill.
    let release = async {
        until("eight memory misses", || {
            s.metrics.memory.misses.get() == misses + 8
        })
        .await;
        s.faults.release();
    };
    let (sources, ()) = tokio::join!(futures::future::join_all((0..8).map(|_| s.get(4))), release);
    let from_disk = sources.iter().filter(|&&x| x == Source::Disk).count();
    let coalesced = sources.iter().filter(|&&x| x == Source::Coalesced).count();
    assert_eq!((from_disk, coalesced), (1, 7), "{sources:?}");
    assert_eq!(s.faults.reads(), reads + 1);
    assert_eq!(s.get(4).await, Source::Disk, "not kept in memory");
    assert_eq!(s.faults.reads(), reads + 2);
    assert_eq!(s.store.stats().memory_entries, 2);
    assert_eq!(origin.requests(), SLICES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_pauses_writes_and_every_slice_is_still_served() {
    // (OS error, the `reason` it is counted under)
    for (errno, reason) in [
        (EIO, "io"),
        (EROFS, "io"),
        (ENOSPC, "no_space"),
        (EDQUOT, "no_space"),
    ] {
        let origin = TestOrigin::start().await;
        let s = Store::open(&origin, 64 << 20, |_| {}).await;
        s.faults.fail_writes(Some(errno));
        for index in 0..SLICES {
            assert_eq!(s.get(index).await, Source::Origin);
        }
        let m = &s.metrics;
        let (io, no_space) = (&m.disk_write_errors_io, &m.disk_write_errors_no_space);
        let done = || m.disk_writes_dropped.get() + io.get() + no_space.get() == SLICES;
        until("every write attempted or dropped", done).await;
        let (io, no_space) = (io.get(), no_space.get());
        let errors = if reason == "io" { io } else { no_space };
        assert_eq!(
            (errors, io + no_space),
            (1, 1),
            "errno {errno}: one failure, then a pause"
        );
        assert_eq!(
            s.faults.writes(),
            2,
            "errno {errno}: the check at open, one write"
        );
        assert_eq!(m.disk_writes.get(), 0);
        assert!(slice_files(s.dir.path()).is_empty());
        // Memory serves them from now on.
        for index in 0..SLICES {
            assert_eq!(s.get(index).await, Source::Memory);
        }
        assert_eq!(origin.requests(), SLICES);
    }
}

/// Slice `n` (4 KiB) of a test object, as the writer gets it.
fn small_slice(n: u64) -> (SliceKey, CachedSlice) {
    let object = ObjectId::new("o", "v");
    let meta = Arc::new(ObjectMeta::new(&object, 1 << 30, None));
    let bytes = Bytes::from(vec![n as u8; 4096]);
    (SliceKey { object, index: n }, CachedSlice { bytes, meta })
}

/// Offers slices 0..n to the tier's writer; returns their bytes, to tell which are held.
fn store_slices(tier: &DiskTier, n: u64) -> Vec<Bytes> {
    let obj = ObjectRef::new("o", "v");
    (0..n)
        .map(|n| {
            let (key, slice) = small_slice(n);
            tier.store(key, &slice, &obj, 1);
            slice.bytes
        })
        .collect()
}

fn small_tier(faults: &Faults, metrics: &Arc<Metrics>, dir: &Path, pause: Duration) -> DiskTier {
    let cfg = DiskCache {
        path: dir.to_path_buf(),
        max_bytes: 1 << 30,
        policy: cdn_edge::config::DiskPolicy::Video,
    };
    let options = Options {
        storage: faults.storage(),
        write_pause: pause,
        ..Options::default()
    };
    let purges = Arc::new(Purges::in_memory());
    DiskTier::open_with(&cfg, 4096, metrics.clone(), purges, options).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_for_long_holds_no_slice_and_is_tried_once_a_pause() {
    let dir = tempfile::tempdir().unwrap();
    let (faults, metrics) = (Faults::default(), Arc::new(Metrics::new()));
    faults.fail_writes(Some(ENOSPC));
    // Full at open already: the edge starts, and writes pause.
    let tier = small_tier(&faults, &metrics, dir.path(), Duration::from_secs(10));
    let kept = store_slices(&tier, 2000);
    let m = &metrics;
    let done = || m.disk_writes_dropped.get() + m.disk_write_errors_no_space.get() == 2000;
    until("every slice dropped or failed", done).await;
    assert_eq!(metrics.disk_write_errors_no_space.get(), 1);
    assert_eq!(
        faults.writes(),
        2,
        "the check at open, then one write a pause"
    );
    assert!(
        kept.iter().all(|b| b.is_unique()),
        "no slice is held by a queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_after_the_pause_once_the_disk_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let (faults, metrics) = (Faults::default(), Arc::new(Metrics::new()));
    let tier = small_tier(&faults, &metrics, dir.path(), Duration::from_millis(100));
    let obj = ObjectRef::new("o", "v");
    faults.fail_writes(Some(ENOSPC));
    let (key, slice) = small_slice(1);
    tier.store(key, &slice, &obj, 1);
    until("ENOSPC", || metrics.disk_write_errors_no_space.get() == 1).await;
    faults.fail_writes(None);
    // Offered again until the pause is over (bounded: 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.disk_writes.get() == 0 {
        assert!(Instant::now() < deadline, "writes never resumed");
        let before = metrics.disk_writes_dropped.get();
        tier.store(key, &slice, &obj, 1);
        let handled =
            || metrics.disk_writes_dropped.get() > before || metrics.disk_writes.get() > 0;
        until("the write handled", handled).await;
    }
    assert_eq!(tier.read(&key).await.unwrap().0.bytes, slice.bytes);
    assert_eq!(metrics.disk_write_errors_no_space.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_hangs_on_writes_holds_at_most_the_write_queue() {
    use cdn_edge::cache::disk::WRITE_QUEUE;
    let dir = tempfile::tempdir().unwrap();
    let (faults, metrics) = (Faults::default(), Arc::new(Metrics::new()));
    let tier = small_tier(&faults, &metrics, dir.path(), Duration::from_secs(10));
    faults.hang_writes();
    let kept = store_slices(&tier, 500);
    // The one being written, and the queue.
    let held = kept.iter().filter(|b| !b.is_unique()).count();
    assert!(held <= WRITE_QUEUE + 1, "{held} slices held");
    assert_eq!(metrics.disk_writes_dropped.get(), 500 - held as u64);
    faults.release();
    until("the queue written", || {
        metrics.disk_writes.get() == held as u64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_the_edge_cannot_write_fails_the_open_unless_it_is_full() {
    for (errno, opens) in [(EROFS, false), (13, false), (EIO, false), (ENOSPC, true)] {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::default();
        faults.fail_writes(Some(errno));
        let cfg = DiskCache {
            path: dir.path().to_path_buf(),
            max_bytes: 1 << 30,
            policy: cdn_edge::config::DiskPolicy::Video,
        };
        let options = Options {
            storage: faults.storage(),
            ..Options::default()
        };
        let purges = Arc::new(Purges::in_memory());
        let opened = DiskTier::open_with(&cfg, 4096, Arc::new(Metrics::new()), purges, options);
        assert_eq!(opened.is_ok(), opens, "errno {errno}");
        if let Err(e) = opened {
            let e = e.to_string();
            assert!(
                e.starts_with("cache.disk.path ") && e.contains("cannot write"),
                "{e}"
            );
        }
    }
}

// The real edge process.

const WRITES: &str = "cdn_edge_disk_writes_total";
const CORRUPT: &str = "cdn_edge_cache_corrupt_total";

/// An edge with a disk tier at `dir` and `memory_bytes` of memory, whose metadata is
/// never re-checked during a test (origin requests are counted exactly).
fn edge_opts(origin: &TestOrigin, dir: &Path, memory_bytes: u64) -> EdgeOptions {
    let mut o = EdgeOptions::new(vec![origin.url()]);
    o.disk = Some((dir.to_path_buf(), 1 << 30));
    o.memory_bytes = memory_bytes;
    o.meta_ttl_secs = Some(3600);
    o
}

/// Starts an edge and puts the whole object on disk (one origin request a slice).
async fn filled_edge(origin: &TestOrigin, dir: &Path, memory_bytes: u64) -> (Edge, Vec<u8>) {
    let bytes = object_bytes(43, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let edge = Edge::start(edge_opts(origin, dir, memory_bytes)).await;
    edge.wait_for_metric("cdn_edge_disk_index_ready", 1.0).await;
    assert_whole(&edge, &bytes).await;
    edge.wait_for_metric(WRITES, SLICES as f64).await;
    assert_eq!(origin.requests(), SLICES);
    (edge, bytes)
}

async fn assert_whole(edge: &Edge, bytes: &[u8]) {
    let r = edge.get(&format!("/?{}", signed("movie", "v1")), &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.complete && r.body == bytes,
        "the whole object, byte-exact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slice_files_replaced_while_running_are_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let (edge, bytes) = filled_edge(&origin, dir.path(), NO_MEMORY).await;
    // Slice 1: another slice's valid file renamed over it (same length, another key).
    let other = dir.path().join("other");
    std::fs::copy(slice_file(dir.path(), 3), &other).unwrap();
    std::fs::rename(&other, slice_file(dir.path(), 1)).unwrap();
    // Slice 2: other bytes of the same length, written in place.
    let file = slice_file(dir.path(), 2);
    let len = std::fs::metadata(&file).unwrap().len() as usize;
    std::fs::write(&file, object_bytes(7, len)).unwrap();
    // Slice 4: a (sparse) file longer than any slice file can be, 64 GiB.
    let file = std::fs::File::options()
        .write(true)
        .open(slice_file(dir.path(), 4));
    file.unwrap().set_len(1 << 36).unwrap();

    assert_whole(&edge, &bytes).await;
    assert_eq!(origin.requests(), SLICES + 3, "the three slices refetched");
    assert_eq!(edge.metric(CORRUPT).await, 3.0);
    edge.wait_for_metric(WRITES, SLICES as f64 + 3.0).await;
    assert_whole(&edge, &bytes).await;
    assert_eq!(origin.requests(), SLICES + 3, "then all from disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_slice_after_the_header_cuts_the_body_when_the_origin_fails() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let (edge, bytes) = filled_edge(&origin, dir.path(), NO_MEMORY).await;
    origin.set_mode(Mode::Status(503));
    flip_byte(&slice_file(dir.path(), 3), 4000);

    let r = edge.get(&format!("/?{}", signed("movie", "v1")), &[]).await;
    assert_eq!(r.status, 200, "the header went out with slice 0");
    assert_eq!(r.header("content-length"), Some(SIZE.to_string().as_str()));
    assert!(
        !r.complete && r.body.len() < 4 * SLICE as usize,
        "cut in slice 3"
    );
    assert!(r.body == bytes[..r.body.len()], "what came is right");
    assert_eq!(edge.metric(CORRUPT).await, 1.0);
    assert_eq!(edge.metric("cdn_edge_stream_aborts_total").await, 1.0);
    assert_eq!(origin.requests(), SLICES + 1, "one refetch, which failed");

    origin.set_mode(Mode::Normal);
    assert_whole(&edge, &bytes).await;
    assert_eq!(origin.requests(), SLICES + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_directory_emptied_while_running_fills_again() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let (edge, bytes) = filled_edge(&origin, dir.path(), NO_MEMORY).await;
    // As `rm -r <path>/slices <path>/tmp` by an operator.
    std::fs::remove_dir_all(dir.path().join("slices")).unwrap();
    std::fs::remove_dir_all(dir.path().join("tmp")).unwrap();

    assert_whole(&edge, &bytes).await;
    assert_eq!(origin.requests(), 2 * SLICES, "every slice refetched");
    edge.wait_for_metric(WRITES, 2.0 * SLICES as f64).await;
    assert_eq!(slice_files(dir.path()).len(), SLICES as usize);
    let io = "cdn_edge_disk_write_errors_total{reason=\"io\"}";
    assert_eq!(edge.metric(io).await, 0.0);
    assert_whole(&edge, &bytes).await;
    assert_eq!(origin.requests(), 2 * SLICES, "then all from disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_unwritable_while_running_costs_the_disk_writes_only() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(44, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let edge = Edge::start(edge_opts(&origin, dir.path(), 64 << 20)).await;
    // `tmp/` turned into a file: every write fails (ENOTDIR), even as root.
    std::fs::remove_dir_all(dir.path().join("tmp")).unwrap();
    std::fs::write(dir.path().join("tmp"), b"not a directory").unwrap();

    assert_whole(&edge, &bytes).await;
    let io = "cdn_edge_disk_write_errors_total{reason=\"io\"}";
    edge.wait_for_metric(io, 1.0).await;
    let dropped = "cdn_edge_disk_writes_dropped_total";
    edge.wait_for_metric(dropped, SLICES as f64 - 1.0).await;
    assert_eq!(edge.metric(io).await, 1.0, "one failure, then a pause");
    assert_eq!(edge.metric(WRITES).await, 0.0);
    assert!(slice_files(dir.path()).is_empty());
    edge.wait_for_log("disk cache write failed; writes paused")
        .await;
    // Memory serves what the disk could not keep.
    let r = edge.get(&format!("/?{}", signed("movie", "v1")), &[]).await;
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
    assert!(r.complete && r.body == bytes);
    assert_eq!(origin.requests(), SLICES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_cache_directory_stops_the_start_with_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(cache.join("slices")).unwrap();
    std::fs::create_dir_all(cache.join("tmp")).unwrap();
    let conf = dir.path().join("edge.toml");
    std::fs::write(
        &conf,
        format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[signing]\n\
             [[signing.keys]]\nid = \"k\"\nsecret = \"s\"\n[origin]\n\
             urls = [\"http://127.0.0.1:9\"]\n[cache.disk]\npath = {:?}\nmax_bytes = 1073741824\n",
            cache.display().to_string()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdn-edge"));
    cmd.arg("serve").arg("--conf").arg(&conf);
    // Root writes whatever the modes say: run the edge as nobody, owner of the cache.
    if rustix::process::geteuid().is_root() {
        let nobody = Some(65534);
        for path in [&cache, &cache.join("slices"), &cache.join("tmp")] {
            std::os::unix::fs::chown(path, nobody, nobody).unwrap();
        }
        let public = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(dir.path(), public).unwrap();
        cmd.uid(65534).gid(65534);
    }
    // The cache and slices/ can be written; tmp/ cannot.
    std::fs::set_permissions(cache.join("tmp"), std::fs::Permissions::from_mode(0o555)).unwrap();

    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the edge started on a cache directory it cannot write");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("cache.disk.path") && stderr.contains("cannot write"),
        "{stderr}"
    );
}
