//! The disk tier (SPEC §2.3, `[cache.disk]`): survives restarts, stays within its budget,
//! and never serves a corrupt byte.

mod support;

use std::path::Path;

use cdn_edge::cache::disk::format::MAX_HEADER;
use support::client::Response;
use support::edge::{signed, Edge, EdgeOptions};
use support::origin::TestOrigin;
use support::{flip_byte, object_bytes, slice_file, slice_files};

const SLICE: u64 = 64 * 1024;
const SIZE: usize = 1_000_003; // 16 slices
const WRITES: &str = "cdn_edge_disk_writes_total";
const CORRUPT: &str = "cdn_edge_cache_corrupt_total";
const DECLINED: &str = "cdn_edge_disk_writes_declined_total";

fn opts(origin: &TestOrigin, dir: &Path, max_bytes: u64) -> EdgeOptions {
    let mut o = EdgeOptions::new(vec![origin.url()]);
    o.disk = Some((dir.to_path_buf(), max_bytes));
    // These tests count origin requests exactly: no metadata re-check may fall due.
    o.meta_ttl_secs = Some(3600);
    o
}

/// Metadata learnt from the origin is re-checked after a second.
fn quick_recheck(origin: &TestOrigin, dir: &Path) -> EdgeOptions {
    let mut o = opts(origin, dir, 1 << 30);
    o.meta_ttl_secs = Some(1);
    o
}

/// Requests the whole object until it is `SIZE` bytes long (the edge re-checks what it
/// learnt after `cache.meta_ttl_secs`).
async fn until_whole(edge: &Edge) -> Response {
    edge.get_until(&format!("/?{}", signed("movie", "v1")), |r| {
        r.status == 200 && r.complete && r.body.len() == SIZE
    })
    .await
}

/// Memory too small to hold a single slice: every hit comes from disk.
fn disk_only(origin: &TestOrigin, dir: &Path) -> EdgeOptions {
    let mut o = opts(origin, dir, 1 << 30);
    o.memory_bytes = SLICE;
    o
}

async fn fill_all(edge: &Edge, bytes: &[u8]) {
    let r = edge.get(&format!("/?{}", signed("movie", "v1")), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.body == bytes);
    edge.wait_for_metric(WRITES, 16.0).await;
}

async fn check_ranges(edge: &Edge, bytes: &[u8]) {
    let q = signed("movie", "v1");
    for (a, b) in [
        (0usize, SIZE - 1),
        (65535, 65537),
        (300_000, 700_000),
        (SIZE - 5, SIZE - 1),
    ] {
        let r = edge.get(&format!("/range/{a}-{b}?{q}"), &[]).await;
        assert_eq!(r.status, 200, "/range/{a}-{b}");
        assert!(
            r.complete && r.body == bytes[a..=b],
            "/range/{a}-{b}: wrong bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_restart_with_the_origin_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(21, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let edge = Edge::start(opts(&origin, dir.path(), 1 << 30)).await;
    fill_all(&edge, &bytes).await;
    assert_eq!(slice_files(dir.path()).len(), 16);
    drop(edge); // SIGKILL
    origin.stop();
    let before = origin.requests();

    let edge = Edge::start(opts(&origin, dir.path(), 1 << 30)).await;
    let first = edge
        .get(&format!("/range/100-200?{}", signed("movie", "v1")), &[])
        .await;
    assert_eq!(first.status, 200);
    // Until the index is rebuilt the header may say fwd=miss; the bytes still come from disk.
    assert!(first
        .header("cache-status")
        .unwrap()
        .starts_with("cdn-edge; "));
    assert_eq!(
        first.header("content-type"),
        Some("video/mp4"),
        "metadata comes back from disk too"
    );
    check_ranges(&edge, &bytes).await;
    edge.wait_for_metric("cdn_edge_disk_index_ready", 1.0).await;
    let again = edge
        .get(&format!("/range/0-1000000?{}", signed("movie", "v1")), &[])
        .await;
    assert_eq!(again.header("cache-status"), Some("cdn-edge; hit"));
    assert_eq!(
        origin.requests(),
        before,
        "nothing may reach the (stopped) origin"
    );
    assert!(
        edge.metric("cdn_edge_cache_lookups_total{result=\"hit\",tier=\"disk\"}")
            .await
            >= 1.0
    );
    assert_eq!(edge.metric(CORRUPT).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_damaged_while_stopped_are_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(22, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let edge = Edge::start(opts(&origin, dir.path(), 1 << 30)).await;
    fill_all(&edge, &bytes).await;
    drop(edge);

    flip_byte(&slice_file(dir.path(), 1), 1000); // payload
    flip_byte(&slice_file(dir.path(), 2), 20); // header
    truncate(&slice_file(dir.path(), 3), 5000);
    std::fs::remove_file(slice_file(dir.path(), 4)).unwrap();
    std::fs::write(slice_file(dir.path(), 5), b"garbage").unwrap();

    let before = origin.requests();
    let edge = Edge::start(opts(&origin, dir.path(), 1 << 30)).await;
    check_ranges(&edge, &bytes).await;
    assert_eq!(
        origin.requests() - before,
        5,
        "exactly the five damaged or missing slices are refetched"
    );
    assert_eq!(edge.metric(CORRUPT).await, 4.0);
    // The refetched slices are written again.
    edge.wait_for_metric(WRITES, 5.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_damaged_while_running_are_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(23, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let edge = Edge::start(disk_only(&origin, dir.path())).await;
    fill_all(&edge, &bytes).await;
    edge.wait_for_metric("cdn_edge_disk_index_ready", 1.0).await;
    let q = signed("movie", "v1");

    // A clean disk hit first.
    let before = origin.requests();
    let r = edge.get(&format!("/range/70000-80000?{q}"), &[]).await;
    assert!(r.body == bytes[70000..=80000]);
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
    assert_eq!(origin.requests(), before);

    flip_byte(&slice_file(dir.path(), 6), 4000);
    truncate(&slice_file(dir.path(), 7), 100);
    std::fs::remove_file(slice_file(dir.path(), 8)).unwrap();
    for index in [6u64, 7, 8] {
        let a = (index * SLICE) as usize + 10;
        let r = edge
            .get(&format!("/range/{a}-{}?{q}", a + 20_000), &[])
            .await;
        assert_eq!(r.status, 200);
        assert!(
            r.body == bytes[a..=a + 20_000],
            "slice {index}: wrong bytes"
        );
    }
    assert_eq!(origin.requests() - before, 3);
    assert_eq!(edge.metric(CORRUPT).await, 2.0);
    check_ranges(&edge, &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_directory_within_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(24, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let max = 10 * SLICE + 10 * 100; // room for ten slice files
    let mut o = disk_only(&origin, dir.path());
    o.disk = Some((dir.path().to_path_buf(), max));
    o.disk_policy = Some("lru");
    let edge = Edge::start(o).await;
    fill_all(&edge, &bytes).await;
    let files = slice_files(dir.path());
    let total: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    assert!(total <= max, "{total} bytes on disk, budget {max}");
    assert!(files.len() <= 10, "{} files", files.len());
    assert!(edge.metric("cdn_edge_disk_evictions_total").await >= 6.0);
    let status: serde_json::Value =
        serde_json::from_slice(&support::client::get(edge.admin, "/status", &[]).await.body)
            .unwrap();
    assert!(status["cache"]["disk"]["bytes"].as_u64().unwrap() <= max);
    assert_eq!(
        status["cache"]["disk"]["entries"].as_u64().unwrap(),
        files.len() as u64
    );
    // LRU: the ten most recently written slices (6..=15) stay, and are served from disk.
    let q = signed("movie", "v1");
    let before = origin.requests();
    let kept = edge
        .get(&format!("/range/{}-{}?{q}", 6 * SLICE, SIZE - 1), &[])
        .await;
    assert!(kept.body == bytes[6 * SLICE as usize..]);
    assert_eq!(origin.requests(), before, "kept slices come from disk");
    // Evicted ones come back from the origin, correctly.
    let evicted = edge
        .get(&format!("/range/0-{}?{q}", 2 * SLICE - 1), &[])
        .await;
    assert!(evicted.body == bytes[..2 * SLICE as usize]);
    assert_eq!(origin.requests(), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_slice_size_never_misreads_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(25, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let edge = Edge::start(disk_only(&origin, dir.path())).await;
    fill_all(&edge, &bytes).await;
    drop(edge);

    let mut o = disk_only(&origin, dir.path());
    o.slice_bytes = 2 * SLICE;
    o.memory_bytes = 2 * SLICE;
    let edge = Edge::start(o).await;
    let q = signed("movie", "v1");
    // Slice 1 at 128 KiB holds bytes 131072.., which slice 1 at 64 KiB does not.
    let r = edge.get(&format!("/range/131072-131081?{q}"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes[131072..=131081]);
    check_ranges(&edge, &bytes).await;
    edge.wait_for_metric("cdn_edge_disk_index_ready", 1.0).await;
    assert_eq!(
        slice_files(dir.path()).len(),
        8,
        "old files replaced by 8 new ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_writes_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    let leftover = dir.path().join("tmp/4242-7.part");
    std::fs::write(&leftover, vec![1u8; 30_000]).unwrap();
    let origin = TestOrigin::start().await;
    let edge = Edge::start(opts(&origin, dir.path(), 1 << 30)).await;
    assert!(
        !leftover.exists(),
        "a temp file from a killed write must be removed"
    );
    edge.wait_for_log("removed unfinished slice writes").await;
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_total_written_to_disk_is_replaced_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(26, SIZE);
    // Upload in progress: 100,003 bytes, a slice and a half, are there yet.
    origin.add_object("movie", "v1", bytes[..100_003].to_vec(), "video/mp4");
    let edge = Edge::start(quick_recheck(&origin, dir.path())).await;
    let r = edge.get(&format!("/?{}", signed("movie", "v1")), &[]).await;
    assert!(r.status == 200 && r.body == bytes[..100_003]);
    edge.wait_for_metric(WRITES, 2.0).await;
    drop(edge);

    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let edge = Edge::start(quick_recheck(&origin, dir.path())).await;
    let r = until_whole(&edge).await;
    assert!(r.body == bytes, "the whole object, byte-exact");
    check_ranges(&edge, &bytes).await;
    assert_eq!(edge.metric(CORRUPT).await, 0.0, "stale is not corrupt");
    assert!(edge.metric("cdn_edge_cache_stale_slices_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_that_was_uploading_is_served_whole_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    // Upload in progress: the origin answers 416 `bytes */0`.
    origin.add_object("movie", "v1", Vec::new(), "video/mp4");
    let edge = Edge::start(quick_recheck(&origin, dir.path())).await;
    let q = signed("movie", "v1");
    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert_eq!(
        (r.status, r.header("content-range")),
        (416, Some("bytes */0"))
    );

    let bytes = object_bytes(27, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let r = until_whole(&edge).await;
    assert!(r.body == bytes, "the whole object, byte-exact");
    edge.wait_for_metric(WRITES, 16.0).await;
    drop(edge);

    // After a restart, with the origin gone, the disk still has the real object.
    origin.stop();
    let edge = Edge::start(quick_recheck(&origin, dir.path())).await;
    let r = edge.get(&format!("/?{q}"), &[]).await;
    assert!(r.status == 200 && r.complete && r.body == bytes);
    check_ranges(&edge, &bytes).await;
}

/// `cache.disk.policy = "video"` (the default): when the directory is full, a slice
/// that scores below every file it would displace is not written. Slices of one title
/// read one at a time from the start: the later a slice, the lower its score, so the
/// first ten stay and the last six are declined, not written over them (LRU would keep
/// the last ten, which fewer players reach).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_video_disk_policy_keeps_a_titles_first_slices_when_full() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(26, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    // Room for ten slice files (headers included), not for an eleventh, even the short last.
    let max = 10 * SLICE + 10 * 200;
    let mut o = disk_only(&origin, dir.path());
    o.disk = Some((dir.path().to_path_buf(), max));
    let edge = Edge::start(o).await;
    let q = signed("movie", "v1");
    let slices = SIZE.div_ceil(SLICE as usize);
    for i in 0..slices {
        let (a, b) = (i * SLICE as usize, ((i + 1) * SLICE as usize).min(SIZE) - 1);
        let r = edge.get(&format!("/range/{a}-{b}?{q}"), &[]).await;
        assert!(r.body == bytes[a..=b], "slice {i}");
        // Each slice is decided before the next is read.
        edge.wait_for_metrics_sum(&[WRITES, DECLINED], (i + 1) as f64)
            .await;
    }
    assert_eq!(edge.metric(WRITES).await, 10.0);
    assert_eq!(edge.metric(DECLINED).await, 6.0);
    assert_eq!(edge.metric("cdn_edge_disk_evictions_total").await, 0.0);
    let files = slice_files(dir.path());
    assert_eq!(files.len(), 10);
    for i in 0..10 {
        slice_file(dir.path(), i); // kept, or it panics
    }
    // The kept slices come from disk; the declined ones from the origin, correctly.
    let before = origin.requests();
    let kept = edge
        .get(&format!("/range/0-{}?{q}", 10 * SLICE - 1), &[])
        .await;
    assert!(kept.body == bytes[..10 * SLICE as usize]);
    assert_eq!(origin.requests(), before, "kept slices come from disk");
    let rest = edge
        .get(&format!("/range/{}-{}?{q}", 10 * SLICE, SIZE - 1), &[])
        .await;
    assert!(rest.body == bytes[10 * SLICE as usize..]);
    assert_eq!(origin.requests(), before + 6);
}

/// A range whose slice the memory tier would not keep is read from disk by the 64 KiB
/// blocks it lies in, each checked, not as the whole 1 MiB slice; a block damaged on disk
/// is found by the first range that needs it, never served, and refetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_from_disk_reads_and_checks_only_the_blocks_it_lies_in() {
    const BIG: usize = 1 << 20;
    const BLOCK: usize = 64 << 10;
    const READ: &str = "cdn_edge_disk_read_bytes_total";
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(27, 3 * BIG + 5);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let mut o = opts(&origin, dir.path(), 1 << 30);
    // One slice of memory, which the `video` policy cannot give a slice and its overhead.
    (o.slice_bytes, o.memory_bytes) = (BIG as u64, BIG as u64);
    let edge = Edge::start(o).await;
    let q = signed("movie", "v1");
    for i in 0..4 {
        let (a, b) = (i * BIG, ((i + 1) * BIG).min(bytes.len()) - 1);
        let r = edge.get(&format!("/range/{a}-{b}?{q}"), &[]).await;
        assert!(r.body == bytes[a..=b], "slice {i}");
    }
    edge.wait_for_metric(WRITES, 4.0).await;
    edge.wait_for_metric("cdn_edge_disk_index_ready", 1.0).await;
    let before = origin.requests();

    // Bytes in blocks 2 and 3 of slice 1.
    let (a, b) = (BIG + 2 * BLOCK + 100, BIG + 3 * BLOCK + 50);
    let read = edge.metric(READ).await;
    let r = edge.get(&format!("/range/{a}-{b}?{q}"), &[]).await;
    assert!(r.complete && r.body == bytes[a..=b]);
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
    assert_eq!(
        edge.metric(READ).await - read,
        (MAX_HEADER + 2 * BLOCK) as f64,
        "the header's bytes and two blocks"
    );

    let file = slice_file(dir.path(), 1);
    let header_len = std::fs::metadata(&file).unwrap().len() as usize - BIG;
    flip_byte(&file, header_len + 5 * BLOCK + 7);
    let r = edge.get(&format!("/range/{a}-{b}?{q}"), &[]).await;
    assert!(r.body == bytes[a..=b], "blocks 2 and 3 are still sound");
    assert_eq!(edge.metric(CORRUPT).await, 0.0);
    assert_eq!(origin.requests(), before);

    let c = BIG + 5 * BLOCK;
    let r = edge.get(&format!("/range/{c}-{}?{q}", c + 1000), &[]).await;
    assert!(r.complete && r.body == bytes[c..=c + 1000]);
    assert_eq!(edge.metric(CORRUPT).await, 1.0);
    assert_eq!(origin.requests(), before + 1, "the slice is fetched again");
}

/// A range whose slice file is in the page cache is read on the request's own thread; one
/// whose blocks the kernel would have to read from the device goes to the blocking pool,
/// and is served the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_from_a_file_in_the_page_cache_is_read_without_the_blocking_pool() {
    const BIG: usize = 1 << 20;
    const ON_REQUEST: &str = "cdn_edge_disk_reads_total{thread=\"request\"}";
    const ON_POOL: &str = "cdn_edge_disk_reads_total{thread=\"pool\"}";
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(28, 2 * BIG + 5);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let mut o = opts(&origin, dir.path(), 1 << 30);
    (o.slice_bytes, o.memory_bytes) = (BIG as u64, BIG as u64);
    let edge = Edge::start(o).await;
    let q = signed("movie", "v1");
    for i in 0..3 {
        let (a, b) = (i * BIG, ((i + 1) * BIG).min(bytes.len()) - 1);
        assert!(edge.get(&format!("/range/{a}-{b}?{q}"), &[]).await.body == bytes[a..=b]);
    }
    edge.wait_for_metric(WRITES, 3.0).await;
    edge.wait_for_metric("cdn_edge_disk_index_ready", 1.0).await;
    let before = origin.requests();
    let (a, b) = (BIG + 200_000, BIG + 500_000);
    let path = format!("/range/{a}-{b}?{q}");
    let get = || edge.get(&path, &[]);
    let counts = || async { (edge.metric(ON_REQUEST).await, edge.metric(ON_POOL).await) };

    let (request, pool) = counts().await;
    let r = get().await;
    assert!(r.complete && r.body == bytes[a..=b]);
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
    let file = std::fs::File::open(slice_file(dir.path(), 1)).unwrap();
    if !reads_without_waiting(&file) {
        assert_eq!(counts().await, (request, pool + 1.0));
        return; // a kernel or file system without these calls: every read on the pool
    }
    assert_eq!(
        counts().await,
        (request + 1.0, pool),
        "read on the request's thread"
    );

    // Written back and dropped from the page cache: reading it would wait for the device.
    file.sync_all().unwrap();
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    if !matches!(read_now(&file, 0), Err(rustix::io::Errno::AGAIN)) {
        return; // no device behind the file (tmpfs): its pages stay
    }
    let r = get().await;
    assert!(r.complete && r.body == bytes[a..=b]);
    assert_eq!(
        counts().await,
        (request + 1.0, pool + 1.0),
        "read on the pool"
    );
    // That read brought the blocks back into the page cache.
    assert!(get().await.body == bytes[a..=b]);
    assert_eq!(counts().await, (request + 2.0, pool + 1.0));
    assert_eq!(origin.requests(), before);
}

/// One byte of `file` at `at` if it is in the page cache (`RWF_NOWAIT`).
fn read_now(file: &std::fs::File, at: u64) -> rustix::io::Result<usize> {
    let mut byte = [0u8; 1];
    rustix::io::preadv2(
        file,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        at,
        rustix::io::ReadWriteFlags::NOWAIT,
    )
}

/// Whether this kernel and file system open and read `file` without waiting, as the
/// edge's reads on a request's thread do (`file` was just read, so it is cached).
fn reads_without_waiting(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
    let opened = rustix::fs::openat2(
        rustix::fs::CWD,
        &path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOATIME,
        rustix::fs::Mode::empty(),
        rustix::fs::ResolveFlags::CACHED,
    );
    opened.is_ok() && read_now(file, 0).is_ok()
}

/// Transparent huge pages are off for the edge process: with them, each buffer of a
/// range read from disk could fault in (and clear) a whole 2 MiB page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let edge = Edge::start(opts(&origin, dir.path(), 1 << 30)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", edge.pid())).unwrap();
    assert!(
        status.lines().any(|l| l == "THP_enabled:\t0"),
        "THP still enabled:\n{status}"
    );
}
