//! What travels through the spool: a forwarded request and a stored upstream answer,
//! in a small length-prefixed binary form. Pure.

use bytes::Bytes;

const RECORD_VERSION: u8 = 1;
const ANSWER_VERSION: u8 = 1;

/// A request to forward, with what the edge saw of its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Arrival at the edge, unix milliseconds.
    pub arrival_ms: u64,
    /// The `X-Forwarded-For` sent upstream (`crate::proxies`); empty: none.
    pub client_ip: String,
    pub method: String,
    /// Path and query as received.
    pub target: String,
    pub content_type: Option<String>,
    /// Deduplication key (dedupe.rs) when the request has a `reqId`. Records spooled by
    /// earlier versions hold the bare `reqId` here: they are still delivered, and the
    /// answer kept under that key simply expires.
    pub dedupe_key: Option<String>,
    pub body: Bytes,
}

/// An upstream's answer to a delivered request, kept for deduplication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub at_ms: u64,
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed spool record")]
pub struct Malformed;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| Malformed)?,
        ))
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| Malformed)?,
        ))
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| Malformed)?,
        ))
    }
    fn string(&mut self) -> Result<String, Malformed> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Malformed)
    }
    fn opt_string(&mut self) -> Result<Option<String>, Malformed> {
        Ok(match self.u8()? {
            0 => None,
            1 => Some(self.string()?),
            _ => return Err(Malformed),
        })
    }
    fn bytes(&mut self) -> Result<Bytes, Malformed> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
}

fn put_opt(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
        None => out.push(0),
    }
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.target.len() + self.body.len());
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.arrival_ms.to_le_bytes());
        put_str(&mut out, &self.client_ip);
        put_str(&mut out, &self.method);
        put_str(&mut out, &self.target);
        put_opt(&mut out, &self.content_type);
        put_opt(&mut out, &self.dedupe_key);
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader(buf);
        if r.u8()? != RECORD_VERSION {
            return Err(Malformed);
        }
        let rec = Record {
            arrival_ms: r.u64()?,
            client_ip: r.string()?,
            method: r.string()?,
            target: r.string()?,
            content_type: r.opt_string()?,
            dedupe_key: r.opt_string()?,
            body: r.bytes()?,
        };
        if !r.0.is_empty() {
            return Err(Malformed);
        }
        Ok(rec)
    }
}

impl StoredAnswer {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.body.len());
        out.push(ANSWER_VERSION);
        out.extend_from_slice(&self.at_ms.to_le_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        put_opt(&mut out, &self.content_type);
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader(buf);
        if r.u8()? != ANSWER_VERSION {
            return Err(Malformed);
        }
        let a = StoredAnswer {
            at_ms: r.u64()?,
            status: r.u16()?,
            content_type: r.opt_string()?,
            body: r.bytes()?,
        };
        if !r.0.is_empty() {
            return Err(Malformed);
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            arrival_ms: 1_800_000_000_123,
            client_ip: "203.0.113.7".into(),
            method: "POST".into(),
            target: "/msl/playapi/cadmium/event/1?reqAttempt=1&reqName=events/pause&reqId=abc"
                .into(),
            content_type: Some("application/json".into()),
            dedupe_key: Some("abc".into()),
            body: Bytes::from_static(b"{\"event\":\"pause\"}"),
        }
    }

    #[test]
    fn records_round_trip() {
        let r = record();
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let bare = Record {
            content_type: None,
            dedupe_key: None,
            body: Bytes::new(),
            ..record()
        };
        assert_eq!(Record::decode(&bare.encode()).unwrap(), bare);
    }

    #[test]
    fn answers_round_trip() {
        let a = StoredAnswer {
            at_ms: 5,
            status: 200,
            content_type: Some("application/json".into()),
            body: Bytes::from_static(b"{}"),
        };
        assert_eq!(StoredAnswer::decode(&a.encode()).unwrap(), a);
    }

    #[test]
    fn damaged_records_are_refused_not_misread() {
        let enc = record().encode();
        for len in 0..enc.len() {
            assert!(Record::decode(&enc[..len]).is_err(), "truncated to {len}");
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(Record::decode(&longer).is_err());
        let mut bad_version = enc;
        bad_version[0] = 9;
        assert!(Record::decode(&bad_version).is_err());
    }
}
