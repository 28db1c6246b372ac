//! The Oakestra worker as a library: configuration, CLI grammar, the cluster session, the
//! containerd runtime and the image puller. `main.rs` only wires these together.
//!
//! Where to look: a registration → `register` (HTTP) driven by `session`; a deploy or delete
//! message → `session::Session::on_message` → `runtime_link` (the bounded boundary to whatever
//! runs instances) → `runtime_adapter` → `runtime` (containerd; images via `image`); a status
//! report → `runtime_link::Event::Status` → `outbox` → `mqtt::client`; the wire shapes →
//! `protocol`; MQTT bytes → `mqtt::codec` (pure, shared with orch-lite); host figures →
//! `sysinfo`; `/status` and `/metrics` → `telemetry` rendered by `status`.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod config_edit;
pub mod containerd;
pub mod control;
pub mod image;
pub mod mqtt;
pub mod netio;
pub mod outbox;
pub mod overlay;
pub mod protocol;
pub mod register;
pub mod runtime;
pub mod runtime_adapter;
pub mod runtime_link;
pub mod session;
pub mod status;
pub mod sysinfo;
pub mod telemetry;
pub mod tls;

/// Version printed by `NodeEngine version`, with the upstream release we are wire-compatible with.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const UPSTREAM_COMPAT: &str = "v0.4.411";
