//! Fill jobs (SPEC 7): `POST /fill` takes a manifest of objects (and byte ranges) to
//! place in this node's cache ahead of demand, `GET /fill/{id}` shows a job's progress.
//!
//! The order of work:
//! 1. `POST /fill`: the manifest is checked (manifest.rs), stored durably (jobs.rs),
//!    and answered 202 with the job's id.
//! 2. The runner (runner.rs, a background service on its own thread) takes the jobs
//!    one after another, oldest first. It only works inside `fill.window`; outside it
//!    the job is `waiting_window` and no request leaves the node.
//! 3. For each object it learns the size (from the cache's metadata, else by fetching
//!    the first slice of it this node owns), then fetches every slice of the wanted
//!    bytes that this node owns (all without `[cluster]`) and does not hold yet:
//!    `fill.concurrency` at a time, each tried `fill.attempts` times, all jobs together
//!    no faster than `fill.max_bytes_per_sec` (schedule.rs). A fill pulls from the
//!    parent tier, else the origin, in directed mode too, and never from a peer
//!    ([`crate::cache::Via::fill`]); what it fetches goes into both tiers like any
//!    miss, and is then served as a hit.
//! 4. A job ends `done`, or `failed` when some slice or object could not be fetched
//!    (`errors`). After a restart, unfinished jobs go on: each walks its slices again
//!    from the first, and a slice already held counts as done.

pub mod follow;
pub mod jobs;
pub mod manifest;
pub mod runner;
pub mod schedule;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::StatusCode;
use pingora::protocols::http::ServerSession;
use serde::Serialize;
use tokio::sync::Notify;

use super::{error, json, parse_json, read_body, Reply};
use crate::app::AppState;
use crate::config::Fill;
use crate::metrics::Metrics;
use jobs::{JobStore, JobStoreError};
use manifest::{RawManifest, Wanted};

/// Finished jobs kept for `GET /fill/{id}`; older ones are forgotten.
pub const FINISHED_KEPT: usize = 1_000;
/// Jobs not finished at most; past it `POST /fill` answers 429.
pub const MAX_UNFINISHED: usize = 1_000;

/// Where a job is (the `state` of `GET /fill/{id}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued = 0,
    /// Outside `fill.window`: nothing is fetched until it opens.
    WaitingWindow = 1,
    Running = 2,
    Done = 3,
    /// Finished with errors: some slices or objects could not be fetched.
    Failed = 4,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::WaitingWindow,
        JobState::Running,
        JobState::Done,
        JobState::Failed,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::WaitingWindow => "waiting_window",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }

    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed)
    }
}

/// A job's progress: the answer to `GET /fill/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub state: JobState,
    /// Slices of the wanted bytes this node owns (known once each object's size is).
    pub slices_total: u64,
    /// Of those, slices held now: fetched by the job, or already held.
    pub slices_done: u64,
    /// Bytes the job fetched.
    pub bytes_done: u64,
    /// Slices (or objects, when their size could not be learnt) given up on.
    pub errors: u64,
}

impl Progress {
    const QUEUED: Progress = Progress {
        state: JobState::Queued,
        slices_total: 0,
        slices_done: 0,
        bytes_done: 0,
        errors: 0,
    };
}

/// Why `POST /fill` did not take a job.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{MAX_UNFINISHED} fill jobs are not finished yet; wait for some to end")]
    TooMany,
    #[error(transparent)]
    Store(#[from] JobStoreError),
}

/// The node's fill jobs: the store, every job's progress, and the runner's wake-up.
pub struct FillJobs {
    pub config: Fill,
    store: JobStore,
    /// Every job the store holds, by id (ids grow with time).
    progress: Mutex<BTreeMap<u64, Progress>>,
    /// A job was added, or the store handed over.
    wake: Notify,
    handed_over: AtomicBool,
    metrics: Arc<Metrics>,
}

impl FillJobs {
    /// Opens the jobs store in `fill.state_dir`. Blocking: call at start.
    pub fn open(config: &Fill, metrics: Arc<Metrics>) -> Result<Self, JobStoreError> {
        let (store, jobs) = JobStore::open(&config.state_dir)?;
        let unfinished = jobs.iter().filter(|(_, p)| !p.state.is_finished()).count();
        if unfinished > 0 {
            tracing::info!(jobs = unfinished, path = %store.path().display(), "fill jobs resume");
        }
        let jobs = Self {
            config: config.clone(),
            store,
            progress: Mutex::new(jobs.into_iter().collect()),
            wake: Notify::new(),
            handed_over: AtomicBool::new(false),
            metrics,
        };
        jobs.refresh_gauges();
        Ok(jobs)
    }

    /// Durably adds a job; returns its id.
    pub async fn submit(self: &Arc<Self>, objects: &[Wanted]) -> Result<u64, SubmitError> {
        let forget = {
            let all = self.lock();
            let finished: Vec<u64> = all
                .iter()
                .filter(|(_, p)| p.state.is_finished())
                .map(|(id, _)| *id)
                .collect();
            if all.len() - finished.len() >= MAX_UNFINISHED {
                return Err(SubmitError::TooMany);
            }
            // The oldest finished jobs beyond what is kept, with room for this one.
            let over = (finished.len() + 1).saturating_sub(FINISHED_KEPT);
            finished[..over].to_vec()
        };
        let manifest = serde_json::to_vec(objects).expect("a manifest serialises");
        let jobs = self.clone();
        let added = tokio::task::spawn_blocking(move || {
            jobs.store
                .add(&manifest, &Progress::QUEUED, &forget)
                .map(|id| (id, forget))
        })
        .await
        .unwrap_or_else(|e| Err(JobStoreError::Storage(e.to_string())));
        let (id, forget) = added?;
        {
            let mut all = self.lock();
            for old in forget {
                all.remove(&old);
            }
            all.insert(id, Progress::QUEUED);
        }
        self.refresh_gauges();
        self.wake.notify_one();
        Ok(id)
    }

    pub fn progress(&self, id: u64) -> Option<Progress> {
        self.lock().get(&id).copied()
    }

    /// The oldest job not finished.
    pub fn next_job(&self) -> Option<u64> {
        self.lock()
            .iter()
            .find(|(_, p)| !p.state.is_finished())
            .map(|(id, _)| *id)
    }

    /// Changes a job's progress in memory; returns it as changed.
    pub fn update(&self, id: u64, change: impl FnOnce(&mut Progress)) -> Progress {
        let mut all = self.lock();
        let p = all.entry(id).or_insert(Progress::QUEUED);
        change(p);
        *p
    }

    /// Records a job's progress in the store; `durable` for a change of state.
    pub async fn save(self: &Arc<Self>, id: u64, durable: bool) {
        let Some(progress) = self.progress(id) else {
            return;
        };
        let jobs = self.clone();
        let saved = tokio::task::spawn_blocking(move || jobs.store.save(id, &progress, durable))
            .await
            .unwrap_or_else(|e| Err(JobStoreError::Storage(e.to_string())));
        match saved {
            Ok(()) | Err(JobStoreError::HandedOver) => {}
            Err(e) => {
                tracing::error!(job = id, error = %e, "cannot record the fill job's progress")
            }
        }
        if durable {
            self.refresh_gauges();
        }
    }

    /// A job's manifest.
    pub async fn manifest(self: &Arc<Self>, id: u64) -> Result<Vec<Wanted>, JobStoreError> {
        let jobs = self.clone();
        let raw = tokio::task::spawn_blocking(move || jobs.store.manifest(id))
            .await
            .unwrap_or_else(|e| Err(JobStoreError::Storage(e.to_string())))?;
        let raw = raw.ok_or_else(|| JobStoreError::Storage(format!("job {id} has no manifest")))?;
        serde_json::from_slice(&raw)
            .map_err(|e| JobStoreError::Storage(format!("job {id}: unreadable manifest: {e}")))
    }

    /// Resolves when a job may have been added, or the store was handed over.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// Stops the runner taking new slices and closes the store for the process taking
    /// over in an upgrade, which resumes the jobs. Blocking.
    pub fn hand_over_blocking(&self) {
        self.handed_over.store(true, Ordering::Release);
        self.wake.notify_one();
        self.store.hand_over_blocking();
        tracing::info!("fill jobs handed over to the new process");
    }

    /// Copies the jobs by state, and the slices left, into their gauges.
    pub fn refresh_gauges(&self) {
        let mut by_state = [0i64; JobState::ALL.len()];
        let mut remaining = 0u64;
        for p in self.lock().values() {
            by_state[p.state as usize] += 1;
            if !p.state.is_finished() {
                remaining += p.slices_total.saturating_sub(p.slices_done + p.errors);
            }
        }
        for state in JobState::ALL {
            self.metrics.fill.jobs(state).set(by_state[state as usize]);
        }
        self.metrics.fill.slices_remaining.set(remaining as i64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Progress>> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The answer without a `[fill]` section.
fn not_configured() -> Reply {
    error(
        StatusCode::NOT_FOUND,
        "fill is not configured: no [fill] section",
    )
}

/// `POST /fill`: 202 `{"id": "..."}` once the job is stored.
pub async fn submit(state: &AppState, session: &mut ServerSession) -> Reply {
    let Some(jobs) = &state.fill else {
        return not_configured();
    };
    let body = match read_body(session).await {
        Ok(b) => b,
        Err(reply) => return *reply,
    };
    let raw: RawManifest = match parse_json(&body) {
        Ok(m) => m,
        Err(reply) => return *reply,
    };
    let objects = match manifest::validate(raw) {
        Ok(o) => o,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid manifest: {e}")),
    };
    match jobs.submit(&objects).await {
        Ok(id) => {
            tracing::info!(job = id, objects = objects.len(), "fill job accepted");
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "id": id.to_string() }),
            )
        }
        Err(e @ SubmitError::TooMany) => error(StatusCode::TOO_MANY_REQUESTS, &e.to_string()),
        Err(SubmitError::Store(e @ JobStoreError::HandedOver)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Err(SubmitError::Store(e)) => {
            tracing::error!(error = %e, "cannot store a fill job");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot store the job: {e}"),
            )
        }
    }
}

/// `GET /fill/{id}`: the job's progress, or 404.
pub async fn show(state: &AppState, id: &str) -> Reply {
    let Some(jobs) = &state.fill else {
        return not_configured();
    };
    match id.parse::<u64>().ok().and_then(|n| jobs.progress(n)) {
        Some(p) => json(StatusCode::OK, &p),
        None => error(
            StatusCode::NOT_FOUND,
            &format!("no fill job {id:?} on this node (finished jobs are kept: the newest {FINISHED_KEPT})"),
        ),
    }
}
