//! The TUN device's offloads done in userspace. With `IFF_VNET_HDR` and TSO4 offered, the
//! kernel hands the data plane one TCP "super-segment" of up to 64 KiB per read instead of
//! ~45 MTU-sized packets, which saves the per-packet cost of the kernel's TCP/IP stack on the
//! sending instance's side; [`Segmenter`] cuts it into the MTU-sized packets the tunnel carries
//! (the wire format stays one ordinary IPv4 packet per datagram). On the receiving side,
//! [`Coalescer`] merges consecutive segments of one TCP flow back into one super-segment
//! written with a GSO header, so the receiving instance's stack also sees few large packets.
//!
//! Everything works on caller-owned buffers: nothing here allocates after construction.

use crate::checksum;

/// `struct virtio_net_hdr` without the `num_buffers` field (what TUN uses by default).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum holds only the pseudo-header sum.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_ECN`, or-ed into the type.
pub const GSO_ECN: u8 = 0x80;
/// Largest IPv4 packet, and so largest super-segment.
pub const MAX_SUPER: usize = 65535;
/// Segments per coalesced write: the kernel's GSO segment limit for one skb is 64 on older
/// kernels, and runs are rarely longer anyway.
pub const MAX_COALESCE: usize = 64;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// The virtio-net header in host byte order (TUN in legacy mode uses native endianness).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Why a packet from the TUN device could not be processed as the header described.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoError {
    /// Checksum offsets outside the packet.
    BadCsumOffsets,
    /// A GSO type we did not offer (only TSO4 is).
    UnsupportedType,
    /// Not a well-formed IPv4/TCP packet without options in the IP header bounds.
    BadTcp4,
    BadGsoSize,
}

/// Completes a checksum the kernel left partial (`F_NEEDS_CSUM`): the field at
/// `start + offset` holds the pseudo-header sum, the rest is summed here, as the NIC would.
pub fn finish_csum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), GsoError> {
    let at = start + offset;
    if start >= pkt.len() || at + 2 > pkt.len() {
        return Err(GsoError::BadCsumOffsets);
    }
    let c = !checksum::fold(checksum::sum(&pkt[start..], 0));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Cuts a TCPv4 super-segment into packets of at most `mss` payload bytes, each a complete
/// packet with its own IP id, length, sequence number and checksums, as the NIC would have.
#[derive(Debug, Clone, Copy)]
pub struct Segmenter {
    ihl: usize,
    hl: usize,
    payload: usize,
    mss: usize,
    id: u16,
    seq: u32,
    flags: u8,
}

impl Segmenter {
    pub fn new(pkt: &[u8], mss: u16) -> Result<Segmenter, GsoError> {
        if pkt.len() < 40 || pkt[0] >> 4 != 4 || pkt[9] != 6 {
            return Err(GsoError::BadTcp4);
        }
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
        // fragment offset and MF must be clear: a super-segment is never a fragment
        let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff;
        if ihl < 20 || total != pkt.len() || frag != 0 || pkt.len() < ihl + 20 {
            return Err(GsoError::BadTcp4);
        }
        let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
        let hl = ihl + thl;
        if thl < 20 || hl > pkt.len() {
            return Err(GsoError::BadTcp4);
        }
        if mss == 0 {
            return Err(GsoError::BadGsoSize);
        }
        let t = ihl;
        Ok(Segmenter {
            ihl,
            hl,
            payload: pkt.len() - hl,
            mss: usize::from(mss),
            id: u16::from_be_bytes([pkt[4], pkt[5]]),
            seq: u32::from_be_bytes([pkt[t + 4], pkt[t + 5], pkt[t + 6], pkt[t + 7]]),
            flags: pkt[t + 13],
        })
    }

    pub fn count(&self) -> usize {
        self.payload.div_ceil(self.mss).max(1)
    }

    /// Length of segment `i`.
    pub fn len(&self, i: usize) -> usize {
        self.hl + self.mss.min(self.payload.saturating_sub(i * self.mss))
    }

    pub fn is_empty(&self) -> bool {
        self.payload == 0
    }

    /// Writes segment `i` of `pkt` into `out` (at least [`Segmenter::len`] bytes); returns
    /// its length.
    pub fn write(&self, pkt: &[u8], i: usize, out: &mut [u8]) -> usize {
        let (hl, p_off, p_len) = self.write_header(pkt, i, out);
        out[hl..hl + p_len].copy_from_slice(&pkt[p_off..p_off + p_len]);
        hl + p_len
    }

    /// Writes the headers of segment `i` into `out` (at least the header length), checksums
    /// included, without copying its payload: returns the header length and where the payload
    /// lies in `pkt` (offset, length), so it can be sent from there.
    pub fn write_header(&self, pkt: &[u8], i: usize, out: &mut [u8]) -> (usize, usize, usize) {
        let off = i * self.mss;
        let chunk = self.mss.min(self.payload.saturating_sub(off));
        let (ihl, hl) = (self.ihl, self.hl);
        let len = hl + chunk;
        let payload = &pkt[hl + off..hl + off + chunk];
        out[..hl].copy_from_slice(&pkt[..hl]);
        // IP: length, id (one per segment, as the kernel's TSO does), checksum
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        out[4..6].copy_from_slice(&self.id.wrapping_add(i as u16).to_be_bytes());
        out[10..12].fill(0);
        let c = checksum::checksum(&out[..ihl]);
        out[10..12].copy_from_slice(&c.to_be_bytes());
        // TCP: sequence, flags (FIN and PSH only on the last, CWR only on the first), checksum
        let t = ihl;
        out[t + 4..t + 8].copy_from_slice(&self.seq.wrapping_add(off as u32).to_be_bytes());
        let mut flags = self.flags;
        if i + 1 < self.count() {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        out[t + 13] = flags;
        out[t + 16..t + 18].fill(0);
        let src = [out[12], out[13], out[14], out[15]];
        let dst = [out[16], out[17], out[18], out[19]];
        let ps = checksum::pseudo_header_sum(src, dst, 6, (len - ihl) as u16);
        // the TCP header's length is a multiple of 4: the payload's words line up after it
        let c = !checksum::fold(checksum::sum(payload, checksum::sum(&out[t..hl], ps)));
        out[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        (hl, hl + off, chunk)
    }
}

/// The TCP/IPv4 fields a segment must share with the run it joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunKey {
    tos: u8,
    df: u8,
    ttl: u8,
    src: [u8; 4],
    dst: [u8; 4],
    ports: [u8; 4],
    ack: [u8; 4],
    window: [u8; 2],
    thl: u8,
}

/// Merges consecutive in-order segments of one TCP flow into one super-segment with a GSO
/// header for a single TUN write (the receive-side counterpart of [`Segmenter`], like the
/// kernel's GRO). Only plain ACK segments with equal payload sizes (the last may be shorter or
/// carry PSH), identical TCP options and a valid checksum join; anything else is written alone.
pub struct Coalescer {
    /// `VNET_HDR_LEN` bytes of header room, then the packet being built.
    buf: Box<[u8]>,
    used: usize,
    segs: usize,
    mss: usize,
    key: Option<RunKey>,
    next_seq: u32,
    /// The last segment carried PSH or was shorter than the first: the run is closed.
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new()
    }
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer {
            buf: vec![0u8; VNET_HDR_LEN + MAX_SUPER].into_boxed_slice(),
            used: 0,
            segs: 0,
            mss: 0,
            key: None,
            next_seq: 0,
            closed: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segs == 0
    }

    pub fn segments(&self) -> usize {
        self.segs
    }

    /// Adds `pkt` to the run. `false`: it does not continue the run (or cannot be coalesced
    /// at all); the caller writes out [`Coalescer::take`] if not empty, then tries again or
    /// writes `pkt` on its own.
    pub fn push(&mut self, pkt: &[u8]) -> bool {
        let Some((key, seq, flags, payload)) = coalescable(pkt) else {
            return false;
        };
        let hl = 20 + usize::from(key.thl) * 4;
        if self.segs == 0 {
            self.buf[VNET_HDR_LEN..VNET_HDR_LEN + pkt.len()].copy_from_slice(pkt);
            self.used = pkt.len();
            self.segs = 1;
            self.mss = payload;
            self.key = Some(key);
            self.next_seq = seq.wrapping_add(payload as u32);
            self.closed = flags & TCP_PSH != 0;
            return true;
        }
        let first = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + hl];
        if self.closed
            || self.key != Some(key)
            || seq != self.next_seq
            || payload > self.mss
            || self.segs >= MAX_COALESCE
            || self.used + payload > MAX_SUPER
            // TCP options (timestamps) must match byte for byte, as GRO requires
            || first[40..hl] != pkt[40..hl]
        {
            return false;
        }
        let at = VNET_HDR_LEN + self.used;
        self.buf[at..at + payload].copy_from_slice(&pkt[hl..hl + payload]);
        self.used += payload;
        self.segs += 1;
        self.next_seq = seq.wrapping_add(payload as u32);
        self.closed = flags & TCP_PSH != 0 || payload < self.mss;
        // the merged packet carries the flags of its last segment (PSH)
        self.buf[VNET_HDR_LEN + 33] = flags;
        true
    }

    /// The frame to write to the TUN device (virtio header and packet); empties the run.
    pub fn take(&mut self) -> &[u8] {
        let segs = std::mem::take(&mut self.segs);
        let used = self.used;
        let Some(key) = self.key.take() else {
            return &[];
        };
        let hl = 20 + usize::from(key.thl) * 4;
        let hdr = if segs == 1 {
            VnetHdr::default()
        } else {
            let p = &mut self.buf[VNET_HDR_LEN..VNET_HDR_LEN + used];
            p[2..4].copy_from_slice(&(used as u16).to_be_bytes());
            p[10..12].fill(0);
            let c = checksum::checksum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            // partial checksum: the pseudo-header sum, not complemented; the kernel (or
            // nobody, for local delivery) completes it per segment
            let ps = checksum::pseudo_header_sum(key.src, key.dst, 6, (used - 20) as u16);
            p[36..38].copy_from_slice(&checksum::fold(ps).to_be_bytes());
            VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: hl as u16,
                gso_size: self.mss as u16,
                csum_start: 20,
                csum_offset: 16,
            }
        };
        self.buf[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
        &self.buf[..VNET_HDR_LEN + used]
    }
}

/// The run key, sequence number, flags and payload length of a segment that may join a run:
/// IPv4 without options or fragmentation, TCP with ACK (and at most PSH) and some payload, and
/// a correct TCP checksum (a merged packet is not checked again by the receiving stack).
fn coalescable(pkt: &[u8]) -> Option<(RunKey, u32, u8, usize)> {
    if pkt.len() < 40 || pkt[0] != 0x45 || pkt[9] != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
    if total != pkt.len() || frag & 0x3fff != 0 {
        return None;
    }
    let thl = pkt[32] >> 4;
    let hl = 20 + usize::from(thl) * 4;
    let flags = pkt[33];
    if thl < 5 || hl >= pkt.len() || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    let ps = checksum::pseudo_header_sum(
        [pkt[12], pkt[13], pkt[14], pkt[15]],
        [pkt[16], pkt[17], pkt[18], pkt[19]],
        6,
        (pkt.len() - 20) as u16,
    );
    if checksum::fold(checksum::sum(&pkt[20..], ps)) != 0xffff {
        return None;
    }
    let b4 = |i: usize| [pkt[i], pkt[i + 1], pkt[i + 2], pkt[i + 3]];
    let key = RunKey {
        tos: pkt[1],
        df: pkt[6] & 0x40,
        ttl: pkt[8],
        src: b4(12),
        dst: b4(16),
        ports: b4(20),
        ack: b4(28),
        window: [pkt[34], pkt[35]],
        thl,
    };
    Some((key, u32::from_be_bytes(b4(24)), flags, pkt.len() - hl))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet;

    /// A TCP/IPv4 packet with `payload` bytes, timestamps option, given flags and seq; the
    /// checksums are complete.
    fn tcp(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let thl = 32;
        let len = 20 + thl + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 30, 0, 2]);
        p[16..20].copy_from_slice(&[10, 18, 0, 66]);
        let c = checksum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let t = 20;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&777u32.to_be_bytes());
        p[t + 12] = ((thl / 4) as u8) << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&502u16.to_be_bytes());
        // NOP NOP timestamps
        p[t + 20..t + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7]);
        p[t + thl..].copy_from_slice(payload);
        let ps = checksum::pseudo_header_sum([10, 30, 0, 2], [10, 18, 0, 66], 6, (len - 20) as u16);
        let c = !checksum::fold(checksum::sum(&p[20..], ps));
        p[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn valid(p: &[u8]) -> bool {
        let h = packet::parse_ipv4(p).unwrap();
        let ps =
            checksum::pseudo_header_sum(h.src.octets(), h.dst.octets(), 6, (p.len() - 20) as u16);
        packet::ipv4_checksum_ok(p, &h) && checksum::fold(checksum::sum(&p[20..], ps)) == 0xffff
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn segments_are_complete_packets_that_coalesce_back() {
        let data = payload(10_000);
        let sup = tcp(1000, TCP_ACK | TCP_PSH | TCP_CWR, &data);
        let s = Segmenter::new(&sup, 1398).unwrap();
        assert_eq!(s.count(), 8); // 7 × 1398 + 214
        let mut co = Coalescer::new();
        let mut out = [0u8; 2048];
        let mut got = Vec::new();
        for i in 0..s.count() {
            let n = s.write(&sup, i, &mut out);
            assert_eq!(n, s.len(i));
            let p = &out[..n];
            assert!(valid(p), "segment {i}");
            let flags = p[33];
            assert_eq!(flags & TCP_PSH != 0, i == 7, "PSH only on the last");
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
            assert_eq!(u16::from_be_bytes([p[4], p[5]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
            assert_eq!(seq, 1000 + (i * 1398) as u32);
            got.extend_from_slice(&p[52..]);
            // CWR makes the first one stand alone; the rest merge
            if i == 0 {
                assert!(!co.push(p));
            } else {
                assert!(co.push(p), "segment {i} joins");
            }
        }
        assert_eq!(got, data);
        assert_eq!(co.segments(), 7);
        let frame = co.take().to_vec();
        let h = VnetHdr::parse(&frame).unwrap();
        assert_eq!(
            (
                h.flags,
                h.gso_type,
                h.hdr_len,
                h.gso_size,
                h.csum_start,
                h.csum_offset
            ),
            (F_NEEDS_CSUM, GSO_TCPV4, 52, 1398, 20, 16)
        );
        let p = &frame[VNET_HDR_LEN..];
        assert_eq!(p.len(), 52 + 10_000 - 1398);
        assert_eq!(&p[52..], &data[1398..]);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert!(packet::ipv4_checksum_ok(p, &packet::parse_ipv4(p).unwrap()));
        assert_eq!(p[33], TCP_ACK | TCP_PSH);
        // the partial checksum completes to a valid one, as the kernel would do it
        let mut q = p.to_vec();
        finish_csum(&mut q, 20, 16).unwrap();
        assert!(valid(&q));
        assert!(co.is_empty());
    }

    #[test]
    fn runs_break_on_gaps_other_flows_bad_checksums_and_short_segments() {
        let a = tcp(0, TCP_ACK, &payload(100));
        let gap = tcp(150, TCP_ACK, &payload(100));
        let next = tcp(100, TCP_ACK, &payload(100));
        let short = tcp(200, TCP_ACK, &payload(50));
        let after_short = tcp(250, TCP_ACK, &payload(50));
        let mut co = Coalescer::new();
        assert!(co.push(&a));
        assert!(!co.push(&gap), "sequence gap");
        let mut other = next.clone();
        other[21] ^= 1; // source port
        assert!(
            !co.push(&other),
            "another flow (and its checksum is now wrong)"
        );
        let mut bad = next.clone();
        bad[60] ^= 0xff;
        assert!(!co.push(&bad), "bad checksum");
        assert!(co.push(&next));
        assert!(co.push(&short));
        assert!(!co.push(&after_short), "a short segment ends the run");
        assert_eq!(co.segments(), 3);
        let syn = tcp(0, 0x02, &payload(10));
        co.take();
        assert!(!co.push(&syn), "only plain ACK segments");
        assert!(co.is_empty());
        // one segment alone is written as it is, without GSO
        assert!(co.push(&a));
        let f = co.take();
        assert_eq!(VnetHdr::parse(f).unwrap(), VnetHdr::default());
        assert_eq!(&f[VNET_HDR_LEN..], &a[..]);
    }

    #[test]
    fn header_only_segments_point_at_their_payload() {
        let data = payload(5_000);
        let sup = tcp(77, TCP_ACK | TCP_PSH, &data);
        let s = Segmenter::new(&sup, 1398).unwrap();
        for i in 0..s.count() {
            let mut whole = [0u8; 2048];
            let n = s.write(&sup, i, &mut whole);
            let mut head = [0u8; 64];
            let (hl, off, len) = s.write_header(&sup, i, &mut head);
            assert_eq!((hl, len), (52, n - 52), "segment {i}");
            let mut joined = head[..hl].to_vec();
            joined.extend_from_slice(&sup[off..off + len]);
            assert_eq!(&joined[..], &whole[..n], "segment {i}");
            assert!(valid(&joined));
        }
    }

    #[test]
    fn finish_csum_completes_a_partial_checksum() {
        let mut p = tcp(5, TCP_ACK, &payload(333));
        let ps = checksum::pseudo_header_sum([10, 30, 0, 2], [10, 18, 0, 66], 6, 365);
        p[36..38].copy_from_slice(&checksum::fold(ps).to_be_bytes());
        assert!(!valid(&p));
        finish_csum(&mut p, 20, 16).unwrap();
        assert!(valid(&p));
        assert_eq!(finish_csum(&mut p, 20, 400), Err(GsoError::BadCsumOffsets));
    }

    #[test]
    fn malformed_super_segments_are_refused() {
        let p = tcp(0, TCP_ACK, &payload(3000));
        assert!(Segmenter::new(&p[..p.len() - 1], 1000).is_err());
        assert_eq!(Segmenter::new(&p, 0).unwrap_err(), GsoError::BadGsoSize);
        let mut udp = p.clone();
        udp[9] = 17;
        assert!(Segmenter::new(&udp, 1000).is_err());
        let s = Segmenter::new(&p, 1000).unwrap();
        assert_eq!(s.count(), 3);
        assert_eq!(s.len(2), 52 + 1000);
    }
}
