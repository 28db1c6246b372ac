//! The cluster REST API (`OAK_CLUSTER_API_ADDR`, upstream :10100): worker registration, the
//! root's deploy/undeploy calls, status and metrics. Each request becomes a call on the shared
//! state; the effects (MQTT publishes, root pushes) go to the [`Sink`](super::Sink).

use super::state::valid_id;
use super::{now_ms, Shared};
use crate::http::{Request, Response};
use worker::protocol::{self, NodeInfo};

pub fn handle(sh: &Shared, req: &Request) -> Response {
    let path = req.path.as_str();
    match (req.method.as_str(), path) {
        ("POST", protocol::REGISTER_PATH) => register(sh, req),
        ("GET", "/api/cluster/status") => {
            let mut v = sh.lock().status(now_ms());
            v["connected_to_root"] = sh.root_connected().into();
            // Registrations are refused (503) until this is true.
            v["mqtt_subscribed"] = sh.mqtt_ready().into();
            Response::json(200, &v)
        }
        ("GET", "/metrics") => {
            let gauges = sh.lock().gauges(now_ms());
            Response {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: sh.metrics.prometheus(&gauges).into_bytes(),
            }
        }
        ("GET", "/healthz") => Response::json(200, &serde_json::json!({"status": "ok"})),
        (m @ ("POST" | "DELETE"), p) if p.starts_with("/api/service/") => service(sh, req, m),
        ("POST", "/api/net/job/update") => job_update(sh, req),
        _ => Response::not_found(&format!("{} {}", req.method, req.path)),
    }
}

fn register(sh: &Shared, req: &Request) -> Response {
    if let Some(refusal) = not_ready(sh) {
        return refusal;
    }
    if !req.body.iter().any(|b| !b.is_ascii_whitespace()) {
        return Response::error(
            400,
            "registration body is empty; expected the node document",
        );
    }
    let info: NodeInfo = match protocol::decode(&req.body) {
        Ok(i) => i,
        Err(e) => {
            super::metrics::Metrics::inc(&sh.metrics.registrations_refused);
            return Response::error(
                400,
                &format!("registration body is not a node document: {e}"),
            );
        }
    };
    let remote = req.remote.map(|a| a.ip().to_string());
    let result = sh.lock().register(info, remote.as_deref(), now_ms());
    match result {
        // Upstream answers the port as a string (spec worker-protocol §2.2).
        Ok(id) => Response::json(
            200,
            &serde_json::json!({"id": id, "MQTT_BROKER_PORT": sh.cfg.mqtt_port().to_string()}),
        ),
        Err(r) => Response::error(r.status, &r.message),
    }
}

/// A worker registered before our MQTT subscriptions are in place would ask for its subnet
/// into the void and wait out the NetManager's 5 s retry; the worker retries a 503 sooner.
fn not_ready(sh: &Shared) -> Option<Response> {
    if sh.mqtt_ready() {
        return None;
    }
    super::metrics::Metrics::inc(&sh.metrics.registrations_refused);
    Some(Response::error(
        503,
        "cluster not ready: not yet subscribed to the worker topics on its MQTT broker; retry",
    ))
}

/// `POST /api/net/job/update {"job_name"}` from the root: the job's routable instances changed
/// (an instance failed, moved, left or came up, here or in another cluster); the workers that
/// route to it subscribed `jobs/<job>/updates_available` and query the table again.
fn job_update(sh: &Shared, req: &Request) -> Response {
    if let Some(refusal) = unauthorized(sh, req) {
        return refusal;
    }
    let body: serde_json::Value = match req.json() {
        Ok(j) => j,
        Err(r) => return r,
    };
    let Some(job_name) = body
        .get("job_name")
        .and_then(serde_json::Value::as_str)
        .filter(|n| protocol::valid_job_name(n))
    else {
        return Response::error(
            400,
            "expected {\"job_name\": \"<app>.<ns>.<service>.<ns>\"}",
        );
    };
    sh.sink.publish(
        netstack::control::topic::updates_available(job_name),
        &netstack::control::UpdatesAvailable {
            kind: "DEPLOYMENT".into(),
        },
    );
    Response::json(200, &serde_json::json!({"status": "ok"}))
}

/// Root calls carry the join token when the cluster has one (compared in constant time).
fn unauthorized(sh: &Shared, req: &Request) -> Option<Response> {
    let token = sh.cfg.root_token.as_ref()?;
    let ok = req.bearer().is_some_and(|b| {
        b.len() == token.len()
            && b.bytes()
                .zip(token.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    });
    (!ok).then(|| {
        Response::error(
            401,
            "this cluster requires Authorization: Bearer <OAK_JOIN_TOKEN> on root calls",
        )
    })
}

/// `POST|DELETE /api/service/<job_id>/<n>` from the root (CLUSTER_CONTRACT §2).
fn service(sh: &Shared, req: &Request, method: &str) -> Response {
    if let Some(refusal) = unauthorized(sh, req) {
        return refusal;
    }
    let segs = req.segments_after("/api/service").unwrap_or_default();
    let [job_id, n] = segs.as_slice() else {
        return Response::error(404, "expected /api/service/<job_id>/<instance_number>");
    };
    if !valid_id(job_id) {
        return Response::error(400, &format!("job id {job_id:?} is not a valid id"));
    }
    let number = match (method, n.parse::<i64>()) {
        ("DELETE", Ok(-1)) => None,
        (_, Ok(v)) if v >= 0 => Some(v as u64),
        _ => {
            return Response::error(
                400,
                &format!(
                "instance number {n:?} must be a non-negative integer (or -1 on DELETE for all)"
            ),
            )
        }
    };
    if method == "DELETE" {
        let effects = sh.lock().undeploy(job_id, number);
        sh.sink.dispatch(effects);
        return Response::json(200, &serde_json::json!({"status": "ok"}));
    }
    let job: serde_json::Value = match req.json() {
        Ok(j) => j,
        Err(r) => return r,
    };
    let result = sh.lock().deploy(job_id, number.unwrap_or(0), job, now_ms());
    match result {
        Ok(effects) => {
            sh.sink.dispatch(effects);
            Response::json(200, &serde_json::json!({"status": "ok"}))
        }
        Err(e) => Response::error(400, &e),
    }
}
