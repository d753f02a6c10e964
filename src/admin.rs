//! The admin listener (SPEC §3, §7): `/metrics`, `/healthz`, `/status`, open; `/purge`,
//! `/fill`, `/fill/{id}` and `/drain`, behind the admin token. Never on the public
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
use crate::ops::{self, reply, Reply};
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

/// `/status` (SPEC 3, 6.2, 7).
#[derive(Serialize)]
pub struct Status {
    version: &'static str,
    uptime_secs: u64,
    /// Taken out of rotation (`POST /drain`): `/healthz` answers 503.
    draining: bool,
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
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        let read_only = method == Method::GET || method == Method::HEAD;
        match path.as_str() {
            "/metrics" | "/healthz" | "/status" if !read_only => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"method not allowed\n".to_vec(),
            ),
            "/metrics" => {
                self.state.sync_caches().await;
                self.state.refresh_gauges();
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.state.metrics.encode(),
                )
            }
            "/healthz" if self.state.drain.is_draining() => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                b"draining\n".to_vec(),
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/status" => {
                let body =
                    serde_json::to_vec_pretty(&self.status().await).expect("status serialises");
                reply(StatusCode::OK, "application/json", body)
            }
            "/purge" | "/fill" | "/drain" => {
                Box::pin(self.operation(session, &method, &path)).await
            }
            p if p.starts_with("/fill/") => Box::pin(self.operation(session, &method, &path)).await,
            _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}

impl AdminApp {
    /// The node's status document (`/status`, and the control-plane report).
    pub async fn status(&self) -> Status {
        status(&self.state).await
    }

    /// A mutating endpoint: the token first, then the method.
    async fn operation(&self, session: &mut ServerSession, method: &Method, path: &str) -> Reply {
        let authorization = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if let Err(why) = ops::authorize(self.state.admin_token.as_deref(), authorization) {
            return ops::refused(why);
        }
        let state = &self.state;
        match (method, path) {
            (&Method::POST, "/purge") => ops::purge::handle(state, session).await,
            (&Method::POST, "/fill") => ops::fill::submit(state, session).await,
            (&Method::GET, p) if p.starts_with("/fill/") => {
                ops::fill::show(state, &p["/fill/".len()..]).await
            }
            (&Method::POST, "/drain") | (&Method::DELETE, "/drain") => {
                let on = *method == Method::POST;
                match state.drain.set(on).await {
                    Ok(()) => ops::json(StatusCode::OK, &serde_json::json!({ "draining": on })),
                    Err(e) => ops::error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!(
                            "draining is {on} now, but could not be recorded for an upgrade: {e}"
                        ),
                    ),
                }
            }
            (_, "/drain") => allow("POST, DELETE"),
            (_, "/purge" | "/fill") => allow("POST"),
            _ => allow("GET"),
        }
    }
}

fn allow(methods: &'static str) -> Reply {
    let mut r = ops::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static(methods));
    r
}

/// The node's status document.
pub async fn status(state: &AppState) -> Status {
    state.sync_caches().await;
    let (peers, parents) = state.site.as_ref().map(|s| s.states()).unwrap_or_default();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: state.started.elapsed().as_secs(),
        draining: state.drain.is_draining(),
        cache: CacheStatus {
            slice_bytes: state.store.slice_bytes(),
            memory_capacity_bytes: state.memory_capacity,
            stats: state.store.stats(),
        },
        spool: state.forwarder.as_ref().map(|slot| {
            let open = slot.get();
            SpoolStatus {
                state: slot.state(),
                path: open.map(|f| f.spool.path().display().to_string()),
                events: open.map(|f| f.spool.depth(Queue::Events)),
                logblob: open.map(|f| f.spool.depth(Queue::LogBlob)),
            }
        }),
        dictionary: state.dictionary.as_ref().map(|d| d.stats()),
        origins: state.origin.health(),
        peers,
        parents,
    }
}
