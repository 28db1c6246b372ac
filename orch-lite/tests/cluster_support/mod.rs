//! Shared parts of the cluster integration tests: the real `orch-lite` binary on free ports with
//! a temporary data directory, simulated workers speaking real MQTT (rumqttc) and HTTP, and an
//! external mosquitto. Every process is killed in `Drop`.
#![allow(dead_code)]

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub struct Orch {
    child: Child,
    pub api: u16,
    pub mqtt: u16,
    pub dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Orch {
    /// Starts `orch-lite cluster`; `env` adds or overrides variables.
    pub fn start(dir: &Path, mqtt_port: u16, env: &[(&str, &str)]) -> Orch {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let api = free_port();
        let mut o = Orch {
            child: spawn(dir, api, mqtt_port, &env),
            api,
            mqtt: mqtt_port,
            dir: dir.to_path_buf(),
            env,
        };
        o.wait_ready();
        o
    }

    fn wait_ready(&mut self) {
        // Registrations are refused with 503 until the cluster's MQTT subscriptions are in.
        let url = self.url("/api/cluster/status");
        wait_for("orch-lite API subscribed", Duration::from_secs(20), || {
            ureq::get(&url)
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .is_some_and(|v| v["mqtt_subscribed"] == true)
        });
    }

    /// SIGKILL and start again on the same ports and data directory.
    pub fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = spawn(&self.dir, self.api, self.mqtt, &self.env);
        self.wait_ready();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api)
    }

    pub fn status(&self) -> Value {
        ureq::get(&self.url("/api/cluster/status"))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }

    pub fn metrics(&self) -> String {
        ureq::get(&self.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name].as_u64().unwrap_or(0)
    }

    pub fn instance(&self, job_id: &str, n: u64) -> Option<Value> {
        self.status()["instances"]
            .as_array()?
            .iter()
            .find(|i| i["job_id"] == job_id && i["instance_number"] == n)
            .cloned()
    }

    /// `POST /api/service/<job>/<n>` as the root does; returns the HTTP status.
    pub fn deploy(&self, job_id: &str, n: u64, job: &Value, token: Option<&str>) -> u16 {
        let mut rq = ureq::post(&self.url(&format!("/api/service/{job_id}/{n}")));
        if let Some(t) = token {
            rq = rq.set("Authorization", &format!("Bearer {t}"));
        }
        status_of(rq.send_json(job.clone()))
    }

    pub fn register(&self, body: &Value) -> (u16, Value) {
        match ureq::post(&self.url("/api/node/register")).send_json(body.clone()) {
            Ok(r) => (r.status(), r.into_json().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("register: {e}"),
        }
    }
}

pub fn status_of(r: Result<ureq::Response, ureq::Error>) -> u16 {
    match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(e) => panic!("request failed: {e}"),
    }
}

pub fn spawn(dir: &Path, api: u16, mqtt: u16, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("orch-lite.log"))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orch-lite"));
    cmd.arg("cluster")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("OAK_DATA_DIR", dir.join("data"))
        .env("OAK_CLUSTER_API_ADDR", format!("127.0.0.1:{api}"))
        .env("OAK_MQTT_ADDR", format!("127.0.0.1:{mqtt}"))
        .env("OAK_CLUSTER_NAME", "test-cluster")
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start orch-lite")
}

impl Drop for Orch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self.dir.join("orch-lite.log")) {
                eprintln!("---- orch-lite log ----\n{log}");
            }
        }
    }
}

/// The shared launcher (a real mosquitto on a free loopback port, killed on drop).
#[allow(unused_imports)] // not every test binary that includes this module starts a broker
pub use e2e::mosquitto::Mosquitto;

/// Publishes one message with the real `mosquitto_pub` client.
pub fn mosquitto_pub(port: u16, topic: &str, payload: &str) {
    let st = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ])
        .status()
        .expect("mosquitto_pub is installed");
    assert!(st.success(), "mosquitto_pub to {topic}");
}

/// A simulated worker: registered over HTTP, connected over MQTT as `<id>-ne`, subscribed to its
/// control topics, and (while `alive`) publishing `information` and `jobs/resources` listing
/// every instance it was told to deploy.
pub struct SimWorker {
    pub id: String,
    pub alive: Arc<AtomicBool>,
    pub deploys: Receiver<Value>,
    pub deletes: Receiver<Value>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    client: Client,
}

pub fn node_doc(name: &str, machine: &str, vcpus: u64, memory: u64, token: Option<&str>) -> Value {
    let mut v = json!({"host": name, "ip": "127.0.0.1", "port": "3000", "vcpus": vcpus, "memory": memory,
        "architecture": "amd64", "virtualization": ["docker"], "cpu_percent": 1.0, "memory_percent": 10.0,
        "machine_id": machine});
    if let Some(t) = token {
        v["token"] = t.into();
    }
    v
}

impl SimWorker {
    pub fn connect(id: &str, mqtt_port: u16, vcpus: u64, memory: u64) -> SimWorker {
        let mut opts = MqttOptions::new(format!("{id}-ne"), "127.0.0.1", mqtt_port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(opts, 64);
        let (dtx, deploys) = channel();
        let (xtx, deletes) = channel();
        let running: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let subscribed = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (client, running, stop, subscribed, id) = (
                client.clone(),
                running.clone(),
                stop.clone(),
                subscribed.clone(),
                id.to_string(),
            );
            threads.push(std::thread::spawn(move || {
                for ev in conn.iter() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match ev {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = client
                                .subscribe(format!("nodes/{id}/control/deploy"), QoS::AtLeastOnce);
                            let _ = client
                                .subscribe(format!("nodes/{id}/control/delete"), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subscribed.store(true, Ordering::Relaxed)
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let v: Value =
                                serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                            if p.topic.ends_with("/control/deploy") {
                                let job = v["job_name"].as_str().unwrap_or("").to_string();
                                let n = v["instance_number"].as_u64().unwrap_or(0);
                                running.lock().unwrap().push((job, n));
                                let _ = dtx.send(v);
                            } else if p.topic.ends_with("/control/delete") {
                                let job = v["job_name"].as_str().unwrap_or("").to_string();
                                let n = v["instance_number"].as_u64().unwrap_or(0);
                                running.lock().unwrap().retain(|r| *r != (job.clone(), n));
                                let _ = xtx.send(v);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            }));
        }
        {
            let (client, running, stop, alive, id) = (
                client.clone(),
                running.clone(),
                stop.clone(),
                alive.clone(),
                id.to_string(),
            );
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if alive.load(Ordering::Relaxed) {
                        let info = json!({"ip": "127.0.0.1", "vcpus": vcpus, "memory": memory, "cpu_percent": 2.0, "memory_percent": 10.0});
                        let _ = client.try_publish(format!("nodes/{id}/information"), QoS::AtLeastOnce, false, info.to_string());
                        let services: Vec<Value> = running.lock().unwrap().iter().map(|(j, n)| json!({
                            "job_name": j, "instance": n, "cpu_percent": "0.1", "memory_percent": "0.2",
                            "disk": "0", "logs": "", "virtualization": "docker"})).collect();
                        let _ = client.try_publish(format!("nodes/{id}/jobs/resources"), QoS::AtLeastOnce, false,
                            json!({"services": services}).to_string());
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            }));
        }
        wait_for("worker MQTT subscription", Duration::from_secs(10), || {
            subscribed.load(Ordering::Relaxed)
        });
        SimWorker {
            id: id.into(),
            alive,
            deploys,
            deletes,
            stop,
            threads,
            client,
        }
    }
}

impl Drop for SimWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn job_doc(name: &str) -> Value {
    json!({"_id": "ignored", "job_name": name, "image": "docker.io/library/nginx:latest",
           "virtualization": "docker", "vcpus": 1, "memory": 100, "port": "6080:80/tcp",
           "instance_list": [{"instance_number": 0, "status": "CLUSTER_SCHEDULED"}]})
}
