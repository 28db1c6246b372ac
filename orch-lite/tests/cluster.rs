//! The real `orch-lite cluster` binary against simulated workers speaking real MQTT and HTTP:
//! registration identity and token, deploy as the root does, RUNNING from `jobs/resources`,
//! garbage on worker topics, worker silence → FAILED → rescheduled, SIGKILL restart; then the
//! same flow against an external mosquitto (`OAK_MQTT_URL`).

mod cluster_support;

use cluster_support::*;
use serde_json::Value;
use std::time::Duration;

const TOKEN: &str = "join-me";

fn recv_deploy(w: &SimWorker, secs: u64) -> Value {
    w.deploys
        .recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("worker {} got no deploy within {secs} s", w.id))
}

#[test]
fn cluster_embedded_broker_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut orch = Orch::start(
        dir.path(),
        free_port(),
        &[("OAK_JOIN_TOKEN", TOKEN), ("OAK_NODE_TIMEOUT_MS", "3000")],
    );

    // Registration: token enforced, stable id, a second machine with the same name refused.
    let (code, body) = orch.register(&node_doc("w1", "machine-1", 4, 4000, None));
    assert_eq!(code, 401, "{body}");
    assert!(body["message"].as_str().unwrap().contains("OAK_JOIN_TOKEN"));
    let (code, body) = orch.register(&node_doc("w1", "machine-1", 4, 4000, Some(TOKEN)));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["MQTT_BROKER_PORT"],
        orch.mqtt.to_string(),
        "a string, as upstream"
    );
    let id1 = body["id"].as_str().unwrap().to_string();
    assert_eq!(id1.len(), 24);
    let (_, again) = orch.register(&node_doc("w1", "machine-1", 4, 4000, Some(TOKEN)));
    assert_eq!(again["id"], id1.as_str());
    let (code, body) = orch.register(&node_doc("w1", "machine-2", 4, 4000, Some(TOKEN)));
    assert_eq!(code, 409, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("another machine"));

    let w1 = SimWorker::connect(&id1, orch.mqtt, 4, 4000);
    let (_, b2) = orch.register(&node_doc("w2", "machine-2", 8, 8000, Some(TOKEN)));
    let id2 = b2["id"].as_str().unwrap().to_string();
    let w2 = SimWorker::connect(&id2, orch.mqtt, 8, 8000);

    // Deploy as the root does: bearer required, then the best fit (w1, the smaller) gets it.
    let job = job_doc("app.ns.nginx.ns");
    assert_eq!(orch.deploy("job1", 0, &job, None), 401);
    assert_eq!(orch.deploy("job1", 0, &job, Some(TOKEN)), 200);
    let d = recv_deploy(&w1, 10);
    assert_eq!(d["instance_number"], 0);
    assert_eq!(d["job_name"], "app.ns.nginx.ns");
    assert_eq!(d["image"], "docker.io/library/nginx:latest");
    assert_eq!(
        orch.deploy("job1", 0, &job, Some(TOKEN)),
        200,
        "idempotent retry"
    );

    // Garbage from a stranger and from w1 itself: counted, nothing else disturbed.
    mosquitto_pub(orch.mqtt, "nodes/x/job", "garbage");
    mosquitto_pub(
        orch.mqtt,
        &format!("nodes/{id1}/job"),
        r#"{"sname":"app.ns.nginx.ns","status":"BOGUS","instance":0}"#,
    );
    mosquitto_pub(
        orch.mqtt,
        &format!("nodes/{id2}/jobs/resources"),
        r#"{"services":null}"#,
    );
    wait_for(
        "RUNNING from jobs/resources",
        Duration::from_secs(10),
        || {
            orch.instance("job1", 0)
                .is_some_and(|i| i["status"] == "RUNNING")
        },
    );
    wait_for("malformed counters", Duration::from_secs(5), || {
        orch.counter("malformed_job") == 2 && orch.counter("malformed_resources") == 1
    });
    let m = orch.metrics();
    assert!(m.contains("orch_lite_cluster_malformed_job_total 2"), "{m}");
    assert_eq!(orch.instance("job1", 0).unwrap()["worker_id"], id1.as_str());

    // w1 goes silent: its instance fails and moves to w2 within the timeout plus a retry.
    w1.alive.store(false, std::sync::atomic::Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    let d = recv_deploy(&w2, 20);
    assert_eq!(
        (d["job_name"].as_str(), d["instance_number"].as_u64()),
        (Some("app.ns.nginx.ns"), Some(0))
    );
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "moved after {:?}",
        t0.elapsed()
    );
    assert!(
        w1.deletes.recv_timeout(Duration::from_secs(5)).is_ok(),
        "old worker told to stop"
    );
    wait_for("RUNNING on w2", Duration::from_secs(10), || {
        orch.instance("job1", 0)
            .is_some_and(|i| i["status"] == "RUNNING" && i["worker_id"] == id2.as_str())
    });
    assert_eq!(orch.counter("reschedules"), 1);

    // SIGKILL and restart: workers, jobs and placements survive; ids stay stable.
    orch.kill_and_restart();
    let st = orch.status();
    assert_eq!(st["nodes"].as_array().unwrap().len(), 2, "{st}");
    let i = orch.instance("job1", 0).expect("instance survived");
    assert_eq!(i["worker_id"], id2.as_str());
    assert_eq!(i["status"], "RUNNING");
    let (_, again) = orch.register(&node_doc("w1", "machine-1", 4, 4000, Some(TOKEN)));
    assert_eq!(again["id"], id1.as_str());

    // Undeploy (the root's DELETE): the worker is told, the instance is gone.
    let rq = ureq::delete(&orch.url("/api/service/job1/-1"))
        .set("Authorization", &format!("Bearer {TOKEN}"));
    assert_eq!(status_of(rq.call()), 200);
    let del = w2
        .deletes
        .recv_timeout(Duration::from_secs(10))
        .expect("delete after restart");
    assert_eq!(del["instance_number"], 0);
    assert!(orch.instance("job1", 0).is_none());
}

#[test]
fn cluster_external_mosquitto_same_flow() {
    let dir = tempfile::tempdir().unwrap();
    let mosq = Mosquitto::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let orch = Orch::start(
        dir.path(),
        mosq.port,
        &[("OAK_MQTT_URL", &format!("mqtt://127.0.0.1:{}", mosq.port))],
    );
    let (code, body) = orch.register(&node_doc("ext1", "m-ext", 2, 2000, None));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["MQTT_BROKER_PORT"], mosq.port.to_string());
    let id = body["id"].as_str().unwrap().to_string();
    let w = SimWorker::connect(&id, mosq.port, 2, 2000);
    // The cluster's own subscriptions may land just after the worker's: retry-free because the
    // deploy is only sent after the POST below.
    wait_for("cluster sees the worker", Duration::from_secs(10), || {
        orch.status()["nodes"][0]["active"] == true
    });
    assert_eq!(orch.deploy("jobx", 0, &job_doc("app.ns.web.ns"), None), 200);
    let d = recv_deploy(&w, 10);
    assert_eq!(d["instance_number"], 0);
    mosquitto_pub(mosq.port, "nodes/x/jobs/resources", "[1,2]");
    mosquitto_pub(mosq.port, &format!("nodes/{id}/net/subnet"), "{}");
    wait_for("RUNNING via mosquitto", Duration::from_secs(10), || {
        orch.instance("jobx", 0)
            .is_some_and(|i| i["status"] == "RUNNING")
    });
    wait_for("malformed counters", Duration::from_secs(5), || {
        orch.counter("malformed_resources") == 1 && orch.counter("malformed_net") == 1
    });
}

/// A worker registered before the cluster's MQTT subscriptions are in place would send its
/// first subnet request into the void (issue #5.4): with its external broker unreachable the
/// cluster refuses registrations with 503 and says why; once the broker is up, it accepts.
#[test]
fn registration_waits_for_the_mqtt_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let broker_port = free_port();
    let api = free_port();
    let env = vec![(
        "OAK_MQTT_URL".to_string(),
        format!("mqtt://127.0.0.1:{broker_port}"),
    )];
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _cluster = Kill(cluster_support::spawn(dir.path(), api, broker_port, &env));
    let url = format!("http://127.0.0.1:{api}/api/node/register");
    let doc = node_doc("w1", "machine-1", 4, 4000, None);
    let post = || match ureq::post(&url).send_json(doc.clone()) {
        Ok(r) => Some((r.status(), r.into_json::<Value>().unwrap_or(Value::Null))),
        Err(ureq::Error::Status(c, r)) => Some((c, r.into_json().unwrap_or(Value::Null))),
        Err(_) => None,
    };
    let mut first = None;
    wait_for("cluster API", Duration::from_secs(20), || {
        first = post();
        first.is_some()
    });
    let (code, body) = first.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("MQTT"),
        "{body}"
    );
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let _mosquitto = Kill(
        std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto is installed"),
    );
    let mut ok = false;
    for _ in 0..150 {
        if let Some((200, b)) = post() {
            assert_eq!(b["id"].as_str().map(str::len), Some(24), "{b}");
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ok,
        "registration still refused 15 s after the broker came up"
    );
}
