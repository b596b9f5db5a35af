//! A document's group-committed writes: updates queue while one store
//! append is in flight; when it completes, everything queued meanwhile is
//! numbered `head+1..` and written as the next batch (one durable write per
//! batch, as a room's log does). Only a durable update is applied to the
//! document, acknowledged and broadcast ([`DocActor::on_written`]).
//!
//! Compaction runs in a task of its own, one at a time: the snapshot is the
//! document's state at its head when the compaction starts, so it covers
//! exactly the updates up to that seq; appends after it are untouched.

use std::time::Instant;

use chorus_protocol::ErrorCode;
use chorus_storage::{DocUpdate, ErrorKind, StorageError};
use kameo::actor::WeakActorRef;
use kameo::message::{Context, Message};
use tokio::sync::oneshot;

use super::DocActor;
use crate::hub::ConnAddr;
use crate::services::Replier;
use crate::Fail;

/// Most updates one append carries.
const MAX_BATCH: usize = 256;

/// An update waiting for, or in, a store append.
pub(super) struct Pending {
    pub update: Vec<u8>,
    /// The connection it came from: not sent back to it.
    pub origin: Option<ConnAddr>,
    pub replier: Replier,
    /// A `/doc` connection has no error frame: on failure it is closed.
    pub close_origin: bool,
}

pub(super) struct WriteResult {
    batch: Vec<Pending>,
    first_seq: u64,
    result: Result<(), StorageError>,
}

#[derive(Default)]
pub(super) struct Writes {
    pub queue: Vec<Pending>,
    /// Bytes queued or in flight (the size limit counts them).
    pub pending_bytes: u64,
    inflight: Option<oneshot::Receiver<WriteResult>>,
    /// A batch refused with a conflict is retried once after catching up.
    retried: bool,
}

impl Writes {
    pub fn is_idle(&self) -> bool {
        self.inflight.is_none() && self.queue.is_empty()
    }
}

/// Told to the document when its write has a result to collect.
pub(super) struct Written;

/// Told to the document when its compaction finished.
pub(super) struct Compacted {
    upto: u64,
    snapshot_bytes: u64,
    result: Result<(), StorageError>,
}

impl DocActor {
    /// Writes what is queued as one batch unless a write is in flight.
    pub(super) fn start_write(&mut self) {
        if self.writes.inflight.is_some() || self.writes.queue.is_empty() {
            return;
        }
        let take = self.writes.queue.len().min(MAX_BATCH);
        let batch: Vec<Pending> = self.writes.queue.drain(..take).collect();
        self.write_batch(batch, self.state.head() + 1);
    }

    fn write_batch(&mut self, batch: Vec<Pending>, first_seq: u64) {
        let updates: Vec<DocUpdate> = batch
            .iter()
            .enumerate()
            .map(|(i, p)| DocUpdate {
                seq: first_seq + i as u64,
                data: p.update.clone(),
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        self.writes.inflight = Some(rx);
        let store = self.svc.store.clone();
        let metrics = self.svc.metrics.clone();
        let name = self.name.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = store.doc_append(&name, &updates).await;
            metrics
                .docs
                .append_seconds
                .observe(started.elapsed().as_secs_f64());
            let _ = tx.send(WriteResult {
                batch,
                first_seq,
                result,
            });
            if let Some(me) = me.upgrade() {
                let _ = me.tell(Written).await;
            }
        });
    }

    /// Collects the in-flight write (if any): applies, acknowledges and
    /// broadcasts each durable update in seq order, or fails them.
    pub(super) async fn collect_write(&mut self) {
        let Some(rx) = self.writes.inflight.take() else {
            return;
        };
        let Ok(w) = rx.await else {
            tracing::error!(doc = %self.name, "a document write task ended without a result");
            return;
        };
        let bytes: u64 = w.batch.iter().map(|p| p.update.len() as u64).sum();
        match w.result {
            Ok(()) => {
                self.writes.retried = false;
                self.writes.pending_bytes = self.writes.pending_bytes.saturating_sub(bytes);
                self.on_written(w.first_seq, w.batch).await;
            }
            Err(e) if e.kind == ErrorKind::Conflict && !self.writes.retried => {
                // Another node wrote here (views disagreed): take what it
                // stored (a CRDT merge) and write ours after it.
                self.writes.retried = true;
                match self.svc.store.doc_load(&self.name).await {
                    Ok(Some(record)) => {
                        if let Err(bad) = self.state.catch_up(&record) {
                            tracing::error!(doc = %self.name, error = %bad, "stored update does not decode");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(doc = %self.name, error = %e, "reloading after a conflict failed")
                    }
                }
                let next = self.state.head() + 1;
                self.write_batch(w.batch, next);
                return;
            }
            Err(e) => {
                self.writes.retried = false;
                self.writes.pending_bytes = self.writes.pending_bytes.saturating_sub(bytes);
                let fail = Fail::from(e);
                for p in w.batch {
                    self.refuse(p, fail.clone()).await;
                }
            }
        }
        self.start_write();
        self.maybe_compact();
    }

    /// Answers a pending update with `fail`; a `/doc` origin is closed.
    pub(super) async fn refuse(&self, p: Pending, fail: Fail) {
        self.svc.metrics.docs.refused.inc();
        if p.close_origin {
            if let Some(origin) = &p.origin {
                let code = super::close_code(fail.code);
                self.svc.close_conn(origin, code, &fail.message).await;
            }
        }
        p.replier.send(&self.svc, Err(fail)).await;
    }

    /// Starts a compaction if the tail is long enough and none runs.
    pub(super) fn maybe_compact(&mut self) {
        let cfg = &self.svc.config.docs;
        if self.compacting
            || self.state.head() == 0
            || !self
                .state
                .wants_compaction(cfg.compact_every_updates, cfg.compact_every_bytes)
        {
            return;
        }
        self.compacting = true;
        let upto = self.state.head();
        let snapshot = self.state.encode_state();
        let store = self.svc.store.clone();
        let name = self.name.clone();
        let me: WeakActorRef<DocActor> = self.me.clone();
        tokio::spawn(async move {
            let snapshot_bytes = snapshot.len() as u64;
            let result = store.doc_compact(&name, upto, &snapshot).await;
            if let Some(me) = me.upgrade() {
                let _ = me
                    .tell(Compacted {
                        upto,
                        snapshot_bytes,
                        result,
                    })
                    .await;
            }
        });
    }

    /// Whether a write or a compaction still runs.
    pub(super) fn is_busy(&self) -> bool {
        !self.writes.is_idle() || self.compacting
    }

    /// Queues an update after checking the limits; refuses it (with its
    /// code) when it breaks one.
    pub(super) async fn enqueue(&mut self, p: Pending) {
        match self.check(&p.update) {
            Ok(()) => {
                self.writes.pending_bytes += p.update.len() as u64;
                self.writes.queue.push(p);
                self.start_write();
            }
            Err(fail) => self.refuse(p, fail).await,
        }
    }

    fn check(&self, update: &[u8]) -> Result<(), Fail> {
        let cfg = &self.svc.config.docs;
        let len = update.len() as u64;
        if update.len() > cfg.max_update_bytes {
            let why = format!(
                "update of {len} bytes over the {} byte limit",
                cfg.max_update_bytes
            );
            return Err(Fail::new(ErrorCode::UpdateTooLarge, why));
        }
        if self.state.stored_bytes() + self.writes.pending_bytes + len > cfg.max_doc_bytes {
            let why = format!("the document would exceed {} bytes", cfg.max_doc_bytes);
            return Err(Fail::new(ErrorCode::DocTooLarge, why));
        }
        super::state::check_update(update)
            .map_err(|e| Fail::new(ErrorCode::InvalidUpdate, e.to_string()))
    }
}

impl Message<Written> for DocActor {
    type Reply = ();
    async fn handle(&mut self, _: Written, _: &mut Context<Self, ()>) {
        self.collect_write().await;
    }
}

impl Message<Compacted> for DocActor {
    type Reply = ();
    async fn handle(&mut self, m: Compacted, _: &mut Context<Self, ()>) {
        self.compacting = false;
        match m.result {
            Ok(()) => {
                self.svc.metrics.docs.compactions.inc();
                self.state.compacted(m.upto, m.snapshot_bytes);
            }
            Err(e) => {
                tracing::warn!(doc = %self.name, error = %e, "compaction failed; the log stays as it is")
            }
        }
        self.maybe_compact();
    }
}
