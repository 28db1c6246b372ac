//! What the running worker knows about itself, shared between the session (which writes it)
//! and the status endpoint thread (which renders it as /status JSON and /metrics text).
//! Counters are atomics; the few strings sit behind one mutex held only to copy or set them.
//! The overlay's data-plane counters (`oak_overlay_*`) are the data plane's own, read from the
//! snapshot its thread refreshes once a second: a scrape never waits on the packet loop.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use netstack::dataplane::{CounterSnapshot, SharedCounters};
use netstack::DropReason;

use crate::mqtt::client::Stats as MqttStats;
use crate::protocol::Status;
use crate::sysinfo::CgroupInfo;

/// Instances shown in /status at most (display only; the runtime is the source of truth).
pub const MAX_INSTANCES_SHOWN: usize = 1024;

#[derive(Debug, Default)]
pub struct Counters {
    pub information_sent: AtomicU64,
    pub resources_sent: AtomicU64,
    pub status_reports_sent: AtomicU64,
    /// Periodic reports not sent because the broker was unreachable or the queue was full.
    pub reports_skipped: AtomicU64,
    pub registrations: AtomicU64,
    pub registration_failures: AtomicU64,
    pub reconnects: AtomicU64,
    pub malformed_deploy: AtomicU64,
    pub malformed_delete: AtomicU64,
    pub malformed_error: AtomicU64,
    pub unexpected_topic: AtomicU64,
    pub control_errors: AtomicU64,
    pub runtime_queue_full: AtomicU64,
    pub status_queue_evicted: AtomicU64,
    pub invalid_runtime_status: AtomicU64,
    pub subscriptions_refused: AtomicU64,
    /// Overlay messages not carried (link or client queue full); the overlay retries.
    pub overlay_dropped: AtomicU64,
    /// `jobs/resources` samples the runtime could not take (containerd unreachable or slow).
    pub sample_failures: AtomicU64,
}

/// The containerd connection as the runtime adapter last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containerd {
    Connecting,
    Connected { socket: String },
    Unreachable { error: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    Unregistered,
    Registering,
    Registered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Disconnected,
    Connected,
}

#[derive(Debug, Clone)]
struct State {
    node_name: String,
    cluster: String,
    node_id: String,
    broker_addr: String,
    registration: Registration,
    last_registration_error: String,
    broker: Broker,
    queued_status_reports: usize,
    cgroup: Option<CgroupInfo>,
    containerd: Containerd,
    instances: BTreeMap<(String, u64), (Status, String)>,
}

#[derive(Debug)]
pub struct Telemetry {
    pub counters: Counters,
    pub mqtt: Arc<MqttStats>,
    /// Image pull counters, shared with the puller (`oak_image_*` in /metrics).
    pub images: Arc<crate::image::Counters>,
    state: Mutex<State>,
    /// Set once when the overlay runs (`OAK_NETWORK=auto`); without it no `oak_overlay_*`.
    overlay: OnceLock<Arc<SharedCounters>>,
}

impl Telemetry {
    pub fn new(node_name: &str, cluster: &str) -> Arc<Telemetry> {
        Arc::new(Telemetry {
            counters: Counters::default(),
            mqtt: Arc::new(MqttStats::default()),
            images: Arc::default(),
            state: Mutex::new(State {
                node_name: node_name.into(),
                cluster: cluster.into(),
                node_id: String::new(),
                broker_addr: String::new(),
                registration: Registration::Unregistered,
                last_registration_error: String::new(),
                broker: Broker::Disconnected,
                queued_status_reports: 0,
                cgroup: None,
                containerd: Containerd::Connecting,
                instances: BTreeMap::new(),
            }),
            overlay: OnceLock::new(),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A panic while holding this lock is a bug elsewhere; the data is still plain values.
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn set_registration(&self, r: Registration, node_id: Option<&str>) {
        self.with(|s| {
            s.registration = r;
            if let Some(id) = node_id {
                s.node_id = id.into();
            }
        })
    }

    pub fn set_registration_error(&self, e: &str) {
        self.with(|s| s.last_registration_error = e.into())
    }

    pub fn set_broker(&self, b: Broker, addr: Option<&str>) {
        self.with(|s| {
            s.broker = b;
            if let Some(a) = addr {
                s.broker_addr = a.into();
            }
        })
    }

    pub fn set_cgroup(&self, c: CgroupInfo) {
        self.with(|s| s.cgroup = Some(c))
    }

    pub fn set_containerd(&self, c: Containerd) {
        self.with(|s| s.containerd = c)
    }

    pub fn set_queued(&self, n: usize) {
        self.with(|s| s.queued_status_reports = n)
    }

    pub fn instance(&self, job: &str, instance: u64, status: Status, detail: &str) {
        self.with(|s| {
            let key = (job.to_string(), instance);
            if s.instances.len() >= MAX_INSTANCES_SHOWN && !s.instances.contains_key(&key) {
                // Forget a finished instance to make room; if none, the new one is not shown.
                let done = s
                    .instances
                    .iter()
                    .find(|(_, (st, _))| !matches!(st, Status::Created | Status::Running))
                    .map(|(k, _)| k.clone());
                match done {
                    Some(k) => {
                        s.instances.remove(&k);
                    }
                    None => return,
                }
            }
            s.instances.insert(key, (status, detail.into()));
        })
    }

    /// The overlay's data-plane counters, shown in /metrics from now on (the first call wins).
    pub fn set_overlay(&self, c: Arc<SharedCounters>) {
        let _ = self.overlay.set(c);
    }

    pub fn node_id(&self) -> String {
        self.with(|s| s.node_id.clone())
    }

    pub fn status_json(&self) -> serde_json::Value {
        let s = self.with(|s| s.clone());
        let c = &self.counters;
        let m = &self.mqtt;
        let l = |a: &AtomicU64| a.load(Relaxed);
        serde_json::json!({
            "node_name": s.node_name,
            "node_id": s.node_id,
            "cluster": s.cluster,
            "registration": match s.registration {
                Registration::Unregistered => "unregistered",
                Registration::Registering => "registering",
                Registration::Registered => "registered",
            },
            "last_registration_error": s.last_registration_error,
            "broker": {
                "address": s.broker_addr,
                "state": match s.broker { Broker::Connected => "connected", Broker::Disconnected => "disconnected" },
            },
            "cgroup": s.cgroup,
            "containerd": match &s.containerd {
                Containerd::Connecting => serde_json::json!({"state": "connecting"}),
                Containerd::Connected { socket } => serde_json::json!({"state": "connected", "socket": socket}),
                Containerd::Unreachable { error } => serde_json::json!({"state": "unreachable", "error": error}),
            },
            "queued_status_reports": s.queued_status_reports,
            "counters": {
                "information_sent": l(&c.information_sent),
                "resources_sent": l(&c.resources_sent),
                "status_reports_sent": l(&c.status_reports_sent),
                "reports_skipped": l(&c.reports_skipped),
                "registrations": l(&c.registrations),
                "registration_failures": l(&c.registration_failures),
                "reconnects": l(&c.reconnects),
                "malformed_messages": l(&c.malformed_deploy) + l(&c.malformed_delete) + l(&c.malformed_error),
                "control_errors": l(&c.control_errors),
                "publishes_acknowledged": l(&m.published),
                "publish_failures": l(&m.dropped),
                "sample_failures": l(&c.sample_failures),
                "image_pulls": l(&self.images.pulls),
                "image_pull_failures": l(&self.images.failures),
            },
            "instances": s.instances.iter().map(|((job, n), (st, detail))| serde_json::json!({
                "job_name": job, "instance": n, "status": st, "status_detail": detail,
            })).collect::<Vec<_>>(),
        })
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn metrics_text(&self) -> String {
        let s = self.with(|s| {
            (
                s.registration,
                s.broker,
                s.queued_status_reports,
                s.cgroup.as_ref().map(|c| c.memory),
                matches!(s.containerd, Containerd::Connected { .. }),
            )
        });
        let c = &self.counters;
        let m = &self.mqtt;
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            write_family(&mut out, &format!("oak_worker_{name}"), kind, help, samples);
        };
        let l = |a: &AtomicU64| a.load(Relaxed);
        metric(
            "reports_sent_total",
            "counter",
            "Periodic reports handed to the MQTT client.",
            &[
                ("{topic=\"information\"}", l(&c.information_sent)),
                ("{topic=\"jobs/resources\"}", l(&c.resources_sent)),
            ],
        );
        metric(
            "status_reports_sent_total",
            "counter",
            "Instance status reports handed to the MQTT client.",
            &[("", l(&c.status_reports_sent))],
        );
        metric(
            "reports_skipped_total",
            "counter",
            "Periodic reports not sent while the broker was unreachable.",
            &[("", l(&c.reports_skipped))],
        );
        metric(
            "publish_failures_total",
            "counter",
            "Publishes dropped unacknowledged (connection lost, or invalid).",
            &[("", l(&m.dropped))],
        );
        metric(
            "publishes_acknowledged_total",
            "counter",
            "QoS 1 publishes acknowledged by the broker.",
            &[("", l(&m.published))],
        );
        metric(
            "publishes_resent_total",
            "counter",
            "Publishes sent again with DUP after a reconnect.",
            &[("", l(&m.resent))],
        );
        metric(
            "mqtt_connects_total",
            "counter",
            "Accepted MQTT connections.",
            &[("", l(&m.connects))],
        );
        metric(
            "mqtt_connect_failures_total",
            "counter",
            "Failed MQTT connection attempts.",
            &[("", l(&m.connect_failures))],
        );
        metric(
            "mqtt_reconnects_total",
            "counter",
            "MQTT connections after the first one.",
            &[("", l(&c.reconnects))],
        );
        metric(
            "mqtt_connected",
            "gauge",
            "1 while connected to the broker.",
            &[("", u64::from(s.1 == Broker::Connected))],
        );
        metric(
            "registrations_total",
            "counter",
            "Successful registrations with the cluster.",
            &[("", l(&c.registrations))],
        );
        metric(
            "registration_failures_total",
            "counter",
            "Failed registration attempts.",
            &[("", l(&c.registration_failures))],
        );
        metric(
            "registered",
            "gauge",
            "1 once the cluster has given this node an id.",
            &[("", u64::from(s.0 == Registration::Registered))],
        );
        metric(
            "malformed_messages_total",
            "counter",
            "Messages from the cluster that could not be used.",
            &[
                ("{topic=\"control/deploy\"}", l(&c.malformed_deploy)),
                ("{topic=\"control/delete\"}", l(&c.malformed_delete)),
                ("{topic=\"control/error\"}", l(&c.malformed_error)),
                ("{topic=\"other\"}", l(&c.unexpected_topic)),
            ],
        );
        metric(
            "overlay_messages_dropped_total",
            "counter",
            "Overlay MQTT messages not carried because a queue was full (retried by the overlay).",
            &[("", l(&c.overlay_dropped))],
        );
        metric(
            "control_errors_total",
            "counter",
            "control/error messages from the cluster.",
            &[("", l(&c.control_errors))],
        );
        metric(
            "runtime_queue_full_total",
            "counter",
            "Commands refused because the runtime queue was full.",
            &[("", l(&c.runtime_queue_full))],
        );
        metric(
            "status_queue_length",
            "gauge",
            "Status reports waiting for the broker.",
            &[("", s.2 as u64)],
        );
        metric(
            "status_queue_evicted_total",
            "counter",
            "Status reports dropped because the queue was full.",
            &[("", l(&c.status_queue_evicted))],
        );
        metric(
            "invalid_runtime_status_total",
            "counter",
            "Status changes from the runtime that a worker may not report.",
            &[("", l(&c.invalid_runtime_status))],
        );
        metric(
            "subscriptions_refused_total",
            "counter",
            "Subscriptions the broker refused.",
            &[("", l(&c.subscriptions_refused))],
        );
        metric(
            "containerd_up",
            "gauge",
            "1 while the runtime is connected to containerd.",
            &[("", u64::from(s.4))],
        );
        metric(
            "sample_failures_total",
            "counter",
            "jobs/resources samples the runtime could not take.",
            &[("", l(&c.sample_failures))],
        );
        if let Some(mem) = s.3 {
            metric(
                "memory_cgroup_enabled",
                "gauge",
                "1 if the memory cgroup controller is on (container memory limits work).",
                &[("", u64::from(mem))],
            );
        }
        self.images.render(&mut out);
        if let Some(o) = self.overlay.get() {
            render_overlay(&mut out, &o.get());
        }
        out
    }
}

/// One metric family in the Prometheus text format: HELP and TYPE, then a sample per
/// `(label set, value)`, the label set written as is (`{key="value"}`, or empty).
fn write_family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The overlay data plane's counters as `oak_overlay_*` (all counters).
fn render_overlay(out: &mut String, s: &CounterSnapshot) {
    let family = |out: &mut String, name: &str, help: &str, samples: &[(&str, u64)]| {
        write_family(
            out,
            &format!("oak_overlay_{name}"),
            "counter",
            help,
            samples,
        );
    };
    let st = &s.stats;
    family(
        out,
        "packets_total",
        "Packets through the data plane: read from the TUN or a peer, sent to a peer or the \
         TUN, or turned around locally (hairpin).",
        &[
            ("{path=\"from_tun\"}", st.from_tun),
            ("{path=\"from_peer\"}", st.from_peer),
            ("{path=\"to_peer\"}", st.to_peer),
            ("{path=\"to_tun\"}", st.to_tun),
            ("{path=\"hairpin\"}", st.hairpin),
        ],
    );
    for (name, help, v) in [
        (
            "icmp_sent_total",
            "ICMP errors the data plane sent to local senders.",
            st.icmp_sent,
        ),
        (
            "parked_total",
            "Packets held until a table query answers for their destination.",
            st.parked,
        ),
        (
            "released_total",
            "Parked packets let go (answered or timed out).",
            st.released,
        ),
        (
            "table_queries_total",
            "Table queries the data plane asked the cluster for.",
            st.queries,
        ),
        (
            "query_timeouts_total",
            "Parked packets whose table query was not answered in time (sender got ICMP unreachable).",
            st.query_timeouts,
        ),
    ] {
        family(out, name, help, &[("", v)]);
    }
    let reasons = DropReason::LABELS.map(|r| format!("{{reason=\"{r}\"}}"));
    let drops: [(&str, u64); DropReason::COUNT] =
        std::array::from_fn(|i| (reasons[i].as_str(), st.drops[i]));
    family(
        out,
        "drops_total",
        "Packets the data plane dropped, by reason.",
        &drops,
    );
    let e = &s.evictions;
    family(
        out,
        "table_evictions_total",
        "Live entries pushed out of a full table (if this grows, raise the table's size under Tables in netcfg.json).",
        &[
            ("{table=\"flows\"}", e.flows),
            ("{table=\"instances\"}", e.instances),
            ("{table=\"services\"}", e.services),
            ("{table=\"jobs\"}", e.jobs),
        ],
    );
    family(
        out,
        "io_errors_total",
        "Failed TUN or tunnel socket reads and writes.",
        &[("", s.io.errors)],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_counters_only_with_an_overlay() {
        let tel = Telemetry::new("n", "c:1");
        let text = tel.metrics_text();
        assert!(!text.contains("oak_overlay_"), "{text}");

        let mut snap = CounterSnapshot::default();
        snap.stats.from_tun = 7;
        snap.stats.to_peer = 5;
        snap.stats.hairpin = 2;
        snap.stats.queries = 3;
        snap.stats.query_timeouts = 1;
        snap.stats.drops[DropReason::BadIpChecksum.index()] = 4;
        snap.evictions.flows = 9;
        snap.evictions.jobs = 1;
        snap.io.errors = 6;
        let shared = Arc::new(SharedCounters::default());
        assert!(shared.publish(snap));
        tel.set_overlay(shared);
        let text = tel.metrics_text();
        for line in [
            "# TYPE oak_overlay_packets_total counter",
            "oak_overlay_packets_total{path=\"from_tun\"} 7",
            "oak_overlay_packets_total{path=\"to_peer\"} 5",
            "oak_overlay_packets_total{path=\"from_peer\"} 0",
            "oak_overlay_packets_total{path=\"hairpin\"} 2",
            "oak_overlay_table_queries_total 3",
            "oak_overlay_query_timeouts_total 1",
            "oak_overlay_icmp_sent_total 0",
            "oak_overlay_drops_total{reason=\"bad_ip_checksum\"} 4",
            "oak_overlay_drops_total{reason=\"malformed_not_ipv4\"} 0",
            "oak_overlay_table_evictions_total{table=\"flows\"} 9",
            "oak_overlay_table_evictions_total{table=\"jobs\"} 1",
            "oak_overlay_io_errors_total 6",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        let drops = text
            .lines()
            .filter(|l| l.starts_with("oak_overlay_drops_total{"))
            .count();
        assert_eq!(drops, DropReason::COUNT);
        // Each metric is declared once, samples follow their own TYPE line.
        for name in ["packets_total", "drops_total", "table_evictions_total"] {
            let t = format!("# TYPE oak_overlay_{name} counter");
            assert_eq!(text.matches(&t).count(), 1, "{name}");
        }
        // The worker's own metrics are still there.
        assert!(text.contains("oak_worker_containerd_up 0"), "{text}");
    }
}
