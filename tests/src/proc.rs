//! Daemons of the end-to-end tests as child processes: spawning with a log file, polite stops,
//! log tails for failure messages, free ports, and the workspace's own binaries.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A daemon of the test, stopped politely (SIGTERM) or killed when dropped.
pub struct Proc {
    name: &'static str,
    /// The child process; tests may signal it (SIGKILL drills) through its id.
    pub child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Proc, String> {
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc { name, child, log })
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `"KILL"`, `"STOP"`, `"CONT"`) with kill(1).
    pub fn signal(&self, signal: &str) -> Result<(), String> {
        let pid = self.child.id().to_string();
        let st = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .map_err(|e| format!("kill -{signal} {pid}: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("kill -{signal} {pid} failed: {st}"))
        }
    }

    /// SIGKILL and reap: the crash of a drill, not a stop.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then up to 10 s for a clean exit.
    pub fn stop(&mut self) -> Result<ExitStatus, String> {
        let pid = self.child.id().to_string();
        if self.alive() {
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Ok(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "{} (pid {pid}) ignored SIGTERM for 10 s",
                        self.name
                    ));
                }
            }
        }
    }

    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `NodeEngine` and `orch-lite` of this build, next to this test binary. `cargo test
/// --workspace` builds them first (both packages have integration tests), so they are used as
/// they are when newer than every source they come from; otherwise (`cargo test -p e2e` after an
/// edit) they are built, so the test never runs stale binaries. Always building would not do:
/// `cargo build` unifies features differently from `cargo test` and would relink them each run.
pub fn binaries() -> Result<(PathBuf, PathBuf), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test binary path {}", exe.display()))?
        .to_path_buf();
    let (ne, ol) = (
        profile_dir.join("NodeEngine"),
        profile_dir.join("orch-lite"),
    );
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let sources = ["worker", "orch-lite", "netstack", "Cargo.lock"].map(|p| repo.join(p));
    let newest_source = sources.iter().filter_map(|p| newest(p)).max();
    let built = [&ne, &ol]
        .iter()
        .map(|b| std::fs::metadata(b).and_then(|m| m.modified()).ok())
        .min()
        .flatten();
    if built.is_some() && built >= newest_source {
        return Ok((ne, ol));
    }
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let mut build = Command::new(cargo);
    build.args([
        "build",
        "-q",
        "-p",
        "worker",
        "--bin",
        "NodeEngine",
        "-p",
        "orch-lite",
        "--bin",
        "orch-lite",
    ]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    if let Some(target_dir) = profile_dir.parent() {
        build.arg("--target-dir").arg(target_dir);
    }
    let st = build
        .current_dir(repo)
        .status()
        .map_err(|e| format!("cannot run {cargo} build: {e}"))?;
    if !st.success() || !ne.exists() || !ol.exists() {
        return Err(format!(
            "{} or {} missing ({cargo} build: {st}): run `cargo build -p worker -p orch-lite` first",
            ne.display(),
            ol.display()
        ));
    }
    Ok((ne, ol))
}

/// Latest modification time of a file, or of any file under a directory (skipping `target`).
fn newest(p: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(p).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(p)
        .ok()?
        .flatten()
        .filter(|e| e.file_name() != "target")
        .filter_map(|e| newest(&e.path()))
        .max()
}
