//! The NetManager's `/etc/netmanager/netcfg.json`, key for key as the stock NetManager reads it
//! (spec overlay-network §7). Ports are strings on the wire; accessors turn them into numbers
//! and fall back to upstream's defaults on a blank value.

use serde::{Deserialize, Serialize};

pub const DEFAULT_TUNNEL_PORT: u16 = 50103;
pub const DEFAULT_MQTT_PORT: u16 = 10003;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetCfg {
    #[serde(rename = "NodePublicAddress")]
    pub node_public_address: String,
    #[serde(rename = "NodePublicPort")]
    pub node_public_port: String,
    #[serde(rename = "ClusterUrl")]
    pub cluster_url: String,
    #[serde(rename = "ClusterMqttPort")]
    pub cluster_mqtt_port: String,
    #[serde(rename = "DefaultInterface")]
    pub default_interface: String,
    #[serde(rename = "Debug")]
    pub debug: bool,
    #[serde(rename = "PublicIPNetworking")]
    pub public_ip_networking: bool,
    #[serde(rename = "MqttCert")]
    pub mqtt_cert: String,
    #[serde(rename = "MqttKey")]
    pub mqtt_key: String,
}

impl Default for NetCfg {
    fn default() -> Self {
        NetCfg {
            node_public_address: "0.0.0.0".into(),
            node_public_port: DEFAULT_TUNNEL_PORT.to_string(),
            cluster_url: "0.0.0.0".into(),
            cluster_mqtt_port: DEFAULT_MQTT_PORT.to_string(),
            default_interface: String::new(),
            debug: false,
            public_ip_networking: false,
            mqtt_cert: String::new(),
            mqtt_key: String::new(),
        }
    }
}

#[derive(Debug)]
pub enum NetCfgError {
    Read(std::path::PathBuf, std::io::Error),
    Parse(std::path::PathBuf, serde_json::Error),
}

impl std::fmt::Display for NetCfgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetCfgError::Read(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            NetCfgError::Parse(p, e) => {
                write!(f, "{} is not a valid netcfg.json: {e}", p.display())
            }
        }
    }
}

impl std::error::Error for NetCfgError {}

impl NetCfg {
    /// A missing file means defaults, as upstream's installer would have written them.
    pub fn load(path: &std::path::Path) -> Result<NetCfg, NetCfgError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| NetCfgError::Parse(path.into(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NetCfg::default()),
            Err(e) => Err(NetCfgError::Read(path.into(), e)),
        }
    }

    /// Port advertised to peers (`NodePublicPort`); upstream also listens on it by default.
    pub fn tunnel_port(&self) -> u16 {
        self.node_public_port
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .unwrap_or(DEFAULT_TUNNEL_PORT)
    }

    /// `None` means auto-detect (upstream's `0.0.0.0`).
    pub fn public_address(&self) -> Option<String> {
        let a = self.node_public_address.trim();
        (!a.is_empty() && a != "0.0.0.0").then(|| a.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_parses() {
        let shipped = r#"{"NodePublicAddress":"0.0.0.0","NodePublicPort":"50103","ClusterUrl":"0.0.0.0",
            "ClusterMqttPort":"10003","DefaultInterface":"","Debug":false,"PublicIPNetworking":false,
            "MqttCert":"","MqttKey":""}"#;
        let cfg: NetCfg = serde_json::from_str(shipped).unwrap();
        assert_eq!(cfg, NetCfg::default());
        assert_eq!(cfg.tunnel_port(), 50103);
        assert_eq!(cfg.public_address(), None);
    }

    #[test]
    fn explicit_values_win_and_bad_ports_fall_back() {
        let cfg: NetCfg =
            serde_json::from_str(r#"{"NodePublicAddress":"192.168.1.20","NodePublicPort":"x"}"#)
                .unwrap();
        assert_eq!(cfg.public_address().as_deref(), Some("192.168.1.20"));
        assert_eq!(cfg.tunnel_port(), DEFAULT_TUNNEL_PORT);
    }
}
