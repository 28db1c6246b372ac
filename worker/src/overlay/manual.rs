//! `network manual` from the NodeEngine's side: the client of a separately running NetManager's
//! local API (HTTP/1.1 on a unix socket, spec worker-protocol §7; the server is [`super::api`],
//! or upstream's Go NetManager). `/register` is sent after every cluster registration (the
//! NetManager needs the node id for its own MQTT client); each instance gets a named netns made
//! here, which the NetManager wires through `/container/deploy`, and `/container/undeploy`
//! undoes it. The API identifies the namespace by a pid (`/proc/<pid>/ns/net`) and upstream
//! passes the task's pid before the task starts. Our runtime joins the netns at create time,
//! before any task exists, so a short-lived thread that entered the namespace stands in: its
//! thread id names the same `/proc/<tid>/ns/net` for as long as the request takes.

use std::cell::RefCell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};

use super::{netns, SessionLink, ToOverlay, LINK_CAPACITY};
use crate::runtime::{BoxFuture, Network};

/// Largest answer read from the NetManager.
const MAX_ANSWER: u64 = 64 << 10;

#[derive(Debug, Clone)]
pub struct ManualClientConfig {
    pub socket: PathBuf,
    /// Sent as `cluster_address` in `/register` (the NetManager's MQTT broker host).
    pub cluster_address: String,
    pub netns_dir: PathBuf,
    /// How long a deploy waits for `/register` to have succeeded.
    pub register_wait: Duration,
    /// Per request; the NetManager itself may wait for its subnet before answering.
    pub request_timeout: Duration,
}

impl ManualClientConfig {
    pub fn new(socket: &Path, cluster_address: &str) -> ManualClientConfig {
        ManualClientConfig {
            socket: socket.to_path_buf(),
            cluster_address: cluster_address.to_string(),
            netns_dir: PathBuf::from("/run/netns"),
            register_wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
        }
    }
}

struct State {
    cfg: ManualClientConfig,
    /// The node id the NetManager accepted.
    registered: Option<String>,
}

/// The runtime's [`Network`] in manual mode. Cheap to clone.
#[derive(Clone)]
pub struct ManualNetwork {
    st: Rc<RefCell<State>>,
}

impl ManualNetwork {
    /// The network, the session's link (it only tells registrations; nothing is published for
    /// the NetManager, which has its own MQTT client) and the task that registers.
    pub fn new(cfg: ManualClientConfig) -> (ManualNetwork, SessionLink, impl Future<Output = ()>) {
        let (to_overlay, from_session) = async_channel::bounded(LINK_CAPACITY);
        let (ops_tx, ops) = async_channel::bounded(1);
        let net = ManualNetwork {
            st: Rc::new(RefCell::new(State {
                cfg,
                registered: None,
            })),
        };
        let me = net.clone();
        let task = async move {
            // Holding the sender keeps the session's side of the link open.
            let _ops = ops_tx;
            while let Ok(m) = from_session.recv().await {
                if let ToOverlay::Registered { node_id } = m {
                    me.register(&node_id).await;
                }
            }
        };
        (net, SessionLink { to_overlay, ops }, task)
    }

    /// `/register` until the NetManager accepts it (it may start after us).
    async fn register(&self, node_id: &str) {
        if self.st.borrow().registered.as_deref() == Some(node_id) {
            return;
        }
        self.st.borrow_mut().registered = None;
        let (socket, body, timeout) = {
            let st = self.st.borrow();
            (
                st.cfg.socket.clone(),
                serde_json::json!({"client_id": node_id, "cluster_address": st.cfg.cluster_address})
                    .to_string(),
                st.cfg.request_timeout,
            )
        };
        let mut delay = Duration::from_millis(500);
        let mut logged = false;
        loop {
            match post(&socket, "/register", &body, timeout).await {
                Ok((200, _)) => {
                    log::info!(
                        "NetManager at {} registered node {node_id}",
                        socket.display()
                    );
                    self.st.borrow_mut().registered = Some(node_id.to_string());
                    return;
                }
                Ok((code, text)) => {
                    // A NetManager registered under another id refuses until restarted.
                    if !logged {
                        log::error!(
                            "NetManager at {} refused /register ({code}: {}); retrying",
                            socket.display(),
                            text.trim()
                        );
                    }
                }
                Err(e) => {
                    if !logged {
                        log::warn!(
                            "NetManager at {} not reachable ({e}); retrying",
                            socket.display()
                        );
                    }
                }
            }
            logged = true;
            Timer::after(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn wait_registered(&self) -> Result<(), String> {
        let (wait, socket) = {
            let st = self.st.borrow();
            (st.cfg.register_wait, st.cfg.socket.clone())
        };
        let end = Instant::now() + wait;
        while self.st.borrow().registered.is_none() {
            if Instant::now() >= end {
                return Err(format!(
                    "the NetManager at {} has not accepted /register (is it running? `NetManager` with the same socket)",
                    socket.display()
                ));
            }
            Timer::after(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn deploy(
        &self,
        id: &str,
        job: &crate::protocol::DeployCommand,
    ) -> Result<PathBuf, String> {
        self.wait_registered().await?;
        let (dir, socket, timeout) = {
            let st = self.st.borrow();
            (
                st.cfg.netns_dir.clone(),
                st.cfg.socket.clone(),
                st.cfg.request_timeout,
            )
        };
        let path = netns::create(&dir, id).map_err(|e| format!("network namespace {id}: {e}"))?;
        let r = async {
            let holder = Holder::enter(&path)?;
            let body = serde_json::json!({"pid": holder.tid, "serviceName": job.job_name,
                "instanceNumber": job.instance_number, "portMappings": job.port})
            .to_string();
            let answer = post(&socket, "/container/deploy", &body, timeout).await;
            drop(holder);
            match answer {
                Ok((200, text)) => {
                    let ip = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v["nsAddress"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    log::info!("{id}: NetManager gave it {ip}");
                    Ok(())
                }
                Ok((code, text)) => Err(format!(
                    "the NetManager refused the deploy ({code}): {}",
                    message(&text)
                )),
                Err(e) => Err(format!("the NetManager at {}: {e}", socket.display())),
            }
        }
        .await;
        match r {
            Ok(()) => Ok(path),
            Err(e) => {
                let _ = netns::remove(&path);
                Err(e)
            }
        }
    }

    async fn undeploy(&self, id: &str) {
        let (dir, socket, timeout) = {
            let st = self.st.borrow();
            (
                st.cfg.netns_dir.clone(),
                st.cfg.socket.clone(),
                st.cfg.request_timeout,
            )
        };
        if let Some((job, n)) = crate::protocol::parse_container_id(id) {
            let body = serde_json::json!({"pid": -1, "serviceName": job, "instanceNumber": n,
                "portMappings": ""})
            .to_string();
            match post(&socket, "/container/undeploy", &body, timeout).await {
                Ok((200, _)) => {}
                Ok((code, text)) => log::warn!(
                    "{id}: NetManager undeploy answered {code}: {}",
                    message(&text)
                ),
                Err(e) => log::warn!("{id}: NetManager undeploy failed: {e}"),
            }
        }
        let path = dir.join(id);
        if path.exists() {
            if let Err(e) = netns::remove(&path) {
                log::warn!("{id}: {e}");
            }
        }
    }
}

impl Network for ManualNetwork {
    fn attach<'a>(
        &'a self,
        container_id: &'a str,
        job: &'a crate::protocol::DeployCommand,
    ) -> BoxFuture<'a, Result<Option<PathBuf>, String>> {
        Box::pin(async move { self.deploy(container_id, job).await.map(Some) })
    }

    fn detach<'a>(&'a self, container_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.undeploy(container_id))
    }
}

fn message(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().chars().take(200).collect())
}

/// A thread parked inside a network namespace, so `/proc/<tid>/ns/net` names it.
struct Holder {
    tid: i32,
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl Holder {
    fn enter(ns: &Path) -> Result<Holder, String> {
        let file = std::fs::File::open(ns).map_err(|e| format!("open {}: {e}", ns.display()))?;
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("netns-holder".into())
            .spawn(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: a valid namespace fd; CLONE_NEWNET changes only this thread, which
                // does nothing else and ends when released.
                let r = if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
                    // SAFETY: gettid has no preconditions.
                    Ok(unsafe { libc::gettid() })
                } else {
                    Err(std::io::Error::last_os_error().to_string())
                };
                drop(file);
                let ok = r.is_ok();
                let _ = tid_tx.send(r);
                if ok {
                    let _ = wait.recv();
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let tid = tid_rx
            .recv()
            .map_err(|_| "the netns thread ended early".to_string())?
            .map_err(|e| format!("setns into {}: {e}", ns.display()))?;
        Ok(Holder {
            tid,
            release: Some(release),
        })
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.release.take();
    }
}

/// One `POST` with `Connection: close`; (status, body).
async fn post(
    socket: &Path,
    path: &str,
    body: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = Async::<std::os::unix::net::UnixStream>::connect(socket).await?;
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        (&mut s).take(MAX_ANSWER).read_to_end(&mut out).await?;
        Ok(out)
    };
    let out = exchange
        .or(async {
            Timer::after(timeout).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer to {path} within {} s", timeout.as_secs()),
            ))
        })
        .await?;
    let text = String::from_utf8_lossy(&out);
    let code = text
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}
