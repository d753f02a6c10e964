//! The command line (SPEC §5): check-config on every shipped file, clear errors, sign.

mod support;

use std::process::Command;

use support::keys;

fn cdn_edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cdn-edge"))
}

/// Every `.toml` under conf/, subdirectories included.
fn shipped_configs() -> Vec<std::path::PathBuf> {
    let mut dirs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf"
    ))];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    files
}

/// `check-config FILE` with the secrets the shipped files read from the environment.
fn check_config(path: &std::path::Path) {
    let out = cdn_edge()
        .arg("check-config")
        .arg(path)
        .env("CDN_EDGE_KEY_K1", "x")
        .env("CDN_EDGE_CLUSTER_SECRET", "y")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_shipped_config_is_valid() {
    let files = shipped_configs();
    for path in &files {
        check_config(path);
    }
    assert!(files.iter().any(|p| p.ends_with("conf/edge.toml")));
    assert!(files.iter().any(|p| p.ends_with("conf/site/node1.toml")));
}

/// conf/site/node1.toml says the other nodes' files differ only in `cluster.self`.
#[test]
fn the_shipped_site_config_is_valid_for_each_of_its_nodes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/site/node1.toml");
    let node1 = std::fs::read_to_string(path).unwrap();
    let config =
        cdn_edge::config::Config::from_toml_with_env(&node1, |_| Some("x".into())).unwrap();
    let cluster = config.cluster.unwrap();
    assert_eq!(cluster.peers.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    for (k, peer) in cluster.peers.iter().enumerate() {
        let text = node1.replacen(
            &format!("self = \"{}\"", cluster.self_addr),
            &format!("self = \"{peer}\""),
            1,
        );
        let file = dir.path().join(format!("node{}.toml", k + 1));
        std::fs::write(&file, text).unwrap();
        check_config(&file);
    }
}

#[test]
fn check_config_names_the_unknown_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let conf =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/edge.toml")).unwrap();
    let bad = conf.replace(
        "slice_bytes = 1048576",
        "slice_bytes = 1048576\nslize_bytes = 5",
    );
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let out = cdn_edge().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cache.slize_bytes") || (err.contains("cache") && err.contains("slize_bytes")),
        "{err}"
    );
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn check_config_reports_a_missing_file() {
    let out = cdn_edge()
        .arg("check-config")
        .arg("/nonexistent/edge.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/edge.toml"));
}

#[test]
fn sign_prints_a_query_the_verifier_accepts() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/edge.toml");
    let out = cdn_edge()
        .args([
            "sign",
            "--conf",
            conf,
            "--key",
            "k1",
            "--object",
            "movie_7",
            "--version",
            "1080p",
            "--ttl",
            "600",
            "--token",
            "user 42/é",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = String::from_utf8(out.stdout).unwrap();
    let q = q.trim();
    assert!(q.contains("&t=user%2042%2F%C3%A9&"), "{q}");
    let config = cdn_edge::config::Config::load(std::path::Path::new(conf)).unwrap();
    let v = cdn_edge::auth::Verifier::new(&config.signing.keys, 0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let s = v.verify(q, now).unwrap();
    assert_eq!((s.object, s.version), ("movie_7", "1080p"));
    assert!(s.expires >= now + 590 && s.expires <= now + 610);
}

#[test]
fn sign_refuses_bad_input() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/edge.toml");
    for args in [
        vec!["--key", "nope", "--object", "a", "--version", "1"],
        vec!["--key", "k1", "--object", "../a", "--version", "1"],
        vec!["--key", "k1", "--object", "a", "--version", "a/b"],
        // Longer than signing.max_ttl_secs (7 days in conf/edge.toml): the edges would refuse it.
        vec![
            "--key",
            "k1",
            "--object",
            "a",
            "--version",
            "1",
            "--ttl",
            "604801",
        ],
    ] {
        let out = cdn_edge()
            .args(["sign", "--conf", conf])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn serve_refuses_a_taken_port_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/edge.toml"))
        .unwrap()
        .replace("0.0.0.0:8080", &taken.local_addr().unwrap().to_string())
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, conf).unwrap();
    let out = cdn_edge()
        .args(["serve", "--conf"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen.http"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn keygen_then_sign_with_the_private_key_verifies() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("k9.key");
    let public = keys::keygen(&private);
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second keygen never overwrites a key.
    assert!(!keys::keygen_output(&private).status.success());

    let conf = keys::conf_with_key(dir.path(), &keys::ed25519_entry("k9", &public));
    let q = keys::sign(&conf, "k9", &private, "movie_7", "1");
    let config = cdn_edge::config::Config::load(&conf).unwrap();
    let v = cdn_edge::auth::Verifier::new(&config.signing.keys, 0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let s = v.verify(&q, now).unwrap();
    assert_eq!((s.object, s.version), ("movie_7", "1"));
    let tampered = q.replace("o=movie_7", "o=movie_8");
    assert_eq!(
        v.verify(&tampered, now),
        Err(cdn_edge::auth::AuthFailure::BadSignature)
    );

    // Another private key is refused before anything is printed.
    let other = dir.path().join("other.key");
    keys::keygen(&other);
    let out = keys::sign_output(&conf, "k9", &other, "movie_7", "1");
    assert!(!out.status.success() && out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not the private key of key \"k9\""),
        "{stderr}"
    );
}
