//! Applying a purge on this node: record it, then remove what the tiers hold of it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::PurgeRecord;
use crate::cache::{ObjectId, SliceKey, SliceStore};

/// What a purge removed from this node: slices held in memory, on disk or both (each
/// counted once), and their payload bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Removed {
    pub slices: u64,
    pub bytes: u64,
}

/// The outcome of [`SliceStore::purge`].
#[derive(Debug)]
pub struct Applied {
    pub removed: Removed,
    /// False when the purge was known already (by its id): nothing was done.
    pub new: bool,
    /// Why the purge is in force but could not be written to the log: it would not
    /// survive a restart.
    pub not_recorded: Option<std::io::Error>,
}

impl SliceStore {
    /// Applies a purge on this node: records it (invariant 1 of [`super`]), makes it
    /// durable, then removes the object's slices from memory and disk, its metadata and
    /// a remembered 404. A purge already known (same id) does nothing.
    pub async fn purge(&self, record: PurgeRecord) -> Applied {
        let Some(entry) = self.purges.record(record.clone()) else {
            return Applied {
                removed: Removed::default(),
                new: false,
                not_recorded: None,
            };
        };
        let not_recorded = self.purges.persist(entry).await.err();
        if let Some(e) = &not_recorded {
            tracing::error!(object = record.o, version = ?record.v, error = %e,
                "purge applied but not written to the purge log: it will not survive a restart");
        }
        let removed = self.sweep(&record).await;
        self.metrics.purge.slices.inc_by(removed.slices);
        self.metrics.purge.bytes.inc_by(removed.bytes);
        if removed.slices > 0 {
            tracing::info!(object = record.o, version = ?record.v, id = record.id,
                slices = removed.slices, bytes = removed.bytes, "purged");
        } else {
            tracing::debug!(object = record.o, version = ?record.v, id = record.id,
                "purged; nothing of it was cached");
        }
        Applied {
            removed,
            new: true,
            not_recorded,
        }
    }

    /// Removes what the tiers hold of `record`'s object now.
    async fn sweep(&self, record: &PurgeRecord) -> Removed {
        let ids: HashSet<ObjectId> = match &record.v {
            Some(v) => HashSet::from([ObjectId::new(&record.o, v)]),
            None => self.purges.names().ids_of(&record.o).into_iter().collect(),
        };
        let mut found: HashMap<SliceKey, u64> = HashMap::new();
        // Memory: the page pool's slots are freed once the last reader lets go.
        for (key, len) in self.memory.remove_where(|k| ids.contains(&k.object)).await {
            found.insert(key, len);
        }
        if let Some(disk) = &self.disk {
            for (key, len) in disk.purge(ids.iter().copied().collect()).await {
                found.entry(key).or_insert(len);
            }
        }
        for id in &ids {
            self.meta.invalidate(id).await;
            self.missing.forget(id).await;
        }
        if record.v.is_none() {
            self.missing.forget_object(&record.o);
        }
        Removed {
            slices: found.len() as u64,
            bytes: found.values().sum(),
        }
    }

    /// Forgets the names of objects no tier holds any more, when they have grown enough
    /// for it to be worth a walk over the tiers' keys.
    pub(crate) async fn prune_names(&self) {
        let names = self.purges.names();
        if !names.wants_prune() {
            return;
        }
        let begun = names.begin_prune();
        let mut held: HashSet<ObjectId> = self.memory.keys().map(|k| k.object).collect();
        held.extend(self.meta.iter().map(|(k, _)| *k));
        if let Some(disk) = &self.disk {
            held.extend(disk.held_objects().await);
        }
        names.prune(begun, &held);
    }

    /// The purges this node knows, shared with the disk tier.
    pub fn purges(&self) -> &Arc<super::Purges> {
        &self.purges
    }
}
