//! Shared test support: a test origin, a raw HTTP client and the edge process.
#![allow(dead_code)]

pub mod certs;
pub mod client;
pub mod edge;
pub mod faults;
pub mod keys;
pub mod origin;
pub mod site;

/// Deterministic pseudo-random bytes for test objects.
pub fn object_bytes(seed: u64, len: usize) -> Vec<u8> {
    cdn_edge::demo::sample_bytes(seed, len)
}

/// The slice files of a disk tier at `dir`, sorted.
pub fn slice_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("slices")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
