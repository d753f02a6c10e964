//! Purging the disk tier: every file of some objects, found by listing the one
//! directory each object's files share (no index needed, so it works while the index is
//! being rebuilt).

use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::Ordering;

use super::format::{decode_header, parse_file_name, slice_path, MAX_HEADER};
use super::{DiskTier, Shared};
use crate::cache::{ObjectId, SliceKey};

impl DiskTier {
    /// Deletes every slice file of the objects `ids`; returns each slice removed with its
    /// payload length. Runs on the blocking pool.
    pub async fn purge(&self, ids: Vec<ObjectId>) -> Vec<(SliceKey, u64)> {
        if ids.is_empty() {
            return Vec::new();
        }
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.purge_blocking(&ids))
            .await
            .unwrap_or_default()
    }

    /// The objects with a slice in the index. Runs on the blocking pool.
    pub async fn held_objects(&self) -> HashSet<ObjectId> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.index.iter().map(|(k, _)| k.object).collect())
            .await
            .unwrap_or_default()
    }
}

impl Shared {
    fn purge_blocking(&self, ids: &[ObjectId]) -> Vec<(SliceKey, u64)> {
        if self.handed_over.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut removed = Vec::new();
        for id in ids {
            let probe = SliceKey {
                object: *id,
                index: 0,
            };
            let path = slice_path(&self.root, &probe);
            let Some(dir) = path.parent() else { continue };
            let Ok(listing) = std::fs::read_dir(dir) else {
                continue; // no slice of that object was ever written here
            };
            for file in listing.flatten() {
                let Some(key) = file.file_name().to_str().and_then(parse_file_name) else {
                    continue;
                };
                if key.object != *id {
                    continue;
                }
                let path = file.path();
                let payload = payload_len(&path, &key);
                self.index.invalidate(&key);
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        if let Some(len) = payload {
                            removed.push((key, len));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot delete a purged slice file; it is refused when read");
                    }
                }
            }
        }
        removed
    }
}

/// The payload length a slice file's header gives, if it is a valid header for `key`.
fn payload_len(path: &std::path::Path, key: &SliceKey) -> Option<u64> {
    let mut head = Vec::with_capacity(MAX_HEADER);
    std::fs::File::open(path)
        .ok()?
        .take(MAX_HEADER as u64)
        .read_to_end(&mut head)
        .ok()?;
    decode_header(&head)
        .ok()
        .filter(|h| h.key == *key)
        .map(|h| u64::from(h.payload_len))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use super::super::{Options, Rebuild};
    use super::*;
    use crate::cache::purge::{PurgeRecord, Purges};
    use crate::cache::{CachedSlice, ObjectMeta, ObjectRef};
    use crate::config::DiskCache;
    use crate::metrics::Metrics;

    struct Tier {
        tier: DiskTier,
        metrics: Arc<Metrics>,
        purges: Arc<Purges>,
    }

    fn open(dir: &std::path::Path, purges: Arc<Purges>, rebuild: Rebuild) -> Tier {
        let cfg = DiskCache {
            path: dir.to_path_buf(),
            max_bytes: 1 << 30,
            policy: crate::config::DiskPolicy::Video,
        };
        let metrics = Arc::new(Metrics::new());
        let options = Options {
            rebuild,
            ..Options::default()
        };
        let tier =
            DiskTier::open_with(&cfg, 4096, metrics.clone(), purges.clone(), options).unwrap();
        Tier {
            tier,
            metrics,
            purges,
        }
    }

    /// Slice `index` (4 KiB, of a 1 MiB object) of (o, v).
    fn slice(o: &str, v: &str, index: u64) -> (SliceKey, CachedSlice) {
        let object = ObjectId::new(o, v);
        let key = SliceKey { object, index };
        let meta = Arc::new(ObjectMeta::new(&object, 1 << 20, None));
        let bytes = Bytes::from(vec![index as u8; 4096]);
        (key, CachedSlice { bytes, meta })
    }

    impl Tier {
        /// Stores slices and waits until they are written.
        async fn write(&self, slices: &[(&str, &str, u64)]) {
            let before = self.metrics.disk_writes.get();
            for &(o, v, i) in slices {
                let (key, s) = slice(o, v, i);
                self.tier
                    .store(key, &s, &ObjectRef::new(o, v), self.purges.now());
            }
            until("writes", || {
                self.metrics.disk_writes.get() == before + slices.len() as u64
            })
            .await;
        }

        fn has_file(&self, o: &str, v: &str, index: u64) -> bool {
            slice_path(&self.tier.shared.root, &slice(o, v, index).0).exists()
        }
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn purge(o: &str, v: Option<&str>) -> PurgeRecord {
        PurgeRecord {
            id: Purges::new_id(),
            o: o.into(),
            v: v.map(Into::into),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_deletes_every_file_of_its_objects_and_counts_their_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(
            dir.path(),
            Arc::new(Purges::in_memory()),
            Rebuild::Background,
        );
        t.write(&[
            ("m", "1", 0),
            ("m", "1", 1),
            ("m", "1", 5),
            ("m", "2", 0),
            ("n", "1", 0),
        ])
        .await;
        let mut removed = t.tier.purge(vec![ObjectId::new("m", "1")]).await;
        removed.sort_by_key(|(k, _)| k.index);
        let indexes: Vec<(u64, u64)> = removed.iter().map(|(k, len)| (k.index, *len)).collect();
        assert_eq!(indexes, vec![(0, 4096), (1, 4096), (5, 4096)]);
        assert!(!t.has_file("m", "1", 0) && !t.has_file("m", "1", 5));
        assert!(
            t.has_file("m", "2", 0) && t.has_file("n", "1", 0),
            "other objects stay"
        );
        assert!(!t.tier.contains(&slice("m", "1", 1).0));
        assert!(t.tier.read(&slice("m", "2", 0).0).await.is_some());
        assert!(t.tier.purge(vec![ObjectId::new("x", "1")]).await.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_rebuild_deletes_files_older_than_a_purge_and_notes_the_others_names() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = open(
                dir.path(),
                Arc::new(Purges::in_memory()),
                Rebuild::Background,
            );
            t.write(&[("m", "1", 0), ("m", "2", 3), ("n", "1", 0)])
                .await;
        }
        let purges = Arc::new(Purges::in_memory());
        purges.record(purge("m", None)).unwrap();
        let t = open(dir.path(), purges.clone(), Rebuild::Manual);
        t.tier.rebuild_now();
        assert!(!t.has_file("m", "1", 0) && !t.has_file("m", "2", 3));
        assert!(t.has_file("n", "1", 0));
        assert_eq!(t.tier.stats().entries, 1);
        assert_eq!(t.metrics.purge.slices.get(), 2);
        assert_eq!(purges.names().ids_of("n"), vec![ObjectId::new("n", "1")]);
        // Written after the purge: kept.
        t.write(&[("m", "1", 0)]).await;
        assert!(t.has_file("m", "1", 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_gives_the_stamp_of_the_fill_that_cut_the_slice() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(
            dir.path(),
            Arc::new(Purges::in_memory()),
            Rebuild::Background,
        );
        let (key, s) = slice("m", "1", 2);
        t.tier.store(key, &s, &ObjectRef::new("m", "1"), 1234);
        until("write", || t.metrics.disk_writes.get() == 1).await;
        let (read, stamp) = t.tier.read(&key).await.unwrap();
        assert_eq!((read.bytes, stamp), (s.bytes, 1234));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_drops_a_slice_whose_object_was_purged_since_its_fill_started() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(
            dir.path(),
            Arc::new(Purges::in_memory()),
            Rebuild::Background,
        );
        let started = t.purges.now();
        t.purges.record(purge("m", Some("1"))).unwrap();
        let (key, s) = slice("m", "1", 0);
        t.tier.store(key, &s, &ObjectRef::new("m", "1"), started);
        // Jobs are written in order: once this one is, the first was dealt with.
        t.write(&[("m", "2", 0)]).await;
        assert!(
            !t.has_file("m", "1", 0),
            "purged while in flight: not written"
        );
        assert_eq!(t.metrics.disk_writes.get(), 1);
    }
}
