//! orch-lite as a library: the root and cluster roles, each a set of pure cores (schedulers,
//! state machines, validation) behind thin I/O edges (HTTP, MQTT, store). `main.rs` picks roles.

pub mod broker;
pub mod cluster;
pub mod http;
pub mod root;
pub mod store;
