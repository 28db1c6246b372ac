use super::*;
use crate::cluster::handlers::{on_message, NetRequest};
use std::sync::atomic::Ordering;

const T0: u64 = 1_700_000_000_000;

fn state_in(dir: &std::path::Path, token: Option<&str>, now: u64) -> ClusterState {
    let (store, _) = Store::open(dir).unwrap();
    ClusterState::load(
        store,
        StateConfig {
            cluster_name: "c1".into(),
            join_token: token.map(str::to_string),
            timeouts: Timeouts::default(),
        },
        Arc::new(Metrics::default()),
        now,
    )
}

fn worker(name: &str, machine: &str, vcpus: u64, memory: u64) -> NodeInfo {
    NodeInfo {
        host: name.into(),
        ip: format!("10.0.0.{}", name.len()),
        port: "3000".into(),
        vcpus,
        memory,
        architecture: "amd64".into(),
        virtualization: Some(vec!["docker".into()]),
        machine_id: Some(machine.into()),
        ..NodeInfo::default()
    }
}

fn job(name: &str, vcpus: f64, memory: u64) -> Value {
    json!({"_id": "ignored", "job_name": name, "image": "docker.io/library/nginx:latest",
           "virtualization": "docker", "vcpus": vcpus, "memory": memory,
           "instance_list": [{"instance_number": 0, "status": "CLUSTER_SCHEDULED"}]})
}

fn deploys(effects: &[Effect]) -> Vec<(String, Value)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish { topic, payload } if topic.ends_with("/control/deploy") => {
                Some((topic.clone(), serde_json::from_slice(payload).unwrap()))
            }
            _ => None,
        })
        .collect()
}

fn published(effects: &[Effect], suffix: &str) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish { topic, .. } if topic.ends_with(suffix) => Some(topic.clone()),
            _ => None,
        })
        .collect()
}

fn msg(s: &mut ClusterState, topic: &str, payload: &str, now: u64) -> Vec<Effect> {
    on_message(s, topic, payload.as_bytes(), now).effects
}

#[test]
fn object_ids_are_24_hex() {
    let id = object_id(T0, &[1, 2, 3, 4, 5], 7);
    assert_eq!(id.len(), 24);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(id.ends_with("0102030405000007"));
}

#[test]
fn registration_identity_conflicts_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), Some("s3cret"), T0);
    let mut w = worker("w1", "m-1", 4, 4000);
    let err = s.register(w.clone(), Some("10.0.0.1"), T0).unwrap_err();
    assert_eq!(err.status, 401);
    assert!(err.message.contains("OAK_JOIN_TOKEN"), "{}", err.message);
    w.token = Some("wrong".into());
    assert_eq!(s.register(w.clone(), None, T0).unwrap_err().status, 401);
    w.token = Some("s3cret".into());
    let id = s.register(w.clone(), Some("10.0.0.1"), T0).unwrap();
    assert_eq!(id.len(), 24);
    assert!(
        s.node(&id).unwrap().info.token.is_none(),
        "token not stored"
    );
    // Same machine again (even from another IP): same id.
    assert_eq!(
        s.register(w.clone(), Some("10.9.9.9"), T0 + 1000).unwrap(),
        id
    );
    // Another machine claiming the name while the first is active: 409 with advice.
    let mut other = w.clone();
    other.machine_id = Some("m-2".into());
    let err = s
        .register(other.clone(), Some("10.0.0.2"), T0 + 2000)
        .unwrap_err();
    assert_eq!(err.status, 409);
    assert!(err.message.contains("OAK_NODE_NAME"), "{}", err.message);
    // Stock workers (no machine_id) are told apart by source IP.
    let mut stock = worker("w2", "", 2, 2000);
    stock.machine_id = None;
    stock.token = Some("s3cret".into());
    let sid = s.register(stock.clone(), Some("10.0.0.5"), T0).unwrap();
    assert_eq!(
        s.register(stock.clone(), Some("10.0.0.5"), T0).unwrap(),
        sid
    );
    assert_eq!(
        s.register(stock.clone(), Some("10.0.0.6"), T0)
            .unwrap_err()
            .status,
        409
    );
    // Once the first holder has been silent for the node timeout, the name moves (new id).
    let later = T0 + 2000 + s.cfg.timeouts.node_silence_ms;
    let moved = s.register(other, Some("10.0.0.2"), later).unwrap();
    assert_ne!(moved, id);
    assert!(s.node(&id).is_none());
    assert_eq!(s.metrics.registrations_refused.load(Ordering::Relaxed), 4);
    // Empty names are refused.
    let mut nameless = worker("", "m-3", 1, 1);
    nameless.token = Some("s3cret".into());
    assert_eq!(s.register(nameless, None, T0).unwrap_err().status, 400);
}

#[test]
fn deploy_runs_and_survives_reload() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), None, T0);
    let w1 = s.register(worker("w1", "m1", 4, 4000), None, T0).unwrap();
    let eff = s
        .deploy("job1", 0, job("app.ns.svc.ns", 1.0, 100), T0)
        .unwrap();
    let d = deploys(&eff);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, format!("nodes/{w1}/control/deploy"));
    assert_eq!(d[0].1["instance_number"], 0);
    assert_eq!(d[0].1["job_name"], "app.ns.svc.ns");
    assert_eq!(d[0].1["_id"], "job1", "the URL's job id wins");
    assert!(eff.contains(&Effect::JobChanged("job1".into())));
    // Idempotent: the root retries.
    assert!(deploys(
        &s.deploy("job1", 0, job("app.ns.svc.ns", 1.0, 100), T0)
            .unwrap()
    )
    .is_empty());
    // The worker confirms, then lists it.
    msg(
        &mut s,
        &format!("nodes/{w1}/job"),
        r#"{"sname":"app.ns.svc.ns","status":"CREATED","status_detail":"","instance":0,"publicip":"1.2.3.4"}"#,
        T0 + 100,
    );
    assert_eq!(s.instance("job1", 0).unwrap().status, Status::Created);
    let eff = msg(
        &mut s,
        &format!("nodes/{w1}/jobs/resources"),
        r#"{"services":[{"job_name":"app.ns.svc.ns","instance":0,"cpu_percent":"0.5","memory_percent":"1","disk":"10","logs":"hi","virtualization":"docker"}]}"#,
        T0 + 200,
    );
    assert!(eff.contains(&Effect::JobChanged("job1".into())));
    let i = s.instance("job1", 0).unwrap();
    assert_eq!(
        (i.status, i.publicip.as_str(), i.cpu_percent.as_str()),
        (Status::Running, "1.2.3.4", "0.5")
    );
    assert_eq!(s.job_entries(None)[0]["status"], "RUNNING");
    drop(s);
    let s = state_in(dir.path(), None, T0 + 60_000);
    let i = s.instance("job1", 0).unwrap();
    assert_eq!(
        (i.status, i.worker_id.as_deref()),
        (Status::Running, Some(w1.as_str()))
    );
    assert_eq!(s.node(&w1).unwrap().name, "w1");
}

#[test]
fn bad_deploy_bodies_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), None, T0);
    assert!(s
        .deploy("j", 0, json!([1]), T0)
        .unwrap_err()
        .contains("JSON object"));
    assert!(s
        .deploy("j", 0, json!({"job_name": "a.b"}), T0)
        .unwrap_err()
        .contains("4 non-empty"));
    assert!(s
        .deploy("j/../x", 0, job("a.b.c.d", 1.0, 1), T0)
        .unwrap_err()
        .contains("job id"));
    assert!(s
        .deploy("j", 0, job("a.b.c.d", -1.0, 1), T0)
        .unwrap_err()
        .contains("non-negative"));
}

#[test]
fn no_worker_gives_negative_status_then_retries() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), None, T0);
    assert!(deploys(&s.deploy("j", 0, job("a.b.c.d", 1.0, 100), T0).unwrap()).is_empty());
    assert_eq!(s.instance("j", 0).unwrap().status, Status::NoNodeFound);
    let w = s
        .register(worker("w1", "m1", 1, 4000), None, T0 + 10)
        .unwrap();
    let eff = s.tick(T0 + 10 + s.cfg.timeouts.retry_base_ms);
    assert_eq!(deploys(&eff)[0].0, format!("nodes/{w}/control/deploy"));
    // Capacity: a second 1-vcpu instance does not fit on the 1-core worker...
    s.deploy("j", 1, job("a.b.c.d", 1.0, 100), T0 + 20).unwrap();
    let i = s.instance("j", 1).unwrap();
    assert_eq!(i.status, Status::NoWorkerCapacity);
    assert!(
        i.status_detail.contains("free vcpus"),
        "{}",
        i.status_detail
    );
    // ... until the first is undeployed (resources released).
    let eff = s.undeploy("j", Some(0));
    assert_eq!(
        published(&eff, "/control/delete"),
        [format!("nodes/{w}/control/delete")]
    );
    // Workers routing to the job re-query their tables (the overlay's service manager role).
    assert_eq!(
        published(&eff, "/updates_available"),
        ["jobs/a.b.c.d/updates_available"]
    );
    assert!(s.instance("j", 0).is_none());
    let eff = s.tick(T0 + 20 + s.cfg.timeouts.retry_base_ms * 4);
    assert_eq!(deploys(&eff).len(), 1);
    // Undeploy of everything forgets the job; unknown jobs are a no-op.
    s.undeploy("j", None);
    assert!(s.job_entries(None).is_empty());
    assert!(s.undeploy("nope", None).is_empty());
}

#[test]
fn silent_worker_instances_fail_and_move_to_another_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), None, T0);
    let w1 = s.register(worker("w1", "m1", 2, 2000), None, T0).unwrap();
    s.deploy("j", 0, job("a.b.c.d", 1.0, 100), T0).unwrap();
    msg(
        &mut s,
        &format!("nodes/{w1}/jobs/resources"),
        r#"{"services":[{"job_name":"a.b.c.d","instance":0,"cpu_percent":"0","memory_percent":"0","disk":"0"}]}"#,
        T0 + 1000,
    );
    assert_eq!(s.instance("j", 0).unwrap().status, Status::Running);
    // A second worker joins and keeps reporting; w1 goes silent.
    let w2 = s
        .register(worker("w2", "m2", 8, 8000), None, T0 + 2000)
        .unwrap();
    let timeout = s.cfg.timeouts.node_silence_ms;
    let mut now = T0 + 2000;
    let mut moved = None;
    let mut all = Vec::new();
    while now < T0 + 1000 + timeout + 10_000 {
        now += 500;
        msg(
            &mut s,
            &format!("nodes/{w2}/information"),
            r#"{"cpu_percent":1,"memory":8000,"vcpus":8}"#,
            now,
        );
        let eff = s.tick(now);
        all.extend(eff.clone());
        if let Some((t, _)) = deploys(&eff).into_iter().next() {
            moved = Some((t, now));
            break;
        }
    }
    let (topic, at) = moved.expect("rescheduled");
    assert_eq!(topic, format!("nodes/{w2}/control/deploy"));
    assert!(
        at - (T0 + 1000) <= timeout + 5000,
        "moved {} ms after the last report",
        at - T0 - 1000
    );
    assert!(published(&all, "/control/delete").contains(&format!("nodes/{w1}/control/delete")));
    let i = s.instance("j", 0).unwrap();
    assert_eq!(
        (i.status, i.worker_id.as_deref()),
        (Status::NodeScheduled, Some(w2.as_str()))
    );
    assert_eq!(s.metrics.reschedules.load(Ordering::Relaxed), 1);
    // The old worker comes back still running it: told to stop, the instance stays on w2.
    let eff = msg(
        &mut s,
        &format!("nodes/{w1}/jobs/resources"),
        r#"{"services":[{"job_name":"a.b.c.d","instance":0,"cpu_percent":"0","memory_percent":"0","disk":"0"}]}"#,
        now + 10,
    );
    assert_eq!(
        published(&eff, "/control/delete"),
        [format!("nodes/{w1}/control/delete")]
    );
    assert_eq!(
        s.instance("j", 0).unwrap().worker_id.as_deref(),
        Some(w2.as_str())
    );
}

#[test]
fn instance_missing_from_resources_fails_while_worker_reports() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), None, T0);
    let w1 = s.register(worker("w1", "m1", 2, 2000), None, T0).unwrap();
    s.deploy("j", 0, job("a.b.c.d", 1.0, 100), T0).unwrap();
    msg(
        &mut s,
        &format!("nodes/{w1}/jobs/resources"),
        r#"{"services":[{"job_name":"a.b.c.d","instance":0,"cpu_percent":"0","memory_percent":"0","disk":"0"}]}"#,
        T0,
    );
    let limit = s.cfg.timeouts.resources_ms;
    let mut now = T0;
    while now < T0 + limit {
        now += 1000;
        msg(&mut s, &format!("nodes/{w1}/information"), "{}", now);
        msg(
            &mut s,
            &format!("nodes/{w1}/jobs/resources"),
            r#"{"services":[]}"#,
            now,
        );
        s.tick(now);
    }
    let i = s.instance("j", 0).unwrap();
    assert!(
        matches!(
            i.status,
            Status::Failed | Status::Requested | Status::NodeScheduled
        ),
        "{:?}",
        i.status
    );
    assert_eq!(s.metrics.instances_failed.load(Ordering::Relaxed), 1);
}

#[test]
fn malformed_messages_are_counted_and_do_not_disturb_other_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), None, T0);
    let w1 = s.register(worker("w1", "m1", 4, 4000), None, T0).unwrap();
    s.deploy("j", 0, job("a.b.c.d", 1.0, 100), T0).unwrap();
    let bad: &[(&str, &str)] = &[
        ("job", "garbage"),
        ("job", "[1,2,3]"),
        (
            "job",
            r#"{"sname":"a.b.c.d","status":"EXPLODED","instance":0}"#,
        ),
        ("job", r#"{"sname":"a.b.c.d","status":null,"instance":0}"#),
        (
            "job",
            r#"{"sname":"a.b.c.d","status":"FAILED","instance":"x"}"#,
        ),
        ("jobs/resources", r#"{"services":null}"#),
        ("jobs/resources", r#"{"services":[{"job_name":5}]}"#),
        ("jobs/resources", "\u{0}\u{1}"),
        ("information", r#"{"vcpus":"many"}"#),
        ("information", "[]"),
        ("net/subnet", "{}"),
        ("net/tablequery/request", r#"{"sname":"","sip":""}"#),
        (
            "net/service/deployed",
            r#"{"appname":"x","instance_number":"a"}"#,
        ),
        ("net/whatever", "{}"),
    ];
    for (suffix, payload) in bad {
        assert_eq!(
            on_message(&mut s, &format!("nodes/x/{suffix}"), payload.as_bytes(), T0),
            Default::default(),
            "{suffix} {payload}"
        );
        on_message(
            &mut s,
            &format!("nodes/{w1}/{suffix}"),
            payload.as_bytes(),
            T0,
        );
    }
    let m = &s.metrics;
    assert_eq!(m.malformed_job.load(Ordering::Relaxed), 10);
    assert_eq!(m.malformed_resources.load(Ordering::Relaxed), 6);
    assert_eq!(m.malformed_information.load(Ordering::Relaxed), 4);
    assert_eq!(m.malformed_net.load(Ordering::Relaxed), 8);
    assert_eq!(
        s.instance("j", 0).unwrap().status,
        Status::NodeScheduled,
        "untouched"
    );
    // The same worker's next valid report is handled normally.
    msg(
        &mut s,
        &format!("nodes/{w1}/jobs/resources"),
        r#"{"services":[{"job_name":"a.b.c.d","instance":0,"cpu_percent":0.1,"memory_percent":"0","disk":"0"}]}"#,
        T0 + 1,
    );
    assert_eq!(s.instance("j", 0).unwrap().status, Status::Running);
    // Unknown nodes get upstream's control/error.
    let eff = msg(
        &mut s,
        "nodes/ffffffffffffffffffffffff/information",
        "{}",
        T0,
    );
    assert_eq!(published(&eff, "/control/error").len(), 1);
    // Valid net requests are handed on; our own echoed answers are ignored.
    let h = on_message(
        &mut s,
        &format!("nodes/{w1}/net/subnet"),
        br#"{"METHOD":"GET"}"#,
        T0,
    );
    assert_eq!(
        h.net,
        Some(NetRequest::Subnet {
            node_id: w1.clone()
        })
    );
    let h = on_message(
        &mut s,
        &format!("nodes/{w1}/net/tablequery/request"),
        br#"{"sname":"","sip":"10.30.1.30"}"#,
        T0,
    );
    assert!(matches!(h.net, Some(NetRequest::TableQuery { .. })));
    let h = on_message(
        &mut s,
        &format!("nodes/{w1}/net/subnetwork/result"),
        br#"{"address":"10.18.0.64"}"#,
        T0,
    );
    assert_eq!(h, Default::default());
    assert_eq!(s.metrics.malformed_net.load(Ordering::Relaxed), 8);
}

#[test]
fn report_aggregates_active_workers_and_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), None, T0);
    s.register(worker("w1", "m1", 4, 4000), None, T0).unwrap();
    let mut arm = worker("w2", "m2", 2, 1000);
    arm.architecture = "arm64".into();
    s.register(arm, None, T0).unwrap();
    s.deploy("j", 0, job("a.b.c.d", 1.0, 100), T0).unwrap();
    let r = s.report(T0 + 1000);
    assert_eq!(
        (
            r["vcpus"].as_u64(),
            r["memory"].as_u64(),
            r["active_nodes"].as_u64()
        ),
        (Some(6), Some(5000), Some(2))
    );
    assert_eq!(r["aggregation_per_architecture"]["arm64"]["vcpus"], 2);
    assert_eq!(r["jobs"][0]["_id"], "j");
    assert_eq!(r["jobs"][0]["instance_list"][0]["status"], "NODE_SCHEDULED");
    // After the node timeout nobody is active.
    let r = s.report(T0 + 1000 + s.cfg.timeouts.node_silence_ms);
    assert_eq!(r["active_nodes"], 0);
    let st = s.status(T0);
    assert_eq!(st["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(st["instances"][0]["job_name"], "a.b.c.d");
}

#[test]
fn broker_outage_does_not_fail_running_instances() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), None, T0);
    let w1 = s.register(worker("w1", "m1", 2, 2000), None, T0).unwrap();
    s.deploy("j", 0, job("a.b.c.d", 1.0, 100), T0).unwrap();
    msg(
        &mut s,
        &format!("nodes/{w1}/jobs/resources"),
        r#"{"services":[{"job_name":"a.b.c.d","instance":0,"cpu_percent":"0","memory_percent":"0","disk":"0"}]}"#,
        T0 + 1000,
    );
    assert_eq!(s.instance("j", 0).unwrap().status, Status::Running);
    let silence = s.cfg.timeouts.node_silence_ms;
    // The cluster loses its broker right after the worker's last word, for four node timeouts.
    s.broker_down(T0 + 1500);
    // Ticks come every 500 ms as in the running cluster (a longer gap would read as a stall
    // of the cluster itself, see the next test).
    let back = T0 + 1500 + 4 * silence;
    for now in (T0 + 2000..=back).step_by(500) {
        assert!(s.tick(now).is_empty());
    }
    assert_eq!(
        s.active_nodes(back - 1),
        1,
        "judged as of the disconnection"
    );
    s.broker_up(back);
    // The status keeps the real silence.
    let st = s.status(back + 1000);
    assert_eq!(
        st["nodes"][0]["last_seen_s_ago"],
        (back + 1000 - (T0 + 1000)) / 1000
    );
    // A full timeout from the reconnection, then the usual verdict.
    for now in (back + 500..back + silence - 1).step_by(500) {
        assert!(s.tick(now).is_empty());
    }
    assert!(s.tick(back + silence - 1).is_empty());
    assert_eq!(s.instance("j", 0).unwrap().status, Status::Running);
    assert_eq!(s.active_nodes(back + silence - 1), 1);
    s.tick(back + silence);
    assert_eq!(s.active_nodes(back + silence), 0);
    assert_eq!(
        s.instance("j", 0).unwrap().status,
        Status::Failed,
        "a worker still silent a full timeout after the broker's return is failed"
    );
}

/// The drill of #3.4: the cluster process is frozen (SIGSTOP) for 60 s, longer than the node
/// timeout. Its first tick afterwards must not blame the workers for its own silence; a worker
/// that stays silent after the freeze still fails its instances one timeout later.
#[test]
fn a_frozen_cluster_does_not_fail_the_workers_it_could_not_hear() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = state_in(dir.path(), None, T0);
    let w1 = s.register(worker("w1", "m1", 2, 2000), None, T0).unwrap();
    s.deploy("j", 0, job("a.b.c.d", 1.0, 100), T0).unwrap();
    let listed = r#"{"services":[{"job_name":"a.b.c.d","instance":0,"cpu_percent":"0","memory_percent":"0","disk":"0"}]}"#;
    let mut now = T0;
    for _ in 0..4 {
        now += 500;
        msg(&mut s, &format!("nodes/{w1}/jobs/resources"), listed, now);
        assert!(s.tick(now).is_empty());
    }
    assert_eq!(s.instance("j", 0).unwrap().status, Status::Running);
    // Frozen for 60 s; the node timeout is 30 s.
    now += 60_000;
    let eff = s.tick(now);
    assert!(published(&eff, "/control/delete").is_empty(), "{eff:?}");
    assert_eq!(s.instance("j", 0).unwrap().status, Status::Running);
    assert_eq!(s.active_nodes(now), 1);
    // The worker reports again: all well.
    now += 500;
    msg(&mut s, &format!("nodes/{w1}/jobs/resources"), listed, now);
    s.tick(now);
    assert_eq!(s.instance("j", 0).unwrap().status, Status::Running);
    // A worker that stays silent after the freeze is still found out, one timeout later.
    let timeout = s.cfg.timeouts.node_silence_ms;
    let last = now;
    while now < last + timeout - 500 {
        now += 500;
        s.tick(now);
    }
    assert_eq!(s.instance("j", 0).unwrap().status, Status::Running);
    now += 1000;
    let eff = s.tick(now);
    let i = s.instance("j", 0).unwrap();
    assert_eq!(i.status, Status::Failed, "{eff:?}");
    assert!(
        i.status_detail.contains("silent for 30 s"),
        "{}",
        i.status_detail
    );
}
