//! Small, complete responses written from a handler: errors, 404s, 416s.
//!
//! Unlike Pingora's `respond_error`, these keep the connection alive, so a client that
//! gets a 403 can reuse its connection for the next (signed) request.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, StatusCode};
use pingora::http::ResponseHeader;
use pingora::OrErr;

use crate::session::Session;

/// `Cache-Status` (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// A response head from a ready header map. Names and values are valid already, so
/// nothing is parsed again, and no per-name case map is kept: standard names go out in
/// their usual capitalisation (`Content-Type`), others in lower case.
pub fn head(status: u16, headers: HeaderMap) -> pingora::Result<ResponseHeader> {
    let status = StatusCode::from_u16(status)
        .or_err(pingora::ErrorType::InternalError, "invalid response status")?;
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers = headers;
    Ok(ResponseHeader::from(parts))
}

/// Writes `status` with a one-line plain-text body (`message` + newline). Returns the
/// number of body bytes written.
pub async fn plain(session: &mut Session, status: u16, message: &str) -> pingora::Result<u64> {
    plain_with(session, status, message, |_| Ok(())).await
}

/// Like [`plain`], with a chance to add headers.
pub async fn plain_with(
    session: &mut Session,
    status: u16,
    message: &str,
    extra: impl FnOnce(&mut ResponseHeader) -> pingora::Result<()>,
) -> pingora::Result<u64> {
    let mut body = String::with_capacity(message.len() + 1);
    body.push_str(message);
    body.push('\n');
    let mut resp = ResponseHeader::build_no_case(status, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    extra(&mut resp)?;
    let head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(resp)).await?;
    if head {
        return Ok(0);
    }
    let len = body.len() as u64;
    session.write_response_body(Bytes::from(body), true).await?;
    Ok(len)
}

/// 405 with the `Allow` header.
pub async fn method_not_allowed(
    session: &mut Session,
    allow: &'static str,
) -> pingora::Result<u64> {
    plain_with(session, 405, "method not allowed", |r| {
        r.insert_header(header::ALLOW, allow).map(|_| ())
    })
    .await
}
