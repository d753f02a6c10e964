//! Which forwarded paths are passed on. Pure.
//!
//! A forwarded route matches a path prefix and sends the path on as received, so the
//! path must not be able to leave the prefix once the upstream (or a proxy in front
//! of it) normalises it: `/msl/playapi/cadmium/event/../../admin/x` would reach
//! `/msl/admin/x`. Refused, with 400, before the body is read:
//!
//! - a `.` or `..` segment (also with `;parameters`, which some servers strip);
//! - a percent-encoded dot, slash or backslash (`%2e`, `%2f`, `%5c`, any case), which
//!   some upstreams decode before they normalise;
//! - a percent-encoded `%` (`%25`), the double encoding of all of the above;
//! - a backslash, which some servers read as a slash.
//!
//! Players send plain paths (`/msl/playapi/cadmium/event/1`), so none of this costs a
//! legitimate request. The query is not checked: it cannot change the path.

/// Why a forwarded path is refused; the message is the 400 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("path has a dot segment")]
    DotSegment,
    #[error("path has a percent-encoded dot")]
    EncodedDot,
    #[error("path has a percent-encoded slash")]
    EncodedSlash,
    #[error("path has a backslash")]
    Backslash,
    #[error("path has a percent-encoded percent sign")]
    EncodedPercent,
}

/// Checks a forwarded request's path (without the query).
pub fn check(path: &str) -> Result<(), BadPath> {
    let bytes = path.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Err(BadPath::Backslash),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b'.') => return Err(BadPath::EncodedDot),
                    Some(b'/') => return Err(BadPath::EncodedSlash),
                    Some(b'\\') => return Err(BadPath::Backslash),
                    Some(b'%') => return Err(BadPath::EncodedPercent),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let dot_segment = path.split('/').any(|segment| {
        let name = segment.split(';').next().unwrap_or_default();
        name == "." || name == ".."
    });
    if dot_segment {
        return Err(BadPath::DotSegment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_paths() {
        let cases = [
            ("/msl/playapi/cadmium/event/1", Ok(())),
            ("/log/cadmium/logblob/1", Ok(())),
            ("/msl/playapi/cadmium/event/v1.2/pause", Ok(())),
            ("/msl/playapi/cadmium/event/...", Ok(())),
            ("/msl/playapi/cadmium/event/.hidden", Ok(())),
            ("/msl/playapi/cadmium/event/a%20b", Ok(())),
            ("/msl/playapi/cadmium/event/100%", Ok(())),
            ("/msl/playapi/cadmium/event/%zz", Ok(())),
            ("/stats", Ok(())),
            (
                "/msl/playapi/cadmium/event/../../admin/x",
                Err(BadPath::DotSegment),
            ),
            ("/msl/playapi/cadmium/event/..", Err(BadPath::DotSegment)),
            ("/msl/playapi/cadmium/event/./x", Err(BadPath::DotSegment)),
            (
                "/msl/playapi/cadmium/event/..;x/y",
                Err(BadPath::DotSegment),
            ),
            (
                "/msl/playapi/cadmium/event/%2e%2e/admin",
                Err(BadPath::EncodedDot),
            ),
            (
                "/msl/playapi/cadmium/event/%2E%2E/admin",
                Err(BadPath::EncodedDot),
            ),
            (
                "/msl/playapi/cadmium/event/.%2e/admin",
                Err(BadPath::EncodedDot),
            ),
            (
                "/msl/playapi/cadmium/event/x%2fy",
                Err(BadPath::EncodedSlash),
            ),
            (
                "/msl/playapi/cadmium/event/x%2Fy",
                Err(BadPath::EncodedSlash),
            ),
            (
                "/msl/playapi/cadmium/event/..%2f",
                Err(BadPath::EncodedSlash),
            ),
            ("/msl/playapi/cadmium/event/x%5cy", Err(BadPath::Backslash)),
            ("/msl/playapi/cadmium/event/x%5Cy", Err(BadPath::Backslash)),
            (
                "/msl/playapi/cadmium/event/..\\admin",
                Err(BadPath::Backslash),
            ),
            (
                "/msl/playapi/cadmium/event/%252e%252e/admin",
                Err(BadPath::EncodedPercent),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(check(path), want, "{path}");
        }
    }

    #[test]
    fn reasons_are_one_line() {
        for bad in [
            BadPath::DotSegment,
            BadPath::EncodedDot,
            BadPath::EncodedSlash,
            BadPath::Backslash,
            BadPath::EncodedPercent,
        ] {
            let text = bad.to_string();
            assert!(
                !text.contains('\n') && text.starts_with("path has"),
                "{text}"
            );
        }
    }
}
