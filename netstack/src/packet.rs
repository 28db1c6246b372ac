//! IPv4, TCP, UDP and ICMP header parsing and in-place address rewriting on caller-owned
//! buffers. Every length is checked before use, so hostile bytes give a [`Malformed`] reason,
//! never a panic. It neither allocates nor keeps state; IPv6 is not parsed (yet).

use crate::checksum;
use std::net::Ipv4Addr;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// Why a packet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Fewer than 20 bytes, or fewer than the header length says.
    TruncatedIpHeader,
    NotIpv4,
    /// IHL below 5 words.
    BadIhl,
    /// Total length smaller than the header or larger than the bytes received.
    BadTotalLength,
    /// A first fragment (or whole datagram) too short for its transport header.
    TruncatedL4Header,
    /// TCP data offset or UDP length inconsistent with the packet.
    BadL4Length,
}

/// What the engine needs from an IPv4 header; a copy, so the buffer can be rewritten freely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Header length in bytes (IHL × 4).
    pub header_len: usize,
    /// Total length field; bytes past it (link padding) are not part of the packet.
    pub total_len: usize,
    pub id: u16,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

impl Ipv4Header {
    pub fn is_fragment(&self) -> bool {
        self.more_fragments || self.frag_offset != 0
    }
    /// True when this packet holds the transport header (unfragmented or first fragment).
    pub fn has_l4_header(&self) -> bool {
        self.frag_offset == 0
    }
}

pub fn parse_ipv4(pkt: &[u8]) -> Result<Ipv4Header, Malformed> {
    if pkt.len() < 20 {
        return Err(if pkt.first().is_some_and(|b| b >> 4 != 4) {
            Malformed::NotIpv4
        } else {
            Malformed::TruncatedIpHeader
        });
    }
    if pkt[0] >> 4 != 4 {
        return Err(Malformed::NotIpv4);
    }
    let header_len = usize::from(pkt[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(Malformed::BadIhl);
    }
    if header_len > pkt.len() {
        return Err(Malformed::TruncatedIpHeader);
    }
    let total_len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if total_len < header_len || total_len > pkt.len() {
        return Err(Malformed::BadTotalLength);
    }
    let flags_frag = u16::from_be_bytes([pkt[6], pkt[7]]);
    Ok(Ipv4Header {
        header_len,
        total_len,
        id: u16::from_be_bytes([pkt[4], pkt[5]]),
        dont_fragment: flags_frag & 0x4000 != 0,
        more_fragments: flags_frag & 0x2000 != 0,
        frag_offset: flags_frag & 0x1fff,
        ttl: pkt[8],
        proto: pkt[9],
        src: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        dst: Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
    })
}

/// The transport part of a flow key: ports for TCP/UDP, the echo identifier for ICMP echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP or UDP ports.
    Ports { src: u16, dst: u16 },
    /// ICMP echo request or reply; the identifier plays the part of the local port on both
    /// sides, since request and reply carry the same one.
    Echo { request: bool, ident: u16 },
    /// An ICMP error (destination unreachable, time exceeded, …): carries another packet.
    IcmpError { icmp_type: u8 },
    /// Other ICMP types, and other protocols.
    Other,
}

/// Reads the transport header of a packet that has one (see [`Ipv4Header::has_l4_header`]).
pub fn parse_l4(pkt: &[u8], h: &Ipv4Header) -> Result<L4, Malformed> {
    let l4 = pkt
        .get(h.header_len..h.total_len)
        .ok_or(Malformed::BadTotalLength)?;
    match h.proto {
        PROTO_TCP => {
            if l4.len() < 20 {
                return Err(Malformed::TruncatedL4Header);
            }
            let data_off = usize::from(l4[12] >> 4) * 4;
            // A first fragment may end inside the TCP options, but never before offset 20.
            if data_off < 20 || (!h.more_fragments && data_off > l4.len()) {
                return Err(Malformed::BadL4Length);
            }
            Ok(L4::Ports {
                src: u16::from_be_bytes([l4[0], l4[1]]),
                dst: u16::from_be_bytes([l4[2], l4[3]]),
            })
        }
        PROTO_UDP => {
            if l4.len() < 8 {
                return Err(Malformed::TruncatedL4Header);
            }
            let udp_len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
            let bad = udp_len < 8 || (!h.more_fragments && udp_len > l4.len());
            if bad {
                return Err(Malformed::BadL4Length);
            }
            Ok(L4::Ports {
                src: u16::from_be_bytes([l4[0], l4[1]]),
                dst: u16::from_be_bytes([l4[2], l4[3]]),
            })
        }
        PROTO_ICMP => {
            if l4.len() < 8 {
                return Err(Malformed::TruncatedL4Header);
            }
            let ident = u16::from_be_bytes([l4[4], l4[5]]);
            Ok(match l4[0] {
                ICMP_ECHO_REQUEST => L4::Echo {
                    request: true,
                    ident,
                },
                ICMP_ECHO_REPLY => L4::Echo {
                    request: false,
                    ident,
                },
                t @ (ICMP_DEST_UNREACH | 4 | 5 | 11 | 12) => L4::IcmpError { icmp_type: t },
                _ => L4::Other,
            })
        }
        _ => Ok(L4::Other),
    }
}

/// Offset of the transport checksum that covers the IPv4 pseudo-header, if this packet holds
/// it. UDP's "no checksum" (zero) is reported as `None` because there is nothing to update.
fn pseudo_checksum_offset(pkt: &[u8], h: &Ipv4Header) -> Option<usize> {
    if !h.has_l4_header() {
        return None;
    }
    let off = match h.proto {
        PROTO_TCP => h.header_len + 16,
        PROTO_UDP => h.header_len + 6,
        _ => return None,
    };
    let c = pkt.get(off..off + 2)?;
    if h.proto == PROTO_UDP && c == [0, 0] {
        return None;
    }
    Some(off)
}

fn read16(pkt: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([pkt[off], pkt[off + 1]])
}

/// Rewrites source and/or destination address, updating the IPv4 header checksum and the
/// TCP/UDP checksum incrementally (RFC 1624). ICMP has no pseudo-header, so its checksum is
/// unaffected. `h` must come from [`parse_ipv4`] on the same bytes; it is updated too.
pub fn rewrite_addrs(
    pkt: &mut [u8],
    h: &mut Ipv4Header,
    new_src: Option<Ipv4Addr>,
    new_dst: Option<Ipv4Addr>,
) {
    let l4_off = pseudo_checksum_offset(pkt, h);
    let mut ip_c = read16(pkt, 10);
    let mut l4_c = l4_off.map(|o| read16(pkt, o));
    for (field, new) in [(12usize, new_src), (16usize, new_dst)] {
        let Some(new) = new else { continue };
        let old = u32::from_be_bytes([pkt[field], pkt[field + 1], pkt[field + 2], pkt[field + 3]]);
        let new = u32::from(new);
        if old == new {
            continue;
        }
        pkt[field..field + 4].copy_from_slice(&new.to_be_bytes());
        ip_c = checksum::update32(ip_c, old, new);
        l4_c = l4_c.map(|c| checksum::update32(c, old, new));
    }
    pkt[10..12].copy_from_slice(&ip_c.to_be_bytes());
    if let (Some(off), Some(mut c)) = (l4_off, l4_c) {
        if h.proto == PROTO_UDP && c == 0 {
            // RFC 768: a computed zero is sent as all ones; zero means "no checksum".
            c = 0xffff;
        }
        pkt[off..off + 2].copy_from_slice(&c.to_be_bytes());
    }
    if let Some(s) = new_src {
        h.src = s;
    }
    if let Some(d) = new_dst {
        h.dst = d;
    }
}

/// True if the IPv4 header checksum of `pkt` is valid.
pub fn ipv4_checksum_ok(pkt: &[u8], h: &Ipv4Header) -> bool {
    pkt.get(..h.header_len)
        .is_some_and(|hdr| checksum::fold(checksum::sum(hdr, 0)) == 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(total: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[8] = 64;
        h[9] = PROTO_UDP;
        h
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(parse_ipv4(&[]), Err(Malformed::TruncatedIpHeader));
        assert_eq!(parse_ipv4(&[0x60; 40]), Err(Malformed::NotIpv4));
        let mut h = hdr(20);
        h[0] = 0x44;
        assert_eq!(parse_ipv4(&h), Err(Malformed::BadIhl));
        h[0] = 0x46;
        assert_eq!(parse_ipv4(&h), Err(Malformed::TruncatedIpHeader));
        let h = hdr(19);
        assert_eq!(parse_ipv4(&h), Err(Malformed::BadTotalLength));
        let h = hdr(21);
        assert_eq!(parse_ipv4(&h), Err(Malformed::BadTotalLength));
        let h = hdr(20);
        let p = parse_ipv4(&h).unwrap();
        assert_eq!(parse_l4(&h, &p), Err(Malformed::TruncatedL4Header));
    }

    #[test]
    fn udp_length_is_checked() {
        let mut p = [0u8; 28];
        p[..20].copy_from_slice(&hdr(28));
        p[24..26].copy_from_slice(&9u16.to_be_bytes());
        let h = parse_ipv4(&p).unwrap();
        assert_eq!(parse_l4(&p, &h), Err(Malformed::BadL4Length));
        p[24..26].copy_from_slice(&8u16.to_be_bytes());
        assert_eq!(parse_l4(&p, &h), Ok(L4::Ports { src: 0, dst: 0 }));
    }
}

/// The packet quoted inside an ICMP error: its header fields and transport key, as far as
/// the quote goes (RFC 792 guarantees the IP header and 8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    /// Offset of the quoted IP header in the outer packet.
    pub offset: usize,
    pub header_len: usize,
    /// Bytes of the quote present (header included).
    pub available: usize,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Source and destination port, or (identifier, 0) for an ICMP echo.
    pub src_port: u16,
    pub dst_port: u16,
}

/// Parses the quote of an ICMP error packet `pkt` (outer header `h`).
pub fn parse_quoted(pkt: &[u8], h: &Ipv4Header) -> Result<Quoted, Malformed> {
    let offset = h.header_len + 8;
    let q = pkt
        .get(offset..h.total_len)
        .ok_or(Malformed::TruncatedL4Header)?;
    if q.len() < 20 + 8 {
        return Err(Malformed::TruncatedL4Header);
    }
    if q[0] >> 4 != 4 {
        return Err(Malformed::NotIpv4);
    }
    let header_len = usize::from(q[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(Malformed::BadIhl);
    }
    if q.len() < header_len + 8 {
        return Err(Malformed::TruncatedL4Header);
    }
    let l4 = &q[header_len..];
    let proto = q[9];
    let (src_port, dst_port) = match proto {
        PROTO_TCP | PROTO_UDP => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        PROTO_ICMP if matches!(l4[0], ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) => {
            (u16::from_be_bytes([l4[4], l4[5]]), 0)
        }
        _ => return Err(Malformed::BadL4Length),
    };
    Ok(Quoted {
        offset,
        header_len,
        available: q.len(),
        proto,
        src: Ipv4Addr::new(q[12], q[13], q[14], q[15]),
        dst: Ipv4Addr::new(q[16], q[17], q[18], q[19]),
        src_port,
        dst_port,
    })
}

/// Rewrites the quoted packet's addresses (its IP checksum and, when quoted, its TCP/UDP
/// checksum incrementally), then recomputes the ICMP checksum over the whole message. The
/// outer header is not touched.
pub fn rewrite_quoted(
    pkt: &mut [u8],
    h: &Ipv4Header,
    q: &mut Quoted,
    new_src: Option<Ipv4Addr>,
    new_dst: Option<Ipv4Addr>,
) {
    let base = q.offset;
    let l4 = base + q.header_len;
    let l4_csum = match q.proto {
        PROTO_TCP if q.available >= q.header_len + 18 => Some(l4 + 16),
        PROTO_UDP if pkt[l4 + 6..l4 + 8] != [0, 0] => Some(l4 + 6),
        _ => None,
    };
    let mut ip_c = read16(pkt, base + 10);
    let mut l4_c = l4_csum.map(|o| read16(pkt, o));
    for (field, new) in [(base + 12, new_src), (base + 16, new_dst)] {
        let Some(new) = new else { continue };
        let old = u32::from_be_bytes([pkt[field], pkt[field + 1], pkt[field + 2], pkt[field + 3]]);
        let new = u32::from(new);
        pkt[field..field + 4].copy_from_slice(&new.to_be_bytes());
        ip_c = checksum::update32(ip_c, old, new);
        l4_c = l4_c.map(|c| checksum::update32(c, old, new));
    }
    pkt[base + 10..base + 12].copy_from_slice(&ip_c.to_be_bytes());
    if let (Some(o), Some(c)) = (l4_csum, l4_c) {
        let c = if q.proto == PROTO_UDP && c == 0 {
            0xffff
        } else {
            c
        };
        pkt[o..o + 2].copy_from_slice(&c.to_be_bytes());
    }
    if let Some(s) = new_src {
        q.src = s;
    }
    if let Some(d) = new_dst {
        q.dst = d;
    }
    // ICMP errors are rare and at most a few hundred bytes: recompute rather than track.
    let icmp = h.header_len;
    pkt[icmp + 2..icmp + 4].fill(0);
    let c = checksum::checksum(&pkt[icmp..h.total_len]);
    pkt[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
}
