//! MQTT 3.1.1 for the worker's cluster session: a pure packet codec (`codec`, also used by
//! `orch-lite`) and the async client that drives it over TCP (`client`). No broker, no QoS 2,
//! no MQTT 5, no TLS yet (the client's transport is the seam for it).

pub mod client;
pub mod codec;
