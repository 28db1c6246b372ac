//! What each `NodeEngine config …` command does to conf.json. Pure: the caller loads and saves
//! the file, so every edit is unit-tested without touching /etc.

use crate::cli::ConfigCommand;
use crate::config::{ConfFile, CsiDriver};

/// The result of a config command: whether the file must be written, and what to print.
#[derive(Debug, PartialEq)]
pub struct Edit {
    pub changed: bool,
    pub message: String,
}

fn changed(message: String) -> Edit {
    Edit {
        changed: true,
        message,
    }
}

fn unchanged(message: String) -> Edit {
    Edit {
        changed: false,
        message,
    }
}

/// Applies `cmd` (anything but `Show`, which needs the environment) to `conf`.
pub fn apply(conf: &mut ConfFile, cmd: &ConfigCommand) -> Edit {
    match cmd {
        ConfigCommand::Show => unchanged(String::new()),
        ConfigCommand::Default => {
            *conf = ConfFile::default();
            changed("configuration reset to the defaults".into())
        }
        ConfigCommand::Cluster { address, port, ssl } => {
            conf.cluster_address = address.clone();
            conf.cluster_port = *port;
            conf.cluster_ssl = *ssl;
            let scheme = if *ssl { "https" } else { "http" };
            changed(format!("cluster set to {scheme}://{address}:{port}"))
        }
        ConfigCommand::AppLogs(path) => {
            conf.app_logs = path.display().to_string();
            changed(format!("instance logs go to {}", path.display()))
        }
        ConfigCommand::Virtualization(None) => unchanged(
            conf.virtualizations
                .iter()
                .map(|v| {
                    format!(
                        "{} ({}): {}",
                        v.runtime,
                        v.name,
                        if v.active { "on" } else { "off" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        ConfigCommand::Virtualization(Some((runtime, on))) => {
            let name = match runtime.as_str() {
                "unikernel" => "unikraft",
                "docker" => "containerd",
                other => other,
            };
            conf.set_virtualization(name, runtime, *on);
            changed(format!(
                "virtualization {runtime} {}",
                if *on { "on" } else { "off" }
            ))
        }
        ConfigCommand::Addon(None) => unchanged(
            conf.addons
                .iter()
                .flatten()
                .map(|a| {
                    format!(
                        "{}: {}",
                        a.addon_name,
                        if a.addon_active { "on" } else { "off" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        ConfigCommand::Addon(Some((name, on))) => {
            conf.set_addon(name, *on);
            changed(format!("addon {name} {}", if *on { "on" } else { "off" }))
        }
        ConfigCommand::Network(mode) => {
            conf.set_network_mode(mode);
            changed(format!("overlay network: {mode}"))
        }
        ConfigCommand::Visibility { public } => {
            conf.public_ip = *public;
            changed(format!(
                "visibility {}",
                if *public { "public" } else { "private" }
            ))
        }
        ConfigCommand::Auth { cert, key } => {
            // As upstream: only the values given are written.
            if let Some(c) = cert {
                conf.mqtt_cert_file = c.display().to_string();
            }
            if let Some(k) = key {
                conf.mqtt_key_file = k.display().to_string();
            }
            let shown = |s: &str| {
                if s.is_empty() {
                    "(none)".to_string()
                } else {
                    s.to_string()
                }
            };
            Edit {
                changed: cert.is_some() || key.is_some(),
                message: format!(
                    "MQTT client certificate: {}, key: {}",
                    shown(&conf.mqtt_cert_file),
                    shown(&conf.mqtt_key_file)
                ),
            }
        }
        ConfigCommand::CsiList => unchanged(
            conf.csi_drivers
                .iter()
                .flatten()
                .map(|d| format!("{} {}", d.csi_driver_name, d.csi_driver_endpoint))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        ConfigCommand::CsiAdd { name, endpoint } => {
            let drivers = conf.csi_drivers.get_or_insert_with(Vec::new);
            drivers.retain(|d| &d.csi_driver_name != name);
            drivers.push(CsiDriver {
                csi_driver_name: name.clone(),
                csi_driver_endpoint: endpoint.clone(),
            });
            changed(format!("CSI driver {name} at {endpoint}"))
        }
        ConfigCommand::CsiRemove { name } => {
            let drivers = conf.csi_drivers.get_or_insert_with(Vec::new);
            let before = drivers.len();
            drivers.retain(|d| &d.csi_driver_name != name);
            if drivers.len() == before {
                unchanged(format!("no CSI driver named {name}"))
            } else {
                changed(format!("CSI driver {name} removed"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkMode;

    #[test]
    fn cluster_always_sets_port_and_ssl() {
        let mut conf = ConfFile {
            cluster_port: 12000,
            cluster_ssl: true,
            ..Default::default()
        };
        let e = apply(
            &mut conf,
            &ConfigCommand::Cluster {
                address: "10.1.1.1".into(),
                port: 10100,
                ssl: false,
            },
        );
        assert!(e.changed);
        assert_eq!(
            (
                conf.cluster_address.as_str(),
                conf.cluster_port,
                conf.cluster_ssl
            ),
            ("10.1.1.1", 10100, false)
        );
    }

    #[test]
    fn auth_writes_only_given_values() {
        let mut conf = ConfFile {
            mqtt_key_file: "/old.key".into(),
            ..Default::default()
        };
        apply(
            &mut conf,
            &ConfigCommand::Auth {
                cert: Some("/c.crt".into()),
                key: None,
            },
        );
        assert_eq!(
            (conf.mqtt_cert_file.as_str(), conf.mqtt_key_file.as_str()),
            ("/c.crt", "/old.key")
        );
        assert!(
            !apply(
                &mut conf,
                &ConfigCommand::Auth {
                    cert: None,
                    key: None
                }
            )
            .changed
        );
    }

    #[test]
    fn csi_add_replaces_and_remove_reports_missing() {
        let mut conf = ConfFile::default();
        apply(
            &mut conf,
            &ConfigCommand::CsiAdd {
                name: "nfs".into(),
                endpoint: "/a".into(),
            },
        );
        apply(
            &mut conf,
            &ConfigCommand::CsiAdd {
                name: "nfs".into(),
                endpoint: "/b".into(),
            },
        );
        assert_eq!(conf.csi_drivers.as_ref().unwrap().len(), 1);
        assert_eq!(apply(&mut conf, &ConfigCommand::CsiList).message, "nfs /b");
        assert!(apply(&mut conf, &ConfigCommand::CsiRemove { name: "nfs".into() }).changed);
        assert!(!apply(&mut conf, &ConfigCommand::CsiRemove { name: "nfs".into() }).changed);
    }

    #[test]
    fn virtualization_and_network_toggles() {
        let mut conf = ConfFile::default();
        apply(
            &mut conf,
            &ConfigCommand::Virtualization(Some(("unikernel".into(), true))),
        );
        apply(
            &mut conf,
            &ConfigCommand::Virtualization(Some(("docker".into(), false))),
        );
        let list = apply(&mut conf, &ConfigCommand::Virtualization(None)).message;
        assert_eq!(list, "docker (containerd): off\nunikernel (unikraft): on");
        apply(&mut conf, &ConfigCommand::Network(NetworkMode::Off));
        assert_eq!(conf.overlay_network, "");
        apply(&mut conf, &ConfigCommand::Default);
        assert_eq!(conf, ConfFile::default());
    }
}
