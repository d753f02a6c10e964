//! A disk tier storage that fails on demand: the real file system
//! (`cdn_edge::cache::disk::FsStorage`), except for the faults a test sets through its
//! [`Faults`] handle. A read fault hits the next read of one slice file only; a write
//! fault every write until it is cleared (or, for a hang, released).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cdn_edge::cache::disk::{FsStorage, SliceStorage};

/// What happens to one read of a slice file.
#[derive(Debug, Clone)]
pub enum ReadFault {
    /// The read fails with this OS error (5 EIO, 24 EMFILE, ...).
    Error(i32),
    /// Between open and read the file is cut to this length.
    TruncateAfterOpen(u64),
    /// Between open and read every byte of the file is changed, in place.
    OverwriteAfterOpen,
    /// Between open and read this file is renamed over it.
    ReplaceAfterOpen(PathBuf),
    /// The read waits until [`Faults::release`] (10 s at most).
    Hang,
}

#[derive(Default)]
struct Plan {
    /// (end of the file name, fault): each used once.
    reads: Vec<(String, ReadFault)>,
    /// The OS error every write fails with.
    write_error: Option<i32>,
    /// Writes wait until [`Faults::release`].
    hang_writes: bool,
    released: bool,
}

/// The test's handle on a [`FaultyStorage`].
#[derive(Clone, Default)]
pub struct Faults {
    plan: Arc<Mutex<Plan>>,
    released: Arc<Condvar>,
    writes: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
}

impl Faults {
    /// The storage to open the tier with.
    pub fn storage(&self) -> Box<dyn SliceStorage> {
        Box::new(FaultyStorage(self.clone()))
    }

    /// The next read of the file of slice `index` (names end in its 16 hex digits).
    pub fn on_read(&self, index: u64, fault: ReadFault) {
        let suffix = format!("-{index:016x}");
        self.plan.lock().unwrap().reads.push((suffix, fault));
    }

    /// Every write fails with `errno` from now on; `None` heals.
    pub fn fail_writes(&self, errno: Option<i32>) {
        self.plan.lock().unwrap().write_error = errno;
    }

    /// Every write waits until [`Faults::release`] (10 s at most), then is made.
    pub fn hang_writes(&self) {
        self.plan.lock().unwrap().hang_writes = true;
    }

    /// Ends every hang of a read or a write, now and to come.
    pub fn release(&self) {
        self.plan.lock().unwrap().released = true;
        self.released.notify_all();
    }

    /// Writes attempted so far (the tier's write check at open included).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Reads attempted so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    fn take_read_fault(&self, path: &Path) -> Option<ReadFault> {
        let name = path.file_name()?.to_str()?;
        let mut plan = self.plan.lock().unwrap();
        let at = plan.reads.iter().position(|(s, _)| name.ends_with(s))?;
        Some(plan.reads.remove(at).1)
    }

    fn hang(&self) {
        let plan = self.plan.lock().unwrap();
        let (_plan, waited) = self
            .released
            .wait_timeout_while(plan, Duration::from_secs(10), |p| !p.released)
            .unwrap();
        assert!(!waited.timed_out(), "a hanging read was never released");
    }
}

struct FaultyStorage(Faults);

impl SliceStorage for FaultyStorage {
    fn write_new(&self, path: &Path, header: &[u8], payload: &[u8]) -> io::Result<()> {
        self.0.writes.fetch_add(1, Ordering::SeqCst);
        let (error, hang) = {
            let plan = self.0.plan.lock().unwrap();
            (plan.write_error, plan.hang_writes)
        };
        if let Some(errno) = error {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if hang {
            self.0.hang();
        }
        FsStorage.write_new(path, header, payload)
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let file = self.open(path)?;
        let mut data = Vec::new();
        file.take(limit).read_to_end(&mut data)?;
        Ok(data)
    }

    /// Opens the file, then does what the plan says before it is read.
    fn open(&self, path: &Path) -> io::Result<File> {
        self.0.reads.fetch_add(1, Ordering::SeqCst);
        let fault = self.0.take_read_fault(path);
        if let Some(ReadFault::Error(errno)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let file = File::open(path)?;
        match fault {
            Some(ReadFault::TruncateAfterOpen(len)) => {
                OpenOptions::new().write(true).open(path)?.set_len(len)?;
            }
            Some(ReadFault::OverwriteAfterOpen) => {
                let flipped: Vec<u8> = std::fs::read(path)?.iter().map(|b| !b).collect();
                std::fs::write(path, flipped)?;
            }
            Some(ReadFault::ReplaceAfterOpen(other)) => std::fs::rename(other, path)?,
            Some(ReadFault::Hang) => self.0.hang(),
            Some(ReadFault::Error(_)) | None => {}
        }
        Ok(file)
    }
}
