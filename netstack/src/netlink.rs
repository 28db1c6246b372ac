//! A minimal rtnetlink client over a raw `NETLINK_ROUTE` socket: create bridges and veth
//! pairs (a peer can be born directly inside another network namespace), enslave, set up,
//! delete and list links, add IPv4 addresses and routes. Requests are acknowledged one at a
//! time. It does not monitor events or cover anything the overlay does not need.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// linux/rtnetlink.h, linux/if_link.h, linux/netlink.h, linux/veth.h
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const NLA_F_NESTED: u16 = 0x8000;
const IFF_UP: u32 = 0x1;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

/// A request under construction: header, fixed part, attributes (nested ones patched up).
struct Msg {
    b: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16) -> Msg {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // seq, set when sent
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        Msg { b }
    }

    /// `struct ifinfomsg`.
    fn ifinfo(mut self, index: i32, flags: u32, change: u32) -> Msg {
        self.ifinfo_raw(index, flags, change);
        self
    }

    fn ifinfo_raw(&mut self, index: i32, flags: u32, change: u32) {
        self.b.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        self.b.extend_from_slice(&index.to_ne_bytes());
        self.b.extend_from_slice(&flags.to_ne_bytes());
        self.b.extend_from_slice(&change.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.b.extend_from_slice(&(len as u16).to_ne_bytes());
        self.b.extend_from_slice(&kind.to_ne_bytes());
        self.b.extend_from_slice(data);
        self.pad();
    }

    fn attr_str(&mut self, kind: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v);
    }

    fn attr_u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_ne_bytes());
    }

    fn pad(&mut self) {
        while self.b.len() % 4 != 0 {
            self.b.push(0);
        }
    }

    fn begin(&mut self, kind: u16) -> usize {
        let at = self.b.len();
        self.b.extend_from_slice(&[0, 0]);
        self.b
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.b.len() - at) as u16;
        self.b[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.b.len() as u32;
        self.b[0..4].copy_from_slice(&len.to_ne_bytes());
        self.b[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.b
    }
}

/// One link as listed by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: i32,
    pub name: String,
    pub kind: Option<String>,
    pub master: Option<i32>,
}

/// A netlink socket bound to the network namespace it was opened in.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn ctx(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Netlink {
    /// In the calling thread's network namespace.
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(ctx(io::Error::last_os_error(), "netlink socket"));
        }
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink {
            fd,
            seq: 1,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// In the network namespace `ns` (e.g. `/proc/<pid>/ns/net` or `/run/netns/<name>`): the
    /// socket is created on a short-lived thread that entered it, and keeps that namespace.
    pub fn open_in(ns: &File) -> io::Result<Netlink> {
        let raw = ns.as_raw_fd();
        // The thread only borrows the descriptor; `ns` outlives the join below.
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: raw is a valid namespace fd; CLONE_NEWNET affects only this thread,
                // which ends right after.
                if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
                    return Err(ctx(io::Error::last_os_error(), "setns"));
                }
                Netlink::open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("netlink thread panicked")))
        })
    }

    fn send(&mut self, msg: Msg) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let b = msg.finish(seq);
        // SAFETY: b is a live buffer of b.len() bytes; a zeroed sockaddr_nl addresses the kernel.
        let rc = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                b.as_ptr().cast(),
                b.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(seq)
    }

    fn recv(&mut self) -> io::Result<usize> {
        // SAFETY: receiving into our own buffer of its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends a request and waits for its acknowledgement.
    fn request(&mut self, msg: Msg) -> io::Result<()> {
        let seq = self.send(msg)?;
        loop {
            let n = self.recv()?;
            for (kind, mseq, payload) in messages(&self.buf[..n]) {
                if mseq != seq || kind != NLMSG_ERROR {
                    continue;
                }
                let code = payload
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(-libc::EPROTO);
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
        }
    }

    /// Every link in this namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let seq = self.send(Msg::new(RTM_GETLINK, NLM_F_DUMP).ifinfo(0, 0, 0))?;
        let mut out = Vec::new();
        loop {
            let n = self.recv()?;
            for (kind, mseq, payload) in messages(&self.buf[..n]) {
                if mseq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = payload.get(0..4).map_or(-libc::EPROTO, |b| {
                            i32::from_ne_bytes([b[0], b[1], b[2], b[3]])
                        });
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    RTM_NEWLINK => out.extend(parse_link(payload)),
                    _ => {}
                }
            }
        }
    }

    pub fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    pub fn index(&mut self, name: &str) -> io::Result<i32> {
        self.link(name)?
            .map(|l| l.index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link named {name}")))
    }

    pub fn add_bridge(&mut self, name: &str, mtu: u32) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).ifinfo(0, 0, 0);
        m.attr_str(IFLA_IFNAME, name);
        m.attr_u32(IFLA_MTU, mtu);
        let li = m.begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "bridge");
        m.end(li);
        self.request(m)
            .map_err(|e| ctx(e, &format!("create bridge {name}")))
    }

    /// A veth pair `name` here and `peer` in the namespace `peer_ns` (this one if `None`).
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_ns: Option<RawFd>,
        mtu: u32,
    ) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).ifinfo(0, 0, 0);
        m.attr_str(IFLA_IFNAME, name);
        m.attr_u32(IFLA_MTU, mtu);
        let li = m.begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        let data = m.begin(IFLA_INFO_DATA);
        let p = m.begin(VETH_INFO_PEER);
        m.ifinfo_raw(0, 0, 0);
        m.attr_str(IFLA_IFNAME, peer);
        m.attr_u32(IFLA_MTU, mtu);
        if let Some(fd) = peer_ns {
            m.attr_u32(IFLA_NET_NS_FD, fd as u32);
        }
        m.end(p);
        m.end(data);
        m.end(li);
        self.request(m)
            .map_err(|e| ctx(e, &format!("create veth {name}/{peer}")))
    }

    pub fn set_master(&mut self, index: i32, master: i32) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK).ifinfo(index, 0, 0);
        m.attr_u32(IFLA_MASTER, master as u32);
        self.request(m).map_err(|e| ctx(e, "set master"))
    }

    pub fn set_up(&mut self, index: i32) -> io::Result<()> {
        self.request(Msg::new(RTM_NEWLINK, NLM_F_ACK).ifinfo(index, IFF_UP, IFF_UP))
            .map_err(|e| ctx(e, "set link up"))
    }

    pub fn move_to_netns(&mut self, index: i32, ns: RawFd) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK).ifinfo(index, 0, 0);
        m.attr_u32(IFLA_NET_NS_FD, ns as u32);
        self.request(m)
            .map_err(|e| ctx(e, "move link to namespace"))
    }

    pub fn del_link(&mut self, index: i32) -> io::Result<()> {
        self.request(Msg::new(RTM_DELLINK, NLM_F_ACK).ifinfo(index, 0, 0))
            .map_err(|e| ctx(e, "delete link"))
    }

    pub fn add_addr(&mut self, index: i32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        m.b.extend_from_slice(&[libc::AF_INET as u8, prefix, 0, RT_SCOPE_UNIVERSE]);
        m.b.extend_from_slice(&(index as u32).to_ne_bytes());
        m.attr(IFA_LOCAL, &addr.octets());
        m.attr(IFA_ADDRESS, &addr.octets());
        self.request(m)
            .map_err(|e| ctx(e, &format!("add address {addr}/{prefix}")))
    }

    /// `dst/prefix` via `gateway` (or directly on the link if `None`) out of `oif`.
    pub fn add_route(
        &mut self,
        dst: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        oif: i32,
    ) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        let scope = if gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        };
        m.b.extend_from_slice(&[
            libc::AF_INET as u8,
            prefix,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_STATIC,
            scope,
            RTN_UNICAST,
        ]);
        m.b.extend_from_slice(&0u32.to_ne_bytes());
        if prefix > 0 {
            m.attr(RTA_DST, &dst.octets());
        }
        if let Some(g) = gateway {
            m.attr(RTA_GATEWAY, &g.octets());
        }
        m.attr_u32(RTA_OIF, oif as u32);
        self.request(m)
            .map_err(|e| ctx(e, &format!("add route {dst}/{prefix}")))
    }
}

/// Splits a datagram into (type, seq, payload) messages, stopping at anything inconsistent.
fn messages(b: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let h = b.get(off..off + 16)?;
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len < 16 || off + len > b.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        let payload = &b[off + 16..off + len];
        off += (len + 3) & !3;
        Some((kind, seq, payload))
    })
}

fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let h = b.get(off..off + 4)?;
        let len = usize::from(u16::from_ne_bytes([h[0], h[1]]));
        if len < 4 || off + len > b.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([h[2], h[3]]) & !NLA_F_NESTED;
        let data = &b[off + 4..off + len];
        off += (len + 3) & !3;
        Some((kind, data))
    })
}

fn parse_link(p: &[u8]) -> Option<Link> {
    let hdr = p.get(0..16)?;
    let index = i32::from_ne_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let cstr =
        |d: &[u8]| String::from_utf8_lossy(d.split(|c| *c == 0).next().unwrap_or(d)).into_owned();
    let mut link = Link {
        index,
        name: String::new(),
        kind: None,
        master: None,
    };
    for (kind, data) in attrs(&p[16..]) {
        match kind {
            IFLA_IFNAME => link.name = cstr(data),
            IFLA_MASTER if data.len() >= 4 => {
                link.master = Some(i32::from_ne_bytes([data[0], data[1], data[2], data[3]]))
            }
            IFLA_LINKINFO => {
                link.kind = attrs(data)
                    .find(|(k, _)| *k == IFLA_INFO_KIND)
                    .map(|(_, d)| cstr(d));
            }
            _ => {}
        }
    }
    Some(link)
}
