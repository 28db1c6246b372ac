//! The root's documents (users, applications, jobs with their instances, clusters) in the JSON
//! shapes upstream clients read (spec §2.3–§2.6): `_id: {"$oid"}`, `applicationID`,
//! `microserviceID`, `job_name`, `instance_list`. Stored as served, so the snapshot file is
//! readable next to the API docs. Behaviour lives in api/clusters; here only shapes and lookups.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use worker::protocol::Status;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Oid {
    #[serde(rename = "$oid")]
    pub oid: String,
}

impl Oid {
    pub fn new(s: &str) -> Oid {
        Oid { oid: s.into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    #[serde(rename = "_id")]
    pub id: Oid,
    pub name: String,
    #[serde(default)]
    pub email: String,
    /// `pbkdf2-sha256$rounds$salt$hash`; never served (upstream returns it, spec §2.2).
    pub password: String,
    #[serde(default)]
    pub created_at: String,
    pub roles: Vec<String>,
}

impl User {
    pub fn public_doc(&self) -> Value {
        json!({"_id": self.id, "name": self.name, "email": self.email,
               "created_at": self.created_at, "roles": self.roles})
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct App {
    #[serde(rename = "_id")]
    pub id: Oid,
    #[serde(rename = "applicationID")]
    pub application_id: String,
    pub application_name: String,
    pub application_namespace: String,
    #[serde(default)]
    pub application_desc: String,
    /// The owner's username, as upstream keys ownership (spec §2.2).
    #[serde(rename = "userId")]
    pub user_id: String,
    pub microservices: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceIp {
    #[serde(rename = "IpType")]
    pub ip_type: String,
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Address_v6")]
    pub address_v6: String,
}

/// A point of `cpu_history` / `memory_history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub value: f64,
    pub timestamp: f64,
}

pub const HISTORY_MAX: usize = 100;

pub fn push_history(h: &mut Vec<Point>, p: Point) {
    h.push(p);
    if h.len() > HISTORY_MAX {
        h.drain(..h.len() - HISTORY_MAX);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub instance_number: u64,
    pub cluster_id: String,
    #[serde(default)]
    pub cluster_location: String,
    pub status: Status,
    #[serde(default)]
    pub status_detail: String,
    #[serde(default)]
    pub instance_ip: String,
    #[serde(default)]
    pub instance_ip_v6: String,
    #[serde(default)]
    pub worker_id: String,
    #[serde(default)]
    pub host_ip: String,
    #[serde(default)]
    pub host_port: String,
    #[serde(default)]
    pub publicip: String,
    #[serde(default)]
    pub namespace_ip: String,
    #[serde(default)]
    pub namespace_ip_v6: String,
    /// The overlay tunnel endpoint of the instance's worker (`host_ip`/`host_port` of the
    /// NetManager's `net_deploy_status`). Upstream keeps it in the service manager's own
    /// database; here it shares the instance record, so it needs its own fields: the
    /// cluster's status reports set `host_port` to the worker's API port (spec orchestrators
    /// §4.3), which is not the tunnel port.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tunnel_ip: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tunnel_port: String,
    #[serde(default)]
    pub last_modified_timestamp: f64,
    /// Reported metrics as the cluster sent them (`cpu_percent`, `memory_percent`, `disk`,
    /// `logs`, `cpu_history`, `memory_history`), already filtered and bounded.
    #[serde(flatten)]
    pub metrics: Map<String, Value>,
}

impl Instance {
    pub fn new(n: u64, cluster_id: &str, location: &str, now: f64) -> Instance {
        Instance {
            instance_number: n,
            cluster_id: cluster_id.into(),
            cluster_location: location.into(),
            status: Status::ClusterScheduled,
            status_detail: String::new(),
            instance_ip: String::new(),
            instance_ip_v6: String::new(),
            worker_id: String::new(),
            host_ip: String::new(),
            host_port: String::new(),
            publicip: String::new(),
            namespace_ip: String::new(),
            namespace_ip_v6: String::new(),
            tunnel_ip: String::new(),
            tunnel_port: String::new(),
            last_modified_timestamp: now,
            metrics: Map::new(),
        }
    }

    /// Placed on a cluster but not yet running there, so its memory is not yet visible in the
    /// cluster's reported free memory (the scheduler reserves it).
    /// Listed in the network tables: RUNNING, or on its way there. A FAILED or DEAD one listed
    /// keeps receiving the clients' flows until its replacement is up (issue #8.3). The ones on
    /// their way must stay: a worker deploying an instance learns the instance's own service
    /// address from the table (spec overlay §3.2), before the instance is RUNNING.
    pub fn is_routable(&self) -> bool {
        self.status == Status::Running || self.is_pending()
    }

    pub fn is_pending(&self) -> bool {
        matches!(
            self.status,
            Status::Requested
                | Status::ClusterScheduled
                | Status::NodeScheduled
                | Status::Creating
                | Status::Created
        )
    }
}

/// Keys of the job document computed by the root; the SLA microservice may not override them.
pub const JOB_OWN_KEYS: [&str; 17] = [
    "_id",
    "microserviceID",
    "applicationID",
    "job_name",
    "app_name",
    "app_ns",
    "service_name",
    "service_ns",
    "image",
    "virtualization",
    "next_instance_progressive_number",
    "instance_list",
    "RR_ip",
    "RR_ip_v6",
    "service_ip_list",
    "status",
    "status_detail",
];

/// A service ("job"): the SLA microservice as given plus derived fields (spec §2.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    #[serde(rename = "_id")]
    pub id: Oid,
    #[serde(rename = "microserviceID")]
    pub microservice_id: String,
    #[serde(rename = "applicationID")]
    pub application_id: String,
    pub job_name: String,
    pub app_name: String,
    pub app_ns: String,
    pub service_name: String,
    pub service_ns: String,
    pub image: String,
    pub virtualization: String,
    pub next_instance_progressive_number: u64,
    pub instance_list: Vec<Instance>,
    #[serde(rename = "RR_ip")]
    pub rr_ip: String,
    #[serde(rename = "RR_ip_v6")]
    pub rr_ip_v6: String,
    pub service_ip_list: Vec<ServiceIp>,
    /// Absent on a fresh service, as upstream (clients test for the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_detail: Option<String>,
    #[serde(flatten)]
    pub sla: Map<String, Value>,
}

impl Job {
    pub fn id(&self) -> &str {
        &self.id.oid
    }

    pub fn instance(&self, n: u64) -> Option<&Instance> {
        self.instance_list.iter().find(|i| i.instance_number == n)
    }

    pub fn instance_mut(&mut self, n: u64) -> Option<&mut Instance> {
        self.instance_list
            .iter_mut()
            .find(|i| i.instance_number == n)
    }

    pub fn sla_u64(&self, key: &str) -> u64 {
        self.sla.get(key).and_then(Value::as_u64).unwrap_or(0)
    }

    /// `{"type":"direct","cluster":…}` of the SLA, if any.
    pub fn direct_cluster(&self) -> Option<String> {
        self.sla
            .get("constraints")?
            .as_array()?
            .iter()
            .filter(|c| c["type"] == "direct")
            .find_map(|c| {
                c["cluster"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(String::from)
            })
    }

    pub fn csi_drivers(&self) -> Vec<String> {
        self.sla
            .get("volumes")
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(|x| x["csi_driver"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The body of the deploy call to a cluster (CLUSTER_CONTRACT §2.1): `_id` as a plain
    /// string, `instance_list` reduced to the one instance.
    pub fn deploy_doc(&self, n: u64) -> Option<Value> {
        let inst = self.instance(n)?;
        let mut doc = serde_json::to_value(self).ok()?;
        doc["_id"] = json!(self.id());
        doc["instance_list"] = json!([inst]);
        Some(doc)
    }

    /// The network-table document served to cluster service managers (CLUSTER_CONTRACT §1.4).
    pub fn table_doc(&self) -> Value {
        let instances: Vec<Value> = self
            .instance_list
            .iter()
            .filter(|i| i.is_routable())
            .map(|i| {
                json!({"instance_number": i.instance_number, "instance_ip": i.instance_ip,
                       "instance_ip_v6": i.instance_ip_v6, "cluster_id": i.cluster_id,
                       "namespace_ip": i.namespace_ip, "namespace_ip_v6": i.namespace_ip_v6,
                       "host_ip": i.tunnel_ip,
                       // A number here: the NetManager's decoder requires it (spec overlay §4.1).
                       "host_port": i.tunnel_port.parse::<u64>().unwrap_or(0)})
            })
            .collect();
        json!({"_id": self.id(), "job_name": self.job_name, "app_name": self.app_name,
               "app_ns": self.app_ns, "service_name": self.service_name,
               "service_ns": self.service_ns, "service_ip_list": self.service_ip_list,
               "instance_list": instances})
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Cluster {
    #[serde(rename = "_id")]
    pub id: String,
    pub candidate_name: String,
    pub candidate_location: String,
    /// Where the root calls the cluster: its advertised address, else the registering peer.
    pub ip: String,
    /// The cluster API port, a string as upstream serves it.
    pub port: String,
    pub network_component_port: u16,
    pub cluster_info: Value,
    pub active_nodes: u64,
    pub vcpus: u64,
    /// Available MB summed over active workers.
    pub memory: u64,
    pub cpu_percent: f64,
    pub memory_percent: f64,
    pub vgpus: u64,
    pub vram: u64,
    pub vram_percent: f64,
    pub gpu_percent: f64,
    pub gpu_temp: f64,
    pub virtualization: Vec<String>,
    pub supported_addons: Vec<String>,
    pub csi_drivers: Vec<String>,
    pub gpu_drivers: Vec<String>,
    pub aggregation_per_architecture: Value,
    pub cpu_history: Vec<Point>,
    pub memory_history: Vec<Point>,
    /// Last registration, report or status push (seconds since the epoch).
    pub last_modified_timestamp: f64,
    pub registered_at: f64,
}

impl Cluster {
    pub fn is_active(&self, now: f64, timeout_secs: f64) -> bool {
        now - self.last_modified_timestamp < timeout_secs
    }

    pub fn base_url(&self) -> String {
        if self.ip.contains(':') && !self.ip.starts_with('[') {
            format!("http://[{}]:{}", self.ip, self.port)
        } else {
            format!("http://{}:{}", self.ip, self.port)
        }
    }

    /// The served document: stored fields, `active`, and upstream's compatibility aliases
    /// (spec §2.6).
    pub fn doc(&self, now: f64, timeout_secs: f64) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        let extra = json!({
            "active": self.is_active(now, timeout_secs),
            "cluster_name": self.candidate_name,
            "cluster_location": self.candidate_location,
            "aggregated_cpu_percent": self.cpu_percent,
            "memory_in_mb": self.memory,
            "total_cpu_cores": self.vcpus,
            "total_gpu_cores": self.vgpus,
        });
        if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_serializes_with_upstream_names_and_no_status_when_fresh() {
        let mut sla = Map::new();
        sla.insert("port".into(), json!("6080:80/tcp"));
        let job = Job {
            id: Oid::new("aa"),
            microservice_id: "aa".into(),
            application_id: "bb".into(),
            job_name: "a.b.c.d".into(),
            app_name: "a".into(),
            app_ns: "b".into(),
            service_name: "c".into(),
            service_ns: "d".into(),
            image: "img".into(),
            virtualization: "docker".into(),
            next_instance_progressive_number: 0,
            instance_list: vec![],
            rr_ip: "10.30.0.1".into(),
            rr_ip_v6: String::new(),
            service_ip_list: vec![],
            status: None,
            status_detail: None,
            sla,
        };
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(v["_id"]["$oid"], "aa");
        assert_eq!(v["RR_ip"], "10.30.0.1");
        assert_eq!(v["port"], "6080:80/tcp");
        assert!(v.get("status").is_none());
        let back: Job = serde_json::from_value(v).unwrap();
        assert_eq!(back, job);
        assert!(job.deploy_doc(0).is_none());
    }

    #[test]
    fn cluster_doc_has_aliases_and_history_is_bounded() {
        let mut c = Cluster {
            id: "c1".into(),
            candidate_name: "cluster1".into(),
            ip: "192.0.2.1".into(),
            port: "10100".into(),
            vcpus: 4,
            last_modified_timestamp: 100.0,
            ..Cluster::default()
        };
        for i in 0..150 {
            push_history(
                &mut c.cpu_history,
                Point {
                    value: i as f64,
                    timestamp: i as f64,
                },
            );
        }
        assert_eq!(c.cpu_history.len(), HISTORY_MAX);
        assert_eq!(c.cpu_history[0].value, 50.0);
        let d = c.doc(110.0, 30.0);
        assert_eq!(
            (d["cluster_name"].as_str(), d["active"].as_bool()),
            (Some("cluster1"), Some(true))
        );
        assert_eq!(d["total_cpu_cores"], 4);
        assert_eq!(c.doc(131.0, 30.0)["active"], false);
        assert_eq!(c.base_url(), "http://192.0.2.1:10100");
    }
}
