//! The fill runner: a background service (its own thread and runtime, so that filling
//! never holds up client traffic) that runs the jobs one after another, oldest first.
//!
//! A job, in order:
//! 1. Reads its manifest; its slice counts start again from zero (a resumed job walks
//!    every slice again, and a slice held counts as done).
//! 2. Waits for `fill.window`.
//! 3. Plans each object (`fill.concurrency` at a time): its size from the cache's
//!    metadata, else from fetching the first wanted slice this node owns (a 416 past
//!    the end tells the size just as well); the wanted slices are cut to the size.
//! 4. Walks the wanted slices this node owns, `fill.concurrency` at a time: a slice
//!    held counts as done; else, inside the window and at the pace allowed, it is
//!    fetched, up to `fill.attempts` times with a growing pause between tries.
//! 5. Ends `done`, or `failed` with `errors` > 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::manifest::{slice_spans, Wanted};
use super::schedule::{local_time, until_open, Pace};
use super::{FillJobs, JobState};
use crate::app::AppState;
use crate::cache::{ObjectMeta, ObjectRef, Source, Via};
use crate::metrics::FillSlice;
use crate::origin::OriginError;
use crate::range::slice_len;

/// Longest sleep while waiting for the window, so that a change of the clock or of the
/// time zone is seen.
const WINDOW_RECHECK: Duration = Duration::from_secs(60);
/// Pause after a failed try, doubled after each: 250 ms, 500 ms, 1 s, … up to 5 s.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a running job's counts are written to the store.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Slice indices looked through for the first one this node owns.
const OWNED_SCAN: u64 = 4096;

/// Runs the fill jobs of `state.fill`.
pub struct FillRunner {
    state: Arc<AppState>,
}

impl FillRunner {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

#[async_trait]
impl BackgroundService for FillRunner {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(jobs) = self.state.fill.clone() else {
            return;
        };
        let pace = Pace::new(
            jobs.config.max_bytes_per_sec,
            self.state.store.slice_bytes(),
        );
        loop {
            if jobs.is_handed_over() || *shutdown.borrow() {
                return;
            }
            let Some(id) = jobs.next_job() else {
                tokio::select! {
                    _ = jobs.woken() => continue,
                    _ = shutdown.changed() => return,
                }
            };
            let run = JobRun {
                state: &self.state,
                jobs: &jobs,
                pace: &pace,
                id,
                saved: Mutex::new(Instant::now()),
            };
            tokio::select! {
                _ = run.run() => {}
                _ = shutdown.changed() => {
                    // Kept as it is (running or waiting): the next start resumes it.
                    jobs.save(id, true).await;
                    return;
                }
            }
        }
    }
}

/// One object of a job, planned: its metadata and the wanted slices.
struct Planned<'m> {
    wanted: &'m Wanted,
    meta: Arc<ObjectMeta>,
    /// Sorted, disjoint, inclusive slice index ranges, cut to the object's size.
    spans: Vec<(u64, u64)>,
    /// The slice fetched to learn the size (already counted in bytes).
    fetched_first: Option<u64>,
}

impl Planned<'_> {
    fn obj(&self) -> ObjectRef<'_> {
        ObjectRef::asked(&self.wanted.o, &self.wanted.v, Via::FILL)
    }

    fn indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.spans.iter().flat_map(|&(a, b)| a..=b)
    }
}

struct JobRun<'a> {
    state: &'a AppState,
    jobs: &'a Arc<FillJobs>,
    pace: &'a Pace,
    id: u64,
    saved: Mutex<Instant>,
}

impl JobRun<'_> {
    async fn run(&self) {
        let started = Instant::now();
        let manifest = match self.jobs.manifest(self.id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(job = self.id, error = %e, "fill job cannot be read; it fails");
                self.jobs.update(self.id, |p| p.errors += 1);
                return self.finish(0, started).await;
            }
        };
        self.jobs.update(self.id, |p| {
            p.slices_done = 0;
            p.errors = 0;
        });
        self.window().await;
        let concurrency = self.jobs.config.concurrency;
        // Indices, not references, go through the stream combinators: their closures
        // must not take borrowed arguments for the future to be provably `Send`.
        let planned: Vec<Option<Planned>> = stream::iter(0..manifest.len())
            .map(|i| self.plan(&manifest[i]))
            .buffered(concurrency)
            .collect()
            .await;
        let planned: Vec<Planned> = planned.into_iter().flatten().collect();
        let total = planned
            .iter()
            .map(|p| p.indices().filter(|&i| self.owns(p, i)).count() as u64)
            .sum();
        self.jobs.update(self.id, |p| p.slices_total = total);
        self.jobs.save(self.id, false).await;

        let walked = AtomicU64::new(0);
        let slices = planned.iter().enumerate().flat_map(|(k, p)| {
            p.indices()
                .filter(move |&i| self.owns(p, i))
                .map(move |i| (k, i))
        });
        stream::iter(slices.take_while(|_| !self.jobs.is_handed_over()))
            .for_each_concurrent(concurrency, |(k, index)| {
                walked.fetch_add(1, Ordering::Relaxed);
                self.slice(&planned[k], index)
            })
            .await;
        if self.jobs.is_handed_over() {
            return;
        }
        self.finish(walked.load(Ordering::Relaxed), started).await;
    }

    /// Whether this node fetches slice `index` of `p`: all without `[cluster]`.
    fn owns(&self, p: &Planned, index: u64) -> bool {
        self.state
            .site
            .as_ref()
            .is_none_or(|s| s.owns(&p.obj(), index))
    }

    /// Learns an object's size and cuts its wanted slices to it; `None` when nothing is
    /// to be fetched (no wanted slice owned here, an empty object, or an error, which
    /// is counted).
    async fn plan<'m>(&self, wanted: &'m Wanted) -> Option<Planned<'m>> {
        let store = &self.state.store;
        let slice_bytes = store.slice_bytes();
        let obj = ObjectRef::asked(&wanted.o, &wanted.v, Via::FILL);
        let spans = match &wanted.ranges {
            Some(r) => slice_spans(r, slice_bytes),
            None => vec![(0, u64::MAX / slice_bytes)],
        };
        let mut fetched_first = None;
        let meta = match store.known_meta(obj.id).await {
            Some(meta) => meta,
            None => {
                let owns = |i: u64| self.state.site.as_ref().is_none_or(|s| s.owns(&obj, i));
                let first = spans
                    .iter()
                    .flat_map(|&(a, b)| a..=b)
                    .take(OWNED_SCAN as usize)
                    .find(|&i| owns(i))?;
                let (meta, fetched) = self.learn(&obj, first).await?;
                fetched_first = fetched.then_some(first);
                meta
            }
        };
        let last = meta.size.checked_sub(1)? / slice_bytes;
        let spans = spans
            .into_iter()
            .filter(|&(a, _)| a <= last)
            .map(|(a, b)| (a, b.min(last)))
            .collect();
        Some(Planned {
            wanted,
            meta,
            spans,
            fetched_first,
        })
    }

    /// The object's metadata from the cache's lookup, which fetches slice `first`
    /// unless it is held; also says whether the job fetched it.
    async fn learn(&self, obj: &ObjectRef<'_>, first: u64) -> Option<(Arc<ObjectMeta>, bool)> {
        let store = &self.state.store;
        let attempts = self.jobs.config.attempts;
        for attempt in 1..=attempts {
            if self.jobs.is_handed_over() {
                return None;
            }
            let held = store.contains(obj.id, first);
            // Its length is not known yet: a whole slice.
            self.ready(if held { 0 } else { store.slice_bytes() }).await;
            match store.meta(obj, first, None).await {
                Ok(lookup) => {
                    let fetched = match &lookup.slice {
                        Some((_, bytes)) if lookup.fetched && !held => {
                            self.fetched(bytes.len() as u64);
                            true
                        }
                        _ => false,
                    };
                    return Some((lookup.meta, fetched));
                }
                Err(e) => {
                    if self.tried(obj, first, attempt, &e).await {
                        break;
                    }
                }
            }
        }
        self.jobs.update(self.id, |p| p.errors += 1);
        None
    }

    /// Fills slice `index` of `p` unless it is held.
    async fn slice(&self, p: &Planned<'_>, index: u64) {
        let store = &self.state.store;
        let obj = p.obj();
        if p.fetched_first == Some(index) {
            return self.done().await;
        }
        if store.contains(obj.id, index) {
            self.state.metrics.fill.record(FillSlice::Held);
            return self.done().await;
        }
        let len = slice_len(index, store.slice_bytes(), p.meta.size);
        store.note_fill(obj.id, index);
        for attempt in 1..=self.jobs.config.attempts {
            if self.jobs.is_handed_over() {
                return;
            }
            self.ready(len).await;
            match store.slice(&obj, index, &p.meta).await {
                Ok(slice) => {
                    if slice.source == Source::Origin {
                        self.fetched(slice.bytes.len() as u64);
                    } else {
                        // Another request fetched it meanwhile.
                        self.state.metrics.fill.record(FillSlice::Held);
                    }
                    return self.done().await;
                }
                Err(e) => {
                    if self.tried(&obj, index, attempt, &e).await {
                        break;
                    }
                }
            }
        }
        self.state.metrics.fill.record(FillSlice::Failed);
        self.jobs.update(self.id, |p| p.errors += 1);
        self.tick().await;
    }

    /// Logs a failed try and pauses before the next; true when there is none (the
    /// last attempt, or an answer no retry changes).
    async fn tried(&self, obj: &ObjectRef<'_>, index: u64, attempt: u32, e: &OriginError) -> bool {
        let last = attempt >= self.jobs.config.attempts
            || e.is_final()
            || matches!(
                e,
                OriginError::RememberedNotFound | OriginError::Changed { .. }
            );
        tracing::warn!(job = self.id, object = obj.o, version = obj.v, slice = index, attempt,
            error = %e, gives_up = last, "fill: slice fetch failed");
        if !last {
            let pause = FIRST_BACKOFF.saturating_mul(1 << (attempt - 1).min(8));
            tokio::time::sleep(pause.min(MAX_BACKOFF)).await;
        }
        last
    }

    fn fetched(&self, bytes: u64) {
        self.state.metrics.fill.bytes.inc_by(bytes);
        self.state.metrics.fill.record(FillSlice::Fetched);
        self.jobs.update(self.id, |p| p.bytes_done += bytes);
    }

    async fn done(&self) {
        self.jobs.update(self.id, |p| p.slices_done += 1);
        self.tick().await;
    }

    /// Writes the counts to the store every [`SAVE_EVERY`].
    async fn tick(&self) {
        let due = {
            let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
            let due = saved.elapsed() >= SAVE_EVERY;
            if due {
                *saved = Instant::now();
            }
            due
        };
        if due {
            self.jobs.save(self.id, false).await;
        }
    }

    /// Returns when a fetch of `bytes` may start: inside the window, at the pace
    /// allowed. The window is looked at again after the pace, which may take long.
    async fn ready(&self, bytes: u64) {
        self.window().await;
        if bytes > 0 {
            self.pace.take(bytes).await;
            self.window().await;
        }
    }

    /// Returns once `fill.window` is open; the job is `waiting_window` meanwhile.
    async fn window(&self) {
        let Some(window) = self.jobs.config.window else {
            return self.set_state(JobState::Running).await;
        };
        loop {
            let (minute, second) = local_time();
            match until_open(&window, minute, second) {
                None => return self.set_state(JobState::Running).await,
                Some(wait) => {
                    self.set_state(JobState::WaitingWindow).await;
                    tokio::time::sleep(wait.min(WINDOW_RECHECK)).await;
                }
            }
        }
    }

    async fn set_state(&self, state: JobState) {
        let mut before = state;
        self.jobs.update(self.id, |p| {
            before = p.state;
            p.state = state;
        });
        if before != state {
            tracing::info!(job = self.id, state = state.label(), "fill job");
            self.jobs.save(self.id, true).await;
        }
    }

    async fn finish(&self, walked: u64, started: Instant) {
        let p = self.jobs.update(self.id, |p| {
            p.slices_total = walked;
            p.state = if p.errors == 0 {
                JobState::Done
            } else {
                JobState::Failed
            };
        });
        self.jobs.save(self.id, true).await;
        tracing::info!(
            job = self.id,
            state = p.state.label(),
            slices = p.slices_total,
            bytes = p.bytes_done,
            errors = p.errors,
            secs = started.elapsed().as_secs_f64(),
            "fill job finished"
        );
    }
}
