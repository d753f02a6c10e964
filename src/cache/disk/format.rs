//! Slice file format and naming. Pure: bytes in, bytes out.
//!
//! ```text
//! offset size  field
//!      0    8  magic "CDNSLICE"
//!      8    2  format version (1), little endian
//!     10    2  content-type length C
//!     12    4  payload length P
//!     16    8  object size in bytes
//!     24    8  slice index
//!     32   32  object id (SHA-256 of o || 0 || v)
//!     64    4  CRC-32 of the payload
//!     68    4  CRC-32 of bytes 0..68 and the content type
//!     72    C  content type (may be empty: unknown)
//!   72+C    P  payload: the slice's bytes
//! ```
//! A file is valid only if both checksums match, its length is exactly 72 + C + P, and the
//! key in the header is the key its name says.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::cache::{ObjectId, SliceKey};

pub const MAGIC: &[u8; 8] = b"CDNSLICE";
pub const VERSION: u16 = 1;
/// Fixed part of the header.
pub const FIXED_HEADER: usize = 72;
/// Longest content type stored; longer ones are stored as unknown.
pub const MAX_CONTENT_TYPE: usize = 255;
/// Directory of slice files under the cache root.
pub const SLICES_DIR: &str = "slices";
/// Directory of files being written under the cache root.
pub const TMP_DIR: &str = "tmp";

/// What a valid header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: SliceKey,
    pub object_size: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
    pub content_type: Vec<u8>,
}

impl Header {
    /// Total file length this header implies.
    pub fn file_len(&self) -> u64 {
        (FIXED_HEADER + self.content_type.len()) as u64 + u64::from(self.payload_len)
    }

    pub fn header_len(&self) -> usize {
        FIXED_HEADER + self.content_type.len()
    }
}

/// Why a file is not a valid slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("file shorter than its header")]
    Truncated,
    #[error("not a slice file (bad magic or version)")]
    BadMagic,
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("file length does not match the header")]
    Length,
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    #[error("header key does not match the file name")]
    WrongKey,
}

/// Encodes the header of a slice file.
pub fn encode_header(
    key: &SliceKey,
    object_size: u64,
    content_type: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let ct = if content_type.len() <= MAX_CONTENT_TYPE {
        content_type
    } else {
        &[][..]
    };
    let mut h = Vec::with_capacity(FIXED_HEADER + ct.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(ct.len() as u16).to_le_bytes());
    h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    h.extend_from_slice(&object_size.to_le_bytes());
    h.extend_from_slice(&key.index.to_le_bytes());
    h.extend_from_slice(key.object.as_bytes());
    h.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h);
    crc.update(ct);
    h.extend_from_slice(&crc.finalize().to_le_bytes());
    h.extend_from_slice(ct);
    h
}

/// Decodes and checks a header from the first bytes of a file (at least
/// [`FIXED_HEADER`] + content-type length of them). Does not check the payload.
pub fn decode_header(buf: &[u8]) -> Result<Header, FormatError> {
    if buf.len() < FIXED_HEADER {
        return Err(FormatError::Truncated);
    }
    if &buf[..8] != MAGIC || u16::from_le_bytes([buf[8], buf[9]]) != VERSION {
        return Err(FormatError::BadMagic);
    }
    let ct_len = usize::from(u16::from_le_bytes([buf[10], buf[11]]));
    if ct_len > MAX_CONTENT_TYPE {
        return Err(FormatError::HeaderChecksum);
    }
    if buf.len() < FIXED_HEADER + ct_len {
        return Err(FormatError::Truncated);
    }
    let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
    let content_type = buf[FIXED_HEADER..FIXED_HEADER + ct_len].to_vec();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..68]);
    crc.update(&content_type);
    if crc.finalize() != u32_at(68) {
        return Err(FormatError::HeaderChecksum);
    }
    let object: [u8; 32] = buf[32..64].try_into().expect("32 bytes");
    Ok(Header {
        key: SliceKey {
            object: ObjectId::from_bytes(object),
            index: u64_at(24),
        },
        object_size: u64_at(16),
        payload_len: u32_at(12),
        payload_crc: u32_at(64),
        content_type,
    })
}

/// Checks a whole file read into memory and returns its header and payload (a slice of
/// `file`, not a copy).
pub fn decode_file(file: Bytes, expected: &SliceKey) -> Result<(Header, Bytes), FormatError> {
    let header = decode_header(&file)?;
    if header.key != *expected {
        return Err(FormatError::WrongKey);
    }
    if file.len() as u64 != header.file_len() {
        return Err(FormatError::Length);
    }
    let payload = file.slice(header.header_len()..);
    if crc32fast::hash(&payload) != header.payload_crc {
        return Err(FormatError::PayloadChecksum);
    }
    Ok((header, payload))
}

/// File name of a slice: `<object id hex>-<index hex>`.
pub fn file_name(key: &SliceKey) -> String {
    format!("{}-{:016x}", hex::encode(key.object.as_bytes()), key.index)
}

/// Parses a file name made by [`file_name`].
pub fn parse_file_name(name: &str) -> Option<SliceKey> {
    let (object, index) = name.split_once('-')?;
    if object.len() != 64 || index.len() != 16 {
        return None;
    }
    let mut id = [0u8; 32];
    hex::decode_to_slice(object, &mut id).ok()?;
    Some(SliceKey {
        object: ObjectId::from_bytes(id),
        index: u64::from_str_radix(index, 16).ok()?,
    })
}

/// Where a slice lives: `<root>/slices/<h0h1>/<h2h3>/<name>`, two levels of 256
/// directories so no directory grows past a few thousand entries even with millions of
/// slices.
pub fn slice_path(root: &Path, key: &SliceKey) -> PathBuf {
    let name = file_name(key);
    root.join(SLICES_DIR)
        .join(&name[0..2])
        .join(&name[2..4])
        .join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SliceKey {
        SliceKey {
            object: ObjectId::new("movie", "v1"),
            index: 0x1234,
        }
    }

    fn file(payload: &[u8], ct: &[u8]) -> Vec<u8> {
        let mut f = encode_header(&key(), 999_999, ct, payload);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn round_trip() {
        let f = file(b"hello slice", b"video/mp4");
        let (h, payload) = decode_file(Bytes::from(f.clone()), &key()).unwrap();
        assert_eq!(&payload[..], b"hello slice");
        assert_eq!(h.object_size, 999_999);
        assert_eq!(h.content_type, b"video/mp4");
        assert_eq!(h.file_len(), f.len() as u64);
        assert_eq!(decode_header(&f[..h.header_len()]).unwrap(), h);
    }

    #[test]
    fn empty_content_type_and_payload() {
        let (h, payload) = decode_file(Bytes::from(file(b"", b"")), &key()).unwrap();
        assert!(payload.is_empty() && h.content_type.is_empty());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let f = file(b"0123456789abcdef", b"video/mp4");
        for i in 0..f.len() {
            let mut bad = f.clone();
            bad[i] ^= 0x40;
            assert!(
                decode_file(Bytes::from(bad), &key()).is_err(),
                "flip at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_and_extension_are_detected() {
        let f = file(b"0123456789abcdef", b"video/mp4");
        for len in 0..f.len() {
            assert!(
                decode_file(Bytes::copy_from_slice(&f[..len]), &key()).is_err(),
                "len {len}"
            );
        }
        let mut longer = f.clone();
        longer.push(0);
        assert_eq!(
            decode_file(Bytes::from(longer), &key()).unwrap_err(),
            FormatError::Length
        );
    }

    #[test]
    fn a_file_under_another_name_is_rejected() {
        let other = SliceKey { index: 1, ..key() };
        assert_eq!(
            decode_file(Bytes::from(file(b"x", b"")), &other).unwrap_err(),
            FormatError::WrongKey
        );
    }

    #[test]
    fn names_round_trip_and_spread_over_directories() {
        let k = key();
        assert_eq!(parse_file_name(&file_name(&k)), Some(k));
        for bad in [
            "",
            "x-y",
            "00-0000000000000000",
            &format!("{}-zz", "0".repeat(64)),
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
        let p = slice_path(Path::new("/c"), &k);
        let name = file_name(&k);
        assert_eq!(
            p,
            Path::new("/c/slices")
                .join(&name[..2])
                .join(&name[2..4])
                .join(&name)
        );
    }

    #[test]
    fn overlong_content_type_is_stored_as_unknown() {
        let ct = vec![b'a'; 300];
        let (h, _) = decode_file(Bytes::from(file(b"x", &ct)), &key()).unwrap();
        assert!(h.content_type.is_empty());
    }
}
