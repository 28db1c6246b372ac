//! The Oakestra worker as a library: configuration, CLI grammar and (as they land) the cluster
//! session, the containerd runtime and the reports. `main.rs` only wires these together.

pub mod cli;
pub mod config;
pub mod config_edit;
pub mod containerd;
pub mod control;
pub mod protocol;
pub mod runtime;

/// Version printed by `NodeEngine version`, with the upstream release we are wire-compatible with.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const UPSTREAM_COMPAT: &str = "v0.4.411";
