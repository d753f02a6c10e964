//! Durable spool for events and log blobs, on redb (an embedded, crash-safe B-tree store).
//!
//! # Design constraints
//! 1. A request is acknowledged only after the transaction that holds it has committed
//!    with `Durability::Immediate` (fsync): it survives `kill -9` and power loss.
//! 2. Group commit: one writer thread takes every append and removal waiting at that
//!    moment and commits them in one transaction, so many requests share one fsync.
//! 3. Each queue is ordered by a sequence number; delivery takes the lowest first, so
//!    records are delivered in arrival order per route. A record is removed only after
//!    its delivery ended (a 2xx, or a permanent failure, which moves it to the dead
//!    letters table).
//! 4. The spool is bounded by `forward.spool_max_bytes` of record bytes; an append that
//!    would pass it is refused (the client gets 503), never dropped silently.
//! 5. A request id (`reqId`) is kept while its record waits (a retry is not spooled
//!    twice) and, once delivered, with the upstream's answer for deduplication.
//! 6. A spool file that cannot be opened (damaged outside of a crash) is moved aside,
//!    counted, and a new one started: the edge keeps serving.
//!
//! # Tables
//! ```text
//! events, logblob   u64 sequence -> Record (see record.rs)
//! dead_letters      u64 sequence -> Record that got a permanent failure
//! pending           "<queue>:<reqId>" -> sequence
//! delivered         "<queue>:<reqId>" -> StoredAnswer
//! meta              "next_seq" -> next sequence number
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc::{channel, Receiver, Sender};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    StorageError, TableDefinition,
};
use tokio::sync::{oneshot, Notify};

use super::record::{Record, StoredAnswer};
use crate::metrics::Metrics;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const LOGBLOB: TableDefinition<u64, &[u8]> = TableDefinition::new("logblob");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
const PENDING: TableDefinition<&str, u64> = TableDefinition::new("pending");
const DELIVERED: TableDefinition<&str, &[u8]> = TableDefinition::new("delivered");
/// `delivered` by time, so the purge reads only what expired.
const DELIVERED_AT: TableDefinition<(u64, &str), ()> = TableDefinition::new("delivered_at");
/// Entries the purge removes per transaction at most, so appends never wait long.
const PURGE_CHUNK: usize = 10_000;
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The store's file name inside `forward.spool_dir`.
pub const FILE_NAME: &str = "spool.redb";
/// Operations waiting for the writer at most; more make appends wait (backpressure).
const OPS_QUEUE: usize = 4096;
/// Dead letters kept at most (the oldest are dropped first, with a warning).
pub const DEAD_LETTERS_MAX: u64 = 10_000;
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

    fn id_key(self, req_id: &str) -> String {
        format!("{}:{req_id}", self.label())
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
    /// The same request id is already waiting, or was delivered within the dedupe
    /// window; nothing stored.
    Duplicate,
}

/// What is known of a request id.
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
}

/// How a delivery ended, for [`Spool::finish`].
#[derive(Debug, Clone)]
pub enum Finished {
    /// The upstream answered; keep the answer for deduplication when there is a reqId.
    Delivered(StoredAnswer),
    /// A permanent failure: move the record to the dead letters.
    Dead,
}

enum Op {
    Append {
        queue: Queue,
        record: Vec<u8>,
        req_id: Option<String>,
        /// A delivered answer for the same id stored at or after this time (unix ms)
        /// means the request was already delivered: nothing is stored.
        delivered_since_ms: u64,
        done: oneshot::Sender<Result<Appended, SpoolError>>,
    },
    Finish {
        queue: Queue,
        seq: u64,
        len: u64,
        req_id: Option<String>,
        how: Finished,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
    Purge {
        before_ms: u64,
    },
    /// Commits durably (an empty transaction with an fsync).
    Flush {
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Commits durably, then stops the writer and lets go of the store.
    Close {
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Keeps the upstream's answer to a request relayed at once (never spooled).
    Remember {
        queue: Queue,
        req_id: String,
        answer: StoredAnswer,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
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
        std::fs::create_dir_all(dir)
            .map_err(|e| SpoolError::Storage(format!("{}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        // redb's own page cache; the default (1 GiB) would compete with the video tier.
        let mut builder = Database::builder();
        builder.set_cache_size(SPOOL_CACHE_BYTES);
        let db = match builder.create(&path) {
            Ok(db) => db,
            Err(e @ (DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch)) => {
                return Err(SpoolError::InUse(format!(
                    "{}: in use by another process: {e}",
                    path.display()
                )))
            }
            // Only a file that is not a redb store, or one redb reports corrupted, is
            // set aside; anything else (an upgrade needed, I/O errors) stops the start
            // rather than losing what the file holds.
            Err(e)
                if !matches!(&e, DatabaseError::Storage(StorageError::Corrupted(_)))
                    && !matches!(&e, DatabaseError::Storage(StorageError::Io(io))
                    if io.kind() == std::io::ErrorKind::InvalidData) =>
            {
                return Err(SpoolError::Storage(format!("{}: {e}", path.display())))
            }
            Err(e) => {
                let aside = dir.join(format!("spool.redb.damaged-{}", unix_ms()));
                tracing::error!(path = %path.display(), moved_to = %aside.display(), error = %e,
                    "spool cannot be opened; moving it aside and starting a new one");
                metrics.spool_corrupt.inc();
                std::fs::rename(&path, &aside).map_err(|e| SpoolError::Storage(e.to_string()))?;
                builder.create(&path).map_err(storage)?
            }
        };
        let counters = Arc::new(Counters {
            entries: Default::default(),
            bytes: Default::default(),
            reserved: AtomicU64::new(0),
            notify: Default::default(),
        });
        {
            let txn = db.begin_write().map_err(storage)?;
            for t in [EVENTS, LOGBLOB, DEAD] {
                txn.open_table(t).map_err(storage)?;
            }
            txn.open_table(PENDING).map_err(storage)?;
            txn.open_table(DELIVERED).map_err(storage)?;
            txn.open_table(DELIVERED_AT).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
            txn.commit().map_err(storage)?;
            let read = db.begin_read().map_err(storage)?;
            for q in Queue::ALL {
                let table = read.open_table(q.table()).map_err(storage)?;
                let (mut n, mut bytes) = (0, 0);
                for item in table.iter().map_err(storage)? {
                    let (_, v) = item.map_err(storage)?;
                    n += 1;
                    bytes += v.value().len() as u64;
                }
                counters.entries[q.index()].store(n, Ordering::Relaxed);
                counters.bytes[q.index()].store(bytes, Ordering::Relaxed);
            }
        }
        let db = Arc::new(db);
        let (ops, rx) = channel(OPS_QUEUE);
        let (wdb, wcounters) = (db.clone(), counters.clone());
        let writer = std::thread::Builder::new()
            .name("cdn-edge spool writer".into())
            .spawn(move || run_writer(wdb, rx, wcounters, metrics))
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
        let stored: u64 = self
            .counters
            .bytes
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .sum();
        if stored + reserved > self.max_bytes {
            self.counters.reserved.fetch_sub(len, Ordering::AcqRel);
            return Err(SpoolError::Full);
        }
        let (done, wait) = oneshot::channel();
        let op = Op::Append {
            queue,
            record: encoded,
            req_id: record.req_id.clone(),
            delivered_since_ms: unix_ms().saturating_sub(self.dedupe_ms),
            done,
        };
        self.send(op).await?;
        committed(wait).await
    }

    /// Queues the end of a record's delivery without waiting for its commit. Removals
    /// need no fsync of their own: if one is lost in a crash the record is delivered
    /// again (at-least-once), so they ride along with the next durable commit.
    pub async fn finish_later(
        &self,
        queue: Queue,
        seq: u64,
        len: u64,
        req_id: Option<String>,
        how: Finished,
    ) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        let (done, committed) = oneshot::channel();
        self.send(Op::Finish {
            queue,
            seq,
            len,
            req_id,
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
        req_id: Option<String>,
        how: Finished,
    ) -> Result<(), SpoolError> {
        let rx = self.finish_later(queue, seq, len, req_id, how).await?;
        committed(rx).await
    }

    /// Keeps the answer to a request delivered without spooling, for deduplication;
    /// returns once committed, so a retry that follows finds it.
    pub async fn remember(
        &self,
        queue: Queue,
        req_id: String,
        answer: StoredAnswer,
    ) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        self.send(Op::Remember {
            queue,
            req_id,
            answer,
            done,
        })
        .await?;
        committed(wait).await
    }

    /// Forgets delivered answers older than `before_ms` (their dedupe window is over).
    pub fn purge(&self, before_ms: u64) {
        if let Some(ops) = &self.ops {
            let _ = ops.try_send(Op::Purge { before_ms });
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
        Ok(first.map(|(k, v)| {
            let raw = v.value();
            Waiting {
                seq: k.value(),
                len: raw.len() as u64,
                record: Record::decode(raw).map_err(|_| raw.to_vec()),
            }
        }))
    }

    /// What the spool knows of a request id: delivered within `window_ms` (with the
    /// upstream's answer), waiting for delivery, or nothing. Blocking.
    pub fn id_state_blocking(
        &self,
        queue: Queue,
        req_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> IdState {
        if let Some(a) = self.delivered_blocking(queue, req_id, now_ms, window_ms) {
            return IdState::Delivered(a);
        }
        let pending = self
            .db()
            .ok()
            .and_then(|db| db.begin_read().ok())
            .and_then(|read| {
                let table = read.open_table(PENDING).ok()?;
                table
                    .get(queue.id_key(req_id).as_str())
                    .ok()
                    .flatten()
                    .map(|_| ())
            });
        match pending {
            Some(()) => IdState::Pending,
            None => IdState::Unknown,
        }
    }

    /// The stored answer for a request id delivered within `window_ms`. Blocking.
    pub fn delivered_blocking(
        &self,
        queue: Queue,
        req_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Option<StoredAnswer> {
        let read = self.db().ok()?.begin_read().ok()?;
        let table = read.open_table(DELIVERED).ok()?;
        let got = table.get(queue.id_key(req_id).as_str()).ok()??;
        let answer = StoredAnswer::decode(got.value()).ok()?;
        (now_ms.saturating_sub(answer.at_ms) < window_ms).then_some(answer)
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

/// Keeps an answer under its key and in the time index.
fn remember_answer(
    delivered: &mut redb::Table<&str, &[u8]>,
    delivered_at: &mut redb::Table<(u64, &str), ()>,
    key: &str,
    answer: &StoredAnswer,
) -> Result<(), SpoolError> {
    delivered
        .insert(key, answer.encode().as_slice())
        .map_err(storage)?;
    delivered_at
        .insert((answer.at_ms, key), ())
        .map_err(storage)?;
    Ok(())
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

/// Outcome of one op inside a committed batch.
enum Outcome {
    Appended(Queue, u64, Appended),
    Finished(Queue, u64),
    Nothing,
}

fn run_writer(
    db: Arc<Database>,
    mut rx: Receiver<Op>,
    counters: Arc<Counters>,
    metrics: Arc<Metrics>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let closing = batch.iter().any(|op| matches!(op, Op::Close { .. }));
        let committed = commit(&db, &batch);
        metrics.spool_commits.inc();
        let mut woke = [false; 2];
        match committed {
            Ok(outcomes) => {
                for (op, outcome) in batch.into_iter().zip(outcomes) {
                    match (op, outcome) {
                        (Op::Append { done, .. }, Outcome::Appended(q, len, a)) => {
                            if let Appended::Stored(_) = a {
                                counters.entries[q.index()].fetch_add(1, Ordering::Relaxed);
                                counters.bytes[q.index()].fetch_add(len, Ordering::AcqRel);
                                woke[q.index()] = true;
                            }
                            counters.reserved.fetch_sub(len, Ordering::AcqRel);
                            let _ = done.send(Ok(a));
                        }
                        (Op::Remember { done, .. }, _)
                        | (Op::Flush { done }, _)
                        | (Op::Close { done }, _) => {
                            let _ = done.send(Ok(()));
                        }
                        (Op::Finish { done, .. }, Outcome::Finished(q, len)) => {
                            if len > 0 {
                                counters.entries[q.index()].fetch_sub(1, Ordering::Relaxed);
                                counters.bytes[q.index()].fetch_sub(len, Ordering::Relaxed);
                            }
                            let _ = done.send(Ok(()));
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed");
                for op in batch {
                    match op {
                        Op::Append { done, record, .. } => {
                            counters
                                .reserved
                                .fetch_sub(record.len() as u64, Ordering::AcqRel);
                            let _ = done.send(Err(e.clone()));
                        }
                        Op::Flush { done } | Op::Close { done } => {
                            let _ = done.send(Err(e.clone()));
                        }
                        Op::Finish { done, .. } => {
                            let _ = done.send(Err(e.clone()));
                        }
                        Op::Remember { done, .. } => {
                            let _ = done.send(Err(e.clone()));
                        }
                        Op::Purge { .. } => {}
                    }
                }
            }
        }
        for q in Queue::ALL {
            if woke[q.index()] {
                // notify_one stores a permit, so a worker that was between checks still wakes.
                counters.notify[q.index()].notify_one();
            }
        }
        if closing {
            return;
        }
    }
}

fn commit(db: &Database, batch: &[Op]) -> Result<Vec<Outcome>, SpoolError> {
    let mut txn = db.begin_write().map_err(storage)?;
    // Only appends are acknowledged as durable; a batch of removals (and remembered
    // answers) is persisted by the next durable commit, or redone after a crash.
    let durable = batch.iter().any(|op| {
        matches!(
            op,
            Op::Append { .. } | Op::Remember { .. } | Op::Flush { .. } | Op::Close { .. }
        )
    });
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })
    .map_err(storage)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut pending = txn.open_table(PENDING).map_err(storage)?;
        let mut delivered = txn.open_table(DELIVERED).map_err(storage)?;
        let mut delivered_at = txn.open_table(DELIVERED_AT).map_err(storage)?;
        let mut dead = txn.open_table(DEAD).map_err(storage)?;
        let mut queues = [
            txn.open_table(EVENTS).map_err(storage)?,
            txn.open_table(LOGBLOB).map_err(storage)?,
        ];
        let mut next = meta
            .get("next_seq")
            .map_err(storage)?
            .map_or(1, |v| v.value());
        for op in batch {
            match op {
                Op::Append {
                    queue,
                    record,
                    req_id,
                    delivered_since_ms,
                    ..
                } => {
                    let key = req_id.as_deref().map(|id| queue.id_key(id));
                    if let Some(k) = &key {
                        // Checked here too, where the writer sees every removal: a
                        // retry racing its first copy's delivery is not stored again.
                        let delivered_recently = delivered
                            .get(k.as_str())
                            .map_err(storage)?
                            .and_then(|v| StoredAnswer::decode(v.value()).ok())
                            .is_some_and(|a| a.at_ms >= *delivered_since_ms);
                        if delivered_recently || pending.get(k.as_str()).map_err(storage)?.is_some()
                        {
                            outcomes.push(Outcome::Appended(
                                *queue,
                                record.len() as u64,
                                Appended::Duplicate,
                            ));
                            continue;
                        }
                    }
                    let seq = next;
                    next += 1;
                    queues[queue.index()]
                        .insert(seq, record.as_slice())
                        .map_err(storage)?;
                    if let Some(k) = &key {
                        pending.insert(k.as_str(), seq).map_err(storage)?;
                    }
                    outcomes.push(Outcome::Appended(
                        *queue,
                        record.len() as u64,
                        Appended::Stored(seq),
                    ));
                }
                Op::Finish {
                    queue,
                    seq,
                    len,
                    req_id,
                    how,
                    ..
                } => {
                    let removed = queues[queue.index()].remove(*seq).map_err(storage)?;
                    let record = removed.map(|v| v.value().to_vec());
                    if let Some(id) = req_id {
                        let k = queue.id_key(id);
                        pending.remove(k.as_str()).map_err(storage)?;
                        if let Finished::Delivered(answer) = how {
                            // A log blob retry is answered 202 whatever the upstream
                            // said: keep only that it was delivered, and when.
                            let kept = match queue {
                                Queue::Events => answer.clone(),
                                Queue::LogBlob => StoredAnswer {
                                    at_ms: answer.at_ms,
                                    status: answer.status,
                                    content_type: None,
                                    body: bytes::Bytes::new(),
                                },
                            };
                            remember_answer(&mut delivered, &mut delivered_at, &k, &kept)?;
                        }
                    }
                    if let (Finished::Dead, Some(rec)) = (how, &record) {
                        dead.insert(*seq, rec.as_slice()).map_err(storage)?;
                        // Bounded: the oldest dead letters go first.
                        while dead.len().map_err(storage)? > DEAD_LETTERS_MAX {
                            if dead.pop_first().map_err(storage)?.is_none() {
                                break;
                            }
                            tracing::warn!("dead letters full; the oldest was dropped");
                        }
                    }
                    let len = if record.is_some() { *len } else { 0 };
                    outcomes.push(Outcome::Finished(*queue, len));
                }
                Op::Remember {
                    queue,
                    req_id,
                    answer,
                    ..
                } => {
                    let k = queue.id_key(req_id);
                    remember_answer(&mut delivered, &mut delivered_at, &k, answer)?;
                    outcomes.push(Outcome::Nothing);
                }
                Op::Flush { .. } | Op::Close { .. } => outcomes.push(Outcome::Nothing),
                Op::Purge { before_ms } => {
                    let old: Vec<(u64, String)> = delivered_at
                        .range((0u64, "")..(*before_ms, ""))
                        .map_err(storage)?
                        .take(PURGE_CHUNK)
                        .filter_map(|item| item.ok())
                        .map(|(k, _)| {
                            let (at, key) = k.value();
                            (at, key.to_string())
                        })
                        .collect();
                    for (at, key) in old {
                        delivered_at.remove((at, key.as_str())).map_err(storage)?;
                        // The key may have been delivered again since; keep that answer.
                        let current = delivered
                            .get(key.as_str())
                            .map_err(storage)?
                            .and_then(|v| StoredAnswer::decode(v.value()).ok());
                        if current.is_none_or(|a| a.at_ms < *before_ms) {
                            delivered.remove(key.as_str()).map_err(storage)?;
                        }
                    }
                    outcomes.push(Outcome::Nothing);
                }
            }
        }
        meta.insert("next_seq", next).map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record(id: Option<&str>, body: &'static [u8]) -> Record {
        Record {
            arrival_ms: 1,
            client_ip: "192.0.2.1".into(),
            method: "POST".into(),
            target: "/log/cadmium/logblob/1".into(),
            content_type: None,
            req_id: id.map(str::to_string),
            body: Bytes::from_static(body),
        }
    }

    fn open(dir: &Path, max: u64) -> Spool {
        Spool::open(dir, max, 600_000, Arc::new(Metrics::new())).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handed_over_spool_lets_another_open_it_and_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let old = open(dir.path(), 1 << 20);
        old.append(Queue::LogBlob, &record(Some("kept"), b"kept"))
            .await
            .unwrap();
        assert!(matches!(
            Spool::open(dir.path(), 1 << 20, 600_000, Arc::new(Metrics::new())),
            Err(SpoolError::InUse(_))
        ));
        let old = Arc::new(old);
        let o = old.clone();
        tokio::task::spawn_blocking(move || o.hand_over_blocking())
            .await
            .unwrap()
            .unwrap();
        assert!(old.is_handed_over());
        // The old handle still exists; the store is free for the next process anyway.
        let new = open(dir.path(), 1 << 20);
        assert_eq!(new.depth(Queue::LogBlob).entries, 1);
        assert!(old
            .append(Queue::LogBlob, &record(None, b"late"))
            .await
            .is_err());
        assert!(matches!(
            old.oldest_blocking(Queue::LogBlob),
            Err(SpoolError::HandedOver)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_survive_reopening_in_order_and_finish_removes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = open(dir.path(), 1 << 20);
            for body in [&b"one"[..], b"two", b"three"] {
                let leaked: &'static [u8] = Box::leak(body.to_vec().into_boxed_slice());
                assert!(matches!(
                    spool
                        .append(Queue::LogBlob, &record(None, leaked))
                        .await
                        .unwrap(),
                    Appended::Stored(_)
                ));
            }
            assert_eq!(spool.depth(Queue::LogBlob).entries, 3);
        }
        let spool = open(dir.path(), 1 << 20);
        assert_eq!(
            spool.depth(Queue::LogBlob).entries,
            3,
            "counted again at open"
        );
        let mut seen = Vec::new();
        while let Some(w) = spool.oldest_blocking(Queue::LogBlob).unwrap() {
            seen.push(w.record.unwrap().body.clone());
            spool
                .finish(Queue::LogBlob, w.seq, w.len, None, Finished::Dead)
                .await
                .unwrap();
        }
        assert_eq!(
            seen,
            vec![
                Bytes::from_static(b"one"),
                Bytes::from_static(b"two"),
                Bytes::from_static(b"three")
            ]
        );
        assert_eq!(spool.depth(Queue::LogBlob).entries, 0);
        assert_eq!(spool.depth(Queue::LogBlob).bytes, 0);
        assert!(spool.oldest_blocking(Queue::Events).unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 200);
        let mut stored = 0;
        loop {
            match spool
                .append(
                    Queue::Events,
                    &record(None, b"0123456789012345678901234567890123456789"),
                )
                .await
            {
                Ok(_) => stored += 1,
                Err(SpoolError::Full) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(stored < 100);
        }
        assert!(stored >= 1);
        assert!(spool.depth(Queue::Events).bytes <= 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_ids_are_spooled_once_and_answers_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20);
        let first = spool
            .append(Queue::Events, &record(Some("r1"), b"x"))
            .await
            .unwrap();
        let Appended::Stored(seq) = first else {
            panic!()
        };
        assert_eq!(
            spool
                .append(Queue::Events, &record(Some("r1"), b"x"))
                .await
                .unwrap(),
            Appended::Duplicate
        );
        assert_eq!(spool.depth(Queue::Events).entries, 1);
        let answer = StoredAnswer {
            at_ms: unix_ms(),
            status: 200,
            content_type: None,
            body: Bytes::from_static(b"ok"),
        };
        let len = spool.oldest_blocking(Queue::Events).unwrap().unwrap().len;
        spool
            .finish(
                Queue::Events,
                seq,
                len,
                Some("r1".into()),
                Finished::Delivered(answer.clone()),
            )
            .await
            .unwrap();
        assert_eq!(
            spool.delivered_blocking(Queue::Events, "r1", unix_ms(), 60_000),
            Some(answer)
        );
        assert_eq!(
            spool.delivered_blocking(Queue::LogBlob, "r1", unix_ms(), 60_000),
            None,
            "ids are per queue"
        );
        assert_eq!(
            spool.delivered_blocking(Queue::Events, "r1", unix_ms() + 120_000, 60_000),
            None,
            "window over"
        );
        // Delivered within the dedupe window: a retry is not stored again.
        assert_eq!(
            spool
                .append(Queue::Events, &record(Some("r1"), b"x"))
                .await
                .unwrap(),
            Appended::Duplicate
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let spool = Arc::new(Spool::open(dir.path(), 1 << 30, 600_000, metrics.clone()).unwrap());
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let s = spool.clone();
                tokio::spawn(async move {
                    s.append(Queue::LogBlob, &record(None, b"blob"))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(spool.depth(Queue::LogBlob).entries, 200);
        assert!(
            metrics.spool_commits.get() < 200,
            "{} commits for 200 appends",
            metrics.spool_commits.get()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_spool_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("spool.redb"), vec![0xA5u8; 10_000]).unwrap();
        let metrics = Arc::new(Metrics::new());
        let spool = Spool::open(dir.path(), 1 << 20, 600_000, metrics.clone()).unwrap();
        assert_eq!(metrics.spool_corrupt.get(), 1);
        assert!(spool
            .append(Queue::Events, &record(None, b"x"))
            .await
            .is_ok());
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("spool.redb.damaged-")
            })
            .count();
        assert_eq!(aside, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_forgets_only_expired_answers() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20);
        let answer = |at_ms| StoredAnswer {
            at_ms,
            status: 200,
            content_type: None,
            body: Bytes::new(),
        };
        spool
            .remember(Queue::Events, "old".into(), answer(1_000))
            .await
            .unwrap();
        spool
            .remember(Queue::Events, "new".into(), answer(9_000))
            .await
            .unwrap();
        spool
            .remember(Queue::Events, "again".into(), answer(1_000))
            .await
            .unwrap();
        spool
            .remember(Queue::Events, "again".into(), answer(9_500))
            .await
            .unwrap();
        spool.purge(5_000);
        spool.flush().await.unwrap();
        let has = |id: &str| {
            spool
                .delivered_blocking(Queue::Events, id, 10_000, u64::MAX)
                .is_some()
        };
        assert!(!has("old"));
        assert!(has("new"));
        assert!(has("again"), "delivered again after the cut-off: kept");
    }
}
