//! `peer_request`: requests on the peer listener (src/cluster/service.rs, purge.rs,
//! auth.rs): a slice, a purge or a read of the purge log, from another node.

use std::net::SocketAddr;

use cdn_edge::auth::is_valid_id;
use cdn_edge::cluster::auth::{check, Claim, Kind};
use cdn_edge::cluster::client::{signed_request, SLICE_PATH};
use cdn_edge::cluster::purge::{Asked, LOG_PATH, PURGE_PATH};
use cdn_edge::cluster::service::SliceRequest;
use http::HeaderValue;
use pingora_http::RequestHeader;

/// The site's secret in the seeds.
pub const SECRET: &[u8] = b"fuzz-peer-secret";
/// The node receiving the requests (the seeds are addressed to it).
pub const ME: &str = "127.0.0.1:7443";
/// The time of the seeds' signatures.
pub const NOW: u64 = 1_800_000_000;

/// Most headers read, as Pingora's listener.
const MAX_HEADERS: usize = 64;

/// An HTTP/1 request head, parsed with `httparse` as Pingora's listener does, then read
/// as a slice request, a purge and a read of the purge log.
///
/// Invariants: a parsed request has valid ids and a kind its path allows; a request the
/// listener accepts carries the HMAC of its claim; the claim of a parsed request, sent
/// as this node's client sends it, parses back to the same claim and is accepted.
pub fn peer_request(data: &[u8]) {
    let Some(req) = request_head(data) else {
        return;
    };
    let me: SocketAddr = ME.parse().expect("an address");
    if let Some(slice) = SliceRequest::parse(&req) {
        let claim = slice.claim(me);
        assert!(is_valid_id(claim.o) && is_valid_id(claim.v), "{claim:?}");
        assert!(
            matches!(claim.kind, Kind::Sibling | Kind::Child),
            "{claim:?}"
        );
        accepted_only_if_signed(&claim, slice.auth());
        let path = format!("{SLICE_PATH}?o={}&v={}&i={}", claim.o, claim.v, claim.index);
        let again = resent("GET", &path, &claim);
        let back = SliceRequest::parse(&again).expect("a request as the client sends it");
        same_and_accepted(&claim, &back.claim(me), back.auth());
    }
    for kind in [Kind::Purge, Kind::PurgeLog] {
        let Some(asked) = Asked::parse(&req, kind) else {
            continue;
        };
        let claim = asked.claim(me);
        assert_eq!((claim.kind, claim.hops), (kind, 0));
        let path = if kind == Kind::Purge {
            assert!(is_valid_id(claim.o), "{claim:?}");
            assert!(claim.v.is_empty() || is_valid_id(claim.v), "{claim:?}");
            let v = if claim.v.is_empty() {
                String::new()
            } else {
                format!("&v={}", claim.v)
            };
            format!("{PURGE_PATH}?o={}{v}&id={}", claim.o, claim.index)
        } else {
            assert!(claim.o.is_empty() && claim.v.is_empty(), "{claim:?}");
            format!("{LOG_PATH}?since={}", claim.index)
        };
        accepted_only_if_signed(&claim, asked.auth());
        let again = resent("POST", &path, &claim);
        let back = Asked::parse(&again, kind).expect("a request as the client sends it");
        same_and_accepted(&claim, &back.claim(me), back.auth());
    }
}

/// The request head at the start of `data`, as Pingora builds it from `httparse`.
fn request_head(data: &[u8]) -> Option<RequestHeader> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    if !parsed.parse(data).ok()?.is_complete() {
        return None;
    }
    let mut req = RequestHeader::build(
        parsed.method.unwrap_or(""),
        parsed.path.unwrap_or("").as_bytes(),
        Some(parsed.headers.len()),
    )
    .ok()?;
    for h in parsed.headers.iter() {
        let value = HeaderValue::from_bytes(h.value).ok()?;
        req.append_header(h.name.to_string(), value).ok()?;
    }
    Some(req)
}

/// The listener accepts the claim (at its own time) only with its HMAC.
fn accepted_only_if_signed(claim: &Claim<'_>, auth: &str) {
    let me = claim.to;
    for now in [NOW, claim.time] {
        if check(claim, auth, SECRET, me, now).is_ok() {
            assert!(
                claim.verify(SECRET, auth),
                "{claim:?} accepted with {auth:?}"
            );
            assert!(claim.time.abs_diff(now) <= 60);
        }
    }
}

/// The request this node's client sends for `claim`, signed with the site's secret.
fn resent(method: &str, path: &str, claim: &Claim<'_>) -> RequestHeader {
    signed_request(method, path, claim, SECRET, claim.to).expect("valid ids and numbers")
}

fn same_and_accepted(sent: &Claim<'_>, back: &Claim<'_>, auth: &str) {
    assert_eq!(format!("{sent:?}"), format!("{back:?}"));
    assert_eq!(check(back, auth, SECRET, back.to, back.time), Ok(()));
}
