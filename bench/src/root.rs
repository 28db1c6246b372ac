//! Root API latency with 100 registered clusters and 10,000 services, against a trivial
//! authenticated request on the same server as the baseline; and `orch-lite all` idle RSS
//! against mosquitto's (the broker alone, which upstream runs per cluster) in the same window.

use crate::procfs;
use crate::procs::{self, Orch, TempDir};
use crate::results::{self, append, cdf, Plot, Record};
use crate::stats::{max, percentile};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const SECTION: &str = "control-plane";
const JOIN: &str = "bench-join-token";

pub struct Opts {
    pub clusters: usize,
    pub services: usize,
    pub per_app: usize,
    pub requests: usize,
    pub idle_secs: u64,
}

/// One GET on a fresh connection with TCP_NODELAY (ureq leaves Nagle on, which would put a
/// client-side 40 ms delayed-ACK stall into every figure); ms until the answer is read.
fn timed(port: u16, path: &str, token: &str) -> Result<f64, String> {
    use std::io::{Read, Write};
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "GET {path}: {}",
            String::from_utf8_lossy(&buf[..buf.len().min(200)])
        ));
    }
    Ok(ms)
}

pub fn api(orch_bin: &Path, o: &Opts) -> Result<(), String> {
    let dir = TempDir::new("rootapi")?;
    let orch = Orch::start(
        orch_bin,
        "root",
        dir.path(),
        &[("OAK_JOIN_TOKEN", JOIN.into())],
    )?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let login: Value = agent
        .post(&orch.root_url("/api/auth/login"))
        .send_json(json!({"username": "Admin", "password": "bench"}))
        .map_err(|e| format!("login: {e}"))?
        .into_json()
        .map_err(|e| e.to_string())?;
    let token = login["token"]
        .as_str()
        .ok_or("login answered no token")?
        .to_string();
    let closed = procs::free_port();
    for i in 0..o.clusters {
        agent
            .post(&orch.root_url("/api/clusters/register"))
            .set("Authorization", &format!("Bearer {JOIN}"))
            .send_json(
                json!({"cluster_name": format!("c{i:03}"), "manager_port": closed,
                "cluster_address": "127.0.0.1", "cluster_location": "48.26,11.67,1000",
                "vcpus": 64, "memory": 65536, "virtualization": ["docker"]}),
            )
            .map_err(|e| procs::http_err(&format!("register cluster {i}"), e))?;
    }
    // services as applications of `per_app` microservices each (one SLA POST per application)
    let apps = o.services.div_ceil(o.per_app);
    let mut post_ms = Vec::new();
    for a in 0..apps {
        let ms: Vec<Value> = (0..o.per_app.min(o.services - a * o.per_app))
            .map(|m| {
                json!({"microserviceID": "", "microservice_name": format!("s{m:03}"),
                "microservice_namespace": "b", "virtualization": "container", "cmd": [],
                "memory": 16, "vcpus": 1, "vgpus": 0, "vtpus": 0, "bandwidth_in": 0,
                "bandwidth_out": 0, "storage": 0, "code": "docker.io/library/busybox:latest",
                "state": "", "port": "", "added_files": [], "constraints": []})
            })
            .collect();
        let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{
            "applicationID": "", "application_name": format!("app{a:04}"), "application_namespace": "b",
            "application_desc": "bench", "microservices": ms}]});
        let t0 = Instant::now();
        agent
            .post(&orch.root_url("/api/application"))
            .set("Authorization", &format!("Bearer {token}"))
            .send_json(sla)
            .map_err(|e| procs::http_err(&format!("SLA POST {a}"), e))?;
        post_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let svcs: Value = agent
        .get(&orch.root_url("/api/services/"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())?;
    let n_svcs = svcs.as_array().map(Vec::len).unwrap_or(0);
    let one = svcs[n_svcs / 2]["_id"]["$oid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let app_id = svcs[0]["applicationID"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut baseline = Vec::new();
    for _ in 0..o.requests {
        baseline.push(timed(orch.root_api, "/api/user/Admin", &token)?);
    }
    let base50 = percentile(&baseline, 50.0);
    let base99 = percentile(&baseline, 99.0);
    let mut series = vec![cdf("GET /api/user/Admin (baseline)", &baseline)];
    for (name, path) in [
        ("GET /api/services/ (all)", "/api/services/".to_string()),
        ("GET /api/service/<id>", format!("/api/service/{one}")),
        (
            "GET /api/services/<appid>",
            format!("/api/services/{app_id}"),
        ),
        ("GET /api/clusters", "/api/clusters".to_string()),
    ] {
        let mut v = Vec::new();
        for _ in 0..o.requests {
            v.push(timed(orch.root_api, &path, &token)?);
        }
        let ctx = format!("{} clusters, {n_svcs} services", o.clusters);
        append(
            Record::new(
                SECTION,
                &format!("root API {name} p50 ({ctx})"),
                percentile(&v, 50.0),
                "ms",
            )
            .baseline("GET /api/user/Admin p50, same server", base50)
            .notes(format!("{} requests, sequential", v.len())),
        )
        .map_err(|e| e.to_string())?;
        append(
            Record::new(
                SECTION,
                &format!("root API {name} p99 ({ctx})"),
                percentile(&v, 99.0),
                "ms",
            )
            .baseline("GET /api/user/Admin p99, same server", base99),
        )
        .map_err(|e| e.to_string())?;
        series.push(cdf(name, &v));
    }
    append(
        Record::new(
            SECTION,
            &format!(
                "root SLA POST p50 ({} microservices per application)",
                o.per_app
            ),
            percentile(&post_ms, 50.0),
            "ms",
        )
        .notes(format!(
            "{apps} POSTs; p99 {:.1} ms, last {:.1} ms (store grows during the run)",
            percentile(&post_ms, 99.0).unwrap_or(f64::NAN),
            post_ms.last().copied().unwrap_or(f64::NAN)
        )),
    )
    .map_err(|e| e.to_string())?;
    let m = procfs::mem(orch.proc.pid()).map(|m| m.rss_kib as f64 / 1024.0);
    append(
        Record::new(
            SECTION,
            &format!(
                "orch-lite root RSS with {} clusters and {n_svcs} services",
                o.clusters
            ),
            m,
            "MiB",
        )
        .notes("one reading after the API timings; anchors.md G10 asks ≤ 40 MiB with 100 clusters"),
    )
    .map_err(|e| e.to_string())?;
    results::save_plot(&Plot {
        id: "root-api".into(),
        title: format!(
            "Root API latency, {} clusters, {n_svcs} services (CDF)",
            o.clusters
        ),
        x_label: "ms".into(),
        y_label: "fraction".into(),
        kind: "cdf".into(),
        series,
    })
    .map_err(|e| e.to_string())
}

pub fn all_idle(orch_bin: &Path, o: &Opts) -> Result<(), String> {
    let dir = TempDir::new("allidle")?;
    let orch = Orch::start(orch_bin, "all", dir.path(), &[])?;
    let (mosq, _port) = procs::mosquitto(&dir.path().join("mosq"))?;
    // settle: the in-process cluster registers with the root
    std::thread::sleep(Duration::from_secs(o.idle_secs.min(5)));
    let w = procfs::sample(
        &[orch.proc.pid(), mosq.pid()],
        Duration::from_secs(o.idle_secs),
        Duration::from_secs(1),
        || false,
    );
    let p95 = |i: usize| percentile(&w[i].rss_kib(), 95.0).map(|k| k / 1024.0);
    append(
        Record::new(SECTION, "orch-lite all idle RSS p95", p95(0), "MiB")
            .baseline("mosquitto idle (the broker alone)", p95(1))
            .goal("le", 24.0, "≤ 24 MiB")
            .notes(format!(
                "max {:.1} MiB, CPU {:.3} % of a core, {} threads; {} samples over {} s",
                max(&w[0].rss_kib()).unwrap_or(f64::NAN) / 1024.0,
                w[0].cpu_percent.unwrap_or(f64::NAN),
                procfs::threads(orch.proc.pid()).unwrap_or(0),
                w[0].samples.len(),
                o.idle_secs
            )),
    )
    .map_err(|e| e.to_string())
}
