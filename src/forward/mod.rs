//! Forwarding of playback events, telemetry log blobs and stats (SPEC §2.5).
//!
//! | route | delivery | answer |
//! |---|---|---|
//! | events | relayed at once; spooled and retried on upstream error, timeout or 5xx | the upstream's answer, or 202 |
//! | log blobs | spooled, delivered in the background | 202 once spooled |
//! | stats | bounded in-memory queue, best effort | 200 at once |
//!
//! Video never waits on any of this: forwarding has its own connection pools, its
//! delivery runs on its own runtime (a Pingora background service), and its queues are
//! bounded.

pub mod dedupe;
pub mod deliver;
pub mod opening;
pub mod path;
pub mod record;
pub mod retry;
pub mod spool;

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method};
use pingora::connectors::http::Connector;
use pingora::http::ResponseHeader;
use tokio::sync::mpsc;

use crate::config::Forward as ForwardConfig;
use crate::metrics::{ForwardResult, Metrics};
use crate::proxies::{self, TrustedProxies};
use crate::respond;
use crate::routes::Route;
use crate::session::Session;
use crate::upstream::ConnectorSettings;
use crate::upstream::{ExchangeError, HttpUpstream, ResolveError};
use record::{Record, StoredAnswer};
use spool::{unix_ms, Appended, IdState, Queue, Spool, SpoolError};

/// Stats waiting to be forwarded at most; more are dropped and counted.
pub const STATS_QUEUE: usize = 1024;
/// Seconds a client is asked to wait when the spool is full.
pub const RETRY_AFTER_SECS: &str = "5";
const VIA: &str = "1.1 cdn-edge";

/// Why forwarding could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForwardSetupError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("forward.spool_dir: {0}")]
    Spool(#[from] SpoolError),
}

/// The upstreams of the forwarded routes.
pub struct Upstreams {
    pub events: Option<HttpUpstream>,
    pub logblob: Option<HttpUpstream>,
    pub stats: Option<HttpUpstream>,
}

impl Upstreams {
    fn new(cfg: &ForwardConfig) -> Result<Self, ResolveError> {
        let up = |u: &Option<crate::config::UpstreamUrl>| {
            u.as_ref()
                .map(|u| HttpUpstream::new(u, cfg.connect_timeout, cfg.timeout))
                .transpose()
        };
        Ok(Self {
            events: up(&cfg.events)?,
            logblob: up(&cfg.logblob)?,
            stats: up(&cfg.stats)?,
        })
    }

    pub fn for_queue(&self, q: Queue) -> Option<&HttpUpstream> {
        match q {
            Queue::Events => self.events.as_ref(),
            Queue::LogBlob => self.logblob.as_ref(),
        }
    }
}

/// Request-path side of forwarding. One per process.
pub struct Forwarder {
    pub spool: Arc<Spool>,
    relay: Upstreams,
    relay_connector: Connector,
    stats_tx: mpsc::Sender<Record>,
    /// Taken once by the delivery service.
    stats_rx: Mutex<Option<mpsc::Receiver<Record>>>,
    max_body: u64,
    pub dedupe_ms: u64,
    /// Relays in flight by dedupe key: concurrent duplicates share one upstream request.
    relaying: moka::future::Cache<String, StoredAnswer>,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    pub fn new(
        cfg: &ForwardConfig,
        connectors: &ConnectorSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ForwardSetupError> {
        let dedupe_ms = cfg.dedupe_secs.saturating_mul(1000);
        let spool = Arc::new(Spool::open(
            &cfg.spool_dir,
            cfg.spool_max_bytes,
            dedupe_ms,
            metrics.clone(),
        )?);
        let (stats_tx, stats_rx) = mpsc::channel(STATS_QUEUE);
        Ok(Self {
            spool,
            relay: Upstreams::new(cfg)?,
            relay_connector: Connector::new(Some(connectors.options())),
            stats_tx,
            stats_rx: Mutex::new(Some(stats_rx)),
            max_body: cfg.max_body_bytes,
            dedupe_ms,
            relaying: moka::future::Cache::builder()
                .max_capacity(65_536)
                .time_to_live(std::time::Duration::from_secs(30))
                .build(),
            metrics,
        })
    }

    /// Copies spool depths and kept bytes into their gauges; called before each scrape.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        let now = unix_ms();
        for q in Queue::ALL {
            let age = self.spool.oldest_age_ms(q, now) as f64 / 1000.0;
            m.forward_oldest_age(deliver::route_of(q)).set(age);
            let d = self.spool.depth(q);
            m.spool_entries
                .with_label_values(&[q.label()])
                .set(d.entries as i64);
            m.spool_bytes
                .with_label_values(&[q.label()])
                .set(d.bytes as i64);
        }
        let kept = self.spool.kept();
        for (gauges, usage) in [
            (&m.spool_answers, kept.answers),
            (&m.spool_dead_letters, kept.dead_letters),
        ] {
            gauges.entries.set(usage.entries as i64);
            gauges.bytes.set(usage.bytes as i64);
        }
    }

    /// The stats queue's receiving end, for the delivery service (once).
    pub fn take_stats_receiver(&self) -> Option<mpsc::Receiver<Record>> {
        self.stats_rx.lock().ok().and_then(|mut r| r.take())
    }

    /// Serves a forwarded route; returns the body bytes written. `proxies` decides
    /// what `X-Forwarded-For` the upstream gets.
    pub async fn serve(
        &self,
        session: &mut Session,
        route: Route,
        proxies: &TrustedProxies,
    ) -> pingora::Result<u64> {
        let upstream = match route {
            Route::Event => self.relay.events.as_ref(),
            Route::LogBlob => self.relay.logblob.as_ref(),
            _ => self.relay.stats.as_ref(),
        };
        if upstream.is_none() {
            return respond::plain(session, 404, "not configured on this edge").await;
        }
        // Before anything is read: the body of a refused request is never read, so the
        // connection is not kept.
        if let Err(bad) = path::check(session.req_header().uri.path()) {
            self.metrics.record_forward(route, ForwardResult::BadPath);
            tracing::debug!(route = route.label(), reason = %bad, "forwarded path refused");
            session.set_keepalive(None);
            return respond::plain(session, 400, &format!("forwarded path refused: {bad}")).await;
        }
        if session.req_header().method != Method::POST {
            return respond::method_not_allowed(session, "POST").await;
        }
        let body = match read_body(session, self.max_body).await? {
            Some(b) => b,
            None => {
                self.metrics.record_forward(route, ForwardResult::Refused);
                session.set_keepalive(None);
                return respond::plain(session, 413, "request body too large").await;
            }
        };
        let record = self.record_of(session, body, proxies);
        match route {
            Route::Event => self.event(session, record).await,
            Route::LogBlob => self.logblob(session, record).await,
            _ => self.stats(session, record).await,
        }
    }

    fn record_of(&self, session: &Session, body: Bytes, proxies: &TrustedProxies) -> Record {
        let req = session.req_header();
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let xff = proxies::forwarded_for_header(&req.headers);
        let forwarded_for = proxies.forwarded_for(peer, xff.as_deref());
        Record {
            arrival_ms: unix_ms(),
            client_ip: forwarded_for,
            method: req.method.as_str().to_string(),
            target: req
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string(),
            content_type: req
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            // Set by `dedupe`, off the runtime: it hashes the body.
            dedupe_key: None,
            body,
        }
    }

    async fn event(&self, session: &mut Session, mut record: Record) -> pingora::Result<u64> {
        match self.dedupe(Queue::Events, &mut record).await {
            IdState::Delivered(answer) => {
                self.metrics
                    .record_forward(Route::Event, ForwardResult::Deduplicated);
                return write_answer(session, &answer).await;
            }
            IdState::Pending => {
                self.metrics
                    .record_forward(Route::Event, ForwardResult::Deduplicated);
                return accepted(session).await;
            }
            IdState::Unknown => {}
        }
        // Older events still wait in the spool: this one queues behind them, so events
        // reach the upstream in arrival order.
        if self.spool.depth(Queue::Events).entries > 0 {
            return self
                .spool_and_answer(session, Route::Event, Queue::Events, &record)
                .await;
        }
        let upstream = self.relay.events.as_ref().expect("checked by serve");
        let relayed = match &record.dedupe_key {
            Some(key) => {
                let shared = self
                    .relaying
                    .try_get_with(key.clone(), relay(upstream, &self.relay_connector, &record))
                    .await
                    .map_err(|e| (*e).clone());
                if let Ok(answer) = &shared {
                    if answer.status < 500 {
                        // Remembered before the in-flight entry goes, so a later
                        // duplicate finds the answer.
                        if let Err(e) = self
                            .spool
                            .remember(Queue::Events, key.clone(), answer.clone())
                            .await
                        {
                            tracing::warn!(error = %e, "cannot keep an event answer for deduplication");
                        }
                    }
                }
                self.relaying.invalidate(key).await;
                shared
            }
            None => relay(upstream, &self.relay_connector, &record).await,
        };
        match relayed {
            Ok(answer) if answer.status < 500 => {
                self.metrics
                    .record_forward(Route::Event, ForwardResult::Relayed);
                write_answer(session, &answer).await
            }
            outcome => {
                if let Err(e) = &outcome {
                    tracing::warn!(error = %e, "event relay failed; spooling");
                }
                self.spool_and_answer(session, Route::Event, Queue::Events, &record)
                    .await
            }
        }
    }

    async fn logblob(&self, session: &mut Session, mut record: Record) -> pingora::Result<u64> {
        if self.dedupe(Queue::LogBlob, &mut record).await != IdState::Unknown {
            self.metrics
                .record_forward(Route::LogBlob, ForwardResult::Deduplicated);
            return accepted(session).await;
        }
        self.spool_and_answer(session, Route::LogBlob, Queue::LogBlob, &record)
            .await
    }

    async fn stats(&self, session: &mut Session, record: Record) -> pingora::Result<u64> {
        match self.stats_tx.try_send(record) {
            Ok(()) => self
                .metrics
                .record_forward(Route::Stats, ForwardResult::Queued),
            Err(_) => {
                self.metrics
                    .record_forward(Route::Stats, ForwardResult::Dropped);
                self.metrics.stats_dropped.inc();
            }
        }
        json(session, 200, b"{\"status\":200}").await
    }

    /// Gives a record with a `reqId` its dedupe key and says what the spool knows of
    /// it. Off the runtime: it hashes the body and reads the store.
    async fn dedupe(&self, queue: Queue, record: &mut Record) -> IdState {
        let has_id = record
            .target
            .split_once('?')
            .is_some_and(|(_, q)| dedupe::req_id(q).is_some());
        if !has_id {
            return IdState::Unknown;
        }
        let (spool, window) = (self.spool.clone(), self.dedupe_ms);
        let (target, body) = (record.target.clone(), record.body.clone());
        let looked_up = tokio::task::spawn_blocking(move || {
            let key = dedupe::key(&target, &body)?;
            let state = spool.id_state_blocking(queue, &key, unix_ms(), window);
            Some((key, state))
        })
        .await;
        match looked_up {
            Ok(Some((key, state))) => {
                record.dedupe_key = Some(key);
                state
            }
            _ => IdState::Unknown,
        }
    }

    async fn spool_and_answer(
        &self,
        session: &mut Session,
        route: Route,
        queue: Queue,
        record: &Record,
    ) -> pingora::Result<u64> {
        match self.spool.append(queue, record).await {
            Ok(Appended::Stored(_)) => {
                self.metrics.record_forward(route, ForwardResult::Spooled);
                accepted(session).await
            }
            Ok(Appended::Duplicate) => {
                self.metrics
                    .record_forward(route, ForwardResult::Deduplicated);
                accepted(session).await
            }
            Err(e) => {
                self.metrics.record_forward(route, ForwardResult::Refused);
                tracing::warn!(route = route.label(), error = %e, "request refused: not spooled");
                respond::plain_with(
                    session,
                    503,
                    "spool full or unavailable: retry later",
                    |r| {
                        r.insert_header(header::RETRY_AFTER, RETRY_AFTER_SECS)
                            .map(|_| ())
                    },
                )
                .await
            }
        }
    }
}

/// Answers a forwarded route while the spool is not open (opening after a start, or
/// failed): 503 with `Retry-After`, nothing accepted that could not be kept.
pub async fn not_open(
    session: &mut Session,
    metrics: &Metrics,
    route: Route,
) -> pingora::Result<u64> {
    metrics.record_forward(route, ForwardResult::Refused);
    session.set_keepalive(None);
    respond::plain_with(session, 503, "spool not open yet: retry later", |r| {
        r.insert_header(header::RETRY_AFTER, RETRY_AFTER_SECS)
            .map(|_| ())
    })
    .await
}

/// Reads the whole request body; `None` if it is larger than `limit`.
async fn read_body(session: &mut Session, limit: u64) -> pingora::Result<Option<Bytes>> {
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(None);
    }
    // Do not trust a declared length with memory before the bytes arrive.
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(64 * 1024) as usize);
    while let Some(chunk) = session.read_request_body().await? {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf.freeze()))
}

/// Sends a record to an upstream: same method, target, body and `Content-Type`, plus
/// `X-Forwarded-For` and `Via`.
pub async fn relay(
    upstream: &HttpUpstream,
    connector: &Connector,
    record: &Record,
) -> Result<StoredAnswer, ExchangeError> {
    let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(3);
    if let Some(ct) = record
        .content_type
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        headers.push((header::CONTENT_TYPE, ct));
    }
    if let Ok(xff) = HeaderValue::from_str(&record.client_ip) {
        if !record.client_ip.is_empty() {
            headers.push((HeaderName::from_static("x-forwarded-for"), xff));
        }
    }
    headers.push((header::VIA, HeaderValue::from_static(VIA)));
    let answer = upstream
        .exchange(
            connector,
            &record.method,
            &record.target,
            &headers,
            Some(record.body.clone()),
            1 << 20,
        )
        .await?;
    Ok(StoredAnswer {
        at_ms: unix_ms(),
        status: answer.status,
        content_type: answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: answer.body,
    })
}

async fn write_answer(session: &mut Session, answer: &StoredAnswer) -> pingora::Result<u64> {
    let mut resp = ResponseHeader::build_no_case(answer.status, Some(3))?;
    if let Some(ct) = &answer.content_type {
        resp.insert_header(header::CONTENT_TYPE, ct.as_str())?;
    }
    resp.insert_header(header::CONTENT_LENGTH, answer.body.len())?;
    let empty = answer.body.is_empty();
    session.write_response_header(Box::new(resp)).await?;
    if !empty {
        session
            .write_response_body(answer.body.clone(), true)
            .await?;
    }
    Ok(answer.body.len() as u64)
}

async fn json(session: &mut Session, status: u16, body: &'static [u8]) -> pingora::Result<u64> {
    let mut resp = ResponseHeader::build_no_case(status, Some(2))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    session.write_response_header(Box::new(resp)).await?;
    session
        .write_response_body(Bytes::from_static(body), true)
        .await?;
    Ok(body.len() as u64)
}

async fn accepted(session: &mut Session) -> pingora::Result<u64> {
    json(session, 202, b"{\"status\":202}").await
}
