//! Crash loops: load with events, log blobs and cold slice fills in flight, SIGKILL at a
//! random moment, restart on the same spool and disk tier; many times over. At the end,
//! every request the edge acknowledged reached the upstream, none twice within one run
//! of the process, and the disk tier serves only the origin's bytes.
//!
//! The normal suite runs a few cycles; `bench/crash-loop.sh` runs the long loop
//! (`crash_loop_long`, ignored here) with `CRASH_CYCLES` (default 50) and `CRASH_SEED`.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use support::client::{try_request, Response};
use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::{Mode, TestOrigin};

const EVENT: &str = "/msl/playapi/cadmium/event/1?reqAttempt=1&reqName=events/pause";
const BLOB: &str = "/log/cadmium/logblob/1?reqAttempt=1";
const SLICE: u64 = 64 * 1024;
/// Each cycle has an object of its own, cold when the cycle starts: 33 slices.
const OBJECT_BYTES: usize = 2 * 1024 * 1024 + 12_345;
/// The origin's answers are paced: a slice fill takes about 30 ms.
const ORIGIN_BYTES_PER_SEC: u64 = 2 << 20;
/// The sink refuses every n-th request with 503, which sends events to the spool.
const SINK_FAILS_EVERY: u64 = 4;
const EVENT_WORKERS: usize = 3;
const BLOB_WORKERS: usize = 2;
const RANGE_WORKERS: usize = 3;

#[derive(Debug, Clone, Copy)]
struct Plan {
    cycles: usize,
    seed: u64,
    /// The longest a cycle's load runs before the kill, in milliseconds.
    max_load_ms: u64,
}

/// What the clients sent and what they were told.
#[derive(Default)]
struct Ledger {
    /// Target → body of every request answered 2xx.
    acked: HashMap<String, Vec<u8>>,
    /// Requests without a 2xx answer yet, retried (same target and body) as a player
    /// retries.
    pending: Vec<(String, Vec<u8>)>,
    /// Acknowledged while the crash cycles ran (the rest in the final retries).
    acked_in_cycles: u64,
    /// 503 answers during the cycles: the spool is repaired after each crash.
    refused_while_opening: u64,
    /// What the last request without a 2xx got.
    last_refusal: String,
    /// Answers that are neither 2xx, nor 503 (spool not open yet), nor a cut connection.
    unexpected: Vec<String>,
    ranges_whole: u64,
    ranges_cut: u64,
    ranges_failed: u64,
    /// Statuses of range answers other than 200, with their counts.
    range_errors: std::collections::BTreeMap<u16, u64>,
    /// Range answers whose bytes differ from the origin's: must stay empty.
    wrong_bytes: Vec<String>,
}

struct Shared {
    ledger: Mutex<Ledger>,
    stop: AtomicBool,
    next_id: AtomicU64,
}

struct Report {
    cycles: usize,
    seed: u64,
    events_acked: usize,
    blobs_acked: usize,
    acked_in_cycles: u64,
    refused_while_opening: u64,
    delivered_once: usize,
    /// Deliveries of a request again after a restart (at-least-once across a crash).
    redelivered_after_crash: usize,
    ranges_whole: u64,
    ranges_cut: u64,
    ranges_failed: u64,
    range_errors: std::collections::BTreeMap<u16, u64>,
    disk_slices: usize,
    disk_files: usize,
    disk_served: usize,
    corrupt_files: f64,
    elapsed: Duration,
}

fn object_of(cycle: usize) -> (String, Vec<u8>) {
    (
        format!("c{cycle}"),
        object_bytes(1_000 + cycle as u64, OBJECT_BYTES),
    )
}

fn options(origin: &TestOrigin, sink: &TestOrigin, spool: &Path, disk: &Path) -> EdgeOptions {
    let mut o = EdgeOptions::new(vec![origin.url()]);
    o.slice_bytes = SLICE;
    o.disk = Some((disk.to_path_buf(), 1 << 30));
    o.meta_ttl_secs = Some(3600);
    // Errors only: the loop starts the edge many times, and its logs are kept for a failure.
    o.log_env = Some("warn".to_string());
    // A relay is never cut by the timeout (that would deliver twice by design).
    o.extra = format!(
        "[forward]\nspool_dir = {:?}\nevents = \"{sink}\"\nlogblob = \"{sink}\"\nstats = \"{sink}\"\ntimeout_ms = 5000\n",
        spool.display().to_string(),
        sink = sink.url(),
    );
    o
}

/// Sends one request, retried or new, and books the answer.
async fn forward_once(
    edge: SocketAddr,
    shared: &Shared,
    target: String,
    body: Vec<u8>,
    live: bool,
) {
    let answer = try_request(edge, "POST", &target, Some(&body)).await;
    let mut ledger = shared.ledger.lock().unwrap();
    match answer {
        Some(r) if r.complete && (200..300).contains(&r.status) => {
            if live {
                ledger.acked_in_cycles += 1;
            }
            ledger.acked.insert(target, body);
        }
        Some(r) if r.complete && r.status != 503 => {
            ledger
                .unexpected
                .push(format!("{target}: {} {}", r.status, r.text()));
            ledger.pending.push((target, body));
        }
        Some(r) if r.complete && r.status == 503 => {
            if live {
                ledger.refused_while_opening += 1;
            }
            ledger.last_refusal = format!("503 {}", r.text().trim());
            ledger.pending.push((target, body));
        }
        // Cut by the kill, or refused while the edge is down.
        _ => {
            ledger.last_refusal = "no answer".to_string();
            ledger.pending.push((target, body))
        }
    }
}

async fn forward_worker(edge: Arc<Edge>, shared: Arc<Shared>, route: &'static str, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !shared.stop.load(Ordering::SeqCst) {
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let len = if route == BLOB {
            rng.gen_range(1..64 * 1024)
        } else {
            rng.gen_range(16..2_048)
        };
        let mut body = format!("{route} {id} ").into_bytes();
        body.extend((0..len).map(|_| rng.gen_range(b'a'..=b'z')));
        forward_once(
            edge.http,
            &shared,
            format!("{route}&reqId=r{id}"),
            body,
            true,
        )
        .await;
    }
}

/// Checks one answer against the origin's bytes of `[a, b]`.
fn check_range(shared: &Shared, what: &str, r: Option<Response>, want: &[u8]) {
    let mut ledger = shared.ledger.lock().unwrap();
    match r {
        Some(r) if r.status == 200 => {
            // A cut answer is allowed, but what came must be the origin's bytes.
            if r.body.len() > want.len() || r.body[..] != want[..r.body.len()] {
                ledger.wrong_bytes.push(format!(
                    "{what}: {} of {} bytes, complete: {}",
                    r.body.len(),
                    want.len(),
                    r.complete
                ));
            } else if r.complete {
                ledger.ranges_whole += 1;
            } else {
                ledger.ranges_cut += 1;
            }
        }
        Some(r) => *ledger.range_errors.entry(r.status).or_default() += 1,
        None => ledger.ranges_failed += 1,
    }
}

async fn range_worker(
    edge: Arc<Edge>,
    shared: Arc<Shared>,
    objects: Arc<Vec<(String, Vec<u8>)>>,
    cycle: usize,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !shared.stop.load(Ordering::SeqCst) {
        // Mostly the cycle's cold object (fills in flight), else an older one (disk hits).
        let n = if cycle == 0 || rng.gen_bool(0.7) {
            cycle
        } else {
            rng.gen_range(0..cycle)
        };
        let (v, bytes) = &objects[n];
        let a = rng.gen_range(0..bytes.len());
        let b = (a + rng.gen_range(1..300 * 1024)).min(bytes.len()) - 1;
        let target = format!("/range/{a}-{b}?{}", signed("movie", v));
        let r = try_request(edge.http, "GET", &target, None).await;
        check_range(&shared, &format!("{v} {a}-{b}"), r, &bytes[a..=b]);
    }
}

/// Waits (bounded) until the edge's spool is open (after a crash, once repaired).
async fn spool_open(edge: &Edge) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = try_request(edge.admin, "GET", "/status", None).await;
        let text = status.map(|s| s.text().replace(char::is_whitespace, ""));
        if text.is_some_and(|t| t.contains(r#""state":"open""#)) {
            return;
        }
        assert!(Instant::now() < deadline, "the spool did not open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until the sink has no connection left from the killed process, so
/// that every delivery it made is booked before the next process starts.
async fn drain(sink: &TestOrigin) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.open_connections() > 0 {
        assert!(Instant::now() < deadline, "the sink kept a connection open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(plan: Plan) -> Report {
    let started = Instant::now();
    eprintln!("crash loop: {plan:?}");
    let dir = tempfile::tempdir().unwrap();
    let (spool, disk) = (dir.path().join("spool"), dir.path().join("disk"));
    let origin = TestOrigin::start().await;
    // A cold slice takes about 30 ms to fill: a kill finds fills in flight.
    origin.set_pace(ORIGIN_BYTES_PER_SEC);
    let sink = TestOrigin::start().await;
    sink.set_mode(Mode::FailEvery(SINK_FAILS_EVERY));
    let objects: Arc<Vec<(String, Vec<u8>)>> = Arc::new((0..plan.cycles).map(object_of).collect());
    for (v, bytes) in objects.iter() {
        origin.add_object("movie", v, bytes.clone(), "video/mp4");
    }
    let shared = Arc::new(Shared {
        ledger: Mutex::new(Ledger::default()),
        stop: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
    });
    let mut rng = StdRng::seed_from_u64(plan.seed);
    // Index into the sink's deliveries where each run of the process began.
    let mut runs_from = Vec::new();
    let mut edge = Edge::start(options(&origin, &sink, &spool, &disk)).await;
    for cycle in 0..plan.cycles {
        runs_from.push(sink.received().len());
        if cycle > 0 {
            edge.restart().await;
        }
        let shown = Arc::new(edge);
        shared.stop.store(false, Ordering::SeqCst);
        let retries = std::mem::take(&mut shared.ledger.lock().unwrap().pending);
        let retried = retries.len();
        let mut tasks = Vec::new();
        {
            let (edge, shared) = (shown.clone(), shared.clone());
            tasks.push(tokio::spawn(async move {
                for (target, body) in retries {
                    forward_once(edge.http, &shared, target, body, true).await;
                }
            }));
        }
        for w in 0..EVENT_WORKERS + BLOB_WORKERS {
            let route = if w < EVENT_WORKERS { EVENT } else { BLOB };
            let seed = rng.gen();
            tasks.push(tokio::spawn(forward_worker(
                shown.clone(),
                shared.clone(),
                route,
                seed,
            )));
        }
        for _ in 0..RANGE_WORKERS {
            let seed = rng.gen();
            tasks.push(tokio::spawn(range_worker(
                shown.clone(),
                shared.clone(),
                objects.clone(),
                cycle,
                seed,
            )));
        }
        // Requests during the spool's repair get 503; the kill falls once it is open.
        let opening = Instant::now();
        spool_open(&shown).await;
        eprintln!(
            "cycle {cycle}: spool open after {} ms, {} requests retried",
            opening.elapsed().as_millis(),
            retried
        );
        let load_ms = rng.gen_range(50..=plan.max_load_ms);
        tokio::time::sleep(Duration::from_millis(load_ms)).await;
        // SIGKILL with requests, spool writes and slice fills in flight.
        shown.signal("KILL");
        shared.stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        edge = Arc::try_unwrap(shown).unwrap_or_else(|_| panic!("a worker kept the edge"));
        edge.kill().await;
        drain(&sink).await;
    }

    // Final run: the sink accepts everything; players retry what was not acknowledged.
    runs_from.push(sink.received().len());
    sink.set_mode(Mode::FailEvery(u64::MAX));
    edge.restart().await;
    spool_open(&edge).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let retries = std::mem::take(&mut shared.ledger.lock().unwrap().pending);
        if retries.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let status = try_request(edge.admin, "GET", "/status", None).await;
            panic!(
                "{} requests still refused, the last with {}; status: {}; edge log:\n{}",
                retries.len(),
                shared.ledger.lock().unwrap().last_refusal,
                status.map(|s| s.text()).unwrap_or_default(),
                edge.log_text()
            );
        }
        // Players retry side by side.
        let mut players = tokio::task::JoinSet::new();
        for (n, (target, body)) in retries.into_iter().enumerate() {
            if n >= 8 {
                players.join_next().await.expect("a task").unwrap();
            }
            let (addr, shared) = (edge.http, shared.clone());
            players.spawn(async move { forward_once(addr, &shared, target, body, false).await });
        }
        players.join_all().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked = shared.ledger.lock().unwrap().acked.clone();
    let delivered = |sink: &TestOrigin| {
        let got = sink.received();
        acked
            .keys()
            .filter(|t| !got.iter().any(|r| &r.target == *t))
            .count()
    };
    loop {
        let missing = delivered(&sink);
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} acknowledged requests never delivered; edge log:\n{}",
            edge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for route in ["events", "logblob"] {
        edge.wait_for_metric_exact(&format!("cdn_edge_spool_entries{{route=\"{route}\"}}"), 0.0)
            .await;
    }
    let metrics = edge.metrics().await;
    let dead_letters: f64 = support::metric_sum(&metrics, "cdn_edge_forward_dead_letters_total");
    assert_eq!(dead_letters, 0.0, "nothing set aside:\n{metrics}");

    // Deliveries: each with the body that was acknowledged; twice only across a crash.
    let got = sink.received();
    let mut runs_of: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, r) in got.iter().enumerate() {
        let run = runs_from.iter().rposition(|&from| from <= i).unwrap();
        if let Some(body) = acked.get(&r.target) {
            assert!(&r.body == body, "{} delivered with another body", r.target);
        }
        runs_of.entry(r.target.as_str()).or_default().push(run);
    }
    let mut redelivered = 0;
    for (target, runs) in &runs_of {
        let mut distinct = runs.clone();
        distinct.dedup();
        assert_eq!(
            &distinct, runs,
            "{target} delivered twice by one process (runs {runs:?})"
        );
        redelivered += runs.len() - 1;
    }
    assert_eq!(
        runs_of.len(),
        acked.len(),
        "only requests that were sent arrive"
    );

    let (ranges_whole, ranges_cut, ranges_failed, range_errors) = {
        let l = shared.ledger.lock().unwrap();
        (
            l.ranges_whole,
            l.ranges_cut,
            l.ranges_failed,
            l.range_errors.clone(),
        )
    };

    // The disk tier alone: no origin, an empty memory tier, every slice of every object.
    let disk_files = support::slice_files(&disk).len();
    origin.set_mode(Mode::Status(503));
    origin.set_pace(0);
    edge.restart().await;
    edge.wait_for_metric("cdn_edge_disk_index_ready", 1.0).await;
    let (mut slices, mut served) = (0, 0);
    for (v, bytes) in objects.iter() {
        let q = signed("movie", v);
        for a in (0..bytes.len()).step_by(SLICE as usize) {
            let b = (a + SLICE as usize).min(bytes.len()) - 1;
            slices += 1;
            let r = try_request(edge.http, "GET", &format!("/range/{a}-{b}?{q}"), None).await;
            if r.as_ref().is_some_and(|r| r.status == 200 && r.complete) {
                served += 1;
            }
            check_range(&shared, &format!("disk {v} {a}-{b}"), r, &bytes[a..=b]);
        }
    }
    let corrupt = edge.metric("cdn_edge_cache_corrupt_total").await;
    let ledger = shared.ledger.lock().unwrap();
    assert!(
        ledger.wrong_bytes.is_empty(),
        "wrong bytes served: {:?}",
        ledger.wrong_bytes
    );
    assert!(
        ledger.unexpected.is_empty(),
        "unexpected answers: {:?}",
        ledger.unexpected
    );
    assert!(served > 0, "the disk tier kept nothing");
    let count = |route: &str| acked.keys().filter(|t| t.starts_with(route)).count();
    Report {
        cycles: plan.cycles,
        seed: plan.seed,
        events_acked: count(EVENT),
        blobs_acked: count(BLOB),
        acked_in_cycles: ledger.acked_in_cycles,
        refused_while_opening: ledger.refused_while_opening,
        delivered_once: runs_of.values().filter(|r| r.len() == 1).count(),
        redelivered_after_crash: redelivered,
        ranges_whole,
        ranges_cut,
        ranges_failed,
        range_errors,
        disk_slices: slices,
        disk_files,
        disk_served: served,
        corrupt_files: corrupt,
        elapsed: started.elapsed(),
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        writeln!(
            f,
            "cycles {} (seed {}) in {:.0} s",
            r.cycles,
            r.seed,
            r.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "acknowledged: {} events, {} log blobs ({} during the cycles, the rest retried after)",
            r.events_acked, r.blobs_acked, r.acked_in_cycles
        )?;
        writeln!(
            f,
            "503 while the spool was repaired after a crash: {}",
            r.refused_while_opening
        )?;
        writeln!(
            f,
            "delivered: all; {} once, {} deliveries again after a restart, 0 twice by one process",
            r.delivered_once, r.redelivered_after_crash
        )?;
        writeln!(
            f,
            "ranges: {} whole, {} cut by the kill, {} without an answer, other answers {:?}; 0 wrong bytes",
            r.ranges_whole, r.ranges_cut, r.ranges_failed, r.range_errors
        )?;
        writeln!(
            f,
            "disk tier alone at the end: {} slice files; {} of {} slices served, all byte-exact; {} files failed their checks",
            r.disk_files, r.disk_served, r.disk_slices, r.corrupt_files
        )
    }
}

fn print(report: &Report) {
    let text = report.to_string();
    eprintln!("{text}");
    if let Ok(path) = std::env::var("CRASH_REPORT") {
        std::fs::write(path, text).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_requests_and_disk_bytes_survive_repeated_kill_9() {
    let report = run(Plan {
        cycles: 4,
        seed: rand::random(),
        max_load_ms: 600,
    })
    .await;
    print(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the long loop: bench/crash-loop.sh"]
async fn crash_loop_long() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let report = run(Plan {
        cycles: env("CRASH_CYCLES").unwrap_or(50) as usize,
        seed: env("CRASH_SEED").unwrap_or_else(rand::random),
        max_load_ms: env("CRASH_MAX_LOAD_MS").unwrap_or(1_500),
    })
    .await;
    print(&report);
}
