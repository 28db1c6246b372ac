//! One benchmark figure as a JSON line of `results.jsonl`, and the plot series files next to it.
//! Every figure carries its same-run baseline (when it has one), the goal and the verdict, so
//! the report renders only what was measured; nothing here knows how to measure.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A goal as a bound on `value` (same unit): `le` = at most, `ge` = at least.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Goal {
    pub op: String,
    pub value: f64,
    /// As the issue states it, e.g. "≤ 6 MiB".
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Record {
    pub section: String,
    pub name: String,
    pub value: Option<f64>,
    pub unit: String,
    #[serde(default)]
    pub baseline: Option<f64>,
    #[serde(default)]
    pub baseline_name: String,
    #[serde(default)]
    pub ratio: Option<f64>,
    #[serde(default)]
    pub goal: Option<Goal>,
    /// pass, miss, info (no goal), not-measurable-yet.
    pub status: String,
    #[serde(default)]
    pub notes: String,
    #[serde(default)]
    pub smoke: bool,
}

impl Record {
    pub fn new(section: &str, name: &str, value: Option<f64>, unit: &str) -> Record {
        Record {
            section: section.into(),
            name: name.into(),
            value,
            unit: unit.into(),
            ..Record::default()
        }
    }

    pub fn baseline(mut self, name: &str, value: Option<f64>) -> Record {
        self.baseline_name = name.into();
        self.baseline = value;
        self
    }

    pub fn goal(mut self, op: &str, value: f64, text: &str) -> Record {
        self.goal = Some(Goal {
            op: op.into(),
            value,
            text: text.into(),
        });
        self
    }

    pub fn notes(mut self, n: impl Into<String>) -> Record {
        self.notes = n.into();
        self
    }

    /// A figure that cannot be taken yet: the reason goes into the notes.
    pub fn not_measurable(section: &str, name: &str, unit: &str, why: &str) -> Record {
        Record {
            status: "not-measurable-yet".into(),
            notes: why.into(),
            ..Record::new(section, name, None, unit)
        }
    }

    /// Fills ratio and status from value, baseline and goal.
    pub fn finish(mut self) -> Record {
        if self.status == "not-measurable-yet" {
            return self;
        }
        if let (Some(v), Some(b)) = (self.value, self.baseline) {
            if b != 0.0 && v.is_finite() && b.is_finite() {
                self.ratio = Some(v / b);
            }
        }
        self.status = match (&self.goal, self.value) {
            (None, _) => "info".into(),
            (Some(_), None) => "not-measurable-yet".into(),
            (Some(g), Some(v)) => {
                let ok = match g.op.as_str() {
                    "ge" => v >= g.value,
                    _ => v <= g.value,
                };
                if ok { "pass" } else { "miss" }.into()
            }
        };
        self
    }
}

/// Where a run writes: `results.jsonl`, `plots/*.json`, logs.
pub fn out_dir() -> PathBuf {
    std::env::var_os("OAK_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"))
}

pub fn smoke() -> bool {
    std::env::var("OAK_BENCH_SMOKE").is_ok_and(|v| v == "1")
}

pub fn append(r: Record) -> std::io::Result<()> {
    let mut r = r.finish();
    r.smoke = smoke();
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("results.jsonl"))?;
    let line = serde_json::to_string(&r).map_err(std::io::Error::other)?;
    writeln!(f, "{line}")?;
    eprintln!(
        "[oak-bench] {} / {}: {} {} ({})",
        r.section,
        r.name,
        r.value.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        r.unit,
        r.status
    );
    Ok(())
}

pub fn load(path: &Path) -> std::io::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
        .collect()
}

/// A plot: line series (x, y) or empirical CDFs (values only).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Plot {
    pub id: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// "line" or "cdf".
    pub kind: String,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub fn save_plot(p: &Plot) -> std::io::Result<()> {
    let dir = out_dir().join("plots");
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_string(p).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(format!("{}.json", p.id)), text)
}

/// A CDF series from raw samples.
pub fn cdf(name: &str, samples: &[f64]) -> Series {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len().max(1) as f64;
    Series {
        name: name.into(),
        points: v
            .iter()
            .enumerate()
            .map(|(i, x)| (*x, (i + 1) as f64 / n))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let r = Record::new("s", "n", Some(5.0), "MiB")
            .baseline("b", Some(2.0))
            .goal("le", 6.0, "≤ 6 MiB")
            .finish();
        assert_eq!((r.status.as_str(), r.ratio), ("pass", Some(2.5)));
        let r = Record::new("s", "n", Some(0.5), "")
            .goal("ge", 0.6, "≥ 60 %")
            .finish();
        assert_eq!(r.status, "miss");
        let r = Record::not_measurable("s", "n", "ms", "no runtime").finish();
        assert_eq!(r.status, "not-measurable-yet");
        assert_eq!(Record::new("s", "n", Some(1.0), "").finish().status, "info");
    }
}
