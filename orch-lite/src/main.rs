//! `orch-lite root|cluster|all`: Oakestra's root and cluster orchestrators in one process.
//! Only the command line exists so far; the roles land with issues #6 and #7.

use std::process::ExitCode;

const HELP: &str = "\
orch-lite: Oakestra-compatible orchestrator (root and cluster roles in one binary)

Usage:
  orch-lite root       Root orchestrator: REST API on $OAK_ROOT_API_ADDR (0.0.0.0:10000)
  orch-lite cluster    Cluster orchestrator: worker API on $OAK_CLUSTER_API_ADDR (0.0.0.0:10100),
                       MQTT broker on $OAK_MQTT_ADDR (0.0.0.0:10003) unless $OAK_MQTT_URL is set
  orch-lite all        Both roles in one process (the 1-DOC setup)
  orch-lite version | help
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["version"] | ["--version"] => {
            println!("orch-lite {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        ["help"] | ["--help"] | ["-h"] | [] => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        [role @ ("root" | "cluster" | "all")] => {
            eprintln!("error: the {role} role is not implemented yet (issues #6, #7)");
            ExitCode::FAILURE
        }
        other => {
            eprintln!("error: unknown arguments {other:?}\n\n{HELP}");
            ExitCode::from(2)
        }
    }
}
