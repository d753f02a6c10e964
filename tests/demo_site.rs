//! `cdn-edge demo --nodes N` (SPEC 5 and 6): a site of edges on loopback answers the
//! printed curl commands through every node, and its nodes never outlive the demo.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::client;

/// The seed range the demo prints: bytes 122638100-122948590 of `sample`/`1`.
const SEED: std::ops::RangeInclusive<usize> = 122_638_100..=122_948_590;

/// A running `cdn-edge demo --nodes N`, with what it printed.
struct Demo {
    child: Child,
    nodes: Vec<Node>,
    /// The seed request of each node, as printed: address and target.
    seeds: Vec<(SocketAddr, String)>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

#[derive(Debug)]
struct Node {
    pid: u32,
    http: SocketAddr,
    admin: SocketAddr,
    peer: SocketAddr,
}

/// `n` consecutive free ports on 127.0.0.1, the first one the kernel picked; they stay
/// taken (in `held`) until the caller drops them, so no two runs overlap.
fn free_run(n: u16, held: &mut Vec<TcpListener>) -> u16 {
    loop {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = first.local_addr().unwrap().port();
        if base > u16::MAX - n {
            continue;
        }
        let rest: Result<Vec<_>, _> = (1..n)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if let Ok(rest) = rest {
            held.push(first);
            held.extend(rest);
            return base;
        }
    }
}

impl Demo {
    /// Starts the demo on free ports; a port taken by another test between the pick and
    /// the demo's bind makes the demo exit at once, and it is tried again on new ports.
    fn start(nodes: u16) -> Demo {
        for _ in 0..5 {
            if let Some(demo) = Self::try_start(nodes) {
                return demo;
            }
        }
        panic!("the demo site did not start after 5 attempts");
    }

    fn try_start(nodes: u16) -> Option<Demo> {
        let dir = tempfile::tempdir().unwrap();
        let mut held = Vec::new();
        let mut flag = |name: &str, n: u16| {
            let port = free_run(n, &mut held);
            [format!("--{name}"), format!("127.0.0.1:{port}")]
        };
        let flags = [
            flag("http", nodes),
            flag("admin", nodes),
            flag("peer", nodes),
            flag("origin", 1),
            flag("dictionary", 1),
            flag("sink", 1),
        ];
        drop(held);
        let stderr = dir.path().join("demo.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_cdn-edge"))
            .args(["demo", "--nodes", &nodes.to_string()])
            .args(flags.iter().flatten())
            .arg("--spool")
            .arg(dir.path().join("spool"))
            .args(["--memory-bytes", "16777216"])
            .env("CDN_EDGE_LOG", "info")
            // The site's directory (configurations, logs) goes there too.
            .env("TMPDIR", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut printed = Vec::new();
        // The instructions end with the failover hint, `kill PID`.
        while !printed
            .last()
            .is_some_and(|l: &String| l.starts_with("kill "))
        {
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "no instructions after 60 s; stdout so far:\n{}\nstderr:\n{}",
                printed.join("\n"),
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                printed.push(line);
            }
        }
        let mut demo = Demo {
            child,
            nodes: Vec::new(),
            seeds: Vec::new(),
            stderr,
            _dir: dir,
        };
        for line in &printed {
            if let Some(rest) = line.strip_prefix("node ") {
                // node 2: pid 123, http://127.0.0.1:8081, admin http://127.0.0.1:9091, peer 127.0.0.1:7081
                let field = |name: &str| {
                    rest.split(", ")
                        .find_map(|f| f.split_once(name))
                        .map(|(_, v)| v.to_string())
                        .unwrap_or_else(|| panic!("{name} in {line:?}"))
                };
                demo.nodes.push(Node {
                    pid: field("pid ").parse().unwrap(),
                    http: field("http://").parse().unwrap(),
                    admin: field("admin http://").parse().unwrap(),
                    peer: field("peer ").parse().unwrap(),
                });
            }
            if let Some(url) = line.strip_prefix("curl -s -o /dev/null -D - 'http://") {
                let url = url.trim_end_matches('\'');
                let (host, target) = url.split_at(url.find('/').unwrap());
                demo.seeds.push((host.parse().unwrap(), target.to_string()));
            }
        }
        assert_eq!(demo.nodes.len(), usize::from(nodes), "{printed:?}");
        assert_eq!(demo.seeds.len(), usize::from(nodes), "{printed:?}");
        Some(demo)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn signal(&self, pid: u32, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Waits (bounded) until the demo has exited.
    fn wait_exit(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while matches!(self.child.try_wait(), Ok(None)) {
            assert!(
                Instant::now() < deadline,
                "the demo still runs after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Nodes a failed test left behind.
        for n in self.nodes.iter().filter(|n| !exited(n.pid)) {
            let _ = Command::new("kill")
                .args(["-KILL", &n.pid.to_string()])
                .status();
        }
    }
}

/// Whether process `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // pid (comm) state ...: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn wait_all_exited(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while !pids.iter().all(|&p| exited(p)) {
        let alive: Vec<_> = pids.iter().filter(|&&p| !exited(p)).collect();
        assert!(
            Instant::now() < deadline,
            "nodes {alive:?} still run {within:?} after the demo"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sum of the samples of `series` (a metric name, or a name and labels) in a
/// node's `/metrics`.
async fn metric_sum(admin: SocketAddr, series: &str) -> f64 {
    let text = client::get(admin, "/metrics", &[]).await.text();
    text.lines()
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many times the sample origin was asked for slice `index` (1 MiB), from the
/// demo's log: `sample origin: range request path=... start=A end=B`.
fn origin_fetches(log: &str, index: u64) -> usize {
    let start = format!("start={} ", index as usize * SLICE);
    log.lines()
        .filter(|l| l.contains("sample origin: range request") && l.contains(&start))
        .count()
}

/// The index of a slice of `sample`/`1`, not among `skip`, that `owner` owns in the
/// ring over `peers`, as every node computes it.
fn slice_owned_by(owner: SocketAddr, peers: &[SocketAddr], skip: &[u64]) -> u64 {
    let ring = cdn_edge::cluster::ring::Ring::new(peers).unwrap();
    let id = cdn_edge::cache::ObjectId::new("sample", "1");
    (0..128)
        .find(|i| !skip.contains(i) && ring.owner(&id, *i) == Some(owner))
        .expect("some slice of 128 is the node's")
}

/// `/range/` of slice `index` (1 MiB slices), with the seed request's signature.
fn slice_target(seed: &str, index: u64) -> (String, std::ops::RangeInclusive<usize>) {
    let start = index as usize * SLICE;
    let end = start + SLICE - 1;
    let query = seed.split_once('?').unwrap().1;
    (format!("/range/{start}-{end}?{query}"), start..=end)
}

const SLICE: usize = 1 << 20;

async fn assert_range(
    addr: SocketAddr,
    target: &str,
    bytes: &[u8],
    range: std::ops::RangeInclusive<usize>,
) -> client::Response {
    let r = client::get(addr, target, &[]).await;
    assert_eq!(r.status, 200, "{addr}{target}: {:?}", r.headers);
    assert!(r.complete);
    assert!(r.body == bytes[range], "{addr}{target}: wrong bytes");
    r
}

async fn assert_seed(addr: SocketAddr, target: &str, sample: &[u8]) -> client::Response {
    assert_range(addr, target, sample, SEED).await
}

fn cache_status(r: &client::Response) -> &str {
    r.header("cache-status").unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_site_answers_on_every_node_fills_each_slice_once_and_survives_a_dead_node() {
    let mut demo = Demo::start(3);
    let sample = &cdn_edge::demo::sample_objects()[0].bytes;

    // The seed request (slices 116 and 117) through each node in turn: the site asks
    // the origin once per slice, and the nodes that own neither get them from the owner.
    let mut statuses = Vec::new();
    for (addr, target) in &demo.seeds {
        let r = assert_seed(*addr, target, sample).await;
        statuses.push(cache_status(&r).to_string());
    }
    assert!(
        statuses
            .iter()
            .any(|s| s == "cdn-edge; fwd=miss; detail=peer"),
        "{statuses:?}"
    );
    for node in &demo.nodes {
        let status = client::get(node.admin, "/status", &[]).await;
        assert_eq!(status.status, 200);
        let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
        assert_eq!(status["peers"].as_array().unwrap().len(), 3, "{status}");
    }

    // A slice node 1 owns, asked for through node 2: node 2 gets it from node 1, which
    // fills it from the origin and then has it as a hit.
    let peers: Vec<SocketAddr> = demo.nodes.iter().map(|n| n.peer).collect();
    let (node1, node2, node3) = (&demo.nodes[0], &demo.nodes[1], &demo.nodes[2]);
    let owned_by_1 = slice_owned_by(node1.peer, &peers, &[116, 117]);
    let (target, range) = slice_target(&demo.seeds[0].1, owned_by_1);
    let r = assert_range(node2.http, &target, sample, range.clone()).await;
    assert_eq!(cache_status(&r), "cdn-edge; fwd=miss; detail=peer");
    let r = assert_range(node1.http, &target, sample, range.clone()).await;
    assert_eq!(cache_status(&r), "cdn-edge; hit");
    let filled = r#"cdn_edge_peer_served_total{result="fill"}"#;
    assert!(metric_sum(node1.admin, filled).await >= 1.0);

    // Failover: node 2 stops; the others still answer, a slice it owned included.
    let dead = node2.pid;
    demo.signal(dead, "KILL");
    wait_all_exited(&[dead], Duration::from_secs(10));
    for (i, (addr, target)) in demo.seeds.iter().enumerate() {
        if i != 1 {
            assert_seed(*addr, target, sample).await;
        }
    }
    let owned_by_2 = slice_owned_by(node2.peer, &peers, &[116, 117, owned_by_1]);
    let (target, range) = slice_target(&demo.seeds[0].1, owned_by_2);
    assert_range(node1.http, &target, sample, range.clone()).await;
    assert_range(node3.http, &target, sample, range).await;

    // SIGTERM to the demo stops the nodes with it.
    let pids: Vec<u32> = demo.nodes.iter().map(|n| n.pid).collect();
    demo.signal(demo.child.id(), "TERM");
    demo.wait_exit(Duration::from_secs(20));
    wait_all_exited(&pids, Duration::from_secs(1));
    let log = demo.stderr();
    assert!(
        log.contains("node=2"),
        "the demo logs the dead node:\n{log}"
    );
    // Each slice reached the site from the origin once, however the clients were
    // spread (the demo's log is complete once it has exited).
    for index in [116, 117, owned_by_1] {
        assert_eq!(origin_fetches(&log, index), 1, "slice {index}:\n{log}");
    }
}

#[test]
fn the_nodes_exit_when_the_demo_is_killed() {
    let mut demo = Demo::start(2);
    let pids: Vec<u32> = demo.nodes.iter().map(|n| n.pid).collect();
    assert!(!pids.iter().any(|&p| exited(p)));
    // SIGKILL: the demo cannot stop them; the kernel tells them (PR_SET_PDEATHSIG).
    demo.signal(demo.child.id(), "KILL");
    demo.wait_exit(Duration::from_secs(5));
    wait_all_exited(&pids, Duration::from_secs(15));
}
