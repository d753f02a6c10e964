//! The control-plane report (SPEC 7): with `[control]`, every `control.report_secs` the
//! node POSTs its `/status` document plus its load to `control.report_url`, so that a
//! control plane can steer clients by each node's health, drain state and load.
//!
//! A control plane that is down, failing or slow never slows serving:
//! 1. The report is a background service: it runs on its own runtime thread, apart from
//!    the threads of the listeners.
//! 2. It only reads what requests write (atomic counters, cache sizes, the drain flag);
//!    it holds nothing a request waits for.
//! 3. One report at a time. Each has `control.timeout_ms` (at most the interval) to
//!    resolve, connect, send and be answered; a slow one delays the next, so reports
//!    never pile up, and a failed one is not retried: the next one is due anyway.
//! 4. Every report is counted in `cdn_edge_control_reports_total{result}`; a failure is
//!    logged when reports start failing and when they recover, not every time.
//!
//! The body is the `/status` document with one more member:
//! `"load": {"requests_per_sec", "bytes_per_sec", "cache_fill_ratio"}` ([`Load`]).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue};
use pingora::connectors::http::Connector;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use tokio::time::MissedTickBehavior;

use crate::admin::{self, Status};
use crate::app::AppState;
use crate::cache::CacheStats;
use crate::config::Control;
use crate::metrics::{ControlReport as Outcome, Metrics};
use crate::upstream::{Answer, ConnectorSettings, ExchangeError, HttpUpstream};

/// Largest control-plane answer read; the answer is not used, only its status.
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// The node's load between two reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Load {
    /// Requests answered on the public listeners per second, every route and status.
    pub requests_per_sec: f64,
    /// Response body bytes written to clients per second, every route (whole bytes).
    pub bytes_per_sec: f64,
    /// How full the cache is, 0 to 1: see [`cache_fill_ratio`].
    pub cache_fill_ratio: f64,
}

/// The served counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub requests: u64,
    pub bytes: u64,
}

impl Sample {
    pub fn take(metrics: &Metrics) -> Self {
        let (requests, bytes) = metrics.served_totals();
        Self {
            at: Instant::now(),
            requests,
            bytes,
        }
    }
}

impl Load {
    /// The rates from `before` to `now` (0 over no time).
    pub fn between(before: &Sample, now: &Sample, cache_fill_ratio: f64) -> Self {
        let secs = now.at.saturating_duration_since(before.at).as_secs_f64();
        let rate = |a: u64, b: u64| {
            if secs > 0.0 {
                round3(b.saturating_sub(a) as f64 / secs)
            } else {
                0.0
            }
        };
        Self {
            requests_per_sec: rate(before.requests, now.requests),
            bytes_per_sec: rate(before.bytes, now.bytes).round(),
            cache_fill_ratio: round3(cache_fill_ratio),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Share of the cache's capacity in use, 0 to 1, in the tier that holds the node's
/// content: the disk tier when there is one (its bytes / `cache.disk.max_bytes`),
/// else the memory tier (its bytes / `cache.memory_bytes`). A node that starts cold
/// reports near 0 and a warm one near 1.
pub fn cache_fill_ratio(stats: &CacheStats, memory_capacity: u64) -> f64 {
    let (bytes, capacity) = match &stats.disk {
        Some(d) => (d.bytes, d.capacity_bytes),
        None => (stats.memory_bytes, memory_capacity),
    };
    if capacity == 0 {
        return 0.0;
    }
    (bytes as f64 / capacity as f64).min(1.0)
}

/// The report body.
#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    status: Status,
    load: Load,
}

/// Why a report was not accepted.
#[derive(Debug)]
struct Failure {
    outcome: Outcome,
    detail: String,
}

/// What an answer (or its absence) says about a report.
fn classify(answer: Result<Answer, ExchangeError>) -> Result<(), Failure> {
    let fail = |outcome, detail: String| Err(Failure { outcome, detail });
    match answer {
        Ok(a) if (200..300).contains(&a.status) => Ok(()),
        Ok(a) => fail(Outcome::Error, format!("answered {}", a.status)),
        // Accepted; only the answer is too long to read.
        Err(ExchangeError::TooLarge { status, .. }) if (200..300).contains(&status) => Ok(()),
        Err(e @ ExchangeError::Timeout { .. }) => fail(Outcome::Timeout, e.to_string()),
        Err(e @ ExchangeError::Unreachable { .. }) => fail(Outcome::Unreachable, e.to_string()),
        Err(e @ (ExchangeError::TooLarge { .. } | ExchangeError::Invalid { .. })) => {
            fail(Outcome::Error, e.to_string())
        }
    }
}

/// The background service that sends the reports.
pub struct ControlReporter {
    state: Arc<AppState>,
    cfg: Control,
    /// `control.report_url`, path included, for the log.
    url: String,
    connectors: ConnectorSettings,
}

impl ControlReporter {
    pub fn new(state: Arc<AppState>, cfg: &Control, connectors: &ConnectorSettings) -> Self {
        Self {
            state,
            url: format!("{}{}", cfg.report_url.url, cfg.report_path),
            cfg: cfg.clone(),
            connectors: connectors.clone(),
        }
    }

    /// The control plane, resolved on the first report that can (blocking resolution
    /// off this runtime, within the report's time budget): a control plane whose name
    /// does not resolve yet never holds up the start.
    async fn upstream(
        &self,
        resolved: &mut Option<Arc<HttpUpstream>>,
    ) -> Result<Arc<HttpUpstream>, Failure> {
        if let Some(u) = resolved {
            return Ok(u.clone());
        }
        let (url, timeout) = (self.cfg.report_url.clone(), self.cfg.timeout);
        let lookup = tokio::task::spawn_blocking(move || HttpUpstream::new(&url, timeout, timeout));
        let upstream = match tokio::time::timeout(timeout, lookup).await {
            Ok(Ok(Ok(u))) => Arc::new(u),
            Ok(Ok(Err(e))) => {
                return Err(Failure {
                    outcome: Outcome::Unreachable,
                    detail: e.to_string(),
                })
            }
            Ok(Err(e)) => {
                return Err(Failure {
                    outcome: Outcome::Unreachable,
                    detail: format!("name lookup failed: {e}"),
                })
            }
            Err(_) => {
                return Err(Failure {
                    outcome: Outcome::Timeout,
                    detail: format!(
                        "{}: name lookup took longer than {} ms",
                        self.url,
                        timeout.as_millis()
                    ),
                })
            }
        };
        *resolved = Some(upstream.clone());
        Ok(upstream)
    }

    /// Sends one report within the report's time budget.
    async fn send(
        &self,
        connector: &Connector,
        resolved: &mut Option<Arc<HttpUpstream>>,
        body: Bytes,
    ) -> Result<(), Failure> {
        let started = Instant::now();
        let upstream = self.upstream(resolved).await?;
        let headers = [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::USER_AGENT,
                HeaderValue::from_static(concat!("cdn-edge/", env!("CARGO_PKG_VERSION"))),
            ),
        ];
        let left = self.cfg.timeout.saturating_sub(started.elapsed());
        let exchange = upstream.exchange(
            connector,
            "POST",
            &self.cfg.report_path,
            &headers,
            Some(body),
            MAX_ANSWER_BYTES,
        );
        match tokio::time::timeout(left, exchange).await {
            Ok(answer) => classify(answer),
            Err(_) => Err(Failure {
                outcome: Outcome::Timeout,
                detail: format!(
                    "{}: no answer within {} ms",
                    self.url,
                    self.cfg.timeout.as_millis()
                ),
            }),
        }
    }

    /// Counts a report, and logs when reports start failing and when they recover.
    fn record(&self, result: &Result<(), Failure>, failing: &mut bool) {
        let url = &self.url;
        match result {
            Ok(()) => {
                self.state.metrics.record_control_report(Outcome::Ok);
                if std::mem::take(failing) {
                    tracing::info!(url, "control-plane reports accepted again");
                }
            }
            Err(f) => {
                self.state.metrics.record_control_report(f.outcome);
                if std::mem::replace(failing, true) {
                    tracing::debug!(url, result = f.outcome.label(), error = %f.detail, "control-plane report failed");
                } else {
                    tracing::warn!(url, result = f.outcome.label(), error = %f.detail,
                        "control-plane report failed; serving is not affected and reports go on every {} s (further failures are logged at debug level until one is accepted)",
                        self.cfg.every.as_secs());
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for ControlReporter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let connector = Connector::new(Some(self.connectors.options()));
        let mut resolved = None;
        let mut failing = false;
        let mut last = Sample::take(&self.state.metrics);
        // The first report one interval after start, so that its load covers a whole one.
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + self.cfg.every, self.cfg.every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            let status = admin::status(&self.state).await;
            let now = Sample::take(&self.state.metrics);
            let fill = cache_fill_ratio(&self.state.store.stats(), self.state.memory_capacity);
            let load = Load::between(&last, &now, fill);
            last = now;
            let body = serde_json::to_vec(&Report { status, load }).expect("the report serialises");
            let result = tokio::select! {
                r = self.send(&connector, &mut resolved, Bytes::from(body)) => r,
                _ = shutdown.changed() => return,
            };
            self.record(&result, &mut failing);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::disk::DiskStats;
    use std::time::Duration;

    fn sample(at: Instant, requests: u64, bytes: u64) -> Sample {
        Sample {
            at,
            requests,
            bytes,
        }
    }

    #[test]
    fn load_is_the_rate_since_the_previous_report() {
        let t0 = Instant::now();
        let before = sample(t0, 100, 1_000_000);
        for (secs, requests, bytes, want_rps, want_bps) in [
            (10.0, 150, 3_000_000, 5.0, 200_000.0),
            (2.5, 101, 1_000_001, 0.4, 0.0),
            (2.0, 101, 1_000_003, 0.5, 2.0),
            (3.0, 101, 1_000_000, 0.333, 0.0),
            // No time at all: no rate rather than infinity.
            (0.0, 200, 2_000_000, 0.0, 0.0),
            // Counters never go back; a smaller one would be another process's.
            (1.0, 50, 10, 0.0, 0.0),
        ] {
            let now = sample(t0 + Duration::from_secs_f64(secs), requests, bytes);
            let load = Load::between(&before, &now, 0.25);
            assert_eq!(
                (
                    load.requests_per_sec,
                    load.bytes_per_sec,
                    load.cache_fill_ratio
                ),
                (want_rps, want_bps, 0.25),
                "{secs} s, {requests} requests, {bytes} bytes"
            );
        }
    }

    fn stats(memory_bytes: u64, disk: Option<(u64, u64)>) -> CacheStats {
        CacheStats {
            memory_bytes,
            memory_entries: 0,
            metadata_entries: 0,
            missing_entries: 0,
            disk: disk.map(|(bytes, capacity_bytes)| DiskStats {
                path: "/tmp/x".into(),
                capacity_bytes,
                bytes,
                entries: 0,
                index_ready: true,
            }),
        }
    }

    #[test]
    fn fill_ratio_is_the_disk_tier_when_there_is_one_else_memory() {
        assert_eq!(cache_fill_ratio(&stats(25, None), 100), 0.25);
        assert_eq!(cache_fill_ratio(&stats(0, None), 100), 0.0);
        assert_eq!(cache_fill_ratio(&stats(100, Some((30, 1000))), 100), 0.03);
        // Bookkeeping can push a tier a little over its budget: never over 1.
        assert_eq!(cache_fill_ratio(&stats(120, None), 100), 1.0);
        assert_eq!(cache_fill_ratio(&stats(5, None), 0), 0.0);
    }

    fn answer(status: u16) -> Result<Answer, ExchangeError> {
        Ok(Answer {
            status,
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
        })
    }

    #[test]
    fn answers_are_classified() {
        let outcome = |r| classify(r).err().map(|f| f.outcome);
        let url = "http://c".to_string();
        assert_eq!(outcome(answer(200)), None);
        assert_eq!(outcome(answer(204)), None);
        assert_eq!(outcome(answer(302)), Some(Outcome::Error));
        assert_eq!(outcome(answer(500)), Some(Outcome::Error));
        assert_eq!(
            outcome(Err(ExchangeError::Timeout {
                url: url.clone(),
                ms: 5
            })),
            Some(Outcome::Timeout)
        );
        assert_eq!(
            outcome(Err(ExchangeError::Unreachable {
                url: url.clone(),
                detail: "refused".into()
            })),
            Some(Outcome::Unreachable)
        );
        let too_large = |status| ExchangeError::TooLarge {
            url: url.clone(),
            status,
            limit: 1,
        };
        assert_eq!(outcome(Err(too_large(200))), None);
        assert_eq!(outcome(Err(too_large(500))), Some(Outcome::Error));
        assert_eq!(
            outcome(Err(ExchangeError::Invalid {
                url: url.clone(),
                why: "switched protocols"
            })),
            Some(Outcome::Error)
        );
    }
}
