//! `range_path` and `range_header`: what a client asks for (src/range.rs), the
//! preconditions that decide whether a range is honoured (src/conditional.rs), and what
//! an origin answers about ranges (src/origin.rs).

use cdn_edge::conditional::{evaluate, Decision};
use cdn_edge::config::{DEFAULT_SLICE_BYTES, MAX_SLICE_BYTES, MIN_SLICE_BYTES};
use cdn_edge::origin::{parse_content_range, parse_unsatisfied_range};
use cdn_edge::range::{
    parse_range_header, parse_range_path, resolve_range_path, slice_count, slice_len, slice_pieces,
    ByteRange, RangeSpec,
};
use http::{header, HeaderMap, HeaderValue};

/// Object sizes every parsed range is resolved against.
const SIZES: [u64; 6] = [0, 1, 1_000, 1 << 30, u64::MAX - 1, u64::MAX];
/// The slice sizes the config allows at either end, and the default.
const SLICES: [u64; 3] = [MIN_SLICE_BYTES, DEFAULT_SLICE_BYTES, MAX_SLICE_BYTES];
/// Ranges touching more slices than this have only their ends checked.
const MAX_PIECES: u64 = 4_096;

/// The part of a `/range/{start}-{end}` path after `/range/`.
///
/// Invariants: a parsed range has `start <= end`; its text is the decimal of the two
/// numbers (up to leading zeros); resolved against a size it stays inside the object and
/// inside what was asked; its slice pieces cover it exactly.
pub fn range_path(data: &[u8]) {
    let Ok(spec) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((start, end)) = parse_range_path(spec) else {
        return;
    };
    assert!(start <= end, "{spec:?}");
    let (a, b) = spec.split_once('-').expect("parsed");
    assert_eq!(
        (a.trim_start_matches('0'), b.trim_start_matches('0')),
        (nonzero(start).as_str(), nonzero(end).as_str()),
        "{spec:?}"
    );
    for size in SIZES.into_iter().chain([start, end, end.saturating_add(1)]) {
        let Some(r) = resolve_range_path(start, end, size) else {
            assert!(start >= size, "{spec:?} refused for size {size}");
            continue;
        };
        assert_eq!(r.start, start);
        assert!(r.end <= end && r.end < size, "{r:?} for size {size}");
        check_pieces(r);
    }
}

/// The decimal of `n` without leading zeros (empty for 0).
fn nonzero(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        n.to_string()
    }
}

/// A `Range` header value, also read as `If-Match`, `If-None-Match` and `If-Range`
/// values, as an origin's `Content-Range`, and as the `*/size` of its 416.
///
/// Invariants: a resolved range is non-empty, inside the object, and what the form
/// asks (a suffix is the last `n` bytes, `first-` runs to the end); its slice pieces
/// cover it exactly; preconditions never panic and `If-Range` alone never refuses;
/// an origin's `first-last/total` has `first <= last < total`.
pub fn range_header(data: &[u8]) {
    if let Some(spec) = parse_range_header(data) {
        if let RangeSpec::FromTo(a, b) = spec {
            assert!(a <= b, "{spec:?}");
        }
        for size in SIZES {
            let Some(r) = spec.resolve(size) else {
                continue;
            };
            assert!(
                r.start <= r.end && r.end < size,
                "{spec:?} {r:?} size {size}"
            );
            match spec {
                RangeSpec::FromTo(a, b) => assert!(r.start == a && r.end <= b),
                RangeSpec::From(a) => assert!(r.start == a && r.end == size - 1),
                RangeSpec::Suffix(n) => assert_eq!(r.len(), n.min(size), "{spec:?}"),
            }
            if let Some(start) = spec.known_start() {
                assert_eq!(start, r.start);
            }
            check_pieces(r);
        }
    }
    if let Some((first, last, total)) = parse_content_range(data) {
        assert!(first <= last && last < total, "{first}-{last}/{total}");
    }
    let _ = parse_unsatisfied_range(data);
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let etag = HeaderValue::from_static("\"o-v1\"");
        for name in [header::IF_MATCH, header::IF_NONE_MATCH, header::IF_RANGE] {
            let mut headers = HeaderMap::new();
            headers.insert(name.clone(), value.clone());
            let decision = evaluate(&headers, &etag);
            if name == header::IF_RANGE {
                assert!(matches!(decision, Decision::Serve { .. }), "{value:?}");
            }
        }
    }
}

/// The slice pieces of `r` cover it exactly, in order, for every slice size the
/// config allows at either end.
fn check_pieces(r: ByteRange) {
    for slice in SLICES {
        let count = slice_count(r, slice);
        let mut pieces = slice_pieces(r, slice);
        let first = pieces.next().expect("a range touches at least one slice");
        assert_eq!(first.index, r.start / slice);
        assert_eq!(first.index * slice + first.from as u64, r.start);
        if count > MAX_PIECES {
            continue;
        }
        let mut next_byte = r.start;
        let mut n = 0;
        for p in slice_pieces(r, slice) {
            n += 1;
            assert!(p.from < p.to && p.to as u64 <= slice, "{p:?} of {r:?}");
            assert_eq!(p.index * slice + p.from as u64, next_byte, "{p:?} of {r:?}");
            assert!(p.to as u64 <= slice_len(p.index, slice, r.end + 1));
            next_byte = p.index * slice + p.to as u64;
        }
        assert_eq!(n, count, "{r:?} in slices of {slice}");
        assert_eq!(next_byte - 1, r.end, "{r:?} in slices of {slice}");
    }
}
