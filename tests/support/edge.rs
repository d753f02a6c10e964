//! Starts the real `cdn-edge` binary on ephemeral loopback ports with a generated config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::client;

pub const KEY1: &str = "test-secret-one";
pub const KEY2: &str = "test-secret-two";

/// Settings a test may change; everything else is fixed.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    pub origins: Vec<String>,
    pub slice_bytes: u64,
    pub memory_bytes: u64,
    pub origin_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub clock_skew_secs: u64,
    /// `cache.sendfile`.
    pub sendfile: bool,
    /// `[cache.disk]`: directory and byte budget.
    pub disk: Option<(PathBuf, u64)>,
    /// `cache.disk.policy`; `None` leaves the default (`video`).
    pub disk_policy: Option<&'static str>,
    /// `cache.meta_ttl_secs`; `None` leaves the default.
    pub meta_ttl_secs: Option<u64>,
    pub retry_unhealthy_ms: u64,
    /// `origin.negative_ttl_secs`; `None` leaves the default.
    pub negative_ttl_secs: Option<u64>,
    /// SIGTERM grace period; 0 makes a stop immediate.
    pub grace_period_secs: u64,
    /// An HTTPS listener with this certificate chain and key.
    pub https: Option<(PathBuf, PathBuf)>,
    /// `tls.ca_file`: trust store for HTTPS origins.
    pub ca_file: Option<PathBuf>,
    /// More TOML appended to the config, right after `[server]` (e.g. `[dictionary]`).
    pub extra: String,
    /// More lines in `[origin]` (e.g. `mode` and `redirect_url`).
    pub origin_extra: String,
    /// More `[[signing.keys]]` entries after k1 and k2 (e.g. an ed25519 key).
    pub signing_extra: String,
    /// More `[signing]` settings (TOML lines).
    pub signing_settings: String,
    /// `CDN_EDGE_LOG` for the process; `None` leaves the level to `[log]`.
    pub log_env: Option<String>,
}

impl EdgeOptions {
    /// Options for one origin with a `[limits]` section of `limits` (TOML lines).
    pub fn limited(origin: String, limits: &str) -> Self {
        let mut opts = Self::new(vec![origin]);
        opts.extra = format!("[limits]\n{limits}\n");
        opts
    }

    pub fn new(origins: Vec<String>) -> Self {
        Self {
            origins,
            slice_bytes: 64 * 1024,
            memory_bytes: 64 << 20,
            origin_timeout_ms: 5_000,
            connect_timeout_ms: 1_000,
            clock_skew_secs: 30,
            sendfile: true,
            disk: None,
            disk_policy: None,
            meta_ttl_secs: None,
            retry_unhealthy_ms: 10_000,
            negative_ttl_secs: None,
            grace_period_secs: 0,
            https: None,
            ca_file: None,
            extra: String::new(),
            origin_extra: String::new(),
            signing_extra: String::new(),
            signing_settings: String::new(),
            log_env: Some("info".to_string()),
        }
    }
}

/// The addresses an edge listens on. A site picks every node's peer address before any
/// node starts, as every node's `[cluster]` lists them all.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// `listen.peer`.
    pub peer: Option<SocketAddr>,
}

impl Ports {
    /// Free loopback addresses for `opts` (an HTTPS one if it has a certificate), with
    /// this peer listener.
    pub fn pick(opts: &EdgeOptions, peer: Option<SocketAddr>) -> Ports {
        let mut free = free_addrs(3).into_iter();
        let (http, admin, https) = (free.next(), free.next(), free.next());
        Ports {
            http: http.expect("three addresses"),
            admin: admin.expect("three addresses"),
            https: opts.https.as_ref().and(https),
            peer,
        }
    }
}

pub struct Edge {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The peer listener, with `[cluster]`.
    pub peer: Option<SocketAddr>,
    child: Child,
    log: PathBuf,
    conf: PathBuf,
    dir: Arc<tempfile::TempDir>,
    log_env: Option<String>,
}

/// `n` distinct free loopback addresses: each is held until all are picked.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// Why a start did not give a serving edge.
enum NotReady {
    /// The process exited, or another process answers on its port: the usual cause is
    /// a port taken between picking it and binding it.
    Lost,
}

impl Edge {
    pub async fn start(opts: EdgeOptions) -> Edge {
        // A port picked here can be taken by another test before the edge binds it:
        // the edge then exits at once with a bind error, and we try fresh ports.
        for _ in 0..5 {
            if let Some(edge) = Self::try_start(&opts, Ports::pick(&opts, None)).await {
                return edge;
            }
        }
        panic!("the edge did not start after 5 attempts");
    }

    /// Starts an edge on these addresses; `None` when it exited at once or another
    /// process holds one of its ports (pick fresh ones and try again).
    pub async fn try_start(opts: &EdgeOptions, ports: Ports) -> Option<Edge> {
        let dir = tempfile::tempdir().unwrap();
        let conf_path = dir.path().join("edge.toml");
        std::fs::write(&conf_path, config_text(opts, &ports, dir.path())).unwrap();
        let log = dir.path().join("edge.log");
        let child = spawn(&conf_path, &log, false, opts.log_env.as_deref());
        let mut edge = Edge {
            http: ports.http,
            https: ports.https,
            admin: ports.admin,
            peer: ports.peer,
            child,
            log,
            conf: conf_path,
            dir: Arc::new(dir),
            log_env: opts.log_env.clone(),
        };
        match edge.wait_ready().await {
            Ok(()) => Some(edge),
            Err(NotReady::Lost) => None,
        }
    }

    /// The ports this edge listens on.
    pub fn ports(&self) -> Ports {
        Ports {
            http: self.http,
            https: self.https,
            admin: self.admin,
            peer: self.peer,
        }
    }

    /// Stops the process at once with SIGKILL (no graceful anything) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process if it runs and starts it again on the same config and ports
    /// (an empty memory tier; the disk tier, if any, is kept). A fresh log file.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.log = self.dir.path().join(format!("edge-{}.log", unix_nanos()));
        self.child = spawn(&self.conf, &self.log, false, self.log_env.as_deref());
        if let Err(NotReady::Lost) = self.wait_ready().await {
            panic!(
                "the restarted edge lost one of its ports {:?}; log:\n{}",
                self.ports(),
                self.log_text()
            );
        }
    }

    /// [`Edge::restart`] with another config on the same ports.
    pub async fn restart_with(&mut self, opts: &EdgeOptions) {
        let text = config_text(opts, &self.ports(), self.dir.path());
        std::fs::write(&self.conf, text).unwrap();
        self.log_env = opts.log_env.clone();
        self.restart().await;
    }

    /// Waits until the process answers on every listener it has; `Lost` when it exited
    /// or a port answers for someone else.
    async fn wait_ready(&mut self) -> Result<(), NotReady> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(NotReady::Lost);
            }
            if tokio::net::TcpStream::connect(self.admin).await.is_ok()
                && tokio::net::TcpStream::connect(self.http).await.is_ok()
            {
                // The public port may be another test's server while this edge is
                // failing to bind it: only the edge answers an unparsable request with
                // 400 (test origins close), and nothing is counted in its metrics.
                let mine = client::send_raw(self.http, b"GARBAGE\r\n\r\n")
                    .await
                    .ok()
                    .and_then(|raw| client::parse(&raw, false))
                    .is_some_and(|r| r.status == 400);
                if !mine || matches!(self.child.try_wait(), Ok(Some(_))) {
                    return Err(NotReady::Lost);
                }
                self.wait_peer_listener(deadline).await?;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("edge not listening after 15 s; log:\n{}", self.log_text());
    }

    /// With a peer listener: waits until it answers its health check. A port held by
    /// another process makes this one exit (a bind error), which is `Lost`.
    async fn wait_peer_listener(&mut self, deadline: Instant) -> Result<(), NotReady> {
        let Some(peer) = self.peer else {
            return Ok(());
        };
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(NotReady::Lost);
            }
            let raw = client::send_raw(
                peer,
                b"GET /peer/v1/health HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n\r\n",
            )
            .await;
            let answer = raw.ok().and_then(|raw| client::parse(&raw, false));
            if answer.is_some_and(|r| r.status == 200) {
                return if matches!(self.child.try_wait(), Ok(Some(_))) {
                    Err(NotReady::Lost)
                } else {
                    Ok(())
                };
            }
            assert!(
                Instant::now() < deadline,
                "peer listener {peer} not answering after 15 s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a second process with `--upgrade` on the same config (it waits for the
    /// listeners), then sends this one SIGQUIT to hand them over. Returns the new process
    /// once it logged that it serves.
    pub async fn upgrade(&self) -> Edge {
        let log = self.dir.path().join(format!("edge-{}.log", unix_nanos()));
        let child = spawn(&self.conf, &log, true, self.log_env.as_deref());
        let mut next = Edge {
            http: self.http,
            https: self.https,
            admin: self.admin,
            peer: self.peer,
            child,
            log,
            conf: self.conf.clone(),
            dir: self.dir.clone(),
            log_env: self.log_env.clone(),
        };
        self.signal("QUIT");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !next.log_text().contains("cdn-edge serving") {
            assert!(
                next.is_running(),
                "upgraded edge exited; log:\n{}",
                next.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "upgraded edge not serving after 30 s; log:\n{}",
                next.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        next
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `QUIT`, …) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.is_running() {
            assert!(
                Instant::now() < deadline,
                "edge still running after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until the log contains `needle`: lines are written by a
    /// background thread, a moment after the event.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged within 10 s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, target: &str, headers: &[(&str, &str)]) -> client::Response {
        client::get(self.http, target, headers).await
    }

    pub async fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> client::Response {
        client::request(self.http, method, target, headers).await
    }

    /// `GET target` again and again until the answer satisfies `done` (bounded, 15 s;
    /// for answers that change after a TTL), and returns that answer.
    pub async fn get_until(
        &self,
        target: &str,
        done: impl Fn(&client::Response) -> bool,
    ) -> client::Response {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self.get(target, &[]).await;
            if done(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{target}: still {} with {} bytes after 15 s",
                r.status,
                r.body.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        client::get(self.admin, "/metrics", &[]).await.text()
    }

    /// Value of one sample, e.g. `cdn_edge_cache_lookups_total{result="miss",tier="memory"}`;
    /// 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Waits (bounded) until `series` reaches at least `value`.
    pub async fn wait_for_metric(&self, series: &str, value: f64) {
        self.wait_for_sum_where(&[series], |now| now >= value, &format!("at least {value}"))
            .await
    }

    /// Waits (bounded) until the sum of `series` is at least `value`.
    pub async fn wait_for_metrics_sum(&self, series: &[&str], value: f64) {
        self.wait_for_sum_where(series, |now| now >= value, &format!("at least {value}"))
            .await
    }

    /// Waits (bounded) until `series` is exactly `value` (a gauge going back down).
    pub async fn wait_for_metric_exact(&self, series: &str, value: f64) {
        self.wait_for_sum_where(&[series], |now| now == value, &value.to_string())
            .await
    }

    async fn wait_for_sum_where(&self, series: &[&str], ok: impl Fn(f64) -> bool, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut now = 0.0;
            for s in series {
                now += self.metric(s).await;
            }
            if ok(now) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} stayed at {now}, expected {want}; edge log:\n{}",
                series.join(" + "),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the edge with SIGTERM (graceful shutdown), waits for it to exit, and
    /// returns its log.
    pub async fn terminate(mut self) -> String {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(15)).await;
        self.log_text()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config file of an edge with `opts` on `ports`; its upgrade socket in `dir`.
fn config_text(opts: &EdgeOptions, ports: &Ports, dir: &std::path::Path) -> String {
    let https_line = ports
        .https
        .map_or(String::new(), |a| format!("https = \"{a}\""));
    let peer_line = ports
        .peer
        .map_or(String::new(), |a| format!("peer = \"{a}\""));
    let mut tls = String::new();
    if let Some((cert, key)) = &opts.https {
        tls.push_str(&format!(
            "cert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    if let Some(ca) = &opts.ca_file {
        tls.push_str(&format!("ca_file = {:?}\n", ca.display().to_string()));
    }
    let upgrade_sock = dir.join("upgrade.sock").display().to_string();
    let origins: Vec<String> = opts.origins.iter().map(|o| format!("{o:?}")).collect();
    let disk = match &opts.disk {
        Some((path, max)) => format!(
            "[cache.disk]\npath = {:?}\nmax_bytes = {max}\n{}",
            path.display().to_string(),
            opts.disk_policy
                .map_or(String::new(), |p| format!("policy = {p:?}\n"))
        ),
        None => String::new(),
    };
    format!(
        r#"
[listen]
http = "{http}"
{https_line}
admin = "{admin}"
{peer_line}

[tls]
{tls}
[signing]
clock_skew_secs = {skew}
{signing_settings}
[[signing.keys]]
id = "k1"
secret = "{KEY1}"
[[signing.keys]]
id = "k2"
secret_env = "CDN_EDGE_TEST_KEY2"
{signing_extra}
[cache]
slice_bytes = {slice}
memory_bytes = {memory}
sendfile = {sendfile}
{meta_ttl}
{disk}
[origin]
urls = [{origins}]
path = "/objects/{{o}}/{{v}}"
connect_timeout_ms = {connect}
timeout_ms = {timeout}
retry_unhealthy_ms = {retry}
{negative_ttl}
{origin_extra}

[server]
threads = 2
grace_period_secs = {grace}
shutdown_timeout_secs = 1
upgrade_sock = {upgrade_sock:?}

{extra}
"#,
        http = ports.http,
        admin = ports.admin,
        skew = opts.clock_skew_secs,
        slice = opts.slice_bytes,
        memory = opts.memory_bytes,
        sendfile = opts.sendfile,
        meta_ttl = opts
            .meta_ttl_secs
            .map_or(String::new(), |s| format!("meta_ttl_secs = {s}")),
        origins = origins.join(", "),
        connect = opts.connect_timeout_ms,
        timeout = opts.origin_timeout_ms,
        retry = opts.retry_unhealthy_ms,
        negative_ttl = opts
            .negative_ttl_secs
            .map_or(String::new(), |s| format!("negative_ttl_secs = {s}")),
        origin_extra = opts.origin_extra,
        signing_extra = opts.signing_extra,
        signing_settings = opts.signing_settings,
        grace = opts.grace_period_secs,
        extra = opts.extra,
    )
}

fn spawn(
    conf: &std::path::Path,
    log: &std::path::Path,
    upgrade: bool,
    log_env: Option<&str>,
) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdn-edge"));
    cmd.arg("serve").arg("--conf").arg(conf);
    if upgrade {
        cmd.arg("--upgrade");
    }
    match log_env {
        Some(level) => cmd.env("CDN_EDGE_LOG", level),
        None => cmd.env_remove("CDN_EDGE_LOG"),
    };
    cmd.env("CDN_EDGE_TEST_KEY2", KEY2)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn cdn-edge")
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A query signed with key 1, valid for an hour.
pub fn signed(o: &str, v: &str) -> String {
    cdn_edge::auth::sign_query(KEY1.as_bytes(), o, v, unix_now() + 3600, "tok")
}
