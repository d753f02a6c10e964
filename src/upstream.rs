//! Upstreams other than the origin's slice path: resolution, peers, and whole-body HTTP
//! exchanges (dictionary lookups now; forwarding later) over Pingora's pooled connector.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use crate::config::{Config, UpstreamUrl};

/// How long an idle pooled upstream connection is kept.
pub const POOL_IDLE: Duration = Duration::from_secs(60);

/// How every connector towards origins and upstreams is built.
#[derive(Debug, Clone)]
pub struct ConnectorSettings {
    /// Idle connections kept per connector.
    pub keepalive_pool: usize,
    /// Trust store replacing the system roots for HTTPS upstreams.
    pub ca_file: Option<String>,
}

impl ConnectorSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            keepalive_pool: config.server.upstream_keepalive_pool,
            ca_file: config.tls.ca_file.as_ref().map(|p| p.display().to_string()),
        }
    }

    pub fn options(&self) -> ConnectorOptions {
        let mut options = ConnectorOptions::new(self.keepalive_pool);
        options.ca_file = self.ca_file.clone();
        options
    }
}

/// Why an upstream host could not be resolved at start.
#[derive(Debug, thiserror::Error)]
#[error("upstream {url}: cannot resolve {host}:{port}: {detail}")]
pub struct ResolveError {
    url: String,
    host: String,
    port: u16,
    detail: String,
}

/// Resolves an upstream's host once (blocking: call at start only).
pub fn resolve(u: &UpstreamUrl) -> Result<SocketAddr, ResolveError> {
    let err = |detail: String| ResolveError {
        url: u.url.clone(),
        host: u.host.clone(),
        port: u.port,
        detail,
    };
    (u.host.as_str(), u.port)
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))
}

/// The `Host` header for an upstream: the port only when it is not the scheme's default.
pub fn host_header(u: &UpstreamUrl) -> String {
    let default_port = if u.tls { 443 } else { 80 };
    if u.port == default_port {
        u.host.clone()
    } else if u.host.contains(':') {
        format!("[{}]:{}", u.host, u.port)
    } else {
        format!("{}:{}", u.host, u.port)
    }
}

/// A peer with every network timeout set.
pub fn peer(u: &UpstreamUrl, addr: SocketAddr, connect: Duration, io: Duration) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, u.tls, u.host.clone());
    peer.options.connection_timeout = Some(connect);
    peer.options.total_connection_timeout = Some(connect);
    peer.options.read_timeout = Some(io);
    peer.options.write_timeout = Some(io);
    peer.options.idle_timeout = Some(POOL_IDLE);
    peer
}

/// Reads the header of the final answer, past any interim ones (100 Continue, 103 Early
/// Hints), which a client must accept and skip (RFC 9110 §15.2); it is then
/// `session.response_header()`. A 101 is final. Bounded by the caller's deadline.
pub async fn read_final_header(session: &mut HttpSession) -> pingora::Result<()> {
    loop {
        session.read_response_header().await?;
        let status = session.response_header().map_or(0, |r| r.status.as_u16());
        if !(100..200).contains(&status) || status == 101 {
            return Ok(());
        }
    }
}

/// Whether an exchange on a pooled connection failed before any answer came on it
/// (the connection was closed or reset, or the request could not be written): the one
/// case where asking again on a new connection is safe. Not for a malformed answer,
/// which was read, nor for a timeout.
pub fn lost_before_answer(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
    )
}

/// Why an exchange with an upstream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    #[error("{url}: cannot connect or lost the connection: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("{url}: no complete answer within {ms} ms")]
    Timeout { url: String, ms: u64 },
    #[error("{url}: answer ({status}) body larger than {limit} bytes")]
    TooLarge {
        url: String,
        status: u16,
        limit: usize,
    },
    #[error("{url}: unusable answer: {why}")]
    Invalid { url: String, why: &'static str },
}

/// A complete upstream answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One resolved upstream with its pooled connections.
pub struct HttpUpstream {
    pub url: UpstreamUrl,
    peer: HttpPeer,
    host: String,
    timeout: Duration,
}

impl HttpUpstream {
    /// Resolves the host (blocking; at start).
    pub fn new(
        url: &UpstreamUrl,
        connect: Duration,
        timeout: Duration,
    ) -> Result<Self, ResolveError> {
        let addr = resolve(url)?;
        Ok(Self {
            peer: peer(url, addr, connect, timeout),
            host: host_header(url),
            url: url.clone(),
            timeout,
        })
    }

    /// Sends `method target` with `headers` and an optional body, and reads the whole
    /// answer (at most `max_body` bytes), all within the upstream's timeout.
    pub async fn exchange(
        &self,
        connector: &Connector,
        method: &str,
        target: &str,
        headers: &[(http::HeaderName, http::HeaderValue)],
        body: Option<Bytes>,
        max_body: usize,
    ) -> Result<Answer, ExchangeError> {
        match tokio::time::timeout(
            self.timeout,
            self.exchange_once(connector, method, target, headers, body, max_body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(self.timeout_error()),
        }
    }

    fn timeout_error(&self) -> ExchangeError {
        ExchangeError::Timeout {
            url: self.url.url.clone(),
            ms: self.timeout.as_millis() as u64,
        }
    }

    fn transport_error(&self, e: &pingora::Error) -> ExchangeError {
        match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                self.timeout_error()
            }
            _ => ExchangeError::Unreachable {
                url: self.url.url.clone(),
                detail: e.to_string(),
            },
        }
    }

    async fn exchange_once(
        &self,
        connector: &Connector,
        method: &str,
        target: &str,
        headers: &[(http::HeaderName, http::HeaderValue)],
        body: Option<Bytes>,
        max_body: usize,
    ) -> Result<Answer, ExchangeError> {
        // A pooled connection may have been closed by the upstream while idle: one
        // retry on another connection, only when it was lost before any answer. A
        // malformed answer was read: asking again would send an event twice.
        for retry in [false, true] {
            let (mut session, reused) = connector
                .get_http_session(&self.peer)
                .await
                .map_err(|e| self.transport_error(&e))?;
            let mut req = RequestHeader::build(method, target.as_bytes(), Some(headers.len() + 2))
                .map_err(|e| self.transport_error(&e))?;
            let build = (|| {
                req.insert_header(http::header::HOST, &self.host)?;
                for (k, v) in headers {
                    req.append_header(k.clone(), v.clone())?;
                }
                if let Some(b) = &body {
                    req.insert_header(http::header::CONTENT_LENGTH, b.len())?;
                }
                Ok::<_, Box<pingora::Error>>(())
            })();
            build.map_err(|e| self.transport_error(&e))?;
            let sent = async {
                session.write_request_header(Box::new(req)).await?;
                if let Some(b) = body.clone() {
                    session.write_request_body(b, true).await?;
                }
                session.finish_request_body().await?;
                read_final_header(&mut session).await
            }
            .await;
            if let Err(e) = sent {
                if reused && !retry && lost_before_answer(&e) {
                    continue;
                }
                return Err(self.transport_error(&e));
            }
            let resp = session.response_header().expect("read above");
            let status = resp.status.as_u16();
            if status == 101 {
                return Err(ExchangeError::Invalid {
                    url: self.url.url.clone(),
                    why: "switched protocols",
                });
            }
            let headers = resp.headers.clone();
            let mut buf = BytesMut::new();
            loop {
                match session.read_response_body().await {
                    Ok(Some(chunk)) => {
                        if buf.len() + chunk.len() > max_body {
                            return Err(ExchangeError::TooLarge {
                                url: self.url.url.clone(),
                                status,
                                limit: max_body,
                            });
                        }
                        buf.extend_from_slice(&chunk);
                    }
                    Ok(None) => break,
                    Err(e) => return Err(self.transport_error(&e)),
                }
            }
            connector
                .release_http_session(session, &self.peer, Some(POOL_IDLE))
                .await;
            return Ok(Answer {
                status,
                headers,
                body: buf.freeze(),
            });
        }
        unreachable!("the second attempt always returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_upstream_url;

    #[test]
    fn only_a_connection_lost_before_an_answer_is_asked_again() {
        for (etype, again) in [
            (ErrorType::ConnectionClosed, true),
            (ErrorType::ReadError, true),
            (ErrorType::WriteError, true),
            (ErrorType::InvalidHTTPHeader, false),
            (ErrorType::ReadTimedout, false),
            (ErrorType::WriteTimedout, false),
        ] {
            assert_eq!(
                lost_before_answer(&pingora::Error::new(etype.clone())),
                again,
                "{etype:?}"
            );
        }
    }

    #[test]
    fn host_headers() {
        let h = |s: &str| host_header(&parse_upstream_url("k", s).unwrap());
        assert_eq!(h("http://a.example"), "a.example");
        assert_eq!(h("http://a.example:80"), "a.example");
        assert_eq!(h("https://a.example:443"), "a.example");
        assert_eq!(h("http://127.0.0.1:9001"), "127.0.0.1:9001");
        assert_eq!(h("https://a.example:80"), "a.example:80");
        assert_eq!(h("http://[::1]:9001"), "[::1]:9001");
    }
}
