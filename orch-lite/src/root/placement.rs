//! Placing instances on clusters: turns the stored clusters and jobs into scheduler inputs, and
//! applies a decision to the state (instance entry, instance IP, statuses). Used for new
//! instances (`POST /api/service/<id>/instance`) and for moving instances off a silent cluster.
//! Sending the deploy call is the caller's business (it returns what to send).

use crate::root::db::State;
use crate::root::ipam::instance_v6_for;
use crate::root::model::{Instance, Job};
use crate::root::scheduler::{self, Candidate, Rejection};
use std::collections::HashMap;
use worker::protocol::Status;

/// Scheduler candidates, with the memory of instances that are placed but not running yet
/// reserved on their cluster (the cluster's report cannot reflect them yet).
pub fn candidates(state: &State, now: f64, timeout_secs: f64) -> Vec<Candidate<'_>> {
    let mut reserved: HashMap<&str, u64> = HashMap::new();
    for j in &state.jobs {
        let mem = j.sla_u64("memory");
        for i in j.instance_list.iter().filter(|i| i.is_pending()) {
            *reserved.entry(i.cluster_id.as_str()).or_default() += mem;
        }
    }
    state
        .clusters
        .iter()
        .map(|c| Candidate {
            id: &c.id,
            name: &c.candidate_name,
            active: c.is_active(now, timeout_secs),
            vcpus: c.vcpus,
            memory: c.memory,
            reserved_memory: reserved.get(c.id.as_str()).copied().unwrap_or(0),
            cpu_percent: c.cpu_percent,
            virtualization: &c.virtualization,
            csi_drivers: &c.csi_drivers,
        })
        .collect()
}

/// Chooses a cluster for one instance of `job`, never `exclude`.
fn choose(
    state: &State,
    job: &Job,
    exclude: Option<&str>,
    now: f64,
    timeout_secs: f64,
) -> Result<(String, String), Rejection> {
    let mut cands = candidates(state, now, timeout_secs);
    if let Some(x) = exclude {
        for c in cands.iter_mut().filter(|c| c.id == x) {
            c.active = false;
        }
    }
    let csi = job.csi_drivers();
    let direct = job.direct_cluster();
    let req = scheduler::Request {
        virtualization: &job.virtualization,
        vcpus: job.sla_u64("vcpus"),
        memory: job.sla_u64("memory"),
        direct_cluster: direct.as_deref(),
        csi_drivers: &csi,
    };
    let i = scheduler::schedule(&cands, &req)?;
    let c = &state.clusters[i];
    Ok((c.id.clone(), c.candidate_location.clone()))
}

fn no_job(job_id: &str) -> Rejection {
    Rejection {
        status: Status::Failed,
        detail: format!("service {job_id} no longer exists"),
    }
}

/// Adds one instance to `job_id`: on success it is `CLUSTER_SCHEDULED` with its instance IP and
/// the number is returned with the chosen cluster; on failure the job carries the negative
/// status (spec §5.5) and nothing else changes.
pub fn add_instance(
    state: &mut State,
    job_id: &str,
    now: f64,
    timeout_secs: f64,
) -> Result<(u64, String), Rejection> {
    let job = state.job(job_id).ok_or_else(|| no_job(job_id))?;
    let decision = choose(state, job, None, now, timeout_secs).and_then(|d| {
        let ip = state.ipam.allocate().map_err(|e| Rejection {
            status: Status::Failed,
            detail: e.to_string(),
        })?;
        // The v6 twin is derived; a user-chosen rr_ip_v6 can never sit in block 1.
        let _ = state.ipam.reserve_v6(instance_v6_for(ip));
        Ok((d, ip))
    });
    let job = state.job_mut(job_id).ok_or_else(|| no_job(job_id))?;
    let ((cluster_id, location), ip) = match decision {
        Ok(d) => d,
        Err(rej) => {
            job.status = Some(rej.status);
            job.status_detail = Some(rej.detail.clone());
            return Err(rej);
        }
    };
    let n = job.next_instance_progressive_number;
    job.next_instance_progressive_number += 1;
    let mut inst = Instance::new(n, &cluster_id, &location, now);
    inst.status_detail =
        format!("placed on cluster {cluster_id}; waiting for the cluster to pick a worker");
    inst.instance_ip = ip.to_string();
    inst.instance_ip_v6 = instance_v6_for(ip).to_string();
    job.instance_list.push(inst);
    job.status = Some(Status::ClusterScheduled);
    job.status_detail = Some(format!("instance {n} placed on cluster {cluster_id}"));
    Ok((n, cluster_id))
}

/// Moves instance `n` of `job_id` to another cluster than its current one, keeping its number
/// and instance IP (the overlay keys on them). On failure the instance becomes `FAILED` with
/// the reason and stays where it was, so a later check can try again.
pub fn move_instance(
    state: &mut State,
    job_id: &str,
    n: u64,
    why: &str,
    now: f64,
    timeout_secs: f64,
) -> Result<String, Rejection> {
    let job = state.job(job_id).ok_or_else(|| no_job(job_id))?;
    let from = job
        .instance(n)
        .map(|i| i.cluster_id.clone())
        .unwrap_or_default();
    let decision = choose(state, job, Some(&from), now, timeout_secs);
    let job = state.job_mut(job_id).ok_or_else(|| no_job(job_id))?;
    let inst = job.instance_mut(n).ok_or_else(|| no_job(job_id))?;
    match decision {
        Ok((cluster_id, location)) => {
            inst.cluster_id = cluster_id.clone();
            inst.cluster_location = location;
            inst.status = Status::ClusterScheduled;
            inst.status_detail = format!("{why}; moved to cluster {cluster_id}");
            inst.worker_id.clear();
            inst.host_ip.clear();
            inst.host_port.clear();
            inst.publicip.clear();
            // the instance gets a new namespace on its new worker
            inst.tunnel_ip.clear();
            inst.tunnel_port.clear();
            inst.namespace_ip.clear();
            inst.namespace_ip_v6.clear();
            inst.last_modified_timestamp = now;
            job.status = Some(Status::ClusterScheduled);
            job.status_detail = Some(format!("instance {n} moved to cluster {cluster_id}"));
            Ok(cluster_id)
        }
        Err(rej) => {
            let detail = format!(
                "{why}; no other cluster can take it: {} ({})",
                rej.status, rej.detail
            );
            if inst.status != Status::Failed || inst.status_detail != detail {
                inst.status = Status::Failed;
                inst.status_detail = detail;
                inst.last_modified_timestamp = now;
            }
            Err(rej)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::root::model::{Cluster, Oid};
    use serde_json::json;

    /// One job `j1` (100 MB, 1 vcpu, docker) and the named clusters, active at t=1000.
    pub fn state_with(clusters: &[(&str, u64)]) -> State {
        let mut s = State::default();
        for (name, mem) in clusters {
            s.clusters.push(Cluster {
                id: format!("id-{name}"),
                candidate_name: name.to_string(),
                vcpus: 4,
                memory: *mem,
                virtualization: vec!["docker".into()],
                last_modified_timestamp: 1000.0,
                ..Cluster::default()
            });
        }
        let sla = json!({"memory": 100, "vcpus": 1})
            .as_object()
            .unwrap()
            .clone();
        s.jobs.push(Job {
            id: Oid::new("j1"),
            microservice_id: "j1".into(),
            application_id: "a".into(),
            job_name: "a.b.c.d".into(),
            app_name: "a".into(),
            app_ns: "b".into(),
            service_name: "c".into(),
            service_ns: "d".into(),
            image: "img".into(),
            virtualization: "docker".into(),
            next_instance_progressive_number: 0,
            instance_list: vec![],
            rr_ip: String::new(),
            rr_ip_v6: String::new(),
            service_ip_list: vec![],
            status: None,
            status_detail: None,
            sla,
        });
        s
    }

    pub fn one_job_state() -> State {
        state_with(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::state_with;
    use super::*;

    #[test]
    fn instances_get_numbers_ips_and_reserve_memory() {
        let mut s = state_with(&[("a", 250)]);
        assert_eq!(
            add_instance(&mut s, "j1", 1001.0, 30.0),
            Ok((0, "id-a".into()))
        );
        assert_eq!(
            add_instance(&mut s, "j1", 1001.0, 30.0),
            Ok((1, "id-a".into()))
        );
        let rej = add_instance(&mut s, "j1", 1001.0, 30.0).unwrap_err();
        assert_eq!(
            rej.status,
            Status::NoActiveClusterWithCapacity,
            "250 MB minus 2x100 reserved"
        );
        let j = s.job("j1").unwrap();
        assert_eq!(j.status, Some(Status::NoActiveClusterWithCapacity));
        assert_eq!(j.instance_list.len(), 2);
        assert_eq!(j.instance_list[0].instance_ip, "10.30.0.1");
        assert_eq!(j.instance_list[1].instance_ip, "10.30.0.2");
        assert_eq!(j.instance_list[1].instance_ip_v6, "fdff::2");
        assert!(!s.ipam.is_free("10.30.0.2".parse().unwrap()));
        // Once running, the cluster's report accounts for the memory: no more reservation.
        s.job_mut("j1").unwrap().instance_list[0].status = Status::Running;
        assert_eq!(
            add_instance(&mut s, "j1", 1001.0, 30.0),
            Ok((2, "id-a".into()))
        );
    }

    #[test]
    fn moving_keeps_number_and_ip_or_fails_visibly() {
        let mut s = state_with(&[("a", 1000), ("b", 1000)]);
        s.clusters[1].cpu_percent = 50.0;
        add_instance(&mut s, "j1", 1001.0, 30.0).unwrap();
        let ip = s.job("j1").unwrap().instance_list[0].instance_ip.clone();
        assert_eq!(
            move_instance(&mut s, "j1", 0, "cluster a silent", 1001.0, 30.0),
            Ok("id-b".into())
        );
        let i = &s.job("j1").unwrap().instance_list[0];
        assert_eq!(
            (i.cluster_id.as_str(), i.instance_ip.as_str(), i.status),
            ("id-b", ip.as_str(), Status::ClusterScheduled)
        );
        s.clusters[0].last_modified_timestamp = 0.0;
        let rej = move_instance(&mut s, "j1", 0, "cluster b silent", 1001.0, 30.0).unwrap_err();
        assert_eq!(rej.status, Status::TargetClusterNotActive);
        let i = &s.job("j1").unwrap().instance_list[0];
        assert_eq!((i.cluster_id.as_str(), i.status), ("id-b", Status::Failed));
        assert!(
            i.status_detail.contains("no other cluster"),
            "{}",
            i.status_detail
        );
    }
}
