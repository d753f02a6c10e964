//! Authentication of peer requests: an HMAC-SHA256, with `cluster.secret`, over who
//! asks whom for what and when.
//!
//! The message is the request's fields, each followed by a newline: a version tag, the
//! kind (`sibling`, `child`, `purge` or `purge-log`), the sender's `cluster.self`, the
//! receiver's address as the sender lists it, o, v, the index, the hop count and the
//! time (Unix seconds). For a slice the index is the slice's; for a purge it is the
//! purge's id (v empty: every version); for a read of the purge log, the position read
//! from (o and v empty). A request is accepted when its HMAC matches, it is addressed to
//! this node, and its time is within [`REPLAY_WINDOW_SECS`] of this node's clock. A
//! replay inside the window is harmless: a slice or log request reads again, and a
//! purge's id is applied once.

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far a peer request's time may be from the receiver's clock, either way.
pub const REPLAY_WINDOW_SECS: u64 = 60;

/// Header names of a peer request.
pub const FROM: &str = "cdn-edge-peer-from";
pub const TIME: &str = "cdn-edge-peer-time";
pub const HOPS: &str = "cdn-edge-peer-hops";
pub const KIND: &str = "cdn-edge-peer-kind";
pub const AUTH: &str = "cdn-edge-peer-auth";

/// Who sends a peer request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A node of the same site: the receiver answers as the slice's owner.
    Sibling,
    /// A node of a child site (the receiver is its parent tier): the receiver treats it
    /// like a client's miss in its own site.
    Child,
    /// A node of the same site passes on a purge (`cluster::purge`).
    Purge,
    /// A node of the same site reads this node's purge log.
    PurgeLog,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Sibling => "sibling",
            Kind::Child => "child",
            Kind::Purge => "purge",
            Kind::PurgeLog => "purge-log",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sibling" => Some(Kind::Sibling),
            "child" => Some(Kind::Child),
            "purge" => Some(Kind::Purge),
            "purge-log" => Some(Kind::PurgeLog),
            _ => None,
        }
    }
}

/// The signed fields of one peer request.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub kind: Kind,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub o: &'a str,
    pub v: &'a str,
    pub index: u64,
    pub hops: u8,
    pub time: u64,
}

impl Claim<'_> {
    fn mac(&self, secret: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
        let fields: [&dyn std::fmt::Display; 9] = [
            &"cdn-edge-peer-v1",
            &self.kind.label(),
            &self.from,
            &self.to,
            &self.o,
            &self.v,
            &self.index,
            &self.hops,
            &self.time,
        ];
        for f in fields {
            mac.update(f.to_string().as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// The hex HMAC a sender puts in [`AUTH`].
    pub fn sign(&self, secret: &[u8]) -> String {
        hex::encode(self.mac(secret).finalize().into_bytes())
    }

    /// Whether `auth` (hex) is this claim's HMAC under `secret`, in constant time.
    pub fn verify(&self, secret: &[u8], auth: &str) -> bool {
        match hex::decode(auth) {
            Ok(tag) => self.mac(secret).verify_slice(&tag).is_ok(),
            Err(_) => false,
        }
    }
}

/// Why a peer request was refused (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("missing or malformed peer authentication headers")]
    Malformed,
    #[error("addressed to another node")]
    WrongNode,
    #[error("time outside the replay window")]
    Stale,
    #[error("bad peer signature")]
    BadSignature,
}

/// Checks a claim received at `me` at `now` (Unix seconds).
pub fn check(
    claim: &Claim<'_>,
    auth: &str,
    secret: &[u8],
    me: SocketAddr,
    now: u64,
) -> Result<(), Denied> {
    if claim.to != me {
        return Err(Denied::WrongNode);
    }
    if claim.time.abs_diff(now) > REPLAY_WINDOW_SECS {
        return Err(Denied::Stale);
    }
    if !claim.verify(secret, auth) {
        return Err(Denied::BadSignature);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(time: u64) -> Claim<'static> {
        Claim {
            kind: Kind::Sibling,
            from: "10.0.0.1:7080".parse().unwrap(),
            to: "10.0.0.2:7080".parse().unwrap(),
            o: "movie",
            v: "v1",
            index: 7,
            hops: 0,
            time,
        }
    }

    #[test]
    fn a_signed_claim_is_accepted_by_its_addressee_in_the_window() {
        let c = claim(1_000);
        let auth = c.sign(b"s");
        assert_eq!(check(&c, &auth, b"s", c.to, 1_000 + 60), Ok(()));
        assert_eq!(check(&c, &auth, b"s", c.to, 1_000 - 60), Ok(()));
    }

    #[test]
    fn every_field_is_signed() {
        let c = claim(1_000);
        let auth = c.sign(b"s");
        let other = "10.0.0.9:7080".parse().unwrap();
        let changed = [
            Claim {
                kind: Kind::Child,
                ..c
            },
            Claim {
                kind: Kind::Purge,
                ..c
            },
            Claim { from: other, ..c },
            Claim { o: "movie2", ..c },
            Claim { v: "v2", ..c },
            Claim { index: 8, ..c },
            Claim { hops: 1, ..c },
            Claim { time: 1_001, ..c },
        ];
        for m in changed {
            assert_eq!(
                check(&m, &auth, b"s", c.to, 1_000),
                Err(Denied::BadSignature),
                "{m:?}"
            );
        }
        assert_eq!(
            check(&c, &auth, b"other", c.to, 1_000),
            Err(Denied::BadSignature)
        );
        assert_eq!(
            check(&c, "zz", b"s", c.to, 1_000),
            Err(Denied::BadSignature)
        );
    }

    #[test]
    fn wrong_node_and_stale_times_are_refused() {
        let c = claim(1_000);
        let auth = c.sign(b"s");
        assert_eq!(
            check(&c, &auth, b"s", c.from, 1_000),
            Err(Denied::WrongNode)
        );
        assert_eq!(check(&c, &auth, b"s", c.to, 1_061), Err(Denied::Stale));
        assert_eq!(check(&c, &auth, b"s", c.to, 939), Err(Denied::Stale));
    }
}
