//! Content operations on the admin listener (SPEC 7): purge, fill jobs, drain, and the
//! control-plane report. The mutating endpoints need the admin token
//! ([`authorize`]); `/metrics`, `/healthz` and `/status` stay open.

pub mod control;
pub mod drain;
pub mod fill;
pub mod purge;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use pingora::protocols::http::ServerSession;
use serde::Serialize;

/// Largest admin request body (a fill manifest), in bytes.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// An admin answer: status and body bytes.
pub type Reply = Response<Vec<u8>>;

/// Why a mutating request may not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// 403: no `admin.token` is configured, so the endpoint is off.
    NoToken,
    /// 401: the `Authorization: Bearer` token is missing or wrong.
    BadToken,
}

/// Checks `Authorization: Bearer <token>` against `admin.token`, in constant time.
pub fn authorize(token: Option<&[u8]>, authorization: Option<&[u8]>) -> Result<(), Refused> {
    let Some(token) = token else {
        return Err(Refused::NoToken);
    };
    let given = authorization
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii)
        .ok_or(Refused::BadToken)?;
    if constant_time_eq(given, token) {
        Ok(())
    } else {
        Err(Refused::BadToken)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Compare fixed-size digests, so that neither the bytes nor the length of the
    // configured token show in the time taken.
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The answer to a refused request.
pub fn refused(why: Refused) -> Reply {
    match why {
        Refused::NoToken => error(
            StatusCode::FORBIDDEN,
            "admin endpoints are off: no admin.token is configured",
        ),
        Refused::BadToken => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong Authorization: Bearer token",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"cdn-edge admin\""),
            );
            r
        }
    }
}

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    let body = serde_json::to_vec_pretty(value).expect("admin answers serialise");
    reply(status, "application/json", body)
}

/// `{"error": message}` with a 4xx or 5xx status.
pub fn error(status: StatusCode, message: &str) -> Reply {
    json(status, &serde_json::json!({ "error": message }))
}

pub fn reply(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static parts are valid")
}

/// Reads the whole request body, at most [`MAX_BODY_BYTES`]; an error is the answer to
/// send.
pub async fn read_body(session: &mut ServerSession) -> Result<Bytes, Box<Reply>> {
    let mut body = bytes::BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(Box::new(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body larger than 16 MiB",
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read the request body: {e}"),
                )))
            }
        }
    }
}

/// Parses a JSON body into `T`; an error names what is wrong.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Reply>> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("invalid JSON body: {at}{}", e.inner()),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let t = Some(&b"0123456789abcdef"[..]);
        assert_eq!(authorize(None, Some(b"Bearer x")), Err(Refused::NoToken));
        assert_eq!(authorize(t, None), Err(Refused::BadToken));
        assert_eq!(
            authorize(t, Some(b"0123456789abcdef")),
            Err(Refused::BadToken)
        );
        assert_eq!(
            authorize(t, Some(b"Bearer 0123456789abcdeF")),
            Err(Refused::BadToken)
        );
        assert_eq!(
            authorize(t, Some(b"Bearer 0123456789abcdef0")),
            Err(Refused::BadToken)
        );
        assert_eq!(authorize(t, Some(b"Bearer 0123456789abcdef")), Ok(()));
        assert_eq!(authorize(t, Some(b"Bearer  0123456789abcdef ")), Ok(()));
    }
}
