//! The room actor: one per channel (`room:…`, `topic:…`, `feed:…`).
//!
//! It is the only writer of its channel. Publishes queue up while one store
//! append is in flight; when it completes, everything queued meanwhile is
//! numbered (`head+1..`) and written as the next batch, so a hot room costs
//! one durable write per batch, not per message, and offsets stay gap-free
//! even when a write fails (numbers are given at write time, not queue time).
//! Only after a batch is durable does the room acknowledge each publish and
//! fan it out, in offset order, with one `Deliver` to the node hub.
//!
//! Subscribing reads the missed entries up to the *committed* head and
//! registers the subscriber in the same handler, so catch-up and live pushes
//! meet with no gap and no duplicate.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_protocol::ops::{Published, ReceiptPush, RoomSummary, Subscribed, TypingPush};
use chorus_protocol::{
    now_ms, Channel, ChannelHead, ChannelKind, Entry, EntryKind, ErrorCode, Member, Priority, Push,
    Role, RoomInfo, RoomKind, ServerFrame, SharedFrame,
};
use chorus_storage::{client_key, ErrorKind, StorageError};
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};
use kameo::Actor;
use serde_json::{json, Value};

use crate::hub::ConnAddr;
use crate::placement::NodeId;
use crate::services::{Replier, Services};
use crate::user::{Notify, NotifySpec};
use crate::Fail;

/// Most entries one store append carries; more wait for the next batch.
const MAX_BATCH: usize = 256;

/// How many recent client ids a room remembers without asking the store.
const CLIENT_ID_CACHE: usize = 4096;

/// A random epoch: 16 hex digits.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

struct Pending {
    entry: Entry,
    replier: Replier,
    /// Retries of the same client id that arrived while this one was in flight.
    duplicates: Vec<Replier>,
    after: After,
    /// The reply once durable, when it is not the entry's [`Published`]
    /// (`{"left": true}` for a leave).
    answer: Option<Value>,
}

/// Work that follows a durable append.
enum After {
    Nothing,
    /// Rewrite the original message (edit or delete).
    Rewrite(Entry),
    /// Unsubscribe the removed user's connections.
    Removed(String),
}

pub struct RoomActor {
    svc: Arc<Services>,
    key: String,
    channel: Channel,
    me: WeakActorRef<RoomActor>,
    room: Option<RoomInfo>,
    members: HashMap<String, Member>,
    /// The committed head; `None` until the channel exists.
    head: Option<ChannelHead>,
    queue: Vec<Pending>,
    writing: bool,
    /// Recent client ids, keyed by [`client_key`] (sender and id).
    client_ids: HashMap<String, u64>,
    client_id_order: VecDeque<String>,
    /// Client ids in the batch being written, with retries waiting on it.
    inflight_ids: HashMap<String, Vec<Replier>>,
    /// Subscribed connections (anywhere in the cluster) and their users.
    subscribers: HashMap<ConnAddr, String>,
    /// How many of them each node has: a message leaves once per node.
    node_subs: HashMap<NodeId, usize>,
    markers: HashMap<String, u64>,
    typing: HashMap<String, Instant>,
    typing_timer: bool,
    last_used: Instant,
}

impl Actor for RoomActor {
    type Args = (Arc<Services>, String);
    type Error = StorageError;

    async fn on_start(
        (svc, key): Self::Args,
        actor_ref: ActorRef<Self>,
    ) -> Result<Self, StorageError> {
        let channel = Channel::parse(&key)
            .ok_or_else(|| StorageError::new(ErrorKind::Corrupt, format!("bad channel {key}")))?;
        let head = svc.store.channel_head(&key).await?;
        let (room, members) = if channel.kind == ChannelKind::Room {
            let room = svc.store.get_room(&channel.name).await?;
            let members = match room {
                Some(_) => svc.store.members(&channel.name).await?,
                None => Vec::new(),
            };
            (
                room,
                members.into_iter().map(|m| (m.user.clone(), m)).collect(),
            )
        } else {
            (None, HashMap::new())
        };
        svc.metrics.active_rooms.inc();
        let passivate_after = svc.config.passivate_after;
        drop(
            actor_ref
                .tell(IdleCheck)
                .send_after(passivate_after.min(Duration::from_secs(1))),
        );
        Ok(RoomActor {
            svc,
            key,
            channel,
            me: actor_ref.downgrade(),
            room,
            members,
            head,
            queue: Vec::new(),
            writing: false,
            client_ids: HashMap::new(),
            client_id_order: VecDeque::new(),
            inflight_ids: HashMap::new(),
            subscribers: HashMap::new(),
            node_subs: HashMap::new(),
            markers: HashMap::new(),
            typing: HashMap::new(),
            typing_timer: false,
            last_used: Instant::now(),
        })
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> Result<(), StorageError> {
        self.svc.metrics.active_rooms.dec();
        Ok(())
    }
}

// ---------- access rules ----------

impl RoomActor {
    fn is_member(&self, user: &str) -> bool {
        self.members.contains_key(user)
    }

    /// May `user` read (history, subscribe) this channel?
    fn check_read(&self, user: Option<&str>) -> Result<(), Fail> {
        match self.channel.kind {
            ChannelKind::Topic => Ok(()),
            ChannelKind::Feed => match user {
                Some(u) if u != self.channel.name => Err(Fail::new(
                    ErrorCode::Forbidden,
                    "a feed is readable by its user only",
                )),
                _ => Ok(()),
            },
            ChannelKind::Room => {
                let room = self.require_room()?;
                match user {
                    Some(u) if room.kind != RoomKind::Public && !self.is_member(u) => {
                        Err(Fail::new(ErrorCode::NotMember, "not a member of this room"))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// May `user` post a chat message here? (`None`: the server API, always.)
    fn check_post(&self, user: Option<&str>) -> Result<(), Fail> {
        if self.channel.kind != ChannelKind::Room {
            return Ok(());
        }
        self.require_room()?;
        match user {
            Some(u) if !self.is_member(u) => Err(Fail::new(
                ErrorCode::NotMember,
                "join the room before posting",
            )),
            _ => Ok(()),
        }
    }

    fn require_room(&self) -> Result<&RoomInfo, Fail> {
        if self.channel.kind != ChannelKind::Room {
            return Err(Fail::new(ErrorCode::WrongRoomKind, "not a chat room"));
        }
        self.room
            .as_ref()
            .ok_or_else(|| Fail::new(ErrorCode::RoomNotFound, "no such room"))
    }

    async fn ensure_channel(&mut self) -> Result<ChannelHead, Fail> {
        if let Some(h) = &self.head {
            return Ok(h.clone());
        }
        if self.channel.kind == ChannelKind::Room && self.room.is_none() {
            return Err(Fail::new(ErrorCode::RoomNotFound, "no such room"));
        }
        let head = self
            .svc
            .store
            .create_channel(&self.key, &new_epoch())
            .await?;
        self.head = Some(head.clone());
        Ok(head)
    }

    async fn read_marker(&mut self, user: &str) -> Result<u64, Fail> {
        if let Some(m) = self.markers.get(user) {
            return Ok(*m);
        }
        let m = self
            .svc
            .store
            .read_marker(&self.key, user)
            .await?
            .unwrap_or(0);
        self.markers.insert(user.to_string(), m);
        Ok(m)
    }

    async fn unread(&mut self, user: &str, head: &ChannelHead) -> Result<(u64, u64), Fail> {
        let marker = self.read_marker(user).await?.min(head.offset);
        let seen = if marker == 0 {
            0
        } else {
            match self.svc.store.get_entry(&self.key, marker).await? {
                Some(e) => e.msg_seq,
                None => 0,
            }
        };
        Ok((marker, head.msg_seq.saturating_sub(seen)))
    }
}

// ---------- the write pipeline ----------

/// Longest client-supplied message id.
const MAX_CLIENT_ID: usize = 128;

/// The dedupe key of an entry's client id: [`client_key`] of its sender and id.
fn entry_client_key(e: &Entry) -> Option<String> {
    e.client_id
        .as_deref()
        .map(|cid| client_key(e.sender.as_deref(), cid))
}

impl RoomActor {
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
    /// queued or in-flight original. Returns the replier back when it is not a duplicate.
    /// Ids belong to their sender: another sender's equal id is another message.
    async fn dedupe(
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

    fn enqueue(&mut self, entry: Entry, replier: Replier, after: After) {
        self.enqueue_answering(entry, replier, after, None);
    }

    /// Queues `entry`; its replier gets `answer` (instead of the entry's
    /// [`Published`]) once the entry is durable.
    fn enqueue_answering(
        &mut self,
        entry: Entry,
        replier: Replier,
        after: After,
        answer: Option<Value>,
    ) {
        self.queue.push(Pending {
            entry,
            replier,
            duplicates: Vec::new(),
            after,
            answer,
        });
        if !self.writing {
            self.start_write();
        }
    }

    /// Numbers everything queued after the committed head and writes it as one batch.
    fn start_write(&mut self) {
        let Some(head) = self.head.clone() else {
            return;
        };
        if self.queue.is_empty() {
            return;
        }
        // Bounded batches: a backend may cap one append (ScyllaDB: one partition).
        let take = self.queue.len().min(MAX_BATCH);
        let mut batch: Vec<Pending> = self.queue.drain(..take).collect();
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
        self.writing = true;
        let store = self.svc.store.clone();
        let metrics = self.svc.metrics.clone();
        let key = self.key.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            let entries: Vec<Entry> = batch.iter().map(|p| p.entry.clone()).collect();
            let started = Instant::now();
            let result = store.append(&key, &entries).await;
            metrics
                .store_append_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.append_batch_size.observe(entries.len() as f64);
            if result.is_ok() {
                for p in &batch {
                    if let After::Rewrite(original) = &p.after {
                        if let Err(e) = store.update_entry(&key, original).await {
                            // The edit/delete entry is durable in the log, which
                            // catch-up replays; only the history view is stale.
                            tracing::error!(channel = %key, error = %e, "rewriting edited message failed");
                        }
                    }
                }
            }
            if let Some(me) = me.upgrade() {
                if me.tell(WriteDone { batch, result }).await.is_err() {
                    tracing::error!(channel = %key, "room stopped before its write completed");
                }
            }
        });
    }

    async fn finish_write(&mut self, mut batch: Vec<Pending>, result: Result<(), StorageError>) {
        self.writing = false;
        for p in &mut batch {
            if let Some(key) = entry_client_key(&p.entry) {
                if let Some(waiting) = self.inflight_ids.remove(&key) {
                    p.duplicates.extend(waiting);
                }
            }
        }
        match result {
            Ok(()) => {
                let Some(mut head) = self.head.clone() else {
                    return;
                };
                let mut senders: HashMap<String, u64> = HashMap::new();
                for p in batch {
                    head.offset = p.entry.offset;
                    head.msg_seq = p.entry.msg_seq;
                    self.head = Some(head.clone());
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
                    self.apply_membership(&p.entry);
                    self.fan_out(&p.entry, &head.epoch).await;
                    if p.entry.kind == EntryKind::Message {
                        if let Some(s) = &p.entry.sender {
                            senders.insert(s.clone(), p.entry.offset);
                        }
                        self.notify_for(&p.entry);
                    }
                    if let After::Removed(user) = p.after {
                        self.drop_user_subscriptions(&user).await;
                    }
                }
                self.advance_sender_markers(senders);
            }
            Err(e) => {
                let fail = Fail::from(e);
                // A conflict means someone else wrote here (ownership moved); an
                // unavailable store may have written the batch after all. Either
                // way our head may be stale: reload it before numbering more.
                match self.svc.store.channel_head(&self.key).await {
                    Ok(h) => self.head = h,
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
            }
        }
        self.start_write();
    }

    /// Keeps the membership cache in step with committed join/leave entries.
    fn apply_membership(&mut self, e: &Entry) {
        let Some(user) = &e.sender else { return };
        match e.kind {
            EntryKind::Joined => {
                self.members.entry(user.clone()).or_insert(Member {
                    user: user.clone(),
                    role: Role::Member,
                    joined_at: e.ts,
                });
            }
            EntryKind::Left => {
                self.members.remove(user);
            }
            _ => {}
        }
    }

    async fn fan_out(&self, entry: &Entry, epoch: &str) {
        if self.subscribers.is_empty() {
            return;
        }
        let frame = SharedFrame::new(ServerFrame::Push(Push {
            push: "entry".to_string(),
            channel: Some(self.key.clone()),
            epoch: Some(epoch.to_string()),
            offset: Some(entry.offset),
            ephemeral: false,
            data: to_value(entry),
        }));
        self.svc
            .deliver(&self.key, self.node_subs.keys(), Arc::new(frame))
            .await;
    }

    async fn push_ephemeral(&self, event: &str, data: Value) {
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

    /// Direct messages and @mentions become notifications for their recipients.
    fn notify_for(&self, e: &Entry) {
        let (Some(room), Some(sender)) = (&self.room, &e.sender) else {
            return;
        };
        let text = e.text.clone().unwrap_or_default();
        let mut targets: Vec<(String, &str)> = Vec::new();
        if room.kind == RoomKind::Direct {
            targets.extend(
                self.members
                    .keys()
                    .filter(|u| *u != sender)
                    .map(|u| (u.clone(), "chat.direct")),
            );
        } else {
            for word in text.split_whitespace() {
                if let Some(name) = word.strip_prefix('@') {
                    let name = name
                        .trim_end_matches(|c: char| !c.is_alphanumeric() && c != '_' && c != '-');
                    if name != sender
                        && self.members.contains_key(name)
                        && !targets.iter().any(|(u, _)| u == name)
                    {
                        targets.push((name.to_string(), "chat.mention"));
                    }
                }
            }
        }
        if targets.is_empty() {
            return;
        }
        let svc = self.svc.clone();
        let room_id = room.id.clone();
        let title = match room.kind {
            RoomKind::Direct => format!("{sender} sent you a message"),
            _ => format!(
                "{sender} mentioned you in {}",
                room.name.as_deref().unwrap_or(&room.id)
            ),
        };
        let preview: String = text.chars().take(140).collect();
        let offset = e.offset;
        let sender = sender.clone();
        tokio::spawn(async move {
            for (user, kind) in targets {
                let spec = NotifySpec {
                    kind: kind.to_string(),
                    title: title.clone(),
                    body: Some(preview.clone()),
                    data: Some(json!({"room": room_id, "offset": offset, "from": sender})),
                    priority: Priority::Normal,
                    category: Some("chat".to_string()),
                    room: Some(room_id.clone()),
                    expires_at: None,
                    ttl_ms: None,
                };
                if let Err(f) = svc
                    .tell_user(
                        &user,
                        Notify {
                            spec,
                            replier: Replier::None,
                        },
                    )
                    .await
                {
                    tracing::warn!(%user, error = %f, "chat notification not delivered");
                }
            }
        });
    }

    /// A sender has read their own message: their marker moves to it.
    fn advance_sender_markers(&mut self, senders: HashMap<String, u64>) {
        let mut writes = Vec::new();
        for (user, offset) in senders {
            let cur = self.markers.get(&user).copied().unwrap_or(0);
            if offset > cur {
                self.markers.insert(user.clone(), offset);
                writes.push((user, offset));
            }
        }
        if writes.is_empty() {
            return;
        }
        let store = self.svc.store.clone();
        let key = self.key.clone();
        tokio::spawn(async move {
            for (user, offset) in writes {
                if let Err(e) = store.set_read_marker(&key, &user, offset).await {
                    tracing::warn!(channel = %key, %user, error = %e, "read marker not saved");
                }
            }
        });
    }

    fn add_subscriber(&mut self, conn: ConnAddr, user: String) {
        let node = conn.node.clone();
        if self.subscribers.insert(conn, user).is_none() {
            *self.node_subs.entry(node).or_insert(0) += 1;
        }
    }

    /// Whether `conn` was subscribed.
    fn remove_subscriber(&mut self, conn: &ConnAddr) -> bool {
        if self.subscribers.remove(conn).is_none() {
            return false;
        }
        if let Some(n) = self.node_subs.get_mut(&conn.node) {
            *n -= 1;
            if *n == 0 {
                self.node_subs.remove(&conn.node);
            }
        }
        true
    }

    async fn drop_user_subscriptions(&mut self, user: &str) {
        let conns: Vec<ConnAddr> = self
            .subscribers
            .iter()
            .filter(|(_, u)| *u == user)
            .map(|(c, _)| c.clone())
            .collect();
        for conn in conns {
            self.remove_subscriber(&conn);
            self.svc.hub_unsubscribe(&self.key, &conn).await;
        }
    }

    fn room_entry(&self, kind: EntryKind, sender: Option<String>) -> Entry {
        let mut e = Entry::new(0, kind, 0, now_ms());
        e.sender = sender;
        e
    }

    async fn add_member(&mut self, user: &str, role: Role, by: Option<&str>) -> Result<(), Fail> {
        let member = Member {
            user: user.to_string(),
            role,
            joined_at: now_ms(),
        };
        self.svc
            .store
            .put_member(&self.channel.name, &member)
            .await?;
        self.members.insert(user.to_string(), member);
        let mut e = self.room_entry(EntryKind::Joined, Some(user.to_string()));
        if let Some(by) = by {
            e.data = Some(json!({"by": by}));
        }
        self.enqueue(e, Replier::None, After::Nothing);
        Ok(())
    }

    async fn subscribe_conn(
        &mut self,
        user: String,
        conn: ConnAddr,
        from: Option<(u64, Option<String>)>,
        id: u64,
    ) -> Result<(), Fail> {
        let head = self.ensure_channel().await?;
        let mut res = Subscribed {
            channel: self.key.clone(),
            epoch: head.epoch.clone(),
            offset: head.offset,
            recovered: true,
            reason: None,
            detail: None,
            missed: Vec::new(),
        };
        if let Some((offset, epoch)) = from {
            if epoch.as_ref().is_some_and(|e| *e != head.epoch) {
                res.recovered = false;
                res.reason = Some("epoch_changed".into());
                res.detail = Some("the channel's history was reset".into());
            } else if offset > head.offset {
                res.recovered = false;
                res.reason = Some("offset_ahead".into());
                res.detail = Some("the channel has no such offset".into());
            } else if head.offset - offset > self.svc.config.max_catchup as u64 {
                res.recovered = false;
                res.reason = Some("too_far_behind".into());
                res.detail = Some(format!(
                    "more than {} entries missed; page with `history` and subscribe again",
                    self.svc.config.max_catchup
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
        }
        // Reply first, then register: both go through the hub's one mailbox,
        // so the catch-up precedes every live entry after `head`.
        Replier::Conn {
            conn: conn.clone(),
            id,
        }
        .send(&self.svc, Ok(to_value(&res)))
        .await;
        self.add_subscriber(conn.clone(), user);
        self.svc.hub_subscribe(&self.key, &conn).await;
        Ok(())
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

// ---------- messages ----------

/// Create a group/public room, or the direct room of two users (idempotent for direct).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Create {
    pub info: RoomInfo,
    pub members: Vec<String>,
    pub replier: Replier,
}

/// Join (public rooms; for others, the caller must be a member already) and subscribe `conn`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Join {
    pub user: String,
    pub conn: Option<ConnAddr>,
    pub replier: Replier,
    pub req_id: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Leave {
    pub user: String,
    /// The connection that asked: it stops receiving the room if the leave succeeds.
    pub conn: Option<ConnAddr>,
    pub replier: Replier,
}

/// `by` adds `user` (group and public rooms); `by: None` is the server API.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Invite {
    pub by: Option<String>,
    pub user: String,
    pub replier: Replier,
}

/// `by` (an owner, or the server API when `None`) removes `user`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Kick {
    pub by: Option<String>,
    pub user: String,
    pub replier: Replier,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Members {
    pub user: Option<String>,
}

/// Append a chat message (`kind: Message`) or a publication (`kind: Publish`).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Publish {
    /// The author; `None` for the server API publishing on its own behalf.
    pub sender: Option<String>,
    /// Whether the sender's membership is checked (clients: yes; server API: no).
    pub as_client: bool,
    pub kind: EntryKind,
    pub text: Option<String>,
    pub attachments: Option<Value>,
    pub reply_to: Option<u64>,
    pub data: Option<Value>,
    pub client_id: Option<String>,
    pub replier: Replier,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Edit {
    pub user: String,
    pub offset: u64,
    /// `None` deletes.
    pub text: Option<String>,
    pub replier: Replier,
}

/// Check read access; returns the committed head (history is then read by the caller).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Authorize {
    pub user: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Subscribe {
    pub user: String,
    pub conn: ConnAddr,
    pub from: Option<(u64, Option<String>)>,
    pub req_id: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Unsubscribe {
    pub conn: ConnAddr,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Typing {
    pub user: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Read {
    pub user: String,
    pub offset: u64,
    pub replier: Replier,
}

/// This user's view of the room: head, read marker, unread count.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub user: String,
}

struct WriteDone {
    batch: Vec<Pending>,
    result: Result<(), StorageError>,
}

struct TypingExpire;
struct IdleCheck;

impl Message<Create> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Create, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = self.create(m.info, m.members).await;
        m.replier.send(&self.svc, r.map(|i| to_value(&i))).await;
    }
}

impl RoomActor {
    async fn create(&mut self, info: RoomInfo, members: Vec<String>) -> Result<RoomInfo, Fail> {
        if self.channel.kind != ChannelKind::Room {
            return Err(Fail::new(ErrorCode::WrongRoomKind, "not a chat room"));
        }
        if let Some(existing) = &self.room {
            if existing.kind == RoomKind::Direct && info.kind == RoomKind::Direct {
                return Ok(existing.clone());
            }
            return Err(Fail::new(
                ErrorCode::RoomExists,
                "a room with this id exists",
            ));
        }
        if !self.svc.store.create_room(&info).await? {
            // Created concurrently (another activation): reload and answer like above.
            self.room = self.svc.store.get_room(&self.channel.name).await?;
            return match &self.room {
                Some(r) if r.kind == RoomKind::Direct && info.kind == RoomKind::Direct => {
                    Ok(r.clone())
                }
                _ => Err(Fail::new(
                    ErrorCode::RoomExists,
                    "a room with this id exists",
                )),
            };
        }
        self.room = Some(info.clone());
        self.ensure_channel().await?;
        let owner_role = if info.kind == RoomKind::Direct {
            Role::Member
        } else {
            Role::Owner
        };
        self.add_member(&info.created_by, owner_role, None).await?;
        for user in members {
            if user != info.created_by && !self.is_member(&user) {
                self.add_member(&user, Role::Member, Some(&info.created_by))
                    .await?;
            }
        }
        Ok(info)
    }
}

impl Message<Join> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Join, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = self.join(&m.user).await;
        match (r, m.conn) {
            (Ok(()), Some(conn)) => {
                if let Err(f) = self.subscribe_conn(m.user, conn, None, m.req_id).await {
                    m.replier.send(&self.svc, Err(f)).await;
                }
            }
            (Ok(()), None) => {
                let head = self.head.clone();
                m.replier
                    .send(
                        &self.svc,
                        Ok(json!({"room": self.channel.name, "head": head})),
                    )
                    .await;
            }
            (Err(f), _) => m.replier.send(&self.svc, Err(f)).await,
        }
    }
}

impl RoomActor {
    async fn join(&mut self, user: &str) -> Result<(), Fail> {
        let room = self.require_room()?.clone();
        if self.is_member(user) {
            return Ok(());
        }
        if room.kind != RoomKind::Public {
            return Err(Fail::new(ErrorCode::NotMember, "this room is invite-only"));
        }
        self.add_member(user, Role::Member, None).await
    }
}

impl Message<Leave> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Leave, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        // A direct room has exactly two members: nobody can invite into it and
        // `room.direct` returns the same room, so leaving would lock the pair
        // out of their conversation for good.
        let r = match self.require_room() {
            Ok(room) if room.kind == RoomKind::Direct => Err(Fail::new(
                ErrorCode::WrongRoomKind,
                "nobody leaves a direct room",
            )),
            _ => self.removable(&m.user),
        };
        if let Err(f) = r {
            m.replier.send(&self.svc, Err(f)).await;
            return;
        }
        // Answered once the `left` entry is durable, so it is readable then.
        let removed = self
            .remove(&m.user, None, m.replier, json!({"left": true}))
            .await;
        if let (true, Some(conn)) = (removed, m.conn) {
            // The user's other connections to a non-public room follow once the
            // `left` entry is delivered (`After::Removed`).
            if self.remove_subscriber(&conn) {
                self.svc.hub_unsubscribe(&self.key, &conn).await;
            }
        }
    }
}

impl RoomActor {
    fn removable(&self, user: &str) -> Result<(), Fail> {
        self.require_room()?;
        if !self.is_member(user) {
            return Err(Fail::new(ErrorCode::NotMember, "not a member of this room"));
        }
        Ok(())
    }

    /// Removes a member (checked with [`Self::removable`]) and publishes the
    /// `left` entry; `replier` gets `answer` once that entry is durable.
    /// False when the store refused (the replier has the error).
    async fn remove(
        &mut self,
        user: &str,
        by: Option<&str>,
        replier: Replier,
        answer: Value,
    ) -> bool {
        if let Err(e) = self.svc.store.remove_member(&self.channel.name, user).await {
            replier.send(&self.svc, Err(e.into())).await;
            return false;
        }
        self.members.remove(user);
        let mut e = self.room_entry(EntryKind::Left, Some(user.to_string()));
        if let Some(by) = by {
            e.data = Some(json!({"by": by}));
        }
        let room_is_public = self
            .room
            .as_ref()
            .is_some_and(|r| r.kind == RoomKind::Public);
        // A removed user stops receiving a private room's traffic once the
        // `left` entry (which they do see) is delivered.
        let after = if room_is_public {
            After::Nothing
        } else {
            After::Removed(user.to_string())
        };
        self.enqueue_answering(e, replier, after, Some(answer));
        true
    }
}

impl Message<Invite> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Invite, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = self.invite(m.by.as_deref(), &m.user).await;
        m.replier
            .send(&self.svc, r.map(|_| json!({"invited": m.user})))
            .await;
    }
}

impl RoomActor {
    async fn invite(&mut self, by: Option<&str>, user: &str) -> Result<(), Fail> {
        let room = self.require_room()?.clone();
        if room.kind == RoomKind::Direct {
            return Err(Fail::new(
                ErrorCode::WrongRoomKind,
                "a direct room has exactly two members",
            ));
        }
        if let Some(by) = by {
            if !self.is_member(by) {
                return Err(Fail::new(ErrorCode::NotMember, "only members may invite"));
            }
        }
        if !chorus_protocol::valid_id(user) {
            return Err(Fail::new(ErrorCode::InvalidValue, "invalid user id"));
        }
        if self.is_member(user) {
            return Ok(());
        }
        self.add_member(user, Role::Member, by).await
    }
}

impl Message<Kick> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Kick, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = match self.require_room() {
            Err(f) => Err(f),
            Ok(room) if room.kind == RoomKind::Direct => Err(Fail::new(
                ErrorCode::WrongRoomKind,
                "nobody can be removed from a direct room",
            )),
            Ok(_) => match &m.by {
                Some(by) if self.members.get(by).is_none_or(|mb| mb.role != Role::Owner) => {
                    Err(Fail::new(
                        ErrorCode::Forbidden,
                        "only the room's owner may remove members",
                    ))
                }
                _ => self.removable(&m.user),
            },
        };
        match r {
            Err(f) => m.replier.send(&self.svc, Err(f)).await,
            Ok(()) => {
                let by = m.by.as_deref().or(Some("server"));
                let answer = json!({"removed": m.user});
                self.remove(&m.user, by, m.replier, answer).await;
            }
        }
    }
}

impl Message<Members> for RoomActor {
    type Reply = Result<Vec<Member>, Fail>;
    async fn handle(&mut self, m: Members, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.last_used = Instant::now();
        self.check_read(m.user.as_deref())?;
        let mut v: Vec<Member> = self.members.values().cloned().collect();
        v.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(v)
    }
}

impl Message<Publish> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Publish, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        // `publish` has replied itself, on failure as on success.
        let _ = self.publish(m).await;
    }
}

impl RoomActor {
    async fn publish(&mut self, m: Publish) -> Result<(), ()> {
        let Publish {
            sender,
            as_client,
            kind,
            text,
            attachments,
            reply_to,
            data,
            client_id,
            replier,
        } = m;
        // One rule for every path (socket sends, topic publishes, the server API).
        if client_id
            .as_ref()
            .is_some_and(|c| c.is_empty() || c.len() > MAX_CLIENT_ID)
        {
            let f = Fail::new(ErrorCode::InvalidValue, "client_id must be 1..=128 bytes");
            replier.send(&self.svc, Err(f)).await;
            return Err(());
        }
        let check = if as_client {
            self.check_post(sender.as_deref())
        } else {
            self.require_room_or_any()
        };
        if let Err(f) = check {
            replier.send(&self.svc, Err(f)).await;
            return Err(());
        }
        let head = match self.ensure_channel().await {
            Ok(h) => h,
            Err(f) => {
                replier.send(&self.svc, Err(f)).await;
                return Err(());
            }
        };
        if let Some(r) = reply_to {
            // A thread hangs off a chat message, not off a join, an edit or a publication.
            let target = if r == 0 || r > head.offset {
                Ok(None)
            } else {
                self.svc
                    .store
                    .get_entry(&self.key, r)
                    .await
                    .map_err(Fail::from)
            };
            match target {
                Ok(Some(e)) if e.kind == EntryKind::Message => {}
                Ok(_) => {
                    replier
                        .send(
                            &self.svc,
                            Err(Fail::new(
                                ErrorCode::MessageNotFound,
                                "reply_to: no such message",
                            )),
                        )
                        .await;
                    return Err(());
                }
                Err(f) => {
                    replier.send(&self.svc, Err(f)).await;
                    return Err(());
                }
            }
        }
        let replier = match &client_id {
            Some(cid) => match self.dedupe(sender.as_deref(), cid, replier).await {
                Some(r) => r,
                None => return Ok(()),
            },
            None => replier,
        };
        let mut e = self.room_entry(kind, sender);
        e.text = text;
        e.attachments = attachments;
        e.reply_to = reply_to;
        e.data = data;
        e.client_id = client_id;
        self.enqueue(e, replier, After::Nothing);
        Ok(())
    }

    /// The server API may publish to a room (if it exists), a topic or a feed.
    fn require_room_or_any(&self) -> Result<(), Fail> {
        if self.channel.kind == ChannelKind::Room {
            self.require_room().map(|_| ())
        } else {
            Ok(())
        }
    }
}

impl Message<Edit> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Edit, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        match self.prepare_edit(&m.user, m.offset, m.text).await {
            Ok((log_entry, rewritten)) => {
                self.enqueue(log_entry, m.replier, After::Rewrite(rewritten))
            }
            Err(f) => m.replier.send(&self.svc, Err(f)).await,
        }
    }
}

impl RoomActor {
    async fn prepare_edit(
        &mut self,
        user: &str,
        offset: u64,
        text: Option<String>,
    ) -> Result<(Entry, Entry), Fail> {
        self.check_post(Some(user))?;
        let head = self.ensure_channel().await?;
        if offset == 0 || offset > head.offset {
            return Err(Fail::new(
                ErrorCode::MessageNotFound,
                "no message at that offset",
            ));
        }
        let mut original = self
            .svc
            .store
            .get_entry(&self.key, offset)
            .await?
            .filter(|e| e.kind == EntryKind::Message && !e.deleted)
            .ok_or_else(|| Fail::new(ErrorCode::MessageNotFound, "no message at that offset"))?;
        if original.sender.as_deref() != Some(user) {
            return Err(Fail::new(
                ErrorCode::NotAuthor,
                "only the author may change a message",
            ));
        }
        let now = now_ms();
        let kind = if text.is_some() {
            EntryKind::Edit
        } else {
            EntryKind::Delete
        };
        let mut log_entry = self.room_entry(kind, Some(user.to_string()));
        log_entry.target = Some(offset);
        log_entry.text = text.clone();
        match text {
            Some(t) => {
                original.text = Some(t);
                original.edited_at = Some(now);
            }
            None => {
                original.text = None;
                original.attachments = None;
                original.deleted = true;
                original.edited_at = Some(now);
            }
        }
        Ok((log_entry, original))
    }
}

impl Message<Authorize> for RoomActor {
    type Reply = Result<ChannelHead, Fail>;
    async fn handle(&mut self, m: Authorize, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.last_used = Instant::now();
        self.check_read(m.user.as_deref())?;
        match &self.head {
            Some(h) => Ok(h.clone()),
            None if self.channel.kind == ChannelKind::Room => self.ensure_channel().await,
            None => Ok(ChannelHead {
                epoch: String::new(),
                offset: 0,
                msg_seq: 0,
            }),
        }
    }
}

impl Message<Subscribe> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Subscribe, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = match self.check_read(Some(&m.user)) {
            Ok(()) => {
                self.subscribe_conn(m.user, m.conn.clone(), m.from, m.req_id)
                    .await
            }
            Err(f) => Err(f),
        };
        if let Err(f) = r {
            Replier::Conn {
                conn: m.conn,
                id: m.req_id,
            }
            .send(&self.svc, Err(f))
            .await;
        }
    }
}

impl Message<Unsubscribe> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Unsubscribe, _: &mut Context<Self, ()>) {
        if self.remove_subscriber(&m.conn) {
            self.svc.hub_unsubscribe(&self.key, &m.conn).await;
        }
    }
}

impl Message<Typing> for RoomActor {
    /// Refused like a send: 3002 without the room, 3003 for a non-member.
    type Reply = Result<(), Fail>;
    async fn handle(&mut self, m: Typing, ctx: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.check_post(Some(&m.user))?;
        let expires = Instant::now() + self.svc.config.typing_ttl;
        let new = self.typing.insert(m.user, expires).is_none();
        if new {
            self.push_typing().await;
        }
        if !self.typing_timer {
            self.typing_timer = true;
            drop(
                ctx.actor_ref()
                    .tell(TypingExpire)
                    .send_after(self.svc.config.typing_ttl),
            );
        }
        Ok(())
    }
}

impl RoomActor {
    async fn push_typing(&self) {
        let mut users: Vec<String> = self.typing.keys().cloned().collect();
        users.sort();
        let data = to_value(&TypingPush {
            room: self.channel.name.clone(),
            users,
        });
        self.push_ephemeral("typing", data).await;
    }
}

impl Message<TypingExpire> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, _: TypingExpire, ctx: &mut Context<Self, ()>) {
        let now = Instant::now();
        let before = self.typing.len();
        self.typing.retain(|_, exp| *exp > now);
        if self.typing.len() != before {
            self.push_typing().await;
        }
        self.typing_timer = false;
        if let Some(next) = self.typing.values().min() {
            self.typing_timer = true;
            drop(
                ctx.actor_ref()
                    .tell(TypingExpire)
                    .send_after(next.saturating_duration_since(now)),
            );
        }
    }
}

impl Message<Read> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Read, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = self.mark_read(&m.user, m.offset).await;
        m.replier.send(&self.svc, r).await;
    }
}

impl RoomActor {
    async fn mark_read(&mut self, user: &str, offset: u64) -> Result<Value, Fail> {
        self.check_post(Some(user))?;
        let head = self.ensure_channel().await?;
        if offset > head.offset {
            return Err(Fail::new(
                ErrorCode::InvalidValue,
                "offset is past the room's head",
            ));
        }
        let cur = self.read_marker(user).await?;
        if offset > cur {
            self.svc
                .store
                .set_read_marker(&self.key, user, offset)
                .await?;
            self.markers.insert(user.to_string(), offset);
            let data = to_value(&ReceiptPush {
                room: self.channel.name.clone(),
                user: user.to_string(),
                offset,
            });
            self.push_ephemeral("receipt", data).await;
        }
        let (marker, unread) = self.unread(user, &head).await?;
        Ok(json!({"room": self.channel.name, "offset": marker, "unread": unread}))
    }
}

impl Message<Summary> for RoomActor {
    type Reply = Result<RoomSummary, Fail>;
    async fn handle(&mut self, m: Summary, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.check_read(Some(&m.user))?;
        let room = self.require_room()?.clone();
        let head = self.ensure_channel().await?;
        let (read_offset, unread) = self.unread(&m.user, &head).await?;
        Ok(RoomSummary {
            room,
            head,
            read_offset,
            unread,
        })
    }
}

impl Message<WriteDone> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: WriteDone, _: &mut Context<Self, ()>) {
        self.finish_write(m.batch, m.result).await;
    }
}

impl Message<IdleCheck> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, _: IdleCheck, ctx: &mut Context<Self, ()>) {
        let missing_room = self.channel.kind == ChannelKind::Room && self.room.is_none();
        let idle = self.subscribers.is_empty()
            && !self.writing
            && self.queue.is_empty()
            && self.typing.is_empty()
            && (missing_room || self.last_used.elapsed() >= self.svc.config.passivate_after);
        if idle {
            self.svc.passivate_room(&self.key, ctx.actor_ref());
        } else {
            drop(
                ctx.actor_ref()
                    .tell(IdleCheck)
                    .send_after(self.svc.config.passivate_after),
            );
        }
    }
}
