//! The session library with the test standing in the runtime's place (the runtime boundary),
//! against a real mosquitto: instance status changes that happen while the broker is down are
//! queued (latest per instance, in order) and delivered after the reconnect.

mod session_support;

use std::sync::Arc;
use std::time::Duration;

use session_support::*;
use worker::protocol::Status;
use worker::runtime_link::{self, StatusChange};
use worker::session;
use worker::telemetry::Telemetry;

const S: Duration = Duration::from_secs(1);

fn change(job: &str, instance: u64, status: Status, detail: &str) -> runtime_link::Event {
    runtime_link::Event::Status(StatusChange {
        job_name: job.into(),
        instance,
        status,
        detail: detail.into(),
    })
}

#[test]
fn status_changes_during_an_outage_are_delivered_after_reconnect() {
    let dir = TempDir::new("lib-outage");
    let mut broker = Mosquitto::start_persistent(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let standin = StandIn::start(NODE_ID, broker.port, None);
    let mut obs = Observer::connect(broker.port, "observer", false);
    obs.subscribe(&format!("nodes/{NODE_ID}/job"));

    let mut cfg = session::Config::new("127.0.0.1", standin.port, "lib-test");
    cfg.report_interval = Duration::from_millis(200);
    cfg.mqtt_reconnect_max = S;
    let tel = Telemetry::new("lib-test", "stand-in");
    let (session_side, runtime_side) = runtime_link::link(16);
    let events = runtime_side.events.clone();
    // The runtime's side of the boundary: answer samples, remember deploys.
    let runtime_thread = std::thread::spawn(move || {
        while let Ok(cmd) = runtime_side.commands.recv_blocking() {
            if cmd == runtime_link::Command::Sample
                && runtime_side
                    .events
                    .send_blocking(runtime_link::Event::Resources(vec![]))
                    .is_err()
            {
                return;
            }
        }
    });
    let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
    let t = tel.clone();
    let session_thread = std::thread::spawn(move || {
        let ex = async_executor::LocalExecutor::new();
        let stop = async move {
            let _ = stop_rx.recv().await;
        };
        async_io::block_on(ex.run(session::run(cfg, session_side, t, &ex, stop)));
    });
    let connected = |tel: &Arc<Telemetry>| tel.status_json()["broker"]["state"] == "connected";
    wait_for(10 * S, || connected(&tel).then_some(())).expect("session connects");

    // While connected a status change goes straight out.
    events
        .send_blocking(change("app.ns.svc.ns", 7, Status::Created, "started"))
        .unwrap();
    let v = obs.expect(5 * S, "CREATED", |_, v| v["instance"] == 7);
    assert_eq!(
        (v["status"].as_str(), v["status_detail"].as_str()),
        (Some("CREATED"), Some("started"))
    );

    // Let the acknowledgements settle; QoS 1 is at-least-once, so a redelivered CREATED after
    // the restart is still allowed and skipped below.
    std::thread::sleep(S / 2);
    broker.stop();
    wait_for(5 * S, || (!connected(&tel)).then_some(())).expect("session notices the outage");
    events
        .send_blocking(change("app.ns.svc.ns", 0, Status::Dead, "exited"))
        .unwrap();
    events
        .send_blocking(change("app.ns.svc.ns", 1, Status::Failed, "pull failed"))
        .unwrap();
    events
        .send_blocking(change("app.ns.svc.ns", 0, Status::Undeployed, ""))
        .unwrap();
    // A status a worker may never send (it would crash the stock cluster manager): dropped.
    events
        .send_blocking(change("app.ns.svc.ns", 2, Status::Running, ""))
        .unwrap();
    let invalid = || {
        tel.counters
            .invalid_runtime_status
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Events are handled in order, so once the RUNNING change is refused the others are queued.
    wait_for(5 * S, || (invalid() == 1).then_some(())).expect("the RUNNING change is refused");
    assert_eq!(
        tel.status_json()["queued_status_reports"],
        2,
        "{:#}",
        tel.status_json()
    );
    std::thread::sleep(S);

    broker.restart().unwrap_or_else(|e| panic!("{e}"));
    let mut obs = Observer::connect(broker.port, "observer", false);
    // mosquitto queued them for the persistent observer: exactly the latest per instance, in
    // the order of their latest change.
    let queued = |_: &str, v: &serde_json::Value| v["instance"] != 7;
    let first = obs.expect(15 * S, "first queued report", queued);
    let second = obs.expect(5 * S, "second queued report", queued);
    assert_eq!(
        (first["instance"].as_u64(), first["status"].as_str()),
        (Some(1), Some("FAILED")),
        "{first}"
    );
    assert_eq!(
        (second["instance"].as_u64(), second["status"].as_str()),
        (Some(0), Some("UNDEPLOYED")),
        "{second}"
    );
    let rest = obs.collect(S);
    assert!(
        rest.iter()
            .all(|(_, v)| v["status"] != "DEAD" && v["status"] != "RUNNING"),
        "{rest:?}"
    );
    assert_eq!(tel.status_json()["queued_status_reports"], 0);
    wait_for(5 * S, || (standin.registrations() >= 2).then_some(()))
        .expect("re-registered after the reconnect");

    stop_tx.send_blocking(()).unwrap();
    session_thread.join().expect("session ends on stop");
    drop(events);
    runtime_thread
        .join()
        .expect("runtime side ends with the session");
    // mosquitto writes its log asynchronously: wait for the line rather than race it.
    let line = format!("Received DISCONNECT from {NODE_ID}-ne");
    wait_for(5 * S, || broker.log().contains(&line).then_some(()))
        .expect("the session said DISCONNECT to the broker");
}
