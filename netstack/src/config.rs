//! The NetManager's `/etc/netmanager/netcfg.json`, key for key as the stock NetManager reads it
//! (spec overlay-network §7). Ports are strings on the wire; accessors turn them into numbers
//! and fall back to upstream's defaults on a blank value.
//!
//! Two keys are ours, `Tables` and `BusyPollMicros`: a stock NetManager ignores keys it does
//! not know, so one file serves both. They size and tune our data plane, which upstream's does
//! not need (its maps grow without bound).

use crate::proxy::Capacity;
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
    #[serde(rename = "Tables")]
    pub tables: Tables,
    /// How long the data plane keeps polling after it moved a packet instead of sleeping
    /// (`DataplaneConfig::busy_poll_us`); 0 sleeps at once.
    #[serde(rename = "BusyPollMicros")]
    pub busy_poll_us: u32,
}

/// Sizes of the data plane's fixed tables (our key `Tables`). Their memory is taken once at
/// start, so each size is bounded; a misspelt key is an error rather than a size silently
/// left at its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tables {
    /// Local and remote service instances known by InstanceIP.
    #[serde(rename = "Instances")]
    pub instances: usize,
    /// Service IPs (round robin and closest addresses).
    #[serde(rename = "Services")]
    pub services: usize,
    /// Jobs with a table entry or an interest registration.
    #[serde(rename = "Jobs")]
    pub jobs: usize,
    /// Workers this one tunnels to.
    #[serde(rename = "Peers")]
    pub peers: usize,
    /// Translated connections (the conversion cache).
    #[serde(rename = "Flows")]
    pub flows: usize,
    /// Fragmented datagrams whose later fragments are still expected.
    #[serde(rename = "Fragments")]
    pub fragments: usize,
    /// Packets held while a table query is in flight (1,500 bytes each).
    #[serde(rename = "ParkedPackets")]
    pub parked_packets: usize,
}

/// `BusyPollMicros` at most: spinning longer than a scheduler tick only burns the CPU.
pub const MAX_BUSY_POLL_US: u32 = 10_000;

impl Default for Tables {
    fn default() -> Self {
        let c = Capacity::default();
        Tables {
            instances: c.instances,
            services: c.services,
            jobs: c.jobs,
            peers: c.peers,
            flows: c.flows,
            fragments: c.fragments,
            parked_packets: c.park_slots,
        }
    }
}

impl Tables {
    /// Each size with its key and its largest value: far above any worker's needs, low
    /// enough that a stray digit cannot take the device's memory.
    fn sizes(&self) -> [(&'static str, usize, usize); 7] {
        [
            ("Instances", self.instances, 1 << 16),
            ("Services", self.services, 1 << 16),
            ("Jobs", self.jobs, 1 << 16),
            ("Peers", self.peers, 1 << 16),
            ("Flows", self.flows, 1 << 20),
            ("Fragments", self.fragments, 1 << 16),
            ("ParkedPackets", self.parked_packets, 1 << 12),
        ]
    }

    /// The first size out of its range, as a message naming the key.
    pub fn check(&self) -> Result<(), String> {
        for (key, v, max) in self.sizes() {
            if !(1..=max).contains(&v) {
                return Err(format!("Tables.{key} is {v}: expected 1 to {max}"));
            }
        }
        Ok(())
    }

    /// The engine's capacities; the park limits per destination and per slot keep their
    /// defaults (one destination may hold at most the whole lot).
    pub fn capacity(&self) -> Capacity {
        let d = Capacity::default();
        Capacity {
            instances: self.instances,
            services: self.services,
            jobs: self.jobs,
            peers: self.peers,
            flows: self.flows,
            fragments: self.fragments,
            park_slots: self.parked_packets,
            park_per_destination: d.park_per_destination.min(self.parked_packets),
            park_slot_bytes: d.park_slot_bytes,
        }
    }
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
            tables: Tables::default(),
            busy_poll_us: 0,
        }
    }
}

#[derive(Debug)]
pub enum NetCfgError {
    Read(std::path::PathBuf, std::io::Error),
    Parse(std::path::PathBuf, serde_json::Error),
    Invalid(std::path::PathBuf, String),
}

impl std::fmt::Display for NetCfgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetCfgError::Read(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            NetCfgError::Parse(p, e) => {
                write!(f, "{} is not a valid netcfg.json: {e}", p.display())
            }
            NetCfgError::Invalid(p, why) => write!(f, "{}: {why}", p.display()),
        }
    }
}

impl std::error::Error for NetCfgError {}

impl NetCfg {
    /// A missing file means defaults, as upstream's installer would have written them.
    pub fn load(path: &std::path::Path) -> Result<NetCfg, NetCfgError> {
        let cfg: NetCfg = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| NetCfgError::Parse(path.into(), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(NetCfg::default()),
            Err(e) => return Err(NetCfgError::Read(path.into(), e)),
        };
        cfg.check()
            .map_err(|why| NetCfgError::Invalid(path.into(), why))?;
        Ok(cfg)
    }

    /// Our keys within their ranges (upstream's keys are read leniently, as upstream does).
    pub fn check(&self) -> Result<(), String> {
        self.tables.check()?;
        if self.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(format!(
                "BusyPollMicros is {}: expected 0 to {MAX_BUSY_POLL_US}",
                self.busy_poll_us
            ));
        }
        Ok(())
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

    #[test]
    fn table_sizes_and_busy_poll_are_read_and_bounded() {
        let cfg: NetCfg = serde_json::from_str(
            r#"{"ClusterUrl":"10.0.0.1","Tables":{"Flows":100,"ParkedPackets":4},"BusyPollMicros":50}"#,
        )
        .unwrap();
        assert_eq!(cfg.check(), Ok(()));
        assert_eq!(cfg.busy_poll_us, 50);
        let c = cfg.tables.capacity();
        assert_eq!((c.flows, c.park_slots, c.park_per_destination), (100, 4, 4));
        assert_eq!(c.instances, Capacity::default().instances);

        let zero: NetCfg = serde_json::from_str(r#"{"Tables":{"Peers":0}}"#).unwrap();
        assert_eq!(
            zero.check(),
            Err("Tables.Peers is 0: expected 1 to 65536".to_string())
        );
        let huge: NetCfg = serde_json::from_str(r#"{"Tables":{"Flows":2000000}}"#).unwrap();
        assert!(huge
            .check()
            .unwrap_err()
            .starts_with("Tables.Flows is 2000000"));
        let spin: NetCfg = serde_json::from_str(r#"{"BusyPollMicros":20000}"#).unwrap();
        assert!(spin
            .check()
            .unwrap_err()
            .starts_with("BusyPollMicros is 20000"));

        let typo = serde_json::from_str::<NetCfg>(r#"{"Tables":{"Flow":10}}"#).unwrap_err();
        assert!(typo.to_string().contains("unknown field `Flow`"), "{typo}");
        let negative = serde_json::from_str::<NetCfg>(r#"{"Tables":{"Jobs":-1}}"#);
        assert!(negative.is_err());
    }

    #[test]
    fn load_reports_the_file_and_the_key() {
        let dir = std::env::temp_dir().join(format!("oak-netcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("netcfg.json");
        std::fs::write(&path, r#"{"Tables":{"Services":0}}"#).unwrap();
        let e = NetCfg::load(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: Tables.Services is 0: expected 1 to 65536",
                path.display()
            )
        );
        assert_eq!(
            NetCfg::load(&dir.join("absent.json")).unwrap(),
            NetCfg::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
