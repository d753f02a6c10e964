//! TLS handshakes of the HTTPS listener, done by [`super::GuardedApp`] rather than by
//! Pingora's listener.
//!
//! Pingora hands a listener's connections to the application only after their TLS
//! handshake, and gives a handshake 60 s; a client that opens connections and never
//! finishes one would be bounded only by the descriptor limit, and every failed
//! handshake logs an ERROR line. So the HTTPS address is listened on as plain TCP by the
//! same service, and its connections are told apart by their local port
//! (`listen.https` and `listen.http` must use different ports): each is counted first,
//! then its handshake runs within `limits.tls_handshake_timeout_ms`. A failure is
//! counted in `cdn_edge_tls_handshake_failures_total{reason}` and logged at debug only.

use std::net::SocketAddr;
use std::time::Duration;

use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;

use crate::metrics::{Metrics, TlsFailure};

/// The HTTPS listener's port and acceptor.
pub struct TlsHandshake {
    port: u16,
    acceptor: Acceptor,
    timeout: Duration,
}

impl TlsHandshake {
    pub fn new(https: SocketAddr, acceptor: Acceptor, timeout: Duration) -> Self {
        Self {
            port: https.port(),
            acceptor,
            timeout,
        }
    }

    /// Whether `stream` was accepted on the HTTPS listener. One `getsockname` per
    /// connection, made only when HTTPS is configured.
    pub fn is_for(&self, stream: &Stream) -> bool {
        stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).map(|a| a.port()))
            == Some(self.port)
    }

    /// Runs the handshake within the deadline; `None` (counted, logged at debug) when it
    /// fails.
    pub async fn accept(&self, stream: Stream, metrics: &Metrics) -> Option<Stream> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        // The listener accepts plain TCP, so the stream is Pingora's L4 stream.
        let Ok(l4) = stream.into_any().downcast::<L4Stream>() else {
            tracing::error!("HTTPS connection is not a TCP stream; closed");
            return None;
        };
        let failure = match tokio::time::timeout(self.timeout, self.acceptor.tls_handshake(*l4))
            .await
        {
            Ok(Ok(tls)) => return Some(Box::new(tls)),
            Ok(Err(e)) => {
                let why = failure_of(&e);
                tracing::debug!(client = ?peer, reason = why.label(), error = %e, "TLS handshake failed");
                why
            }
            Err(_) => {
                tracing::debug!(client = ?peer, "TLS handshake timed out");
                TlsFailure::Timeout
            }
        };
        metrics.record_tls_failure(failure);
        None
    }
}

/// Why a handshake failed: the client went away, or TLS refused something. Pingora
/// keeps only the text of the I/O error under a handshake failure, so the text decides:
/// tokio-rustls's "tls handshake eof", or the system's reset, abort and broken-pipe
/// errors, mean the client left.
fn failure_of(e: &pingora::Error) -> TlsFailure {
    let text = e.to_string().to_ascii_lowercase();
    let closed = ["eof", "reset by peer", "broken pipe", "connection abort"]
        .iter()
        .any(|sign| text.contains(sign));
    if closed {
        TlsFailure::Closed
    } else {
        TlsFailure::Protocol
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::ErrorType::TLSHandshakeFailure;

    #[test]
    fn handshake_failures_are_told_apart_by_their_text() {
        for (text, why) in [
            (
                "TLS accept() failed:  TLSHandshakeFailure context: tls connect error: tls handshake eof",
                TlsFailure::Closed,
            ),
            (
                "tls connect error: Connection reset by peer (os error 104)",
                TlsFailure::Closed,
            ),
            ("tls connect error: Broken pipe (os error 32)", TlsFailure::Closed),
            (
                "tls connect error: received fatal alert: ProtocolVersion",
                TlsFailure::Protocol,
            ),
            (
                "tls connect error: peer is incompatible: no cipher suites in common",
                TlsFailure::Protocol,
            ),
        ] {
            let e = pingora::Error::explain(TLSHandshakeFailure, text);
            assert_eq!(failure_of(&e), why, "{text}");
        }
    }
}
