//! Hostile input (issue #5): whatever arrives on the tunnel port or the TUN device — random
//! bytes, valid packets cut short or bit-flipped, nonsense header fields, spoofed sources —
//! the engine must not panic, must not forward anything it could not parse, and must count
//! every packet it drops exactly once. Property tests over the pure engine, so they need no
//! root and run in every `cargo test`.

use netstack::control::{JobName, NodeSubnet, TableQueryResult};
use netstack::craft::{self, Ip};
use netstack::gso::{Coalescer, Segmenter, VnetHdr};
use netstack::packet;
use netstack::{Action, Millis, Proxy, ProxyConfig, Source};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddrV4};

const A_NS: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 2);
const A_IIP: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 2);
const B_IIP: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 3);
const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 50103);
const FRONT: &str = "shop.prod.front.prod";

/// Cases per property; overridable so a soak run can go much further than CI does.
fn cases() -> u32 {
    std::env::var("OAK_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// A worker with one local instance that already knows its own InstanceIP, so valid packets
/// get past the cheap checks and reach the translation paths.
fn engine() -> Proxy {
    let mut p = Proxy::new(ProxyConfig::default());
    p.set_subnet(NodeSubnet {
        v4: Ipv4Addr::new(10, 18, 0, 0),
        v6: None,
    });
    let job = JobName::parse(FRONT).unwrap();
    assert_eq!(p.deploy_local(Millis(0), &job, 0, A_NS), Ok(true));
    let json = format!(
        r#"{{"app_name":"{FRONT}","query_key":"{FRONT}","instance_list":[{{"instance_number":0,"namespace_ip":"{A_NS}","host_ip":"{}","host_port":{},"service_ip":[{{"IpType":"instance_ip","Address":"{A_IIP}"}}]}}]}}"#,
        PEER.ip(),
        PEER.port()
    );
    let upd = TableQueryResult::decode(json.as_bytes())
        .unwrap()
        .validate(Ipv4Addr::new(10, 30, 0, 0), 16)
        .unwrap();
    p.apply_table_update(Millis(0), &upd).unwrap();
    p
}

struct Fuzz {
    p: Proxy,
    now: u64,
    ran: u64,
    dropped: u64,
    forwarded: u64,
}

impl Fuzz {
    fn new() -> Fuzz {
        Fuzz {
            p: engine(),
            now: 1,
            ran: 0,
            dropped: 0,
            forwarded: 0,
        }
    }

    /// Feeds one input and checks the engine's contract for it.
    fn feed(&mut self, bytes: &[u8], from_peer: bool) -> Result<(), TestCaseError> {
        let mut buf = [0u8; 2048];
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        let before = *self.p.stats();
        self.now += 7;
        let from = if from_peer {
            Source::Peer(PEER)
        } else {
            Source::Tun
        };
        let act = self.p.on_packet(Millis(self.now), &mut buf, n, from);
        let after = *self.p.stats();
        self.ran += 1;
        let drops = |s: &netstack::proxy::Stats| s.drops.iter().sum::<u64>();
        prop_assert_eq!(
            after.from_peer + after.from_tun,
            before.from_peer + before.from_tun + 1
        );
        match act {
            Action::Drop(r) => {
                self.dropped += 1;
                prop_assert_eq!(after.dropped(r), before.dropped(r) + 1, "{:?}", r);
                prop_assert_eq!(drops(&after), drops(&before) + 1);
            }
            Action::SendToPeer { len, .. }
            | Action::WriteToTun { len }
            | Action::IcmpReply { len } => {
                self.forwarded += 1;
                prop_assert_eq!(drops(&after), drops(&before));
                prop_assert!(len <= buf.len() && len >= 20, "len {}", len);
                let out = &buf[..len];
                // Whatever leaves must itself be a well-formed IPv4 packet.
                prop_assert!(
                    packet::parse_ipv4(out).is_ok(),
                    "forwarded unparsable {:02x?}",
                    out
                );
                prop_assert!(
                    craft::ip_checksum_ok(out),
                    "bad IP checksum out {:02x?}",
                    out
                );
            }
            Action::Park { .. } => {
                self.forwarded += 1;
                prop_assert_eq!(drops(&after), drops(&before));
                prop_assert_eq!(after.parked, before.parked + 1);
            }
        }
        // Let timers run too: expiry and parked-packet timeouts also see hostile state.
        if self.ran % 64 == 0 {
            self.p.poll_interest(Millis(self.now));
            while let Some(a) = self.p.poll(Millis(self.now), &mut buf) {
                if let Action::SendToPeer { len, .. } | Action::WriteToTun { len } = a {
                    prop_assert!(len <= buf.len());
                }
            }
        }
        Ok(())
    }

    fn report(&self, name: &str) {
        eprintln!(
            "hostile {name}: {} cases ran ({} dropped and counted, {} forwarded/parked)",
            self.ran, self.dropped, self.forwarded
        );
    }
}

#[test]
fn arbitrary_bytes_are_dropped_and_counted() {
    let f = RefCell::new(Fuzz::new());
    runner()
        .run(
            &(
                proptest::collection::vec(any::<u8>(), 0..2000),
                any::<bool>(),
            ),
            |(bytes, peer)| f.borrow_mut().feed(&bytes, peer),
        )
        .unwrap();
    let f = f.into_inner();
    f.report("arbitrary bytes");
    assert!(f.dropped > 0);
}

/// A valid packet of each kind, in both directions of the walk-through, before mutation.
fn valid(kind: u8, peer: bool, spoof: Option<u32>, payload: &[u8], buf: &mut [u8]) -> usize {
    let (mut src, dst) = if peer { (B_IIP, A_IIP) } else { (A_NS, B_IIP) };
    if let Some(s) = spoof {
        src = Ipv4Addr::from(s);
    }
    let ip = Ip::new(src, dst);
    match kind % 4 {
        0 => craft::tcp(buf, &ip, 40000, 80, 0x02, payload),
        1 => craft::tcp(buf, &ip, 80, 40000, 0x12, payload),
        2 => craft::udp(buf, &ip, 5353, 53, payload),
        _ => craft::icmp_echo(buf, &ip, true, 7, 1, payload),
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(Vec<(usize, u8)>),
    Version(u8),
    Ihl(u8),
    TotalLength(u16),
    Fragment(u16),
    Protocol(u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0usize..1600).prop_map(Mutation::Truncate),
        proptest::collection::vec((0usize..1600, 1u8..=255), 1..6).prop_map(Mutation::Flip),
        (0u8..16).prop_map(Mutation::Version),
        (0u8..16).prop_map(Mutation::Ihl),
        any::<u16>().prop_map(Mutation::TotalLength),
        any::<u16>().prop_map(Mutation::Fragment),
        any::<u8>().prop_map(Mutation::Protocol),
    ]
}

/// Rewrites the header checksum after a field mutation, so the packet reaches the checks
/// behind the checksum instead of always failing on it.
fn refresh_csum(pkt: &mut [u8], fix: bool) {
    if !fix || pkt.len() < 20 {
        return;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let end = ihl.clamp(20, pkt.len());
    pkt[10] = 0;
    pkt[11] = 0;
    let mut sum: u32 = 0;
    for c in pkt[..end].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    pkt[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[test]
fn mutated_valid_packets_are_dropped_and_counted() {
    let f = RefCell::new(Fuzz::new());
    let strat = (
        any::<u8>(),
        any::<bool>(),
        proptest::option::of(any::<u32>()),
        proptest::collection::vec(any::<u8>(), 0..1400),
        mutation(),
        any::<bool>(),
    );
    runner()
        .run(&strat, |(kind, peer, spoof, payload, m, fix)| {
            let mut pkt = [0u8; 2048];
            let mut n = valid(kind, peer, spoof, &payload, &mut pkt);
            match m {
                Mutation::Truncate(l) => n = n.min(l),
                Mutation::Flip(fl) => {
                    for (i, x) in fl {
                        pkt[i % n] ^= x;
                    }
                }
                Mutation::Version(v) => pkt[0] = (v << 4) | (pkt[0] & 0x0f),
                Mutation::Ihl(v) => pkt[0] = (pkt[0] & 0xf0) | v,
                Mutation::TotalLength(v) => pkt[2..4].copy_from_slice(&v.to_be_bytes()),
                Mutation::Fragment(v) => pkt[6..8].copy_from_slice(&v.to_be_bytes()),
                Mutation::Protocol(v) => pkt[9] = v,
            }
            refresh_csum(&mut pkt[..n], fix);
            f.borrow_mut().feed(&pkt[..n], peer)
        })
        .unwrap();
    let f = f.into_inner();
    f.report("mutated packets");
    assert!(
        f.dropped > 0 && f.forwarded > 0,
        "mutations must hit both outcomes"
    );
}

#[test]
fn gso_entry_points_survive_arbitrary_frames() {
    let ran = RefCell::new(0u64);
    let co = RefCell::new(Coalescer::new());
    let strat = (
        proptest::collection::vec(any::<u8>(), 0..3000),
        any::<u16>(),
        any::<bool>(),
    );
    runner()
        .run(&strat, |(bytes, mss, valid_start)| {
            *ran.borrow_mut() += 1;
            let _ = VnetHdr::parse(&bytes);
            let mut pkt = bytes.clone();
            if valid_start && pkt.len() >= 60 {
                // Start from a real TCP header so the segmenter gets past its first checks.
                let mut b = [0u8; 64];
                let n = craft::tcp(&mut b, &Ip::new(A_NS, B_IIP), 1, 2, 0x18, &[]);
                pkt[..n].copy_from_slice(&b[..n]);
            }
            if let Ok(seg) = Segmenter::new(&pkt, mss) {
                let mut out = [0u8; 4096];
                for i in 0..seg.count().min(64) {
                    let l = seg.len(i);
                    prop_assert!(l <= out.len(), "segment {} of {} bytes", i, l);
                    let w = seg.write(&pkt, i, &mut out);
                    prop_assert!(w <= l);
                    let (h, off, len) = seg.write_header(&pkt, i, &mut out);
                    prop_assert!(h + len == w && off + len <= pkt.len());
                }
            }
            let mut c = co.borrow_mut();
            if !c.push(&pkt) && !c.is_empty() {
                let _ = c.take();
                let _ = c.push(&pkt);
            }
            Ok(())
        })
        .unwrap();
    eprintln!("hostile gso: {} cases ran", ran.into_inner());
}
