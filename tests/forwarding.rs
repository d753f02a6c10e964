//! Events, log blobs and stats (SPEC §2.5): relay, durable spool, at-least-once
//! delivery, deduplication and limits, end to end.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::client::post;
use support::edge::{Edge, EdgeOptions};
use support::origin::{dead_addr, Mode, TestOrigin};

const EVENT: &str = "/msl/playapi/cadmium/event/1?reqAttempt=1&reqName=events/pause";
const BLOB: &str = "/log/cadmium/logblob/1?reqAttempt=1";

fn opts(spool: &Path, events: &str, logblob: &str, stats: &str, extra: &str) -> EdgeOptions {
    let mut o = EdgeOptions::new(vec![format!("http://{}", dead_addr())]);
    // Upstream timeouts are short so that retries come quickly, unless a test sets its own.
    let timeout = if extra.contains("timeout_ms") {
        ""
    } else {
        "timeout_ms = 500\n"
    };
    o.extra = format!(
        "[forward]\nspool_dir = {:?}\nevents = \"{events}\"\nlogblob = \"{logblob}\"\nstats = \"{stats}\"\n{timeout}max_body_bytes = 65536\n{extra}\n",
        spool.display().to_string()
    );
    o
}

fn event(id: &str) -> String {
    format!("{EVENT}&reqId={id}")
}

fn blob(id: &str) -> String {
    format!("{BLOB}&reqId={id}")
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until `series` equals `value`.
async fn wait_for_exactly(edge: &Edge, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = edge.metric(series).await;
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {now}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_relayed_with_the_upstream_answer() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_response(
        &event("e1"),
        200,
        &[("Content-Type", "application/json")],
        b"{\"result\":\"ok\"}",
    );
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    let body = vec![b'e'; 10_000];
    let r = post(
        edge.http,
        &event("e1"),
        &[
            ("Content-Type", "application/json"),
            ("X-Forwarded-For", "198.51.100.9"),
        ],
        &body,
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"{\"result\":\"ok\"}"[..])
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let got = up.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].method.as_str(), got[0].target.as_str()),
        ("POST", event("e1").as_str())
    );
    assert_eq!(got[0].body, body, "body forwarded byte for byte");
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    // No proxy is trusted: the client's own X-Forwarded-For is replaced by its address.
    assert_eq!(got[0].header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(got[0].header("via"), Some("1.1 cdn-edge"));
    // A 4xx answer is the upstream's word, relayed as it is, not spooled.
    up.set_response(&event("bad"), 400, &[], b"nope");
    assert_eq!(post(edge.http, &event("bad"), &[], b"x").await.status, 400);
    assert_eq!(
        edge.metric("cdn_edge_forwarded_total{result=\"relayed\",route=\"event\"}")
            .await,
        2.0
    );
}

/// What an upstream receives as `X-Forwarded-For` for an event (relayed at once) and a
/// log blob (spooled, delivered in the background) from a client on 127.0.0.1 that sent
/// `lines` of `X-Forwarded-For`, with `[proxies]` lines `proxies`; and the `client` of
/// their access-log lines.
async fn forwarded_for_of(proxies: &str, lines: &[&str]) -> ([Option<String>; 2], Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_response(&event("xff"), 200, &[], b"ok");
    up.set_response(&blob("xff"), 200, &[], b"");
    // A relay that takes longer than the default 500 ms (a loaded machine) would be
    // spooled and answered 202.
    let mut o = opts(
        dir.path(),
        &up.url(),
        &up.url(),
        &up.url(),
        "timeout_ms = 5000",
    );
    o.extra.push_str(&format!("[proxies]\n{proxies}\n"));
    let edge = Edge::start(o).await;
    let headers: Vec<(&str, &str)> = lines.iter().map(|l| ("X-Forwarded-For", *l)).collect();
    assert_eq!(
        post(edge.http, &event("xff"), &headers, b"e").await.status,
        200
    );
    assert_eq!(
        post(edge.http, &blob("xff"), &headers, b"b").await.status,
        202
    );
    wait_until("both requests at the upstream", || {
        let got = up.received();
        [event("xff"), blob("xff")]
            .iter()
            .all(|t| got.iter().any(|r| &r.target == t))
    })
    .await;
    let got = up.received();
    let xff = |target: &str| {
        got.iter()
            .find(|r| r.target == target)
            .and_then(|r| r.header("x-forwarded-for"))
            .map(str::to_string)
    };
    let log = edge.terminate().await;
    let clients = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .map(|v| v["client"].as_str().unwrap_or_default().to_string())
        .collect();
    ([xff(&event("xff")), xff(&blob("xff"))], clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_x_forwarded_for_is_replaced_by_the_client_address() {
    let peer_only = Some("127.0.0.1".to_string());
    // Without [proxies], and with proxies that do not include the client.
    for proxies in ["", "trusted = [\"10.0.0.0/8\", \"::1\"]"] {
        let (upstream, clients) = forwarded_for_of(proxies, &["6.6.6.6"]).await;
        assert_eq!(
            upstream,
            [peer_only.clone(), peer_only.clone()],
            "{proxies}"
        );
        assert_eq!(clients, ["127.0.0.1", "127.0.0.1"], "{proxies}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_x_forwarded_for_is_passed_on_with_the_proxy_appended() {
    let trusted = "trusted = [\"127.0.0.0/8\"]";
    let (upstream, clients) = forwarded_for_of(trusted, &["6.6.6.6"]).await;
    let chain = Some("6.6.6.6, 127.0.0.1".to_string());
    assert_eq!(upstream, [chain.clone(), chain]);
    assert_eq!(
        clients,
        ["6.6.6.6", "6.6.6.6"],
        "the access log names the client"
    );
    // Several lines are one list, in order; the client is the rightmost untrusted hop.
    let (upstream, clients) =
        forwarded_for_of(trusted, &["6.6.6.6", "198.51.100.9, 127.0.0.2"]).await;
    let chain = Some("6.6.6.6, 198.51.100.9, 127.0.0.2, 127.0.0.1".to_string());
    assert_eq!(upstream, [chain.clone(), chain]);
    assert_eq!(clients, ["198.51.100.9", "198.51.100.9"]);
    // A malformed header from a trusted proxy is not relayed.
    let (upstream, clients) = forwarded_for_of(trusted, &["6.6.6.6, evil.example"]).await;
    let peer_only = Some("127.0.0.1".to_string());
    assert_eq!(upstream, [peer_only.clone(), peer_only]);
    assert_eq!(clients, ["127.0.0.1", "127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_request_id_is_forwarded_once() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_response(&event("dup"), 200, &[], b"first");
    up.set_response(&blob("dup"), 200, &[], b"");
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    assert_eq!(
        post(edge.http, &event("dup"), &[], b"x").await.body,
        b"first"
    );
    up.set_response(&event("dup"), 200, &[], b"second");
    let again = post(edge.http, &event("dup"), &[], b"x").await;
    assert_eq!(
        again.body, b"first",
        "a retry gets the stored upstream answer"
    );
    assert_eq!(
        post(edge.http, &blob("dup"), &[], b"blob").await.status,
        202
    );
    wait_until("blob delivery", || {
        up.received().iter().any(|r| r.target == blob("dup"))
    })
    .await;
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"delivered\",route=\"logblob\"}",
        1.0,
    )
    .await;
    assert_eq!(
        post(edge.http, &blob("dup"), &[], b"blob").await.status,
        202
    );
    let events = up
        .received()
        .iter()
        .filter(|r| r.target == event("dup"))
        .count();
    let blobs = up
        .received()
        .iter()
        .filter(|r| r.target == blob("dup"))
        .count();
    assert_eq!(events, 1, "event forwarded once");
    assert_eq!(blobs, 1, "log blob forwarded once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_when_the_upstream_is_down_and_delivered_when_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let addr = dead_addr();
    let url = format!("http://{addr}");
    let edge = Edge::start(opts(dir.path(), &url, &url, &url, "")).await;
    let r = post(
        edge.http,
        &event("later"),
        &[("Content-Type", "application/json")],
        b"{\"e\":1}",
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (202, &b"{\"status\":202}"[..])
    );
    assert_eq!(
        post(edge.http, &blob("b1"), &[], b"blob-1").await.status,
        202
    );
    let status: serde_json::Value =
        serde_json::from_slice(&support::client::get(edge.admin, "/status", &[]).await.body)
            .unwrap();
    assert!(
        status["spool"]["events"]["entries"].as_u64().unwrap()
            + status["spool"]["logblob"]["entries"].as_u64().unwrap()
            >= 1
    );
    let up = TestOrigin::start_on(addr).await;
    wait_until("delivery after the upstream came back", || {
        up.received().len() >= 2
    })
    .await;
    let got = up.received();
    let e = got.iter().find(|r| r.target == event("later")).unwrap();
    assert_eq!(e.body, b"{\"e\":1}");
    assert_eq!(e.header("content-type"), Some("application/json"));
    assert_eq!(e.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        got.iter().find(|r| r.target == blob("b1")).unwrap().body,
        b"blob-1"
    );
    edge.wait_for_metric("cdn_edge_spool_entries{route=\"event\"}", 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_requests_survive_kill_9_and_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let addr = dead_addr();
    let url = format!("http://{addr}");
    let edge = Edge::start(opts(dir.path(), &url, &url, &url, "")).await;
    let mut sent = Vec::new();
    for i in 0..20 {
        let body = format!("event body {i} {}", "x".repeat(i * 37)).into_bytes();
        assert_eq!(
            post(edge.http, &event(&format!("k{i}")), &[], &body)
                .await
                .status,
            202
        );
        sent.push((event(&format!("k{i}")), body));
        let body = format!("blob body {i} {}", "y".repeat(i * 53)).into_bytes();
        assert_eq!(
            post(edge.http, &blob(&format!("k{i}")), &[], &body)
                .await
                .status,
            202
        );
        sent.push((blob(&format!("k{i}")), body));
    }
    drop(edge); // SIGKILL: no chance to flush anything
    let up = TestOrigin::start_on(addr).await;
    let edge = Edge::start(opts(dir.path(), &url, &url, &url, "")).await;
    wait_until("every acknowledged request", || {
        up.received().len() >= sent.len()
    })
    .await;
    let got = up.received();
    assert_eq!(got.len(), sent.len(), "each delivered once");
    for (target, body) in &sent {
        let r = got
            .iter()
            .find(|r| &r.target == target)
            .unwrap_or_else(|| panic!("{target} lost"));
        assert_eq!(&r.body, body, "{target} delivered exactly as sent");
    }
    for route in [EVENT, BLOB] {
        let order: Vec<&str> = got
            .iter()
            .filter(|r| r.target.starts_with(route))
            .map(|r| r.target.as_str())
            .collect();
        let expected: Vec<String> = (0..20).map(|i| format!("{route}&reqId=k{i}")).collect();
        assert_eq!(order, expected, "arrival order per route");
    }
    drop(edge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{}", dead_addr());
    let edge = Edge::start(opts(
        dir.path(),
        &url,
        &url,
        &url,
        "spool_max_bytes = 70000",
    ))
    .await;
    let mut accepted = 0;
    let refused = loop {
        let r = post(
            edge.http,
            &blob(&format!("f{accepted}")),
            &[],
            &[b'z'; 5000],
        )
        .await;
        if r.status != 202 {
            break r;
        }
        accepted += 1;
        assert!(accepted < 100);
    };
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("5"));
    assert!(accepted >= 5, "{accepted}");
    assert_eq!(
        edge.metric("cdn_edge_forwarded_total{result=\"refused\",route=\"logblob\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_413() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    for target in [event("big"), blob("big"), "/stats".to_string()] {
        assert_eq!(
            post(edge.http, &target, &[], &vec![b'b'; 65_537])
                .await
                .status,
            413,
            "{target}"
        );
    }
    assert_eq!(
        post(edge.http, &blob("ok"), &[], &vec![b'b'; 65_536])
            .await
            .status,
        202
    );
    assert_eq!(edge.request("GET", &event("g"), &[]).await.status, 405);
    assert!(up.received().iter().all(|r| !r.target.contains("big")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_answered_at_once_while_the_upstream_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_mode(Mode::Hang);
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    for _ in 0..50 {
        let started = Instant::now();
        let r = post(
            edge.http,
            "/stats",
            &[("Content-Type", "application/json")],
            b"{\"hover\":1}",
        )
        .await;
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"{\"status\":200}"[..])
        );
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_is_set_aside_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spool.redb"), vec![0x5Au8; 64 * 1024]).unwrap();
    let up = TestOrigin::start().await;
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    assert_eq!(edge.metric("cdn_edge_spool_corrupt_total").await, 1.0);
    assert_eq!(
        post(edge.http, &blob("after"), &[], b"still works")
            .await
            .status,
        202
    );
    wait_until("delivery", || {
        up.received().iter().any(|r| r.body == b"still works")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_retry_while_its_first_copy_is_spooled_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_response(&event("p1"), 200, &[], b"ok");
    up.set_response(&event("p2"), 200, &[], b"ok");
    up.set_mode(Mode::Status(503));
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    assert_eq!(
        post(edge.http, &event("p1"), &[], b"first").await.status,
        202
    );
    assert_eq!(
        post(edge.http, &event("p1"), &[], b"first").await.status,
        202,
        "still pending: 202"
    );
    // A new event queues behind the spooled one instead of overtaking it.
    assert_eq!(
        post(edge.http, &event("p2"), &[], b"second").await.status,
        202
    );
    up.set_mode(Mode::Normal);
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"delivered\",route=\"event\"}",
        2.0,
    )
    .await;
    assert_eq!(
        edge.metric("cdn_edge_forwarded_total{result=\"relayed\",route=\"event\"}")
            .await,
        0.0
    );
    assert_eq!(
        edge.metric("cdn_edge_forwarded_total{result=\"deduplicated\",route=\"event\"}")
            .await,
        1.0
    );
    let ok: Vec<String> = up.received().into_iter().map(|r| r.target).collect();
    let last_p1 = ok.iter().rposition(|t| *t == event("p1")).unwrap();
    let first_p2 = ok.iter().position(|t| *t == event("p2")).unwrap();
    assert!(last_p1 < first_p2, "p2 only after p1 was delivered: {ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_set_aside_and_429_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_response(&blob("rejected"), 400, &[], b"bad blob");
    up.set_response(&blob("throttled"), 429, &[], b"slow down");
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    assert_eq!(
        post(edge.http, &blob("rejected"), &[], b"x").await.status,
        202
    );
    assert_eq!(
        post(edge.http, &blob("throttled"), &[], b"y").await.status,
        202
    );
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"failed\",route=\"logblob\"}",
        1.0,
    )
    .await;
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"retried\",route=\"logblob\"}",
        1.0,
    )
    .await;
    up.set_response(&blob("throttled"), 200, &[], b"");
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"delivered\",route=\"logblob\"}",
        1.0,
    )
    .await;
    edge.wait_for_metric("cdn_edge_spool_entries{route=\"logblob\"}", 0.0)
        .await;
    let rejected = up
        .received()
        .iter()
        .filter(|r| r.target == blob("rejected"))
        .count();
    assert_eq!(rejected, 1, "a permanent failure is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_of_an_event_reach_the_upstream_once() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_response(&event("same"), 200, &[], b"once");
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    up.hold();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let addr = edge.http;
            tokio::spawn(async move { post(addr, &event("same"), &[], b"e").await })
        })
        .collect();
    wait_until("the first relay", || up.requests() == 1).await;
    up.release();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"once"[..]));
    }
    assert_eq!(
        up.requests(),
        1,
        "ten concurrent duplicates, one upstream request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_request_id_are_not_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_response(EVENT, 200, &[], b"ok");
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    for _ in 0..3 {
        assert_eq!(post(edge.http, EVENT, &[], b"same body").await.status, 200);
    }
    assert_eq!(up.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplication_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_response(&event("r"), 200, &[], b"stored answer");
    up.set_response(&blob("r"), 200, &[], b"");
    let mut graceful = opts(dir.path(), &up.url(), &up.url(), &up.url(), "");
    graceful.grace_period_secs = 1;
    let edge = Edge::start(graceful).await;
    assert_eq!(post(edge.http, &event("r"), &[], b"e").await.status, 200);
    assert_eq!(post(edge.http, &blob("r"), &[], b"b").await.status, 202);
    wait_until("blob delivery", || up.requests() == 2).await;
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"delivered\",route=\"logblob\"}",
        1.0,
    )
    .await;
    // A graceful stop flushes the spool, removals included (after kill -9 a delivered
    // record may be delivered once more: at-least-once).
    let log = edge.terminate().await;
    assert!(log.contains("spool flushed at shutdown"), "{log}");
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    let again = post(edge.http, &event("r"), &[], b"e").await;
    assert_eq!(
        (again.status, again.body.as_slice()),
        (200, &b"stored answer"[..])
    );
    assert_eq!(post(edge.http, &blob("r"), &[], b"b").await.status, 202);
    // Had the removal been lost, the blob would be back in the spool and delivered again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while edge
        .metric("cdn_edge_spool_entries{route=\"logblob\"}")
        .await
        > 0.0
    {
        assert!(Instant::now() < deadline, "spool never drained");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.requests(),
        2,
        "nothing forwarded twice across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_overflow_is_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_mode(Mode::Hang);
    // The stats worker is stuck on its first request for longer than the test takes,
    // however slowly the posts go.
    let edge = Edge::start(opts(
        dir.path(),
        &up.url(),
        &up.url(),
        &up.url(),
        "timeout_ms = 60000",
    ))
    .await;
    for _ in 0..1040 {
        assert_eq!(post(edge.http, "/stats", &[], b"{}").await.status, 200);
    }
    let dropped = edge.metric("cdn_edge_stats_dropped_total").await;
    assert!(
        (15.0..=16.0).contains(&dropped),
        "{dropped} dropped of 1040 with a queue of 1024"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_set_aside_and_later_events_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    // The upstream fails on this one body every time, and takes every other event.
    up.set_response(&event("poison"), 500, &[], b"cannot parse");
    for i in 0..3 {
        up.set_response(&event(&format!("after-{i}")), 200, &[], b"ok");
    }
    let edge = Edge::start(opts(
        dir.path(),
        &up.url(),
        &up.url(),
        &up.url(),
        "max_attempts = 3",
    ))
    .await;
    assert_eq!(
        post(edge.http, &event("poison"), &[], b"{\"bad\":")
            .await
            .status,
        202,
        "a 500 from the relay: spooled"
    );
    for i in 0..3 {
        let r = post(edge.http, &event(&format!("after-{i}")), &[], b"{}").await;
        assert_eq!(r.status, 202, "queued behind the spooled event");
    }
    edge.wait_for_metric(
        "cdn_edge_forward_dead_letters_total{reason=\"max_attempts\",route=\"event\"}",
        1.0,
    )
    .await;
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"delivered\",route=\"event\"}",
        3.0,
    )
    .await;
    wait_for_exactly(&edge, "cdn_edge_spool_entries{route=\"event\"}", 0.0).await;
    let got: Vec<String> = up.received().into_iter().map(|r| r.target).collect();
    let poison = got.iter().filter(|t| **t == event("poison")).count();
    assert_eq!(
        poison,
        1 + 3,
        "the relay, then max_attempts deliveries: {got:?}"
    );
    let after: Vec<&String> = got.iter().filter(|t| t.contains("after-")).collect();
    let expected: Vec<String> = (0..3).map(|i| event(&format!("after-{i}"))).collect();
    assert_eq!(
        after,
        expected.iter().collect::<Vec<_>>(),
        "in arrival order"
    );
    assert_eq!(
        edge.metric("cdn_edge_spool_kept_entries{kind=\"dead_letters\"}")
            .await,
        1.0,
        "kept as a dead letter"
    );
    wait_for_exactly(
        &edge,
        "cdn_edge_forward_oldest_age_seconds{route=\"event\"}",
        0.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_upstream_costs_no_record_however_often_it_is_tried() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    up.set_response(&blob("waits"), 200, &[], b"");
    up.set_mode(Mode::Status(503));
    let edge = Edge::start(opts(
        dir.path(),
        &up.url(),
        &up.url(),
        &up.url(),
        "max_attempts = 1",
    ))
    .await;
    assert_eq!(post(edge.http, &blob("waits"), &[], b"b").await.status, 202);
    // 503 says nothing about the record: it is not one of max_attempts.
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"retried\",route=\"logblob\"}",
        3.0,
    )
    .await;
    let age = edge
        .metric("cdn_edge_forward_oldest_age_seconds{route=\"logblob\"}")
        .await;
    assert!(age >= 0.2, "the waiting blob's age is exported: {age}");
    up.set_mode(Mode::Normal);
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"delivered\",route=\"logblob\"}",
        1.0,
    )
    .await;
    assert_eq!(
        edge.metric("cdn_edge_forwarded_total{result=\"failed\",route=\"logblob\"}")
            .await,
        0.0
    );
    wait_for_exactly(
        &edge,
        "cdn_edge_forward_oldest_age_seconds{route=\"logblob\"}",
        0.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_could_leave_the_route_are_refused_before_anything_is_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    let cases = [
        (
            "/msl/playapi/cadmium/event/../../admin/x?reqId=t1",
            "dot segment",
        ),
        (
            "/msl/playapi/cadmium/event/%2e%2e/%2e%2e/admin/x?reqId=t2",
            "encoded dot",
        ),
        (
            "/msl/playapi/cadmium/event/%2E%2E/admin?reqId=t3",
            "encoded dot",
        ),
        (
            "/msl/playapi/cadmium/event/..%2fadmin?reqId=t4",
            "encoded slash",
        ),
        (
            "/msl/playapi/cadmium/event/..%5cadmin?reqId=t5",
            "backslash",
        ),
        ("/log/cadmium/logblob/..\\..\\admin?reqId=t6", "backslash"),
        (
            "/log/cadmium/logblob/%252e%252e/admin?reqId=t7",
            "percent sign",
        ),
    ];
    for (target, reason) in cases {
        let r = post(edge.http, target, &[], b"{\"e\":1}").await;
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        assert!(
            r.text().starts_with("forwarded path refused: ") && r.text().contains(reason),
            "{target}: {}",
            r.text()
        );
    }
    let refused = edge
        .metric("cdn_edge_forwarded_total{result=\"bad_path\",route=\"event\"}")
        .await
        + edge
            .metric("cdn_edge_forwarded_total{result=\"bad_path\",route=\"logblob\"}")
            .await;
    assert_eq!(refused, cases.len() as f64);
    // A plain path still goes through, and nothing else reached the upstream.
    assert_eq!(post(edge.http, &blob("fine"), &[], b"ok").await.status, 202);
    wait_until("the plain blob", || up.requests() == 1).await;
    assert_eq!(up.received()[0].target, blob("fine"));
    assert_eq!(
        edge.metric("cdn_edge_spool_entries{route=\"event\"}").await,
        0.0,
        "nothing spooled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_id_from_another_client_is_another_request() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestOrigin::start().await;
    let edge = Edge::start(opts(dir.path(), &up.url(), &up.url(), &up.url(), "")).await;
    up.set_response(&event("shared"), 200, &[], b"answer for a");
    let a = post(edge.http, &event("shared"), &[], b"{\"client\":\"a\"}").await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"answer for a"[..]));
    // Another client picks the same reqId: its event is forwarded and gets its own answer.
    up.set_response(&event("shared"), 200, &[], b"answer for b");
    let b = post(edge.http, &event("shared"), &[], b"{\"client\":\"b\"}").await;
    assert_eq!((b.status, b.body.as_slice()), (200, &b"answer for b"[..]));
    // Client a's retry (the next reqAttempt, same body) is deduplicated.
    let retry = format!("{}&reqAttempt=2", event("shared"));
    up.set_response(&retry, 200, &[], b"answer for a retry");
    let again = post(edge.http, &retry, &[], b"{\"client\":\"a\"}").await;
    assert_eq!(
        (again.status, again.body.as_slice()),
        (200, &b"answer for a"[..])
    );
    let events: Vec<Vec<u8>> = up.received().into_iter().map(|r| r.body).collect();
    assert_eq!(
        events,
        [
            b"{\"client\":\"a\"}".to_vec(),
            b"{\"client\":\"b\"}".to_vec()
        ]
    );

    // Log blobs alike: both bodies delivered, a's retry not.
    up.set_response(&blob("shared"), 200, &[], b"");
    for body in [&b"blob a"[..], b"blob b", b"blob a"] {
        assert_eq!(
            post(edge.http, &blob("shared"), &[], body).await.status,
            202
        );
    }
    edge.wait_for_metric(
        "cdn_edge_forwarded_total{result=\"delivered\",route=\"logblob\"}",
        2.0,
    )
    .await;
    wait_for_exactly(&edge, "cdn_edge_spool_entries{route=\"logblob\"}", 0.0).await;
    let blobs: Vec<Vec<u8>> = up
        .received()
        .into_iter()
        .filter(|r| r.target == blob("shared"))
        .map(|r| r.body)
        .collect();
    assert_eq!(blobs, [b"blob a".to_vec(), b"blob b".to_vec()]);
    assert_eq!(
        edge.metric("cdn_edge_forwarded_total{result=\"deduplicated\",route=\"logblob\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_behind_an_upstream_that_refuses_one_request_in_four_drains_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let addr = dead_addr();
    let url = format!("http://{addr}");
    let edge = Edge::start(opts(dir.path(), &url, &url, &url, "")).await;
    const EVENTS: usize = 120;
    for i in 0..EVENTS {
        let r = post(edge.http, &event(&format!("f{i}")), &[], b"{}").await;
        assert_eq!(r.status, 202);
    }
    let up = TestOrigin::start_on(addr).await;
    up.set_mode(Mode::FailEvery(4));
    // The route's head waited out the backoff of the refused connections; the clock
    // starts with the first delivery.
    wait_until("a first delivery", || !up.received().is_empty()).await;
    let started = Instant::now();
    wait_until("every spooled event delivered", || {
        up.received().len() >= EVENTS
    })
    .await;
    // About 30 refusals, each holding up the whole route: at 200 ms a retry, as the
    // first retry once was, they alone would take 6 s.
    eprintln!("{EVENTS} events delivered in {:?}", started.elapsed());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "{EVENTS} events took {took:?} to deliver"
    );
    let order: Vec<String> = up.received().iter().map(|r| r.target.clone()).collect();
    let expected: Vec<String> = (0..EVENTS).map(|i| event(&format!("f{i}"))).collect();
    assert_eq!(order, expected, "in arrival order, each once");
}
