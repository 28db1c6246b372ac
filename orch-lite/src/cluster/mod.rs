//! The cluster role (Oakestra's cluster orchestrator): worker registration, the MQTT handlers,
//! the scheduler, the instance state machine and the link to the root.

pub mod handlers;
pub mod instance;
pub mod metrics;
pub mod scheduler;
pub mod state;
