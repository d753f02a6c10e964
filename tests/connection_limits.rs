//! Client limits that bound what slow or many clients can hold: caps on connections in all
//! and per client address (TLS handshakes included), the TLS handshake deadline, the least
//! send rate, and the budget of slice bytes held by video responses.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use support::certs::TestPki;
use support::client::{answered, closed_within};
use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::TestOrigin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Larger than loopback socket buffers hold, so a client that does not read holds the
/// response in flight.
const BIG: usize = 32 << 20;

async fn origin_with(len: usize) -> TestOrigin {
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "1", object_bytes(5, len), "video/mp4");
    origin
}

fn limited(origin: &TestOrigin, limits: &str) -> EdgeOptions {
    EdgeOptions::limited(origin.url(), limits)
}

/// A connection with a small receive buffer that has sent `GET target` and reads nothing.
async fn stalled_get(addr: SocketAddr, target: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut sock = socket.connect(addr).await.unwrap();
    sock.write_all(format!("GET {target} HTTP/1.1\r\nHost: e\r\n\r\n").as_bytes())
        .await
        .unwrap();
    sock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_address_cap_are_closed_at_once() {
    let origin = origin_with(1000).await;
    let edge = Edge::start(limited(
        &origin,
        "max_connections = 100\nmax_connections_per_ip = 2",
    ))
    .await;
    let target = format!("/range/0-0?{}", signed("movie", "1"));
    let held = vec![
        answered(edge.http, &target).await,
        answered(edge.http, &target).await,
    ];
    let mut third = TcpStream::connect(edge.http).await.unwrap();
    assert!(closed_within(&mut third, Duration::from_secs(5)).await);
    edge.wait_for_metric(
        "cdn_edge_client_refusals_total{reason=\"max_connections_per_ip\"}",
        1.0,
    )
    .await;
    assert_eq!(
        edge.metric("cdn_edge_client_refusals_total{reason=\"max_connections\"}")
            .await,
        0.0
    );
    drop(held);
    edge.wait_for_metric_exact("cdn_edge_client_connections", 0.0)
        .await;
    let _again = answered(edge.http, &target).await;
}

/// The start of a TLS ClientHello record, cut off.
const HALF_A_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_and_ip_sni_are_counted_without_error_or_warning_lines() {
    let pki = TestPki::new();
    let origin = origin_with(1000).await;
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.https = Some((pki.cert.clone(), pki.key.clone()));
    let edge = Edge::start(opts).await;
    let https = edge.https.unwrap();

    // A client that gives up in the middle of its ClientHello.
    let mut sock = TcpStream::connect(https).await.unwrap();
    sock.write_all(HALF_A_CLIENT_HELLO).await.unwrap();
    drop(sock);
    edge.wait_for_metric(
        "cdn_edge_tls_handshake_failures_total{reason=\"closed\"}",
        1.0,
    )
    .await;

    // A client that sends an IP address as SNI, as wrk does; its handshake succeeds.
    let out = Command::new("openssl")
        .args(["s_client", "-brief", "-connect"])
        .arg(https.to_string())
        .args(["-servername", "127.0.0.1"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the openssl command line tool");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("CONNECTION ESTABLISHED"), "{said}");

    // Lines are written in order by one thread: once this request's access line is out,
    // so is anything logged about the handshakes before it.
    let r = edge.get("/after-the-handshakes", &[]).await;
    assert_eq!(r.status, 404);
    edge.wait_for_log("/after-the-handshakes").await;
    let log = edge.log_text();
    for line in log.lines() {
        assert!(
            !line.contains("\"ERROR\"") && !line.contains("\"WARN\""),
            "a failed handshake or an IP address as SNI logged: {line}"
        );
    }
    assert_eq!(
        edge.metric("cdn_edge_tls_handshake_failures_total{reason=\"protocol\"}")
            .await,
        0.0
    );
}

/// Private memory of a process (`RssAnon`), in bytes.
fn private_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("RssAnon in /proc/<pid>/status");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_costs_the_edge_a_few_pages() {
    const CONNS: usize = 400;
    let origin = origin_with(1000).await;
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let target = format!("/range/0-99?{}", signed("movie", "1"));
    // The object's metadata and slice, and the runtime's first allocations.
    let mut warm = Vec::new();
    for _ in 0..50 {
        warm.push(answered(edge.http, &target).await);
    }
    drop(warm);
    edge.wait_for_metric_exact("cdn_edge_client_connections", 0.0)
        .await;
    let before = private_bytes(edge.pid());
    let mut held = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        held.push(answered(edge.http, &target).await);
    }
    edge.wait_for_metric_exact("cdn_edge_client_connections", CONNS as f64)
        .await;
    let per_connection = private_bytes(edge.pid()).saturating_sub(before) / CONNS as u64;
    eprintln!("private memory per open connection: {per_connection} bytes");
    // Open after a request, waiting for the next one; a 64 KiB read buffer per
    // connection alone would be over the bound.
    assert!(
        per_connection < 40 << 10,
        "{per_connection} bytes of private memory per open connection"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_responses_over_the_pinned_budget_get_503_until_slow_ones_end() {
    let origin = origin_with(BIG).await;
    // Slices are 64 KiB: one response holding one slice leaves no room for another.
    let edge = Edge::start(limited(&origin, "max_pinned_bytes = 100000")).await;
    let q = signed("movie", "1");
    let slow = stalled_get(edge.http, &format!("/range/0-{}?{q}", BIG - 1)).await;
    edge.wait_for_metric("cdn_edge_response_pinned_bytes", 65536.0)
        .await;

    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("Retry-After"), Some("2"));
    assert_eq!(
        edge.metric("cdn_edge_client_refusals_total{reason=\"pinned_bytes\"}")
            .await,
        1.0
    );
    // Other routes hold no slices and are not refused.
    assert_eq!(edge.get("/healthz-or-anything", &[]).await.status, 404);

    // The slow client leaves: what its response held is given back.
    drop(slow);
    edge.wait_for_metric_exact("cdn_edge_response_pinned_bytes", 0.0)
        .await;
    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, object_bytes(5, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_responses_sharing_cached_slices_count_them_once() {
    // 8 MiB slices, more than loopback socket buffers take: a response to a client that
    // reads nothing stays on slice 0, with slice 1 fetched. Room for three slices.
    const SLICE: usize = 8 << 20;
    let origin = origin_with(4 * SLICE).await;
    let mut opts = limited(&origin, &format!("max_pinned_bytes = {}", 3 * SLICE));
    opts.slice_bytes = SLICE as u64;
    opts.memory_bytes = 64 << 20;
    let edge = Edge::start(opts).await;
    let q = signed("movie", "1");
    let target = format!("/range/0-{}?{q}", 4 * SLICE - 1);
    let mut slow = vec![stalled_get(edge.http, &target).await];
    edge.wait_for_metric_exact("cdn_edge_response_pinned_bytes", (2 * SLICE) as f64)
        .await;
    // Players of one hot title: every response holds the same two cached slices.
    for _ in 0..9 {
        slow.push(stalled_get(edge.http, &target).await);
    }
    for sock in &mut slow {
        let mut status = [0u8; 12];
        sock.read_exact(&mut status).await.unwrap();
        assert_eq!(&status, b"HTTP/1.1 200", "every slow response is admitted");
    }
    assert_eq!(
        edge.metric("cdn_edge_response_pinned_bytes").await,
        (2 * SLICE) as f64,
        "two slices held by ten responses count once"
    );
    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, object_bytes(5, 100));
    assert_eq!(
        edge.metric("cdn_edge_client_refusals_total{reason=\"pinned_bytes\"}")
            .await,
        0.0
    );
    drop(slow);
    edge.wait_for_metric_exact("cdn_edge_response_pinned_bytes", 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_a_trickle_is_cut_off_and_its_slices_let_go() {
    let origin = origin_with(BIG).await;
    let edge = Edge::start(limited(
        &origin,
        "min_send_rate_bytes_per_sec = 1000000\nsend_rate_window_ms = 500",
    ))
    .await;
    let q = signed("movie", "1");
    let mut slow = stalled_get(edge.http, &format!("/range/0-{}?{q}", BIG - 1)).await;
    // 1 KiB every 50 ms (20 kB/s): each read moves the idle deadline on. (The client
    // keeps receiving what the kernel queued for it after the edge let go.)
    let trickle = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        for _ in 0..400 {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    edge.wait_for_metric("cdn_edge_client_slow_sends_total", 1.0)
        .await;
    edge.wait_for_metric_exact("cdn_edge_response_pinned_bytes", 0.0)
        .await;
    trickle.abort();
}
