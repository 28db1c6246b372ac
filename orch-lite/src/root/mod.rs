//! The root orchestrator role (issue #7): users and JWT auth, SLA validation, applications and
//! services, the root scheduler, the root service manager's addresses, and the cluster-facing
//! endpoints. See `CLUSTER_CONTRACT.md` for every root<->cluster call.

pub mod auth;
pub mod db;
pub mod ids;
pub mod ipam;
pub mod model;
pub mod scheduler;
pub mod sla;
