//! The `video` policy: which slices a tier keeps, from what a video cache knows about
//! how players read titles. The memory tier (`cache.memory_policy`) and the disk tier
//! (`cache.disk.policy`) each have one, with their own budget; both are told of every
//! client read.
//!
//! Players read a title from its beginning, segment after segment, and stop after a
//! few: the value of a slice is how often its title is read lately times the share of
//! sessions that get as far as the slice, `reads(title) · exp(-offset / READ_SPAN)`.
//! A request that ends inside a slice is nearly always followed, a few seconds later, by
//! the same player's next segment starting in that slice: such a slice is kept until
//! it is read again, whatever its score, but no longer than [`PENDING_FOR`] or reads of
//! one budget's worth of bytes: a player who stopped there must not hold it long.
//!
//! moka keeps the slices (lookups, coalesced fills, purges); this decides what leaves.
//! When a fill takes the tier over its budget, the policy samples [`SAMPLE`] held slices
//! and drops the one with the lowest score, or the new slice itself when it scores no
//! higher than all of them (it was still served to its readers). moka has no eviction by a
//! score of the caller's, hence the sample (as Redis does it). The figures behind each
//! constant are in docs/performance.md ("Hit ratio").

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::cache::{ObjectId, SliceKey};

/// Mean bytes a session reads from where it starts (6 segments of 1-4 MiB on the replay
/// trace): a slice this far into a title is reached by 1/e of the sessions that start at
/// the beginning. Chosen on the hit-ratio simulation (docs/performance.md).
const READ_SPAN: f64 = 16.0 * 1_048_576.0;

/// How many held slices each eviction compares.
pub const SAMPLE: usize = 16;

/// A slice a request ended inside is kept at most this long for the player's next
/// segment (and for reads of at most one budget of bytes: a hold as long as a turnover
/// of the tier pins slices that players who stopped will never read; on the replay, 30 s
/// alone cost 0.02 to 0.04 of byte hit ratio, docs/performance.md).
pub const PENDING_FOR: Duration = Duration::from_secs(30);

/// Title read counts are halved after reads of this many times the budget (TinyLFU's
/// aging), so that popularity follows what players watch now.
const AGING_BUDGETS: u64 = 4;

/// Holds kept before expired ones are looked for (see `State::pending_limit`).
const PENDING_MIN_LIMIT: usize = 4096;

/// Score of a slice awaiting its player's next segment: above any title's count.
const PENDING_SCORE: f64 = 1e12;

pub struct VideoPolicy {
    budget: u64,
    state: Mutex<State>,
}

struct State {
    /// Recent reads per title, in slices read, halved every aging period.
    titles: HashMap<ObjectId, u32>,
    /// Slices a request ended inside, with when that was and `read_total` then.
    pending: HashMap<SliceKey, (Instant, u64)>,
    /// `pending` is rid of expired holds when it grows past this (besides at aging), so
    /// that it stays bounded however rarely aging comes.
    pending_limit: usize,
    /// Held slices and their weights, for sampling; `at` gives each one's place.
    held: Vec<(SliceKey, u64)>,
    at: HashMap<SliceKey, usize>,
    held_bytes: u64,
    /// Bytes read since the last aging.
    read_bytes: u64,
    /// Bytes read since the start.
    read_total: u64,
    slice_bytes: u64,
    rng: u64,
    /// The policy's budget: a hold ends after reads of this many bytes.
    budget: u64,
}

/// Whether a hold set at `at` (with `read_total` then) still holds.
fn holds(at: (Instant, u64), now: Instant, read_total: u64, budget: u64) -> bool {
    now.duration_since(at.0) < PENDING_FOR && read_total.saturating_sub(at.1) < budget
}

impl State {
    fn score(&self, key: &SliceKey, now: Instant) -> f64 {
        if self
            .pending
            .get(key)
            .is_some_and(|at| holds(*at, now, self.read_total, self.budget))
        {
            return PENDING_SCORE;
        }
        self.title_score(key)
    }

    /// The score of a slice for its title's reads and its place in the title alone.
    fn title_score(&self, key: &SliceKey) -> f64 {
        let reads = self.titles.get(&key.object).copied().unwrap_or(0);
        let offset = key.index.saturating_mul(self.slice_bytes) as f64;
        f64::from(reads) * (-offset / READ_SPAN).exp()
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: sampling needs no more.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// The lowest-scoring of [`SAMPLE`] held slices sampled at random, or `key` (of
    /// score `mine`) when none scores lower. `held` must not be empty.
    fn lowest_sampled(&mut self, key: SliceKey, mine: f64, now: Instant) -> SliceKey {
        let mut worst = (mine, key);
        for _ in 0..SAMPLE {
            let i = (self.next_random() % self.held.len() as u64) as usize;
            let candidate = self.held[i].0;
            if candidate == key {
                continue;
            }
            let score = self.score(&candidate, now);
            if score < worst.0 {
                worst = (score, candidate);
            }
        }
        if worst.1 == key && mine.is_infinite() {
            // A slice that stays, and the sample met only itself: any other goes.
            if let Some(&(other, _)) = self.held.iter().find(|(k, _)| *k != key) {
                return other;
            }
        }
        worst.1
    }

    fn remove(&mut self, key: &SliceKey) -> bool {
        let Some(i) = self.at.remove(key) else {
            return false;
        };
        let (_, weight) = self.held.swap_remove(i);
        self.held_bytes -= weight;
        if let Some((moved, _)) = self.held.get(i) {
            self.at.insert(*moved, i);
        }
        true
    }

    fn age(&mut self, now: Instant) {
        self.titles.retain(|_, n| {
            *n /= 2;
            *n > 0
        });
        self.drop_expired_holds(now);
    }

    fn drop_expired_holds(&mut self, now: Instant) {
        let (total, budget) = (self.read_total, self.budget);
        self.pending.retain(|_, at| holds(*at, now, total, budget));
    }
}

impl VideoPolicy {
    /// A policy keeping at most `budget` weighed bytes.
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            state: Mutex::new(State {
                titles: HashMap::new(),
                pending: HashMap::new(),
                pending_limit: PENDING_MIN_LIMIT,
                held: Vec::new(),
                at: HashMap::new(),
                held_bytes: 0,
                read_bytes: 0,
                read_total: 0,
                slice_bytes: 1 << 20,
                rng: 0x9E37_79B9_7F4A_7C15,
                budget,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics under this lock; a poisoned one still holds consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client read slices `first..=last` of `object` (of `slice_bytes` each); `ends_inside`:
    /// the read stopped inside slice `last`, before the object's end.
    pub fn read(
        &self,
        object: ObjectId,
        first: u64,
        last: u64,
        ends_inside: bool,
        slice_bytes: u64,
    ) {
        let now = Instant::now();
        let slices = last.saturating_sub(first) + 1;
        let mut guard = self.lock();
        let st = &mut *guard;
        st.slice_bytes = slice_bytes;
        let n = st.titles.entry(object).or_insert(0);
        *n = n.saturating_add(u32::try_from(slices).unwrap_or(u32::MAX));
        // The player's previous read ended in `first`: that wait is over.
        st.pending.remove(&SliceKey {
            object,
            index: first,
        });
        let bytes = slices.saturating_mul(slice_bytes);
        st.read_bytes = st.read_bytes.saturating_add(bytes);
        st.read_total = st.read_total.saturating_add(bytes);
        if ends_inside {
            if st.pending.len() >= st.pending_limit {
                st.drop_expired_holds(now);
                st.pending_limit = (2 * st.pending.len()).max(PENDING_MIN_LIMIT);
            }
            st.pending.insert(
                SliceKey {
                    object,
                    index: last,
                },
                (now, st.read_total),
            );
        }
        if st.read_bytes >= self.budget.saturating_mul(AGING_BUDGETS) {
            st.read_bytes = 0;
            st.age(now);
        }
    }

    /// A slice of `weight` bytes entered the tier. Returns the slices to drop to stay
    /// within the budget: sampled ones of lower score, or `key` itself.
    pub fn filled(&self, key: SliceKey, weight: u64) -> Vec<SliceKey> {
        self.enter(key, weight, false)
    }

    /// [`VideoPolicy::filled`] for a slice that stays whatever it scores now (one an
    /// operator's fill job placed, or one found at start): only others are dropped.
    pub fn placed(&self, key: SliceKey, weight: u64) -> Vec<SliceKey> {
        self.enter(key, weight, true)
    }

    fn enter(&self, key: SliceKey, weight: u64, stays: bool) -> Vec<SliceKey> {
        let now = Instant::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.at.contains_key(&key) {
            return Vec::new();
        }
        // A slice over the whole budget cannot stay, even when placed; nothing goes for it.
        if weight > self.budget {
            return vec![key];
        }
        // Above any held slice's score, the pending ones' included: never the lowest.
        let mine = if stays {
            f64::INFINITY
        } else {
            st.score(&key, now)
        };
        st.at.insert(key, st.held.len());
        st.held.push((key, weight));
        st.held_bytes += weight;
        let mut doomed = Vec::new();
        while st.held_bytes > self.budget && st.at.contains_key(&key) {
            let worst = st.lowest_sampled(key, mine, now);
            st.remove(&worst);
            doomed.push(worst);
        }
        doomed
    }

    /// Whether a slice of `weight` bytes not yet held would be kept if it were filled
    /// now: there is room, or it scores above one of [`SAMPLE`] sampled held slices.
    /// Changes nothing but the sampling's random state. A slice that would not be kept
    /// is served to its readers without entering the tier or the page pool.
    pub fn would_keep(&self, key: &SliceKey, weight: u64) -> bool {
        self.would_keep_scored(key, weight, State::score)
    }

    /// [`VideoPolicy::would_keep`] for a slice that another tier (the disk) holds: kept
    /// for its title's score alone, not held for a player's next segment. That next
    /// read costs a read of a few blocks from the other tier, not an origin fetch, and
    /// is not worth displacing a slice held nowhere else.
    pub fn would_keep_held_elsewhere(&self, key: &SliceKey, weight: u64) -> bool {
        self.would_keep_scored(key, weight, |st, key, _| st.title_score(key))
    }

    fn would_keep_scored(
        &self,
        key: &SliceKey,
        weight: u64,
        score: impl Fn(&State, &SliceKey, Instant) -> f64,
    ) -> bool {
        let now = Instant::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.at.contains_key(key) || st.held_bytes + weight <= self.budget {
            return true;
        }
        if weight > self.budget || st.held.is_empty() {
            return false;
        }
        let mine = score(st, key, now);
        st.lowest_sampled(*key, mine, now) != *key
    }

    /// The slice left the tier (purged, invalidated, or evicted by moka itself).
    pub fn forget(&self, key: &SliceKey) {
        self.lock().remove(key);
    }

    /// Bytes the policy counts as held.
    #[cfg(test)]
    pub fn held_bytes(&self) -> u64 {
        self.lock().held_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slice size of these tests; budgets and weights are in slices, as the edge's are.
    const S: u64 = 1 << 20;

    fn key(o: &str, index: u64) -> SliceKey {
        SliceKey {
            object: ObjectId::new(o, "v"),
            index,
        }
    }

    #[test]
    fn a_new_slice_of_an_unread_title_is_not_kept_over_slices_of_a_popular_one() {
        let policy = VideoPolicy::new(4 * S);
        for _ in 0..10 {
            policy.read(ObjectId::new("hit", "v"), 0, 3, false, S);
        }
        for i in 0..4 {
            assert!(policy.filled(key("hit", i), S).is_empty());
        }
        assert_eq!(policy.filled(key("once", 0), S), [key("once", 0)]);
        assert_eq!(policy.held_bytes(), 4 * S);
    }

    #[test]
    fn early_slices_of_a_title_outweigh_late_ones() {
        let policy = VideoPolicy::new(2 * S);
        policy.read(ObjectId::new("t", "v"), 0, 0, false, S);
        assert!(policy.filled(key("t", 200), S).is_empty());
        assert!(policy.filled(key("t", 100), S).is_empty());
        // Slice 0 of the same title displaces one of the late slices.
        let doomed = policy.filled(key("t", 0), S);
        assert_eq!(doomed.len(), 1);
        assert_ne!(doomed[0], key("t", 0));
    }

    /// A policy with room for two slices, holding slices 0 and 1 of a title read ten
    /// times.
    fn full_of_a_hit() -> VideoPolicy {
        let policy = VideoPolicy::new(2 * S);
        for _ in 0..10 {
            policy.read(ObjectId::new("hit", "v"), 0, 1, false, S);
        }
        assert!(policy.filled(key("hit", 0), S).is_empty());
        assert!(policy.filled(key("hit", 1), S).is_empty());
        policy
    }

    #[test]
    fn a_slice_a_read_ended_inside_is_kept_until_it_is_read_again() {
        let policy = full_of_a_hit();
        // A player of an unpopular title stopped inside its slice 5: kept over the others.
        policy.read(ObjectId::new("rare", "v"), 3, 5, true, S);
        let doomed = policy.filled(key("rare", 5), S);
        assert_eq!(doomed.len(), 1);
        assert_ne!(doomed[0], key("rare", 5));
        // Its next segment read it: it is worth its title's reads again.
        policy.read(ObjectId::new("rare", "v"), 5, 6, false, S);
        for _ in 0..10 {
            policy.read(ObjectId::new("hit", "v"), 0, 1, false, S);
        }
        let lost = if doomed[0] == key("hit", 0) { 0 } else { 1 };
        assert_eq!(policy.filled(key("hit", lost), S), [key("rare", 5)]);
    }

    #[test]
    fn a_slice_held_elsewhere_is_kept_for_its_score_not_for_a_players_next_segment() {
        let policy = full_of_a_hit();
        // A player stopped inside slice 5 of a rare title.
        policy.read(ObjectId::new("rare", "v"), 3, 5, true, S);
        assert!(
            policy.would_keep(&key("rare", 5), S),
            "held for the next segment"
        );
        assert!(
            !policy.would_keep_held_elsewhere(&key("rare", 5), S),
            "its next segment reads it from the disk"
        );
        // A slice of a title read more than what is held still outscores it.
        for _ in 0..30 {
            policy.read(ObjectId::new("hotter", "v"), 0, 0, false, S);
        }
        assert!(policy.would_keep_held_elsewhere(&key("hotter", 0), S));
        let fresh = VideoPolicy::new(2 * S);
        fresh.read(ObjectId::new("hit", "v"), 2, 2, false, S);
        assert!(fresh.would_keep_held_elsewhere(&key("hit", 2), S), "room");
    }

    #[test]
    fn a_hold_ends_after_reads_of_a_budget() {
        let policy = VideoPolicy::new(2 * S);
        for _ in 0..10 {
            policy.read(ObjectId::new("hit", "v"), 0, 1, false, S);
        }
        assert!(policy.filled(key("hit", 0), S).is_empty());
        // A player stopped inside slice 5 of a rare title and never came back.
        policy.read(ObjectId::new("rare", "v"), 3, 5, true, S);
        assert_eq!(policy.filled(key("rare", 5), S), []);
        // Others read two slices (a budget's worth) since: the hold is over.
        policy.read(ObjectId::new("hit", "v"), 0, 1, false, S);
        assert_eq!(policy.filled(key("hit", 1), S), [key("rare", 5)]);
    }

    #[test]
    fn a_slice_is_foretold_kept_when_there_is_room_or_it_outscores_what_is_held() {
        let policy = VideoPolicy::new(2 * S);
        assert!(policy.would_keep(&key("t", 0), S), "room");
        assert!(
            !policy.would_keep(&key("t", 0), 3 * S),
            "over the whole budget"
        );
        for _ in 0..10 {
            policy.read(ObjectId::new("hit", "v"), 0, 1, false, S);
        }
        assert!(policy.filled(key("hit", 0), S).is_empty());
        assert!(policy.filled(key("hit", 1), S).is_empty());
        assert!(policy.would_keep(&key("hit", 1), S), "already held");
        assert!(!policy.would_keep(&key("once", 0), S));
        assert!(!policy.would_keep(&key("hit", 40), S), "far into the title");
        assert_eq!(policy.held_bytes(), 2 * S, "asking changes nothing");
        for _ in 0..100 {
            policy.read(ObjectId::new("new", "v"), 0, 0, false, S);
        }
        assert!(policy.would_keep(&key("new", 0), S));
        // A slice a read ended inside is kept over anything.
        policy.read(ObjectId::new("rare", "v"), 3, 5, true, S);
        assert!(policy.would_keep(&key("rare", 5), S));
    }

    #[test]
    fn a_placed_slice_stays_and_displaces_held_ones_whatever_they_score() {
        let policy = VideoPolicy::new(2 * S);
        for _ in 0..10 {
            policy.read(ObjectId::new("hit", "v"), 0, 1, false, S);
        }
        assert!(policy.filled(key("hit", 0), S).is_empty());
        // Even one a read ended inside (the highest score there is).
        policy.read(ObjectId::new("hit", "v"), 0, 1, true, S);
        assert!(policy.filled(key("hit", 1), S).is_empty());
        let doomed = policy.placed(key("unread", 9), S);
        assert_eq!(doomed.len(), 1);
        assert_ne!(doomed[0], key("unread", 9));
        assert!(policy.would_keep(&key("unread", 9), S), "held");
        assert_eq!(policy.held_bytes(), 2 * S);
        // A slice larger than the whole budget cannot stay, placed or not.
        assert_eq!(policy.placed(key("big", 0), 3 * S), [key("big", 0)]);
        assert_eq!(policy.held_bytes(), 2 * S, "nothing displaced for it");
    }

    #[test]
    fn forgetting_a_slice_frees_its_bytes() {
        let policy = VideoPolicy::new(2 * S);
        assert!(policy.filled(key("t", 0), S).is_empty());
        assert!(policy.filled(key("t", 1), S).is_empty());
        policy.forget(&key("t", 0));
        policy.forget(&key("t", 0));
        assert_eq!(policy.held_bytes(), S);
        assert!(policy.filled(key("u", 0), S).is_empty());
    }
}
