//! Typed configuration: TOML file → serde mirror (`file`) → validation → [`Config`].
//!
//! The rest of the crate only ever sees [`Config`]: every value has been checked, every
//! default applied and every secret resolved. Errors name the key they are about
//! (`cache.disk.max_bytes: …`) so an operator knows what to fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod cluster;
mod ops;
mod proxies;
mod signing;

pub use cluster::{Cluster, KeepNonOwned, OriginMode};
pub use ops::{Admin, Control, Fill, Window};
pub use proxies::Proxies;
pub use signing::{read_private_key, KeyMaterial, SigningKey};

/// Default slice size: 1 MiB.
pub const DEFAULT_SLICE_BYTES: u64 = 1 << 20;
/// Default memory tier budget: 1 GiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
/// Default time object metadata learnt from a single origin answer is used before it is
/// re-checked, in seconds: 10 (as long as a missing object's 404 is kept).
pub const DEFAULT_META_TTL_SECS: u64 = 10;
/// Longest accepted `cache.meta_ttl_secs`: one day.
pub const MAX_META_TTL_SECS: u64 = 86_400;
/// Smallest accepted slice: 4 KiB (smaller slices make per-slice overhead dominate).
pub const MIN_SLICE_BYTES: u64 = 4 << 10;
/// Largest accepted slice: 64 MiB (a slice is held in memory whole, and weighed as a u32).
pub const MAX_SLICE_BYTES: u64 = 64 << 20;
/// Default tolerance for clocks that run ahead of the signer's, in seconds.
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 30;
/// Default longest lifetime of a signed URL, in seconds (7 days); 0 accepts any expiry.
pub const DEFAULT_MAX_TTL_SECS: u64 = 7 * 86_400;
/// Bytes of verified signed URLs kept (≈ 250 bytes each): 16 MiB.
pub const DEFAULT_VERIFIED_CACHE_BYTES: u64 = 16 << 20;
/// Bad signatures a client address may send a second before its unverified URLs are
/// refused unchecked.
pub const DEFAULT_MAX_BAD_SIGNATURES_PER_SEC: u32 = 20;
/// Default origin connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Default time budget for one origin slice fetch (headers and body).
pub const DEFAULT_ORIGIN_TIMEOUT_MS: u64 = 10_000;
/// Default time before an unhealthy origin is probed again in its configured place.
pub const DEFAULT_RETRY_UNHEALTHY_MS: u64 = 10_000;
/// Default time an origin's 404 or 410 for an object is remembered, in seconds.
pub const DEFAULT_ORIGIN_NEGATIVE_TTL_SECS: u64 = 10;
/// Longest accepted `origin.negative_ttl_secs`: one hour (an object that appears at the
/// origin is served at most this late).
pub const MAX_ORIGIN_NEGATIVE_TTL_SECS: u64 = 3_600;
/// Longest lifetime a cache setting may give, in seconds (one year).
pub const MAX_CACHE_SECS: u64 = 365 * 86_400;
/// Default origin path template.
pub const DEFAULT_ORIGIN_PATH: &str = "/objects/{o}/{v}";
/// Default SIGTERM grace period before the final shutdown step.
pub const DEFAULT_GRACE_PERIOD_SECS: u64 = 5;
/// Default time given to in-flight work after the grace period.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 5;
/// Default size of the idle keep-alive pool towards origins and upstreams.
pub const DEFAULT_UPSTREAM_KEEPALIVE_POOL: usize = 256;
/// Default Unix socket on which a new process receives the listeners of the old one.
pub const DEFAULT_UPGRADE_SOCK: &str = "/run/cdn-edge/upgrade.sock";
/// Default cap on open client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Default largest request head (request line and headers), in bytes.
pub const DEFAULT_MAX_REQUEST_HEAD_BYTES: usize = 32 * 1024;
/// Largest accepted `limits.max_request_head_bytes` (the HTTP/1 parser stops near 1 MiB).
pub const MAX_REQUEST_HEAD_LIMIT: usize = 512 << 10;
/// Default time a client has to send a whole request once its first byte arrived.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Default time a connection may go without the edge reading a request or writing a byte.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default number of requests served on one HTTP/1.1 connection before it is closed.
pub const DEFAULT_KEEPALIVE_REQUESTS: u32 = 10_000;
/// Default `forward.max_attempts`: answered failures before a record is set aside.
pub const DEFAULT_FORWARD_MAX_ATTEMPTS: u32 = crate::forward::retry::DEFAULT_MAX_ATTEMPTS;
/// Default `forward.max_retry_secs`: one hour from a record's first failed attempt.
pub const DEFAULT_FORWARD_MAX_RETRY_SECS: u64 = crate::forward::retry::DEFAULT_MAX_RETRY_SECS;
/// Default cap on open connections from one client address (an IPv4 address, or an IPv6
/// /64): room for a carrier-grade NAT address shared by a few hundred players.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1_000;
/// Default time a TLS handshake may take, from accept to its end.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default least rate, in bytes per second, at which a client must take a response
/// while the edge waits on it: 8 kbit/s, below any mobile link that plays video.
pub const DEFAULT_MIN_SEND_RATE_BYTES_PER_SEC: u64 = 1_024;
/// Default window over which the send rate is measured: this much time spent waiting on
/// the client.
pub const DEFAULT_SEND_RATE_WINDOW_MS: u64 = 60_000;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the file: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {key}: {message}")]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The validated configuration of one edge process.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub tls: Tls,
    pub signing: Signing,
    pub cache: Cache,
    pub origin: Origin,
    pub dictionary: Option<Dictionary>,
    pub cors: Cors,
    pub forward: Option<Forward>,
    pub server: Server,
    pub limits: Limits,
    pub log: Log,
    /// `[cluster]`: the site this node belongs to and its parent tier (SPEC 6).
    pub cluster: Option<Cluster>,
    /// `[admin]`: the token of the mutating admin endpoints (SPEC 7).
    pub admin: Admin,
    /// `[fill]`: background fill jobs; `None` without the section.
    pub fill: Option<Fill>,
    /// `[control]`: the control-plane report; `None` without the section.
    pub control: Option<Control>,
    /// `[proxies]`: the peers whose `X-Forwarded-For` is believed; none by default.
    pub proxies: Proxies,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The peer listener: siblings and child sites fill from it (with `[cluster]`).
    pub peer: Option<SocketAddr>,
}

/// `[tls]`: the HTTPS listener's certificate, and the trust store for HTTPS upstreams.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// Certificate chain and private key; required by `listen.https`.
    pub server: Option<ServerCert>,
    /// PEM bundle that replaces the system roots when verifying HTTPS origins and upstreams.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Signing {
    pub clock_skew_secs: u64,
    /// URLs expiring more than this many seconds (plus the skew) ahead are refused; 0: no limit.
    pub max_ttl_secs: u64,
    /// Bytes of verified signed URLs kept until they expire; 0: every request is verified.
    pub verified_cache_bytes: u64,
    /// Per client address (IPv6: its /64); 0: no limit.
    pub max_bad_signatures_per_sec: u32,
    pub keys: Vec<SigningKey>,
}

#[derive(Debug, Clone)]
pub struct Cache {
    pub slice_bytes: u64,
    pub memory_bytes: u64,
    /// Memory-tier slices live in a memfd and plain-TCP responses send them with
    /// `sendfile` (no copy through user space).
    pub sendfile: bool,
    /// How long metadata from a single origin answer (a 206's total size, a 416's
    /// `bytes */size`) is used before the origin is asked again; once an answer agrees
    /// after that, it is kept. `cache.meta_ttl_secs`, seconds, default 10.
    pub meta_ttl: Duration,
    /// How the memory tier chooses what to keep: `cache.memory_policy`.
    pub memory_policy: MemoryPolicy,
    pub disk: Option<DiskCache>,
}

/// The memory tier's replacement policy (`cache.memory_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum MemoryPolicy {
    /// Least recently used: every filled slice is kept, the longest unused one goes.
    #[serde(rename = "lru")]
    Lru,
    /// moka's TinyLFU: a new slice is kept only if it was asked for more often lately
    /// than the least recently used slice it would replace.
    #[serde(rename = "tinylfu")]
    TinyLfu,
    /// W-TinyLFU: half the budget is an LRU window every filled slice enters; what
    /// leaves the window competes by TinyLFU for the other half.
    #[serde(rename = "windowed")]
    Windowed,
    /// Scores each slice by its title's recent reads and by how far into the title it
    /// is, keeps a slice a read ended inside for the player's next segment, and drops
    /// the lowest score of a sample when full.
    #[default]
    #[serde(rename = "video")]
    Video,
}

#[derive(Debug, Clone)]
pub struct DiskCache {
    pub path: PathBuf,
    pub max_bytes: u64,
    /// What the disk tier keeps when it is full: `cache.disk.policy`.
    pub policy: DiskPolicy,
}

/// The disk tier's replacement policy (`cache.disk.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum DiskPolicy {
    /// Least recently used: every slice fetched from upstream is written, the longest
    /// unused file goes.
    #[serde(rename = "lru")]
    Lru,
    /// The memory tier's `video` scoring with the disk's budget: a slice that scores
    /// below what the tier holds is not written.
    #[default]
    #[serde(rename = "video")]
    Video,
}

#[derive(Debug, Clone)]
pub struct Origin {
    pub urls: Vec<UpstreamUrl>,
    pub path: PathTemplate,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// How long an origin with 3+ consecutive failures is tried after the healthy ones.
    pub retry_unhealthy: Duration,
    /// How long an origin's 404 or 410 for an object is remembered and answered without
    /// asking again; zero remembers nothing. `origin.negative_ttl_secs`, seconds,
    /// default 10.
    pub negative_ttl: Duration,
    /// `pull`, or `directed`: a client's miss is never filled from upstream (SPEC 6.3).
    pub mode: OriginMode,
    /// Directed mode: where a miss no node of the site holds is sent (302), with the
    /// request's path and query appended; `None` answers 404. No trailing slash.
    pub redirect_url: Option<String>,
}

/// `http[s]://host[:port]` of an origin or upstream, checked but not resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// An origin path with `{o}` and `{v}` placeholders, split once at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Object,
    Version,
}

impl PathTemplate {
    /// Parses a template; it must start with `/` and contain no braces other than
    /// `{o}` and `{v}`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err("must start with '/'".into());
        }
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_string()));
            }
            let tail = &rest[open..];
            if let Some(after) = tail.strip_prefix("{o}") {
                parts.push(TemplatePart::Object);
                rest = after;
            } else if let Some(after) = tail.strip_prefix("{v}") {
                parts.push(TemplatePart::Version);
                rest = after;
            } else {
                return Err("only the placeholders {o} and {v} are allowed".into());
            }
        }
        if rest.contains('}') {
            return Err("unbalanced '}'".into());
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_string()));
        }
        if !parts.contains(&TemplatePart::Object) {
            return Err("must contain {o}".into());
        }
        Ok(Self { parts })
    }

    /// Substitutes an already validated object id and version.
    pub fn render(&self, o: &str, v: &str) -> String {
        let mut out = String::with_capacity(64 + o.len() + v.len());
        for part in &self.parts {
            match part {
                TemplatePart::Literal(s) => out.push_str(s),
                TemplatePart::Object => out.push_str(o),
                TemplatePart::Version => out.push_str(v),
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct Dictionary {
    pub paths: Vec<String>,
    pub upstream: UpstreamUrl,
    pub ttl_secs: u64,
    pub negative_ttl_secs: u64,
    pub stale_if_error_secs: u64,
    pub memory_bytes: u64,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Cors {
    pub allow_origins: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Forward {
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub dedupe_secs: u64,
    pub max_body_bytes: u64,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub events: Option<UpstreamUrl>,
    pub logblob: Option<UpstreamUrl>,
    pub stats: Option<UpstreamUrl>,
    /// When background delivery gives up on a record (moves it to the dead letters).
    pub retry: crate::forward::retry::RetryLimits,
}

/// Process-level settings (`[server]`).
#[derive(Debug, Clone)]
pub struct Server {
    /// Worker threads of the public listener's runtime.
    pub threads: usize,
    pub grace_period_secs: u64,
    pub shutdown_timeout_secs: u64,
    pub upstream_keepalive_pool: usize,
    /// Where a process started with `--upgrade` receives the listeners.
    pub upgrade_sock: PathBuf,
}

/// Client-facing limits (`[limits]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open client connections; further ones are closed at once.
    pub max_connections: usize,
    /// Largest request head; larger ones get 431.
    pub max_request_head_bytes: usize,
    /// Time to send a whole request (head and body) once its first byte has arrived.
    pub request_timeout: Duration,
    /// Time a connection may go without a request starting or a response byte being written.
    pub idle_timeout: Duration,
    /// Requests served on one HTTP/1.1 connection before the edge closes it.
    pub keepalive_requests: u32,
    /// Open connections from one client address (IPv4, or IPv6 /64); further ones are
    /// closed at once. At or above `max_connections` it has no effect.
    pub max_connections_per_ip: usize,
    /// Time a TLS handshake may take from accept.
    pub tls_handshake_timeout: Duration,
    /// Least bytes per second a client must take while the edge waits on it; 0: no
    /// minimum.
    pub min_send_rate_bytes_per_sec: u64,
    /// Waiting time over which the send rate is measured.
    pub send_rate_window: Duration,
    /// Bytes of slices that video responses in flight may hold; a video response that
    /// would go over gets 503.
    pub max_pinned_bytes: u64,
}

/// Logging (`[log]`); `CDN_EDGE_LOG` in the environment overrides `level`.
#[derive(Debug, Clone)]
pub struct Log {
    /// A tracing filter: `info`, `warn,cdn_edge=debug`, …
    pub level: String,
    /// One JSON line per request on the `access` target.
    pub access: bool,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: "info".to_string(),
            access: true,
            format: LogFormat::Json,
        }
    }
}

/// Log targets quieted unless a filter names them: any client can make rustls log a
/// WARN line per connection (an IP address sent as SNI, as wrk and some players do; a
/// warning alert; an odd message order). TLS handshake failures are counted in
/// `cdn_edge_tls_handshake_failures_total` instead.
const QUIET_TARGETS: [(&str, &str); 1] = [("rustls", "rustls=error")];

/// The tracing filter for a configured or `CDN_EDGE_LOG` level: the level, then a
/// directive quieting each of [`QUIET_TARGETS`] that the level does not mention.
pub fn log_filter(level: &str) -> String {
    let mut filter = level.trim().to_string();
    for (target, directive) in QUIET_TARGETS {
        if !filter.contains(target) {
            if !filter.is_empty() {
                filter.push(',');
            }
            filter.push_str(directive);
        }
    }
    filter
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { key, message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                key,
                message,
            },
            ConfigError::Invalid { key, message } => ConfigError::Parse {
                path: path.to_path_buf(),
                key,
                message,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text; secrets named by `secret_env` are read
    /// from the process environment.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_env(text, |name| std::env::var(name).ok())
    }

    /// Like [`Config::from_toml`] with an explicit environment lookup.
    pub fn from_toml_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let raw: file::Root = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = match e.path().to_string() {
                p if p == "." => "(top level)".to_string(),
                p => p,
            };
            ConfigError::Parse {
                path: PathBuf::new(),
                key,
                message: e.inner().message().to_string(),
            }
        })?;
        raw.validate(&env)
    }
}

/// The serde mirror of the file; nothing outside this module sees it.
mod file {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Root {
        pub listen: Listen,
        #[serde(default)]
        pub tls: Tls,
        pub signing: Signing,
        #[serde(default)]
        pub cache: Cache,
        pub origin: Origin,
        pub dictionary: Option<Dictionary>,
        #[serde(default)]
        pub cors: Cors,
        pub forward: Option<Forward>,
        #[serde(default)]
        pub server: Server,
        #[serde(default)]
        pub limits: Limits,
        #[serde(default)]
        pub log: Log,
        pub cluster: Option<super::cluster::RawCluster>,
        #[serde(default)]
        pub admin: super::ops::RawAdmin,
        pub fill: Option<super::ops::RawFill>,
        pub control: Option<super::ops::RawControl>,
        #[serde(default)]
        pub proxies: super::proxies::RawProxies,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Listen {
        pub http: String,
        pub https: Option<String>,
        pub admin: String,
        pub peer: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub cert: Option<PathBuf>,
        pub key: Option<PathBuf>,
        pub ca_file: Option<PathBuf>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Limits {
        pub max_connections: usize,
        pub max_request_head_bytes: usize,
        pub request_timeout_ms: u64,
        pub idle_timeout_ms: u64,
        pub keepalive_requests: u32,
        pub max_connections_per_ip: usize,
        pub tls_handshake_timeout_ms: u64,
        pub min_send_rate_bytes_per_sec: u64,
        pub send_rate_window_ms: u64,
        /// None: `cache.memory_bytes`.
        pub max_pinned_bytes: Option<u64>,
    }

    impl Default for Limits {
        fn default() -> Self {
            Self {
                max_connections: DEFAULT_MAX_CONNECTIONS,
                max_request_head_bytes: DEFAULT_MAX_REQUEST_HEAD_BYTES,
                request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
                idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
                keepalive_requests: DEFAULT_KEEPALIVE_REQUESTS,
                max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
                tls_handshake_timeout_ms: DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS,
                min_send_rate_bytes_per_sec: DEFAULT_MIN_SEND_RATE_BYTES_PER_SEC,
                send_rate_window_ms: DEFAULT_SEND_RATE_WINDOW_MS,
                max_pinned_bytes: None,
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Log {
        pub level: String,
        pub access: bool,
        pub format: LogFormat,
    }

    impl Default for Log {
        fn default() -> Self {
            let d = super::Log::default();
            Self {
                level: d.level,
                access: d.access,
                format: d.format,
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Signing {
        #[serde(default = "default_clock_skew")]
        pub clock_skew_secs: u64,
        #[serde(default = "default_max_ttl")]
        pub max_ttl_secs: u64,
        #[serde(default = "default_verified_cache_bytes")]
        pub verified_cache_bytes: u64,
        #[serde(default = "default_max_bad_signatures")]
        pub max_bad_signatures_per_sec: u32,
        pub keys: Vec<super::signing::RawKey>,
    }

    fn default_clock_skew() -> u64 {
        DEFAULT_CLOCK_SKEW_SECS
    }

    fn default_max_ttl() -> u64 {
        DEFAULT_MAX_TTL_SECS
    }

    fn default_verified_cache_bytes() -> u64 {
        DEFAULT_VERIFIED_CACHE_BYTES
    }

    fn default_max_bad_signatures() -> u32 {
        DEFAULT_MAX_BAD_SIGNATURES_PER_SEC
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Cache {
        pub slice_bytes: u64,
        pub memory_bytes: u64,
        pub sendfile: bool,
        pub meta_ttl_secs: u64,
        pub memory_policy: super::MemoryPolicy,
        pub disk: Option<Disk>,
    }

    impl Default for Cache {
        fn default() -> Self {
            Self {
                slice_bytes: DEFAULT_SLICE_BYTES,
                memory_bytes: DEFAULT_MEMORY_BYTES,
                sendfile: true,
                meta_ttl_secs: DEFAULT_META_TTL_SECS,
                memory_policy: super::MemoryPolicy::default(),
                disk: None,
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Disk {
        pub path: PathBuf,
        pub max_bytes: u64,
        #[serde(default)]
        pub policy: super::DiskPolicy,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Origin {
        pub urls: Vec<String>,
        #[serde(default = "default_origin_path")]
        pub path: String,
        #[serde(default = "default_connect_timeout")]
        pub connect_timeout_ms: u64,
        #[serde(default = "default_origin_timeout")]
        pub timeout_ms: u64,
        #[serde(default = "default_retry_unhealthy")]
        pub retry_unhealthy_ms: u64,
        #[serde(default = "default_origin_negative_ttl")]
        pub negative_ttl_secs: u64,
        #[serde(default)]
        pub mode: super::OriginMode,
        #[serde(default)]
        pub redirect_url: String,
    }

    fn default_retry_unhealthy() -> u64 {
        DEFAULT_RETRY_UNHEALTHY_MS
    }
    fn default_origin_negative_ttl() -> u64 {
        DEFAULT_ORIGIN_NEGATIVE_TTL_SECS
    }

    fn default_origin_path() -> String {
        DEFAULT_ORIGIN_PATH.to_string()
    }
    fn default_connect_timeout() -> u64 {
        DEFAULT_CONNECT_TIMEOUT_MS
    }
    fn default_origin_timeout() -> u64 {
        DEFAULT_ORIGIN_TIMEOUT_MS
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Dictionary {
        #[serde(default = "default_dictionary_paths")]
        pub paths: Vec<String>,
        pub upstream: String,
        #[serde(default = "default_dictionary_ttl")]
        pub ttl_secs: u64,
        #[serde(default = "default_negative_ttl")]
        pub negative_ttl_secs: u64,
        #[serde(default = "default_stale_if_error")]
        pub stale_if_error_secs: u64,
        #[serde(default = "default_dictionary_memory")]
        pub memory_bytes: u64,
        #[serde(default = "default_connect_timeout")]
        pub connect_timeout_ms: u64,
        #[serde(default = "default_dictionary_timeout")]
        pub timeout_ms: u64,
    }

    fn default_dictionary_paths() -> Vec<String> {
        vec!["/base_dict_getHoverDict_8".to_string()]
    }
    fn default_dictionary_ttl() -> u64 {
        86_400
    }
    fn default_negative_ttl() -> u64 {
        60
    }
    fn default_stale_if_error() -> u64 {
        86_400
    }
    fn default_dictionary_memory() -> u64 {
        64 << 20
    }
    fn default_dictionary_timeout() -> u64 {
        2_000
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Cors {
        #[serde(default)]
        pub allow_origins: Vec<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Forward {
        pub spool_dir: PathBuf,
        #[serde(default = "default_spool_max")]
        pub spool_max_bytes: u64,
        #[serde(default = "default_dedupe")]
        pub dedupe_secs: u64,
        #[serde(default = "default_max_body")]
        pub max_body_bytes: u64,
        #[serde(default = "default_connect_timeout")]
        pub connect_timeout_ms: u64,
        #[serde(default = "default_forward_timeout")]
        pub timeout_ms: u64,
        pub events: Option<String>,
        pub logblob: Option<String>,
        pub stats: Option<String>,
        /// Attempts the upstream answered with a failure (500, 501, 505 and up, 3xx, not
        /// HTTP) before a spooled record is moved to the dead letters. Default 10.
        #[serde(default = "default_max_attempts")]
        pub max_attempts: u32,
        /// Seconds from a spooled record's first failed attempt after which a further
        /// failure of any kind moves it to the dead letters. Default 3600.
        #[serde(default = "default_max_retry_secs")]
        pub max_retry_secs: u64,
    }

    fn default_max_attempts() -> u32 {
        DEFAULT_FORWARD_MAX_ATTEMPTS
    }
    fn default_max_retry_secs() -> u64 {
        DEFAULT_FORWARD_MAX_RETRY_SECS
    }

    fn default_forward_timeout() -> u64 {
        5_000
    }
    fn default_spool_max() -> u64 {
        1 << 30
    }
    fn default_dedupe() -> u64 {
        600
    }
    fn default_max_body() -> u64 {
        1 << 20
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Server {
        /// 0 = one per available CPU.
        pub threads: usize,
        pub grace_period_secs: u64,
        pub shutdown_timeout_secs: u64,
        pub upstream_keepalive_pool: usize,
        pub upgrade_sock: PathBuf,
    }

    impl Default for Server {
        fn default() -> Self {
            Self {
                threads: 0,
                grace_period_secs: DEFAULT_GRACE_PERIOD_SECS,
                shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
                upstream_keepalive_pool: DEFAULT_UPSTREAM_KEEPALIVE_POOL,
                upgrade_sock: PathBuf::from(DEFAULT_UPGRADE_SOCK),
            }
        }
    }
}

impl file::Root {
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let listen = Listen {
            http: parse_addr("listen.http", &self.listen.http)?,
            https: self
                .listen
                .https
                .as_deref()
                .map(|a| parse_addr("listen.https", a))
                .transpose()?,
            admin: parse_addr("listen.admin", &self.listen.admin)?,
            peer: self
                .listen
                .peer
                .as_deref()
                .map(|a| parse_addr("listen.peer", a))
                .transpose()?,
        };
        if let Some(peer) = listen.peer {
            let taken = [Some(listen.http), listen.https, Some(listen.admin)];
            if taken.iter().flatten().any(|a| a.port() == peer.port()) {
                return Err(invalid(
                    "listen.peer",
                    "must use a port of its own (not that of listen.http, https or admin)",
                ));
            }
        }
        if listen
            .https
            .is_some_and(|https| https.port() == listen.http.port())
        {
            return Err(invalid(
                "listen.https",
                "must use another port than listen.http",
            ));
        }
        let tls = validate_tls(self.tls, listen.https.is_some())?;
        let cache = validate_cache(self.cache)?;
        let limits = validate_limits(self.limits, &cache)?;
        let log = validate_log(self.log)?;

        let signing = validate_signing(self.signing, env)?;
        let origin = validate_origin(self.origin)?;
        let cluster = cluster::validate(self.cluster, listen.peer, origin.timeout, env)?;
        let admin = ops::validate_admin(self.admin, env)?;
        let fill = self.fill.map(ops::validate_fill).transpose()?;
        let control = self.control.map(ops::validate_control).transpose()?;
        let dictionary = self.dictionary.map(validate_dictionary).transpose()?;
        let forward = self.forward.map(validate_forward).transpose()?;
        let proxies = proxies::validate(self.proxies)?;

        for (i, o) in self.cors.allow_origins.iter().enumerate() {
            if o == "*" || !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(invalid(
                    format!("cors.allow_origins[{i}]"),
                    "must be an origin such as https://www.example.com (no wildcard)",
                ));
            }
        }

        let threads = match self.server.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Ok(Config {
            listen,
            tls,
            signing,
            cache,
            origin,
            dictionary,
            cors: Cors {
                allow_origins: self.cors.allow_origins,
            },
            forward,
            server: Server {
                threads,
                grace_period_secs: self.server.grace_period_secs,
                shutdown_timeout_secs: self.server.shutdown_timeout_secs,
                upstream_keepalive_pool: self.server.upstream_keepalive_pool,
                upgrade_sock: self.server.upgrade_sock,
            },
            limits,
            log,
            cluster,
            admin,
            fill,
            control,
            proxies,
        })
    }
}

fn validate_tls(raw: file::Tls, https: bool) -> Result<Tls, ConfigError> {
    let server = match (raw.cert, raw.key) {
        (Some(cert), Some(key)) => Some(ServerCert { cert, key }),
        (Some(_), None) => return Err(invalid("tls.key", "tls.cert needs its private key")),
        (None, Some(_)) => return Err(invalid("tls.cert", "tls.key needs its certificate")),
        (None, None) if https => {
            return Err(invalid(
                "listen.https",
                "needs tls.cert and tls.key in the [tls] section",
            ))
        }
        (None, None) => None,
    };
    Ok(Tls {
        server,
        ca_file: raw.ca_file,
    })
}

fn validate_limits(raw: file::Limits, cache: &Cache) -> Result<Limits, ConfigError> {
    if raw.max_connections == 0 {
        return Err(invalid("limits.max_connections", "must be greater than 0"));
    }
    if raw.max_connections_per_ip == 0 {
        return Err(invalid(
            "limits.max_connections_per_ip",
            "must be greater than 0",
        ));
    }
    let max_pinned_bytes = raw.max_pinned_bytes.unwrap_or(cache.memory_bytes);
    if max_pinned_bytes < cache.slice_bytes {
        return Err(invalid(
            "limits.max_pinned_bytes",
            "must hold at least one slice (>= cache.slice_bytes)",
        ));
    }
    if !(1024..=MAX_REQUEST_HEAD_LIMIT).contains(&raw.max_request_head_bytes) {
        return Err(invalid(
            "limits.max_request_head_bytes",
            format!("must be between 1024 and {MAX_REQUEST_HEAD_LIMIT}"),
        ));
    }
    if raw.keepalive_requests == 0 {
        return Err(invalid(
            "limits.keepalive_requests",
            "must be greater than 0",
        ));
    }
    Ok(Limits {
        max_connections: raw.max_connections,
        max_request_head_bytes: raw.max_request_head_bytes,
        request_timeout: positive_ms("limits.request_timeout_ms", raw.request_timeout_ms)?,
        idle_timeout: positive_ms("limits.idle_timeout_ms", raw.idle_timeout_ms)?,
        keepalive_requests: raw.keepalive_requests,
        max_connections_per_ip: raw.max_connections_per_ip,
        tls_handshake_timeout: positive_ms(
            "limits.tls_handshake_timeout_ms",
            raw.tls_handshake_timeout_ms,
        )?,
        min_send_rate_bytes_per_sec: raw.min_send_rate_bytes_per_sec,
        send_rate_window: positive_ms("limits.send_rate_window_ms", raw.send_rate_window_ms)?,
        max_pinned_bytes,
    })
}

fn validate_log(raw: file::Log) -> Result<Log, ConfigError> {
    tracing_subscriber::EnvFilter::try_new(&raw.level)
        .map_err(|e| invalid("log.level", format!("{:?}: {e}", raw.level)))?;
    Ok(Log {
        level: raw.level,
        access: raw.access,
        format: raw.format,
    })
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, format!("{s:?} is not an IP:port address")))
}

fn validate_signing(
    raw: file::Signing,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Signing, ConfigError> {
    let keys = signing::validate_keys(raw.keys, env)?;
    Ok(Signing {
        clock_skew_secs: raw.clock_skew_secs,
        max_ttl_secs: raw.max_ttl_secs,
        verified_cache_bytes: raw.verified_cache_bytes,
        max_bad_signatures_per_sec: raw.max_bad_signatures_per_sec,
        keys,
    })
}

fn validate_cache(raw: file::Cache) -> Result<Cache, ConfigError> {
    if !(MIN_SLICE_BYTES..=MAX_SLICE_BYTES).contains(&raw.slice_bytes) {
        return Err(invalid(
            "cache.slice_bytes",
            format!("must be between {MIN_SLICE_BYTES} and {MAX_SLICE_BYTES}"),
        ));
    }
    if raw.memory_bytes < raw.slice_bytes {
        return Err(invalid(
            "cache.memory_bytes",
            "must hold at least one slice (>= cache.slice_bytes)",
        ));
    }
    if !(1..=MAX_META_TTL_SECS).contains(&raw.meta_ttl_secs) {
        return Err(invalid(
            "cache.meta_ttl_secs",
            format!("must be between 1 and {MAX_META_TTL_SECS}"),
        ));
    }
    let disk = match raw.disk {
        Some(d) => {
            if d.path.as_os_str().is_empty() {
                return Err(invalid("cache.disk.path", "must not be empty"));
            }
            if d.max_bytes < raw.slice_bytes {
                return Err(invalid(
                    "cache.disk.max_bytes",
                    "must hold at least one slice (>= cache.slice_bytes)",
                ));
            }
            Some(DiskCache {
                path: d.path,
                max_bytes: d.max_bytes,
                policy: d.policy,
            })
        }
        None => None,
    };
    Ok(Cache {
        slice_bytes: raw.slice_bytes,
        memory_bytes: raw.memory_bytes,
        sendfile: raw.sendfile,
        meta_ttl: Duration::from_secs(raw.meta_ttl_secs),
        memory_policy: raw.memory_policy,
        disk,
    })
}

fn validate_origin(raw: file::Origin) -> Result<Origin, ConfigError> {
    if raw.urls.is_empty() {
        return Err(invalid(
            "origin.urls",
            "at least one origin URL is required",
        ));
    }
    let urls = raw
        .urls
        .iter()
        .enumerate()
        .map(|(i, u)| parse_upstream_url(&format!("origin.urls[{i}]"), u))
        .collect::<Result<Vec<_>, _>>()?;
    let path = PathTemplate::parse(&raw.path).map_err(|m| invalid("origin.path", m))?;
    if raw.negative_ttl_secs > MAX_ORIGIN_NEGATIVE_TTL_SECS {
        return Err(invalid(
            "origin.negative_ttl_secs",
            format!(
                "must be at most {MAX_ORIGIN_NEGATIVE_TTL_SECS} (one hour); 0 remembers nothing"
            ),
        ));
    }
    Ok(Origin {
        urls,
        path,
        connect_timeout: positive_ms("origin.connect_timeout_ms", raw.connect_timeout_ms)?,
        timeout: positive_ms("origin.timeout_ms", raw.timeout_ms)?,
        retry_unhealthy: positive_ms("origin.retry_unhealthy_ms", raw.retry_unhealthy_ms)?,
        negative_ttl: Duration::from_secs(raw.negative_ttl_secs),
        mode: raw.mode,
        redirect_url: validate_redirect_url(&raw.redirect_url)?,
    })
}

fn validate_redirect_url(s: &str) -> Result<Option<String>, ConfigError> {
    if s.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| invalid("origin.redirect_url", format!("{s:?}: {why}"));
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| bad("must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') || s.contains(['?', '#', ' ']) {
        return Err(bad(
            "must be scheme://host[:port][/path prefix], without query",
        ));
    }
    http::HeaderValue::from_str(s).map_err(|_| bad("not a valid header value"))?;
    Ok(Some(s.trim_end_matches('/').to_string()))
}

fn validate_dictionary(raw: file::Dictionary) -> Result<Dictionary, ConfigError> {
    for (i, p) in raw.paths.iter().enumerate() {
        if !p.starts_with('/') || p == "/" || p.contains('?') {
            return Err(invalid(
                format!("dictionary.paths[{i}]"),
                "must be an absolute path other than '/' without a query",
            ));
        }
    }
    if raw.memory_bytes < 1 << 20 {
        return Err(invalid(
            "dictionary.memory_bytes",
            "must be at least 1048576 (1 MiB)",
        ));
    }
    for (key, secs) in [
        ("dictionary.ttl_secs", raw.ttl_secs),
        ("dictionary.negative_ttl_secs", raw.negative_ttl_secs),
        ("dictionary.stale_if_error_secs", raw.stale_if_error_secs),
    ] {
        if secs > MAX_CACHE_SECS {
            return Err(invalid(
                key,
                format!("must be at most {MAX_CACHE_SECS} (one year)"),
            ));
        }
    }
    Ok(Dictionary {
        paths: raw.paths,
        upstream: parse_upstream_url("dictionary.upstream", &raw.upstream)?,
        ttl_secs: raw.ttl_secs,
        negative_ttl_secs: raw.negative_ttl_secs,
        stale_if_error_secs: raw.stale_if_error_secs,
        memory_bytes: raw.memory_bytes,
        connect_timeout: positive_ms("dictionary.connect_timeout_ms", raw.connect_timeout_ms)?,
        timeout: positive_ms("dictionary.timeout_ms", raw.timeout_ms)?,
    })
}

fn validate_forward(raw: file::Forward) -> Result<Forward, ConfigError> {
    if raw.spool_dir.as_os_str().is_empty() {
        return Err(invalid("forward.spool_dir", "must not be empty"));
    }
    if raw.max_body_bytes == 0 || raw.max_body_bytes > 64 << 20 {
        return Err(invalid(
            "forward.max_body_bytes",
            "must be between 1 and 67108864 (64 MiB)",
        ));
    }
    if raw.spool_max_bytes < raw.max_body_bytes {
        return Err(invalid(
            "forward.spool_max_bytes",
            "must hold at least one request (>= forward.max_body_bytes)",
        ));
    }
    let url = |key: &str, v: &Option<String>| {
        v.as_deref().map(|u| parse_upstream_url(key, u)).transpose()
    };
    if raw.max_attempts == 0 {
        return Err(invalid("forward.max_attempts", "must be at least 1"));
    }
    if raw.max_retry_secs == 0 || raw.max_retry_secs > 30 * 86_400 {
        return Err(invalid(
            "forward.max_retry_secs",
            "must be between 1 and 2592000 (30 days)",
        ));
    }
    Ok(Forward {
        spool_dir: raw.spool_dir,
        spool_max_bytes: raw.spool_max_bytes,
        dedupe_secs: raw.dedupe_secs,
        max_body_bytes: raw.max_body_bytes,
        connect_timeout: positive_ms("forward.connect_timeout_ms", raw.connect_timeout_ms)?,
        timeout: positive_ms("forward.timeout_ms", raw.timeout_ms)?,
        events: url("forward.events", &raw.events)?,
        logblob: url("forward.logblob", &raw.logblob)?,
        stats: url("forward.stats", &raw.stats)?,
        retry: crate::forward::retry::RetryLimits {
            max_attempts: raw.max_attempts,
            max_retry: Duration::from_secs(raw.max_retry_secs),
        },
    })
}

fn positive_ms(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    if ms == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(Duration::from_millis(ms))
}

/// Parses `http://host[:port]` or `https://host[:port]` with no path, query or userinfo.
pub fn parse_upstream_url(key: &str, s: &str) -> Result<UpstreamUrl, ConfigError> {
    let bad = |why: &str| invalid(key, format!("{s:?}: {why}"));
    let (tls, rest) = if let Some(r) = s.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = s.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(bad("must start with http:// or https://"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(bad(
            "must be scheme://host[:port] without path, query or user",
        ));
    }
    let uri: http::uri::Authority = authority.parse().map_err(|_| bad("invalid host"))?;
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let host = uri.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    Ok(UpstreamUrl {
        url: s.trim_end_matches('/').to_string(),
        tls,
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[listen]
http = "127.0.0.1:8080"
admin = "127.0.0.1:9090"
[signing]
[[signing.keys]]
id = "k1"
secret = "s1"
[origin]
urls = ["http://127.0.0.1:9000"]
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml_with_env(MINIMAL, no_env).unwrap();
        assert_eq!(c.cache.slice_bytes, DEFAULT_SLICE_BYTES);
        assert_eq!(c.cache.memory_bytes, DEFAULT_MEMORY_BYTES);
        assert_eq!(c.signing.clock_skew_secs, 30);
        assert_eq!(c.signing.max_ttl_secs, DEFAULT_MAX_TTL_SECS);
        assert_eq!(c.origin.path.render("a", "b"), "/objects/a/b");
        assert!(c.server.threads >= 1);
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let text = format!("{MINIMAL}\n[cache.disk]\npath = \"/tmp/x\"\nmaxbytes = 5\n");
        let err = Config::from_toml_with_env(&text, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.disk"), "{err}");
        assert!(err.contains("maxbytes"), "{err}");
    }

    #[test]
    fn unknown_top_level_section_is_rejected() {
        let text = format!("{MINIMAL}\n[cahce]\nslice_bytes = 1\n");
        let err = Config::from_toml_with_env(&text, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cahce"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = MINIMAL.replace(
            "urls = [\"http://127.0.0.1:9000\"]",
            "urls = [\"http://127.0.0.1:9000\"]\ntimeout_ms = \"ten\"",
        );
        let err = Config::from_toml_with_env(&text, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("origin.timeout_ms"), "{err}");
    }

    #[test]
    fn secret_env_is_resolved_and_missing_env_is_an_error() {
        let text = MINIMAL.replace("secret = \"s1\"", "secret_env = \"EDGE_K1\"");
        let c =
            Config::from_toml_with_env(&text, |n| (n == "EDGE_K1").then(|| "xyz".into())).unwrap();
        assert_eq!(c.signing.keys[0].hmac_secret(), Some(&b"xyz"[..]));
        let err = Config::from_toml_with_env(&text, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("signing.keys[0].secret_env"), "{err}");
        assert!(err.contains("EDGE_K1"), "{err}");
    }

    #[test]
    fn secrets_are_not_printed_by_debug() {
        let c = Config::from_toml_with_env(MINIMAL, no_env).unwrap();
        assert!(!format!("{c:?}").contains("\"s1\""));
    }

    #[test]
    fn duplicate_key_ids_are_rejected() {
        let text = format!("{MINIMAL}\n[[signing.keys]]\nid = \"k1\"\nsecret = \"s2\"\n");
        // The second [[signing.keys]] comes after [origin]; TOML still appends to the array.
        let err = Config::from_toml_with_env(&text, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("duplicate"), "{err}");
    }

    #[test]
    fn meta_ttl_has_a_default_and_bounds() {
        let c = Config::from_toml_with_env(MINIMAL, no_env).unwrap();
        assert_eq!(c.cache.meta_ttl, Duration::from_secs(DEFAULT_META_TTL_SECS));
        let text = format!("{MINIMAL}\n[cache]\nmeta_ttl_secs = 3\n");
        let c = Config::from_toml_with_env(&text, no_env).unwrap();
        assert_eq!(c.cache.meta_ttl, Duration::from_secs(3));
        for bad in ["0", "86401"] {
            let text = format!("{MINIMAL}\n[cache]\nmeta_ttl_secs = {bad}\n");
            let err = Config::from_toml_with_env(&text, no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains("cache.meta_ttl_secs"), "{err}");
        }
    }

    #[test]
    fn memory_policy_defaults_to_video_and_names_a_bad_value() {
        let c = Config::from_toml_with_env(MINIMAL, no_env).unwrap();
        assert_eq!(c.cache.memory_policy, MemoryPolicy::Video);
        for (text, want) in [
            ("lru", MemoryPolicy::Lru),
            ("tinylfu", MemoryPolicy::TinyLfu),
            ("windowed", MemoryPolicy::Windowed),
            ("video", MemoryPolicy::Video),
        ] {
            let toml = format!("{MINIMAL}\n[cache]\nmemory_policy = \"{text}\"\n");
            let c = Config::from_toml_with_env(&toml, no_env).unwrap();
            assert_eq!(c.cache.memory_policy, want);
        }
        let toml = format!("{MINIMAL}\n[cache]\nmemory_policy = \"arc\"\n");
        let err = Config::from_toml_with_env(&toml, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory_policy"), "{err}");
    }

    #[test]
    fn disk_policy_defaults_to_video_and_names_a_bad_value() {
        let disk = |line: &str| {
            format!("{MINIMAL}\n[cache.disk]\npath = \"/tmp/c\"\nmax_bytes = 1073741824\n{line}")
        };
        let c = Config::from_toml_with_env(&disk(""), no_env).unwrap();
        assert_eq!(c.cache.disk.unwrap().policy, DiskPolicy::Video);
        for (text, want) in [("lru", DiskPolicy::Lru), ("video", DiskPolicy::Video)] {
            let toml = disk(&format!("policy = \"{text}\"\n"));
            let c = Config::from_toml_with_env(&toml, no_env).unwrap();
            assert_eq!(c.cache.disk.unwrap().policy, want);
        }
        let err = Config::from_toml_with_env(&disk("policy = \"tinylfu\"\n"), no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy"), "{err}");
    }

    #[test]
    fn origin_negative_ttl_has_a_default_and_a_bound() {
        let c = Config::from_toml_with_env(MINIMAL, no_env).unwrap();
        assert_eq!(
            c.origin.negative_ttl,
            Duration::from_secs(DEFAULT_ORIGIN_NEGATIVE_TTL_SECS)
        );
        for (secs, ttl) in [("0", 0), ("1", 1), ("3600", 3_600)] {
            let text = MINIMAL.replace(
                "[origin]\n",
                &format!("[origin]\nnegative_ttl_secs = {secs}\n"),
            );
            let c = Config::from_toml_with_env(&text, no_env).unwrap();
            assert_eq!(c.origin.negative_ttl, Duration::from_secs(ttl));
        }
        let text = MINIMAL.replace("[origin]\n", "[origin]\nnegative_ttl_secs = 3601\n");
        let err = Config::from_toml_with_env(&text, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("origin.negative_ttl_secs"), "{err}");
    }

    #[test]
    fn slice_size_bounds() {
        for bad in ["1", "1000", "134217728"] {
            let text = format!("{MINIMAL}\n[cache]\nslice_bytes = {bad}\n");
            let err = Config::from_toml_with_env(&text, no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains("cache.slice_bytes"), "{err}");
        }
    }

    #[test]
    fn ed25519_key_in_the_file_and_unknown_alg() {
        // 32 bytes of 7, standard base64.
        let pk = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
        let text = format!(
            "{MINIMAL}\n[[signing.keys]]\nid = \"k2\"\nalg = \"ed25519\"\npublic_key = \"{pk}\"\n"
        );
        let c = Config::from_toml_with_env(&text, no_env).unwrap();
        assert_eq!(c.signing.keys.len(), 2);
        assert!(c.signing.keys[0].hmac_secret().is_some());
        assert!(
            c.signing.keys[1].material
                == KeyMaterial::Ed25519 {
                    public_key: [7; 32]
                }
        );
        let text = format!("{MINIMAL}\n[[signing.keys]]\nid = \"k2\"\nalg = \"rsa\"\n");
        let err = Config::from_toml_with_env(&text, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("alg"), "{err}");
    }

    #[test]
    fn proxies_trust_nobody_by_default_and_name_a_bad_entry() {
        let c = Config::from_toml_with_env(MINIMAL, no_env).unwrap();
        assert!(c.proxies.trusted.is_empty());
        let with = |lines: &str| {
            Config::from_toml_with_env(&format!("{MINIMAL}\n[proxies]\n{lines}\n"), no_env)
        };
        let c = with("trusted = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]").unwrap();
        assert_eq!(c.proxies.trusted.len(), 3);
        assert!(with("").unwrap().proxies.trusted.is_empty());
        let err = with("trusted = [\"10.0.0.0/8\", \"192.0.2.7\", \"10.0.0.0/33\"]")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxies.trusted[2]: \"10.0.0.0/33\" is not an IP network"),
            "{err}"
        );
        let err = with("trusted = \"10.0.0.0/8\"").unwrap_err().to_string();
        assert!(err.contains("proxies.trusted"), "{err}");
        let err = with("trust = []").unwrap_err().to_string();
        assert!(err.contains("proxies") && err.contains("trust"), "{err}");
    }

    #[test]
    fn memory_budget_over_4_gib_is_accepted() {
        let text = format!("{MINIMAL}\n[cache]\nmemory_bytes = 17179869184\n");
        let c = Config::from_toml_with_env(&text, no_env).unwrap();
        assert_eq!(c.cache.memory_bytes, 16 << 30);
    }

    #[test]
    fn upstream_urls() {
        let u = parse_upstream_url("k", "https://origin.example.com").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "origin.example.com", 443)
        );
        let u = parse_upstream_url("k", "http://127.0.0.1:9000/").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 9000));
        let u = parse_upstream_url("k", "http://[::1]:9000").unwrap();
        assert_eq!(u.host, "::1");
        for bad in [
            "ftp://x",
            "http://",
            "http://x/path",
            "http://u@x",
            "127.0.0.1:9000",
        ] {
            assert!(parse_upstream_url("k", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_templates() {
        let t = PathTemplate::parse("/v/{o}/x/{v}.mp4").unwrap();
        assert_eq!(t.render("abc", "7"), "/v/abc/x/7.mp4");
        assert!(PathTemplate::parse("objects/{o}").is_err());
        assert!(PathTemplate::parse("/{x}").is_err());
        assert!(PathTemplate::parse("/{o}}").is_err());
        assert!(PathTemplate::parse("/static").is_err());
    }

    #[test]
    fn https_listener_needs_tls() {
        let text = MINIMAL.replace(
            "admin = \"127.0.0.1:9090\"",
            "admin = \"127.0.0.1:9090\"\nhttps = \"127.0.0.1:8443\"",
        );
        let err = Config::from_toml_with_env(&text, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen.https"), "{err}");
    }

    #[test]
    fn tls_cert_and_key_come_together_and_ca_file_stands_alone() {
        let with =
            |tls: &str| Config::from_toml_with_env(&format!("{MINIMAL}\n[tls]\n{tls}\n"), no_env);
        let err = with("cert = \"a.pem\"").unwrap_err().to_string();
        assert!(err.contains("tls.key"), "{err}");
        let err = with("key = \"a.key\"").unwrap_err().to_string();
        assert!(err.contains("tls.cert"), "{err}");
        let c = with("ca_file = \"ca.pem\"").unwrap();
        assert!(c.tls.server.is_none());
        assert_eq!(c.tls.ca_file.as_deref(), Some(Path::new("ca.pem")));
    }

    #[test]
    fn pinned_bytes_default_to_the_memory_tier_and_http_and_https_need_two_ports() {
        let c = Config::from_toml_with_env(MINIMAL, no_env).unwrap();
        assert_eq!(c.limits.max_pinned_bytes, DEFAULT_MEMORY_BYTES);
        let text = format!("{MINIMAL}\n[cache]\nmemory_bytes = 8388608\n");
        let c = Config::from_toml_with_env(&text, no_env).unwrap();
        assert_eq!(c.limits.max_pinned_bytes, 8 << 20);
        let text = format!("{MINIMAL}\n[limits]\nmax_pinned_bytes = 33554432\n");
        let c = Config::from_toml_with_env(&text, no_env).unwrap();
        assert_eq!(c.limits.max_pinned_bytes, 32 << 20);

        let text = MINIMAL.replace(
            "admin = \"127.0.0.1:9090\"",
            "admin = \"127.0.0.1:9090\"\nhttps = \"0.0.0.0:8080\"",
        );
        let text = format!("{text}\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n");
        let err = Config::from_toml_with_env(&text, no_env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listen.https") && err.contains("port"),
            "{err}"
        );
    }

    #[test]
    fn log_filters_quiet_rustls_unless_they_name_it() {
        assert_eq!(log_filter("info"), "info,rustls=error");
        assert_eq!(log_filter(" debug "), "debug,rustls=error");
        assert_eq!(log_filter(""), "rustls=error");
        assert_eq!(log_filter("info,rustls=warn"), "info,rustls=warn");
        for level in ["info", "warn,cdn_edge=debug", "trace"] {
            tracing_subscriber::EnvFilter::try_new(log_filter(level)).unwrap();
        }
    }

    #[test]
    fn limits_and_log_have_defaults_and_bounds() {
        let c = Config::from_toml_with_env(MINIMAL, no_env).unwrap();
        assert_eq!(c.limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.limits.request_timeout, Duration::from_secs(10));
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(c.log.access);
        for (section, bad, key) in [
            ("limits", "max_connections = 0", "limits.max_connections"),
            (
                "limits",
                "max_request_head_bytes = 100",
                "limits.max_request_head_bytes",
            ),
            (
                "limits",
                "request_timeout_ms = 0",
                "limits.request_timeout_ms",
            ),
            (
                "limits",
                "keepalive_requests = 0",
                "limits.keepalive_requests",
            ),
            (
                "limits",
                "max_connections_per_ip = 0",
                "limits.max_connections_per_ip",
            ),
            (
                "limits",
                "tls_handshake_timeout_ms = 0",
                "limits.tls_handshake_timeout_ms",
            ),
            (
                "limits",
                "send_rate_window_ms = 0",
                "limits.send_rate_window_ms",
            ),
            (
                "limits",
                "max_pinned_bytes = 1000",
                "limits.max_pinned_bytes",
            ),
            ("log", "level = \"info,=[\"", "log.level"),
            ("log", "format = \"xml\"", "log.format"),
        ] {
            let err =
                Config::from_toml_with_env(&format!("{MINIMAL}\n[{section}]\n{bad}\n"), no_env)
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn forward_retry_limits_have_defaults_and_bounds() {
        let forward = |extra: &str| {
            Config::from_toml_with_env(
                &format!("{MINIMAL}\n[forward]\nspool_dir = \"/tmp/s\"\n{extra}\n"),
                no_env,
            )
        };
        let f = forward("").unwrap().forward.unwrap();
        assert_eq!(f.retry.max_attempts, DEFAULT_FORWARD_MAX_ATTEMPTS);
        assert_eq!(
            f.retry.max_retry,
            Duration::from_secs(DEFAULT_FORWARD_MAX_RETRY_SECS)
        );
        let f = forward("max_attempts = 3\nmax_retry_secs = 60")
            .unwrap()
            .forward
            .unwrap();
        assert_eq!(
            (f.retry.max_attempts, f.retry.max_retry),
            (3, Duration::from_secs(60))
        );
        for (bad, key) in [
            ("max_attempts = 0", "forward.max_attempts"),
            ("max_retry_secs = 0", "forward.max_retry_secs"),
            ("max_retry_secs = 2592001", "forward.max_retry_secs"),
        ] {
            let err = forward(bad).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    fn site(extra: &str) -> Result<Config, ConfigError> {
        let text = MINIMAL.replace(
            "admin = \"127.0.0.1:9090\"",
            "admin = \"127.0.0.1:9090\"\npeer = \"0.0.0.0:7080\"",
        );
        Config::from_toml_with_env(
            &format!(
                "{text}\n[cluster]\nself = \"10.0.0.1:7080\"\npeers = [\"10.0.0.1:7080\", \"10.0.0.2:7080\"]\n{extra}"
            ),
            |v: &str| (v == "CLUSTER_SECRET").then(|| "from-env".to_string()),
        )
    }

    #[test]
    fn cluster_defaults_and_secrets() {
        let c = site("secret = \"s\"").unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.secret, b"s");
        assert_eq!(
            cluster.parent_secret, b"s",
            "parent_secret defaults to secret"
        );
        assert_eq!(cluster.health_check, Duration::from_millis(1000));
        assert_eq!(cluster.keep_non_owned, KeepNonOwned::Memory);
        assert_eq!(
            cluster.peer_timeout,
            c.origin.timeout + Duration::from_secs(5)
        );
        let c = site("secret_env = \"CLUSTER_SECRET\"\nparent_secret = \"p\"").unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.secret, b"from-env");
        assert_eq!(cluster.parent_secret, b"p");
        assert!(!format!("{cluster:?}").contains("from-env"));
    }

    #[test]
    fn cluster_mistakes_name_their_key() {
        let cases = [
            ("", "cluster.secret"),
            ("secret = \"\"", "cluster.secret"),
            ("secret_env = \"UNSET\"", "cluster.secret_env"),
            (
                "secret = \"s\"\nhealth_check_ms = 50",
                "cluster.health_check_ms",
            ),
            (
                "secret = \"s\"\npeer_timeout_ms = 0",
                "cluster.peer_timeout_ms",
            ),
            (
                "secret = \"s\"\nparents = [\"10.0.0.2:7080\"]",
                "cluster.parents",
            ),
            (
                "secret = \"s\"\nparents = [\"0.0.0.0:7080\"]",
                "cluster.parents[0]",
            ),
            (
                "secret = \"s\"\nkeep_non_owned = \"disk\"",
                "keep_non_owned",
            ),
        ];
        for (extra, key) in cases {
            let e = site(extra).unwrap_err().to_string();
            assert!(e.contains(key), "{extra:?}: {e}");
        }
        let not_member = MINIMAL.replace(
            "admin = \"127.0.0.1:9090\"",
            "admin = \"127.0.0.1:9090\"\npeer = \"10.0.0.9:7080\"",
        )
            + "[cluster]\nself = \"10.0.0.9:7080\"\npeers = [\"10.0.0.1:7080\"]\nsecret = \"s\"\n";
        let e = Config::from_toml(&not_member).unwrap_err().to_string();
        assert!(e.contains("cluster.self"), "{e}");
        let e = Config::from_toml(&(MINIMAL.to_string() + "[cluster]\nself = \"10.0.0.1:7080\"\npeers = [\"10.0.0.1:7080\"]\nsecret = \"s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs listen.peer"), "{e}");
        let e = Config::from_toml(&MINIMAL.replace(
            "admin = \"127.0.0.1:9090\"",
            "admin = \"127.0.0.1:9090\"\npeer = \"127.0.0.1:7080\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("listen.peer"), "{e}");
        let e = Config::from_toml(&MINIMAL.replace(
            "admin = \"127.0.0.1:9090\"",
            "admin = \"127.0.0.1:9090\"\npeer = \"127.0.0.1:9090\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("port of its own"), "{e}");
    }

    #[test]
    fn origin_mode_and_redirect_url() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.origin.mode, OriginMode::Pull);
        assert_eq!(c.origin.redirect_url, None);
        let with = |lines: &str| {
            Config::from_toml(&MINIMAL.replace(
                "urls = [\"http://127.0.0.1:9000\"]",
                &format!("urls = [\"http://127.0.0.1:9000\"]\n{lines}"),
            ))
        };
        let c = with("mode = \"directed\"\nredirect_url = \"https://fill.example/cdn/\"").unwrap();
        assert_eq!(c.origin.mode, OriginMode::Directed);
        assert_eq!(
            c.origin.redirect_url.as_deref(),
            Some("https://fill.example/cdn")
        );
        for bad in ["ftp://x", "https://x/?a=b", "https://", "https:///p"] {
            let e = with(&format!("redirect_url = {bad:?}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("origin.redirect_url"), "{bad}: {e}");
        }
        assert!(with("mode = \"push\"").is_err());
    }
}
