//! `chorus-loadtest`: parses the command line and runs it (see the library docs).

use std::time::Duration;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = chorus_loadtest::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(chorus_loadtest::run_cli(cli));
    // Do not wait for a blocked stdin reader (worker processes) to notice the end.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
