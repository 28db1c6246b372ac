//! The worker's cluster session: registers over HTTP(S) (retrying with backoff), keeps the MQTT
//! client on the cluster's broker, publishes `information` and `jobs/resources` every report
//! interval and each instance status change on `job`, and hands deploy/delete commands to the
//! runtime boundary. It re-registers after every broker reconnect and on `control/error`
//! (spec §2.3, §13.1). With the overlay (`auto`), it carries the overlay's MQTT messages on
//! the same connection through `overlay::SessionLink`. It does not run instances and does not
//! wait on the runtime.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_executor::{LocalExecutor, Task};
use async_io::Timer;
use futures_lite::{FutureExt, StreamExt};

use crate::backoff::{self, Backoff};
use crate::mqtt::client::{self, Event as MqttEvent, Handle, Outgoing};
use crate::outbox::Outbox;
use crate::overlay::{self, MqttOp, SessionLink, ToOverlay};
use crate::protocol::{self, topic, CsiDriverInfo, JobStatus, NodeInfo, ResourcesReport};
use crate::register::{self, Registration};
use crate::runtime_link::{self, StatusChange};
use crate::sysinfo::{self, cgroup, Host, Sampler};
use crate::telemetry::{self, Broker, Telemetry};
use crate::tls;

#[derive(Debug, Clone)]
pub struct Config {
    pub cluster_address: String,
    pub cluster_port: u16,
    /// HTTPS registration (`cluster_ssl`): how the cluster's certificate is verified.
    pub register_tls: Option<tls::Connector>,
    /// MQTTS: set when a client certificate or `OAK_MQTT_CA` is configured.
    pub mqtt_tls: Option<tls::Connector>,
    /// `host` in the node document: the cluster's registration key.
    pub node_name: String,
    /// `port` in the node document, a string as upstream sends it (`MY_PORT`, default "3000").
    pub node_port: String,
    /// `OAK_PUBLIC_ADDRESS`; otherwise the default-route IPv4 is advertised.
    pub public_address: Option<String>,
    pub virtualization: Vec<String>,
    pub addons: Vec<String>,
    pub csi_drivers: Vec<CsiDriverInfo>,
    pub join_token: Option<String>,
    pub overlay_socket: String,
    pub log_directory: String,
    pub report_interval: Duration,
    pub register_timeout: Duration,
    pub register_backoff: (Duration, Duration),
    /// Minimum time between re-registrations caused by `control/error`: the cluster may send
    /// one per `information` report (spec §13.1), which must not become a registration storm.
    pub error_reregister_interval: Duration,
    pub outbox_capacity: usize,
    pub runtime_capacity: usize,
    pub mqtt_reconnect_max: Duration,
}

impl Config {
    pub fn new(cluster_address: &str, cluster_port: u16, node_name: &str) -> Config {
        Config {
            cluster_address: cluster_address.into(),
            cluster_port,
            register_tls: None,
            mqtt_tls: None,
            node_name: node_name.into(),
            node_port: "3000".into(),
            public_address: None,
            virtualization: vec!["docker".into()],
            addons: Vec::new(),
            csi_drivers: Vec::new(),
            join_token: None,
            overlay_socket: crate::config::DEFAULT_NETMANAGER_SOCKET.into(),
            log_directory: "/tmp".into(),
            report_interval: Duration::from_millis(crate::config::DEFAULT_REPORT_INTERVAL_MS),
            register_timeout: Duration::from_secs(10),
            register_backoff: (Duration::from_secs(1), Duration::from_secs(60)),
            error_reregister_interval: Duration::from_secs(30),
            outbox_capacity: 256,
            runtime_capacity: 64,
            mqtt_reconnect_max: Duration::from_secs(15),
        }
    }
}

impl Config {
    /// The session's settings from the worker's resolved configuration; `my_port` is upstream's
    /// `MY_PORT` environment variable. Reads the TLS files, so a bad certificate, key or CA
    /// stops the worker at start with the setting to fix instead of failing every reconnect.
    pub fn from_settings(
        st: &crate::config::Settings,
        my_port: Option<String>,
    ) -> Result<Config, tls::TlsError> {
        let mut c = Config::new(&st.cluster_address, st.cluster_port, &st.node_name);
        c.node_port = my_port
            .filter(|p| !p.trim().is_empty())
            .unwrap_or_else(|| "3000".into());
        c.public_address = st.public_address.clone();
        c.virtualization = st.virtualizations.clone();
        c.addons = st.addons.clone();
        c.join_token = st.join_token.clone();
        c.log_directory = st.app_logs.display().to_string();
        c.report_interval = st.report_interval;
        if let crate::config::NetworkMode::Manual(sock) = &st.network {
            c.overlay_socket = sock.display().to_string();
        }
        fn setting<'a>(name: &'static str, path: &'a Option<PathBuf>) -> Option<tls::Setting<'a>> {
            path.as_deref().map(|path| tls::Setting { name, path })
        }
        let mqtt_ca = setting("OAK_MQTT_CA", &st.mqtt_ca);
        let identity = tls::Identity::load(
            setting("OAK_MQTT_CERT", &st.mqtt_cert),
            setting("OAK_MQTT_KEY", &st.mqtt_key),
        )?;
        if identity.is_some() || mqtt_ca.is_some() {
            c.mqtt_tls = Some(tls::Connector::new(
                mqtt_ca,
                "OAK_MQTT_CA",
                identity,
                "set OAK_MQTT_CERT and OAK_MQTT_KEY (or `NodeEngine config auth -c <cert> -k <key>`)",
            )?);
        }
        if st.cluster_ssl {
            // One private CA usually signs both the cluster's HTTPS front and its broker, so
            // OAK_MQTT_CA also serves registration unless OAK_CLUSTER_CA says otherwise.
            let ca = setting("OAK_CLUSTER_CA", &st.cluster_ca).or(mqtt_ca);
            c.register_tls = Some(tls::Connector::new(
                ca,
                "OAK_CLUSTER_CA",
                None,
                "registration presents no client certificate (as upstream): let the cluster's \
                 HTTPS front accept clients without one",
            )?);
        }
        Ok(c)
    }
}

/// Messages from the registration task.
enum RegResult {
    Failed(String),
    Done(Registration),
}

struct Session<'ex> {
    cfg: Config,
    tel: Arc<Telemetry>,
    ex: &'ex LocalExecutor<'static>,
    rt: runtime_link::SessionSide,
    rt_alive: bool,
    host: Rc<Host>,
    sampler: Sampler,
    ip: String,
    reg: Option<Registration>,
    registering: Option<Task<()>>,
    reg_tx: Sender<RegResult>,
    reg_rx: Receiver<RegResult>,
    last_error_reregister: Option<Instant>,
    client: Option<Handle>,
    client_task: Option<Task<()>>,
    connected: bool,
    ever_connected: bool,
    outbox: Outbox,
    overlay: Option<SessionLink>,
}

/// Runs the session until `stop` completes, then says goodbye to the broker (DISCONNECT, at
/// most one second). Spawns its helpers on `ex`, which must be running.
pub async fn run(
    cfg: Config,
    rt: runtime_link::SessionSide,
    tel: Arc<Telemetry>,
    ex: &LocalExecutor<'static>,
    stop: impl std::future::Future<Output = ()>,
) {
    run_with_overlay(cfg, rt, tel, ex, stop, None).await
}

/// [`run`], also carrying the overlay's messages (`OAK_NETWORK=auto`).
pub async fn run_with_overlay(
    cfg: Config,
    rt: runtime_link::SessionSide,
    tel: Arc<Telemetry>,
    ex: &LocalExecutor<'static>,
    stop: impl std::future::Future<Output = ()>,
    overlay: Option<SessionLink>,
) {
    let host = Host::probe();
    if !host.cgroup.memory {
        log::warn!("{}", cgroup::MEMORY_OFF_HINT);
    }
    tel.set_cgroup(host.cgroup.clone());
    let (reg_tx, reg_rx) = async_channel::bounded(4);
    let mut s = Session {
        ip: sysinfo::node_ip(cfg.public_address.as_deref()),
        outbox: Outbox::new(cfg.outbox_capacity),
        cfg,
        tel,
        ex,
        rt,
        rt_alive: true,
        host: Rc::new(host),
        sampler: Sampler::default(),
        reg: None,
        registering: None,
        reg_tx,
        reg_rx,
        last_error_reregister: None,
        client: None,
        client_task: None,
        connected: false,
        ever_connected: false,
        overlay,
    };
    if s.ip.is_empty() {
        log::warn!("no non-loopback IPv4 address found; set OAK_PUBLIC_ADDRESS");
    }
    s.start_registration("start");
    s.run().or(stop).await;
    log::info!("stopping the cluster session");
    s.registering = None;
    if let Some(c) = s.client.take() {
        c.close();
    }
    if let Some(t) = s.client_task.take() {
        t.or(async {
            Timer::after(Duration::from_secs(1)).await;
        })
        .await;
    }
}

enum Wake {
    Tick,
    Reg(RegResult),
    Mqtt(Option<MqttEvent>),
    Runtime(Option<runtime_link::Event>),
    Overlay(Option<MqttOp>),
}

impl<'ex> Session<'ex> {
    async fn run(&mut self) {
        let mut ticker = Timer::interval(self.cfg.report_interval);
        loop {
            let wake = {
                let tick = async {
                    ticker.next().await;
                    Wake::Tick
                };
                let rt_events = &self.rt.events;
                let rt_alive = self.rt_alive;
                let runtime = async {
                    if rt_alive {
                        Wake::Runtime(rt_events.recv().await.ok())
                    } else {
                        std::future::pending().await
                    }
                };
                let mqtt_events = self.client.as_ref().map(|c| &c.events);
                let mqtt = async {
                    match mqtt_events {
                        Some(rx) => Wake::Mqtt(rx.recv().await.ok()),
                        None => std::future::pending().await,
                    }
                };
                let reg_rx = &self.reg_rx;
                let reg = async {
                    match reg_rx.recv().await {
                        Ok(r) => Wake::Reg(r),
                        // We hold a sender ourselves, so the channel never closes.
                        Err(_) => std::future::pending().await,
                    }
                };
                let overlay_ops = self.overlay.as_ref().map(|o| &o.ops);
                let overlay = async {
                    match overlay_ops {
                        Some(rx) => Wake::Overlay(rx.recv().await.ok()),
                        None => std::future::pending().await,
                    }
                };
                // Ticks first: a flood of messages must not starve the heartbeat.
                tick.or(runtime).or(mqtt).or(reg).or(overlay).await
            };
            match wake {
                Wake::Tick => self.on_tick(),
                Wake::Reg(r) => self.on_registration(r),
                Wake::Mqtt(Some(ev)) => self.on_mqtt(ev),
                Wake::Mqtt(None) => {
                    log::error!("MQTT client ended unexpectedly; starting a new one");
                    self.client = None;
                    self.connected = false;
                    if let Some(reg) = self.reg.clone() {
                        self.start_client(&reg);
                    }
                }
                Wake::Runtime(Some(ev)) => self.on_runtime(ev),
                Wake::Overlay(Some(op)) => self.on_overlay(op),
                Wake::Overlay(None) => {
                    log::error!("the overlay stopped; its MQTT messages are no longer carried");
                    self.overlay = None;
                }
                Wake::Runtime(None) => {
                    log::error!("the container runtime stopped; deploys will fail until the worker restarts");
                    self.rt_alive = false;
                }
            }
        }
    }

    /// The node document: registration (`full`) carries everything including the token; the
    /// `information` report carries the dynamic fields plus the static scalars, so the cluster's
    /// copy of host/port/architecture is not blanked as the Go worker's reports do (spec §3.4).
    fn node_document(&mut self, full: bool) -> NodeInfo {
        let sample = self.sampler.sample();
        let mut n = NodeInfo {
            host: self.cfg.node_name.clone(),
            ip: self.ip.clone(),
            port: self.cfg.node_port.clone(),
            virtualization: Some(self.cfg.virtualization.clone()),
            supported_addons: Some(self.cfg.addons.clone()),
            csi_drivers: Some(self.cfg.csi_drivers.clone()),
            overlay_socket: self.cfg.overlay_socket.clone(),
            log_directory: self.cfg.log_directory.clone(),
            cluster_address: self.cfg.cluster_address.clone(),
            token: if full {
                self.cfg.join_token.clone()
            } else {
                None
            },
            ..NodeInfo::default()
        };
        self.host.fill(&mut n, &sample, full, &self.cfg.node_name);
        n
    }

    fn start_registration(&mut self, why: &str) {
        if self.registering.is_some() {
            return;
        }
        log::info!(
            "registering with the cluster at {}:{} ({why})",
            self.cfg.cluster_address,
            self.cfg.cluster_port
        );
        self.tel
            .set_registration(telemetry::Registration::Registering, None);
        self.ip = sysinfo::node_ip(self.cfg.public_address.as_deref());
        let doc = self.node_document(true);
        let cfg = self.cfg.clone();
        let tx = self.reg_tx.clone();
        self.registering = Some(self.ex.spawn(async move {
            let mut backoff = Backoff::new(cfg.register_backoff.0, cfg.register_backoff.1);
            let mut attempt = 0u64;
            loop {
                attempt += 1;
                match register::register(
                    &cfg.cluster_address,
                    cfg.cluster_port,
                    cfg.register_tls.as_ref(),
                    &doc,
                    cfg.register_timeout,
                )
                .await
                {
                    Ok(r) => {
                        let _ = tx.send(RegResult::Done(r)).await;
                        return;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay(backoff::jitter());
                        log::warn!(
                            "registration attempt {attempt} failed: {e}; retrying in {} ms",
                            delay.as_millis()
                        );
                        if tx.send(RegResult::Failed(e.to_string())).await.is_err() {
                            return;
                        }
                        Timer::after(delay).await;
                    }
                }
            }
        }));
    }

    fn on_registration(&mut self, r: RegResult) {
        let reg = match r {
            RegResult::Failed(e) => {
                self.tel
                    .counters
                    .registration_failures
                    .fetch_add(1, Relaxed);
                self.tel.set_registration_error(&e);
                return;
            }
            RegResult::Done(reg) => reg,
        };
        self.registering = None;
        self.tel.counters.registrations.fetch_add(1, Relaxed);
        self.tel
            .set_registration(telemetry::Registration::Registered, Some(&reg.node_id));
        let changed = self.reg.as_ref() != Some(&reg);
        match &self.reg {
            None => log::info!("registered as node {} (broker port {})", reg.node_id, reg.mqtt_port),
            Some(old) if changed => log::warn!(
                "re-registered as node {} (broker port {}), was {} (port {}): moving to the new topics",
                reg.node_id, reg.mqtt_port, old.node_id, old.mqtt_port
            ),
            Some(_) => log::info!("re-registered as node {} (unchanged)", reg.node_id),
        }
        if changed || self.client.is_none() {
            self.reg = Some(reg.clone());
            // Before the client starts, so the overlay knows its node id when Connected comes.
            self.to_overlay(ToOverlay::Registered {
                node_id: reg.node_id.clone(),
            });
            self.start_client(&reg);
        }
    }

    fn start_client(&mut self, reg: &Registration) {
        if let Some(old) = self.client.take() {
            old.close();
        }
        self.connected = false;
        self.tel.set_broker(
            Broker::Disconnected,
            Some(&format!("{}:{}", self.cfg.cluster_address, reg.mqtt_port)),
        );
        let id = &reg.node_id;
        let subs = vec![topic::deploy(id), topic::delete(id), topic::error(id)];
        let mut cfg = client::Config::new(
            &self.cfg.cluster_address,
            reg.mqtt_port,
            &protocol::client_id(id),
            subs,
        );
        cfg.reconnect_max = self.cfg.mqtt_reconnect_max;
        cfg.tls = self.cfg.mqtt_tls.clone();
        let (handle, fut) = client::client(cfg, self.tel.mqtt.clone());
        if let Some(old) = self.client_task.replace(self.ex.spawn(fut)) {
            // The old client was closed above; let it send its DISCONNECT and end by itself.
            old.detach();
        }
        self.client = Some(handle);
    }

    fn publish(&self, topic: String, payload: Vec<u8>, resend: bool) -> bool {
        match &self.client {
            Some(c) if self.connected => c
                .try_publish(Outgoing {
                    topic,
                    payload,
                    resend,
                })
                .is_ok(),
            _ => false,
        }
    }

    /// A periodic report: sent if the client takes it now, otherwise skipped (never queued).
    fn periodic(
        &self,
        topic: String,
        payload: serde_json::Result<Vec<u8>>,
        sent: fn(&telemetry::Counters) -> &std::sync::atomic::AtomicU64,
    ) {
        match payload {
            Ok(p) => {
                let counter = if self.publish(topic, p, false) {
                    sent(&self.tel.counters)
                } else {
                    &self.tel.counters.reports_skipped
                };
                counter.fetch_add(1, Relaxed);
            }
            Err(e) => log::error!("cannot encode the report for {topic}: {e}"),
        }
    }

    fn on_tick(&mut self) {
        self.flush_outbox();
        let Some(id) = self.reg.as_ref().map(|r| r.node_id.clone()) else {
            return;
        };
        if !self.connected {
            self.tel.counters.reports_skipped.fetch_add(1, Relaxed);
            return;
        }
        let doc = self.node_document(false);
        self.periodic(topic::information(&id), serde_json::to_vec(&doc), |c| {
            &c.information_sent
        });
        self.request_sample();
    }

    /// Asks the runtime for a resources sample; it answers with `Event::Resources`, published
    /// as it arrives. The runtime coalesces requests, so asking often costs at most one sample.
    fn request_sample(&mut self) {
        if self.rt_alive
            && self
                .rt
                .commands
                .try_send(runtime_link::Command::Sample)
                .is_err()
        {
            self.tel.counters.runtime_queue_full.fetch_add(1, Relaxed);
        }
    }

    fn on_mqtt(&mut self, ev: MqttEvent) {
        match ev {
            MqttEvent::Connected => {
                self.connected = true;
                self.tel.set_broker(Broker::Connected, None);
                if self.ever_connected {
                    self.tel.counters.reconnects.fetch_add(1, Relaxed);
                    // The cluster may have lost us while we were away, and control/error does
                    // not reliably say so (spec §13.1): register again; same host, same id.
                    self.start_registration("broker reconnect");
                }
                self.ever_connected = true;
                self.to_overlay(ToOverlay::Connected);
                self.flush_outbox();
            }
            MqttEvent::Disconnected { reason } => {
                log::warn!("lost the broker: {reason}; status reports are queued until it is back");
                self.connected = false;
                self.tel.set_broker(Broker::Disconnected, None);
            }
            MqttEvent::SubscribeRefused { .. } => {
                self.tel
                    .counters
                    .subscriptions_refused
                    .fetch_add(1, Relaxed);
            }
            MqttEvent::Message { topic: t, payload } => self.on_message(&t, &payload),
        }
    }

    fn on_message(&mut self, t: &str, payload: &[u8]) {
        let own = self.reg.as_ref().map(|r| r.node_id.as_str());
        if self.overlay.is_some() && own.is_some_and(|id| overlay::is_overlay_topic(id, t)) {
            self.to_overlay(ToOverlay::Message {
                topic: t.to_string(),
                payload: payload.to_vec(),
            });
            return;
        }
        match topic::parse(t) {
            Some((id, kind)) if Some(id) == own => match kind {
                topic::Kind::Deploy => self.on_deploy(payload),
                topic::Kind::Delete => self.on_delete(payload),
                topic::Kind::Error => self.on_control_error(payload),
                _ => self.unexpected(t),
            },
            _ => self.unexpected(t),
        }
    }

    /// Hands a message to the overlay without waiting; a full link drops it (the overlay asks
    /// again: subnet and query retries, resubscription on connect).
    fn to_overlay(&self, m: ToOverlay) {
        if let Some(o) = &self.overlay {
            if o.to_overlay.try_send(m).is_err() {
                self.tel.counters.overlay_dropped.fetch_add(1, Relaxed);
                log::warn!("overlay busy: a message for it was dropped");
            }
        }
    }

    /// Carries out what the overlay asks. Its publishes are queued by the client even while
    /// disconnected (QoS 1, resent), unlike periodic reports.
    fn on_overlay(&mut self, op: MqttOp) {
        let Some(c) = &self.client else {
            self.tel.counters.overlay_dropped.fetch_add(1, Relaxed);
            return;
        };
        let ok = match op {
            MqttOp::Publish(out) => c.try_publish(out).is_ok(),
            MqttOp::Subscribe(f) => c.subscribe(f),
            MqttOp::Unsubscribe(f) => c.unsubscribe(f),
        };
        if !ok {
            self.tel.counters.overlay_dropped.fetch_add(1, Relaxed);
        }
    }

    fn unexpected(&self, t: &str) {
        self.tel.counters.unexpected_topic.fetch_add(1, Relaxed);
        log::warn!("ignoring a message on unexpected topic {t:?}");
    }

    fn on_deploy(&mut self, payload: &[u8]) {
        let failure = match protocol::DeployCommand::decode(payload) {
            Ok(cmd) => match cmd.validate() {
                Ok(()) => {
                    let (job, n) = (cmd.job_name.clone(), cmd.instance_number);
                    log::info!("deploy {job}.instance.{n} ({})", cmd.image);
                    match self
                        .rt
                        .commands
                        .try_send(runtime_link::Command::Deploy(cmd))
                    {
                        Ok(()) => return,
                        Err(async_channel::TrySendError::Full(_)) => {
                            self.tel.counters.runtime_queue_full.fetch_add(1, Relaxed);
                            self.report(
                                &job,
                                n,
                                protocol::Status::Failed,
                                "worker busy: too many deploys queued; the cluster will retry"
                                    .into(),
                            );
                        }
                        Err(async_channel::TrySendError::Closed(_)) => {
                            self.report(
                                &job,
                                n,
                                protocol::Status::Failed,
                                "the container runtime of this worker is not running".into(),
                            );
                        }
                    }
                    return;
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        self.tel.counters.malformed_deploy.fetch_add(1, Relaxed);
        match identify(payload) {
            Some((job, n)) => {
                log::warn!("refusing deploy of {job}.instance.{n}: {failure}");
                self.report(&job, n, protocol::Status::Failed, failure);
            }
            None => log::warn!("ignoring a deploy message without job_name/instance_number: {failure}; payload starts {:?}", excerpt(payload)),
        }
    }

    fn on_delete(&mut self, payload: &[u8]) {
        match protocol::decode::<protocol::DeleteCommand>(payload) {
            Ok(d) => {
                log::info!("delete {}.instance.{}", d.job_name, d.instance_number);
                if self
                    .rt
                    .commands
                    .try_send(runtime_link::Command::Delete(d))
                    .is_err()
                {
                    self.tel.counters.runtime_queue_full.fetch_add(1, Relaxed);
                    log::error!("delete dropped: the runtime queue is full or the runtime stopped; the cluster will resend it for a stale instance");
                }
            }
            Err(e) => {
                self.tel.counters.malformed_delete.fetch_add(1, Relaxed);
                log::warn!(
                    "ignoring a malformed delete message: {e}; payload starts {:?}",
                    excerpt(payload)
                );
            }
        }
    }

    fn on_control_error(&mut self, payload: &[u8]) {
        self.tel.counters.control_errors.fetch_add(1, Relaxed);
        let msg = match protocol::decode::<protocol::ControlError>(payload) {
            Ok(e) => e.message,
            Err(e) => {
                self.tel.counters.malformed_error.fetch_add(1, Relaxed);
                format!("(unreadable: {e})")
            }
        };
        let now = Instant::now();
        if self
            .last_error_reregister
            .is_some_and(|t| now < t + self.cfg.error_reregister_interval)
        {
            log::debug!("cluster error {msg:?} again; re-registered recently");
            return;
        }
        log::warn!("cluster says: {msg:?}; registering again");
        self.last_error_reregister = Some(now);
        self.start_registration("control/error");
    }

    fn report(&mut self, job: &str, instance: u64, status: protocol::Status, detail: String) {
        self.on_status(StatusChange {
            job_name: job.into(),
            instance,
            status,
            detail,
        });
    }

    fn on_runtime(&mut self, ev: runtime_link::Event) {
        match ev {
            runtime_link::Event::Status(s) => self.on_status(s),
            runtime_link::Event::Resources(services) => {
                let Some(id) = self.reg.as_ref().map(|r| r.node_id.clone()) else {
                    return;
                };
                // Never `null`: the stock cluster manager's MQTT loop dies on it (spec §13.4).
                let payload = serde_json::to_vec(&ResourcesReport { services });
                self.periodic(topic::resources(&id), payload, |c| &c.resources_sent);
            }
        }
    }

    fn on_status(&mut self, s: StatusChange) {
        if !s.status.reportable_by_worker() {
            // An unexpected status would crash the stock cluster manager (spec §13.4).
            self.tel
                .counters
                .invalid_runtime_status
                .fetch_add(1, Relaxed);
            log::error!(
                "not reporting status {} for {}.instance.{}: a worker may not send it",
                s.status,
                s.job_name,
                s.instance
            );
            return;
        }
        self.tel
            .instance(&s.job_name, s.instance, s.status, &s.detail);
        // The cluster marks an instance RUNNING when it first appears in a resources report:
        // sending one now instead of at the next tick takes up to a report interval off every
        // deploy, for one extra message per deploy.
        let started = s.status == protocol::Status::Created;
        let evicted = self.outbox.push(JobStatus {
            sname: s.job_name,
            status: s.status,
            status_detail: s.detail,
            instance: s.instance,
            publicip: self.ip.clone(),
        });
        if let Some(e) = evicted {
            self.tel.counters.status_queue_evicted.fetch_add(1, Relaxed);
            log::warn!(
                "status queue full: dropped {} for {}.instance.{}",
                e.status,
                e.sname,
                e.instance
            );
        }
        self.flush_outbox();
        if started && self.connected {
            self.request_sample();
        }
    }

    /// Hands queued status reports to the client, oldest first, while it takes them.
    fn flush_outbox(&mut self) {
        if let Some(id) = self.reg.as_ref().map(|r| r.node_id.clone()) {
            while let Some(s) = self.outbox.front() {
                let payload = match serde_json::to_vec(s) {
                    Ok(p) => p,
                    Err(e) => {
                        log::error!("cannot encode a status report: {e}");
                        self.outbox.pop_front();
                        continue;
                    }
                };
                if !self.publish(topic::job(&id), payload, true) {
                    break;
                }
                if let Some(s) = self.outbox.pop_front() {
                    log::info!(
                        "reported {} for {}.instance.{}",
                        s.status,
                        s.sname,
                        s.instance
                    );
                }
                self.tel.counters.status_reports_sent.fetch_add(1, Relaxed);
            }
        }
        self.tel.set_queued(self.outbox.len());
    }
}

/// Job name and instance of a deploy payload that failed to decode or validate, if it names
/// them plainly enough to report FAILED for that instance.
fn identify(payload: &[u8]) -> Option<(String, u64)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let job = v.get("job_name")?.as_str()?;
    if job.is_empty() || job.len() > 200 {
        return None;
    }
    let n = match v.get("instance_number")? {
        serde_json::Value::Number(n) => n.as_u64()?,
        serde_json::Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    Some((job.to_string(), n))
}

fn excerpt(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(80)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_only_plain_job_and_instance() {
        assert_eq!(
            identify(br#"{"job_name":"a.b.c.d","instance_number":2,"memory":"x"}"#),
            Some(("a.b.c.d".into(), 2))
        );
        assert_eq!(
            identify(br#"{"job_name":"a.b","instance_number":"3"}"#),
            Some(("a.b".into(), 3))
        );
        assert_eq!(identify(br#"{"job_name":"a.b.c.d"}"#), None);
        assert_eq!(identify(br#"{"job_name":5,"instance_number":1}"#), None);
        assert_eq!(identify(br#"{"job_name":"a","instance_number":-1}"#), None);
        assert_eq!(identify(b"[1,2]"), None);
        assert_eq!(identify(b"\xff\xfe"), None);
    }
}
