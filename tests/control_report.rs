//! The control-plane report (SPEC 7): with `[control]` the edge POSTs its `/status`
//! document plus `load` every `report_secs`; reports that fail, hang or find nobody are
//! counted, and none of that slows serving.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::certs::TestPki;
use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::TestOrigin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const OBJECT: usize = 1_000_000;

/// How the control server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// 204.
    Accept,
    /// 500.
    Fail,
    /// Reads the report and never answers.
    Hang,
}

/// One report as received.
#[derive(Clone)]
struct Received {
    at: Instant,
    path: String,
    content_type: Option<String>,
    body: Value,
}

/// A control plane on 127.0.0.1:0 that records every report (keep-alive connections,
/// as the edge pools them) and answers as told.
struct ControlServer {
    addr: SocketAddr,
    answer: watch::Sender<Answer>,
    reports: Arc<Mutex<Vec<Received>>>,
    stop: watch::Sender<bool>,
}

impl ControlServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (answer, answer_rx) = watch::channel(Answer::Accept);
        let (stop, stop_rx) = watch::channel(false);
        let reports = Arc::new(Mutex::new(Vec::new()));
        let recorded = reports.clone();
        tokio::spawn(async move {
            let mut stopped = stop_rx.clone();
            loop {
                let sock = tokio::select! {
                    _ = stopped.changed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((sock, _)) => sock,
                        Err(_) => continue,
                    },
                };
                let (answer, recorded, mut stopped) =
                    (answer_rx.clone(), recorded.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stopped.changed() => {}
                        _ = serve(sock, answer, recorded) => {}
                    }
                });
            }
        });
        Self {
            addr,
            answer,
            reports,
            stop,
        }
    }

    fn set(&self, answer: Answer) {
        self.answer.send_replace(answer);
    }

    /// The reports received so far.
    fn reports(&self) -> Vec<Received> {
        self.reports.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.reports.lock().unwrap().len()
    }

    /// Waits (bounded) until `n` reports have arrived in all.
    async fn wait_for(&self, n: usize, edge: &Edge) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.count() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} reports after 20 s; edge log:\n{}",
                self.count(),
                edge.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Closes the listener and every connection: connects are refused from now on.
    fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    mut sock: TcpStream,
    answer: watch::Receiver<Answer>,
    reports: Arc<Mutex<Vec<Received>>>,
) {
    let mut buf = Vec::new();
    loop {
        // The head, then Content-Length bytes of body.
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut chunk = [0u8; 8192];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let path = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or_default()
            .to_string();
        let header = |name: &str| {
            head.split("\r\n").skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < length {
            let mut chunk = [0u8; 8192];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        reports.lock().unwrap().push(Received {
            at: Instant::now(),
            path,
            content_type: header("content-type"),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        let answer_now = *answer.borrow();
        let status = match answer_now {
            Answer::Accept => "204 No Content",
            Answer::Fail => "500 Internal Server Error",
            Answer::Hang => {
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        if sock.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn origin_with_object() -> TestOrigin {
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "1", object_bytes(3, OBJECT), "video/mp4");
    origin
}

fn reporting_to(origin: &TestOrigin, report_url: &str, timeout_ms: u64) -> EdgeOptions {
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.memory_bytes = 8 << 20;
    opts.extra = format!(
        "[control]\nreport_url = \"{report_url}\"\nreport_secs = 1\ntimeout_ms = {timeout_ms}\n"
    );
    opts
}

const OK: &str = r#"cdn_edge_control_reports_total{result="ok"}"#;
const ERROR: &str = r#"cdn_edge_control_reports_total{result="error"}"#;
const TIMEOUT: &str = r#"cdn_edge_control_reports_total{result="timeout"}"#;
const UNREACHABLE: &str = r#"cdn_edge_control_reports_total{result="unreachable"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_arrive_every_report_secs_with_status_and_load() {
    let origin = origin_with_object().await;
    let control = ControlServer::start().await;
    let edge = Edge::start(reporting_to(
        &origin,
        &format!("http://{}/v1/report", control.addr),
        500,
    ))
    .await;

    // Traffic between the first and the third report: 40 ranges of 10,000 bytes.
    control.wait_for(1, &edge).await;
    let q = signed("movie", "1");
    const REQUESTS: usize = 40;
    for i in 0..REQUESTS {
        let start = i * 20_000;
        let r = edge
            .get(&format!("/range/{start}-{}?{q}", start + 9_999), &[])
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 10_000);
    }
    let sent = control.count();
    control.wait_for(sent + 3, &edge).await;

    let reports = control.reports();
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.path, "/v1/report");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let b = &r.body;
        // The /status document: its members, and draining.
        assert_eq!(b["version"], env!("CARGO_PKG_VERSION"), "report {i}: {b}");
        assert!(b["uptime_secs"].is_u64(), "{b}");
        assert_eq!(b["draining"], false, "{b}");
        assert_eq!(b["cache"]["memory_capacity_bytes"], 8 << 20, "{b}");
        assert!(b["origins"].is_array() && b["peers"].is_array(), "{b}");
        for key in ["requests_per_sec", "bytes_per_sec", "cache_fill_ratio"] {
            let v = b["load"][key].as_f64().unwrap_or(-1.0);
            assert!(v >= 0.0, "report {i}: load.{key} = {v}: {b}");
        }
        // The fill ratio is this report's memory tier over its capacity (no disk tier).
        let ratio = b["load"]["cache_fill_ratio"].as_f64().unwrap();
        let held = b["cache"]["memory_bytes"].as_f64().unwrap() / f64::from(8 << 20);
        assert!((ratio - held).abs() <= 0.0006, "{ratio} vs {held}: {b}");
    }
    // One a second: the gaps between arrivals.
    for pair in reports.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap > Duration::from_millis(700) && gap < Duration::from_millis(1600),
            "reports {gap:?} apart with report_secs = 1"
        );
    }
    // The loads add up to the traffic: each covers the time since the previous report.
    let mut requests = 0.0;
    let mut bytes = 0.0;
    for pair in reports.windows(2) {
        let secs = (pair[1].at - pair[0].at).as_secs_f64();
        requests += pair[1].body["load"]["requests_per_sec"].as_f64().unwrap() * secs;
        bytes += pair[1].body["load"]["bytes_per_sec"].as_f64().unwrap() * secs;
    }
    let want = REQUESTS as f64;
    assert!(
        (requests - want).abs() <= want * 0.2,
        "the reports' requests add up to {requests}, {want} were sent"
    );
    let want = want * 10_000.0;
    assert!(
        (bytes - want).abs() <= want * 0.2,
        "the reports' bytes add up to {bytes}, {want} were sent"
    );
    let last = &reports.last().unwrap().body["load"];
    assert!(last["cache_fill_ratio"].as_f64().unwrap() > 0.05, "{last}");
    edge.wait_for_metric(OK, reports.len() as f64).await;
    for series in [ERROR, TIMEOUT, UNREACHABLE] {
        assert_eq!(edge.metric(series).await, 0.0, "{series}");
    }
}

/// Median time of `GET /range/...` hits on fresh connections, sent one after another
/// for `span` (at least 50 of them).
async fn median_range_hit(edge: &Edge, q: &str, span: Duration) -> Duration {
    let started = Instant::now();
    let mut times = Vec::new();
    while (started.elapsed() < span || times.len() < 50) && times.len() < 20_000 {
        let start = (times.len() * 7_919) % (OBJECT - 1_000);
        let t = Instant::now();
        let r = edge
            .get(&format!("/range/{start}-{}?{q}", start + 999), &[])
            .await;
        times.push(t.elapsed());
        assert_eq!(r.status, 200);
    }
    times.sort();
    times[times.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hanging_or_gone_control_plane_is_counted_and_never_slows_ranges() {
    let origin = origin_with_object().await;
    let control = ControlServer::start().await;
    let edge = Edge::start(reporting_to(
        &origin,
        &format!("http://{}/report", control.addr),
        800,
    ))
    .await;
    let q = signed("movie", "1");
    // Every slice in memory: the ranges below are hits.
    let whole = edge.get(&format!("/range/0-{}?{q}", OBJECT - 1), &[]).await;
    assert_eq!(whole.status, 200);
    control.wait_for(1, &edge).await;
    let healthy = median_range_hit(&edge, &q, Duration::from_secs(3)).await;
    assert!(
        edge.metric(OK).await >= 2.0,
        "reports went on while measuring"
    );

    // Failing: 500s are errors.
    control.set(Answer::Fail);
    edge.wait_for_metric(ERROR, 2.0).await;

    // Hanging: each report times out after 800 ms, the next one is sent a second after
    // the one before was due, and one connection at most waits at any time.
    control.set(Answer::Hang);
    edge.wait_for_metric(TIMEOUT, 1.0).await;
    let received = control.count();
    let timeouts = edge.metric(TIMEOUT).await;
    let hanging = median_range_hit(&edge, &q, Duration::from_secs(3)).await;
    let during = edge.metric(TIMEOUT).await - timeouts;
    assert!(during >= 2.0, "{during} reports timed out while measuring");
    let arrived = control.count() - received;
    assert!(
        arrived <= 5,
        "{arrived} reports arrived in about 3 s with report_secs = 1: they pile up"
    );
    eprintln!(
        "median range hit: {healthy:?} with the control plane answering, {hanging:?} while it hangs"
    );
    assert!(
        hanging < healthy * 2 + Duration::from_millis(2),
        "range hits took {hanging:?} (median) while the control plane hangs, {healthy:?} before"
    );

    // Gone: connections refused are unreachable.
    control.stop();
    edge.wait_for_metric(UNREACHABLE, 1.0).await;
    let r = edge.get(&format!("/range/0-999?{q}"), &[]).await;
    assert_eq!(r.status, 200);
    let log = edge.log_text();
    assert_eq!(
        log.matches("control-plane report failed").count(),
        1,
        "one warning for the whole run of failures; log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_over_https_are_verified_against_the_configured_ca() {
    let pki = TestPki::new();
    let origin = origin_with_object().await;
    let control = TestOrigin::start_tls(&pki.cert, &pki.key).await;
    control.set_response("/report", 204, &[], b"");
    let url = format!("{}/report", control.url());

    // Without the CA the control plane's certificate is not trusted: nothing is sent.
    let mut opts = reporting_to(&origin, &url, 500);
    let untrusting = Edge::start(opts.clone()).await;
    untrusting.wait_for_metric(UNREACHABLE, 2.0).await;
    assert_eq!(untrusting.metric(OK).await, 0.0);
    assert_eq!(
        control.requests(),
        0,
        "a report went over an unverified connection"
    );
    drop(untrusting);

    opts.ca_file = Some(pki.ca.clone());
    let edge = Edge::start(opts).await;
    edge.wait_for_metric(OK, 2.0).await;
    let received = control.received();
    assert_eq!(received[0].method, "POST");
    assert_eq!(received[0].target, "/report");
    let report: Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(report["draining"], false, "{report}");
    assert!(report["load"]["requests_per_sec"].is_number(), "{report}");
}
