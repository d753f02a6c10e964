//! `disk_slice`: slice files of the disk tier and their names (src/cache/disk/format.rs).
//! A file on disk is outside input: it may be torn, bit-flipped, or from another build.

use bytes::Bytes;
use cdn_edge::cache::disk::format::{
    decode_file, decode_header, encode_header, file_name, parse_file_name, FormatError,
    ObjectRecord, BLOCK_BYTES, MAX_HEADER, VERSION,
};
use cdn_edge::cache::meta::{MAX_CONTENT_TYPE, MAX_VALIDATOR};
use cdn_edge::cache::{ObjectId, SliceKey};
use cdn_edge::config::MIN_SLICE_BYTES;
use cdn_edge::range::slice_len;

use crate::Cursor;

/// The input three ways: as a whole slice file, as a slice file's name, and as the
/// fields of a slice to encode and decode again.
///
/// Invariants: a decoded header fits in the bytes it came from and in [`MAX_HEADER`],
/// names (from version 4) the object its id says, and decodes the same from its own
/// bytes alone; a decoded file has exactly the header's length and payload, and each
/// part of it checks from the blocks that cover it; a current version
/// file encodes back to the same bytes (reserved bytes zero); a parsed name is the name of its key; whatever
/// is encoded decodes to the same fields.
pub fn disk_slice(data: &[u8]) {
    whole_file(data);
    if let Ok(name) = std::str::from_utf8(data) {
        if let Some(key) = parse_file_name(name) {
            assert_eq!(file_name(&key), name, "another spelling of {key:?}");
        }
    }
    round_trip(data);
}

fn whole_file(data: &[u8]) {
    let Ok(h) = decode_header(data) else {
        return;
    };
    let header_len = h.header_len();
    assert!(
        header_len <= data.len() && header_len <= MAX_HEADER,
        "{h:?}"
    );
    assert!(h.content_type.len() <= MAX_CONTENT_TYPE);
    if let Some(o) = h.object_name() {
        assert_eq!(ObjectId::new(o, &h.v), h.key.object);
    }
    assert_eq!(decode_header(&data[..header_len]).as_ref(), Ok(&h));
    let slice_bytes = u64::from(h.slice_bytes).max(1);
    let Ok((decoded, payload)) = decode_file(Bytes::copy_from_slice(data), &h.key, slice_bytes)
    else {
        return;
    };
    assert_eq!(decoded, h);
    assert_eq!(data.len() as u64, h.file_len());
    assert_eq!(payload.len(), h.payload_len as usize);
    assert_eq!(&data[header_len..], &payload[..]);
    // Every part of a valid file checks, from the blocks that hold it.
    let len = u64::from(h.payload_len);
    for (a, b) in [(0, 1), (len / 3, len / 2 + 1), (len - 1, len), (0, len)] {
        if let Some(blocks) = h.covering_blocks(a..b) {
            assert!(
                blocks.start <= a && b <= blocks.end && blocks.end <= len,
                "{blocks:?}"
            );
            let part = &payload[blocks.start as usize..blocks.end as usize];
            assert_eq!(h.check_blocks(blocks.start, part), Ok(()));
        }
    }
    // The current version writes zeros at 86..88 and does not check them (the header CRC
    // covers them), and blocks of `BLOCK_BYTES`: a file with other bytes there, or other
    // blocks, decodes but is not what the writer makes.
    if u16::from_le_bytes([data[8], data[9]]) == VERSION
        && data[86..88] == [0, 0]
        && data[68..72] == BLOCK_BYTES.to_le_bytes()
    {
        let record = ObjectRecord {
            size: h.object_size,
            content_type: &h.content_type,
            validator: &h.validator,
            recheck_at: h.recheck_at,
            o: &h.o,
            v: &h.v,
            written_at: h.written_at,
        };
        let mut again = encode_header(&h.key, record, h.slice_bytes, &payload);
        again.extend_from_slice(&payload);
        assert_eq!(
            again, data,
            "a valid file that does not encode back to itself"
        );
    }
}

/// Encodes a slice made from the input and decodes it: the same fields come back, or
/// [`FormatError::WrongSlicing`] when the slice is past the end of its object.
fn round_trip(data: &[u8]) {
    let mut c = Cursor::new(data);
    let (o, v) = (c.id(), c.id());
    // Small slices keep each run fast; the format is the same for any slice size.
    let slice_bytes = MIN_SLICE_BYTES << (c.u8() % 2);
    let object_size = c.u64() % (1 << 40);
    let index = c.u64() % (object_size / slice_bytes + 2);
    let key = SliceKey {
        object: ObjectId::new(&o, &v),
        index,
    };
    let content_type = c.chunk(MAX_CONTENT_TYPE);
    let validator = c.chunk(MAX_VALIDATOR);
    let (recheck_at, written_at) = (c.u64(), c.u64());
    let fill = c.rest();
    let len = slice_len(index, slice_bytes, object_size) as usize;
    let payload: Vec<u8> = fill.iter().copied().cycle().take(len).collect();
    let payload = if payload.len() < len {
        vec![0; len]
    } else {
        payload
    };
    let record = ObjectRecord {
        size: object_size,
        content_type,
        validator,
        recheck_at,
        o: &o,
        v: &v,
        written_at,
    };
    let mut file = encode_header(&key, record, slice_bytes as u32, &payload);
    file.extend_from_slice(&payload);
    let decoded = decode_file(Bytes::from(file), &key, slice_bytes);
    if len == 0 {
        assert_eq!(decoded.unwrap_err(), FormatError::WrongSlicing);
        return;
    }
    let (h, back) = decoded.expect("a slice just encoded decodes");
    assert_eq!(&back[..], &payload[..]);
    assert_eq!((h.key, h.object_size), (key, object_size));
    assert_eq!(
        (h.content_type.as_slice(), h.validator.as_slice()),
        (content_type, validator)
    );
    assert_eq!((h.recheck_at, h.written_at), (recheck_at, written_at));
    assert_eq!((h.o.as_str(), h.v.as_str()), (o.as_str(), v.as_str()));
}
