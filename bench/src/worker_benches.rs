//! Worker benches. The worker always runs in its own network namespace behind a veth to
//! `orch-lite all` in the root namespace (see [`crate::netns`]), so the overlay can come up with
//! its fixed device names and the deploy bench can add delay on the same link.
//!
//! - idle: footprint of a registered NodeEngine with the overlay on and no instances, against a
//!   minimal always-on MQTT client (`mosquitto_sub` on the same broker) in the same window;
//! - deploy: a bare `ctr run -d` of the fixture's cached image as the floor; then deploys through
//!   the root, timed three ways: end to end at the root (POST instance → RUNNING), worker side
//!   (deploy message → RUNNING status, both seen on the broker by a passive subscriber), and end
//!   to end again with 250 ms more round trip on the worker's link (a delay line standing in for
//!   netem, see [`crate::netns`]); worker RSS as instances pile up.

use crate::netns::{Relay, WorkerNet};
use crate::procfs;
use crate::procs::{self, spawn, wait_for, Orch, Proc, TempDir};
use crate::results::{self, append, cdf, Plot, Record, Series};
use crate::stats::{max, percentile};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use worker::protocol;

pub struct Opts {
    pub warmup: Duration,
    pub window: Duration,
    pub deploy_runs: usize,
    pub netem_runs: usize,
    pub instance_counts: Vec<usize>,
}

const SECTION_FP: &str = "footprint";
const SECTION_DEPLOY: &str = "deploy";

/// A NodeEngine inside `net`, joining the cluster API on the host end of the veth; its status
/// endpoint listens on the worker's veth address so the bench can read it.
fn node_engine(
    bin: &Path,
    dir: &Path,
    net: &WorkerNet,
    cluster_api: u16,
    status_port: u16,
    network: &str,
    extra: &[(&str, String)],
) -> Result<Proc, String> {
    for d in ["conf", "state", "logs"] {
        std::fs::create_dir_all(dir.join(d)).map_err(|e| e.to_string())?;
    }
    let mut env = vec![
        ("RUST_LOG", "warn".to_string()),
        ("OAK_NODE_NAME", "bench-worker".to_string()),
        ("OAK_CONFIG_DIR", dir.join("conf").display().to_string()),
        (
            "OAK_NETCFG",
            dir.join("conf/netcfg.json").display().to_string(),
        ),
        ("OAK_STATE_DIR", dir.join("state").display().to_string()),
        ("OAK_APP_LOGS", dir.join("logs").display().to_string()),
        (
            "OAK_STATUS_ADDR",
            format!("{}:{status_port}", net.worker_ip),
        ),
        ("OAK_NETWORK", network.to_string()),
        ("OAK_TUNNEL_PORT", procs::free_port().to_string()),
        ("OAK_PUBLIC_ADDRESS", net.worker_ip.clone()),
    ];
    env.extend(extra.iter().cloned());
    let port = cluster_api.to_string();
    procs::spawn_in(
        "NodeEngine",
        bin,
        &["-a", &net.host_ip, "-p", &port],
        &env,
        dir,
        Some(net.file()?),
    )
}

fn active_workers(orch: &Orch) -> usize {
    ureq::get(&orch.cluster_url("/api/cluster/status"))
        .call()
        .ok()
        .and_then(|r| r.into_json::<Value>().ok())
        .and_then(|v| v["active_nodes"].as_u64())
        .unwrap_or(0) as usize
}

/// Whether the worker's overlay devices exist in its namespace (the overlay is up).
fn overlay_up(net: &WorkerNet) -> bool {
    Command::new("ip")
        .args(["-n", &net.ns, "link", "show", "goProxyTun"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn login(orch: &Orch) -> Result<String, String> {
    let v: Value = ureq::post(&orch.root_url("/api/auth/login"))
        .send_json(json!({"username": "Admin", "password": "bench"}))
        .map_err(|e| procs::http_err("login", e))?
        .into_json()
        .map_err(|e| e.to_string())?;
    v["token"]
        .as_str()
        .map(str::to_string)
        .ok_or("no token".into())
}

/// orch-lite all (cluster reachable from `net`) and one registered NodeEngine inside `net`.
struct Setup {
    relay: Relay,
    orch: Orch,
    ne: Proc,
    status: String,
    token: String,
}

fn setup(
    orch_bin: &Path,
    worker_bin: &Path,
    dir: &Path,
    net: &WorkerNet,
    network: &str,
    extra: &[(&str, String)],
) -> Result<Setup, String> {
    let orch = Orch::start_on(
        orch_bin,
        "all",
        dir,
        &[("OAK_CLUSTER_REPORT_INTERVAL_MS", "1000".into())],
        Some(&net.host_ip),
    )?;
    let mut relay = Relay::new();
    for port in [orch.cluster_api, orch.mqtt] {
        let at = |ip: &str| -> Result<std::net::SocketAddr, String> {
            format!("{ip}:{port}")
                .parse()
                .map_err(|e| format!("{ip}: {e}"))
        };
        relay.forward(at(&net.host_ip)?, at("127.0.0.1")?)?;
    }
    let status_port = procs::free_port();
    let mut ne = node_engine(
        worker_bin,
        &dir.join("worker"),
        net,
        orch.cluster_api,
        status_port,
        network,
        extra,
    )?;
    let mut alive = Ok(());
    wait_for(
        "NodeEngine to register and report",
        Duration::from_secs(40),
        || {
            alive = ne.check_alive();
            alive.is_err() || active_workers(&orch) >= 1
        },
    )
    .map_err(|e| format!("{e}; NodeEngine log:\n{}", procs::tail(&ne.log, 20)))?;
    alive?;
    let token = login(&orch)?;
    Ok(Setup {
        relay,
        status: format!("http://{}:{status_port}/status", net.worker_ip),
        orch,
        ne,
        token,
    })
}

pub fn idle(orch_bin: &Path, worker_bin: &Path, o: &Opts) -> Result<(), String> {
    let dir = TempDir::new("idle")?;
    let net = WorkerNet::new('i')?;
    let mut s = setup(orch_bin, worker_bin, dir.path(), &net, "auto", &[])?;
    let sub = procs::which("mosquitto_sub")
        .ok_or("mosquitto_sub not found: run scripts/setup-deps.sh")?;
    let port = s.orch.mqtt.to_string();
    // subscribed to its own control topics, as an idle worker's MQTT client is
    let mut base = spawn(
        "mosquitto_sub",
        &sub,
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "bench-baseline-ne",
            "-q",
            "1",
            "-t",
            "nodes/bench-baseline/control/#",
        ],
        &[],
        dir.path(),
    )?;
    // the overlay asks the root for a subnet through the cluster; give it the warm-up
    let _ = wait_for("the overlay", o.warmup.max(Duration::from_secs(1)), || {
        overlay_up(&net)
    });
    std::thread::sleep(o.warmup);
    s.ne.check_alive()?;
    base.check_alive()?;
    let overlay = if overlay_up(&net) {
        "overlay on (OAK_NETWORK=auto, goProxyTun up in the worker's namespace)"
    } else {
        "overlay requested (OAK_NETWORK=auto) but goProxyTun did not appear: the figure is the cluster session alone"
    };
    let w = procfs::sample(
        &[s.ne.pid(), base.pid()],
        o.window,
        Duration::from_secs(1),
        || false,
    );
    s.ne.check_alive()?;
    let mib = |v: Option<f64>| v.map(|k| k / 1024.0);
    let (ne_w, b_w) = (&w[0], &w[1]);
    let window = format!(
        "{} s window after {} s warm-up, 1 s sampling",
        o.window.as_secs(),
        o.warmup.as_secs()
    );
    let reports = ureq::get(&s.status)
        .call()
        .ok()
        .and_then(|r| r.into_json::<Value>().ok())
        .map(|v| v["counters"]["information_sent"].clone())
        .unwrap_or(Value::Null);
    append(
        Record::new(SECTION_FP, "NodeEngine idle RSS p95 (registered, no instances)", mib(percentile(&ne_w.rss_kib(), 95.0)), "MiB")
            .baseline("mosquitto_sub idle RSS p95", mib(percentile(&b_w.rss_kib(), 95.0)))
            .goal("le", 6.0, "≤ 6 MiB")
            .notes(format!(
                "{window}; PSS p95 {:.2} MiB; {} threads; {overlay}; {reports} information reports sent since start",
                mib(percentile(&ne_w.pss_kib(), 95.0)).unwrap_or(f64::NAN),
                procfs::threads(s.ne.pid()).unwrap_or(0)
            )),
    )
    .map_err(|e| e.to_string())?;
    append(
        Record::new(
            SECTION_FP,
            "NodeEngine idle RSS max",
            mib(max(&ne_w.rss_kib())),
            "MiB",
        )
        .baseline("mosquitto_sub idle RSS max", mib(max(&b_w.rss_kib())))
        .goal("le", 6.0, "≤ 6 MiB"),
    )
    .map_err(|e| e.to_string())?;
    append(
        Record::new(
            SECTION_FP,
            "NodeEngine idle CPU (reports every 2 s)",
            ne_w.cpu_percent,
            "% of a core",
        )
        .baseline("mosquitto_sub idle CPU", b_w.cpu_percent)
        .goal("le", 0.1, "≤ 0.1 % of a core")
        .notes(format!("{window}; utime+stime delta over wall time")),
    )
    .map_err(|e| e.to_string())?;
    let series = |name: &str, win: &procfs::Window| Series {
        name: name.into(),
        points: win.samples.iter().map(|s| (s.0, s.1 / 1024.0)).collect(),
    };
    results::save_plot(&Plot {
        id: "worker-idle-rss".into(),
        title: "Idle RSS over time: NodeEngine vs mosquitto_sub".into(),
        x_label: "s".into(),
        y_label: "RSS MiB".into(),
        kind: "line".into(),
        series: vec![
            series("NodeEngine (registered, overlay on)", ne_w),
            series("mosquitto_sub (baseline)", b_w),
        ],
    })
    .map_err(|e| e.to_string())
}

fn fixture_env(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

struct Ctr {
    sock: String,
    image: String,
    snapshotter: String,
}

impl Ctr {
    fn new(fx: &HashMap<String, String>) -> Result<Ctr, String> {
        Ok(Ctr {
            sock: fx
                .get("CONTAINERD_ADDRESS")
                .ok_or("fixture env has no CONTAINERD_ADDRESS")?
                .clone(),
            image: fx
                .get("FIXTURE_IMAGE")
                .ok_or("fixture env has no FIXTURE_IMAGE")?
                .clone(),
            snapshotter: fx
                .get("CONTAINERD_SNAPSHOTTER")
                .cloned()
                .unwrap_or("overlayfs".into()),
        })
    }

    fn run(&self, ns: &str, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ctr")
            .args(["--address", &self.sock, "-n", ns])
            .args(args)
            .output()
            .map_err(|e| format!("ctr: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ctr -n {ns} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Container ids in namespace `ns`.
    fn containers(&self, ns: &str) -> Result<Vec<String>, String> {
        let out = Command::new("ctr")
            .args(["--address", &self.sock, "-n", ns, "containers", "ls", "-q"])
            .output()
            .map_err(|e| format!("ctr: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Puts the image into namespace `ns`, so later runs there find it cached.
    fn pull(&self, ns: &str) -> Result<(), String> {
        self.run(ns, &["images", "pull", "--plain-http", &self.image])
    }
}

/// `ctr run -d` (create the container, start its task, return) of the cached image, `runs`
/// times: wall ms each. Each container is removed again outside the timed part.
/// What the measured containers run, under `ctr run` and the worker alike: a sleeper that ends
/// on SIGTERM (a bare `sleep` as PID 1 ignores it, and every undeploy would wait out the
/// worker's 5 s grace period).
const PROBE_CMD: &str = "trap 'exit 0' TERM; sleep 3600 & wait";

fn ctr_runs(c: &Ctr, runs: usize) -> Result<Vec<f64>, String> {
    let ns = "oakbench";
    c.pull(ns)?;
    let mut v = Vec::new();
    for i in 0..runs {
        let id = format!("bench-ctr-{}-{i}", std::process::id());
        let t0 = Instant::now();
        let r = c.run(
            ns,
            &[
                "run",
                "-d",
                "--snapshotter",
                &c.snapshotter,
                &c.image,
                &id,
                "sh",
                "-c",
                PROBE_CMD,
            ],
        );
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let _ = c.run(ns, &["tasks", "kill", "-s", "SIGKILL", &id]);
        let mut cleaned = Err(String::new());
        for _ in 0..50 {
            cleaned = c
                .run(ns, &["tasks", "delete", "-f", &id])
                .or_else(|_| c.run(ns, &["tasks", "delete", &id]));
            if cleaned.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        c.run(ns, &["containers", "delete", &id])
            .map_err(|e| format!("{e} (task delete: {:?})", cleaned.err()))?;
        r?;
        v.push(ms);
    }
    Ok(v)
}

/// Creates one service for `image` and returns its id.
fn create_service(orch: &Orch, token: &str, image: &str) -> Result<String, String> {
    let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{
        "applicationID": "", "application_name": "bench", "application_namespace": "b",
        "application_desc": "deploy latency", "microservices": [{"microserviceID": "",
        "microservice_name": "probe", "microservice_namespace": "b", "virtualization": "container",
        "cmd": ["sh", "-c", PROBE_CMD], "memory": 8, "vcpus": 0, "vgpus": 0, "vtpus": 0, "bandwidth_in": 0,
        "bandwidth_out": 0, "storage": 0, "code": image, "state": "", "port": "", "added_files": [],
        "constraints": []}]}]});
    ureq::post(&orch.root_url("/api/application"))
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(sla)
        .map_err(|e| procs::http_err("SLA POST", e))?;
    let svcs: Value = ureq::get(&orch.root_url("/api/services/"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())?;
    svcs[0]["_id"]["$oid"]
        .as_str()
        .map(str::to_string)
        .ok_or("no service id".into())
}

/// What the passive subscriber saw, per (job name, instance): deploy message, CREATED status
/// (the worker sends CREATED once the task started; RUNNING is the cluster's word, §5.2).
type Seen = Arc<Mutex<HashMap<(String, u64), (Option<Instant>, Option<Instant>)>>>;

/// A passive MQTT subscriber on the cluster's broker: stamps each deploy message to a worker
/// and each RUNNING status from one. Both reach it through the same broker the worker and the
/// cluster use, so their difference is the worker's own time from the command's arrival to the
/// started task (plus a loopback hop's jitter): issue #4's "deploy command received → task
/// started".
fn observer(port: u16) -> Result<(Seen, Arc<std::sync::atomic::AtomicBool>), String> {
    let seen: Seen = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    {
        let (seen, stop) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let mut o = MqttOptions::new("bench-deploy-observer", "127.0.0.1", port);
                o.set_keep_alive(Duration::from_secs(30));
                o.set_max_packet_size(1 << 20, 1 << 20);
                let (client, mut el) = AsyncClient::new(o, 16);
                el.network_options.set_tcp_nodelay(true);
                let mut ready = Some(ready_tx);
                // keep-alive pings wake the loop at least every 30 s to see `stop`
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = client
                                .subscribe("nodes/+/control/deploy", QoS::AtMostOnce)
                                .await;
                            let _ = client.subscribe("nodes/+/job", QoS::AtMostOnce).await;
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(t) = ready.take() {
                                let _ = t.send(());
                            } else {
                                ready = None;
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let at = Instant::now();
                            let mut m = match seen.lock() {
                                Ok(m) => m,
                                Err(_) => return,
                            };
                            if p.topic.ends_with("/control/deploy") {
                                if let Ok(d) = protocol::DeployCommand::decode(&p.payload) {
                                    m.entry((d.job_name, d.instance_number))
                                        .or_default()
                                        .0
                                        .get_or_insert(at);
                                }
                            } else if let Ok(st) =
                                serde_json::from_slice::<protocol::JobStatus>(&p.payload)
                            {
                                if st.status == protocol::Status::Created {
                                    m.entry((st.sname, st.instance))
                                        .or_default()
                                        .1
                                        .get_or_insert(at);
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
        });
    }
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the deploy observer did not subscribe within 10 s".to_string())?;
    Ok((seen, stop))
}

/// One deploy through the root, timed from the POST.
struct Timed {
    n: u64,
    /// until the root shows CREATED (the worker started the task) or RUNNING, if seen first
    created_ms: f64,
    /// until the root shows RUNNING (the cluster saw the instance in a `jobs/resources` report)
    running_ms: f64,
}

/// POST instance → poll the root until the instance is RUNNING.
fn deploy_once(orch: &Orch, token: &str, sid: &str) -> Result<Timed, String> {
    let auth = format!("Bearer {token}");
    let t0 = Instant::now();
    let r: Value = ureq::post(&orch.root_url(&format!("/api/service/{sid}/instance")))
        .set("Authorization", &auth)
        .call()
        .map_err(|e| procs::http_err("POST instance", e))?
        .into_json()
        .map_err(|e| e.to_string())?;
    let n = r["instance_number"]
        .as_u64()
        .ok_or_else(|| format!("POST instance answered {r}"))?;
    let end = t0 + Duration::from_secs(60);
    let mut created = None;
    while Instant::now() < end {
        let job: Value = ureq::get(&orch.root_url(&format!("/api/service/{sid}")))
            .set("Authorization", &auth)
            .call()
            .map_err(|e| e.to_string())?
            .into_json()
            .map_err(|e| e.to_string())?;
        let inst = job["instance_list"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|i| i["instance_number"].as_u64() == Some(n))
                    .cloned()
            })
            .unwrap_or(Value::Null);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        match inst["status"].as_str() {
            Some("CREATED") => {
                created.get_or_insert(ms);
            }
            Some("RUNNING") => {
                return Ok(Timed {
                    n,
                    created_ms: created.unwrap_or(ms),
                    running_ms: ms,
                })
            }
            Some("FAILED") | Some("DEAD") => {
                return Err(format!(
                    "instance {n} ended {}: {}",
                    inst["status"],
                    inst["status_detail"].as_str().unwrap_or("")
                ))
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    Err(format!("instance {n}: no RUNNING at the root within 60 s"))
}

/// A pause before each deploy, spread over the worker's report interval, so deploys arrive at
/// a random phase of the worker's periodic reports as a user's do (the worker also reports at
/// once when a task starts; the pause keeps the figure honest should that ever regress).
struct Phase(u64);

impl Phase {
    fn next(&mut self, interval: Duration) -> Duration {
        // xorshift64: reproducible, no dependency
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        interval.mul_f64((self.0 % 10_000) as f64 / 10_000.0)
    }
}

/// Waits until the root sees an active cluster with the worker in it (the cluster reports to
/// the root; one that reported before its worker joined offers no virtualization yet).
fn root_ready(s: &Setup) -> Result<(), String> {
    let auth = format!("Bearer {}", s.token);
    wait_for(
        "an active cluster with a worker at the root",
        Duration::from_secs(40),
        || {
            ureq::get(&s.orch.root_url("/api/clusters/active"))
                .set("Authorization", &auth)
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .is_some_and(|v| {
                    v.as_array().is_some_and(|a| {
                        a.iter().any(|c| {
                            c["active_nodes"].as_u64() >= Some(1)
                                && c["virtualization"]
                                    .as_array()
                                    .is_some_and(|v| !v.is_empty())
                        })
                    })
                })
        },
    )
}

/// Instance addresses in a worker's /26 subnet (64 minus network, bridge and broadcast).
const OVERLAY_INSTANCES_PER_WORKER: usize = 61;

/// The worker's RSS with `n` instances running, next to its RSS with none.
struct RssAt {
    n: usize,
    rss: Option<f64>,
    rss0: Option<f64>,
    threads: u64,
    net_note: String,
}

/// Where a worker runs its instances: the containerd namespace, and the job's name.
struct Place<'a> {
    ctr: &'a Ctr,
    ns: &'a str,
    job: &'a str,
}

/// Deletes instance `n` and waits until the root no longer lists it and its container has left
/// containerd, so the next deploy does not share the worker with a teardown.
fn undeploy_wait(orch: &Orch, token: &str, sid: &str, n: u64, at: &Place) -> Result<(), String> {
    let auth = format!("Bearer {token}");
    ureq::delete(&orch.root_url(&format!("/api/service/{sid}/instance/{n}")))
        .set("Authorization", &auth)
        .call()
        .map_err(|e| procs::http_err("DELETE instance", e))?;
    wait_for(
        &format!("instance {n} to be undeployed"),
        Duration::from_secs(30),
        || {
            ureq::get(&orch.root_url(&format!("/api/service/{sid}")))
                .set("Authorization", &auth)
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .is_some_and(|job| {
                    job["instance_list"].as_array().is_some_and(|l| {
                        !l.iter().any(|i| i["instance_number"].as_u64() == Some(n))
                    })
                })
        },
    )?;
    let id = format!("{}.instance.{n}", at.job);
    wait_for(
        &format!("{id} to leave containerd"),
        Duration::from_secs(30),
        || at.ctr.containers(at.ns).is_ok_and(|c| !c.contains(&id)),
    )
}

/// Deploys instances one after the other and samples the worker's RSS when `counts` of them
/// run; all are undeployed again at the end.
fn pile_up(
    s: &Setup,
    sid: &str,
    at: &Place,
    counts: &[usize],
    net_note: &str,
) -> Result<Vec<RssAt>, String> {
    let mut out = Vec::new();
    let Some(&most) = counts.iter().max() else {
        return Ok(out);
    };
    let fail = |e: String| format!("{e}\n--- NodeEngine log:\n{}", procs::tail(&s.ne.log, 20));
    let rss0 = rss_now(s.ne.pid(), Duration::from_secs(2));
    let mut numbers = Vec::new();
    for k in 1..=most {
        numbers.push(deploy_once(&s.orch, &s.token, sid).map_err(fail)?.n);
        if counts.contains(&k) {
            out.push(RssAt {
                n: k,
                rss: rss_now(s.ne.pid(), Duration::from_secs(3)),
                rss0,
                threads: procfs::threads(s.ne.pid()).unwrap_or(0),
                net_note: net_note.to_string(),
            });
        }
    }
    for n in numbers {
        undeploy_wait(&s.orch, &s.token, sid, n, at).map_err(fail)?;
    }
    Ok(out)
}

fn rss_now(pid: u32, settle: Duration) -> Option<f64> {
    // a few samples after the last deploy settles: the median, in KiB
    let w = procfs::sample(&[pid], settle, Duration::from_millis(500), || false);
    percentile(&w[0].rss_kib(), 50.0)
}

pub fn deploy(orch_bin: &Path, worker_bin: &Path, fixture: &Path, o: &Opts) -> Result<(), String> {
    let fx = fixture_env(fixture)?;
    let ctr = Ctr::new(&fx)?;
    let dir = TempDir::new("deploy")?;
    let bare = ctr_runs(&ctr, o.deploy_runs)?;
    let (c50, c95) = (percentile(&bare, 50.0), percentile(&bare, 95.0));
    append(
        Record::new(
            SECTION_DEPLOY,
            "bare `ctr run -d` of the cached fixture image, p50",
            c50,
            "ms",
        )
        .notes(format!(
            "{} runs, p95 {:.1} ms: create the container and start its task (ctr's own process start included), the floor the worker is measured against",
            bare.len(),
            c95.unwrap_or(f64::NAN)
        )),
    )
    .map_err(|e| e.to_string())?;
    let mut plots = vec![cdf("bare ctr run -d (baseline)", &bare)];

    let worker_ns = "oakbench-worker";
    ctr.pull(worker_ns)?;
    let mut extra = vec![("OAK_CONTAINERD_NAMESPACE", worker_ns.to_string())];
    for k in [
        "OAK_CONTAINERD_SOCKET",
        "OAK_INSECURE_REGISTRIES",
        "OAK_CONTAINERD_SNAPSHOTTER",
    ] {
        if let Some(v) = fx.get(k) {
            extra.push((k, v.clone()));
        }
    }
    let net = WorkerNet::new('d')?;
    let mut s = setup(orch_bin, worker_bin, dir.path(), &net, "auto", &extra)?;
    root_ready(&s)?;
    let overlay = overlay_up(&net);
    let sid = create_service(&s.orch, &s.token, &ctr.image)?;
    let (seen, stop_obs) = observer(s.orch.mqtt)?;
    let job_name = "bench.b.probe.b";
    let place = Place {
        ctr: &ctr,
        ns: worker_ns,
        job: job_name,
    };
    let fail =
        |e: String, ne: &Proc| format!("{e}\n--- NodeEngine log:\n{}", procs::tail(&ne.log, 20));

    // 1. no added delay: end to end and worker side
    let report = Duration::from_secs(2);
    let mut phase = Phase(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut e2e: Vec<Timed> = Vec::new();
    for _ in 0..o.deploy_runs {
        std::thread::sleep(phase.next(report));
        let t = deploy_once(&s.orch, &s.token, &sid).map_err(|e| fail(e, &s.ne))?;
        undeploy_wait(&s.orch, &s.token, &sid, t.n, &place).map_err(|e| fail(e, &s.ne))?;
        e2e.push(t);
    }
    std::thread::sleep(Duration::from_millis(300));
    let worker_ms: Vec<f64> = {
        let m = seen.lock().map_err(|_| "observer lock poisoned")?;
        e2e.iter()
            .filter_map(|t| match m.get(&(job_name.to_string(), t.n)) {
                Some((Some(d), Some(r))) if r >= d => {
                    Some(r.duration_since(*d).as_secs_f64() * 1e3)
                }
                _ => None,
            })
            .collect()
    };
    // 2. the same with 250 ms more round trip between worker and cluster
    s.ne.check_alive()?;
    s.relay.set_rtt(250);
    let mut e2e_delay: Vec<Timed> = Vec::new();
    for _ in 0..o.netem_runs {
        std::thread::sleep(phase.next(report));
        let t = deploy_once(&s.orch, &s.token, &sid).map_err(|e| fail(e, &s.ne))?;
        undeploy_wait(&s.orch, &s.token, &sid, t.n, &place).map_err(|e| fail(e, &s.ne))?;
        e2e_delay.push(t);
    }
    s.relay.set_rtt(0);
    s.ne.check_alive()?;
    stop_obs.store(true, std::sync::atomic::Ordering::Relaxed);
    // 3. RSS as instances pile up, with the overlay as far as a worker's /26 instance subnet
    // holds them, beyond that on a worker with the network off.
    let mut rss_at: Vec<RssAt> = Vec::new();
    let (with_overlay, without): (Vec<usize>, Vec<usize>) = o
        .instance_counts
        .iter()
        .partition(|&&n| n <= OVERLAY_INSTANCES_PER_WORKER);
    if overlay {
        rss_at.extend(pile_up(
            &s,
            &sid,
            &place,
            &with_overlay,
            "overlay on (OAK_NETWORK=auto)",
        )?);
    }
    drop(s);
    if !without.is_empty() {
        extra.push(("OAK_CONTAINERD_NAMESPACE", "oakbench-off".to_string()));
        ctr.pull("oakbench-off")?;
        let off_dir = dir.path().join("off");
        std::fs::create_dir_all(&off_dir).map_err(|e| format!("{}: {e}", off_dir.display()))?;
        let s = setup(orch_bin, worker_bin, &off_dir, &net, "off", &extra)?;
        root_ready(&s)?;
        let sid = create_service(&s.orch, &s.token, &ctr.image)?;
        let note = format!(
            "network off (OAK_NETWORK=off): a worker's /26 instance subnet holds {OVERLAY_INSTANCES_PER_WORKER} instances"
        );
        let place = Place {
            ctr: &ctr,
            ns: "oakbench-off",
            job: job_name,
        };
        rss_at.extend(pile_up(&s, &sid, &place, &without, &note)?);
    }

    let net_note = if overlay {
        "overlay on (OAK_NETWORK=auto)"
    } else {
        "OAK_NETWORK=auto but the overlay did not come up"
    };
    let p = |v: &[f64], q: f64| percentile(v, q);
    let running: Vec<f64> = e2e.iter().map(|t| t.running_ms).collect();
    let created: Vec<f64> = e2e.iter().map(|t| t.created_ms).collect();
    let running_d: Vec<f64> = e2e_delay.iter().map(|t| t.running_ms).collect();
    let created_d: Vec<f64> = e2e_delay.iter().map(|t| t.created_ms).collect();
    append(
        Record::new(
            SECTION_DEPLOY,
            "end to end POST instance → RUNNING at the root, p50",
            p(&running, 50.0),
            "ms",
        )
        .baseline("bare ctr run -d p50", c50)
        .goal("le", 500.0, "p50 ≤ 0.5 s")
        .notes(format!(
            "{} deploys of the cached image, each after a random pause within the worker's 2 s report interval; p95 {:.1} ms; RUNNING is set by the cluster when the instance first appears in the worker's jobs/resources report (worker-protocol §5.2), which the worker sends at once when a task starts instead of at the next 2 s tick; root polled every 3 ms; worker in its own netns behind a veth, {net_note}",
            running.len(),
            p(&running, 95.0).unwrap_or(f64::NAN)
        )),
    )
    .map_err(|e| e.to_string())?;
    append(
        Record::new(
            SECTION_DEPLOY,
            "end to end POST instance → CREATED at the root (task started), p50",
            p(&created, 50.0),
            "ms",
        )
        .baseline("bare ctr run -d p50", c50)
        .notes(format!(
            "same deploys; p95 {:.1} ms; CREATED is the worker's report once the task started, forwarded by the cluster to the root",
            p(&created, 95.0).unwrap_or(f64::NAN)
        )),
    )
    .map_err(|e| e.to_string())?;
    append(
        Record::new(
            SECTION_DEPLOY,
            "worker-side deploy time (deploy message → CREATED, task started), p50",
            p(&worker_ms, 50.0),
            "ms",
        )
        .baseline("bare ctr run -d p50", c50)
        .notes(format!(
            "{} of {} deploys seen by a passive subscriber on the cluster's broker; p95 {:.1} ms",
            worker_ms.len(),
            e2e.len(),
            p(&worker_ms, 95.0).unwrap_or(f64::NAN)
        )),
    )
    .map_err(|e| e.to_string())?;
    for q in [50.0, 95.0] {
        let v = p(&worker_ms, q).zip(p(&bare, q)).map(|(a, b)| a - b);
        let mut r = Record::new(
            SECTION_DEPLOY,
            &format!("worker-side overhead over bare ctr run, p{q}"),
            v,
            "ms",
        )
        .baseline(&format!("bare ctr run -d p{q}"), p(&bare, q));
        if q == 50.0 {
            r = r.goal("le", 10.0, "p50 ≤ 10 ms");
        }
        append(r.notes(format!(
            "worker-side deploy time p{q} minus bare `ctr run -d` p{q}; the worker also writes its state, sets up logs and cgroup, {net_note}, and reports over MQTT; ctr pays its own process start"
        )))
        .map_err(|e| e.to_string())?;
    }
    let added = p(&running_d, 50.0)
        .zip(p(&running, 50.0))
        .map(|(a, b)| (a - b) / 1e3);
    let added_created = p(&created_d, 50.0)
        .zip(p(&created, 50.0))
        .map(|(a, b)| a - b);
    append(
        Record::new(
            SECTION_DEPLOY,
            "added end-to-end deploy time with 250 ms delay worker↔cluster",
            added,
            "s",
        )
        .baseline("the added round trip itself", Some(0.25))
        .goal("le", 0.6, "≤ 0.6 s more")
        .notes(format!(
            "POST → RUNNING p50 over {} deploys with the round trip worker↔cluster (HTTP and MQTT) 250 ms longer = {:.0} ms, minus the p50 without delay; POST → CREATED grows by {:.0} ms (p50); a userspace delay line (125 ms each way) on the worker's veth stands in for netem, which this kernel lacks",
            running_d.len(),
            p(&running_d, 50.0).unwrap_or(f64::NAN),
            added_created.unwrap_or(f64::NAN)
        )),
    )
    .map_err(|e| e.to_string())?;
    plots.push(cdf("worker side (deploy msg → CREATED)", &worker_ms));
    plots.push(cdf("POST instance → CREATED at the root", &created));
    plots.push(cdf("POST instance → RUNNING at the root", &running));
    plots.push(cdf("same, +250 ms round trip worker↔cluster", &running_d));

    let mib = |v: Option<f64>| v.map(|k| k / 1024.0);
    for RssAt {
        n,
        rss,
        rss0,
        threads,
        net_note,
    } in &rss_at
    {
        let per = rss.zip(*rss0).map(|(a, b)| (a - b) / *n as f64);
        let mut r = Record::new(
            SECTION_FP,
            &format!("NodeEngine RSS with {n} running instances"),
            mib(*rss),
            "MiB",
        )
        .baseline("same worker, no instances (this run)", mib(*rss0));
        if *n == 20 {
            r = r.goal("le", 8.0, "≤ 8 MiB (#4)");
        }
        append(r.notes(format!(
            "median of 0.5 s samples over 3 s after the {n}th deploy; {net_note}; {threads} threads at the end"
        )))
        .map_err(|e| e.to_string())?;
        append(
            Record::new(
                SECTION_FP,
                &format!("NodeEngine RSS per running instance (at {n})"),
                per,
                "KiB",
            )
            .goal("le", 64.0, "≤ 64 KiB more per instance")
            .notes("(RSS with n instances − RSS with none) / n, same run"),
        )
        .map_err(|e| e.to_string())?;
    }
    results::save_plot(&Plot {
        id: "deploy-latency".into(),
        title: "Deploy latency (CDF)".into(),
        x_label: "ms".into(),
        y_label: "fraction".into(),
        kind: "cdf".into(),
        series: plots,
    })
    .map_err(|e| e.to_string())
}
