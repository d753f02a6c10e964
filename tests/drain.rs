//! Drain and the admin token (SPEC 7): the mutating admin endpoints need the token,
//! the read-only ones stay open; a drained node says so on `/healthz` and `/status`
//! while it serves every request, also after an upgrade hand-over; and the
//! `cdn-edge drain on|off` command.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::client;
use support::edge::{signed, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::{dead_addr, TestOrigin};

const TOKEN: &str = "drain-test-token-0123456789";
const OBJECT: usize = 500_000;

async fn origin_with_object() -> TestOrigin {
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "1", object_bytes(9, OBJECT), "video/mp4");
    origin
}

fn with_token(origin: &TestOrigin) -> EdgeOptions {
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.extra = format!("[admin]\ntoken = \"{TOKEN}\"\n");
    opts
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `method path` on the admin listener with this `Authorization` (if any).
async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> client::Response {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    client::request(addr, method, path, &headers).await
}

async fn status(edge: &Edge) -> Value {
    let r = client::get(edge.admin, "/status", &[]).await;
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).unwrap()
}

/// `/healthz`: status and body.
async fn healthz(edge: &Edge) -> (u16, String) {
    let r = client::get(edge.admin, "/healthz", &[]).await;
    (r.status, r.text())
}

/// Every mutating admin endpoint, with a method it accepts.
const MUTATING: [(&str, &str); 5] = [
    ("POST", "/drain"),
    ("DELETE", "/drain"),
    ("POST", "/purge"),
    ("POST", "/fill"),
    ("GET", "/fill/1"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_endpoints_need_the_token_and_read_only_ones_stay_open() {
    let origin = origin_with_object().await;
    let edge = Edge::start(with_token(&origin)).await;
    let wrong = bearer("drain-test-token-012345678X");
    let right = bearer(TOKEN);
    for (method, path) in MUTATING {
        for auth in [None, Some(wrong.as_str()), Some(TOKEN)] {
            let r = admin(edge.admin, method, path, auth).await;
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.text());
            assert!(r.header("www-authenticate").is_some());
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert!(body["error"].as_str().unwrap().contains("token"), "{body}");
        }
    }
    assert!(!status(&edge).await["draining"].as_bool().unwrap());

    // Read-only endpoints answer without a token, and only GET and HEAD.
    for path in ["/metrics", "/healthz", "/status"] {
        assert_eq!(admin(edge.admin, "GET", path, None).await.status, 200);
        assert_eq!(admin(edge.admin, "HEAD", path, None).await.status, 200);
        for method in ["POST", "DELETE", "PUT"] {
            let r = admin(edge.admin, method, path, Some(&right)).await;
            assert_eq!(r.status, 405, "{method} {path}");
        }
    }
    // Wrong methods on the mutating endpoints, with the token: 405 and what is allowed.
    for (method, path, allow) in [
        ("GET", "/drain", "POST, DELETE"),
        ("PUT", "/drain", "POST, DELETE"),
        ("GET", "/purge", "POST"),
        ("DELETE", "/fill", "POST"),
        ("POST", "/fill/1", "GET"),
    ] {
        let r = admin(edge.admin, method, path, Some(&right)).await;
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }

    // An edge with no admin.token: the mutating endpoints are off, whatever is sent.
    let tokenless = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    for (method, path) in MUTATING {
        for auth in [None, Some(right.as_str())] {
            let r = admin(tokenless.admin, method, path, auth).await;
            assert_eq!(r.status, 403, "{method} {path} with {auth:?}: {}", r.text());
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert!(
                body["error"].as_str().unwrap().contains("admin.token"),
                "{body}"
            );
        }
    }
    assert_eq!(healthz(&tokenless).await.0, 200);
}

/// Range requests one after another on fresh connections until told to stop: how many
/// were answered 200 with the right bytes, and the others.
fn players(
    http: SocketAddr,
    q: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    let expected = object_bytes(9, OBJECT);
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        let mut i = 0usize;
        while !*stop.borrow() && i < 200_000 {
            let start = (i * 7_919) % (OBJECT - 10_000);
            let target = format!("/range/{start}-{}?{q}", start + 9_999);
            let r = client::get(http, &target, &[]).await;
            if r.status == 200 && r.body == expected[start..start + 10_000] {
                ok += 1;
            } else {
                failed.push(format!("{target}: {}", r.status));
            }
            i += 1;
        }
        (ok, failed)
    })
}

const RANGES_200: &str = r#"cdn_edge_requests_total{route="range",status="200"}"#;

/// Waits (bounded) until `edge` has answered `n` more range requests than `from`.
async fn wait_for_ranges(edge: &Edge, from: f64, n: f64) {
    edge.wait_for_metric(RANGES_200, from + n).await;
}

/// Turns draining on (`POST /drain`) or off (`DELETE`), and checks the answer,
/// `/healthz`, `/status` and `cdn_edge_draining`.
async fn set_drain(edge: &Edge, on: bool) {
    let method = if on { "POST" } else { "DELETE" };
    let r = admin(edge.admin, method, "/drain", Some(&bearer(TOKEN))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["draining"], on);
    let health = if on {
        (503, "draining\n")
    } else {
        (200, "ok\n")
    };
    assert_eq!(healthz(edge).await, (health.0, health.1.to_string()));
    assert_eq!(status(edge).await["draining"], on);
    assert_eq!(
        edge.metric("cdn_edge_draining").await,
        if on { 1.0 } else { 0.0 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_says_so_and_serves_every_request() {
    let origin = origin_with_object().await;
    let edge = Edge::start(with_token(&origin)).await;
    let right = bearer(TOKEN);
    assert_eq!(healthz(&edge).await, (200, "ok\n".to_string()));
    assert_eq!(edge.metric("cdn_edge_draining").await, 0.0);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let traffic = players(edge.http, signed("movie", "1"), stop_rx);
    wait_for_ranges(&edge, 0.0, 20.0).await;

    set_drain(&edge, true).await;
    // Draining twice is draining.
    assert_eq!(
        admin(edge.admin, "POST", "/drain", Some(&right))
            .await
            .status,
        200
    );
    // Requests go on being served while drained.
    let served = edge.metric(RANGES_200).await;
    wait_for_ranges(&edge, served, 20.0).await;

    set_drain(&edge, false).await;
    let served = edge.metric(RANGES_200).await;
    wait_for_ranges(&edge, served, 5.0).await;

    stop_tx.send(true).unwrap();
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 45, "only {ok} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_survives_an_upgrade_hand_over() {
    let origin = origin_with_object().await;
    let mut opts = with_token(&origin);
    opts.grace_period_secs = 1;
    let mut old = Edge::start(opts).await;
    let right = bearer(TOKEN);
    assert_eq!(
        admin(old.admin, "POST", "/drain", Some(&right))
            .await
            .status,
        200
    );

    let new = old.upgrade().await;
    old.wait_exit(Duration::from_secs(30)).await;
    // Only the new process answers now.
    assert_eq!(healthz(&new).await, (503, "draining\n".to_string()));
    assert_eq!(status(&new).await["draining"], true);
    assert_eq!(new.metric("cdn_edge_draining").await, 1.0);
    let r = new
        .get(&format!("/range/0-999?{}", signed("movie", "1")), &[])
        .await;
    assert_eq!(r.status, 200);

    // And undrains as usual.
    assert_eq!(
        admin(new.admin, "DELETE", "/drain", Some(&right))
            .await
            .status,
        200
    );
    assert_eq!(healthz(&new).await, (200, "ok\n".to_string()));
}

/// `cdn-edge drain <state> --admin <addr>` with these extra arguments and environment;
/// returns (success, stdout, stderr).
fn drain_cli(
    state: &str,
    addr: SocketAddr,
    args: &[&str],
    env: Option<&str>,
) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdn-edge"));
    cmd.args(["drain", state, "--admin", &addr.to_string()])
        .args(args);
    match env {
        Some(token) => cmd.env("CDN_EDGE_ADMIN_TOKEN", token),
        None => cmd.env_remove("CDN_EDGE_ADMIN_TOKEN"),
    };
    let out = cmd.output().expect("run cdn-edge");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_command_turns_draining_on_and_off_with_clear_errors() {
    let origin = origin_with_object().await;
    let edge = Edge::start(with_token(&origin)).await;
    let addr = edge.admin;

    let (ok, out, err) = drain_cli("on", addr, &["--token", TOKEN], None);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "draining: /healthz answers 503; requests are still served"
    );
    assert_eq!(healthz(&edge).await.0, 503);

    // The token from the environment.
    let (ok, out, err) = drain_cli("off", addr, &[], Some(TOKEN));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "not draining: /healthz answers 200");
    assert_eq!(healthz(&edge).await.0, 200);

    for (args, env) in [
        (vec!["--token", "drain-test-token-wrong"], None),
        (vec![], Some("drain-test-token-wrong")),
        (vec![], None),
    ] {
        let (ok, out, err) = drain_cli("on", addr, &args, env);
        assert!(!ok && out.is_empty(), "{args:?} {env:?}: {out}");
        assert!(
            err.contains("the token was refused (401)") && err.contains("CDN_EDGE_ADMIN_TOKEN"),
            "{err}"
        );
    }
    assert_eq!(healthz(&edge).await.0, 200);

    let tokenless = Edge::start(EdgeOptions::new(vec![origin.url()])).await;
    let (ok, _, err) = drain_cli("on", tokenless.admin, &["--token", TOKEN], None);
    assert!(!ok);
    assert!(
        err.contains("admin endpoints are off on this edge (403)"),
        "{err}"
    );

    let gone = dead_addr();
    let started = Instant::now();
    let (ok, _, err) = drain_cli("on", gone, &["--token", TOKEN], None);
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot reach the edge's admin listener at {gone}")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
