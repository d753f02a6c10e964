//! A site of several edges (SPEC 6): real `cdn-edge` processes that list each other as
//! peers, and a fake peer that passes health checks but fails every slice request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::{Index, IndexMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdn_edge::cache::ObjectId;
use cdn_edge::cluster::ring::Ring;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::client::{self, Response};
use super::edge::{free_addrs, signed, Edge, EdgeOptions, Ports};
use super::origin::TestOrigin;

/// `cache.slice_bytes` of site nodes: small, so that small objects have many slices.
pub const SITE_SLICE: u64 = 64 * 1024;
/// 24 slices: with 3 nodes, each surely owns some (the ring moves with the ports).
pub const SITE_OBJECT_SIZE: usize = 24 * SITE_SLICE as usize - 1_000;

/// `cluster.secret` of the sites tests start, unless they set another.
pub const SITE_SECRET: &str = "site-secret-one";

/// The `[cluster]` settings shared by every node of a site.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub secret: String,
    /// The parent site's peer listeners (its nodes' `cluster.self`).
    pub parents: Vec<SocketAddr>,
    /// `cluster.parent_secret`; `None` leaves it unset (the site's own secret).
    pub parent_secret: Option<String>,
    pub health_check_ms: u64,
    /// `cluster.keep_non_owned`; `None` leaves the default.
    pub keep_non_owned: Option<String>,
    /// `cluster.peer_timeout_ms`; `None` leaves the default.
    pub peer_timeout_ms: Option<u64>,
    /// Peers every node lists that the site does not start (a fake peer, a dead one).
    pub extra_peers: Vec<SocketAddr>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            secret: SITE_SECRET.to_string(),
            parents: Vec::new(),
            parent_secret: None,
            health_check_ms: 200,
            keep_non_owned: None,
            peer_timeout_ms: None,
            extra_peers: Vec::new(),
        }
    }
}

/// Nodes started together, each listing every node (and `extra_peers`) in `peers`.
pub struct Site {
    pub nodes: Vec<Edge>,
    /// Every node's peer listener (`cluster.self`), in node order.
    pub peers: Vec<SocketAddr>,
    cluster: ClusterOptions,
}

impl Index<usize> for Site {
    type Output = Edge;
    fn index(&self, i: usize) -> &Edge {
        &self.nodes[i]
    }
}

impl IndexMut<usize> for Site {
    fn index_mut(&mut self, i: usize) -> &mut Edge {
        &mut self.nodes[i]
    }
}

impl Site {
    /// Starts one node per entry of `opts` and waits until every node sees every node
    /// and parent healthy. Every config lists every peer address, so they are all picked
    /// first; if one node cannot bind its ports the whole site starts again on fresh
    /// ones (at most 5 times).
    pub async fn start(cluster: ClusterOptions, opts: Vec<EdgeOptions>) -> Site {
        let n = opts.len();
        for _ in 0..5 {
            let mut free = free_addrs(3 * n).into_iter();
            let peers: Vec<SocketAddr> = free.by_ref().take(n).collect();
            let mut nodes = Vec::with_capacity(n);
            for (i, o) in opts.iter().enumerate() {
                assert!(o.https.is_none(), "site nodes listen on HTTP only");
                let ports = Ports {
                    http: free.next().expect("3n addresses"),
                    admin: free.next().expect("3n addresses"),
                    https: None,
                    peer: Some(peers[i]),
                };
                match Edge::try_start(&with_cluster(o, &cluster, &peers, i), ports).await {
                    Some(edge) => nodes.push(edge),
                    None => break,
                }
            }
            if nodes.len() == n {
                let site = Site {
                    nodes,
                    peers,
                    cluster,
                };
                for i in 0..n {
                    site.wait_all_healthy(i).await;
                }
                return site;
            }
            // Dropping the nodes started so far kills them; all start again.
        }
        panic!("the site did not start after 5 attempts");
    }

    /// `n` nodes with the same options.
    pub async fn start_n(cluster: ClusterOptions, opts: EdgeOptions, n: usize) -> Site {
        Site::start(cluster, vec![opts; n]).await
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The node that owns slice `index` of (o, v) while every node is up.
    pub fn owner(&self, o: &str, v: &str, index: u64) -> usize {
        self.owner_among(o, v, index, &(0..self.len()).collect::<Vec<_>>())
    }

    /// The node that owns slice `index` of (o, v) while only the nodes `up` are healthy.
    pub fn owner_among(&self, o: &str, v: &str, index: u64, up: &[usize]) -> usize {
        let addrs: Vec<SocketAddr> = up.iter().map(|&i| self.peers[i]).collect();
        let owner = owner_of(&addrs, o, v, index);
        self.peers
            .iter()
            .position(|p| *p == owner)
            .expect("the owner is a node")
    }

    /// Kills node `i` with SIGKILL.
    pub async fn kill(&mut self, i: usize) {
        self.nodes[i].kill().await;
    }

    /// Restarts node `i` (killing it if it runs) on the same config and ports: an empty
    /// memory tier, the disk tier kept.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].restart().await;
    }

    /// Restarts node `i` with other options (same ports, same site).
    pub async fn restart_with(&mut self, i: usize, opts: &EdgeOptions) {
        let opts = with_cluster(opts, &self.cluster, &self.peers, i);
        self.nodes[i].restart_with(&opts).await;
    }

    /// Node `i`'s `/status` document.
    pub async fn status(&self, i: usize) -> serde_json::Value {
        status(&self.nodes[i]).await
    }

    /// What node `i` says of `addr` (a peer or a parent): `healthy` or `down`.
    pub async fn state_of(&self, i: usize, addr: SocketAddr) -> Option<String> {
        state_in(&self.status(i).await, addr)
    }

    /// Waits (bounded, 10 s) until node `i` says `addr` is `state`.
    pub async fn wait_state(&self, i: usize, addr: SocketAddr, state: &str) {
        wait_state(&self.nodes[i], addr, state).await
    }

    /// Waits until node `i` sees every node of the site and every parent healthy.
    pub async fn wait_all_healthy(&self, i: usize) {
        for addr in self.peers.iter().chain(&self.cluster.parents) {
            self.wait_state(i, *addr, "healthy").await;
        }
    }

    /// `cdn_edge_peer_requests_total` of node `i` for `peer` and `result`.
    pub async fn peer_requests(&self, i: usize, peer: SocketAddr, result: &str) -> f64 {
        self.nodes[i]
            .metric(&format!(
                "cdn_edge_peer_requests_total{{peer=\"{peer}\",result=\"{result}\"}}"
            ))
            .await
    }

    /// `cdn_edge_peer_served_total` of node `i` for `result`.
    pub async fn peer_served(&self, i: usize, result: &str) -> f64 {
        self.nodes[i]
            .metric(&format!(
                "cdn_edge_peer_served_total{{result=\"{result}\"}}"
            ))
            .await
    }
}

/// The owner of slice `index` of (o, v) on the ring of `peers`, all healthy.
pub fn owner_of(peers: &[SocketAddr], o: &str, v: &str, index: u64) -> SocketAddr {
    Ring::new(peers)
        .expect("a ring")
        .owner(&ObjectId::new(o, v), index)
        .expect("a healthy peer")
}

/// Options of a site node fetching from `origin`, with [`SITE_SLICE`] slices.
pub fn site_options(origin: &TestOrigin) -> EdgeOptions {
    let mut o = EdgeOptions::new(vec![origin.url()]);
    o.slice_bytes = SITE_SLICE;
    // Origin requests are counted exactly: no metadata re-check may fall due.
    o.meta_ttl_secs = Some(3600);
    o
}

/// `n` origins serving every object of `objects` (o, v, bytes): one per node, so that
/// an origin's log is what its node fetched.
pub async fn origins(n: usize, objects: &[(&str, &str, &[u8])]) -> Vec<TestOrigin> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let origin = TestOrigin::start().await;
        for (o, v, bytes) in objects {
            origin.add_object(o, v, bytes.to_vec(), "video/mp4");
        }
        out.push(origin);
    }
    out
}

/// Which origins (by index) were asked for each slice, once per request.
pub fn fetched_by(origins: &[TestOrigin]) -> BTreeMap<(String, String, u64), Vec<usize>> {
    let mut out: BTreeMap<_, Vec<usize>> = BTreeMap::new();
    for (node, origin) in origins.iter().enumerate() {
        for key in origin_slices(origin, SITE_SLICE) {
            out.entry(key).or_default().push(node);
        }
    }
    out
}

/// A range of about 5 kB inside slice `index` of an object of `size` bytes.
pub fn in_slice(index: u64, size: usize) -> (usize, usize) {
    let a = (index * SITE_SLICE) as usize + 100;
    (a, (a + 5_000).min(size - 1))
}

/// Slices of an object of `size` bytes.
pub fn slices(size: usize) -> u64 {
    (size as u64).div_ceil(SITE_SLICE)
}

/// `/range/{a}-{b}` of (o, v), signed.
pub fn range_target(o: &str, v: &str, a: usize, b: usize) -> String {
    format!("/range/{a}-{b}?{}", signed(o, v))
}

/// `GET /range/{a}-{b}` of (o, v) from `edge`, checked: 200 and exactly `bytes[a..=b]`.
pub async fn get_exact(
    edge: &Edge,
    o: &str,
    v: &str,
    bytes: &[u8],
    a: usize,
    b: usize,
) -> Response {
    let r = edge.get(&range_target(o, v, a, b), &[]).await;
    check_exact(
        &r,
        bytes,
        a,
        b,
        &format!("{o}/{v} {a}-{b} from {}", edge.http),
    );
    r
}

/// Asserts that `r` is a 200 with exactly `bytes[a..=b]`.
pub fn check_exact(r: &Response, bytes: &[u8], a: usize, b: usize, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert!(r.complete, "{what}: the body is cut short");
    assert!(r.body == bytes[a..=b], "{what}: wrong bytes");
}

/// The slices an origin was asked for, one entry per request: (o, v, slice index), from
/// `/objects/{o}/{v}` and the start of `Range: bytes=a-b`.
pub fn origin_slices(origin: &TestOrigin, slice_bytes: u64) -> Vec<(String, String, u64)> {
    origin
        .log()
        .iter()
        .map(|line| {
            let (path, range) = line.split_once(' ').expect("path and range");
            let mut parts = path
                .strip_prefix("/objects/")
                .expect("an object path")
                .split('/');
            let (o, v) = (parts.next().unwrap(), parts.next().unwrap());
            let start: u64 = range
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, _)| a.parse().ok())
                .unwrap_or_else(|| panic!("origin request without a slice range: {line}"));
            assert_eq!(start % slice_bytes, 0, "not a slice: {line}");
            (o.to_string(), v.to_string(), start / slice_bytes)
        })
        .collect()
}

/// An edge's `/status` document.
pub async fn status(edge: &Edge) -> serde_json::Value {
    let r = client::get(edge.admin, "/status", &[]).await;
    assert_eq!(r.status, 200, "/status: {}", r.text());
    serde_json::from_slice(&r.body).expect("/status is JSON")
}

/// The state `/status` gives `addr` in `peers` or `parents`.
pub fn state_in(status: &serde_json::Value, addr: SocketAddr) -> Option<String> {
    let addr = addr.to_string();
    ["peers", "parents"]
        .iter()
        .filter_map(|list| status[list].as_array())
        .flatten()
        .find(|p| p["addr"].as_str() == Some(addr.as_str()))
        .and_then(|p| p["state"].as_str())
        .map(str::to_string)
}

/// Waits (bounded, 10 s) until `edge` says `addr` (a peer or parent) is `state`.
pub async fn wait_state(edge: &Edge, addr: SocketAddr, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = status(edge).await;
        if state_in(&now, addr).as_deref() == Some(state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} is not {state} after 10 s; /status: {now}\nlog:\n{}",
            edge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `opts` with `listen.peer`'s `[cluster]` for node `i` of `peers` appended.
fn with_cluster(
    opts: &EdgeOptions,
    cluster: &ClusterOptions,
    peers: &[SocketAddr],
    i: usize,
) -> EdgeOptions {
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let all: Vec<SocketAddr> = peers.iter().chain(&cluster.extra_peers).copied().collect();
    let mut section = format!(
        "\n[cluster]\nself = \"{}\"\npeers = [{}]\nparents = [{}]\nsecret = {:?}\nhealth_check_ms = {}\n",
        peers[i],
        list(&all),
        list(&cluster.parents),
        cluster.secret,
        cluster.health_check_ms,
    );
    if let Some(s) = &cluster.parent_secret {
        section.push_str(&format!("parent_secret = {s:?}\n"));
    }
    if let Some(k) = &cluster.keep_non_owned {
        section.push_str(&format!("keep_non_owned = {k:?}\n"));
    }
    if let Some(ms) = cluster.peer_timeout_ms {
        section.push_str(&format!("peer_timeout_ms = {ms}\n"));
    }
    let mut opts = opts.clone();
    opts.extra.push_str(&section);
    opts
}

/// A peer that answers health checks (`200 ok` to any `/peer/v1/health`) and reads of
/// its purge log (a set page, empty at first; held while [`FakePeer::hold_log`] says so),
/// and closes every other request unanswered: the owner of its slices is up but cannot
/// serve them.
pub struct FakePeer {
    pub addr: SocketAddr,
    slice_requests: Arc<AtomicU64>,
    log: Arc<Mutex<String>>,
    log_held: watch::Sender<bool>,
    log_reads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePeer {
    pub async fn start() -> FakePeer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(
            r#"{"log":"fake","last":0,"purges":[],"more":false}"#.to_string(),
        ));
        let log_held = watch::channel(false).0;
        let (slice_requests, log_reads) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let fake = FakeState {
            slice_requests: slice_requests.clone(),
            log: log.clone(),
            log_held: log_held.subscribe(),
            log_reads: log_reads.clone(),
        };
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(fake.clone().serve(sock));
            }
        });
        FakePeer {
            addr,
            slice_requests,
            log,
            log_held,
            log_reads,
            task,
        }
    }

    /// Requests other than health checks and log reads received so far.
    pub fn slice_requests(&self) -> u64 {
        self.slice_requests.load(Ordering::SeqCst)
    }

    /// Answers reads of its purge log with this page (JSON) from now on.
    pub fn set_log(&self, page: &str) {
        *self.log.lock().unwrap() = page.to_string();
    }

    /// While `held`, reads of its purge log wait for an answer.
    pub fn hold_log(&self, held: bool) {
        self.log_held.send_replace(held);
    }

    /// Reads of its purge log received so far.
    pub fn log_reads(&self) -> u64 {
        self.log_reads.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct FakeState {
    slice_requests: Arc<AtomicU64>,
    log: Arc<Mutex<String>>,
    log_held: watch::Receiver<bool>,
    log_reads: Arc<AtomicU64>,
}

impl FakeState {
    async fn serve(mut self, mut sock: tokio::net::TcpStream) {
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if buf.len() > 64 * 1024 {
                    return;
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            let target = head.split(' ').nth(1).unwrap_or_default();
            let body = if target.starts_with("/peer/v1/health") {
                "ok".to_string()
            } else if target.starts_with("/peer/v1/purges") {
                self.log_reads.fetch_add(1, Ordering::SeqCst);
                if self.log_held.wait_for(|held| !*held).await.is_err() {
                    return;
                }
                self.log.lock().unwrap().clone()
            } else {
                self.slice_requests.fetch_add(1, Ordering::SeqCst);
                return; // closes unanswered
            };
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if sock.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
