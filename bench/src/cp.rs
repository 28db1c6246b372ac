//! Control plane: simulated workers against `orch-lite cluster`, and the same simulator against
//! a bare mosquitto plus a zero-cost "cluster" (an echo client subscribed to the cluster's
//! topics) as the broker-only baseline. Also the root API under 100 clusters and 10,000
//! services, and `orch-lite all` idle RSS.
//!
//! Observables: CPU and RSS of the broker/orchestrator process from /proc; message handling
//! latency = a probe's `nodes/<unknown>/information` until the cluster's `control/error` answer
//! arrives (the same round trip through the echo client on mosquitto); scheduling latency =
//! `POST /api/service/<job>/0` (as the root sends it) until the deploy message reaches the
//! simulated worker it was placed on (a `direct` constraint picks a worker served by a quiet
//! thread, so the simulator's own load does not add to the figure).

use crate::procfs;
use crate::procs::{self, wait_for, Orch, Proc, TempDir};
use crate::results::{self, append, cdf, Plot, Record, Series};
use crate::stats::{max, percentile};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use worker::protocol::{self, NodeInfo, ResourcesReport};

const SECTION: &str = "control-plane";
const PROBE_NODE: &str = "sim-probe";

pub struct Opts {
    pub sizes: Vec<usize>,
    pub interval: Duration,
    pub window: Duration,
    pub probes: usize,
}

fn node_doc(name: &str) -> NodeInfo {
    NodeInfo {
        host: name.into(),
        ip: "127.0.0.1".into(),
        port: "3000".into(),
        // the probe worker takes every scheduling probe (`direct`): room for all of them
        vcpus: if name == PROBE_NODE { 256 } else { 4 },
        memory: if name == PROBE_NODE { 262_144 } else { 3800 },
        cpu_percent: 3.5,
        memory_percent: 21.0,
        architecture: "amd64".into(),
        virtualization: Some(vec!["docker".into()]),
        supported_addons: Some(vec![]),
        csi_drivers: Some(vec![]),
        machine_id: Some(name.into()),
        ..NodeInfo::default()
    }
}

/// The `information` report as the worker sends it (dynamic fields, static scalars kept);
/// `name` is the node name it registered with (its capacity comes from it).
fn information(name: &str) -> String {
    let mut n = node_doc(name);
    n.machine_id = None;
    serde_json::to_string(&n).expect("NodeInfo serializes")
}

/// Registers `names` over HTTP on `threads` threads; returns the node ids in order.
fn register_all(api: u16, names: &[String], threads: usize) -> Result<Vec<String>, String> {
    let url = format!("http://127.0.0.1:{api}{}", protocol::REGISTER_PATH);
    let chunks: Vec<Vec<(usize, String)>> = (0..threads)
        .map(|t| {
            names
                .iter()
                .enumerate()
                .filter(|(i, _)| i % threads == t)
                .map(|(i, n)| (i, n.clone()))
                .collect()
        })
        .collect();
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let url = url.clone();
            std::thread::spawn(move || -> Result<Vec<(usize, String)>, String> {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .build();
                let mut out = Vec::new();
                for (i, name) in chunk {
                    let body = serde_json::to_value(node_doc(&name)).map_err(|e| e.to_string())?;
                    // 503 until the cluster's MQTT subscriptions are in place: wait, as a
                    // worker does.
                    let mut tries = 0;
                    let res = loop {
                        match agent.post(&url).send_json(body.clone()) {
                            Err(ureq::Error::Status(503, _)) if tries < 200 => {
                                tries += 1;
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            r => break r,
                        }
                    };
                    let ans: protocol::RegisterAnswer = res
                        .map_err(|e| format!("register {name}: {e}"))?
                        .into_json()
                        .map_err(|e| format!("register {name}: {e}"))?;
                    ans.validate()?;
                    out.push((i, ans.id));
                }
                Ok(out)
            })
        })
        .collect();
    let mut ids = vec![String::new(); names.len()];
    for h in handles {
        for (i, id) in h.join().map_err(|_| "registration thread panicked")?? {
            ids[i] = id;
        }
    }
    Ok(ids)
}

struct Shared {
    stop: AtomicBool,
    connected: AtomicU64,
    published: AtomicU64,
    deploys: AtomicU64,
}

/// A client with TCP_NODELAY: without it the probes measure Nagle + delayed ACK (40 ms).
fn mqtt_client(client_id: &str, port: u16, cap: usize) -> (AsyncClient, EventLoop) {
    let (c, mut el) = AsyncClient::new(mqtt_opts(client_id, port), cap);
    el.network_options.set_tcp_nodelay(true);
    (c, el)
}

fn mqtt_opts(client_id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// One simulated worker: reports every `interval` (first one after `phase`), takes deploys,
/// answers them with RUNNING and lists them in `jobs/resources`. Deploy arrivals go to `seen`.
fn sim_worker(
    id: String,
    name: String,
    port: u16,
    interval: Duration,
    phase: Duration,
    sh: Arc<Shared>,
    seen: Option<mpsc::Sender<(String, Instant)>>,
) {
    let (client, mut el) = mqtt_client(&protocol::client_id(&id), port, 16);
    let running: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    {
        let (client, running, sh, id) = (client.clone(), running.clone(), sh.clone(), id.clone());
        tokio::spawn(async move {
            event_loop(&mut el, &client, &id, &running, &sh, seen).await;
        });
    }
    tokio::spawn(async move {
        tokio::time::sleep(phase).await;
        let info = information(&name);
        let mut tick = tokio::time::interval(interval);
        while !sh.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let services = running
                .lock()
                .map(|r| {
                    r.iter()
                        .map(|(j, n)| protocol::InstanceResources {
                            cpu_percent: "0.1".into(),
                            memory_percent: "0.2".into(),
                            disk: "0".into(),
                            logs: String::new(),
                            job_name: j.clone(),
                            virtualization: "docker".into(),
                            instance: *n,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let res = serde_json::to_string(&ResourcesReport { services }).unwrap_or_default();
            let a = client
                .publish(
                    protocol::topic::information(&id),
                    QoS::AtLeastOnce,
                    false,
                    info.clone(),
                )
                .await;
            let b = client
                .publish(
                    protocol::topic::resources(&id),
                    QoS::AtLeastOnce,
                    false,
                    res,
                )
                .await;
            if a.is_ok() && b.is_ok() {
                sh.published.fetch_add(2, Ordering::Relaxed);
            }
        }
        let _ = client.disconnect().await;
    });
}

async fn event_loop(
    el: &mut EventLoop,
    client: &AsyncClient,
    id: &str,
    running: &Mutex<Vec<(String, u64)>>,
    sh: &Shared,
    seen: Option<mpsc::Sender<(String, Instant)>>,
) {
    while !sh.stop.load(Ordering::Relaxed) {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                sh.connected.fetch_add(1, Ordering::Relaxed);
                let _ = client
                    .subscribe(protocol::topic::deploy(id), QoS::AtLeastOnce)
                    .await;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let at = Instant::now();
                if let Ok(d) = protocol::DeployCommand::decode(&p.payload) {
                    sh.deploys.fetch_add(1, Ordering::Relaxed);
                    if let Some(s) = &seen {
                        let _ = s.send((d.job_name.clone(), at));
                    }
                    if let Ok(mut r) = running.lock() {
                        r.push((d.job_name.clone(), d.instance_number));
                    }
                    let st = protocol::JobStatus {
                        sname: d.job_name,
                        status: protocol::Status::Running,
                        status_detail: String::new(),
                        instance: d.instance_number,
                        publicip: "127.0.0.1".into(),
                    };
                    let _ = client
                        .publish(
                            protocol::topic::job(id),
                            QoS::AtLeastOnce,
                            false,
                            serde_json::to_string(&st).unwrap_or_default(),
                        )
                        .await;
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The zero-cost cluster of the baseline: subscribes to what the cluster subscribes to and
/// answers a probe's `information` with `control/error`, as orch-lite does for unknown nodes.
fn echo_cluster(port: u16, sh: Arc<Shared>) {
    let (client, mut el) = mqtt_client("bench-echo-cluster", port, 1024);
    tokio::spawn(async move {
        while !sh.stop.load(Ordering::Relaxed) {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in [
                        "nodes/+/information",
                        "nodes/+/job",
                        "nodes/+/jobs/resources",
                        "nodes/+/net/#",
                    ] {
                        let _ = client.subscribe(f, QoS::AtLeastOnce).await;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some((id, protocol::topic::Kind::Information)) =
                        protocol::topic::parse(&p.topic)
                    {
                        if id.starts_with("probe-") {
                            let _ = client.try_publish(
                                protocol::topic::error(id),
                                QoS::AtLeastOnce,
                                false,
                                "{\"message\":\"echo\"}",
                            );
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
}

/// Message probes: publish `nodes/probe-<k>/information`, wait for `control/error`. Returns ms.
async fn message_probes(port: u16, n: usize, spacing: Duration) -> Vec<f64> {
    let (client, mut el) = mqtt_client("bench-probe", port, 64);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel::<()>();
    let c2 = client.clone();
    let task = tokio::spawn(async move {
        let mut sub_tx = Some(sub_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c2
                        .subscribe("nodes/+/control/error", QoS::AtLeastOnce)
                        .await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = sub_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), Instant::now()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let mut out = Vec::new();
    if tokio::time::timeout(Duration::from_secs(10), sub_rx)
        .await
        .is_err()
    {
        task.abort();
        return out;
    }
    let payload = information("probe");
    for k in 0..n {
        let id = format!("probe-{k}");
        let want = protocol::topic::error(&id);
        let t0 = Instant::now();
        if client
            .publish(
                protocol::topic::information(&id),
                QoS::AtMostOnce,
                false,
                payload.clone(),
            )
            .await
            .is_err()
        {
            break;
        }
        let deadline = t0 + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some((topic, at))) if topic == want => {
                    out.push(at.duration_since(t0).as_secs_f64() * 1e3);
                    break;
                }
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
        tokio::time::sleep(spacing).await;
    }
    task.abort();
    out
}

pub struct Run {
    pub cpu_percent: Option<f64>,
    pub rss_p95_kib: Option<f64>,
    pub rss_max_kib: Option<f64>,
    pub msg_ms: Vec<f64>,
    pub sched_ms: Vec<f64>,
    pub msgs_per_s: f64,
    /// The cluster's own scheduling-decision time over the window: (p50, p99, max bucket bounds
    /// in ms, decisions).
    pub decision: Option<(Option<f64>, Option<f64>, u64)>,
    /// The second sampled process (the external broker), if any: CPU % and RSS p95.
    pub other: Option<(Option<f64>, Option<f64>)>,
    pub notes: String,
}

/// Runs the simulator against one target (orch-lite when `api` is set, else the mosquitto
/// baseline) and samples `pids` over the window: the target, then the external broker if any.
fn simulate(pids: &[u32], mqtt: u16, api: Option<u16>, n: usize, o: &Opts) -> Result<Run, String> {
    let threads = 2usize;
    let names: Vec<String> = (0..n).map(|i| format!("sim-{i:05}")).collect();
    let t_reg = Instant::now();
    let (ids, probe_id) = match api {
        Some(api) => {
            let ids = register_all(api, &names, 4)?;
            let probe = register_all(api, &[PROBE_NODE.to_string()], 1)?.remove(0);
            (ids, Some(probe))
        }
        None => (names.clone(), None),
    };
    let reg_s = t_reg.elapsed().as_secs_f64();
    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        connected: AtomicU64::new(0),
        published: AtomicU64::new(0),
        deploys: AtomicU64::new(0),
    });
    let interval = o.interval;
    let mut workers = Vec::new();
    for t in 0..threads {
        let mine: Vec<String> = ids.iter().skip(t).step_by(threads).cloned().collect();
        let sh = sh.clone();
        workers.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let count = mine.len().max(1) as u32;
                for (i, id) in mine.into_iter().enumerate() {
                    let phase = interval * (i as u32) / count;
                    sim_worker(id.clone(), id, mqtt, interval, phase, sh.clone(), None);
                    // ~1000 connections/s per thread: a burst of 10,000 SYNs overflows backlogs
                    if i % 8 == 7 {
                        tokio::time::sleep(Duration::from_millis(8)).await;
                    }
                }
                while !sh.stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            Ok::<(), std::io::Error>(())
        }));
    }
    // The quiet thread: probe worker (orch-lite) or echo cluster (baseline), and the probes.
    let (seen_tx, seen_rx) = mpsc::channel::<(String, Instant)>();
    let (msg_tx, msg_rx) = mpsc::channel::<Vec<f64>>();
    let quiet = {
        let (sh, probe_id) = (sh.clone(), probe_id.clone());
        let probes = o.probes;
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                match &probe_id {
                    Some(p) => sim_worker(
                        p.clone(),
                        PROBE_NODE.into(),
                        mqtt,
                        interval,
                        Duration::ZERO,
                        sh.clone(),
                        Some(seen_tx),
                    ),
                    None => echo_cluster(mqtt, sh.clone()),
                }
                // wait for the start signal: the window opens once every worker is connected
                while sh.connected.load(Ordering::Relaxed) < u64::MAX / 2
                    && !sh.stop.load(Ordering::Relaxed)
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if !sh.stop.load(Ordering::Relaxed) {
                    let v = message_probes(mqtt, probes, Duration::from_millis(150)).await;
                    let _ = msg_tx.send(v);
                }
                while !sh.stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            Ok::<(), std::io::Error>(())
        })
    };
    let expect = n as u64 + u64::from(probe_id.is_some());
    let connect_timeout = Duration::from_secs(30 + n as u64 / 200);
    let conn = wait_for("simulated workers to connect", connect_timeout, || {
        sh.connected.load(Ordering::Relaxed) >= expect
    });
    let stop_all = |sh: &Shared| sh.stop.store(true, Ordering::Relaxed);
    if let Err(e) = conn {
        stop_all(&sh);
        return Err(format!(
            "{e} ({} of {expect})",
            sh.connected.load(Ordering::Relaxed)
        ));
    }
    // one full report round, so every worker is active and the cluster is in steady state
    std::thread::sleep(interval + Duration::from_millis(500));
    sh.connected.fetch_add(u64::MAX / 2, Ordering::Relaxed); // start the probes
    let pub0 = sh.published.load(Ordering::Relaxed);
    // scheduling probes (orch-lite): POSTs from this thread, spaced through the window
    let sampler = std::thread::spawn({
        let window = o.window;
        let pids = pids.to_vec();
        move || procfs::sample(&pids, window, Duration::from_millis(500), || false)
    });
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut notes = format!("registration of {n} workers took {reg_s:.1} s");
    let hist0 = api.and_then(sched_histogram);
    let t_win = Instant::now();
    if let Some(api) = api {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build();
        let spacing = o.window / (o.probes as u32 + 1);
        for k in 0..o.probes {
            std::thread::sleep(spacing.min(Duration::from_millis(400)));
            let job = format!("bench.b.svc{k}.b");
            let job_id = format!("benchjob{k:04}");
            let doc = json!({"_id": job_id, "job_name": job, "image": "docker.io/library/busybox:latest",
                "virtualization": "docker", "vcpus": 0.1, "memory": 16, "port": "",
                "constraints": [{"type": "direct", "node": PROBE_NODE}],
                "instance_list": [{"instance_number": 0, "status": "CLUSTER_SCHEDULED"}]});
            let t0 = Instant::now();
            let r = agent
                .post(&format!("http://127.0.0.1:{api}/api/service/{job_id}/0"))
                .send_json(doc);
            if let Err(e) = r {
                notes.push_str(&format!("; deploy POST failed: {e}"));
                break;
            }
            sent.insert(job, t0);
        }
    }
    let rest = o.window.saturating_sub(t_win.elapsed());
    std::thread::sleep(rest);
    let pub1 = sh.published.load(Ordering::Relaxed);
    let hist1 = api.and_then(sched_histogram);
    let decision = hist0.zip(hist1).map(|(a, b)| {
        let (p50, _) = hist_percentile(&a, &b, 50.0);
        let (p99, count) = hist_percentile(&a, &b, 99.0);
        (p50, p99, count)
    });
    let win = sampler.join().map_err(|_| "sampler panicked")?;
    let msg_ms = msg_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_default();
    stop_all(&sh);
    for w in workers {
        let _ = w.join();
    }
    let _ = quiet.join();
    let mut sched_ms = Vec::new();
    while let Ok((job, at)) = seen_rx.try_recv() {
        if let Some(t0) = sent.remove(&job) {
            sched_ms.push(at.duration_since(t0).as_secs_f64() * 1e3);
        }
    }
    if !sent.is_empty() {
        // say why, from the cluster's own view of one of them
        let why = api
            .and_then(|api| {
                ureq::get(&format!("http://127.0.0.1:{api}/api/cluster/status"))
                    .call()
                    .ok()
            })
            .and_then(|r| r.into_json::<serde_json::Value>().ok())
            .and_then(|st| {
                st["instances"]
                    .as_array()?
                    .iter()
                    .find(|i| i["job_name"].as_str().is_some_and(|j| sent.contains_key(j)))
                    .map(|i| {
                        format!(
                            "{} {}",
                            i["status"].as_str().unwrap_or("?"),
                            i["status_detail"].as_str().unwrap_or("")
                        )
                    })
            })
            .unwrap_or_default();
        notes.push_str(&format!(
            "; {} deploys did not reach the worker in the window ({why})",
            sent.len()
        ));
    }
    let other = win
        .get(1)
        .map(|b| (b.cpu_percent, percentile(&b.rss_kib(), 95.0)));
    let w = win.into_iter().next().unwrap_or_default();
    Ok(Run {
        other,
        cpu_percent: w.cpu_percent,
        rss_p95_kib: percentile(&w.rss_kib(), 95.0),
        rss_max_kib: max(&w.rss_kib()),
        msg_ms,
        sched_ms,
        msgs_per_s: (pub1 - pub0) as f64 / o.window.as_secs_f64(),
        decision,
        notes,
    })
}

fn metric(api: u16, name: &str) -> Option<f64> {
    let text = ureq::get(&format!("http://127.0.0.1:{api}/metrics"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The cluster's scheduling-decision histogram: cumulative (upper bound in ms, count) pairs.
fn sched_histogram(api: u16) -> Option<Vec<(f64, u64)>> {
    let text = ureq::get(&format!("http://127.0.0.1:{api}/metrics"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    let prefix = "orch_lite_cluster_schedule_decision_seconds_bucket{le=\"";
    let v: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>().ok()? * 1e3
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    (!v.is_empty()).then_some(v)
}

/// Percentile `p` of the observations between two histogram readings, as the upper bound of the
/// bucket holding it (ms), and the number of observations.
fn hist_percentile(before: &[(f64, u64)], after: &[(f64, u64)], p: f64) -> (Option<f64>, u64) {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before.iter().find(|(l, _)| l == le).map_or(0, |(_, c)| *c);
            (*le, c.saturating_sub(b))
        })
        .collect();
    let total = delta.last().map_or(0, |d| d.1);
    if total == 0 {
        return (None, 0);
    }
    let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
    (delta.iter().find(|(_, c)| *c >= rank).map(|d| d.0), total)
}

pub fn run(orch_bin: &Path, o: &Opts) -> Result<(), String> {
    let nofile = procs::raise_nofile();
    let mut scale_cpu = (
        Series {
            name: "orch-lite cluster".into(),
            ..Default::default()
        },
        Series {
            name: "mosquitto (baseline)".into(),
            ..Default::default()
        },
    );
    let mut scale_rss = scale_cpu.clone();
    let mut ext_cpu = Series {
        name: "orch-lite cluster on external mosquitto (cluster process only)".into(),
        ..Default::default()
    };
    let mut ext_rss = ext_cpu.clone();
    let mut cdfs = Vec::new();
    for &n in &o.sizes {
        if n as u64 + 500 > nofile {
            return Err(format!(
                "open-files limit {nofile} is too low for {n} workers: raise ulimit -n"
            ));
        }
        let dir = TempDir::new(&format!("cp{n}"))?;
        // baseline: mosquitto + echo cluster
        let base = {
            let (p, port) = procs::mosquitto(dir.path())?;
            let r = simulate(&[p.pid()], port, None, n, o)?;
            drop::<Proc>(p);
            r
        };
        // orch-lite cluster, embedded broker
        let orch = Orch::start(
            orch_bin,
            "cluster",
            dir.path(),
            &[("OAK_NODE_TIMEOUT_MS", "30000".into())],
        )?;
        let mut r = simulate(&[orch.proc.pid()], orch.mqtt, Some(orch.cluster_api), n, o)?;
        for (m, what) in [
            (
                "orch_lite_cluster_workers_active",
                "active workers at the end",
            ),
            (
                "orch_lite_cluster_publishes_dropped_total",
                "publishes dropped",
            ),
            (
                "orch_lite_cluster_malformed_information_total",
                "malformed information",
            ),
        ] {
            if let Some(v) = metric(orch.cluster_api, m) {
                r.notes.push_str(&format!("; {what}: {v}"));
            }
        }
        drop(orch);
        // orch-lite cluster on an external mosquitto (OAK_MQTT_URL): the broker's per-connection
        // memory is then mosquitto's, not the cluster process's.
        let ext = {
            let ext_dir = dir.path().join("external");
            let (mp, mport) = procs::mosquitto(&ext_dir)?;
            let orch = Orch::start(
                orch_bin,
                "cluster",
                &ext_dir,
                &[
                    ("OAK_NODE_TIMEOUT_MS", "30000".into()),
                    ("OAK_MQTT_URL", format!("mqtt://127.0.0.1:{mport}")),
                ],
            )?;
            let r = simulate(
                &[orch.proc.pid(), mp.pid()],
                mport,
                Some(orch.cluster_api),
                n,
                o,
            )?;
            drop(orch);
            drop::<Proc>(mp);
            r
        };
        let label = format!("{n} workers");
        let note = format!(
            "{} reports/s delivered (orch-lite), {:.0} (mosquitto); {}",
            r.msgs_per_s.round(),
            base.msgs_per_s,
            r.notes
        );
        let core = |v: Option<f64>| v.map(|c| c / 100.0);
        append(
            Record::new(
                SECTION,
                &format!(
                    "orch-lite cluster CPU, {label} reporting every {} s",
                    o.interval.as_secs_f64()
                ),
                core(r.cpu_percent),
                "cores",
            )
            .baseline("mosquitto alone (same simulator)", core(base.cpu_percent))
            .goal("le", 1.0, "≤ 1 core")
            .notes(note.clone()),
        )
        .map_err(|e| e.to_string())?;
        let mib = |v: Option<f64>| v.map(|k| k / 1024.0);
        append(
            Record::new(
                SECTION,
                &format!("orch-lite cluster RSS p95, {label}"),
                mib(r.rss_p95_kib),
                "MiB",
            )
            .baseline("mosquitto alone (same simulator)", mib(base.rss_p95_kib))
            .goal("le", 64.0, "≤ 64 MiB")
            .notes(format!(
                "max {:.1} MiB; embedded rumqttd, whose per-connection buffers are fixed in the crate",
                mib(r.rss_max_kib).unwrap_or(f64::NAN)
            )),
        )
        .map_err(|e| e.to_string())?;
        let (ext_broker_cpu, ext_broker_rss) = ext.other.unwrap_or((None, None));
        let ext_note = format!(
            "orch-lite cluster with OAK_MQTT_URL pointing at a mosquitto of its own; the baseline is that mosquitto, sampled in the same run: together {:.1} MiB and {:.3} cores; {} reports/s delivered; {}",
            mib(ext.rss_p95_kib).unwrap_or(f64::NAN) + mib(ext_broker_rss).unwrap_or(f64::NAN),
            core(ext.cpu_percent).unwrap_or(f64::NAN) + core(ext_broker_cpu).unwrap_or(f64::NAN),
            ext.msgs_per_s.round(),
            ext.notes
        );
        append(
            Record::new(
                SECTION,
                &format!("orch-lite cluster RSS p95 on an external mosquitto, {label}"),
                mib(ext.rss_p95_kib),
                "MiB",
            )
            .baseline("the mosquitto it uses", mib(ext_broker_rss))
            .goal("le", 64.0, "≤ 64 MiB")
            .notes(ext_note.clone()),
        )
        .map_err(|e| e.to_string())?;
        append(
            Record::new(
                SECTION,
                &format!("orch-lite cluster CPU on an external mosquitto, {label}"),
                core(ext.cpu_percent),
                "cores",
            )
            .baseline("the mosquitto it uses", core(ext_broker_cpu))
            .goal("le", 1.0, "≤ 1 core")
            .notes(ext_note),
        )
        .map_err(|e| e.to_string())?;
        append(
            Record::new(
                SECTION,
                &format!("message handling latency p99 on an external mosquitto, {label}"),
                percentile(&ext.msg_ms, 99.0),
                "ms",
            )
            .baseline(
                "mosquitto + zero-cost echo cluster",
                percentile(&base.msg_ms, 99.0),
            )
            .notes(format!("{} probes, as above", ext.msg_ms.len())),
        )
        .map_err(|e| e.to_string())?;
        ext_cpu
            .points
            .push((n as f64, ext.cpu_percent.unwrap_or(f64::NAN)));
        ext_rss
            .points
            .push((n as f64, mib(ext.rss_p95_kib).unwrap_or(f64::NAN)));
        for p in [50.0, 99.0] {
            append(
                Record::new(SECTION, &format!("message handling latency p{p}, {label}"), percentile(&r.msg_ms, p), "ms")
                    .baseline("mosquitto + zero-cost echo cluster", percentile(&base.msg_ms, p))
                    .notes(format!("{} probes (QoS 0): nodes/<unknown>/information → control/error round trip through the broker; the cluster's client sets TCP_NODELAY, rumqttd's accepted sockets do not (not configurable)", r.msg_ms.len())),
            )
            .map_err(|e| e.to_string())?;
        }
        let (d50, d99, decisions) = r.decision.unwrap_or((None, None, 0));
        append(
            Record::new(
                SECTION,
                &format!("scheduling decision time p99 (cluster's own histogram), {label}"),
                d99,
                "ms",
            )
            .goal("le", 1.0, "≤ 1 ms")
            .notes(format!(
                "{decisions} decisions in the window, read from orch_lite_cluster_schedule_decision_seconds in /metrics before and after it (candidate list + placement, under the state lock); p50 ≤ {} ms; values are bucket upper bounds (…, 0.2, 0.5, 1, 2, 5 ms, …)",
                d50.map_or("–".into(), |v| format!("{v}"))
            )),
        )
        .map_err(|e| e.to_string())?;
        append(
            Record::new(SECTION, &format!("scheduling latency p99 seen from outside (POST → deploy at the worker), {label}"), percentile(&r.sched_ms, 99.0), "ms")
                .baseline("broker round trip p99 (mosquitto + echo)", percentile(&base.msg_ms, 99.0))
                .notes(format!(
                    "{} deploys; POST /api/service/<job>/0 → deploy message at the simulated worker (p50 {:.2} ms): includes the HTTP request, the state lock shared with the report handling, and a broker hop, so it bounds the decision from above",
                    r.sched_ms.len(),
                    percentile(&r.sched_ms, 50.0).unwrap_or(f64::NAN)
                )),
        )
        .map_err(|e| e.to_string())?;
        scale_cpu
            .0
            .points
            .push((n as f64, r.cpu_percent.unwrap_or(f64::NAN)));
        scale_cpu
            .1
            .points
            .push((n as f64, base.cpu_percent.unwrap_or(f64::NAN)));
        scale_rss
            .0
            .points
            .push((n as f64, mib(r.rss_p95_kib).unwrap_or(f64::NAN)));
        scale_rss
            .1
            .points
            .push((n as f64, mib(base.rss_p95_kib).unwrap_or(f64::NAN)));
        cdfs.push(cdf(&format!("orch-lite, {label}"), &r.msg_ms));
        cdfs.push(cdf(&format!("mosquitto + echo, {label}"), &base.msg_ms));
        if !r.sched_ms.is_empty() {
            cdfs.push(cdf(
                &format!("scheduling (POST → deploy at worker), {label}"),
                &r.sched_ms,
            ));
        }
    }
    results::save_plot(&Plot {
        id: "cp-cpu".into(),
        title: "Control plane: CPU vs simulated workers".into(),
        x_label: "simulated workers".into(),
        y_label: "% of one core".into(),
        kind: "line".into(),
        series: vec![scale_cpu.0, ext_cpu, scale_cpu.1],
    })
    .map_err(|e| e.to_string())?;
    results::save_plot(&Plot {
        id: "cp-rss".into(),
        title: "Control plane: RSS p95 vs simulated workers".into(),
        x_label: "simulated workers".into(),
        y_label: "MiB".into(),
        kind: "line".into(),
        series: vec![scale_rss.0, ext_rss, scale_rss.1],
    })
    .map_err(|e| e.to_string())?;
    results::save_plot(&Plot {
        id: "cp-latency".into(),
        title: "Control plane: message handling and scheduling latency (CDF)".into(),
        x_label: "ms".into(),
        y_label: "fraction".into(),
        kind: "cdf".into(),
        series: cdfs,
    })
    .map_err(|e| e.to_string())
}
