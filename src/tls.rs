//! TLS files checked at start, and the HTTPS listener's acceptor.
//!
//! The certificate and key are loaded and matched here, before any listener opens, so
//! that a bad file stops the start with a message that names it. The acceptor is built
//! from that checked configuration: nothing is read again, and nothing can panic later
//! inside a service thread (as Pingora's `TlsSettings::build` does on a bad file). The
//! handshakes themselves are done by [`crate::connection::GuardedApp`], after the
//! connection has been counted and within `limits.tls_handshake_timeout_ms`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingora::listeners::tls::Acceptor;
use pingora::tls::{load_ca_file_into_store, load_certs_and_key_files, RootCertStore};
use pingora::tls::{version, ServerConfig};

use crate::config::ServerCert;

/// Why a TLS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{cert} / {key}: {why}")]
    ServerCert {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("tls.ca_file {path}: {why}")]
    CaFile { path: PathBuf, why: String },
}

/// Loads the certificate chain and key, and checks that the key belongs to the leaf.
pub fn check_server_cert(sc: &ServerCert) -> Result<(), TlsError> {
    server_config(sc).map(drop)
}

/// The HTTPS listener's rustls configuration: TLS 1.2 and 1.3, the one certificate.
fn server_config(sc: &ServerCert) -> Result<ServerConfig, TlsError> {
    for path in [&sc.cert, &sc.key] {
        std::fs::metadata(path).map_err(|error| TlsError::Read {
            path: path.clone(),
            error,
        })?;
    }
    let bad = |why: String| TlsError::ServerCert {
        cert: sc.cert.clone(),
        key: sc.key.clone(),
        why,
    };
    let (certs, key) = load_certs_and_key_files(&path_str(&sc.cert), &path_str(&sc.key))
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| {
            bad(
                "need a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1)"
                    .into(),
            )
        })?;
    pingora::tls::install_default_crypto_provider();
    ServerConfig::builder_with_protocol_versions(&[&version::TLS12, &version::TLS13])
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(format!("the key does not fit the certificate: {e}")))
}

/// Loads a CA bundle the way the upstream connectors will.
pub fn check_ca_file(path: &Path) -> Result<(), TlsError> {
    std::fs::metadata(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let mut store = RootCertStore::empty();
    load_ca_file_into_store(path, &mut store).map_err(|e| TlsError::CaFile {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if store.is_empty() {
        return Err(TlsError::CaFile {
            path: path.to_path_buf(),
            why: "no certificate in the file".into(),
        });
    }
    Ok(())
}

/// The HTTPS listener's acceptor: TLS 1.2 and 1.3, ALPN offering h2 then http/1.1 (as
/// Pingora's `TlsSettings` with `enable_h2`).
pub fn acceptor(sc: &ServerCert) -> Result<Acceptor, TlsError> {
    let mut config = server_config(sc)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Acceptor::from_server_config(Arc::new(config)))
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}
