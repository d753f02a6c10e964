//! The admin listener (SPEC §3) and streaming: a multi-slice response starts before its
//! last slice is fetched.

mod support;

use std::time::Duration;

use support::edge::{signed, Edge, EdgeOptions};
use support::origin::TestOrigin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_and_are_not_public() {
    let origin = TestOrigin::start().await;
    origin.add_object("m", "1", support::object_bytes(1, 200_000), "video/mp4");
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let q = signed("m", "1");
    assert_eq!(
        edge.get(&format!("/range/0-150000?{q}"), &[]).await.status,
        200
    );
    assert_eq!(
        edge.get(&format!("/range/0-150000?{q}"), &[]).await.status,
        200
    );
    assert_eq!(edge.get("/range/0-1?o=m", &[]).await.status, 403);

    let health = support::client::get(edge.admin, "/healthz", &[]).await;
    assert_eq!((health.status, health.text().as_str()), (200, "ok\n"));

    let status = support::client::get(edge.admin, "/status", &[]).await;
    assert_eq!(status.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["cache"]["memory_entries"], 3);
    assert!(json["cache"]["memory_bytes"].as_u64().unwrap() >= 196_608);
    assert_eq!(json["origins"][0]["healthy"], true);
    assert!(json["uptime_secs"].is_u64());

    let metrics = edge.metrics().await;
    for series in [
        r#"cdn_edge_requests_total{route="range",status="200"} 2"#,
        r#"cdn_edge_requests_total{route="range",status="403"} 1"#,
        // The cold request fetched slices 0 and 1 together and then found slice 1 in
        // memory (one hit); the second request hit all three.
        r#"cdn_edge_cache_lookups_total{result="hit",tier="memory"} 4"#,
        r#"cdn_edge_cache_lookups_total{result="miss",tier="memory"} 3"#,
        r#"cdn_edge_origin_requests_total{result="ok"} 3"#,
        r#"cdn_edge_auth_failures_total{reason="missing_param"} 1"#,
        r#"cdn_edge_cache_entries{tier="memory"} 3"#,
        r#"cdn_edge_request_duration_seconds_count{route="range"} 3"#,
        "cdn_edge_origin_bytes_total 196608",
        // Two 150,001-byte bodies and the 26-byte 403 line.
        "cdn_edge_response_body_bytes_total{route=\"range\"} 300028",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("cdn_edge_"), "{line}");
    }

    for path in ["/metrics", "/healthz", "/status"] {
        assert_eq!(
            edge.get(path, &[]).await.status,
            404,
            "{path} must not be on the public listener"
        );
    }
    assert_eq!(
        support::client::get(edge.admin, "/nope", &[]).await.status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_slice_response_streams_before_its_last_slice_is_fetched() {
    let origin = TestOrigin::start().await;
    let bytes = support::object_bytes(2, 400_000);
    origin.add_object("m", "1", bytes.clone(), "video/mp4");
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let q = signed("m", "1");
    assert_eq!(edge.get(&format!("/range/0-0?{q}"), &[]).await.status, 200); // slice 0 cached
    origin.hold(); // every further origin answer waits

    let mut sock = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let req = format!("GET /range/0-399999?{q} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    sock.write_all(req.as_bytes()).await.unwrap();
    // The header and all of slice 0 arrive while slice 1 is still held at the origin.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let want = 65536 + 100;
    tokio::time::timeout(Duration::from_secs(10), async {
        while got.len() < want {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed early");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first slice must be sent before the origin answers for the second");
    // Slice 1 is requested from the origin (and held there) while slice 0 was sent.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while origin.requests() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "slice 1 was never requested"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        got.len() < 65536 + 1024,
        "nothing past slice 0 can have been sent yet"
    );
    origin.release();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let r = support::client::parse(&got, false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert!(r.body == bytes);
}
