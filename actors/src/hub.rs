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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chorus_protocol::{close, SharedFrame};
use kameo::message::{Context, Message};
use kameo::Actor;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::placement::NodeId;
use crate::Metrics;

/// A connection's id, unique within its node.
pub type ConnId = u64;

/// A connection anywhere in the cluster: its node and its id there. Rooms
/// and users keep these, never a bare [`ConnId`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnAddr {
    pub node: NodeId,
    pub conn: ConnId,
}

/// The sending half of a connection's outbound queue, and its close signal.
#[derive(Clone, Debug)]
pub struct ConnSink {
    tx: mpsc::Sender<Arc<SharedFrame>>,
    closer: Arc<Closer>,
}

#[derive(Debug)]
struct Closer {
    token: CancellationToken,
    reason: Mutex<Option<(u16, String)>>,
}

/// The receiving half, owned by the socket's writer.
pub struct ConnOutbox {
    pub rx: mpsc::Receiver<Arc<SharedFrame>>,
    closer: Arc<Closer>,
}

/// Why a push could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The queue is full: the client is too slow.
    Full,
    /// The connection is gone.
    Closed,
}

/// A bounded outbound queue for one connection.
pub fn outbound(capacity: usize) -> (ConnSink, ConnOutbox) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let closer = Arc::new(Closer {
        token: CancellationToken::new(),
        reason: Mutex::new(None),
    });
    (
        ConnSink {
            tx,
            closer: closer.clone(),
        },
        ConnOutbox { rx, closer },
    )
}

impl ConnSink {
    /// Queues a frame without waiting.
    pub fn push(&self, frame: Arc<SharedFrame>) -> Result<(), PushError> {
        if self.closer.token.is_cancelled() {
            return Err(PushError::Closed);
        }
        self.tx.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PushError::Full,
            mpsc::error::TrySendError::Closed(_) => PushError::Closed,
        })
    }

    /// Asks the writer to close the socket with `code` (the first reason given wins).
    pub fn close(&self, code: u16, reason: &str) {
        let mut r = self.closer.reason.lock();
        if r.is_none() {
            *r = Some((code, reason.to_string()));
        }
        drop(r);
        self.closer.token.cancel();
    }

    /// Resolves once someone asked to close this connection.
    pub async fn closed(&self) {
        self.closer.token.cancelled().await
    }

    pub fn is_closed(&self) -> bool {
        self.closer.token.is_cancelled() || self.tx.is_closed()
    }
}

/// Observes a connection's close request (owned separately from the queue's receiver).
pub struct CloseWatch {
    closer: Arc<Closer>,
}

impl ConnOutbox {
    pub fn split(self) -> (mpsc::Receiver<Arc<SharedFrame>>, CloseWatch) {
        (
            self.rx,
            CloseWatch {
                closer: self.closer,
            },
        )
    }
}

impl CloseWatch {
    /// Resolves when someone asked to close this connection; gives the code and reason.
    pub async fn closed(&self) -> (u16, String) {
        self.closer.token.cancelled().await;
        self.closer
            .reason
            .lock()
            .clone()
            .unwrap_or((close::GOING_AWAY, String::new()))
    }
}

/// One per node. See the module docs.
#[derive(Actor)]
pub struct Hub {
    conns: HashMap<ConnId, ConnSink>,
    channels: HashMap<String, HashSet<ConnId>>,
    conn_channels: HashMap<ConnId, HashSet<String>>,
    metrics: Arc<Metrics>,
    /// Set by [`CloseAll`]: a connection registering after it (its handshake
    /// raced the shutdown) is closed the same way at once.
    closing: Option<(u16, String)>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Hub {
        Hub {
            conns: HashMap::new(),
            channels: HashMap::new(),
            conn_channels: HashMap::new(),
            metrics,
            closing: None,
        }
    }

    fn drop_conn(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        if let Some(chans) = self.conn_channels.remove(&conn) {
            for ch in chans {
                if let Some(set) = self.channels.get_mut(&ch) {
                    set.remove(&conn);
                    if set.is_empty() {
                        self.channels.remove(&ch);
                    }
                }
            }
        }
    }

    fn send(&mut self, conn: ConnId, frame: &Arc<SharedFrame>) -> bool {
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
    pub sink: ConnSink,
}

/// A connection ended.
pub struct Unregister {
    pub conn: ConnId,
}

/// Start delivering `channel`'s entries to `conn`.
pub struct Subscribe {
    pub channel: String,
    pub conn: ConnId,
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

/// Whether any local connection still subscribes to the channel.
pub struct HasSubscribers {
    pub channel: String,
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
        self.channels
            .entry(m.channel.clone())
            .or_default()
            .insert(m.conn);
        self.conn_channels
            .entry(m.conn)
            .or_default()
            .insert(m.channel);
    }
}

impl Message<Unsubscribe> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: Unsubscribe, _: &mut Context<Self, ()>) {
        if let Some(set) = self.channels.get_mut(&m.channel) {
            set.remove(&m.conn);
            if set.is_empty() {
                self.channels.remove(&m.channel);
            }
        }
        if let Some(set) = self.conn_channels.get_mut(&m.conn) {
            set.remove(&m.channel);
        }
    }
}

impl Message<Deliver> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: Deliver, _: &mut Context<Self, ()>) {
        let Some(subs) = self.channels.get(&m.channel) else {
            return;
        };
        let targets: Vec<ConnId> = subs.iter().copied().collect();
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
        self.send(m.conn, &m.frame);
    }
}

impl Message<HasSubscribers> for Hub {
    type Reply = bool;
    async fn handle(&mut self, m: HasSubscribers, _: &mut Context<Self, bool>) -> bool {
        self.channels.get(&m.channel).is_some_and(|s| !s.is_empty())
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
    use chorus_protocol::{Push, ServerFrame};
    use kameo::actor::Spawn;

    fn frame(n: u64) -> Arc<SharedFrame> {
        Arc::new(SharedFrame::new(ServerFrame::Push(Push {
            push: "entry".into(),
            channel: Some("room:a".into()),
            epoch: None,
            offset: Some(n),
            ephemeral: false,
            data: serde_json::Value::Null,
        })))
    }

    #[tokio::test]
    async fn delivers_to_subscribers_and_closes_slow_ones() {
        let hub = Hub::spawn(Hub::new(Arc::new(Metrics::new())));
        let (fast, mut fast_out) = outbound(8);
        let (slow, slow_out) = outbound(1);
        // Keep the receiver: a slow client still has its queue, it just does not drain it.
        let (_slow_rx, slow_out) = slow_out.split();
        hub.tell(Register {
            conn: 1,
            sink: fast,
        })
        .await
        .unwrap();
        hub.tell(Register {
            conn: 2,
            sink: slow,
        })
        .await
        .unwrap();
        for conn in [1, 2] {
            hub.tell(Subscribe {
                channel: "room:a".into(),
                conn,
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
}
