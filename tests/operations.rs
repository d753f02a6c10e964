//! Production operations: HTTPS with HTTP/2, HTTPS origins, client connection limits,
//! the access log, graceful shutdown and the upgrade hand-over.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::certs::TestPki;
use support::client::{self, closed_within};
use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::TestOrigin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SIZE: usize = 1_000_000;

async fn origin_with_object() -> (TestOrigin, Vec<u8>) {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(7, SIZE);
    origin.add_object("movie", "1", bytes.clone(), "video/mp4");
    (origin, bytes)
}

/// curl over HTTPS against the edge; returns (HTTP version, status, body).
fn curl(pki: &TestPki, port: u16, target: &str, args: &[&str]) -> (String, u16, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&pki.ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(args)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_version} %{http_code}"])
        .arg(format!("https://localhost:{port}{target}"))
        .output()
        .expect("curl (Debian package curl)");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = String::from_utf8(out.stdout).unwrap();
    let (version, code) = written.split_once(' ').unwrap();
    (
        version.to_string(),
        code.parse().unwrap(),
        std::fs::read(&body).unwrap_or_default(),
    )
}

async fn https_edge(pki: &TestPki, origin: &TestOrigin) -> Edge {
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.https = Some((pki.cert.clone(), pki.key.clone()));
    Edge::start(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_h2_and_http11_by_alpn_with_exact_bytes() {
    let pki = TestPki::new();
    let (origin, bytes) = origin_with_object().await;
    let edge = https_edge(&pki, &origin).await;
    let port = edge.https.unwrap().port();
    let q = signed("movie", "1");

    let (version, status, body) =
        curl(&pki, port, &format!("/range/1000-400999?{q}"), &["--http2"]);
    assert_eq!((version.as_str(), status), ("2", 200));
    assert!(
        body == bytes[1000..401000],
        "h2 body differs from the origin's bytes"
    );

    let (version, status, body) = curl(
        &pki,
        port,
        &format!("/?{q}"),
        &["--http2", "-H", "Range: bytes=999000-"],
    );
    assert_eq!((version.as_str(), status), ("2", 206));
    assert!(body == bytes[999000..], "h2 Range body differs");

    let (version, status, body) = curl(&pki, port, &format!("/range/0-65535?{q}"), &["--http1.1"]);
    assert_eq!((version.as_str(), status), ("1.1", 200));
    assert!(body == bytes[..65536], "http/1.1 body differs");
    assert_eq!(
        edge.metric("cdn_edge_client_sendfile_bytes_total").await,
        0.0,
        "TLS responses are encrypted in user space, never sent from the page pool"
    );

    // Plain HTTP keeps working beside HTTPS, and bad signatures are refused over both.
    let plain = edge.get(&format!("/range/0-9?{q}"), &[]).await;
    assert_eq!(plain.body, bytes[..10]);
    let (_, status, _) = curl(&pki, port, "/range/0-9?o=movie&v=1", &["--http2"]);
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_refuses_tls_below_1_2() {
    let pki = TestPki::new();
    let (origin, _) = origin_with_object().await;
    let edge = https_edge(&pki, &origin).await;
    let port = edge.https.unwrap().port();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--tlsv1",
            "--tls-max",
            "1.1",
            "--cacert",
        ])
        .arg(&pki.ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/healthz"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a TLS 1.1 handshake succeeded");
    // TLS 1.3 only works.
    let (_, status, _) = curl(&pki, port, "/nothing", &["--tlsv1.3"]);
    assert_eq!(status, 404);
}

fn start_error(conf_text: &str, dir: &Path) -> String {
    let conf = dir.join("edge.toml");
    std::fs::write(&conf, conf_text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cdn-edge"))
        .args(["serve", "--conf"])
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "the edge started with a bad TLS file"
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_certificate_files_stop_the_start_with_a_clear_error() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let conf = |cert: &Path, key: &Path| {
        format!(
            "[listen]\nhttp = \"{}\"\nhttps = \"{}\"\nadmin = \"{}\"\n[tls]\ncert = {:?}\nkey = {:?}\n\
             [signing]\n[[signing.keys]]\nid = \"k\"\nsecret = \"s\"\n[origin]\nurls = [\"http://127.0.0.1:9\"]\n",
            free(),
            free(),
            free(),
            cert.display().to_string(),
            key.display().to_string()
        )
    };
    let missing = dir.path().join("missing.pem");
    let err = start_error(&conf(&missing, &pki.key), dir.path());
    assert!(
        err.contains("missing.pem") && err.contains("cannot read"),
        "{err}"
    );

    let stray = pki.stray_key();
    let err = start_error(&conf(&pki.cert, &stray), dir.path());
    assert!(err.contains("does not fit the certificate"), "{err}");

    // A key where the certificate should be.
    let err = start_error(&conf(&pki.key, &pki.key), dir.path());
    assert!(err.contains("edge.key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_origin_is_verified_against_the_configured_ca() {
    let pki = TestPki::new();
    let origin = TestOrigin::start_tls(&pki.cert, &pki.key).await;
    let bytes = object_bytes(11, 300_000);
    origin.add_object("movie", "1", bytes.clone(), "video/mp4");
    let q = signed("movie", "1");

    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.ca_file = Some(pki.ca.clone());
    let edge = Edge::start(opts.clone()).await;
    let r = edge.get(&format!("/range/5-200004?{q}"), &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body == bytes[5..200005],
        "bytes from the HTTPS origin differ"
    );

    // Without the CA the origin's certificate is not trusted: nothing is served.
    opts.ca_file = None;
    let untrusting = Edge::start(opts).await;
    let before = origin.requests();
    let r = untrusting.get(&format!("/range/5-200004?{q}"), &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        origin.requests(),
        before,
        "a request went over an unverified connection"
    );
}

fn limited(origin: &TestOrigin, limits: &str) -> EdgeOptions {
    EdgeOptions::limited(origin.url(), limits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_request_is_cut_off() {
    let (origin, _) = origin_with_object().await;
    let edge = Edge::start(limited(&origin, "request_timeout_ms = 1000")).await;
    let mut sock = TcpStream::connect(edge.http).await.unwrap();
    let request = format!(
        "GET /range/0-9?{} HTTP/1.1\r\nHost: e\r\n\r\n",
        signed("movie", "1")
    );
    let started = Instant::now();
    let mut cut_off = false;
    // One byte every 100 ms: the whole request would take far longer than a second.
    for byte in request.as_bytes() {
        if sock.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        if closed_within(&mut sock, Duration::from_millis(100)).await {
            cut_off = true;
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still connected after 10 s"
        );
    }
    assert!(cut_off, "the whole request trickled in");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "cut off after {elapsed:?}"
    );
    edge.wait_for_metric("cdn_edge_client_timeouts_total{phase=\"request\"}", 1.0)
        .await;
    assert_eq!(origin.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let (origin, bytes) = origin_with_object().await;
    let edge = Edge::start(limited(&origin, "idle_timeout_ms = 500")).await;

    let mut idle = TcpStream::connect(edge.http).await.unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    edge.wait_for_metric("cdn_edge_client_timeouts_total{phase=\"idle\"}", 1.0)
        .await;

    // Requests on one connection, each sent within the idle time, are all served.
    let q = signed("movie", "1");
    let mut sock = TcpStream::connect(edge.http).await.unwrap();
    for i in 0..3u64 {
        let req = format!("GET /range/{i}-{i}?{q} HTTP/1.1\r\nHost: e\r\n\r\n");
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(&bytes[i as usize..=i as usize])
            || !got.windows(4).any(|w| w == b"\r\n\r\n")
        {
            let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
                .await
                .expect("answer in time")
                .unwrap();
            assert!(n > 0, "closed before answer {i}");
            got.extend_from_slice(&buf[..n]);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once() {
    let (origin, bytes) = origin_with_object().await;
    let edge = Edge::start(limited(&origin, "max_connections = 2")).await;
    let q = signed("movie", "1");
    // Two open connections, each proven accepted by an answer.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(client::answered(edge.http, &format!("/range/0-0?{q}")).await);
    }
    let mut third = TcpStream::connect(edge.http).await.unwrap();
    assert!(closed_within(&mut third, Duration::from_secs(5)).await);
    edge.wait_for_metric("cdn_edge_client_connections_refused_total", 1.0)
        .await;
    assert_eq!(edge.metric("cdn_edge_client_connections").await, 2.0);

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while edge.metric("cdn_edge_client_connections").await > 0.0 {
        assert!(
            Instant::now() < deadline,
            "closed connections still counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert_eq!(r.body, bytes[..100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_connections_close_after_the_request_limit() {
    let (origin, _) = origin_with_object().await;
    let edge = Edge::start(limited(&origin, "keepalive_requests = 2")).await;
    let q = signed("movie", "1");
    let mut sock = TcpStream::connect(edge.http).await.unwrap();
    let req = format!("GET /range/0-0?{q} HTTP/1.1\r\nHost: e\r\n\r\n");
    let mut buf = [0u8; 4096];
    for _ in 0..2 {
        sock.write_all(req.as_bytes()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
            .await
            .expect("answer in time")
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }
    assert!(closed_within(&mut sock, Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_json_with_no_signature_or_token() {
    let (origin, _) = origin_with_object().await;
    let edge = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let q = signed("movie", "1");
    let sc = q
        .split('&')
        .find_map(|p| p.strip_prefix("sc="))
        .unwrap()
        .to_string();
    assert_eq!(edge.get(&format!("/range/0-99?{q}"), &[]).await.status, 200);
    assert_eq!(edge.get(&format!("/range/0-99?{q}"), &[]).await.status, 200);
    let bad = q.replace("t=tok", "t=tok2");
    assert_eq!(
        edge.get(&format!("/?{bad}"), &[("Range", "bytes=0-1")])
            .await
            .status,
        403
    );
    assert_eq!(edge.get("/nope?t=secret-token", &[]).await.status, 404);

    let log = edge.terminate().await;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect();
    assert_eq!(lines.len(), 4, "{log}");
    let first = &lines[0];
    assert_eq!(first["route"], "range");
    assert_eq!(first["status"], 200);
    assert_eq!(first["bytes"], 100);
    assert_eq!(first["cache"], "fwd=miss");
    assert_eq!(first["path"], "/range/0-99");
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(lines[1]["cache"], "hit");
    assert_eq!(lines[2]["status"], 403);
    assert_eq!(lines[2]["range"], "bytes=0-1");
    assert_eq!(lines[3]["status"], 404);
    for needle in [sc.as_str(), "sc=", "t=tok", "secret-token"] {
        assert!(!log.contains(needle), "the log contains {needle:?}:\n{log}");
    }
}

/// Access lines after one signed range request, for a `[log]` section and `CDN_EDGE_LOG`.
async fn access_lines(log_section: &str, log_env: Option<&str>) -> Vec<String> {
    let (origin, _) = origin_with_object().await;
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.extra = format!("[log]\n{log_section}\n");
    opts.log_env = log_env.map(str::to_string);
    let edge = Edge::start(opts).await;
    let q = signed("movie", "1");
    assert_eq!(edge.get(&format!("/range/0-9?{q}"), &[]).await.status, 200);
    let log = edge.terminate().await;
    log.lines()
        .filter(|l| l.contains("\"target\":\"access\"") || l.contains("INFO access:"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_settings_come_from_the_config_and_the_environment_wins() {
    // The configured level hides info lines, access lines included.
    assert!(access_lines("level = \"warn\"", None).await.is_empty());
    // CDN_EDGE_LOG overrides the configured level.
    assert_eq!(
        access_lines("level = \"warn\"", Some("info")).await.len(),
        1
    );
    // access = false turns the access log off at any level.
    assert!(access_lines("access = false", Some("info"))
        .await
        .is_empty());
    // format = "text": a readable line, not JSON.
    let text = access_lines("format = \"text\"", Some("info")).await;
    assert_eq!(text.len(), 1, "{text:?}");
    assert!(
        text[0].contains("INFO access: client=127.0.0.1 method=GET path=\"/range/0-9\""),
        "{text:?}"
    );
    assert!(!text[0].contains("sc="), "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_large_transfer_finish() {
    let origin = TestOrigin::start().await;
    let size = 24 << 20;
    let bytes = object_bytes(3, size);
    origin.add_object("big", "1", bytes.clone(), "video/mp4");
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.slice_bytes = 1 << 20;
    opts.grace_period_secs = 10;
    let mut edge = Edge::start(opts).await;
    let q = signed("big", "1");

    let mut sock = TcpStream::connect(edge.http).await.unwrap();
    let req = format!(
        "GET /range/0-{}?{q} HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        size - 1
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::with_capacity(size + 1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut signalled = false;
    let started = Instant::now();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), sock.read(&mut buf))
            .await
            .expect("transfer stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if !signalled && got.len() > 1 << 20 {
            edge.signal("TERM");
            signalled = true;
        }
        // A slow reader (about 12 MB/s): the transfer outlasts the moment of SIGTERM.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    assert!(signalled);
    let response = client::parse(&got, false).expect("a response");
    assert_eq!(response.status, 200);
    assert!(
        response.complete,
        "transfer cut short at {} bytes",
        response.body.len()
    );
    assert!(response.body == bytes, "bytes differ from the origin's");
    // New connections are no longer served, and the process exits.
    edge.wait_exit(Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hands_over_listeners_without_refusing_a_request() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(5, 2_000_000);
    origin.add_object("movie", "1", bytes.clone(), "video/mp4");
    let disk = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.disk = Some((disk.path().to_path_buf(), 64 << 20));
    opts.grace_period_secs = 1;
    opts.extra = format!(
        "[forward]\nspool_dir = {:?}\nlogblob = \"http://127.0.0.1:9\"\n",
        spool.path().display().to_string()
    );
    let mut old = Edge::start(opts).await;
    let q = signed("movie", "1");
    let http = old.http;
    // Every slice in memory and on disk before the hand-over.
    let whole = old.get(&format!("/range/0-1999999?{q}"), &[]).await;
    assert!(whole.body == bytes);
    let slices = 2_000_000f64 / (64.0 * 1024.0);
    old.wait_for_metric("cdn_edge_disk_writes_total", slices.ceil())
        .await;
    let origin_before = origin.requests();

    // Players keep asking, one new connection per request, through the whole hand-over.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let expected = bytes.clone();
    let q2 = q.clone();
    let players = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        let mut slowest = Duration::ZERO;
        let mut i = 0usize;
        while !*stop_rx.borrow() && ok + (failed.len() as u32) < 100_000 {
            let sent = Instant::now();
            let start = (i * 7919) % 1_900_000;
            let target = format!("/range/{start}-{}?{q2}", start + 99_999);
            match client::send_raw(
                http,
                format!("GET {target} HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            {
                Ok(raw) => match client::parse(&raw, false) {
                    Some(r) if r.status == 200 && r.body == expected[start..start + 100_000] => {
                        ok += 1
                    }
                    other => failed.push(format!("{target}: {:?}", other.map(|r| r.status))),
                },
                Err(e) => failed.push(format!("{target}: {e}")),
            }
            slowest = slowest.max(sent.elapsed());
            i += 1;
        }
        (ok, failed, slowest)
    });

    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = old.upgrade().await;
    old.wait_exit(Duration::from_secs(30)).await;
    let old_log = old.log_text();
    assert!(
        old_log.contains("disk tier and spool handed over"),
        "{old_log}"
    );
    assert!(!old_log.contains("cannot read the spool"), "{old_log}");
    // The new process serves on its own now.
    let served_before = new
        .metric("cdn_edge_requests_total{route=\"range\",status=\"200\"}")
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while new
        .metric("cdn_edge_requests_total{route=\"range\",status=\"200\"}")
        .await
        < served_before + 20.0
    {
        assert!(Instant::now() < deadline, "the new process is not serving");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send(true).unwrap();
    let (ok, failed, slowest) = players.await.unwrap();
    // The new process took the disk tier over: nothing was fetched again.
    assert_eq!(
        origin.requests(),
        origin_before,
        "slices were fetched again"
    );
    assert!(
        new.metric("cdn_edge_cache_lookups_total{result=\"hit\",tier=\"disk\"}")
            .await
            > 0.0
    );
    // And the spool: a log blob is accepted by the new process.
    let r = client::post(
        http,
        "/log/cadmium/logblob/1?reqId=after-upgrade",
        &[],
        b"{}",
    )
    .await;
    assert_eq!(r.status, 202, "{}", new.log_text());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 50, "only {ok} requests");
    let log = new.log_text();
    assert!(log.contains("\"upgrade\":true"), "{log}");
    eprintln!("hand-over: {ok} requests, none failed, slowest {slowest:?}");
}
