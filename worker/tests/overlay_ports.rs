//! Port publishing against the real kernel: `orch-lite all` in a hub namespace (also the LAN
//! client), one in-process worker (session + overlay `auto`) in its own namespace, instances
//! as processes in the overlay's named netns. The server publishes `6080:80` (TCP, busybox
//! httpd) and `5354:5353/udp` (an echo in its namespace): the hub reaches both on the worker's
//! address. A connection from inside the instance to the hub's own port 6080 reaches the hub,
//! not the instance (upstream's DNAT rules would redirect it). A second instance asking for
//! the taken host port fails its deploy with the reason, a malformed `port` fails before
//! anything is made, and undeploy closes the ports. Needs root (`CI=true`: no skipping).

mod overlay_support;

use overlay_support::harness::*;
use overlay_support::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

const PASSWORD: &str = "overlay-ports";
const SERVER_ID: &str = "ovp.test.server.test.instance.0";
const TAKEN_ID: &str = "ovp.test.taken.test.instance.0";

/// `GET /` to `addr` from namespace `ns`; the answer.
fn get(ns: &str, addr: SocketAddr) -> std::io::Result<String> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("panicked")))
}

#[test]
fn published_ports_serve_the_host_and_leave_outgoing_traffic_alone() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "published_ports_serve_the_host_and_leave_outgoing_traffic_alone needs root"
        );
        eprintln!(
            "SKIPPED published_ports_serve_the_host_and_leave_outgoing_traffic_alone: needs root"
        );
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let sfx = suffix();
    let mut topo = Topology::default();
    let wb = topo.netns(&format!("oakpb-{sfx}"));
    let hub = hub(&mut topo, &sfx, &[(&wb, WB)]);
    // Instances reach the LAN through the worker (no masquerading in this build): the hub
    // routes the worker subnets back to it.
    topo.ip(
        &hub,
        &["route", "add", "10.18.0.0/16", "via", &WB.to_string()],
    );
    let _sweep = NetnsSweep(vec![SERVER_ID.into(), TAKEN_ID.into()]);
    let _orch = Orch::start(&hub, HUB, PASSWORD);
    let root = Root::new(&hub, PASSWORD);

    // The hub's own service on port 6080: what the instance must reach when it dials out.
    let hub_listener = in_netns(&hub, || TcpListener::bind((HUB, 6080)).unwrap())
        .join()
        .unwrap();
    let hub_thread = std::thread::spawn(move || {
        for mut c in hub_listener.incoming().take(1).flatten() {
            let _ = c.write_all(b"the hub itself\n");
        }
    });

    let www = TempDir::new("www");
    std::fs::write(www.0.join("index.html"), "served by the instance\n").unwrap();
    let state = TempDir::new("pb");
    let reg = Registry::default();
    let b = start_worker(
        &wb,
        "wb",
        WB,
        state.0.clone(),
        www.0.clone(),
        reg.clone(),
        false,
    );

    let ids = root.deploy(sla_of(
        "ovp",
        vec![microservice(
            "server",
            "wb",
            Some("10.30.32.32"),
            "6080:80;5354:5353/udp",
        )],
    ));
    root.wait_nsip(&ids["server"]);
    // a UDP echo inside the instance
    let echo = in_netns(SERVER_ID, || UdpSocket::bind("0.0.0.0:5353").unwrap())
        .join()
        .unwrap();
    echo.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let echo_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
            if &buf[..n] == b"last" {
                break;
            }
        }
    });

    // TCP from the LAN to the worker's address reaches the instance's port 80.
    let page = wait_for(Duration::from_secs(10), || {
        get(&hub, SocketAddr::from((WB, 6080))).ok()
    })
    .expect("the hub reaches the published TCP port");
    assert!(page.ends_with("served by the instance\n"), "{page}");
    // UDP as well, and the reply comes from the published port.
    let (reply, from) = in_netns(&hub, || {
        let s = UdpSocket::bind((HUB, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"ping over udp", (WB, 5354)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = s
            .recv_from(&mut buf)
            .expect("UDP echo through the published port");
        s.send_to(b"last", (WB, 5354)).unwrap();
        (buf[..n].to_vec(), from)
    })
    .join()
    .unwrap();
    assert_eq!(reply, b"ping over udp");
    assert_eq!(from, SocketAddr::from((WB, 5354)));
    echo_thread.join().unwrap();

    // The instance dialling port 6080 elsewhere gets that host, not itself.
    let out = in_netns(SERVER_ID, || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((HUB, 6080)), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok::<_, std::io::Error>(text)
    })
    .join()
    .unwrap()
    .expect("the instance reaches the hub's port 6080");
    assert_eq!(out, "the hub itself\n", "outgoing traffic was redirected");
    hub_thread.join().unwrap();

    // Another instance on this worker asking for the same host port: FAILED, with the reason.
    let sla2 = sla_of("ovq", vec![microservice("taken", "wb", None, "6080:80")]);
    let (c, v) = root.call("POST", "/api/application/", Some(sla2));
    assert_eq!(c, 200, "{v}");
    let (_, svcs) = root.call("GET", "/api/services/", None);
    let taken = svcs
        .as_array()
        .and_then(|a| a.iter().find(|s| s["microservice_name"] == "taken"))
        .and_then(|s| s["_id"]["$oid"].as_str())
        .expect("service taken")
        .to_string();
    let (c, v) = root.call("POST", &format!("/api/service/{taken}/instance"), None);
    assert_eq!(c, 200, "{v}");
    let failed = wait_for(Duration::from_secs(20), || {
        let (_, v) = root.call("GET", &format!("/api/service/{taken}"), None);
        let text = v.to_string();
        text.contains("FAILED").then_some(text)
    })
    .expect("the instance with a taken host port is reported FAILED");
    println!("{failed}");
    assert!(failed.contains("6080/tcp is not available"), "{failed}");
    assert!(!std::path::Path::new(&format!("/run/netns/{TAKEN_ID}")).exists());
    let links = topo.ip(&wb, &["-o", "link"]);
    assert_eq!(
        links.matches("oakveth").count(),
        1,
        "only the server's veth: {links}"
    );
    // The first instance's port still works.
    let page = get(&hub, SocketAddr::from((WB, 6080))).expect("port 6080 still served");
    assert!(page.ends_with("served by the instance\n"), "{page}");

    // Undeploy closes the ports.
    root.undeploy(&ids["server"]);
    wait_for(Duration::from_secs(20), || {
        get(&hub, SocketAddr::from((WB, 6080)))
            .is_err()
            .then_some(())
    })
    .expect("port 6080 closed after undeploy");
    b.stop();
    assert!(reg.lock().unwrap().is_empty());
}

/// A malformed `port` fails the deploy before anything is made (the root validates SLAs, so
/// this is the worker's own check, called as the runtime does).
#[test]
fn a_malformed_port_field_fails_before_anything_is_made() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "needs root");
        eprintln!("SKIPPED a_malformed_port_field_fails_before_anything_is_made: needs root");
        return;
    }
    let sfx = suffix();
    let mut topo = Topology::default();
    let w = topo.netns(&format!("oakpm-{sfx}"));
    let state = TempDir::new("pm");
    let dir = state.0.clone();
    let err = in_netns(&w, move || {
        let cfg = worker::overlay::OverlayConfig {
            dataplane: Default::default(),
            plumbing: Default::default(),
            public_address: Some(WB),
            netns_dir: PathBuf::from("/run/netns"),
            state_dir: dir.join("overlay"),
            subnet_wait: Duration::from_secs(1),
            max_subscriptions: 8,
        };
        let (overlay, _link, _task) = worker::overlay::Overlay::start(cfg).expect("overlay");
        let id = format!("ovp.test.bad{sfx}.test.instance.0");
        let r = async_io::block_on(overlay.attach_instance(
            &id,
            &format!("ovp.test.bad{sfx}.test"),
            0,
            "80:x/tcp",
        ));
        let made = std::path::Path::new(&format!("/run/netns/{id}")).exists();
        overlay.teardown();
        (r.map(|_| ()).map_err(|e| e.to_string()), made)
    })
    .join()
    .unwrap();
    let (r, made) = err;
    let e = r.expect_err("a malformed port field is refused");
    assert!(
        e.contains("bad port field") && e.contains("80:x/tcp"),
        "{e}"
    );
    assert!(!made, "nothing is made for a refused deploy");
}
