//! Helpers for the root integration tests: a root started in-process on a free port with its
//! own data directory, a raw HTTP/1.1 client (so tests control every header, like curl), and a
//! recording cluster stand-in.
//!
//! `ClusterStandIn` is a TEMPORARY stand-in for the cluster role's API (issue #6): it records
//! the root's deploy/undeploy calls and answers as CLUSTER_CONTRACT.md §2 says. Replace it with
//! the real cluster role once that lands on main.

#![allow(dead_code)]

use orch_lite::http::{self, Request, Response};
use orch_lite::root::{self, RootConfig, RootHandle};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const JOIN: &str = "test-join-token";
pub const PASSWORD: &str = "s3cret";

pub fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("orch-lite-root-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn config(dir: &Path) -> RootConfig {
    let mut c = RootConfig::new(dir.to_path_buf());
    c.api_addr = "127.0.0.1:0".parse().unwrap();
    c.admin_password = Some(PASSWORD.into());
    c.join_token = Some(JOIN.into());
    c
}

pub fn start(c: RootConfig) -> RootHandle {
    let _ = env_logger::builder().is_test(true).try_init();
    root::start(c).expect("root starts")
}

/// One HTTP call; `token` becomes `Authorization: Bearer <token>`.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let (code, text) = orch_lite::root::delivery::parse_response(&out).expect("an HTTP response");
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub fn login(addr: SocketAddr) -> String {
    let (code, v) = http(
        addr,
        "POST",
        "/api/auth/login",
        None,
        Some(&format!(
            r#"{{"username":"Admin","password":"{PASSWORD}"}}"#
        )),
    );
    assert_eq!(code, 200, "{v}");
    v["token"].as_str().unwrap().to_string()
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the stand-in saw: method, path, bearer token, JSON body.
pub type Seen = (String, String, Option<String>, Value);

pub struct ClusterStandIn {
    pub server: http::Server,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl ClusterStandIn {
    pub fn start() -> ClusterStandIn {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let handler: http::Handler = Arc::new(move |r: &Request| {
            let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            s2.lock().unwrap().push((
                r.method.clone(),
                r.path.clone(),
                r.bearer().map(String::from),
                body,
            ));
            Response::json(200, &serde_json::json!({"status": "ok"}))
        });
        let server = http::serve(
            "127.0.0.1:0".parse().unwrap(),
            2,
            "cluster-stand-in",
            handler,
        )
        .unwrap();
        ClusterStandIn { server, seen }
    }

    pub fn calls(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Registers with the root as `name` and returns the cluster id.
    pub fn register(&self, root: SocketAddr, name: &str, cpu_percent: f64) -> String {
        let body = serde_json::json!({"cluster_name": name, "cluster_location": "48.26,11.67,1000",
            "manager_port": self.server.addr.port(), "network_component_port": 10110,
            "cluster_address": "127.0.0.1", "cluster_info": {},
            "vcpus": 4, "memory": 3500, "cpu_percent": cpu_percent, "virtualization": ["docker"], "active_nodes": 1});
        let (code, v) = http(
            root,
            "POST",
            "/api/clusters/register",
            Some(JOIN),
            Some(&body.to_string()),
        );
        assert_eq!(code, 200, "{v}");
        v["id"].as_str().unwrap().to_string()
    }
}
