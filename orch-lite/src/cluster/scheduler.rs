//! The cluster scheduler: a pure function from (candidate workers, one instance's request) to a
//! placement or a negative status. No I/O, no clock: the caller passes each worker's liveness and
//! what is already reserved on it (see [`reserved_by_node`]).
//!
//! Filters (spec orchestrators.md §4.2/§5.3, plus what upstream lacks): active, virtualization,
//! architecture (`platform`/`arch`), CSI drivers, the `direct` constraint (node and cluster lists
//! separated by `;`, as upstream's docs promise), then capacity with real accounting: a worker's
//! free vcpus are its cores minus the vcpus reserved by the instances placed on it, and its free
//! memory is the smaller of what it reports available and its total minus the reservations.
//! Among the survivors the best fit wins (least normalised capacity left after placement); ties go
//! to the smallest node id, so a decision is reproducible.

use serde_json::Value;
use std::cmp::Ordering;
use std::collections::HashMap;
use worker::protocol::Status;

/// What one instance asks for, read from its job document.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    pub vcpus: f64,
    /// MiB.
    pub memory: u64,
    /// `docker` (upstream's name for containers), `unikernel`, …; `container` is mapped to docker.
    pub virtualization: String,
    /// GOARCH names the worker must have one of; empty = any.
    pub architectures: Vec<String>,
    pub csi_drivers: Vec<String>,
    /// `direct` constraint: node names (or ids) allowed; `None` = any.
    pub nodes: Option<Vec<String>>,
    /// `direct` constraint: cluster names allowed; `None` = any.
    pub clusters: Option<Vec<String>>,
    /// Worker to avoid if another fits (the one an instance just failed on).
    pub avoid: Option<String>,
}

/// The first filter a worker fails; put in words only when a rejection is reported.
enum Unqualified<'a> {
    NotInDirectList,
    Virtualization,
    Architecture,
    CsiDriver(&'a str),
}

impl Unqualified<'_> {
    fn describe(&self, c: &Candidate, req: &Request) -> String {
        match self {
            Unqualified::NotInDirectList => {
                format!(
                    "not in direct node list {:?}",
                    req.nodes.as_deref().unwrap_or(&[])
                )
            }
            Unqualified::Virtualization => format!(
                "offers virtualization {:?}, not {:?}",
                c.virtualization, req.virtualization
            ),
            Unqualified::Architecture => format!(
                "is {:?}, job needs one of {:?}",
                c.architecture, req.architectures
            ),
            Unqualified::CsiDriver(d) => format!("lacks CSI driver {d:?}"),
        }
    }
}

fn unqualified<'a>(c: &Candidate, req: &'a Request) -> Option<Unqualified<'a>> {
    if let Some(nodes) = &req.nodes {
        if !nodes.iter().any(|n| *n == c.name || *n == c.id) {
            return Some(Unqualified::NotInDirectList);
        }
    }
    if !virtualization_matches(c.virtualization, &req.virtualization) {
        return Some(Unqualified::Virtualization);
    }
    if !req.architectures.is_empty() && !req.architectures.iter().any(|a| a == c.architecture) {
        return Some(Unqualified::Architecture);
    }
    req.csi_drivers
        .iter()
        .find(|d| !c.csi_drivers.contains(&d.as_str()))
        .map(|d| Unqualified::CsiDriver(d))
}

/// Why workers were passed over, for a rejection's detail: the first few in words, the rest
/// counted. Reasons are only formatted while there is room, so a filter that passes over
/// thousands of workers (a `direct` constraint in a big cluster) costs no allocation each.
#[derive(Debug, Default)]
struct Reasons {
    shown: Vec<String>,
    more: usize,
}

impl Reasons {
    const SHOWN: usize = 8;

    fn push(&mut self, reason: impl FnOnce() -> String) {
        if self.shown.len() < Self::SHOWN {
            self.shown.push(reason());
        } else {
            self.more += 1;
        }
    }
}

impl std::fmt::Display for Reasons {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown.join("; "))?;
        if self.more > 0 {
            write!(f, "; and {} more", self.more)?;
        }
        Ok(())
    }
}

/// One worker as the scheduler sees it, borrowed from the cluster's state: building the list
/// for every decision must not copy every worker's strings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub active: bool,
    pub virtualization: &'a [String],
    pub architecture: &'a str,
    pub csi_drivers: Vec<&'a str>,
    /// Logical cores.
    pub vcpus: f64,
    /// Available MiB as last reported.
    pub memory_available: u64,
    /// Estimated total MiB (available / (1 - used%)); equals available when unknown.
    pub memory_total: u64,
    pub reserved_vcpus: f64,
    pub reserved_memory: u64,
}

impl Candidate<'_> {
    pub fn free_vcpus(&self) -> f64 {
        (self.vcpus - self.reserved_vcpus).max(0.0)
    }
    pub fn free_memory(&self) -> u64 {
        self.memory_available
            .min(self.memory_total.saturating_sub(self.reserved_memory))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Place {
        node_id: String,
    },
    /// Nothing fits: one of upstream's negative statuses and a sentence saying why.
    Reject {
        status: Status,
        detail: String,
    },
}

/// Reads the scheduling request from a job document (the root's, §4.4). Only shape errors are
/// refused; absent fields mean "no requirement".
pub fn request_from_job(job: &Value) -> Result<Request, String> {
    let num = |k: &str| -> Result<f64, String> {
        match job.get(k) {
            None | Some(Value::Null) => Ok(0.0),
            Some(Value::Number(n)) => n.as_f64().ok_or_else(|| format!("{k} is out of range")),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(0.0),
            Some(Value::String(s)) => s
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{k} must be a number, got {s:?}")),
            Some(other) => Err(format!("{k} must be a number, got {other}")),
        }
        .and_then(|v| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(format!("{k} must be a non-negative number, got {v}"))
            }
        })
    };
    let vcpus = num("vcpus")?;
    let memory = num("memory")?.ceil() as u64;
    let virtualization = match job.get("virtualization") {
        None | Some(Value::Null) => "docker".to_string(),
        Some(Value::String(s)) if s.is_empty() || s == "container" => "docker".to_string(),
        Some(Value::String(s)) => s.clone(),
        // Some SLAs carry a one-element list; upstream's scheduler reads virtualization[0].
        Some(Value::Array(a)) => match a.first() {
            Some(Value::String(s)) if s == "container" => "docker".into(),
            Some(Value::String(s)) => s.clone(),
            _ => "docker".into(),
        },
        Some(other) => return Err(format!("virtualization must be a string, got {other}")),
    };
    let mut architectures = Vec::new();
    if let Some(Value::String(p)) = job.get("platform") {
        // `linux/arm64`, `linux/arm/v7`: the second part is the GOARCH.
        if let Some(arch) = p.split('/').nth(1).filter(|a| !a.is_empty()) {
            architectures.push(arch.to_string());
        }
    }
    if let Some(Value::Array(list)) = job.get("arch") {
        architectures.extend(list.iter().filter_map(Value::as_str).map(str::to_string));
    }
    let csi_drivers = match job.get("volumes") {
        Some(Value::Array(vols)) => vols
            .iter()
            .filter_map(|v| v.get("csi_driver").and_then(Value::as_str))
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    let (mut nodes, mut clusters) = (None, None);
    if let Some(Value::Array(cs)) = job.get("constraints") {
        for c in cs {
            if c.get("type").and_then(Value::as_str) != Some("direct") {
                continue;
            }
            let split = |k: &str| -> Option<Vec<String>> {
                let s = c.get(k)?.as_str()?;
                let list: Vec<String> = s
                    .split(';')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect();
                (!list.is_empty()).then_some(list)
            };
            if let Some(n) = split("node") {
                nodes.get_or_insert_with(Vec::new).extend(n);
            }
            if let Some(n) = split("cluster") {
                clusters.get_or_insert_with(Vec::new).extend(n);
            }
        }
    }
    Ok(Request {
        vcpus,
        memory,
        virtualization,
        architectures,
        csi_drivers,
        nodes,
        clusters,
        avoid: None,
    })
}

/// Sums the reservations of placed instances per node: `(node_id, vcpus, memory)` triples in,
/// one total per node out. The caller decides which instances hold resources.
pub fn reserved_by_node<'a>(
    placed: impl IntoIterator<Item = (&'a str, f64, u64)>,
) -> HashMap<&'a str, (f64, u64)> {
    let mut m: HashMap<&'a str, (f64, u64)> = HashMap::new();
    for (node, vcpus, memory) in placed {
        let e = m.entry(node).or_default();
        e.0 += vcpus;
        e.1 += memory;
    }
    m
}

fn virtualization_matches(offered: &[String], wanted: &str) -> bool {
    offered
        .iter()
        .any(|v| v == wanted || (wanted == "docker" && v == "container"))
}

/// Places one instance. `cluster_name` is this cluster's name, for the `direct` cluster list.
pub fn schedule(candidates: &[Candidate], req: &Request, cluster_name: &str) -> Decision {
    if let Some(clusters) = &req.clusters {
        if !clusters.iter().any(|c| c == cluster_name) {
            return Decision::Reject {
                status: Status::NoQualifiedWorkerFound,
                detail: format!(
                    "direct constraint allows clusters {clusters:?}, this cluster is {cluster_name:?}"
                ),
            };
        }
    }
    let active: Vec<&Candidate> = candidates.iter().filter(|c| c.active).collect();
    if active.is_empty() {
        return Decision::Reject {
            status: Status::NoNodeFound,
            detail: format!(
                "no active worker in this cluster ({} registered, none reported recently)",
                candidates.len()
            ),
        };
    }
    let mut why = Reasons::default();
    let qualified: Vec<&Candidate> = active
        .into_iter()
        .filter(|c| match unqualified(c, req) {
            Some(r) => {
                why.push(|| format!("{} {}", c.name, r.describe(c, req)));
                false
            }
            None => true,
        })
        .collect();
    if qualified.is_empty() {
        return Decision::Reject {
            status: Status::NoQualifiedWorkerFound,
            detail: format!("no qualified worker: {why}"),
        };
    }
    let fitting: Vec<&Candidate> = qualified
        .into_iter()
        .filter(|c| {
            let ok = c.free_vcpus() + 1e-9 >= req.vcpus && c.free_memory() >= req.memory;
            if !ok {
                why.push(|| {
                    format!(
                        "{} has {:.2} free vcpus and {} MiB free memory",
                        c.name,
                        c.free_vcpus(),
                        c.free_memory()
                    )
                });
            }
            ok
        })
        .collect();
    let best = fitting.into_iter().min_by(|a, b| {
        let avoided = |c: &Candidate| req.avoid.as_deref() == Some(c.id);
        avoided(a)
            .cmp(&avoided(b))
            .then_with(|| {
                leftover(a, req)
                    .partial_cmp(&leftover(b, req))
                    .unwrap_or(Ordering::Equal)
            })
            .then_with(|| a.id.cmp(b.id))
    });
    match best {
        Some(c) => Decision::Place {
            node_id: c.id.to_string(),
        },
        None => Decision::Reject {
            status: Status::NoWorkerCapacity,
            detail: format!(
                "no worker has {} vcpus and {} MiB free: {why}",
                req.vcpus, req.memory,
            ),
        },
    }
}

/// Share of the worker's capacity left after placing the request, vcpus and memory weighted
/// equally: the smaller, the tighter the fit.
fn leftover(c: &Candidate, req: &Request) -> f64 {
    let cpu = if c.vcpus > 0.0 {
        (c.free_vcpus() - req.vcpus) / c.vcpus
    } else {
        0.0
    };
    let mem = if c.memory_total > 0 {
        (c.free_memory() as f64 - req.memory as f64) / c.memory_total as f64
    } else {
        0.0
    };
    cpu + mem
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Test workers live for the test binary's lifetime, as the cluster's state outlives a
    /// decision.
    fn leak<T: ?Sized>(v: Box<T>) -> &'static T {
        Box::leak(v)
    }
    fn strings(v: &[&str]) -> &'static [String] {
        leak(
            v.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        )
    }
    fn node(id: &str, vcpus: f64, mem: u64) -> Candidate<'static> {
        Candidate {
            id: leak(id.to_string().into_boxed_str()),
            name: leak(format!("w-{id}").into_boxed_str()),
            active: true,
            virtualization: strings(&["docker"]),
            architecture: "amd64",
            csi_drivers: vec![],
            vcpus,
            memory_available: mem,
            memory_total: mem,
            reserved_vcpus: 0.0,
            reserved_memory: 0,
        }
    }
    fn req(vcpus: f64, memory: u64) -> Request {
        Request {
            vcpus,
            memory,
            virtualization: "docker".into(),
            ..Request::default()
        }
    }
    fn placed(d: Decision) -> String {
        match d {
            Decision::Place { node_id } => node_id,
            other => panic!("expected a placement, got {other:?}"),
        }
    }
    fn rejected(d: Decision) -> (Status, String) {
        match d {
            Decision::Reject { status, detail } => (status, detail),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn best_fit_picks_tightest_and_ties_go_to_smallest_id() {
        let c = [
            node("b", 4.0, 4000),
            node("a", 8.0, 8000),
            node("c", 2.0, 1000),
        ];
        assert_eq!(placed(schedule(&c, &req(1.0, 500), "c1")), "c");
        assert_eq!(placed(schedule(&c, &req(3.0, 500), "c1")), "b");
        let same = [
            node("z", 4.0, 4000),
            node("m", 4.0, 4000),
            node("q", 4.0, 4000),
        ];
        assert_eq!(placed(schedule(&same, &req(1.0, 100), "c1")), "m");
    }

    #[test]
    fn a_rejection_names_a_few_workers_and_counts_the_rest() {
        let nodes: Vec<Candidate> = (0..1000)
            .map(|i| node(&format!("n{i:04}"), 4.0, 4096))
            .collect();
        let mut r = req(0.1, 16);
        r.nodes = Some(vec!["elsewhere".into()]);
        let Decision::Reject { status, detail } = schedule(&nodes, &r, "c") else {
            panic!("placed on a worker outside the direct list");
        };
        assert_eq!(status, Status::NoQualifiedWorkerFound);
        assert!(
            detail.starts_with(
                "no qualified worker: w-n0000 not in direct node list [\"elsewhere\"]; w-n0001"
            ),
            "{detail}"
        );
        assert_eq!(
            detail.matches("not in direct node list").count(),
            Reasons::SHOWN,
            "{detail}"
        );
        assert!(detail.ends_with("; and 992 more"), "{detail}");
        // with room for only some, the capacity reasons are bounded the same way
        let Decision::Reject { detail, .. } = schedule(&nodes, &req(8.0, 16), "c") else {
            panic!("placed 8 vcpus on a 4-vcpu worker");
        };
        assert_eq!(
            detail.matches("free vcpus").count(),
            Reasons::SHOWN,
            "{detail}"
        );
        assert!(detail.ends_with("; and 992 more"), "{detail}");
    }

    #[test]
    fn filters_virtualization_architecture_csi_and_direct() {
        let mut arm = node("arm", 4.0, 4000);
        arm.architecture = "arm64";
        let mut uni = node("uni", 4.0, 4000);
        uni.virtualization = strings(&["unikernel"]);
        let mut csi = node("csi", 4.0, 4000);
        csi.csi_drivers = vec!["nfs"];
        let c = [node("amd", 4.0, 4000), arm, uni, csi];

        let mut r = req(1.0, 100);
        r.architectures = vec!["arm64".into()];
        assert_eq!(placed(schedule(&c, &r, "c1")), "arm");
        let mut r = req(1.0, 100);
        r.virtualization = "unikernel".into();
        assert_eq!(placed(schedule(&c, &r, "c1")), "uni");
        let mut r = req(1.0, 100);
        r.csi_drivers = vec!["nfs".into()];
        assert_eq!(placed(schedule(&c, &r, "c1")), "csi");
        let mut r = req(1.0, 100);
        r.nodes = Some(vec!["nowhere".into(), "w-amd".into()]);
        assert_eq!(placed(schedule(&c, &r, "c1")), "amd");
        r.nodes = Some(vec!["csi".into()]);
        assert_eq!(placed(schedule(&c, &r, "c1")), "csi", "node ids work too");

        let mut r = req(1.0, 100);
        r.virtualization = "crosvm".into();
        let (st, detail) = rejected(schedule(&c, &r, "c1"));
        assert_eq!(st, Status::NoQualifiedWorkerFound);
        assert!(detail.contains("crosvm"), "{detail}");
        let mut r = req(1.0, 100);
        r.clusters = Some(vec!["other".into()]);
        assert_eq!(
            rejected(schedule(&c, &r, "c1")).0,
            Status::NoQualifiedWorkerFound
        );
        r.clusters = Some(vec!["other".into(), "c1".into()]);
        assert!(matches!(schedule(&c, &r, "c1"), Decision::Place { .. }));
    }

    #[test]
    fn negative_statuses_say_why() {
        assert_eq!(
            rejected(schedule(&[], &req(1.0, 1), "c")).0,
            Status::NoNodeFound
        );
        let mut idle = node("a", 4.0, 4000);
        idle.active = false;
        let (st, detail) = rejected(schedule(&[idle], &req(1.0, 1), "c"));
        assert_eq!(st, Status::NoNodeFound);
        assert!(detail.contains("1 registered"), "{detail}");
        let (st, detail) = rejected(schedule(&[node("a", 2.0, 4000)], &req(3.0, 1), "c"));
        assert_eq!(st, Status::NoWorkerCapacity);
        assert!(detail.contains("w-a has 2.00 free vcpus"), "{detail}");
        let (st, _) = rejected(schedule(&[node("a", 2.0, 100)], &req(1.0, 101), "c"));
        assert_eq!(st, Status::NoWorkerCapacity);
    }

    #[test]
    fn accounting_reserves_and_releases() {
        // Two 1-vcpu instances already on a 2-core worker: a third does not fit, on either
        // memory or cpu, until one is released.
        let placed_list = [("a", 1.0, 1000u64), ("a", 1.0, 1000), ("b", 0.5, 10)];
        let r = reserved_by_node(placed_list.iter().map(|(n, v, m)| (*n, *v, *m)));
        assert_eq!(r["a"], (2.0, 2000));
        let mut a = node("a", 2.0, 3000);
        (a.reserved_vcpus, a.reserved_memory) = r["a"];
        assert_eq!((a.free_vcpus(), a.free_memory()), (0.0, 1000));
        assert_eq!(
            rejected(schedule(std::slice::from_ref(&a), &req(1.0, 100), "c")).0,
            Status::NoWorkerCapacity
        );
        // Release one (undeploy): the same request fits again.
        let r = reserved_by_node(placed_list[1..].iter().map(|(n, v, m)| (*n, *v, *m)));
        (a.reserved_vcpus, a.reserved_memory) = r["a"];
        assert_eq!(placed(schedule(&[a.clone()], &req(1.0, 100), "c")), "a");
        // Reported available memory also bounds the free memory (live usage).
        a.memory_available = 50;
        assert_eq!(a.free_memory(), 50);
    }

    #[test]
    fn avoided_worker_is_used_only_as_last_resort() {
        let c = [node("a", 2.0, 1000), node("b", 8.0, 8000)];
        let mut r = req(1.0, 100);
        r.avoid = Some("a".into());
        assert_eq!(placed(schedule(&c, &r, "c")), "b");
        assert_eq!(placed(schedule(&c[..1], &r, "c")), "a");
    }

    #[test]
    fn request_from_root_job_document() {
        let job = json!({"_id":"j","job_name":"a.b.c.d","virtualization":"container","vcpus":"0.5",
            "memory":100,"platform":"linux/arm64","volumes":[{"volume_id":"v","csi_driver":"nfs"}],
            "constraints":[{"type":"direct","node":"w1; w2","cluster":"c1"},{"type":"geo"}]});
        let r = request_from_job(&job).unwrap();
        assert_eq!(r.virtualization, "docker");
        assert_eq!((r.vcpus, r.memory), (0.5, 100));
        assert_eq!(r.architectures, ["arm64"]);
        assert_eq!(r.csi_drivers, ["nfs"]);
        assert_eq!(r.nodes, Some(vec!["w1".into(), "w2".into()]));
        assert_eq!(r.clusters, Some(vec!["c1".into()]));
        assert_eq!(request_from_job(&json!({})).unwrap(), {
            let mut d = req(0.0, 0);
            d.virtualization = "docker".into();
            d
        });
        assert!(request_from_job(&json!({"memory": -1}))
            .unwrap_err()
            .contains("non-negative"));
        assert!(request_from_job(&json!({"vcpus": [1]})).is_err());
        assert!(request_from_job(&json!({"virtualization": 5})).is_err());
    }
}
