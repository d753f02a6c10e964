//! Purges (SPEC 7): what this node knows was purged, so that no purged byte is served
//! or cached again, here or, through the log, on a node of the site that missed it.
//!
//! # Invariants
//! 1. A purge is recorded before anything is removed ([`Purges::record`]): from then
//!    on no slice of its object cut by a fill that started before it is served from
//!    disk or put in a tier, wherever the sweep (`sweep.rs`) has not reached yet.
//! 2. Stamps: the purge clock gives unix milliseconds, strictly increasing within the
//!    process and never below a stamp the log holds. A purge takes a new stamp; a fill
//!    reads the clock when it starts. So "the fill started before the purge" is exact
//!    within a process, and follows the wall clock across restarts.
//! 3. A fill is checked against purges made since it started, after it and before its
//!    slice enters memory (then not cached, its waiters still get the bytes), and again
//!    once it is in memory. The disk writer checks before writing and after indexing.
//!    A disk file carries its fill's stamp (format version 4), and a disk read or the
//!    index rebuild drops a file whose object was purged after that stamp.
//! 4. The log holds the newest [`MAX_ENTRIES`] purges, each once (by id). With a disk
//!    tier it is kept in `<cache.disk.path>/purges.log` ([`log`]) and appended to with
//!    an fsync before the purge is swept; without one it lives in memory: nothing
//!    cached survives a restart then.
//! 5. Object names: an all-versions purge finds the versions held by the object id → o
//!    map ([`Names`]), noted after a slice enters a tier and pruned to the ids still
//!    held. A slice the map misses is still never served (3).
//! 6. With a disk tier in a site, disk slices are not read after a start until the node
//!    has pulled its peers' logs (`cluster::purge`), or [`SYNC_WAIT_MAX`] has passed.

pub mod log;
mod sweep;

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use sweep::{Applied, Removed};

use super::ObjectId;
use log::LogFile;

/// Purges the log keeps; older ones are forgotten.
pub const MAX_ENTRIES: usize = 10_000;
/// Longest a disk read waits for the purge sync after a start.
pub const SYNC_WAIT_MAX: Duration = Duration::from_secs(15);

/// One purge as the site knows it: an id (the same on every node) and what it removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeRecord {
    pub id: u64,
    pub o: String,
    /// `None`: every version of `o`.
    pub v: Option<String>,
}

/// A purge in this node's log: its record, when this node learnt it, and its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in this node's log, from 1.
    pub seq: u64,
    #[serde(flatten)]
    pub record: PurgeRecord,
    /// This node's purge stamp when it recorded the purge.
    pub at: u64,
}

/// Entries of the log after a position, for a peer that pulls it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page {
    /// The log's identity: a new one means a new log (seq starts again).
    pub log: String,
    /// The highest seq in the log.
    pub last: u64,
    pub purges: Vec<Entry>,
    /// More entries follow the last one given.
    pub more: bool,
}

/// What this node knows was purged, the purge clock, object names and the start gate.
pub struct Purges {
    /// The last stamp given (a purge's, or one read by a fill).
    clock: AtomicU64,
    /// The stamp of the newest purge: fills that started later need no lookup.
    latest: AtomicU64,
    book: Mutex<Book>,
    file: Option<LogFile>,
    incarnation: String,
    names: Names,
    synced: AtomicBool,
    synced_tx: tokio::sync::watch::Sender<bool>,
}

/// The log in memory and its indexes. Guarded by a mutex never held across an await.
#[derive(Default)]
struct Book {
    entries: VecDeque<Entry>,
    ids: HashSet<u64>,
    /// Newest stamp of a purge of one version, by object id.
    by_version: HashMap<ObjectId, u64>,
    /// Newest stamp of a purge of every version, by o.
    by_object: HashMap<Arc<str>, u64>,
    next_seq: u64,
}

impl Book {
    fn insert(&mut self, entry: Entry) {
        let at = entry.at;
        self.ids.insert(entry.record.id);
        match &entry.record.v {
            Some(v) => {
                let id = ObjectId::new(&entry.record.o, v);
                let t = self.by_version.entry(id).or_default();
                *t = (*t).max(at);
            }
            None => {
                let t = self
                    .by_object
                    .entry(entry.record.o.as_str().into())
                    .or_default();
                *t = (*t).max(at);
            }
        }
        self.next_seq = self.next_seq.max(entry.seq + 1);
        self.entries.push_back(entry);
        while self.entries.len() > MAX_ENTRIES {
            let old = self.entries.pop_front().expect("longer than the limit");
            self.forget(&old);
        }
    }

    /// Drops an entry's index entries (a newer purge of the same target keeps its own).
    fn forget(&mut self, old: &Entry) {
        self.ids.remove(&old.record.id);
        match &old.record.v {
            Some(v) => {
                let id = ObjectId::new(&old.record.o, v);
                if self.by_version.get(&id) == Some(&old.at) {
                    self.by_version.remove(&id);
                }
            }
            None => {
                if self.by_object.get(old.record.o.as_str()) == Some(&old.at) {
                    self.by_object.remove(old.record.o.as_str());
                }
            }
        }
    }

    fn purged_after(&self, o: Option<&str>, id: &ObjectId, stamp: u64) -> bool {
        self.by_version.get(id).is_some_and(|&at| at > stamp)
            || o.and_then(|o| self.by_object.get(o))
                .is_some_and(|&at| at > stamp)
    }
}

impl Purges {
    /// The purges of a node whose log is kept in `dir` (the disk tier's directory), or in
    /// memory without one. Reads the log (blocking: call at start); writes nothing.
    /// `gated`: disk reads wait for [`Purges::mark_synced`] (a disk tier in a site).
    pub fn open(dir: Option<&Path>, gated: bool) -> std::io::Result<Self> {
        let (file, incarnation, entries) = match dir {
            Some(dir) => {
                let (file, loaded) = LogFile::open(dir)?;
                let incarnation = loaded.incarnation.unwrap_or_else(new_incarnation);
                (Some(file), incarnation, loaded.entries)
            }
            None => (None, new_incarnation(), Vec::new()),
        };
        let mut book = Book {
            next_seq: 1,
            ..Book::default()
        };
        for e in entries {
            if !book.ids.contains(&e.record.id) {
                book.insert(e);
            }
        }
        let newest = book.entries.iter().map(|e| e.at).max().unwrap_or(0);
        Ok(Self {
            clock: AtomicU64::new(newest),
            latest: AtomicU64::new(newest),
            book: Mutex::new(book),
            file,
            incarnation,
            names: Names::default(),
            synced: AtomicBool::new(!gated),
            synced_tx: tokio::sync::watch::channel(!gated).0,
        })
    }

    /// Purges in memory only, not gated (tests, benches).
    pub fn in_memory() -> Self {
        Self::open(None, false).expect("no I/O without a directory")
    }

    /// The purge clock now: a fill's start stamp (invariant 2). A purge recorded later
    /// gets a greater stamp.
    pub fn now(&self) -> u64 {
        let wall = unix_ms();
        self.clock.fetch_max(wall, Ordering::SeqCst).max(wall)
    }

    /// A stamp later than every stamp read or given before.
    fn next_stamp(&self) -> u64 {
        let wall = unix_ms();
        let prev = self
            .clock
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                Some(wall.max(c + 1))
            })
            .expect("the closure always gives a value");
        wall.max(prev + 1)
    }

    /// Whether `o` (any version) or the version with id `id` was purged after `stamp`:
    /// a slice cut by a fill that started at `stamp` must not be served or kept.
    pub fn purged_after(&self, o: &str, id: &ObjectId, stamp: u64) -> bool {
        self.purged_after_name(Some(o), id, stamp)
    }

    /// [`Purges::purged_after`] when o may be unknown (a disk file older than names):
    /// then only purges of its version count.
    pub fn purged_after_name(&self, o: Option<&str>, id: &ObjectId, stamp: u64) -> bool {
        if self.latest.load(Ordering::SeqCst) <= stamp {
            return false;
        }
        self.lock().purged_after(o, id, stamp)
    }

    /// Records a purge, unless its id is known already (`None`). From its return, fills
    /// that started earlier are refused (invariant 1). Not yet durable: see
    /// [`Purges::persist`].
    pub fn record(&self, record: PurgeRecord) -> Option<Entry> {
        let mut book = self.lock();
        if book.ids.contains(&record.id) {
            return None;
        }
        let entry = Entry {
            seq: book.next_seq,
            record,
            at: self.next_stamp(),
        };
        book.insert(entry.clone());
        self.latest.fetch_max(entry.at, Ordering::SeqCst);
        Some(entry)
    }

    /// Makes a recorded entry durable (with a disk tier): appended with an fsync, and the
    /// file compacted when it has grown to twice [`MAX_ENTRIES`].
    pub async fn persist(self: &Arc<Self>, entry: Entry) -> std::io::Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let file = this.file.as_ref().expect("checked above");
            if file.lines() > 0 && file.lines() < 2 * MAX_ENTRIES {
                return file.append(&entry);
            }
            // New, damaged or grown: written whole, this entry included.
            let entries: Vec<Entry> = this.lock().entries.iter().cloned().collect();
            file.rewrite(&this.incarnation, &entries)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// Entries after `since`, at most `limit`, for a peer pulling the log.
    pub fn page(&self, since: u64, limit: usize) -> Page {
        let book = self.lock();
        let last = book.entries.back().map_or(0, |e| e.seq);
        let mut after = book.entries.iter().filter(|e| e.seq > since);
        let purges: Vec<Entry> = after.by_ref().take(limit).cloned().collect();
        Page {
            log: self.incarnation.clone(),
            last,
            more: after.next().is_some(),
            purges,
        }
    }

    /// Whether this purge id is in the log.
    pub fn knows(&self, id: u64) -> bool {
        self.lock().ids.contains(&id)
    }

    /// Purges in the log.
    pub fn entries(&self) -> usize {
        self.lock().entries.len()
    }

    /// A new purge id: random, so ids made on different nodes do not meet.
    pub fn new_id() -> u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Whether disk slices may be read (invariant 6).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Lets disk reads go on: the start's purge sync is done (or has given up).
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
        self.synced_tx.send_replace(true);
    }

    /// Waits until disk slices may be read, at most [`SYNC_WAIT_MAX`].
    pub async fn wait_synced(&self) {
        if self.is_synced() {
            return;
        }
        let mut rx = self.synced_tx.subscribe();
        let _ = tokio::time::timeout(SYNC_WAIT_MAX, rx.wait_for(|s| *s)).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Object id → o for the slices the tiers hold (invariant 5).
#[derive(Default)]
pub struct Names {
    map: Mutex<HashMap<ObjectId, (Arc<str>, u64)>>,
    /// Bumped by each prune: an id noted since the prune began is kept.
    epoch: AtomicU64,
    /// Ids kept by the last prune.
    kept: AtomicU64,
}

/// Fewest names before a prune is worth it.
const NAMES_PRUNE_MIN: u64 = 4_096;

impl Names {
    /// Notes that a slice of object `id`, named `o`, entered a tier. Call after it did.
    pub fn note(&self, id: ObjectId, o: &str) {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut map = self.lock();
        match map.entry(id) {
            MapEntry::Occupied(mut e) => e.get_mut().1 = epoch,
            MapEntry::Vacant(e) => {
                e.insert((o.into(), epoch));
            }
        }
    }

    /// The ids noted for object `o`.
    pub fn ids_of(&self, o: &str) -> Vec<ObjectId> {
        self.lock()
            .iter()
            .filter(|(_, (name, _))| &**name == o)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether there are enough names, grown enough since the last prune, to prune.
    pub fn wants_prune(&self) -> bool {
        let len = self.lock().len() as u64;
        len > NAMES_PRUNE_MIN.max(2 * self.kept.load(Ordering::Relaxed))
    }

    /// Starts a prune: returns the epoch to pass to [`Names::prune`] once the ids held
    /// have been gathered.
    pub fn begin_prune(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Keeps the ids in `held` and those noted since `begun`.
    pub fn prune(&self, begun: u64, held: &HashSet<ObjectId>) {
        let mut map = self.lock();
        map.retain(|id, (_, noted)| *noted >= begun || held.contains(id));
        self.kept.store(map.len() as u64, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectId, (Arc<str>, u64)>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn new_incarnation() -> String {
    format!("{:016x}", Purges::new_id())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, o: &str, v: Option<&str>) -> PurgeRecord {
        PurgeRecord {
            id,
            o: o.into(),
            v: v.map(Into::into),
        }
    }

    #[test]
    fn a_fill_that_started_before_a_purge_is_purged_and_one_after_is_not() {
        let p = Purges::in_memory();
        let (m1, m2) = (ObjectId::new("m", "1"), ObjectId::new("m", "2"));
        let before = p.now();
        assert!(!p.purged_after("m", &m1, before), "nothing purged yet");
        p.record(rec(1, "m", Some("1"))).unwrap();
        let after = p.now();
        assert!(p.purged_after("m", &m1, before));
        assert!(!p.purged_after("m", &m1, after));
        assert!(!p.purged_after("m", &m2, before), "another version");
        assert!(
            !p.purged_after("n", &ObjectId::new("n", "1"), before),
            "another object"
        );
        p.record(rec(2, "m", None)).unwrap();
        assert!(p.purged_after("m", &m2, after), "every version");
        assert!(
            !p.purged_after_name(None, &m2, after),
            "a file with no name: only purges of its version count"
        );
        assert!(p.purged_after_name(None, &m1, 0));
    }

    #[test]
    fn stamps_increase_even_within_one_millisecond() {
        let p = Purges::in_memory();
        let mut last = 0;
        for i in 0..100 {
            let read = p.now();
            let e = p.record(rec(i, "m", None)).unwrap();
            assert!(e.at > read && e.at > last);
            last = e.at;
        }
    }

    #[test]
    fn ids_are_recorded_once_and_the_log_pages() {
        let p = Purges::in_memory();
        assert!(p.record(rec(7, "m", None)).is_some());
        assert!(p.record(rec(7, "m", None)).is_none());
        for i in 0..5 {
            p.record(rec(100 + i, "x", Some("1"))).unwrap();
        }
        let page = p.page(0, 4);
        assert_eq!(page.purges.len(), 4);
        assert!(page.more);
        assert_eq!(page.last, 6);
        let rest = p.page(page.purges[3].seq, 4);
        assert_eq!(rest.purges.len(), 2);
        assert!(!rest.more);
        assert_eq!(rest.log, page.log);
    }

    #[test]
    fn the_oldest_purges_are_forgotten_past_the_limit() {
        let p = Purges::in_memory();
        let first = ObjectId::new("first", "1");
        let before = p.now();
        p.record(rec(0, "first", Some("1"))).unwrap();
        for i in 1..=MAX_ENTRIES as u64 {
            p.record(rec(i, "o", Some(&i.to_string()))).unwrap();
        }
        assert_eq!(p.entries(), MAX_ENTRIES);
        assert!(!p.knows(0));
        assert!(!p.purged_after("first", &first, before));
    }

    #[test]
    fn names_are_pruned_to_the_ids_held_or_noted_meanwhile() {
        let names = Names::default();
        let ids: Vec<ObjectId> = (0..3).map(|i| ObjectId::new("m", &i.to_string())).collect();
        names.note(ids[0], "m");
        names.note(ids[1], "m");
        let begun = names.begin_prune();
        names.note(ids[2], "m");
        names.prune(begun, &HashSet::from([ids[0]]));
        let mut kept = names.ids_of("m");
        kept.sort_by_key(|id| *id.as_bytes());
        let mut want = vec![ids[0], ids[2]];
        want.sort_by_key(|id| *id.as_bytes());
        assert_eq!(kept, want);
        assert!(names.ids_of("other").is_empty());
    }

    #[tokio::test]
    async fn the_gate_opens_once_synced() {
        let p = Arc::new(Purges::open(None, true).unwrap());
        assert!(!p.is_synced());
        let shut = tokio::time::timeout(Duration::from_millis(50), p.wait_synced()).await;
        assert!(shut.is_err(), "disk reads wait while the gate is shut");
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.wait_synced().await }
        });
        p.mark_synced();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
