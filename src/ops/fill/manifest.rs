//! The manifest of a fill job (SPEC 7): which objects, and which bytes of each, checked
//! before the job is accepted. Pure: no I/O.
//!
//! ```json
//! {"objects": [{"o": "movie_42", "v": "3", "ranges": ["0-1048575"]}, {"o": "trailer", "v": "1"}]}
//! ```
//! `ranges` are inclusive byte ranges `a-b` (decimal, `a <= b`); without `ranges`, the
//! whole object.

use serde::{Deserialize, Serialize};

use crate::auth::is_valid_id;
use crate::range::{parse_range_path, RangePathError};

/// Most objects in one job.
pub const MAX_OBJECTS: usize = 100_000;
/// Most ranges of one object in a job.
pub const MAX_RANGES: usize = 1_000;

/// `POST /fill`'s body as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    pub objects: Vec<RawObject>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawObject {
    pub o: String,
    pub v: String,
    #[serde(default)]
    pub ranges: Option<Vec<String>>,
}

/// One object of a job, as checked and stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wanted {
    pub o: String,
    pub v: String,
    /// Inclusive byte ranges; `None`: the whole object.
    pub ranges: Option<Vec<(u64, u64)>>,
}

/// Why a manifest is refused (the client gets 400 with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("objects is empty: nothing to fill")]
    Empty,
    #[error("{count} objects: at most {MAX_OBJECTS} in one job")]
    TooManyObjects { count: usize },
    #[error("objects[{index}].{field} {value:?}: not a valid id ([A-Za-z0-9_-][A-Za-z0-9._-]{{0,255}} without '..')")]
    BadId {
        index: usize,
        field: &'static str,
        value: String,
    },
    #[error("objects[{index}].ranges is empty: leave it out to fill the whole object")]
    NoRanges { index: usize },
    #[error("objects[{index}].ranges: {count} ranges, at most {MAX_RANGES}")]
    TooManyRanges { index: usize, count: usize },
    #[error("objects[{index}].ranges[{range}] {value:?}: {why} (expected \"start-end\", inclusive, start <= end)")]
    BadRange {
        index: usize,
        range: usize,
        value: String,
        why: RangePathError,
    },
}

/// Checks a manifest; returns the objects to store, in order.
pub fn validate(raw: RawManifest) -> Result<Vec<Wanted>, ManifestError> {
    if raw.objects.is_empty() {
        return Err(ManifestError::Empty);
    }
    if raw.objects.len() > MAX_OBJECTS {
        return Err(ManifestError::TooManyObjects {
            count: raw.objects.len(),
        });
    }
    raw.objects
        .into_iter()
        .enumerate()
        .map(|(index, obj)| wanted(index, obj))
        .collect()
}

fn wanted(index: usize, obj: RawObject) -> Result<Wanted, ManifestError> {
    for (field, value) in [("o", &obj.o), ("v", &obj.v)] {
        if !is_valid_id(value) {
            return Err(ManifestError::BadId {
                index,
                field,
                value: value.clone(),
            });
        }
    }
    let ranges = match obj.ranges {
        None => None,
        Some(r) if r.is_empty() => return Err(ManifestError::NoRanges { index }),
        Some(r) if r.len() > MAX_RANGES => {
            return Err(ManifestError::TooManyRanges {
                index,
                count: r.len(),
            })
        }
        Some(r) => Some(
            r.iter()
                .enumerate()
                .map(|(range, value)| {
                    parse_range_path(value.trim()).map_err(|why| ManifestError::BadRange {
                        index,
                        range,
                        value: value.clone(),
                        why,
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(Wanted {
        o: obj.o,
        v: obj.v,
        ranges,
    })
}

/// The slices `ranges` (inclusive byte ranges) touch, as sorted, disjoint, inclusive
/// index ranges; overlapping and adjacent ones merged, so no slice comes twice.
pub fn slice_spans(ranges: &[(u64, u64)], slice_bytes: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(a, b)| (a / slice_bytes, b / slice_bytes))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(json: &str) -> Result<Vec<Wanted>, ManifestError> {
        validate(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn manifests_are_checked_object_by_object() {
        let ok = manifest(
            r#"{"objects": [{"o": "movie_42", "v": "3", "ranges": ["0-1048575", " 5-5"]},
                            {"o": "trailer", "v": "1"}]}"#,
        )
        .unwrap();
        assert_eq!(ok[0].ranges, Some(vec![(0, 1_048_575), (5, 5)]));
        assert_eq!(ok[1].ranges, None);

        let cases: &[(&str, &str)] = &[
            (r#"{"objects": []}"#, "objects is empty"),
            (
                r#"{"objects": [{"o": "../x", "v": "1"}]}"#,
                "objects[0].o \"../x\"",
            ),
            (
                r#"{"objects": [{"o": "a", "v": "1"}, {"o": "a", "v": ""}]}"#,
                "objects[1].v \"\"",
            ),
            (
                r#"{"objects": [{"o": "a", "v": "1", "ranges": []}]}"#,
                "objects[0].ranges is empty",
            ),
            (
                r#"{"objects": [{"o": "a", "v": "1", "ranges": ["0-9", "9-5"]}]}"#,
                "objects[0].ranges[1] \"9-5\": range end is before range start",
            ),
            (
                r#"{"objects": [{"o": "a", "v": "1", "ranges": ["-5"]}]}"#,
                "objects[0].ranges[0] \"-5\"",
            ),
            (
                r#"{"objects": [{"o": "a", "v": "1", "ranges": ["0-x"]}]}"#,
                "objects[0].ranges[0] \"0-x\"",
            ),
        ];
        for (json, want) in cases {
            let e = manifest(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
        let many = format!(
            r#"{{"objects": [{{"o": "a", "v": "1", "ranges": [{}]}}]}}"#,
            vec!["\"0-1\""; MAX_RANGES + 1].join(",")
        );
        assert!(matches!(
            manifest(&many),
            Err(ManifestError::TooManyRanges { count, .. }) if count == MAX_RANGES + 1
        ));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<RawManifest>(r#"{"objects": [], "when": 1}"#).is_err());
        assert!(serde_json::from_str::<RawManifest>(
            r#"{"objects": [{"o":"a","v":"1","range":"0-1"}]}"#
        )
        .is_err());
    }

    #[test]
    fn spans_cover_each_slice_once() {
        let s = 100;
        assert_eq!(slice_spans(&[(0, 99)], s), vec![(0, 0)]);
        assert_eq!(slice_spans(&[(0, 100)], s), vec![(0, 1)]);
        // Two ranges inside one slice, then one that touches the next slice.
        assert_eq!(
            slice_spans(&[(10, 20), (50, 60), (150, 160)], s),
            vec![(0, 1)]
        );
        assert_eq!(slice_spans(&[(500, 999), (0, 10)], s), vec![(0, 0), (5, 9)]);
        assert_eq!(slice_spans(&[(0, u64::MAX)], s), vec![(0, u64::MAX / s)]);
    }
}
