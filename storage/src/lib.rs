//! Chorus storage: one [`Store`] trait, one file per backend, one conformance suite.
//!
//! - [`Store`]: everything the actors persist: channel entries (room messages,
//!   topic and feed publications) with their offsets and epochs, rooms and
//!   membership, read markers, notification inboxes and preferences, last-seen.
//! - [`embedded`]: the default backend, an embedded LSM store (fjall) in one
//!   directory. Appends are acknowledged after a *group* fsync: concurrent
//!   writers share one `fsync`, never one per message under load.
//! - [`scylla`]: the ScyllaDB / Cassandra backend a cluster shares.
//! - [`conformance`]: the behaviour every backend must have, run by each
//!   backend's tests (feature `conformance` exposes it to other crates).
//! - [`doc`]: the stored form of a collaborative document (an update log
//!   compacted into snapshots), written by the document's actor only.
//!
//! Data flow: a room actor is the only writer of its channel; it assigns
//! offsets `head+1..` and calls [`Store::append`], which fails with
//! [`ErrorKind::Conflict`] instead of overwriting if any of those offsets is
//! already taken (two nodes that both believe they own the room), so an
//! acknowledged entry is never lost or replaced.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use chorus_protocol::{
    ChannelHead, Entry, EntryKind, Member, Millis, Notification, NotificationPrefs, RoomInfo,
};

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod doc;
pub mod embedded;
pub mod error;
pub mod scylla;

pub use doc::{DocRecord, DocUpdate};
pub use error::{ErrorKind, StorageError};

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// The key under which a backend records a client message id: the sender
/// and the id, so one sender's ids never answer for another's.
pub fn client_key(sender: Option<&str>, client_id: &str) -> String {
    format!("{}\u{0}{client_id}", sender.unwrap_or_default())
}

/// The largest page any list or range call returns, whatever `limit` asks.
pub const MAX_PAGE: usize = 1000;

/// A storage backend. Every method is durable on return when it writes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- channels: rooms, topics, feeds (keyed `room:42`, `topic:x`, `feed:u`) ----

    /// The channel's head, or `None` if it was never created.
    async fn channel_head(&self, channel: &str) -> Result<Option<ChannelHead>>;

    /// Creates the channel with `epoch` if it does not exist; returns the head either way.
    async fn create_channel(&self, channel: &str, epoch: &str) -> Result<ChannelHead>;

    /// Appends `entries`, whose offsets must be consecutive and follow the
    /// current head. All or nothing: if any offset is already taken the call
    /// fails with [`ErrorKind::Conflict`] and writes nothing; a channel that was
    /// never created fails with [`ErrorKind::NotFound`]. Entries carrying a
    /// `client_id` also record it, so [`Store::find_client_id`] finds them.
    /// Durable (fsynced) on return.
    async fn append(&self, channel: &str, entries: &[Entry]) -> Result<()>;

    /// Entries with `from <= offset <= to`, oldest first, at most `limit` (capped at [`MAX_PAGE`]).
    async fn read_range(
        &self,
        channel: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Entry>>;

    /// The `limit` newest entries with `offset < before`, returned oldest first.
    async fn read_before(&self, channel: &str, before: u64, limit: usize) -> Result<Vec<Entry>>;

    /// One entry.
    async fn get_entry(&self, channel: &str, offset: u64) -> Result<Option<Entry>>;

    /// Replaces the stored entry at `entry.offset` (an edited or deleted
    /// message keeps its offset; the edit itself is appended as its own entry).
    /// Fails with [`ErrorKind::NotFound`] if there is none. The client-id index is left as it is.
    async fn update_entry(&self, channel: &str, entry: &Entry) -> Result<()>;

    /// The offset stored for a client-supplied message id of `sender`, if
    /// any. Ids belong to their sender: two senders' equal ids are two
    /// messages (a sender-less entry, from the server API without `sender`,
    /// is its own sender).
    async fn find_client_id(
        &self,
        channel: &str,
        sender: Option<&str>,
        client_id: &str,
    ) -> Result<Option<u64>>;

    // ---- rooms and membership ----

    /// Stores the room if no room with that id exists; returns whether it was created.
    async fn create_room(&self, room: &RoomInfo) -> Result<bool>;
    async fn get_room(&self, room: &str) -> Result<Option<RoomInfo>>;
    /// Adds or replaces a member; also indexes the room under the user.
    async fn put_member(&self, room: &str, member: &Member) -> Result<()>;
    async fn remove_member(&self, room: &str, user: &str) -> Result<()>;
    async fn members(&self, room: &str) -> Result<Vec<Member>>;
    async fn get_member(&self, room: &str, user: &str) -> Result<Option<Member>>;
    /// The rooms `user` is a member of.
    async fn user_rooms(&self, user: &str) -> Result<Vec<String>>;

    // ---- read markers ----

    /// Moves the marker forward to `offset`; a lower offset than the stored
    /// one changes nothing, whatever order two writers' calls land in (two
    /// nodes that both believe they own the room).
    async fn set_read_marker(&self, channel: &str, user: &str, offset: u64) -> Result<()>;
    async fn read_marker(&self, channel: &str, user: &str) -> Result<Option<u64>>;
    async fn read_markers(&self, channel: &str) -> Result<Vec<(String, u64)>>;

    // ---- notifications ----

    /// Stores a notification if its id is free for its user (its
    /// `expires_at`, if any, is enforced by the backend). Returns `false`,
    /// writing nothing, when a notification with that id exists: two nodes
    /// that both believe they own the user minted the same id, and the
    /// caller takes another.
    async fn put_notification(&self, n: &Notification) -> Result<bool>;
    /// Newest first, ids `< before` when given, unexpired at `now`.
    async fn list_notifications(
        &self,
        user: &str,
        before: Option<u64>,
        limit: usize,
        unread_only: bool,
        now: Millis,
    ) -> Result<Vec<Notification>>;
    /// Marks `ids` (or every notification when `None`) read; returns the ids that
    /// changed, in no particular order.
    async fn mark_notifications_read(
        &self,
        user: &str,
        ids: Option<&[u64]>,
        now: Millis,
    ) -> Result<Vec<u64>>;
    /// Unread, unexpired notifications at `now`.
    async fn unread_notifications(&self, user: &str, now: Millis) -> Result<u64>;
    /// Deletes notifications expired at `now`; returns how many. Backends
    /// with native TTL may return 0 and let the database do it.
    async fn purge_expired(&self, now: Millis) -> Result<u64>;
    async fn get_prefs(&self, user: &str) -> Result<Option<NotificationPrefs>>;
    async fn put_prefs(&self, user: &str, prefs: &NotificationPrefs) -> Result<()>;

    // ---- presence ----

    async fn set_last_seen(&self, user: &str, at: Millis) -> Result<()>;
    async fn last_seen(&self, user: &str) -> Result<Option<Millis>>;

    // ---- collaborative documents (keyed by document name) ----

    /// The document's snapshot and the updates after it; `None` if it was
    /// never written (or was deleted).
    async fn doc_load(&self, doc: &str) -> Result<Option<DocRecord>>;

    /// Appends `updates`, whose seqs must be consecutive and follow the
    /// document's head (1 for a new document, which this creates). All or
    /// nothing: otherwise it fails with [`ErrorKind::Conflict`] and writes
    /// nothing (two nodes that both believe they own the document). Durable
    /// on return.
    async fn doc_append(&self, doc: &str, updates: &[DocUpdate]) -> Result<()>;

    /// Replaces the snapshot and every update with `seq <= upto` by
    /// `snapshot`, the merged state at `upto`; later updates stay. A
    /// compaction at or below the current snapshot changes nothing. Fails
    /// with [`ErrorKind::NotFound`] for a document that does not exist and
    /// [`ErrorKind::Conflict`] when `upto` is past the head.
    async fn doc_compact(&self, doc: &str, upto: u64, snapshot: &[u8]) -> Result<()>;

    /// Deletes the document (log and snapshot); returns whether it existed.
    async fn doc_delete(&self, doc: &str) -> Result<bool>;

    /// Makes everything written so far durable (called at shutdown).
    async fn flush(&self) -> Result<()>;
}

/// Which backend a node uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Embedded,
    Scylla,
}

/// `[storage]` in `cluster.toml`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: Backend,
    pub embedded: embedded::EmbeddedConfig,
    pub scylla: scylla::ScyllaConfig,
}

/// Opens the configured backend.
pub async fn open(config: &StorageConfig) -> Result<Arc<dyn Store>> {
    match config.backend {
        Backend::Embedded => {
            // Opening replays the journal: blocking work, kept off the async runtime.
            let cfg = config.embedded.clone();
            let store = tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(&cfg))
                .await
                .map_err(|e| StorageError::internal(format!("opening the store: {e}")))??;
            Ok(Arc::new(store))
        }
        Backend::Scylla => Ok(Arc::new(
            scylla::ScyllaStore::connect(&config.scylla).await?,
        )),
    }
}
