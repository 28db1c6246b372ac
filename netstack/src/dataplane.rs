//! The I/O loop around the engine: one thread owns the [`Proxy`], the TUN device and the
//! tunnel's UDP socket, waits in poll(2) on both plus an eventfd for commands, and moves
//! packets through `Proxy::on_packet` in preallocated buffers. The control plane (MQTT, the
//! local API) talks to it only through [`DataplaneHandle`] commands and [`Event`]s.
//!
//! Why one thread with poll(2) rather than async tasks: the engine is `&mut self`, so one
//! owner needs no lock on the packet path; the data path stays off the worker's async
//! executor; and a blocking loop is what batching slots into.
//!
//! Where the time goes, and what the loop does about it (overlay bench, 2-vCPU VM): per
//! packet, the syscalls dominated. The tunnel side batches them (`recvmmsg`/`sendmmsg`, UDP
//! GSO and GRO, [`crate::batch`]); the TUN side takes TCP super-segments from the kernel and
//! hands merged ones back ([`crate::gso`]), so ~45 packets cost one TUN read and ~30 one TUN
//! write. A super-segment is translated once (its first segment goes through the engine, the
//! rest follow that decision) and its payload is sent from the TUN buffer, so userspace writes
//! only ~52 header bytes per segment (overlay bench: +6-7 % TCP throughput over copying each
//! segment into a slot). Latency at low packet rates is another matter: a round trip through the overlay
//! wakes three sleeping threads more than the routed path does, and waking a thread on an idle
//! vCPU costs tens of µs there, which is nearly all of the ~230 µs a ping at 10 ms intervals
//! adds (pings 0.2 ms apart add ~30 µs). `busy_poll_us` keeps the loop polling after traffic
//! so a prompt reply finds it awake; it did not measurably help on 2 shared cores and made
//! TCP connects slower there (spinning competes with the instances), so it is off by default.

use crate::batch::{self, RxBatch, TxQueue};
use crate::control::{JobName, NodeSubnet, TableUpdate};
use crate::gso::{self, Coalescer, Segmenter, VnetHdr, VNET_HDR_LEN};
use crate::proxy::{Action, Evictions, Proxy, ProxyConfig, Source, Stats};
use crate::tun::Tun;
use crate::Millis;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Upstream's tunnel port (`OAK_TUNNEL_PORT`, spec §7).
pub const DEFAULT_TUNNEL_PORT: u16 = 50103;
/// The TUN address on every worker; with the /12 it routes 10.16.0.0/12 to the proxy (§3.1).
pub const DEFAULT_TUN_ADDR: Ipv4Addr = Ipv4Addr::new(10, 19, 1, 254);
/// TUN reads per wakeup before looking at the other descriptors again.
const TUN_BURST: usize = 64;
/// `recvmmsg` calls per wakeup (each up to [`batch::RX_CAP`] datagrams).
const RX_ROUNDS: usize = 4;
/// A virtio header and the largest IP packet: any TUN read fits.
const TUN_BUF_LEN: usize = VNET_HDR_LEN + 65536;

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
    /// TUN offloads (virtio header, TSO4 and checksum from the kernel, merged TCP writes to
    /// it) and UDP GSO/GRO on the tunnel socket. Each falls back on its own when the kernel
    /// refuses it; `false` moves every packet on its own, as upstream does.
    pub offload: bool,
    /// How long the loop keeps polling without sleeping after it moved a packet (0: always
    /// sleep, the default). Costs CPU only while traffic flows; saves a thread wakeup per
    /// packet that arrives within the window, on machines with cores to spare (module doc).
    pub busy_poll_us: u32,
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
            offload: true,
            busy_poll_us: 0,
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
    IoCounters(mpsc::Sender<IoCounters>),
    Stop,
}

/// How many syscalls moved how many packets: shows whether batching and the offloads work
/// (a super-segment per TUN read, several packets per datagram received, merged TUN writes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounters {
    pub tun_reads: u64,
    /// TUN reads that were TCP super-segments, and the packets cut from them.
    pub super_segments: u64,
    pub segments_cut: u64,
    pub send_calls: u64,
    pub datagrams_sent: u64,
    /// `recvmmsg` calls that returned datagrams, the datagrams, and the inner packets in them.
    pub recv_calls: u64,
    pub datagrams_received: u64,
    pub packets_received: u64,
    pub tun_writes: u64,
    /// Packets that went into merged (GSO) TUN writes.
    pub packets_merged: u64,
    pub errors: u64,
}

/// Every counter of the data plane at one moment, as [`SharedCounters`] holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub stats: Stats,
    pub io: IoCounters,
    pub evictions: Evictions,
}

/// The data plane's counters for readers on other threads (the worker's `/metrics`). The loop
/// copies them in from its once-a-second housekeeping, so a reader never waits on the loop
/// (unlike [`DataplaneHandle::stats`], which queues behind whatever the loop is doing) and
/// the packet path neither locks nor allocates. The loop only `try_lock`s: if a reader holds
/// the lock at that instant, that second's copy is skipped rather than the loop stalled.
#[derive(Debug, Default)]
pub struct SharedCounters {
    last: Mutex<CounterSnapshot>,
}

impl SharedCounters {
    /// The counters as of the loop's last housekeeping (at most about a second old).
    pub fn get(&self) -> CounterSnapshot {
        // Poisoning needs a panic while copying plain integers; the values are still good.
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the snapshot unless a reader is copying it right now.
    pub fn publish(&self, s: CounterSnapshot) -> bool {
        match self.last.try_lock() {
            Ok(mut g) => {
                *g = s;
                true
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                *p.into_inner() = s;
                true
            }
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }
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
    /// The kernel accepted TSO4 on the TUN device (super-segments may arrive).
    tun_offload: bool,
    udp_gso: bool,
    busy_poll: Duration,
    tx_slot: usize,
}

impl Dataplane {
    /// Creates and configures the TUN device and binds the tunnel socket in the calling
    /// thread's network namespace.
    pub fn open(cfg: &DataplaneConfig) -> io::Result<Dataplane> {
        let (tun, tun_offload) = if cfg.offload {
            Tun::open_vnet(&cfg.tun_name)?
        } else {
            (Tun::open(&cfg.tun_name)?, false)
        };
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
        if cfg.offload && !batch::enable_gro(udp.as_raw_fd()) {
            log::info!("tunnel socket: no UDP GRO in this kernel; datagrams arrive one by one");
        }
        // A slot holds any packet the TUN device can produce, and an ICMP error (576).
        let tx_slot = (usize::from(cfg.tun_mtu).max(2048) + 63) & !63;
        Ok(Dataplane {
            tun,
            udp,
            proxy: Proxy::new(cfg.proxy),
            tun_offload,
            udp_gso: cfg.offload,
            busy_poll: Duration::from_micros(u64::from(cfg.busy_poll_us)),
            tx_slot,
        })
    }

    /// Whether the kernel accepted TSO4 on the TUN device (TCP super-segments may arrive).
    pub fn tun_offload(&self) -> bool {
        self.tun_offload
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
        let counters = Arc::new(SharedCounters::default());
        let shared = counters.clone();
        let join = std::thread::Builder::new()
            .name("overlay-dataplane".into())
            .spawn(move || self.run(rx, loop_wake, events, &shared))?;
        Ok(DataplaneHandle {
            tx,
            wake,
            join: Some(join),
            counters,
        })
    }

    fn run(
        mut self,
        rx: mpsc::Receiver<Command>,
        wake: OwnedFd,
        events: mpsc::Sender<Event>,
        shared: &SharedCounters,
    ) -> Stats {
        let start = Instant::now();
        let now = || Millis(start.elapsed().as_millis() as u64);
        let mut io = Io {
            tun_buf: vec![0u8; TUN_BUF_LEN].into_boxed_slice(),
            tx: TxQueue::new(self.tx_slot, self.udp_gso),
            rx: RxBatch::new(),
            co: Coalescer::new(),
            errors: 0,
            gso_warned: false,
            c: IoCounters::default(),
        };
        let mut last_housekeeping = Millis(0);
        let mut last_busy: Option<Instant> = None;
        loop {
            let spinning = last_busy.is_some_and(|b| b.elapsed() < self.busy_poll);
            let timeout_ms = if spinning {
                0
            } else {
                match self.proxy.next_deadline() {
                    Some(d) => d.since(now()).min(1000) as i32,
                    None => 1000,
                }
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
                    if let Command::IoCounters(reply) = cmd {
                        let _ = reply.send(io.c);
                        continue;
                    }
                    stop |= self.command(t, cmd);
                }
                if stop {
                    break;
                }
            }
            let mut busy = false;
            if fds[0].revents != 0 {
                busy |= self.drain_tun(t, &mut io, &events);
            }
            if fds[1].revents != 0 {
                busy |= self.drain_tunnel(t, &mut io, &events);
            }
            let scratch = &mut io.tun_buf[VNET_HDR_LEN..];
            while let Some(a) = self.proxy.poll(t, scratch) {
                io.errors += self.act_now(a, scratch, &events);
            }
            if busy {
                last_busy = Some(Instant::now());
            } else if spinning {
                // Let whatever else is runnable here (the instance the reply is for, the
                // kernel's softirq thread) go first: spinning must not delay it.
                // SAFETY: no arguments.
                unsafe { libc::sched_yield() };
            }
            if t.since(last_housekeeping) >= 1000 {
                last_housekeeping = t;
                while let Some(job) = self.proxy.poll_interest(t) {
                    let _ = events.send(Event::InterestLapsed(job));
                }
                if io.errors > 0 {
                    log::warn!(
                        "overlay data plane: {} send/receive errors in the last second",
                        io.errors
                    );
                    io.c.errors += io.errors;
                    io.errors = 0;
                }
                shared.publish(self.snapshot(&io));
            }
        }
        io.c.errors += io.errors;
        // The last word, waiting for a reader if need be: readers may outlive the loop.
        *shared.last.lock().unwrap_or_else(|p| p.into_inner()) = self.snapshot(&io);
        *self.proxy.stats()
    }

    fn snapshot(&self, io: &Io) -> CounterSnapshot {
        CounterSnapshot {
            stats: *self.proxy.stats(),
            io: io.c,
            evictions: self.proxy.evictions(),
        }
    }

    /// Drains the TUN device: every packet (or every segment of a TCP super-segment) is
    /// translated in a send-queue slot, and the queue goes out in batches.
    fn drain_tun(&mut self, t: Millis, io: &mut Io, events: &mpsc::Sender<Event>) -> bool {
        let vnet = self.tun.vnet_hdr();
        let off = if vnet { VNET_HDR_LEN } else { 0 };
        let mut busy = false;
        for _ in 0..TUN_BURST {
            let mut f: &File = self.tun.file();
            let n = match f.read(&mut io.tun_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    io.errors += 1;
                    break;
                }
            };
            busy = true;
            io.c.tun_reads += 1;
            if n < off {
                io.errors += 1;
                continue;
            }
            let hdr = if vnet {
                VnetHdr::parse(&io.tun_buf).unwrap_or_default()
            } else {
                VnetHdr::default()
            };
            let pkt = &mut io.tun_buf[off..n];
            match hdr.gso_type & !gso::GSO_ECN {
                gso::GSO_NONE => {
                    if hdr.flags & gso::F_NEEDS_CSUM != 0
                        && gso::finish_csum(
                            pkt,
                            usize::from(hdr.csum_start),
                            usize::from(hdr.csum_offset),
                        )
                        .is_err()
                    {
                        io.errors += 1;
                        continue;
                    }
                    let len = pkt.len();
                    if len <= io.tx.slot_len() {
                        if io.tx.is_full() {
                            self.flush_tx(io);
                        }
                        io.tx.next_slot()[..len].copy_from_slice(&io.tun_buf[off..n]);
                        self.translate_slot(t, io, len, events);
                    } else {
                        // larger than a slot (TUN MTU raised by hand): translate in place
                        self.flush_tx(io);
                        let buf = &mut io.tun_buf[off..];
                        let a = self.proxy.on_packet(t, buf, len, Source::Tun);
                        io.errors += self.act_now(a, buf, events);
                    }
                }
                gso::GSO_TCPV4 => {
                    let Ok(seg) = Segmenter::new(&io.tun_buf[off..n], hdr.gso_size) else {
                        io.errors += 1;
                        continue;
                    };
                    if seg.len(0) > io.tx.slot_len() {
                        io.errors += 1;
                        continue;
                    }
                    io.c.super_segments += 1;
                    io.c.segments_cut += seg.count() as u64;
                    self.send_super_segment(t, io, off, n, &seg, events);
                }
                _ => io.errors += 1,
            }
        }
        self.flush_tx(io);
        busy
    }

    /// Sends the TCP super-segment in `io.tun_buf[off..n]` as MTU-sized packets. The engine
    /// decides on the first segment; when that goes to a peer, the rest of the flow's segments
    /// go the same way: the first one's translated addresses are put into the super-segment,
    /// and each further segment is queued as a header in a slot plus its payload where it lies
    /// in the TUN buffer, so the payload is not copied in userspace. Anything else (hairpin,
    /// parking, drops, ICMP) takes the engine's per-packet path for every segment.
    fn send_super_segment(
        &mut self,
        t: Millis,
        io: &mut Io,
        off: usize,
        n: usize,
        seg: &Segmenter,
        events: &mpsc::Sender<Event>,
    ) {
        if io.tx.is_full() {
            self.flush_tx(io);
        }
        let len = seg.write(&io.tun_buf[off..n], 0, io.tx.next_slot());
        let a = self.proxy.on_packet(t, io.tx.next_slot(), len, Source::Tun);
        let Action::SendToPeer { peer, len: sent } = a else {
            self.queue_or_handle(io, a, events);
            for i in 1..seg.count() {
                if io.tx.is_full() {
                    self.flush_tx(io);
                }
                let len = seg.write(&io.tun_buf[off..n], i, io.tx.next_slot());
                self.translate_slot(t, io, len, events);
            }
            return;
        };
        let mut addrs = [0u8; 8];
        addrs.copy_from_slice(&io.tx.next_slot()[12..20]);
        io.tx.commit(sent, peer);
        io.tun_buf[off + 12..off + 20].copy_from_slice(&addrs);
        let mut bytes = 0;
        for i in 1..seg.count() {
            if io.tx.is_full() {
                self.flush_tx(io);
            }
            let (head, p_off, p_len) = seg.write_header(&io.tun_buf[off..n], i, io.tx.next_slot());
            io.tx.commit_with_tail(head, peer, off + p_off, p_len);
            bytes += (head + p_len) as u64;
        }
        self.proxy.count_followers(seg.count() as u64 - 1, bytes);
        // the tails live in the TUN buffer, which the next read overwrites
        self.flush_tx(io);
    }

    /// Runs the engine on the packet in the send queue's next slot and queues or handles it.
    fn translate_slot(&mut self, t: Millis, io: &mut Io, len: usize, events: &mpsc::Sender<Event>) {
        let a = self.proxy.on_packet(t, io.tx.next_slot(), len, Source::Tun);
        self.queue_or_handle(io, a, events);
    }

    /// Queues a translated packet in the send queue's next slot, or handles what else the
    /// engine decided for it.
    fn queue_or_handle(&mut self, io: &mut Io, a: Action, events: &mpsc::Sender<Event>) {
        match a {
            Action::SendToPeer { peer, len } => io.tx.commit(len, peer),
            Action::WriteToTun { len } | Action::IcmpReply { len } => {
                let r = tun_write(&self.tun, &io.tx.next_slot()[..len]);
                io.errors += u64::from(r.is_err());
                io.c.tun_writes += 1;
            }
            a => io.errors += self.act_now(a, &[], events),
        }
    }

    fn flush_tx(&mut self, io: &mut Io) {
        if io.tx.is_empty() {
            return;
        }
        let f = io.tx.flush(self.udp.as_raw_fd(), &io.tun_buf);
        io.errors += f.dropped as u64;
        io.c.send_calls += f.syscalls as u64;
        io.c.datagrams_sent += f.sent as u64;
        if f.gso_failed && !io.gso_warned {
            io.gso_warned = true;
            log::warn!(
                "tunnel socket: UDP GSO refused (path MTU below the TUN MTU, or no checksum \
                 offload on the route); sending one datagram per packet from now on"
            );
        }
    }

    /// Drains the tunnel socket: each datagram (or each inner packet of a GRO datagram) is
    /// translated in place and written to the TUN device, consecutive TCP segments merged.
    fn drain_tunnel(&mut self, t: Millis, io: &mut Io, events: &mpsc::Sender<Event>) -> bool {
        let mut busy = false;
        for _ in 0..RX_ROUNDS {
            let k = match io.rx.recv(self.udp.as_raw_fd()) {
                Ok(k) => k,
                Err(_) => {
                    io.errors += 1;
                    break;
                }
            };
            if k == 0 {
                break;
            }
            busy = true;
            io.c.recv_calls += 1;
            io.c.datagrams_received += k as u64;
            for j in 0..k {
                let (buf, seg, from) = io.rx.datagram(j);
                if buf.is_empty() {
                    // An empty datagram holds no packet, but it is hostile input all the
                    // same: the engine counts it as a truncated header like any runt.
                    io.c.packets_received += 1;
                    let _ = self.proxy.on_packet(t, buf, 0, Source::Peer(from));
                    continue;
                }
                let mut off = 0;
                while off < buf.len() {
                    let end = (off + seg).min(buf.len());
                    let p = &mut buf[off..end];
                    off = end;
                    let n = p.len();
                    io.c.packets_received += 1;
                    match self.proxy.on_packet(t, p, n, Source::Peer(from)) {
                        Action::WriteToTun { len } | Action::IcmpReply { len } => {
                            io.errors += deliver(&self.tun, &mut io.co, &p[..len], &mut io.c);
                        }
                        Action::SendToPeer { peer, len } => {
                            let r = self.udp.send_to(&p[..len], peer);
                            io.errors += u64::from(r.is_err());
                        }
                        a => io.errors += self.act_now(a, &[], events),
                    }
                }
            }
            if !io.co.is_empty() {
                io.errors += write_run(&self.tun, &mut io.co, &mut io.c);
            }
            if k < batch::RX_CAP {
                break;
            }
        }
        busy
    }

    /// The unbatched path (released parked packets, oversized ones, events). Returns 1 if an
    /// I/O error happened (counted, logged once a second by the loop).
    fn act_now(&mut self, a: Action, buf: &[u8], events: &mpsc::Sender<Event>) -> u64 {
        let r = match a {
            Action::SendToPeer { peer, len } => self.udp.send_to(&buf[..len], peer).map(|_| ()),
            Action::WriteToTun { len } | Action::IcmpReply { len } => {
                tun_write(&self.tun, &buf[..len])
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
            // answered by the loop, which owns the counters
            Command::IoCounters(_) => {}
            Command::Stop => return true,
        }
        false
    }
}

/// The loop's preallocated buffers (made on the data-plane thread, once).
struct Io {
    tun_buf: Box<[u8]>,
    tx: TxQueue,
    rx: RxBatch,
    co: Coalescer,
    errors: u64,
    gso_warned: bool,
    c: IoCounters,
}

/// Writes one packet to the TUN device, behind an empty virtio header if it has them.
fn tun_write(tun: &Tun, pkt: &[u8]) -> io::Result<()> {
    if !tun.vnet_hdr() {
        let mut f: &File = tun.file();
        return f.write(pkt).map(|_| ());
    }
    let hdr = [0u8; VNET_HDR_LEN];
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: pkt.as_ptr() as *mut libc::c_void,
            iov_len: pkt.len(),
        },
    ];
    // SAFETY: both iovecs point at live buffers of the given lengths.
    let rc = unsafe { libc::writev(tun.as_raw_fd(), iov.as_ptr(), 2) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes a frame that already starts with its virtio header.
fn tun_write_frame(tun: &Tun, frame: &[u8]) -> io::Result<()> {
    let mut f: &File = tun.file();
    f.write(frame).map(|_| ())
}

/// Hands a translated packet to the TUN device: merged into the current TCP run when it
/// continues it, else after writing the run out. Returns the number of failed writes.
fn deliver(tun: &Tun, co: &mut Coalescer, pkt: &[u8], c: &mut IoCounters) -> u64 {
    if !tun.vnet_hdr() {
        c.tun_writes += 1;
        return u64::from(tun_write(tun, pkt).is_err());
    }
    if co.push(pkt) {
        return 0;
    }
    let mut errors = 0;
    if !co.is_empty() {
        errors += write_run(tun, co, c);
        if co.push(pkt) {
            return errors;
        }
    }
    c.tun_writes += 1;
    errors + u64::from(tun_write(tun, pkt).is_err())
}

/// Writes the coalescer's run out (one TUN write however many segments it holds).
fn write_run(tun: &Tun, co: &mut Coalescer, c: &mut IoCounters) -> u64 {
    let segs = co.segments() as u64;
    c.tun_writes += 1;
    if segs > 1 {
        c.packets_merged += segs;
    }
    u64::from(tun_write_frame(tun, co.take()).is_err())
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
    counters: Arc<SharedCounters>,
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

    /// The loop's counters as of its last housekeeping, readable from any thread without
    /// waiting on the loop.
    pub fn counters(&self) -> Arc<SharedCounters> {
        self.counters.clone()
    }

    pub fn io_counters(&self) -> Option<IoCounters> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::IoCounters(reply));
        rx.recv().ok()
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
