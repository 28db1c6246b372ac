//! The cluster-side instance state machine: a pure function of (instance, event, now). Timeouts
//! are events too ([`Event::Tick`]), so tests drive the clock instead of sleeping. It never
//! touches the store, the broker or the scheduler: it says what should happen ([`Action`]) and the
//! caller does it.
//!
//! Lifecycle (spec orchestrators.md §5.4/§5.5, with a timeout on every transitional state):
//! `CLUSTER_SCHEDULED`/`REQUESTED` → (placed) `NODE_SCHEDULED` → (worker says CREATED) `CREATED`
//! → (listed in `jobs/resources`) `RUNNING`. `FAILED`, `DEAD` and the negative scheduling
//! statuses are retried after a backoff (same instance number, any worker, the failed one last);
//! `COMPLETED` and `UNDEPLOYED` are final.

use serde::{Deserialize, Serialize};
use worker::protocol::Status;

/// Every duration of the machine, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// A worker silent (no `information`) this long has its instances FAILED (upstream: 30 s).
    pub node_silence_ms: u64,
    /// A RUNNING instance missing from its worker's `jobs/resources` this long is FAILED.
    pub resources_ms: u64,
    /// NODE_SCHEDULED without any word from the worker (image pulls can be slow).
    pub deploy_ms: u64,
    /// CREATED without a first `jobs/resources` listing.
    pub created_ms: u64,
    /// REQUESTED / CLUSTER_SCHEDULED not resolved by the scheduler: schedule again.
    pub schedule_ms: u64,
    /// First retry delay after a failure; doubles per consecutive failure up to `retry_max_ms`,
    /// so a broken image does not hammer the workers (upstream retries every 15 s forever).
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// RUNNING this long ends a streak of failures (the backoff starts over). Reaching RUNNING
    /// alone does not: a container that crashes a second after it starts is listed as running
    /// in between, and resetting there restarted it every few seconds forever.
    pub stable_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            node_silence_ms: 30_000,
            resources_ms: 30_000,
            deploy_ms: 180_000,
            created_ms: 60_000,
            schedule_ms: 5_000,
            retry_base_ms: 2_000,
            retry_max_ms: 60_000,
            stable_ms: 300_000,
        }
    }
}

/// One instance as the cluster tracks it; persisted as is (key `<job_id>/<n>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub job_id: String,
    pub instance_number: u64,
    pub status: Status,
    #[serde(default)]
    pub status_detail: String,
    #[serde(default)]
    pub worker_id: Option<String>,
    #[serde(default)]
    pub host_ip: String,
    #[serde(default)]
    pub host_port: String,
    #[serde(default)]
    pub publicip: String,
    /// Unix ms when `status` was entered.
    pub since_ms: u64,
    /// Unix ms of the last `jobs/resources` listing by its worker.
    #[serde(default)]
    pub last_report_ms: u64,
    /// Consecutive failed attempts, for the retry backoff; reset once RUNNING for
    /// `Timeouts::stable_ms`.
    #[serde(default)]
    pub attempts: u32,
    /// Resources reserved on `worker_id` while placed.
    #[serde(default)]
    pub vcpus: f64,
    #[serde(default)]
    pub memory: u64,
    #[serde(default)]
    pub cpu_percent: String,
    #[serde(default)]
    pub memory_percent: String,
    #[serde(default)]
    pub disk: String,
    #[serde(default)]
    pub logs: String,
    /// Worker the last attempt failed on, avoided by the next placement.
    #[serde(default)]
    pub failed_on: Option<String>,
}

impl Instance {
    pub fn new(job_id: &str, n: u64, vcpus: f64, memory: u64, now: u64) -> Instance {
        Instance {
            job_id: job_id.into(),
            instance_number: n,
            status: Status::ClusterScheduled,
            status_detail: "Waiting for scheduling decision".into(),
            worker_id: None,
            host_ip: String::new(),
            host_port: String::new(),
            publicip: String::new(),
            since_ms: now,
            last_report_ms: 0,
            attempts: 0,
            vcpus,
            memory,
            cpu_percent: String::new(),
            memory_percent: String::new(),
            disk: String::new(),
            logs: String::new(),
            failed_on: None,
        }
    }

    pub fn key(&self) -> String {
        instance_key(&self.job_id, self.instance_number)
    }

    /// Whether the instance holds resources on `worker_id` (for the scheduler's accounting).
    pub fn holds_resources(&self) -> bool {
        self.worker_id.is_some()
            && matches!(
                self.status,
                Status::NodeScheduled | Status::Creating | Status::Created | Status::Running
            )
    }

    /// The retry delay after `attempts` consecutive failures.
    pub fn retry_delay(&self, t: &Timeouts) -> u64 {
        let shift = self.attempts.saturating_sub(1).min(16);
        t.retry_base_ms
            .saturating_mul(1 << shift)
            .min(t.retry_max_ms)
    }
}

pub fn instance_key(job_id: &str, n: u64) -> String {
    format!("{job_id}/{n}")
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    /// The scheduler chose a worker.
    Placed {
        worker_id: &'a str,
        host_ip: &'a str,
        host_port: &'a str,
    },
    /// The scheduler found nothing (a negative status and why).
    Unplaceable { status: Status, detail: &'a str },
    /// `nodes/<id>/job` from the instance's own worker.
    WorkerStatus {
        status: Status,
        detail: &'a str,
        publicip: &'a str,
    },
    /// Listed in `jobs/resources` by its own worker.
    Listed,
    /// Time passes; `worker_last_seen` is the unix ms of its worker's last `information`
    /// (`None` when it has no worker or the worker is unknown).
    Tick { worker_last_seen: Option<u64> },
}

/// What the caller must do after a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run the scheduler for this instance now.
    Schedule,
    /// Tell this worker to stop its copy (`control/delete`): it failed there, or was moved away.
    StopOn(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub next: Instance,
    pub actions: Vec<Action>,
    /// The status or detail changed: persist and tell the root.
    pub changed: bool,
}

fn enter(inst: &Instance, status: Status, detail: String, now: u64) -> Instance {
    let mut n = inst.clone();
    n.status = status;
    n.status_detail = detail;
    n.since_ms = now;
    n
}

/// Marks an instance FAILED on its worker and remembers where, so the retry avoids it.
fn fail(inst: &Instance, detail: String, now: u64) -> (Instance, Vec<Action>) {
    let mut n = enter(inst, Status::Failed, detail, now);
    n.attempts = n.attempts.saturating_add(1);
    n.failed_on = inst.worker_id.clone();
    let actions = inst.worker_id.iter().cloned().map(Action::StopOn).collect();
    n.worker_id = None;
    (n, actions)
}

/// The transition function.
pub fn step(inst: &Instance, ev: &Event, now: u64, t: &Timeouts) -> Outcome {
    use Status::*;
    let unchanged = || Outcome {
        next: inst.clone(),
        actions: Vec::new(),
        changed: false,
    };
    let changed = |next: Instance, actions: Vec<Action>| Outcome {
        next,
        actions,
        changed: true,
    };
    let age = now.saturating_sub(inst.since_ms);
    match (inst.status, ev) {
        // Final states stay final.
        (Completed | Undeployed, _) => unchanged(),

        (
            ClusterScheduled
            | Requested
            | Failed
            | Dead
            | NoWorkerCapacity
            | NoQualifiedWorkerFound
            | NoNodeFound
            | TargetClusterNotActive
            | NoActiveClusterWithCapacity
            | TargetClusterNotFound
            | TargetClusterNoCapacity,
            Event::Placed {
                worker_id,
                host_ip,
                host_port,
            },
        ) => {
            let mut n = enter(inst, NodeScheduled, String::new(), now);
            n.worker_id = Some(worker_id.to_string());
            n.host_ip = host_ip.to_string();
            n.host_port = host_port.to_string();
            n.last_report_ms = 0;
            changed(n, Vec::new())
        }
        (ClusterScheduled | Requested, Event::Unplaceable { status, detail }) => {
            let mut n = enter(inst, *status, detail.to_string(), now);
            n.attempts = n.attempts.saturating_add(1);
            changed(n, Vec::new())
        }
        (_, Event::Placed { .. } | Event::Unplaceable { .. }) => unchanged(),

        (
            NodeScheduled | Creating | Created | Running,
            Event::WorkerStatus {
                status,
                detail,
                publicip,
            },
        ) => {
            let mut base = inst.clone();
            if !publicip.is_empty() {
                base.publicip = publicip.to_string();
            }
            match status {
                // Upstream ignores CREATED; we keep it as progress so the deploy timeout stops
                // and the "waiting for the first report" one starts.
                Created | Creating if matches!(inst.status, NodeScheduled | Creating) => {
                    changed(enter(&base, Created, detail.to_string(), now), Vec::new())
                }
                Failed | Dead => {
                    let detail = if detail.is_empty() {
                        format!("worker reported {status}")
                    } else {
                        detail.to_string()
                    };
                    let (mut n, actions) = fail(&base, detail, now);
                    n.status = *status;
                    changed(n, actions)
                }
                Completed => {
                    let mut n = enter(&base, Completed, detail.to_string(), now);
                    n.worker_id = inst.worker_id.clone();
                    changed(n, Vec::new())
                }
                Undeployed => changed(
                    enter(&base, Undeployed, "removed by the worker".into(), now),
                    Vec::new(),
                ),
                _ => Outcome {
                    changed: base != *inst,
                    next: base,
                    actions: Vec::new(),
                },
            }
        }
        (_, Event::WorkerStatus { .. }) => unchanged(),

        (NodeScheduled | Creating | Created | Running, Event::Listed) => {
            let mut n = inst.clone();
            n.last_report_ms = now;
            if inst.status == Running {
                // Stable long enough: the failures before were an episode, not a crash loop.
                let stable = n.attempts > 0 && age >= t.stable_ms;
                if stable {
                    n.attempts = 0;
                }
                Outcome {
                    next: n,
                    actions: Vec::new(),
                    changed: stable,
                }
            } else {
                let mut n = enter(&n, Running, String::new(), now);
                n.failed_on = None;
                changed(n, Vec::new())
            }
        }
        (_, Event::Listed) => unchanged(),

        (NodeScheduled | Creating | Created | Running, Event::Tick { worker_last_seen }) => {
            let worker = inst.worker_id.clone().unwrap_or_default();
            let silent_for = worker_last_seen.map(|s| now.saturating_sub(s));
            if silent_for.map_or(true, |s| s >= t.node_silence_ms) {
                let (n, a) = fail(
                    inst,
                    format!(
                        "worker {worker} silent for {} s",
                        silent_for.unwrap_or(t.node_silence_ms) / 1000
                    ),
                    now,
                );
                return changed(n, a);
            }
            let (limit, what) = match inst.status {
                NodeScheduled => (t.deploy_ms, "did not confirm the deployment"),
                Creating | Created => (t.created_ms, "did not report the instance as running"),
                _ => (
                    t.resources_ms,
                    "stopped listing the instance in jobs/resources",
                ),
            };
            let quiet = if inst.status == Running {
                now.saturating_sub(inst.last_report_ms.max(inst.since_ms))
            } else {
                age
            };
            if quiet >= limit {
                let (n, a) = fail(
                    inst,
                    format!("worker {worker} {what} within {} s", limit / 1000),
                    now,
                );
                changed(n, a)
            } else {
                unchanged()
            }
        }
        (ClusterScheduled | Requested, Event::Tick { .. }) => {
            if age >= t.schedule_ms {
                Outcome {
                    next: inst.clone(),
                    actions: vec![Action::Schedule],
                    changed: false,
                }
            } else {
                unchanged()
            }
        }
        // Failed, dead, or nothing fitted: retry after the backoff.
        (_, Event::Tick { .. }) => {
            if age >= inst.retry_delay(t) {
                let n = enter(
                    inst,
                    Requested,
                    format!(
                        "rescheduling after {} ({})",
                        inst.status, inst.status_detail
                    ),
                    now,
                );
                changed(n, vec![Action::Schedule])
            } else {
                unchanged()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Timeouts {
        Timeouts::default()
    }
    fn placed(now: u64) -> Instance {
        let i = Instance::new("j", 0, 1.0, 100, 0);
        let o = step(
            &i,
            &Event::Placed {
                worker_id: "w1",
                host_ip: "10.0.0.1",
                host_port: "3000",
            },
            now,
            &t(),
        );
        assert!(o.changed);
        assert_eq!(o.next.status, Status::NodeScheduled);
        assert!(o.next.holds_resources());
        o.next
    }
    fn tick(i: &Instance, now: u64, seen: Option<u64>) -> Outcome {
        step(
            i,
            &Event::Tick {
                worker_last_seen: seen,
            },
            now,
            &t(),
        )
    }

    #[test]
    fn happy_path_to_running() {
        let i = placed(1000);
        let o = step(
            &i,
            &Event::WorkerStatus {
                status: Status::Created,
                detail: "",
                publicip: "1.2.3.4",
            },
            2000,
            &t(),
        );
        assert_eq!(
            (o.next.status, o.next.publicip.as_str()),
            (Status::Created, "1.2.3.4")
        );
        let o = step(&o.next, &Event::Listed, 3000, &t());
        assert!(o.changed);
        assert_eq!(o.next.status, Status::Running);
        // Further listings only refresh the heartbeat.
        let o2 = step(&o.next, &Event::Listed, 5000, &t());
        assert!(!o2.changed);
        assert_eq!(o2.next.last_report_ms, 5000);
        // Listed straight from NODE_SCHEDULED (a stock worker whose CREATED we missed).
        assert_eq!(
            step(&placed(0), &Event::Listed, 10, &t()).next.status,
            Status::Running
        );
    }

    #[test]
    fn every_transitional_state_times_out() {
        let t = t();
        // REQUESTED / CLUSTER_SCHEDULED: scheduled again.
        let i = Instance::new("j", 0, 1.0, 1, 0);
        assert!(tick(&i, t.schedule_ms - 1, None).actions.is_empty());
        assert_eq!(
            tick(&i, t.schedule_ms, None).actions,
            vec![Action::Schedule]
        );
        // NODE_SCHEDULED: no word from the worker.
        let i = placed(0);
        assert!(!tick(&i, t.deploy_ms - 1, Some(t.deploy_ms - 1)).changed);
        let o = tick(&i, t.deploy_ms, Some(t.deploy_ms));
        assert_eq!(o.next.status, Status::Failed);
        assert!(
            o.next.status_detail.contains("did not confirm"),
            "{}",
            o.next.status_detail
        );
        assert_eq!(o.actions, vec![Action::StopOn("w1".into())]);
        assert!(!o.next.holds_resources(), "resources released");
        // CREATED: no first listing.
        let mut c = placed(0);
        c.status = Status::Created;
        let o = tick(&c, t.created_ms, Some(t.created_ms));
        assert_eq!(o.next.status, Status::Failed);
        // RUNNING: missing from jobs/resources while the worker itself keeps reporting.
        let r = step(&placed(0), &Event::Listed, 1000, &t).next;
        assert!(
            !tick(
                &r,
                1000 + t.resources_ms - 1,
                Some(1000 + t.resources_ms - 1)
            )
            .changed
        );
        let o = tick(&r, 1000 + t.resources_ms, Some(1000 + t.resources_ms));
        assert_eq!(o.next.status, Status::Failed);
        assert!(o.next.status_detail.contains("jobs/resources"));
        // Negative scheduling statuses and FAILED: retried after the backoff.
        let neg = step(
            &Instance::new("j", 0, 1.0, 1, 0),
            &Event::Unplaceable {
                status: Status::NoWorkerCapacity,
                detail: "full",
            },
            0,
            &t,
        )
        .next;
        assert_eq!(neg.status, Status::NoWorkerCapacity);
        assert!(!tick(&neg, t.retry_base_ms - 1, None).changed);
        let o = tick(&neg, t.retry_base_ms, None);
        assert_eq!(
            (o.next.status, o.actions.clone()),
            (Status::Requested, vec![Action::Schedule])
        );
    }

    #[test]
    fn silent_worker_fails_instances_then_they_are_rescheduled_elsewhere() {
        let t = t();
        let r = step(&placed(0), &Event::Listed, 1000, &t).next;
        // Worker last seen at 1000; 30 s later its instance is FAILED.
        assert!(!tick(&r, 1000 + t.node_silence_ms - 1, Some(1000)).changed);
        let o = tick(&r, 1000 + t.node_silence_ms, Some(1000));
        assert_eq!(o.next.status, Status::Failed);
        assert!(
            o.next.status_detail.contains("silent for 30 s"),
            "{}",
            o.next.status_detail
        );
        assert_eq!(o.next.failed_on.as_deref(), Some("w1"));
        // Retry: REQUESTED + Schedule, then placed on w2.
        let f = o.next;
        let o = tick(&f, f.since_ms + f.retry_delay(&t), None);
        assert_eq!(o.next.status, Status::Requested);
        assert_eq!(o.actions, vec![Action::Schedule]);
        let o = step(
            &o.next,
            &Event::Placed {
                worker_id: "w2",
                host_ip: "10.0.0.2",
                host_port: "3000",
            },
            f.since_ms + 5000,
            &t,
        );
        assert_eq!(
            (o.next.status, o.next.worker_id.as_deref()),
            (Status::NodeScheduled, Some("w2"))
        );
        // An unknown worker counts as silent.
        assert_eq!(tick(&r, 2000, None).next.status, Status::Failed);
    }

    /// A container that exits a second after it starts is listed as RUNNING in between: each
    /// crash must still lengthen the wait (2 s, 4 s, 8 s ...), and only a run of `stable_ms`
    /// starts the backoff over.
    #[test]
    fn crash_loop_backs_off_until_a_stable_run() {
        let t = t();
        let dead = Event::WorkerStatus {
            status: Status::Dead,
            detail: "exited with code 3",
            publicip: "",
        };
        let mut i = Instance::new("j", 0, 1.0, 100, 0);
        let mut now = 0;
        let mut waits = Vec::new();
        for round in 0..5 {
            let w = if round % 2 == 0 { "w1" } else { "w2" };
            let placed = Event::Placed {
                worker_id: w,
                host_ip: "",
                host_port: "",
            };
            i = step(&i, &placed, now, &t).next;
            now += 500;
            i = step(&i, &Event::Listed, now, &t).next;
            assert_eq!(i.status, Status::Running);
            now += 1000;
            let o = step(&i, &dead, now, &t);
            assert_eq!(o.actions, vec![Action::StopOn(w.into())]);
            i = o.next;
            assert_eq!((i.status, i.attempts), (Status::Dead, round + 1));
            // Tick until the retry comes.
            let failed_at = now;
            loop {
                now += 100;
                let o = tick(&i, now, None);
                if o.actions == vec![Action::Schedule] {
                    i = o.next;
                    break;
                }
            }
            waits.push(now - failed_at);
        }
        assert_eq!(waits, [2_000, 4_000, 8_000, 16_000, 32_000]);
        // A stable run ends the streak: the next crash waits the base delay again.
        i = step(
            &i,
            &Event::Placed {
                worker_id: "w1",
                host_ip: "",
                host_port: "",
            },
            now,
            &t,
        )
        .next;
        i = step(&i, &Event::Listed, now + 10, &t).next;
        let started = i.since_ms;
        let o = step(&i, &Event::Listed, started + t.stable_ms - 1, &t);
        assert!(!o.changed);
        assert_eq!(o.next.attempts, 5);
        let o = step(&o.next, &Event::Listed, started + t.stable_ms, &t);
        assert!(o.changed, "the reset is persisted");
        assert_eq!(o.next.attempts, 0);
        let o = step(&o.next, &dead, started + t.stable_ms + 1, &t);
        assert_eq!(o.next.attempts, 1);
        assert_eq!(o.next.retry_delay(&t), t.retry_base_ms);
    }

    #[test]
    fn worker_reports_and_backoff() {
        let t = t();
        let i = placed(0);
        let o = step(
            &i,
            &Event::WorkerStatus {
                status: Status::Failed,
                detail: "pull failed",
                publicip: "",
            },
            10,
            &t,
        );
        assert_eq!((o.next.status, o.next.attempts), (Status::Failed, 1));
        assert_eq!(o.next.status_detail, "pull failed");
        let dead = step(
            &i,
            &Event::WorkerStatus {
                status: Status::Dead,
                detail: "",
                publicip: "",
            },
            10,
            &t,
        );
        assert_eq!(dead.next.status, Status::Dead);
        assert_eq!(dead.actions, vec![Action::StopOn("w1".into())]);
        let mut f = o.next.clone();
        f.attempts = 3;
        assert_eq!(f.retry_delay(&t), 4 * t.retry_base_ms);
        f.attempts = 40;
        assert_eq!(f.retry_delay(&t), t.retry_max_ms);
        let done = step(
            &i,
            &Event::WorkerStatus {
                status: Status::Completed,
                detail: "",
                publicip: "",
            },
            10,
            &t,
        )
        .next;
        assert_eq!(done.status, Status::Completed);
        assert!(!tick(&done, 10_000_000, None).changed, "COMPLETED is final");
        // A stale placement result for a running instance changes nothing.
        let r = step(&i, &Event::Listed, 5, &t).next;
        assert!(
            !step(
                &r,
                &Event::Placed {
                    worker_id: "w9",
                    host_ip: "",
                    host_port: ""
                },
                6,
                &t
            )
            .changed
        );
    }
}
