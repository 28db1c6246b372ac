//! `NetManager` (the NodeEngine binary invoked by that name) behind upstream's local API on a
//! unix socket, in a worker namespace, against `orch-lite all` in a hub namespace: `/register`
//! answers once the cluster gave a subnet (bridge at S+1/26), `/container/deploy` with the pid
//! of a process in its own netns wires it (address S+k inside), `/container/undeploy` removes
//! the veth, and SIGTERM removes bridge, TUN and socket. Needs root; skipped otherwise.

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
