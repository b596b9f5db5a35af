//! The connection actor: one per WebSocket.
//!
//! The node's socket reader decodes each frame into a [`RawRequest`] and tells
//! this actor; the actor rate-limits it, checks its arguments and the token's
//! claims, and dispatches it: to a room (which replies through the hub, so the
//! reply is ordered with that room's pushes), to the user actor, or to the
//! store directly for plain reads. Replies it produces itself go straight to
//! the connection's outbound queue. When the socket ends, `on_stop` removes
//! the connection from the hub, its rooms, the users it watched and its own
//! user's presence.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_protocol::ops::{Members as MembersResult, PresenceList, RoomsList};
use chorus_protocol::{
    close, now_ms, valid_id, Channel, ChannelKind, EntryKind, ErrorCode, RawRequest, Reply,
    Request, RoomInfo, RoomKind, ServerFrame, SharedFrame,
};
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};
use kameo::Actor;
use serde::Serialize;
use serde_json::{json, Value};

use crate::hub::{ConnAddr, ConnId, ConnSink, PushError, Register, Unregister};
use crate::placement::{user_key, NodeId};
use crate::room::{self, new_epoch, RoomActor};
use crate::services::{Replier, Services};
use crate::timers::Timers;
use crate::user::{self, UserActor};
use crate::{Claims, Fail};

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
    rejected_in_a_row: u32,
}

impl RateLimiter {
    fn new(rate: u32, burst: u32) -> RateLimiter {
        let burst = burst.max(1) as f64;
        RateLimiter {
            rate: rate as f64,
            burst,
            tokens: burst,
            at: Instant::now(),
            rejected_in_a_row: 0,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.rejected_in_a_row = 0;
            true
        } else {
            self.rejected_in_a_row += 1;
            false
        }
    }
}

pub struct ConnArgs {
    pub svc: Arc<Services>,
    pub id: ConnId,
    pub claims: Claims,
    pub sink: ConnSink,
}

pub struct ConnActor {
    pub(crate) svc: Arc<Services>,
    id: ConnId,
    /// `id` with this node: how rooms and users address this connection.
    pub(crate) addr: ConnAddr,
    pub(crate) claims: Claims,
    sink: ConnSink,
    limiter: RateLimiter,
    subscriptions: HashSet<String>,
    /// Watched users, each with the incarnation of its owner that was told.
    watching: HashMap<String, (NodeId, u64)>,
    /// The incarnation of this user's owner that knows this connection.
    announced_to: Option<(NodeId, u64)>,
    last_activity_report: Instant,
    /// Bumped by every `auth.refresh`: only the newest token's expiry check
    /// counts, so a refresh to a shorter-lived token is enforced at its own
    /// `exp`, and checks do not pile up over many refreshes.
    token_generation: u64,
    /// Documents this connection has open (`doc.open`), closed when it ends.
    pub(crate) docs: HashSet<String>,
    /// `doc.update`s per second ([`crate::DocsConfig::updates_per_sec`]).
    pub(crate) doc_limiter: crate::doc::session::Bucket,
}

impl Actor for ConnActor {
    type Args = ConnArgs;
    type Error = Fail;

    async fn on_start(args: ConnArgs, me: ActorRef<Self>) -> Result<Self, Fail> {
        let ConnArgs {
            svc,
            id,
            claims,
            sink,
        } = args;
        svc.hub
            .tell(Register {
                conn: id,
                user: claims.user.clone(),
                sink: sink.clone(),
            })
            .await
            .map_err(|_| Fail::new(ErrorCode::ShuttingDown, "node is shutting down"))?;
        let addr = ConnAddr {
            node: svc.cluster.me().clone(),
            conn: id,
        };
        let owner = svc.cluster.owner_incarnation(&user_key(&claims.user));
        svc.ask_user(&claims.user, user::Connected { conn: addr.clone() })
            .await?;
        svc.conn_opened(id, me.downgrade());
        svc.metrics.connections.inc();
        svc.metrics.connections_total.inc();
        schedule_token_check(&svc.timers, &me, claims.expires_at, 0);
        let limiter = RateLimiter::new(svc.config.rate_per_sec, svc.config.rate_burst);
        let doc_limiter = crate::doc::session::Bucket::new(
            svc.config.docs.updates_per_sec,
            svc.config.docs.updates_burst,
        );
        Ok(ConnActor {
            svc,
            id,
            addr,
            claims,
            sink,
            limiter,
            subscriptions: HashSet::new(),
            watching: HashMap::new(),
            announced_to: Some(owner),
            last_activity_report: Instant::now(),
            token_generation: 0,
            docs: HashSet::new(),
            doc_limiter,
        })
    }

    async fn on_stop(&mut self, _: WeakActorRef<Self>, _: ActorStopReason) -> Result<(), Fail> {
        self.svc.metrics.connections.dec();
        self.svc.conn_closed(self.id);
        let _ = self.svc.hub.tell(Unregister { conn: self.id }).await;
        for channel in std::mem::take(&mut self.subscriptions) {
            let unsubscribe = room::Unsubscribe {
                conn: self.addr.clone(),
            };
            let _ = self
                .svc
                .tell_if_active::<RoomActor, _>(&channel, unsubscribe)
                .await;
        }
        self.close_docs().await;
        for u in std::mem::take(&mut self.watching).into_keys() {
            let unwatch = user::Unwatch {
                conn: self.addr.clone(),
            };
            let _ = self.svc.ask_if_active::<UserActor, _, _>(&u, unwatch).await;
        }
        let _ = self
            .svc
            .tell_user(
                &self.claims.user,
                user::Disconnected {
                    conn: self.addr.clone(),
                },
            )
            .await;
        Ok(())
    }
}

fn schedule_token_check(
    timers: &Timers,
    me: &ActorRef<ConnActor>,
    expires_at: i64,
    generation: u64,
) {
    let wait = Duration::from_millis((expires_at - now_ms()).max(0) as u64);
    timers.tell_after(me, TokenCheck { generation }, wait);
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The id of the direct room of two users: the same whoever asks.
pub fn direct_room_id(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    // The length prefix keeps ids containing ':' from colliding.
    format!("{DIRECT_ROOM_PREFIX}{}:{x}:{y}", x.len())
}

/// Room ids with this prefix belong to direct rooms. Other rooms may not take
/// them: a group room squatting `dm:5:alice:bob` would make the direct room of
/// alice and bob impossible to create, and put a stranger in charge of it.
pub const DIRECT_ROOM_PREFIX: &str = "dm:";

/// Refuses an id from the direct-room namespace for a group or public room.
pub fn check_not_direct_id(room: &str) -> Result<(), Fail> {
    if room.starts_with(DIRECT_ROOM_PREFIX) {
        Err(Fail::new(
            ErrorCode::InvalidValue,
            format!("room ids starting with `{DIRECT_ROOM_PREFIX}` are reserved for direct rooms"),
        ))
    } else {
        Ok(())
    }
}

impl ConnActor {
    fn reply(&self, id: u64, result: Result<Value, Fail>) {
        let reply = match result {
            Ok(v) => Reply::ok(id, v),
            Err(f) => {
                self.svc.metrics.error(f.code);
                Reply::err(id, f.code, f.message)
            }
        };
        let frame = Arc::new(SharedFrame::new(ServerFrame::Reply(reply)));
        if let Err(PushError::Full) = self.sink.push(frame) {
            self.svc.metrics.slow_consumers.inc();
            self.sink
                .close(close::SLOW_CONSUMER, "slow consumer: outbound queue full");
        }
    }

    fn conn_replier(&self, id: u64) -> Replier {
        Replier::Conn {
            conn: self.addr.clone(),
            id,
        }
    }

    fn user(&self) -> String {
        self.claims.user.clone()
    }

    fn check_room(&self, room: &str) -> Result<String, Fail> {
        if !valid_id(room) {
            return Err(Fail::new(ErrorCode::InvalidValue, "invalid room id"));
        }
        if !self.claims.may_use_room(room) {
            return Err(Fail::new(
                ErrorCode::Forbidden,
                "your token does not allow this room",
            ));
        }
        Ok(Channel::room(room).key())
    }

    /// Parses a channel name and checks the token allows reading it.
    fn check_channel_read(&self, name: &str) -> Result<Channel, Fail> {
        let ch = Channel::parse(name).ok_or_else(|| {
            Fail::new(
                ErrorCode::BadChannel,
                "channel must be room:<id>, topic:<name> or feed:<user>",
            )
        })?;
        let ok = match ch.kind {
            ChannelKind::Room => self.claims.may_use_room(&ch.name),
            ChannelKind::Topic => self.claims.may_subscribe_topic(&ch.name),
            ChannelKind::Feed => ch.name == self.claims.user,
        };
        if ok {
            Ok(ch)
        } else {
            Err(Fail::new(
                ErrorCode::Forbidden,
                "your token does not allow this channel",
            ))
        }
    }

    async fn report_activity(&mut self) {
        let every = self.svc.config.idle_after / 4;
        if self.last_activity_report.elapsed() >= every {
            self.last_activity_report = Instant::now();
            let _ = self
                .svc
                .tell_user(
                    &self.claims.user,
                    user::Activity {
                        conn: self.addr.clone(),
                    },
                )
                .await;
        }
    }

    /// Handles one request. `None`: someone else (a room) sends the reply.
    async fn dispatch(&mut self, id: u64, req: Request) -> Option<Result<Value, Fail>> {
        let svc = self.svc.clone();
        let me = self.user();
        let r = match req {
            Request::Ping => Ok(json!({"pong": now_ms()})),
            Request::AuthRefresh(a) => self.refresh(a.token),
            Request::RoomCreate(a) => {
                if a.kind == RoomKind::Direct {
                    return Some(Err(Fail::new(
                        ErrorCode::WrongRoomKind,
                        "use room.direct for direct rooms",
                    )));
                }
                let room_id = a.room.unwrap_or_else(|| format!("r{}", new_epoch()));
                let key = match self
                    .check_room(&room_id)
                    .and_then(|k| check_not_direct_id(&room_id).map(|_| k))
                {
                    Ok(k) => k,
                    Err(f) => return Some(Err(f)),
                };
                if let Some(bad) = a.members.iter().find(|m| !valid_id(m)) {
                    return Some(Err(Fail::new(
                        ErrorCode::InvalidValue,
                        format!("invalid member id `{}`", truncate(bad)),
                    )));
                }
                if a.name.as_ref().is_some_and(|n| n.len() > 256) {
                    return Some(Err(Fail::new(
                        ErrorCode::InvalidValue,
                        "name longer than 256 bytes",
                    )));
                }
                let info = RoomInfo::new(room_id, a.kind, a.name, me, a.membership_entries);
                let msg = room::Create {
                    info,
                    members: a.members,
                    replier: self.conn_replier(id),
                };
                svc.tell_room(&key, msg).await.map(|_| Value::Null)
            }
            Request::RoomDirect(a) => {
                if !valid_id(&a.user) || a.user == me {
                    return Some(Err(Fail::new(
                        ErrorCode::InvalidValue,
                        "direct rooms need another valid user id",
                    )));
                }
                let room_id = direct_room_id(&me, &a.user);
                let key = match self.check_room(&room_id) {
                    Ok(k) => k,
                    Err(f) => return Some(Err(f)),
                };
                let info = RoomInfo::new(room_id, RoomKind::Direct, None, me, None);
                let msg = room::Create {
                    info,
                    members: vec![a.user],
                    replier: self.conn_replier(id),
                };
                svc.tell_room(&key, msg).await.map(|_| Value::Null)
            }
            Request::RoomJoin(a) => match self.check_room(&a.room) {
                Ok(key) => {
                    self.subscriptions.insert(key.clone());
                    let msg = room::Join {
                        user: me,
                        conn: Some(self.addr.clone()),
                        replier: self.conn_replier(id),
                        req_id: id,
                    };
                    svc.tell_room(&key, msg).await.map(|_| Value::Null)
                }
                Err(f) => Err(f),
            },
            Request::RoomLeave(a) => match self.check_room(&a.room) {
                Ok(key) => {
                    // The room unsubscribes this connection if the leave succeeds: a
                    // refused one (a direct room) must leave the subscription alone.
                    let msg = room::Leave {
                        user: me,
                        conn: Some(self.addr.clone()),
                        replier: self.conn_replier(id),
                    };
                    svc.tell_room(&key, msg).await.map(|_| Value::Null)
                }
                Err(f) => Err(f),
            },
            Request::RoomInvite(a) => match self.check_room(&a.room) {
                Ok(key) => {
                    let msg = room::Invite {
                        by: Some(me),
                        user: a.user,
                        replier: self.conn_replier(id),
                    };
                    svc.tell_room(&key, msg).await.map(|_| Value::Null)
                }
                Err(f) => Err(f),
            },
            Request::RoomKick(a) => match self.check_room(&a.room) {
                Ok(key) => {
                    let msg = room::Kick {
                        by: Some(me),
                        user: a.user,
                        replier: self.conn_replier(id),
                    };
                    svc.tell_room(&key, msg).await.map(|_| Value::Null)
                }
                Err(f) => Err(f),
            },
            Request::RoomMembers(a) => match self.check_room(&a.room) {
                Ok(key) => svc
                    .ask_room(&key, room::Members { user: Some(me) })
                    .await
                    .map(|members| {
                        to_value(&MembersResult {
                            room: a.room,
                            members,
                        })
                    }),
                Err(f) => Err(f),
            },
            Request::RoomsList => self.rooms_list().await,
            Request::Send(a) => {
                if a.text.len() > svc.config.max_text_bytes {
                    return Some(Err(Fail::new(
                        ErrorCode::InvalidValue,
                        format!("text longer than {} bytes", svc.config.max_text_bytes),
                    )));
                }
                match self.check_room(&a.room) {
                    Ok(key) => {
                        let msg = room::Publish {
                            sender: Some(me),
                            as_client: true,
                            kind: EntryKind::Message,
                            text: Some(a.text),
                            attachments: a.attachments,
                            reply_to: a.reply_to,
                            data: None,
                            client_id: a.client_id,
                            replier: self.conn_replier(id),
                        };
                        svc.tell_room(&key, msg).await.map(|_| Value::Null)
                    }
                    Err(f) => Err(f),
                }
            }
            Request::Edit(a) => {
                if a.text.len() > svc.config.max_text_bytes {
                    return Some(Err(Fail::new(ErrorCode::InvalidValue, "text too long")));
                }
                match self.check_room(&a.room) {
                    Ok(key) => {
                        let msg = room::Edit {
                            user: me,
                            offset: a.offset,
                            text: Some(a.text),
                            replier: self.conn_replier(id),
                        };
                        svc.tell_room(&key, msg).await.map(|_| Value::Null)
                    }
                    Err(f) => Err(f),
                }
            }
            Request::Delete(a) => match self.check_room(&a.room) {
                Ok(key) => {
                    let msg = room::Edit {
                        user: me,
                        offset: a.offset,
                        text: None,
                        replier: self.conn_replier(id),
                    };
                    svc.tell_room(&key, msg).await.map(|_| Value::Null)
                }
                Err(f) => Err(f),
            },
            Request::History(a) => self.history(a).await,
            Request::Typing(a) => match self.check_room(&a.room) {
                Ok(key) => svc
                    .ask_room(&key, room::Typing { user: me })
                    .await
                    .map(|()| json!({})),
                Err(f) => Err(f),
            },
            Request::Read(a) => match self.check_room(&a.room) {
                Ok(key) => {
                    let msg = room::Read {
                        user: me,
                        offset: a.offset,
                        replier: self.conn_replier(id),
                    };
                    svc.tell_room(&key, msg).await.map(|_| Value::Null)
                }
                Err(f) => Err(f),
            },
            Request::Subscribe(a) => match self.check_channel_read(&a.channel) {
                Ok(ch) => {
                    let key = ch.key();
                    self.subscriptions.insert(key.clone());
                    let from = a.offset.map(|o| (o, a.epoch));
                    let msg = room::Subscribe {
                        user: me,
                        conn: self.addr.clone(),
                        from,
                        req_id: id,
                    };
                    svc.tell_room(&key, msg).await.map(|_| Value::Null)
                }
                Err(f) => Err(f),
            },
            Request::Unsubscribe(a) => match Channel::parse(&a.channel) {
                Some(ch) => {
                    let key = ch.key();
                    if self.subscriptions.remove(&key) {
                        let unsubscribe = room::Unsubscribe {
                            conn: self.addr.clone(),
                        };
                        let _ = svc.tell_if_active::<RoomActor, _>(&key, unsubscribe).await;
                        Ok(json!({"channel": key}))
                    } else {
                        Err(Fail::new(
                            ErrorCode::NotSubscribed,
                            "not subscribed to this channel",
                        ))
                    }
                }
                None => Err(Fail::new(ErrorCode::BadChannel, "bad channel name")),
            },
            Request::TopicPublish(a) => {
                if !valid_id(&a.topic) {
                    return Some(Err(Fail::new(
                        ErrorCode::InvalidValue,
                        "invalid topic name",
                    )));
                }
                if !self.claims.may_publish_topic(&a.topic) {
                    return Some(Err(Fail::new(
                        ErrorCode::Forbidden,
                        "your token does not allow publishing to this topic",
                    )));
                }
                let msg = room::Publish {
                    sender: Some(me),
                    as_client: true,
                    kind: EntryKind::Publish,
                    text: None,
                    attachments: None,
                    reply_to: None,
                    data: Some(a.data),
                    client_id: a.client_id,
                    replier: self.conn_replier(id),
                };
                svc.tell_room(&Channel::topic(&a.topic).key(), msg)
                    .await
                    .map(|_| Value::Null)
            }
            Request::NotifList(a) => svc
                .notification_page(&me, a.before, a.limit.map(|l| l as usize), a.unread_only)
                .await
                .map(|page| to_value(&page)),
            Request::NotifUnread => svc
                .store
                .unread_notifications(&me, now_ms())
                .await
                .map(|n| json!({"unread": n}))
                .map_err(Fail::from),
            Request::NotifRead(a) => {
                if !a.all && a.ids.is_empty() {
                    return Some(Err(Fail::new(
                        ErrorCode::InvalidArgs,
                        "give `ids` or `all: true`",
                    )));
                }
                let ids = if a.all { None } else { Some(a.ids) };
                svc.ask_user(&me, user::MarkRead { ids })
                    .await
                    .map(|p| to_value(&p))
            }
            Request::PrefsGet => svc
                .store
                .get_prefs(&me)
                .await
                .map(|p| to_value(&p.unwrap_or_default()))
                .map_err(Fail::from),
            Request::PrefsSet(prefs) => svc
                .ask_user(&me, user::SetPrefs { prefs })
                .await
                .map(|p| to_value(&p)),
            Request::PresenceSet(a) => svc
                .ask_user(
                    &me,
                    user::SetPresence {
                        conn: self.addr.clone(),
                        status: a.status,
                        activity: a.activity,
                    },
                )
                .await
                .map(|p| to_value(&p)),
            Request::PresenceWatch(a) => self.watch(a.users, a.room).await,
            Request::PresenceUnwatch(a) => {
                let mut users = a.users;
                if let Some(room) = a.room {
                    if let Ok(key) = self.check_room(&room) {
                        if let Ok(members) = svc
                            .ask_room(
                                &key,
                                room::Members {
                                    user: Some(me.clone()),
                                },
                            )
                            .await
                        {
                            users.extend(members.into_iter().map(|m| m.user));
                        }
                    }
                }
                for u in users {
                    if self.watching.remove(&u).is_some() {
                        let unwatch = user::Unwatch {
                            conn: self.addr.clone(),
                        };
                        // Asked, not told: once the reply is sent no push
                        // from that user follows, whichever node owns it.
                        let _ = svc.ask_if_active::<UserActor, _, _>(&u, unwatch).await;
                    }
                }
                Ok(json!({"watching": self.watching.len()}))
            }
            Request::PresenceQuery(a) => self.query_presence(a.users).await,
            Request::DocOpen(_)
            | Request::DocUpdate(_)
            | Request::DocAwareness(_)
            | Request::DocClose(_) => return self.doc_request(id, req).await,
        };
        match r {
            Ok(Value::Null) => None,
            other => Some(other),
        }
    }

    fn refresh(&mut self, token: String) -> Result<Value, Fail> {
        let claims = self.svc.verifier.verify(&token)?;
        if claims.user != self.claims.user {
            return Err(Fail::new(
                ErrorCode::TokenUserMismatch,
                "the new token is for another user",
            ));
        }
        let expires_at = claims.expires_at;
        self.claims = claims;
        self.token_generation += 1;
        Ok(json!({"expires_at": expires_at}))
    }

    async fn rooms_list(&self) -> Result<Value, Fail> {
        let me = self.user();
        let ids = self.svc.store.user_rooms(&me).await?;
        let mut rooms = Vec::with_capacity(ids.len());
        // Listing reveals a room: only those the token's `rooms` claim allows.
        for id in ids.into_iter().filter(|id| self.claims.may_use_room(id)) {
            let key = Channel::room(&id).key();
            match self
                .svc
                .ask_room(&key, room::Summary { user: me.clone() })
                .await
            {
                Ok(s) => rooms.push(s),
                Err(f) if matches!(f.code, ErrorCode::RoomNotFound | ErrorCode::NotMember) => {}
                Err(f) => return Err(f),
            }
        }
        Ok(to_value(&RoomsList { rooms }))
    }

    async fn history(&self, a: chorus_protocol::ops::History) -> Result<Value, Fail> {
        let key = self.check_channel_read(&a.channel)?.key();
        let limit = a.limit.map(|l| l as usize);
        let page = self
            .svc
            .history_page(&key, Some(self.user()), a.before, a.after, limit)
            .await?;
        Ok(to_value(&page))
    }

    async fn watch(&mut self, mut users: Vec<String>, room: Option<String>) -> Result<Value, Fail> {
        let me = self.user();
        if let Some(room) = room {
            let key = self.check_room(&room)?;
            let members = self
                .svc
                .ask_room(
                    &key,
                    room::Members {
                        user: Some(me.clone()),
                    },
                )
                .await?;
            users.extend(members.into_iter().map(|m| m.user).filter(|u| *u != me));
        }
        users.sort();
        users.dedup();
        if let Some(bad) = users.iter().find(|u| !valid_id(u)) {
            return Err(Fail::new(
                ErrorCode::InvalidValue,
                format!("invalid user id `{}`", truncate(bad)),
            ));
        }
        let new: Vec<&String> = users
            .iter()
            .filter(|u| !self.watching.contains_key(*u))
            .collect();
        if self.watching.len() + new.len() > self.svc.config.max_watch {
            return Err(Fail::new(
                ErrorCode::InvalidValue,
                format!(
                    "at most {} watched users per connection",
                    self.svc.config.max_watch
                ),
            ));
        }
        let mut out = Vec::with_capacity(users.len());
        for u in &users {
            let owner = self.svc.cluster.owner_incarnation(&user_key(u));
            let p = self
                .svc
                .ask_user(
                    u,
                    user::Watch {
                        conn: self.addr.clone(),
                    },
                )
                .await?;
            self.watching.insert(u.clone(), owner);
            out.push(p);
        }
        Ok(to_value(&PresenceList { users: out }))
    }

    async fn query_presence(&self, users: Vec<String>) -> Result<Value, Fail> {
        if users.len() > self.svc.config.max_watch {
            return Err(Fail::new(
                ErrorCode::InvalidValue,
                "too many users in one query",
            ));
        }
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            if !valid_id(&u) {
                return Err(Fail::new(
                    ErrorCode::InvalidValue,
                    format!("invalid user id `{}`", truncate(&u)),
                ));
            }
            out.push(self.svc.presence_of(&u).await?);
        }
        Ok(to_value(&PresenceList { users: out }))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A decoded request from the socket.
pub struct Inbound(pub RawRequest);

/// Owners changed: announce this connection again to its user's actor,
/// and watch again each watched user, where the owner is not the
/// incarnation that was told last; retried every second until each owner
/// answered.
pub struct Reannounce;

/// `node` forgot this node's connections (it saw this node down for a
/// while): whatever was announced to it is to be announced again.
pub struct Forgotten {
    pub node: NodeId,
}

impl Message<Forgotten> for ConnActor {
    type Reply = ();
    async fn handle(&mut self, m: Forgotten, ctx: &mut Context<Self, ()>) {
        if self
            .announced_to
            .as_ref()
            .is_some_and(|(n, _)| *n == m.node)
        {
            self.announced_to = None;
        }
        for at in self.watching.values_mut() {
            if at.0 == m.node {
                at.1 = u64::MAX;
            }
        }
        drop(ctx.actor_ref().tell(Reannounce).try_send());
    }
}

/// How soon a connection tries again to announce itself to a new owner.
const REANNOUNCE_RETRY: Duration = Duration::from_secs(1);

impl Message<Reannounce> for ConnActor {
    type Reply = ();
    async fn handle(&mut self, _: Reannounce, ctx: &mut Context<Self, ()>) {
        let svc = self.svc.clone();
        let me = self.user();
        let mut settled = true;
        let owner = svc.cluster.owner_incarnation(&user_key(&me));
        if self.announced_to.as_ref() != Some(&owner) {
            let connected = user::Connected {
                conn: self.addr.clone(),
            };
            match svc.ask_user(&me, connected).await {
                Ok(()) => self.announced_to = Some(owner),
                Err(f) => {
                    settled = false;
                    tracing::debug!(user = %me, error = %f, "announcing a connection again failed");
                }
            }
        }
        let watched: Vec<(String, (NodeId, u64))> = self
            .watching
            .iter()
            .map(|(u, at)| (u, at, svc.cluster.owner_incarnation(&user_key(u))))
            .filter(|(_, at, now)| *at != now)
            .map(|(u, _, now)| (u.clone(), now))
            .collect();
        for (u, owner) in watched {
            let watch = user::Watch {
                conn: self.addr.clone(),
            };
            match svc.ask_user(&u, watch).await {
                // What the new owner knows: the watcher may have missed a change.
                Ok(p) => {
                    self.watching.insert(u, owner);
                    let push = chorus_protocol::Push::ephemeral("presence", None, to_value(&p));
                    let frame = SharedFrame::new(ServerFrame::Push(push));
                    svc.send_to(&self.addr, Arc::new(frame)).await;
                }
                Err(f) => {
                    settled = false;
                    tracing::debug!(user = %u, error = %f, "watching again failed");
                }
            }
        }
        if !settled {
            self.svc
                .timers
                .tell_after(ctx.actor_ref(), Reannounce, REANNOUNCE_RETRY);
        }
    }
}

/// Re-checks the token's expiry.
struct TokenCheck {
    generation: u64,
}

impl Message<Inbound> for ConnActor {
    type Reply = ();
    async fn handle(&mut self, Inbound(req): Inbound, ctx: &mut Context<Self, ()>) {
        if !self.limiter.allow() {
            self.reply(
                req.id,
                Err(Fail::new(
                    ErrorCode::RateLimited,
                    "too many requests, slow down",
                )),
            );
            if self.limiter.rejected_in_a_row > self.svc.config.rate_burst.max(10) {
                self.sink
                    .close(close::RATE_LIMITED, "rate limit exceeded repeatedly");
            }
            return;
        }
        if self.svc.is_stopping() {
            self.reply(
                req.id,
                Err(Fail::new(
                    ErrorCode::ShuttingDown,
                    "node is shutting down, reconnect",
                )),
            );
            return;
        }
        self.report_activity().await;
        match Request::parse(&req.op, req.args) {
            Err(e) => self.reply(req.id, Err(e.into())),
            Ok(r) => {
                let generation = self.token_generation;
                if let Some(result) = self.dispatch(req.id, r).await {
                    self.reply(req.id, result);
                }
                if self.token_generation != generation {
                    schedule_token_check(
                        &self.svc.timers,
                        ctx.actor_ref(),
                        self.claims.expires_at,
                        self.token_generation,
                    );
                }
            }
        }
    }
}

impl Message<TokenCheck> for ConnActor {
    type Reply = ();
    async fn handle(&mut self, m: TokenCheck, ctx: &mut Context<Self, ()>) {
        if m.generation != self.token_generation {
            // Scheduled for a token that has since been replaced; the newer one has its own check.
            return;
        }
        if self.claims.expires_at <= now_ms() {
            self.svc.metrics.error(ErrorCode::TokenExpired);
            self.sink.close(close::TOKEN_EXPIRED, "token expired");
        } else {
            schedule_token_check(
                &self.svc.timers,
                ctx.actor_ref(),
                self.claims.expires_at,
                self.token_generation,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_room_ids_are_symmetric_and_unambiguous() {
        assert_eq!(
            direct_room_id("bob", "alice"),
            direct_room_id("alice", "bob")
        );
        assert_ne!(direct_room_id("a:b", "c"), direct_room_id("a", "b:c"));
        assert!(check_not_direct_id(&direct_room_id("a", "b")).is_err());
        assert!(check_not_direct_id("team").is_ok());
    }

    #[test]
    fn rate_limiter_allows_burst_then_refuses() {
        let mut l = RateLimiter::new(0, 3);
        assert!(l.allow() && l.allow() && l.allow());
        assert!(!l.allow());
        assert_eq!(l.rejected_in_a_row, 1);
    }
}
