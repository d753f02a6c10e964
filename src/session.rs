//! What a handler gets from the listener: the client's session and the request's context.
//! Kept apart from the listener (`edge`), so that handlers never import the module that
//! calls them.

use std::time::Instant;

use crate::routes::Route;

/// A client's HTTP/1.1 or HTTP/2 request, as the handlers see it.
pub type Session = pingora::protocols::http::ServerSession;

/// Per-request context: filled in by the handler, read when the request is accounted.
pub struct RequestCtx {
    pub route: Route,
    pub started: Instant,
    /// Body bytes written to the client.
    pub body_bytes: u64,
}
