//! The I/O loop around the engine: one thread owns the [`Proxy`], the TUN device and the
//! tunnel's UDP socket, waits in poll(2) on both plus an eventfd for commands, and moves
//! packets through `Proxy::on_packet` with one reused buffer. The control plane (MQTT, the
//! local API) talks to it only through [`DataplaneHandle`] commands and [`Event`]s.
//!
//! Why one thread with poll(2) rather than async tasks: the engine is `&mut self`, so one
//! owner needs no lock on the packet path; the data path stays off the worker's async
//! executor; and a blocking loop is what batching (`recvmmsg`/`sendmmsg`) slots into later.

use crate::control::{JobName, NodeSubnet, TableUpdate};
use crate::proxy::{Action, Proxy, ProxyConfig, Source, Stats};
use crate::tun::Tun;
use crate::Millis;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Instant;

/// Upstream's tunnel port (`OAK_TUNNEL_PORT`, spec §7).
pub const DEFAULT_TUNNEL_PORT: u16 = 50103;
/// The TUN address on every worker; with the /12 it routes 10.16.0.0/12 to the proxy (§3.1).
pub const DEFAULT_TUN_ADDR: Ipv4Addr = Ipv4Addr::new(10, 19, 1, 254);
/// Packets moved per readable descriptor before looking at the others again.
const BURST: usize = 64;
/// Largest IP packet plus room for nothing else: UDP payloads and TUN reads both fit.
const BUF_LEN: usize = 65536;

#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// `goProxyTun` upstream.
    pub tun_name: String,
    pub tun_addr: Ipv4Addr,
    pub tun_prefix: u8,
    /// TUN MTU (upstream `MTUsize`, 1450).
    pub tun_mtu: u16,
    pub listen: SocketAddrV4,
    pub proxy: ProxyConfig,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            tun_name: "goProxyTun".into(),
            tun_addr: DEFAULT_TUN_ADDR,
            tun_prefix: 12,
            tun_mtu: 1450,
            listen: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DEFAULT_TUNNEL_PORT),
            proxy: ProxyConfig::default(),
        }
    }
}

/// What the control plane tells the data plane.
#[derive(Debug)]
pub enum Command {
    SetSubnet(NodeSubnet),
    /// Answers `Ok(true)` when the job is new here (subscribe and query it).
    DeployLocal {
        job: JobName,
        instance_number: u32,
        nsip: Ipv4Addr,
        reply: mpsc::Sender<Result<bool, crate::directory::DirectoryError>>,
    },
    UndeployLocal(Ipv4Addr),
    ApplyTableUpdate(TableUpdate),
    Stats(mpsc::Sender<Stats>),
    Stop,
}

/// What the data plane asks of the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Publish `tablequery/request {"sip": …}` (packets are parked meanwhile).
    TableQuery(Ipv4Addr),
    /// Publish `interest/remove` and unsubscribe from the job's updates.
    InterestLapsed(JobName),
}

/// The open devices and the engine; [`Dataplane::open`] in the network namespace they belong
/// in, then [`Dataplane::spawn`].
pub struct Dataplane {
    tun: Tun,
    udp: UdpSocket,
    proxy: Proxy,
}

impl Dataplane {
    /// Creates and configures the TUN device and binds the tunnel socket in the calling
    /// thread's network namespace.
    pub fn open(cfg: &DataplaneConfig) -> io::Result<Dataplane> {
        let tun = Tun::open(&cfg.tun_name)?;
        tun.configure(cfg.tun_addr, cfg.tun_prefix, cfg.tun_mtu)?;
        let udp = UdpSocket::bind(cfg.listen).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "bind tunnel port {}: {e} (OAK_TUNNEL_PORT in use?)",
                    cfg.listen
                ),
            )
        })?;
        udp.set_nonblocking(true)?;
        // Inner packets without DF may exceed the path MTU: let the kernel fragment the outer
        // datagram instead of failing with EMSGSIZE (spec §3.4 sizes).
        setsockopt_int(
            &udp,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        );
        setsockopt_int(&udp, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        setsockopt_int(&udp, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
        Ok(Dataplane {
            tun,
            udp,
            proxy: Proxy::new(cfg.proxy),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Runs the loop on its own thread.
    pub fn spawn(self, events: mpsc::Sender<Event>) -> io::Result<DataplaneHandle> {
        // SAFETY: eventfd(2) with constant flags.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor; the loop gets a duplicate.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let loop_wake = wake.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let join = std::thread::Builder::new()
            .name("overlay-dataplane".into())
            .spawn(move || self.run(rx, loop_wake, events))?;
        Ok(DataplaneHandle {
            tx,
            wake,
            join: Some(join),
        })
    }

    fn run(
        mut self,
        rx: mpsc::Receiver<Command>,
        wake: OwnedFd,
        events: mpsc::Sender<Event>,
    ) -> Stats {
        let start = Instant::now();
        let now = || Millis(start.elapsed().as_millis() as u64);
        let mut buf = vec![0u8; BUF_LEN].into_boxed_slice();
        let mut last_housekeeping = Millis(0);
        let mut io_errors: u64 = 0;
        loop {
            let timeout_ms = match self.proxy.next_deadline() {
                Some(d) => d.since(now()).min(1000) as i32,
                None => 1000,
            };
            let mut fds = [
                pollfd(self.tun.as_raw_fd()),
                pollfd(self.udp.as_raw_fd()),
                pollfd(wake.as_raw_fd()),
            ];
            // SAFETY: fds is a valid array of pollfd for the call's duration.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                log::error!(
                    "overlay data plane: poll failed: {}",
                    io::Error::last_os_error()
                );
                break;
            }
            let t = now();
            if fds[2].revents != 0 {
                let mut v = [0u8; 8];
                // SAFETY: reading 8 bytes into an 8-byte buffer from our eventfd.
                unsafe { libc::read(wake.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
                let mut stop = false;
                while let Ok(cmd) = rx.try_recv() {
                    stop |= self.command(t, cmd);
                }
                if stop {
                    break;
                }
            }
            if fds[0].revents != 0 {
                for _ in 0..BURST {
                    let mut tun: &std::fs::File = self.tun.file();
                    let n = match tun.read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            io_errors += 1;
                            break;
                        }
                    };
                    let a = self.proxy.on_packet(t, &mut buf, n, Source::Tun);
                    io_errors += self.act(a, &buf, &events);
                }
            }
            if fds[1].revents != 0 {
                for _ in 0..BURST {
                    let (n, from) = match self.udp.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            io_errors += 1;
                            break;
                        }
                    };
                    let SocketAddr::V4(from) = from else { continue };
                    let a = self.proxy.on_packet(t, &mut buf, n, Source::Peer(from));
                    io_errors += self.act(a, &buf, &events);
                }
            }
            while let Some(a) = self.proxy.poll(t, &mut buf) {
                io_errors += self.act(a, &buf, &events);
            }
            if t.since(last_housekeeping) >= 1000 {
                last_housekeeping = t;
                while let Some(job) = self.proxy.poll_interest(t) {
                    let _ = events.send(Event::InterestLapsed(job));
                }
                if io_errors > 0 {
                    log::warn!(
                        "overlay data plane: {io_errors} send/receive errors in the last second"
                    );
                    io_errors = 0;
                }
            }
        }
        *self.proxy.stats()
    }

    /// Returns 1 if an I/O error happened (counted, logged once a second by the loop).
    fn act(&mut self, a: Action, buf: &[u8], events: &mpsc::Sender<Event>) -> u64 {
        let r = match a {
            Action::SendToPeer { peer, len } => self.udp.send_to(&buf[..len], peer).map(|_| ()),
            Action::WriteToTun { len } | Action::IcmpReply { len } => {
                let mut tun: &std::fs::File = self.tun.file();
                tun.write(&buf[..len]).map(|_| ())
            }
            Action::Park { query: Some(ip) } => {
                let _ = events.send(Event::TableQuery(ip));
                Ok(())
            }
            Action::Park { query: None } | Action::Drop(_) => Ok(()),
        };
        u64::from(r.is_err())
    }

    fn command(&mut self, now: Millis, cmd: Command) -> bool {
        match cmd {
            Command::SetSubnet(s) => self.proxy.set_subnet(s),
            Command::DeployLocal {
                job,
                instance_number,
                nsip,
                reply,
            } => {
                let _ = reply.send(self.proxy.deploy_local(now, &job, instance_number, nsip));
            }
            Command::UndeployLocal(nsip) => {
                self.proxy.undeploy_local(nsip);
            }
            Command::ApplyTableUpdate(u) => {
                if let Err(e) = self.proxy.apply_table_update(now, &u) {
                    log::warn!("table update for {} not applied: {e:?}", u.job);
                }
            }
            Command::Stats(reply) => {
                let _ = reply.send(*self.proxy.stats());
            }
            Command::Stop => return true,
        }
        false
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn setsockopt_int(s: &impl AsRawFd, level: i32, name: i32, v: i32) {
    // SAFETY: passing a pointer to a live i32 and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        log::debug!(
            "setsockopt({level}, {name}) = {v}: {}",
            io::Error::last_os_error()
        );
    }
}

/// The control plane's handle on the running data plane. Dropping it stops the loop (the TUN
/// device disappears with it).
pub struct DataplaneHandle {
    tx: mpsc::Sender<Command>,
    wake: OwnedFd,
    join: Option<std::thread::JoinHandle<Stats>>,
}

impl DataplaneHandle {
    pub fn send(&self, cmd: Command) {
        if self.tx.send(cmd).is_ok() {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    pub fn deploy_local(
        &self,
        job: JobName,
        instance_number: u32,
        nsip: Ipv4Addr,
    ) -> Result<bool, crate::directory::DirectoryError> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::DeployLocal {
            job,
            instance_number,
            nsip,
            reply,
        });
        rx.recv()
            .unwrap_or(Err(crate::directory::DirectoryError::InstanceTableFull))
    }

    pub fn stats(&self) -> Option<Stats> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::Stats(reply));
        rx.recv().ok()
    }

    /// Stops the loop and returns its final counters.
    pub fn stop(mut self) -> Option<Stats> {
        self.send(Command::Stop);
        self.join.take().and_then(|j| j.join().ok())
    }
}

impl Drop for DataplaneHandle {
    fn drop(&mut self) {
        if let Some(j) = self.join.take() {
            self.send(Command::Stop);
            let _ = j.join();
        }
    }
}
