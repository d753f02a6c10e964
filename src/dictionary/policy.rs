//! What may be cached, and for how long (SPEC §2.4). Pure.

use std::time::Duration;

/// The longest any answer is kept fresh, whatever the upstream or config says.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// How long an upstream answer may be served from cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storable {
    /// Fresh for this long, then stale.
    For(Duration),
    /// Passed through, not cached.
    No,
}

/// 200: `s-maxage` or `max-age` from `Cache-Control`, else `ttl`; `no-store`,
/// `no-cache` and `private` are not cached. 404: `negative_ttl` unless `no-store` or
/// `private`. Anything else is not cached.
pub fn storable(
    status: u16,
    cache_control: Option<&[u8]>,
    ttl: Duration,
    negative_ttl: Duration,
) -> Storable {
    let cc = cache_control
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("");
    let mut max_age = None;
    let mut s_maxage = None;
    let mut forbidden = false;
    for directive in cc.split(',') {
        let (name, value) = match directive.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (directive.trim(), None),
        };
        match name.to_ascii_lowercase().as_str() {
            "no-store" | "no-cache" | "private" => forbidden = true,
            "max-age" => max_age = value.and_then(|v| v.parse::<u64>().ok()),
            "s-maxage" => s_maxage = value.and_then(|v| v.parse::<u64>().ok()),
            _ => {}
        }
    }
    if forbidden {
        return Storable::No;
    }
    let lifetime = match status {
        200 => s_maxage.or(max_age).map_or(ttl, Duration::from_secs),
        404 => negative_ttl,
        _ => return Storable::No,
    };
    if lifetime.is_zero() {
        Storable::No
    } else {
        Storable::For(lifetime.min(MAX_LIFETIME))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(86_400);
    const NEG: Duration = Duration::from_secs(60);

    fn s(status: u16, cc: &str) -> Storable {
        storable(status, (!cc.is_empty()).then_some(cc.as_bytes()), TTL, NEG)
    }

    #[test]
    fn freshness() {
        assert_eq!(s(200, ""), Storable::For(TTL));
        assert_eq!(
            s(200, "public, max-age=120"),
            Storable::For(Duration::from_secs(120))
        );
        assert_eq!(
            s(200, "max-age=120, s-maxage=30"),
            Storable::For(Duration::from_secs(30))
        );
        assert_eq!(
            s(200, "max-age=\"15\""),
            Storable::For(Duration::from_secs(15))
        );
        assert_eq!(s(200, "max-age=0"), Storable::No);
        assert_eq!(s(200, "max-age=abc"), Storable::For(TTL));
        assert_eq!(
            s(200, "max-age=18446744073709551615"),
            Storable::For(MAX_LIFETIME)
        );
        for no in [
            "no-store",
            "private",
            "no-cache",
            "max-age=60, No-Store",
            "private, max-age=600",
        ] {
            assert_eq!(s(200, no), Storable::No, "{no}");
        }
        assert_eq!(s(404, ""), Storable::For(NEG));
        assert_eq!(s(404, "max-age=9999"), Storable::For(NEG));
        assert_eq!(s(404, "no-store"), Storable::No);
        for status in [201, 204, 301, 400, 403, 410, 500, 503] {
            assert_eq!(s(status, "max-age=60"), Storable::No, "{status}");
        }
    }
}
