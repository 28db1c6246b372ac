//! Real parts for the session integration tests: a mosquitto broker (the e2e crate's), a blocking MQTT observer built on the
//! worker's own codec, the stand-in for the cluster's `/api/node/register` (the only fake),
//! and the NodeEngine process.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use worker::mqtt::codec::{self, Packet, QoS};

pub const NODE_ID: &str = "6650f0c2e4b0a1b2c3d4e5f6";

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p =
            std::env::temp_dir().join(format!("oak-{name}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The shared launcher; `start_persistent` there, so an observer's clean_session=false
/// subscription survives a restart.
#[allow(unused_imports)] // not every test binary that includes this module starts a broker
pub use e2e::mosquitto::Mosquitto;

/// A blocking MQTT client for observing and injecting, on the worker's own codec.
pub struct Observer {
    s: TcpStream,
    buf: Vec<u8>,
    pid: u16,
}

impl Observer {
    pub fn connect(port: u16, client_id: &str, clean: bool) -> Observer {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to mosquitto");
        s.set_nodelay(true).ok();
        let mut o = Observer {
            s,
            buf: Vec::new(),
            pid: 0,
        };
        o.send(&Packet::Connect(codec::Connect {
            client_id,
            keep_alive: 60,
            clean_session: clean,
            will: None,
            username: None,
            password: None,
        }));
        match o.read_packet(Duration::from_secs(5)) {
            Some(Owned::ConnAck) => o,
            other => panic!("no CONNACK: {other:?}"),
        }
    }

    fn send(&mut self, p: &Packet<'_>) {
        let mut b = vec![0; p.encoded_len().expect("valid packet")];
        p.encode(&mut b).expect("encode");
        self.s.write_all(&b).expect("write to mosquitto");
    }

    pub fn subscribe(&mut self, filter: &str) {
        self.pid += 1;
        let topics = [(filter, QoS::AtLeastOnce)];
        self.send(&Packet::Subscribe(codec::Subscribe {
            pid: self.pid,
            topics: codec::Topics::List(&topics),
        }));
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Some(Owned::SubAck) = self.read_packet(Duration::from_secs(5)) {
                return;
            }
        }
        panic!("no SUBACK");
    }

    /// QoS 0, as the stock cluster manager publishes.
    pub fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.send(&Packet::Publish(codec::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            pid: 0,
            payload,
        }));
    }

    fn read_packet(&mut self, limit: Duration) -> Option<Owned> {
        let end = Instant::now() + limit;
        loop {
            match codec::decode(&self.buf, 1 << 20) {
                Ok(Some((p, n))) => {
                    let owned = match p {
                        Packet::ConnAck(a) => {
                            assert_eq!(a.code, codec::ConnectReturnCode::Accepted);
                            Owned::ConnAck
                        }
                        Packet::SubAck(_) => Owned::SubAck,
                        Packet::Publish(p) => {
                            let m = Owned::Message(p.topic.to_string(), p.payload.to_vec());
                            let ack = (p.qos == QoS::AtLeastOnce).then_some(p.pid);
                            self.buf.drain(..n);
                            if let Some(pid) = ack {
                                self.send(&Packet::PubAck { pid });
                            }
                            return Some(m);
                        }
                        _ => Owned::Other,
                    };
                    self.buf.drain(..n);
                    return Some(owned);
                }
                Ok(None) => {}
                Err(e) => panic!("mosquitto sent a packet our codec rejects: {e}"),
            }
            let now = Instant::now();
            if now >= end {
                return None;
            }
            self.s.set_read_timeout(Some(end - now)).ok();
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("read from mosquitto: {e}"),
            }
        }
    }

    /// The next message for which `want` holds, within `limit`.
    pub fn expect(
        &mut self,
        limit: Duration,
        what: &str,
        want: impl Fn(&str, &serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(Owned::Message(t, p)) = self.read_packet(end - Instant::now()) {
                if t.contains("/control/") {
                    continue; // what the test itself injected
                }
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap_or_else(|e| {
                    panic!(
                        "worker published non-JSON on {t}: {e}: {:?}",
                        String::from_utf8_lossy(&p)
                    )
                });
                if want(&t, &v) {
                    return v;
                }
            }
        }
        panic!("no {what} within {limit:?}");
    }

    /// All messages for `limit`.
    pub fn collect(&mut self, limit: Duration) -> Vec<(String, serde_json::Value)> {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        while Instant::now() < end {
            if let Some(Owned::Message(t, p)) = self.read_packet(end - Instant::now()) {
                out.push((
                    t,
                    serde_json::from_slice(&p).unwrap_or(serde_json::Value::Null),
                ));
            }
        }
        out
    }
}

#[derive(Debug)]
enum Owned {
    ConnAck,
    SubAck,
    Message(String, Vec<u8>),
    Other,
}

/// The cluster's `/api/node/register`, checking every request the way the stock cluster
/// would fail on it (spec §2.2, §13.2), and answering `{"id", "MQTT_BROKER_PORT"}`.
pub struct StandIn {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub port: u16,
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    pub problems: Arc<Mutex<Vec<String>>>,
}

impl StandIn {
    pub fn start(node_id: &str, mqtt_port: u16, token: Option<&str>) -> StandIn {
        StandIn::start_on(0, node_id, mqtt_port, token)
    }

    pub fn start_on(port: u16, node_id: &str, mqtt_port: u16, token: Option<&str>) -> StandIn {
        let server =
            Arc::new(tiny_http::Server::http(("127.0.0.1", port)).expect("stand-in listens"));
        let port = server.server_addr().to_ip().expect("ip listener").port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let problems = Arc::new(Mutex::new(Vec::new()));
        let (s, b, p) = (server.clone(), bodies.clone(), problems.clone());
        let answer = serde_json::json!({"id": node_id, "MQTT_BROKER_PORT": mqtt_port.to_string()})
            .to_string();
        let token = token.map(String::from);
        let thread = std::thread::spawn(move || {
            for mut req in s.incoming_requests() {
                let mut body = String::new();
                let _ = req.as_reader().read_to_string(&mut body);
                let ctype = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Content-Type"))
                    .map(|h| h.value.to_string())
                    .unwrap_or_default();
                let mut bad = Vec::new();
                if *req.method() != tiny_http::Method::Post || req.url() != "/api/node/register" {
                    bad.push(format!("{} {}", req.method(), req.url()));
                }
                if !ctype.starts_with("application/json") {
                    bad.push(format!("content-type {ctype:?}"));
                }
                let v: serde_json::Value =
                    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                bad.extend(check_node_document(&v, token.as_deref()));
                let code = if bad.is_empty() { 200 } else { 500 };
                p.lock().unwrap().extend(bad);
                b.lock().unwrap().push(v);
                let header =
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                        .unwrap();
                let _ = req.respond(
                    tiny_http::Response::from_string(answer.clone())
                        .with_status_code(code)
                        .with_header(header),
                );
            }
        });
        StandIn {
            server,
            thread: Some(thread),
            port,
            bodies,
            problems,
        }
    }

    pub fn registrations(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }

    pub fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the stock cluster needs from a registration body (spec §2.2, §12.1, §13.2).
pub fn check_node_document(v: &serde_json::Value, token: Option<&str>) -> Vec<String> {
    let mut bad = Vec::new();
    let Some(o) = v.as_object() else {
        return vec!["body is not a JSON object".into()];
    };
    for k in ["host", "ip", "port", "architecture"] {
        if !o.get(k).is_some_and(|x| x.is_string()) {
            bad.push(format!("{k} is not a string: {:?}", o.get(k)));
        }
    }
    if o.get("host")
        .and_then(|h| h.as_str())
        .map_or(true, str::is_empty)
    {
        bad.push("empty host".into());
    }
    if !["amd64", "arm64", "arm"]
        .contains(&o.get("architecture").and_then(|a| a.as_str()).unwrap_or(""))
    {
        bad.push(format!("architecture {:?}", o.get("architecture")));
    }
    for k in ["vcpus", "memory"] {
        if !o.get(k).is_some_and(|x| x.is_u64()) {
            bad.push(format!("{k} is not an integer"));
        }
    }
    for k in ["cpu_percent", "memory_percent"] {
        if !o.get(k).is_some_and(|x| x.is_number()) {
            bad.push(format!("{k} is not a number"));
        }
    }
    let virt = o.get("virtualization").and_then(|x| x.as_array());
    if !virt.is_some_and(|a| a.iter().any(|x| x == "docker")) {
        bad.push(format!(
            "virtualization {:?} lacks docker",
            o.get("virtualization")
        ));
    }
    for k in ["supported_addons", "csi_drivers"] {
        if !o.get(k).is_some_and(|x| x.is_array()) {
            bad.push(format!("{k} is not a list"));
        }
    }
    if !o.get("system_info").is_some_and(|x| x.is_object()) {
        bad.push("system_info missing at registration".into());
    }
    match (token, o.get("token")) {
        (Some(t), Some(got)) if got == t => {}
        (Some(_), got) => bad.push(format!("token {got:?}")),
        (None, None) => {}
        (None, Some(got)) => bad.push(format!("unexpected token {got:?}")),
    }
    bad
}

/// Socket name (in the test's dir) where no containerd listens.
pub const NO_CONTAINERD: &str = "no-containerd.sock";

/// The NodeEngine binary, in the foreground, with its log in the temp dir.
pub struct Worker {
    child: Child,
    pub status: SocketAddr,
    log: PathBuf,
}

impl Worker {
    pub fn start(dir: &Path, cluster_port: u16, extra: &[(&str, &str)]) -> Worker {
        let status: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = dir.join("nodeengine.log");
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_NodeEngine"));
        cmd.args(["-a", "127.0.0.1", "-p", &cluster_port.to_string()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "debug")
            .env("OAK_CONFIG_DIR", dir.join("etc"))
            .env("OAK_NETCFG", dir.join("netcfg.json"))
            .env("OAK_STATE_DIR", dir.join("state"))
            .env("OAK_APP_LOGS", dir.join("logs"))
            // Never the host's containerd: these tests run the session without a runtime.
            .env("OAK_CONTAINERD_SOCKET", dir.join(NO_CONTAINERD))
            .env("OAK_STATUS_ADDR", status.to_string())
            .env("OAK_NETWORK", "off")
            .env("OAK_REPORT_INTERVAL_MS", "200")
            .env("OAK_NODE_NAME", "pi-test")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start NodeEngine");
        Worker { child, status, log }
    }

    pub fn get(&self, path: &str) -> String {
        worker::control::http_get(self.status, path, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n--- worker log ---\n{}", self.log()))
    }

    pub fn metric(&self, name_and_labels: &str) -> u64 {
        let text = self.get("/metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name_and_labels)?
                    .strip_prefix(' ')?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no metric {name_and_labels} in\n{text}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait: the graceful path systemd takes.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        wait_for(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        })
        .expect("NodeEngine exits on SIGTERM")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- NodeEngine log ---\n{}", self.log());
        }
    }
}
