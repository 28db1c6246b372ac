//! Which cgroup hierarchy the host runs and whether the memory and cpu controllers are on.
//! Raspberry Pi OS boots with the memory controller off (`cgroup_disable=memory`), which
//! means container memory limits silently do nothing; this module makes that visible.
//! Pure functions over file contents; the caller reads the files.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
    /// Neither `/sys/fs/cgroup/cgroup.controllers` nor `/proc/cgroups` could be read.
    Unknown,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
            Version::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CgroupInfo {
    pub version: Version,
    pub memory: bool,
    pub cpu: bool,
    /// CPU quota of the worker's own cgroup, in cores (`cpu.max` or CFS quota/period); `None`
    /// when unlimited or unknown. Informational: containers live in containerd's cgroups.
    pub own_cpu_quota: Option<f64>,
}

pub const MEMORY_OFF_HINT: &str = "memory cgroup controller is disabled: memory limits will not be enforced; add cgroup_enable=memory cgroup_memory=1 to cmdline.txt (Raspberry Pi) or the kernel command line, then reboot";

/// `controllers`: `/sys/fs/cgroup/cgroup.controllers` (present only on a v2 unified host);
/// `proc_cgroups`: `/proc/cgroups` (v1, and v2 kernels that still list controllers there).
pub fn detect(controllers: Option<&str>, proc_cgroups: Option<&str>) -> CgroupInfo {
    if let Some(c) = controllers {
        let has = |name: &str| c.split_whitespace().any(|x| x == name);
        return CgroupInfo {
            version: Version::V2,
            memory: has("memory"),
            cpu: has("cpu"),
            own_cpu_quota: None,
        };
    }
    match proc_cgroups {
        Some(text) => {
            let enabled = |name: &str| {
                text.lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .any(|f| f.len() >= 4 && f[0] == name && f[3] == "1")
            };
            CgroupInfo {
                version: Version::V1,
                memory: enabled("memory"),
                cpu: enabled("cpu"),
                own_cpu_quota: None,
            }
        }
        None => CgroupInfo {
            version: Version::Unknown,
            memory: false,
            cpu: false,
            own_cpu_quota: None,
        },
    }
}

/// `/proc/self/cgroup` → (v2 path from the `0::` line, v1 path of the `cpu` controller).
pub fn own_paths(self_cgroup: &str) -> (Option<String>, Option<String>) {
    let mut v2 = None;
    let mut v1_cpu = None;
    for line in self_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else if ctrls.split(',').any(|c| c == "cpu") {
            v1_cpu = Some(path.to_string());
        }
    }
    (v2, v1_cpu)
}

/// v2 `cpu.max`: `"max 100000"` (unlimited) or `"<quota> <period>"`, in cores.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut f = text.split_whitespace();
    let quota: f64 = f.next()?.parse().ok()?;
    let period: f64 = f.next().unwrap_or("100000").parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// v1 `cpu.cfs_quota_us` (-1 = unlimited) and `cpu.cfs_period_us`, in cores.
pub fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let q: f64 = quota.trim().parse().ok()?;
    let p: f64 = period.trim().parse().ok()?;
    (q > 0.0 && p > 0.0).then(|| q / p)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A Debian bookworm amd64 host (unified hierarchy).
    const V2_CONTROLLERS: &str = "cpuset cpu io memory hugetlb pids rdma misc\n";
    // Raspberry Pi OS bookworm, stock cmdline.txt: v2, memory controller missing.
    const PI_V2_CONTROLLERS: &str = "cpuset cpu io pids\n";
    // Raspberry Pi OS buster/bullseye (legacy v1), memory disabled at boot.
    const PI_V1_PROC_CGROUPS: &str = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n\
        cpuset\t6\t1\t1\ncpu\t3\t64\t1\ncpuacct\t3\t64\t1\nblkio\t5\t64\t1\nmemory\t0\t70\t0\n\
        devices\t4\t64\t1\nfreezer\t8\t1\t1\nnet_cls\t2\t1\t1\npids\t7\t69\t1\n";
    const V1_PROC_CGROUPS: &str = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n\
        cpuset\t2\t1\t1\ncpu\t3\t90\t1\ncpuacct\t3\t90\t1\nmemory\t9\t120\t1\n";

    #[test]
    fn v2_host() {
        let c = detect(Some(V2_CONTROLLERS), Some(V1_PROC_CGROUPS));
        assert_eq!((c.version, c.memory, c.cpu), (Version::V2, true, true));
    }

    #[test]
    fn pi_without_memory_controller_v2_and_v1() {
        let c = detect(Some(PI_V2_CONTROLLERS), None);
        assert_eq!((c.version, c.memory, c.cpu), (Version::V2, false, true));
        let c = detect(None, Some(PI_V1_PROC_CGROUPS));
        assert_eq!((c.version, c.memory, c.cpu), (Version::V1, false, true));
    }

    #[test]
    fn v1_host_and_unknown() {
        let c = detect(None, Some(V1_PROC_CGROUPS));
        assert_eq!((c.version, c.memory, c.cpu), (Version::V1, true, true));
        assert_eq!(detect(None, None).version, Version::Unknown);
        // "memory" as a substring of another name must not count.
        let c = detect(Some("cpuset cpu memoryx\n"), None);
        assert!(!c.memory);
    }

    #[test]
    fn quotas() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("50000\n", "100000\n"), Some(0.5));
        let (v2, v1) = own_paths("0::/system.slice/nodeengine.service\n");
        assert_eq!(
            (v2.as_deref(), v1),
            (Some("/system.slice/nodeengine.service"), None)
        );
        let (v2, v1) = own_paths("12:cpu,cpuacct:/system.slice\n11:memory:/x\n0::/y\n");
        assert_eq!(
            (v2.as_deref(), v1.as_deref()),
            (Some("/y"), Some("/system.slice"))
        );
    }
}
