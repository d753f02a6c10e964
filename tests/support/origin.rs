//! A test origin: a small HTTP/1.1 server on 127.0.0.1:0 that serves registered objects
//! with single-range support, counts every request, and can misbehave on demand: for
//! every request ([`Mode`]), or per object and slice ([`FaultRule`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pingora::tls::TlsAcceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::faults::{self, After, FaultRule, Faults, Resettable};

/// How the origin answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Correct 206 / 416 / 404 answers.
    Normal,
    /// Reads the request and never answers.
    Hang,
    /// Answers this status with an empty body.
    Status(u16),
    /// A `103 Early Hints` interim answer before each normal one.
    EarlyHints,
    /// Correct 206 answers whose body is said to be gzip-coded (`Content-Encoding: gzip`).
    ContentEncoding,
    /// Every n-th request (counted over all connections) is answered 503 and not listed
    /// in [`TestOrigin::received`], which then holds only the accepted ones; the others
    /// are answered as in `Normal`, and a POST to no object with 200
    /// `{"status":200}`: a flaky upstream whose deliveries can be counted.
    FailEvery(u64),
}

struct Object {
    /// Shared, so that an answer costs no copy of the whole object.
    bytes: Arc<Vec<u8>>,
    content_type: String,
    /// Sent with every 200 and 206 for the object (e.g. `ETag`).
    headers: Vec<(String, String)>,
}

/// A fixed answer for one exact request target (path and query).
#[derive(Clone)]
struct Canned {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

struct State {
    objects: Mutex<HashMap<String, Object>>,
    canned: Mutex<HashMap<String, Canned>>,
    mode: Mutex<Mode>,
    faults: Mutex<Faults>,
    requests: AtomicU64,
    connections: AtomicU64,
    /// Connections accepted and not yet closed.
    open: AtomicU64,
    /// Bytes per second an answer is written at; 0 for as fast as the socket takes them.
    pace: AtomicU64,
    log: Mutex<Vec<String>>,
    received: Mutex<Vec<Received>>,
    /// While true, answers wait (after counting the request) until it turns false.
    hold: watch::Sender<bool>,
}

pub struct TestOrigin {
    pub addr: SocketAddr,
    tls: bool,
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

impl TestOrigin {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (e.g. where an earlier origin was, to bring it back).
    pub async fn start_on(addr: SocketAddr) -> Self {
        Self::start_with(addr, None).await
    }

    /// Starts an HTTPS origin with this certificate chain and key (PEM files).
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        pingora::tls::install_default_crypto_provider();
        let (certs, key) = pingora::tls::load_certs_and_key_files(
            &cert.display().to_string(),
            &key.display().to_string(),
        )
        .expect("readable test certificate")
        .expect("a certificate and a key");
        let config = pingora::tls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("matching test certificate and key");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        Self::start_with("127.0.0.1:0".parse().unwrap(), Some(acceptor)).await
    }

    async fn start_with(addr: SocketAddr, tls: Option<TlsAcceptor>) -> Self {
        let is_tls = tls.is_some();
        let listener = TcpListener::bind(addr).await.expect("bind test origin");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            objects: Mutex::new(HashMap::new()),
            canned: Mutex::new(HashMap::new()),
            mode: Mutex::new(Mode::Normal),
            faults: Mutex::new(Faults::default()),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
            pace: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            received: Mutex::new(Vec::new()),
            hold: watch::channel(false).0,
        });
        let (stop, stop_rx) = watch::channel(false);
        let st = state.clone();
        tokio::spawn(async move {
            let mut stop_rx2 = stop_rx.clone();
            loop {
                tokio::select! {
                    biased;
                    _ = stop_rx2.changed() => return,
                    accepted = listener.accept() => {
                        let Ok((sock, _)) = accepted else { continue };
                        st.connections.fetch_add(1, Ordering::SeqCst);
                        st.open.fetch_add(1, Ordering::SeqCst);
                        let st = st.clone();
                        let mut stop_rx = stop_rx.clone();
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            let _open = OpenConnection(st.clone());
                            tokio::select! {
                                _ = stop_rx.changed() => {}
                                _ = async {
                                    match tls {
                                        Some(acceptor) => {
                                            if let Ok(s) = acceptor.accept(sock).await {
                                                serve_connection(s, st).await;
                                            }
                                        }
                                        None => serve_connection(sock, st).await,
                                    }
                                } => {}
                            }
                        });
                    }
                }
            }
        });
        Self {
            addr,
            tls: is_tls,
            state,
            stop,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Serves `bytes` at `/objects/{o}/{v}` (replacing what was there).
    pub fn add_object(&self, o: &str, v: &str, bytes: Vec<u8>, content_type: &str) {
        self.add_object_with_headers(o, v, bytes, content_type, &[]);
    }

    /// [`TestOrigin::add_object`] with bytes shared with other origins or the test.
    pub fn add_shared_object(&self, o: &str, v: &str, bytes: Arc<Vec<u8>>, content_type: &str) {
        self.state.objects.lock().unwrap().insert(
            format!("/objects/{o}/{v}"),
            Object {
                bytes,
                content_type: content_type.to_string(),
                headers: Vec::new(),
            },
        );
    }

    /// [`TestOrigin::add_object`] with headers sent on every 200 and 206 for it, such as
    /// `ETag` or `Last-Modified`.
    pub fn add_object_with_headers(
        &self,
        o: &str,
        v: &str,
        bytes: Vec<u8>,
        content_type: &str,
        headers: &[(&str, &str)],
    ) {
        self.state.objects.lock().unwrap().insert(
            format!("/objects/{o}/{v}"),
            Object {
                bytes: Arc::new(bytes),
                content_type: content_type.to_string(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        );
    }

    /// Answers requests for exactly `target` with this status, headers and body.
    pub fn set_response(&self, target: &str, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        self.state.canned.lock().unwrap().insert(
            target.to_string(),
            Canned {
                status,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: body.to_vec(),
            },
        );
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Answers the requests `rule` picks with its fault (rules are tried in the order
    /// added; a registered object's requests only). Takes precedence over [`Mode`].
    pub fn inject(&self, rule: FaultRule) {
        self.state.faults.lock().unwrap().add(rule);
    }

    /// Drops every fault rule: correct answers from now on.
    pub fn heal(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    /// Requests received so far for `/objects/{o}/{v}`, by the first byte of their range.
    pub fn requests_for(&self, o: &str, v: &str, start: u64) -> usize {
        let want = format!("/objects/{o}/{v} bytes={start}-");
        self.log().iter().filter(|l| l.starts_with(&want)).count()
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Writes every answer at about `bytes_per_sec` (0: unpaced), so that fetches stay
    /// in flight for a while.
    pub fn set_pace(&self, bytes_per_sec: u64) {
        self.state.pace.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Connections accepted and not closed yet (by either side).
    pub fn open_connections(&self) -> u64 {
        self.state.open.load(Ordering::SeqCst)
    }

    /// `"{path} {range}"` of every request received so far.
    pub fn log(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }

    /// Holds every answer until [`TestOrigin::release`].
    pub fn hold(&self) {
        self.state.hold.send_replace(true);
    }

    pub fn release(&self) {
        self.state.hold.send_replace(false);
    }

    /// Closes the listener and every connection: further connects are refused.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `out` at about `pace` bytes per second (all at once when 0).
async fn write_paced<S: AsyncWrite + Unpin>(
    sock: &mut S,
    out: &[u8],
    pace: u64,
) -> std::io::Result<()> {
    if pace == 0 {
        return sock.write_all(out).await;
    }
    const CHUNK: usize = 16 * 1024;
    let per_chunk = std::time::Duration::from_secs_f64(CHUNK as f64 / pace as f64);
    for chunk in out.chunks(CHUNK) {
        sock.write_all(chunk).await?;
        tokio::time::sleep(per_chunk).await;
    }
    Ok(())
}

/// Counts a connection as open while it lives.
struct OpenConnection(Arc<State>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A free loopback address with nothing listening on it.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct Request {
    method: String,
    path: String,
    range: Option<String>,
    close: bool,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A request as the origin received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_request<S: AsyncRead + Unpin>(sock: &mut S, buf: &mut Vec<u8>) -> Option<Request> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let mut request_line = lines.next()?.split(' ');
            let method = request_line.next()?.to_string();
            let path = request_line.next()?.to_string();
            let mut range = None;
            let mut close = false;
            let mut length = 0usize;
            let mut headers = Vec::new();
            for line in lines {
                let (k, v) = line.split_once(':')?;
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
                if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                    close = true;
                }
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().ok()?;
                }
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            while buf.len() < length {
                let mut chunk = [0u8; 8192];
                let n = sock.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body: Vec<u8> = buf.drain(..length).collect();
            return Some(Request {
                method,
                path,
                range,
                close,
                headers,
                body,
            });
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(super) fn parse_range(v: &str, size: u64) -> Result<(u64, u64), ()> {
    let spec = v.strip_prefix("bytes=").ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let a: u64 = a.parse().map_err(|_| ())?;
    if a >= size {
        return Err(());
    }
    let b: u64 = if b.is_empty() {
        size - 1
    } else {
        b.parse::<u64>().map_err(|_| ())?.min(size - 1)
    };
    Ok((a, b))
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Resettable + Unpin>(
    mut sock: S,
    st: Arc<State>,
) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut sock, &mut buf).await {
        let nth = st.requests.fetch_add(1, Ordering::SeqCst) + 1;
        st.log.lock().unwrap().push(format!(
            "{} {}",
            req.path,
            req.range.clone().unwrap_or_default()
        ));
        let fail_every = match *st.mode.lock().unwrap() {
            Mode::FailEvery(n) => Some(n),
            _ => None,
        };
        if fail_every.is_some_and(|n| nth.is_multiple_of(n)) {
            let refused = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
            if sock.write_all(refused).await.is_err() || req.close {
                return;
            }
            continue;
        }
        st.received.lock().unwrap().push(Received {
            method: req.method.clone(),
            target: req.path.clone(),
            headers: req.headers.clone(),
            body: req.body.clone(),
        });
        let mut hold = st.hold.subscribe();
        while *hold.borrow_and_update() {
            if hold.changed().await.is_err() {
                return;
            }
        }
        let fault = st
            .faults
            .lock()
            .unwrap()
            .take(&req.path, req.range.as_deref());
        if let Some(fault) = fault {
            match answer_fault(&mut sock, &st, fault, &req).await {
                Some(After::KeepOpen) if !req.close => continue,
                Some(After::Reset) => {
                    sock.reset_on_close();
                    return;
                }
                Some(_) => return,
                None => {}
            }
        }
        let mode = *st.mode.lock().unwrap();
        // The object, and the header lines its 200 and 206 answers carry.
        let (found, mut extra) = match st.objects.lock().unwrap().get(&req.path) {
            Some(o) => (
                Some((o.bytes.clone(), o.content_type.clone())),
                o.headers
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}\r\n"))
                    .collect(),
            ),
            None => (None, String::new()),
        };
        if mode == Mode::ContentEncoding {
            extra.push_str("Content-Encoding: gzip\r\n");
        }
        let canned = st.canned.lock().unwrap().get(&req.path).cloned();
        let (head, body): (String, Vec<u8>) = match (mode, found) {
            (Mode::Hang, _) => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            (Mode::Normal | Mode::EarlyHints | Mode::FailEvery(_), _) if canned.is_some() => {
                let c = canned.expect("checked");
                let mut head = format!(
                    "HTTP/1.1 {} X\r\nContent-Length: {}\r\n",
                    c.status,
                    c.body.len()
                );
                for (k, v) in &c.headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                (head, c.body)
            }
            (Mode::Status(s), _) => (format!("HTTP/1.1 {s} X\r\nContent-Length: 0\r\n"), vec![]),
            (Mode::FailEvery(_), None) if req.method == "POST" => (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n"
                    .into(),
                br#"{"status":200}"#.to_vec(),
            ),
            (_, None) => (
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n".into(),
                vec![],
            ),
            (_, Some((bytes, ct))) => {
                let size = bytes.len() as u64;
                match req.range.as_deref().map(|r| parse_range(r, size)) {
                    None => (
                        format!("HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\n{extra}Content-Length: {size}\r\n"),
                        bytes.to_vec(),
                    ),
                    Some(Err(())) => (
                        format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\nContent-Length: 0\r\n"),
                        vec![],
                    ),
                    Some(Ok((a, b))) => {
                        let body = bytes[a as usize..=b as usize].to_vec();
                        let head = format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Type: {ct}\r\n{extra}Content-Range: bytes {a}-{b}/{size}\r\nContent-Length: {}\r\n",
                            body.len()
                        );
                        (head, body)
                    }
                }
            }
        };
        let mut out = if mode == Mode::EarlyHints {
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n".to_vec()
        } else {
            Vec::new()
        };
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        if write_paced(&mut sock, &out, st.pace.load(Ordering::SeqCst))
            .await
            .is_err()
            || req.close
        {
            return;
        }
    }
}

/// Writes `fault`'s answer to `req`; `None` when the object is not registered (it gets
/// the usual 404).
async fn answer_fault<S: AsyncWrite + Unpin>(
    sock: &mut S,
    st: &State,
    fault: faults::Fault,
    req: &Request,
) -> Option<After> {
    let (bytes, content_type, headers) = {
        let objects = st.objects.lock().unwrap();
        let o = objects.get(&req.path)?;
        (o.bytes.clone(), o.content_type.clone(), o.headers.clone())
    };
    let obj = faults::Object {
        bytes: &bytes,
        content_type: &content_type,
        headers: &headers,
    };
    Some(faults::answer(sock, fault, &obj, req.range.as_deref()).await)
}
