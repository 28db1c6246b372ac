//! The root orchestrator role (issue #7): users and JWT auth, SLA validation, applications and
//! services, the root scheduler, the root service manager's addresses, and the cluster-facing
//! endpoints, all on one HTTP port. `CLUSTER_CONTRACT.md` lists every root<->cluster call;
//! `README-root.md` (crate root) the deviations from upstream.
//!
//! Where to look: a REST call → `api` (route table `api::ROUTES`); a cluster report →
//! `clusters`; a deploy to a cluster → `placement` then `delivery`; persistence → `db`.

pub mod api;
pub mod auth;
pub mod clusters;
pub mod db;
pub mod delivery;
pub mod ids;
pub mod ipam;
pub mod model;
pub mod placement;
pub mod scheduler;
pub mod sla;

use crate::http;
use clusters::Outbound;
use db::{Db, DbError, JsonFile};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Settings of the root role; [`RootConfig::from_env`] reads the documented variables.
#[derive(Debug, Clone, PartialEq)]
pub struct RootConfig {
    /// `OAK_ROOT_API_ADDR`, default `0.0.0.0:10000`.
    pub api_addr: SocketAddr,
    /// `OAK_DATA_DIR`, default `/var/lib/orch-lite`; holds `root.json` and `join-token`.
    pub data_dir: PathBuf,
    /// `OAK_ADMIN_PASSWORD`; `None` keeps the stored one, or `Admin` on first start (warned).
    pub admin_password: Option<String>,
    /// `OAK_JOIN_TOKEN`; `None` → generated once and persisted.
    pub join_token: Option<String>,
    /// `OAK_CLUSTER_TIMEOUT_S` (default 30): a cluster silent this long is inactive and its
    /// instances are moved to other clusters.
    pub cluster_timeout: Duration,
    /// `OAK_ACCESS_TOKEN_TTL_S` (default 600) and `OAK_REFRESH_TOKEN_TTL_S` (default 30 days).
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    pub http_threads: usize,
}

impl RootConfig {
    /// Defaults for `data_dir`, as the environment would give them with nothing set.
    pub fn new(data_dir: PathBuf) -> RootConfig {
        RootConfig {
            api_addr: SocketAddr::from(([0, 0, 0, 0], 10000)),
            data_dir,
            admin_password: None,
            join_token: None,
            cluster_timeout: Duration::from_secs(30),
            access_ttl: Duration::from_secs(auth::ACCESS_TTL_SECS as u64),
            refresh_ttl: Duration::from_secs(auth::REFRESH_TTL_SECS as u64),
            http_threads: 4,
        }
    }

    pub fn from_env() -> Result<RootConfig, String> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`RootConfig::from_env`] over any variable source (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<RootConfig, String> {
        let mut c = RootConfig::new(
            get("OAK_DATA_DIR")
                .unwrap_or_else(|| "/var/lib/orch-lite".into())
                .into(),
        );
        if let Some(a) = get("OAK_ROOT_API_ADDR") {
            // ":10000" (as the docs write ports) means all interfaces.
            let full = if a.starts_with(':') {
                format!("0.0.0.0{a}")
            } else {
                a.clone()
            };
            c.api_addr = full.parse().map_err(|_| {
                format!("OAK_ROOT_API_ADDR={a:?} is not an address like 0.0.0.0:10000 or :10000")
            })?;
        }
        c.admin_password = get("OAK_ADMIN_PASSWORD");
        c.join_token = get("OAK_JOIN_TOKEN");
        let secs = |k: &str, d: Duration| -> Result<Duration, String> {
            match get(k) {
                None => Ok(d),
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0 && s.is_finite())
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| format!("{k}={v:?} must be a positive number of seconds")),
            }
        };
        c.cluster_timeout = secs("OAK_CLUSTER_TIMEOUT_S", c.cluster_timeout)?;
        c.access_ttl = secs("OAK_ACCESS_TOKEN_TTL_S", c.access_ttl)?;
        c.refresh_ttl = secs("OAK_REFRESH_TOKEN_TTL_S", c.refresh_ttl)?;
        Ok(c)
    }
}

/// Lifetimes and timeouts the handlers need.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub access_ttl: i64,
    pub refresh_ttl: i64,
    pub cluster_timeout_secs: f64,
}

/// Everything a request handler can touch.
pub struct Root {
    pub db: Arc<Db>,
    /// HS256 key, persisted in the snapshot.
    pub key: Vec<u8>,
    pub join_token: String,
    pub settings: Settings,
    /// Where calls to clusters go (the delivery threads; a recorder in unit tests).
    pub outbox: Box<dyn Fn(Vec<Outbound>) + Send + Sync>,
}

pub type Outbox = Box<dyn Fn(Vec<Outbound>) + Send + Sync>;

impl Root {
    /// Loads or creates the signing key, the join token, organization `root` and user `Admin`.
    pub fn open(
        db: Arc<Db>,
        admin_password: Option<&str>,
        join_token: Option<&str>,
        settings: Settings,
        outbox: Outbox,
    ) -> Result<Root, String> {
        let now = ids::now_secs_f64() as u64;
        let (key, token) = db
            .write(|s| {
                // Fewer than 32 bytes (or none): HS256 wants a key at least the hash size.
                if ids::unhex(&s.signing_key).map_or(true, |k| k.len() < 32) {
                    s.signing_key = ids::hex(&ids::random_bytes(32).map_err(DbError)?);
                    log::info!("generated a new token signing key");
                }
                if s.join_token.is_empty() {
                    s.join_token = ids::hex(&ids::random_bytes(24).map_err(DbError)?);
                }
                if s.organization_id.is_empty() {
                    s.organization_id = ids::new_oid(now);
                }
                let roles: Vec<String> = ["Admin", "Organization_Admin", "Application_Provider", "Infrastructure_Provider"]
                    .map(String::from)
                    .to_vec();
                let existing = s.users.iter().position(|u| u.name == "Admin");
                let hash = |pw: &str| -> Result<String, DbError> {
                    Ok(auth::hash_password(pw, &ids::random_bytes(16).map_err(DbError)?, auth::PBKDF2_ROUNDS))
                };
                match (existing, admin_password) {
                    (None, pw) => {
                        if pw.is_none() {
                            log::warn!("user Admin created with the default password \"Admin\"; set OAK_ADMIN_PASSWORD");
                        }
                        s.users.push(model::User {
                            id: model::Oid::new(&ids::new_oid(now)),
                            name: "Admin".into(),
                            email: String::new(),
                            password: hash(pw.unwrap_or("Admin"))?,
                            created_at: ids::rfc3339(now),
                            roles,
                        });
                    }
                    (Some(i), Some(pw)) if !auth::verify_password(pw, &s.users[i].password) => {
                        s.users[i].password = hash(pw)?;
                        log::info!("password of user Admin set from OAK_ADMIN_PASSWORD");
                    }
                    (Some(i), None) if auth::verify_password("Admin", &s.users[i].password) => {
                        log::warn!("user Admin still has the default password \"Admin\"; set OAK_ADMIN_PASSWORD");
                    }
                    _ => {}
                }
                Ok::<_, DbError>((s.signing_key.clone(), s.join_token.clone()))
            })
            .map_err(|e| e.0)?;
        Ok(Root {
            db,
            key: ids::unhex(&key).unwrap_or_default(),
            join_token: join_token.map(String::from).unwrap_or(token),
            settings,
            outbox,
        })
    }

    pub fn send(&self, calls: Vec<Outbound>) {
        if !calls.is_empty() {
            (self.outbox)(calls);
        }
    }
}

/// The running root role. Dropping it stops the API, the liveness check and the deliveries.
pub struct RootHandle {
    server: Option<http::Server>,
    root: Arc<Root>,
    delivery: Arc<delivery::Delivery>,
    stop: Option<mpsc::Sender<()>>,
    liveness: Option<std::thread::JoinHandle<()>>,
}

impl RootHandle {
    /// The bound API address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.server
            .as_ref()
            .map(|s| s.addr)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The token clusters must present; `orch-lite all` passes it to its cluster role.
    pub fn join_token(&self) -> &str {
        &self.root.join_token
    }
}

impl Drop for RootHandle {
    fn drop(&mut self) {
        self.server.take();
        self.stop.take();
        if let Some(t) = self.liveness.take() {
            let _ = t.join();
        }
        self.delivery.shutdown();
    }
}

/// Starts the root role: opens `$OAK_DATA_DIR/root.json`, serves the API, delivers calls to
/// clusters, and moves instances off clusters that stop reporting.
pub fn start(config: RootConfig) -> Result<RootHandle, String> {
    let snapshot = JsonFile::in_dir(&config.data_dir).map_err(|e| e.0)?;
    let db = Arc::new(Db::open(Box::new(snapshot)).map_err(|e| e.0)?);
    // The delivery needs the join token, which Root::open may generate; the outbox reaches it
    // through a cell filled right after.
    let delivery_cell = Arc::new(std::sync::OnceLock::<Arc<delivery::Delivery>>::new());
    let cell = delivery_cell.clone();
    let outbox: Outbox = Box::new(move |calls| {
        if let Some(d) = cell.get() {
            d.send(calls);
        }
    });
    let settings = Settings {
        access_ttl: config.access_ttl.as_secs() as i64,
        refresh_ttl: config.refresh_ttl.as_secs() as i64,
        cluster_timeout_secs: config.cluster_timeout.as_secs_f64(),
    };
    let root = Arc::new(Root::open(
        db.clone(),
        config.admin_password.as_deref(),
        config.join_token.as_deref(),
        settings,
        outbox,
    )?);
    let delivery = delivery::Delivery::new(db.clone(), root.join_token.clone());
    let _ = delivery_cell.set(delivery.clone());
    if config.join_token.is_none() {
        write_join_token_file(&config.data_dir, &root.join_token);
    }

    // Deploy calls lost in a previous run (root stopped before the cluster answered) are sent
    // again; clusters treat them idempotently (CLUSTER_CONTRACT §2).
    let pending = db.read(|s| {
        s.jobs
            .iter()
            .flat_map(|j| {
                j.instance_list
                    .iter()
                    .filter(|i| i.status == worker::protocol::Status::ClusterScheduled)
                    .map(|i| Outbound::Deploy {
                        cluster_id: i.cluster_id.clone(),
                        job_id: j.id().into(),
                        instance: i.instance_number,
                    })
            })
            .collect::<Vec<_>>()
    });
    root.send(pending);

    let handler_root = root.clone();
    let handler: http::Handler =
        Arc::new(move |req: &http::Request| api::handle(&handler_root, req));
    let server = http::serve(config.api_addr, config.http_threads, "root", handler)?;

    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let live_root = root.clone();
    let timeout = config.cluster_timeout.as_secs_f64();
    let tick =
        (config.cluster_timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let watching_since = ids::now_secs_f64();
    let liveness = std::thread::Builder::new()
        .name("root-liveness".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(tick) {
                let now = ids::now_secs_f64();
                if !live_root
                    .db
                    .read(|s| clusters::has_stranded(s, now, timeout, watching_since))
                {
                    continue;
                }
                match live_root.db.write(|s| {
                    Ok::<_, DbError>(clusters::reschedule_stranded(
                        s,
                        now,
                        timeout,
                        watching_since,
                    ))
                }) {
                    Ok(calls) => live_root.send(calls),
                    Err(e) => log::error!("rescheduling: {e}"),
                }
            }
        })
        .map_err(|e| format!("cannot start the liveness thread: {e}"))?;
    log::info!(
        "root role ready on http://{} (data in {}, cluster timeout {:?})",
        server.addr,
        config.data_dir.display(),
        config.cluster_timeout
    );
    Ok(RootHandle {
        server: Some(server),
        root,
        delivery,
        stop: Some(stop_tx),
        liveness: Some(liveness),
    })
}

fn write_join_token_file(dir: &std::path::Path, token: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("join-token");
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{token}\n").as_bytes()));
    match r {
        Ok(()) => log::info!(
            "OAK_JOIN_TOKEN is unset: clusters must present the token in {}",
            path.display()
        ),
        Err(e) => log::error!(
            "cannot write {}: {e}; clusters cannot learn the join token",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn config_from_environment() {
        let env: HashMap<&str, &str> = [
            ("OAK_ROOT_API_ADDR", ":10001"),
            ("OAK_CLUSTER_TIMEOUT_S", "1.5"),
            ("OAK_DATA_DIR", "/tmp/x"),
        ]
        .into();
        let c = RootConfig::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.api_addr, "0.0.0.0:10001".parse().unwrap());
        assert_eq!(c.cluster_timeout, Duration::from_millis(1500));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        let d = RootConfig::from_lookup(|_| None).unwrap();
        assert_eq!((d.api_addr.port(), d.access_ttl.as_secs()), (10000, 600));
        let e = RootConfig::from_lookup(|k| (k == "OAK_CLUSTER_TIMEOUT_S").then(|| "-1".into()))
            .unwrap_err();
        assert!(e.contains("OAK_CLUSTER_TIMEOUT_S"), "{e}");
        let e = RootConfig::from_lookup(|k| (k == "OAK_ROOT_API_ADDR").then(|| "x".into()))
            .unwrap_err();
        assert!(e.contains("OAK_ROOT_API_ADDR"), "{e}");
    }
}
