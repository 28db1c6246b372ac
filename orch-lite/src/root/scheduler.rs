//! Root scheduler (spec §4.2): a pure function from (clusters, request) to a cluster or one of
//! upstream's negative statuses. Fixes kept compatible: memory of instances placed but not yet
//! running is reserved (upstream overcommits), and ties break on a fixed order (upstream's
//! comparator compares `b.memory` with itself).

use worker::protocol::Status;

#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub active: bool,
    /// Total cores over the cluster's active workers (upstream compares the request to it).
    pub vcpus: u64,
    /// Available MB as last reported.
    pub memory: u64,
    /// MB of instances placed here that the last report cannot reflect yet.
    pub reserved_memory: u64,
    pub cpu_percent: f64,
    pub virtualization: &'a [String],
    pub csi_drivers: &'a [String],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request<'a> {
    pub virtualization: &'a str,
    pub vcpus: u64,
    pub memory: u64,
    /// Cluster name from a `direct` constraint.
    pub direct_cluster: Option<&'a str>,
    pub csi_drivers: &'a [String],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub status: Status,
    pub detail: String,
}

fn virt_matches(offered: &str, wanted: &str) -> bool {
    fn norm(v: &str) -> &str {
        if v == "container" {
            "docker"
        } else {
            v
        }
    }
    norm(offered) == norm(wanted)
}

fn free_memory(c: &Candidate) -> u64 {
    c.memory.saturating_sub(c.reserved_memory)
}

/// Why `c` cannot take `r`, or `None` if it can.
fn misfit(c: &Candidate, r: &Request) -> Option<String> {
    if !c
        .virtualization
        .iter()
        .any(|v| virt_matches(v, r.virtualization))
    {
        return Some(format!(
            "no worker offers virtualization {:?} (offered: {:?})",
            r.virtualization, c.virtualization
        ));
    }
    if c.vcpus < r.vcpus {
        return Some(format!(
            "{} vcpus requested, {} available",
            r.vcpus, c.vcpus
        ));
    }
    if free_memory(c) < r.memory {
        return Some(format!(
            "{} MB requested, {} MB free",
            r.memory,
            free_memory(c)
        ));
    }
    if let Some(d) = r.csi_drivers.iter().find(|d| !c.csi_drivers.contains(d)) {
        return Some(format!("no worker offers CSI driver {d:?}"));
    }
    None
}

/// Picks the cluster for one instance; returns the index into `clusters`.
pub fn schedule(clusters: &[Candidate], r: &Request) -> Result<usize, Rejection> {
    let reject = |status, detail: String| Err(Rejection { status, detail });
    if let Some(name) = r.direct_cluster {
        let Some(i) = clusters.iter().position(|c| c.name == name) else {
            return reject(
                Status::TargetClusterNotFound,
                format!("no cluster named {name:?} is registered (direct constraint)"),
            );
        };
        let c = &clusters[i];
        if !c.active {
            return reject(
                Status::TargetClusterNotActive,
                format!("cluster {name:?} is not reporting (direct constraint)"),
            );
        }
        return match misfit(c, r) {
            Some(why) => reject(
                Status::TargetClusterNoCapacity,
                format!("cluster {name:?}: {why}"),
            ),
            None => Ok(i),
        };
    }
    if !clusters.iter().any(|c| c.active) {
        return reject(
            Status::TargetClusterNotActive,
            "no active cluster: none registered or none reporting".into(),
        );
    }
    let mut reasons = Vec::new();
    let best = clusters
        .iter()
        .enumerate()
        .filter(|(_, c)| c.active)
        .filter(|(_, c)| match misfit(c, r) {
            Some(why) => {
                reasons.push(format!("{}: {why}", c.name));
                false
            }
            None => true,
        })
        .min_by(|(_, a), (_, b)| {
            // Least loaded first, then most free memory, then name and id for a stable order.
            a.cpu_percent
                .total_cmp(&b.cpu_percent)
                .then(free_memory(b).cmp(&free_memory(a)))
                .then(a.name.cmp(b.name))
                .then(a.id.cmp(b.id))
        })
        .map(|(i, _)| i);
    match best {
        Some(i) => Ok(i),
        None => reject(
            Status::NoActiveClusterWithCapacity,
            format!("no active cluster fits: {}", reasons.join("; ")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker() -> Vec<String> {
        vec!["docker".into()]
    }

    fn cand<'a>(id: &'a str, v: &'a [String], cpu: f64, mem: u64) -> Candidate<'a> {
        Candidate {
            id,
            name: id,
            active: true,
            vcpus: 4,
            memory: mem,
            reserved_memory: 0,
            cpu_percent: cpu,
            virtualization: v,
            csi_drivers: &[],
        }
    }

    fn req(mem: u64) -> Request<'static> {
        Request {
            virtualization: "docker",
            vcpus: 1,
            memory: mem,
            direct_cluster: None,
            csi_drivers: &[],
        }
    }

    #[test]
    fn picks_least_loaded_fitting_cluster_with_stable_ties() {
        let d = docker();
        let cs = [
            cand("a", &d, 50.0, 1000),
            cand("b", &d, 10.0, 1000),
            cand("c", &d, 5.0, 50),
        ];
        assert_eq!(
            schedule(&cs, &req(100)),
            Ok(1),
            "c is least loaded but too small"
        );
        let tie = [
            cand("b", &d, 10.0, 1000),
            cand("a", &d, 10.0, 1000),
            cand("z", &d, 10.0, 2000),
        ];
        assert_eq!(
            schedule(&tie, &req(100)),
            Ok(2),
            "more free memory wins a cpu tie"
        );
        let tie = [cand("b", &d, 10.0, 1000), cand("a", &d, 10.0, 1000)];
        assert_eq!(schedule(&tie, &req(100)), Ok(1), "then the name");
    }

    #[test]
    fn reserved_memory_counts_and_container_means_docker() {
        let d = docker();
        let mut c = cand("a", &d, 1.0, 1000);
        c.reserved_memory = 950;
        let e = schedule(&[c], &req(100)).unwrap_err();
        assert_eq!(e.status, Status::NoActiveClusterWithCapacity);
        assert!(e.detail.contains("50 MB free"), "{}", e.detail);
        let cont = vec!["container".to_string()];
        assert_eq!(schedule(&[cand("a", &cont, 1.0, 1000)], &req(100)), Ok(0));
    }

    #[test]
    fn negative_statuses_as_upstream() {
        let d = docker();
        let uni = vec!["unikernel".to_string()];
        assert_eq!(
            schedule(&[], &req(1)).unwrap_err().status,
            Status::TargetClusterNotActive
        );
        let mut inactive = cand("a", &d, 1.0, 1000);
        inactive.active = false;
        assert_eq!(
            schedule(&[inactive.clone()], &req(1)).unwrap_err().status,
            Status::TargetClusterNotActive
        );
        let e = schedule(&[cand("a", &uni, 1.0, 1000)], &req(1)).unwrap_err();
        assert_eq!(e.status, Status::NoActiveClusterWithCapacity);
        assert!(e.detail.contains("virtualization"), "{}", e.detail);
        let mut r = req(1);
        r.vcpus = 8;
        assert_eq!(
            schedule(&[cand("a", &d, 1.0, 1000)], &r)
                .unwrap_err()
                .status,
            Status::NoActiveClusterWithCapacity
        );
        let csi = vec!["csi.x".to_string()];
        let mut r = req(1);
        r.csi_drivers = &csi;
        assert!(schedule(&[cand("a", &d, 1.0, 1000)], &r)
            .unwrap_err()
            .detail
            .contains("csi.x"));
    }

    #[test]
    fn direct_constraint() {
        let d = docker();
        let mut off = cand("off", &d, 0.0, 1000);
        off.active = false;
        let cs = [
            cand("a", &d, 90.0, 1000),
            cand("b", &d, 1.0, 1000),
            off,
            cand("small", &d, 0.0, 10),
        ];
        let with = |name: &'static str| Request {
            direct_cluster: Some(name),
            ..req(100)
        };
        assert_eq!(schedule(&cs, &with("a")), Ok(0), "direct wins over load");
        assert_eq!(
            schedule(&cs, &with("nope")).unwrap_err().status,
            Status::TargetClusterNotFound
        );
        assert_eq!(
            schedule(&cs, &with("off")).unwrap_err().status,
            Status::TargetClusterNotActive
        );
        assert_eq!(
            schedule(&cs, &with("small")).unwrap_err().status,
            Status::TargetClusterNoCapacity
        );
    }
}
