//! The worker's configuration: Oakestra's `/etc/oakestra/conf.json` (kept byte-compatible with
//! the Go NodeEngine, misspelled keys included), overridden by `OAK_*` environment variables and
//! then by `-a`/`-p` on the command line. Pure: reading and writing files is done by the caller
//! through [`ConfFile::load`] / [`ConfFile::save`]; [`Settings::resolve`] takes the environment
//! as a function so tests do not touch the process environment.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CLUSTER_PORT: u16 = 10100;
pub const DEFAULT_CONFIG_DIR: &str = "/etc/oakestra";
pub const DEFAULT_NETCFG: &str = "/etc/netmanager/netcfg.json";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/oakestra";
pub const DEFAULT_CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_CONTAINERD_NAMESPACE: &str = "oakestra";
pub const DEFAULT_STATUS_ADDR: &str = "127.0.0.1:10190";
pub const DEFAULT_REPORT_INTERVAL_MS: u64 = 2000;
pub const DEFAULT_NETMANAGER_SOCKET: &str = "/etc/netmanager/netmanager.sock";
pub const CONF_FILE_NAME: &str = "conf.json";

/// Upstream's conf.json, field for field (spec worker-protocol §8.3). Unknown keys are ignored
/// and missing keys take upstream's defaults, so files written by the Go CLI load unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfFile {
    pub conf_version: String,
    pub cluster_address: String,
    pub cluster_ssl: bool,
    pub cluster_port: u16,
    pub app_logs: String,
    /// `default` = overlay on (auto), `custom:<socket>` = manual, anything else = off.
    pub overlay_network: String,
    pub public_ip: bool,
    pub overlay_network_port: u16,
    pub mqtt_cert_file: String,
    pub mqtt_key_file: String,
    pub addons: Option<Vec<Addon>>,
    pub virtualizations: Vec<Virtualization>,
    pub csi_drivers: Option<Vec<CsiDriver>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Addon {
    pub addon_name: String,
    #[serde(default)]
    pub addon_active: bool,
    #[serde(default)]
    pub addon_config: Vec<String>,
}

/// The key spelling is upstream's wire format (`virutalizaiton_*`), not a typo of ours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Virtualization {
    #[serde(rename = "virutalizaiton_name")]
    pub name: String,
    #[serde(rename = "virutalizaiton_runtime")]
    pub runtime: String,
    #[serde(rename = "virutalizaiton_active", default)]
    pub active: bool,
    #[serde(rename = "virutalizaiton_config", default)]
    pub config: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CsiDriver {
    pub csi_driver_name: String,
    pub csi_driver_endpoint: String,
}

impl Default for ConfFile {
    fn default() -> Self {
        ConfFile {
            conf_version: "1.0".into(),
            cluster_address: "0.0.0.0".into(),
            cluster_ssl: false,
            cluster_port: DEFAULT_CLUSTER_PORT,
            app_logs: "/tmp".into(),
            overlay_network: "default".into(),
            public_ip: false,
            overlay_network_port: 0,
            mqtt_cert_file: String::new(),
            mqtt_key_file: String::new(),
            addons: None,
            virtualizations: vec![Virtualization {
                name: "containerd".into(),
                runtime: "docker".into(),
                active: true,
                config: Vec::new(),
            }],
            csi_drivers: None,
        }
    }
}

#[derive(Debug)]
pub enum ConfigError {
    Read(PathBuf, std::io::Error),
    Parse(PathBuf, serde_json::Error),
    Write(PathBuf, std::io::Error),
    Invalid {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            ConfigError::Parse(p, e) => write!(
                f,
                "{} is not valid JSON ({e}); fix it or reset it with `NodeEngine config default`",
                p.display()
            ),
            ConfigError::Write(p, e) => write!(f, "cannot write {}: {e}", p.display()),
            ConfigError::Invalid { key, value, why } => write!(f, "{key}={value:?}: {why}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfFile {
    /// Loads the file; a missing file is the default config (it is not created here). Unlike
    /// upstream, a broken file is reported and left alone, never wiped.
    pub fn load(path: &Path) -> Result<ConfFile, ConfigError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| ConfigError::Parse(path.into(), e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfFile::default()),
            Err(e) => Err(ConfigError::Read(path.into(), e)),
        }
    }

    /// Writes compact JSON like Go's `json.Marshal`, atomically (temp file + rename) so a crash
    /// never leaves a half-written config.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let werr = |e| ConfigError::Write(path.into(), e);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(werr)?;
        }
        let bytes = serde_json::to_vec(self).expect("ConfFile serialises: plain data, string keys");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(werr)
    }

    pub fn network_mode(&self) -> NetworkMode {
        match self.overlay_network.as_str() {
            "default" => NetworkMode::Auto,
            s => match s.strip_prefix("custom:") {
                Some(sock) if !sock.is_empty() => NetworkMode::Manual(sock.into()),
                _ => NetworkMode::Off,
            },
        }
    }

    pub fn set_network_mode(&mut self, mode: &NetworkMode) {
        self.overlay_network = match mode {
            NetworkMode::Auto => "default".into(),
            NetworkMode::Manual(sock) => format!("custom:{}", sock.display()),
            NetworkMode::Off => String::new(),
        };
    }

    /// Upserts a runtime entry, as `config virtualization <name> on|off` does upstream.
    pub fn set_virtualization(&mut self, name: &str, runtime: &str, active: bool) {
        match self
            .virtualizations
            .iter_mut()
            .find(|v| v.runtime == runtime)
        {
            Some(v) => v.active = active,
            None => self.virtualizations.push(Virtualization {
                name: name.into(),
                runtime: runtime.into(),
                active,
                config: Vec::new(),
            }),
        }
    }

    pub fn set_addon(&mut self, name: &str, active: bool) {
        let addons = self.addons.get_or_insert_with(Vec::new);
        match addons.iter_mut().find(|a| a.addon_name == name) {
            Some(a) => a.addon_active = active,
            None => addons.push(Addon {
                addon_name: name.into(),
                addon_active: active,
                addon_config: Vec::new(),
            }),
        }
    }
}

/// How the overlay is run: inside this process (`auto`), by a separate `NetManager` reached
/// over its unix socket (`manual`), or not at all (`off`: containers get loopback only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    Auto,
    Manual(PathBuf),
    Off,
}

impl NetworkMode {
    fn parse(s: &str) -> Option<NetworkMode> {
        match s {
            "auto" | "default" => Some(NetworkMode::Auto),
            "off" | "disabled" | "" => Some(NetworkMode::Off),
            "manual" => Some(NetworkMode::Manual(DEFAULT_NETMANAGER_SOCKET.into())),
            s => s
                .strip_prefix("manual:")
                .filter(|p| !p.is_empty())
                .map(|p| NetworkMode::Manual(p.into())),
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkMode::Auto => f.write_str("auto"),
            NetworkMode::Manual(p) => write!(f, "manual:{}", p.display()),
            NetworkMode::Off => f.write_str("off"),
        }
    }
}

/// Where the config files live; resolved first because the files feed [`Settings::resolve`].
#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    pub config_dir: PathBuf,
    pub netcfg: PathBuf,
}

impl Paths {
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Paths {
        Paths {
            config_dir: env("OAK_CONFIG_DIR")
                .unwrap_or_else(|| DEFAULT_CONFIG_DIR.into())
                .into(),
            netcfg: env("OAK_NETCFG")
                .unwrap_or_else(|| DEFAULT_NETCFG.into())
                .into(),
        }
    }

    pub fn conf_file(&self) -> PathBuf {
        self.config_dir.join(CONF_FILE_NAME)
    }
}

/// Everything the daemon needs, after files, environment and command line are merged
/// (command line > environment > files > defaults).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub cluster_address: String,
    pub cluster_port: u16,
    pub cluster_ssl: bool,
    pub node_name: String,
    pub config_dir: PathBuf,
    pub netcfg: PathBuf,
    pub state_dir: PathBuf,
    pub containerd_socket: PathBuf,
    pub containerd_namespace: String,
    pub app_logs: PathBuf,
    pub insecure_registries: Vec<String>,
    #[serde(serialize_with = "display")]
    pub network: NetworkMode,
    pub status_addr: SocketAddr,
    #[serde(serialize_with = "millis")]
    pub report_interval: Duration,
    pub mqtt_cert: Option<PathBuf>,
    pub mqtt_key: Option<PathBuf>,
    pub mqtt_ca: Option<PathBuf>,
    /// Extra CA for the HTTPS registration (`cluster_ssl`); `mqtt_ca` serves when unset.
    pub cluster_ca: Option<PathBuf>,
    pub tunnel_port: u16,
    pub public_address: Option<String>,
    /// netcfg.json `Tables` and `BusyPollMicros` (checked when the file was loaded).
    pub overlay_tables: netstack::config::Tables,
    pub overlay_busy_poll_us: u32,
    /// Never printed: `config show` and `/status` must not leak it.
    #[serde(skip)]
    pub join_token: Option<String>,
    pub public_ip: bool,
    pub virtualizations: Vec<String>,
    pub addons: Vec<String>,
}

fn display<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// Command-line overrides (`-a`, `-p`), which win over everything else.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub cluster_address: Option<String>,
    pub cluster_port: Option<u16>,
}

impl Settings {
    pub fn resolve(
        paths: &Paths,
        conf: &ConfFile,
        netcfg: &netstack::config::NetCfg,
        env: &dyn Fn(&str) -> Option<String>,
        cli: &Overrides,
        hostname: &str,
    ) -> Result<Settings, ConfigError> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let cluster_address = cli
            .cluster_address
            .clone()
            .or_else(|| env("OAK_CLUSTER_ADDRESS"))
            .unwrap_or_else(|| conf.cluster_address.clone());
        let cluster_port = match (cli.cluster_port, env("OAK_CLUSTER_PORT")) {
            (Some(p), _) => p,
            (None, Some(v)) => parse_port("OAK_CLUSTER_PORT", &v)?,
            (None, None) => conf.cluster_port,
        };
        let network = match env("OAK_NETWORK") {
            Some(v) => NetworkMode::parse(&v).ok_or(ConfigError::Invalid {
                key: "OAK_NETWORK",
                value: v,
                why: "expected auto, manual, manual:<socket> or off",
            })?,
            None => conf.network_mode(),
        };
        let status_addr = env("OAK_STATUS_ADDR").unwrap_or_else(|| DEFAULT_STATUS_ADDR.into());
        let status_addr = status_addr.parse().map_err(|_| ConfigError::Invalid {
            key: "OAK_STATUS_ADDR",
            value: status_addr.clone(),
            why: "expected ip:port, e.g. 127.0.0.1:10190",
        })?;
        let report_interval = match env("OAK_REPORT_INTERVAL_MS") {
            Some(v) => match v.parse::<u64>() {
                Ok(ms) if (100..=30_000).contains(&ms) => Duration::from_millis(ms),
                _ => {
                    return Err(ConfigError::Invalid {
                        key: "OAK_REPORT_INTERVAL_MS",
                        value: v,
                        why: "expected milliseconds between 100 and 30000 (the cluster drops nodes silent for 30 s)",
                    })
                }
            },
            None => Duration::from_millis(DEFAULT_REPORT_INTERVAL_MS),
        };
        let tunnel_port = match env("OAK_TUNNEL_PORT") {
            Some(v) => parse_port("OAK_TUNNEL_PORT", &v)?,
            None => netcfg.tunnel_port(),
        };
        let nonempty = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        let public_address = env("OAK_PUBLIC_ADDRESS").or_else(|| netcfg.public_address());
        Ok(Settings {
            cluster_address,
            cluster_port,
            cluster_ssl: conf.cluster_ssl,
            node_name: env("OAK_NODE_NAME").unwrap_or_else(|| hostname.to_string()),
            config_dir: paths.config_dir.clone(),
            netcfg: paths.netcfg.clone(),
            state_dir: env("OAK_STATE_DIR")
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
                .into(),
            containerd_socket: env("OAK_CONTAINERD_SOCKET")
                .unwrap_or_else(|| DEFAULT_CONTAINERD_SOCKET.into())
                .into(),
            containerd_namespace: env("OAK_CONTAINERD_NAMESPACE")
                .unwrap_or_else(|| DEFAULT_CONTAINERD_NAMESPACE.into()),
            app_logs: env("OAK_APP_LOGS")
                .unwrap_or_else(|| conf.app_logs.clone())
                .into(),
            insecure_registries: env("OAK_INSECURE_REGISTRIES")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            network,
            status_addr,
            report_interval,
            mqtt_cert: env("OAK_MQTT_CERT")
                .map(PathBuf::from)
                .or_else(|| nonempty(&conf.mqtt_cert_file)),
            mqtt_key: env("OAK_MQTT_KEY")
                .map(PathBuf::from)
                .or_else(|| nonempty(&conf.mqtt_key_file)),
            mqtt_ca: env("OAK_MQTT_CA").map(PathBuf::from),
            cluster_ca: env("OAK_CLUSTER_CA").map(PathBuf::from),
            tunnel_port,
            public_address,
            overlay_tables: netcfg.tables,
            overlay_busy_poll_us: netcfg.busy_poll_us,
            join_token: env("OAK_JOIN_TOKEN"),
            public_ip: conf.public_ip,
            virtualizations: conf
                .virtualizations
                .iter()
                .filter(|v| v.active)
                .map(|v| v.runtime.clone())
                .collect(),
            addons: conf
                .addons
                .iter()
                .flatten()
                .filter(|a| a.addon_active)
                .map(|a| a.addon_name.clone())
                .collect(),
        })
    }
}

fn parse_port(key: &'static str, v: &str) -> Result<u16, ConfigError> {
    match v.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ConfigError::Invalid {
            key,
            value: v.into(),
            why: "expected a port number 1-65535",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn resolve(
        conf: &ConfFile,
        env: &[(&str, &str)],
        cli: Overrides,
    ) -> Result<Settings, ConfigError> {
        let env = env_of(env);
        let paths = Paths::from_env(&env);
        Settings::resolve(&paths, conf, &Default::default(), &env, &cli, "pi-1")
    }

    #[test]
    fn upstream_default_file_loads_and_round_trips() {
        // The exact default conf.json the Go CLI writes (spec worker-protocol §8.3).
        let upstream = r#"{"conf_version":"1.0","cluster_address":"0.0.0.0","cluster_ssl":false,"cluster_port":10100,"app_logs":"/tmp","overlay_network":"default","public_ip":false,"overlay_network_port":0,"mqtt_cert_file":"","mqtt_key_file":"","addons":null,"virtualizations":[{"virutalizaiton_name":"containerd","virutalizaiton_runtime":"docker","virutalizaiton_active":true,"virutalizaiton_config":[]}],"csi_drivers":null}"#;
        let conf: ConfFile = serde_json::from_str(upstream).unwrap();
        assert_eq!(conf, ConfFile::default());
        assert_eq!(serde_json::to_string(&conf).unwrap(), upstream);
    }

    #[test]
    fn partial_and_extended_files_load() {
        let conf: ConfFile =
            serde_json::from_str(r#"{"cluster_address":"10.0.0.1","future_key":[1]}"#).unwrap();
        assert_eq!(conf.cluster_address, "10.0.0.1");
        assert_eq!(conf.cluster_port, DEFAULT_CLUSTER_PORT);
        assert_eq!(conf.virtualizations.len(), 1);
    }

    #[test]
    fn broken_file_is_an_error_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("oak-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("conf.json");
        std::fs::write(&path, b"{\"cluster_port\": \"not a number\"").unwrap();
        let err = ConfFile::load(&path).unwrap_err();
        assert!(err.to_string().contains("config default"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"cluster_port\": \"not a number\""
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_then_load_is_identity() {
        let dir = std::env::temp_dir().join(format!("oak-conf-rt-{}", std::process::id()));
        let path = dir.join("sub/conf.json");
        let mut conf = ConfFile {
            cluster_address: "192.168.1.10".into(),
            cluster_port: 10200,
            ..Default::default()
        };
        conf.set_network_mode(&NetworkMode::Manual("/run/nm.sock".into()));
        conf.set_addon("image-builder", true);
        conf.set_virtualization("unikraft", "unikernel", true);
        conf.save(&path).unwrap();
        assert_eq!(ConfFile::load(&path).unwrap(), conf);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_default() {
        assert_eq!(
            ConfFile::load(Path::new("/nonexistent/oak/conf.json")).unwrap(),
            ConfFile::default()
        );
    }

    #[test]
    fn precedence_cli_over_env_over_file() {
        let conf = ConfFile {
            cluster_address: "file".into(),
            cluster_port: 1111,
            ..Default::default()
        };
        let s = resolve(&conf, &[], Overrides::default()).unwrap();
        assert_eq!((s.cluster_address.as_str(), s.cluster_port), ("file", 1111));
        let env = [("OAK_CLUSTER_ADDRESS", "env"), ("OAK_CLUSTER_PORT", "2222")];
        let s = resolve(&conf, &env, Overrides::default()).unwrap();
        assert_eq!((s.cluster_address.as_str(), s.cluster_port), ("env", 2222));
        let cli = Overrides {
            cluster_address: Some("cli".into()),
            cluster_port: Some(3333),
        };
        let s = resolve(&conf, &env, cli).unwrap();
        assert_eq!((s.cluster_address.as_str(), s.cluster_port), ("cli", 3333));
    }

    #[test]
    fn defaults_match_the_interface_contract() {
        let s = resolve(&ConfFile::default(), &[], Overrides::default()).unwrap();
        assert_eq!(s.node_name, "pi-1");
        assert_eq!(s.config_dir, Path::new("/etc/oakestra"));
        assert_eq!(s.netcfg, Path::new("/etc/netmanager/netcfg.json"));
        assert_eq!(s.state_dir, Path::new("/var/lib/oakestra"));
        assert_eq!(
            s.containerd_socket,
            Path::new("/run/containerd/containerd.sock")
        );
        assert_eq!(s.containerd_namespace, "oakestra");
        assert_eq!(s.status_addr.to_string(), "127.0.0.1:10190");
        assert_eq!(s.report_interval, Duration::from_millis(2000));
        assert_eq!(s.tunnel_port, 50103);
        assert_eq!(s.network, NetworkMode::Auto);
        assert_eq!(s.virtualizations, vec!["docker".to_string()]);
        assert!(s.insecure_registries.is_empty() && s.join_token.is_none());
    }

    #[test]
    fn env_values_are_parsed_and_validated() {
        let env = [
            ("OAK_NODE_NAME", "edge-7"),
            ("OAK_INSECURE_REGISTRIES", "127.0.0.1:5000, reg.lan:5000,"),
            ("OAK_NETWORK", "manual:/tmp/nm.sock"),
            ("OAK_REPORT_INTERVAL_MS", "500"),
            ("OAK_JOIN_TOKEN", "s3cret"),
        ];
        let s = resolve(&ConfFile::default(), &env, Overrides::default()).unwrap();
        assert_eq!(s.node_name, "edge-7");
        assert_eq!(
            s.insecure_registries,
            vec!["127.0.0.1:5000", "reg.lan:5000"]
        );
        assert_eq!(s.network, NetworkMode::Manual("/tmp/nm.sock".into()));
        assert_eq!(s.report_interval, Duration::from_millis(500));
        assert!(
            !serde_json::to_string(&s).unwrap().contains("s3cret"),
            "token must not be printed"
        );

        for (k, v) in [
            ("OAK_CLUSTER_PORT", "70000"),
            ("OAK_NETWORK", "sometimes"),
            ("OAK_STATUS_ADDR", "localhost"),
            ("OAK_REPORT_INTERVAL_MS", "0"),
        ] {
            let err = resolve(&ConfFile::default(), &[(k, v)], Overrides::default()).unwrap_err();
            assert!(err.to_string().starts_with(k), "{err}");
        }
    }

    #[test]
    fn network_mode_spellings() {
        let mut conf = ConfFile::default();
        for (mode, stored) in [
            (NetworkMode::Auto, "default"),
            (NetworkMode::Manual("/x.sock".into()), "custom:/x.sock"),
            (NetworkMode::Off, ""),
        ] {
            conf.set_network_mode(&mode);
            assert_eq!(conf.overlay_network, stored);
            assert_eq!(conf.network_mode(), mode);
        }
        conf.overlay_network = "disabled".into();
        assert_eq!(conf.network_mode(), NetworkMode::Off);
    }
}
