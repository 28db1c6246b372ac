//! /proc readings per anchors.md §7.1: `Rss`/`Pss` from `smaps_rollup`, CPU as the
//! `utime + stime` delta from `stat` over wall time. Whole process (all threads), no children.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

pub fn mem(pid: u32) -> Option<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Mem {
        rss_kib: field("Rss:")?,
        pss_kib: field("Pss:").unwrap_or(0),
    })
}

/// utime + stime in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: fields restart after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub fn threads(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with("Threads:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A sampling window over one process.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// (seconds since start, RSS KiB, PSS KiB)
    pub samples: Vec<(f64, f64, f64)>,
    /// Share of one core over the window, in percent.
    pub cpu_percent: Option<f64>,
}

impl Window {
    pub fn rss_kib(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.1).collect()
    }
    pub fn pss_kib(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.2).collect()
    }
}

/// Samples every pid each `interval` for `length`, all in the same window; stops early at
/// `stop()` (checked each interval). A pid that disappears keeps the samples it had.
pub fn sample(
    pids: &[u32],
    length: Duration,
    interval: Duration,
    mut stop: impl FnMut() -> bool,
) -> Vec<Window> {
    let t0 = Instant::now();
    let start: Vec<Option<u64>> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let mut out: Vec<Window> = pids.iter().map(|_| Window::default()).collect();
    let mut last: Vec<Option<u64>> = start.clone();
    let mut last_t = t0;
    loop {
        let t = t0.elapsed().as_secs_f64();
        for (i, p) in pids.iter().enumerate() {
            if let Some(m) = mem(*p) {
                out[i].samples.push((t, m.rss_kib as f64, m.pss_kib as f64));
            }
            if let Some(c) = cpu_ticks(*p) {
                last[i] = Some(c);
            }
        }
        last_t = if last.iter().any(Option::is_some) {
            Instant::now()
        } else {
            last_t
        };
        if t0.elapsed() >= length || stop() {
            break;
        }
        std::thread::sleep(interval);
    }
    let wall = last_t.duration_since(t0).as_secs_f64();
    let hz = ticks_per_sec();
    for (i, w) in out.iter_mut().enumerate() {
        if let (Some(a), Some(b)) = (start[i], last[i]) {
            if wall > 0.0 {
                w.cpu_percent = Some((b - a) as f64 / hz / wall * 100.0);
            }
        }
    }
    out
}
