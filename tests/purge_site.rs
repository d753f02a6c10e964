//! Purges across a site (SPEC 7): a purge on one node removes the object from every
//! node, a node that was down during it never serves the purged bytes once back (to
//! clients or to peers, nor before it has read its peers' purge logs), and the peer
//! listener's purge paths need the site's signature.

mod support;

use std::net::SocketAddr;

use cdn_edge::cluster::auth::{self as peer_auth, Claim, Kind};
use support::client::{self, Response};
use support::edge::{unix_now, Edge, EdgeOptions};
use support::object_bytes;
use support::origin::TestOrigin;
use support::site::{
    get_exact, in_slice, origin_slices, origins, range_target, site_options, slices,
    ClusterOptions, FakePeer, Site, SITE_OBJECT_SIZE, SITE_SECRET, SITE_SLICE,
};

const SIZE: usize = SITE_OBJECT_SIZE;
const TOKEN: &str = "purge-test-admin-token";

fn opts(origin: &TestOrigin, disk: Option<&std::path::Path>) -> EdgeOptions {
    let mut o = site_options(origin);
    o.disk = disk.map(|d| (d.to_path_buf(), 1 << 30));
    o.extra = format!("[admin]\ntoken = \"{TOKEN}\"\n");
    o
}

/// `POST /purge` on `edge`'s admin listener; status and JSON answer.
async fn purge(edge: &Edge, body: &str) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {TOKEN}");
    let r = client::post(
        edge.admin,
        "/purge",
        &[("Authorization", auth.as_str())],
        body.as_bytes(),
    )
    .await;
    let json =
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()));
    (r.status, json)
}

async fn disk_writes(site: &Site) -> f64 {
    let mut sum = 0.0;
    for i in 0..site.len() {
        sum += site[i].metric("cdn_edge_disk_writes_total").await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_reaches_every_node_and_a_node_down_meanwhile_never_serves_the_purged_bytes() {
    let old = object_bytes(71, SIZE);
    let origins = origins(3, &[("movie", "1", &old)]).await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let node_opts = (0..3)
        .map(|i| opts(&origins[i], Some(dirs[i].path())))
        .collect();
    let mut site = Site::start(ClusterOptions::default(), node_opts).await;
    let n = slices(SIZE);
    // Every node reads the whole object: each slice is filled once, by its owner, which
    // keeps it in memory and on disk; the others keep it in memory.
    for i in 0..3 {
        get_exact(&site[i], "movie", "1", &old, 0, SIZE - 1).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while disk_writes(&site).await < n as f64 {
        assert!(std::time::Instant::now() < deadline, "owners' disk writes");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let owned_by_2: Vec<u64> = (0..n)
        .filter(|&i| site.owner("movie", "1", i) == 2)
        .collect();
    assert!(!owned_by_2.is_empty());

    // Node 2 goes down with the object on its disk; the origins' object is replaced, so
    // a purged byte served anywhere would show.
    site.kill(2).await;
    let new = object_bytes(72, SIZE);
    for origin in &origins {
        origin.add_object("movie", "1", new.clone(), "video/mp4");
    }
    let (status, answer) = purge(&site[0], r#"{"o": "movie", "v": "1"}"#).await;
    assert_eq!(status, 200, "{answer}");
    let all = serde_json::json!({ "slices": n, "bytes": SIZE });
    assert_eq!(answer["slices"], all["slices"], "{answer}");
    assert_eq!(answer["bytes"], all["bytes"]);
    let peers = &answer["peers"];
    assert_eq!(peers[site.peers[1].to_string()], all, "{answer}");
    assert!(
        peers[site.peers[2].to_string()]["error"].is_string(),
        "{answer}"
    );
    assert_eq!(
        site[0]
            .metric("cdn_edge_purges_total{result=\"partial\"}")
            .await,
        1.0
    );
    assert_eq!(
        site[1]
            .metric("cdn_edge_purges_applied_total{from=\"peer\"}")
            .await,
        1.0
    );

    // Node 2 comes back with its disk tier. Its siblings ask it first for the slices it
    // owns, then clients ask it for everything.
    site.restart(2).await;
    site.wait_state(0, site.peers[2], "healthy").await;
    for &i in &owned_by_2 {
        let (a, b) = in_slice(i, SIZE);
        get_exact(&site[0], "movie", "1", &new, a, b).await;
    }
    get_exact(&site[2], "movie", "1", &new, 0, SIZE - 1).await;
    get_exact(&site[1], "movie", "1", &new, 0, SIZE - 1).await;
    assert_eq!(
        site[2]
            .metric("cdn_edge_purges_applied_total{from=\"log\"}")
            .await,
        1.0,
        "learnt from a peer's purge log; log:\n{}",
        site[2].log_text()
    );
    // Its own slices came from its origin again, once each: not from its disk.
    let fetched = origin_slices(&origins[2], SITE_SLICE);
    for &i in &owned_by_2 {
        let times = fetched.iter().filter(|(_, _, s)| *s == i).count();
        assert_eq!(times, 2, "slice {i}: before and after the purge");
    }
}

/// `method target` on a peer listener, with `kind` in its kind header and the other
/// authentication headers of `claim`, signed with `secret`.
async fn peer_request(
    at: SocketAddr,
    (method, target): (&str, &str),
    kind: &str,
    claim: &Claim<'_>,
    secret: &str,
) -> Response {
    let signature = claim.sign(secret.as_bytes());
    let (from, time) = (claim.from.to_string(), claim.time.to_string());
    let headers = [
        (peer_auth::FROM, from.as_str()),
        (peer_auth::TIME, time.as_str()),
        (peer_auth::HOPS, "0"),
        (peer_auth::KIND, kind),
        (peer_auth::AUTH, signature.as_str()),
    ];
    match method {
        "POST" => client::post(at, target, &headers, b"").await,
        _ => client::request(at, method, target, &headers).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_listener_applies_only_purges_signed_by_the_site() {
    let bytes = object_bytes(81, SIZE);
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "1", bytes.clone(), "video/mp4");
    let site = Site::start_n(ClusterOptions::default(), opts(&origin, None), 2).await;
    let (me, sibling) = (site.peers[0], site.peers[1]);
    get_exact(&site[0], "movie", "1", &bytes, 0, SIZE - 1).await;

    let purge_77 = ("POST", "/peer/v1/purge?o=movie&v=1&id=77");
    let claim = Claim {
        kind: Kind::Purge,
        from: sibling,
        to: me,
        o: "movie",
        v: "1",
        index: 77,
        hops: 0,
        time: unix_now(),
    };
    let as_slice = Claim {
        kind: Kind::Sibling,
        ..claim
    };
    let denied = [
        (
            "no authentication",
            client::post(me, purge_77.1, &[], b"").await,
        ),
        (
            "another secret",
            peer_request(me, purge_77, "purge", &claim, "not-the-site-secret").await,
        ),
        (
            "a slice request's signature",
            peer_request(me, purge_77, "purge", &as_slice, SITE_SECRET).await,
        ),
        (
            "the log, unsigned",
            client::get(me, "/peer/v1/purges?since=0", &[]).await,
        ),
    ];
    for (what, r) in &denied {
        assert_eq!(r.status, 403, "{what}: {}", r.text());
    }
    let hit = site[0]
        .get(&range_target("movie", "1", 0, SIZE - 1), &[])
        .await;
    assert_eq!(
        hit.header("cache-status"),
        Some("cdn-edge; hit"),
        "nothing was purged"
    );

    // Rightly signed: applied once, however often it comes.
    let removed = |r: &Response| -> serde_json::Value {
        assert_eq!(r.status, 200, "{}", r.text());
        serde_json::from_slice(&r.body).unwrap()
    };
    let r = peer_request(me, purge_77, "purge", &claim, SITE_SECRET).await;
    assert_eq!(
        removed(&r),
        serde_json::json!({ "slices": slices(SIZE), "bytes": SIZE })
    );
    let again = peer_request(me, purge_77, "purge", &claim, SITE_SECRET).await;
    assert_eq!(
        removed(&again),
        serde_json::json!({ "slices": 0, "bytes": 0 })
    );
    assert_eq!(
        site[0]
            .metric("cdn_edge_purges_applied_total{from=\"peer\"}")
            .await,
        1.0
    );

    // It is in the node's log, which a read signed as such gets.
    let read = Claim {
        kind: Kind::PurgeLog,
        o: "",
        v: "",
        index: 0,
        ..claim
    };
    let log_0 = ("GET", "/peer/v1/purges?since=0");
    let r = peer_request(me, log_0, "purge", &read, SITE_SECRET).await;
    assert_eq!(r.status, 403, "signed as a read, sent as a purge");
    let r = peer_request(me, log_0, "purge-log", &read, SITE_SECRET).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let log: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(log["last"], 1, "{log}");
    assert_eq!(log["purges"][0]["id"], 77);
    assert_eq!(log["purges"][0]["o"], "movie");
    assert_eq!(log["more"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_no_disk_slice_is_served_before_the_peers_purge_logs_are_read() {
    let old = object_bytes(91, SIZE);
    let origin = TestOrigin::start().await;
    origin.add_object("movie", "1", old.clone(), "video/mp4");
    let peer = FakePeer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterOptions {
        extra_peers: vec![peer.addr],
        ..ClusterOptions::default()
    };
    let mut site = Site::start(cluster, vec![opts(&origin, Some(dir.path()))]).await;
    get_exact(&site[0], "movie", "1", &old, 0, SIZE - 1).await;
    // The node's own slices are on its disk; those of the other peer, in memory only.
    let owned = (0..slices(SIZE))
        .filter(|&i| site.owner_among("movie", "1", i, &[0]) == 0)
        .count();
    assert!(owned > 0, "the node owns some slices");
    site[0]
        .wait_for_metric("cdn_edge_disk_writes_total", owned as f64)
        .await;

    // While the node is down, the other peer learns a purge of the object, and the
    // origin's object is replaced.
    let new = object_bytes(92, SIZE);
    origin.add_object("movie", "1", new.clone(), "video/mp4");
    peer.set_log(
        r#"{"log":"fake","last":1,"more":false,
            "purges":[{"seq":1,"id":99,"o":"movie","v":"1","at":1}]}"#,
    );
    peer.hold_log(true);
    site.kill(0).await;
    let reads = peer.log_reads();
    site.restart(0).await;

    let edge = (site[0].http, range_target("movie", "1", 0, SIZE - 1));
    let mut asked = tokio::spawn(async move { client::get(edge.0, &edge.1, &[]).await });
    let waited = tokio::time::timeout(std::time::Duration::from_millis(500), &mut asked).await;
    assert!(
        waited.is_err(),
        "answered from the disk tier before the peer's purge log was read"
    );
    assert!(peer.log_reads() > reads, "the log is being read");
    peer.hold_log(false);
    let r = asked.await.unwrap();
    support::site::check_exact(&r, &new, 0, SIZE - 1, "after the purge log was read");
    assert_eq!(
        site[0]
            .metric("cdn_edge_purges_applied_total{from=\"log\"}")
            .await,
        1.0
    );
}
