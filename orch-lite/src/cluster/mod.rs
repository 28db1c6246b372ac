//! The cluster role (Oakestra's cluster orchestrator): worker registration over HTTP, the MQTT
//! handlers, the scheduler, the instance state machine and the link to the root. Pure cores
//! (`scheduler`, `instance`, `state`, `handlers`) sit behind thin shells (`api`, `mqtt`,
//! `root_link`); [`run`] wires them: tiny_http threads for the API, one tokio current-thread
//! runtime for the MQTT client and the clock, one thread for blocking calls to the root.

pub mod api;
pub mod config;
pub mod handlers;
pub mod instance;
pub mod metrics;
pub mod mqtt;
pub mod root_link;
pub mod scheduler;
pub mod state;

use crate::store::Store;
use config::{Config, Mqtt};
use metrics::Metrics;
use root_link::RootMsg;
use serde::Serialize;
use state::{ClusterState, Effect, StateConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Largest MQTT payload accepted or sent (deploy messages carry whole job documents).
pub const MAX_PAYLOAD: usize = 1 << 20;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Carries out effects: MQTT publishes (QoS 1) and root pushes, both through bounded queues.
pub struct Sink {
    mqtt: rumqttc::AsyncClient,
    root: Option<SyncSender<RootMsg>>,
    metrics: Arc<Metrics>,
}

impl Sink {
    pub fn publish<T: Serialize + ?Sized>(&self, topic: String, body: &T) {
        match serde_json::to_vec(body) {
            Ok(payload) => self.dispatch(vec![Effect::Publish { topic, payload }]),
            Err(e) => log::error!("cannot encode message for {topic}: {e}"),
        }
    }

    pub fn dispatch(&self, effects: Vec<Effect>) {
        let mut changed = Vec::new();
        for e in effects {
            match e {
                Effect::Publish { topic, payload } => {
                    // Workers subscribe at QoS 1; upstream's QoS 0 loses commands.
                    if let Err(err) =
                        self.mqtt
                            .try_publish(&topic, rumqttc::QoS::AtLeastOnce, false, payload)
                    {
                        Metrics::inc(&self.metrics.publishes_dropped);
                        log::warn!(
                            "publish to {topic} dropped ({err}); the instance timeouts will retry"
                        );
                    }
                }
                Effect::JobChanged(j) => changed.push(j),
            }
        }
        if !changed.is_empty() {
            if let Some(tx) = &self.root {
                if let Err(TrySendError::Full(_)) = tx.try_send(RootMsg::Jobs(changed)) {
                    log::debug!("root link busy; the periodic report will carry the change");
                }
            }
        }
    }

    pub fn net(&self, req: handlers::NetRequest) {
        match &self.root {
            Some(tx) => {
                if tx.try_send(RootMsg::Net(req)).is_err() {
                    log::warn!("root link busy; NetManager request dropped (it will ask again)");
                }
            }
            None => log::warn!(
                "NetManager request {req:?} ignored: the overlay needs a root (OAK_ROOT_URL)"
            ),
        }
    }
}

/// Everything the shells share.
pub struct Shared {
    state: Mutex<ClusterState>,
    pub sink: Sink,
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    mqtt_connected: AtomicBool,
    root_connected: AtomicBool,
}

impl Shared {
    /// The state; a panic in another holder does not make the cluster unusable.
    pub fn lock(&self) -> MutexGuard<'_, ClusterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn set_mqtt_connected(&self, v: bool) {
        self.mqtt_connected.store(v, Ordering::Relaxed);
    }
    pub fn set_root_connected(&self, v: bool) {
        self.root_connected.store(v, Ordering::Relaxed);
    }
    /// Connected to the broker and subscribed to the worker topics.
    pub fn mqtt_ready(&self) -> bool {
        self.mqtt_connected.load(Ordering::Relaxed)
    }
    pub fn root_connected(&self) -> bool {
        self.root_connected.load(Ordering::Relaxed)
    }
}

/// Starts the cluster role and runs it until the process ends.
pub fn run(cfg: Config) -> Result<(), String> {
    let dir = cfg.data_dir.join("cluster");
    let (store, recovery) = Store::open(&dir).map_err(|e| e.to_string())?;
    log::info!(
        "store {}: {} documents, {} log operations replayed{}",
        dir.display(),
        recovery.snapshot_docs,
        recovery.log_ops,
        if recovery.truncated_bytes > 0 {
            format!(", {} bytes of torn log dropped", recovery.truncated_bytes)
        } else {
            String::new()
        }
    );
    let metrics = Arc::new(Metrics::default());
    let state = ClusterState::load(
        store,
        StateConfig {
            cluster_name: cfg.cluster_name.clone(),
            join_token: cfg.join_token.clone(),
            timeouts: cfg.timeouts.clone(),
        },
        metrics.clone(),
        now_ms(),
    );
    let (host, port) = match &cfg.mqtt {
        Mqtt::Embedded { listen, tls } => {
            let b = crate::broker::start(&crate::broker::BrokerConfig {
                listen: *listen,
                tls: tls.clone(),
                max_payload: MAX_PAYLOAD,
            })?;
            (b.local.ip().to_string(), b.local.port())
        }
        Mqtt::External { host, port } => {
            log::info!("using the external MQTT broker mqtt://{host}:{port}");
            (host.clone(), *port)
        }
    };
    let client_id = format!("orch-lite-cluster-{}", std::process::id());
    let embedded = matches!(cfg.mqtt, Mqtt::Embedded { .. });
    let (client, events) = mqtt::client(&host, port, &client_id, MAX_PAYLOAD, embedded);
    let (root_tx, root_rx) = match &cfg.root_url {
        Some(_) => {
            let (tx, rx) = sync_channel(root_link::QUEUE);
            (Some(tx), Some(rx))
        }
        None => {
            log::warn!("OAK_ROOT_URL is not set: running standalone (no reports to a root; deploy through this API)");
            (None, None)
        }
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        sink: Sink {
            mqtt: client.clone(),
            root: root_tx,
            metrics: metrics.clone(),
        },
        cfg: cfg.clone(),
        metrics,
        mqtt_connected: AtomicBool::new(false),
        root_connected: AtomicBool::new(false),
    });
    let api_shared = shared.clone();
    let _server = crate::http::serve(
        cfg.api_addr,
        4,
        "cluster",
        Arc::new(move |req| api::handle(&api_shared, req)),
    )?;
    if let (Some(url), Some(rx)) = (cfg.root_url.clone(), root_rx) {
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("root-link".into())
            .spawn(move || root_link::run(sh, url, rx))
            .map_err(|e| format!("cannot start the root link thread: {e}"))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async move {
        tokio::spawn(mqtt::run(shared.clone(), client, events));
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let effects = {
                let mut st = shared.lock();
                let e = st.tick(now_ms());
                st.sync();
                e
            };
            shared.sink.dispatch(effects);
        }
    })
}
