//! The `[cluster]` section of `cluster.toml`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The shortest cluster secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Nodes of one cluster share this name; gossip from another cluster is ignored.
    pub cluster_id: String,
    /// Gossip addresses (`host:port`) of nodes already in the cluster. Empty,
    /// with no `secret`: a cluster of one.
    pub seeds: Vec<String>,
    /// Gossip (UDP) listen address.
    pub listen: String,
    /// Inter-node transport (libp2p over TCP) listen address.
    pub transport_listen: String,
    /// The host other nodes reach this one at; empty: the listen host.
    pub advertise_host: String,
    /// Shared by every node of the cluster (at least 16 bytes): signs gossip
    /// and keys the transport. Required as soon as the node is not alone.
    pub secret: String,
    /// How often a node gossips with a random peer (ms).
    pub gossip_interval_ms: u64,
    /// Phi-accrual threshold above which a silent node is `down`.
    pub phi_threshold: f64,
    /// Heartbeat intervals longer than this are not sampled (ms).
    pub max_heartbeat_interval_ms: u64,
    /// How long a `down` node stays listed before it is forgotten (ms).
    pub dead_node_grace_ms: u64,
    /// Deadline of a request to another node (ms); late answers are `overloaded` (5004).
    pub request_timeout_ms: u64,
    /// Frames sent to a peer and not yet acknowledged, at most; a full window
    /// makes the sender wait.
    pub window: usize,
    /// Frames queued per peer before senders wait.
    pub send_queue: usize,
    /// Largest inter-node frame accepted (bytes).
    pub max_frame_bytes: usize,
    /// How long a starting node waits to hear from a seed before it serves (ms).
    pub join_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            cluster_id: "chorus".into(),
            seeds: Vec::new(),
            listen: "127.0.0.1:7700".into(),
            transport_listen: "127.0.0.1:7701".into(),
            advertise_host: String::new(),
            secret: String::new(),
            gossip_interval_ms: 200,
            phi_threshold: 6.0,
            max_heartbeat_interval_ms: 2_000,
            dead_node_grace_ms: 60_000,
            request_timeout_ms: 5_000,
            window: 1024,
            send_queue: 4096,
            max_frame_bytes: 16 << 20,
            join_timeout_ms: 3_000,
        }
    }
}

impl ClusterConfig {
    /// Whether this node takes part in a cluster (has seeds or a secret);
    /// otherwise it is a cluster of one and opens no cluster port.
    pub fn enabled(&self) -> bool {
        !self.seeds.is_empty() || !self.secret.is_empty()
    }

    /// What is wrong with this section, if anything.
    pub fn problem(&self) -> Option<String> {
        if !self.enabled() {
            return None;
        }
        if self.secret.len() < MIN_SECRET_BYTES {
            return Some(format!(
                "cluster.secret (CHORUS_CLUSTER_SECRET) must be at least {MIN_SECRET_BYTES} bytes \
                 when the node joins a cluster (cluster.seeds is set): every node of the cluster \
                 uses the same secret to authenticate gossip and inter-node traffic"
            ));
        }
        if self.cluster_id.is_empty() {
            return Some("cluster.cluster_id must not be empty".into());
        }
        if self.gossip_interval_ms == 0 || self.request_timeout_ms == 0 {
            return Some("cluster.gossip_interval_ms and request_timeout_ms must be > 0".into());
        }
        if self.window == 0 || self.send_queue == 0 || self.max_frame_bytes < 1024 {
            return Some(
                "cluster.window and send_queue must be > 0, max_frame_bytes at least 1024".into(),
            );
        }
        if self.phi_threshold.is_nan() || self.phi_threshold <= 0.0 {
            return Some("cluster.phi_threshold must be > 0".into());
        }
        None
    }

    pub fn gossip_interval(&self) -> Duration {
        Duration::from_millis(self.gossip_interval_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn join_timeout(&self) -> Duration {
        Duration::from_millis(self.join_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_needs_a_long_enough_secret() {
        let mut c = ClusterConfig::default();
        assert!(!c.enabled());
        assert_eq!(c.problem(), None);
        c.seeds = vec!["127.0.0.1:7700".into()];
        assert!(c.problem().unwrap().contains("cluster.secret"));
        c.secret = "short".into();
        assert!(c.problem().unwrap().contains("16 bytes"));
        c.secret = "0123456789abcdef".into();
        assert_eq!(c.problem(), None);
        c.seeds.clear();
        assert!(c.enabled(), "a secret alone: the first node of a cluster");
    }
}
