//! The dictionary cache: entries by canonical key, bounded in bytes, each with its own
//! freshness; one upstream request per key at a time; stale-if-error.
//!
//! An entry is fresh until `fresh_until`. After that the next lookup asks the upstream
//! (every concurrent lookup of the key waits for that one request). If the upstream
//! fails (unreachable, timeout or 5xx), a 200 entry is still served until
//! `stale_until = fresh_until + stale_if_error_secs`; moka drops it after that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use moka::Expiry;
use pingora::connectors::http::Connector;

use super::encoding::{self, Encoding};
use super::policy::{storable, Storable};
use crate::config::Dictionary as DictionaryConfig;
use crate::metrics::{DictionaryResult, Metrics};
use crate::upstream::ConnectorSettings;
use crate::upstream::{ExchangeError, HttpUpstream, ResolveError};

/// Largest upstream answer accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Per-entry bookkeeping counted against `dictionary.memory_bytes`.
const ENTRY_OVERHEAD: u32 = 256;
/// After a failed refresh, how long the stale copy is served before the upstream is
/// asked again.
const STALE_RETRY: Duration = Duration::from_secs(10);
const IDENTITY: HeaderValue = HeaderValue::from_static("identity");

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// One stored (or passed-through) upstream answer.
#[derive(Debug)]
pub struct Entry {
    pub status: u16,
    pub body: Bytes,
    pub content_type: HeaderValue,
    /// The upstream's `Cache-Control`, passed on to clients.
    pub cache_control: Option<HeaderValue>,
    pub stored: Instant,
    pub fresh_until: Instant,
    pub stale_until: Instant,
    /// Set on a copy kept for a short while after a failed refresh, so the upstream is
    /// not asked again on every lookup while it is down.
    pub served_stale: bool,
    /// br, zstd, gzip forms, made once when the entry is stored; `None` where
    /// compression would not make the body smaller.
    encoded: [Option<Bytes>; 3],
}

impl Entry {
    /// The body in `enc` if the entry has that form, else as it is.
    pub fn body_for(&self, enc: Encoding) -> (Encoding, Bytes) {
        match enc.slot().and_then(|slot| self.encoded[slot].clone()) {
            Some(b) => (enc, b),
            None => (Encoding::Identity, self.body.clone()),
        }
    }

    /// Bytes held: body and encoded forms.
    fn held_bytes(&self) -> usize {
        self.body.len() + self.encoded.iter().flatten().map(Bytes::len).sum::<usize>()
    }

    /// Whole seconds since the answer was received.
    pub fn age_secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.stored).as_secs()
    }
}

/// How a lookup was answered, for `Cache-Status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Fresh entry.
    Hit,
    /// No entry: fetched (and stored if storable).
    Miss,
    /// Expired entry replaced by a new upstream answer.
    Refreshed,
    /// Expired entry served because the upstream failed.
    Stale,
}

/// Why a lookup has no answer to give.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct LookupError(#[from] pub ExchangeError);

impl LookupError {
    pub fn status(&self) -> u16 {
        match self.0 {
            ExchangeError::Timeout { .. } => 504,
            _ => 502,
        }
    }
}

/// Counts a lookup as waiting on the upstream for as long as it lives.
struct Pending<'a>(&'a Metrics);

impl<'a> Pending<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.dictionary_pending.inc();
        Self(m)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.dictionary_pending.dec();
    }
}

/// All values of a header as one comma-separated value.
fn join_values(headers: &http::HeaderMap, name: http::header::HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(&name).iter();
    let first = values.next()?.clone();
    let rest: Vec<&[u8]> = values.map(|v| v.as_bytes()).collect();
    if rest.is_empty() {
        return Some(first);
    }
    let mut joined = first.as_bytes().to_vec();
    for r in rest {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(r);
    }
    HeaderValue::from_bytes(&joined).ok()
}

struct Lifetime;

impl Expiry<Arc<str>, Arc<Entry>> for Lifetime {
    fn expire_after_create(&self, _k: &Arc<str>, v: &Arc<Entry>, now: Instant) -> Option<Duration> {
        Some(v.stale_until.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _k: &Arc<str>,
        v: &Arc<Entry>,
        now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.stale_until.saturating_duration_since(now))
    }
}

/// Dictionary cache and its upstream. One per process.
pub struct DictionaryStore {
    entries: moka::future::Cache<Arc<str>, Arc<Entry>>,
    inflight: moka::future::Cache<Arc<str>, Arc<Entry>>,
    upstream: HttpUpstream,
    connector: Connector,
    ttl: Duration,
    negative_ttl: Duration,
    stale_if_error: Duration,
    capacity_bytes: u64,
    metrics: Arc<Metrics>,
}

/// Point-in-time size, for `/status` and gauges.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DictionaryStats {
    pub entries: u64,
    pub bytes: u64,
    pub capacity_bytes: u64,
}

impl DictionaryStore {
    pub fn new(
        cfg: &DictionaryConfig,
        connectors: &ConnectorSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ResolveError> {
        let upstream = HttpUpstream::new(&cfg.upstream, cfg.connect_timeout, cfg.timeout)?;
        let entries = moka::future::Cache::builder()
            .name("dictionary")
            .max_capacity(cfg.memory_bytes)
            .weigher(|k: &Arc<str>, v: &Arc<Entry>| {
                let n = k.len() + v.held_bytes();
                u32::try_from(n)
                    .unwrap_or(u32::MAX)
                    .saturating_add(ENTRY_OVERHEAD)
            })
            .expire_after(Lifetime)
            .build();
        Ok(Self {
            entries,
            // A finished fetch is only read by the lookups that waited on it; the TTL is a
            // safety net should a waiter vanish before removing it.
            inflight: moka::future::Cache::builder()
                .max_capacity(65_536)
                .time_to_live(Duration::from_secs(1))
                .build(),
            upstream,
            connector: Connector::new(Some(connectors.options())),
            ttl: Duration::from_secs(cfg.ttl_secs),
            negative_ttl: Duration::from_secs(cfg.negative_ttl_secs),
            stale_if_error: Duration::from_secs(cfg.stale_if_error_secs),
            capacity_bytes: cfg.memory_bytes,
            metrics,
        })
    }

    /// Answers `target` (a canonical `path?query`) from cache or upstream.
    pub async fn lookup(&self, target: &str) -> Result<(Arc<Entry>, Outcome), LookupError> {
        let cached = self.entries.get(target).await;
        let now = Instant::now();
        if let Some(e) = cached.as_ref().filter(|e| now < e.fresh_until) {
            if e.served_stale {
                return self.serve_stale(e.clone());
            }
            self.metrics.record_dictionary(if e.status == 404 {
                DictionaryResult::NegativeHit
            } else {
                DictionaryResult::Hit
            });
            return Ok((e.clone(), Outcome::Hit));
        }
        // Boxed: a hit does not carry the size of the upstream exchange.
        Box::pin(self.lookup_miss(Arc::from(target), cached)).await
    }

    async fn lookup_miss(
        &self,
        key: Arc<str>,
        cached: Option<Arc<Entry>>,
    ) -> Result<(Arc<Entry>, Outcome), LookupError> {
        let fetched = {
            let _pending = Pending::new(&self.metrics);
            let f = self
                .inflight
                .try_get_with(key.clone(), self.fetch(key.clone()))
                .await;
            self.inflight.invalidate(&key).await;
            f
        };
        let stale = cached.filter(|e| e.status == 200 && Instant::now() < e.stale_until);
        match (fetched, stale) {
            (Ok(e), Some(old)) if e.status >= 500 => self.keep_stale(key, old).await,
            (Ok(e), old) => {
                let outcome = if old.is_some() {
                    Outcome::Refreshed
                } else {
                    Outcome::Miss
                };
                self.metrics
                    .record_dictionary(if outcome == Outcome::Refreshed {
                        DictionaryResult::Refreshed
                    } else {
                        DictionaryResult::Miss
                    });
                Ok((e, outcome))
            }
            (Err(_), Some(old)) => self.keep_stale(key, old).await,
            (Err(e), None) => {
                self.metrics.record_dictionary(DictionaryResult::Error);
                Err(LookupError((*e).clone()))
            }
        }
    }

    fn serve_stale(&self, old: Arc<Entry>) -> Result<(Arc<Entry>, Outcome), LookupError> {
        self.metrics.record_dictionary(DictionaryResult::Stale);
        Ok((old, Outcome::Stale))
    }

    /// Serves a stale copy after a failed refresh, and keeps serving it for
    /// [`STALE_RETRY`] (within its stale-if-error window) before asking again.
    async fn keep_stale(
        &self,
        key: Arc<str>,
        old: Arc<Entry>,
    ) -> Result<(Arc<Entry>, Outcome), LookupError> {
        let hold = Arc::new(Entry {
            status: old.status,
            body: old.body.clone(),
            content_type: old.content_type.clone(),
            cache_control: old.cache_control.clone(),
            stored: old.stored,
            fresh_until: (Instant::now() + STALE_RETRY).min(old.stale_until),
            stale_until: old.stale_until,
            served_stale: true,
            encoded: old.encoded.clone(),
        });
        self.entries.insert(key, hold.clone()).await;
        self.serve_stale(hold)
    }

    /// One upstream request; stores the answer when it may be cached.
    async fn fetch(&self, key: Arc<str>) -> Result<Arc<Entry>, ExchangeError> {
        // Another lookup may have stored a fresh answer since this one looked.
        if let Some(e) = self.entries.get(&key).await {
            if Instant::now() < e.fresh_until && !e.served_stale {
                return Ok(e);
            }
        }
        let started = Instant::now();
        let answer = self
            .upstream
            .exchange(
                &self.connector,
                "GET",
                &key,
                &[(http::header::ACCEPT_ENCODING, IDENTITY)],
                None,
                MAX_BODY_BYTES,
            )
            .await
            .and_then(|a| {
                let encoded = a
                    .headers
                    .get(http::header::CONTENT_ENCODING)
                    .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
                if encoded {
                    return Err(ExchangeError::Invalid {
                        url: self.upstream.url.url.clone(),
                        why: "content-encoded answer to Accept-Encoding: identity",
                    });
                }
                Ok(a)
            });
        self.metrics
            .dictionary_upstream_duration
            .observe(started.elapsed().as_secs_f64());
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                self.metrics.record_dictionary_upstream(match e {
                    ExchangeError::Timeout { .. } => "timeout",
                    _ => "error",
                });
                tracing::warn!(error = %e, "dictionary upstream failed");
                return Err(e);
            }
        };
        self.metrics
            .record_dictionary_upstream(if answer.status >= 500 {
                "server_error"
            } else {
                "ok"
            });
        let now = Instant::now();
        // Several Cache-Control lines are one list (RFC 9110 §5.3).
        let cache_control = join_values(&answer.headers, http::header::CACHE_CONTROL);
        let lifetime = storable(
            answer.status,
            cache_control.as_ref().map(|v| v.as_bytes()),
            self.ttl,
            self.negative_ttl,
        );
        let fresh_for = match lifetime {
            Storable::For(d) => d,
            Storable::No => Duration::ZERO,
        };
        let stale_for = if answer.status == 200 {
            self.stale_if_error
        } else {
            Duration::ZERO
        };
        let encoded =
            if lifetime != Storable::No && answer.body.len() >= encoding::MIN_COMPRESS_BYTES {
                // Compression is CPU work of up to milliseconds: not on the request threads.
                let body = answer.body.clone();
                tokio::task::spawn_blocking(move || {
                    [Encoding::Br, Encoding::Zstd, Encoding::Gzip].map(|enc| {
                        let out = encoding::compress(enc, &body);
                        (out.len() < body.len()).then_some(out)
                    })
                })
                .await
                .unwrap_or_default()
            } else {
                Default::default()
            };
        let entry = Arc::new(Entry {
            status: answer.status,
            content_type: answer
                .headers
                .get(http::header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(JSON),
            cache_control,
            body: answer.body,
            stored: now,
            fresh_until: now + fresh_for,
            stale_until: now + fresh_for + stale_for,
            served_stale: false,
            encoded,
        });
        if lifetime != Storable::No {
            self.entries.insert(key, entry.clone()).await;
        } else if answer.status < 500 {
            // The upstream no longer lets this be cached: forget the old answer too.
            self.entries.invalidate(&key).await;
        }
        Ok(entry)
    }

    /// Applies pending maintenance so [`DictionaryStore::stats`] is exact.
    pub async fn sync(&self) {
        self.entries.run_pending_tasks().await;
    }

    pub fn stats(&self) -> DictionaryStats {
        DictionaryStats {
            entries: self.entries.entry_count(),
            bytes: self.entries.weighted_size(),
            capacity_bytes: self.capacity_bytes,
        }
    }
}
