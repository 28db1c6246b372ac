//! Node plumbing against real namespaces: a "worker" namespace gets the bridge, two
//! "instance" namespaces get veth pairs, addresses and default routes through our netlink
//! client; they reach each other over the bridge; detach and drop remove everything; a new
//! setup removes what a previous run left behind. Needs root; skipped otherwise.

mod common;

use common::*;
use netstack::netlink::Netlink;
use netstack::plumbing::{Plumbing, PlumbingConfig};
use std::fs::File;
use std::net::Ipv4Addr;

const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 64);

fn ns_file(name: &str) -> File {
    File::open(format!("/run/netns/{name}")).unwrap()
}

#[test]
fn bridge_veth_attach_detach_and_teardown() {
    if skip_unless_root("bridge_veth_attach_detach_and_teardown") {
        return;
    }
    let sfx = suffix();
    let mut topo = Topology::default();
    let w = topo.netns(&format!("oakpw-{sfx}"));
    let i1 = topo.netns(&format!("oakp1-{sfx}"));
    let i2 = topo.netns(&format!("oakp2-{sfx}"));

    let plumbing = in_netns(&w, || {
        Plumbing::setup(PlumbingConfig::default(), SUBNET).map_err(|e| e.to_string())
    })
    .join()
    .unwrap();
    let mut p = plumbing.unwrap();
    let a1 = p.attach(&ns_file(&i1)).unwrap();
    let a2 = p.attach(&ns_file(&i2)).unwrap();
    assert_eq!(
        (a1.nsip, a2.nsip),
        (Ipv4Addr::new(10, 18, 0, 66), Ipv4Addr::new(10, 18, 0, 67))
    );

    // what the kernel now holds
    let br = topo.ip(&w, &["-4", "addr", "show", "dev", "goProxyBridge"]);
    assert!(
        br.contains("10.18.0.65/26") && br.contains("mtu 1450") && br.contains("UP"),
        "{br}"
    );
    let host = topo.ip(&w, &["link", "show", &a1.host_veth]);
    assert!(host.contains("master goProxyBridge"), "{host}");
    let inner = topo.ip(&i1, &["-4", "addr", "show", "dev", "eth0"]);
    assert!(inner.contains("10.18.0.66/26"), "{inner}");
    let routes = topo.ip(&i1, &["route"]);
    assert!(
        routes.contains("default via 10.18.0.65 dev eth0"),
        "{routes}"
    );
    let fwd = topo.exec(&w, &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");

    // instances reach the bridge and each other
    for (from, to) in [
        (&i1, "10.18.0.65"),
        (&i1, "10.18.0.67"),
        (&i2, "10.18.0.66"),
    ] {
        let out = topo.exec(from, &["ping", "-c", "1", "-W", "2", to]);
        assert!(
            out.status.success(),
            "{from} → {to}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // detach removes both ends and frees the address for the next instance
    p.detach(a1.nsip).unwrap();
    assert!(!run_ok(&["ip", "-n", &w, "link", "show", &a1.host_veth]));
    assert!(!run_ok(&["ip", "-n", &i1, "link", "show", "eth0"]));
    let again = p.attach(&ns_file(&i1)).unwrap();
    assert_eq!(again.nsip, a1.nsip);

    // a namespace that vanished on its own (the container exited) detaches cleanly
    run(&["ip", "netns", "del", &i2]);
    topo.netns.retain(|n| n != &i2);
    std::thread::sleep(std::time::Duration::from_millis(100));
    p.detach(a2.nsip).unwrap();

    p.teardown().unwrap();
    let links = topo.ip(&w, &["link"]);
    assert!(
        !links.contains("goProxyBridge") && !links.contains("oakveth"),
        "{links}"
    );
}

#[test]
fn setup_removes_leftovers_of_a_previous_run() {
    if skip_unless_root("setup_removes_leftovers_of_a_previous_run") {
        return;
    }
    let sfx = suffix();
    let mut topo = Topology::default();
    let w = topo.netns(&format!("oaklw-{sfx}"));
    let i = topo.netns(&format!("oakli-{sfx}"));
    // a crashed run's bridge (with a stale address) and a veth into a live namespace
    topo.ip(&w, &["link", "add", "goProxyBridge", "type", "bridge"]);
    topo.ip(&w, &["addr", "add", "10.18.9.1/26", "dev", "goProxyBridge"]);
    topo.ip(
        &w,
        &[
            "link", "add", "oakveth9", "type", "veth", "peer", "name", "eth0", "netns", &i,
        ],
    );
    topo.ip(&w, &["link", "add", "keepme0", "type", "bridge"]);

    let p = in_netns(&w, || {
        Plumbing::setup(PlumbingConfig::default(), SUBNET).map_err(|e| e.to_string())
    })
    .join()
    .unwrap()
    .unwrap();
    let br = topo.ip(&w, &["-4", "addr", "show", "dev", "goProxyBridge"]);
    assert!(
        br.contains("10.18.0.65/26") && !br.contains("10.18.9.1"),
        "{br}"
    );
    assert!(!run_ok(&["ip", "-n", &w, "link", "show", "oakveth9"]));
    assert!(
        !run_ok(&["ip", "-n", &i, "link", "show", "eth0"]),
        "the stale pair's other end went too"
    );
    assert!(
        run_ok(&["ip", "-n", &w, "link", "show", "keepme0"]),
        "links that are not ours stay"
    );
    drop(p);
    assert!(
        !run_ok(&["ip", "-n", &w, "link", "show", "goProxyBridge"]),
        "drop tears down"
    );

    // the netlink client lists what is left
    let mut nl = in_netns(&w, || Netlink::open().map_err(|e| e.to_string()))
        .join()
        .unwrap()
        .unwrap();
    let names: Vec<String> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
    assert!(
        names.contains(&"lo".to_string()) && names.contains(&"keepme0".to_string()),
        "{names:?}"
    );
}
