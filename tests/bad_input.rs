//! Hostile and malformed requests get a 4xx (or a closed connection), never a panic, and
//! the edge keeps serving afterwards.

mod support;

use support::client::{parse, send_raw};
use support::edge::{signed, Edge, EdgeOptions};
use support::origin::TestOrigin;

async fn setup() -> (TestOrigin, Edge) {
    let origin = TestOrigin::start().await;
    origin.add_object(
        "movie",
        "v1",
        support::object_bytes(11, 100_000),
        "video/mp4",
    );
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    (origin, edge)
}

async fn still_serving(edge: &mut Edge) {
    assert!(
        edge.is_running(),
        "the edge process died; log:\n{}",
        edge.log_text()
    );
    let r = edge
        .get(&format!("/range/0-9?{}", signed("movie", "v1")), &[])
        .await;
    assert_eq!(r.status, 200);
    assert!(!edge.log_text().contains("panicked"), "{}", edge.log_text());
}

/// Status of the answer to raw bytes, or None if the edge just closed the connection.
async fn raw_status(edge: &Edge, bytes: &[u8]) -> Option<u16> {
    let raw = send_raw(edge.http, bytes)
        .await
        .expect("the edge answers or closes in time");
    parse(&raw, false).map(|r| r.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404() {
    let (origin, mut edge) = setup().await;
    let q = signed("movie", "v1");
    for path in [
        "/../../etc/passwd",
        "/range",
        "/objects/movie/v1",
        "/%2e%2e/",
        "/index.html",
        "/ranges/0-1",
    ] {
        let r = edge.get(&format!("{path}?{q}"), &[]).await;
        assert_eq!(r.status, 404, "{path}");
    }
    assert_eq!(origin.requests(), 0);
    still_serving(&mut edge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_percent_encoding_and_odd_queries_are_403() {
    let (origin, mut edge) = setup().await;
    let q = signed("movie", "v1");
    for query in [
        "o=%ZZ&v=v1&e=1&t=&sc=00".to_string(),
        q.replace("o=movie", "o=mo%76ie"),
        q.replace("o=movie", "o=movie%00"),
        q.replace("t=tok", "t=%ZZ%"),
        "&&&&===&".to_string(),
        "o".to_string(),
    ] {
        let r = edge.get(&format!("/range/0-9?{query}"), &[]).await;
        assert_eq!(r.status, 403, "{query}");
    }
    assert_eq!(origin.requests(), 0);
    // Thousands of unrelated parameters are ignored, not a reason to refuse.
    let noisy = format!("/range/0-9?{q}&{}", "x=1&".repeat(2000));
    assert_eq!(edge.get(&noisy, &[]).await.status, 200);
    still_serving(&mut edge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_control_bytes_are_refused() {
    let (_origin, mut edge) = setup().await;
    let q = signed("movie", "v1");
    let cases: Vec<Vec<u8>> = vec![
        [
            b"GET /range/0-9?o=\xff\xfe&v=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                .as_slice(),
        ]
        .concat(),
        [
            b"GET /range/\xc3\x28-9?".as_slice(),
            q.as_bytes(),
            b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ]
        .concat(),
        [
            b"GET /?".as_slice(),
            q.as_bytes(),
            b" HTTP/1.1\r\nHost: x\r\nRange: bytes=\xff-\r\nConnection: close\r\n\r\n",
        ]
        .concat(),
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET /range/0-9 HTTP/9.9\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), // a TLS hello on the plain port
    ];
    for bytes in cases {
        if let Some(status) = raw_status(&edge, &bytes).await {
            assert!(
                (400..500).contains(&status) || status == 200,
                "{status} for {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }
    still_serving(&mut edge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_refused() {
    let (origin, mut edge) = setup().await;
    let q = signed("movie", "v1");
    let big = "a".repeat(40 * 1024);
    let r = edge
        .get(&format!("/range/0-9?{q}"), &[("X-Big", &big)])
        .await;
    assert_eq!(r.status, 431);
    let long_query = format!("/range/0-9?{q}&pad={}", "b".repeat(40 * 1024));
    assert_eq!(edge.get(&long_query, &[]).await.status, 431);
    // Far past any limit: refused or cut off, and the edge survives.
    let huge = format!(
        "GET /range/0-9?{q} HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n",
        "c".repeat(2 << 20)
    );
    if let Some(status) = raw_status(&edge, huge.as_bytes()).await {
        assert!((400..500).contains(&status), "{status}");
    }
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /range/0-9?{q} HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n");
    if let Some(status) = raw_status(&edge, req.as_bytes()).await {
        assert!((400..500).contains(&status), "{status}");
    }
    assert_eq!(origin.requests(), 0);
    still_serving(&mut edge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_numbers_never_overflow() {
    let (_origin, mut edge) = setup().await;
    let q = signed("movie", "v1");
    for (target, range, status) in [
        (format!("/range/18446744073709551615-0?{q}"), None, 400),
        (
            format!("/range/18446744073709551614-18446744073709551615?{q}"),
            None,
            416,
        ),
        (
            format!("/range/0-99999999999999999999999999?{q}"),
            None,
            400,
        ),
        (
            format!("/?{q}"),
            Some("bytes=18446744073709551615-18446744073709551615"),
            416,
        ),
        (format!("/?{q}"), Some("bytes=-18446744073709551615"), 206),
        (format!("/?{q}"), Some("bytes=0-18446744073709551615"), 206),
        (
            format!("/?{q}"),
            Some("bytes=99999999999999999999999-"),
            200,
        ),
    ] {
        let headers: Vec<(&str, &str)> = range.iter().map(|r| ("Range", *r)).collect();
        assert_eq!(
            edge.get(&target, &headers).await.status,
            status,
            "{target} {range:?}"
        );
    }
    let e = cdn_edge::auth::sign_query(support::edge::KEY1.as_bytes(), "movie", "v1", u64::MAX, "");
    // Past signing.max_ttl_secs: refused, and nothing overflows on the way (with the
    // limit off it is served: see auth's a_lifetime_past_max_ttl_is_403).
    let r = edge.get(&format!("/range/0-1?{e}"), &[]).await;
    assert_eq!(
        r.status, 403,
        "e = u64::MAX must not overflow with the skew"
    );
    assert_eq!(
        r.text(),
        "signed URL expires further ahead than this edge accepts\n"
    );
    still_serving(&mut edge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_are_405_and_reserved_routes_are_not_served() {
    let (_origin, mut edge) = setup().await;
    let q = signed("movie", "v1");
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let r = edge
            .request(method, &format!("/?{q}"), &[("Content-Length", "0")])
            .await;
        assert_eq!(r.status, 405, "{method}");
    }
    still_serving(&mut edge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_request_is_400_and_connect_is_405_then_closed() {
    let (origin, mut edge) = setup().await;
    assert_eq!(raw_status(&edge, b"GARBAGE\r\n\r\n").await, Some(400));
    // Keep-alive is asked for; the edge answers and closes all the same (send_raw reads
    // to the end of the stream, so a connection left open would time out here).
    let connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
    assert_eq!(raw_status(&edge, connect).await, Some(405));
    assert_eq!(origin.requests(), 0);
    still_serving(&mut edge).await;
}
