//! `orch-lite root|cluster|all`: Oakestra's root and cluster orchestrators in one process.
//! Parses the role, starts it from the library, and waits for SIGINT/SIGTERM.

use std::process::ExitCode;

const HELP: &str = "\
orch-lite: Oakestra-compatible orchestrator (root and cluster roles in one binary)

Usage:
  orch-lite root       Root orchestrator: REST API on $OAK_ROOT_API_ADDR (0.0.0.0:10000)
  orch-lite cluster    Cluster orchestrator: worker API on $OAK_CLUSTER_API_ADDR (0.0.0.0:10100),
                       MQTT broker on $OAK_MQTT_ADDR (0.0.0.0:10003) unless $OAK_MQTT_URL is set
  orch-lite all        Both roles in one process (the 1-DOC setup)
  orch-lite version | help
";

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread started after it), then
/// returns a function that waits for one of them. Blocking first means no thread dies of them.
fn block_stop_signals() -> impl FnOnce() -> i32 {
    // SAFETY: plain libc calls on a locally owned sigset; no memory is shared.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    move || {
        let mut sig = 0;
        // SAFETY: `set` is initialised above and `sig` is a valid out pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        sig
    }
}

fn run_root() -> Result<(), String> {
    let wait = block_stop_signals();
    let root = orch_lite::root::start(orch_lite::root::RootConfig::from_env()?)?;
    log::info!("root orchestrator ready on {}", root.addr());
    let sig = wait();
    log::info!("signal {sig}: stopping");
    drop(root);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["version"] | ["--version"] => {
            println!("orch-lite {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        ["help"] | ["--help"] | ["-h"] | [] => {
            print!("{HELP}");
            Ok(())
        }
        ["root"] => run_root(),
        [role @ ("cluster" | "all")] => {
            Err(format!("the {role} role is not implemented yet (issue #6)"))
        }
        other => {
            eprintln!("error: unknown arguments {other:?}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
