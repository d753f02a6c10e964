//! Byte ranges (SPEC §2.2) and slice arithmetic (§2.3). Pure functions, no I/O.
//!
//! All ranges here are inclusive at both ends, as on the wire (`bytes=0-0` is one byte).

/// An inclusive, non-empty byte range `[start, end]` inside an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes in the range (at least 1).
    pub const fn len(self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: a `ByteRange` holds at least one byte.
    pub const fn is_empty(self) -> bool {
        false
    }
}

/// Why a `/range/{start}-{end}` path is a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangePathError {
    #[error("range must be /range/{{start}}-{{end}} with decimal byte offsets")]
    Syntax,
    #[error("range end is before range start")]
    EndBeforeStart,
}

/// Parses the part after `/range/`: `"{start}-{end}"`, decimal, end inclusive.
pub fn parse_range_path(spec: &str) -> Result<(u64, u64), RangePathError> {
    let (a, b) = spec.split_once('-').ok_or(RangePathError::Syntax)?;
    let start = parse_decimal(a).ok_or(RangePathError::Syntax)?;
    let end = parse_decimal(b).ok_or(RangePathError::Syntax)?;
    if end < start {
        return Err(RangePathError::EndBeforeStart);
    }
    Ok((start, end))
}

/// What a `/range/a-b` request resolves to once the object size is known.
pub fn resolve_range_path(start: u64, end: u64, size: u64) -> Option<ByteRange> {
    (start < size).then(|| ByteRange {
        start,
        end: end.min(size - 1),
    })
}

/// A single range from a `Range` header, before the object size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=first-last`
    FromTo(u64, u64),
    /// `bytes=first-`
    From(u64),
    /// `bytes=-suffix_len`
    Suffix(u64),
}

impl RangeSpec {
    /// The first byte this range asks for, when it does not depend on the size.
    pub const fn known_start(self) -> Option<u64> {
        match self {
            RangeSpec::FromTo(first, _) | RangeSpec::From(first) => Some(first),
            RangeSpec::Suffix(_) => None,
        }
    }

    /// Resolves against the object size; `None` means unsatisfiable (416).
    pub fn resolve(self, size: u64) -> Option<ByteRange> {
        if size == 0 {
            return None;
        }
        let last = size - 1;
        match self {
            RangeSpec::FromTo(first, end) => (first <= last).then(|| ByteRange {
                start: first,
                end: end.min(last),
            }),
            RangeSpec::From(first) => (first <= last).then_some(ByteRange {
                start: first,
                end: last,
            }),
            RangeSpec::Suffix(0) => None,
            RangeSpec::Suffix(n) => Some(ByteRange {
                start: size.saturating_sub(n),
                end: last,
            }),
        }
    }
}

/// Parses a `Range` header value. `None` means "ignore the header and send the whole
/// object", which RFC 9110 §14.2 allows for anything we do not serve: several ranges,
/// other units, or invalid syntax.
pub fn parse_range_header(value: &[u8]) -> Option<RangeSpec> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (unit, set) = value.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let set = set.trim();
    if set.contains(',') {
        return None;
    }
    let (first, last) = set.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        (true, false) => parse_decimal(last).map(RangeSpec::Suffix),
        (false, true) => parse_decimal(first).map(RangeSpec::From),
        (false, false) => {
            let (a, b) = (parse_decimal(first)?, parse_decimal(last)?);
            (a <= b).then_some(RangeSpec::FromTo(a, b))
        }
    }
}

/// Strict decimal: ASCII digits only, no sign, no overflow.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The part of one slice that a range covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlicePiece {
    /// Slice index: the slice holds bytes `[index * slice_bytes, (index + 1) * slice_bytes)`.
    pub index: u64,
    /// First byte of the piece, relative to the slice start.
    pub from: usize,
    /// One past the last byte of the piece, relative to the slice start.
    pub to: usize,
}

impl SlicePiece {
    /// The piece's bytes in its slice, end exclusive.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.from as u64..self.to as u64
    }
}

/// Splits a range into the slice pieces that cover it, in order.
pub fn slice_pieces(range: ByteRange, slice_bytes: u64) -> impl Iterator<Item = SlicePiece> {
    let first = range.start / slice_bytes;
    let last = range.end / slice_bytes;
    (first..=last).map(move |index| {
        let base = index * slice_bytes;
        let from = range.start.max(base) - base;
        let to = range.end.min(base.saturating_add(slice_bytes - 1)) - base + 1;
        SlicePiece {
            index,
            from: from as usize,
            to: to as usize,
        }
    })
}

/// Number of slices a range touches.
pub fn slice_count(range: ByteRange, slice_bytes: u64) -> u64 {
    range.end / slice_bytes - range.start / slice_bytes + 1
}

/// The byte range of slice `index` as asked of the origin (the last slice of an object
/// may come back shorter).
pub fn slice_bounds(index: u64, slice_bytes: u64) -> ByteRange {
    let start = index.saturating_mul(slice_bytes);
    ByteRange {
        start,
        end: start.saturating_add(slice_bytes - 1),
    }
}

/// Expected length of slice `index` of an object of `size` bytes (0 past the end).
pub fn slice_len(index: u64, slice_bytes: u64, size: u64) -> u64 {
    let b = slice_bounds(index, slice_bytes);
    if b.start >= size {
        0
    } else {
        b.end.min(size - 1) - b.start + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_paths() {
        assert_eq!(
            parse_range_path("122638100-122948590"),
            Ok((122638100, 122948590))
        );
        assert_eq!(parse_range_path("0-0"), Ok((0, 0)));
        assert_eq!(
            parse_range_path("18446744073709551615-18446744073709551615"),
            Ok((u64::MAX, u64::MAX))
        );
        assert_eq!(
            parse_range_path("18446744073709551615-0"),
            Err(RangePathError::EndBeforeStart)
        );
        assert_eq!(parse_range_path("5-4"), Err(RangePathError::EndBeforeStart));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-b",
            "1-2-3",
            "+1-2",
            "1- 2",
            "18446744073709551616-18446744073709551617",
            "0x1-2",
            "１-2",
        ] {
            assert_eq!(
                parse_range_path(bad),
                Err(RangePathError::Syntax),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn seed_range_is_310491_bytes() {
        let (a, b) = parse_range_path("122638100-122948590").unwrap();
        assert_eq!(resolve_range_path(a, b, 1 << 30).unwrap().len(), 310_491);
    }

    #[test]
    fn range_path_resolution() {
        assert_eq!(
            resolve_range_path(0, 0, 1),
            Some(ByteRange { start: 0, end: 0 })
        );
        assert_eq!(
            resolve_range_path(5, 100, 10),
            Some(ByteRange { start: 5, end: 9 })
        );
        assert_eq!(
            resolve_range_path(9, 9, 10),
            Some(ByteRange { start: 9, end: 9 })
        );
        assert_eq!(resolve_range_path(10, 10, 10), None);
        assert_eq!(resolve_range_path(0, 0, 0), None);
        assert_eq!(resolve_range_path(u64::MAX, u64::MAX, 10), None);
    }

    #[test]
    fn range_headers() {
        let p = |s: &str| parse_range_header(s.as_bytes());
        assert_eq!(p("bytes=0-99"), Some(RangeSpec::FromTo(0, 99)));
        assert_eq!(p("bytes=100-"), Some(RangeSpec::From(100)));
        assert_eq!(p("bytes=-500"), Some(RangeSpec::Suffix(500)));
        assert_eq!(p("BYTES = 1-2"), Some(RangeSpec::FromTo(1, 2)));
        for ignored in [
            "bytes=0-1,4-5",
            "items=0-1",
            "bytes=5-1",
            "bytes=-",
            "bytes",
            "bytes=a-",
            "0-1",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(p(ignored), None, "{ignored}");
        }
        assert_eq!(parse_range_header(b"bytes=\xff-1"), None);
    }

    #[test]
    fn range_spec_resolution() {
        assert_eq!(
            RangeSpec::FromTo(0, 99).resolve(50),
            Some(ByteRange { start: 0, end: 49 })
        );
        assert_eq!(RangeSpec::FromTo(50, 99).resolve(50), None);
        assert_eq!(
            RangeSpec::From(49).resolve(50),
            Some(ByteRange { start: 49, end: 49 })
        );
        assert_eq!(RangeSpec::From(50).resolve(50), None);
        assert_eq!(
            RangeSpec::Suffix(10).resolve(50),
            Some(ByteRange { start: 40, end: 49 })
        );
        assert_eq!(
            RangeSpec::Suffix(500).resolve(50),
            Some(ByteRange { start: 0, end: 49 })
        );
        assert_eq!(RangeSpec::Suffix(0).resolve(50), None);
        assert_eq!(RangeSpec::From(0).resolve(0), None);
        assert_eq!(
            RangeSpec::Suffix(u64::MAX).resolve(u64::MAX),
            Some(ByteRange {
                start: 0,
                end: u64::MAX - 1
            })
        );
    }

    #[test]
    fn pieces_within_one_slice() {
        let p: Vec<_> = slice_pieces(ByteRange { start: 10, end: 20 }, 100).collect();
        assert_eq!(
            p,
            vec![SlicePiece {
                index: 0,
                from: 10,
                to: 21
            }]
        );
    }

    #[test]
    fn pieces_across_slice_boundaries() {
        let p: Vec<_> = slice_pieces(
            ByteRange {
                start: 99,
                end: 300,
            },
            100,
        )
        .collect();
        assert_eq!(
            p,
            vec![
                SlicePiece {
                    index: 0,
                    from: 99,
                    to: 100
                },
                SlicePiece {
                    index: 1,
                    from: 0,
                    to: 100
                },
                SlicePiece {
                    index: 2,
                    from: 0,
                    to: 100
                },
                SlicePiece {
                    index: 3,
                    from: 0,
                    to: 1
                },
            ]
        );
        assert_eq!(
            slice_count(
                ByteRange {
                    start: 99,
                    end: 300
                },
                100
            ),
            4
        );
    }

    #[test]
    fn pieces_on_exact_boundaries() {
        let p: Vec<_> = slice_pieces(
            ByteRange {
                start: 100,
                end: 199,
            },
            100,
        )
        .collect();
        assert_eq!(
            p,
            vec![SlicePiece {
                index: 1,
                from: 0,
                to: 100
            }]
        );
        let total: usize = slice_pieces(ByteRange { start: 0, end: 999 }, 100)
            .map(|p| p.to - p.from)
            .sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn pieces_near_u64_max_do_not_overflow() {
        let r = ByteRange {
            start: u64::MAX - 5,
            end: u64::MAX - 1,
        };
        let p: Vec<_> = slice_pieces(r, 1 << 20).collect();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].to - p[0].from, 5);
        let b = slice_bounds(u64::MAX / 2, 1 << 20);
        assert_eq!(b.end, u64::MAX);
    }

    #[test]
    fn slice_lengths() {
        assert_eq!(slice_len(0, 100, 250), 100);
        assert_eq!(slice_len(2, 100, 250), 50);
        assert_eq!(slice_len(3, 100, 250), 0);
        assert_eq!(slice_len(0, 100, 0), 0);
        assert_eq!(slice_len(0, 100, 1), 1);
    }
}
