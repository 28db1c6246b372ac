//! Worker-level failure drills with the real runtime (issues #8.4 and #3.4): `orch-lite all`
//! (embedded broker) and two `NodeEngine`s, each with its own containerd (see `e2e::world`), as
//! separate processes; an application posted to the root API like a user does. Each drill breaks
//! one thing and checks what the root, the cluster and containerd say afterwards:
//!
//! 1. a worker dies (SIGKILL): its instances run on the other worker within 40 s;
//! 2. a worker restarts (SIGTERM, start again): its containers are adopted, not duplicated;
//! 3. a container crashes: DEAD with the exit code at the root, retried with a growing backoff;
//! 4. (#3.4) the cluster and broker freeze for 60 s (SIGSTOP) while an instance is killed: the
//!    worker reconnects, the change arrives late, the untouched instance keeps running.
//!
//! Root only (containerd, runc, cgroups): `e2e::require_root`. Each prints `drill <name>: N s`;
//! run with `--nocapture` to see them.

use e2e::root::{Root, Service};
use e2e::wait_for;
use e2e::world::{cgroup_of, kill_pid, Options, World};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const APP: &str = "drills";

/// One application whose services all run the fixture's busybox with `cmd`.
fn sla(image: &str, services: &[(&str, &[&str])]) -> Value {
    let ms: Vec<Value> = services
        .iter()
        .map(|(name, cmd)| {
            json!({
                "microserviceID": "",
                "microservice_name": name,
                "microservice_namespace": "test",
                "virtualization": "container",
                "cmd": cmd,
                "memory": 50, "vcpus": 1, "vgpus": 0, "vtpus": 0,
                "bandwidth_in": 0, "bandwidth_out": 0, "storage": 0,
                "code": image,
                "state": "",
                "port": "",
                "added_files": []
            })
        })
        .collect();
    json!({
        "sla_version": "v2.0",
        "customerID": "Admin",
        "applications": [{
            "applicationID": "",
            "application_name": APP,
            "application_namespace": "test",
            "application_desc": "failure drills",
            "microservices": ms
        }]
    })
}

/// Creates the application and returns its service `name`.
fn service(w: &World, name: &str, cmd: &[&str]) -> Service {
    let image = w.workers[0].fx.image.clone();
    let app = w
        .root
        .create_app(&sla(&image, &[(name, cmd)]), APP)
        .unwrap_or_else(|e| panic!("{e}"));
    w.root
        .find_service(&app, name)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Status and worker id of instance `n` at the root.
fn at_root(root: &Root, s: &Service, n: u64) -> (String, String, String) {
    let i = root
        .instance(&s.id, n)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or(Value::Null);
    (
        i["status"].as_str().unwrap_or("").to_owned(),
        i["worker_id"].as_str().unwrap_or("").to_owned(),
        i["status_detail"].as_str().unwrap_or("").to_owned(),
    )
}

/// Index of the worker the root places instance `n` on.
fn placed_on(w: &World, s: &Service, n: u64) -> usize {
    let (_, worker, _) = at_root(&w.root, s, n);
    w.worker_index(&worker)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("instance {n} is on unknown worker {worker:?}"))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Drill 1. The cluster's node timeout is 10 s (`OAK_NODE_TIMEOUT_MS=10000`): a silent worker's
/// instances are FAILED after 10 s and retried after the first backoff (2 s), so the bound of
/// 40 s leaves room for the pull on the other worker and a loaded machine. The killed worker's
/// containers keep running in its containerd (nobody is left to stop them): the rescheduled
/// instance of the same id must not share their cgroup.
#[test]
fn drill_worker_sigkill_moves_instances_to_the_other_worker() {
    if !e2e::require_root("drill_worker_sigkill_moves_instances_to_the_other_worker") {
        return;
    }
    let _one_at_a_time = e2e::serial();
    let mut w = World::start(
        "kill",
        Options {
            node_timeout_ms: 10_000,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let s = service(&w, "sleeper", &["sleep", "100000"]);
    let mut numbers = Vec::new();
    for _ in 0..2 {
        let (n, d) = w
            .root
            .deploy(&s, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        println!("deployed instance {n} in {} ms", d.as_millis());
        numbers.push(n);
    }
    // Best fit packs both on one worker; kill that one.
    let a = placed_on(&w, &s, numbers[0]);
    let b = 1 - a;
    let b_id = w.node_ids().unwrap()[b]
        .clone()
        .expect("worker b registered");
    let on_a: Vec<u64> = numbers
        .iter()
        .copied()
        .filter(|n| placed_on(&w, &s, *n) == a)
        .collect();
    let orphans: Vec<(u64, u32)> = on_a
        .iter()
        .map(|n| {
            let pid = w.workers[a]
                .task_pid(&s.container(*n))
                .unwrap()
                .unwrap_or_else(|| panic!("no task for instance {n} on worker {a}"));
            (*n, pid)
        })
        .collect();

    let t0 = Instant::now();
    w.proc(a).unwrap().kill();
    let moved = wait_for(
        "the killed worker's instances RUNNING on the other worker",
        Duration::from_secs(40),
        || {
            let all = on_a.iter().all(|n| {
                let (st, worker, _) = at_root(&w.root, &s, *n);
                st == "RUNNING" && worker == b_id
            });
            Ok(all.then(|| t0.elapsed()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "drill worker_sigkill: {:.1} s until {} instance(s) RUNNING on the other worker (node timeout 10 s)",
        secs(moved),
        on_a.len()
    );
    assert!(moved < Duration::from_secs(40));

    for (n, orphan) in &orphans {
        let id = s.container(*n);
        let pid = w.workers[b]
            .task_pid(&id)
            .unwrap()
            .unwrap_or_else(|| panic!("{id}: no running task in worker b's containerd"));
        // The orphan on the dead worker's containerd still runs (nobody stopped it) ...
        assert_eq!(
            w.workers[a].task_pid(&id).unwrap(),
            Some(*orphan),
            "{id}: the orphan on the killed worker changed"
        );
        // ... and the new copy of the same id has a cgroup of its own: a shared one would mix
        // their limits and metrics, and a kill of all its processes would hit both.
        for ctl in ["memory", "cpu", "freezer"] {
            let (old, new) = (cgroup_of(*orphan, ctl), cgroup_of(pid, ctl));
            assert!(old.is_some() && new.is_some(), "{id}: no {ctl} cgroup");
            assert_ne!(old, new, "{id}: both copies share the {ctl} cgroup");
        }
    }
    // The cluster counted the failure and the retry.
    let st = w.cluster_status().unwrap();
    assert!(
        st["counters"]["reschedules"].as_u64() >= Some(on_a.len() as u64),
        "{st}"
    );
    w.finish().unwrap_or_else(|e| panic!("{e}"));
}

/// Drill 2. A worker stopped with SIGTERM and started again with the same state dir adopts its
/// containers: the same task keeps running, containerd holds one container per instance, the
/// root never sees the instance leave RUNNING and the other worker never gets a copy.
#[test]
fn drill_worker_restart_adopts_without_duplicates() {
    if !e2e::require_root("drill_worker_restart_adopts_without_duplicates") {
        return;
    }
    let _one_at_a_time = e2e::serial();
    let mut w = World::start(
        "restart",
        Options {
            node_timeout_ms: 10_000,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let s = service(&w, "sleeper", &["sleep", "100000"]);
    let (n, _) = w
        .root
        .deploy(&s, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let id = s.container(n);
    let a = placed_on(&w, &s, n);
    let b = 1 - a;
    let a_id = w.node_ids().unwrap()[a]
        .clone()
        .expect("worker a registered");
    let pid = w.workers[a].task_pid(&id).unwrap().expect("a running task");

    // Watch the root while the worker is away and back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (root, s, stop) = (w.root.clone(), s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen: Vec<(String, String)> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (st, worker, _) = at_root(&root, &s, n);
                if seen.last() != Some(&(st.clone(), worker.clone())) {
                    seen.push((st, worker));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    let t0 = Instant::now();
    let st = w.proc(a).unwrap().stop().unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "NodeEngine exited with {st}");
    w.workers[a].proc = None;
    assert_eq!(
        w.workers[a].task_pid(&id).unwrap(),
        Some(pid),
        "the stop touched the task"
    );
    w.start_worker(a).unwrap();
    // Back: the new process reports the instance again (jobs/resources carries it).
    let worker_a = &w.workers[a];
    wait_for(
        "the restarted worker's reports",
        Duration::from_secs(30),
        || {
            Ok(worker_a
                .metric("oak_worker_reports_sent_total{topic=\"jobs/resources\"}")
                .ok()
                .flatten()
                .filter(|v| *v >= 4.0))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let back = t0.elapsed();
    // A few more report rounds at the root before judging.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().expect("the watcher thread");
    println!(
        "drill worker_restart: {:.1} s from SIGTERM to reports of the restarted worker; root saw {seen:?}",
        secs(back)
    );
    assert_eq!(
        w.workers[a].task_pid(&id).unwrap(),
        Some(pid),
        "the task changed"
    );
    assert_eq!(w.workers[a].containers().unwrap(), vec![id.clone()]);
    assert!(
        !w.workers[b].containers().unwrap().contains(&id),
        "a copy on the other worker"
    );
    assert_eq!(
        seen,
        vec![("RUNNING".to_owned(), a_id.clone())],
        "the root saw the instance leave RUNNING or its worker"
    );
    let log = std::fs::read_to_string(w.workers[a].log().unwrap()).unwrap_or_default();
    assert!(log.contains(&format!("{id}: adopted, running")), "{log}");
    let inst = w.cluster_instance(&s.job_name, n).unwrap().expect("known");
    assert_eq!(inst["attempts"], 0, "{inst}");
    assert_eq!(w.cluster_counter("reschedules").unwrap(), 0);
    w.finish().unwrap_or_else(|e| panic!("{e}"));
}

/// One observed state of an instance at the cluster.
#[derive(Debug, Clone)]
struct Seen {
    at: Duration,
    status: String,
    worker: String,
    detail: String,
    attempts: u64,
}

/// Drill 3. A container that exits with code 3 after a second: DEAD at the root with the exit
/// code in `status_detail`, then retried by the cluster (orch-lite/src/cluster/instance.rs):
/// after a backoff that doubles per consecutive failure, on the other worker first.
#[test]
fn drill_crashing_container_is_reported_and_retried_with_backoff() {
    if !e2e::require_root("drill_crashing_container_is_reported_and_retried_with_backoff") {
        return;
    }
    let _one_at_a_time = e2e::serial();
    let w = World::start(
        "crash",
        Options {
            node_timeout_ms: 10_000,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let s = service(&w, "crasher", &["sh", "-c", "sleep 1; exit 3"]);
    let t0 = Instant::now();
    let n = w.root.add_instance(&s).unwrap_or_else(|e| panic!("{e}"));
    // The root's view: DEAD (or FAILED) naming the exit code.
    let detail = wait_for("the crash at the root", Duration::from_secs(60), || {
        let (st, _, detail) = at_root(&w.root, &s, n);
        Ok(matches!(st.as_str(), "DEAD" | "FAILED").then_some((st, detail)))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "crash at the root after {:.1} s: {detail:?}",
        secs(t0.elapsed())
    );
    assert!(detail.1.contains("code 3"), "{detail:?}");

    // The cluster's view over three failures: every transition with its time.
    let mut seen: Vec<Seen> = Vec::new();
    let failures = |seen: &[Seen]| {
        seen.iter()
            .filter(|x| matches!(x.status.as_str(), "DEAD" | "FAILED"))
            .count()
    };
    wait_for("three failed attempts", Duration::from_secs(60), || {
        let i = w.cluster_instance(&s.job_name, n)?.unwrap_or(Value::Null);
        let now = Seen {
            at: t0.elapsed(),
            status: i["status"].as_str().unwrap_or("").to_owned(),
            worker: i["worker_id"].as_str().unwrap_or("").to_owned(),
            detail: i["status_detail"].as_str().unwrap_or("").to_owned(),
            attempts: i["attempts"].as_u64().unwrap_or(0),
        };
        if seen.last().map_or(true, |l| {
            (&l.status, &l.worker) != (&now.status, &now.worker)
        }) {
            seen.push(now);
        }
        Ok(
            (failures(&seen) >= 3 && seen.last().is_some_and(|l| l.status == "NODE_SCHEDULED"))
                .then_some(()),
        )
    })
    .unwrap_or_else(|e| panic!("{e}: {seen:#?}"));
    println!(
        "drill crash_loop: {:.1} s; cluster saw:",
        secs(t0.elapsed())
    );
    for x in &seen {
        println!(
            "  {:6.1} s {:16} attempts {} worker {} {}",
            secs(x.at),
            x.status,
            x.attempts,
            x.worker,
            x.detail
        );
    }
    // Backoff: from each failure to the next placement.
    let mut waits = Vec::new();
    let mut workers = Vec::new();
    for (k, x) in seen.iter().enumerate() {
        if matches!(x.status.as_str(), "DEAD" | "FAILED") {
            if let Some(next) = seen[k..].iter().find(|y| y.status == "NODE_SCHEDULED") {
                waits.push(next.at.saturating_sub(x.at));
                workers.push(next.worker.clone());
            }
        }
    }
    assert!(waits.len() >= 3, "{seen:#?}");
    assert!(
        waits[0] >= Duration::from_millis(1500),
        "retried without a backoff: {waits:?}"
    );
    // Consecutive failures double the wait (2 s, 4 s, 8 s): a crash loop slows down instead of
    // restarting every few seconds forever.
    assert!(
        waits[2] >= waits[0] * 3,
        "the backoff does not grow over consecutive crashes: {waits:?} {seen:#?}"
    );
    // Each retry avoids the worker the last attempt failed on: with two, they alternate.
    assert!(
        workers.windows(2).all(|p| p[0] != p[1] && !p[0].is_empty()),
        "a retry went to the worker it had just failed on: {workers:?}"
    );
    assert!(w.cluster_counter("reschedules").unwrap() >= 3);
    assert!(w.cluster_counter("instances_failed").unwrap() >= 3);
    w.finish().unwrap_or_else(|e| panic!("{e}"));
}

/// Drill 4 (#3.4, outage with real instances). One worker runs two instances; `orch-lite all`
/// (cluster and embedded broker) is frozen with SIGSTOP for 60 s. Meanwhile the first instance's
/// task is killed (SIGKILL) so a status change happens while the worker cannot report it. After
/// SIGCONT: the second instance never stopped (same pid), the worker reconnected (its reconnect
/// counter), the change is visible at the root, the untouched instance is still RUNNING, and the
/// worker's reports are fresh at the cluster. Node timeout: the default 30 s, shorter than the
/// outage, so the cluster must not blame the worker for its own freeze.
#[test]
fn drill_3_4_outage_frozen_broker_with_running_instances() {
    if !e2e::require_root("drill_3_4_outage_frozen_broker_with_running_instances") {
        return;
    }
    let _one_at_a_time = e2e::serial();
    let w = World::start(
        "outage",
        Options {
            workers: 1,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let s = service(&w, "sleeper", &["sleep", "100000"]);
    let (victim, _) = w
        .root
        .deploy(&s, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let (bystander, _) = w
        .root
        .deploy(&s, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let wk = &w.workers[0];
    let (victim_id, bystander_id) = (s.container(victim), s.container(bystander));
    let victim_pid = wk.task_pid(&victim_id).unwrap().expect("victim runs");
    let bystander_pid = wk.task_pid(&bystander_id).unwrap().expect("bystander runs");
    let reconnects = |wk: &e2e::world::Worker| {
        wk.metric("oak_worker_mqtt_reconnects_total")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or(0.0)
    };
    let reconnects_before = reconnects(wk);

    let t0 = Instant::now();
    w.orch().signal("STOP").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    kill_pid(victim_pid, "KILL").unwrap();
    // The worker notices the broker is gone (keepalive) during the outage.
    let noticed = wait_for(
        "the worker to notice the frozen broker",
        Duration::from_secs(54),
        || {
            let st = e2e::ok("GET", &format!("http://{}/status", wk.status), None, None)?;
            Ok((st["broker"]["state"] == "disconnected").then(|| t0.elapsed()))
        },
    );
    let remaining = Duration::from_secs(60).saturating_sub(t0.elapsed());
    std::thread::sleep(remaining);
    let bystander_at_end = wk.task_pid(&bystander_id).unwrap();
    w.orch().signal("CONT").unwrap();
    let t1 = Instant::now();
    let noticed = noticed.unwrap_or_else(|e| panic!("{e}"));
    println!(
        "the worker saw the broker gone {:.1} s into the outage",
        secs(noticed)
    );
    assert_eq!(
        bystander_at_end,
        Some(bystander_pid),
        "the untouched instance stopped during the outage"
    );

    // Back: the worker reconnects.
    wait_for("the worker to reconnect", Duration::from_secs(30), || {
        Ok((reconnects(wk) > reconnects_before).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let reconnected = t1.elapsed();
    // The victim's end reaches the root (DEAD, killed by signal 9), maybe already retried.
    let mut victim_seen = Vec::new();
    let mut bystander_seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let (st, _, detail) = at_root(&w.root, &s, victim);
        if victim_seen.last().map(|(s, _)| s) != Some(&st) {
            victim_seen.push((st, detail));
        }
        let (st, _, _) = at_root(&w.root, &s, bystander);
        if bystander_seen.last() != Some(&st) {
            bystander_seen.push(st);
        }
        if victim_seen
            .iter()
            .any(|(s, _)| s == "DEAD" || s == "FAILED")
            && victim_seen.last().is_some_and(|(s, _)| s == "RUNNING")
            && t1.elapsed() > Duration::from_secs(5)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let visible = t1.elapsed();
    println!(
        "drill outage_3_4: 60 s freeze; reconnect {:.1} s after SIGCONT, root saw victim {victim_seen:?} and bystander {bystander_seen:?} within {:.1} s",
        secs(reconnected),
        secs(visible)
    );
    let death = victim_seen
        .iter()
        .find(|(s, _)| s == "DEAD" || s == "FAILED")
        .unwrap_or_else(|| panic!("the victim's end never reached the root: {victim_seen:?}"));
    assert!(death.1.contains("signal 9"), "{death:?}");
    assert_eq!(
        bystander_seen,
        vec!["RUNNING".to_owned()],
        "the untouched instance left RUNNING after the outage"
    );
    assert_eq!(
        wk.task_pid(&bystander_id).unwrap(),
        Some(bystander_pid),
        "the untouched instance was restarted after the outage"
    );
    // Reports resumed: the cluster heard from the worker just now, the root counts it active.
    let st = w.cluster_status().unwrap();
    assert!(
        st["nodes"][0]["last_seen_s_ago"].as_u64() <= Some(2),
        "{st}"
    );
    assert_eq!(st["nodes"][0]["active"], true, "{st}");
    w.root
        .wait_workers(1, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    w.finish().unwrap_or_else(|e| panic!("{e}"));
}
