//! `cdn-edge demo --nodes N`: a site of N edges on loopback (SPEC 6), in front of the
//! demo's sample upstreams.
//!
//! The order of work:
//! 1. [`plan`]: node k (1 to N) gets the ports of `--http`, `--admin` and `--peer` plus
//!    k − 1 (defaults: node 1 on 8080, 9090 and 7080, node 2 on 8081, 9091 and 7081, …),
//!    its own spool (and disk tier) below the demo's, and a `[cluster]` that lists every
//!    node's peer listener with one shared secret. Ports that would collide with each
//!    other or with the sample upstreams are refused before anything starts.
//! 2. [`Site::start`]: writes each node's configuration (the single-node demo's, from
//!    [`demo::config_text`], plus the site) to a directory of its own, starts each node
//!    as a child process `cdn-edge serve --conf <dir>/nodeK.toml`, and waits until every
//!    node listens. Each node logs to `<dir>/nodeK.log`.
//! 3. The demo process itself hosts the sample upstreams ([`demo::build_upstreams`]).
//!
//! The nodes never outlive the demo: when its server returns (SIGINT, SIGTERM), dropping
//! the [`Site`] sends each node SIGTERM and waits for it; should the demo die without
//! that (SIGKILL, a crash), the kernel sends them SIGTERM, because every node was started
//! with `--exit-with-parent` and asked for it at start ([`exit_with_parent`],
//! `PR_SET_PDEATHSIG`).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError};
use crate::demo::{self, DemoOptions, SiteMember, DEMO_SECRET, SEED_RANGE};

/// The most nodes a demo site has: one digit in the printed plan.
pub const MAX_NODES: usize = 9;

/// `cluster.secret` of every node of the demo site.
pub const SITE_SECRET: &str = "demo-site-secret-not-for-production";

/// How long a node may take to listen after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM before it is killed (its grace period
/// and shutdown timeout are 1 s each).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the demo looks at its nodes (starting, exiting).
const POLL: Duration = Duration::from_millis(50);

/// Why the demo site could not start.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("--nodes {0}: a site has 2 to {MAX_NODES} nodes")]
    Nodes(usize),
    #[error("{what} {addr}: a site's nodes need fixed ports (not 0)")]
    PortZero { what: String, addr: SocketAddr },
    #[error("node {node}'s {what} port would be {port} + {offset}: over 65535")]
    PortOverflow {
        node: usize,
        what: &'static str,
        port: u16,
        offset: usize,
    },
    #[error("{a} and {b} would both use port {port}: move --http, --admin, --peer or the sample upstreams apart")]
    Collision { a: String, b: String, port: u16 },
    #[error("node {node}: {source}")]
    Config { node: usize, source: ConfigError },
    #[error("{what} {addr}: cannot listen: {source}")]
    Taken {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start node {node}: {source}")]
    Spawn { node: usize, source: std::io::Error },
    #[error("node {node} exited while starting ({status}); the end of its log {}:\n{tail}", log.display())]
    Exited {
        node: usize,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("node {node} is not listening after {} s; see its log {}", START_TIMEOUT.as_secs(), log.display())]
    NotListening { node: usize, log: PathBuf },
}

/// One node of the planned site.
#[derive(Debug, Clone)]
pub struct NodePlan {
    /// 1 to N.
    pub number: usize,
    /// Its listeners, spool and disk tier (the upstreams are the demo's).
    pub options: DemoOptions,
    pub member: SiteMember,
}

/// Plans a site of `nodes` nodes from the demo's options (see the module doc); its
/// configurations, logs and upgrade sockets go to `dir`.
pub fn plan(
    base: &DemoOptions,
    peer: SocketAddr,
    nodes: usize,
    dir: &Path,
) -> Result<Vec<NodePlan>, SiteError> {
    if !(2..=MAX_NODES).contains(&nodes) {
        return Err(SiteError::Nodes(nodes));
    }
    let nth = |what: &'static str, first: SocketAddr, k: usize| {
        if first.port() == 0 {
            return Err(SiteError::PortZero {
                what: format!("--{what}"),
                addr: first,
            });
        }
        let port = u16::try_from(usize::from(first.port()) + k - 1).map_err(|_| {
            SiteError::PortOverflow {
                node: k,
                what,
                port: first.port(),
                offset: k - 1,
            }
        })?;
        Ok(SocketAddr::new(first.ip(), port))
    };
    let peers = (1..=nodes)
        .map(|k| nth("peer", peer, k))
        .collect::<Result<Vec<_>, _>>()?;
    let mut planned = Vec::with_capacity(nodes);
    for (k, peer) in (1..=nodes).zip(&peers) {
        let options = DemoOptions {
            http: nth("http", base.http, k)?,
            admin: nth("admin", base.admin, k)?,
            spool: base.spool.join(format!("node{k}")),
            disk: base.disk.as_ref().map(|d| d.join(format!("node{k}"))),
            ..base.clone()
        };
        planned.push(NodePlan {
            number: k,
            options,
            member: SiteMember {
                peer: *peer,
                peers: peers.clone(),
                secret: SITE_SECRET.to_string(),
                upgrade_sock: dir.join(format!("node{k}-upgrade.sock")),
            },
        });
    }
    check_collisions(base, &planned)?;
    Ok(planned)
}

/// Every listener of the site and the demo, named for an error message.
fn listeners(base: &DemoOptions, nodes: &[NodePlan]) -> Vec<(String, SocketAddr)> {
    let mut all = vec![
        ("the sample origin".to_string(), base.origin),
        ("the sample dictionary".to_string(), base.dictionary),
        ("the event sink".to_string(), base.sink),
    ];
    for n in nodes {
        let k = n.number;
        all.push((format!("node {k}'s http"), n.options.http));
        all.push((format!("node {k}'s admin"), n.options.admin));
        all.push((format!("node {k}'s peer"), n.member.peer));
    }
    all
}

fn check_collisions(base: &DemoOptions, nodes: &[NodePlan]) -> Result<(), SiteError> {
    let all = listeners(base, nodes);
    for (i, (a, x)) in all.iter().enumerate() {
        let same_host =
            |y: &SocketAddr| x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified();
        if let Some((b, _)) = all[i + 1..]
            .iter()
            .find(|(_, y)| y.port() == x.port() && same_host(y))
        {
            return Err(SiteError::Collision {
                a: a.clone(),
                b: b.clone(),
                port: x.port(),
            });
        }
    }
    Ok(())
}

/// A running node.
struct Node {
    plan: NodePlan,
    log: PathBuf,
    child: Child,
    pid: u32,
    exited: Option<ExitStatus>,
}

/// The running nodes of a demo site; dropping it stops them.
pub struct Site {
    nodes: Arc<Mutex<Vec<Node>>>,
    /// Facts printed in the instructions, fixed at start.
    summary: Vec<(NodePlan, u32)>,
    base: DemoOptions,
    dir: PathBuf,
    stopping: Arc<AtomicBool>,
}

impl Site {
    /// Starts the nodes of [`plan`] as child processes of this one, and returns once
    /// each listens on its http and admin addresses. Must be called from the thread
    /// that lives as long as the process (the main thread): a node is told to exit when
    /// the thread that started it ends.
    pub fn start(base: &DemoOptions, peer: SocketAddr, nodes: usize) -> Result<Site, SiteError> {
        let dir = std::env::temp_dir().join(format!("cdn-edge-demo-site-{}", std::process::id()));
        let planned = plan(base, peer, nodes, &dir)?;
        // The sample upstreams too: the caller binds them once the nodes listen.
        for (what, addr) in listeners(base, &planned) {
            std::net::TcpListener::bind(addr).map_err(|source| SiteError::Taken {
                what,
                addr,
                source,
            })?;
        }
        std::fs::create_dir_all(&dir).map_err(|source| SiteError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut site = Site {
            nodes: Arc::new(Mutex::new(Vec::with_capacity(nodes))),
            summary: Vec::with_capacity(nodes),
            base: base.clone(),
            dir: dir.clone(),
            stopping: Arc::new(AtomicBool::new(false)),
        };
        // Written and checked before any node starts: a bad file stops nothing half-way.
        let mut confs = Vec::with_capacity(nodes);
        for p in &planned {
            let text = demo::config_text(&p.options, Some(&p.member));
            Config::from_toml(&text).map_err(|source| SiteError::Config {
                node: p.number,
                source,
            })?;
            let conf = dir.join(format!("node{}.toml", p.number));
            std::fs::write(&conf, text).map_err(|source| SiteError::Io {
                path: conf.clone(),
                source,
            })?;
            confs.push(conf);
        }
        for (p, conf) in planned.into_iter().zip(confs) {
            let node = spawn(p, &conf, &dir)?;
            site.summary.push((node.plan.clone(), node.pid));
            site.lock().push(node);
        }
        site.wait_listening()?;
        Ok(site)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Node>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_listening(&self) -> Result<(), SiteError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut nodes = self.lock();
        for n in nodes.iter_mut() {
            loop {
                if let Ok(Some(status)) = n.child.try_wait() {
                    return Err(SiteError::Exited {
                        node: n.plan.number,
                        status,
                        log: n.log.clone(),
                        tail: log_tail(&n.log, 20),
                    });
                }
                if listening(n.plan.options.http) && listening(n.plan.options.admin) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(SiteError::NotListening {
                        node: n.plan.number,
                        log: n.log.clone(),
                    });
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    /// Logs each node's exit as it happens (a node killed to show failover, or one that
    /// failed), from a thread of its own, until the site is stopped.
    pub fn watch(&self) {
        let nodes = self.nodes.clone();
        let stopping = self.stopping.clone();
        let watcher = std::thread::Builder::new()
            .name("cdn-edge demo site".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    {
                        let mut nodes = nodes.lock().unwrap_or_else(PoisonError::into_inner);
                        for n in nodes.iter_mut().filter(|n| n.exited.is_none()) {
                            if let Ok(Some(status)) = n.child.try_wait() {
                                n.exited = Some(status);
                                tracing::warn!(
                                    node = n.plan.number,
                                    pid = n.pid,
                                    %status,
                                    "demo site: node exited; its slices move to the other nodes as soon as a request or a health check finds it down"
                                );
                            }
                        }
                    }
                    std::thread::sleep(POLL * 4);
                }
            });
        if let Err(e) = watcher {
            tracing::warn!(error = %e, "demo site: cannot watch the nodes");
        }
    }

    /// The text printed once the site and the sample upstreams listen.
    pub fn instructions(&self, now: u64) -> String {
        let q = demo::sample_query(now);
        let mut nodes = String::new();
        let mut seeds = String::new();
        let mut status = String::new();
        for (p, pid) in &self.summary {
            let k = p.number;
            nodes.push_str(&format!(
                "node {k}: pid {pid}, http://{}, admin http://{}, peer {}\n",
                p.options.http, p.options.admin, p.member.peer
            ));
            seeds.push_str(&format!(
                "curl -s -o /dev/null -D - 'http://{}{SEED_RANGE}?{q}'\n",
                p.options.http
            ));
            status.push_str(&format!("curl -s http://{}/status\n", p.options.admin));
        }
        let (second, second_pid) = self
            .summary
            .get(1)
            .map(|(p, pid)| (p.number, *pid))
            .unwrap_or_default();
        format!(
            "cdn-edge demo: a site of {n} edges on loopback, in front of the sample origin on http://{origin} \
             (sample dictionary on http://{dictionary}, event sink on http://{sink}).\n\
             Each slice is held once in the site, by its owner (consistent hashing over the healthy nodes); a node \
             that misses a slice it does not own fetches it from the owner over the peer listeners.\n\
             Signing key id \"demo\", secret \"{DEMO_SECRET}\"; cluster secret \"{SITE_SECRET}\". URLs below are valid for one hour.\n\
             The nodes' configurations and logs: {dir}/nodeK.toml and nodeK.log\n\
             \n\
             {nodes}\
             \n\
             # the seed request (310,491 bytes over two slices) through each node in turn: the sample origin\n\
             # is asked for each slice once (it logs each range); the other nodes answer from the slice's owner,\n\
             # with Cache-Status: cdn-edge; fwd=miss; detail=peer\n\
             {seeds}\
             \n\
             # each node's status, with its peers and whether they are healthy\n\
             {status}\
             \n\
             # failover: stop node {second}, then run the requests through the others again; its slices move to\n\
             # the remaining nodes as soon as a request or a health check finds it down, and no request fails\n\
             kill {second_pid}\n",
            n = self.summary.len(),
            origin = self.base.origin,
            dictionary = self.base.dictionary,
            sink = self.base.sink,
            dir = self.dir.display(),
        )
    }

    /// Stops every node still running: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
    fn stop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let mut nodes = self.lock();
        for n in nodes.iter_mut() {
            if matches!(n.child.try_wait(), Ok(None)) {
                let pid = rustix::process::Pid::from_child(&n.child);
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for n in nodes.iter_mut() {
            while matches!(n.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            if matches!(n.child.try_wait(), Ok(None)) {
                tracing::warn!(
                    node = n.plan.number,
                    pid = n.pid,
                    "demo site: node did not stop in time; killing it"
                );
                let _ = n.child.kill();
                let _ = n.child.wait();
            }
        }
        drop(nodes);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(plan: NodePlan, conf: &Path, dir: &Path) -> Result<Node, SiteError> {
    let node = plan.number;
    let log = dir.join(format!("node{node}.log"));
    let stderr = std::fs::File::create(&log).map_err(|source| SiteError::Io {
        path: log.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(|source| SiteError::Spawn { node, source })?;
    let child = Command::new(exe)
        .arg("serve")
        .arg("--conf")
        .arg(conf)
        .arg("--exit-with-parent")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|source| SiteError::Spawn { node, source })?;
    Ok(Node {
        plan,
        log,
        pid: child.id(),
        child,
        exited: None,
    })
}

/// Whether something accepts connections on `addr`.
pub fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Waits until something accepts connections on `addr`, at most `within`.
pub fn wait_listening(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if listening(addr) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Asks the kernel to send this process SIGTERM when its parent, `parent`, exits, so a
/// node of a demo site never outlives the demo (`serve --exit-with-parent PID`). Fails
/// when the parent has already exited, that is when this process was adopted before
/// the request took effect.
pub fn exit_with_parent(parent: u32) -> std::io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
    let now = rustix::process::getppid().map(|p| p.as_raw_pid());
    if now.and_then(|p| u32::try_from(p).ok()) != Some(parent) {
        return Err(std::io::Error::other(format!(
            "the process that started this one ({parent}) has exited"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> DemoOptions {
        DemoOptions::loopback()
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:7080".parse().unwrap()
    }

    #[test]
    fn node_k_gets_the_given_ports_plus_k_minus_one() {
        let nodes = plan(&base(), peer(), 3, Path::new("/tmp/site")).unwrap();
        let third = &nodes[2];
        assert_eq!(third.options.http.to_string(), "127.0.0.1:8082");
        assert_eq!(third.options.admin.to_string(), "127.0.0.1:9092");
        assert_eq!(third.member.peer.to_string(), "127.0.0.1:7082");
        assert_eq!(third.options.spool, base().spool.join("node3"));
        for n in &nodes {
            assert_eq!(n.member.peers, nodes[0].member.peers);
        }
        assert_eq!(nodes[0].member.peers.len(), 3);
    }

    #[test]
    fn every_planned_node_config_is_valid_and_names_itself() {
        for n in plan(&base(), peer(), MAX_NODES, Path::new("/tmp/site")).unwrap() {
            let c = Config::from_toml(&demo::config_text(&n.options, Some(&n.member))).unwrap();
            let cluster = c.cluster.unwrap();
            assert_eq!(cluster.self_addr, n.member.peer);
            assert_eq!(cluster.peers.len(), MAX_NODES);
            assert_eq!(c.listen.peer, Some(n.member.peer));
        }
    }

    #[test]
    fn colliding_or_impossible_ports_are_refused() {
        // Node 3's admin port would be 9002, the event sink's.
        let mut b = base();
        b.admin = "127.0.0.1:9000".parse().unwrap();
        b.origin = "127.0.0.1:9100".parse().unwrap();
        b.dictionary = "127.0.0.1:9101".parse().unwrap();
        let e = plan(&b, peer(), 3, Path::new("/t")).unwrap_err();
        assert!(matches!(&e, SiteError::Collision { port: 9002, .. }), "{e}");
        // The peer ports run into the http ports.
        let e = plan(
            &base(),
            "127.0.0.1:8079".parse().unwrap(),
            3,
            Path::new("/t"),
        )
        .unwrap_err();
        assert!(matches!(e, SiteError::Collision { port: 8080, .. }), "{e}");
        let mut b = base();
        b.http = "127.0.0.1:65534".parse().unwrap();
        assert!(matches!(
            plan(&b, peer(), 3, Path::new("/t")),
            Err(SiteError::PortOverflow { node: 3, .. })
        ));
        let mut b = base();
        b.http = "127.0.0.1:0".parse().unwrap();
        assert!(matches!(
            plan(&b, peer(), 2, Path::new("/t")),
            Err(SiteError::PortZero { .. })
        ));
        assert!(matches!(
            plan(&base(), peer(), 10, Path::new("/t")),
            Err(SiteError::Nodes(10))
        ));
    }
}
