//! Dictionary lookups (SPEC §2.4): small JSON GETs from the player's subtitle hover,
//! answered from a cache keyed by the canonical query.
//!
//! Order of work: method (OPTIONS is a CORS preflight) → canonical key (400 on bad
//! encoding) → cache or upstream → the answer with `Cache-Status`, `Age`, CORS headers
//! and, for larger bodies, the encoding the client prefers.

pub mod encoding;
pub mod key;
pub mod policy;
pub mod store;

use std::time::Instant;

use http::{header, HeaderMap, HeaderValue, Method};
use pingora::http::ResponseHeader;

use crate::app::AppState;
use crate::cors::{ALLOWED_METHODS, PREFLIGHT_MAX_AGE};
use crate::respond;
use crate::session::Session;
use store::Outcome;

const VARY: HeaderValue = HeaderValue::from_static("Origin, Accept-Encoding");

fn cache_status(outcome: Outcome) -> HeaderValue {
    HeaderValue::from_static(match outcome {
        Outcome::Hit => "cdn-edge; hit",
        Outcome::Miss => "cdn-edge; fwd=miss",
        Outcome::Refreshed => "cdn-edge; fwd=stale",
        Outcome::Stale => "cdn-edge; hit; fwd=stale; detail=stale-if-error",
    })
}

/// Serves a dictionary request; returns the body bytes written.
pub async fn serve(state: &AppState, session: &mut Session) -> pingora::Result<u64> {
    let Some(store) = state.dictionary.as_ref() else {
        return respond::plain(session, 404, "not found").await;
    };
    let req = session.req_header();
    let allow_origin = state.cors.allow(req.headers.get(header::ORIGIN));
    match req.method {
        Method::OPTIONS => return preflight(session, allow_origin).await,
        Method::GET | Method::HEAD => {}
        _ => return respond::method_not_allowed(session, "GET, HEAD, OPTIONS").await,
    }
    let target = match key::canonical_target(req.uri.path(), req.uri.query().map(str::as_bytes)) {
        Ok(t) => t,
        Err(e) => return error_answer(session, 400, &e.to_string(), allow_origin).await,
    };
    let wanted = encoding::negotiate(
        req.headers
            .get(header::ACCEPT_ENCODING)
            .map(|v| v.as_bytes()),
    );
    let head = req.method == Method::HEAD;

    let (entry, outcome) = match store.lookup(&target).await {
        Ok((e, _))
            if (100..200).contains(&e.status)
                || ((300..400).contains(&e.status) && e.status != 304) =>
        {
            let msg = "bad gateway: unexpected answer from the dictionary upstream";
            return error_answer(session, 502, msg, allow_origin).await;
        }
        Ok(found) => found,
        Err(e) => {
            let status = e.status();
            let msg = if status == 504 {
                "gateway timeout: the dictionary upstream did not answer in time"
            } else {
                "bad gateway: the dictionary upstream failed"
            };
            return error_answer(session, status, msg, allow_origin).await;
        }
    };
    // 204 and 304 carry no body and no Content-Length (RFC 9110 §8.6).
    let bodiless = matches!(entry.status, 204 | 304);
    let (enc, body) = entry.body_for(wanted);
    let mut h = HeaderMap::with_capacity(10);
    h.insert(header::CONTENT_TYPE, entry.content_type.clone());
    if !bodiless {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    h.insert(respond::CACHE_STATUS, cache_status(outcome));
    h.insert(
        header::AGE,
        HeaderValue::from(entry.age_secs(Instant::now())),
    );
    h.insert(header::VARY, VARY);
    if let Some(cc) = &entry.cache_control {
        h.insert(header::CACHE_CONTROL, cc.clone());
    }
    if enc != encoding::Encoding::Identity {
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(enc.token()),
        );
    }
    if let Some(origin) = allow_origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    let resp = respond::head(entry.status, h)?;
    if head || bodiless || body.is_empty() {
        session.write_response_header(Box::new(resp)).await?;
        return Ok(0);
    }
    session.write_response_header(Box::new(resp)).await?;
    let len = body.len() as u64;
    session.write_response_body(body, true).await?;
    Ok(len)
}

/// A one-line error, with the CORS headers a browser player needs to read it.
async fn error_answer(
    session: &mut Session,
    status: u16,
    message: &str,
    allow_origin: Option<HeaderValue>,
) -> pingora::Result<u64> {
    respond::plain_with(session, status, message, |r| {
        r.insert_header(header::VARY, VARY)?;
        if let Some(origin) = allow_origin {
            r.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
        }
        Ok(())
    })
    .await
}

/// Answers a CORS preflight without touching the upstream: 204 with the CORS headers
/// for an allowed origin, 403 for any other.
async fn preflight(
    session: &mut Session,
    allow_origin: Option<HeaderValue>,
) -> pingora::Result<u64> {
    let Some(origin) = allow_origin else {
        return respond::plain(session, 403, "origin not allowed").await;
    };
    let requested_headers = session
        .req_header()
        .headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned();
    let mut resp = ResponseHeader::build_no_case(204, Some(6))?;
    resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
    resp.insert_header(header::ACCESS_CONTROL_ALLOW_METHODS, ALLOWED_METHODS)?;
    if let Some(h) = requested_headers {
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_HEADERS, h)?;
    }
    resp.insert_header(header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE)?;
    resp.insert_header(
        header::VARY,
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    )?;
    resp.insert_header(header::CONTENT_LENGTH, 0)?;
    session.write_response_header(Box::new(resp)).await?;
    Ok(0)
}
