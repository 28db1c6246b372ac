//! `oak-bench`: the benchmark suite's tool (issue #9), driven by `scripts/bench.sh`. Each
//! subcommand measures one area and appends JSON lines to `$OAK_BENCH_OUT/results.jsonl`;
//! `report` renders BENCHMARKS.md and the SVG plots. Not shipped.

mod cp;
mod netns;
mod overlay;
mod procfs;
mod procs;
mod report;
mod results;
mod root;
mod stats;
mod worker_benches;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Counts every allocation (for the overlay's allocations-per-packet figure).
struct Counting;

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        overlay::ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        overlay::ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const HELP: &str = "\
oak-bench <command> [--flag value]...   (run through scripts/bench.sh)

  record        --section S --name N --unit U [--value V] [--baseline-name B --baseline V]
                [--goal-op le|ge --goal-value V --goal-text T] [--notes T] [--not-measurable WHY]
  idle          --orch BIN --worker BIN --warmup S --secs S
  deploy        --orch BIN --worker BIN --fixture-env FILE --runs N [--netem-runs N]
                [--instances N,N...]
  overlay       --secs S --pings N --connects N
  control-plane --orch BIN --workers N[,N...] --secs S --probes N
  root-api      --orch BIN --clusters N --services N --per-app N --requests N
  all-idle      --orch BIN --secs S
  report        --out FILE.md --svg-dir DIR --svg-rel PATH --commit C
Output goes to $OAK_BENCH_OUT (default target/bench); $OAK_BENCH_SMOKE=1 marks a smoke run.
";

struct Args(Vec<(String, String)>);

impl Args {
    fn parse(v: &[String]) -> Result<Args, String> {
        let mut out = Vec::new();
        let mut it = v.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {k:?}"))?;
            let val = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            out.push((key.to_string(), val.clone()));
        }
        Ok(Args(out))
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.as_str())
    }
    fn req(&self, k: &str) -> Result<&str, String> {
        self.get(k).ok_or_else(|| format!("missing --{k}"))
    }
    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T, String> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{k} {v:?} is not a number")),
        }
    }
    fn path(&self, k: &str) -> Result<PathBuf, String> {
        self.req(k).map(PathBuf::from)
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn record(a: &Args) -> Result<(), String> {
    let (section, name, unit) = (a.req("section")?, a.req("name")?, a.req("unit")?);
    let mut r = match a.get("not-measurable") {
        Some(why) => results::Record::not_measurable(section, name, unit, why),
        None => results::Record::new(
            section,
            name,
            a.get("value")
                .map(|v| v.parse::<f64>())
                .transpose()
                .map_err(|e| e.to_string())?,
            unit,
        ),
    };
    if let Some(b) = a.get("baseline-name") {
        r = r.baseline(
            b,
            a.get("baseline")
                .map(|v| v.parse::<f64>())
                .transpose()
                .map_err(|e| e.to_string())?,
        );
    }
    if let Some(op) = a.get("goal-op") {
        let keep = r.status.clone();
        r = r.goal(
            op,
            a.num("goal-value", 0.0)?,
            a.get("goal-text").unwrap_or(""),
        );
        r.status = keep;
    }
    if let Some(n) = a.get("notes") {
        if r.notes.is_empty() {
            r = r.notes(n);
        } else {
            r.notes = format!("{}; {n}", r.notes);
        }
    }
    results::append(r).map_err(|e| e.to_string())
}

fn report(a: &Args) -> Result<(), String> {
    let dir = results::out_dir();
    let records = results::load(&dir.join("results.jsonl"))
        .map_err(|e| format!("{}: {e}", dir.join("results.jsonl").display()))?;
    let mut plots = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("plots")) {
        let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| e.to_string())?;
            plots.push(
                serde_json::from_str::<results::Plot>(&text)
                    .map_err(|e| format!("{}: {e}", f.display()))?,
            );
        }
    }
    let svg_dir = a.path("svg-dir")?;
    std::fs::create_dir_all(&svg_dir).map_err(|e| e.to_string())?;
    for p in &plots {
        report::svg(p, &svg_dir.join(format!("{}.svg", p.id)))?;
    }
    let m = report::machine(a.get("commit").unwrap_or("unknown"));
    let md = report::markdown(
        &records,
        &m,
        &plots,
        a.get("svg-rel").unwrap_or("docs/bench"),
        results::smoke(),
    );
    std::fs::write(a.req("out")?, md).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        print!("{HELP}");
        return ExitCode::from(2);
    };
    let r = Args::parse(&argv[1..]).and_then(|a| match cmd.as_str() {
        "record" => record(&a),
        "idle" => worker_benches::idle(
            &a.path("orch")?,
            &a.path("worker")?,
            &worker_benches::Opts {
                warmup: secs(a.num("warmup", 30.0)?),
                window: secs(a.num("secs", 180.0)?),
                deploy_runs: 0,
                netem_runs: 0,
                instance_counts: vec![],
            },
        ),
        "deploy" => worker_benches::deploy(
            &a.path("orch")?,
            &a.path("worker")?,
            &a.path("fixture-env")?,
            &worker_benches::Opts {
                warmup: Duration::ZERO,
                window: Duration::ZERO,
                deploy_runs: a.num("runs", 50)?,
                netem_runs: a.num("netem-runs", 20)?,
                instance_counts: a
                    .get("instances")
                    .unwrap_or("20,100")
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|_| format!("--instances {s:?}"))
                    })
                    .collect::<Result<_, _>>()?,
            },
        ),
        "overlay" => overlay::run_all(&overlay::Opts {
            secs: a.num("secs", 5.0)?,
            pings: a.num("pings", 200)?,
            connects: a.num("connects", 100)?,
        }),
        "control-plane" => cp::run(
            &a.path("orch")?,
            &cp::Opts {
                sizes: a
                    .req("workers")?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|_| format!("--workers {s:?}"))
                    })
                    .collect::<Result<_, _>>()?,
                interval: Duration::from_secs(2),
                window: secs(a.num("secs", 30.0)?),
                probes: a.num("probes", 50)?,
            },
        ),
        "root-api" | "all-idle" => {
            let o = root::Opts {
                clusters: a.num("clusters", 100)?,
                services: a.num("services", 10_000)?,
                per_app: a.num("per-app", 100)?,
                requests: a.num("requests", 50)?,
                idle_secs: a.num("secs", 60)?,
            };
            if cmd == "root-api" {
                root::api(&a.path("orch")?, &o)
            } else {
                root::all_idle(&a.path("orch")?, &o)
            }
        }
        "report" => report(&a),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n{HELP}")),
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oak-bench {cmd}: error: {e}");
            ExitCode::FAILURE
        }
    }
}
