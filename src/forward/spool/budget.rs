//! What the spool keeps after delivery — upstream answers for deduplication and dead
//! letters — and the byte budget that bounds it inside `forward.spool_max_bytes`.
//!
//! Undelivered records may use the whole limit and are never dropped to make room.
//! Each kept kind may use at most [`KEPT_SHARE`] of the limit, and the two together
//! never more than the records leave free; past that the oldest entries go first
//! (the time index for answers, the lowest sequence for dead letters). So at every
//! commit: records + answers + dead letters <= spool_max_bytes.
//!
//! Bytes are counted as the key and value bytes the entry adds to its tables: for an
//! answer its key twice (answer table and time index), 8 for the time and the encoded
//! answer; for a dead letter 8 for the sequence and the encoded record.

use redb::{ReadableTable, ReadableTableMetadata, Table};

use super::{storage, SpoolError};
use crate::forward::record::StoredAnswer;

/// Share of `spool_max_bytes` each kept kind (answers, dead letters) may use at most:
/// one eighth, so both together at most a quarter.
pub const KEPT_SHARE: u64 = 8;
/// Largest answer body kept for deduplication. A larger answer is kept as its status
/// alone (empty body, no `Content-Type`): a retry still is not forwarded again.
pub const MAX_KEPT_ANSWER_BODY: usize = 16 << 10;

/// Entries and bytes of one kept kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub entries: u64,
    pub bytes: u64,
}

impl Usage {
    fn add(&mut self, bytes: u64) {
        self.entries += 1;
        self.bytes += bytes;
    }

    fn sub(&mut self, bytes: u64) {
        self.entries = self.entries.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// What the spool keeps after delivery.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Kept {
    pub answers: Usage,
    pub dead_letters: Usage,
}

/// Entries dropped before their time to stay within the budget, in one commit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub answers: u64,
    pub dead_letters: u64,
}

/// The most each kept kind may use, given the bytes of undelivered records.
pub fn kept_cap(max_bytes: u64, record_bytes: u64) -> u64 {
    (max_bytes / KEPT_SHARE).min(max_bytes.saturating_sub(record_bytes) / 2)
}

/// Bytes an answer entry adds (answer table and time index).
pub fn answer_bytes(key: &str, encoded_len: usize) -> u64 {
    (2 * key.len() + 8 + encoded_len) as u64
}

/// Bytes a dead letter adds.
pub fn dead_letter_bytes(encoded_len: usize) -> u64 {
    (8 + encoded_len) as u64
}

/// The answer as it is kept: a body over [`MAX_KEPT_ANSWER_BODY`] is left out, and with
/// it the `Content-Type` that described it.
pub fn kept_answer(answer: &StoredAnswer) -> StoredAnswer {
    if answer.body.len() <= MAX_KEPT_ANSWER_BODY {
        return answer.clone();
    }
    StoredAnswer {
        at_ms: answer.at_ms,
        status: answer.status,
        content_type: None,
        body: bytes::Bytes::new(),
    }
}

/// The tables of kept answers inside one write transaction.
pub struct AnswerTables<'t> {
    pub delivered: Table<'t, &'static str, &'static [u8]>,
    pub delivered_at: Table<'t, (u64, &'static str), ()>,
}

impl AnswerTables<'_> {
    /// Keeps `answer` under `key`, replacing (and uncounting) an earlier one, so the
    /// time index holds exactly one entry per answer.
    pub fn insert(
        &mut self,
        key: &str,
        answer: &StoredAnswer,
        usage: &mut Usage,
    ) -> Result<(), SpoolError> {
        let encoded = kept_answer(answer).encode();
        let old = self
            .delivered
            .insert(key, encoded.as_slice())
            .map_err(storage)?
            .map(|v| (StoredAnswer::decode(v.value()).ok(), v.value().len()));
        if let Some((old, old_len)) = old {
            if let Some(old) = old {
                self.delivered_at
                    .remove((old.at_ms, key))
                    .map_err(storage)?;
            }
            usage.sub(answer_bytes(key, old_len));
        }
        self.delivered_at
            .insert((answer.at_ms, key), ())
            .map_err(storage)?;
        usage.add(answer_bytes(key, encoded.len()));
        Ok(())
    }

    /// Removes the time index entry `(at_ms, key)` and the answer it points to, if that
    /// answer is still the one stored at `at_ms` (an index entry left by an older
    /// version of the spool may point to an answer stored again since). Returns whether
    /// an answer was removed.
    fn remove_indexed(
        &mut self,
        at_ms: u64,
        key: &str,
        usage: &mut Usage,
    ) -> Result<bool, SpoolError> {
        self.delivered_at.remove((at_ms, key)).map_err(storage)?;
        let current = self.delivered.get(key).map_err(storage)?.map(|v| {
            let stored_at = StoredAnswer::decode(v.value()).ok().map(|a| a.at_ms);
            (stored_at, v.value().len())
        });
        match current {
            Some((stored_at, len)) if stored_at.is_none_or(|t| t <= at_ms) => {
                self.delivered.remove(key).map_err(storage)?;
                usage.sub(answer_bytes(key, len));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Forgets up to `limit` answers stored before `before_ms`, oldest first; returns
    /// how many time index entries it went through (fewer than `limit`: none is left).
    pub fn purge(
        &mut self,
        before_ms: u64,
        limit: usize,
        usage: &mut Usage,
    ) -> Result<usize, SpoolError> {
        let old: Vec<(u64, String)> = self
            .delivered_at
            .range((0u64, "")..(before_ms, ""))
            .map_err(storage)?
            .take(limit)
            .map(|item| {
                item.map(|(k, _)| {
                    let (at, key) = k.value();
                    (at, key.to_string())
                })
                .map_err(storage)
            })
            .collect::<Result<_, _>>()?;
        for (at, key) in &old {
            self.remove_indexed(*at, key, usage)?;
        }
        Ok(old.len())
    }

    /// Drops the oldest answers until `usage` is within `cap`; returns how many.
    pub fn trim(&mut self, cap: u64, usage: &mut Usage) -> Result<u64, SpoolError> {
        let mut dropped = 0;
        while usage.bytes > cap {
            let first = self.delivered_at.first().map_err(storage)?.map(|(k, _)| {
                let (at, key) = k.value();
                (at, key.to_string())
            });
            let Some((at, key)) = first else {
                // Nothing left to drop: the count had drifted.
                *usage = Usage::default();
                break;
            };
            if self.remove_indexed(at, &key, usage)? {
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

/// Counts kept answers in a (read or write) answer table.
pub fn count_answers(
    delivered: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Usage, SpoolError> {
    let mut usage = Usage::default();
    for item in delivered.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        usage.add(answer_bytes(k.value(), v.value().len()));
    }
    Ok(usage)
}

/// Counts dead letters.
pub fn count_dead_letters(
    dead: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<Usage, SpoolError> {
    let mut usage = Usage::default();
    for item in dead.iter().map_err(storage)? {
        let (_, v) = item.map_err(storage)?;
        usage.add(dead_letter_bytes(v.value().len()));
    }
    Ok(usage)
}

/// Keeps a record that will not be delivered.
pub fn insert_dead_letter(
    dead: &mut Table<u64, &'static [u8]>,
    seq: u64,
    record: &[u8],
    usage: &mut Usage,
) -> Result<(), SpoolError> {
    if dead.insert(seq, record).map_err(storage)?.is_none() {
        usage.add(dead_letter_bytes(record.len()));
    }
    Ok(())
}

/// Drops the oldest dead letters until `usage` is within `cap`; returns how many.
pub fn trim_dead_letters(
    dead: &mut Table<u64, &'static [u8]>,
    cap: u64,
    usage: &mut Usage,
) -> Result<u64, SpoolError> {
    let mut dropped = 0;
    while usage.bytes > cap {
        let popped = dead
            .pop_first()
            .map_err(storage)?
            .map(|(_, v)| v.value().len());
        match popped {
            Some(len) => {
                usage.sub(dead_letter_bytes(len));
                dropped += 1;
            }
            None => {
                *usage = Usage::default();
                break;
            }
        }
    }
    if dead.is_empty().map_err(storage)? {
        *usage = Usage::default();
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn each_kept_kind_gets_an_eighth_and_never_what_records_use() {
        let cases = [
            // (max, records, cap)
            (8_000, 0, 1_000),
            (8_000, 6_000, 1_000),
            (8_000, 7_000, 500),
            (8_000, 8_000, 0),
            (8_000, 9_000, 0),
            (0, 0, 0),
        ];
        for (max, records, cap) in cases {
            assert_eq!(kept_cap(max, records), cap, "max {max}, records {records}");
            assert!(records.min(max) + 2 * kept_cap(max, records) <= max.max(records));
        }
    }

    #[test]
    fn a_large_answer_is_kept_without_its_body() {
        let answer = |len| StoredAnswer {
            at_ms: 7,
            status: 200,
            content_type: Some("application/json".into()),
            body: Bytes::from(vec![b'a'; len]),
        };
        assert_eq!(
            kept_answer(&answer(MAX_KEPT_ANSWER_BODY)),
            answer(MAX_KEPT_ANSWER_BODY)
        );
        let kept = kept_answer(&answer(MAX_KEPT_ANSWER_BODY + 1));
        assert_eq!(
            (kept.at_ms, kept.status, kept.content_type, kept.body.len()),
            (7, 200, None, 0)
        );
    }
}
