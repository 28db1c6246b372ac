//! The cluster's side of the root contract (orch-lite/src/root/CLUSTER_CONTRACT.md §1, spec
//! orchestrators.md §4.3): register with retry, the periodic aggregated report, immediate status
//! pushes for changed jobs, and the overlay's table calls. Blocking HTTP on its own thread, fed
//! by a bounded channel; the root being down delays reports, it never blocks the cluster.

use super::handlers::{NetRequest, ServiceDeployed};
use super::metrics::Metrics;
use super::{now_ms, Shared};
use netstack::control::{self, topic as net_topic, SubnetResult};
use serde_json::{json, Value};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Work for the root link.
#[derive(Debug)]
pub enum RootMsg {
    /// These jobs changed: push their status now.
    Jobs(Vec<String>),
    /// A NetManager request that needs the root's network tables.
    Net(NetRequest),
}

/// Bound of the channel: beyond it pushes are dropped (the periodic report carries them anyway).
pub const QUEUE: usize = 256;

/// How often the number of active workers is compared with the last report's.
const CAPACITY_CHECK: Duration = Duration::from_secs(1);

struct Root {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

enum CallError {
    Status(u16, String),
    Transport(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Status(c, m) => write!(f, "HTTP {c}: {m}"),
            CallError::Transport(e) => write!(f, "{e}"),
        }
    }
}

impl Root {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
        let mut rq = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rq = rq.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => rq.send_json(b),
            None => rq.call(),
        };
        match res {
            Ok(r) => Ok(r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => {
                Err(CallError::Status(code, r.into_string().unwrap_or_default()))
            }
            Err(e) => Err(CallError::Transport(e.to_string())),
        }
    }
}

pub fn run(sh: Arc<Shared>, base: String, rx: Receiver<RootMsg>) {
    let root = Root {
        base,
        token: sh.cfg.root_token.clone(),
        agent: ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build(),
    };
    let interval = Duration::from_millis(sh.cfg.report_interval_ms);
    let mut cluster_id: Option<String> = None;
    let mut backoff = Duration::from_millis(500);
    let mut next_report = Instant::now();
    let mut reported_active: Option<usize> = None;
    loop {
        if cluster_id.is_none() {
            match register(&sh, &root) {
                Ok(id) => {
                    log::info!("registered with the root at {} as cluster {id}", root.base);
                    sh.lock().set_cluster_id(&id);
                    sh.set_root_connected(true);
                    cluster_id = Some(id);
                    backoff = Duration::from_millis(500);
                    next_report = Instant::now();
                }
                Err(e) => {
                    sh.set_root_connected(false);
                    log::warn!("cannot register with the root at {} ({e}); retrying in {} s (check OAK_ROOT_URL and OAK_JOIN_TOKEN)", root.base, backoff.as_secs_f32());
                    // Keep draining so net requests get their (negative) answer.
                    let until = Instant::now() + backoff;
                    while let Some(left) = until.checked_duration_since(Instant::now()) {
                        match rx.recv_timeout(left) {
                            Ok(RootMsg::Net(n)) => net(&sh, None, n),
                            Ok(RootMsg::Jobs(_)) => {}
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
        }
        let Some(cid) = cluster_id.clone() else {
            continue;
        };
        // Wake at least every second: when a worker joins or goes silent, the root hears of the
        // new capacity at once instead of after up to a whole report interval, so a deploy
        // right after a worker joins is not refused for lack of capacity.
        let wait = next_report
            .saturating_duration_since(Instant::now())
            .min(CAPACITY_CHECK);
        let result = match rx.recv_timeout(wait) {
            Ok(RootMsg::Jobs(mut jobs)) => {
                // Coalesce a burst of changes (a worker failing takes several instances along).
                let until = Instant::now() + Duration::from_millis(100);
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    match rx.recv_timeout(left) {
                        Ok(RootMsg::Jobs(more)) => jobs.extend(more),
                        Ok(RootMsg::Net(n)) => net(&sh, Some(&root), n),
                        Err(_) => break,
                    }
                }
                jobs.sort();
                jobs.dedup();
                let entries = sh.lock().job_entries(Some(&jobs));
                root.call(
                    "POST",
                    &format!("/api/information/{cid}/jobs"),
                    Some(&json!({"jobs": entries})),
                )
            }
            Ok(RootMsg::Net(n)) => {
                net(&sh, Some(&root), n);
                Ok(Value::Null)
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = now_ms();
                let (active, report) = {
                    let st = sh.lock();
                    let active = st.active_nodes(now);
                    let due = Instant::now() >= next_report || Some(active) != reported_active;
                    (active, due.then(|| st.report(now)))
                };
                match report {
                    Some(report) => {
                        next_report = Instant::now() + interval;
                        reported_active = Some(active);
                        root.call("POST", &format!("/api/information/{cid}"), Some(&report))
                    }
                    None => continue,
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        match result {
            Ok(_) => sh.set_root_connected(true),
            Err(CallError::Status(404, _)) => {
                log::warn!("the root no longer knows cluster {cid}; registering again");
                cluster_id = None;
            }
            Err(e) => {
                Metrics::inc(&sh.metrics.root_push_failures);
                sh.set_root_connected(false);
                log::warn!("report to the root at {} failed: {e}", root.base);
            }
        }
    }
}

fn register(sh: &Shared, root: &Root) -> Result<String, CallError> {
    let cfg = &sh.cfg;
    let mut body = sh.lock().report(now_ms());
    if let Some(o) = body.as_object_mut() {
        o.remove("jobs");
        o.insert("cluster_name".into(), cfg.cluster_name.clone().into());
        o.insert(
            "cluster_location".into(),
            cfg.cluster_location.clone().into(),
        );
        o.insert("manager_port".into(), cfg.api_addr.port().into());
        o.insert("network_component_port".into(), cfg.api_addr.port().into());
        if let Some(a) = &cfg.advertise_addr {
            o.insert("cluster_address".into(), a.clone().into());
        }
        o.insert("cluster_info".into(), json!({}));
    }
    let answer = root.call("POST", "/api/clusters/register", Some(&body))?;
    answer
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| super::state::valid_id(id))
        .map(str::to_string)
        .ok_or_else(|| CallError::Transport(format!("root answered {answer} without a usable id")))
}

/// Answers a NetManager request from the root's tables (overlay-network.md §4.1). Without a
/// root the overlay cannot work: the request is logged and, where the NetManager waits for an
/// answer, answered empty so it fails fast instead of timing out.
fn net(sh: &Shared, root: Option<&Root>, req: NetRequest) {
    let Some(root) = root else {
        log::warn!("NetManager request {req:?} cannot be served: no root connection (the overlay needs OAK_ROOT_URL)");
        return;
    };
    match req {
        NetRequest::Subnet { node_id } => match root.call("GET", "/api/net/subnet", None) {
            Ok(v) => {
                let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                let body = SubnetResult {
                    address: text("subnet_addr"),
                    addressv6: text("subnet_addr_v6"),
                };
                sh.sink.publish(net_topic::subnet_result(&node_id), &body);
            }
            Err(e) => log::warn!("subnet for worker {node_id}: root answered {e}"),
        },
        NetRequest::TableQuery {
            node_id,
            sname,
            sip,
        } => {
            let (path, key) = if !sname.is_empty() {
                (
                    format!("/api/net/service/{}/instances", sname.replace('.', "_")),
                    sname,
                )
            } else {
                (
                    format!(
                        "/api/net/service/ip/{}/instances",
                        sip.replace(['.', ':'], "_")
                    ),
                    sip,
                )
            };
            let result = match root.call("GET", &path, None) {
                Ok(doc) => table_result(&doc, &key),
                Err(e) => {
                    log::info!("table query {key:?} from worker {node_id}: root answered {e}");
                    // upstream's "could not resolve" answer: the NetManager stops waiting
                    control::TableQueryResult {
                        app_name: Some(String::new()),
                        query_key: Some(key),
                        instance_list: Vec::new(),
                    }
                }
            };
            sh.sink
                .publish(net_topic::table_query_result(&node_id), &result);
        }
        NetRequest::ServiceDeployed { node_id, report } => deployed(sh, root, &node_id, report),
        NetRequest::InterestRemove { .. } => {}
    }
}

/// The root's table document → the NetManager's `tablequery/result` (netstack's type, so the
/// shape is the one the overlay decodes: `host_port` a number, `instance_ip` entries).
fn table_result(doc: &Value, key: &str) -> control::TableQueryResult {
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let rr: Vec<control::TqServiceIp> = doc
        .get("service_ip_list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|s| control::TqServiceIp {
            ip_type: text(s, "IpType").unwrap_or_default(),
            address: text(s, "Address").unwrap_or_default(),
            address_v6: text(s, "Address_v6"),
        })
        .collect();
    let instance_list = doc
        .get("instance_list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|i| {
            let mut service_ip = rr.clone();
            service_ip.push(control::TqServiceIp {
                ip_type: "instance_ip".into(),
                address: text(i, "instance_ip").unwrap_or_default(),
                address_v6: text(i, "instance_ip_v6"),
            });
            let port = match i.get("host_port") {
                Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
                Some(Value::String(s)) => s.parse().unwrap_or(0),
                _ => 0,
            };
            control::TqInstance {
                instance_number: i.get("instance_number").cloned().unwrap_or_default(),
                namespace_ip: text(i, "namespace_ip"),
                namespace_ip_v6: text(i, "namespace_ip_v6"),
                host_ip: text(i, "host_ip"),
                host_port: port.into(),
                service_ip,
            }
        })
        .collect();
    control::TableQueryResult {
        app_name: Some(text(doc, "job_name").unwrap_or_default()),
        query_key: Some(key.to_string()),
        instance_list,
    }
}

fn deployed(sh: &Shared, root: &Root, node_id: &str, r: ServiceDeployed) {
    let Some(job_id) = sh.lock().job_id_by_name(&r.appname) else {
        log::info!(
            "worker {node_id} reports network for unknown job {}",
            r.appname
        );
        return;
    };
    let body = json!({"job_id": job_id, "instances": [{
        "instance_number": r.instance_number, "namespace_ip": r.nsip, "namespace_ip_v6": r.nsipv6,
        "host_ip": r.host_ip, "host_port": r.host_port.parse::<u64>().unwrap_or(0)}]});
    match root.call("POST", "/api/net/service/net_deploy_status", Some(&body)) {
        // Upstream's root then tells every interested cluster, whose service manager publishes
        // this (spec overlay §4.2, §4.4); our root does not call clusters back, so the cluster
        // that learnt it tells its own workers, which re-query (a new instance, or a moved one).
        Ok(_) => sh.sink.publish(
            net_topic::updates_available(&r.appname),
            &control::UpdatesAvailable {
                kind: "DEPLOYMENT".into(),
            },
        ),
        Err(e) => log::warn!(
            "network status of {}.{} to the root: {e}",
            r.appname,
            r.instance_number
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_document_becomes_netmanager_result() {
        let doc = json!({"_id":"j","job_name":"a.b.c.d",
            "service_ip_list":[{"IpType":"RR","Address":"10.30.1.30","Address_v6":"fdff:2000::1"}],
            "instance_list":[{"instance_number":0,"instance_ip":"10.30.0.3","instance_ip_v6":"fdff::3",
              "namespace_ip":"10.18.0.66","namespace_ip_v6":"fc00::102","host_ip":"198.51.100.20","host_port":"50103"}]});
        let typed = table_result(&doc, "10.30.1.30");
        // what the worker's overlay makes of it
        let u = typed
            .validate(std::net::Ipv4Addr::new(10, 30, 0, 0), 16)
            .unwrap();
        assert_eq!((u.instances.len(), u.skipped), (1, 0));
        assert_eq!(u.instances[0].node, "198.51.100.20:50103".parse().unwrap());
        let r = serde_json::to_value(&typed).unwrap();
        assert_eq!(r["app_name"], "a.b.c.d");
        assert_eq!(
            r["instance_list"][0]["host_port"], 50103,
            "a JSON number for the NetManager"
        );
        assert_eq!(
            r["instance_list"][0]["service_ip"][1]["IpType"],
            "instance_ip"
        );
        assert_eq!(
            r["instance_list"][0]["service_ip"][0]["Address"],
            "10.30.1.30"
        );
    }
}
