//! `spool_record`: what the forwarding spool keeps on disk (src/forward/record.rs): a
//! forwarded request and a stored upstream answer.

use bytes::Bytes;
use cdn_edge::forward::record::{Record, StoredAnswer};

use crate::Cursor;

/// The input as an encoded record and as an encoded answer, and as the fields of each to
/// encode and decode again.
///
/// Invariants: whatever decodes encodes back to the same bytes (one encoding per value);
/// whatever is encoded decodes to the same value; a decoded body is never longer than the
/// input.
pub fn spool_record(data: &[u8]) {
    if let Ok(r) = Record::decode(data) {
        assert!(r.body.len() <= data.len());
        assert_eq!(r.encode(), data, "{r:?}");
    }
    if let Ok(a) = StoredAnswer::decode(data) {
        assert!(a.body.len() <= data.len());
        assert_eq!(a.encode(), data, "{a:?}");
    }
    let mut c = Cursor::new(data);
    let text = |c: &mut Cursor<'_>| String::from_utf8_lossy(c.chunk(64)).into_owned();
    let optional = |c: &mut Cursor<'_>| (c.u8() & 1 == 1).then(|| text(c));
    let record = Record {
        arrival_ms: c.u64(),
        client_ip: text(&mut c),
        method: text(&mut c),
        target: text(&mut c),
        content_type: optional(&mut c),
        dedupe_key: optional(&mut c),
        body: Bytes::copy_from_slice(c.chunk(255)),
    };
    assert_eq!(Record::decode(&record.encode()).as_ref(), Ok(&record));
    let answer = StoredAnswer {
        at_ms: c.u64(),
        status: u16::from(c.u8()) << 8 | u16::from(c.u8()),
        content_type: optional(&mut c),
        body: Bytes::copy_from_slice(c.rest()),
    };
    assert_eq!(StoredAnswer::decode(&answer.encode()).as_ref(), Ok(&answer));
}
