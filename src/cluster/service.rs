//! The peer listener (`listen.peer`): answers slice requests from the site's other nodes
//! and from child sites, health checks, and purges ([`super::purge`]). Paths and
//! authentication are in docs/site.md; they are the project's own, not part of the
//! public contract.
//!
//! A sibling's request is answered as the slice's owner: from cache, else from the
//! parent tier or the origin, never from another node of the site. A child site's
//! request is treated like a client's miss in this site. In directed mode neither is
//! filled from upstream.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::{header, HeaderMap, HeaderValue, Method};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::server::ShutdownWatch;

use super::auth::{self, Claim, Denied, Kind};
use super::client::{RESULT, SLICE_PATH, VALIDATOR};
use super::health::HEALTH_PATH;
use super::metrics::Served;
use super::purge;
use super::site::{Site, MAX_HOPS};
use crate::app::AppState;
use crate::cache::{ObjectRef, Source, Via};
use crate::origin::OriginError;
use crate::range::{slice_bounds, slice_len};
use crate::respond;
use crate::session::Session;

/// The peer listener's application.
pub struct PeerApp {
    state: Arc<AppState>,
    site: Arc<Site>,
    options: HttpServerOptions,
}

impl PeerApp {
    pub fn new(state: Arc<AppState>, site: Arc<Site>) -> Self {
        Self {
            state,
            site,
            options: HttpServerOptions::default(),
        }
    }

    async fn answer(&self, session: &mut Session) -> pingora::Result<()> {
        let path = session.req_header().uri.path();
        if path == HEALTH_PATH {
            respond::plain(session, 200, "ok").await?;
            return Ok(());
        }
        if path == purge::PURGE_PATH || path == purge::LOG_PATH {
            return purge::answer(&self.state, &self.site, session).await;
        }
        if path != SLICE_PATH {
            respond::plain(session, 404, "not found").await?;
            return Ok(());
        }
        if session.req_header().method != Method::GET {
            respond::method_not_allowed(session, "GET").await?;
            return Ok(());
        }
        let req = match SliceRequest::parse(session.req_header()) {
            Some(r) => r,
            None => return self.deny(session, Denied::Malformed).await,
        };
        let claim = req.claim(self.site.me);
        if let Err(why) = auth::check(
            &claim,
            req.auth(),
            self.site.secret(),
            self.site.me,
            unix_now(),
        ) {
            return self.deny(session, why).await;
        }
        if req.hops > MAX_HOPS {
            self.site.metrics.record_served(Served::Denied);
            respond::plain(session, 508, "loop detected: too many tiers").await?;
            return Ok(());
        }
        self.serve_slice(session, &req).await
    }

    async fn deny(&self, session: &mut Session, why: Denied) -> pingora::Result<()> {
        self.site.metrics.record_served(Served::Denied);
        tracing::warn!(client = ?session.client_addr().map(ToString::to_string), reason = %why, "peer request refused");
        respond::plain(session, 403, &format!("forbidden: {why}")).await?;
        Ok(())
    }

    async fn serve_slice(&self, session: &mut Session, req: &SliceRequest) -> pingora::Result<()> {
        let via = Via {
            sibling: req.kind == Kind::Sibling,
            hops: req.hops,
            fill: false,
        };
        let obj = ObjectRef::asked(&req.o, &req.v, via);
        let store = &self.state.store;
        let lookup = match store.meta(&obj, req.index, None).await {
            Ok(l) => l,
            Err(e) => return self.failed(session, &e).await,
        };
        let meta = lookup.meta.clone();
        let slice_bytes = store.slice_bytes();
        let range = slice_bounds(req.index, slice_bytes);
        if range.start >= meta.size {
            self.site.metrics.record_served(Served::NotFound);
            let content_range = format!("bytes */{}", meta.size);
            respond::plain_with(session, 416, "range not satisfiable", |r| {
                r.insert_header(header::CONTENT_RANGE, content_range)
                    .map(|_| ())
            })
            .await?;
            return Ok(());
        }
        let (bytes, fetched) = match lookup.slice {
            Some((index, bytes)) if index == req.index => (bytes, lookup.fetched),
            _ => match store.slice(&obj, req.index, &meta).await {
                Ok(s) => (
                    s.bytes,
                    lookup.fetched || !matches!(s.source, Source::Memory | Source::Disk),
                ),
                Err(e) => return self.failed(session, &e).await,
            },
        };
        let len = slice_len(req.index, slice_bytes, meta.size);
        if bytes.len() as u64 != len {
            self.site.metrics.record_served(Served::Error);
            respond::plain(session, 502, "inconsistent slice").await?;
            return Ok(());
        }
        let end = range.start + len - 1;
        let mut h = HeaderMap::with_capacity(6);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {}-{end}/{}", range.start, meta.size))
                .expect("digits and punctuation"),
        );
        if meta.content_type_known() {
            h.insert(header::CONTENT_TYPE, meta.content_type.clone());
        }
        if let Some(v) = meta
            .validator()
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        {
            h.insert(VALIDATOR, v);
        }
        session
            .write_response_header(Box::new(respond::head(206, h)?))
            .await?;
        session.write_response_body(bytes, true).await?;
        self.site.metrics.bytes_sent.inc_by(len);
        self.site
            .metrics
            .record_served(if fetched { Served::Fill } else { Served::Hit });
        Ok(())
    }

    /// The answer for a slice that could not be had, marked so the asking node can tell
    /// an answer about the object from a failure of this node.
    async fn failed(&self, session: &mut Session, e: &OriginError) -> pingora::Result<()> {
        let (status, result, served) = match e {
            OriginError::NotFound { .. } | OriginError::RememberedNotFound => {
                (404, "missing", Served::NotFound)
            }
            OriginError::NotHeld => (404, "not-held", Served::NotHeld),
            e => (
                if e.status() == 504 { 504 } else { 502 },
                "origin-error",
                Served::Error,
            ),
        };
        self.site.metrics.record_served(served);
        respond::plain_with(session, status, &e.to_string(), |r| {
            r.insert_header(RESULT, result).map(|_| ())
        })
        .await?;
        Ok(())
    }
}

/// A parsed slice request: `?o=&v=&i=` and the authentication headers. Public, with
/// [`SliceRequest::parse`], [`SliceRequest::claim`] and [`SliceRequest::auth`], for the
/// fuzz target `peer_request` (fuzz/, docs/reliability.md).
pub struct SliceRequest {
    o: String,
    v: String,
    index: u64,
    kind: Kind,
    from: std::net::SocketAddr,
    time: u64,
    hops: u8,
    auth: String,
}

impl SliceRequest {
    /// The request's query and authentication headers, or `None` if any is missing or
    /// malformed (a 403).
    pub fn parse(req: &pingora::http::RequestHeader) -> Option<Self> {
        let (mut o, mut v, mut index) = (None, None, None);
        for pair in req.uri.query()?.split('&') {
            match pair.split_once('=')? {
                ("o", x) if crate::auth::is_valid_id(x) => o = Some(x.to_string()),
                ("v", x) if crate::auth::is_valid_id(x) => v = Some(x.to_string()),
                ("i", x) => index = Some(x.parse().ok()?),
                _ => return None,
            }
        }
        let text = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        Some(Self {
            o: o?,
            v: v?,
            index: index?,
            kind: Kind::parse(text(auth::KIND)?)
                .filter(|k| matches!(k, Kind::Sibling | Kind::Child))?,
            from: text(auth::FROM)?.parse().ok()?,
            time: text(auth::TIME)?.parse().ok()?,
            hops: text(auth::HOPS)?.parse().ok()?,
            auth: text(auth::AUTH)?.to_string(),
        })
    }

    /// The claim as this node (`me`) received it; signed for another node, it fails.
    pub fn claim(&self, me: std::net::SocketAddr) -> Claim<'_> {
        Claim {
            kind: self.kind,
            from: self.from,
            to: me,
            o: &self.o,
            v: &self.v,
            index: self.index,
            hops: self.hops,
            time: self.time,
        }
    }

    /// The request's HMAC, as sent (hex).
    pub fn auth(&self) -> &str {
        &self.auth
    }
}

#[async_trait]
impl HttpServerApp for PeerApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: Session,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let mut watch = shutdown.clone();
        let read = tokio::select! {
            biased;
            read = session.read_request() => read,
            _ = watch.changed() => return None,
        };
        match read {
            Ok(true) => {}
            Ok(false) => return None,
            Err(_) => {
                let _ = session.respond_error(400).await;
                session.shutdown().await;
                return None;
            }
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        match self.answer(&mut session).await {
            Ok(()) => {
                let settings = HttpPersistentSettings::for_session(&session);
                let reusable = session.finish().await.ok().flatten()?;
                Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
            }
            Err(e) => {
                tracing::debug!(error = %e, "peer request ended with an error");
                session.shutdown().await;
                None
            }
        }
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
