//! Rust handle on `scripts/fixture.sh`: a private containerd and registry with the busybox test
//! image, torn down on drop. The script does the work (so bash users get the same fixture); this
//! module only picks the directory, runs `up`/`down` and parses `<dir>/env`.
//!
//! ```no_run
//! if !e2e::require_root("my_test") {
//!     return;
//! }
//! let _one_at_a_time = e2e::serial();
//! let fx = e2e::Fixture::start().unwrap();
//! let out = fx.ctr("oaktest").args(["images", "pull", "--plain-http", &fx.image]).output().unwrap();
//! assert!(out.status.success());
//! // A worker under test: NodeEngine with fx.worker_env() (OAK_CONTAINERD_SOCKET, OAK_INSECURE_REGISTRIES).
//! // Dropping `fx` (also while unwinding from a failed assert) runs `fixture.sh down`.
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A running fixture. Fields come from `<dir>/env` (see `scripts/fixture.sh`).
#[derive(Debug)]
pub struct Fixture {
    /// The directory holding everything the fixture created.
    pub dir: PathBuf,
    /// containerd's gRPC socket (`OAK_CONTAINERD_SOCKET`).
    pub containerd_socket: PathBuf,
    /// Snapshotter that works under `dir` (`overlayfs`, or `native` where overlay cannot mount).
    pub snapshotter: String,
    /// Registry address `127.0.0.1:PORT`, plain HTTP.
    pub registry: String,
    /// Multi-arch OCI image index: `127.0.0.1:PORT/oak/busybox:latest`.
    pub image: String,
    /// Docker schema2 single-arch manifest for the host platform (`…:docker`), if built.
    pub image_docker: Option<String>,
    /// Digest of the image index behind `image`.
    pub index_digest: String,
    /// Platforms in the index, e.g. `linux/amd64`, `linux/arm64`, `linux/arm/v7`.
    pub platforms: Vec<String>,
    /// A runc root inside `dir` (`FIXTURE_RUNC_ROOT`) for `ctr run --runc-root`: runc's default
    /// root `/run/containerd/runc/<namespace>` is shared by every containerd on the host, so two
    /// fixtures running the same namespace and container id at once collide there without it.
    pub runc_root: PathBuf,
    /// Every `KEY=VALUE` line of `<dir>/env` (per-platform manifest and layer digests…).
    pub env: BTreeMap<String, String>,
    down_done: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Fixture {
    /// Path of `scripts/fixture.sh` in this workspace.
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fixture.sh")
    }

    /// Starts a fixture in a fresh directory under `$OAK_TEST_TMP` (default `/tmp`), owned by
    /// this process: if the process dies without dropping it, the script's watchdog tears it down.
    pub fn start() -> Result<Fixture, String> {
        let dir = fresh_dir()?;
        let out = run_script(&[
            "up",
            path_str(&dir)?,
            "--owner-pid",
            &std::process::id().to_string(),
        ])?;
        if !out.status.success() {
            // `up` tears itself down on failure; make sure anyway, and keep its story.
            let _ = run_script(&["down", path_str(&dir)?]);
            return Err(format!(
                "fixture.sh up {} failed ({}):\n{}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut fx = Fixture::from_env_file(&dir)?;
        fx.dir = dir;
        Ok(fx)
    }

    /// Parses `<dir>/env` of a fixture started elsewhere (e.g. by a script). The returned value
    /// tears that fixture down when dropped.
    pub fn from_env_file(dir: &Path) -> Result<Fixture, String> {
        let path = dir.join("env");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read {}: {e} (did fixture.sh up finish?)",
                path.display()
            )
        })?;
        let env = parse_env(&text);
        let get = |k: &str| {
            env.get(k).cloned().ok_or_else(|| {
                format!(
                    "{} lacks {k}: fixture.sh and this crate disagree",
                    path.display()
                )
            })
        };
        Ok(Fixture {
            dir: dir.to_path_buf(),
            containerd_socket: PathBuf::from(get("OAK_CONTAINERD_SOCKET")?),
            snapshotter: get("OAK_CONTAINERD_SNAPSHOTTER")?,
            registry: get("FIXTURE_REGISTRY")?,
            image: get("FIXTURE_IMAGE")?,
            image_docker: env.get("FIXTURE_IMAGE_DOCKER").cloned(),
            index_digest: get("FIXTURE_INDEX_DIGEST")?,
            runc_root: PathBuf::from(get("FIXTURE_RUNC_ROOT")?),
            platforms: get("FIXTURE_PLATFORMS")?
                .split(',')
                .map(str::to_owned)
                .collect(),
            env,
            down_done: false,
        })
    }

    /// A `ctr` command bound to this containerd and namespace `ns`, with the right snapshotter.
    pub fn ctr(&self, ns: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.containerd_socket).arg("-n").arg(ns);
        c.env("CONTAINERD_SNAPSHOTTER", &self.snapshotter);
        c
    }

    /// Runs `ctr` in containerd namespace `ns`; its stdout, or its stderr as the error.
    pub fn ctr_ok(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        let out = self
            .ctr(ns)
            .args(args)
            .output()
            .map_err(|e| format!("ctr {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ctr {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Container ids in namespace `ns`.
    pub fn containers(&self, ns: &str) -> Result<Vec<String>, String> {
        Ok(self
            .ctr_ok(ns, &["containers", "ls", "-q"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Pid of a container's running task in namespace `ns` (`ctr tasks ls`: TASK PID STATUS).
    pub fn task_pid(&self, ns: &str, id: &str) -> Result<Option<u32>, String> {
        Ok(self.ctr_ok(ns, &["tasks", "ls"])?.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[0] == id && f[2] == "RUNNING")
                .then(|| f[1].parse().ok())
                .flatten()
        }))
    }

    /// Environment a worker under test needs to use this fixture (socket, insecure registry,
    /// and the snapshotter that works under the fixture's directory).
    pub fn worker_env(&self) -> Vec<(String, String)> {
        [
            "OAK_CONTAINERD_SOCKET",
            "OAK_INSECURE_REGISTRIES",
            "OAK_CONTAINERD_SNAPSHOTTER",
        ]
        .iter()
        .filter_map(|k| self.env.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect()
    }

    /// Tears down now and reports what went wrong (drop does the same but can only print).
    pub fn stop(mut self) -> Result<(), String> {
        self.down()
    }

    fn down(&mut self) -> Result<(), String> {
        if self.down_done {
            return Ok(());
        }
        self.down_done = true;
        let out = run_script(&["down", path_str(&self.dir)?])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "fixture.sh down {} failed ({}):\n{}",
                self.dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("{e}");
        }
    }
}

/// What of the fixture in `dir` is still there: processes naming `dir` in their cmdline, mounts
/// under it, the directory itself. Empty means clean.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    let under = |p: &str| p == d || p.starts_with(&format!("{d}/"));
    let mut left = Vec::new();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        let me = std::process::id().to_string();
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            if let Ok(raw) = std::fs::read(p.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
                let names_dir = |a: &str| {
                    a == d || a.contains(&format!("{d}/")) || a.ends_with(&format!("={d}"))
                };
                if cmd.split(' ').any(names_dir) {
                    left.push(format!("process {pid}: {}", cmd.trim_end()));
                }
            }
        }
    }
    if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
        for l in mi.lines() {
            if l.split(' ').nth(4).is_some_and(under) {
                left.push(format!("mount: {l}"));
            }
        }
    }
    if dir.exists() {
        left.push(format!("directory {d}"));
    }
    left
}

fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn fresh_dir() -> Result<PathBuf, String> {
    let base = std::env::var_os("OAK_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    std::fs::create_dir_all(&base)
        .map_err(|e| format!("cannot create {} (OAK_TEST_TMP): {e}", base.display()))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!(
            "oak-fx-{}-{n}-{:x}",
            std::process::id(),
            nanos & 0xffff
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create fixture dir {}: {e}", dir.display())),
        }
    }
    Err(format!("no free fixture dir name under {}", base.display()))
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str().ok_or_else(|| {
        format!(
            "fixture dir {} is not UTF-8: set OAK_TEST_TMP to a plain path",
            p.display()
        )
    })
}

fn run_script(args: &[&str]) -> Result<Output, String> {
    let script = Fixture::script();
    Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run bash {}: {e}", script.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_lines_parse() {
        let m = parse_env("A=1\n\n# c\nB=x=y\nFIXTURE_PLATFORMS=linux/amd64,linux/arm/v7\n");
        assert_eq!(m["A"], "1");
        assert_eq!(m["B"], "x=y");
        assert_eq!(m.len(), 3);
    }
}
