//! The embedded backend: one fjall database in one directory, for a single node.
//!
//! # Key layout
//!
//! Every table of the storage model is a fjall keyspace. Ids (channels, rooms,
//! users) never contain a `0` byte (`chorus_protocol::valid_id`), so `\0`
//! separates the parts of a key and a `name \0` prefix scan never runs into
//! the rows of a longer name that starts the same way. Numbers are big-endian
//! so the byte order of keys is their numeric order.
//!
//! | keyspace | key | value |
//! |---|---|---|
//! | `entries` | `channel \0 offset` | [`Entry`] |
//! | `heads` | `channel` | [`ChannelHead`] |
//! | `client_ids` | `channel \0 sender \0 client_id` | offset |
//! | `rooms` | `room` | [`RoomInfo`] |
//! | `members` | `room \0 user` | [`Member`] |
//! | `user_rooms` | `user \0 room` | (empty) |
//! | `read_markers` | `channel \0 user` | offset |
//! | `notifications` | `user \0 id` | [`Notification`] |
//! | `notif_expiry` | `expires_at \0 user \0 id` | (empty) |
//! | `prefs` | `user` | [`NotificationPrefs`] |
//! | `last_seen` | `user` | millis |
//! | `doc_updates` | `doc \0 seq` | the update's bytes |
//! | `doc_snapshots` | `doc` | `seq` (8 bytes) then the snapshot's bytes |
//! | `meta` | `layout` | layout version |
//!
//! A channel's history is then one contiguous key range, so a page is one
//! range scan (the embedded counterpart of the `(room, bucket)` partitions of
//! the ScyllaDB backend), and an inbox page is a reverse scan from `before`.
//! Records are MessagePack (`rmp_serde::to_vec_named`) of the protocol structs,
//! the same bytes whatever reads them. `notif_expiry` exists so that
//! [`Store::purge_expired`] reads only what expired instead of every inbox; a
//! stale row (the notification was replaced with another expiry) is dropped
//! when purge meets it.
//!
//! # Why group commit
//!
//! Every write must be durable before it is acknowledged, and an fsync costs
//! milliseconds on many disks: one fsync per message would cap a node at a
//! few hundred messages per second whatever the CPU. fjall writes batches to a
//! single journal, and one fsync of that journal makes every batch written
//! before it durable. So a write commits its batch (flushed to the OS, not
//! synced), takes a ticket from a counter that only moves after the commit
//! returned, and waits until the syncer thread reports that tickets up to its
//! own are durable. The syncer reads the counter *before* it calls
//! `persist(SyncAll)`, so every batch counted is in the synced journal, and
//! that one fsync acknowledges all of them.
//!
//! Two things keep the groups large when the disk is fast (an fsync takes
//! about 125 µs on the machine this was measured on, less than it takes the
//! writers it just woke to come back with their next batch):
//!
//! - Before syncing, the syncer waits for writes already in flight (started,
//!   no ticket yet) and, if the previous group was bigger, for as many as it
//!   held; never longer than `group_commit_window_us`, or with no window than
//!   the previous fsync took. A writer pays at most about one more fsync of
//!   latency, and a lone writer on an idle store does not wait at all.
//! - The lock that makes an append's offset check and its commit atomic is
//!   striped by channel. fjall holds its journal lock during an fsync, so with
//!   one store-wide lock the writer waiting for the journal would hold the lock
//!   every other writer needs, and after each fsync they could only trickle in
//!   one at a time.
//!
//! Measured (debug build, `tests/embedded.rs`): 200 appends from 50
//! concurrent channel writers took 6 to 28 fsyncs (44 with both cores busy
//! with other work); with one store-wide lock and no in-flight wait, 163.
//!
//! Writers wait on a `tokio::sync::watch`, not on a thread, so thousands of
//! pending appends hold no thread; fjall's own calls are blocking and run on
//! `spawn_blocking`. No lock is held across an `.await`: the stripe lock is
//! released before the wait for the fsync.
//!
//! A reader may see a batch between its commit and its fsync (fjall shows
//! committed data at once). Such a batch is already in the OS, so it survives
//! a killed process, only a power cut can lose it, and its writer has not been
//! acknowledged. A write that changes nothing (e.g. `create_room` of an
//! existing room) still waits for the fsync of what it observed.

use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode};
use parking_lot::{Condvar, Mutex};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    ChannelHead, DocRecord, DocUpdate, Entry, Member, Millis, Notification, NotificationPrefs,
    Result, RoomInfo, StorageError, Store, MAX_PAGE,
};

/// `[storage.embedded]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Directory of the store; created if missing.
    pub path: PathBuf,
    /// Longest time an append waits for other appends to share its fsync, in microseconds.
    /// 0 syncs as soon as the previous sync ends (still grouping whatever arrived meanwhile,
    /// and waiting for appends already being written, at most about one fsync's duration).
    pub group_commit_window_us: u64,
    /// Block cache size in MiB.
    pub cache_mb: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            path: PathBuf::from("./data"),
            group_commit_window_us: 0,
            cache_mb: 64,
        }
    }
}

/// The version of the key layout above, stored in `meta` so that a future
/// layout change refuses to read an old directory instead of misreading it.
const LAYOUT_VERSION: u8 = 1;

/// Most rows one `purge_expired` batch deletes, so a large purge does not hold
/// the inbox lock (and delay notifications) for long.
const PURGE_CHUNK: usize = 1000;

/// Longest the syncer waits for in-flight writes when no window is configured.
const MAX_GATHER: Duration = Duration::from_millis(5);

/// Lock stripes for channels and rooms (see [`Inner::locks`]).
const LOCK_STRIPES: usize = 64;

/// The value of index rows, whose key says everything.
const EMPTY: [u8; 0] = [];

/// The embedded (fjall) backend. See the module docs.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    /// What the syncer publishes: writers wait here for their ticket.
    durable: watch::Receiver<Durable>,
    /// Joined on drop, so that the directory is unlocked when the store is gone.
    syncer: Option<JoinHandle<()>>,
}

struct Inner {
    db: Database,
    ks: Tables,
    /// Serialise the read-check-write of a channel or room (append's offset
    /// check, create-once), so two writers cannot both pass a check. Striped by
    /// name so that writers of different channels rarely wait for each other.
    locks: Box<[Mutex<()>]>,
    /// Serialises inbox updates (mark read, purge) against each other and puts,
    /// so a read flag or a purge is never undone by a concurrent rewrite.
    inbox: Mutex<()>,
    commit: Arc<GroupCommit>,
}

struct Tables {
    entries: Keyspace,
    heads: Keyspace,
    client_ids: Keyspace,
    rooms: Keyspace,
    members: Keyspace,
    user_rooms: Keyspace,
    read_markers: Keyspace,
    notifications: Keyspace,
    notif_expiry: Keyspace,
    prefs: Keyspace,
    last_seen: Keyspace,
    doc_updates: Keyspace,
    doc_snapshots: Keyspace,
    meta: Keyspace,
}

/// State shared by writers and the syncer thread.
struct GroupCommit {
    /// Tickets handed out; a batch takes the next one only after its commit returned.
    written: AtomicU64,
    /// How many fsyncs the syncer made (lets tests and metrics show the grouping).
    syncs: AtomicU64,
    wake: Mutex<SyncerWake>,
    cv: Condvar,
}

struct SyncerWake {
    /// Highest ticket somebody waits for.
    wanted: u64,
    /// Writes between their start and their ticket: the syncer waits for them
    /// (briefly) so that they share its fsync instead of each needing the next.
    in_flight: u64,
    shutdown: bool,
}

/// Counts a write as in flight until dropped (also when the write fails or
/// its task is dropped unrun), then tells the syncer.
struct InFlight(Arc<GroupCommit>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut wake = self.0.wake.lock();
        wake.in_flight = wake.in_flight.saturating_sub(1);
        drop(wake);
        self.0.cv.notify_all();
    }
}

/// Published by the syncer after each fsync.
#[derive(Clone, Debug, Default)]
struct Durable {
    /// Every ticket up to this one is fsynced.
    upto: u64,
    /// Set when an fsync failed: fjall then refuses every further write, so
    /// every writer still waiting is told.
    failed: Option<String>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `config.path`, recovering everything
    /// that was acknowledged before.
    pub fn open(config: &EmbeddedConfig) -> Result<EmbeddedStore> {
        EmbeddedStore::open_with(config, false)
    }

    /// Like [`EmbeddedStore::open`], but deletes `config.path` when the store
    /// is dropped: for tests and throwaway nodes that need a real store and no
    /// cleanup of their own.
    pub fn open_temporary(config: &EmbeddedConfig) -> Result<EmbeddedStore> {
        EmbeddedStore::open_with(config, true)
    }

    fn open_with(config: &EmbeddedConfig, temporary: bool) -> Result<EmbeddedStore> {
        std::fs::create_dir_all(&config.path).map_err(|e| {
            StorageError::unavailable(format!(
                "cannot create store directory {}: {e}",
                config.path.display()
            ))
        })?;
        let db = Database::builder(&config.path)
            .cache_size(config.cache_mb.saturating_mul(1024 * 1024))
            .temporary(temporary)
            .open()
            .map_err(|e| open_err(&config.path, e))?;
        let ks = Tables::open(&db).map_err(|e| open_err(&config.path, e))?;
        check_layout(&ks.meta)?;

        let commit = Arc::new(GroupCommit {
            written: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            wake: Mutex::new(SyncerWake {
                wanted: 0,
                in_flight: 0,
                shutdown: false,
            }),
            cv: Condvar::new(),
        });
        let (tx, durable) = watch::channel(Durable::default());
        let window = Duration::from_micros(config.group_commit_window_us);
        let syncer = {
            let db = db.clone();
            let commit = Arc::clone(&commit);
            std::thread::Builder::new()
                .name("chorus-store-sync".to_string())
                .spawn(move || run_syncer(db, commit, tx, window))
                .map_err(|e| StorageError::internal(format!("cannot start syncer thread: {e}")))?
        };
        let inner = Inner {
            db,
            ks,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            inbox: Mutex::new(()),
            commit,
        };
        Ok(EmbeddedStore {
            inner: Arc::new(inner),
            durable,
            syncer: Some(syncer),
        })
    }

    /// How many fsyncs this store has made since it was opened.
    pub fn syncs(&self) -> u64 {
        self.inner.commit.syncs.load(Ordering::Relaxed)
    }

    /// Runs blocking fjall work off the async runtime.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StorageError::internal(format!("storage task failed: {e}")))?
    }

    /// Runs a write (which returns its ticket) and waits until it is durable.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<(T, u64)> + Send + 'static,
    {
        let in_flight = self.inner.commit.enter();
        let (value, ticket) = self
            .run(move |db| {
                let _in_flight = in_flight;
                f(db)
            })
            .await?;
        self.wait_durable(ticket).await?;
        Ok(value)
    }

    async fn wait_durable(&self, ticket: u64) -> Result<()> {
        let mut rx = self.durable.clone();
        let state = rx
            .wait_for(|d| d.upto >= ticket || d.failed.is_some())
            .await
            .map_err(|_| StorageError::internal("store syncer stopped"))?;
        if state.upto >= ticket {
            return Ok(());
        }
        Err(StorageError::internal(format!(
            "fsync failed: {}",
            state.failed.as_deref().unwrap_or("unknown error")
        )))
    }
}

impl Drop for EmbeddedStore {
    /// Stops the syncer (after a last fsync if anybody still waits) and joins
    /// it, so the directory can be opened again at once; this blocks for at
    /// most one fsync.
    fn drop(&mut self) {
        {
            let mut wake = self.inner.commit.wake.lock();
            wake.shutdown = true;
        }
        self.inner.commit.cv.notify_all();
        if let Some(handle) = self.syncer.take() {
            if handle.join().is_err() {
                tracing::error!("store syncer thread panicked");
            }
        }
    }
}

/// The syncer thread: one fsync for everything written since the last one.
///
/// Before syncing it waits for the writes already in flight (committing, or
/// queued behind the lock), up to `window`, or with no window up to the
/// duration of the previous fsync (clamped to [`MAX_GATHER`]): on a fast disk
/// the fsync would otherwise end before the next writers committed, and each
/// group would hold one or two writes. Waiting as long as an fsync costs a
/// writer at most one more fsync of latency; nobody in flight, no wait.
fn run_syncer(
    db: Database,
    commit: Arc<GroupCommit>,
    tx: watch::Sender<Durable>,
    window: Duration,
) {
    let mut done = 0u64;
    let mut last_fsync = Duration::ZERO;
    let mut last_group = 0u64;
    loop {
        {
            let mut wake = commit.wake.lock();
            while wake.wanted <= done && !wake.shutdown {
                commit.cv.wait(&mut wake);
            }
            if wake.wanted <= done {
                // Shut down, and nobody is waiting for anything.
                return;
            }
            let gather = if window.is_zero() {
                last_fsync.min(MAX_GATHER)
            } else {
                window
            };
            let deadline = Instant::now() + gather;
            loop {
                let group = commit.written.load(Ordering::SeqCst).saturating_sub(done);
                let more_coming = wake.in_flight > 0 || group < last_group;
                if !more_coming
                    || wake.shutdown
                    || commit.cv.wait_until(&mut wake, deadline).timed_out()
                {
                    break;
                }
            }
        }
        // Read before persisting: every ticket counted here belongs to a batch
        // already in the journal, so the fsync below covers it.
        let upto = commit.written.load(Ordering::SeqCst);
        last_group = upto.saturating_sub(done);
        let started = Instant::now();
        let result = db.persist(PersistMode::SyncAll);
        last_fsync = started.elapsed();
        commit.syncs.fetch_add(1, Ordering::Relaxed);
        done = upto;
        match result {
            Ok(()) => tx.send_modify(|d| d.upto = d.upto.max(upto)),
            Err(e) => {
                tracing::error!(error = %e, "store fsync failed; the store refuses further writes");
                tx.send_modify(|d| d.failed = Some(e.to_string()));
            }
        }
    }
}

impl GroupCommit {
    /// Marks a write as started (see [`SyncerWake::in_flight`]).
    fn enter(self: &Arc<Self>) -> InFlight {
        self.wake.lock().in_flight += 1;
        InFlight(Arc::clone(self))
    }

    /// Takes the ticket of a batch that was just committed (or of the state a
    /// no-op write observed) and asks the syncer for it.
    fn ticket(&self, wrote: bool) -> u64 {
        let ticket = if wrote {
            self.written.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.written.load(Ordering::SeqCst)
        };
        let mut wake = self.wake.lock();
        if ticket > wake.wanted {
            wake.wanted = ticket;
            drop(wake);
            self.cv.notify_one();
        }
        ticket
    }
}

impl Tables {
    fn open(db: &Database) -> fjall::Result<Tables> {
        let ks = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        Ok(Tables {
            entries: ks("entries")?,
            heads: ks("heads")?,
            client_ids: ks("client_ids")?,
            rooms: ks("rooms")?,
            members: ks("members")?,
            user_rooms: ks("user_rooms")?,
            read_markers: ks("read_markers")?,
            notifications: ks("notifications")?,
            notif_expiry: ks("notif_expiry")?,
            prefs: ks("prefs")?,
            last_seen: ks("last_seen")?,
            // Added after layout 1 without changing it: a directory written
            // before simply has no documents.
            doc_updates: ks("doc_updates")?,
            doc_snapshots: ks("doc_snapshots")?,
            meta: ks("meta")?,
        })
    }
}

fn check_layout(meta: &Keyspace) -> Result<()> {
    match meta.get(b"layout").map_err(db_err)? {
        Some(v) if v.as_ref() == [LAYOUT_VERSION] => Ok(()),
        Some(v) => Err(StorageError::corrupt(format!(
            "store layout version {:?}, this build reads version {LAYOUT_VERSION}",
            v.as_ref()
        ))),
        // A new directory; the marker becomes durable with the first fsync.
        None => meta.insert(b"layout", [LAYOUT_VERSION]).map_err(db_err),
    }
}

impl Inner {
    /// The lock of the stripe `name` (a channel or a room id) belongs to.
    fn lock(&self, name: &str) -> parking_lot::MutexGuard<'_, ()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        let i = (h.finish() % self.locks.len() as u64) as usize;
        // `locks` is never empty, so the index is always in range.
        self.locks[i].lock()
    }

    fn batch(&self) -> OwnedWriteBatch {
        // Buffer (fjall's default too, said here so no option can turn it
        // off): the batch reaches the OS at commit, so a killed process loses
        // nothing a reader could have seen; the fsync is the syncer's.
        self.db.batch().durability(Some(PersistMode::Buffer))
    }

    /// Commits `batch` and returns the ticket to wait for.
    fn commit(&self, batch: OwnedWriteBatch) -> Result<u64> {
        let wrote = !batch.is_empty();
        if wrote {
            batch.commit().map_err(db_err)?;
        }
        Ok(self.commit.ticket(wrote))
    }

    fn head(&self, channel: &str) -> Result<Option<ChannelHead>> {
        get_decoded(&self.ks.heads, channel.as_bytes())
    }

    /// The document's snapshot (seq and bytes), if it has one.
    fn doc_snapshot(&self, doc: &str) -> Result<Option<(u64, Vec<u8>)>> {
        match self.ks.doc_snapshots.get(doc.as_bytes()).map_err(db_err)? {
            Some(v) if v.len() >= 8 => Ok(Some((u64_value(&v[..8])?, v[8..].to_vec()))),
            Some(_) => Err(StorageError::corrupt(format!(
                "snapshot of {doc} is truncated"
            ))),
            None => Ok(None),
        }
    }

    /// The seq of the document's last update, and whether it exists at all.
    fn doc_head(&self, doc: &str) -> Result<Option<u64>> {
        let last = self.ks.doc_updates.prefix(prefix(doc)).next_back();
        if let Some(g) = last {
            let key = g.key().map_err(db_err)?;
            return seq_of(&key).map(Some);
        }
        Ok(self.doc_snapshot(doc)?.map(|(seq, _)| seq))
    }

    fn get_notification(&self, user: &str, id: u64) -> Result<Option<Notification>> {
        get_decoded(&self.ks.notifications, &key2(user, &id.to_be_bytes()))
    }

    /// Notifications of `user` with `id < before` (all when `None`), newest first.
    fn inbox(&self, user: &str, before: Option<u64>) -> impl Iterator<Item = Result<Notification>> {
        let lo = key2(user, &0u64.to_be_bytes());
        let hi = match before {
            Some(b) => Bound::Excluded(key2(user, &b.to_be_bytes())),
            None => Bound::Included(key2(user, &u64::MAX.to_be_bytes())),
        };
        self.ks
            .notifications
            .range::<Vec<u8>, _>((Bound::Included(lo), hi))
            .rev()
            .map(|g| decode::<Notification>(&g.value().map_err(db_err)?))
    }
}

// ---- keys and values ----

/// `a \0 b`.
fn key2(a: &str, b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + b.len());
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b);
    k
}

/// `a \0`: the prefix of every `key2(a, _)`.
fn prefix(a: &str) -> Vec<u8> {
    key2(a, &[])
}

fn entry_key(channel: &str, offset: u64) -> Vec<u8> {
    key2(channel, &offset.to_be_bytes())
}

/// The seq at the end of a `doc_updates` key.
fn seq_of(key: &[u8]) -> Result<u64> {
    let at = key
        .len()
        .checked_sub(8)
        .ok_or_else(|| StorageError::corrupt("document update key too short"))?;
    u64_value(&key[at..])
}

/// The lock stripe of a document, apart from a channel of the same name.
fn doc_lock_name(doc: &str) -> String {
    format!("doc\0{doc}")
}

/// Big-endian with the sign bit flipped, so that negative times sort first.
fn millis_key(ms: Millis) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

/// `expires_at \0 user \0 id`.
fn expiry_key(expires_at: Millis, user: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + 1 + user.len() + 1 + 8);
    k.extend_from_slice(&millis_key(expires_at));
    k.push(0);
    k.extend_from_slice(&key2(user, &id.to_be_bytes()));
    k
}

/// `(user, id)` of an `expiry_key`.
fn parse_expiry_key(k: &[u8]) -> Option<(&str, u64)> {
    let rest = k.get(9..)?;
    let split = rest.len().checked_sub(9)?;
    let (user, id) = rest.split_at(split);
    let id = u64::from_be_bytes(id.get(1..)?.try_into().ok()?);
    Some((std::str::from_utf8(user).ok()?, id))
}

fn u64_value(v: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = v
        .try_into()
        .map_err(|_| StorageError::corrupt("stored number is not 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value)
        .map_err(|e| StorageError::internal(format!("cannot encode record: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| StorageError::corrupt(format!("cannot decode stored record: {e}")))
}

fn get_decoded<T: DeserializeOwned>(ks: &Keyspace, key: &[u8]) -> Result<Option<T>> {
    match ks.get(key).map_err(db_err)? {
        Some(v) => decode(&v).map(Some),
        None => Ok(None),
    }
}

/// Values of a prefix scan, in key order.
fn scan_values(ks: &Keyspace, prefix: &[u8]) -> impl Iterator<Item = Result<fjall::UserValue>> {
    ks.prefix(prefix).map(|g| g.value().map_err(db_err))
}

/// Rejects names that would break the `\0`-separated keys. Callers pass
/// validated ids; this keeps a bug elsewhere from corrupting another key.
fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.as_bytes().contains(&0) {
        return Err(StorageError::corrupt(format!(
            "invalid {what} name {name:?}"
        )));
    }
    Ok(())
}

fn db_err(e: fjall::Error) -> StorageError {
    use fjall::Error as E;
    match e {
        E::Locked => StorageError::unavailable("store directory is locked by another process"),
        E::JournalRecovery(_)
        | E::InvalidVersion(_)
        | E::Decompress(_)
        | E::InvalidTrailer
        | E::InvalidTag(_)
        | E::Unrecoverable => StorageError::corrupt(format!("store data is damaged: {e}")),
        other => StorageError::internal(format!("store error: {other}")),
    }
}

fn open_err(path: &Path, e: fjall::Error) -> StorageError {
    let err = db_err(e);
    StorageError::new(
        err.kind,
        format!("cannot open store at {}: {}", path.display(), err.message),
    )
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn channel_head(&self, channel: &str) -> Result<Option<ChannelHead>> {
        check_name("channel", channel)?;
        let channel = channel.to_string();
        self.run(move |db| db.head(&channel)).await
    }

    async fn create_channel(&self, channel: &str, epoch: &str) -> Result<ChannelHead> {
        check_name("channel", channel)?;
        let channel = channel.to_string();
        let epoch = epoch.to_string();
        self.write(move |db| {
            let _guard = db.lock(&channel);
            if let Some(head) = db.head(&channel)? {
                return Ok((head, db.commit(db.batch())?));
            }
            let head = ChannelHead {
                epoch,
                offset: 0,
                msg_seq: 0,
            };
            let mut batch = db.batch();
            batch.insert(&db.ks.heads, channel.as_bytes(), encode(&head)?);
            Ok((head, db.commit(batch)?))
        })
        .await
    }

    async fn append(&self, channel: &str, entries: &[Entry]) -> Result<()> {
        check_name("channel", channel)?;
        let Some(last) = entries.last() else {
            return Ok(());
        };
        // Encode before taking the lock: the lock only covers check and commit.
        let mut rows = Vec::with_capacity(entries.len());
        for e in entries {
            rows.push((
                e.offset,
                entry_key(channel, e.offset),
                encode(e)?,
                e.client_id
                    .as_deref()
                    .map(|cid| crate::client_key(e.sender.as_deref(), cid)),
            ));
        }
        let (last_offset, last_seq) = (last.offset, last.msg_seq);
        let channel = channel.to_string();
        self.write(move |db| {
            let _guard = db.lock(&channel);
            let Some(head) = db.head(&channel)? else {
                return Err(StorageError::not_found(format!(
                    "channel {channel} does not exist"
                )));
            };
            for (i, (offset, ..)) in rows.iter().enumerate() {
                let expected = head.offset + 1 + i as u64;
                if *offset != expected {
                    let why = if *offset <= head.offset {
                        "is taken"
                    } else {
                        "leaves a gap"
                    };
                    return Err(StorageError::conflict(format!(
                        "{channel}: offset {offset} {why} (head {}, expected {expected})",
                        head.offset
                    )));
                }
            }
            let mut batch = db.batch();
            for (offset, key, value, client_id) in rows {
                batch.insert(&db.ks.entries, key, value);
                if let Some(cid) = client_id {
                    batch.insert(
                        &db.ks.client_ids,
                        key2(&channel, cid.as_bytes()),
                        offset.to_be_bytes(),
                    );
                }
            }
            let new_head = ChannelHead {
                epoch: head.epoch,
                offset: last_offset,
                msg_seq: last_seq,
            };
            batch.insert(&db.ks.heads, channel.as_bytes(), encode(&new_head)?);
            Ok(((), db.commit(batch)?))
        })
        .await
    }

    async fn read_range(
        &self,
        channel: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        check_name("channel", channel)?;
        let limit = limit.min(MAX_PAGE);
        if from > to || limit == 0 {
            return Ok(Vec::new());
        }
        let (lo, hi) = (entry_key(channel, from), entry_key(channel, to));
        self.run(move |db| {
            db.ks
                .entries
                .range(lo..=hi)
                .take(limit)
                .map(|g| decode(&g.value().map_err(db_err)?))
                .collect()
        })
        .await
    }

    async fn read_before(&self, channel: &str, before: u64, limit: usize) -> Result<Vec<Entry>> {
        check_name("channel", channel)?;
        let limit = limit.min(MAX_PAGE);
        if before == 0 || limit == 0 {
            return Ok(Vec::new());
        }
        let (lo, hi) = (entry_key(channel, 0), entry_key(channel, before));
        self.run(move |db| {
            let mut page = db
                .ks
                .entries
                .range(lo..hi)
                .rev()
                .take(limit)
                .map(|g| decode(&g.value().map_err(db_err)?))
                .collect::<Result<Vec<Entry>>>()?;
            page.reverse();
            Ok(page)
        })
        .await
    }

    async fn get_entry(&self, channel: &str, offset: u64) -> Result<Option<Entry>> {
        check_name("channel", channel)?;
        let key = entry_key(channel, offset);
        self.run(move |db| get_decoded(&db.ks.entries, &key)).await
    }

    async fn update_entry(&self, channel: &str, entry: &Entry) -> Result<()> {
        check_name("channel", channel)?;
        let key = entry_key(channel, entry.offset);
        let value = encode(entry)?;
        let (channel, offset) = (channel.to_string(), entry.offset);
        self.write(move |db| {
            let _guard = db.lock(&channel);
            if !db.ks.entries.contains_key(&key).map_err(db_err)? {
                return Err(StorageError::not_found(format!(
                    "{channel}: no entry at {offset}"
                )));
            }
            let mut batch = db.batch();
            batch.insert(&db.ks.entries, key, value);
            Ok(((), db.commit(batch)?))
        })
        .await
    }

    async fn find_client_id(
        &self,
        channel: &str,
        sender: Option<&str>,
        client_id: &str,
    ) -> Result<Option<u64>> {
        check_name("channel", channel)?;
        let key = key2(channel, crate::client_key(sender, client_id).as_bytes());
        self.run(
            move |db| match db.ks.client_ids.get(&key).map_err(db_err)? {
                Some(v) => u64_value(&v).map(Some),
                None => Ok(None),
            },
        )
        .await
    }

    async fn create_room(&self, room: &RoomInfo) -> Result<bool> {
        check_name("room", &room.id)?;
        let value = encode(room)?;
        let id = room.id.clone();
        self.write(move |db| {
            let _guard = db.lock(&id);
            if db.ks.rooms.contains_key(id.as_bytes()).map_err(db_err)? {
                return Ok((false, db.commit(db.batch())?));
            }
            let mut batch = db.batch();
            batch.insert(&db.ks.rooms, id.as_bytes(), value);
            Ok((true, db.commit(batch)?))
        })
        .await
    }

    async fn get_room(&self, room: &str) -> Result<Option<RoomInfo>> {
        check_name("room", room)?;
        let room = room.to_string();
        self.run(move |db| get_decoded(&db.ks.rooms, room.as_bytes()))
            .await
    }

    async fn put_member(&self, room: &str, member: &Member) -> Result<()> {
        check_name("room", room)?;
        check_name("user", &member.user)?;
        let value = encode(member)?;
        let member_key = key2(room, member.user.as_bytes());
        let index_key = key2(&member.user, room.as_bytes());
        self.write(move |db| {
            let mut batch = db.batch();
            batch.insert(&db.ks.members, member_key, value);
            batch.insert(&db.ks.user_rooms, index_key, EMPTY);
            Ok(((), db.commit(batch)?))
        })
        .await
    }

    async fn remove_member(&self, room: &str, user: &str) -> Result<()> {
        check_name("room", room)?;
        check_name("user", user)?;
        let member_key = key2(room, user.as_bytes());
        let index_key = key2(user, room.as_bytes());
        self.write(move |db| {
            let mut batch = db.batch();
            batch.remove(&db.ks.members, member_key);
            batch.remove(&db.ks.user_rooms, index_key);
            Ok(((), db.commit(batch)?))
        })
        .await
    }

    async fn members(&self, room: &str) -> Result<Vec<Member>> {
        check_name("room", room)?;
        let p = prefix(room);
        self.run(move |db| {
            scan_values(&db.ks.members, &p)
                .map(|v| decode(&v?))
                .collect()
        })
        .await
    }

    async fn get_member(&self, room: &str, user: &str) -> Result<Option<Member>> {
        check_name("room", room)?;
        check_name("user", user)?;
        let key = key2(room, user.as_bytes());
        self.run(move |db| get_decoded(&db.ks.members, &key)).await
    }

    async fn user_rooms(&self, user: &str) -> Result<Vec<String>> {
        check_name("user", user)?;
        let p = prefix(user);
        self.run(move |db| {
            db.ks
                .user_rooms
                .prefix(&p)
                .map(|g| {
                    let key = g.key().map_err(db_err)?;
                    let room = key.get(p.len()..).unwrap_or_default();
                    String::from_utf8(room.to_vec())
                        .map_err(|_| StorageError::corrupt("room id in user_rooms is not UTF-8"))
                })
                .collect()
        })
        .await
    }

    async fn set_read_marker(&self, channel: &str, user: &str, offset: u64) -> Result<()> {
        check_name("channel", channel)?;
        check_name("user", user)?;
        let key = key2(channel, user.as_bytes());
        let stripe = channel.to_string();
        self.write(move |db| {
            // Read and write under the channel's stripe lock: a lower
            // offset never replaces a higher one.
            let _guard = db.lock(&stripe);
            if let Some(stored) = db.ks.read_markers.get(&key).map_err(db_err)? {
                if u64_value(&stored)? >= offset {
                    // Durable once what is already written is.
                    return Ok(((), db.commit(db.batch())?));
                }
            }
            let mut batch = db.batch();
            batch.insert(&db.ks.read_markers, key, offset.to_be_bytes());
            Ok(((), db.commit(batch)?))
        })
        .await
    }

    async fn read_marker(&self, channel: &str, user: &str) -> Result<Option<u64>> {
        check_name("channel", channel)?;
        check_name("user", user)?;
        let key = key2(channel, user.as_bytes());
        self.run(
            move |db| match db.ks.read_markers.get(&key).map_err(db_err)? {
                Some(v) => u64_value(&v).map(Some),
                None => Ok(None),
            },
        )
        .await
    }

    async fn read_markers(&self, channel: &str) -> Result<Vec<(String, u64)>> {
        check_name("channel", channel)?;
        let p = prefix(channel);
        self.run(move |db| {
            db.ks
                .read_markers
                .prefix(&p)
                .map(|g| {
                    let (key, value) = g.into_inner().map_err(db_err)?;
                    let user = key.get(p.len()..).unwrap_or_default();
                    let user = String::from_utf8(user.to_vec()).map_err(|_| {
                        StorageError::corrupt("user id in read_markers is not UTF-8")
                    })?;
                    Ok((user, u64_value(&value)?))
                })
                .collect()
        })
        .await
    }

    async fn put_notification(&self, n: &Notification) -> Result<bool> {
        check_name("user", &n.user)?;
        let key = key2(&n.user, &n.id.to_be_bytes());
        let value = encode(n)?;
        let expiry = n.expires_at.map(|at| expiry_key(at, &n.user, n.id));
        self.write(move |db| {
            let _guard = db.inbox.lock();
            if db.ks.notifications.contains_key(&key).map_err(db_err)? {
                return Ok((false, db.commit(db.batch())?));
            }
            let mut batch = db.batch();
            batch.insert(&db.ks.notifications, key, value);
            if let Some(expiry) = expiry {
                batch.insert(&db.ks.notif_expiry, expiry, EMPTY);
            }
            Ok((true, db.commit(batch)?))
        })
        .await
    }

    async fn list_notifications(
        &self,
        user: &str,
        before: Option<u64>,
        limit: usize,
        unread_only: bool,
        now: Millis,
    ) -> Result<Vec<Notification>> {
        check_name("user", user)?;
        let limit = limit.min(MAX_PAGE);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let user = user.to_string();
        self.run(move |db| {
            let mut page = Vec::new();
            for n in db.inbox(&user, before) {
                let n = n?;
                if n.expired(now) || (unread_only && n.read) {
                    continue;
                }
                page.push(n);
                if page.len() == limit {
                    break;
                }
            }
            Ok(page)
        })
        .await
    }

    async fn mark_notifications_read(
        &self,
        user: &str,
        ids: Option<&[u64]>,
        now: Millis,
    ) -> Result<Vec<u64>> {
        check_name("user", user)?;
        let user = user.to_string();
        let ids = ids.map(|ids| {
            let mut ids = ids.to_vec();
            ids.sort_unstable();
            ids.dedup();
            ids
        });
        self.write(move |db| {
            let _guard = db.inbox.lock();
            let candidates: Vec<Notification> = match ids {
                Some(ids) => {
                    let mut found = Vec::with_capacity(ids.len());
                    for id in ids {
                        if let Some(n) = db.get_notification(&user, id)? {
                            found.push(n);
                        }
                    }
                    found
                }
                None => db.inbox(&user, None).collect::<Result<_>>()?,
            };
            let mut batch = db.batch();
            let mut changed = Vec::new();
            for mut n in candidates {
                if n.read || n.expired(now) {
                    continue;
                }
                n.read = true;
                batch.insert(
                    &db.ks.notifications,
                    key2(&user, &n.id.to_be_bytes()),
                    encode(&n)?,
                );
                changed.push(n.id);
            }
            Ok((changed, db.commit(batch)?))
        })
        .await
    }

    async fn unread_notifications(&self, user: &str, now: Millis) -> Result<u64> {
        check_name("user", user)?;
        let user = user.to_string();
        self.run(move |db| {
            let mut count = 0;
            for n in db.inbox(&user, None) {
                let n = n?;
                if !n.read && !n.expired(now) {
                    count += 1;
                }
            }
            Ok(count)
        })
        .await
    }

    async fn purge_expired(&self, now: Millis) -> Result<u64> {
        // Expired means `expires_at <= now`: every expiry key below `now + 1`.
        let hi = match now.checked_add(1) {
            Some(end) => Bound::Excluded(millis_key(end).to_vec()),
            None => Bound::Unbounded,
        };
        self.write(move |db| {
            let mut purged = 0u64;
            let mut ticket = db.commit(db.batch())?;
            loop {
                let _guard = db.inbox.lock();
                let mut batch = db.batch();
                let mut rows = 0;
                let due = db
                    .ks
                    .notif_expiry
                    .range::<Vec<u8>, _>((Bound::Unbounded, hi.clone()))
                    .take(PURGE_CHUNK);
                for g in due {
                    let key = g.key().map_err(db_err)?;
                    rows += 1;
                    // A stale index row (the notification is gone or was
                    // replaced with another expiry) is dropped alone.
                    if let Some((user, id)) = parse_expiry_key(&key) {
                        if db
                            .get_notification(user, id)?
                            .is_some_and(|n| n.expired(now))
                        {
                            batch.remove(&db.ks.notifications, key2(user, &id.to_be_bytes()));
                            purged += 1;
                        }
                    }
                    batch.remove(&db.ks.notif_expiry, key);
                }
                if rows == 0 {
                    return Ok((purged, ticket));
                }
                ticket = db.commit(batch)?;
                if rows < PURGE_CHUNK {
                    return Ok((purged, ticket));
                }
            }
        })
        .await
    }

    async fn get_prefs(&self, user: &str) -> Result<Option<NotificationPrefs>> {
        check_name("user", user)?;
        let user = user.to_string();
        self.run(move |db| get_decoded(&db.ks.prefs, user.as_bytes()))
            .await
    }

    async fn put_prefs(&self, user: &str, prefs: &NotificationPrefs) -> Result<()> {
        check_name("user", user)?;
        let value = encode(prefs)?;
        let user = user.to_string();
        self.write(move |db| {
            let mut batch = db.batch();
            batch.insert(&db.ks.prefs, user.as_bytes(), value);
            Ok(((), db.commit(batch)?))
        })
        .await
    }

    async fn set_last_seen(&self, user: &str, at: Millis) -> Result<()> {
        check_name("user", user)?;
        let user = user.to_string();
        self.write(move |db| {
            let mut batch = db.batch();
            batch.insert(&db.ks.last_seen, user.as_bytes(), at.to_be_bytes());
            Ok(((), db.commit(batch)?))
        })
        .await
    }

    async fn last_seen(&self, user: &str) -> Result<Option<Millis>> {
        check_name("user", user)?;
        let user = user.to_string();
        self.run(
            move |db| match db.ks.last_seen.get(user.as_bytes()).map_err(db_err)? {
                Some(v) => Ok(Some(u64_value(&v)? as Millis)),
                None => Ok(None),
            },
        )
        .await
    }

    async fn doc_load(&self, doc: &str) -> Result<Option<DocRecord>> {
        check_name("document", doc)?;
        let doc = doc.to_string();
        self.run(move |db| {
            let snapshot = db.doc_snapshot(&doc)?;
            let mut updates = Vec::new();
            for g in db.ks.doc_updates.prefix(prefix(&doc)) {
                let (key, value) = g.into_inner().map_err(db_err)?;
                updates.push(DocUpdate {
                    seq: seq_of(&key)?,
                    data: value.to_vec(),
                });
            }
            if snapshot.is_none() && updates.is_empty() {
                return Ok(None);
            }
            let (snapshot_seq, snapshot) = match snapshot {
                Some((seq, bytes)) => (seq, Some(bytes)),
                None => (0, None),
            };
            // A crash between a compaction's two halves cannot happen (one
            // batch), but skip anything the snapshot covers all the same.
            updates.retain(|u| u.seq > snapshot_seq);
            Ok(Some(DocRecord {
                snapshot,
                snapshot_seq,
                updates,
            }))
        })
        .await
    }

    async fn doc_append(&self, doc: &str, updates: &[DocUpdate]) -> Result<()> {
        check_name("document", doc)?;
        if updates.is_empty() {
            return Ok(());
        }
        let rows: Vec<(u64, Vec<u8>, Vec<u8>)> = updates
            .iter()
            .map(|u| (u.seq, key2(doc, &u.seq.to_be_bytes()), u.data.clone()))
            .collect();
        let doc = doc.to_string();
        self.write(move |db| {
            let _guard = db.lock(&doc_lock_name(&doc));
            let head = db.doc_head(&doc)?.unwrap_or(0);
            for (i, (seq, ..)) in rows.iter().enumerate() {
                let expected = head + 1 + i as u64;
                if *seq != expected {
                    return Err(StorageError::conflict(format!(
                        "document {doc}: seq {seq} does not follow the head {head} (expected {expected})"
                    )));
                }
            }
            let mut batch = db.batch();
            for (_, key, value) in rows {
                batch.insert(&db.ks.doc_updates, key, value);
            }
            Ok(((), db.commit(batch)?))
        })
        .await
    }

    async fn doc_compact(&self, doc: &str, upto: u64, snapshot: &[u8]) -> Result<()> {
        check_name("document", doc)?;
        let mut value = Vec::with_capacity(8 + snapshot.len());
        value.extend_from_slice(&upto.to_be_bytes());
        value.extend_from_slice(snapshot);
        let doc = doc.to_string();
        self.write(move |db| {
            let _guard = db.lock(&doc_lock_name(&doc));
            let Some(head) = db.doc_head(&doc)? else {
                return Err(StorageError::not_found(format!(
                    "document {doc} does not exist"
                )));
            };
            if upto > head {
                return Err(StorageError::conflict(format!(
                    "document {doc}: cannot compact up to {upto} past the head {head}"
                )));
            }
            let current = db.doc_snapshot(&doc)?.map_or(0, |(seq, _)| seq);
            if upto <= current {
                return Ok(((), db.commit(db.batch())?));
            }
            let mut batch = db.batch();
            let (lo, hi) = (
                key2(&doc, &0u64.to_be_bytes()),
                key2(&doc, &upto.to_be_bytes()),
            );
            for g in db.ks.doc_updates.range(lo..=hi) {
                batch.remove(&db.ks.doc_updates, g.key().map_err(db_err)?);
            }
            batch.insert(&db.ks.doc_snapshots, doc.as_bytes(), value);
            Ok(((), db.commit(batch)?))
        })
        .await
    }

    async fn doc_delete(&self, doc: &str) -> Result<bool> {
        check_name("document", doc)?;
        let doc = doc.to_string();
        self.write(move |db| {
            let _guard = db.lock(&doc_lock_name(&doc));
            let existed = db.doc_head(&doc)?.is_some();
            let mut batch = db.batch();
            for g in db.ks.doc_updates.prefix(prefix(&doc)) {
                batch.remove(&db.ks.doc_updates, g.key().map_err(db_err)?);
            }
            batch.remove(&db.ks.doc_snapshots, doc.as_bytes());
            Ok((existed, db.commit(batch)?))
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        // Everything committed so far is covered by the ticket of a no-op write.
        self.write(move |db| Ok(((), db.commit(db.batch())?))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_keys_round_trip_and_sort_by_time() {
        let k = expiry_key(-5, "alice", 42);
        assert_eq!(parse_expiry_key(&k), Some(("alice", 42)));
        assert!(expiry_key(-5, "z", 1) < expiry_key(0, "a", 1));
        assert!(expiry_key(0, "z", 1) < expiry_key(1, "a", 1));
        assert!(millis_key(i64::MIN) < millis_key(i64::MAX));
    }

    #[test]
    fn entry_keys_sort_by_offset_within_a_channel() {
        assert!(entry_key("room:a", 255) < entry_key("room:a", 256));
        assert!(entry_key("room:a", u64::MAX) < prefix("room:ab"));
        assert!(!entry_key("room:ab", 1).starts_with(&prefix("room:a")));
    }
}
