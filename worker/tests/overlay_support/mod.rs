//! Real network namespaces for the overlay tests: names with a random suffix, every namespace
//! and link removed in `Drop` (also when the test fails), `ip` used only here, in tests, to
//! build and inspect the topology, and a helper to run a closure inside a namespace on its own
//! thread (setns changes only the calling thread).
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub mod harness;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// 4 hex digits, unlikely to collide with another test process.
pub fn suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:04x}",
        (t ^ std::process::id().wrapping_mul(2_654_435_761)) & 0xffff
    )
}

pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Namespaces and links to remove when the test ends, whatever happened.
#[derive(Default)]
pub struct Topology {
    pub netns: Vec<String>,
    pub links: Vec<String>,
}

impl Topology {
    pub fn netns(&mut self, name: &str) -> String {
        run(&["ip", "netns", "add", name]);
        self.netns.push(name.to_string());
        run(&["ip", "-n", name, "link", "set", "lo", "up"]);
        name.to_string()
    }

    pub fn ip(&self, ns: &str, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", ns];
        v.extend_from_slice(args);
        run(&v)
    }

    /// `ip -n <ns> …` output, empty on failure (for polling).
    pub fn try_ip(&self, ns: &str, args: &[&str]) -> String {
        Command::new("ip")
            .args(["-n", ns])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    pub fn exec(ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// A veth pair with `a` in `ns_a` and `b` in `ns_b`.
    pub fn veth(&mut self, a: &str, ns_a: &str, b: &str, ns_b: &str) {
        self.links.push(a.to_string());
        run(&["ip", "link", "add", a, "type", "veth", "peer", "name", b]);
        run(&["ip", "link", "set", a, "netns", ns_a]);
        run(&["ip", "link", "set", b, "netns", ns_b]);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
        for n in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Removes named namespaces the code under test may have left if the test failed midway.
pub struct NetnsSweep(pub Vec<String>);

impl Drop for NetnsSweep {
    fn drop(&mut self) {
        for n in &self.0 {
            if PathBuf::from(format!("/run/netns/{n}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", n]).output();
            }
        }
    }
}

pub fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: f is an open namespace file; CLONE_NEWNET only changes this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a new thread inside namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        f()
    })
}

/// One HTTP/1.1 call from inside `ns`; (status, JSON body or Null).
pub fn http(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, serde_json::Value) {
    let (method, path, token) = (
        method.to_string(),
        path.to_string(),
        token.map(str::to_string),
    );
    in_netns(ns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return (0, serde_json::Value::Null);
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let body = body.unwrap_or_default();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(req.as_bytes()).is_err() {
            return (0, serde_json::Value::Null);
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let json = text
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or(serde_json::Value::Null);
        (code, json)
    })
    .join()
    .unwrap_or((0, serde_json::Value::Null))
}

/// Polls `f` until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `target/debug/orch-lite` next to this test's binary, built first if it is not there (the
/// worker crate cannot depend on orch-lite: orch-lite depends on it).
pub fn orch_lite_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let bin = dir.join("orch-lite");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "orch-lite", "--bin", "orch-lite"])
            .status()
            .expect("run cargo build");
        assert!(st.success(), "cargo build -p orch-lite failed");
    }
    bin
}

pub const HUB: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 168, 77, 1);
pub const WA: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 168, 77, 11);
pub const WB: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 168, 77, 12);

pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("oak-ovl-{name}-{}", suffix()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `orch-lite all` in namespace `ns` (default ports there), killed on drop.
pub struct Orch {
    child: std::process::Child,
    _data: TempDir,
}

impl Orch {
    pub fn start(ns: &str, advertise: std::net::Ipv4Addr, password: &str) -> Orch {
        let data = TempDir::new("orch");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(orch_lite_bin())
            .arg("all")
            .env("OAK_DATA_DIR", &data.0)
            .env("OAK_ADMIN_PASSWORD", password)
            .env("OAK_ADVERTISE_ADDR", advertise.to_string())
            .env("OAK_CLUSTER_NAME", "ovl")
            .env("OAK_CLUSTER_REPORT_INTERVAL_MS", "500")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start orch-lite");
        Orch { child, _data: data }
    }
}

impl Drop for Orch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Logs in as Admin once the root answers; the token.
pub fn login(ns: &str, root: SocketAddr, password: &str) -> String {
    wait_for(Duration::from_secs(20), || {
        let (c, v) = http(
            ns,
            root,
            "POST",
            "/api/auth/login",
            None,
            Some(serde_json::json!({"username":"Admin","password":password}).to_string()),
        );
        (c == 200).then(|| v["token"].as_str().map(str::to_string))?
    })
    .expect("orch-lite root answers")
}

/// A hub namespace with bridge `br0` at [`HUB`]/24 and one veth per worker namespace.
pub fn hub(topo: &mut Topology, sfx: &str, workers: &[(&str, std::net::Ipv4Addr)]) -> String {
    let hub = topo.netns(&format!("oakhub-{sfx}"));
    topo.ip(&hub, &["link", "add", "br0", "type", "bridge"]);
    topo.ip(&hub, &["addr", "add", &format!("{HUB}/24"), "dev", "br0"]);
    topo.ip(&hub, &["link", "set", "br0", "up"]);
    for (i, (ns, ip)) in workers.iter().enumerate() {
        let (h, w) = (format!("oh{i}-{sfx}"), format!("ow{i}-{sfx}"));
        topo.veth(&h, &hub, &w, ns);
        topo.ip(&hub, &["link", "set", &h, "master", "br0", "up"]);
        topo.ip(ns, &["addr", "add", &format!("{ip}/24"), "dev", &w]);
        topo.ip(ns, &["link", "set", &w, "up"]);
    }
    hub
}
