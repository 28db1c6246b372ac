//! orch-lite as a library: the root and cluster roles, each a set of pure cores (schedulers,
//! state machines, validation) behind thin I/O edges (HTTP, MQTT, store). `main.rs` picks roles.

pub mod http;
