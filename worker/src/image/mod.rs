//! Client-side image pull into containerd: OCI distribution over HTTPS (HTTP for
//! `OAK_INSECURE_REGISTRIES`), anonymous bearer tokens, platform selection, verified streaming
//! into the content store, unpack into snapshots. The runtime calls [`ensure`]; see README.md.
//! It does not push, log in with credentials, or garbage-collect old images.

pub mod auth;
pub mod http;
pub mod manifest;
pub mod platform;
pub mod progress;
pub mod pull;
pub mod reference;

pub use platform::Platform;
pub use progress::Counters;
pub use pull::{ensure, PullConfig, PullError, PulledImage};
pub use reference::Reference;
