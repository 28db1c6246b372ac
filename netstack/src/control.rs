//! The overlay's MQTT wire contract with the cluster service manager (spec overlay-network
//! §4.1): topics, payloads exactly as the stock NetManager and CSM exchange them, and their
//! validation into typed records. It owns no connection and keeps no state; `orch-lite`'s
//! service manager imports these same types for the other side.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

/// Most service IPs one instance carries (upstream sends the job's RR entry plus the
/// instance's own InstanceIP; room is left for "Closest" and future policies).
pub const MAX_SERVICE_IPS: usize = 4;
/// A job name is four parts of at most 30 characters joined by dots (spec §2.4).
pub const JOB_NAME_MAX: usize = 4 * 30 + 3;

/// Topics, all under `nodes/<worker id>/net/` except the per-job update channel.
pub mod topic {
    pub fn subnet_request(node: &str) -> String {
        format!("nodes/{node}/net/subnet")
    }
    pub fn subnet_result(node: &str) -> String {
        format!("nodes/{node}/net/subnetwork/result")
    }
    pub fn table_query_request(node: &str) -> String {
        format!("nodes/{node}/net/tablequery/request")
    }
    pub fn table_query_result(node: &str) -> String {
        format!("nodes/{node}/net/tablequery/result")
    }
    pub fn service_deployed(node: &str) -> String {
        format!("nodes/{node}/net/service/deployed")
    }
    pub fn service_undeployed(node: &str) -> String {
        format!("nodes/{node}/net/service/undeployed")
    }
    pub fn address_changed(node: &str) -> String {
        format!("nodes/{node}/net/service/address-changed")
    }
    pub fn interest_remove(node: &str) -> String {
        format!("nodes/{node}/net/interest/remove")
    }
    pub fn updates_available(job: &str) -> String {
        format!("jobs/{job}/updates_available")
    }
    /// What the CSM subscribes to (`nodes/+/net/#`).
    pub const CSM_FILTER: &str = "nodes/+/net/#";

    /// A topic the CSM receives, split into worker id and message kind.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum NodeNet<'a> {
        SubnetRequest(&'a str),
        TableQueryRequest(&'a str),
        ServiceDeployed(&'a str),
        ServiceUndeployed(&'a str),
        AddressChanged(&'a str),
        InterestRemove(&'a str),
    }

    pub fn parse_node_net(topic: &str) -> Option<NodeNet<'_>> {
        let rest = topic.strip_prefix("nodes/")?;
        let (node, suffix) = rest.split_once("/net/")?;
        if node.is_empty() || node.contains('/') {
            return None;
        }
        Some(match suffix {
            "subnet" => NodeNet::SubnetRequest(node),
            "tablequery/request" => NodeNet::TableQueryRequest(node),
            "service/deployed" => NodeNet::ServiceDeployed(node),
            "service/undeployed" => NodeNet::ServiceUndeployed(node),
            "service/address-changed" => NodeNet::AddressChanged(node),
            "interest/remove" => NodeNet::InterestRemove(node),
            _ => return None,
        })
    }

    /// The job of a `jobs/<job>/updates_available` topic.
    pub fn parse_updates_available(topic: &str) -> Option<&str> {
        topic
            .strip_prefix("jobs/")?
            .strip_suffix("/updates_available")
            .filter(|j| !j.is_empty() && !j.contains('/'))
    }
}

/// Why a control message was refused; each names the field and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    Json(String),
    BadJobName(String),
    BadAddress { field: &'static str, value: String },
    BadSubnet(String),
    BadPort(String),
    NoServiceIp,
    TooManyServiceIps,
    EmptyResult,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::Json(e) => write!(f, "payload is not the expected JSON: {e}"),
            ControlError::BadJobName(n) => write!(
                f,
                "job name {n:?} is not app.appns.service.servicens with parts of 1-30 letters/digits"
            ),
            ControlError::BadAddress { field, value } => {
                write!(f, "field {field} = {value:?} is not a usable IP address")
            }
            ControlError::BadSubnet(s) => {
                write!(f, "subnet {s:?} is not a /26-aligned IPv4 network address")
            }
            ControlError::BadPort(p) => write!(f, "host_port {p} is not a port in 1..65535"),
            ControlError::NoServiceIp => write!(f, "instance has no service_ip in the service subnet"),
            ControlError::TooManyServiceIps => {
                write!(f, "instance has more than {MAX_SERVICE_IPS} service IPs")
            }
            ControlError::EmptyResult => write!(
                f,
                "table query result has no usable instance (the CSM could not resolve the key)"
            ),
        }
    }
}

impl std::error::Error for ControlError {}

fn json<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(payload).map_err(|e| ControlError::Json(e.to_string()))
}

/// A validated job name, stored inline so tables keep it without allocating.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobName(heapless::String<JOB_NAME_MAX>);

impl JobName {
    pub fn parse(s: &str) -> Result<JobName, ControlError> {
        let bad = || ControlError::BadJobName(s.to_string());
        let mut parts = 0;
        for p in s.split('.') {
            parts += 1;
            if p.is_empty() || p.len() > 30 || !p.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(bad());
            }
        }
        if parts != 4 {
            return Err(bad());
        }
        let mut out = heapless::String::new();
        out.push_str(s).map_err(|_| bad())?;
        Ok(JobName(out))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `nodes/<id>/net/subnet`: `{"METHOD":"GET"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetRequest {
    #[serde(rename = "METHOD")]
    pub method: String,
}

impl SubnetRequest {
    pub fn get() -> Self {
        SubnetRequest {
            method: "GET".into(),
        }
    }
}

/// `nodes/<id>/net/subnetwork/result`: `{"address":"10.18.0.64","addressv6":"fc00::100"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetResult {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub address: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub addressv6: String,
}

/// The worker's subnet as the engine uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSubnet {
    /// Network address of the /26 (`S`); bridge is `S+1`, instances `S+2..=S+62`.
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

impl SubnetResult {
    pub fn decode(payload: &[u8]) -> Result<Self, ControlError> {
        json(payload)
    }
    /// Upstream accepts an answer with either field set; we need IPv4 (the data plane is
    /// IPv4-only so far) and insist it is a /26 network address, since everything else is
    /// derived from it (spec §2.1).
    pub fn validate(&self) -> Result<NodeSubnet, ControlError> {
        let v4: Ipv4Addr = self
            .address
            .trim()
            .parse()
            .map_err(|_| ControlError::BadSubnet(self.address.clone()))?;
        if u32::from(v4) & 63 != 0 {
            return Err(ControlError::BadSubnet(self.address.clone()));
        }
        let v6 = match self.addressv6.trim() {
            "" => None,
            s => Some(s.parse().map_err(|_| ControlError::BadAddress {
                field: "addressv6",
                value: s.to_string(),
            })?),
        };
        Ok(NodeSubnet { v4, v6 })
    }
}

/// `nodes/<id>/net/tablequery/request`: by job name or by service IP (the other one empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableQueryRequest {
    #[serde(default)]
    pub sname: String,
    #[serde(default)]
    pub sip: String,
}

impl TableQueryRequest {
    pub fn by_ip(ip: Ipv4Addr) -> Self {
        TableQueryRequest {
            sname: String::new(),
            sip: ip.to_string(),
        }
    }
    pub fn by_job(job: &str) -> Self {
        TableQueryRequest {
            sname: job.to_string(),
            sip: String::new(),
        }
    }
}

/// `nodes/<id>/net/tablequery/result` as the CSM sends it. Extra fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableQueryResult {
    #[serde(default)]
    pub app_name: Option<String>,
    #[serde(default)]
    pub query_key: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub instance_list: Vec<TqInstance>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TqInstance {
    #[serde(default)]
    pub instance_number: serde_json::Value,
    #[serde(default)]
    pub namespace_ip: Option<String>,
    #[serde(default)]
    pub namespace_ip_v6: Option<String>,
    #[serde(default)]
    pub host_ip: Option<String>,
    /// A JSON number from the CSM (a string in `service/deployed`); both are accepted.
    #[serde(default)]
    pub host_port: serde_json::Value,
    #[serde(default, deserialize_with = "null_as_default")]
    pub service_ip: Vec<TqServiceIp>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TqServiceIp {
    #[serde(rename = "IpType", default)]
    pub ip_type: String,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Address_v6", default)]
    pub address_v6: Option<String>,
}

/// How a destination is chosen among a service IP's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SipKind {
    /// Upstream's `InstanceNumber`; also every unknown type string, including the
    /// `"instance_ip"` the CSM actually sends (spec §2.3).
    Instance,
    /// Prefer a local instance, round robin otherwise.
    Closest,
    RoundRobin,
}

impl SipKind {
    pub fn from_wire(s: &str) -> SipKind {
        match s {
            "RR" => SipKind::RoundRobin,
            "Closest" => SipKind::Closest,
            _ => SipKind::Instance,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceIp {
    pub kind: SipKind,
    pub addr: Ipv4Addr,
    pub addr_v6: Option<Ipv6Addr>,
}

/// One table entry after validation (spec §3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub instance_number: u32,
    pub nsip: Ipv4Addr,
    pub nsip_v6: Option<Ipv6Addr>,
    /// Where the instance's worker receives tunnel datagrams (`host_ip:host_port`).
    pub node: SocketAddrV4,
    pub service_ips: heapless::Vec<ServiceIp, MAX_SERVICE_IPS>,
}

impl InstanceRecord {
    /// The instance's own InstanceIP: the first service IP of kind "instance" (spec §2.3).
    pub fn instance_ip(&self) -> Option<Ipv4Addr> {
        self.service_ips
            .iter()
            .find(|s| s.kind == SipKind::Instance)
            .map(|s| s.addr)
    }
}

/// A table query result after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableUpdate {
    pub job: JobName,
    pub query_key: Option<String>,
    pub instances: Vec<InstanceRecord>,
    /// Entries skipped as invalid (e.g. instances not deployed yet, without namespace_ip),
    /// with the first reason, for the log.
    pub skipped: usize,
    pub first_skip_reason: Option<ControlError>,
}

fn is_in(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

fn parse_v4(field: &'static str, s: Option<&str>) -> Result<Ipv4Addr, ControlError> {
    let s = s.unwrap_or("").trim();
    s.parse().map_err(|_| ControlError::BadAddress {
        field,
        value: s.to_string(),
    })
}

fn parse_port(v: &serde_json::Value) -> Result<u16, ControlError> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.filter(|p| (1..=65535).contains(p))
        .map(|p| p as u16)
        .ok_or_else(|| ControlError::BadPort(v.to_string()))
}

impl TqInstance {
    /// `service_net`/`prefix`: the semantic subnet (10.30.0.0/16); service IPs outside it
    /// could never be intercepted, so they are refused rather than stored.
    pub fn validate(
        &self,
        service_net: Ipv4Addr,
        prefix: u8,
    ) -> Result<InstanceRecord, ControlError> {
        let nsip = parse_v4("namespace_ip", self.namespace_ip.as_deref())?;
        let nsip_v6 = self
            .namespace_ip_v6
            .as_deref()
            .and_then(|s| s.trim().parse::<Ipv6Addr>().ok());
        let host = parse_v4("host_ip", self.host_ip.as_deref())?;
        if host.is_unspecified() || host.is_broadcast() || host.is_multicast() {
            return Err(ControlError::BadAddress {
                field: "host_ip",
                value: host.to_string(),
            });
        }
        let port = parse_port(&self.host_port)?;
        let instance_number = match &self.instance_number {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
        let mut service_ips = heapless::Vec::new();
        for s in &self.service_ip {
            let Ok(addr) = s.address.trim().parse::<Ipv4Addr>() else {
                continue;
            };
            if !is_in(addr, service_net, prefix) {
                continue;
            }
            let sip = ServiceIp {
                kind: SipKind::from_wire(&s.ip_type),
                addr,
                addr_v6: s.address_v6.as_deref().and_then(|a| a.trim().parse().ok()),
            };
            service_ips
                .push(sip)
                .map_err(|_| ControlError::TooManyServiceIps)?;
        }
        if service_ips.is_empty() {
            return Err(ControlError::NoServiceIp);
        }
        Ok(InstanceRecord {
            instance_number,
            nsip,
            nsip_v6,
            node: SocketAddrV4::new(host, port),
            service_ips,
        })
    }
}

impl TableQueryResult {
    pub fn decode(payload: &[u8]) -> Result<Self, ControlError> {
        json(payload)
    }

    /// Keeps the valid instances; an unusable job name or no valid instance at all is an
    /// error (upstream rejects the CSM's "could not resolve" answer the same way, §4.1).
    pub fn validate(&self, service_net: Ipv4Addr, prefix: u8) -> Result<TableUpdate, ControlError> {
        let job = JobName::parse(self.app_name.as_deref().unwrap_or(""))?;
        let mut instances = Vec::with_capacity(self.instance_list.len());
        let mut skipped = 0;
        let mut first_skip_reason = None;
        for i in &self.instance_list {
            match i.validate(service_net, prefix) {
                Ok(r) => instances.push(r),
                Err(e) => {
                    skipped += 1;
                    first_skip_reason.get_or_insert(e);
                }
            }
        }
        Ok(TableUpdate {
            job,
            query_key: self.query_key.clone(),
            instances,
            skipped,
            first_skip_reason,
        })
    }
}

/// `service/deployed` and `service/address-changed` (spec §4.1). `host_port` is a string here
/// on the wire, unlike in table query results. Sent with every field; decoded leniently
/// (missing or null fields empty, `host_port` as a string or a number), since the receiving
/// service manager should not drop a report over a field it can do without.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDeployed {
    pub appname: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub status: String,
    pub instance_number: u32,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub nsip: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub nsipv6: String,
    #[serde(default, deserialize_with = "port_string")]
    pub host_port: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub host_ip: String,
}

impl ServiceDeployed {
    pub fn deployed(
        job: &JobName,
        instance_number: u32,
        nsip: Ipv4Addr,
        nsip_v6: Option<Ipv6Addr>,
        node: SocketAddrV4,
    ) -> Self {
        ServiceDeployed {
            appname: job.to_string(),
            status: "DEPLOYED".into(),
            instance_number,
            nsip: nsip.to_string(),
            nsipv6: nsip_v6.map(|a| a.to_string()).unwrap_or_default(),
            host_port: node.port().to_string(),
            host_ip: node.ip().to_string(),
        }
    }
    /// The address-changed form: status and namespace addresses empty (spec §4.1).
    pub fn address_changed(job: &JobName, instance_number: u32, node: SocketAddrV4) -> Self {
        ServiceDeployed {
            appname: job.to_string(),
            status: String::new(),
            instance_number,
            nsip: String::new(),
            nsipv6: String::new(),
            host_port: node.port().to_string(),
            host_ip: node.ip().to_string(),
        }
    }
    pub fn decode(payload: &[u8]) -> Result<Self, ControlError> {
        json(payload)
    }
}

/// `interest/remove`: `{"appname":"<job>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterestRemove {
    pub appname: String,
}

/// `jobs/<job>/updates_available`: `{"type":"DEPLOYMENT"|"UNDEPLOYMENT"}`. The stock NetManager
/// ignores the content and re-queries; so do we, and any payload (even invalid JSON) counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatesAvailable {
    #[serde(rename = "type", default)]
    pub kind: String,
}

impl UpdatesAvailable {
    pub fn decode_lenient(payload: &[u8]) -> Self {
        serde_json::from_slice(payload).unwrap_or_default()
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// A port as the text upstream sends, from a JSON string, number or null.
fn port_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Null => Ok(String::new()),
        other => Err(serde::de::Error::custom(format!(
            "host_port: expected a port, got {other}"
        ))),
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 0);

    #[test]
    fn spec_table_query_result_decodes() {
        let p = br#"{"app_name":"shop.prod.api.prod","query_key":"10.30.1.30",
         "instance_list":[{"instance_number":0,"namespace_ip":"10.18.0.66","namespace_ip_v6":"fc00::102",
           "host_ip":"198.51.100.20","host_port":50103,"instance_ip":"10.30.0.3","cluster_id":"x",
           "service_ip":[{"IpType":"RR","Address":"10.30.1.30","Address_v6":"fdff:2000::1"},
                         {"IpType":"instance_ip","Address":"10.30.0.3","Address_v6":"fdff::3"}]}]}"#;
        let u = TableQueryResult::decode(p)
            .unwrap()
            .validate(SVC, 16)
            .unwrap();
        assert_eq!(u.job.as_str(), "shop.prod.api.prod");
        assert_eq!(u.skipped, 0);
        let i = &u.instances[0];
        assert_eq!(i.nsip, Ipv4Addr::new(10, 18, 0, 66));
        assert_eq!(i.node, "198.51.100.20:50103".parse().unwrap());
        assert_eq!(i.service_ips[0].kind, SipKind::RoundRobin);
        assert_eq!(i.instance_ip(), Some(Ipv4Addr::new(10, 30, 0, 3)));
    }

    #[test]
    fn unresolved_and_partial_results() {
        let empty = br#"{"app_name":null,"query_key":"10.30.9.9","instance_list":[]}"#;
        let r = TableQueryResult::decode(empty).unwrap();
        assert!(matches!(
            r.validate(SVC, 16),
            Err(ControlError::BadJobName(_))
        ));
        // an instance not deployed yet has no namespace_ip and is skipped, not fatal
        let p = br#"{"app_name":"a.b.c.d","instance_list":[{"instance_number":1,"namespace_ip":null,
            "host_ip":"1.2.3.4","host_port":50103,"service_ip":[{"IpType":"RR","Address":"10.30.0.1"}]},
            {"instance_number":2,"namespace_ip":"10.18.0.2","host_ip":"1.2.3.4","host_port":"50103",
            "service_ip":[{"IpType":"RR","Address":"10.30.0.1"}]}]}"#;
        let u = TableQueryResult::decode(p)
            .unwrap()
            .validate(SVC, 16)
            .unwrap();
        assert_eq!((u.instances.len(), u.skipped), (1, 1));
        assert!(matches!(
            u.first_skip_reason,
            Some(ControlError::BadAddress {
                field: "namespace_ip",
                ..
            })
        ));
    }

    #[test]
    fn hostile_values_are_refused() {
        let mk = |port: &str, sip: &str| {
            format!(
                r#"{{"namespace_ip":"10.18.0.2","host_ip":"1.2.3.4","host_port":{port},"service_ip":[{{"IpType":"RR","Address":"{sip}"}}]}}"#
            )
        };
        for (port, sip, ok) in [
            ("0", "10.30.0.1", false),
            ("70000", "10.30.0.1", false),
            ("-1", "10.30.0.1", false),
            ("50103", "8.8.8.8", false),
            ("50103", "10.30.0.1", true),
        ] {
            let i: TqInstance = serde_json::from_str(&mk(port, sip)).unwrap();
            assert_eq!(i.validate(SVC, 16).is_ok(), ok, "{port} {sip}");
        }
        for bad in ["a.b.c", "a.b.c.d.e", "a.b..d", "a-x.b.c.d", &"x".repeat(31)] {
            assert!(JobName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_match_upstream_shapes() {
        let job = JobName::parse("shop.prod.api.prod").unwrap();
        let d = ServiceDeployed::deployed(
            &job,
            0,
            Ipv4Addr::new(10, 18, 0, 66),
            Some("fc00::102".parse().unwrap()),
            "198.51.100.20:50103".parse().unwrap(),
        );
        let v: serde_json::Value = serde_json::to_value(&d).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"appname":"shop.prod.api.prod","status":"DEPLOYED","instance_number":0,
            "nsip":"10.18.0.66","nsipv6":"fc00::102","host_port":"50103","host_ip":"198.51.100.20"})
        );
        assert_eq!(
            serde_json::to_string(&SubnetRequest::get()).unwrap(),
            r#"{"METHOD":"GET"}"#
        );
        assert_eq!(
            serde_json::to_string(&TableQueryRequest::by_ip(Ipv4Addr::new(10, 30, 1, 30))).unwrap(),
            r#"{"sname":"","sip":"10.30.1.30"}"#
        );
        let s = SubnetResult::decode(br#"{"address":"10.18.0.64","addressv6":"fc00::100"}"#)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(s.v4, Ipv4Addr::new(10, 18, 0, 64));
        assert!(SubnetResult::decode(br#"{"address":"10.18.0.65"}"#)
            .unwrap()
            .validate()
            .is_err());
        assert_eq!(UpdatesAvailable::decode_lenient(b"garbage").kind, "");
        // what a service manager accepts: the exact form back, and a looser one
        assert_eq!(
            ServiceDeployed::decode(&serde_json::to_vec(&d).unwrap()).unwrap(),
            d
        );
        let loose = ServiceDeployed::decode(
            br#"{"appname":"a.b.c.d","instance_number":1,"host_port":50103,"nsip":null}"#,
        )
        .unwrap();
        assert_eq!(
            (loose.host_port.as_str(), loose.nsip.as_str()),
            ("50103", "")
        );
        assert!(ServiceDeployed::decode(
            br#"{"appname":"a.b.c.d","instance_number":1,"host_port":[1]}"#
        )
        .is_err());
    }

    #[test]
    fn topics() {
        use topic::*;
        assert_eq!(
            table_query_request("abc"),
            "nodes/abc/net/tablequery/request"
        );
        assert_eq!(
            parse_node_net("nodes/abc/net/service/deployed"),
            Some(NodeNet::ServiceDeployed("abc"))
        );
        assert_eq!(parse_node_net("nodes/abc/net/nope"), None);
        assert_eq!(
            parse_updates_available("jobs/a.b.c.d/updates_available"),
            Some("a.b.c.d")
        );
        assert_eq!(parse_updates_available("jobs//updates_available"), None);
    }
}
