//! The embedded backend (fjall). IMPLEMENTATION IN PROGRESS (helper owns this file).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
#[allow(unused_imports)]
use crate::{ChannelHead, Entry, Member, Millis, Notification, NotificationPrefs, RoomInfo, Result};


/// `[storage.embedded]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Directory of the store; created if missing.
    pub path: PathBuf,
    /// Longest time an append waits for other appends to share its fsync, in microseconds.
    /// 0 syncs as soon as the previous sync ends (still grouping whatever arrived meanwhile).
    pub group_commit_window_us: u64,
    /// Block cache size in MiB.
    pub cache_mb: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig { path: PathBuf::from("./data"), group_commit_window_us: 0, cache_mb: 64 }
    }
}

pub struct EmbeddedStore {}

impl EmbeddedStore {
    pub fn open(_config: &EmbeddedConfig) -> crate::Result<EmbeddedStore> {
        todo!()
    }
}

#[async_trait::async_trait]
impl crate::Store for EmbeddedStore {
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
