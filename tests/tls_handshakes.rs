//! TLS handshakes count against the connection cap from the moment they are accepted,
//! and have a deadline. In a test binary of its own: it measures deadlines, which other
//! tests running beside it on a small machine can delay.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::certs::TestPki;
use support::client::closed_within;
use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::TestOrigin;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_count_against_the_cap_and_have_a_deadline() {
    let pki = TestPki::new();
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "1", object_bytes(5, 1000), "video/mp4");
    let mut opts = EdgeOptions::limited(
        origin.url(),
        // Long enough that the third connection below surely arrives while both
        // handshakes still hold their places, however slowly the metrics are polled.
        "max_connections = 2\ntls_handshake_timeout_ms = 10000",
    );
    opts.https = Some((pki.cert.clone(), pki.key.clone()));
    let edge = Edge::start(opts).await;
    let https = edge.https.unwrap();

    // Two connections that never send a ClientHello hold both places...
    let started = Instant::now();
    let mut silent = vec![
        TcpStream::connect(https).await.unwrap(),
        TcpStream::connect(https).await.unwrap(),
    ];
    edge.wait_for_metric("cdn_edge_client_connections", 2.0)
        .await;
    let mut plain = TcpStream::connect(edge.http).await.unwrap();
    edge.wait_for_metric(
        "cdn_edge_client_refusals_total{reason=\"max_connections\"}",
        1.0,
    )
    .await;
    assert!(
        closed_within(&mut plain, Duration::from_secs(5)).await,
        "a third connection was let in beside two handshakes"
    );

    // ...until their handshakes run out of time.
    for sock in &mut silent {
        assert!(closed_within(sock, Duration::from_secs(20)).await);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(9900) && elapsed < Duration::from_secs(20),
        "handshakes closed after {elapsed:?}"
    );
    edge.wait_for_metric(
        "cdn_edge_tls_handshake_failures_total{reason=\"timeout\"}",
        2.0,
    )
    .await;
    edge.wait_for_metric_exact("cdn_edge_client_connections", 0.0)
        .await;

    // A handshake that finishes is served, over h2 as ALPN chose.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--http2", "--cacert"])
        .arg(&pki.ca)
        .args([
            "--resolve",
            &format!("localhost:{}:127.0.0.1", https.port()),
        ])
        .args(["-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
        .arg(format!(
            "https://localhost:{}/range/0-9?{}",
            https.port(),
            signed("movie", "1")
        ))
        .output()
        .expect("curl (Debian package curl)");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
}
