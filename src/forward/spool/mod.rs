//! Durable spool for events and log blobs, on redb (an embedded, crash-safe B-tree store).
//!
//! # Design constraints
//! 1. A request is acknowledged only after the transaction that holds it has committed
//!    with `Durability::Immediate` (fsync): it survives `kill -9` and power loss.
//! 2. Group commit: one writer thread takes every append and removal waiting at that
//!    moment and commits them in one transaction, so many requests share one fsync.
//! 3. Each queue is ordered by a sequence number; delivery takes the lowest first, so
//!    records are delivered in arrival order per route. A record is removed only after
//!    its delivery ended (a 2xx, or a failure delivery gave up on, which moves it to
//!    the dead letters table).
//! 4. Undelivered records are bounded by `forward.spool_max_bytes` (encoded record
//!    bytes); an append that would pass it is refused (the client gets 503), never
//!    dropped silently. Undelivered records are never dropped to make room.
//! 5. What is kept after delivery, upstream answers for deduplication and dead letters,
//!    lives inside the same limit: each kind at most an eighth of it, and both together
//!    never more than the records leave free; past that the oldest go first, in the
//!    same commit (budget.rs). A kept answer body is at most 16 KiB.
//! 6. Answers past the dedupe window are purged until none is left, in transactions of
//!    at most [`PURGE_CHUNK`] removals, so appends never wait long behind a purge.
//! 7. Byte counts (records per queue, answers, dead letters) are recounted at open, so
//!    they are right after a restart or a crash.
//! 8. A dedupe key (dedupe.rs: the `reqId` and a digest of path and body) is kept while
//!    its record waits (a retry is not spooled twice) and, once delivered, with the
//!    upstream's answer. Keys of earlier versions (the bare `reqId`) expire like any.
//! 9. The failed attempts of a waiting record are kept with it (failures table) and
//!    removed with it, so a restart does not give a poison record a fresh start. They
//!    are written without an fsync of their own: a crash may forget the last few.
//! 10. A spool file that cannot be opened (damaged outside of a crash) is moved aside,
//!     counted, and a new one started: the edge keeps serving.
//!
//! # Tables
//! ```text
//! events, logblob   u64 sequence -> Record (see record.rs)
//! dead_letters      u64 sequence -> Record delivery gave up on
//! pending           "<queue>:<key>" -> sequence
//! delivered         "<queue>:<key>" -> StoredAnswer (body at most 16 KiB)
//! delivered_at      (stored at unix ms, "<queue>:<key>") -> (), one per answer
//! failures          u64 sequence -> (answered failures, failed tries, first failure unix ms)
//! meta              "next_seq" -> next sequence number
//! ```

mod budget;
mod open;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc::{channel, Sender};

use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::{oneshot, Notify};

use super::record::{Record, StoredAnswer};
use super::retry::Failures;
use crate::metrics::Metrics;
pub use budget::{Kept, Usage, KEPT_SHARE, MAX_KEPT_ANSWER_BODY};
use writer::{Op, Writer};

/// The store's file name inside `forward.spool_dir`.
pub const FILE_NAME: &str = "spool.redb";
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const LOGBLOB: TableDefinition<u64, &[u8]> = TableDefinition::new("logblob");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
const PENDING: TableDefinition<&str, u64> = TableDefinition::new("pending");
const DELIVERED: TableDefinition<&str, &[u8]> = TableDefinition::new("delivered");
/// `delivered` by time, so the purge reads only what expired.
const DELIVERED_AT: TableDefinition<(u64, &str), ()> = TableDefinition::new("delivered_at");
/// Answers the purge goes through per transaction at most, so appends never wait long.
pub const PURGE_CHUNK: usize = 2_000;
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Failed delivery attempts of a waiting record: (answered, tries, first failure ms).
const FAILURES: TableDefinition<u64, (u32, u32, u64)> = TableDefinition::new("failures");

/// Operations waiting for the writer at most; more make appends wait (backpressure).
const OPS_QUEUE: usize = 4096;
/// Page cache of the spool store.
const SPOOL_CACHE_BYTES: usize = 64 << 20;
/// Most operations committed in one transaction.
const MAX_BATCH: usize = 512;

/// A spooled route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Events,
    LogBlob,
}

impl Queue {
    pub const ALL: [Queue; 2] = [Queue::Events, Queue::LogBlob];

    pub const fn label(self) -> &'static str {
        match self {
            Queue::Events => "event",
            Queue::LogBlob => "logblob",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }

    const fn table(self) -> TableDefinition<'static, u64, &'static [u8]> {
        match self {
            Queue::Events => EVENTS,
            Queue::LogBlob => LOGBLOB,
        }
    }

    fn table_key(self, dedupe_key: &str) -> String {
        format!("{}:{dedupe_key}", self.label())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full")]
    Full,
    #[error("spool storage failed: {0}")]
    Storage(String),
    #[error("{0}")]
    InUse(String),
    #[error("the spool was handed over to another process")]
    HandedOver,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Durably stored under this sequence number.
    Stored(u64),
    /// The same dedupe key is already waiting, or was delivered within the dedupe
    /// window; nothing stored.
    Duplicate,
}

/// What is known of a dedupe key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdState {
    Delivered(StoredAnswer),
    Pending,
    Unknown,
}

/// A record waiting for delivery.
#[derive(Debug)]
pub struct Waiting {
    pub seq: u64,
    /// Encoded length, for the spool's byte count.
    pub len: u64,
    /// The record, or its raw bytes if they cannot be decoded.
    pub record: Result<Record, Vec<u8>>,
    /// Its failed delivery attempts so far.
    pub failures: Failures,
}

/// How a delivery ended, for [`Spool::finish`].
#[derive(Debug, Clone)]
pub enum Finished {
    /// The upstream answered; keep the answer for deduplication when the record has a dedupe key.
    Delivered(StoredAnswer),
    /// A permanent failure: move the record to the dead letters.
    Dead,
}

/// Depth of one queue.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Depth {
    pub entries: u64,
    pub bytes: u64,
}

struct Counters {
    entries: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    /// Bytes of appends sent to the writer and not yet committed or refused.
    reserved: AtomicU64,
    notify: [Notify; 2],
    /// Arrival (unix ms) of the record at the head of each queue, as delivery last read
    /// it; 0 when unknown or empty.
    head_arrival_ms: [AtomicU64; 2],
    /// Entries and bytes of kept answers ([0]) and dead letters ([1]), as committed.
    kept: [[AtomicU64; 2]; 2],
}

impl Counters {
    /// Bytes of undelivered records, as committed.
    fn record_bytes(&self) -> u64 {
        self.bytes.iter().map(|b| b.load(Ordering::Acquire)).sum()
    }

    fn set_kept(&self, kept: Kept) {
        for (slot, usage) in self.kept.iter().zip([kept.answers, kept.dead_letters]) {
            slot[0].store(usage.entries, Ordering::Relaxed);
            slot[1].store(usage.bytes, Ordering::Relaxed);
        }
    }

    fn kept(&self) -> Kept {
        let usage = |i: usize| Usage {
            entries: self.kept[i][0].load(Ordering::Relaxed),
            bytes: self.kept[i][1].load(Ordering::Relaxed),
        };
        Kept {
            answers: usage(0),
            dead_letters: usage(1),
        }
    }
}

/// The spool. One per process.
pub struct Spool {
    /// `None` once handed over to another process.
    db: RwLock<Option<Arc<Database>>>,
    /// `None` only while dropping, so the writer sees the channel close.
    ops: Option<Sender<Op>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    counters: Arc<Counters>,
    max_bytes: u64,
    dedupe_ms: u64,
    path: PathBuf,
}

impl Spool {
    /// Opens (or creates) `<dir>/spool.redb` and starts the writer thread.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        dedupe_ms: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SpoolError> {
        let path = dir.join(FILE_NAME);
        let db = open::create_or_set_aside(dir, &metrics)?;
        let counters = Arc::new(Counters {
            entries: Default::default(),
            bytes: Default::default(),
            reserved: AtomicU64::new(0),
            notify: Default::default(),
            head_arrival_ms: Default::default(),
            kept: Default::default(),
        });
        let kept = open::recount(&db, &counters)?;
        counters.set_kept(kept);
        let db = Arc::new(db);
        let (ops, rx) = channel(OPS_QUEUE);
        let state = Writer {
            db: db.clone(),
            counters: counters.clone(),
            metrics,
            max_bytes,
            kept,
        };
        let writer = std::thread::Builder::new()
            .name("cdn-edge spool writer".into())
            .spawn(move || state.run(rx))
            .map_err(|e| SpoolError::Storage(e.to_string()))?;
        Ok(Self {
            db: RwLock::new(Some(db)),
            ops: Some(ops),
            writer: Mutex::new(Some(writer)),
            counters,
            max_bytes,
            dedupe_ms,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<Arc<Database>, SpoolError> {
        self.db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(SpoolError::HandedOver)
    }

    /// Whether [`Spool::hand_over_blocking`] has closed the store.
    pub fn is_handed_over(&self) -> bool {
        self.db.read().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// Commits what is pending, stops the writer and closes the store so that another
    /// process (the one taking over in an upgrade) can open it. Later appends and reads
    /// fail, and are answered 503. Blocking: call outside the async runtime.
    pub fn hand_over_blocking(&self) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        let ops = self.ops.as_ref().ok_or_else(stopped)?;
        ops.blocking_send(Op::Close { done })
            .map_err(|_| stopped())?;
        let closed = wait.blocking_recv().map_err(|_| stopped())?;
        // The writer has answered; once it has returned, its handle on the store is gone.
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            let _ = w.join();
        }
        self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        closed
    }

    /// Durably appends a record; returns once it is committed (or refused).
    pub async fn append(&self, queue: Queue, record: &Record) -> Result<Appended, SpoolError> {
        let encoded = record.encode();
        let len = encoded.len() as u64;
        // Reserve first, so concurrent appends cannot all pass the check together.
        let reserved = self.counters.reserved.fetch_add(len, Ordering::AcqRel) + len;
        let stored = self.counters.record_bytes();
        if stored + reserved > self.max_bytes {
            self.counters.reserved.fetch_sub(len, Ordering::AcqRel);
            return Err(SpoolError::Full);
        }
        let (done, wait) = oneshot::channel();
        let op = Op::Append {
            queue,
            record: encoded,
            dedupe_key: record.dedupe_key.clone(),
            delivered_since_ms: unix_ms().saturating_sub(self.dedupe_ms),
            done,
        };
        self.send(op).await?;
        committed(wait).await
    }

    /// Keeps a waiting record's failed attempts, without waiting for the commit (nor an
    /// fsync of its own).
    pub async fn note_failures(&self, seq: u64, failures: Failures) -> Result<(), SpoolError> {
        self.send(Op::Failed { seq, failures }).await
    }

    /// Queues the end of a record's delivery without waiting for its commit. Removals
    /// need no fsync of their own: if one is lost in a crash the record is delivered
    /// again (at-least-once), so they ride along with the next durable commit.
    pub async fn finish_later(
        &self,
        queue: Queue,
        seq: u64,
        len: u64,
        dedupe_key: Option<String>,
        how: Finished,
    ) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        let (done, committed) = oneshot::channel();
        self.send(Op::Finish {
            queue,
            seq,
            len,
            dedupe_key,
            how,
            done,
        })
        .await?;
        Ok(committed)
    }

    /// Ends a record's delivery and waits for the removal to be committed.
    pub async fn finish(
        &self,
        queue: Queue,
        seq: u64,
        len: u64,
        dedupe_key: Option<String>,
        how: Finished,
    ) -> Result<(), SpoolError> {
        let rx = self.finish_later(queue, seq, len, dedupe_key, how).await?;
        committed(rx).await
    }

    /// Keeps the answer to a request delivered without spooling, for deduplication;
    /// returns once committed, so a retry that follows finds it.
    pub async fn remember(
        &self,
        queue: Queue,
        dedupe_key: String,
        answer: StoredAnswer,
    ) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        self.send(Op::Remember {
            queue,
            dedupe_key,
            answer,
            done,
        })
        .await?;
        committed(wait).await
    }

    /// Forgets every delivered answer stored before `before_ms` (its dedupe window is
    /// over), in transactions of at most [`PURGE_CHUNK`] so that appends queued
    /// meanwhile are committed in between; returns how many index entries it went
    /// through.
    pub async fn purge(&self, before_ms: u64) -> Result<u64, SpoolError> {
        let mut total = 0;
        loop {
            let (done, wait) = oneshot::channel();
            self.send(Op::Purge { before_ms, done }).await?;
            let n = committed(wait).await?;
            total += n as u64;
            if n < PURGE_CHUNK {
                return Ok(total);
            }
        }
    }

    async fn send(&self, op: Op) -> Result<(), SpoolError> {
        let ops = self.ops.as_ref().expect("open until dropped");
        ops.send(op).await.map_err(|_| stopped())
    }

    /// Makes every commit so far durable (removals and remembered answers are committed
    /// without an fsync of their own); called at shutdown.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        self.send(Op::Flush { done }).await?;
        committed(wait).await
    }

    /// The oldest waiting record of a queue. Blocking (reads the store): call from a
    /// blocking context.
    pub fn oldest_blocking(&self, queue: Queue) -> Result<Option<Waiting>, SpoolError> {
        self.next_after_blocking(queue, None)
    }

    /// The oldest waiting record after sequence `after` (a delivery loop that has not
    /// seen its last removal committed yet). Blocking.
    pub fn next_after_blocking(
        &self,
        queue: Queue,
        after: Option<u64>,
    ) -> Result<Option<Waiting>, SpoolError> {
        let read = self.db()?.begin_read().map_err(storage)?;
        let table = read.open_table(queue.table()).map_err(storage)?;
        let from = after.map_or(0, |s| s.saturating_add(1));
        let first = table
            .range(from..)
            .map_err(storage)?
            .next()
            .transpose()
            .map_err(storage)?;
        let Some((k, v)) = first else {
            self.counters.head_arrival_ms[queue.index()].store(0, Ordering::Relaxed);
            return Ok(None);
        };
        let (seq, raw) = (k.value(), v.value());
        let failures = read
            .open_table(FAILURES)
            .map_err(storage)?
            .get(seq)
            .map_err(storage)?
            .map(|f| {
                let (answered, tries, first_ms) = f.value();
                Failures {
                    answered,
                    tries,
                    first_ms,
                }
            })
            .unwrap_or_default();
        let record = Record::decode(raw).map_err(|_| raw.to_vec());
        if let Ok(r) = &record {
            self.counters.head_arrival_ms[queue.index()].store(r.arrival_ms, Ordering::Relaxed);
        }
        Ok(Some(Waiting {
            seq,
            len: raw.len() as u64,
            record,
            failures,
        }))
    }

    /// Age of the oldest record waiting in `queue` (as delivery last read it) at
    /// `now_ms`; 0 when none waits.
    pub fn oldest_age_ms(&self, queue: Queue, now_ms: u64) -> u64 {
        let head = self.counters.head_arrival_ms[queue.index()].load(Ordering::Relaxed);
        if head == 0 || self.depth(queue).entries == 0 {
            return 0;
        }
        now_ms.saturating_sub(head)
    }

    /// What the spool knows of a dedupe key: delivered within `window_ms` (with the
    /// upstream's answer), waiting for delivery, or nothing. Blocking.
    pub fn id_state_blocking(
        &self,
        queue: Queue,
        dedupe_key: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> IdState {
        if let Some(a) = self.delivered_blocking(queue, dedupe_key, now_ms, window_ms) {
            return IdState::Delivered(a);
        }
        let pending = self
            .db()
            .ok()
            .and_then(|db| db.begin_read().ok())
            .and_then(|read| {
                let table = read.open_table(PENDING).ok()?;
                table
                    .get(queue.table_key(dedupe_key).as_str())
                    .ok()
                    .flatten()
                    .map(|_| ())
            });
        match pending {
            Some(()) => IdState::Pending,
            None => IdState::Unknown,
        }
    }

    /// The stored answer for a dedupe key delivered within `window_ms`. Blocking.
    pub fn delivered_blocking(
        &self,
        queue: Queue,
        dedupe_key: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Option<StoredAnswer> {
        let read = self.db().ok()?.begin_read().ok()?;
        let table = read.open_table(DELIVERED).ok()?;
        let got = table.get(queue.table_key(dedupe_key).as_str()).ok()??;
        let answer = StoredAnswer::decode(got.value()).ok()?;
        (now_ms.saturating_sub(answer.at_ms) < window_ms).then_some(answer)
    }

    /// Delivered answers and dead letters held, as of the last commit.
    pub fn kept(&self) -> Kept {
        self.counters.kept()
    }

    pub fn depth(&self, queue: Queue) -> Depth {
        Depth {
            entries: self.counters.entries[queue.index()].load(Ordering::Relaxed),
            bytes: self.counters.bytes[queue.index()].load(Ordering::Relaxed),
        }
    }

    /// Resolves when something may have been appended to `queue`.
    pub async fn appended(&self, queue: Queue) {
        self.counters.notify[queue.index()].notified().await;
    }
}

impl Drop for Spool {
    /// Lets the writer finish what it has and close the store before returning, so the
    /// file can be opened again at once.
    fn drop(&mut self) {
        self.ops.take();
        let writer = self.writer.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = writer.take() {
            let _ = w.join();
        }
    }
}

/// The writer's answer to an operation.
async fn committed<T>(rx: oneshot::Receiver<Result<T, SpoolError>>) -> Result<T, SpoolError> {
    rx.await.map_err(|_| stopped())?
}

fn stopped() -> SpoolError {
    SpoolError::Storage("spool writer stopped".into())
}

fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
