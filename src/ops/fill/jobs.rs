//! Fill jobs on disk: a redb store, `jobs.redb` in `fill.state_dir`.
//!
//! # Design constraints
//! 1. `POST /fill` answers 202 only once the job's manifest and its `queued` state are
//!    committed with `Durability::Immediate`: an accepted job survives `kill -9`.
//! 2. A job's state changes (running, waiting_window, done, failed) are committed
//!    durably. Its counters in between are committed without an fsync of their own: a
//!    crash may lose the last counts, never a job. A job resumed after a restart walks
//!    its slices again from the first (a slice held counts as done), so lost counts
//!    are counted again.
//! 3. Finished jobs are kept for `GET /fill/{id}`, the newest [`super::FINISHED_KEPT`];
//!    older ones are removed in the transaction that adds a job.
//! 4. A file that is not a redb store, or one redb reports corrupted, is moved aside
//!    (`jobs.redb.damaged-<unix ms>`) and a new one started: the edge keeps serving;
//!    the jobs it held are lost and logged.
//! 5. One process at a time: redb locks the file. During an upgrade the new process
//!    waits for the old one to hand the store over ([`JobStore::hand_over_blocking`]).
//!
//! # Tables
//! ```text
//! manifests  u64 job id -> the job's objects, JSON (manifest.rs `Wanted`)
//! progress   u64 job id -> (state, slices_total, slices_done, bytes_done, errors)
//! meta       "next_id"  -> the next job id
//! ```
//!
//! Every method here blocks on file I/O: call them from `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{JobState, Progress};
use crate::redb_file::{self, OpenError};

/// The store's file name inside `fill.state_dir`.
pub const FILE_NAME: &str = "jobs.redb";
const MANIFESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("manifests");
const PROGRESS: TableDefinition<u64, (u8, u64, u64, u64, u64)> = TableDefinition::new("progress");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// redb's page cache for this small store (its default, 1 GiB, would compete with the
/// video tier).
const CACHE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum JobStoreError {
    #[error("fill.state_dir: {0}")]
    Storage(String),
    #[error("fill.state_dir: {0}")]
    InUse(String),
    #[error("the fill jobs were handed over to another process")]
    HandedOver,
}

impl JobStoreError {
    pub fn is_in_use(&self) -> bool {
        matches!(self, JobStoreError::InUse(_))
    }
}

fn storage(e: impl std::fmt::Display) -> JobStoreError {
    JobStoreError::Storage(e.to_string())
}

pub struct JobStore {
    /// `None` once handed over to another process.
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
}

impl JobStore {
    /// Opens (or creates) `<dir>/jobs.redb`; returns it with every job it holds, by id.
    pub fn open(dir: &Path) -> Result<(Self, Vec<(u64, Progress)>), JobStoreError> {
        let (db, aside) =
            redb_file::create_or_set_aside(dir, FILE_NAME, CACHE_BYTES).map_err(|e| match e {
                OpenError::InUse(m) => JobStoreError::InUse(m),
                OpenError::Storage(m) => JobStoreError::Storage(m),
            })?;
        if let Some(aside) = aside {
            tracing::error!(moved_to = %aside.display(), "the fill jobs it held are lost");
        }
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(MANIFESTS).map_err(storage)?;
        txn.open_table(PROGRESS).map_err(storage)?;
        txn.open_table(META).map_err(storage)?;
        txn.commit().map_err(storage)?;
        let read = db.begin_read().map_err(storage)?;
        let table = read.open_table(PROGRESS).map_err(storage)?;
        let mut jobs = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            jobs.push((k.value(), decode(v.value())));
        }
        drop(table);
        drop(read);
        Ok((
            Self {
                db: RwLock::new(Some(Arc::new(db))),
                path: dir.join(FILE_NAME),
            },
            jobs,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<Arc<Database>, JobStoreError> {
        self.db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(JobStoreError::HandedOver)
    }

    /// Durably adds a job (constraint 1) and removes the finished jobs `forget`
    /// (constraint 3); returns the new job's id.
    pub fn add(
        &self,
        manifest: &[u8],
        progress: &Progress,
        forget: &[u64],
    ) -> Result<u64, JobStoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let id = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let id = meta
                .get("next_id")
                .map_err(storage)?
                .map_or(1, |v| v.value());
            meta.insert("next_id", id + 1).map_err(storage)?;
            let mut manifests = txn.open_table(MANIFESTS).map_err(storage)?;
            let mut table = txn.open_table(PROGRESS).map_err(storage)?;
            manifests.insert(id, manifest).map_err(storage)?;
            table.insert(id, encode(progress)).map_err(storage)?;
            for old in forget {
                manifests.remove(old).map_err(storage)?;
                table.remove(old).map_err(storage)?;
            }
            id
        };
        txn.commit().map_err(storage)?;
        Ok(id)
    }

    /// Records a job's progress; `durable` for a change of state (constraint 2).
    pub fn save(&self, id: u64, progress: &Progress, durable: bool) -> Result<(), JobStoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(storage)?;
        let durability = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        txn.set_durability(durability).map_err(storage)?;
        txn.open_table(PROGRESS)
            .map_err(storage)?
            .insert(id, encode(progress))
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// A job's manifest as stored.
    pub fn manifest(&self, id: u64) -> Result<Option<Vec<u8>>, JobStoreError> {
        let read = self.db()?.begin_read().map_err(storage)?;
        let table = read.open_table(MANIFESTS).map_err(storage)?;
        let got = table.get(id).map_err(storage)?;
        Ok(got.map(|v| v.value().to_vec()))
    }

    /// Closes the store so that another process (the one taking over in an upgrade)
    /// can open it; later calls fail with [`JobStoreError::HandedOver`]. A transaction
    /// in flight keeps the file open until it ends.
    pub fn hand_over_blocking(&self) {
        self.db.write().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn encode(p: &Progress) -> (u8, u64, u64, u64, u64) {
    (
        p.state as u8,
        p.slices_total,
        p.slices_done,
        p.bytes_done,
        p.errors,
    )
}

fn decode(
    (state, slices_total, slices_done, bytes_done, errors): (u8, u64, u64, u64, u64),
) -> Progress {
    Progress {
        // An unknown state (a newer version's) is run again.
        state: JobState::from_u8(state).unwrap_or(JobState::Queued),
        slices_total,
        slices_done,
        bytes_done,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(state: JobState, done: u64) -> Progress {
        Progress {
            state,
            slices_total: 10,
            slices_done: done,
            bytes_done: done * 100,
            errors: 0,
        }
    }

    #[test]
    fn jobs_survive_a_reopen_and_old_ones_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (store, jobs) = JobStore::open(dir.path()).unwrap();
        assert!(jobs.is_empty());
        let a = store
            .add(b"[1]", &progress(JobState::Queued, 0), &[])
            .unwrap();
        let b = store
            .add(b"[2]", &progress(JobState::Queued, 0), &[])
            .unwrap();
        assert_eq!((a, b), (1, 2));
        store.save(a, &progress(JobState::Done, 10), true).unwrap();
        store
            .save(b, &progress(JobState::Running, 4), false)
            .unwrap();
        // A third job forgets the first.
        let c = store
            .add(b"[3]", &progress(JobState::Queued, 0), &[a])
            .unwrap();
        assert_eq!(store.manifest(b).unwrap().as_deref(), Some(&b"[2]"[..]));
        assert_eq!(store.manifest(a).unwrap(), None);
        drop(store);

        let (store, jobs) = JobStore::open(dir.path()).unwrap();
        let states: Vec<(u64, JobState, u64)> = jobs
            .iter()
            .map(|(id, p)| (*id, p.state, p.slices_done))
            .collect();
        assert_eq!(
            states,
            vec![(b, JobState::Running, 4), (c, JobState::Queued, 0)]
        );
        // Ids go on after a reopen.
        let d = store
            .add(b"[4]", &progress(JobState::Queued, 0), &[])
            .unwrap();
        assert_eq!(d, 4);
    }

    #[test]
    fn a_handed_over_store_can_be_opened_by_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = JobStore::open(dir.path()).unwrap();
        assert!(JobStore::open(dir.path()).err().unwrap().is_in_use());
        store.hand_over_blocking();
        assert!(matches!(store.manifest(1), Err(JobStoreError::HandedOver)));
        JobStore::open(dir.path()).unwrap();
    }

    #[test]
    fn a_damaged_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"not a redb file at all").unwrap();
        let (store, jobs) = JobStore::open(dir.path()).unwrap();
        assert!(jobs.is_empty());
        store
            .add(b"[]", &progress(JobState::Queued, 0), &[])
            .unwrap();
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".damaged-")
            })
            .count();
        assert_eq!(aside, 1);
    }
}
