//! Tests of [`super::GuardedStream`]'s writes (held heads, bytes sent by file offset, the
//! least send rate) and of [`super::GuardedApp`]'s slots. Streams of real sockets are
//! accepted by a Pingora listener built by [`plain_listener`], as the public service
//! builds them.

use super::*;
use std::os::fd::IntoRawFd;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Records each write call as one entry; reads never complete.
#[derive(Debug, Default, Clone)]
struct Recorder {
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    fn writes(&self) -> Vec<Vec<u8>> {
        self.writes.lock().unwrap().clone()
    }
}

impl AsyncRead for Recorder {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes.lock().unwrap().push(buf.to_vec());
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let n = all.len();
        self.writes.lock().unwrap().push(all);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Shutdown for Recorder {
    async fn shutdown(&mut self) {}
}
impl UniqueID for Recorder {
    fn id(&self) -> UniqueIDType {
        0
    }
}
impl Ssl for Recorder {}
impl GetTimingDigest for Recorder {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}
impl GetProxyDigest for Recorder {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}
impl GetSocketDigest for Recorder {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        None
    }
}
impl Peek for Recorder {}

fn guarded(recorder: &Recorder) -> GuardedStream {
    let deadlines = Deadlines {
        request: Duration::from_secs(10),
        idle: Duration::from_secs(10),
        min_send_rate: None,
    };
    GuardedStream::new(
        Box::new(recorder.clone()),
        deadlines,
        Arc::new(Metrics::new()),
    )
}

#[tokio::test]
async fn a_small_head_leaves_with_the_body_in_one_write() {
    let rec = Recorder::default();
    let mut s = guarded(&rec);
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n".to_vec();
    let body = vec![7u8; 10_000];
    s.write_all(&head).await.unwrap();
    assert!(rec.writes().is_empty(), "the head is held");
    s.write_all(&body).await.unwrap();
    assert_eq!(rec.writes(), vec![[head.clone(), body.clone()].concat()]);
    s.write_all(&body).await.unwrap();
    assert_eq!(rec.writes().len(), 2, "nothing held: written through");
}

#[tokio::test]
async fn held_bytes_go_out_on_flush_and_shutdown() {
    let rec = Recorder::default();
    let mut s = guarded(&rec);
    s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .await
        .unwrap();
    s.write_all(b"and a small body").await.unwrap();
    assert!(rec.writes().is_empty());
    s.flush().await.unwrap();
    assert_eq!(
        rec.writes(),
        vec![b"HTTP/1.1 204 No Content\r\n\r\nand a small body".to_vec()]
    );
    s.write_all(b"last words").await.unwrap();
    Shutdown::shutdown(&mut s).await;
    assert_eq!(rec.writes().last().unwrap(), b"last words");
}

/// Hands each accepted stream to the test.
struct Handover(mpsc::UnboundedSender<Stream>);

#[async_trait]
impl ServerApp for Handover {
    async fn process_new(self: &Arc<Self>, stream: Stream, _: &ShutdownWatch) -> Option<Stream> {
        let _ = self.0.send(stream);
        None
    }
}

/// A Pingora listener on a free loopback port, configured by `listener` as the public
/// service configures its own; its accepted streams come out of the receiver. It stops
/// when the sender of the returned watch is dropped.
async fn listen(
    listener: fn(SocketAddr) -> ListenerConfig,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Stream>,
    tokio::sync::watch::Sender<bool>,
) {
    use pingora::services::Service as _;
    // Bound here and handed over as an inherited descriptor, so the port cannot be taken
    // between choosing and binding it.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr = socket.local_addr().unwrap();
    let mut fds = pingora::server::Fds::new();
    fds.add(addr.to_string(), socket.into_raw_fd());
    let (tx, rx) = mpsc::unbounded_channel();
    let mut service =
        pingora::services::listening::Service::new("test listener".into(), Handover(tx));
    service.add_listener(listener(addr));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let fds = Arc::new(parking_lot::Mutex::new(fds));
        service.start_service(Some(fds), shutdown, 1).await;
    });
    (addr, rx, stop)
}

/// The server end of a loopback TCP connection as the public listener accepts it, and
/// its client end.
async fn accepted_pair() -> (Stream, tokio::net::TcpStream) {
    let (addr, mut accepted, stop) = listen(plain_listener).await;
    let client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server = tokio::time::timeout(Duration::from_secs(5), accepted.recv())
        .await
        .expect("accepted in time")
        .unwrap();
    drop(stop);
    (server, client)
}

/// A guarded server end of a loopback TCP connection, and its client end.
async fn socket_pair(metrics: Arc<Metrics>) -> (GuardedStream, tokio::net::TcpStream) {
    socket_pair_with(metrics, None).await
}

async fn socket_pair_with(
    metrics: Arc<Metrics>,
    min_send_rate: Option<MinSendRate>,
) -> (GuardedStream, tokio::net::TcpStream) {
    let (server, client) = accepted_pair().await;
    let deadlines = Deadlines {
        request: Duration::from_secs(30),
        idle: Duration::from_secs(30),
        min_send_rate,
    };
    (GuardedStream::new(server, deadlines, metrics), client)
}

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect::<Vec<u8>>()
        .into()
}

async fn read_exactly(client: &mut tokio::net::TcpStream, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    client.read_exact(&mut got).await.unwrap();
    got
}

#[tokio::test]
async fn pool_bytes_follow_the_held_head_on_a_plain_socket_without_a_copy() {
    let metrics = Arc::new(Metrics::new());
    let (mut server, mut client) = socket_pair(metrics.clone()).await;
    let pool = crate::cache::pages::PagePool::for_tier(1 << 20, 1 << 20).unwrap();
    let body = pool.adopt(pattern(1 << 20));
    assert!(crate::cache::pages::locate(&body).is_some());
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    let (sent, got) = tokio::join!(
        async {
            server.write_all(&head).await?;
            server.write_all(&body[..300_000]).await?;
            server.write_all(&body[300_000..]).await?;
            server.flush().await
        },
        read_exactly(&mut client, head.len() + body.len())
    );
    sent.unwrap();
    assert!(
        got == [&head[..], &body[..]].concat(),
        "head, then the body"
    );
    assert!(
        metrics.client_sendfile_bytes.get() > 0,
        "sent from the file"
    );
}

#[tokio::test]
async fn a_full_socket_falls_back_to_writing_and_loses_nothing() {
    let metrics = Arc::new(Metrics::new());
    let (mut server, mut client) = socket_pair(metrics.clone()).await;
    // Far more than loopback socket buffers hold, so a write finds the socket full.
    let len = 32 << 20;
    let pool = crate::cache::pages::PagePool::for_tier(len as u64, len as u64).unwrap();
    let body = pool.adopt(pattern(len));
    assert!(crate::cache::pages::locate(&body).is_some());
    let mut write = std::pin::pin!(server.write_all(&body));
    assert!(
        futures_poll_once(write.as_mut()).await.is_pending(),
        "the socket filled up"
    );
    let (sent, got) = tokio::join!(write, read_exactly(&mut client, len));
    sent.unwrap();
    assert!(got == body[..], "every byte, in order");
    assert!(metrics.client_sendfile_bytes.get() > 0);
}

#[tokio::test]
async fn pool_bytes_written_through_other_streams_are_written_as_bytes() {
    let rec = Recorder::default();
    let mut s = guarded(&rec);
    let pool = crate::cache::pages::PagePool::for_tier(1 << 20, 1 << 20).unwrap();
    let body = pool.adopt(pattern(100_000));
    s.write_all(&body).await.unwrap();
    assert!(rec.writes().concat() == body[..]);
}

/// Polls `f` once and reports what it returned.
async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut f).poll(cx))).await
}

#[tokio::test]
async fn small_writes_never_fall_behind_pool_bytes_sent_from_the_file() {
    let metrics = Arc::new(Metrics::new());
    let (mut server, mut client) = socket_pair(metrics.clone()).await;
    let pool = crate::cache::pages::PagePool::for_tier(1 << 20, 1 << 20).unwrap();
    let body = pool.adopt(pattern(1 << 20));
    // A chunked body's framing goes out in small vectored writes, which pass the held
    // bytes and go to the stream as they are; the body after it is sent from the file.
    let (framing, end) = (b"100000\r\n".to_vec(), b"\r\n0\r\n\r\n".to_vec());
    let (sent, got) = tokio::join!(
        async {
            server.write_all(b"HTTP/1.1 200 OK\r\n").await?;
            let n = server
                .write_vectored(&[io::IoSlice::new(b"Transfer-Encoding: chunked\r\n\r\n")])
                .await?;
            assert_eq!(n, 30);
            let n = server.write_vectored(&[io::IoSlice::new(&framing)]).await?;
            assert_eq!(n, framing.len());
            server.write_all(&body).await?;
            server.write_all(&end).await?;
            server.flush().await
        },
        read_exactly(
            &mut client,
            17 + 30 + framing.len() + body.len() + end.len()
        )
    );
    sent.unwrap();
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert!(
        got == [&head[..], &framing, &body[..], &end].concat(),
        "every byte in the order written"
    );
    assert!(
        metrics.client_sendfile_bytes.get() > 0,
        "the body left by sendfile"
    );
}

/// An application whose handler panics after the first bytes arrive.
struct Panics;

#[async_trait]
impl ServerApp for Panics {
    async fn process_new(self: &Arc<Self>, _: Stream, _: &ShutdownWatch) -> Option<Stream> {
        panic!("a bug in the request handler");
    }
}

fn limits(toml: &str) -> Limits {
    crate::config::Config::from_toml(&format!(
        "[listen]\nhttp = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n[signing]\n\
         [[signing.keys]]\nid = \"k\"\nsecret = \"s\"\n[origin]\nurls = [\"http://127.0.0.1:3\"]\n\
         [limits]\n{toml}\n"
    ))
    .unwrap()
    .limits
}

#[tokio::test]
async fn a_panicking_handler_gives_its_connection_slot_back() {
    let metrics = Arc::new(Metrics::new());
    let app = Arc::new(GuardedApp::new(
        Panics,
        &limits("max_connections = 1\nmax_connections_per_ip = 1"),
        metrics.clone(),
        None,
    ));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    for _ in 0..2 {
        let (server, mut client) = accepted_pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (task_app, shutdown) = (app.clone(), shutdown.clone());
        let task = tokio::spawn(async move { task_app.process_new(server, &shutdown).await });
        let ended = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the handler ran");
        assert!(ended.unwrap_err().is_panic());
        assert_eq!(app.open_connections(), 0, "the slot came back");
        assert_eq!(metrics.connections_open.get(), 0);
    }
    assert_eq!(
        metrics.connections_refused.get(),
        0,
        "the cap of 1 let both in"
    );
}

/// A socket pair whose client must take 1 MB/s over each `window_ms` of waiting.
async fn rate_limited_pair(
    metrics: Arc<Metrics>,
    window_ms: u64,
) -> (GuardedStream, tokio::net::TcpStream) {
    let rate = MinSendRate {
        bytes_per_sec: 1_000_000,
        window: Duration::from_millis(window_ms),
    };
    socket_pair_with(metrics, Some(rate)).await
}

#[tokio::test]
async fn a_client_taking_a_trickle_is_cut_off_by_the_send_rate() {
    let metrics = Arc::new(Metrics::new());
    // A client must take 300 kB in each 300 ms of waiting.
    let (mut server, mut client) = rate_limited_pair(metrics.clone(), 300).await;
    // Far more than the socket buffers hold, so writes wait on the client.
    let body = vec![7u8; 32 << 20];
    let started = Instant::now();
    let trickle = async {
        let mut buf = [0u8; 1024];
        // 1 kB every 20 ms (50 kB/s), for as long as the write lasts.
        loop {
            let _ = client.read(&mut buf).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let written = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            r = server.write_all(&body) => r,
            () = trickle => unreachable!(),
        }
    })
    .await
    .expect("the slow client was not cut off");
    let err = written.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Later writes fail too, and the cut-off is counted once.
    let again = server.write_all(&body).await.unwrap_err();
    assert_eq!(again.kind(), io::ErrorKind::TimedOut, "{again}");
    assert_eq!(metrics.slow_sends.get(), 1);
    assert_eq!(metrics.connection_timeouts_idle.get(), 0);
}

#[tokio::test]
async fn clients_that_keep_up_and_pauses_of_the_edge_are_not_cut_off() {
    let metrics = Arc::new(Metrics::new());
    let (mut server, mut client) = rate_limited_pair(metrics.clone(), 100).await;
    let body = vec![7u8; 32 << 20];
    for _ in 0..2 {
        let (written, got) = tokio::join!(
            server.write_all(&body),
            read_exactly(&mut client, body.len())
        );
        written.unwrap();
        assert_eq!(got.len(), body.len());
        // The edge itself waits (on an origin, for a request) far longer than a window.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(metrics.slow_sends.get(), 0);
}
