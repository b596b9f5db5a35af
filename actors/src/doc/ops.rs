//! What clients' connections send a document: open it, sync (y-protocols
//! step 1), updates, awareness, leave. `/doc` sockets and Chorus sockets
//! send the same messages; the document answers each kind its own way
//! (y-protocols bytes through the hub, or Chorus replies).

use std::time::Instant;

use chorus_protocol::doc::{Bin, DocEvent, DocOpened, DocReply};
use chorus_protocol::{ErrorCode, ServerFrame, SharedFrame};
use kameo::message::{Context, Message};
use serde::{Deserialize, Serialize};
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::updates::encoder::Encode;

use super::writes::Pending;
use super::{state, DocActor};
use crate::hub::ConnAddr;
use crate::placement::moves::NodeGone;
use crate::services::Replier;
use crate::Fail;

/// A connection opens the document. A `/doc` socket is sent the server's
/// sync step 1 and the awareness states; a Chorus socket's request `req_id`
/// is answered with the state (or the diff against `state_vector`).
#[derive(Serialize, Deserialize)]
pub struct DocOpen {
    pub conn: ConnAddr,
    pub yjs: bool,
    pub read_only: bool,
    pub req_id: u64,
    pub state_vector: Option<Vec<u8>>,
}

/// A `/doc` socket's sync step 1: it is answered step 2 (what it lacks).
#[derive(Serialize, Deserialize)]
pub struct DocSync {
    pub conn: ConnAddr,
    pub state_vector: Vec<u8>,
}

/// An update to make durable and broadcast (from a client, or the server API
/// with `origin: None`). `replier` gets `{doc, seq}` once durable.
#[derive(Serialize, Deserialize)]
pub struct DocApply {
    pub origin: Option<ConnAddr>,
    pub update: Vec<u8>,
    pub replier: Replier,
    /// A `/doc` origin is closed (with the error's close code) on failure.
    pub close_origin: bool,
}

/// An awareness update from `conn` (ephemeral).
#[derive(Serialize, Deserialize)]
pub struct DocAwareness {
    pub conn: ConnAddr,
    pub update: Vec<u8>,
    pub replier: Replier,
    pub close_origin: bool,
}

/// A `/doc` socket asks for every awareness state.
#[derive(Serialize, Deserialize)]
pub struct DocQueryAwareness {
    pub conn: ConnAddr,
}

/// A connection closes the document (or is gone); its awareness states go.
#[derive(Serialize, Deserialize)]
pub struct DocLeave {
    pub conn: ConnAddr,
    pub replier: Replier,
}

/// A member is down or restarted: its connections are gone.
#[derive(Clone)]
pub struct DocNodeGone(pub NodeGone);

/// A y-protocols message as bytes.
pub(crate) fn ymsg(m: &YMessage) -> Vec<u8> {
    m.encode_v1()
}

impl Message<DocOpen> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: DocOpen, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let sv = match m.state_vector.as_deref().map(state::decode_state_vector) {
            Some(Ok(sv)) => Some(sv),
            Some(Err(e)) => {
                let fail = Fail::new(ErrorCode::InvalidUpdate, e.to_string());
                Replier::Conn {
                    conn: m.conn,
                    id: m.req_id,
                }
                .send(&self.svc, Err(fail))
                .await;
                return;
            }
            None => None,
        };
        self.add_sub(m.conn.clone());
        self.svc.hub_doc_join(&self.channel, &m.conn, m.yjs).await;
        if m.yjs {
            let step1 = YMessage::Sync(SyncMessage::SyncStep1(self.state.state_vector()));
            self.svc.send_yjs(&m.conn, ymsg(&step1)).await;
            if let Some(states) = self.awareness.full() {
                self.svc
                    .send_yjs(&m.conn, super::fanout::awareness_message(&states))
                    .await;
            }
            return;
        }
        let update = match &sv {
            Some(sv) => self.state.diff(sv),
            None => self.state.encode_state(),
        };
        let ok = DocOpened {
            doc: self.name.clone(),
            update: Bin(update),
            state_vector: Bin(state::encode_state_vector(&self.state.state_vector())),
            awareness: Bin(self.awareness.full_or_empty()),
            read_only: m.read_only,
        };
        let frame = ServerFrame::DocReply(DocReply { id: m.req_id, ok });
        self.svc
            .send_to(&m.conn, std::sync::Arc::new(SharedFrame::new(frame)))
            .await;
    }
}

impl Message<DocSync> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: DocSync, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        match state::decode_state_vector(&m.state_vector) {
            Ok(sv) => {
                let step2 = YMessage::Sync(SyncMessage::SyncStep2(self.state.diff(&sv)));
                self.svc.send_yjs(&m.conn, ymsg(&step2)).await;
            }
            Err(e) => {
                self.svc
                    .close_conn(&m.conn, chorus_protocol::close::DOC_INVALID, &e.to_string())
                    .await
            }
        }
    }
}

impl Message<DocApply> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: DocApply, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        if let Some(origin) = &m.origin {
            if !self.subs.contains(origin) {
                let fail = Fail::new(ErrorCode::DocNotOpen, "open the document first (doc.open)");
                m.replier.send(&self.svc, Err(fail)).await;
                return;
            }
        }
        let p = Pending {
            update: m.update,
            origin: m.origin,
            replier: m.replier,
            close_origin: m.close_origin,
        };
        self.enqueue(p).await;
    }
}

impl Message<DocAwareness> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: DocAwareness, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        if !self.subs.contains(&m.conn) {
            let fail = Fail::new(ErrorCode::DocNotOpen, "open the document first (doc.open)");
            m.replier.send(&self.svc, Err(fail)).await;
            return;
        }
        match self.awareness.apply(&m.conn, &m.update) {
            Ok(changed) => {
                self.svc.metrics.docs.awareness_updates.inc();
                if let Some(bytes) = changed {
                    self.broadcast(DocEvent::Awareness, bytes, Some(&m.conn))
                        .await;
                }
                let ok = serde_json::json!({"doc": self.name});
                m.replier.send(&self.svc, Ok(ok)).await;
            }
            Err(e) => {
                let fail = Fail::new(ErrorCode::InvalidUpdate, e.to_string());
                if m.close_origin {
                    let code = super::close_code(fail.code);
                    self.svc.close_conn(&m.conn, code, &fail.message).await;
                }
                m.replier.send(&self.svc, Err(fail)).await;
            }
        }
    }
}

impl Message<DocQueryAwareness> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: DocQueryAwareness, _: &mut Context<Self, ()>) {
        let bytes = self.awareness.full_or_empty();
        self.svc
            .send_yjs(&m.conn, super::fanout::awareness_message(&bytes))
            .await;
    }
}

impl DocActor {
    /// `conn` is gone: its awareness states are removed and the others told.
    async fn forget(&mut self, conn: &ConnAddr) {
        if let Some(removal) = self.awareness.remove_conn(conn) {
            self.broadcast(DocEvent::Awareness, removal, Some(conn))
                .await;
        }
    }
}

impl Message<DocLeave> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: DocLeave, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let was_open = self.remove_sub(&m.conn);
        self.forget(&m.conn).await;
        if was_open {
            self.svc.hub_doc_leave(&self.channel, &m.conn).await;
        }
        let ok = serde_json::json!({"doc": self.name});
        m.replier.send(&self.svc, Ok(ok)).await;
    }
}

impl Message<DocNodeGone> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: DocNodeGone, _: &mut Context<Self, ()>) {
        let gone: Vec<ConnAddr> = self
            .subs
            .iter()
            .filter(|c| m.0.covers(c))
            .cloned()
            .collect();
        for conn in gone {
            self.remove_sub(&conn);
            self.forget(&conn).await;
        }
    }
}
