//! `chorus-loadtest`: the load harness bundled with Chorus.
//!
//! It opens many WebSocket connections to one node or a cluster (loopback
//! addresses only), drives one bounded scenario through them, and reports
//! what it measured, so that two runs can be compared.
//!
//! # Parts
//!
//! - [`cli`]: the command line; its argument structs are also the run
//!   specification ([`cli::RunSpec`]) sent to workers and stored in reports.
//! - [`coordinator`]: plans a run (how many worker processes, which source
//!   addresses), lets the scenario prepare shared state (rooms), starts the
//!   workers, walks them through the phases, samples the server process
//!   (RSS, CPU), prints the progress line, merges the results into a
//!   [`report::Report`].
//! - [`workers`]: the phase protocol between coordinator and workers; a
//!   worker is a task of this process when one suffices, or a process of
//!   this same executable (`chorus-loadtest worker`, hidden) beyond
//!   `--conns-per-worker` connections, speaking JSON lines on stdin/stdout.
//! - [`scenarios`]: connect, idle, fanout, chat, presence, notify; each has a
//!   worker side (set up, load, drain) and says which figures it reports.
//! - [`client`]: one connection: source-address binding, WebSocket
//!   handshake with the JSON or MessagePack subprotocol, request/reply
//!   matching, pushes handed to the scenario's handler. [`wire`] decodes
//!   server frames without building a JSON tree per push; [`http`] is the
//!   small server-API client (notify).
//! - [`tracker`]: loss / duplicate / order detection by per-channel offset.
//! - [`stats`]: counters, HdrHistograms and errors by cause, per process;
//!   snapshots (histograms in HdrHistogram's V2 format, base64) are what
//!   workers send back and what the coordinator merges.
//! - [`report`]: the JSON report, the human summary, `compare`.
//! - [`baseline`]: a bare tokio-tungstenite server with just enough of the
//!   protocol for connect, idle and fanout, to measure Chorus against;
//!   [`spawn`] starts it (or a `chorus` binary) for a run.
//! - [`sys`]: getrusage, /proc, open-files limit, git revision.
//!
//! # Data flow
//!
//! ```text
//! main ─▶ coordinator::run ─▶ scenarios::prepare (rooms)
//!              │
//!              ├─▶ Fleet: worker task | worker processes ──▶ scenarios::run_worker
//!              │        ▲   Ready / Progress / Ran{heads} / Done{Snapshot}   │
//!              │        └────────────────────────────────────────────────────┘
//!              │   each worker: client::Conn × N ─▶ PushHandler ─▶ tracker + Stats
//!              └─▶ Merged snapshots ─▶ Report (JSON, summary, warnings)
//! ```
//!
//! Errors: connection and request failures are typed ([`client::ConnectError`],
//! [`client::RequestError`]) because they are counted by cause; the run as a
//! whole reports with `anyhow`, as a command-line tool's top level does.

pub mod auth;
pub mod baseline;
pub mod cli;
pub mod client;
pub mod coordinator;
pub mod http;
pub mod report;
pub mod scenarios;
pub mod spawn;
pub mod stats;
pub mod sys;
pub mod target;
pub mod tracker;
pub mod wire;
pub mod workers;

pub use cli::{Cli, Command, CommonArgs, RunSpec};
pub use coordinator::{run, RunOptions};
pub use report::Report;
pub use scenarios::Scenario;

/// Runs a parsed command line to its end; returns the process exit code.
pub async fn run_cli(cli: Cli) -> anyhow::Result<i32> {
    let spec = match cli.command {
        Command::Compare { a, b } => {
            let read = |p: &std::path::Path| -> anyhow::Result<Report> {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
                serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{} is not a report: {e}", p.display()))
            };
            print!("{}", report::render_comparison(&read(&a)?, &read(&b)?));
            return Ok(0);
        }
        Command::Baseline {
            listen,
            max_seconds,
        } => {
            baseline::baseline_main(&listen, max_seconds).await?;
            return Ok(0);
        }
        Command::Worker => {
            workers::worker_main().await?;
            return Ok(0);
        }
        Command::Connect { common, args } => RunSpec {
            common,
            scenario: Scenario::Connect(args),
        },
        Command::Idle { common, args } => RunSpec {
            common,
            scenario: Scenario::Idle(args),
        },
        Command::Fanout { common, args } => RunSpec {
            common,
            scenario: Scenario::Fanout(args),
        },
        Command::Chat { common, args } => RunSpec {
            common,
            scenario: Scenario::Chat(args),
        },
        Command::Presence { common, args } => RunSpec {
            common,
            scenario: Scenario::Presence(args),
        },
        Command::Notify { common, args } => RunSpec {
            common,
            scenario: Scenario::Notify(args),
        },
    };
    let out = spec.common.out.clone();
    let report = run(
        spec,
        &RunOptions {
            exe: None,
            progress: true,
        },
    )
    .await?;
    print!("{}", report.summary());
    if let Some(path) = out {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(0)
}
