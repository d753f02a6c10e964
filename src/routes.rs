//! Routing by path alone (SPEC §2): one node serves every hostname.

/// What a public request is for. Also the `route` label of request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// `/range/{start}-{end}` with a signed query.
    Range,
    /// `/` with a signed query, honouring a `Range` header.
    Object,
    /// A configured dictionary lookup path.
    Dictionary,
    /// `/msl/playapi/cadmium/event/*`
    Event,
    /// `/log/cadmium/logblob/*`
    LogBlob,
    /// `/stats`
    Stats,
    /// Anything else: 404.
    #[default]
    NotFound,
}

impl Route {
    pub const ALL: [Route; 7] = [
        Route::Range,
        Route::Object,
        Route::Dictionary,
        Route::Event,
        Route::LogBlob,
        Route::Stats,
        Route::NotFound,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Route::Range => "range",
            Route::Object => "object",
            Route::Dictionary => "dictionary",
            Route::Event => "event",
            Route::LogBlob => "logblob",
            Route::Stats => "stats",
            Route::NotFound => "not_found",
        }
    }

    /// Position in [`Route::ALL`], for per-route metric tables.
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Prefix of the byte-range route; the rest of the path is `{start}-{end}`.
pub const RANGE_PREFIX: &str = "/range/";
const EVENT_PREFIX: &str = "/msl/playapi/cadmium/event/";
const LOGBLOB_PREFIX: &str = "/log/cadmium/logblob/";

/// Maps a request path to its [`Route`].
#[derive(Debug, Clone, Default)]
pub struct Router {
    dictionary_paths: Vec<String>,
}

impl Router {
    pub fn new(dictionary_paths: Vec<String>) -> Self {
        Self { dictionary_paths }
    }

    pub fn route(&self, path: &str) -> Route {
        if path.starts_with(RANGE_PREFIX) {
            Route::Range
        } else if path == "/" {
            Route::Object
        } else if path.starts_with(EVENT_PREFIX) {
            Route::Event
        } else if path.starts_with(LOGBLOB_PREFIX) {
            Route::LogBlob
        } else if path == "/stats" {
            Route::Stats
        } else if self.dictionary_paths.iter().any(|p| p == path) {
            Route::Dictionary
        } else {
            Route::NotFound
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_path() {
        let r = Router::new(vec!["/base_dict_getHoverDict_8".into()]);
        let cases = [
            ("/range/0-1", Route::Range),
            ("/range/", Route::Range),
            ("/", Route::Object),
            ("/base_dict_getHoverDict_8", Route::Dictionary),
            ("/base_dict_getHoverDict_8/x", Route::NotFound),
            ("/msl/playapi/cadmium/event/1", Route::Event),
            ("/log/cadmium/logblob/1", Route::LogBlob),
            ("/stats", Route::Stats),
            ("/stats/", Route::NotFound),
            ("/range", Route::NotFound),
            ("/favicon.ico", Route::NotFound),
            ("", Route::NotFound),
        ];
        for (path, route) in cases {
            assert_eq!(r.route(path), route, "{path}");
        }
    }

    #[test]
    fn index_matches_all() {
        for (i, r) in Route::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
