//! What rustls costs to send one 310 KB range over TLS 1.3, by cipher suite.
//!
//! Informs: how far a TLS range hit can come down towards a plain one, and whether the
//! server's cipher suite order is worth setting. A server and a client connection are
//! joined in memory (no sockets); each iteration writes one 310,491-byte range through
//! the server's writer and drains its records, as the HTTPS listener's stream does
//! (rustls holds at most 64 KiB of records before they must be written out). The range
//! starts at a random place in a 256 MiB region, so, as in a real hit, its bytes come
//! from memory, not from the CPU's caches; `*_hot` reads the same range every time (at
//! an offset that is not a multiple of 4 KiB: on this AMD EPYC, glibc's copy runs many
//! times slower when its destination lies 1 to 15 bytes past its source modulo 4 KiB,
//! and rustls copies each record to 5 bytes past the start of a buffer of its own).
//! The records are drained into a sink that keeps nothing: what the kernel's copy into
//! the socket costs is not part of these figures. `copy_310KB` is a plain copy of the
//! same cold range, the part of the work that only reads memory. Last results are in
//! docs/performance.md.

use std::io::Write;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::SupportedCipherSuite;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

#[path = "../tests/support/certs.rs"]
#[allow(dead_code)]
mod certs;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc; // as the edge's binary

const RANGE: usize = 310_491;
const REGION: usize = 256 << 20;
const HOT: usize = 12_345;

/// A server connection past its handshake with an in-memory client, on `suite` only.
fn connected(suite: SupportedCipherSuite, pki: &certs::TestPki) -> ServerConnection {
    let (certs, key) = pingora::tls::load_certs_and_key_files(
        pki.cert.to_str().unwrap(),
        pki.key.to_str().unwrap(),
    )
    .unwrap()
    .unwrap();
    let mut roots = RootCertStore::empty();
    pingora::tls::load_ca_file_into_store(&pki.ca, &mut roots).unwrap();
    let provider = Arc::new(CryptoProvider {
        cipher_suites: vec![suite],
        ..provider::default_provider()
    });
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut server = ServerConnection::new(Arc::new(server)).unwrap();
    let mut client =
        ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
    for _ in 0..16 {
        if !server.is_handshaking() && !client.is_handshaking() {
            break;
        }
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        server.read_tls(&mut &wire[..]).unwrap();
        server.process_new_packets().unwrap();
        wire.clear();
        server.write_tls(&mut wire).unwrap();
        client.read_tls(&mut &wire[..]).unwrap();
        client.process_new_packets().unwrap();
    }
    assert!(
        !server.is_handshaking(),
        "the in-memory handshake did not finish"
    );
    assert_eq!(server.negotiated_cipher_suite(), Some(suite));
    // The session tickets the server sends after the handshake.
    server.write_tls(&mut std::io::sink()).unwrap();
    server
}

/// Writes `range` as the HTTPS stream does: as much as rustls takes, then its records out.
fn send(server: &mut ServerConnection, range: &[u8]) {
    let mut sent = 0;
    while sent < range.len() {
        sent += server.writer().write(&range[sent..]).unwrap();
        while server.wants_write() {
            server.write_tls(&mut std::io::sink()).unwrap();
        }
    }
}

fn tls_records(c: &mut Criterion) {
    let pki = certs::TestPki::new();

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // What the bytes are does not change what sealing them costs.
    let region = vec![0x5a_u8; REGION];
    let mut cold = move || rng.gen_range(0..REGION - RANGE);

    let mut g = c.benchmark_group("tls");
    let suites = [
        (
            "aes128gcm",
            provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ),
        (
            "aes256gcm",
            provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ),
        (
            "chacha20",
            provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (name, suite) in suites {
        let mut server = connected(suite, &pki);
        g.bench_function(format!("send_310KB_{name}"), |b| {
            b.iter(|| {
                let at = cold();
                send(&mut server, &region[at..at + RANGE]);
            })
        });
        g.bench_function(format!("send_310KB_{name}_hot"), |b| {
            b.iter(|| send(&mut server, &region[HOT..HOT + RANGE]))
        });
    }
    let mut to = vec![0u8; RANGE];
    g.bench_function("copy_310KB", |b| {
        b.iter(|| {
            let at = cold();
            to.copy_from_slice(&region[at..at + RANGE]);
            std::hint::black_box(&to);
        })
    });
    g.finish();
}

criterion_group!(benches, tls_records);
criterion_main!(benches);
