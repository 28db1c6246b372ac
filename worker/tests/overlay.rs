//! The overlay inside the worker, end to end: `orch-lite all` in a hub namespace, two worker
//! namespaces on the hub's bridge, each running the worker's real cluster session with the
//! overlay (`auto`) in-process. The instances are plain processes in the named netns the
//! overlay's `Network::attach` makes (a stand-in runtime on the session's runtime boundary:
//! the containerd runtime is wired into the binary separately). Shows: subnet from the
//! cluster, `service/deployed` reaching the root, table queries answered, ping and HTTP to
//! the RR service IP across the two workers, undeploy removing veth and netns, and shutdown
//! leaving no links, routes or namespaces. Needs root; skipped otherwise.

mod overlay_support;

use overlay_support::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use worker::overlay::{Overlay, OverlayConfig};
use worker::protocol::{InstanceResources, Status};
use worker::runtime::Network;
use worker::runtime_link::{self, Command as RtCommand, Event as RtEvent, StatusChange};

const RR: &str = "10.30.30.30";
const PASSWORD: &str = "overlay-test";
const CLIENT_JOB: &str = "ovl.test.client.test";
const SERVER_JOB: &str = "ovl.test.server.test";

fn sla() -> String {
    let ms = |name: &str, node: &str, rr: Option<&str>| {
        let mut m = json!({"microserviceID":"","microservice_name":name,"microservice_namespace":"test",
            "virtualization":"container","cmd":[],"memory":10,"vcpus":0,"vgpus":0,"vtpus":0,
            "bandwidth_in":0,"bandwidth_out":0,"storage":0,"code":"docker.io/library/busybox:latest",
            "state":"","port":"","added_files":[],
            "constraints":[{"type":"direct","node":node}]});
        if let Some(rr) = rr {
            m["addresses"] = json!({"rr_ip": rr});
        }
        m
    };
    json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"",
        "application_name":"ovl","application_namespace":"test","application_desc":"overlay test",
        "microservices":[ms("client", "wa", None), ms("server", "wb", Some(RR))]}]})
    .to_string()
}

/// A worker: the session + overlay on a thread inside its namespace.
struct Worker {
    stop: async_channel::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
    _state: TempDir,
}

impl Worker {
    fn stop(mut self) {
        self.stop.close();
        if let Some(t) = self.thread.take() {
            t.join().expect("worker thread");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An instance process, killed when dropped (also when the test fails midway).
struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs deploys as plain processes in the overlay's netns: `busybox httpd` for the server,
/// nothing for the client (its namespace is kept by the bind mount). Reports CREATED, and
/// each sample lists the running ones, as a runtime would.
async fn process_runtime(side: runtime_link::RuntimeSide, net: Rc<Overlay>, www: PathBuf) {
    let mut running: BTreeMap<(String, u64), Option<Proc>> = BTreeMap::new();
    while let Ok(cmd) = side.commands.recv().await {
        let ev = match cmd {
            RtCommand::Deploy(d) => {
                let id = d.container_id();
                let status = match net.attach(&id, &d).await {
                    Ok(Some(ns)) => {
                        let child = d.job_name.contains("server").then(|| {
                            std::process::Command::new("ip")
                                .args(["netns", "exec"])
                                .arg(ns.file_name().unwrap())
                                .args(["busybox", "httpd", "-f", "-p", "80", "-h"])
                                .arg(&www)
                                .spawn()
                                .map(Proc)
                                .expect("start httpd")
                        });
                        running.insert((d.job_name.clone(), d.instance_number), child);
                        (Status::Created, String::new())
                    }
                    Ok(None) => (Status::Failed, "no netns".into()),
                    Err(e) => (Status::Failed, e),
                };
                RtEvent::Status(StatusChange {
                    job_name: d.job_name,
                    instance: d.instance_number,
                    status: status.0,
                    detail: status.1,
                })
            }
            RtCommand::Delete(d) => {
                drop(running.remove(&(d.job_name.clone(), d.instance_number)));
                net.detach(&worker::protocol::container_id(
                    &d.job_name,
                    d.instance_number,
                ))
                .await;
                RtEvent::Status(StatusChange {
                    job_name: d.job_name,
                    instance: d.instance_number,
                    status: Status::Undeployed,
                    detail: String::new(),
                })
            }
            RtCommand::Sample => RtEvent::Resources(
                running
                    .keys()
                    .map(|(j, n)| InstanceResources {
                        cpu_percent: "0".into(),
                        memory_percent: "0".into(),
                        disk: "0".into(),
                        logs: String::new(),
                        job_name: j.clone(),
                        virtualization: "docker".into(),
                        instance: *n,
                    })
                    .collect(),
            ),
        };
        if side.events.send(ev).await.is_err() {
            break;
        }
    }
}

fn start_worker(ns: &str, name: &str, ip: Ipv4Addr, www: PathBuf) -> Worker {
    let state = TempDir::new(name);
    let state_dir = state.0.clone();
    let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
    let name = name.to_string();
    let thread = in_netns(ns, move || {
        let mut cfg = worker::session::Config::new(&HUB.to_string(), 10100, &name);
        cfg.public_address = Some(ip.to_string());
        cfg.report_interval = Duration::from_millis(500);
        cfg.register_backoff = (Duration::from_millis(200), Duration::from_secs(1));
        let mut ocfg = OverlayConfig {
            dataplane: Default::default(),
            plumbing: Default::default(),
            public_address: Some(ip),
            netns_dir: PathBuf::from("/run/netns"),
            state_dir: state_dir.join("overlay"),
            subnet_wait: Duration::from_secs(20),
            max_subscriptions: 64,
        };
        ocfg.dataplane.listen.set_port(50103);
        let (overlay, link, task) = Overlay::start(ocfg).expect("overlay starts");
        let overlay = Rc::new(overlay);
        let ex = async_executor::LocalExecutor::new();
        ex.spawn(task).detach();
        let (session_side, runtime_side) = runtime_link::link(16);
        let rt = ex.spawn(process_runtime(runtime_side, overlay.clone(), www));
        let tel = worker::telemetry::Telemetry::new(&name, "hub");
        let stop = async move {
            let _ = stop_rx.recv().await;
        };
        async_io::block_on(ex.run(worker::session::run_with_overlay(
            cfg,
            session_side,
            tel,
            &ex,
            stop,
            Some(link),
        )));
        drop(rt);
        overlay.teardown();
    });
    Worker {
        stop: stop_tx,
        thread: Some(thread),
        _state: state,
    }
}

fn links(ns: &str) -> String {
    run(&["ip", "-n", ns, "-o", "link", "show"])
}

#[test]
fn two_workers_reach_a_service_ip_through_the_cluster() {
    if !is_root() {
        eprintln!("SKIPPED two_workers_reach_a_service_ip_through_the_cluster: needs root");
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let sfx = suffix();
    let mut topo = Topology::default();
    let wa = topo.netns(&format!("oakwa-{sfx}"));
    let wb = topo.netns(&format!("oakwb-{sfx}"));
    let hub = hub(&mut topo, &sfx, &[(&wa, WA), (&wb, WB)]);
    let client_id = format!("{CLIENT_JOB}.instance.0");
    let server_id = format!("{SERVER_JOB}.instance.0");
    let _sweep = NetnsSweep(vec![client_id.clone(), server_id.clone()]);
    let before_a = topo.ip(&wa, &["-o", "link", "show"]);

    // orch-lite all in the hub (its own ports there, so the host's stay free)
    let _orch = Orch::start(&hub, HUB, PASSWORD);
    let root = SocketAddr::from((HUB, 10000));
    let token = login(&hub, root, PASSWORD);

    let www = TempDir::new("www");
    std::fs::write(www.0.join("index.html"), "served by B\n").unwrap();
    let a = start_worker(&wa, "wa", WA, www.0.clone());
    let b = start_worker(&wb, "wb", WB, www.0.clone());

    // Each worker gets its subnet over MQTT and builds its bridge at S+1/26.
    for ns in [&wa, &wb] {
        let addr = wait_for(Duration::from_secs(20), || {
            let out = topo.try_ip(ns, &["-o", "-4", "addr", "show", "dev", "goProxyBridge"]);
            out.split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no goProxyBridge address in {ns}: {}", links(ns)));
        println!("{ns}: bridge {addr}");
        assert!(
            addr.starts_with("10.18.") && addr.ends_with("/26"),
            "{addr}"
        );
    }

    // The root places on what the cluster's reports offer: wait until they carry the workers.
    wait_for(Duration::from_secs(20), || {
        let (_, v) = http(&hub, root, "GET", "/api/clusters/", Some(&token), None);
        v.to_string().contains("docker").then_some(())
    })
    .expect("the cluster reports its workers to the root");

    // Both services, one instance each, pinned by `direct` constraints.
    let (c, v) = http(
        &hub,
        root,
        "POST",
        "/api/application/",
        Some(&token),
        Some(sla()),
    );
    assert_eq!(c, 200, "{v}");
    let (_, svcs) = http(&hub, root, "GET", "/api/services/", Some(&token), None);
    let sid = |name: &str| -> String {
        svcs.as_array()
            .and_then(|a| a.iter().find(|s| s["microservice_name"] == name))
            .and_then(|s| s["_id"]["$oid"].as_str())
            .unwrap_or_else(|| panic!("service {name} in {svcs}"))
            .to_string()
    };
    let (server_sid, client_sid) = (sid("server"), sid("client"));
    for s in [&server_sid, &client_sid] {
        let (c, v) = http(
            &hub,
            root,
            "POST",
            &format!("/api/service/{s}/instance"),
            Some(&token),
            None,
        );
        assert_eq!(c, 200, "{v}");
    }

    // service/deployed reached the root: both instances have a namespace IP there.
    let ns_ip = |sid: &str| -> Option<String> {
        let (_, v) = http(
            &hub,
            root,
            "GET",
            &format!("/api/service/{sid}"),
            Some(&token),
            None,
        );
        v["instance_list"][0]["namespace_ip"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let server_nsip =
        wait_for(Duration::from_secs(30), || ns_ip(&server_sid)).unwrap_or_else(|| {
            let (_, v) = http(
                &hub,
                root,
                "GET",
                &format!("/api/service/{server_sid}"),
                Some(&token),
                None,
            );
            panic!("the server's namespace IP never reached the root (service/deployed): {v}")
        });
    let client_nsip = wait_for(Duration::from_secs(30), || ns_ip(&client_sid))
        .expect("the client's namespace IP reaches the root");
    println!("server nsip {server_nsip}, client nsip {client_nsip}");
    assert!(std::path::Path::new(&format!("/run/netns/{server_id}")).exists());

    // Ping and HTTP from the client instance (worker A) to the RR address (served on B).
    let ping = wait_for(Duration::from_secs(20), || {
        let o = Topology::exec(&client_id, &["ping", "-c", "3", "-i", "0.2", "-W", "2", RR]);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    })
    .unwrap_or_else(|| {
        let (_, v) = http(
            &hub,
            root,
            "GET",
            &format!("/api/service/{server_sid}"),
            Some(&token),
            None,
        );
        let o = Topology::exec(&wb, &["ss", "-uan"]);
        panic!(
            "no ping through {RR}; server job at the root: {}; sockets in B: {}",
            v["instance_list"],
            String::from_utf8_lossy(&o.stdout)
        )
    });
    println!("{ping}");
    assert!(ping.contains(&format!("from {RR}")), "{ping}");
    // HTTP with Rust sockets from inside the client's namespace (this host's busybox wget
    // crashes), to busybox httpd in the server's.
    let page = in_netns(&client_id, || {
        let addr = SocketAddr::from((RR.parse::<Ipv4Addr>().unwrap(), 80));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /index.html HTTP/1.0\r\nHost: svc\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    })
    .join()
    .unwrap()
    .expect("HTTP to the service IP");
    assert!(
        page.starts_with("HTTP/1.1 200") || page.starts_with("HTTP/1.0 200"),
        "{page}"
    );
    assert!(page.ends_with("served by B\n"), "{page}");

    // Undeploy the server: its veth and netns go.
    let (c, v) = http(
        &hub,
        root,
        "DELETE",
        &format!("/api/service/{server_sid}/instance/0"),
        Some(&token),
        None,
    );
    assert_eq!(c, 200, "{v}");
    wait_for(Duration::from_secs(20), || {
        (!std::path::Path::new(&format!("/run/netns/{server_id}")).exists()
            && !links(&wb).contains("oakveth"))
        .then_some(())
    })
    .unwrap_or_else(|| panic!("server veth/netns still there: {}", links(&wb)));

    // Shutdown: nothing of the overlay is left in the worker namespaces or /run/netns.
    a.stop();
    b.stop();
    for ns in [&wa, &wb] {
        let l = links(ns);
        for name in ["goProxyTun", "goProxyBridge", "oakveth"] {
            assert!(!l.contains(name), "{name} left in {ns}: {l}");
        }
        let routes = topo.ip(ns, &["-4", "route", "show"]);
        assert!(
            !routes.contains("10.1"),
            "overlay routes left in {ns}: {routes}"
        );
    }
    assert_eq!(
        topo.ip(&wa, &["-o", "link", "show"]).lines().count(),
        before_a.lines().count()
    );
    assert!(!std::path::Path::new(&format!("/run/netns/{client_id}")).exists());
}
