//! The real `NodeEngine` binary with `network auto` on the shared containerd fixture, in a worker
//! namespace, against `orch-lite all` in a hub namespace: a container published with
//! `port: "6080:80"` answers on the worker's address; SIGTERM leaves the running container
//! wired (netns, veth, address); the next start adopts it, re-attaches it and publishes its
//! port again with no duplicate link; undeploy removes it all. Needs root (`CI=true`: no
//! skipping).

mod overlay_support;

use overlay_support::harness::Root;
use overlay_support::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const PASSWORD: &str = "overlay-ne";
const ID: &str = "one.test.web.test.instance.0";

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

/// `NodeEngine` in namespace `ns` without a private mount namespace (unlike `ip netns exec`):
/// the named netns it bind-mounts must be visible to containerd's runc.
fn node_engine(ns: &str, home: &Path, fx: &e2e::Fixture, ctr_ns: &str, run: u32) -> e2e::Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_NodeEngine"));
    let nsf = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = nsf.as_raw_fd();
        // SAFETY: only setns(2) runs between fork and exec, on a descriptor open until spawn.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c.args(["-a", &HUB.to_string(), "-p", "10100"])
        .env("RUST_LOG", "info")
        .env("OAK_NODE_NAME", "wa")
        .env("OAK_CONFIG_DIR", home.join("etc"))
        .env("OAK_NETCFG", home.join("etc/netcfg.json"))
        .env("OAK_STATE_DIR", home.join("state"))
        .env("OAK_APP_LOGS", home.join("logs"))
        .env("OAK_NETWORK", "auto")
        .env("OAK_PUBLIC_ADDRESS", WA.to_string())
        .env("OAK_STATUS_ADDR", "127.0.0.1:10998")
        .env("OAK_REPORT_INTERVAL_MS", "500")
        .env("OAK_CONTAINERD_NAMESPACE", ctr_ns)
        .env_remove("OAK_JOIN_TOKEN");
    for (k, v) in fx.worker_env() {
        c.env(k, v);
    }
    e2e::Proc::spawn("NodeEngine", &mut c, home.join(format!("ne{run}.log"))).unwrap()
}

fn veths(topo: &Topology, ns: &str) -> usize {
    topo.ip(ns, &["-o", "link"]).matches(": oakveth").count()
}

#[test]
fn node_engine_restart_keeps_a_published_container_on_the_overlay() {
    if !e2e::require_root("node_engine_restart_keeps_a_published_container_on_the_overlay") {
        return;
    }
    let _serial = e2e::serial();
    let fx = e2e::Fixture::start().expect("containerd fixture");
    let sfx = suffix();
    let ctr_ns = format!("oakne{sfx}");
    // The registry on the host's loopback is out of the worker namespace's reach.
    let out = fx
        .ctr(&ctr_ns)
        .args(["images", "pull", "--plain-http", &fx.image])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut topo = Topology::default();
    let w = topo.netns(&format!("oakne-{sfx}"));
    let hub = hub(&mut topo, &sfx, &[(&w, WA)]);
    let _sweep = NetnsSweep(vec![ID.into()]);
    let _orch = Orch::start(&hub, HUB, PASSWORD);
    let root = Root::new(&hub, PASSWORD);
    let home = TempDir::new("ne");
    let mut ne = node_engine(&w, &home.0, &fx, &ctr_ns, 1);

    let sla = serde_json::json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"",
        "application_name":"one","application_namespace":"test","application_desc":"restart",
        "microservices":[{"microserviceID":"","microservice_name":"web","microservice_namespace":"test",
            "virtualization":"container","cmd":["httpd","-f","-p","80","-h","/www"],"memory":32,
            "vcpus":0,"vgpus":0,"vtpus":0,"bandwidth_in":0,"bandwidth_out":0,"storage":0,
            "code":fx.image,"state":"","port":"6080:80","added_files":[],"constraints":[]}]}]})
    .to_string();
    let ids = root.deploy(sla);
    let nsip = root.wait_nsip(&ids["web"]);
    let published = SocketAddr::from((WA, 6080));
    let page =
        wait_for(Duration::from_secs(20), || get(&hub, published).ok()).unwrap_or_else(|| {
            panic!(
                "published port never answered; worker log:\n{}",
                ne.tail(40)
            )
        });
    assert!(page.contains("OAK_FIXTURE_HTTPD_OK"), "{page}");

    // SIGTERM: the container and its network stay; the TUN and the port go with the process.
    ne.stop().expect("NodeEngine stops on SIGTERM");
    assert!(
        fx.task_pid(&ctr_ns, ID).unwrap().is_some(),
        "the container survives"
    );
    let inside = topo.ip(ID, &["-o", "-4", "addr"]);
    assert!(inside.contains(&format!("inet {nsip}/26")), "{inside}");
    assert_eq!(veths(&topo, &w), 1);
    assert!(!topo.ip(&w, &["-o", "link"]).contains("goProxyTun"));

    let t0 = Instant::now();
    let mut ne = node_engine(&w, &home.0, &fx, &ctr_ns, 2);
    let page = wait_for(Duration::from_secs(30), || get(&hub, published).ok())
        .unwrap_or_else(|| panic!("port not published again; worker log:\n{}", ne.tail(40)));
    println!(
        "published port answers {} ms after the restart",
        t0.elapsed().as_millis()
    );
    assert!(page.contains("OAK_FIXTURE_HTTPD_OK"), "{page}");
    assert_eq!(veths(&topo, &w), 1, "{}", topo.ip(&w, &["-o", "link"]));
    let inside = topo.ip(ID, &["-o", "-4", "addr"]);
    assert!(
        inside.contains(&format!("inet {nsip}/26")),
        "same address after the restart: {inside}"
    );
    // Taken back by the overlay (data plane entry, service/deployed), not wired anew.
    let log = std::fs::read_to_string(home.0.join("ne2.log")).unwrap_or_default();
    assert!(log.contains("re-attached"), "{log}");

    root.undeploy(&ids["web"]);
    wait_for(Duration::from_secs(30), || {
        (!Path::new(&format!("/run/netns/{ID}")).exists() && veths(&topo, &w) == 0).then_some(())
    })
    .unwrap_or_else(|| panic!("left after undeploy: {}", topo.ip(&w, &["-o", "link"])));
    assert!(get(&hub, published).is_err(), "port closed after undeploy");
    ne.stop().expect("NodeEngine stops");
    let links = topo.ip(&w, &["-o", "link"]);
    for name in ["goProxyTun", "goProxyBridge", "oakveth"] {
        assert!(!links.contains(name), "{name} left: {links}");
    }
    let _ = fx.ctr_ok(&ctr_ns, &["images", "rm", &fx.image]);
}
