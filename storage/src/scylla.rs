//! The ScyllaDB / Cassandra backend. IMPLEMENTATION IN PROGRESS (helper owns this file).

use serde::{Deserialize, Serialize};
#[allow(unused_imports)]
use crate::{ChannelHead, Entry, Member, Millis, Notification, NotificationPrefs, RoomInfo, Result};


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

#[async_trait::async_trait]
impl crate::Store for ScyllaStore {
    async fn channel_head(&self, channel: &str) -> Result<Option<ChannelHead>> {
        todo!()
    }
    async fn create_channel(&self, channel: &str, epoch: &str) -> Result<ChannelHead> {
        todo!()
    }
    async fn append(&self, channel: &str, entries: &[Entry]) -> Result<()> {
        todo!()
    }
    async fn read_range(&self, channel: &str, from: u64, to: u64, limit: usize) -> Result<Vec<Entry>> {
        todo!()
    }
    async fn read_before(&self, channel: &str, before: u64, limit: usize) -> Result<Vec<Entry>> {
        todo!()
    }
    async fn get_entry(&self, channel: &str, offset: u64) -> Result<Option<Entry>> {
        todo!()
    }
    async fn update_entry(&self, channel: &str, entry: &Entry) -> Result<()> {
        todo!()
    }
    async fn find_client_id(&self, channel: &str, client_id: &str) -> Result<Option<u64>> {
        todo!()
    }
    async fn create_room(&self, room: &RoomInfo) -> Result<bool> {
        todo!()
    }
    async fn get_room(&self, room: &str) -> Result<Option<RoomInfo>> {
        todo!()
    }
    async fn put_member(&self, room: &str, member: &Member) -> Result<()> {
        todo!()
    }
    async fn remove_member(&self, room: &str, user: &str) -> Result<()> {
        todo!()
    }
    async fn members(&self, room: &str) -> Result<Vec<Member>> {
        todo!()
    }
    async fn get_member(&self, room: &str, user: &str) -> Result<Option<Member>> {
        todo!()
    }
    async fn user_rooms(&self, user: &str) -> Result<Vec<String>> {
        todo!()
    }
    async fn set_read_marker(&self, channel: &str, user: &str, offset: u64) -> Result<()> {
        todo!()
    }
    async fn read_marker(&self, channel: &str, user: &str) -> Result<Option<u64>> {
        todo!()
    }
    async fn read_markers(&self, channel: &str) -> Result<Vec<(String, u64)>> {
        todo!()
    }
    async fn put_notification(&self, n: &Notification) -> Result<()> {
        todo!()
    }
    async fn list_notifications( &self, user: &str, before: Option<u64>, limit: usize, unread_only: bool, now: Millis, ) -> Result<Vec<Notification>> {
        todo!()
    }
    async fn mark_notifications_read( &self, user: &str, ids: Option<&[u64]>, now: Millis, ) -> Result<Vec<u64>> {
        todo!()
    }
    async fn unread_notifications(&self, user: &str, now: Millis) -> Result<u64> {
        todo!()
    }
    async fn purge_expired(&self, now: Millis) -> Result<u64> {
        todo!()
    }
    async fn get_prefs(&self, user: &str) -> Result<Option<NotificationPrefs>> {
        todo!()
    }
    async fn put_prefs(&self, user: &str, prefs: &NotificationPrefs) -> Result<()> {
        todo!()
    }
    async fn set_last_seen(&self, user: &str, at: Millis) -> Result<()> {
        todo!()
    }
    async fn last_seen(&self, user: &str) -> Result<Option<Millis>> {
        todo!()
    }
    async fn flush(&self) -> Result<()> {
        todo!()
    }
}
