//! Process-level failure drills of the control plane (issues #8.4, #8.5, #3): `orch-lite root`,
//! `orch-lite cluster` and a `NodeEngine` as separate processes on loopback over a real
//! containerd and registry (the fixture), and the processes killed, paused and restarted the way
//! hosts fail. Every drill checks that the running container survives (same task pid) and that
//! the system catches up afterwards, and prints `drill <name>: <secs> s`.
//!
//! Needs root (containerd, mounts): run with
//! `flock /tmp/oak-test.lock env CI=true cargo test -p e2e --test drills_control -- --nocapture`.
//! `OAK_DRILL_OUTAGE_S` shortens the long broker outage of #3 (default 120 s).

use e2e::root::Service;
use e2e::topology::{Broker, Topology, WORKER_NAME};
use e2e::{call, wait_for};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const APP: &str = "drills";

fn sla(image: &str) -> Value {
    json!({
        "sla_version": "v2.0",
        "customerID": "Admin",
        "applications": [{
            "applicationID": "",
            "application_name": APP,
            "application_namespace": "test",
            "application_desc": "a web server that must outlive control-plane failures",
            "microservices": [{
                "microserviceID": "",
                "microservice_name": "web",
                "microservice_namespace": "test",
                "virtualization": "container",
                "cmd": ["httpd", "-f", "-p", "80", "-h", "/www"],
                "memory": 50, "vcpus": 1, "vgpus": 0, "vtpus": 0,
                "bandwidth_in": 0, "bandwidth_out": 0, "storage": 0,
                "code": image,
                "state": "",
                "port": "",
                "added_files": []
            }]
        }]
    })
}

/// Creates the application and deploys instance 0; returns the service and the task's pid.
fn deploy_web(t: &Topology) -> Result<(Service, u32), String> {
    let app = t.root.create_app(&sla(&t.fx().image), APP)?;
    let web = t.root.find_service(&app, "web")?;
    let (n, d) = t.root.deploy(&web, Duration::from_secs(60))?;
    if n != 0 {
        return Err(format!("first instance is number {n}"));
    }
    println!("deploy of {} took {} ms", web.job_name, d.as_millis());
    let pid = task_pid(t, &web, 0)?;
    Ok((web, pid))
}

fn task_pid(t: &Topology, s: &Service, n: u64) -> Result<u32, String> {
    t.fx()
        .task_pid("oakestra", &s.container(n))?
        .ok_or_else(|| format!("no running task for {}", s.container(n)))
}

/// The container of instance `n` still runs the very process it ran before.
fn same_task(t: &Topology, s: &Service, n: u64, pid: u32) -> Result<(), String> {
    let now = task_pid(t, s, n)?;
    if now != pid {
        return Err(format!(
            "{} was restarted: task pid {pid} became {now}",
            s.container(n)
        ));
    }
    Ok(())
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

fn node(cluster: &Value) -> Result<&Value, String> {
    cluster["nodes"]
        .as_array()
        .and_then(|l| l.iter().find(|n| n["name"] == WORKER_NAME))
        .ok_or_else(|| format!("the cluster does not list {WORKER_NAME}: {cluster}"))
}

/// Runs one drill in its own topology: the scenario's error, if any, comes with the daemons'
/// logs; the orderly teardown must then leave nothing behind.
fn drill(name: &str, broker: Broker, scenario: impl FnOnce(&mut Topology) -> Result<(), String>) {
    if !e2e::require_root(name) {
        return;
    }
    let _one_at_a_time = e2e::serial();
    let mut t = Topology::start(name, broker).unwrap_or_else(|e| panic!("{name}: {e}"));
    if let Err(e) = scenario(&mut t) {
        panic!("{name}: {e}\n{}", t.logs(40));
    }
    t.finish()
        .unwrap_or_else(|e| panic!("{name} teardown: {e}"));
}

/// #8.4: the cluster process dies (SIGKILL) and comes back on the same data directory.
#[test]
fn drill_cluster_killed_and_restarted() {
    drill("cluster-restart", Broker::Embedded, |t| {
        let (web, pid) = deploy_web(t)?;
        let before = t.cluster_status()?;
        let cluster_id = before["cluster_id"].clone();
        let node_id = node(&before)?["id"].clone();
        let inst = t
            .cluster_instance(&web.job_name, 0)?
            .ok_or("the cluster does not list instance 0")?;
        let root_cluster = t
            .root_cluster()?
            .ok_or("the root does not list the cluster")?;
        let reconnects = t.worker_status()?["counters"]["reconnects"]
            .as_u64()
            .unwrap_or(0);

        let t0 = Instant::now();
        t.cluster_proc.as_mut().ok_or("no cluster")?.kill();
        t.start_cluster()?;
        // Straight from the store, before any worker has said a word.
        let after = t.cluster_status()?;
        if after["cluster_id"] != cluster_id || node(&after)?["id"] != node_id {
            return Err(format!(
                "identity lost in the restart: before {before}\nafter {after}"
            ));
        }
        let again = t
            .cluster_instance(&web.job_name, 0)?
            .ok_or_else(|| format!("instance 0 lost in the restart: {after}"))?;
        for k in ["status", "worker_id", "instance_number"] {
            if again[k] != inst[k] {
                return Err(format!(
                    "instance 0's {k}: {} before, {} after",
                    inst[k], again[k]
                ));
            }
        }
        // The worker reconnects to the new broker under the same node id and reports again.
        wait_for("the worker to reconnect", Duration::from_secs(30), || {
            let w = t.worker_status()?;
            let back = w["broker"]["state"] == "connected"
                && w["counters"]["reconnects"].as_u64().unwrap_or(0) > reconnects;
            Ok(back.then_some(()))
        })?;
        let w = t.worker_status()?;
        if w["node_id"] != node_id {
            return Err(format!(
                "the worker's node id changed: {} -> {}",
                node_id, w["node_id"]
            ));
        }
        wait_for(
            "the cluster to hear the worker",
            Duration::from_secs(20),
            || {
                let n = node(&t.cluster_status()?)?.clone();
                Ok((n["active"] == true && n["last_seen_s_ago"].as_u64() <= Some(1)).then_some(()))
            },
        )?;
        // The root still knows the cluster under the same id, and it is active.
        wait_for(
            "the root to see the cluster active",
            Duration::from_secs(20),
            || Ok(t.root_sees_cluster_active()?.then_some(())),
        )?;
        let rc = t.root_cluster()?.ok_or("the root forgot the cluster")?;
        if rc["_id"] != root_cluster["_id"] {
            return Err(format!(
                "cluster id at the root changed: {} -> {}",
                root_cluster["_id"], rc["_id"]
            ));
        }
        // A new deploy after the restart works; the old instance is untouched.
        let (n, d) = t.root.deploy(&web, Duration::from_secs(40))?;
        println!(
            "deploy after the cluster restart: instance {n} in {} ms",
            d.as_millis()
        );
        same_task(t, &web, 0, pid)?;
        if t.root.instance_status(&web.id, 0)?.as_deref() != Some("RUNNING") {
            return Err(format!(
                "instance 0 at the root: {:?}",
                t.root.instance(&web.id, 0)?
            ));
        }
        println!(
            "drill cluster-killed-restarted: {:.1} s (kill -> new instance RUNNING)",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    });
}

/// #8.4: the root's host goes away for a minute (SIGKILL, restart after 60 s on the same data).
#[test]
fn drill_root_away_for_a_minute() {
    drill("root-away", Broker::Embedded, |t| {
        let (web, pid) = deploy_web(t)?;
        let (one, _) = t.root.deploy(&web, Duration::from_secs(40))?;
        let cluster_url = format!("http://{}", t.cluster_addr);
        let job_id = web.id.clone();

        let t0 = Instant::now();
        t.root_proc.as_mut().ok_or("no root")?.kill();
        wait_for(
            "the cluster to notice the root is gone",
            Duration::from_secs(20),
            || {
                let c = t.cluster_status()?;
                Ok((c["connected_to_root"] == false).then_some(()))
            },
        )?;
        // While the root is away, an operator undeploys one instance through the cluster API.
        let (code, v) = call(
            "DELETE",
            &format!("{cluster_url}/api/service/{job_id}/{one}"),
            Some(&t.token),
            None,
        )?;
        if code != 200 {
            return Err(format!("cluster undeploy answered {code}: {v}"));
        }
        let gone = web.container(one);
        wait_for(
            "the undeployed container to leave containerd",
            Duration::from_secs(20),
            || Ok((!t.fx().containers("oakestra")?.contains(&gone)).then_some(())),
        )?;
        sleep_until(t0 + Duration::from_secs(60));
        // A minute later: the worker still runs its instance and the cluster still answers.
        same_task(t, &web, 0, pid)?;
        let inst = t
            .cluster_instance(&web.job_name, 0)?
            .ok_or("the cluster lost instance 0 while the root was away")?;
        if inst["status"] != "RUNNING" {
            return Err(format!(
                "instance 0 at the cluster while the root is away: {inst}"
            ));
        }
        if node(&t.cluster_status()?)?["active"] != true {
            return Err("the worker went inactive while the root was away".into());
        }

        t.start_root()?;
        let back = Instant::now();
        wait_for(
            "the root to see the cluster active again",
            Duration::from_secs(30),
            || Ok(t.root_sees_cluster_active()?.then_some(())),
        )?;
        wait_for(
            "the root to hear of the undeploy",
            Duration::from_secs(30),
            || Ok(t.root.instance(&job_id, one)?.is_none().then_some(())),
        )?;
        let caught_up = back.elapsed();
        if t.root.instance_status(&job_id, 0)?.as_deref() != Some("RUNNING") {
            return Err(format!(
                "instance 0 at the root after its return: {:?}",
                t.root.instance(&job_id, 0)?
            ));
        }
        if t.cluster_status()?["connected_to_root"] != true {
            return Err("the cluster does not consider itself connected to the root".into());
        }
        same_task(t, &web, 0, pid)?;
        // And the root works again end to end.
        let (n, d) = t.root.deploy(&web, Duration::from_secs(40))?;
        println!(
            "root back: caught up in {:.1} s; deploy of instance {n} in {} ms",
            caught_up.as_secs_f64(),
            d.as_millis()
        );
        println!(
            "drill root-away-60s: {:.1} s (kill -> caught up and deployed again)",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    });
}

/// Waits until the worker and the cluster are both connected to the broker again and the
/// cluster hears the worker's reports (its last-seen, which grew during the outage, is fresh).
fn reports_resume(t: &Topology, limit: Duration) -> Result<(), String> {
    wait_for("the worker to reconnect to the broker", limit, || {
        Ok((t.worker_status()?["broker"]["state"] == "connected").then_some(()))
    })?;
    // The worker registers again on reconnecting, which refreshes its last-seen by itself: only
    // a fresh last-seen well after that proves the reports flow.
    std::thread::sleep(Duration::from_secs(3));
    wait_for("the cluster to hear the worker again", limit, || {
        let n = node(&t.cluster_status()?)?.clone();
        Ok((n["last_seen_s_ago"].as_u64() <= Some(1)).then_some(()))
    })
}

/// #8.5 + #8.4: the cluster on an external mosquitto, which is killed and restarted ~10 s later.
#[test]
fn drill_external_broker_restarted() {
    drill("broker-restart", Broker::Mosquitto, |t| {
        // The worker deploys through the external broker (#8.5).
        let (web, pid) = deploy_web(t)?;
        let t0 = Instant::now();
        t.mosquitto.as_mut().ok_or("no mosquitto")?.kill();
        wait_for(
            "the worker to notice the broker is gone",
            Duration::from_secs(20),
            || Ok((t.worker_status()?["broker"]["state"] == "disconnected").then_some(())),
        )?;
        let sent = |t: &Topology| -> Result<u64, String> {
            Ok(t.worker_status()?["counters"]["information_sent"]
                .as_u64()
                .unwrap_or(0))
        };
        let during = sent(t)?;
        sleep_until(t0 + Duration::from_secs(10));
        if sent(t)? != during {
            return Err("the worker counts reports as sent with the broker down".into());
        }
        let silent = node(&t.cluster_status()?)?["last_seen_s_ago"]
            .as_u64()
            .unwrap_or(0);
        if silent < 5 {
            return Err(format!(
                "the cluster heard the worker {silent} s ago with the broker down"
            ));
        }
        t.mosquitto.as_mut().ok_or("no mosquitto")?.restart()?;
        let back = Instant::now();
        reports_resume(t, Duration::from_secs(30))?;
        let resumed = back.elapsed();
        wait_for(
            "the worker to send reports again",
            Duration::from_secs(5),
            || Ok((sent(t)? > during).then_some(())),
        )?;
        same_task(t, &web, 0, pid)?;
        let (n, d) = t.root.deploy(&web, Duration::from_secs(40))?;
        println!(
            "broker back: reports resumed in {:.1} s; deploy of instance {n} in {} ms",
            resumed.as_secs_f64(),
            d.as_millis()
        );
        println!(
            "drill broker-restart: {:.1} s (kill -> deployed again)",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    });
}

/// #3's outage drill ("for minutes"): mosquitto down for `OAK_DRILL_OUTAGE_S` (default 120 s)
/// while an instance runs; its task is killed during the outage, so the status change happens
/// while nobody can hear it, and must reach the root once the broker is back.
#[test]
fn drill_long_broker_outage_issue3() {
    let outage = std::env::var("OAK_DRILL_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(120);
    drill("broker-outage", Broker::Mosquitto, |t| {
        let (web, pid) = deploy_web(t)?;
        let (one, _) = t.root.deploy(&web, Duration::from_secs(40))?;
        let victim = task_pid(t, &web, one)?;
        let t0 = Instant::now();
        t.mosquitto.as_mut().ok_or("no mosquitto")?.kill();
        wait_for(
            "the worker to notice the broker is gone",
            Duration::from_secs(20),
            || Ok((t.worker_status()?["broker"]["state"] == "disconnected").then_some(())),
        )?;
        // Half-way through, the task of instance 1 dies.
        sleep_until(t0 + Duration::from_secs(outage / 2));
        let st = Command::new("kill")
            .args(["-KILL", &victim.to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("kill -9 {victim}: {st}"));
        }
        wait_for(
            "the worker to see the task die",
            Duration::from_secs(20),
            || {
                let w = t.worker_status()?;
                let seen = w["instances"].as_array().is_some_and(|l| {
                    l.iter().any(|i| {
                        i["job_name"] == web.job_name.as_str()
                            && i["instance"] == one
                            && i["status"] != "RUNNING"
                    })
                });
                Ok(seen.then_some(()))
            },
        )?;
        sleep_until(t0 + Duration::from_secs(outage));
        // The whole outage: the other instance kept running, nobody restarted it.
        same_task(t, &web, 0, pid)?;
        let root_view = t.root.instance_status(&web.id, one)?;
        if root_view.as_deref() != Some("RUNNING") {
            return Err(format!(
                "the root heard of instance {one} during the outage: {root_view:?}"
            ));
        }
        let attempts = t
            .cluster_instance(&web.job_name, one)?
            .map(|i| i["attempts"].clone())
            .unwrap_or_default();

        t.mosquitto.as_mut().ok_or("no mosquitto")?.restart()?;
        let back = Instant::now();
        // The death reaches the cluster, which restarts the instance: a new task, and the root
        // sees the failure (or, if the restart was quicker than a report, the instance running
        // under a new task while the cluster counts the attempt).
        let mut seen = Vec::new();
        wait_for(
            "the task's death to reach the root",
            Duration::from_secs(40),
            || {
                let s = t.root.instance_status(&web.id, one)?.unwrap_or_default();
                if seen.last() != Some(&s) {
                    seen.push(s.clone());
                }
                Ok(seen.iter().any(|s| s != "RUNNING").then_some(()))
            },
        )?;
        let reached = back.elapsed();
        // Polled from the broker's return on: the cluster restarts the instance within a
        // second of hearing of its death, so a later look would only find it running again.
        reports_resume(t, Duration::from_secs(30))?;
        let i = t
            .cluster_instance(&web.job_name, one)?
            .ok_or("the cluster dropped the killed instance")?;
        println!(
            "root statuses of instance {one} after the broker's return: {seen:?}; cluster record {i} (attempts before: {attempts})"
        );
        wait_for("instance 1 to run again", Duration::from_secs(60), || {
            Ok((t.root.instance_status(&web.id, one)?.as_deref() == Some("RUNNING")).then_some(()))
        })?;
        let new = task_pid(t, &web, one)?;
        if new == victim {
            return Err(format!("instance {one} still has the killed task {victim}"));
        }
        same_task(t, &web, 0, pid)?;
        println!(
            "drill broker-outage-{outage}s (#3): {:.1} s; the failure reached the root {:.1} s after the broker's return",
            t0.elapsed().as_secs_f64(),
            reached.as_secs_f64()
        );
        Ok(())
    });
}

/// A worker started in the background by `NodeEngine -d` is not our child: killed by pid when
/// the test ends early.
struct Detached(Option<u32>);

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            if alive(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Running (a zombie waiting for init to reap it counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// #8.5: the upstream command lines. `NodeEngine -a <ip> -p <port> -d` detaches (upstream:
/// starts the service and does not tail its log): the command returns, the worker runs on in the
/// background, registers, answers `NodeEngine status`, and `NodeEngine stop` ends it.
/// `NodeEngine config cluster` writes what `config show` and the daemon read.
#[test]
fn drill_legacy_command_lines() {
    if !e2e::require_root("drill_legacy_command_lines") {
        return;
    }
    let _one_at_a_time = e2e::serial();
    let mut t = Topology::start_without_worker("legacy-cli", Broker::Embedded)
        .unwrap_or_else(|e| panic!("legacy-cli: {e}"));
    let mut detached = Detached(None);
    let result = legacy(&t, &mut detached);
    if let Err(e) = result {
        panic!("legacy-cli: {e}\n{}", t.logs(30));
    }
    drop(detached);
    t.worker_proc = None;
    t.finish()
        .unwrap_or_else(|e| panic!("legacy-cli teardown: {e}"));
}

fn legacy(t: &Topology, detached: &mut Detached) -> Result<(), String> {
    let started = Instant::now();
    let template = t.worker_command();
    let cli = |args: &[&str]| -> Result<String, String> {
        let mut c = Command::new(&t.node_engine);
        for (k, v) in template.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        let out = c
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("NodeEngine {args:?}: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "NodeEngine {args:?} exited with {}: {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(text)
    };
    let port = t.cluster_port.to_string();

    // `config cluster` round-trips through conf.json and `config show`.
    cli(&["config", "cluster", "127.0.0.2", "-p", "1234"])?;
    let shown: Value = serde_json::from_str(&cli(&["config", "show"])?)
        .map_err(|e| format!("config show is not JSON: {e}"))?;
    if shown["cluster_address"] != "127.0.0.2" || shown["cluster_port"] != 1234 {
        return Err(format!("config show after config cluster: {shown}"));
    }

    // `-a -p -d`: returns at once, the worker runs on.
    let t0 = Instant::now();
    let out = cli(&["-a", "127.0.0.1", "-p", &port, "-d"])?;
    let took = t0.elapsed();
    if took > Duration::from_secs(10) {
        return Err(format!("NodeEngine -d took {took:?} to return"));
    }
    let pid: u32 = out
        .split("pid ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("NodeEngine -d did not say which pid: {out:?}"))?;
    detached.0 = Some(pid);
    // -a/-p were saved: the daemon (and later runs) read them from conf.json.
    let shown: Value = serde_json::from_str(&cli(&["config", "show"])?)
        .map_err(|e| format!("config show is not JSON: {e}"))?;
    if shown["cluster_address"] != "127.0.0.1" || shown["cluster_port"] != t.cluster_port {
        return Err(format!("config show after -a/-p -d: {shown}"));
    }
    let node_id = wait_for(
        "the detached worker to register",
        Duration::from_secs(30),
        || {
            let c = t.cluster_status()?;
            Ok(node(&c)
                .ok()
                .filter(|n| n["active"] == true)
                .map(|n| n["id"].clone()))
        },
    )?;
    if !alive(pid) {
        return Err(format!("detached worker {pid} is gone"));
    }
    // `status` reads the daemon's status endpoint.
    let status: Value = wait_for(
        "NodeEngine status to say registered",
        Duration::from_secs(20),
        || {
            let v: Value = serde_json::from_str(&cli(&["status"])?).map_err(|e| e.to_string())?;
            Ok((v["registration"] == "registered").then_some(v))
        },
    )?;
    if status["node_id"] != node_id || status["node_name"] != WORKER_NAME {
        return Err(format!(
            "NodeEngine status {status} vs the cluster's node {node_id}"
        ));
    }
    println!(
        "detached worker pid {pid}: registered as {node_id} after {:.1} s; status says {} / broker {}",
        t0.elapsed().as_secs_f64(),
        status["registration"],
        status["broker"]["state"]
    );
    // `stop` finds the daemon by its pid file and ends it.
    cli(&["stop"])?;
    wait_for(
        "the detached worker to exit",
        Duration::from_secs(15),
        || Ok((!alive(pid)).then_some(())),
    )?;
    detached.0 = None;
    if cli(&["status"]).is_ok() {
        return Err("NodeEngine status still answers after stop".into());
    }
    println!(
        "drill legacy-cli: {:.1} s (-d returned in {} ms)",
        started.elapsed().as_secs_f64(),
        took.as_millis()
    );
    Ok(())
}
