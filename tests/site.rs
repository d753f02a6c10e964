//! A site of several edges (SPEC 6.1, 6.2): each slice reaches the site from the origin
//! once, fetched by its owner on the ring, whichever node clients ask; a node that dies
//! costs clients nothing and gets its slices back when it returns; the peer listener
//! serves only authenticated siblings.
//!
//! Every node has an origin of its own (all serving the same objects), so an origin's
//! log is exactly what its node fetched, and ownership is checked against
//! `cdn_edge::cluster::ring`, the ring the nodes use.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use cdn_edge::cluster::auth::{self as peer_auth, Claim, Kind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::client;
use support::edge::unix_now;
use support::object_bytes;
use support::origin::TestOrigin;
use support::site::{
    check_exact, fetched_by, get_exact, in_slice, origins, range_target, site_options as opts,
    slices, ClusterOptions, FakePeer, Site, SITE_OBJECT_SIZE, SITE_SECRET, SITE_SLICE,
};

const SLICE: u64 = SITE_SLICE;
const SIZE: usize = SITE_OBJECT_SIZE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ranges_over_three_nodes_are_exact_and_each_slice_reaches_the_origin_once_from_its_owner(
) {
    let objects: Vec<(&str, &str, Vec<u8>)> = vec![
        ("a", "1", object_bytes(61, 1_000_003)),
        ("b", "7", object_bytes(62, 300_000)),
        ("c", "2", object_bytes(63, 777_777)),
    ];
    let listed: Vec<(&str, &str, &[u8])> = objects
        .iter()
        .map(|(o, v, b)| (*o, *v, b.as_slice()))
        .collect();
    let origins = origins(3, &listed).await;
    let site = Site::start(
        ClusterOptions::default(),
        origins.iter().map(opts).collect(),
    )
    .await;

    let mut rng = StdRng::seed_from_u64(0x5173_6974);
    let ranges: Vec<(usize, usize, usize)> = (0..300)
        .map(|_| {
            let k = rng.gen_range(0..objects.len());
            let size = objects[k].2.len();
            let a = rng.gen_range(0..size);
            let len = if rng.gen_bool(0.7) {
                rng.gen_range(1..=4_000)
            } else {
                rng.gen_range(1..=200_000)
            };
            (k, a, (a + len - 1).min(size - 1))
        })
        .collect();
    let objects = Arc::new(objects);
    let mut touched = BTreeSet::new();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    // Six at a time, round-robin over the nodes: concurrent misses for one slice from
    // several nodes meet at its owner.
    for (batch, chunk) in ranges.chunks(6).enumerate() {
        let mut tasks = Vec::new();
        for (j, &(k, a, b)) in chunk.iter().enumerate() {
            let n = (batch * 6 + j) % site.len();
            let (o, v, _) = &objects[k];
            for index in a as u64 / SLICE..=b as u64 / SLICE {
                touched.insert((o.to_string(), v.to_string(), index));
            }
            let addr = site[n].http;
            let target = range_target(o, v, a, b);
            let objects = objects.clone();
            tasks.push(tokio::spawn(async move {
                let r = client::get(addr, &target, &[]).await;
                check_exact(&r, &objects[k].2, a, b, &format!("{target} from {addr}"));
                r.header("cache-status").unwrap_or_default().to_string()
            }));
        }
        for t in tasks {
            *statuses.entry(t.await.unwrap()).or_default() += 1;
        }
    }
    let allowed = [
        "cdn-edge; hit",
        "cdn-edge; fwd=miss",
        "cdn-edge; fwd=miss; detail=peer",
    ];
    assert!(
        statuses.keys().all(|s| allowed.contains(&s.as_str())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains_key("cdn-edge; fwd=miss; detail=peer"),
        "some slices came from a peer: {statuses:?}"
    );

    let fetched = fetched_by(&origins);
    assert_eq!(
        fetched.keys().cloned().collect::<BTreeSet<_>>(),
        touched,
        "the origins were asked for exactly the slices the ranges cover"
    );
    for ((o, v, index), by) in &fetched {
        assert_eq!(
            by,
            &vec![site.owner(o, v, *index)],
            "{o}/{v} slice {index}: fetched once, by its owner"
        );
    }
    let mut peer_ok = 0.0;
    for i in 0..site.len() {
        for j in (0..site.len()).filter(|&j| j != i) {
            peer_ok += site.peer_requests(i, site.peers[j], "ok").await;
        }
    }
    assert!(peer_ok > 0.0, "nodes fetched slices from each other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_requests_for_cold_objects_on_two_nodes_at_once_do_not_wait_for_each_other() {
    // Node 0 is asked for a slice node 1 owns while node 1 is asked for one node 0 owns,
    // of an object neither knows yet: each asks the other, and neither may make the
    // other's question wait behind its own.
    const OBJECTS: u64 = 12;
    let objects: Vec<(String, Vec<u8>)> = (0..OBJECTS)
        .map(|k| (format!("cold{k}"), object_bytes(200 + k, SIZE)))
        .collect();
    let listed: Vec<(&str, &str, &[u8])> = objects
        .iter()
        .map(|(o, b)| (o.as_str(), "1", b.as_slice()))
        .collect();
    let origins = origins(2, &listed).await;
    let cluster = ClusterOptions {
        // A wait for each other ends here rather than after the default 10 s.
        peer_timeout_ms: Some(3_000),
        ..ClusterOptions::default()
    };
    let site = Site::start(cluster, origins.iter().map(opts).collect()).await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for (o, bytes) in &objects {
        for asked in [0usize, 1] {
            let index = (0..slices(SIZE))
                .find(|&i| site.owner(o, "1", i) != asked)
                .expect("the other node owns a slice");
            let (a, b) = in_slice(index, SIZE);
            let (addr, target) = (site[asked].http, range_target(o, "1", a, b));
            let want = bytes[a..=b].to_vec();
            tasks.push(tokio::spawn(async move {
                let r = client::get(addr, &target, &[]).await;
                check_exact(&r, &want, 0, want.len() - 1, &target);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..2 {
        assert_eq!(
            site.peer_requests(i, site.peers[1 - i], "unreachable")
                .await,
            0.0,
            "node {i} gave up waiting for its peer"
        );
    }
    for ((o, v, index), by) in fetched_by(&origins) {
        assert_eq!(
            by,
            vec![site.owner(&o, &v, index)],
            "{o}/{v} slice {index}: once, by its owner"
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_costs_clients_nothing_and_gets_its_slices_back_when_it_returns()
{
    let m = object_bytes(71, SIZE);
    let n = object_bytes(72, SIZE);
    let p = object_bytes(73, SIZE);
    let origins = origins(3, &[("m", "1", &m), ("n", "1", &n), ("p", "1", &p)]).await;
    let mut site = Site::start(
        ClusterOptions::default(),
        origins.iter().map(opts).collect(),
    )
    .await;
    let victim = 2;
    let (victim_addr, survivors) = (site.peers[victim], [0usize, 1]);

    // All up: every slice of m is fetched by its owner (asked directly, so that no
    // other node holds a copy).
    for index in 0..slices(SIZE) {
        let (a, b) = in_slice(index, SIZE);
        get_exact(&site[site.owner("m", "1", index)], "m", "1", &m, a, b).await;
    }
    let owned_by_victim: Vec<u64> = (0..slices(SIZE))
        .filter(|&i| site.owner("m", "1", i) == victim)
        .collect();
    assert!(!owned_by_victim.is_empty(), "the victim owns some of m");
    let before = fetched_by(&origins);
    assert_eq!(before.len() as u64, slices(SIZE));

    // Killed, and asked at once, before any health check noticed: every request from
    // the survivors succeeds with the right bytes.
    site.kill(victim).await;
    for &s in &survivors {
        for index in 0..slices(SIZE) {
            let (a, b) = in_slice(index, SIZE);
            get_exact(&site[s], "m", "1", &m, a, b).await;
        }
    }
    let after = fetched_by(&origins);
    for index in 0..slices(SIZE) {
        let key = ("m".to_string(), "1".to_string(), index);
        let more = after[&key].len() - before[&key].len();
        if owned_by_victim.contains(&index) {
            // Refetched by a survivor: at most once each.
            assert!(
                (1..=2).contains(&more),
                "slice {index} of the dead node: {more} more origin requests"
            );
        } else {
            assert_eq!(more, 0, "slice {index} is still held by a live owner");
        }
    }

    // Both survivors see it down; the ring without it places every new slice once.
    for &s in &survivors {
        site.wait_state(s, victim_addr, "down").await;
        site[s]
            .wait_for_metric_exact("cdn_edge_peers{state=\"down\"}", 1.0)
            .await;
    }
    let before = fetched_by(&origins);
    for index in 0..slices(SIZE) {
        let (a, b) = in_slice(index, SIZE);
        get_exact(&site[survivors[index as usize % 2]], "n", "1", &n, a, b).await;
    }
    let after = fetched_by(&origins);
    for index in 0..slices(SIZE) {
        let key = ("n".to_string(), "1".to_string(), index);
        assert!(!before.contains_key(&key));
        let owner = site.owner_among("n", "1", index, &survivors);
        assert_eq!(
            after[&key],
            vec![owner],
            "n slice {index}: once, by its owner"
        );
    }

    // Restarted (empty): it rejoins, and gets its slices back.
    let asked_before: f64 = {
        let mut sum = 0.0;
        for &s in &survivors {
            sum += site.peer_requests(s, victim_addr, "ok").await;
        }
        sum
    };
    site.restart(victim).await;
    for &s in &survivors {
        site.wait_state(s, victim_addr, "healthy").await;
        site[s]
            .wait_for_metric_exact("cdn_edge_peers{state=\"down\"}", 0.0)
            .await;
    }
    site.wait_all_healthy(victim).await;
    for index in 0..slices(SIZE) {
        let (a, b) = in_slice(index, SIZE);
        get_exact(&site[survivors[index as usize % 2]], "p", "1", &p, a, b).await;
    }
    let after = fetched_by(&origins);
    let mut victim_owns = 0;
    for index in 0..slices(SIZE) {
        let key = ("p".to_string(), "1".to_string(), index);
        let owner = site.owner("p", "1", index);
        victim_owns += usize::from(owner == victim);
        assert_eq!(
            after[&key],
            vec![owner],
            "p slice {index}: once, by its owner"
        );
    }
    assert!(victim_owns > 0, "the returned node owns some of p");
    let mut asked_after = 0.0;
    for &s in &survivors {
        asked_after += site.peer_requests(s, victim_addr, "ok").await;
    }
    assert!(
        asked_after >= asked_before + victim_owns as f64,
        "the survivors fetched the returned node's slices from it: {asked_before} → {asked_after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_fails_slice_requests_costs_clients_nothing() {
    let bytes = object_bytes(81, SIZE);
    let origins = origins(2, &[("f", "1", &bytes)]).await;
    let fake = FakePeer::start().await;
    let cluster = ClusterOptions {
        extra_peers: vec![fake.addr],
        ..ClusterOptions::default()
    };
    let site = Site::start(cluster, origins.iter().map(opts).collect()).await;
    site.wait_state(0, fake.addr, "healthy").await;

    let mut all = site.peers.clone();
    all.push(fake.addr);
    let fakes: Vec<u64> = (0..slices(SIZE))
        .filter(|&i| support::site::owner_of(&all, "f", "1", i) == fake.addr)
        .collect();
    assert!(!fakes.is_empty(), "the fake peer owns some slices");
    for &index in &fakes {
        let (a, b) = in_slice(index, SIZE);
        let r = get_exact(&site[0], "f", "1", &bytes, a, b).await;
        // From the origin, or from the next owner once the fake one left the ring.
        let status = r.header("cache-status").unwrap_or_default();
        assert!(status.starts_with("cdn-edge; fwd=miss"), "{status}");
    }
    assert!(fake.slice_requests() >= 1, "the owner was asked first");
    let failed = site.peer_requests(0, fake.addr, "unreachable").await
        + site.peer_requests(0, fake.addr, "error").await;
    assert!(failed >= 1.0, "the failed peer requests are counted");
    for (key, by) in fetched_by(&origins) {
        assert_eq!(by.len(), 1, "{key:?}: fetched once: {by:?}");
        assert!(fakes.contains(&key.2));
    }
}

/// `GET /peer/v1/slice` for `claim`'s slice, sent to `at` with the authentication headers
/// of `claim` signed with `secret`; `auth` replaces the signature when given.
async fn peer_slice_request(
    at: SocketAddr,
    claim: &Claim<'_>,
    secret: &str,
    auth: Option<&str>,
) -> client::Response {
    let signature = claim.sign(secret.as_bytes());
    let (from, time, hops) = (
        claim.from.to_string(),
        claim.time.to_string(),
        claim.hops.to_string(),
    );
    let headers = [
        (peer_auth::FROM, from.as_str()),
        (peer_auth::TIME, time.as_str()),
        (peer_auth::HOPS, hops.as_str()),
        (peer_auth::KIND, claim.kind.label()),
        (peer_auth::AUTH, auth.unwrap_or(&signature)),
    ];
    let target = format!(
        "/peer/v1/slice?o={}&v={}&i={}",
        claim.o, claim.v, claim.index
    );
    client::get(at, &target, &headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_listener_serves_only_authenticated_siblings() {
    let bytes = object_bytes(91, SIZE);
    let origin = TestOrigin::start().await;
    origin.add_object("s", "1", bytes.clone(), "video/mp4");
    let site = Site::start_n(ClusterOptions::default(), opts(&origin), 2).await;
    let (me, sibling) = (site.peers[0], site.peers[1]);

    let health = client::get(me, "/peer/v1/health", &[]).await;
    assert_eq!((health.status, health.text().trim()), (200, "ok"));

    let claim = Claim {
        kind: Kind::Sibling,
        from: sibling,
        to: me,
        o: "s",
        v: "1",
        index: 1,
        hops: 0,
        time: unix_now(),
    };
    let stale = Claim {
        time: claim.time - 600,
        ..claim
    };
    let elsewhere = Claim {
        to: sibling,
        ..claim
    };
    let denied = [
        (
            "no authentication",
            client::get(me, "/peer/v1/slice?o=s&v=1&i=1", &[]).await,
        ),
        (
            "a made-up signature",
            peer_slice_request(me, &claim, SITE_SECRET, Some("00ff")).await,
        ),
        (
            "another secret",
            peer_slice_request(me, &claim, "not-the-site-secret", None).await,
        ),
        (
            "a stale time",
            peer_slice_request(me, &stale, SITE_SECRET, None).await,
        ),
        (
            "addressed to another node",
            peer_slice_request(me, &elsewhere, SITE_SECRET, None).await,
        ),
    ];
    for (what, r) in &denied {
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        assert!(r.body.len() < 1_000, "{what}: no slice bytes");
    }
    assert_eq!(origin.requests(), 0, "a denied request costs no fill");
    assert_eq!(site.peer_served(0, "denied").await, denied.len() as f64);

    // The same request, rightly signed, gets the slice (so each refusal above is for
    // the one thing changed).
    let (a, b) = (SLICE as usize, 2 * SLICE as usize - 1);
    for served in ["fill", "hit"] {
        let r = peer_slice_request(me, &claim, SITE_SECRET, None).await;
        assert_eq!(r.status, 206, "{}", r.text());
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {a}-{b}/{SIZE}").as_str())
        );
        assert!(r.complete && r.body == bytes[a..=b], "the slice's bytes");
        assert_eq!(site.peer_served(0, served).await, 1.0, "{served}");
    }
    assert_eq!(origin.requests(), 1, "{:?}", origin.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_a_missing_object_over_three_nodes_costs_one_origin_request() {
    const BURST: usize = 30;
    // One origin for the whole site: it counts site-wide.
    let origin = TestOrigin::start().await;
    let mut o = opts(&origin);
    o.negative_ttl_secs = Some(60);
    let site = Site::start_n(ClusterOptions::default(), o, 3).await;
    let (a, b) = in_slice(2, SIZE);
    let target = range_target("nope", "1", a, b);

    // Every request is in the site before the origin answers: on each node, all but
    // the first wait behind it (a cold object); the owner's first is at the origin, and
    // the other nodes' firsts are at the owner, which looked the slice up for each.
    let owner = site.owner("nope", "1", 2);
    let per_node = BURST / site.len();
    origin.hold();
    let requests: Vec<_> = (0..BURST)
        .map(|i| {
            let (addr, target) = (site[i % 3].http, target.clone());
            tokio::spawn(async move { client::get(addr, &target, &[]).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut waits = 0.0;
        for i in 0..site.len() {
            waits += site[i]
                .metric("cdn_edge_cache_cold_object_waits_total")
                .await;
        }
        let looked_up = site[owner]
            .metric("cdn_edge_cache_lookups_total{result=\"miss\",tier=\"memory\"}")
            .await;
        if waits >= (BURST - site.len()) as f64 && looked_up >= (per_node + site.len() - 1) as f64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waits} requests wait behind their node's first, the owner looked up \
             {looked_up}; origin log {:?}",
            origin.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(origin.requests(), 1, "{:?}", origin.log());
    origin.release();
    for r in requests {
        let r = r.await.unwrap();
        assert_eq!(r.status, 404, "{}", r.text());
        let status = r.header("cache-status").unwrap_or_default();
        assert!(status.starts_with("cdn-edge; fwd=miss"), "{status}");
    }
    assert_eq!(origin.requests(), 1, "{:?}", origin.log());

    // Every node remembers the answer for the object: any slice, from any node.
    for i in 0..site.len() {
        for index in 0..5 {
            let (a, b) = in_slice(index, SIZE);
            let r = site[i].get(&range_target("nope", "1", a, b), &[]).await;
            assert_eq!(r.status, 404, "slice {index} from node {i}");
        }
    }
    assert_eq!(origin.requests(), 1, "{:?}", origin.log());
}
