//! cdn-edge: an edge CDN node for video services on Pingora.
//!
//! A request flows `edge` (route) → `auth` (signature) → `range` (what bytes) →
//! `cache` (memory tier, coalesced fills) → `origin` (slice fetch, failover) and back.

pub mod access_log; // one line per request, JSON or text, never the query
pub mod admin; // /metrics, /healthz, /status, and the content operations on the admin listener
pub mod admin_client; // the admin commands: one request to a running edge's admin listener
pub mod app; // process-wide shared state built from config
pub mod auth; // signed-URL verification and signing (pure)
pub mod cache; // slice cache tiers and coalesced fills
pub mod cluster; // a site of several edges: ring, peer client and listener, health
pub mod conditional; // If-Match, If-None-Match, If-Range on the video routes (pure)
pub mod config; // typed, validated configuration
pub mod connection; // client connection cap, request and idle deadlines
pub mod cors; // CORS allow-list and preflight constants
pub mod demo; // `cdn-edge demo`: sample origin and instructions
pub mod demo_dictionary; // the demo's sample dictionary upstream
pub mod demo_sink; // the demo's event sink
pub mod demo_site; // `cdn-edge demo --nodes N`: a site of N edges as child processes
pub mod dictionary; // dictionary lookup cache
pub mod edge; // the public HTTP app: route → handler, metrics, access log
pub mod forward; // events, log blobs and stats: relay, durable spool, delivery
pub mod metrics; // every metric, registered once
pub mod ops; // content operations on the admin listener: purge, fill, drain, control report
pub mod origin; // origin client: slice fetch, validation, failover
pub mod pinned; // bytes of slices held by video responses, and their budget
pub mod proxies; // trusted proxies: the X-Forwarded-For sent upstream, the real client's address (pure)
pub mod range; // range parsing and slice arithmetic (pure)
pub mod redb_file; // opening the redb stores of the spool and the fill jobs
pub mod respond; // small complete responses (errors, 404, 416)
pub mod routes; // routing by path (pure)
pub mod server; // Pingora server and services from config
pub mod session; // the client session and request context handlers are given
pub mod sources; // where a miss is filled from: owner peer, parent tier, origin
pub mod systemd; // sd_notify readiness for Type=notify units
pub mod tls; // TLS files checked at start, HTTPS listener settings
pub mod upstream; // upstream resolution and whole-body exchanges
pub mod video; // the signed video routes
