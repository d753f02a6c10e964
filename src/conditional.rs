//! Conditional requests on the video routes (RFC 9110 §13). Pure: headers in, decision out.
//!
//! The edge's video responses carry a strong `ETag` per (o, v) and no `Last-Modified`,
//! so the preconditions are evaluated in the order of RFC 9110 §13.2.2 as follows:
//! 1. `If-Match`: no listed tag matches (strong comparison) → **412**.
//! 2. `If-Unmodified-Since` (only without `If-Match`): no date to compare → ignored.
//! 3. `If-None-Match`: a listed tag matches (weak comparison), or `*` → **304**.
//! 4. `If-Modified-Since` (only without `If-None-Match`): no date to compare → ignored.
//! 5. `If-Range` (only with `Range`): honoured when it is our tag, compared strongly; a
//!    weak tag, another tag or a date means the whole object is sent (200), so a resumed
//!    download never splices two versions.
//!
//! Preconditions are evaluated once the object is known to exist (they apply only where
//! the response would otherwise be 2xx), and before the range is resolved: a matching
//! `If-None-Match` is a 304 even when the range would not be satisfiable.

use http::{header, HeaderMap, HeaderValue};

/// What the preconditions of a request decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Serve the request; `honour_range` is false when `If-Range` failed, so the
    /// `Range` header must be ignored.
    Serve { honour_range: bool },
    /// 304 Not Modified: the client's copy is current.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// Evaluates the preconditions of a GET or HEAD on a representation whose entity tag
/// is `etag` (strong, as `"…"`).
pub fn evaluate(headers: &HeaderMap, etag: &HeaderValue) -> Decision {
    let ours = etag.as_bytes();
    if let Some(v) = headers.get(header::IF_MATCH) {
        if !list_matches(v.as_bytes(), ours, Comparison::Strong) {
            return Decision::Failed;
        }
    }
    if let Some(v) = headers.get(header::IF_NONE_MATCH) {
        if list_matches(v.as_bytes(), ours, Comparison::Weak) {
            return Decision::NotModified;
        }
    }
    let honour_range = match headers.get(header::IF_RANGE) {
        // A date never validates: the edge sends no Last-Modified to compare with.
        Some(v) => {
            let v = v.as_bytes().trim_ascii();
            !v.starts_with(b"W/") && v.first() == Some(&b'"') && opaque(v) == opaque(ours)
        }
        None => true,
    };
    Decision::Serve { honour_range }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comparison {
    /// Both tags strong and their opaque parts equal.
    Strong,
    /// Opaque parts equal, weak or not.
    Weak,
}

/// Whether a field value (`*` or a comma-separated list of entity tags) matches `ours`.
/// Malformed members never match.
fn list_matches(value: &[u8], ours: &[u8], how: Comparison) -> bool {
    let value = value.trim_ascii();
    if value == b"*" {
        return true;
    }
    let ours = opaque(ours);
    value.split(|&b| b == b',').any(|member| {
        let member = member.trim_ascii();
        let (weak, tag) = match member.strip_prefix(b"W/") {
            Some(rest) => (true, rest),
            None => (false, member),
        };
        let well_formed = tag.len() >= 2 && tag[0] == b'"' && tag[tag.len() - 1] == b'"';
        well_formed && !(weak && how == Comparison::Strong) && opaque(tag) == ours
    })
}

/// The tag without its quotes (and without `W/`).
fn opaque(tag: &[u8]) -> &[u8] {
    let tag = tag.strip_prefix(b"W/").unwrap_or(tag);
    tag.strip_prefix(b"\"")
        .and_then(|t| t.strip_suffix(b"\""))
        .unwrap_or(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETAG: HeaderValue = HeaderValue::from_static("\"254d93920ae6eea2\"");

    fn decide(pairs: &[(&'static str, &'static str)]) -> Decision {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        evaluate(&h, &ETAG)
    }

    const SERVE: Decision = Decision::Serve { honour_range: true };
    const WHOLE: Decision = Decision::Serve {
        honour_range: false,
    };

    #[test]
    fn preconditions_in_rfc_order() {
        let table: &[(&[(&str, &str)], Decision)] = &[
            (&[], SERVE),
            (&[("range", "bytes=0-1")], SERVE),
            // If-None-Match: weak comparison, lists, *.
            (
                &[("if-none-match", "\"254d93920ae6eea2\"")],
                Decision::NotModified,
            ),
            (
                &[("if-none-match", "W/\"254d93920ae6eea2\"")],
                Decision::NotModified,
            ),
            (
                &[("if-none-match", "\"x\", \"254d93920ae6eea2\"")],
                Decision::NotModified,
            ),
            (&[("if-none-match", "*")], Decision::NotModified),
            (&[("if-none-match", "\"other\"")], SERVE),
            (&[("if-none-match", "254d93920ae6eea2")], SERVE),
            // If-Match: strong comparison.
            (&[("if-match", "\"254d93920ae6eea2\"")], SERVE),
            (&[("if-match", "*")], SERVE),
            (&[("if-match", "\"a\" , \"254d93920ae6eea2\"")], SERVE),
            (&[("if-match", "\"wrong\"")], Decision::Failed),
            (&[("if-match", "W/\"254d93920ae6eea2\"")], Decision::Failed),
            (&[("if-match", "")], Decision::Failed),
            // If-Match before If-None-Match.
            (
                &[("if-match", "\"wrong\""), ("if-none-match", "*")],
                Decision::Failed,
            ),
            // If-Range: our strong tag only.
            (&[("if-range", "\"254d93920ae6eea2\"")], SERVE),
            (&[("if-range", "\"other\"")], WHOLE),
            (&[("if-range", "W/\"254d93920ae6eea2\"")], WHOLE),
            (&[("if-range", "Tue, 01 Dec 2026 12:00:00 GMT")], WHOLE),
            // Dates alone are ignored: there is no Last-Modified.
            (
                &[("if-modified-since", "Tue, 01 Dec 2099 12:00:00 GMT")],
                SERVE,
            ),
            (
                &[("if-unmodified-since", "Tue, 01 Dec 1999 12:00:00 GMT")],
                SERVE,
            ),
            // A 304 wins over If-Range.
            (
                &[("if-none-match", "*"), ("if-range", "\"other\"")],
                Decision::NotModified,
            ),
        ];
        for (pairs, want) in table {
            assert_eq!(decide(pairs), *want, "{pairs:?}");
        }
    }
}
