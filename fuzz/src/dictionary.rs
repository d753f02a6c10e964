//! `dictionary_key`: the canonical key of a dictionary lookup (src/dictionary/key.rs).

use cdn_edge::dictionary::key::{canonical_target, KeyError};

const PATH: &str = "/base_dict_getHoverDict_8";

/// The raw query of a lookup.
///
/// Invariants: a canonical target is the path, then `?` and the parameters when there
/// are any, and is plain ASCII; canonicalising it again gives it back unchanged; a query
/// that is not UTF-8 is refused as such.
pub fn dictionary_key(data: &[u8]) {
    let canonical = match canonical_target(PATH, Some(data)) {
        Ok(c) => c,
        Err(KeyError::NotUtf8) if std::str::from_utf8(data).is_err() => return,
        Err(_) => {
            assert!(std::str::from_utf8(data).is_ok(), "{data:?}");
            return;
        }
    };
    assert!(canonical.is_ascii(), "{canonical:?}");
    let query = canonical.strip_prefix(PATH).expect("starts with the path");
    let query = match query.strip_prefix('?') {
        Some(q) => {
            assert!(!q.is_empty(), "{canonical:?}");
            Some(q.as_bytes())
        }
        None => {
            assert!(query.is_empty(), "{canonical:?}");
            None
        }
    };
    let again = canonical_target(PATH, query).expect("a canonical target is valid");
    assert_eq!(again, canonical, "not idempotent for {data:?}");
}
