//! Purges across a site (SPEC 7): a purge asked on one node is passed on to every other
//! node at once, and every node reads its peers' purge logs, so that a node that missed
//! a purge (down, unreachable, restarted from its disk tier) applies it once it can
//! reach any node that has it.
//!
//! 1. The node asked (`POST /purge` on its admin listener) applies the purge, and at the
//!    same time sends `POST /peer/v1/purge` to each other node of the site, which
//!    applies it and answers what it removed. A node that does not answer is reported
//!    with an error.
//! 2. Every node keeps the purges it applied in its log (`cache::purge`), and serves it
//!    on `GET /peer/v1/purges?since=SEQ`. A node reads each peer's log: at start, from
//!    every peer at once, before it reads its disk tier ([`START_TIMEOUT`] at most);
//!    then from a peer that was down or unreachable as soon as it is healthy again, and
//!    from every peer every [`SYNC_EVERY`]. A purge read there that the node does not
//!    have (by id) is applied, and entered in its own log: purges spread through any
//!    node that has them.
//! 3. Both requests are signed like slice requests ([`super::auth`], kinds `purge` and
//!    `purge-log`); anything else gets 403 and changes nothing. A purge is applied once
//!    per id, so a replayed request does nothing.
//!
//! Limits: a purge reaches a node that missed it only through a node that has it; if
//! every node that applied it is down when the node comes back, it serves what it holds
//! until one of them is up again. Logs keep the newest `cache::purge::MAX_ENTRIES`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};

use super::auth::{self, Claim, Denied, Kind};
use super::client;
use super::metrics::Served;
use super::site::Site;
use crate::app::AppState;
use crate::cache::purge::{Page, PurgeRecord, Removed, MAX_ENTRIES};
use crate::metrics::PurgeFrom;
use crate::respond;
use crate::session::Session;

/// Path of a purge passed on to a peer.
pub const PURGE_PATH: &str = "/peer/v1/purge";
/// Path of a node's purge log.
pub const LOG_PATH: &str = "/peer/v1/purges";
/// Entries in one answer of the log.
pub const PAGE: usize = 1_000;
/// Longest a node waits at start for its peers' logs before it reads its disk tier.
pub const START_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a node reads each healthy peer's log, besides when the peer comes back.
pub const SYNC_EVERY: Duration = Duration::from_secs(10);
/// Largest answer read from a peer (a page of the log).
const MAX_ANSWER: usize = 4 << 20;

/// What a peer answered to a purge, as `POST /purge` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PeerPurge {
    Done(Removed),
    Failed { error: String },
}

/// Passes `record` on to every other node of the site at once; each one's answer by
/// address.
pub async fn pass_on(site: &Arc<Site>, record: &PurgeRecord) -> BTreeMap<String, PeerPurge> {
    let mut asked = tokio::task::JoinSet::new();
    for peer in site.others() {
        let site = site.clone();
        let req = purge_request(&site, peer, record);
        asked.spawn(async move {
            let answer = match site.client().call(peer, &req, MAX_ANSWER).await {
                Ok((200, body)) => serde_json::from_slice::<Removed>(&body)
                    .map(PeerPurge::Done)
                    .unwrap_or_else(|e| PeerPurge::Failed {
                        error: format!("unreadable answer: {e}"),
                    }),
                Ok((status, body)) => PeerPurge::Failed {
                    error: format!("answered {status}: {}", String::from_utf8_lossy(&body).trim()),
                },
                Err(e) => PeerPurge::Failed { error: e },
            };
            if let PeerPurge::Failed { error } = &answer {
                tracing::warn!(%peer, object = %req.uri, error, "a peer did not confirm a purge; it applies it when it next reads this node's purge log");
            }
            (peer, answer)
        });
    }
    let mut answers = BTreeMap::new();
    while let Some(done) = asked.join_next().await {
        if let Ok((peer, answer)) = done {
            answers.insert(peer.to_string(), answer);
        }
    }
    answers
}

/// `POST /peer/v1/purge?o=O[&v=V]&id=ID`, signed for `to`.
fn purge_request(site: &Site, to: SocketAddr, record: &PurgeRecord) -> RequestHeader {
    let mut path = format!("{PURGE_PATH}?o={}", record.o);
    if let Some(v) = &record.v {
        path.push_str(&format!("&v={v}"));
    }
    path.push_str(&format!("&id={}", record.id));
    let claim = Claim {
        kind: Kind::Purge,
        from: site.me,
        to,
        o: &record.o,
        v: record.v.as_deref().unwrap_or(""),
        index: record.id,
        hops: 0,
        time: unix_now(),
    };
    signed_request("POST", &path, &claim, site.secret(), to)
}

/// `GET /peer/v1/purges?since=SEQ`, signed for `to`.
fn log_request(site: &Site, to: SocketAddr, since: u64) -> RequestHeader {
    let claim = Claim {
        kind: Kind::PurgeLog,
        from: site.me,
        to,
        o: "",
        v: "",
        index: since,
        hops: 0,
        time: unix_now(),
    };
    signed_request(
        "GET",
        &format!("{LOG_PATH}?since={since}"),
        &claim,
        site.secret(),
        to,
    )
}

fn signed_request(
    method: &str,
    path: &str,
    claim: &Claim<'_>,
    secret: &[u8],
    to: SocketAddr,
) -> RequestHeader {
    let mut req = client::signed_request(method, path, claim, secret, to)
        .expect("valid ids, addresses and digits make a valid request");
    req.insert_header(header::CONTENT_LENGTH, "0")
        .expect("a valid header");
    req
}

/// Answers `POST /peer/v1/purge` and `GET /peer/v1/purges` on the peer listener.
pub async fn answer(state: &AppState, site: &Site, session: &mut Session) -> pingora::Result<()> {
    let req = session.req_header();
    let (kind, allowed, allow) = if req.uri.path() == PURGE_PATH {
        (Kind::Purge, Method::POST, "POST")
    } else {
        (Kind::PurgeLog, Method::GET, "GET")
    };
    if req.method != allowed {
        respond::method_not_allowed(session, allow).await?;
        return Ok(());
    }
    let Some(asked) = Asked::parse(req, kind) else {
        return deny(site, session, Denied::Malformed).await;
    };
    if let Err(why) = auth::check(
        &asked.claim(site.me),
        asked.auth(),
        site.secret(),
        site.me,
        unix_now(),
    ) {
        return deny(site, session, why).await;
    }
    match kind {
        Kind::Purge => {
            let record = PurgeRecord {
                id: asked.index,
                o: asked.o.clone(),
                v: asked.v.clone(),
            };
            let applied = state.store.purge(record).await;
            if applied.new {
                state.metrics.purge.record_applied(PurgeFrom::Peer);
            }
            json(session, &applied.removed).await
        }
        _ => {
            let page = state.store.purges().page(asked.index, PAGE);
            json(session, &page).await
        }
    }
}

async fn deny(site: &Site, session: &mut Session, why: Denied) -> pingora::Result<()> {
    site.metrics.record_served(Served::Denied);
    tracing::warn!(client = ?session.client_addr().map(ToString::to_string), reason = %why, "peer purge request refused");
    respond::plain(session, 403, &format!("forbidden: {why}")).await?;
    Ok(())
}

async fn json<T: Serialize>(session: &mut Session, value: &T) -> pingora::Result<()> {
    let body = Bytes::from(serde_json::to_vec(value).expect("answers serialise"));
    let mut h = HeaderMap::with_capacity(3);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    session
        .write_response_header(Box::new(respond::head(200, h)?))
        .await?;
    session.write_response_body(body, true).await?;
    Ok(())
}

/// A parsed purge or log request: its query and authentication headers. Public, with
/// [`Asked::parse`], [`Asked::claim`] and [`Asked::auth`], for the fuzz target
/// `peer_request` (fuzz/, docs/reliability.md).
pub struct Asked {
    kind: Kind,
    o: String,
    v: Option<String>,
    /// The purge id, or the log position read from.
    index: u64,
    from: SocketAddr,
    time: u64,
    auth: String,
}

impl Asked {
    /// The request's query and authentication headers as a request of `kind` (`Purge`
    /// or `PurgeLog`), or `None` if any is missing or malformed (a 403).
    pub fn parse(req: &RequestHeader, kind: Kind) -> Option<Self> {
        let (mut o, mut v, mut index) = (None, None, None);
        for pair in req.uri.query().unwrap_or_default().split('&') {
            match (kind, pair.split_once('=')?) {
                (Kind::Purge, ("o", x)) if crate::auth::is_valid_id(x) => o = Some(x.to_string()),
                (Kind::Purge, ("v", x)) if crate::auth::is_valid_id(x) => v = Some(x.to_string()),
                (Kind::Purge, ("id", x)) | (Kind::PurgeLog, ("since", x)) => {
                    index = Some(x.parse().ok()?)
                }
                _ => return None,
            }
        }
        let text = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        if Kind::parse(text(auth::KIND)?)? != kind || text(auth::HOPS)? != "0" {
            return None;
        }
        let o = match kind {
            Kind::Purge => o?,
            _ => String::new(),
        };
        Some(Self {
            kind,
            o,
            v,
            index: index?,
            from: text(auth::FROM)?.parse().ok()?,
            time: text(auth::TIME)?.parse().ok()?,
            auth: text(auth::AUTH)?.to_string(),
        })
    }

    /// The claim as this node (`me`) received it.
    pub fn claim(&self, me: SocketAddr) -> Claim<'_> {
        Claim {
            kind: self.kind,
            from: self.from,
            to: me,
            o: &self.o,
            v: self.v.as_deref().unwrap_or(""),
            index: self.index,
            hops: 0,
            time: self.time,
        }
    }

    /// The request's HMAC, as sent (hex).
    pub fn auth(&self) -> &str {
        &self.auth
    }
}

/// Reads the peers' purge logs: at start before the disk tier is read, then as peers
/// come back and every [`SYNC_EVERY`] (module docs, 2).
pub struct PurgeSync {
    state: Arc<AppState>,
    site: Arc<Site>,
}

impl PurgeSync {
    pub fn new(state: Arc<AppState>, site: Arc<Site>) -> Self {
        Self { state, site }
    }
}

/// How far this node has read one peer's log.
#[derive(Debug, Clone, Default)]
struct Cursor {
    /// The log's identity, once read.
    log: Option<String>,
    seq: u64,
    /// When the log was last read to its end.
    read_at: Option<Instant>,
    /// The peer was down or its log could not be read since: read it when it is back.
    behind: bool,
}

impl Cursor {
    fn due(&self, now: Instant) -> bool {
        self.behind
            || self
                .read_at
                .is_none_or(|t| now.duration_since(t) >= SYNC_EVERY)
    }
}

#[async_trait]
impl BackgroundService for PurgeSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let peers = self.site.others();
        let mut cursors: BTreeMap<SocketAddr, Cursor> =
            peers.iter().map(|&p| (p, Cursor::default())).collect();
        // At start: every peer at once, before the disk tier is read.
        let started = Instant::now();
        self.read_logs(&mut cursors, Some(START_TIMEOUT)).await;
        let missed: Vec<String> = cursors
            .iter()
            .filter(|(_, c)| c.behind)
            .map(|(p, _)| p.to_string())
            .collect();
        self.state.store.purges().mark_synced();
        tracing::info!(peers = peers.len(), unreachable = ?missed, ms = started.elapsed().as_millis() as u64,
            "peers' purge logs read at start");
        let mut tick = tokio::time::interval(self.site.health_check());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            // A peer seen down is read as soon as it is up again.
            for member in self.site.ring.states() {
                if member.state != "healthy" {
                    if let Some(c) = cursors.get_mut(&member.addr) {
                        c.behind = true;
                    }
                }
            }
            self.read_logs(&mut cursors, None).await;
        }
    }
}

impl PurgeSync {
    /// Reads the logs of the peers that are due and up (all of them with `timeout`, the
    /// start), concurrently.
    async fn read_logs(
        &self,
        cursors: &mut BTreeMap<SocketAddr, Cursor>,
        timeout: Option<Duration>,
    ) {
        let now = Instant::now();
        let up: Vec<SocketAddr> = self
            .site
            .ring
            .states()
            .into_iter()
            .filter(|m| m.state == "healthy")
            .map(|m| m.addr)
            .collect();
        let mut reads = tokio::task::JoinSet::new();
        for (&peer, cursor) in cursors.iter() {
            if timeout.is_none() && (!cursor.due(now) || !up.contains(&peer)) {
                continue;
            }
            let (state, site, cursor) = (self.state.clone(), self.site.clone(), cursor.clone());
            reads.spawn(async move {
                let read = read_log(&state, &site, peer, cursor.clone());
                let read = match timeout {
                    Some(t) => tokio::time::timeout(t, read).await.unwrap_or_else(|_| {
                        Err(format!("no complete log within {} ms", t.as_millis()))
                    }),
                    None => read.await,
                };
                (peer, cursor, read)
            });
        }
        while let Some(done) = reads.join_next().await {
            let Ok((peer, before, read)) = done else {
                continue;
            };
            let ok = read.is_ok();
            self.state.metrics.purge.record_pull(ok);
            let cursor = match read {
                Ok(c) => c,
                Err(e) => {
                    if !before.behind {
                        tracing::warn!(%peer, error = e, "cannot read a peer's purge log; read again once it is back");
                    }
                    Cursor {
                        behind: true,
                        ..before
                    }
                }
            };
            cursors.insert(peer, cursor);
        }
    }
}

/// Reads `peer`'s log from `cursor` to its end, applying the purges this node lacks.
async fn read_log(
    state: &AppState,
    site: &Site,
    peer: SocketAddr,
    mut cursor: Cursor,
) -> Result<Cursor, String> {
    // Bounded: the whole log, in pages, twice over (it may start again once).
    for _ in 0..2 * (MAX_ENTRIES / PAGE + 2) {
        let since = if cursor.log.is_some() { cursor.seq } else { 0 };
        let req = log_request(site, peer, since);
        let (status, body) = site.client().call(peer, &req, MAX_ANSWER).await?;
        if status != 200 {
            return Err(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        let page: Page =
            serde_json::from_slice(&body).map_err(|e| format!("unreadable log: {e}"))?;
        if cursor.log.as_deref() != Some(page.log.as_str()) {
            // A new log (or the first read): from its start.
            let first = cursor.log.is_none() && since == 0;
            cursor.log = Some(page.log.clone());
            cursor.seq = 0;
            if !first {
                continue;
            }
        }
        let mut missed = 0;
        for entry in page.purges {
            cursor.seq = cursor.seq.max(entry.seq);
            if state.store.purges().knows(entry.record.id) {
                continue;
            }
            let applied = state.store.purge(entry.record).await;
            if applied.new {
                missed += 1;
                state.metrics.purge.record_applied(PurgeFrom::Log);
            }
        }
        if missed > 0 {
            tracing::info!(%peer, purges = missed, "applied purges missed meanwhile, read in a peer's purge log");
        }
        if !page.more {
            cursor.read_at = Some(Instant::now());
            cursor.behind = false;
            return Ok(cursor);
        }
    }
    Err("the log kept growing while it was read".into())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
