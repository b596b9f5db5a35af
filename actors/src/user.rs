//! The user actor: one per user id.
//!
//! Presence is merged across the user's connections (devices): online while
//! any connection was active within `idle_after` and not declared idle, idle
//! while connections remain but none is active, offline when the last one
//! closes (then `last_seen` is stored). Watchers (connections watching this
//! user) get a `presence` push on every change.
//!
//! Notifications are stored before they are acknowledged; pushes to the
//! user's connections are coalesced: a burst within `notify_coalesce` leaves
//! as one `notifications` push (urgent ones flush at once).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chorus_protocol::ops::{NotificationsPush, NotificationsReadPush};
use chorus_protocol::{
    now_ms, ErrorCode, Millis, Notification, NotificationPrefs, Presence, Priority, Push,
    ServerFrame, SharedFrame, Status,
};
use chorus_storage::StorageError;
use kameo::actor::{ActorRef, Spawn, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::mailbox;
use kameo::message::{Context, Message};
use kameo::Actor;
use serde_json::{json, Value};

use crate::hub::ConnAddr;
use crate::placement::moves::NodeGone;
use crate::placement::{ActorKind, Placed, Registry};
use crate::services::{Replier, Services};
use crate::Fail;

/// Longest activity line.
const MAX_ACTIVITY: usize = 256;
/// Ids tried for one notification before giving up with a retryable 5003:
/// another owner of the same user (during a view change) takes ids of the
/// same millisecond, and each retry moves past the one it took.
const ID_ATTEMPTS: usize = 8;

struct ConnState {
    last_active: Instant,
    declared_idle: bool,
}

pub struct UserActor {
    svc: Arc<Services>,
    user: String,
    conns: HashMap<ConnAddr, ConnState>,
    watchers: HashMap<ConnAddr, ()>,
    activity: Option<String>,
    last_seen: Option<Millis>,
    status: Status,
    prefs: NotificationPrefs,
    pending: Vec<Notification>,
    flush_scheduled: bool,
    last_id: u64,
    idle_timer_at: Option<Instant>,
    last_used: Instant,
}

impl Actor for UserActor {
    type Args = (Arc<Services>, String);
    type Error = StorageError;

    async fn on_start((svc, user): Self::Args, me: ActorRef<Self>) -> Result<Self, StorageError> {
        let last_seen = svc.store.last_seen(&user).await?;
        let prefs = svc.store.get_prefs(&user).await?.unwrap_or_default();
        svc.metrics.active_users.inc();
        svc.timers
            .tell_after(&me, IdleCheck, svc.config.passivate_after);
        Ok(UserActor {
            svc,
            user,
            conns: HashMap::new(),
            watchers: HashMap::new(),
            activity: None,
            last_seen,
            status: Status::Offline,
            prefs,
            pending: Vec::new(),
            flush_scheduled: false,
            last_id: 0,
            idle_timer_at: None,
            last_used: Instant::now(),
        })
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> Result<(), StorageError> {
        self.svc.metrics.active_users.dec();
        if !self.pending.is_empty() {
            self.flush().await;
        }
        Ok(())
    }
}

impl UserActor {
    fn compute_status(&self) -> Status {
        if self.conns.is_empty() {
            return Status::Offline;
        }
        let idle_after = self.svc.config.idle_after;
        let active = self
            .conns
            .values()
            .any(|c| !c.declared_idle && c.last_active.elapsed() < idle_after);
        if active {
            Status::Online
        } else {
            Status::Idle
        }
    }

    pub fn presence(&self) -> Presence {
        let last_seen = match self.status {
            Status::Offline => self.last_seen,
            _ => Some(now_ms()),
        };
        Presence {
            user: self.user.clone(),
            status: self.status,
            last_seen,
            activity: self.activity.clone(),
            devices: self.conns.len() as u32,
        }
    }

    async fn send_all(&self, conns: impl Iterator<Item = ConnAddr>, frame: Arc<SharedFrame>) {
        for conn in conns {
            self.svc.send_to(&conn, frame.clone()).await;
        }
    }

    /// Recomputes the status; tells watchers when anything they see changed.
    async fn refresh(&mut self, ctx_ref: &ActorRef<Self>, force_push: bool) {
        let status = self.compute_status();
        let changed = status != self.status;
        if changed && status == Status::Offline {
            let now = now_ms();
            self.last_seen = Some(now);
            if let Err(e) = self.svc.store.set_last_seen(&self.user, now).await {
                tracing::warn!(user = %self.user, error = %e, "last_seen not saved");
            }
        }
        self.status = status;
        if (changed || force_push) && !self.watchers.is_empty() {
            let data = serde_json::to_value(self.presence()).unwrap_or(Value::Null);
            let frame = Arc::new(SharedFrame::new(ServerFrame::Push(Push::ephemeral(
                "presence", None, data,
            ))));
            self.send_all(self.watchers.keys().cloned(), frame).await;
        }
        self.schedule_idle(ctx_ref);
    }

    /// Wakes up when the earliest active connection would turn idle.
    fn schedule_idle(&mut self, me: &ActorRef<Self>) {
        let idle_after = self.svc.config.idle_after;
        let next = self
            .conns
            .values()
            .filter(|c| !c.declared_idle)
            .map(|c| c.last_active + idle_after)
            .filter(|t| *t > Instant::now())
            .min();
        if let Some(at) = next {
            if self.idle_timer_at.is_none_or(|cur| at < cur) {
                self.idle_timer_at = Some(at);
                self.svc.timers.tell_after(
                    me,
                    IdleTick,
                    at.saturating_duration_since(Instant::now()),
                );
            }
        }
    }

    fn next_id(&mut self) -> u64 {
        // Time-ordered and below 2^53, so JavaScript clients read it exactly.
        let id = ((now_ms().max(0) as u64) << 10).max(self.last_id + 1);
        self.last_id = id;
        id
    }

    async fn flush(&mut self) {
        self.flush_scheduled = false;
        if self.pending.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.pending);
        let unread = match self
            .svc
            .store
            .unread_notifications(&self.user, now_ms())
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(user = %self.user, error = %e, "unread count unavailable");
                0
            }
        };
        let data = serde_json::to_value(NotificationsPush { items, unread }).unwrap_or(Value::Null);
        let frame = Arc::new(SharedFrame::new(ServerFrame::Push(Push {
            push: "notifications".to_string(),
            channel: None,
            epoch: None,
            offset: None,
            ephemeral: false,
            data,
        })));
        self.send_all(self.conns.keys().cloned(), frame).await;
    }
}

// ---------- messages ----------

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Connected {
    pub conn: ConnAddr,
}
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Disconnected {
    pub conn: ConnAddr,
}
/// The connection did something (a request): it is not idle.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Activity {
    pub conn: ConnAddr,
}
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SetPresence {
    pub conn: ConnAddr,
    pub status: Option<Status>,
    pub activity: Option<String>,
}
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Watch {
    pub conn: ConnAddr,
}
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Unwatch {
    pub conn: ConnAddr,
}
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Query;

/// What a notification says; the user actor gives it an id and stores it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NotifySpec {
    pub kind: String,
    pub title: String,
    pub body: Option<String>,
    pub data: Option<Value>,
    pub priority: Priority,
    pub category: Option<String>,
    pub room: Option<String>,
    pub expires_at: Option<Millis>,
    /// A lifetime from creation (wins over `expires_at`).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Notify {
    pub spec: NotifySpec,
    pub replier: Replier,
}

/// Marks `ids` (or all when `None`) read; every device of the user is told.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MarkRead {
    pub ids: Option<Vec<u64>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct SetPrefs {
    pub prefs: NotificationPrefs,
}

struct IdleTick;
struct FlushNotifications;
struct IdleCheck;

impl Message<Connected> for UserActor {
    /// Asked, so a connection is registered (and gets every push for its
    /// user) before its handshake completes.
    type Reply = Result<(), Fail>;
    async fn handle(&mut self, m: Connected, ctx: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.last_used = Instant::now();
        self.conns.insert(
            m.conn,
            ConnState {
                last_active: Instant::now(),
                declared_idle: false,
            },
        );
        let me = ctx.actor_ref().clone();
        self.refresh(&me, true).await;
        Ok(())
    }
}

impl Message<Disconnected> for UserActor {
    type Reply = ();
    async fn handle(&mut self, m: Disconnected, ctx: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        self.watchers.remove(&m.conn);
        if self.conns.remove(&m.conn).is_some() {
            let me = ctx.actor_ref().clone();
            self.refresh(&me, true).await;
        }
    }
}

impl Message<Activity> for UserActor {
    type Reply = ();
    async fn handle(&mut self, m: Activity, ctx: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        if let Some(c) = self.conns.get_mut(&m.conn) {
            c.last_active = Instant::now();
            let me = ctx.actor_ref().clone();
            self.refresh(&me, false).await;
        }
    }
}

impl Message<SetPresence> for UserActor {
    type Reply = Result<Presence, Fail>;
    async fn handle(
        &mut self,
        m: SetPresence,
        ctx: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        self.last_used = Instant::now();
        let mut force = false;
        if let Some(a) = m.activity {
            if a.len() > MAX_ACTIVITY {
                return Err(Fail::new(
                    ErrorCode::InvalidValue,
                    format!("activity longer than {MAX_ACTIVITY} bytes"),
                ));
            }
            self.activity = (!a.is_empty()).then_some(a);
            force = true;
        }
        if let Some(c) = self.conns.get_mut(&m.conn) {
            match m.status {
                Some(Status::Idle) => c.declared_idle = true,
                Some(Status::Online) => {
                    c.declared_idle = false;
                    c.last_active = Instant::now();
                }
                Some(Status::Offline) => {
                    return Err(Fail::new(
                        ErrorCode::InvalidValue,
                        "status may be online or idle; offline follows from disconnecting",
                    ));
                }
                None => {}
            }
        }
        let me = ctx.actor_ref().clone();
        self.refresh(&me, force).await;
        Ok(self.presence())
    }
}

impl Message<Watch> for UserActor {
    type Reply = Result<Presence, Fail>;
    async fn handle(&mut self, m: Watch, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.last_used = Instant::now();
        self.watchers.insert(m.conn, ());
        Ok(self.presence())
    }
}

impl Message<Unwatch> for UserActor {
    type Reply = Result<(), Fail>;
    async fn handle(&mut self, m: Unwatch, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.watchers.remove(&m.conn);
        Ok(())
    }
}

impl Message<Query> for UserActor {
    type Reply = Result<Presence, Fail>;
    async fn handle(&mut self, _: Query, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        Ok(self.presence())
    }
}

impl Message<Notify> for UserActor {
    type Reply = ();
    async fn handle(&mut self, m: Notify, ctx: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let s = m.spec;
        let created_at = now_ms();
        // A lifetime counts from creation here, wherever the request came from.
        let expires_at = match s.ttl_ms {
            Some(t) => Some(created_at.saturating_add(i64::try_from(t).unwrap_or(i64::MAX))),
            None => s.expires_at,
        };
        let mut n = Notification {
            id: self.next_id(),
            user: self.user.clone(),
            kind: s.kind,
            title: s.title,
            body: s.body,
            data: s.data,
            priority: s.priority,
            category: s.category,
            room: s.room,
            created_at,
            expires_at,
            read: false,
        };
        // An id another owner of this user took (two nodes briefly both
        // owning it) is refused by the store: take the next one.
        let mut stored = false;
        for _ in 0..ID_ATTEMPTS {
            match self.svc.store.put_notification(&n).await {
                Ok(true) => {
                    stored = true;
                    break;
                }
                Ok(false) => n.id = self.next_id(),
                Err(e) => {
                    m.replier.send(&self.svc, Err(e.into())).await;
                    return;
                }
            }
        }
        if !stored {
            let busy = Fail::new(
                ErrorCode::Conflict,
                "no free notification id: another node is writing this user's inbox; retry",
            );
            m.replier.send(&self.svc, Err(busy)).await;
            return;
        }
        self.svc.metrics.notifications.inc();
        m.replier
            .send(&self.svc, Ok(json!({"id": n.id, "user": self.user})))
            .await;
        if self.conns.is_empty() || !self.prefs.pushes(&n) {
            return;
        }
        let urgent = n.priority == Priority::Urgent;
        self.pending.push(n);
        if urgent {
            self.flush().await;
        } else if !self.flush_scheduled {
            self.flush_scheduled = true;
            self.svc.timers.tell_after(
                ctx.actor_ref(),
                FlushNotifications,
                self.svc.config.notify_coalesce,
            );
        }
    }
}

impl Message<FlushNotifications> for UserActor {
    type Reply = ();
    async fn handle(&mut self, _: FlushNotifications, _: &mut Context<Self, ()>) {
        self.flush().await;
    }
}

impl Message<MarkRead> for UserActor {
    type Reply = Result<NotificationsReadPush, Fail>;
    async fn handle(&mut self, m: MarkRead, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.last_used = Instant::now();
        let now = now_ms();
        let all = m.ids.is_none();
        let changed = self
            .svc
            .store
            .mark_notifications_read(&self.user, m.ids.as_deref(), now)
            .await?;
        let unread = self.svc.store.unread_notifications(&self.user, now).await?;
        let push = NotificationsReadPush {
            ids: changed,
            all,
            unread,
        };
        let frame = Arc::new(SharedFrame::new(ServerFrame::Push(Push::ephemeral(
            "notifications.read",
            None,
            serde_json::to_value(&push).unwrap_or(Value::Null),
        ))));
        self.send_all(self.conns.keys().cloned(), frame).await;
        Ok(push)
    }
}

impl Message<SetPrefs> for UserActor {
    type Reply = Result<NotificationPrefs, Fail>;
    async fn handle(&mut self, m: SetPrefs, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.last_used = Instant::now();
        self.svc.store.put_prefs(&self.user, &m.prefs).await?;
        self.prefs = m.prefs;
        Ok(self.prefs.clone())
    }
}

/// A member is down or restarted: its connections (devices and watchers) are gone.
impl Message<NodeGone> for UserActor {
    type Reply = ();
    async fn handle(&mut self, m: NodeGone, ctx: &mut Context<Self, ()>) {
        self.watchers.retain(|c, _| !m.covers(c));
        let before = self.conns.len();
        self.conns.retain(|c, _| !m.covers(c));
        if self.conns.len() != before {
            let me = ctx.actor_ref().clone();
            self.refresh(&me, true).await;
        }
    }
}

impl Message<IdleTick> for UserActor {
    type Reply = ();
    async fn handle(&mut self, _: IdleTick, ctx: &mut Context<Self, ()>) {
        self.idle_timer_at = None;
        let me = ctx.actor_ref().clone();
        self.refresh(&me, false).await;
    }
}

impl Message<IdleCheck> for UserActor {
    type Reply = ();
    async fn handle(&mut self, _: IdleCheck, ctx: &mut Context<Self, ()>) {
        let idle = self.conns.is_empty()
            && self.watchers.is_empty()
            && self.pending.is_empty()
            && self.last_used.elapsed() >= self.svc.config.passivate_after;
        if idle {
            self.svc.passivate(&self.user, ctx.actor_ref());
        } else {
            self.svc
                .timers
                .tell_after(ctx.actor_ref(), IdleCheck, self.svc.config.passivate_after);
        }
    }
}

impl Placed for UserActor {
    const KIND: ActorKind = ActorKind::User;
    fn registry(svc: &Services) -> &Registry<Self> {
        &svc.users
    }
    fn spawn(svc: &Arc<Services>, user: &str) -> ActorRef<Self> {
        UserActor::spawn_with_mailbox(
            (svc.clone(), user.to_string()),
            mailbox::bounded(svc.config.mailbox),
        )
    }
}
