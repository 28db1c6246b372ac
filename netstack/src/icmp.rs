//! Builds the ICMP errors the engine originates (fragmentation needed, destination
//! unreachable) in place, in the buffer that holds the offending packet. It does not decide
//! when to send one; the engine does (never about ICMP errors or non-first fragments).

use crate::checksum;
use crate::packet::{Ipv4Header, PROTO_ICMP};
use std::net::Ipv4Addr;

pub const CODE_HOST_UNREACHABLE: u8 = 1;
pub const CODE_FRAG_NEEDED: u8 = 4;

/// RFC 1812 §4.3.2.3: quote as much of the original as fits in a 576-byte error.
const MAX_ERROR_LEN: usize = 576;
const HDRS: usize = 20 + 8;

/// Replaces the packet in `buf` (header `h`) by an ICMP destination-unreachable error about
/// it, sent from `from` to the packet's source. `next_hop_mtu` fills the field RFC 1191 adds
/// for "fragmentation needed". Returns the new length, or `None` if `buf` is too small.
pub fn build_unreachable(
    buf: &mut [u8],
    h: &Ipv4Header,
    code: u8,
    next_hop_mtu: u16,
    from: Ipv4Addr,
) -> Option<usize> {
    let quoted = h.total_len.min(MAX_ERROR_LEN - HDRS);
    let total = HDRS + quoted;
    if buf.len() < total || h.total_len > buf.len() {
        return None;
    }
    buf.copy_within(0..quoted, HDRS);
    let ip = &mut buf[..20];
    ip.copy_from_slice(&[
        0x45, 0xc0, 0, 0, 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&h.src.octets());
    let c = checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut buf[20..total];
    icmp[..8].copy_from_slice(&[3, code, 0, 0, 0, 0, 0, 0]);
    icmp[6..8].copy_from_slice(&next_hop_mtu.to_be_bytes());
    let c = checksum::checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(total)
}
