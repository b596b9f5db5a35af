//! What every actor of a node shares: the store, config, metrics, the hub,
//! the cluster, the registries of its virtual actors, and where a reply goes
//! ([`Replier`]). Reaching the actor of a key, wherever it lives, is
//! [`crate::placement::dispatch`]; the calls here (`tell_room`, `ask_user`,
//! …) are its typed entry points, plus the reads that need no actor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::ops::{HistoryPage, NotifPage};
use chorus_protocol::{now_ms, Presence, Reply, ServerFrame, SharedFrame, Status};
use chorus_storage::Store;
use kameo::actor::{ActorRef, Spawn, WeakActorRef};
use kameo::mailbox;
use kameo::message::Message;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::cluster::Cluster;
use crate::conn::ConnActor;
use crate::doc::DocActor;
use crate::hub::{ConnAddr, ConnId, Hub};
use crate::placement::{NodeId, Registry};
use crate::remote::{PeerMsg, Wire};
use crate::room::RoomActor;
use crate::timers::Timers;
use crate::user::UserActor;
use crate::{ActorConfig, Fail, Metrics, TokenVerifier};

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

/// Where another node's answer is handed to the caller waiting for it.
pub(crate) type AnswerTx = oneshot::Sender<Result<Value, Fail>>;

/// Shared by every actor of the node.
pub struct Services {
    pub config: ActorConfig,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub verifier: Arc<dyn TokenVerifier>,
    pub hub: ActorRef<Hub>,
    /// Every actor's delayed messages, fired by one task.
    pub timers: Timers,
    runtime: tokio::runtime::Handle,
    pub cluster: Arc<Cluster>,
    pub(crate) rooms: Registry<RoomActor>,
    pub(crate) users: Registry<UserActor>,
    pub(crate) docs: Registry<DocActor>,
    next_conn: AtomicU64,
    /// This node's connection actors, to tell them when owners change.
    conns: Mutex<HashMap<ConnId, WeakActorRef<ConnActor>>>,
    pub(crate) stopping: AtomicBool,
    /// Callers waiting on another node's answer, by correlation id, with that node.
    pub(crate) pending: Mutex<HashMap<u64, (NodeId, AnswerTx)>>,
    pub(crate) next_corr: AtomicU64,
    /// Woken by the hub when subscribers lost their registration.
    pub(crate) reregister: Arc<tokio::sync::Notify>,
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
        let reregister = Arc::new(tokio::sync::Notify::new());
        let hub = {
            let _guard = runtime.enter();
            Hub::spawn_with_mailbox(
                Hub::new(metrics.clone(), reregister.clone()),
                mailbox::bounded(config.hub_mailbox),
            )
        };
        let first_conn = cluster.generation().max(1);
        let timers = {
            let _guard = runtime.enter();
            Timers::start()
        };
        Arc::new(Services {
            timers,
            config,
            store,
            metrics,
            verifier,
            hub,
            runtime,
            cluster,
            rooms: Registry::default(),
            users: Registry::default(),
            docs: Registry::default(),
            // Numbered from the generation (a start time in µs): ids of an
            // earlier incarnation of this node are all below ours.
            next_conn: AtomicU64::new(first_conn),
            conns: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            next_corr: AtomicU64::new(1),
            reregister,
        })
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn conn_opened(&self, id: ConnId, conn: WeakActorRef<ConnActor>) {
        self.conns.lock().insert(id, conn);
    }

    pub(crate) fn conn_closed(&self, id: ConnId) {
        self.conns.lock().remove(&id);
    }

    /// The connection actors running on this node.
    pub(crate) fn local_conns(&self) -> Vec<ActorRef<ConnActor>> {
        self.conns
            .lock()
            .values()
            .filter_map(WeakActorRef::upgrade)
            .collect()
    }

    /// From now on new connections are refused and requests answered with
    /// `shutting_down` (5005), so clients move to another node.
    pub fn begin_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Sends `msg` to the room's owner, retrying on a fresh activation if the actor was stopping.
    pub async fn tell_room<M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
    where
        RoomActor: Message<M, Reply = ()>,
        M: Wire,
    {
        self.tell::<RoomActor, M>(key, msg).await
    }

    /// Asks the room's owner, retrying on a fresh activation if the actor was stopping.
    pub async fn ask_room<M, T>(self: &Arc<Self>, key: &str, msg: M) -> Result<T, Fail>
    where
        RoomActor: Message<M, Reply = Result<T, Fail>>,
        M: Wire,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.ask::<RoomActor, M, T>(key, msg).await
    }

    pub async fn tell_user<M>(self: &Arc<Self>, user: &str, msg: M) -> Result<(), Fail>
    where
        UserActor: Message<M, Reply = ()>,
        M: Wire,
    {
        self.tell::<UserActor, M>(user, msg).await
    }

    pub async fn ask_user<M, T>(self: &Arc<Self>, user: &str, msg: M) -> Result<T, Fail>
    where
        UserActor: Message<M, Reply = Result<T, Fail>>,
        M: Wire,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.ask::<UserActor, M, T>(user, msg).await
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
        if let Ok(Some(p)) = self
            .ask_if_active::<UserActor, _, _>(user, crate::user::Query)
            .await
        {
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
        self.hand_over::<RoomActor>() + self.hand_over::<UserActor>() + self.hand_over::<DocActor>()
    }

    /// Active documents on this node.
    pub fn active_docs(&self) -> usize {
        self.docs.len()
    }

    /// How long an unused document stays in memory.
    pub fn docs_passivate_after(&self) -> Duration {
        Duration::from_millis(self.config.docs.passivate_after_ms)
    }

    pub async fn tell_doc<M>(self: &Arc<Self>, doc: &str, msg: M) -> Result<(), Fail>
    where
        DocActor: Message<M, Reply = ()>,
        M: Wire,
    {
        self.tell::<DocActor, M>(doc, msg).await
    }

    pub async fn ask_doc<M, T>(self: &Arc<Self>, doc: &str, msg: M) -> Result<T, Fail>
    where
        DocActor: Message<M, Reply = Result<T, Fail>>,
        M: Wire,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.ask::<DocActor, M, T>(doc, msg).await
    }

    /// Active (rooms, users) on this node.
    pub fn active_counts(&self) -> (usize, usize) {
        (self.rooms.len(), self.users.len())
    }

    /// Stops every room, then every user actor, after its mailbox drains:
    /// a room's in-flight and queued writes complete and are acknowledged.
    /// Waits at most `timeout` for each kind; returns how many did not stop.
    pub async fn stop_actors(&self, timeout: Duration) -> usize {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop_all::<RoomActor>(timeout).await
            + self.stop_all::<DocActor>(timeout).await
            + self.stop_all::<UserActor>(timeout).await
    }
}
