//! The clusters' side of the root (CLUSTER_CONTRACT.md): registration, the periodic report
//! (spec §4.3), instance status pushes, reconciliation, and moving the instances of a silent
//! cluster elsewhere. Functions of (state, input, now) returning the calls to make to clusters;
//! the HTTP edge and the delivery threads are elsewhere. Cluster input is hostile: every field is
//! parsed on its own, bad ones are skipped, and only whitelisted instance fields are taken.

use crate::root::db::State;
use crate::root::ids;
use crate::root::model::{push_history, Cluster, Instance, Point, HISTORY_MAX};
use crate::root::placement;
use serde_json::Value;
use std::net::IpAddr;
use worker::protocol::Status;

/// A call the root must make to a cluster (CLUSTER_CONTRACT §2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outbound {
    /// `POST /api/service/<job>/<n>` with the job document of that instance.
    Deploy {
        cluster_id: String,
        job_id: String,
        instance: u64,
    },
    /// `DELETE /api/service/<job>/<n>`, `-1` for all.
    Undeploy {
        cluster_id: String,
        job_id: String,
        instance: i64,
    },
    /// `POST /api/net/job/update {job_name}`: the job's routable instances changed; the
    /// cluster tells its interested workers to query the table again (spec overlay §3.7).
    JobUpdate {
        cluster_id: String,
        job_name: String,
    },
}

impl Outbound {
    pub fn cluster_id(&self) -> &str {
        match self {
            Outbound::Deploy { cluster_id, .. }
            | Outbound::Undeploy { cluster_id, .. }
            | Outbound::JobUpdate { cluster_id, .. } => cluster_id,
        }
    }
}

/// Largest `logs` kept per instance; upstream's worker sends the last 1 KiB.
const LOGS_MAX: usize = 4096;
/// Longest identifier-like string taken from a cluster (ids, addresses, ports).
const SHORT_MAX: usize = 128;
const DETAIL_MAX: usize = 1024;

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|f: &f64| f.is_finite())
}

fn count(v: &Value) -> Option<u64> {
    num(v).filter(|f| *f >= 0.0).map(|f| f.round() as u64)
}

fn short_string(v: &Value, max: usize) -> Option<String> {
    match v {
        Value::String(s) if s.len() <= max => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

fn strings(v: &Value) -> Option<Vec<String>> {
    let a = v.as_array()?;
    let mut out: Vec<String> = a
        .iter()
        .filter_map(|x| match x {
            Value::String(s) if s.len() <= SHORT_MAX => Some(s.clone()),
            // Workers advertise CSI drivers as objects (spec §5.1); clusters may pass them on.
            Value::Object(o) => o
                .get("csi_driver_name")
                .and_then(Value::as_str)
                .map(String::from),
            _ => None,
        })
        .take(256)
        .collect();
    out.sort();
    out.dedup();
    Some(out)
}

// ---------------------------------------------------------------- registration

#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub name: String,
    pub location: String,
    pub manager_port: u16,
    pub network_component_port: u16,
    pub address: String,
    pub cluster_info: Value,
}

fn port(v: &Value, field: &str) -> Result<u16, String> {
    num(v)
        .filter(|p| p.fract() == 0.0 && (1.0..=65535.0).contains(p))
        .map(|p| p as u16)
        .ok_or_else(|| format!("{field}: must be a port number 1-65535, got {v}"))
}

/// Parses `POST /api/clusters/register` (CLUSTER_CONTRACT §1.1); `peer` is the TCP peer, used
/// when the cluster does not advertise an address.
pub fn parse_registration(body: &Value, peer: Option<IpAddr>) -> Result<Registration, String> {
    let o = body.as_object().ok_or("body must be a JSON object")?;
    let name = o
        .get("cluster_name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "cluster_name: {name:?} must be 1-64 characters of letters, digits, '.', '_' or '-'; set OAK_CLUSTER_NAME"
        ));
    }
    let location = match o.get("cluster_location") {
        None | Some(Value::Null) => String::new(),
        Some(v) => short_string(v, 256)
            .ok_or("cluster_location: must be a string such as \"48.26,11.67,1000\"")?,
    };
    let manager_port = port(
        o.get("manager_port").unwrap_or(&Value::Null),
        "manager_port",
    )?;
    let network_component_port = match o.get("network_component_port") {
        None | Some(Value::Null) => manager_port,
        Some(v) => port(v, "network_component_port")?,
    };
    let advertised = o
        .get("cluster_address")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim();
    let address = if !advertised.is_empty() {
        if advertised.len() > 253 || advertised.contains(['/', ' ', '@']) {
            return Err(format!("cluster_address: {advertised:?} must be an IP address or host name (no scheme, no port); set OAK_ADVERTISE_ADDR"));
        }
        advertised.to_string()
    } else {
        peer.map(|p| p.to_string()).ok_or(
            "cluster_address: missing and the peer address is unknown; set OAK_ADVERTISE_ADDR",
        )?
    };
    Ok(Registration {
        name: name.into(),
        location,
        manager_port,
        network_component_port,
        address,
        cluster_info: o.get("cluster_info").cloned().unwrap_or(Value::Null),
    })
}

/// Upserts by name, as upstream: a cluster keeps its id across restarts. Returns the id.
pub fn register(state: &mut State, reg: Registration, body: &Value, now: f64) -> String {
    let idx = match state
        .clusters
        .iter()
        .position(|c| c.candidate_name == reg.name)
    {
        Some(i) => i,
        None => {
            state.clusters.push(Cluster {
                id: ids::new_oid(now as u64),
                candidate_name: reg.name.clone(),
                registered_at: now,
                ..Cluster::default()
            });
            state.clusters.len() - 1
        }
    };
    let c = &mut state.clusters[idx];
    c.candidate_location = reg.location;
    c.ip = reg.address;
    c.port = reg.manager_port.to_string();
    c.network_component_port = reg.network_component_port;
    c.cluster_info = reg.cluster_info;
    c.last_modified_timestamp = now;
    update_capacity(c, body, now, false);
    log::info!(
        "cluster {} registered as {} at {}",
        c.candidate_name,
        c.id,
        c.base_url()
    );
    c.id.clone()
}

// ---------------------------------------------------------------- reports

/// Applies the aggregate fields of a report; absent or malformed fields keep their value.
fn update_capacity(c: &mut Cluster, body: &Value, now: f64, history: bool) {
    let get = |k: &str| body.get(k).unwrap_or(&Value::Null);
    let set_u = |f: &mut u64, k: &str| {
        if let Some(v) = count(get(k)) {
            *f = v;
        }
    };
    set_u(&mut c.active_nodes, "active_nodes");
    set_u(&mut c.vcpus, "vcpus");
    set_u(&mut c.memory, "memory");
    set_u(&mut c.vgpus, "vgpus");
    set_u(&mut c.vram, "vram");
    for (f, k) in [
        (&mut c.cpu_percent, "cpu_percent"),
        (&mut c.memory_percent, "memory_percent"),
        (&mut c.vram_percent, "vram_percent"),
        (&mut c.gpu_percent, "gpu_percent"),
        (&mut c.gpu_temp, "gpu_temp"),
    ] {
        if let Some(v) = num(get(k)) {
            *f = v;
        }
    }
    for (f, k) in [
        (&mut c.virtualization, "virtualization"),
        (&mut c.supported_addons, "supported_addons"),
        (&mut c.csi_drivers, "csi_drivers"),
        (&mut c.gpu_drivers, "gpu_drivers"),
    ] {
        if let Some(v) = strings(get(k)) {
            *f = v;
        }
    }
    if let Some(a) = body
        .get("aggregation_per_architecture")
        .filter(|a| a.is_object())
    {
        if a.to_string().len() <= 16 * 1024 {
            c.aggregation_per_architecture = a.clone();
        }
    }
    if history {
        push_history(
            &mut c.cpu_history,
            Point {
                value: c.cpu_percent,
                timestamp: now,
            },
        );
        push_history(
            &mut c.memory_history,
            Point {
                value: c.memory_percent,
                timestamp: now,
            },
        );
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReportError {
    UnknownCluster(String),
    Body(String),
}

impl std::fmt::Display for ReportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReportError::UnknownCluster(id) => write!(
                f,
                "cluster {id} is not registered; register again with POST /api/clusters/register"
            ),
            ReportError::Body(e) => f.write_str(e),
        }
    }
}

/// `POST /api/information/<cluster_id>` (spec §4.3).
pub fn apply_report(
    state: &mut State,
    cluster_id: &str,
    body: &Value,
    now: f64,
) -> Result<Vec<Outbound>, ReportError> {
    if !body.is_object() {
        return Err(ReportError::Body("report must be a JSON object".into()));
    }
    let c = state
        .cluster_mut(cluster_id)
        .ok_or_else(|| ReportError::UnknownCluster(cluster_id.into()))?;
    c.last_modified_timestamp = now;
    update_capacity(c, body, now, true);
    let jobs = match body.get("jobs") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => return Err(ReportError::Body("jobs: must be an array".into())),
    };
    let out = merge_jobs(state, cluster_id, jobs, now);
    if body.get("jobs").is_some_and(Value::is_array) {
        drop_vanished(state, cluster_id, jobs);
    }
    Ok(out)
}

/// A full report lists every instance the cluster holds. An instance the cluster had taken on
/// (it reported it past CLUSTER_SCHEDULED) but no longer lists was removed there, e.g. undeployed
/// through the cluster's API while the root was away, whose push the root never got: the root
/// drops it as its own undeploy does, instead of showing it RUNNING for ever. Instances still
/// waiting for the cluster to take them are left alone (their deploy call may be in flight).
fn drop_vanished(state: &mut State, cluster_id: &str, jobs: &[Value]) {
    let listed = |job_id: &str, n: u64| {
        jobs.iter()
            .filter(|e| job_id_of(e) == Some(job_id))
            .filter_map(|e| e.get("instance_list").and_then(Value::as_array))
            .flatten()
            .any(|i| i.get("instance_number").and_then(count) == Some(n))
    };
    let mut freed = Vec::new();
    for job in &mut state.jobs {
        let job_id = job.id().to_string();
        let before = job.instance_list.len();
        job.instance_list.retain(|i| {
            let gone = i.cluster_id == cluster_id
                && !matches!(
                    i.status,
                    Status::Requested | Status::ClusterScheduled | Status::Completed
                )
                && !listed(&job_id, i.instance_number);
            if gone {
                log::warn!(
                    "cluster {cluster_id} no longer holds instance {job_id}/{} ({}): dropped",
                    i.instance_number,
                    i.status
                );
                freed.push((i.instance_ip.clone(), i.instance_ip_v6.clone()));
            }
            !gone
        });
        if job.instance_list.len() != before {
            match aggregate_status(&job.instance_list) {
                Some(s) => job.status = Some(s),
                None => {
                    job.status = Some(Status::Undeployed);
                    job.status_detail = Some("all instances removed at the cluster".into());
                }
            }
        }
    }
    for (v4, v6) in freed {
        state.release_instance_ips(&v4, &v6);
    }
}

/// `POST /api/information/<cluster_id>/jobs` (CLUSTER_CONTRACT §1.3).
pub fn apply_status_push(
    state: &mut State,
    cluster_id: &str,
    body: &Value,
    now: f64,
) -> Result<Vec<Outbound>, ReportError> {
    let jobs = body
        .get("jobs")
        .and_then(Value::as_array)
        .ok_or_else(|| ReportError::Body("jobs: required, an array of job entries".into()))?;
    let c = state
        .cluster_mut(cluster_id)
        .ok_or_else(|| ReportError::UnknownCluster(cluster_id.into()))?;
    c.last_modified_timestamp = now;
    Ok(merge_jobs(state, cluster_id, jobs, now))
}

fn job_id_of(entry: &Value) -> Option<&str> {
    match entry.get("_id")? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("$oid")?.as_str(),
        _ => None,
    }
}

fn merge_jobs(state: &mut State, cluster_id: &str, jobs: &[Value], now: f64) -> Vec<Outbound> {
    let mut out = Vec::new();
    let undeploy = |job_id: &str, n: i64| Outbound::Undeploy {
        cluster_id: cluster_id.into(),
        job_id: job_id.into(),
        instance: n,
    };
    for entry in jobs {
        let Some(job_id) = job_id_of(entry).filter(|id| id.len() <= SHORT_MAX) else {
            log::debug!("cluster {cluster_id}: job entry without a usable _id skipped");
            continue;
        };
        let Some(job) = state.job_mut(job_id) else {
            // The root deleted it (maybe while the cluster was unreachable): tell it again.
            out.push(undeploy(job_id, -1));
            continue;
        };
        let reported = entry
            .get("instance_list")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for ri in reported {
            let Some(n) = ri.get("instance_number").and_then(count) else {
                continue;
            };
            match job.instance_mut(n) {
                Some(inst) if inst.cluster_id == cluster_id => merge_instance(inst, ri, now),
                // Unknown here, or moved to another cluster while this one was silent.
                _ => out.push(undeploy(job_id, n as i64)),
            }
        }
        if let Some(s) = aggregate_status(&job.instance_list) {
            job.status = Some(s);
            if let Some(d) = entry
                .get("status_detail")
                .and_then(|v| short_string(v, DETAIL_MAX))
            {
                job.status_detail = Some(d);
            }
        }
    }
    out
}

fn merge_instance(inst: &mut Instance, r: &Value, now: f64) {
    match r
        .get("status")
        .map(|s| serde_json::from_value::<Status>(s.clone()))
    {
        Some(Ok(s)) => inst.status = s,
        Some(Err(_)) => log::debug!(
            "instance {}: unknown status {} ignored",
            inst.instance_number,
            r["status"]
        ),
        None => {}
    }
    let text = |k: &str, max: usize| r.get(k).and_then(|v| short_string(v, max));
    if let Some(v) = text("status_detail", DETAIL_MAX) {
        inst.status_detail = v;
    }
    for (f, k) in [
        (&mut inst.worker_id, "worker_id"),
        (&mut inst.host_ip, "host_ip"),
        (&mut inst.host_port, "host_port"),
        (&mut inst.publicip, "publicip"),
        (&mut inst.namespace_ip, "namespace_ip"),
        (&mut inst.namespace_ip_v6, "namespace_ip_v6"),
    ] {
        if let Some(v) = text(k, SHORT_MAX) {
            *f = v;
        }
    }
    for k in ["cpu_percent", "memory_percent", "disk"] {
        if let Some(v) = text(k, SHORT_MAX) {
            inst.metrics.insert(k.into(), Value::String(v));
        }
    }
    if let Some(l) = r.get("logs").and_then(Value::as_str) {
        inst.metrics
            .insert("logs".into(), Value::String(tail(l, LOGS_MAX)));
    }
    for k in ["cpu_history", "memory_history"] {
        if let Some(h) = r.get(k).and_then(Value::as_array) {
            let keep: Vec<Value> = h[h.len().saturating_sub(HISTORY_MAX)..]
                .iter()
                .filter(|p| p.is_object() && p.to_string().len() <= 256)
                .cloned()
                .collect();
            inst.metrics.insert(k.into(), Value::Array(keep));
        }
    }
    inst.last_modified_timestamp = now;
}

/// The job status shown for its instances: the common status if they agree; else a failure if
/// any failed; else the least advanced transitional state; else RUNNING. `None` for no instances.
pub fn aggregate_status(instances: &[Instance]) -> Option<Status> {
    let first = instances.first()?.status;
    if instances.iter().all(|i| i.status == first) {
        return Some(first);
    }
    let any = |s: Status| instances.iter().any(|i| i.status == s);
    for s in [
        Status::Failed,
        Status::Dead,
        Status::Requested,
        Status::ClusterScheduled,
        Status::NodeScheduled,
        Status::Creating,
        Status::Created,
    ] {
        if any(s) {
            return Some(s);
        }
    }
    Some(Status::Running)
}

// ---------------------------------------------------------------- liveness

/// Whether any instance sits on a cluster silent for longer than `timeout_secs` (cheap check
/// before taking the write path). `watching_since` is when this root process started: a cluster
/// cannot be blamed for silence the root was not there to hear (a root restarted after a long
/// outage would otherwise move every instance away before their clusters' next report).
pub fn has_stranded(state: &State, now: f64, timeout_secs: f64, watching_since: f64) -> bool {
    !stranded(state, now, timeout_secs, watching_since).is_empty()
}

fn stranded(
    state: &State,
    now: f64,
    timeout_secs: f64,
    watching_since: f64,
) -> Vec<(String, u64, String)> {
    let silent = |cid: &str| {
        state.cluster(cid).map_or(true, |c| {
            now - c.last_modified_timestamp.max(watching_since) >= timeout_secs
        })
    };
    state
        .jobs
        .iter()
        .flat_map(|j| {
            j.instance_list
                .iter()
                .filter(|i| !matches!(i.status, Status::Completed | Status::Undeployed))
                .filter(|i| silent(&i.cluster_id))
                .map(|i| (j.id().to_string(), i.instance_number, i.cluster_id.clone()))
        })
        .collect()
}

/// Moves every instance of a silent cluster to an active one (CLUSTER_CONTRACT §3). Instances
/// no cluster can take are marked FAILED and retried on the next call.
pub fn reschedule_stranded(
    state: &mut State,
    now: f64,
    timeout_secs: f64,
    watching_since: f64,
) -> Vec<Outbound> {
    let mut out = Vec::new();
    for (job_id, n, from) in stranded(state, now, timeout_secs, watching_since) {
        let name = state
            .cluster(&from)
            .map(|c| c.candidate_name.clone())
            .unwrap_or_else(|| from.clone());
        let why = format!("cluster {name} silent for more than {timeout_secs}s");
        match placement::move_instance(state, &job_id, n, &why, now, timeout_secs) {
            Ok(cluster_id) => {
                log::warn!("{why}: instance {job_id}/{n} moved to cluster {cluster_id}");
                out.push(Outbound::Deploy {
                    cluster_id,
                    job_id,
                    instance: n,
                });
            }
            Err(rej) => log::debug!("{why}: instance {job_id}/{n} stays: {}", rej.detail),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::placement;
    use serde_json::json;

    fn registered(now: f64) -> (State, String) {
        let mut s = crate::root::placement::tests_support::one_job_state();
        let body = json!({"cluster_name": "cluster1", "cluster_location": "48.26,11.67,1000",
                          "manager_port": "10100", "network_component_port": 10110,
                          "vcpus": 4, "memory": 3500, "virtualization": ["docker"]});
        let reg = parse_registration(&body, Some("192.0.2.7".parse().unwrap())).unwrap();
        let id = register(&mut s, reg, &body, now);
        (s, id)
    }

    #[test]
    fn registration_validates_and_upserts_by_name() {
        let (mut s, id) = registered(1000.0);
        let c = s.cluster(&id).unwrap();
        assert_eq!(
            (c.ip.as_str(), c.port.as_str(), c.vcpus),
            ("192.0.2.7", "10100", 4)
        );
        assert!(ids::is_oid(&id));
        let body = json!({"cluster_name": "cluster1", "manager_port": 10200, "cluster_address": "edge.example"});
        let id2 = register(
            &mut s,
            parse_registration(&body, None).unwrap(),
            &body,
            1001.0,
        );
        assert_eq!(id, id2, "same name, same id");
        assert_eq!(
            s.cluster(&id).unwrap().base_url(),
            "http://edge.example:10200"
        );
        for (bad, field) in [
            (json!({"manager_port": 1}), "cluster_name"),
            (
                json!({"cluster_name": "a b", "manager_port": 1}),
                "cluster_name",
            ),
            (json!({"cluster_name": "a"}), "manager_port"),
            (
                json!({"cluster_name": "a", "manager_port": 70000}),
                "manager_port",
            ),
            (
                json!({"cluster_name": "a", "manager_port": 1, "cluster_address": "http://x/"}),
                "cluster_address",
            ),
            (
                json!({"cluster_name": "a", "manager_port": 1}),
                "cluster_address",
            ),
        ] {
            let e = parse_registration(&bad, None).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn report_updates_capacity_and_instances_with_whitelist() {
        let (mut s, cid) = registered(1000.0);
        placement::add_instance(&mut s, "j1", 1000.0, 30.0).unwrap();
        let ip = s.job("j1").unwrap().instance_list[0].instance_ip.clone();
        let report = json!({"vcpus": "8", "memory": 1200.4, "cpu_percent": 3.5, "active_nodes": 2,
            "virtualization": ["docker", 5, "docker"], "csi_drivers": [{"csi_driver_name": "csi.a"}],
            "jobs": [{"_id": {"$oid": "j1"}, "status": "RUNNING", "status_detail": "fine",
                      "instance_list": [{"instance_number": 0, "status": "RUNNING", "worker_id": "w1",
                          "host_ip": "192.0.2.20", "host_port": 3000, "cpu_percent": "0.01",
                          "logs": "x".repeat(10_000), "cluster_id": "evil", "instance_ip": "10.30.9.9"}]}]});
        let out = apply_report(&mut s, &cid, &report, 1010.0).unwrap();
        assert!(out.is_empty(), "{out:?}");
        let c = s.cluster(&cid).unwrap();
        assert_eq!((c.vcpus, c.memory, c.active_nodes), (8, 1200, 2));
        assert_eq!(c.virtualization, vec!["docker".to_string()]);
        assert_eq!(c.csi_drivers, vec!["csi.a".to_string()]);
        assert_eq!(c.cpu_history.len(), 1);
        let j = s.job("j1").unwrap();
        let i = &j.instance_list[0];
        assert_eq!(
            (i.status, i.worker_id.as_str(), i.host_port.as_str()),
            (Status::Running, "w1", "3000")
        );
        assert_eq!(
            (i.cluster_id.as_str(), i.instance_ip.as_str()),
            (cid.as_str(), ip.as_str()),
            "never taken from a cluster"
        );
        assert_eq!(i.metrics["logs"].as_str().unwrap().len(), LOGS_MAX);
        assert_eq!(j.status, Some(Status::Running));
        assert_eq!(
            apply_report(&mut s, "nope", &json!({}), 1.0),
            Err(ReportError::UnknownCluster("nope".into()))
        );
    }

    #[test]
    fn full_report_drops_instances_the_cluster_no_longer_holds() {
        let (mut s, cid) = registered(1000.0);
        placement::add_instance(&mut s, "j1", 1000.0, 30.0).unwrap();
        placement::add_instance(&mut s, "j1", 1000.0, 30.0).unwrap();
        let entry = |insts: Value| json!({"jobs": [{"_id": "j1", "instance_list": insts}]});
        let running = |n: u64| json!({"instance_number": n, "status": "RUNNING"});
        // Instance 1 not taken on yet (deploy in flight): a report without it keeps it.
        apply_report(&mut s, &cid, &entry(json!([running(0)])), 1001.0).unwrap();
        let nums = |s: &State| -> Vec<(u64, Status)> {
            s.job("j1")
                .unwrap()
                .instance_list
                .iter()
                .map(|i| (i.instance_number, i.status))
                .collect()
        };
        assert_eq!(
            nums(&s),
            [(0, Status::Running), (1, Status::ClusterScheduled)]
        );
        apply_report(
            &mut s,
            &cid,
            &entry(json!([running(0), running(1)])),
            1002.0,
        )
        .unwrap();
        // A push of only some jobs proves nothing about the others.
        apply_status_push(&mut s, &cid, &entry(json!([running(0)])), 1003.0).unwrap();
        assert_eq!(nums(&s).len(), 2);
        // Undeployed at the cluster: gone from the next full report, so gone here.
        let ip1 = s.job("j1").unwrap().instance_list[1].instance_ip.clone();
        apply_report(&mut s, &cid, &entry(json!([running(0)])), 1004.0).unwrap();
        assert_eq!(nums(&s), [(0, Status::Running)]);
        assert_eq!(s.job("j1").unwrap().status, Some(Status::Running));
        // A report without the key `jobs` (capacity only) proves nothing either.
        apply_report(&mut s, &cid, &json!({"vcpus": 4}), 1005.0).unwrap();
        assert_eq!(nums(&s).len(), 1);
        apply_report(&mut s, &cid, &json!({"jobs": []}), 1006.0).unwrap();
        let j = s.job("j1").unwrap();
        assert!(j.instance_list.is_empty());
        assert_eq!(j.status, Some(Status::Undeployed));
        assert!(!ip1.is_empty());
        // Its address is free again: the next instance may get it.
        placement::add_instance(&mut s, "j1", 1007.0, 30.0).unwrap();
        let ips: Vec<String> = s
            .job("j1")
            .unwrap()
            .instance_list
            .iter()
            .map(|i| i.instance_ip.clone())
            .collect();
        assert_eq!(ips.len(), 1);
    }

    #[test]
    fn reconciliation_undeploys_unknown_and_moved_instances() {
        let (mut s, cid) = registered(1000.0);
        placement::add_instance(&mut s, "j1", 1000.0, 30.0).unwrap();
        let push = json!({"jobs": [
            {"_id": "gone", "instance_list": []},
            {"_id": "j1", "instance_list": [{"instance_number": 0, "status": "BOGUS"}, {"instance_number": 7, "status": "RUNNING"}]}]});
        let out = apply_status_push(&mut s, &cid, &push, 1001.0).unwrap();
        let und = |job: &str, n| Outbound::Undeploy {
            cluster_id: cid.clone(),
            job_id: job.into(),
            instance: n,
        };
        assert_eq!(out, vec![und("gone", -1), und("j1", 7)]);
        assert_eq!(
            s.job("j1").unwrap().instance_list[0].status,
            Status::ClusterScheduled,
            "unknown status ignored"
        );
    }

    #[test]
    fn silent_cluster_instances_move_and_the_old_cluster_is_told_later() {
        let (mut s, a) = registered(1000.0);
        placement::add_instance(&mut s, "j1", 1000.0, 30.0).unwrap();
        let body = json!({"cluster_name": "cluster2", "manager_port": 10100, "vcpus": 4, "memory": 3500, "virtualization": ["docker"]});
        let b = register(
            &mut s,
            parse_registration(&body, Some("192.0.2.8".parse().unwrap())).unwrap(),
            &body,
            1020.0,
        );
        assert!(!has_stranded(&s, 1025.0, 30.0, 0.0));
        // A root that started at 1020 has heard cluster 1's silence for 11 s only.
        assert!(!has_stranded(&s, 1031.0, 30.0, 1020.0));
        assert!(has_stranded(&s, 1050.0, 30.0, 1020.0));
        assert!(has_stranded(&s, 1031.0, 30.0, 0.0));
        let out = reschedule_stranded(&mut s, 1031.0, 30.0, 0.0);
        assert_eq!(
            out,
            vec![Outbound::Deploy {
                cluster_id: b.clone(),
                job_id: "j1".into(),
                instance: 0
            }]
        );
        assert!(!has_stranded(&s, 1032.0, 30.0, 0.0));
        // Cluster 1 comes back and still reports the instance: it must drop it.
        let back = json!({"jobs": [{"_id": "j1", "instance_list": [{"instance_number": 0, "status": "RUNNING"}]}]});
        let out = apply_report(&mut s, &a, &back, 1040.0).unwrap();
        assert_eq!(
            out,
            vec![Outbound::Undeploy {
                cluster_id: a,
                job_id: "j1".into(),
                instance: 0
            }]
        );
        assert_eq!(
            s.job("j1").unwrap().instance_list[0].status,
            Status::ClusterScheduled
        );
        // Everything silent: the instance fails visibly and stays put.
        assert!(reschedule_stranded(&mut s, 2000.0, 30.0, 0.0).is_empty());
        assert_eq!(s.job("j1").unwrap().instance_list[0].status, Status::Failed);
    }

    #[test]
    fn job_status_aggregation() {
        let mk = |st: Status| Instance {
            status: st,
            ..Instance::new(0, "c", "", 0.0)
        };
        assert_eq!(aggregate_status(&[]), None);
        assert_eq!(
            aggregate_status(&[mk(Status::Running), mk(Status::Running)]),
            Some(Status::Running)
        );
        assert_eq!(
            aggregate_status(&[mk(Status::Running), mk(Status::Dead)]),
            Some(Status::Dead)
        );
        assert_eq!(
            aggregate_status(&[mk(Status::Running), mk(Status::NodeScheduled)]),
            Some(Status::NodeScheduled)
        );
        assert_eq!(
            aggregate_status(&[mk(Status::Running), mk(Status::Completed)]),
            Some(Status::Running)
        );
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("abc", 2), "bc");
    }
}
