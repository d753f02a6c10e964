//! Bytes of slices held by video responses in flight, and their budget.
//!
//! A video response holds the slice it is writing, and the next one once fetched, until
//! the client has taken them. A slice evicted from the memory tier meanwhile stays in
//! memory (its page-pool slot stays in use, so new slices go to the heap): without a
//! bound, slow clients could hold any amount outside `cache.memory_bytes`.
//!
//! Invariants:
//! 1. Every byte a response adds to the gauge it takes off again, when it lets the slice
//!    go or when its guard is dropped (an error, the client gone, a panic).
//! 2. A video response starts only while one more slice fits under the budget; one
//!    that would not is answered 503 before it holds anything.
//! 3. A slice counts once however many responses hold it: responses that hold the same
//!    bytes (one cached slice, shared without a copy) are counted by the slice's memory,
//!    told apart by address. Slices that are copies of each other (fetched again after
//!    an eviction) are separate memory and count apart. A guard keeps a handle on each
//!    slice it holds, so an address in the maps is live memory, never reused meanwhile.
//! 4. The count is an upper bound of the memory held outside the cache: a slice still in
//!    the cache counts too.
//!
//! Performance: an atomic load to admit; per slice held or let go, a short lock on one
//! of [`SHARDS`] small maps (never held across an await) and an atomic add or subtract
//! when the slice's first holder comes or its last one goes. A response holds at most two
//! slices, so its guard's list does not grow past that.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use prometheus::IntGauge;

/// Maps of held slices, chosen by address: responses on different slices rarely wait on
/// each other's lock.
const SHARDS: usize = 16;

/// The budget of `limits.max_pinned_bytes`, over the gauge `cdn_edge_response_pinned_bytes`.
pub struct PinnedBudget {
    gauge: IntGauge,
    max_bytes: i64,
    slice_bytes: i64,
    /// Held slices by address: how many responses hold each, and its length.
    holders: [Mutex<HashMap<usize, Holders>>; SHARDS],
}

impl PinnedBudget {
    pub fn new(max_bytes: u64, slice_bytes: u64, gauge: IntGauge) -> Self {
        Self {
            gauge,
            max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
            slice_bytes: i64::try_from(slice_bytes).unwrap_or(i64::MAX),
            holders: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    /// A guard for a new response, holding nothing yet; `None` when one more slice
    /// would go over the budget. Concurrent admissions may overshoot it by a slice each.
    pub fn admit(&self) -> Option<Pinned<'_>> {
        (self.gauge.get().saturating_add(self.slice_bytes) <= self.max_bytes).then_some(Pinned {
            budget: self,
            held: Vec::new(),
        })
    }

    /// Bytes held now by every response, each slice once.
    pub fn held(&self) -> u64 {
        self.gauge.get().max(0) as u64
    }

    fn shard(&self, addr: usize) -> &Mutex<HashMap<usize, Holders>> {
        let i = ((addr as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS;
        &self.holders[i]
    }

    /// One more holder of `slice`; the first one counts its bytes.
    fn add_holder(&self, slice: &Bytes) {
        let addr = slice.as_ptr() as usize;
        let first = {
            let mut map = self.shard(addr).lock().unwrap_or_else(|p| p.into_inner());
            let h = map.entry(addr).or_insert(Holders {
                count: 0,
                len: slice.len(),
            });
            h.count += 1;
            h.count == 1
        };
        if first {
            self.gauge.add(slice.len() as i64);
        }
    }

    /// One holder fewer of `slice`; the last one takes off the bytes the first counted.
    fn remove_holder(&self, slice: &Bytes) {
        let addr = slice.as_ptr() as usize;
        let counted = {
            let mut map = self.shard(addr).lock().unwrap_or_else(|p| p.into_inner());
            match map.get_mut(&addr) {
                Some(h) if h.count > 1 => {
                    h.count -= 1;
                    None
                }
                Some(_) => map.remove(&addr).map(|h| h.len),
                None => None,
            }
        };
        if let Some(len) = counted {
            self.gauge.sub(len as i64);
        }
    }
}

/// The responses holding one slice, and the bytes its first holder counted.
struct Holders {
    count: u32,
    len: usize,
}

/// What one response holds; dropping it lets go of everything.
pub struct Pinned<'a> {
    budget: &'a PinnedBudget,
    /// A handle on each slice held (at most two).
    held: Vec<Bytes>,
}

impl std::fmt::Debug for Pinned<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned")
            .field("slices", &self.held.len())
            .finish()
    }
}

impl Pinned<'_> {
    /// The response now holds `slice` (a whole slice as the store returned it).
    pub fn hold(&mut self, slice: &Bytes) {
        if slice.is_empty() {
            return;
        }
        self.budget.add_holder(slice);
        self.held.push(slice.clone());
    }

    /// The response let go of `slice`, which it held; nothing if it did not.
    pub fn release(&mut self, slice: &Bytes) {
        let same = |h: &Bytes| h.as_ptr() == slice.as_ptr() && h.len() == slice.len();
        if let Some(i) = self.held.iter().position(same) {
            let held = self.held.swap_remove(i);
            self.budget.remove_holder(&held);
        }
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        for held in std::mem::take(&mut self.held) {
            self.budget.remove_holder(&held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: u64) -> PinnedBudget {
        PinnedBudget::new(max, 100, IntGauge::new("t", "t").unwrap())
    }

    fn slice() -> Bytes {
        Bytes::from(vec![7u8; 100])
    }

    #[test]
    fn responses_are_admitted_while_a_slice_fits_and_give_back_all_they_hold() {
        let b = budget(250);
        let (one, two) = (slice(), slice());
        let mut first = b.admit().unwrap();
        first.hold(&one);
        first.hold(&two);
        assert_eq!(b.held(), 200);
        assert!(b.admit().is_none(), "200 + a slice of 100 > 250");
        first.release(&one);
        let mut second = b.admit().expect("100 + 100 <= 250");
        second.hold(&slice());
        assert_eq!(b.held(), 200);
        drop(first);
        drop(second);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_slice_held_by_many_responses_counts_once() {
        let b = budget(250);
        let hot = slice();
        let mut guards: Vec<_> = (0..50)
            .map(|_| {
                let mut p = b.admit().expect("one shared slice leaves room for another");
                p.hold(&hot.clone());
                p
            })
            .collect();
        assert_eq!(b.held(), 100);
        // A copy of the same bytes is other memory: it counts apart.
        guards[0].hold(&Bytes::copy_from_slice(&hot));
        assert_eq!(b.held(), 200);
        assert!(b.admit().is_none());
        guards.truncate(1);
        assert_eq!(
            b.held(),
            200,
            "the first response still holds the hot slice and the copy"
        );
        guards[0].release(&hot);
        assert_eq!(b.held(), 100);
        guards[0].release(&hot);
        assert_eq!(
            b.held(),
            100,
            "a slice the response no longer holds is not let go twice"
        );
        guards.clear();
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_panicking_response_gives_back_what_it_held() {
        let b = budget(1_000);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut p = b.admit().unwrap();
            p.hold(&Bytes::from(vec![0u8; 300]));
            panic!("a handler bug");
        }));
        assert!(caught.is_err());
        assert_eq!(b.held(), 0);
    }
}
