//! The boundary between the cluster session and whatever runs instances (the containerd runtime,
//! served by `runtime_adapter`): two bounded channels. The session sends deploy, delete and
//! sample commands without ever waiting; the runtime answers with instance status changes and
//! resource samples.
//! [`no_runtime`] stands in where no runtime is wanted (session tests): it fails every deploy.

use async_channel::{Receiver, Sender};

use crate::protocol::{DeleteCommand, DeployCommand, InstanceResources, Status};

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A validated deploy (`DeployCommand::validate` passed).
    Deploy(DeployCommand),
    Delete(DeleteCommand),
    /// Asks for one [`Event::Resources`] listing every running instance (the `jobs/resources`
    /// heartbeat); sent once per report interval.
    Sample,
}

/// One instance status change, reported on `nodes/<id>/job`. Only statuses a worker may send
/// ([`Status::reportable_by_worker`]) are forwarded; others are counted and dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    pub job_name: String,
    pub instance: u64,
    pub status: Status,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Status(StatusChange),
    Resources(Vec<InstanceResources>),
}

/// The session's ends.
#[derive(Debug)]
pub struct SessionSide {
    pub commands: Sender<Command>,
    pub events: Receiver<Event>,
}

/// The runtime's ends. A runtime may block on `events` (backpressure is fine: the session
/// drains it continuously) but must keep reading `commands`.
#[derive(Debug)]
pub struct RuntimeSide {
    pub commands: Receiver<Command>,
    pub events: Sender<Event>,
}

/// A linked pair of bounded channels, `capacity` messages each way.
pub fn link(capacity: usize) -> (SessionSide, RuntimeSide) {
    let (ctx, crx) = async_channel::bounded(capacity);
    let (etx, erx) = async_channel::bounded(capacity);
    (
        SessionSide {
            commands: ctx,
            events: erx,
        },
        RuntimeSide {
            commands: crx,
            events: etx,
        },
    )
}

pub const NO_RUNTIME_DETAIL: &str = "no container runtime configured";

/// Answers every deploy with FAILED and every sample with an empty list; deletes find nothing
/// (upstream then sends no report either, spec §5.2). Ends when the session goes away.
pub async fn no_runtime(side: RuntimeSide) {
    while let Ok(cmd) = side.commands.recv().await {
        let ev = match cmd {
            Command::Deploy(d) => Event::Status(StatusChange {
                job_name: d.job_name,
                instance: d.instance_number,
                status: Status::Failed,
                detail: NO_RUNTIME_DETAIL.into(),
            }),
            Command::Delete(d) => {
                log::info!(
                    "delete {}.instance.{}: no such instance",
                    d.job_name,
                    d.instance_number
                );
                continue;
            }
            Command::Sample => Event::Resources(Vec::new()),
        };
        if side.events.send(ev).await.is_err() {
            return;
        }
    }
}
