//! The public listener's `ProxyHttp` implementation: route → handler, and metrics in
//! `logging`. Every route is answered from `request_filter`; nothing is proxied blindly.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::modules::http::HttpModules;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use crate::access_log;
use crate::app::AppState;
use crate::config::{Limits, Log, LogFormat};
use crate::dictionary;
use crate::respond;
use crate::routes::Route;
use crate::video;

/// Longest path written to the access log; longer ones are cut.
const MAX_LOGGED_PATH: usize = 512;

/// Per-request context: filled in by the handler, read by `logging`.
pub struct RequestCtx {
    pub route: Route,
    pub started: Instant,
    /// Body bytes written to the client.
    pub body_bytes: u64,
}

/// The edge's proxy application.
pub struct Edge {
    state: Arc<AppState>,
    /// Largest request head (request line and headers) accepted, in bytes.
    max_head_bytes: usize,
    /// The access log's format, when it is on.
    access_log: Option<LogFormat>,
}

impl Edge {
    pub fn new(state: Arc<AppState>, limits: &Limits, log: &Log) -> Self {
        Self {
            state,
            max_head_bytes: limits.max_request_head_bytes,
            access_log: log.access.then_some(log.format),
        }
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            route: Route::NotFound,
            started: Instant::now(),
            body_bytes: 0,
        }
    }

    /// No downstream modules: video must never be compressed, and the rest is small.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.route = self.state.router.route(session.req_header().uri.path());
        if request_head_bytes(session) > self.max_head_bytes {
            ctx.body_bytes =
                respond::plain(session, 431, "request header fields too large").await?;
            return Ok(true);
        }
        ctx.body_bytes = match ctx.route {
            Route::Range | Route::Object => video::serve(&self.state, session, ctx.route).await?,
            Route::NotFound => respond::plain(session, 404, "not found").await?,
            Route::Dictionary => dictionary::serve(&self.state, session).await?,
            // Boxed: the video and dictionary routes do not carry its size.
            Route::Event | Route::LogBlob | Route::Stats => match &self.state.forwarder {
                Some(f) => Box::pin(f.serve(session, ctx.route)).await?,
                None => respond::plain(session, 404, "not configured on this edge").await?,
            },
        };
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        // request_filter answers every request; reaching here is a bug, not a 502.
        Error::e_explain(ErrorType::InternalError, "no upstream for this route")
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let m = &self.state.metrics;
        m.record_request(ctx.route, status);
        let rm = m.route(ctx.route);
        rm.duration.observe(ctx.started.elapsed().as_secs_f64());
        rm.body_bytes.inc_by(ctx.body_bytes);
        if let Some(e) = error {
            tracing::debug!(route = ctx.route.label(), status, error = %e, "request ended with an error");
        }
        if let Some(format) = self.access_log {
            log_access(session, ctx, status, error, format);
        }
    }
}

/// One access-log line. The query string is never logged: it carries the signature
/// (`sc`) and the client token (`t`).
fn log_access(
    session: &Session,
    ctx: &RequestCtx,
    status: u16,
    error: Option<&Error>,
    format: LogFormat,
) {
    // The level filter (`[log] level`, `CDN_EDGE_LOG`) applies as to any `info` line.
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    let req = session.req_header();
    let path = req.uri.path();
    let path = match path.char_indices().nth(MAX_LOGGED_PATH) {
        Some((cut, _)) => &path[..cut],
        None => path,
    };
    let cache = session
        .response_written()
        .and_then(|r| r.headers.get("cache-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("cdn-edge; "))
        .unwrap_or("");
    let range = req
        .headers
        .get(http::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .unwrap_or("");
    let mut client = [0u8; 48];
    let client = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .and_then(|a| {
            let mut w = &mut client[..];
            std::io::Write::write_fmt(&mut w, format_args!("{}", a.ip())).ok()?;
            let left = w.len();
            std::str::from_utf8(&client[..client.len() - left]).ok()
        })
        .unwrap_or("");
    access_log::write(
        &access_log::Entry {
            client,
            method: req.method.as_str(),
            path,
            route: ctx.route.label(),
            status,
            bytes: ctx.body_bytes,
            duration_ms: ctx.started.elapsed().as_secs_f64() * 1e3,
            cache,
            range,
            proto: if session.is_http2() { "h2" } else { "http/1.1" },
            tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
            error: error.map(|e| e.etype().as_str()).unwrap_or(""),
        },
        format,
    );
}

/// Approximate size of the request head as received.
fn request_head_bytes(session: &Session) -> usize {
    let req = session.req_header();
    let line = req.uri.path_and_query().map_or(1, |pq| pq.as_str().len()) + 16;
    req.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}
