//! Tiers and directed mode (SPEC 6.3): a child site fills from the parent site that
//! owns each slice, not from the origin, and from the origin only when no parent
//! answers; a directed site serves what its nodes hold (through its peers) and sends
//! every other client to `origin.redirect_url`, never pulling.

mod support;

use support::edge::{signed, EdgeOptions};
use support::object_bytes;
use support::origin::TestOrigin;
use support::site::{
    fetched_by, get_exact, in_slice, origins, owner_of, range_target, site_options as opts, slices,
    ClusterOptions, Site, SITE_OBJECT_SIZE,
};

const SIZE: usize = SITE_OBJECT_SIZE;
const PARENT_SECRET: &str = "parent-site-secret";

/// `GET /` of (o, v) from node `i` of `site`: 200 with the whole object.
async fn get_whole(site: &Site, i: usize, o: &str, v: &str, bytes: &[u8]) -> String {
    let r = site[i].get(&format!("/?{}", signed(o, v)), &[]).await;
    assert_eq!(r.status, 200, "{o}/{v}: {}", r.text());
    assert!(r.complete && r.body == bytes, "{o}/{v}: wrong bytes");
    r.header("cache-status").unwrap_or_default().to_string()
}

/// A child site of one node under a parent site of two, each node with its origin.
struct Tiers {
    parent: Site,
    parent_origins: Vec<TestOrigin>,
    child: Site,
    child_origin: TestOrigin,
}

async fn tiers(objects: &[(&str, &str, &[u8])], parent_secret: &str) -> Tiers {
    let parent_origins = origins(2, objects).await;
    let child_origin = origins(1, objects).await.remove(0);
    let parent = Site::start(
        ClusterOptions {
            secret: PARENT_SECRET.to_string(),
            ..ClusterOptions::default()
        },
        parent_origins.iter().map(opts).collect(),
    )
    .await;
    let child = Site::start(
        ClusterOptions {
            parents: parent.peers.clone(),
            parent_secret: Some(parent_secret.to_string()),
            ..ClusterOptions::default()
        },
        vec![opts(&child_origin)],
    )
    .await;
    Tiers {
        parent,
        parent_origins,
        child,
        child_origin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_site_fills_from_its_parent_site_and_a_restarted_child_refills_from_it() {
    let t_bytes = object_bytes(101, SIZE);
    let u_bytes = object_bytes(102, SIZE);
    let Tiers {
        mut parent,
        parent_origins,
        mut child,
        child_origin,
    } = tiers(&[("t", "1", &t_bytes), ("u", "1", &u_bytes)], PARENT_SECRET).await;

    // child → parent site → origin: each slice reaches the parent site once, fetched by
    // the parent that owns it on the parents' ring.
    let status = get_whole(&child, 0, "t", "1", &t_bytes).await;
    assert!(status.starts_with("cdn-edge; fwd=miss"), "{status}");
    assert_eq!(child_origin.requests(), 0, "{:?}", child_origin.log());
    let fetched = fetched_by(&parent_origins);
    assert_eq!(fetched.len() as u64, slices(SIZE));
    for ((o, v, index), by) in &fetched {
        let owner = owner_of(&parent.peers, o, v, *index);
        let owner = parent.peers.iter().position(|p| *p == owner).unwrap();
        assert_eq!(
            by,
            &vec![owner],
            "{o}/{v} slice {index}: once, by its owner"
        );
    }

    // A restarted child (memory only: empty) refills from the parent site.
    let parent_requests: u64 = parent_origins.iter().map(TestOrigin::requests).sum();
    child.restart(0).await;
    child.wait_all_healthy(0).await;
    let status = get_whole(&child, 0, "t", "1", &t_bytes).await;
    assert!(status.starts_with("cdn-edge; fwd=miss"), "{status}");
    for index in 0..slices(SIZE) {
        let (a, b) = in_slice(index, SIZE);
        let r = get_exact(&child[0], "t", "1", &t_bytes, a, b).await;
        assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
    }
    assert_eq!(child_origin.requests(), 0, "{:?}", child_origin.log());
    let now: u64 = parent_origins.iter().map(TestOrigin::requests).sum();
    assert_eq!(now, parent_requests, "the parents served it from cache");
    let mut hits = 0.0;
    for i in 0..parent.len() {
        hits += parent.peer_served(i, "hit").await;
    }
    assert!(hits >= slices(SIZE) as f64, "parent hits: {hits}");

    // The parent site down: the child fills from the origin, every request succeeds.
    parent.kill(0).await;
    parent.kill(1).await;
    get_whole(&child, 0, "u", "1", &u_bytes).await;
    let fetched = fetched_by(std::slice::from_ref(&child_origin));
    assert_eq!(fetched.len() as u64, slices(SIZE));
    assert!(fetched.values().all(|by| by.len() == 1), "{fetched:?}");
    for p in &parent.peers {
        child.wait_state(0, *p, "down").await;
    }
    child[0]
        .wait_for_metric_exact("cdn_edge_parents{state=\"down\"}", 2.0)
        .await;
    let (a, b) = in_slice(3, SIZE);
    let r = get_exact(&child[0], "t", "1", &t_bytes, a, b).await;
    assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
    assert_eq!(
        parent_origins.iter().map(TestOrigin::requests).sum::<u64>(),
        parent_requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_with_the_wrong_parent_secret_is_denied_and_fills_from_the_origin() {
    let bytes = object_bytes(103, SIZE);
    let Tiers {
        parent,
        parent_origins,
        child,
        child_origin,
    } = tiers(&[("w", "1", &bytes)], "not-the-parent-secret").await;

    get_whole(&child, 0, "w", "1", &bytes).await;
    assert_eq!(
        parent_origins.iter().map(TestOrigin::requests).sum::<u64>(),
        0,
        "a denied request costs the parent no fill"
    );
    let fetched = fetched_by(std::slice::from_ref(&child_origin));
    assert_eq!(fetched.len() as u64, slices(SIZE));
    assert!(fetched.values().all(|by| by.len() == 1), "{fetched:?}");
    let mut denied = 0.0;
    for i in 0..parent.len() {
        denied += parent.peer_served(i, "denied").await;
    }
    assert!(denied >= 1.0, "the parents denied the child");
}

const REDIRECT: &str = "http://fallback.example:8080/video";

fn directed(mut o: EdgeOptions, redirect_url: &str) -> EdgeOptions {
    o.origin_extra = format!("mode = \"directed\"\nredirect_url = \"{redirect_url}\"\n");
    o
}

/// Content reaches a directed site by fill (SPEC 7); here it is loaded while the site
/// runs in pull mode, kept in each owner's disk tier, and the nodes are then restarted
/// in directed mode on the same disks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directed_site_serves_what_its_nodes_hold_through_peers_and_redirects_the_rest() {
    let held = object_bytes(111, SIZE);
    let origin = TestOrigin::start().await;
    origin.add_object("held", "1", held.clone(), "video/mp4");
    origin.add_object("absent", "1", object_bytes(112, SIZE), "video/mp4");
    let disks: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let pull: Vec<EdgeOptions> = disks
        .iter()
        .map(|d| {
            let mut o = opts(&origin);
            o.disk = Some((d.path().to_path_buf(), 1 << 30));
            o
        })
        .collect();
    let mut site = Site::start(ClusterOptions::default(), pull.clone()).await;

    // Every slice but the last, loaded by its owner (asked directly): on its disk only.
    let last = slices(SIZE) - 1;
    let mut owned = [0u32; 3];
    for index in 0..last {
        let owner = site.owner("held", "1", index);
        let (a, b) = in_slice(index, SIZE);
        get_exact(&site[owner], "held", "1", &held, a, b).await;
        owned[owner] += 1;
    }
    for (i, n) in owned.iter().enumerate() {
        site[i]
            .wait_for_metric("cdn_edge_disk_writes_total", f64::from(*n))
            .await;
    }
    assert_eq!(origin.requests(), last);

    for (i, o) in pull.iter().enumerate() {
        site.restart_with(i, &directed(o.clone(), REDIRECT)).await;
    }
    for i in 0..site.len() {
        site[i]
            .wait_for_metric("cdn_edge_disk_index_ready", 1.0)
            .await;
        site.wait_all_healthy(i).await;
    }

    // Held: a non-owner serves it from the owner, the owner from its disk.
    for index in 0..last {
        let owner = site.owner("held", "1", index);
        let (a, b) = in_slice(index, SIZE);
        let r = get_exact(&site[(owner + 1) % 3], "held", "1", &held, a, b).await;
        assert_eq!(
            r.header("cache-status"),
            Some("cdn-edge; fwd=miss; detail=peer"),
            "slice {index} through its owner"
        );
        let r = get_exact(&site[owner], "held", "1", &held, a, b).await;
        assert_eq!(r.header("cache-status"), Some("cdn-edge; hit"));
    }

    // Held by no node: the last slice of held, any part of absent.
    let (a, b) = in_slice(last, SIZE);
    let targets = [
        range_target("held", "1", a, b),
        range_target("absent", "1", 0, 99),
        format!("/?{}", signed("absent", "1")),
    ];
    for i in 0..site.len() {
        for target in &targets {
            let r = site[i].get(target, &[]).await;
            assert_eq!(r.status, 302, "{target} from node {i}: {}", r.text());
            let want = format!("{REDIRECT}{target}");
            assert_eq!(r.header("location"), Some(want.as_str()));
        }
    }
    assert_eq!(
        origin.requests(),
        last,
        "a directed site never pulls a client's miss: {:?}",
        origin.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directed_site_without_redirect_url_answers_404_and_never_pulls() {
    let origin = TestOrigin::start().await;
    origin.add_object("absent", "1", object_bytes(113, SIZE), "video/mp4");
    let site = Site::start_n(ClusterOptions::default(), directed(opts(&origin), ""), 2).await;
    for i in 0..site.len() {
        for index in 0..4 {
            let (a, b) = in_slice(index, SIZE);
            let r = site[i].get(&range_target("absent", "1", a, b), &[]).await;
            assert_eq!(r.status, 404, "slice {index} from node {i}: {}", r.text());
            assert_eq!(r.header("location"), None);
        }
    }
    assert_eq!(origin.requests(), 0, "{:?}", origin.log());
    let mut not_held = 0.0;
    for i in 0..site.len() {
        not_held += site.peer_served(i, "not_held").await;
    }
    assert!(not_held >= 1.0, "non-owners asked the owners first");
}
