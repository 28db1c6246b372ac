//! Delivers root → cluster calls (CLUSTER_CONTRACT §2): one queue and thread per cluster, so a
//! dead cluster only delays its own calls; retries with backoff on connection errors and 5xx;
//! a deploy that never gets through marks its instance FAILED (upstream leaves it
//! CLUSTER_SCHEDULED forever, §4.4). Bodies are built from the state at send time, so a call
//! for an instance deleted or moved meanwhile is dropped instead of resurrecting it.

use crate::root::clusters::{aggregate_status, Outbound};
use crate::root::db::{Db, DbError};
use crate::root::model::{Instance, Job};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use worker::protocol::Status;

/// Waits between attempts (so 5 attempts in all), as CLUSTER_CONTRACT §2 promises.
const BACKOFF_MS: [u64; 4] = [500, 1000, 2000, 4000];
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A cluster's thread ends after this long without work; the next call starts a new one.
const IDLE: Duration = Duration::from_secs(30);
const MAX_RESPONSE: u64 = 1 << 20;
/// How often the job tables are compared for routing changes: bounds how long clients keep
/// routing to an instance that is no longer RUNNING, on top of the cluster's detection.
const TABLE_POLL: Duration = Duration::from_millis(200);

/// Identifies the instances the table lists, with their addresses.
fn routable_fingerprint(j: &Job) -> u64 {
    routable_fingerprint_of(j.instance_list.iter().filter(|i| i.is_routable()))
}

fn routable_fingerprint_of<'a>(it: impl Iterator<Item = &'a Instance>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for i in it {
        (
            i.instance_number,
            &i.instance_ip,
            &i.instance_ip_v6,
            &i.namespace_ip,
            &i.tunnel_ip,
            &i.tunnel_port,
        )
            .hash(&mut h);
    }
    h.finish()
}

pub struct Delivery {
    db: Arc<Db>,
    token: String,
    stop: AtomicBool,
    queues: Mutex<HashMap<String, Sender<Outbound>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Delivery {
    pub fn new(db: Arc<Db>, token: String) -> Arc<Delivery> {
        let d = Arc::new(Delivery {
            db,
            token,
            stop: AtomicBool::new(false),
            queues: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let me = d.clone();
        match std::thread::Builder::new()
            .name("root-tables".into())
            .spawn(move || me.watch_tables())
        {
            Ok(h) => d.threads.lock().unwrap_or_else(|e| e.into_inner()).push(h),
            Err(e) => log::error!("cannot start the table watcher (no failover updates): {e}"),
        }
        d
    }

    /// Every change of a job's routable instances, whatever caused it (a status push, a
    /// cluster or worker declared dead, an undeploy, a reschedule), becomes a `JobUpdate` to
    /// the clusters, which tell their workers to query the table again (spec overlay §3.7).
    /// Watching the state rather than hooking each writer means none can be forgotten; the
    /// update goes out only after the change is in the state the re-query reads.
    /// Upstream informs only the clusters that asked for the job; every cluster is told here,
    /// which costs a publish on a topic nobody may hold (clusters are few).
    fn watch_tables(self: Arc<Self>) {
        // job name → (fingerprint, round last seen); bounded by the jobs in the state, and a
        // job's name is cloned once, when it first appears.
        let mut seen: HashMap<String, (u64, u64)> = HashMap::new();
        let empty = routable_fingerprint_of(std::iter::empty());
        let mut round = 0u64;
        while self.pause(TABLE_POLL) {
            round += 1;
            let first = round == 1;
            let changed = self.db.read(|s| {
                let mut changed = Vec::new();
                for j in &s.jobs {
                    let fp = routable_fingerprint(j);
                    let before = match seen.get_mut(&j.job_name) {
                        Some(e) => std::mem::replace(e, (fp, round)).0,
                        None => {
                            seen.insert(j.job_name.clone(), (fp, round));
                            empty
                        }
                    };
                    if before != fp && !first {
                        for c in &s.clusters {
                            changed.push(Outbound::JobUpdate {
                                cluster_id: c.id.clone(),
                                job_name: j.job_name.clone(),
                            });
                        }
                    }
                }
                changed
            });
            seen.retain(|_, (_, r)| *r == round);
            if !changed.is_empty() {
                self.send(changed);
            }
        }
    }

    pub fn send(self: &Arc<Self>, items: Vec<Outbound>) {
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        for item in items {
            let cid = item.cluster_id().to_string();
            let item = match queues.get(&cid) {
                None => item,
                Some(tx) => match tx.send(item) {
                    Ok(()) => continue,
                    // The thread ended on its own; start another below.
                    Err(mpsc::SendError(item)) => item,
                },
            };
            let (tx, rx) = mpsc::channel();
            let _ = tx.send(item);
            queues.insert(cid.clone(), tx);
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("root-to-{}", &cid[..cid.len().min(8)]))
                .spawn(move || me.run(&cid, rx));
            match spawned {
                Ok(h) => {
                    let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
                    threads.retain(|t| !t.is_finished());
                    threads.push(h);
                }
                Err(e) => log::error!("cannot start delivery thread: {e}"),
            }
        }
    }

    fn run(self: Arc<Self>, cid: &str, rx: mpsc::Receiver<Outbound>) {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            match rx.recv_timeout(IDLE) {
                Ok(item) => self.deliver(item),
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    // Retire under the lock so no call slips in between the check and removal.
                    let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                    match rx.try_recv() {
                        Ok(item) => {
                            drop(queues);
                            self.deliver(item);
                        }
                        Err(_) => {
                            queues.remove(cid);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Stops accepting calls, lets in-flight ones end at their next step, joins the threads.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }

    fn deliver(&self, item: Outbound) {
        let plan = self.db.read(|s| {
            let c = s.cluster(item.cluster_id())?;
            let (method, path, body) = match &item {
                Outbound::Deploy {
                    cluster_id,
                    job_id,
                    instance,
                } => {
                    let job = s.job(job_id)?;
                    if job.instance(*instance)?.cluster_id != *cluster_id {
                        return None;
                    }
                    let body = serde_json::to_vec(&job.deploy_doc(*instance)?).ok()?;
                    (
                        "POST",
                        format!("/api/service/{job_id}/{instance}"),
                        Some(body),
                    )
                }
                Outbound::Undeploy {
                    job_id, instance, ..
                } => ("DELETE", format!("/api/service/{job_id}/{instance}"), None),
                Outbound::JobUpdate { job_name, .. } => (
                    "POST",
                    "/api/net/job/update".to_string(),
                    serde_json::to_vec(&serde_json::json!({ "job_name": job_name })).ok(),
                ),
            };
            Some((c.base_url(), c.candidate_name.clone(), method, path, body))
        });
        let Some((base, name, method, path, body)) = plan else {
            log::debug!("{item:?}: nothing to send any more");
            return;
        };
        let mut last = String::new();
        for attempt in 0..=BACKOFF_MS.len() {
            if attempt > 0 && !self.pause(Duration::from_millis(BACKOFF_MS[attempt - 1])) {
                return;
            }
            match call(
                method,
                &base,
                &path,
                &self.token,
                body.as_deref(),
                CALL_TIMEOUT,
            ) {
                Ok((code, _)) if (200..300).contains(&code) => {
                    log::info!("{method} {base}{path} → {code}");
                    return;
                }
                Ok((404, _)) if method == "DELETE" => return,
                Ok((code, text)) => {
                    last = format!(
                        "answered {code}: {}",
                        text.chars().take(200).collect::<String>()
                    );
                    if code < 500 {
                        break;
                    }
                }
                Err(e) => last = e,
            }
            log::warn!(
                "{method} {base}{path} (cluster {name}, attempt {}): {last}",
                attempt + 1
            );
        }
        if let Outbound::Deploy {
            cluster_id,
            job_id,
            instance,
        } = item
        {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let detail = format!("cluster {name} at {base} did not accept the deploy: {last}");
            let r = self.db.write(|s| {
                if let Some(job) = s.job_mut(&job_id) {
                    if let Some(i) = job.instance_mut(instance).filter(|i| {
                        i.cluster_id == cluster_id && i.status == Status::ClusterScheduled
                    }) {
                        i.status = Status::Failed;
                        i.status_detail = detail.clone();
                    }
                    job.status = aggregate_status(&job.instance_list).or(job.status);
                }
                Ok::<_, DbError>(())
            });
            if let Err(e) = r {
                log::error!("{e}");
            }
        }
    }

    /// Sleeps up to `d`; false if the root is stopping.
    fn pause(&self, d: Duration) -> bool {
        let step = Duration::from_millis(50);
        let mut waited = Duration::ZERO;
        while waited < d {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(step);
            waited += step;
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

/// One HTTP/1.1 call with `Connection: close`; returns status and body text. Enough for the
/// cluster API (JSON bodies with Content-Length) without pulling in an HTTP client crate.
pub fn call(
    method: &str,
    base_url: &str,
    path: &str,
    token: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let authority = base_url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base_url}: only http:// cluster URLs are supported"))?
        .trim_end_matches('/');
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| format!("sending to {authority}: {e}"))?;
    let mut resp = Vec::new();
    s.take(MAX_RESPONSE)
        .read_to_end(&mut resp)
        .map_err(|e| format!("reading answer of {authority}: {e}"))?;
    parse_response(&resp).ok_or_else(|| format!("{authority} did not answer with HTTP"))
}

/// Status and body of a complete HTTP/1.x response read until close; decodes a chunked body
/// (tiny_http, like most servers, chunks large bodies).
pub fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let code = text
        .strip_prefix("HTTP/1.")?
        .get(2..5)?
        .parse::<u16>()
        .ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((code, body.to_string()));
    }
    let (mut rest, mut out) = (body, String::new());
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some((code, out));
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{self, Request, Response};

    #[test]
    fn call_sends_token_and_body_and_reads_status() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let handler: http::Handler = Arc::new(move |r: &Request| {
            s2.lock().unwrap().push((
                r.method.clone(),
                r.path.clone(),
                r.bearer().map(String::from),
                r.body.clone(),
            ));
            Response::json(
                if r.method == "DELETE" { 500 } else { 200 },
                &serde_json::json!({"status": "ok"}),
            )
        });
        let srv = http::serve("127.0.0.1:0".parse().unwrap(), 1, "stand-in", handler).unwrap();
        let base = format!("http://{}", srv.addr);
        let (code, body) = call(
            "POST",
            &base,
            "/api/service/j/0",
            "tok",
            Some(b"{\"a\":1}"),
            CALL_TIMEOUT,
        )
        .unwrap();
        assert_eq!((code, body.as_str()), (200, "{\"status\":\"ok\"}"));
        assert_eq!(
            call("DELETE", &base, "/x", "tok", None, CALL_TIMEOUT)
                .unwrap()
                .0,
            500
        );
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen[0],
            (
                "POST".into(),
                "/api/service/j/0".into(),
                Some("tok".into()),
                b"{\"a\":1}".to_vec()
            )
        );
        assert!(call("GET", "https://x", "/", "t", None, CALL_TIMEOUT)
            .unwrap_err()
            .contains("http://"));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = call(
            "GET",
            &format!("http://{closed}"),
            "/",
            "t",
            None,
            CALL_TIMEOUT,
        )
        .unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");
        drop(srv);
    }

    /// A change of the table (RUNNING → FAILED, an instance's address) reaches every cluster as
    /// `POST /api/net/job/update`; a change clients cannot see (metrics, pending → RUNNING)
    /// does not.
    #[test]
    fn routing_changes_are_sent_to_the_clusters() {
        use crate::root::db::Memory;
        use crate::root::model::{Cluster, Job, Oid};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let handler: http::Handler = Arc::new(move |r: &Request| {
            s2.lock().unwrap().push((r.path.clone(), r.body.clone()));
            Response::json(200, &serde_json::json!({"status": "ok"}))
        });
        let srv = http::serve("127.0.0.1:0".parse().unwrap(), 1, "cluster", handler).unwrap();
        let db = Arc::new(Db::open(Box::new(Memory)).unwrap());
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "_id": {"$oid": "aaaaaaaaaaaaaaaaaaaaaaaa"}, "microserviceID": "", "applicationID": "",
            "job_name": "a.b.c.d", "app_name": "a", "app_ns": "b", "service_name": "c",
            "service_ns": "d", "image": "", "virtualization": "container",
            "next_instance_progressive_number": 2, "instance_list": [], "RR_ip": "",
            "RR_ip_v6": "", "service_ip_list": []}))
        .unwrap();
        let mut running = Instance::new(0, "c1", "", 0.0);
        running.status = Status::Running;
        running.instance_ip = "10.30.0.2".into();
        job.instance_list = vec![running, Instance::new(1, "c1", "", 0.0)];
        db.write(|s| {
            s.jobs.push(job);
            s.clusters.push(Cluster {
                id: Oid::new("c1").oid,
                ip: srv.addr.ip().to_string(),
                port: srv.addr.port().to_string(),
                ..Cluster::default()
            });
            Ok::<_, DbError>(())
        })
        .unwrap();
        let d = Delivery::new(db.clone(), "tok".into());
        let set = |n: u64, st: Status| {
            db.write(|s| {
                s.jobs[0].instance_mut(n).unwrap().status = st;
                Ok::<_, DbError>(())
            })
            .unwrap()
        };
        let updates = || seen.lock().unwrap().len();
        let wait = |n: usize| {
            let t = std::time::Instant::now();
            while updates() < n && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            updates()
        };
        std::thread::sleep(TABLE_POLL * 3);
        // Pending instance 1 moves on (listed before and after), and metrics: nothing a
        // client routes by.
        set(1, Status::Creating);
        db.write(|s| {
            s.jobs[0].instance_list[0].last_modified_timestamp = 9.0;
            Ok::<_, DbError>(())
        })
        .unwrap();
        std::thread::sleep(TABLE_POLL * 3);
        assert_eq!(
            updates(),
            0,
            "the first look and invisible changes are silent"
        );
        set(0, Status::Failed);
        assert_eq!(wait(1), 1, "RUNNING → FAILED");
        set(1, Status::Running);
        std::thread::sleep(TABLE_POLL * 3);
        assert_eq!(updates(), 1, "pending → RUNNING: the same table");
        db.write(|s| {
            s.jobs[0].instance_list[1].namespace_ip = "10.18.0.66".into();
            Ok::<_, DbError>(())
        })
        .unwrap();
        assert_eq!(wait(2), 2, "the new instance's address arrived");
        d.shutdown();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].0, "/api/net/job/update");
        let body: serde_json::Value = serde_json::from_slice(&seen[1].1).unwrap();
        assert_eq!(body["job_name"], "a.b.c.d");
        drop(srv);
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw), Some((200, "abcde".into())));
        assert_eq!(
            parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nx"),
            Some((404, "x".into()))
        );
        assert_eq!(parse_response(b"SSH-2.0"), None);
    }
}
