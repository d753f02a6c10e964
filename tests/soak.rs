//! Soak: mixed load at a fixed rate (range hits and misses, dictionary lookups, events,
//! log blobs) against one edge with a flaky origin, a flaky dictionary upstream and a
//! flaky event sink, sampled every interval: the edge's memory, file descriptors, CPU
//! and spool, and the latency of the interval's requests.
//!
//! The normal suite runs it for a few seconds; `bench/soak.sh` runs the long soak
//! (`soak_long`, ignored here): `SOAK_SECS` (1800), `SOAK_RATE` (requests/s; unset: half
//! of what an unpaced probe reached), `SOAK_INTERVAL_SECS` (60), `SOAK_EDGE_CPU` (pin the
//! edge to this CPU), `SOAK_CSV` and `SOAK_REPORT` (files to write).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use support::edge::{Edge, EdgeOptions, KEY1};
use support::load::Conn;
use support::object_bytes;
use support::origin::{Mode, TestOrigin};

const OBJECTS: usize = 48;
const OBJECT_BYTES: usize = 4 * 1024 * 1024 + 4_321;
const SLICE: u64 = 256 * 1024;
/// The catalogue is 192 MiB: a 64 MiB memory tier and a 96 MiB disk tier keep missing.
const MEMORY_BYTES: u64 = 64 << 20;
const DISK_BYTES: u64 = 96 << 20;
const DICTIONARY_KEYS: usize = 2_000;
/// Every n-th request to the first origin, the dictionary upstream and the event sink
/// is answered 503.
const FAIL_EVERY: u64 = 25;
const CONNECTIONS: usize = 32;
const DICT_PATH: &str = "/base_dict_getHoverDict_8";
const EVENT: &str = "/msl/playapi/cadmium/event/1?reqAttempt=1&reqName=events/pause";
const BLOB: &str = "/log/cadmium/logblob/1?reqAttempt=1";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Route {
    Range,
    Dictionary,
    Event,
    Blob,
}

/// What one interval's requests did.
#[derive(Default)]
struct Tally {
    /// Microseconds from each request's scheduled time to its whole answer.
    latencies: Vec<u32>,
    misses: u64,
    /// (route, status or 0 for no answer) of answers that are not what the route gives.
    errors: BTreeMap<(Route, u16), u64>,
    wrong_bytes: u64,
}

struct World {
    edge: Edge,
    origin: TestOrigin,
    dictionary: TestOrigin,
    sink: TestOrigin,
    catalogue: Arc<Vec<Arc<Vec<u8>>>>,
    /// One signed query per object, used for the whole run as a player uses its URL.
    queries: Arc<Vec<String>>,
    _origin2: TestOrigin,
    dir: tempfile::TempDir,
}

fn canonical(n: usize) -> String {
    format!("{DICT_PATH}?form=w{n}&lemma=&pos=NOUN&pow=n&sl=ko&tl=en")
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let catalogue: Arc<Vec<Arc<Vec<u8>>>> = Arc::new(
        (0..OBJECTS)
            .map(|i| Arc::new(object_bytes(5_000 + i as u64, OBJECT_BYTES)))
            .collect(),
    );
    // The first origin fails every n-th fetch; the edge fails over to the second.
    let origin = TestOrigin::start().await;
    let origin2 = TestOrigin::start().await;
    origin.set_mode(Mode::FailEvery(FAIL_EVERY));
    for (i, bytes) in catalogue.iter().enumerate() {
        origin.add_shared_object("movie", &format!("v{i}"), bytes.clone(), "video/mp4");
        origin2.add_shared_object("movie", &format!("v{i}"), bytes.clone(), "video/mp4");
    }
    let dictionary = TestOrigin::start().await;
    dictionary.set_mode(Mode::FailEvery(FAIL_EVERY));
    // One key in ten is unknown (404, cached as negative).
    for n in (0..DICTIONARY_KEYS).filter(|n| n % 10 != 0) {
        let body = format!(r#"{{"form":"w{n}","translations":["t{n}"]}}"#);
        dictionary.set_response(
            &canonical(n),
            200,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
    }
    let sink = TestOrigin::start().await;
    sink.set_mode(Mode::FailEvery(FAIL_EVERY));
    let mut o = EdgeOptions::new(vec![origin.url(), origin2.url()]);
    o.slice_bytes = SLICE;
    o.memory_bytes = MEMORY_BYTES;
    o.disk = Some((dir.path().join("disk"), DISK_BYTES));
    o.retry_unhealthy_ms = 1_000;
    o.log_env = Some("warn".to_string());
    o.extra = format!(
        "[dictionary]\nupstream = \"{dict}\"\nttl_secs = 60\nnegative_ttl_secs = 30\nstale_if_error_secs = 3600\ntimeout_ms = 1000\n\
         [forward]\nspool_dir = {spool:?}\nevents = \"{sink}\"\nlogblob = \"{sink}\"\nstats = \"{sink}\"\ntimeout_ms = 2000\n",
        dict = dictionary.url(),
        spool = dir.path().join("spool").display().to_string(),
        sink = sink.url(),
    );
    let edge = Edge::start(o).await;
    if let Ok(cpu) = std::env::var("SOAK_EDGE_CPU") {
        let pinned = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu, &edge.pid().to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("taskset");
        assert!(pinned.success(), "taskset -a -p -c {cpu}");
    }
    let expires = support::edge::unix_now() + 24 * 3600;
    let queries = (0..OBJECTS)
        .map(|i| {
            let v = format!("v{i}");
            cdn_edge::auth::sign_query(KEY1.as_bytes(), "movie", &v, expires, "tok")
        })
        .collect();
    World {
        edge,
        origin,
        dictionary,
        sink,
        catalogue,
        queries: Arc::new(queries),
        _origin2: origin2,
        dir,
    }
}

/// One request of the mix: its route, its result (the status when wrong), whether it
/// missed, and whether its bytes were wrong.
async fn one_request(
    conn: &mut Conn,
    rng: &mut StdRng,
    catalogue: &[Arc<Vec<u8>>],
    queries: &[String],
    id: u64,
    verify: bool,
) -> (Route, Result<(), u16>, bool, bool) {
    let pick = rng.gen_range(0..100);
    if pick < 55 {
        // Skewed towards the first objects, as viewing is.
        let n = ((catalogue.len() as f64) * rng.gen::<f64>().powi(3)) as usize;
        let bytes = &catalogue[n];
        let a = rng.gen_range(0..bytes.len());
        let b = (a + rng.gen_range(16 * 1024..256 * 1024)).min(bytes.len()) - 1;
        let target = format!("/range/{a}-{b}?{}", queries[n]);
        return match conn.send("GET", &target, None).await {
            Ok(r) if r.status == 200 && r.body.len() == b - a + 1 => {
                let wrong = verify && r.body[..] != bytes[a..=b];
                let miss = r.header("cache-status").is_some_and(|v| v.contains("miss"));
                (Route::Range, Ok(()), miss, wrong)
            }
            Ok(r) => (Route::Range, Err(r.status), false, false),
            Err(_) => (Route::Range, Err(0), false, false),
        };
    }
    if pick < 80 {
        let n = rng.gen_range(0..DICTIONARY_KEYS);
        let target = format!("{DICT_PATH}?form=w{n}&lemma=&sl=ko&tl=en&pos=NOUN&pow=n");
        let want = if n % 10 == 0 { 404 } else { 200 };
        return match conn.send("GET", &target, None).await {
            Ok(r) if r.status == want => {
                let miss = r.header("cache-status").is_some_and(|v| v.contains("miss"));
                (Route::Dictionary, Ok(()), miss, false)
            }
            Ok(r) => (Route::Dictionary, Err(r.status), false, false),
            Err(_) => (Route::Dictionary, Err(0), false, false),
        };
    }
    let (route, target, len) = if pick < 95 {
        (
            Route::Event,
            format!("{EVENT}&reqId=s{id}"),
            rng.gen_range(100..1_500),
        )
    } else {
        (
            Route::Blob,
            format!("{BLOB}&reqId=s{id}"),
            rng.gen_range(2_048..32_768),
        )
    };
    let body: Vec<u8> = (0..len).map(|_| rng.gen_range(b'a'..=b'z')).collect();
    match conn.send("POST", &target, Some(&body)).await {
        Ok(r) if (200..300).contains(&r.status) => (route, Ok(()), false, false),
        Ok(r) => (route, Err(r.status), false, false),
        Err(_) => (route, Err(0), false, false),
    }
}

/// Runs `CONNECTIONS` connections until `end`: at `rate` requests per second in all,
/// each request timed from when it was due, or unpaced (as fast as answers come) when
/// `rate` is `None`.
async fn drive(world: &World, rate: Option<f64>, end: Instant, tally: Arc<Mutex<Tally>>) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let (addr, tally) = (world.edge.http, tally.clone());
        let (catalogue, queries) = (world.catalogue.clone(), world.queries.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut rng = StdRng::seed_from_u64(c as u64);
            for k in 0u64.. {
                let due = match rate {
                    Some(r) => {
                        start
                            + Duration::from_secs_f64(
                                (k * CONNECTIONS as u64 + c as u64) as f64 / r,
                            )
                    }
                    None => Instant::now(),
                };
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let id = k * CONNECTIONS as u64 + c as u64;
                let outcome =
                    one_request(&mut conn, &mut rng, &catalogue, &queries, id, k % 16 == 0).await;
                let micros = due.elapsed().as_micros().min(u32::MAX as u128) as u32;
                let mut t = tally.lock().unwrap();
                t.latencies.push(micros);
                let (route, result, miss, wrong) = outcome;
                if let Err(status) = result {
                    *t.errors.entry((route, status)).or_default() += 1;
                }
                t.misses += u64::from(miss);
                t.wrong_bytes += u64::from(wrong);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The edge process as /proc shows it.
struct Process {
    rss_kib: u64,
    fds: usize,
    /// User and system CPU, in clock ticks.
    cpu_ticks: u64,
}

fn process(pid: u32) -> Process {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are 14, 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let cpu_ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Process {
        rss_kib,
        fds,
        cpu_ticks,
    }
}

fn ticks_per_sec() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// One interval's line of the table.
struct Row {
    at_secs: f64,
    requests: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    miss_pct: f64,
    errors: BTreeMap<(Route, u16), u64>,
    wrong_bytes: u64,
    cpu_pct: f64,
    rss_mib: f64,
    fds: usize,
    spool_records: f64,
    spool_kept_mib: f64,
    spool_dir_mib: f64,
    injected: u64,
}

const CSV_HEADER: &str = "seconds,requests,req_per_s,p50_ms,p99_ms,max_ms,miss_pct,errors,edge_cpu_pct,rss_mib,fds,spool_records,spool_kept_mib,spool_dir_mib,injected_503s";

impl Row {
    fn csv(&self, interval: f64) -> String {
        let errors: u64 = self.errors.values().sum();
        format!(
            "{:.0},{},{:.0},{:.2},{:.2},{:.1},{:.1},{},{:.0},{:.1},{},{},{:.2},{:.1},{}",
            self.at_secs,
            self.requests,
            self.requests as f64 / interval,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.miss_pct,
            errors,
            self.cpu_pct,
            self.rss_mib,
            self.fds,
            self.spool_records,
            self.spool_kept_mib,
            self.spool_dir_mib,
            self.injected,
        )
    }
}

struct Sampler {
    pid: u32,
    ticks: f64,
    last_cpu: u64,
    last_at: Instant,
    started: Instant,
    spool: std::path::PathBuf,
}

impl Sampler {
    async fn row(&mut self, world: &World, tally: &Mutex<Tally>) -> Row {
        let mut t = std::mem::take(&mut *tally.lock().unwrap());
        let p = process(self.pid);
        let now = Instant::now();
        let cpu_pct =
            (p.cpu_ticks - self.last_cpu) as f64 / self.ticks / (now - self.last_at).as_secs_f64()
                * 100.0;
        self.last_cpu = p.cpu_ticks;
        self.last_at = now;
        let metrics = world.edge.metrics().await;
        t.latencies.sort_unstable();
        let requests = t.latencies.len();
        Row {
            at_secs: (now - self.started).as_secs_f64(),
            requests,
            p50_ms: percentile(&t.latencies, 0.50),
            p99_ms: percentile(&t.latencies, 0.99),
            max_ms: percentile(&t.latencies, 1.0),
            miss_pct: t.misses as f64 * 100.0 / requests.max(1) as f64,
            errors: t.errors,
            wrong_bytes: t.wrong_bytes,
            cpu_pct,
            rss_mib: p.rss_kib as f64 / 1024.0,
            fds: p.fds,
            spool_records: support::metric_sum(&metrics, "cdn_edge_spool_entries"),
            spool_kept_mib: support::metric_sum(&metrics, "cdn_edge_spool_kept_bytes") / 1048576.0,
            spool_dir_mib: dir_bytes(&self.spool) as f64 / 1048576.0,
            injected: [&world.origin, &world.dictionary, &world.sink]
                .iter()
                .map(|o| o.requests() / FAIL_EVERY)
                .sum(),
        }
    }
}

struct Plan {
    secs: u64,
    rate: Option<f64>,
    interval_secs: u64,
    probe_secs: u64,
}

async fn soak(plan: Plan) {
    let world = Arc::new(world().await);
    let pid = world.edge.pid();
    let ticks = ticks_per_sec();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut report = String::new();

    // Capacity: the mix unpaced for a while; the soak runs at half of it.
    let rate = match plan.rate {
        Some(r) => r,
        None => {
            let before = process(pid).cpu_ticks;
            let started = Instant::now();
            let end = started + Duration::from_secs(plan.probe_secs);
            drive(&world, None, end, tally.clone()).await;
            let secs = started.elapsed().as_secs_f64();
            let t = std::mem::take(&mut *tally.lock().unwrap());
            let reached = t.latencies.len() as f64 / secs;
            let cpu = (process(pid).cpu_ticks - before) as f64 / ticks / secs * 100.0;
            report.push_str(&format!(
                "probe: {reached:.0} requests/s unpaced over {secs:.0} s, edge CPU {cpu:.0}% of one core\n"
            ));
            eprint!("{report}");
            reached / 2.0
        }
    };

    let started = Instant::now();
    let mut sampler = Sampler {
        pid,
        ticks,
        last_cpu: process(pid).cpu_ticks,
        last_at: started,
        started,
        spool: world.dir.path().join("spool"),
    };
    let interval = plan.interval_secs as f64;
    let mut rows = vec![sampler.row(&world, &tally).await];
    eprintln!(
        "soak: {rate:.0} requests/s for {} s\n{CSV_HEADER}",
        plan.secs
    );
    eprintln!("{}", rows[0].csv(interval));
    let end = started + Duration::from_secs(plan.secs);
    let load = {
        let (world, tally) = (world.clone(), tally.clone());
        tokio::spawn(async move { drive(&world, Some(rate), end, tally).await })
    };
    let mut next = started;
    loop {
        next += Duration::from_secs(plan.interval_secs);
        tokio::time::sleep_until(next.min(end).into()).await;
        let row = sampler.row(&world, &tally).await;
        eprintln!("{}", row.csv(interval));
        rows.push(row);
        if next >= end {
            break;
        }
    }
    load.await.unwrap();
    // Requests that were still in flight at the last sample.
    let rest = sampler.row(&world, &tally).await;
    finish(&world, rows, rest, rate, &plan, report).await;
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn finish(
    world: &World,
    rows: Vec<Row>,
    rest: Row,
    rate: f64,
    plan: &Plan,
    mut report: String,
) {
    let all = || rows.iter().chain(std::iter::once(&rest));
    let requests: usize = all().map(|r| r.requests).sum();
    let mut errors: BTreeMap<(Route, u16), u64> = BTreeMap::new();
    for r in all() {
        for (k, n) in &r.errors {
            *errors.entry(*k).or_default() += n;
        }
    }
    let wrong: u64 = all().map(|r| r.wrong_bytes).sum();
    // Everything spooled is delivered once the load stops.
    let deadline = Instant::now() + Duration::from_secs(120);
    while support::metric_sum(&world.edge.metrics().await, "cdn_edge_spool_entries") > 0.0 {
        assert!(Instant::now() < deadline, "the spool did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let loaded = &rows[1..];
    let third = (loaded.len() / 3).max(1);
    let p99 = |rows: &[Row]| median(rows.iter().map(|r| r.p99_ms).collect());
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    let max_of = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).fold(0.0, f64::max);
    report.push_str(&format!(
        "soak: {:.0} s at {rate:.0} requests/s: {requests} requests, median edge CPU {:.0}% of one core, misses {:.1}%\n",
        plan.secs,
        median(loaded.iter().map(|r| r.cpu_pct).collect()),
        median(loaded.iter().map(|r| r.miss_pct).collect()),
    ));
    report.push_str(&format!(
        "errors: {errors:?} (route, status; 0 = no answer); wrong bytes: {wrong}; 503s injected upstream: {}\n",
        last.injected
    ));
    report.push_str(&format!(
        "p99: {:.2} ms (median of the first third of intervals), {:.2} ms (last third); highest interval p99 {:.2} ms\n",
        p99(&loaded[..third]),
        p99(&loaded[loaded.len() - third..]),
        max_of(&|r| r.p99_ms),
    ));
    report.push_str(&format!(
        "RSS MiB: {:.1} at start, {:.1} after the first interval, {:.1} at the end, {:.1} highest\n",
        first.rss_mib,
        loaded[0].rss_mib,
        last.rss_mib,
        max_of(&|r| r.rss_mib),
    ));
    report.push_str(&format!(
        "file descriptors: {} at start, {} at the end, {:.0} highest\n",
        first.fds,
        last.fds,
        max_of(&|r| r.fds as f64),
    ));
    report.push_str(&format!(
        "spool: records waiting {:.0} highest, {:.0} at the end; kept answers {:.2} MiB at the end; directory {:.1} MiB at start, {:.1} at the end, {:.1} highest\n",
        max_of(&|r| r.spool_records),
        last.spool_records,
        last.spool_kept_mib,
        first.spool_dir_mib,
        last.spool_dir_mib,
        max_of(&|r| r.spool_dir_mib),
    ));
    eprint!("{report}");
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        std::fs::write(path, &report).unwrap();
    }
    if let Ok(path) = std::env::var("SOAK_CSV") {
        let interval = plan.interval_secs as f64;
        let lines: Vec<String> = rows.iter().map(|r| r.csv(interval)).collect();
        std::fs::write(path, format!("{CSV_HEADER}\n{}\n", lines.join("\n"))).unwrap();
    }
    assert_eq!(wrong, 0, "wrong bytes served");
    // A cold dictionary key whose upstream request was refused has no stale copy to
    // serve: the upstream's 503 is passed on. Those are the only errors allowed.
    let dictionary_injected = world.dictionary.requests() / FAIL_EVERY;
    let passed_on = errors.get(&(Route::Dictionary, 503)).copied().unwrap_or(0);
    assert!(
        passed_on <= dictionary_injected,
        "{passed_on} dictionary 503s"
    );
    errors.remove(&(Route::Dictionary, 503));
    assert!(
        errors.is_empty(),
        "errors besides the injected ones: {errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_serves_every_request_of_the_mix() {
    soak(Plan {
        secs: 4,
        rate: Some(300.0),
        interval_secs: 2,
        probe_secs: 0,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the long soak: bench/soak.sh"]
async fn soak_long() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok());
    soak(Plan {
        secs: env("SOAK_SECS").unwrap_or(1800.0) as u64,
        rate: env("SOAK_RATE"),
        interval_secs: env("SOAK_INTERVAL_SECS").unwrap_or(60.0) as u64,
        probe_secs: env("SOAK_PROBE_SECS").unwrap_or(20.0) as u64,
    })
    .await;
}
