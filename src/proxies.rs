//! Trusted proxies: whose `X-Forwarded-For` the edge believes. Pure.
//!
//! Any client can send an `X-Forwarded-For` naming whoever it likes; only the proxies
//! and load balancers listed in `[proxies] trusted` speak for the clients behind them.
//! Two questions are answered here:
//!
//! 1. **What goes upstream** with a forwarded event, log blob or stats request
//!    ([`TrustedProxies::forwarded_for`]): a trusted peer's header, with the peer
//!    appended; from anyone else, or when the header is malformed, the peer alone.
//! 2. **Who the client is** ([`TrustedProxies::client_ip`]), for the access log and
//!    per-client limits: the header walked from the right past trusted hops, as nginx's
//!    realip module does with `real_ip_recursive on`.
//!
//! An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, how a dual-stack listener sees an
//! IPv4 client) is its IPv4 address, for matching and in results; a configured network
//! inside `::ffff:0:0/96` is matched as the IPv4 network it maps.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Longest `X-Forwarded-For` passed upstream, in bytes (about 25 IPv6 hops); a longer
/// one is replaced by the peer's address.
pub const MAX_FORWARDED_FOR_BYTES: usize = 1024;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The networks whose `X-Forwarded-For` is believed, built once from `[proxies]`.
/// Cloning shares the lists.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    v4: Arc<[Ipv4Net]>,
    v6: Arc<[Ipv6Net]>,
}

impl TrustedProxies {
    /// From `proxies.trusted`; an empty list trusts nobody.
    pub fn new(trusted: &[IpNet]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in trusted {
            match *net {
                IpNet::V4(n) => v4.push(n),
                IpNet::V6(n) => match (n.addr().to_ipv4_mapped(), n.prefix_len()) {
                    (Some(a), len @ 96..) => v4.extend(Ipv4Net::new(a, len - 96).ok()),
                    _ => v6.push(n),
                },
            }
        }
        Self {
            v4: v4.into(),
            v6: v6.into(),
        }
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => self.v4.iter().any(|n| n.contains(&a)),
            IpAddr::V6(a) => self.v6.iter().any(|n| n.contains(&a)),
        }
    }

    /// The `X-Forwarded-For` to send upstream for a request from `peer` (the TCP peer;
    /// `None` when it has no IP address) that carried `xff` (its header lines joined,
    /// see [`forwarded_for_header`]).
    ///
    /// A trusted peer's header, if it is non-empty and sane (at most
    /// [`MAX_FORWARDED_FOR_BYTES`], only address characters, no empty entry), is kept:
    /// `"<xff>, <peer>"`. Otherwise the header is replaced by the peer's address alone.
    /// Without a peer address, the result is empty (send no header).
    pub fn forwarded_for(&self, peer: Option<IpAddr>, xff: Option<&str>) -> String {
        let Some(peer) = peer.map(|p| p.to_canonical()) else {
            return String::new();
        };
        match xff.map(str::trim) {
            Some(xff) if self.trusts(peer) && is_sane(xff) => format!("{xff}, {peer}"),
            _ => peer.to_string(),
        }
    }

    /// The address of the real client of a request from `peer` that carried `xff`.
    ///
    /// An untrusted peer is the client. From a trusted peer, the header's entries are
    /// walked from the right: trusted ones are skipped and the first untrusted one is
    /// the client. An entry that is not an address (nor `address:port`) stops the walk
    /// and the last trusted hop seen is the client; if every entry is trusted, the
    /// leftmost is.
    ///
    /// Performance: called for every request; it allocates nothing, and with no
    /// trusted proxies it is one empty-list check.
    pub fn client_ip(&self, peer: IpAddr, xff: Option<&str>) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        let Some(xff) = xff else {
            return client;
        };
        for entry in xff.rsplit(',') {
            match parse_entry(entry) {
                Some(hop) if self.trusts(hop) => client = hop,
                Some(hop) => return hop,
                None => return client,
            }
        }
        client
    }

    /// [`TrustedProxies::client_ip`] of a request with these headers, which are only
    /// read when the peer is trusted.
    ///
    /// Performance: without trusted proxies this is the cost every request pays, so the
    /// header lookup (most of it) is skipped for untrusted peers (`proxies` bench).
    pub fn client_ip_for(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer.to_canonical();
        }
        self.client_ip(peer, forwarded_for_header(headers).as_deref())
    }
}

/// A request's `X-Forwarded-For`: its lines joined with ", " in order; `None` without
/// one. Borrowed (no allocation) when there is one line of UTF-8.
pub fn forwarded_for_header(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    let mut lines = headers.get_all(X_FORWARDED_FOR).iter();
    let first = String::from_utf8_lossy(lines.next()?.as_bytes());
    let mut rest = lines.peekable();
    if rest.peek().is_none() {
        return Some(first);
    }
    let mut joined = first.into_owned();
    for line in rest {
        joined.push_str(", ");
        joined.push_str(&String::from_utf8_lossy(line.as_bytes()));
    }
    Some(Cow::Owned(joined))
}

/// Non-empty, short, only the characters of addresses (and ports, brackets) separated
/// by commas, with no empty entry: safe to relay as a header value.
fn is_sane(xff: &str) -> bool {
    !xff.is_empty()
        && xff.len() <= MAX_FORWARDED_FOR_BYTES
        && xff
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b',' | b' ' | b'[' | b']'))
        && xff.split(',').all(|entry| !entry.trim().is_empty())
}

/// One `X-Forwarded-For` entry: `192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`,
/// `192.0.2.1:4711` or `[2001:db8::1]:4711`, spaces around allowed.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(nets: &[&str]) -> TrustedProxies {
        let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        TrustedProxies::new(&nets)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A load balancer network and one reverse proxy of each family.
    fn site() -> TrustedProxies {
        proxies(&["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"])
    }

    #[test]
    fn nobody_is_trusted_by_default() {
        let none = TrustedProxies::default();
        for peer in ["127.0.0.1", "10.0.0.1", "::1"] {
            assert!(!none.trusts(ip(peer)), "{peer}");
            assert_eq!(
                none.client_ip(ip(peer), Some("6.6.6.6")),
                ip(peer),
                "{peer}"
            );
        }
        assert_eq!(
            none.forwarded_for(Some(ip("127.0.0.1")), Some("6.6.6.6")),
            "127.0.0.1"
        );
    }

    #[test]
    fn forwarded_for_keeps_a_trusted_peers_header_and_replaces_anyone_elses() {
        let p = site();
        let peer = |s: &str| Some(ip(s));
        for (peer, xff, want) in [
            // Spoofing: an untrusted client names someone else.
            (peer("203.0.113.9"), Some("6.6.6.6"), "203.0.113.9"),
            (
                peer("203.0.113.9"),
                Some("10.0.0.1, 6.6.6.6"),
                "203.0.113.9",
            ),
            (peer("2001:db9::1"), Some("6.6.6.6"), "2001:db9::1"),
            // Trusted peers: the header goes on, with the peer appended.
            (
                peer("10.1.2.3"),
                Some("198.51.100.9"),
                "198.51.100.9, 10.1.2.3",
            ),
            (
                peer("192.0.2.7"),
                Some(" 198.51.100.9 "),
                "198.51.100.9, 192.0.2.7",
            ),
            (
                peer("2001:db8::5"),
                Some("2001:db8:ffff::1, [2001:db9::2]:443"),
                "2001:db8:ffff::1, [2001:db9::2]:443, 2001:db8::5",
            ),
            // Mapped IPv4 peers match IPv4 networks and are written as IPv4.
            (
                peer("::ffff:10.9.9.9"),
                Some("198.51.100.9"),
                "198.51.100.9, 10.9.9.9",
            ),
            (peer("::ffff:203.0.113.9"), Some("6.6.6.6"), "203.0.113.9"),
            // No header, an empty one, or a malformed one: the peer alone.
            (peer("10.1.2.3"), None, "10.1.2.3"),
            (peer("10.1.2.3"), Some(""), "10.1.2.3"),
            (peer("10.1.2.3"), Some("  "), "10.1.2.3"),
            (peer("10.1.2.3"), Some("unknown"), "10.1.2.3"),
            (peer("10.1.2.3"), Some("1.2.3.4\r\nX-Admin: 1"), "10.1.2.3"),
            (peer("10.1.2.3"), Some("1.2.3.4, , 5.6.7.8"), "10.1.2.3"),
            (peer("10.1.2.3"), Some("1.2.3.4,"), "10.1.2.3"),
            (peer("10.1.2.3"), Some("1.2.3.4;for=x"), "10.1.2.3"),
            (peer("10.1.2.3"), Some("1.2.3.4\u{fffd}"), "10.1.2.3"),
            // No peer address: no header at all.
            (None, Some("6.6.6.6"), ""),
        ] {
            assert_eq!(p.forwarded_for(peer, xff), want, "{peer:?} {xff:?}");
        }
    }

    #[test]
    fn forwarded_for_is_length_limited() {
        let p = site();
        let hops = |n: usize| vec!["198.51.100.9"; n].join(", ");
        let fits = hops(MAX_FORWARDED_FOR_BYTES / 14);
        assert!(fits.len() <= MAX_FORWARDED_FOR_BYTES);
        assert_eq!(
            p.forwarded_for(Some(ip("10.0.0.1")), Some(&fits)),
            format!("{fits}, 10.0.0.1")
        );
        let long = hops(MAX_FORWARDED_FOR_BYTES / 14 + 1);
        assert!(long.len() > MAX_FORWARDED_FOR_BYTES);
        assert_eq!(
            p.forwarded_for(Some(ip("10.0.0.1")), Some(&long)),
            "10.0.0.1"
        );
    }

    #[test]
    fn client_ip_walks_past_trusted_hops_from_the_right() {
        let p = site();
        for (peer, xff, want) in [
            // Untrusted peers are the client, whatever they claim.
            ("203.0.113.9", Some("6.6.6.6"), "203.0.113.9"),
            ("203.0.113.9", Some("10.0.0.1"), "203.0.113.9"),
            ("2001:db9::1", Some("2001:db8::1"), "2001:db9::1"),
            // A trusted peer without a header is the client.
            ("10.0.0.1", None, "10.0.0.1"),
            ("10.0.0.1", Some(""), "10.0.0.1"),
            // One load balancer.
            ("10.0.0.1", Some("198.51.100.9"), "198.51.100.9"),
            // A forged list through a trusted chain: the rightmost untrusted entry wins,
            // whatever the client put to its left.
            (
                "10.0.0.1",
                Some("6.6.6.6, 198.51.100.9, 192.0.2.7, 10.2.2.2"),
                "198.51.100.9",
            ),
            ("10.0.0.1", Some("10.3.3.3, 6.6.6.6"), "6.6.6.6"),
            // Every entry trusted: the leftmost.
            ("10.0.0.1", Some("10.3.3.3, 192.0.2.7"), "10.3.3.3"),
            // Garbage stops the walk at the last trusted hop seen.
            ("10.0.0.1", Some("198.51.100.9, garbage"), "10.0.0.1"),
            ("10.0.0.1", Some("6.6.6.6, garbage, 10.4.4.4"), "10.4.4.4"),
            ("10.0.0.1", Some("198.51.100.9, "), "10.0.0.1"),
            ("10.0.0.1", Some("999.1.1.1"), "10.0.0.1"),
            // Ports and brackets.
            ("10.0.0.1", Some("198.51.100.9:4711"), "198.51.100.9"),
            ("10.0.0.1", Some("[2001:db9::7]:443"), "2001:db9::7"),
            ("10.0.0.1", Some("[2001:db9::7]"), "2001:db9::7"),
            // IPv6 chains.
            (
                "2001:db8::5",
                Some("2001:db9::7, 2001:db8:1::1"),
                "2001:db9::7",
            ),
            // Mapped IPv4: matches IPv4 networks, results in IPv4.
            ("::ffff:10.0.0.1", Some("198.51.100.9"), "198.51.100.9"),
            ("::ffff:203.0.113.9", Some("6.6.6.6"), "203.0.113.9"),
            ("10.0.0.1", Some("::ffff:198.51.100.9"), "198.51.100.9"),
            (
                "10.0.0.1",
                Some("198.51.100.9, ::ffff:10.5.5.5"),
                "198.51.100.9",
            ),
        ] {
            assert_eq!(p.client_ip(ip(peer), xff), ip(want), "{peer} {xff:?}");
        }
    }

    #[test]
    fn mapped_ipv6_networks_match_as_ipv4() {
        let p = proxies(&["::ffff:10.0.0.0/104", "::/0"]);
        assert!(p.trusts(ip("10.1.1.1")));
        assert!(p.trusts(ip("::ffff:10.1.1.1")));
        assert!(!p.trusts(ip("11.1.1.1")), "::/0 holds IPv6 peers only");
        assert!(p.trusts(ip("2001:db8::1")));
    }

    #[test]
    fn header_lines_are_joined_in_order() {
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_for_header(&h), None);
        h.append("x-forwarded-for", "198.51.100.9".parse().unwrap());
        assert!(matches!(
            forwarded_for_header(&h),
            Some(Cow::Borrowed("198.51.100.9"))
        ));
        h.append("x-forwarded-for", "10.3.3.3, 10.4.4.4".parse().unwrap());
        h.append("X-Forwarded-For", "192.0.2.7".parse().unwrap());
        let joined = forwarded_for_header(&h).unwrap();
        assert_eq!(joined, "198.51.100.9, 10.3.3.3, 10.4.4.4, 192.0.2.7");
        let p = site();
        assert_eq!(
            p.forwarded_for(Some(ip("10.0.0.1")), Some(&joined)),
            "198.51.100.9, 10.3.3.3, 10.4.4.4, 192.0.2.7, 10.0.0.1"
        );
        assert_eq!(
            p.client_ip(ip("10.0.0.1"), Some(&joined)),
            ip("198.51.100.9")
        );
        assert_eq!(p.client_ip_for(ip("10.0.0.1"), &h), ip("198.51.100.9"));
        assert_eq!(
            p.client_ip_for(ip("::ffff:203.0.113.9"), &h),
            ip("203.0.113.9"),
            "an untrusted peer's headers are not read"
        );
        // A line that is not UTF-8 spoils the header for relaying.
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"1.2.3.4\xff").unwrap(),
        );
        let joined = forwarded_for_header(&h).unwrap();
        assert_eq!(
            p.forwarded_for(Some(ip("10.0.0.1")), Some(&joined)),
            "10.0.0.1"
        );
    }
}
