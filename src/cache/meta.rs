//! Object metadata: what an origin said about an object (size, type, validator) and how
//! far the edge believes it.
//!
//! Rules (docs/video.md, "Object metadata"):
//! 1. Metadata learnt from one origin answer (a 206's total size, or a 416's
//!    `bytes */size`) is *provisional*: it is used at once, and it is due for a re-check
//!    `cache.meta_ttl_secs` after it was learnt. An origin may show an object that is
//!    still being uploaded (416 `bytes */0`, or a 206 with a short total); the edge must
//!    not keep such an answer for good.
//! 2. Provisional metadata becomes *confirmed* when an origin answer that agrees with it
//!    arrives once it is due: a slice fill, or the one-byte probe that the first request
//!    after the due time makes. Confirmed metadata is kept: objects are immutable per
//!    (o, v), so it is never re-checked. Metadata of an empty object is never confirmed,
//!    since `bytes */0` is what an origin says of an object not uploaded yet.
//! 3. Two answers *agree* when their sizes are equal and their validators (the origin's
//!    `ETag`, else its `Last-Modified`) are equal or either has none.
//! 4. An answer that disagrees with the metadata replaces it (provisional again, learnt
//!    now), confirmed or not: the slice that came with it is refused (not cached, the
//!    response fails), and slices cut under the old metadata are dropped when next met.
//! 5. A probe that fails (origin unreachable, timeout, bad answer) keeps the metadata
//!    provisional and puts the next re-check one TTL later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use sha2::{Digest, Sha256};

use super::ObjectId;

/// Longest stored validator, in bytes (a longer one is stored as its SHA-256).
pub const MAX_VALIDATOR: usize = 255;

/// Longest content type kept for an object, in bytes: a longer one is taken as unknown
/// (`application/octet-stream`), so a faulty origin cannot make each object's metadata
/// large, and the memory and disk tiers agree.
pub const MAX_CONTENT_TYPE: usize = 255;

/// `recheck_at` of confirmed metadata: never due.
const CONFIRMED: u64 = u64::MAX;

/// The origin's identity of one version of an object's bytes: its `ETag`, or its
/// `Last-Modified` when it sends no `ETag`. Compared byte for byte (as nginx's slice
/// module does), so two replicas of an origin must send the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validator(Bytes);

impl Validator {
    /// The validator of an origin answer; `None` when it has neither header.
    pub fn from_headers(
        etag: Option<&HeaderValue>,
        last_modified: Option<&HeaderValue>,
    ) -> Option<Self> {
        let (kind, value) = match (etag, last_modified) {
            (Some(e), _) => (b'E', e.as_bytes()),
            (None, Some(l)) => (b'L', l.as_bytes()),
            (None, None) => return None,
        };
        let mut v = BytesMut::with_capacity(1 + value.len().min(64));
        if value.len() < MAX_VALIDATOR {
            v.extend_from_slice(&[kind]);
            v.extend_from_slice(value);
        } else {
            let mut h = Sha256::new();
            h.update([kind]);
            h.update(value);
            v.extend_from_slice(b"H");
            v.extend_from_slice(hex::encode(h.finalize()).as_bytes());
        }
        Some(Self(v.freeze()))
    }

    /// Rebuilds a validator stored by [`Validator::as_bytes`]; empty is none.
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        (!bytes.is_empty() && bytes.len() <= MAX_VALIDATOR)
            .then(|| Self(Bytes::copy_from_slice(bytes)))
    }

    /// The stored form: a kind byte (`E` ETag, `L` Last-Modified, `H` hash of a long
    /// one) then the value; at most [`MAX_VALIDATOR`] bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// What one origin answer says about the object.
#[derive(Debug, Clone)]
pub struct Answer {
    pub size: u64,
    pub validator: Option<Validator>,
    pub content_type: Option<HeaderValue>,
}

impl Answer {
    /// What a 416 says: the size, nothing else.
    pub fn size_only(size: u64) -> Self {
        Self {
            size,
            validator: None,
            content_type: None,
        }
    }
}

/// What the edge knows about an object without holding its bytes.
#[derive(Debug)]
pub struct ObjectMeta {
    pub size: u64,
    pub content_type: HeaderValue,
    /// The edge's own strong ETag, derived from (o, v), so it is the same on every edge.
    pub etag: HeaderValue,
    /// False when learnt from a 416, which carries no Content-Type.
    content_type_known: bool,
    validator: Option<Validator>,
    /// Unix milliseconds from which this provisional metadata is due for a re-check;
    /// [`CONFIRMED`] once confirmed.
    recheck_at: AtomicU64,
}

const DEFAULT_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/octet-stream");

impl Clone for ObjectMeta {
    fn clone(&self) -> Self {
        Self {
            size: self.size,
            content_type: self.content_type.clone(),
            etag: self.etag.clone(),
            content_type_known: self.content_type_known,
            validator: self.validator.clone(),
            recheck_at: AtomicU64::new(self.recheck_at()),
        }
    }
}

impl ObjectMeta {
    /// Confirmed metadata with no validator (tests, benches, and known objects).
    pub fn new(id: &ObjectId, size: u64, content_type: Option<HeaderValue>) -> Self {
        Self::restored(id, size, content_type, None, CONFIRMED)
    }

    /// Provisional metadata learnt from `answer` at `now_ms`, due `ttl_ms` later.
    pub fn learnt(id: &ObjectId, answer: &Answer, now_ms: u64, ttl_ms: u64) -> Self {
        Self::restored(
            id,
            answer.size,
            answer.content_type.clone(),
            answer.validator.clone(),
            now_ms.saturating_add(ttl_ms).min(CONFIRMED - 1),
        )
    }

    /// Metadata as stored with a slice: `recheck_at` from [`ObjectMeta::recheck_at`].
    pub fn restored(
        id: &ObjectId,
        size: u64,
        content_type: Option<HeaderValue>,
        validator: Option<Validator>,
        recheck_at: u64,
    ) -> Self {
        let etag = format!("\"{}\"", hex::encode(&id.as_bytes()[..16]));
        Self {
            size,
            content_type_known: content_type.is_some(),
            content_type: content_type.map_or(DEFAULT_CONTENT_TYPE, own),
            etag: HeaderValue::from_str(&etag).expect("hex is a valid header value"),
            validator,
            recheck_at: AtomicU64::new(recheck_at),
        }
    }

    /// False when the type was not known (learnt from a 416, or the origin sent none).
    pub fn content_type_known(&self) -> bool {
        self.content_type_known
    }

    pub fn validator(&self) -> Option<&Validator> {
        self.validator.as_ref()
    }

    /// When this metadata is due for a re-check (unix ms); `u64::MAX` once confirmed.
    pub fn recheck_at(&self) -> u64 {
        self.recheck_at.load(Ordering::Relaxed)
    }

    pub fn is_confirmed(&self) -> bool {
        self.recheck_at() == CONFIRMED
    }

    /// Provisional and due for a re-check at `now_ms` (rule 1).
    pub fn is_due(&self, now_ms: u64) -> bool {
        self.recheck_at() <= now_ms
    }

    /// Marks the metadata confirmed (rule 2); every slice sharing it sees it.
    pub fn confirm(&self) {
        self.recheck_at.store(CONFIRMED, Ordering::Relaxed);
    }

    /// Puts the next re-check at `at_ms` (rule 5); confirmed metadata stays confirmed.
    pub fn postpone(&self, at_ms: u64) {
        let _ = self
            .recheck_at
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t != CONFIRMED).then_some(at_ms.min(CONFIRMED - 1))
            });
    }

    /// Whether two records describe the same bytes (rule 3). Cheap when both are one.
    pub fn agrees_with(&self, other: &ObjectMeta) -> bool {
        std::ptr::eq(self, other)
            || (self.size == other.size
                && validators_agree(self.validator.as_ref(), other.validator.as_ref()))
    }

    /// What makes `other` disagree with this record (for messages).
    pub fn difference(&self, other: &ObjectMeta) -> &'static str {
        if self.size != other.size {
            "size"
        } else {
            "validator"
        }
    }

    /// This record with the type and validator of an agreeing `answer` filled in where
    /// it had none; `None` when it lacks nothing the answer has.
    pub fn completed_by(&self, answer: &Answer) -> Option<ObjectMeta> {
        let add_type = !self.content_type_known && answer.content_type.is_some();
        let add_validator = self.validator.is_none() && answer.validator.is_some();
        if !add_type && !add_validator {
            return None;
        }
        let mut m = self.clone();
        if add_type {
            m.content_type = own(answer.content_type.clone().expect("checked"));
            m.content_type_known = true;
        }
        if add_validator {
            m.validator = answer.validator.clone();
        }
        Some(m)
    }
}

/// `value` in a buffer of its own. A value parsed from an origin's answer is a slice of
/// the buffer the whole answer head was read into (4 KiB or more: Pingora's HTTP/1
/// client reads into one and shares it), and metadata is kept as long as any slice of
/// its object: it must not keep that buffer too.
fn own(value: HeaderValue) -> HeaderValue {
    HeaderValue::from_bytes(value.as_bytes()).unwrap_or(value)
}

fn validators_agree(a: Option<&Validator>, b: Option<&Validator>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// What a new origin answer means for the metadata already held. (With nothing held,
/// the answer becomes provisional metadata, rule 1.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The answer agrees; `confirm` when that makes the metadata confirmed (rule 2).
    Agrees { confirm: bool },
    /// The answer disagrees on `what` (size or validator): it replaces the metadata, and
    /// its slice is refused (rule 4).
    Differs { what: &'static str },
}

/// Judges `answer` against `known` at `now_ms`. Pure.
pub fn judge(known: &ObjectMeta, answer: &Answer, now_ms: u64) -> Verdict {
    if known.size != answer.size {
        Verdict::Differs { what: "size" }
    } else if !validators_agree(known.validator.as_ref(), answer.validator.as_ref()) {
        Verdict::Differs { what: "validator" }
    } else {
        Verdict::Agrees {
            confirm: known.is_due(now_ms) && known.size > 0,
        }
    }
}

/// Milliseconds since the Unix epoch (persisted in slice files, so wall-clock time).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etag(v: &'static str) -> Option<Validator> {
        Validator::from_headers(Some(&HeaderValue::from_static(v)), None)
    }

    fn answer(size: u64, validator: Option<Validator>) -> Answer {
        Answer {
            size,
            validator,
            content_type: None,
        }
    }

    fn id() -> ObjectId {
        ObjectId::new("o", "v")
    }

    #[test]
    fn verdicts() {
        const T: u64 = 1_000_000;
        const TTL: u64 = 10_000;
        let learnt = |size, v| ObjectMeta::learnt(&id(), &answer(size, v), T, TTL);
        let confirmed = ObjectMeta::new(&id(), 100, None);
        let a = etag("\"a\"");
        let b = etag("\"b\"");
        let size = Verdict::Differs { what: "size" };
        let validator = Verdict::Differs { what: "validator" };
        for (known, ans, now, expected) in [
            // Before the TTL an agreeing answer does not confirm: an upload may still run.
            (
                learnt(100, a.clone()),
                answer(100, a.clone()),
                T + TTL - 1,
                Verdict::Agrees { confirm: false },
            ),
            (
                learnt(100, a.clone()),
                answer(100, a.clone()),
                T + TTL,
                Verdict::Agrees { confirm: true },
            ),
            // A missing validator on either side is compared by size only.
            (
                learnt(100, None),
                answer(100, a.clone()),
                T + TTL,
                Verdict::Agrees { confirm: true },
            ),
            (
                learnt(100, a.clone()),
                answer(100, None),
                T,
                Verdict::Agrees { confirm: false },
            ),
            // An empty object is never confirmed: it may not be uploaded yet.
            (
                learnt(0, None),
                answer(0, None),
                T + 10 * TTL,
                Verdict::Agrees { confirm: false },
            ),
            (learnt(0, None), answer(100, a.clone()), T, size),
            // Another size, or the same size with another validator.
            (learnt(100, a.clone()), answer(90, a.clone()), T, size),
            (learnt(100, a.clone()), answer(100, b.clone()), T, validator),
            // Confirmed metadata still refuses a disagreeing answer.
            (
                confirmed.clone(),
                answer(100, None),
                T,
                Verdict::Agrees { confirm: false },
            ),
            (confirmed, answer(101, None), T, size),
        ] {
            assert_eq!(
                judge(&known, &ans, now),
                expected,
                "{known:?} vs {ans:?} at {now}"
            );
        }
    }

    #[test]
    fn confirming_and_postponing() {
        let m = ObjectMeta::learnt(&id(), &answer(5, None), 1000, 10);
        assert!(!m.is_due(1009) && m.is_due(1010) && !m.is_confirmed());
        m.postpone(2000);
        assert!(!m.is_due(1999) && m.is_due(2000));
        m.confirm();
        assert!(m.is_confirmed() && !m.is_due(u64::MAX - 1));
        m.postpone(3000);
        assert!(m.is_confirmed(), "confirmed metadata is never re-checked");
        assert!(m.clone().is_confirmed());
    }

    #[test]
    fn validators_keep_their_kind_and_long_ones_are_hashed() {
        let e = etag("\"x\"").unwrap();
        let l = Validator::from_headers(None, Some(&HeaderValue::from_static("\"x\""))).unwrap();
        assert_ne!(e, l, "an ETag and a Last-Modified are never equal");
        assert_eq!(e.as_bytes(), b"E\"x\"");
        assert_eq!(Validator::from_stored(e.as_bytes()), Some(e.clone()));
        assert_eq!(Validator::from_stored(b""), None);
        let both = Validator::from_headers(
            Some(&HeaderValue::from_static("\"x\"")),
            Some(&HeaderValue::from_static("Tue, 01 Jan 2030 00:00:00 GMT")),
        );
        assert_eq!(both, Some(e), "the ETag wins");
        let long = HeaderValue::from_str(&"y".repeat(1000)).unwrap();
        let longer = HeaderValue::from_str(&"y".repeat(1001)).unwrap();
        let (h1, h2) = (
            Validator::from_headers(Some(&long), None).unwrap(),
            Validator::from_headers(Some(&longer), None).unwrap(),
        );
        assert!(h1.as_bytes().len() <= MAX_VALIDATOR && h1.as_bytes()[0] == b'H');
        assert_ne!(h1, h2);
    }

    #[test]
    fn metadata_keeps_nothing_of_the_answer_head_it_was_learnt_from() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        /// An answer head's buffer, which says when it is freed.
        struct Head(Vec<u8>, Arc<AtomicBool>);
        impl AsRef<[u8]> for Head {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for Head {
            fn drop(&mut self) {
                self.1.store(true, Ordering::SeqCst);
            }
        }
        let freed = Arc::new(AtomicBool::new(false));
        let mut text = b"HTTP/1.1 206 Partial Content\r\nContent-Type: video/mp4\r\n\r\n".to_vec();
        text.resize(4096, 0);
        let head = Bytes::from_owner(Head(text, freed.clone()));
        // As Pingora's client hands a header value over: a slice of the head's buffer.
        let at = "HTTP/1.1 206 Partial Content\r\nContent-Type: ".len();
        let full = Answer {
            size: 100,
            validator: etag("\"a\""),
            content_type: Some(HeaderValue::from_maybe_shared(head.slice(at..at + 9)).unwrap()),
        };
        drop(head);
        let learnt = ObjectMeta::learnt(&id(), &full, 0, 10);
        let completed = ObjectMeta::learnt(&id(), &answer(100, None), 0, 10)
            .completed_by(&full)
            .unwrap();
        drop(full);
        assert!(
            freed.load(Ordering::SeqCst),
            "the answer head's buffer is freed once the answer is"
        );
        assert_eq!(learnt.content_type, "video/mp4");
        assert_eq!(completed.content_type, "video/mp4");
        assert!(learnt.content_type_known() && completed.content_type_known());
    }

    #[test]
    fn an_agreeing_answer_fills_in_what_was_missing() {
        let from_416 = ObjectMeta::learnt(&id(), &answer(100, None), 0, 10);
        let full = Answer {
            size: 100,
            validator: etag("\"a\""),
            content_type: Some(HeaderValue::from_static("video/mp4")),
        };
        let done = from_416.completed_by(&full).unwrap();
        assert!(done.content_type_known() && done.validator().is_some());
        assert_eq!(done.recheck_at(), from_416.recheck_at());
        assert!(done.completed_by(&full).is_none());
    }
}
