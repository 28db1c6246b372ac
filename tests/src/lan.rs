//! A LAN of "hosts" on one machine, for the multi-host end-to-end tests: each host is a network
//! namespace made by the test, wired by a veth to one bridge, with its own IPv4 address. The
//! bridge lives in a dedicated "switch" namespace so that the root namespace's firewall
//! (`br_netfilter` sends bridged frames through the root's iptables) plays no part; the root
//! namespace joins the LAN through one more veth as the gateway address, which is how the test
//! itself, the fixtures' registries and the orchestrator APIs are reached from both sides.
//!
//! Every name carries the test's pid and a per-process counter (other test processes run at the
//! same time on this machine). Dropping the [`Lan`] removes the namespaces and links; processes
//! started inside hosts must be stopped before (declare the `Lan` first so it drops last).
//!
//! Processes run in a host through `nsenter --net`, not `ip netns exec`: the latter also gives
//! the process a private mount namespace with a fresh `/sys`, which hides the cgroup hierarchy
//! from a worker and keeps the instance namespaces it bind-mounts under `/run/netns` from the
//! containerd that must open them.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static LANS: AtomicU32 = AtomicU32::new(0);

/// One host of a [`Lan`].
#[derive(Debug, Clone)]
pub struct Host {
    /// The test's short name for it (`ctl`, `w1`, …).
    pub name: String,
    /// Its network namespace (`/run/netns/<ns>`).
    pub ns: String,
    /// Its address on the LAN (interface `eth0`).
    pub addr: Ipv4Addr,
}

impl Host {
    /// `program` to be started inside this host's network namespace; the pid of the spawned
    /// child is the program's own (nsenter execs it), so signals reach it.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .arg(program);
        c
    }

    /// `cmd` (program, arguments, environment changes) to be started inside this host.
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut c = self.command(cmd.get_program());
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// Runs `args` inside the host and returns its stdout, or the failure with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(args[0])
            .args(&args[1..])
            .output()
            .map_err(|e| format!("{args:?} in {}: {e}", self.ns))?;
        if !out.status.success() {
            return Err(format!(
                "{args:?} in {} failed: {}",
                self.ns,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A bridge in its own namespace, the root namespace on it as gateway, and the hosts added.
#[derive(Debug)]
pub struct Lan {
    /// Name prefix of everything this LAN made (`oak<pid>l<n>`).
    pub tag: String,
    switch: String,
    uplink: String,
    /// The root namespace's address on the LAN (`.1`).
    pub gateway: Ipv4Addr,
    hosts: Vec<Host>,
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Lan {
    /// Builds the switch and the gateway. The /24 comes from the benchmarking range
    /// 198.18.0.0/15, picked from the pid and skipping any prefix the root namespace already
    /// routes (another test's LAN).
    pub fn new() -> Result<Lan, String> {
        let pid = std::process::id();
        let n = LANS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("oak{pid}l{n}");
        let routes = ip(&["-4", "route", "show"])?;
        let start = pid.wrapping_mul(7).wrapping_add(n * 131) % 512;
        let net = (0..512)
            .map(|k| (start + k) % 512)
            .map(|k| Ipv4Addr::new(198, 18 + (k / 256) as u8, (k % 256) as u8, 0))
            .find(|net| !routes.contains(&format!("{net}/24")))
            .ok_or("no free /24 left in 198.18.0.0/15")?;
        let o = net.octets();
        let lan = Lan {
            switch: format!("{tag}-sw"),
            uplink: format!("{tag}u"),
            tag,
            gateway: Ipv4Addr::new(o[0], o[1], o[2], 1),
            hosts: Vec::new(),
        };
        // From here on, Drop cleans whatever part was made.
        ip(&["netns", "add", &lan.switch])?;
        let sw = lan.switch.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&[
            "link",
            "add",
            &lan.uplink,
            "type",
            "veth",
            "peer",
            "name",
            "gw",
            "netns",
            &sw,
        ])?;
        ip(&["-n", &sw, "link", "set", "gw", "master", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", lan.gateway),
            "dev",
            &lan.uplink,
        ])?;
        ip(&["link", "set", &lan.uplink, "up"])?;
        Ok(lan)
    }

    /// A new host `name` (letters and digits, short) with the next address, `eth0` on the
    /// bridge, loopback up and a default route via the gateway.
    pub fn add_host(&mut self, name: &str) -> Result<Host, String> {
        let i = self.hosts.len() + 2;
        if i > 250 {
            return Err("a test LAN holds at most 249 hosts".into());
        }
        let o = self.gateway.octets();
        let host = Host {
            name: name.to_string(),
            ns: format!("{}-{name}", self.tag),
            addr: Ipv4Addr::new(o[0], o[1], o[2], i as u8),
        };
        ip(&["netns", "add", &host.ns])?;
        self.hosts.push(host.clone());
        let (sw, port) = (self.switch.clone(), format!("h{i}"));
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &host.ns,
        ])?;
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &host.ns,
            "addr",
            "add",
            &format!("{}/24", host.addr),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &host.ns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway.to_string(),
        ])?;
        Ok(host)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Names of this LAN's namespaces and root-namespace links still present (empty after drop
    /// means clean), for the tests' leftover checks.
    pub fn leftovers(tag: &str) -> Vec<String> {
        let mut left = Vec::new();
        for l in ip(&["netns", "list"]).unwrap_or_default().lines() {
            if l.starts_with(tag) {
                left.push(format!("netns {l}"));
            }
        }
        for l in ip(&["-o", "link", "show"]).unwrap_or_default().lines() {
            if l.split(':')
                .nth(1)
                .is_some_and(|n| n.trim().starts_with(tag))
            {
                left.push(format!("link {}", l.trim()));
            }
        }
        left
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in self.hosts.iter().rev() {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.uplink]);
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

static FIXTURES: AtomicU32 = AtomicU32::new(0);

impl Lan {
    /// A fixture (`scripts/fixture.sh`: private containerd and registry) whose registry listens
    /// on the gateway address, so workers in every host of this LAN can pull from it. Its
    /// containerd is reached over a unix socket, from any namespace. Torn down when dropped, or
    /// by its watchdog if this process dies.
    pub fn fixture(&self) -> Result<crate::Fixture, String> {
        let base = std::env::var_os("OAK_TEST_TMP")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let n = FIXTURES.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("oak-fx-{}-f{n}", self.tag));
        let dir_s = dir
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", dir.display()))?
            .to_string();
        std::fs::create_dir(&dir).map_err(|e| format!("create {dir_s}: {e}"))?;
        let script = crate::Fixture::script();
        let out = Command::new("bash")
            .arg(&script)
            .args(["up", &dir_s, "--owner-pid", &std::process::id().to_string()])
            .env("FIXTURE_REGISTRY_HOST", self.gateway.to_string())
            .output()
            .map_err(|e| format!("bash {}: {e}", script.display()))?;
        if !out.status.success() {
            let _ = Command::new("bash")
                .arg(&script)
                .args(["down", &dir_s])
                .output();
            return Err(format!(
                "fixture.sh up {dir_s} (registry on {}) failed ({}):\n{}",
                self.gateway,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        crate::Fixture::from_env_file(&dir)
    }
}
