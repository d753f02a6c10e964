//! Signed queries that passed verification, kept until they expire. A player asks for
//! every range of an object under one signed URL, so the signature (tens of µs for
//! Ed25519) is checked once per URL, not once per request.
//!
//! Only good signatures enter, so forged URLs cannot evict good ones. An entry records
//! that `sc` signs `(o, v, e, t)`, which does not change with time: the expiry is
//! checked against the clock on every request, cached or not. Entries are found by a
//! keyed hash of the five values and confirmed by comparing the values themselves, so
//! two URLs are never taken for each other even if their hashes collide.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::throttle::FailureThrottle;
use super::{AuthFailure, Signed, SignedParams, Verifier};

/// Bytes counted per entry besides its text: the key, the `Arc`, moka's own record.
const ENTRY_OVERHEAD: usize = 128;

/// How a request's URL was found good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Already verified by an earlier request.
    Cached,
    /// Verified now (or the cache is off).
    Verified,
}

/// The verifier with its cache of verified URLs and the per-client budget of bad
/// signatures. Built once from the config and shared by all workers.
pub struct SignedUrls<S = RandomState> {
    verifier: Verifier,
    verified: Option<moka::sync::Cache<u64, Arc<Entry>>>,
    hasher: S,
    throttle: FailureThrottle,
}

struct Entry {
    /// `o&v&e&t&sc`: `&` separates the query's parameters, so it is in none of them.
    text: Box<str>,
    /// Time left at insertion until the URL expires (skew included).
    lifetime: Duration,
}

impl Entry {
    fn is_for(&self, p: &SignedParams<'_>) -> bool {
        self.text.split('&').eq([p.o, p.v, p.e, p.t, p.sc])
    }
}

struct UntilExpiry;

impl moka::Expiry<u64, Arc<Entry>> for UntilExpiry {
    fn expire_after_create(&self, _: &u64, entry: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(entry.lifetime)
    }
}

impl SignedUrls {
    /// `cache_bytes` bounds the verified URLs kept (`0`: none are); `max_bad_per_sec` is
    /// each client address's budget of bad signatures a second (`0`: no budget).
    pub fn new(verifier: Verifier, cache_bytes: u64, max_bad_per_sec: u32) -> Self {
        Self::with_hasher(verifier, cache_bytes, max_bad_per_sec, RandomState::new())
    }
}

impl<S: BuildHasher> SignedUrls<S> {
    pub fn with_hasher(
        verifier: Verifier,
        cache_bytes: u64,
        max_bad_per_sec: u32,
        hasher: S,
    ) -> Self {
        let verified = (cache_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(cache_bytes)
                .weigher(|_, e: &Arc<Entry>| {
                    u32::try_from(e.text.len() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
                })
                .expire_after(UntilExpiry)
                .build()
        });
        Self {
            verifier,
            verified,
            hasher,
            throttle: FailureThrottle::new(max_bad_per_sec),
        }
    }

    /// Checks the raw query of a request from `client` at unix time `now`: the same
    /// answers as [`Verifier::verify`], plus [`AuthFailure::Throttled`] for a client over
    /// its budget whose URL is not already verified.
    pub fn check<'q>(
        &self,
        query: &'q str,
        now: u64,
        client: IpAddr,
    ) -> Result<(Signed<'q>, Check), AuthFailure> {
        let p = SignedParams::parse(query)?;
        let Some(verified) = &self.verified else {
            self.verify_signature(&p, now, client)?;
            self.verifier.check_lifetime(&p, now)?;
            return Ok((p.signed(), Check::Verified));
        };
        let key = self.hasher.hash_one((p.o, p.v, p.e, p.t, p.sc));
        if verified.get(&key).is_some_and(|e| e.is_for(&p)) {
            self.verifier.check_lifetime(&p, now)?;
            return Ok((p.signed(), Check::Cached));
        }
        self.verify_signature(&p, now, client)?;
        self.verifier.check_lifetime(&p, now)?;
        let last = self.verifier.last_valid_second(p.expires);
        verified.insert(
            key,
            Arc::new(Entry {
                text: [p.o, p.v, p.e, p.t, p.sc].join("&").into_boxed_str(),
                lifetime: Duration::from_secs(last.saturating_sub(now).saturating_add(1)),
            }),
        );
        Ok((p.signed(), Check::Verified))
    }

    fn verify_signature(
        &self,
        p: &SignedParams<'_>,
        now: u64,
        client: IpAddr,
    ) -> Result<(), AuthFailure> {
        if !self.throttle.allows(client, now) {
            return Err(AuthFailure::Throttled);
        }
        if self.verifier.signature_matches(p)? {
            Ok(())
        } else {
            self.throttle.note_failure(client, now);
            Err(AuthFailure::BadSignature)
        }
    }

    /// Verified URLs held (approximate: moka counts lazily).
    pub fn cached_urls(&self) -> u64 {
        self.verified.as_ref().map_or(0, |v| {
            v.run_pending_tasks();
            v.entry_count()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasherDefault, Hasher};

    use ring::signature::{Ed25519KeyPair, KeyPair as _};

    use super::*;
    use crate::auth::{sign_query, sign_query_ed25519};
    use crate::config::{KeyMaterial, SigningKey};

    const NOW: u64 = 1_800_000_000;
    const SKEW: u64 = 30;
    const HMAC_SECRET: &[u8] = b"secret-one";

    fn client(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from_bits(0x0a00_0000 + n))
    }

    fn pair() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap()
    }

    fn verifier() -> Verifier {
        let public_key = pair().public_key().as_ref().try_into().unwrap();
        Verifier::new(
            &[
                SigningKey::hmac("k1", HMAC_SECRET),
                SigningKey {
                    id: "ed".into(),
                    material: KeyMaterial::Ed25519 { public_key },
                },
            ],
            SKEW,
        )
    }

    fn urls() -> SignedUrls {
        SignedUrls::new(verifier(), 1 << 20, 20)
    }

    fn ed(o: &str, e: u64, t: &str) -> String {
        sign_query_ed25519(&pair(), o, "v1", e, t)
    }

    #[test]
    fn a_url_is_verified_once_then_served_from_the_cache() {
        let u = urls();
        let q = ed("movie", NOW + 600, "tok");
        let (signed, how) = u.check(&q, NOW, client(1)).unwrap();
        assert_eq!((signed.object, how), ("movie", Check::Verified));
        for _ in 0..3 {
            assert_eq!(u.check(&q, NOW, client(2)).unwrap().1, Check::Cached);
        }
        // Other parameters and their order do not matter: the signed values do.
        let reordered = format!("x=1&{}", q.split('&').rev().collect::<Vec<_>>().join("&"));
        assert_eq!(
            u.check(&reordered, NOW, client(1)).unwrap().1,
            Check::Cached
        );
        let h = sign_query(HMAC_SECRET, "movie", "v1", NOW + 600, "tok");
        assert_eq!(u.check(&h, NOW, client(1)).unwrap().1, Check::Verified);
        assert_eq!(u.check(&h, NOW, client(1)).unwrap().1, Check::Cached);
    }

    #[test]
    fn a_cached_url_is_refused_once_it_expires() {
        let u = urls();
        let e = NOW + 60;
        let q = ed("movie", e, "");
        u.check(&q, NOW, client(1)).unwrap();
        assert_eq!(u.check(&q, e + SKEW, client(1)).unwrap().1, Check::Cached);
        assert_eq!(
            u.check(&q, e + SKEW + 1, client(1)).unwrap_err(),
            AuthFailure::Expired
        );
        assert_eq!(
            u.check(&q, e + SKEW + 100_000, client(1)).unwrap_err(),
            AuthFailure::Expired
        );
    }

    #[test]
    fn an_expired_url_is_not_cached() {
        let u = urls();
        let q = ed("movie", NOW - SKEW - 1, "");
        assert_eq!(
            u.check(&q, NOW, client(1)).unwrap_err(),
            AuthFailure::Expired
        );
        assert_eq!(u.cached_urls(), 0);
    }

    /// Every key lands in one bucket, so only the comparison of values tells URLs apart.
    #[derive(Default)]
    struct Constant;
    impl Hasher for Constant {
        fn finish(&self) -> u64 {
            42
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn two_urls_are_never_confused_even_when_their_hashes_collide() {
        let u = SignedUrls::with_hasher(
            verifier(),
            1 << 20,
            0,
            BuildHasherDefault::<Constant>::default(),
        );
        let good = ed("movie", NOW + 600, "tok");
        u.check(&good, NOW, client(1)).unwrap();
        let sc = good.rsplit_once("&sc=").unwrap().1;
        // The same signature under other values, each one field changed.
        for forged in [
            format!("o=movie2&v=v1&e={}&t=tok&sc={sc}", NOW + 600),
            format!("o=movie&v=v2&e={}&t=tok&sc={sc}", NOW + 600),
            format!("o=movie&v=v1&e={}&t=tok&sc={sc}", NOW + 601),
            format!("o=movie&v=v1&e={}&t=tak&sc={sc}", NOW + 600),
            format!("o=movie&v=v1&e={}&t=to&sc={sc}", NOW + 600),
        ] {
            assert_eq!(
                u.check(&forged, NOW, client(1)).unwrap_err(),
                AuthFailure::BadSignature,
                "{forged}"
            );
        }
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(
            u.check(&flipped, NOW, client(1)).unwrap_err(),
            AuthFailure::BadSignature
        );
        // A second good URL in the same bucket is verified, not taken for the first.
        let other = ed("movie", NOW + 600, "tok2");
        assert_eq!(u.check(&other, NOW, client(1)).unwrap().1, Check::Verified);
        assert_eq!(u.check(&good, NOW, client(1)).unwrap().1, Check::Verified);
    }

    #[test]
    fn a_flood_of_bad_signatures_evicts_nothing() {
        // Room for a handful of entries only.
        let u = SignedUrls::new(verifier(), 4 * (ENTRY_OVERHEAD as u64 + 200), 0);
        let good = ed("movie", NOW + 600, "tok");
        u.check(&good, NOW, client(1)).unwrap();
        for i in 0..1_000u32 {
            let forged = format!("o=movie&v=v1&e={}&t=t{i}&sc={}", NOW + 600, "A".repeat(86));
            assert_eq!(
                u.check(&forged, NOW, client(i)).unwrap_err(),
                AuthFailure::BadSignature
            );
        }
        assert_eq!(u.cached_urls(), 1);
        assert_eq!(u.check(&good, NOW, client(1)).unwrap().1, Check::Cached);
    }

    #[test]
    fn a_client_over_its_budget_is_throttled_but_keeps_its_verified_urls() {
        let u = SignedUrls::new(verifier(), 1 << 20, 5);
        let good = ed("movie", NOW + 600, "tok");
        u.check(&good, NOW, client(1)).unwrap();
        let forged = |i: u32| format!("o=movie&v=v1&e={}&t=t{i}&sc={}", NOW + 600, "A".repeat(86));
        for i in 0..5 {
            assert_eq!(
                u.check(&forged(i), NOW, client(1)).unwrap_err(),
                AuthFailure::BadSignature
            );
        }
        assert_eq!(
            u.check(&forged(5), NOW, client(1)).unwrap_err(),
            AuthFailure::Throttled
        );
        // Unverified good URLs wait too; verified ones and other clients do not.
        let fresh = ed("other", NOW + 600, "tok");
        assert_eq!(
            u.check(&fresh, NOW, client(1)).unwrap_err(),
            AuthFailure::Throttled
        );
        assert_eq!(u.check(&good, NOW, client(1)).unwrap().1, Check::Cached);
        assert_eq!(u.check(&fresh, NOW, client(2)).unwrap().1, Check::Verified);
        assert_eq!(
            u.check(&forged(6), NOW + 1, client(1)).unwrap_err(),
            AuthFailure::BadSignature
        );
        // Malformed URLs are refused before any of this.
        assert_eq!(
            u.check("o=..", NOW, client(1)).unwrap_err(),
            AuthFailure::Missing(crate::auth::Param::V)
        );
    }

    #[test]
    fn with_the_cache_off_every_request_is_verified() {
        let u = SignedUrls::new(verifier(), 0, 0);
        let q = ed("movie", NOW + 600, "");
        for _ in 0..2 {
            assert_eq!(u.check(&q, NOW, client(1)).unwrap().1, Check::Verified);
        }
        assert_eq!(
            u.check(&q, NOW + 600 + SKEW + 1, client(1)).unwrap_err(),
            AuthFailure::Expired
        );
    }
}
