//! The cluster's root link against a stand-in root (orch-lite's own HTTP edge recording calls):
//! registration with the join token, immediate status pushes, the periodic aggregated report,
//! and re-registration when the root answers 404 (CLUSTER_CONTRACT.md §1).

mod cluster_support;

use cluster_support::*;
use orch_lite::http::{serve, Request, Response};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CID: &str = "aaaaaaaaaaaaaaaaaaaaaaaa";
const TOKEN: &str = "root-token";

#[derive(Default)]
struct FakeRoot {
    calls: Mutex<Vec<(String, Option<String>, Value)>>,
    registrations: AtomicU32,
    /// Answer this many reports with 404 (the root lost the cluster).
    forget: AtomicU32,
}

impl FakeRoot {
    fn calls_to(&self, path: &str) -> Vec<(Option<String>, Value)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, b, v)| (b.clone(), v.clone()))
            .collect()
    }
}

#[test]
fn cluster_registers_pushes_and_reports_to_root() {
    let root = Arc::new(FakeRoot::default());
    root.forget.store(1, Ordering::Relaxed);
    let r = root.clone();
    let server = serve(
        "127.0.0.1:0".parse().unwrap(),
        2,
        "fake-root",
        Arc::new(move |req: &Request| {
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            r.calls.lock().unwrap().push((
                req.path.clone(),
                req.bearer().map(str::to_string),
                body,
            ));
            match req.path.as_str() {
                "/api/clusters/register" => {
                    r.registrations.fetch_add(1, Ordering::Relaxed);
                    Response::json(200, &json!({ "id": CID }))
                }
                p if p == format!("/api/information/{CID}") => {
                    if r.forget.load(Ordering::Relaxed) > 0 {
                        r.forget.fetch_sub(1, Ordering::Relaxed);
                        return Response::error(404, "unknown cluster");
                    }
                    Response::json(200, &"ok")
                }
                _ => Response::json(200, &"ok"),
            }
        }),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let orch = Orch::start(
        dir.path(),
        free_port(),
        &[
            ("OAK_ROOT_URL", &format!("http://{}", server.addr)),
            ("OAK_JOIN_TOKEN", TOKEN),
            // Long enough that every report below comes from a change in capacity.
            ("OAK_CLUSTER_REPORT_INTERVAL_MS", "60000"),
            ("OAK_ADVERTISE_ADDR", "192.0.2.7"),
        ],
    );
    wait_for("registration", Duration::from_secs(10), || {
        !root.calls_to("/api/clusters/register").is_empty()
    });
    let (bearer, reg) = root.calls_to("/api/clusters/register").remove(0);
    assert_eq!(bearer.as_deref(), Some(TOKEN));
    assert_eq!(reg["cluster_name"], "test-cluster");
    assert_eq!(reg["manager_port"], orch.api);
    assert_eq!(reg["cluster_address"], "192.0.2.7");
    // The first report is answered 404: the cluster registers again.
    wait_for("re-registration after 404", Duration::from_secs(10), || {
        root.registrations.load(Ordering::Relaxed) >= 2
    });
    wait_for("connected_to_root", Duration::from_secs(10), || {
        let st = orch.status();
        st["connected_to_root"] == true && st["cluster_id"] == CID
    });

    let (_, b) = orch.register(&node_doc("w1", "m1", 4, 4000, Some(TOKEN)));
    let id = b["id"].as_str().unwrap().to_string();
    let w = SimWorker::connect(&id, orch.mqtt, 4, 4000);
    // A worker joining is reported at once, so a deploy right after it is not refused for
    // lack of capacity while the root waits for the next periodic report.
    let report_path = format!("/api/information/{CID}");
    wait_for(
        "capacity report after the worker joined",
        Duration::from_secs(3),
        || {
            root.calls_to(&report_path)
                .iter()
                .any(|(_, v)| v["active_nodes"] == 1 && v["vcpus"] == 4)
        },
    );
    assert_eq!(
        orch.deploy("job9", 0, &job_doc("app.ns.api.ns"), Some(TOKEN)),
        200
    );
    w.deploys
        .recv_timeout(Duration::from_secs(10))
        .expect("deploy");

    // Status pushes arrive as things happen, well before a 15 s report would.
    let push_path = format!("/api/information/{CID}/jobs");
    wait_for("RUNNING pushed to the root", Duration::from_secs(5), || {
        root.calls_to(&push_path).iter().any(|(_, v)| {
            v["jobs"][0]["_id"] == "job9" && v["jobs"][0]["instance_list"][0]["status"] == "RUNNING"
        })
    });
    let pushes = root.calls_to(&push_path);
    assert!(pushes.iter().all(|(b, _)| b.as_deref() == Some(TOKEN)));
    assert_eq!(
        pushes[0].1["jobs"][0]["instance_list"][0]["worker_id"],
        id.as_str()
    );

    // The report aggregates the active workers and lists the job (a second worker joining
    // triggers it).
    let (_, b2) = orch.register(&node_doc("w2", "m2", 2, 2000, Some(TOKEN)));
    let w2 = SimWorker::connect(b2["id"].as_str().unwrap(), orch.mqtt, 2, 2000);
    wait_for("aggregated report", Duration::from_secs(5), || {
        root.calls_to(&report_path).iter().any(|(_, v)| {
            v["active_nodes"] == 2 && v["vcpus"] == 6 && v["jobs"][0]["status"] == "RUNNING"
        })
    });
    drop(w2);
    drop(w);
}
