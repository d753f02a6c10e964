//! The public listener's HTTP application: read a request, route it to its handler,
//! answer it, account for it. Every route is answered by the edge itself; nothing is
//! proxied blindly, so Pingora's proxy state machine (and the 13 KB future it moves per
//! request) is not used: the edge is a plain [`HttpServerApp`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::Method;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorSource, ErrorType};
use thread_local::ThreadLocal;
use tokio::sync::Notify;

use crate::access_log;
use crate::app::AppState;
use crate::config::{Limits, Log, LogFormat};
use crate::dictionary;
use crate::proxies::TrustedProxies;
use crate::respond;
use crate::routes::Route;
use crate::session::{RequestCtx, Session};
use crate::video;

/// Longest path written to the access log; longer ones are cut.
const MAX_LOGGED_PATH: usize = 512;

/// The edge's public HTTP application.
pub struct Edge {
    state: Arc<AppState>,
    /// Largest request head (request line and headers) accepted, in bytes.
    max_head_bytes: usize,
    /// The access log's format, when it is on.
    access_log: Option<LogFormat>,
    options: HttpServerOptions,
    /// Set when the service starts shutting down; idle keep-alive connections waiting
    /// for their next request are woken through `shutdown` and closed. One `Notify` per
    /// worker thread: every request waits on it, and a shared one would be a lock that
    /// all threads take.
    shutting_down: AtomicBool,
    shutdown: ThreadLocal<Notify>,
}

impl Edge {
    pub fn new(
        state: Arc<AppState>,
        limits: &Limits,
        log: &Log,
        options: HttpServerOptions,
    ) -> Self {
        Self {
            state,
            max_head_bytes: limits.max_request_head_bytes,
            access_log: log.access.then_some(log.format),
            options,
            shutting_down: AtomicBool::new(false),
            shutdown: ThreadLocal::new(),
        }
    }

    async fn shutdown_started(&self) {
        // Created before the flag is read: a `notify_waiters` after this point wakes it.
        let notified = self.shutdown.get_or_default().notified();
        if self.shutting_down.load(Ordering::Acquire) {
            return;
        }
        notified.await
    }

    /// Answers one request; returns the body bytes written.
    async fn answer(&self, session: &mut Session, route: Route) -> pingora::Result<u64> {
        if request_head_bytes(session) > self.max_head_bytes {
            return respond::plain(session, 431, "request header fields too large").await;
        }
        match route {
            Route::Range | Route::Object => video::serve(&self.state, session, route).await,
            Route::NotFound => respond::plain(session, 404, "not found").await,
            Route::Dictionary => dictionary::serve(&self.state, session).await,
            // Boxed: the video and dictionary routes do not carry its size.
            Route::Event | Route::LogBlob | Route::Stats => match &self.state.forwarder {
                Some(slot) => match slot.get() {
                    Some(f) => Box::pin(f.serve(session, route, &self.state.proxies)).await,
                    None => {
                        Box::pin(crate::forward::not_open(
                            session,
                            &self.state.metrics,
                            route,
                        ))
                        .await
                    }
                },
                None => respond::plain(session, 404, "not configured on this edge").await,
            },
        }
    }

    /// Metrics and the access log line for a finished request.
    fn account(&self, session: &Session, error: Option<&Error>, ctx: &RequestCtx) {
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
            log_access(session, &self.state.proxies, ctx, status, error, format);
        }
    }
}

#[async_trait]
impl HttpServerApp for Edge {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: Session,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let read = tokio::select! {
            // Biased: a request already buffered is read, not dropped, at shutdown.
            biased;
            read = session.read_request() => read,
            _ = self.shutdown_started() => return None,
        };
        match read {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                    tracing::debug!(error = %e, "malformed request");
                    // The connection is closed right after; a failed write changes nothing.
                    let _ = session.respond_error(400).await;
                }
                session.shutdown().await;
                return None;
            }
        }
        // CONNECT changes how the message is framed; the edge tunnels nothing.
        if session.req_header().method == Method::CONNECT {
            let _ = session.respond_error(405).await;
            session.shutdown().await;
            return None;
        }
        if *shutdown.borrow() {
            // Answer this request, then close: the process is about to stop.
            session.set_keepalive(None);
        }
        let route = self.state.router.route(session.req_header().uri.path());
        let mut ctx = RequestCtx {
            route,
            started: Instant::now(),
            body_bytes: 0,
        };
        match self.answer(&mut session, route).await {
            Ok(bytes) => {
                ctx.body_bytes = bytes;
                self.account(&session, None, &ctx);
                let settings = HttpPersistentSettings::for_session(&session);
                let reusable = session.finish().await.ok().flatten()?;
                Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
            }
            Err(e) => {
                if session.response_written().is_none() {
                    if let Some(status) = error_status(&e) {
                        // The connection is closed right after; a failed write changes nothing.
                        let _ = session.respond_error(status).await;
                    }
                }
                self.account(&session, Some(&e), &ctx);
                // A response cut short, or a client that failed: never reused.
                session.shutdown().await;
                None
            }
        }
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    async fn http_cleanup(&self) {
        self.shutting_down.store(true, Ordering::Release);
        for notify in self.shutdown.iter() {
            notify.notify_waiters();
        }
    }
}

/// The status sent for a handler error that came before any response header; `None`
/// when the client's connection itself failed and nothing can be sent.
fn error_status(e: &Error) -> Option<u16> {
    match (e.etype(), e.esource()) {
        (ErrorType::HTTPStatus(code), _) => Some(*code),
        (_, ErrorSource::Upstream) => Some(502),
        (
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
            ErrorSource::Downstream,
        ) => None,
        (_, ErrorSource::Downstream) => Some(400),
        _ => Some(500),
    }
}

/// One access-log line. The query string is never logged: it carries the signature
/// (`sc`) and the client token (`t`).
fn log_access(
    session: &Session,
    proxies: &TrustedProxies,
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
    // The real client, behind trusted proxies; an address is at most 45 characters.
    let mut client = [0u8; 48];
    let client = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .and_then(|a| {
            let ip = proxies.client_ip_for(a.ip(), &req.headers);
            let mut w = &mut client[..];
            std::io::Write::write_fmt(&mut w, format_args!("{ip}")).ok()?;
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
