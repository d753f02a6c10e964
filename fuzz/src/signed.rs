//! `signed_query`: the signed-URL query of the video routes (src/auth.rs,
//! src/auth/verified.rs).

use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use cdn_edge::auth::{is_valid_id, AuthFailure, Check, SignedUrls, Verifier};
use cdn_edge::config::{KeyMaterial, SigningKey};
use ring::signature::{Ed25519KeyPair, KeyPair as _};

/// The time the seeds are signed for (`e` = `NOW + 600` in corpus/signed_query).
pub const NOW: u64 = 1_800_000_000;
const SKEW: u64 = 30;
const MAX_TTL: u64 = 3_600;
/// The HMAC secret of the seeds.
pub const HMAC_SECRET: &[u8] = b"fuzz-hmac-secret";
/// The seed of the Ed25519 key pair of the seeds.
pub const ED25519_SEED: [u8; 32] = [7; 32];

/// Every key lands in one bucket of the cache of verified URLs, so only the comparison of
/// the values themselves tells two URLs apart.
#[derive(Default)]
struct OneBucket;

impl Hasher for OneBucket {
    fn finish(&self) -> u64 {
        42
    }
    fn write(&mut self, _: &[u8]) {}
}

/// The verifier, built once: deriving the Ed25519 key pair costs more than a run.
fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(build_verifier)
}

fn build_verifier() -> Verifier {
    let pair = Ed25519KeyPair::from_seed_unchecked(&ED25519_SEED).expect("a 32-byte seed");
    let public_key = pair.public_key().as_ref().try_into().expect("32 bytes");
    Verifier::new(
        &[
            SigningKey::hmac("h", HMAC_SECRET),
            SigningKey {
                id: "ed".into(),
                material: KeyMaterial::Ed25519 { public_key },
            },
        ],
        SKEW,
    )
    .with_max_ttl(MAX_TTL)
}

/// Up to four queries, one a line, checked in turn by one [`SignedUrls`] whose cache
/// puts every URL in one bucket, at two times (now, and once the seeds expired).
///
/// Invariants: an accepted query has a valid `o` and `v` and is within its lifetime;
/// [`SignedUrls::check`] gives exactly the answer of [`Verifier::verify`] (only adding
/// `Throttled` for a bad signature), so it never accepts what `verify` refuses, whatever
/// it cached before; a URL just verified is served from the cache next time.
pub fn signed_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let verifier = verifier();
    let urls = SignedUrls::with_hasher(
        verifier.clone(),
        1 << 16,
        2,
        BuildHasherDefault::<OneBucket>::default(),
    );
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for query in text.split('\n').take(4) {
        for now in [NOW, NOW + 10_000] {
            let verified = verifier.verify(query, now);
            if let Ok(s) = verified {
                assert!(is_valid_id(s.object) && is_valid_id(s.version), "{s:?}");
                assert!(
                    now <= s.expires.saturating_add(SKEW),
                    "accepted expired: {s:?}"
                );
                assert!(
                    s.expires <= now + MAX_TTL + SKEW,
                    "accepted past max_ttl: {s:?}"
                );
            }
            let checked = urls.check(query, now, client);
            match (&verified, &checked) {
                (Ok(v), Ok((c, _))) => assert_eq!(v, c),
                (Err(AuthFailure::BadSignature), Err(AuthFailure::Throttled)) => {}
                (Err(v), Err(c)) => assert_eq!(v, c, "{query:?}"),
                _ => panic!("verify {verified:?} but check {checked:?} for {query:?}"),
            }
            if verified.is_ok() {
                let again = urls.check(query, now, client).expect("accepted just now");
                assert_eq!(again.1, Check::Cached, "{query:?}");
            }
        }
    }
}
