//! A global allocator that counts what is live, around mimalloc (the edge's allocator):
//! bytes as requested, bytes as mimalloc rounds them, and blocks; and the process's RSS.
//! A test or bench binary that wants the counts declares
//! `#[global_allocator] static A: counting::Counting = counting::Counting;`.
#![allow(unsafe_code, dead_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};

pub struct Counting;

static REQUESTED: AtomicIsize = AtomicIsize::new(0);
static USABLE: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);

extern "C" {
    /// mimalloc's size of a block, its size class included.
    fn mi_usable_size(p: *const u8) -> usize;
}

fn count(p: *mut u8, layout: Layout, sign: isize) {
    if !p.is_null() {
        REQUESTED.fetch_add(sign * layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` is a live block of mimalloc's (checked non-null above).
        let usable = unsafe { mi_usable_size(p) } as isize;
        USABLE.fetch_add(sign * usable, Ordering::Relaxed);
        BLOCKS.fetch_add(sign, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to mimalloc unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
        count(p, layout, 1);
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        count(p, layout, 1);
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        count(p, layout, -1);
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted out before the block may move; counted back in whatever the outcome.
        count(p, layout, -1);
        // SAFETY: the caller's contract, passed on.
        let q = unsafe { mimalloc::MiMalloc.realloc(p, layout, new_size) };
        if q.is_null() {
            count(p, layout, 1);
        } else {
            // SAFETY: the caller's contract makes `new_size` valid with this alignment.
            let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            count(q, new, 1);
        }
        q
    }
}

/// What is live at one moment, and this process's RSS.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    pub requested: isize,
    pub usable: isize,
    pub blocks: isize,
    pub rss: isize,
}

/// This process's resident set, in bytes (0 where `/proc` cannot tell).
pub fn rss() -> isize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: isize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * rustix::param::page_size() as isize
}

impl Live {
    pub fn now() -> Self {
        Self {
            requested: REQUESTED.load(Ordering::Relaxed),
            usable: USABLE.load(Ordering::Relaxed),
            blocks: BLOCKS.load(Ordering::Relaxed),
            rss: rss(),
        }
    }

    /// What has been allocated (and not freed) since `self`.
    pub fn since(self) -> Self {
        let now = Self::now();
        Self {
            requested: now.requested - self.requested,
            usable: now.usable - self.usable,
            blocks: now.blocks - self.blocks,
            rss: now.rss - self.rss,
        }
    }
}
