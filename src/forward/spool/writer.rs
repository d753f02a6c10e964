//! The spool's single writer thread: takes every operation waiting at that moment and
//! commits them in one transaction (group commit).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata};
use tokio::sync::mpsc::Receiver;
use tokio::sync::oneshot;

use super::{
    storage, Appended, Counters, Finished, Queue, SpoolError, DEAD, DEAD_LETTERS_MAX, DELIVERED,
    DELIVERED_AT, EVENTS, LOGBLOB, MAX_BATCH, META, PENDING, PURGE_CHUNK,
};
use crate::forward::record::StoredAnswer;
use crate::metrics::Metrics;

pub(super) enum Op {
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

/// Outcome of one op inside a committed batch.
enum Outcome {
    Appended(Queue, u64, Appended),
    Finished(Queue, u64),
    Nothing,
}

pub(super) fn run_writer(
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
