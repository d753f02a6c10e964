//! Opening the redb store of a durable part of the edge (the forwarding spool, the fill
//! jobs): one process at a time, and a damaged file moved aside rather than stopping
//! the start.

use std::path::{Path, PathBuf};

use redb::{Database, DatabaseError, StorageError};

/// Why a store could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// Another process holds it (during an upgrade: the one handing over).
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Storage(String),
}

/// Opens (or creates) `<dir>/<name>` with a page cache of `cache_bytes` (redb's default,
/// 1 GiB, would compete with the video tier). A file that is not a redb store, or one
/// redb reports corrupted, is renamed `<name>.damaged-<unix ms>` and a new one created:
/// the new name of the old file comes back with the store, for the caller to log and
/// count. Anything else (an upgrade needed, I/O errors) is an error rather than losing
/// what the file holds.
pub fn create_or_set_aside(
    dir: &Path,
    name: &str,
    cache_bytes: usize,
) -> Result<(Database, Option<PathBuf>), OpenError> {
    let path = dir.join(name);
    std::fs::create_dir_all(dir)
        .map_err(|e| OpenError::Storage(format!("{}: {e}", dir.display())))?;
    let mut builder = Database::builder();
    builder.set_cache_size(cache_bytes);
    match builder.create(&path) {
        Ok(db) => Ok((db, None)),
        Err(e @ (DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch)) => {
            Err(OpenError::InUse(format!(
                "{}: in use by another process: {e}",
                path.display()
            )))
        }
        Err(e)
            if !matches!(&e, DatabaseError::Storage(StorageError::Corrupted(_)))
                && !matches!(&e, DatabaseError::Storage(StorageError::Io(io))
                if io.kind() == std::io::ErrorKind::InvalidData) =>
        {
            Err(OpenError::Storage(format!("{}: {e}", path.display())))
        }
        Err(e) => {
            let aside = dir.join(format!("{name}.damaged-{}", crate::cache::meta::unix_ms()));
            tracing::error!(path = %path.display(), moved_to = %aside.display(), error = %e,
                "store cannot be opened; moving it aside and starting a new one");
            std::fs::rename(&path, &aside).map_err(|e| OpenError::Storage(e.to_string()))?;
            let db = builder
                .create(&path)
                .map_err(|e| OpenError::Storage(format!("{}: {e}", path.display())))?;
            Ok((db, Some(aside)))
        }
    }
}
