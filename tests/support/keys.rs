//! Ed25519 keys through the command line: `cdn-edge keygen` and `cdn-edge sign`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cdn_edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cdn-edge"))
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cdn-edge keygen --out private` and returns its output.
pub fn keygen_output(private: &Path) -> Output {
    cdn_edge()
        .args(["keygen", "--out"])
        .arg(private)
        .output()
        .unwrap()
}

/// A new key pair: the private key in `private`; returns the public key (base64).
pub fn keygen(private: &Path) -> String {
    let out = keygen_output(private);
    assert_ok(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.contains("private_key ="), "{stdout}");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("public_key = \"")?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no public_key in {stdout}"))
        .to_string()
}

/// A `[[signing.keys]]` entry of an ed25519 key.
pub fn ed25519_entry(id: &str, public: &str) -> String {
    format!("[[signing.keys]]\nid = \"{id}\"\nalg = \"ed25519\"\npublic_key = \"{public}\"\n")
}

/// The shipped conf/edge.toml with `entry` among its keys, written to `dir/edge.toml`.
pub fn conf_with_key(dir: &Path, entry: &str) -> PathBuf {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/edge.toml")).unwrap();
    let conf = dir.join("edge.toml");
    let text = shipped.replacen("[cache]", &format!("{entry}\n[cache]"), 1);
    std::fs::write(&conf, text).unwrap();
    conf
}

/// `cdn-edge sign --conf conf --key id --private-key-file private --object o --version v`.
pub fn sign_output(conf: &Path, id: &str, private: &Path, o: &str, v: &str) -> Output {
    cdn_edge()
        .args(["sign", "--key", id, "--object", o, "--version", v, "--conf"])
        .arg(conf)
        .arg("--private-key-file")
        .arg(private)
        .output()
        .unwrap()
}

/// The query string `sign_output` prints; panics if the command fails.
pub fn sign(conf: &Path, id: &str, private: &Path, o: &str, v: &str) -> String {
    let out = sign_output(conf, id, private, o, v);
    assert_ok(&out);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
