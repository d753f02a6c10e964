//! Client connection limits that Pingora does not enforce by itself: caps on open
//! connections (in all, and per client address) counted from accept, a bounded TLS
//! handshake, a deadline for a whole request (a client trickling bytes, slowloris, is cut
//! off), an idle deadline for connections on which nothing moves, and a least rate at
//! which a client must take its responses.
//!
//! [`GuardedApp`] wraps the HTTP application: it admits every accepted stream
//! ([`admission`]), does the TLS handshake of HTTPS connections ([`handshake`]), and puts
//! the stream inside a [`GuardedStream`] that keeps the deadlines and the send rate
//! ([`send_rate`]).

mod admission;
mod handshake;
mod send_rate;

pub use handshake::TlsHandshake;
pub use send_rate::MinSendRate;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::apps::ServerApp;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use crate::cache::pages::{self, SENDFILE_MIN};
use crate::config::Limits;
use crate::metrics::Metrics;
pub use admission::client_address;
use admission::Admission;
use send_rate::{SendRate, Verdict};

/// Most a first read takes from a new connection before Pingora reads it.
const PREFETCH_BYTES: usize = 4096;

/// Writes up to this size (a response head, a small body) are held until the next write
/// or flush, so that a head and its body leave in one `writev`: one segment and one
/// wake-up of the client instead of two.
const HOLD_BYTES: usize = 4096;

/// The plain HTTP listener on `addr`. Its streams get no write buffer: [`GuardedStream`]
/// holds small writes itself, and sends memory-tier slices by file offset beside the
/// stream, which must then have nothing of its own waiting. (Pingora's default is a
/// 1,460-byte buffer.) Nor a read buffer: Pingora's default of 64 KiB is allocated
/// zeroed for every connection and kept while it is open, about two thirds of what a
/// connection costs; the HTTP/1 session reads request heads into a buffer of its own and
/// bodies in 64 KiB pieces, and keeps pipelined bytes itself, so without it a request
/// with a body takes at most one read more.
pub fn plain_listener(addr: SocketAddr) -> ListenerConfig {
    ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::unbuffered())
}

/// The HTTPS listener on `addr`: plain TCP, with Pingora's default buffers under TLS;
/// [`GuardedApp`] does the handshake ([`TlsHandshake`]).
pub fn tls_listener(addr: SocketAddr) -> ListenerConfig {
    ListenerConfig::tcp(addr.to_string())
}

/// The deadlines a [`GuardedStream`] keeps.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// From the first byte of a request until the edge starts answering it.
    pub request: Duration,
    /// Without a request starting or a byte being written.
    pub idle: Duration,
    /// The least rate at which the client must take responses; `None`: no minimum.
    pub min_send_rate: Option<MinSendRate>,
}

impl Deadlines {
    pub fn from_limits(limits: &Limits) -> Self {
        Self {
            request: limits.request_timeout,
            idle: limits.idle_timeout,
            min_send_rate: (limits.min_send_rate_bytes_per_sec > 0).then_some(MinSendRate {
                bytes_per_sec: limits.min_send_rate_bytes_per_sec,
                window: limits.send_rate_window,
            }),
        }
    }
}

/// Wraps a server application with the connection limits of `[limits]`.
pub struct GuardedApp<A> {
    inner: Arc<A>,
    admission: Admission,
    tls: Option<TlsHandshake>,
    deadlines: Deadlines,
    metrics: Arc<Metrics>,
}

impl<A> GuardedApp<A> {
    /// `tls`: the HTTPS listener's handshake, when there is one.
    pub fn new(
        inner: A,
        limits: &Limits,
        metrics: Arc<Metrics>,
        tls: Option<TlsHandshake>,
    ) -> Self {
        Self {
            inner: Arc::new(inner),
            admission: Admission::new(limits, metrics.clone()),
            tls,
            deadlines: Deadlines::from_limits(limits),
            metrics,
        }
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.admission.open()
    }
}

/// The client's IP address, known since accept (no system call).
fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    let addr = digest.peer_addr()?.as_inet()?.ip();
    Some(addr)
}

#[async_trait]
impl<A> ServerApp for GuardedApp<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Held until this returns or unwinds: the connection is counted exactly as long.
        let _slot = self.admission.admit(peer_ip(&stream)).ok()?;
        let stream = match &self.tls {
            Some(tls) if tls.is_for(&stream) => tls.accept(stream, &self.metrics).await?,
            _ => stream,
        };
        // HTTP/2 multiplexes requests, so only the idle deadline is meaningful for it.
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let deadlines = Deadlines {
            request: if h2 {
                self.deadlines.idle
            } else {
                self.deadlines.request
            },
            ..self.deadlines
        };
        let mut guarded = GuardedStream::new(stream, deadlines, self.metrics.clone());
        // Pingora drops a connection still waiting for its first request when shutdown
        // starts, even one whose request is on its way. Waiting here for the first bytes
        // means a request that arrives before the process stops is read and answered.
        if !h2 && !guarded.prefetch().await {
            return None;
        }
        let mut stream: Stream = Box::new(guarded);
        // The inner application hands back a stream it wants processed again; keep it here
        // so that it is not wrapped and counted twice.
        while let Some(next) = self.inner.process_new(stream, shutdown).await {
            stream = next;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request, or answering one.
    Idle,
    /// A request has started arriving and has not been answered yet.
    Receiving,
}

/// A stream that fails reads and writes once its current deadline has passed, and writes
/// to a client that takes them more slowly than the least send rate.
pub struct GuardedStream {
    inner: Stream,
    deadlines: Deadlines,
    phase: Phase,
    since: Instant,
    timer: Pin<Box<Sleep>>,
    metrics: Arc<Metrics>,
    /// Bytes read by [`GuardedStream::prefetch`], handed out before anything else.
    prefetched: Bytes,
    /// Small writes accepted and not yet passed on (see [`HOLD_BYTES`]).
    held: Vec<u8>,
    /// Whether `inner` writes straight to a socket (plain TCP, not TLS): then a write of
    /// bytes from the page pool may be sent from the pool's file instead.
    raw_socket: bool,
    /// The least send rate, when there is one.
    rate: Option<SendRate>,
    /// Cut off for taking bytes too slowly: counted once, however many writes fail.
    too_slow: bool,
}

impl GuardedStream {
    pub fn new(inner: Stream, deadlines: Deadlines, metrics: Arc<Metrics>) -> Self {
        let now = Instant::now();
        // A plain TCP stream: what it accepts is in the socket (the listener gives it no
        // write buffer, see `plain_listener`), so the socket may be written to beside it.
        let raw_socket = inner.as_any().is::<L4Stream>();
        Self {
            inner,
            deadlines,
            phase: Phase::Idle,
            since: now,
            timer: Box::pin(tokio::time::sleep_until((now + deadlines.idle).into())),
            metrics,
            prefetched: Bytes::new(),
            held: Vec::new(),
            raw_socket,
            rate: deadlines.min_send_rate.map(SendRate::new),
            too_slow: false,
        }
    }

    /// Waits (within the deadlines) for the client's first bytes and keeps them for the
    /// next read. False when the client closed or failed first.
    pub async fn prefetch(&mut self) -> bool {
        let mut buf = BytesMut::with_capacity(PREFETCH_BYTES);
        match self.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {
                self.prefetched = buf.freeze();
                true
            }
            _ => false,
        }
    }

    fn deadline(&self) -> Instant {
        self.since
            + match self.phase {
                Phase::Idle => self.deadlines.idle,
                Phase::Receiving => self.deadlines.request,
            }
    }

    /// Whether the deadline has passed; otherwise arms the timer so the task wakes then.
    /// The timer is moved only when it fires early, not on every byte.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.deadline();
            if Instant::now() >= deadline {
                return true;
            }
            self.timer.as_mut().reset(deadline.into());
        }
    }

    /// A write means the request has been taken in and is being answered.
    fn start_answer(&mut self) {
        if self.phase == Phase::Receiving {
            self.phase = Phase::Idle;
            self.since = Instant::now();
        }
    }

    /// Moves the idle deadline on after bytes were written, or fails a write that has
    /// waited past it or on too slow a client.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    let now = Instant::now();
                    self.since = now;
                    if let Some(rate) = &mut self.rate {
                        rate.took(n, now);
                    }
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match self.write_waits(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }

    /// A write waits on the client: the error that ends it when the deadline has passed
    /// or the client takes bytes too slowly; otherwise the timer is set to wake the task
    /// when either is due.
    fn write_waits(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.rate.is_none() {
            return self.expired(cx).then(|| self.timed_out());
        }
        // Bounded: each turn either returns or sets the timer to a later time than the
        // one that fired (a passed deadline fails; a finished window starts a new one).
        loop {
            let now = Instant::now();
            let deadline = self.deadline();
            if now >= deadline {
                return Some(self.timed_out());
            }
            let wake = match self.rate.as_mut().map(|r| r.waiting(now)) {
                Some(Verdict::TooSlow) => {
                    if !std::mem::replace(&mut self.too_slow, true) {
                        self.metrics.slow_sends.inc();
                    }
                    return Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client takes the response too slowly",
                    ));
                }
                Some(Verdict::WaitUntil(at)) => at.min(deadline),
                None => deadline,
            };
            if self.timer.is_elapsed() || self.timer.deadline().into_std() != wake {
                self.timer.as_mut().reset(wake.into());
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
    }

    /// Passes the held bytes on, however many writes that takes.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let written = Pin::new(&mut self.inner).poll_write(cx, &self.held);
            match self.after_write(cx, written) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => drop(self.held.drain(..n)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends `buf`, which lies in the page pool, from the pool's file: the held head
    /// first (corked, so it leaves with the body), then the bytes by file offset. `None`
    /// when this path does not apply or the socket refused (full, or an error): the
    /// caller then writes `buf` the usual way, which waits for the socket to drain and
    /// reports a broken connection as any write does.
    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Option<Poll<io::Result<usize>>> {
        if !self.raw_socket {
            return None;
        }
        let range = pages::locate(buf)?;
        // Whatever the stream itself buffered must leave first. The listener gives it no
        // write buffer, so this is no system call; should one ever be set, a send from
        // the file still cannot overtake bytes written before it.
        if !matches!(
            Pin::new(&mut self.inner).poll_flush(cx),
            Poll::Ready(Ok(()))
        ) {
            return None;
        }
        let socket = pages::socket_of(self.inner.as_any().downcast_ref::<L4Stream>()?);
        while !self.held.is_empty() {
            match pages::send_more(socket, &self.held) {
                Ok(n) if n > 0 => drop(self.held.drain(..n)),
                _ => return None,
            }
        }
        match range.send(socket, buf.len()) {
            Ok(n) if n > 0 => {
                self.metrics.client_sendfile_bytes.inc_by(n as u64);
                Some(self.after_write(cx, Poll::Ready(Ok(n))))
            }
            _ => None,
        }
    }

    fn timed_out(&self) -> io::Error {
        match self.phase {
            Phase::Idle => {
                self.metrics.connection_timeouts_idle.inc();
                io::Error::new(io::ErrorKind::TimedOut, "client connection idle too long")
            }
            Phase::Receiving => {
                self.metrics.connection_timeouts_request.inc();
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client did not send its request in time",
                )
            }
        }
    }
}

impl fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefetched.is_empty() {
            let n = self.prefetched.len().min(buf.remaining());
            buf.put_slice(&self.prefetched.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && self.phase == Phase::Idle {
                    self.phase = Phase::Receiving;
                    self.since = Instant::now();
                    // The request deadline is usually nearer than the armed idle one.
                    let deadline = self.deadline();
                    if deadline < self.timer.deadline().into_std() {
                        self.timer.as_mut().reset(deadline.into());
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(self.timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.start_answer();
        if self.held.len() + buf.len() <= HOLD_BYTES {
            self.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        if buf.len() >= SENDFILE_MIN {
            if let Some(done) = self.poll_send_file(cx, buf) {
                return done;
            }
        }
        if self.held.is_empty() {
            let written = Pin::new(&mut self.inner).poll_write(cx, buf);
            return self.after_write(cx, written);
        }
        // The held head and this write in one system call.
        loop {
            let this = &mut *self;
            let bufs = [io::IoSlice::new(&this.held), io::IoSlice::new(buf)];
            let written = Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs);
            match self.after_write(cx, written) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) if n > self.held.len() => {
                    let from_buf = n - self.held.len();
                    self.held.clear();
                    return Poll::Ready(Ok(from_buf));
                }
                Poll::Ready(Ok(n)) => drop(self.held.drain(..n)),
                other => return other,
            }
            if self.held.is_empty() {
                let written = Pin::new(&mut self.inner).poll_write(cx, buf);
                return self.after_write(cx, written);
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.start_answer();
        if let Err(e) = std::task::ready!(self.poll_release(cx)) {
            return Poll::Ready(Err(e));
        }
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = std::task::ready!(self.poll_release(cx)) {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => match self.write_waits(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = std::task::ready!(self.poll_release(cx)) {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Pending => match self.write_waits(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        // Held bytes go out first, then TLS's close_notify, within the deadlines. A client
        // that is gone is closed all the same, logged at debug only: Pingora's TLS
        // shutdown logs a WARN line for each client that left first.
        if let Err(e) = AsyncWriteExt::shutdown(self).await {
            tracing::debug!(error = %e, "closing a client connection");
        }
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
