//! CORS for browser players (SPEC §2.4): an allowed `Origin` is echoed back, never `*`,
//! and preflights are answered at the edge.

use http::HeaderValue;

/// Methods a preflight may ask for.
pub const ALLOWED_METHODS: &str = "GET, HEAD, OPTIONS";
/// How long a browser may cache a preflight answer, in seconds.
pub const PREFLIGHT_MAX_AGE: &str = "86400";

/// The configured allow-list.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    allowed: Vec<HeaderValue>,
}

impl Cors {
    pub fn new(origins: &[String]) -> Self {
        Self {
            allowed: origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect(),
        }
    }

    /// The value for `Access-Control-Allow-Origin`, if this request's `Origin` may have
    /// one. Origins compare exactly (scheme, host and port), as browsers send them.
    pub fn allow(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        let origin = origin?;
        self.allowed
            .iter()
            .find(|a| a.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
            .map(|_| origin.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_origins_are_echoed() {
        let c = Cors::new(&[
            "https://www.netflix.com".into(),
            "http://localhost:3000".into(),
        ]);
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(
            c.allow(Some(&h("https://www.netflix.com"))),
            Some(h("https://www.netflix.com"))
        );
        assert_eq!(
            c.allow(Some(&h("http://localhost:3000"))),
            Some(h("http://localhost:3000"))
        );
        for other in [
            "https://evil.example",
            "https://www.netflix.com.evil.example",
            "http://www.netflix.com",
            "null",
            "*",
        ] {
            assert_eq!(c.allow(Some(&h(other))), None, "{other}");
        }
        assert_eq!(c.allow(None), None);
    }
}
