//! The demo's event sink: accepts forwarded events, log blobs and stats, logs what it
//! receives, and answers `200 {"status":200}`.

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

/// Largest body the sink reads.
const MAX_BODY: usize = 4 << 20;

pub struct EventSink;

#[async_trait]
impl ServeHttp for EventSink {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let mut len = 0usize;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            len += chunk.len();
            if len > MAX_BODY {
                break;
            }
        }
        let req = session.req_header();
        tracing::info!(
            method = %req.method,
            target = %req.uri,
            bytes = len,
            forwarded_for = req.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or(""),
            "event sink: received"
        );
        let body = br#"{"status":200}"#.to_vec();
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("valid response")
    }
}
