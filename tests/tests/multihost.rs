//! Multi-host end-to-end tests on one machine (issue #8.1-8.3): hosts are network namespaces on
//! a test LAN ([`e2e::lan`]).

use e2e::lan::Lan;

/// The LAN itself: hosts reach each other and the gateway (the root namespace), and nothing of
/// it survives the drop.
#[test]
fn lan_hosts_reach_each_other_and_leave_nothing() {
    if !e2e::require_root("lan_hosts_reach_each_other_and_leave_nothing") {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let tag = lan.tag.clone();
    let a = lan.add_host("a").unwrap();
    let b = lan.add_host("b").unwrap();
    assert_ne!(a.addr, b.addr);
    for (from, to) in [(&a, b.addr), (&b, a.addr), (&a, lan.gateway)] {
        from.run(&["ping", "-c1", "-W2", &to.to_string()])
            .unwrap_or_else(|e| panic!("{} cannot reach {to}: {e}", from.name));
    }
    // A process started in a host sees the host's interfaces, not the root namespace's.
    let links = a.run(&["ip", "-o", "link", "show"]).unwrap();
    assert_eq!(links.lines().count(), 2, "{links}");
    assert!(!Lan::leftovers(&tag).is_empty());
    drop(lan);
    assert_eq!(Lan::leftovers(&tag), Vec::<String>::new());
}
