//! `POST /fill` and `GET /fill/{id}` (SPEC 7).

use http::StatusCode;
use pingora::protocols::http::ServerSession;

use super::{error, Reply};
use crate::app::AppState;

pub async fn submit(_state: &AppState, _session: &mut ServerSession) -> Reply {
    error(StatusCode::NOT_IMPLEMENTED, "fill is not available yet")
}

pub async fn show(_state: &AppState, _id: &str) -> Reply {
    error(StatusCode::NOT_IMPLEMENTED, "fill is not available yet")
}
