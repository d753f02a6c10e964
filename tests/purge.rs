//! `POST /purge` on one edge (SPEC 7): the next request is a miss with the origin's
//! bytes, one version or every version, memory and disk tiers (across a restart too),
//! the admin token and bad bodies, a fill in flight when the purge arrives, and the
//! `cdn-edge purge` command.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::client::{self, Response};
use support::edge::{signed, Edge, EdgeOptions};
use support::origin::{dead_addr, TestOrigin};
use support::{object_bytes, slice_files};

const SLICE: usize = 64 * 1024;
/// Three slices, the last one short.
const SIZE: usize = 3 * SLICE - 1_000;
const TOKEN: &str = "purge-test-admin-token";

fn opts(origin: &TestOrigin, disk: Option<&Path>) -> EdgeOptions {
    let mut o = EdgeOptions::new(vec![origin.url()]);
    o.disk = disk.map(|d| (d.to_path_buf(), 1 << 30));
    // Origin requests are counted exactly: no metadata re-check may fall due.
    o.meta_ttl_secs = Some(3600);
    o.extra = format!("[admin]\ntoken = \"{TOKEN}\"\n");
    o
}

/// The whole object (o, v), checked: 200 and exactly `bytes`.
async fn get_whole(edge: &Edge, o: &str, v: &str, bytes: &[u8]) -> Response {
    let r = edge.get(&format!("/?{}", signed(o, v)), &[]).await;
    assert_eq!(r.status, 200, "{o}/{v}: {}", r.text());
    assert!(
        r.complete && r.body == bytes,
        "{o}/{v}: not the origin's bytes"
    );
    r
}

fn cache_status(r: &Response) -> &str {
    r.header("cache-status").unwrap_or_default()
}

/// `POST /purge` with `body` and the admin token; status and JSON answer.
async fn purge(edge: &Edge, body: &str) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {TOKEN}");
    let r = client::post(
        edge.admin,
        "/purge",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await;
    let json =
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()));
    (r.status, json)
}

/// `(slices, bytes)` of an answer of `POST /purge`.
fn counts(answer: &serde_json::Value) -> (u64, u64) {
    (
        answer["slices"].as_u64().expect("slices"),
        answer["bytes"].as_u64().expect("bytes"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_purge_the_next_request_is_a_miss_with_the_origins_new_bytes() {
    let origin = TestOrigin::start().await;
    let old = object_bytes(1, SIZE);
    origin.add_object("movie", "1", old.clone(), "video/mp4");
    let edge = Edge::start(opts(&origin, None)).await;

    get_whole(&edge, "movie", "1", &old).await;
    let hit = get_whole(&edge, "movie", "1", &old).await;
    assert_eq!(cache_status(&hit), "cdn-edge; hit");
    assert_eq!(origin.requests(), 3);

    // The origin's object is replaced (same size, other bytes): only a purge shows it.
    let new = object_bytes(2, SIZE);
    origin.add_object("movie", "1", new.clone(), "video/mp4");
    let (status, answer) = purge(&edge, r#"{"o": "movie", "v": "1"}"#).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(counts(&answer), (3, SIZE as u64));
    assert_eq!(answer["peers"], serde_json::json!({}));

    let after = get_whole(&edge, "movie", "1", &new).await;
    assert_eq!(cache_status(&after), "cdn-edge; fwd=miss");
    assert_eq!(origin.requests(), 6, "every slice fetched again");
    assert_eq!(
        edge.metric("cdn_edge_purges_total{result=\"ok\"}").await,
        1.0
    );
    assert_eq!(
        edge.metric("cdn_edge_purged_bytes_total").await,
        SIZE as f64
    );
    // Purging what is not cached removes nothing, and is no error.
    let (status, answer) = purge(&edge, r#"{"o": "nothing"}"#).await;
    assert_eq!((status, counts(&answer)), (200, (0, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_of_one_version_leaves_the_others_and_one_of_every_version_takes_them_all() {
    let origin = TestOrigin::start().await;
    let objects = [("movie", "1", 11), ("movie", "2", 12), ("show", "1", 13)];
    let bytes: Vec<Vec<u8>> = objects
        .iter()
        .map(|&(o, v, seed)| {
            let b = object_bytes(seed, SIZE);
            origin.add_object(o, v, b.clone(), "video/mp4");
            b
        })
        .collect();
    let edge = Edge::start(opts(&origin, None)).await;
    for ((o, v, _), b) in objects.iter().zip(&bytes) {
        get_whole(&edge, o, v, b).await;
    }
    let status_of = |i: usize| {
        let (o, v, _) = objects[i];
        let (edge, b) = (&edge, &bytes[i]);
        async move { cache_status(&get_whole(edge, o, v, b).await).to_string() }
    };

    let (_, answer) = purge(&edge, r#"{"o": "movie", "v": "1"}"#).await;
    assert_eq!(counts(&answer), (3, SIZE as u64));
    assert_eq!(status_of(1).await, "cdn-edge; hit", "another version stays");
    assert_eq!(status_of(2).await, "cdn-edge; hit", "another object stays");
    assert_eq!(status_of(0).await, "cdn-edge; fwd=miss");

    let (_, answer) = purge(&edge, r#"{"o": "movie"}"#).await;
    assert_eq!(counts(&answer), (6, 2 * SIZE as u64), "both versions");
    assert_eq!(status_of(0).await, "cdn-edge; fwd=miss");
    assert_eq!(status_of(1).await, "cdn-edge; fwd=miss");
    assert_eq!(status_of(2).await, "cdn-edge; hit");
    assert_eq!(origin.requests(), 9 + 3 + 3 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_slices_are_purged_and_a_purged_file_is_never_served_after_a_restart() {
    let origin = TestOrigin::start().await;
    let old = object_bytes(21, SIZE);
    origin.add_object("movie", "1", old.clone(), "video/mp4");
    let dir = tempfile::tempdir().unwrap();
    let mut edge = Edge::start(opts(&origin, Some(dir.path()))).await;
    get_whole(&edge, "movie", "1", &old).await;
    edge.wait_for_metric("cdn_edge_disk_writes_total", 3.0)
        .await;

    // Keep the files as they were, to put them back after the purge: what a sweep that
    // missed them (or a backup restored over the cache) would leave.
    let kept = tempfile::tempdir().unwrap();
    let files: Vec<(PathBuf, PathBuf)> = slice_files(dir.path())
        .into_iter()
        .map(|f| {
            let copy = kept.path().join(f.file_name().unwrap());
            std::fs::copy(&f, &copy).unwrap();
            (f, copy)
        })
        .collect();
    assert_eq!(files.len(), 3);

    let new = object_bytes(22, SIZE);
    origin.add_object("movie", "1", new.clone(), "video/mp4");
    let (status, answer) = purge(&edge, r#"{"o": "movie", "v": "1"}"#).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        counts(&answer),
        (3, SIZE as u64),
        "held in memory and on disk: each slice counted once"
    );
    assert!(slice_files(dir.path()).is_empty(), "the files are deleted");

    for (file, copy) in &files {
        std::fs::copy(copy, file).unwrap();
    }
    edge.restart().await;
    let after = get_whole(&edge, "movie", "1", &new).await;
    assert_eq!(cache_status(&after), "cdn-edge; fwd=miss");
    assert_eq!(origin.requests(), 6, "every slice fetched again");
    edge.wait_for_metric("cdn_edge_purged_slices_total", 3.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_of_every_version_finds_disk_slices_after_a_restart() {
    let origin = TestOrigin::start().await;
    let (a, b) = (object_bytes(31, SIZE), object_bytes(32, SLICE));
    origin.add_object("movie", "1", a.clone(), "video/mp4");
    origin.add_object("movie", "2", b.clone(), "video/mp4");
    let dir = tempfile::tempdir().unwrap();
    let mut edge = Edge::start(opts(&origin, Some(dir.path()))).await;
    get_whole(&edge, "movie", "1", &a).await;
    get_whole(&edge, "movie", "2", &b).await;
    edge.wait_for_metric("cdn_edge_disk_writes_total", 4.0)
        .await;

    // Nothing in memory now: the versions are known from the files alone.
    edge.restart().await;
    edge.wait_for_metric("cdn_edge_disk_index_ready", 1.0).await;
    let (status, answer) = purge(&edge, r#"{"o": "movie"}"#).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(counts(&answer), (4, (SIZE + SLICE) as u64));
    assert!(slice_files(dir.path()).is_empty());
    let requests = origin.requests();
    get_whole(&edge, "movie", "2", &b).await;
    assert_eq!(origin.requests(), requests + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_needs_the_admin_token_and_a_valid_body() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(41, SIZE);
    origin.add_object("movie", "1", bytes.clone(), "video/mp4");
    let edge = Edge::start(opts(&origin, None)).await;
    get_whole(&edge, "movie", "1", &bytes).await;

    let body = br#"{"o": "movie", "v": "1"}"#;
    let json = ("Content-Type", "application/json");
    let no_token = client::post(edge.admin, "/purge", &[json], body).await;
    assert_eq!(no_token.status, 401, "{}", no_token.text());
    assert!(no_token.header("www-authenticate").is_some());
    let wrong = client::post(
        edge.admin,
        "/purge",
        &[json, ("Authorization", "Bearer not-the-admin-token")],
        body,
    )
    .await;
    assert_eq!(wrong.status, 401);
    let auth = format!("Bearer {TOKEN}");
    let get = client::get(edge.admin, "/purge", &[("Authorization", auth.as_str())]).await;
    assert_eq!((get.status, get.header("allow")), (405, Some("POST")));

    for (body, names) in [
        ("", "invalid JSON"),
        ("{", "invalid JSON"),
        (r#"{"v": "1"}"#, "`o`"),
        (r#"{"o": 7}"#, "o"),
        (r#"{"o": "../etc"}"#, "o: not a valid id"),
        (r#"{"o": "movie", "v": "a/b"}"#, "v: not a valid id"),
        (r#"{"o": "movie", "x": 1}"#, "`x`"),
    ] {
        let (status, answer) = purge(&edge, body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(names), "{body}: {error}");
    }
    let hit = get_whole(&edge, "movie", "1", &bytes).await;
    assert_eq!(cache_status(&hit), "cdn-edge; hit", "nothing was purged");

    // No admin.token configured: the endpoint is off.
    let mut no_admin = opts(&origin, None);
    no_admin.extra.clear();
    let off = Edge::start(no_admin).await;
    let r = client::post(
        off.admin,
        "/purge",
        &[json, ("Authorization", auth.as_str())],
        body,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
}

/// Waits (bounded) until the origin has received `n` requests.
async fn origin_requests_reach(origin: &TestOrigin, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.requests() < n {
        assert!(Instant::now() < deadline, "the origin was not asked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_in_flight_when_its_object_is_purged_is_served_but_cached_nowhere() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(51, SIZE);
    origin.add_object("movie", "1", bytes.clone(), "video/mp4");
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(opts(&origin, Some(dir.path()))).await;
    let target = format!("/range/100-5099?{}", signed("movie", "1"));

    origin.hold();
    let in_flight = tokio::spawn({
        let (http, target) = (edge.http, target.clone());
        async move { client::get(http, &target, &[]).await }
    });
    origin_requests_reach(&origin, 1).await;
    let (status, answer) = purge(&edge, r#"{"o": "movie", "v": "1"}"#).await;
    assert_eq!(
        (status, counts(&answer)),
        (200, (0, 0)),
        "nothing cached yet"
    );
    origin.release();

    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.body == bytes[100..5100],
        "the waiting request gets its bytes"
    );

    // Neither tier kept it: the next request asks the origin again.
    let again = edge.get(&target, &[]).await;
    assert!(again.body == bytes[100..5100]);
    assert_eq!(cache_status(&again), "cdn-edge; fwd=miss");
    assert_eq!(origin.requests(), 2);
    assert_eq!(
        edge.metric("cdn_edge_purge_discarded_fills_total").await,
        1.0
    );
    // Writes are in order: once the fresh fill is written, the purged one was dropped.
    edge.wait_for_metric("cdn_edge_disk_writes_total", 1.0)
        .await;
    assert_eq!(edge.metric("cdn_edge_disk_writes_total").await, 1.0);
    assert_eq!(slice_files(dir.path()).len(), 1);
    let hit = edge.get(&target, &[]).await;
    assert_eq!(
        cache_status(&hit),
        "cdn-edge; hit",
        "what came after the purge is kept"
    );
}

/// Runs `cdn-edge purge ARGS` (off the async runtime); exit code, stdout, stderr.
async fn cli(args: &[&str], token_env: Option<&str>) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let token_env = token_env.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdn-edge"));
        cmd.arg("purge")
            .args(&args)
            .env_remove("CDN_EDGE_ADMIN_TOKEN");
        if let Some(t) = token_env {
            cmd.env("CDN_EDGE_ADMIN_TOKEN", t);
        }
        let out = cmd.output().expect("run cdn-edge");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_command_prints_each_nodes_result_and_clear_errors() {
    let origin = TestOrigin::start().await;
    let bytes = object_bytes(61, SIZE);
    origin.add_object("movie", "1", bytes.clone(), "video/mp4");
    let edge = Edge::start(opts(&origin, None)).await;
    get_whole(&edge, "movie", "1", &bytes).await;
    let admin = edge.admin.to_string();

    let (code, out, err) = cli(
        &[
            "--object",
            "movie",
            "--version",
            "1",
            "--admin",
            &admin,
            "--token",
            TOKEN,
        ],
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("purged movie version 1\n  {admin} (this edge): 3 slices, {SIZE} bytes\n")
    );
    let miss = get_whole(&edge, "movie", "1", &bytes).await;
    assert_eq!(cache_status(&miss), "cdn-edge; fwd=miss");

    // The token from the environment; every version.
    let (code, out, err) = cli(&["--object", "movie", "--admin", &admin], Some(TOKEN)).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("purged movie (every version)\n"), "{out}");

    let (code, _, err) = cli(
        &[
            "--object",
            "movie",
            "--admin",
            &admin,
            "--token",
            "wrong-token-wrong",
        ],
        None,
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("401") && err.contains("--token"), "{err}");

    let (code, _, err) = cli(
        &["--object", "../x", "--admin", &admin, "--token", TOKEN],
        None,
    )
    .await;
    assert_eq!(code, 2);
    assert!(
        err.contains("400") && err.contains("o: not a valid id"),
        "{err}"
    );

    let dead = dead_addr().to_string();
    let (code, _, err) = cli(
        &["--object", "movie", "--admin", &dead, "--token", TOKEN],
        None,
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("cannot reach") && err.contains(&dead), "{err}");
}
