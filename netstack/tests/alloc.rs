//! Proves the data path allocates nothing per packet in steady state: a counting global
//! allocator (own test binary, so it affects no other test) watches the forward and reply
//! paths of two engines exchanging TCP, UDP and ICMP echo through a service IP, including
//! new flows and flow-table eviction churn; and the batched path with the offloads: TCP
//! super-segments cut into send-queue slots, sent with `sendmmsg`/UDP GSO over a real
//! loopback socket, received with `recvmmsg`/GRO and merged back for the TUN.

use netstack::batch::{self, RxBatch, TxQueue};
use netstack::control::{JobName, NodeSubnet, TableQueryResult};
use netstack::craft::{self, Ip};
use netstack::gso::{Coalescer, Segmenter, VNET_HDR_LEN};
use netstack::proxy::{Action, Proxy, ProxyConfig, Source};
use netstack::Millis;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

struct Counting;

// Per thread, armed and counted: the test harness runs this file's tests in parallel threads,
// and one test's setup allocations must not count against another's packet loop.
thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn note_alloc() {
    if ARMED.with(|a| a.get()) {
        ALLOCS.with(|n| n.set(n.get() + 1));
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note_alloc();
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note_alloc();
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Allocations made by `f` on this thread.
fn count(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.with(Cell::get);
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    ALLOCS.with(Cell::get) - before
}

const A_NS: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 2);
const A_IIP: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 2);
const B_NS: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 66);
const RR: Ipv4Addr = Ipv4Addr::new(10, 30, 1, 30);
const W1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 50103);
const W2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 20), 50103);

fn table(
    app: &str,
    ns: Ipv4Addr,
    host: SocketAddrV4,
    iip: Ipv4Addr,
    rr: Option<Ipv4Addr>,
) -> netstack::control::TableUpdate {
    let rr = rr
        .map(|r| format!(r#"{{"IpType":"RR","Address":"{r}"}},"#))
        .unwrap_or_default();
    let j = format!(
        r#"{{"app_name":"{app}","query_key":"{app}","instance_list":[{{"instance_number":0,"namespace_ip":"{ns}",
        "host_ip":"{}","host_port":{},"service_ip":[{rr}{{"IpType":"instance_ip","Address":"{iip}"}}]}}]}}"#,
        host.ip(),
        host.port()
    );
    TableQueryResult::decode(j.as_bytes())
        .unwrap()
        .validate(Ipv4Addr::new(10, 30, 0, 0), 16)
        .unwrap()
}

/// Two engines: w1 with the front instance, w2 with the api instance behind RR.
fn engines() -> (Proxy, Proxy) {
    let mut cfg = ProxyConfig::default();
    cfg.capacity.flows = 256;
    let front = table("shop.prod.front.prod", A_NS, W1, A_IIP, None);
    let api = table(
        "shop.prod.api.prod",
        B_NS,
        W2,
        Ipv4Addr::new(10, 30, 0, 3),
        Some(RR),
    );
    let mut w1 = Proxy::new(cfg);
    w1.set_subnet(NodeSubnet {
        v4: Ipv4Addr::new(10, 18, 0, 0),
        v6: None,
    });
    w1.deploy_local(
        Millis(0),
        &JobName::parse("shop.prod.front.prod").unwrap(),
        0,
        A_NS,
    )
    .unwrap();
    w1.apply_table_update(Millis(0), &front).unwrap();
    w1.apply_table_update(Millis(0), &api).unwrap();
    let mut w2 = Proxy::new(cfg);
    w2.set_subnet(NodeSubnet {
        v4: Ipv4Addr::new(10, 18, 0, 64),
        v6: None,
    });
    w2.deploy_local(
        Millis(0),
        &JobName::parse("shop.prod.api.prod").unwrap(),
        0,
        B_NS,
    )
    .unwrap();
    w2.apply_table_update(Millis(0), &api).unwrap();
    w2.apply_table_update(Millis(0), &front).unwrap();
    (w1, w2)
}

#[test]
fn zero_allocations_per_packet_forward_and_reply() {
    let (mut w1, mut w2) = engines();

    // the counter itself works
    assert_eq!(count(|| drop(std::hint::black_box(vec![1u8; 8]))), 1);
    let mut buf = vec![0u8; 65536];
    let mut exchange = |w1: &mut Proxy, w2: &mut Proxy, now: Millis, kind: u16, sport: u16| {
        let ip = Ip::new(A_NS, RR);
        let n = match kind % 3 {
            0 => craft::tcp(&mut buf, &ip, sport, 80, 0x10, b"request"),
            1 => craft::udp(&mut buf, &ip, sport, 53, b"request"),
            _ => craft::icmp_echo(&mut buf, &ip, true, sport, 1, b"request"),
        };
        let Action::SendToPeer { len, .. } = w1.on_packet(now, &mut buf, n, Source::Tun) else {
            panic!("forward")
        };
        let Action::WriteToTun { .. } = w2.on_packet(now, &mut buf, len, Source::Peer(W1)) else {
            panic!("deliver")
        };
        let ip = Ip::new(B_NS, A_IIP);
        let n = match kind % 3 {
            0 => craft::tcp(&mut buf, &ip, 80, sport, 0x10, b"reply"),
            1 => craft::udp(&mut buf, &ip, 53, sport, b"reply"),
            _ => craft::icmp_echo(&mut buf, &ip, false, sport, 1, b"reply"),
        };
        let Action::SendToPeer { len, .. } = w2.on_packet(now, &mut buf, n, Source::Tun) else {
            panic!("reply")
        };
        let Action::WriteToTun { .. } = w1.on_packet(now, &mut buf, len, Source::Peer(W2)) else {
            panic!("reply in")
        };
        assert_eq!(craft::src(&buf), RR);
        while w1.poll(now, &mut buf).is_some() {}
    };
    // warm-up: first use of every code path (and of the lazily initialised hasher keys)
    for i in 0..300u16 {
        exchange(&mut w1, &mut w2, Millis(1), i, 20000 + i % 100);
    }
    // steady state: 100 established flows, 30 000 round trips
    let steady = count(|| {
        for i in 0..30_000u16 {
            exchange(
                &mut w1,
                &mut w2,
                Millis(2 + u64::from(i / 100)),
                i,
                20000 + i % 100,
            );
        }
    });
    // churn: every exchange a new flow, the 256-entry table evicting all the time
    let churn = count(|| {
        for i in 0..30_000u16 {
            exchange(&mut w1, &mut w2, Millis(1000), i, 30000 + i);
        }
    });
    println!("allocations: steady {steady} in 120000 packets, churn {churn} in 120000 packets");
    assert_eq!(steady, 0, "allocations on the steady-state packet path");
    assert_eq!(churn, 0, "allocations while creating and evicting flows");
    assert!(w1.flows().counters.evicted > 0);
}

#[test]
fn zero_allocations_on_the_batched_offload_path() {
    let (mut w1, mut w2) = engines();
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let gro = batch::enable_gro(b.as_raw_fd());
    let to = match b.local_addr().unwrap() {
        std::net::SocketAddr::V4(v) => v,
        _ => unreachable!(),
    };
    let mut tx = TxQueue::new(2048, true);
    let mut rx = RxBatch::new();
    let mut co = Coalescer::new();
    let mut sup = vec![0u8; 65536];
    // what came out of the coalescer, compared with what went in (capacity reserved: the
    // counted rounds must not allocate for it)
    let mut got: Vec<u8> = Vec::with_capacity(65536);
    let payload: Vec<u8> = (0..40_000u32).map(|i| (i * 31 + i / 7) as u8).collect();
    let mss = 1398u16;
    // One super-segment from the TUN through both engines and the loopback socket, merged
    // back; returns the merged frames' payload bytes, the packets received, and whether the
    // payload arrived unchanged.
    let mut round =
        |w1: &mut Proxy, w2: &mut Proxy, now: Millis, sport: u16| -> (usize, usize, bool) {
            got.clear();
            let n = craft::tcp(&mut sup, &Ip::new(A_NS, RR), sport, 80, 0x10, &payload);
            let seg = Segmenter::new(&sup[..n], mss).unwrap();
            // as the data plane does it: the engine decides on the first segment, the others are
            // headers in slots with their payloads sent from the super-segment
            let len = seg.write(&sup[..n], 0, tx.next_slot());
            let a0 = w1.on_packet(now, tx.next_slot(), len, Source::Tun);
            // the tunnel endpoint in the table is not ours: send to the loopback peer
            let Action::SendToPeer { len, .. } = a0 else {
                panic!("segment 0: {a0:?}")
            };
            let mut addrs = [0u8; 8];
            addrs.copy_from_slice(&tx.next_slot()[12..20]);
            tx.commit(len, to);
            sup[12..20].copy_from_slice(&addrs);
            for i in 1..seg.count() {
                if tx.is_full() {
                    tx.flush(a.as_raw_fd(), &sup);
                }
                let (head, off, len) = seg.write_header(&sup[..n], i, tx.next_slot());
                tx.commit_with_tail(head, to, off, len);
            }
            w1.count_followers(seg.count() as u64 - 1, 0);
            let f = tx.flush(a.as_raw_fd(), &sup);
            assert_eq!(f.sent, seg.count(), "{f:?}");
            let (mut bytes, mut pkts) = (0, 0);
            while pkts < seg.count() {
                let k = rx.recv(b.as_raw_fd()).unwrap();
                assert!(k > 0, "datagrams lost on loopback");
                for j in 0..k {
                    let (buf, sz, _) = rx.datagram(j);
                    let mut off = 0;
                    while off < buf.len() {
                        let end = (off + sz).min(buf.len());
                        let p = &mut buf[off..end];
                        off = end;
                        pkts += 1;
                        let n = p.len();
                        let a = w2.on_packet(now, p, n, Source::Peer(W1));
                        let Action::WriteToTun { len } = a else {
                            panic!("deliver: {a:?}")
                        };
                        assert_eq!(craft::dst(&p[..len]), B_NS);
                        if !co.push(&p[..len]) {
                            let fr = co.take();
                            bytes += fr.len() - VNET_HDR_LEN - 40;
                            got.extend_from_slice(&fr[VNET_HDR_LEN + 40..]);
                            assert!(co.push(&p[..len]));
                        }
                    }
                }
            }
            let fr = co.take();
            bytes += fr.len() - VNET_HDR_LEN - 40;
            got.extend_from_slice(&fr[VNET_HDR_LEN + 40..]);
            (bytes, pkts, got == payload)
        };
    // warm-up (hasher keys, first flow, socket buffers)
    for i in 0..3 {
        let (bytes, pkts, same) = round(&mut w1, &mut w2, Millis(1), 40000 + i);
        assert_eq!(bytes, payload.len());
        assert!(same, "payload changed on the way");
        assert_eq!(pkts, 29);
    }
    let steady = count(|| {
        for i in 0..300u16 {
            round(&mut w1, &mut w2, Millis(2 + u64::from(i)), 40000 + i % 3);
        }
    });
    println!(
        "allocations: {steady} over 300 super-segments (8700 packets each way); GRO {gro}, GSO {}",
        tx.gso()
    );
    assert_eq!(steady, 0, "allocations on the batched offload path");
}
