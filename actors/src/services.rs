//! What every actor shares, and the placement layer.
//!
//! Rooms and users are virtual actors: [`Services::room`] / [`Services::user`]
//! return the running actor for a key, activating it (on the actor runtime)
//! when there is none. An idle actor removes itself from the registry and then
//! stops *gracefully*, so whatever was already in its mailbox is still handled;
//! a sender that races with that stop gets its message back
//! (`SendError::ActorNotRunning`) and [`Services::ask_room`] & co. retry it on
//! a fresh activation. Nothing outside this module keeps an `ActorRef` to a
//! room or user across calls.
//!
//! Today the cluster has one member, so every key is owned here; the cluster
//! issue puts a rendezvous-hash owner lookup in front of the same calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::ops::{HistoryPage, NotifPage};
use chorus_protocol::{now_ms, ErrorCode, Presence, Reply, ServerFrame, SharedFrame, Status};
use chorus_storage::Store;
use kameo::actor::{ActorRef, Spawn};
use kameo::error::SendError;
use kameo::mailbox;
use kameo::message::Message;
use kameo::Actor;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::hub::{ConnId, Hub, SendTo};
use crate::room::RoomActor;
use crate::user::UserActor;
use crate::{ActorConfig, Fail, Metrics, TokenVerifier};

/// How often a message is retried against a fresh activation.
const ACTIVATION_RETRIES: usize = 5;

struct Registry<A: Actor> {
    map: Mutex<HashMap<String, ActorRef<A>>>,
}

impl<A: Actor> Registry<A> {
    fn new() -> Self {
        Registry {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn get_or_spawn(&self, key: &str, spawn: impl FnOnce() -> ActorRef<A>) -> ActorRef<A> {
        let mut map = self.map.lock();
        if let Some(r) = map.get(key) {
            if r.is_alive() {
                return r.clone();
            }
        }
        let r = spawn();
        map.insert(key.to_string(), r.clone());
        r
    }

    fn get(&self, key: &str) -> Option<ActorRef<A>> {
        self.map.lock().get(key).filter(|r| r.is_alive()).cloned()
    }

    /// Removes `key` only if it still maps to `actor` (a newer activation stays).
    fn remove_if(&self, key: &str, actor: &ActorRef<A>) -> bool {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|r| r.id() == actor.id()) {
            map.remove(key);
            true
        } else {
            false
        }
    }

    fn drain(&self) -> Vec<ActorRef<A>> {
        self.map.lock().drain().map(|(_, r)| r).collect()
    }
}

/// Where a room sends a request's reply: a connection (through the hub, so it
/// is ordered with that room's pushes), or a caller waiting in-process (the
/// server API).
pub enum Replier {
    Conn {
        conn: ConnId,
        id: u64,
    },
    Waiter(oneshot::Sender<Result<Value, Fail>>),
    /// Nobody waits (internal publishes).
    None,
}

impl Replier {
    /// A replier for an in-process caller, and the receiver it waits on.
    pub fn waiter() -> (Replier, oneshot::Receiver<Result<Value, Fail>>) {
        let (tx, rx) = oneshot::channel();
        (Replier::Waiter(tx), rx)
    }

    pub async fn send(self, svc: &Services, result: Result<Value, Fail>) {
        match self {
            Replier::Conn { conn, id } => {
                let reply = match result {
                    Ok(v) => Reply::ok(id, v),
                    Err(f) => {
                        svc.metrics.error(f.code);
                        Reply::err(id, f.code, f.message)
                    }
                };
                svc.send_to(conn, Arc::new(SharedFrame::new(ServerFrame::Reply(reply))))
                    .await;
            }
            Replier::Waiter(tx) => {
                let _ = tx.send(result);
            }
            Replier::None => {
                if let Err(f) = result {
                    tracing::debug!(error = %f, "internal request failed");
                }
            }
        }
    }
}

/// Shared by every actor of the node.
pub struct Services {
    pub config: ActorConfig,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub verifier: Arc<dyn TokenVerifier>,
    pub hub: ActorRef<Hub>,
    runtime: tokio::runtime::Handle,
    rooms: Registry<RoomActor>,
    users: Registry<UserActor>,
    next_conn: AtomicU64,
    stopping: AtomicBool,
}

impl Services {
    /// Starts the node hub on `runtime`, where every actor of this node will run.
    pub fn new(
        config: ActorConfig,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        verifier: Arc<dyn TokenVerifier>,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Services> {
        let hub = {
            let _guard = runtime.enter();
            Hub::spawn_with_mailbox(
                Hub::new(metrics.clone()),
                mailbox::bounded(config.hub_mailbox),
            )
        };
        Arc::new(Services {
            config,
            store,
            metrics,
            verifier,
            hub,
            runtime,
            rooms: Registry::new(),
            users: Registry::new(),
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        })
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// From now on new connections are refused and requests answered with
    /// `shutting_down` (5005), so clients move to another node.
    pub fn begin_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Queues a frame for one connection, ordered with the hub's pushes.
    pub async fn send_to(&self, conn: ConnId, frame: Arc<SharedFrame>) {
        if self.hub.tell(SendTo { conn, frame }).await.is_err() {
            tracing::debug!(conn, "hub gone; frame dropped at shutdown");
        }
    }

    /// The running room actor for `key` (`room:42`, `topic:x`, `feed:u`), activated if needed.
    pub fn room(self: &Arc<Self>, key: &str) -> ActorRef<RoomActor> {
        self.rooms.get_or_spawn(key, || {
            let _guard = self.runtime.enter();
            RoomActor::spawn_with_mailbox(
                (self.clone(), key.to_string()),
                mailbox::bounded(self.config.mailbox),
            )
        })
    }

    /// The room actor for `key` if it is running (never activates one).
    pub fn room_if_active(&self, key: &str) -> Option<ActorRef<RoomActor>> {
        self.rooms.get(key)
    }

    pub fn user(self: &Arc<Self>, user: &str) -> ActorRef<UserActor> {
        self.users.get_or_spawn(user, || {
            let _guard = self.runtime.enter();
            UserActor::spawn_with_mailbox(
                (self.clone(), user.to_string()),
                mailbox::bounded(self.config.mailbox),
            )
        })
    }

    pub fn user_if_active(&self, user: &str) -> Option<ActorRef<UserActor>> {
        self.users.get(user)
    }

    /// Removes an idle actor from the registry, then stops it after its mailbox drains.
    pub(crate) fn passivate_room(&self, key: &str, me: &ActorRef<RoomActor>) {
        if self.rooms.remove_if(key, me) {
            stop_later(me.clone());
        }
    }

    pub(crate) fn passivate_user(&self, user: &str, me: &ActorRef<UserActor>) {
        if self.users.remove_if(user, me) {
            stop_later(me.clone());
        }
    }

    /// Sends `msg` to the room, retrying on a fresh activation if the actor was stopping.
    pub async fn tell_room<M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
    where
        RoomActor: Message<M, Reply = ()>,
        M: Send + 'static,
    {
        self.tell_placed::<RoomActor, M>(key, msg).await
    }

    /// Asks the room, retrying on a fresh activation if the actor was stopping.
    pub async fn ask_room<M, T>(self: &Arc<Self>, key: &str, msg: M) -> Result<T, Fail>
    where
        RoomActor: Message<M, Reply = Result<T, Fail>>,
        M: Send + 'static,
        T: Send + 'static,
    {
        self.ask_placed::<RoomActor, M, T>(key, msg).await
    }

    pub async fn tell_user<M>(self: &Arc<Self>, user: &str, msg: M) -> Result<(), Fail>
    where
        UserActor: Message<M, Reply = ()>,
        M: Send + 'static,
    {
        self.tell_placed::<UserActor, M>(user, msg).await
    }

    pub async fn ask_user<M, T>(self: &Arc<Self>, user: &str, msg: M) -> Result<T, Fail>
    where
        UserActor: Message<M, Reply = Result<T, Fail>>,
        M: Send + 'static,
        T: Send + 'static,
    {
        self.ask_placed::<UserActor, M, T>(user, msg).await
    }

    async fn tell_placed<A, M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
    where
        A: Placed + Message<M, Reply = ()>,
        M: Send + 'static,
    {
        let mut msg = msg;
        for _ in 0..ACTIVATION_RETRIES {
            let r = A::activate(self, key);
            match r.tell(msg).await {
                Ok(()) => return Ok(()),
                Err(SendError::ActorNotRunning(m)) | Err(SendError::ActorRestarting(m)) => {
                    A::registry(self).remove_if(key, &r);
                    msg = m;
                }
                Err(e) => return Err(send_failed(e)),
            }
        }
        Err(Fail::new(
            ErrorCode::Overloaded,
            "actor is restarting, retry",
        ))
    }

    async fn ask_placed<A, M, T>(self: &Arc<Self>, key: &str, msg: M) -> Result<T, Fail>
    where
        A: Placed + Message<M, Reply = Result<T, Fail>>,
        M: Send + 'static,
        T: Send + 'static,
    {
        let mut msg = msg;
        for _ in 0..ACTIVATION_RETRIES {
            let r = A::activate(self, key);
            match r.ask(msg).await {
                Ok(v) => return Ok(v),
                Err(SendError::HandlerError(f)) => return Err(f),
                Err(SendError::ActorNotRunning(m)) | Err(SendError::ActorRestarting(m)) => {
                    A::registry(self).remove_if(key, &r);
                    msg = m;
                }
                Err(e) => return Err(send_failed(e)),
            }
        }
        Err(Fail::new(
            ErrorCode::Overloaded,
            "actor is restarting, retry",
        ))
    }

    /// A page of a channel's history as `user` may see it (`None`: the server
    /// API): backwards from `before` (the newest page when both are absent) or
    /// forwards from `after`, never past the committed head.
    pub async fn history_page(
        self: &Arc<Self>,
        key: &str,
        user: Option<String>,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<HistoryPage, Fail> {
        let head = self.ask_room(key, crate::room::Authorize { user }).await?;
        let limit = limit.unwrap_or(50).clamp(1, self.config.max_page);
        let (entries, more) = match after {
            Some(after) if after >= head.offset => (Vec::new(), false),
            Some(after) => {
                let mut v = self
                    .store
                    .read_range(key, after + 1, head.offset, limit + 1)
                    .await?;
                let more = v.len() > limit;
                v.truncate(limit);
                (v, more)
            }
            None => {
                let before = before.unwrap_or(u64::MAX).min(head.offset + 1);
                let mut v = self.store.read_before(key, before, limit + 1).await?;
                let more = v.len() > limit;
                if more {
                    v.remove(0);
                }
                (v, more)
            }
        };
        Ok(HistoryPage {
            channel: key.to_string(),
            head,
            entries,
            more,
        })
    }

    /// A page of `user`'s inbox, newest first, with the unread count.
    pub async fn notification_page(
        &self,
        user: &str,
        before: Option<u64>,
        limit: Option<usize>,
        unread_only: bool,
    ) -> Result<NotifPage, Fail> {
        let limit = limit.unwrap_or(50).clamp(1, chorus_storage::MAX_PAGE - 1);
        let now = now_ms();
        let mut items = self
            .store
            .list_notifications(user, before, limit + 1, unread_only, now)
            .await?;
        let more = items.len() > limit;
        items.truncate(limit);
        let unread = self.store.unread_notifications(user, now).await?;
        Ok(NotifPage {
            items,
            unread,
            more,
        })
    }

    /// A user's presence without activating their actor: no running actor
    /// means no connection, so the user is offline since their `last_seen`.
    pub async fn presence_of(&self, user: &str) -> Result<Presence, Fail> {
        if let Some(actor) = self.user_if_active(user) {
            if let Ok(p) = actor.ask(crate::user::Query).await {
                return Ok(p);
            }
        }
        let last_seen = self.store.last_seen(user).await?;
        Ok(Presence {
            user: user.to_string(),
            status: Status::Offline,
            last_seen,
            activity: None,
            devices: 0,
        })
    }

    /// Stops every room and user actor after its mailbox drains (in-flight
    /// appends complete and are acknowledged), waiting at most `timeout`.
    /// Returns how many actors did not stop in time.
    pub async fn stop_actors(&self, timeout: Duration) -> usize {
        self.stopping.store(true, Ordering::Relaxed);
        let rooms = self.rooms.drain();
        let users = self.users.drain();
        for r in &rooms {
            let _ = r.stop_gracefully().await;
        }
        for u in &users {
            let _ = u.stop_gracefully().await;
        }
        let wait = async {
            for r in &rooms {
                r.wait_for_shutdown().await;
            }
            for u in &users {
                u.wait_for_shutdown().await;
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_ok() {
            return 0;
        }
        rooms.iter().filter(|r| r.is_alive()).count()
            + users.iter().filter(|u| u.is_alive()).count()
    }
}

/// A virtual actor kind: where its activations are registered and how one starts.
trait Placed: Actor {
    fn registry(svc: &Services) -> &Registry<Self>;
    fn activate(svc: &Arc<Services>, key: &str) -> ActorRef<Self>;
}

impl Placed for RoomActor {
    fn registry(svc: &Services) -> &Registry<Self> {
        &svc.rooms
    }
    fn activate(svc: &Arc<Services>, key: &str) -> ActorRef<Self> {
        svc.room(key)
    }
}

impl Placed for UserActor {
    fn registry(svc: &Services) -> &Registry<Self> {
        &svc.users
    }
    fn activate(svc: &Arc<Services>, key: &str) -> ActorRef<Self> {
        svc.user(key)
    }
}

fn stop_later<A: Actor>(actor: ActorRef<A>) {
    // Not awaited here: the actor calling this may have a full mailbox.
    tokio::spawn(async move {
        let _ = actor.stop_gracefully().await;
    });
}

fn send_failed<M, E: std::fmt::Debug>(e: SendError<M, E>) -> Fail {
    match e {
        SendError::MailboxFull(_) | SendError::Timeout(_) => {
            Fail::new(ErrorCode::Overloaded, "server busy, retry")
        }
        SendError::ActorStopped => {
            Fail::new(ErrorCode::StoreUnavailable, "could not load state, retry")
        }
        other => {
            tracing::error!(error = ?other.map_msg(|_| ()), "actor send failed");
            Fail::new(ErrorCode::Internal, "internal error")
        }
    }
}
