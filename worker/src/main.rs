//! `NodeEngine` (and, by multi-call, `NetManager`): parses the command line and wires the worker
//! library together. Everything testable lives in the library.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use worker::cli::{self, Command, ConfigCommand};
use worker::config::{ConfFile, NetworkMode, Overrides, Paths, Settings};
use worker::telemetry::Telemetry;
use worker::{
    config_edit, control, image, overlay, runtime, runtime_adapter, runtime_link, session, status,
};

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn load_settings(paths: &Paths, cli: &Overrides) -> Result<Settings, String> {
    let conf = ConfFile::load(&paths.conf_file()).map_err(|e| e.to_string())?;
    let netcfg = netstack::config::NetCfg::load(&paths.netcfg).map_err(|e| e.to_string())?;
    Settings::resolve(paths, &conf, &netcfg, &env, cli, &hostname()).map_err(|e| e.to_string())
}

fn run_config(paths: &Paths, cmd: &ConfigCommand) -> Result<(), String> {
    if *cmd == ConfigCommand::Show {
        let s = load_settings(paths, &Overrides::default())?;
        println!(
            "{}",
            serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let file = paths.conf_file();
    let mut conf = ConfFile::load(&file).map_err(|e| e.to_string())?;
    let edit = config_edit::apply(&mut conf, cmd);
    if edit.changed {
        conf.save(&file).map_err(|e| e.to_string())?;
    }
    if !edit.message.is_empty() {
        println!("{}", edit.message);
    }
    Ok(())
}

/// `-d`: persist -a/-p, then let systemd (or, without systemd, a detached child) run the worker.
fn detach(paths: &Paths, cli: &Overrides) -> Result<(), String> {
    let file = paths.conf_file();
    let mut conf = ConfFile::load(&file).map_err(|e| e.to_string())?;
    if let Some(a) = &cli.cluster_address {
        conf.cluster_address = a.clone();
    }
    if let Some(p) = cli.cluster_port {
        conf.cluster_port = p;
    }
    conf.save(&file).map_err(|e| e.to_string())?;
    if control::systemd_running() {
        control::systemctl("start", &[control::UNIT])?;
    } else {
        use std::os::unix::process::CommandExt;
        let log_path = Path::new(control::LOG_FILE);
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = std::process::Command::new(exe)
            .env("OAK_CONFIG_DIR", &paths.config_dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the worker: {e}"))?;
        println!(
            "NodeEngine started in the background (pid {}); logs: {}",
            child.id(),
            control::LOG_FILE
        );
        return Ok(());
    }
    println!("NodeEngine started; `NodeEngine logs` follows its log, `NodeEngine status` shows its state");
    Ok(())
}

fn run_foreground(paths: &Paths, cli: &Overrides) -> Result<(), String> {
    let settings = load_settings(paths, cli)?;
    log::info!(
        "NodeEngine {} (Oakestra {} compatible) node {:?}, cluster {}:{}, network {}",
        worker::VERSION,
        worker::UPSTREAM_COMPAT,
        settings.node_name,
        settings.cluster_address,
        settings.cluster_port,
        settings.network
    );
    let cfg =
        session::Config::from_settings(&settings, env("MY_PORT")).map_err(|e| e.to_string())?;
    // The overlay opens its TUN and tunnel port now, so a port clash fails the start, not the
    // first deploy. It talks to the cluster once registration gives the node id.
    let overlay = match &settings.network {
        NetworkMode::Auto => {
            let ocfg = overlay::OverlayConfig::from_settings(&settings)?;
            Some(overlay::Overlay::start(ocfg)?)
        }
        NetworkMode::Manual(_) | NetworkMode::Off => None,
    };
    write_pid_file(&settings.state_dir);
    let telemetry = Telemetry::new(
        &settings.node_name,
        &format!("{}:{}", settings.cluster_address, settings.cluster_port),
    );
    if let Some(c) = overlay
        .as_ref()
        .and_then(|(o, _, _)| o.dataplane_counters())
    {
        telemetry.set_overlay(c);
    }
    let _status =
        status::serve(settings.status_addr, telemetry.clone()).map_err(|e| e.to_string())?;
    log::info!("status endpoint on http://{}/status", settings.status_addr);
    let ex = async_executor::LocalExecutor::new();
    let (session_side, runtime_side) = runtime_link::link(cfg.runtime_capacity);
    // The overlay (or, in manual mode, the NetManager client) is the runtime's Network seam: a
    // named netns per instance, joined at create.
    let (overlay, overlay_link, network): (_, _, std::rc::Rc<dyn runtime::Network>) =
        match (overlay, &settings.network) {
            (Some((o, link, task)), _) => {
                ex.spawn(task).detach();
                (Some(o.clone()), Some(link), std::rc::Rc::new(o))
            }
            (None, NetworkMode::Manual(sock)) => {
                log::info!(
                    "network manual: instances are wired by the NetManager at {}",
                    sock.display()
                );
                let mcfg =
                    overlay::manual::ManualClientConfig::new(sock, &settings.cluster_address);
                let (net, link, task) = overlay::manual::ManualNetwork::new(mcfg);
                ex.spawn(task).detach();
                (None, Some(link), std::rc::Rc::new(net))
            }
            (None, _) => (None, None, std::rc::Rc::new(runtime::NoNetwork)),
        };
    let pull = image::PullConfig::from_env(settings.insecure_registries.clone());
    let rt_cfg = runtime_adapter::runtime_config(&settings, &pull);
    let puller = runtime_adapter::RegistryPuller::new(&rt_cfg, pull, telemetry.images.clone());
    ex.spawn(runtime_adapter::run(
        runtime_side,
        runtime_adapter::Config::new(rt_cfg),
        std::rc::Rc::new(puller),
        network,
        telemetry.clone(),
    ))
    .detach();
    let stop = shutdown_signal().map_err(|e| format!("cannot install the SIGTERM handler: {e}"))?;
    async_io::block_on(ex.run(session::run_with_overlay(
        cfg,
        session_side,
        telemetry,
        &ex,
        stop,
        overlay_link,
    )));
    if let Some(o) = overlay {
        o.shutdown();
    }
    let _ = std::fs::remove_file(control::pid_file(&settings.state_dir));
    Ok(())
}

/// `NetManager` (multi-call): the overlay alone behind upstream's local API, for workers in
/// `network manual` mode (or a stock NodeEngine).
fn run_netmanager(paths: &Paths) -> Result<(), String> {
    let settings = load_settings(paths, &Overrides::default())?;
    let netcfg = netstack::config::NetCfg::load(&paths.netcfg).map_err(|e| e.to_string())?;
    let socket = match &settings.network {
        NetworkMode::Manual(s) => s.clone(),
        _ => worker::config::DEFAULT_NETMANAGER_SOCKET.into(),
    };
    let mcfg = overlay::api::ManualConfig {
        socket,
        cluster_url: netcfg.cluster_url.trim().to_string(),
        mqtt_port: netcfg
            .cluster_mqtt_port
            .trim()
            .parse()
            .unwrap_or(netstack::config::DEFAULT_MQTT_PORT),
        register_wait: Duration::from_secs(9),
    };
    let ocfg = overlay::OverlayConfig::from_settings(&settings)?;
    let stop = shutdown_signal().map_err(|e| format!("cannot install the SIGTERM handler: {e}"))?;
    let ex = async_executor::LocalExecutor::new();
    async_io::block_on(ex.run(overlay::api::run(&ex, ocfg, mcfg, stop)))
}

/// Write end of the self-pipe the signal handler pokes (-1 until installed).
static SIGNAL_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; one byte from a static buffer.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
}

/// Completes on SIGTERM or SIGINT, so systemd's stop ends the MQTT session politely.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use futures_lite::AsyncReadExt;
    use std::os::fd::AsRawFd;
    let (rx, tx) = std::os::unix::net::UnixStream::pair()?;
    tx.set_nonblocking(true)?;
    SIGNAL_FD.store(tx.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
    // The write end lives as long as the process: the handler may run at any time.
    std::mem::forget(tx);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only calls write(2) on a valid descriptor.
        if unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) }
            == libc::SIG_ERR
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    let mut rx = async_io::Async::new(rx)?;
    Ok(async move {
        let mut b = [0u8; 1];
        let _ = rx.read(&mut b).await;
        log::info!("signal received, shutting down");
    })
}

/// For `NodeEngine stop` without systemd. Best effort: a read-only state dir only costs that.
fn write_pid_file(state_dir: &Path) {
    let path = control::pid_file(state_dir);
    let r = std::fs::create_dir_all(state_dir)
        .and_then(|()| std::fs::write(&path, format!("{}\n", std::process::id())));
    if let Err(e) = r {
        log::warn!(
            "cannot write {} ({e}); `NodeEngine stop` will not find this process",
            path.display()
        );
    }
}

fn main() -> ExitCode {
    let mut argv = std::env::args();
    let argv0 = argv.next().unwrap_or_else(|| "NodeEngine".into());
    let args: Vec<String> = argv.collect();
    let cmd = match cli::parse(&argv0, &args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let paths = Paths::from_env(&env);
    let result = match cmd {
        Command::Help => {
            print!("{}", cli::HELP);
            Ok(())
        }
        Command::Version => {
            println!(
                "NodeEngine {} (Oakestra {} compatible)",
                worker::VERSION,
                worker::UPSTREAM_COMPAT
            );
            Ok(())
        }
        Command::Config(c) => run_config(&paths, &c),
        Command::Status => load_settings(&paths, &Overrides::default()).and_then(|s| {
            control::http_get(s.status_addr, "/status", Duration::from_secs(3))
                .map(|body| println!("{body}"))
        }),
        Command::Logs => control::follow(Path::new(control::LOG_FILE), 4096),
        Command::Stop => {
            if control::systemd_running() {
                control::systemctl("stop", &[control::UNIT, "netmanager"])
            } else {
                load_settings(&paths, &Overrides::default())
                    .and_then(|s| control::stop_by_pid_file(&s.state_dir))
            }
        }
        Command::Run {
            cluster_address,
            cluster_port,
            detach: d,
        } => {
            let cli = Overrides {
                cluster_address,
                cluster_port,
            };
            if d {
                detach(&paths, &cli)
            } else {
                run_foreground(&paths, &cli)
            }
        }
        Command::NetManager => run_netmanager(&paths),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
