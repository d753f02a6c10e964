//! Properties of the parsers that read bytes from outside, checked on generated inputs
//! (proptest): encoders and decoders round-trip, and no input panics. The fuzz targets
//! in fuzz/ check the same on coverage-guided inputs for longer (docs/reliability.md).
//! Each property runs [`CASES`] cases so the whole file takes about a second.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use cdn_edge::auth::{sign_query, AuthFailure, SignedUrls, Verifier};
use cdn_edge::cache::disk::format::{
    decode_file, decode_header, encode_header, file_name, parse_file_name, ObjectRecord,
};
use cdn_edge::cache::{ObjectId, SliceKey};
use cdn_edge::cluster::auth::{check, Claim, Kind};
use cdn_edge::cluster::client::{signed_request, SLICE_PATH};
use cdn_edge::cluster::service::SliceRequest;
use cdn_edge::config::{Config, SigningKey, MAX_SLICE_BYTES, MIN_SLICE_BYTES};
use cdn_edge::dictionary::key::canonical_target;
use cdn_edge::forward::record::{Record, StoredAnswer};
use cdn_edge::range::{
    parse_range_header, parse_range_path, slice_count, slice_len, slice_pieces, ByteRange,
    RangeSpec,
};
use proptest::prelude::*;

const CASES: u32 = 256;
const NOW: u64 = 1_800_000_000;
const SECRET: &[u8] = b"property-secret";

/// A valid `o` or `v`.
fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-][A-Za-z0-9_-]{0,40}(\\.[A-Za-z0-9_-]{1,8})?"
}

/// An `e` in the future but within a day.
fn expiry() -> impl Strategy<Value = u64> {
    NOW..NOW + 86_400
}

fn verifier() -> Verifier {
    Verifier::new(&[SigningKey::hmac("k", SECRET)], 30)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn a_signed_query_verifies_to_its_fields(o in id(), v in id(), e in expiry(), t in "[!-~&&[^&]]{0,40}") {
        let q = sign_query(SECRET, &o, &v, e, &t);
        let s = verifier().verify(&q, NOW).unwrap();
        prop_assert_eq!((s.object, s.version, s.expires), (o.as_str(), v.as_str(), e));
    }

    #[test]
    fn a_changed_signature_is_refused(o in id(), e in expiry(), at in 0usize..64, to in "[0-9a-f]") {
        let q = sign_query(SECRET, &o, "1", e, "");
        let sc_start = q.len() - 64;
        prop_assume!(q[sc_start + at..sc_start + at + 1] != to);
        let mut bad = q.clone();
        bad.replace_range(sc_start + at..sc_start + at + 1, &to);
        prop_assert_eq!(verifier().verify(&bad, NOW), Err(AuthFailure::BadSignature));
    }

    #[test]
    fn any_query_is_answered_alike_by_verify_and_check(q in "(([a-z]{1,2}|sc)=[ -~]{0,90}&?){0,6}") {
        let urls = SignedUrls::new(verifier(), 1 << 16, 0);
        let verified = verifier().verify(&q, NOW);
        let checked = urls.check(&q, NOW, IpAddr::V4(Ipv4Addr::LOCALHOST)).map(|(s, _)| s);
        prop_assert_eq!(verified, checked);
    }

    #[test]
    fn range_paths_round_trip(a in any::<u64>(), b in any::<u64>()) {
        let parsed = parse_range_path(&format!("{a}-{b}"));
        if a <= b {
            prop_assert_eq!(parsed, Ok((a, b)));
        } else {
            prop_assert!(parsed.is_err());
        }
    }

    #[test]
    fn range_headers_never_panic(value in proptest::collection::vec(any::<u8>(), 0..40)) {
        let _ = parse_range_header(&value);
        let _ = parse_range_path(&String::from_utf8_lossy(&value));
    }

    #[test]
    fn range_headers_round_trip(a in any::<u64>(), n in any::<u64>()) {
        let b = a.saturating_add(n);
        prop_assert_eq!(parse_range_header(format!("bytes={a}-{b}").as_bytes()), Some(RangeSpec::FromTo(a, b)));
        prop_assert_eq!(parse_range_header(format!("bytes={a}-").as_bytes()), Some(RangeSpec::From(a)));
        prop_assert_eq!(parse_range_header(format!("bytes=-{n}").as_bytes()), Some(RangeSpec::Suffix(n)));
    }

    #[test]
    fn slice_pieces_cover_a_range_exactly(
        start in any::<u64>(),
        len in 1u64..(1 << 22),
        slice in MIN_SLICE_BYTES..=MAX_SLICE_BYTES,
    ) {
        let r = ByteRange { start: start.min(u64::MAX - len), end: start.min(u64::MAX - len) + len - 1 };
        let mut next = r.start;
        let mut count = 0;
        for p in slice_pieces(r, slice) {
            prop_assert!(p.from < p.to && p.to as u64 <= slice);
            prop_assert_eq!(p.index * slice + p.from as u64, next);
            prop_assert!(p.to as u64 <= slice_len(p.index, slice, r.end + 1));
            next = p.index * slice + p.to as u64;
            count += 1;
        }
        prop_assert_eq!(next - 1, r.end);
        prop_assert_eq!(count, slice_count(r, slice));
    }

    #[test]
    fn dictionary_keys_are_canonical(q in "([a-zA-Z0-9%+&=~. \u{e0}-\u{ff}\u{1100}-\u{1175}]|%[0-9A-Fa-f]{2}){0,40}") {
        const P: &str = "/dict";
        if let Ok(key) = canonical_target(P, Some(q.as_bytes())) {
            let query = key.strip_prefix(P).unwrap().strip_prefix('?').map(str::as_bytes);
            prop_assert_eq!(canonical_target(P, query), Ok(key.clone()));
            // The parameters in the reverse order are the same key.
            let reversed: Vec<&str> = q.split('&').rev().collect();
            prop_assert_eq!(canonical_target(P, Some(reversed.join("&").as_bytes())), Ok(key));
        }
    }

    #[test]
    fn slice_files_round_trip(
        (o, v) in (id(), id()),
        size in 1u64..(1 << 40),
        at in any::<u64>(),
        ct in proptest::collection::vec(any::<u8>(), 0..300),
        validator in proptest::collection::vec(any::<u8>(), 0..300),
        (recheck_at, written_at) in (any::<u64>(), any::<u64>()),
    ) {
        let slice = MIN_SLICE_BYTES;
        let key = SliceKey { object: ObjectId::new(&o, &v), index: at % size.div_ceil(slice) };
        let payload = vec![7u8; slice_len(key.index, slice, size) as usize];
        let record = ObjectRecord { size, content_type: &ct, validator: &validator, recheck_at, o: &o, v: &v, written_at };
        let mut file = encode_header(&key, record, slice as u32, &payload);
        file.extend_from_slice(&payload);
        let (h, back) = decode_file(Bytes::from(file.clone()), &key, slice).unwrap();
        prop_assert_eq!(&back[..], &payload[..]);
        prop_assert_eq!((h.object_size, h.recheck_at, h.written_at), (size, recheck_at, written_at));
        prop_assert_eq!(h.content_type, if ct.len() <= 255 { ct } else { Vec::new() });
        prop_assert_eq!(h.validator, if validator.len() <= 255 { validator } else { Vec::new() });
        prop_assert_eq!((h.o.as_str(), h.v.as_str()), (o.as_str(), v.as_str()));
        prop_assert_eq!(parse_file_name(&file_name(&key)), Some(key));
    }

    #[test]
    fn slice_headers_and_names_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        let _ = decode_header(&bytes);
        let mut v4 = b"CDNSLICE\x04\x00".to_vec();
        v4.extend_from_slice(&bytes);
        let _ = decode_header(&v4);
        if let Some(key) = parse_file_name(&String::from_utf8_lossy(&bytes)) {
            prop_assert_eq!(file_name(&key), String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn spool_records_round_trip(
        arrival_ms in any::<u64>(),
        (client_ip, method, target) in (".{0,20}", "[A-Z]{0,8}", ".{0,80}"),
        (content_type, dedupe_key) in (proptest::option::of(".{0,30}"), proptest::option::of(".{0,30}")),
        body in proptest::collection::vec(any::<u8>(), 0..200),
        status in any::<u16>(),
    ) {
        let r = Record { arrival_ms, client_ip, method, target, content_type: content_type.clone(), dedupe_key, body: Bytes::from(body.clone()) };
        prop_assert_eq!(Record::decode(&r.encode()), Ok(r));
        let a = StoredAnswer { at_ms: arrival_ms, status, content_type, body: Bytes::from(body) };
        prop_assert_eq!(StoredAnswer::decode(&a.encode()), Ok(a));
    }

    #[test]
    fn spool_decoders_never_panic_and_read_one_encoding(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        if let Ok(r) = Record::decode(&bytes) {
            prop_assert_eq!(r.encode(), bytes.clone());
        }
        if let Ok(a) = StoredAnswer::decode(&bytes) {
            prop_assert_eq!(a.encode(), bytes);
        }
    }

    #[test]
    fn a_config_with_a_line_changed_loads_or_errs(line in 0usize..200, text in ".{0,30}") {
        let base = include_str!("../conf/edge.toml");
        let mut lines: Vec<&str> = base.lines().collect();
        let at = line % lines.len();
        lines[at] = &text;
        let _ = Config::from_toml_with_env(&lines.join("\n"), |_| None);
    }

    #[test]
    fn peer_slice_requests_round_trip(o in id(), v in id(), index in any::<u64>(), hops in any::<u8>(), time in any::<u64>(), child in any::<bool>()) {
        let me: SocketAddr = "127.0.0.1:7443".parse().unwrap();
        let claim = Claim {
            kind: if child { Kind::Child } else { Kind::Sibling },
            from: "127.0.0.2:7443".parse().unwrap(),
            to: me,
            o: &o,
            v: &v,
            index,
            hops,
            time,
        };
        let path = format!("{SLICE_PATH}?o={o}&v={v}&i={index}");
        let req = signed_request("GET", &path, &claim, SECRET, me).unwrap();
        let parsed = SliceRequest::parse(&req).unwrap();
        prop_assert_eq!(format!("{:?}", parsed.claim(me)), format!("{claim:?}"));
        prop_assert_eq!(check(&parsed.claim(me), parsed.auth(), SECRET, me, time), Ok(()));
        prop_assert!(check(&parsed.claim(me), parsed.auth(), b"other", me, time).is_err());
    }
}
