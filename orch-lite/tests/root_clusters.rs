//! The root's cluster side over real HTTP: moving instances off a cluster that stops reporting
//! (OAK_CLUSTER_TIMEOUT_S shortened through the config), reconciliation when it comes back, and
//! a deploy to an unreachable cluster ending FAILED instead of CLUSTER_SCHEDULED forever.
//! Clusters are the temporary stand-in of `root_support` until the cluster role lands.

mod root_support;

use root_support::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SLA: &str = include_str!("../src/root/testdata/clientsrvr.json");

fn nginx_id(r: std::net::SocketAddr, t: &str) -> String {
    let (code, apps) = http(r, "POST", "/api/application/", Some(t), Some(SLA));
    assert_eq!(code, 200, "{apps}");
    let (_, svcs) = http(r, "GET", "/api/services/", Some(t), None);
    svcs.as_array()
        .unwrap()
        .iter()
        .find(|s| s["microservice_name"] == "nginx")
        .unwrap()["_id"]["$oid"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn instances_of_a_silent_cluster_move_to_another_and_the_old_one_is_told() {
    let dir = data_dir("silent");
    let mut c = config(&dir);
    c.cluster_timeout = Duration::from_secs(1);
    let root = start(c);
    let r = root.addr();
    let t = login(r);
    let sid = nginx_id(r, &t);
    let (a, b) = (ClusterStandIn::start(), ClusterStandIn::start());
    let a_id = a.register(r, "clusterA", 1.0); // least loaded: gets the instance
    let b_id = b.register(r, "clusterB", 50.0);

    // B keeps reporting; A falls silent after the deploy.
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = {
        let (stop, b_id) = (stop.clone(), b_id.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let report = json!({"vcpus": 4, "memory": 3500, "cpu_percent": 50.0, "virtualization": ["docker"], "jobs": []});
                http(
                    r,
                    "POST",
                    &format!("/api/information/{b_id}"),
                    Some(JOIN),
                    Some(&report.to_string()),
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    http(
        r,
        "POST",
        &format!("/api/service/{sid}/instance"),
        Some(&t),
        None,
    );
    wait_for("deploy to A", Duration::from_secs(10), || {
        !a.calls().is_empty()
    });
    assert_eq!(a.calls()[0].1, format!("/api/service/{sid}/0"));
    let ip_before = http(r, "GET", &format!("/api/service/{sid}"), Some(&t), None).1
        ["instance_list"][0]["instance_ip"]
        .clone();

    wait_for(
        "deploy to B after A's timeout",
        Duration::from_secs(15),
        || {
            b.calls()
                .iter()
                .any(|(m, p, _, _)| m == "POST" && *p == format!("/api/service/{sid}/0"))
        },
    );
    let (_, job) = http(r, "GET", &format!("/api/service/{sid}"), Some(&t), None);
    let inst = &job["instance_list"][0];
    assert_eq!(inst["cluster_id"], b_id.as_str());
    assert_eq!(
        (inst["instance_number"].as_u64(), &inst["instance_ip"]),
        (Some(0), &ip_before),
        "same number and IP"
    );
    let (_, active) = http(r, "GET", "/api/clusters/active", Some(&t), None);
    assert_eq!(active.as_array().unwrap().len(), 1);
    assert_eq!(active[0]["cluster_name"], "clusterB");

    // A comes back still running instance 0: the root tells it to drop it.
    let stale = json!({"vcpus": 4, "memory": 3500, "jobs": [{"_id": sid, "status": "RUNNING",
        "instance_list": [{"instance_number": 0, "status": "RUNNING"}]}]});
    assert_eq!(
        http(
            r,
            "POST",
            &format!("/api/information/{a_id}"),
            Some(JOIN),
            Some(&stale.to_string())
        )
        .0,
        200
    );
    wait_for("undeploy on A", Duration::from_secs(10), || {
        a.calls()
            .iter()
            .any(|(m, p, _, _)| m == "DELETE" && *p == format!("/api/service/{sid}/0"))
    });
    let status = http(r, "GET", &format!("/api/service/{sid}"), Some(&t), None).1["instance_list"]
        [0]["cluster_id"]
        .clone();
    assert_eq!(
        status,
        Value::from(b_id),
        "A's stale report does not take the instance back"
    );
    stop.store(true, Ordering::Relaxed);
    reporter.join().unwrap();
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deploy_to_an_unreachable_cluster_ends_failed_with_a_reason() {
    let dir = data_dir("unreachable");
    let root = start(config(&dir));
    let r = root.addr();
    let t = login(r);
    let sid = nginx_id(r, &t);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let body = json!({"cluster_name": "gone", "manager_port": closed, "cluster_address": "127.0.0.1",
                      "vcpus": 2, "memory": 1000, "virtualization": ["docker"]});
    assert_eq!(
        http(
            r,
            "POST",
            "/api/clusters/register",
            Some(JOIN),
            Some(&body.to_string())
        )
        .0,
        200
    );
    http(
        r,
        "POST",
        &format!("/api/service/{sid}/instance"),
        Some(&t),
        None,
    );
    // Five attempts with 0.5+1+2+4 s of backoff.
    wait_for("FAILED after the retries", Duration::from_secs(20), || {
        http(r, "GET", &format!("/api/service/{sid}"), Some(&t), None).1["instance_list"][0]
            ["status"]
            == "FAILED"
    });
    let (_, job) = http(r, "GET", &format!("/api/service/{sid}"), Some(&t), None);
    let detail = job["instance_list"][0]["status_detail"].as_str().unwrap();
    assert!(
        detail.contains("cluster gone") && detail.contains("cannot connect"),
        "{detail}"
    );
    assert_eq!(job["status"], "FAILED");
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn direct_constraint_to_an_unknown_cluster_gives_upstreams_status() {
    let dir = data_dir("direct");
    let root = start(config(&dir));
    let r = root.addr();
    let t = login(r);
    let mut sla: Value = serde_json::from_str(SLA).unwrap();
    sla["applications"][0]["microservices"][1]["constraints"] =
        json!([{"type": "direct", "cluster": "elsewhere"}]);
    assert_eq!(
        http(
            r,
            "POST",
            "/api/application/",
            Some(&t),
            Some(&sla.to_string())
        )
        .0,
        200
    );
    let (_, svcs) = http(r, "GET", "/api/services/", Some(&t), None);
    let sid = svcs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["microservice_name"] == "nginx")
        .unwrap()["microserviceID"]
        .as_str()
        .unwrap()
        .to_string();
    let cluster = ClusterStandIn::start();
    cluster.register(r, "here", 0.0);
    let (code, v) = http(
        r,
        "POST",
        &format!("/api/service/{sid}/instance"),
        Some(&t),
        None,
    );
    assert_eq!(
        (code, v["status"].as_str()),
        (200, Some("TargetClusterNotFound"))
    );
    let (_, job) = http(r, "GET", &format!("/api/service/{sid}"), Some(&t), None);
    assert_eq!(job["status"], "TargetClusterNotFound");
    assert!(job["status_detail"].as_str().unwrap().contains("elsewhere"));
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}
