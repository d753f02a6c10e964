//! `POST /purge` (SPEC 7).

use http::StatusCode;
use pingora::protocols::http::ServerSession;

use super::{error, Reply};
use crate::app::AppState;

pub async fn handle(_state: &AppState, _session: &mut ServerSession) -> Reply {
    error(StatusCode::NOT_IMPLEMENTED, "purge is not available yet")
}
