//! The 1-DOC deploy end to end with the real parts, as a user does it: a private containerd and
//! registry (the fixture), `orch-lite all`, one `NodeEngine` with the overlay on
//! (`OAK_NETWORK=auto`, as `scripts/1-doc.sh` runs it); the getting-started guide's `clientsrvr`
//! application (busybox from the fixture registry instead of nginx and curl) is created, deployed
//! and partly undeployed through the root API, and checked in containerd. The client must fetch
//! the server's page through the service IP 10.30.30.30, and once the worker stops nothing of
//! its network may remain (TUN, bridge, veths, instance namespaces).
//!
//! The worker runs in a network namespace of its own (a one-host [`e2e::lan::Lan`]): its TUN and
//! bridge carry upstream's fixed names (`goProxyTun`, `goProxyBridge`), which must not meet
//! another test's, or a demo's, in the root namespace. The orchestrator and the registry listen
//! on the LAN's gateway address in the root namespace; the application namespace carries the
//! pid, because instance namespaces are named after container ids in the machine-wide
//! `/run/netns`.

use e2e::lan::{Host, Lan};
use e2e::root::Root;
use e2e::{binaries, daemons, free_port, ok, wait_for, Fixture, Proc};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const APP: &str = "clientsrvr";
const RR_IP: &str = "10.30.30.30";

/// `application_namespace` and `microservice_namespace`: unique per test process.
fn ns() -> String {
    format!("t{}", std::process::id())
}

/// Deploys measured for the latency figure of issue #8 (POST instance → RUNNING at the root,
/// image cached): instances of a small service, deployed one after the other.
const LATENCY_DEPLOYS: usize = 20;

/// The worker's report interval in this test: [`latency_run`] asserts that deploys do not wait
/// for it.
const REPORT_INTERVAL_MS: u64 = 5_000;

/// One small service (no cpu reserved, 8 MB) whose instances measure the deploy latency.
fn latency_sla(image: &str) -> Value {
    json!({
        "sla_version": "v2.0",
        "customerID": "Admin",
        "applications": [{
            "applicationID": "",
            "application_name": "latency",
            "application_namespace": ns(),
            "application_desc": "instances deployed one after the other to measure deploy latency",
            "microservices": [{
                "microserviceID": "",
                "microservice_name": "sleeper",
                "microservice_namespace": ns(),
                "virtualization": "container",
                "cmd": ["sleep", "3600"],
                "memory": 8, "vcpus": 0, "vgpus": 0, "vtpus": 0,
                "bandwidth_in": 0, "bandwidth_out": 0, "storage": 0,
                "code": image,
                "state": "",
                "port": "",
                "added_files": []
            }]
        }]
    })
}

/// `LATENCY_DEPLOYS` deploys of a cached image, then all undeployed (and gone from containerd).
fn latency_run(w: &World) -> Result<Vec<Duration>, String> {
    let app = w.root.create_app(&latency_sla(&w.fx.image), "latency")?;
    let svc = w.root.find_service(&app, "sleeper")?;
    let mut out = Vec::new();
    let mut numbers = Vec::new();
    for _ in 0..LATENCY_DEPLOYS {
        let (n, d) = w.root.deploy(&svc, Duration::from_secs(40))?;
        numbers.push(n);
        out.push(d);
    }
    for &n in &numbers {
        w.root.undeploy(&svc, n)?;
    }
    wait_for(
        "the latency instances to leave containerd",
        Duration::from_secs(60),
        || {
            let ids = w.fx.containers("oakestra")?;
            Ok((!ids.iter().any(|c| c.starts_with(&svc.job_name))).then_some(()))
        },
    )?;
    Ok(out)
}

/// The guide's descriptor (orchestrators spec §3, §9.4) with the fixture image.
fn sla(image: &str) -> Value {
    let ns = ns();
    json!({
        "sla_version": "v2.0",
        "customerID": "Admin",
        "applications": [{
            "applicationID": "",
            "application_name": APP,
            "application_namespace": ns,
            "application_desc": "HTTP server behind 10.30.30.30 and a client fetching from it",
            "microservices": [
                {
                    "microserviceID": "",
                    "microservice_name": "server",
                    "microservice_namespace": ns,
                    "virtualization": "container",
                    "cmd": ["httpd", "-f", "-p", "80", "-h", "/www"],
                    "memory": 100, "vcpus": 1, "vgpus": 0, "vtpus": 0,
                    "bandwidth_in": 0, "bandwidth_out": 0, "storage": 0,
                    "code": image,
                    "state": "",
                    "port": "6080:80/tcp",
                    "addresses": {"rr_ip": RR_IP},
                    "added_files": []
                },
                {
                    "microserviceID": "",
                    "microservice_name": "client",
                    "microservice_namespace": ns,
                    "virtualization": "container",
                    "cmd": ["sh", "-c", "while true; do wget -q -O - http://10.30.30.30/ || true; sleep 2; done"],
                    "memory": 100, "vcpus": 1, "vgpus": 0, "vtpus": 0,
                    "bandwidth_in": 0, "bandwidth_out": 0, "storage": 0,
                    "code": image,
                    "state": "",
                    "port": "",
                    "added_files": [],
                    "constraints": []
                }
            ]
        }]
    })
}

struct World<'a> {
    fx: &'a Fixture,
    host: &'a Host,
    root: Root,
    cluster: String,
    status: String,
    work: PathBuf,
}

fn scenario(w: &World, started: Instant) -> Result<Vec<Duration>, String> {
    let fx = w.fx;
    // The worker registers, and the root hears of the cluster's new capacity.
    w.root.wait_workers(1, Duration::from_secs(30))?;
    println!(
        "the root sees the worker after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The registration carries /etc/machine-id, so the cluster knows the machine by it.
    let cluster = ok(
        "GET",
        &format!("http://{}/api/cluster/status", w.cluster),
        None,
        None,
    )?;
    let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    if !machine.trim().is_empty() {
        assert_eq!(
            cluster["nodes"][0]["machine"],
            format!("machine:{}", machine.trim()),
            "{cluster}"
        );
    }
    let status = ok("GET", &format!("http://{}/status", w.status), None, None)?;
    assert_eq!(status["containerd"]["state"], "connected", "{status}");
    assert_eq!(status["registration"], "registered", "{status}");

    let app_id = w.root.create_app(&sla(&fx.image), APP)?;
    let find = |name: &str| w.root.find_service(&app_id, name);
    let (server, client) = (find("server")?, find("client")?);
    assert_eq!(server.job_name, format!("clientsrvr.{0}.server.{0}", ns()));

    // The server's deploy includes the first pull from the registry; the client's finds the
    // image in containerd.
    let mut latencies = Vec::new();
    for s in [&server, &client] {
        let (_, d) = w.root.deploy(s, Duration::from_secs(40))?;
        println!(
            "deploy latency {}: {} ms (POST instance -> RUNNING at the root)",
            s.job_name,
            d.as_millis()
        );
        latencies.push(d);
    }

    let ids = fx.containers("oakestra")?;
    for s in [&server, &client] {
        let id = s.container(0);
        assert!(ids.contains(&id), "container {id} not in {ids:?}");
        let info = fx.ctr_ok("oakestra", &["containers", "info", &id])?;
        assert!(
            info.contains("\"hostname\": \"instance-0\""),
            "hostname of {id}: {info}"
        );
        assert!(
            fx.task_pid("oakestra", &id)?.is_some(),
            "no running task for {id}"
        );
    }
    // The server answers inside its own network namespace.
    let page = fx.ctr_ok(
        "oakestra",
        &[
            "tasks",
            "exec",
            "--exec-id",
            "e2e-probe",
            &server.container(0),
            "wget",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:80/",
        ],
    )?;
    assert!(
        page.contains("OAK_FIXTURE_HTTPD_OK"),
        "server answered {page:?}"
    );
    // The client reaches it through the service IP: table query to the cluster and root,
    // translation in the data plane, bridge, veths.
    let client_log = w.work.join("e2e-worker/logs").join(client.container(0));
    let t0 = Instant::now();
    wait_for(
        &format!("the client's page from {RR_IP} in {}", client_log.display()),
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(&client_log).unwrap_or_default();
            Ok(log.contains("OAK_FIXTURE_HTTPD_OK").then_some(()))
        },
    )?;
    println!(
        "the client's page from {RR_IP} was in its log after another {} ms",
        t0.elapsed().as_millis()
    );
    // The overlay of the worker's host: TUN, bridge, one host veth per instance.
    let links = w.host.run(&["ip", "-o", "link", "show"])?;
    for dev in ["goProxyTun", "goProxyBridge"] {
        assert!(links.contains(&format!(": {dev}:")), "no {dev} in {links}");
    }
    let netns = ip_netns()?;
    for s in [&server, &client] {
        assert!(
            netns.iter().any(|n| *n == s.container(0)),
            "no namespace {} in {netns:?}",
            s.container(0)
        );
    }

    // The client's traffic shows in the data plane's counters on /metrics (the snapshot the
    // status thread reads is refreshed once a second).
    let sample = |text: &str, series: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    // Read from the TUN, then translated and sent on: to a peer, or back through the TUN
    // (both instances are here). A snapshot may fall between the two (a packet parked while
    // its table query is out), so wait for both in one snapshot.
    let from_tun = "oak_overlay_packets_total{path=\"from_tun\"} ";
    let sent_on = |m: &str| -> u64 {
        ["to_peer", "to_tun", "hairpin"]
            .iter()
            .filter_map(|p| sample(m, &format!("oak_overlay_packets_total{{path=\"{p}\"}} ")))
            .sum()
    };
    let metrics = wait_for(
        "oak_overlay_packets_total from the TUN and sent on above 0 on /metrics",
        Duration::from_secs(10),
        || {
            let m = ok("GET", &format!("http://{}/metrics", w.status), None, None)?;
            let m = m.as_str().unwrap_or_default().to_string();
            Ok((sample(&m, from_tun).unwrap_or(0) > 0 && sent_on(&m) > 0).then_some(m))
        },
    )?;
    let metrics = metrics.as_str();
    println!(
        "overlay counters after the client's fetches:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("oak_overlay_packets_total")
                || l.starts_with("oak_overlay_table_queries_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        metrics.contains("# TYPE oak_overlay_drops_total counter"),
        "{metrics}"
    );
    assert!(metrics.contains("oak_image_pulls_total 1\n"), "{metrics}");
    assert!(
        metrics.contains("oak_worker_containerd_up 1\n"),
        "{metrics}"
    );

    // Undeploy the client: gone from containerd, and from the root's instance list.
    let pid = fx.task_pid("oakestra", &client.container(0))?;
    let t0 = Instant::now();
    w.root.undeploy(&client, 0)?;
    wait_for(
        "the client container to leave containerd",
        Duration::from_secs(20),
        || Ok((!fx.containers("oakestra")?.contains(&client.container(0))).then_some(())),
    )?;
    println!(
        "undeploy {}: {} ms until the container is gone",
        client.job_name,
        t0.elapsed().as_millis()
    );
    let job = w.root.service(&client.id)?;
    assert_eq!(job["instance_list"], json!([]), "{job}");
    let netns = ip_netns()?;
    assert!(
        !netns.contains(&client.container(0)),
        "the client's namespace outlived its undeploy: {netns:?}"
    );
    assert_eq!(job["status"], "UNDEPLOYED", "{job}");
    if let Some(pid) = pid {
        assert!(
            !is_same_cmd(pid, RR_IP),
            "client process {pid} survived the undeploy"
        );
    }
    // The server is untouched.
    assert_eq!(
        w.root.instance_status(&server.id, 0)?.as_deref(),
        Some("RUNNING")
    );
    let mut cached = latency_run(w)?;
    cached.sort();
    let p50 = cached[cached.len() / 2];
    println!(
        "deploy latency with a cached image: p50 {} ms, max {} ms over {} deploys (POST instance -> RUNNING at the root, worker reports every {REPORT_INTERVAL_MS} ms)",
        p50.as_millis(),
        cached[cached.len() - 1].as_millis(),
        cached.len()
    );
    // Waiting for the periodic report would put the median near half the interval (2.5 s); a
    // deploy takes ~0.1-0.2 s to start its task here, so 2 s leaves room for a loaded machine.
    if p50 >= Duration::from_millis(2_000) {
        return Err(format!(
            "deploys wait for the periodic report: p50 {} ms with reports every {REPORT_INTERVAL_MS} ms",
            p50.as_millis()
        ));
    }
    Ok(latencies)
}

/// Names in `ip netns list` (the machine-wide `/run/netns`).
fn ip_netns() -> Result<Vec<String>, String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_err(|e| format!("ip netns list: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn is_same_cmd(pid: u32, word: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(word))
        .unwrap_or(false)
}

#[test]
fn clientsrvr_deploys_runs_and_undeploys() {
    if !e2e::require_root("clientsrvr_deploys_runs_and_undeploys") {
        return;
    }
    let _one_at_a_time = e2e::serial();
    let started = Instant::now();
    let (node_engine, orch_lite) = binaries().unwrap_or_else(|e| panic!("{e}"));
    println!(
        "binaries ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Declared first, so it is dropped last: the worker must be gone before its namespace.
    let mut lan = Lan::new().unwrap_or_else(|e| panic!("{e}"));
    let lan_tag = lan.tag.clone();
    let host = lan.add_host("node").unwrap_or_else(|e| panic!("{e}"));
    let gw = lan.gateway.to_string();
    let fx = lan.fixture().unwrap_or_else(|e| panic!("{e}"));
    println!("fixture up after {:.1} s", started.elapsed().as_secs_f64());
    let fx_dir = fx.dir.clone();
    let work = fx.dir.with_file_name(format!(
        "{}-1doc",
        fx.dir.file_name().and_then(|n| n.to_str()).unwrap_or("oak")
    ));
    std::fs::create_dir_all(&work).unwrap();

    let (root_port, cluster_port, mqtt_port, status_port) =
        (free_port(), free_port(), free_port(), free_port());
    let root = format!("{gw}:{root_port}");
    let status = format!("{}:{status_port}", host.addr);
    let mut orch = Proc::spawn(
        "orch-lite",
        daemons::orch_lite(&orch_lite, "all", &work, "orch-lite")
            .env("OAK_ROOT_API_ADDR", &root)
            .env("OAK_CLUSTER_API_ADDR", format!("{gw}:{cluster_port}"))
            .env("OAK_MQTT_ADDR", format!("{gw}:{mqtt_port}"))
            .env("OAK_CLUSTER_NAME", "e2e"),
        work.join("orch-lite.log"),
    )
    .unwrap();
    let root_client = Root::login(&root, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n--- orch-lite log:\n{}", orch.tail(30)));
    let w = World {
        fx: &fx,
        host: &host,
        root: root_client,
        cluster: format!("{gw}:{cluster_port}"),
        status,
        work: work.clone(),
    };

    let worker = daemons::worker(
        &node_engine,
        &work,
        "e2e-worker",
        &gw,
        cluster_port,
        &w.status,
        &fx,
    );
    // The same command, started inside the host, with the overlay on.
    let mut in_host = host.wrap(&worker);
    in_host
        .env("OAK_NETWORK", "auto")
        .env("OAK_PUBLIC_ADDRESS", host.addr.to_string())
        // Longer than the deploys may take: an instance must reach RUNNING through the report
        // the worker sends when a task starts, not by waiting for the next periodic one.
        .env("OAK_REPORT_INTERVAL_MS", REPORT_INTERVAL_MS.to_string());
    let mut ne = Proc::spawn("NodeEngine", &mut in_host, work.join("worker.log")).unwrap();

    let result = scenario(&w, started);
    let latencies = match result {
        Ok(l) => l,
        Err(e) => panic!(
            "{e}\n--- NodeEngine log:\n{}\n--- orch-lite log:\n{}",
            ne.tail(40),
            orch.tail(40)
        ),
    };

    // Instances outlive the worker (adopted at its next start); the fixture removes them.
    let server_pid = fx
        .task_pid(
            "oakestra",
            &format!("clientsrvr.{0}.server.{0}.instance.0", ns()),
        )
        .ok()
        .flatten();
    let st = ne.stop().unwrap_or_else(|e| panic!("{e}\n{}", ne.tail(20)));
    assert!(
        st.success(),
        "NodeEngine exited with {st}:\n{}",
        ne.tail(20)
    );
    // A stopped worker leaves running instances wired (the next start re-attaches them): its
    // TUN is gone, the bridge and the running server's veth and namespace stay; nothing is left
    // of the undeployed client.
    let links = host
        .run(&["ip", "-o", "link", "show"])
        .unwrap_or_else(|e| panic!("{e}"));
    let ours: Vec<&str> = links
        .lines()
        .filter(|l| !l.contains(": lo:") && !l.contains(": eth0@"))
        .collect();
    let server_ns = format!("clientsrvr.{0}.server.{0}.instance.0", ns());
    assert!(
        !links.contains("goProxyTun"),
        "the stopped worker left its TUN: {ours:#?}"
    );
    assert_eq!(
        ours.iter()
            .filter(|l| l.contains(": goProxyBridge:"))
            .count(),
        1,
        "bridge kept for the running server: {ours:#?}"
    );
    let veths: Vec<&&str> = ours
        .iter()
        .filter(|l| l.contains("master goProxyBridge"))
        .collect();
    assert!(
        veths.len() == 1 && veths[0].contains(&server_ns),
        "exactly the server's veth stays: {ours:#?}"
    );
    let prefix = format!("clientsrvr.{}.", ns());
    let left: Vec<String> = ip_netns()
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert_eq!(
        left,
        vec![server_ns.clone()],
        "instance namespaces after the stop"
    );
    let st = orch
        .stop()
        .unwrap_or_else(|e| panic!("{e}\n{}", orch.tail(20)));
    assert!(
        st.success(),
        "orch-lite exited with {st}:\n{}",
        orch.tail(20)
    );
    drop(w);
    fx.stop().unwrap_or_else(|e| panic!("{e}"));
    println!(
        "fixture down after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(pid) = server_pid {
        assert!(
            !is_same_cmd(pid, "httpd"),
            "server process {pid} survived the fixture"
        );
    }
    // With the server gone, its namespace is an unused leftover: a user's next worker start
    // removes it; this test removes it itself (the host's bridge and veth go with the host).
    let st = std::process::Command::new("ip")
        .args(["netns", "delete", &server_ns])
        .status();
    assert!(
        st.as_ref().is_ok_and(|s| s.success()),
        "ip netns delete {server_ns}: {st:?}"
    );
    let left: Vec<String> = ip_netns()
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "instance namespaces left: {left:?}");
    std::fs::remove_dir_all(&work).unwrap_or_else(|e| panic!("removing {}: {e}", work.display()));
    for dir in [&fx_dir, &work] {
        let left = e2e::leftovers(dir);
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
    drop(host);
    drop(lan);
    let left = Lan::leftovers(&lan_tag);
    assert!(left.is_empty(), "the test LAN left: {left:?}");
    let mut sorted = latencies.clone();
    sorted.sort();
    println!(
        "deploy latency p50 {} ms over {} deploys (first includes the image pull); whole test {:.1} s",
        sorted[sorted.len() / 2].as_millis(),
        sorted.len(),
        started.elapsed().as_secs_f64()
    );
}
