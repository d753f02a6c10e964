//! The key under which a forwarded request is deduplicated. Pure.
//!
//! The player names each request with a `reqId` query parameter and repeats it when it
//! retries (with another `reqAttempt`). The id is the client's choice, so it cannot be
//! the key on its own: another client (or a replay) sending the same `reqId` would get
//! the first client's stored answer and have its own event dropped. These routes carry
//! no client token (no session or signature: `t` belongs to the video URLs), and the
//! client address changes under a mobile player, so the key is the `reqId` with a
//! digest of what makes the request: its path and body.
//!
//! `key = reqId + "#" + hex(first 16 bytes of SHA-256(path, 0x00, body))`
//!
//! A true retry (same path, body and `reqId`; any query otherwise) has the same key;
//! the same `reqId` with another body or path is another request. The spool prefixes
//! the route (`event:` or `logblob:`). 128 bits keep keys short in the spool; finding
//! a body that collides with another client's is a second-preimage search, out of
//! reach.

use sha2::{Digest, Sha256};

/// Longest `reqId` deduplicated; a longer one is forwarded without deduplication.
pub const MAX_REQ_ID: usize = 256;

/// The `reqId` query parameter, as sent.
pub fn req_id(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("reqId="))
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQ_ID)
}

/// The dedupe key of a request to `target` (path and query) with `body`; `None`
/// without a usable `reqId`. Hashes the body: call off the async runtime for large ones.
pub fn key(target: &str, body: &[u8]) -> Option<String> {
    let (path, query) = target.split_once('?')?;
    let id = req_id(query)?;
    let mut digest = Sha256::new();
    digest.update(path.as_bytes());
    digest.update([0]);
    digest.update(body);
    let digest = digest.finalize();
    Some(format!("{id}#{}", hex::encode(&digest[..16])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert_eq!(
            req_id("reqAttempt=1&reqName=events/pause&reqId=abc-1"),
            Some("abc-1")
        );
        assert_eq!(req_id("reqId=&x=1"), None);
        assert_eq!(req_id("xreqId=1"), None);
        assert_eq!(req_id(&format!("reqId={}", "a".repeat(300))), None);
    }

    #[test]
    fn a_retry_shares_its_key_and_another_request_does_not() {
        const EVENT: &str = "/msl/playapi/cadmium/event/1";
        let k = |target: &str, body: &[u8]| key(target, body);
        let first = k(&format!("{EVENT}?reqAttempt=1&reqId=r1"), b"{\"e\":1}").unwrap();
        assert!(first.starts_with("r1#") && first.len() == 3 + 32, "{first}");
        // The player's retry: same path, body and reqId, the next attempt number.
        assert_eq!(
            k(&format!("{EVENT}?reqAttempt=2&reqId=r1"), b"{\"e\":1}").as_ref(),
            Some(&first)
        );
        // Same reqId, another client's body or another path: another request.
        for other in [
            k(&format!("{EVENT}?reqAttempt=1&reqId=r1"), b"{\"e\":2}"),
            k(
                "/msl/playapi/cadmium/event/2?reqAttempt=1&reqId=r1",
                b"{\"e\":1}",
            ),
            k(&format!("{EVENT}?reqAttempt=1&reqId=r2"), b"{\"e\":1}"),
        ] {
            assert_ne!(other.as_ref(), Some(&first));
        }
        // The path and body are not simply concatenated.
        assert_ne!(k("/a?reqId=r", b"b/c"), k("/ab?reqId=r", b"/c"));
        assert_eq!(k(EVENT, b"x"), None, "no query");
        assert_eq!(k(&format!("{EVENT}?reqAttempt=1"), b"x"), None, "no reqId");
    }
}
