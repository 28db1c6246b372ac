//! Counters of the cluster role, rendered as Prometheus text on `GET /metrics` and as JSON in
//! `/api/cluster/status`. Plain atomics: bumped from the MQTT loop, the HTTP threads and the root
//! link without a lock. One histogram: the scheduler's decision time, which a load test can
//! only bound from outside (HTTP and broker hops dwarf it), so the cluster measures it itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the decision-time buckets, in µs (the last bucket, +Inf, is implicit).
pub const SCHEDULE_BUCKETS_US: [u64; 14] = [
    10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000,
];

/// A fixed-bucket histogram of durations: lock-free, no allocation per observation.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts; index `SCHEDULE_BUCKETS_US.len()` is +Inf.
    buckets: [AtomicU64; SCHEDULE_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
    max_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = SCHEDULE_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(SCHEDULE_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Prometheus histogram lines (cumulative buckets, seconds) plus a `_max_seconds` gauge.
    fn prometheus(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!(
            "# HELP {name}_seconds {help}\n# TYPE {name}_seconds histogram\n"
        ));
        let mut acc = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Ordering::Relaxed);
            let le = SCHEDULE_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            out.push_str(&format!("{name}_seconds_bucket{{le=\"{le}\"}} {acc}\n"));
        }
        out.push_str(&format!(
            "{name}_seconds_sum {}\n{name}_seconds_count {}\n",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            self.count()
        ));
        out.push_str(&format!(
            "# HELP {name}_max_seconds Longest observation since start\n# TYPE {name}_max_seconds gauge\n{name}_max_seconds {}\n",
            self.max_us.load(Ordering::Relaxed) as f64 / 1e6
        ));
    }
}

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(pub $name: AtomicU64,)*
            /// Time of one scheduling decision (candidate list and placement), per instance.
            pub schedule_latency: Histogram,
        }

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
        self.schedule_latency.prometheus(
            "orch_lite_cluster_schedule_decision",
            "Time of one scheduling decision: building the candidate list and choosing a worker",
            &mut out,
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_seconds() {
        let m = Metrics::default();
        m.schedule_latency.observe(Duration::from_micros(5));
        m.schedule_latency.observe(Duration::from_micros(150));
        m.schedule_latency.observe(Duration::from_secs(3));
        let text = m.prometheus(&[]);
        let line = |k: &str| {
            text.lines()
                .find(|l| l.starts_with(k))
                .unwrap_or_else(|| panic!("{k} missing in\n{text}"))
                .to_string()
        };
        assert_eq!(
            line("orch_lite_cluster_schedule_decision_seconds_bucket{le=\"0.00001\"}"),
            "orch_lite_cluster_schedule_decision_seconds_bucket{le=\"0.00001\"} 1"
        );
        assert_eq!(
            line("orch_lite_cluster_schedule_decision_seconds_bucket{le=\"0.0002\"}"),
            "orch_lite_cluster_schedule_decision_seconds_bucket{le=\"0.0002\"} 2"
        );
        assert_eq!(
            line("orch_lite_cluster_schedule_decision_seconds_bucket{le=\"1\"}"),
            "orch_lite_cluster_schedule_decision_seconds_bucket{le=\"1\"} 2"
        );
        assert_eq!(
            line("orch_lite_cluster_schedule_decision_seconds_bucket{le=\"+Inf\"}"),
            "orch_lite_cluster_schedule_decision_seconds_bucket{le=\"+Inf\"} 3"
        );
        assert_eq!(
            line("orch_lite_cluster_schedule_decision_seconds_count"),
            "orch_lite_cluster_schedule_decision_seconds_count 3"
        );
        assert_eq!(
            line("orch_lite_cluster_schedule_decision_max_seconds "),
            "orch_lite_cluster_schedule_decision_max_seconds 3"
        );
    }
}
