//! The disk writer: one thread that turns queued slices into files, off the request path.
//!
//! Each slice is written to `tmp/`, then renamed to its place, then indexed: a reader
//! never sees a partial file under a slice's name. With the `video` policy a slice it
//! would not keep is not written, and the files a write displaces are deleted here. A
//! slice whose object was purged since its fill started is not written, and one purged
//! while it was being written is deleted once indexed (`cache::purge`). When a write
//! fails (a full file system, a failing device, a directory turned read-only) the writer
//! stops writing for the tier's write pause, [`WRITE_PAUSE`] (reads go on), and drops
//! what is queued meanwhile, counting it: a failing disk is not hammered, and is logged
//! once a pause.
//! Directories removed from under the running edge (`tmp/`, `slices/…`) are made again.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::format::{encode_header, slice_path, ObjectRecord, TMP_DIR};
use super::storage::{is_no_space, SliceStorage};
use super::Shared;
use crate::cache::SliceKey;

/// How long writes stop after one failed.
pub const WRITE_PAUSE: Duration = Duration::from_secs(10);

/// One slice to persist.
pub struct WriteJob {
    pub key: SliceKey,
    /// The object's names, recorded in the file.
    pub o: Box<str>,
    pub v: Box<str>,
    /// The purge stamp of the fill that cut the slice.
    pub written_at: u64,
    pub payload: Bytes,
    pub object_size: u64,
    pub content_type: Bytes,
    /// The origin's validator as stored (empty: none).
    pub validator: Bytes,
    /// When the object's metadata is due for a re-check (unix ms; `u64::MAX` confirmed).
    pub recheck_at: u64,
    /// Written whatever the `video` policy thinks of it (a fill job's slice).
    pub placed: bool,
}

/// Runs until every sender is gone.
pub fn run(shared: Arc<Shared>, jobs: Receiver<WriteJob>) {
    let tmp_dir = shared.root.join(TMP_DIR);
    let mut made_dirs: HashSet<[u8; 2]> = HashSet::new();
    let mut paused_until: Option<Instant> = None;
    let pid = std::process::id();
    for (seq, job) in jobs.into_iter().enumerate() {
        if shared.handed_over.load(Ordering::Acquire) {
            continue;
        }
        if paused_until.is_some_and(|t| Instant::now() < t) {
            shared.metrics.disk_writes_dropped.inc();
            continue;
        }
        paused_until = None;
        if shared
            .purges
            .purged_after(&job.o, &job.key.object, job.written_at)
        {
            continue;
        }
        let tmp = tmp_dir.join(format!("{pid}-{seq}.part"));
        let dst = slice_path(&shared.root, &job.key);
        let record = ObjectRecord {
            size: job.object_size,
            content_type: &job.content_type,
            validator: &job.validator,
            recheck_at: job.recheck_at,
            o: &job.o,
            v: &job.v,
            written_at: job.written_at,
        };
        let header = encode_header(&job.key, record, shared.slice_bytes as u32, &job.payload);
        let len = (header.len() + job.payload.len()) as u32;
        if !job.placed && !shared.would_keep(&job.key, len) {
            shared.metrics.disk_writes_declined.inc();
            continue;
        }
        let bucket = [job.key.object.as_bytes()[0], job.key.object.as_bytes()[1]];
        let written = write_tmp(&*shared.storage, &tmp_dir, &tmp, &header, &job.payload)
            .and_then(|()| place(&tmp, &dst, made_dirs.contains(&bucket)));
        if written.is_ok() {
            made_dirs.insert(bucket);
        }
        match written {
            Ok(()) => {
                if !shared.index_file(job.key, len, job.placed) {
                    // What it displaced changed since it was asked (rare): not kept.
                    let _ = std::fs::remove_file(&dst);
                    shared.metrics.disk_writes_declined.inc();
                    continue;
                }
                shared.purges.names().note(job.key.object, &job.o);
                if shared
                    .purges
                    .purged_after(&job.o, &job.key.object, job.written_at)
                {
                    // Purged while it was written: the purge's sweep may have missed it.
                    shared.index.invalidate(&job.key);
                    let _ = std::fs::remove_file(&dst);
                    continue;
                }
                // Evict now, so the directory is back under its budget before the next write.
                shared.index.run_pending_tasks();
                shared.metrics.disk_writes.inc();
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                paused_until = Some(Instant::now() + shared.write_pause);
                let pause_secs = shared.write_pause.as_secs_f64();
                if is_no_space(&e) {
                    shared.metrics.disk_write_errors_no_space.inc();
                    tracing::warn!(path = %shared.root.display(), error = %e, pause_secs,
                        "disk cache is full; writes paused");
                } else {
                    shared.metrics.disk_write_errors_io.inc();
                    tracing::warn!(path = %dst.display(), error = %e, pause_secs,
                        "disk cache write failed; writes paused");
                }
            }
        }
    }
}

/// Writes the temporary file, making `tmp/` again if it is gone (an operator may clear
/// the cache directory while the edge runs).
fn write_tmp(
    storage: &dyn SliceStorage,
    dir: &Path,
    tmp: &Path,
    header: &[u8],
    payload: &[u8],
) -> io::Result<()> {
    match storage.write_new(tmp, header, payload) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            storage.write_new(tmp, header, payload)
        }
        other => other,
    }
}

/// Renames `tmp` to `dst`, creating `dst`'s directory when it is not known to exist
/// or has gone (an operator may clear the cache while the edge runs).
fn place(tmp: &Path, dst: &Path, dir_known: bool) -> io::Result<()> {
    let dir = dst.parent().expect("slice paths have a parent");
    if !dir_known {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::rename(tmp, dst) {
        Err(e) if dir_known && e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            std::fs::rename(tmp, dst)
        }
        other => other,
    }
}
