//! The root role alone, configured from the environment exactly as `orch-lite root` will be
//! (OAK_ROOT_API_ADDR, OAK_DATA_DIR, OAK_ADMIN_PASSWORD, OAK_JOIN_TOKEN, OAK_CLUSTER_TIMEOUT_S,
//! OAK_ACCESS_TOKEN_TTL_S, OAK_REFRESH_TOKEN_TTL_S). For manual checks with curl or the `oak` CLI
//! until main.rs wires the role: `cargo run -p orch-lite --example root_only`.

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let handle = orch_lite::root::RootConfig::from_env().and_then(orch_lite::root::start);
    match handle {
        Ok(h) => {
            println!("root API on http://{}", h.addr());
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
