//! Prometheus for real (SPEC §3): the exposition passes `promtool check metrics`, a
//! Prometheus server scrapes the admin listener and counts exactly the requests sent,
//! and the shipped scrape config, rules and Grafana dashboard only use series the edge
//! exports.
//!
//! Needs `prometheus` and `promtool` on PATH (Debian's `prometheus` package, which
//! `./dev setup` installs). Without them these tests fail and say so.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;
use support::edge::{signed, Edge, EdgeOptions};
use support::origin::{dead_addr, TestOrigin};
use support::site::ClusterOptions;

const SCRAPE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/prometheus.yml");
const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/cdn-edge-rules.yml");
const RULES_TEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/prometheus/cdn-edge-rules.test.yml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conf/grafana/cdn-edge-dashboard.json"
);

/// Signed range requests sent; Prometheus must count exactly these.
const RANGE_REQUESTS: u64 = 25;
/// Requests for the whole object with a bad signature (403 on the object route).
const AUTH_FAILURES: u64 = 3;
const OBJECT_BYTES: usize = 200_000;

/// How long Prometheus may take to start, scrape, or evaluate a rule.
const PROMETHEUS_DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// Fails the test with an install hint when `tool` is not on PATH.
fn require(tool: &str) {
    match Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{tool}` is not installed: these tests need Debian's `prometheus` package \
             (run `./dev setup`, or `apt-get install --no-install-recommends prometheus`)"
        ),
        Err(e) => panic!("cannot run `{tool}`: {e}"),
    }
}

/// Runs `promtool` with `args` (and `stdin`); returns whether it succeeded and its
/// stdout and stderr together.
fn promtool(args: &[&str], stdin: &[u8]) -> (bool, String) {
    require("promtool");
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// An edge with every metric family present: a test origin with one object, and a
/// `[forward]` section (spool gauges) whose upstreams are closed ports.
struct Site {
    edge: Edge,
    _origin: TestOrigin,
    _spool: tempfile::TempDir,
}

async fn start_site() -> Site {
    let origin = TestOrigin::start().await;
    origin.add_object(
        "m",
        "1",
        support::object_bytes(7, OBJECT_BYTES),
        "video/mp4",
    );
    let spool = tempfile::tempdir().unwrap();
    let upstream = format!("http://{}", dead_addr());
    let mut opts = EdgeOptions::new(vec![origin.url()]);
    opts.extra = format!(
        "[forward]\nspool_dir = {:?}\nevents = \"{upstream}\"\nlogblob = \"{upstream}\"\nstats = \"{upstream}\"\n",
        spool.path().display().to_string()
    );
    // A site of one node: the site's series (peers, parents) are exported too.
    let mut site = support::site::Site::start(ClusterOptions::default(), vec![opts]).await;
    let edge = site.nodes.remove(0);
    Site {
        edge,
        _origin: origin,
        _spool: spool,
    }
}

/// Sends `RANGE_REQUESTS` signed ranges spread over the object (misses, then hits),
/// `AUTH_FAILURES` badly signed object requests and one stats post, and waits until
/// the edge has counted them all.
async fn send_traffic(edge: &Edge) {
    let q = signed("m", "1");
    for i in 0..RANGE_REQUESTS {
        let start = (i as usize * 7_919) % OBJECT_BYTES;
        let r = edge
            .get(&format!("/range/{start}-{}?{q}", start + 999), &[])
            .await;
        assert_eq!(r.status, 200, "range request {i}: {}", r.text());
    }
    let forged = q.replacen("o=m&", "o=x&", 1);
    assert_ne!(forged, q);
    for _ in 0..AUTH_FAILURES {
        assert_eq!(edge.get(&format!("/?{forged}"), &[]).await.status, 403);
    }
    let stats = support::client::post(edge.http, "/stats", &[], b"{}").await;
    assert_eq!(stats.status, 200);

    // Requests are counted after their answer is sent: wait for the counters.
    for (series, value) in [
        (
            r#"cdn_edge_requests_total{route="range",status="200"}"#,
            RANGE_REQUESTS,
        ),
        (
            r#"cdn_edge_requests_total{route="object",status="403"}"#,
            AUTH_FAILURES,
        ),
        (
            r#"cdn_edge_auth_failures_total{reason="bad_signature"}"#,
            AUTH_FAILURES,
        ),
        (r#"cdn_edge_requests_total{route="stats",status="200"}"#, 1),
        (
            r#"cdn_edge_forwarded_total{result="queued",route="stats"}"#,
            1,
        ),
    ] {
        edge.wait_for_metric(series, value as f64).await;
    }
}

/// A Prometheus server on a free loopback port with its config and storage in a
/// temporary directory. Killed on drop, also when a test panics.
struct PrometheusServer {
    addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Starts Prometheus scraping `target` (job `cdn-edge`) every second and evaluating
    /// `rule_file` every second; waits until it is ready.
    async fn start(target: SocketAddr, rule_file: &str) -> Self {
        require("prometheus");
        // A port picked here can be taken before Prometheus binds it: it then exits at
        // once, and we try a fresh port.
        for _ in 0..5 {
            if let Some(server) = Self::try_start(target, rule_file).await {
                return server;
            }
        }
        panic!("Prometheus did not start after 5 attempts");
    }

    async fn try_start(target: SocketAddr, rule_file: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let addr = dead_addr();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rule_file:?}\n\
                 scrape_configs:\n  - job_name: cdn-edge\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn prometheus");
        let mut server = PrometheusServer { addr, child, dir };
        let deadline = Instant::now() + PROMETHEUS_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = server.log();
                assert!(
                    log.contains("address already in use"),
                    "prometheus exited ({status}); log:\n{log}"
                );
                return None;
            }
            if matches!(server.get("/-/ready").await, Some((200, _))) {
                return Some(server);
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "prometheus not ready after {PROMETHEUS_DEADLINE:?}; log:\n{}",
            server.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET target` over HTTP/1.0 (so the body is never chunked); `None` when nothing
    /// answers.
    async fn get(&self, target: &str) -> Option<(u16, String)> {
        let req = format!("GET {target} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let raw = support::client::send_raw(self.addr, req.as_bytes())
            .await
            .ok()?;
        let r = support::client::parse(&raw, false)?;
        Some((r.status, r.text()))
    }

    /// The result vector of an instant query, as `(labels, value)`; panics with the
    /// error when Prometheus refuses the query.
    async fn query(&self, promql: &str) -> Vec<(Value, String)> {
        let target = format!(
            "/api/v1/query?query={}",
            utf8_percent_encode(promql, NON_ALPHANUMERIC)
        );
        let (status, body) = self
            .get(&target)
            .await
            .unwrap_or_else(|| panic!("no answer from prometheus; log:\n{}", self.log()));
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("query {promql}: {e} in {body:?}"));
        assert!(
            status == 200 && json["status"] == "success",
            "query {promql} failed ({status}): {body}"
        );
        assert_eq!(json["data"]["resultType"], "vector", "query {promql}");
        json["data"]["result"]
            .as_array()
            .expect("result array")
            .iter()
            .map(|s| {
                (
                    s["metric"].clone(),
                    s["value"][1].as_str().expect("sample value").to_string(),
                )
            })
            .collect()
    }

    /// The value of a query that returns at most one series (`None` when it returns none).
    async fn scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await;
        assert!(result.len() <= 1, "{promql} returned {result:?}");
        result
            .first()
            .map(|(_, v)| v.parse().expect("numeric sample"))
    }

    /// Polls `promql` until it returns at least one series, and returns them.
    async fn wait_for_series(&self, promql: &str) -> Vec<(Value, String)> {
        let deadline = Instant::now() + PROMETHEUS_DEADLINE;
        loop {
            let result = self.query(promql).await;
            if !result.is_empty() {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "{promql} found nothing after {PROMETHEUS_DEADLINE:?}; prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls `promql` until it returns `want`; fails at once if it goes past it.
    async fn wait_for(&self, promql: &str, want: f64) {
        let deadline = Instant::now() + PROMETHEUS_DEADLINE;
        loop {
            let got = self.scalar(promql).await;
            if got == Some(want) {
                return;
            }
            if let Some(v) = got {
                assert!(v < want, "{promql} = {v}, more than {want}");
            }
            assert!(
                Instant::now() < deadline,
                "{promql} = {got:?} after {PROMETHEUS_DEADLINE:?}, expected {want}; prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Series names the exposition allows a query to use: each family's name, or for a
/// histogram its `_bucket`, `_sum` and `_count` series.
fn exported_series(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE name kind");
            match kind {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_string()],
            }
        })
        .collect()
}

/// Every `cdn_edge_*` metric name in `text`, skipping names inside recording-rule
/// names such as `instance:cdn_edge_origin_offload:rate5m`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices("cdn_edge_")
        .filter(|(i, _)| {
            !text[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| is_name(c) || c == ':')
        })
        .map(|(i, _)| text[i..].chars().take_while(|c| is_name(*c)).collect())
        .collect()
}

/// The names recorded by `record:` rules in a rules file.
fn recorded_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Every PromQL expression in the dashboard: panel targets and query variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("target expr").to_string());
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if var["type"] == "query" {
            out.push(var["query"]["query"].as_str().expect("query").to_string());
        }
    }
    out
}

/// A dashboard query with its variables set as for one job and every instance.
fn with_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$job", "cdn-edge")
        .replace("$instance", ".+")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exposition_passes_promtool_check_metrics() {
    let site = start_site().await;
    send_traffic(&site.edge).await;
    let metrics = support::client::get(site.edge.admin, "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    let (ok, output) = promtool(&["check", "metrics"], &metrics.body);
    // Lint warnings count as failures: promtool prints nothing for a clean exposition.
    assert!(
        ok && output.trim().is_empty(),
        "promtool check metrics:\n{output}\nexposition:\n{}",
        metrics.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_admin_listener_and_counts_every_range_request() {
    let site = start_site().await;
    let prometheus = PrometheusServer::start(site.edge.admin, RULES).await;
    // One scrape before any traffic, so the counters are seen moving.
    prometheus.wait_for(r#"up{job="cdn-edge"}"#, 1.0).await;

    send_traffic(&site.edge).await;
    prometheus
        .wait_for(
            r#"sum(cdn_edge_requests_total{route="range"})"#,
            RANGE_REQUESTS as f64,
        )
        .await;
    // The edge had counted everything before the scrape that showed the range count.
    for (promql, want) in [
        (
            r#"sum(cdn_edge_requests_total{route="range",status="200"})"#,
            RANGE_REQUESTS,
        ),
        (
            r#"sum(cdn_edge_requests_total{route="object",status="403"})"#,
            AUTH_FAILURES,
        ),
        (
            r#"sum(cdn_edge_auth_failures_total{reason="bad_signature"})"#,
            AUTH_FAILURES,
        ),
        ("sum(cdn_edge_auth_failures_total)", AUTH_FAILURES),
        (
            r#"sum(cdn_edge_request_duration_seconds_count{route="range"})"#,
            RANGE_REQUESTS,
        ),
    ] {
        assert_eq!(
            prometheus.scalar(promql).await,
            Some(want as f64),
            "{promql}"
        );
    }

    // The shipped rules load and every recording rule yields a series.
    let rules = std::fs::read_to_string(RULES).unwrap();
    let recorded = recorded_names(&rules);
    assert!(
        recorded.len() >= 4,
        "recording rules in {RULES}: {recorded:?}"
    );
    for name in &recorded {
        prometheus.wait_for_series(name).await;
    }
    let hit_ratio = prometheus
        .scalar("instance:cdn_edge_cache_hit_ratio:rate5m")
        .await
        .expect("hit ratio");
    assert!(
        (0.0..=1.0).contains(&hit_ratio),
        "hit ratio {hit_ratio} after {RANGE_REQUESTS} ranges of one object"
    );
    let memory_share = prometheus
        .query(r#"instance_tier:cdn_edge_cache_hit_ratio:rate5m{tier="memory"}"#)
        .await;
    assert_eq!(memory_share.len(), 1, "{memory_share:?}");

    // Every dashboard query is valid PromQL and finds data (rates need a second scrape
    // of the series that the traffic created).
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("dashboard is JSON");
    for expr in dashboard_queries(&dashboard) {
        // A variable's label_values(selector, label): ask for the selector.
        let promql = match expr.strip_prefix("label_values(") {
            Some(rest) => rest.rsplit_once(',').expect("label_values(s, l)").0,
            None => &expr,
        };
        let promql = with_variables(promql);
        prometheus.wait_for_series(&promql).await;
    }
}

#[test]
fn shipped_scrape_config_and_rules_pass_promtool() {
    for args in [
        vec!["check", "config", SCRAPE_CONFIG],
        vec!["check", "rules", RULES],
        vec!["test", "rules", RULES_TEST],
    ] {
        let (ok, output) = promtool(&args, b"");
        assert!(
            ok && output.contains("SUCCESS") && !output.contains("WARNING"),
            "promtool {}:\n{output}",
            args.join(" ")
        );
    }
    // The shipped config loads the shipped rules, by a path relative to itself.
    let config = std::fs::read_to_string(SCRAPE_CONFIG).unwrap();
    assert!(config.contains("\n  - cdn-edge-rules.yml\n"), "{config}");
    assert!(config.contains("job_name: cdn-edge"), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_use_only_exported_metrics() {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "cdn-edge");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["DS_PROMETHEUS", "job", "instance"]);
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().expect("panel title");
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            for t in panel["targets"].as_array().expect("targets") {
                assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
                let expr = t["expr"].as_str().unwrap();
                assert!(expr.contains(r#"instance=~"$instance""#), "{title}: {expr}");
            }
        }
    }

    let site = start_site().await;
    send_traffic(&site.edge).await;
    let exported = exported_series(&site.edge.metrics().await);

    let dashboard_names = metric_names(&dashboard_queries(&dashboard).join("\n"));
    // Each panel the operators rely on still has its metric.
    for name in [
        "cdn_edge_cache_lookups_total",
        "cdn_edge_response_body_bytes_total",
        "cdn_edge_origin_bytes_total",
        "cdn_edge_auth_failures_total",
        "cdn_edge_spool_entries",
        "cdn_edge_request_duration_seconds_bucket",
        "cdn_edge_requests_total",
        "cdn_edge_origin_requests_total",
        "cdn_edge_stats_dropped_total",
        "cdn_edge_peers",
        "cdn_edge_peer_requests_total",
        "cdn_edge_draining",
        "cdn_edge_control_reports_total",
        "cdn_edge_fill_bytes_total",
        "cdn_edge_fill_slices_total",
        "cdn_edge_fill_jobs",
        "cdn_edge_purges_total",
    ] {
        assert!(dashboard_names.contains(name), "no panel uses {name}");
    }
    let rules_names = metric_names(&std::fs::read_to_string(RULES).unwrap());
    for (file, names) in [(DASHBOARD, &dashboard_names), (RULES, &rules_names)] {
        let unknown: Vec<_> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the edge does not export: {unknown:?}\nexported: {exported:?}"
        );
    }
}
