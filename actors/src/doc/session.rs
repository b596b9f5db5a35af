//! A `/doc` socket: a stock y-websocket client on one document.
//!
//! The node's reader hands each binary frame to [`DocSession::on_frame`],
//! in order; the session decodes it as a y-protocols message (with `yrs`)
//! and tells the document:
//!
//! | message | what happens |
//! |---|---|
//! | sync step 1 | the document answers step 2 (what the client lacks) |
//! | sync step 2, update | made durable, then broadcast to the other clients |
//! | awareness | applied and broadcast (not stored) |
//! | query awareness | the document sends every awareness state |
//! | auth, custom | ignored |
//!
//! On open the document sends its own step 1 and the awareness states, as
//! the reference server does. y-websocket has no error frame, so:
//! a read-only token's updates are dropped and answered with a y-protocols
//! permission-denied message (once per connection; it stays open and keeps
//! receiving updates); every other refusal closes the socket with its code
//! (`chorus_protocol::close::DOC_*`), after which y-websocket reconnects and
//! the sync repairs what was lost.

use std::sync::Arc;
use std::time::Instant;

use chorus_protocol::{close, ErrorCode};
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

use super::{DocActor, DocApply, DocAwareness, DocLeave, DocOpen, DocQueryAwareness, DocSync};
use crate::hub::{ConnAddr, ConnSink, PushError, Register, Unregister};
use crate::services::{Replier, Services};
use crate::{Claims, Fail};

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: u32, burst: u32) -> Bucket {
        let burst = f64::from(burst.max(1));
        Bucket {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a `/doc` socket is closed: a code from `chorus_protocol::close` and a reason.
pub type CloseWith = (u16, String);

pub struct DocSession {
    svc: Arc<Services>,
    doc: String,
    addr: ConnAddr,
    read_only: bool,
    limiter: Bucket,
    sink: ConnSink,
    told_read_only: bool,
}

impl DocSession {
    /// Registers the socket with this node's hub and opens `doc` for it.
    /// The caller checked that `claims` may open it.
    pub async fn start(
        svc: Arc<Services>,
        doc: String,
        claims: &Claims,
        sink: ConnSink,
    ) -> Result<DocSession, Fail> {
        let id = svc.next_conn_id();
        let addr = ConnAddr {
            node: svc.cluster.me().clone(),
            conn: id,
        };
        svc.hub
            .tell(Register {
                conn: id,
                user: claims.user.clone(),
                sink: sink.clone(),
            })
            .await
            .map_err(|_| Fail::new(ErrorCode::ShuttingDown, "node is shutting down"))?;
        let read_only = !claims.may_write_doc(&doc);
        let open = DocOpen {
            conn: addr.clone(),
            yjs: true,
            read_only,
            req_id: 0,
            state_vector: None,
        };
        if let Err(f) = svc.tell::<DocActor, _>(&doc, open).await {
            let _ = svc.hub.tell(Unregister { conn: id }).await;
            return Err(f);
        }
        svc.metrics.docs.connections.inc();
        let docs = &svc.config.docs;
        let limiter = Bucket::new(docs.updates_per_sec, docs.updates_burst);
        Ok(DocSession {
            svc,
            doc,
            addr,
            read_only,
            limiter,
            sink,
            told_read_only: false,
        })
    }

    /// Handles one binary frame; `Err` says how to close the socket.
    pub async fn on_frame(&mut self, bytes: &[u8]) -> Result<(), CloseWith> {
        let msg = YMessage::decode_v1(bytes).map_err(|e| {
            self.svc.metrics.error(ErrorCode::InvalidUpdate);
            (
                close::DOC_INVALID,
                format!("not a y-protocols message: {e}"),
            )
        })?;
        let svc = self.svc.clone();
        let conn = self.addr.clone();
        let sent = match msg {
            YMessage::Sync(SyncMessage::SyncStep1(sv)) => {
                let m = DocSync {
                    conn,
                    state_vector: sv.encode_v1(),
                };
                svc.tell::<DocActor, _>(&self.doc, m).await
            }
            YMessage::Sync(SyncMessage::SyncStep2(update))
            | YMessage::Sync(SyncMessage::Update(update)) => return self.update(update).await,
            YMessage::Awareness(update) => {
                let m = DocAwareness {
                    conn,
                    update: update.encode_v1(),
                    replier: Replier::None,
                    close_origin: true,
                };
                svc.tell::<DocActor, _>(&self.doc, m).await
            }
            YMessage::AwarenessQuery => {
                svc.tell::<DocActor, _>(&self.doc, DocQueryAwareness { conn })
                    .await
            }
            YMessage::Auth(_) | YMessage::Custom(..) => Ok(()),
        };
        sent.map_err(|f| (close::DOC_RECONNECT, f.message))
    }

    async fn update(&mut self, update: Vec<u8>) -> Result<(), CloseWith> {
        if self.read_only {
            self.svc.metrics.docs.refused.inc();
            self.svc.metrics.error(ErrorCode::DocReadOnly);
            if !self.told_read_only {
                self.told_read_only = true;
                let denied = super::fanout::denied_message(
                    "read-only: this token may not write this document",
                );
                let frame = super::fanout::yjs_frame(denied.into());
                if let Err(PushError::Full) = self.sink.push(frame) {
                    return Err((
                        close::SLOW_CONSUMER,
                        "slow consumer: outbound queue full".into(),
                    ));
                }
            }
            return Ok(());
        }
        // An empty sync step 2 (nothing the server lacks) is no update.
        if update.len() <= 2 && update.iter().all(|b| *b == 0) {
            return Ok(());
        }
        if update.len() > self.svc.config.docs.max_update_bytes {
            self.svc.metrics.docs.refused.inc();
            self.svc.metrics.error(ErrorCode::UpdateTooLarge);
            return Err((
                close::DOC_UPDATE_TOO_LARGE,
                format!(
                    "update over {} bytes",
                    self.svc.config.docs.max_update_bytes
                ),
            ));
        }
        if !self.limiter.allow() {
            self.svc.metrics.docs.refused.inc();
            self.svc.metrics.error(ErrorCode::DocRateLimited);
            return Err((close::DOC_RATE_LIMITED, "too many document updates".into()));
        }
        let m = DocApply {
            origin: Some(self.addr.clone()),
            update,
            replier: Replier::None,
            close_origin: true,
        };
        self.svc
            .tell::<DocActor, _>(&self.doc, m)
            .await
            .map_err(|f| (close::DOC_RECONNECT, f.message))
    }

    /// The socket ended: the document forgets it (and its awareness states).
    pub async fn end(self) {
        self.svc.metrics.docs.connections.dec();
        let _ = self
            .svc
            .tell_if_active::<DocActor, _>(
                &self.doc,
                DocLeave {
                    conn: self.addr.clone(),
                    replier: Replier::None,
                },
            )
            .await;
        let _ = self
            .svc
            .hub
            .tell(Unregister {
                conn: self.addr.conn,
            })
            .await;
    }
}
