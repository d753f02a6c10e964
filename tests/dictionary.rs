//! Dictionary lookups (SPEC §2.4): normalised keys, TTLs, negative caching,
//! stale-if-error, coalescing, CORS and compression, end to end.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use support::edge::{Edge, EdgeOptions};
use support::origin::{dead_addr, Mode, TestOrigin};

const PATH: &str = "/base_dict_getHoverDict_8";
/// What the player sends for 어, and the canonical form the upstream is asked for.
const PLAYER_QUERY: &str = "form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n";
const CANONICAL: &str =
    "/base_dict_getHoverDict_8?form=%EC%96%B4&lemma=&pos=NOUN&pow=n&sl=ko&tl=en";
const BODY: &[u8] = br#"{"form":"\xec\x96\xb4","translations":["uh","er"]}"#;

fn dictionary_opts(upstream: &str, extra: &str) -> EdgeOptions {
    let mut o = EdgeOptions::new(vec![format!("http://{}", dead_addr())]);
    o.extra = format!(
        "[dictionary]\nupstream = \"{upstream}\"\nttl_secs = 3600\nnegative_ttl_secs = 60\nstale_if_error_secs = 3600\ntimeout_ms = 500\n{extra}\n[cors]\nallow_origins = [\"https://www.netflix.com\"]\n"
    );
    o
}

async fn setup() -> (TestOrigin, Edge) {
    let upstream = TestOrigin::start().await;
    upstream.set_response(
        CANONICAL,
        200,
        &[("Content-Type", "application/json")],
        BODY,
    );
    let edge = Edge::start(dictionary_opts(&upstream.url(), "")).await;
    (upstream, edge)
}

fn lookup(query: &str) -> String {
    format!("{PATH}?{query}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_follows_a_miss_without_upstream_requests() {
    let (upstream, edge) = setup().await;
    let first = edge.get(&lookup(PLAYER_QUERY), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body, BODY);
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("cache-status"), Some("cdn-edge; fwd=miss"));
    assert_eq!(
        upstream.log(),
        vec![format!("{CANONICAL} ")],
        "the upstream gets the canonical query"
    );
    for _ in 0..5 {
        let hit = edge.get(&lookup(PLAYER_QUERY), &[]).await;
        assert_eq!((hit.status, hit.body.as_slice()), (200, BODY));
        assert_eq!(hit.header("cache-status"), Some("cdn-edge; hit"));
        assert!(hit.header("age").unwrap().parse::<u64>().is_ok());
    }
    assert_eq!(upstream.requests(), 1);
    let head = edge.request("HEAD", &lookup(PLAYER_QUERY), &[]).await;
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(
        head.header("content-length"),
        Some(BODY.len().to_string().as_str())
    );
    assert_eq!(
        edge.metric("cdn_edge_dictionary_lookups_total{result=\"hit\"}")
            .await,
        6.0
    );
    assert_eq!(
        edge.metric("cdn_edge_dictionary_lookups_total{result=\"miss\"}")
            .await,
        1.0
    );
    assert_eq!(edge.metric("cdn_edge_dictionary_entries").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_order_and_unicode_form_do_not_split_the_key() {
    let (upstream, edge) = setup().await;
    for query in [
        PLAYER_QUERY,
        "pow=n&pos=NOUN&tl=en&sl=ko&lemma=&form=%EC%96%B4",
        "form=%e1%84%8b%e1%85%a5&lemma=&sl=ko&tl=en&pos=NOUN&pow=n", // NFD jamo
        "form=%EC%96%B4&lemma&sl=ko&tl=en&pos=NOUN&pow=n",
    ] {
        let r = edge.get(&lookup(query), &[]).await;
        assert_eq!((r.status, r.body.as_slice()), (200, BODY), "{query}");
    }
    assert_eq!(upstream.requests(), 1, "one entry: {:?}", upstream.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_parameter_splits_the_key() {
    let (upstream, edge) = setup().await;
    for query in [
        PLAYER_QUERY,
        "form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=VERB&pow=n",
        "form=%EC%96%B4&lemma=&sl=ja&tl=en&pos=NOUN&pow=n",
        "form=%EC%96%B4&lemma=&sl=ko&tl=fr&pos=NOUN&pow=n",
        "form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n&extra=1",
    ] {
        edge.get(&lookup(query), &[]).await;
    }
    assert_eq!(upstream.requests(), 5, "{:?}", upstream.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_encoding_is_400_and_never_reaches_the_upstream() {
    let (upstream, edge) = setup().await;
    for query in ["form=%ZZ", "form=%E", "form=%FF%FE&sl=ko", "form=%C3%28"] {
        let r = edge.get(&lookup(query), &[]).await;
        assert_eq!(r.status, 400, "{query}");
    }
    assert_eq!(
        edge.request("POST", &lookup(PLAYER_QUERY), &[("Content-Length", "0")])
            .await
            .status,
        405
    );
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_and_no_store_are_honoured() {
    let upstream = TestOrigin::start().await;
    let short = lookup("form=a");
    let never = lookup("form=b");
    upstream.set_response(
        &short,
        200,
        &[("Cache-Control", "public, max-age=1")],
        b"{\"a\":1}",
    );
    upstream.set_response(&never, 200, &[("Cache-Control", "no-store")], b"{\"b\":1}");
    let edge = Edge::start(dictionary_opts(&upstream.url(), "")).await;
    assert_eq!(
        edge.get(&short, &[]).await.header("cache-control"),
        Some("public, max-age=1")
    );
    assert_eq!(
        edge.get(&short, &[]).await.header("cache-status"),
        Some("cdn-edge; hit")
    );
    for _ in 0..3 {
        assert_eq!(
            edge.get(&never, &[]).await.header("cache-status"),
            Some("cdn-edge; fwd=miss")
        );
    }
    assert_eq!(
        upstream.requests(),
        4,
        "no-store: every lookup goes upstream"
    );
    // max-age=1 has run out after a little over a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refreshed = edge.get(&short, &[]).await;
    assert_eq!(
        refreshed.header("cache-status"),
        Some("cdn-edge; fwd=stale")
    );
    assert_eq!(upstream.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_is_cached_for_the_negative_ttl_and_other_errors_not_at_all() {
    let upstream = TestOrigin::start().await;
    let missing = lookup("form=zzz");
    let broken = lookup("form=err");
    upstream.set_response(
        &missing,
        404,
        &[("Content-Type", "application/json")],
        b"{\"error\":\"none\"}",
    );
    upstream.set_response(&broken, 400, &[], b"bad");
    let edge = Edge::start(dictionary_opts(&upstream.url(), "")).await;
    for _ in 0..3 {
        let r = edge.get(&missing, &[]).await;
        assert_eq!(
            (r.status, r.body.as_slice()),
            (404, &b"{\"error\":\"none\"}"[..])
        );
    }
    for _ in 0..3 {
        assert_eq!(edge.get(&broken, &[]).await.status, 400);
    }
    assert_eq!(
        upstream.requests(),
        4,
        "one 404 cached; three uncached 400s"
    );
    assert_eq!(
        edge.metric("cdn_edge_dictionary_lookups_total{result=\"negative_hit\"}")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_are_served_when_the_upstream_fails() {
    let upstream = TestOrigin::start().await;
    let [a, b, c] = ["form=a", "form=b", "form=c"].map(lookup);
    for t in [&a, &b, &c] {
        upstream.set_response(t, 200, &[("Cache-Control", "max-age=1")], b"{\"a\":1}");
    }
    let edge = Edge::start(dictionary_opts(&upstream.url(), "")).await;
    for t in [&a, &b, &c] {
        assert_eq!(edge.get(t, &[]).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    upstream.set_mode(Mode::Status(503));
    let stale = edge.get(&a, &[]).await;
    assert_eq!(
        (stale.status, stale.body.as_slice()),
        (200, &b"{\"a\":1}"[..]),
        "5xx: stale"
    );
    assert_eq!(
        stale.header("cache-status"),
        Some("cdn-edge; hit; fwd=stale; detail=stale-if-error")
    );
    assert!(stale.header("age").unwrap().parse::<u64>().unwrap() >= 1);
    upstream.set_mode(Mode::Hang);
    assert_eq!(edge.get(&b, &[]).await.status, 200, "timeout: stale");
    let asked = upstream.requests();
    upstream.stop();
    assert_eq!(edge.get(&c, &[]).await.status, 200, "unreachable: stale");
    assert_eq!(
        edge.metric("cdn_edge_dictionary_lookups_total{result=\"stale\"}")
            .await,
        3.0
    );
    // After a failed refresh the stale copy is kept a while without asking again.
    assert_eq!(edge.get(&a, &[]).await.status, 200);
    assert_eq!(upstream.requests(), asked);
    assert_eq!(asked, 5, "three fills, the 503 and the hanging request");
    // Nothing cached and the upstream gone: 502.
    assert_eq!(edge.get(&lookup("form=new"), &[]).await.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_upstream_is_504() {
    let upstream = TestOrigin::start().await;
    upstream.set_mode(Mode::Hang);
    let edge = Edge::start(dictionary_opts(&upstream.url(), "")).await;
    let started = Instant::now();
    assert_eq!(edge.get(&lookup("form=a"), &[]).await.status, 504);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_lookups_make_one_upstream_request() {
    let (upstream, edge) = setup().await;
    const N: usize = 20;
    upstream.hold();
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let addr = edge.http;
            tokio::spawn(
                async move { support::client::get(addr, &lookup(PLAYER_QUERY), &[]).await },
            )
        })
        .collect();
    edge.wait_for_metric("cdn_edge_dictionary_pending", N as f64)
        .await;
    upstream.release();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, BODY));
    }
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_for_allowed_origins_only() {
    let (upstream, edge) = setup().await;
    let allowed = edge
        .get(
            &lookup(PLAYER_QUERY),
            &[("Origin", "https://www.netflix.com")],
        )
        .await;
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://www.netflix.com")
    );
    assert!(allowed.header("vary").unwrap().contains("Origin"));
    assert!(allowed.header("access-control-allow-credentials").is_none());
    for other in [
        "https://evil.example",
        "null",
        "https://www.netflix.com.evil.example",
    ] {
        let r = edge.get(&lookup(PLAYER_QUERY), &[("Origin", other)]).await;
        assert_eq!(r.status, 200);
        assert!(r.header("access-control-allow-origin").is_none(), "{other}");
    }
    // A key never looked up: a preflight must not cause an upstream request.
    let pre = edge
        .request(
            "OPTIONS",
            &lookup("form=cold&sl=ko&tl=en"),
            &[
                ("Origin", "https://www.netflix.com"),
                ("Access-Control-Request-Method", "GET"),
                ("Access-Control-Request-Headers", "x-player"),
            ],
        )
        .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://www.netflix.com")
    );
    assert!(pre
        .header("access-control-allow-methods")
        .unwrap()
        .contains("GET"));
    assert_eq!(pre.header("access-control-allow-headers"), Some("x-player"));
    let refused = edge
        .request(
            "OPTIONS",
            &lookup(PLAYER_QUERY),
            &[
                ("Origin", "https://evil.example"),
                ("Access-Control-Request-Method", "GET"),
            ],
        )
        .await;
    assert_eq!(refused.status, 403);
    assert!(refused.header("access-control-allow-origin").is_none());
    assert_eq!(
        upstream.requests(),
        1,
        "preflights never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn larger_bodies_are_compressed_as_the_client_prefers() {
    let upstream = TestOrigin::start().await;
    let big: Vec<u8> = format!(
        "{{\"senses\":[{}]}}",
        vec!["\"a fairly long gloss text\""; 80].join(",")
    )
    .into_bytes();
    let target = lookup("form=big");
    upstream.set_response(&target, 200, &[("Content-Type", "application/json")], &big);
    upstream.set_response(&lookup("form=small"), 200, &[], BODY);
    let edge = Edge::start(dictionary_opts(&upstream.url(), "")).await;
    for (accept, coding) in [
        ("gzip", Some("gzip")),
        ("br", Some("br")),
        ("zstd", Some("zstd")),
        ("gzip, br;q=0.5", Some("gzip")),
        ("identity", None),
    ] {
        let r = edge.get(&target, &[("Accept-Encoding", accept)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), coding, "{accept}");
        let plain = match coding {
            Some("gzip") => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&r.body[..])
                    .read_to_end(&mut out)
                    .unwrap();
                out
            }
            Some("br") => {
                let mut out = Vec::new();
                brotli::Decompressor::new(&r.body[..], 4096)
                    .read_to_end(&mut out)
                    .unwrap();
                out
            }
            Some("zstd") => zstd::decode_all(&r.body[..]).unwrap(),
            _ => r.body.clone(),
        };
        assert_eq!(plain, big, "{accept}");
        if coding.is_some() {
            assert!(r.body.len() < big.len());
        }
    }
    let small = edge
        .get(&lookup("form=small"), &[("Accept-Encoding", "gzip, br")])
        .await;
    assert_eq!(
        small.header("content-encoding"),
        None,
        "small bodies are sent as they are"
    );
    assert_eq!(
        upstream.requests(),
        2,
        "one upstream request per entry, whatever the encoding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = TestOrigin::start().await;
    for i in 0..10 {
        upstream.set_response(&lookup(&format!("form=w{i}")), 200, &[], BODY);
    }
    let edge = Edge::start(dictionary_opts(&upstream.url(), "")).await;
    for i in 0..10 {
        assert_eq!(
            edge.get(&lookup(&format!("form=w{i}")), &[]).await.status,
            200
        );
    }
    assert_eq!(upstream.requests(), 10);
    assert_eq!(
        upstream.connections(),
        1,
        "ten sequential misses over one pooled connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_upstream_answers() {
    let upstream = TestOrigin::start().await;
    upstream.set_response(
        &lookup("form=enc"),
        200,
        &[("Content-Encoding", "gzip")],
        b"\x1f\x8b...",
    );
    upstream.set_response(
        &lookup("form=two"),
        200,
        &[
            ("Cache-Control", "max-age=60"),
            ("Cache-Control", "private"),
        ],
        b"{}",
    );
    upstream.set_response(
        &lookup("form=moved"),
        302,
        &[("Location", "/elsewhere")],
        b"",
    );
    upstream.set_response(
        &lookup("form=hint"),
        200,
        &[("Cache-Control", "max-age=99999999999999999999")],
        BODY,
    );
    let edge = Edge::start(dictionary_opts(&upstream.url(), "")).await;
    assert_eq!(
        edge.get(&lookup("form=enc"), &[]).await.status,
        502,
        "an encoded answer to identity is refused"
    );
    for _ in 0..2 {
        assert_eq!(
            edge.get(&lookup("form=two"), &[])
                .await
                .header("cache-status"),
            Some("cdn-edge; fwd=miss")
        );
    }
    assert_eq!(
        upstream.requests(),
        3,
        "private on a second Cache-Control line is honoured"
    );
    assert_eq!(edge.get(&lookup("form=moved"), &[]).await.status, 502);
    upstream.set_mode(Mode::EarlyHints);
    let r = edge.get(&lookup("form=hint"), &[]).await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, BODY),
        "a 103 before the answer is skipped"
    );
    assert_eq!(
        edge.get(&lookup("form=hint"), &[])
            .await
            .header("cache-status"),
        Some("cdn-edge; hit"),
        "a huge max-age is clamped, not a crash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_may_not_be_cached_drops_the_old_answer() {
    let upstream = TestOrigin::start().await;
    let target = lookup("form=a");
    upstream.set_response(
        &target,
        200,
        &[("Cache-Control", "max-age=1")],
        b"{\"v\":1}",
    );
    let edge = Edge::start(dictionary_opts(&upstream.url(), "")).await;
    assert_eq!(edge.get(&target, &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    upstream.set_response(&target, 200, &[("Cache-Control", "no-store")], b"{\"v\":2}");
    assert_eq!(edge.get(&target, &[]).await.body, b"{\"v\":2}");
    upstream.set_mode(Mode::Status(503));
    let r = edge.get(&target, &[]).await;
    assert_eq!(
        r.status, 503,
        "no stale copy of an answer the upstream said not to keep"
    );
}

/// An upstream that answers the first request on each connection with a small JSON 200
/// and keeps the connection, and the second with a malformed status line; it lists
/// every request target it reads.
async fn malformed_on_reuse() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for n in 0..2 {
                    let end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end;
                        }
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let target = head.split(' ').nth(1).unwrap_or_default().to_string();
                    log.lock().unwrap().push(target);
                    let answer: &[u8] = if n == 0 {
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                    } else {
                        b"HTTP/1.1 2x0 Broken\r\n\r\n"
                    };
                    if sock.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_answer_on_a_pooled_connection_is_not_asked_again() {
    let (url, seen) = malformed_on_reuse().await;
    let edge = Edge::start(dictionary_opts(&url, "")).await;
    let first = edge.get(&lookup("form=a&sl=ko&tl=en"), &[]).await;
    assert_eq!((first.status, first.body.as_slice()), (200, &b"{}"[..]));
    // Asked on the pooled connection, which answers garbage: a 502, and the upstream
    // is not asked a second time on a new connection (it would answer 200 there).
    let second = edge.get(&lookup("form=b&sl=ko&tl=en"), &[]).await;
    assert_eq!(second.status, 502, "{}", second.text());
    let asked_b = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.contains("form=b"))
        .count();
    assert_eq!(
        asked_b,
        1,
        "requests for the second key: {:?}",
        seen.lock().unwrap()
    );
}
