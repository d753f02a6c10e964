//! `POST /purge` (SPEC 7): removes an object's slices (one version, or every version)
//! from this node and, with `[cluster]`, from every other node of the site. The answer
//! gives what each node removed; a node that did not answer is reported with an error
//! and applies the purge when it next reads a peer's purge log (`cluster::purge`).

use std::collections::BTreeMap;

use http::StatusCode;
use pingora::protocols::http::ServerSession;
use serde::{Deserialize, Serialize};

use super::{error, json, parse_json, read_body, Reply};
use crate::app::AppState;
use crate::auth::is_valid_id;
use crate::cache::purge::{PurgeRecord, Purges};
use crate::cluster::purge::{pass_on, PeerPurge};
use crate::metrics::{PurgeFrom, PurgeResult};

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    o: String,
    /// Absent: every version of `o`.
    #[serde(default)]
    v: Option<String>,
}

/// The answer: this node's counts, and each other node's.
#[derive(Debug, Serialize)]
pub struct PurgeAnswer {
    /// Slices removed from this node (held in memory, on disk or both: counted once).
    pub slices: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Every other node of the site by its peer address; empty without `[cluster]`.
    pub peers: BTreeMap<String, PeerPurge>,
}

pub async fn handle(state: &AppState, session: &mut ServerSession) -> Reply {
    let body = match read_body(session).await {
        Ok(b) => b,
        Err(reply) => return *reply,
    };
    let req: PurgeRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(reply) => return *reply,
    };
    for (field, value) in [("o", Some(&req.o)), ("v", req.v.as_ref())] {
        if value.is_some_and(|s| !is_valid_id(s)) {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "{field}: not a valid id: [A-Za-z0-9_-][A-Za-z0-9._-]{{0,255}} without '..'"
                ),
            );
        }
    }
    let record = PurgeRecord {
        id: Purges::new_id(),
        o: req.o,
        v: req.v,
    };
    let (answer, not_recorded) = purge_everywhere(state, record).await;
    match not_recorded {
        None => json(StatusCode::OK, &answer),
        Some(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({
                "error": format!("purged, but not written to this node's purge log ({e}): \
                                  it will not survive a restart of this node"),
                "slices": answer.slices,
                "bytes": answer.bytes,
                "peers": answer.peers,
            }),
        ),
    }
}

/// Applies `record` here and passes it on to every other node of the site, at once.
/// Also returns why it could not be written to this node's log, if so.
pub async fn purge_everywhere(
    state: &AppState,
    record: PurgeRecord,
) -> (PurgeAnswer, Option<std::io::Error>) {
    let here = state.store.purge(record.clone());
    let peers = async {
        match &state.site {
            Some(site) => pass_on(site, &record).await,
            None => BTreeMap::new(),
        }
    };
    let (applied, peers) = tokio::join!(here, peers);
    let m = &state.metrics.purge;
    m.record_applied(PurgeFrom::Admin);
    let result = if applied.not_recorded.is_some() {
        PurgeResult::Error
    } else if peers
        .values()
        .any(|p| matches!(p, PeerPurge::Failed { .. }))
    {
        PurgeResult::Partial
    } else {
        PurgeResult::Ok
    };
    m.record(result);
    let answer = PurgeAnswer {
        slices: applied.removed.slices,
        bytes: applied.removed.bytes,
        peers,
    };
    (answer, applied.not_recorded)
}
