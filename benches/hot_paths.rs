//! Per-request helpers on the video and dictionary hot paths.
//!
//! Informs: whether signature checking, range parsing, slice planning, the memory tier
//! lookup, the dictionary key, the response head, the access-log line and its client
//! address behind trusted proxies are small next
//! to writing a 310 KB response (≈ tens of µs) or answering a small JSON hit (≈ 10 µs of
//! CPU in all). Each is expected to stay well under a microsecond except the HMAC (two
//! SHA-256 blocks) and the Ed25519 verification (tens of µs), which the cache of
//! verified URLs turns into a lookup. Last results are in docs/performance.md.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};

use cdn_edge::access_log::{self, Entry};
use cdn_edge::auth::{sign_query, sign_query_ed25519, SignedUrls, Verifier};
use cdn_edge::cache::memory::MemoryTier;
use cdn_edge::cache::video_policy::VideoPolicy;
use cdn_edge::cache::{CachedSlice, ObjectId, ObjectMeta, SliceKey};
use cdn_edge::config::{KeyMaterial, SigningKey};
use cdn_edge::config::{LogFormat, MemoryPolicy};
use cdn_edge::dictionary::key::canonical_target;
use cdn_edge::proxies::TrustedProxies;
use cdn_edge::range::{parse_range_header, parse_range_path, slice_pieces, ByteRange};
use cdn_edge::respond;

const NOW: u64 = 1_800_000_000;

fn signature(c: &mut Criterion) {
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    let pair = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    let mut keys: Vec<SigningKey> = ["k1-secret-0123456789", "k2-secret-0123456789"]
        .iter()
        .enumerate()
        .map(|(i, s)| SigningKey::hmac(format!("k{i}"), s.as_bytes()))
        .collect();
    keys.push(SigningKey {
        id: "ed".into(),
        material: KeyMaterial::Ed25519 {
            public_key: pair.public_key().as_ref().try_into().unwrap(),
        },
    });
    let verifier = Verifier::new(&keys, 30);
    let hmac = |key: usize| {
        sign_query(
            keys[key].hmac_secret().unwrap(),
            "81234567",
            "1080p-h264",
            NOW + 3600,
            "c9f1d2a7b3",
        )
    };
    let (first, second) = (hmac(0), hmac(1));
    let ed25519 = sign_query_ed25519(&pair, "81234567", "1080p-h264", NOW + 3600, "c9f1d2a7b3");
    let forged = format!(
        "o=81234567&v=1080p-h264&e={}&t=c9f1d2a7b3&sc={}",
        NOW + 3600,
        "A".repeat(86)
    );
    let client = std::net::IpAddr::from([192, 0, 2, 1]);
    let mut g = c.benchmark_group("auth");
    g.bench_function("verify_first_key", |b| {
        b.iter(|| verifier.verify(black_box(&first), NOW).unwrap())
    });
    g.bench_function("verify_second_key", |b| {
        b.iter(|| verifier.verify(black_box(&second), NOW).unwrap())
    });
    g.bench_function("verify_ed25519", |b| {
        b.iter(|| verifier.verify(black_box(&ed25519), NOW).unwrap())
    });
    g.bench_function("reject_malformed", |b| {
        b.iter(|| {
            verifier
                .verify(black_box("o=..&v=1&e=1&t=&sc=00"), NOW)
                .unwrap_err()
        })
    });
    // The cache of verified URLs, as the edge runs it (16 MiB, 20 bad signatures a second).
    let urls = SignedUrls::new(verifier.clone(), 16 << 20, 20);
    for q in [&first, &ed25519] {
        urls.check(q, NOW, client).unwrap();
    }
    g.bench_function("cached_hmac", |b| {
        b.iter(|| urls.check(black_box(&first), NOW, client).unwrap())
    });
    g.bench_function("cached_ed25519", |b| {
        b.iter(|| urls.check(black_box(&ed25519), NOW, client).unwrap())
    });
    let unlimited = SignedUrls::new(verifier.clone(), 16 << 20, 0);
    g.bench_function("reject_forged_ed25519", |b| {
        b.iter(|| {
            unlimited
                .check(black_box(&forged), NOW, client)
                .unwrap_err()
        })
    });
    for _ in 0..20 {
        let _ = urls.check(&forged, NOW, client);
    }
    g.bench_function("reject_forged_ed25519_throttled", |b| {
        b.iter(|| urls.check(black_box(&forged), NOW, client).unwrap_err())
    });
    g.finish();
}

fn ranges(c: &mut Criterion) {
    let mut g = c.benchmark_group("range");
    g.bench_function("parse_range_path", |b| {
        b.iter(|| parse_range_path(black_box("122638100-122948590")).unwrap())
    });
    g.bench_function("parse_range_header", |b| {
        b.iter(|| parse_range_header(black_box(b"bytes=122638100-122948590")).unwrap())
    });
    g.bench_function("plan_310KB_over_1MiB_slices", |b| {
        let r = ByteRange {
            start: 122_638_100,
            end: 122_948_590,
        };
        b.iter(|| {
            slice_pieces(black_box(r), 1 << 20)
                .map(|p| p.to - p.from)
                .sum::<usize>()
        })
    });
    g.finish();
}

fn slice_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let object = ObjectId::new("81234567", "1080p-h264");
    let slice = CachedSlice {
        bytes: Bytes::from(vec![7u8; 1 << 20]),
        meta: std::sync::Arc::new(ObjectMeta::new(&object, 1 << 30, None)),
    };
    // 1,000 slices in a 1 GiB tier: with the windowed policy, the first 500 or so have
    // left the window for the main part.
    let filled = |policy| {
        let tier = MemoryTier::new(1 << 30, policy);
        rt.block_on(async {
            for index in 0..1000 {
                let key = SliceKey { object, index };
                tier.fills().insert(key, slice.clone()).await;
                tier.filled(&key, slice.bytes.len()).await;
                tier.sync().await;
            }
        });
        tier
    };
    let lru = filled(MemoryPolicy::Lru);
    let tier = filled(MemoryPolicy::Windowed);
    let video = filled(MemoryPolicy::Video);
    let mut g = c.benchmark_group("cache");
    g.bench_function("object_id", |b| {
        b.iter(|| ObjectId::new(black_box("81234567"), black_box("1080p-h264")))
    });
    g.bench_function("memory_hit", |b| {
        b.to_async(&rt).iter(|| async {
            lru.get(black_box(&SliceKey { object, index: 900 }))
                .await
                .unwrap()
        })
    });
    // Windowed: a slice in the main part is found by one lookup, one in the window by two.
    for (name, index) in [
        ("memory_hit_windowed_main", 100),
        ("memory_hit_windowed_window", 900),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                tier.get(black_box(&SliceKey { object, index }))
                    .await
                    .unwrap()
            })
        });
    }
    // Video: one lookup, and the request's read told to the policy (once per request).
    g.bench_function("memory_hit_video", |b| {
        b.to_async(&rt).iter(|| async {
            if let Some(policy) = video.video_policy() {
                policy.read(object, 900, 900, true, 1 << 20);
            }
            video
                .get(black_box(&SliceKey { object, index: 900 }))
                .await
                .unwrap()
        })
    });
    // With a disk tier of `cache.disk.policy = "video"`, a second policy is told of the
    // same read: what that adds per request, on a policy holding 1,000 slices.
    let disk_policy = VideoPolicy::new(1 << 40);
    for index in 0..1_000 {
        disk_policy.filled(SliceKey { object, index }, 1 << 20);
    }
    g.bench_function("disk_policy_read", |b| {
        b.iter(|| disk_policy.read(black_box(object), 900, 900, true, 1 << 20))
    });
    g.bench_function("memory_contains", |b| {
        b.iter(|| tier.contains(black_box(&SliceKey { object, index: 900 })))
    });
    // Hits from several threads at once, each on a title of its own: the time per hit
    // as each thread sees it. The `video` policy takes one lock per request (`read`),
    // LRU none of its own; a time that grows with the threads is contention.
    let threads_max = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (name, tier) in [("lru", &lru), ("video", &video)] {
        for threads in [1, 2, 4, 8].into_iter().filter(|&n| n <= threads_max) {
            let id = format!("memory_hit_{name}_{threads}_threads");
            g.bench_function(id, |b| {
                b.iter_custom(|iters| parallel_hits(tier, &slice, threads, iters))
            });
        }
    }
    g.finish();
}

/// Wall time for `threads` threads to make `iters` memory hits each, each thread on a
/// title of its own (a slice of it filled first), telling the policy of each read.
fn parallel_hits(
    tier: &MemoryTier,
    slice: &CachedSlice,
    threads: usize,
    iters: u64,
) -> std::time::Duration {
    let start = std::sync::Barrier::new(threads + 1);
    let mut began = std::time::Instant::now();
    // The scope returns when every thread has made its hits.
    std::thread::scope(|s| {
        for t in 0..threads {
            let start = &start;
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let object = ObjectId::new(&format!("title-{t}"), "v");
                let key = SliceKey { object, index: 0 };
                rt.block_on(async {
                    tier.fills().insert(key, slice.clone()).await;
                    start.wait();
                    for _ in 0..iters {
                        if let Some(policy) = tier.video_policy() {
                            policy.read(object, 0, 0, true, 1 << 20);
                        }
                        black_box(tier.get(black_box(&key)).await.unwrap());
                    }
                });
            });
        }
        start.wait();
        began = std::time::Instant::now();
    });
    began.elapsed()
}

fn dictionary_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("dictionary");
    // The player's hover lookup: six parameters, one percent-encoded Hangul syllable.
    let query = b"form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n";
    g.bench_function("canonical_key_6_params", |b| {
        b.iter(|| {
            canonical_target(
                black_box("/base_dict_getHoverDict_8"),
                Some(black_box(query)),
            )
        })
    });
    g.finish();
}

fn response(c: &mut Criterion) {
    let mut g = c.benchmark_group("response");
    g.bench_function("range_head_6_headers", |b| {
        b.iter(|| {
            let mut h = http::HeaderMap::with_capacity(8);
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("video/mp4"),
            );
            h.insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(black_box(310_491u64)),
            );
            h.insert(
                http::header::ACCEPT_RANGES,
                http::HeaderValue::from_static("bytes"),
            );
            h.insert(
                http::header::ETAG,
                http::HeaderValue::from_static("\"254d93920ae6eea26996a21105ef4aff\""),
            );
            h.insert(
                respond::CACHE_STATUS,
                http::HeaderValue::from_static("cdn-edge; hit"),
            );
            respond::head(200, h).unwrap()
        })
    });
    let entry = Entry {
        client: "203.0.113.7",
        method: "GET",
        path: "/range/122638100-122948590",
        route: "range",
        status: 200,
        bytes: 310_491,
        duration_ms: 0.482,
        cache: "hit",
        range: "",
        proto: "http/1.1",
        tls: false,
        error: "",
    };
    let now = std::time::SystemTime::now();
    let mut line = Vec::with_capacity(512);
    for (name, format) in [
        ("access_line_json", LogFormat::Json),
        ("access_line_text", LogFormat::Text),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                line.clear();
                access_log::render(&mut line, black_box(&entry), format, now);
                line.len()
            })
        });
    }
    g.finish();
}

/// The access log's client address: no proxies (every request pays this), and a
/// client behind two trusted proxies.
fn client_address(c: &mut Criterion) {
    let peer: std::net::IpAddr = "10.0.0.1".parse().unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "x-forwarded-for",
        http::HeaderValue::from_static("6.6.6.6, 198.51.100.9, 10.2.2.2"),
    );
    let none = TrustedProxies::default();
    let nets: Vec<ipnet::IpNet> = ["192.0.2.0/24", "2001:db8::/32", "10.0.0.0/8"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    let trusted = TrustedProxies::new(&nets);
    let mut g = c.benchmark_group("proxies");
    for (name, proxies) in [
        ("client_ip_no_proxies", &none),
        ("client_ip_behind_two_proxies", &trusted),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| proxies.client_ip_for(black_box(peer), black_box(&headers)))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    signature,
    ranges,
    slice_lookup,
    dictionary_key,
    response,
    client_address
);
criterion_main!(benches);
