//! The NodeEngine binary against a real mosquitto and the registration stand-in: registration
//! body, client id, subscriptions, periodic reports, deploy answers, malformed input,
//! control/error, the status endpoint, and a broker outage.

mod session_support;

use std::time::Duration;

use session_support::*;

const S: Duration = Duration::from_secs(1);

fn topic(suffix: &str) -> String {
    format!("nodes/{NODE_ID}/{suffix}")
}

fn is_job(t: &str, v: &serde_json::Value, job: &str, instance: u64) -> bool {
    t == topic("job") && v["sname"] == job && v["instance"] == instance
}

#[test]
fn registers_reports_and_answers_deploys() {
    let dir = TempDir::new("session");
    let broker = Mosquitto::start_persistent(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let standin = StandIn::start(NODE_ID, broker.port, Some("s3cret"));
    let mut obs = Observer::connect(broker.port, "observer", true);
    obs.subscribe("nodes/#");
    let mut worker = Worker::start(&dir.0, standin.port, &[("OAK_JOIN_TOKEN", "s3cret")]);

    // Periodic reports with upstream's exact keys; never a null service list.
    let info = obs.expect(10 * S, "information report", |t, _| {
        t == topic("information")
    });
    let keys: Vec<&str> = info
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = worker::protocol::UPSTREAM_NODE_KEYS.to_vec();
    want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, want, "information keys (no token in periodic reports)");
    assert_eq!(info["host"], "pi-test");
    assert!(info["port"].is_string() && info["memory"].as_u64().unwrap() > 0);
    let res = obs.expect(5 * S, "resources report", |t, _| {
        t == topic("jobs/resources")
    });
    assert_eq!(res, serde_json::json!({"services": []}));

    // Registration body as the stock cluster needs it, token included.
    assert_eq!(standin.registrations(), 1);
    assert!(standin.problems().is_empty(), "{:?}", standin.problems());
    assert_eq!(standin.bodies.lock().unwrap()[0]["host"], "pi-test");

    // Client id `<id>-ne`, protocol 3.1.1, clean session, keepalive 30.
    let log = broker.log();
    assert!(
        log.contains(&format!("as {NODE_ID}-ne (p2, c1, k30)")),
        "{log}"
    );
    assert!(
        log.contains(&format!("{NODE_ID}-ne 1 nodes/{NODE_ID}/control/deploy")),
        "QoS 1 subscription: {log}"
    );
    assert!(log.contains(&format!("{NODE_ID}-ne 1 nodes/{NODE_ID}/control/delete")));
    assert!(log.contains(&format!("{NODE_ID}-ne 1 nodes/{NODE_ID}/control/error")));

    // A deploy without containerd: FAILED for that instance, saying why, with upstream's keys.
    let deploy = serde_json::json!({"_id": "x", "job_name": "app.ns.svc.ns", "image": "docker.io/library/nginx:latest",
        "virtualization": "docker", "instance_number": 3, "instance_list": [{"instance_number": 3, "cpu_percent": null}],
        "RR_ip_v6": null, "status_detail": "Waiting for scheduling decision"});
    obs.publish(&topic("control/deploy"), deploy.to_string().as_bytes());
    let failed = obs.expect(5 * S, "FAILED report", |t, v| {
        is_job(t, v, "app.ns.svc.ns", 3)
    });
    assert_eq!(failed["status"], "FAILED");
    let detail = failed["status_detail"].as_str().unwrap_or_default();
    let socket = dir.0.join(NO_CONTAINERD);
    assert!(
        detail.starts_with(&format!("containerd at {} unreachable: ", socket.display())),
        "{detail}"
    );
    let mut keys: Vec<&str> = failed
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["instance", "publicip", "sname", "status", "status_detail"]
    );

    // Hostile deploys: no crash, counted; a known job/instance still gets its FAILED.
    for bad in [
        &b"garbage"[..],
        b"[1,2]",
        b"null",
        br#"{"job_name":5}"#,
        b"\xff\xfe{",
    ] {
        obs.publish(&topic("control/deploy"), bad);
    }
    obs.publish(
        &topic("control/deploy"),
        br#"{"job_name":"app.ns.svc.ns","instance_number":4,"memory":"lots"}"#,
    );
    let typed = obs.expect(5 * S, "FAILED for a mistyped deploy", |t, v| {
        is_job(t, v, "app.ns.svc.ns", 4)
    });
    assert_eq!(typed["status"], "FAILED");
    assert!(
        typed["status_detail"]
            .as_str()
            .unwrap()
            .contains("not a valid job document"),
        "{typed}"
    );
    obs.publish(
        &topic("control/deploy"),
        br#"{"job_name":"bad/name","instance_number":5,"image":"x"}"#,
    );
    let named = obs.expect(5 * S, "FAILED for a bad job name", |t, v| {
        is_job(t, v, "bad/name", 5)
    });
    assert!(named["status_detail"]
        .as_str()
        .unwrap()
        .contains("4 non-empty parts"));
    obs.publish(&topic("control/delete"), br#"{"job_name":1}"#);
    obs.publish(
        &topic("control/delete"),
        br#"{"job_name":"app.ns.svc.ns","instance_number":3}"#,
    );
    wait_for(5 * S, || {
        (worker.metric("oak_worker_malformed_messages_total{topic=\"control/delete\"}") == 1)
            .then_some(())
    })
    .expect("malformed delete counted");
    assert_eq!(
        worker.metric("oak_worker_malformed_messages_total{topic=\"control/deploy\"}"),
        7
    );
    assert!(worker.alive());

    // control/error: the worker registers again (the stand-in sees a second body).
    obs.publish(
        &topic("control/error"),
        br#"{"message": "Node not registered to the cluster"}"#,
    );
    wait_for(5 * S, || (standin.registrations() == 2).then_some(()))
        .expect("re-registration after control/error");
    assert_eq!(worker.metric("oak_worker_control_errors_total"), 1);

    // Status endpoint.
    assert_eq!(worker.get("/healthz").trim(), "ok");
    let status: serde_json::Value = serde_json::from_str(&worker.get("/status")).unwrap();
    assert_eq!(status["node_id"], NODE_ID);
    assert_eq!(status["registration"], "registered");
    assert_eq!(status["broker"]["state"], "connected");
    assert!(status["cgroup"]["memory"].is_boolean());
    assert!(
        !worker.get("/status").contains("s3cret"),
        "the token never leaks"
    );
    let instances = status["instances"].as_array().unwrap();
    assert!(instances.iter().any(|i| i["job_name"] == "app.ns.svc.ns"
        && i["instance"] == 3
        && i["status"] == "FAILED"));
    assert!(worker.metric("oak_worker_reports_sent_total{topic=\"information\"}") >= 1);
    assert_eq!(worker.metric("oak_worker_registrations_total"), 2);
    // OAK_NETWORK=off: no data plane, so no overlay counters at all (not a row of zeros).
    let metrics = worker.get("/metrics");
    assert!(!metrics.contains("oak_overlay_"), "{metrics}");
    assert!(standin.problems().is_empty(), "{:?}", standin.problems());

    // SIGTERM: a polite DISCONNECT, exit 0.
    assert!(worker.terminate().success());
    let log = broker.log();
    assert!(
        log.contains(&format!("Received DISCONNECT from {NODE_ID}-ne")),
        "{log}"
    );
}

#[test]
fn reconnects_and_reregisters_after_a_broker_outage() {
    let dir = TempDir::new("outage");
    let mut broker = Mosquitto::start_persistent(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let standin = StandIn::start(NODE_ID, broker.port, None);
    // A persistent observer: mosquitto keeps its subscription and queues for it across restarts.
    let mut obs = Observer::connect(broker.port, "observer", false);
    obs.subscribe("nodes/#");
    let worker = Worker::start(&dir.0, standin.port, &[]);
    obs.expect(10 * S, "information report", |t, _| {
        t == topic("information")
    });

    broker.stop();
    drop(obs);
    wait_for(5 * S, || {
        (worker.metric("oak_worker_mqtt_connected") == 0).then_some(())
    })
    .expect("worker notices the outage");
    std::thread::sleep(2 * S);
    let skipped = worker.metric("oak_worker_reports_skipped_total");
    assert!(
        skipped >= 2,
        "reports are skipped, not queued, while the broker is away ({skipped})"
    );
    let status: serde_json::Value = serde_json::from_str(&worker.get("/status")).unwrap();
    assert_eq!(status["broker"]["state"], "disconnected");

    broker.restart().unwrap_or_else(|e| panic!("{e}"));
    let mut obs = Observer::connect(broker.port, "observer", false);
    // Reports resume, the worker re-registers (spec §13.1) and subscribes again.
    obs.expect(20 * S, "information after the outage", |t, _| {
        t == topic("information")
    });
    wait_for(10 * S, || (standin.registrations() >= 2).then_some(()))
        .expect("re-registration after reconnect");
    assert!(worker.metric("oak_worker_mqtt_reconnects_total") >= 1);
    let deploy = br#"{"job_name":"app.ns.svc.ns","image":"x","instance_number":0}"#;
    // The subscription may land just after our first attempt; the cluster resends deploys too.
    let got = wait_for(10 * S, || {
        obs.publish(&topic("control/deploy"), deploy);
        obs.collect(S / 2)
            .into_iter()
            .find(|(t, v)| is_job(t, v, "app.ns.svc.ns", 0))
    });
    assert!(
        got.is_some(),
        "deploys reach the worker after the reconnect"
    );
    assert!(standin.problems().is_empty(), "{:?}", standin.problems());
}

#[test]
fn registration_is_retried_until_the_cluster_answers() {
    let dir = TempDir::new("retry");
    let broker = Mosquitto::start_persistent(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let cluster_port = free_port();
    let worker = Worker::start(&dir.0, cluster_port, &[]);
    // Nothing listens yet: the worker keeps trying instead of exiting (upstream exits, §2.1).
    let failures = wait_for(10 * S, || {
        let body = worker::control::http_get(worker.status, "/status", S).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["counters"]["registration_failures"].as_u64()? >= 2).then_some(v)
    })
    .expect("failed attempts are counted");
    assert_eq!(failures["registration"], "registering");
    assert!(
        failures["last_registration_error"]
            .as_str()
            .unwrap()
            .contains("cannot reach the cluster"),
        "{failures}"
    );
    assert!(worker.log().contains("registration attempt 1 failed"));

    let standin = StandIn::start_on(cluster_port, NODE_ID, broker.port, None);
    let mut obs = Observer::connect(broker.port, "observer", true);
    obs.subscribe("nodes/#");
    obs.expect(15 * S, "information once registered", |t, _| {
        t == topic("information")
    });
    assert_eq!(standin.registrations(), 1);
    assert_eq!(worker.metric("oak_worker_registered"), 1);
}
