//! Timings and limits the actors run with (the node fills it from `cluster.toml`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[docs]` in `cluster.toml`: collaborative documents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DocsConfig {
    /// Compact a document's log into a snapshot once this many updates are past the last one.
    pub compact_every_updates: u64,
    /// … or once the updates past the last snapshot hold this many bytes.
    pub compact_every_bytes: u64,
    /// Largest single update a client may send, in bytes (`update_too_large`, 1009 / close 4011).
    pub max_update_bytes: usize,
    /// Largest stored document (snapshot plus updates since), in bytes (`doc_too_large`, 3014 / close 4012).
    pub max_doc_bytes: u64,
    /// Updates per second one connection may send to documents (token bucket rate) …
    pub updates_per_sec: u32,
    /// … and burst (`doc_rate_limited`, 1010 / close 4013).
    pub updates_burst: u32,
    /// A document with no client and nothing to write for this long leaves memory (milliseconds).
    pub passivate_after_ms: u64,
}

impl Default for DocsConfig {
    fn default() -> Self {
        DocsConfig {
            compact_every_updates: 500,
            compact_every_bytes: 1024 * 1024,
            max_update_bytes: 1024 * 1024,
            max_doc_bytes: 8 * 1024 * 1024,
            updates_per_sec: 100,
            updates_burst: 200,
            passivate_after_ms: 60_000,
        }
    }
}

impl DocsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.compact_every_updates == 0 || self.compact_every_bytes == 0 {
            return Err(
                "docs.compact_every_updates and docs.compact_every_bytes must be at least 1".into(),
            );
        }
        if self.max_update_bytes == 0 || self.max_doc_bytes < self.max_update_bytes as u64 {
            return Err(
                "docs.max_update_bytes must be at least 1 and at most docs.max_doc_bytes".into(),
            );
        }
        if self.updates_per_sec == 0 || self.updates_burst == 0 {
            return Err("docs.updates_per_sec and docs.updates_burst must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct ActorConfig {
    /// This node's id (placement and logs).
    pub node_id: String,
    /// A room or user actor with nothing to do for this long stops; it is reloaded on demand.
    pub passivate_after: Duration,
    /// Mailbox capacity of room and user actors (senders wait when full: backpressure).
    pub mailbox: usize,
    /// Mailbox capacity of the node hub.
    pub hub_mailbox: usize,
    /// Frames queued for one connection before it is closed as a slow consumer.
    pub outbound_queue: usize,
    /// Requests per second per connection (token bucket refill rate) and burst size.
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    /// Longest text of a message, in bytes.
    pub max_text_bytes: usize,
    /// Most entries returned by a catch-up; further back answers `recovered: false`.
    pub max_catchup: usize,
    /// Largest history page.
    pub max_page: usize,
    /// How long a typing indicator lasts without being renewed.
    pub typing_ttl: Duration,
    /// A user is idle after this long without activity on any connection.
    pub idle_after: Duration,
    /// Notifications for one user within this window reach a connection as one push.
    pub notify_coalesce: Duration,
    /// Most users one connection may watch.
    pub max_watch: usize,
    /// Collaborative documents.
    pub docs: DocsConfig,
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            node_id: "node-1".to_string(),
            passivate_after: Duration::from_secs(300),
            mailbox: 1024,
            hub_mailbox: 65536,
            outbound_queue: 4096,
            rate_per_sec: 200,
            rate_burst: 400,
            max_text_bytes: 16 * 1024,
            max_catchup: 1000,
            max_page: 200,
            typing_ttl: Duration::from_secs(5),
            idle_after: Duration::from_secs(120),
            notify_coalesce: Duration::from_millis(50),
            max_watch: 1000,
            docs: DocsConfig::default(),
        }
    }
}
