//! Processes the benchmarks start (orch-lite, NodeEngine, mosquitto): each is stopped (TERM,
//! then KILL) when its guard drops. `scripts/bench.sh` also kills the whole process group on
//! exit, so a panic or a signal leaves nothing behind either.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("timed out after {timeout:?} waiting for {what}"))
}

pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail when the process has already exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(format!(
                "{} exited ({st}); log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin args` with exactly `env` (plus PATH), stdout/stderr to `<dir>/<name>.log`.
pub fn spawn(
    name: &str,
    bin: &Path,
    args: &[&str],
    env: &[(&str, String)],
    dir: &Path,
) -> Result<Proc, String> {
    spawn_in(name, bin, args, env, dir, None)
}

/// [`spawn`] inside the network namespace `netns` (only the network namespace changes, so the
/// child sees the same mounts, cgroups and containerd socket as the bench).
pub fn spawn_in(
    name: &str,
    bin: &Path,
    args: &[&str],
    env: &[(&str, String)],
    dir: &Path,
    netns: Option<std::fs::File>,
) -> Result<Proc, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log = dir.join(format!("{name}.log"));
    let f = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // OAK_BENCH_LOG=<filter> makes every daemon chatty when a bench needs explaining
    if let Ok(level) = std::env::var("OAK_BENCH_LOG") {
        cmd.env("RUST_LOG", level);
    }
    if let Some(fd) = netns {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook only calls setns(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || crate::netns::setns_net(&fd));
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {} ({}): {e}", name, bin.display()))?;
    Ok(Proc {
        child,
        name: name.into(),
        log,
    })
}

/// `orch-lite <role>` on free loopback ports with its data under `dir`.
pub struct Orch {
    pub proc: Proc,
    pub cluster_api: u16,
    pub root_api: u16,
    pub mqtt: u16,
}

impl Orch {
    pub fn start(
        bin: &Path,
        role: &str,
        dir: &Path,
        extra: &[(&str, String)],
    ) -> Result<Orch, String> {
        Orch::start_on(bin, role, dir, extra, None)
    }

    /// With `advertise`, the cluster tells workers to reach it (API, MQTT) at `advertise` on the
    /// same ports as on loopback: a relay there forwards (a worker in another namespace).
    pub fn start_on(
        bin: &Path,
        role: &str,
        dir: &Path,
        extra: &[(&str, String)],
        advertise: Option<&str>,
    ) -> Result<Orch, String> {
        let (cluster_api, root_api, mqtt) = (free_port(), free_port(), free_port());
        let listen = "127.0.0.1";
        let mut env = vec![
            // rumqttd's per-packet ERROR-level spans stay off, as in orch-lite's default filter:
            // a bare `warn` would log three lines per MQTT message and load the broker.
            ("RUST_LOG", "warn,rumqttd=off,tracing::span=off".to_string()),
            ("OAK_DATA_DIR", dir.join("data").display().to_string()),
            ("OAK_CLUSTER_API_ADDR", format!("{listen}:{cluster_api}")),
            ("OAK_ROOT_API_ADDR", format!("127.0.0.1:{root_api}")),
            ("OAK_MQTT_ADDR", format!("{listen}:{mqtt}")),
            ("OAK_CLUSTER_NAME", "bench-cluster".to_string()),
            (
                "OAK_ADVERTISE_ADDR",
                advertise.unwrap_or("127.0.0.1").to_string(),
            ),
            ("OAK_ADMIN_PASSWORD", "bench".to_string()),
        ];
        env.extend(extra.iter().cloned());
        let proc = spawn(&format!("orch-lite-{role}"), bin, &[role], &env, dir)?;
        let mut o = Orch {
            proc,
            cluster_api,
            root_api,
            mqtt,
        };
        let health = match role {
            "root" => format!("http://127.0.0.1:{root_api}/api/docs"),
            _ => format!("http://127.0.0.1:{cluster_api}/healthz"),
        };
        let mut alive = Ok(());
        wait_for("orch-lite's API", Duration::from_secs(30), || {
            alive = o.proc.check_alive();
            alive.is_err() || ureq::get(&health).call().is_ok()
        })?;
        alive?;
        Ok(o)
    }

    pub fn cluster_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.cluster_api)
    }

    pub fn root_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.root_api)
    }
}

/// mosquitto on a free loopback port, no persistence.
pub fn mosquitto(dir: &Path) -> Result<(Proc, u16), String> {
    let port = free_port();
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n"),
    )
    .map_err(|e| e.to_string())?;
    let conf = conf.display().to_string();
    let bin = which("mosquitto").ok_or("mosquitto not found: run scripts/setup-deps.sh")?;
    let p = spawn("mosquitto", &bin, &["-c", &conf], &[], dir)?;
    wait_for("mosquitto", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Ok((p, port))
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
}

/// Raises the soft open-files limit to the hard one (thousands of MQTT connections).
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid out pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir, String> {
        let base = crate::results::out_dir().join("tmp");
        let d = base.join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        Ok(TempDir(d))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("OAK_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// An HTTP error with the answer's body (the APIs say what is wrong in `message`).
pub fn http_err(what: &str, e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(c, r) => {
            format!("{what}: HTTP {c}: {}", r.into_string().unwrap_or_default())
        }
        e => format!("{what}: {e}"),
    }
}
