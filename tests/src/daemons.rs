//! Command lines of the system's daemons as the end-to-end tests start them: every path a daemon
//! writes to lies under the test's own directory, and intervals are short so tests stay fast.
//! Callers add or override environment variables on the returned `Command` before spawning it
//! with [`crate::Proc::spawn`].

use crate::Fixture;
use std::path::Path;
use std::process::Command;

/// A `NodeEngine` named `name` joining the cluster API at `cluster_ip:cluster_port`, the legacy
/// way (`-a`, `-p`); its config, netcfg, state and app logs under `<dir>/<name>/`, status
/// endpoint on `status_addr`, network off, reports every 500 ms, and the containerd and
/// registry of `fx`.
pub fn worker(
    bin: &Path,
    dir: &Path,
    name: &str,
    cluster_ip: &str,
    cluster_port: u16,
    status_addr: &str,
    fx: &Fixture,
) -> Command {
    let home = dir.join(name);
    let mut c = Command::new(bin);
    c.args(["-a", cluster_ip, "-p", &cluster_port.to_string()])
        .env("RUST_LOG", "info")
        .env("OAK_NODE_NAME", name)
        .env("OAK_CONFIG_DIR", home.join("etc"))
        .env("OAK_NETCFG", home.join("etc/netcfg.json"))
        .env("OAK_STATE_DIR", home.join("state"))
        .env("OAK_APP_LOGS", home.join("logs"))
        .env("OAK_NETWORK", "off")
        .env("OAK_STATUS_ADDR", status_addr)
        .env("OAK_REPORT_INTERVAL_MS", "500")
        .env_remove("OAK_JOIN_TOKEN");
    for (k, v) in fx.worker_env() {
        c.env(k, v);
    }
    c
}

/// `orch-lite <role>` (`all`, `root` or `cluster`) keeping its data under `<dir>/<data>`, with
/// generated tokens and the default Admin password, reporting to the root every 500 ms. The
/// listen addresses (`OAK_ROOT_API_ADDR`, `OAK_CLUSTER_API_ADDR`, `OAK_MQTT_ADDR`, ...) are the
/// caller's to set.
pub fn orch_lite(bin: &Path, role: &str, dir: &Path, data: &str) -> Command {
    let mut c = Command::new(bin);
    c.arg(role)
        .env("RUST_LOG", "info")
        .env("OAK_DATA_DIR", dir.join(data))
        .env("OAK_CLUSTER_REPORT_INTERVAL_MS", "500")
        .env_remove("OAK_JOIN_TOKEN")
        .env_remove("OAK_ADMIN_PASSWORD");
    c
}
