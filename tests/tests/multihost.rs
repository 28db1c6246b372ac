//! Multi-host end-to-end tests on one machine (issues #8.1-8.3, #5.7): every orchestrator and
//! worker runs in a host of its own, a network namespace on a test LAN ([`e2e::lan`]), each
//! worker with its own containerd (a fixture each: a worker adopts every container in namespace
//! `oakestra` of its containerd, so two workers never share one) and the overlay on, tunnelling
//! to its peers over the LAN from its LAN address (`OAK_PUBLIC_ADDRESS`). Images come from the
//! first fixture's registry, listening on the LAN's gateway address.
//!
//! - M-DOC: `orch-lite all` and three workers; the `clientsrvr` flow with the server scaled to
//!   two instances on different workers, and round robin over both seen from the client. Each
//!   server writes its hostname (`instance-<n>`) into a page the client fetches through the
//!   service IP, so the client's log tells which backend answered. Drills: an undeploy (how long
//!   until the client stops meeting the removed backend) and a scale-out (how long until a new
//!   instance gets traffic).
//! - MDNC: `orch-lite root`, two `orch-lite cluster`s registering with it (shared
//!   `OAK_JOIN_TOKEN`), a worker under each; `direct` constraints put the server under one
//!   cluster and the client under the other, and the client reaches the server through its
//!   service IP (the client's cluster forwards the table query to the root).
//!
//! Needs root (namespaces, containerd). Application namespaces carry the pid: instance
//! namespaces are named after container ids in the machine-wide `/run/netns`.

use e2e::lan::{Host, Lan};
use e2e::root::Root;
use e2e::{binaries, daemons, wait_for, Fixture, Proc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Ports inside the hosts: every host has its own network namespace, so the defaults serve.
const ROOT_PORT: u16 = 10000;
const CLUSTER_PORT: u16 = 10100;
const MQTT_PORT: u16 = 10003;
const STATUS_PORT: u16 = 10190;

/// orch-lite's own default filter: `RUST_LOG=info` would let the broker log every packet.
const ORCH_LOG: &str = "info,rumqttd=off,tracing::span=off";

fn ns() -> String {
    format!("t{}", std::process::id())
}

/// An HTTP server behind `rr_ip` whose page `/who` names the instance (its hostname).
fn server(image: &str, vcpus: u64, rr_ip: &str, constraints: Value) -> Value {
    json!({
        "microserviceID": "",
        "microservice_name": "server",
        "microservice_namespace": ns(),
        "virtualization": "container",
        "cmd": ["sh", "-c", "hostname > /www/who && exec httpd -f -p 80 -h /www"],
        "memory": 64, "vcpus": vcpus, "vgpus": 0, "vtpus": 0,
        "bandwidth_in": 0, "bandwidth_out": 0, "storage": 0,
        "code": image,
        "state": "",
        "port": "",
        "addresses": {"rr_ip": rr_ip},
        "added_files": [],
        "constraints": constraints
    })
}

/// A client fetching `/who` from `rr_ip` every 0.1 s, one new connection (flow) each time.
fn client(image: &str, vcpus: u64, rr_ip: &str, constraints: Value) -> Value {
    json!({
        "microserviceID": "",
        "microservice_name": "client",
        "microservice_namespace": ns(),
        "virtualization": "container",
        "cmd": ["sh", "-c", format!("while true; do timeout 3 wget -q -O - http://{rr_ip}/who || echo fetch-failed; sleep 0.1; done")],
        "memory": 64, "vcpus": vcpus, "vgpus": 0, "vtpus": 0,
        "bandwidth_in": 0, "bandwidth_out": 0, "storage": 0,
        "code": image,
        "state": "",
        "port": "",
        "added_files": [],
        "constraints": constraints
    })
}

fn sla(app: &str, microservices: Vec<Value>) -> Value {
    json!({
        "sla_version": "v2.0",
        "customerID": "Admin",
        "applications": [{
            "applicationID": "",
            "application_name": app,
            "application_namespace": ns(),
            "application_desc": "multi-host client and server",
            "microservices": microservices
        }]
    })
}

/// A worker in its host: `NodeEngine` with the overlay on, its own fixture's containerd, images
/// from `registry`.
struct Worker {
    // Fields drop in order: the worker before its containerd.
    proc: Option<Proc>,
    fx: Fixture,
    host: Host,
    name: String,
    logs: PathBuf,
    /// SIGKILLed by a drill: its overlay is left as a crash leaves it.
    killed: bool,
}

impl Worker {
    fn start(
        bin: &Path,
        work: &Path,
        host: Host,
        fx: Fixture,
        cluster: &Host,
        registry: &str,
        join_token: Option<&str>,
    ) -> Result<Worker, String> {
        let name = format!("{}-{}", host.name, std::process::id());
        let status = format!("{}:{STATUS_PORT}", host.addr);
        let cmd = daemons::worker(
            bin,
            work,
            &name,
            &cluster.addr.to_string(),
            CLUSTER_PORT,
            &status,
            &fx,
        );
        let mut cmd = host.wrap(&cmd);
        cmd.env("OAK_NETWORK", "auto")
            .env("OAK_PUBLIC_ADDRESS", host.addr.to_string())
            .env("OAK_INSECURE_REGISTRIES", registry);
        if let Some(t) = join_token {
            cmd.env("OAK_JOIN_TOKEN", t);
        }
        let proc = Proc::spawn("NodeEngine", &mut cmd, work.join(format!("{name}.log")))?;
        Ok(Worker {
            logs: work.join(&name).join("logs"),
            host,
            fx,
            name,
            proc: Some(proc),
            killed: false,
        })
    }

    fn holds(&self, container: &str) -> bool {
        self.fx
            .containers("oakestra")
            .is_ok_and(|l| l.iter().any(|c| c == container))
    }

    fn tail(&self) -> String {
        self.proc.as_ref().map(|p| p.tail(25)).unwrap_or_default()
    }

    /// The crash of a drill: the worker dies, its containerd and instances live on.
    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        self.killed = true;
    }

    /// SIGTERM and a clean exit; then nothing of the overlay is left in its host but what its
    /// running instances use.
    fn stop(&mut self) -> Result<(), String> {
        if let Some(mut p) = self.proc.take() {
            let st = p.stop()?;
            if !st.success() {
                return Err(format!("{} exited with {st}:\n{}", self.name, p.tail(20)));
            }
        }
        if self.killed {
            return Ok(());
        }
        // A stopped worker leaves its running instances wired (the next start re-attaches
        // them): only the bridge and the veths of instances still in its containerd may stay.
        let links = self.host.run(&["ip", "-o", "link", "show"])?;
        let left: Vec<&str> = links
            .lines()
            .filter(|l| !l.contains(": lo:") && !l.contains(": eth0@"))
            .filter(|l| !l.contains(": goProxyBridge:"))
            .filter(|l| {
                let peer = l.split("link-netns ").nth(1).unwrap_or("").trim();
                !(l.contains("master goProxyBridge") && !peer.is_empty() && self.holds(peer))
            })
            .collect();
        if !left.is_empty() {
            return Err(format!(
                "{} left links of no running instance: {left:#?}",
                self.name
            ));
        }
        Ok(())
    }
}

impl Drop for Worker {
    /// Also on failure: politely, so the worker removes its instance namespaces (a SIGKILL
    /// would leave them in /run/netns).
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.stop();
        }
    }
}

/// Removes instance namespaces named `<prefix>…` when dropped: the safety net for a worker
/// that could not clean up (killed, or its stop timed out).
struct NetnsSweep(String);

impl Drop for NetnsSweep {
    fn drop(&mut self) {
        for n in ip_netns().into_iter().filter(|n| n.starts_with(&self.0)) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &n])
                .output();
        }
    }
}

/// Which worker holds a container (index into `workers`).
fn placed_on(workers: &[Worker], container: &str) -> Result<usize, String> {
    let on: Vec<usize> = (0..workers.len())
        .filter(|&i| workers[i].holds(container))
        .collect();
    match on.as_slice() {
        [i] => Ok(*i),
        _ => Err(format!(
            "{container} is on workers {on:?}, expected exactly one"
        )),
    }
}

/// The client's answers so far: one entry per fetch, the instance name or `fetch-failed`.
fn answers(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            if l.contains("fetch-failed") {
                Some("fetch-failed".to_string())
            } else {
                l.split_whitespace()
                    .find(|w| w.starts_with("instance-"))
                    .map(str::to_owned)
            }
        })
        .collect()
}

/// Waits until an answer from `who` appears after the first `from` answers; returns the index
/// of the first one.
fn wait_answer(log: &Path, from: usize, who: &str, limit: Duration) -> Result<usize, String> {
    wait_for(&format!("an answer from {who}"), limit, || {
        let a = answers(log);
        let tail: Vec<&String> = a.iter().skip(from).rev().take(5).collect();
        match a.iter().skip(from).position(|w| w == who) {
            Some(i) => Ok(Some(from + i)),
            None => Err(format!("{} answers, last ones {tail:?}", a.len())),
        }
    })
}

/// The next `n` answers after the first `from`, counted per backend.
fn count_answers(
    log: &Path,
    from: usize,
    n: usize,
    limit: Duration,
) -> Result<std::collections::BTreeMap<String, usize>, String> {
    let a = wait_for(&format!("{n} more answers"), limit, || {
        let a = answers(log);
        Ok((a.len() >= from + n).then_some(a))
    })?;
    let mut m = std::collections::BTreeMap::new();
    for w in &a[from..from + n] {
        *m.entry(w.clone()).or_insert(0) += 1;
    }
    Ok(m)
}

/// Cores the workers report to the cluster (all share this machine): a service asking for all
/// of them fits once per worker, which spreads instances over the workers.
fn cores() -> u64 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => Some(b.parse::<u64>().ok()? - a.parse::<u64>().ok()? + 1),
                    None => r.parse::<u64>().ok().map(|_| 1),
                })
                .sum::<Option<u64>>()
        })
        .unwrap_or(1)
}

/// The daemons' logs and state of one test, removed when dropped (also on failure): declare it
/// before the processes writing into it.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(lan: &Lan, what: &str) -> WorkDir {
        let base = std::env::var_os("OAK_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let d = base.join(format!("{}-{what}", lan.tag));
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        WorkDir(d)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The LAN itself: hosts reach each other and the gateway (the root namespace), and nothing of
/// it survives the drop.
#[test]
fn lan_hosts_reach_each_other_and_leave_nothing() {
    if !e2e::require_root("lan_hosts_reach_each_other_and_leave_nothing") {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let tag = lan.tag.clone();
    let a = lan.add_host("a").unwrap();
    let b = lan.add_host("b").unwrap();
    assert_ne!(a.addr, b.addr);
    for (from, to) in [(&a, b.addr), (&b, a.addr), (&a, lan.gateway)] {
        from.run(&["ping", "-c1", "-W2", &to.to_string()])
            .unwrap_or_else(|e| panic!("{} cannot reach {to}: {e}", from.name));
    }
    // A process started in a host sees the host's interfaces, not the root namespace's.
    let links = a.run(&["ip", "-o", "link", "show"]).unwrap();
    assert_eq!(links.lines().count(), 2, "{links}");
    assert!(!Lan::leftovers(&tag).is_empty());
    drop(lan);
    assert_eq!(Lan::leftovers(&tag), Vec::<String>::new());
}

const MDOC_RR: &str = "10.30.30.30";

fn mdoc_scenario(
    root: &Root,
    workers: &mut [Worker],
    image: &str,
    started: Instant,
) -> Result<(), String> {
    root.wait_workers(workers.len() as u64, Duration::from_secs(30))?;
    println!(
        "M-DOC: the root counts {} workers after {:.1} s",
        workers.len(),
        started.elapsed().as_secs_f64()
    );
    let vcpus = cores();
    let app = root.create_app(
        &sla(
            "mdoc",
            vec![
                server(image, vcpus, MDOC_RR, json!([])),
                client(image, vcpus, MDOC_RR, json!([])),
            ],
        ),
        "mdoc",
    )?;
    let server = root.find_service(&app, "server")?;
    let client = root.find_service(&app, "client")?;
    let limit = Duration::from_secs(60);

    let (s0, d) = root.deploy(&server, limit)?;
    println!(
        "M-DOC: server instance {s0} RUNNING after {} ms",
        d.as_millis()
    );
    let (c0, d) = root.deploy(&client, limit)?;
    println!(
        "M-DOC: client instance {c0} RUNNING after {} ms",
        d.as_millis()
    );
    let on_s0 = placed_on(workers, &server.container(s0))?;
    let on_c0 = placed_on(workers, &client.container(c0))?;
    assert_ne!(on_s0, on_c0, "client and server share a worker");
    let log = workers[on_c0].logs.join(client.container(c0));
    let t = Instant::now();
    let first = wait_answer(&log, 0, &format!("instance-{s0}"), Duration::from_secs(30))?;
    println!(
        "M-DOC: the client on {} reaches instance-{s0} on {} through {MDOC_RR} (waited {} ms after RUNNING)",
        workers[on_c0].name,
        workers[on_s0].name,
        t.elapsed().as_millis()
    );

    // Scale out: a second server instance, on the third worker.
    let (s1, d) = root.deploy(&server, limit)?;
    println!(
        "M-DOC: server instance {s1} RUNNING after {} ms",
        d.as_millis()
    );
    let on_s1 = placed_on(workers, &server.container(s1))?;
    assert!(
        on_s1 != on_s0 && on_s1 != on_c0,
        "server instance {s1} on worker {on_s1}, instance {s0} on {on_s0}, client on {on_c0}"
    );
    let t = Instant::now();
    let seen = wait_answer(
        &log,
        first,
        &format!("instance-{s1}"),
        Duration::from_secs(30),
    )?;
    println!(
        "M-DOC: the client meets the new instance-{s1} on {} {} ms after RUNNING",
        workers[on_s1].name,
        t.elapsed().as_millis()
    );
    let n = 40;
    let t = Instant::now();
    let counts = count_answers(&log, seen + 1, n, Duration::from_secs(60))?;
    println!(
        "M-DOC: round robin over {n} fetches in {} ms: {counts:?}",
        t.elapsed().as_millis()
    );
    let (a, b) = (
        counts.get(&format!("instance-{s0}")).copied().unwrap_or(0),
        counts.get(&format!("instance-{s1}")).copied().unwrap_or(0),
    );
    assert_eq!(a + b, n, "failed or foreign answers: {counts:?}");
    assert!(
        a >= n / 4 && b >= n / 4,
        "unbalanced over two backends: {counts:?}"
    );

    // Drill 1: undeploy instance s1; the client must stop meeting it (and keep being served).
    // Its answers are polled every 50 ms: the last time one from s1 shows up bounds how long
    // the client's worker kept routing new flows to the removed instance.
    let t = Instant::now();
    let mark = answers(&log).len();
    root.undeploy(&server, s1)?;
    let (old, only) = (format!("instance-{s1}"), format!("instance-{s0}"));
    let (mut from_old, mut last_old) = (0, Duration::ZERO);
    let recovered = wait_for(
        "10 answers in a row from the remaining instance",
        Duration::from_secs(40),
        || {
            let a = answers(&log);
            let n = a.iter().skip(mark).filter(|w| **w == old).count();
            if n > from_old {
                (from_old, last_old) = (n, t.elapsed());
            }
            let tail: Vec<&String> = a.iter().skip(mark).rev().take(10).collect();
            Ok((tail.len() == 10 && tail.iter().all(|w| **w == only)).then_some(a))
        },
    )?;
    let failed = recovered[mark..]
        .iter()
        .filter(|w| *w == "fetch-failed")
        .count();
    wait_for(
        "the undeployed server to leave its worker",
        Duration::from_secs(30),
        || Ok((!workers[on_s1].holds(&server.container(s1))).then_some(())),
    )?;
    println!(
        "M-DOC drill undeploy: {from_old} answers from {old} after the DELETE, the last within {} ms; \
         {failed} failed fetches; container gone after {} ms",
        last_old.as_millis(),
        t.elapsed().as_millis()
    );

    // Drill 2: scale out again; the new instance takes the freed worker and gets traffic.
    let t = Instant::now();
    let mark = answers(&log).len();
    let (s2, d) = root.deploy(&server, limit)?;
    assert_eq!(placed_on(workers, &server.container(s2))?, on_s1);
    wait_answer(
        &log,
        mark,
        &format!("instance-{s2}"),
        Duration::from_secs(30),
    )?;
    println!(
        "M-DOC drill scale-out: instance-{s2} RUNNING after {} ms, answering the client after {} ms",
        d.as_millis(),
        t.elapsed().as_millis()
    );
    failover_drill(root, workers, &server, [s0, s2], [on_s0, on_s1], &log)
}

/// Drill 3 (issue #8.3): free instance s0's worker, then SIGKILL the worker of s2. The cluster
/// declares that worker dead (`OAK_NODE_TIMEOUT_MS`) and reschedules s2 onto the freed one; the
/// client must follow: its fetches succeed again and come only from the replacement, which
/// the root's table lists alone once it is RUNNING (the dead one's data plane is gone with its
/// worker, so a stale route would show as failed fetches, never as answers).
fn failover_drill(
    root: &Root,
    workers: &mut [Worker],
    server: &e2e::root::Service,
    [s0, s2]: [u64; 2],
    [free, doomed]: [usize; 2],
    log: &Path,
) -> Result<(), String> {
    root.undeploy(server, s0)?;
    wait_for(
        "instance s0 to leave its worker",
        Duration::from_secs(30),
        || Ok((!workers[free].holds(&server.container(s0))).then_some(())),
    )?;
    let who = format!("instance-{s2}");
    let t = Instant::now();
    let mark = answers(log).len();
    workers[doomed].kill();
    let container = server.container(s2);
    wait_for(
        "the instance to be RUNNING on another worker",
        Duration::from_secs(40),
        || {
            let running = root.instance_status(&server.id, s2)?.as_deref() == Some("RUNNING");
            Ok((running && workers[free].holds(&container)).then_some(()))
        },
    )?;
    let rescheduled = t.elapsed();
    let recovered = wait_for(
        "10 answers in a row from the replacement",
        Duration::from_secs(40),
        || {
            let a = answers(log);
            let tail: Vec<&String> = a.iter().skip(mark).rev().take(10).collect();
            Ok((tail.len() == 10 && tail.iter().all(|w| **w == who)).then_some(a))
        },
    )?;
    let served = t.elapsed();
    let after: Vec<&String> = recovered[mark..].iter().collect();
    let failed = after.iter().filter(|w| **w == "fetch-failed").count();
    let foreign: Vec<&&String> = after
        .iter()
        .filter(|w| ***w != "fetch-failed" && ***w != who)
        .collect();
    assert!(
        foreign.is_empty(),
        "answers from removed instances: {foreign:?}"
    );
    println!(
        "M-DOC drill failover: worker {} SIGKILLed; {who} RUNNING on {} after {} ms, \
         the client served by it again after {} ms ({failed} failed fetches meanwhile)",
        workers[doomed].name,
        workers[free].name,
        rescheduled.as_millis(),
        served.as_millis()
    );
    Ok(())
}

#[test]
fn mdoc_round_robin_over_workers() {
    if !e2e::require_root("mdoc_round_robin_over_workers") {
        return;
    }
    let _one_at_a_time = e2e::serial();
    let started = Instant::now();
    let (node_engine, orch_lite) = binaries().unwrap_or_else(|e| panic!("{e}"));
    // Declared first, dropped last: every process inside a host is gone before its namespace.
    let mut lan = Lan::new().unwrap_or_else(|e| panic!("{e}"));
    let tag = lan.tag.clone();
    let work_dir = WorkDir::new(&lan, "mdoc");
    let work = work_dir.0.clone();
    let prefix = format!("mdoc.{}.", ns());
    let _sweep = NetnsSweep(prefix.clone());
    let ctl = lan.add_host("ctl").unwrap_or_else(|e| panic!("{e}"));
    let mut fxs = Vec::new();
    for _ in 0..3 {
        fxs.push(lan.fixture().unwrap_or_else(|e| panic!("{e}")));
    }
    let fx_dirs: Vec<PathBuf> = fxs.iter().map(|f| f.dir.clone()).collect();
    let (registry, image) = (fxs[0].registry.clone(), fxs[0].image.clone());
    println!(
        "M-DOC: LAN and 3 fixtures up after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut orch = Proc::spawn(
        "orch-lite",
        &mut ctl.wrap(
            daemons::orch_lite(&orch_lite, "all", &work, "orch-lite")
                .env("RUST_LOG", ORCH_LOG)
                .env("OAK_ROOT_API_ADDR", format!("{}:{ROOT_PORT}", ctl.addr))
                .env(
                    "OAK_CLUSTER_API_ADDR",
                    format!("{}:{CLUSTER_PORT}", ctl.addr),
                )
                .env("OAK_MQTT_ADDR", format!("{}:{MQTT_PORT}", ctl.addr))
                .env("OAK_CLUSTER_NAME", "mdoc")
                // The failover drill waits for the killed worker to be declared dead.
                .env("OAK_NODE_TIMEOUT_MS", "6000"),
        ),
        work.join("orch-lite.log"),
    )
    .unwrap();
    let root = Root::login(
        &format!("{}:{ROOT_PORT}", ctl.addr),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e}\n--- orch-lite log:\n{}", orch.tail(30)));
    let mut workers = Vec::new();
    for (i, fx) in fxs.into_iter().enumerate() {
        let host = lan
            .add_host(&format!("w{}", i + 1))
            .unwrap_or_else(|e| panic!("{e}"));
        workers.push(
            Worker::start(&node_engine, &work, host, fx, &ctl, &registry, None)
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }

    if let Err(e) = mdoc_scenario(&root, &mut workers, &image, started) {
        hold_for_debugging(&e);
        let logs: Vec<String> = workers
            .iter()
            .map(|w| format!("--- {} log:\n{}", w.name, w.tail()))
            .collect();
        panic!(
            "{e}\n{}\n--- orch-lite log:\n{}",
            logs.join("\n"),
            orch.tail(40)
        );
    }

    for w in &mut workers {
        w.stop().unwrap_or_else(|e| panic!("{e}"));
    }
    let st = orch.stop().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        st.success(),
        "orch-lite exited with {st}:\n{}",
        orch.tail(20)
    );
    let left: Vec<String> = ip_netns()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // Running instances keep their namespaces over a worker stop; nothing else may stay.
    let stray: Vec<&String> = left
        .iter()
        .filter(|n| !workers.iter().any(|w| w.holds(n)))
        .collect();
    assert!(
        stray.is_empty(),
        "namespaces of no running instance: {stray:?}"
    );
    // Their fixtures go down with them; the leftover checks below tell whether that worked.
    drop(workers);
    // The instances are gone with the fixtures; their namespaces are unused leftovers now,
    // which a worker's next start would remove: the sweep does it here.
    drop(_sweep);
    let left: Vec<String> = ip_netns()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "instance namespaces left: {left:?}");
    drop(ctl);
    drop(work_dir);
    drop(lan);
    for d in fx_dirs.iter().chain([&work]) {
        let left = e2e::leftovers(d);
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
    assert_eq!(Lan::leftovers(&tag), Vec::<String>::new());
    println!("M-DOC: whole test {:.1} s", started.elapsed().as_secs_f64());
}

/// `OAK_E2E_HOLD_SECS=<n>`: on failure, keep everything running for n seconds (to look at the
/// hosts with `nsenter`, tcpdump, ctr) before tearing down.
fn hold_for_debugging(e: &str) {
    if let Some(n) = std::env::var("OAK_E2E_HOLD_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        eprintln!("FAILED ({e}); holding {n} s for inspection (OAK_E2E_HOLD_SECS)");
        std::thread::sleep(Duration::from_secs(n));
    }
}

/// Names in `ip netns list` (the machine-wide `/run/netns`).
fn ip_netns() -> Vec<String> {
    std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

const MDNC_RR: &str = "10.30.40.40";

fn mdnc_scenario(
    root: &Root,
    workers: &[Worker],
    clusters: [&str; 2],
    image: &str,
    started: Instant,
) -> Result<(), String> {
    root.wait_workers(2, Duration::from_secs(40))?;
    println!(
        "MDNC: the root counts a worker in each of 2 clusters after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let direct = |c: &str| json!([{"type": "direct", "cluster": c}]);
    // The server under the second cluster, the client under the first.
    let app = root.create_app(
        &sla(
            "mdnc",
            vec![
                server(image, 1, MDNC_RR, direct(clusters[1])),
                client(image, 1, MDNC_RR, direct(clusters[0])),
            ],
        ),
        "mdnc",
    )?;
    let server = root.find_service(&app, "server")?;
    let client = root.find_service(&app, "client")?;
    let limit = Duration::from_secs(60);
    let (s0, d) = root.deploy(&server, limit)?;
    println!(
        "MDNC: server instance {s0} RUNNING under {} after {} ms",
        clusters[1],
        d.as_millis()
    );
    let (c0, d) = root.deploy(&client, limit)?;
    println!(
        "MDNC: client instance {c0} RUNNING under {} after {} ms",
        clusters[0],
        d.as_millis()
    );
    // Each cluster has one worker: where the containers are says where the root put them.
    assert_eq!(placed_on(workers, &server.container(s0))?, 1);
    assert_eq!(placed_on(workers, &client.container(c0))?, 0);
    let (si, ci) = (
        root.instance(&server.id, s0)?.unwrap_or_default(),
        root.instance(&client.id, c0)?.unwrap_or_default(),
    );
    assert_ne!(
        si["cluster_id"], ci["cluster_id"],
        "server {si} and client {ci} in one cluster"
    );
    let log = workers[0].logs.join(client.container(c0));
    let t = Instant::now();
    let first = wait_answer(&log, 0, &format!("instance-{s0}"), Duration::from_secs(30))?;
    println!(
        "MDNC: the client under {} reaches the server under {} through {MDNC_RR} ({} ms after RUNNING)",
        clusters[0],
        clusters[1],
        t.elapsed().as_millis()
    );
    let n = 20;
    let counts = count_answers(&log, first + 1, n, Duration::from_secs(30))?;
    assert_eq!(
        counts.get(&format!("instance-{s0}")).copied(),
        Some(n),
        "{counts:?}"
    );
    println!("MDNC: {n} fetches across clusters: {counts:?}");

    // Drill (issue #8.4): replace the server under the second cluster; the client's cluster
    // hears of both changes from the root and the client follows, without stale routing.
    let t = Instant::now();
    root.undeploy(&server, s0)?;
    let (s1, d) = root.deploy(&server, limit)?;
    assert_eq!(placed_on(workers, &server.container(s1))?, 1);
    let mark = answers(&log).len();
    let who = format!("instance-{s1}");
    let seen = wait_answer(&log, mark, &who, Duration::from_secs(30))?;
    let counts = count_answers(&log, seen + 1, 10, Duration::from_secs(30))?;
    assert_eq!(counts.get(&who).copied(), Some(10), "{counts:?}");
    println!(
        "MDNC drill replace: instance-{s0} undeployed, instance-{s1} RUNNING under {} \
         (deploy {} ms); the client under {} served by it {} ms after the undeploy",
        clusters[1],
        d.as_millis(),
        clusters[0],
        t.elapsed().as_millis()
    );
    Ok(())
}

#[test]
fn mdnc_service_ip_across_clusters() {
    if !e2e::require_root("mdnc_service_ip_across_clusters") {
        return;
    }
    let _one_at_a_time = e2e::serial();
    let started = Instant::now();
    let (node_engine, orch_lite) = binaries().unwrap_or_else(|e| panic!("{e}"));
    let mut lan = Lan::new().unwrap_or_else(|e| panic!("{e}"));
    let tag = lan.tag.clone();
    let work_dir = WorkDir::new(&lan, "mdnc");
    let work = work_dir.0.clone();
    let prefix = format!("mdnc.{}.", ns());
    let _sweep = NetnsSweep(prefix.clone());
    let token = format!("e2e-join-{}", std::process::id());
    let clusters = ["mdnca", "mdncb"];
    let rt = lan.add_host("root").unwrap_or_else(|e| panic!("{e}"));
    let fxs = [
        lan.fixture().unwrap_or_else(|e| panic!("{e}")),
        lan.fixture().unwrap_or_else(|e| panic!("{e}")),
    ];
    let fx_dirs: Vec<PathBuf> = fxs.iter().map(|f| f.dir.clone()).collect();
    let (registry, image) = (fxs[0].registry.clone(), fxs[0].image.clone());
    let root_addr = format!("{}:{ROOT_PORT}", rt.addr);
    let mut orchs = vec![Proc::spawn(
        "orch-lite root",
        &mut rt.wrap(
            daemons::orch_lite(&orch_lite, "root", &work, "root")
                .env("RUST_LOG", ORCH_LOG)
                .env("OAK_ROOT_API_ADDR", &root_addr)
                .env("OAK_JOIN_TOKEN", &token),
        ),
        work.join("root.log"),
    )
    .unwrap()];
    let root = Root::login(&root_addr, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n--- root log:\n{}", orchs[0].tail(30)));
    let mut workers = Vec::new();
    for (i, fx) in fxs.into_iter().enumerate() {
        let name = clusters[i];
        let ch = lan.add_host(name).unwrap_or_else(|e| panic!("{e}"));
        orchs.push(
            Proc::spawn(
                "orch-lite cluster",
                &mut ch.wrap(
                    daemons::orch_lite(&orch_lite, "cluster", &work, name)
                        .env("RUST_LOG", ORCH_LOG)
                        .env("OAK_ROOT_URL", format!("http://{root_addr}"))
                        .env("OAK_JOIN_TOKEN", &token)
                        .env("OAK_CLUSTER_NAME", name)
                        .env(
                            "OAK_CLUSTER_API_ADDR",
                            format!("{}:{CLUSTER_PORT}", ch.addr),
                        )
                        .env("OAK_MQTT_ADDR", format!("{}:{MQTT_PORT}", ch.addr)),
                ),
                work.join(format!("{name}.log")),
            )
            .unwrap(),
        );
        let host = lan
            .add_host(&format!("w{}", i + 1))
            .unwrap_or_else(|e| panic!("{e}"));
        workers.push(
            Worker::start(&node_engine, &work, host, fx, &ch, &registry, Some(&token))
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }

    if let Err(e) = mdnc_scenario(&root, &workers, clusters, &image, started) {
        hold_for_debugging(&e);
        let logs: Vec<String> = workers
            .iter()
            .map(|w| format!("--- {} log:\n{}", w.name, w.tail()))
            .chain(
                orchs
                    .iter()
                    .map(|o| format!("--- {}:\n{}", o.log.display(), o.tail(30))),
            )
            .collect();
        panic!("{e}\n{}", logs.join("\n"));
    }

    for w in &mut workers {
        w.stop().unwrap_or_else(|e| panic!("{e}"));
    }
    for o in orchs.iter_mut().rev() {
        let st = o.stop().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            st.success(),
            "{} exited with {st}:\n{}",
            o.log.display(),
            o.tail(20)
        );
    }
    let left: Vec<String> = ip_netns()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // Running instances keep their namespaces over a worker stop; nothing else may stay.
    let stray: Vec<&String> = left
        .iter()
        .filter(|n| !workers.iter().any(|w| w.holds(n)))
        .collect();
    assert!(
        stray.is_empty(),
        "namespaces of no running instance: {stray:?}"
    );
    drop(workers);
    // The instances are gone with the fixtures; their namespaces are unused leftovers now,
    // which a worker's next start would remove: the sweep does it here.
    drop(_sweep);
    let left: Vec<String> = ip_netns()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "instance namespaces left: {left:?}");
    drop(rt);
    drop(work_dir);
    drop(lan);
    for d in fx_dirs.iter().chain([&work]) {
        let left = e2e::leftovers(d);
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
    assert_eq!(Lan::leftovers(&tag), Vec::<String>::new());
    println!("MDNC: whole test {:.1} s", started.elapsed().as_secs_f64());
}
