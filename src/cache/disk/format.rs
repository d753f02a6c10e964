//! Slice file format and naming. Pure: bytes in, bytes out.
//!
//! ```text
//! offset size  field
//!      0    8  magic "CDNSLICE"
//!      8    2  format version (2), little endian
//!     10    2  content-type length C
//!     12    4  payload length P
//!     16    8  object size in bytes
//!     24    8  slice index
//!     32   32  object id (SHA-256 of o || 0 || v)
//!     64    4  slice size the object was cut with
//!     68    4  CRC-32 of the payload
//!     72    4  CRC-32 of bytes 0..72 and the content type
//!     76    C  content type (may be empty: unknown)
//!   76+C    P  payload: the slice's bytes
//! ```
//! A file is valid only if both checksums match, its length is exactly 76 + C + P, the
//! key in the header is the key its name says, it was cut with the configured slice
//! size, and P is exactly the length that slice of an object of that size has.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::cache::{ObjectId, SliceKey};
use crate::range::slice_len;

pub const MAGIC: &[u8; 8] = b"CDNSLICE";
pub const VERSION: u16 = 2;
/// Fixed part of the header.
pub const FIXED_HEADER: usize = 76;
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
    pub slice_bytes: u32,
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
    #[error("cut with another slice size, or a length that slice cannot have")]
    WrongSlicing,
}

impl Header {
    /// Whether this slice fits the configured slicing: same slice size, and a payload
    /// exactly as long as slice `index` of an object of `object_size` bytes.
    pub fn check_slicing(&self, slice_bytes: u64) -> Result<(), FormatError> {
        let expected = slice_len(self.key.index, slice_bytes, self.object_size);
        if u64::from(self.slice_bytes) != slice_bytes
            || expected == 0
            || u64::from(self.payload_len) != expected
        {
            return Err(FormatError::WrongSlicing);
        }
        Ok(())
    }
}

/// Encodes the header of a slice file.
pub fn encode_header(
    key: &SliceKey,
    object_size: u64,
    slice_bytes: u32,
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
    h.extend_from_slice(&slice_bytes.to_le_bytes());
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
    crc.update(&buf[..72]);
    crc.update(&content_type);
    if crc.finalize() != u32_at(72) {
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
        slice_bytes: u32_at(64),
        payload_crc: u32_at(68),
        content_type,
    })
}

/// Checks a whole file read into memory and returns its header and payload (a slice of
/// `file`, not a copy).
pub fn decode_file(
    file: Bytes,
    expected: &SliceKey,
    slice_bytes: u64,
) -> Result<(Header, Bytes), FormatError> {
    let header = decode_header(&file)?;
    if header.key != *expected {
        return Err(FormatError::WrongKey);
    }
    header.check_slicing(slice_bytes)?;
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

    const S: u64 = 16;

    fn key() -> SliceKey {
        SliceKey {
            object: ObjectId::new("movie", "v1"),
            index: 3,
        }
    }

    /// `payload` as slice 3 of an `object_size`-byte object cut in `slice`-byte slices.
    fn file_with(payload: &[u8], ct: &[u8], object_size: u64, slice: u32) -> Vec<u8> {
        let mut f = encode_header(&key(), object_size, slice, ct, payload);
        f.extend_from_slice(payload);
        f
    }

    /// Slice 3 of a 60-byte object cut in 16-byte slices: bytes 48..60, 12 long.
    fn file(ct: &[u8]) -> Vec<u8> {
        file_with(b"0123456789ab", ct, 60, S as u32)
    }

    fn decode(f: Vec<u8>) -> Result<(Header, Bytes), FormatError> {
        decode_file(Bytes::from(f), &key(), S)
    }

    #[test]
    fn round_trip() {
        let f = file(b"video/mp4");
        let (h, payload) = decode(f.clone()).unwrap();
        assert_eq!(&payload[..], b"0123456789ab");
        assert_eq!(h.object_size, 60);
        assert_eq!(h.slice_bytes, 16);
        assert_eq!(h.content_type, b"video/mp4");
        assert_eq!(h.file_len(), f.len() as u64);
        assert_eq!(decode_header(&f[..h.header_len()]).unwrap(), h);
    }

    #[test]
    fn empty_content_type() {
        let (h, _) = decode(file(b"")).unwrap();
        assert!(h.content_type.is_empty());
    }

    #[test]
    fn another_slicing_is_rejected() {
        // Same bytes, but cut with 32-byte slices: this slice index holds other bytes.
        let other = file_with(b"0123456789ab", b"", 60, 32);
        assert_eq!(decode(other).unwrap_err(), FormatError::WrongSlicing);
        // A length slice 3 cannot have for this object size.
        let short = file_with(b"0123", b"", 60, S as u32);
        assert_eq!(decode(short).unwrap_err(), FormatError::WrongSlicing);
        // The right length for a 64-byte object is wrong for a 60-byte one.
        let full = file_with(b"0123456789abcdef", b"", 60, S as u32);
        assert_eq!(decode(full).unwrap_err(), FormatError::WrongSlicing);
        // Past the end of the object.
        let past = file_with(b"0123", b"", 40, S as u32);
        assert_eq!(decode(past).unwrap_err(), FormatError::WrongSlicing);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let f = file(b"video/mp4");
        for i in 0..f.len() {
            let mut bad = f.clone();
            bad[i] ^= 0x40;
            assert!(decode(bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_and_extension_are_detected() {
        let f = file(b"video/mp4");
        for len in 0..f.len() {
            assert!(decode(f[..len].to_vec()).is_err(), "len {len}");
        }
        let mut longer = f.clone();
        longer.push(0);
        assert_eq!(decode(longer).unwrap_err(), FormatError::Length);
    }

    #[test]
    fn a_file_under_another_name_is_rejected() {
        let other = SliceKey { index: 1, ..key() };
        assert_eq!(
            decode_file(Bytes::from(file(b"")), &other, S).unwrap_err(),
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
        let (h, _) = decode(file(&[b'a'; 300])).unwrap();
        assert!(h.content_type.is_empty());
    }
}
