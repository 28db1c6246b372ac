//! The async shell over containerd: one actor owns the instance table and feeds the pure
//! state machine (`instance`); deploys, kills and teardowns run as tasks on the driver's own
//! local executor and report back. Exits come from one `Events/Subscribe` stream (spec §3.6).
//! It decides nothing itself: every status comes out of `Instance::on`.

use super::cgroups::{Host, MEMORY_CGROUP_HINT};
use super::instance::{exit_report, Action, Input, Instance, Phase, Timeouts};
use super::{image, logs, metrics, spec, Network, Puller, StatusChange};
use crate::config::Settings;
use crate::containerd::{self as ctrd, Client, Event, EventStream, Options, ProcessStatus};
use crate::protocol::{container_id, parse_container_id, DeleteCommand, DeployCommand};
use crate::protocol::{InstanceResources, Status};
use async_channel::{Receiver, Sender};
use async_executor::{LocalExecutor, Task};
use async_io::Timer;
use futures_lite::future;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Label on every container we create: the one-shot flag must survive a worker restart.
pub const LABEL_ONE_SHOT: &str = "oakestra.io/one-shot";
pub const LABEL_MANAGED: &str = "oakestra.io/worker";

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub socket: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    pub app_logs: PathBuf,
    /// Holds `runc/` (runc's state root) and `runtime/` (resolv.conf, hosts).
    pub state_dir: PathBuf,
    pub timeouts: Timeouts,
    /// Bound on each single containerd call of a deploy or teardown.
    pub step_timeout: Duration,
    /// Instances this worker keeps at most; a deploy beyond it is FAILED.
    pub capacity: usize,
    /// Depth of the command and status queues.
    pub queue: usize,
    /// The host's cgroups; None: detect them at start. Set to model another host (tests).
    pub cgroups: Option<Host>,
}

impl RuntimeConfig {
    pub fn from_settings(s: &Settings) -> RuntimeConfig {
        RuntimeConfig {
            socket: s.containerd_socket.clone(),
            namespace: s.containerd_namespace.clone(),
            snapshotter: ctrd::DEFAULT_SNAPSHOTTER.into(),
            app_logs: s.app_logs.clone(),
            state_dir: s.state_dir.clone(),
            timeouts: Timeouts::default(),
            step_timeout: Duration::from_secs(30),
            capacity: 128,
            queue: 64,
            cgroups: None,
        }
    }

    /// runc's state root: runc's default `/run/containerd/runc` is shared by every containerd
    /// on the host, so two workers (or tests) would collide there.
    pub fn runc_root(&self) -> PathBuf {
        self.state_dir.join("runc")
    }

    /// The cgroup this worker's containers are created in. Cgroup paths are global on the host
    /// while container ids are unique only within one containerd: two workers on one host (each
    /// with its own containerd) can both hold `<job>.instance.0`, e.g. the orphan of a killed
    /// worker and the copy rescheduled next to it. In one cgroup they would share limits and
    /// metrics, and runc's kill of every process of one would stop the other. A worker with the
    /// default state dir keeps upstream's `/<namespace>`; any other state dir (which must differ
    /// per worker anyway: runc root, pid file) gets its own scope below it, named after the dir
    /// so it stays the same across restarts.
    pub fn cgroup_parent(&self) -> String {
        let dir: PathBuf = self.state_dir.components().collect();
        if dir == Path::new(crate::config::DEFAULT_STATE_DIR) {
            return format!("/{}", self.namespace);
        }
        format!(
            "/{}/worker-{:08x}",
            self.namespace,
            fnv1a32(dir.as_os_str().as_encoded_bytes())
        )
    }

    /// `cgroupsPath` of container `id` (spec §5.1).
    pub fn cgroups_path(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_parent())
    }
}

/// FNV-1a: a short, stable name for a path (not a security boundary).
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[derive(Debug)]
pub enum Error {
    Containerd(ctrd::Error),
    Setup {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The driver is gone (dropped or never spawned).
    Stopped,
    Sample(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Containerd(e) => write!(f, "{e}"),
            Error::Setup { path, source } => write!(
                f,
                "cannot prepare {}: {source} (the worker needs root and a writable OAK_STATE_DIR / OAK_APP_LOGS)",
                path.display()
            ),
            Error::Stopped => f.write_str(
                "the container runtime is not running: spawn the Driver returned by Runtime::start",
            ),
            Error::Sample(e) => write!(f, "sampling instances: {e}"),
        }
    }
}

impl std::error::Error for Error {}

enum Request {
    Deploy(Box<DeployCommand>),
    Undeploy(DeleteCommand),
    Resources(Sender<Result<Vec<InstanceResources>, String>>),
}

/// Messages from the runtime's own tasks to the actor. `gen` tags a deploy/teardown round so
/// a late answer from a cancelled one is not taken for the current one.
enum Internal {
    Step {
        id: String,
        gen: u64,
        input: Input,
    },
    Exit {
        id: String,
        code: u32,
    },
    Oom {
        id: String,
    },
    /// After the event stream was lost: the tasks containerd has now (events are not replayed).
    Resync(Vec<ctrd::Process>),
}

/// The handle the cluster session uses. Cheap to clone; every call only enqueues (bounded).
#[derive(Clone)]
pub struct Runtime {
    requests: Sender<Request>,
}

/// The runtime's work: spawn it on the session's executor. Dropping it stops everything
/// without touching the instances, which the next start adopts.
pub struct Driver(Pin<Box<dyn Future<Output = ()>>>);

impl Future for Driver {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl Runtime {
    /// Connects to containerd, prepares the state directories and subscribes to task exits
    /// (before any task can start, spec §3.6). The driver adopts what containerd already runs
    /// in the namespace first, reporting instances that died meanwhile as DEAD/COMPLETED.
    pub async fn start(
        cfg: RuntimeConfig,
        puller: Rc<dyn Puller>,
        network: Rc<dyn Network>,
    ) -> Result<(Runtime, Receiver<StatusChange>, Driver), Error> {
        let opts = Options::new(&cfg.socket, &cfg.namespace);
        let (client, version) = Client::connect(opts).await.map_err(Error::Containerd)?;
        log::info!(
            "containerd {} at {}, namespace {}",
            version.version,
            cfg.socket.display(),
            cfg.namespace
        );
        let host = cfg.cgroups.clone().unwrap_or_else(Host::detect);
        log::info!(
            "cgroups {:?}: memory limits {}, cpu limits {}",
            host.version,
            if host.memory.is_some() { "on" } else { "off" },
            if host.cpu.is_some() { "on" } else { "off" }
        );
        if host.memory.is_none() {
            log::warn!("memory limits will not be enforced: {MEMORY_CGROUP_HINT}");
        }
        for dir in [
            cfg.runc_root(),
            cfg.state_dir.join("runtime"),
            cfg.app_logs.clone(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|source| Error::Setup { path: dir, source })?;
        }
        let etc = EtcFiles::new(&cfg.state_dir.join("runtime"));
        etc.refresh()
            .map_err(|(path, source)| Error::Setup { path, source })?;
        let events = subscribe(&client, &cfg.namespace)
            .await
            .map_err(Error::Containerd)?;

        let (req_tx, req_rx) = async_channel::bounded(cfg.queue);
        let (int_tx, int_rx) = async_channel::bounded(cfg.queue);
        let (status_tx, status_rx) = async_channel::bounded(cfg.queue);
        let ctx = Rc::new(Ctx {
            history: RefCell::new(Sampler::new(cfg.capacity)),
            cfg,
            host,
            puller,
            network,
            internal: int_tx,
            etc,
            warned: Cell::new(false),
        });
        let driver = async move {
            let ex = Rc::new(LocalExecutor::new());
            let actor = Actor {
                ctx: ctx.clone(),
                ex: ex.clone(),
                table: HashMap::new(),
                status: status_tx,
            };
            ex.spawn(watch_events(ctx, events)).detach();
            ex.run(actor.run(req_rx, int_rx)).await;
        };
        Ok((
            Runtime { requests: req_tx },
            status_rx,
            Driver(Box::pin(driver)),
        ))
    }

    /// Deploys (or, for an instance already here, re-reports it: never kills a healthy one).
    pub async fn deploy(&self, cmd: DeployCommand) -> Result<(), Error> {
        self.requests
            .send(Request::Deploy(Box::new(cmd)))
            .await
            .map_err(|_| Error::Stopped)
    }

    /// UNDEPLOYED at once, DEAD after the teardown; nothing for an unknown instance (upstream).
    pub async fn undeploy(&self, cmd: DeleteCommand) -> Result<(), Error> {
        self.requests
            .send(Request::Undeploy(cmd))
            .await
            .map_err(|_| Error::Stopped)
    }

    /// The `jobs/resources` list: every container of the namespace with a running task.
    pub async fn resources(&self) -> Result<Vec<InstanceResources>, Error> {
        let (tx, rx) = async_channel::bounded(1);
        self.requests
            .send(Request::Resources(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.recv()
            .await
            .map_err(|_| Error::Stopped)?
            .map_err(Error::Sample)
    }
}

/// `/tasks/exit` and `/tasks/oom` of our namespace only: containerd does not filter by the
/// namespace header (spec §2, §3.6).
async fn subscribe(cl: &Client, ns: &str) -> Result<EventStream, ctrd::Error> {
    let exit = format!("namespace=={ns},topic==\"/tasks/exit\"");
    let oom = format!("namespace=={ns},topic==\"/tasks/oom\"");
    cl.subscribe(&[&exit, &oom]).await
}

/// What the runtime's tasks share. Single-threaded (the driver's local executor).
struct Ctx {
    cfg: RuntimeConfig,
    host: Host,
    puller: Rc<dyn Puller>,
    network: Rc<dyn Network>,
    internal: Sender<Internal>,
    etc: EtcFiles,
    /// The "limit not enforced" warning is logged once per run.
    warned: Cell<bool>,
    history: RefCell<Sampler>,
}

impl Ctx {
    fn client(&self) -> Client {
        // The namespace was validated when Runtime::start connected.
        Client::new(Options::new(&self.cfg.socket, &self.cfg.namespace))
            .unwrap_or_else(|_| unreachable!("namespace validated at start"))
    }

    async fn step<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, ctrd::Error>>,
    ) -> Result<T, ctrd::Error> {
        let limit = self.cfg.step_timeout;
        let timer = async {
            Timer::after(limit).await;
            Err(ctrd::Error::Protocol {
                socket: self.cfg.socket.clone(),
                detail: format!("{what} got no answer within {} s", limit.as_secs()),
            })
        };
        future::or(f, timer).await
    }
}

/// What a deploy has made so far, so a teardown removes exactly that and never someone
/// else's container of the same id.
#[derive(Debug, Clone, Default)]
struct Made {
    container: bool,
    snapshot: Option<(String, String)>,
    task: bool,
    network: bool,
}

impl Made {
    fn everything(c: &ctrd::Container) -> Made {
        Made {
            container: true,
            // A container made by another tool may have no snapshot.
            snapshot: (!c.snapshot_key.is_empty())
                .then(|| (c.snapshotter.clone(), c.snapshot_key.clone())),
            task: true,
            network: true,
        }
    }
}

struct Slot {
    inst: Instance,
    gen: u64,
    deploy: Option<Task<()>>,
    made: Rc<RefCell<Made>>,
}

struct Actor {
    ctx: Rc<Ctx>,
    ex: Rc<LocalExecutor<'static>>,
    table: HashMap<String, Slot>,
    status: Sender<StatusChange>,
}

enum Next {
    Request(Request),
    Internal(Internal),
    Tick,
    Stop,
}

impl Actor {
    async fn run(mut self, requests: Receiver<Request>, internal: Receiver<Internal>) {
        self.adopt().await;
        loop {
            let t = self.ctx.cfg.timeouts;
            let deadline = self
                .table
                .values()
                .filter_map(|s| s.inst.deadline(&t))
                .min();
            let next = future::or(
                async {
                    match requests.recv().await {
                        Ok(r) => Next::Request(r),
                        Err(_) => Next::Stop,
                    }
                },
                future::or(
                    async {
                        match internal.recv().await {
                            Ok(i) => Next::Internal(i),
                            Err(_) => Next::Stop,
                        }
                    },
                    async {
                        match deadline {
                            Some(d) => Timer::at(d).await,
                            None => future::pending().await,
                        };
                        Next::Tick
                    },
                ),
            )
            .await;
            match next {
                Next::Request(r) => self.on_request(r).await,
                Next::Internal(i) => self.on_internal(i).await,
                Next::Tick => {
                    let now = Instant::now();
                    let due: Vec<String> = self
                        .table
                        .iter()
                        .filter(|(_, s)| s.inst.deadline(&t).is_some_and(|d| d <= now))
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in due {
                        self.feed(&id, Input::Tick).await;
                    }
                }
                Next::Stop => {
                    log::info!(
                        "runtime stopped; instances keep running and are adopted at the next start"
                    );
                    return;
                }
            }
        }
    }

    async fn on_request(&mut self, r: Request) {
        match r {
            Request::Deploy(job) => {
                let id = job.container_id();
                if let Err(e) = job.validate() {
                    let (name, n) = (job.job_name.clone(), job.instance_number);
                    self.report(&name, n, Status::Failed, e.to_string()).await;
                    return;
                }
                if self.table.contains_key(&id) {
                    log::info!("deploy of {id}: already here; answering with its current status");
                    self.feed(&id, Input::Deploy(job)).await;
                    return;
                }
                if self.table.len() >= self.ctx.cfg.capacity {
                    let detail = format!(
                        "this worker already holds {} instances, its limit; deploy elsewhere or undeploy some",
                        self.ctx.cfg.capacity
                    );
                    log::warn!("deploy of {id}: {detail}");
                    let (name, n) = (job.job_name.clone(), job.instance_number);
                    self.report(&name, n, Status::Failed, detail).await;
                    return;
                }
                let (inst, actions) = Instance::deploy(job, Instant::now());
                self.table.insert(id.clone(), Slot::new(inst));
                self.act(&id, actions).await;
            }
            Request::Undeploy(d) => {
                let id = container_id(&d.job_name, d.instance_number);
                if self.table.contains_key(&id) {
                    self.feed(&id, Input::Undeploy).await;
                } else {
                    // Upstream sends no report either (worker-protocol §5.2).
                    log::info!("undeploy of {id}: not deployed on this worker; nothing to do");
                }
            }
            Request::Resources(reply) => {
                // An instance being stopped must not be listed: the cluster would set it
                // RUNNING again right after our UNDEPLOYED (worker-protocol §3.6).
                let leaving: Vec<String> = self
                    .table
                    .iter()
                    .filter(|(_, s)| {
                        matches!(
                            s.inst.phase,
                            Phase::Stopping { .. } | Phase::Cleaning { .. }
                        )
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                let ctx = self.ctx.clone();
                self.ex
                    .spawn(async move {
                        let _ = reply.send(sample(&ctx, &leaving).await).await;
                    })
                    .detach();
            }
        }
    }

    async fn on_internal(&mut self, i: Internal) {
        match i {
            Internal::Step { id, gen, input } => {
                if self.table.get(&id).is_some_and(|s| s.gen == gen) {
                    self.feed(&id, input).await;
                }
            }
            Internal::Exit { id, code } => self.feed(&id, Input::Exited { code }).await,
            Internal::Oom { id } => self.feed(&id, Input::Oom).await,
            Internal::Resync(tasks) => {
                let ids: Vec<String> = self.table.keys().cloned().collect();
                for id in ids {
                    let input = match tasks.iter().find(|p| p.id == id) {
                        Some(p) if p.status == ProcessStatus::Stopped => Input::Exited {
                            code: p.exit_status,
                        },
                        Some(_) => continue,
                        None => Input::Vanished,
                    };
                    self.feed(&id, input).await;
                }
            }
        }
    }

    async fn feed(&mut self, id: &str, input: Input) {
        let Some(slot) = self.table.get_mut(id) else {
            return;
        };
        let actions = slot.inst.on(input, Instant::now(), &self.ctx.cfg.timeouts);
        self.act(id, actions).await;
    }

    async fn act(&mut self, id: &str, actions: Vec<Action>) {
        for a in actions {
            let Some(slot) = self.table.get_mut(id) else {
                return;
            };
            match a {
                Action::Report(status, detail) => {
                    let (name, n) = (slot.inst.job_name.clone(), slot.inst.number);
                    self.report(&name, n, status, detail).await;
                }
                Action::StartDeploy(job) => {
                    slot.gen += 1;
                    *slot.made.borrow_mut() = Made::default();
                    let (ctx, made, gen, id) =
                        (self.ctx.clone(), slot.made.clone(), slot.gen, id.to_owned());
                    slot.deploy = Some(self.ex.spawn(async move {
                        let input = match deploy(&ctx, &job, &made).await {
                            Ok(detail) => Input::Started { detail },
                            Err(reason) => {
                                log::warn!("deploy of {id} failed: {reason}");
                                Input::DeployFailed(reason)
                            }
                        };
                        let _ = ctx.internal.send(Internal::Step { id, gen, input }).await;
                    }));
                }
                Action::CancelDeploy => drop(slot.deploy.take()),
                Action::Kill(signal) => {
                    let (ctx, id) = (self.ctx.clone(), id.to_owned());
                    self.ex
                        .spawn(async move { kill(&ctx, &id, signal).await })
                        .detach();
                }
                Action::Cleanup => {
                    slot.deploy = None;
                    let (ctx, made, gen, id) =
                        (self.ctx.clone(), slot.made.clone(), slot.gen, id.to_owned());
                    self.ex
                        .spawn(async move {
                            let made = made.borrow().clone();
                            teardown(&ctx, &id, &made).await;
                            let input = Input::CleanedUp;
                            let _ = ctx.internal.send(Internal::Step { id, gen, input }).await;
                        })
                        .detach();
                }
                Action::Forget => {
                    self.table.remove(id);
                }
            }
        }
    }

    async fn report(&self, job_name: &str, instance: u64, status: Status, detail: String) {
        log::info!("{job_name}.instance.{instance}: {status} {detail}");
        let change = StatusChange {
            job_name: job_name.to_owned(),
            instance,
            status,
            detail,
        };
        if self.status.send(change).await.is_err() {
            log::warn!("status of {job_name}.instance.{instance} dropped: nobody reads the runtime's reports");
        }
    }

    /// Reconcile, don't assume (DESIGN.md): take over what containerd runs in our namespace,
    /// tear down what died while the worker was away and report it.
    async fn adopt(&mut self) {
        let mut cl = self.ctx.client();
        let listed = match cl.container_list(&[]).await {
            Ok(c) => c,
            Err(e) => {
                log::error!("adoption skipped, cannot list containers: {e}");
                return;
            }
        };
        let tasks = cl.task_list("").await.unwrap_or_else(|e| {
            log::error!("adoption: cannot list tasks ({e}); treating containers as task-less");
            Vec::new()
        });
        let now = Instant::now();
        for c in listed {
            let Some((job, n)) = parse_container_id(&c.id) else {
                log::info!("container {} is not an Oakestra instance; left alone", c.id);
                continue;
            };
            if self.table.len() >= self.ctx.cfg.capacity {
                log::warn!("container {} not adopted: instance table full", c.id);
                continue;
            }
            let one_shot = c
                .labels
                .iter()
                .any(|(k, v)| k == LABEL_ONE_SHOT && v == "true");
            let inst = match tasks.iter().find(|p| p.id == c.id) {
                Some(p) if p.status == ProcessStatus::Stopped => {
                    Instance::found_dead(job, n, exit_report(one_shot, p.exit_status, false), now)
                }
                Some(p) if p.status == ProcessStatus::Created => {
                    let why = "the worker restarted before the task started; it was removed";
                    Instance::found_dead(job, n, (Status::Failed, why.into()), now)
                }
                Some(_) => Instance::adopted(job, n, one_shot),
                None => {
                    let why = "found without a task after a worker restart; it was removed";
                    Instance::found_dead(job, n, (Status::Dead, why.into()), now)
                }
            };
            let cleaning = matches!(inst.phase, Phase::Cleaning { .. });
            log::info!(
                "{}: {}",
                c.id,
                if cleaning {
                    "found dead; tearing it down"
                } else {
                    "adopted, running"
                }
            );
            let slot = Slot::new(inst);
            *slot.made.borrow_mut() = Made::everything(&c);
            self.table.insert(c.id.clone(), slot);
            if cleaning {
                self.act(&c.id, vec![Action::Cleanup]).await;
            }
        }
    }
}

impl Slot {
    fn new(inst: Instance) -> Slot {
        Slot {
            inst,
            gen: 0,
            deploy: None,
            made: Rc::new(RefCell::new(Made::default())),
        }
    }
}

/// Forwards exits and OOMs; on loss resubscribes with backoff and has the actor reconcile.
async fn watch_events(ctx: Rc<Ctx>, mut stream: EventStream) {
    loop {
        match stream.next().await {
            Ok(env) => {
                let msg = match env.event {
                    Event::TaskExit(e) if e.id == e.container_id => Internal::Exit {
                        id: e.container_id,
                        code: e.exit_status,
                    },
                    Event::TaskOom { container_id } => Internal::Oom { id: container_id },
                    _ => continue,
                };
                if ctx.internal.send(msg).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                log::warn!("containerd event stream lost ({e}); resubscribing");
                let mut backoff = Duration::from_millis(500);
                let cl = ctx.client();
                stream = loop {
                    Timer::after(backoff).await;
                    match subscribe(&cl, &ctx.cfg.namespace).await {
                        Ok(s) => break s,
                        Err(e) => {
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                            log::warn!("resubscribing to containerd events: {e}");
                        }
                    }
                };
                // Exits during the gap were not replayed: compare with what containerd has.
                let mut cl = ctx.client();
                match cl.task_list("").await {
                    Ok(tasks) => {
                        if ctx.internal.send(Internal::Resync(tasks)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => log::warn!("reconciling after resubscribe: {e}"),
                }
            }
        }
    }
}

/// The deploy sequence (worker-protocol §5.2, containerd-client §3.3–3.4). Returns the
/// CREATED report's detail, or the FAILED reason. `made` records each step for the teardown.
async fn deploy(ctx: &Ctx, job: &DeployCommand, made: &RefCell<Made>) -> Result<String, String> {
    let id = job.container_id();
    let cfg = &ctx.cfg;
    let snapshotter = cfg.snapshotter.as_str();
    let platform = Some(job.platform.as_str()).filter(|p| !p.is_empty());
    let mut cl = ctx.client();
    let img = match image::resolve_local(&mut cl, &job.image, snapshotter, platform).await? {
        Some(img) => img,
        None => {
            log::info!("{id}: image {} not present; pulling", job.image);
            ctx.puller.pull(&job.image, platform).await?
        }
    };
    let netns = ctx
        .network
        .attach(&id, job)
        .await
        .map_err(|e| format!("network setup for {id} failed: {e}"))?;
    made.borrow_mut().network = true;
    ctx.etc
        .refresh()
        .map_err(|(p, e)| format!("cannot write {}: {e}", p.display()))?;

    // A user name needs the rootfs's /etc/passwd, hence the snapshot before the container
    // record; a lease keeps it from the GC until the record holds it (spec §2, §3.3).
    let lease = format!("oak-deploy-{id}");
    let numeric = spec::parse_user(&img.config.user).map_err(|e| e.to_string())?;
    let named = numeric.is_none();
    let mut rootfs = Vec::new();
    let user = match numeric {
        Some(user) => Ok(user),
        None => {
            ctx.step("Leases/Create", cl.create_lease(&lease, &[]))
                .await
                .map_err(|e| e.to_string())?;
            cl.set_lease(Some(&lease));
            match prepare_snapshot(ctx, &mut cl, &id, &img.chain_id, made).await {
                Ok(mounts) => {
                    rootfs = mounts;
                    lookup_user(&rootfs, &img.config.user)
                }
                Err(e) => Err(e),
            }
        }
    };
    let created = match user {
        Ok(user) => create_container(ctx, &mut cl, job, &img, user, netns.as_deref(), made).await,
        Err(e) => Err(e),
    };
    if named {
        cl.set_lease(None);
        if let Err(e) = ctx
            .step("Leases/Delete", cl.delete_lease(&lease, false))
            .await
        {
            log::warn!("{id}: lease {lease} not deleted: {e}");
        }
    }
    let detail = created?;
    if !named {
        rootfs = prepare_snapshot(ctx, &mut cl, &id, &img.chain_id, made).await?;
    }

    let log_path = logs::path(&cfg.app_logs, &id);
    let uri = logs::uri(&log_path);
    let task = ctrd::CreateTask {
        container_id: &id,
        rootfs: &rootfs,
        stdin: "",
        stdout: &uri,
        stderr: &uri,
        terminal: false,
    };
    made.borrow_mut().task = true;
    ctx.step("Tasks/Create", cl.task_create(&task))
        .await
        .map_err(|e| format!("creating the task of {id} failed: {e}"))?;
    ctx.step("Tasks/Start", cl.task_start(&id))
        .await
        .map_err(|e| format!("starting {id} failed: {e}"))?;
    Ok(detail)
}

async fn prepare_snapshot(
    ctx: &Ctx,
    cl: &mut Client,
    id: &str,
    parent: &str,
    made: &RefCell<Made>,
) -> Result<Vec<ctrd::Mount>, String> {
    let snapshotter = ctx.cfg.snapshotter.as_str();
    let mut r = ctx
        .step(
            "Snapshots/Prepare",
            cl.snapshot_prepare(snapshotter, id, parent, &[]),
        )
        .await;
    if r.as_ref().err().is_some_and(ctrd::Error::is_already_exists) {
        // Left by a teardown that could not finish (crash between the container and the
        // snapshot removal): nothing else owns a key equal to our container id.
        log::warn!("{id}: removing a leftover snapshot of the same key");
        let _ = ctx
            .step("Snapshots/Remove", cl.snapshot_remove(snapshotter, id))
            .await;
        r = ctx
            .step(
                "Snapshots/Prepare",
                cl.snapshot_prepare(snapshotter, id, parent, &[]),
            )
            .await;
    }
    let mounts = r.map_err(|e| format!("preparing the rootfs of {id} failed: {e}"))?;
    made.borrow_mut().snapshot = Some((snapshotter.to_owned(), id.to_owned()));
    Ok(mounts)
}

/// Builds the spec and creates the container record. Returns the CREATED detail.
async fn create_container(
    ctx: &Ctx,
    cl: &mut Client,
    job: &DeployCommand,
    img: &super::PulledImage,
    user: (u32, u32),
    netns: Option<&Path>,
    made: &RefCell<Made>,
) -> Result<String, String> {
    let cfg = &ctx.cfg;
    let id = job.container_id();
    let cgroup_parent = cfg.cgroup_parent();
    let built = spec::build(&spec::Input {
        cgroup_parent: &cgroup_parent,
        container_id: &id,
        instance: job.instance_number,
        image: &img.config,
        cmd: &job.cmd,
        environment: &job.environment,
        memory_mib: job.memory,
        vcpus: job.vcpus,
        privileged: job.privileged,
        user,
        limits: spec::Limits {
            memory: ctx.host.memory.is_some(),
            cpu: ctx.host.cpu.is_some(),
            swap: ctx.host.swap,
        },
        netns,
        resolv_conf: &ctx.etc.resolv,
        hosts: &ctx.etc.hosts,
    })
    .map_err(|e| e.to_string())?;
    let runc_root = cfg.runc_root().to_string_lossy().into_owned();
    let one_shot = if job.one_shot { "true" } else { "false" };
    let labels = [(LABEL_MANAGED, "NodeEngine"), (LABEL_ONE_SHOT, one_shot)];
    let c = ctrd::NewContainer {
        id: &id,
        labels: &labels,
        image: &img.name,
        runtime: ctrd::RUNC_V2,
        runc_options: Some(ctrd::RuncOptions {
            root: &runc_root,
            ..Default::default()
        }),
        spec_json: &built.json,
        snapshotter: &cfg.snapshotter,
        snapshot_key: &id,
    };
    match ctx.step("Containers/Create", cl.container_create(&c)).await {
        Ok(_) => made.borrow_mut().container = true,
        Err(e) if e.is_already_exists() => {
            return Err(format!(
                "a container {id} already exists in containerd namespace {} but this worker does not manage it: remove it (ctr -n {} containers rm {id}) or undeploy the instance",
                cfg.namespace, cfg.namespace
            ))
        }
        Err(e) => return Err(format!("creating container {id} failed: {e}")),
    }
    Ok(match built.not_enforced {
        Some(note) => {
            if !ctx.warned.replace(true) {
                log::warn!("{id}: {note}");
            }
            note
        }
        None => job.status_detail.clone(),
    })
}

/// A user name from the image, looked up in the rootfs's /etc/passwd through the snapshot's
/// mounts (overlay: upper then lower dirs, top first; bind: its source).
fn lookup_user(mounts: &[ctrd::Mount], user: &str) -> Result<(u32, u32), String> {
    let (name, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    for m in mounts {
        if m.kind == "bind" {
            dirs.push(PathBuf::from(&m.source));
        }
        for o in &m.options {
            if let Some(u) = o.strip_prefix("upperdir=") {
                dirs.insert(0, PathBuf::from(u));
            } else if let Some(l) = o.strip_prefix("lowerdir=") {
                dirs.extend(l.split(':').map(PathBuf::from));
            }
        }
    }
    let passwd = dirs
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("etc/passwd")).ok())
        .unwrap_or_default();
    let (uid, gid) = match name.parse::<u32>() {
        Ok(uid) => (uid, 0),
        Err(_) => spec::passwd_lookup(&passwd, name).ok_or_else(|| {
            format!("the image's user {name:?} is not in its /etc/passwd: fix the image's USER or use a numeric uid")
        })?,
    };
    match group.map(|g| g.parse::<u32>()) {
        None => Ok((uid, gid)),
        Some(Ok(g)) => Ok((uid, g)),
        Some(Err(_)) => Err(format!(
            "the image's user {user:?} names a group: only numeric groups are supported; use uid:gid"
        )),
    }
}

async fn kill(ctx: &Ctx, id: &str, signal: u32) {
    let mut cl = ctx.client();
    match ctx
        .step("Tasks/Kill", cl.task_kill(id, signal, false))
        .await
    {
        Ok(()) => log::info!("{id}: sent signal {signal}"),
        // Already exited (or gone): the exit event or the teardown takes it from here.
        Err(e) if e.is_not_found() || e.to_string().contains("already finished") => {}
        Err(e) => log::warn!("{id}: signal {signal} not delivered: {e}"),
    }
}

/// Teardown in containerd's required order (spec §3.5): kill → exit → Tasks/Delete →
/// Containers/Delete → Snapshots/Remove. Each step is bounded; a failed one is logged and
/// the rest still runs. NotFound is success everywhere (GC may have been first).
async fn teardown(ctx: &Ctx, id: &str, made: &Made) {
    let mut cl = ctx.client();
    let warn = |what: &str, e: ctrd::Error| {
        if !e.is_not_found() {
            log::warn!("{id}: teardown step {what} failed: {e}; continuing");
        }
    };
    if made.task {
        match ctx.step("Tasks/Get", cl.task_get(id)).await {
            Ok(p) if p.status != ProcessStatus::Stopped => {
                // A cancelled deploy or a task that outlived the grace: SIGKILL and wait.
                if let Err(e) = ctx.step("Tasks/Kill", cl.task_kill(id, 9, true)).await {
                    warn("Tasks/Kill", e);
                }
                // Tasks/Wait holds its connection: a second client (client.rs docs).
                let mut waiter = ctx.client();
                let wait = ctx.cfg.timeouts.kill_wait;
                let timer = async {
                    Timer::after(wait).await;
                    log::warn!("{id}: no exit {} s after SIGKILL", wait.as_secs());
                };
                future::or(
                    async {
                        let _ = waiter.task_wait(id).await;
                    },
                    timer,
                )
                .await;
            }
            Ok(_) => {}
            Err(e) => warn("Tasks/Get", e),
        }
        if let Err(e) = ctx.step("Tasks/Delete", cl.task_delete(id)).await {
            warn("Tasks/Delete", e);
        }
    }
    if made.network {
        let limit = ctx.cfg.step_timeout;
        let timer = async {
            Timer::after(limit).await;
            log::warn!(
                "{id}: network detach took over {} s; continuing the teardown",
                limit.as_secs()
            );
        };
        future::or(ctx.network.detach(id), timer).await;
    }
    if made.container {
        if let Err(e) = ctx.step("Containers/Delete", cl.container_delete(id)).await {
            warn("Containers/Delete", e);
        }
    }
    if let Some((snapshotter, key)) = &made.snapshot {
        if let Err(e) = ctx
            .step("Snapshots/Remove", cl.snapshot_remove(snapshotter, key))
            .await
        {
            warn("Snapshots/Remove", e);
        }
    }
}

/// Per-instance state of the `jobs/resources` sampling: previous CPU counters, the disk use
/// (Snapshots/Usage walks the container's upper dir, so it is refreshed only every 30 s),
/// and buffers reused across rounds.
struct Sampler {
    cpu: metrics::CpuHistory,
    disk: HashMap<String, (Instant, i64)>,
    /// Each container's `cgroupsPath`, read once from its spec.
    cgroups: HashMap<String, String>,
    capacity: usize,
    text: String,
    bytes: Vec<u8>,
}

const DISK_REFRESH: Duration = Duration::from_secs(30);

impl Sampler {
    fn new(capacity: usize) -> Sampler {
        Sampler {
            cpu: metrics::CpuHistory::new(capacity),
            disk: HashMap::new(),
            cgroups: HashMap::new(),
            capacity,
            text: String::new(),
            bytes: Vec::new(),
        }
    }
}

/// Every container of the namespace whose task runs, with upstream's string metrics
/// (worker-protocol §3.6): that includes instances this process did not start, but not those
/// in `leaving` (being torn down).
async fn sample(ctx: &Ctx, leaving: &[String]) -> Result<Vec<InstanceResources>, String> {
    let mut cl = ctx.client();
    let containers = ctx
        .step("Containers/List", cl.container_list(&[]))
        .await
        .map_err(|e| e.to_string())?;
    let tasks = ctx
        .step("Tasks/List", cl.task_list(""))
        .await
        .map_err(|e| e.to_string())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| metrics::parse_mem_available(&m))
        .unwrap_or(0);
    let now = Instant::now();
    ctx.history.borrow_mut().cpu.begin();
    let mut out = Vec::new();
    for c in &containers {
        let Some((job, n)) = parse_container_id(&c.id) else {
            continue;
        };
        if leaving.contains(&c.id) {
            continue;
        }
        let running = tasks.iter().any(|p| {
            p.id == c.id && matches!(p.status, ProcessStatus::Running | ProcessStatus::Paused)
        });
        if !running {
            continue;
        }
        let cached = ctx.history.borrow().disk.get(&c.id).copied();
        let disk = match cached {
            Some((at, bytes)) if now.duration_since(at) < DISK_REFRESH => bytes,
            _ => {
                let u = ctx
                    .step(
                        "Snapshots/Usage",
                        cl.snapshot_usage(&c.snapshotter, &c.snapshot_key),
                    )
                    .await
                    .map(|u| u.size)
                    .unwrap_or(0);
                let mut h = ctx.history.borrow_mut();
                if h.disk.len() < h.capacity || h.disk.contains_key(&c.id) {
                    h.disk.insert(c.id.clone(), (now, u));
                }
                u
            }
        };
        let mut h = ctx.history.borrow_mut();
        let h = &mut *h;
        if !h.cgroups.contains_key(&c.id) && h.cgroups.len() < h.capacity {
            let path =
                spec::cgroups_path_of(&c.spec).unwrap_or_else(|| ctx.cfg.cgroups_path(&c.id));
            h.cgroups.insert(c.id.clone(), path);
        }
        let s = match h.cgroups.get(&c.id) {
            Some(path) => metrics::read(&ctx.host, path, &mut h.text),
            None => metrics::read(&ctx.host, &ctx.cfg.cgroups_path(&c.id), &mut h.text),
        };
        let cpu = s
            .cpu_ns
            .map_or(0.0, |ns| h.cpu.percent(&c.id, ns, now, cores));
        let mem = match (s.memory, available) {
            (Some(m), a) if a > 0 => m as f64 / a as f64,
            _ => 0.0,
        };
        let log = logs::tail(
            &logs::path(&ctx.cfg.app_logs, &c.id),
            logs::TAIL_BYTES,
            &mut h.bytes,
        );
        out.push(InstanceResources {
            cpu_percent: metrics::go_float(cpu),
            memory_percent: metrics::go_float(mem),
            disk: disk.to_string(),
            logs: log,
            job_name: job.to_owned(),
            virtualization: "docker".into(),
            instance: n,
        });
    }
    let mut h = ctx.history.borrow_mut();
    h.cpu.retain_seen();
    h.disk
        .retain(|id, _| containers.iter().any(|c| &c.id == id));
    h.cgroups
        .retain(|id, _| containers.iter().any(|c| &c.id == id));
    Ok(out)
}

/// `/etc/resolv.conf` and `/etc/hosts` for the containers, written under the state dir and
/// bind-mounted read-only. resolv.conf comes from systemd-resolved's upstream list when there
/// is one (the 127.0.0.53 stub is unreachable from a container's netns), as upstream does.
struct EtcFiles {
    resolv: PathBuf,
    hosts: PathBuf,
}

impl EtcFiles {
    fn new(dir: &Path) -> EtcFiles {
        EtcFiles {
            resolv: dir.join("resolv.conf"),
            hosts: dir.join("hosts"),
        }
    }

    /// Rewrites the files if the host's changed. Replaced by rename, so running containers
    /// keep the version they started with.
    fn refresh(&self) -> Result<(), (PathBuf, std::io::Error)> {
        let resolv = ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_else(|| "nameserver 8.8.8.8\n".into());
        let hosts = std::fs::read_to_string("/etc/hosts")
            .unwrap_or_else(|_| "127.0.0.1\tlocalhost\n::1\tlocalhost\n".into());
        for (path, text) in [(&self.resolv, resolv), (&self.hosts, hosts)] {
            if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
                continue;
            }
            let tmp = path.with_extension("new");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| (path.clone(), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_at(state_dir: &str) -> RuntimeConfig {
        RuntimeConfig {
            socket: "/run/containerd/containerd.sock".into(),
            namespace: "oakestra".into(),
            snapshotter: "overlayfs".into(),
            app_logs: "/tmp/logs".into(),
            state_dir: state_dir.into(),
            timeouts: Timeouts::default(),
            step_timeout: Duration::from_secs(1),
            capacity: 4,
            queue: 4,
            cgroups: None,
        }
    }

    /// Two workers on one host (the drill: a killed worker's orphan and its rescheduled copy,
    /// same container id) must not share a cgroup; one worker keeps its scope across restarts.
    #[test]
    fn workers_on_one_host_get_distinct_stable_cgroups() {
        let id = "app.ns.svc.ns.instance.0";
        let default = config_at(crate::config::DEFAULT_STATE_DIR);
        assert_eq!(default.cgroups_path(id), format!("/oakestra/{id}"));
        assert_eq!(
            config_at("/var/lib/oakestra/").cgroups_path(id),
            format!("/oakestra/{id}"),
            "a trailing slash is the same dir"
        );
        let a = config_at("/srv/worker-a/state");
        let b = config_at("/srv/worker-b/state");
        let (pa, pb) = (a.cgroups_path(id), b.cgroups_path(id));
        assert_ne!(pa, pb);
        assert_ne!(pa, default.cgroups_path(id));
        assert!(
            pa.starts_with("/oakestra/worker-") && pa.ends_with(&format!("/{id}")),
            "{pa}"
        );
        // Stable: the same dir gives the same scope (a restarted worker's new containers sit
        // next to its adopted ones).
        assert_eq!(pa, config_at("/srv/worker-a/state").cgroups_path(id));
        assert_eq!(pa, config_at("/srv/worker-a/state/").cgroups_path(id));
        // Another namespace, another tree.
        let mut other = config_at("/srv/worker-a/state");
        other.namespace = "edge".into();
        assert!(other.cgroups_path(id).starts_with("/edge/worker-"));
    }

    #[test]
    fn user_names_are_looked_up_in_the_rootfs() {
        let root = std::env::temp_dir().join(format!("oak-rootfs-{}", std::process::id()));
        let upper = root.join("upper");
        let lower = root.join("lower");
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::write(
            lower.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nweb:x:33:34::/:/bin/false\n",
        )
        .unwrap();
        let overlay = ctrd::Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", root.join("work").display()),
                format!("upperdir={}", upper.display()),
                format!("lowerdir={}", lower.display()),
            ],
            ..Default::default()
        };
        assert_eq!(
            lookup_user(std::slice::from_ref(&overlay), "web"),
            Ok((33, 34))
        );
        assert_eq!(
            lookup_user(std::slice::from_ref(&overlay), "web:5"),
            Ok((33, 5))
        );
        let e = lookup_user(std::slice::from_ref(&overlay), "nginx").unwrap_err();
        assert!(e.contains("not in its /etc/passwd"), "{e}");
        assert!(lookup_user(std::slice::from_ref(&overlay), "web:staff").is_err());
        // The native snapshotter hands out a bind mount of the rootfs directory.
        let bind = ctrd::Mount {
            kind: "bind".into(),
            source: lower.to_string_lossy().into_owned(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        };
        assert_eq!(lookup_user(&[bind], "web"), Ok((33, 34)));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
