//! Node configuration: `cluster.toml`, then environment overrides, then flags.
//!
//! Every key has a default (see `cluster.toml` at the repository root, which
//! documents each one), unknown keys are rejected with their name, and the
//! environment is read through an explicit table ([`ENV_OVERRIDES`]) from a
//! map the caller passes in, so tests never touch the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use chorus_actors::cluster::ClusterConfig;
use chorus_actors::{ActorConfig, DocsConfig};
use chorus_storage::{Backend, StorageConfig};
use serde::{Deserialize, Serialize};

/// The config format version this node reads.
pub const CONFIG_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub version: u32,
    pub node: NodeSection,
    pub auth: AuthSection,
    pub limits: LimitsSection,
    pub presence: PresenceSection,
    pub chat: ChatSection,
    pub notifications: NotificationsSection,
    pub actors: ActorsSection,
    pub shutdown: ShutdownSection,
    pub cluster: ClusterConfig,
    pub storage: StorageConfig,
    pub docs: DocsConfig,
    pub log: LogSection,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: CONFIG_VERSION,
            node: NodeSection::default(),
            auth: AuthSection::default(),
            limits: LimitsSection::default(),
            presence: PresenceSection::default(),
            chat: ChatSection::default(),
            notifications: NotificationsSection::default(),
            actors: ActorsSection::default(),
            shutdown: ShutdownSection::default(),
            cluster: ClusterConfig::default(),
            storage: StorageConfig::default(),
            docs: DocsConfig::default(),
            log: LogSection::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// This node's id in the cluster and in logs. Empty: `node-<random>` at start.
    pub id: String,
    /// Address of the HTTP server (WebSocket gateway, server API, health, metrics).
    pub listen: String,
    /// HTTP worker threads. 0: one per core.
    pub http_workers: usize,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: String::new(),
            listen: "127.0.0.1:7600".to_string(),
            http_workers: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Accepted JWT algorithms: `HS256` (with `jwt_secret`), `RS256`, `ES256` (with `jwt_public_key_file`).
    pub jwt_algorithms: Vec<String>,
    /// Shared secret for HS256 (and for `chorus token`).
    pub jwt_secret: String,
    /// PEM public key for RS256 / ES256.
    pub jwt_public_key_file: Option<PathBuf>,
    /// Clock skew tolerated on `exp`, in seconds.
    pub leeway_secs: u64,
    /// Key the app's backend sends in `x-api-key` to use the server API.
    pub api_key: String,
}

/// Largest `auth.leeway_secs`: tolerated clock skew, not a second lifetime.
pub const MAX_LEEWAY_SECS: u64 = 86_400;

/// The development secret; the node warns when it runs with it.
pub const DEV_SECRET: &str = "dev-secret-change-me";
/// The development API key; the node warns when it runs with it.
pub const DEV_API_KEY: &str = "dev-api-key";

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            jwt_algorithms: vec!["HS256".to_string()],
            jwt_secret: DEV_SECRET.to_string(),
            jwt_public_key_file: None,
            leeway_secs: 0,
            api_key: DEV_API_KEY.to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest frame a client may send; larger ones get `frame_too_large` (1004).
    pub max_frame_bytes: usize,
    /// Frames above this many bytes are not even read: the socket is closed with 1009.
    pub hard_max_frame_bytes: usize,
    /// Longest message text, in bytes.
    pub max_text_bytes: usize,
    /// Requests per second per connection, and the burst allowed above it.
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    /// Frames queued for one connection before it is closed as a slow consumer (4002).
    pub outbound_queue: usize,
    /// Most entries a resubscribe catches up on; more answers `recovered: false`.
    pub max_catchup: usize,
    /// Largest history page.
    pub max_page: usize,
    /// Most users one connection may watch.
    pub max_watch: usize,
    /// The server pings every connection this often (milliseconds).
    pub ping_interval_ms: u64,
    /// A connection silent for this long is closed with 4004 (milliseconds).
    pub idle_timeout_ms: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_frame_bytes: 64 * 1024,
            hard_max_frame_bytes: 1024 * 1024,
            max_text_bytes: 16 * 1024,
            rate_per_sec: 200,
            rate_burst: 400,
            outbound_queue: 4096,
            max_catchup: 1000,
            max_page: 200,
            max_watch: 1000,
            ping_interval_ms: 30_000,
            idle_timeout_ms: 90_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceSection {
    /// A user is idle after this long without a request on any connection (milliseconds).
    pub idle_after_ms: u64,
}

impl Default for PresenceSection {
    fn default() -> Self {
        PresenceSection {
            idle_after_ms: 120_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatSection {
    /// A typing indicator disappears this long after the last `room.typing` (milliseconds).
    pub typing_ttl_ms: u64,
}

impl Default for ChatSection {
    fn default() -> Self {
        ChatSection {
            typing_ttl_ms: 5_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsSection {
    /// Notifications for one user within this window leave as one push (milliseconds).
    pub coalesce_ms: u64,
    /// How often expired notifications are deleted (milliseconds).
    pub purge_interval_ms: u64,
}

impl Default for NotificationsSection {
    fn default() -> Self {
        NotificationsSection {
            coalesce_ms: 50,
            purge_interval_ms: 60_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorsSection {
    /// Threads of the actor runtime. 0: one per core.
    pub threads: usize,
    /// An idle room or user actor stops after this long and reloads on demand (milliseconds).
    pub passivate_after_ms: u64,
    /// Mailbox capacity of each room and user actor.
    pub mailbox: usize,
    /// Mailbox capacity of the node hub.
    pub hub_mailbox: usize,
}

impl Default for ActorsSection {
    fn default() -> Self {
        ActorsSection {
            threads: 0,
            passivate_after_ms: 300_000,
            mailbox: 1024,
            hub_mailbox: 65_536,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSection {
    /// Upper bound on each shutdown phase (drain connections, stop actors, flush), in milliseconds.
    pub timeout_ms: u64,
    /// The least time the node keeps answering 503 (on `/readyz`, new
    /// handshakes and API calls) before it closes its listener, so a load
    /// balancer's probe sees it; capped at `timeout_ms`.
    pub readiness_grace_ms: u64,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        ShutdownSection {
            timeout_ms: 10_000,
            readiness_grace_ms: 2_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `tracing` filter, e.g. `info` or `chorus_actors=debug,info`. `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".to_string(),
        }
    }
}

type Setter = fn(&mut Config, &str) -> anyhow::Result<()>;

/// Environment variables a node reads, and the key each one sets.
pub const ENV_OVERRIDES: &[(&str, &str, Setter)] = &[
    ("CHORUS_NODE_ID", "node.id", |c, v| {
        c.node.id = v.to_string();
        Ok(())
    }),
    ("CHORUS_NODE_LISTEN", "node.listen", |c, v| {
        c.node.listen = v.to_string();
        Ok(())
    }),
    ("CHORUS_AUTH_JWT_SECRET", "auth.jwt_secret", |c, v| {
        c.auth.jwt_secret = v.to_string();
        Ok(())
    }),
    (
        "CHORUS_AUTH_JWT_PUBLIC_KEY_FILE",
        "auth.jwt_public_key_file",
        |c, v| {
            c.auth.jwt_public_key_file = Some(PathBuf::from(v));
            Ok(())
        },
    ),
    (
        "CHORUS_AUTH_JWT_ALGORITHMS",
        "auth.jwt_algorithms",
        |c, v| {
            c.auth.jwt_algorithms = v.split(',').map(|s| s.trim().to_string()).collect();
            Ok(())
        },
    ),
    ("CHORUS_AUTH_API_KEY", "auth.api_key", |c, v| {
        c.auth.api_key = v.to_string();
        Ok(())
    }),
    ("CHORUS_STORAGE_BACKEND", "storage.backend", |c, v| {
        c.storage.backend = match v {
            "embedded" => Backend::Embedded,
            "scylla" => Backend::Scylla,
            other => bail!("CHORUS_STORAGE_BACKEND: unknown backend `{other}` (embedded, scylla)"),
        };
        Ok(())
    }),
    (
        "CHORUS_STORAGE_EMBEDDED_PATH",
        "storage.embedded.path",
        |c, v| {
            c.storage.embedded.path = PathBuf::from(v);
            Ok(())
        },
    ),
    (
        "CHORUS_STORAGE_SCYLLA_CONTACT_POINTS",
        "storage.scylla.contact_points",
        |c, v| {
            c.storage.scylla.contact_points = v.split(',').map(|s| s.trim().to_string()).collect();
            Ok(())
        },
    ),
    (
        "CHORUS_STORAGE_SCYLLA_KEYSPACE",
        "storage.scylla.keyspace",
        |c, v| {
            c.storage.scylla.keyspace = v.to_string();
            Ok(())
        },
    ),
    (
        "CHORUS_STORAGE_SCYLLA_USERNAME",
        "storage.scylla.username",
        |c, v| {
            c.storage.scylla.username = Some(v.to_string());
            Ok(())
        },
    ),
    (
        "CHORUS_STORAGE_SCYLLA_PASSWORD",
        "storage.scylla.password",
        |c, v| {
            c.storage.scylla.password = Some(v.to_string());
            Ok(())
        },
    ),
    ("CHORUS_CLUSTER_SEEDS", "cluster.seeds", |c, v| {
        c.cluster.seeds = v
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Ok(())
    }),
    ("CHORUS_CLUSTER_SECRET", "cluster.secret", |c, v| {
        c.cluster.secret = v.to_string();
        Ok(())
    }),
    ("CHORUS_CLUSTER_LISTEN", "cluster.listen", |c, v| {
        c.cluster.listen = v.to_string();
        Ok(())
    }),
    (
        "CHORUS_CLUSTER_TRANSPORT_LISTEN",
        "cluster.transport_listen",
        |c, v| {
            c.cluster.transport_listen = v.to_string();
            Ok(())
        },
    ),
    (
        "CHORUS_CLUSTER_ADVERTISE_HOST",
        "cluster.advertise_host",
        |c, v| {
            c.cluster.advertise_host = v.to_string();
            Ok(())
        },
    ),
    ("CHORUS_LOG_LEVEL", "log.level", |c, v| {
        c.log.level = v.to_string();
        Ok(())
    }),
];

impl Config {
    /// Parses a TOML document; unknown keys are an error naming the key.
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{}",
                e.message().trim().to_string() + &location(text, e.span())
            )
        })?;
        Ok(config)
    }

    /// Reads `path` when given (it must exist), applies `env` overrides, and validates.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> anyhow::Result<Config> {
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config file {}", p.display()))?;
                Config::from_toml(&text).with_context(|| format!("in {}", p.display()))?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        Ok(config)
    }

    pub fn apply_env(&mut self, env: &HashMap<String, String>) -> anyhow::Result<()> {
        for (var, _, set) in ENV_OVERRIDES {
            if let Some(v) = env.get(*var) {
                set(self, v).with_context(|| format!("environment variable {var}"))?;
            }
        }
        Ok(())
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.version != CONFIG_VERSION {
            bail!(
                "version = {}: this node reads config version {CONFIG_VERSION}",
                self.version
            );
        }
        self.listen_addr()?;
        if self.auth.jwt_algorithms.is_empty() {
            bail!("auth.jwt_algorithms must name at least one algorithm");
        }
        for alg in &self.auth.jwt_algorithms {
            match alg.as_str() {
                "HS256" if self.auth.jwt_secret.is_empty() => {
                    bail!("auth.jwt_secret is empty but HS256 is accepted")
                }
                "HS256" => {}
                "RS256" | "ES256" if self.auth.jwt_public_key_file.is_none() => {
                    bail!("auth.jwt_public_key_file is required for {alg}")
                }
                "RS256" | "ES256" => {}
                other => {
                    bail!("auth.jwt_algorithms: `{other}` is not supported (HS256, RS256, ES256)")
                }
            }
        }
        if self.auth.api_key.len() < 8 {
            bail!("auth.api_key must be at least 8 characters");
        }
        if let Err(why) = self.docs.validate() {
            bail!("{why}");
        }
        if self.limits.max_frame_bytes == 0
            || self.limits.hard_max_frame_bytes < self.limits.max_frame_bytes
        {
            bail!("limits.hard_max_frame_bytes must be >= limits.max_frame_bytes > 0");
        }
        if self.limits.outbound_queue == 0
            || self.actors.mailbox == 0
            || self.actors.hub_mailbox == 0
        {
            bail!("queue and mailbox sizes must be > 0");
        }
        if self.limits.rate_per_sec == 0 {
            bail!("limits.rate_per_sec must be > 0");
        }
        // A page is clamped to 1..=max_page (0 panics there), and one entry
        // more is read to tell whether there are more: the store returns at
        // most MAX_PAGE, so a larger page would end the history silently.
        if self.limits.max_page == 0 || self.limits.max_page >= chorus_storage::MAX_PAGE {
            bail!(
                "limits.max_page must be 1..={}",
                chorus_storage::MAX_PAGE - 1
            );
        }
        if let Some(problem) = self.cluster.problem() {
            bail!(problem);
        }
        // Token validation subtracts the leeway from the current Unix time.
        if self.auth.leeway_secs > MAX_LEEWAY_SECS {
            bail!("auth.leeway_secs must be at most {MAX_LEEWAY_SECS} (one day)");
        }
        Ok(())
    }

    /// Checks the store fits the cluster: several nodes need the shared one.
    /// (Tests that hand a node its store skip this.)
    pub fn validate_store(&self) -> anyhow::Result<()> {
        if self.cluster.enabled() && self.storage.backend == Backend::Embedded {
            bail!(
                "a node of a cluster needs the shared store: cluster.seeds or cluster.secret is \
                 set, but storage.backend is \"embedded\" (one node's private directory). Set \
                 storage.backend = \"scylla\" (CHORUS_STORAGE_BACKEND=scylla) with \
                 [storage.scylla] contact_points on every node, or remove the seeds and secret \
                 to run a cluster of one"
            );
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.node
            .listen
            .parse()
            .with_context(|| format!("node.listen = {:?} is not an ip:port", self.node.listen))
    }

    /// The node id, generated when the config leaves it empty.
    pub fn node_id(&self) -> String {
        if self.node.id.is_empty() {
            format!("node-{:08x}", rand_u32())
        } else {
            self.node.id.clone()
        }
    }

    pub fn actor_config(&self, node_id: String) -> ActorConfig {
        let ms = Duration::from_millis;
        ActorConfig {
            node_id,
            passivate_after: ms(self.actors.passivate_after_ms),
            mailbox: self.actors.mailbox,
            hub_mailbox: self.actors.hub_mailbox,
            outbound_queue: self.limits.outbound_queue,
            rate_per_sec: self.limits.rate_per_sec,
            rate_burst: self.limits.rate_burst,
            max_text_bytes: self.limits.max_text_bytes,
            max_catchup: self.limits.max_catchup,
            max_page: self.limits.max_page,
            typing_ttl: ms(self.chat.typing_ttl_ms),
            idle_after: ms(self.presence.idle_after_ms),
            notify_coalesce: ms(self.notifications.coalesce_ms),
            max_watch: self.limits.max_watch,
            docs: self.docs.clone(),
        }
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => {
            let line = text[..s.start.min(text.len())].lines().count().max(1);
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_cluster_toml_is_the_defaults() {
        let text = include_str!("../../cluster.toml");
        let parsed = Config::from_toml(text).unwrap();
        assert_eq!(parsed, Config::default());
        parsed.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = Config::from_toml("[node]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = Config::from_toml("[nodes]\n").unwrap_err();
        assert!(err.to_string().contains("nodes"), "{err}");
    }

    #[test]
    fn env_overrides_apply_from_the_given_map() {
        let env: HashMap<String, String> = [
            ("CHORUS_NODE_LISTEN", "127.0.0.1:0"),
            ("CHORUS_AUTH_API_KEY", "a-long-api-key"),
            ("CHORUS_STORAGE_BACKEND", "scylla"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.node.listen, "127.0.0.1:0");
        assert_eq!(c.auth.api_key, "a-long-api-key");
        assert_eq!(c.storage.backend, Backend::Scylla);
        let bad: HashMap<String, String> =
            [("CHORUS_STORAGE_BACKEND".to_string(), "mysql".to_string())]
                .into_iter()
                .collect();
        assert!(Config::load(None, &bad).is_err());
    }

    #[test]
    fn validation_catches_unusable_values() {
        let mut c = Config::default();
        c.auth.jwt_algorithms = vec!["none".into()];
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.auth.jwt_algorithms = vec!["RS256".into()];
        assert!(c.validate().is_err());
        let c = Config {
            version: 2,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn page_and_leeway_limits_that_break_requests_are_refused() {
        // Both validated before: max_page = 0 panicked every `history`
        // request (`clamp(1, 0)`), a page of MAX_PAGE or more never said
        // `more`, and a leeway past the current Unix time overflowed token
        // validation (every token expired, or a panic with overflow checks).
        for (max_page, ok) in [
            (0, false),
            (1, true),
            (chorus_storage::MAX_PAGE - 1, true),
            (chorus_storage::MAX_PAGE, false),
            (usize::MAX, false),
        ] {
            let mut c = Config::default();
            c.limits.max_page = max_page;
            assert_eq!(c.validate().is_ok(), ok, "max_page = {max_page}");
        }
        for (leeway, ok) in [
            (MAX_LEEWAY_SECS, true),
            (MAX_LEEWAY_SECS + 1, false),
            (u64::MAX, false),
        ] {
            let mut c = Config::default();
            c.auth.leeway_secs = leeway;
            assert_eq!(c.validate().is_ok(), ok, "leeway_secs = {leeway}");
        }
        let err = Config::from_toml("[limits]\nmax_page = 0\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("limits.max_page"), "{err}");
    }
}
