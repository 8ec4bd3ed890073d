//! Optional per-client rate limit on the webhook listener, and the rule that
//! decides who the client is: the peer address, or, when the peer is a
//! trusted proxy, the right-most `X-Forwarded-For` entry that is not one.
//! Pure apart from the limiter's clock.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use serde::{Deserialize, Serialize};

/// The configured limiter; `None` in `limiter` means off.
pub struct ClientLimits {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    trusted_proxies: Vec<IpNet>,
}

impl std::fmt::Debug for ClientLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLimits")
            .field("enabled", &self.limiter.is_some())
            .field("trusted_proxies", &self.trusted_proxies.len())
            .finish()
    }
}

impl ClientLimits {
    /// `per_sec = 0` turns the limit off; `burst = 0` means one second's worth.
    pub fn new(per_sec: u32, burst: u32, trusted_proxies: Vec<IpNet>) -> Self {
        let limiter = NonZeroU32::new(per_sec).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            limiter,
            trusted_proxies,
        }
    }

    /// The client a request comes from.
    pub fn client_ip(&self, peer: Option<IpAddr>, forwarded_for: Option<&str>) -> Option<IpAddr> {
        let peer = peer?;
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let hops = forwarded_for.unwrap_or("").split(',').map(str::trim).rev();
        for hop in hops {
            match hop.parse::<IpAddr>() {
                // One of our proxies added it: look one hop further.
                Ok(ip) if self.is_trusted(ip) => {}
                Ok(ip) => return Some(ip),
                // A malformed entry ends what can be believed.
                Err(_) => break,
            }
        }
        Some(peer)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(ip))
    }

    /// `Err(wait)` when `client` is over its rate.
    pub fn check(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        let (Some(limiter), Some(ip)) = (&self.limiter, client) else {
            return Ok(());
        };
        limiter
            .check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets clients that have been quiet long enough to be back at full
    /// burst, so the table does not grow without bound.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// An IP network (`10.0.0.0/8`, `fd00::/8`) or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNet {
    /// True when `ip` is inside the network (never across IPv4 and IPv6).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}` has a bad prefix length"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let limits = ClientLimits::new(0, 0, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(
            limits.client_ip(Some(ip("203.0.113.9")), Some("1.2.3.4")),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            limits.client_ip(Some(ip("10.1.2.3")), Some("1.2.3.4, 10.9.9.9")),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(
            limits.client_ip(Some(ip("10.1.2.3")), Some("spoofed, 5.6.7.8")),
            Some(ip("5.6.7.8"))
        );
        assert_eq!(
            limits.client_ip(Some(ip("10.1.2.3")), Some("garbage")),
            Some(ip("10.1.2.3"))
        );
        assert_eq!(
            limits.client_ip(Some(ip("10.1.2.3")), None),
            Some(ip("10.1.2.3"))
        );
    }

    #[test]
    fn a_client_over_its_burst_must_wait_while_others_pass() {
        let limits = ClientLimits::new(1, 2, Vec::new());
        let a = Some(ip("192.0.2.1"));
        assert!(limits.check(a).is_ok());
        assert!(limits.check(a).is_ok());
        assert!(limits.check(a).is_err());
        assert!(limits.check(Some(ip("192.0.2.2"))).is_ok());
    }

    #[test]
    fn zero_rate_means_no_limit() {
        let limits = ClientLimits::new(0, 0, Vec::new());
        for _ in 0..1000 {
            assert!(limits.check(Some(ip("192.0.2.1"))).is_ok());
        }
    }
}
