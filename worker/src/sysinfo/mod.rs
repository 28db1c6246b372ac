//! What the node document says about the host, measured from /proc and /sys without spawning
//! processes: CPU count and usage, memory, disk of `/`, architecture, GPUs, cgroup controllers,
//! and the address to advertise. Parsers are pure functions over file contents; [`Sampler`]
//! reads the files. It does not measure containers (that is the runtime's job).

pub mod cgroup;
pub mod net;

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::path::Path;

use crate::protocol::NodeInfo;
pub use cgroup::CgroupInfo;

/// Go's `runtime.GOARCH` spelling of the architecture this binary was built for: the images
/// the worker can run are the ones for its own architecture (an armhf build on an arm64
/// kernel runs arm images through the armhf containerd).
pub fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86" => "386",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
}

/// Cumulative CPU jiffies from the aggregate `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

pub fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal; guest time is already inside user.
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Busy share between two samples in percent; 0 when no time passed.
pub fn cpu_percent(prev: CpuTimes, now: CpuTimes) -> f64 {
    let total = now.total.saturating_sub(prev.total);
    if total == 0 {
        return 0.0;
    }
    let busy = now.busy.saturating_sub(prev.busy).min(total);
    (busy as f64 * 100.0 / total as f64 * 10.0).round() / 10.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total_kib: u64,
    pub available_kib: u64,
}

impl MemInfo {
    /// Available MiB: what upstream reports as `memory` and the scheduler compares.
    pub fn available_mib(&self) -> u64 {
        self.available_kib / 1024
    }
    pub fn used_percent(&self) -> f64 {
        if self.total_kib == 0 {
            return 100.0;
        }
        let used = self.total_kib.saturating_sub(self.available_kib);
        (used as f64 * 100.0 / self.total_kib as f64 * 10.0).round() / 10.0
    }
}

pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.split(':').next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let total = field("MemTotal")?;
    // Kernels before 3.14 lack MemAvailable; free + page cache is the usual estimate.
    let available = field("MemAvailable").or_else(|| {
        Some(field("MemFree")? + field("Buffers").unwrap_or(0) + field("Cached").unwrap_or(0))
    })?;
    Some(MemInfo {
        total_kib: total,
        available_kib: available.min(total),
    })
}

/// `/sys/devices/system/cpu/online`, e.g. `0-3` or `0,2-5`.
pub fn parse_cpu_list(text: &str) -> Option<u64> {
    let mut n = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.parse::<u64>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// `/proc/driver/nvidia/version` → driver version (`… Kernel Module  535.104.05  …`).
pub fn parse_nvidia_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    let after = line.split("Kernel Module").nth(1)?;
    after.split_whitespace().next().map(String::from)
}

/// `/etc/os-release` value of `key`, unquoted.
pub fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
}

/// Used percent of a file system from statvfs, as `df` computes it (reserved blocks excluded).
pub fn disk_used_percent(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let used = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64);
    let denom = used + st.f_bavail as u64;
    (denom > 0).then(|| (used * 100).div_ceil(denom))
}

fn uname() -> (String, String) {
    // SAFETY: uname fills the zeroed struct we own; its fields are NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return (String::new(), String::new());
    }
    let s = |f: &[libc::c_char]| {
        unsafe { CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (s(&u.release), s(&u.machine))
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The first line of `/etc/machine-id`, trimmed; None when empty or implausible (an image
/// built with an empty file, or garbage): the cluster then falls back to the source address.
fn parse_machine_id(text: &str) -> Option<String> {
    let id = text.lines().next()?.trim();
    let plausible = (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic());
    plausible.then(|| id.to_string())
}

/// GPU presence: NVIDIA's proc directory, else `/dev/nvidiaN` device nodes. Other vendors are
/// not detected (upstream only knows NVIDIA too).
fn nvidia_gpus() -> u64 {
    if let Ok(d) = std::fs::read_dir("/proc/driver/nvidia/gpus") {
        return d.count() as u64;
    }
    std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia")
                        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                })
                .count() as u64
        })
        .unwrap_or(0)
}

fn cgroup_info() -> CgroupInfo {
    let mut info = cgroup::detect(
        read("/sys/fs/cgroup/cgroup.controllers").as_deref(),
        read("/proc/cgroups").as_deref(),
    );
    if let Some(text) = read("/proc/self/cgroup") {
        let (v2, v1) = cgroup::own_paths(&text);
        info.own_cpu_quota = match info.version {
            cgroup::Version::V2 => v2
                .and_then(|p| read(&format!("/sys/fs/cgroup{p}/cpu.max")))
                .and_then(|t| cgroup::parse_cpu_max(&t)),
            cgroup::Version::V1 => v1.and_then(|p| {
                let base = format!("/sys/fs/cgroup/cpu,cpuacct{p}");
                cgroup::parse_cfs(
                    &read(&format!("{base}/cpu.cfs_quota_us"))?,
                    &read(&format!("{base}/cpu.cfs_period_us"))?,
                )
            }),
            cgroup::Version::Unknown => None,
        };
    }
    info
}

/// Host facts that do not change while the worker runs.
#[derive(Debug, Clone)]
pub struct Host {
    pub kernel_release: String,
    pub kernel_arch: String,
    pub cgroup: CgroupInfo,
    pub gpus: u64,
    pub gpu_driver: String,
    /// `/etc/machine-id`, sent at registration so the cluster tells a re-registration of this
    /// machine from another machine claiming the same name (orch-lite; stock clusters ignore it).
    pub machine_id: Option<String>,
    os_name: String,
    os_version: String,
}

impl Host {
    pub fn probe() -> Host {
        let (kernel_release, kernel_arch) = uname();
        let os = read("/etc/os-release").unwrap_or_default();
        let gpus = nvidia_gpus();
        Host {
            kernel_release,
            kernel_arch,
            cgroup: cgroup_info(),
            gpus,
            gpu_driver: read("/proc/driver/nvidia/version")
                .and_then(|t| parse_nvidia_version(&t))
                .unwrap_or_else(|| "-".into()),
            machine_id: read("/etc/machine-id").and_then(|t| parse_machine_id(&t)),
            os_name: os_release_value(&os, "ID").unwrap_or_default(),
            os_version: os_release_value(&os, "VERSION_ID").unwrap_or_default(),
        }
    }
}

/// One set of dynamic measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub cpu_percent: f64,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub memory_percent: f64,
    pub disk_percent: Option<u64>,
}

/// Keeps the previous `/proc/stat` reading so CPU usage is measured between two reports, as
/// upstream's `cpu.Percent(0)` does.
#[derive(Debug, Default)]
pub struct Sampler {
    prev: Option<CpuTimes>,
}

impl Sampler {
    pub fn sample(&mut self) -> Sample {
        let now = read("/proc/stat").as_deref().and_then(parse_cpu_times);
        // First sample: usage since boot, better than a made-up 0.
        let cpu_percent = match now {
            Some(n) => cpu_percent(self.prev.unwrap_or_default(), n),
            None => 100.0, // upstream's value when it cannot measure
        };
        self.prev = now.or(self.prev);
        let mem = read("/proc/meminfo").as_deref().and_then(parse_meminfo);
        Sample {
            cpu_percent,
            vcpus: read("/sys/devices/system/cpu/online")
                .as_deref()
                .and_then(parse_cpu_list)
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
                }),
            memory_mib: mem.map_or(0, |m| m.available_mib()),
            memory_percent: mem.map_or(100.0, |m| m.used_percent()),
            disk_percent: disk_used_percent(Path::new("/")),
        }
    }
}

/// The advertised address: `OAK_PUBLIC_ADDRESS` if set, else the default-route IPv4.
pub fn node_ip(public_address: Option<&str>) -> String {
    if let Some(a) = public_address {
        return a.to_string();
    }
    let iface = read("/proc/net/route")
        .as_deref()
        .and_then(net::default_route_interface);
    net::pick_ipv4(&net::interface_addresses(), iface.as_deref())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

impl Host {
    /// Writes the measured fields into a node document: the dynamic ones always, and with
    /// `full` the static maps sent at registration (system_info, network_info).
    pub fn fill(&self, node: &mut NodeInfo, s: &Sample, full: bool, hostname: &str) {
        node.cpu_percent = s.cpu_percent;
        node.vcpus = s.vcpus;
        node.memory = s.memory_mib;
        node.memory_percent = s.memory_percent;
        node.architecture = goarch().into();
        node.vgpus = self.gpus;
        node.gpu_driver = self.gpu_driver.clone();
        let disk = s
            .disk_percent
            .map_or_else(|| "100".to_string(), |p| p.to_string());
        node.disk_info = Some(BTreeMap::from([("/".to_string(), disk)]));
        if !full {
            node.machine_id = None;
            node.system_info = None;
            node.network_info = None;
            return;
        }
        node.machine_id = self.machine_id.clone();
        let uptime = read("/proc/uptime")
            .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        let full_stats = serde_json::json!({
            "hostname": hostname,
            "uptime": uptime,
            "os": "linux",
            "platform": self.os_name,
            "platformVersion": self.os_version,
            "kernelVersion": self.kernel_release,
            "kernelArch": self.kernel_arch,
        });
        let mut info = BTreeMap::from([
            ("kernel_version".to_string(), self.kernel_release.clone()),
            ("architecture".to_string(), self.kernel_arch.clone()),
            ("os_version".to_string(), "linux".to_string()),
            ("uptime".to_string(), uptime.to_string()),
            ("full_stats".to_string(), full_stats.to_string()),
        ]);
        // Additions (unknown keys are kept by the cluster): what containers can be limited by.
        let c = &self.cgroup;
        info.insert("cgroup_version".into(), c.version.as_str().into());
        info.insert(
            "cgroup_memory".into(),
            if c.memory { "enabled" } else { "disabled" }.into(),
        );
        info.insert(
            "cgroup_cpu".into(),
            if c.cpu { "enabled" } else { "disabled" }.into(),
        );
        node.system_info = Some(info);
        let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, ip) in net::interface_addresses() {
            by_name.entry(name).or_default().push(ip.to_string());
        }
        node.network_info = Some(
            by_name
                .into_iter()
                .enumerate()
                .map(|(i, (name, addrs))| {
                    (
                        format!("interface_{i}"),
                        serde_json::json!({"name": name, "addrs": addrs}).to_string(),
                    )
                })
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT_A: &str = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1\n";
    const STAT_B: &str = "cpu  160 0 70 900 70 0 0 0 0 0\ncpu0 80 0 35 450 35 0 0 0 0 0\nintr 2\n";

    #[test]
    fn machine_id_trimmed_or_absent() {
        assert_eq!(
            parse_machine_id("0123456789abcdef0123456789abcdef\n").as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(parse_machine_id("  ab12 \n"), Some("ab12".into()));
        assert_eq!(parse_machine_id(""), None);
        assert_eq!(parse_machine_id("\n"), None);
        assert_eq!(parse_machine_id("a b"), None);
        assert_eq!(parse_machine_id(&"x".repeat(200)), None);
    }

    #[test]
    fn cpu_usage_between_samples() {
        let a = parse_cpu_times(STAT_A).unwrap();
        let b = parse_cpu_times(STAT_B).unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy: 150,
                total: 1000
            }
        );
        // 80 busy of 200 jiffies.
        assert_eq!(cpu_percent(a, b), 40.0);
        assert_eq!(cpu_percent(b, b), 0.0);
        // A counter going backwards (CPU hot-unplug) never gives nonsense.
        assert!(cpu_percent(b, a) <= 100.0);
        assert_eq!(parse_cpu_times("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_cpu_times("cpu  x y\n"), None);
    }

    #[test]
    fn meminfo_available_and_fallback() {
        let m = parse_meminfo(
            "MemTotal:  8000000 kB\nMemFree:  1000000 kB\nMemAvailable:  6000000 kB\n",
        )
        .unwrap();
        assert_eq!(m.available_mib(), 5859);
        assert_eq!(m.used_percent(), 25.0);
        // Pi Zero on an old kernel: no MemAvailable.
        let m = parse_meminfo(
            "MemTotal: 443000 kB\nMemFree: 100000 kB\nBuffers: 20000 kB\nCached: 80000 kB\n",
        )
        .unwrap();
        assert_eq!(m.available_kib, 200000);
        assert_eq!(parse_meminfo("nothing"), None);
    }

    #[test]
    fn cpu_lists_and_gpu_and_os() {
        assert_eq!(parse_cpu_list("0-3\n"), Some(4));
        assert_eq!(parse_cpu_list("0,2-5,7"), Some(6));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), None);
        let v = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\nGCC version: gcc 12\n";
        assert_eq!(parse_nvidia_version(v).as_deref(), Some("535.104.05"));
        assert_eq!(parse_nvidia_version("x"), None);
        let os =
            "PRETTY_NAME=\"Raspbian GNU/Linux 12 (bookworm)\"\nID=raspbian\nVERSION_ID=\"12\"\n";
        assert_eq!(os_release_value(os, "ID").as_deref(), Some("raspbian"));
        assert_eq!(os_release_value(os, "VERSION_ID").as_deref(), Some("12"));
    }

    #[test]
    fn this_host_measures() {
        let mut s = Sampler::default();
        let a = s.sample();
        let b = s.sample();
        assert!(a.vcpus >= 1 && a.memory_mib > 0 && (0.0..=100.0).contains(&b.cpu_percent));
        assert!(a.disk_percent.is_some_and(|p| p <= 100));
        let host = Host::probe();
        let mut node = NodeInfo::default();
        host.fill(&mut node, &b, true, "h");
        assert_eq!(node.architecture, goarch());
        let si = node.system_info.unwrap();
        assert!(si.contains_key("kernel_version") && si.contains_key("cgroup_memory"));
        assert!(node.disk_info.unwrap().contains_key("/"));
    }
}
