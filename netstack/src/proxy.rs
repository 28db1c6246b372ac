//! The translation engine: a pure state machine that takes one IP packet (from the TUN device
//! or from a peer's tunnel datagram) and the time, rewrites it in place and says what to do
//! with it (spec overlay-network §3.3 and the walk-through in §5). It owns the tables; it never
//! touches a socket, a clock or MQTT, and never allocates per packet.

use crate::control::{JobName, NodeSubnet, TableUpdate};
use crate::directory::{Applied, Capacities, Directory, DirectoryError};
use crate::flows::{Flow, FlowKey, FlowTable, FragDecision, FragKey, FragTable};
use crate::icmp;
use crate::packet::{self, Ipv4Header, Malformed, L4, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::park::{ParkRefused, Parked, ParkingLot};
use crate::table::{Handle, Hasher};
use crate::Millis;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Table sizes. Memory is allocated once from these, at [`Proxy::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub instances: usize,
    pub services: usize,
    pub jobs: usize,
    pub peers: usize,
    pub flows: usize,
    pub fragments: usize,
    pub park_slots: usize,
    pub park_per_destination: usize,
    /// Largest packet a park slot holds (the TUN MTU is enough).
    pub park_slot_bytes: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            instances: 512,
            services: 1024,
            jobs: 256,
            peers: 256,
            flows: 8192,
            fragments: 256,
            park_slots: 64,
            park_per_destination: 8,
            park_slot_bytes: 1500,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How long parked packets wait for a table query answer before the sender gets an ICMP
    /// host unreachable (upstream blocks all egress for up to 5 s instead, §8 item 4).
    pub table_query_ms: u64,
    /// Flow idle timeouts. Upstream drops any cache entry after 60-90 s idle, which breaks idle
    /// TCP connections (§8 item 6); we keep flows long and let LRU pressure reclaim them.
    pub tcp_idle_ms: u64,
    pub udp_idle_ms: u64,
    pub icmp_idle_ms: u64,
    /// How long the decision for a fragmented datagram is kept for its later fragments.
    pub fragment_ms: u64,
    /// A remote job's entries are dropped (and `interest/remove` sent) after this long
    /// without traffic. Upstream uses 10 s, which makes the next packet pay a query again.
    pub interest_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            table_query_ms: 2_000,
            tcp_idle_ms: 2 * 3600 * 1000,
            udp_idle_ms: 180_000,
            icmp_idle_ms: 30_000,
            fragment_ms: 30_000,
            interest_ms: 300_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The semantic subnet the proxy translates (10.30.0.0/16, spec §2.1).
    pub service_net: Ipv4Addr,
    pub service_prefix: u8,
    /// Largest inner packet sent in one tunnel datagram. Larger ones with DF set get ICMP
    /// "fragmentation needed" with this MTU; without DF the kernel fragments the datagram.
    pub tunnel_mtu: u16,
    pub capacity: Capacity,
    pub timeouts: Timeouts,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            service_net: Ipv4Addr::new(10, 30, 0, 0),
            service_prefix: 16,
            tunnel_mtu: 1450,
            capacity: Capacity::default(),
            timeouts: Timeouts::default(),
        }
    }
}

/// Where a packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Read from the TUN device: leaving a local instance.
    Tun,
    /// The payload of a tunnel datagram from this address.
    Peer(SocketAddrV4),
}

/// Why a packet was not forwarded. Each one has a counter in [`Stats::drops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Malformed(Malformed),
    /// Read from the TUN but not addressed to the service subnet (upstream drops these too).
    NotServiceAddress,
    /// The source is not an instance deployed on this worker.
    UnknownSource,
    /// A local instance whose InstanceIP is not known yet (its job's table result is due).
    NoInstanceIp,
    UnsupportedProtocol,
    /// ICMP errors are not translated yet.
    IcmpErrorNotTranslated,
    /// A later fragment whose first fragment was not seen (or has expired).
    FragmentWithoutFirst,
    /// From a peer, to an address that is not a local instance.
    NotForLocalInstance,
    /// From a peer, with a source outside the service subnet (peers always send InstanceIPs).
    SourceNotServiceAddress,
    BadIpChecksum,
    ParkRefused(ParkRefused),
    /// The peer entry disappeared between a first fragment and a later one.
    PeerGone,
    /// No room in the buffer for the ICMP error that should have been sent.
    BufferTooSmall,
}

impl DropReason {
    pub const COUNT: usize = 20;
    /// One stable snake_case name per [`DropReason::index`], for metrics labels: dashboards
    /// and alerts key on these, so a name never changes meaning once published.
    pub const LABELS: [&'static str; DropReason::COUNT] = [
        "malformed_truncated_ip_header",
        "malformed_not_ipv4",
        "malformed_bad_ihl",
        "malformed_bad_total_length",
        "malformed_truncated_l4_header",
        "malformed_bad_l4_length",
        "not_service_address",
        "unknown_source",
        "no_instance_ip",
        "unsupported_protocol",
        "icmp_error_not_translated",
        "fragment_without_first",
        "not_for_local_instance",
        "source_not_service_address",
        "bad_ip_checksum",
        "park_per_destination_limit",
        "park_no_free_slot",
        "park_too_big",
        "peer_gone",
        "buffer_too_small",
    ];

    pub fn label(self) -> &'static str {
        DropReason::LABELS[self.index()]
    }

    pub fn index(self) -> usize {
        match self {
            DropReason::Malformed(m) => match m {
                Malformed::TruncatedIpHeader => 0,
                Malformed::NotIpv4 => 1,
                Malformed::BadIhl => 2,
                Malformed::BadTotalLength => 3,
                Malformed::TruncatedL4Header => 4,
                Malformed::BadL4Length => 5,
            },
            DropReason::NotServiceAddress => 6,
            DropReason::UnknownSource => 7,
            DropReason::NoInstanceIp => 8,
            DropReason::UnsupportedProtocol => 9,
            DropReason::IcmpErrorNotTranslated => 10,
            DropReason::FragmentWithoutFirst => 11,
            DropReason::NotForLocalInstance => 12,
            DropReason::SourceNotServiceAddress => 13,
            DropReason::BadIpChecksum => 14,
            DropReason::ParkRefused(ParkRefused::PerDestinationLimit) => 15,
            DropReason::ParkRefused(ParkRefused::NoFreeSlot) => 16,
            DropReason::ParkRefused(ParkRefused::TooBig) => 17,
            DropReason::PeerGone => 18,
            DropReason::BufferTooSmall => 19,
        }
    }
}

/// What the I/O edge does with the buffer after [`Proxy::on_packet`] or [`Proxy::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send `buf[..len]` as one UDP datagram to `peer` (the tunnel, spec §3.4).
    SendToPeer {
        peer: SocketAddrV4,
        len: usize,
    },
    /// Write `buf[..len]` to the TUN device.
    WriteToTun {
        len: usize,
    },
    /// `buf[..len]` is an ICMP error for a local sender: write it to the TUN device.
    IcmpReply {
        len: usize,
    },
    /// The packet was kept until its destination is resolved; when `query` is set, publish a
    /// table query for that service IP (only the first packet per destination asks).
    Park {
        query: Option<Ipv4Addr>,
    },
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub from_tun: u64,
    pub from_peer: u64,
    pub to_peer: u64,
    pub to_tun: u64,
    pub hairpin: u64,
    pub icmp_sent: u64,
    pub parked: u64,
    pub queries: u64,
    pub released: u64,
    pub query_timeouts: u64,
    pub drops: [u64; DropReason::COUNT],
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            from_tun: 0,
            from_peer: 0,
            to_peer: 0,
            to_tun: 0,
            hairpin: 0,
            icmp_sent: 0,
            parked: 0,
            queries: 0,
            released: 0,
            query_timeouts: 0,
            drops: [0; DropReason::COUNT],
        }
    }
}

impl Stats {
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }
}

/// Live entries pushed out of full tables, per table. Each one cost a connection its state
/// or made the next packet pay a table query again, so a growing count means a capacity is
/// too small for the traffic (exported as `oak_overlay_table_evictions_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evictions {
    pub flows: u64,
    pub instances: u64,
    pub services: u64,
    pub jobs: u64,
}

/// Rate limit for "table full" warnings: one line per kind per interval, counters always.
struct LogGate {
    last: [Option<Millis>; 2],
}

const GATE_FLOWS: usize = 0;
const GATE_DIRECTORY: usize = 1;
const LOG_INTERVAL_MS: u64 = 10_000;

impl LogGate {
    fn open(&mut self, now: Millis, which: usize) -> bool {
        let due = self.last[which].map_or(true, |t| now.since(t) >= LOG_INTERVAL_MS);
        if due {
            self.last[which] = Some(now);
        }
        due
    }
}

pub struct Proxy {
    cfg: ProxyConfig,
    dir: Directory,
    flows: FlowTable,
    frags: FragTable,
    park: ParkingLot,
    stats: Stats,
    gate: LogGate,
    /// The peer the last [`Action::SendToPeer`] went to, for [`Proxy::count_followers`].
    last_peer: Option<Handle>,
}

impl Proxy {
    pub fn new(mut cfg: ProxyConfig) -> Proxy {
        // Every IPv4 link carries 576 bytes (RFC 791), and our ICMP errors are at most that
        // long, so they never trigger "fragmentation needed" themselves.
        cfg.tunnel_mtu = cfg.tunnel_mtu.max(576);
        let hasher = Hasher::default();
        let c = cfg.capacity;
        Proxy {
            dir: Directory::new(
                Capacities {
                    instances: c.instances,
                    services: c.services,
                    jobs: c.jobs,
                    peers: c.peers,
                },
                hasher.clone(),
            ),
            flows: FlowTable::new(c.flows, hasher.clone()),
            frags: FragTable::new(c.fragments, hasher.clone()),
            park: ParkingLot::new(
                c.park_slots,
                c.park_slot_bytes,
                c.park_per_destination,
                hasher,
            ),
            stats: Stats::default(),
            gate: LogGate { last: [None; 2] },
            last_peer: None,
            cfg,
        }
    }

    /// Counts `packets` more packets (`bytes` in all) from the TUN device sent the way the
    /// last one went to its peer: the other segments of a TCP super-segment, which the data
    /// plane translates with the first one's decision instead of one by one.
    pub fn count_followers(&mut self, packets: u64, bytes: u64) {
        self.stats.from_tun += packets;
        self.stats.to_peer += packets;
        if let Some(p) = self.last_peer.and_then(|h| self.dir.peer_mut(h)) {
            p.tx_packets += packets;
            p.tx_bytes += bytes;
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    pub fn directory(&self) -> &Directory {
        &self.dir
    }
    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }
    pub fn parked(&self) -> usize {
        self.park.parked()
    }
    pub fn evictions(&self) -> Evictions {
        let d = &self.dir.counters;
        Evictions {
            flows: self.flows.counters.evicted,
            instances: d.instance_evictions,
            services: d.service_evictions,
            jobs: d.job_evictions,
        }
    }

    // ---- control plane -------------------------------------------------------------------

    pub fn set_subnet(&mut self, s: NodeSubnet) {
        self.dir.set_subnet(s.v4);
    }

    /// A local instance got `nsip` (spec §3.2). `Ok(true)`: its job is new here, so the caller
    /// subscribes to `jobs/<job>/updates_available` and queries the job's table.
    pub fn deploy_local(
        &mut self,
        now: Millis,
        job: &JobName,
        instance_number: u32,
        nsip: Ipv4Addr,
    ) -> Result<bool, DirectoryError> {
        self.dir
            .deploy_local(now, job, instance_number, nsip)
            .map(|(_, new_job)| new_job)
    }

    /// Flows to or from it are decided again (or dropped) on their next packet.
    pub fn undeploy_local(&mut self, nsip: Ipv4Addr) -> bool {
        self.dir.undeploy_local(nsip).is_some()
    }

    /// Applies a validated table query result and lets the packets parked for any address it
    /// covers go (they come out of [`Proxy::poll`]).
    pub fn apply_table_update(
        &mut self,
        now: Millis,
        u: &TableUpdate,
    ) -> Result<Applied, DirectoryError> {
        let applied = self.dir.apply(now, u);
        self.log_directory_pressure(now);
        for rec in &u.instances {
            for s in &rec.service_ips {
                self.park.resolve(s.addr);
            }
        }
        if let Some(k) = u.query_key.as_deref().and_then(|k| k.trim().parse().ok()) {
            self.park.resolve(k);
        }
        applied
    }

    /// A job's interest lapsed (no traffic for `interest_ms`, nothing local): its entries are
    /// gone; the caller publishes `interest/remove` and unsubscribes. Call until `None`.
    pub fn poll_interest(&mut self, now: Millis) -> Option<JobName> {
        let timeouts = self.cfg.timeouts;
        self.flows
            .expire(now, 256, |f| idle_ms(&timeouts, f.fwd.proto));
        let cutoff = Millis(now.0.saturating_sub(self.cfg.timeouts.interest_ms));
        if now.0 < self.cfg.timeouts.interest_ms {
            return None;
        }
        self.dir.lapsed_job(now, cutoff)
    }

    /// When [`Proxy::poll`] next has work (a parked packet's deadline), if ever.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.park.next_deadline()
    }

    /// Releases parked packets whose query was answered (translated and sent now) or timed
    /// out (answered with ICMP host unreachable). Call until `None`.
    pub fn poll(&mut self, now: Millis, buf: &mut [u8]) -> Option<Action> {
        let r = self.park.take_ready(now, buf)?;
        self.stats.released += 1;
        if r.timed_out {
            self.stats.query_timeouts += 1;
        }
        // Re-run even after a timeout: another answer (e.g. for the job) may have covered it.
        Some(self.outgoing(now, buf, r.len, false))
    }

    // ---- data plane ----------------------------------------------------------------------

    /// Translates the packet in `buf[..len]` in place. `buf` may be longer than the packet:
    /// ICMP errors are built in it and need up to 576 bytes.
    pub fn on_packet(&mut self, now: Millis, buf: &mut [u8], len: usize, from: Source) -> Action {
        let len = len.min(buf.len());
        match from {
            Source::Tun => {
                self.stats.from_tun += 1;
                self.outgoing(now, buf, len, true)
            }
            Source::Peer(_) => {
                self.stats.from_peer += 1;
                self.incoming(now, buf, len, true)
            }
        }
    }

    fn drop(&mut self, r: DropReason) -> Action {
        self.stats.drops[r.index()] += 1;
        Action::Drop(r)
    }

    fn in_service_net(&self, ip: Ipv4Addr) -> bool {
        let p = u32::from(self.cfg.service_prefix.min(32));
        let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
        u32::from(ip) & mask == u32::from(self.cfg.service_net) & mask
    }

    /// Leaving a local instance (spec §3.3 "Outgoing"): dst ServiceIP → chosen instance's
    /// nsIP, src nsIP → the sender's InstanceIP; to the peer worker, or hairpinned.
    fn outgoing(&mut self, now: Millis, buf: &mut [u8], len: usize, may_park: bool) -> Action {
        let mut h = match packet::parse_ipv4(&buf[..len]) {
            Ok(h) => h,
            Err(m) => return self.drop(DropReason::Malformed(m)),
        };
        // The kernel never writes a bad header checksum to the TUN device, but the checksum is
        // updated incrementally below: a bad one would leave as a bad one (found by fuzzing).
        if !packet::ipv4_checksum_ok(buf, &h) {
            return self.drop(DropReason::BadIpChecksum);
        }
        if !self.in_service_net(h.dst) {
            return self.drop(DropReason::NotServiceAddress);
        }
        let Some((_, src_iip)) = self.dir.local_source(h.src) else {
            return self.drop(DropReason::UnknownSource);
        };
        let Some(src_iip) = src_iip else {
            return self.drop(DropReason::NoInstanceIp);
        };
        let frag_key = FragKey {
            src: h.src,
            dst: h.dst,
            id: h.id,
            proto: h.proto,
        };
        if !h.has_l4_header() {
            // Later fragments carry no ports: they follow the first fragment's decision.
            return match self
                .frags
                .lookup(now, &frag_key, self.cfg.timeouts.fragment_ms)
            {
                Some(d) => self.emit(now, buf, &mut h, d),
                None => self.drop(DropReason::FragmentWithoutFirst),
            };
        }
        let (local_port, remote_port) = match packet::parse_l4(&buf[..h.total_len], &h) {
            Ok(L4::Ports { src, dst }) => (src, dst),
            Ok(L4::Echo { ident, .. }) => (ident, 0),
            Ok(L4::IcmpError { .. }) => return self.outgoing_icmp_error(now, buf, h, src_iip),
            Ok(L4::Other) => return self.drop(DropReason::UnsupportedProtocol),
            Err(m) => return self.drop(DropReason::Malformed(m)),
        };
        let fwd = FlowKey {
            proto: h.proto,
            local: h.src,
            local_port,
            remote: h.dst,
            remote_port,
        };
        let timeouts = self.cfg.timeouts;
        let idle = idle_ms(&timeouts, h.proto);
        let mut flow = self
            .flows
            .lookup_fwd(now, &fwd, idle)
            .and_then(|fh| self.flows.get(fh).map(|f| (fh, *f)));
        if let Some((fh, f)) = flow {
            // The instance it was pinned to is gone (undeployed, replaced): decide again.
            let alive = self
                .dir
                .instance(f.target)
                .is_some_and(|e| e.nsip == f.target_nsip);
            if !alive || f.src_instance_ip != src_iip {
                self.flows.remove(fh);
                flow = None;
            }
        }
        let f = match flow {
            Some((_, f)) => {
                self.dir.touch(now, f.target, None);
                f
            }
            None => {
                let Some(svc) = self.dir.service(h.dst) else {
                    return self.miss(now, buf, &h, may_park);
                };
                let Some(target) = self.dir.choose(svc) else {
                    return self.miss(now, buf, &h, may_park);
                };
                let Some(t) = self.dir.instance(target) else {
                    return self.miss(now, buf, &h, may_park);
                };
                let f = Flow {
                    fwd,
                    // Replies come from the target's InstanceIP; an instance that has none
                    // yet can only answer from the address that was dialled.
                    reply_from: t.instance_ip.unwrap_or(h.dst),
                    target,
                    target_nsip: t.nsip,
                    src_instance_ip: src_iip,
                };
                let (_, evicted) = self
                    .flows
                    .insert(now, f, |f| idle_ms(&timeouts, f.fwd.proto));
                if evicted.is_some() && self.gate.open(now, GATE_FLOWS) {
                    log::warn!(
                        "flow table full ({} flows): evicted the least recently used live flow \
                         ({} so far); raise the flow capacity",
                        self.flows.capacity(),
                        self.flows.counters.evicted
                    );
                }
                self.dir.touch(now, target, Some(svc));
                f
            }
        };
        let peer = self.dir.instance(f.target).and_then(|e| e.peer);
        let d = FragDecision {
            new_src: Some(f.src_instance_ip),
            new_dst: Some(f.target_nsip),
            peer,
            hairpin: peer.is_none(),
        };
        if h.more_fragments {
            self.frags.record(now, frag_key, d, timeouts.fragment_ms);
        }
        self.emit(now, buf, &mut h, d)
    }

    fn emit(&mut self, now: Millis, buf: &mut [u8], h: &mut Ipv4Header, d: FragDecision) -> Action {
        match d.peer {
            Some(ph) => {
                let Some(addr) = self.dir.peer_addr(ph) else {
                    return self.drop(DropReason::PeerGone);
                };
                if h.total_len > usize::from(self.cfg.tunnel_mtu) && h.dont_fragment {
                    // Before rewriting: the quoted header must be what the sender sent, so its
                    // kernel finds the socket and lowers the path MTU (RFC 1191).
                    let from = h.dst;
                    return self.icmp_error(
                        buf,
                        h,
                        icmp::CODE_FRAG_NEEDED,
                        self.cfg.tunnel_mtu,
                        from,
                    );
                }
                packet::rewrite_addrs(buf, h, d.new_src, d.new_dst);
                self.last_peer = Some(ph);
                if let Some(p) = self.dir.peer_mut(ph) {
                    p.tx_packets += 1;
                    p.tx_bytes += h.total_len as u64;
                }
                self.stats.to_peer += 1;
                Action::SendToPeer {
                    peer: addr,
                    len: h.total_len,
                }
            }
            None => {
                packet::rewrite_addrs(buf, h, d.new_src, d.new_dst);
                self.stats.hairpin += 1;
                // A local target: the packet takes the incoming path directly (spec §3.3 6).
                self.incoming(now, buf, h.total_len, false)
            }
        }
    }

    /// No table entry for the destination: park and query, or, for a packet already released
    /// from parking, tell the sender it is unreachable.
    fn miss(&mut self, now: Millis, buf: &mut [u8], h: &Ipv4Header, may_park: bool) -> Action {
        if !may_park {
            return self.icmp_error(buf, h, icmp::CODE_HOST_UNREACHABLE, 0, h.dst);
        }
        match self.park.park(
            now,
            h.dst,
            &buf[..h.total_len],
            self.cfg.timeouts.table_query_ms,
        ) {
            Ok(p) => {
                self.stats.parked += 1;
                if p == Parked::NewQuery {
                    self.stats.queries += 1;
                }
                Action::Park {
                    query: (p == Parked::NewQuery).then_some(h.dst),
                }
            }
            Err(r) => self.drop(DropReason::ParkRefused(r)),
        }
    }

    /// Sourced from the address the sender dialled: a local address as source would be
    /// dropped by the kernel as a martian when written to the TUN.
    fn icmp_error(
        &mut self,
        buf: &mut [u8],
        h: &Ipv4Header,
        code: u8,
        mtu: u16,
        from: Ipv4Addr,
    ) -> Action {
        match icmp::build_unreachable(buf, h, code, mtu, from) {
            Some(len) => {
                self.stats.icmp_sent += 1;
                Action::IcmpReply { len }
            }
            None => self.drop(DropReason::BufferTooSmall),
        }
    }

    /// Arriving for a local instance (spec §3.3 "Ingoing"): a reply to a flow we opened gets
    /// its source mapped back to the service IP that was dialled; anything else goes to the
    /// TUN unchanged. Unlike upstream, the destination must be a local instance and the source
    /// an overlay address (§8 item 3).
    fn incoming(&mut self, now: Millis, buf: &mut [u8], len: usize, from_peer: bool) -> Action {
        let mut h = match packet::parse_ipv4(&buf[..len]) {
            Ok(h) => h,
            Err(m) => return self.drop(DropReason::Malformed(m)),
        };
        if from_peer && !packet::ipv4_checksum_ok(buf, &h) {
            return self.drop(DropReason::BadIpChecksum);
        }
        if !self.dir.is_local_instance(h.dst) {
            return self.drop(DropReason::NotForLocalInstance);
        }
        if !self.in_service_net(h.src) {
            return self.drop(DropReason::SourceNotServiceAddress);
        }
        let frag_key = FragKey {
            src: h.src,
            dst: h.dst,
            id: h.id,
            proto: h.proto,
        };
        let timeouts = self.cfg.timeouts;
        if !h.has_l4_header() {
            return match self.frags.lookup(now, &frag_key, timeouts.fragment_ms) {
                Some(d) => {
                    packet::rewrite_addrs(buf, &mut h, d.new_src, None);
                    self.stats.to_tun += 1;
                    Action::WriteToTun { len: h.total_len }
                }
                None => self.drop(DropReason::FragmentWithoutFirst),
            };
        }
        let (local_port, remote_port) = match packet::parse_l4(&buf[..h.total_len], &h) {
            Ok(L4::Ports { src, dst }) => (dst, src),
            Ok(L4::Echo { ident, .. }) => (ident, 0),
            Ok(L4::IcmpError { .. }) => return self.incoming_icmp_error(now, buf, h),
            Ok(L4::Other) => return self.drop(DropReason::UnsupportedProtocol),
            Err(m) => return self.drop(DropReason::Malformed(m)),
        };
        let rev = FlowKey {
            proto: h.proto,
            local: h.dst,
            local_port,
            remote: h.src,
            remote_port,
        };
        let mut new_src = None;
        if let Some(fh) = self
            .flows
            .lookup_rev(now, &rev, idle_ms(&timeouts, h.proto))
        {
            if let Some(f) = self.flows.get(fh).copied() {
                new_src = Some(f.fwd.remote).filter(|s| *s != h.src);
                self.dir.touch(now, f.target, None);
            }
        }
        if h.more_fragments {
            let d = FragDecision {
                new_src,
                new_dst: None,
                peer: None,
                hairpin: false,
            };
            self.frags.record(now, frag_key, d, timeouts.fragment_ms);
        }
        packet::rewrite_addrs(buf, &mut h, new_src, None);
        self.stats.to_tun += 1;
        Action::WriteToTun { len: h.total_len }
    }

    /// An ICMP error from a local instance about a packet it received over the overlay. On
    /// the wire the quote must read as the packet travelled between the workers (sender's
    /// InstanceIP → our nsIP), so the far side can map it back; the outer packet is
    /// translated like a reply.
    fn outgoing_icmp_error(
        &mut self,
        now: Millis,
        buf: &mut [u8],
        mut h: Ipv4Header,
        src_iip: Ipv4Addr,
    ) -> Action {
        let mut q = match packet::parse_quoted(buf, &h) {
            Ok(q) if q.dst == h.src => q,
            Ok(_) => return self.drop(DropReason::IcmpErrorNotTranslated),
            Err(m) => return self.drop(DropReason::Malformed(m)),
        };
        // The quoted packet, seen from our instance, is the remote end talking to it.
        let key = FlowKey {
            proto: q.proto,
            local: q.dst,
            local_port: q.dst_port,
            remote: q.src,
            remote_port: q.src_port,
        };
        let idle = idle_ms(&self.cfg.timeouts, q.proto);
        let flow = self
            .flows
            .lookup_fwd(now, &key, idle)
            .and_then(|fh| self.flows.get(fh).copied());
        let (target, quoted_src) = match flow {
            // our instance had dialled a service IP: the quote's source becomes the instance
            // that really sent it, as it was on the wire
            Some(f) => (Some(f.target), Some(f.reply_from).filter(|r| *r != q.src)),
            // the quote's source is already an InstanceIP: find that instance
            None => (
                self.dir
                    .service(h.dst)
                    .and_then(|s| self.dir.first_candidate(s)),
                None,
            ),
        };
        let Some((nsip, peer)) = target
            .and_then(|t| self.dir.instance(t))
            .map(|e| (e.nsip, e.peer))
        else {
            return self.drop(DropReason::IcmpErrorNotTranslated);
        };
        packet::rewrite_quoted(buf, &h, &mut q, quoted_src, None);
        let d = FragDecision {
            new_src: Some(src_iip),
            new_dst: Some(nsip),
            peer,
            hairpin: peer.is_none(),
        };
        self.emit(now, buf, &mut h, d)
    }

    /// An ICMP error for a local instance about a packet it sent through the overlay: the
    /// quote is mapped back to what the instance sent (its nsIP → the address it dialled), the
    /// outer source to that dialled address.
    fn incoming_icmp_error(&mut self, now: Millis, buf: &mut [u8], mut h: Ipv4Header) -> Action {
        let mut q = match packet::parse_quoted(buf, &h) {
            Ok(q) => q,
            Err(m) => return self.drop(DropReason::Malformed(m)),
        };
        let rev = FlowKey {
            proto: q.proto,
            local: h.dst,
            local_port: q.src_port,
            remote: h.src,
            remote_port: q.dst_port,
        };
        let idle = idle_ms(&self.cfg.timeouts, q.proto);
        if let Some(f) = self
            .flows
            .lookup_rev(now, &rev, idle)
            .and_then(|fh| self.flows.get(fh).copied())
        {
            packet::rewrite_quoted(buf, &h, &mut q, Some(f.fwd.local), Some(f.fwd.remote));
            let outer_src = Some(f.fwd.remote).filter(|s| *s != h.src);
            packet::rewrite_addrs(buf, &mut h, outer_src, None);
        } else if q.src != h.dst {
            // Not a flow we opened: the quote names our instance by its InstanceIP; give the
            // instance its own address back so its kernel finds the socket.
            packet::rewrite_quoted(buf, &h, &mut q, Some(h.dst), None);
        }
        self.stats.to_tun += 1;
        Action::WriteToTun { len: h.total_len }
    }

    fn log_directory_pressure(&mut self, now: Millis) {
        let c = self.dir.counters;
        let pressure = c.instance_evictions
            + c.service_evictions
            + c.job_evictions
            + c.peer_table_full
            + c.candidates_overflow
            + c.instance_table_full;
        if pressure > 0 && self.gate.open(now, GATE_DIRECTORY) {
            log::warn!(
                "overlay tables under pressure: {} instance, {} service, {} job evictions; \
                 {} peer-table-full, {} instance-table-full, {} candidate overflows; raise the capacities",
                c.instance_evictions, c.service_evictions, c.job_evictions,
                c.peer_table_full, c.instance_table_full, c.candidates_overflow
            );
        }
    }

    /// The instance handle a flow key is pinned to (tests and diagnostics).
    pub fn flow_target(&mut self, now: Millis, k: &FlowKey) -> Option<Handle> {
        let idle = idle_ms(&self.cfg.timeouts, k.proto);
        let h = self.flows.lookup_fwd(now, k, idle)?;
        self.flows.get(h).map(|f| f.target)
    }
}

fn idle_ms(t: &Timeouts, proto: u8) -> u64 {
    match proto {
        PROTO_TCP => t.tcp_idle_ms,
        PROTO_UDP => t.udp_idle_ms,
        PROTO_ICMP => t.icmp_idle_ms,
        _ => t.udp_idle_ms,
    }
}
