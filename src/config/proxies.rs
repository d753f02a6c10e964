//! `[proxies]`: the proxies and load balancers in front of the edge whose
//! `X-Forwarded-For` is believed (see `crate::proxies`).

use ipnet::IpNet;
use serde::Deserialize;

use super::{invalid, ConfigError};

/// `[proxies]`, validated.
#[derive(Debug, Clone, Default)]
pub struct Proxies {
    /// `proxies.trusted`: peers whose `X-Forwarded-For` is kept and walked for the
    /// client's address; a single address is a /32 or /128 network, host bits of a
    /// network are dropped. Default empty: no peer is trusted.
    pub trusted: Vec<IpNet>,
}

/// The serde mirror of `[proxies]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawProxies {
    #[serde(default)]
    pub trusted: Vec<String>,
}

pub fn validate(raw: RawProxies) -> Result<Proxies, ConfigError> {
    let trusted = raw
        .trusted
        .iter()
        .enumerate()
        .map(|(i, s)| {
            parse_network(s).ok_or_else(|| {
                invalid(
                    format!("proxies.trusted[{i}]"),
                    format!(
                        "{s:?} is not an IP network (such as 10.0.0.0/8 or 2001:db8::/32) or address"
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Proxies { trusted })
}

/// `10.0.0.0/8`, `2001:db8::/32`, or one address (`192.0.2.7`, `::1`) as its /32 or /128.
fn parse_network(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        s.parse::<IpNet>().ok().map(|n| n.trunc())
    } else {
        s.parse::<std::net::IpAddr>().ok().map(IpNet::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(entries: &[&str]) -> Result<Vec<String>, String> {
        let raw = RawProxies {
            trusted: entries.iter().map(|s| s.to_string()).collect(),
        };
        validate(raw)
            .map(|p| p.trusted.iter().map(ToString::to_string).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn networks_and_single_addresses_of_both_families() {
        assert_eq!(
            parsed(&[
                "10.0.0.0/8",
                "192.0.2.7",
                "2001:db8::/32",
                "::1",
                "10.1.2.3/16"
            ])
            .unwrap(),
            [
                "10.0.0.0/8",
                "192.0.2.7/32",
                "2001:db8::/32",
                "::1/128",
                "10.1.0.0/16"
            ]
        );
        assert_eq!(parsed(&[]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_bad_entry_is_named_with_its_index() {
        for (entries, key, entry) in [
            (
                &["10.0.0.0/8", "192.0.2.7", "10.0.0.0/33"][..],
                "proxies.trusted[2]",
                "\"10.0.0.0/33\"",
            ),
            (&["localhost"][..], "proxies.trusted[0]", "\"localhost\""),
            (&["10.0.0.0/8", ""][..], "proxies.trusted[1]", "\"\""),
            (
                &["2001:db8::/129"][..],
                "proxies.trusted[0]",
                "2001:db8::/129",
            ),
            (&["10.0.0/8"][..], "proxies.trusted[0]", "10.0.0/8"),
            (&[" 10.0.0.1"][..], "proxies.trusted[0]", "10.0.0.1"),
        ] {
            let err = parsed(entries).unwrap_err();
            assert!(
                err.starts_with(&format!("{key}: ")) && err.contains(entry),
                "{entries:?}: {err}"
            );
            assert!(err.contains("is not an IP network"), "{err}");
        }
    }
}
