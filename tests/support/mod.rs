//! Shared test support: a test origin, a raw HTTP client and the edge process.
#![allow(dead_code)]

pub mod certs;
pub mod client;
pub mod edge;
pub mod origin;
pub mod site;

/// Deterministic pseudo-random bytes for test objects.
pub fn object_bytes(seed: u64, len: usize) -> Vec<u8> {
    cdn_edge::demo::sample_bytes(seed, len)
}
