//! A whole system on one host as separate processes, for the drills: `orch-lite all` (embedded
//! broker) and N `NodeEngine` workers, each with its own fixture (containerd + registry), because
//! a worker adopts every container of its containerd namespace at start and two workers sharing a
//! containerd would steal each other's instances. All workers pull from the first fixture's
//! registry (loopback, listed as insecure for every worker).
//!
//! Dropping a `World` kills what still runs, tears the fixtures down and removes the work
//! directory; while a test panics it first prints the tail of every daemon log, so a failed drill
//! says what the daemons saw. [`World::finish`] is the orderly end that also checks that nothing
//! was left behind.

use crate::root::Root;
use crate::{binaries, daemons, free_port, ok, Fixture, Proc};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// containerd namespace the workers use (upstream's).
pub const NS: &str = "oakestra";

/// One worker: its fixture, its process (None while stopped) and where to reach it.
pub struct Worker {
    pub name: String,
    pub fx: Fixture,
    pub proc: Option<Proc>,
    /// `host:port` of its status endpoint (/status, /metrics).
    pub status: String,
    /// How many times it was started (names its log files).
    starts: u32,
}

impl Worker {
    /// Its `/metrics` text.
    pub fn metrics(&self) -> Result<String, String> {
        let v = ok(
            "GET",
            &format!("http://{}/metrics", self.status),
            None,
            None,
        )?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// One counter or gauge of its `/metrics` (the line `name value`, labels included in `name`).
    pub fn metric(&self, name: &str) -> Result<Option<f64>, String> {
        Ok(metric_value(&self.metrics()?, name))
    }

    /// Pid of the running task of container `id` in its containerd.
    pub fn task_pid(&self, id: &str) -> Result<Option<u32>, String> {
        self.fx.task_pid(NS, id)
    }

    /// Container ids in its containerd.
    pub fn containers(&self) -> Result<Vec<String>, String> {
        self.fx.containers(NS)
    }

    /// Its current log file (of the latest start).
    pub fn log(&self) -> Option<&Path> {
        self.proc.as_ref().map(|p| p.log.as_path())
    }
}

/// Value of the sample `name` in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Settings of a world; the defaults keep tests fast.
pub struct Options {
    pub workers: usize,
    /// `OAK_NODE_TIMEOUT_MS` of the cluster (silence before a worker's instances are FAILED).
    pub node_timeout_ms: u64,
    /// Extra environment for orch-lite.
    pub orch_env: Vec<(String, String)>,
    /// Extra environment for every worker.
    pub worker_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            workers: 2,
            node_timeout_ms: 30_000,
            orch_env: Vec::new(),
            worker_env: Vec::new(),
        }
    }
}

pub struct World {
    /// Logs, configs and state of the daemons (removed at the end).
    pub work: PathBuf,
    pub orch: Option<Proc>,
    pub root: Root,
    /// `host:port` of the cluster API.
    pub cluster: String,
    pub workers: Vec<Worker>,
    /// Time since the world started, for the drills' timings.
    pub started: Instant,
    node_engine: PathBuf,
    cluster_port: u16,
    registries: String,
    worker_env: Vec<(String, String)>,
    fixture_dirs: Vec<PathBuf>,
}

impl World {
    /// Starts the fixtures, `orch-lite all`, then the workers, and waits until the root counts
    /// them all active. `tag` names the work directory.
    pub fn start(tag: &str, opts: Options) -> Result<World, String> {
        let started = Instant::now();
        let (node_engine, orch_lite) = binaries()?;
        let mut fixtures = Vec::new();
        for _ in 0..opts.workers.max(1) {
            fixtures.push(Fixture::start()?);
        }
        let fixture_dirs: Vec<PathBuf> = fixtures.iter().map(|f| f.dir.clone()).collect();
        let work = fixtures[0].dir.with_file_name(format!(
            "{}-{tag}",
            fixtures[0]
                .dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("oak")
        ));
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let registries = fixtures
            .iter()
            .map(|f| f.registry.clone())
            .collect::<Vec<_>>()
            .join(",");
        let (root_port, cluster_port, mqtt_port) = (free_port(), free_port(), free_port());
        let root_addr = format!("127.0.0.1:{root_port}");
        let mut cmd = daemons::orch_lite(&orch_lite, "all", &work, "orch-lite");
        cmd.env("OAK_ROOT_API_ADDR", &root_addr)
            .env("OAK_CLUSTER_API_ADDR", format!("127.0.0.1:{cluster_port}"))
            .env("OAK_MQTT_ADDR", format!("127.0.0.1:{mqtt_port}"))
            .env("OAK_CLUSTER_NAME", "drills")
            // The embedded broker logs every packet, some at error level: silenced, so the logs
            // dumped on failure show the cluster's story.
            .env("RUST_LOG", "info,rumqttd=off")
            .env("OAK_NODE_TIMEOUT_MS", opts.node_timeout_ms.to_string());
        for (k, v) in &opts.orch_env {
            cmd.env(k, v);
        }
        // From here on, a failure drops a World that cleans up what exists so far.
        let mut w = World {
            work: work.clone(),
            orch: None,
            root: Root {
                addr: root_addr.clone(),
                token: String::new(),
            },
            cluster: format!("127.0.0.1:{cluster_port}"),
            workers: Vec::new(),
            started,
            node_engine,
            cluster_port,
            registries,
            worker_env: opts.worker_env,
            fixture_dirs,
        };
        w.orch = Some(Proc::spawn(
            "orch-lite",
            &mut cmd,
            work.join("orch-lite.log"),
        )?);
        w.root = Root::login(&root_addr, Duration::from_secs(30))?;
        for (i, fx) in fixtures.into_iter().enumerate() {
            let name = format!("drill-w{i}");
            w.workers.push(Worker {
                name,
                fx,
                proc: None,
                status: format!("127.0.0.1:{}", free_port()),
                starts: 0,
            });
            w.start_worker(i)?;
        }
        w.root
            .wait_workers(w.workers.len() as u64, Duration::from_secs(40))?;
        println!(
            "world {tag}: {} worker(s) active at the root after {:.1} s",
            w.workers.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(w)
    }

    /// Starts worker `i` (again), with the same name, state, logs and status address; each start
    /// logs to its own file.
    pub fn start_worker(&mut self, i: usize) -> Result<(), String> {
        let wk = &mut self.workers[i];
        if wk.proc.is_some() {
            return Err(format!("{} already runs", wk.name));
        }
        wk.starts += 1;
        let mut cmd = daemons::worker(
            &self.node_engine,
            &self.work,
            &wk.name,
            "127.0.0.1",
            self.cluster_port,
            &wk.status,
            &wk.fx,
        );
        cmd.env("OAK_INSECURE_REGISTRIES", &self.registries);
        for (k, v) in &self.worker_env {
            cmd.env(k, v);
        }
        let log = self.work.join(format!("{}.{}.log", wk.name, wk.starts));
        wk.proc = Some(Proc::spawn("NodeEngine", &mut cmd, log)?);
        Ok(())
    }

    /// The worker `i`'s process.
    pub fn proc(&mut self, i: usize) -> Result<&mut Proc, String> {
        self.workers[i]
            .proc
            .as_mut()
            .ok_or_else(|| format!("worker {i} is not running"))
    }

    /// orch-lite's process.
    pub fn orch(&self) -> &Proc {
        self.orch
            .as_ref()
            .expect("orch-lite runs for the world's lifetime")
    }

    /// `GET /api/cluster/status` of the cluster (workers with ids, instances with attempts,
    /// counters).
    pub fn cluster_status(&self) -> Result<Value, String> {
        ok(
            "GET",
            &format!("http://{}/api/cluster/status", self.cluster),
            None,
            None,
        )
    }

    /// The cluster's node id of each worker, by index (None if not registered).
    pub fn node_ids(&self) -> Result<Vec<Option<String>>, String> {
        let st = self.cluster_status()?;
        let nodes = st["nodes"].as_array().cloned().unwrap_or_default();
        Ok(self
            .workers
            .iter()
            .map(|w| {
                nodes
                    .iter()
                    .find(|n| n["name"] == w.name.as_str())
                    .and_then(|n| n["id"].as_str().map(str::to_owned))
            })
            .collect())
    }

    /// Index of the worker whose cluster id is `id`.
    pub fn worker_index(&self, id: &str) -> Result<Option<usize>, String> {
        Ok(self
            .node_ids()?
            .iter()
            .position(|n| n.as_deref() == Some(id)))
    }

    /// The cluster's record of instance `n` of job `job_name` (status, worker_id, attempts).
    pub fn cluster_instance(&self, job_name: &str, n: u64) -> Result<Option<Value>, String> {
        let st = self.cluster_status()?;
        Ok(st["instances"].as_array().and_then(|l| {
            l.iter()
                .find(|i| i["job_name"] == job_name && i["instance_number"] == n)
                .cloned()
        }))
    }

    /// One counter of the cluster's `counters` object.
    pub fn cluster_counter(&self, name: &str) -> Result<u64, String> {
        Ok(self.cluster_status()?["counters"][name]
            .as_u64()
            .unwrap_or(0))
    }

    /// Tails of every daemon log, for failure messages.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.work)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "--- {} (last {lines} lines):\n{}\n",
                f.display(),
                all[all.len().saturating_sub(lines)..].join("\n")
            ));
        }
        out
    }

    /// Orderly end: stops the workers and orch-lite (each must exit cleanly, unless already
    /// stopped or killed by the drill), tears the fixtures down, removes the work directory and
    /// checks that nothing of any of them is left.
    pub fn finish(mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        for w in &mut self.workers {
            if let Some(mut p) = w.proc.take() {
                if p.alive() {
                    match p.stop() {
                        Ok(st) if st.success() => {}
                        Ok(st) => errors.push(format!("{} exited with {st}", w.name)),
                        Err(e) => errors.push(e),
                    }
                }
            }
        }
        if let Some(mut o) = self.orch.take() {
            // A drill may have left it stopped (SIGSTOP): wake it so SIGTERM can work.
            let _ = o.signal("CONT");
            match o.stop() {
                Ok(st) if st.success() => {}
                Ok(st) => errors.push(format!("orch-lite exited with {st}")),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(format!("{}\n{}", errors.join("\n"), self.logs(30)));
        }
        for w in std::mem::take(&mut self.workers) {
            w.fx.stop()?;
        }
        std::fs::remove_dir_all(&self.work)
            .map_err(|e| format!("removing {}: {e}", self.work.display()))?;
        let mut left = Vec::new();
        for d in self.fixture_dirs.iter().chain([&self.work]) {
            left.extend(crate::leftovers(d));
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left behind: {left:#?}"))
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs(60));
        }
        for w in &mut self.workers {
            if let Some(mut p) = w.proc.take() {
                p.kill();
            }
        }
        if let Some(mut o) = self.orch.take() {
            let _ = o.signal("CONT");
            o.kill();
        }
        // Fixtures tear down in their own Drop (containers, containerd, registry, mounts).
        self.workers.clear();
        if self.work.exists() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// The cgroup of a process as `/proc/<pid>/cgroup` lists it for `controller` (v1), or the
/// unified path (v2) when the controller has no own hierarchy.
pub fn cgroup_of(pid: u32, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut unified = None;
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        if ctl.split(',').any(|c| c == controller) {
            return Some(path.to_owned());
        }
        if ctl.is_empty() {
            unified = Some(path.to_owned());
        }
    }
    unified
}

/// `kill -<signal> <pid>` for processes that are not our children (container tasks).
pub fn kill_pid(pid: u32, signal: &str) -> Result<(), String> {
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .map_err(|e| e.to_string())?;
    st.success()
        .then_some(())
        .ok_or_else(|| format!("kill -{signal} {pid}: {st}"))
}
