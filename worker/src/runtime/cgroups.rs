//! Which cgroup layout the host has (v1, hybrid or v2) and which controllers a container can
//! use, so the spec builder only asks for limits the kernel will enforce. It reads
//! `/proc/self/mountinfo`, `/proc/cgroups` and a few control files; it never writes cgroups.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Legacy or hybrid layout: one hierarchy per controller (runc uses these).
    V1,
    /// Unified hierarchy mounted at `/sys/fs/cgroup`.
    V2,
}

/// What the host offers containers. Paths are the hierarchy roots a container's cgroup
/// (`<root>/<cgroupsPath>`, spec §5.1) lives under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub version: Version,
    /// v1: the memory hierarchy; v2: the unified root. None: no memory controller.
    pub memory: Option<PathBuf>,
    /// v1: the cpu hierarchy (CFS quota); v2: the unified root.
    pub cpu: Option<PathBuf>,
    /// v1: the cpuacct hierarchy (usage); v2: the unified root (`cpu.stat`).
    pub cpuacct: Option<PathBuf>,
    /// Swap accounting (v1 `memory.memsw.*`): only then may the spec set `memory.swap`.
    pub swap: bool,
}

/// The hint we give when a Raspberry Pi kernel boots without the memory controller
/// (containerd-client spec §5.2: Raspberry Pi OS disables it by default).
pub const MEMORY_CGROUP_HINT: &str = "memory cgroup disabled: on a Raspberry Pi add `cgroup_enable=memory cgroup_memory=1` to the kernel command line (/boot/firmware/cmdline.txt, or /boot/cmdline.txt on older releases) and reboot";

impl Host {
    /// Reads the running host's layout.
    pub fn detect() -> Host {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let proc_cgroups = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
        Host::from_sources(&mountinfo, &proc_cgroups, &|p| {
            std::fs::read_to_string(p).ok()
        })
    }

    /// Pure core of [`Host::detect`]: `read` returns a file's text, None when it is missing.
    pub fn from_sources(
        mountinfo: &str,
        proc_cgroups: &str,
        read: &dyn Fn(&Path) -> Option<String>,
    ) -> Host {
        let mounts = parse_mountinfo(mountinfo);
        if let Some(root) = mounts
            .iter()
            .find(|m| m.cgroup2 && m.point == Path::new("/sys/fs/cgroup"))
            .map(|m| m.point.clone())
        {
            // Unified: the root's cgroup.controllers lists what children may enable.
            let ctl = read(&root.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| ctl.split_whitespace().any(|x| x == c);
            let some_if = |b: bool| b.then(|| root.clone());
            return Host {
                version: Version::V2,
                memory: some_if(has("memory")),
                cpu: some_if(has("cpu")),
                cpuacct: some_if(has("cpu")),
                // runc ignores a missing memory.swap.max when swap equals the limit.
                swap: has("memory"),
            };
        }
        let enabled = |c: &str| {
            proc_cgroups.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 4 && f[0] == c && f[3] == "1"
            })
        };
        let hierarchy = |c: &str| {
            enabled(c)
                .then(|| {
                    mounts
                        .iter()
                        .find(|m| !m.cgroup2 && m.controllers.iter().any(|x| x == c))
                        .map(|m| m.point.clone())
                })
                .flatten()
        };
        let memory = hierarchy("memory");
        let swap = memory
            .as_ref()
            .is_some_and(|m| read(&m.join("memory.memsw.limit_in_bytes")).is_some());
        Host {
            version: Version::V1,
            memory,
            cpu: hierarchy("cpu"),
            cpuacct: hierarchy("cpuacct"),
            swap,
        }
    }

    /// A container's cgroup directory under the hierarchy `root`, for its spec's `cgroupsPath`
    /// (`/<namespace>/<id>`, or `/<namespace>/<scope>/<id>`; cgroupfs driver paths are relative
    /// to the hierarchy's root).
    pub fn dir(root: &Path, cgroups_path: &str) -> PathBuf {
        root.join(cgroups_path.trim_start_matches('/'))
    }
}

struct CgroupMount {
    point: PathBuf,
    cgroup2: bool,
    controllers: Vec<String>,
}

/// Cgroup mounts from `/proc/self/mountinfo`: `id parent maj:min root point opts … - fstype
/// source superopts`; v1 controllers are in the super options (`rw,cpu,cpuacct`).
fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let superopts = r.nth(1).unwrap_or("");
            match fstype {
                "cgroup2" => Some(CgroupMount {
                    point: PathBuf::from(point),
                    cgroup2: true,
                    controllers: Vec::new(),
                }),
                "cgroup" => Some(CgroupMount {
                    point: PathBuf::from(point),
                    cgroup2: false,
                    controllers: superopts.split(',').map(str::to_owned).collect(),
                }),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// This development host: hybrid, cpu and cpuacct on separate hierarchies.
    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 25 0:25 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
28 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PROC_CGROUPS: &str = "#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t5\t1
cpu\t1\t5\t1
cpuacct\t2\t5\t1
memory\t4\t59\t1
";

    fn files(list: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let m: HashMap<PathBuf, String> = list
            .iter()
            .map(|(k, v)| (PathBuf::from(k), v.to_string()))
            .collect();
        move |p: &Path| m.get(p).cloned()
    }

    #[test]
    fn hybrid_v1_with_all_controllers() {
        let read = files(&[("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes", "x")]);
        let h = Host::from_sources(HYBRID, PROC_CGROUPS, &read);
        assert_eq!(h.version, Version::V1);
        assert_eq!(
            h.memory.as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(h.cpu.as_deref(), Some(Path::new("/sys/fs/cgroup/cpu")));
        assert_eq!(
            h.cpuacct.as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpuacct"))
        );
        assert!(h.swap);
        assert_eq!(
            Host::dir(
                Path::new("/sys/fs/cgroup/memory"),
                "/oakestra/a.b.c.d.instance.0"
            ),
            Path::new("/sys/fs/cgroup/memory/oakestra/a.b.c.d.instance.0")
        );
        assert_eq!(
            Host::dir(
                Path::new("/sys/fs/cgroup"),
                "/oakestra/worker-0a1b2c3d/a.b.c.d.instance.0"
            ),
            Path::new("/sys/fs/cgroup/oakestra/worker-0a1b2c3d/a.b.c.d.instance.0")
        );
    }

    #[test]
    fn combined_cpu_cpuacct_hierarchy_and_no_swap_accounting() {
        let mi = "30 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  31 25 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let h = Host::from_sources(mi, PROC_CGROUPS, &files(&[]));
        assert_eq!(h.cpu, h.cpuacct);
        assert_eq!(
            h.cpu.as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert!(h.memory.is_some() && !h.swap);
    }

    #[test]
    fn pi_v1_without_memory_controller() {
        // Raspberry Pi OS (bullseye) default: memory listed but disabled, and not mounted.
        let mi = "30 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let pc = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t2\t1\t1\ncpuacct\t2\t1\t1\nmemory\t0\t70\t0\n";
        let h = Host::from_sources(mi, pc, &files(&[]));
        assert_eq!(h.version, Version::V1);
        assert_eq!(h.memory, None);
        assert!(!h.swap);
        assert!(h.cpu.is_some());
    }

    #[test]
    fn unified_v2_and_pi_v2_without_memory() {
        let mi = "35 30 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let full = files(&[(
            "/sys/fs/cgroup/cgroup.controllers",
            "cpuset cpu io memory pids\n",
        )]);
        let h = Host::from_sources(mi, "", &full);
        assert_eq!(h.version, Version::V2);
        assert_eq!(h.memory.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert_eq!(h.cpuacct.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        // Raspberry Pi OS bookworm: v2 with the memory controller absent.
        let pi = files(&[("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io pids\n")]);
        let h = Host::from_sources(mi, "", &pi);
        assert_eq!((h.memory, h.swap), (None, false));
        assert!(h.cpu.is_some());
    }

    #[test]
    fn no_cgroups_at_all() {
        let h = Host::from_sources("", "", &files(&[]));
        assert_eq!(h.version, Version::V1);
        assert!(h.memory.is_none() && h.cpu.is_none() && h.cpuacct.is_none());
    }
}
