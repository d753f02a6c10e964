//! Canonical dictionary keys (SPEC §2.4): path + every query parameter, percent-decoded,
//! Unicode NFC-normalised, sorted. Pure.
//!
//! `form=%EC%96%B4` (NFC) and the same word typed as conjoining jamo (NFD) are one key.
//! The query is read as `application/x-www-form-urlencoded`: `+` is a space.

use std::borrow::Cow;

use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Characters left as they are when the canonical query is written: RFC 3986 unreserved.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Most parameters in one lookup.
pub const MAX_PARAMS: usize = 64;

/// Why a query cannot be a dictionary key: a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("malformed percent-encoding in the query")]
    BadPercentEncoding,
    #[error("query is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("too many query parameters")]
    TooManyParams,
}

/// Builds the canonical `path?query` for a lookup; it is both the cache key and the
/// upstream request target.
pub fn canonical_target(path: &str, raw_query: Option<&[u8]>) -> Result<String, KeyError> {
    // Checked once for the whole query: a byte that is not UTF-8 as sent can never
    // decode to UTF-8, and splitting at the ASCII bytes `&` and `=` keeps every piece
    // valid.
    let query = match raw_query {
        Some(q) => std::str::from_utf8(q).map_err(|_| KeyError::NotUtf8)?,
        None => "",
    };
    let mut params: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::with_capacity(8);
    let mut rest = query;
    while !rest.is_empty() {
        let end = rest.bytes().position(|b| b == b'&').unwrap_or(rest.len());
        let pair = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
        if pair.is_empty() {
            continue;
        }
        if params.len() == MAX_PARAMS {
            return Err(KeyError::TooManyParams);
        }
        let (k, v) = match pair.bytes().position(|b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, ""),
        };
        params.push((decode(k)?, decode(v)?));
    }
    params.sort_unstable();
    let mut out = String::with_capacity(path.len() + query.len() + 16);
    out.push_str(path);
    for (i, (k, v)) in params.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        encode_into(&mut out, k);
        out.push('=');
        encode_into(&mut out, v);
    }
    Ok(out)
}

/// Appends `text` percent-encoded (all but the unreserved characters).
fn encode_into(out: &mut String, text: &str) {
    // Performance: most keys and values need no escaping at all.
    if text.bytes().all(is_unreserved) {
        out.push_str(text);
    } else {
        out.extend(utf8_percent_encode(text, UNRESERVED));
    }
}

/// The bytes [`UNRESERVED`] leaves as they are (a test keeps the two in step).
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Percent-decodes (strictly: `%` must start two hex digits), checks UTF-8, applies NFC.
/// Borrows the raw text when there is nothing to decode or normalise (most parameters).
fn decode(raw: &str) -> Result<Cow<'_, str>, KeyError> {
    let bytes = raw.as_bytes();
    let mut escaped = false;
    let mut ascii = true;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' if !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit)) =>
            {
                return Err(KeyError::BadPercentEncoding)
            }
            b'%' | b'+' => escaped = true,
            0x80.. => ascii = false,
            _ => {}
        }
    }
    // Performance: ASCII is always NFC, and most parameters are plain ASCII.
    if !escaped {
        return Ok(if ascii {
            Cow::Borrowed(raw)
        } else {
            nfc(Cow::Borrowed(raw))
        });
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    for (i, part) in bytes.split(|&b| b == b'+').enumerate() {
        if i > 0 {
            decoded.push(b' ');
        }
        decoded.extend(percent_decode(part));
    }
    let text = String::from_utf8(decoded).map_err(|_| KeyError::NotUtf8)?;
    Ok(nfc(Cow::Owned(text)))
}

/// Players send composed text; only text that may not be NFC is rebuilt.
fn nfc(text: Cow<'_, str>) -> Cow<'_, str> {
    if text.is_ascii() || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        text
    } else {
        Cow::Owned(text.nfc().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/base_dict_getHoverDict_8";

    fn key(q: &str) -> Result<String, KeyError> {
        canonical_target(P, Some(q.as_bytes()))
    }

    #[test]
    fn the_fast_path_escapes_exactly_what_the_encode_set_does() {
        for b in 0u8..0x80 {
            let s = (b as char).to_string();
            let encoded = utf8_percent_encode(&s, UNRESERVED).to_string();
            assert_eq!(is_unreserved(b), encoded == s, "byte {b:#04x}");
        }
    }

    #[test]
    fn the_players_lookup() {
        let k = key("form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n").unwrap();
        assert_eq!(
            k,
            "/base_dict_getHoverDict_8?form=%EC%96%B4&lemma=&pos=NOUN&pow=n&sl=ko&tl=en"
        );
    }

    #[test]
    fn parameter_order_does_not_matter() {
        assert_eq!(
            key("sl=ko&tl=en&form=a").unwrap(),
            key("form=a&tl=en&sl=ko").unwrap()
        );
    }

    #[test]
    fn nfd_and_nfc_are_one_key() {
        // 어 as one precomposed syllable (NFC) and as two conjoining jamo (NFD).
        let nfc = key("form=%EC%96%B4&sl=ko").unwrap();
        let nfd = key("form=%E1%84%8B%E1%85%A5&sl=ko").unwrap();
        assert_eq!(nfc, nfd);
        let raw_nfd = format!("form={}&sl=ko", "\u{110B}\u{1165}");
        assert_eq!(canonical_target(P, Some(raw_nfd.as_bytes())).unwrap(), nfc);
    }

    #[test]
    fn encodings_of_the_same_text_are_one_key() {
        assert_eq!(key("form=a%20b").unwrap(), key("form=a+b").unwrap());
        assert_eq!(key("form=+a++").unwrap(), key("form=%20a%20%20").unwrap());
        // An encoded plus is a plus, not a space.
        assert_ne!(key("form=a%2Bb").unwrap(), key("form=a+b").unwrap());
        assert_eq!(key("form=a%2Bb").unwrap(), format!("{P}?form=a%2Bb"));
        assert_eq!(key("form=%41").unwrap(), key("form=A").unwrap());
        assert_eq!(
            key("form=%e3%81%82").unwrap(),
            key("form=%E3%81%82").unwrap()
        );
    }

    #[test]
    fn every_parameter_splits_the_key() {
        let base = key("form=a&pos=NOUN&sl=ko&tl=en").unwrap();
        for other in [
            "form=a&pos=VERB&sl=ko&tl=en",
            "form=a&pos=NOUN&sl=ja&tl=en",
            "form=a&pos=NOUN&sl=ko&tl=fr",
            "form=a&pos=NOUN&sl=ko&tl=en&x=1",
        ] {
            assert_ne!(key(other).unwrap(), base, "{other}");
        }
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(key("form=%"), Err(KeyError::BadPercentEncoding));
        assert_eq!(key("form=%E"), Err(KeyError::BadPercentEncoding));
        assert_eq!(key("form=%ZZ"), Err(KeyError::BadPercentEncoding));
        assert_eq!(key("form=%FF%FE"), Err(KeyError::NotUtf8));
        assert_eq!(
            canonical_target(P, Some(b"form=\xff")),
            Err(KeyError::NotUtf8)
        );
        // Bytes that are not UTF-8 as sent are found first, wherever they are.
        assert_eq!(
            canonical_target(P, Some(b"form=%ZZ&x=\xff")),
            Err(KeyError::NotUtf8)
        );
        let many = vec!["a=1"; MAX_PARAMS + 1].join("&");
        assert_eq!(key(&many), Err(KeyError::TooManyParams));
    }

    #[test]
    fn empty_and_valueless_parameters() {
        assert_eq!(canonical_target(P, None).unwrap(), P);
        assert_eq!(key("").unwrap(), P);
        assert_eq!(key("&&a&b=").unwrap(), format!("{P}?a=&b="));
    }

    #[test]
    fn reserved_characters_are_re_encoded() {
        assert_eq!(
            key("form=a%26b%3Dc").unwrap(),
            format!("{P}?form=a%26b%3Dc")
        );
        assert_eq!(key("form=a/b").unwrap(), format!("{P}?form=a%2Fb"));
    }
}
