//! Node plumbing through netlink (spec overlay-network §3.1 step 5 and §3.2): the bridge at
//! `S+1/26`, one veth pair per instance whose inner end is born inside the instance's network
//! namespace with `S+k/26` and a default route via the bridge, and IPv4 forwarding. What it
//! creates it removes on detach and on drop, unless told to leave it for the next run
//! ([`Plumbing::leave_in_place`]): instances outlive the worker, so their links must too.
//! [`Plumbing::adopt`] takes such links back and deletes only those no survivor claims.
//! Outgoing NAT (spec §3.1 step 7, upstream's MASQUERADE) follows the same life cycle: an
//! nf_tables table of our own ([`crate::nft`]) is replaced on setup and adopt, kept by
//! `leave_in_place` (running instances keep their LAN connections) and deleted on teardown.
//! Port publishing is not here: the worker forwards published ports in userspace
//! (`worker::overlay::ports`). Not here either: IPv6 addresses.

use crate::netlink::Netlink;
use crate::nft::{Masquerade, Nft, OVERLAY};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlumbingConfig {
    /// Upstream's name, `goProxyBridge`.
    pub bridge: String,
    /// Host ends are `<prefix><k>` for instance address `S+k`: deterministic, so a restart
    /// finds (and removes) the previous run's links.
    pub veth_prefix: String,
    /// The interface name inside the instance. Upstream keeps `veth01…` there; nothing
    /// depends on it.
    pub inner_name: String,
    /// Bridge and veth MTU (`TUN_MTU_SIZE`, 1450 upstream).
    pub mtu: u32,
    /// The nf_tables table (family `ip`) that masquerades instance traffic leaving the host
    /// for anything but the overlay; `None`: no outgoing NAT. Whatever holds this name is
    /// replaced, so it must be ours alone (tests make it unique per run).
    pub nat_table: Option<String>,
}

impl Default for PlumbingConfig {
    fn default() -> Self {
        PlumbingConfig {
            bridge: "goProxyBridge".into(),
            veth_prefix: "oakveth".into(),
            inner_name: "eth0".into(),
            mtu: 1450,
            nat_table: Some("oakestra".into()),
        }
    }
}

/// One instance's connection to the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub nsip: Ipv4Addr,
    pub host_veth: String,
}

/// Instance addresses `S+2 ..= S+62` of a /26 (61 per worker, as upstream), lowest free first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddressPool {
    used: u64,
}

impl AddressPool {
    pub const FIRST: u8 = 2;
    pub const LAST: u8 = 62;

    pub fn take(&mut self) -> Option<u8> {
        let k = (Self::FIRST..=Self::LAST).find(|k| self.used & (1u64 << k) == 0)?;
        self.used |= 1u64 << k;
        Some(k)
    }
    pub fn release(&mut self, k: u8) {
        if k < 64 {
            self.used &= !(1u64 << k);
        }
    }
    pub fn in_use(&self) -> u32 {
        self.used.count_ones()
    }
}

pub struct Plumbing {
    cfg: PlumbingConfig,
    nl: Netlink,
    subnet: Ipv4Addr,
    bridge_index: i32,
    pool: AddressPool,
    attached: BTreeMap<u8, Attachment>,
    /// Where the NAT table was installed (None: disabled, or installing failed).
    nft: Option<Nft>,
    /// Set by [`Plumbing::leave_in_place`]: drop removes nothing.
    leave: bool,
}

fn offset(s: Ipv4Addr, k: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(s) + u32::from(k))
}

impl Plumbing {
    /// Builds the bridge for `subnet` (a /26 network address) in the calling thread's
    /// network namespace, after removing leftovers of a previous run.
    pub fn setup(cfg: PlumbingConfig, subnet: Ipv4Addr) -> io::Result<Plumbing> {
        check(&cfg, subnet)?;
        let mut nl = Netlink::open()?;
        let removed = remove_leftovers(&mut nl, &cfg)?;
        if removed > 0 {
            log::info!("removed {removed} overlay links left by a previous run");
        }
        nl.add_bridge(&cfg.bridge, cfg.mtu)?;
        let bridge_index = nl.index(&cfg.bridge)?;
        nl.add_addr(bridge_index, offset(subnet, 1), 26)?;
        nl.set_up(bridge_index)?;
        enable_forwarding()?;
        let nft = install_nat(&cfg, subnet);
        Ok(Plumbing {
            cfg,
            nl,
            subnet,
            bridge_index,
            pool: AddressPool::default(),
            attached: BTreeMap::new(),
            nft,
            leave: false,
        })
    }

    /// Takes over the bridge and veths a previous run left with [`Plumbing::leave_in_place`]:
    /// the veth of each address in `keep` stays (with its address in the instance, untouched,
    /// so open connections survive); every other link of ours goes. The bridge is re-made if
    /// it is missing. Returns the addresses actually found wired; the others need a fresh
    /// [`Plumbing::attach`].
    pub fn adopt(
        cfg: PlumbingConfig,
        subnet: Ipv4Addr,
        keep: &[Ipv4Addr],
    ) -> io::Result<(Plumbing, Vec<Ipv4Addr>)> {
        check(&cfg, subnet)?;
        let mut nl = Netlink::open()?;
        let links = nl.links()?;
        let bridge = links.iter().find(|l| l.name == cfg.bridge).map(|l| l.index);
        let bridge_index = match bridge {
            Some(i) => i,
            None => {
                nl.add_bridge(&cfg.bridge, cfg.mtu)?;
                nl.index(&cfg.bridge)?
            }
        };
        match nl.add_addr(bridge_index, offset(subnet, 1), 26) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        nl.set_up(bridge_index)?;
        let mut pool = AddressPool::default();
        let mut attached = BTreeMap::new();
        let mut removed = 0;
        for l in &links {
            let Some(k) = veth_number(&cfg, &l.name) else {
                continue;
            };
            let nsip = u8::try_from(k).ok().map(|k| (k, offset(subnet, k)));
            match nsip {
                Some((k, ip))
                    if keep.contains(&ip)
                        && l.master == Some(bridge_index)
                        && (AddressPool::FIRST..=AddressPool::LAST).contains(&k) =>
                {
                    pool.used |= 1u64 << k;
                    attached.insert(
                        k,
                        Attachment {
                            nsip: ip,
                            host_veth: l.name.clone(),
                        },
                    );
                }
                _ => match nl.del_link(l.index) {
                    Ok(()) => removed += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                    Err(e) => return Err(e),
                },
            }
        }
        if removed > 0 {
            log::info!("removed {removed} overlay veths no surviving instance uses");
        }
        enable_forwarding()?;
        // Re-asserted, not trusted: the previous run's table may be gone or stale.
        let nft = install_nat(&cfg, subnet);
        let kept = attached.values().map(|a: &Attachment| a.nsip).collect();
        Ok((
            Plumbing {
                cfg,
                nl,
                subnet,
                bridge_index,
                pool,
                attached,
                nft,
                leave: false,
            },
            kept,
        ))
    }

    /// The NAT table in force, if any.
    pub fn nat_table(&self) -> Option<&str> {
        self.nft.as_ref().and(self.cfg.nat_table.as_deref())
    }

    /// Leaves the bridge, every veth and the NAT table as they are (the instances keep running without the
    /// worker); the next run takes them back with [`Plumbing::adopt`].
    pub fn leave_in_place(mut self) {
        self.leave = true;
    }

    pub fn subnet(&self) -> Ipv4Addr {
        self.subnet
    }

    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.attached.values()
    }

    /// Connects the network namespace `netns` (e.g. `/proc/<pid>/ns/net` of the instance's
    /// task) to the bridge and gives it the next free address.
    pub fn attach(&mut self, netns: &File) -> io::Result<Attachment> {
        let k = self.pool.take().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "IPv4 addresses of {}/26 exhausted (61 instances per worker)",
                    self.subnet
                ),
            )
        })?;
        let host = format!("{}{k}", self.cfg.veth_prefix);
        let nsip = offset(self.subnet, k);
        match self.wire(&host, nsip, netns) {
            Ok(()) => {
                let a = Attachment {
                    nsip,
                    host_veth: host,
                };
                self.attached.insert(k, a.clone());
                Ok(a)
            }
            Err(e) => {
                if let Ok(i) = self.nl.index(&host) {
                    let _ = self.nl.del_link(i);
                }
                self.pool.release(k);
                Err(e)
            }
        }
    }

    fn wire(&mut self, host: &str, nsip: Ipv4Addr, netns: &File) -> io::Result<()> {
        let inner = self.cfg.inner_name.clone();
        self.nl
            .add_veth(host, &inner, Some(netns.as_raw_fd()), self.cfg.mtu)?;
        let hi = self.nl.index(host)?;
        self.nl.set_master(hi, self.bridge_index)?;
        self.nl.set_up(hi)?;
        let mut inside = Netlink::open_in(netns)?;
        let ii = inside.index(&inner)?;
        inside.add_addr(ii, nsip, 26)?;
        inside.set_up(ii)?;
        if let Ok(lo) = inside.index("lo") {
            inside.set_up(lo)?;
        }
        inside.add_route(Ipv4Addr::UNSPECIFIED, 0, Some(offset(self.subnet, 1)), ii)
    }

    /// Removes the instance's veth pair (both ends go) and frees its address. A pair already
    /// gone with its namespace is fine.
    pub fn detach(&mut self, nsip: Ipv4Addr) -> io::Result<()> {
        let k = u32::from(nsip).wrapping_sub(u32::from(self.subnet));
        let Some(a) = u8::try_from(k)
            .ok()
            .and_then(|k| self.attached.remove(&k).map(|a| (k, a)))
        else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{nsip} is not attached here"),
            ));
        };
        let (k, a) = a;
        self.pool.release(k);
        match self.nl.index(&a.host_veth) {
            Ok(i) => self.nl.del_link(i),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes every veth, the bridge and the NAT table (also done on drop).
    pub fn teardown(mut self) -> io::Result<()> {
        self.remove_all()
    }

    fn remove_all(&mut self) -> io::Result<()> {
        self.attached.clear();
        self.pool = AddressPool::default();
        let links = remove_leftovers(&mut self.nl, &self.cfg).map(|_| ());
        let nat = match (self.nft.take(), self.cfg.nat_table.as_deref()) {
            (Some(mut nft), Some(table)) => nft.remove(table),
            _ => Ok(()),
        };
        links.and(nat)
    }
}

impl Drop for Plumbing {
    fn drop(&mut self) {
        if self.leave {
            return;
        }
        if let Err(e) = self.remove_all() {
            log::warn!("removing the overlay bridge, veths and NAT table failed: {e}");
        }
    }
}

/// Instances reach the TUN, the LAN and each other's workers through this host (spec §3.1
/// step 6). Written only when off, so an operator's setting is not rewritten needlessly and
/// the change is visible in the log.
fn enable_forwarding() -> io::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("enable net.ipv4.ip_forward: {e}"));
    let now = std::fs::read(PATH).map_err(ctx)?;
    if now.first() != Some(&b'1') {
        std::fs::write(PATH, b"1").map_err(ctx)?;
        log::info!("enabled net.ipv4.ip_forward (was off): instances are routed through this host");
    }
    Ok(())
}

/// Installs the masquerade table. A failure costs instances the LAN and the internet, not the
/// overlay, so it is logged (once per start) rather than fatal.
fn install_nat(cfg: &PlumbingConfig, subnet: Ipv4Addr) -> Option<Nft> {
    let table = cfg.nat_table.as_ref()?;
    let m = Masquerade {
        table: table.clone(),
        subnet,
        prefix: 26,
        exclude: OVERLAY,
        bridge: Some(cfg.bridge.clone()),
    };
    match Nft::open().and_then(|mut nft| nft.replace(&m).map(|()| nft)) {
        Ok(nft) => {
            log::info!(
                "outgoing NAT: table ip {table} masquerades {subnet}/26 except to {}/{}",
                OVERLAY.0,
                OVERLAY.1
            );
            Some(nft)
        }
        Err(e) => {
            log::warn!("outgoing NAT unavailable, instances reach only the overlay: {e}");
            None
        }
    }
}

fn check(cfg: &PlumbingConfig, subnet: Ipv4Addr) -> io::Result<()> {
    if u32::from(subnet) & 63 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{subnet} is not a /26 network address"),
        ));
    }
    if cfg.veth_prefix.len() + 2 > 15 || cfg.bridge.len() > 15 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bridge name and veth prefix (+2 digits) must fit in 15 characters",
        ));
    }
    Ok(())
}

/// `k` of a host veth named `<veth_prefix><k>`.
fn veth_number(cfg: &PlumbingConfig, name: &str) -> Option<u32> {
    name.strip_prefix(&cfg.veth_prefix)
        .filter(|rest| {
            !rest.is_empty() && rest.len() <= 3 && rest.bytes().all(|b| b.is_ascii_digit())
        })
        .and_then(|rest| rest.parse().ok())
}

/// Deletes our bridge and every link named `<veth_prefix><digits>`; returns how many.
fn remove_leftovers(nl: &mut Netlink, cfg: &PlumbingConfig) -> io::Result<usize> {
    let mut n = 0;
    for l in nl.links()? {
        let ours_veth = veth_number(cfg, &l.name).is_some();
        if ours_veth || l.name == cfg.bridge {
            match nl.del_link(l.index) {
                Ok(()) => n += 1,
                // the peer of a pair deleted just before
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_61_addresses_and_reuses_freed_ones() {
        let mut p = AddressPool::default();
        let got: Vec<u8> = std::iter::from_fn(|| p.take()).collect();
        assert_eq!(got.len(), 61);
        assert_eq!((got[0], got[60]), (2, 62));
        p.release(7);
        assert_eq!(p.take(), Some(7));
        assert_eq!(p.take(), None);
    }
}
