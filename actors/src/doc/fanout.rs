//! A document's frames on their way to its clients: the hub's side (which
//! local connections have which document open) and the calls and peer
//! messages that carry a document's frames to another node's hub.
//!
//! A document sends each update once per node with clients; that node's hub
//! hands the same `Arc<SharedFrame>` to each local client: `/doc` sockets
//! send its y-protocols bytes, Chorus sockets its `doc.update` push, each
//! encoded at most once. The connection an update came from is skipped.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use chorus_protocol::doc::{DocEvent, DocPush};
use chorus_protocol::{close, Push, ServerFrame, SharedFrame};
use kameo::message::{Context, Message};
use serde_json::json;
use yrs::encoding::write::Write;
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::updates::encoder::{Encoder, EncoderV1};

use crate::hub::{ConnAddr, ConnId, Hub, SendTo};
use crate::placement::NodeId;
use crate::remote::PeerMsg;
use crate::services::Services;

/// The local connections that have one document open.
pub(crate) struct DocChan {
    /// Each connection, and whether it is a `/doc` socket.
    conns: HashMap<ConnId, bool>,
    /// The node whose document registered them.
    owner: NodeId,
}

/// The y-protocols message of a document push.
pub fn yjs_bytes(push: &DocPush) -> Bytes {
    Bytes::from(match push.push {
        DocEvent::Update => super::ops::ymsg(&YMessage::Sync(SyncMessage::Update(
            push.data.update.0.clone(),
        ))),
        DocEvent::Awareness => awareness_message(&push.data.update.0),
    })
}

/// A y-protocols awareness message around an encoded awareness update.
pub fn awareness_message(update: &[u8]) -> Vec<u8> {
    let mut enc = EncoderV1::new();
    enc.write_var(yrs::sync::protocol::MSG_AWARENESS);
    enc.write_buf(update);
    enc.to_vec()
}

/// A y-protocols permission-denied message (y-websocket logs its reason).
pub fn denied_message(reason: &str) -> Vec<u8> {
    super::ops::ymsg(&YMessage::Auth(Some(reason.to_string())))
}

/// A frame only `/doc` sockets are sent: the Chorus part is never used.
pub fn yjs_frame(bytes: Bytes) -> Arc<SharedFrame> {
    let placeholder = ServerFrame::Push(Push::ephemeral("doc.yjs", None, serde_json::Value::Null));
    Arc::new(SharedFrame::with_yjs(placeholder, bytes))
}

// ---- the hub ----

/// `conn` opened `channel` (a document), registered by the document on `owner`.
pub struct DocJoin {
    pub channel: String,
    pub conn: ConnId,
    pub owner: NodeId,
    pub yjs: bool,
}

pub struct DocLeave {
    pub channel: String,
    pub conn: ConnId,
}

/// A document's frame for its local clients, except `except`.
pub struct DocDeliver {
    pub channel: String,
    pub frame: Arc<SharedFrame>,
    pub except: Option<ConnId>,
}

/// The document stopped, moved or was deleted: its local clients are told
/// (`/doc` sockets closed with 4014, Chorus sockets pushed `doc.closed`).
pub struct DocDrop {
    pub channel: String,
    pub reason: String,
    /// Only if registered by this node (`None`: whoever).
    pub owner: Option<NodeId>,
}

/// Close one connection with a code (a `/doc` socket's error).
pub struct CloseConn {
    pub conn: ConnId,
    pub code: u16,
    pub reason: String,
}

impl Hub {
    pub(crate) fn drop_conn_docs(&mut self, conn: ConnId) {
        if let Some(docs) = self.conn_docs.remove(&conn) {
            for d in docs {
                if let Some(chan) = self.docs.get_mut(&d) {
                    chan.conns.remove(&conn);
                    if chan.conns.is_empty() {
                        self.docs.remove(&d);
                    }
                }
            }
        }
    }

    /// Tells the clients of `channel` the document is gone from here.
    fn drop_doc(&mut self, channel: &str, reason: &str) {
        let Some(chan) = self.docs.remove(channel) else {
            return;
        };
        let doc = channel.strip_prefix("doc:").unwrap_or(channel);
        let push = Arc::new(SharedFrame::new(ServerFrame::Push(Push::ephemeral(
            "doc.closed",
            Some(channel.to_string()),
            json!({"doc": doc, "reason": reason}),
        ))));
        for (conn, yjs) in chan.conns {
            if let Some(set) = self.conn_docs.get_mut(&conn) {
                set.remove(channel);
            }
            if yjs {
                if let Some(sink) = self.conns.get(&conn) {
                    sink.close(
                        close::DOC_RECONNECT,
                        &format!("document {reason}, reconnect"),
                    );
                }
            } else {
                self.send(conn, &push);
            }
        }
    }

    /// `node` is down: the documents it owned are gone for their clients here.
    pub(crate) fn docs_owned_by_gone(&mut self, node: &NodeId) {
        let gone: Vec<String> = self
            .docs
            .iter()
            .filter(|(_, c)| c.owner == *node)
            .map(|(k, _)| k.clone())
            .collect();
        for channel in gone {
            self.drop_doc(&channel, "owner_gone");
        }
    }
}

impl Message<DocJoin> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: DocJoin, _: &mut Context<Self, ()>) {
        if !self.conns.contains_key(&m.conn) {
            return;
        }
        let chan = self
            .docs
            .entry(m.channel.clone())
            .or_insert_with(|| DocChan {
                conns: HashMap::new(),
                owner: m.owner.clone(),
            });
        chan.owner = m.owner;
        chan.conns.insert(m.conn, m.yjs);
        self.conn_docs.entry(m.conn).or_default().insert(m.channel);
    }
}

impl Message<DocLeave> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: DocLeave, _: &mut Context<Self, ()>) {
        if let Some(chan) = self.docs.get_mut(&m.channel) {
            chan.conns.remove(&m.conn);
            if chan.conns.is_empty() {
                self.docs.remove(&m.channel);
            }
        }
        if let Some(set) = self.conn_docs.get_mut(&m.conn) {
            set.remove(&m.channel);
        }
    }
}

impl Message<DocDeliver> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: DocDeliver, _: &mut Context<Self, ()>) {
        let Some(chan) = self.docs.get(&m.channel) else {
            return;
        };
        let targets: Vec<ConnId> = chan
            .conns
            .keys()
            .copied()
            .filter(|c| Some(*c) != m.except)
            .collect();
        let mut delivered = 0u64;
        for conn in targets {
            if self.send(conn, &m.frame) {
                delivered += 1;
            }
        }
        self.metrics.fanout_deliveries.inc_by(delivered);
    }
}

impl Message<DocDrop> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: DocDrop, _: &mut Context<Self, ()>) {
        let registered_by = self.docs.get(&m.channel).map(|c| c.owner.clone());
        if m.owner.is_none() || registered_by == m.owner {
            self.drop_doc(&m.channel, &m.reason);
        }
    }
}

impl Message<CloseConn> for Hub {
    type Reply = ();
    async fn handle(&mut self, m: CloseConn, _: &mut Context<Self, ()>) {
        if let Some(sink) = self.conns.get(&m.conn) {
            sink.close(m.code, &m.reason);
        }
    }
}

// ---- from the document, wherever its clients are ----

impl Services {
    pub(crate) async fn hub_doc_join(&self, channel: &str, conn: &ConnAddr, yjs: bool) {
        if self.cluster.is_me(&conn.node) {
            let msg = DocJoin {
                channel: channel.to_string(),
                conn: conn.conn,
                owner: self.cluster.me().clone(),
                yjs,
            };
            let _ = self.hub.tell(msg).await;
        } else {
            let msg = PeerMsg::HubDocJoin {
                channel: channel.to_string(),
                conn: conn.conn,
                yjs,
            };
            self.send_peer(&conn.node, &msg).await;
        }
    }

    pub(crate) async fn hub_doc_leave(&self, channel: &str, conn: &ConnAddr) {
        if self.cluster.is_me(&conn.node) {
            let msg = DocLeave {
                channel: channel.to_string(),
                conn: conn.conn,
            };
            let _ = self.hub.tell(msg).await;
        } else {
            let msg = PeerMsg::HubDocLeave {
                channel: channel.to_string(),
                conn: conn.conn,
            };
            self.send_peer(&conn.node, &msg).await;
        }
    }

    /// One frame of a document for its clients on each of `nodes` (but
    /// `except`): the local hub gets the frame, each other node one copy.
    pub(crate) async fn doc_deliver<'a>(
        &self,
        channel: &str,
        nodes: impl Iterator<Item = &'a NodeId>,
        frame: Arc<SharedFrame>,
        except: Option<&ConnAddr>,
    ) {
        let mut encoded: Option<Bytes> = None;
        for node in nodes {
            let skip = except.filter(|c| c.node == *node).map(|c| c.conn);
            if self.cluster.is_me(node) {
                let msg = DocDeliver {
                    channel: channel.to_string(),
                    frame: frame.clone(),
                    except: skip,
                };
                let _ = self.hub.tell(msg).await;
                continue;
            }
            let ServerFrame::DocPush(push) = frame.frame() else {
                continue;
            };
            // Encoded once for every node; the origin's own id rides along.
            if encoded.is_none() {
                encoded = crate::remote::encode(&PeerMsg::HubDocDeliver {
                    channel: channel.to_string(),
                    push: push.clone(),
                    except: except.cloned(),
                });
            }
            let Some(bytes) = encoded.clone() else { return };
            self.cluster.metrics.remote_deliveries.inc();
            if let Err(f) = self.cluster.send(node, bytes).await {
                tracing::debug!(%node, channel, error = %f, "document delivery to node failed");
            }
        }
    }

    /// A y-protocols message for one `/doc` socket, ordered with the
    /// document's pushes to it.
    pub(crate) async fn send_yjs(&self, conn: &ConnAddr, bytes: Vec<u8>) {
        if self.cluster.is_me(&conn.node) {
            let msg = SendTo {
                conn: conn.conn,
                frame: yjs_frame(Bytes::from(bytes)),
            };
            let _ = self.hub.tell(msg).await;
        } else {
            let msg = PeerMsg::HubSendYjs {
                conn: conn.conn,
                bytes: serde_bytes::ByteBuf::from(bytes),
            };
            self.send_peer(&conn.node, &msg).await;
        }
    }

    /// Closes one connection, wherever it is, with `code`.
    pub(crate) async fn close_conn(&self, conn: &ConnAddr, code: u16, reason: &str) {
        if self.cluster.is_me(&conn.node) {
            let msg = CloseConn {
                conn: conn.conn,
                code,
                reason: reason.to_string(),
            };
            let _ = self.hub.tell(msg).await;
        } else {
            let msg = PeerMsg::HubCloseConn {
                conn: conn.conn,
                code,
                reason: reason.to_string(),
            };
            self.send_peer(&conn.node, &msg).await;
        }
    }

    /// Tells the clients of a document on `nodes` it is gone (stopped or deleted).
    pub(crate) async fn doc_dropped<'a>(
        &self,
        channel: &str,
        nodes: impl Iterator<Item = &'a NodeId>,
        reason: &str,
    ) {
        for node in nodes {
            if self.cluster.is_me(node) {
                let msg = DocDrop {
                    channel: channel.to_string(),
                    reason: reason.to_string(),
                    owner: None,
                };
                let _ = self.hub.tell(msg).await;
            } else {
                let msg = PeerMsg::HubDocDrop {
                    channel: channel.to_string(),
                    reason: reason.to_string(),
                };
                self.send_peer(node, &msg).await;
            }
        }
    }

    /// A peer's document message for this node's hub.
    pub(crate) async fn on_doc_peer_msg(&self, from: NodeId, msg: PeerMsg) {
        match msg {
            PeerMsg::HubDocJoin { channel, conn, yjs } => {
                let msg = DocJoin {
                    channel,
                    conn,
                    owner: from,
                    yjs,
                };
                let _ = self.hub.tell(msg).await;
            }
            PeerMsg::HubDocLeave { channel, conn } => {
                let _ = self.hub.tell(DocLeave { channel, conn }).await;
            }
            PeerMsg::HubDocDeliver {
                channel,
                push,
                except,
            } => {
                let except = except
                    .filter(|c| self.cluster.is_me(&c.node))
                    .map(|c| c.conn);
                let yjs = yjs_bytes(&push);
                let frame = Arc::new(SharedFrame::with_yjs(ServerFrame::DocPush(push), yjs));
                let _ = self
                    .hub
                    .tell(DocDeliver {
                        channel,
                        frame,
                        except,
                    })
                    .await;
            }
            PeerMsg::HubSendYjs { conn, bytes } => {
                let frame = yjs_frame(Bytes::from(bytes.into_vec()));
                let _ = self.hub.tell(SendTo { conn, frame }).await;
            }
            PeerMsg::HubCloseConn { conn, code, reason } => {
                let _ = self.hub.tell(CloseConn { conn, code, reason }).await;
            }
            PeerMsg::HubDocDrop { channel, reason } => {
                let msg = DocDrop {
                    channel,
                    reason,
                    owner: Some(from),
                };
                let _ = self.hub.tell(msg).await;
            }
            _ => {}
        }
    }
}
