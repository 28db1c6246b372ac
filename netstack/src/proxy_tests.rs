//! Unit tests of the translation engine: the packet walk-through of spec overlay-network §5
//! with hand-built bytes, round robin, fragments, MTU, parking, full tables, hostile input.

use crate::control::{JobName, NodeSubnet, TableQueryResult, TableUpdate};
use crate::craft::{self, Ip};
use crate::flows::FlowKey;
use crate::icmp;
use crate::packet::{Malformed, PROTO_TCP, PROTO_UDP};
use crate::park::ParkRefused;
use crate::proxy::{Action, DropReason, Proxy, ProxyConfig, Source};
use crate::Millis;
use std::net::{Ipv4Addr, SocketAddrV4};

const A_NS: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 2);
const A_IIP: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 2);
const B_NS: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 66);
const B_IIP: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 3);
const API_RR: Ipv4Addr = Ipv4Addr::new(10, 30, 1, 30);
const W1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 50103);
const W2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 20), 50103);
const FRONT: &str = "shop.prod.front.prod";
const API: &str = "shop.prod.api.prod";

/// (nsip, host, InstanceIP, extra service IP with its type)
type Entry<'a> = (
    Ipv4Addr,
    SocketAddrV4,
    Ipv4Addr,
    Option<(&'a str, Ipv4Addr)>,
);
type Builder<'a> = &'a dyn Fn(&mut [u8]) -> usize;

fn job(s: &str) -> JobName {
    JobName::parse(s).unwrap()
}

/// One instance entry as the CSM sends it: (nsip, host, instance ip, extra service IP).
fn update(app: &str, key: &str, list: &[Entry]) -> TableUpdate {
    let items: Vec<String> = list
        .iter()
        .enumerate()
        .map(|(n, (ns, host, iip, extra))| {
            let mut sips = vec![format!(r#"{{"IpType":"instance_ip","Address":"{iip}"}}"#)];
            if let Some((t, a)) = extra {
                sips.insert(0, format!(r#"{{"IpType":"{t}","Address":"{a}"}}"#));
            }
            format!(
                r#"{{"instance_number":{n},"namespace_ip":"{ns}","host_ip":"{}","host_port":{},"service_ip":[{}]}}"#,
                host.ip(),
                host.port(),
                sips.join(",")
            )
        })
        .collect();
    let json = format!(
        r#"{{"app_name":"{app}","query_key":"{key}","instance_list":[{}]}}"#,
        items.join(",")
    );
    TableQueryResult::decode(json.as_bytes())
        .unwrap()
        .validate(Ipv4Addr::new(10, 30, 0, 0), 16)
        .unwrap()
}

fn front_update() -> TableUpdate {
    update(FRONT, FRONT, &[(A_NS, W1, A_IIP, None)])
}
fn api_update() -> TableUpdate {
    update(
        API,
        "10.30.1.30",
        &[(B_NS, W2, B_IIP, Some(("RR", API_RR)))],
    )
}

fn cfg() -> ProxyConfig {
    ProxyConfig::default()
}

/// Worker 1 of the walk-through, with A deployed and its own table entry known.
fn worker1(cfg: ProxyConfig) -> Proxy {
    let mut p = Proxy::new(cfg);
    p.set_subnet(NodeSubnet {
        v4: Ipv4Addr::new(10, 18, 0, 0),
        v6: None,
    });
    assert_eq!(p.deploy_local(Millis(0), &job(FRONT), 0, A_NS), Ok(true));
    p.apply_table_update(Millis(0), &front_update()).unwrap();
    p
}

fn worker2(cfg: ProxyConfig) -> Proxy {
    let mut p = Proxy::new(cfg);
    p.set_subnet(NodeSubnet {
        v4: Ipv4Addr::new(10, 18, 0, 64),
        v6: None,
    });
    p.deploy_local(Millis(0), &job(API), 0, B_NS).unwrap();
    p.apply_table_update(Millis(0), &api_update()).unwrap();
    p
}

fn assert_valid(pkt: &[u8]) {
    assert!(craft::ip_checksum_ok(pkt), "IP checksum {pkt:02x?}");
    assert!(craft::l4_checksum_ok(pkt), "L4 checksum {pkt:02x?}");
}

#[test]
fn walkthrough_syn_and_synack_across_two_workers() {
    let mut w1 = worker1(cfg());
    let mut w2 = worker2(cfg());
    let mut buf = [0u8; 2048];

    // 1-3: A's SYN to the RR IP misses the table: parked, one query.
    let n = craft::tcp(&mut buf, &Ip::new(A_NS, API_RR), 40000, 80, 0x02, b"");
    let syn: Vec<u8> = buf[..n].to_vec();
    assert_eq!(
        w1.on_packet(Millis(10), &mut buf, n, Source::Tun),
        Action::Park {
            query: Some(API_RR)
        }
    );
    assert_eq!(
        w1.poll(Millis(11), &mut buf),
        None,
        "nothing released before the answer"
    );
    // the CSM answers; the parked SYN is released, translated (4-6)
    w1.apply_table_update(Millis(20), &api_update()).unwrap();
    let Some(Action::SendToPeer { peer, len }) = w1.poll(Millis(20), &mut buf) else {
        panic!("SYN not released")
    };
    assert_eq!(peer, W2);
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (A_IIP, B_NS));
    assert_eq!(craft::ports(&buf), (40000, 80));
    assert_valid(&buf[..len]);
    // TTL, ID, flags and payload untouched; only addresses and checksums differ
    for i in (0..len).filter(|i| !matches!(i, 10 | 11 | 12..=19 | 36 | 37)) {
        assert_eq!(buf[i], syn[i], "byte {i} changed");
    }
    assert_eq!(w1.poll(Millis(20), &mut buf), None);

    // 7: W2 receives it; no reverse entry, so it goes to the TUN unchanged.
    let wire: Vec<u8> = buf[..len].to_vec();
    assert_eq!(
        w2.on_packet(Millis(30), &mut buf, len, Source::Peer(W1)),
        Action::WriteToTun { len }
    );
    assert_eq!(&buf[..len], &wire[..]);

    // 8-9: B's SYN-ACK to A's InstanceIP: W2 misses, queries, then tunnels to W1.
    let n = craft::tcp(&mut buf, &Ip::new(B_NS, A_IIP), 80, 40000, 0x12, b"");
    assert_eq!(
        w2.on_packet(Millis(40), &mut buf, n, Source::Tun),
        Action::Park { query: Some(A_IIP) }
    );
    w2.apply_table_update(Millis(41), &front_update()).unwrap();
    let Some(Action::SendToPeer { peer, len }) = w2.poll(Millis(41), &mut buf) else {
        panic!()
    };
    assert_eq!(peer, W1);
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (B_IIP, A_NS));
    assert_valid(&buf[..len]);

    // 10: W1 maps the source back to the RR IP A dialled.
    assert_eq!(
        w1.on_packet(Millis(50), &mut buf, len, Source::Peer(W2)),
        Action::WriteToTun { len }
    );
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (API_RR, A_NS));
    assert_eq!(craft::ports(&buf), (80, 40000));
    assert_valid(&buf[..len]);

    // Steady state: the next packets need no query on either side.
    let n = craft::tcp(&mut buf, &Ip::new(A_NS, API_RR), 40000, 80, 0x10, b"GET /");
    assert_eq!(
        w1.on_packet(Millis(60), &mut buf, n, Source::Tun),
        Action::SendToPeer { peer: W2, len: n }
    );
    assert_valid(&buf[..n]);
    assert_eq!(w1.stats().queries, 1);
    assert_eq!(w2.stats().queries, 1);
}

#[test]
fn udp_and_instance_ip_dialled_directly() {
    let mut w1 = worker1(cfg());
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    let mut buf = [0u8; 2048];
    // dialling B's InstanceIP works like the RR IP (spec §5 "Afterwards")
    let n = craft::udp(&mut buf, &Ip::new(A_NS, B_IIP), 5353, 53, b"query");
    assert_eq!(
        w1.on_packet(Millis(1), &mut buf, n, Source::Tun),
        Action::SendToPeer { peer: W2, len: n }
    );
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (A_IIP, B_NS));
    assert_valid(&buf[..n]);
    // reply from B (W2 rewrote its source to B's InstanceIP); source stays B_IIP here
    let n = craft::udp(&mut buf, &Ip::new(B_IIP, A_NS), 53, 5353, b"answer");
    assert_eq!(
        w1.on_packet(Millis(2), &mut buf, n, Source::Peer(W2)),
        Action::WriteToTun { len: n }
    );
    assert_eq!(craft::src(&buf), B_IIP);
    assert_valid(&buf[..n]);
}

#[test]
fn udp_without_checksum_stays_without() {
    let mut w1 = worker1(cfg());
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    let mut buf = [0u8; 256];
    let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 1000, 2000, b"x");
    buf[26] = 0;
    buf[27] = 0;
    w1.on_packet(Millis(1), &mut buf, n, Source::Tun);
    assert_eq!(&buf[26..28], &[0, 0]);
    assert!(craft::ip_checksum_ok(&buf[..n]));
}

#[test]
fn ping_to_a_service_ip_is_translated_both_ways() {
    let mut w1 = worker1(cfg());
    let mut w2 = worker2(cfg());
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    w2.apply_table_update(Millis(0), &front_update()).unwrap();
    let mut buf = [0u8; 256];
    let n = craft::icmp_echo(&mut buf, &Ip::new(A_NS, API_RR), true, 77, 1, b"ping");
    assert_eq!(
        w1.on_packet(Millis(1), &mut buf, n, Source::Tun),
        Action::SendToPeer { peer: W2, len: n }
    );
    assert_valid(&buf[..n]);
    assert_eq!(
        w2.on_packet(Millis(2), &mut buf, n, Source::Peer(W1)),
        Action::WriteToTun { len: n }
    );
    // B's kernel answers to A's InstanceIP
    let n = craft::icmp_echo(&mut buf, &Ip::new(B_NS, A_IIP), false, 77, 1, b"ping");
    assert_eq!(
        w2.on_packet(Millis(3), &mut buf, n, Source::Tun),
        Action::SendToPeer { peer: W1, len: n }
    );
    assert_eq!(
        w1.on_packet(Millis(4), &mut buf, n, Source::Peer(W2)),
        Action::WriteToTun { len: n }
    );
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (API_RR, A_NS));
    assert_eq!(buf[20], 0, "echo reply");
    assert_valid(&buf[..n]);
}

#[test]
fn hairpin_to_a_local_instance() {
    // B2 is on worker 1 too: A → RR IP → local instance, reply mapped back, all via the TUN.
    let b2_ns = Ipv4Addr::new(10, 18, 0, 3);
    let b2_iip = Ipv4Addr::new(10, 30, 0, 9);
    let mut w1 = worker1(cfg());
    w1.deploy_local(Millis(0), &job(API), 1, b2_ns).unwrap();
    w1.apply_table_update(
        Millis(0),
        &update(API, API, &[(b2_ns, W1, b2_iip, Some(("RR", API_RR)))]),
    )
    .unwrap();
    let mut buf = [0u8; 256];
    let n = craft::tcp(&mut buf, &Ip::new(A_NS, API_RR), 40000, 80, 0x02, b"");
    assert_eq!(
        w1.on_packet(Millis(1), &mut buf, n, Source::Tun),
        Action::WriteToTun { len: n }
    );
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (A_IIP, b2_ns));
    assert_valid(&buf[..n]);
    let n = craft::tcp(&mut buf, &Ip::new(b2_ns, A_IIP), 80, 40000, 0x12, b"");
    assert_eq!(
        w1.on_packet(Millis(2), &mut buf, n, Source::Tun),
        Action::WriteToTun { len: n }
    );
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (API_RR, A_NS));
    assert_valid(&buf[..n]);
    assert_eq!(w1.stats().hairpin, 2);
}

fn four_backends() -> (TableUpdate, Vec<Ipv4Addr>) {
    let hosts = [
        W2,
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 21), 50103),
    ];
    let list: Vec<_> = (0..4u8)
        .map(|i| {
            (
                Ipv4Addr::new(10, 18, 0, 66 + i),
                hosts[usize::from(i % 2)],
                Ipv4Addr::new(10, 30, 0, 10 + i),
                Some(("RR", API_RR)),
            )
        })
        .collect();
    let ns = list.iter().map(|l| l.0).collect();
    (update(API, API, &list), ns)
}

#[test]
fn round_robin_is_per_new_flow_and_flows_stick() {
    let mut w1 = worker1(cfg());
    let (u, backends) = four_backends();
    w1.apply_table_update(Millis(0), &u).unwrap();
    let mut buf = [0u8; 256];
    let mut counts = [0usize; 4];
    let mut first_choice = Vec::new();
    for sport in 0..400u16 {
        let n = craft::tcp(
            &mut buf,
            &Ip::new(A_NS, API_RR),
            10000 + sport,
            80,
            0x02,
            b"",
        );
        assert!(matches!(
            w1.on_packet(Millis(1), &mut buf, n, Source::Tun),
            Action::SendToPeer { .. }
        ));
        let i = backends
            .iter()
            .position(|b| *b == craft::dst(&buf))
            .unwrap();
        counts[i] += 1;
        first_choice.push(i);
    }
    assert_eq!(counts, [100; 4], "strict rotation over new flows");
    // consecutive new flows never hit the same backend
    assert!(first_choice.windows(2).all(|w| w[0] != w[1]));
    // existing flows keep their instance, packet after packet
    for round in 0..3 {
        for sport in 0..400u16 {
            let n = craft::tcp(
                &mut buf,
                &Ip::new(A_NS, API_RR),
                10000 + sport,
                80,
                0x10,
                b"data",
            );
            w1.on_packet(Millis(2 + round), &mut buf, n, Source::Tun);
            assert_eq!(craft::dst(&buf), backends[first_choice[usize::from(sport)]]);
        }
    }
}

#[test]
fn closest_prefers_a_local_instance() {
    let local_ns = Ipv4Addr::new(10, 18, 0, 5);
    let closest = Ipv4Addr::new(10, 30, 2, 2);
    let mut w1 = worker1(cfg());
    w1.deploy_local(Millis(0), &job(API), 1, local_ns).unwrap();
    let u = update(
        API,
        API,
        &[
            (B_NS, W2, B_IIP, Some(("Closest", closest))),
            (
                local_ns,
                W1,
                Ipv4Addr::new(10, 30, 0, 50),
                Some(("Closest", closest)),
            ),
        ],
    );
    w1.apply_table_update(Millis(0), &u).unwrap();
    let mut buf = [0u8; 256];
    for sport in 0..10 {
        let n = craft::udp(&mut buf, &Ip::new(A_NS, closest), 2000 + sport, 53, b"q");
        assert_eq!(
            w1.on_packet(Millis(1), &mut buf, n, Source::Tun),
            Action::WriteToTun { len: n }
        );
        assert_eq!(craft::dst(&buf), local_ns);
    }
}

#[test]
fn replaced_instances_move_their_flows_and_keep_the_others() {
    let mut w1 = worker1(cfg());
    let (u, backends) = four_backends();
    w1.apply_table_update(Millis(0), &u).unwrap();
    let mut buf = [0u8; 256];
    let mut chosen = Vec::new();
    for sport in 0..8u16 {
        let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 3000 + sport, 53, b"q");
        w1.on_packet(Millis(1), &mut buf, n, Source::Tun);
        chosen.push(craft::dst(&buf));
    }
    // backend 0 is undeployed: the next update lists only 1..3
    let (full, _) = four_backends();
    let mut fewer = full.clone();
    fewer.instances.retain(|r| r.nsip != backends[0]);
    let applied = w1.apply_table_update(Millis(2), &fewer).unwrap();
    assert_eq!(applied.removed, 1);
    for sport in 0..8u16 {
        let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 3000 + sport, 53, b"q");
        w1.on_packet(Millis(3), &mut buf, n, Source::Tun);
        let now = craft::dst(&buf);
        assert_ne!(now, backends[0]);
        if chosen[usize::from(sport)] != backends[0] {
            assert_eq!(now, chosen[usize::from(sport)], "a surviving flow moved");
        }
    }
}

#[test]
fn later_fragments_follow_the_first_both_ways() {
    let mut w1 = worker1(cfg());
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    let mut buf = [0u8; 2048];
    // first fragment: UDP header + 16 bytes, MF set
    let mut ip = Ip::new(A_NS, API_RR);
    ip.dont_fragment = false;
    ip.more_fragments = true;
    ip.id = 0xbeef;
    let mut l4 = [0u8; 24];
    l4[0..2].copy_from_slice(&4000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&53u16.to_be_bytes());
    l4[4..6].copy_from_slice(&40u16.to_be_bytes()); // whole datagram: 8 + 32
    l4[6..8].copy_from_slice(&0x1234u16.to_be_bytes());
    let n = craft::raw(&mut buf, &ip, PROTO_UDP, &l4);
    assert_eq!(
        w1.on_packet(Millis(1), &mut buf, n, Source::Tun),
        Action::SendToPeer { peer: W2, len: n }
    );
    assert_eq!(craft::dst(&buf), B_NS);
    assert!(craft::ip_checksum_ok(&buf[..n]));
    // second fragment: offset 3 (24 bytes), no ports, follows the first
    ip.more_fragments = false;
    ip.frag_offset = 3;
    let n = craft::raw(&mut buf, &ip, PROTO_UDP, &[0xaa; 16]);
    assert_eq!(
        w1.on_packet(Millis(2), &mut buf, n, Source::Tun),
        Action::SendToPeer { peer: W2, len: n }
    );
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (A_IIP, B_NS));
    assert_eq!(
        &buf[20..36],
        &[0xaa; 16],
        "payload of a later fragment is not touched"
    );
    assert!(craft::ip_checksum_ok(&buf[..n]));
    // a later fragment of an unknown datagram
    ip.id = 0xdead;
    let n = craft::raw(&mut buf, &ip, PROTO_UDP, &[0xaa; 16]);
    assert_eq!(
        w1.on_packet(Millis(3), &mut buf, n, Source::Tun),
        Action::Drop(DropReason::FragmentWithoutFirst)
    );

    // incoming reply fragments: the first sets the reverse mapping, the later ones reuse it
    let mut rip = Ip::new(B_IIP, A_NS);
    rip.dont_fragment = false;
    rip.more_fragments = true;
    rip.id = 0x0101;
    let mut l4 = [0u8; 16];
    l4[0..2].copy_from_slice(&53u16.to_be_bytes());
    l4[2..4].copy_from_slice(&4000u16.to_be_bytes());
    l4[4..6].copy_from_slice(&100u16.to_be_bytes());
    let n = craft::raw(&mut buf, &rip, PROTO_UDP, &l4);
    assert_eq!(
        w1.on_packet(Millis(4), &mut buf, n, Source::Peer(W2)),
        Action::WriteToTun { len: n }
    );
    assert_eq!(craft::src(&buf), API_RR);
    rip.more_fragments = false;
    rip.frag_offset = 2;
    let n = craft::raw(&mut buf, &rip, PROTO_UDP, &[7; 84]);
    assert_eq!(
        w1.on_packet(Millis(5), &mut buf, n, Source::Peer(W2)),
        Action::WriteToTun { len: n }
    );
    assert_eq!(craft::src(&buf), API_RR);
    assert!(craft::ip_checksum_ok(&buf[..n]));
}

#[test]
fn oversize_with_df_gets_fragmentation_needed() {
    let mut w1 = worker1(cfg());
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    let mut buf = [0u8; 2048];
    let payload = [0x5a; 1460 - 40];
    let n = craft::tcp(&mut buf, &Ip::new(A_NS, API_RR), 40000, 80, 0x10, &payload);
    assert_eq!(n, 1460);
    let original: Vec<u8> = buf[..n].to_vec();
    let Action::IcmpReply { len } = w1.on_packet(Millis(1), &mut buf, n, Source::Tun) else {
        panic!()
    };
    assert_eq!(len, 576);
    let icmp = &buf[..len];
    assert!(craft::ip_checksum_ok(icmp) && craft::l4_checksum_ok(icmp));
    assert_eq!((craft::src(icmp), craft::dst(icmp)), (API_RR, A_NS));
    assert_eq!((icmp[20], icmp[21]), (3, icmp::CODE_FRAG_NEEDED));
    assert_eq!(
        u16::from_be_bytes([icmp[26], icmp[27]]),
        1450,
        "next-hop MTU"
    );
    assert_eq!(
        &icmp[28..576],
        &original[..548],
        "quotes the packet as the sender sent it"
    );

    // Without DF it goes out whole; the kernel fragments the outer datagram.
    let mut ip = Ip::new(A_NS, API_RR);
    ip.dont_fragment = false;
    let n = craft::tcp(&mut buf, &ip, 40000, 80, 0x10, &payload);
    assert_eq!(
        w1.on_packet(Millis(2), &mut buf, n, Source::Tun),
        Action::SendToPeer { peer: W2, len: n }
    );
    // exactly the tunnel MTU is fine
    let n = craft::tcp(
        &mut buf,
        &Ip::new(A_NS, API_RR),
        40000,
        80,
        0x10,
        &payload[..1410],
    );
    assert_eq!(n, 1450);
    assert_eq!(
        w1.on_packet(Millis(3), &mut buf, n, Source::Tun),
        Action::SendToPeer { peer: W2, len: n }
    );
}

#[test]
fn parking_is_bounded_queries_once_and_times_out_with_unreachable() {
    let mut c = cfg();
    c.capacity.park_slots = 6;
    c.capacity.park_per_destination = 4;
    let mut w1 = worker1(c);
    let mut buf = [0u8; 2048];
    let mut actions = Vec::new();
    for i in 0..5u16 {
        let n = craft::tcp(&mut buf, &Ip::new(A_NS, API_RR), 41000 + i, 80, 0x02, b"");
        actions.push(w1.on_packet(Millis(100), &mut buf, n, Source::Tun));
    }
    assert_eq!(
        actions[0],
        Action::Park {
            query: Some(API_RR)
        }
    );
    assert_eq!(&actions[1..4], &[Action::Park { query: None }; 3]);
    assert_eq!(
        actions[4],
        Action::Drop(DropReason::ParkRefused(ParkRefused::PerDestinationLimit))
    );
    // other destinations are not stalled: a second service parks too, up to the pool size
    let other = Ipv4Addr::new(10, 30, 7, 7);
    let n = craft::udp(&mut buf, &Ip::new(A_NS, other), 1, 2, b"");
    assert_eq!(
        w1.on_packet(Millis(100), &mut buf, n, Source::Tun),
        Action::Park { query: Some(other) }
    );
    let n = craft::udp(&mut buf, &Ip::new(A_NS, other), 1, 2, b"");
    assert_eq!(
        w1.on_packet(Millis(100), &mut buf, n, Source::Tun),
        Action::Park { query: None }
    );
    let n = craft::udp(
        &mut buf,
        &Ip::new(A_NS, Ipv4Addr::new(10, 30, 7, 8)),
        1,
        2,
        b"",
    );
    assert_eq!(
        w1.on_packet(Millis(100), &mut buf, n, Source::Tun),
        Action::Drop(DropReason::ParkRefused(ParkRefused::NoFreeSlot))
    );
    // already-known destinations keep flowing while queries are pending
    w1.apply_table_update(
        Millis(100),
        &update("x.y.z.w", "x", &[(B_NS, W2, B_IIP, None)]),
    )
    .unwrap();
    let n = craft::udp(&mut buf, &Ip::new(A_NS, B_IIP), 9, 9, b"");
    assert!(matches!(
        w1.on_packet(Millis(101), &mut buf, n, Source::Tun),
        Action::SendToPeer { .. }
    ));

    assert_eq!(w1.next_deadline(), Some(Millis(2100)));
    assert_eq!(w1.poll(Millis(2099), &mut buf), None);
    let mut unreachable = 0;
    while let Some(a) = w1.poll(Millis(2100), &mut buf) {
        let Action::IcmpReply { len } = a else {
            panic!("{a:?}")
        };
        assert_eq!((buf[20], buf[21]), (3, icmp::CODE_HOST_UNREACHABLE));
        assert_eq!(craft::dst(&buf[..len]), A_NS);
        assert!(craft::l4_checksum_ok(&buf[..len]));
        unreachable += 1;
    }
    assert_eq!(unreachable, 6);
    assert_eq!(w1.parked(), 0);
    assert_eq!(w1.stats().query_timeouts, 6);
    // after the timeout a new packet asks again
    let n = craft::tcp(&mut buf, &Ip::new(A_NS, API_RR), 41000, 80, 0x02, b"");
    assert_eq!(
        w1.on_packet(Millis(2200), &mut buf, n, Source::Tun),
        Action::Park {
            query: Some(API_RR)
        }
    );
}

#[test]
fn an_answer_without_the_destination_is_unreachable_not_a_hang() {
    let mut w1 = worker1(cfg());
    let mut buf = [0u8; 2048];
    let n = craft::tcp(&mut buf, &Ip::new(A_NS, API_RR), 41000, 80, 0x02, b"");
    w1.on_packet(Millis(0), &mut buf, n, Source::Tun);
    // the CSM resolved the key to a job that does not carry this IP
    w1.apply_table_update(
        Millis(5),
        &update("o.t.h.er", "10.30.1.30", &[(B_NS, W2, B_IIP, None)]),
    )
    .unwrap();
    let Some(Action::IcmpReply { .. }) = w1.poll(Millis(5), &mut buf) else {
        panic!()
    };
}

#[test]
fn full_tables_are_counted_evictions_not_failures() {
    let mut c = cfg();
    c.capacity.flows = 4;
    c.capacity.instances = 3;
    let mut w1 = worker1(c);
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    let mut buf = [0u8; 256];
    for sport in 0..10u16 {
        let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 5000 + sport, 53, b"q");
        assert!(matches!(
            w1.on_packet(Millis(u64::from(sport)), &mut buf, n, Source::Tun),
            Action::SendToPeer { .. }
        ));
    }
    assert_eq!(w1.flows().len(), 4);
    assert_eq!(w1.flows().counters.evicted, 6);
    // the newest flows survive
    let k = FlowKey {
        proto: PROTO_UDP,
        local: A_NS,
        local_port: 5009,
        remote: API_RR,
        remote_port: 53,
    };
    assert!(w1.flow_target(Millis(20), &k).is_some());
    let k = FlowKey {
        local_port: 5000,
        ..k
    };
    assert!(w1.flow_target(Millis(20), &k).is_none());

    // instance table of 3: A (local, pinned), B, one; the fourth evicts the oldest remote (B)
    w1.apply_table_update(
        Millis(30),
        &update(
            "j.o.b.one",
            "j",
            &[(
                Ipv4Addr::new(10, 18, 1, 2),
                W2,
                Ipv4Addr::new(10, 30, 5, 1),
                None,
            )],
        ),
    )
    .unwrap();
    w1.apply_table_update(
        Millis(31),
        &update(
            "j.o.b.two",
            "j",
            &[(
                Ipv4Addr::new(10, 18, 1, 3),
                W2,
                Ipv4Addr::new(10, 30, 5, 2),
                None,
            )],
        ),
    )
    .unwrap();
    assert_eq!(w1.directory().counters.instance_evictions, 1);
    assert!(w1.directory().instance_by_nsip(B_NS).is_none());
    assert!(
        w1.directory().is_local_instance(A_NS),
        "local instances are never evicted"
    );
    assert_eq!(w1.directory().counts().0, 3);
}

#[test]
fn idle_flows_expire_and_pick_again() {
    let mut c = cfg();
    c.timeouts.udp_idle_ms = 1000;
    let mut w1 = worker1(c);
    let (u, _) = four_backends();
    w1.apply_table_update(Millis(0), &u).unwrap();
    let mut buf = [0u8; 256];
    let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 7000, 53, b"q");
    w1.on_packet(Millis(0), &mut buf, n, Source::Tun);
    let first = craft::dst(&buf);
    let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 7000, 53, b"q");
    w1.on_packet(Millis(1000), &mut buf, n, Source::Tun);
    assert_eq!(craft::dst(&buf), first, "within the idle time");
    let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 7000, 53, b"q");
    w1.on_packet(Millis(2001), &mut buf, n, Source::Tun);
    assert_ne!(
        craft::dst(&buf),
        first,
        "expired: a new flow, the next backend"
    );
    assert_eq!(w1.flows().counters.expired, 1);
}

#[test]
fn interest_lapses_for_remote_jobs_only() {
    let mut c = cfg();
    c.timeouts.interest_ms = 10_000;
    let mut w1 = worker1(c);
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    let mut buf = [0u8; 256];
    let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 7000, 53, b"q");
    w1.on_packet(Millis(5_000), &mut buf, n, Source::Tun);
    assert_eq!(
        w1.poll_interest(Millis(14_000)),
        None,
        "traffic at 5 s keeps it until 15 s"
    );
    assert_eq!(
        w1.poll_interest(Millis(15_001)).map(|j| j.to_string()),
        Some(API.to_string())
    );
    assert_eq!(
        w1.poll_interest(Millis(100_000)),
        None,
        "the local job keeps its interest"
    );
    assert!(w1.directory().service(API_RR).is_none());
    assert!(w1.directory().is_local_instance(A_NS));
}

#[test]
fn incoming_is_validated() {
    let mut w1 = worker1(cfg());
    let mut buf = [0u8; 256];
    let n = craft::udp(
        &mut buf,
        &Ip::new(B_IIP, Ipv4Addr::new(10, 18, 0, 9)),
        1,
        2,
        b"",
    );
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Peer(W2)),
        Action::Drop(DropReason::NotForLocalInstance)
    );
    let n = craft::udp(
        &mut buf,
        &Ip::new(Ipv4Addr::new(8, 8, 8, 8), A_NS),
        1,
        2,
        b"",
    );
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Peer(W2)),
        Action::Drop(DropReason::SourceNotServiceAddress)
    );
    let n = craft::udp(&mut buf, &Ip::new(B_IIP, A_NS), 1, 2, b"");
    buf[10] ^= 0xff;
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Peer(W2)),
        Action::Drop(DropReason::BadIpChecksum)
    );
    // from the TUN device too: the incremental checksum update would keep the error
    let n = craft::udp(&mut buf, &Ip::new(A_NS, B_IIP), 1, 2, b"");
    buf[19] ^= 1;
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Tun),
        Action::Drop(DropReason::BadIpChecksum)
    );
    // port 65535 and zero-length datagrams (upstream panics, §8 item 2)
    let n = craft::udp(&mut buf, &Ip::new(B_IIP, A_NS), 65535, 65535, b"");
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Peer(W2)),
        Action::WriteToTun { len: n }
    );
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, 0, Source::Peer(W2)),
        Action::Drop(DropReason::Malformed(Malformed::TruncatedIpHeader))
    );
}

#[test]
fn outgoing_is_validated() {
    let mut w1 = worker1(cfg());
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    let mut buf = [0u8; 256];
    let n = craft::udp(
        &mut buf,
        &Ip::new(A_NS, Ipv4Addr::new(10, 18, 0, 66)),
        1,
        2,
        b"",
    );
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Tun),
        Action::Drop(DropReason::NotServiceAddress)
    );
    let n = craft::udp(
        &mut buf,
        &Ip::new(Ipv4Addr::new(10, 18, 0, 7), API_RR),
        1,
        2,
        b"",
    );
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Tun),
        Action::Drop(DropReason::UnknownSource)
    );
    let n = craft::raw(&mut buf, &Ip::new(A_NS, API_RR), 132, &[0; 12]);
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Tun),
        Action::Drop(DropReason::UnsupportedProtocol)
    );
    // a freshly deployed instance has no InstanceIP until its job's table result arrives
    w1.deploy_local(Millis(0), &job("n.e.w.job"), 0, Ipv4Addr::new(10, 18, 0, 4))
        .unwrap();
    let n = craft::udp(
        &mut buf,
        &Ip::new(Ipv4Addr::new(10, 18, 0, 4), API_RR),
        1,
        2,
        b"",
    );
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Tun),
        Action::Drop(DropReason::NoInstanceIp)
    );
    // undeployed: its traffic is no longer translated
    assert!(w1.undeploy_local(A_NS));
    let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 1, 2, b"");
    assert_eq!(
        w1.on_packet(Millis(0), &mut buf, n, Source::Tun),
        Action::Drop(DropReason::UnknownSource)
    );
}

#[test]
fn malformed_headers_are_dropped_with_a_reason() {
    let mut w1 = worker1(cfg());
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    let mut buf = [0u8; 256];
    let cases: [(Builder, Malformed); 6] = [
        (
            &|b: &mut [u8]| craft::tcp(b, &Ip::new(A_NS, API_RR), 1, 2, 2, b"") - 5,
            Malformed::BadTotalLength,
        ),
        (
            &|b: &mut [u8]| {
                let n = craft::tcp(b, &Ip::new(A_NS, API_RR), 1, 2, 2, b"");
                b[0] = 0x43;
                n
            },
            Malformed::BadIhl,
        ),
        (
            &|b: &mut [u8]| {
                let n = craft::tcp(b, &Ip::new(A_NS, API_RR), 1, 2, 2, b"");
                b[0] = 0x65;
                n
            },
            Malformed::NotIpv4,
        ),
        (
            &|b: &mut [u8]| {
                let n = craft::tcp(b, &Ip::new(A_NS, API_RR), 1, 2, 2, b"");
                b[32] = 0x20;
                n
            },
            Malformed::BadL4Length,
        ),
        (
            &|b: &mut [u8]| craft::raw(b, &Ip::new(A_NS, API_RR), PROTO_TCP, &[0; 10]),
            Malformed::TruncatedL4Header,
        ),
        (&|_b: &mut [u8]| 7, Malformed::TruncatedIpHeader),
    ];
    for (build, want) in cases {
        let n = build(&mut buf);
        assert_eq!(
            w1.on_packet(Millis(0), &mut buf, n, Source::Tun),
            Action::Drop(DropReason::Malformed(want))
        );
    }
}

/// Property-style: random and mutated packets never panic, and every forwarded packet is a
/// well-formed IPv4 packet that fits the reported length.
#[test]
fn random_bytes_never_panic() {
    let mut c = cfg();
    c.capacity.flows = 64;
    c.capacity.park_slots = 8;
    let mut w1 = worker1(c);
    let (u, _) = four_backends();
    w1.apply_table_update(Millis(0), &u).unwrap();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = [0u8; 1600];
    let mut forwarded = 0;
    for i in 0..200_000u64 {
        let r = next();
        let n = match r % 4 {
            // pure noise
            0 => {
                let n = (next() % 1600) as usize;
                for b in &mut buf[..n] {
                    *b = next() as u8;
                }
                n
            }
            // a valid packet with a few random bytes flipped
            _ => {
                let sport = (next() % 64) as u16;
                let n = match r % 5 {
                    0 => craft::tcp(&mut buf, &Ip::new(A_NS, API_RR), sport, 80, 2, b"abc"),
                    1 => craft::udp(&mut buf, &Ip::new(A_NS, API_RR), sport, 53, b"abcdef"),
                    2 => craft::icmp_echo(&mut buf, &Ip::new(B_IIP, A_NS), false, sport, 1, b"x"),
                    // ICMP errors quoting a real packet, outgoing and incoming
                    k => {
                        let mut q = [0u8; 64];
                        let qn = craft::udp(
                            &mut q,
                            &Ip::new(A_IIP, Ipv4Addr::new(10, 18, 0, 66 + (sport % 4) as u8)),
                            sport,
                            53,
                            b"q",
                        );
                        let outer = if k == 3 {
                            Ip::new(A_NS, B_IIP)
                        } else {
                            Ip::new(B_IIP, A_NS)
                        };
                        craft::icmp_error(&mut buf, &outer, 3, 3, &q[..qn])
                    }
                };
                for _ in 0..(next() % 4) {
                    let at = (next() % n as u64) as usize;
                    buf[at] = next() as u8;
                }
                (n as i64 + (next() % 5) as i64 - 2).max(0) as usize
            }
        };
        let from = if next() % 2 == 0 {
            Source::Tun
        } else {
            Source::Peer(W2)
        };
        let now = Millis(i / 10);
        let check = |a: Action, buf: &[u8]| match a {
            Action::SendToPeer { len, .. }
            | Action::WriteToTun { len }
            | Action::IcmpReply { len } => {
                assert!(len <= buf.len());
                let h = crate::packet::parse_ipv4(&buf[..len]).expect("forwarded packet parses");
                assert_eq!(h.total_len, len);
                1
            }
            _ => 0,
        };
        forwarded += check(w1.on_packet(now, &mut buf, n, from), &buf);
        while let Some(a) = w1.poll(now, &mut buf) {
            forwarded += check(a, &buf);
        }
    }
    assert!(
        forwarded > 1000,
        "the generator also produced valid traffic ({forwarded})"
    );
}

/// Port unreachable from the server's kernel, about a datagram the client sent to the RR IP:
/// the client must get it quoting exactly what it sent (its nsIP → the RR IP).
#[test]
fn icmp_errors_from_a_server_reach_the_client_translated() {
    let mut w1 = worker1(cfg());
    let mut w2 = worker2(cfg());
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    w2.apply_table_update(Millis(0), &front_update()).unwrap();
    let mut buf = [0u8; 2048];
    let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 40000, 53, b"query");
    let sent_by_a: Vec<u8> = buf[..n].to_vec();
    let Action::SendToPeer { len, .. } = w1.on_packet(Millis(1), &mut buf, n, Source::Tun) else {
        panic!()
    };
    assert_eq!(
        w2.on_packet(Millis(2), &mut buf, len, Source::Peer(W1)),
        Action::WriteToTun { len }
    );
    let seen_by_b: Vec<u8> = buf[..len].to_vec();
    // B's kernel: port unreachable, from B's nsIP to the source it saw, quoting the datagram
    let n = craft::icmp_error(&mut buf, &Ip::new(B_NS, A_IIP), 3, 3, &seen_by_b);
    let Action::SendToPeer { peer, len } = w2.on_packet(Millis(3), &mut buf, n, Source::Tun) else {
        panic!()
    };
    assert_eq!(peer, W1);
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (B_IIP, A_NS));
    assert_valid(&buf[..len]);
    let Action::WriteToTun { len } = w1.on_packet(Millis(4), &mut buf, len, Source::Peer(W2))
    else {
        panic!()
    };
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (API_RR, A_NS));
    assert_valid(&buf[..len]);
    assert_eq!((buf[20], buf[21]), (3, 3));
    let quote = &buf[28..len];
    assert!(craft::ip_checksum_ok(quote));
    assert_eq!((craft::src(quote), craft::dst(quote)), (A_NS, API_RR));
    // byte for byte what A sent, except TTL (and so the header checksum)
    for i in (0..sent_by_a.len()).filter(|i| !matches!(i, 8 | 10 | 11)) {
        assert_eq!(quote[i], sent_by_a[i], "quoted byte {i}");
    }
    assert!(
        craft::l4_checksum_ok(quote),
        "quoted UDP checksum still valid"
    );
}

/// The reverse case: the client's kernel rejects a reply; the server gets the error quoting
/// its reply as it sent it (its nsIP → the client's InstanceIP).
#[test]
fn icmp_errors_from_a_client_reach_the_server_translated() {
    let mut w1 = worker1(cfg());
    let mut w2 = worker2(cfg());
    w1.apply_table_update(Millis(0), &api_update()).unwrap();
    w2.apply_table_update(Millis(0), &front_update()).unwrap();
    let mut buf = [0u8; 2048];
    let n = craft::udp(&mut buf, &Ip::new(A_NS, API_RR), 40000, 53, b"query");
    let Action::SendToPeer { len, .. } = w1.on_packet(Millis(1), &mut buf, n, Source::Tun) else {
        panic!()
    };
    w2.on_packet(Millis(2), &mut buf, len, Source::Peer(W1));
    let n = craft::udp(&mut buf, &Ip::new(B_NS, A_IIP), 53, 40000, b"answer");
    let sent_by_b: Vec<u8> = buf[..n].to_vec();
    let Action::SendToPeer { len, .. } = w2.on_packet(Millis(3), &mut buf, n, Source::Tun) else {
        panic!()
    };
    let Action::WriteToTun { len } = w1.on_packet(Millis(4), &mut buf, len, Source::Peer(W2))
    else {
        panic!()
    };
    let seen_by_a: Vec<u8> = buf[..len].to_vec();
    let n = craft::icmp_error(&mut buf, &Ip::new(A_NS, API_RR), 3, 3, &seen_by_a[..28]);
    let Action::SendToPeer { peer, len } = w1.on_packet(Millis(5), &mut buf, n, Source::Tun) else {
        panic!()
    };
    assert_eq!(peer, W2);
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (A_IIP, B_NS));
    assert_valid(&buf[..len]);
    let Action::WriteToTun { len } = w2.on_packet(Millis(6), &mut buf, len, Source::Peer(W1))
    else {
        panic!()
    };
    assert_eq!((craft::src(&buf), craft::dst(&buf)), (A_IIP, B_NS));
    assert_valid(&buf[..len]);
    let quote = &buf[28..len];
    assert_eq!((craft::src(quote), craft::dst(quote)), (B_NS, A_IIP));
    assert!(craft::ip_checksum_ok(quote));
    assert_eq!(&quote[20..24], &sent_by_b[20..24], "ports");
    assert_eq!(
        &quote[26..28],
        &sent_by_b[26..28],
        "UDP checksum back to what B computed"
    );
}

#[test]
fn drop_reason_labels_are_distinct_snake_case_names() {
    let labels = DropReason::LABELS;
    for (i, l) in labels.iter().enumerate() {
        assert!(
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{l}"
        );
        assert!(!labels[..i].contains(l), "{l} twice");
    }
    assert_eq!(DropReason::BadIpChecksum.label(), "bad_ip_checksum");
    assert_eq!(
        DropReason::ParkRefused(ParkRefused::TooBig).label(),
        "park_too_big"
    );
    assert_eq!(
        DropReason::Malformed(Malformed::NotIpv4).label(),
        "malformed_not_ipv4"
    );
}
