//! The worker ↔ cluster wire contract (spec worker-protocol.md §2–§6): registration bodies,
//! MQTT topics and payloads, status strings. Defined here once; `orch-lite` uses these types
//! for the other end. Decoding is lenient where upstream's cluster sends loose JSON (nulls,
//! numbers as strings) and strict where a wrong value would hurt (status strings, job names).

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Suffix of the worker's MQTT client id. The stock NetManager uses the bare node id, so the
/// worker must not, or the broker's client-id takeover would disconnect it.
pub const CLIENT_ID_SUFFIX: &str = "-ne";
pub const REGISTER_PATH: &str = "/api/node/register";

pub fn client_id(node_id: &str) -> String {
    format!("{node_id}{CLIENT_ID_SUFFIX}")
}

/// MQTT topics, all under `nodes/<id>/`.
pub mod topic {
    pub fn deploy(id: &str) -> String {
        format!("nodes/{id}/control/deploy")
    }
    pub fn delete(id: &str) -> String {
        format!("nodes/{id}/control/delete")
    }
    pub fn error(id: &str) -> String {
        format!("nodes/{id}/control/error")
    }
    pub fn information(id: &str) -> String {
        format!("nodes/{id}/information")
    }
    pub fn resources(id: &str) -> String {
        format!("nodes/{id}/jobs/resources")
    }
    pub fn job(id: &str) -> String {
        format!("nodes/{id}/job")
    }

    /// What a message on a `nodes/<id>/…` topic is about, for the cluster side's dispatch.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Information,
        Resources,
        Job,
        Deploy,
        Delete,
        Error,
        /// `nodes/<id>/net/…`: the overlay's control protocol (netstack owns those payloads).
        Net,
    }

    /// Splits `nodes/<id>/<suffix>` into the node id and the kind; `None` for anything else.
    pub fn parse(topic: &str) -> Option<(&str, Kind)> {
        let rest = topic.strip_prefix("nodes/")?;
        let (id, suffix) = rest.split_once('/')?;
        if id.is_empty() {
            return None;
        }
        let kind = match suffix {
            "information" => Kind::Information,
            "jobs/resources" => Kind::Resources,
            "job" => Kind::Job,
            "control/deploy" => Kind::Deploy,
            "control/delete" => Kind::Delete,
            "control/error" => Kind::Error,
            s if s.starts_with("net/") => Kind::Net,
            _ => return None,
        };
        Some((id, kind))
    }
}

/// Instance and job statuses as upstream spells them. The stock cluster manager's MQTT loop dies
/// on any other string (spec §13.4), so reports can only carry one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    #[serde(rename = "REQUESTED")]
    Requested,
    #[serde(rename = "CLUSTER_SCHEDULED")]
    ClusterScheduled,
    #[serde(rename = "NODE_SCHEDULED")]
    NodeScheduled,
    #[serde(rename = "NO_WORKER_CAPACITY")]
    NoWorkerCapacity,
    #[serde(rename = "NO_QUALIFIED_WORKER_FOUND")]
    NoQualifiedWorkerFound,
    #[serde(rename = "NO_NODE_FOUND")]
    NoNodeFound,
    #[serde(rename = "TargetClusterNotFound")]
    TargetClusterNotFound,
    #[serde(rename = "TargetClusterNotActive")]
    TargetClusterNotActive,
    #[serde(rename = "TargetClusterNoCapacity")]
    TargetClusterNoCapacity,
    #[serde(rename = "NoActiveClusterWithCapacity")]
    NoActiveClusterWithCapacity,
    #[serde(rename = "CREATING")]
    Creating,
    #[serde(rename = "CREATED")]
    Created,
    #[serde(rename = "RUNNING")]
    Running,
    #[serde(rename = "FAILED")]
    Failed,
    #[serde(rename = "DEAD")]
    Dead,
    #[serde(rename = "COMPLETED")]
    Completed,
    #[serde(rename = "UNDEPLOYED")]
    Undeployed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Requested => "REQUESTED",
            Status::ClusterScheduled => "CLUSTER_SCHEDULED",
            Status::NodeScheduled => "NODE_SCHEDULED",
            Status::NoWorkerCapacity => "NO_WORKER_CAPACITY",
            Status::NoQualifiedWorkerFound => "NO_QUALIFIED_WORKER_FOUND",
            Status::NoNodeFound => "NO_NODE_FOUND",
            Status::TargetClusterNotFound => "TargetClusterNotFound",
            Status::TargetClusterNotActive => "TargetClusterNotActive",
            Status::TargetClusterNoCapacity => "TargetClusterNoCapacity",
            Status::NoActiveClusterWithCapacity => "NoActiveClusterWithCapacity",
            Status::Creating => "CREATING",
            Status::Created => "CREATED",
            Status::Running => "RUNNING",
            Status::Failed => "FAILED",
            Status::Dead => "DEAD",
            Status::Completed => "COMPLETED",
            Status::Undeployed => "UNDEPLOYED",
        }
    }

    /// Statuses a worker may put on `nodes/<id>/job` (spec §6).
    pub fn reportable_by_worker(self) -> bool {
        matches!(
            self,
            Status::Created
                | Status::Failed
                | Status::Dead
                | Status::Completed
                | Status::Undeployed
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One CSI driver as advertised at registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CsiDriverInfo {
    pub csi_driver_name: String,
    pub csi_driver_endpoint: String,
}

/// Keys of upstream's node document (spec §4.1), in its order: what the stock cluster manager
/// reads from a registration and from every `information` report.
pub const UPSTREAM_NODE_KEYS: [&str; 26] = [
    "id",
    "host",
    "ip",
    "port",
    "system_info",
    "cpu_percent",
    "vcpus",
    "architecture",
    "memory_percent",
    "memory",
    "disk_info",
    "network_info",
    "gpu_driver",
    "gpu_usage",
    "vgpus",
    "gpu_temp",
    "vram_percent",
    "vram",
    "virtualization",
    "supported_addons",
    "csi_drivers",
    "Overlay",
    "OverlaySocket",
    "LogDirectory",
    "NetManagerPort",
    "ClusterAddress",
];
/// The node document: the registration body and (with only the dynamic fields filled) the
/// `information` report (spec §4). Every key is always present, in upstream's order; the four
/// capitalised keys are Go field names upstream never tagged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    #[serde(default, deserialize_with = "lenient_string")]
    pub id: String,
    #[serde(default, deserialize_with = "lenient_string")]
    pub host: String,
    #[serde(default, deserialize_with = "lenient_string")]
    pub ip: String,
    /// A string on the wire: the stock cluster answers HTTP 500 to a number here (spec §13.2).
    #[serde(default, deserialize_with = "lenient_string")]
    pub port: String,
    #[serde(default)]
    pub system_info: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub cpu_percent: f64,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub vcpus: u64,
    /// Go's GOARCH spelling: amd64, arm64, arm.
    #[serde(default, deserialize_with = "lenient_string")]
    pub architecture: String,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub memory_percent: f64,
    /// Available (not total) memory in MiB, as upstream reports it.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub memory: u64,
    #[serde(default)]
    pub disk_info: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub network_info: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub gpu_driver: String,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub gpu_usage: f64,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub vgpus: u64,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub gpu_temp: f64,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub vram_percent: f64,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub vram: f64,
    #[serde(default)]
    pub virtualization: Option<Vec<String>>,
    #[serde(default)]
    pub supported_addons: Option<Vec<String>>,
    #[serde(default)]
    pub csi_drivers: Option<Vec<CsiDriverInfo>>,
    #[serde(rename = "Overlay", default)]
    pub overlay: bool,
    #[serde(rename = "OverlaySocket", default, deserialize_with = "lenient_string")]
    pub overlay_socket: String,
    #[serde(rename = "LogDirectory", default, deserialize_with = "lenient_string")]
    pub log_directory: String,
    #[serde(rename = "NetManagerPort", default, deserialize_with = "lenient_u64")]
    pub net_manager_port: u64,
    #[serde(
        rename = "ClusterAddress",
        default,
        deserialize_with = "lenient_string"
    )]
    pub cluster_address: String,
    /// Join token (`OAK_JOIN_TOKEN`); upstream's cluster reads and ignores this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Stable machine fingerprint (e.g. `/etc/machine-id`), an orch-lite addition: the cluster
    /// uses it to tell a re-registration of the same machine from a second machine claiming
    /// the same `host` name. Stock workers omit it; the cluster then falls back to the source IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
}

impl Default for NodeInfo {
    fn default() -> Self {
        NodeInfo {
            id: String::new(),
            host: String::new(),
            ip: String::new(),
            port: String::new(),
            system_info: None,
            cpu_percent: 0.0,
            vcpus: 0,
            architecture: String::new(),
            memory_percent: 0.0,
            memory: 0,
            disk_info: None,
            network_info: None,
            // Upstream's value whenever no NVIDIA tooling is present.
            gpu_driver: "-".into(),
            gpu_usage: 0.0,
            vgpus: 0,
            gpu_temp: 0.0,
            vram_percent: 0.0,
            vram: 0.0,
            virtualization: None,
            supported_addons: None,
            csi_drivers: None,
            overlay: false,
            overlay_socket: String::new(),
            log_directory: String::new(),
            net_manager_port: 0,
            cluster_address: String::new(),
            token: None,
            machine_id: None,
        }
    }
}

/// The cluster's answer to registration. `MQTT_BROKER_PORT` is a string upstream; we also
/// accept a number so a slightly different cluster does not break the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterAnswer {
    #[serde(deserialize_with = "lenient_string")]
    pub id: String,
    #[serde(rename = "MQTT_BROKER_PORT", deserialize_with = "lenient_string")]
    pub mqtt_broker_port: String,
}

impl RegisterAnswer {
    /// Validates what the worker relies on: a usable node id (it goes into topics) and a port.
    pub fn validate(&self) -> Result<u16, String> {
        if !valid_node_id(&self.id) {
            return Err(format!(
                "cluster returned an unusable node id {:?}",
                self.id
            ));
        }
        match self.mqtt_broker_port.trim().parse::<u16>() {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(format!(
                "cluster returned MQTT_BROKER_PORT {:?}: not a port (is MQTT_BROKER_PORT set on the cluster?)",
                self.mqtt_broker_port
            )),
        }
    }
}

/// A node id must be safe inside an MQTT topic level: no wildcards, separators or control bytes.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `nodes/<id>/job`: one instance's status change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub sname: String,
    pub status: Status,
    #[serde(default, deserialize_with = "lenient_string")]
    pub status_detail: String,
    #[serde(deserialize_with = "lenient_u64")]
    pub instance: u64,
    #[serde(default, deserialize_with = "lenient_string")]
    pub publicip: String,
}

/// `nodes/<id>/jobs/resources`: the per-instance heartbeat. `services` is never null (the stock
/// cluster manager dies on that); metrics are strings as upstream sends them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ResourcesReport {
    pub services: Vec<InstanceResources>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceResources {
    #[serde(deserialize_with = "lenient_string")]
    pub cpu_percent: String,
    #[serde(deserialize_with = "lenient_string")]
    pub memory_percent: String,
    #[serde(deserialize_with = "lenient_string")]
    pub disk: String,
    #[serde(default, deserialize_with = "lenient_string")]
    pub logs: String,
    pub job_name: String,
    #[serde(default, deserialize_with = "lenient_string")]
    pub virtualization: String,
    #[serde(deserialize_with = "lenient_u64")]
    pub instance: u64,
}

/// `nodes/<id>/control/delete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteCommand {
    pub job_name: String,
    #[serde(default, deserialize_with = "lenient_string")]
    pub virtualization: String,
    #[serde(deserialize_with = "lenient_u64")]
    pub instance_number: u64,
}

/// `nodes/<id>/control/error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlError {
    #[serde(default, deserialize_with = "lenient_string")]
    pub message: String,
}

/// The fields of a deploy message (`nodes/<id>/control/deploy`) the worker uses. The message is
/// the cluster's whole job document; everything else is ignored, and null is accepted anywhere
/// (spec §13.3), unlike Go's decoder which drops a message over one mistyped field.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DeployCommand {
    #[serde(deserialize_with = "lenient_string")]
    pub job_name: String,
    #[serde(deserialize_with = "lenient_u64")]
    pub instance_number: u64,
    #[serde(deserialize_with = "lenient_string")]
    pub image: String,
    #[serde(deserialize_with = "lenient_strings")]
    pub cmd: Vec<String>,
    #[serde(deserialize_with = "lenient_strings")]
    pub environment: Vec<String>,
    #[serde(deserialize_with = "lenient_string")]
    pub port: String,
    #[serde(deserialize_with = "lenient_string")]
    pub virtualization: String,
    #[serde(deserialize_with = "lenient_string")]
    pub platform: String,
    #[serde(deserialize_with = "lenient_string")]
    pub status_detail: String,
    #[serde(deserialize_with = "lenient_f64")]
    pub vcpus: f64,
    /// MiB.
    #[serde(deserialize_with = "lenient_u64")]
    pub memory: u64,
    #[serde(deserialize_with = "lenient_u64")]
    pub vgpus: u64,
    #[serde(deserialize_with = "lenient_bool")]
    pub one_shot: bool,
    #[serde(deserialize_with = "lenient_bool")]
    pub privileged: bool,
}

/// Why a deploy message cannot be acted on; reported as FAILED with this text when the job name
/// and instance are known, otherwise only logged and counted.
#[derive(Debug, Clone, PartialEq)]
pub enum DeployError {
    Json(String),
    JobName(String),
    Image,
    Virtualization(String),
}

impl fmt::Display for DeployError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeployError::Json(e) => write!(f, "deploy message is not a valid job document: {e}"),
            DeployError::JobName(n) => write!(
                f,
                "job_name {n:?} is not <app>.<appns>.<service>.<servicens> (4 non-empty parts of letters, digits, '-' or '_')"
            ),
            DeployError::Image => f.write_str("deploy message has no image"),
            DeployError::Virtualization(v) => {
                write!(f, "virtualization {v:?} is not supported by this worker (supported: docker, container)")
            }
        }
    }
}

impl std::error::Error for DeployError {}

impl DeployCommand {
    /// Decodes a deploy payload; call [`DeployCommand::validate`] next. Kept apart so that a
    /// decodable but invalid command can still be answered with FAILED for its instance.
    pub fn decode(payload: &[u8]) -> Result<DeployCommand, DeployError> {
        decode(payload).map_err(DeployError::Json)
    }

    pub fn validate(&self) -> Result<(), DeployError> {
        if !valid_job_name(&self.job_name) {
            return Err(DeployError::JobName(self.job_name.clone()));
        }
        if self.image.trim().is_empty() {
            return Err(DeployError::Image);
        }
        // Upstream's root maps the SLA's "container" to "docker"; accept both, and an absent one.
        match self.virtualization.as_str() {
            "docker" | "container" | "" => Ok(()),
            other => Err(DeployError::Virtualization(other.into())),
        }
    }

    /// containerd container id, as upstream names it.
    pub fn container_id(&self) -> String {
        container_id(&self.job_name, self.instance_number)
    }
}

/// `<app>.<appns>.<svc>.<svcns>`: the NetManager requires exactly four parts, and the name ends
/// up in containerd ids, file names and topics, so only a safe alphabet is accepted.
pub fn valid_job_name(name: &str) -> bool {
    name.len() <= 200
        && name.split('.').count() == 4
        && name.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Decodes any message of this contract. Every payload is a JSON object: serde would otherwise
/// also fill a struct from a JSON array, positionally, which no peer means.
pub fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("expected a JSON object".into());
    }
    serde_json::from_slice(payload).map_err(|e| e.to_string())
}

pub fn container_id(job_name: &str, instance: u64) -> String {
    format!("{job_name}.instance.{instance}")
}

/// Inverse of [`container_id`], using the last `.instance.` as upstream does.
pub fn parse_container_id(id: &str) -> Option<(&str, u64)> {
    let (job, n) = id.rsplit_once(".instance.")?;
    let n = n.parse().ok()?;
    valid_job_name(job).then_some((job, n))
}

// --- lenient decoding: the stock cluster sends nulls and numbers-as-strings (spec §13) ---

fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        other => return Err(de::Error::custom(format!("expected a string, got {other}"))),
    })
}

fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(0.0),
        serde_json::Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| de::Error::custom("number out of range")),
        serde_json::Value::String(s) if s.trim().is_empty() => Ok(0.0),
        serde_json::Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| de::Error::custom(format!("expected a number, got {s:?}"))),
        other => Err(de::Error::custom(format!("expected a number, got {other}"))),
    }
    .and_then(|v: f64| {
        if v.is_finite() {
            Ok(v)
        } else {
            Err(de::Error::custom("number is not finite"))
        }
    })
}

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = lenient_f64(d)?;
    if v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f64 {
        return Err(de::Error::custom(format!(
            "expected a non-negative whole number, got {v}"
        )));
    }
    Ok(v as u64)
}

fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(false),
        serde_json::Value::Bool(b) => Ok(b),
        serde_json::Value::String(s) if s == "true" || s == "false" => Ok(s == "true"),
        other => Err(de::Error::custom(format!(
            "expected true or false, got {other}"
        ))),
    }
}

fn lenient_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s),
                other => Err(de::Error::custom(format!(
                    "expected a list of strings, found {other}"
                ))),
            })
            .collect(),
        other => Err(de::Error::custom(format!(
            "expected a list of strings, got {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deploy message of spec §11 step 5, plus the loose fields seen from a real cluster
    /// (§13.3): nulls, a full instance_list, `RR_ip_v6: null`.
    const DEPLOY: &str = r#"{"_id":"6650aaaaaaaaaaaaaaaaaaaa","job_name":"clientserver.test.nginx.test",
     "microserviceID":"6650aaaaaaaaaaaaaaaaaaaa","microservice_name":"nginx","app_name":"clientserver",
     "virtualization":"docker","cmd":[],"memory":100,"vcpus":1,"vgpus":0,"vtpus":0,"storage":0,
     "code":"docker.io/library/nginx:latest","image":"docker.io/library/nginx:latest",
     "port":"6080:60/tcp","addresses":{"rr_ip":"10.30.30.30"},"RR_ip":"10.30.30.30","RR_ip_v6":null,
     "added_files":[],"environment":null,"status":"NODE_SCHEDULED","status_detail":"Waiting for scheduling decision",
     "instance_list":[{"instance_number":0,"status":"NODE_SCHEDULED","cpu_percent":null,"host_port":50011,
       "cpu_history":[{"value":1.0,"timestamp":"2026-11-22T00:00:00"}]}],
     "instance_number":0}"#;

    #[test]
    fn stock_deploy_message_decodes() {
        let d = DeployCommand::decode(DEPLOY.as_bytes()).unwrap();
        d.validate().unwrap();
        assert_eq!(d.job_name, "clientserver.test.nginx.test");
        assert_eq!(d.instance_number, 0);
        assert_eq!(d.image, "docker.io/library/nginx:latest");
        assert_eq!(d.port, "6080:60/tcp");
        assert_eq!((d.memory, d.vcpus), (100, 1.0));
        assert!(d.cmd.is_empty() && d.environment.is_empty());
        assert_eq!(d.container_id(), "clientserver.test.nginx.test.instance.0");
    }

    #[test]
    fn bad_deploy_messages_give_reasons() {
        let invalid = |json: &str| {
            DeployCommand::decode(json.as_bytes())
                .unwrap()
                .validate()
                .unwrap_err()
        };
        let cmd = DeployCommand::decode(br#"{"job_name":"a.b.c","image":"x","instance_number":2}"#)
            .unwrap();
        assert_eq!(
            cmd.instance_number, 2,
            "caller can still report FAILED for instance 2"
        );
        assert!(cmd
            .validate()
            .unwrap_err()
            .to_string()
            .contains("4 non-empty parts"));
        assert!(matches!(
            invalid(r#"{"job_name":"a.b.c.d","image":"x","virtualization":"unikernel"}"#),
            DeployError::Virtualization(_)
        ));
        assert_eq!(
            invalid(r#"{"job_name":"a.b.c.d","image":"  "}"#),
            DeployError::Image
        );
        assert!(matches!(
            invalid(r#"{"job_name":"a.b/../c.d.e","image":"x"}"#),
            DeployError::JobName(_)
        ));
        assert!(matches!(
            DeployCommand::decode(b"[1,2]"),
            Err(DeployError::Json(_))
        ));
        let err = DeployCommand::decode(br#"{"job_name":"a.b.c.d","image":"x","memory":-5}"#)
            .unwrap_err();
        assert!(err.to_string().contains("non-negative"), "{err}");
    }

    #[test]
    fn numbers_as_strings_are_accepted() {
        let d = DeployCommand::decode(
            br#"{"job_name":"a.b.c.d","image":"x","instance_number":"3","vcpus":"0.5","memory":"64"}"#,
        )
        .unwrap();
        assert_eq!((d.instance_number, d.vcpus, d.memory), (3, 0.5, 64));
    }

    #[test]
    fn job_status_uses_upstream_keys_and_strings() {
        let s = JobStatus {
            sname: "a.b.c.d".into(),
            status: Status::Failed,
            status_detail: "pull failed".into(),
            instance: 1,
            publicip: "192.168.1.20".into(),
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"sname":"a.b.c.d","status":"FAILED","status_detail":"pull failed","instance":1,"publicip":"192.168.1.20"}"#
        );
        assert!(serde_json::from_str::<JobStatus>(
            r#"{"sname":"a","status":"BROKEN","instance":0}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<JobStatus>(r#"{"sname":"a","status":null,"instance":0}"#)
                .is_err()
        );
    }

    #[test]
    fn every_status_round_trips() {
        use Status::*;
        for s in [
            Requested,
            ClusterScheduled,
            NodeScheduled,
            NoWorkerCapacity,
            NoQualifiedWorkerFound,
            NoNodeFound,
            TargetClusterNotFound,
            TargetClusterNotActive,
            TargetClusterNoCapacity,
            NoActiveClusterWithCapacity,
            Creating,
            Created,
            Running,
            Failed,
            Dead,
            Completed,
            Undeployed,
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
        }
    }

    #[test]
    fn empty_resources_report_is_an_empty_list() {
        assert_eq!(
            serde_json::to_string(&ResourcesReport::default()).unwrap(),
            r#"{"services":[]}"#
        );
        assert!(serde_json::from_str::<ResourcesReport>(r#"{"services":null}"#).is_err());
    }

    #[test]
    fn node_info_has_every_upstream_key() {
        let v = serde_json::to_value(NodeInfo::default()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in UPSTREAM_NODE_KEYS {
            assert!(keys.contains(&k), "missing {k}");
        }
        assert!(!keys.contains(&"token"), "token only when set");
        assert!(!keys.contains(&"machine_id"), "machine_id only when set");
        assert!(v["port"].is_string());
        // The Go worker's information report (spec §3.4) decodes on our side.
        let go = r#"{"id":"","host":"","ip":"192.168.1.20","port":"","system_info":null,"cpu_percent":2.9,
          "vcpus":8,"architecture":"","memory_percent":21.6,"memory":11990,"disk_info":null,
          "network_info":null,"gpu_driver":"-","gpu_usage":0,"vgpus":0,"gpu_temp":0,
          "vram_percent":0,"vram":0,"virtualization":null,"supported_addons":null,
          "csi_drivers":null,"Overlay":false,"OverlaySocket":"","LogDirectory":"",
          "NetManagerPort":0,"ClusterAddress":""}"#;
        let n: NodeInfo = serde_json::from_str(go).unwrap();
        assert_eq!(
            (n.vcpus, n.memory, n.ip.as_str()),
            (8, 11990, "192.168.1.20")
        );
    }

    #[test]
    fn register_answer_validation() {
        let a: RegisterAnswer =
            serde_json::from_str(r#"{"id":"6650f0c2e4b0a1b2c3d4e5f6","MQTT_BROKER_PORT":"10003"}"#)
                .unwrap();
        assert_eq!(a.validate(), Ok(10003));
        let a: RegisterAnswer =
            serde_json::from_str(r#"{"id":"abc","MQTT_BROKER_PORT":10003}"#).unwrap();
        assert_eq!(a.validate(), Ok(10003));
        let a: RegisterAnswer =
            serde_json::from_str(r#"{"id":"abc","MQTT_BROKER_PORT":null}"#).unwrap();
        assert!(a.validate().unwrap_err().contains("MQTT_BROKER_PORT"));
        let a: RegisterAnswer =
            serde_json::from_str(r##"{"id":"a/#","MQTT_BROKER_PORT":"1"}"##).unwrap();
        assert!(a.validate().unwrap_err().contains("node id"));
    }

    #[test]
    fn topics_and_container_ids() {
        assert_eq!(topic::deploy("n1"), "nodes/n1/control/deploy");
        assert_eq!(
            topic::parse("nodes/n1/jobs/resources"),
            Some(("n1", topic::Kind::Resources))
        );
        assert_eq!(
            topic::parse("nodes/n1/net/tablequery/request"),
            Some(("n1", topic::Kind::Net))
        );
        assert_eq!(topic::parse("nodes//job"), None);
        assert_eq!(topic::parse("jobs/x/updates_available"), None);
        assert_eq!(client_id("n1"), "n1-ne");
        assert_eq!(
            parse_container_id("a.b.c.d.instance.12"),
            Some(("a.b.c.d", 12))
        );
        assert_eq!(parse_container_id("a.b.c.d.instance.x"), None);
        assert_eq!(parse_container_id("other"), None);
    }
}
