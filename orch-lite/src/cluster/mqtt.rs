//! The cluster's MQTT client: connects to the broker (embedded, over loopback, or external),
//! subscribes to the worker topics at QoS 1 on every connection (clean session), and feeds each
//! message to the handlers. Reconnects forever with a capped backoff; never exits on bad input.

use super::handlers;
use super::{now_ms, Shared};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::time::Duration;

pub const SUBSCRIPTIONS: [&str; 4] = [
    "nodes/+/information",
    "nodes/+/job",
    "nodes/+/jobs/resources",
    "nodes/+/net/#",
];

/// Bound of the client's request queue: publishes beyond it are dropped and counted, and the
/// instance timeouts retry whatever was lost.
pub const QUEUE: usize = 1024;

pub fn client(
    host: &str,
    port: u16,
    client_id: &str,
    max_payload: usize,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, host, port);
    // Upstream's cluster uses 5 s: a dead broker is noticed quickly.
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(true);
    opts.set_max_packet_size(max_payload + 1024, max_payload + 1024);
    let (client, mut events) = AsyncClient::new(opts, QUEUE);
    // Deploys and answers are small packets: without it, Nagle and delayed ACKs hold them ~40 ms.
    events.network_options.set_tcp_nodelay(true);
    (client, events)
}

pub async fn run(sh: Arc<Shared>, client: AsyncClient, mut events: EventLoop) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                log::info!("connected to the MQTT broker");
                sh.set_mqtt_connected(true);
                backoff = Duration::from_millis(200);
                for f in SUBSCRIPTIONS {
                    if let Err(e) = client.try_subscribe(f, QoS::AtLeastOnce) {
                        log::error!("cannot subscribe to {f}: {e}");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let handled = {
                    let mut st = sh.lock();
                    handlers::on_message(&mut st, &p.topic, &p.payload, now_ms())
                };
                sh.sink.dispatch(handled.effects);
                if let Some(net) = handled.net {
                    sh.sink.net(net);
                }
            }
            Ok(_) => {}
            Err(e) => {
                sh.set_mqtt_connected(false);
                log::warn!(
                    "MQTT connection: {e}; retrying in {} ms",
                    backoff.as_millis()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
