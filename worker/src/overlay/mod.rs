//! The overlay inside the worker (`OAK_NETWORK=auto`) or alone (`NetManager`): netstack's
//! data plane, plumbing and MQTT conversation, wired to an MQTT connection through a bounded
//! [`SessionLink`] and to the container runtime through [`crate::runtime::Network`]. It owns
//! the host state it creates (TUN, bridge, veths, one named netns per instance). Detach removes
//! an instance's part. A worker stop ([`Overlay::shutdown`]) leaves running instances wired:
//! containers outlive the worker, so their namespace, veth and address stay, and the next start
//! re-attaches them from the records under the state dir (same subnet, same addresses, tables
//! rebuilt, `service/deployed` sent again); only what no live instance uses is cleaned.
//! [`Overlay::teardown`] removes everything (the stand-alone NetManager's exit). It does not own
//! an MQTT connection: a cluster session (`auto`) or the local API's own client ([`api`],
//! `manual`) carries its messages.

pub mod api;
pub mod manual;
pub mod netns;
pub mod ports;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_io::Timer;
use futures_lite::{FutureExt, StreamExt};
use netstack::control::{self, JobName, NodeSubnet};
use netstack::dataplane::{
    Command, Dataplane, DataplaneConfig, DataplaneHandle, Event, SharedCounters,
};
use netstack::plumbing::{Plumbing, PlumbingConfig};
use netstack::session::{Output, Session};
use netstack::Millis;

use crate::mqtt::client::Outgoing;
use crate::runtime::{BoxFuture, Network};

/// Bound of both directions of the session link.
pub const LINK_CAPACITY: usize = 256;

#[derive(Debug, Clone)]
pub struct OverlayConfig {
    pub dataplane: DataplaneConfig,
    pub plumbing: PlumbingConfig,
    /// `OAK_PUBLIC_ADDRESS` (`NodePublicAddress`); None: the default-route IPv4, read at
    /// each deploy, as upstream re-detects it.
    pub public_address: Option<Ipv4Addr>,
    /// Where instance namespaces are mounted (`/run/netns`, where `ip netns` looks).
    pub netns_dir: PathBuf,
    /// Remembers the namespaces this worker made, so a restart removes only its own.
    pub state_dir: PathBuf,
    /// How long a deploy waits for the cluster to hand out this worker's subnet.
    pub subnet_wait: Duration,
    /// Jobs whose update topic may be subscribed at once.
    pub max_subscriptions: usize,
}

impl OverlayConfig {
    pub fn from_settings(st: &crate::config::Settings) -> Result<OverlayConfig, String> {
        let public_address = match st.public_address.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(a) => Some(a.parse().map_err(|_| {
                format!("OAK_PUBLIC_ADDRESS {a:?} is not an IPv4 address (the tunnel is IPv4)")
            })?),
        };
        let mut dataplane = DataplaneConfig {
            listen: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, st.tunnel_port),
            busy_poll_us: st.overlay_busy_poll_us,
            ..DataplaneConfig::default()
        };
        dataplane.proxy.capacity = st.overlay_tables.capacity();
        Ok(OverlayConfig {
            dataplane,
            plumbing: PlumbingConfig::default(),
            public_address,
            netns_dir: PathBuf::from("/run/netns"),
            state_dir: st.state_dir.join("overlay"),
            subnet_wait: Duration::from_secs(30),
            max_subscriptions: 512,
        })
    }
}

/// What the MQTT side tells the overlay.
#[derive(Debug, Clone, PartialEq)]
pub enum ToOverlay {
    /// The cluster knows this worker as `node_id` (after every registration; a new id starts
    /// a new conversation).
    Registered { node_id: String },
    /// The connection is (again) up: subscriptions were lost with the clean session.
    Connected,
    /// A message on one of the overlay's topics (see [`is_overlay_topic`]).
    Message { topic: String, payload: Vec<u8> },
}

/// What the overlay asks of the MQTT side.
#[derive(Debug, Clone, PartialEq)]
pub enum MqttOp {
    Publish(Outgoing),
    Subscribe(String),
    Unsubscribe(String),
}

/// The MQTT side's end of the link.
pub struct SessionLink {
    pub to_overlay: Sender<ToOverlay>,
    pub ops: Receiver<MqttOp>,
}

/// Messages the overlay wants: `nodes/<node>/net/…` answers and `jobs/<job>/updates_available`.
pub fn is_overlay_topic(node_id: &str, topic: &str) -> bool {
    control::topic::parse_updates_available(topic).is_some()
        || topic
            .strip_prefix("nodes/")
            .and_then(|r| r.strip_prefix(node_id))
            .is_some_and(|r| r.starts_with("/net/"))
}

/// Errors an operator can act on, as the runtime's FAILED detail.
#[derive(Debug)]
pub enum OverlayError {
    NoSubnet(Duration),
    JobName(String),
    Netns(String, std::io::Error),
    Plumbing(std::io::Error),
    Dataplane(String),
    NoAddress,
    Ports(String),
    Stopped,
}

impl std::fmt::Display for OverlayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OverlayError::NoSubnet(d) => write!(
                f,
                "the cluster did not give this worker an overlay subnet within {} s (is the cluster's service manager connected to its root?)",
                d.as_secs()
            ),
            OverlayError::JobName(e) => write!(f, "not usable on the overlay: {e}"),
            OverlayError::Netns(n, e) => write!(f, "network namespace {n}: {e}"),
            OverlayError::Plumbing(e) => write!(f, "overlay veth/bridge: {e}"),
            OverlayError::Dataplane(e) => write!(f, "overlay data plane: {e}"),
            OverlayError::NoAddress => f.write_str(
                "no IPv4 address to advertise for the overlay tunnel: set OAK_PUBLIC_ADDRESS",
            ),
            OverlayError::Ports(e) => write!(f, "port publishing: {e}"),
            OverlayError::Stopped => f.write_str("the overlay is shut down"),
        }
    }
}

impl std::error::Error for OverlayError {}

/// One instance connected to the overlay.
#[derive(Debug)]
struct Local {
    nsip: Ipv4Addr,
    netns: PathBuf,
    job: JobName,
    n: u32,
    /// Its published ports (dropping closes them).
    published: Option<ports::Published>,
}

/// What a restart needs to take an instance back: one JSON file per owned namespace under
/// `<state_dir>/netns/`, written before the namespace is made (a crash is then cleaned too).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    netns: PathBuf,
    job: String,
    instance: u32,
    /// None until the veth is wired.
    nsip: Option<Ipv4Addr>,
    #[serde(default)]
    ports: String,
}

struct Inner {
    cfg: OverlayConfig,
    start: Instant,
    node: Option<String>,
    session: Option<Session>,
    dp: Option<DataplaneHandle>,
    plumbing: Option<Plumbing>,
    subnet: Option<NodeSubnet>,
    local: BTreeMap<String, Local>,
    /// Instances that survived a restart, waiting for the bridge to be re-attached.
    survivors: Vec<(String, Record)>,
    /// Instances to report again with `service/deployed` once the session is connected (all of
    /// them after a new registration: the cluster may know this worker under a new id).
    announce: Vec<String>,
    ops: Sender<MqttOp>,
    ops_dropped: u64,
    stopped: bool,
    /// Runs the port forwarders; driven by the overlay's task.
    ports_ex: Rc<async_executor::LocalExecutor<'static>>,
    port_stats: Rc<ports::PortStats>,
}

/// The overlay. Cheap to clone; every clone is the same overlay. Single-threaded (the
/// worker's executor); the packet loop runs on its own thread inside.
#[derive(Clone)]
pub struct Overlay {
    inner: Rc<RefCell<Inner>>,
}

/// Counters for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverlayStatus {
    pub subnet: Option<Ipv4Addr>,
    pub instances: usize,
    pub ops_dropped: u64,
    /// Connections accepted on published ports.
    pub port_connections: u64,
    /// Connections and UDP flows over the published ports' bounds.
    pub port_refused: u64,
}

impl Overlay {
    /// Opens the TUN device and the tunnel socket in the calling thread's network namespace,
    /// removes namespaces a previous run of this worker left, and returns the overlay, the
    /// MQTT side's link, and the task to spawn on the executor (it ends when the link's
    /// `to_overlay` sender is dropped).
    pub fn start(
        cfg: OverlayConfig,
    ) -> Result<(Overlay, SessionLink, impl Future<Output = ()>), String> {
        let survivors = recover(&cfg);
        // The subnet is only worth keeping while instances are on it; without them the
        // cluster's fresh answer is used.
        let kept_subnet = if survivors.is_empty() {
            let _ = std::fs::remove_file(subnet_file(&cfg));
            None
        } else {
            read_subnet(&cfg)
        };
        let dp = Dataplane::open(&cfg.dataplane).map_err(|e| {
            format!(
                "overlay: cannot open TUN {} / tunnel {}: {e}",
                cfg.dataplane.tun_name, cfg.dataplane.listen
            )
        })?;
        let (ev_tx, ev_rx) = std::sync::mpsc::channel();
        let dp = dp
            .spawn(ev_tx)
            .map_err(|e| format!("overlay: cannot start the data plane thread: {e}"))?;
        // The data plane reports on a std channel (it is a plain thread): a small thread moves
        // events onto the executor. It ends when the data plane stops.
        let (events_tx, events) = async_channel::bounded::<Event>(LINK_CAPACITY);
        std::thread::Builder::new()
            .name("overlay-events".into())
            .spawn(move || {
                while let Ok(ev) = ev_rx.recv() {
                    if events_tx.send_blocking(ev).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| format!("overlay: cannot start a thread: {e}"))?;
        let (to_overlay, from_session) = async_channel::bounded(LINK_CAPACITY);
        let (ops_tx, ops) = async_channel::bounded(LINK_CAPACITY);
        log::info!(
            "overlay: TUN {} {}/{}, tunnel on UDP {}",
            cfg.dataplane.tun_name,
            cfg.dataplane.tun_addr,
            cfg.dataplane.tun_prefix,
            cfg.dataplane.listen
        );
        let overlay = Overlay {
            inner: Rc::new(RefCell::new(Inner {
                cfg,
                start: Instant::now(),
                node: None,
                session: None,
                dp: Some(dp),
                plumbing: None,
                subnet: None,
                local: BTreeMap::new(),
                survivors,
                announce: Vec::new(),
                ops: ops_tx,
                ops_dropped: 0,
                stopped: false,
                ports_ex: Rc::new(async_executor::LocalExecutor::new()),
                port_stats: Rc::default(),
            })),
        };
        {
            let mut i = overlay.inner.borrow_mut();
            if !i.survivors.is_empty() {
                log::info!(
                    "overlay: {} instances survived the last stop; re-attaching them",
                    i.survivors.len()
                );
            }
            if let Some(s) = kept_subnet {
                i.on_subnet(s);
            }
        }
        let task = overlay.clone().run(from_session, events);
        Ok((overlay, SessionLink { to_overlay, ops }, task))
    }

    async fn run(self, from_session: Receiver<ToOverlay>, events: Receiver<Event>) {
        // The port forwarders run while the overlay does, on the same thread.
        let ex = self.inner.borrow().ports_ex.clone();
        ex.run(self.serve(from_session, events)).await;
    }

    async fn serve(self, from_session: Receiver<ToOverlay>, events: Receiver<Event>) {
        enum Wake {
            Session(Option<ToOverlay>),
            Event(Event),
            Tick,
        }
        let mut ticker = Timer::interval(Duration::from_millis(500));
        loop {
            let wake = async { Wake::Session(from_session.recv().await.ok()) }
                .or(async {
                    match events.recv().await {
                        Ok(e) => Wake::Event(e),
                        Err(_) => std::future::pending().await,
                    }
                })
                .or(async {
                    ticker.next().await;
                    Wake::Tick
                })
                .await;
            let mut inner = self.inner.borrow_mut();
            if inner.stopped {
                return;
            }
            match wake {
                Wake::Session(None) => return,
                Wake::Session(Some(m)) => inner.on_session(m),
                Wake::Event(e) => {
                    let now = inner.now();
                    let out = match inner.session.as_mut() {
                        Some(s) => s.on_event(now, e),
                        None => Vec::new(),
                    };
                    inner.apply(out);
                }
                Wake::Tick => {
                    let now = inner.now();
                    let out = match inner.session.as_mut() {
                        Some(s) => s.tick(now),
                        None => Vec::new(),
                    };
                    inner.apply(out);
                }
            }
        }
    }

    /// The data plane's counters, for the status endpoint's thread (None once stopped).
    pub fn dataplane_counters(&self) -> Option<Arc<SharedCounters>> {
        self.inner.borrow().dp.as_ref().map(|d| d.counters())
    }

    pub fn status(&self) -> OverlayStatus {
        let i = self.inner.borrow();
        OverlayStatus {
            subnet: i.subnet.map(|s| s.v4),
            instances: i.local.len(),
            ops_dropped: i.ops_dropped,
            port_connections: i.port_stats.tcp_accepted.get(),
            port_refused: i.port_stats.refused.get(),
        }
    }

    /// Connects a new instance: a named netns `<netns_dir>/<container_id>` with a veth on the
    /// bridge and the next address of the subnet, registered with the data plane and reported
    /// to the cluster (`service/deployed`), its `ports` (the job's `port` field) published on
    /// the host. Waits for the subnet if it has not arrived yet. A second call for the same
    /// container returns the same namespace.
    pub async fn attach_instance(
        &self,
        container_id: &str,
        job: &str,
        instance_number: u32,
        ports: &str,
    ) -> Result<(PathBuf, Ipv4Addr), OverlayError> {
        let job = JobName::parse(job).map_err(|e| OverlayError::JobName(e.to_string()))?;
        parse_ports(container_id, ports)?;
        let wait = self.inner.borrow().cfg.subnet_wait;
        let deadline = Instant::now() + wait;
        loop {
            {
                let i = self.inner.borrow();
                if i.stopped {
                    return Err(OverlayError::Stopped);
                }
                if i.plumbing.is_some() {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(OverlayError::NoSubnet(wait));
            }
            Timer::after(Duration::from_millis(100)).await;
        }
        self.inner
            .borrow_mut()
            .attach(container_id, &job, instance_number, ports)
    }

    /// Undoes [`Overlay::attach_instance`]; unknown containers are fine (idempotent).
    pub fn detach_instance(&self, container_id: &str) {
        self.inner.borrow_mut().detach(container_id);
    }

    /// Connects an existing network namespace (manual mode: `/proc/<pid>/ns/net` of a task the
    /// NodeEngine started) instead of making one; detached with [`Overlay::detach_instance`].
    pub async fn attach_existing(
        &self,
        key: &str,
        netns: &Path,
        job: &str,
        instance_number: u32,
        ports: &str,
    ) -> Result<Ipv4Addr, OverlayError> {
        let job = JobName::parse(job).map_err(|e| OverlayError::JobName(e.to_string()))?;
        let maps = parse_ports(key, ports)?;
        let wait = self.inner.borrow().cfg.subnet_wait;
        let deadline = Instant::now() + wait;
        while self.inner.borrow().plumbing.is_none() {
            if self.inner.borrow().stopped {
                return Err(OverlayError::Stopped);
            }
            if Instant::now() >= deadline {
                return Err(OverlayError::NoSubnet(wait));
            }
            Timer::after(Duration::from_millis(100)).await;
        }
        let mut inner = self.inner.borrow_mut();
        let nsip = inner.connect(key, netns, false, &job, instance_number)?;
        if let Err(e) = inner.publish(key, &maps) {
            inner.detach(key);
            return Err(e);
        }
        Ok(nsip)
    }

    /// The subnet, once the cluster has answered.
    pub fn subnet(&self) -> Option<NodeSubnet> {
        self.inner.borrow().subnet
    }

    /// A worker stop: the TUN device and tunnel go, running instances stay wired (namespace,
    /// veth, address, bridge) for the next start to re-attach. With no instances left this is
    /// [`Overlay::teardown`]. The task ends at its next wake-up.
    pub fn shutdown(&self) {
        self.inner.borrow_mut().shutdown(true);
    }

    /// Removes everything: instance veths and namespaces, the bridge, the TUN device (also
    /// done on drop without a prior shutdown).
    pub fn teardown(&self) {
        self.inner.borrow_mut().shutdown(false);
    }
}

impl Network for Overlay {
    fn attach<'a>(
        &'a self,
        container_id: &'a str,
        job: &'a crate::protocol::DeployCommand,
    ) -> BoxFuture<'a, Result<Option<PathBuf>, String>> {
        Box::pin(async move {
            let n = u32::try_from(job.instance_number)
                .map_err(|_| format!("instance number {} too large", job.instance_number))?;
            self.attach_instance(container_id, &job.job_name, n, &job.port)
                .await
                .map(|(p, _)| Some(p))
                .map_err(|e| e.to_string())
        })
    }

    fn detach<'a>(&'a self, container_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.detach_instance(container_id) })
    }
}

impl Inner {
    fn now(&self) -> Millis {
        Millis(self.start.elapsed().as_millis() as u64)
    }

    fn on_session(&mut self, m: ToOverlay) {
        let now = self.now();
        match m {
            ToOverlay::Registered { node_id } => {
                if self.node.as_deref() == Some(node_id.as_str()) {
                    return;
                }
                log::info!("overlay: talking to the cluster as node {node_id}");
                // The conversation starts at the next Connected (the session starts a client
                // for a new id): asking now as well would make the root allocate two subnets.
                // With a new id while running, the subnet is kept; the new session's answer is
                // ignored if it differs (a bridge with instances on it cannot move).
                self.session = Some(Session::new(
                    &node_id,
                    self.cfg.dataplane.proxy.service_net,
                    self.cfg.dataplane.proxy.service_prefix,
                    self.cfg.max_subscriptions,
                ));
                self.node = Some(node_id);
                self.announce = self.local.keys().cloned().collect();
            }
            ToOverlay::Connected => {
                let out = match self.session.as_mut() {
                    Some(s) => s.on_connect(now),
                    None => Vec::new(),
                };
                self.apply(out);
                self.announce_pending();
            }
            ToOverlay::Message { topic, payload } => {
                let out = match self.session.as_mut() {
                    Some(s) => s.on_message(now, &topic, &payload),
                    None => Vec::new(),
                };
                self.apply(out);
            }
        }
    }

    fn op(&mut self, op: MqttOp) {
        if self.ops.try_send(op).is_err() {
            // The session asks again (subnet retry, query retry, resubscribe on connect).
            self.ops_dropped += 1;
            log::warn!("overlay: MQTT link full; a message was dropped (retried later)");
        }
    }

    fn apply(&mut self, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Publish { topic, payload } => self.op(MqttOp::Publish(Outgoing {
                    topic,
                    payload,
                    // Table queries and reports must survive a reconnect; a stale query
                    // answered late is harmless.
                    resend: true,
                })),
                Output::Subscribe(t) => self.op(MqttOp::Subscribe(t)),
                Output::Unsubscribe(t) => self.op(MqttOp::Unsubscribe(t)),
                Output::Subnet(s) => self.on_subnet(s),
                Output::Table(u) => {
                    if let Some(dp) = &self.dp {
                        dp.send(Command::ApplyTableUpdate(u));
                    }
                }
            }
        }
    }

    /// `service/deployed` for instances that were wired while no session could say so.
    fn announce_pending(&mut self) {
        if self.session.is_none() || self.announce.is_empty() {
            return;
        }
        let Ok(node) = self.advertised() else {
            log::warn!("overlay: no address to advertise; instances are announced later");
            return;
        };
        let now = self.now();
        for key in std::mem::take(&mut self.announce) {
            let Some(l) = self.local.get(&key) else {
                continue;
            };
            let (job, n, nsip) = (l.job.clone(), l.n, l.nsip);
            let out = match self.session.as_mut() {
                Some(s) => s.deployed(now, &job, n, nsip, None, node),
                None => Vec::new(),
            };
            self.apply(out);
        }
    }

    fn on_subnet(&mut self, s: NodeSubnet) {
        if let Some(old) = self.subnet {
            if old != s {
                log::warn!(
                    "overlay: the cluster now gives subnet {}, keeping {} (instances are on it)",
                    s.v4,
                    old.v4
                );
            }
            return;
        }
        let built = if self.survivors.is_empty() {
            Plumbing::setup(self.cfg.plumbing.clone(), s.v4).map(|p| (p, Vec::new()))
        } else {
            let keep: Vec<Ipv4Addr> = self.survivors.iter().filter_map(|(_, r)| r.nsip).collect();
            Plumbing::adopt(self.cfg.plumbing.clone(), s.v4, &keep)
        };
        match built {
            Ok((p, kept)) => {
                log::info!(
                    "overlay: subnet {}/26, bridge {} at {}",
                    s.v4,
                    self.cfg.plumbing.bridge,
                    Ipv4Addr::from(u32::from(s.v4) + 1)
                );
                self.plumbing = Some(p);
                self.subnet = Some(s);
                if let Err(e) = write_subnet(&self.cfg, s) {
                    log::warn!(
                        "overlay: cannot record the subnet ({e}); a restart re-wires instances"
                    );
                }
                if let Some(dp) = &self.dp {
                    dp.send(Command::SetSubnet(s));
                }
                self.reattach(&kept);
            }
            // Deploys keep failing with "no subnet" and say why in the log.
            Err(e) => log::error!("overlay: cannot build the bridge for {}: {e}", s.v4),
        }
    }

    fn advertised(&self) -> Result<SocketAddrV4, OverlayError> {
        let ip = match self.cfg.public_address {
            Some(a) => a,
            None => crate::sysinfo::node_ip(None)
                .parse()
                .map_err(|_| OverlayError::NoAddress)?,
        };
        Ok(SocketAddrV4::new(ip, self.cfg.dataplane.listen.port()))
    }

    fn attach(
        &mut self,
        container_id: &str,
        job: &JobName,
        n: u32,
        ports: &str,
    ) -> Result<(PathBuf, Ipv4Addr), OverlayError> {
        if let Some(l) = self.local.get(container_id) {
            return Ok((l.netns.clone(), l.nsip));
        }
        let maps = parse_ports(container_id, ports)?;
        let mut rec = Record {
            netns: self.cfg.netns_dir.join(container_id),
            job: job.to_string(),
            instance: n,
            nsip: None,
            ports: ports.to_string(),
        };
        // Written before anything else can fail: a crash from here on is cleaned at start.
        self.write_record(container_id, &rec);
        let path = match netns::create(&self.cfg.netns_dir, container_id) {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(self.record_path(container_id));
                return Err(OverlayError::Netns(container_id.into(), e));
            }
        };
        let connected = self
            .connect(container_id, &path, true, job, n)
            .and_then(|nsip| {
                if let Err(e) = self.publish(container_id, &maps) {
                    // detach removes the netns and the record too
                    self.detach(container_id);
                    return Err(e);
                }
                Ok(nsip)
            });
        match connected {
            Ok(nsip) => {
                rec.nsip = Some(nsip);
                self.write_record(container_id, &rec);
                Ok((path, nsip))
            }
            Err(e) => {
                let _ = netns::remove(&path);
                let _ = std::fs::remove_file(self.record_path(container_id));
                Err(e)
            }
        }
    }

    /// Starts the forwarders of an attached instance.
    fn publish(&mut self, key: &str, maps: &[ports::PortMap]) -> Result<(), OverlayError> {
        if maps.is_empty() {
            return Ok(());
        }
        let Some(l) = self.local.get_mut(key) else {
            return Err(OverlayError::Stopped);
        };
        let p = ports::publish(
            &self.ports_ex,
            maps,
            l.nsip,
            key,
            ports::Limits::default(),
            &self.port_stats,
        )
        .map_err(|e| {
            log::warn!("overlay: {key}: {e}");
            OverlayError::Ports(e)
        })?;
        log::info!("overlay: {key}: {} ports published on the host", maps.len());
        l.published = Some(p);
        Ok(())
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.cfg.state_dir.join("netns").join(key)
    }

    fn write_record(&self, key: &str, rec: &Record) {
        let path = self.record_path(key);
        let r = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(rec).unwrap_or_default())?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = r {
            log::warn!(
                "overlay: cannot record {} ({e}); a restart would not re-attach it",
                path.display()
            );
        }
    }

    /// Brings the survivors of the last stop back: those whose veth is still on the bridge
    /// (`kept`) are registered as they are, the others get a fresh veth in their namespace.
    fn reattach(&mut self, kept: &[Ipv4Addr]) {
        for (key, rec) in std::mem::take(&mut self.survivors) {
            let job = match JobName::parse(&rec.job) {
                Ok(j) => j,
                Err(e) => {
                    log::warn!(
                        "overlay: record of {key} names job {:?}: {e}; its namespace is removed",
                        rec.job
                    );
                    self.remove_owned_netns(&key, &rec.netns);
                    continue;
                }
            };
            let in_place = rec.nsip.filter(|ip| kept.contains(ip));
            let r = match in_place {
                Some(nsip) => self.register(&key, &rec.netns, &job, rec.instance, nsip),
                None => self.connect(&key, &rec.netns, true, &job, rec.instance),
            };
            match r {
                Ok(nsip) => {
                    // A port taken meanwhile is logged; the instance keeps its overlay address.
                    if let Ok(maps) = parse_ports(&key, &rec.ports) {
                        let _ = self.publish(&key, &maps);
                    }
                    log::info!(
                        "overlay: {key} re-attached at {nsip}{}",
                        if in_place.is_some() {
                            " (in place)"
                        } else {
                            " (new veth)"
                        }
                    );
                    if in_place.is_none() {
                        let rec = Record {
                            nsip: Some(nsip),
                            ..rec
                        };
                        self.write_record(&key, &rec);
                    }
                    if !self.announce.contains(&key) {
                        self.announce.push(key);
                    }
                }
                // Its netns stays (the container runs in it); the runtime's undeploy removes it.
                Err(e) => log::error!("overlay: cannot re-attach {key}: {e}"),
            }
        }
        self.announce_pending();
    }

    /// A survivor whose veth is in place: data plane entry only.
    fn register(
        &mut self,
        key: &str,
        netns: &Path,
        job: &JobName,
        n: u32,
        nsip: Ipv4Addr,
    ) -> Result<Ipv4Addr, OverlayError> {
        match &self.dp {
            Some(dp) => dp
                .deploy_local(job.clone(), n, nsip)
                .map_err(|e| OverlayError::Dataplane(format!("{e:?}")))?,
            None => return Err(OverlayError::Stopped),
        };
        self.local.insert(
            key.to_string(),
            Local {
                nsip,
                netns: netns.to_path_buf(),
                job: job.clone(),
                n,
                published: None,
            },
        );
        Ok(nsip)
    }

    /// Veth into `netns`, data plane entry, `service/deployed`. Undoes its own steps on error.
    fn connect(
        &mut self,
        key: &str,
        netns: &Path,
        owned: bool,
        job: &JobName,
        n: u32,
    ) -> Result<Ipv4Addr, OverlayError> {
        if self.stopped {
            return Err(OverlayError::Stopped);
        }
        let node = self.advertised()?;
        let file = std::fs::File::open(netns)
            .map_err(|e| OverlayError::Netns(netns.display().to_string(), e))?;
        let plumbing = self.plumbing.as_mut().ok_or(OverlayError::Stopped)?;
        let a = plumbing.attach(&file).map_err(OverlayError::Plumbing)?;
        let registered = match &self.dp {
            Some(dp) => dp
                .deploy_local(job.clone(), n, a.nsip)
                .map_err(|e| OverlayError::Dataplane(format!("{e:?}"))),
            None => Err(OverlayError::Stopped),
        };
        if let Err(e) = registered {
            let _ = plumbing.detach(a.nsip);
            return Err(e);
        }
        log::info!(
            "overlay: {key} ({job} instance {n}) at {} via {}",
            a.nsip,
            a.host_veth
        );
        self.local.insert(
            key.to_string(),
            Local {
                nsip: a.nsip,
                netns: if owned {
                    netns.to_path_buf()
                } else {
                    PathBuf::new()
                },
                job: job.clone(),
                n,
                published: None,
            },
        );
        let now = self.now();
        let out = match self.session.as_mut() {
            Some(s) => s.deployed(now, job, n, a.nsip, None, node),
            None => Vec::new(),
        };
        self.apply(out);
        Ok(a.nsip)
    }

    fn detach(&mut self, key: &str) {
        let Some(l) = self.local.remove(key) else {
            // Never attached here, already detached, or a survivor of the last stop not yet
            // re-attached; a namespace left by a crash of this run is still removed.
            self.survivors.retain(|(k, _)| k != key);
            self.remove_owned_netns(key, &self.cfg.netns_dir.join(key));
            return;
        };
        if let Some(dp) = &self.dp {
            dp.send(Command::UndeployLocal(l.nsip));
        }
        if let Some(p) = self.plumbing.as_mut() {
            if let Err(e) = p.detach(l.nsip) {
                log::warn!("overlay: removing the veth of {key}: {e}");
            }
        }
        if !l.netns.as_os_str().is_empty() {
            self.remove_owned_netns(key, &l.netns);
        }
        log::info!("overlay: {key} detached ({} freed)", l.nsip);
    }

    fn remove_owned_netns(&self, key: &str, path: &Path) {
        let marker = self.record_path(key);
        if !marker.exists() {
            return;
        }
        if let Err(e) = netns::remove(path) {
            log::warn!("overlay: {e}");
        }
        let _ = std::fs::remove_file(&marker);
    }

    fn shutdown(&mut self, keep_instances: bool) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let keep = keep_instances && !(self.local.is_empty() && self.survivors.is_empty());
        for l in self.local.values_mut() {
            l.published = None;
        }
        if keep {
            if let Some(p) = self.plumbing.take() {
                p.leave_in_place();
            }
            log::info!(
                "overlay: {} instances stay wired for the next start (undeploy them to remove their network)",
                self.local.len() + self.survivors.len()
            );
        } else {
            let keys: Vec<String> = self.local.keys().cloned().collect();
            for k in keys {
                self.detach(&k);
            }
            for (k, rec) in std::mem::take(&mut self.survivors) {
                self.remove_owned_netns(&k, &rec.netns);
            }
            if let Some(p) = self.plumbing.take() {
                if let Err(e) = p.teardown() {
                    log::warn!("overlay: removing the bridge: {e}");
                }
            }
            let _ = std::fs::remove_file(subnet_file(&self.cfg));
        }
        if let Some(dp) = self.dp.take() {
            if let Some(st) = dp.stop() {
                log::info!(
                    "overlay stopped: {} packets from instances, {} from peers, {} to peers",
                    st.from_tun,
                    st.from_peer,
                    st.to_peer
                );
            }
        }
        self.session = None;
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}

/// Parses a `port` field, logging a bad one once with the instance it came with.
fn parse_ports(key: &str, spec: &str) -> Result<Vec<ports::PortMap>, OverlayError> {
    ports::parse(spec).map_err(|e| {
        log::warn!("overlay: {key}: bad port field {spec:?}: {e}");
        OverlayError::Ports(format!("bad port field: {e}"))
    })
}

fn subnet_file(cfg: &OverlayConfig) -> PathBuf {
    cfg.state_dir.join("subnet")
}

fn read_subnet(cfg: &OverlayConfig) -> Option<NodeSubnet> {
    let text = std::fs::read_to_string(subnet_file(cfg)).ok()?;
    let v4: Ipv4Addr = text.trim().parse().ok()?;
    (u32::from(v4) & 63 == 0).then_some(NodeSubnet { v4, v6: None })
}

fn write_subnet(cfg: &OverlayConfig, s: NodeSubnet) -> std::io::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)?;
    std::fs::write(subnet_file(cfg), format!("{}\n", s.v4))
}

/// Reads the records a previous run left: instances whose namespace a process still uses
/// are returned (to re-attach); the namespaces of the others are removed with their records.
fn recover(cfg: &OverlayConfig) -> Vec<(String, Record)> {
    let dir = cfg.state_dir.join("netns");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let in_use = namespaces_in_use();
    let mut alive = Vec::new();
    let mut removed = 0;
    for e in rd.flatten() {
        let marker = e.path();
        let Some(key) = e.file_name().to_str().map(str::to_string) else {
            let _ = std::fs::remove_file(&marker);
            continue;
        };
        if key.ends_with(".tmp") {
            let _ = std::fs::remove_file(&marker);
            continue;
        }
        let rec: Option<Record> = std::fs::read(&marker)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let path = rec
            .as_ref()
            .map(|r| r.netns.clone())
            .unwrap_or_else(|| cfg.netns_dir.join(&key));
        // Only ever paths under our namespace directory, whatever the file says.
        if path.parent() != Some(cfg.netns_dir.as_path()) {
            let _ = std::fs::remove_file(&marker);
            continue;
        }
        let live = rec.is_some() && ns_id(&path).is_some_and(|id| in_use.contains(&id));
        match rec {
            Some(r) if live => alive.push((key, r)),
            _ => {
                match netns::remove(&path) {
                    Ok(()) => removed += 1,
                    Err(e) => log::warn!("overlay: leftover {e}"),
                }
                let _ = std::fs::remove_file(&marker);
            }
        }
    }
    if removed > 0 {
        log::info!("overlay: removed {removed} instance namespaces no process uses any more");
    }
    alive
}

/// (device, inode) of a network namespace file.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The network namespaces some process is in (`/proc/<pid>/ns/net`), read once at start.
fn namespaces_in_use() -> std::collections::BTreeSet<(u64, u64)> {
    let mut out = std::collections::BTreeSet::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        if let Some(id) = ns_id(&e.path().join("ns/net")) {
            out.insert(id);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netcfg_tables_and_busy_poll_reach_the_data_plane() {
        let netcfg: netstack::config::NetCfg = serde_json::from_str(
            r#"{"NodePublicPort":"50200","Tables":{"Flows":300,"Peers":7},"BusyPollMicros":40}"#,
        )
        .unwrap();
        let env = |_: &str| None;
        let paths = crate::config::Paths::from_env(&env);
        let st = crate::config::Settings::resolve(
            &paths,
            &Default::default(),
            &netcfg,
            &env,
            &Default::default(),
            "pi-1",
        )
        .unwrap();
        let dp = OverlayConfig::from_settings(&st).unwrap().dataplane;
        assert_eq!(dp.listen.port(), 50200);
        assert_eq!(dp.busy_poll_us, 40);
        assert_eq!((dp.proxy.capacity.flows, dp.proxy.capacity.peers), (300, 7));
        let default = netstack::proxy::Capacity::default();
        assert_eq!(dp.proxy.capacity.services, default.services);
    }

    #[test]
    fn overlay_topics() {
        let id = "65f1a2b3c4d5e6f708091011";
        assert!(is_overlay_topic(
            id,
            &format!("nodes/{id}/net/subnetwork/result")
        ));
        assert!(is_overlay_topic(id, "jobs/a.b.c.d/updates_available"));
        assert!(!is_overlay_topic(id, &format!("nodes/{id}/control/deploy")));
        assert!(!is_overlay_topic(id, "nodes/other/net/subnetwork/result"));
        assert!(!is_overlay_topic(
            id,
            &format!("nodes/{id}x/net/subnetwork/result")
        ));
    }
}
