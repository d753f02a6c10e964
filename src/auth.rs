//! Signed-URL verification (SPEC §2.1). Pure: no I/O, the clock is an argument.
//!
//! ```text
//! message = "o=" + o + "&v=" + v + "&e=" + e + "&t=" + t    (values as sent, still percent-encoded)
//! sc      = lowercase hex of HMAC-SHA256(secret, message)            (hmac-sha256 keys)
//!         | base64url, no padding, of Ed25519(private key, message)   (ed25519 keys)
//! ```
//! Ed25519 uses `ring` (already linked for TLS): it refuses a non-canonical `S` and
//! compares `R` byte for byte; public keys of small order are refused by the config.
//! Parameters are validated before the signature is checked, and the signature before
//! the expiry, so an unsigned or tampered URL is a 403 whatever its `e` says.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use ring::signature::{UnparsedPublicKey, ED25519};
use sha2::Sha256;

use crate::config::{KeyMaterial, SigningKey};

mod throttle;
mod verified;

pub use verified::{Check, SignedUrls};

type HmacSha256 = Hmac<Sha256>;

/// Longest accepted `o` or `v`.
pub const MAX_ID_LEN: usize = 256;
/// Length of an HMAC `sc`: the hex of 32 bytes.
const HMAC_SC_LEN: usize = 64;
/// Length of an Ed25519 `sc`: the unpadded base64url of 64 bytes.
const ED25519_SC_LEN: usize = 86;

/// Longest accepted `t`.
pub const MAX_TOKEN_LEN: usize = 512;

/// A signed parameter of the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    O,
    V,
    E,
    T,
    Sc,
}

impl Param {
    pub const fn name(self) -> &'static str {
        match self {
            Param::O => "o",
            Param::V => "v",
            Param::E => "e",
            Param::T => "t",
            Param::Sc => "sc",
        }
    }
}

/// Why a request was refused. Each variant is one metric label and one line of body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing(Param),
    Duplicate(Param),
    Malformed(Param),
    BadSignature,
    Expired,
    /// Signed, but expiring further ahead than `signing.max_ttl_secs` allows.
    TooLong,
    /// Not checked: the client sent more bad signatures this second than
    /// `signing.max_bad_signatures_per_sec` allows.
    Throttled,
}

impl AuthFailure {
    /// 410 for an expired URL, 429 for a throttled client, 403 for everything else.
    pub const fn status(self) -> u16 {
        match self {
            AuthFailure::Expired => 410,
            AuthFailure::Throttled => 429,
            _ => 403,
        }
    }

    /// Metric label (`cdn_edge_auth_failures_total{reason=…}`).
    pub const fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing(_) => "missing_param",
            AuthFailure::Duplicate(_) => "duplicate_param",
            AuthFailure::Malformed(Param::O) => "bad_object",
            AuthFailure::Malformed(Param::V) => "bad_version",
            AuthFailure::Malformed(Param::E) => "bad_expiry",
            AuthFailure::Malformed(Param::T) => "bad_token",
            AuthFailure::Malformed(Param::Sc) => "bad_signature_format",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Expired => "expired",
            AuthFailure::TooLong => "lifetime_too_long",
            AuthFailure::Throttled => "too_many_bad_signatures",
        }
    }

    /// Every label [`AuthFailure::reason`] can return, for registering metrics up front.
    pub const REASONS: [&'static str; 11] = [
        "missing_param",
        "duplicate_param",
        "bad_object",
        "bad_version",
        "bad_expiry",
        "bad_token",
        "bad_signature_format",
        "bad_signature",
        "expired",
        "lifetime_too_long",
        "too_many_bad_signatures",
    ];

    /// The one-line plain-text body sent to the client.
    pub fn message(self) -> String {
        match self {
            AuthFailure::Missing(p) => format!("missing query parameter {}", p.name()),
            AuthFailure::Duplicate(p) => format!("query parameter {} given twice", p.name()),
            AuthFailure::Malformed(Param::O) => {
                "malformed o: 1-256 of [A-Za-z0-9._-], not starting with '.', no '..'".into()
            }
            AuthFailure::Malformed(Param::V) => {
                "malformed v: 1-256 of [A-Za-z0-9._-], not starting with '.', no '..'".into()
            }
            AuthFailure::Malformed(Param::E) => "malformed e: expected unix seconds".into(),
            AuthFailure::Malformed(Param::T) => {
                "malformed t: at most 512 printable characters".into()
            }
            AuthFailure::Malformed(Param::Sc) => {
                "malformed sc: expected 64 lowercase hex (HMAC) or 86 base64url (Ed25519) characters".into()
            }
            AuthFailure::BadSignature => "signature does not match".into(),
            AuthFailure::Expired => "signed URL has expired".into(),
            AuthFailure::TooLong => {
                "signed URL expires further ahead than this edge accepts".into()
            }
            AuthFailure::Throttled => {
                "too many bad signatures from this address: try again in a second".into()
            }
        }
    }
}

/// The signed parameters of a request that passed verification; borrowed from the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signed<'q> {
    pub object: &'q str,
    pub version: &'q str,
    pub expires: u64,
}

/// Checks signatures against every active key. Built once from the config; cheap to share.
#[derive(Clone)]
pub struct Verifier {
    // Performance: each key's HMAC state is keyed once here and cloned per request,
    // which skips re-hashing the key.
    keys: Box<[HmacSha256]>,
    ed25519: Box<[UnparsedPublicKey<[u8; 32]>]>,
    clock_skew_secs: u64,
    /// Latest expiry accepted, as seconds after now (`None`: any).
    max_ttl_secs: Option<u64>,
}

impl Verifier {
    pub fn new(config_keys: &[SigningKey], clock_skew_secs: u64) -> Self {
        let keys = config_keys
            .iter()
            .filter_map(SigningKey::hmac_secret)
            .map(|secret| HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length"))
            .collect();
        let ed25519 = config_keys
            .iter()
            .filter_map(|k| match k.material {
                KeyMaterial::Ed25519 { public_key } => {
                    Some(UnparsedPublicKey::new(&ED25519, public_key))
                }
                KeyMaterial::HmacSha256 { .. } => None,
            })
            .collect();
        Self {
            keys,
            ed25519,
            clock_skew_secs,
            max_ttl_secs: None,
        }
    }

    /// Refuses URLs that expire more than `secs` (plus the clock skew) after now, so a
    /// leaked URL signed for a far future is not valid until its key is rotated.
    /// `0` accepts any expiry.
    pub fn with_max_ttl(mut self, secs: u64) -> Self {
        self.max_ttl_secs = (secs > 0).then_some(secs);
        self
    }

    /// Verifies the raw (still percent-encoded) query string at unix time `now`.
    pub fn verify<'q>(&self, query: &'q str, now: u64) -> Result<Signed<'q>, AuthFailure> {
        let p = SignedParams::parse(query)?;
        if !self.signature_matches(&p)? {
            return Err(AuthFailure::BadSignature);
        }
        self.check_lifetime(&p, now)?;
        Ok(p.signed())
    }

    /// Whether `sc` is a signature of the message under an active key of its kind.
    pub(crate) fn signature_matches(&self, p: &SignedParams<'_>) -> Result<bool, AuthFailure> {
        match p.sc.len() {
            HMAC_SC_LEN => self.matches_hmac(p),
            ED25519_SC_LEN => self.matches_ed25519(p),
            _ => Err(AuthFailure::Malformed(Param::Sc)),
        }
    }

    /// The time rules, for a URL whose signature is known to be good.
    pub(crate) fn check_lifetime(&self, p: &SignedParams<'_>, now: u64) -> Result<(), AuthFailure> {
        if now > p.expires.saturating_add(self.clock_skew_secs) {
            return Err(AuthFailure::Expired);
        }
        if let Some(ttl) = self.max_ttl_secs {
            if p.expires > now.saturating_add(ttl).saturating_add(self.clock_skew_secs) {
                return Err(AuthFailure::TooLong);
            }
        }
        Ok(())
    }

    /// The last unix second at which a URL expiring at `expires` is accepted.
    pub(crate) fn last_valid_second(&self, expires: u64) -> u64 {
        expires.saturating_add(self.clock_skew_secs)
    }
}

impl Verifier {
    fn matches_hmac(&self, p: &SignedParams<'_>) -> Result<bool, AuthFailure> {
        if !p.sc.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(AuthFailure::Malformed(Param::Sc));
        }
        let mut sig = [0u8; 32];
        hex::decode_to_slice(p.sc, &mut sig).map_err(|_| AuthFailure::Malformed(Param::Sc))?;
        Ok(self.keys.iter().any(|key| {
            let mut mac = key.clone();
            feed_message(&mut mac, p.o, p.v, p.e, p.t);
            // verify_slice compares in constant time.
            mac.verify_slice(&sig).is_ok()
        }))
    }

    fn matches_ed25519(&self, p: &SignedParams<'_>) -> Result<bool, AuthFailure> {
        let mut sig = [0u8; 64];
        // The engine refuses padding and non-zero trailing bits: one spelling per signature.
        match URL_SAFE_NO_PAD.decode_slice(p.sc, &mut sig) {
            Ok(64) => {}
            _ => return Err(AuthFailure::Malformed(Param::Sc)),
        }
        if self.ed25519.is_empty() {
            return Ok(false);
        }
        let message = message(p.o, p.v, p.e, p.t);
        Ok(self
            .ed25519
            .iter()
            .any(|key| key.verify(message.as_bytes(), &sig).is_ok()))
    }
}

/// The signed message: `o=…&v=…&e=…&t=…`.
fn message(o: &str, v: &str, e: &str, t: &str) -> String {
    format!("o={o}&v={v}&e={e}&t={t}")
}

fn feed_message(mac: &mut HmacSha256, o: &str, v: &str, e: &str, t: &str) {
    mac.update(b"o=");
    mac.update(o.as_bytes());
    mac.update(b"&v=");
    mac.update(v.as_bytes());
    mac.update(b"&e=");
    mac.update(e.as_bytes());
    mac.update(b"&t=");
    mac.update(t.as_bytes());
}

/// Signs `(o, v, e, t)` with `secret` and returns the full query string
/// `o=…&v=…&e=…&t=…&sc=…`. `t` must already be percent-encoded as it will be sent.
pub fn sign_query(secret: &[u8], o: &str, v: &str, expires: u64, t: &str) -> String {
    let e = expires.to_string();
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    feed_message(&mut mac, o, v, &e, t);
    let sc = hex::encode(mac.finalize().into_bytes());
    format!("o={o}&v={v}&e={e}&t={t}&sc={sc}")
}

/// Signs `(o, v, e, t)` with an Ed25519 key pair and returns the full query string,
/// `sc` being the unpadded base64url of the signature.
pub fn sign_query_ed25519(
    key: &ring::signature::Ed25519KeyPair,
    o: &str,
    v: &str,
    expires: u64,
    t: &str,
) -> String {
    let e = expires.to_string();
    let message = message(o, v, &e, t);
    let sc = URL_SAFE_NO_PAD.encode(key.sign(message.as_bytes()));
    format!("{message}&sc={sc}")
}

/// Whether `s` is a valid `o` or `v`: `[A-Za-z0-9_-][A-Za-z0-9._-]{0,255}` without `..`.
pub fn is_valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && b[0] != b'.'
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !s.contains("..")
}

fn is_valid_token(s: &str) -> bool {
    s.len() <= MAX_TOKEN_LEN && s.bytes().all(|c| c.is_ascii_graphic())
}

/// The signed parameters of a query, validated but not yet verified.
pub(crate) struct SignedParams<'q> {
    pub(crate) o: &'q str,
    pub(crate) v: &'q str,
    pub(crate) e: &'q str,
    pub(crate) t: &'q str,
    pub(crate) sc: &'q str,
    pub(crate) expires: u64,
}

impl<'q> SignedParams<'q> {
    pub(crate) fn signed(&self) -> Signed<'q> {
        Signed {
            object: self.o,
            version: self.v,
            expires: self.expires,
        }
    }

    pub(crate) fn parse(query: &'q str) -> Result<Self, AuthFailure> {
        let mut found: [Option<&'q str>; 5] = [None; 5];
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match k {
                "o" => 0,
                "v" => 1,
                "e" => 2,
                "t" => 3,
                "sc" => 4,
                _ => continue,
            };
            if found[slot].replace(v).is_some() {
                return Err(AuthFailure::Duplicate(PARAMS[slot]));
            }
        }
        let get = |i: usize| found[i].ok_or(AuthFailure::Missing(PARAMS[i]));
        let (o, v, e, t, sc) = (get(0)?, get(1)?, get(2)?, get(3)?, get(4)?);
        if !is_valid_id(o) {
            return Err(AuthFailure::Malformed(Param::O));
        }
        if !is_valid_id(v) {
            return Err(AuthFailure::Malformed(Param::V));
        }
        let expires = parse_unix_seconds(e).ok_or(AuthFailure::Malformed(Param::E))?;
        if !is_valid_token(t) {
            return Err(AuthFailure::Malformed(Param::T));
        }
        if sc.len() != HMAC_SC_LEN && sc.len() != ED25519_SC_LEN {
            return Err(AuthFailure::Malformed(Param::Sc));
        }
        Ok(Self {
            o,
            v,
            e,
            t,
            sc,
            expires,
        })
    }
}

const PARAMS: [Param; 5] = [Param::O, Param::V, Param::E, Param::T, Param::Sc];

fn parse_unix_seconds(e: &str) -> Option<u64> {
    if e.is_empty() || e.len() > 20 || !e.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    e.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key(id: &str, secret: &str) -> SigningKey {
        SigningKey::hmac(id, secret.as_bytes())
    }

    fn verifier() -> Verifier {
        Verifier::new(&[key("k1", "secret-one"), key("k2", "secret-two")], 30)
    }

    fn ed25519_pair(seed: u8) -> (ring::signature::Ed25519KeyPair, SigningKey) {
        use ring::signature::KeyPair as _;
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
        let public_key = pair.public_key().as_ref().try_into().unwrap();
        let key = SigningKey {
            id: format!("ed{seed}"),
            material: KeyMaterial::Ed25519 { public_key },
        };
        (pair, key)
    }

    /// HMAC keys k1, k2 and Ed25519 keys ed1, ed2, all active; the pairs of ed1, ed2.
    fn mixed() -> (Verifier, [ring::signature::Ed25519KeyPair; 2]) {
        let (p1, k1) = ed25519_pair(1);
        let (p2, k2) = ed25519_pair(2);
        let v = Verifier::new(
            &[key("k1", "secret-one"), k1, key("k2", "secret-two"), k2],
            30,
        );
        (v, [p1, p2])
    }

    fn sc(q: &str) -> &str {
        q.rsplit_once("&sc=").unwrap().1
    }

    #[test]
    fn ed25519_and_hmac_keys_together() {
        let (v, pairs) = mixed();
        for pair in &pairs {
            let q = sign_query_ed25519(pair, "movie_1", "v2.mp4", NOW + 60, "abc%20def");
            assert_eq!(sc(&q).len(), 86, "{q}");
            let s = v.verify(&q, NOW).unwrap();
            assert_eq!((s.object, s.expires), ("movie_1", NOW + 60));
        }
        for secret in [&b"secret-one"[..], b"secret-two"] {
            let q = sign_query(secret, "movie_1", "v2.mp4", NOW + 60, "");
            assert!(v.verify(&q, NOW).is_ok());
        }
    }

    #[test]
    fn ed25519_flipped_bit_or_tampered_field_is_403() {
        let (v, pairs) = mixed();
        let q = sign_query_ed25519(&pairs[0], "a", "1", NOW + 60, "tok");
        let mut sig = URL_SAFE_NO_PAD.decode(sc(&q)).unwrap();
        for bit in [0, 7, 8 * 31, 8 * 32 + 3, 8 * 63 + 6] {
            sig[bit / 8] ^= 1 << (bit % 8);
            let bad = format!(
                "o=a&v=1&e={}&t=tok&sc={}",
                NOW + 60,
                URL_SAFE_NO_PAD.encode(&sig)
            );
            sig[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                v.verify(&bad, NOW),
                Err(AuthFailure::BadSignature),
                "bit {bit}"
            );
        }
        let moved = q.replace("o=a&", "o=b&");
        assert_eq!(v.verify(&moved, NOW), Err(AuthFailure::BadSignature));
    }

    #[test]
    fn ed25519_wrong_key_is_403() {
        let (v, _) = mixed();
        let (other, _) = ed25519_pair(3);
        let q = sign_query_ed25519(&other, "a", "1", NOW + 60, "");
        assert_eq!(v.verify(&q, NOW), Err(AuthFailure::BadSignature));
        // Without any Ed25519 key, a well-formed Ed25519 sc is a bad signature too.
        assert_eq!(verifier().verify(&q, NOW), Err(AuthFailure::BadSignature));
    }

    #[test]
    fn ed25519_expired_is_410_and_skew_honoured() {
        let (v, pairs) = mixed();
        let q = sign_query_ed25519(&pairs[1], "a", "1", NOW, "");
        assert!(v.verify(&q, NOW + 30).is_ok());
        assert_eq!(v.verify(&q, NOW + 31), Err(AuthFailure::Expired));
        assert_eq!(AuthFailure::Expired.status(), 410);
    }

    #[test]
    fn ed25519_signature_in_other_spellings_is_403() {
        let (v, pairs) = mixed();
        let q = sign_query_ed25519(&pairs[0], "a", "1", NOW + 60, "");
        let raw = URL_SAFE_NO_PAD.decode(sc(&q)).unwrap();
        let base = q.rsplit_once("&sc=").unwrap().0;
        let padded = base64::engine::general_purpose::URL_SAFE.encode(&raw);
        let standard = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&raw);
        let mut trailing = sc(&q).to_string();
        // The last character carries 2 unused bits: setting one is another spelling.
        let last = trailing.pop().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let i = alphabet.find(last).unwrap();
        trailing.push(alphabet.as_bytes()[i ^ 1] as char);
        for spelling in [
            hex::encode(&raw),
            padded.clone(),
            padded.replace('=', "%3D"),
            trailing,
        ] {
            let bad = format!("{base}&sc={spelling}");
            let err = v.verify(&bad, NOW).unwrap_err();
            assert_eq!(err.status(), 403, "{spelling}");
        }
        if standard != sc(&q) {
            let bad = format!("{base}&sc={standard}");
            assert_eq!(v.verify(&bad, NOW).unwrap_err().status(), 403);
        }
    }

    #[test]
    fn known_vector() {
        // printf 'o=abc&v=1&e=1800000000&t=tok' | openssl dgst -sha256 -hmac secret-one
        assert_eq!(
            sign_query(b"secret-one", "abc", "1", 1_800_000_000, "tok"),
            "o=abc&v=1&e=1800000000&t=tok\
             &sc=aa6549086660babba27e908677870b9df7c6739877a031967740f2bf5e30cab9"
        );
    }

    #[test]
    fn valid_with_either_key() {
        let v = verifier();
        for secret in [&b"secret-one"[..], b"secret-two"] {
            let q = sign_query(secret, "movie_1", "v2.mp4", NOW + 60, "abc%20def");
            let s = v.verify(&q, NOW).unwrap();
            assert_eq!(
                (s.object, s.version, s.expires),
                ("movie_1", "v2.mp4", NOW + 60)
            );
        }
    }

    #[test]
    fn unknown_key_is_bad_signature() {
        let q = sign_query(b"other", "a", "1", NOW + 60, "");
        assert_eq!(verifier().verify(&q, NOW), Err(AuthFailure::BadSignature));
    }

    #[test]
    fn tampering_any_signed_field_fails() {
        let q = sign_query(b"secret-one", "obj", "1", NOW + 60, "tok");
        for (from, to) in [
            ("o=obj", "o=obk"),
            ("v=1", "v=2"),
            ("e=18", "e=19"),
            ("t=tok", "t=tol"),
        ] {
            let bad = q.replacen(from, to, 1);
            assert_eq!(
                verifier().verify(&bad, NOW),
                Err(AuthFailure::BadSignature),
                "{to}"
            );
        }
        let mut sc_flipped = q.clone();
        let last = sc_flipped.pop().unwrap();
        sc_flipped.push(if last == '0' { '1' } else { '0' });
        assert_eq!(
            verifier().verify(&sc_flipped, NOW),
            Err(AuthFailure::BadSignature)
        );
    }

    #[test]
    fn expiry_honours_skew() {
        let v = verifier();
        let q = sign_query(b"secret-one", "a", "1", NOW, "");
        assert!(v.verify(&q, NOW + 30).is_ok());
        assert_eq!(v.verify(&q, NOW + 31), Err(AuthFailure::Expired));
        assert_eq!(AuthFailure::Expired.status(), 410);
    }

    #[test]
    fn a_lifetime_past_max_ttl_is_403() {
        let v = verifier().with_max_ttl(3600);
        let within = sign_query(b"secret-one", "a", "1", NOW + 3600 + 30, "");
        assert!(v.verify(&within, NOW).is_ok(), "max_ttl plus the skew");
        let beyond = sign_query(b"secret-one", "a", "1", NOW + 3600 + 31, "");
        assert_eq!(v.verify(&beyond, NOW), Err(AuthFailure::TooLong));
        assert_eq!(AuthFailure::TooLong.status(), 403);
        let forever = sign_query(b"secret-one", "a", "1", u64::MAX, "");
        assert_eq!(v.verify(&forever, NOW), Err(AuthFailure::TooLong));
        assert!(
            verifier().with_max_ttl(0).verify(&forever, NOW).is_ok(),
            "0 is no limit"
        );
        // Tampered first: a forged far-future URL is a bad signature, not a long one.
        let forged = forever.replace("o=a", "o=b");
        assert_eq!(v.verify(&forged, NOW), Err(AuthFailure::BadSignature));
    }

    #[test]
    fn expired_but_tampered_is_403_not_410() {
        let q = sign_query(b"secret-one", "a", "1", NOW - 1000, "").replace("o=a", "o=b");
        assert_eq!(verifier().verify(&q, NOW).unwrap_err().status(), 403);
    }

    #[test]
    fn missing_and_duplicate_params() {
        let q = sign_query(b"secret-one", "a", "1", NOW + 60, "");
        for (p, name) in [
            (Param::O, "o="),
            (Param::V, "&v="),
            (Param::T, "&t="),
            (Param::Sc, "&sc="),
        ] {
            let without: String = q
                .split('&')
                .filter(|kv| !kv.starts_with(name.trim_start_matches('&')))
                .collect::<Vec<_>>()
                .join("&");
            assert_eq!(
                verifier().verify(&without, NOW),
                Err(AuthFailure::Missing(p)),
                "{name}"
            );
        }
        let twice = format!("{q}&o=a");
        assert_eq!(
            verifier().verify(&twice, NOW),
            Err(AuthFailure::Duplicate(Param::O))
        );
        assert_eq!(
            verifier().verify("", NOW),
            Err(AuthFailure::Missing(Param::O))
        );
    }

    #[test]
    fn other_params_are_ignored() {
        let q = sign_query(b"secret-one", "a", "1", NOW + 60, "");
        assert!(verifier().verify(&format!("x=1&{q}&y&z=%ZZ"), NOW).is_ok());
    }

    #[test]
    fn ids_are_validated() {
        for good in ["a", "A9_-.x", "-x", "_", &"a".repeat(256)] {
            assert!(is_valid_id(good), "{good}");
        }
        for bad in [
            "",
            ".",
            ".x",
            "a..b",
            "a/b",
            "a%2F",
            "a b",
            "é",
            &"a".repeat(257),
            "..",
        ] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn malformed_params() {
        let cases = [
            ("o=..&v=1&e=1&t=&sc=", Param::O),
            ("o=a&v=a/b&e=1&t=&sc=", Param::V),
            ("o=a&v=1&e=-1&t=&sc=", Param::E),
            ("o=a&v=1&e=&t=&sc=", Param::E),
            ("o=a&v=1&e=99999999999999999999999&t=&sc=", Param::E),
            ("o=a&v=1&e=18446744073709551616&t=&sc=", Param::E),
            ("o=a&v=1&e=1&t=a b&sc=", Param::T),
            ("o=a&v=1&e=1&t=&sc=abc", Param::Sc),
        ];
        for (q, p) in cases {
            assert_eq!(
                verifier().verify(q, NOW),
                Err(AuthFailure::Malformed(p)),
                "{q}"
            );
        }
        let long_t = format!("o=a&v=1&e=1&t={}&sc=", "x".repeat(513));
        assert_eq!(
            verifier().verify(&long_t, NOW),
            Err(AuthFailure::Malformed(Param::T))
        );
        let q = sign_query(b"secret-one", "a", "1", NOW, "");
        let (head, sc) = q.split_at(q.len() - 64);
        let upper = format!("{head}{}", sc.to_uppercase());
        assert_eq!(
            verifier().verify(&upper, NOW),
            Err(AuthFailure::Malformed(Param::Sc))
        );
    }

    #[test]
    fn every_reason_is_registered() {
        let all = [
            AuthFailure::Missing(Param::O),
            AuthFailure::Duplicate(Param::O),
            AuthFailure::Malformed(Param::O),
            AuthFailure::Malformed(Param::V),
            AuthFailure::Malformed(Param::E),
            AuthFailure::Malformed(Param::T),
            AuthFailure::Malformed(Param::Sc),
            AuthFailure::BadSignature,
            AuthFailure::Expired,
            AuthFailure::TooLong,
        ];
        for f in all {
            assert!(AuthFailure::REASONS.contains(&f.reason()));
            assert!(!f.message().contains('\n'));
        }
    }
}
