//! Memory-tier slices kept in the pages of one memfd, so that a response can hand them to
//! the kernel by file offset (`sendfile`) instead of copying them into the socket. On a
//! range hit the copy into the socket is most of the edge's CPU time.
//!
//! Invariants:
//! 1. A slot's bytes never change while a `Bytes` refers to it: a slot is written once,
//!    before its first handle exists, and is reused only after the last handle is gone.
//! 2. A freed slot's pages are punched out of the file before the slot is reused. A
//!    `sendfile` that has returned may still have those pages queued in a socket, unread by
//!    the client; punching leaves them to the socket and gives the next write fresh pages.
//!    Writing over them in place would change bytes a client has not read yet.
//! 3. Slots start on boundaries of the largest page shmem may use (the PMD huge page size
//!    the kernel reports, read once at start by [`ShmemPages::read`]), so no page spans two
//!    slots and punching a slot removes whole pages, never zeroing part of one in place.
//!    When that size cannot be read, or is too large for a slot to be worth it, there is
//!    no pool ([`slot_alignment`]) and slices stay on the heap.
//! 4. Any `&[u8]` inside a pool's mapping is exactly the pool file's bytes at the same
//!    offset, so [`locate`] lets a writer send the file range in place of the buffer.
//!
//! Beside `cache::disk::cached` (a read into a buffer's spare capacity), this is the
//! crate's only unsafe code: mapping the file, reading a slot through the mapping, and
//! borrowing the socket of a Pingora stream (which has no `AsFd`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// Where a slice body read from an upstream (the origin, a peer) lands: in a page-pool
/// slot as it arrives, or on the heap for a slice the memory tier will not keep (a slot
/// taken and freed at once costs fresh shmem pages for nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    Pool,
    Heap,
}

impl Landing {
    /// `pages` when the body is to land in the pool.
    pub fn pool(self, pages: Option<&PagePool>) -> Option<&PagePool> {
        pages.filter(|_| self == Self::Pool)
    }
}

/// Writes shorter than this are copied: below it `sendfile` saves little.
pub const SENDFILE_MIN: usize = 32 << 10;

/// Largest slot alignment accepted: a shmem page bigger than this (512 MiB PMD pages on
/// arm64 with 64 KiB base pages) would make every slot, and under `shmem_enabled =
/// always` every slice's memory, that big.
pub const MAX_SLOT_ALIGN: u64 = 64 << 20;

/// Where the kernel says how big a transparent huge page is (the PMD size).
const HPAGE_PMD_SIZE: &str = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size";
/// Whether shmem (and so the pool's memfd) gets huge pages now.
const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// Most address space one pool reserves; beyond it slices stay on the heap.
const MAX_MAPPING: u64 = 4 << 40;

/// The page sizes shmem may use on this machine, as read at start.
///
/// The pool's memfd is shmem without `MFD_HUGETLB`, so hugetlbfs pages (`Hugepagesize`
/// in `/proc/meminfo`) never back it; transparent huge pages may, up to the PMD size, in
/// every multi-size (mTHP) step below it too. `shmem_enabled` can be changed at run time,
/// so the PMD size bounds the pages the pool may get whatever it says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShmemPages {
    /// Transparent huge pages are built in: the PMD page size in bytes, and the value
    /// selected in `shmem_enabled` (`never`, `always`, …) when it could be read.
    Huge {
        pmd_bytes: u64,
        shmem_enabled: Option<String>,
    },
    /// The kernel has no transparent huge pages: shmem uses base pages only.
    BaseOnly,
    /// The sizes could not be read (for instance `/sys` is not mounted).
    Unknown,
}

impl ShmemPages {
    /// Reads the kernel's settings (small sysfs files; called once, at start).
    pub fn read() -> Self {
        let pmd = std::fs::read_to_string(HPAGE_PMD_SIZE);
        let thp_dir = std::path::Path::new(HPAGE_PMD_SIZE)
            .parent()
            .expect("a file in a directory");
        match pmd {
            Ok(text) => match text.trim().parse::<u64>() {
                Ok(pmd_bytes) => Self::Huge {
                    pmd_bytes,
                    shmem_enabled: std::fs::read_to_string(SHMEM_ENABLED)
                        .ok()
                        .and_then(|t| selected_setting(&t)),
                },
                Err(_) => Self::Unknown,
            },
            // The memory-management directory is there but has no THP: not built in.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && !thp_dir.exists()
                    && thp_dir.parent().is_some_and(|mm| mm.is_dir()) =>
            {
                Self::BaseOnly
            }
            Err(_) => Self::Unknown,
        }
    }

    /// Whether shmem gets huge pages now (each written slot may take a whole one).
    fn huge_now(&self) -> bool {
        matches!(self, Self::Huge { shmem_enabled: Some(s), .. }
            if matches!(s.as_str(), "always" | "within_size" | "force"))
    }
}

/// The bracketed choice of a sysfs setting such as `always [never] deny`.
fn selected_setting(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// Why a machine gets no page pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolRefused {
    #[error("the shmem huge page size cannot be read ({HPAGE_PMD_SIZE}); a slot freed under a page shared with another could change bytes still queued in a socket")]
    UnknownPageSize,
    #[error("shmem huge pages are {0} bytes, over the {MAX_SLOT_ALIGN}-byte limit for a slot")]
    PagesTooLarge(u64),
}

/// The alignment of slots that keeps invariant 3 on a machine with base pages of
/// `base_page` bytes and these shmem settings, or why no pool is safe there. Pure.
pub fn slot_alignment(base_page: u64, shmem: &ShmemPages) -> Result<u64, PoolRefused> {
    let largest = match shmem {
        ShmemPages::Huge { pmd_bytes, .. } if pmd_bytes.is_power_of_two() => *pmd_bytes,
        ShmemPages::Huge { .. } | ShmemPages::Unknown => return Err(PoolRefused::UnknownPageSize),
        ShmemPages::BaseOnly => base_page,
    };
    let align = largest.max(base_page);
    if align > MAX_SLOT_ALIGN {
        return Err(PoolRefused::PagesTooLarge(align));
    }
    Ok(align)
}

/// Pools whose mappings [`locate`] searches: one per slice store, so a handful at most.
static REGIONS: RwLock<Vec<Region>> = RwLock::new(Vec::new());

struct Region {
    start: usize,
    end: usize,
    pool: Weak<Pool>,
}

/// Where a buffer's bytes are in a pool's file.
pub struct FileRange {
    pool: Arc<Pool>,
    offset: u64,
}

/// The file range holding `buf`, when `buf` lies in a pool's mapping.
pub fn locate(buf: &[u8]) -> Option<FileRange> {
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let regions = REGIONS.read().unwrap_or_else(|e| e.into_inner());
    let r = regions.iter().find(|r| r.start <= start && end <= r.end)?;
    Some(FileRange {
        pool: r.pool.upgrade()?,
        offset: (start - r.start) as u64,
    })
}

/// The socket under a Pingora L4 stream, borrowed for as long as the stream is.
#[allow(unsafe_code)]
pub fn socket_of(stream: &pingora::protocols::l4::stream::Stream) -> BorrowedFd<'_> {
    // SAFETY: the stream owns its socket and keeps it open while it lives; the result
    // cannot outlive the borrow of the stream.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }
}

/// A fixed number of slots in one memfd, each big enough for one slice.
#[derive(Clone)]
pub struct PagePool {
    pool: Arc<Pool>,
}

struct Pool {
    file: OwnedFd,
    /// Start of the read-only shared mapping of the whole file.
    base: usize,
    len: usize,
    stride: u64,
    free: Mutex<Vec<u32>>,
}

impl PagePool {
    /// A pool with room for a memory tier of `memory_bytes` in slices of `slice_bytes`,
    /// plus headroom for slices that responses still hold after the tier evicted them,
    /// with slots aligned as this machine's shmem pages require. Fails (and the caller
    /// goes without a pool) when that cannot be made safe, see [`slot_alignment`].
    pub fn for_tier(slice_bytes: u64, memory_bytes: u64) -> io::Result<Self> {
        let shmem = ShmemPages::read();
        let align = slot_alignment(rustix::param::page_size() as u64, &shmem)
            .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
        if shmem.huge_now() && align > slice_bytes {
            tracing::warn!(
                huge_page_bytes = align,
                slice_bytes,
                "shmem huge pages are on: each slice in the page pool may take a whole huge page"
            );
        }
        Self::with_alignment(slice_bytes, memory_bytes, align)
    }

    fn with_alignment(slice_bytes: u64, memory_bytes: u64, align: u64) -> io::Result<Self> {
        let stride = slice_bytes.div_ceil(align) * align;
        let needed = memory_bytes.div_ceil(slice_bytes);
        let slots = (needed + needed / 8 + 8)
            .min(MAX_MAPPING / stride)
            .min(u32::MAX as u64);
        Self::new(stride, slots as u32)
    }

    #[allow(unsafe_code)]
    fn new(stride: u64, slots: u32) -> io::Result<Self> {
        let len = stride * u64::from(slots);
        let len_usize = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let file = rustix::fs::memfd_create("cdn-edge-slices", MemfdFlags::CLOEXEC)?;
        // Sparse: pages exist only where slices are written.
        rustix::fs::ftruncate(&file, len)?;
        // SAFETY: a new shared read-only mapping at an address the kernel picks, so no
        // existing memory is touched. It is unmapped only when the pool drops, after every
        // slice handle into it.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len_usize,
                ProtFlags::READ,
                MapFlags::SHARED,
                &file,
                0,
            )?
        } as usize;
        let pool = Arc::new(Pool {
            base,
            len: len_usize,
            stride,
            free: Mutex::new((0..slots).rev().collect()),
            file,
        });
        REGIONS
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Region {
                start: base,
                end: base + len_usize,
                pool: Arc::downgrade(&pool),
            });
        Ok(Self { pool })
    }

    /// `bytes` moved into a slot, or `bytes` itself when it is too small to be worth
    /// sending by offset, too big for a slot, or no slot is free.
    pub fn adopt(&self, bytes: Bytes) -> Bytes {
        let Some(mut writer) = self.writer(bytes.len()) else {
            return bytes;
        };
        match writer.write(&bytes) {
            Ok(()) => writer.finish(),
            Err(_) => bytes,
        }
    }

    /// A free slot to write a slice of `len` bytes into, if one is worth using (see
    /// [`PagePool::adopt`]).
    pub fn writer(&self, len: usize) -> Option<SlotWriter> {
        if len < SENDFILE_MIN || len as u64 > self.pool.stride {
            return None;
        }
        let slot = self.pool.take()?;
        Some(SlotWriter {
            slot: Some(Slot {
                pool: self.pool.clone(),
                slot,
                len: 0,
            }),
            capacity: len,
        })
    }

    /// Slots not holding a slice.
    #[cfg(test)]
    fn free_slots(&self) -> usize {
        self.pool
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Pool {
    fn take(&self) -> Option<u32> {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn release(&self, slot: u32) {
        let offset = u64::from(slot) * self.stride;
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            self.stride,
        ) {
            Ok(()) => self
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(slot),
            // Reusing it without fresh pages could change bytes still queued in a socket.
            Err(e) => {
                tracing::error!(error = %e, slot, "freeing a page-pool slot failed; slot retired")
            }
        }
    }
}

impl Drop for Pool {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        REGIONS
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| r.start != self.base);
        // SAFETY: no slice handle is left (each holds the pool), so nothing reads the
        // mapping any more.
        let _ = unsafe { rustix::mm::munmap(self.base as *mut _, self.len) };
    }
}

/// A slot being filled. Dropped unfinished, the slot is freed.
pub struct SlotWriter {
    /// Always `Some` until [`SlotWriter::finish`].
    slot: Option<Slot>,
    capacity: usize,
}

impl SlotWriter {
    /// Appends `chunk`; fails when it would pass the length given to
    /// [`PagePool::writer`] or the file cannot take it (the slot is then unusable).
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        let slot = self.slot.as_mut().expect("not finished");
        if slot.len + chunk.len() > self.capacity {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let offset = u64::from(slot.slot) * slot.pool.stride + slot.len as u64;
        // Writing to a memfd is a copy into memory, not disk I/O.
        let mut done = 0;
        while done < chunk.len() {
            match rustix::io::pwrite(&slot.pool.file, &chunk[done..], offset + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "writing a slice into the page pool failed");
                    return Err(e.into());
                }
            }
        }
        slot.len += done;
        Ok(())
    }

    /// The length given to [`PagePool::writer`].
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes written so far.
    pub fn written_len(&self) -> usize {
        self.slot.as_ref().map_or(0, |s| s.len)
    }

    /// The written bytes so far, read through the mapping (to move them elsewhere).
    pub fn written(&self) -> &[u8] {
        self.slot.as_ref().map_or(&[], |s| s.as_ref())
    }

    /// The slice as `Bytes`; from here on the slot's bytes never change.
    pub fn finish(mut self) -> Bytes {
        Bytes::from_owner(self.slot.take().expect("finished once"))
    }
}

/// One written slot, the owner behind a slice's `Bytes`.
struct Slot {
    pool: Arc<Pool>,
    slot: u32,
    len: usize,
}

impl AsRef<[u8]> for Slot {
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        let start = self.pool.base + (u64::from(self.slot) * self.pool.stride) as usize;
        // SAFETY: inside the pool's mapping (slot < slots, len <= stride), which lives as
        // long as `self.pool`; the bytes were written before this handle existed and do
        // not change until it is dropped (invariant 1).
        unsafe { std::slice::from_raw_parts(start as *const u8, self.len) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.release(self.slot);
    }
}

impl FileRange {
    fn file(&self) -> BorrowedFd<'_> {
        self.pool.file.as_fd()
    }

    /// Sends `len` bytes from this range to `socket` without copying them through user
    /// space. The socket must be non-blocking; `WouldBlock` means it is full.
    pub fn send(&self, socket: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        let mut offset = self.offset;
        loop {
            match rustix::fs::sendfile(socket, self.file(), Some(&mut offset), len) {
                Err(rustix::io::Errno::INTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }
}

/// Writes `buf` to `socket` now, with more to follow (`MSG_MORE`): a response head that
/// should leave in one segment with the body sent after it.
pub fn send_more(socket: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    use rustix::net::SendFlags;
    loop {
        match rustix::net::send(
            socket,
            buf,
            SendFlags::MORE | SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slot size of the pools these tests build: one 2 MiB huge page.
    const STRIDE: u64 = 2 << 20;

    #[test]
    fn slots_are_aligned_to_the_largest_shmem_page_or_there_is_no_pool() {
        let huge = |pmd_bytes: u64, setting: &str| ShmemPages::Huge {
            pmd_bytes,
            shmem_enabled: Some(setting.to_string()),
        };
        let k = 1u64 << 10;
        let m = 1u64 << 20;
        for (base_page, shmem, expected) in [
            // No THP in the kernel: base pages only.
            (4 * k, ShmemPages::BaseOnly, Ok(4 * k)),
            (64 * k, ShmemPages::BaseOnly, Ok(64 * k)),
            // A PMD page no bigger than a base page: base pages.
            (4 * k, huge(4 * k, "never"), Ok(4 * k)),
            // x86-64 and arm64 with 4 KiB pages, whatever shmem_enabled says now (it can
            // be changed while the edge runs).
            (4 * k, huge(2 * m, "never"), Ok(2 * m)),
            (4 * k, huge(2 * m, "always"), Ok(2 * m)),
            // arm64 with 16 KiB pages.
            (16 * k, huge(32 * m, "within_size"), Ok(32 * m)),
            // 512 MiB (arm64, 64 KiB pages) or 1 GiB pages: no pool.
            (
                64 * k,
                huge(512 * m, "never"),
                Err(PoolRefused::PagesTooLarge(512 * m)),
            ),
            (
                4 * k,
                huge(1 << 30, "always"),
                Err(PoolRefused::PagesTooLarge(1 << 30)),
            ),
            // Unreadable or nonsense: no pool.
            (
                4 * k,
                ShmemPages::Unknown,
                Err(PoolRefused::UnknownPageSize),
            ),
            (4 * k, huge(0, "never"), Err(PoolRefused::UnknownPageSize)),
            (
                4 * k,
                huge(3 * m, "never"),
                Err(PoolRefused::UnknownPageSize),
            ),
        ] {
            assert_eq!(
                slot_alignment(base_page, &shmem),
                expected,
                "{base_page} {shmem:?}"
            );
        }
    }

    #[test]
    fn the_selected_shmem_setting_is_the_bracketed_one() {
        let text = "always within_size advise [never] deny force\n";
        assert_eq!(selected_setting(text).as_deref(), Some("never"));
        assert_eq!(
            selected_setting("[always] never").as_deref(),
            Some("always")
        );
        assert_eq!(selected_setting("always never"), None);
        let on = ShmemPages::Huge {
            pmd_bytes: STRIDE,
            shmem_enabled: Some("within_size".into()),
        };
        assert!(on.huge_now());
        assert!(!ShmemPages::BaseOnly.huge_now());
    }

    #[test]
    fn this_machine_gets_a_decision() {
        // Whatever the kernel, reading its settings gives an answer and never panics; a
        // pool built with the answer has slots on page boundaries.
        let shmem = ShmemPages::read();
        if let Ok(align) = slot_alignment(rustix::param::page_size() as u64, &shmem) {
            let pool = PagePool::with_alignment(100_000, 1 << 20, align).unwrap();
            assert_eq!(pool.pool.stride % align, 0);
            assert!(pool.pool.stride >= 100_000);
        }
    }

    fn pattern(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn adopted_slices_read_back_and_are_located_in_the_file() {
        let pool = PagePool::new(STRIDE, 2).unwrap();
        let data = pattern(300_000, 7);
        let held = pool.adopt(data.clone());
        assert_eq!(held, data);
        assert_eq!(pool.free_slots(), 1);
        let part = held.slice(1000..200_000);
        let range = locate(&part).expect("in the pool");
        assert_eq!(range.file().as_raw_fd(), pool.pool.file.as_raw_fd());
        assert_eq!(range.offset, 1000);
        let mut read = vec![0u8; part.len()];
        rustix::io::pread(range.file(), &mut read, range.offset).unwrap();
        assert_eq!(read, part);
        assert!(locate(&data).is_none(), "a heap buffer is not in a pool");
    }

    #[test]
    fn small_big_and_overflowing_slices_stay_on_the_heap() {
        let pool = PagePool::new(STRIDE, 1).unwrap();
        let small = pattern(SENDFILE_MIN - 1, 1);
        assert_eq!(small.as_ptr(), pool.adopt(small.clone()).as_ptr());
        let big = pattern(STRIDE as usize + 1, 2);
        assert_eq!(big.as_ptr(), pool.adopt(big.clone()).as_ptr());
        let first = pool.adopt(pattern(SENDFILE_MIN, 3));
        assert!(locate(&first).is_some());
        let second = pattern(SENDFILE_MIN, 4);
        assert_eq!(second.as_ptr(), pool.adopt(second.clone()).as_ptr());
        drop(first);
        assert_eq!(pool.free_slots(), 1, "the slot is free again once unused");
    }

    #[test]
    fn a_reused_slot_does_not_change_bytes_already_handed_to_the_kernel() {
        // A pipe stands in for a socket: both keep references to the pages spliced in.
        let (rx, tx) = rustix::pipe::pipe().unwrap();
        rustix::pipe::fcntl_setpipe_size(&tx, 1 << 20).unwrap();
        let pool = PagePool::new(STRIDE, 1).unwrap();
        let first = pattern(256 << 10, 1);
        let held = pool.adopt(first.clone());
        let mut sent = 0;
        while sent < held.len() {
            let range = locate(&held[sent..]).unwrap();
            sent += range.send(tx.as_fd(), held.len() - sent).unwrap();
        }
        drop(held);
        let second = pool.adopt(pattern(256 << 10, 99));
        assert!(locate(&second).is_some(), "the same slot, reused");
        let mut read = vec![0u8; first.len()];
        let mut got = 0;
        while got < read.len() {
            got += rustix::io::read(&rx, &mut read[got..]).unwrap();
        }
        assert!(read == first[..], "the queued bytes are the first slice's");
    }
}
