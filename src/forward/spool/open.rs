//! Opening the spool store: creating it, setting a damaged file aside, and counting
//! what it holds (constraints 7 and 10 in mod.rs).

use std::path::Path;
use std::sync::atomic::Ordering;

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, StorageError};

use super::budget::{count_answers, count_dead_letters, Kept};
use super::{
    storage, unix_ms, Counters, Queue, Record, SpoolError, DEAD, DELIVERED, DELIVERED_AT, EVENTS,
    FAILURES, LOGBLOB, META, PENDING, SPOOL_CACHE_BYTES,
};
use crate::metrics::Metrics;

/// Opens (or creates) the store at `path`. A file that is not a redb store, or one
/// redb reports corrupted, is renamed `spool.redb.damaged-<ms>`, counted, and a new
/// one created.
pub(super) fn create_or_set_aside(
    dir: &Path,
    path: &Path,
    metrics: &Metrics,
) -> Result<Database, SpoolError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| SpoolError::Storage(format!("{}: {e}", dir.display())))?;
    // redb's own page cache; the default (1 GiB) would compete with the video tier.
    let mut builder = Database::builder();
    builder.set_cache_size(SPOOL_CACHE_BYTES);
    match builder.create(path) {
        Ok(db) => Ok(db),
        Err(e @ (DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch)) => {
            Err(SpoolError::InUse(format!(
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
            Err(SpoolError::Storage(format!("{}: {e}", path.display())))
        }
        Err(e) => {
            let aside = dir.join(format!("spool.redb.damaged-{}", unix_ms()));
            tracing::error!(path = %path.display(), moved_to = %aside.display(), error = %e,
                "spool cannot be opened; moving it aside and starting a new one");
            metrics.spool_corrupt.inc();
            std::fs::rename(path, &aside).map_err(|e| SpoolError::Storage(e.to_string()))?;
            builder.create(path).map_err(storage)
        }
    }
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
