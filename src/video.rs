//! The video routes (SPEC §2.2): `/range/{start}-{end}` and `/` with a `Range` header.
//!
//! Order of work: signature → method → range syntax → object metadata → first slice →
//! response header → the rest of the slices, each written while the next is fetched.
//! The first slice is fetched before the header so an origin failure is still a clean
//! 502/504; a failure after that cuts the response short. If the object's metadata is
//! replaced before the header is out (an origin answer contradicted it), the work from
//! the metadata on is done once more under the new metadata.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType};

use crate::app::AppState;
use crate::auth::AuthFailure;
use crate::cache::{ObjectMeta, ObjectRef, Slice, Source};
use crate::conditional::{self, Decision};
use crate::metrics::Refusal;
use crate::origin::OriginError;
use crate::range::{
    parse_range_header, parse_range_path, resolve_range_path, slice_len, slice_pieces, ByteRange,
    RangeSpec, SlicePiece,
};
use crate::respond;
use crate::routes::{Route, RANGE_PREFIX};
use crate::session::Session;

const CACHE_HIT: HeaderValue = HeaderValue::from_static("cdn-edge; hit");
const CACHE_MISS: HeaderValue = HeaderValue::from_static("cdn-edge; fwd=miss");
const CACHE_PEER: HeaderValue = HeaderValue::from_static("cdn-edge; fwd=miss; detail=peer");
const BYTES: HeaderValue = HeaderValue::from_static("bytes");
/// `Retry-After` of a 503 over `limits.max_pinned_bytes`: slow responses end within a
/// send-rate window or two, most far sooner.
const RETRY_AFTER_SECS: u64 = 2;

/// What the client asked for, before the object size is known.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// `/range/{start}-{end}`
    Path(u64, u64),
    /// `/` with an optional single `Range` (None: whole object).
    Header(Option<RangeSpec>),
}

impl Want {
    fn known_start(self) -> Option<u64> {
        match self {
            Want::Path(start, _) => Some(start),
            Want::Header(spec) => spec.and_then(RangeSpec::known_start),
        }
    }

    /// The last byte asked for, when both ends are given.
    fn known_end(self) -> Option<u64> {
        match self {
            Want::Path(_, end) | Want::Header(Some(RangeSpec::FromTo(_, end))) => Some(end),
            Want::Header(_) => None,
        }
    }
}

/// Serves a video request and returns the number of body bytes written.
pub async fn serve(state: &AppState, session: &mut Session, route: Route) -> pingora::Result<u64> {
    // A cheap handle (the URI shares its bytes), so the signed values can be borrowed
    // while the session is written to.
    let uri = session.req_header().uri.clone();
    let now = unix_now();
    // Behind a trusted load balancer, the budget of bad signatures is the client's.
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
    let client = state
        .proxies
        .client_ip_for(peer, &session.req_header().headers);
    let signed = match state
        .signed_urls
        .check(uri.query().unwrap_or(""), now, client)
    {
        Ok((signed, how)) => {
            state.metrics.record_signed_url(how);
            signed
        }
        Err(failure) => {
            state.metrics.record_auth_failure(failure);
            tracing::debug!(reason = failure.reason(), "signed URL rejected");
            return respond::plain_with(session, failure.status(), &failure.message(), |r| {
                if failure == AuthFailure::Throttled {
                    r.insert_header(header::RETRY_AFTER, "1")?;
                }
                Ok(())
            })
            .await;
        }
    };
    let method = &session.req_header().method;
    let head = *method == Method::HEAD;
    if !head && *method != Method::GET {
        return respond::method_not_allowed(session, "GET, HEAD").await;
    }
    let want = match route {
        Route::Range => match parse_range_path(&uri.path()[RANGE_PREFIX.len()..]) {
            Ok((start, end)) => Want::Path(start, end),
            Err(e) => return respond::plain(session, 400, &e.to_string()).await,
        },
        _ => Want::Header(
            session
                .req_header()
                .headers
                .get(header::RANGE)
                .and_then(|v| parse_range_header(v.as_bytes())),
        ),
    };

    let obj = ObjectRef::new(signed.object, signed.version);
    let cache_control = cache_control(signed.expires.saturating_sub(now));
    match respond(state, session, &obj, want, cache_control.clone()).await? {
        Responded::Sent(n) => Ok(n),
        Responded::Changed(e) => {
            // No byte is out yet, so the response is not bound to the old metadata:
            // once more under the new one (docs/video.md, "Object metadata", rule 4).
            tracing::debug!(object = obj.o, version = obj.v, error = %e,
                "object metadata replaced before the header; starting over");
            match respond(state, session, &obj, want, cache_control).await? {
                Responded::Sent(n) => Ok(n),
                Responded::Changed(e) => origin_failure(state, session, &e).await,
            }
        }
    }
}

/// How [`respond`] ended.
enum Responded {
    /// A response was written: this many body bytes.
    Sent(u64),
    /// Nothing was written: the object's metadata was replaced while this response
    /// looked the object up ([`OriginError::Changed`]).
    Changed(Arc<OriginError>),
}

/// Everything from the object's metadata on, for an authorised GET or HEAD.
async fn respond(
    state: &AppState,
    session: &mut Session,
    obj: &ObjectRef<'_>,
    want: Want,
    cache_control: HeaderValue,
) -> pingora::Result<Responded> {
    let head = session.req_header().method == Method::HEAD;
    let obj = *obj;
    let slice_bytes = state.store.slice_bytes();
    let hint = want.known_start().map_or(0, |start| start / slice_bytes);
    // A body that runs into the next slice: on a cold object both are fetched at once.
    let next = want
        .known_end()
        .filter(|&end| !head && end / slice_bytes > hint)
        .map(|_| hint + 1);
    let lookup = match state.store.meta(&obj, hint, next).await {
        Ok(l) => l,
        Err(e) => return failed_before_header(state, session, e).await,
    };
    let meta = lookup.meta.clone();
    let meta = &*meta;
    let want = match conditional::evaluate(&session.req_header().headers, &meta.etag) {
        Decision::Serve { honour_range: true } => want,
        // If-Range names another version: the whole object, never a splice of two.
        Decision::Serve {
            honour_range: false,
        } => match want {
            Want::Header(Some(_)) => Want::Header(None),
            other => other,
        },
        Decision::NotModified => {
            return not_modified(session, meta, cache_control)
                .await
                .map(Responded::Sent)
        }
        Decision::Failed => {
            return respond::plain(
                session,
                412,
                "precondition failed: If-Match does not name this object's ETag",
            )
            .await
            .map(Responded::Sent)
        }
    };

    let (status, range) = match want {
        Want::Path(start, end) => match resolve_range_path(start, end, meta.size) {
            Some(r) => (200, Some(r)),
            None => return not_satisfiable(session, meta).await.map(Responded::Sent),
        },
        Want::Header(None) => (
            200,
            (meta.size > 0).then(|| ByteRange {
                start: 0,
                end: meta.size - 1,
            }),
        ),
        Want::Header(Some(spec)) => match spec.resolve(meta.size) {
            Some(r) => (206, Some(r)),
            None => return not_satisfiable(session, meta).await.map(Responded::Sent),
        },
    };
    let all_cached = !lookup.fetched
        && range.is_none_or(|r| {
            slice_pieces(r, slice_bytes).all(|p| state.store.contains(obj.id, p.index))
        });
    let mut cache_status = match (all_cached, lookup.from_peer) {
        (true, _) => CACHE_HIT,
        (false, true) => CACHE_PEER,
        (false, false) => CACHE_MISS,
    };

    let body_range = match range {
        Some(r) if !head => r,
        _ => {
            let resp = response_header(
                status,
                range,
                meta,
                &meta.content_type,
                cache_status,
                cache_control,
            )?;
            session.write_response_header(resp).await?;
            return Ok(Responded::Sent(0));
        }
    };
    state.store.note_read(obj.id, body_range, meta.size);
    let Some(mut pinned) = state.pinned.admit() else {
        return over_pinned_budget(state, session)
            .await
            .map(Responded::Sent);
    };
    let mut pieces = slice_pieces(body_range, slice_bytes);
    let mut piece = pieces.next().expect("a range covers at least one slice");
    let (mut current, content_type) = match lookup.slice {
        Some((index, bytes)) if index == piece.index => (
            Held {
                bytes,
                part_at: None,
            },
            meta.content_type.clone(),
        ),
        _ => match state
            .store
            .slice_part(&obj, piece.index, meta, piece.range())
            .await
        {
            Ok(s) => {
                if s.source == Source::Peer {
                    cache_status = CACHE_PEER;
                }
                // Metadata learnt from a 416 has no type; the slice's own record may.
                let content_type = if meta.content_type_known() {
                    meta.content_type.clone()
                } else {
                    s.meta.content_type.clone()
                };
                (Held::from(s), content_type)
            }
            Err(e) => return failed_before_header(state, session, e).await,
        },
    };
    pinned.hold(&current.bytes);
    let chunk = match piece_of(&current, piece, slice_bytes, meta.size, &obj) {
        Ok(c) => c,
        Err(_) => {
            return respond::plain(session, 502, "bad gateway: inconsistent object")
                .await
                .map(Responded::Sent)
        }
    };
    let resp = response_header(
        status,
        range,
        meta,
        &content_type,
        cache_status,
        cache_control,
    )?;
    session.write_response_header(resp).await?;
    let mut chunk = Some(chunk);
    let mut written = 0u64;
    loop {
        let this = match chunk.take() {
            Some(c) => c,
            None => piece_of(&current, piece, slice_bytes, meta.size, &obj)?,
        };
        written += this.len() as u64;
        let Some(next) = pieces.next() else {
            session.write_response_body(this, true).await?;
            return Ok(Responded::Sent(written));
        };
        // Performance: the next slice is fetched while this one drains to the socket.
        let fetch = async {
            let fetched = state
                .store
                .slice_part(&obj, next.index, meta, next.range())
                .await;
            if let Ok(s) = &fetched {
                pinned.hold(&s.bytes);
            }
            fetched
        };
        let (sent, fetched) = tokio::join!(session.write_response_body(this, false), fetch);
        if let Err(e) = sent {
            state.metrics.stream_aborts.inc();
            return Err(e);
        }
        current = match fetched {
            Ok(s) => {
                pinned.release(&current.bytes);
                Held::from(s)
            }
            Err(e) => {
                state.metrics.stream_aborts.inc();
                tracing::warn!(object = obj.o, version = obj.v, slice = next.index, error = %e,
                    "origin failed mid-response; closing the connection");
                return Error::e_explain(ErrorType::ReadError, "origin failed mid-response");
            }
        };
        piece = next;
    }
}

fn response_header(
    status: u16,
    range: Option<ByteRange>,
    meta: &ObjectMeta,
    content_type: &HeaderValue,
    cache_status: HeaderValue,
    cache_control: HeaderValue,
) -> pingora::Result<Box<ResponseHeader>> {
    let mut h = HeaderMap::with_capacity(8);
    h.insert(header::CONTENT_TYPE, content_type.clone());
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(range.map_or(0, ByteRange::len)),
    );
    if status == 206 {
        if let Some(r) = range {
            h.insert(header::CONTENT_RANGE, content_range(r, meta.size));
        }
    }
    h.insert(header::ACCEPT_RANGES, BYTES);
    h.insert(header::ETAG, meta.etag.clone());
    h.insert(header::CACHE_CONTROL, cache_control);
    h.insert(respond::CACHE_STATUS, cache_status);
    Ok(Box::new(respond::head(status, h)?))
}

/// Longest freshness a video response is given, whatever its URL's expiry (one year).
const MAX_AGE_CAP_SECS: u64 = 365 * 86_400;

/// `private, max-age={seconds the URL is still valid}, immutable`: the bytes of (o, v)
/// never change, so a client may keep them as long as its URL would be accepted, but a
/// shared cache must not, or it would serve the object past the URL's expiry without the
/// signature being checked again.
fn cache_control(remaining_secs: u64) -> HeaderValue {
    let mut buf = [0u8; 64];
    let mut w = &mut buf[..];
    let _ = std::io::Write::write_fmt(
        &mut w,
        format_args!(
            "private, max-age={}, immutable",
            remaining_secs.min(MAX_AGE_CAP_SECS)
        ),
    );
    let n = 64 - w.len();
    HeaderValue::from_bytes(&buf[..n]).expect("ASCII letters, digits and punctuation")
}

/// 304: the validators and freshness a 200 would carry, no body.
async fn not_modified(
    session: &mut Session,
    meta: &ObjectMeta,
    cache_control: HeaderValue,
) -> pingora::Result<u64> {
    let mut h = HeaderMap::with_capacity(2);
    h.insert(header::ETAG, meta.etag.clone());
    h.insert(header::CACHE_CONTROL, cache_control);
    session
        .write_response_header(Box::new(respond::head(304, h)?))
        .await?;
    Ok(0)
}

/// `bytes {start}-{end}/{size}`, formatted without a heap string.
fn content_range(r: ByteRange, size: u64) -> HeaderValue {
    let mut buf = [0u8; 80];
    let mut w = &mut buf[..];
    // Three u64s and "bytes -/" fit in 80 bytes.
    let _ = std::io::Write::write_fmt(&mut w, format_args!("bytes {}-{}/{}", r.start, r.end, size));
    let n = 80 - w.len();
    HeaderValue::from_bytes(&buf[..n]).expect("digits, a space, '-' and '/' are a valid value")
}

/// The piece of a slice a response needs, shared with the cache (no copy). The slice
/// must be exactly as long as that slice of an object of `size` bytes.
/// The bytes of a slice a response holds: all of the slice, or a part of it from
/// `part_at` on (read from disk by blocks).
struct Held {
    bytes: Bytes,
    part_at: Option<u64>,
}

impl From<Slice> for Held {
    fn from(s: Slice) -> Self {
        Self {
            bytes: s.bytes,
            part_at: s.part_at,
        }
    }
}

/// The bytes of `piece` in the slice held. A whole slice must be exactly as long as the
/// object's size says that slice is; a part must lie in it and hold the piece.
fn piece_of(
    held: &Held,
    piece: SlicePiece,
    slice_bytes: u64,
    size: u64,
    obj: &ObjectRef<'_>,
) -> pingora::Result<Bytes> {
    let expected = slice_len(piece.index, slice_bytes, size);
    let start = held.part_at.unwrap_or(0);
    let end = start + held.bytes.len() as u64;
    let wanted = piece.range();
    let fits = match held.part_at {
        None => end == expected,
        Some(_) => end <= expected && start <= wanted.start && wanted.end <= end,
    };
    if !fits {
        tracing::error!(
            object = obj.o,
            version = obj.v,
            slice = piece.index,
            len = held.bytes.len(),
            part_at = start,
            expected,
            "slice length disagrees with the object size; not served"
        );
        return Error::e_explain(ErrorType::InternalError, "slice length mismatch");
    }
    Ok(held
        .bytes
        .slice((wanted.start - start) as usize..(wanted.end - start) as usize))
}

async fn not_satisfiable(session: &mut Session, meta: &ObjectMeta) -> pingora::Result<u64> {
    let content_range = format!("bytes */{}", meta.size);
    respond::plain_with(session, 416, "range not satisfiable", |r| {
        r.insert_header("Content-Range", content_range)?;
        r.insert_header(header::ACCEPT_RANGES, BYTES)?;
        Ok(())
    })
    .await
}

/// 503 for a video response that would hold slices over `limits.max_pinned_bytes`.
async fn over_pinned_budget(state: &AppState, session: &mut Session) -> pingora::Result<u64> {
    state.metrics.record_refusal(Refusal::PinnedBytes);
    tracing::debug!(
        held = state.pinned.held(),
        "video response refused: limits.max_pinned_bytes"
    );
    respond::plain_with(
        session,
        503,
        "service unavailable: too many slow responses in flight; retry shortly",
        |r| r.insert_header(header::RETRY_AFTER, RETRY_AFTER_SECS),
    )
    .await
}

/// A failure to have the object's metadata or the first slice, before any byte of the
/// response is out: [`Responded::Changed`] when the metadata was replaced meanwhile,
/// else the client's error.
async fn failed_before_header(
    state: &AppState,
    session: &mut Session,
    e: Arc<OriginError>,
) -> pingora::Result<Responded> {
    if matches!(*e, OriginError::Changed { .. }) {
        return Ok(Responded::Changed(e));
    }
    origin_failure(state, session, &e)
        .await
        .map(Responded::Sent)
}

async fn origin_failure(
    state: &AppState,
    session: &mut Session,
    e: &OriginError,
) -> pingora::Result<u64> {
    if matches!(e, OriginError::NotHeld) {
        return Box::pin(not_held(state, session)).await;
    }
    // An origin's 404/410: no such object (SPEC §2.3), answered from the origin or from
    // the remembered answer.
    let cache_status = match e {
        OriginError::NotFound { .. } => Some(CACHE_MISS),
        OriginError::RememberedNotFound => Some(CACHE_HIT),
        _ => None,
    };
    if let Some(cache_status) = cache_status {
        return respond::plain_with(
            session,
            404,
            "not found: no such object at the origin",
            |r| {
                r.insert_header(respond::CACHE_STATUS, cache_status)
                    .map(|_| ())
            },
        )
        .await;
    }
    let status = e.status();
    let message = if status == 504 {
        "gateway timeout: the origin did not answer in time"
    } else {
        "bad gateway: the origin failed"
    };
    tracing::warn!(error = %e, status, "request failed at the origin");
    respond::plain(session, status, message).await
}

/// Directed mode, a slice no node of the site holds (SPEC 6.3): 302 to
/// `origin.redirect_url` + the request's path and query, or 404 without one.
async fn not_held(state: &AppState, session: &mut Session) -> pingora::Result<u64> {
    let Some(base) = &state.redirect_url else {
        return respond::plain(session, 404, "not found: not held by this site").await;
    };
    let uri = &session.req_header().uri;
    let location = format!(
        "{base}{}",
        uri.path_and_query().map_or("/", |pq| pq.as_str())
    );
    respond::plain_with(session, 302, "found: not held by this site", |r| {
        r.insert_header(header::LOCATION, location).map(|_| ())
    })
    .await
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
