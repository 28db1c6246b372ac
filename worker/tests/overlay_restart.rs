//! A worker restart does not cut its instances off the overlay: `orch-lite all` in a hub
//! namespace, two in-process workers (session + overlay `auto`) in their own namespaces,
//! instances as processes that outlive the worker (as containers do). Worker B, which serves
//! the RR address, is stopped gracefully and started again on the same state dir: its
//! instance keeps its namespace, veth and address while B is down, and after the start the
//! client on A reaches the RR address again, through the rebuilt TUN and tables, with no
//! duplicate link. Undeploying then removes everything. Needs root; skipped otherwise.

mod overlay_support;

use overlay_support::harness::*;
use overlay_support::*;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

const RR: &str = "10.30.31.31";
const PASSWORD: &str = "overlay-restart";
const CLIENT_ID: &str = "ovr.test.client.test.instance.0";
const SERVER_ID: &str = "ovr.test.server.test.instance.0";

/// Lines of `ip -o link` / `ip -o addr` output whose name (or address) field starts with `what`.
fn count(listing: &str, what: &str) -> usize {
    listing
        .lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            w.nth(1).is_some_and(|f| f.starts_with(what))
                || w.nth(1).is_some_and(|f| f.starts_with(what))
        })
        .count()
}

#[test]
fn instances_stay_reachable_across_a_worker_restart() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "instances_stay_reachable_across_a_worker_restart needs root"
        );
        eprintln!("SKIPPED instances_stay_reachable_across_a_worker_restart: needs root");
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let sfx = suffix();
    let mut topo = Topology::default();
    let wa = topo.netns(&format!("oakra-{sfx}"));
    let wb = topo.netns(&format!("oakrb-{sfx}"));
    let hub = hub(&mut topo, &sfx, &[(&wa, WA), (&wb, WB)]);
    let _sweep = NetnsSweep(vec![CLIENT_ID.into(), SERVER_ID.into()]);
    let _orch = Orch::start(&hub, HUB, PASSWORD);
    let root = Root::new(&hub, PASSWORD);

    let www = TempDir::new("www");
    std::fs::write(www.0.join("index.html"), "served by B\n").unwrap();
    let (state_a, state_b) = (TempDir::new("ra"), TempDir::new("rb"));
    let (reg_a, reg_b) = (Registry::default(), Registry::default());
    let a = start_worker(
        &wa,
        "wa",
        WA,
        state_a.0.clone(),
        www.0.clone(),
        reg_a.clone(),
        false,
    );
    let b = start_worker(
        &wb,
        "wb",
        WB,
        state_b.0.clone(),
        www.0.clone(),
        reg_b.clone(),
        false,
    );

    let ids = root.deploy(sla("ovr", RR, ""));
    let server_nsip = root.wait_nsip(&ids["server"]);
    root.wait_nsip(&ids["client"]);
    let rr = SocketAddr::from((RR.parse::<Ipv4Addr>().unwrap(), 80));
    let page = wait_for(Duration::from_secs(20), || http_get(CLIENT_ID, rr).ok())
        .expect("HTTP from the client to the RR address before the restart");
    assert!(page.ends_with("served by B\n"), "{page}");

    // Graceful stop of B: the TUN goes, the instance's network stays.
    b.stop();
    let links_down = topo.ip(&wb, &["-o", "link", "show"]);
    assert!(!links_down.contains("goProxyTun"), "{links_down}");
    assert_eq!(count(&links_down, "oakveth"), 1, "{links_down}");
    assert_eq!(count(&links_down, "goProxyBridge"), 1, "{links_down}");
    let inside = topo.ip(SERVER_ID, &["-o", "-4", "addr"]);
    assert!(
        inside.contains(&format!("inet {server_nsip}/26")),
        "{inside}"
    );

    // Start B again on the same state dir: re-attached in place, reachable again.
    let t0 = Instant::now();
    let b = start_worker(
        &wb,
        "wb",
        WB,
        state_b.0.clone(),
        www.0.clone(),
        reg_b.clone(),
        false,
    );
    let page = wait_for(Duration::from_secs(30), || http_get(CLIENT_ID, rr).ok())
        .expect("HTTP from the client to the RR address after B restarted");
    println!(
        "RR address reachable again {} ms after the restart",
        t0.elapsed().as_millis()
    );
    assert!(page.ends_with("served by B\n"), "{page}");
    let links_up = topo.ip(&wb, &["-o", "link", "show"]);
    assert_eq!(count(&links_up, "oakveth"), 1, "duplicate veth: {links_up}");
    assert_eq!(count(&links_up, "goProxyBridge"), 1, "{links_up}");
    assert_eq!(count(&links_up, "goProxyTun"), 1, "{links_up}");
    let inside = topo.ip(SERVER_ID, &["-o", "-4", "addr"]);
    assert!(
        inside.contains(&format!("inet {server_nsip}/26")),
        "the instance keeps its address: {inside}"
    );
    assert_eq!(count(&inside, "10."), 1, "{inside}");

    // Undeploy removes everything of the instances; a stop with none left removes the rest.
    root.undeploy(&ids["server"]);
    root.undeploy(&ids["client"]);
    wait_for(Duration::from_secs(20), || {
        (!std::path::Path::new(&format!("/run/netns/{SERVER_ID}")).exists()
            && !std::path::Path::new(&format!("/run/netns/{CLIENT_ID}")).exists())
        .then_some(())
    })
    .expect("undeploy removes the namespaces");
    a.stop();
    b.stop();
    for ns in [&wa, &wb] {
        let l = topo.ip(ns, &["-o", "link", "show"]);
        for name in ["goProxyTun", "goProxyBridge", "oakveth"] {
            assert!(!l.contains(name), "{name} left in {ns}: {l}");
        }
    }
    assert!(reg_a.lock().unwrap().is_empty() && reg_b.lock().unwrap().is_empty());
}
