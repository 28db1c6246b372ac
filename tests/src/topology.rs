//! The control plane as separate processes on loopback, the way a multi-host install runs it:
//! `orch-lite root`, `orch-lite cluster` (embedded broker, or an external mosquitto) and one
//! `NodeEngine`, over one fixture (containerd + registry). The failure drills kill, stop and
//! restart these processes one by one, so each has its own handle, data directory and a log
//! per incarnation (a restarted daemon must not overwrite the log of the one that died).
//!
//! The cluster finds its root as an operator sets it up: the root generates the join token on
//! first start and writes it to `<root data>/join-token`; the cluster gets it as
//! `OAK_JOIN_TOKEN` with `OAK_ROOT_URL`. `OAK_JOIN_TOKEN` on a cluster is also the token its
//! workers must present, so the worker gets it too.

use crate::mosquitto::Mosquitto;
use crate::root::Root;
use crate::{binaries, daemons, free_port, ok, wait_for, Fixture, Proc};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Which broker the cluster and its worker use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Broker {
    /// The cluster's embedded rumqttd (`OAK_MQTT_ADDR`).
    Embedded,
    /// A mosquitto started by the test (`OAK_MQTT_URL`).
    Mosquitto,
}

pub const CLUSTER_NAME: &str = "drills";
pub const WORKER_NAME: &str = "drill-worker";

pub struct Topology {
    pub node_engine: PathBuf,
    pub orch_lite: PathBuf,
    /// Data, config and logs of every daemon; removed at the end.
    pub work: PathBuf,
    pub root_addr: String,
    pub cluster_addr: String,
    pub cluster_port: u16,
    pub mqtt_port: u16,
    pub status_addr: String,
    /// The root's generated join token.
    pub token: String,
    /// A logged-in client of the root API.
    pub root: Root,
    pub root_proc: Option<Proc>,
    pub cluster_proc: Option<Proc>,
    pub worker_proc: Option<Proc>,
    pub mosquitto: Option<Mosquitto>,
    /// Dropped last: containerd takes the instances' processes down with it.
    pub fx: Option<Fixture>,
    incarnation: u32,
    started: Instant,
}

impl Topology {
    /// Starts everything and waits until the root counts the worker. `name` tells test runs
    /// apart in the work directory's name.
    pub fn start(name: &str, broker: Broker) -> Result<Topology, String> {
        let mut t = Topology::start_without_worker(name, broker)?;
        t.start_worker()?;
        t.root
            .wait_workers(1, Duration::from_secs(30))
            .map_err(|e| format!("{e}\n{}", t.logs(30)))?;
        println!("worker counted by the root after {:.1} s", t.elapsed());
        Ok(t)
    }

    /// Root, cluster, broker and fixture, no worker: for tests that start the worker their way.
    pub fn start_without_worker(name: &str, broker: Broker) -> Result<Topology, String> {
        let started = Instant::now();
        let (node_engine, orch_lite) = binaries()?;
        let fx = Fixture::start()?;
        let work = fx.dir.with_file_name(format!(
            "{}-{name}",
            fx.dir.file_name().and_then(|n| n.to_str()).unwrap_or("oak")
        ));
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let mosquitto = match broker {
            Broker::Embedded => None,
            Broker::Mosquitto => Some(Mosquitto::start(&work)?),
        };
        let cluster_port = free_port();
        let mut t = Topology {
            node_engine,
            orch_lite,
            root_addr: format!("127.0.0.1:{}", free_port()),
            cluster_addr: format!("127.0.0.1:{cluster_port}"),
            cluster_port,
            mqtt_port: mosquitto.as_ref().map_or_else(free_port, |m| m.port),
            status_addr: format!("127.0.0.1:{}", free_port()),
            token: String::new(),
            root: Root {
                addr: String::new(),
                token: String::new(),
            },
            work,
            root_proc: None,
            cluster_proc: None,
            worker_proc: None,
            mosquitto,
            fx: Some(fx),
            incarnation: 0,
            started,
        };
        t.start_root()?;
        let token_file = t.work.join("root/join-token");
        t.token = wait_for(
            "the root's join-token file",
            Duration::from_secs(10),
            || {
                Ok(std::fs::read_to_string(&token_file)
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty()))
            },
        )?;
        t.start_cluster()?;
        println!(
            "topology {name} up after {:.1} s (root {}, cluster {}, broker {:?} on {})",
            t.elapsed(),
            t.root_addr,
            t.cluster_addr,
            broker,
            t.mqtt_port
        );
        Ok(t)
    }

    /// Seconds since the topology started, for progress lines.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn fx(&self) -> &Fixture {
        self.fx
            .as_ref()
            .expect("the fixture lives as long as the topology")
    }

    fn log_path(&mut self, daemon: &str) -> PathBuf {
        self.incarnation += 1;
        self.work.join(format!("{daemon}.{}.log", self.incarnation))
    }

    /// (Re)starts `orch-lite root` on its data dir and address, and logs in.
    pub fn start_root(&mut self) -> Result<(), String> {
        let log = self.log_path("root");
        let mut cmd = daemons::orch_lite(&self.orch_lite, "root", &self.work, "root");
        cmd.env("OAK_ROOT_API_ADDR", &self.root_addr);
        self.root_proc = Some(Proc::spawn("orch-lite root", &mut cmd, log)?);
        self.root = Root::login(&self.root_addr, Duration::from_secs(20))?;
        Ok(())
    }

    /// (Re)starts `orch-lite cluster` on its data dir, API address and broker, and waits for
    /// its API.
    pub fn start_cluster(&mut self) -> Result<(), String> {
        let log = self.log_path("cluster");
        let mut cmd = daemons::orch_lite(&self.orch_lite, "cluster", &self.work, "cluster");
        cmd.env("OAK_CLUSTER_API_ADDR", &self.cluster_addr)
            .env("OAK_ROOT_URL", format!("http://{}", self.root_addr))
            .env("OAK_JOIN_TOKEN", &self.token)
            .env("OAK_CLUSTER_NAME", CLUSTER_NAME);
        match &self.mosquitto {
            Some(m) => cmd.env("OAK_MQTT_URL", m.url()),
            None => cmd.env("OAK_MQTT_ADDR", format!("127.0.0.1:{}", self.mqtt_port)),
        };
        self.cluster_proc = Some(Proc::spawn("orch-lite cluster", &mut cmd, log)?);
        wait_for("the cluster API", Duration::from_secs(20), || {
            Ok(self.cluster_status().ok())
        })?;
        Ok(())
    }

    /// The worker's command line and environment (legacy `-a`/`-p`, the join token).
    pub fn worker_command(&self) -> Command {
        let mut cmd = daemons::worker(
            &self.node_engine,
            &self.work,
            WORKER_NAME,
            "127.0.0.1",
            self.cluster_port,
            &self.status_addr,
            self.fx(),
        );
        cmd.env("OAK_JOIN_TOKEN", &self.token);
        cmd
    }

    /// (Re)starts the worker.
    pub fn start_worker(&mut self) -> Result<(), String> {
        let log = self.log_path("worker");
        let mut cmd = self.worker_command();
        self.worker_proc = Some(Proc::spawn("NodeEngine", &mut cmd, log)?);
        Ok(())
    }

    pub fn cluster_status(&self) -> Result<Value, String> {
        ok(
            "GET",
            &format!("http://{}/api/cluster/status", self.cluster_addr),
            None,
            None,
        )
    }

    pub fn worker_status(&self) -> Result<Value, String> {
        ok(
            "GET",
            &format!("http://{}/status", self.status_addr),
            None,
            None,
        )
    }

    /// The cluster's record of instance `n` of the job named `job_name`.
    pub fn cluster_instance(&self, job_name: &str, n: u64) -> Result<Option<Value>, String> {
        let st = self.cluster_status()?;
        Ok(st["instances"].as_array().and_then(|l| {
            l.iter()
                .find(|i| i["job_name"] == job_name && i["instance_number"] == n)
                .cloned()
        }))
    }

    /// The root's document of this topology's cluster.
    pub fn root_cluster(&self) -> Result<Option<Value>, String> {
        let (_, v) = self.root.call("GET", "/api/clusters", None)?;
        Ok(v.as_array().and_then(|l| {
            l.iter()
                .find(|c| c["cluster_name"] == CLUSTER_NAME || c["candidate_name"] == CLUSTER_NAME)
                .cloned()
        }))
    }

    /// Whether the root currently lists this cluster as active.
    pub fn root_sees_cluster_active(&self) -> Result<bool, String> {
        let (_, v) = self.root.call("GET", "/api/clusters/active", None)?;
        Ok(v.as_array().is_some_and(|l| {
            l.iter()
                .any(|c| c["cluster_name"] == CLUSTER_NAME || c["candidate_name"] == CLUSTER_NAME)
        }))
    }

    /// The last lines of every daemon's current log, for failure messages.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for (name, p) in [
            ("root", &self.root_proc),
            ("cluster", &self.cluster_proc),
            ("worker", &self.worker_proc),
        ] {
            if let Some(p) = p {
                out += &format!("\n--- {name} log {}:\n{}", p.log.display(), p.tail(lines));
            }
        }
        if let Some(m) = &self.mosquitto {
            out += &format!("\n--- mosquitto log:\n{}", m.tail(lines));
        }
        out
    }

    /// Orderly end: every daemon stopped with SIGTERM (a non-zero exit or a hang is an error),
    /// the fixture taken down, the work directory removed, and nothing of either left behind.
    pub fn finish(mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        for p in [
            self.worker_proc.take(),
            self.cluster_proc.take(),
            self.root_proc.take(),
        ]
        .into_iter()
        .flatten()
        {
            let mut p = p;
            match p.stop() {
                Ok(st) if st.success() => {}
                Ok(st) => errors.push(format!(
                    "{} exited with {st}:\n{}",
                    p.log.display(),
                    p.tail(15)
                )),
                Err(e) => errors.push(e),
            }
        }
        if let Some(mut m) = self.mosquitto.take() {
            m.kill();
        }
        let fx_dir = self.fx().dir.clone();
        if let Some(fx) = self.fx.take() {
            if let Err(e) = fx.stop() {
                errors.push(e);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.work) {
            errors.push(format!("removing {}: {e}", self.work.display()));
        }
        for dir in [&fx_dir, &self.work] {
            let left = crate::leftovers(dir);
            if !left.is_empty() {
                errors.push(format!("left behind: {left:#?}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }
}

impl Drop for Topology {
    /// A failed test still takes everything down: daemons killed, fixture down, files removed.
    fn drop(&mut self) {
        for p in [
            &mut self.worker_proc,
            &mut self.cluster_proc,
            &mut self.root_proc,
        ] {
            if let Some(mut p) = p.take() {
                p.kill();
            }
        }
        if let Some(mut m) = self.mosquitto.take() {
            m.kill();
        }
        drop(self.fx.take());
        if self.work.exists() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}
