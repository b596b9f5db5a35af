//! Timings and limits the actors run with (the node fills it from `cluster.toml`).

use std::time::Duration;

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
        }
    }
}
