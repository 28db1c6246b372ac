//! `manual` mode: the overlay alone as upstream's NetManager, behind its local API (HTTP/1.1 on
//! a unix socket, spec worker-protocol §7, overlay-network §6) with its own MQTT client whose id
//! is the bare node id. [`parse`] is the pure request decoder; [`run`] is the shell (tiny_http
//! on its own thread, one queue of 50 requests into the executor, as upstream serialises them).
//! `portMappings` is published as the worker does it ([`super::ports`]). Not here: unikernel
//! endpoints.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_executor::LocalExecutor;
use async_io::Timer;
use futures_lite::FutureExt;
use serde::Deserialize;

use super::{MqttOp, Overlay, OverlayConfig, SessionLink, ToOverlay};
use crate::mqtt::client::{self, Event as MqttEvent, Handle};

/// Upstream's deploy queue length.
pub const QUEUE: usize = 50;
/// Largest request body read.
const MAX_BODY: u64 = 64 << 10;

/// A request of the local API, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    Register {
        client_id: String,
        cluster_address: String,
    },
    Deploy {
        pid: i32,
        service: String,
        instance: u32,
        ports: String,
    },
    Undeploy {
        service: String,
        instance: u32,
    },
}

/// (HTTP status, JSON body) of an answer.
pub type Answer = (u16, String);

fn error(code: u16, msg: &str) -> Answer {
    (code, serde_json::json!({ "message": msg }).to_string())
}

#[derive(Deserialize)]
struct RegisterBody {
    client_id: String,
    #[serde(default)]
    cluster_address: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeployBody {
    #[serde(default)]
    pid: i64,
    service_name: String,
    #[serde(default)]
    instance_number: i64,
    #[serde(default)]
    port_mappings: Option<String>,
}

/// Decodes one request; `Err` is the answer to send (400, 404, 405, 501).
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, Answer> {
    // gorilla/mux StrictSlash: a trailing slash names the same route
    let path = path.split('?').next().unwrap_or("");
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let known = matches!(
        path,
        "/register"
            | "/container/deploy"
            | "/container/undeploy"
            | "/docker/undeploy"
            | "/unikernel/deploy"
            | "/unikernel/undeploy"
    );
    if !known {
        return Err(error(404, &format!("no route {path}")));
    }
    if method != "POST" {
        return Err(error(405, "use POST"));
    }
    let bad = |e: serde_json::Error| error(400, &format!("bad JSON body: {e}"));
    let instance = |n: i64| {
        u32::try_from(n).map_err(|_| error(400, &format!("instanceNumber {n} out of range")))
    };
    match path {
        "/register" => {
            let b: RegisterBody = serde_json::from_slice(body).map_err(bad)?;
            if !crate::protocol::valid_node_id(&b.client_id) {
                return Err(error(400, "client_id is not a node id"));
            }
            Ok(ApiRequest::Register {
                client_id: b.client_id,
                cluster_address: b.cluster_address.unwrap_or_default().trim().to_string(),
            })
        }
        "/container/deploy" => {
            let b: DeployBody = serde_json::from_slice(body).map_err(bad)?;
            let pid = i32::try_from(b.pid)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| error(400, &format!("pid {} is not a process id", b.pid)))?;
            Ok(ApiRequest::Deploy {
                pid,
                service: b.service_name,
                instance: instance(b.instance_number)?,
                ports: b.port_mappings.unwrap_or_default(),
            })
        }
        "/container/undeploy" | "/docker/undeploy" => {
            let b: DeployBody = serde_json::from_slice(body).map_err(bad)?;
            Ok(ApiRequest::Undeploy {
                service: b.service_name,
                instance: instance(b.instance_number)?,
            })
        }
        _ => Err(error(
            501,
            "unikernel networking is not supported by this NetManager",
        )),
    }
}

#[derive(Debug, Clone)]
pub struct ManualConfig {
    /// `/etc/netmanager/netmanager.sock` or `config network manual <socket>`.
    pub socket: PathBuf,
    /// netcfg `ClusterUrl`, replaced by `cluster_address` of `/register` when set.
    pub cluster_url: String,
    /// netcfg `ClusterMqttPort`.
    pub mqtt_port: u16,
    /// `/register` answers once the subnet is there, or after this long (the NodeEngine's
    /// client gives up after 10 s and treats that as fatal, spec §7.1).
    pub register_wait: Duration,
}

type Job = (ApiRequest, std::sync::mpsc::SyncSender<Answer>);

/// Runs the NetManager until `stop` completes; everything it made is removed on the way out.
pub async fn run(
    ex: &LocalExecutor<'static>,
    ocfg: OverlayConfig,
    cfg: ManualConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let (overlay, link, task) = Overlay::start(ocfg)?;
    ex.spawn(task).detach();
    let (tx, rx) = async_channel::bounded::<Job>(QUEUE);
    let server = listen(&cfg.socket, tx)?;
    log::info!("NetManager API on {}", cfg.socket.display());
    let mut nm = NetManager {
        overlay: Rc::new(overlay),
        link,
        cfg,
        client: None,
        node: None,
        ex,
    };
    nm.serve(rx).or(stop).await;
    server.unblock();
    let _ = std::fs::remove_file(&nm.cfg.socket);
    nm.overlay.teardown();
    if let Some(c) = nm.client.take() {
        c.close();
    }
    Ok(())
}

fn listen(
    socket: &std::path::Path,
    tx: Sender<Job>,
) -> Result<std::sync::Arc<tiny_http::Server>, String> {
    // A stale socket of a previous run would make bind fail (upstream removes it too).
    let _ = std::fs::remove_file(socket);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let server = std::sync::Arc::new(
        tiny_http::Server::http_unix(socket)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?,
    );
    let s = server.clone();
    std::thread::Builder::new()
        .name("netmanager-api".into())
        .spawn(move || {
            while let Ok(mut rq) = s.recv() {
                let mut body = Vec::new();
                let read = std::io::Read::read_to_end(
                    &mut std::io::Read::take(rq.as_reader(), MAX_BODY),
                    &mut body,
                );
                let (code, text) = match read {
                    Err(e) => error(400, &format!("cannot read the body: {e}")),
                    Ok(_) => match parse(rq.method().as_str(), rq.url(), &body) {
                        Err(a) => a,
                        Ok(req) => {
                            let (rtx, rrx) = std::sync::mpsc::sync_channel(1);
                            if tx.send_blocking((req, rtx)).is_err() {
                                error(503, "shutting down")
                            } else {
                                rrx.recv_timeout(Duration::from_secs(60))
                                    .unwrap_or_else(|_| error(500, "no answer in time"))
                            }
                        }
                    },
                };
                let header =
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                        .expect("a constant header is valid");
                let _ = rq.respond(
                    tiny_http::Response::from_string(text)
                        .with_status_code(code)
                        .with_header(header),
                );
            }
        })
        .map_err(|e| format!("cannot start the API thread: {e}"))?;
    Ok(server)
}

struct NetManager<'ex> {
    overlay: Rc<Overlay>,
    link: SessionLink,
    cfg: ManualConfig,
    client: Option<Handle>,
    node: Option<String>,
    ex: &'ex LocalExecutor<'static>,
}

impl NetManager<'_> {
    async fn serve(&mut self, rx: Receiver<Job>) {
        enum Wake {
            Api(Option<Job>),
            Mqtt(Option<MqttEvent>),
            Op(Option<MqttOp>),
        }
        loop {
            let wake = {
                let api = async { Wake::Api(rx.recv().await.ok()) };
                let events = self.client.as_ref().map(|c| c.events.clone());
                let mqtt = async {
                    match events {
                        Some(e) => Wake::Mqtt(e.recv().await.ok()),
                        None => std::future::pending().await,
                    }
                };
                let ops = &self.link.ops;
                let op = async { Wake::Op(ops.recv().await.ok()) };
                op.or(mqtt).or(api).await
            };
            match wake {
                Wake::Api(None) | Wake::Op(None) => return,
                Wake::Api(Some((req, reply))) => self.on_request(req, reply),
                Wake::Mqtt(None) => self.client = None,
                Wake::Mqtt(Some(ev)) => {
                    let m = match ev {
                        MqttEvent::Connected => ToOverlay::Connected,
                        MqttEvent::Message { topic, payload } => {
                            ToOverlay::Message { topic, payload }
                        }
                        MqttEvent::Disconnected { .. } | MqttEvent::SubscribeRefused { .. } => {
                            continue
                        }
                    };
                    if self.link.to_overlay.try_send(m).is_err() {
                        log::warn!("overlay busy: an MQTT message was dropped");
                    }
                }
                Wake::Op(Some(op)) => {
                    if let Some(c) = &self.client {
                        match op {
                            MqttOp::Publish(o) => {
                                let _ = c.try_publish(o);
                            }
                            MqttOp::Subscribe(f) => {
                                c.subscribe(f);
                            }
                            MqttOp::Unsubscribe(f) => {
                                c.unsubscribe(f);
                            }
                        }
                    }
                }
            }
        }
    }

    fn on_request(&mut self, req: ApiRequest, reply: std::sync::mpsc::SyncSender<Answer>) {
        match req {
            ApiRequest::Register {
                client_id,
                cluster_address,
            } => {
                match &self.node {
                    Some(n) if *n == client_id => {}
                    Some(n) => {
                        let _ = reply.send(error(
                            400,
                            &format!("already registered as {n}; restart the NetManager to change"),
                        ));
                        return;
                    }
                    None => self.register(&client_id, &cluster_address),
                }
                let overlay = self.overlay.clone();
                let wait = self.cfg.register_wait;
                self.ex
                    .spawn(async move {
                        let end = Instant::now() + wait;
                        while overlay.subnet().is_none() && Instant::now() < end {
                            Timer::after(Duration::from_millis(100)).await;
                        }
                        if overlay.subnet().is_none() {
                            log::warn!("no subnet from the cluster yet; answering /register anyway (deploys wait for it)");
                        }
                        let _ = reply.send((200, String::new()));
                    })
                    .detach();
            }
            ApiRequest::Deploy {
                pid,
                service,
                instance,
                ports,
            } => {
                if self.node.is_none() {
                    let _ = reply.send(error(400, "not registered: POST /register first"));
                    return;
                }
                let overlay = self.overlay.clone();
                self.ex
                    .spawn(async move {
                        let key = crate::protocol::container_id(&service, u64::from(instance));
                        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                        let a = match overlay
                            .attach_existing(&key, &netns, &service, instance, &ports)
                            .await
                        {
                            Ok(ip) => (
                                200,
                                serde_json::json!({"serviceName": service, "nsAddress": ip.to_string(), "nsAddressv6": ""})
                                    .to_string(),
                            ),
                            Err(e) => error(500, &e.to_string()),
                        };
                        let _ = reply.send(a);
                    })
                    .detach();
            }
            ApiRequest::Undeploy { service, instance } => {
                if self.node.is_none() {
                    let _ = reply.send(error(400, "not registered: POST /register first"));
                    return;
                }
                self.overlay.detach_instance(&crate::protocol::container_id(
                    &service,
                    u64::from(instance),
                ));
                let _ = reply.send((200, String::new()));
            }
        }
    }

    fn register(&mut self, node_id: &str, cluster_address: &str) {
        let host = if cluster_address.is_empty() {
            self.cfg.cluster_url.clone()
        } else {
            cluster_address.to_string()
        };
        log::info!(
            "NetManager registered as {node_id}; MQTT {host}:{}",
            self.cfg.mqtt_port
        );
        // The bare node id: the NodeEngine uses `<id>-ne`, so both can share the broker (spec §7).
        let cfg = client::Config::new(&host, self.cfg.mqtt_port, node_id, Vec::new());
        let (handle, fut) = client::client(cfg, Default::default());
        self.ex.spawn(fut).detach();
        self.client = Some(handle);
        self.node = Some(node_id.to_string());
        if self
            .link
            .to_overlay
            .try_send(ToOverlay::Registered {
                node_id: node_id.to_string(),
            })
            .is_err()
        {
            log::error!("overlay link full at registration");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "65f1a2b3c4d5e6f708091011";

    #[test]
    fn requests_as_the_node_engine_sends_them() {
        assert_eq!(
            parse(
                "POST",
                "/register",
                format!(r#"{{"client_id":"{ID}","cluster_address":"10.0.0.1"}}"#).as_bytes()
            ),
            Ok(ApiRequest::Register {
                client_id: ID.into(),
                cluster_address: "10.0.0.1".into()
            })
        );
        assert_eq!(
            parse(
                "POST",
                "/container/deploy/",
                br#"{"pid":1234,"serviceName":"a.b.c.d","instanceNumber":2,"portMappings":"8080:80"}"#
            ),
            Ok(ApiRequest::Deploy {
                pid: 1234,
                service: "a.b.c.d".into(),
                instance: 2,
                ports: "8080:80".into()
            })
        );
        assert_eq!(
            parse(
                "POST",
                "/docker/undeploy",
                br#"{"pid":-1,"serviceName":"a.b.c.d","instanceNumber":2,"portMappings":""}"#
            ),
            Ok(ApiRequest::Undeploy {
                service: "a.b.c.d".into(),
                instance: 2
            })
        );
    }

    #[test]
    fn hostile_requests_get_4xx() {
        let code = |m: &str, p: &str, b: &[u8]| parse(m, p, b).map_err(|e| e.0).err();
        assert_eq!(code("GET", "/register", b"{}"), Some(405));
        assert_eq!(code("POST", "/nope", b"{}"), Some(404));
        assert_eq!(code("POST", "/register", b"{"), Some(400));
        assert_eq!(
            code("POST", "/register", br#"{"client_id":"../x"}"#),
            Some(400)
        );
        assert_eq!(
            code(
                "POST",
                "/container/deploy",
                br#"{"pid":-1,"serviceName":"a.b.c.d"}"#
            ),
            Some(400)
        );
        assert_eq!(
            code(
                "POST",
                "/container/deploy",
                br#"{"pid":1,"serviceName":"a.b.c.d","instanceNumber":-3}"#
            ),
            Some(400)
        );
        assert_eq!(code("POST", "/unikernel/deploy", b"{}"), Some(501));
    }
}
