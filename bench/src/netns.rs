//! A worker behind its own network namespace: one veth pair between the root namespace and the
//! worker's namespace, and a delay line ([`Relay`]) on the host end that forwards the worker's
//! TCP connections to orch-lite on loopback. The relay stands in for `tc netem`, which this
//! kernel lacks (CONFIG_NET_SCH_NETEM is off): it holds every chunk for half the added round
//! trip in each direction, so it adds latency like netem's `delay` without rate limits or loss. A private namespace also keeps the worker's overlay devices
//! (fixed names such as `goProxyTun`) away from other tests running on the same machine.
//! Names carry the run's tag (`oakb<tag>-…`, which `scripts/bench.sh` sweeps on exit) and the
//! pid; everything is removed on drop.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tag() -> String {
    std::env::var("OAK_BENCH_TAG")
        .ok()
        .filter(|t| !t.is_empty() && t.len() <= 4)
        .unwrap_or_else(|| format!("{:04x}", std::process::id() & 0xffff))
}

pub struct WorkerNet {
    pub ns: String,
    host_link: String,
    worker_link: String,
    /// The root namespace's end: where orch-lite listens for this worker.
    pub host_ip: String,
    pub worker_ip: String,
}

impl WorkerNet {
    /// `what` is a short letter distinguishing several namespaces of one run.
    pub fn new(what: char) -> Result<WorkerNet, String> {
        let t = tag();
        let pid = std::process::id();
        // A /30 per (pid, what) in 10.252.0.0/14, so concurrent runs do not share routes.
        let k = (pid.wrapping_mul(31).wrapping_add(what as u32)) & 0x3ffff;
        let (a, b, c) = (252 + (k >> 16), (k >> 8) & 0xff, (k & 0x3f) << 2);
        let net = WorkerNet {
            ns: format!("oakb{t}-{what}{pid}"),
            host_link: format!("ob{t}{what}h"),
            worker_link: format!("ob{t}{what}w"),
            host_ip: format!("10.{a}.{b}.{}", c + 1),
            worker_ip: format!("10.{a}.{b}.{}", c + 2),
        };
        ip(&["netns", "add", &net.ns])?;
        let setup = || -> Result<(), String> {
            ip(&["-n", &net.ns, "link", "set", "lo", "up"])?;
            ip(&[
                "link",
                "add",
                &net.host_link,
                "type",
                "veth",
                "peer",
                "name",
                &net.worker_link,
                "netns",
                &net.ns,
            ])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/30", net.host_ip),
                "dev",
                &net.host_link,
            ])?;
            ip(&["link", "set", &net.host_link, "up"])?;
            ip(&[
                "-n",
                &net.ns,
                "addr",
                "add",
                &format!("{}/30", net.worker_ip),
                "dev",
                &net.worker_link,
            ])?;
            ip(&["-n", &net.ns, "link", "set", &net.worker_link, "up"])?;
            ip(&[
                "-n",
                &net.ns,
                "route",
                "add",
                "default",
                "via",
                &net.host_ip,
            ])?;
            Ok(())
        };
        setup()?;
        Ok(net)
    }

    /// Opens the namespace for [`crate::procs::spawn_in`].
    pub fn file(&self) -> Result<File, String> {
        let p = format!("/run/netns/{}", self.ns);
        File::open(&p).map_err(|e| format!("{p}: {e}"))
    }
}

impl Drop for WorkerNet {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Moves the calling (child, pre-exec) process into the namespace behind `fd`.
pub fn setns_net(fd: &File) -> std::io::Result<()> {
    // SAFETY: fd is an open namespace file; setns only changes the calling thread, which in a
    // pre_exec hook is the whole child.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// TCP relays from `listen` addresses to targets on loopback, adding a switchable delay.
pub struct Relay {
    /// Added round trip in ms (half of it in each direction); applies to data read after a change.
    pub rtt_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    listening: Vec<SocketAddr>,
}

impl Relay {
    pub fn new() -> Relay {
        Relay {
            rtt_ms: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            listening: Vec::new(),
        }
    }

    pub fn set_rtt(&self, ms: u64) {
        self.rtt_ms.store(ms, Ordering::Relaxed);
    }

    /// Forwards connections to `listen` to `target`.
    pub fn forward(&mut self, listen: SocketAddr, target: SocketAddr) -> Result<(), String> {
        let l = TcpListener::bind(listen).map_err(|e| format!("relay on {listen}: {e}"))?;
        self.listening.push(listen);
        let (rtt, stop) = (self.rtt_ms.clone(), self.stop.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(a) = conn else { continue };
                let Ok(b) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
                    continue;
                };
                pump(a, b2, rtt.clone());
                pump(b, a2, rtt.clone());
            }
        });
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for a in &self.listening {
            // wakes the accept loop so it sees `stop`
            let _ = TcpStream::connect_timeout(a, Duration::from_millis(200));
        }
    }
}

/// One direction: a reader stamps each chunk with its due time, a writer sends it then.
fn pump(mut from: TcpStream, mut to: TcpStream, rtt: Arc<AtomicU64>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due =
                        Instant::now() + Duration::from_micros(rtt.load(Ordering::Relaxed) * 500);
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((due, data)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
