//! The root role over real HTTP, driven the way the documented curl calls and the `oak` CLI
//! drive it (spec §9): login, SLA, listings with and without trailing slashes, instances,
//! clusters, auth failures, restart persistence. Clusters are the temporary stand-in of
//! `root_support` until the cluster role lands.

mod root_support;

use root_support::*;
use serde_json::{json, Value};
use std::time::Duration;

const SLA: &str = include_str!("../src/root/testdata/clientsrvr.json");

#[test]
fn getting_started_flow_over_http() {
    let dir = data_dir("flow");
    let root = start(config(&dir));
    let r = root.addr();
    let t = login(r);
    let auth = Some(t.as_str());

    // Step 4: create the application; the Go CLI posts without the trailing slash.
    let (code, apps) = http(r, "POST", "/api/application", auth, Some(SLA));
    assert_eq!(code, 200, "{apps}");
    let aid = apps[0]["_id"]["$oid"].as_str().unwrap().to_string();
    assert_eq!(apps[0]["application_name"], "clientsrvr");
    assert_eq!(
        http(r, "POST", "/api/application/", auth, Some(SLA)).0,
        409,
        "repeating gives 409"
    );
    for path in ["/api/applications", "/api/applications/"] {
        let (code, v) = http(r, "GET", path, auth, None);
        assert_eq!((code, v.as_array().map(Vec::len)), (200, Some(1)), "{path}");
    }
    let (_, user) = http(r, "GET", "/api/user/Admin", auth, None);
    let uid = user["_id"]["$oid"].as_str().unwrap();
    assert_eq!(
        http(r, "GET", &format!("/api/applications/{uid}"), auth, None).1[0]["applicationID"],
        aid.as_str()
    );
    assert_eq!(
        http(r, "GET", &format!("/api/application/{aid}/"), auth, None).1["userId"],
        "Admin"
    );

    // Step 5: the services.
    let (code, svcs) = http(r, "GET", &format!("/api/services/{aid}/"), auth, None);
    assert_eq!(code, 200);
    let nginx = svcs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["job_name"] == "clientsrvr.test.nginx.test")
        .unwrap()
        .clone();
    assert_eq!(
        (nginx["RR_ip"].as_str(), nginx["image"].as_str()),
        (Some("10.30.30.30"), Some("docker.io/library/nginx:latest"))
    );
    assert_eq!(
        (
            nginx["port"].as_str(),
            nginx["next_instance_progressive_number"].as_u64()
        ),
        (Some("6080:80/tcp"), Some(0))
    );
    assert!(nginx.get("status").is_none());
    let sid = nginx["microserviceID"].as_str().unwrap().to_string();
    assert_eq!(
        http(r, "GET", "/api/services", auth, None)
            .1
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Step 2: a cluster registers and reports.
    let cluster = ClusterStandIn::start();
    let cid = cluster.register(r, "cluster1", 3.2);
    let (code, active) = http(r, "GET", "/api/clusters/active", auth, None);
    assert_eq!(code, 200);
    assert_eq!(active[0]["_id"], cid.as_str());
    assert_eq!(
        (
            active[0]["cluster_name"].as_str(),
            active[0]["active"].as_bool()
        ),
        (Some("cluster1"), Some(true))
    );
    assert_eq!(active[0]["port"], cluster.server.addr.port().to_string());
    assert_eq!(
        http(r, "GET", "/api/clusters/", auth, None)
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Step 6: deploy one nginx instance; the root delegates to the cluster (spec §4.4).
    let (code, v) = http(
        r,
        "POST",
        &format!("/api/service/{sid}/instance"),
        auth,
        None,
    );
    assert_eq!((code, v["message"].as_str()), (200, Some("ok")));
    wait_for("the deploy call", Duration::from_secs(10), || {
        !cluster.calls().is_empty()
    });
    let (method, path, bearer, body) = cluster.calls()[0].clone();
    assert_eq!(
        (method.as_str(), path),
        ("POST", format!("/api/service/{sid}/0"))
    );
    assert_eq!(bearer.as_deref(), Some(JOIN));
    assert_eq!(
        body["_id"],
        sid.as_str(),
        "_id is a plain string towards the cluster"
    );
    assert_eq!(
        (body["job_name"].as_str(), body["image"].as_str()),
        (
            Some("clientsrvr.test.nginx.test"),
            Some("docker.io/library/nginx:latest")
        )
    );
    assert_eq!(body["instance_list"].as_array().unwrap().len(), 1);
    assert_eq!(body["instance_list"][0]["status"], "CLUSTER_SCHEDULED");
    assert_eq!(body["instance_list"][0]["cluster_id"], cid.as_str());

    // Steps 6.10-7: the cluster pushes RUNNING, then reports.
    let push = json!({"jobs": [{"_id": sid, "job_name": "clientsrvr.test.nginx.test", "status": "RUNNING",
        "instance_list": [{"instance_number": 0, "status": "RUNNING", "worker_id": "w1", "host_ip": "192.168.1.20",
                           "host_port": "3000", "publicip": "192.168.1.20", "cpu_percent": "0.01", "logs": "hello"}]}]});
    assert_eq!(
        http(
            r,
            "POST",
            &format!("/api/information/{cid}/jobs"),
            Some(JOIN),
            Some(&push.to_string())
        )
        .0,
        200
    );
    let (_, job) = http(r, "GET", &format!("/api/service/{sid}"), auth, None);
    assert_eq!(job["status"], "RUNNING");
    let i = &job["instance_list"][0];
    assert_eq!(
        (
            i["status"].as_str(),
            i["worker_id"].as_str(),
            i["logs"].as_str()
        ),
        (Some("RUNNING"), Some("w1"), Some("hello"))
    );
    assert_eq!(
        i["instance_ip"], "10.30.0.2",
        "10.30.0.1 went to curl's round-robin address"
    );
    let report = json!({"vcpus": 4, "memory": 3400, "cpu_percent": 5.0, "active_nodes": 1, "virtualization": ["docker"], "jobs": [push["jobs"][0]]});
    assert_eq!(
        http(
            r,
            "POST",
            &format!("/api/information/{cid}"),
            Some(JOIN),
            Some(&report.to_string())
        ),
        (200, json!("ok"))
    );
    assert_eq!(
        http(r, "GET", "/api/clusters", auth, None).1[0]["memory"],
        3400
    );

    // Step 8: undeploy, then clean up.
    assert_eq!(
        http(
            r,
            "DELETE",
            &format!("/api/service/{sid}/instance/0"),
            auth,
            None
        ),
        (200, json!({"message": "ok"}))
    );
    wait_for("the undeploy call", Duration::from_secs(10), || {
        cluster.calls().len() >= 2
    });
    let (method, path, bearer, _) = cluster.calls()[1].clone();
    assert_eq!(
        (method.as_str(), path, bearer.as_deref()),
        ("DELETE", format!("/api/service/{sid}/0"), Some(JOIN))
    );
    assert_eq!(
        http(r, "GET", &format!("/api/service/{sid}"), auth, None).1["status"],
        "UNDEPLOYED"
    );
    assert_eq!(
        http(r, "DELETE", &format!("/api/application/{aid}"), auth, None),
        (200, json!({"message": "Application Deleted"}))
    );
    assert_eq!(http(r, "GET", "/api/applications", auth, None).1, json!([]));
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn auth_failures_and_cluster_endpoints_need_the_join_token() {
    let dir = data_dir("auth");
    let root = start(config(&dir));
    let r = root.addr();
    let bad_login = http(
        r,
        "POST",
        "/api/auth/login",
        None,
        Some(r#"{"username":"Admin","password":"Admin"}"#),
    );
    assert_eq!(
        bad_login.0, 401,
        "the configured password replaces the default"
    );
    for (method, path) in [
        ("GET", "/api/applications/"),
        ("POST", "/api/application/"),
        ("GET", "/api/services/"),
        ("GET", "/api/clusters/"),
        ("GET", "/api/clusters/active"),
        ("GET", "/api/user/Admin"),
        ("POST", "/api/service/abc/instance"),
    ] {
        let (code, v) = http(r, method, path, None, Some("{}"));
        assert_eq!(code, 401, "{method} {path}");
        assert!(v["message"].as_str().unwrap().contains("token"), "{v}");
        assert_eq!(
            http(r, method, path, Some("not.a.jwt"), Some("{}")).0,
            401,
            "{method} {path}"
        );
    }
    let t = login(r);
    let cluster_calls = [
        ("POST", "/api/clusters/register"),
        ("POST", "/api/information/abc"),
        ("POST", "/api/information/abc/jobs"),
        ("GET", "/api/net/subnet"),
        ("GET", "/api/net/service/a_b_c_d/instances"),
        ("POST", "/api/net/service/net_deploy_status"),
    ];
    for (method, path) in cluster_calls {
        assert_eq!(
            http(r, method, path, None, Some("{}")).0,
            401,
            "{method} {path} without token"
        );
        assert_eq!(
            http(r, method, path, Some(&t), Some("{}")).0,
            401,
            "{method} {path} with a user token"
        );
        assert_eq!(
            http(r, method, path, Some("wrong"), Some("{}")).0,
            401,
            "{method} {path} with a wrong token"
        );
    }
    assert_eq!(
        http(r, "POST", "/api/information/abc", Some(JOIN), Some("{}")).0,
        404,
        "unknown cluster → register again"
    );
    let (code, v) = http(
        r,
        "POST",
        "/api/clusters/register",
        Some(JOIN),
        Some(r#"{"manager_port":10100}"#),
    );
    assert_eq!(code, 400);
    assert!(
        v["message"].as_str().unwrap().starts_with("cluster_name"),
        "{v}"
    );
    // The API description is public and lists the routes.
    for path in ["/api/docs", "/api/openapi.json"] {
        let (code, doc) = http(r, "GET", path, None, None);
        assert_eq!(code, 200);
        assert!(doc["paths"]["/api/application/"]["post"].is_object());
    }
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_descriptor_is_rejected_with_the_field_named() {
    let dir = data_dir("sla");
    let root = start(config(&dir));
    let r = root.addr();
    let t = login(r);
    let mut sla: Value = serde_json::from_str(SLA).unwrap();
    sla["applications"][0]["microservices"][1]["addresses"]["rr_ip"] = json!("10.40.0.1");
    sla["applications"][0]["extra_key_from_the_dashboard"] = json!(true);
    let (code, v) = http(
        r,
        "POST",
        "/api/application/",
        Some(&t),
        Some(&sla.to_string()),
    );
    assert_eq!(code, 422);
    assert_eq!(
        v["message"].as_str().unwrap().split(':').next(),
        Some("applications[0].microservices[1].addresses.rr_ip"),
        "{v}"
    );
    assert_eq!(
        http(r, "GET", "/api/applications", Some(&t), None).1,
        json!([]),
        "nothing created"
    );
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restart_keeps_applications_and_the_signing_key() {
    let dir = data_dir("restart");
    let mut c = config(&dir);
    c.join_token = None; // generated and persisted
    let root = start(c.clone());
    let r = root.addr();
    let t = login(r);
    let join = root.join_token().to_string();
    assert_eq!(
        std::fs::read_to_string(dir.join("join-token"))
            .unwrap()
            .trim(),
        join
    );
    let (_, apps) = http(r, "POST", "/api/application/", Some(&t), Some(SLA));
    let aid = apps[0]["_id"]["$oid"].as_str().unwrap().to_string();
    let cluster = ClusterStandIn::start();
    let _cid = {
        let body = json!({"cluster_name": "c1", "manager_port": cluster.server.addr.port(), "cluster_address": "127.0.0.1"});
        http(
            r,
            "POST",
            "/api/clusters/register",
            Some(&join),
            Some(&body.to_string()),
        )
        .1["id"]
            .clone()
    };
    drop(root);

    let root = start(c);
    let r = root.addr();
    assert_eq!(root.join_token(), join, "join token survives");
    let (code, v) = http(r, "GET", &format!("/api/application/{aid}"), Some(&t), None);
    assert_eq!(code, 200, "the old token still works: {v}");
    assert_eq!(v["microservices"].as_array().unwrap().len(), 2);
    assert_eq!(
        http(r, "GET", "/api/clusters/", Some(&t), None).1[0]["cluster_name"],
        "c1"
    );
    // Addresses were re-derived: the nginx rr_ip is still taken.
    let mut again: Value = serde_json::from_str(SLA).unwrap();
    again["applications"][0]["application_name"] = json!("other");
    let (code, v) = http(
        r,
        "POST",
        "/api/application/",
        Some(&t),
        Some(&again.to_string()),
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("rr_ip"), "{v}");
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}
