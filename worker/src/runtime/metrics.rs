//! CPU and memory of an instance from its cgroup files (v1 and v2), for `jobs/resources`
//! (worker-protocol §3.6). Pure parsers plus small reads into a reused buffer; the CPU figure
//! needs the previous sample, kept per instance in a bounded table.

use super::cgroups::{Host, Version};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

/// A cgroup's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Cumulative CPU time in ns (v1 `cpuacct.usage`, v2 `cpu.stat` usage_usec × 1000).
    pub cpu_ns: Option<u64>,
    /// Memory in use, bytes (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub memory: Option<u64>,
}

/// A single number file (`cpuacct.usage`, `memory.usage_in_bytes`, `memory.current`).
pub fn parse_number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// v2 `cpu.stat`: `usage_usec N` in ns.
pub fn parse_cpu_stat_v2(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(parse_number)
        .map(|us| us.saturating_mul(1000))
}

/// `MemAvailable` of /proc/meminfo in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(parse_number)
        .map(|kb| kb.saturating_mul(1024))
}

/// CPU% of one instance between two samples, divided by the core count as upstream does.
pub fn cpu_percent(prev: (u64, Instant), now: (u64, Instant), cores: usize) -> f64 {
    let wall = now.1.saturating_duration_since(prev.1).as_nanos() as f64;
    if wall <= 0.0 || cores == 0 {
        return 0.0;
    }
    now.0.saturating_sub(prev.0) as f64 / wall / cores as f64 * 100.0
}

/// Go's `%f`: six decimals.
pub fn go_float(v: f64) -> String {
    format!("{v:.6}")
}

/// Reads `path` into `buf` (cleared first, at most 4 KiB) and returns it as text.
fn read_small<'b>(path: &Path, buf: &'b mut String) -> Option<&'b str> {
    buf.clear();
    let f = std::fs::File::open(path).ok()?;
    f.take(4096).read_to_string(buf).ok()?;
    Some(buf.as_str())
}

/// Reads one instance's counters from the host's hierarchies; `cgroups_path` is its spec's.
pub fn read(host: &Host, cgroups_path: &str, buf: &mut String) -> Sample {
    let file = |root: &Option<std::path::PathBuf>, name: &str| {
        root.as_ref().map(|r| Host::dir(r, cgroups_path).join(name))
    };
    let (cpu_file, mem_file) = match host.version {
        Version::V1 => ("cpuacct.usage", "memory.usage_in_bytes"),
        Version::V2 => ("cpu.stat", "memory.current"),
    };
    let cpu_ns = file(&host.cpuacct, cpu_file).and_then(|p| {
        let t = read_small(&p, buf)?;
        match host.version {
            Version::V1 => parse_number(t),
            Version::V2 => parse_cpu_stat_v2(t),
        }
    });
    let memory = file(&host.memory, mem_file).and_then(|p| parse_number(read_small(&p, buf)?));
    Sample { cpu_ns, memory }
}

/// The previous CPU sample per instance; at most `capacity` entries, and instances not seen
/// in a round are dropped ([`CpuHistory::retain_seen`]).
pub struct CpuHistory {
    prev: HashMap<String, (u64, Instant, u64)>,
    capacity: usize,
    round: u64,
}

impl CpuHistory {
    pub fn new(capacity: usize) -> CpuHistory {
        CpuHistory {
            prev: HashMap::with_capacity(capacity),
            capacity,
            round: 0,
        }
    }

    /// Starts a sampling round.
    pub fn begin(&mut self) {
        self.round += 1;
    }

    /// CPU% since this instance's previous sample (0 on the first one).
    pub fn percent(&mut self, id: &str, cpu_ns: u64, now: Instant, cores: usize) -> f64 {
        let round = self.round;
        if let Some(e) = self.prev.get_mut(id) {
            let p = cpu_percent((e.0, e.1), (cpu_ns, now), cores);
            *e = (cpu_ns, now, round);
            return p;
        }
        if self.prev.len() < self.capacity {
            self.prev.insert(id.to_owned(), (cpu_ns, now, round));
        }
        0.0
    }

    /// Forgets instances not sampled in this round.
    pub fn retain_seen(&mut self) {
        let round = self.round;
        self.prev.retain(|_, e| e.2 == round);
    }

    pub fn len(&self) -> usize {
        self.prev.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prev.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parsers() {
        assert_eq!(parse_number("67108864\n"), Some(67108864));
        assert_eq!(parse_number("max\n"), None);
        let stat = "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n";
        assert_eq!(parse_cpu_stat_v2(stat), Some(2_500_000));
        assert_eq!(parse_cpu_stat_v2("nr_periods 0\n"), None);
        let mi = "MemTotal:       24684188 kB\nMemFree:        17822340 kB\nMemAvailable:   23606360 kB\n";
        assert_eq!(parse_mem_available(mi), Some(23606360 * 1024));
        assert_eq!(go_float(0.512), "0.512000");
    }

    #[test]
    fn cpu_percent_per_core() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        // Half a second of CPU in one second on 2 cores: 25 %.
        assert_eq!(cpu_percent((0, t0), (500_000_000, t1), 2), 25.0);
        assert_eq!(cpu_percent((10, t0), (5, t1), 2), 0.0, "counter reset");
        assert_eq!(cpu_percent((0, t0), (5, t0), 2), 0.0, "no wall time");
    }

    #[test]
    fn history_is_bounded_and_forgets_gone_instances() {
        let t0 = Instant::now();
        let mut h = CpuHistory::new(2);
        h.begin();
        assert_eq!(h.percent("a", 0, t0, 1), 0.0);
        h.percent("b", 0, t0, 1);
        h.percent("c", 0, t0, 1);
        assert_eq!(h.len(), 2, "full: c not kept");
        h.begin();
        let p = h.percent("a", 1_000_000_000, t0 + Duration::from_secs(2), 1);
        assert_eq!(p, 50.0);
        h.retain_seen();
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn reads_v1_and_v2_layouts() {
        let root = std::env::temp_dir().join(format!("oak-metrics-{}", std::process::id()));
        let v1 = Host {
            version: Version::V1,
            memory: Some(root.join("memory")),
            cpu: Some(root.join("cpu")),
            cpuacct: Some(root.join("cpuacct")),
            swap: false,
        };
        let put = |p: std::path::PathBuf, text: &str| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        put(root.join("memory/ns/c1/memory.usage_in_bytes"), "4096\n");
        put(root.join("cpuacct/ns/c1/cpuacct.usage"), "123456\n");
        let mut buf = String::new();
        let s = read(&v1, "/ns/c1", &mut buf);
        assert_eq!(
            s,
            Sample {
                cpu_ns: Some(123456),
                memory: Some(4096)
            }
        );
        let pi = Host { memory: None, ..v1 };
        assert_eq!(read(&pi, "/ns/c1", &mut buf).memory, None);
        let v2 = Host {
            version: Version::V2,
            memory: Some(root.join("unified")),
            cpu: Some(root.join("unified")),
            cpuacct: Some(root.join("unified")),
            swap: true,
        };
        put(root.join("unified/ns/w1/c1/memory.current"), "8192\n");
        put(root.join("unified/ns/w1/c1/cpu.stat"), "usage_usec 7\n");
        let s = read(&v2, "/ns/w1/c1", &mut buf);
        assert_eq!(
            s,
            Sample {
                cpu_ns: Some(7000),
                memory: Some(8192)
            }
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
