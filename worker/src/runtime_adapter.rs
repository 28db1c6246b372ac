//! Plugs the containerd runtime into the cluster session's boundary (`runtime_link`): commands
//! become `Runtime::deploy/undeploy/resources` calls, the runtime's status changes go back as
//! `Event::Status`, every `Sample` gets one `Event::Resources`. While containerd cannot be
//! reached it retries with backoff and answers deploys FAILED saying so, so the cluster session
//! stays up. It decides nothing about instances (that is `runtime::instance`); [`RegistryPuller`]
//! is the image seam backed by `image::ensure`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use async_channel::{Receiver, Sender};
use async_io::Timer;
use futures_lite::future;
use futures_lite::FutureExt;

use crate::backoff::{self, Backoff};
use crate::containerd::{Client, Options};
use crate::image::{self, Counters, PullConfig, Reference};
use crate::protocol::Status;
use crate::runtime::{
    BoxFuture, Driver, Error, ImageConfig, Network, PulledImage, Puller, Runtime, RuntimeConfig,
};
use crate::runtime_link::{Command, Event, RuntimeSide, StatusChange};
use crate::telemetry::{Containerd, Telemetry};

/// How the adapter reaches containerd.
#[derive(Clone)]
pub struct Config {
    pub runtime: RuntimeConfig,
    /// Delay before the second connection attempt, and the cap the backoff grows to.
    pub retry: (Duration, Duration),
    /// Bound on one `Runtime::start` (connect, prepare, subscribe): a socket whose owner hangs
    /// must not stall the retries.
    pub start_timeout: Duration,
}

impl Config {
    pub fn new(runtime: RuntimeConfig) -> Config {
        Config {
            runtime,
            retry: (Duration::from_secs(1), Duration::from_secs(30)),
            start_timeout: Duration::from_secs(15),
        }
    }
}

/// The runtime configuration for these settings, unpacking into the snapshotter the puller
/// uses (`OAK_CONTAINERD_SNAPSHOTTER`): a container's rootfs parent must be in the same one.
pub fn runtime_config(settings: &crate::config::Settings, pull: &PullConfig) -> RuntimeConfig {
    let mut c = RuntimeConfig::from_settings(settings);
    c.snapshotter = pull.snapshotter.clone();
    c
}

/// Serves `side` until the session drops its end. Connects to containerd first (retrying, and
/// meanwhile failing deploys with the reason); then runs the runtime's driver alongside.
/// Returning drops the driver, which leaves the instances running for the next start to adopt.
pub async fn run(
    side: RuntimeSide,
    cfg: Config,
    puller: Rc<dyn Puller>,
    network: Rc<dyn Network>,
    tel: Arc<Telemetry>,
) {
    let Some((rt, statuses, driver)) = connect(&side, &cfg, puller, network, &tel).await else {
        return;
    };
    let events = side.events.clone();
    let background = async move {
        let forward = async {
            while let Ok(s) = statuses.recv().await {
                if events.send(Event::Status(s)).await.is_err() {
                    break;
                }
            }
        };
        future::zip(driver, forward).await;
        log::error!("the container runtime stopped; deploys fail until the worker restarts");
        std::future::pending::<()>().await
    };
    serve(&side, &rt, &tel).or(background).await;
}

/// Starts the runtime, retrying with backoff. None when the session went away meanwhile.
async fn connect(
    side: &RuntimeSide,
    cfg: &Config,
    puller: Rc<dyn Puller>,
    network: Rc<dyn Network>,
    tel: &Telemetry,
) -> Option<(Runtime, Receiver<StatusChange>, Driver)> {
    let socket = cfg.runtime.socket.display().to_string();
    let mut backoff = Backoff::new(cfg.retry.0, cfg.retry.1);
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let limit = cfg.start_timeout;
        let timeout = async {
            Timer::after(limit).await;
            Err(format!("no answer within {} s", limit.as_secs()))
        };
        let start = async {
            Runtime::start(cfg.runtime.clone(), puller.clone(), network.clone())
                .await
                .map_err(|e| describe(&socket, &e))
        };
        let error = match start.or(timeout).await {
            Ok(started) => {
                if attempt > 1 {
                    log::info!("containerd at {socket} is reachable again (attempt {attempt})");
                }
                tel.set_containerd(Containerd::Connected { socket });
                return Some(started);
            }
            Err(e) => e,
        };
        let delay = backoff.next_delay(backoff::jitter());
        log::error!(
            "{error}; retrying in {} ms (deploys are answered FAILED until then)",
            delay.as_millis()
        );
        tel.set_containerd(Containerd::Unreachable {
            error: error.clone(),
        });
        let retry = async {
            Timer::after(delay).await;
            true
        };
        let unavailable = async {
            serve_unavailable(side, &error).await;
            false
        };
        if !retry.or(unavailable).await {
            return None;
        }
    }
}

/// The operator-facing reason a start failed: containerd itself, or our own preparation.
fn describe(socket: &str, e: &Error) -> String {
    match e {
        Error::Containerd(e) => {
            // The client's errors already name the socket and often the fix; say it once.
            let text = e.to_string();
            let prefix = format!("containerd at {socket}: ");
            let detail = text.strip_prefix(&prefix).unwrap_or(&text);
            let hint = if detail.contains("OAK_CONTAINERD_SOCKET") {
                ""
            } else {
                " (is containerd running? OAK_CONTAINERD_SOCKET selects the socket)"
            };
            format!("containerd at {socket} unreachable: {detail}{hint}")
        }
        other => format!("container runtime not ready: {other}"),
    }
}

/// Answers commands while there is no runtime: deploys FAILED with `why`, samples empty (no
/// instance is known), deletes find nothing. Returns when the session goes away.
async fn serve_unavailable(side: &RuntimeSide, why: &str) {
    while let Ok(cmd) = side.commands.recv().await {
        let ev = match cmd {
            Command::Deploy(d) => failed(d.job_name, d.instance_number, why.to_string()),
            Command::Delete(d) => {
                log::warn!(
                    "delete {}.instance.{} while containerd is unreachable: nothing to do now; a running container is adopted once containerd answers, and the cluster deletes it again",
                    d.job_name,
                    d.instance_number
                );
                continue;
            }
            Command::Sample => Event::Resources(Vec::new()),
        };
        if side.events.send(ev).await.is_err() {
            return;
        }
    }
}

fn failed(job_name: String, instance: u64, detail: String) -> Event {
    Event::Status(StatusChange {
        job_name,
        instance,
        status: Status::Failed,
        detail,
    })
}

/// Commands to the runtime. Samples run beside the command loop (a slow containerd must not
/// hold deploys back); one waits at most while another runs, further ones are coalesced.
async fn serve(side: &RuntimeSide, rt: &Runtime, tel: &Telemetry) {
    let (want_sample, sample_due) = async_channel::bounded::<()>(1);
    let commands = async {
        while let Ok(cmd) = side.commands.recv().await {
            match cmd {
                Command::Deploy(d) => {
                    let (job, n) = (d.job_name.clone(), d.instance_number);
                    if let Err(e) = rt.deploy(d).await {
                        if side
                            .events
                            .send(failed(job, n, e.to_string()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                Command::Delete(d) => {
                    let what = format!("{}.instance.{}", d.job_name, d.instance_number);
                    if let Err(e) = rt.undeploy(d).await {
                        log::error!("delete {what}: {e}");
                    }
                }
                Command::Sample => {
                    // Full: a sample is already waiting, and its answer serves this request too.
                    let _ = want_sample.try_send(());
                }
            }
        }
    };
    commands
        .or(sample_loop(&sample_due, rt, &side.events, tel))
        .await;
}

async fn sample_loop(due: &Receiver<()>, rt: &Runtime, events: &Sender<Event>, tel: &Telemetry) {
    let mut failing = false;
    while due.recv().await.is_ok() {
        let list = match rt.resources().await {
            Ok(l) => {
                if failing {
                    log::info!("instance samples work again");
                    failing = false;
                }
                l
            }
            Err(e) => {
                tel.counters
                    .sample_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Logged once per streak: this repeats every report interval.
                if !failing {
                    log::warn!("cannot sample the instances: {e}; reporting none until it works");
                    failing = true;
                }
                // An empty list only omits the heartbeat of instances; the cluster judges a
                // worker's liveness by `information`, so nothing is failed for this.
                Vec::new()
            }
        };
        if events.send(Event::Resources(list)).await.is_err() {
            return;
        }
    }
    std::future::pending::<()>().await
}

/// The image seam over `image::ensure`: one short-lived containerd client per pull; pulls of
/// the same image and platform wait for each other, so the second finds the image present
/// instead of racing the first through containerd's ingest locks.
pub struct RegistryPuller {
    socket: PathBuf,
    namespace: String,
    cfg: PullConfig,
    counters: Arc<Counters>,
    gates: RefCell<HashMap<String, Rc<Gate>>>,
}

impl RegistryPuller {
    pub fn new(runtime: &RuntimeConfig, cfg: PullConfig, counters: Arc<Counters>) -> Self {
        RegistryPuller {
            socket: runtime.socket.clone(),
            namespace: runtime.namespace.clone(),
            cfg,
            counters,
            gates: RefCell::new(HashMap::new()),
        }
    }

    fn gate(&self, key: &str) -> Rc<Gate> {
        self.gates
            .borrow_mut()
            .entry(key.to_string())
            .or_insert_with(|| Rc::new(Gate::new()))
            .clone()
    }

    /// Forgets the gate once nobody else holds or waits on it (the map only keeps images
    /// being pulled).
    fn release(&self, key: &str, gate: Rc<Gate>) {
        // Two holders left: the map and `gate` itself.
        if Rc::strong_count(&gate) == 2 {
            self.gates.borrow_mut().remove(key);
        }
    }

    async fn pull_one(
        &self,
        reference: &str,
        platform: Option<&str>,
    ) -> Result<PulledImage, String> {
        let normalized =
            Reference::parse(reference).map_or_else(|_| reference.to_string(), |r| r.to_string());
        let key = format!("{normalized} {}", platform.unwrap_or(""));
        let gate = self.gate(&key);
        let result = {
            let _pass = gate.enter().await;
            let mut client = Client::new(Options::new(&self.socket, &self.namespace))
                .map_err(|e| format!("cannot pull {reference}: {e}"))?;
            image::ensure(&mut client, &self.cfg, reference, platform, &self.counters).await
        };
        self.release(&key, gate);
        let img = result.map_err(|e| e.status_detail())?;
        if img.snapshotter != self.cfg.snapshotter {
            return Err(format!(
                "image {} was unpacked into snapshotter {}, not {}",
                img.name, img.snapshotter, self.cfg.snapshotter
            ));
        }
        Ok(runtime_image(img))
    }
}

impl Puller for RegistryPuller {
    fn pull<'a>(
        &'a self,
        reference: &'a str,
        platform: Option<&'a str>,
    ) -> BoxFuture<'a, Result<PulledImage, String>> {
        Box::pin(self.pull_one(reference, platform))
    }
}

/// The puller's answer in the runtime's terms (what a container needs from the image).
fn runtime_image(img: image::PulledImage) -> PulledImage {
    let run = img.config;
    PulledImage {
        name: img.name,
        config: ImageConfig {
            env: run.env,
            entrypoint: run.entrypoint,
            cmd: run.cmd,
            working_dir: run.working_dir,
            user: run.user,
        },
        chain_id: img.chain_id,
    }
}

/// An async mutex without a value: a channel holding one token (no extra dependency).
struct Gate {
    tx: Sender<()>,
    rx: Receiver<()>,
}

impl Gate {
    fn new() -> Gate {
        let (tx, rx) = async_channel::bounded(1);
        // Cannot fail: the channel is new, empty and has room for one.
        let _ = tx.try_send(());
        Gate { tx, rx }
    }

    async fn enter(&self) -> Pass<'_> {
        // Both ends live in `self`, so the channel never closes while we wait.
        let _ = self.rx.recv().await;
        Pass(&self.tx)
    }
}

/// Returns the token when dropped, also when the pull future is cancelled mid-way.
struct Pass<'a>(&'a Sender<()>);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DeleteCommand, DeployCommand};
    use crate::runtime::NoNetwork;
    use crate::runtime_link;

    fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
        async_io::block_on(f.or(async {
            Timer::after(Duration::from_secs(secs)).await;
            panic!("timed out after {secs} s")
        }))
    }

    fn deploy(job: &str, n: u64) -> DeployCommand {
        DeployCommand::decode(
            format!(
                r#"{{"job_name":"{job}","instance_number":{n},"image":"127.0.0.1:1/x:1","virtualization":"docker"}}"#
            )
            .as_bytes(),
        )
        .expect("a well-formed deploy")
    }

    fn runtime_config_at(dir: &std::path::Path, socket: &std::path::Path) -> RuntimeConfig {
        RuntimeConfig {
            socket: socket.to_path_buf(),
            namespace: "oakestra".into(),
            snapshotter: "overlayfs".into(),
            app_logs: dir.join("logs"),
            state_dir: dir.join("state"),
            timeouts: Default::default(),
            step_timeout: Duration::from_secs(1),
            capacity: 4,
            queue: 4,
            cgroups: None,
        }
    }

    /// No containerd at the socket: the session still gets answers, the reason names the
    /// socket, and /status says so; the adapter keeps retrying until the session goes away.
    #[test]
    fn unreachable_containerd_fails_deploys_and_keeps_retrying() {
        let dir = std::env::temp_dir().join(format!("oak-adapter-{}", std::process::id()));
        let socket = dir.join("no-containerd.sock");
        let settings_like = runtime_config_at(&dir, &socket);
        let mut cfg = Config::new(settings_like);
        cfg.retry = (Duration::from_millis(50), Duration::from_millis(100));
        let tel = Telemetry::new("n", "c:1");
        let (session, rt_side) = runtime_link::link(8);
        let adapter = run(
            rt_side,
            cfg,
            Rc::new(crate::runtime::NoPuller),
            Rc::new(NoNetwork),
            tel.clone(),
        );
        let test = async {
            // Let a few attempts fail first: the adapter must keep answering in between.
            Timer::after(Duration::from_millis(300)).await;
            session
                .commands
                .send(Command::Deploy(deploy("a.b.c.d", 3)))
                .await
                .unwrap();
            match session.events.recv().await.unwrap() {
                Event::Status(s) => {
                    assert_eq!((s.job_name.as_str(), s.instance), ("a.b.c.d", 3));
                    assert_eq!(s.status, Status::Failed);
                    let want = format!("containerd at {} unreachable: ", socket.display());
                    assert!(s.detail.starts_with(&want), "{}", s.detail);
                    assert_eq!(s.detail.matches("containerd at").count(), 1, "{}", s.detail);
                    assert!(s.detail.contains("OAK_CONTAINERD_SOCKET"), "{}", s.detail);
                }
                other => panic!("expected FAILED, got {other:?}"),
            }
            session
                .commands
                .send(Command::Delete(DeleteCommand {
                    job_name: "a.b.c.d".into(),
                    virtualization: "docker".into(),
                    instance_number: 3,
                }))
                .await
                .unwrap();
            session.commands.send(Command::Sample).await.unwrap();
            assert_eq!(
                session.events.recv().await.unwrap(),
                Event::Resources(Vec::new())
            );
            let status = tel.status_json();
            assert_eq!(status["containerd"]["state"], "unreachable", "{status}");
            assert!(tel.metrics_text().contains("oak_worker_containerd_up 0"));
            assert!(tel.metrics_text().contains("oak_image_pulls_total 0"));
            // The session goes away: the adapter ends.
            drop(session);
        };
        within(10, future::zip(adapter, test));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gate_serialises_and_is_forgotten() {
        let dir = std::path::Path::new("/nonexistent");
        let rt = runtime_config_at(dir, &dir.join("sock"));
        let p = RegistryPuller::new(
            &rt,
            PullConfig::new(vec![], None, "overlayfs"),
            Arc::default(),
        );
        let order = RefCell::new(Vec::new());
        let one = |tag: &'static str| {
            let (p, order) = (&p, &order);
            async move {
                let gate = p.gate("img");
                {
                    let _pass = gate.enter().await;
                    order.borrow_mut().push(format!("{tag} in"));
                    Timer::after(Duration::from_millis(30)).await;
                    order.borrow_mut().push(format!("{tag} out"));
                }
                p.release("img", gate);
            }
        };
        within(5, future::zip(one("a"), one("b")));
        assert_eq!(*order.borrow(), ["a in", "a out", "b in", "b out"]);
        assert!(p.gates.borrow().is_empty());
    }
}
