//! Byte ranges served end to end: the real edge in front of a real test origin, every
//! body compared byte for byte with the origin's object.

mod support;

use rand::{Rng, SeedableRng};
use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::TestOrigin;

const SLICE: u64 = 64 * 1024;
const SIZE: usize = 1_000_003; // 16 slices, the last one short

async fn setup() -> (TestOrigin, Edge, Vec<u8>) {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(42, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    (origin, edge, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ranges_are_byte_exact() {
    let (_origin, edge, bytes) = setup().await;
    let q = signed("movie", "v1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..60 {
        let a = rng.gen_range(0..SIZE);
        let len = match i % 3 {
            0 => rng.gen_range(1..100),
            1 => rng.gen_range(1..(3 * SLICE as usize)),
            _ => rng.gen_range(1..SIZE),
        };
        let b = (a + len - 1).min(SIZE - 1);
        let r = edge.get(&format!("/range/{a}-{b}?{q}"), &[]).await;
        assert_eq!(r.status, 200, "/range/{a}-{b}: {}", r.text());
        assert!(r.complete);
        assert_eq!(r.header("content-length").unwrap(), (b - a + 1).to_string());
        assert!(
            r.body == bytes[a..=b],
            "/range/{a}-{b} differs from the origin"
        );

        let h = edge
            .get(&format!("/?{q}"), &[("Range", &format!("bytes={a}-{b}"))])
            .await;
        assert_eq!(h.status, 206);
        assert_eq!(
            h.header("content-range").unwrap(),
            format!("bytes {a}-{b}/{SIZE}")
        );
        assert!(
            h.body == bytes[a..=b],
            "Range: bytes={a}-{b} differs from the origin"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slice_boundaries_are_byte_exact() {
    let (_origin, edge, bytes) = setup().await;
    let q = signed("movie", "v1");
    let s = SLICE as usize;
    for (a, b) in [
        (0, 0),
        (s - 1, s),
        (s - 1, s - 1),
        (s, s),
        (s, 2 * s - 1),
        (s - 1, 3 * s),
        (0, SIZE - 1),
        (SIZE - 1, SIZE - 1),
    ] {
        let r = edge.get(&format!("/range/{a}-{b}?{q}"), &[]).await;
        assert_eq!(r.status, 200);
        assert!(r.body == bytes[a..=b], "/range/{a}-{b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_past_eof_is_truncated_to_the_last_byte() {
    let (_origin, edge, bytes) = setup().await;
    let q = signed("movie", "v1");
    let r = edge
        .get(&format!("/range/{}-{}?{q}", SIZE - 10, SIZE + 5000), &[])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes[SIZE - 10..]);
    let r = edge
        .get(&format!("/range/0-18446744073709551615?{q}"), &[])
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body == bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_at_or_past_the_end_is_416() {
    let (_origin, edge, _bytes) = setup().await;
    let q = signed("movie", "v1");
    for target in [
        format!("/range/{SIZE}-{}?{q}", SIZE + 1),
        format!("/range/18446744073709551615-18446744073709551615?{q}"),
    ] {
        let r = edge.get(&target, &[]).await;
        assert_eq!(r.status, 416, "{target}");
        assert_eq!(
            r.header("content-range").unwrap(),
            format!("bytes */{SIZE}")
        );
    }
    let r = edge
        .get(&format!("/?{q}"), &[("Range", &format!("bytes={SIZE}-"))])
        .await;
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{SIZE}")
    );
    let r = edge.get(&format!("/?{q}"), &[("Range", "bytes=-0")]).await;
    assert_eq!(r.status, 416);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_range_paths_are_400() {
    let (origin, edge, _bytes) = setup().await;
    let q = signed("movie", "v1");
    for spec in [
        "18446744073709551615-0",
        "5-4",
        "a-b",
        "1-",
        "-1",
        "1-2-3",
        "18446744073709551616-1",
        "",
        "%31-2",
    ] {
        let r = edge.get(&format!("/range/{spec}?{q}"), &[]).await;
        assert_eq!(r.status, 400, "/range/{spec}: {}", r.text());
        assert_eq!(r.text().lines().count(), 1);
    }
    assert_eq!(origin.requests(), 0, "a 400 must not reach the origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_header_forms() {
    let (_origin, edge, bytes) = setup().await;
    let q = signed("movie", "v1");
    let target = format!("/?{q}");
    let r = edge.get(&target, &[("Range", "bytes=100-")]).await;
    assert_eq!(
        (r.status, r.header("content-range").unwrap()),
        (206, format!("bytes 100-{}/{SIZE}", SIZE - 1).as_str())
    );
    assert!(r.body == bytes[100..]);
    let r = edge.get(&target, &[("Range", "bytes=-500")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, bytes[SIZE - 500..]);
    let r = edge.get(&target, &[("Range", "bytes=-99999999")]).await;
    assert_eq!(r.status, 206);
    assert!(r.body == bytes);
    // Several ranges, other units and bad syntax: the whole object, 200.
    for ignored in ["bytes=0-1,5-6", "items=0-5", "bytes=9-3", "bytes=x-"] {
        let r = edge.get(&target, &[("Range", ignored)]).await;
        assert_eq!(r.status, 200, "{ignored}");
        assert!(r.body == bytes, "{ignored}");
    }
    let r = edge.get(&target, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length").unwrap(), SIZE.to_string());
    assert!(r.body == bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_and_head() {
    let (origin, edge, _bytes) = setup().await;
    let q = signed("movie", "v1");
    let get = edge.get(&format!("/range/10-19?{q}"), &[]).await;
    assert_eq!(get.header("content-type"), Some("video/mp4"));
    assert_eq!(get.header("accept-ranges"), Some("bytes"));
    let etag = get.header("etag").unwrap().to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 10,
        "{etag}"
    );

    let before = origin.requests();
    for target in [format!("/range/10-19?{q}"), format!("/?{q}")] {
        let head = edge.request("HEAD", &target, &[]).await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        assert_eq!(
            head.header("etag").unwrap(),
            etag,
            "ETag is stable for (o, v)"
        );
        assert_eq!(head.header("content-type"), Some("video/mp4"));
        assert_eq!(head.header("accept-ranges"), Some("bytes"));
        assert!(head.header("cache-status").is_some());
    }
    assert_eq!(
        edge.request("HEAD", &format!("/range/10-19?{q}"), &[])
            .await
            .header("content-length"),
        Some("10")
    );
    assert_eq!(
        edge.request("HEAD", &format!("/?{q}"), &[])
            .await
            .header("content-length"),
        Some(SIZE.to_string().as_str())
    );
    assert_eq!(
        origin.requests(),
        before,
        "HEAD of a known object needs no origin request"
    );

    // A token change (another viewer) is the same object: same ETag.
    let other = cdn_edge::auth::sign_query(
        support::edge::KEY1.as_bytes(),
        "movie",
        "v1",
        support::edge::unix_now() + 60,
        "someone-else",
    );
    assert_eq!(
        edge.request("HEAD", &format!("/?{other}"), &[])
            .await
            .header("etag")
            .unwrap(),
        etag
    );

    let post = edge
        .request(
            "POST",
            &format!("/range/0-1?{q}"),
            &[("Content-Length", "0")],
        )
        .await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_request_is_a_hit_without_origin_requests() {
    let (origin, edge, bytes) = setup().await;
    let q = signed("movie", "v1");
    let target = format!("/range/100000-300000?{q}"); // slices 1..=4
    let first = edge.get(&target, &[]).await;
    assert_eq!(first.header("cache-status"), Some("cdn-edge; fwd=miss"));
    assert_eq!(origin.requests(), 4, "{:?}", origin.log());
    let second = edge.get(&target, &[]).await;
    assert_eq!(second.header("cache-status"), Some("cdn-edge; hit"));
    assert!(second.body == bytes[100000..=300000]);
    assert_eq!(origin.requests(), 4, "a hit must not reach the origin");
    // A sub-range of cached slices is a hit too; a range touching one new slice is not.
    assert_eq!(
        edge.get(&format!("/range/131072-131073?{q}"), &[])
            .await
            .header("cache-status"),
        Some("cdn-edge; hit")
    );
    let partly = edge.get(&format!("/range/300000-400000?{q}"), &[]).await;
    assert_eq!(partly.header("cache-status"), Some("cdn-edge; fwd=miss"));
    assert!(partly.body == bytes[300000..=400000]);
    assert_eq!(origin.requests(), 6);
    assert!(origin
        .log()
        .iter()
        .all(|l| l.starts_with("/objects/movie/v1 bytes=")));
    assert_eq!(
        edge.metric("cdn_edge_origin_requests_total{result=\"ok\"}")
            .await,
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_make_one_origin_request() {
    let (origin, edge, bytes) = setup().await;
    let q = signed("movie", "v1");
    // Metadata first, so every request below wants the same cold slice 3.
    assert_eq!(edge.get(&format!("/range/0-0?{q}"), &[]).await.status, 200);
    assert_eq!(origin.requests(), 1);
    const N: usize = 24;
    origin.hold();
    let target = format!("/range/200000-210000?{q}");
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (addr, t) = (edge.http, target.clone());
            tokio::spawn(async move { support::client::get(addr, &t, &[]).await })
        })
        .collect();
    // Every request has missed memory and is waiting on the one fill.
    edge.wait_for_metric(
        "cdn_edge_cache_lookups_total{result=\"miss\",tier=\"memory\"}",
        1.0 + N as f64,
    )
    .await;
    origin.release();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == bytes[200000..=210000]);
    }
    assert_eq!(
        origin.requests(),
        2,
        "N concurrent misses of one slice → one origin request: {:?}",
        origin.log()
    );
    assert_eq!(
        edge.metric("cdn_edge_cache_coalesced_waits_total").await,
        (N - 1) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_tiny_objects() {
    let origin = TestOrigin::start().await;
    origin.add_object("empty", "1", Vec::new(), "video/mp4");
    origin.add_object("one", "1", vec![7], "application/x-test");
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let e = signed("empty", "1");
    let whole = edge.get(&format!("/?{e}"), &[]).await;
    assert_eq!((whole.status, whole.body.len()), (200, 0));
    assert_eq!(whole.header("content-length"), Some("0"));
    assert_eq!(edge.get(&format!("/range/0-0?{e}"), &[]).await.status, 416);
    assert_eq!(
        edge.get(&format!("/?{e}"), &[("Range", "bytes=0-")])
            .await
            .status,
        416
    );
    let o = signed("one", "1");
    let r = edge.get(&format!("/range/0-100?{o}"), &[]).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &[7u8][..]));
    assert_eq!(r.header("content-type"), Some("application/x-test"));
    assert_eq!(edge.get(&format!("/range/1-1?{o}"), &[]).await.status, 416);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_and_versions_do_not_mix() {
    let origin = TestOrigin::start().await;
    let a = object_bytes(1, 100_000);
    let b = object_bytes(2, 100_000);
    origin.add_object("obj", "1", a.clone(), "video/mp4");
    origin.add_object("obj", "2", b.clone(), "video/mp4");
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let ra = edge
        .get(&format!("/range/0-99999?{}", signed("obj", "1")), &[])
        .await;
    let rb = edge
        .get(&format!("/range/0-99999?{}", signed("obj", "2")), &[])
        .await;
    assert!(ra.body == a && rb.body == b);
    assert_ne!(ra.header("etag"), rb.header("etag"));
    let missing = edge
        .get(&format!("/range/0-9?{}", signed("nope", "1")), &[])
        .await;
    assert_eq!(missing.status, 404, "an origin 404 is the client's 404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_connections_are_kept_alive_and_reused() {
    let (origin, edge, bytes) = setup().await;
    let r = edge.get(&format!("/?{}", signed("movie", "v1")), &[]).await;
    assert!(r.body == bytes);
    assert_eq!(origin.requests(), 16);
    assert!(
        origin.connections() <= 2,
        "16 slice fetches over {} connections",
        origin.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_range_across_two_slices_asks_for_both_at_once() {
    let (origin, edge, bytes) = setup().await;
    let q = signed("movie", "v1");
    let slice = 65_536;
    let (a, b) = (slice - 1000, slice + 1000);
    origin.hold();
    let target = format!("/range/{a}-{b}?{q}");
    let addr = edge.http;
    let request = tokio::spawn(async move { support::client::get(addr, &target, &[]).await });
    // Both slice requests reach the origin while neither has been answered.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while origin.requests() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second slice was not asked for alongside the first: {:?}",
            origin.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    origin.release();
    let r = request.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == bytes[a..=b]);
    assert_eq!(origin.requests(), 2, "{:?}", origin.log());
}

/// Over plain HTTP, warm slices leave from the memory tier's page pool by `sendfile`, byte
/// for byte; with `cache.sendfile = false` they are copied, with the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_slices_are_sent_by_file_offset_unless_turned_off() {
    for sendfile in [true, false] {
        let origin = TestOrigin::start().await;
        let bytes = object_bytes(42, SIZE);
        origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
        let mut opts = EdgeOptions::new(vec![origin.url()]);
        opts.sendfile = sendfile;
        let edge = Edge::start(opts).await;
        let q = signed("movie", "v1");
        for _ in 0..2 {
            let whole = edge.get(&format!("/?{q}"), &[]).await;
            assert_eq!(whole.status, 200);
            assert!(
                whole.body == bytes,
                "whole object differs (sendfile {sendfile})"
            );
            let part = edge
                .get(&format!("/?{q}"), &[("Range", "bytes=70000-333333")])
                .await;
            assert_eq!(part.status, 206);
            assert!(
                part.body == bytes[70000..=333333],
                "range differs (sendfile {sendfile})"
            );
        }
        assert_eq!(origin.requests(), SIZE.div_ceil(SLICE as usize) as u64);
        let sent = edge.metric("cdn_edge_client_sendfile_bytes_total").await;
        if sendfile {
            assert!(sent >= SIZE as f64, "only {sent} bytes sent from the pool");
        } else {
            assert_eq!(sent, 0.0);
        }
    }
}

/// A slice fetched from the origin that the memory tier's `video` policy would not keep
/// is read onto the heap, not into the page pool (a slot taken and freed at once costs
/// fresh pages): it is sent by copy, byte-exact, and not kept; slices the tier keeps
/// still leave by `sendfile`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_slice_the_memory_tier_would_not_keep_stays_out_of_the_page_pool() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(43, SIZE);
    origin.add_object("movie", "v1", bytes.clone(), "video/mp4");
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    // Room for two slices.
    opts.memory_bytes = 2 * (SLICE + 1024);
    let edge = Edge::start(opts).await;
    let q = signed("movie", "v1");
    // Whole slices: a read that ends on a slice boundary sets no hold for the next one.
    let get = |index: u64| {
        let (a, b) = (index * SLICE, (index + 1) * SLICE - 1);
        let edge = &edge;
        let q = &q;
        let bytes = &bytes;
        async move {
            let r = edge
                .get(&format!("/?{q}"), &[("Range", &format!("bytes={a}-{b}"))])
                .await;
            assert_eq!(r.status, 206);
            assert!(r.body == bytes[a as usize..=b as usize], "slice {index}");
        }
    };
    let sendfile = || edge.metric("cdn_edge_client_sendfile_bytes_total");
    get(0).await;
    get(1).await;
    assert_eq!(
        sendfile().await,
        2.0 * SLICE as f64,
        "kept: sent from the pool"
    );
    // Slice 8 of the same title scores below slices 0 and 1 (fewer sessions get that
    // far), and the tier is full: it is fetched onto the heap, each time it is asked.
    get(8).await;
    get(8).await;
    assert_eq!(origin.requests(), 4, "{:?}", origin.log());
    assert_eq!(sendfile().await, 2.0 * SLICE as f64, "not kept: copied");
    get(0).await;
    assert_eq!(sendfile().await, 3.0 * SLICE as f64);
    assert_eq!(origin.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_follow_rfc_9110() {
    let (origin, edge, bytes) = setup().await;
    let q = signed("movie", "v1");
    let first = edge.get(&format!("/?{q}"), &[("Range", "bytes=0-9")]).await;
    assert_eq!(first.status, 206);
    let etag = first.header("etag").unwrap().to_string();
    let cache_control = first.header("cache-control").unwrap().to_string();
    assert!(
        cache_control.starts_with("private, max-age=") && cache_control.ends_with(", immutable"),
        "{cache_control}"
    );
    let fetched = origin.requests();

    // If-None-Match with the current tag (or *): 304 with the validators, no body.
    for inm in [etag.as_str(), "*", &format!("\"nope\", W/{etag}")] {
        for method in ["GET", "HEAD"] {
            let r = edge
                .request(method, &format!("/?{q}"), &[("If-None-Match", inm)])
                .await;
            assert_eq!(r.status, 304, "{method} If-None-Match: {inm}");
            assert!(r.body.is_empty());
            assert_eq!(r.header("etag"), Some(etag.as_str()));
            assert!(r.header("cache-control").is_some());
        }
    }
    let r = edge
        .get(&format!("/range/5-9?{q}"), &[("If-None-Match", &etag)])
        .await;
    assert_eq!(r.status, 304, "the range route too");
    assert_eq!(origin.requests(), fetched, "a 304 needs no origin request");
    let r = edge
        .get(
            &format!("/?{q}"),
            &[("If-None-Match", "\"other\""), ("Range", "bytes=0-9")],
        )
        .await;
    assert_eq!(r.status, 206, "another tag: served");
    assert!(r.body == bytes[0..10]);

    // If-Range: our tag honours the range; another tag, a weak tag or a date sends the
    // whole object, so a resumed download never splices two versions.
    let r = edge
        .get(
            &format!("/?{q}"),
            &[("Range", "bytes=10-19"), ("If-Range", &etag)],
        )
        .await;
    assert_eq!(r.status, 206);
    assert!(r.body == bytes[10..20]);
    for if_range in [
        "\"another-version\"".to_string(),
        format!("W/{etag}"),
        "Tue, 01 Dec 2026 12:00:00 GMT".to_string(),
    ] {
        let r = edge
            .get(
                &format!("/?{q}"),
                &[("Range", "bytes=10-19"), ("If-Range", &if_range)],
            )
            .await;
        assert_eq!(r.status, 200, "If-Range: {if_range}");
        assert_eq!(r.header("content-range"), None);
        assert!(r.body == bytes, "the whole object");
    }

    // If-Match: a wrong (or weak) tag is 412; the right one is served.
    for wrong in ["\"wrong\"".to_string(), format!("W/{etag}")] {
        let r = edge
            .get(
                &format!("/?{q}"),
                &[("If-Match", &wrong), ("Range", "bytes=0-9")],
            )
            .await;
        assert_eq!(r.status, 412, "If-Match: {wrong}");
    }
    let r = edge
        .get(
            &format!("/?{q}"),
            &[("If-Match", &etag), ("Range", "bytes=0-9")],
        )
        .await;
    assert_eq!(r.status, 206);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_control_lets_clients_keep_bytes_only_while_the_url_is_valid() {
    let (_origin, edge, _bytes) = setup().await;
    let e = support::edge::unix_now() + 600;
    let q = cdn_edge::auth::sign_query(support::edge::KEY1.as_bytes(), "movie", "v1", e, "tok");
    let r = edge.get(&format!("/range/0-9?{q}"), &[]).await;
    let cc = r.header("cache-control").unwrap();
    let age: u64 = cc
        .strip_prefix("private, max-age=")
        .and_then(|s| s.strip_suffix(", immutable"))
        .unwrap()
        .parse()
        .unwrap();
    assert!((590..=600).contains(&age), "{cc}");
    let refused = edge.get("/range/0-9?o=movie&v=v1", &[]).await;
    assert_eq!(refused.header("cache-control"), Some("no-store"));
}
