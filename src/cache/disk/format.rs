//! Slice file format and naming. Pure: bytes in, bytes out.
//!
//! Version 5 (written):
//! ```text
//! offset size  field
//!      0    8  magic "CDNSLICE"
//!      8    2  format version (5), little endian (all integers are)
//!     10    2  content-type length C
//!     12    4  payload length P
//!     16    8  object size in bytes
//!     24    8  slice index
//!     32   32  object id (SHA-256 of o || 0 || v)
//!     64    4  slice size the object was cut with
//!     68    4  block size B: a power of two, at least 64 KiB ([`BLOCK_BYTES`] written)
//!     72    8  when the object's metadata is due for a re-check, unix ms
//!              (all ones: confirmed, never re-checked; see `cache::meta`)
//!     80    2  validator length V (at most 255)
//!     82    2  length N of o (at most 256)
//!     84    2  length M of v (at most 256)
//!     86    2  zero
//!     88    8  when the fill that cut the slice started: a purge stamp, unix ms
//!              (`cache::purge`); a purge of the object made later retires the file
//!     96    4  CRC-32 of bytes 0..96, the content type, the validator, o, v and the
//!              block table
//!    100    C  content type (may be empty: unknown)
//!  100+C    V  the origin's validator: `E` + ETag or `L` + Last-Modified (may be empty)
//!      …    N  o
//!      …    M  v
//!      …  4·K  block table: the CRC-32 of each of the payload's K = ⌈P / B⌉ blocks
//!      …    P  payload: the slice's bytes
//! ```
//! One checksum per block lets a read of part of a slice read and check only the blocks
//! that part lies in ([`Header::covering_blocks`], [`Header::check_blocks`]).
//! Version 4 (read, never written) is the same, but for the CRC-32 of the whole payload
//! at 68 and no block table: a file of version 4 is read and checked whole.
//! Version 3 (read, never written) is version 4 up to offset 82, then two zero bytes, a
//! CRC-32 of bytes 0..84, the content type and the validator, and the content type at
//! 88: its slices have no names and no fill time (0: older than any purge).
//! Version 2 (read, never written) is the same up to offset 68, then a CRC-32 of bytes
//! 0..72 and the content type at 72, the content type at 76 and the payload after it:
//! its slices have no validator either, and their metadata is due for a re-check at once.
//!
//! A file is valid only if its checksums match, its length is exactly the header's
//! plus P, the key in the header is the key its name says (and, from version 4, the
//! object id is that of the o and v it records), it was cut with the configured slice
//! size, and P is exactly the length that slice of an object of that size has.

use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::auth::MAX_ID_LEN;
use crate::cache::meta::{MAX_CONTENT_TYPE, MAX_VALIDATOR};
use crate::cache::{ObjectId, SliceKey};
use crate::config::MAX_SLICE_BYTES;
use crate::range::slice_len;

pub const MAGIC: &[u8; 8] = b"CDNSLICE";
pub const VERSION: u16 = 5;
/// Earlier versions, still read.
pub const VERSION_4: u16 = 4;
pub const VERSION_3: u16 = 3;
pub const VERSION_2: u16 = 2;
/// Fixed part of the header.
pub const FIXED_HEADER: usize = 100;
/// Fixed part of a version 3 header.
const FIXED_HEADER_V3: usize = 88;
/// Fixed part of a version 2 header.
const FIXED_HEADER_V2: usize = 76;
/// Block size of the files written: a 310 KB range of a 1 MiB slice reads 5 or 6 blocks,
/// and the table of a 1 MiB slice is 64 bytes.
pub const BLOCK_BYTES: u32 = 64 << 10;
/// Smallest block size read: it bounds the block table.
const MIN_BLOCK_BYTES: u32 = BLOCK_BYTES;
/// Longest block table: that of the largest slice in the smallest blocks read.
const MAX_BLOCK_TABLE: usize = 4 * (MAX_SLICE_BYTES / MIN_BLOCK_BYTES as u64) as usize;
/// Longest header of any version: fixed part, content type, validator, o, v and the
/// block table.
pub const MAX_HEADER: usize =
    FIXED_HEADER + MAX_CONTENT_TYPE + MAX_VALIDATOR + 2 * MAX_ID_LEN + MAX_BLOCK_TABLE;
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
    /// How the payload is checked.
    pub check: PayloadCheck,
    pub content_type: Vec<u8>,
    /// The origin's validator as stored (empty: none).
    pub validator: Vec<u8>,
    /// When the object's metadata is due for a re-check (unix ms; `u64::MAX` confirmed).
    pub recheck_at: u64,
    /// The object's o and v (empty in files older than version 4).
    pub o: String,
    pub v: String,
    /// When the fill that cut the slice started (a purge stamp; 0 before version 4).
    pub written_at: u64,
    /// Length of the fixed part (of this file's version).
    fixed_len: usize,
}

/// The checksums of a slice file's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadCheck {
    /// One CRC-32 of the whole payload (versions 2 to 4).
    Whole(u32),
    /// A CRC-32 of each block of `size` bytes (the last one may be shorter).
    Blocks { size: u32, crcs: Vec<u32> },
}

impl Header {
    /// Total file length this header implies.
    pub fn file_len(&self) -> u64 {
        self.header_len() as u64 + u64::from(self.payload_len)
    }

    /// Where the payload starts.
    pub fn header_len(&self) -> usize {
        self.fixed_len
            + self.content_type.len()
            + self.validator.len()
            + self.o.len()
            + self.v.len()
            + self.block_table_len()
    }

    fn block_table_len(&self) -> usize {
        match &self.check {
            PayloadCheck::Whole(_) => 0,
            PayloadCheck::Blocks { crcs, .. } => 4 * crcs.len(),
        }
    }

    /// The payload bytes to read and check to serve the payload's bytes `within` (end
    /// exclusive, inside the payload): the blocks they lie in. `None` when the payload
    /// has one checksum and must be read whole.
    pub fn covering_blocks(&self, within: Range<u64>) -> Option<Range<u64>> {
        let PayloadCheck::Blocks { size, .. } = self.check else {
            return None;
        };
        let (size, len) = (u64::from(size), u64::from(self.payload_len));
        let end = within.end.min(len);
        let start = within.start.min(end) / size * size;
        Some(start..end.div_ceil(size).saturating_mul(size).min(len))
    }

    /// Checks `data`, the payload's bytes from `start` on, as [`Header::covering_blocks`]
    /// gave them: whole blocks from a block boundary, the last one possibly the payload's
    /// shorter last block.
    pub fn check_blocks(&self, start: u64, data: &[u8]) -> Result<(), FormatError> {
        let PayloadCheck::Blocks { size, crcs } = &self.check else {
            return Err(FormatError::Length);
        };
        let size = u64::from(*size);
        let end = start + data.len() as u64;
        let whole_blocks = start.is_multiple_of(size)
            && (end.is_multiple_of(size) || end == u64::from(self.payload_len));
        if !whole_blocks || end > u64::from(self.payload_len) {
            return Err(FormatError::Length);
        }
        let first = (start / size) as usize;
        for (block, crc) in data.chunks(size as usize).zip(&crcs[first..]) {
            if crc32fast::hash(block) != *crc {
                return Err(FormatError::PayloadChecksum);
            }
        }
        Ok(())
    }

    /// The object's o, when the file records it (version 4 on).
    pub fn object_name(&self) -> Option<&str> {
        (!self.o.is_empty()).then_some(self.o.as_str())
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

/// What a slice file records about its object besides the key.
#[derive(Debug, Clone, Copy)]
pub struct ObjectRecord<'a> {
    pub size: u64,
    /// Empty: unknown. Longer than [`MAX_CONTENT_TYPE`]: stored as unknown.
    pub content_type: &'a [u8],
    /// Empty: none. Longer than [`MAX_VALIDATOR`]: stored as none.
    pub validator: &'a [u8],
    pub recheck_at: u64,
    /// The object's names (valid ids, so at most [`MAX_ID_LEN`] bytes each).
    pub o: &'a str,
    pub v: &'a str,
    /// When the fill that cut the slice started (a purge stamp).
    pub written_at: u64,
}

/// Encodes the header of a slice file (the current version), block table included.
pub fn encode_header<'a>(
    key: &SliceKey,
    object: ObjectRecord<'a>,
    slice_bytes: u32,
    payload: &[u8],
) -> Vec<u8> {
    let fit = |v: &'a [u8], max: usize| if v.len() <= max { v } else { &[][..] };
    let ct = fit(object.content_type, MAX_CONTENT_TYPE);
    let validator = fit(object.validator, MAX_VALIDATOR);
    let (o, v) = (object.o.as_bytes(), object.v.as_bytes());
    debug_assert!(o.len() <= MAX_ID_LEN && v.len() <= MAX_ID_LEN);
    let mut table = Vec::with_capacity(4 * payload.len().div_ceil(BLOCK_BYTES as usize));
    for block in payload.chunks(BLOCK_BYTES as usize) {
        table.extend_from_slice(&crc32fast::hash(block).to_le_bytes());
    }
    let variable = [ct, validator, o, v, &table[..]];
    let mut h = Vec::with_capacity(FIXED_HEADER + variable.iter().map(|p| p.len()).sum::<usize>());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(ct.len() as u16).to_le_bytes());
    h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    h.extend_from_slice(&object.size.to_le_bytes());
    h.extend_from_slice(&key.index.to_le_bytes());
    h.extend_from_slice(key.object.as_bytes());
    h.extend_from_slice(&slice_bytes.to_le_bytes());
    h.extend_from_slice(&BLOCK_BYTES.to_le_bytes());
    h.extend_from_slice(&object.recheck_at.to_le_bytes());
    h.extend_from_slice(&(validator.len() as u16).to_le_bytes());
    h.extend_from_slice(&(o.len() as u16).to_le_bytes());
    h.extend_from_slice(&(v.len() as u16).to_le_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&object.written_at.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h);
    for part in variable {
        crc.update(part);
    }
    h.extend_from_slice(&crc.finalize().to_le_bytes());
    for part in variable {
        h.extend_from_slice(part);
    }
    h
}

/// Where a version's fields are: the fixed part's length, where its header CRC is, and
/// whether it has a validator, names and a fill time, and a block table.
struct Layout {
    fixed_len: usize,
    crc_at: usize,
    validator: bool,
    names: bool,
    blocks: bool,
}

/// Decodes and checks a header from the first bytes of a file (at least its fixed part,
/// content type, validator and names). Does not check the payload.
pub fn decode_header(buf: &[u8]) -> Result<Header, FormatError> {
    if buf.len() < 10 {
        return Err(FormatError::Truncated);
    }
    if &buf[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let layout = match u16::from_le_bytes([buf[8], buf[9]]) {
        VERSION => Layout {
            fixed_len: FIXED_HEADER,
            crc_at: 96,
            validator: true,
            names: true,
            blocks: true,
        },
        VERSION_4 => Layout {
            fixed_len: FIXED_HEADER,
            crc_at: 96,
            validator: true,
            names: true,
            blocks: false,
        },
        VERSION_3 => Layout {
            fixed_len: FIXED_HEADER_V3,
            crc_at: 84,
            validator: true,
            names: false,
            blocks: false,
        },
        VERSION_2 => Layout {
            fixed_len: FIXED_HEADER_V2,
            crc_at: 72,
            validator: false,
            names: false,
            blocks: false,
        },
        _ => return Err(FormatError::BadMagic),
    };
    let fixed_len = layout.fixed_len;
    if buf.len() < fixed_len {
        return Err(FormatError::Truncated);
    }
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([buf[o], buf[o + 1]]));
    let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
    let ct_len = u16_at(10);
    let (validator_len, recheck_at) = if layout.validator {
        (u16_at(80), u64_at(72))
    } else {
        (0, 0)
    };
    let (o_len, v_len, written_at) = if layout.names {
        (u16_at(82), u16_at(84), u64_at(88))
    } else {
        (0, 0, 0)
    };
    if ct_len > MAX_CONTENT_TYPE
        || validator_len > MAX_VALIDATOR
        || o_len > MAX_ID_LEN
        || v_len > MAX_ID_LEN
    {
        return Err(FormatError::HeaderChecksum);
    }
    let payload_len = u32_at(12);
    let block_size = u32_at(68);
    let blocks = if layout.blocks {
        // A power of two from 64 KiB: the table is at most [`MAX_BLOCK_TABLE`] long.
        let count = payload_len.div_ceil(block_size.max(1)) as usize;
        if !block_size.is_power_of_two()
            || block_size < MIN_BLOCK_BYTES
            || 4 * count > MAX_BLOCK_TABLE
        {
            return Err(FormatError::HeaderChecksum);
        }
        count
    } else {
        0
    };
    let ct_end = fixed_len + ct_len;
    let validator_end = ct_end + validator_len;
    let o_end = validator_end + o_len;
    let names_end = o_end + v_len;
    let end = names_end + 4 * blocks;
    if buf.len() < end {
        return Err(FormatError::Truncated);
    }
    let crc_at = layout.crc_at;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..crc_at]);
    crc.update(&buf[fixed_len..end]);
    if crc.finalize() != u32_at(crc_at) {
        return Err(FormatError::HeaderChecksum);
    }
    let object = ObjectId::from_bytes(buf[32..64].try_into().expect("32 bytes"));
    let name = |range: std::ops::Range<usize>| {
        std::str::from_utf8(&buf[range])
            .map(str::to_string)
            .map_err(|_| FormatError::WrongKey)
    };
    let (o, v) = (name(validator_end..o_end)?, name(o_end..names_end)?);
    if layout.names && (o.is_empty() || v.is_empty() || ObjectId::new(&o, &v) != object) {
        return Err(FormatError::WrongKey);
    }
    Ok(Header {
        key: SliceKey {
            object,
            index: u64_at(24),
        },
        object_size: u64_at(16),
        payload_len,
        slice_bytes: u32_at(64),
        check: if layout.blocks {
            PayloadCheck::Blocks {
                size: block_size,
                crcs: buf[names_end..end]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            }
        } else {
            PayloadCheck::Whole(block_size)
        },
        content_type: buf[fixed_len..ct_end].to_vec(),
        validator: buf[ct_end..validator_end].to_vec(),
        recheck_at,
        o,
        v,
        written_at,
        fixed_len,
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
    match header.check {
        PayloadCheck::Whole(crc) if crc32fast::hash(&payload) != crc => {
            return Err(FormatError::PayloadChecksum)
        }
        PayloadCheck::Whole(_) => {}
        PayloadCheck::Blocks { .. } => header.check_blocks(0, &payload)?,
    }
    Ok((header, payload))
}

/// A slice file of the current version made over in version 4, as the release before
/// block checksums wrote it (tests of reading older files).
#[cfg(test)]
pub(crate) fn as_version_4(file: &[u8]) -> Vec<u8> {
    let h = decode_header(file).expect("a valid file");
    let table = h.block_table_len();
    let names_end = h.header_len() - table;
    let payload = &file[h.header_len()..];
    let mut v4 = file[..FIXED_HEADER].to_vec();
    v4[8..10].copy_from_slice(&VERSION_4.to_le_bytes());
    v4[68..72].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&v4[..96]);
    crc.update(&file[FIXED_HEADER..names_end]);
    v4[96..100].copy_from_slice(&crc.finalize().to_le_bytes());
    v4.extend_from_slice(&file[FIXED_HEADER..names_end]);
    v4.extend_from_slice(payload);
    v4
}

/// File name of a slice: `<object id hex>-<index hex>`.
pub fn file_name(key: &SliceKey) -> String {
    format!("{}-{:016x}", hex::encode(key.object.as_bytes()), key.index)
}

/// Parses a file name made by [`file_name`], in that spelling only (lowercase hex, no
/// sign): another spelling of a key is not at the path reads look for.
pub fn parse_file_name(name: &str) -> Option<SliceKey> {
    let (object, index) = name.split_once('-')?;
    let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if object.len() != 64 || index.len() != 16 || !lower_hex(object) || !lower_hex(index) {
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
        let record = ObjectRecord {
            size: object_size,
            content_type: ct,
            validator: b"E\"v1\"",
            recheck_at: 1234,
            o: "movie",
            v: "v1",
            written_at: 5678,
        };
        let mut f = encode_header(&key(), record, slice, payload);
        f.extend_from_slice(payload);
        f
    }

    /// Bytes 0..68 of a file of an earlier `version`, the same in versions 2 and 3.
    fn old_prefix(version: u16, payload: &[u8], ct: &[u8], object_size: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&(ct.len() as u16).to_le_bytes());
        h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        h.extend_from_slice(&object_size.to_le_bytes());
        h.extend_from_slice(&key().index.to_le_bytes());
        h.extend_from_slice(key().object.as_bytes());
        h.extend_from_slice(&(S as u32).to_le_bytes());
        h.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        h
    }

    /// The header CRC of `fixed` and `rest`, then `rest` and `payload`: the end of a file
    /// of an earlier version.
    fn old_file(mut fixed: Vec<u8>, rest: &[&[u8]], payload: &[u8]) -> Vec<u8> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fixed);
        rest.iter().for_each(|r| crc.update(r));
        fixed.extend_from_slice(&crc.finalize().to_le_bytes());
        rest.iter().for_each(|r| fixed.extend_from_slice(r));
        fixed.extend_from_slice(payload);
        fixed
    }

    /// The same file in format version 2, as earlier releases wrote it.
    fn file_v2(payload: &[u8], ct: &[u8], object_size: u64) -> Vec<u8> {
        let h = old_prefix(VERSION_2, payload, ct, object_size);
        old_file(h, &[ct], payload)
    }

    /// The same file in format version 4, as the release before block checksums wrote it.
    fn file_v4(payload: &[u8], ct: &[u8], object_size: u64) -> Vec<u8> {
        let validator = b"E\"v1\"";
        let mut h = old_prefix(VERSION_4, payload, ct, object_size);
        h.extend_from_slice(&1234u64.to_le_bytes());
        h.extend_from_slice(&(validator.len() as u16).to_le_bytes());
        h.extend_from_slice(&5u16.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&5678u64.to_le_bytes());
        old_file(h, &[ct, validator, b"movie", b"v1"], payload)
    }

    /// The same file in format version 3, as the release before names wrote it.
    fn file_v3(payload: &[u8], ct: &[u8], object_size: u64) -> Vec<u8> {
        let validator = b"E\"v1\"";
        let mut h = old_prefix(VERSION_3, payload, ct, object_size);
        h.extend_from_slice(&1234u64.to_le_bytes());
        h.extend_from_slice(&(validator.len() as u16).to_le_bytes());
        h.extend_from_slice(&[0, 0]);
        old_file(h, &[ct, validator], payload)
    }

    /// Slice 3 of a 60-byte object cut in 16-byte slices: bytes 48..60, 12 long.
    fn file(ct: &[u8]) -> Vec<u8> {
        file_with(b"0123456789ab", ct, 60, S as u32)
    }

    fn decode(f: Vec<u8>) -> Result<(Header, Bytes), FormatError> {
        decode_file(Bytes::from(f), &key(), S)
    }

    fn every_flip_is_detected(f: &[u8]) {
        for i in 0..f.len() {
            let mut bad = f.to_vec();
            bad[i] ^= 0x40;
            assert!(decode(bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn round_trip() {
        let f = file(b"video/mp4");
        let (h, payload) = decode(f.clone()).unwrap();
        assert_eq!(&payload[..], b"0123456789ab");
        assert_eq!(h.object_size, 60);
        assert_eq!(h.slice_bytes, 16);
        assert_eq!(h.content_type, b"video/mp4");
        assert_eq!(h.validator, b"E\"v1\"");
        assert_eq!(h.recheck_at, 1234);
        assert_eq!((h.object_name(), h.v.as_str()), (Some("movie"), "v1"));
        assert_eq!(h.written_at, 5678);
        assert_eq!(h.file_len(), f.len() as u64);
        assert_eq!(decode_header(&f[..h.header_len()]).unwrap(), h);
    }

    #[test]
    fn version_4_files_read_with_one_checksum_for_the_payload() {
        let f = file_v4(b"0123456789ab", b"video/mp4", 60);
        let (h, payload) = decode(f.clone()).unwrap();
        assert_eq!(&payload[..], b"0123456789ab");
        assert_eq!(
            h.check,
            PayloadCheck::Whole(crc32fast::hash(b"0123456789ab"))
        );
        assert_eq!(h.covering_blocks(0..4), None);
        assert_eq!((h.object_name(), h.v.as_str()), (Some("movie"), "v1"));
        assert_eq!((h.recheck_at, h.written_at), (1234, 5678));
        assert_eq!(h.file_len(), f.len() as u64);
        every_flip_is_detected(&f);
    }

    /// A slice of 200 KiB in 64 KiB blocks: three whole blocks and one of 8 KiB.
    #[test]
    fn a_part_of_a_slice_is_read_and_checked_block_by_block() {
        const B: u64 = BLOCK_BYTES as u64;
        let slice = 256 << 10;
        let payload: Vec<u8> = (0..200u32 << 10).map(|i| (i % 251) as u8).collect();
        let mut f = file_with(
            &payload,
            b"",
            3 * slice + payload.len() as u64,
            slice as u32,
        );
        let key_file = |f: &[u8]| decode_file(Bytes::copy_from_slice(f), &key(), slice);
        let (h, _) = key_file(&f).unwrap();
        assert_eq!(h.header_len(), f.len() - payload.len());
        let PayloadCheck::Blocks { size, crcs } = &h.check else {
            panic!("{:?}", h.check)
        };
        assert_eq!((u64::from(*size), crcs.len()), (B, 4));
        // Any range is served from the blocks it lies in, no more.
        assert_eq!(h.covering_blocks(0..1), Some(0..B));
        assert_eq!(h.covering_blocks(B - 1..B + 1), Some(0..2 * B));
        assert_eq!(h.covering_blocks(B..2 * B), Some(B..2 * B));
        assert_eq!(
            h.covering_blocks(3 * B + 5..200 << 10),
            Some(3 * B..200 << 10)
        );
        assert_eq!(h.covering_blocks(0..1 << 30), Some(0..200 << 10));
        let part =
            |r: Range<u64>| &f[h.header_len() + r.start as usize..h.header_len() + r.end as usize];
        assert_eq!(h.check_blocks(B, part(B..3 * B)), Ok(()));
        assert_eq!(h.check_blocks(3 * B, part(3 * B..200 << 10)), Ok(()));
        // Not whole blocks: refused, not half-checked.
        assert_eq!(h.check_blocks(1, part(1..B)), Err(FormatError::Length));
        assert_eq!(h.check_blocks(0, part(0..B - 1)), Err(FormatError::Length));
        // A flipped byte fails the block it is in, and only that block.
        let at = h.header_len() + (2 * B) as usize + 17;
        f[at] ^= 0x40;
        let part = |r: Range<u64>| {
            f[h.header_len() + r.start as usize..h.header_len() + r.end as usize].to_vec()
        };
        assert_eq!(h.check_blocks(0, &part(0..2 * B)), Ok(()));
        assert_eq!(h.check_blocks(3 * B, &part(3 * B..200 << 10)), Ok(()));
        assert_eq!(
            h.check_blocks(B, &part(B..3 * B)),
            Err(FormatError::PayloadChecksum)
        );
        assert_eq!(key_file(&f).unwrap_err(), FormatError::PayloadChecksum);
    }

    #[test]
    fn a_block_size_that_would_make_a_long_table_is_rejected() {
        let mut f = file(b"");
        // 4 KiB blocks of a 12-byte payload: one block, but under the smallest size read.
        f[68..72].copy_from_slice(&(4096u32).to_le_bytes());
        assert_eq!(decode(f.clone()).unwrap_err(), FormatError::HeaderChecksum);
        f[68..72].copy_from_slice(&(3u32 << 16).to_le_bytes());
        assert_eq!(decode(f).unwrap_err(), FormatError::HeaderChecksum);
    }

    #[test]
    fn version_3_files_read_with_no_names_and_older_than_any_purge() {
        let f = file_v3(b"0123456789ab", b"video/mp4", 60);
        let (h, payload) = decode(f.clone()).unwrap();
        assert_eq!(&payload[..], b"0123456789ab");
        assert_eq!(h.content_type, b"video/mp4");
        assert_eq!(h.validator, b"E\"v1\"");
        assert_eq!(h.recheck_at, 1234);
        assert_eq!(h.object_name(), None);
        assert_eq!(h.written_at, 0);
        assert_eq!(h.file_len(), f.len() as u64);
        every_flip_is_detected(&f);
    }

    #[test]
    fn names_that_are_not_the_objects_are_rejected() {
        // A valid header whose o and v hash to another object id than its own.
        let record = ObjectRecord {
            size: 60,
            content_type: b"",
            validator: b"",
            recheck_at: 0,
            o: "movie",
            v: "v2",
            written_at: 1,
        };
        let mut f = encode_header(&key(), record, S as u32, b"0123456789ab");
        f.extend_from_slice(b"0123456789ab");
        assert_eq!(decode(f).unwrap_err(), FormatError::WrongKey);
    }

    #[test]
    fn version_2_files_read_as_no_validator_and_due_for_a_recheck() {
        let f = file_v2(b"0123456789ab", b"video/mp4", 60);
        let (h, payload) = decode(f.clone()).unwrap();
        assert_eq!(&payload[..], b"0123456789ab");
        assert_eq!(h.content_type, b"video/mp4");
        assert!(h.validator.is_empty());
        assert_eq!(h.recheck_at, 0);
        assert_eq!(h.file_len(), f.len() as u64);
        every_flip_is_detected(&f);
    }

    #[test]
    fn an_overlong_validator_is_stored_as_none() {
        let record = ObjectRecord {
            size: 60,
            content_type: b"",
            validator: &[b'E'; 300],
            recheck_at: 0,
            o: "movie",
            v: "v1",
            written_at: 0,
        };
        let mut f = encode_header(&key(), record, S as u32, b"0123456789ab");
        f.extend_from_slice(b"0123456789ab");
        assert!(decode(f).unwrap().0.validator.is_empty());
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
        every_flip_is_detected(&f);
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

    /// Found by the fuzz target `disk_slice`: `F277…` and `+000…03` were read as the
    /// key of `f277…-0000000000000003`.
    #[test]
    fn names_in_another_spelling_are_not_slice_names() {
        let name = file_name(&key());
        let (object, index) = name.split_once('-').unwrap();
        for other in [
            format!("{}-{index}", object.to_uppercase()),
            format!("{object}-+{}", &index[1..]),
            format!("{object}-{}", "000000000000000A"),
        ] {
            assert_eq!(parse_file_name(&other), None, "{other}");
        }
        assert_eq!(parse_file_name(&name), Some(key()));
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
