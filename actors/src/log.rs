//! The channel log: offsets, group commit, catch-up and per-node fan-out of
//! one channel, for the actor that is its only writer (a room today; a
//! collaborative document reuses it).
//!
//! Entries queue up while one store append is in flight; when it completes,
//! everything queued meanwhile is numbered (`head+1..`) and written as the
//! next batch, so a hot channel costs one durable write per batch, not per
//! entry, and offsets stay gap-free even when a write fails (numbers are given
//! at write time, not queue time). Only after a batch is durable is each
//! entry acknowledged ([`ChannelLog::complete`]); the owning actor then
//! applies its own rules to each committed entry and fans it out
//! ([`ChannelLog::fan_out`]), in offset order, once per subscribed node.
//!
//! The write runs in a task of its own and hands its result back through a
//! oneshot; the task then tells the owner [`Written`]. An owner that stops
//! waits for that result instead ([`ChannelLog::wait_written`]), so a batch
//! that reached the store is always acknowledged, and writes what is still
//! queued before it goes.
//!
//! Subscribing reads the missed entries up to the *committed* head and
//! registers the subscriber in the same handler ([`ChannelLog::subscribe`]),
//! so catch-up and live pushes meet with no gap and no duplicate.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use chorus_protocol::ops::{Published, Subscribed};
use chorus_protocol::{
    now_ms, ChannelHead, Entry, EntryKind, ErrorCode, Push, ServerFrame, SharedFrame,
};
use chorus_storage::{client_key, StorageError};
use kameo::actor::WeakActorRef;
use kameo::message::Message;
use kameo::Actor;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::hub::{ConnAddr, ConnId, Position};
use crate::placement::moves::NodeGone;
use crate::placement::NodeId;
use crate::services::{Replier, Services};
use crate::Fail;

/// Most entries one store append carries; more wait for the next batch.
const MAX_BATCH: usize = 256;

/// How many recent client ids a log remembers without asking the store.
const CLIENT_ID_CACHE: usize = 4096;

/// A random epoch: 16 hex digits.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Told to the owning actor when its write has a result to collect.
pub struct Written;

/// An entry waiting for, or in, a store append; `T` is the owner's own
/// follow-up work for it.
pub struct Pending<T> {
    pub entry: Entry,
    replier: Replier,
    /// Retries of the same client id that arrived while this one was in flight.
    duplicates: Vec<Replier>,
    /// The reply once durable, when it is not the entry's [`Published`].
    answer: Option<Value>,
    /// An earlier entry to rewrite in place once this one is durable (an
    /// edit or delete rewrites the message it targets).
    rewrite: Option<Entry>,
    pub then: T,
}

/// A durable, acknowledged entry, handed back to the owner in offset order.
pub struct Committed<T> {
    pub entry: Entry,
    pub then: T,
}

struct WriteResult<T> {
    batch: Vec<Pending<T>>,
    result: Result<(), StorageError>,
}

pub struct ChannelLog<T> {
    svc: Arc<Services>,
    key: String,
    /// The committed head; `None` until the channel exists.
    head: Option<ChannelHead>,
    queue: Vec<Pending<T>>,
    inflight: Option<oneshot::Receiver<WriteResult<T>>>,
    /// Recent client ids, keyed by [`client_key`] (sender and id).
    client_ids: HashMap<String, u64>,
    client_id_order: VecDeque<String>,
    /// Client ids in the batch being written, with retries waiting on it.
    inflight_ids: HashMap<String, Vec<Replier>>,
    /// Subscribed connections (anywhere in the cluster) and their users.
    subscribers: HashMap<ConnAddr, String>,
    /// How many of them each node has: an entry leaves once per node.
    node_subs: HashMap<NodeId, usize>,
    /// The offset pushed to subscribers last (the head at load before any).
    fanned: u64,
}

impl<T: Send + 'static> ChannelLog<T> {
    /// The log of channel `key` whose stored head is `head`.
    pub fn new(svc: Arc<Services>, key: String, head: Option<ChannelHead>) -> Self {
        ChannelLog {
            fanned: head.as_ref().map_or(0, |h| h.offset),
            svc,
            key,
            head,
            queue: Vec::new(),
            inflight: None,
            client_ids: HashMap::new(),
            client_id_order: VecDeque::new(),
            inflight_ids: HashMap::new(),
            subscribers: HashMap::new(),
            node_subs: HashMap::new(),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The committed head, if the channel exists.
    pub fn head(&self) -> Option<&ChannelHead> {
        self.head.as_ref()
    }

    /// The committed head, creating the channel (with a new epoch) if needed.
    pub async fn ensure(&mut self) -> Result<ChannelHead, Fail> {
        if let Some(h) = &self.head {
            return Ok(h.clone());
        }
        let head = self
            .svc
            .store
            .create_channel(&self.key, &new_epoch())
            .await?;
        self.head = Some(head.clone());
        Ok(head)
    }

    /// Nothing queued, nothing in flight, nobody subscribed.
    pub fn is_idle(&self) -> bool {
        self.subscribers.is_empty() && self.inflight.is_none() && self.queue.is_empty()
    }

    fn remember_client_id(&mut self, id: String, offset: u64) {
        if self.client_ids.insert(id.clone(), offset).is_none() {
            self.client_id_order.push_back(id);
            if self.client_id_order.len() > CLIENT_ID_CACHE {
                if let Some(old) = self.client_id_order.pop_front() {
                    self.client_ids.remove(&old);
                }
            }
        }
    }

    /// Answers a retried publish from what is stored, or attaches it to the
    /// queued or in-flight original. Returns the replier back when it is not
    /// a duplicate. Ids belong to their sender: another sender's equal id is
    /// another message.
    pub async fn dedupe(
        &mut self,
        sender: Option<&str>,
        client_id: &str,
        replier: Replier,
    ) -> Option<Replier> {
        let key = client_key(sender, client_id);
        if let Some(waiting) = self.inflight_ids.get_mut(&key) {
            waiting.push(replier);
            return None;
        }
        if let Some(p) = self.queue.iter_mut().find(|p| {
            p.entry.client_id.as_deref() == Some(client_id) && p.entry.sender.as_deref() == sender
        }) {
            p.duplicates.push(replier);
            return None;
        }
        let known = match self.client_ids.get(&key) {
            Some(o) => Some(*o),
            None => match self
                .svc
                .store
                .find_client_id(&self.key, sender, client_id)
                .await
            {
                Ok(found) => found,
                Err(e) => {
                    replier.send(&self.svc, Err(e.into())).await;
                    return None;
                }
            },
        };
        match (known, &self.head) {
            (Some(offset), Some(head)) => {
                let res = Published {
                    channel: self.key.clone(),
                    epoch: head.epoch.clone(),
                    offset,
                    duplicate: true,
                };
                replier.send(&self.svc, Ok(to_value(&res))).await;
                None
            }
            _ => Some(replier),
        }
    }

    /// Queues `entry`; once it is durable its replier gets `answer` (or the
    /// entry's [`Published`] when `None`), `rewrite` is stored over the entry
    /// at its offset, and [`ChannelLog::complete`] hands back `then`.
    /// The owner calls [`ChannelLog::start_write`] after queueing.
    pub fn enqueue(
        &mut self,
        entry: Entry,
        replier: Replier,
        answer: Option<Value>,
        rewrite: Option<Entry>,
        then: T,
    ) {
        self.queue.push(Pending {
            entry,
            replier,
            duplicates: Vec::new(),
            answer,
            rewrite,
            then,
        });
    }

    /// Numbers everything queued after the committed head and writes it as
    /// one batch, unless a write is in flight (the next batch follows it).
    /// `owner` is told [`Written`] when the result can be collected.
    pub fn start_write<A>(&mut self, owner: &WeakActorRef<A>)
    where
        A: Actor + Message<Written, Reply = ()>,
    {
        if self.inflight.is_some() || self.queue.is_empty() {
            return;
        }
        let Some(head) = self.head.clone() else {
            return;
        };
        // Bounded batches: a backend may cap one append (ScyllaDB: one partition).
        let take = self.queue.len().min(MAX_BATCH);
        let mut batch: Vec<Pending<T>> = self.queue.drain(..take).collect();
        let mut offset = head.offset;
        let mut msg_seq = head.msg_seq;
        let now = now_ms();
        for p in &mut batch {
            offset += 1;
            if p.entry.kind == EntryKind::Message {
                msg_seq += 1;
            }
            p.entry.offset = offset;
            p.entry.msg_seq = msg_seq;
            p.entry.ts = now;
        }
        for p in &mut batch {
            if let Some(key) = entry_client_key(&p.entry) {
                self.inflight_ids
                    .insert(key, std::mem::take(&mut p.duplicates));
            }
        }
        let entries: Vec<Entry> = batch.iter().map(|p| p.entry.clone()).collect();
        let rewrites: Vec<Entry> = batch.iter_mut().filter_map(|p| p.rewrite.take()).collect();
        let (tx, rx) = oneshot::channel();
        self.inflight = Some(rx);
        let store = self.svc.store.clone();
        let metrics = self.svc.metrics.clone();
        let key = self.key.clone();
        let owner = owner.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = store.append(&key, &entries).await;
            metrics
                .store_append_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.append_batch_size.observe(entries.len() as f64);
            if result.is_ok() {
                for original in &rewrites {
                    if let Err(e) = store.update_entry(&key, original).await {
                        // The edit/delete entry is durable in the log, which
                        // catch-up replays; only the history view is stale.
                        tracing::error!(channel = %key, error = %e, "rewriting edited message failed");
                    }
                }
            }
            let _ = tx.send(WriteResult { batch, result });
            // A stopping owner collects the result in `wait_written` instead.
            if let Some(owner) = owner.upgrade() {
                let _ = owner.tell(Written).await;
            }
        });
    }

    /// The in-flight write's result, acknowledged (see [`ChannelLog::complete`]),
    /// once it is there; empty if no write is in flight. The owner calls it
    /// on [`Written`], and when it stops until nothing is in flight.
    pub async fn wait_written(&mut self) -> Vec<Committed<T>> {
        let Some(rx) = self.inflight.take() else {
            return Vec::new();
        };
        match rx.await {
            Ok(w) => self.complete(w.batch, w.result).await,
            Err(_) => {
                tracing::error!(channel = %self.key, "a channel write task ended without a result");
                Vec::new()
            }
        }
    }

    /// Whether a write is in flight or entries are queued.
    pub fn is_writing(&self) -> bool {
        self.inflight.is_some() || !self.queue.is_empty()
    }

    /// Moves the head past a durable batch and acknowledges each entry (and
    /// the retries waiting on it); on failure answers them all with the error
    /// and reloads the head. Returns the committed entries, in offset order.
    async fn complete(
        &mut self,
        mut batch: Vec<Pending<T>>,
        result: Result<(), StorageError>,
    ) -> Vec<Committed<T>> {
        for p in &mut batch {
            if let Some(key) = entry_client_key(&p.entry) {
                if let Some(waiting) = self.inflight_ids.remove(&key) {
                    p.duplicates.extend(waiting);
                }
            }
        }
        if let Err(e) = result {
            let fail = Fail::from(e);
            // A conflict means someone else wrote here (ownership moved); an
            // unavailable store may have written the batch after all. Either
            // way our head may be stale: reload it before numbering more.
            match self.svc.store.channel_head(&self.key).await {
                Ok(h) => {
                    self.head = h;
                    // What the other writer stored reaches our subscribers
                    // now, before anything we number after it.
                    if let Some(to) = self.head.as_ref().map(|h| h.offset) {
                        self.push_stored(to).await;
                    }
                }
                Err(e) => {
                    tracing::error!(channel = %self.key, error = %e, "reloading head failed")
                }
            }
            for p in batch {
                p.replier.send(&self.svc, Err(fail.clone())).await;
                for d in p.duplicates {
                    d.send(&self.svc, Err(fail.clone())).await;
                }
            }
            return Vec::new();
        }
        let Some(mut head) = self.head.clone() else {
            return Vec::new();
        };
        let mut committed = Vec::with_capacity(batch.len());
        for p in batch {
            head.offset = p.entry.offset;
            head.msg_seq = p.entry.msg_seq;
            self.svc.metrics.messages_published.inc();
            if let Some(key) = entry_client_key(&p.entry) {
                self.remember_client_id(key, p.entry.offset);
            }
            let res = Published {
                channel: self.key.clone(),
                epoch: head.epoch.clone(),
                offset: p.entry.offset,
                duplicate: false,
            };
            let answer = p.answer.unwrap_or_else(|| to_value(&res));
            p.replier.send(&self.svc, Ok(answer)).await;
            for d in p.duplicates {
                let dup = Published {
                    duplicate: true,
                    ..res.clone()
                };
                d.send(&self.svc, Ok(to_value(&dup))).await;
            }
            committed.push(Committed {
                entry: p.entry,
                then: p.then,
            });
        }
        self.head = Some(head);
        committed
    }

    /// Pushes a committed entry to every subscriber: once per node. Entries
    /// between the last one pushed and this one that another writer stored
    /// (a second owner during a partition: our append was refused and the
    /// head reloaded) are read from the store and pushed first, so
    /// subscribers see the channel gap-free, in offset order.
    pub async fn fan_out(&mut self, entry: &Entry) {
        self.push_stored(entry.offset - 1).await;
        self.fanned = self.fanned.max(entry.offset);
        if !self.subscribers.is_empty() {
            self.push_entry(entry).await;
        }
    }

    /// Catches up with what another writer stored (a second owner while
    /// views disagreed): moves to the stored head `stored` if it is ahead in
    /// the same epoch and pushes the entries in between to every subscriber.
    /// Returns whether the head moved. Only between writes.
    pub async fn adopt(&mut self, stored: ChannelHead) -> bool {
        if self.is_writing() {
            return false;
        }
        let ahead = match &self.head {
            Some(h) => h.epoch == stored.epoch && stored.offset > h.offset,
            None => true,
        };
        if !ahead {
            return false;
        }
        let to = stored.offset;
        tracing::info!(channel = %self.key, from = ?self.head.as_ref().map(|h| h.offset), to, "caught up with entries another owner stored");
        self.head = Some(stored);
        self.push_stored(to).await;
        true
    }

    /// The head to answer a subscriber that already has `offset` from:
    /// `head`, or the stored head when the subscriber is ahead of it. A
    /// subscriber can only have an offset that was stored, so being ahead
    /// means another owner wrote while this one was active (views disagreed
    /// after a restart or a join, and nothing told this actor since): it
    /// reloads the head and pushes what it missed to its subscribers
    /// ([`ChannelLog::adopt`]) instead of refusing a valid offset.
    async fn reload_if_behind(
        &mut self,
        head: ChannelHead,
        offset: u64,
    ) -> Result<ChannelHead, Fail> {
        if offset <= head.offset {
            return Ok(head);
        }
        if self.is_writing() {
            // The head cannot move under a batch being numbered; the write's
            // result reloads it (the conditional append refuses a stale one).
            return Err(Fail::new(
                ErrorCode::Conflict,
                "another owner wrote here; the room is catching up, retry",
            ));
        }
        let Some(stored) = self.svc.store.channel_head(&self.key).await? else {
            return Ok(head);
        };
        self.adopt(stored).await;
        Ok(self.head.clone().unwrap_or(head))
    }

    /// Pushes the stored entries after the last one pushed, up to `to`.
    async fn push_stored(&mut self, to: u64) {
        let mut from = self.fanned + 1;
        self.fanned = self.fanned.max(to);
        if self.subscribers.is_empty() {
            return;
        }
        while from <= to {
            let page = match self
                .svc
                .store
                .read_range(&self.key, from, to, chorus_storage::MAX_PAGE)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(channel = %self.key, error = %e, "reading another writer's entries failed");
                    return;
                }
            };
            let Some(last) = page.last().map(|e| e.offset) else {
                return;
            };
            for e in &page {
                self.push_entry(e).await;
            }
            from = last + 1;
        }
    }

    async fn push_entry(&self, entry: &Entry) {
        self.push_entry_to(self.node_subs.keys(), entry).await;
    }

    async fn push_entry_to<'a>(&self, nodes: impl Iterator<Item = &'a NodeId>, entry: &Entry) {
        let Some(head) = &self.head else { return };
        let frame = SharedFrame::new(ServerFrame::Push(Push {
            push: "entry".to_string(),
            channel: Some(self.key.clone()),
            epoch: Some(head.epoch.clone()),
            offset: Some(entry.offset),
            ephemeral: false,
            data: to_value(entry),
        }));
        self.svc.deliver(&self.key, nodes, Arc::new(frame)).await;
    }

    /// Pushes an event that is not stored (typing, receipts) to every subscriber.
    pub async fn push_ephemeral(&self, event: &str, data: Value) {
        if self.subscribers.is_empty() {
            return;
        }
        let frame = SharedFrame::new(ServerFrame::Push(Push::ephemeral(
            event,
            Some(self.key.clone()),
            data,
        )));
        self.svc
            .deliver(&self.key, self.node_subs.keys(), Arc::new(frame))
            .await;
    }

    fn add_subscriber(&mut self, conn: ConnAddr, user: String) {
        let node = conn.node.clone();
        if self.subscribers.insert(conn, user).is_none() {
            *self.node_subs.entry(node).or_insert(0) += 1;
        }
    }

    /// Unsubscribes `conn` (and tells its hub); false if it was not subscribed.
    pub async fn unsubscribe(&mut self, conn: &ConnAddr) -> bool {
        if self.subscribers.remove(conn).is_none() {
            return false;
        }
        if let Some(n) = self.node_subs.get_mut(&conn.node) {
            *n -= 1;
            if *n == 0 {
                self.node_subs.remove(&conn.node);
            }
        }
        self.svc.hub_unsubscribe(&self.key, conn).await;
        true
    }

    /// Unsubscribes every connection of `user`.
    pub async fn unsubscribe_user(&mut self, user: &str) {
        let conns: Vec<ConnAddr> = self
            .subscribers
            .iter()
            .filter(|(_, u)| *u == user)
            .map(|(c, _)| c.clone())
            .collect();
        for conn in conns {
            self.unsubscribe(&conn).await;
        }
    }

    /// Forgets the subscribers of a member that is down or restarted.
    pub fn drop_gone(&mut self, gone: &NodeGone) {
        let before = self.subscribers.len();
        self.subscribers.retain(|c, _| !gone.covers(c));
        if self.subscribers.len() != before {
            let left = self
                .subscribers
                .keys()
                .filter(|c| c.node == gone.node)
                .count();
            if left == 0 {
                self.node_subs.remove(&gone.node);
            } else {
                self.node_subs.insert(gone.node.clone(), left);
            }
        }
    }

    /// Answers request `id` of `conn` with the catch-up from `from` (offset,
    /// epoch) to the committed head, then subscribes it: both go through the
    /// hub's one mailbox, so the catch-up precedes every live entry after it.
    /// An error is returned to the caller, who answers it.
    pub async fn subscribe(
        &mut self,
        user: String,
        conn: ConnAddr,
        from: Option<(u64, Option<String>)>,
        id: u64,
    ) -> Result<(), Fail> {
        let mut head = self.ensure().await?;
        if let Some((offset, _)) = &from {
            head = self.reload_if_behind(head, *offset).await?;
        }
        let res = self.catch_up(&head, from).await?;
        Replier::Conn {
            conn: conn.clone(),
            id,
        }
        .send(&self.svc, Ok(to_value(&res)))
        .await;
        self.add_subscriber(conn.clone(), user);
        let at = (head.epoch.clone(), head.offset);
        self.svc.hub_subscribe(&self.key, &conn, Some(at)).await;
        Ok(())
    }

    /// Takes over subscribers that `node`'s hub had registered with another
    /// owner, whose stream stands at `after`: the entries pushed since are
    /// read from the store and pushed to that node alone (its hub drops what
    /// it already has), then each is registered here. Returns the reason
    /// when they cannot resume gap-free (the channel's epoch changed, or
    /// they missed more than `max_catchup`): nobody is registered then.
    pub async fn resubscribe(
        &mut self,
        node: &NodeId,
        conns: Vec<(ConnId, String)>,
        after: Option<Position>,
    ) -> Result<Result<(), &'static str>, Fail> {
        let mut head = self.ensure().await?;
        if let Some((_, offset)) = &after {
            head = self.reload_if_behind(head, *offset).await?;
        }
        tracing::debug!(channel = %self.key, %node, ?after, head = head.offset, fanned = self.fanned, "taking over subscribers");
        if let Some((epoch, offset)) = after {
            if epoch != head.epoch {
                return Ok(Err("epoch_changed"));
            }
            if self.fanned.saturating_sub(offset) > self.svc.config.max_catchup as u64 {
                return Ok(Err("too_far_behind"));
            }
            let mut from = offset + 1;
            while from <= self.fanned {
                let page = self
                    .svc
                    .store
                    .read_range(&self.key, from, self.fanned, chorus_storage::MAX_PAGE)
                    .await?;
                let Some(last) = page.last().map(|e| e.offset) else {
                    break;
                };
                for e in &page {
                    self.push_entry_to(std::iter::once(node), e).await;
                }
                from = last + 1;
            }
        }
        let at = (head.epoch.clone(), self.fanned);
        for (conn, user) in conns {
            let addr = ConnAddr {
                node: node.clone(),
                conn,
            };
            self.add_subscriber(addr.clone(), user);
            self.svc
                .hub_subscribe(&self.key, &addr, Some(at.clone()))
                .await;
        }
        Ok(Ok(()))
    }

    /// The nodes with subscribers here: told when this actor stops, so
    /// their hubs register them again at the channel's owner.
    pub fn subscribed_nodes(&self) -> impl Iterator<Item = &NodeId> {
        self.node_subs.keys()
    }

    /// What a subscriber resuming at `from` missed, or why it cannot resume.
    async fn catch_up(
        &self,
        head: &ChannelHead,
        from: Option<(u64, Option<String>)>,
    ) -> Result<Subscribed, Fail> {
        let mut res = Subscribed {
            channel: self.key.clone(),
            epoch: head.epoch.clone(),
            offset: head.offset,
            recovered: true,
            reason: None,
            detail: None,
            missed: Vec::new(),
        };
        let Some((offset, epoch)) = from else {
            return Ok(res);
        };
        let max_catchup = self.svc.config.max_catchup;
        if epoch.as_ref().is_some_and(|e| *e != head.epoch) {
            res.recovered = false;
            res.reason = Some("epoch_changed".into());
            res.detail = Some("the channel's history was reset".into());
        } else if offset > head.offset {
            res.recovered = false;
            res.reason = Some("offset_ahead".into());
            res.detail = Some("the channel has no such offset".into());
        } else if head.offset - offset > max_catchup as u64 {
            res.recovered = false;
            res.reason = Some("too_far_behind".into());
            res.detail = Some(format!(
                "more than {max_catchup} entries missed; page with `history` and subscribe again"
            ));
        } else if offset < head.offset {
            let mut from = offset + 1;
            while from <= head.offset {
                let page = self
                    .svc
                    .store
                    .read_range(&self.key, from, head.offset, chorus_storage::MAX_PAGE)
                    .await?;
                let Some(last) = page.last() else { break };
                from = last.offset + 1;
                res.missed.extend(page);
            }
            if res.missed.len() as u64 != head.offset - offset {
                res.recovered = false;
                res.reason = Some("history_trimmed".into());
                res.detail = Some("older entries are no longer stored".into());
                res.missed.clear();
            }
        }
        Ok(res)
    }
}

/// The dedupe key of an entry's client id: [`client_key`] of its sender and id.
fn entry_client_key(e: &Entry) -> Option<String> {
    e.client_id
        .as_deref()
        .map(|cid| client_key(e.sender.as_deref(), cid))
}

pub(crate) fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}
