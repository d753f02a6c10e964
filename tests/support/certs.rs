//! A throwaway certificate authority and server certificates, made with the `openssl`
//! command line tool.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA and one server certificate for `localhost` and 127.0.0.1, signed by it.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line tool (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca_args = vec!["req", "-x509"];
        ca_args.extend(ec);
        ca_args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=cdn-edge test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(d, &ca_args);
        let mut csr_args = vec!["req"];
        csr_args.extend(ec);
        csr_args.extend([
            "-keyout",
            "edge.key",
            "-out",
            "edge.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(d, &csr_args);
        std::fs::write(
            d.join("ext.cnf"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "edge.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "edge.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        Self {
            ca: d.join("ca.pem"),
            cert: d.join("edge.pem"),
            key: d.join("edge.key"),
            dir,
        }
    }

    /// Another key that belongs to no certificate here.
    pub fn stray_key(&self) -> PathBuf {
        let mut args = vec!["req", "-x509"];
        args.extend([
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ]);
        args.extend([
            "-keyout",
            "stray.key",
            "-out",
            "stray.pem",
            "-days",
            "1",
            "-subj",
            "/CN=stray",
        ]);
        openssl(self.dir.path(), &args);
        self.dir.path().join("stray.key")
    }
}
