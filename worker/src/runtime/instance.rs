//! One instance's lifecycle as a pure state machine: `(phase, input, now) → (phase, actions)`.
//! Every transitional phase has a deadline ([`Instance::deadline`]); the shell feeds
//! [`Input::Tick`] when it passes, so tests drive time instead of sleeping. No I/O here.

use crate::protocol::{DeployCommand, Status};
use std::time::{Duration, Instant};

pub const SIGTERM: u32 = 15;
pub const SIGKILL: u32 = 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Image pull, container and task creation and start, together.
    pub deploy: Duration,
    /// SIGTERM → SIGKILL (upstream's shutdown waits 5 s too, worker-protocol §5.2).
    pub stop_grace: Duration,
    /// SIGKILL → giving up waiting for the exit and tearing down anyway.
    pub kill_wait: Duration,
    /// The teardown steps together (each is bounded on its own as well).
    pub cleanup: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            deploy: Duration::from_secs(600),
            stop_grace: Duration::from_secs(5),
            kill_wait: Duration::from_secs(10),
            // Above the sum of the teardown's bounded steps (5 × 30 s + the kill wait).
            cleanup: Duration::from_secs(180),
        }
    }
}

/// A terminal report, sent once the teardown is over so the container id is free again when
/// the cluster hears of it (a redeploy to this node then cannot collide).
pub type Report = (Status, String);

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// The deploy sequence runs (pull, create, start). `exit`: the task exited before the
    /// start call returned (its event can overtake the reply).
    Deploying {
        since: Instant,
        exit: Option<u32>,
    },
    Running,
    /// Undeploy: SIGTERM sent at `since`; SIGKILL once `sigkilled`.
    Stopping {
        since: Instant,
        sigkilled: bool,
    },
    /// Teardown (task delete, container delete, snapshot remove) runs; `report` follows it.
    Cleaning {
        since: Instant,
        report: Option<Report>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A deploy for this (already present) instance id.
    Deploy(Box<DeployCommand>),
    /// The task started; `detail` is the CREATED report's status_detail.
    Started {
        detail: String,
    },
    DeployFailed(String),
    Exited {
        code: u32,
    },
    /// The task is gone from containerd without an exit we saw (found when reconciling
    /// after the event stream was lost).
    Vanished,
    Oom,
    Undeploy,
    CleanedUp,
    Tick,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Report(Status, String),
    StartDeploy(Box<DeployCommand>),
    /// Drop the running deploy sequence (the teardown that follows removes what it made).
    CancelDeploy,
    Kill(u32),
    /// Tear down: kill if still alive, task delete, network detach, container delete,
    /// snapshot remove; answered by [`Input::CleanedUp`].
    Cleanup,
    /// Remove the instance from the table.
    Forget,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub job_name: String,
    pub number: u64,
    pub one_shot: bool,
    /// What a CREATED (re-)report says.
    pub detail: String,
    pub phase: Phase,
    oom: bool,
    /// A deploy that arrived during teardown: started once the teardown is over.
    pending: Option<Box<DeployCommand>>,
}

/// Why a task ended, as the DEAD/COMPLETED report says it.
pub fn exit_report(one_shot: bool, code: u32, oom: bool) -> Report {
    if oom {
        return (Status::Dead, format!("OOM killed (exit code {code})"));
    }
    if code == 0 && one_shot {
        return (Status::Completed, "exited with code 0".into());
    }
    // The shim reports a signal death as 128 + signal.
    if (129..=128 + 64).contains(&code) {
        return (Status::Dead, format!("killed by signal {}", code - 128));
    }
    (Status::Dead, format!("exited with code {code}"))
}

impl Instance {
    /// A new instance for `job`; the caller runs the returned actions.
    pub fn deploy(job: Box<DeployCommand>, now: Instant) -> (Instance, Vec<Action>) {
        let inst = Instance {
            job_name: job.job_name.clone(),
            number: job.instance_number,
            one_shot: job.one_shot,
            detail: job.status_detail.clone(),
            phase: Phase::Deploying {
                since: now,
                exit: None,
            },
            oom: false,
            pending: None,
        };
        (inst, vec![Action::StartDeploy(job)])
    }

    /// An instance found running in containerd after a restart.
    pub fn adopted(job_name: &str, number: u64, one_shot: bool) -> Instance {
        Instance {
            job_name: job_name.into(),
            number,
            one_shot,
            detail: String::new(),
            phase: Phase::Running,
            oom: false,
            pending: None,
        }
    }

    /// An instance found dead (or half made) after a restart: torn down, then `report`.
    pub fn found_dead(job_name: &str, number: u64, report: Report, now: Instant) -> Instance {
        Instance {
            phase: Phase::Cleaning {
                since: now,
                report: Some(report),
            },
            ..Instance::adopted(job_name, number, false)
        }
    }

    /// When the shell must send [`Input::Tick`] at the latest; None while running.
    pub fn deadline(&self, t: &Timeouts) -> Option<Instant> {
        match &self.phase {
            Phase::Deploying { since, .. } => Some(*since + t.deploy),
            Phase::Running => None,
            Phase::Stopping { since, sigkilled } => Some(if *sigkilled {
                *since + t.stop_grace + t.kill_wait
            } else {
                *since + t.stop_grace
            }),
            Phase::Cleaning { since, .. } => Some(*since + t.cleanup),
        }
    }

    fn clean(&mut self, now: Instant, report: Option<Report>, out: &mut Vec<Action>) {
        self.phase = Phase::Cleaning { since: now, report };
        out.push(Action::Cleanup);
    }

    pub fn on(&mut self, input: Input, now: Instant, t: &Timeouts) -> Vec<Action> {
        let mut out = Vec::new();
        match (&mut self.phase, input) {
            (_, Input::Oom) => self.oom = true,

            (Phase::Deploying { exit, .. }, Input::Started { detail }) => {
                self.detail = detail;
                match exit.take() {
                    Some(code) => {
                        let r = exit_report(self.one_shot, code, self.oom);
                        self.clean(now, Some(r), &mut out);
                    }
                    None => {
                        self.phase = Phase::Running;
                        out.push(Action::Report(Status::Created, self.detail.clone()));
                    }
                }
            }
            (Phase::Deploying { .. }, Input::DeployFailed(reason)) => {
                self.clean(now, Some((Status::Failed, reason)), &mut out);
            }
            (Phase::Deploying { exit, .. }, Input::Exited { code }) => *exit = Some(code),
            (Phase::Deploying { .. }, Input::Undeploy) => {
                out.push(Action::Report(Status::Undeployed, String::new()));
                out.push(Action::CancelDeploy);
                let r = (Status::Dead, "undeployed before it started".to_owned());
                self.clean(now, Some(r), &mut out);
            }
            (Phase::Deploying { since, .. }, Input::Tick) if now >= *since + t.deploy => {
                let secs = t.deploy.as_secs();
                out.push(Action::CancelDeploy);
                let r = (
                    Status::Failed,
                    format!("deploy did not finish within {secs} s (image pull or containerd too slow); it was cancelled and cleaned up"),
                );
                self.clean(now, Some(r), &mut out);
            }
            // A duplicate while deploying: the deploy under way answers for both.
            (Phase::Deploying { .. }, Input::Deploy(_)) => {}

            (Phase::Running, Input::Exited { code }) => {
                let r = exit_report(self.one_shot, code, self.oom);
                self.clean(now, Some(r), &mut out);
            }
            (Phase::Running, Input::Undeploy) => {
                // UNDEPLOYED at once, DEAD after the teardown, as upstream (§5.2).
                out.push(Action::Report(Status::Undeployed, String::new()));
                out.push(Action::Kill(SIGTERM));
                self.phase = Phase::Stopping {
                    since: now,
                    sigkilled: false,
                };
            }
            // Upstream fails a duplicate and the cluster then kills a healthy instance
            // (§12.2); we answer with the current status instead.
            (Phase::Running, Input::Deploy(_)) => {
                out.push(Action::Report(Status::Created, self.detail.clone()));
            }

            (Phase::Stopping { since, sigkilled }, Input::Tick) => {
                if !*sigkilled && now >= *since + t.stop_grace {
                    *sigkilled = true;
                    out.push(Action::Kill(SIGKILL));
                } else if *sigkilled && now >= *since + t.stop_grace + t.kill_wait {
                    let r = (
                        Status::Dead,
                        "undeployed; the task did not exit after SIGKILL, torn down anyway".into(),
                    );
                    self.clean(now, Some(r), &mut out);
                }
            }
            (Phase::Stopping { .. }, Input::Exited { code }) => {
                let (_, why) = exit_report(false, code, self.oom);
                self.clean(
                    now,
                    Some((Status::Dead, format!("undeployed ({why})"))),
                    &mut out,
                );
            }
            (Phase::Running | Phase::Stopping { .. }, Input::Vanished) => {
                let r = (
                    Status::Dead,
                    "the task disappeared from containerd (containerd restarted?)".to_owned(),
                );
                self.clean(now, Some(r), &mut out);
            }
            (Phase::Stopping { .. } | Phase::Cleaning { .. }, Input::Deploy(job)) => {
                self.pending = Some(job);
            }
            // An undeploy cancels a redeploy queued behind the teardown.
            (Phase::Cleaning { .. }, Input::Undeploy) if self.pending.is_some() => {
                self.pending = None;
                out.push(Action::Report(Status::Undeployed, String::new()));
            }
            (Phase::Cleaning { since, report }, input @ (Input::CleanedUp | Input::Tick)) => {
                if matches!(input, Input::Tick) && now < *since + t.cleanup {
                    return out;
                }
                if let Some((s, d)) = report.take() {
                    out.push(Action::Report(s, d));
                }
                match self.pending.take() {
                    Some(job) => {
                        let (next, actions) = Instance::deploy(job, now);
                        *self = next;
                        out.extend(actions);
                    }
                    None => out.push(Action::Forget),
                }
            }
            // Everything else is stale (a late event for a phase already left): ignore.
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u64, one_shot: bool) -> Box<DeployCommand> {
        Box::new(DeployCommand {
            job_name: "app.ns.svc.ns".into(),
            instance_number: n,
            image: "img".into(),
            status_detail: "Waiting".into(),
            one_shot,
            ..DeployCommand::default()
        })
    }

    const T: Timeouts = Timeouts {
        deploy: Duration::from_secs(60),
        stop_grace: Duration::from_secs(5),
        kill_wait: Duration::from_secs(10),
        cleanup: Duration::from_secs(30),
    };

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn running(now: Instant) -> Instance {
        let (mut i, _) = Instance::deploy(job(0, false), now);
        i.on(
            Input::Started {
                detail: "Waiting".into(),
            },
            now,
            &T,
        );
        i
    }

    fn report(a: &[Action]) -> Vec<(Status, &str)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Report(s, d) => Some((*s, d.as_str())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn deploy_start_exit_cleanup() {
        let t0 = Instant::now();
        let (mut i, a) = Instance::deploy(job(0, false), t0);
        assert!(matches!(a[..], [Action::StartDeploy(_)]));
        let a = i.on(
            Input::Started {
                detail: "Waiting".into(),
            },
            t0,
            &T,
        );
        assert_eq!(a, [Action::Report(Status::Created, "Waiting".into())]);
        assert_eq!(i.deadline(&T), None, "running has no deadline");
        let a = i.on(Input::Exited { code: 3 }, t0 + s(1), &T);
        assert_eq!(a, [Action::Cleanup], "report only after the teardown");
        let a = i.on(Input::CleanedUp, t0 + s(2), &T);
        assert_eq!(
            a,
            [
                Action::Report(Status::Dead, "exited with code 3".into()),
                Action::Forget
            ]
        );
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_report(true, 0, false).0, Status::Completed);
        assert_eq!(
            exit_report(false, 0, false),
            (Status::Dead, "exited with code 0".into())
        );
        assert_eq!(
            exit_report(true, 3, false),
            (Status::Dead, "exited with code 3".into())
        );
        assert_eq!(
            exit_report(false, 137, false),
            (Status::Dead, "killed by signal 9".into())
        );
        assert_eq!(exit_report(true, 137, true).1, "OOM killed (exit code 137)");
        let t0 = Instant::now();
        let (mut i, _) = Instance::deploy(job(0, true), t0);
        i.on(
            Input::Started {
                detail: String::new(),
            },
            t0,
            &T,
        );
        i.on(Input::Oom, t0, &T);
        i.on(Input::Exited { code: 137 }, t0, &T);
        let a = i.on(Input::CleanedUp, t0, &T);
        assert_eq!(report(&a), [(Status::Dead, "OOM killed (exit code 137)")]);
    }

    #[test]
    fn deploy_failure_is_cleaned_then_reported() {
        let t0 = Instant::now();
        let (mut i, _) = Instance::deploy(job(0, false), t0);
        let a = i.on(Input::DeployFailed("pull failed: 404".into()), t0, &T);
        assert_eq!(a, [Action::Cleanup]);
        let a = i.on(Input::CleanedUp, t0, &T);
        assert_eq!(report(&a), [(Status::Failed, "pull failed: 404")]);
        assert_eq!(a.last(), Some(&Action::Forget));
    }

    #[test]
    fn every_transitional_phase_times_out() {
        let t0 = Instant::now();
        // Deploying.
        let (mut i, _) = Instance::deploy(job(0, false), t0);
        assert_eq!(i.deadline(&T), Some(t0 + T.deploy));
        assert!(i.on(Input::Tick, t0 + s(59), &T).is_empty());
        let a = i.on(Input::Tick, t0 + s(60), &T);
        assert_eq!(a, [Action::CancelDeploy, Action::Cleanup]);
        // Cleaning (the teardown hung): report anyway and forget.
        assert_eq!(i.deadline(&T), Some(t0 + s(60) + T.cleanup));
        assert!(i.on(Input::Tick, t0 + s(61), &T).is_empty());
        let a = i.on(Input::Tick, t0 + s(90), &T);
        assert_eq!(report(&a).len(), 1);
        assert_eq!(report(&a)[0].0, Status::Failed);
        assert!(report(&a)[0].1.contains("within 60 s"));
        assert_eq!(a.last(), Some(&Action::Forget));
        // Stopping: SIGTERM, SIGKILL after the grace, teardown after the kill wait.
        let mut i = running(t0);
        let a = i.on(Input::Undeploy, t0, &T);
        assert_eq!(
            a,
            [
                Action::Report(Status::Undeployed, String::new()),
                Action::Kill(SIGTERM)
            ]
        );
        assert_eq!(i.deadline(&T), Some(t0 + s(5)));
        assert!(i.on(Input::Tick, t0 + s(4), &T).is_empty());
        assert_eq!(i.on(Input::Tick, t0 + s(5), &T), [Action::Kill(SIGKILL)]);
        assert_eq!(i.deadline(&T), Some(t0 + s(15)));
        assert!(i.on(Input::Tick, t0 + s(14), &T).is_empty());
        assert_eq!(i.on(Input::Tick, t0 + s(15), &T), [Action::Cleanup]);
        let a = i.on(Input::CleanedUp, t0 + s(16), &T);
        assert_eq!(report(&a)[0].0, Status::Dead);
    }

    #[test]
    fn undeploy_reports_undeployed_then_dead() {
        let t0 = Instant::now();
        let mut i = running(t0);
        i.on(Input::Undeploy, t0, &T);
        // A second delete while stopping says nothing more.
        assert!(i.on(Input::Undeploy, t0, &T).is_empty());
        let a = i.on(Input::Exited { code: 143 }, t0 + s(1), &T);
        assert_eq!(a, [Action::Cleanup]);
        let a = i.on(Input::CleanedUp, t0 + s(1), &T);
        assert_eq!(
            a,
            [
                Action::Report(Status::Dead, "undeployed (killed by signal 15)".into()),
                Action::Forget
            ]
        );
    }

    #[test]
    fn duplicate_deploy_of_running_instance_is_answered_not_killed() {
        let t0 = Instant::now();
        let mut i = running(t0);
        let a = i.on(Input::Deploy(job(0, false)), t0, &T);
        assert_eq!(a, [Action::Report(Status::Created, "Waiting".into())]);
        assert_eq!(i.phase, Phase::Running);
        // While deploying: nothing (the deploy under way reports).
        let (mut d, _) = Instance::deploy(job(1, false), t0);
        assert!(d.on(Input::Deploy(job(1, false)), t0, &T).is_empty());
    }

    #[test]
    fn undeploy_while_creating() {
        let t0 = Instant::now();
        let (mut i, _) = Instance::deploy(job(0, false), t0);
        let a = i.on(Input::Undeploy, t0, &T);
        assert_eq!(
            a,
            [
                Action::Report(Status::Undeployed, String::new()),
                Action::CancelDeploy,
                Action::Cleanup
            ]
        );
        // The cancelled deploy's late answer changes nothing.
        assert!(i
            .on(
                Input::Started {
                    detail: String::new()
                },
                t0,
                &T
            )
            .is_empty());
        let a = i.on(Input::CleanedUp, t0, &T);
        assert_eq!(report(&a), [(Status::Dead, "undeployed before it started")]);
    }

    #[test]
    fn exit_during_start() {
        let t0 = Instant::now();
        let (mut i, _) = Instance::deploy(job(0, true), t0);
        // The exit event overtakes the Tasks/Start reply.
        assert!(i.on(Input::Exited { code: 0 }, t0, &T).is_empty());
        let a = i.on(
            Input::Started {
                detail: String::new(),
            },
            t0,
            &T,
        );
        assert_eq!(a, [Action::Cleanup], "no CREATED for a task already gone");
        let a = i.on(Input::CleanedUp, t0, &T);
        assert_eq!(report(&a), [(Status::Completed, "exited with code 0")]);
    }

    #[test]
    fn redeploy_during_teardown_runs_after_it() {
        let t0 = Instant::now();
        let mut i = running(t0);
        i.on(Input::Undeploy, t0, &T);
        assert!(i.on(Input::Deploy(job(0, false)), t0, &T).is_empty());
        i.on(Input::Exited { code: 143 }, t0, &T);
        let a = i.on(Input::CleanedUp, t0 + s(1), &T);
        assert_eq!(report(&a)[0].0, Status::Dead);
        assert!(matches!(a.last(), Some(Action::StartDeploy(_))));
        assert!(matches!(i.phase, Phase::Deploying { .. }));
        // And an undeploy cancels a queued redeploy.
        let mut i = running(t0);
        i.on(Input::Exited { code: 1 }, t0, &T);
        i.on(Input::Deploy(job(0, false)), t0, &T);
        assert_eq!(
            report(&i.on(Input::Undeploy, t0, &T)),
            [(Status::Undeployed, "")]
        );
        assert_eq!(i.on(Input::CleanedUp, t0, &T).last(), Some(&Action::Forget));
    }

    #[test]
    fn vanished_task_is_dead() {
        let t0 = Instant::now();
        let mut i = running(t0);
        assert_eq!(i.on(Input::Vanished, t0, &T), [Action::Cleanup]);
        let a = i.on(Input::CleanedUp, t0, &T);
        assert_eq!(report(&a)[0].0, Status::Dead);
        assert!(report(&a)[0].1.contains("disappeared"));
    }

    #[test]
    fn adopted_and_found_dead() {
        let t0 = Instant::now();
        let mut i = Instance::adopted("app.ns.svc.ns", 2, true);
        let a = i.on(Input::Exited { code: 0 }, t0, &T);
        assert_eq!(a, [Action::Cleanup]);
        assert_eq!(
            report(&i.on(Input::CleanedUp, t0, &T))[0].0,
            Status::Completed
        );
        let mut d = Instance::found_dead("app.ns.svc.ns", 2, exit_report(false, 1, false), t0);
        let a = d.on(Input::CleanedUp, t0, &T);
        assert_eq!(report(&a), [(Status::Dead, "exited with code 1")]);
    }
}
