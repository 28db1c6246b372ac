//! Test fixture for real network namespaces: names with a random suffix, every namespace and
//! link removed in `Drop` (also when the test fails), `ip` used only here in tests to build
//! and inspect the topology, and a helper to run a closure inside a namespace on its own
//! thread.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips (returns true) with a message when not root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIPPED {test}: needs root (network namespaces, TUN, veth)");
    true
}

/// 4 hex digits, different for every call in this process and unlikely to collide with
/// another test process.
pub fn suffix() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let r = (t ^ std::process::id().wrapping_mul(2_654_435_761)) & 0xfff0;
    format!("{:04x}", r | (n & 0xf))
}

/// Runs a command, panicking with its output on failure.
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

pub fn run_ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Namespaces and root-namespace links to remove when the test ends.
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

    /// `ip -n <ns> …`
    pub fn ip(&self, ns: &str, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", ns];
        v.extend_from_slice(args);
        run(&v)
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    pub fn sysctl(&self, ns: &str, key: &str, v: &str) {
        let out = self.exec(ns, &["sysctl", "-qw", &format!("{key}={v}")]);
        assert!(out.status.success(), "sysctl {key} in {ns}: {out:?}");
    }

    /// A veth pair with `a` in namespace `ns_a` and `b` in `ns_b`.
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

/// Runs `f` on a new thread that has entered network namespace `ns` (setns affects only the
/// calling thread, so the test's own thread stays where it is).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_netns(&path);
        f()
    })
}

pub fn enter_netns(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: f is an open namespace file; CLONE_NEWNET only changes this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// "rtt min/avg/max/mdev = a/b/c/d ms" → (min, avg) in ms.
pub fn ping_rtt(out: &str) -> Option<(f64, f64)> {
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    let nums = line.split('=').nth(1)?.trim().split(' ').next()?;
    let mut it = nums.split('/').map(|x| x.parse::<f64>().ok());
    Some((it.next()??, it.next()??))
}
