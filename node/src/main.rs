//! `chorus`: run a node, mint a development token, migrate the schema.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use chorus_node::auth::{mint_token, parse_duration};
use chorus_node::Config;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chorus", version, about = "Chorus realtime cluster node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// Config file (TOML). Without one, every key takes its default (see cluster.toml).
    #[arg(long, short, env = "CHORUS_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node until SIGTERM / Ctrl-C.
    Start {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Overrides node.listen (ip:port; port 0 picks a free one).
        #[arg(long)]
        listen: Option<String>,
        /// Overrides storage.embedded.path.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides node.id.
        #[arg(long)]
        node_id: Option<String>,
        /// Gossip address (host:port) of a node of the cluster to join;
        /// repeat for several. Added to cluster.seeds.
        #[arg(long = "seed", value_name = "HOST:PORT")]
        seeds: Vec<String>,
    },
    /// Print the cluster as a node sees it: members, states, load, the owner
    /// of a key, and that node's counts (GET /api/v1/cluster).
    Status {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The node to ask (host:port of its HTTP listener). Default: node.listen.
        #[arg(long)]
        target: Option<String>,
        /// Also print which node owns this key (room:lobby, topic:news, user:alice).
        #[arg(long)]
        key: Option<String>,
        /// Print the JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a development token (HS256, signed with auth.jwt_secret).
    Token {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Lifetime: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Extra claims as a JSON object, e.g. '{"rooms":["team-*"],"publish":["post:*"]}'.
        #[arg(long)]
        claims: Option<String>,
    },
    /// Create or upgrade the ScyllaDB schema (storage.backend = "scylla").
    Migrate {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

fn load(cfg: &ConfigArgs) -> anyhow::Result<Config> {
    // `vars_os`: `std::env::vars` panics on any variable that is not UTF-8,
    // even one that is none of ours.
    let mut env: HashMap<String, String> = HashMap::new();
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str().filter(|k| k.starts_with("CHORUS_")) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| anyhow::anyhow!("environment variable {key} is not UTF-8"))?;
        env.insert(key.to_string(), value);
    }
    Config::load(cfg.config.as_deref(), &env)
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            cfg,
            user,
            ttl,
            claims,
        } => {
            let config = load(&cfg)?;
            let extra = claims
                .map(|c| serde_json::from_str(&c).context("--claims is not JSON"))
                .transpose()?;
            println!(
                "{}",
                mint_token(&config.auth.jwt_secret, &user, parse_duration(&ttl)?, extra)?
            );
            Ok(())
        }
        Command::Migrate { cfg } => {
            let config = load(&cfg)?;
            init_tracing(&config.log.level);
            let rt = tokio::runtime::Runtime::new()?;
            let version = rt.block_on(chorus_storage::scylla::migrate(&config.storage.scylla))?;
            println!("schema at version {version}");
            Ok(())
        }
        Command::Status {
            cfg,
            target,
            key,
            json,
        } => {
            let config = load(&cfg)?;
            let target = target.unwrap_or_else(|| chorus_node::status::local_target(&config));
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(chorus_node::status::run(
                &target,
                &config.auth.api_key,
                key.as_deref(),
                json,
            ))
        }
        Command::Start {
            cfg,
            listen,
            data_dir,
            node_id,
            seeds,
        } => {
            let mut config = load(&cfg)?;
            config.cluster.seeds.extend(seeds);
            if let Some(l) = listen {
                config.node.listen = l;
            }
            if let Some(d) = data_dir {
                config.storage.embedded.path = d;
            }
            if let Some(id) = node_id {
                config.node.id = id;
            }
            init_tracing(&config.log.level);
            if cfg.config.is_none() {
                tracing::info!(
                    listen = %config.node.listen,
                    data = %config.storage.embedded.path.display(),
                    "no config file given: using defaults (embedded store)"
                );
            }
            if config.auth.jwt_secret == chorus_node::config::DEV_SECRET
                || config.auth.api_key == chorus_node::config::DEV_API_KEY
            {
                tracing::warn!("running with the development JWT secret or API key: set auth.jwt_secret and auth.api_key for production");
            }
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let node = chorus_node::start(config).await?;
                // One line on stdout, so scripts (and `--listen 127.0.0.1:0`) learn the address.
                println!("listening on {}", node.http_addr());
                shutdown_signal().await;
                tracing::info!("shutdown requested");
                node.shutdown().await
            })
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
