//! When and how fast fill jobs fetch: `fill.window` in the machine's local time, and
//! `fill.max_bytes_per_sec` over all jobs together.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::Window;

/// The rate limiter counts in cells of this many bytes, so that rates up to terabytes
/// a second fit its `u32` cells.
const CELL_BYTES: u64 = 1024;

/// The current minute after local midnight and second in that minute, in the
/// machine's time zone (`TZ`, else `/etc/localtime`).
pub fn local_time() -> (u16, u8) {
    let now = jiff::ZonedDateTime::now();
    (
        now.hour() as u16 * 60 + now.minute() as u16,
        now.second().clamp(0, 59) as u8,
    )
}

/// How long until `window` opens, at `minute` after local midnight and `second` into
/// it; `None` while it is open.
pub fn until_open(window: &Window, minute: u16, second: u8) -> Option<Duration> {
    if window.contains(minute) {
        return None;
    }
    let minutes = (window.start_min + 1440 - minute) % 1440;
    Some(Duration::from_secs(
        u64::from(minutes) * 60 - u64::from(second),
    ))
}

/// The byte rate limit of all fill jobs together (GCRA, governor): a fetch takes its
/// bytes before it starts, so fetches never run ahead of the rate by more than one
/// slice.
pub struct Pace {
    limiter: Option<DefaultDirectRateLimiter>,
    burst_cells: NonZeroU32,
}

impl Pace {
    /// `bytes_per_sec` 0: no limit. A burst of one slice: the largest fetch.
    pub fn new(bytes_per_sec: u64, slice_bytes: u64) -> Self {
        let burst_cells = NonZeroU32::new(cells(slice_bytes)).unwrap_or(NonZeroU32::MIN);
        let limiter = (bytes_per_sec > 0)
            .then(|| {
                let per_cell = Duration::from_nanos(
                    (CELL_BYTES as u128 * 1_000_000_000 / bytes_per_sec as u128)
                        .min(u64::MAX as u128) as u64,
                );
                // Faster than a cell a nanosecond is no limit at all.
                Quota::with_period(per_cell).map(|q| q.allow_burst(burst_cells))
            })
            .flatten()
            .map(RateLimiter::direct);
        Self {
            limiter,
            burst_cells,
        }
    }

    /// Waits until `bytes` may be fetched.
    pub async fn take(&self, bytes: u64) {
        let Some(limiter) = &self.limiter else {
            return;
        };
        let n =
            NonZeroU32::new(cells(bytes).min(self.burst_cells.get())).unwrap_or(NonZeroU32::MIN);
        // Never more than the burst, so never refused.
        let _ = limiter.until_n_ready(n).await;
    }
}

fn cells(bytes: u64) -> u32 {
    bytes.div_ceil(CELL_BYTES).min(u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn time_until_a_window_opens() {
        let night = Window::parse("22:30-06:00").unwrap();
        assert_eq!(until_open(&night, 23 * 60, 10), None);
        assert_eq!(until_open(&night, 5 * 60 + 59, 59), None);
        assert_eq!(
            until_open(&night, 6 * 60, 0),
            Some(Duration::from_secs((16 * 60 + 30) * 60))
        );
        assert_eq!(
            until_open(&night, 22 * 60 + 29, 30),
            Some(Duration::from_secs(30))
        );
        let day = Window::parse("02:00-14:00").unwrap();
        assert_eq!(
            until_open(&day, 23 * 60, 0),
            Some(Duration::from_secs(3 * 3600))
        );
        assert_eq!(until_open(&day, 2 * 60, 0), None);
    }

    #[tokio::test]
    async fn the_pace_holds_fetches_to_the_rate() {
        // 1 MiB/s with 64 KiB slices: 640 KiB take (640 - 64) / 1024 s once the first
        // slice's burst is spent.
        let pace = Pace::new(1 << 20, 64 << 10);
        let started = Instant::now();
        for _ in 0..10 {
            pace.take(64 << 10).await;
        }
        let took = started.elapsed().as_secs_f64();
        assert!((0.5..0.8).contains(&took), "took {took} s");

        let free = Pace::new(0, 64 << 10);
        let started = Instant::now();
        for _ in 0..1000 {
            free.take(64 << 10).await;
        }
        assert!(started.elapsed() < Duration::from_millis(50));
        // A rate of a byte a second still lets a fetch through, eventually.
        assert_eq!(Pace::new(1, 64 << 10).burst_cells.get(), 64);
    }
}
