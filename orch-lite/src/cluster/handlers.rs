//! MQTT message handling: (state, topic, payload, now) → effects. Decodes every payload with the
//! worker crate's contract; a message that does not decode is logged (rate-limited by the log
//! level: debug after the first per kind) and counted per topic kind, and handling of every
//! other message goes on. The overlay's `nodes/+/net/...` payloads are validated here and
//! handed on as [`NetRequest`]s; answering them needs the root (its network tables). Their
//! payload types are netstack's (`netstack::control`), the overlay's one wire contract.

use super::metrics::Metrics;
use super::state::{ClusterState, Effect};
pub use netstack::control::ServiceDeployed;
use netstack::control::{InterestRemove, SubnetRequest, TableQueryRequest};
use std::sync::atomic::AtomicU64;
use worker::protocol::{self, topic, JobStatus, NodeInfo, ResourcesReport};

/// A validated request from a worker's NetManager (spec overlay-network.md §4.1).
#[derive(Debug, Clone, PartialEq)]
pub enum NetRequest {
    /// `net/subnet` `{"METHOD":"GET"}`: the worker needs its container subnet.
    Subnet { node_id: String },
    /// `net/tablequery/request`: resolve a service name or a service IP.
    TableQuery {
        node_id: String,
        sname: String,
        sip: String,
    },
    /// `net/service/deployed` or `net/service/address-changed`.
    ServiceDeployed {
        node_id: String,
        report: ServiceDeployed,
    },
    /// `net/interest/remove`.
    InterestRemove { node_id: String, appname: String },
}

/// What one message led to.
#[derive(Debug, Default, PartialEq)]
pub struct Handled {
    pub effects: Vec<Effect>,
    pub net: Option<NetRequest>,
}

fn malformed(counter: &AtomicU64, topic: &str, payload: &[u8], why: &str) -> Handled {
    Metrics::inc(counter);
    let preview: String = String::from_utf8_lossy(&payload[..payload.len().min(120)]).into();
    log::warn!("malformed message on {topic}: {why}; payload starts {preview:?}; ignored");
    Handled::default()
}

/// Handles one message from the broker.
pub fn on_message(state: &mut ClusterState, topic_name: &str, payload: &[u8], now: u64) -> Handled {
    let metrics = state.metrics.clone();
    let m = &*metrics;
    let Some((node_id, kind)) = topic::parse(topic_name) else {
        return malformed(
            &m.malformed_other,
            topic_name,
            payload,
            "not a nodes/<id>/... topic",
        );
    };
    if !protocol::valid_node_id(node_id) {
        return malformed(
            &m.malformed_other,
            topic_name,
            payload,
            "node id is not a valid id",
        );
    }
    let effects = match kind {
        topic::Kind::Information => match protocol::decode::<NodeInfo>(payload) {
            Ok(info) => state.on_information(node_id, info, now),
            Err(e) => return malformed(&m.malformed_information, topic_name, payload, &e),
        },
        topic::Kind::Job => match protocol::decode::<JobStatus>(payload) {
            Ok(js) => state.on_job_status(node_id, js, now),
            Err(e) => return malformed(&m.malformed_job, topic_name, payload, &e),
        },
        topic::Kind::Resources => match protocol::decode::<ResourcesReport>(payload) {
            Ok(r) => state.on_resources(node_id, r, now),
            Err(e) => return malformed(&m.malformed_resources, topic_name, payload, &e),
        },
        topic::Kind::Net => return on_net(m, node_id, topic_name, payload),
        // Our own commands come back only if someone subscribed us to them; nothing to do.
        topic::Kind::Deploy | topic::Kind::Delete | topic::Kind::Error => Vec::new(),
    };
    Handled { effects, net: None }
}

fn on_net(m: &Metrics, node_id: &str, topic_name: &str, payload: &[u8]) -> Handled {
    let suffix = topic_name.split_once("/net/").map_or("", |(_, s)| s);
    let bad = |e: String| malformed(&m.malformed_net, topic_name, payload, &e);
    let node_id = node_id.to_string();
    let net = match suffix {
        // Our own answers to the NetManager, echoed by the `nodes/+/net/#` subscription.
        "subnetwork/result" | "tablequery/result" => return Handled::default(),
        "subnet" => match protocol::decode::<SubnetRequest>(payload) {
            Ok(r) if r.method.eq_ignore_ascii_case("GET") => NetRequest::Subnet { node_id },
            // Upstream accepts DELETE and does nothing with it.
            Ok(r) if r.method.eq_ignore_ascii_case("DELETE") => return Handled::default(),
            Ok(r) => return bad(format!("unknown METHOD {:?}", r.method)),
            Err(e) => return bad(e),
        },
        "tablequery/request" => match protocol::decode::<TableQueryRequest>(payload) {
            Ok(q) if q.sname.is_empty() && q.sip.is_empty() => {
                return bad("neither sname nor sip is set".into())
            }
            Ok(q) if !q.sname.is_empty() && !protocol::valid_job_name(&q.sname) => {
                return bad(format!("sname {:?} is not a job name", q.sname))
            }
            Ok(q) if !q.sip.is_empty() && q.sip.parse::<std::net::IpAddr>().is_err() => {
                return bad(format!("sip {:?} is not an IP address", q.sip))
            }
            Ok(q) => NetRequest::TableQuery {
                node_id,
                sname: q.sname,
                sip: q.sip,
            },
            Err(e) => return bad(e),
        },
        "service/deployed" | "service/address-changed" => {
            match protocol::decode::<ServiceDeployed>(payload) {
                Ok(r) if !protocol::valid_job_name(&r.appname) => {
                    return bad(format!("appname {:?} is not a job name", r.appname))
                }
                Ok(report) => NetRequest::ServiceDeployed { node_id, report },
                Err(e) => return bad(e),
            }
        }
        "interest/remove" => match protocol::decode::<InterestRemove>(payload) {
            Ok(r) => NetRequest::InterestRemove {
                node_id,
                appname: r.appname,
            },
            Err(e) => return bad(e),
        },
        // Upstream's handler is a TODO and its NetManager never sends it.
        "service/undeployed" => match protocol::decode::<serde_json::Value>(payload) {
            Ok(_) => return Handled::default(),
            Err(e) => return bad(e),
        },
        other => return bad(format!("unknown net topic {other:?}")),
    };
    Handled {
        effects: Vec::new(),
        net: Some(net),
    }
}
