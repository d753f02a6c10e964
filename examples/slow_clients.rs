//! Many slow clients: a load generator that holds N connections reading byte ranges at a
//! player's pace, and a probe that measures fresh requests meanwhile. Used by
//! `bench/slow-clients.sh`; build with `cargo build --release --example slow_clients`.
//!
//! ```text
//! slow_clients hold  --addr 127.0.0.1:8080 --path '/?o=..&sc=..' --size BYTES
//!                    --conns 10000 --rate-kbps 625 --range-bytes 4194304
//!                    --ramp-secs 20 --settle-secs 5 --secs 60 --seed 1 [--rcvbuf 32768]
//! slow_clients probe --addr ... --path ... --size BYTES --per-sec 20 --secs 50
//!                    --range-bytes 65536 --seed 1
//! ```
//!
//! `hold`: connection i opens at i / (conns / ramp-secs) s, asks `GET path` with
//! `Range: bytes=a-b` for `range-bytes` at a random offset of the object (seeded per
//! connection and request, so a seed gives the same ranges whatever the timing), and
//! reads head and body through a token bucket of `rate-kbps` kB/s (1,000 bytes; 625 =
//! 5 Mbit/s; see [`Paced`]), with a small `SO_RCVBUF` (default 32 KiB) set before
//! connect so that the pace reaches the server as a full socket and not as a large
//! kernel buffer.
//! At the end of a body it asks for the next range on the same connection (a player's
//! next segment), or opens a new connection if the server closed it. A failed
//! connection is counted and opened again after a second. Every second it prints
//! `T ms=<unix ms> held=<open connections> body=<in a body> bytes=<body bytes so far>
//! responses=<done> errors=<n>`; `STEADY ms=..` once the ramp and the settling time are
//! over, `END ms=.. steady_bytes=.. steady_secs=..` after `secs` more, then a summary
//! of errors by kind, and exits (the connections close with the process).
//!
//! `probe`: opens a fresh connection `per-sec` times a second for `secs`, asks for a
//! `range-bytes` range at a random offset, and records the time from connect to the
//! first response byte (TTFB) and to the last body byte. Prints one `PROBE` line of
//! counts and percentiles (ms), then errors by kind.
//!
//! Both run on one thread (a current-thread runtime: pin them with `taskset`), raise
//! their open-file limit to the hard limit, and talk only to the address given.

#![allow(clippy::print_stdout)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Longest a connection may go without a byte arriving, or a connect may take.
const STALL: Duration = Duration::from_secs(60);
/// Largest response head read before giving up on it.
const MAX_HEAD: usize = 16 * 1024;
/// Pause before opening a failed connection again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Read buffer shared by every connection (the bytes are only counted).
const READ_BUF: usize = 256 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF]);
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        bail!("usage: slow_clients hold|probe --addr A --path P --size N ... (see the source)");
    };
    let opts = Opts::parse(rest)?;
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match mode.as_str() {
        "hold" => rt.block_on(hold(Arc::new(opts))),
        "probe" => rt.block_on(probe(Arc::new(opts))),
        other => bail!("unknown mode {other:?}: hold or probe"),
    }
}

#[derive(Debug, Clone)]
struct Opts {
    addr: SocketAddr,
    path: String,
    size: u64,
    conns: u64,
    rate: f64,
    range: u64,
    ramp: Duration,
    settle: Duration,
    secs: Duration,
    seed: u64,
    rcvbuf: u32,
    per_sec: f64,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self> {
        let mut o = Opts {
            addr: "127.0.0.1:8080".parse()?,
            path: "/".into(),
            size: 0,
            conns: 100,
            rate: 625_000.0,
            range: 4 << 20,
            ramp: Duration::from_secs(10),
            settle: Duration::from_secs(5),
            secs: Duration::from_secs(30),
            seed: 1,
            rcvbuf: 32_768,
            per_sec: 20.0,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let v = it.next().with_context(|| format!("{flag} needs a value"))?;
            let num = || -> Result<u64> { v.parse().with_context(|| format!("{flag} {v:?}")) };
            let secs = || -> Result<Duration> {
                Ok(Duration::from_secs_f64(
                    v.parse().with_context(|| format!("{flag} {v:?}"))?,
                ))
            };
            match flag.as_str() {
                "--addr" => o.addr = v.parse().with_context(|| format!("--addr {v:?}"))?,
                "--path" => o.path = v.clone(),
                "--size" => o.size = num()?,
                "--conns" => o.conns = num()?,
                "--rate-kbps" => o.rate = num()? as f64 * 1000.0,
                "--range-bytes" => o.range = num()?,
                "--ramp-secs" => o.ramp = secs()?,
                "--settle-secs" => o.settle = secs()?,
                "--secs" => o.secs = secs()?,
                "--seed" => o.seed = num()?,
                "--rcvbuf" => o.rcvbuf = u32::try_from(num()?)?,
                "--per-sec" => o.per_sec = v.parse().with_context(|| format!("--per-sec {v:?}"))?,
                _ => bail!("unknown option {flag}"),
            }
        }
        if !o.addr.ip().is_loopback() {
            bail!("--addr must be a loopback address: this tool only loads this machine");
        }
        if o.size == 0 || o.range == 0 || o.range > o.size {
            bail!("--size must be given, and --range-bytes within it");
        }
        if o.rate <= 0.0 || o.per_sec <= 0.0 || o.conns == 0 {
            bail!("--rate-kbps, --per-sec and --conns must be positive");
        }
        Ok(o)
    }

    /// The range of request `n` on connection `conn`: the same for a seed, whatever the
    /// timing.
    fn range_of(&self, conn: u64, n: u64) -> (u64, u64) {
        let r = splitmix(self.seed ^ splitmix(conn.wrapping_mul(0x9E37) ^ splitmix(n)));
        let start = r % (self.size - self.range + 1);
        (start, start + self.range - 1)
    }

    fn request(&self, (start, end): (u64, u64)) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nRange: bytes={start}-{end}\r\nUser-Agent: slow_clients\r\n\r\n",
            self.path, self.addr
        )
        .into_bytes()
    }
}

/// SplitMix64: a fixed, well-mixed function of its input (no crate version changes it).
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    if let Err(e) = setrlimit(Resource::Nofile, limit) {
        eprintln!("slow_clients: could not raise RLIMIT_NOFILE: {e}");
    }
}

/// User and system CPU time of this process so far, from `/proc/self/stat`.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Errors by kind, printed at the end.
#[derive(Default)]
struct Errors(Mutex<BTreeMap<String, u64>>);

impl Errors {
    fn add(&self, kind: String) {
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry(kind)
            .or_default() += 1;
    }

    fn total(&self) -> u64 {
        self.0.lock().expect("not poisoned").values().sum()
    }

    fn print(&self) {
        for (kind, n) in self.0.lock().expect("not poisoned").iter() {
            println!("ERRORS {n} {kind}");
        }
    }
}

#[derive(Default)]
struct Counters {
    held: AtomicU64,
    in_body: AtomicU64,
    bytes: AtomicU64,
    responses: AtomicU64,
    errors: Errors,
}

// ------------------------------------------------------------------ hold

async fn hold(o: Arc<Opts>) -> Result<()> {
    let c = Arc::new(Counters::default());
    let start = tokio::time::Instant::now();
    let gap = o.ramp.as_secs_f64() / o.conns as f64;
    for i in 0..o.conns {
        let (o, c) = (o.clone(), c.clone());
        let at = start + Duration::from_secs_f64(gap * i as f64);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            connection(&o, &c, i).await;
        });
    }
    let steady_at = start + o.ramp + o.settle;
    let end_at = steady_at + o.secs;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut steady_bytes = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                println!(
                    "T ms={} held={} body={} bytes={} responses={} errors={}",
                    unix_ms(),
                    c.held.load(Ordering::Relaxed),
                    c.in_body.load(Ordering::Relaxed),
                    c.bytes.load(Ordering::Relaxed),
                    c.responses.load(Ordering::Relaxed),
                    c.errors.total(),
                );
            }
            _ = tokio::time::sleep_until(steady_at), if steady_bytes.is_none() => {
                steady_bytes = Some((c.bytes.load(Ordering::Relaxed), Instant::now(), cpu_secs()));
                println!("STEADY ms={} held={}", unix_ms(), c.held.load(Ordering::Relaxed));
            }
            _ = tokio::time::sleep_until(end_at) => break,
        }
    }
    let (from, t0, cpu0) = steady_bytes.expect("steady comes before the end");
    println!(
        "END ms={} held={} steady_bytes={} steady_secs={:.3} steady_cpu_secs={:.2} responses={} errors={}",
        unix_ms(),
        c.held.load(Ordering::Relaxed),
        c.bytes.load(Ordering::Relaxed) - from,
        t0.elapsed().as_secs_f64(),
        cpu_secs() - cpu0,
        c.responses.load(Ordering::Relaxed),
        c.errors.total(),
    );
    c.errors.print();
    // The tasks and their connections end with the process.
    std::process::exit(0);
}

/// One player: keeps a connection open and asks for range after range.
async fn connection(o: &Opts, c: &Counters, conn: u64) {
    let mut n = 0u64;
    // Bounded by the process: it exits at the end of the run.
    loop {
        let stream = match connect(o).await {
            Ok(s) => s,
            Err(e) => {
                c.errors.add(format!("connect: {e}"));
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        c.held.fetch_add(1, Ordering::Relaxed);
        let mut paced = Paced::new(stream, o.rate, o.rcvbuf);
        let ended = loop {
            match exchange(o, c, &mut paced, o.range_of(conn, n)).await {
                Ok(true) => n += 1,
                Ok(false) => {
                    n += 1;
                    break None;
                }
                Err(e) => break Some(e),
            }
        };
        c.held.fetch_sub(1, Ordering::Relaxed);
        if let Some(e) = ended {
            c.errors.add(e);
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }
}

async fn connect(o: &Opts) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    // Before connect, so the window the server sees is small from the start.
    socket.set_recv_buffer_size(o.rcvbuf)?;
    match tokio::time::timeout(STALL, socket.connect(o.addr)).await {
        Ok(s) => s,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// One request and its response, read at the pace. `Ok(true)`: the connection may be
/// used again; `Ok(false)`: the server closes it. `Err`: a kind of error.
async fn exchange(
    o: &Opts,
    c: &Counters,
    s: &mut Paced,
    range: (u64, u64),
) -> Result<bool, String> {
    s.stream
        .write_all(&o.request(range))
        .await
        .map_err(|e| format!("write: {}", e.kind()))?;
    let mut head = Vec::with_capacity(512);
    let (status, length, close) = loop {
        let n = s.read(&mut head, usize::MAX).await?;
        if n == 0 {
            return Err("closed before the response head".into());
        }
        if let Some(parsed) = parse_head(&head)? {
            break parsed;
        }
        if head.len() > MAX_HEAD {
            return Err("response head too long".into());
        }
    };
    let (head_len, status, length, close) = (status.0, status.1, length, close);
    let mut left = length
        .checked_sub((head.len() - head_len) as u64)
        .ok_or("more body than Content-Length")?;
    c.bytes
        .fetch_add((head.len() - head_len) as u64, Ordering::Relaxed);
    if status != 206 {
        // Read the (short) body so the connection stays usable, then count the refusal.
        while left > 0 {
            let n = s.read(&mut Vec::new(), left as usize).await?;
            if n == 0 {
                break;
            }
            left -= n as u64;
        }
        return Err(format!("status {status}"));
    }
    if length != o.range {
        return Err(format!("Content-Length {length}, not {}", o.range));
    }
    c.in_body.fetch_add(1, Ordering::Relaxed);
    let result = async {
        while left > 0 {
            let n = s.read_counted(left as usize).await?;
            if n == 0 {
                return Err("closed mid-body".to_string());
            }
            c.bytes.fetch_add(n as u64, Ordering::Relaxed);
            left -= n as u64;
        }
        Ok(())
    }
    .await;
    c.in_body.fetch_sub(1, Ordering::Relaxed);
    result?;
    c.responses.fetch_add(1, Ordering::Relaxed);
    Ok(!close)
}

/// ((head length, status), Content-Length, Connection: close) once the head is complete.
type Head = ((usize, u16), u64, bool);

fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "response head not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("no status line")?;
    let (mut length, mut close) = (None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<u64>().ok();
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let length = length.ok_or_else(|| format!("status {status} without Content-Length"))?;
    Ok(Some(((end + 4, status), length, close)))
}

/// A stream read through a token bucket. Reads come at most every `min_read / rate`
/// seconds and wait for `min_read` tokens (half the receive buffer, at least 4 KiB);
/// each takes what the bucket and the socket hold. The bucket holds a quarter of a
/// second's bytes (at least two reads' worth), so a read that found the socket short
/// is made up by the next ones, and the rate asked is kept whenever the server keeps up.
struct Paced {
    stream: TcpStream,
    rate: f64,
    tokens: f64,
    burst: f64,
    min_read: f64,
    last: tokio::time::Instant,
    next_read: tokio::time::Instant,
}

impl Paced {
    fn new(stream: TcpStream, rate: f64, rcvbuf: u32) -> Self {
        let min_read = (f64::from(rcvbuf) / 2.0).max(4096.0);
        let burst = (rate / 4.0).max(2.0 * min_read).min(READ_BUF as f64);
        let now = tokio::time::Instant::now();
        Self {
            stream,
            rate,
            tokens: min_read,
            burst,
            min_read: min_read.min(burst),
            last: now,
            next_read: now,
        }
    }

    /// Waits for tokens, then reads at most `max` bytes (and what the bucket holds),
    /// appending them to `keep`. 0: the server closed.
    async fn read(&mut self, keep: &mut Vec<u8>, max: usize) -> Result<usize, String> {
        self.read_into(Some(keep), max).await
    }

    /// As `read`, but the bytes are only counted.
    async fn read_counted(&mut self, max: usize) -> Result<usize, String> {
        self.read_into(None, max).await
    }

    async fn read_into(
        &mut self,
        mut keep: Option<&mut Vec<u8>>,
        max: usize,
    ) -> Result<usize, String> {
        loop {
            let now = tokio::time::Instant::now();
            self.tokens =
                (self.tokens + (now - self.last).as_secs_f64() * self.rate).min(self.burst);
            self.last = now;
            let mut at = self.next_read;
            if self.tokens < self.min_read {
                at = at
                    .max(now + Duration::from_secs_f64((self.min_read - self.tokens) / self.rate));
            }
            if at > now {
                tokio::time::sleep_until(at).await;
                continue;
            }
            match tokio::time::timeout(STALL, self.stream.readable()).await {
                Err(_) => return Err("no byte for 60 s".into()),
                Ok(Err(e)) => return Err(format!("read: {}", e.kind())),
                Ok(Ok(())) => {}
            }
            let want = max.min(self.tokens as usize).min(READ_BUF);
            let got = SCRATCH.with(|b| {
                let mut b = b.borrow_mut();
                let r = self.stream.try_read(&mut b[..want]);
                if let (Ok(n), Some(keep)) = (&r, keep.as_deref_mut()) {
                    keep.extend_from_slice(&b[..*n]);
                }
                r
            });
            match got {
                Ok(n) => {
                    self.tokens -= n as f64;
                    self.next_read = tokio::time::Instant::now()
                        + Duration::from_secs_f64(self.min_read / self.rate);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("read: {}", e.kind())),
            }
        }
    }
}

// ------------------------------------------------------------------ probe

#[derive(Default)]
struct Samples {
    ttfb: Vec<f64>,
    total: Vec<f64>,
}

async fn probe(o: Arc<Opts>) -> Result<()> {
    let samples = Arc::new(Mutex::new(Samples::default()));
    let errors = Arc::new(Errors::default());
    let count = (o.per_sec * o.secs.as_secs_f64()).round() as u64;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(count as usize);
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / o.per_sec)).await;
        let (o, samples, errors) = (o.clone(), samples.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            match tokio::time::timeout(STALL, one_probe(&o, i)).await {
                Ok(Ok((ttfb, total))) => {
                    let mut s = samples.lock().expect("not poisoned");
                    s.ttfb.push(ttfb);
                    s.total.push(total);
                }
                Ok(Err(e)) => errors.add(e),
                Err(_) => errors.add("no answer in 60 s".into()),
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let mut s = std::mem::take(&mut *samples.lock().expect("not poisoned"));
    let (t, a) = (pct(&mut s.ttfb), pct(&mut s.total));
    println!(
        "PROBE sent={count} ok={} errors={} ttfb_p50_ms={:.2} ttfb_p99_ms={:.2} ttfb_max_ms={:.2} total_p50_ms={:.2} total_p99_ms={:.2} total_max_ms={:.2}",
        s.ttfb.len(),
        errors.total(),
        t.0, t.1, t.2, a.0, a.1, a.2
    );
    errors.print();
    Ok(())
}

/// p50, p99 and max in ms (nearest rank); zeros when empty.
fn pct(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.99), v[v.len() - 1])
}

/// One fresh connection and one small range: (ms to the first byte, ms to the last).
async fn one_probe(o: &Opts, i: u64) -> Result<(f64, f64), String> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(o.addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let range = o.range_of(u64::MAX - i, 0);
    stream
        .write_all(&o.request(range))
        .await
        .map_err(|e| format!("write: {}", e.kind()))?;
    let mut head = Vec::with_capacity(512);
    let mut ttfb = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut body = 0u64;
    let mut parsed: Option<Head> = None;
    loop {
        stream
            .readable()
            .await
            .map_err(|e| format!("read: {}", e.kind()))?;
        let n = match stream.try_read(&mut buf) {
            Ok(0) => return Err("closed before the end of the response".into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("read: {}", e.kind())),
        };
        ttfb.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1e3);
        match parsed {
            None => {
                head.extend_from_slice(&buf[..n]);
                if let Some(p) = parse_head(&head)? {
                    body = (head.len() - p.0 .0) as u64;
                    parsed = Some(p);
                } else if head.len() > MAX_HEAD {
                    return Err("response head too long".into());
                }
            }
            Some(_) => body += n as u64,
        }
        if let Some(((_, status), length, _)) = parsed {
            if body >= length {
                if status != 206 || length != o.range {
                    return Err(format!("status {status}, Content-Length {length}"));
                }
                let total = started.elapsed().as_secs_f64() * 1e3;
                return Ok((ttfb.unwrap_or(total), total));
            }
        }
    }
}
