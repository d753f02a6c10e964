//! The spool opens in the background, so that video never waits for it.
//!
//! After `kill -9` or a power loss, opening the spool repairs the store and counts what
//! it holds: work that grows with the spool's size (seconds for a spool of several GB).
//! The start waits for the spool at most [`START_WAIT`] (an ordinary open takes
//! milliseconds, so forwarding is there as soon as the listeners are); past that the
//! listeners open without it, and until the spool is open, the forwarded routes answer **503**
//! with `Retry-After` (nothing is accepted that could not be kept), `/status` says
//! `"state": "opening"`, and delivery starts once it is open.
//!
//! What can be checked at once is checked before the listeners open, so that a
//! misconfigured node still refuses to start with a clear error: the upstreams resolve,
//! the spool directory can be created, and no other process holds the spool (during an
//! upgrade the new process waits here for the old one to hand it over).

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::Notify;

use super::deliver::DeliveryService;
use super::spool::SpoolError;
use super::{ForwardSetupError, Forwarder, Upstreams};
use crate::config::Forward as ForwardConfig;
use crate::metrics::Metrics;
use crate::upstream::ConnectorSettings;

/// Longest the start waits for the spool before opening the listeners without it.
pub const START_WAIT: Duration = Duration::from_secs(1);

/// Where the spool is in its opening.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolState {
    Opening,
    Open,
    /// Could not be opened; the forwarded routes answer 503. The reason is logged too.
    Failed(String),
}

/// The forwarding side of the process, once its spool is open.
pub struct ForwardSlot {
    forwarder: OnceLock<Forwarder>,
    /// Guards the moment of publishing against a hand-over that starts meanwhile.
    progress: Mutex<Progress>,
    opened: Notify,
}

#[derive(Default)]
struct Progress {
    failed: Option<String>,
    handed_over: bool,
}

impl ForwardSlot {
    /// Checks what can be checked at once, then opens the spool on a thread of its own.
    pub fn open_in_background(
        cfg: &ForwardConfig,
        connectors: &ConnectorSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ForwardSetupError> {
        Upstreams::new(cfg)?;
        probe_spool_dir(&cfg.spool_dir)?;
        let (c, connectors, m) = (cfg.clone(), connectors.clone(), metrics.clone());
        Self::open_with(&cfg.spool_dir, metrics, START_WAIT, move || {
            Forwarder::new(&c, &connectors, m)
        })
    }

    /// Runs `open` on a thread of its own and waits for it at most `wait`.
    fn open_with(
        dir: &Path,
        metrics: Arc<Metrics>,
        wait: Duration,
        open: impl FnOnce() -> Result<Forwarder, ForwardSetupError> + Send + 'static,
    ) -> Result<Arc<Self>, ForwardSetupError> {
        let slot = Arc::new(Self {
            forwarder: OnceLock::new(),
            progress: Mutex::new(Progress::default()),
            opened: Notify::new(),
        });
        let s = slot.clone();
        let (done, published) = mpsc::channel();
        std::thread::Builder::new()
            .name("cdn-edge spool open".into())
            .spawn(move || {
                let started = Instant::now();
                let opened = open();
                metrics
                    .spool_open_seconds
                    .set(started.elapsed().as_secs_f64());
                s.publish(opened, started);
                let _ = done.send(());
            })
            .map_err(|e| ForwardSetupError::Spool(SpoolError::Storage(e.to_string())))?;
        if published.recv_timeout(wait).is_err() {
            tracing::warn!(
                dir = %dir.display(),
                "the spool is still opening (a repair after a crash?); serving without it, forwarded routes answer 503 until it is open"
            );
        }
        Ok(slot)
    }

    fn publish(&self, opened: Result<Forwarder, ForwardSetupError>, started: Instant) {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        match opened {
            Ok(f) => {
                tracing::info!(secs = started.elapsed().as_secs_f64(), path = %f.spool.path().display(),
                    "spool open; forwarding and delivery start");
                if progress.handed_over {
                    if let Err(e) = f.spool.hand_over_blocking() {
                        tracing::error!(error = %e, "spool hand-over failed");
                    }
                }
                let _ = self.forwarder.set(f);
            }
            Err(e) => {
                tracing::error!(error = %e, "the spool cannot be opened; forwarded routes answer 503");
                progress.failed = Some(e.to_string());
            }
        }
        drop(progress);
        self.opened.notify_waiters();
    }

    /// The forwarder, once the spool is open.
    pub fn get(&self) -> Option<&Forwarder> {
        self.forwarder.get()
    }

    /// Waits until the spool is open (`Some`) or has failed to open (`None`).
    pub async fn wait(&self) -> Option<&Forwarder> {
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            // Registered before the state is read, so a publish in between still wakes us.
            opened.as_mut().enable();
            if let Some(f) = self.forwarder.get() {
                return Some(f);
            }
            if self.state() != SpoolState::Opening {
                return None;
            }
            opened.await;
        }
    }

    pub fn state(&self) -> SpoolState {
        if self.forwarder.get().is_some() {
            return SpoolState::Open;
        }
        let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        match &progress.failed {
            Some(why) => SpoolState::Failed(why.clone()),
            None => SpoolState::Opening,
        }
    }

    /// Lets go of the spool for the process taking over in an upgrade; a spool still
    /// opening is handed over as soon as it is open. Blocking.
    pub fn hand_over_blocking(&self) {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        progress.handed_over = true;
        if let Some(f) = self.forwarder.get() {
            if let Err(e) = f.spool.hand_over_blocking() {
                tracing::error!(error = %e, "spool hand-over failed");
            }
        }
    }
}

/// Creates the spool directory and fails with `InUse` when another process holds the
/// spool, without opening (or repairing) the store.
fn probe_spool_dir(dir: &Path) -> Result<(), SpoolError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| SpoolError::Storage(format!("{}: {e}", dir.display())))?;
    let path = dir.join(super::spool::FILE_NAME);
    let file = match OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A new spool: the directory must take files.
            return tempfile_probe(dir);
        }
        Err(e) => return Err(SpoolError::Storage(format!("{}: {e}", path.display()))),
    };
    // The store holds an exclusive lock on its file while open (redb's own); taking and
    // dropping the same kind of lock tells whether another process has it.
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            let _ = rustix::fs::flock(&file, rustix::fs::FlockOperation::Unlock);
            Ok(())
        }
        Err(rustix::io::Errno::WOULDBLOCK) => Err(SpoolError::InUse(format!(
            "{}: in use by another process",
            path.display()
        ))),
        Err(e) => Err(SpoolError::Storage(format!("{}: {e}", path.display()))),
    }
}

fn tempfile_probe(dir: &Path) -> Result<(), SpoolError> {
    let probe = dir.join(".cdn-edge-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| SpoolError::Storage(format!("{}: cannot create files: {e}", dir.display())))
}

/// Runs the delivery workers once the spool is open.
pub struct DeliveryWhenOpen {
    slot: Arc<ForwardSlot>,
    cfg: ForwardConfig,
    connectors: ConnectorSettings,
    metrics: Arc<Metrics>,
}

impl DeliveryWhenOpen {
    pub fn new(
        slot: Arc<ForwardSlot>,
        cfg: &ForwardConfig,
        connectors: &ConnectorSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            slot,
            cfg: cfg.clone(),
            connectors: connectors.clone(),
            metrics,
        }
    }
}

#[async_trait]
impl BackgroundService for DeliveryWhenOpen {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let forwarder = tokio::select! {
            f = self.slot.wait() => f,
            _ = shutdown.changed() => return,
        };
        let Some(forwarder) = forwarder else {
            return;
        };
        // Resolved once already, before the listeners opened.
        match DeliveryService::new(forwarder, &self.cfg, &self.connectors, self.metrics.clone()) {
            Ok(delivery) => delivery.start(shutdown).await,
            Err(e) => tracing::error!(error = %e, "forward delivery cannot start"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_finds_a_spool_held_by_another_handle() {
        let dir = tempfile::tempdir().unwrap();
        probe_spool_dir(dir.path()).unwrap();
        let spool =
            super::super::spool::Spool::open(dir.path(), 1 << 20, 60_000, Arc::new(Metrics::new()))
                .unwrap();
        assert!(matches!(
            probe_spool_dir(dir.path()),
            Err(SpoolError::InUse(_))
        ));
        drop(spool);
        probe_spool_dir(dir.path()).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_open_does_not_hold_up_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::from_toml_with_env(
            &format!(
                "[listen]\nhttp = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n\
                 [signing]\n[[signing.keys]]\nid = \"k\"\nsecret = \"s\"\n\
                 [origin]\nurls = [\"http://127.0.0.1:3\"]\n\
                 [forward]\nspool_dir = {:?}\nlogblob = \"http://127.0.0.1:4\"\n",
                dir.path().display().to_string()
            ),
            |_| None,
        )
        .unwrap();
        let cfg = config.forward.clone().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (release, released) = mpsc::channel::<()>();
        let m = metrics.clone();
        let connectors = ConnectorSettings::from_config(&config);
        let started = Instant::now();
        let slot =
            ForwardSlot::open_with(dir.path(), metrics, Duration::from_millis(50), move || {
                // A repair that takes as long as the test says.
                released.recv().unwrap();
                Forwarder::new(&cfg, &connectors, m)
            })
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the start went on"
        );
        assert_eq!(slot.state(), SpoolState::Opening);
        assert!(slot.get().is_none());
        let s = slot.clone();
        let waiter = tokio::spawn(async move { s.wait().await.is_some() });
        release.send(()).unwrap();
        assert!(waiter.await.unwrap(), "delivery starts once it is open");
        assert_eq!(slot.state(), SpoolState::Open);
        assert!(slot.get().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_open_is_reported_and_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let slot = ForwardSlot::open_with(
            dir.path(),
            Arc::new(Metrics::new()),
            Duration::from_secs(5),
            || {
                Err(ForwardSetupError::Spool(SpoolError::Storage(
                    "disk on fire".into(),
                )))
            },
        )
        .unwrap();
        assert!(slot.wait().await.is_none());
        assert!(matches!(slot.state(), SpoolState::Failed(why) if why.contains("disk on fire")));
    }

    #[test]
    fn the_probe_refuses_a_directory_it_cannot_create() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            probe_spool_dir(&file.join("spool")),
            Err(SpoolError::Storage(_))
        ));
    }
}
