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
//! 3. The count is an upper bound of the memory held outside the cache: a slice held by
//!    two responses counts twice, and a slice still in the cache counts too.
//!
//! Performance: an atomic load to admit, an atomic add or subtract per slice; no lock and
//! no allocation.

use prometheus::IntGauge;

/// The budget of `limits.max_pinned_bytes`, over the gauge `cdn_edge_response_pinned_bytes`.
pub struct PinnedBudget {
    gauge: IntGauge,
    max_bytes: i64,
    slice_bytes: i64,
}

impl PinnedBudget {
    pub fn new(max_bytes: u64, slice_bytes: u64, gauge: IntGauge) -> Self {
        Self {
            gauge,
            max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
            slice_bytes: i64::try_from(slice_bytes).unwrap_or(i64::MAX),
        }
    }

    /// A guard for a new response, holding nothing yet; `None` when one more slice
    /// would go over the budget. Concurrent admissions may overshoot it by a slice each.
    pub fn admit(&self) -> Option<Pinned<'_>> {
        (self.gauge.get().saturating_add(self.slice_bytes) <= self.max_bytes).then_some(Pinned {
            gauge: &self.gauge,
            held: 0,
        })
    }

    /// Bytes held now by every response.
    pub fn held(&self) -> u64 {
        self.gauge.get().max(0) as u64
    }
}

/// What one response holds; dropping it lets go of everything.
#[derive(Debug)]
pub struct Pinned<'a> {
    gauge: &'a IntGauge,
    held: i64,
}

impl Pinned<'_> {
    /// The response now holds `bytes` more.
    pub fn hold(&mut self, bytes: usize) {
        let bytes = bytes as i64;
        self.held += bytes;
        self.gauge.add(bytes);
    }

    /// The response let go of `bytes` it held.
    pub fn release(&mut self, bytes: usize) {
        let bytes = (bytes as i64).min(self.held);
        self.held -= bytes;
        self.gauge.sub(bytes);
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.gauge.sub(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: u64) -> PinnedBudget {
        PinnedBudget::new(max, 100, IntGauge::new("t", "t").unwrap())
    }

    #[test]
    fn responses_are_admitted_while_a_slice_fits_and_give_back_all_they_hold() {
        let b = budget(250);
        let mut first = b.admit().unwrap();
        first.hold(100);
        first.hold(100);
        assert_eq!(b.held(), 200);
        assert!(b.admit().is_none(), "200 + a slice of 100 > 250");
        first.release(100);
        let mut second = b.admit().expect("100 + 100 <= 250");
        second.hold(100);
        assert_eq!(b.held(), 200);
        drop(first);
        drop(second);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_panicking_response_gives_back_what_it_held() {
        let b = budget(1_000);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut p = b.admit().unwrap();
            p.hold(300);
            panic!("a handler bug");
        }));
        assert!(caught.is_err());
        assert_eq!(b.held(), 0);
    }
}
