//! Disk tier: slices persisted under `cache.disk.path`, surviving restarts.
//!
//! # Design constraints
//! 1. A slice file is written once, to `tmp/`, then renamed into place: its name never
//!    points at a partial file. Files are not fsynced: after a power loss a torn file
//!    fails its checksum and is refetched, which is cheaper than an fsync per slice.
//! 2. Every file carries its key, lengths and CRC-32s of header and payload
//!    ([`format`]). A file that fails any check is never served: it is deleted, counted
//!    in `cdn_edge_cache_corrupt_total`, and the slice is refetched from the origin.
//! 3. Requests never wait on a disk write: fills are queued to one writer thread
//!    ([`writer`]); a full queue drops the write (counted), the slice is still served.
//!    The queue holds at most [`WRITE_QUEUE`] slices, whatever the disk does.
//! 4. Requests never block on a disk read: reads run on the blocking pool, at most
//!    [`MAX_CONCURRENT_READS`] at a time, and a request waits for one (its turn
//!    included) at most [`READ_TIMEOUT`], then fetches the slice elsewhere (counted).
//! 5. The index (moka, weighed by file length) bounds the directory at
//!    `cache.disk.max_bytes`. With `cache.disk.policy = "lru"` moka's LRU chooses what
//!    goes and its eviction listener deletes evicted files. With `"video"` (the default)
//!    a [`VideoPolicy`] with the disk's budget, told of every client read, chooses: the
//!    writer asks it before writing (a slice scoring below what the tier holds is not
//!    written, counted) and deletes what a write displaces. A fill job's slices, and
//!    files found at start, are placed whatever they score; only others are displaced.
//! 6. At start the index is rebuilt from file headers in the background
//!    ([`rebuild`]); until it is done, a slice missing from the index is looked for at
//!    its path before going to the origin. Leftover `tmp/` files are removed first.
//! 7. A failed write (a full file system, a failing device) pauses writes; reads go on.
//!    A read that fails is a miss: the file is dropped (unless the process is only short
//!    of descriptors or memory), counted, and the slice fetched elsewhere.
//! 8. One process per directory: `<path>/lock` is held (flock) while the tier is open.
//! 9. Files record the slice size they were cut with; after a change of
//!    `cache.slice_bytes` old files fail their check and are replaced, never misread.
//! 10. Files record the object's metadata as it was when they were written: size, type,
//!     the origin's validator, and whether it was confirmed or when it is due for a
//!     re-check (`cache::meta`), so a restart neither forgets nor promotes it. A file
//!     whose metadata disagrees with the object's current metadata is dropped
//!     ([`DiskTier::discard`]), not served. Files of format version 2 (no validator)
//!     are read, with their metadata due for a re-check at once.
//! 11. Files record the object's o and v and the purge stamp of the fill that cut them
//!     (format version 4), so a purge of every version finds them after a restart, and
//!     a file older than a purge of its object is never served (`cache::purge`): it is
//!     deleted when read or met by the rebuild. The writer drops a slice whose object
//!     was purged since its fill started. Files of version 3 have neither: only a purge
//!     of their version matches them at the rebuild, any purge of their object when read.
//! 12. All slice file writes and reads go through one [`SliceStorage`], chosen at open:
//!     tests inject faults there. At open a file is made in `tmp/` and moved into
//!     `slices/`, as the writer does: a directory the edge cannot write is an error at
//!     start, not a disk tier that silently never fills.
//!
//! # On-disk layout
//! ```text
//! <path>/slices/<h0h1>/<h2h3>/<object id hex>-<index hex>   one file per slice
//! <path>/tmp/<pid>-<seq>.part                                 being written
//! <path>/lock                                                 held by the running edge
//! <path>/slices/.write-check                                  made and removed at open
//! <path>/purges.log                                           the purge log (`cache::purge`)
//! ```
//! `h0..h3` are the first hex digits of the object id; the file format is in [`format`].

mod cached;
pub mod format;
pub mod purge;
pub mod rebuild;
pub mod storage;
pub mod writer;

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;

use super::meta::Validator;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use tokio::sync::Semaphore;

use super::purge::Purges;
use super::video_policy::VideoPolicy;
use super::{CachedSlice, ObjectMeta, ObjectRef, SliceKey};
use crate::config::{DiskCache, DiskPolicy};
use crate::metrics::Metrics;
use format::{
    decode_file, decode_header, slice_path, FormatError, Header, MAX_HEADER, SLICES_DIR, TMP_DIR,
};
use storage::{is_no_space, is_shortage};
pub use storage::{FsStorage, SliceStorage};
use writer::{WriteJob, WRITE_PAUSE};

/// Disk reads in flight at once; more wait for a permit.
pub const MAX_CONCURRENT_READS: usize = 32;
/// Slices queued for writing at most (each holds a `Bytes` of the slice).
pub const WRITE_QUEUE: usize = 64;
/// Longest a request waits for a disk read, its turn included, before it fetches the
/// slice elsewhere: a disk that stops answering must not stop the edge.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The file [`DiskTier::open`] moves into `slices/` to check it can write there.
const WRITE_CHECK: &str = ".write-check";

/// Why the disk tier could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cache.disk.path {path}: {error}")]
pub struct DiskOpenError {
    path: PathBuf,
    error: io::Error,
}

impl DiskOpenError {
    /// Another process holds the directory (for instance the one being upgraded).
    pub fn is_in_use(&self) -> bool {
        self.error.kind() == io::ErrorKind::WouldBlock
    }
}

/// When the index rebuild runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuild {
    /// On its own thread, started by `open` (the normal case).
    Background,
    /// Only when [`DiskTier::rebuild_now`] is called (tests of the unindexed path).
    Manual,
}

/// How a tier does its I/O: [`Options::default`] in production; tests inject failing
/// storage, a manual rebuild and shorter waits ([`DiskTier::open_with`]).
pub struct Options {
    pub storage: Box<dyn SliceStorage>,
    pub rebuild: Rebuild,
    /// How long writes stop after a failed one ([`WRITE_PAUSE`]).
    pub write_pause: Duration,
    /// Longest wait for a read ([`READ_TIMEOUT`]).
    pub read_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            storage: Box::new(FsStorage),
            rebuild: Rebuild::Background,
            write_pause: WRITE_PAUSE,
            read_timeout: READ_TIMEOUT,
        }
    }
}

/// State shared by the tier, its writer and its rebuild thread.
pub struct Shared {
    root: PathBuf,
    slice_bytes: u64,
    index: moka::sync::Cache<SliceKey, u32>,
    /// What the tier keeps, with `cache.disk.policy = "video"`; moka's LRU without.
    policy: Option<Arc<VideoPolicy>>,
    rebuilt: AtomicBool,
    /// Set once the directory belongs to another process: no more writes or deletions.
    handed_over: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// What was purged: checked by the writer and the rebuild, noted names.
    purges: Arc<Purges>,
    /// Slice file writes and reads.
    storage: Box<dyn SliceStorage>,
    write_pause: Duration,
}

/// The disk tier. One per process.
pub struct DiskTier {
    shared: Arc<Shared>,
    /// Held for the tier's life (its threads may outlive it briefly, idle), or until
    /// the tier is handed over.
    lock: std::sync::Mutex<Option<std::fs::File>>,
    jobs: SyncSender<WriteJob>,
    reads: Arc<Semaphore>,
    read_timeout: Duration,
    max_bytes: u64,
}

/// Part of a slice read from disk ([`DiskTier::read_part`]).
pub struct SlicePart {
    /// The bytes read (a whole number of blocks, or all of the slice) and the metadata
    /// of the object the file records.
    pub slice: CachedSlice,
    /// Where in the slice `slice.bytes` starts.
    pub offset: u64,
    /// The purge stamp of the fill that cut the slice.
    pub written_at: u64,
}

/// Why a read found no slice.
enum Failure {
    Io(io::Error),
    Corrupt(FormatError),
}

/// What a part read found in a file it opened.
enum PartFrom {
    Part(SlicePart),
    /// The file has one checksum for its whole payload (format 4 and older): it is read
    /// whole.
    Whole,
    /// Not all the bytes needed were in the page cache (a read that may not wait).
    NotCached,
}

/// Reads exactly `len` bytes at `offset`; a file that ended sooner was cut while it was
/// read, or is shorter than its header said: corrupt. The buffer is not zeroed first:
/// zeroed, every read of a few hundred KB took fresh pages the kernel had to clear, and
/// clearing them cost more than the read.
fn read_at(file: &std::fs::File, offset: u64, len: usize) -> Result<Vec<u8>, Failure> {
    use std::io::{Read, Seek, SeekFrom};
    let mut reader = file;
    reader.seek(SeekFrom::Start(offset)).map_err(Failure::Io)?;
    let mut buf = Vec::with_capacity(len);
    reader
        .take(len as u64)
        .read_to_end(&mut buf)
        .map_err(Failure::Io)?;
    if buf.len() != len {
        return Err(Failure::Corrupt(FormatError::Length));
    }
    Ok(buf)
}

/// Point-in-time state of the disk tier, for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskStats {
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub bytes: u64,
    pub entries: u64,
    pub index_ready: bool,
}

impl DiskTier {
    /// Opens (creating if needed) the cache directory, removes leftover temporary files,
    /// and starts the writer and the background index rebuild.
    pub fn open(
        cfg: &DiskCache,
        slice_bytes: u64,
        metrics: Arc<Metrics>,
        purges: Arc<Purges>,
    ) -> Result<Self, DiskOpenError> {
        Self::open_with(cfg, slice_bytes, metrics, purges, Options::default())
    }

    /// [`DiskTier::open`] with other [`Options`] (tests inject failing storage and
    /// choose when the index is rebuilt).
    pub fn open_with(
        cfg: &DiskCache,
        slice_bytes: u64,
        metrics: Arc<Metrics>,
        purges: Arc<Purges>,
        options: Options,
    ) -> Result<Self, DiskOpenError> {
        let root = cfg.path.clone();
        let err = |error| DiskOpenError {
            path: root.clone(),
            error,
        };
        std::fs::create_dir_all(root.join(SLICES_DIR)).map_err(err)?;
        let lock = std::fs::File::create(root.join("lock")).map_err(err)?;
        if lock.try_lock().is_err() {
            return Err(err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "in use by another cdn-edge process (lock held)",
            )));
        }
        let tmp = root.join(TMP_DIR);
        std::fs::create_dir_all(&tmp).map_err(err)?;
        let removed = remove_leftovers(&tmp).map_err(err)?;
        if removed > 0 {
            tracing::info!(path = %tmp.display(), files = removed, "removed unfinished slice writes");
        }
        match check_writable(&root, &*options.storage) {
            Ok(()) => {}
            // A full disk is survived like one that fills up later: writes pause.
            Err(e) if is_no_space(&e) => {
                tracing::warn!(path = %root.display(), error = %e, "the disk cache's file system is full; slices are written once it has room");
            }
            Err(e) => {
                return Err(err(io::Error::new(
                    e.kind(),
                    format!("cannot write a file in tmp/ and move it into slices/: {e}"),
                )))
            }
        }

        let evict_root = root.clone();
        let evict_metrics = metrics.clone();
        let handed_over = Arc::new(AtomicBool::new(false));
        let evict_handed_over = handed_over.clone();
        let policy =
            (cfg.policy == DiskPolicy::Video).then(|| Arc::new(VideoPolicy::new(cfg.max_bytes)));
        let told = policy.clone();
        let index = new_index(cfg.max_bytes, move |key, cause| {
            if cause != RemovalCause::Replaced {
                if let Some(policy) = &told {
                    policy.forget(key);
                }
            }
            if cause.was_evicted() && !evict_handed_over.load(Ordering::Acquire) {
                remove_evicted(slice_path(&evict_root, key), &evict_handed_over);
                evict_metrics.disk_evictions.inc();
            }
        });
        let shared = Arc::new(Shared {
            root: root.clone(),
            slice_bytes,
            index,
            policy,
            rebuilt: AtomicBool::new(false),
            handed_over,
            metrics,
            purges,
            storage: options.storage,
            write_pause: options.write_pause,
        });
        shared.metrics.disk_index_ready.set(0);

        let (jobs, rx) = sync_channel(WRITE_QUEUE);
        let w = shared.clone();
        std::thread::Builder::new()
            .name("cdn-edge disk writer".into())
            .spawn(move || writer::run(w, rx))
            .map_err(err)?;
        if options.rebuild == Rebuild::Background {
            let r = shared.clone();
            std::thread::Builder::new()
                .name("cdn-edge disk index".into())
                .spawn(move || rebuild::run(r))
                .map_err(err)?;
        }

        Ok(Self {
            shared,
            lock: std::sync::Mutex::new(Some(lock)),
            jobs,
            reads: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
            read_timeout: options.read_timeout,
            max_bytes: cfg.max_bytes,
        })
    }

    /// Whether the index lists this slice (no I/O).
    pub fn contains(&self, key: &SliceKey) -> bool {
        self.shared.index.contains_key(key)
    }

    /// What the tier keeps with `cache.disk.policy = "video"`, to be told of client
    /// reads ([`VideoPolicy::read`]); none with `lru`.
    pub fn video_policy(&self) -> Option<&VideoPolicy> {
        self.shared.policy.as_deref()
    }

    /// Reads and checks a slice, with the purge stamp of the fill that cut it (0 for
    /// files older than format version 4); `None` is a miss (absent, unreadable, corrupt,
    /// or not read within the read timeout).
    pub async fn read(&self, key: &SliceKey) -> Option<(CachedSlice, u64)> {
        self.read_with(key, |shared, key| shared.read_blocking(key))
            .await
    }

    /// Reads and checks the part of a slice that holds its bytes `within` (end
    /// exclusive): only the blocks they lie in, or the whole slice from files older than
    /// format version 5. A miss as for [`DiskTier::read`].
    pub async fn read_part(&self, key: &SliceKey, within: Range<u64>) -> Option<SlicePart> {
        match self.read_part_cached(key, within.clone()) {
            PartFrom::Part(part) => {
                self.shared.metrics.disk.hits.inc();
                Some(part)
            }
            PartFrom::Whole => self
                .read_with(key, |shared, key| shared.read_blocking(key))
                .await
                .map(|(slice, written_at)| SlicePart {
                    slice,
                    offset: 0,
                    written_at,
                }),
            PartFrom::NotCached => {
                self.read_with(key, move |shared, key| {
                    shared.read_part_blocking(key, within)
                })
                .await
            }
        }
    }

    /// [`DiskTier::read_part`] on this thread, for a slice in the rebuilt index whose file
    /// can be opened and read without waiting for the device (`cached`), when the part
    /// is short; `NotCached` sends the read to the pool, which also decides about a file
    /// found corrupt here.
    fn read_part_cached(&self, key: &SliceKey, within: Range<u64>) -> PartFrom {
        let shared = &self.shared;
        // Before the rebuild, `found` may index the file, and indexing may delete files.
        if within.end.saturating_sub(within.start) > cached::MAX_READ
            || !shared.rebuilt.load(Ordering::Acquire)
            || !shared.index.contains_key(key)
        {
            return PartFrom::NotCached;
        }
        let Some(file) = shared.storage.open_cached(&slice_path(&shared.root, key)) else {
            return PartFrom::NotCached;
        };
        let mut read_bytes = 0;
        let part = cached::on_request_thread(|| {
            shared.part_from(&file, key, within, &mut read_bytes, |file, at, len| {
                Ok(cached::read_at(file, at, len))
            })
        });
        match part {
            Ok(PartFrom::Part(part)) => {
                shared.metrics.disk_reads_request.inc();
                shared.metrics.disk_read_bytes.inc_by(read_bytes);
                PartFrom::Part(part)
            }
            Ok(PartFrom::Whole) => PartFrom::Whole,
            // Not counted: the pool reads the same bytes again.
            Ok(PartFrom::NotCached) | Err(_) => PartFrom::NotCached,
        }
    }

    /// Runs `read` on the blocking pool, within the tier's limit of reads at once and
    /// its read timeout, and counts a hit or a miss.
    async fn read_with<T: Send + 'static>(
        &self,
        key: &SliceKey,
        read: impl FnOnce(&Shared, &SliceKey) -> Option<T> + Send + 'static,
    ) -> Option<T> {
        let listed = self.shared.index.contains_key(key);
        if !listed && self.shared.rebuilt.load(Ordering::Acquire) {
            self.shared.metrics.disk.misses.inc();
            return None;
        }
        let reads = self.reads.clone();
        let shared = self.shared.clone();
        let owned = *key;
        // On a timeout the read goes on, holding its permit, and its result is dropped.
        let read = tokio::time::timeout(self.read_timeout, async move {
            let permit = reads.acquire_owned().await.ok()?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                shared.metrics.disk_reads_pool.inc();
                read(&shared, &owned)
            })
            .await
            .ok()
            .flatten()
        })
        .await;
        let found = read.unwrap_or_else(|_| {
            self.shared.metrics.disk_read_errors_timeout.inc();
            tracing::warn!(path = %slice_path(&self.shared.root, key).display(),
                timeout_ms = self.read_timeout.as_millis() as u64,
                "disk cache read timed out; the slice is fetched elsewhere");
            None
        });
        match found {
            Some(_) => self.shared.metrics.disk.hits.inc(),
            None => self.shared.metrics.disk.misses.inc(),
        }
        found
    }

    /// Gives the directory up to the process taking over in an upgrade: stops writing
    /// and deleting files, and releases the lock. Reads go on; every file is checked.
    pub fn hand_over(&self) {
        self.shared.handed_over.store(true, Ordering::Release);
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Queues a slice of `obj` fetched from the origin for writing; never waits.
    /// `started`: the purge stamp of the fill that cut it.
    pub fn store(&self, key: SliceKey, slice: &CachedSlice, obj: &ObjectRef<'_>, started: u64) {
        if self.shared.handed_over.load(Ordering::Acquire) {
            return;
        }
        let job = WriteJob {
            key,
            o: obj.o.into(),
            v: obj.v.into(),
            written_at: started,
            payload: slice.bytes.clone(),
            object_size: slice.meta.size,
            content_type: if slice.meta.content_type_known() {
                Bytes::copy_from_slice(slice.meta.content_type.as_bytes())
            } else {
                Bytes::new()
            },
            validator: slice
                .meta
                .validator()
                .map_or_else(Bytes::new, |v| Bytes::copy_from_slice(v.as_bytes())),
            recheck_at: slice.meta.recheck_at(),
            placed: obj.via.fill,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.metrics.disk_writes_dropped.inc();
            }
        }
    }

    /// Rebuilds the index now, on this thread (blocking); see [`Rebuild::Manual`].
    pub fn rebuild_now(&self) {
        rebuild::run(self.shared.clone());
    }

    /// Drops a slice cut under metadata its object no longer has (the caller counts
    /// it): out of the index at once, the file deleted off the async runtime.
    pub fn discard(&self, key: SliceKey) {
        if self.shared.handed_over.load(Ordering::Acquire) {
            return;
        }
        self.shared.index.invalidate(&key);
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(slice_path(&shared.root, &key));
        });
    }

    /// Applies pending index maintenance (evictions) so [`DiskTier::stats`] is exact.
    /// Blocking: may delete files.
    pub fn sync_blocking(&self) {
        self.shared.index.run_pending_tasks();
    }

    pub fn stats(&self) -> DiskStats {
        DiskStats {
            path: self.shared.root.clone(),
            capacity_bytes: self.max_bytes,
            bytes: self.shared.index.weighted_size(),
            entries: self.shared.index.entry_count(),
            index_ready: self.shared.rebuilt.load(Ordering::Acquire),
        }
    }

    /// A handle for blocking maintenance off the async runtime.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }
}

impl Shared {
    fn read_blocking(&self, key: &SliceKey) -> Option<(CachedSlice, u64)> {
        let path = slice_path(&self.root, key);
        // One byte more than the longest slice file: a longer file is not read whole.
        let limit = MAX_HEADER as u64 + self.slice_bytes + 1;
        let read = self.storage.read(&path, limit).map_err(Failure::Io);
        let checked = read.and_then(|data| {
            self.metrics.disk_read_bytes.inc_by(data.len() as u64);
            decode_file(Bytes::from(data), key, self.slice_bytes).map_err(Failure::Corrupt)
        });
        match checked {
            Ok((header, payload)) => {
                let slice = self.found(key, &header, payload);
                Some((slice, header.written_at))
            }
            Err(failure) => self.failed(key, &path, failure),
        }
    }

    /// [`DiskTier::read_part`] on this thread.
    fn read_part_blocking(&self, key: &SliceKey, within: Range<u64>) -> Option<SlicePart> {
        let path = slice_path(&self.root, key);
        let mut read_bytes = 0;
        let part = self
            .storage
            .open(&path)
            .map_err(Failure::Io)
            .and_then(|file| {
                self.part_from(&file, key, within, &mut read_bytes, |file, at, len| {
                    read_at(file, at, len).map(Some)
                })
            });
        self.metrics.disk_read_bytes.inc_by(read_bytes);
        match part {
            Ok(PartFrom::Part(part)) => Some(part),
            Ok(PartFrom::Whole | PartFrom::NotCached) => {
                self.read_blocking(key)
                    .map(|(slice, written_at)| SlicePart {
                        slice,
                        offset: 0,
                        written_at,
                    })
            }
            Err(failure) => self.failed(key, &path, failure),
        }
    }

    /// Reads and checks the header of the open slice file `file`, then the blocks
    /// `within` lies in, each with `read` (exactly `len` bytes at an offset; `None`: not
    /// in the page cache), adding the bytes it read to `read_bytes`.
    fn part_from(
        &self,
        file: &std::fs::File,
        key: &SliceKey,
        within: Range<u64>,
        read_bytes: &mut u64,
        read: impl Fn(&std::fs::File, u64, usize) -> Result<Option<Vec<u8>>, Failure>,
    ) -> Result<PartFrom, Failure> {
        let len = file.metadata().map_err(Failure::Io)?.len();
        let Some(head) = read(file, 0, len.min(MAX_HEADER as u64) as usize)? else {
            return Ok(PartFrom::NotCached);
        };
        *read_bytes += head.len() as u64;
        let header = decode_header(&head).map_err(Failure::Corrupt)?;
        if header.key != *key {
            return Err(Failure::Corrupt(FormatError::WrongKey));
        }
        header
            .check_slicing(self.slice_bytes)
            .map_err(Failure::Corrupt)?;
        if len != header.file_len() {
            return Err(Failure::Corrupt(FormatError::Length));
        }
        let Some(blocks) = header.covering_blocks(within) else {
            return Ok(PartFrom::Whole);
        };
        let at = header.header_len() as u64 + blocks.start;
        let Some(part) = read(file, at, (blocks.end - blocks.start) as usize)? else {
            return Ok(PartFrom::NotCached);
        };
        *read_bytes += part.len() as u64;
        header
            .check_blocks(blocks.start, &part)
            .map_err(Failure::Corrupt)?;
        let slice = self.found(key, &header, Bytes::from(part));
        Ok(PartFrom::Part(SlicePart {
            slice,
            offset: blocks.start,
            written_at: header.written_at,
        }))
    }

    /// A slice read and checked: its bytes (some or all of its payload) with the
    /// metadata its file records. Before the rebuild is done the file is indexed; after,
    /// the read touches its index entry.
    fn found(&self, key: &SliceKey, header: &Header, bytes: Bytes) -> CachedSlice {
        if self.index.get(key).is_none() && !self.rebuilt.load(Ordering::Acquire) {
            self.index_file(*key, header.file_len() as u32, true);
        }
        let content_type = HeaderValue::from_bytes(&header.content_type)
            .ok()
            .filter(|v| !v.is_empty());
        CachedSlice {
            bytes,
            meta: Arc::new(ObjectMeta::restored(
                &key.object,
                header.object_size,
                content_type,
                Validator::from_stored(&header.validator),
                header.recheck_at,
            )),
        }
    }

    /// A read that failed: a miss. A file gone is taken out of the index; a corrupt or
    /// unreadable one is deleted, unless the process is only short of a resource.
    fn failed<T>(&self, key: &SliceKey, path: &Path, failure: Failure) -> Option<T> {
        match failure {
            Failure::Io(e) if e.kind() == io::ErrorKind::NotFound => {
                self.index.invalidate(key);
            }
            Failure::Io(e) => {
                self.metrics.disk_read_errors_io.inc();
                if is_shortage(&e) {
                    tracing::warn!(path = %path.display(), error = %e, "disk cache read failed; file kept");
                } else {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable slice file removed; refetching");
                    self.drop_file(key, path);
                }
            }
            Failure::Corrupt(e) => {
                self.metrics.cache_corrupt.inc();
                tracing::warn!(path = %path.display(), error = %e, "corrupt slice file removed; refetching");
                self.drop_file(key, path);
            }
        }
        None
    }

    /// Whether the `video` policy would keep a slice file of `len` bytes not yet held
    /// (always with `lru`).
    fn would_keep(&self, key: &SliceKey, len: u32) -> bool {
        self.policy
            .as_ref()
            .is_none_or(|p| p.would_keep(key, u64::from(len)))
    }

    /// Indexes the slice file of `len` bytes now at `key`'s path. With the `video`
    /// policy, the files it displaces are deleted here (callers are never on the async
    /// runtime); false when the policy turned this one away (the caller deletes it).
    /// `placed`: it stays whatever it scores ([`VideoPolicy::placed`]).
    fn index_file(&self, key: SliceKey, len: u32, placed: bool) -> bool {
        if let Some(policy) = &self.policy {
            let doomed = if placed {
                policy.placed(key, u64::from(len))
            } else {
                policy.filled(key, u64::from(len))
            };
            let mut kept = true;
            for d in doomed {
                if d == key {
                    kept = false;
                } else {
                    self.evict(&d);
                }
            }
            if !kept {
                return false;
            }
        }
        // The policy first: a purge between the two finds the entry and tells it.
        self.index.insert(key, len);
        true
    }

    /// A file the `video` policy displaced: dropped, and counted as an eviction.
    fn evict(&self, key: &SliceKey) {
        self.drop_file(key, &slice_path(&self.root, key));
        if !self.handed_over.load(Ordering::Acquire) {
            self.metrics.disk_evictions.inc();
        }
    }

    /// Takes a slice out of the index and deletes its file (unless the directory has
    /// been handed over).
    fn drop_file(&self, key: &SliceKey, path: &Path) {
        self.index.invalidate(key);
        if !self.handed_over.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Blocking index maintenance; see [`DiskTier::sync_blocking`].
    pub fn sync_blocking(&self) {
        self.index.run_pending_tasks();
    }
}

/// The index of a disk tier: slice → file length, LRU, bounded at `max_bytes` of files.
/// `left` is called for each slice that leaves it, with why (evicted to make room,
/// invalidated, replaced). Public so that the scale benches measure the structure
/// [`DiskTier::open`] builds.
pub fn new_index(
    max_bytes: u64,
    left: impl Fn(&SliceKey, RemovalCause) + Send + Sync + 'static,
) -> moka::sync::Cache<SliceKey, u32> {
    moka::sync::Cache::builder()
        .name("disk-index")
        .eviction_policy(EvictionPolicy::lru())
        .max_capacity(max_bytes)
        .weigher(|_k: &SliceKey, len: &u32| *len)
        .eviction_listener(move |key: Arc<SliceKey>, _len, cause| left(&key, cause))
        .build()
}

/// Deletes the file at `path`, or, during a read on a request's thread, has the blocking
/// pool delete it: the index evicts inside whichever call runs its upkeep, and such a
/// read's index lookup can be that call. A slice written again before a deferred delete
/// runs loses its new file: a later read finds it gone, drops it from the index and
/// counts a miss. `handed_over` is asked again when the delete runs.
fn remove_evicted(path: PathBuf, handed_over: &Arc<AtomicBool>) {
    if !cached::in_request_read() {
        let _ = std::fs::remove_file(path);
        return;
    }
    let handed_over = handed_over.clone();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn_blocking(move || {
            if !handed_over.load(Ordering::Acquire) {
                let _ = std::fs::remove_file(path);
            }
        });
    }
}

/// Makes a file in `tmp/` and moves it into `slices/`, as the writer does, then removes
/// it: whether the tier can write its directory.
fn check_writable(root: &Path, storage: &dyn SliceStorage) -> io::Result<()> {
    let made = root
        .join(TMP_DIR)
        .join(format!("{}-check.part", std::process::id()));
    let placed = root.join(SLICES_DIR).join(WRITE_CHECK);
    storage.write_new(&made, &[], &[])?;
    if let Err(e) = std::fs::rename(&made, &placed) {
        let _ = std::fs::remove_file(&made);
        return Err(e);
    }
    std::fs::remove_file(&placed)
}

fn remove_leftovers(tmp: &Path) -> io::Result<u64> {
    let mut removed = 0;
    for entry in std::fs::read_dir(tmp)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "part") && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::cache::ObjectId;

    fn purges() -> Arc<Purges> {
        Arc::new(Purges::in_memory())
    }

    /// The object every test slice belongs to.
    const OBJ: ObjectRef<'static> = ObjectRef {
        o: "o",
        v: "v",
        id: ObjectId::from_bytes([0; 32]), // unused by the writer
        via: crate::cache::Via::CLIENT,
    };

    /// Real writes until `left` runs out, then ENOSPC.
    struct FillsUp {
        left: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
    }

    impl SliceStorage for FillsUp {
        fn write_new(&self, path: &Path, header: &[u8], payload: &[u8]) -> io::Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.left.fetch_sub(1, Ordering::SeqCst) == 0 {
                self.left.store(0, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(28));
            }
            FsStorage.write_new(path, header, payload)
        }

        fn read(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
            FsStorage.read(path, limit)
        }

        fn open(&self, path: &Path) -> io::Result<std::fs::File> {
            FsStorage.open(path)
        }
    }

    fn slice(n: u8) -> (SliceKey, CachedSlice) {
        title_slice("o", u64::from(n))
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_pauses_writes_and_reads_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let calls = Arc::new(AtomicUsize::new(0));
        // The write check at open, then one slice.
        let storage = FillsUp {
            left: Arc::new(AtomicUsize::new(2)),
            calls: calls.clone(),
        };
        let cfg = DiskCache {
            path: dir.path().to_path_buf(),
            max_bytes: 1 << 30,
            policy: DiskPolicy::Video,
        };
        let options = Options {
            storage: Box::new(storage),
            ..Options::default()
        };
        let tier = DiskTier::open_with(&cfg, 4096, metrics.clone(), purges(), options).unwrap();
        until("index rebuild", || tier.stats().index_ready).await;

        let (a, sa) = slice(1);
        tier.store(a, &sa, &OBJ, 1);
        until("first write", || metrics.disk_writes.get() == 1).await;
        let (b, sb) = slice(2);
        tier.store(b, &sb, &OBJ, 1);
        until("ENOSPC", || metrics.disk_write_errors_no_space.get() == 1).await;
        let (c, sc) = slice(3);
        tier.store(c, &sc, &OBJ, 1);
        until("dropped while paused", || {
            metrics.disk_writes_dropped.get() == 1
        })
        .await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "no write is attempted while paused"
        );

        let got = tier
            .read(&a)
            .await
            .expect("reads go on while writes are paused")
            .0;
        assert_eq!(got.bytes, sa.bytes);
        assert_eq!(got.meta.size, 1 << 20);
        assert!(tier.read(&b).await.is_none());
        assert!(tier.read(&c).await.is_none());
        let leftovers = std::fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count();
        assert_eq!(leftovers, 0, "a failed write leaves no temp file");
    }

    /// Slice `index` of title `o`: 4 KiB of the byte `index`.
    fn title_slice(o: &str, index: u64) -> (SliceKey, CachedSlice) {
        let object = ObjectId::new(o, "v");
        let meta = Arc::new(ObjectMeta::new(&object, 1 << 20, None));
        let key = SliceKey { object, index };
        let bytes = Bytes::from(vec![index as u8; 4096]);
        (key, CachedSlice { bytes, meta })
    }

    /// A slice of 256 KiB in four blocks: a part is read from the blocks it lies in, and
    /// checked; a file of format version 4 (one checksum) is read whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_part_is_read_from_its_blocks_and_an_older_file_whole() {
        const SLICE: u64 = 256 << 10;
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let cfg = DiskCache {
            path: dir.path().to_path_buf(),
            max_bytes: 1 << 30,
            policy: DiskPolicy::Lru,
        };
        let tier = DiskTier::open(&cfg, SLICE, metrics.clone(), purges()).unwrap();
        until("index rebuild", || tier.stats().index_ready).await;
        let object = ObjectId::new("o", "v");
        let key = SliceKey { object, index: 1 };
        let payload: Vec<u8> = (0..SLICE as u32).map(|i| (i % 251) as u8).collect();
        let meta = Arc::new(ObjectMeta::new(&object, 4 * SLICE, None));
        let slice = CachedSlice {
            bytes: Bytes::from(payload.clone()),
            meta,
        };
        tier.store(key, &slice, &OBJ, 1);
        until("the write", || metrics.disk_writes.get() == 1).await;

        let read = || metrics.disk_read_bytes.get();
        let part = tier.read_part(&key, 70_000..140_000).await.unwrap();
        assert_eq!(part.offset, 64 << 10);
        assert!(part.slice.bytes[..] == payload[64 << 10..192 << 10]);
        assert_eq!((part.written_at, part.slice.meta.size), (1, 4 * SLICE));
        assert_eq!(
            read(),
            (MAX_HEADER + (128 << 10)) as u64,
            "the header and two blocks"
        );

        // A flipped byte in the last block: a part before it is served, one in it is not.
        let path = slice_path(dir.path(), &key);
        let mut file = std::fs::read(&path).unwrap();
        let at = file.len() - 10;
        file[at] ^= 1;
        std::fs::write(&path, &file).unwrap();
        let part = tier.read_part(&key, 0..1).await.unwrap();
        assert!(part.slice.bytes[..] == payload[..64 << 10]);
        assert_eq!(metrics.cache_corrupt.get(), 0);
        assert!(tier.read_part(&key, SLICE - 1..SLICE).await.is_none());
        assert_eq!(metrics.cache_corrupt.get(), 1);
        assert!(!path.exists(), "a corrupt file is deleted");

        // Version 4: the whole slice, read and checked whole.
        file[at] ^= 1;
        std::fs::write(&path, format::as_version_4(&file)).unwrap();
        tier.shared.index.insert(key, file.len() as u32);
        let before = read();
        let part = tier.read_part(&key, 70_000..140_000).await.unwrap();
        assert_eq!(part.offset, 0);
        assert!(part.slice.bytes[..] == payload[..]);
        assert!(read() - before > SLICE, "read whole");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_video_policy_writes_what_outscores_the_held_files_and_a_fills_slices() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let cfg = DiskCache {
            path: dir.path().to_path_buf(),
            max_bytes: 4 * (4096 + 200), // four slice files
            policy: DiskPolicy::Video,
        };
        let tier = DiskTier::open(&cfg, 4096, metrics.clone(), purges()).unwrap();
        until("index rebuild", || tier.stats().index_ready).await;
        let decided = || metrics.disk_writes.get() + metrics.disk_writes_declined.get();
        let store = |(key, slice): (SliceKey, CachedSlice), obj: &ObjectRef<'_>| {
            tier.store(key, &slice, obj, 1);
        };
        let hit = ObjectId::new("hit", "v");
        let policy = tier.video_policy().unwrap();
        for _ in 0..10 {
            policy.read(hit, 0, 3, false, 4096);
        }
        for i in 0..4 {
            store(title_slice("hit", i), &OBJ);
        }
        until("four writes", || metrics.disk_writes.get() == 4).await;

        // A title read once scores below all of them: not written.
        policy.read(ObjectId::new("once", "v"), 0, 0, false, 4096);
        store(title_slice("once", 0), &OBJ);
        until("declined", || decided() == 5).await;
        assert_eq!(metrics.disk_writes_declined.get(), 1);
        assert!(!tier.contains(&title_slice("once", 0).0));

        // A fill job's slice is written whatever it scores, in place of a held one.
        let fill = ObjectRef {
            via: crate::cache::Via::FILL,
            ..OBJ
        };
        store(title_slice("placed", 0), &fill);
        until("the fill's write", || metrics.disk_writes.get() == 5).await;
        tier.sync_blocking();
        assert!(tier.contains(&title_slice("placed", 0).0));
        assert_eq!(metrics.disk_evictions.get(), 1);
        assert_eq!(tier.stats().entries, 4);
        assert_eq!(slice_files(dir.path()), 4);

        // A file dropped from the index is forgotten by the policy: its room is free.
        let gone = (0..4)
            .map(|i| title_slice("hit", i).0)
            .find(|k| tier.contains(k))
            .unwrap();
        tier.discard(gone);
        store(title_slice("once", 1), &OBJ);
        until("a write into the freed room", || {
            metrics.disk_writes.get() == 6
        })
        .await;
        assert_eq!(metrics.disk_writes_declined.get(), 1);
        assert_eq!(metrics.disk_evictions.get(), 1);
    }

    /// The slice files under `dir`.
    fn slice_files(dir: &Path) -> usize {
        let mut n = 0;
        let mut stack = vec![dir.join(SLICES_DIR)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    n += 1;
                }
            }
        }
        n
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_directory_that_cannot_be_created_is_a_clear_error() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let cfg = DiskCache {
            path: file.path().join("cache"),
            max_bytes: 1 << 20,
            policy: DiskPolicy::Video,
        };
        let err = DiskTier::open(&cfg, 4096, Arc::new(Metrics::new()), purges())
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("cache.disk.path "), "{err}");
    }

    /// Writes slice 1 with 4 KiB slicing, then reopens the directory with
    /// `reopen_slice_bytes` and the rebuild left to the test.
    async fn stored_then_reopened(
        dir: &Path,
        reopen_slice_bytes: u64,
    ) -> (SliceKey, CachedSlice, DiskTier, Arc<Metrics>) {
        let cfg = DiskCache {
            path: dir.to_path_buf(),
            max_bytes: 1 << 30,
            policy: DiskPolicy::Video,
        };
        let (a, sa) = slice(1);
        {
            let metrics = Arc::new(Metrics::new());
            let tier = DiskTier::open(&cfg, 4096, metrics.clone(), purges()).unwrap();
            tier.store(a, &sa, &OBJ, 1);
            until("write", || metrics.disk_writes.get() == 1).await;
        }
        let metrics = Arc::new(Metrics::new());
        let options = Options {
            rebuild: Rebuild::Manual,
            ..Options::default()
        };
        let tier =
            DiskTier::open_with(&cfg, reopen_slice_bytes, metrics.clone(), purges(), options)
                .unwrap();
        (a, sa, tier, metrics)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slices_keep_their_objects_metadata_state_across_a_reopen() {
        use crate::cache::meta::{Answer, Validator};
        let dir = tempfile::tempdir().unwrap();
        let cfg = DiskCache {
            path: dir.path().to_path_buf(),
            max_bytes: 1 << 30,
            policy: DiskPolicy::Video,
        };
        let (a, mut sa) = slice(1);
        let (b, sb) = slice(2);
        let answer = Answer {
            size: 1 << 20,
            validator: Validator::from_headers(Some(&HeaderValue::from_static("\"v7\"")), None),
            content_type: Some(HeaderValue::from_static("video/mp4")),
        };
        // Slice 1 under provisional metadata due at 12,345 ms; slice 2 under confirmed.
        sa.meta = Arc::new(ObjectMeta::learnt(&a.object, &answer, 12_000, 345));
        {
            let metrics = Arc::new(Metrics::new());
            let tier = DiskTier::open(&cfg, 4096, metrics.clone(), purges()).unwrap();
            tier.store(a, &sa, &OBJ, 1);
            tier.store(b, &sb, &OBJ, 1);
            until("writes", || metrics.disk_writes.get() == 2).await;
        }
        let tier = DiskTier::open(&cfg, 4096, Arc::new(Metrics::new()), purges()).unwrap();
        let got = tier.read(&a).await.unwrap().0.meta;
        assert_eq!(got.recheck_at(), 12_345);
        assert!(!got.is_confirmed());
        assert_eq!(got.validator(), answer.validator.as_ref());
        assert_eq!(got.content_type, "video/mp4");
        assert!(got.agrees_with(&sa.meta));
        let got = tier.read(&b).await.unwrap().0.meta;
        assert!(got.is_confirmed() && got.validator().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slice_not_yet_indexed_is_found_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let (a, sa, tier, metrics) = stored_then_reopened(dir.path(), 4096).await;
        assert!(!tier.contains(&a) && !tier.stats().index_ready);
        let got = tier
            .read(&a)
            .await
            .expect("found at its path before the rebuild")
            .0;
        assert_eq!(got.bytes, sa.bytes);
        assert!(tier.contains(&a), "and indexed on the way");
        tier.rebuild_now();
        assert!(tier.stats().index_ready);
        tier.sync_blocking();
        assert_eq!(tier.stats().entries, 1);
        let (b, _) = slice(2);
        assert!(tier.read(&b).await.is_none());
        assert_eq!(metrics.disk.hits.get(), 1);
    }

    /// A slice's file under another spelling of its name, or in another directory, is
    /// not where reads look: the rebuild does not index it (found with the fuzz target
    /// `disk_slice`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slice_file_away_from_its_own_path_is_not_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _, tier, _) = stored_then_reopened(dir.path(), 4096).await;
        let own = format::slice_path(dir.path(), &a);
        let name = format::file_name(&a);
        let elsewhere = dir.path().join(SLICES_DIR).join("00").join("00");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::copy(&own, elsewhere.join(&name)).unwrap();
        std::fs::rename(&own, own.with_file_name(name.to_uppercase())).unwrap();
        tier.rebuild_now();
        tier.sync_blocking();
        assert_eq!(tier.stats().entries, 0);
        assert!(tier.read(&a).await.is_none());
        assert!(
            elsewhere.join(&name).exists(),
            "files not ours are left alone"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_process_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DiskCache {
            path: dir.path().to_path_buf(),
            max_bytes: 1 << 30,
            policy: DiskPolicy::Video,
        };
        let first = DiskTier::open(&cfg, 4096, Arc::new(Metrics::new()), purges()).unwrap();
        let second = DiskTier::open(&cfg, 4096, Arc::new(Metrics::new()), purges());
        let err = second.err().unwrap().to_string();
        assert!(err.contains("in use"), "{err}");
        drop(first);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_cut_with_another_slice_size_are_replaced_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _, tier, metrics) = stored_then_reopened(dir.path(), 8192).await;
        assert!(
            tier.read(&a).await.is_none(),
            "a 4 KiB slice 1 is not an 8 KiB slice 1"
        );
        assert_eq!(metrics.cache_corrupt.get(), 1);
        tier.rebuild_now();
        tier.sync_blocking();
        assert_eq!(tier.stats().entries, 0);
    }
}
