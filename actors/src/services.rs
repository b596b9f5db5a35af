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
//! Placement sits in front of every call: a key owned by this node (in its
//! view, see [`crate::placement`]) is a local kameo tell or ask; a key owned
//! elsewhere goes to the owner over the peer link ([`crate::remote`]), and
//! its reply comes back the same way.

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
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::cluster::Cluster;
use crate::hub::{ConnAddr, ConnId, Hub};
use crate::placement::{user_key, NodeId};
use crate::remote::{PeerMsg, Wire};
use crate::room::RoomActor;
use crate::user::UserActor;
use crate::{ActorConfig, Fail, Metrics, TokenVerifier};

/// How often a message is retried against a fresh activation.
const ACTIVATION_RETRIES: usize = 5;

#[doc(hidden)]
pub struct Registry<A: Actor> {
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

    /// Removes and returns the activations whose key fails `keep`.
    fn take_unless(&self, keep: impl Fn(&str) -> bool) -> Vec<ActorRef<A>> {
        let mut map = self.map.lock();
        let gone: Vec<String> = map.keys().filter(|k| !keep(k)).cloned().collect();
        gone.iter().filter_map(|k| map.remove(k)).collect()
    }

    fn len(&self) -> usize {
        self.map.lock().len()
    }

    fn drain(&self) -> Vec<ActorRef<A>> {
        self.map.lock().drain().map(|(_, r)| r).collect()
    }
}

/// Where a room sends a request's reply: a connection (through its node's
/// hub, so it is ordered with that room's pushes), a caller waiting
/// in-process (the server API), or such a caller on another node.
#[derive(Serialize, Deserialize)]
pub enum Replier {
    Conn {
        conn: ConnAddr,
        id: u64,
    },
    /// Never crosses nodes: [`Services::make_remote`] turns it into `Remote`.
    #[serde(skip)]
    Waiter(oneshot::Sender<Result<Value, Fail>>),
    /// A waiter on `node`, found there by `corr`.
    Remote {
        node: NodeId,
        corr: u64,
    },
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
                svc.send_to(&conn, Arc::new(SharedFrame::new(ServerFrame::Reply(reply))))
                    .await;
            }
            Replier::Waiter(tx) => {
                let _ = tx.send(result);
            }
            Replier::Remote { node, corr } => {
                svc.send_peer(&node, &PeerMsg::Answer { corr, result })
                    .await;
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
    pub cluster: Arc<Cluster>,
    rooms: Registry<RoomActor>,
    users: Registry<UserActor>,
    next_conn: AtomicU64,
    stopping: AtomicBool,
    /// Callers waiting on another node's answer, by correlation id.
    pub(crate) pending: Mutex<HashMap<u64, oneshot::Sender<Result<Value, Fail>>>>,
    pub(crate) next_corr: AtomicU64,
}

impl Services {
    /// Starts the node hub on `runtime`, where every actor of this node will run.
    pub fn new(
        config: ActorConfig,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        verifier: Arc<dyn TokenVerifier>,
        runtime: tokio::runtime::Handle,
        cluster: Arc<Cluster>,
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
            cluster,
            rooms: Registry::new(),
            users: Registry::new(),
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            next_corr: AtomicU64::new(1),
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

    /// The room actor for `key` if it is running here (never activates one).
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

    /// Sends `msg` to the room's owner, retrying on a fresh activation if the actor was stopping.
    pub async fn tell_room<M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
    where
        RoomActor: Message<M, Reply = ()>,
        M: Wire,
    {
        self.tell_placed::<RoomActor, M>(key, msg).await
    }

    /// Asks the room's owner, retrying on a fresh activation if the actor was stopping.
    pub async fn ask_room<M, T>(self: &Arc<Self>, key: &str, msg: M) -> Result<T, Fail>
    where
        RoomActor: Message<M, Reply = Result<T, Fail>>,
        M: Wire,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.ask_placed::<RoomActor, M, T>(key, msg).await
    }

    pub async fn tell_user<M>(self: &Arc<Self>, user: &str, msg: M) -> Result<(), Fail>
    where
        UserActor: Message<M, Reply = ()>,
        M: Wire,
    {
        self.tell_placed::<UserActor, M>(user, msg).await
    }

    pub async fn ask_user<M, T>(self: &Arc<Self>, user: &str, msg: M) -> Result<T, Fail>
    where
        UserActor: Message<M, Reply = Result<T, Fail>>,
        M: Wire,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.ask_placed::<UserActor, M, T>(user, msg).await
    }

    /// Tells the room only if it is running at its owner (never activates it).
    pub async fn tell_room_if_active<M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
    where
        RoomActor: Message<M, Reply = ()>,
        M: Wire,
    {
        let owner = self.cluster.owner(key);
        if self.cluster.is_me(&owner) {
            self.tell_room_if_active_here(key, msg).await
        } else {
            self.tell_remote(&owner, key, msg, true).await
        }
    }

    pub async fn tell_user_if_active<M>(self: &Arc<Self>, user: &str, msg: M) -> Result<(), Fail>
    where
        UserActor: Message<M, Reply = ()>,
        M: Wire,
    {
        let owner = self.cluster.owner(&user_key(user));
        if self.cluster.is_me(&owner) {
            self.tell_user_if_active_here(user, msg).await
        } else {
            self.tell_remote(&owner, user, msg, true).await
        }
    }

    /// Asks the user actor only if it is running at its owner: `None` if not.
    pub async fn ask_user_if_active<M, T>(
        self: &Arc<Self>,
        user: &str,
        msg: M,
    ) -> Result<Option<T>, Fail>
    where
        UserActor: Message<M, Reply = Result<T, Fail>>,
        M: Wire,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        let owner = self.cluster.owner(&user_key(user));
        if self.cluster.is_me(&owner) {
            self.ask_user_if_active_here(user, msg).await
        } else {
            self.ask_remote(&owner, user, msg, true).await
        }
    }

    pub(crate) async fn tell_room_if_active_here<M>(&self, key: &str, msg: M) -> Result<(), Fail>
    where
        RoomActor: Message<M, Reply = ()>,
        M: Send + 'static,
    {
        match self.rooms.get(key) {
            Some(r) => r.tell(msg).await.map_err(send_failed),
            None => Ok(()),
        }
    }

    pub(crate) async fn tell_user_if_active_here<M>(&self, user: &str, msg: M) -> Result<(), Fail>
    where
        UserActor: Message<M, Reply = ()>,
        M: Send + 'static,
    {
        match self.users.get(user) {
            Some(r) => r.tell(msg).await.map_err(send_failed),
            None => Ok(()),
        }
    }

    pub(crate) async fn ask_room_if_active_here<M, T>(
        &self,
        key: &str,
        msg: M,
    ) -> Result<Option<T>, Fail>
    where
        RoomActor: Message<M, Reply = Result<T, Fail>>,
        M: Send + 'static,
        T: Send + 'static,
    {
        match self.rooms.get(key) {
            Some(r) => match r.ask(msg).await {
                Ok(v) => Ok(Some(v)),
                Err(SendError::HandlerError(f)) => Err(f),
                Err(e) => Err(send_failed(e)),
            },
            None => Ok(None),
        }
    }

    pub(crate) async fn ask_user_if_active_here<M, T>(
        &self,
        user: &str,
        msg: M,
    ) -> Result<Option<T>, Fail>
    where
        UserActor: Message<M, Reply = Result<T, Fail>>,
        M: Send + 'static,
        T: Send + 'static,
    {
        match self.users.get(user) {
            Some(r) => match r.ask(msg).await {
                Ok(v) => Ok(Some(v)),
                Err(SendError::HandlerError(f)) => Err(f),
                Err(e) => Err(send_failed(e)),
            },
            None => Ok(None),
        }
    }

    async fn tell_placed<A, M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
    where
        A: Placed + Message<M, Reply = ()>,
        M: Wire,
    {
        let owner = self.cluster.owner(&A::placement_key(key));
        if self.cluster.is_me(&owner) {
            self.tell_local::<A, M>(key, msg).await
        } else {
            self.tell_remote(&owner, key, msg, false).await
        }
    }

    async fn ask_placed<A, M, T>(self: &Arc<Self>, key: &str, msg: M) -> Result<T, Fail>
    where
        A: Placed + Message<M, Reply = Result<T, Fail>>,
        M: Wire,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        let owner = self.cluster.owner(&A::placement_key(key));
        if self.cluster.is_me(&owner) {
            self.ask_local::<A, M, T>(key, msg).await
        } else {
            self.ask_remote(&owner, key, msg, false).await
        }
    }

    /// Tells the actor of `key` on this node (activating it).
    pub(crate) async fn tell_local<A, M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
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

    /// Asks the actor of `key` on this node (activating it).
    pub(crate) async fn ask_local<A, M, T>(self: &Arc<Self>, key: &str, msg: M) -> Result<T, Fail>
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
    pub async fn presence_of(self: &Arc<Self>, user: &str) -> Result<Presence, Fail> {
        if let Ok(Some(p)) = self.ask_user_if_active(user, crate::user::Query).await {
            return Ok(p);
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

    /// Stops, after their mailboxes drain, the actors whose key this node
    /// no longer owns (the view changed): their next message activates them
    /// at the new owner, which loads from the shared store. Returns how many.
    pub fn hand_over_moved_keys(&self) -> usize {
        let cluster = &self.cluster;
        let rooms = self.rooms.take_unless(|k| cluster.is_me(&cluster.owner(k)));
        let users = self
            .users
            .take_unless(|u| cluster.is_me(&cluster.owner(&user_key(u))));
        let n = rooms.len() + users.len();
        rooms.into_iter().for_each(stop_later);
        users.into_iter().for_each(stop_later);
        n
    }

    /// Active (rooms, users) on this node.
    pub fn active_counts(&self) -> (usize, usize) {
        (self.rooms.len(), self.users.len())
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

/// A virtual actor kind: where its activations are registered, how one
/// starts, and the key placement hashes.
pub trait Placed: Actor {
    #[doc(hidden)]
    fn registry(svc: &Services) -> &Registry<Self>;
    fn activate(svc: &Arc<Services>, key: &str) -> ActorRef<Self>;
    /// The key whose HRW winner owns the actor of `key`.
    fn placement_key(key: &str) -> String;
}

impl Placed for RoomActor {
    fn registry(svc: &Services) -> &Registry<Self> {
        &svc.rooms
    }
    fn placement_key(key: &str) -> String {
        key.to_string()
    }
    fn activate(svc: &Arc<Services>, key: &str) -> ActorRef<Self> {
        svc.room(key)
    }
}

impl Placed for UserActor {
    fn registry(svc: &Services) -> &Registry<Self> {
        &svc.users
    }
    fn placement_key(user: &str) -> String {
        user_key(user)
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
