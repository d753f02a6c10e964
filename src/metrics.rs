//! Every metric the edge exports, in one place (`cdn_edge_` prefix).
//!
//! Metrics are registered once at start in a private [`Registry`], and the hot path
//! holds counters already bound to their labels: recording is an atomic add, never a
//! label lookup or a `format!`. Labels come only from `&'static str` enums.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::auth::{AuthFailure, Check};
use crate::ops::fill::JobState;
use crate::routes::Route;

/// Statuses that get a pre-bound counter per route; others take the slow path.
const COMMON_STATUSES: [(u16, &str); 18] = [
    (200, "200"),
    (202, "202"),
    (204, "204"),
    (206, "206"),
    (304, "304"),
    (400, "400"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (408, "408"),
    (410, "410"),
    (413, "413"),
    (416, "416"),
    (429, "429"),
    (500, "500"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
];

/// Request latency buckets in seconds: sub-millisecond hits up to slow multi-slice misses.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Cache tiers, the `tier` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
}

impl Tier {
    pub const fn label(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
        }
    }
}

/// How an origin request ended, the `result` label of origin metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginResult {
    Ok,
    ConnectError,
    Timeout,
    BadStatus,
    Invalid,
    NotSatisfiable,
    /// A 404 or 410: the object does not exist.
    NotFound,
}

impl OriginResult {
    pub const ALL: [OriginResult; 7] = [
        OriginResult::Ok,
        OriginResult::ConnectError,
        OriginResult::Timeout,
        OriginResult::BadStatus,
        OriginResult::Invalid,
        OriginResult::NotSatisfiable,
        OriginResult::NotFound,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            OriginResult::Ok => "ok",
            OriginResult::ConnectError => "connect_error",
            OriginResult::Timeout => "timeout",
            OriginResult::BadStatus => "bad_status",
            OriginResult::Invalid => "invalid_response",
            OriginResult::NotSatisfiable => "not_satisfiable",
            OriginResult::NotFound => "not_found",
        }
    }
}

/// What a check of provisional object metadata against a later origin answer found,
/// the `result` label (see `cache::meta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaCheck {
    /// The answer agreed once the metadata was due: kept for good from now on.
    Confirmed,
    /// The answer disagreed (size or validator): metadata replaced, its slice refused.
    Replaced,
    /// A re-check could not confirm (origin failed, or the object is still empty):
    /// kept provisional for another TTL.
    Kept,
}

impl MetaCheck {
    pub const ALL: [MetaCheck; 3] = [MetaCheck::Confirmed, MetaCheck::Replaced, MetaCheck::Kept];

    pub const fn label(self) -> &'static str {
        match self {
            MetaCheck::Confirmed => "confirmed",
            MetaCheck::Replaced => "replaced",
            MetaCheck::Kept => "kept",
        }
    }
}

/// How a dictionary lookup was answered, the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DictionaryResult {
    Hit,
    NegativeHit,
    Miss,
    Refreshed,
    Stale,
    Error,
}

impl DictionaryResult {
    pub const ALL: [DictionaryResult; 6] = [
        DictionaryResult::Hit,
        DictionaryResult::NegativeHit,
        DictionaryResult::Miss,
        DictionaryResult::Refreshed,
        DictionaryResult::Stale,
        DictionaryResult::Error,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            DictionaryResult::Hit => "hit",
            DictionaryResult::NegativeHit => "negative_hit",
            DictionaryResult::Miss => "miss",
            DictionaryResult::Refreshed => "refreshed",
            DictionaryResult::Stale => "stale",
            DictionaryResult::Error => "error",
        }
    }
}

/// What happened to a forwarded request, the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardResult {
    /// An event relayed at once; the client got the upstream's answer.
    Relayed,
    /// Durably spooled; the client got 202.
    Spooled,
    /// Stats accepted into the in-memory queue.
    Queued,
    /// Delivered in the background.
    Delivered,
    /// A background delivery attempt failed and will be retried.
    Retried,
    /// A request id already delivered (or waiting): not forwarded again.
    Deduplicated,
    /// Stats dropped because the queue was full.
    Dropped,
    /// A permanent failure (moved to dead letters) or failed best-effort stats.
    Failed,
    /// Refused: spool full or unavailable (503), or body too large (413).
    Refused,
    /// Refused with 400: the path could leave the route's prefix (dot segments,
    /// encoded dots, slashes or backslashes).
    BadPath,
}

impl ForwardResult {
    pub const ALL: [ForwardResult; 10] = [
        ForwardResult::Relayed,
        ForwardResult::Spooled,
        ForwardResult::Queued,
        ForwardResult::Delivered,
        ForwardResult::Retried,
        ForwardResult::Deduplicated,
        ForwardResult::Dropped,
        ForwardResult::Failed,
        ForwardResult::Refused,
        ForwardResult::BadPath,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            ForwardResult::Relayed => "relayed",
            ForwardResult::Spooled => "spooled",
            ForwardResult::Queued => "queued",
            ForwardResult::Delivered => "delivered",
            ForwardResult::Retried => "retried",
            ForwardResult::Deduplicated => "deduplicated",
            ForwardResult::Dropped => "dropped",
            ForwardResult::Failed => "failed",
            ForwardResult::Refused => "refused",
            ForwardResult::BadPath => "bad_path",
        }
    }
}

/// Why a client was turned away, the `reason` label of `cdn_edge_client_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A connection over `limits.max_connections`.
    MaxConnections,
    /// A connection over `limits.max_connections_per_ip`.
    MaxConnectionsPerIp,
    /// A video response (503) over `limits.max_pinned_bytes`.
    PinnedBytes,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::MaxConnections,
        Refusal::MaxConnectionsPerIp,
        Refusal::PinnedBytes,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
            Refusal::PinnedBytes => "pinned_bytes",
        }
    }
}

/// How a client's TLS handshake failed, the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// Not done within `limits.tls_handshake_timeout_ms`.
    Timeout,
    /// The client closed or reset the connection.
    Closed,
    /// Anything TLS refused: no common version or cipher, a bad message, an alert.
    Protocol,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 3] = [
        TlsFailure::Timeout,
        TlsFailure::Closed,
        TlsFailure::Protocol,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            TlsFailure::Timeout => "timeout",
            TlsFailure::Closed => "closed",
            TlsFailure::Protocol => "protocol",
        }
    }
}

/// How a control-plane report ended, the `result` label (SPEC 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlReport {
    /// Answered 2xx.
    Ok,
    /// Answered with another status, or an unusable answer.
    Error,
    /// No complete answer within `control.timeout_ms`.
    Timeout,
    /// Not resolved, connection refused or lost.
    Unreachable,
}

impl ControlReport {
    pub const ALL: [ControlReport; 4] = [
        ControlReport::Ok,
        ControlReport::Error,
        ControlReport::Timeout,
        ControlReport::Unreachable,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            ControlReport::Ok => "ok",
            ControlReport::Error => "error",
            ControlReport::Timeout => "timeout",
            ControlReport::Unreachable => "unreachable",
        }
    }
}

const FORWARD_ROUTES: [Route; 3] = [Route::Event, Route::LogBlob, Route::Stats];
/// The spooled routes.
const SPOOLED_ROUTES: [Route; 2] = [Route::Event, Route::LogBlob];

/// Why a spooled record was moved to the dead letters, the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The upstream answered 4xx (other than 408 and 429).
    Rejected,
    /// The upstream failed on it `forward.max_attempts` times.
    MaxAttempts,
    /// Not delivered within `forward.max_retry_secs` of its first failed attempt.
    MaxAge,
    /// The spooled bytes could not be read back as a record.
    Malformed,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 4] = [
        DeadLetterReason::Rejected,
        DeadLetterReason::MaxAttempts,
        DeadLetterReason::MaxAge,
        DeadLetterReason::Malformed,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::MaxAttempts => "max_attempts",
            DeadLetterReason::MaxAge => "max_age",
            DeadLetterReason::Malformed => "malformed",
        }
    }
}

/// Results of dictionary upstream requests, the `result` label.
const DICTIONARY_UPSTREAM_RESULTS: [&str; 4] = ["ok", "server_error", "timeout", "error"];

/// Counters of one route. Status counters are bound on first use, so only statuses
/// that happened show up in the exposition.
pub struct RouteMetrics {
    label: &'static str,
    statuses: [OnceLock<IntCounter>; COMMON_STATUSES.len()],
    pub duration: Histogram,
    pub body_bytes: IntCounter,
}

/// Tier hit/miss counters, bound at start.
pub struct TierMetrics {
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub bytes: IntGauge,
    pub entries: IntGauge,
}

/// What the spool keeps of one kind after delivery (answers or dead letters), bound at
/// start.
pub struct KeptMetrics {
    pub entries: IntGauge,
    pub bytes: IntGauge,
    /// Dropped before their time to stay within the spool's budget.
    pub evicted: IntCounter,
}

/// How a purge asked on the admin listener ended, the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeResult {
    /// Applied here and by every peer of the site.
    Ok,
    /// Applied here; some peer did not confirm it (it applies it once back).
    Partial,
    /// Applied here but not written to the purge log: it would not survive a restart.
    Error,
}

impl PurgeResult {
    pub const ALL: [PurgeResult; 3] = [PurgeResult::Ok, PurgeResult::Partial, PurgeResult::Error];

    pub const fn label(self) -> &'static str {
        match self {
            PurgeResult::Ok => "ok",
            PurgeResult::Partial => "partial",
            PurgeResult::Error => "error",
        }
    }
}

/// How this node learnt a purge it applied, the `from` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeFrom {
    /// `POST /purge` on its admin listener.
    Admin,
    /// Passed on by the peer that received it.
    Peer,
    /// Read in a peer's purge log (it had missed the purge).
    Log,
}

impl PurgeFrom {
    pub const ALL: [PurgeFrom; 3] = [PurgeFrom::Admin, PurgeFrom::Peer, PurgeFrom::Log];

    pub const fn label(self) -> &'static str {
        match self {
            PurgeFrom::Admin => "admin",
            PurgeFrom::Peer => "peer",
            PurgeFrom::Log => "log",
        }
    }
}

/// Purge counters, bound at start.
pub struct PurgeMetrics {
    requests: [IntCounter; PurgeResult::ALL.len()],
    applied: [IntCounter; PurgeFrom::ALL.len()],
    /// Slices removed by purges (once each, whatever tiers held them).
    pub slices: IntCounter,
    /// Their payload bytes.
    pub bytes: IntCounter,
    /// Fills whose object was purged while they were in flight: served, not cached.
    pub fills_discarded: IntCounter,
    log_pulls: [IntCounter; 2],
    /// Purges in this node's log.
    pub log_entries: IntGauge,
}

impl PurgeMetrics {
    fn new(r: &Registry) -> Self {
        let requests = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_purges_total",
                    "Purges asked on the admin listener, by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let applied = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_purges_applied_total",
                    "Purges applied on this node, by how it learnt them",
                ),
                &["from"],
            )
            .expect("valid metric"),
        );
        let log_pulls = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_purge_log_pulls_total",
                    "Reads of a peer's purge log, by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let counter = |name: &str, help: &str| {
            registered(r, IntCounter::new(name, help).expect("valid metric"))
        };
        Self {
            requests: PurgeResult::ALL.map(|x| requests.with_label_values(&[x.label()])),
            applied: PurgeFrom::ALL.map(|x| applied.with_label_values(&[x.label()])),
            slices: counter(
                "cdn_edge_purged_slices_total",
                "Slices removed from this node by purges",
            ),
            bytes: counter(
                "cdn_edge_purged_bytes_total",
                "Payload bytes of the slices removed from this node by purges",
            ),
            fills_discarded: counter(
                "cdn_edge_purge_discarded_fills_total",
                "Fills of an object purged while they were in flight: served, not cached",
            ),
            log_pulls: ["ok", "error"].map(|x| log_pulls.with_label_values(&[x])),
            log_entries: registered(
                r,
                IntGauge::new(
                    "cdn_edge_purge_log_entries",
                    "Purges in this node's purge log",
                )
                .expect("valid metric"),
            ),
        }
    }

    pub fn record(&self, result: PurgeResult) {
        self.requests[result as usize].inc();
    }

    pub fn record_applied(&self, from: PurgeFrom) {
        self.applied[from as usize].inc();
    }

    pub fn record_pull(&self, ok: bool) {
        self.log_pulls[usize::from(!ok)].inc();
    }
}

/// The edge's metrics. One instance per process, shared by every service.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    routes: Vec<RouteMetrics>,
    pub memory: TierMetrics,
    pub disk: TierMetrics,
    pub metadata_entries: IntGauge,
    pub disk_writes: IntCounter,
    pub disk_writes_dropped: IntCounter,
    pub disk_writes_declined: IntCounter,
    /// Bytes of slice files read to serve slices from the disk tier.
    pub disk_read_bytes: IntCounter,
    /// Slice file reads made on a request's own thread (all in the kernel's caches).
    pub disk_reads_request: IntCounter,
    /// Slice file reads made on the blocking pool.
    pub disk_reads_pool: IntCounter,
    pub disk_write_errors_no_space: IntCounter,
    pub disk_write_errors_io: IntCounter,
    pub disk_read_errors_io: IntCounter,
    pub disk_read_errors_timeout: IntCounter,
    pub disk_evictions: IntCounter,
    pub cache_corrupt: IntCounter,
    pub disk_index_ready: IntGauge,
    pub disk_index_rebuild_seconds: prometheus::Gauge,
    pub coalesced_waits: IntCounter,
    /// Requests for an object not known yet that waited for another request's first
    /// origin answer about it.
    pub cold_object_waits: IntCounter,
    /// Slice fetches answered from a remembered origin 404/410 instead of the origin.
    pub negative_hits: IntCounter,
    meta_checks: Vec<IntCounter>,
    pub stale_slices: IntCounter,
    origin_requests: Vec<IntCounter>,
    pub origin_bytes: IntCounter,
    pub origin_duration: Histogram,
    pub origin_failovers: IntCounter,
    auth_failures: Vec<IntCounter>,
    /// `[cached, verified]`.
    signed_url_checks: [IntCounter; 2],
    pub stream_aborts: IntCounter,
    pub client_sendfile_bytes: IntCounter,
    dictionary_lookups: Vec<IntCounter>,
    dictionary_upstream: Vec<IntCounter>,
    pub dictionary_upstream_duration: Histogram,
    pub dictionary_entries: IntGauge,
    pub dictionary_bytes: IntGauge,
    pub dictionary_pending: IntGauge,
    pub spool_corrupt: IntCounter,
    pub spool_commits: IntCounter,
    /// Seconds the last spool open took (repair after a crash included).
    pub spool_open_seconds: Gauge,
    forwarded: Vec<IntCounter>,
    forward_delivery: Vec<Histogram>,
    pub stats_dropped: IntCounter,
    pub spool_entries: IntGaugeVec,
    pub spool_bytes: IntGaugeVec,
    /// Delivered answers kept for deduplication.
    pub spool_answers: KeptMetrics,
    /// Records delivery gave up on.
    pub spool_dead_letters: KeptMetrics,
    forward_dead_letters: Vec<IntCounter>,
    forward_oldest_age: Vec<prometheus::Gauge>,
    pub connections_open: IntGauge,
    pub connections_refused: IntCounter,
    pub connection_timeouts_request: IntCounter,
    pub connection_timeouts_idle: IntCounter,
    refusals: [IntCounter; Refusal::ALL.len()],
    pub slow_sends: IntCounter,
    pub pinned_bytes: IntGauge,
    tls_handshake_failures: [IntCounter; TlsFailure::ALL.len()],
    control_reports: [IntCounter; ControlReport::ALL.len()],
    /// 1 while the node is draining (`POST /drain`), refreshed on every scrape.
    pub draining: IntGauge,
    pub fill: FillMetrics,
    pub purge: PurgeMetrics,
}

fn registered<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

impl Metrics {
    /// Registers a collector defined elsewhere (such as the cluster's) in this registry.
    pub fn register<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        registered(&self.registry, c)
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;

        let requests = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_requests_total",
                    "Requests answered, by route and status.",
                ),
                &["route", "status"],
            )
            .expect("valid metric"),
        );
        let duration = registered(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "cdn_edge_request_duration_seconds",
                    "Time from request to last byte written, by route.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )
            .expect("valid metric"),
        );
        let body_bytes = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_response_body_bytes_total",
                    "Response body bytes written to clients, by route.",
                ),
                &["route"],
            )
            .expect("valid metric"),
        );
        let routes = Route::ALL
            .iter()
            .map(|route| RouteMetrics {
                label: route.label(),
                statuses: std::array::from_fn(|_| OnceLock::new()),
                duration: duration.with_label_values(&[route.label()]),
                body_bytes: body_bytes.with_label_values(&[route.label()]),
            })
            .collect();

        let lookups = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_cache_lookups_total",
                    "Slice cache lookups, by tier and result (hit or miss).",
                ),
                &["tier", "result"],
            )
            .expect("valid metric"),
        );
        let cache_bytes = registered(
            r,
            IntGaugeVec::new(
                Opts::new("cdn_edge_cache_bytes", "Bytes held by each cache tier."),
                &["tier"],
            )
            .expect("valid metric"),
        );
        let cache_entries = registered(
            r,
            IntGaugeVec::new(
                Opts::new("cdn_edge_cache_entries", "Slices held by each cache tier."),
                &["tier"],
            )
            .expect("valid metric"),
        );
        let tier = |t: Tier| TierMetrics {
            hits: lookups.with_label_values(&[t.label(), "hit"]),
            misses: lookups.with_label_values(&[t.label(), "miss"]),
            bytes: cache_bytes.with_label_values(&[t.label()]),
            entries: cache_entries.with_label_values(&[t.label()]),
        };
        let memory = tier(Tier::Memory);
        let disk = tier(Tier::Disk);
        let counter = |name: &str, help: &str| {
            registered(r, IntCounter::new(name, help).expect("valid metric"))
        };
        let disk_writes = counter(
            "cdn_edge_disk_writes_total",
            "Slices written to the disk tier.",
        );
        let disk_writes_dropped = counter(
            "cdn_edge_disk_writes_dropped_total",
            "Slices not written to disk because the write queue was full or writes were paused after an error.",
        );
        let disk_writes_declined = counter(
            "cdn_edge_disk_writes_declined_total",
            "Slices not written to disk because the disk tier's video policy would not keep them (they score below every file it would have to displace).",
        );
        let disk_read_bytes = counter(
            "cdn_edge_disk_read_bytes_total",
            "Bytes of slice files read from the disk tier: whole files for slices read whole, the header and the blocks a range lies in otherwise.",
        );
        let reads = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_disk_reads_total",
                    "Slice file reads, by the thread that made them: request (a range of up to 1 MiB whose file, header and blocks were all in the kernel's caches, read without reading from the device) or pool (the blocking pool, for everything else).",
                ),
                &["thread"],
            )
            .expect("valid metric"),
        );
        let disk_reads_request = reads.with_label_values(&["request"]);
        let disk_reads_pool = reads.with_label_values(&["pool"]);
        let write_errors = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_disk_write_errors_total",
                    "Failed slice writes, by reason (no_space, io); each pauses writes for a while.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let disk_write_errors_no_space = write_errors.with_label_values(&["no_space"]);
        let disk_write_errors_io = write_errors.with_label_values(&["io"]);
        let read_errors = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_disk_read_errors_total",
                    "Failed slice file reads, by reason (io, timeout); each was a miss.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let disk_read_errors_io = read_errors.with_label_values(&["io"]);
        let disk_read_errors_timeout = read_errors.with_label_values(&["timeout"]);
        let disk_evictions = counter(
            "cdn_edge_disk_evictions_total",
            "Slice files deleted to keep the disk tier within cache.disk.max_bytes.",
        );
        let cache_corrupt = counter(
            "cdn_edge_cache_corrupt_total",
            "Slice files that failed their checks (checksum, length, key); deleted and refetched, never served.",
        );
        let disk_index_ready = registered(
            r,
            IntGauge::new(
                "cdn_edge_disk_index_ready",
                "1 once the disk index has been rebuilt from the cache directory after start.",
            )
            .expect("valid metric"),
        );
        let disk_index_rebuild_seconds = registered(
            r,
            prometheus::Gauge::new(
                "cdn_edge_disk_index_rebuild_seconds",
                "How long the last disk index rebuild took.",
            )
            .expect("valid metric"),
        );
        let metadata_entries = registered(
            r,
            IntGauge::new(
                "cdn_edge_cache_metadata_entries",
                "Objects whose size and type are cached.",
            )
            .expect("valid metric"),
        );
        let coalesced_waits = registered(
            r,
            IntCounter::new(
                "cdn_edge_cache_coalesced_waits_total",
                "Slice misses that waited for another request's origin fetch instead of making their own.",
            )
            .expect("valid metric"),
        );
        let cold_object_waits = counter(
            "cdn_edge_cache_cold_object_waits_total",
            "Requests for an object not known yet that waited for another request's first origin answer about it instead of asking the origin themselves.",
        );
        let negative_hits = counter(
            "cdn_edge_cache_negative_hits_total",
            "Slice fetches answered 404 from an origin 404 or 410 remembered for origin.negative_ttl_secs, instead of an origin request.",
        );

        let meta_checks_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_cache_metadata_checks_total",
                    "Provisional object metadata checked against a later origin answer, by result: confirmed (kept for good), replaced (the origin answered another size or validator), kept (not confirmed yet).",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let meta_checks = MetaCheck::ALL
            .iter()
            .map(|c| meta_checks_vec.with_label_values(&[c.label()]))
            .collect();
        let stale_slices = counter(
            "cdn_edge_cache_stale_slices_total",
            "Cached slices dropped because they were cut under object metadata that an origin answer has since replaced.",
        );

        let origin_requests_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_origin_requests_total",
                    "Origin slice requests, by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let origin_requests = OriginResult::ALL
            .iter()
            .map(|res| origin_requests_vec.with_label_values(&[res.label()]))
            .collect();
        let origin_bytes = registered(
            r,
            IntCounter::new(
                "cdn_edge_origin_bytes_total",
                "Body bytes received from origins in valid slice responses.",
            )
            .expect("valid metric"),
        );
        let origin_duration = registered(
            r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "cdn_edge_origin_request_duration_seconds",
                    "Time to fetch one slice from an origin, successful or not.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
        );
        let origin_failovers = registered(
            r,
            IntCounter::new(
                "cdn_edge_origin_failovers_total",
                "Slice fetches retried on the next origin after a failure.",
            )
            .expect("valid metric"),
        );

        let auth_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_auth_failures_total",
                    "Signed-URL rejections, by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let auth_failures = AuthFailure::REASONS
            .iter()
            .map(|reason| auth_vec.with_label_values(&[reason]))
            .collect();
        let checks_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_signed_url_checks_total",
                    "Signed URLs accepted, by whether the signature was verified or found in the cache of verified URLs.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let signed_url_checks =
            ["cached", "verified"].map(|result| checks_vec.with_label_values(&[result]));
        let stream_aborts = registered(
            r,
            IntCounter::new(
                "cdn_edge_stream_aborts_total",
                "Responses cut short after their header was sent (origin failure mid-range or client gone).",
            )
            .expect("valid metric"),
        );
        let client_sendfile_bytes = registered(
            r,
            IntCounter::new(
                "cdn_edge_client_sendfile_bytes_total",
                "Response bytes sent to clients from the memory tier's pages by sendfile, without a copy.",
            )
            .expect("valid metric"),
        );
        let dict_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_dictionary_lookups_total",
                    "Dictionary lookups, by how they were answered.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let dictionary_lookups = DictionaryResult::ALL
            .iter()
            .map(|res| dict_vec.with_label_values(&[res.label()]))
            .collect();
        let dict_up_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_dictionary_upstream_requests_total",
                    "Dictionary upstream requests, by result (server_error is a 5xx answer).",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let dictionary_upstream = DICTIONARY_UPSTREAM_RESULTS
            .iter()
            .map(|res| dict_up_vec.with_label_values(&[res]))
            .collect();
        let dictionary_upstream_duration = registered(
            r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "cdn_edge_dictionary_upstream_duration_seconds",
                    "Time of one dictionary upstream request, successful or not.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
        );
        let dictionary_entries = registered(
            r,
            IntGauge::new(
                "cdn_edge_dictionary_entries",
                "Dictionary answers held in cache.",
            )
            .expect("valid metric"),
        );
        let dictionary_bytes = registered(
            r,
            IntGauge::new(
                "cdn_edge_dictionary_bytes",
                "Bytes weighed by the dictionary cache (keys, bodies, room for encodings).",
            )
            .expect("valid metric"),
        );
        let dictionary_pending = registered(
            r,
            IntGauge::new(
                "cdn_edge_dictionary_pending",
                "Dictionary lookups waiting on an upstream request (theirs or a coalesced one).",
            )
            .expect("valid metric"),
        );
        let spool_corrupt = registered(
            r,
            IntCounter::new(
                "cdn_edge_spool_corrupt_total",
                "Spool files that could not be opened and were moved aside.",
            )
            .expect("valid metric"),
        );
        let spool_open_seconds = registered(
            r,
            Gauge::new(
                "cdn_edge_spool_open_seconds",
                "Seconds the spool took to open at start (a repair after a crash included); forwarded routes answer 503 meanwhile.",
            )
            .expect("valid metric"),
        );
        let spool_commits = registered(
            r,
            IntCounter::new(
                "cdn_edge_spool_commits_total",
                "Spool transactions committed (each one fsync, shared by a group of requests).",
            )
            .expect("valid metric"),
        );
        let forwarded_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_forwarded_total",
                    "Forwarded requests (events, log blobs, stats), by route and result.",
                ),
                &["route", "result"],
            )
            .expect("valid metric"),
        );
        let forwarded = FORWARD_ROUTES
            .iter()
            .flat_map(|route| {
                ForwardResult::ALL
                    .iter()
                    .map(|res| forwarded_vec.with_label_values(&[route.label(), res.label()]))
                    .collect::<Vec<_>>()
            })
            .collect();
        let delivery_vec = registered(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "cdn_edge_forward_delivery_seconds",
                    "Time from arrival at the edge to background delivery, by route.",
                )
                .buckets(vec![
                    0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0,
                ]),
                &["route"],
            )
            .expect("valid metric"),
        );
        let forward_delivery = FORWARD_ROUTES
            .iter()
            .map(|route| delivery_vec.with_label_values(&[route.label()]))
            .collect();
        let stats_dropped = registered(
            r,
            IntCounter::new(
                "cdn_edge_stats_dropped_total",
                "Stats dropped because the in-memory queue was full.",
            )
            .expect("valid metric"),
        );
        let spool_entries = registered(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "cdn_edge_spool_entries",
                    "Records waiting in the spool, by route.",
                ),
                &["route"],
            )
            .expect("valid metric"),
        );
        let spool_bytes = registered(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "cdn_edge_spool_bytes",
                    "Bytes of records waiting in the spool, by route.",
                ),
                &["route"],
            )
            .expect("valid metric"),
        );
        let kept_entries = registered(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "cdn_edge_spool_kept_entries",
                    "Entries the spool keeps after delivery, by kind: answers (for deduplication) or dead_letters.",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let kept_bytes = registered(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "cdn_edge_spool_kept_bytes",
                    "Bytes the spool keeps after delivery, by kind; they count toward forward.spool_max_bytes.",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let kept_evicted = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_spool_kept_evicted_total",
                    "Kept answers and dead letters dropped, oldest first, to stay within the spool's budget.",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let kept = |kind: &str| KeptMetrics {
            entries: kept_entries.with_label_values(&[kind]),
            bytes: kept_bytes.with_label_values(&[kind]),
            evicted: kept_evicted.with_label_values(&[kind]),
        };
        let spool_answers = kept("answers");
        let spool_dead_letters = kept("dead_letters");
        let dead_letters_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_forward_dead_letters_total",
                    "Spooled records moved to the dead letters, by route and reason.",
                ),
                &["route", "reason"],
            )
            .expect("valid metric"),
        );
        let forward_dead_letters = SPOOLED_ROUTES
            .iter()
            .flat_map(|route| {
                DeadLetterReason::ALL
                    .iter()
                    .map(|reason| {
                        dead_letters_vec.with_label_values(&[route.label(), reason.label()])
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let oldest_age_vec = registered(
            r,
            prometheus::GaugeVec::new(
                Opts::new(
                    "cdn_edge_forward_oldest_age_seconds",
                    "Age of the oldest record waiting in the spool, by route; 0 when none waits.",
                ),
                &["route"],
            )
            .expect("valid metric"),
        );
        let forward_oldest_age = SPOOLED_ROUTES
            .iter()
            .map(|route| oldest_age_vec.with_label_values(&[route.label()]))
            .collect();
        let connections_open = registered(
            r,
            IntGauge::new(
                "cdn_edge_client_connections",
                "Client connections open on the public listeners.",
            )
            .expect("valid metric"),
        );
        let connections_refused = registered(
            r,
            IntCounter::new(
                "cdn_edge_client_connections_refused_total",
                "Client connections closed at once because limits.max_connections were open.",
            )
            .expect("valid metric"),
        );
        let timeouts = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_client_timeouts_total",
                    "Client connections closed by a deadline: request (not sent in time) or idle.",
                ),
                &["phase"],
            )
            .expect("valid metric"),
        );
        let connection_timeouts_request = timeouts.with_label_values(&["request"]);
        let connection_timeouts_idle = timeouts.with_label_values(&["idle"]);
        let refusals_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_client_refusals_total",
                    "Clients turned away by a limit, by reason: max_connections and max_connections_per_ip (connection closed at once), pinned_bytes (video response answered 503).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let refusals = Refusal::ALL.map(|why| refusals_vec.with_label_values(&[why.label()]));
        let slow_sends = counter(
            "cdn_edge_client_slow_sends_total",
            "Client connections closed because the client took response bytes slower than limits.min_send_rate_bytes_per_sec.",
        );
        let pinned_bytes = registered(
            r,
            IntGauge::new(
                "cdn_edge_response_pinned_bytes",
                "Bytes of slices held by video responses in flight (a slice held by several responses counts once).",
            )
            .expect("valid metric"),
        );
        let tls_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_tls_handshake_failures_total",
                    "Client TLS handshakes that failed, by reason: timeout, closed (by the client), protocol.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let tls_handshake_failures =
            TlsFailure::ALL.map(|why| tls_vec.with_label_values(&[why.label()]));
        let control_vec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_control_reports_total",
                    "Control-plane reports sent, by result: ok (2xx), error (another status), timeout, unreachable.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let control_reports =
            ControlReport::ALL.map(|result| control_vec.with_label_values(&[result.label()]));
        let draining = registered(
            r,
            IntGauge::new(
                "cdn_edge_draining",
                "1 while the node is draining (POST /drain): /healthz answers 503, requests are still served.",
            )
            .expect("valid metric"),
        );
        let build_info = registered(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "cdn_edge_build_info",
                    "Always 1; labelled with the version.",
                ),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let fill = FillMetrics::new(r);

        let purge = PurgeMetrics::new(r);
        Self {
            fill,
            registry,
            requests,
            routes,
            memory,
            disk,
            metadata_entries,
            disk_writes,
            disk_writes_dropped,
            disk_writes_declined,
            disk_read_bytes,
            disk_reads_request,
            disk_reads_pool,
            disk_write_errors_no_space,
            disk_write_errors_io,
            disk_read_errors_io,
            disk_read_errors_timeout,
            disk_evictions,
            cache_corrupt,
            disk_index_ready,
            disk_index_rebuild_seconds,
            coalesced_waits,
            cold_object_waits,
            negative_hits,
            meta_checks,
            stale_slices,
            origin_requests,
            origin_bytes,
            origin_duration,
            origin_failovers,
            auth_failures,
            signed_url_checks,
            stream_aborts,
            client_sendfile_bytes,
            dictionary_lookups,
            dictionary_upstream,
            dictionary_upstream_duration,
            dictionary_entries,
            dictionary_bytes,
            dictionary_pending,
            spool_corrupt,
            spool_commits,
            spool_open_seconds,
            forwarded,
            forward_delivery,
            stats_dropped,
            spool_entries,
            spool_bytes,
            spool_answers,
            spool_dead_letters,
            forward_dead_letters,
            forward_oldest_age,
            connections_open,
            connections_refused,
            connection_timeouts_request,
            connection_timeouts_idle,
            refusals,
            slow_sends,
            pinned_bytes,
            tls_handshake_failures,
            control_reports,
            draining,
            purge,
        }
    }

    /// Counts a client turned away by a limit.
    pub fn record_refusal(&self, why: Refusal) {
        self.refusals[why as usize].inc();
    }

    /// Counts a failed client TLS handshake.
    pub fn record_tls_failure(&self, why: TlsFailure) {
        self.tls_handshake_failures[why as usize].inc();
    }

    /// Counts a control-plane report.
    pub fn record_control_report(&self, result: ControlReport) {
        self.control_reports[result as usize].inc();
    }

    /// Requests answered and response body bytes written on the public listeners since
    /// start, over every route (the control-plane report's load). Off the hot path: it
    /// reads each route's counters once.
    pub fn served_totals(&self) -> (u64, u64) {
        self.routes.iter().fold((0, 0), |(requests, bytes), rm| {
            (
                requests + rm.duration.get_sample_count(),
                bytes + rm.body_bytes.get(),
            )
        })
    }

    /// The bound counters of one route.
    pub fn route(&self, route: Route) -> &RouteMetrics {
        &self.routes[route.index()]
    }

    /// Counts one answered request.
    pub fn record_request(&self, route: Route, status: u16) {
        let rm = self.route(route);
        match COMMON_STATUSES.iter().position(|(code, _)| *code == status) {
            Some(i) => rm.statuses[i]
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&[rm.label, COMMON_STATUSES[i].1])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[route.label(), &status.to_string()])
                .inc(),
        }
    }

    pub fn record_auth_failure(&self, f: AuthFailure) {
        let i = AuthFailure::REASONS
            .iter()
            .position(|r| *r == f.reason())
            .expect("every reason is registered");
        self.auth_failures[i].inc();
    }

    pub fn record_signed_url(&self, how: Check) {
        self.signed_url_checks[match how {
            Check::Cached => 0,
            Check::Verified => 1,
        }]
        .inc();
    }

    pub fn record_origin(&self, result: OriginResult) {
        let i = OriginResult::ALL
            .iter()
            .position(|r| *r == result)
            .expect("every result is registered");
        self.origin_requests[i].inc();
    }

    pub fn record_meta_check(&self, result: MetaCheck) {
        let i = MetaCheck::ALL
            .iter()
            .position(|r| *r == result)
            .expect("every result is registered");
        self.meta_checks[i].inc();
    }

    pub fn record_dictionary(&self, result: DictionaryResult) {
        let i = DictionaryResult::ALL
            .iter()
            .position(|r| *r == result)
            .expect("every result is registered");
        self.dictionary_lookups[i].inc();
    }

    /// `result` is one of "ok", "server_error", "timeout", "error".
    pub fn record_dictionary_upstream(&self, result: &'static str) {
        if let Some(i) = DICTIONARY_UPSTREAM_RESULTS
            .iter()
            .position(|r| *r == result)
        {
            self.dictionary_upstream[i].inc();
        }
    }

    pub fn record_forward(&self, route: Route, result: ForwardResult) {
        let r = FORWARD_ROUTES.iter().position(|x| *x == route).unwrap_or(0);
        let i = ForwardResult::ALL
            .iter()
            .position(|x| *x == result)
            .expect("every result is registered");
        self.forwarded[r * ForwardResult::ALL.len() + i].inc();
    }

    pub fn forward_delivery(&self, route: Route) -> &Histogram {
        let r = FORWARD_ROUTES.iter().position(|x| *x == route).unwrap_or(0);
        &self.forward_delivery[r]
    }

    pub fn record_dead_letter(&self, route: Route, reason: DeadLetterReason) {
        let r = SPOOLED_ROUTES.iter().position(|x| *x == route).unwrap_or(0);
        let i = DeadLetterReason::ALL
            .iter()
            .position(|x| *x == reason)
            .expect("every reason is registered");
        self.forward_dead_letters[r * DeadLetterReason::ALL.len() + i].inc();
    }

    /// Age of the oldest record waiting in a spooled route's queue.
    pub fn forward_oldest_age(&self, route: Route) -> &prometheus::Gauge {
        let r = SPOOLED_ROUTES.iter().position(|x| *x == route).unwrap_or(0);
        &self.forward_oldest_age[r]
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

/// What became of one slice of a fill job, the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillSlice {
    /// Fetched from the parent tier or the origin.
    Fetched,
    /// Already held by a tier (or fetched meanwhile by a client's request).
    Held,
    /// Given up on after `fill.attempts` tries, or a definite answer (no such object).
    Failed,
}

impl FillSlice {
    pub const ALL: [FillSlice; 3] = [FillSlice::Fetched, FillSlice::Held, FillSlice::Failed];

    pub const fn label(self) -> &'static str {
        match self {
            FillSlice::Fetched => "fetched",
            FillSlice::Held => "held",
            FillSlice::Failed => "failed",
        }
    }
}

/// Fill jobs (SPEC 7), registered whether or not `[fill]` is configured.
pub struct FillMetrics {
    /// Slice bytes fill jobs fetched.
    pub bytes: IntCounter,
    slices: [IntCounter; FillSlice::ALL.len()],
    jobs: [IntGauge; JobState::ALL.len()],
    /// Slices that unfinished jobs still have to go through.
    pub slices_remaining: IntGauge,
}

impl FillMetrics {
    fn new(r: &Registry) -> Self {
        let bytes = registered(
            r,
            IntCounter::new(
                "cdn_edge_fill_bytes_total",
                "Slice bytes fetched by fill jobs (from the parent tier or the origin).",
            )
            .expect("valid metric"),
        );
        let slices = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "cdn_edge_fill_slices_total",
                    "Slices fill jobs went through, by result: fetched, held (already cached), failed.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let jobs = registered(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "cdn_edge_fill_jobs",
                    "Fill jobs kept in fill.state_dir, by state: queued, waiting_window, running, done, failed.",
                ),
                &["state"],
            )
            .expect("valid metric"),
        );
        let slices_remaining = registered(
            r,
            IntGauge::new(
                "cdn_edge_fill_slices_remaining",
                "Slices that unfinished fill jobs still have to go through (as far as their objects' sizes are known).",
            )
            .expect("valid metric"),
        );
        Self {
            bytes,
            slices: FillSlice::ALL.map(|s| slices.with_label_values(&[s.label()])),
            jobs: JobState::ALL.map(|s| jobs.with_label_values(&[s.label()])),
            slices_remaining,
        }
    }

    pub fn record(&self, result: FillSlice) {
        self.slices[result as usize].inc();
    }

    pub fn jobs(&self, state: JobState) -> &IntGauge {
        &self.jobs[state as usize]
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_prefixed_names_and_bound_labels() {
        let m = Metrics::new();
        m.record_request(Route::Range, 200);
        m.record_request(Route::Range, 299);
        m.record_auth_failure(AuthFailure::Expired);
        m.record_origin(OriginResult::Timeout);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(r#"cdn_edge_requests_total{route="range",status="200"} 1"#));
        assert!(text.contains(r#"cdn_edge_requests_total{route="range",status="299"} 1"#));
        assert!(text.contains(r#"cdn_edge_auth_failures_total{reason="expired"} 1"#));
        assert!(text.contains(r#"cdn_edge_origin_requests_total{result="timeout"} 1"#));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("cdn_edge_"), "{line}");
        }
    }

    #[test]
    fn control_reports_are_bound_in_label_order() {
        let m = Metrics::new();
        for (i, result) in ControlReport::ALL.into_iter().enumerate() {
            assert_eq!(result as usize, i);
            for _ in 0..=i {
                m.record_control_report(result);
            }
        }
        let text = String::from_utf8(m.encode()).unwrap();
        for (i, result) in ControlReport::ALL.into_iter().enumerate() {
            let line = format!(
                "cdn_edge_control_reports_total{{result=\"{}\"}} {}",
                result.label(),
                i + 1
            );
            assert!(text.contains(&line), "{line}");
        }
        assert!(text.contains("cdn_edge_draining 0"));
    }

    #[test]
    fn served_totals_add_up_every_route() {
        let m = Metrics::new();
        for (route, bytes) in [(Route::Range, 100), (Route::Object, 20), (Route::Stats, 3)] {
            let rm = m.route(route);
            rm.duration.observe(0.001);
            rm.body_bytes.inc_by(bytes);
        }
        m.route(Route::Range).duration.observe(0.001);
        assert_eq!(m.served_totals(), (4, 123));
    }

    #[test]
    fn refusal_and_tls_failure_counters_are_bound_in_label_order() {
        let m = Metrics::new();
        for (i, why) in Refusal::ALL.into_iter().enumerate() {
            assert_eq!(why as usize, i);
            m.record_refusal(why);
        }
        for (i, why) in TlsFailure::ALL.into_iter().enumerate() {
            assert_eq!(why as usize, i);
            m.record_tls_failure(why);
            m.record_tls_failure(why);
        }
        let text = String::from_utf8(m.encode()).unwrap();
        for why in Refusal::ALL {
            let line = format!(
                "cdn_edge_client_refusals_total{{reason=\"{}\"}} 1",
                why.label()
            );
            assert!(text.contains(&line), "{line}");
        }
        for why in TlsFailure::ALL {
            let line = format!(
                "cdn_edge_tls_handshake_failures_total{{reason=\"{}\"}} 2",
                why.label()
            );
            assert!(text.contains(&line), "{line}");
        }
    }
}
