//! Objects that do not exist (SPEC §2.3): an origin's 404 or 410 is the client's 404,
//! remembered per (o, v) for `origin.negative_ttl_secs`, so a burst of requests for a
//! missing object costs one origin request; a 404 from one origin is final.

mod support;

use std::time::{Duration, Instant};

use support::client::{self, Response};
use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::{Mode, TestOrigin};

const SLICE: u64 = 64 * 1024;
const SIZE: usize = 300_000;

/// `/range/{a}-{b}` inside slice `index` of the object.
fn in_slice(index: u64, q: &str) -> String {
    let start = index * SLICE + 10;
    format!("/range/{start}-{}?{q}", start + 99)
}

fn assert_not_found(r: &Response, cache_status: &str, what: &str) {
    assert_eq!(r.status, 404, "{what}: {}", r.text());
    assert_eq!(r.header("cache-status"), Some(cache_status), "{what}");
    assert_eq!(r.header("cache-control"), Some("no-store"), "{what}");
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; charset=utf-8"),
        "{what}"
    );
}

async fn edge_with_ttl(origins: Vec<String>, ttl: u64) -> Edge {
    let mut opts = EdgeOptions::new(origins);
    opts.negative_ttl_secs = Some(ttl);
    Edge::start(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_404_is_a_404_remembered_for_the_negative_ttl() {
    let origin = TestOrigin::start().await;
    let edge = edge_with_ttl(vec![origin.url()], 1).await;
    let q = signed("nope", "1");
    let asked = Instant::now();
    let r = edge.get(&in_slice(0, &q), &[]).await;
    assert_not_found(&r, "cdn-edge; fwd=miss", "from the origin");
    assert_eq!(r.text().lines().count(), 1, "a one-line reason");
    assert_eq!(origin.requests(), 1);

    // Any slice of it, and HEAD, from the remembered answer.
    let r = edge.get(&in_slice(3, &q), &[]).await;
    assert_not_found(&r, "cdn-edge; hit", "remembered");
    let head = edge.request("HEAD", &format!("/?{q}"), &[]).await;
    assert_not_found(&head, "cdn-edge; hit", "HEAD");
    assert!(head.body.is_empty());
    assert_eq!(origin.requests(), 1, "{:?}", origin.log());
    assert_eq!(edge.metric("cdn_edge_cache_negative_hits_total").await, 2.0);
    assert_eq!(
        edge.metric("cdn_edge_origin_requests_total{result=\"not_found\"}")
            .await,
        1.0
    );
    let status =
        |code: &str| format!("cdn_edge_requests_total{{route=\"range\",status=\"{code}\"}}");
    assert_eq!(edge.metric(&status("404")).await, 2.0);
    assert_eq!(edge.metric(&status("502")).await, 0.0);

    // Once the TTL has passed, the origin is asked again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.requests() == 1 {
        assert!(
            Instant::now() < deadline,
            "the origin was never asked again"
        );
        let r = edge.get(&in_slice(1, &q), &[]).await;
        assert_eq!(r.status, 404);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "asked again after {:?}, within the 1 s TTL",
        asked.elapsed()
    );
    assert_eq!(origin.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_410_is_a_404_remembered_too() {
    let origin = TestOrigin::start().await;
    origin.set_response("/objects/gone/1", 410, &[], b"gone\n");
    let edge = edge_with_ttl(vec![origin.url()], 10).await;
    let q = signed("gone", "1");
    let r = edge.get(&format!("/?{q}"), &[]).await;
    assert_not_found(&r, "cdn-edge; fwd=miss", "410 from the origin");
    let r = edge.get(&in_slice(2, &q), &[]).await;
    assert_not_found(&r, "cdn-edge; hit", "remembered 410");
    assert_eq!(origin.requests(), 1);
    assert_eq!(
        edge.metric("cdn_edge_origin_requests_total{result=\"not_found\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_across_slices_of_a_missing_object_costs_one_origin_request() {
    const BURST: usize = 50;
    let origin = TestOrigin::start().await;
    let edge = std::sync::Arc::new(edge_with_ttl(vec![origin.url()], 10).await);
    let q = signed("nope", "1");
    // Every request is in the edge before the origin answers the first one.
    origin.hold();
    let requests: Vec<_> = (0..BURST)
        .map(|i| {
            let edge = edge.clone();
            let (method, target) = match i % 10 {
                9 => ("HEAD", format!("/?{q}")),
                _ => ("GET", in_slice(i as u64 % 5, &q)),
            };
            tokio::spawn(async move { client::request(edge.http, method, &target, &[]).await })
        })
        .collect();
    edge.wait_for_metric("cdn_edge_cache_cold_object_waits_total", (BURST - 1) as f64)
        .await;
    assert_eq!(origin.requests(), 1, "{:?}", origin.log());
    origin.release();
    for r in requests {
        let r = r.await.unwrap();
        assert_not_found(&r, "cdn-edge; fwd=miss", "waited for the origin's answer");
    }
    assert_eq!(origin.requests(), 1, "{:?}", origin.log());
    // Later requests, for any slice, come from the remembered answer.
    for i in 0..5 {
        let r = edge.get(&in_slice(i, &q), &[]).await;
        assert_not_found(&r, "cdn-edge; hit", "after the burst");
    }
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_from_the_first_origin_is_final_and_keeps_it_healthy() {
    let first = TestOrigin::start().await;
    let second = TestOrigin::start().await;
    let bytes = object_bytes(21, SIZE);
    for o in [&first, &second] {
        o.add_object("m", "1", bytes.clone(), "video/mp4");
    }
    let edge = edge_with_ttl(vec![first.url(), second.url()], 10).await;
    // More missing objects than the failures that make an origin unhealthy (3).
    for i in 0..5 {
        let r = edge
            .get(&in_slice(0, &signed(&format!("gone{i}"), "1")), &[])
            .await;
        assert_not_found(&r, "cdn-edge; fwd=miss", "missing");
    }
    assert_eq!(first.requests(), 5);
    assert_eq!(second.requests(), 0, "no failover after a 404");
    assert_eq!(edge.metric("cdn_edge_origin_failovers_total").await, 0.0);

    let status = client::get(edge.admin, "/status", &[]).await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    let origins = status["origins"].as_array().unwrap();
    assert_eq!(origins[0]["url"], first.url().as_str());
    assert_eq!(origins[0]["healthy"], true, "{status}");
    assert_eq!(origins[0]["consecutive_failures"], 0, "{status}");
    assert!(origins[0]["last_error"].is_null(), "{status}");

    let r = edge.get(&in_slice(0, &signed("m", "1")), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        second.requests(),
        0,
        "the first origin still gets the traffic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_that_appears_after_the_ttl_is_served_byte_exact() {
    let origin = TestOrigin::start().await;
    let edge = edge_with_ttl(vec![origin.url()], 1).await;
    let q = signed("late", "1");
    let whole = format!("/?{q}");
    assert_not_found(&edge.get(&whole, &[]).await, "cdn-edge; fwd=miss", "before");
    let bytes = object_bytes(22, SIZE);
    origin.add_object("late", "1", bytes.clone(), "video/mp4");
    let r = edge.get_until(&whole, |r| r.status == 200).await;
    assert!(
        r.complete && r.body == bytes,
        "the whole object, byte-exact"
    );
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    assert_eq!(r.header("cache-status"), Some("cdn-edge; fwd=miss"));
    let r = edge.get(&format!("/range/1000-200000?{q}"), &[]).await;
    assert!(r.status == 200 && r.body == bytes[1000..=200_000]);
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remembered_404_is_per_version() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(23, SIZE);
    origin.add_object("m", "2", bytes.clone(), "video/mp4");
    let edge = edge_with_ttl(vec![origin.url()], 10).await;
    let (v1, v2) = (signed("m", "1"), signed("m", "2"));
    assert_not_found(
        &edge.get(&in_slice(0, &v1), &[]).await,
        "cdn-edge; fwd=miss",
        "v1",
    );
    let r = edge.get(&format!("/?{v2}"), &[]).await;
    assert!(
        r.status == 200 && r.complete && r.body == bytes,
        "v2 is served"
    );
    assert_not_found(
        &edge.get(&in_slice(1, &v1), &[]).await,
        "cdn-edge; hit",
        "v1 again",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_for_a_known_object_never_hides_its_cached_slices() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(24, SIZE);
    origin.add_object("m", "1", bytes.clone(), "video/mp4");
    let edge = edge_with_ttl(vec![origin.url()], 10).await;
    let q = signed("m", "1");
    assert_eq!(edge.get(&in_slice(0, &q), &[]).await.status, 200);
    // The origin loses the object: a slice the edge does not hold is a 404 …
    origin.set_mode(Mode::Status(404));
    let r = edge.get(&in_slice(2, &q), &[]).await;
    assert_not_found(&r, "cdn-edge; fwd=miss", "uncached slice");
    // … and the slice it holds is still served, from the cache.
    let r = edge.get(&in_slice(0, &q), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
    let start = 10;
    assert!(r.body == bytes[start..start + 100]);
}
