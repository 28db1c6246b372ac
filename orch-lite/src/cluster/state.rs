//! The cluster's model: registered workers, the jobs the root handed over, and their instances,
//! persisted in the [`Store`]. Every entry point (a registration, a decoded MQTT report, a root
//! call, a clock tick) takes `now` and returns [`Effect`]s — messages to publish, jobs whose
//! status the root should hear about — and never does I/O besides the store. The MQTT loop, the
//! HTTP threads and the ticker share one `Mutex<ClusterState>` and carry out the effects.

use super::instance::{self, Action, Event, Instance, Timeouts};
use super::metrics::Metrics;
use super::scheduler::{self, Candidate, Decision};
use crate::store::{Durability, Store};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use worker::protocol::{self, topic, DeleteCommand, JobStatus, NodeInfo, ResourcesReport, Status};

const NODES: &str = "nodes";
const JOBS: &str = "jobs";
const INSTANCES: &str = "instances";
const META: &str = "meta";

/// What the I/O shells must do after a state change.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish at QoS 1, not retained.
    Publish { topic: String, payload: Vec<u8> },
    /// An instance of this job changed status: push it to the root now.
    JobChanged(String),
}

fn publish<T: Serialize>(topic: String, body: &T) -> Effect {
    Effect::Publish {
        topic,
        // Serializing our own plain structs cannot fail; an empty payload would only be ignored.
        payload: serde_json::to_vec(body).unwrap_or_default(),
    }
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub name: String,
    /// What identifies the machine: `machine:<machine_id>` or, for stock workers, `ip:<addr>`.
    pub machine: String,
    /// Registration document merged with the latest `information` report (token removed).
    pub info: NodeInfo,
    pub registered_ms: u64,
    /// Unix ms of the last `information` or `jobs/resources` (not persisted: reset to the load
    /// time on restart, so workers get a full timeout to reconnect).
    #[serde(skip)]
    pub last_seen_ms: u64,
}

/// Why a registration is refused: HTTP status and a message for the operator.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub cluster_name: String,
    pub join_token: Option<String>,
    pub timeouts: Timeouts,
}

pub struct ClusterState {
    pub cfg: StateConfig,
    store: Store,
    nodes: BTreeMap<String, Node>,
    jobs: BTreeMap<String, Value>,
    instances: BTreeMap<String, Instance>,
    pub metrics: Arc<Metrics>,
    id_seed: [u8; 5],
    id_counter: u32,
    broker: BrokerLink,
    /// When [`ClusterState::tick`] last ran, to notice that this process itself stood still.
    last_tick_ms: Option<u64>,
}

/// The cluster's own connection to the MQTT broker, as liveness needs it: while the cluster
/// cannot hear anyone, a worker's silence is not the worker's fault, so it must not fail the
/// worker's instances (a broker restart would otherwise kill every running instance of the
/// cluster after the node timeout, and the cluster would redeploy them).
#[derive(Debug, Clone, Copy, PartialEq)]
enum BrokerLink {
    /// Connected since this unix ms: nothing could be heard before it.
    Up { since: u64 },
    /// Disconnected since this unix ms: silence is judged as of that moment.
    Down { since: u64 },
}

/// A gap between two ticks (every 500 ms) longer than this means the cluster did not run:
/// stopped (SIGSTOP), a suspended VM, a starved host. With the embedded broker nobody could
/// reach it meanwhile either.
const STALL_MS: u64 = 3_000;

/// A 24-hex id shaped like a MongoDB ObjectId (seconds, 5 random bytes, counter), because
/// upstream's clients and the NetManager's service manager expect that shape.
fn object_id(now_ms: u64, seed: &[u8; 5], counter: u32) -> String {
    let secs = (now_ms / 1000) as u32;
    let c = counter.to_be_bytes();
    let mut s = format!("{secs:08x}");
    for b in seed.iter().chain(&c[1..]) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn random_seed() -> [u8; 5] {
    use std::io::Read;
    let mut seed = [0u8; 5];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .is_err()
    {
        // Uniqueness within this store still holds: ids are checked against existing ones.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        seed[..4].copy_from_slice(&t.to_be_bytes());
        seed[4] = std::process::id() as u8;
    }
    seed
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response times.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A job or node id from a URL or a topic: it ends up in topics and store keys.
pub fn valid_id(id: &str) -> bool {
    protocol::valid_node_id(id)
}

fn virtualization_of(job: &Value) -> String {
    match job.get("virtualization").and_then(Value::as_str) {
        None | Some("") | Some("container") => "docker".into(),
        Some(v) => v.into(),
    }
}

impl ClusterState {
    /// Loads the state from the store. Node liveness and instance timers restart at `now`.
    pub fn load(store: Store, cfg: StateConfig, metrics: Arc<Metrics>, now: u64) -> ClusterState {
        let mut nodes: BTreeMap<String, Node> = store.all::<Node>(NODES).into_iter().collect();
        for n in nodes.values_mut() {
            n.last_seen_ms = now;
        }
        let jobs = store.all::<Value>(JOBS).into_iter().collect();
        let mut instances: BTreeMap<String, Instance> =
            store.all::<Instance>(INSTANCES).into_iter().collect();
        for i in instances.values_mut() {
            // Timers restart: the time the cluster was down is nobody's fault.
            i.since_ms = now;
            if i.last_report_ms != 0 {
                i.last_report_ms = now;
            }
        }
        log::info!(
            "cluster state: {} workers, {} jobs, {} instances loaded",
            nodes.len(),
            jobs_len(&jobs),
            instances.len()
        );
        ClusterState {
            cfg,
            store,
            nodes,
            jobs,
            instances,
            metrics,
            id_seed: random_seed(),
            id_counter: 0,
            broker: BrokerLink::Up { since: now },
            last_tick_ms: None,
        }
    }

    /// The cluster lost its broker connection: liveness and instance timers stop until
    /// [`broker_up`](Self::broker_up).
    pub fn broker_down(&mut self, now: u64) {
        if let BrokerLink::Up { .. } = self.broker {
            self.broker = BrokerLink::Down { since: now };
        }
    }

    /// The cluster is connected again: workers get a full node timeout from now to be heard
    /// (their `last_seen` stays what it was, so the status shows the real silence), and the
    /// instances' report timers restart, as after a cluster restart.
    pub fn broker_up(&mut self, now: u64) {
        if let BrokerLink::Down { since } = self.broker {
            log::info!(
                "broker connection back after {} s: worker liveness and instance timers restart",
                now.saturating_sub(since) / 1000
            );
            for i in self.instances.values_mut() {
                i.since_ms = i.since_ms.max(now);
                if i.last_report_ms != 0 {
                    i.last_report_ms = i.last_report_ms.max(now);
                }
            }
        }
        self.broker = BrokerLink::Up { since: now };
    }

    /// The moment a worker was last heard of as liveness counts it: never before the cluster's
    /// broker connection came up, and with the clock stopped while it is down.
    fn heard_ms(&self, last_seen_ms: u64) -> u64 {
        match self.broker {
            BrokerLink::Up { since } => last_seen_ms.max(since),
            BrokerLink::Down { .. } => last_seen_ms,
        }
    }

    /// `now` as liveness sees it: frozen at the disconnection while the broker is away.
    fn liveness_now(&self, now: u64) -> u64 {
        match self.broker {
            BrokerLink::Up { .. } => now,
            BrokerLink::Down { since } => since.min(now),
        }
    }

    fn persist<T: Serialize + ?Sized>(&mut self, table: &str, key: &str, doc: &T) {
        if let Err(e) = self.store.put(table, key, doc, Durability::Sync) {
            Metrics::inc(&self.metrics.store_errors);
            log::error!("{e}");
        }
    }

    fn unpersist(&mut self, table: &str, key: &str) {
        if let Err(e) = self.store.delete(table, key, Durability::Sync) {
            Metrics::inc(&self.metrics.store_errors);
            log::error!("{e}");
        }
    }

    fn new_id(&mut self, now: u64) -> String {
        loop {
            self.id_counter = self.id_counter.wrapping_add(1);
            let id = object_id(now, &self.id_seed, self.id_counter);
            if !self.nodes.contains_key(&id) {
                return id;
            }
        }
    }

    /// The cluster id the root gave us, if registered.
    pub fn cluster_id(&self) -> Option<String> {
        self.store.get::<String>(META, "cluster_id")
    }

    pub fn set_cluster_id(&mut self, id: &str) {
        if self.cluster_id().as_deref() != Some(id) {
            self.persist(META, "cluster_id", id);
        }
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub fn instance(&self, job_id: &str, n: u64) -> Option<&Instance> {
        self.instances.get(&instance::instance_key(job_id, n))
    }

    fn active(&self, n: &Node, now: u64) -> bool {
        self.liveness_now(now)
            .saturating_sub(self.heard_ms(n.last_seen_ms))
            < self.cfg.timeouts.node_silence_ms
    }

    // ---------------------------------------------------------------- registration

    /// `POST /api/node/register`. `remote_ip` is the TCP peer, the identity of stock workers.
    pub fn register(
        &mut self,
        mut info: NodeInfo,
        remote_ip: Option<&str>,
        now: u64,
    ) -> Result<String, Refusal> {
        let refuse = |m: &Metrics, status: u16, message: String| {
            Metrics::inc(&m.registrations_refused);
            Err(Refusal { status, message })
        };
        if let Some(expected) = &self.cfg.join_token {
            let given = info.token.as_deref().unwrap_or("");
            if !same_secret(given, expected) {
                let why = if given.is_empty() { "missing" } else { "wrong" };
                return refuse(
                    &self.metrics,
                    401,
                    format!("join token {why}: this cluster requires OAK_JOIN_TOKEN; set the same token on the worker (registration field \"token\")"),
                );
            }
        }
        let name = info.host.trim().to_string();
        if name.is_empty() || name.len() > 253 || name.chars().any(char::is_control) {
            return refuse(
                &self.metrics,
                400,
                format!("registration needs a node name in \"host\" (1-253 printable characters), got {:?}; set OAK_NODE_NAME on the worker", info.host),
            );
        }
        let machine = match (info.machine_id.as_deref().map(str::trim), remote_ip) {
            (Some(m), _) if !m.is_empty() => format!("machine:{m}"),
            (_, Some(ip)) => format!("ip:{ip}"),
            _ => format!("ip:{}", info.ip),
        };
        info.token = None;
        info.id = String::new();

        let existing = self.nodes.values().find(|n| n.name == name).cloned();
        let id = match existing {
            Some(n) if n.machine == machine => n.id,
            Some(n) if self.active(&n, now) => {
                return refuse(
                    &self.metrics,
                    409,
                    format!(
                        "node name {name:?} is already registered by another machine ({}, last seen {} s ago); give this machine another name (OAK_NODE_NAME) or stop the other one and retry after {} s",
                        n.machine,
                        now.saturating_sub(n.last_seen_ms) / 1000,
                        self.cfg.timeouts.node_silence_ms / 1000
                    ),
                );
            }
            Some(old) => {
                // The previous holder is gone: the name moves to the new machine under a new id,
                // so a late message from the old one cannot be mistaken for the new one.
                log::warn!(
                    "node name {name:?} moves from {} ({}) to a new machine {machine}",
                    old.id,
                    old.machine
                );
                self.nodes.remove(&old.id);
                self.unpersist(NODES, &old.id);
                self.new_id(now)
            }
            None => self.new_id(now),
        };
        let node = Node {
            id: id.clone(),
            name: name.clone(),
            machine,
            info,
            registered_ms: self.nodes.get(&id).map_or(now, |n| n.registered_ms),
            last_seen_ms: now,
        };
        self.persist(NODES, &id, &node);
        self.nodes.insert(id.clone(), node);
        Metrics::inc(&self.metrics.registrations);
        log::info!("worker {name:?} registered as {id}");
        Ok(id)
    }

    // ---------------------------------------------------------------- MQTT reports

    fn unknown_node(&self, node_id: &str) -> Vec<Effect> {
        Metrics::inc(&self.metrics.unknown_node_messages);
        log::debug!("message from unregistered node {node_id}");
        vec![publish(
            topic::error(node_id),
            &protocol::ControlError {
                message: "Node not registered to the cluster".into(),
            },
        )]
    }

    /// `nodes/<id>/information`: liveness and the dynamic resource fields.
    pub fn on_information(&mut self, node_id: &str, report: NodeInfo, now: u64) -> Vec<Effect> {
        let Some(n) = self.nodes.get_mut(node_id) else {
            return self.unknown_node(node_id);
        };
        n.last_seen_ms = now;
        let i = &mut n.info;
        // Only the dynamic fields (spec worker-protocol §4.2); upstream's empty host/port/
        // architecture would otherwise wipe the registration values.
        if !report.ip.is_empty() {
            i.ip = report.ip;
        }
        i.cpu_percent = report.cpu_percent;
        i.memory_percent = report.memory_percent;
        if report.vcpus > 0 {
            i.vcpus = report.vcpus;
        }
        i.memory = report.memory;
        i.gpu_usage = report.gpu_usage;
        i.vgpus = report.vgpus;
        i.gpu_temp = report.gpu_temp;
        i.vram_percent = report.vram_percent;
        i.vram = report.vram;
        if let Some(v) = report.virtualization.filter(|v| !v.is_empty()) {
            i.virtualization = Some(v);
        }
        Vec::new()
    }

    /// The root's id of the job called `job_name`.
    pub fn job_id_by_name(&self, job_name: &str) -> Option<String> {
        self.jobs
            .iter()
            .find(|(_, j)| j.get("job_name").and_then(Value::as_str) == Some(job_name))
            .map(|(id, _)| id.clone())
    }

    fn find_instance_by_name(&self, job_name: &str, n: u64) -> Option<String> {
        self.jobs
            .iter()
            .filter(|(_, j)| j.get("job_name").and_then(Value::as_str) == Some(job_name))
            .map(|(id, _)| instance::instance_key(id, n))
            .find(|k| self.instances.contains_key(k))
    }

    /// `nodes/<id>/job`: a status change reported by the worker.
    pub fn on_job_status(&mut self, node_id: &str, report: JobStatus, now: u64) -> Vec<Effect> {
        if !self.nodes.contains_key(node_id) {
            return self.unknown_node(node_id);
        }
        let key = self.find_instance_by_name(&report.sname, report.instance);
        let Some(key) = key.filter(|k| {
            self.instances.get(k).and_then(|i| i.worker_id.as_deref()) == Some(node_id)
        }) else {
            Metrics::inc(&self.metrics.stale_reports);
            log::debug!(
                "worker {node_id} reports {} for {}.instance.{} which is not placed there; ignored",
                report.status,
                report.sname,
                report.instance
            );
            return Vec::new();
        };
        self.drive(
            &key,
            &Event::WorkerStatus {
                status: report.status,
                detail: &report.status_detail,
                publicip: &report.publicip,
            },
            now,
        )
    }

    /// `nodes/<id>/jobs/resources`: the per-instance heartbeat and metrics. Instances the cluster
    /// does not place on this worker are told to stop (how upstream garbage-collects).
    pub fn on_resources(
        &mut self,
        node_id: &str,
        report: ResourcesReport,
        now: u64,
    ) -> Vec<Effect> {
        let Some(n) = self.nodes.get_mut(node_id) else {
            return self.unknown_node(node_id);
        };
        n.last_seen_ms = now;
        let mut effects = Vec::new();
        for s in report.services {
            let key = self
                .find_instance_by_name(&s.job_name, s.instance)
                .filter(|k| {
                    self.instances.get(k).and_then(|i| i.worker_id.as_deref()) == Some(node_id)
                });
            let Some(key) = key else {
                log::info!(
                    "worker {node_id} runs {}.instance.{} which this cluster does not place there: asking it to stop",
                    s.job_name,
                    s.instance
                );
                effects.push(publish(
                    topic::delete(node_id),
                    &DeleteCommand {
                        job_name: s.job_name.clone(),
                        virtualization: if s.virtualization.is_empty() {
                            "docker".into()
                        } else {
                            s.virtualization.clone()
                        },
                        instance_number: s.instance,
                    },
                ));
                continue;
            };
            if let Some(i) = self.instances.get_mut(&key) {
                i.cpu_percent = s.cpu_percent;
                i.memory_percent = s.memory_percent;
                i.disk = s.disk;
                i.logs = s.logs;
            }
            effects.extend(self.drive(&key, &Event::Listed, now));
        }
        effects
    }

    // ---------------------------------------------------------------- root calls

    /// `POST /api/service/<job_id>/<n>` from the root: store the job, create the instance and
    /// schedule it. Idempotent: the root retries (CLUSTER_CONTRACT §2.1).
    pub fn deploy(
        &mut self,
        job_id: &str,
        n: u64,
        mut job: Value,
        now: u64,
    ) -> Result<Vec<Effect>, String> {
        if !valid_id(job_id) {
            return Err(format!(
                "job id {job_id:?} is not a valid id (letters, digits, '-', '_')"
            ));
        }
        let Some(obj) = job.as_object_mut() else {
            return Err("the body must be the job document (a JSON object)".into());
        };
        let name = obj.get("job_name").and_then(Value::as_str).unwrap_or("");
        if !protocol::valid_job_name(name) {
            return Err(format!(
                "job_name {name:?} is not <app>.<appns>.<service>.<servicens> (4 non-empty parts of letters, digits, '-' or '_')"
            ));
        }
        obj.insert("_id".into(), Value::String(job_id.into()));
        let req = scheduler::request_from_job(&job)?;
        let key = instance::instance_key(job_id, n);
        let known_job = self.jobs.get(job_id) == Some(&job);
        if !known_job {
            self.persist(JOBS, job_id, &job);
            self.jobs.insert(job_id.to_string(), job);
        }
        if self.instances.contains_key(&key) {
            return Ok(Vec::new());
        }
        let inst = Instance::new(job_id, n, req.vcpus, req.memory, now);
        self.persist(INSTANCES, &key, &inst);
        self.instances.insert(key.clone(), inst);
        let mut effects = vec![Effect::JobChanged(job_id.to_string())];
        effects.extend(self.schedule(&key, now));
        Ok(effects)
    }

    /// `DELETE /api/service/<job_id>/<n|-1>`: stop on the worker and forget. Unknown → no-op.
    pub fn undeploy(&mut self, job_id: &str, n: Option<u64>) -> Vec<Effect> {
        let keys: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, i)| i.job_id == job_id && n.map_or(true, |n| i.instance_number == n))
            .map(|(k, _)| k.clone())
            .collect();
        let job = self.jobs.get(job_id).cloned().unwrap_or(Value::Null);
        let job_name = job.get("job_name").and_then(Value::as_str).unwrap_or("");
        let mut effects = Vec::new();
        // Workers that talk to this job keep its instances in their data planes until told to
        // re-query (upstream's service manager publishes this on every undeploy, spec overlay
        // §4.4); without it, new flows keep going to the removed instance. The root dropped the
        // instance from its table before calling here, so the re-query sees the new list.
        if !keys.is_empty() && !job_name.is_empty() {
            effects.push(publish(
                netstack::control::topic::updates_available(job_name),
                &netstack::control::UpdatesAvailable {
                    kind: "UNDEPLOYMENT".into(),
                },
            ));
        }
        for k in keys {
            let Some(i) = self.instances.remove(&k) else {
                continue;
            };
            for w in i.worker_id.iter().chain(i.failed_on.iter()) {
                effects.push(publish(
                    topic::delete(w),
                    &DeleteCommand {
                        job_name: job_name.into(),
                        virtualization: virtualization_of(&job),
                        instance_number: i.instance_number,
                    },
                ));
            }
            self.unpersist(INSTANCES, &k);
            log::info!("instance {k} undeployed");
        }
        if !self.instances.values().any(|i| i.job_id == job_id)
            && self.jobs.remove(job_id).is_some()
        {
            self.unpersist(JOBS, job_id);
        }
        effects
    }

    // ---------------------------------------------------------------- scheduling and time

    fn candidates(&self, now: u64) -> Vec<Candidate<'_>> {
        let reserved = scheduler::reserved_by_node(
            self.instances
                .values()
                .filter(|i| i.holds_resources())
                .filter_map(|i| Some((i.worker_id.as_deref()?, i.vcpus, i.memory))),
        );
        self.nodes
            .values()
            .map(|n| {
                let (rv, rm) = reserved.get(n.id.as_str()).copied().unwrap_or_default();
                let used = n.info.memory_percent;
                let total = if used > 0.0 && used < 100.0 {
                    (n.info.memory as f64 / (1.0 - used / 100.0)) as u64
                } else {
                    n.info.memory
                };
                Candidate {
                    id: &n.id,
                    name: &n.name,
                    active: self.active(n, now),
                    virtualization: n.info.virtualization.as_deref().unwrap_or_default(),
                    architecture: &n.info.architecture,
                    csi_drivers: n
                        .info
                        .csi_drivers
                        .iter()
                        .flatten()
                        .map(|d| d.csi_driver_name.as_str())
                        .collect(),
                    vcpus: n.info.vcpus as f64,
                    memory_available: n.info.memory,
                    memory_total: total,
                    reserved_vcpus: rv,
                    reserved_memory: rm,
                }
            })
            .collect()
    }

    /// Runs the scheduler for one instance and publishes the deploy when it places it.
    fn schedule(&mut self, key: &str, now: u64) -> Vec<Effect> {
        let Some(inst) = self.instances.get(key) else {
            return Vec::new();
        };
        let Some(job) = self.jobs.get(&inst.job_id).cloned() else {
            return Vec::new();
        };
        let retry = inst.failed_on.is_some() || inst.attempts > 0;
        let mut req = match scheduler::request_from_job(&job) {
            Ok(r) => r,
            Err(e) => {
                let ev = Event::Unplaceable {
                    status: Status::NoQualifiedWorkerFound,
                    detail: &e,
                };
                return self.drive(key, &ev, now);
            }
        };
        req.avoid = inst.failed_on.clone();
        let n = inst.instance_number;
        let started = std::time::Instant::now();
        let decision = scheduler::schedule(&self.candidates(now), &req, &self.cfg.cluster_name);
        self.metrics.schedule_latency.observe(started.elapsed());
        match decision {
            Decision::Place { node_id } => {
                let (ip, port) = self
                    .nodes
                    .get(&node_id)
                    .map(|w| {
                        let port = if w.info.port.is_empty() {
                            "50011".to_string()
                        } else {
                            w.info.port.clone()
                        };
                        (w.info.ip.clone(), port)
                    })
                    .unwrap_or_default();
                let mut effects = self.drive(
                    key,
                    &Event::Placed {
                        worker_id: &node_id,
                        host_ip: &ip,
                        host_port: &port,
                    },
                    now,
                );
                let mut doc = job;
                if let Some(o) = doc.as_object_mut() {
                    o.insert("instance_number".into(), n.into());
                    o.insert("status".into(), Status::NodeScheduled.as_str().into());
                }
                effects.push(publish(topic::deploy(&node_id), &doc));
                Metrics::inc(&self.metrics.deploys);
                if retry {
                    Metrics::inc(&self.metrics.reschedules);
                }
                log::info!("instance {key} placed on worker {node_id}");
                effects
            }
            Decision::Reject { status, detail } => {
                Metrics::inc(&self.metrics.unplaceable);
                log::warn!("instance {key}: {status}: {detail}");
                self.drive(
                    key,
                    &Event::Unplaceable {
                        status,
                        detail: &detail,
                    },
                    now,
                )
            }
        }
    }

    /// Feeds one event to one instance's state machine and carries out the outcome.
    fn drive(&mut self, key: &str, ev: &Event, now: u64) -> Vec<Effect> {
        let Some(inst) = self.instances.get(key) else {
            return Vec::new();
        };
        let out = instance::step(inst, ev, now, &self.cfg.timeouts);
        let job_id = out.next.job_id.clone();
        let mut effects = Vec::new();
        if out.changed {
            if matches!(out.next.status, Status::Failed | Status::Dead) {
                Metrics::inc(&self.metrics.instances_failed);
                log::warn!(
                    "instance {key} {}: {}",
                    out.next.status,
                    out.next.status_detail
                );
            }
            self.persist(INSTANCES, key, &out.next);
            effects.push(Effect::JobChanged(job_id.clone()));
        }
        self.instances.insert(key.to_string(), out.next);
        for a in out.actions {
            match a {
                Action::Schedule => effects.extend(self.schedule(key, now)),
                Action::StopOn(w) => {
                    let job = self.jobs.get(&job_id).cloned().unwrap_or(Value::Null);
                    let n = self.instances.get(key).map_or(0, |i| i.instance_number);
                    effects.push(publish(
                        topic::delete(&w),
                        &DeleteCommand {
                            job_name: job
                                .get("job_name")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .into(),
                            virtualization: virtualization_of(&job),
                            instance_number: n,
                        },
                    ));
                }
            }
        }
        effects
    }

    /// Drives every instance's timeouts.
    pub fn tick(&mut self, now: u64) -> Vec<Effect> {
        if let BrokerLink::Down { .. } = self.broker {
            // Nothing the workers say can arrive, and nothing we send would: wait. The broker
            // link already stops the liveness clock, so this is no stall to forgive later.
            self.last_tick_ms = Some(now);
            return Vec::new();
        }
        self.forgive_own_stall(now);
        let keys: Vec<(String, Option<u64>)> = self
            .instances
            .iter()
            .map(|(k, i)| {
                let seen = i
                    .worker_id
                    .as_ref()
                    .and_then(|w| self.nodes.get(w))
                    .map(|n| self.heard_ms(n.last_seen_ms));
                (k.clone(), seen)
            })
            .collect();
        let mut effects = Vec::new();
        for (k, seen) in keys {
            effects.extend(self.drive(
                &k,
                &Event::Tick {
                    worker_last_seen: seen,
                },
                now,
            ));
        }
        effects
    }

    /// After the cluster stood still, the silence it measures is its own, as after a restart
    /// (see `load`): worker liveness and placed instances' timers move on by the gap (never
    /// past now),
    /// so workers get back the time they had. Without it, the first tick after a 60 s freeze
    /// failed every instance of every worker ("silent for 60 s") and stopped them, healthy ones
    /// included.
    fn forgive_own_stall(&mut self, now: u64) {
        let Some(last) = self.last_tick_ms.replace(now) else {
            return;
        };
        let gap = now.saturating_sub(last);
        if gap <= STALL_MS {
            return;
        }
        log::warn!(
            "the cluster did not run for {:.1} s (stopped or starved): worker and instance timeouts are extended by that time",
            gap as f64 / 1000.0
        );
        let later = |t: u64| t.saturating_add(gap).min(now);
        for n in self.nodes.values_mut() {
            n.last_seen_ms = later(n.last_seen_ms);
        }
        // Only the timers that wait for word from a worker; backoffs and scheduling retries
        // do not depend on anyone reaching the cluster.
        for i in self.instances.values_mut().filter(|i| i.holds_resources()) {
            i.since_ms = later(i.since_ms);
            if i.last_report_ms != 0 {
                i.last_report_ms = later(i.last_report_ms);
            }
        }
    }

    // ---------------------------------------------------------------- views

    /// Instance document in upstream's field names (what the root copies, §4.3).
    fn instance_doc(&self, i: &Instance) -> Value {
        json!({
            "instance_number": i.instance_number,
            "status": i.status,
            "status_detail": i.status_detail,
            "worker_id": i.worker_id.clone().unwrap_or_default(),
            "host_ip": i.host_ip,
            "host_port": i.host_port,
            "publicip": i.publicip,
            "cpu_percent": i.cpu_percent,
            "memory_percent": i.memory_percent,
            "disk": i.disk,
            "logs": i.logs,
        })
    }

    /// Job entries of the root report (§4.3): `_id`, `job_name`, job-level status, instances.
    pub fn job_entries(&self, only: Option<&[String]>) -> Vec<Value> {
        self.jobs
            .iter()
            .filter(|(id, _)| only.map_or(true, |o| o.contains(id)))
            .map(|(id, job)| {
                let insts: Vec<&Instance> = self
                    .instances
                    .values()
                    .filter(|i| &i.job_id == id)
                    .collect();
                // Upstream: RUNNING only when every instance runs; otherwise the latest change.
                let (status, detail) =
                    if !insts.is_empty() && insts.iter().all(|i| i.status == Status::Running) {
                        (Status::Running, String::new())
                    } else if let Some(i) = insts
                        .iter()
                        .filter(|i| i.status != Status::Running)
                        .max_by_key(|i| i.since_ms)
                    {
                        (i.status, i.status_detail.clone())
                    } else {
                        (Status::Undeployed, String::new())
                    };
                json!({
                    "_id": id,
                    "job_name": job.get("job_name").cloned().unwrap_or(Value::Null),
                    "status": status,
                    "status_detail": detail,
                    "instance_list": insts.iter().map(|i| self.instance_doc(i)).collect::<Vec<_>>(),
                })
            })
            .collect()
    }

    /// The periodic report to the root (`POST /api/information/<cid>`, §4.3): aggregates over
    /// active workers, per architecture, and every job.
    /// Workers currently counted active (reported within the silence timeout).
    pub fn active_nodes(&self, now: u64) -> usize {
        self.nodes.values().filter(|n| self.active(n, now)).count()
    }

    pub fn report(&self, now: u64) -> Value {
        let active: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| self.active(n, now))
            .collect();
        let aggregate = |nodes: &[&Node]| {
            let mean = |f: &dyn Fn(&NodeInfo) -> f64| {
                let vals: Vec<f64> = nodes
                    .iter()
                    .map(|n| f(&n.info))
                    .filter(|v| *v != 0.0)
                    .collect();
                if vals.is_empty() {
                    0.0
                } else {
                    vals.iter().sum::<f64>() / vals.len() as f64
                }
            };
            let mut virt: Vec<String> = nodes
                .iter()
                .flat_map(|n| n.info.virtualization.clone().unwrap_or_default())
                .collect();
            virt.sort();
            virt.dedup();
            let mut addons: Vec<String> = nodes
                .iter()
                .flat_map(|n| n.info.supported_addons.clone().unwrap_or_default())
                .collect();
            addons.sort();
            addons.dedup();
            let mut csi: Vec<String> = nodes
                .iter()
                .flat_map(|n| {
                    n.info
                        .csi_drivers
                        .iter()
                        .flatten()
                        .map(|d| d.csi_driver_name.clone())
                })
                .collect();
            csi.sort();
            csi.dedup();
            json!({
                "cpu_percent": mean(&|i| i.cpu_percent),
                "memory_percent": mean(&|i| i.memory_percent),
                "vram_percent": mean(&|i| i.vram_percent),
                "gpu_percent": mean(&|i| i.gpu_usage),
                "gpu_temp": mean(&|i| i.gpu_temp),
                "vcpus": nodes.iter().map(|n| n.info.vcpus).sum::<u64>(),
                "vgpus": nodes.iter().map(|n| n.info.vgpus).sum::<u64>(),
                "memory": nodes.iter().map(|n| n.info.memory).sum::<u64>(),
                "vram": nodes.iter().map(|n| n.info.vram).sum::<f64>(),
                "virtualization": virt,
                "supported_addons": addons,
                "gpu_drivers": Vec::<String>::new(),
                "csi_drivers": csi,
                "active_nodes": nodes.len(),
            })
        };
        let mut report = aggregate(&active);
        let mut per_arch: BTreeMap<String, Vec<&Node>> = BTreeMap::new();
        for n in &active {
            let arch = if n.info.architecture.is_empty() {
                "unknown"
            } else {
                &n.info.architecture
            };
            per_arch.entry(arch.to_string()).or_default().push(n);
        }
        report["aggregation_per_architecture"] = per_arch
            .iter()
            .map(|(a, ns)| (a.clone(), aggregate(ns)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        report["jobs"] = self.job_entries(None).into();
        report
    }

    /// `GET /api/cluster/status`: upstream's three keys plus workers, instances and counters.
    pub fn status(&self, now: u64) -> Value {
        let nodes: Vec<Value> = self
            .nodes
            .values()
            .map(|n| {
                json!({
                    "id": n.id, "name": n.name, "ip": n.info.ip, "machine": n.machine,
                    "active": self.active(n, now),
                    "vcpus": n.info.vcpus, "memory": n.info.memory,
                    "cpu_percent": n.info.cpu_percent, "memory_percent": n.info.memory_percent,
                    "architecture": n.info.architecture,
                    "virtualization": n.info.virtualization.clone().unwrap_or_default(),
                    "last_seen_s_ago": now.saturating_sub(n.last_seen_ms) / 1000,
                })
            })
            .collect();
        let instances: Vec<Value> = self
            .instances
            .values()
            .map(|i| {
                let mut d = self.instance_doc(i);
                d["job_id"] = i.job_id.clone().into();
                d["job_name"] = self
                    .jobs
                    .get(&i.job_id)
                    .and_then(|j| j.get("job_name").cloned())
                    .unwrap_or(Value::Null);
                d["attempts"] = i.attempts.into();
                d
            })
            .collect();
        json!({
            "cluster_name": self.cfg.cluster_name,
            "cluster_id": self.cluster_id(),
            "nodes": nodes,
            "active_nodes": self.nodes.values().filter(|n| self.active(n, now)).count(),
            "jobs": jobs_len(&self.jobs),
            "instances": instances,
            "counters": self.metrics.json(),
        })
    }

    /// Gauges for `/metrics`.
    pub fn gauges(&self, now: u64) -> Vec<(&'static str, &'static str, f64)> {
        let running = self
            .instances
            .values()
            .filter(|i| i.status == Status::Running)
            .count();
        vec![
            ("workers", "registered workers", self.nodes.len() as f64),
            (
                "workers_active",
                "workers heard from within the node timeout",
                self.nodes.values().filter(|n| self.active(n, now)).count() as f64,
            ),
            (
                "instances",
                "instances held by this cluster",
                self.instances.len() as f64,
            ),
            ("instances_running", "instances in RUNNING", running as f64),
        ]
    }

    /// Flushes lazy writes (called on the ticker).
    pub fn sync(&mut self) {
        if let Err(e) = self.store.sync() {
            log::error!("{e}");
        }
    }
}

fn jobs_len(jobs: &BTreeMap<String, Value>) -> usize {
    jobs.len()
}

#[cfg(test)]
mod tests;
