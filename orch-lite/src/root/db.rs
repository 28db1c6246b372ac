//! The root's state and its persistence: one [`State`] behind a mutex, written after every
//! successful change as a JSON snapshot (`$OAK_DATA_DIR/root.json`, temp file + fsync + atomic
//! rename, mode 0600 because it holds the signing key and password hashes). A stand-in for the
//! shared embedded store (`store.rs`) until that lands: callers only see [`Db::read`]/[`Db::write`].

use crate::root::ipam::{self, Ipam};
use crate::root::model::{App, Cluster, Job, User};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

pub const SNAPSHOT_FILE: &str = "root.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub format_version: u32,
    /// HS256 key, hex. Generated once; persisting it keeps tokens valid across restarts.
    pub signing_key: String,
    /// Generated join token when `OAK_JOIN_TOKEN` is unset (CLUSTER_CONTRACT.md).
    pub join_token: String,
    /// The single organization `root` (upstream's default org), its id goes in the JWT.
    pub organization_id: String,
    pub users: Vec<User>,
    pub apps: Vec<App>,
    pub jobs: Vec<Job>,
    pub clusters: Vec<Cluster>,
    /// Worker subnets handed out so far (ipam::worker_subnet).
    pub next_subnet: u32,
    /// Derived from jobs on load; never stored separately, so it cannot drift from them.
    #[serde(skip)]
    pub ipam: Ipam,
}

impl State {
    /// Re-derives the address pool from the jobs (RR and instance addresses).
    pub fn rebuild_ipam(&mut self) {
        let mut ipam = Ipam::default();
        for j in &self.jobs {
            let v4 = j.rr_ip.parse::<Ipv4Addr>().into_iter();
            let inst = j
                .instance_list
                .iter()
                .filter_map(|i| i.instance_ip.parse::<Ipv4Addr>().ok());
            for ip in v4.chain(inst) {
                if let Err(e) = ipam.reserve(ip) {
                    log::warn!("snapshot: job {} address: {e}", j.job_name);
                }
            }
            let v6 = j.rr_ip_v6.parse::<Ipv6Addr>().into_iter();
            let inst6 = j
                .instance_list
                .iter()
                .filter_map(|i| i.instance_ip_v6.parse::<Ipv6Addr>().ok());
            for ip in v6.chain(inst6) {
                let _ = ipam.reserve_v6(ip);
            }
        }
        self.ipam = ipam;
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn app(&self, id: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.id.oid == id)
    }

    pub fn app_mut(&mut self, id: &str) -> Option<&mut App> {
        self.apps.iter_mut().find(|a| a.id.oid == id)
    }

    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id.oid == id)
    }

    pub fn job_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id.oid == id)
    }

    pub fn cluster(&self, id: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.id == id)
    }

    pub fn cluster_mut(&mut self, id: &str) -> Option<&mut Cluster> {
        self.clusters.iter_mut().find(|c| c.id == id)
    }

    /// Removes a job and returns its addresses to the pool.
    pub fn remove_job(&mut self, id: &str) -> Option<Job> {
        let pos = self.jobs.iter().position(|j| j.id.oid == id)?;
        let job = self.jobs.remove(pos);
        for i in &job.instance_list {
            self.release_instance_ips(i.instance_ip.as_str(), i.instance_ip_v6.as_str());
        }
        if let Ok(ip) = job.rr_ip.parse() {
            self.ipam.release(ip);
        }
        if let Ok(ip) = job.rr_ip_v6.parse() {
            self.ipam.release_v6(ip);
        }
        for app in &mut self.apps {
            app.microservices.retain(|m| m != id);
        }
        Some(job)
    }

    pub fn release_instance_ips(&mut self, v4: &str, v6: &str) {
        if let Ok(ip) = v4.parse() {
            self.ipam.release(ip);
        }
        if let Ok(ip) = v6.parse() {
            self.ipam.release_v6(ip);
        }
    }

    /// A fresh `/26` + `/120` for a worker (CLUSTER_CONTRACT §1.4).
    pub fn next_worker_subnet(&mut self) -> Option<(Ipv4Addr, Ipv6Addr)> {
        let s = ipam::worker_subnet(self.next_subnet)?;
        self.next_subnet += 1;
        Some(s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DbError(pub String);

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where snapshots go. The JSON file is the default; the in-memory one serves unit tests.
pub trait Snapshot: Send + Sync {
    fn load(&self) -> Result<Option<State>, DbError>;
    /// Stores the encoded state (`serde_json` of [`State`]).
    fn save(&self, encoded: &[u8]) -> Result<(), DbError>;
}

pub struct Memory;

impl Snapshot for Memory {
    fn load(&self) -> Result<Option<State>, DbError> {
        Ok(None)
    }
    fn save(&self, _: &[u8]) -> Result<(), DbError> {
        Ok(())
    }
}

pub struct JsonFile {
    path: PathBuf,
}

impl JsonFile {
    /// Creates `dir` (0700) if needed.
    pub fn in_dir(dir: &Path) -> Result<JsonFile, DbError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            DbError(format!(
                "cannot create data directory {}: {e}; set OAK_DATA_DIR to a writable directory",
                dir.display()
            ))
        })?;
        Ok(JsonFile {
            path: dir.join(SNAPSHOT_FILE),
        })
    }
}

impl Snapshot for JsonFile {
    fn load(&self) -> Result<Option<State>, DbError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DbError(format!("cannot read {}: {e}", self.path.display()))),
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| {
            DbError(format!(
                "{} is not a valid root snapshot ({e}); restore it from a backup or move it away to start empty",
                self.path.display()
            ))
        })?;
        if state.format_version > FORMAT_VERSION {
            return Err(DbError(format!(
                "{} was written by a newer orch-lite (format {}); upgrade orch-lite",
                self.path.display(),
                state.format_version
            )));
        }
        Ok(Some(state))
    }

    fn save(&self, data: &[u8]) -> Result<(), DbError> {
        use std::os::unix::fs::OpenOptionsExt;
        let fail =
            |e: std::io::Error| DbError(format!("cannot write {}: {e}", self.path.display()));
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?;
        f.write_all(data).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &self.path).map_err(fail)?;
        // The rename is durable only once the directory entry is.
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

pub struct Db {
    state: Mutex<State>,
    snapshot: Box<dyn Snapshot>,
    /// The last snapshot written; an unchanged state is not written again (SD cards wear, and
    /// the liveness check retries unplaceable instances every few seconds).
    saved: Mutex<Vec<u8>>,
}

impl Db {
    pub fn open(snapshot: Box<dyn Snapshot>) -> Result<Db, DbError> {
        let mut state = snapshot.load()?.unwrap_or_default();
        state.format_version = FORMAT_VERSION;
        state.rebuild_ipam();
        Ok(Db {
            state: Mutex::new(state),
            snapshot,
            saved: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in another request must not take the whole API down with a poisoned lock;
        // every write below is applied to a copy first, so the state is never half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// Runs `f` on a copy of the state; if it succeeds the copy is persisted and becomes the
    /// state, otherwise nothing changes. A failed snapshot write also changes nothing, so the
    /// API never reports success for data that would be lost on restart.
    pub fn write<R, E: From<DbError>>(
        &self,
        f: impl FnOnce(&mut State) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut guard = self.lock();
        let mut copy = guard.clone();
        let r = f(&mut copy)?;
        let data =
            serde_json::to_vec(&copy).map_err(|e| DbError(format!("cannot encode state: {e}")))?;
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if *saved != data {
            self.snapshot.save(&data)?;
            *saved = data;
        }
        *guard = copy;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_change_nothing_and_snapshots_survive() {
        let dir = std::env::temp_dir().join(format!("orch-lite-db-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Db::open(Box::new(JsonFile::in_dir(&dir).unwrap())).unwrap();
        db.write(|s| {
            s.signing_key = "ab".into();
            Ok::<_, DbError>(())
        })
        .unwrap();
        let r: Result<(), DbError> = db.write(|s| {
            s.signing_key = "cd".into();
            Err(DbError("no".into()))
        });
        assert!(r.is_err());
        assert_eq!(db.read(|s| s.signing_key.clone()), "ab");
        // An unchanged state is not written again.
        let file = dir.join(SNAPSHOT_FILE);
        std::fs::remove_file(&file).unwrap();
        db.write(|_| Ok::<_, DbError>(())).unwrap();
        assert!(!file.exists());
        db.write(|s| {
            s.next_subnet = 1;
            Ok::<_, DbError>(())
        })
        .unwrap();
        assert!(file.exists());
        drop(db);
        let db = Db::open(Box::new(JsonFile::in_dir(&dir).unwrap())).unwrap();
        assert_eq!(db.read(|s| s.signing_key.clone()), "ab");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(SNAPSHOT_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.join(SNAPSHOT_FILE), b"{broken").unwrap();
        let e = Db::open(Box::new(JsonFile::in_dir(&dir).unwrap()))
            .err()
            .unwrap();
        assert!(e.0.contains("move it away"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
