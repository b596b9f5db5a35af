//! The command line: one subcommand per scenario, plus `compare`, `baseline`
//! and the hidden `worker`.
//!
//! The argument structs double as the run specification: they are
//! serialized into the report (`params`) and sent to worker processes, so a
//! worker runs exactly what the coordinator parsed.

use std::path::PathBuf;

use chorus_protocol::Encoding;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::scenarios::Scenario;

#[derive(Parser, Debug)]
#[command(
    name = "chorus-loadtest",
    version,
    about = "Load harness for Chorus nodes and clusters (loopback targets only)",
    long_about = "Runs one bounded scenario against one or more Chorus nodes on 127.0.0.0/8, \
                  prints a progress line and a human summary, and writes a JSON report that \
                  `chorus-loadtest compare` can set against another run."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open N connections as fast as allowed (or at --rate); connect rate and handshake latency.
    Connect {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: ConnectArgs,
    },
    /// Hold N connections for a while with protocol pings; how many stayed up.
    Idle {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: IdleArgs,
    },
    /// S subscribers in each of R rooms, P publishers per room; publish-to-delivery latency, loss.
    Fanout {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: FanoutArgs,
    },
    /// Many small rooms: users sending, typing and marking read.
    Chat {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: ChatArgs,
    },
    /// Users connecting and disconnecting while others watch them; time until watchers see it.
    Presence {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: PresenceArgs,
    },
    /// Server-API notification bursts to many connected users; time to delivery.
    Notify {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: NotifyArgs,
    },
    /// Print the ratios B/A of every figure two JSON reports share.
    Compare {
        /// The reference report.
        a: PathBuf,
        /// The report compared with it.
        b: PathBuf,
    },
    /// A bare tokio-tungstenite server speaking just enough of the protocol
    /// (ping, room.create, room.join, subscribe, unsubscribe, room.send) to
    /// run connect, idle and fanout against: the baseline Chorus is measured against.
    Baseline {
        /// Address to listen on; a loopback address only.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Stop by itself after this long.
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
    /// Internal: a worker process started by the coordinator (plan on stdin, events on stdout).
    #[command(hide = true)]
    Worker,
}

/// The wire encoding, as chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enc {
    Json,
    Msgpack,
}

impl Enc {
    pub fn encoding(self) -> Encoding {
        match self {
            Enc::Json => Encoding::Json,
            Enc::Msgpack => Encoding::MsgPack,
        }
    }
}

/// Options every scenario shares: where to connect, as whom, how to spread
/// the connections, and the bounds of the run.
#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct CommonArgs {
    /// A node's address (ip:port, 127.0.0.0/8 only); repeat for a cluster.
    /// Connections are spread across targets round-robin.
    #[arg(long = "target", default_value = "127.0.0.1:7600")]
    pub targets: Vec<String>,
    /// Wire encoding (WebSocket subprotocol chorus.v1.json or chorus.v1.msgpack).
    #[arg(long, value_enum, default_value_t = Enc::Json)]
    pub encoding: Enc,
    /// HS256 key to mint user tokens with (the node's auth.jwt_secret).
    #[arg(
        long,
        env = "CHORUS_AUTH_JWT_SECRET",
        default_value = "dev-secret-change-me",
        hide_env_values = true
    )]
    pub jwt_secret: String,
    /// Use these tokens (one per line) instead of minting; the user is each token's `sub`.
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
    /// Server API key (the node's auth.api_key), for the notify scenario.
    #[arg(
        long,
        env = "CHORUS_AUTH_API_KEY",
        default_value = "dev-api-key",
        hide_env_values = true
    )]
    pub api_key: String,
    /// How many source addresses to spread connections over (0: one per 16,000
    /// connections, at least 4). Each source has its own ephemeral port range.
    #[arg(long, default_value_t = 0)]
    pub sources: usize,
    /// The first source address; the others follow it (127.0.0.2, 127.0.0.3, ...).
    #[arg(long, default_value = "127.0.0.2")]
    pub source_base: String,
    /// Worker processes (0: as many as --conns-per-worker requires; 1 runs in this process).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Most connections one process opens (the open-files limit here is 20,000 per process).
    #[arg(long, default_value_t = 19_000)]
    pub conns_per_worker: u64,
    /// Most WebSocket handshakes in flight at once, per process. Much more
    /// overflows a loopback listener's queue here: dropped SYNs come back
    /// after 1 s and show as a 1 s tail in handshake latency.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Give up on one connection attempt (TCP + WebSocket handshake) after this long.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// Give up waiting for one request's reply after this long.
    #[arg(long, default_value_t = 30.0)]
    pub request_timeout_secs: f64,
    /// Give up if the workers have not finished connecting and setting up after this long.
    #[arg(long, default_value_t = 300.0)]
    pub setup_timeout_secs: f64,
    /// After the load stops, wait at most this long for outstanding deliveries.
    #[arg(long, default_value_t = 10.0)]
    pub drain_secs: f64,
    /// Hard bound on the whole run; it is aborted past it.
    #[arg(long, default_value_t = 900.0)]
    pub max_seconds: f64,
    /// Client read buffer per connection, in bytes.
    #[arg(long, default_value_t = 8192)]
    pub read_buffer: usize,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub progress_secs: f64,
    /// Write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A free-form label stored in the report.
    #[arg(long)]
    pub label: Option<String>,
    /// The server's pid (a local process): its RSS and CPU time are sampled
    /// around the run (memory per connection, server CPU).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Start this `chorus` binary on 127.0.0.1:0 with a fresh data directory,
    /// target it, sample it, and stop it after the run.
    #[arg(long, conflicts_with = "spawn_baseline")]
    pub spawn_node: Option<PathBuf>,
    /// With --spawn-node: the node's config file (`chorus start --config`),
    /// e.g. to raise `limits.rate_per_sec` for a benchmark.
    #[arg(long, requires = "spawn_node")]
    pub node_config: Option<PathBuf>,
    /// Run against a baseline server this harness starts (see `baseline`) instead of a node.
    #[arg(long)]
    pub spawn_baseline: bool,
    /// After the run, repeat it against a freshly started baseline server and
    /// report the ratios (connect, idle and fanout only).
    #[arg(long)]
    pub with_baseline: bool,
    /// Self-test: drop the Nth entry push a worker receives before counting it.
    #[arg(long, hide = true)]
    pub inject_drop: Option<u64>,
    /// Self-test: count the Nth entry push a worker receives twice.
    #[arg(long, hide = true)]
    pub inject_duplicate: Option<u64>,
}

impl CommonArgs {
    /// Defaults as the command line has them, for a given target (tests, programmatic runs).
    /// Environment variables (`CHORUS_AUTH_*`) apply as they would on the command line.
    pub fn for_target(target: &str) -> Result<CommonArgs, clap::Error> {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            common: CommonArgs,
        }
        let mut common = Wrapper::try_parse_from(["chorus-loadtest"])?.common;
        common.targets = vec![target.to_string()];
        Ok(common)
    }
}

#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct ConnectArgs {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: u64,
    /// Distinct users (connection i is user i mod users; default: one per connection).
    #[arg(long)]
    pub users: Option<u64>,
    /// Connections per second over all processes (0: as fast as --concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Keep the connections open this long once all are open.
    #[arg(long, default_value_t = 0.0)]
    pub hold_secs: f64,
    /// Stop opening new connections after this long.
    #[arg(long, default_value_t = 120.0)]
    pub duration_secs: f64,
}

#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct IdleArgs {
    /// Connections to hold.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: u64,
    /// Distinct users (connection i is user i mod users; default: one per connection).
    #[arg(long)]
    pub users: Option<u64>,
    /// Connections per second while opening (0: as fast as --concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// How long to hold them once all are open.
    #[arg(long, default_value_t = 30.0)]
    pub hold_secs: f64,
    /// Each connection sends a protocol `ping` this often (0: never).
    #[arg(long, default_value_t = 10.0)]
    pub ping_secs: f64,
}

#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct FanoutArgs {
    /// Rooms (public), each with its own subscribers and publishers.
    #[arg(long, default_value_t = 1)]
    pub rooms: u64,
    /// Subscribers per room.
    #[arg(long, default_value_t = 100)]
    pub subscribers: u64,
    /// Publishers per room.
    #[arg(long, default_value_t = 1)]
    pub publishers: u64,
    /// Messages each publisher sends.
    #[arg(long, default_value_t = 100)]
    pub messages: u64,
    /// Messages per second over all publishers, on a fixed schedule whatever
    /// the replies (0: open loop, as fast as --max-inflight allows).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Most unacknowledged sends per publisher.
    #[arg(long, default_value_t = 16)]
    pub max_inflight: usize,
    /// Stop publishing after this long even if messages remain.
    #[arg(long, default_value_t = 60.0)]
    pub duration_secs: f64,
    /// Text length of each message, in bytes.
    #[arg(long, default_value_t = 32)]
    pub payload_bytes: usize,
    /// Subscribers join the room (`room.join`) instead of only subscribing to it.
    #[arg(long)]
    pub join: bool,
}

#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct ChatArgs {
    /// Rooms; a room of 2 is a direct room (`room.direct`), larger ones are group rooms.
    #[arg(long, default_value_t = 100)]
    pub rooms: u64,
    /// Members per room, each one connection.
    #[arg(long, default_value_t = 2)]
    pub room_size: u64,
    /// Messages each user sends.
    #[arg(long, default_value_t = 10)]
    pub messages: u64,
    /// Messages per second per user.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Probability that a user types (`room.typing`) before a message.
    #[arg(long, default_value_t = 0.5)]
    pub typing: f64,
    /// Probability that a user marks a received message read (`room.read`).
    #[arg(long, default_value_t = 0.5)]
    pub read: f64,
    /// Stop sending after this long even if messages remain.
    #[arg(long, default_value_t = 60.0)]
    pub duration_secs: f64,
}

#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct PresenceArgs {
    /// Users that connect and disconnect.
    #[arg(long, default_value_t = 20)]
    pub users: u64,
    /// Watchers per user (each its own connection, `presence.watch` on that user).
    #[arg(long, default_value_t = 5)]
    pub watchers: u64,
    /// Connect/disconnect cycles per user.
    #[arg(long, default_value_t = 3)]
    pub cycles: u64,
    /// How long a user stays connected once every watcher saw it online.
    #[arg(long, default_value_t = 500)]
    pub online_ms: u64,
    /// How long a user stays away once every watcher saw it offline.
    #[arg(long, default_value_t = 500)]
    pub offline_ms: u64,
    /// A watcher that has not seen a change after this long missed it.
    #[arg(long, default_value_t = 10.0)]
    pub change_timeout_secs: f64,
}

#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct NotifyArgs {
    /// Connected users that receive notifications.
    #[arg(long, default_value_t = 100)]
    pub users: u64,
    /// Bursts.
    #[arg(long, default_value_t = 5)]
    pub bursts: u64,
    /// Notifications per user in each burst.
    #[arg(long, default_value_t = 1)]
    pub per_user: u64,
    /// Users per server-API request.
    #[arg(long, default_value_t = 100)]
    pub batch: u64,
    /// Pause between the start of two bursts.
    #[arg(long, default_value_t = 200)]
    pub interval_ms: u64,
    /// Server-API requests in flight at once, per process.
    #[arg(long, default_value_t = 4)]
    pub api_concurrency: usize,
    /// Notification priority: low, normal, high or urgent.
    #[arg(long, default_value = "normal")]
    pub priority: String,
}

/// Everything a run needs, as parsed: sent to workers, summarized in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSpec {
    pub common: CommonArgs,
    pub scenario: Scenario,
}

impl RunSpec {
    /// The run's parameters for the report, without secrets.
    pub fn params(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(common) = v.get_mut("common").and_then(|c| c.as_object_mut()) {
            common.remove("jwt_secret");
            common.remove("api_key");
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_leave_out_secrets() {
        let spec = RunSpec {
            common: CommonArgs::for_target("127.0.0.1:1").unwrap(),
            scenario: Scenario::Connect(ConnectArgs {
                connections: 3,
                users: None,
                rate: 0.0,
                hold_secs: 0.0,
                duration_secs: 1.0,
            }),
        };
        let p = spec.params();
        let text = p.to_string();
        assert!(!text.contains("jwt_secret"), "{text}");
        assert!(!text.contains("api_key"), "{text}");
        assert_eq!(p["scenario"]["scenario"], "connect");
        assert_eq!(p["common"]["targets"][0], "127.0.0.1:1");
    }

    #[test]
    fn scenario_arguments_parse() {
        let cli = Cli::try_parse_from([
            "chorus-loadtest",
            "fanout",
            "--target",
            "127.0.0.1:9000",
            "--target",
            "127.0.0.1:9001",
            "--rooms",
            "3",
            "--subscribers",
            "10",
            "--encoding",
            "msgpack",
        ])
        .unwrap();
        match cli.command {
            Command::Fanout { common, args } => {
                assert_eq!(common.targets.len(), 2);
                assert_eq!(common.encoding, Enc::Msgpack);
                assert_eq!(args.rooms, 3);
                assert_eq!(args.subscribers, 10);
            }
            other => panic!("{other:?}"),
        }
    }
}
