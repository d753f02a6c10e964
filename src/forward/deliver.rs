//! Background delivery of spooled records and queued stats, on its own runtime.
//!
//! Each spooled queue is delivered in order, one record at a time: a 2xx removes the
//! record (keeping the answer for deduplication), a 4xx other than 408/429 is a
//! permanent failure (the record moves to the dead letters, counted), anything else is
//! retried with exponential backoff and jitter (10 ms, then 200 ms doubling up to
//! 30 s), until [`RetryLimits`] give up on the record (see retry.rs), so that one
//! record the upstream never accepts cannot hold up the ones behind it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::http::Connector;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::record::{Record, StoredAnswer};
use super::retry::{Attempt, RetryLimits};
use super::spool::{unix_ms, Finished, Queue, Spool, SpoolError};
use super::{relay, Upstreams};
use crate::metrics::{DeadLetterReason, ForwardResult, Metrics};
use crate::routes::Route;
use crate::upstream::ConnectorSettings;
use crate::upstream::ExchangeError;

/// The first retry of a record comes at once, nearly: a single failed attempt among
/// deliveries is most often transient, and the whole route waits behind its head. At
/// 200 ms, an upstream failing one request in 25 held delivery to a third of what
/// arrived, and the spool grew without end.
const FIRST_RETRY: Duration = Duration::from_millis(10);
/// Then the backoff doubles from here.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often delivered answers past the dedupe window are forgotten (all of them, in
/// chunks).
const PURGE_EVERY: Duration = Duration::from_secs(10);

/// The delivery workers, run as a Pingora background service.
pub struct DeliveryService {
    spool: Arc<Spool>,
    upstreams: Upstreams,
    stats: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Record>>>,
    dedupe_ms: u64,
    retry: RetryLimits,
    connectors: ConnectorSettings,
    metrics: Arc<Metrics>,
}

impl DeliveryService {
    pub fn new(
        forwarder: &super::Forwarder,
        cfg: &crate::config::Forward,
        connectors: &ConnectorSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, crate::upstream::ResolveError> {
        Ok(Self {
            spool: forwarder.spool.clone(),
            upstreams: Upstreams::new(cfg)?,
            stats: std::sync::Mutex::new(forwarder.take_stats_receiver()),
            dedupe_ms: forwarder.dedupe_ms,
            retry: cfg.retry,
            connectors: connectors.clone(),
            metrics,
        })
    }
}

/// The route a queue serves.
pub fn route_of(q: Queue) -> Route {
    match q {
        Queue::Events => Route::Event,
        Queue::LogBlob => Route::LogBlob,
    }
}

/// Backoff for the `attempt`-th retry (from 0), with up to 25% jitter: 10 ms, then
/// 200 ms doubling up to 30 s.
pub fn backoff(attempt: u32) -> Duration {
    let base = match attempt.checked_sub(1) {
        None => FIRST_RETRY,
        Some(n) => FIRST_BACKOFF
            .saturating_mul(1u32 << n.min(16))
            .min(MAX_BACKOFF),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

/// Sleeps `d`, or returns true early when shutting down.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut ShutdownWatch) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

#[async_trait]
impl BackgroundService for DeliveryService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let connector = Connector::new(Some(self.connectors.options()));
        let stats_rx = self.stats.lock().ok().and_then(|mut s| s.take());
        let queues = Queue::ALL.map(|q| self.deliver_queue(q, &connector, shutdown.clone()));
        let [events, logblob] = queues;
        tokio::join!(
            events,
            logblob,
            self.deliver_stats(stats_rx, &connector, shutdown.clone()),
            self.purge(shutdown.clone()),
        );
        // Removals and remembered answers since the last durable commit become durable
        // now, before the process exits.
        // A spool handed over in an upgrade was flushed then.
        if self.spool.is_handed_over() {
            return;
        }
        match self.spool.flush().await {
            Ok(()) => tracing::info!("spool flushed at shutdown"),
            Err(e) => tracing::warn!(error = %e, "spool flush at shutdown failed"),
        }
    }
}

impl DeliveryService {
    async fn deliver_queue(&self, q: Queue, connector: &Connector, mut shutdown: ShutdownWatch) {
        let Some(upstream) = self.upstreams.for_queue(q) else {
            return;
        };
        let route = route_of(q);
        // The last record handed to `finish_later`: the next one comes after it, whether
        // or not its removal has been committed yet.
        let mut last: Option<u64> = None;
        let mut committing: Option<tokio::sync::oneshot::Receiver<Result<(), SpoolError>>> = None;
        while !*shutdown.borrow() {
            // The previous removal must have committed before reading past it; if it
            // failed, read from the start again (that record is delivered once more).
            if let Some(rx) = committing.take() {
                if !matches!(rx.await, Ok(Ok(()))) {
                    last = None;
                }
            }
            let spool = self.spool.clone();
            let next =
                tokio::task::spawn_blocking(move || spool.next_after_blocking(q, last)).await;
            let waiting = match next {
                Ok(Ok(Some(w))) => w,
                Ok(Ok(None)) => {
                    tokio::select! {
                        _ = self.spool.appended(q) => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
                // The process taking over delivers from here on.
                Ok(Err(SpoolError::HandedOver)) => return,
                Ok(Err(e)) => {
                    tracing::error!(queue = q.label(), error = %e, "cannot read the spool");
                    if sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await {
                        return;
                    }
                    continue;
                }
                Err(_) => continue,
            };
            let record = match waiting.record {
                Ok(r) => r,
                Err(_) => {
                    self.dead_letter(q, waiting.seq, DeadLetterReason::Malformed, "");
                    let _ = self
                        .spool
                        .finish_later(q, waiting.seq, waiting.len, None, Finished::Dead)
                        .await;
                    last = Some(waiting.seq);
                    continue;
                }
            };
            let mut failures = waiting.failures;
            let how = loop {
                let attempt = match relay(upstream, connector, &record).await {
                    Ok(answer) => match Attempt::of_status(answer.status) {
                        Attempt::Delivered => break self.delivered(route, &record, answer),
                        attempt => attempt,
                    },
                    // An answer whose body is over the read limit is judged by its
                    // status; a 2xx is a delivery, kept without the body.
                    Err(ExchangeError::TooLarge { status, .. }) => {
                        match Attempt::of_status(status) {
                            Attempt::Delivered => {
                                let answer = StoredAnswer {
                                    at_ms: unix_ms(),
                                    status,
                                    content_type: None,
                                    body: bytes::Bytes::new(),
                                };
                                break self.delivered(route, &record, answer);
                            }
                            attempt => attempt,
                        }
                    }
                    // The upstream answered, but not in HTTP: its failure, like a 500.
                    Err(e @ ExchangeError::Invalid { .. }) => {
                        tracing::debug!(queue = q.label(), error = %e, "unusable answer");
                        Attempt::Failed
                    }
                    Err(e) => {
                        tracing::debug!(queue = q.label(), error = %e, tries = failures.tries, "delivery failed; will retry");
                        Attempt::Unavailable
                    }
                };
                if attempt == Attempt::Rejected {
                    self.dead_letter(q, waiting.seq, DeadLetterReason::Rejected, &record.target);
                    break Finished::Dead;
                }
                let now = unix_ms();
                failures.note(attempt, now);
                if let Some(reason) = self.retry.give_up(&failures, now) {
                    self.dead_letter(q, waiting.seq, reason, &record.target);
                    break Finished::Dead;
                }
                self.metrics.record_forward(route, ForwardResult::Retried);
                // Kept so that a restart goes on counting; lost only in a crash.
                if let Err(e) = self.spool.note_failures(waiting.seq, failures).await {
                    tracing::debug!(queue = q.label(), error = %e, "cannot keep the failed attempts");
                }
                if sleep_or_shutdown(backoff(failures.tries - 1), &mut shutdown).await {
                    return;
                }
            };
            match self
                .spool
                .finish_later(q, waiting.seq, waiting.len, record.dedupe_key.clone(), how)
                .await
            {
                Ok(rx) => {
                    last = Some(waiting.seq);
                    committing = Some(rx);
                }
                Err(e) => {
                    tracing::error!(queue = q.label(), error = %e, "cannot remove a delivered record");
                    if sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Counts a delivery and its latency.
    fn delivered(&self, route: Route, record: &Record, answer: StoredAnswer) -> Finished {
        self.metrics.record_forward(route, ForwardResult::Delivered);
        let secs = unix_ms().saturating_sub(record.arrival_ms) as f64 / 1000.0;
        self.metrics.forward_delivery(route).observe(secs);
        Finished::Delivered(answer)
    }

    /// Logs and counts a record moved to the dead letters.
    fn dead_letter(&self, q: Queue, seq: u64, reason: DeadLetterReason, target: &str) {
        let route = route_of(q);
        self.metrics.record_forward(route, ForwardResult::Failed);
        self.metrics.record_dead_letter(route, reason);
        tracing::warn!(
            queue = q.label(),
            seq,
            reason = reason.label(),
            target,
            "delivery gave up; record moved to the dead letters"
        );
    }

    async fn deliver_stats(
        &self,
        rx: Option<tokio::sync::mpsc::Receiver<Record>>,
        connector: &Connector,
        mut shutdown: ShutdownWatch,
    ) {
        let (Some(mut rx), Some(upstream)) = (rx, self.upstreams.stats.as_ref()) else {
            return;
        };
        loop {
            let record = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => return },
                _ = shutdown.changed() => return,
            };
            match relay(upstream, connector, &record).await {
                Ok(a) if a.status < 500 => self
                    .metrics
                    .record_forward(Route::Stats, ForwardResult::Delivered),
                _ => self
                    .metrics
                    .record_forward(Route::Stats, ForwardResult::Failed),
            }
        }
    }

    async fn purge(&self, mut shutdown: ShutdownWatch) {
        while !sleep_or_shutdown(PURGE_EVERY, &mut shutdown).await {
            match self
                .spool
                .purge(unix_ms().saturating_sub(self.dedupe_ms))
                .await
            {
                Ok(n) if n > 0 => {
                    tracing::debug!(purged = n, "expired delivered answers forgotten")
                }
                Ok(_) => {}
                Err(SpoolError::HandedOver) => return,
                Err(e) => tracing::warn!(error = %e, "purging expired delivered answers failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        assert!(backoff(0) >= FIRST_RETRY && backoff(0) <= FIRST_RETRY.mul_f64(1.25));
        assert!(backoff(1) >= FIRST_BACKOFF && backoff(1) <= FIRST_BACKOFF.mul_f64(1.25));
        assert!(backoff(4) >= FIRST_BACKOFF * 8);
        assert!(backoff(40) <= MAX_BACKOFF.mul_f64(1.25));
        assert!(backoff(40) >= MAX_BACKOFF);
    }
}
