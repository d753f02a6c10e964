//! The spool's single writer thread: takes every operation waiting at that moment and
//! commits them in one transaction (group commit).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable};
use tokio::sync::mpsc::Receiver;
use tokio::sync::oneshot;

use super::budget::{insert_dead_letter, kept_cap, trim_dead_letters, AnswerTables, Evicted, Kept};
use super::{
    storage, Appended, Counters, Finished, Queue, SpoolError, DEAD, DELIVERED, DELIVERED_AT,
    EVENTS, FAILURES, LOGBLOB, MAX_BATCH, META, PENDING, PURGE_CHUNK,
};
use crate::forward::record::StoredAnswer;
use crate::forward::retry::Failures;
use crate::metrics::Metrics;

pub(super) enum Op {
    Append {
        queue: Queue,
        record: Vec<u8>,
        dedupe_key: Option<String>,
        /// A delivered answer for the same id stored at or after this time (unix ms)
        /// means the request was already delivered: nothing is stored.
        delivered_since_ms: u64,
        done: oneshot::Sender<Result<Appended, SpoolError>>,
    },
    Finish {
        queue: Queue,
        seq: u64,
        len: u64,
        dedupe_key: Option<String>,
        how: Finished,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Forgets up to `PURGE_CHUNK` answers stored before `before_ms`; answers how many
    /// it went through.
    Purge {
        before_ms: u64,
        done: oneshot::Sender<Result<usize, SpoolError>>,
    },
    /// Keeps the failed attempts of a waiting record.
    Failed { seq: u64, failures: Failures },
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
        dedupe_key: String,
        answer: StoredAnswer,
        done: oneshot::Sender<Result<(), SpoolError>>,
    },
}

/// Outcome of one op inside a committed batch.
enum Outcome {
    Appended(Queue, u64, Appended),
    Finished(Queue, u64),
    Purged(usize),
    Nothing,
}

/// The writer thread's state: the store, the shared counters and the kept bytes it
/// alone changes.
pub(super) struct Writer {
    pub db: Arc<Database>,
    pub counters: Arc<Counters>,
    pub metrics: Arc<Metrics>,
    pub max_bytes: u64,
    /// Kept answers and dead letters as of the last commit (counted at open).
    pub kept: Kept,
}

impl Writer {
    pub fn run(mut self, mut rx: Receiver<Op>) {
        let counters = self.counters.clone();
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let closing = batch.iter().any(|op| matches!(op, Op::Close { .. }));
            let (mut kept, mut evicted) = (self.kept, Evicted::default());
            let committed = self.commit(&batch, &mut kept, &mut evicted);
            self.metrics.spool_commits.inc();
            let mut woke = [false; 2];
            match committed {
                Ok(outcomes) => {
                    self.kept = kept;
                    counters.set_kept(kept);
                    self.count_evictions(evicted);
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
                            (Op::Purge { done, .. }, Outcome::Purged(n)) => {
                                let _ = done.send(Ok(n));
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
                            Op::Finish { done, .. } | Op::Remember { done, .. } => {
                                let _ = done.send(Err(e.clone()));
                            }
                            Op::Purge { done, .. } => {
                                let _ = done.send(Err(e.clone()));
                            }
                            Op::Failed { .. } => {}
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

    fn count_evictions(&self, evicted: Evicted) {
        if evicted.answers > 0 {
            self.metrics.spool_answers.evicted.inc_by(evicted.answers);
            tracing::debug!(
                evicted = evicted.answers,
                "spool budget: oldest delivered answers forgotten early"
            );
        }
        if evicted.dead_letters > 0 {
            self.metrics
                .spool_dead_letters
                .evicted
                .inc_by(evicted.dead_letters);
            tracing::warn!(
                evicted = evicted.dead_letters,
                "spool budget: oldest dead letters dropped"
            );
        }
    }

    /// Applies a batch in one transaction; `kept` and `evicted` are updated as it goes
    /// and only count once the commit succeeded.
    fn commit(
        &self,
        batch: &[Op],
        kept: &mut Kept,
        evicted: &mut Evicted,
    ) -> Result<Vec<Outcome>, SpoolError> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        // Only appends are acknowledged as durable; a batch of removals (and purges) is
        // persisted by the next durable commit, or redone after a crash.
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
        // A durable commit also saves the allocator state, so that the open after a crash
        // does not walk the whole store to rebuild it (redb's "quick repair").
        txn.set_quick_repair(durable);
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut pending = txn.open_table(PENDING).map_err(storage)?;
            let mut answers = AnswerTables {
                delivered: txn.open_table(DELIVERED).map_err(storage)?,
                delivered_at: txn.open_table(DELIVERED_AT).map_err(storage)?,
            };
            let mut dead = txn.open_table(DEAD).map_err(storage)?;
            let mut failures = txn.open_table(FAILURES).map_err(storage)?;
            let mut queues = [
                txn.open_table(EVENTS).map_err(storage)?,
                txn.open_table(LOGBLOB).map_err(storage)?,
            ];
            let mut next = meta
                .get("next_seq")
                .map_err(storage)?
                .map_or(1, |v| v.value());
            // Record bytes once this batch is applied, for the kept budget.
            let mut record_bytes = self.counters.record_bytes();
            for op in batch {
                match op {
                    Op::Append {
                        queue,
                        record,
                        dedupe_key,
                        delivered_since_ms,
                        ..
                    } => {
                        let key = dedupe_key.as_deref().map(|id| queue.table_key(id));
                        if let Some(k) = &key {
                            // Checked here too, where the writer sees every removal: a
                            // retry racing its first copy's delivery is not stored again.
                            let delivered_recently = answers
                                .delivered
                                .get(k.as_str())
                                .map_err(storage)?
                                .and_then(|v| StoredAnswer::decode(v.value()).ok())
                                .is_some_and(|a| a.at_ms >= *delivered_since_ms);
                            if delivered_recently
                                || pending.get(k.as_str()).map_err(storage)?.is_some()
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
                        record_bytes += record.len() as u64;
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
                        dedupe_key,
                        how,
                        ..
                    } => {
                        let removed = queues[queue.index()].remove(*seq).map_err(storage)?;
                        let record = removed.map(|v| v.value().to_vec());
                        failures.remove(*seq).map_err(storage)?;
                        if let Some(id) = dedupe_key {
                            let k = queue.table_key(id);
                            pending.remove(k.as_str()).map_err(storage)?;
                            if let Finished::Delivered(answer) = how {
                                // A log blob retry is answered 202 whatever the upstream
                                // said: keep only that it was delivered, and when.
                                let answer = match queue {
                                    Queue::Events => answer.clone(),
                                    Queue::LogBlob => StoredAnswer {
                                        at_ms: answer.at_ms,
                                        status: answer.status,
                                        content_type: None,
                                        body: bytes::Bytes::new(),
                                    },
                                };
                                answers.insert(&k, &answer, &mut kept.answers)?;
                            }
                        }
                        if let (Finished::Dead, Some(rec)) = (how, &record) {
                            insert_dead_letter(&mut dead, *seq, rec, &mut kept.dead_letters)?;
                        }
                        let len = if record.is_some() { *len } else { 0 };
                        record_bytes = record_bytes.saturating_sub(len);
                        outcomes.push(Outcome::Finished(*queue, len));
                    }
                    Op::Remember {
                        queue,
                        dedupe_key,
                        answer,
                        ..
                    } => {
                        let k = queue.table_key(dedupe_key);
                        answers.insert(&k, answer, &mut kept.answers)?;
                        outcomes.push(Outcome::Nothing);
                    }
                    Op::Failed { seq, failures: f } => {
                        // Only for a record still waiting: never a stray entry.
                        let waiting = queues
                            .iter()
                            .map(|t| t.get(*seq).map(|v| v.is_some()))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(storage)?;
                        if waiting.contains(&true) {
                            failures
                                .insert(*seq, (f.answered, f.tries, f.first_ms))
                                .map_err(storage)?;
                        }
                        outcomes.push(Outcome::Nothing);
                    }
                    Op::Flush { .. } | Op::Close { .. } => outcomes.push(Outcome::Nothing),
                    Op::Purge { before_ms, .. } => {
                        let n = answers.purge(*before_ms, PURGE_CHUNK, &mut kept.answers)?;
                        outcomes.push(Outcome::Purged(n));
                    }
                }
            }
            // Within budget at every commit: the oldest kept entries make room, never
            // the records waiting for delivery.
            let cap = kept_cap(self.max_bytes, record_bytes);
            evicted.answers += answers.trim(cap, &mut kept.answers)?;
            evicted.dead_letters += trim_dead_letters(&mut dead, cap, &mut kept.dead_letters)?;
            meta.insert("next_seq", next).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(outcomes)
    }
}
