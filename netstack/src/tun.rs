//! The TUN device (spec overlay-network §3.1 step 2) opened and configured with ioctls from
//! Rust: `IFF_TUN | IFF_NO_PI`, so reads and writes are bare IP packets, then address,
//! netmask, MTU and up. The device is not persistent: it disappears when the file closes, so
//! a crash leaves nothing behind. Routes beyond the connected one are `plumbing`'s job.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const IFNAMSIZ: usize = 16;

/// `struct ifreq`: the name and a union (at most 24 bytes on 64-bit targets; the kernel reads
/// fewer on 32-bit ones, so the larger buffer is safe everywhere).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) || b.contains(&b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {name:?} must be 1-15 bytes without '/' or NUL"),
            ));
        }
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }

    fn set_sockaddr_in(&mut self, a: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&a.octets());
    }
}

fn ioctl(fd: &impl AsRawFd, req: libc::c_ulong, r: &mut IfReq, what: &str) -> io::Result<()> {
    // SAFETY: `r` is a valid, writable ifreq-sized buffer for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, r as *mut IfReq) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// An open TUN device. Reads and writes are whole IP packets, each preceded by a
/// [`crate::gso::VnetHdr`] when opened with [`Tun::open_vnet`].
pub struct Tun {
    file: File,
    name: String,
    vnet_hdr: bool,
}

impl Tun {
    /// Creates (or attaches to) TUN device `name`, non-blocking, without packet info.
    pub fn open(name: &str) -> io::Result<Tun> {
        Tun::open_with(name, false)
    }

    /// Like [`Tun::open`], with a virtio-net header before every packet and the checksum and
    /// TSO4 offloads offered, so the kernel may hand over TCP super-segments with partial
    /// checksums. `Ok(false)` in the second field: the kernel refused the offloads (the
    /// header stays, always without GSO).
    pub fn open_vnet(name: &str) -> io::Result<(Tun, bool)> {
        let tun = Tun::open_with(name, true)?;
        let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4;
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe { libc::ioctl(tun.file.as_raw_fd(), libc::TUNSETOFFLOAD as _, flags) };
        if rc < 0 {
            log::warn!(
                "TUN {}: offloads refused ({}); packets go one by one",
                tun.name,
                io::Error::last_os_error()
            );
        }
        Ok((tun, rc >= 0))
    }

    fn open_with(name: &str, vnet_hdr: bool) -> io::Result<Tun> {
        // SAFETY: plain open(2) of a constant path.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("open /dev/net/tun: {e} (needs root or CAP_NET_ADMIN and the tun module)"),
            ));
        }
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut r = IfReq::new(name)?;
        let mut flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR as i16;
        }
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ioctl(&file, libc::TUNSETIFF as libc::c_ulong, &mut r, "TUNSETIFF")?;
        let len = r.name.iter().position(|b| *b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&r.name[..len]).into_owned();
        Ok(Tun {
            file,
            name,
            vnet_hdr,
        })
    }

    /// Whether every read and write carries a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Address and prefix (the connected route comes with it), MTU, and up.
    pub fn configure(&self, addr: Ipv4Addr, prefix: u8, mtu: u16) -> io::Result<()> {
        configure_ipv4(&self.name, addr, prefix, mtu)
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Sets an IPv4 address, MTU and the up flag on interface `name` with the classic ioctls.
pub fn configure_ipv4(name: &str, addr: Ipv4Addr, prefix: u8, mtu: u16) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: s is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let mut r = IfReq::new(name)?;
    r.set_sockaddr_in(addr);
    ioctl(&sock, libc::SIOCSIFADDR, &mut r, "SIOCSIFADDR")?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    r.set_sockaddr_in(Ipv4Addr::from(mask));
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut r, "SIOCSIFNETMASK")?;
    r.data = [0; 24];
    r.data[..4].copy_from_slice(&i32::from(mtu).to_ne_bytes());
    ioctl(&sock, libc::SIOCSIFMTU, &mut r, "SIOCSIFMTU")?;
    r.data = [0; 24];
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS")?;
    let flags =
        i16::from_ne_bytes([r.data[0], r.data[1]]) | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS")?;
    Ok(())
}
