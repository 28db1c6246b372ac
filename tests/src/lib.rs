//! Shared parts of the end-to-end tests: real daemons started per test (`fixture`, `proc`,
//! `daemons`, `mosquitto`), whole systems of them (`world`, `topology`), a LAN of network
//! namespaces (`lan`), HTTP calls to their APIs (`api`), the root API as a user drives it
//! (`root`), and the guards that keep tests honest about root and about the machine's 2 cores.

pub mod api;
pub mod daemons;
pub mod fixture;
pub mod lan;
pub mod mosquitto;
pub mod proc;
pub mod root;
pub mod topology;
pub mod world;

pub use api::{call, ok, wait_for};
pub use fixture::{leftovers, Fixture};
pub use proc::{binaries, free_port, Proc};

use std::io::Write;
use std::sync::{Mutex, MutexGuard};

/// Whether this process runs as root (effective uid 0), read from /proc to need no libc.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Returns true when the test may run (root). Otherwise prints a loud skip line and returns
/// false, except under CI (`CI=true`), where a skipped test would be a silent pass: it panics.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
    {
        panic!("{test}: needs root (containerd, mounts, cgroups) and CI=true: run the e2e tests as root in CI, not skip them");
    }
    // Straight to stderr: the harness captures eprintln! of passing tests, and a skip must show.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {test} needs root (it starts containerd, mounts snapshots): run `sudo -E cargo test -p e2e`"
    );
    false
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises the tests that start daemons, so the test harness's threads do not run several
/// fixtures at once on a 2-core machine. A test that panicked while holding it does not poison
/// the others.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}
