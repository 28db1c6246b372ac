//! Pull accounting: process-wide counters that `/metrics` renders, and the per-pull progress
//! tracker that decides when a download is worth a log line. No I/O and no logging here.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters shared by every pull of the process (atomics: the status endpoint reads them from
/// its own thread).
#[derive(Debug, Default)]
pub struct Counters {
    /// Pulls that fetched anything from a registry and succeeded.
    pub pulls: AtomicU64,
    /// `ensure` calls satisfied by what containerd already had (no network at all).
    pub cache_hits: AtomicU64,
    pub failures: AtomicU64,
    /// Bytes received from registries (manifests, configs, layers).
    pub bytes: AtomicU64,
    /// Layers downloaded.
    pub layers: AtomicU64,
    /// Layers unpacked into snapshots.
    pub layers_unpacked: AtomicU64,
    /// HTTP requests sent to registries and token endpoints (redirect hops not counted).
    pub requests: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }

    /// Prometheus text exposition of the counters.
    pub fn render(&self, out: &mut String) {
        let rows: [(&str, &AtomicU64, &str); 7] = [
            (
                "oak_image_pulls_total",
                &self.pulls,
                "Image pulls that fetched from a registry and succeeded.",
            ),
            (
                "oak_image_pull_cache_hits_total",
                &self.cache_hits,
                "Image pulls served entirely by containerd's store.",
            ),
            (
                "oak_image_pull_failures_total",
                &self.failures,
                "Image pulls that failed.",
            ),
            (
                "oak_image_pull_bytes_total",
                &self.bytes,
                "Bytes received from registries.",
            ),
            (
                "oak_image_pull_layers_total",
                &self.layers,
                "Layers downloaded.",
            ),
            (
                "oak_image_unpacked_layers_total",
                &self.layers_unpacked,
                "Layers unpacked into snapshots.",
            ),
            (
                "oak_image_registry_requests_total",
                &self.requests,
                "HTTP requests sent to registries and token endpoints.",
            ),
        ];
        for (name, c, help) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                Self::get(c)
            );
        }
    }
}

/// Download progress of one pull: says when to log, at most every `step` bytes.
#[derive(Debug, Clone)]
pub struct Progress {
    pub total: u64,
    pub done: u64,
    next: u64,
    step: u64,
}

/// Log at least every 25 %, but not more often than every 4 MiB.
const MIN_STEP: u64 = 4 << 20;

impl Progress {
    pub fn new(total: u64) -> Progress {
        let step = (total / 4).max(MIN_STEP);
        Progress {
            total,
            done: 0,
            next: step,
            step,
        }
    }

    /// Accounts `n` more bytes; true when a progress line is due.
    pub fn advance(&mut self, n: u64) -> bool {
        self.done += n;
        if self.done >= self.next && self.done < self.total {
            while self.next <= self.done {
                self.next += self.step;
            }
            return true;
        }
        false
    }

    pub fn percent(&self) -> u64 {
        (self.done * 100)
            .checked_div(self.total)
            .unwrap_or(100)
            .min(100)
    }
}

/// `12.3 MiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_steps() {
        let mut p = Progress::new(100 << 20);
        assert!(!p.advance(10 << 20));
        assert!(p.advance(20 << 20), "passed 25 %");
        assert!(!p.advance(1 << 20));
        // A big jump logs once, not once per step crossed.
        assert!(p.advance(40 << 20));
        assert!(!p.advance(1 << 20));
        assert_eq!(p.percent(), 72);
        // Reaching the end is logged by the caller's summary, not here.
        assert!(!p.advance(28 << 20));
        assert_eq!(p.percent(), 100);
        // Small pulls: no progress lines at all.
        let mut small = Progress::new(3 << 20);
        assert!(!small.advance(3 << 20));
        assert_eq!(Progress::new(0).percent(), 100);
    }

    #[test]
    fn counters_render_prometheus() {
        let c = Counters::default();
        Counters::add(&c.bytes, 1234);
        Counters::add(&c.pulls, 1);
        let mut s = String::new();
        c.render(&mut s);
        assert!(
            s.contains(
                "# TYPE oak_image_pull_bytes_total counter\noak_image_pull_bytes_total 1234\n"
            ),
            "{s}"
        );
        assert!(s.contains("oak_image_pulls_total 1\n"));
        assert!(s.contains("oak_image_pull_cache_hits_total 0\n"));
        assert_eq!(s.lines().filter(|l| !l.starts_with('#')).count(), 7);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(1035149), "1010.9 KiB");
        assert_eq!(human(40 << 20), "40.0 MiB");
    }
}
