//! The OCI runtime spec of one instance, built from the job, the image config and what the
//! host's cgroups allow (containerd-client spec §5). Pure: no file or containerd access; the
//! caller resolves user names and writes the resolv.conf/hosts files it bind-mounts.

use super::cgroups::MEMORY_CGROUP_HINT;
use super::ImageConfig;
use serde_json::{json, Value};
use std::fmt;
use std::path::Path;

/// The 14 capabilities containerd gives by default (spec §5.1); `privileged` does not add any
/// (upstream only adds /dev/fuse, worker-protocol §5.2).
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// containerd's default environment when the image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CFS period in µs; the quota is `vcpus × period` (spec §5.2).
pub const CPU_PERIOD: u64 = 100_000;

/// Which limits the host's cgroups can enforce (from `cgroups::Host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory: bool,
    pub cpu: bool,
    pub swap: bool,
}

pub struct Input<'a> {
    /// The cgroup the container's own cgroup is created in (`/oakestra`, or
    /// `/oakestra/<scope>` for a second worker on the host: see `RuntimeConfig::cgroup_parent`).
    pub cgroup_parent: &'a str,
    pub container_id: &'a str,
    pub instance: u64,
    pub image: &'a ImageConfig,
    /// The job's `cmd`: non-empty replaces Entrypoint and Cmd (worker-protocol §5.1).
    pub cmd: &'a [String],
    pub environment: &'a [String],
    /// MiB; 0: no limit.
    pub memory_mib: u64,
    /// 0: no quota.
    pub vcpus: f64,
    pub privileged: bool,
    /// `uid`, `gid` from the image's `User` (resolved by the caller, see [`parse_user`]).
    pub user: (u32, u32),
    pub limits: Limits,
    /// A network namespace to join (the overlay's); None: a new, loopback-only one.
    pub netns: Option<&'a Path>,
    pub resolv_conf: &'a Path,
    pub hosts: &'a Path,
}

/// The spec as containerd wants it (JSON bytes), plus what the instance should be told.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub json: Vec<u8>,
    /// Set when a requested limit cannot be enforced on this host: goes into the CREATED
    /// report's `status_detail` and one warning log.
    pub not_enforced: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    NoCommand,
    RelativeCwd(String),
    User(String),
    Env(String),
    Vcpus(String),
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::NoCommand => f.write_str(
                "nothing to run: the image has no Entrypoint or Cmd and the job gives no cmd; set `cmd` in the SLA",
            ),
            SpecError::RelativeCwd(d) => write!(
                f,
                "the image's WorkingDir {d:?} is not an absolute path; fix the image"
            ),
            SpecError::User(u) => write!(f, "{u}"),
            SpecError::Env(e) => write!(
                f,
                "environment entry {e:?} is not KEY=VALUE with a non-empty key; fix `environment` in the SLA"
            ),
            SpecError::Vcpus(v) => write!(f, "vcpus {v} is not a usable CPU count (0 or more)"),
        }
    }
}

impl std::error::Error for SpecError {}

/// `User` of the image config as numbers: "" → root; `uid` or `uid:gid`. A name needs the
/// rootfs's /etc/passwd: `Ok(None)` tells the caller to look it up.
pub fn parse_user(user: &str) -> Result<Option<(u32, u32)>, SpecError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if u.is_empty() && g.is_none() {
        return Ok(Some((0, 0)));
    }
    let num = |s: &str| s.parse::<u32>().ok();
    match (num(u), g.map(num)) {
        (Some(uid), None) => Ok(Some((uid, 0))),
        (Some(uid), Some(Some(gid))) => Ok(Some((uid, gid))),
        _ if u == "root" && g.is_none() => Ok(Some((0, 0))),
        _ => Ok(None),
    }
}

/// The `linux.cgroupsPath` of a container's spec (containerd keeps the spec JSON with the
/// container): the sampler reads an instance's counters where it really lives, also for
/// containers adopted from a worker that placed them elsewhere. Only that field is decoded.
pub fn cgroups_path_of(spec_json: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Spec {
        linux: Option<Linux>,
    }
    #[derive(serde::Deserialize)]
    struct Linux {
        #[serde(rename = "cgroupsPath")]
        cgroups_path: Option<String>,
    }
    serde_json::from_slice::<Spec>(spec_json)
        .ok()?
        .linux?
        .cgroups_path
        .filter(|p| !p.is_empty())
}

/// Finds `name`'s uid and primary gid in an /etc/passwd text (`name:x:uid:gid:…`).
pub fn passwd_lookup(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

/// Image env, then `HOSTNAME`, then the job's entries; a later key replaces an earlier one in
/// place (containerd's `WithEnv`), and `KEY` without `=` removes it.
pub fn merge_env(
    image_env: &[String],
    hostname: &str,
    job_env: &[String],
) -> Result<Vec<String>, SpecError> {
    let mut env: Vec<String> = if image_env.is_empty() {
        vec![DEFAULT_PATH.to_owned()]
    } else {
        image_env.to_vec()
    };
    let hostname = format!("HOSTNAME={hostname}");
    for e in std::iter::once(&hostname).chain(job_env) {
        let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
        if key.is_empty() {
            return Err(SpecError::Env(e.clone()));
        }
        let same = |x: &String| x.split_once('=').map_or(x.as_str(), |(k, _)| k) == key;
        match (e.contains('='), env.iter().position(same)) {
            (true, Some(i)) => env[i] = e.clone(),
            (true, None) => env.push(e.clone()),
            (false, Some(i)) => {
                env.remove(i);
            }
            (false, None) => {}
        }
    }
    Ok(env)
}

fn mount(dest: &str, kind: &str, source: &str, options: &[&str]) -> Value {
    json!({"destination": dest, "type": kind, "source": source, "options": options})
}

pub fn hostname(instance: u64) -> String {
    format!("instance-{instance}")
}

pub fn build(i: &Input<'_>) -> Result<Built, SpecError> {
    let args: Vec<&String> = if i.cmd.is_empty() {
        i.image.entrypoint.iter().chain(&i.image.cmd).collect()
    } else {
        i.cmd.iter().collect()
    };
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let cwd = if i.image.working_dir.is_empty() {
        "/"
    } else {
        i.image.working_dir.as_str()
    };
    if !cwd.starts_with('/') {
        return Err(SpecError::RelativeCwd(cwd.into()));
    }
    if !i.vcpus.is_finite() || i.vcpus < 0.0 {
        return Err(SpecError::Vcpus(i.vcpus.to_string()));
    }
    let host = hostname(i.instance);
    let env = merge_env(&i.image.env, &host, i.environment)?;

    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
    ];
    for (dest, src) in [("/etc/resolv.conf", i.resolv_conf), ("/etc/hosts", i.hosts)] {
        mounts.push(mount(
            dest,
            "bind",
            &src.to_string_lossy(),
            &["rbind", "ro"],
        ));
    }

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    namespaces.push(match i.netns {
        Some(p) => json!({"type": "network", "path": p.to_string_lossy()}),
        None => json!({"type": "network"}),
    });

    // runc adds its default device nodes and their allow rules itself (spec §5.2).
    let mut device_rules = vec![json!({"allow": false, "access": "rwm"})];
    let mut devices = Vec::new();
    if i.privileged {
        // /dev/fuse is c 10:229; the only thing upstream's `privileged` does (§5.2).
        device_rules
            .push(json!({"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"}));
        devices.push(
            json!({"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
                            "fileMode": 438, "uid": 0, "gid": 0}),
        );
    }
    let mut resources = json!({"devices": device_rules});
    let mut not_enforced = Vec::new();
    if i.memory_mib > 0 {
        if i.limits.memory {
            let bytes = i.memory_mib.saturating_mul(1 << 20);
            resources["memory"] = if i.limits.swap {
                // swap = limit: no swap on top of the limit (v1 counts memory+swap).
                json!({"limit": bytes, "swap": bytes})
            } else {
                json!({"limit": bytes})
            };
        } else {
            not_enforced.push(format!("memory limit not enforced: {MEMORY_CGROUP_HINT}"));
        }
    }
    if i.vcpus > 0.0 {
        if i.limits.cpu {
            let quota = ((i.vcpus * CPU_PERIOD as f64).round() as u64).max(1000);
            resources["cpu"] = json!({"quota": quota, "period": CPU_PERIOD});
        } else {
            not_enforced
                .push("cpu limit not enforced: no cpu cgroup controller on this host".into());
        }
    }

    let caps = DEFAULT_CAPS.as_slice();
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": i.user.0, "gid": i.user.1},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": host,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "devices": devices,
            "resources": resources,
            "cgroupsPath": format!("{}/{}", i.cgroup_parent, i.container_id),
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"]
        }
    });
    Ok(Built {
        // Serialising a Value cannot fail (string keys only).
        json: serde_json::to_vec(&spec).unwrap_or_default(),
        not_enforced: (!not_enforced.is_empty()).then(|| not_enforced.join("; ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    struct Case {
        image: ImageConfig,
        cmd: Vec<String>,
        env: Vec<String>,
        memory: u64,
        vcpus: f64,
        privileged: bool,
        limits: Limits,
        netns: Option<&'static str>,
    }

    impl Default for Case {
        fn default() -> Case {
            Case {
                image: ImageConfig {
                    env: strings(&["PATH=/bin", "LANG=C"]),
                    entrypoint: strings(&["/docker-entrypoint.sh"]),
                    cmd: strings(&["nginx", "-g", "daemon off;"]),
                    working_dir: "/srv".into(),
                    user: String::new(),
                },
                cmd: vec![],
                env: vec![],
                memory: 64,
                vcpus: 0.5,
                privileged: false,
                limits: Limits {
                    memory: true,
                    cpu: true,
                    swap: true,
                },
                netns: None,
            }
        }
    }

    /// No job cmd, env or limits: what the image alone gives.
    fn build_bare(image: &ImageConfig) -> Result<Built, SpecError> {
        let limits = Case::default().limits;
        build(&Input {
            cgroup_parent: "/n",
            container_id: "c",
            instance: 0,
            image,
            cmd: &[],
            environment: &[],
            memory_mib: 0,
            vcpus: 0.0,
            privileged: false,
            user: (0, 0),
            limits,
            netns: None,
            resolv_conf: Path::new("/r"),
            hosts: Path::new("/h"),
        })
    }

    fn run(c: &Case) -> (Value, Option<String>) {
        let b = build(&Input {
            cgroup_parent: "/oakestra",
            container_id: "app.ns.svc.ns.instance.3",
            instance: 3,
            image: &c.image,
            cmd: &c.cmd,
            environment: &c.env,
            memory_mib: c.memory,
            vcpus: c.vcpus,
            privileged: c.privileged,
            user: (0, 0),
            limits: c.limits,
            netns: c.netns.map(Path::new),
            resolv_conf: Path::new("/var/lib/oakestra/runtime/resolv.conf"),
            hosts: Path::new("/var/lib/oakestra/runtime/hosts"),
        })
        .unwrap();
        (serde_json::from_slice(&b.json).unwrap(), b.not_enforced)
    }

    #[test]
    fn defaults_namespaces_mounts_caps_hostname() {
        let (s, note) = run(&Case::default());
        assert_eq!(note, None);
        assert_eq!(s["hostname"], "instance-3");
        assert_eq!(s["root"]["path"], "rootfs");
        assert_eq!(s["process"]["cwd"], "/srv");
        assert_eq!(s["process"]["noNewPrivileges"], true);
        let ns: Vec<&str> = s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network"]);
        assert!(s["linux"]["namespaces"][4].get("path").is_none());
        let dests: Vec<&str> = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/run",
                "/etc/resolv.conf",
                "/etc/hosts"
            ]
        );
        assert_eq!(
            s["mounts"][7],
            json!({"destination": "/etc/resolv.conf", "type": "bind",
                   "source": "/var/lib/oakestra/runtime/resolv.conf", "options": ["rbind", "ro"]})
        );
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(s["process"]["capabilities"][set], json!(DEFAULT_CAPS));
        }
        assert_eq!(
            s["linux"]["cgroupsPath"],
            "/oakestra/app.ns.svc.ns.instance.3"
        );
        let raw = serde_json::to_vec(&s).unwrap();
        assert_eq!(
            cgroups_path_of(&raw).as_deref(),
            Some("/oakestra/app.ns.svc.ns.instance.3")
        );
        assert_eq!(cgroups_path_of(br#"{"linux":{}}"#), None);
        assert_eq!(cgroups_path_of(b"not json"), None);
        assert_eq!(s["linux"]["devices"], json!([]));
        assert_eq!(
            s["linux"]["resources"]["devices"],
            json!([{"allow": false, "access": "rwm"}])
        );
    }

    #[test]
    fn env_precedence_hostname_first_then_job_replaces() {
        let c = Case {
            env: strings(&["LANG=de_DE", "FOO=1", "HOSTNAME=mine", "PATH"]),
            ..Case::default()
        };
        let (s, _) = run(&c);
        // Image order kept; HOSTNAME appended, then replaced by the job's; PATH removed.
        assert_eq!(
            s["process"]["env"],
            json!(["LANG=de_DE", "HOSTNAME=mine", "FOO=1"])
        );
        let (s, _) = run(&Case {
            image: ImageConfig::default(),
            cmd: strings(&["sh"]),
            ..Case::default()
        });
        assert_eq!(
            s["process"]["env"],
            json!([DEFAULT_PATH, "HOSTNAME=instance-3"])
        );
        assert_eq!(s["process"]["cwd"], "/");
        assert!(matches!(
            merge_env(&[], "h", &strings(&["=x"])),
            Err(SpecError::Env(_))
        ));
    }

    #[test]
    fn cmd_replaces_entrypoint_and_cmd() {
        let (s, _) = run(&Case::default());
        assert_eq!(
            s["process"]["args"],
            json!(["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"])
        );
        let (s, _) = run(&Case {
            cmd: strings(&["sh", "-c", "echo hi"]),
            ..Case::default()
        });
        assert_eq!(s["process"]["args"], json!(["sh", "-c", "echo hi"]));
        let none = Case {
            image: ImageConfig::default(),
            ..Case::default()
        };
        let e = build_bare(&none.image).unwrap_err();
        assert_eq!(e, SpecError::NoCommand);
        assert!(e.to_string().contains("set `cmd`"));
    }

    #[test]
    fn limits_present_when_the_host_allows_them() {
        let (s, note) = run(&Case::default());
        assert_eq!(
            s["linux"]["resources"]["memory"],
            json!({"limit": 67108864u64, "swap": 67108864u64})
        );
        assert_eq!(
            s["linux"]["resources"]["cpu"],
            json!({"quota": 50000, "period": 100000})
        );
        assert_eq!(note, None);
        // No swap accounting: no swap field (runc v1 would fail writing memsw).
        let (s, _) = run(&Case {
            limits: Limits {
                memory: true,
                cpu: true,
                swap: false,
            },
            ..Case::default()
        });
        assert_eq!(
            s["linux"]["resources"]["memory"],
            json!({"limit": 67108864u64})
        );
        // Nothing requested: nothing set, nothing to say.
        let (s, note) = run(&Case {
            memory: 0,
            vcpus: 0.0,
            ..Case::default()
        });
        assert!(s["linux"]["resources"].get("memory").is_none());
        assert!(s["linux"]["resources"].get("cpu").is_none());
        assert_eq!(note, None);
    }

    #[test]
    fn pi_without_memory_cgroup_runs_and_says_so() {
        let (s, note) = run(&Case {
            limits: Limits {
                memory: false,
                cpu: true,
                swap: false,
            },
            ..Case::default()
        });
        assert!(s["linux"]["resources"].get("memory").is_none());
        assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 50000);
        let note = note.unwrap();
        assert!(
            note.starts_with("memory limit not enforced: memory cgroup disabled"),
            "{note}"
        );
        assert!(note.contains("cmdline.txt"), "{note}");
    }

    #[test]
    fn netns_path_and_privileged_fuse() {
        let (s, _) = run(&Case {
            netns: Some("/var/run/netns/app.ns.svc.ns.instance.3"),
            privileged: true,
            ..Case::default()
        });
        assert_eq!(
            s["linux"]["namespaces"][4],
            json!({"type": "network", "path": "/var/run/netns/app.ns.svc.ns.instance.3"})
        );
        assert_eq!(s["linux"]["devices"][0]["path"], "/dev/fuse");
        assert_eq!(
            s["linux"]["resources"]["devices"][1],
            json!({"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"})
        );
        // Still only the default capabilities.
        assert_eq!(
            s["process"]["capabilities"]["bounding"],
            json!(DEFAULT_CAPS)
        );
    }

    #[test]
    fn users_and_bad_inputs() {
        assert_eq!(parse_user(""), Ok(Some((0, 0))));
        assert_eq!(parse_user("1000"), Ok(Some((1000, 0))));
        assert_eq!(parse_user("1000:50"), Ok(Some((1000, 50))));
        assert_eq!(parse_user("root"), Ok(Some((0, 0))));
        assert_eq!(parse_user("nginx"), Ok(None));
        assert_eq!(parse_user("1000:staff"), Ok(None));
        let pw = "root:x:0:0:root:/root:/bin/sh\nnginx:x:101:101:nginx:/nonexistent:/bin/false\n";
        assert_eq!(passwd_lookup(pw, "nginx"), Some((101, 101)));
        assert_eq!(passwd_lookup(pw, "www"), None);
        let rel = Case {
            image: ImageConfig {
                working_dir: "app".into(),
                cmd: strings(&["x"]),
                ..ImageConfig::default()
            },
            ..Case::default()
        };
        let e = build_bare(&rel.image).unwrap_err();
        assert!(matches!(e, SpecError::RelativeCwd(_)));
    }
}
