//! Counters of the cluster role, rendered as Prometheus text on `GET /metrics` and as JSON in
//! `/api/cluster/status`. Plain atomics: bumped from the MQTT loop, the HTTP threads and the root
//! link without a lock. No histograms, no labels beyond the topic kind.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct Metrics { $(pub $name: AtomicU64,)* }

        impl Metrics {
            /// `(name, help, value)` for every counter.
            pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    malformed_information: "nodes/+/information messages that did not decode",
    malformed_job: "nodes/+/job messages that did not decode (garbage, unknown status, wrong types)",
    malformed_resources: "nodes/+/jobs/resources messages that did not decode (e.g. services:null)",
    malformed_net: "nodes/+/net/... messages that did not decode or have an unknown topic",
    malformed_other: "messages on topics the cluster does not handle",
    unknown_node_messages: "messages from node ids that are not registered",
    stale_reports: "job reports about instances not placed on the reporting worker",
    registrations: "successful worker registrations",
    registrations_refused: "registrations refused (token, name conflict, bad body)",
    deploys: "deploy commands published to workers",
    reschedules: "deploys that retry an instance after a failure",
    unplaceable: "scheduling attempts that found no worker",
    instances_failed: "instances marked FAILED or DEAD",
    publishes_dropped: "MQTT publishes dropped because the client queue was full",
    root_push_failures: "status pushes or reports the root did not accept",
    store_errors: "writes to the store that failed",
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition format, every counter prefixed `orch_lite_cluster_`.
    pub fn prometheus(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        for (name, help, v) in self.snapshot() {
            out.push_str(&format!(
                "# HELP orch_lite_cluster_{name}_total {help}\n# TYPE orch_lite_cluster_{name}_total counter\norch_lite_cluster_{name}_total {v}\n"
            ));
        }
        for (name, help, v) in gauges {
            out.push_str(&format!(
                "# HELP orch_lite_cluster_{name} {help}\n# TYPE orch_lite_cluster_{name} gauge\norch_lite_cluster_{name} {v}\n"
            ));
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        self.snapshot()
            .into_iter()
            .map(|(k, _, v)| (k.to_string(), serde_json::Value::from(v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}
