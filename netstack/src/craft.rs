//! Hand-builds IPv4 TCP/UDP/ICMP packets with correct checksums, and checks checksums from
//! scratch. For tests (unit, allocation, integration) and diagnostics; the data path never
//! uses it.

use crate::checksum;
use crate::packet::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use std::net::Ipv4Addr;

/// Fields of the IPv4 header a test wants to control.
#[derive(Debug, Clone, Copy)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub ttl: u8,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// In 8-byte units.
    pub frag_offset: u16,
}

impl Ip {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Ip {
        Ip {
            src,
            dst,
            id: 0x1234,
            ttl: 63,
            dont_fragment: true,
            more_fragments: false,
            frag_offset: 0,
        }
    }
}

fn ip_header(buf: &mut [u8], ip: &Ip, proto: u8, total: usize) {
    let flags =
        (u16::from(ip.dont_fragment) << 14) | (u16::from(ip.more_fragments) << 13) | ip.frag_offset;
    let h = &mut buf[..20];
    h.copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0, 0, ip.ttl, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&ip.id.to_be_bytes());
    h[6..8].copy_from_slice(&flags.to_be_bytes());
    h[12..16].copy_from_slice(&ip.src.octets());
    h[16..20].copy_from_slice(&ip.dst.octets());
    let c = checksum::checksum(h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

fn l4_checksum(buf: &mut [u8], ip: &Ip, proto: u8, total: usize, at: usize) {
    let l4 = &buf[20..total];
    let ps = checksum::pseudo_header_sum(ip.src.octets(), ip.dst.octets(), proto, l4.len() as u16);
    let mut c = !checksum::fold(checksum::sum(l4, ps));
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    buf[20 + at..20 + at + 2].copy_from_slice(&c.to_be_bytes());
}

/// A TCP segment (20-byte header, `flags` byte as on the wire, e.g. 0x02 = SYN).
pub fn tcp(buf: &mut [u8], ip: &Ip, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> usize {
    let total = 40 + payload.len();
    buf[20..40].fill(0);
    buf[20..22].copy_from_slice(&sport.to_be_bytes());
    buf[22..24].copy_from_slice(&dport.to_be_bytes());
    buf[24..28].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    buf[32] = 5 << 4;
    buf[33] = flags;
    buf[34..36].copy_from_slice(&64240u16.to_be_bytes());
    buf[40..total].copy_from_slice(payload);
    ip_header(buf, ip, PROTO_TCP, total);
    l4_checksum(buf, ip, PROTO_TCP, total, 16);
    total
}

pub fn udp(buf: &mut [u8], ip: &Ip, sport: u16, dport: u16, payload: &[u8]) -> usize {
    let total = 28 + payload.len();
    buf[20..22].copy_from_slice(&sport.to_be_bytes());
    buf[22..24].copy_from_slice(&dport.to_be_bytes());
    buf[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    buf[26..28].fill(0);
    buf[28..total].copy_from_slice(payload);
    ip_header(buf, ip, PROTO_UDP, total);
    l4_checksum(buf, ip, PROTO_UDP, total, 6);
    total
}

pub fn icmp_echo(
    buf: &mut [u8],
    ip: &Ip,
    request: bool,
    ident: u16,
    seq: u16,
    payload: &[u8],
) -> usize {
    let total = 28 + payload.len();
    buf[20] = if request { 8 } else { 0 };
    buf[21] = 0;
    buf[22..24].fill(0);
    buf[24..26].copy_from_slice(&ident.to_be_bytes());
    buf[26..28].copy_from_slice(&seq.to_be_bytes());
    buf[28..total].copy_from_slice(payload);
    ip_header(buf, ip, PROTO_ICMP, total);
    let c = checksum::checksum(&buf[20..total]);
    buf[22..24].copy_from_slice(&c.to_be_bytes());
    total
}

/// A raw IP packet with `payload` after the header (for fragments).
pub fn raw(buf: &mut [u8], ip: &Ip, proto: u8, payload: &[u8]) -> usize {
    let total = 20 + payload.len();
    buf[20..total].copy_from_slice(payload);
    ip_header(buf, ip, proto, total);
    total
}

pub fn ip_checksum_ok(pkt: &[u8]) -> bool {
    let ihl = usize::from(pkt[0] & 0xf) * 4;
    checksum::fold(checksum::sum(&pkt[..ihl], 0)) == 0xffff
}

/// Verifies the TCP/UDP (with pseudo-header) or ICMP checksum of an unfragmented packet.
pub fn l4_checksum_ok(pkt: &[u8]) -> bool {
    let ihl = usize::from(pkt[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    let l4 = &pkt[ihl..total];
    let src = [pkt[12], pkt[13], pkt[14], pkt[15]];
    let dst = [pkt[16], pkt[17], pkt[18], pkt[19]];
    match pkt[9] {
        PROTO_ICMP => checksum::fold(checksum::sum(l4, 0)) == 0xffff,
        PROTO_UDP if l4[6] == 0 && l4[7] == 0 => true,
        p => {
            let ps = checksum::pseudo_header_sum(src, dst, p, l4.len() as u16);
            checksum::fold(checksum::sum(l4, ps)) == 0xffff
        }
    }
}

pub fn src(pkt: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15])
}
pub fn dst(pkt: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19])
}
/// Source and destination port of a TCP/UDP packet with a 20-byte IP header.
pub fn ports(pkt: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([pkt[20], pkt[21]]),
        u16::from_be_bytes([pkt[22], pkt[23]]),
    )
}

/// An ICMP error (`icmp_type`/`code`) quoting `quoted` (an IP packet or its first bytes).
pub fn icmp_error(buf: &mut [u8], ip: &Ip, icmp_type: u8, code: u8, quoted: &[u8]) -> usize {
    let total = 28 + quoted.len();
    buf[20] = icmp_type;
    buf[21] = code;
    buf[22..28].fill(0);
    buf[28..total].copy_from_slice(quoted);
    ip_header(buf, ip, PROTO_ICMP, total);
    let c = checksum::checksum(&buf[20..total]);
    buf[22..24].copy_from_slice(&c.to_be_bytes());
    total
}
