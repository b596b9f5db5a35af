//! What nodes say to each other, and the placement calls that cross nodes.
//!
//! Every payload on a peer link is one [`PeerMsg`] (rmp-serde):
//! - `Actor`: a message for the room or user actor of a key this node
//!   believes the receiver owns; asks carry a correlation id and the answer
//!   comes back as `Answer`. A receiver that does not own the key (its view
//!   differs) forwards it to the owner it sees, at most [`MAX_HOPS`] times,
//!   then refuses it with a retryable `overloaded` (5004): never a loop.
//! - `Hub*`: a room's pushes, replies and (un)subscriptions for the
//!   connections of the receiving node, in the room's order (one ordered
//!   link per peer pair). A published message is sent once per subscribed
//!   node, whatever the number of its subscribers there.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use chorus_protocol::{ErrorCode, ServerFrame, SharedFrame};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::hub::{
    ConnAddr, ConnId, Deliver, ExpectReply, PeerGone, Position, ReplyDue, SendTo, Subscribe,
    Unsubscribe,
};
use crate::placement::{ActorKind, NodeId, Placed};
use crate::services::{Replier, Services};
use crate::{doc, room, user, Fail};

/// How often a request may be forwarded between nodes that disagree on its owner.
pub const MAX_HOPS: u8 = 2;

#[derive(Serialize, Deserialize)]
pub enum PeerMsg {
    Actor(Envelope),
    Answer {
        corr: u64,
        result: Result<Value, Fail>,
    },
    HubDeliver {
        channel: String,
        frame: ServerFrame,
    },
    HubSendTo {
        conn: ConnId,
        frame: ServerFrame,
    },
    /// Sent by the channel's room after the catch-up up to `at`.
    HubSubscribe {
        channel: String,
        conn: ConnId,
        at: Option<Position>,
    },
    HubUnsubscribe {
        channel: String,
        conn: ConnId,
    },
    /// The sender's actor of `channel` stopped with subscribers here: they
    /// are to be registered again at the channel's owner.
    OwnerStopped {
        channel: String,
    },
    /// The sender saw this node down and forgot its connections and
    /// subscribers: they are to be registered and announced again.
    Forgotten,
    /// A document on the sender registers a local connection that opened it.
    HubDocJoin {
        channel: String,
        conn: ConnId,
        yjs: bool,
    },
    HubDocLeave {
        channel: String,
        conn: ConnId,
    },
    /// A document's update or awareness push for its clients here, but
    /// `except` (its origin). Sent once per node.
    HubDocDeliver {
        channel: String,
        push: chorus_protocol::doc::DocPush,
        except: Option<ConnAddr>,
    },
    /// A y-protocols message for one `/doc` socket here.
    HubSendYjs {
        conn: ConnId,
        bytes: serde_bytes::ByteBuf,
    },
    /// Close one connection here with a code.
    HubCloseConn {
        conn: ConnId,
        code: u16,
        reason: String,
    },
    /// The sender's document stopped or was deleted: its clients here are told.
    HubDocDrop {
        channel: String,
        reason: String,
    },
}

/// A message for the actor of `kind` and `key`.
#[derive(Serialize, Deserialize)]
pub struct Envelope {
    pub kind: ActorKind,
    pub key: String,
    pub msg: ActorMsg,
    pub hops: u8,
    /// Only if the actor is running there (never activates one).
    pub if_active: bool,
    /// Set for asks: where the answer goes.
    pub reply: Option<(NodeId, u64)>,
}

/// A message kind that can travel to another node.
pub trait Wire: Sized + Send + 'static {
    fn into_msg(self) -> ActorMsg;
    /// The message's replier, to turn a local waiter into a remote one.
    fn replier(&mut self) -> Option<&mut Replier> {
        None
    }
    /// The connection and request id its reply goes to through that
    /// connection's hub, if any.
    fn awaited(&mut self) -> Option<(ConnAddr, u64)> {
        match self.replier()? {
            Replier::Conn { conn, id } => Some((conn.clone(), *id)),
            _ => None,
        }
    }
}

macro_rules! wire {
    (
        room tell: [$($rt:ident $(+ $rr:ident)?),*],
        room subscribe: [$($rs:ident),*],
        room ask: [$($ra:ident),*],
        user tell: [$($ut:ident $(+ $ur:ident)?),*],
        user ask: [$($ua:ident),*],
        doc tell: [$($dt:ident $(+ $dr:ident)?),*],
        doc custom: [$($dc:ident),*],
        doc ask: [$($da:ident),*] $(,)?
    ) => {
        /// Every message a node may send to another node's actors.
        #[derive(Serialize, Deserialize)]
        pub enum ActorMsg {
            $($rt(room::$rt),)*
            $($rs(room::$rs),)*
            $($ra(room::$ra),)*
            $($ut(user::$ut),)*
            $($ua(user::$ua),)*
            $($dt(doc::$dt),)*
            $($dc(doc::$dc),)*
            $($da(doc::$da),)*
        }

        $(impl Wire for room::$rt {
            fn into_msg(self) -> ActorMsg { ActorMsg::$rt(self) }
            $(fn replier(&mut self) -> Option<&mut Replier> { let _ = stringify!($rr); Some(&mut self.replier) })?
        })*
        $(impl Wire for room::$rs {
            fn into_msg(self) -> ActorMsg { ActorMsg::$rs(self) }
            fn awaited(&mut self) -> Option<(ConnAddr, u64)> { Some((self.conn.clone(), self.req_id)) }
        })*
        $(impl Wire for room::$ra {
            fn into_msg(self) -> ActorMsg { ActorMsg::$ra(self) }
        })*
        $(impl Wire for user::$ut {
            fn into_msg(self) -> ActorMsg { ActorMsg::$ut(self) }
            $(fn replier(&mut self) -> Option<&mut Replier> { let _ = stringify!($ur); Some(&mut self.replier) })?
        })*
        $(impl Wire for user::$ua {
            fn into_msg(self) -> ActorMsg { ActorMsg::$ua(self) }
        })*
        $(impl Wire for doc::$dt {
            fn into_msg(self) -> ActorMsg { ActorMsg::$dt(self) }
            $(fn replier(&mut self) -> Option<&mut Replier> { let _ = stringify!($dr); Some(&mut self.replier) })?
        })*
        $(impl Wire for doc::$da {
            fn into_msg(self) -> ActorMsg { ActorMsg::$da(self) }
        })*

        impl ActorMsg {
            /// The replier inside a tell, to answer it from here.
            fn into_replier(self) -> Option<Replier> {
                match self {
                    $(ActorMsg::$rt(mut m) => m.replier().map(|r| std::mem::replace(r, Replier::None)),)*
                    $(ActorMsg::$ut(mut m) => m.replier().map(|r| std::mem::replace(r, Replier::None)),)*
                    $(ActorMsg::$dt(mut m) => m.replier().map(|r| std::mem::replace(r, Replier::None)),)*
                    _ => None,
                }
            }
        }

        impl Services {
            /// Runs an actor message that arrived from another node, here.
            async fn run_here(self: &Arc<Self>, e: Envelope) {
                let Envelope { key, msg, if_active, reply, .. } = e;
                match msg {
                    $(ActorMsg::$rt(m) => {
                        let _ = if if_active {
                            self.tell_if_active_here::<room::RoomActor, _>(&key, m).await
                        } else {
                            self.tell_local::<room::RoomActor, _>(&key, m).await
                        };
                    })*
                    $(ActorMsg::$rs(m) => {
                        let _ = if if_active {
                            self.tell_if_active_here::<room::RoomActor, _>(&key, m).await
                        } else {
                            self.tell_local::<room::RoomActor, _>(&key, m).await
                        };
                    })*
                    $(ActorMsg::$ra(m) => {
                        let r = if if_active {
                            self.ask_if_active_here::<room::RoomActor, _, _>(&key, m).await.map(|v| to_json(&v))
                        } else {
                            self.ask_local::<room::RoomActor, _, _>(&key, m).await.map(|v| to_json(&v))
                        };
                        self.answer(reply, r).await;
                    })*
                    $(ActorMsg::$ut(m) => {
                        let _ = if if_active {
                            self.tell_if_active_here::<user::UserActor, _>(&key, m).await
                        } else {
                            self.tell_local::<user::UserActor, _>(&key, m).await
                        };
                    })*
                    $(ActorMsg::$ua(m) => {
                        let r = if if_active {
                            self.ask_if_active_here::<user::UserActor, _, _>(&key, m).await.map(|v| to_json(&v))
                        } else {
                            self.ask_local::<user::UserActor, _, _>(&key, m).await.map(|v| to_json(&v))
                        };
                        self.answer(reply, r).await;
                    })*
                    $(ActorMsg::$dt(m) => {
                        let _ = if if_active {
                            self.tell_if_active_here::<doc::DocActor, _>(&key, m).await
                        } else {
                            self.tell_local::<doc::DocActor, _>(&key, m).await
                        };
                    })*
                    $(ActorMsg::$dc(m) => {
                        let _ = if if_active {
                            self.tell_if_active_here::<doc::DocActor, _>(&key, m).await
                        } else {
                            self.tell_local::<doc::DocActor, _>(&key, m).await
                        };
                    })*
                    $(ActorMsg::$da(m) => {
                        let r = if if_active {
                            self.ask_if_active_here::<doc::DocActor, _, _>(&key, m).await.map(|v| to_json(&v))
                        } else {
                            self.ask_local::<doc::DocActor, _, _>(&key, m).await.map(|v| to_json(&v))
                        };
                        self.answer(reply, r).await;
                    })*
                }
            }
        }
    };
}

wire! {
    room tell: [
        Create + replier, Join + replier, Leave + replier, Invite + replier,
        Kick + replier, Publish + replier, Edit + replier, Read + replier,
        Unsubscribe, Resubscribe, Refresh
    ],
    room subscribe: [Subscribe],
    room ask: [Members, Authorize, Typing, Summary],
    user tell: [Disconnected, Activity, Notify + replier],
    user ask: [Connected, SetPresence, Watch, Unwatch, Query, MarkRead, SetPrefs],
    doc tell: [
        DocApply + replier, DocAwareness + replier, DocLeave + replier, DocCreate + replier,
        DocDelete + replier, DocSync, DocQueryAwareness
    ],
    doc custom: [DocOpen],
    doc ask: [DocRead],
}

/// A Chorus socket's `doc.open` is answered through its hub (the reply
/// carries the state, in order with the document's pushes); a `/doc`
/// socket's open has no reply.
impl Wire for doc::DocOpen {
    fn into_msg(self) -> ActorMsg {
        ActorMsg::DocOpen(self)
    }
    fn awaited(&mut self) -> Option<(ConnAddr, u64)> {
        (!self.yjs).then(|| (self.conn.clone(), self.req_id))
    }
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A peer link payload, as another node sent it.
pub fn decode(bytes: &[u8]) -> Result<PeerMsg, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

pub(crate) fn encode(msg: &PeerMsg) -> Option<Bytes> {
    match rmp_serde::to_vec_named(msg) {
        Ok(v) => Some(Bytes::from(v)),
        Err(e) => {
            tracing::error!(error = %e, "peer message not encodable");
            None
        }
    }
}

impl Services {
    /// Sends one message to another node; failures are logged (the link
    /// retries by itself; a node that is gone is the failure detector's case).
    pub(crate) async fn send_peer(&self, node: &NodeId, msg: &PeerMsg) {
        if let Some(bytes) = encode(msg) {
            if let Err(f) = self.cluster.send(node, bytes).await {
                tracing::debug!(%node, error = %f, "peer message not sent");
            }
        }
    }

    /// Queues a frame for one connection, on whichever node it is, ordered
    /// with that node's pushes from the same sender.
    pub async fn send_to(&self, conn: &ConnAddr, frame: Arc<SharedFrame>) {
        if self.cluster.is_me(&conn.node) {
            let msg = SendTo {
                conn: conn.conn,
                frame,
            };
            if self.hub.tell(msg).await.is_err() {
                tracing::debug!(conn = conn.conn, "hub gone; frame dropped at shutdown");
            }
        } else {
            let msg = PeerMsg::HubSendTo {
                conn: conn.conn,
                frame: frame.frame().clone(),
            };
            self.send_peer(&conn.node, &msg).await;
        }
    }

    /// One push for the subscribers of `channel` on each of `nodes`: the
    /// local hub gets the frame, every other node one copy, encoded once.
    pub(crate) async fn deliver<'a>(
        &self,
        channel: &str,
        nodes: impl Iterator<Item = &'a NodeId>,
        frame: Arc<SharedFrame>,
    ) {
        let mut encoded: Option<Bytes> = None;
        for node in nodes {
            if self.cluster.is_me(node) {
                let msg = Deliver {
                    channel: channel.to_string(),
                    frame: frame.clone(),
                };
                if self.hub.tell(msg).await.is_err() {
                    tracing::debug!(channel, "hub gone");
                }
                continue;
            }
            if encoded.is_none() {
                encoded = encode(&PeerMsg::HubDeliver {
                    channel: channel.to_string(),
                    frame: frame.frame().clone(),
                });
            }
            let Some(bytes) = encoded.clone() else { return };
            self.cluster.metrics.remote_deliveries.inc();
            if let Err(f) = self.cluster.send(node, bytes).await {
                tracing::debug!(%node, channel, error = %f, "delivery to node failed");
            }
        }
    }

    /// Registers `conn` with its node's hub as a subscriber of `channel`
    /// whose stream stands at `at` (the catch-up it was sent ended there).
    pub(crate) async fn hub_subscribe(&self, channel: &str, conn: &ConnAddr, at: Option<Position>) {
        if self.cluster.is_me(&conn.node) {
            let msg = Subscribe {
                channel: channel.to_string(),
                conn: conn.conn,
                owner: self.cluster.me().clone(),
                at,
            };
            let _ = self.hub.tell(msg).await;
        } else {
            let msg = PeerMsg::HubSubscribe {
                channel: channel.to_string(),
                conn: conn.conn,
                at,
            };
            self.send_peer(&conn.node, &msg).await;
        }
    }

    pub(crate) async fn hub_unsubscribe(&self, channel: &str, conn: &ConnAddr) {
        if self.cluster.is_me(&conn.node) {
            let msg = Unsubscribe {
                channel: channel.to_string(),
                conn: conn.conn,
            };
            let _ = self.hub.tell(msg).await;
        } else {
            let msg = PeerMsg::HubUnsubscribe {
                channel: channel.to_string(),
                conn: conn.conn,
            };
            self.send_peer(&conn.node, &msg).await;
        }
    }

    /// A request of a local connection goes to another node, which answers
    /// it straight to this node's hub: if no answer is there within the
    /// request timeout (the owner died), the hub answers 5004 itself and
    /// drops a late answer, so the client always gets exactly one reply.
    async fn expect_reply(&self, to: &NodeId, conn: &ConnAddr, id: u64) {
        if !self.cluster.is_me(&conn.node) {
            return;
        }
        let conn = conn.conn;
        let node = to.clone();
        if self.hub.tell(ExpectReply { conn, id, node }).await.is_err() {
            return;
        }
        let hub = self.hub.downgrade();
        let timeout = self.cluster.config().request_timeout();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(hub) = hub.upgrade() {
                let _ = hub.tell(ReplyDue { conn, id }).await;
            }
        });
    }

    /// A correlation id for an answer from node `to`, and its receiver.
    fn expect_answer(&self, to: &NodeId) -> (u64, oneshot::Receiver<Result<Value, Fail>>) {
        let corr = self.next_corr.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(corr, (to.clone(), tx));
        (corr, rx)
    }

    /// `node` is down or restarted: what it was to answer never comes.
    /// Those waiting on it get a retryable 5004 now rather than at their
    /// deadline, and so do this node's connections (through the hub).
    pub(crate) async fn fail_requests_to(&self, node: &NodeId) {
        let waiting: Vec<_> = {
            let mut pending = self.pending.lock();
            let corrs: Vec<u64> = pending
                .iter()
                .filter(|(_, (to, _))| to == node)
                .map(|(c, _)| *c)
                .collect();
            corrs.iter().filter_map(|c| pending.remove(c)).collect()
        };
        for (_, tx) in waiting {
            let _ = tx.send(Err(Fail::new(
                ErrorCode::Overloaded,
                "the owning node went down, retry",
            )));
        }
        let _ = self.hub.tell(PeerGone { node: node.clone() }).await;
    }

    /// Waits for an answer, at most the request timeout (then 5004).
    async fn await_answer(
        &self,
        corr: u64,
        rx: oneshot::Receiver<Result<Value, Fail>>,
    ) -> Result<Value, Fail> {
        let timeout = self.cluster.config().request_timeout();
        let r = tokio::time::timeout(timeout, rx).await;
        self.pending.lock().remove(&corr);
        match r {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Fail::new(ErrorCode::Overloaded, "request lost, retry")),
            Err(_) => {
                self.cluster.metrics.request_timeouts.inc();
                Err(Fail::new(
                    ErrorCode::Overloaded,
                    "the owning node did not answer in time, retry",
                ))
            }
        }
    }

    /// Before a message leaves: an in-process waiter becomes a remote
    /// replier whose answer is awaited here (with the request deadline).
    fn make_remote<M: Wire>(self: &Arc<Self>, to: &NodeId, msg: &mut M) {
        let Some(replier) = msg.replier() else { return };
        if !matches!(replier, Replier::Waiter(_)) {
            return;
        }
        let (corr, rx) = self.expect_answer(to);
        let Replier::Waiter(tx) = std::mem::replace(
            replier,
            Replier::Remote {
                node: self.cluster.me().clone(),
                corr,
            },
        ) else {
            return;
        };
        let svc = self.clone();
        tokio::spawn(async move {
            let _ = tx.send(svc.await_answer(corr, rx).await);
        });
    }

    /// Sends a tell to the owner of `key` on `node`.
    pub(crate) async fn tell_remote<A: Placed, M: Wire>(
        self: &Arc<Self>,
        node: &NodeId,
        key: &str,
        mut msg: M,
        if_active: bool,
    ) -> Result<(), Fail> {
        self.make_remote(node, &mut msg);
        if let Some((conn, id)) = msg.awaited() {
            self.expect_reply(node, &conn, id).await;
        }
        let envelope = Envelope {
            kind: A::KIND,
            key: key.to_string(),
            msg: msg.into_msg(),
            hops: 0,
            if_active,
            reply: None,
        };
        self.forward(node, envelope).await
    }

    /// Asks the owner of `key` on `node`; the answer comes back as JSON.
    pub(crate) async fn ask_remote<A: Placed, M: Wire, T: DeserializeOwned>(
        self: &Arc<Self>,
        node: &NodeId,
        key: &str,
        msg: M,
        if_active: bool,
    ) -> Result<T, Fail> {
        let (corr, rx) = self.expect_answer(node);
        let envelope = Envelope {
            kind: A::KIND,
            key: key.to_string(),
            msg: msg.into_msg(),
            hops: 0,
            if_active,
            reply: Some((self.cluster.me().clone(), corr)),
        };
        if let Err(f) = self.forward(node, envelope).await {
            self.pending.lock().remove(&corr);
            return Err(f);
        }
        let v = self.await_answer(corr, rx).await?;
        serde_json::from_value(v).map_err(|e| {
            tracing::error!(error = %e, "undecodable answer from another node");
            Fail::new(ErrorCode::Internal, "internal error")
        })
    }

    async fn forward(&self, node: &NodeId, envelope: Envelope) -> Result<(), Fail> {
        let bytes = encode(&PeerMsg::Actor(envelope))
            .ok_or_else(|| Fail::new(ErrorCode::Internal, "internal error"))?;
        self.cluster.metrics.forwarded.inc();
        self.cluster.send(node, bytes).await
    }

    async fn answer(&self, reply: Option<(NodeId, u64)>, result: Result<Value, Fail>) {
        if let Some((node, corr)) = reply {
            self.send_peer(&node, &PeerMsg::Answer { corr, result })
                .await;
        }
    }

    /// Handles one payload from a peer link (called in the peer's order).
    pub async fn on_peer_frame(self: &Arc<Self>, from: NodeId, bytes: Bytes) {
        let msg = match decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%from, error = %e, "undecodable peer message dropped");
                return;
            }
        };
        match msg {
            PeerMsg::Actor(e) => self.on_envelope(e).await,
            PeerMsg::Answer { corr, result } => {
                if let Some((_, tx)) = self.pending.lock().remove(&corr) {
                    let _ = tx.send(result);
                }
            }
            PeerMsg::HubDeliver { channel, frame } => {
                let frame = Arc::new(SharedFrame::new(frame));
                let _ = self.hub.tell(Deliver { channel, frame }).await;
            }
            PeerMsg::HubSendTo { conn, frame } => {
                let frame = Arc::new(SharedFrame::new(frame));
                let _ = self.hub.tell(SendTo { conn, frame }).await;
            }
            PeerMsg::HubSubscribe { channel, conn, at } => {
                let owner = from.clone();
                let msg = Subscribe {
                    channel,
                    conn,
                    owner,
                    at,
                };
                let _ = self.hub.tell(msg).await;
            }
            PeerMsg::HubUnsubscribe { channel, conn } => {
                let _ = self.hub.tell(Unsubscribe { channel, conn }).await;
            }
            PeerMsg::OwnerStopped { channel } => self.owner_stopped(from, channel),
            PeerMsg::Forgotten => self.forgotten_by(from),
            m @ (PeerMsg::HubDocJoin { .. }
            | PeerMsg::HubDocLeave { .. }
            | PeerMsg::HubDocDeliver { .. }
            | PeerMsg::HubSendYjs { .. }
            | PeerMsg::HubCloseConn { .. }
            | PeerMsg::HubDocDrop { .. }) => self.on_doc_peer_msg(from, m).await,
        }
    }

    async fn on_envelope(self: &Arc<Self>, mut e: Envelope) {
        let placement_key = e.kind.placement_key(&e.key);
        let owner = self.cluster.owner(&placement_key);
        if self.cluster.is_me(&owner) {
            // Asks are answered from a task of their own: the link keeps
            // reading; tells go in now, in the order they came.
            if e.reply.is_some() {
                let svc = self.clone();
                tokio::spawn(async move { svc.run_here(e).await });
            } else {
                self.run_here(e).await;
            }
            return;
        }
        if e.hops >= MAX_HOPS {
            let fail = Fail::new(
                ErrorCode::Overloaded,
                "the cluster is changing owners for this key, retry",
            );
            self.answer(e.reply.take(), Err(fail.clone())).await;
            if let Some(r) = e.msg.into_replier() {
                r.send(self, Err(fail)).await;
            }
            return;
        }
        e.hops += 1;
        if let Err(f) = self.forward(&owner, e).await {
            tracing::debug!(%owner, error = %f, "forwarding failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::link::{decode_frame, Frame};
    use chorus_protocol::{Push, Reply};

    fn samples() -> Vec<PeerMsg> {
        let conn = ConnAddr {
            node: NodeId::new("node-1"),
            conn: 7,
        };
        vec![
            PeerMsg::Actor(Envelope {
                kind: ActorKind::Room,
                key: "room:lobby".into(),
                msg: ActorMsg::Typing(room::Typing {
                    user: "alice".into(),
                }),
                hops: 0,
                if_active: false,
                reply: Some((NodeId::new("node-2"), 42)),
            }),
            PeerMsg::Actor(Envelope {
                kind: ActorKind::Room,
                key: "room:lobby".into(),
                msg: ActorMsg::Unsubscribe(room::Unsubscribe { conn: conn.clone() }),
                hops: 1,
                if_active: true,
                reply: None,
            }),
            PeerMsg::Answer {
                corr: 42,
                result: Err(Fail::new(ErrorCode::NotMember, "no")),
            },
            PeerMsg::Answer {
                corr: 43,
                result: Ok(serde_json::json!({"offset": 3})),
            },
            PeerMsg::HubDeliver {
                channel: "room:lobby".into(),
                frame: ServerFrame::Push(Push {
                    push: "entry".into(),
                    channel: Some("room:lobby".into()),
                    epoch: Some("e".into()),
                    offset: Some(3),
                    ephemeral: false,
                    data: serde_json::json!({"text": "hi"}),
                }),
            },
            PeerMsg::HubSendTo {
                conn: 7,
                frame: ServerFrame::Reply(Reply::ok(1, serde_json::json!({}))),
            },
            PeerMsg::HubSubscribe {
                channel: "topic:news".into(),
                conn: 7,
                at: Some(("e".into(), 3)),
            },
            PeerMsg::OwnerStopped {
                channel: "room:lobby".into(),
            },
            PeerMsg::Forgotten,
            PeerMsg::HubDocJoin {
                channel: "doc:notes".into(),
                conn: 7,
                yjs: true,
            },
            PeerMsg::HubDocDeliver {
                channel: "doc:notes".into(),
                push: chorus_protocol::doc::DocPush::new(
                    chorus_protocol::doc::DocEvent::Update,
                    "notes",
                    vec![1, 1, 2, 0, 0],
                ),
                except: Some(conn.clone()),
            },
            PeerMsg::HubSendYjs {
                conn: 7,
                bytes: serde_bytes::ByteBuf::from(vec![0, 0, 1, 0]),
            },
            PeerMsg::HubCloseConn {
                conn: 7,
                code: 4014,
                reason: "moved".into(),
            },
            PeerMsg::HubDocDrop {
                channel: "doc:notes".into(),
                reason: "deleted".into(),
            },
            PeerMsg::Actor(Envelope {
                kind: ActorKind::Doc,
                key: "notes".into(),
                msg: ActorMsg::DocApply(doc::DocApply {
                    origin: Some(conn.clone()),
                    update: vec![0, 0],
                    replier: Replier::Remote {
                        node: NodeId::new("node-2"),
                        corr: 9,
                    },
                    close_origin: true,
                }),
                hops: 0,
                if_active: false,
                reply: None,
            }),
            PeerMsg::Actor(Envelope {
                kind: ActorKind::Room,
                key: "room:lobby".into(),
                msg: ActorMsg::Resubscribe(room::Resubscribe {
                    node: NodeId::new("node-1"),
                    conns: vec![(7, "alice".into())],
                    after: Some(("e".into(), 3)),
                }),
                hops: 0,
                if_active: false,
                reply: None,
            }),
        ]
    }

    /// Every kind of peer message survives the wire, inside a link frame.
    /// With `CHORUS_FUZZ_SEEDS=<dir>` the encodings are also written there
    /// (the `peer_frame` fuzz target's seeds: tests/fuzz/corpus/peer_frame).
    #[test]
    fn peer_messages_round_trip_through_a_link_frame() {
        let seeds = std::env::var_os("CHORUS_FUZZ_SEEDS").map(std::path::PathBuf::from);
        for (i, msg) in samples().iter().enumerate() {
            let bytes = encode(msg).expect("encodable");
            let back = decode(&bytes).expect("decodable");
            assert_eq!(encode(&back), Some(bytes.clone()), "sample {i}");
            let frame = Frame::Data {
                seq: i as u64 + 1,
                payload: bytes.to_vec(),
            };
            let body = rmp_serde::to_vec(&frame).unwrap();
            match decode_frame(&body).expect("frame decodes") {
                Frame::Data { payload, .. } => assert_eq!(payload, bytes.to_vec()),
                other => panic!("{other:?}"),
            }
            if let Some(dir) = &seeds {
                std::fs::create_dir_all(dir).unwrap();
                let mut framed = vec![0u8];
                framed.extend_from_slice(&body);
                let mut bare = vec![1u8];
                bare.extend_from_slice(&bytes);
                std::fs::write(dir.join(format!("seed-frame-{i}")), framed).unwrap();
                std::fs::write(dir.join(format!("seed-msg-{i}")), bare).unwrap();
            }
        }
        assert!(decode(b"\xc1").is_err());
        assert!(decode_frame(&[0x92, 0xff]).is_err());
    }
}
