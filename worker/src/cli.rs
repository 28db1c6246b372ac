//! Command-line grammar of `NodeEngine`, Oakestra's CLI (spec worker-protocol §8.2) plus the
//! foreground mode our systemd unit and tests use. Pure: `parse` turns arguments into a
//! [`Command`]; carrying it out is `main.rs`'s job. Hand-written instead of clap: the grammar is
//! small and clap would cost a few hundred KiB on a Pi.

use std::fmt;
use std::path::PathBuf;

use crate::config::NetworkMode;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the worker. In the foreground unless `detach` (then: save `-a`/`-p` to conf.json and
    /// hand over to the systemd unit, as upstream's `NodeEngine -a … -d` does).
    Run {
        cluster_address: Option<String>,
        cluster_port: Option<u16>,
        detach: bool,
    },
    /// The overlay alone (multi-call: invoked as `NetManager`).
    NetManager,
    Help,
    Version,
    Status,
    Logs,
    Stop,
    Config(ConfigCommand),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ConfigCommand {
    /// Print the effective settings (files + environment) as JSON.
    Show,
    Default,
    Cluster {
        address: String,
        port: u16,
        ssl: bool,
    },
    AppLogs(PathBuf),
    /// `None`: list; `Some((runtime, on))`: switch one.
    Virtualization(Option<(String, bool)>),
    Addon(Option<(String, bool)>),
    Network(NetworkMode),
    Visibility {
        public: bool,
    },
    Auth {
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    },
    CsiList,
    CsiAdd {
        name: String,
        endpoint: String,
    },
    CsiRemove {
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\nRun `NodeEngine help` for usage.", self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage<T>(msg: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(msg.into()))
}

/// `argv0` decides the personality (multi-call binary); `args` excludes it.
pub fn parse(argv0: &str, args: &[String]) -> Result<Command, UsageError> {
    let prog = argv0.rsplit('/').next().unwrap_or(argv0);
    if prog == "NetManager" {
        // The stock NetManager takes no flags; `version`/`help` are still handy.
        return match args.first().map(String::as_str) {
            None => Ok(Command::NetManager),
            Some("version") | Some("--version") => Ok(Command::Version),
            Some("help") | Some("--help") | Some("-h") => Ok(Command::Help),
            Some(other) => usage(format!("NetManager takes no arguments (got {other:?})")),
        };
    }
    let Some(first) = args.first() else {
        return Ok(Command::Run {
            cluster_address: None,
            cluster_port: None,
            detach: false,
        });
    };
    match first.as_str() {
        "help" | "--help" | "-h" => Ok(Command::Help),
        "version" | "--version" | "-v" => Ok(Command::Version),
        "status" => no_more(&args[1..], Command::Status),
        "logs" => no_more(&args[1..], Command::Logs),
        "stop" => no_more(&args[1..], Command::Stop),
        "config" => parse_config(&args[1..]).map(Command::Config),
        s if s.starts_with('-') => parse_run(args),
        other => usage(format!("unknown command {other:?}")),
    }
}

fn no_more(rest: &[String], cmd: Command) -> Result<Command, UsageError> {
    match rest.first() {
        None => Ok(cmd),
        Some(extra) => usage(format!("unexpected argument {extra:?}")),
    }
}

/// Splits `--flag=value` and `-fvalue` forms into a flag and an inline value.
fn split_flag(arg: &str) -> (&str, Option<&str>) {
    if let Some((f, v)) = arg.split_once('=') {
        return (f, Some(v));
    }
    if arg.len() > 2 && arg.starts_with('-') && !arg.starts_with("--") {
        return (&arg[..2], Some(&arg[2..]));
    }
    (arg, None)
}

fn take_value<'a>(
    flag: &str,
    inline: Option<&'a str>,
    it: &mut impl Iterator<Item = &'a String>,
) -> Result<&'a str, UsageError> {
    match inline {
        Some(v) => Ok(v),
        None => it
            .next()
            .map(String::as_str)
            .ok_or_else(|| UsageError(format!("{flag} needs a value"))),
    }
}

fn parse_port(flag: &str, v: &str) -> Result<u16, UsageError> {
    match v.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => usage(format!("{flag}: {v:?} is not a port number (1-65535)")),
    }
}

fn parse_run(args: &[String]) -> Result<Command, UsageError> {
    let (mut addr, mut port, mut detach) = (None, None, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = split_flag(arg);
        match flag {
            "-a" | "--clusterAddr" => addr = Some(take_value(flag, inline, &mut it)?.to_string()),
            "-p" | "--clusterPort" => {
                port = Some(parse_port(flag, take_value(flag, inline, &mut it)?)?)
            }
            "-d" | "--detach" | "--detatch" if inline.is_none() => detach = true,
            // Upstream declares these but does nothing with them; accept for old scripts.
            "--image-builder" | "--flops-learner" if inline.is_none() => {}
            _ => return usage(format!("unknown flag {arg:?}")),
        }
    }
    if let Some(a) = &addr {
        if a.trim().is_empty() {
            return usage("-a needs a non-empty cluster address");
        }
    }
    Ok(Command::Run {
        cluster_address: addr,
        cluster_port: port,
        detach,
    })
}

/// Upstream's notion of "on": `on`, `enable` or `true`; we also refuse typos instead of
/// silently switching things off.
fn on_off(v: &str) -> Result<bool, UsageError> {
    match v {
        "on" | "enable" | "true" => Ok(true),
        "off" | "disable" | "false" => Ok(false),
        other => usage(format!("expected on or off, got {other:?}")),
    }
}

fn parse_config(args: &[String]) -> Result<ConfigCommand, UsageError> {
    let sub = args.first().map(String::as_str);
    let rest = args.get(1..).unwrap_or(&[]);
    let arg = |i: usize, what: &str| -> Result<&str, UsageError> {
        rest.get(i)
            .map(String::as_str)
            .ok_or_else(|| UsageError(format!("config {}: missing {what}", sub.unwrap_or(""))))
    };
    let cmd = match sub {
        None | Some("show") => ConfigCommand::Show,
        Some("default") => ConfigCommand::Default,
        Some("cluster") => {
            let (mut address, mut port, mut ssl) = (None, 10100, false);
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                let (flag, inline) = split_flag(a);
                match flag {
                    "-p" | "--clusterPort" => {
                        port = parse_port(flag, take_value(flag, inline, &mut it)?)?
                    }
                    "-s" | "--clusterSSL" if inline.is_none() => ssl = true,
                    f if f.starts_with('-') => {
                        return usage(format!("config cluster: unknown flag {a:?}"))
                    }
                    _ if address.is_none() => address = Some(a.clone()),
                    _ => return usage(format!("config cluster: unexpected argument {a:?}")),
                }
            }
            let address =
                address.ok_or_else(|| UsageError("config cluster: missing <address>".into()))?;
            return Ok(ConfigCommand::Cluster { address, port, ssl });
        }
        Some("applogs") => ConfigCommand::AppLogs(arg(0, "<path>")?.into()),
        Some("virtualization") => match rest {
            [] => ConfigCommand::Virtualization(None),
            [name, state] => {
                let runtime = match name.as_str() {
                    "unikernel" | "crosvm" | "docker" => name.clone(),
                    other => {
                        return usage(format!(
                            "unknown virtualization {other:?} (docker, unikernel, crosvm)"
                        ))
                    }
                };
                ConfigCommand::Virtualization(Some((runtime, on_off(state)?)))
            }
            _ => return usage("usage: config virtualization [<docker|unikernel|crosvm> <on|off>]"),
        },
        Some("addon") => match rest {
            [] => ConfigCommand::Addon(None),
            [name, state] => {
                let addon = match name.as_str() {
                    "imageBuilder" | "image-builder" => "image-builder",
                    "FLOps" | "FLOps-learner" => "FLOps-learner",
                    other => {
                        return usage(format!("unknown addon {other:?} (imageBuilder, FLOps)"))
                    }
                };
                ConfigCommand::Addon(Some((addon.into(), on_off(state)?)))
            }
            _ => return usage("usage: config addon [<imageBuilder|FLOps> <on|off>]"),
        },
        Some("network") => match rest {
            [m] if m == "auto" => ConfigCommand::Network(NetworkMode::Auto),
            [m] if m == "off" => ConfigCommand::Network(NetworkMode::Off),
            [m] if m == "manual" => ConfigCommand::Network(NetworkMode::Manual(
                crate::config::DEFAULT_NETMANAGER_SOCKET.into(),
            )),
            [m, sock] if m == "manual" => ConfigCommand::Network(NetworkMode::Manual(sock.into())),
            _ => return usage("usage: config network auto | manual [<socket>] | off"),
        },
        Some("visibility") => match rest {
            [v] if v == "public" => ConfigCommand::Visibility { public: true },
            [v] if v == "private" => ConfigCommand::Visibility { public: false },
            _ => return usage("usage: config visibility public|private"),
        },
        Some("auth") => {
            let (mut cert, mut key) = (None, None);
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                let (flag, inline) = split_flag(a);
                match flag {
                    "-c" | "--certFile" => cert = Some(take_value(flag, inline, &mut it)?.into()),
                    "-k" | "--keyFile" => key = Some(take_value(flag, inline, &mut it)?.into()),
                    _ => return usage(format!("config auth: unknown argument {a:?}")),
                }
            }
            return Ok(ConfigCommand::Auth { cert, key });
        }
        Some("csi") => match rest {
            [] => ConfigCommand::CsiList,
            [op, name, endpoint] if op == "add" => ConfigCommand::CsiAdd {
                name: name.clone(),
                endpoint: endpoint.clone(),
            },
            [op, name] if op == "remove" => ConfigCommand::CsiRemove { name: name.clone() },
            _ => return usage("usage: config csi [add <name> <endpoint> | remove <name>]"),
        },
        Some(other) => return usage(format!("unknown config command {other:?}")),
    };
    // Fixed-arity subcommands: anything left over is a mistake worth reporting.
    let used = match &cmd {
        ConfigCommand::AppLogs(_) => 1,
        _ => rest.len(),
    };
    match rest.get(used) {
        Some(extra) => usage(format!("unexpected argument {extra:?}")),
        None => Ok(cmd),
    }
}

pub const HELP: &str = "\
NodeEngine: Oakestra-compatible worker (containerd runtime, overlay network)

Usage:
  NodeEngine [-a <cluster address>] [-p <cluster port>] [-d]
      Run the worker. In the foreground unless -d; with -d, save -a/-p to conf.json and
      start the nodeengine service. -p defaults to 10100.
  NodeEngine status        Show the running worker's state (from its status endpoint)
  NodeEngine logs          Follow the worker's log
  NodeEngine stop          Stop the worker (and its overlay)
  NodeEngine version       Print the version
  NodeEngine help          This text

Configuration (written to $OAK_CONFIG_DIR/conf.json, default /etc/oakestra/conf.json):
  config [show]                                  Print the effective settings as JSON
  config default                                 Reset conf.json to the defaults
  config cluster <address> [-p <port>] [-s]      Cluster orchestrator (-s: HTTPS registration)
  config applogs <path>                          Folder for instance logs
  config virtualization [<runtime> <on|off>]     docker, unikernel, crosvm
  config addon [<imageBuilder|FLOps> <on|off>]
  config network auto | manual [<socket>] | off  Overlay in-process, by a NetManager, or none
  config visibility public|private
  config auth [-c <cert file>] [-k <key file>]   MQTT client certificate (MQTTS)
  config csi [add <name> <endpoint> | remove <name>]

Every setting can also come from the environment (OAK_CLUSTER_ADDRESS, OAK_CLUSTER_PORT,
OAK_NODE_NAME, OAK_CONFIG_DIR, OAK_NETCFG, OAK_STATE_DIR, OAK_CONTAINERD_SOCKET, ...), which
wins over the files; -a/-p win over both. See README.md.

Invoked as NetManager, the binary runs the overlay alone (for `config network manual`).
";

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, UsageError> {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse("/usr/local/bin/NodeEngine", &v)
    }

    fn cfg(args: &[&str]) -> ConfigCommand {
        let mut v = vec!["config"];
        v.extend_from_slice(args);
        match p(&v) {
            Ok(Command::Config(c)) => c,
            other => panic!("{args:?} → {other:?}"),
        }
    }

    #[test]
    fn legacy_command_lines_of_the_docs() {
        assert_eq!(
            p(&["-a", "192.168.1.10", "-p", "10100", "-d"]).unwrap(),
            Command::Run {
                cluster_address: Some("192.168.1.10".into()),
                cluster_port: Some(10100),
                detach: true
            }
        );
        assert_eq!(
            p(&["--clusterAddr=10.0.0.1", "-p10200"]).unwrap(),
            Command::Run {
                cluster_address: Some("10.0.0.1".into()),
                cluster_port: Some(10200),
                detach: false
            }
        );
        assert_eq!(
            p(&[]).unwrap(),
            Command::Run {
                cluster_address: None,
                cluster_port: None,
                detach: false
            }
        );
        assert!(matches!(
            p(&["-a", "x", "--detatch"]).unwrap(),
            Command::Run { detach: true, .. }
        ));
    }

    #[test]
    fn multi_call_netmanager() {
        assert_eq!(
            parse("/usr/local/bin/NetManager", &[]).unwrap(),
            Command::NetManager
        );
        assert_eq!(
            parse("NetManager", &["version".into()]).unwrap(),
            Command::Version
        );
        assert!(parse("NetManager", &["-p".into(), "6000".into()]).is_err());
    }

    #[test]
    fn bad_input_names_the_problem() {
        for (args, needle) in [
            (&["-p", "70000"][..], "not a port"),
            (&["-a"][..], "needs a value"),
            (&["-x"][..], "unknown flag"),
            (&["frobnicate"][..], "unknown command"),
            (&["status", "now"][..], "unexpected argument"),
            (&["config", "network", "sometimes"][..], "config network"),
            (&["config", "addon", "FLOps", "maybe"][..], "on or off"),
            (&["config", "cluster"][..], "missing <address>"),
            (
                &["config", "applogs", "/a", "/b"][..],
                "unexpected argument",
            ),
        ] {
            let err = p(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn config_subcommands() {
        assert_eq!(cfg(&[]), ConfigCommand::Show);
        assert_eq!(
            cfg(&["cluster", "10.0.0.5", "-p", "10200", "-s"]),
            ConfigCommand::Cluster {
                address: "10.0.0.5".into(),
                port: 10200,
                ssl: true
            }
        );
        assert_eq!(
            cfg(&["cluster", "10.0.0.5"]),
            ConfigCommand::Cluster {
                address: "10.0.0.5".into(),
                port: 10100,
                ssl: false
            }
        );
        assert_eq!(
            cfg(&["network", "manual"]),
            ConfigCommand::Network(NetworkMode::Manual(
                "/etc/netmanager/netmanager.sock".into()
            ))
        );
        assert_eq!(
            cfg(&["network", "off"]),
            ConfigCommand::Network(NetworkMode::Off)
        );
        assert_eq!(
            cfg(&["addon", "imageBuilder", "enable"]),
            ConfigCommand::Addon(Some(("image-builder".into(), true)))
        );
        assert_eq!(
            cfg(&["virtualization", "unikernel", "off"]),
            ConfigCommand::Virtualization(Some(("unikernel".into(), false)))
        );
        assert_eq!(
            cfg(&["auth", "-c", "/c.crt", "-k", "/c.key"]),
            ConfigCommand::Auth {
                cert: Some("/c.crt".into()),
                key: Some("/c.key".into())
            }
        );
        assert_eq!(
            cfg(&["csi", "add", "nfs", "/run/nfs.sock"]),
            ConfigCommand::CsiAdd {
                name: "nfs".into(),
                endpoint: "/run/nfs.sock".into()
            }
        );
        assert_eq!(
            cfg(&["visibility", "public"]),
            ConfigCommand::Visibility { public: true }
        );
    }
}
