//! The file operations of the disk tier whose failures it must survive, behind one
//! trait: tests put a full disk, a failing device or a file changed while it is read in
//! place of the real file system.
//!
//! The tier holds one storage for its life, made at open ([`super::Options`]); a call
//! through it is one virtual call next to a system call, and a read hands back the
//! bytes it read, with no copy.

use std::io::{self, Read, Write};
use std::path::Path;

/// Slice file writes and reads. Creating directories, renaming and deleting go to the
/// file system directly: their failures end in the same places as these calls'.
pub trait SliceStorage: Send + Sync + 'static {
    /// Creates `path` (it must not exist) and writes `header` then `payload` to it.
    fn write_new(&self, path: &Path, header: &[u8], payload: &[u8]) -> io::Result<()>;

    /// Reads the file at `path`: all of it, or its first `limit` bytes when it is longer
    /// (a file that long is not a slice file, and fails the length check).
    fn read(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>>;

    /// Opens the file at `path` to read parts of it: one
    /// open file for the header and the blocks, so both are of the same file.
    fn open(&self, path: &Path) -> io::Result<std::fs::File>;

    /// Opens the file at `path` if that cannot wait for the device (its path is in the
    /// kernel's lookup cache); `None` when it might, or for any failure: the caller then
    /// reads on the blocking pool with [`SliceStorage::open`], which decides.
    fn open_cached(&self, _path: &Path) -> Option<std::fs::File> {
        None
    }
}

/// The real file system.
pub struct FsStorage;

impl SliceStorage for FsStorage {
    fn write_new(&self, path: &Path, header: &[u8], payload: &[u8]) -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        f.write_all(header)?;
        f.write_all(payload)
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len().min(limit);
        let mut data = Vec::with_capacity(len as usize);
        f.take(limit).read_to_end(&mut data)?;
        Ok(data)
    }

    fn open(&self, path: &Path) -> io::Result<std::fs::File> {
        std::fs::File::open(path)
    }

    fn open_cached(&self, path: &Path) -> Option<std::fs::File> {
        super::cached::open(path)
    }
}

/// Whether a write failed because the file system (or the user's quota) is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Whether an I/O error says the process is short of a resource (file descriptors,
/// memory) rather than anything about the file: the file is kept.
pub fn is_shortage(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOMEM on Linux and the BSDs alike.
    e.kind() == io::ErrorKind::OutOfMemory || matches!(e.raw_os_error(), Some(23 | 24))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_stops_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        assert_eq!(FsStorage.read(&path, 100).unwrap().len(), 100);
        assert_eq!(FsStorage.read(&path, 10_000).unwrap().len(), 10_000);
        assert_eq!(FsStorage.read(&path, 1 << 40).unwrap(), vec![7u8; 10_000]);
        // A sparse file of 64 GiB is not read whole, nor allocated for.
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 36)
            .unwrap();
        assert_eq!(FsStorage.read(&path, 4097).unwrap().len(), 4097);
    }

    #[test]
    fn errors_are_told_apart() {
        let err = io::Error::from_raw_os_error;
        assert!(is_no_space(&err(28))); // ENOSPC
        assert!(is_no_space(&err(122))); // EDQUOT
        assert!(!is_no_space(&err(5))); // EIO
        assert!(is_shortage(&err(24)) && is_shortage(&err(23)) && is_shortage(&err(12)));
        assert!(!is_shortage(&err(5)) && !is_shortage(&err(13)));
    }
}
