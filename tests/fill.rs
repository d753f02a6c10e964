//! Fill jobs (SPEC 7): `POST /fill` and `GET /fill/{id}` on real edges, the slices they
//! place served as hits, the rate limit, the window, a restart after `kill -9`, a site
//! where each node fills what it owns (in directed mode), and `cdn-edge fill`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::client::{self, Response};
use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::TestOrigin;
use support::site::{
    check_exact, fetched_by, get_exact, origins, site_options, slices, ClusterOptions, Site,
    SITE_OBJECT_SIZE,
};

const TOKEN: &str = "fill-test-token-0123456789";
const SLICE: u64 = 64 * 1024;

/// `[admin]` with [`TOKEN`] and `[fill]` keeping its jobs in `state_dir`, plus `fill`
/// lines (window, rate).
fn fill_section(state_dir: &Path, fill: &str) -> String {
    format!(
        "[admin]\ntoken = \"{TOKEN}\"\n\n[fill]\nstate_dir = {:?}\n{fill}\n",
        state_dir.display().to_string()
    )
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

async fn post_fill(admin: SocketAddr, body: &str, authorization: Option<&str>) -> Response {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| vec![("Authorization", a), ("Content-Type", "application/json")])
        .unwrap_or_default();
    client::post(admin, "/fill", &headers, body.as_bytes()).await
}

/// Submits a manifest; returns the job's id once answered 202.
async fn submit(edge: &Edge, body: &str) -> String {
    let r = post_fill(edge.admin, body, Some(&bearer())).await;
    assert_eq!(r.status, 202, "POST /fill: {}", r.text());
    let answer: Value = serde_json::from_slice(&r.body).unwrap();
    answer["id"].as_str().expect("a job id").to_string()
}

async fn progress(edge: &Edge, id: &str) -> Value {
    let r = client::get(
        edge.admin,
        &format!("/fill/{id}"),
        &[("Authorization", &bearer())],
    )
    .await;
    assert_eq!(r.status, 200, "GET /fill/{id}: {}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

/// Polls a job (every 20 ms, bounded) until `done` holds; returns that progress.
async fn wait_job(edge: &Edge, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let p = progress(edge, id).await;
        if done(&p) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still {p} after {within:?}; edge log:\n{}",
            edge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn finished(p: &Value) -> bool {
    matches!(p["state"].as_str(), Some("done" | "failed"))
}

/// `HH:MM` of `minute` after midnight (mod one day).
fn hhmm(minute: i64) -> String {
    let m = minute.rem_euclid(1440);
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// The current local minute after midnight, in the time zone the edges use too.
fn local_minute() -> i64 {
    let now = jiff::ZonedDateTime::now();
    i64::from(now.hour()) * 60 + i64::from(now.minute())
}

/// A window open from a minute ago for five minutes: the job runs now.
fn window_now() -> String {
    let m = local_minute();
    format!("window = \"{}-{}\"", hhmm(m - 1), hhmm(m + 5))
}

/// A window that opens in two minutes and closes a minute later: not now, nor in the
/// minute the test may run into.
fn window_later() -> String {
    let m = local_minute();
    format!("window = \"{}-{}\"", hhmm(m + 2), hhmm(m + 3))
}

async fn fill_edge(origin: &TestOrigin, state_dir: &Path, fill: &str) -> Edge {
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.meta_ttl_secs = Some(3600);
    opts.extra = fill_section(state_dir, fill);
    Edge::start(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_fills_the_wanted_slices_which_are_then_exact_hits() {
    let origin = TestOrigin::start().await;
    let movie = object_bytes(1, 20 * SLICE as usize + 1_000);
    let clip = object_bytes(2, 10 * SLICE as usize);
    origin.add_object("movie", "1", movie.clone(), "video/mp4");
    origin.add_object("clip", "2", clip.clone(), "video/mp4");
    let state = tempfile::tempdir().unwrap();
    let edge = fill_edge(&origin, state.path(), &window_now()).await;

    // The whole movie (21 slices), and three slices of the clip: 0, then 1 and 2.
    let manifest = r#"{"objects": [{"o": "movie", "v": "1"},
        {"o": "clip", "v": "2", "ranges": ["70000-140000", "0-10"]}]}"#;
    let id = submit(&edge, manifest).await;
    let p = wait_job(&edge, &id, Duration::from_secs(20), finished).await;
    let fetched = movie.len() as u64 + 3 * SLICE;
    assert_eq!(p["state"], "done", "{p}");
    assert_eq!(
        (&p["slices_total"], &p["slices_done"], &p["errors"]),
        (&Value::from(24), &Value::from(24), &Value::from(0)),
        "{p}"
    );
    assert_eq!(p["bytes_done"], fetched, "{p}");
    assert_eq!(origin.requests(), 24, "one origin request per slice");

    // Served from the cache: hits, byte-exact, and the origin is not asked again.
    let whole = edge.get(&format!("/?{}", signed("movie", "1")), &[]).await;
    assert_eq!(whole.status, 200);
    assert!(
        whole.body == movie,
        "the filled movie differs from the origin's"
    );
    assert_eq!(whole.header("cache-status"), Some("cdn-edge; hit"));
    let head = edge
        .get(&format!("/range/0-196607?{}", signed("clip", "2")), &[])
        .await;
    check_exact(&head, &clip, 0, 196_607, "clip slices 0-2");
    assert_eq!(head.header("cache-status"), Some("cdn-edge; hit"));
    assert_eq!(origin.requests(), 24);
    // Only the wanted slices: the clip's slice 5 is a miss.
    let later = edge
        .get(
            &format!(
                "/range/{}-{}?{}",
                5 * SLICE,
                5 * SLICE + 9,
                signed("clip", "2")
            ),
            &[],
        )
        .await;
    assert_eq!(later.header("cache-status"), Some("cdn-edge; fwd=miss"));
    assert_eq!(origin.requests(), 25);

    assert_eq!(
        edge.metric("cdn_edge_fill_bytes_total").await,
        fetched as f64
    );
    assert_eq!(
        edge.metric(r#"cdn_edge_fill_slices_total{result="fetched"}"#)
            .await,
        24.0
    );
    assert_eq!(
        edge.metric(r#"cdn_edge_fill_jobs{state="done"}"#).await,
        1.0
    );

    // The same job again: every slice is held, nothing is fetched.
    let again = submit(&edge, manifest).await;
    assert_ne!(again, id);
    let p = wait_job(&edge, &again, Duration::from_secs(10), finished).await;
    assert_eq!(
        (&p["state"], &p["slices_done"], &p["bytes_done"]),
        (&Value::from("done"), &Value::from(24), &Value::from(0)),
        "{p}"
    );
    assert_eq!(origin.requests(), 25);
    assert_eq!(
        edge.metric(r#"cdn_edge_fill_slices_total{result="held"}"#)
            .await,
        24.0
    );
    // The first job is still there to be asked about.
    assert_eq!(progress(&edge, &id).await["state"], "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_refuses_bad_tokens_bad_manifests_and_unknown_jobs() {
    let origin = TestOrigin::start().await;
    let state = tempfile::tempdir().unwrap();
    let edge = fill_edge(&origin, state.path(), "").await;
    let good = r#"{"objects": [{"o": "movie", "v": "1"}]}"#;
    let error_of = |r: &Response| -> String {
        let v: Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| panic!("not a JSON error: {}", r.text()));
        v["error"].as_str().expect("an error message").to_string()
    };

    for auth in [None, Some("Bearer wrong-token-0123456789"), Some(TOKEN)] {
        let r = post_fill(edge.admin, good, auth).await;
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text());
        error_of(&r);
    }
    let r = client::get(edge.admin, "/fill/1", &[]).await;
    assert_eq!(r.status, 401);

    let cases = [
        ("not json", "invalid JSON body"),
        (r#"{"objects": "movie"}"#, "objects"),
        (r#"{}"#, "missing field `objects`"),
        (r#"{"objects": []}"#, "objects is empty"),
        (
            r#"{"objects": [{"o": "../etc", "v": "1"}]}"#,
            "objects[0].o \"../etc\"",
        ),
        (
            r#"{"objects": [{"o": "a", "v": "1", "ranges": ["9-5"]}]}"#,
            "range end is before range start",
        ),
        (
            r#"{"objects": [{"o": "a", "v": "1", "ranges": ["x"]}]}"#,
            "objects[0].ranges[0] \"x\"",
        ),
        (
            r#"{"objects": [{"o": "a", "v": "1", "extra": 1}]}"#,
            "unknown field `extra`",
        ),
    ];
    for (body, want) in cases {
        let r = post_fill(edge.admin, body, Some(&bearer())).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = error_of(&r);
        assert!(e.contains(want), "{body}: {e}");
    }

    for id in ["999", "abc"] {
        let r = client::get(
            edge.admin,
            &format!("/fill/{id}"),
            &[("Authorization", &bearer())],
        )
        .await;
        assert_eq!(r.status, 404, "{id}: {}", r.text());
        assert!(error_of(&r).contains("no fill job"));
    }
    let r = client::get(edge.admin, "/fill", &[("Authorization", &bearer())]).await;
    assert_eq!(r.status, 405);
    assert_eq!(origin.requests(), 0, "a refused job fetches nothing");

    // A token but no [fill]: 404 that says so. No token: 403.
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.extra = format!("[admin]\ntoken = \"{TOKEN}\"\n");
    let no_fill = Edge::start(opts).await;
    let r = post_fill(no_fill.admin, good, Some(&bearer())).await;
    assert_eq!(r.status, 404);
    assert!(error_of(&r).contains("no [fill] section"), "{}", r.text());
    let no_token = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let r = post_fill(no_token.admin, good, Some(&bearer())).await;
    assert_eq!(r.status, 403);
    error_of(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_at_two_mib_per_second_take_three_to_five_seconds() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(3, 8 << 20);
    origin.add_object("big", "1", bytes, "video/mp4");
    let state = tempfile::tempdir().unwrap();
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.slice_bytes = 1 << 20;
    opts.extra = fill_section(state.path(), "max_bytes_per_sec = 2097152");
    let edge = Edge::start(opts).await;

    let started = Instant::now();
    let id = submit(&edge, r#"{"objects": [{"o": "big", "v": "1"}]}"#).await;
    let p = wait_job(&edge, &id, Duration::from_secs(15), finished).await;
    let took = started.elapsed().as_secs_f64();
    assert_eq!(p["state"], "done", "{p}");
    assert_eq!(p["bytes_done"], 8 << 20);
    // The first slice goes at once (a burst of one slice), the other 7 MiB at 2 MiB/s.
    assert!(took >= 3.0, "8 MiB filled in {took:.2} s at 2 MiB/s");
    assert!(took <= 5.0, "8 MiB filled in {took:.2} s at 2 MiB/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_its_window_a_job_waits_and_asks_the_origin_nothing() {
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "1", object_bytes(4, 300_000), "video/mp4");
    let state = tempfile::tempdir().unwrap();
    let edge = fill_edge(&origin, state.path(), &window_later()).await;

    let id = submit(&edge, r#"{"objects": [{"o": "movie", "v": "1"}]}"#).await;
    wait_job(&edge, &id, Duration::from_secs(10), |p| {
        p["state"] == "waiting_window"
    })
    .await;
    edge.wait_for_metric_exact(r#"cdn_edge_fill_jobs{state="waiting_window"}"#, 1.0)
        .await;
    // Nothing to wait for: give a stray request the time to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let p = progress(&edge, &id).await;
    assert_eq!(p["state"], "waiting_window", "{p}");
    assert_eq!(p["slices_done"], 0);
    assert_eq!(
        origin.requests(),
        0,
        "a job outside its window asked the origin"
    );
}

/// An edge with a disk tier filling a 32-slice movie at 512 KiB/s (4 s), once the job
/// has done `slices_done` slices.
struct SlowJob {
    origin: TestOrigin,
    bytes: Vec<u8>,
    edge: Edge,
    id: String,
    _dirs: [tempfile::TempDir; 2],
}

async fn slow_job(size: usize, slices_done: u64) -> SlowJob {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(size as u64, size);
    origin.add_object("movie", "1", bytes.clone(), "video/mp4");
    let state = tempfile::tempdir().unwrap();
    let disk = tempfile::tempdir().unwrap();
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.disk = Some((disk.path().to_path_buf(), 64 << 20));
    opts.extra = fill_section(state.path(), "max_bytes_per_sec = 524288");
    let edge = Edge::start(opts).await;
    let id = submit(&edge, r#"{"objects": [{"o": "movie", "v": "1"}]}"#).await;
    wait_job(&edge, &id, Duration::from_secs(10), |p| {
        p["slices_done"].as_u64() >= Some(slices_done)
    })
    .await;
    SlowJob {
        origin,
        bytes,
        edge,
        id,
        _dirs: [state, disk],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_midway_finishes_after_restart_with_every_slice_exact() {
    let size = 32 * SLICE as usize - 500;
    let SlowJob {
        origin,
        bytes,
        mut edge,
        id,
        _dirs,
    } = slow_job(size, 12).await;
    edge.kill().await;
    let before_kill = origin.requests();
    assert!(before_kill < 32, "the job ended before the kill");

    edge.restart().await;
    let p = wait_job(&edge, &id, Duration::from_secs(20), finished).await;
    assert_eq!(p["state"], "done", "{p}");
    assert_eq!(
        (&p["slices_done"], &p["slices_total"]),
        (&Value::from(32), &Value::from(32))
    );
    // Resumed, not started again: what reached the disk before the kill was not
    // fetched again.
    let fetched = origin.requests();
    assert!(
        fetched < before_kill + 32,
        "{fetched} origin requests: the job started over ({before_kill} before the kill)"
    );

    // Every slice: a hit, and the origin's bytes.
    for index in 0..32u64 {
        let a = (index * SLICE) as usize;
        let b = (a + SLICE as usize - 1).min(size - 1);
        let r = get_exact(&edge, "movie", "1", &bytes, a, b).await;
        assert_eq!(
            r.header("cache-status"),
            Some("cdn-edge; hit"),
            "slice {index}"
        );
    }
    assert_eq!(origin.requests(), fetched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_during_an_upgrade_is_finished_by_the_new_process() {
    let size = 32 * SLICE as usize;
    let SlowJob {
        origin,
        bytes,
        edge: mut old,
        id,
        _dirs,
    } = slow_job(size, 8).await;
    // The new process opens the jobs store once the old one hands it over.
    let new = old.upgrade().await;
    let p = wait_job(&new, &id, Duration::from_secs(20), finished).await;
    assert_eq!(p["state"], "done", "{p}");
    assert_eq!(p["slices_done"], 32);
    let fetched = origin.requests();
    assert!(
        fetched <= 32 + 4,
        "{fetched} origin requests: the job started over"
    );
    // Once the old process is gone, every request reaches the new one.
    old.wait_exit(Duration::from_secs(30)).await;
    assert!(old.log_text().contains("fill jobs handed over"));
    let r = get_exact(&new, "movie", "1", &bytes, 0, size - 1).await;
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_directed_site_each_node_fills_what_it_owns_while_client_misses_are_redirected() {
    let movie = object_bytes(6, SITE_OBJECT_SIZE);
    let other = object_bytes(7, 100_000);
    let origins = origins(3, &[("movie", "1", &movie), ("other", "1", &other)]).await;
    let states: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let opts: Vec<EdgeOptions> = origins
        .iter()
        .zip(&states)
        .map(|(origin, state)| {
            let mut o = site_options(origin);
            o.origin_extra =
                "mode = \"directed\"\nredirect_url = \"http://redirect.test/cdn\"".into();
            o.extra = fill_section(state.path(), "");
            o
        })
        .collect();
    let site = Site::start(ClusterOptions::default(), opts).await;
    let asked = |origins: &[TestOrigin]| origins.iter().map(TestOrigin::requests).sum::<u64>();

    // Directed: a client's miss is redirected, and nothing is pulled.
    let target = format!("/range/0-999?{}", signed("movie", "1"));
    let r = site[0].get(&target, &[]).await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(asked(&origins), 0);

    // The same manifest to every node: each fetches the slices it owns.
    let manifest = r#"{"objects": [{"o": "movie", "v": "1"}]}"#;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(submit(&site[i], manifest).await);
    }
    let n = slices(SITE_OBJECT_SIZE);
    for (i, id) in ids.iter().enumerate() {
        let p = wait_job(&site[i], id, Duration::from_secs(20), finished).await;
        let owned = (0..n).filter(|&k| site.owner("movie", "1", k) == i).count();
        assert_eq!(p["state"], "done", "node {i}: {p}");
        assert_eq!(p["slices_total"], owned as u64, "node {i}: {p}");
        assert_eq!(p["slices_done"], owned as u64, "node {i}: {p}");
    }
    let by_slice = fetched_by(&origins);
    for k in 0..n {
        let who = by_slice.get(&("movie".to_string(), "1".to_string(), k));
        assert_eq!(
            who,
            Some(&vec![site.owner("movie", "1", k)]),
            "slice {k}: fetched by the nodes {who:?}"
        );
    }
    assert_eq!(
        asked(&origins),
        n,
        "one origin request per slice, site-wide"
    );

    // Any node serves the whole object now (from its owners), without the origin.
    for i in 0..3 {
        let last = SITE_OBJECT_SIZE - 1;
        get_exact(&site[i], "movie", "1", &movie, 0, last).await;
    }
    assert_eq!(asked(&origins), n);
    // And what was not filled is still redirected.
    let r = site[1]
        .get(&format!("/range/0-99?{}", signed("other", "1")), &[])
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location")
            .map(|l| l.starts_with("http://redirect.test/cdn/")),
        Some(true)
    );
    assert_eq!(asked(&origins), n);
}

/// `cdn-edge fill ARGS` with the admin listener of `edge`; (exit code, stdout, stderr).
async fn fill_command(admin: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdn-edge"));
    cmd.arg("fill")
        .arg("--admin")
        .arg(admin.to_string())
        .args(args)
        .env_remove("CDN_EDGE_ADMIN_TOKEN");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fill_command_prints_progress_until_the_job_ends() {
    let origin = TestOrigin::start().await;
    origin.add_object(
        "movie",
        "1",
        object_bytes(8, 20 * SLICE as usize),
        "video/mp4",
    );
    let state = tempfile::tempdir().unwrap();
    // 20 slices at 2 MiB/s: about half a second, so progress shows more than once.
    let edge = fill_edge(&origin, state.path(), "max_bytes_per_sec = 2097152").await;
    let files = tempfile::tempdir().unwrap();
    let manifest = files.path().join("manifest.json");
    std::fs::write(&manifest, r#"{"objects": [{"o": "movie", "v": "1"}]}"#).unwrap();
    let missing = files.path().join("missing.json");
    std::fs::write(&missing, r#"{"objects": [{"o": "nothing", "v": "1"}]}"#).unwrap();
    let manifest = manifest.to_str().unwrap();

    let (code, out, err) =
        fill_command(edge.admin, &["--manifest", manifest, "--token", TOKEN]).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let last = out.lines().last().unwrap_or_default();
    assert_eq!(
        last, "fill 1: done: 20/20 slices, 1.25 MiB fetched, 0 errors",
        "stdout:\n{out}"
    );
    assert!(
        !out.contains('\u{1b}'),
        "no terminal codes when stdout is not one:\n{out}"
    );

    // A job that fails: status 1, and why.
    let (code, out, err) = fill_command(
        edge.admin,
        &["--manifest", missing.to_str().unwrap(), "--token", TOKEN],
    )
    .await;
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("fill 2: failed: 0/0 slices"), "{out}");
    assert!(err.contains("fill job 2 failed"), "{err}");

    // --no-wait: the id alone.
    let (code, out, _) = fill_command(
        edge.admin,
        &["--manifest", manifest, "--token", TOKEN, "--no-wait"],
    )
    .await;
    assert_eq!((code, out.trim()), (0, "3"));

    // Refused and unreachable: status 2 and a message an operator can act on.
    let (code, _, err) = fill_command(
        edge.admin,
        &["--manifest", manifest, "--token", "wrong-token-0123456789"],
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = fill_command(
        support::origin::dead_addr(),
        &["--manifest", manifest, "--token", TOKEN],
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("cannot reach"), "{err}");
    let (code, _, err) = fill_command(edge.admin, &["--manifest", "/nonexistent.json"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent.json"), "{err}");
}
