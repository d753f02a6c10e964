//! When background delivery gives up on a record. Pure.
//!
//! Records are delivered in order, so a record the upstream never accepts would hold up
//! every later one. Each failed attempt is judged by what it says about the record:
//!
//! | attempt | means | counts toward |
//! |---|---|---|
//! | 2xx | delivered | – |
//! | 4xx other than 408 and 429 | the upstream refuses this record | dead letter at once |
//! | 500, 501, 505 and up, 3xx, an answer that is not HTTP | the upstream took the record and failed on it: perhaps the record's fault | `max_attempts` and `max_retry_secs` |
//! | no connection, timeout, 408, 429, 502, 503, 504 | the upstream is down, busy or behind a gateway that cannot reach it: nothing about the record | `max_retry_secs` only |
//!
//! Only the record at the head of a queue is attempted, so only its clock runs: an
//! upstream that is down for a day costs at most one record per `max_retry_secs`, not
//! the whole spool. A record that makes the upstream fail with 500 is set aside after
//! `max_attempts` answers (about a minute with the defaults), and the records
//! behind it go on. The price: an upstream that answers 500 to everything for a long
//! time also loses one record per `max_attempts` (they are kept as dead letters).

use std::time::Duration;

use crate::metrics::DeadLetterReason;

/// Default `forward.max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Default `forward.max_retry_secs`: one hour.
pub const DEFAULT_MAX_RETRY_SECS: u64 = 3_600;

/// What one delivery attempt said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// The upstream refuses the record; it will not change its mind.
    Rejected,
    /// The upstream took the record and failed on it.
    Failed,
    /// The upstream could not take the record now.
    Unavailable,
}

impl Attempt {
    /// Judges an answer's status.
    pub fn of_status(status: u16) -> Self {
        match status {
            200..=299 => Attempt::Delivered,
            408 | 429 | 502..=504 => Attempt::Unavailable,
            400..=499 => Attempt::Rejected,
            _ => Attempt::Failed,
        }
    }
}

/// The failed attempts of one waiting record, kept in the spool so that a restart does
/// not reset them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    /// Attempts judged [`Attempt::Failed`].
    pub answered: u32,
    /// Failed attempts of any kind (they set the backoff).
    pub tries: u32,
    /// When the first attempt failed, unix ms; 0 before any.
    pub first_ms: u64,
}

impl Failures {
    /// Counts a failed attempt made at `now_ms`.
    pub fn note(&mut self, attempt: Attempt, now_ms: u64) {
        if self.tries == 0 {
            self.first_ms = now_ms;
        }
        self.tries = self.tries.saturating_add(1);
        if attempt == Attempt::Failed {
            self.answered = self.answered.saturating_add(1);
        }
    }
}

/// When delivery gives up on a record (`forward.max_attempts`, `forward.max_retry_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryLimits {
    pub max_attempts: u32,
    pub max_retry: Duration,
}

impl Default for RetryLimits {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_retry: Duration::from_secs(DEFAULT_MAX_RETRY_SECS),
        }
    }
}

impl RetryLimits {
    /// Why delivery gives up on a record after its latest failed attempt at `now_ms`,
    /// or `None` to try again.
    pub fn give_up(&self, f: &Failures, now_ms: u64) -> Option<DeadLetterReason> {
        if f.answered >= self.max_attempts {
            return Some(DeadLetterReason::MaxAttempts);
        }
        let waited = Duration::from_millis(now_ms.saturating_sub(f.first_ms));
        (f.tries > 0 && waited >= self.max_retry).then_some(DeadLetterReason::MaxAge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_judged_by_status() {
        let cases = [
            (200, Attempt::Delivered),
            (204, Attempt::Delivered),
            (400, Attempt::Rejected),
            (404, Attempt::Rejected),
            (413, Attempt::Rejected),
            (408, Attempt::Unavailable),
            (429, Attempt::Unavailable),
            (502, Attempt::Unavailable),
            (503, Attempt::Unavailable),
            (504, Attempt::Unavailable),
            (500, Attempt::Failed),
            (501, Attempt::Failed),
            (507, Attempt::Failed),
            (302, Attempt::Failed),
        ];
        for (status, attempt) in cases {
            assert_eq!(Attempt::of_status(status), attempt, "{status}");
        }
    }

    #[test]
    fn a_record_the_upstream_keeps_failing_on_is_given_up_after_max_attempts() {
        let limits = RetryLimits {
            max_attempts: 3,
            max_retry: Duration::from_secs(3_600),
        };
        let mut f = Failures::default();
        for (i, now) in [1_000, 2_000, 3_000].into_iter().enumerate() {
            assert_eq!(limits.give_up(&f, now), None, "after {i} failures");
            f.note(Attempt::Failed, now);
        }
        assert_eq!(f.first_ms, 1_000);
        assert_eq!(
            limits.give_up(&f, 3_000),
            Some(DeadLetterReason::MaxAttempts)
        );
    }

    #[test]
    fn an_unreachable_upstream_costs_a_record_only_after_max_retry() {
        let limits = RetryLimits {
            max_attempts: 1,
            max_retry: Duration::from_secs(60),
        };
        let mut f = Failures::default();
        // A thousand refused connections and 503s within the minute: kept.
        for i in 0..1_000u64 {
            let attempt = if i % 2 == 0 {
                Attempt::Unavailable
            } else {
                Attempt::of_status(503)
            };
            f.note(attempt, 5_000 + i * 59);
            assert_eq!(limits.give_up(&f, 5_000 + i * 59), None);
        }
        assert_eq!((f.answered, f.tries, f.first_ms), (0, 1_000, 5_000));
        assert_eq!(limits.give_up(&f, 64_999), None);
        assert_eq!(limits.give_up(&f, 65_000), Some(DeadLetterReason::MaxAge));
    }

    #[test]
    fn a_record_never_tried_is_never_given_up() {
        let limits = RetryLimits {
            max_attempts: 1,
            max_retry: Duration::from_millis(1),
        };
        assert_eq!(limits.give_up(&Failures::default(), u64::MAX), None);
    }
}
