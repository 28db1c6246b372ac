//! The cluster role's settings, read once from the environment (DESIGN.md's table plus the
//! timeouts tests shorten). Only parsing and validation; nothing is started here.

use super::instance::Timeouts;
use crate::broker::Tls;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub enum Mqtt {
    /// Start the embedded broker on this address.
    Embedded {
        listen: SocketAddr,
        tls: Option<Tls>,
    },
    /// Use an external broker (`OAK_MQTT_URL=mqtt://host:port`).
    External { host: String, port: u16 },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub api_addr: SocketAddr,
    pub mqtt: Mqtt,
    /// The cluster's store lives in `<OAK_DATA_DIR>/cluster`.
    pub data_dir: PathBuf,
    pub root_url: Option<String>,
    pub cluster_name: String,
    pub cluster_location: String,
    pub advertise_addr: Option<String>,
    /// Required from workers at registration (`OAK_JOIN_TOKEN`).
    pub join_token: Option<String>,
    /// Presented to the root and required on the root's calls. `OAK_JOIN_TOKEN` too, except in
    /// `all` mode without it, where the in-process root's generated token is used: workers
    /// then stay free to join without a token, as DESIGN.md says.
    pub root_token: Option<String>,
    pub timeouts: Timeouts,
    pub report_interval_ms: u64,
}

impl Config {
    /// Port announced to workers as `MQTT_BROKER_PORT`: they connect to the address they
    /// registered with, on this port (spec orchestrators.md §5.1).
    pub fn mqtt_port(&self) -> u16 {
        match &self.mqtt {
            Mqtt::Embedded { listen, .. } => listen.port(),
            Mqtt::External { port, .. } => *port,
        }
    }

    pub fn from_env() -> Result<Config, String> {
        Config::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let addr = |k: &str, default: &str| -> Result<SocketAddr, String> {
            let v = get(k).unwrap_or_else(|| default.into());
            // ":10100" means every interface, as in Go.
            let v = if v.starts_with(':') {
                format!("0.0.0.0{v}")
            } else {
                v
            };
            v.trim().parse().map_err(|_| {
                format!(
                    "{k}={v:?} is not host:port (e.g. 0.0.0.0:{})",
                    default.rsplit(':').next().unwrap_or("")
                )
            })
        };
        let ms = |k: &str, default: u64| -> Result<u64, String> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{k}={v:?} is not a positive number of milliseconds")),
            }
        };
        let tls = match (get("OAK_MQTT_CERT"), get("OAK_MQTT_KEY"), get("OAK_MQTT_CA")) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(Tls {
                cert: cert.into(),
                key: key.into(),
                ca: ca.into(),
            }),
            _ => {
                return Err("MQTT TLS needs all of OAK_MQTT_CERT, OAK_MQTT_KEY and OAK_MQTT_CA (server certificate, its key, and the CA of the workers' client certificates)".into())
            }
        };
        let mqtt = match get("OAK_MQTT_URL") {
            Some(url) => {
                let rest = url.strip_prefix("mqtt://").or_else(|| url.strip_prefix("tcp://")).ok_or_else(|| {
                    format!("OAK_MQTT_URL={url:?}: only mqtt://host:port is supported (the cluster's own connection is plain TCP; put the broker on a trusted network or use the embedded broker for TLS)")
                })?;
                let rest = rest.trim_end_matches('/');
                let (host, port) = match rest.rsplit_once(':') {
                    Some((h, p)) => (
                        h.trim_matches(|c| c == '[' || c == ']').to_string(),
                        p.parse::<u16>()
                            .map_err(|_| format!("OAK_MQTT_URL={url:?}: bad port"))?,
                    ),
                    None => (rest.to_string(), 1883),
                };
                if host.is_empty() {
                    return Err(format!("OAK_MQTT_URL={url:?}: no host"));
                }
                if tls.is_some() {
                    log::warn!("OAK_MQTT_CERT/KEY/CA configure the embedded broker and are ignored with OAK_MQTT_URL");
                }
                Mqtt::External { host, port }
            }
            None => Mqtt::Embedded {
                listen: addr("OAK_MQTT_ADDR", "0.0.0.0:10003")?,
                tls,
            },
        };
        let root_url = get("OAK_ROOT_URL").map(|u| u.trim().trim_end_matches('/').to_string());
        if let Some(u) = &root_url {
            if !u.starts_with("http://") {
                return Err(format!("OAK_ROOT_URL={u:?} must be http://host:port (https is not supported by the cluster's client yet; use a TLS proxy on the root side)"));
            }
        }
        let cluster_name = get("OAK_CLUSTER_NAME").unwrap_or_else(hostname);
        let timeouts = Timeouts {
            node_silence_ms: ms("OAK_NODE_TIMEOUT_MS", 30_000)?,
            resources_ms: ms("OAK_NODE_TIMEOUT_MS", 30_000)?,
            deploy_ms: ms("OAK_DEPLOY_TIMEOUT_MS", 180_000)?,
            ..Timeouts::default()
        };
        Ok(Config {
            api_addr: addr("OAK_CLUSTER_API_ADDR", "0.0.0.0:10100")?,
            mqtt,
            data_dir: PathBuf::from(
                get("OAK_DATA_DIR").unwrap_or_else(|| "/var/lib/orch-lite".into()),
            ),
            root_url,
            cluster_name,
            cluster_location: get("OAK_CLUSTER_LOCATION").unwrap_or_default(),
            advertise_addr: get("OAK_ADVERTISE_ADDR"),
            join_token: get("OAK_JOIN_TOKEN"),
            root_token: get("OAK_JOIN_TOKEN"),
            timeouts,
            report_interval_ms: ms("OAK_CLUSTER_REPORT_INTERVAL_MS", 15_000)?,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cluster".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.api_addr, "0.0.0.0:10100".parse().unwrap());
        assert_eq!(c.mqtt_port(), 10003);
        assert_eq!(c.timeouts.node_silence_ms, 30_000);
        let c = cfg(&[
            ("OAK_CLUSTER_API_ADDR", ":9100"),
            ("OAK_MQTT_URL", "mqtt://127.0.0.1:1884"),
            ("OAK_NODE_TIMEOUT_MS", "3000"),
        ])
        .unwrap();
        assert_eq!(c.api_addr.port(), 9100);
        assert!(matches!(c.mqtt, Mqtt::External { ref host, port: 1884 } if host == "127.0.0.1"));
        assert_eq!(c.timeouts.node_silence_ms, 3000);
    }

    #[test]
    fn errors_name_the_variable() {
        for (vars, needle) in [
            (vec![("OAK_MQTT_URL", "mqtts://x:1")], "OAK_MQTT_URL"),
            (vec![("OAK_NODE_TIMEOUT_MS", "soon")], "OAK_NODE_TIMEOUT_MS"),
            (vec![("OAK_MQTT_CERT", "/x")], "OAK_MQTT_KEY"),
            (vec![("OAK_ROOT_URL", "https://r")], "OAK_ROOT_URL"),
            (vec![("OAK_MQTT_ADDR", "nope")], "OAK_MQTT_ADDR"),
        ] {
            let err = cfg(&vars).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
