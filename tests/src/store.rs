//! A store wrapper for tests that need a write to be in flight at a chosen
//! moment, or a node cut off from the store: [`HeldStore::hold`] makes every
//! channel append wait until [`HeldStore::release`]; [`HeldStore::cut`]
//! makes every call fail as an unreachable store does (retryable
//! `unavailable`) until [`HeldStore::reconnect`]; otherwise everything goes
//! straight to the inner store.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chorus_protocol::{
    ChannelHead, Entry, Member, Millis, Notification, NotificationPrefs, RoomInfo,
};
use chorus_storage::{DocRecord, DocUpdate, Result, StorageError, Store};
use tokio::sync::watch;

pub struct HeldStore {
    inner: Arc<dyn Store>,
    held: watch::Sender<bool>,
    waiting: AtomicUsize,
    cut: AtomicBool,
}

impl HeldStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<HeldStore> {
        Arc::new(HeldStore {
            inner,
            held: watch::Sender::new(false),
            waiting: AtomicUsize::new(0),
            cut: AtomicBool::new(false),
        })
    }

    /// Appends from now on wait for [`HeldStore::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Every call fails from now on, as with a store out of reach (the
    /// node is on the minority side of a partition), until [`HeldStore::reconnect`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn reconnect(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    fn reachable(&self) -> Result<()> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(StorageError::unavailable(
                "the store is out of reach (a test partition)",
            ));
        }
        Ok(())
    }

    /// How many appends are waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for HeldStore {
    async fn append(&self, channel: &str, entries: &[Entry]) -> Result<()> {
        self.reachable()?;
        let mut held = self.held.subscribe();
        if *held.borrow_and_update() {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _ = held.wait_for(|h| !*h).await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.reachable()?;
        }
        self.inner.append(channel, entries).await
    }

    async fn channel_head(&self, channel: &str) -> Result<Option<ChannelHead>> {
        self.reachable()?;
        self.inner.channel_head(channel).await
    }
    async fn create_channel(&self, channel: &str, epoch: &str) -> Result<ChannelHead> {
        self.reachable()?;
        self.inner.create_channel(channel, epoch).await
    }
    async fn read_range(
        &self,
        channel: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        self.reachable()?;
        self.inner.read_range(channel, from, to, limit).await
    }
    async fn read_before(&self, channel: &str, before: u64, limit: usize) -> Result<Vec<Entry>> {
        self.reachable()?;
        self.inner.read_before(channel, before, limit).await
    }
    async fn get_entry(&self, channel: &str, offset: u64) -> Result<Option<Entry>> {
        self.reachable()?;
        self.inner.get_entry(channel, offset).await
    }
    async fn update_entry(&self, channel: &str, entry: &Entry) -> Result<()> {
        self.reachable()?;
        self.inner.update_entry(channel, entry).await
    }
    async fn find_client_id(
        &self,
        channel: &str,
        sender: Option<&str>,
        client_id: &str,
    ) -> Result<Option<u64>> {
        self.reachable()?;
        self.inner.find_client_id(channel, sender, client_id).await
    }
    async fn create_room(&self, room: &RoomInfo) -> Result<bool> {
        self.reachable()?;
        self.inner.create_room(room).await
    }
    async fn get_room(&self, room: &str) -> Result<Option<RoomInfo>> {
        self.reachable()?;
        self.inner.get_room(room).await
    }
    async fn put_member(&self, room: &str, member: &Member) -> Result<()> {
        self.reachable()?;
        self.inner.put_member(room, member).await
    }
    async fn remove_member(&self, room: &str, user: &str) -> Result<()> {
        self.reachable()?;
        self.inner.remove_member(room, user).await
    }
    async fn members(&self, room: &str) -> Result<Vec<Member>> {
        self.reachable()?;
        self.inner.members(room).await
    }
    async fn get_member(&self, room: &str, user: &str) -> Result<Option<Member>> {
        self.reachable()?;
        self.inner.get_member(room, user).await
    }
    async fn user_rooms(&self, user: &str) -> Result<Vec<String>> {
        self.reachable()?;
        self.inner.user_rooms(user).await
    }
    async fn set_read_marker(&self, channel: &str, user: &str, offset: u64) -> Result<()> {
        self.reachable()?;
        self.inner.set_read_marker(channel, user, offset).await
    }
    async fn read_marker(&self, channel: &str, user: &str) -> Result<Option<u64>> {
        self.reachable()?;
        self.inner.read_marker(channel, user).await
    }
    async fn read_markers(&self, channel: &str) -> Result<Vec<(String, u64)>> {
        self.reachable()?;
        self.inner.read_markers(channel).await
    }
    async fn put_notification(&self, n: &Notification) -> Result<bool> {
        self.reachable()?;
        self.inner.put_notification(n).await
    }
    async fn list_notifications(
        &self,
        user: &str,
        before: Option<u64>,
        limit: usize,
        unread_only: bool,
        now: Millis,
    ) -> Result<Vec<Notification>> {
        self.reachable()?;
        self.inner
            .list_notifications(user, before, limit, unread_only, now)
            .await
    }
    async fn mark_notifications_read(
        &self,
        user: &str,
        ids: Option<&[u64]>,
        now: Millis,
    ) -> Result<Vec<u64>> {
        self.reachable()?;
        self.inner.mark_notifications_read(user, ids, now).await
    }
    async fn unread_notifications(&self, user: &str, now: Millis) -> Result<u64> {
        self.reachable()?;
        self.inner.unread_notifications(user, now).await
    }
    async fn purge_expired(&self, now: Millis) -> Result<u64> {
        self.reachable()?;
        self.inner.purge_expired(now).await
    }
    async fn get_prefs(&self, user: &str) -> Result<Option<NotificationPrefs>> {
        self.reachable()?;
        self.inner.get_prefs(user).await
    }
    async fn put_prefs(&self, user: &str, prefs: &NotificationPrefs) -> Result<()> {
        self.reachable()?;
        self.inner.put_prefs(user, prefs).await
    }
    async fn set_last_seen(&self, user: &str, at: Millis) -> Result<()> {
        self.reachable()?;
        self.inner.set_last_seen(user, at).await
    }
    async fn last_seen(&self, user: &str) -> Result<Option<Millis>> {
        self.reachable()?;
        self.inner.last_seen(user).await
    }
    async fn doc_load(&self, doc: &str) -> Result<Option<DocRecord>> {
        self.reachable()?;
        self.inner.doc_load(doc).await
    }
    async fn doc_append(&self, doc: &str, updates: &[DocUpdate]) -> Result<()> {
        self.reachable()?;
        self.inner.doc_append(doc, updates).await
    }
    async fn doc_compact(&self, doc: &str, upto: u64, snapshot: &[u8]) -> Result<()> {
        self.reachable()?;
        self.inner.doc_compact(doc, upto, snapshot).await
    }
    async fn doc_delete(&self, doc: &str) -> Result<bool> {
        self.reachable()?;
        self.inner.doc_delete(doc).await
    }
    async fn flush(&self) -> Result<()> {
        self.reachable()?;
        self.inner.flush().await
    }
}
