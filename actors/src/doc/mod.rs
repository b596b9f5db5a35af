//! Collaborative documents: one actor per document, a virtual actor keyed
//! by its name behind the placement layer (owner: the HRW winner of
//! `doc:<name>`), holding a `yrs` document.
//!
//! ```text
//!  /doc socket ─▶ DocSession ─┐                   ┌─▶ Hub (per node) ─▶ /doc sockets: y-protocols bytes
//!                             ├─tell─▶ DocActor ──┤   one copy per node, the frame encoded once
//!  /ws socket  ─▶ ConnActor ──┘   (placement)     └─▶ Hub ─▶ Chorus sockets: doc.update / doc.awareness pushes
//! ```
//!
//! - [`state`]: the CRDT state (yrs), load from snapshot plus tail, JSON of roots.
//! - [`writes`]: group-committed appends; an update is applied, acknowledged
//!   and broadcast only once durable; compaction into snapshots.
//! - [`awareness`]: ephemeral awareness, each state owned by the connection
//!   that set it and removed when that connection leaves.
//! - [`ops`]: the messages clients' connections send (open, sync, update,
//!   awareness, leave); [`api`]: the server API's (create, read, delete).
//! - [`session`]: a `/doc` (y-websocket) connection's protocol handling.
//! - [`fanout`]: the hub's side: which local connections have which
//!   document open, and the peer messages that carry a document's frames.
//!
//! A document that stops (idle, ownership moved, shutdown) first writes and
//! acknowledges what is queued. If clients still have it open (hand-over,
//! shutdown) their hubs close `/doc` sockets with 4014 and tell Chorus
//! sockets `doc.closed`: they reconnect (y-websocket does by itself) and
//! sync with the new owner, which loaded the same state from the store.

pub mod api;
pub mod awareness;
mod client;
pub mod fanout;
pub mod ops;
pub mod session;
pub mod state;
mod writes;

pub use api::{DocCreate, DocDelete, DocRead, DocSnapshot};
pub use ops::{DocApply, DocAwareness, DocLeave, DocNodeGone, DocOpen, DocQueryAwareness, DocSync};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_protocol::doc::{doc_channel, DocEvent, DocPush};
use chorus_protocol::{close, ErrorCode, ServerFrame, SharedFrame};
use chorus_storage::StorageError;
use kameo::actor::{ActorRef, Spawn, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::mailbox;
use kameo::message::{Context, Message};
use kameo::Actor;

use crate::hub::ConnAddr;
use crate::placement::{ActorKind, NodeId, Placed, Registry};
use crate::services::Services;

pub struct DocActor {
    svc: Arc<Services>,
    /// The document's name (`notes-42`).
    name: String,
    /// `doc:<name>`: the hub's channel for it.
    channel: String,
    me: WeakActorRef<DocActor>,
    state: state::DocState,
    awareness: awareness::DocAwareness,
    /// The connections (anywhere) that have it open.
    subs: HashSet<ConnAddr>,
    /// How many subscribers each node has: a frame leaves once per node.
    node_subs: HashMap<NodeId, usize>,
    writes: writes::Writes,
    compacting: bool,
    last_used: Instant,
}

impl Actor for DocActor {
    type Args = (Arc<Services>, String);
    type Error = StorageError;

    async fn on_start((svc, name): Self::Args, me: ActorRef<Self>) -> Result<Self, StorageError> {
        let started = Instant::now();
        let record = svc.store.doc_load(&name).await?;
        let state = match &record {
            Some(r) => state::DocState::load(r)
                .map_err(|e| StorageError::corrupt(format!("document {name}: {e}")))?,
            None => state::DocState::default(),
        };
        svc.metrics
            .docs
            .load_seconds
            .observe(started.elapsed().as_secs_f64());
        svc.metrics.docs.active.inc();
        let every = svc.docs_passivate_after().min(Duration::from_secs(1));
        svc.timers.tell_after(&me, IdleCheck, every);
        let mut actor = DocActor {
            channel: doc_channel(&name),
            svc,
            name,
            me: me.downgrade(),
            state,
            awareness: awareness::DocAwareness::default(),
            subs: HashSet::new(),
            node_subs: HashMap::new(),
            writes: writes::Writes::default(),
            compacting: false,
            last_used: Instant::now(),
        };
        // A long tail (compaction never ran, or the node stopped before it
        // did): compact now, so the next load is one snapshot.
        actor.maybe_compact();
        Ok(actor)
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> Result<(), StorageError> {
        // Nothing that reached the document goes unanswered.
        while !self.writes.is_idle() {
            self.collect_write().await;
            self.start_write();
        }
        if !self.subs.is_empty() {
            let nodes: Vec<NodeId> = self.node_subs.keys().cloned().collect();
            self.svc
                .doc_dropped(&self.channel, nodes.iter(), "moved")
                .await;
        }
        self.svc.metrics.docs.active.dec();
        Ok(())
    }
}

impl Placed for DocActor {
    const KIND: ActorKind = ActorKind::Doc;
    fn registry(svc: &Services) -> &Registry<Self> {
        &svc.docs
    }
    fn spawn(svc: &Arc<Services>, key: &str) -> ActorRef<Self> {
        DocActor::spawn_with_mailbox(
            (svc.clone(), key.to_string()),
            mailbox::bounded(svc.config.mailbox),
        )
    }
}

/// The close code a `/doc` socket gets for an error its update met.
pub(crate) fn close_code(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::InvalidUpdate => close::DOC_INVALID,
        ErrorCode::UpdateTooLarge => close::DOC_UPDATE_TOO_LARGE,
        ErrorCode::DocTooLarge => close::DOC_TOO_LARGE,
        ErrorCode::DocRateLimited => close::DOC_RATE_LIMITED,
        _ => close::DOC_RECONNECT,
    }
}

impl DocActor {
    fn add_sub(&mut self, conn: ConnAddr) -> bool {
        let node = conn.node.clone();
        if self.subs.insert(conn) {
            *self.node_subs.entry(node).or_insert(0) += 1;
            return true;
        }
        false
    }

    fn remove_sub(&mut self, conn: &ConnAddr) -> bool {
        if !self.subs.remove(conn) {
            return false;
        }
        if let Some(n) = self.node_subs.get_mut(&conn.node) {
            *n -= 1;
            if *n == 0 {
                self.node_subs.remove(&conn.node);
            }
        }
        true
    }

    /// One frame for every subscriber but `except`: once per node.
    async fn broadcast(&self, event: DocEvent, bytes: Vec<u8>, except: Option<&ConnAddr>) {
        let others = self.subs.len() - usize::from(except.is_some_and(|c| self.subs.contains(c)));
        if others == 0 {
            return;
        }
        let push = DocPush::new(event, &self.name, bytes);
        let yjs = fanout::yjs_bytes(&push);
        let frame = Arc::new(SharedFrame::with_yjs(ServerFrame::DocPush(push), yjs));
        self.svc
            .doc_deliver(&self.channel, self.node_subs.keys(), frame, except)
            .await;
    }

    /// Durable updates, in seq order: applied, acknowledged, broadcast.
    async fn on_written(&mut self, first_seq: u64, batch: Vec<writes::Pending>) {
        for (i, p) in batch.into_iter().enumerate() {
            let seq = first_seq + i as u64;
            if let Err(e) = self.state.apply(seq, &p.update) {
                // Checked before it was queued; a failure here is a yrs bug.
                tracing::error!(doc = %self.name, seq, error = %e, "durable update did not apply");
            }
            self.svc.metrics.docs.updates.inc();
            self.svc
                .metrics
                .docs
                .update_bytes
                .inc_by(p.update.len() as u64);
            let ack = serde_json::json!({"doc": self.name, "seq": seq});
            p.replier.send(&self.svc, Ok(ack)).await;
            self.broadcast(DocEvent::Update, p.update, p.origin.as_ref())
                .await;
        }
    }
}

struct IdleCheck;

impl Message<IdleCheck> for DocActor {
    type Reply = ();
    async fn handle(&mut self, _: IdleCheck, ctx: &mut Context<Self, ()>) {
        let after = self.svc.docs_passivate_after();
        let idle = self.subs.is_empty() && !self.is_busy() && self.last_used.elapsed() >= after;
        if idle {
            self.svc.passivate(&self.name, ctx.actor_ref());
        } else {
            self.svc.timers.tell_after(
                ctx.actor_ref(),
                IdleCheck,
                after.min(Duration::from_secs(1)),
            );
        }
    }
}
