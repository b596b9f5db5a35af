//! The node hub: this node's connections and what each is subscribed to.
//!
//! A room sends the hub one [`Deliver`] per message; the hub hands the same
//! `Arc<SharedFrame>` to each local subscriber's bounded queue. A queue that
//! is full means the client does not read fast enough: the hub closes that
//! connection with [`close::SLOW_CONSUMER`] rather than buffer without bound
//! or silently skip messages (which would break the no-gap guarantee).
//!
//! Replies that must be ordered with pushes (a subscribe's catch-up before
//! the first live entry) also travel through the hub ([`SendTo`]): one
//! mailbox, so one order.
//!
//! Per channel and subscriber the hub remembers which node's room
//! registered it and the last stored entry (epoch, offset) it got
//! ([`chan`]). When the channel's owner changes, the node re-registers them
//! at the new owner from that offset ([`Registrations`],
//! `placement::moves`); the new owner replays the gap from the store, and
//! the hub drops an entry for each subscriber that has it and holds it back
//! from one that would see a gap (which is registered again), so
//! subscribers see no gap and no duplicate.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_protocol::{close, ErrorCode, Reply, ServerFrame, SharedFrame};
use kameo::message::{Context, Message};
use kameo::Actor;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::placement::NodeId;
use crate::Metrics;

mod chan;
mod outbox;
use chan::Chan;
pub use outbox::{outbound, CloseWatch, ConnOutbox, ConnSink, PushError};

/// A connection's id, unique within its node.
pub type ConnId = u64;

/// A connection anywhere in the cluster: its node and its id there. Rooms
/// and users keep these, never a bare [`ConnId`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnAddr {
    pub node: NodeId,
    pub conn: ConnId,
}

/// The position of a channel's stream: its epoch and an offset in it.
pub type Position = (String, u64);

/// One per node. See the module docs.
#[derive(Actor)]
pub struct Hub {
    pub(crate) conns: HashMap<ConnId, ConnSink>,
    /// The user of each connection.
    users: HashMap<ConnId, String>,
    channels: HashMap<String, Chan>,
    conn_channels: HashMap<ConnId, HashSet<String>>,
    /// Requests of local connections that another node is to answer here,
    /// with that node.
    awaited: HashMap<ConnId, HashMap<u64, NodeId>>,
    /// Those answered 5004 here for want of an answer in time: a late one is dropped.
    overdue: HashMap<ConnId, HashMap<u64, Instant>>,
    pub(crate) metrics: Arc<Metrics>,
    /// Set by [`CloseAll`]: a connection registering after it (its handshake
    /// raced the shutdown) is closed the same way at once.
    closing: Option<(u16, String)>,
    /// Woken when a subscriber lost its registration (it would have seen a
    /// gap): the node registers it again at the owner.
    reregister: Arc<Notify>,
    /// Documents open on local connections (`doc:<name>`): [`crate::doc::fanout`].
    pub(crate) docs: HashMap<String, crate::doc::fanout::DocChan>,
    pub(crate) conn_docs: HashMap<ConnId, HashSet<String>>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>, reregister: Arc<Notify>) -> Hub {
        Hub {
            conns: HashMap::new(),
            users: HashMap::new(),
            channels: HashMap::new(),
            conn_channels: HashMap::new(),
            awaited: HashMap::new(),
            overdue: HashMap::new(),
            metrics,
            closing: None,
            reregister,
            docs: HashMap::new(),
            conn_docs: HashMap::new(),
        }
    }

    fn drop_conn(&mut self, conn: ConnId) {
        self.drop_conn_docs(conn);
        self.conns.remove(&conn);
        self.users.remove(&conn);
        self.awaited.remove(&conn);
        self.overdue.remove(&conn);
        if let Some(chans) = self.conn_channels.remove(&conn) {
            for ch in chans {
                self.leave_channel(&ch, conn);
            }
        }
    }

    fn leave_channel(&mut self, channel: &str, conn: ConnId) {
        if let Some(chan) = self.channels.get_mut(channel) {
            chan.conns.remove(&conn);
            if chan.conns.is_empty() {
                self.channels.remove(channel);
            }
        }
    }

    pub(crate) fn send(&mut self, conn: ConnId, frame: &Arc<SharedFrame>) -> bool {
        let Some(sink) = self.conns.get(&conn) else {
            return false;
        };
        match sink.push(frame.clone()) {
            Ok(()) => true,
            Err(PushError::Full) => {
                self.metrics.slow_consumers.inc();
                sink.close(close::SLOW_CONSUMER, "slow consumer: outbound queue full");
                self.drop_conn(conn);
                false
            }
            Err(PushError::Closed) => {
                self.drop_conn(conn);
                false
            }
        }
    }
}

/// A connection opened on this node.
pub struct Register {
    pub conn: ConnId,
    pub user: String,
    pub sink: ConnSink,
}

/// A connection ended.
pub struct Unregister {
    pub conn: ConnId,
}

/// Start delivering `channel`'s entries to `conn`: sent by the channel's
/// room on `owner`, after the catch-up up to `at`.
pub struct Subscribe {
    pub channel: String,
    pub conn: ConnId,
    pub owner: NodeId,
    pub at: Option<Position>,
}

pub struct Unsubscribe {
    pub channel: String,
    pub conn: ConnId,
}

/// One message for every local subscriber of `channel`.
pub struct Deliver {
    pub channel: String,
    pub frame: Arc<SharedFrame>,
}

/// One frame for one connection.
pub struct SendTo {
    pub conn: ConnId,
    pub frame: Arc<SharedFrame>,
}

/// Request `id` of `conn` is to be answered by another node.
pub struct ExpectReply {
    pub conn: ConnId,
    pub id: u64,
    /// The node it was sent to.
    pub node: NodeId,
}

/// `node` is down or restarted: the requests it was to answer are answered
/// 5004 now.
pub struct PeerGone {
    pub node: NodeId,
}

/// The request timeout of an [`ExpectReply`] has passed.
pub struct ReplyDue {
    pub conn: ConnId,
    pub id: u64,
}

/// `node` is down or restarted: subscribers its rooms registered are to
/// be registered again (at whichever node owns their channel now).
pub struct OwnerGone {
    pub node: NodeId,
}

impl Message<OwnerGone> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: OwnerGone, _: &mut Context<Self, ()>) {
        for chan in self.channels.values_mut() {
            chan.forget_owner(&m.node);
        }
    }
}

/// Whether any local connection still subscribes to the channel.
pub struct HasSubscribers {
    pub channel: String,
}

/// The local subscribers of every channel (or of one), to re-register them
/// at a new owner.
pub struct Registrations {
    pub channel: Option<String>,
}

/// A channel's local subscribers and where their stream stands.
pub struct Registration {
    pub channel: String,
    /// The epoch of the subscribers' positions.
    pub epoch: Option<String>,
    pub conns: Vec<Registered>,
}

/// One local subscriber of a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    pub conn: ConnId,
    pub user: String,
    /// The node whose room registered it; `None` if it must be registered
    /// again (an entry arrived that it would have seen after a gap).
    pub owner: Option<NodeId>,
    /// The offset of the last stored entry it got.
    pub last: Option<u64>,
}

/// Close every connection (shutdown).
pub struct CloseAll {
    pub code: u16,
    pub reason: String,
}

impl Message<Register> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: Register, _: &mut Context<Self, ()>) {
        if let Some((code, reason)) = &self.closing {
            m.sink.close(*code, reason);
        }
        self.conns.insert(m.conn, m.sink);
        self.users.insert(m.conn, m.user);
    }
}

impl Message<Unregister> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: Unregister, _: &mut Context<Self, ()>) {
        self.drop_conn(m.conn);
    }
}

impl Message<Subscribe> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: Subscribe, _: &mut Context<Self, ()>) {
        if !self.conns.contains_key(&m.conn) {
            return;
        }
        let chan = self.channels.entry(m.channel.clone()).or_default();
        chan.subscribe(m.conn, m.owner, m.at);
        self.conn_channels
            .entry(m.conn)
            .or_default()
            .insert(m.channel);
    }
}

impl Message<Unsubscribe> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: Unsubscribe, _: &mut Context<Self, ()>) {
        self.leave_channel(&m.channel, m.conn);
        if let Some(set) = self.conn_channels.get_mut(&m.conn) {
            set.remove(&m.channel);
        }
    }
}

impl Message<Deliver> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: Deliver, _: &mut Context<Self, ()>) {
        let Some(chan) = self.channels.get_mut(&m.channel) else {
            return;
        };
        let targets = match stored_position(&m.frame) {
            Some(at) => {
                let f = chan.stored(&at);
                // Replayed by a new owner, or sent by two owners at once.
                self.metrics
                    .cluster
                    .duplicates_dropped
                    .inc_by(f.duplicates as u64);
                if !f.gaps.is_empty() {
                    tracing::info!(
                        channel = %m.channel,
                        offset = at.1,
                        behind = ?f.gaps,
                        "subscribers behind the stream: registering them again at the owner"
                    );
                    self.reregister.notify_one();
                }
                f.send
            }
            None => chan.all(),
        };
        let mut delivered = 0u64;
        for conn in targets {
            if self.send(conn, &m.frame) {
                delivered += 1;
            }
        }
        self.metrics.fanout_deliveries.inc_by(delivered);
    }
}

impl Message<SendTo> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: SendTo, _: &mut Context<Self, ()>) {
        if let Some(id) = m.frame.frame().reply_id() {
            let awaited = self
                .awaited
                .get_mut(&m.conn)
                .is_some_and(|ids| ids.remove(&id).is_some());
            let late = !awaited
                && self
                    .overdue
                    .get_mut(&m.conn)
                    .is_some_and(|ids| ids.remove(&id).is_some());
            if late {
                return;
            }
        }
        self.send(m.conn, &m.frame);
    }
}

impl Message<ExpectReply> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: ExpectReply, _: &mut Context<Self, ()>) {
        if self.conns.contains_key(&m.conn) {
            self.awaited.entry(m.conn).or_default().insert(m.id, m.node);
        }
    }
}

/// How long a hub remembers a request it answered 5004, to drop a late answer.
const OVERDUE_MEMORY: Duration = Duration::from_secs(120);

impl Message<ReplyDue> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: ReplyDue, _: &mut Context<Self, ()>) {
        let Some(ids) = self.awaited.get_mut(&m.conn) else {
            return;
        };
        if ids.remove(&m.id).is_none() {
            return;
        }
        self.metrics.cluster.request_timeouts.inc();
        self.answer_unanswered(
            m.conn,
            m.id,
            "the owning node did not answer in time, retry",
        );
    }
}

impl Message<PeerGone> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: PeerGone, _: &mut Context<Self, ()>) {
        self.docs_owned_by_gone(&m.node);
        let mut gone = Vec::new();
        for (conn, ids) in &mut self.awaited {
            ids.retain(|id, node| {
                let keep = *node != m.node;
                if !keep {
                    gone.push((*conn, *id));
                }
                keep
            });
        }
        for (conn, id) in gone {
            self.answer_unanswered(conn, id, "the owning node went down, retry");
        }
    }
}

impl Hub {
    /// Answers request `id` of `conn` with a retryable 5004 in place of the
    /// other node, and drops that node's answer if it comes after all.
    fn answer_unanswered(&mut self, conn: ConnId, id: u64, why: &str) {
        let overdue = self.overdue.entry(conn).or_default();
        overdue.retain(|_, at| at.elapsed() < OVERDUE_MEMORY);
        overdue.insert(id, Instant::now());
        self.metrics.error(ErrorCode::Overloaded);
        let reply = Reply::err(id, ErrorCode::Overloaded, why);
        let frame = Arc::new(SharedFrame::new(ServerFrame::Reply(reply)));
        self.send(conn, &frame);
    }
}

impl Message<HasSubscribers> for Hub {
    type Reply = bool;
    async fn handle(&mut self, m: HasSubscribers, _: &mut Context<Self, bool>) -> bool {
        self.channels
            .get(&m.channel)
            .is_some_and(|c| !c.conns.is_empty())
    }
}

impl Message<Registrations> for Hub {
    type Reply = Vec<Registration>;
    async fn handle(
        &mut self,
        m: Registrations,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        let users = &self.users;
        let registration = |channel: &String, chan: &Chan| Registration {
            channel: channel.clone(),
            epoch: chan.epoch.clone(),
            conns: chan
                .conns
                .iter()
                .filter_map(|(c, sub)| {
                    users.get(c).map(|u| Registered {
                        conn: *c,
                        user: u.clone(),
                        owner: sub.owner.clone(),
                        last: sub.last,
                    })
                })
                .collect(),
        };
        match &m.channel {
            Some(ch) => self
                .channels
                .get_key_value(ch)
                .map(|(k, c)| registration(k, c))
                .into_iter()
                .collect(),
            None => self
                .channels
                .iter()
                .map(|(k, c)| registration(k, c))
                .collect(),
        }
    }
}

/// The (epoch, offset) of a stored entry's push; `None` for anything else.
fn stored_position(frame: &SharedFrame) -> Option<Position> {
    match frame.frame() {
        ServerFrame::Push(p) if !p.ephemeral => Some((p.epoch.clone()?, p.offset?)),
        _ => None,
    }
}

impl Message<CloseAll> for Hub {
    type Reply = usize;
    async fn handle(&mut self, m: CloseAll, _: &mut Context<Self, usize>) -> usize {
        let n = self.conns.len();
        for sink in self.conns.values() {
            sink.close(m.code, &m.reason);
        }
        self.closing = Some((m.code, m.reason));
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_protocol::Push;
    use kameo::actor::Spawn;

    fn frame(n: u64) -> Arc<SharedFrame> {
        Arc::new(SharedFrame::new(ServerFrame::Push(Push {
            push: "entry".into(),
            channel: Some("room:a".into()),
            epoch: Some("e1".into()),
            offset: Some(n),
            ephemeral: false,
            data: serde_json::Value::Null,
        })))
    }

    #[tokio::test]
    async fn delivers_to_subscribers_and_closes_slow_ones() {
        let hub = Hub::spawn(Hub::new(Arc::new(Metrics::new()), Arc::new(Notify::new())));
        let (fast, mut fast_out) = outbound(8);
        let (slow, slow_out) = outbound(1);
        // Keep the receiver: a slow client still has its queue, it just does not drain it.
        let (_slow_rx, slow_out) = slow_out.split();
        hub.tell(Register {
            conn: 1,
            user: "u1".into(),
            sink: fast,
        })
        .await
        .unwrap();
        hub.tell(Register {
            conn: 2,
            user: "u2".into(),
            sink: slow,
        })
        .await
        .unwrap();
        for conn in [1, 2] {
            hub.tell(Subscribe {
                channel: "room:a".into(),
                conn,
                owner: NodeId::new("n1"),
                at: None,
            })
            .await
            .unwrap();
        }
        hub.tell(Deliver {
            channel: "room:a".into(),
            frame: frame(1),
        })
        .await
        .unwrap();
        hub.tell(Deliver {
            channel: "room:a".into(),
            frame: frame(2),
        })
        .await
        .unwrap();
        assert!(hub
            .ask(HasSubscribers {
                channel: "room:a".into()
            })
            .await
            .unwrap());
        assert_eq!(fast_out.rx.recv().await.unwrap().frame(), frame(1).frame());
        assert_eq!(fast_out.rx.recv().await.unwrap().frame(), frame(2).frame());
        let (code, _) = slow_out.closed().await;
        assert_eq!(code, close::SLOW_CONSUMER);
        hub.tell(Unregister { conn: 1 }).await.unwrap();
        assert!(!hub
            .ask(HasSubscribers {
                channel: "room:a".into()
            })
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn an_entry_already_delivered_is_not_delivered_again() {
        let hub = Hub::spawn(Hub::new(Arc::new(Metrics::new()), Arc::new(Notify::new())));
        let (sink, mut out) = outbound(16);
        hub.tell(Register {
            conn: 1,
            user: "u1".into(),
            sink,
        })
        .await
        .unwrap();
        hub.tell(Subscribe {
            channel: "room:a".into(),
            conn: 1,
            owner: NodeId::new("n1"),
            at: Some(("e1".into(), 2)),
        })
        .await
        .unwrap();
        // 2 came with the catch-up; 3 from the old owner, then a new owner
        // replays 2..=3 and goes on with 4.
        for n in [2, 3, 2, 3, 4] {
            hub.tell(Deliver {
                channel: "room:a".into(),
                frame: frame(n),
            })
            .await
            .unwrap();
        }
        let regs = hub.ask(Registrations { channel: None }).await.unwrap();
        assert_eq!(regs.len(), 1);
        assert_eq!(regs[0].epoch.as_deref(), Some("e1"));
        assert_eq!(
            regs[0].conns,
            vec![Registered {
                conn: 1,
                user: "u1".into(),
                owner: Some(NodeId::new("n1")),
                last: Some(4),
            }]
        );
        for n in [3, 4] {
            assert_eq!(out.rx.recv().await.unwrap().frame(), frame(n).frame());
        }
        assert!(out.rx.try_recv().is_err(), "nothing else was delivered");
    }
}
