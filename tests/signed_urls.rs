//! Every way a signed URL can be refused (SPEC §2.1), end to end. A refused request
//! never reaches the origin.

mod support;

use cdn_edge::auth::{sign_query, sign_query_ed25519};
use support::edge::{signed, unix_now, Edge, EdgeOptions, KEY1, KEY2};
use support::keys;
use support::origin::TestOrigin;

async fn setup() -> (TestOrigin, Edge) {
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "v1", support::object_bytes(3, 10_000), "video/mp4");
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    (origin, edge)
}

async fn expect(edge: &Edge, query: &str, status: u16, reason_line: &str) {
    let r = edge.get(&format!("/range/0-99?{query}"), &[]).await;
    assert_eq!(r.status, status, "{query}: {}", r.text());
    assert_eq!(r.text(), format!("{reason_line}\n"), "{query}");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_signatures_from_either_active_key() {
    let (_origin, edge) = setup().await;
    for key in [KEY1, KEY2] {
        let q = sign_query(key.as_bytes(), "movie", "v1", unix_now() + 60, "tok");
        assert_eq!(edge.get(&format!("/range/0-99?{q}"), &[]).await.status, 200);
    }
    // Parameter order and unrelated parameters do not matter.
    let q = signed("movie", "v1");
    let mut parts: Vec<&str> = q.split('&').collect();
    parts.reverse();
    let reordered = format!("utm=1&{}&x", parts.join("&"));
    assert_eq!(
        edge.get(&format!("/range/0-99?{reordered}"), &[])
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_fields_are_403() {
    let (origin, edge) = setup().await;
    let q = sign_query(KEY1.as_bytes(), "movie", "v1", unix_now() + 60, "tok");
    let e = (unix_now() + 60).to_string();
    let later = (unix_now() + 6000).to_string();
    for tampered in [
        q.replace("o=movie", "o=movif"),
        q.replace("v=v1", "v=v2"),
        q.replace(&format!("e={e}"), &format!("e={later}")),
        q.replace("t=tok", "t=tol"),
        format!(
            "{}{}",
            &q[..q.len() - 1],
            if q.ends_with('0') { '1' } else { '0' }
        ),
    ] {
        expect(&edge, &tampered, 403, "signature does not match").await;
    }
    assert_eq!(origin.requests(), 0);
    assert_eq!(
        edge.metric("cdn_edge_auth_failures_total{reason=\"bad_signature\"}")
            .await,
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_403() {
    let (origin, edge) = setup().await;
    let q = sign_query(
        b"not-a-configured-key",
        "movie",
        "v1",
        unix_now() + 60,
        "tok",
    );
    expect(&edge, &q, 403, "signature does not match").await;
    assert_eq!(origin.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_malformed_parameters_are_403() {
    let (origin, edge) = setup().await;
    let q = signed("movie", "v1");
    let without = |name: &str| {
        q.split('&')
            .filter(|kv| !kv.starts_with(&format!("{name}=")))
            .collect::<Vec<_>>()
            .join("&")
    };
    expect(&edge, &without("sc"), 403, "missing query parameter sc").await;
    expect(&edge, &without("t"), 403, "missing query parameter t").await;
    expect(&edge, &without("o"), 403, "missing query parameter o").await;
    let r = edge.get("/range/0-99", &[]).await;
    assert_eq!(r.status, 403);
    expect(
        &edge,
        &format!("{q}&o=movie"),
        403,
        "query parameter o given twice",
    )
    .await;
    for (bad, line) in [
        (q.replace("o=movie", "o=..%2Fetc"), "malformed o"),
        (q.replace("o=movie", "o=a/b"), "malformed o"),
        (q.replace("o=movie", "o=.hidden"), "malformed o"),
        (q.replace("v=v1", "v=v..1"), "malformed v"),
        (q.replace("e=", "e=-"), "malformed e"),
        (
            q.replace("t=tok", &format!("t={}", "x".repeat(513))),
            "malformed t",
        ),
    ] {
        let r = edge.get(&format!("/range/0-99?{bad}"), &[]).await;
        assert_eq!(r.status, 403, "{bad}");
        assert!(r.text().starts_with(line), "{bad}: {}", r.text());
        assert_eq!(r.text().lines().count(), 1);
    }
    let upper = format!("{}{}", &q[..q.len() - 64], q[q.len() - 64..].to_uppercase());
    expect(
        &edge,
        &upper,
        403,
        "malformed sc: expected 64 lowercase hex (HMAC) or 86 base64url (Ed25519) characters",
    )
    .await;
    assert_eq!(origin.requests(), 0, "auth is checked before anything else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_is_410_and_skew_is_honoured() {
    let (origin, edge) = setup().await;
    let now = unix_now();
    let expired = sign_query(KEY1.as_bytes(), "movie", "v1", now - 120, "tok");
    expect(&edge, &expired, 410, "signed URL has expired").await;
    // Within clock_skew_secs (30) of expiry: still served.
    let in_skew = sign_query(KEY1.as_bytes(), "movie", "v1", now - 5, "tok");
    assert_eq!(
        edge.get(&format!("/range/0-99?{in_skew}"), &[])
            .await
            .status,
        200
    );
    // An expired URL that is also tampered is a 403: the signature comes first.
    expect(
        &edge,
        &expired.replace("o=movie", "o=other"),
        403,
        "signature does not match",
    )
    .await;
    assert_eq!(
        edge.metric("cdn_edge_auth_failures_total{reason=\"expired\"}")
            .await,
        1.0
    );
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_living_past_max_ttl_is_403() {
    let (origin, edge) = setup().await;
    // The test edge keeps the default signing.max_ttl_secs: 7 days.
    let week = 7 * 86_400;
    let ok = sign_query(
        KEY1.as_bytes(),
        "movie",
        "v1",
        unix_now() + week - 60,
        "tok",
    );
    assert_eq!(
        edge.get(&format!("/range/0-99?{ok}"), &[]).await.status,
        200
    );
    for e in [unix_now() + week + 3600, u64::MAX] {
        let q = sign_query(KEY1.as_bytes(), "movie", "v1", e, "tok");
        expect(
            &edge,
            &q,
            403,
            "signed URL expires further ahead than this edge accepts",
        )
        .await;
    }
    assert_eq!(
        edge.metric("cdn_edge_auth_failures_total{reason=\"lifetime_too_long\"}")
            .await,
        2.0
    );
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_checks_guard_the_whole_object_route() {
    let (origin, edge) = setup().await;
    let expired = sign_query(KEY1.as_bytes(), "movie", "v1", unix_now() - 120, "tok");
    assert_eq!(
        edge.get(&format!("/?{expired}"), &[("Range", "bytes=0-1")])
            .await
            .status,
        410
    );
    assert_eq!(edge.get("/?o=movie&v=v1", &[]).await.status, 403);
    assert_eq!(edge.request("HEAD", "/?o=movie", &[]).await.status, 403);
    assert_eq!(origin.requests(), 0);
}

/// `cdn-edge keygen` then `cdn-edge sign --private-key-file`: a running edge with the
/// public key accepts the URL and refuses it tampered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_and_sign_through_the_cli_against_a_running_edge() {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("k9.key");
    let key = keys::ed25519_entry("k9", &keys::keygen(&private));
    // The signer's config: the shipped one with the public key of k9.
    let conf = keys::conf_with_key(dir.path(), &key);
    let q = keys::sign(&conf, "k9", &private, "movie", "v1");

    let origin = TestOrigin::start().await;
    origin.add_object("movie", "v1", support::object_bytes(3, 10_000), "video/mp4");
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.signing_extra = key;
    let edge = Edge::start(opts).await;
    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert_eq!(r.status, 200, "{q}: {}", r.text());
    // HMAC keys stay active beside it.
    assert_eq!(
        edge.get(&format!("/range/0-99?{}", signed("movie", "v1")), &[])
            .await
            .status,
        200
    );
    expect(
        &edge,
        &q.replace("v=v1", "v=v2"),
        403,
        "signature does not match",
    )
    .await;
}

/// A player's many requests under one URL cost one signature check; an address sending
/// forged signatures is refused unchecked past its budget, and keeps its good URLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_urls_are_cached_and_forgers_are_throttled() {
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    let pair = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap();
    let public = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        pair.public_key().as_ref(),
    );
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "v1", support::object_bytes(3, 10_000), "video/mp4");
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.signing_extra = keys::ed25519_entry("ed", &public);
    opts.signing_settings = "max_bad_signatures_per_sec = 3".into();
    let edge = Edge::start(opts).await;

    let good = sign_query_ed25519(&pair, "movie", "v1", unix_now() + 600, "tok");
    for range in ["0-99", "100-199", "9000-9999"] {
        assert_eq!(
            edge.get(&format!("/range/{range}?{good}"), &[])
                .await
                .status,
            200
        );
    }
    let checks = |result: &str| format!("cdn_edge_signed_url_checks_total{{result=\"{result}\"}}");
    assert_eq!(edge.metric(&checks("verified")).await, 1.0);
    assert_eq!(edge.metric(&checks("cached")).await, 2.0);

    // Forged signatures: 403 until the budget of the second is spent, then 429.
    let forged = |i: usize| {
        format!(
            "o=movie&v=v1&e={}&t=f{i}&sc={}",
            unix_now() + 600,
            "A".repeat(86)
        )
    };
    let mut throttled = None;
    for i in 0..50 {
        let r = edge.get(&format!("/range/0-99?{}", forged(i)), &[]).await;
        if r.status == 429 {
            throttled = Some(r);
            break;
        }
        assert_eq!(r.status, 403, "{}", r.text());
    }
    let r = throttled.expect("a forger is throttled within 50 requests");
    check_throttled(&r);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.text().starts_with("too many bad signatures"),
        "{}",
        r.text()
    );
    // Its verified URL still plays; nothing reached the origin but the one slice.
    assert_eq!(
        edge.get(&format!("/range/0-99?{good}"), &[]).await.status,
        200
    );
    assert!(
        edge.metric("cdn_edge_auth_failures_total{reason=\"too_many_bad_signatures\"}")
            .await
            >= 1.0
    );
    assert_eq!(origin.requests(), 1);
}

fn check_throttled(r: &support::client::Response) {
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.text().starts_with("too many bad signatures"),
        "{}",
        r.text()
    );
}

/// Behind a trusted load balancer each client has its own budget: a forger behind it
/// does not hold up the new URLs of the players beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_budget_is_each_clients() {
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "v1", support::object_bytes(3, 10_000), "video/mp4");
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.signing_settings = "max_bad_signatures_per_sec = 2".into();
    opts.extra
        .push_str("[proxies]\ntrusted = [\"127.0.0.0/8\"]\n");
    let edge = Edge::start(opts).await;
    let forger = [("x-forwarded-for", "198.51.100.6")];
    let player = [("x-forwarded-for", "198.51.100.7")];
    let forge = |i: usize| {
        format!(
            "/range/0-99?o=movie&v=v1&e={}&t=f{i}&sc={}",
            unix_now() + 600,
            "0".repeat(64)
        )
    };
    let mut sent = 0;
    // Proven once the forger is refused both before and after the player's request,
    // so that all three fell in one second of its budget.
    let mut proven = false;
    for attempt in 0..5 {
        let mut throttled = None;
        for _ in 0..50 {
            sent += 1;
            let r = edge.get(&forge(sent), &forger).await;
            if r.status == 429 {
                throttled = Some(r);
                break;
            }
            assert_eq!(r.status, 403, "{}", r.text());
        }
        check_throttled(&throttled.expect("the forger is throttled within 50 requests"));
        let fresh = sign_query(
            KEY1.as_bytes(),
            "movie",
            "v1",
            unix_now() + 60,
            &format!("p{attempt}"),
        );
        let r = edge.get(&format!("/range/0-99?{fresh}"), &player).await;
        assert_eq!(r.status, 200, "{}", r.text());
        sent += 1;
        if edge.get(&forge(sent), &forger).await.status == 429 {
            proven = true;
            break;
        }
    }
    assert!(
        proven,
        "the second turned between requests five times running"
    );
}
