//! Address management of the root service manager (spec overlay §2): service IPs (round-robin
//! `rr_ip`) and instance IPs from one pool in 10.30.0.0/16, their IPv6 twins, and worker
//! subnets (/26 + /120). Pure bookkeeping; the state it is rebuilt from lives in the db.
//! Unlike upstream, released addresses really return to the pool and auto-allocated addresses
//! are checked against user-chosen ones (upstream's check never matches, §2.1).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

pub fn in_service_range(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 10 && o[1] == 30
}

/// `fdff:2000::/21`, the round-robin block (spec overlay §2.2).
pub fn in_rr_v6_range(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    s[0] == 0xfdff && s[1] & 0xf800 == 0x2000
}

/// IPv6 twin of a round-robin address: `10.30.a.b` → `fdff:2000::a:b`. Tying v6 to v4 1:1
/// (as upstream's counters effectively do) makes v6 unique whenever v4 is.
pub fn rr_v6_for(ip: Ipv4Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(0xfdff, 0x2000, 0, 0, 0, 0, o[2] as u16, o[3] as u16)
}

/// IPv6 twin of an instance address, in block 1 `fdff:0000::/21`: `10.30.a.b` → `fdff::a:b`.
pub fn instance_v6_for(ip: Ipv4Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(0xfdff, 0, 0, 0, 0, 0, o[2] as u16, o[3] as u16)
}

#[derive(Debug, Clone, PartialEq)]
pub enum IpamError {
    OutOfRange(Ipv4Addr),
    Taken(String),
    Exhausted,
}

impl fmt::Display for IpamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpamError::OutOfRange(ip) => write!(f, "{ip} is outside the service range 10.30.0.0/16"),
            IpamError::Taken(ip) => write!(f, "{ip} is already used by another service or instance; choose another address or omit it to get one allocated"),
            IpamError::Exhausted => f.write_str("the service address pool 10.30.0.0/16 is exhausted; delete unused services"),
        }
    }
}

/// The 10.30.0.0/16 pool shared by round-robin and instance addresses.
#[derive(Debug, Clone, Default)]
pub struct Ipam {
    used: BTreeSet<Ipv4Addr>,
    used_v6: BTreeSet<Ipv6Addr>,
    /// Host part (`x*256+y`) where the next search starts. Moving forward instead of reusing the
    /// lowest free address keeps a just-freed IP out of circulation while workers may still
    /// have it in their translation tables.
    cursor: u16,
}

impl Ipam {
    pub fn reserve(&mut self, ip: Ipv4Addr) -> Result<(), IpamError> {
        if !in_service_range(ip) {
            return Err(IpamError::OutOfRange(ip));
        }
        if !self.used.insert(ip) {
            return Err(IpamError::Taken(ip.to_string()));
        }
        Ok(())
    }

    pub fn reserve_v6(&mut self, ip: Ipv6Addr) -> Result<(), IpamError> {
        if !self.used_v6.insert(ip) {
            return Err(IpamError::Taken(ip.to_string()));
        }
        Ok(())
    }

    pub fn is_free(&self, ip: Ipv4Addr) -> bool {
        in_service_range(ip) && !self.used.contains(&ip)
    }

    pub fn is_free_v6(&self, ip: Ipv6Addr) -> bool {
        !self.used_v6.contains(&ip)
    }

    /// Next free `10.30.x.y` with y in 1..=254 (no `.0`/`.255`, which some tools treat as
    /// network or broadcast addresses even inside a /16).
    pub fn allocate(&mut self) -> Result<Ipv4Addr, IpamError> {
        for step in 0..=u16::MAX {
            let host = self.cursor.wrapping_add(step);
            let (x, y) = ((host >> 8) as u8, host as u8);
            if y == 0 || y == 255 {
                continue;
            }
            let ip = Ipv4Addr::new(10, 30, x, y);
            if self.used.insert(ip) {
                self.cursor = host.wrapping_add(1);
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }

    pub fn release_v6(&mut self, ip: Ipv6Addr) {
        self.used_v6.remove(&ip);
    }

    pub fn used_count(&self) -> usize {
        self.used.len()
    }
}

/// Number of worker /26 subnets in 10.18.0.0 – 10.29.255.192 (spec overlay §2.1).
pub const SUBNET_COUNT: u32 = 12 * 1024;

/// The `n`-th worker subnet: `10.18.0.0/26`, `10.18.0.64/26`, … and `fc00::/120`,
/// `fc00::100/120`, …; `None` when exhausted. Subnets are never returned, as upstream: the
/// cluster never says when a worker leaves for good.
pub fn worker_subnet(n: u32) -> Option<(Ipv4Addr, Ipv6Addr)> {
    if n >= SUBNET_COUNT {
        return None;
    }
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 18, 0, 0)) + n * 64);
    let v6 = Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)) + (n as u128) * 0x100,
    );
    Some((v4, v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(in_service_range("10.30.255.1".parse().unwrap()));
        assert!(!in_service_range("10.31.0.1".parse().unwrap()));
        assert!(in_rr_v6_range("fdff:2000::1".parse().unwrap()));
        assert!(in_rr_v6_range("fdff:27ff::1".parse().unwrap()));
        assert!(!in_rr_v6_range("fdff:2800::1".parse().unwrap()));
        assert!(!in_rr_v6_range("fdff::1".parse().unwrap()));
        assert!(in_rr_v6_range(rr_v6_for("10.30.30.30".parse().unwrap())));
        assert_eq!(
            rr_v6_for("10.30.30.30".parse().unwrap()).to_string(),
            "fdff:2000::1e:1e"
        );
        assert_eq!(
            instance_v6_for("10.30.0.1".parse().unwrap()).to_string(),
            "fdff::1"
        );
    }

    #[test]
    fn allocation_skips_taken_and_edge_addresses() {
        let mut ipam = Ipam::default();
        ipam.reserve("10.30.0.2".parse().unwrap()).unwrap();
        assert_eq!(ipam.allocate(), Ok("10.30.0.1".parse().unwrap()));
        assert_eq!(
            ipam.allocate(),
            Ok("10.30.0.3".parse().unwrap()),
            "user-chosen .2 is skipped"
        );
        assert_eq!(
            ipam.reserve("10.30.0.3".parse().unwrap()),
            Err(IpamError::Taken("10.30.0.3".into()))
        );
        assert!(matches!(
            ipam.reserve("10.1.0.3".parse().unwrap()),
            Err(IpamError::OutOfRange(_))
        ));
        ipam.cursor = 255;
        assert_eq!(
            ipam.allocate(),
            Ok("10.30.1.1".parse().unwrap()),
            ".255 and .0 are skipped"
        );
    }

    #[test]
    fn release_returns_addresses_to_the_pool_later() {
        let mut ipam = Ipam::default();
        let a = ipam.allocate().unwrap();
        ipam.release(a);
        assert!(ipam.is_free(a));
        assert_ne!(
            ipam.allocate().unwrap(),
            a,
            "a freed address is not handed out right away"
        );
        ipam.reserve(a).unwrap();
        ipam.reserve_v6(rr_v6_for(a)).unwrap();
        assert!(ipam.reserve_v6(rr_v6_for(a)).is_err());
        ipam.release_v6(rr_v6_for(a));
        assert!(ipam.is_free_v6(rr_v6_for(a)));
    }

    #[test]
    fn pool_exhaustion_is_an_answer() {
        let mut ipam = Ipam::default();
        let n = (0..70_000).take_while(|_| ipam.allocate().is_ok()).count();
        assert_eq!(n, 256 * 254);
        assert_eq!(ipam.allocate(), Err(IpamError::Exhausted));
        assert_eq!(ipam.used_count(), n);
    }

    #[test]
    fn worker_subnets_follow_upstream_order() {
        assert_eq!(worker_subnet(0).unwrap().0.to_string(), "10.18.0.0");
        let (v4, v6) = worker_subnet(1).unwrap();
        assert_eq!(
            (v4.to_string(), v6.to_string()),
            ("10.18.0.64".into(), "fc00::100".into())
        );
        assert_eq!(worker_subnet(4).unwrap().0.to_string(), "10.18.1.0");
        assert_eq!(
            worker_subnet(SUBNET_COUNT - 1).unwrap().0.to_string(),
            "10.29.255.192"
        );
        assert_eq!(worker_subnet(SUBNET_COUNT), None);
    }
}
