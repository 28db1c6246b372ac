//! The tunnel socket's batched I/O: `recvmmsg`/`sendmmsg` over preallocated slot arrays, with
//! UDP GSO (`UDP_SEGMENT`) on the sending side and UDP GRO on the receiving side when the
//! kernel offers them. One syscall then moves up to a few dozen tunnel datagrams; on the wire
//! each datagram still carries exactly one inner packet (the kernel or NIC splits GSO sends).
//!
//! The `mmsghdr`/`iovec` arrays hold raw pointers into the slots, so they are built on the
//! stack for each call rather than stored (a few KiB, no allocation, and the queue stays
//! `Send` to move into the data-plane thread).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

pub const SOL_UDP: i32 = 17;
pub const UDP_SEGMENT: i32 = 103;
pub const UDP_GRO: i32 = 104;

/// Datagrams per `sendmmsg` batch (and tunnel packets queued before a flush).
pub const TX_CAP: usize = 64;
/// Datagrams per `recvmmsg` call. Each slot holds the largest UDP payload, since a GRO
/// datagram (or a peer's unfragmented-inside, fragmented-outside packet) can be that long.
pub const RX_CAP: usize = 16;
pub const RX_SLOT: usize = 65536;
/// Segments per GSO send: the kernel's limit on older kernels is 64.
const GSO_MAX_SEGS: usize = 64;
/// Payload bytes per GSO send: a UDP datagram's payload must fit in 65507 bytes.
const GSO_MAX_BYTES: usize = 65507;

/// Room for one `cmsghdr` with a 4-byte payload, 8-aligned (`CMSG_SPACE(4)` on 64-bit).
type CmsgBuf = [u64; 3];
const CMSG_HDR: usize = size_of::<libc::cmsghdr>();

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut s: libc::sockaddr_in = unsafe { zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

/// Tunnel packets waiting to be sent, each in its own slot, so the engine translates them in
/// place and consecutive ones to the same peer go out as one GSO send.
///
/// A queued packet may also end in a *tail*: bytes outside the slot, in a buffer the caller
/// hands to [`TxQueue::flush`] (the payload of a TCP super-segment still in the TUN read
/// buffer, so only the rewritten headers are written into slots and the payload is never copied
/// in userspace). Tails are offsets, not pointers: a wrong buffer sends wrong bytes, never
/// touches memory it should not.
pub struct TxQueue {
    slots: Box<[u8]>,
    slot_len: usize,
    /// Whole datagram length (slot part and tail).
    lens: [usize; TX_CAP],
    /// Offset and length of the tail in the flush's tail buffer (length 0: none).
    tails: [(usize, usize); TX_CAP],
    peers: [SocketAddrV4; TX_CAP],
    n: usize,
    gso: bool,
}

/// What a flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    pub dropped: usize,
    pub syscalls: usize,
    /// GSO sends failed (path MTU below the inner size, no checksum offload…): GSO is now off
    /// and the packets went out one per datagram.
    pub gso_failed: bool,
}

impl TxQueue {
    pub fn new(slot_len: usize, gso: bool) -> TxQueue {
        TxQueue {
            slots: vec![0u8; slot_len * TX_CAP].into_boxed_slice(),
            slot_len,
            lens: [0; TX_CAP],
            tails: [(0, 0); TX_CAP],
            peers: [SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0); TX_CAP],
            n: 0,
            gso,
        }
    }

    pub fn gso(&self) -> bool {
        self.gso
    }
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn is_full(&self) -> bool {
        self.n == TX_CAP
    }
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// The next free slot (the caller flushes first when full). It is queued only by
    /// [`TxQueue::commit`]; until then it is scratch space.
    pub fn next_slot(&mut self) -> &mut [u8] {
        let i = self.n.min(TX_CAP - 1);
        &mut self.slots[i * self.slot_len..(i + 1) * self.slot_len]
    }

    /// Queues the next slot's first `len` bytes for `peer`.
    pub fn commit(&mut self, len: usize, peer: SocketAddrV4) {
        self.commit_with_tail(len, peer, 0, 0);
    }

    /// Queues the next slot's first `head` bytes followed by `tail_len` bytes at `tail_off` of
    /// the buffer the next [`TxQueue::flush`] is given.
    pub fn commit_with_tail(
        &mut self,
        head: usize,
        peer: SocketAddrV4,
        tail_off: usize,
        tail_len: usize,
    ) {
        if self.n < TX_CAP {
            let head = head.min(self.slot_len);
            self.lens[self.n] = head + tail_len;
            self.tails[self.n] = (tail_off, tail_len);
            self.peers[self.n] = peer;
            self.n += 1;
        }
    }

    /// Sends everything queued, tails taken from `tail_buf`. Datagrams the socket refuses
    /// (buffer full) are dropped and counted, as a single `send_to` would have; so are packets
    /// whose tail lies outside `tail_buf`.
    pub fn flush(&mut self, fd: RawFd, tail_buf: &[u8]) -> Flushed {
        let mut out = Flushed::default();
        let mut i = 0;
        while i < self.n {
            // SAFETY: these are plain old data; all-zero is valid.
            let mut hdrs: [libc::mmsghdr; TX_CAP] = unsafe { zeroed() };
            let mut iovs: [libc::iovec; 2 * TX_CAP] = unsafe { zeroed() };
            let mut used = 0;
            let mut names: [libc::sockaddr_in; TX_CAP] = unsafe { zeroed() };
            let mut cmsgs: [CmsgBuf; TX_CAP] = [[0; 3]; TX_CAP];
            let mut pkts_in: [usize; TX_CAP] = [0; TX_CAP];
            let (mut m, mut k) = (0, i);
            let mut any_gso = false;
            while k < self.n {
                let start = k;
                let seg = self.lens[k];
                let mut total = seg;
                k += 1;
                if self.gso {
                    while k < self.n
                        && k - start < GSO_MAX_SEGS
                        && self.peers[k] == self.peers[start]
                        && self.lens[k - 1] == seg
                        && self.lens[k] <= seg
                        && total + self.lens[k] <= GSO_MAX_BYTES
                    {
                        total += self.lens[k];
                        k += 1;
                    }
                }
                let first_iov = used;
                for p in start..k {
                    let (t_off, t_len) = self.tails[p];
                    let head = self.lens[p] - t_len;
                    iovs[used].iov_base = self.slots[p * self.slot_len..].as_mut_ptr().cast();
                    iovs[used].iov_len = head;
                    used += 1;
                    if t_len > 0 {
                        // out of bounds (a caller bug): the datagram goes out short, the peer drops it
                        let tail = tail_buf.get(t_off..t_off + t_len).unwrap_or(&[]);
                        iovs[used].iov_base = tail.as_ptr() as *mut libc::c_void;
                        iovs[used].iov_len = tail.len();
                        used += 1;
                    }
                }
                names[m] = sockaddr(self.peers[start]);
                let h = &mut hdrs[m].msg_hdr;
                h.msg_name = (&mut names[m] as *mut libc::sockaddr_in).cast();
                h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_iov = iovs[first_iov..].as_mut_ptr();
                h.msg_iovlen = used - first_iov;
                if k - start > 1 {
                    any_gso = true;
                    let c = cmsgs[m].as_mut_ptr().cast::<u8>();
                    // SAFETY: the buffer is 24 bytes, 8-aligned: room for the header and a u16.
                    unsafe {
                        let ch = c.cast::<libc::cmsghdr>();
                        (*ch).cmsg_len = libc::CMSG_LEN(2) as _;
                        (*ch).cmsg_level = SOL_UDP;
                        (*ch).cmsg_type = UDP_SEGMENT;
                        c.add(CMSG_HDR).cast::<u16>().write_unaligned(seg as u16);
                    }
                    h.msg_control = c.cast();
                    h.msg_controllen = size_of::<CmsgBuf>() as _;
                }
                pkts_in[m] = k - start;
                m += 1;
            }
            // SAFETY: hdrs[..m] point at live stack arrays and queue slots for the call.
            let rc = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), m as u32, 0) };
            out.syscalls += 1;
            if rc <= 0 {
                let e = io::Error::last_os_error();
                let gso_refused = matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EIO) | Some(libc::ENOPROTOOPT)
                );
                if rc < 0 && any_gso && gso_refused {
                    self.gso = false;
                    out.gso_failed = true;
                    continue;
                }
                out.dropped += self.n - i;
                break;
            }
            let sent: usize = pkts_in[..rc as usize].iter().sum();
            out.sent += sent;
            i += sent;
        }
        self.n = 0;
        out
    }
}

/// One `recvmmsg` worth of tunnel datagrams.
pub struct RxBatch {
    slots: Box<[u8]>,
    lens: [usize; RX_CAP],
    segs: [usize; RX_CAP],
    from: [SocketAddrV4; RX_CAP],
    n: usize,
}

impl Default for RxBatch {
    fn default() -> Self {
        RxBatch::new()
    }
}

impl RxBatch {
    /// The slots are 1 MiB of address space; only pages that datagrams touch become resident.
    pub fn new() -> RxBatch {
        RxBatch {
            slots: vec![0u8; RX_SLOT * RX_CAP].into_boxed_slice(),
            lens: [0; RX_CAP],
            segs: [0; RX_CAP],
            from: [SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0); RX_CAP],
            n: 0,
        }
    }

    /// Receives up to [`RX_CAP`] datagrams without blocking; `Ok(0)` when none is waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: these are plain old data; all-zero is valid.
        let mut hdrs: [libc::mmsghdr; RX_CAP] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; RX_CAP] = unsafe { zeroed() };
        let mut names: [libc::sockaddr_in; RX_CAP] = unsafe { zeroed() };
        let mut cmsgs: [CmsgBuf; RX_CAP] = [[0; 3]; RX_CAP];
        for j in 0..RX_CAP {
            iovs[j].iov_base = self.slots[j * RX_SLOT..].as_mut_ptr().cast();
            iovs[j].iov_len = RX_SLOT;
            let h = &mut hdrs[j].msg_hdr;
            h.msg_name = (&mut names[j] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iovs[j];
            h.msg_iovlen = 1;
            h.msg_control = cmsgs[j].as_mut_ptr().cast();
            h.msg_controllen = size_of::<CmsgBuf>() as _;
        }
        // SAFETY: hdrs point at live stack arrays and our slots for the call's duration.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                RX_CAP as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            self.n = 0;
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let n = rc as usize;
        for j in 0..n {
            let len = (hdrs[j].msg_len as usize).min(RX_SLOT);
            self.lens[j] = len;
            let a = &names[j];
            self.from[j] = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            );
            let h = &hdrs[j].msg_hdr;
            let mut seg = len;
            if h.msg_controllen as usize >= CMSG_HDR + 4 {
                let c = cmsgs[j].as_ptr().cast::<u8>();
                // SAFETY: the kernel wrote at least one cmsghdr and an int into the buffer.
                let (level, ty, v) = unsafe {
                    let ch = c.cast::<libc::cmsghdr>();
                    (
                        (*ch).cmsg_level,
                        (*ch).cmsg_type,
                        c.add(CMSG_HDR).cast::<i32>().read_unaligned(),
                    )
                };
                if level == SOL_UDP && ty == UDP_GRO && v > 0 {
                    seg = v as usize;
                }
            }
            self.segs[j] = seg.max(1);
        }
        self.n = n;
        Ok(n)
    }

    /// Datagram `j` of the last [`RxBatch::recv`]: its bytes (several inner packets back to
    /// back when GRO merged them), the size each one was sent with, and the sender.
    pub fn datagram(&mut self, j: usize) -> (&mut [u8], usize, SocketAddrV4) {
        let j = j.min(RX_CAP - 1);
        let len = if j < self.n { self.lens[j] } else { 0 };
        (
            &mut self.slots[j * RX_SLOT..j * RX_SLOT + len],
            self.segs[j],
            self.from[j],
        )
    }
}

/// Turns UDP GRO on for the socket; `false` if the kernel does not have it.
pub fn enable_gro(fd: RawFd) -> bool {
    let one: i32 = 1;
    // SAFETY: passing a pointer to a live i32 and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            SOL_UDP,
            UDP_GRO,
            (&one as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    rc == 0
}
