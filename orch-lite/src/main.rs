//! `orch-lite root|cluster|all`: Oakestra's root and cluster orchestrators in one process.
//! Parses the command line, sets up logging, starts the roles and waits for SIGINT/SIGTERM.

use std::process::ExitCode;
use std::sync::mpsc;

const HELP: &str = "\
orch-lite: Oakestra-compatible orchestrator (root and cluster roles in one binary)

Usage:
  orch-lite root       Root orchestrator: REST API on $OAK_ROOT_API_ADDR (0.0.0.0:10000)
  orch-lite cluster    Cluster orchestrator: worker API on $OAK_CLUSTER_API_ADDR (0.0.0.0:10100),
                       MQTT broker on $OAK_MQTT_ADDR (0.0.0.0:10003) unless $OAK_MQTT_URL is set
  orch-lite all        Both roles in one process (the 1-DOC setup)
  orch-lite version | help
";

fn init_logging() {
    // rumqttd opens an ERROR-level tracing span per packet (bridged into `log`), which would
    // flood the log; broker trouble shows up as the cluster's own MQTT client losing its
    // connection instead. `RUST_LOG=info,rumqttd=debug` brings them back to debug the broker.
    let filter = "info,rumqttd=off,tracing::span=off";
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter)).init();
}

/// Blocks SIGINT and SIGTERM in this thread, and so in every thread started after it, then
/// returns a function that waits for one of them. Blocking first means no thread dies of them.
fn block_stop_signals() -> impl FnOnce() -> i32 + Send + 'static {
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

enum Stop {
    Signal(i32),
    ClusterEnded(Result<(), String>),
}

fn run(root: bool, cluster: bool) -> Result<(), String> {
    let wait = block_stop_signals();
    let (tx, rx) = mpsc::channel();
    let root = match root {
        true => Some(orch_lite::root::start(
            orch_lite::root::RootConfig::from_env()?,
        )?),
        false => None,
    };
    if cluster {
        let mut cfg = orch_lite::cluster::config::Config::from_env()?;
        if let Some(r) = &root {
            // `all`: the cluster reports to the root in this process, over loopback HTTP, the
            // same path a separate cluster takes.
            let ip = match r.addr().ip() {
                ip if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
                ip => ip,
            };
            let url = format!("http://{}", std::net::SocketAddr::new(ip, r.addr().port()));
            cfg.root_url.get_or_insert(url);
            cfg.root_token
                .get_or_insert_with(|| r.join_token().to_string());
        }
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || {
                let _ = tx.send(Stop::ClusterEnded(orch_lite::cluster::run(cfg)));
            })
            .map_err(|e| format!("cannot start the cluster role: {e}"))?;
    }
    std::thread::spawn(move || {
        let _ = tx.send(Stop::Signal(wait()));
    });
    let result = match rx.recv() {
        Ok(Stop::Signal(sig)) => {
            log::info!("signal {sig}: stopping");
            Ok(())
        }
        Ok(Stop::ClusterEnded(r)) => r.and(Err("the cluster role stopped".into())),
        Err(_) => Err("internal: no role is running".into()),
    };
    // The root flushes its snapshot on drop; the cluster's store is durable as it goes.
    drop(root);
    result
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (root, cluster) = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["version"] | ["--version"] => {
            println!("orch-lite {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        ["help"] | ["--help"] | ["-h"] | [] => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        ["root"] => (true, false),
        ["cluster"] => (false, true),
        ["all"] => (true, true),
        other => {
            eprintln!("error: unknown arguments {other:?}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    match run(root, cluster) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
