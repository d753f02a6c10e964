//! Asks a peer or parent for one slice over its peer listener: HTTP/1.1 on Pingora's
//! pooled connector, authenticated ([`super::auth`]), the answer validated as strictly
//! as an origin's ([`crate::origin::read_slice`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;

use super::auth::{self, Claim, Kind};
use super::metrics::{Asked, ClusterMetrics};
use crate::cache::meta::Validator;
use crate::cache::pages::{Landing, PagePool};
use crate::cache::ObjectRef;
use crate::origin::{self, OriginError, SliceBody};
use crate::range::ByteRange;
use crate::upstream::{self, ConnectorSettings, POOL_IDLE};

/// Path of a slice on the peer listener.
pub const SLICE_PATH: &str = "/peer/v1/slice";
/// Response header: why a peer answered 404 or 5xx.
pub const RESULT: &str = "cdn-edge-peer-result";
/// Response header: the object's validator, in its stored form.
pub const VALIDATOR: &str = "cdn-edge-validator";

/// Why a peer did not give the slice.
#[derive(Debug)]
pub enum PeerFailure {
    /// A definite answer to pass on: the object does not exist or ends before the
    /// slice, the peer does not hold it (directed mode), or the peer's own upstream
    /// failed.
    Answer(OriginError),
    /// No usable answer: the peer is down as far as this request goes.
    Down(String),
}

/// Requests to peers and parents. One per process.
pub struct PeerClient {
    connector: Connector,
    me: SocketAddr,
    timeout: Duration,
    connect_timeout: Duration,
    pages: Option<PagePool>,
    metrics: Arc<ClusterMetrics>,
}

impl PeerClient {
    pub fn new(
        me: SocketAddr,
        timeout: Duration,
        connect_timeout: Duration,
        connectors: &ConnectorSettings,
        pages: Option<PagePool>,
        metrics: Arc<ClusterMetrics>,
    ) -> Self {
        Self {
            connector: Connector::new(Some(connectors.options())),
            me,
            timeout,
            connect_timeout,
            pages,
            metrics,
        }
    }

    /// Asks `to` for slice `index` (bytes `range`) of `obj`, signed with `secret`; the
    /// body lands as `landing` says.
    // The peer, the request's signature and the slice: each from a different place.
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch(
        &self,
        to: SocketAddr,
        kind: Kind,
        secret: &[u8],
        obj: &ObjectRef<'_>,
        index: u64,
        range: ByteRange,
        landing: Landing,
    ) -> Result<SliceBody, PeerFailure> {
        let hops = match kind {
            Kind::Child => obj.via.hops.saturating_add(1),
            _ => obj.via.hops,
        };
        let claim = Claim {
            kind,
            from: self.me,
            to,
            o: obj.o,
            v: obj.v,
            index,
            hops,
            time: unix_now(),
        };
        let result = match tokio::time::timeout(
            self.timeout,
            self.exchange(to, &claim, secret, range, landing),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(PeerFailure::Down(format!(
                "no complete answer within {} ms",
                self.timeout.as_millis()
            ))),
        };
        let asked = match &result {
            Ok(body) => {
                self.metrics.bytes_received.inc_by(body.bytes.len() as u64);
                Asked::Ok
            }
            Err(PeerFailure::Answer(OriginError::NotHeld)) => Asked::NotHeld,
            Err(PeerFailure::Answer(e)) if e.is_final() => Asked::NotFound,
            Err(PeerFailure::Answer(_)) => Asked::Error,
            Err(PeerFailure::Down(_)) => Asked::Unreachable,
        };
        self.metrics.record_asked(to, asked);
        result
    }

    async fn exchange(
        &self,
        to: SocketAddr,
        claim: &Claim<'_>,
        secret: &[u8],
        range: ByteRange,
        landing: Landing,
    ) -> Result<SliceBody, PeerFailure> {
        let label = format!("peer {to}");
        let down = |e: Box<pingora::Error>| PeerFailure::Down(e.to_string());
        let peer = self.peer(to);
        // A pooled connection may have been closed by the peer while idle: one retry on
        // another connection, only when it was lost before any answer (not for a
        // malformed answer, which was read, nor for a timeout).
        for retry in [false, true] {
            let (mut session, reused) =
                self.connector.get_http_session(&peer).await.map_err(down)?;
            let req = request(claim, secret, to).map_err(down)?;
            if let Err(e) = origin::send_and_read_header(&mut session, req).await {
                if reused && !retry && upstream::lost_before_answer(&e) {
                    continue;
                }
                return Err(down(e));
            }
            let resp = session
                .response_header()
                .ok_or_else(|| PeerFailure::Down("no response header".into()))?;
            let status = resp.status.as_u16();
            let result = resp
                .headers
                .get(RESULT)
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            let validator = resp
                .headers
                .get(VALIDATOR)
                .and_then(|v| Validator::from_stored(v.as_bytes()));
            match (status, result.as_slice()) {
                (206 | 416, _) | (404, b"missing") => {}
                (404, b"not-held") => return Err(PeerFailure::Answer(OriginError::NotHeld)),
                (502 | 504, b"origin-error") => {
                    return Err(PeerFailure::Answer(OriginError::Upstream {
                        via: label,
                        status,
                    }))
                }
                (403, _) => {
                    tracing::error!(peer = %to, "peer refused this node's request (403): do cluster.secret / parent_secret and the peer lists agree?");
                    return Err(PeerFailure::Down("refused (403)".into()));
                }
                (status, _) => return Err(PeerFailure::Down(format!("answered {status}"))),
            }
            let pages = landing.pool(self.pages.as_ref());
            let read = origin::read_slice(&label, &mut session, range, pages).await;
            let mut body = match read {
                Ok(body) => body,
                Err(e @ (OriginError::NotFound { .. } | OriginError::NotSatisfiable { .. })) => {
                    return Err(PeerFailure::Answer(e));
                }
                Err(e) => return Err(PeerFailure::Down(e.to_string())),
            };
            // The peer's record of the origin's validator, not its own headers.
            body.about.validator = validator;
            self.release(session, &peer).await;
            return Ok(body);
        }
        unreachable!("the second attempt always returns")
    }

    /// Sends `req` (no body) to `to` and reads the whole answer, at most `max_body`
    /// bytes, within the peer timeout: status and body, or why there is none. For the
    /// peer listener's small JSON exchanges (purges); retried once on another connection
    /// when a pooled one turns out closed.
    pub async fn call(
        &self,
        to: SocketAddr,
        req: &RequestHeader,
        max_body: usize,
    ) -> Result<(u16, bytes::Bytes), String> {
        let peer = self.peer(to);
        let exchange = async {
            for retry in [false, true] {
                let (mut session, reused) = self
                    .connector
                    .get_http_session(&peer)
                    .await
                    .map_err(|e| format!("cannot connect: {}", e.root_cause()))?;
                if let Err(e) =
                    origin::send_and_read_header(&mut session, Box::new(req.clone())).await
                {
                    if reused && !retry && upstream::lost_before_answer(&e) {
                        continue;
                    }
                    return Err(format!("no answer: {}", e.root_cause()));
                }
                let status = session
                    .response_header()
                    .map(|r| r.status.as_u16())
                    .ok_or("no response header")?;
                let mut body = bytes::BytesMut::new();
                while let Some(chunk) = session
                    .read_response_body()
                    .await
                    .map_err(|e| format!("answer cut short: {}", e.root_cause()))?
                {
                    if body.len() + chunk.len() > max_body {
                        return Err(format!("answer larger than {max_body} bytes"));
                    }
                    body.extend_from_slice(&chunk);
                }
                self.release(session, &peer).await;
                return Ok((status, body.freeze()));
            }
            unreachable!("the second attempt always returns")
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no complete answer within {} ms",
                self.timeout.as_millis()
            )),
        }
    }

    async fn release(
        &self,
        session: pingora::protocols::http::client::HttpSession,
        peer: &HttpPeer,
    ) {
        self.connector
            .release_http_session(session, peer, Some(POOL_IDLE))
            .await;
    }

    fn peer(&self, to: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(to, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.timeout);
        peer.options.write_timeout = Some(self.timeout);
        peer.options.idle_timeout = Some(POOL_IDLE);
        peer
    }
}

fn request(
    claim: &Claim<'_>,
    secret: &[u8],
    to: SocketAddr,
) -> pingora::Result<Box<RequestHeader>> {
    let path = format!("{SLICE_PATH}?o={}&v={}&i={}", claim.o, claim.v, claim.index);
    signed_request("GET", &path, claim, secret, to).map(Box::new)
}

/// `method path` to `to`'s peer listener, with the authentication headers of `claim`
/// signed with `secret`.
pub fn signed_request(
    method: &str,
    path: &str,
    claim: &Claim<'_>,
    secret: &[u8],
    to: SocketAddr,
) -> pingora::Result<RequestHeader> {
    let mut req = RequestHeader::build(method, path.as_bytes(), Some(8))?;
    req.insert_header(http::header::HOST, to.to_string())?;
    req.insert_header(auth::FROM, claim.from.to_string())?;
    req.insert_header(auth::TIME, claim.time)?;
    req.insert_header(auth::HOPS, u16::from(claim.hops))?;
    req.insert_header(auth::KIND, claim.kind.label())?;
    req.insert_header(auth::AUTH, claim.sign(secret))?;
    req.insert_header(
        http::header::USER_AGENT,
        HeaderValue::from_static(concat!("cdn-edge/", env!("CARGO_PKG_VERSION"))),
    )?;
    Ok(req)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
