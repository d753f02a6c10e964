//! The admin listener (SPEC §3): `/metrics`, `/healthz`, `/status`. Never on the public
//! listener.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Serialize;

use crate::app::AppState;
use crate::cache::CacheStats;
use crate::cluster::ring::MemberState;
use crate::dictionary::store::DictionaryStats;
use crate::forward::opening::SpoolState;
use crate::forward::spool::{Depth, Queue};
use crate::origin::OriginHealth;

/// Answers admin requests from the shared state.
pub struct AdminApp {
    state: Arc<AppState>,
}

impl AdminApp {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

#[derive(Serialize)]
struct Status {
    version: &'static str,
    uptime_secs: u64,
    cache: CacheStatus,
    /// Durable forwarding spool; `null` without a `[forward]` section.
    spool: Option<SpoolStatus>,
    /// `null` without a `[dictionary]` section.
    dictionary: Option<DictionaryStats>,
    origins: Vec<OriginHealth>,
    /// The site's nodes, this one included (always healthy in its own view); empty
    /// without `[cluster]`.
    peers: Vec<MemberState>,
    /// The parent tier's nodes; empty without `cluster.parents`.
    parents: Vec<MemberState>,
}

#[derive(Serialize)]
struct SpoolStatus {
    state: SpoolState,
    /// `null` until the spool is open.
    path: Option<String>,
    events: Option<Depth>,
    logblob: Option<Depth>,
}

#[derive(Serialize)]
struct CacheStatus {
    slice_bytes: u64,
    memory_capacity_bytes: u64,
    #[serde(flatten)]
    stats: CacheStats,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != Method::GET && req.method != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"method not allowed\n".to_vec(),
            );
        }
        match req.uri.path() {
            "/metrics" => {
                self.state.sync_caches().await;
                self.state.refresh_gauges();
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.state.metrics.encode(),
                )
            }
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/status" => {
                self.state.sync_caches().await;
                let (peers, parents) = self
                    .state
                    .site
                    .as_ref()
                    .map(|s| s.states())
                    .unwrap_or_default();
                let status = Status {
                    version: env!("CARGO_PKG_VERSION"),
                    uptime_secs: self.state.started.elapsed().as_secs(),
                    cache: CacheStatus {
                        slice_bytes: self.state.store.slice_bytes(),
                        memory_capacity_bytes: self.state.memory_capacity,
                        stats: self.state.store.stats(),
                    },
                    spool: self.state.forwarder.as_ref().map(|slot| {
                        let open = slot.get();
                        SpoolStatus {
                            state: slot.state(),
                            path: open.map(|f| f.spool.path().display().to_string()),
                            events: open.map(|f| f.spool.depth(Queue::Events)),
                            logblob: open.map(|f| f.spool.depth(Queue::LogBlob)),
                        }
                    }),
                    dictionary: self.state.dictionary.as_ref().map(|d| d.stats()),
                    origins: self.state.origin.health(),
                    peers,
                    parents,
                };
                let body = serde_json::to_vec_pretty(&status).expect("status serialises");
                reply(StatusCode::OK, "application/json", body)
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static parts are valid")
}
