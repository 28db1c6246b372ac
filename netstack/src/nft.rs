//! Outgoing NAT for the instance subnet (spec overlay-network §3.1 step 7, upstream's
//! `POSTROUTING -s <S>/26 -j MASQUERADE`), spoken as nf_tables netlink batches so the worker
//! needs neither the `nft` nor the `iptables` binary. The rules live in a table of our own:
//! replacing or deleting it never touches anybody else's rules, and one batch makes each
//! change atomic.
//!
//! The byte layout is built and read by pure functions ([`encode_replace`],
//! [`encode_remove`], [`decode_ack`], …); [`Nft`] only moves the bytes through a
//! `NETLINK_NETFILTER` socket. Setup paths only: nothing here runs per packet.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

// linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h
const NETLINK_NETFILTER: i32 = 12;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_OIFNAME: u32 = 7;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_REG_1: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NF_INET_POST_ROUTING: u32 = 4;
/// `NF_IP_PRI_NAT_SRC`: where iptables' nat POSTROUTING sits.
const NAT_SRC_PRIORITY: i32 = 100;
/// Table family `ip`: the overlay's instance addresses are IPv4 only.
pub const NFPROTO_IPV4: u8 = 2;
const IFNAMSIZ: usize = 16;

/// Oakestra's overlay range: traffic to it goes through the TUN and must keep the instance's
/// own address, or the proxy cannot tell which instance sent it.
pub const OVERLAY: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 16, 0, 0), 12);

/// The chain our table holds; fixed so a later run finds what an earlier one made.
pub const CHAIN: &str = "postrouting";

/// What to masquerade: packets from `subnet/prefix` that neither go to `exclude` nor leave
/// through `bridge` (instance to instance on the same host is not NAT's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masquerade {
    pub table: String,
    pub subnet: Ipv4Addr,
    pub prefix: u8,
    pub exclude: (Ipv4Addr, u8),
    pub bridge: Option<String>,
}

fn mask(prefix: u8) -> [u8; 4] {
    let m = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    m.to_be_bytes()
}

fn network(a: Ipv4Addr, prefix: u8) -> [u8; 4] {
    (u32::from(a) & u32::from_be_bytes(mask(prefix))).to_be_bytes()
}

/// A datagram of netlink messages under construction.
struct Batch {
    b: Vec<u8>,
    seq: u32,
    /// Start of the message being written.
    at: usize,
}

impl Batch {
    fn new(first_seq: u32) -> Batch {
        Batch {
            b: Vec::with_capacity(1024),
            seq: first_seq,
            at: 0,
        }
    }

    /// Opens a message: `nlmsghdr` then `nfgenmsg` (family, version 0, resource id).
    fn msg(&mut self, kind: u16, flags: u16, family: u8, res_id: u16) {
        self.close();
        self.at = self.b.len();
        self.b.extend_from_slice(&0u32.to_ne_bytes());
        self.b.extend_from_slice(&kind.to_ne_bytes());
        self.b
            .extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        self.b.extend_from_slice(&self.seq.to_ne_bytes());
        self.b.extend_from_slice(&0u32.to_ne_bytes());
        self.b.push(family);
        self.b.push(0);
        self.b.extend_from_slice(&res_id.to_be_bytes());
        self.seq = self.seq.wrapping_add(1);
    }

    fn nft(&mut self, kind: u16, flags: u16, family: u8) {
        self.msg((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, family, 0);
    }

    /// Patches the length of the open message.
    fn close(&mut self) {
        if self.b.len() > self.at {
            let len = (self.b.len() - self.at) as u32;
            self.b[self.at..self.at + 4].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        self.b
            .extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.b.extend_from_slice(&kind.to_ne_bytes());
        self.b.extend_from_slice(data);
        while self.b.len() % 4 != 0 {
            self.b.push(0);
        }
    }

    fn str(&mut self, kind: u16, s: &str) {
        self.b
            .extend_from_slice(&((5 + s.len()) as u16).to_ne_bytes());
        self.b.extend_from_slice(&kind.to_ne_bytes());
        self.b.extend_from_slice(s.as_bytes());
        self.b.push(0);
        while self.b.len() % 4 != 0 {
            self.b.push(0);
        }
    }

    /// nf_tables numbers are big-endian on the wire.
    fn be32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
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

    fn data(&mut self, kind: u16, value: &[u8]) {
        let d = self.begin(kind);
        self.attr(NFTA_DATA_VALUE, value);
        self.end(d);
    }

    /// One element of `NFTA_RULE_EXPRESSIONS`; `body` writes its `NFTA_EXPR_DATA`.
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Batch)) {
        let e = self.begin(NFTA_LIST_ELEM);
        self.str(NFTA_EXPR_NAME, name);
        let d = self.begin(NFTA_EXPR_DATA);
        body(self);
        self.end(d);
        self.end(e);
    }

    fn table(&mut self, kind: u16, flags: u16, name: &str) {
        self.nft(kind, flags | NLM_F_ACK, NFPROTO_IPV4);
        self.str(NFTA_TABLE_NAME, name);
    }

    fn batch_begin(&mut self) {
        self.msg(NFNL_MSG_BATCH_BEGIN, 0, 0, NFNL_SUBSYS_NFTABLES);
    }

    /// Closes the batch; returns the bytes and the sequence numbers of the messages that ask
    /// for an acknowledgement (all but begin and end).
    fn finish(mut self, first_seq: u32) -> (Vec<u8>, std::ops::Range<u32>) {
        self.msg(NFNL_MSG_BATCH_END, 0, 0, NFNL_SUBSYS_NFTABLES);
        self.close();
        let last = self.seq.wrapping_sub(1);
        (self.b, first_seq.wrapping_add(1)..last)
    }
}

/// Writes `prefix` match of the address at `offset` of the IPv4 header: load, mask, compare.
fn match_addr(b: &mut Batch, offset: u32, addr: Ipv4Addr, prefix: u8, op: u32) {
    b.expr("payload", |b| {
        b.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        b.be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
        b.be32(NFTA_PAYLOAD_OFFSET, offset);
        b.be32(NFTA_PAYLOAD_LEN, 4);
    });
    if prefix < 32 {
        b.expr("bitwise", |b| {
            b.be32(NFTA_BITWISE_SREG, NFT_REG_1);
            b.be32(NFTA_BITWISE_DREG, NFT_REG_1);
            b.be32(NFTA_BITWISE_LEN, 4);
            b.data(NFTA_BITWISE_MASK, &mask(prefix));
            b.data(NFTA_BITWISE_XOR, &[0; 4]);
        });
    }
    b.expr("cmp", |b| {
        b.be32(NFTA_CMP_SREG, NFT_REG_1);
        b.be32(NFTA_CMP_OP, op);
        b.data(NFTA_CMP_DATA, &network(addr, prefix));
    });
}

/// The `NEWRULE` message's expressions alone (what `nft --debug=netlink` lists):
/// `ip saddr S/p ip daddr != X/q [oifname != bridge] masquerade`.
fn rule_exprs(b: &mut Batch, m: &Masquerade) {
    let list = b.begin(NFTA_RULE_EXPRESSIONS);
    match_addr(b, 12, m.subnet, m.prefix, NFT_CMP_EQ);
    match_addr(b, 16, m.exclude.0, m.exclude.1, NFT_CMP_NEQ);
    if let Some(bridge) = &m.bridge {
        b.expr("meta", |b| {
            b.be32(NFTA_META_KEY, NFT_META_OIFNAME);
            b.be32(NFTA_META_DREG, NFT_REG_1);
        });
        let mut name = [0u8; IFNAMSIZ];
        let n = bridge.len().min(IFNAMSIZ - 1);
        name[..n].copy_from_slice(&bridge.as_bytes()[..n]);
        b.expr("cmp", |b| {
            b.be32(NFTA_CMP_SREG, NFT_REG_1);
            b.be32(NFTA_CMP_OP, NFT_CMP_NEQ);
            b.data(NFTA_CMP_DATA, &name);
        });
    }
    // masq needs no attributes: the kernel picks the outgoing interface's address.
    b.expr("masq", |_| {});
    b.end(list);
}

/// Rejects names the kernel would refuse (or truncate) before anything is sent.
pub fn check(m: &Masquerade) -> io::Result<()> {
    let bad = |what: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            what.to_string(),
        ))
    };
    if m.table.is_empty() || m.table.len() > 255 || m.table.contains('\0') {
        return bad("nf_tables table name must be 1..=255 bytes without NUL");
    }
    if m.prefix > 32 || m.exclude.1 > 32 {
        return bad("prefix length above 32");
    }
    if m.bridge
        .as_ref()
        .is_some_and(|b| b.is_empty() || b.len() >= IFNAMSIZ)
    {
        return bad("bridge name must be 1..=15 bytes");
    }
    Ok(())
}

/// One batch that makes the table exactly `{ chain postrouting { <the rule> } }`, whatever
/// was there: add (a no-op if present), delete, re-create. Returns the bytes and the
/// sequence numbers to expect acknowledgements for.
pub fn encode_replace(m: &Masquerade, first_seq: u32) -> (Vec<u8>, std::ops::Range<u32>) {
    let mut b = Batch::new(first_seq);
    b.batch_begin();
    b.table(NFT_MSG_NEWTABLE, NLM_F_CREATE, &m.table);
    b.table(NFT_MSG_DELTABLE, 0, &m.table);
    b.table(NFT_MSG_NEWTABLE, NLM_F_CREATE, &m.table);
    b.nft(NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_ACK, NFPROTO_IPV4);
    b.str(NFTA_CHAIN_TABLE, &m.table);
    b.str(NFTA_CHAIN_NAME, CHAIN);
    let hook = b.begin(NFTA_CHAIN_HOOK);
    b.be32(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING);
    b.be32(NFTA_HOOK_PRIORITY, NAT_SRC_PRIORITY as u32);
    b.end(hook);
    b.str(NFTA_CHAIN_TYPE, "nat");
    b.nft(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
        NFPROTO_IPV4,
    );
    b.str(NFTA_RULE_TABLE, &m.table);
    b.str(NFTA_RULE_CHAIN, CHAIN);
    rule_exprs(&mut b, m);
    b.finish(first_seq)
}

/// One batch that deletes the table if it exists (add-then-delete, so a missing table is
/// not an error on kernels without `NFT_MSG_DESTROYTABLE`).
pub fn encode_remove(table: &str, first_seq: u32) -> (Vec<u8>, std::ops::Range<u32>) {
    let mut b = Batch::new(first_seq);
    b.batch_begin();
    b.table(NFT_MSG_NEWTABLE, NLM_F_CREATE, table);
    b.table(NFT_MSG_DELTABLE, 0, table);
    b.finish(first_seq)
}

/// A dump request: every table (`GETTABLE`) or every rule (`GETRULE`) of `family`.
fn encode_dump(kind: u16, family: u8, seq: u32) -> Vec<u8> {
    let mut b = Batch::new(seq);
    b.nft(kind, NLM_F_DUMP, family);
    b.close();
    b.b
}

/// Splits a datagram into (type, seq, payload) messages, stopping at anything inconsistent.
pub fn messages(b: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
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

fn cstr(d: &[u8]) -> String {
    String::from_utf8_lossy(d.split(|c| *c == 0).next().unwrap_or(d)).into_owned()
}

/// The error code of an `NLMSG_ERROR` payload (0: acknowledged).
pub fn decode_ack(payload: &[u8]) -> i32 {
    payload.get(0..4).map_or(-libc::EPROTO, |b| {
        i32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    })
}

/// (family, name) of a `NEWTABLE` message as a table dump returns it.
pub fn decode_table(payload: &[u8]) -> Option<(u8, String)> {
    let family = *payload.first()?;
    let name = attrs(payload.get(4..)?)
        .find(|(k, _)| *k == NFTA_TABLE_NAME)?
        .1;
    Some((family, cstr(name)))
}

/// A rule of a rule dump: its family, table, chain and expression names in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub family: u8,
    pub table: String,
    pub chain: String,
    pub exprs: Vec<String>,
}

pub fn decode_rule(payload: &[u8]) -> Option<RuleInfo> {
    let mut r = RuleInfo {
        family: *payload.first()?,
        table: String::new(),
        chain: String::new(),
        exprs: Vec::new(),
    };
    for (k, d) in attrs(payload.get(4..)?) {
        match k {
            NFTA_RULE_TABLE => r.table = cstr(d),
            NFTA_RULE_CHAIN => r.chain = cstr(d),
            NFTA_RULE_EXPRESSIONS => {
                for (_, e) in attrs(d) {
                    if let Some((_, n)) = attrs(e).find(|(k, _)| *k == NFTA_EXPR_NAME) {
                        r.exprs.push(cstr(n));
                    }
                }
            }
            _ => {}
        }
    }
    Some(r)
}

fn ctx(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A `NETLINK_NETFILTER` socket, bound to the network namespace it was opened in (so a
/// teardown from any thread reaches the same tables).
pub struct Nft {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Nft {
    /// In the calling thread's network namespace.
    pub fn open() -> io::Result<Nft> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(ctx(io::Error::last_os_error(), "netfilter netlink socket"));
        }
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A kernel that never answers must not hang the worker's start.
        let tv = libc::timeval {
            tv_sec: Duration::from_secs(5).as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: tv is a live timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc != 0 {
            return Err(ctx(io::Error::last_os_error(), "netfilter socket timeout"));
        }
        Ok(Nft {
            fd,
            seq: 1,
            buf: vec![0u8; 64 * 1024],
        })
    }

    fn next_seq(&mut self, n: u32) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n);
        s
    }

    fn send(&mut self, b: &[u8]) -> io::Result<()> {
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
        Ok(())
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

    /// Sends a batch and waits until every message in `acks` is acknowledged or one fails
    /// (the kernel then rolls the whole batch back).
    fn transact(&mut self, b: &[u8], acks: std::ops::Range<u32>, first: u32) -> io::Result<()> {
        self.send(b)?;
        let mut pending = acks.len();
        while pending > 0 {
            let n = self.recv()?;
            for (kind, seq, payload) in messages(&self.buf[..n]) {
                if kind != NLMSG_ERROR || !(seq == first || acks.contains(&seq)) {
                    continue;
                }
                let code = decode_ack(payload);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                pending = pending.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Installs (or replaces, atomically) the masquerade table.
    pub fn replace(&mut self, m: &Masquerade) -> io::Result<()> {
        check(m)?;
        let first = self.next_seq(8);
        let (b, acks) = encode_replace(m, first);
        self.transact(&b, acks, first)
            .map_err(|e| ctx(e, &format!("install nf_tables table ip {}", m.table)))
    }

    /// Deletes the table; fine if it is not there.
    pub fn remove(&mut self, table: &str) -> io::Result<()> {
        let first = self.next_seq(4);
        let (b, acks) = encode_remove(table, first);
        self.transact(&b, acks, first)
            .map_err(|e| ctx(e, &format!("delete nf_tables table ip {table}")))
    }

    fn dump<T>(
        &mut self,
        kind: u16,
        family: u8,
        mut each: impl FnMut(&[u8]) -> Option<T>,
    ) -> io::Result<Vec<T>> {
        let seq = self.next_seq(1);
        let req = encode_dump(kind, family, seq);
        self.send(&req)?;
        let mut out = Vec::new();
        loop {
            let n = self.recv()?;
            for (k, s, payload) in messages(&self.buf[..n]) {
                if s != seq {
                    continue;
                }
                match k {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = decode_ack(payload);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                    }
                    _ => out.extend(each(payload)),
                }
            }
        }
    }

    /// (family, name) of every nf_tables table in this namespace.
    pub fn tables(&mut self) -> io::Result<Vec<(u8, String)>> {
        self.dump(NFT_MSG_GETTABLE, 0, decode_table)
            .map_err(|e| ctx(e, "list nf_tables tables"))
    }

    /// Every IPv4 rule in this namespace (the test's view of what we installed).
    pub fn rules(&mut self) -> io::Result<Vec<RuleInfo>> {
        self.dump(NFT_MSG_GETRULE, NFPROTO_IPV4, decode_rule)
            .map_err(|e| ctx(e, "list nf_tables rules"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masq() -> Masquerade {
        Masquerade {
            table: "oakestra".into(),
            subnet: Ipv4Addr::new(10, 18, 0, 64),
            prefix: 26,
            exclude: OVERLAY,
            bridge: Some("goProxyBridge".into()),
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The `NEWRULE` payload (nfgenmsg and attributes) that nftables 1.0.6 sends for
    /// `add rule ip oakestra postrouting ip saddr 10.18.0.64/26 ip daddr != 10.16.0.0/12
    /// oifname != "goProxyBridge" masquerade`, reassembled from `nft --debug=mnl`.
    const NFT_106_RULE: &[&str] = &[
        "020000000d0001006f616b65737472610000000010000200706f7374726f7574696e6700bc010480340001800c000100",
        "7061796c6f6164002400028008000100000000010800020000000001080003000000000c080004000000000444000180",
        "0c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100",
        "ffffffc00c00058008000100000000002c00018008000100636d70002000028008000100000000010800020000000000",
        "0c000380080001000a120040340001800c0001007061796c6f6164002400028008000100000000010800020000000001",
        "08000300000000100800040000000004440001800c000100626974776973650034000280080001000000000108000200",
        "0000000108000300000000040c00048008000100fff000000c00058008000100000000002c00018008000100636d7000",
        "20000280080001000000000108000200000000010c000380080001000a10000024000180090001006d65746100000000",
        "14000280080002000000000708000100000000013800018008000100636d70002c000280080001000000000108000200",
        "000000011800038014000100676f50726f787942726964676500000014000180090001006d6173710000000004000280",
    ];

    #[test]
    fn rule_bytes_match_what_nft_sends() {
        let (b, _) = encode_replace(&masq(), 100);
        let rule = messages(&b)
            .find(|(k, _, _)| *k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE)
            .expect("a NEWRULE message");
        assert_eq!(hex(rule.2), NFT_106_RULE.concat());
    }

    #[test]
    fn replace_is_one_batch_that_recreates_the_table() {
        let (b, acks) = encode_replace(&masq(), 100);
        let msgs: Vec<(u16, u32, &[u8])> = messages(&b).collect();
        let n = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
        let kinds: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            kinds,
            [
                NFNL_MSG_BATCH_BEGIN,
                n(NFT_MSG_NEWTABLE),
                n(NFT_MSG_DELTABLE),
                n(NFT_MSG_NEWTABLE),
                n(NFT_MSG_NEWCHAIN),
                n(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END
            ]
        );
        let seqs: Vec<u32> = msgs.iter().map(|m| m.1).collect();
        assert_eq!(seqs, (100..107).collect::<Vec<_>>());
        assert_eq!(acks, 101..106, "all but begin and end are acknowledged");
        // the batch markers name the nf_tables subsystem, big-endian
        assert_eq!(msgs[0].2, [0, 0, 0, 10]);
        assert_eq!(msgs[6].2, [0, 0, 0, 10]);
        let flags = |i: usize| u16::from_ne_bytes([b_at(&b, i)[6], b_at(&b, i)[7]]);
        fn b_at(b: &[u8], i: usize) -> &[u8] {
            let mut off = 0;
            for _ in 0..i {
                let len = u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
                off += len as usize;
            }
            &b[off..]
        }
        assert_eq!(flags(1), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        assert_eq!(flags(2), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(
            flags(5),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
        );
        for m in &msgs[1..4] {
            assert_eq!(decode_table(m.2), Some((NFPROTO_IPV4, "oakestra".into())));
        }
        // the chain: table, name, hook postrouting at priority 100, type nat
        let chain: Vec<(u16, Vec<u8>)> = attrs(&msgs[4].2[4..])
            .map(|(k, d)| (k, d.to_vec()))
            .collect();
        assert_eq!(chain[0], (NFTA_CHAIN_TABLE, b"oakestra\0".to_vec()));
        assert_eq!(chain[1], (NFTA_CHAIN_NAME, b"postrouting\0".to_vec()));
        let hook: Vec<(u16, &[u8])> = attrs(&chain[2].1).collect();
        assert_eq!(chain[2].0, NFTA_CHAIN_HOOK);
        assert_eq!(
            hook,
            [
                (NFTA_HOOK_HOOKNUM, &[0u8, 0, 0, 4][..]),
                (NFTA_HOOK_PRIORITY, &[0u8, 0, 0, 100][..])
            ]
        );
        assert_eq!(chain[3], (NFTA_CHAIN_TYPE, b"nat\0".to_vec()));
        let rule = decode_rule(msgs[5].2).unwrap();
        assert_eq!(
            (rule.family, rule.table.as_str(), rule.chain.as_str()),
            (NFPROTO_IPV4, "oakestra", "postrouting")
        );
        assert_eq!(
            rule.exprs,
            ["payload", "bitwise", "cmp", "payload", "bitwise", "cmp", "meta", "cmp", "masq"]
        );
        assert_eq!(b.len(), msgs.iter().map(|m| 16 + m.2.len()).sum::<usize>());
    }

    #[test]
    fn without_a_bridge_and_with_a_host_prefix() {
        let mut m = masq();
        m.bridge = None;
        m.prefix = 32;
        let (b, _) = encode_replace(&m, 1);
        let rule = messages(&b)
            .find_map(|(k, _, p)| (k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE).then_some(p))
            .and_then(decode_rule)
            .unwrap();
        assert_eq!(
            rule.exprs,
            ["payload", "cmp", "payload", "bitwise", "cmp", "masq"]
        );
    }

    #[test]
    fn remove_adds_then_deletes_so_a_missing_table_is_fine() {
        let (b, acks) = encode_remove("t1", 7);
        let kinds: Vec<(u16, u32)> = messages(&b).map(|m| (m.0, m.1)).collect();
        let n = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
        assert_eq!(
            kinds,
            [
                (NFNL_MSG_BATCH_BEGIN, 7),
                (n(NFT_MSG_NEWTABLE), 8),
                (n(NFT_MSG_DELTABLE), 9),
                (NFNL_MSG_BATCH_END, 10)
            ]
        );
        assert_eq!(acks, 8..10);
    }

    #[test]
    fn decoders_survive_garbage() {
        assert_eq!(decode_ack(&[1]), -libc::EPROTO);
        assert_eq!(decode_ack(&(-17i32).to_ne_bytes()), -17);
        assert_eq!(decode_table(&[]), None);
        assert!(decode_rule(&[2, 0, 0, 0, 0xff, 0xff, 1, 0])
            .unwrap()
            .exprs
            .is_empty());
        assert_eq!(messages(&[20, 0, 0, 0, 2, 0]).count(), 0);
        // a length that runs past the end stops the walk
        let mut m = vec![0u8; 16];
        m[0] = 200;
        assert_eq!(messages(&m).count(), 0);
    }

    #[test]
    fn masks_and_networks() {
        assert_eq!(mask(26), [255, 255, 255, 192]);
        assert_eq!(mask(12), [255, 240, 0, 0]);
        assert_eq!(mask(0), [0; 4]);
        assert_eq!(mask(32), [255; 4]);
        assert_eq!(network(Ipv4Addr::new(10, 18, 0, 65), 26), [10, 18, 0, 64]);
    }

    #[test]
    fn check_rejects_what_the_kernel_would() {
        assert!(check(&masq()).is_ok());
        let mut m = masq();
        m.bridge = Some("a-very-long-bridge".into());
        assert!(check(&m).is_err());
        let mut m = masq();
        m.table = String::new();
        assert!(check(&m).is_err());
        let mut m = masq();
        m.prefix = 33;
        assert!(check(&m).is_err());
    }
}
