//! Tests of [`super::GuardedStream`]'s writes: held heads, and bytes sent by file offset.

use super::*;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A guarded server end of a loopback TCP connection, and its client end.
async fn socket_pair(metrics: Arc<Metrics>) -> (GuardedStream, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    let server = pingora::protocols::l4::stream::Stream::from(accepted.unwrap().0);
    let deadlines = Deadlines {
        request: Duration::from_secs(30),
        idle: Duration::from_secs(30),
    };
    (
        GuardedStream::new(Box::new(server), deadlines, metrics),
        client.unwrap(),
    )
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
