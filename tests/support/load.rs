//! A keep-alive HTTP/1.1 client for load: one connection, one request after another,
//! answers framed by Content-Length or chunked coding (or read to the close).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One connection, opened on first use and again after an error or a close.
pub struct Conn {
    addr: SocketAddr,
    sock: Option<BufReader<TcpStream>>,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, sock: None }
    }

    /// Sends one request and reads its whole answer, within a timeout. On error the
    /// connection is dropped (the next request opens another).
    pub async fn send(
        &mut self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Answer> {
        let result = tokio::time::timeout(TIMEOUT, self.exchange(method, target, body)).await;
        let result = result.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        match &result {
            Ok(a)
                if a.header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close")) =>
            {
                self.sock = None
            }
            Ok(_) => {}
            Err(_) => self.sock = None,
        }
        result
    }

    async fn exchange(
        &mut self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Answer> {
        if self.sock.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.sock = Some(BufReader::with_capacity(64 * 1024, s));
        }
        let sock = self.sock.as_mut().expect("connected");
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: edge.test\r\n");
        if let Some(body) = body {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        sock.get_mut().write_all(&bytes).await?;
        read_answer(sock, method == "HEAD").await
    }
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

async fn read_line(sock: &mut BufReader<TcpStream>, budget: &mut usize) -> std::io::Result<String> {
    let mut line = Vec::new();
    let n = sock.read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    *budget = budget.checked_sub(n).ok_or_else(|| bad("head too large"))?;
    String::from_utf8(line)
        .map(|l| l.trim_end().to_string())
        .map_err(|_| bad("head not UTF-8"))
}

async fn read_answer(sock: &mut BufReader<TcpStream>, head_only: bool) -> std::io::Result<Answer> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(sock, &mut budget).await?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(sock, &mut budget).await?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').ok_or_else(|| bad("header line"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(answer);
    }
    if let Some(len) = answer.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("content-length"))?;
        answer.body.resize(len, 0);
        sock.read_exact(&mut answer.body).await?;
    } else if answer
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let size_line = read_line(sock, &mut budget).await?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("chunk size"))?;
            let start = answer.body.len();
            answer.body.resize(start + size, 0);
            sock.read_exact(&mut answer.body[start..]).await?;
            read_line(sock, &mut budget).await?;
            if size == 0 {
                break;
            }
        }
    } else {
        sock.read_to_end(&mut answer.body).await?;
        answer
            .headers
            .push(("Connection".to_string(), "close".to_string()));
    }
    Ok(answer)
}
