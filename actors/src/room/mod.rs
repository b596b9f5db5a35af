//! The room actor: one per channel (`room:…`, `topic:…`, `feed:…`), the
//! only writer of its [`ChannelLog`] (offsets, group commit, catch-up,
//! per-node fan-out: [`crate::log`]). This file holds the room's rules:
//! who may read and post, what a committed entry changes (membership,
//! notifications, read markers). Its requests are in [`members`]
//! (create, join, leave, invite, kick) and [`posts`] (publish, edit,
//! subscribe, typing, receipts).
//!
//! A room that stops (idle, ownership moved, shutdown) first collects its
//! in-flight write and writes what is still queued, acknowledging each
//! entry: a request that reached the room is answered.

mod members;
mod moves;
mod posts;

pub use members::{Create, Invite, Join, Kick, Leave, Members};
pub use moves::{Refresh, Resubscribe};
pub use posts::{Authorize, Edit, Publish, Read, Subscribe, Summary, Typing, Unsubscribe};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_protocol::ops::{ReceiptPush, RoomSummary, TypingPush};
use chorus_protocol::{
    now_ms, Channel, ChannelHead, ChannelKind, Entry, EntryKind, ErrorCode, Member, Priority, Push,
    Role, RoomInfo, RoomKind, ServerFrame, SharedFrame,
};
use chorus_storage::{ErrorKind, StorageError};
use kameo::actor::{ActorRef, Spawn, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::mailbox;
use kameo::message::{Context, Message};
use kameo::Actor;
use serde_json::{json, Value};

use crate::hub::ConnAddr;
use crate::log::{to_value, ChannelLog, Committed, Written};
use crate::placement::{ActorKind, Placed, Registry};
use crate::services::{Replier, Services};
use crate::user::{Notify, NotifySpec};
use crate::Fail;

pub use crate::log::new_epoch;

/// What the room does once an entry is durable, besides fanning it out.
enum After {
    Nothing,
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
    log: ChannelLog<After>,
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
        svc.timers.tell_after(
            &actor_ref,
            IdleCheck,
            passivate_after.min(Duration::from_secs(1)),
        );
        Ok(RoomActor {
            log: ChannelLog::new(svc.clone(), key.clone(), head),
            svc,
            key,
            channel,
            me: actor_ref.downgrade(),
            room,
            members,
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
        // Nothing that reached the room goes unanswered: collect the write in
        // flight, then write what is queued (new owners refuse it with a
        // conflict if they wrote first; those callers get a retryable error).
        while self.log.is_writing() {
            let committed = self.log.wait_written().await;
            self.on_committed(committed).await;
        }
        self.release_subscribers().await;
        self.refresh_new_owner().await;
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

    /// The committed head, creating the channel; a room must exist first.
    async fn ensure_channel(&mut self) -> Result<ChannelHead, Fail> {
        if self.log.head().is_none()
            && self.channel.kind == ChannelKind::Room
            && self.room.is_none()
        {
            return Err(Fail::new(ErrorCode::RoomNotFound, "no such room"));
        }
        self.log.ensure().await
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

// ---------- after an entry is durable ----------

/// Longest client-supplied message id.
const MAX_CLIENT_ID: usize = 128;

impl RoomActor {
    /// Queues an entry for the next write; its replier gets `answer` (or the
    /// entry's `Published`) once it is durable.
    fn enqueue(
        &mut self,
        entry: Entry,
        replier: Replier,
        answer: Option<Value>,
        rewrite: Option<Entry>,
        after: After,
    ) {
        self.log.enqueue(entry, replier, answer, rewrite, after);
        self.log.start_write(&self.me);
    }

    /// Applies the room's rules to acknowledged entries, in offset order,
    /// each fanned out before the next, then starts the next write.
    async fn on_committed(&mut self, committed: Vec<Committed<After>>) {
        let mut senders: HashMap<String, u64> = HashMap::new();
        for c in committed {
            self.apply_membership(&c.entry);
            self.log.fan_out(&c.entry).await;
            if c.entry.kind == EntryKind::Message {
                if let Some(s) = &c.entry.sender {
                    senders.insert(s.clone(), c.entry.offset);
                }
                self.notify_for(&c.entry);
            }
            if let After::Removed(user) = c.then {
                self.log.unsubscribe_user(&user).await;
            }
        }
        self.advance_sender_markers(senders);
        self.log.start_write(&self.me);
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

    /// Are joins and leaves entries here ([`RoomInfo::records_membership`])?
    fn records_membership(&self) -> bool {
        self.room.as_ref().is_some_and(RoomInfo::records_membership)
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
        if !self.records_membership() {
            return Ok(());
        }
        let mut e = self.room_entry(EntryKind::Joined, Some(user.to_string()));
        if let Some(by) = by {
            e.data = Some(json!({"by": by}));
        }
        self.enqueue(e, Replier::None, None, None, After::Nothing);
        Ok(())
    }

    async fn subscribe_conn(
        &mut self,
        user: String,
        conn: ConnAddr,
        from: Option<(u64, Option<String>)>,
        id: u64,
    ) -> Result<(), Fail> {
        self.ensure_channel().await?;
        let before = self.log.head().map(|h| h.offset);
        let subscribed = self.log.subscribe(user, conn, from, id).await;
        if self.log.head().map(|h| h.offset) != before {
            self.reload_members().await;
        }
        subscribed
    }
}

struct IdleCheck;

impl Placed for RoomActor {
    const KIND: ActorKind = ActorKind::Room;
    fn registry(svc: &Services) -> &Registry<Self> {
        &svc.rooms
    }
    fn spawn(svc: &Arc<Services>, key: &str) -> ActorRef<Self> {
        RoomActor::spawn_with_mailbox(
            (svc.clone(), key.to_string()),
            mailbox::bounded(svc.config.mailbox),
        )
    }
}

impl Message<Written> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, _: Written, _: &mut Context<Self, ()>) {
        let committed = self.log.wait_written().await;
        self.on_committed(committed).await;
    }
}

impl Message<IdleCheck> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, _: IdleCheck, ctx: &mut Context<Self, ()>) {
        let missing_room = self.channel.kind == ChannelKind::Room && self.room.is_none();
        let idle = self.log.is_idle()
            && self.typing.is_empty()
            && (missing_room || self.last_used.elapsed() >= self.svc.config.passivate_after);
        if idle {
            self.svc.passivate(&self.key, ctx.actor_ref());
        } else {
            self.svc
                .timers
                .tell_after(ctx.actor_ref(), IdleCheck, self.svc.config.passivate_after);
        }
    }
}
