//! Origin failover, errors and timeouts (SPEC §2.3): what a client sees when origins
//! fail, and that failures are never cached; objects an origin shows half uploaded or
//! replaces in place. Missing objects (an origin's 404 or 410) are in
//! `missing_objects.rs`; malformed, cut and slow answers in `origin_faults.rs`.

mod support;

use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::{dead_addr, Mode, TestOrigin};

const SIZE: usize = 300_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_second_origin() {
    let second = TestOrigin::start().await;
    let bytes = object_bytes(5, SIZE);
    second.add_object("m", "1", bytes.clone(), "video/mp4");
    let edge = Edge::start(EdgeOptions::new(vec![
        format!("http://{}", dead_addr()),
        second.url(),
    ]))
    .await;
    let r = edge
        .get(&format!("/range/1000-200000?{}", signed("m", "1")), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == bytes[1000..=200000]);
    assert_eq!(second.requests(), 4, "{:?}", second.log());
    assert!(edge.metric("cdn_edge_origin_failovers_total").await >= 1.0);
    assert!(
        edge.metric("cdn_edge_origin_requests_total{result=\"connect_error\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_when_the_first_origin_answers_5xx_or_garbage() {
    for mode in [Mode::Status(503), Mode::ContentEncoding] {
        let first = TestOrigin::start().await;
        let second = TestOrigin::start().await;
        let bytes = object_bytes(6, SIZE);
        for o in [&first, &second] {
            o.add_object("m", "1", bytes.clone(), "video/mp4");
        }
        first.set_mode(mode);
        let edge = Edge::start(EdgeOptions::new(vec![first.url(), second.url()])).await;
        let r = edge
            .get(&format!("/range/0-99?{}", signed("m", "1")), &[])
            .await;
        assert_eq!(r.status, 200, "{mode:?}");
        assert_eq!(r.body, bytes[..100], "{mode:?}");
        assert_eq!((first.requests(), second.requests()), (1, 1), "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_is_502() {
    let edge = Edge::start(EdgeOptions::new(vec![format!("http://{}", dead_addr())])).await;
    let r = edge
        .get(&format!("/range/0-99?{}", signed("m", "1")), &[])
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.text().lines().count(), 1);
    edge.wait_for_log("origin slice fetch failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_origin_is_504_within_the_timeout() {
    let origin = TestOrigin::start().await;
    origin.add_object("m", "1", object_bytes(7, SIZE), "video/mp4");
    origin.set_mode(Mode::Hang);
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.origin_timeout_ms = 300;
    let edge = Edge::start(opts).await;
    let started = std::time::Instant::now();
    let r = edge
        .get(&format!("/range/0-99?{}", signed("m", "1")), &[])
        .await;
    assert_eq!(r.status, 504);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        edge.metric("cdn_edge_origin_requests_total{result=\"timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_origin_answers_are_502_and_not_cached() {
    for mode in [Mode::ContentEncoding, Mode::Status(500), Mode::Status(403)] {
        let origin = TestOrigin::start().await;
        let bytes = object_bytes(8, SIZE);
        origin.add_object("m", "1", bytes.clone(), "video/mp4");
        origin.set_mode(mode);
        let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
        let target = format!("/range/0-99?{}", signed("m", "1"));
        assert_eq!(edge.get(&target, &[]).await.status, 502, "{mode:?}");
        origin.set_mode(Mode::Normal);
        let r = edge.get(&target, &[]).await;
        assert_eq!(
            r.status, 200,
            "{mode:?}: the failure must not have been cached"
        );
        assert_eq!(r.body, bytes[..100]);
        assert_eq!(r.header("cache-status"), Some("cdn-edge; fwd=miss"));
        assert_eq!(origin.requests(), 2, "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_ranges_are_served_while_the_origin_is_down() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(9, SIZE);
    origin.add_object("m", "1", bytes.clone(), "video/mp4");
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let q = signed("m", "1");
    assert_eq!(
        edge.get(&format!("/range/0-70000?{q}"), &[]).await.status,
        200
    );
    origin.stop();
    let r = edge.get(&format!("/range/10-70000?{q}"), &[]).await;
    assert_eq!(
        (r.status, r.header("cache-status")),
        (200, Some("cdn-edge; hit"))
    );
    assert!(r.body == bytes[10..=70000]);
    let head = edge.request("HEAD", &format!("/?{q}"), &[]).await;
    assert_eq!(head.status, 200, "metadata is cached too");
    assert_eq!(
        edge.get(&format!("/range/200000-200010?{q}"), &[])
            .await
            .status,
        502
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_mid_response_cuts_the_response_short() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(10, SIZE);
    origin.add_object("m", "1", bytes.clone(), "video/mp4");
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let q = signed("m", "1");
    // Slice 0 cached; slice 1 will fail.
    assert_eq!(edge.get(&format!("/range/0-10?{q}"), &[]).await.status, 200);
    origin.set_mode(Mode::Status(503));
    let r = edge.get(&format!("/range/0-100000?{q}"), &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        !r.complete,
        "the body must be visibly short, never padded or wrong"
    );
    assert!(bytes.starts_with(&r.body));
    assert_eq!(edge.metric("cdn_edge_stream_aborts_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_origin_gets_its_traffic_back_after_it_recovers() {
    let first = TestOrigin::start().await;
    let second = TestOrigin::start().await;
    let bytes = object_bytes(11, 40 * 65536);
    for o in [&first, &second] {
        o.add_object("m", "1", bytes.clone(), "video/mp4");
    }
    let mut opts = EdgeOptions::new(vec![first.url(), second.url()]);
    opts.retry_unhealthy_ms = 300;
    let edge = Edge::start(opts).await;
    let q = signed("m", "1");
    let mut slice = 0usize;
    let mut fetch_new_slice = || {
        slice += 1;
        format!("/range/{}-{}?{q}", slice * 65536, slice * 65536 + 9)
    };
    first.set_mode(Mode::Status(503));
    for _ in 0..3 {
        assert_eq!(edge.get(&fetch_new_slice(), &[]).await.status, 200);
    }
    assert_eq!(first.requests(), 3);
    // Three failures in a row: the first origin is now tried last.
    assert_eq!(edge.get(&fetch_new_slice(), &[]).await.status, 200);
    assert_eq!(
        first.requests(),
        3,
        "an unhealthy origin is not tried first"
    );
    first.set_mode(Mode::Normal);
    // After retry_unhealthy_ms it is probed in its place again, and keeps its traffic.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while first.requests() == 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the recovered origin was never probed"
        );
        assert_eq!(edge.get(&fetch_new_slice(), &[]).await.status, 200);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before = second.requests();
    for _ in 0..3 {
        assert_eq!(edge.get(&fetch_new_slice(), &[]).await.status, 200);
    }
    assert_eq!(
        second.requests(),
        before,
        "the recovered primary serves again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_still_uploading_is_served_once_its_metadata_is_rechecked() {
    let origin = TestOrigin::start().await;
    // Upload in progress: the origin answers 416 `bytes */0`.
    origin.add_object("up", "1", Vec::new(), "video/mp4");
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.meta_ttl_secs = Some(1);
    let edge = Edge::start(opts).await;
    let q = signed("up", "1");
    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */0"));

    let bytes = object_bytes(13, SIZE);
    origin.add_object("up", "1", bytes.clone(), "video/mp4");
    // Until the edge asks again, the object is empty: `/` is a 200 with no body.
    let r = edge
        .get_until(&format!("/?{q}"), |r| {
            r.status == 200 && r.body.len() == SIZE
        })
        .await;
    assert!(
        r.complete && r.body == bytes,
        "the whole object, byte-exact"
    );
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    let r = edge.get(&format!("/range/100000-299999?{q}"), &[]).await;
    assert!(r.status == 200 && r.body == bytes[100_000..]);
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_total_from_an_upload_in_progress_is_replaced() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(14, SIZE);
    // Upload in progress: only the first 100,000 bytes are there yet.
    origin.add_object("up", "1", bytes[..100_000].to_vec(), "video/mp4");
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.meta_ttl_secs = Some(1);
    let edge = Edge::start(opts).await;
    let q = signed("up", "1");
    let r = edge.get(&format!("/?{q}"), &[]).await;
    assert!(r.status == 200 && r.body == bytes[..100_000]);

    origin.add_object("up", "1", bytes.clone(), "video/mp4");
    let r = edge
        .get_until(&format!("/?{q}"), |r| {
            r.status == 200 && r.complete && r.body.len() == SIZE
        })
        .await;
    assert!(r.body == bytes, "the whole object, byte-exact");
    // Slice 1 was cached 34,464 bytes long; it is never served against the new size.
    let r = edge.get(&format!("/range/65536-140000?{q}"), &[]).await;
    assert!(r.complete && r.body == bytes[65536..=140_000]);
    assert!(
        edge.metric("cdn_edge_cache_metadata_checks_total{result=\"replaced\"}")
            .await
            >= 1.0
    );
}

/// An edge that served slice 0 of object `m` (ETag `"a"`), after which the origin
/// replaced the object in place with other bytes of the same size (ETag `"b"`).
struct ReplacedInPlace {
    origin: TestOrigin,
    edge: Edge,
    q: String,
    first: Vec<u8>,
    second: Vec<u8>,
}

async fn replaced_after_slice_0(seed: u64) -> ReplacedInPlace {
    let origin = TestOrigin::start().await;
    let first = object_bytes(seed, SIZE);
    let second = object_bytes(seed + 1, SIZE);
    let etag = |v| [("ETag", v)];
    origin.add_object_with_headers("m", "1", first.clone(), "video/mp4", &etag("\"a\""));
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let q = signed("m", "1");
    // Slice 0 and the object's metadata come from the first version.
    let r = edge.get(&format!("/range/0-10?{q}"), &[]).await;
    assert_eq!(r.body, first[..11]);
    origin.add_object_with_headers("m", "1", second.clone(), "video/mp4", &etag("\"b\""));
    ReplacedInPlace {
        origin,
        edge,
        q,
        first,
        second,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_replaced_in_place_mid_response_is_cut_never_mixed() {
    let ReplacedInPlace {
        origin: _origin,
        edge,
        q,
        first,
        second,
    } = replaced_after_slice_0(15).await;
    let r = edge.get(&format!("/?{q}"), &[]).await;
    assert_eq!(
        r.status, 200,
        "the header went out before slice 1 was fetched"
    );
    assert!(
        !r.complete && first.starts_with(&r.body),
        "cut short after the first version's bytes, never completed with the second's"
    );
    assert_eq!(edge.metric("cdn_edge_stream_aborts_total").await, 1.0);
    assert_eq!(
        edge.metric("cdn_edge_cache_metadata_checks_total{result=\"replaced\"}")
            .await,
        1.0,
        "slice 1 came with another ETag"
    );

    // The next request starts clean, from the second version only.
    let r = edge.get(&format!("/?{q}"), &[]).await;
    assert!(
        r.complete && r.body == second,
        "the second version, byte-exact"
    );
    assert_eq!(r.header("cache-status"), Some("cdn-edge; fwd=miss"));
    assert!(edge.metric("cdn_edge_cache_stale_slices_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_of_another_version_before_the_header_starts_the_response_over() {
    let ReplacedInPlace {
        origin,
        edge,
        q,
        second,
        ..
    } = replaced_after_slice_0(17).await;
    // Same size, another ETag: slice 1 is refused and nothing of it is cached; no byte
    // is out yet, so the response starts over under the second version.
    let r = edge.get(&format!("/range/70000-80000?{q}"), &[]).await;
    assert!(
        r.status == 200 && r.complete && r.body == second[70_000..=80_000],
        "{}",
        r.text()
    );
    assert_eq!(
        origin
            .log()
            .iter()
            .filter(|l| l.contains("bytes=65536-"))
            .count(),
        2,
        "slice 1, refused then asked again"
    );
    assert_eq!(
        edge.metric("cdn_edge_cache_metadata_checks_total{result=\"replaced\"}")
            .await,
        1.0
    );
    // Every range now comes from the second version, including the one slice 0 held.
    for (a, b) in [(70_000, 80_000), (0, SIZE - 1), (10, 140_000)] {
        let r = edge.get(&format!("/range/{a}-{b}?{q}"), &[]).await;
        assert!(
            r.status == 200 && r.complete && r.body == second[a..=b],
            "/range/{a}-{b}"
        );
    }
}
