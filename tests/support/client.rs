//! A raw HTTP/1.1 client for tests: one request per connection (`Connection: close`),
//! full control over the bytes sent, and framing checked on the way back.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the body is as long as Content-Length says.
    pub complete: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// `GET target` with extra headers.
pub async fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", target, headers).await
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Response {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let raw = send_raw(addr, req.as_bytes())
        .await
        .expect("request to the edge");
    parse(&raw, method == "HEAD")
        .unwrap_or_else(|| panic!("unparseable response: {:?}", String::from_utf8_lossy(&raw)))
}

/// Sends bytes as they are and reads until the server closes.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(IO_TIMEOUT, async {
        let mut sock = TcpStream::connect(addr).await?;
        sock.write_all(bytes).await?;
        let mut out = Vec::new();
        // A reset after a complete answer still leaves the answer readable.
        let _ = sock.read_to_end(&mut out).await;
        Ok(out)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}

pub fn parse(raw: &[u8], head: bool) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = raw[end + 4..].to_vec();
    let mut r = Response {
        status,
        headers,
        body,
        complete: true,
    };
    if head {
        r.complete = r.body.is_empty();
        return Some(r);
    }
    if let Some(len) = r
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        r.complete = r.body.len() == len;
        if r.body.len() > len {
            r.body.truncate(len);
        }
    }
    Some(r)
}

/// `POST target` with a body (and its Content-Length).
pub async fn post(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut req = format!(
        "POST {target} HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    let raw = send_raw(addr, &bytes).await.expect("request to the edge");
    parse(&raw, false)
        .unwrap_or_else(|| panic!("unparseable response: {:?}", String::from_utf8_lossy(&raw)))
}

/// [`request`] and [`post`] for a server that may be gone: `None` when nothing parsable
/// came back (refused, reset before an answer, or no answer in time). `body` is sent
/// with its Content-Length when given.
pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
) -> Option<Response> {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n");
    if let Some(body) = body {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    let raw = send_raw(addr, &bytes).await.ok()?;
    parse(&raw, method == "HEAD")
}

/// Reads until the server closes or `within` passes; returns whether it closed.
pub async fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A keep-alive connection proven accepted by a 200 answer to `GET target` on it.
pub async fn answered(addr: SocketAddr, target: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {target} HTTP/1.1\r\nHost: e\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    s
}
