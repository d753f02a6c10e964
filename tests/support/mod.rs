//! Shared test support: a test origin, a raw HTTP client and the edge process.
#![allow(dead_code)]

pub mod certs;
pub mod client;
pub mod disk;
pub mod edge;
pub mod faults;
pub mod keys;
pub mod load;
pub mod origin;
pub mod site;

/// The sum of every sample of a metric family in a `/metrics` text.
pub fn metric_sum(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

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

/// The file of slice `index` in a disk tier at `dir` (names end in the index as 16 hex
/// digits).
pub fn slice_file(dir: &std::path::Path, index: u64) -> std::path::PathBuf {
    let suffix = format!("-{index:016x}");
    slice_files(dir)
        .into_iter()
        .find(|p| p.to_str().unwrap().ends_with(&suffix))
        .unwrap_or_else(|| panic!("no file of slice {index}"))
}

/// Flips one bit of the byte at `at` of a file, in place.
pub fn flip_byte(path: &std::path::Path, at: usize) {
    let mut data = std::fs::read(path).unwrap();
    data[at] ^= 0x01;
    std::fs::write(path, data).unwrap();
}
