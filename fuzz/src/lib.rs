//! Bodies of the fuzz targets in `fuzz_targets/`, one `pub fn(&[u8])` each, so every
//! target is a one-line wrapper. Each body feeds the bytes to a parser that reads input
//! from outside the process (clients, peers, origins, files on disk, the config file)
//! and asserts what must hold whatever the input: no panic, and the invariants listed in
//! its doc comment. A failed assertion is a crash that libFuzzer reports and saves.
//!
//! Run them with `./dev fuzz [seconds-per-target] [target...]` (docs/reliability.md).

mod config;
mod dictionary;
mod disk;
mod peer;
mod range;
#[cfg(test)]
mod seeds;
mod signed;
mod spool;

pub use config::config;
pub use dictionary::dictionary_key;
pub use disk::disk_slice;
pub use peer::peer_request;
pub use range::{range_header, range_path};
pub use signed::signed_query;
pub use spool::spool_record;

/// Reads typed values from the front of the fuzz input; past its end every read gives
/// zeros or empty slices, so any input decodes to some value.
pub(crate) struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    pub(crate) fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub(crate) fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let head = self.bytes(8);
        b[..head.len()].copy_from_slice(head);
        u64::from_le_bytes(b)
    }

    /// A run of up to `max` bytes, its length read first.
    pub(crate) fn chunk(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u8()) % (max + 1);
        self.bytes(n)
    }

    /// A valid `o` or `v` (1–64 characters of `[a-z0-9._-]`, not starting with `.`, no
    /// `..`) made from the next bytes.
    pub(crate) fn id(&mut self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789._-";
        let raw = self.chunk(64);
        let mut id = String::with_capacity(raw.len() + 1);
        for &b in raw {
            let c = ALPHABET[usize::from(b) % ALPHABET.len()] as char;
            if c == '.' && (id.is_empty() || id.ends_with('.')) {
                continue;
            }
            id.push(c);
        }
        if id.is_empty() {
            id.push('x');
        }
        id
    }

    /// What is left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}
