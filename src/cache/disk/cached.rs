//! Reads of slice files that never wait for the device, so that a request can make them
//! on its own thread: a file is opened only when every component of its path is in the
//! kernel's lookup cache (`openat2` with `RESOLVE_CACHED`), and read only where its bytes
//! are in the page cache (`preadv2` with `RWF_NOWAIT`). Anything else answers "not now"
//! and is read on the blocking pool. On a range hit from a file in the page cache the hop
//! to the pool and back (two thread wake-ups a read) cost more than the read.
//!
//! The kernel may still sleep briefly on a lock inside these calls (as it may in any
//! system call); what they never do is wait for the device.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;

/// Cleared when the kernel lacks one of the calls (`RESOLVE_CACHED` needs Linux 5.12):
/// from then on every read goes to the pool.
static SUPPORTED: AtomicBool = AtomicBool::new(true);

/// Whether reads from the page cache are tried at all.
pub fn supported() -> bool {
    SUPPORTED.load(Ordering::Relaxed)
}

fn unsupported() {
    if SUPPORTED.swap(false, Ordering::Relaxed) {
        tracing::info!(
            "this kernel cannot open and read files without waiting for the device; \
             every disk-tier read goes to the blocking pool"
        );
    }
}

/// `path` opened for reading if that needs nothing but the kernel's caches; `None`
/// otherwise, whatever the reason (the blocking read that follows finds out).
pub fn open(path: &Path) -> Option<File> {
    if !supported() {
        return None;
    }
    match rustix::fs::openat2(
        CWD,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::CACHED,
    ) {
        Ok(fd) => Some(File::from(fd)),
        Err(Errno::NOSYS | Errno::INVAL) => {
            unsupported();
            None
        }
        Err(_) => None,
    }
}

/// Exactly `len` bytes of `file` at `offset` if all of them are in the page cache;
/// `None` when any is not, or the file ends sooner (then the blocking read decides
/// whether it is corrupt). The buffer is not zeroed first: see `read_at` in the tier.
pub fn read_at(file: &File, offset: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let spare = buf.spare_capacity_mut();
        let iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len(),
        };
        let at = offset + buf.len() as u64;
        #[allow(unsafe_code)]
        // SAFETY: one iovec over the vector's spare capacity, which the kernel may write
        // up to its length; it stays borrowed until the call returns.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                libc::off_t::try_from(at).ok()?,
                libc::RWF_NOWAIT,
            )
        };
        match n {
            n if n > 0 => {
                #[allow(unsafe_code)]
                // SAFETY: the kernel wrote the next `n` bytes (at most the spare length).
                unsafe {
                    buf.set_len(buf.len() + n as usize)
                };
            }
            0 => return None,
            _ => {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                    unsupported();
                }
                return None;
            }
        }
    }
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_in_the_page_cache_is_read_and_one_that_is_not_is_left_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        if !supported() {
            return;
        }
        let file = open(&path).expect("just written: its path and pages are cached");
        assert_eq!(read_at(&file, 0, 300_000).unwrap(), bytes);
        assert_eq!(read_at(&file, 70_000, 9).unwrap(), bytes[70_000..70_009]);
        // Past the end: not a whole read, so not answered here.
        assert!(read_at(&file, 299_999, 2).is_none());
        assert!(open(&dir.path().join("absent")).is_none());

        // Written back and dropped from the page cache: not read without the device.
        file.sync_all().unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let resident = read_at(&file, 0, 300_000);
        // tmpfs (no device) keeps its pages whatever the advice says.
        let on_tmpfs = rustix::fs::fstatfs(&file).unwrap().f_type == 0x0102_1994;
        assert_eq!(resident.is_some(), on_tmpfs);
    }
}
