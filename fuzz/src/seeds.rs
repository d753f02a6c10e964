//! The seed corpus in `corpus/<target>/`: a few valid inputs each, made with the
//! product's own encoders and keys of the fuzz bodies. They are checked in; this writes
//! them again after a format change:
//! `cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_seeds`.

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use cdn_edge::auth::{sign_query, sign_query_ed25519};
use cdn_edge::cache::disk::format::{encode_header, file_name, ObjectRecord};
use cdn_edge::cache::{ObjectId, SliceKey};
use cdn_edge::cluster::auth::{Claim, Kind};
use cdn_edge::cluster::client::{signed_request, SLICE_PATH};
use cdn_edge::cluster::purge::{LOG_PATH, PURGE_PATH};
use cdn_edge::forward::record::{Record, StoredAnswer};
use pingora_http::RequestHeader;
use ring::signature::Ed25519KeyPair;

use crate::{peer, signed};

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target, name, bytes: Vec<u8>| out.push((target, name, bytes));

    let e = signed::NOW + 600;
    let hmac = sign_query(signed::HMAC_SECRET, "movie_1", "v2.mp4", e, "tok%20a");
    let pair = Ed25519KeyPair::from_seed_unchecked(&signed::ED25519_SEED).unwrap();
    let ed = sign_query_ed25519(&pair, "movie_1", "v2.mp4", e, "");
    let expired = sign_query(signed::HMAC_SECRET, "a", "1", signed::NOW - 100, "");
    add("signed_query", "hmac", hmac.clone().into_bytes());
    add("signed_query", "ed25519", ed.clone().into_bytes());
    add("signed_query", "expired", expired.into_bytes());
    add(
        "signed_query",
        "other-params",
        format!("x=1&{ed}&y").into_bytes(),
    );
    add("signed_query", "two", format!("{hmac}\n{ed}").into_bytes());

    add("range_path", "seed", b"122638100-122948590".to_vec());
    add("range_path", "one-byte", b"0-0".to_vec());
    add(
        "range_path",
        "max",
        b"18446744073709551615-18446744073709551615".to_vec(),
    );
    add("range_header", "from-to", b"bytes=0-99".to_vec());
    add("range_header", "from", b"bytes=100-".to_vec());
    add("range_header", "suffix", b"bytes=-500".to_vec());
    add("range_header", "content-range", b"bytes 0-99/1000".to_vec());
    add("range_header", "unsatisfied", b"bytes */1000".to_vec());
    add("range_header", "etags", b"W/\"o-v1\", \"o-v1\"".to_vec());

    let lookup = "form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n";
    add("dictionary_key", "lookup", lookup.as_bytes().to_vec());
    add("dictionary_key", "plus", b"form=a+b&q=%2B&&x".to_vec());
    let nfd = "form=\u{110B}\u{1165}&sl=ko";
    add("dictionary_key", "nfd", nfd.as_bytes().to_vec());

    let key = SliceKey {
        object: ObjectId::new("movie", "v1"),
        index: 3,
    };
    let record = ObjectRecord {
        size: 60,
        content_type: b"video/mp4",
        validator: b"E\"v1\"",
        recheck_at: 1234,
        o: "movie",
        v: "v1",
        written_at: 5678,
    };
    let mut file = encode_header(&key, record, 16, b"0123456789ab");
    file.extend_from_slice(b"0123456789ab");
    add("disk_slice", "v4", file);
    add("disk_slice", "name", file_name(&key).into_bytes());

    let r = Record {
        arrival_ms: 1_800_000_000_123,
        client_ip: "203.0.113.7".into(),
        method: "POST".into(),
        target: "/msl/playapi/cadmium/event/1?reqName=events/pause&reqId=abc".into(),
        content_type: Some("application/json".into()),
        dedupe_key: Some("abc".into()),
        body: Bytes::from_static(b"{\"event\":\"pause\"}"),
    };
    add("spool_record", "record", r.encode());
    let a = StoredAnswer {
        at_ms: 5,
        status: 200,
        content_type: Some("application/json".into()),
        body: Bytes::from_static(b"{}"),
    };
    add("spool_record", "answer", a.encode());

    for (name, text) in [
        ("edge", include_str!("../../conf/edge.toml")),
        ("site-node", include_str!("../../conf/site/node1.toml")),
    ] {
        let bare: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .collect();
        add("config", name, (bare.join("\n") + "\n").into_bytes());
    }

    let me: SocketAddr = peer::ME.parse().unwrap();
    let claim = |kind, o, v, index, hops| Claim {
        kind,
        from: "127.0.0.2:7443".parse().unwrap(),
        to: me,
        o,
        v,
        index,
        hops,
        time: peer::NOW,
    };
    let c = claim(Kind::Sibling, "movie", "v1", 3, 0);
    let path = format!("{SLICE_PATH}?o=movie&v=v1&i=3");
    add(
        "peer_request",
        "slice",
        head(&signed_request("GET", &path, &c, peer::SECRET, me).unwrap()),
    );
    let c = claim(Kind::Child, "movie", "v1", 4, 2);
    let path = format!("{SLICE_PATH}?o=movie&v=v1&i=4");
    add(
        "peer_request",
        "child",
        head(&signed_request("GET", &path, &c, peer::SECRET, me).unwrap()),
    );
    let c = claim(Kind::Purge, "movie", "v1", 17, 0);
    let path = format!("{PURGE_PATH}?o=movie&v=v1&id=17");
    add(
        "peer_request",
        "purge",
        head(&signed_request("POST", &path, &c, peer::SECRET, me).unwrap()),
    );
    let c = claim(Kind::PurgeLog, "", "", 5, 0);
    let path = format!("{LOG_PATH}?since=5");
    add(
        "peer_request",
        "purge-log",
        head(&signed_request("GET", &path, &c, peer::SECRET, me).unwrap()),
    );
    out
}

/// The HTTP/1.1 request head of `req`.
fn head(req: &RequestHeader) -> Vec<u8> {
    let mut out = format!("{} {} HTTP/1.1\r\n", req.method, req.uri).into_bytes();
    for (name, value) in req.headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Every seed runs through its target's body without a failed invariant.
#[test]
fn seeds_pass_their_targets() {
    for (target, name, bytes) in seeds() {
        let body: fn(&[u8]) = match target {
            "signed_query" => crate::signed_query,
            "range_path" => crate::range_path,
            "range_header" => crate::range_header,
            "dictionary_key" => crate::dictionary_key,
            "disk_slice" => crate::disk_slice,
            "spool_record" => crate::spool_record,
            "config" => crate::config,
            "peer_request" => crate::peer_request,
            other => panic!("unknown target {other} ({name})"),
        };
        body(&bytes);
        if target == "config" {
            let text = std::str::from_utf8(&bytes).unwrap();
            let env = |_: &str| Some("secret".to_string());
            if let Err(e) = cdn_edge::config::Config::from_toml_with_env(text, env) {
                panic!("config seed {name}: {e}");
            }
        }
    }
}

#[test]
#[ignore = "writes corpus/: run by hand after a format change"]
fn write_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, name, bytes) in seeds() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
