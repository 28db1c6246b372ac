//! An in-process worker for the overlay tests: the real cluster session with the overlay
//! (`auto`) on a thread inside a worker namespace, and a stand-in runtime on the session's
//! runtime boundary whose instances are plain processes in the namespace the overlay's
//! `Network::attach` made. The processes live in a [`Registry`] the test owns, so they outlive
//! a worker stop as containers do, and a restarted worker reports them again (adoption).

use super::*;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use worker::overlay::{Overlay, OverlayConfig};
use worker::protocol::{InstanceResources, Status};
use worker::runtime::Network;
use worker::runtime_link::{self, Command as RtCommand, Event as RtEvent, StatusChange};

/// An instance process, killed when dropped (also when the test fails midway).
pub struct Child(pub std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Running instances by (job, instance): what containerd would keep across worker restarts.
pub type Registry = Arc<Mutex<BTreeMap<(String, u64), Child>>>;

/// What each deploy runs in its namespace: `busybox httpd` serving `www` on port 80 for jobs
/// whose service name contains "server", `sleep` otherwise (a process keeps the namespace
/// in use, as a container's task does).
async fn process_runtime(
    side: runtime_link::RuntimeSide,
    net: Rc<Overlay>,
    www: PathBuf,
    reg: Registry,
) {
    while let Ok(cmd) = side.commands.recv().await {
        let ev = match cmd {
            RtCommand::Deploy(d) => {
                let id = d.container_id();
                let status = match net.attach(&id, &d).await {
                    Ok(Some(ns)) => {
                        let mut c = std::process::Command::new("ip");
                        c.args(["netns", "exec"]).arg(ns.file_name().unwrap());
                        if d.job_name.contains("server") {
                            c.args(["busybox", "httpd", "-f", "-p", "80", "-h"])
                                .arg(&www);
                        } else {
                            c.args(["sleep", "600"]);
                        }
                        let child = Child(c.spawn().expect("start the instance process"));
                        reg.lock()
                            .unwrap()
                            .insert((d.job_name.clone(), d.instance_number), child);
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
                let child = reg
                    .lock()
                    .unwrap()
                    .remove(&(d.job_name.clone(), d.instance_number));
                drop(child);
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
                reg.lock()
                    .unwrap()
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

/// A running in-process worker.
pub struct Worker {
    stop: async_channel::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Graceful stop, as SIGTERM does for NodeEngine: `Overlay::shutdown` (instances stay
    /// wired) unless `teardown`.
    pub fn stop(mut self) {
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

/// Starts worker `name` in namespace `ns` (address `ip` on the hub), keeping its overlay
/// records under `state_dir` (reuse it to restart the same worker). `teardown`: remove all of
/// the overlay on stop instead of leaving instances wired.
pub fn start_worker(
    ns: &str,
    name: &str,
    ip: Ipv4Addr,
    state_dir: PathBuf,
    www: PathBuf,
    reg: Registry,
    teardown: bool,
) -> Worker {
    let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
    let name = name.to_string();
    let thread = in_netns(ns, move || {
        let mut cfg = worker::session::Config::new(&HUB.to_string(), 10100, &name);
        cfg.public_address = Some(ip.to_string());
        cfg.report_interval = std::time::Duration::from_millis(500);
        cfg.register_backoff = (
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(1),
        );
        let mut ocfg = OverlayConfig {
            dataplane: Default::default(),
            plumbing: Default::default(),
            public_address: Some(ip),
            netns_dir: PathBuf::from("/run/netns"),
            state_dir: state_dir.join("overlay"),
            subnet_wait: std::time::Duration::from_secs(20),
            max_subscriptions: 64,
        };
        ocfg.dataplane.listen.set_port(50103);
        let (overlay, link, task) = Overlay::start(ocfg).expect("overlay starts");
        let overlay = Rc::new(overlay);
        let ex = async_executor::LocalExecutor::new();
        ex.spawn(task).detach();
        let (session_side, runtime_side) = runtime_link::link(16);
        let rt = ex.spawn(process_runtime(runtime_side, overlay.clone(), www, reg));
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
        if teardown {
            overlay.teardown();
        } else {
            overlay.shutdown();
        }
    });
    Worker {
        stop: stop_tx,
        thread: Some(thread),
    }
}

/// One microservice of a test SLA, pinned on worker `node`, with an RR address and a
/// published `port` field.
pub fn microservice(name: &str, node: &str, rr: Option<&str>, port: &str) -> serde_json::Value {
    let mut m = serde_json::json!({"microserviceID":"","microservice_name":name,"microservice_namespace":"test",
        "virtualization":"container","cmd":[],"memory":10,"vcpus":0,"vgpus":0,"vtpus":0,
        "bandwidth_in":0,"bandwidth_out":0,"storage":0,"code":"docker.io/library/busybox:latest",
        "state":"","port":port,"added_files":[],
        "constraints":[{"type":"direct","node":node}]});
    if let Some(rr) = rr {
        m["addresses"] = serde_json::json!({"rr_ip": rr});
    }
    m
}

/// An SLA of application `app` (namespace `test`) with these microservices.
pub fn sla_of(app: &str, services: Vec<serde_json::Value>) -> String {
    serde_json::json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"",
        "application_name":app,"application_namespace":"test","application_desc":"overlay test",
        "microservices":services}]})
    .to_string()
}

/// The SLA of the overlay tests: service `client` pinned on worker `wa`, `server` (RR address
/// `rr`, published `port`) on `wb`.
pub fn sla(app: &str, rr: &str, port: &str) -> String {
    sla_of(
        app,
        vec![
            microservice("client", "wa", None, ""),
            microservice("server", "wb", Some(rr), port),
        ],
    )
}

/// The root API as the tests use it: post an SLA, deploy every service, wait for instance
/// namespace IPs, undeploy.
pub struct Root {
    pub ns: String,
    pub addr: std::net::SocketAddr,
    pub token: String,
}

impl Root {
    pub fn new(hub: &str, password: &str) -> Root {
        let addr = std::net::SocketAddr::from((HUB, 10000));
        let token = login(hub, addr, password);
        Root {
            ns: hub.to_string(),
            addr,
            token,
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<String>) -> (u16, serde_json::Value) {
        http(&self.ns, self.addr, method, path, Some(&self.token), body)
    }

    /// Waits until the cluster reports its workers, posts `sla`, deploys one instance of each
    /// service; the service ids by name.
    pub fn deploy(&self, sla: String) -> BTreeMap<String, String> {
        wait_for(std::time::Duration::from_secs(20), || {
            let (_, v) = self.call("GET", "/api/clusters/", None);
            v.to_string().contains("docker").then_some(())
        })
        .expect("the cluster reports its workers to the root");
        let (c, v) = self.call("POST", "/api/application/", Some(sla));
        assert_eq!(c, 200, "{v}");
        let (_, svcs) = self.call("GET", "/api/services/", None);
        let mut ids = BTreeMap::new();
        for s in svcs.as_array().expect("services") {
            let name = s["microservice_name"].as_str().unwrap_or("").to_string();
            let id = s["_id"]["$oid"].as_str().unwrap_or("").to_string();
            let (c, v) = self.call("POST", &format!("/api/service/{id}/instance"), None);
            assert_eq!(c, 200, "{v}");
            ids.insert(name, id);
        }
        ids
    }

    /// The namespace IP of instance 0 of service `sid` once `service/deployed` reached the root.
    pub fn wait_nsip(&self, sid: &str) -> String {
        wait_for(std::time::Duration::from_secs(30), || {
            let (_, v) = self.call("GET", &format!("/api/service/{sid}"), None);
            v["instance_list"][0]["namespace_ip"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            let (_, v) = self.call("GET", &format!("/api/service/{sid}"), None);
            panic!("no namespace IP at the root (service/deployed): {v}")
        })
    }

    pub fn undeploy(&self, sid: &str) {
        let (c, v) = self.call("DELETE", &format!("/api/service/{sid}/instance/0"), None);
        assert_eq!(c, 200, "{v}");
    }
}

/// `GET /index.html` from inside namespace `ns` to `addr`; the whole answer.
pub fn http_get(ns: &str, addr: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    in_netns(ns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        s.write_all(b"GET /index.html HTTP/1.0\r\nHost: svc\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("panicked")))
}
