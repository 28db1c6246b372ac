//! The Oakestra worker as a library: configuration, CLI grammar and (as they land) the cluster
//! session, the containerd runtime and the reports. `main.rs` only wires these together.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod config_edit;
pub mod control;
pub mod mqtt;
pub mod netio;
pub mod outbox;
pub mod protocol;
pub mod register;
pub mod runtime;
pub mod session;
pub mod status;
pub mod sysinfo;
pub mod telemetry;

/// Version printed by `NodeEngine version`, with the upstream release we are wire-compatible with.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const UPSTREAM_COMPAT: &str = "v0.4.411";
