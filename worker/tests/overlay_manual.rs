//! `NetManager` (the NodeEngine binary invoked by that name) behind upstream's local API on a
//! unix socket, in a worker namespace, against `orch-lite all` in a hub namespace: `/register`
//! answers once the cluster gave a subnet (bridge at S+1/26), `/container/deploy` with the pid
//! of a process in its own netns wires it (address S+k inside), `/container/undeploy` removes
//! the veth, and SIGTERM removes bridge, TUN and socket. Then the legacy pairing (#8.5):
//! a `NodeEngine` process with `network manual` and a `NetManager` process side by side, the
//! NodeEngine running a real container on the shared containerd fixture; the container gets
//! its overlay address from the NetManager, and undeploy removes it. Needs root; skipped
//! otherwise.

mod overlay_support;

use overlay_support::*;
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const NODE: &str = "6650f0c2e4b0a1b2c3d4e5f6";

/// One POST over the unix socket, as the Go NodeEngine sends it (Host `localhost:0`).
fn post(sock: &Path, path: &str, body: &serde_json::Value) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the NetManager socket");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost:0\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let text = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, text)
}

struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn netmanager_local_api_wires_a_process() {
    if !is_root() {
        eprintln!("SKIPPED netmanager_local_api_wires_a_process: needs root");
        return;
    }
    let sfx = suffix();
    let mut topo = Topology::default();
    let w = topo.netns(&format!("oakwm-{sfx}"));
    let inst = topo.netns(&format!("oakim-{sfx}"));
    let hub = hub(&mut topo, &sfx, &[(&w, WA)]);
    let _orch = Orch::start(&hub, HUB, "manual-test");
    login(
        &hub,
        std::net::SocketAddr::from((HUB, 10000)),
        "manual-test",
    );

    let dir = TempDir::new("nm");
    let nm = dir.0.join("NetManager");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_NodeEngine"), &nm).unwrap();
    let netcfg = dir.0.join("netcfg.json");
    std::fs::write(
        &netcfg,
        json!({"NodePublicAddress": WA.to_string(), "NodePublicPort": "50103",
               "ClusterUrl": "203.0.113.1", "ClusterMqttPort": "10003"})
        .to_string(),
    )
    .unwrap();
    let sock = dir.0.join("netmanager.sock");
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &w])
        .arg(&nm)
        .env("OAK_NETCFG", &netcfg)
        .env("OAK_CONFIG_DIR", &dir.0)
        .env("OAK_STATE_DIR", dir.0.join("state"))
        .env("OAK_NETWORK", format!("manual:{}", sock.display()))
        .env("OAK_CLUSTER_ADDRESS", HUB.to_string())
        .env("RUST_LOG", "info")
        .spawn()
        .expect("start NetManager");
    let nm_proc = Proc(child);
    wait_for(Duration::from_secs(10), || sock.exists().then_some(()))
        .expect("the NetManager socket appears");

    // cluster_address in the body wins over netcfg's ClusterUrl (203.0.113.1 is unreachable)
    let (code, text) = post(
        &sock,
        "/register",
        &json!({"client_id": NODE, "cluster_address": HUB.to_string()}),
    );
    assert_eq!(code, 200, "{text}");
    let bridge = topo.try_ip(&w, &["-o", "-4", "addr", "show", "dev", "goProxyBridge"]);
    assert!(
        bridge.contains("inet 10.18."),
        "bridge after /register: {bridge}"
    );
    let (code, _) = post(&sock, "/register", &json!({"client_id": NODE}));
    assert_eq!(code, 200, "a repeat with the same id is fine");
    let (code, _) = post(
        &sock,
        "/register",
        &json!({"client_id": "aaaaaaaaaaaaaaaaaaaaaaaa"}),
    );
    assert_eq!(code, 400, "another id is refused");

    // a process in its own namespace, as a task the NodeEngine started
    let sleeper = Proc(
        std::process::Command::new("ip")
            .args(["netns", "exec", &inst, "sleep", "60"])
            .spawn()
            .unwrap(),
    );
    let pid = sleeper.0.id();
    std::thread::sleep(Duration::from_millis(200));
    let (code, text) = post(
        &sock,
        "/container/deploy",
        &json!({"pid": pid, "serviceName": "ovl.test.man.test", "instanceNumber": 0, "portMappings": ""}),
    );
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["serviceName"], "ovl.test.man.test");
    let nsip = v["nsAddress"].as_str().unwrap().to_string();
    assert!(nsip.starts_with("10.18."), "{v}");
    let inside = topo.ip(&inst, &["-o", "-4", "addr"]);
    assert!(inside.contains(&format!("inet {nsip}/26")), "{inside}");
    assert!(topo.ip(&w, &["-o", "link"]).contains("oakveth"));

    let (code, _) = post(
        &sock,
        "/container/undeploy",
        &json!({"pid": -1, "serviceName": "ovl.test.man.test", "instanceNumber": 0, "portMappings": ""}),
    );
    assert_eq!(code, 200);
    assert!(!topo.ip(&w, &["-o", "link"]).contains("oakveth"));
    assert!(!topo.ip(&inst, &["-o", "-4", "addr"]).contains(&nsip));
    let (code, _) = post(
        &sock,
        "/container/deploy",
        &json!({"pid": -1, "serviceName": "ovl.test.man.test", "instanceNumber": 0}),
    );
    assert_eq!(code, 400);

    drop(nm_proc);
    let links = topo.ip(&w, &["-o", "link"]);
    for name in ["goProxyTun", "goProxyBridge", "oakveth"] {
        assert!(!links.contains(name), "{name} left: {links}");
    }
    assert!(!sock.exists(), "socket removed on shutdown");
    drop(sleeper);
}

/// The NetManager personality of this build in namespace `ns`, its socket and config under
/// `dir` (netcfg's ClusterUrl points nowhere: `/register` carries the cluster address).
fn netmanager(ns: &str, dir: &Path, sock: &Path) -> Proc {
    let nm = dir.join("NetManager");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_NodeEngine"), &nm).unwrap();
    let netcfg = dir.join("netcfg.json");
    std::fs::write(
        &netcfg,
        json!({"NodePublicAddress": WA.to_string(), "NodePublicPort": "50103",
               "ClusterUrl": "203.0.113.1", "ClusterMqttPort": "10003"})
        .to_string(),
    )
    .unwrap();
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(&nm)
        .env("OAK_NETCFG", &netcfg)
        .env("OAK_CONFIG_DIR", dir)
        .env("OAK_STATE_DIR", dir.join("state"))
        .env("OAK_NETWORK", format!("manual:{}", sock.display()))
        .env("RUST_LOG", "info")
        .spawn()
        .expect("start NetManager");
    Proc(child)
}

#[test]
fn node_engine_in_manual_mode_gets_instances_wired_by_the_netmanager() {
    if !e2e::require_root("node_engine_in_manual_mode_gets_instances_wired_by_the_netmanager") {
        return;
    }
    let _serial = e2e::serial();
    let fx = e2e::Fixture::start().expect("containerd fixture");
    let sfx = suffix();
    let ctr_ns = format!("oakman{sfx}");
    // The NodeEngine runs in the worker namespace, where the fixture's registry on the host's
    // loopback is out of reach: the image is put into its containerd namespace beforehand.
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
    let w = topo.netns(&format!("oakwn-{sfx}"));
    let hub = hub(&mut topo, &sfx, &[(&w, WA)]);
    let job = "ovm.test.man.test";
    let id = format!("{job}.instance.0");
    let _sweep = NetnsSweep(vec![id.clone()]);
    let _orch = Orch::start(&hub, HUB, "manual-ne");
    let root = harness::Root::new(&hub, "manual-ne");

    let dir = TempDir::new("nm-ne");
    let sock = dir.0.join("netmanager.sock");
    let _nm = netmanager(&w, &dir.0, &sock);
    let ne_dir = dir.0.join("ne");
    // Not `ip netns exec`: that also gives the process a private mount namespace, and the
    // named netns the NodeEngine bind-mounts must be visible to containerd's runc.
    let mut ne = std::process::Command::new(env!("CARGO_BIN_EXE_NodeEngine"));
    let w_ns = std::fs::File::open(format!("/run/netns/{w}")).unwrap();
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = w_ns.as_raw_fd();
        // SAFETY: only setns(2) runs between fork and exec, on a descriptor that stays open
        // in the parent until the child is spawned.
        unsafe {
            ne.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    ne.args(["-a", &HUB.to_string(), "-p", "10100"])
        .env("RUST_LOG", "info")
        .env("OAK_NODE_NAME", "wa")
        .env("OAK_CONFIG_DIR", ne_dir.join("etc"))
        .env("OAK_NETCFG", ne_dir.join("etc/netcfg.json"))
        .env("OAK_STATE_DIR", ne_dir.join("state"))
        .env("OAK_APP_LOGS", ne_dir.join("logs"))
        .env("OAK_NETWORK", format!("manual:{}", sock.display()))
        .env("OAK_STATUS_ADDR", "127.0.0.1:10999")
        .env("OAK_REPORT_INTERVAL_MS", "500")
        .env("OAK_CONTAINERD_NAMESPACE", &ctr_ns)
        .env_remove("OAK_JOIN_TOKEN");
    for (k, v) in fx.worker_env() {
        ne.env(k, v);
    }
    let ne = Proc(ne.spawn().expect("start NodeEngine"));
    drop(w_ns);

    let sla = json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"",
        "application_name":"ovm","application_namespace":"test","application_desc":"manual",
        "microservices":[{"microserviceID":"","microservice_name":"man","microservice_namespace":"test",
            "virtualization":"container","cmd":["sleep","600"],"memory":32,"vcpus":0,"vgpus":0,"vtpus":0,
            "bandwidth_in":0,"bandwidth_out":0,"storage":0,"code":fx.image,"state":"","port":"",
            "added_files":[],"constraints":[]}]}]})
    .to_string();
    let ids = root.deploy(sla);
    let nsip = root.wait_nsip(&ids["man"]);
    assert!(nsip.starts_with("10.18."), "{nsip}");
    // The container's process is in the namespace the NetManager wired, with that address.
    let inside = topo.ip(&id, &["-o", "-4", "addr"]);
    assert!(inside.contains(&format!("inet {nsip}/26")), "{inside}");
    let pid = wait_for(Duration::from_secs(20), || {
        fx.task_pid(&ctr_ns, &id).ok().flatten()
    })
    .expect("the container's task runs");
    let same = |a: &str, b: &str| {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    };
    assert!(
        same(&format!("/proc/{pid}/ns/net"), &format!("/run/netns/{id}")),
        "the task is not in the wired namespace"
    );
    assert!(topo.ip(&w, &["-o", "link"]).contains("oakveth"));

    root.undeploy(&ids["man"]);
    wait_for(Duration::from_secs(30), || {
        (!Path::new(&format!("/run/netns/{id}")).exists()
            && !topo.ip(&w, &["-o", "link"]).contains("oakveth"))
        .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "netns or veth left after undeploy: {}",
            topo.ip(&w, &["-o", "link"])
        )
    });
    drop(ne);
    let _ = fx.ctr_ok(&ctr_ns, &["images", "rm", &fx.image]);
}
