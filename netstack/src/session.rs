//! The overlay's side of the MQTT conversation with the cluster service manager (spec
//! overlay-network §4.1, §3.7) as a pure state machine: subnet request until answered, one
//! table query in flight per key, subscriptions to `jobs/<job>/updates_available` for the jobs
//! in the table, re-query on update, `interest/remove` when the data plane lets a job lapse,
//! `service/deployed` for local instances. It owns no connection and no clock: the worker's
//! MQTT client feeds messages and time in, and publishes or subscribes what comes out.

use crate::control::{
    topic, InterestRemove, JobName, NodeSubnet, ServiceDeployed, SubnetRequest, SubnetResult,
    TableQueryRequest, TableQueryResult, TableUpdate,
};
use crate::dataplane::Event;
use crate::Millis;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

/// Re-send the subnet request this often until it is answered (upstream gives up after 10 s
/// and exits, spec §8 item 11).
pub const SUBNET_RETRY_MS: u64 = 5_000;
/// A table query without an answer may be sent again after this long.
pub const QUERY_RETRY_MS: u64 = 2_000;

/// Something for the worker to do. Every publish is QoS 1, not retained (spec §4.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Publish {
        topic: String,
        payload: Vec<u8>,
    },
    Subscribe(String),
    Unsubscribe(String),
    /// The cluster gave this worker its subnet: build the bridge and tell the data plane.
    Subnet(NodeSubnet),
    /// Hand this to the data plane (`Command::ApplyTableUpdate`).
    Table(TableUpdate),
}

pub struct Session {
    node: String,
    service_net: Ipv4Addr,
    service_prefix: u8,
    subnet: Option<NodeSubnet>,
    subnet_asked: Option<Millis>,
    /// Query key (job name or IP string) → when it was sent.
    in_flight: BTreeMap<String, Millis>,
    /// Jobs whose update topic we are subscribed to.
    subscribed: BTreeSet<String>,
    max_subscriptions: usize,
    pub rejected_messages: u64,
}

fn publish<T: serde::Serialize>(topic: String, v: &T) -> Output {
    Output::Publish {
        topic,
        // serializing these plain structs cannot fail; an empty body would be refused upstream
        payload: serde_json::to_vec(v).unwrap_or_default(),
    }
}

impl Session {
    /// `node`: the worker id (24-hex ObjectId, as the CSM keys nodes by it).
    pub fn new(
        node: &str,
        service_net: Ipv4Addr,
        service_prefix: u8,
        max_subscriptions: usize,
    ) -> Session {
        Session {
            node: node.to_string(),
            service_net,
            service_prefix,
            subnet: None,
            subnet_asked: None,
            in_flight: BTreeMap::new(),
            subscribed: BTreeSet::new(),
            max_subscriptions,
            rejected_messages: 0,
        }
    }

    pub fn subnet(&self) -> Option<NodeSubnet> {
        self.subnet
    }

    /// On (re)connect: subscribe to the answers, then ask for the subnet if we have none.
    /// Clean sessions lose subscriptions, so the job topics are subscribed again too.
    pub fn on_connect(&mut self, now: Millis) -> Vec<Output> {
        let mut out = vec![
            Output::Subscribe(topic::subnet_result(&self.node)),
            Output::Subscribe(topic::table_query_result(&self.node)),
        ];
        out.extend(
            self.subscribed
                .iter()
                .map(|j| Output::Subscribe(topic::updates_available(j))),
        );
        self.in_flight.clear();
        if self.subnet.is_none() {
            out.push(self.ask_subnet(now));
        }
        out
    }

    fn ask_subnet(&mut self, now: Millis) -> Output {
        self.subnet_asked = Some(now);
        publish(topic::subnet_request(&self.node), &SubnetRequest::get())
    }

    /// Timers: subnet retry, stale queries forgotten.
    pub fn tick(&mut self, now: Millis) -> Vec<Output> {
        let mut out = Vec::new();
        if self.subnet.is_none()
            && self
                .subnet_asked
                .is_some_and(|t| now.since(t) >= SUBNET_RETRY_MS)
        {
            out.push(self.ask_subnet(now));
        }
        self.in_flight.retain(|_, t| now.since(*t) < QUERY_RETRY_MS);
        out
    }

    fn query(&mut self, now: Millis, key: String, req: TableQueryRequest) -> Option<Output> {
        if self
            .in_flight
            .get(&key)
            .is_some_and(|t| now.since(*t) < QUERY_RETRY_MS)
        {
            return None;
        }
        self.in_flight.insert(key, now);
        Some(publish(topic::table_query_request(&self.node), &req))
    }

    /// What the data plane asked for.
    pub fn on_event(&mut self, now: Millis, ev: Event) -> Vec<Output> {
        match ev {
            Event::TableQuery(ip) => self
                .query(now, ip.to_string(), TableQueryRequest::by_ip(ip))
                .into_iter()
                .collect(),
            Event::InterestLapsed(job) => {
                let mut out = vec![publish(
                    topic::interest_remove(&self.node),
                    &InterestRemove {
                        appname: job.to_string(),
                    },
                )];
                if self.subscribed.remove(job.as_str()) {
                    out.push(Output::Unsubscribe(topic::updates_available(job.as_str())));
                }
                out
            }
        }
    }

    /// A local instance got its address (spec §3.2 step 6): report it, and make sure its job
    /// is in the table (for the instance's own InstanceIP) and kept up to date.
    pub fn deployed(
        &mut self,
        now: Millis,
        job: &JobName,
        instance_number: u32,
        nsip: Ipv4Addr,
        nsip_v6: Option<Ipv6Addr>,
        node: SocketAddrV4,
    ) -> Vec<Output> {
        let mut out = vec![publish(
            topic::service_deployed(&self.node),
            &ServiceDeployed::deployed(job, instance_number, nsip, nsip_v6, node),
        )];
        out.extend(self.subscribe(job));
        out.extend(self.query(
            now,
            job.to_string(),
            TableQueryRequest::by_job(job.as_str()),
        ));
        out
    }

    fn subscribe(&mut self, job: &JobName) -> Option<Output> {
        if self.subscribed.contains(job.as_str()) || self.subscribed.len() >= self.max_subscriptions
        {
            return None;
        }
        self.subscribed.insert(job.to_string());
        Some(Output::Subscribe(topic::updates_available(job.as_str())))
    }

    /// A message on any topic the session subscribed to. Invalid payloads are counted and
    /// logged; they never disturb what is running.
    pub fn on_message(&mut self, now: Millis, t: &str, payload: &[u8]) -> Vec<Output> {
        if t == topic::subnet_result(&self.node) {
            return match SubnetResult::decode(payload).and_then(|r| r.validate()) {
                Ok(s) if self.subnet.is_none() => {
                    self.subnet = Some(s);
                    vec![Output::Subnet(s)]
                }
                // a second answer (we retried) must not move a running bridge
                Ok(_) => Vec::new(),
                Err(e) => self.reject(t, &e.to_string()),
            };
        }
        if t == topic::table_query_result(&self.node) {
            let u = TableQueryResult::decode(payload)
                .and_then(|r| r.validate(self.service_net, self.service_prefix));
            return match u {
                Ok(u) => {
                    if let Some(k) = &u.query_key {
                        self.in_flight.remove(k);
                    }
                    self.in_flight.remove(u.job.as_str());
                    if u.skipped > 0 {
                        log::debug!(
                            "table result for {}: {} entries skipped ({:?})",
                            u.job,
                            u.skipped,
                            u.first_skip_reason
                        );
                    }
                    let mut out: Vec<Output> = self.subscribe(&u.job).into_iter().collect();
                    out.push(Output::Table(u));
                    out
                }
                Err(e) => {
                    // the CSM answers "could not resolve" with an empty result; let the key
                    // be asked again after the retry time rather than at once
                    self.reject(t, &e.to_string())
                }
            };
        }
        if let Some(job) = topic::parse_updates_available(t) {
            // The payload is ignored, as upstream does (spec §3.7); re-query by job name.
            if self.subscribed.contains(job) {
                self.in_flight.remove(job);
                return self
                    .query(now, job.to_string(), TableQueryRequest::by_job(job))
                    .into_iter()
                    .collect();
            }
            return Vec::new();
        }
        Vec::new()
    }

    fn reject(&mut self, t: &str, why: &str) -> Vec<Output> {
        self.rejected_messages += 1;
        log::warn!("ignored message on {t}: {why}");
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "65f1a2b3c4d5e6f708091011";

    fn session() -> Session {
        Session::new(NODE, Ipv4Addr::new(10, 30, 0, 0), 16, 4)
    }

    fn published(out: &[Output]) -> Vec<(String, serde_json::Value)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Publish { topic, payload } => {
                    Some((topic.clone(), serde_json::from_slice(payload).unwrap()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn subnet_is_requested_until_answered_and_kept() {
        let mut s = session();
        let out = s.on_connect(Millis(0));
        assert_eq!(
            out[0],
            Output::Subscribe(format!("nodes/{NODE}/net/subnetwork/result"))
        );
        assert_eq!(
            published(&out),
            vec![(
                format!("nodes/{NODE}/net/subnet"),
                serde_json::json!({"METHOD":"GET"})
            )]
        );
        assert!(s.tick(Millis(4_999)).is_empty());
        assert_eq!(
            published(&s.tick(Millis(5_000))).len(),
            1,
            "retried, not fatal"
        );
        let t = format!("nodes/{NODE}/net/subnetwork/result");
        assert!(s
            .on_message(Millis(5_001), &t, b"{\"address\":\"10.18.0.3\"}")
            .is_empty());
        assert_eq!(s.rejected_messages, 1);
        let out = s.on_message(
            Millis(5_002),
            &t,
            br#"{"address":"10.18.0.64","addressv6":"fc00::100"}"#,
        );
        assert!(
            matches!(out[..], [Output::Subnet(NodeSubnet { v4, .. })] if v4 == Ipv4Addr::new(10, 18, 0, 64))
        );
        assert!(
            s.on_message(Millis(5_003), &t, br#"{"address":"10.18.1.0"}"#)
                .is_empty(),
            "first answer wins"
        );
        assert!(s.tick(Millis(20_000)).is_empty());
    }

    #[test]
    fn queries_are_deduplicated_and_results_subscribe_the_job() {
        let mut s = session();
        let ip = Ipv4Addr::new(10, 30, 1, 30);
        let out = s.on_event(Millis(0), Event::TableQuery(ip));
        assert_eq!(
            published(&out),
            vec![(
                format!("nodes/{NODE}/net/tablequery/request"),
                serde_json::json!({"sname":"","sip":"10.30.1.30"})
            )]
        );
        assert!(
            s.on_event(Millis(10), Event::TableQuery(ip)).is_empty(),
            "one in flight per key"
        );
        let result = br#"{"app_name":"shop.prod.api.prod","query_key":"10.30.1.30","instance_list":[{"instance_number":0,
            "namespace_ip":"10.18.0.66","host_ip":"198.51.100.20","host_port":50103,
            "service_ip":[{"IpType":"RR","Address":"10.30.1.30"}]}]}"#;
        let out = s.on_message(
            Millis(20),
            &format!("nodes/{NODE}/net/tablequery/result"),
            result,
        );
        assert_eq!(
            out[0],
            Output::Subscribe("jobs/shop.prod.api.prod/updates_available".into())
        );
        assert!(matches!(&out[1], Output::Table(u) if u.instances.len() == 1));
        // answered: a new miss may ask again
        assert_eq!(s.on_event(Millis(30), Event::TableQuery(ip)).len(), 1);
        // an update re-queries by job name, whatever the payload
        let out = s.on_message(
            Millis(40),
            "jobs/shop.prod.api.prod/updates_available",
            b"not json",
        );
        assert_eq!(
            published(&out)[0].1,
            serde_json::json!({"sname":"shop.prod.api.prod","sip":""})
        );
        // lapse: interest/remove and unsubscribe
        let out = s.on_event(
            Millis(50),
            Event::InterestLapsed(JobName::parse("shop.prod.api.prod").unwrap()),
        );
        assert_eq!(
            published(&out)[0],
            (
                format!("nodes/{NODE}/net/interest/remove"),
                serde_json::json!({"appname":"shop.prod.api.prod"})
            )
        );
        assert_eq!(
            out[1],
            Output::Unsubscribe("jobs/shop.prod.api.prod/updates_available".into())
        );
        assert!(s
            .on_message(
                Millis(60),
                "jobs/shop.prod.api.prod/updates_available",
                b"{}"
            )
            .is_empty());
    }

    #[test]
    fn deploy_reports_and_subscribes_and_reconnect_resubscribes() {
        let mut s = session();
        let job = JobName::parse("a.b.c.d").unwrap();
        let out = s.deployed(
            Millis(0),
            &job,
            2,
            Ipv4Addr::new(10, 18, 0, 66),
            None,
            "192.0.2.1:50103".parse().unwrap(),
        );
        let p = published(&out);
        assert_eq!(p[0].0, format!("nodes/{NODE}/net/service/deployed"));
        assert_eq!(p[0].1["host_port"], "50103");
        assert_eq!(p[1].1, serde_json::json!({"sname":"a.b.c.d","sip":""}));
        assert!(out.contains(&Output::Subscribe("jobs/a.b.c.d/updates_available".into())));
        let again = s.on_connect(Millis(1));
        assert!(again.contains(&Output::Subscribe("jobs/a.b.c.d/updates_available".into())));
        // bad results are counted, not fatal
        assert!(s
            .on_message(
                Millis(2),
                &format!("nodes/{NODE}/net/tablequery/result"),
                b"[1,2]"
            )
            .is_empty());
        assert_eq!(s.rejected_messages, 1);
    }
}
