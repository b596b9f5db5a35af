//! The ScyllaDB / Cassandra backend. IMPLEMENTATION IN PROGRESS (helper owns this file).

use serde::{Deserialize, Serialize};

/// `[storage.scylla]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScyllaConfig {
    /// `host:port` of one or more nodes of the cluster.
    pub contact_points: Vec<String>,
    pub keyspace: String,
    /// `SimpleStrategy` or `NetworkTopologyStrategy` (used when Chorus creates the keyspace).
    pub replication_strategy: String,
    pub replication_factor: u32,
    /// Datacenter name for `NetworkTopologyStrategy` and for DC-aware load balancing.
    pub datacenter: Option<String>,
    /// `one`, `local_one`, `quorum`, `local_quorum`, `all`, …
    pub read_consistency: String,
    pub write_consistency: String,
    pub request_timeout_ms: u64,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Run pending schema migrations when the node starts.
    pub migrate_on_start: bool,
    /// Messages per history bucket (partition): bounds partition size.
    pub bucket_size: u64,
    /// Most requests in flight from this node at once.
    pub max_in_flight: usize,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            contact_points: vec!["127.0.0.1:9042".to_string()],
            keyspace: "chorus".to_string(),
            replication_strategy: "SimpleStrategy".to_string(),
            replication_factor: 1,
            datacenter: None,
            read_consistency: "local_quorum".to_string(),
            write_consistency: "local_quorum".to_string(),
            request_timeout_ms: 5000,
            username: None,
            password: None,
            migrate_on_start: true,
            bucket_size: 1000,
            max_in_flight: 1024,
        }
    }
}

pub struct ScyllaStore {}

impl ScyllaStore {
    pub async fn connect(_config: &ScyllaConfig) -> crate::Result<ScyllaStore> {
        todo!()
    }
}
