//! `[[signing.keys]]` (SPEC 2.1): HMAC-SHA256 secrets and Ed25519 public keys.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;

use super::{invalid, ConfigError};

/// The DER prefix of an Ed25519 `SubjectPublicKeyInfo` (RFC 8410), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// The encodings of the points of small order (libsodium's list; byte 31 without its
/// sign bit; the last two are the non-canonical y = p and y = p + 1). Such a public key
/// would accept forged signatures: `ring` does not refuse them, so the config does.
const SMALL_ORDER_KEYS: [[u8; 32]; 7] = [
    [0; 32],
    {
        let mut k = [0; 32];
        k[0] = 1;
        k
    },
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
    high_y(0xec),
    high_y(0xed),
    high_y(0xee),
];

/// `[first, 0xff × 30, 0x7f]`: y = p - 1, p, p + 1 for `first` = 0xec, 0xed, 0xee.
const fn high_y(first: u8) -> [u8; 32] {
    let mut k = [0xff; 32];
    k[0] = first;
    k[31] = 0x7f;
    k
}

fn is_small_order(key: &[u8; 32]) -> bool {
    let mut k = *key;
    k[31] &= 0x7f;
    SMALL_ORDER_KEYS.contains(&k)
}

/// Length of an Ed25519 public key, in bytes.
pub const ED25519_PUBLIC_KEY_LEN: usize = 32;

/// What a key checks signatures with.
#[derive(Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// `alg = "hmac-sha256"` (the default): the UTF-8 bytes of the configured secret.
    HmacSha256 { secret: Vec<u8> },
    /// `alg = "ed25519"`: the 32-byte public key.
    Ed25519 {
        public_key: [u8; ED25519_PUBLIC_KEY_LEN],
    },
}

/// One active signing key.
#[derive(Clone)]
pub struct SigningKey {
    pub id: String,
    pub material: KeyMaterial,
}

impl SigningKey {
    /// An `hmac-sha256` key.
    pub fn hmac(id: impl Into<String>, secret: &[u8]) -> Self {
        Self {
            id: id.into(),
            material: KeyMaterial::HmacSha256 {
                secret: secret.to_vec(),
            },
        }
    }

    /// The HMAC secret, for an `hmac-sha256` key.
    pub fn hmac_secret(&self) -> Option<&[u8]> {
        match &self.material {
            KeyMaterial::HmacSha256 { secret } => Some(secret),
            KeyMaterial::Ed25519 { .. } => None,
        }
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("SigningKey");
        d.field("id", &self.id);
        match &self.material {
            KeyMaterial::HmacSha256 { .. } => d.field("secret", &"<redacted>"),
            KeyMaterial::Ed25519 { public_key } => {
                d.field("public_key", &STANDARD.encode(public_key))
            }
        };
        d.finish()
    }
}

/// `alg` of a `[[signing.keys]]` entry.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Alg {
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "ed25519")]
    Ed25519,
}

/// A `[[signing.keys]]` entry as written in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    #[serde(default)]
    pub alg: Alg,
    pub secret: Option<String>,
    pub secret_env: Option<String>,
    pub public_key: Option<String>,
    pub public_key_file: Option<std::path::PathBuf>,
}

/// Validates the entries of `signing.keys`: ids unique and non-empty, each key readable.
pub(super) fn validate_keys(
    raw: Vec<RawKey>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<SigningKey>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid("signing.keys", "at least one key is required"));
    }
    let mut keys: Vec<SigningKey> = Vec::with_capacity(raw.len());
    for (i, k) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("signing.keys[{i}].{field}");
        if k.id.is_empty() {
            return Err(invalid(at("id"), "must not be empty"));
        }
        if keys.iter().any(|known| known.id == k.id) {
            return Err(invalid(at("id"), format!("duplicate key id {:?}", k.id)));
        }
        let material = match k.alg {
            Alg::HmacSha256 => hmac_key(&k, env, &at)?,
            Alg::Ed25519 => ed25519_key(&k, &at)?,
        };
        keys.push(SigningKey { id: k.id, material });
    }
    Ok(keys)
}

fn hmac_key(
    k: &RawKey,
    env: &dyn Fn(&str) -> Option<String>,
    at: &dyn Fn(&str) -> String,
) -> Result<KeyMaterial, ConfigError> {
    let id = &k.id;
    if k.public_key.is_some() || k.public_key_file.is_some() {
        return Err(invalid(
            at("public_key"),
            format!("key {id:?}: a public key needs alg = \"ed25519\""),
        ));
    }
    let secret = match (&k.secret, &k.secret_env) {
        (Some(s), None) => s.clone(),
        (None, Some(var)) => env(var).ok_or_else(|| {
            invalid(
                at("secret_env"),
                format!("environment variable {var} is not set"),
            )
        })?,
        (Some(_), Some(_)) => {
            return Err(invalid(
                at("secret"),
                "set either secret or secret_env, not both",
            ))
        }
        (None, None) => return Err(invalid(at("secret"), "secret or secret_env is required")),
    };
    if secret.is_empty() {
        return Err(invalid(at("secret"), "must not be empty"));
    }
    Ok(KeyMaterial::HmacSha256 {
        secret: secret.into_bytes(),
    })
}

fn ed25519_key(k: &RawKey, at: &dyn Fn(&str) -> String) -> Result<KeyMaterial, ConfigError> {
    let id = &k.id;
    if k.secret.is_some() || k.secret_env.is_some() {
        return Err(invalid(
            at("secret"),
            format!("key {id:?}: an ed25519 key holds a public key, not a secret"),
        ));
    }
    let public_key = match (&k.public_key, &k.public_key_file) {
        (Some(text), None) => parse_public_key(text)
            .map_err(|e| invalid(at("public_key"), format!("key {id:?}: {e}")))?,
        (None, Some(path)) => read_public_key(path).map_err(|e| {
            invalid(
                at("public_key_file"),
                format!("key {id:?}: {}: {e}", path.display()),
            )
        })?,
        (Some(_), Some(_)) => {
            return Err(invalid(
                at("public_key"),
                format!("key {id:?}: set either public_key or public_key_file, not both"),
            ))
        }
        (None, None) => {
            return Err(invalid(
                at("public_key"),
                format!("key {id:?}: public_key or public_key_file is required"),
            ))
        }
    };
    if is_small_order(&public_key) {
        return Err(invalid(
            at("public_key"),
            format!("key {id:?}: a point of small order is not a usable public key"),
        ));
    }
    Ok(KeyMaterial::Ed25519 { public_key })
}

/// Reads a `public_key_file`: the base64 of the key, or a PEM `PUBLIC KEY` (SPKI).
/// Blocking: only called while the configuration loads, before the runtime starts.
fn read_public_key(path: &Path) -> Result<[u8; ED25519_PUBLIC_KEY_LEN], String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the file: {e}"))?;
    parse_public_key(&text)
}

/// Parses the base64 of a 32-byte Ed25519 public key, or a PEM `PUBLIC KEY` block.
pub fn parse_public_key(text: &str) -> Result<[u8; ED25519_PUBLIC_KEY_LEN], String> {
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        let der = pem_body(text, "PUBLIC KEY")?;
        let key = der
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .filter(|k| k.len() == ED25519_PUBLIC_KEY_LEN)
            .ok_or("the PEM PUBLIC KEY is not an Ed25519 SubjectPublicKeyInfo")?;
        return Ok(key.try_into().expect("length checked"));
    }
    let bytes = STANDARD
        .decode(text)
        .map_err(|e| format!("not standard base64: {e}"))?;
    bytes.as_slice().try_into().map_err(|_| {
        format!(
            "an Ed25519 public key is {ED25519_PUBLIC_KEY_LEN} bytes, this one is {}",
            bytes.len()
        )
    })
}

/// Reads an Ed25519 private key for `cdn-edge sign`: the standard base64 of the 32-byte
/// seed, or a PKCS#8 PEM `PRIVATE KEY`. Blocking: for the command line only.
pub fn read_private_key(path: &Path) -> Result<ring::signature::Ed25519KeyPair, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the file: {e}", path.display()))?;
    parse_private_key(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses the base64 of a 32-byte seed, or a PKCS#8 PEM `PRIVATE KEY`.
pub fn parse_private_key(text: &str) -> Result<ring::signature::Ed25519KeyPair, String> {
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        let der = pem_body(text, "PRIVATE KEY")?;
        return ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| format!("not an Ed25519 PKCS#8 private key: {e}"));
    }
    let seed = STANDARD
        .decode(text)
        .map_err(|e| format!("not standard base64: {e}"))?;
    if seed.len() != 32 {
        return Err(format!(
            "an Ed25519 private key (seed) is 32 bytes, this one is {}",
            seed.len()
        ));
    }
    ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|e| format!("not an Ed25519 seed: {e}"))
}

/// The DER bytes of a single PEM block labelled `label`.
pub fn pem_body(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text
        .trim()
        .strip_prefix(begin.as_str())
        .and_then(|rest| rest.trim_end().strip_suffix(end.as_str()))
        .ok_or_else(|| format!("expected a PEM block {begin} ... {end}"))?;
    let b64: String = body.split_whitespace().collect();
    STANDARD
        .decode(b64)
        .map_err(|e| format!("the PEM body is not base64: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // 7 × 32: a point of large order.
    const KEY: [u8; 32] = [7; 32];

    fn raw(alg: Alg) -> RawKey {
        RawKey {
            id: "k2".into(),
            alg,
            secret: None,
            secret_env: None,
            public_key: None,
            public_key_file: None,
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn err(k: RawKey) -> String {
        validate_keys(vec![k], &no_env).unwrap_err().to_string()
    }

    fn spki_pem(key: &[u8]) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(key);
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(der)
        )
    }

    #[test]
    fn ed25519_key_from_base64() {
        let mut k = raw(Alg::Ed25519);
        k.public_key = Some(STANDARD.encode(KEY));
        let keys = validate_keys(vec![k], &no_env).unwrap();
        assert!(keys[0].material == KeyMaterial::Ed25519 { public_key: KEY });
        assert!(keys[0].hmac_secret().is_none());
    }

    #[test]
    fn ed25519_key_from_file_base64_or_pem() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("b64", format!("{}\n", STANDARD.encode(KEY))),
            ("pem", spki_pem(&KEY)),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let mut k = raw(Alg::Ed25519);
            k.public_key_file = Some(path);
            let keys = validate_keys(vec![k], &no_env).unwrap();
            assert!(
                keys[0].material == KeyMaterial::Ed25519 { public_key: KEY },
                "{name}"
            );
        }
    }

    #[test]
    fn wrong_length_names_the_key() {
        let mut k = raw(Alg::Ed25519);
        k.public_key = Some(STANDARD.encode([1u8; 31]));
        let e = err(k);
        assert!(e.contains("signing.keys[0].public_key"), "{e}");
        assert!(e.contains("\"k2\"") && e.contains("31"), "{e}");
    }

    #[test]
    fn bad_base64_is_refused() {
        let mut k = raw(Alg::Ed25519);
        // base64url alphabet: the standard alphabet is required.
        k.public_key = Some(base64::engine::general_purpose::URL_SAFE.encode([0xfbu8; 32]));
        let e = err(k);
        assert!(
            e.contains("not standard base64") && e.contains("\"k2\""),
            "{e}"
        );
    }

    #[test]
    fn unreadable_file_names_key_and_file() {
        let mut k = raw(Alg::Ed25519);
        k.public_key_file = Some("/nonexistent/k2.pub".into());
        let e = err(k);
        assert!(e.contains("public_key_file") && e.contains("\"k2\""), "{e}");
        assert!(
            e.contains("/nonexistent/k2.pub") && e.contains("cannot read"),
            "{e}"
        );
    }

    #[test]
    fn pem_of_another_key_type_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.pem");
        // A 33-byte key: not Ed25519.
        std::fs::write(&path, spki_pem(&[1u8; 33])).unwrap();
        let mut k = raw(Alg::Ed25519);
        k.public_key_file = Some(path.clone());
        let e = err(k);
        assert!(
            e.contains("not an Ed25519") && e.contains(&path.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn secret_on_an_ed25519_key_is_refused() {
        let mut k = raw(Alg::Ed25519);
        k.public_key = Some(STANDARD.encode(KEY));
        k.secret = Some("s".into());
        let e = err(k);
        assert!(
            e.contains("signing.keys[0].secret") && e.contains("not a secret"),
            "{e}"
        );
    }

    #[test]
    fn public_key_on_an_hmac_key_is_refused() {
        let mut k = raw(Alg::HmacSha256);
        k.secret = Some("s".into());
        k.public_key = Some(STANDARD.encode(KEY));
        let e = err(k);
        assert!(e.contains("needs alg"), "{e}");
    }

    #[test]
    fn missing_or_double_public_key_is_refused() {
        assert!(err(raw(Alg::Ed25519)).contains("public_key or public_key_file is required"));
        let mut k = raw(Alg::Ed25519);
        k.public_key = Some(STANDARD.encode(KEY));
        k.public_key_file = Some("/x".into());
        assert!(err(k).contains("not both"));
    }

    #[test]
    fn small_order_keys_are_refused() {
        for bad in SMALL_ORDER_KEYS {
            for sign in [0, 0x80] {
                let mut key = bad;
                key[31] |= sign;
                let mut k = raw(Alg::Ed25519);
                k.public_key = Some(STANDARD.encode(key));
                assert!(err(k).contains("small order"), "{key:02x?}");
            }
        }
    }

    #[test]
    fn private_key_from_seed_or_pkcs8() {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(pkcs8.as_ref())
        );
        assert!(parse_private_key(&pem).is_ok());
        let from_seed = parse_private_key(&STANDARD.encode([9u8; 32])).unwrap();
        let again = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap();
        assert_eq!(from_seed.public_key().as_ref(), again.public_key().as_ref());
        assert!(parse_private_key(&STANDARD.encode([9u8; 31]))
            .unwrap_err()
            .contains("31"));
    }

    #[test]
    fn hmac_and_ed25519_keys_together() {
        let mut h = raw(Alg::HmacSha256);
        h.id = "k1".into();
        h.secret = Some("xyz".into());
        let mut e = raw(Alg::Ed25519);
        e.public_key = Some(STANDARD.encode(KEY));
        let keys = validate_keys(vec![h, e], &no_env).unwrap();
        assert_eq!(keys[0].hmac_secret(), Some(&b"xyz"[..]));
        assert!(keys[1].material == KeyMaterial::Ed25519 { public_key: KEY });
    }
}
