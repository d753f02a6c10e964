//! Reads of slice files that never wait for the device, so that a request can make them
//! on its own thread: a file is opened only when every component of its path is in the
//! kernel's lookup cache (`openat2` with `RESOLVE_CACHED`), and read only where its bytes
//! are in the page cache (`preadv2` with `RWF_NOWAIT`). Anything else answers "not now"
//! and is read on the blocking pool. On a range hit from a file in the page cache the hop
//! to the pool and back (two thread wake-ups a read) cost more than the read.
//!
//! Files are opened with `O_NOATIME`: a read that updated the access time could start a
//! journal transaction and wait for the one being committed. The kernel may still sleep
//! briefly on a lock inside these calls, as in any system call; they do not read from
//! the device. Reads are bounded ([`MAX_READ`]) so that a request's thread does not copy
//! and check a large part of a large slice.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;

/// The most bytes a request's thread reads for one part; a longer part goes to the pool.
pub const MAX_READ: u64 = 1 << 20;

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

thread_local! {
    /// Set while this thread reads a part for a request ([`on_request_thread`]).
    static IN_REQUEST_READ: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `read`, a read on a request's thread: what it calls must not delete files here
/// ([`in_request_read`]).
pub fn on_request_thread<T>(read: impl FnOnce() -> T) -> T {
    IN_REQUEST_READ.with(|r| r.set(true));
    let out = read();
    IN_REQUEST_READ.with(|r| r.set(false));
    out
}

/// Whether this thread is inside [`on_request_thread`].
pub fn in_request_read() -> bool {
    IN_REQUEST_READ.with(|r| r.get())
}

/// `path` opened for reading if that needs nothing but the kernel's caches; `None`
/// otherwise, whatever the reason (the blocking read that follows finds out). A file
/// this process does not own cannot be opened without updating its access time
/// (`EPERM`): it goes to the pool.
pub fn open(path: &Path) -> Option<File> {
    if !supported() {
        return None;
    }
    match rustix::fs::openat2(
        CWD,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOATIME,
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
        let wanted = len - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..wanted];
        let iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: wanted,
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
                // SAFETY: the kernel wrote the next `n` bytes (at most `wanted`).
                unsafe {
                    buf.set_len(buf.len() + n as usize)
                };
            }
            0 => return None,
            _ => {
                if matches!(
                    io::Error::last_os_error().raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOSYS)
                ) {
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
        let Some(file) = open(&path) else {
            assert!(!supported(), "just written: its path is cached");
            return; // a kernel without RESOLVE_CACHED
        };
        let Some(whole) = read_at(&file, 0, 300_000) else {
            assert!(!supported(), "just written: its pages are cached");
            return; // a file system without RWF_NOWAIT reads
        };
        assert_eq!(whole, bytes);
        assert_eq!(read_at(&file, 70_000, 9).unwrap(), bytes[70_000..70_009]);
        // Past the end: not a whole read, so not answered here.
        assert!(read_at(&file, 299_999, 2).is_none());
        assert!(open(&dir.path().join("absent")).is_none());

        // Written back and dropped from the page cache: not read without the device.
        file.sync_all().unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        // A file system without a device (tmpfs) keeps its pages whatever the advice says.
        let mut probe = [0u8; 1];
        let dropped = rustix::io::preadv2(
            &file,
            &mut [std::io::IoSliceMut::new(&mut probe)],
            0,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) == Err(Errno::AGAIN);
        if dropped {
            assert!(
                read_at(&file, 0, 300_000).is_none(),
                "not read from the device"
            );
        }
    }
}
