//! The node's address as the cluster should see it: the first IPv4 of the interface that holds
//! the default route (`/proc/net/route` + getifaddrs, no processes), and the interface list
//! for `network_info`. It does not ask the outside world (upstream's `public_ip` mode does).

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Interface of the default IPv4 route with the lowest metric, from `/proc/net/route`.
pub fn default_route_interface(route: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            let metric: u32 = f[6].parse().ok()?;
            (f[1] == "00000000" && f[7] == "00000000" && flags & RTF_UP != 0)
                .then(|| (metric, f[0]))
        })
        .min_by_key(|(m, _)| *m)
        .map(|(_, name)| name.to_string())
}

/// The address to advertise: an IPv4 of `preferred` (the default-route interface), else the
/// first non-loopback IPv4 of any interface.
pub fn pick_ipv4(addrs: &[(String, IpAddr)], preferred: Option<&str>) -> Option<Ipv4Addr> {
    let v4 = |(name, ip): &(String, IpAddr)| match ip {
        IpAddr::V4(a) if !a.is_loopback() && !a.is_unspecified() => Some((name.clone(), *a)),
        _ => None,
    };
    let all: Vec<(String, Ipv4Addr)> = addrs.iter().filter_map(v4).collect();
    preferred
        .and_then(|p| all.iter().find(|(n, _)| n == p))
        .or_else(|| all.first())
        .map(|(_, a)| *a)
}

/// Every interface address (IPv4 and IPv6) from getifaddrs(3), in the kernel's order.
pub fn interface_addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we only read and then free exactly once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned above and not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null; sa_family says which sockaddr it really is.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push((name, ip));
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
        wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
        eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn default_route_prefers_lowest_metric() {
        assert_eq!(default_route_interface(ROUTE).as_deref(), Some("eth0"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None);
        assert_eq!(default_route_interface("garbage"), None);
    }

    #[test]
    fn picks_default_interface_then_any_non_loopback() {
        let a = |n: &str, ip: &str| (n.to_string(), ip.parse::<IpAddr>().unwrap());
        let addrs = vec![
            a("lo", "127.0.0.1"),
            a("docker0", "172.17.0.1"),
            a("eth0", "fe80::1"),
            a("eth0", "192.168.1.20"),
        ];
        assert_eq!(
            pick_ipv4(&addrs, Some("eth0")),
            Some(Ipv4Addr::new(192, 168, 1, 20))
        );
        assert_eq!(
            pick_ipv4(&addrs, Some("wlan0")),
            Some(Ipv4Addr::new(172, 17, 0, 1))
        );
        assert_eq!(pick_ipv4(&addrs[..1], None), None);
    }

    #[test]
    fn this_host_has_a_loopback() {
        assert!(interface_addresses().iter().any(|(_, ip)| ip.is_loopback()));
    }
}
