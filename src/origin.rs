//! Origin client: fetches one slice with a `Range` request, validates the answer, and
//! fails over across `origin.urls` in order.
//!
//! A response is accepted only if it is a 206 whose `Content-Range` starts at the asked
//! byte, ends at the asked byte or at the end of the object, carries the total size,
//! has no `Content-Encoding` other than `identity`, and whose body has exactly that many
//! bytes. Anything else is an [`OriginError`], and errors are never cached. Whether the
//! answer agrees with what is already known of the object (size, validator) is the
//! cache's call ([`crate::cache::meta`]).
//!
//! Two answers are about the object, not failures of the origin: a 416 with the
//! object's size, and a 404 or 410 (the object does not exist). Origins are replicas, so
//! either is final (no failover) and leaves the origin's health as it is; the cache
//! remembers a 404/410 for `origin.negative_ttl_secs` ([`crate::cache::missing`]).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;
use std::sync::Arc;

use crate::cache::meta::{Answer, Validator, MAX_CONTENT_TYPE};
use crate::cache::pages::{Landing, PagePool, SlotWriter};
use crate::config::{self, PathTemplate};
use crate::metrics::{Metrics, OriginResult};
use crate::range::ByteRange;
use crate::upstream::ConnectorSettings;
use crate::upstream::{self, ResolveError, POOL_IDLE};

/// Consecutive failures after which an origin is tried after the healthy ones.
const UNHEALTHY_AFTER: u32 = 3;

/// Why a slice could not be had from the origins.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    #[error("{origin}: cannot connect or lost the connection: {detail}")]
    Unreachable { origin: String, detail: String },
    #[error("{origin}: no complete answer within {ms} ms")]
    Timeout { origin: String, ms: u64 },
    #[error("{origin}: answered status {status} to a slice request (expected 206)")]
    BadStatus { origin: String, status: u16 },
    #[error("{origin}: invalid slice response: {why}")]
    Invalid { origin: String, why: &'static str },
    /// The origin says the range starts at or past the end of the object.
    #[error("range starts past the end of the {size}-byte object")]
    NotSatisfiable { size: u64 },
    /// The origin answered 404 or 410: the object does not exist.
    #[error("{origin}: answered {status}: the object does not exist")]
    NotFound { origin: String, status: u16 },
    /// An origin answered 404 or 410 for the object less than `origin.negative_ttl_secs`
    /// ago: no origin was asked ([`crate::cache::missing`]).
    #[error("the object does not exist (an origin answered 404 or 410 for it recently)")]
    RememberedNotFound,
    /// A valid answer that contradicts what is known of the object (its size or
    /// validator): refused by the cache, see [`crate::cache::meta`].
    #[error("the origin's answer disagrees with the object's {what} already known; refused")]
    Changed { what: &'static str },
    /// Directed mode (SPEC 6.3): no node of the site holds the slice, and a client's
    /// miss is not filled from upstream.
    #[error("no node of the site holds this slice (directed mode)")]
    NotHeld,
    /// A peer or parent answered that its own upstream failed (`status` 502 or 504).
    #[error("{via}: its upstream failed ({status})")]
    Upstream { via: String, status: u16 },
}

impl OriginError {
    /// The status a client gets when its request needed this slice.
    pub fn status(&self) -> u16 {
        match self {
            OriginError::Timeout { .. } => 504,
            OriginError::Upstream { status, .. } => *status,
            OriginError::NotFound { .. }
            | OriginError::RememberedNotFound
            | OriginError::NotHeld => 404,
            // A 416 is turned into the client's 416 by the metadata lookup; one that
            // reaches a client means the origin contradicted itself.
            _ => 502,
        }
    }

    /// Whether this says something about the origin's health (rather than about the
    /// object): transport failures, timeouts, 5xx and malformed answers.
    fn is_origin_failure(&self) -> bool {
        match self {
            OriginError::BadStatus { status, .. } => *status >= 500,
            OriginError::NotSatisfiable { .. }
            | OriginError::NotFound { .. }
            | OriginError::RememberedNotFound
            | OriginError::NotHeld => false,
            _ => true,
        }
    }

    /// Whether this is a definite answer about the object (past its end, or no such
    /// object): every replica would say the same, so no other origin is asked.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            OriginError::NotSatisfiable { .. } | OriginError::NotFound { .. }
        )
    }

    fn result(&self) -> OriginResult {
        match self {
            OriginError::Unreachable { .. } => OriginResult::ConnectError,
            OriginError::Timeout { .. } => OriginResult::Timeout,
            OriginError::BadStatus { .. } => OriginResult::BadStatus,
            OriginError::Invalid { .. } => OriginResult::Invalid,
            OriginError::NotSatisfiable { .. } => OriginResult::NotSatisfiable,
            OriginError::NotFound { .. }
            | OriginError::RememberedNotFound
            | OriginError::NotHeld => OriginResult::NotFound,
            OriginError::Changed { .. } => OriginResult::Invalid,
            OriginError::Upstream { .. } => OriginResult::BadStatus,
        }
    }
}

/// A validated slice body with what it says about the object.
#[derive(Debug, Clone)]
pub struct SliceBody {
    pub bytes: Bytes,
    /// Total size (from `Content-Range`), validator and type.
    pub about: Answer,
}

/// Health of one origin, for ordering and `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OriginHealth {
    pub url: String,
    pub healthy: bool,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

struct Origin {
    url: String,
    peer: HttpPeer,
    host_header: String,
    consecutive_failures: AtomicU32,
    /// Milliseconds after the client's start of the last failure.
    last_failure_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Origin {
    /// Healthy, or unhealthy for long enough that the next fetch should probe it again
    /// in its configured place.
    fn healthy(&self, now_ms: u64, retry_after_ms: u64) -> bool {
        self.consecutive_failures.load(Ordering::Relaxed) < UNHEALTHY_AFTER
            || now_ms.saturating_sub(self.last_failure_ms.load(Ordering::Relaxed)) >= retry_after_ms
    }
}

/// Fetches slices from the configured origins. One per process; its connection pool is
/// shared by every request.
pub struct OriginClient {
    connector: Connector,
    origins: Vec<Origin>,
    started: Instant,
    retry_unhealthy_ms: u64,
    path: PathTemplate,
    timeout: Duration,
    negative_ttl: Duration,
    metrics: Arc<Metrics>,
    /// Where slice bodies are read into when they are big enough (see [`PagePool`]).
    pages: Option<PagePool>,
}

impl OriginClient {
    /// Resolves every origin host once (at start) and builds the connection pool.
    pub fn new(
        cfg: &config::Origin,
        connectors: &ConnectorSettings,
        metrics: Arc<Metrics>,
        pages: Option<PagePool>,
    ) -> Result<Self, ResolveError> {
        let origins = cfg
            .urls
            .iter()
            .map(|u| {
                let addr = upstream::resolve(u)?;
                Ok(Origin {
                    url: u.url.clone(),
                    peer: upstream::peer(u, addr, cfg.connect_timeout, cfg.timeout),
                    host_header: upstream::host_header(u),
                    consecutive_failures: AtomicU32::new(0),
                    last_failure_ms: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            connector: Connector::new(Some(connectors.options())),
            origins,
            started: Instant::now(),
            retry_unhealthy_ms: cfg.retry_unhealthy.as_millis() as u64,
            path: cfg.path.clone(),
            timeout: cfg.timeout,
            negative_ttl: cfg.negative_ttl,
            metrics,
            pages,
        })
    }

    /// How long an answer that an object does not exist (404, 410) holds:
    /// `origin.negative_ttl_secs`.
    pub fn negative_ttl(&self) -> Duration {
        self.negative_ttl
    }

    /// Fetches `range` of object (o, v), trying healthy origins first, each in
    /// configured order; the body lands as `landing` says.
    pub async fn fetch_slice(
        &self,
        o: &str,
        v: &str,
        range: ByteRange,
        landing: Landing,
    ) -> Result<SliceBody, OriginError> {
        let path = self.path.render(o, v);
        let mut last_error = None;
        for (attempt, origin) in self.in_order().enumerate() {
            if attempt > 0 {
                self.metrics.origin_failovers.inc();
            }
            let started = Instant::now();
            let result = match tokio::time::timeout(
                self.timeout,
                self.fetch_from(origin, &path, range, landing),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(OriginError::Timeout {
                    origin: origin.url.clone(),
                    ms: self.timeout.as_millis() as u64,
                }),
            };
            self.metrics
                .origin_duration
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(body) => {
                    self.metrics.record_origin(OriginResult::Ok);
                    self.metrics.origin_bytes.inc_by(body.bytes.len() as u64);
                    origin.consecutive_failures.store(0, Ordering::Relaxed);
                    return Ok(body);
                }
                Err(e) if e.is_final() => {
                    // A definite answer about the object, not a failure of this origin:
                    // it answers, and every replica would answer the same.
                    self.metrics.record_origin(e.result());
                    origin.consecutive_failures.store(0, Ordering::Relaxed);
                    tracing::debug!(origin = %origin.url, path = %path, answer = %e, "origin answered about the object");
                    return Err(e);
                }
                Err(e) => {
                    self.metrics.record_origin(e.result());
                    if e.is_origin_failure() {
                        origin.consecutive_failures.fetch_add(1, Ordering::Relaxed);
                        origin
                            .last_failure_ms
                            .store(self.now_ms(), Ordering::Relaxed);
                    }
                    tracing::warn!(origin = %origin.url, path = %path, error = %e, "origin slice fetch failed");
                    if let Ok(mut last) = origin.last_error.lock() {
                        *last = Some(e.to_string());
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("at least one origin is configured"))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Healthy origins first, then the others, each group in configured order. An
    /// unhealthy origin counts as healthy again once `retry_unhealthy_ms` has passed
    /// since its last failure, so it gets a probe and, if that succeeds, its traffic back.
    fn in_order(&self) -> impl Iterator<Item = &Origin> {
        let now = self.now_ms();
        let health: Vec<bool> = self
            .origins
            .iter()
            .map(|o| o.healthy(now, self.retry_unhealthy_ms))
            .collect();
        let pick = move |want: bool| {
            self.origins
                .iter()
                .zip(health.clone())
                .filter(move |(_, h)| *h == want)
                .map(|(o, _)| o)
        };
        pick(true).chain(pick(false))
    }

    pub fn health(&self) -> Vec<OriginHealth> {
        self.origins
            .iter()
            .map(|o| OriginHealth {
                url: o.url.clone(),
                healthy: o.healthy(self.now_ms(), self.retry_unhealthy_ms),
                consecutive_failures: o.consecutive_failures.load(Ordering::Relaxed),
                last_error: o.last_error.lock().ok().and_then(|l| l.clone()),
            })
            .collect()
    }

    async fn fetch_from(
        &self,
        origin: &Origin,
        path: &str,
        range: ByteRange,
        landing: Landing,
    ) -> Result<SliceBody, OriginError> {
        let unreachable = |e: Box<pingora::Error>| transport_error(origin, &e, self.timeout);
        // A pooled connection may have been closed by the origin while idle: one retry
        // on another connection, only when no answer came on it. An answer that was
        // read, even a malformed one, and a timeout are not retried: the origin did
        // answer, and asking it again would double the load of a failing origin.
        for retry in [false, true] {
            let (mut session, reused) = self
                .connector
                .get_http_session(&origin.peer)
                .await
                .map_err(unreachable)?;
            let req = slice_request(path, &origin.host_header, range).map_err(unreachable)?;
            if let Err(e) = send_and_read_header(&mut session, req).await {
                if reused && !retry && upstream::lost_before_answer(&e) {
                    continue;
                }
                return Err(unreachable(e));
            }
            let pages = landing.pool(self.pages.as_ref());
            let body = read_slice(&origin.url, &mut session, range, pages).await?;
            self.connector
                .release_http_session(session, &origin.peer, Some(POOL_IDLE))
                .await;
            return Ok(body);
        }
        unreachable!("the second attempt always returns")
    }
}

fn transport_error(origin: &Origin, e: &pingora::Error, timeout: Duration) -> OriginError {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            OriginError::Timeout {
                origin: origin.url.clone(),
                ms: timeout.as_millis() as u64,
            }
        }
        // The origin answered, but not with HTTP/1.1 the edge can read: a bad status
        // line, a Content-Length that is not one number, a header block over 1 MiB or
        // over 256 lines.
        ErrorType::InvalidHTTPHeader => OriginError::Invalid {
            origin: origin.url.clone(),
            why: "malformed response header",
        },
        _ => OriginError::Unreachable {
            origin: origin.url.clone(),
            detail: e.to_string(),
        },
    }
}

pub(crate) fn slice_request(
    path: &str,
    host: &str,
    range: ByteRange,
) -> pingora::Result<Box<RequestHeader>> {
    let mut req = RequestHeader::build("GET", path.as_bytes(), Some(4))?;
    req.insert_header(http::header::HOST, host)?;
    req.insert_header(
        http::header::RANGE,
        format!("bytes={}-{}", range.start, range.end),
    )?;
    // Slices are cut from the object's own bytes: no coding may change them.
    req.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
    req.insert_header(
        http::header::USER_AGENT,
        concat!("cdn-edge/", env!("CARGO_PKG_VERSION")),
    )?;
    Ok(Box::new(req))
}

/// Sends a request without a body and reads the header of the final answer (interim
/// 1xx answers are skipped).
pub(crate) async fn send_and_read_header(
    session: &mut HttpSession,
    req: Box<RequestHeader>,
) -> pingora::Result<()> {
    session.write_request_header(req).await?;
    session.finish_request_body().await?;
    upstream::read_final_header(session).await
}

/// Reads and validates the answer to a slice request (module docs) whose header has
/// been read. `label` names the upstream in errors.
pub(crate) async fn read_slice(
    label: &str,
    session: &mut HttpSession,
    range: ByteRange,
    pages: Option<&PagePool>,
) -> Result<SliceBody, OriginError> {
    let invalid = |why: &'static str| OriginError::Invalid {
        origin: label.to_string(),
        why,
    };
    let resp = session
        .response_header()
        .ok_or_else(|| invalid("no response header"))?;
    let status = resp.status.as_u16();
    let content_range = resp
        .headers
        .get(http::header::CONTENT_RANGE)
        .map(|v| v.as_bytes());
    match status {
        206 => {}
        404 | 410 => {
            return Err(OriginError::NotFound {
                origin: label.to_string(),
                status,
            })
        }
        416 => {
            let size = content_range
                .and_then(parse_unsatisfied_range)
                .ok_or_else(|| invalid("416 without Content-Range: bytes */size"))?;
            if range.start < size {
                return Err(invalid("416 for a range that starts inside the object"));
            }
            return Err(OriginError::NotSatisfiable { size });
        }
        _ => {
            return Err(OriginError::BadStatus {
                origin: label.to_string(),
                status,
            })
        }
    }
    let (first, last, total) = content_range
        .and_then(parse_content_range)
        .ok_or_else(|| invalid("206 without a Content-Range: bytes first-last/total"))?;
    if first != range.start || total <= first || last != range.end.min(total - 1) {
        return Err(invalid("Content-Range does not match the requested slice"));
    }
    if !identity_coded(resp.headers.get_all(http::header::CONTENT_ENCODING)) {
        return Err(invalid("206 with a Content-Encoding other than identity"));
    }
    let len = last - first + 1;
    // Every value of every Content-Length line: one length may be repeated (RFC 9110
    // §8.6), and Pingora has refused differing ones already.
    let mut lengths = resp
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','));
    if lengths.any(|l| {
        std::str::from_utf8(l)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            != Some(len)
    }) {
        return Err(invalid("Content-Length does not match Content-Range"));
    }
    let about = Answer {
        size: total,
        validator: Validator::from_headers(
            resp.headers.get(http::header::ETAG),
            resp.headers.get(http::header::LAST_MODIFIED),
        ),
        content_type: resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .filter(|t| t.len() <= MAX_CONTENT_TYPE)
            .cloned(),
    };
    let mut buf = SliceBuf::new(len, pages);
    // False when the chunk would overrun the announced length.
    let append = |buf: &mut SliceBuf, chunk: &[u8]| {
        let fits = (buf.len() + chunk.len()) as u64 <= len;
        if fits {
            buf.append(chunk);
        }
        fits
    };
    loop {
        // Over HTTP/1.1 each chunk is copied straight from the session's read buffer into
        // the slice, not through an allocation of its own.
        let read = match &mut *session {
            HttpSession::H1(h1) => h1
                .read_body_ref()
                .await
                .map(|c| c.map(|c| append(&mut buf, c))),
            other => other
                .read_response_body()
                .await
                .map(|c| c.map(|c| append(&mut buf, &c))),
        };
        match read {
            Ok(Some(true)) => {}
            Ok(Some(false)) => return Err(invalid("body longer than its Content-Range")),
            Ok(None) => break,
            Err(e) => {
                return Err(OriginError::Unreachable {
                    origin: label.to_string(),
                    detail: e.to_string(),
                })
            }
        }
    }
    if buf.len() as u64 != len {
        return Err(invalid("body shorter than its Content-Range"));
    }
    Ok(SliceBody {
        bytes: buf.finish(),
        about,
    })
}

/// A slice body being read: in a page-pool slot when one is free and the slice is worth
/// it, otherwise on the heap.
enum SliceBuf {
    Heap(BytesMut),
    Pool(SlotWriter),
}

impl SliceBuf {
    fn new(len: u64, pages: Option<&PagePool>) -> Self {
        match pages.and_then(|p| p.writer(len as usize)) {
            Some(w) => Self::Pool(w),
            None => Self::Heap(BytesMut::with_capacity(len as usize)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Heap(b) => b.len(),
            Self::Pool(w) => w.written_len(),
        }
    }

    /// The caller keeps within the length given to [`SliceBuf::new`].
    fn append(&mut self, chunk: &[u8]) {
        match self {
            Self::Heap(b) => b.extend_from_slice(chunk),
            Self::Pool(w) => {
                if w.write(chunk).is_err() {
                    // The pool's file refused: carry on on the heap.
                    let mut heap = BytesMut::with_capacity(w.capacity());
                    heap.extend_from_slice(w.written());
                    heap.extend_from_slice(chunk);
                    *self = Self::Heap(heap);
                }
            }
        }
    }

    fn finish(self) -> Bytes {
        match self {
            Self::Heap(b) => b.freeze(),
            Self::Pool(w) => w.finish(),
        }
    }
}

/// Whether every `Content-Encoding` value is `identity` (or there is none): a coded body
/// is not the object's bytes at that range.
fn identity_coded(values: http::header::GetAll<'_, HeaderValue>) -> bool {
    values.iter().all(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .all(|c| c.is_empty() || c.eq_ignore_ascii_case(b"identity"))
    })
}

/// Parses `bytes first-last/total` (total must be known).
pub fn parse_content_range(v: &[u8]) -> Option<(u64, u64, u64)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let rest = strip_bytes_unit(s)?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b, total) = (num(a)?, num(b)?, num(total)?);
    (a <= b && b < total).then_some((a, b, total))
}

/// Parses `bytes */total` from a 416.
pub fn parse_unsatisfied_range(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?.trim();
    num(strip_bytes_unit(s)?.strip_prefix("*/")?)
}

fn strip_bytes_unit(s: &str) -> Option<&str> {
    let (unit, rest) = s.split_once(' ')?;
    unit.eq_ignore_ascii_case("bytes")
        .then(|| rest.trim_start())
}

fn num(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(parse_content_range(b"bytes 0-99/1000"), Some((0, 99, 1000)));
        assert_eq!(parse_content_range(b"Bytes 5-5/6"), Some((5, 5, 6)));
        for bad in [
            &b"bytes 0-99/*"[..],
            b"bytes 0-99",
            b"bytes 9-1/10",
            b"bytes 0-10/10",
            b"items 0-1/2",
            b"bytes -1-2/3",
            b"bytes 0-1/\xff",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
        assert_eq!(parse_unsatisfied_range(b"bytes */1234"), Some(1234));
        assert_eq!(parse_unsatisfied_range(b"bytes */0"), Some(0));
        assert_eq!(parse_unsatisfied_range(b"bytes 0-1/2"), None);
    }

    #[test]
    fn only_identity_coded_bodies_are_slices() {
        let coded = |values: &[&'static str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(http::header::CONTENT_ENCODING, HeaderValue::from_static(v));
            }
            identity_coded(h.get_all(http::header::CONTENT_ENCODING))
        };
        assert!(coded(&[]));
        assert!(coded(&["identity"]));
        assert!(coded(&["Identity", " identity , identity"]));
        for bad in [
            &["gzip"][..],
            &["identity, gzip"],
            &["identity", "br"],
            &["x"],
        ] {
            assert!(!coded(bad), "{bad:?}");
        }
    }

    #[test]
    fn error_statuses() {
        let t = OriginError::Timeout {
            origin: "o".into(),
            ms: 1,
        };
        assert_eq!(t.status(), 504);
        let u = OriginError::Unreachable {
            origin: "o".into(),
            detail: "x".into(),
        };
        assert_eq!(u.status(), 502);
        assert_eq!(
            OriginError::BadStatus {
                origin: "o".into(),
                status: 200
            }
            .status(),
            502
        );
        assert_eq!(OriginError::NotSatisfiable { size: 3 }.status(), 502);
        let gone = OriginError::NotFound {
            origin: "o".into(),
            status: 410,
        };
        assert_eq!(gone.status(), 404);
        assert_eq!(OriginError::RememberedNotFound.status(), 404);
    }

    #[test]
    fn answers_about_the_object_are_final_and_not_failures() {
        let not_found = OriginError::NotFound {
            origin: "o".into(),
            status: 404,
        };
        let past_end = OriginError::NotSatisfiable { size: 3 };
        for e in [&not_found, &past_end] {
            assert!(e.is_final() && !e.is_origin_failure(), "{e}");
        }
        assert_eq!(not_found.result(), OriginResult::NotFound);
        let failures = [
            OriginError::BadStatus {
                origin: "o".into(),
                status: 503,
            },
            OriginError::Unreachable {
                origin: "o".into(),
                detail: "x".into(),
            },
        ];
        for e in &failures {
            assert!(!e.is_final() && e.is_origin_failure(), "{e}");
        }
    }
}
