//! What the server API asks a document: create it from an initial state,
//! read its state, delete it. (Applying an update from the app's backend is
//! a [`super::DocApply`] with no origin.)

use std::time::Instant;

use chorus_protocol::ErrorCode;
use kameo::message::{Context, Message};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::writes::Pending;
use super::{state, DocActor};
use crate::services::Replier;
use crate::Fail;

/// Creates the document with `initial` (a Yjs update; empty: an empty
/// document) as its first update. `doc_exists` (3015) if it has any.
#[derive(Serialize, Deserialize)]
pub struct DocCreate {
    pub initial: Vec<u8>,
    pub replier: Replier,
}

/// The document's committed state. `doc_not_found` (3011) if it has none.
#[derive(Serialize, Deserialize)]
pub struct DocRead;

/// What [`DocRead`] answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DocSnapshot {
    /// The whole state as one Yjs update.
    pub update: Vec<u8>,
    pub state_vector: Vec<u8>,
    /// The seq of the last durable update.
    pub seq: u64,
    /// The seq the stored snapshot covers (0: never compacted).
    pub snapshot_seq: u64,
    /// Updates stored after the snapshot.
    pub tail: usize,
    /// Bytes stored (snapshot plus tail).
    pub stored_bytes: u64,
    /// Every root as JSON (see `DocState::to_json`).
    pub json: Value,
    /// Connections that have it open, anywhere.
    pub clients: usize,
}

/// Deletes the document: its log and snapshot; open clients are told
/// (`/doc` sockets closed with 4014, Chorus sockets `doc.closed`).
#[derive(Serialize, Deserialize)]
pub struct DocDelete {
    pub replier: Replier,
}

/// The empty document as an update: no structs, no deletions.
const EMPTY_UPDATE: [u8; 2] = [0, 0];

impl Message<DocCreate> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: DocCreate, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        if self.state.head() > 0 || !self.writes.is_idle() {
            let fail = Fail::new(ErrorCode::DocExists, "the document already exists");
            m.replier.send(&self.svc, Err(fail)).await;
            return;
        }
        let update = if m.initial.is_empty() {
            EMPTY_UPDATE.to_vec()
        } else {
            m.initial
        };
        let p = Pending {
            update,
            origin: None,
            replier: m.replier,
            close_origin: false,
        };
        self.enqueue(p).await;
    }
}

impl Message<DocRead> for DocActor {
    type Reply = Result<DocSnapshot, Fail>;
    async fn handle(&mut self, _: DocRead, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.last_used = Instant::now();
        if self.state.head() == 0 {
            return Err(Fail::new(ErrorCode::DocNotFound, "no such document"));
        }
        Ok(DocSnapshot {
            update: self.state.encode_state(),
            state_vector: state::encode_state_vector(&self.state.state_vector()),
            seq: self.state.head(),
            snapshot_seq: self.state.snapshot_seq(),
            tail: self.state.tail_len(),
            stored_bytes: self.state.stored_bytes(),
            json: self.state.to_json(),
            clients: self.subs.len(),
        })
    }
}

impl Message<DocDelete> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: DocDelete, ctx: &mut Context<Self, ()>) {
        // Writes in flight finish first: a delete is not overtaken by them.
        while !self.writes.is_idle() {
            self.collect_write().await;
            self.start_write();
        }
        let result = match self.svc.store.doc_delete(&self.name).await {
            Ok(true) => Ok(serde_json::json!({"doc": self.name, "deleted": true})),
            Ok(false) => Err(Fail::new(ErrorCode::DocNotFound, "no such document")),
            Err(e) => Err(Fail::from(e)),
        };
        if result.is_ok() {
            let nodes: Vec<_> = self.node_subs.keys().cloned().collect();
            self.svc
                .doc_dropped(&self.channel, nodes.iter(), "deleted")
                .await;
            self.subs.clear();
            self.node_subs.clear();
            self.state = state::DocState::default();
            self.awareness = super::awareness::DocAwareness::default();
            // A fresh activation starts from the (now empty) store.
            self.svc.passivate(&self.name, ctx.actor_ref());
        }
        m.replier.send(&self.svc, result).await;
    }
}
