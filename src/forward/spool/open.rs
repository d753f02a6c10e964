//! Opening the spool store: creating it, setting a damaged file aside, and counting
//! what it holds (constraints 7 and 10 in mod.rs).

use std::path::Path;
use std::sync::atomic::Ordering;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::budget::{count_answers, count_dead_letters, Kept};
use super::{
    storage, Counters, Queue, Record, SpoolError, DEAD, DELIVERED, DELIVERED_AT, EVENTS, FAILURES,
    FILE_NAME, LOGBLOB, META, PENDING, SPOOL_CACHE_BYTES,
};
use crate::metrics::Metrics;
use crate::redb_file::{self, OpenError};

/// Opens (or creates) `<dir>/spool.redb`. A file that is not a redb store, or one redb
/// reports corrupted, is renamed `spool.redb.damaged-<ms>`, counted, and a new one
/// created.
pub(super) fn create_or_set_aside(dir: &Path, metrics: &Metrics) -> Result<Database, SpoolError> {
    let (db, aside) =
        redb_file::create_or_set_aside(dir, FILE_NAME, SPOOL_CACHE_BYTES).map_err(|e| match e {
            OpenError::InUse(m) => SpoolError::InUse(m),
            OpenError::Storage(m) => SpoolError::Storage(m),
        })?;
    if aside.is_some() {
        metrics.spool_corrupt.inc();
    }
    Ok(db)
}

/// Creates missing tables, then counts the records of each queue, the arrival of each
/// queue's oldest record and what is kept after delivery.
pub(super) fn recount(db: &Database, counters: &Counters) -> Result<Kept, SpoolError> {
    let txn = db.begin_write().map_err(storage)?;
    for t in [EVENTS, LOGBLOB, DEAD] {
        txn.open_table(t).map_err(storage)?;
    }
    txn.open_table(PENDING).map_err(storage)?;
    txn.open_table(DELIVERED).map_err(storage)?;
    txn.open_table(DELIVERED_AT).map_err(storage)?;
    txn.open_table(META).map_err(storage)?;
    txn.open_table(FAILURES).map_err(storage)?;
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
        let head = table.first().map_err(storage)?;
        let arrival = head.and_then(|(_, v)| Record::decode(v.value()).ok());
        counters.head_arrival_ms[q.index()]
            .store(arrival.map_or(0, |r| r.arrival_ms), Ordering::Relaxed);
    }
    Ok(Kept {
        answers: count_answers(&read.open_table(DELIVERED).map_err(storage)?)?,
        dead_letters: count_dead_letters(&read.open_table(DEAD).map_err(storage)?)?,
    })
}
