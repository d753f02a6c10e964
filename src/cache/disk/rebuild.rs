//! Rebuilds the disk index from the slice files at start, in the background.
//!
//! Only headers are read (the payload checksum is checked when a slice is served), so a
//! large cache is indexed at the speed of opening files, not of reading them. A file
//! whose object was purged after it was cut is deleted rather than indexed, and the
//! names of the objects found are noted for purges of every version (`cache::purge`).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::format::{
    decode_header, parse_file_name, slice_path, FormatError, MAX_HEADER, SLICES_DIR,
};
use super::Shared;

/// Walks `slices/*/*/*`, indexes every valid file and deletes the invalid ones.
pub fn run(shared: Arc<Shared>) {
    let started = Instant::now();
    let mut indexed = 0u64;
    let top = shared.root.join(SLICES_DIR);
    for level1 in dir_entries(&top) {
        for level2 in dir_entries(&level1) {
            for file in dir_entries(&level2) {
                if index_file(&shared, &file) {
                    indexed += 1;
                }
            }
        }
    }
    shared.index.run_pending_tasks();
    let secs = started.elapsed().as_secs_f64();
    shared.metrics.disk_index_rebuild_seconds.set(secs);
    shared.metrics.disk_index_ready.set(1);
    shared.rebuilt.store(true, Ordering::Release);
    tracing::info!(path = %shared.root.display(), slices = indexed, seconds = secs, "disk cache index rebuilt");
}

fn dir_entries(dir: &Path) -> impl Iterator<Item = std::path::PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
}

/// Indexes one file; deletes it only if its contents prove it invalid (an I/O error
/// leaves it alone, counted: if its slice is fetched again, the new file replaces it).
/// True if indexed.
fn index_file(shared: &Shared, path: &Path) -> bool {
    let Some(key) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_file_name)
    else {
        return false; // not ours (e.g. a directory an operator made): leave it
    };
    if path != slice_path(&shared.root, &key) {
        // A slice name in another directory: reads never look there, so it is not ours
        // either (indexing it would count bytes no read can reach).
        return false;
    }
    let read = || -> std::io::Result<(Vec<u8>, u64)> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        let mut head = Vec::with_capacity(MAX_HEADER);
        f.by_ref().take(MAX_HEADER as u64).read_to_end(&mut head)?;
        Ok((head, len))
    };
    let (head, len) = match read() {
        Ok(r) => r,
        Err(e) => {
            // Gone meanwhile (evicted, or found corrupt by a read), or unreadable now:
            // not proof of corruption.
            if e.kind() != std::io::ErrorKind::NotFound {
                shared.metrics.disk_read_errors_io.inc();
                tracing::warn!(path = %path.display(), error = %e, "cannot read a slice file; skipped");
            }
            return false;
        }
    };
    let checked = decode_header(&head).and_then(|h| {
        if h.key != key {
            Err(FormatError::WrongKey)
        } else if h.file_len() != len {
            Err(FormatError::Length)
        } else {
            h.check_slicing(shared.slice_bytes).map(|()| h)
        }
    });
    match checked {
        Ok(header)
            if shared.purges.purged_after_name(
                header.object_name(),
                &key.object,
                header.written_at,
            ) =>
        {
            shared.index.invalidate(&key);
            let _ = fs::remove_file(path);
            shared.metrics.purge.slices.inc();
            shared
                .metrics
                .purge
                .bytes
                .inc_by(u64::from(header.payload_len));
            false
        }
        Ok(header) => {
            // A slice written since start is newer; keep its entry.
            if !shared.index.contains_key(&key) {
                shared.index_file(key, header.file_len() as u32, true);
            }
            if let Some(o) = header.object_name() {
                shared.purges.names().note(key.object, o);
            }
            true
        }
        Err(e) => {
            shared.metrics.cache_corrupt.inc();
            tracing::warn!(path = %path.display(), error = %e, "removing an invalid slice file found at start");
            let _ = fs::remove_file(path);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::format::slice_path;
    use super::super::{DiskTier, Options, Rebuild};
    use crate::cache::purge::Purges;
    use crate::cache::{ObjectId, SliceKey};
    use crate::config::DiskCache;
    use crate::metrics::Metrics;

    #[test]
    fn an_unreadable_file_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DiskCache {
            path: dir.path().to_path_buf(),
            max_bytes: 1 << 30,
            policy: crate::config::DiskPolicy::Video,
        };
        let metrics = Arc::new(Metrics::new());
        let options = Options {
            rebuild: Rebuild::Manual,
            ..Options::default()
        };
        let purges = Arc::new(Purges::in_memory());
        let tier = DiskTier::open_with(&cfg, 4096, metrics.clone(), purges, options).unwrap();
        // A directory under a slice file's name: it opens, but cannot be read (EISDIR).
        let key = SliceKey {
            object: ObjectId::new("o", "v"),
            index: 1,
        };
        let path = slice_path(dir.path(), &key);
        std::fs::create_dir_all(&path).unwrap();
        tier.rebuild_now();
        assert_eq!(metrics.disk_read_errors_io.get(), 1);
        assert_eq!((tier.stats().entries, metrics.cache_corrupt.get()), (0, 0));
        assert!(path.is_dir(), "left alone");
    }
}
