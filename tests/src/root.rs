//! The root orchestrator's REST API as a user drives it in the getting-started guide: log in,
//! post an SLA, find its services, deploy and undeploy instances, read their status. Shared by
//! every end-to-end test so they all speak to the root the same way.

use crate::api::{call, ok, wait_for};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Statuses after which waiting for RUNNING is pointless.
const TERMINAL: [&str; 4] = ["FAILED", "DEAD", "NO_WORKER_CAPACITY", "NO_NODE_FOUND"];

/// A logged-in client of one root (`host:port` of its API).
#[derive(Debug, Clone)]
pub struct Root {
    /// `host:port` of the root API.
    pub addr: String,
    /// Bearer token of the Admin user.
    pub token: String,
}

/// A service (microservice) as the root lists it.
#[derive(Debug, Clone)]
pub struct Service {
    /// The root's id (`_id.$oid`), used in the API paths.
    pub id: String,
    /// `app.ns.service.ns`: the prefix of the instance container ids on workers.
    pub job_name: String,
}

impl Service {
    /// containerd id of instance `n` on the worker that runs it.
    pub fn container(&self, n: u64) -> String {
        format!("{}.instance.{n}", self.job_name)
    }
}

impl Root {
    /// Waits up to `limit` for the API to accept the default Admin login.
    pub fn login(addr: &str, limit: Duration) -> Result<Root, String> {
        let body = json!({"username": "Admin", "password": "Admin"});
        let url = format!("http://{addr}/api/auth/login");
        let token = wait_for("the root API login", limit, || {
            match call("POST", &url, None, Some(&body)) {
                Ok((200, v)) => Ok(v["token"].as_str().map(str::to_owned)),
                Ok((c, v)) => Err(format!("login answered {c}: {v}")),
                Err(e) => Err(e),
            }
        })?;
        Ok(Root {
            addr: addr.to_owned(),
            token,
        })
    }

    /// Full URL of an API path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// An authenticated request answered with 200.
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        ok(method, &self.url(path), Some(&self.token), body)
    }

    /// An authenticated request with any status as answer.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        call(method, &self.url(path), Some(&self.token), body)
    }

    /// Waits until the active clusters report at least `workers` active workers in total.
    pub fn wait_workers(&self, workers: u64, limit: Duration) -> Result<(), String> {
        wait_for(
            &format!("the root to count {workers} active worker(s)"),
            limit,
            || {
                let (_, v) = self.call("GET", "/api/clusters/active", None)?;
                let n: u64 = v
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .map(|c| c["active_nodes"].as_u64().unwrap_or(0))
                            .sum()
                    })
                    .unwrap_or(0);
                Ok((n >= workers).then_some(()))
            },
        )
    }

    /// Posts an SLA and returns the id of the application named `app` in the answer.
    pub fn create_app(&self, sla: &Value, app: &str) -> Result<String, String> {
        let apps = self.ok("POST", "/api/application/", Some(sla))?;
        apps.as_array()
            .and_then(|l| l.iter().find(|a| a["application_name"] == app))
            .and_then(|a| a["applicationID"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("no application {app} in {apps}"))
    }

    /// The service named `name` (microservice_name) of an application.
    pub fn find_service(&self, app_id: &str, name: &str) -> Result<Service, String> {
        let jobs = self.ok("GET", &format!("/api/services/{app_id}"), None)?;
        let j = jobs
            .as_array()
            .and_then(|l| l.iter().find(|j| j["microservice_name"] == name))
            .ok_or_else(|| format!("no service {name} in {jobs}"))?;
        Ok(Service {
            id: j["_id"]["$oid"].as_str().unwrap_or_default().to_owned(),
            job_name: j["job_name"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// The root's document of a service (with `instance_list`).
    pub fn service(&self, id: &str) -> Result<Value, String> {
        self.ok("GET", &format!("/api/service/{id}"), None)
    }

    /// The root's record of instance `n` of a service, if listed.
    pub fn instance(&self, id: &str, n: u64) -> Result<Option<Value>, String> {
        let s = self.service(id)?;
        Ok(s["instance_list"]
            .as_array()
            .and_then(|l| l.iter().find(|i| i["instance_number"] == n))
            .cloned())
    }

    /// Status of instance `n` of a service at the root.
    pub fn instance_status(&self, id: &str, n: u64) -> Result<Option<String>, String> {
        Ok(self
            .instance(id, n)?
            .and_then(|i| i["status"].as_str().map(str::to_owned)))
    }

    /// Asks for one more instance; returns its number.
    pub fn add_instance(&self, s: &Service) -> Result<u64, String> {
        let r = self.ok("POST", &format!("/api/service/{}/instance", s.id), None)?;
        r["instance_number"]
            .as_u64()
            .ok_or_else(|| format!("deploy of {} answered {r}", s.job_name))
    }

    /// Waits until instance `n` is RUNNING at the root; a terminal status ends the wait early
    /// with its reason.
    pub fn wait_running(&self, s: &Service, n: u64, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let inst = self.instance(&s.id, n)?;
            let st = inst
                .as_ref()
                .and_then(|i| i["status"].as_str())
                .unwrap_or("");
            if st == "RUNNING" {
                return Ok(());
            }
            if TERMINAL.contains(&st) {
                let detail = inst.as_ref().map(|i| i["status_detail"].clone());
                return Err(format!(
                    "{} instance {n} became {st}: {detail:?}",
                    s.job_name
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} instance {n} not RUNNING after {} s (status {st:?})",
                    s.job_name,
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// POST instance → RUNNING at the root: the end-to-end deploy latency of the issues.
    pub fn deploy(&self, s: &Service, limit: Duration) -> Result<(u64, Duration), String> {
        let t0 = Instant::now();
        let n = self.add_instance(s)?;
        self.wait_running(s, n, limit)?;
        Ok((n, t0.elapsed()))
    }

    /// Undeploys instance `n` of a service.
    pub fn undeploy(&self, s: &Service, n: u64) -> Result<Value, String> {
        self.ok(
            "DELETE",
            &format!("/api/service/{}/instance/{n}", s.id),
            None,
        )
    }
}
