//! The cluster's MQTT client: connects to the broker (embedded, over loopback, or external),
//! subscribes to the worker topics at QoS 1 on every connection (a session kept across
//! reconnects with the embedded broker, clean with an external one), and feeds each
//! message to the handlers. Reconnects forever with a capped backoff; never exits on bad input.
//! The state hears of every loss and return of the connection, so worker liveness is not judged
//! while the cluster itself cannot hear the workers.

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

/// `persistent`: keep the session (subscriptions and the QoS 1 messages published meanwhile)
/// across reconnects. Used with the embedded broker, which lives exactly as long as this
/// process: after a stall (SIGSTOP, a starved host) the broker drops our connection on resume,
/// and with a clean session the workers' reports sent before we resubscribe (a DEAD queued
/// during the outage) were lost. An external broker would keep a per-process session after
/// we exit, so there the session stays clean.
pub fn client(
    host: &str,
    port: u16,
    client_id: &str,
    max_payload: usize,
    persistent: bool,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, host, port);
    // Upstream's cluster uses 5 s: a dead broker is noticed quickly.
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(!persistent);
    opts.set_max_packet_size(max_payload + 1024, max_payload + 1024);
    let (client, mut events) = AsyncClient::new(opts, QUEUE);
    // Deploys and answers are small packets: without it, Nagle and delayed ACKs hold them ~40 ms.
    events.network_options.set_tcp_nodelay(true);
    (client, events)
}

/// One SUBSCRIBE for all filters, so its single SUBACK says every worker topic is in place.
fn subscribe(client: &AsyncClient) {
    let filters = SUBSCRIPTIONS
        .iter()
        .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
    if let Err(e) = client.try_subscribe_many(filters) {
        log::error!("cannot subscribe to the worker topics: {e}");
    }
}

pub async fn run(sh: Arc<Shared>, client: AsyncClient, mut events: EventLoop) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                log::info!("connected to the MQTT broker");
                sh.lock().broker_up(now_ms());
                backoff = Duration::from_millis(200);
                subscribe(&client);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                // Only now can a worker's first request (its subnet) reach us: registrations
                // are refused until here so that request is not lost (see api::register).
                log::info!("subscribed to the worker topics");
                sh.set_mqtt_connected(true);
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
                sh.lock().broker_down(now_ms());
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
