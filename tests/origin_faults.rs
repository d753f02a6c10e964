//! The origin fault matrix (docs/reliability.md, "Origin faults"): for each way an
//! origin can answer a slice request wrongly, what the client gets, what is cached, and
//! the metric that counts it. Every body is compared byte for byte with the origin's
//! object; a wrong byte is never presented as complete.
//!
//! Each case runs the same script against one object of 5 slices with the fault on
//! slice 1 (`tests/support/faults.rs` writes the faulty answers):
//! 1. slice 0 is cached, leaving one idle pooled connection to the origin;
//! 2. a range over slices 0 and 1: the header goes out from the cached slice 0, so a
//!    fault on slice 1 (asked on the pooled connection) cuts the body short;
//! 3. a range inside slice 1: the fault now hits before any header (on a new
//!    connection), so it is a clean 502 or 504;
//! 4. the origin is healed: the whole object is served byte-exact, costing exactly the
//!    slices not cached, then served again from cache alone.
//!
//! Then: another ETag or total size in one answer (taken for a new version of the
//! object until the next answer), a long Content-Type, an answer sent ahead of its
//! request, and every failure with a second origin to fail over to.
//!
//! Origin 404 and 410 are in `missing_objects.rs`; 5xx, 4xx, `Content-Encoding` and a
//! hanging origin in `origin_failures.rs`.

mod support;

use support::edge::{signed, Edge, EdgeOptions};
use support::faults::{Fault, FaultRule};
use support::object_bytes;
use support::origin::TestOrigin;

const SLICE: u64 = 64 * 1024;
/// Five slices, the last one short.
const SIZE: usize = 300_000;
/// First byte of slice 1, where the faults are injected.
const S1: u64 = SLICE;
/// `origin.timeout_ms` where an answer drips: short, so the case takes little time.
const DRIP_TIMEOUT_MS: u64 = 500;
/// `origin.timeout_ms` of the failover test, drip included: long enough for a sound
/// origin on a busy machine, short enough for a test.
const FAILOVER_TIMEOUT_MS: u64 = 1000;

/// What a fault on the first slice of a response gives the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// A clean error status before any header; a cut body after the header.
    Error(u16),
    /// The right bytes, complete.
    Bytes,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    fault: Fault,
    client: Client,
    /// `cdn_edge_origin_requests_total{result=...}` that counts the faulty fetch.
    result: &'static str,
    /// Origin requests one faulty fetch costs on a pooled connection.
    pooled_requests: usize,
}

impl Case {
    /// A valid answer, however odd: served and cached.
    const fn served(fault: Fault) -> Self {
        Self {
            fault,
            client: Client::Bytes,
            result: "ok",
            pooled_requests: 1,
        }
    }

    const fn error(fault: Fault, status: u16, result: &'static str) -> Self {
        Self {
            fault,
            client: Client::Error(status),
            result,
            pooled_requests: 1,
        }
    }
}

/// Every fault that is a failure of the origin (not an answer about the object): what
/// the client gets, and the result it is counted under. With a second origin, the
/// client never sees it.
const FAILURES: [Case; 15] = [
    Case::error(Fault::ResetMidBody, 502, "connect_error"),
    Case::error(Fault::ShortBody, 502, "connect_error"),
    Case::error(Fault::RangeOtherStart, 502, "invalid_response"),
    Case::error(Fault::RangeOtherEnd, 502, "invalid_response"),
    Case::error(Fault::RangeOtherTotal, 502, "invalid_response"),
    Case::error(Fault::WholeObject, 502, "bad_status"),
    Case::error(Fault::Drip, 504, "timeout"),
    Case::error(Fault::OversizedHeader, 502, "invalid_response"),
    Case::error(Fault::TooManyHeaders, 502, "invalid_response"),
    Case::error(Fault::BadStatusLine, 502, "invalid_response"),
    Case::error(Fault::BadContentLength, 502, "invalid_response"),
    Case::error(Fault::ConflictingContentLength, 502, "invalid_response"),
    Case::error(Fault::TruncatedChunked, 502, "connect_error"),
    // A pooled connection closed before any answer is retried once on a new one.
    Case {
        pooled_requests: 2,
        ..Case::error(Fault::CloseBeforeAnswer, 502, "connect_error")
    },
    Case::error(Fault::EmptyBody, 502, "invalid_response"),
];

/// The case of a failure in [`FAILURES`].
fn failure(fault: Fault) -> Case {
    *FAILURES
        .iter()
        .find(|c| c.fault == fault)
        .expect("a fault listed in FAILURES")
}

fn edge_options(origins: Vec<String>, timeout_ms: u64) -> EdgeOptions {
    let mut opts = EdgeOptions::new(origins);
    opts.origin_timeout_ms = timeout_ms;
    opts
}

/// The edge's default `origin.timeout_ms` in tests.
fn default_timeout() -> u64 {
    EdgeOptions::new(Vec::new()).origin_timeout_ms
}

/// Serves `bytes` as object (o, 1) with ETag `"a"` on each origin.
fn serve(o: &str, bytes: &[u8], origins: &[&TestOrigin]) {
    for origin in origins {
        origin.add_object_with_headers(o, "1", bytes.to_vec(), "video/mp4", &[("ETag", "\"a\"")]);
    }
}

/// The script in the module docs.
async fn run(case: Case) {
    let Case {
        fault,
        client,
        result,
        pooled_requests,
    } = case;
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(fault as u64 + 100, SIZE);
    serve("m", &bytes, &[&origin]);
    let timeout = if fault == Fault::Drip {
        DRIP_TIMEOUT_MS
    } else {
        default_timeout()
    };
    let edge = Edge::start(edge_options(vec![origin.url()], timeout)).await;
    let q = signed("m", "1");
    let result_series = format!("cdn_edge_origin_requests_total{{result=\"{result}\"}}");
    let slice1 = || origin.requests_for("m", "1", S1);

    // 1. Slice 0 and the object's metadata cached; one idle pooled connection.
    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert!(r.status == 200 && r.body == bytes[..100], "{fault:?}");
    origin.inject(FaultRule::on("m", "1", fault).from(S1));

    // 2. The header is out before slice 1 is fetched: a failure cuts the body short.
    let r = edge.get(&format!("/range/0-100000?{q}"), &[]).await;
    assert_eq!(r.status, 200, "{fault:?}");
    assert_eq!(r.header("content-length"), Some("100001"), "{fault:?}");
    match client {
        Client::Bytes => assert!(r.complete && r.body == bytes[..=100_000], "{fault:?}"),
        Client::Error(_) => assert!(
            !r.complete && r.body.len() < 100_001 && bytes.starts_with(&r.body),
            "{fault:?}: {} bytes, complete: {}",
            r.body.len(),
            r.complete
        ),
    }
    let aborts = if client == Client::Bytes { 0.0 } else { 1.0 };
    assert_eq!(
        edge.metric("cdn_edge_stream_aborts_total").await,
        aborts,
        "{fault:?}"
    );
    assert_eq!(slice1(), pooled_requests, "{fault:?}: {:?}", origin.log());

    // 3. A range inside slice 1: the fault hits before the header.
    let r = edge.get(&format!("/range/70000-80000?{q}"), &[]).await;
    match client {
        Client::Bytes => {
            assert!(r.status == 200 && r.complete && r.body == bytes[70_000..=80_000]);
            assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"), "{fault:?}");
            assert_eq!(slice1(), pooled_requests, "{fault:?}: cached");
        }
        Client::Error(status) => {
            assert_eq!(r.status, status, "{fault:?}: {}", r.text());
            assert_eq!(r.text().lines().count(), 1, "{fault:?}: a one-line reason");
            assert_eq!(
                slice1(),
                pooled_requests + 1,
                "{fault:?}: {:?}",
                origin.log()
            );
            assert_eq!(edge.metric(&result_series).await, 2.0, "{fault:?}");
        }
    }

    // 4. Healed: nothing of the fault was cached.
    origin.heal();
    let before = origin.requests();
    let r = edge.get(&format!("/range/0-{}?{q}", SIZE - 1), &[]).await;
    assert!(
        r.status == 200 && r.complete && r.body == bytes,
        "{fault:?}: the whole object, byte-exact"
    );
    // Error: slices 1 to 4; served: slices 2 to 4 (step 2 cached slice 1).
    let fetched = if client == Client::Bytes { 3 } else { 4 };
    assert_eq!(
        origin.requests() - before,
        fetched,
        "{fault:?}: {:?}",
        origin.log()
    );
    let r = edge.get(&format!("/range/0-{}?{q}", SIZE - 1), &[]).await;
    assert!(r.complete && r.body == bytes, "{fault:?}");
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"), "{fault:?}");
    assert_eq!(origin.requests() - before, fetched, "{fault:?}");
    let ok = edge
        .metric("cdn_edge_origin_requests_total{result=\"ok\"}")
        .await;
    let ok_before_heal = if client == Client::Bytes { 2.0 } else { 1.0 };
    assert_eq!(ok, ok_before_heal + fetched as f64, "{fault:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_body_is_502_or_a_cut_body() {
    run(failure(Fault::ResetMidBody)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_short_of_its_content_length_is_502_or_a_cut_body() {
    run(failure(Fault::ShortBody)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_range_with_another_start_is_502() {
    run(failure(Fault::RangeOtherStart)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_range_with_another_end_is_502() {
    run(failure(Fault::RangeOtherEnd)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_range_with_a_total_inside_the_range_is_502() {
    run(failure(Fault::RangeOtherTotal)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_with_the_whole_object_is_502() {
    run(failure(Fault::WholeObject)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_dripping_past_the_timeout_is_504() {
    run(failure(Fault::Drip)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_over_1_mib_is_502() {
    run(failure(Fault::OversizedHeader)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_header_lines_are_502() {
    run(failure(Fault::TooManyHeaders)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_status_line_is_502() {
    run(failure(Fault::BadStatusLine)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_that_is_not_a_number_is_502() {
    run(failure(Fault::BadContentLength)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_502() {
    run(failure(Fault::ConflictingContentLength)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_chunked_answer_is_served_and_cached() {
    run(Case::served(Fault::Chunked)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_repeated_with_one_value_is_served() {
    run(Case::served(Fault::RepeatedContentLength)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_103_before_the_206_is_skipped() {
    run(Case::served(Fault::EarlyHints)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_chunked_answer_is_502_or_a_cut_body() {
    run(failure(Fault::TruncatedChunked)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_before_any_byte_is_502_after_one_retry_of_a_pooled_connection() {
    run(failure(Fault::CloseBeforeAnswer)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_206_with_an_empty_body_is_502() {
    run(failure(Fault::EmptyBody)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_type_over_255_bytes_is_taken_as_unknown() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(600, SIZE);
    serve("m", &bytes, &[&origin]);
    origin.inject(FaultRule::on("m", "1", Fault::LongContentType));
    let edge = Edge::start(edge_options(vec![origin.url()], default_timeout())).await;
    let q = signed("m", "1");
    // The type is kept with the object's metadata, for every response: a long one
    // would cost memory per object, and the disk tier keeps none over 255 bytes.
    for target in [format!("/range/0-99?{q}"), format!("/?{q}")] {
        let r = edge.get(&target, &[]).await;
        assert_eq!(r.status, 200, "{target}");
        assert_eq!(
            r.header("content-type"),
            Some("application/octet-stream"),
            "{target}"
        );
        assert!(r.complete && bytes.starts_with(&r.body), "{target}");
    }
    assert_eq!(origin.requests(), 5, "{:?}", origin.log());
    assert_eq!(
        edge.metric("cdn_edge_origin_requests_total{result=\"ok\"}")
            .await,
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_sent_ahead_of_its_request_is_never_taken() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(700, SIZE);
    serve("m", &bytes, &[&origin]);
    let edge = Edge::start(edge_options(vec![origin.url()], default_timeout())).await;
    let q = signed("m", "1");
    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert!(r.status == 200 && r.body == bytes[..100]);
    // Slice 1's answer brings a zero-filled "answer" for slice 2 on its connection.
    origin.inject(FaultRule::on("m", "1", Fault::AnswerAhead).from(S1));
    let r = edge.get(&format!("/range/0-140000?{q}"), &[]).await;
    assert!(
        r.status == 200 && r.complete && r.body == bytes[..=140_000],
        "slice 2 is the origin's, not the bytes sent ahead"
    );
    assert_eq!(
        origin.requests_for("m", "1", 2 * SLICE),
        1,
        "{:?}",
        origin.log()
    );
    assert_eq!(origin.requests(), 3);
}

/// Another ETag or total size in one answer for slice 1 (a glitch): the edge takes it
/// for a new version of the object, as it would an object replaced in place, until the
/// next answer says otherwise.
async fn metadata_glitch(fault: Fault, seed: u64) -> (TestOrigin, Edge, Vec<u8>, String) {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(seed, SIZE);
    serve("m", &bytes, &[&origin]);
    let edge = Edge::start(edge_options(vec![origin.url()], default_timeout())).await;
    let q = signed("m", "1");
    let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
    assert!(r.status == 200 && r.body == bytes[..100], "{fault:?}");
    origin.inject(FaultRule::on("m", "1", fault).from(S1).times(1));
    (origin, edge, bytes, q)
}

async fn replaced(edge: &Edge) -> f64 {
    edge.metric("cdn_edge_cache_metadata_checks_total{result=\"replaced\"}")
        .await
}

/// Mid-response, the glitch cuts the body; the first request after it is served whole.
async fn metadata_glitch_mid_response(fault: Fault) {
    let (origin, edge, bytes, q) = metadata_glitch(fault, fault as u64 + 200).await;
    let r = edge.get(&format!("/range/0-100000?{q}"), &[]).await;
    assert!(
        r.status == 200 && !r.complete && bytes.starts_with(&r.body),
        "{fault:?}: one response never mixes two versions"
    );
    assert_eq!(edge.metric("cdn_edge_stream_aborts_total").await, 1.0);
    assert_eq!(replaced(&edge).await, 1.0, "{fault:?}");

    // The glitch's metadata is contradicted by slice 0, before any header: the
    // response starts over under the origin's answer, and slice 0 is asked twice.
    let before = origin.requests();
    let whole = format!("/range/0-{}?{q}", SIZE - 1);
    let r = edge.get(&whole, &[]).await;
    assert!(
        r.status == 200 && r.complete && r.body == bytes,
        "{fault:?}: {} {}",
        r.status,
        r.text().chars().take(80).collect::<String>()
    );
    assert_eq!(replaced(&edge).await, 2.0, "{fault:?}");
    assert_eq!(edge.metric("cdn_edge_cache_stale_slices_total").await, 1.0);
    assert_eq!(
        origin.requests() - before,
        6,
        "{fault:?}: {:?}",
        origin.log()
    );
    assert_eq!(origin.requests_for("m", "1", 0), 3, "{fault:?}");
    let r = edge.get(&whole, &[]).await;
    assert!(r.complete && r.body == bytes);
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"), "{fault:?}");
    assert_eq!(origin.requests() - before, 6, "{fault:?}");
}

/// Before the header, the glitch is a clean 502 (the response starts over once, and the
/// origin then contradicts the glitch); the next request is served.
async fn metadata_glitch_before_the_header(fault: Fault) {
    let (origin, edge, bytes, q) = metadata_glitch(fault, fault as u64 + 300).await;
    let target = format!("/range/70000-80000?{q}");
    let r = edge.get(&target, &[]).await;
    assert_eq!(r.status, 502, "{fault:?}: {}", r.text());
    assert_eq!(replaced(&edge).await, 2.0, "{fault:?}");
    assert_eq!(origin.requests_for("m", "1", S1), 2, "{fault:?}");
    let r = edge.get(&target, &[]).await;
    assert!(
        r.status == 200 && r.body == bytes[70_000..=80_000],
        "{fault:?}"
    );
    assert_eq!(origin.requests_for("m", "1", S1), 3, "{fault:?}");
    assert_eq!(replaced(&edge).await, 2.0, "{fault:?}");
    assert_eq!(
        edge.metric("cdn_edge_origin_requests_total{result=\"ok\"}")
            .await,
        4.0,
        "{fault:?}: valid answers, refused by the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_etag_once_mid_response_cuts_it_and_the_next_is_served() {
    metadata_glitch_mid_response(Fault::OtherEtag).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_etag_once_before_the_header_is_one_502() {
    metadata_glitch_before_the_header(Fault::OtherEtag).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_size_once_mid_response_cuts_it_and_the_next_is_served() {
    metadata_glitch_mid_response(Fault::OtherSize).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_size_once_before_the_header_is_one_502() {
    metadata_glitch_before_the_header(Fault::OtherSize).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_first_origin_fails_over_to_the_second() {
    let first = TestOrigin::start().await;
    let second = TestOrigin::start().await;
    let origins = vec![first.url(), second.url()];
    let edge = Edge::start(edge_options(origins, FAILOVER_TIMEOUT_MS)).await;
    for (i, case) in FAILURES.iter().enumerate() {
        let fault = case.fault;
        let o = format!("f{i}");
        let bytes = object_bytes(400 + i as u64, SIZE);
        serve(&o, &bytes, &[&first, &second]);
        let q = signed(&o, "1");
        let result_series = format!(
            "cdn_edge_origin_requests_total{{result=\"{}\"}}",
            case.result
        );
        let results = edge.metric(&result_series).await;
        // Slice 0 from the first origin, leaving a pooled connection to it.
        let r = edge.get(&format!("/range/0-99?{q}"), &[]).await;
        assert!(r.status == 200 && r.body == bytes[..100], "{fault:?}");
        first.inject(FaultRule::on(&o, "1", fault).from(S1));
        first.inject(FaultRule::on(&o, "1", fault).from(2 * SLICE));

        // Mid-response: slice 1 fails on the first origin, the second serves it.
        let r = edge.get(&format!("/range/0-100000?{q}"), &[]).await;
        assert!(
            r.status == 200 && r.complete && r.body == bytes[..=100_000],
            "{fault:?}"
        );
        let asked = |origin: &TestOrigin, start| origin.requests_for(&o, "1", start);
        assert_eq!(
            (asked(&first, S1), asked(&second, S1)),
            (case.pooled_requests, 1),
            "{fault:?}"
        );

        // Before the header: slice 2, after slice 3 left a pooled connection again.
        let r = edge.get(&format!("/range/200000-200010?{q}"), &[]).await;
        assert_eq!(r.status, 200, "{fault:?}");
        let r = edge.get(&format!("/range/140000-150000?{q}"), &[]).await;
        assert!(
            r.status == 200 && r.body == bytes[140_000..=150_000],
            "{fault:?}: {}",
            r.status
        );
        assert_eq!(
            (asked(&first, 2 * SLICE), asked(&second, 2 * SLICE)),
            (case.pooled_requests, 1),
            "{fault:?}"
        );
        assert_eq!(
            second.requests(),
            2 * (i as u64 + 1),
            "only the faulty slices"
        );
        assert_eq!(
            edge.metric(&result_series).await - results,
            2.0,
            "{fault:?}"
        );
        assert_eq!(
            edge.metric("cdn_edge_origin_failovers_total").await,
            2.0 * (i + 1) as f64,
            "{fault:?}"
        );
    }
    assert_eq!(edge.metric("cdn_edge_stream_aborts_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_then_a_404_from_the_second_origin_is_a_remembered_404() {
    let first = TestOrigin::start().await;
    let second = TestOrigin::start().await;
    // Only the first origin has the object, and it fails: the second says it does not
    // exist, which is final (origins are replicas) and remembered.
    serve("m", &object_bytes(500, SIZE), &[&first]);
    first.inject(FaultRule::on("m", "1", Fault::ResetMidBody));
    let edge = Edge::start(edge_options(
        vec![first.url(), second.url()],
        default_timeout(),
    ))
    .await;
    let target = format!("/range/0-99?{}", signed("m", "1"));
    let r = edge.get(&target, &[]).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.header("cache-status"), Some("cdn-edge; fwd=miss"));
    let r = edge.get(&target, &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
    assert_eq!((first.requests(), second.requests()), (1, 1));
    for (result, n) in [("connect_error", 1.0), ("not_found", 1.0)] {
        let series = format!("cdn_edge_origin_requests_total{{result=\"{result}\"}}");
        assert_eq!(edge.metric(&series).await, n, "{result}");
    }
    assert_eq!(edge.metric("cdn_edge_cache_negative_hits_total").await, 1.0);
}
