//! Addresses and networks: `TRUSTED_PROXIES`.

use std::net::IpAddr;
use std::str::FromStr;

use super::error::ConfigError;

/// An IP network: an address and how many leading bits of it must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

impl FromStr for IpNetwork {
    type Err = ();

    /// `203.0.113.7`, `10.0.0.0/8`, `2001:db8::/32`, `::1`.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (s, None),
        };
        let addr = addr
            .trim()
            .parse::<IpAddr>()
            .map_err(|_| ())?
            .to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(bits) => bits.trim().parse::<u8>().map_err(|_| ())?,
        };
        if prefix > max {
            return Err(());
        }
        Ok(Self { addr, prefix })
    }
}

fn prefix_matches(net: &[u8], ip: &[u8], prefix: u8) -> bool {
    let mut bits = usize::from(prefix);
    for (n, i) in net.iter().zip(ip) {
        if bits == 0 {
            return true;
        }
        let take = bits.min(8);
        let mask = u8::MAX << (8 - take);
        if n & mask != i & mask {
            return false;
        }
        bits -= take;
    }
    true
}

/// The callers allowed to tell authd the end user's address (Login's `client_ip`):
/// gateways. Everyone else is judged by the address they connect from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNetwork>);

impl TrustedProxies {
    /// Whether a caller connecting from `peer` may set `client_ip`.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(peer))
    }

    /// True when no caller is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub(super) fn trusted_proxies(value: Option<String>) -> Result<TrustedProxies, ConfigError> {
    let Some(value) = value else {
        return Ok(TrustedProxies::default());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNetwork>().map_err(|()| {
                ConfigError::new(
                    "TRUSTED_PROXIES",
                    format!(
                        "{s:?} is not an address or network like 10.0.0.5, 10.0.0.0/8 or fd00::/8"
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(TrustedProxies)
}
