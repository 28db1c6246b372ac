//! The embedded MQTT broker: `rumqttd` (MQTT 3.1.1; wildcards, QoS 0/1, keepalive, client-id
//! takeover, optional TLS that then requires client certificates) on its own threads. This module
//! only turns our settings into rumqttd's and starts it; the cluster talks to it as an ordinary
//! MQTT client, exactly as it talks to an external broker.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

/// Server certificate, key, and the CA that client certificates must chain to (PEM files).
#[derive(Debug, Clone, PartialEq)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    /// Where workers connect (`OAK_MQTT_ADDR`).
    pub listen: SocketAddr,
    pub tls: Option<Tls>,
    /// Largest accepted publish; deploy messages carry whole job documents.
    pub max_payload: usize,
}

/// A started broker: where the cluster's own client should connect (plain TCP on loopback).
#[derive(Debug, Clone, Copy)]
pub struct Broker {
    pub local: SocketAddr,
}

/// 10,000 workers (the scale goal) plus the cluster's own client and a few tools
/// (mosquitto_sub, the overlay's directory clients) beside them. rumqttd reserves its tables
/// for this many up front but touches only what connects.
const MAX_CONNECTIONS: usize = 10_000 + 64;

fn connections(max_payload: usize) -> rumqttd::ConnectionSettings {
    rumqttd::ConnectionSettings {
        // Time a new TCP connection has to send CONNECT.
        connection_timeout_ms: 10_000,
        max_payload_size: max_payload,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        // Create a topic's log on first publish even if nobody subscribed yet.
        dynamic_filters: true,
    }
}

/// Checks that `addr` can be bound, so a port conflict is reported here with advice instead of
/// a silent failure inside the broker thread (which only logs). The port is released again.
fn probe(addr: SocketAddr, what: &str) -> Result<SocketAddr, String> {
    let l = TcpListener::bind(addr).map_err(|e| {
        format!("MQTT broker: cannot listen on {addr} ({e}); free the port, set {what} to another address, or use an external broker with OAK_MQTT_URL")
    })?;
    l.local_addr().map_err(|e| format!("MQTT broker: {e}"))
}

pub fn start(cfg: &BrokerConfig) -> Result<Broker, String> {
    let listen = probe(cfg.listen, "OAK_MQTT_ADDR")?;
    let mut v4 = HashMap::new();
    let tls = match &cfg.tls {
        Some(t) => {
            for p in [&t.cert, &t.key, &t.ca] {
                if !p.exists() {
                    return Err(format!(
                        "MQTT broker TLS: {} does not exist (OAK_MQTT_CERT, OAK_MQTT_KEY, OAK_MQTT_CA)",
                        p.display()
                    ));
                }
            }
            Some(rumqttd::TlsConfig::Rustls {
                capath: Some(t.ca.display().to_string()),
                certpath: t.cert.display().to_string(),
                keypath: t.key.display().to_string(),
            })
        }
        None => None,
    };
    let with_tls = tls.is_some();
    v4.insert(
        "workers".to_string(),
        rumqttd::ServerSettings {
            name: "mqtt-workers".into(),
            listen,
            tls,
            next_connection_delay_ms: 0,
            connections: connections(cfg.max_payload),
        },
    );
    // With TLS (client certificates required), the cluster's own client gets a plain listener
    // on loopback instead of a certificate of its own.
    let local = if with_tls {
        let local = probe(SocketAddr::from(([127, 0, 0, 1], 0)), "OAK_MQTT_ADDR")?;
        v4.insert(
            "local".to_string(),
            rumqttd::ServerSettings {
                name: "mqtt-local".into(),
                listen: local,
                tls: None,
                next_connection_delay_ms: 0,
                connections: connections(cfg.max_payload),
            },
        );
        local
    } else if listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: 200,
            // Each subscription filter keeps at most 2 segments of 1 MiB: memory stays bounded
            // however chatty the workers are.
            max_segment_size: cfg.max_payload.max(1 << 20),
            max_segment_count: 2,
            ..Default::default()
        },
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                log::error!("MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| format!("MQTT broker: cannot start thread: {e}"))?;
    log::info!(
        "embedded MQTT broker on {listen}{}",
        if with_tls {
            " (TLS, client certificates required)"
        } else {
            ""
        }
    );
    Ok(Broker { local })
}
