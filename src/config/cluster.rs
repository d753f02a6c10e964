//! `[cluster]`, `listen.peer` and `origin.mode`: a site of several edges and its parent
//! tier (SPEC 6).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, parse_addr, ConfigError};

/// Default time between health checks of each peer and parent.
pub const DEFAULT_HEALTH_CHECK_MS: u64 = 1_000;
/// Shortest and longest accepted `cluster.health_check_ms`.
const HEALTH_CHECK_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=60_000;

/// What a node keeps of a slice it fetched from the slice's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeepNonOwned {
    /// The memory tier only (never the disk tier): hot slices are served locally.
    #[default]
    Memory,
    /// Nothing: every request for it asks the owner again.
    None,
}

/// How a client's miss is filled (`origin.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OriginMode {
    /// From the owner, the parent tier or the origin.
    #[default]
    Pull,
    /// Only from what the site holds; otherwise 302 to `origin.redirect_url` or 404.
    Directed,
}

/// `[cluster]`, validated.
#[derive(Clone)]
pub struct Cluster {
    /// This node's peer listener as written in `peers`.
    pub self_addr: SocketAddr,
    /// The site, this node included.
    pub peers: Vec<SocketAddr>,
    /// The parent tier's peer listeners.
    pub parents: Vec<SocketAddr>,
    pub secret: Vec<u8>,
    /// Authenticates this node's requests to its parents.
    pub parent_secret: Vec<u8>,
    pub health_check: Duration,
    pub keep_non_owned: KeepNonOwned,
    /// Time budget of one request to a peer or parent, which may itself fill from
    /// upstream: `cluster.peer_timeout_ms`, default the origin timeout plus 5 s.
    pub peer_timeout: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("self_addr", &self.self_addr)
            .field("peers", &self.peers)
            .field("parents", &self.parents)
            .field("secret", &"<redacted>")
            .field("health_check", &self.health_check)
            .field("keep_non_owned", &self.keep_non_owned)
            .field("peer_timeout", &self.peer_timeout)
            .finish()
    }
}

/// The serde mirror of `[cluster]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    #[serde(rename = "self")]
    pub self_addr: String,
    pub peers: Vec<String>,
    #[serde(default)]
    pub parents: Vec<String>,
    pub secret: Option<String>,
    pub secret_env: Option<String>,
    #[serde(default)]
    pub parent_secret: String,
    pub parent_secret_env: Option<String>,
    #[serde(default = "default_health_check")]
    pub health_check_ms: u64,
    #[serde(default)]
    pub keep_non_owned: KeepNonOwned,
    pub peer_timeout_ms: Option<u64>,
}

fn default_health_check() -> u64 {
    DEFAULT_HEALTH_CHECK_MS
}

/// Validates `[cluster]` against `listen.peer` (required with it, and only with it).
pub fn validate(
    raw: Option<RawCluster>,
    peer_listener: Option<SocketAddr>,
    origin_timeout: Duration,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Cluster>, ConfigError> {
    let raw = match (raw, peer_listener) {
        (None, None) => return Ok(None),
        (None, Some(_)) => {
            return Err(invalid(
                "listen.peer",
                "needs a [cluster] section (the site it serves)",
            ))
        }
        (Some(_), None) => {
            return Err(invalid(
                "cluster",
                "needs listen.peer (the address peers and child sites fill from)",
            ))
        }
        (Some(raw), Some(_)) => raw,
    };
    let listener = peer_listener.expect("checked above");
    let self_addr = parse_addr("cluster.self", &raw.self_addr)?;
    let peers = addr_list("cluster.peers", &raw.peers)?;
    let parents = addr_list("cluster.parents", &raw.parents)?;
    if peers.is_empty() {
        return Err(invalid(
            "cluster.peers",
            "lists the whole site, this node included: at least one address",
        ));
    }
    if !peers.contains(&self_addr) {
        return Err(invalid(
            "cluster.self",
            format!("{self_addr} is not in cluster.peers (every node lists the whole site, itself included)"),
        ));
    }
    if listener.ip().is_unspecified() {
        if listener.port() != self_addr.port() {
            return Err(invalid(
                "cluster.self",
                format!("must have listen.peer's port {}", listener.port()),
            ));
        }
    } else if listener != self_addr {
        return Err(invalid(
            "cluster.self",
            format!("must be listen.peer ({listener}) as the other nodes reach it"),
        ));
    }
    if let Some(p) = parents.iter().find(|p| peers.contains(p)) {
        return Err(invalid(
            "cluster.parents",
            format!("{p} is also in cluster.peers: a parent belongs to another site"),
        ));
    }
    let secret = read_secret(
        "cluster.secret",
        raw.secret.as_deref(),
        raw.secret_env.as_deref(),
        env,
    )?
    .ok_or_else(|| invalid("cluster.secret", "secret or secret_env is required"))?;
    let parent_secret = match read_secret(
        "cluster.parent_secret",
        Some(raw.parent_secret.as_str()).filter(|s| !s.is_empty()),
        raw.parent_secret_env.as_deref(),
        env,
    )? {
        Some(s) => s,
        None => secret.clone(),
    };
    if !HEALTH_CHECK_RANGE_MS.contains(&raw.health_check_ms) {
        return Err(invalid(
            "cluster.health_check_ms",
            format!(
                "must be between {} and {}",
                HEALTH_CHECK_RANGE_MS.start(),
                HEALTH_CHECK_RANGE_MS.end()
            ),
        ));
    }
    let peer_timeout = match raw.peer_timeout_ms {
        Some(0) => return Err(invalid("cluster.peer_timeout_ms", "must be greater than 0")),
        Some(ms) => Duration::from_millis(ms),
        None => origin_timeout + Duration::from_secs(5),
    };
    Ok(Some(Cluster {
        self_addr,
        peers,
        parents,
        secret,
        parent_secret,
        health_check: Duration::from_millis(raw.health_check_ms),
        keep_non_owned: raw.keep_non_owned,
        peer_timeout,
    }))
}

fn addr_list(key: &str, list: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let addr = parse_addr(&at, s)?;
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(invalid(
                at,
                "must be the address other nodes reach it at (not 0.0.0.0, not port 0)",
            ));
        }
        if out.contains(&addr) {
            return Err(invalid(at, format!("{addr} is listed twice")));
        }
        out.push(addr);
    }
    Ok(out)
}

fn read_secret(
    key: &str,
    value: Option<&str>,
    var: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Vec<u8>>, ConfigError> {
    let s = match (value, var) {
        (Some(_), Some(_)) => {
            return Err(invalid(key, "set either the secret or its _env, not both"))
        }
        (Some(s), None) => s.to_string(),
        (None, Some(var)) => env(var).ok_or_else(|| {
            invalid(
                format!("{key}_env"),
                format!("environment variable {var} is not set"),
            )
        })?,
        (None, None) => return Ok(None),
    };
    if s.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    Ok(Some(s.into_bytes()))
}
