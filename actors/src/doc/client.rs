//! `doc.*` requests on the Chorus socket, as the connection actor handles
//! them: checks against the token's `docs` and `doc_write` claims and the
//! limits, then a message to the document, which answers through the hub.

use chorus_protocol::{valid_id, ErrorCode, Request};
use serde_json::Value;

use super::{DocActor, DocApply, DocAwareness, DocLeave, DocOpen};
use crate::conn::ConnActor;
use crate::services::Replier;
use crate::Fail;

impl ConnActor {
    fn check_doc(&self, doc: &str) -> Result<(), Fail> {
        if !valid_id(doc) {
            return Err(Fail::new(ErrorCode::InvalidValue, "invalid document name"));
        }
        if !self.claims.may_open_doc(doc) {
            return Err(Fail::new(
                ErrorCode::Forbidden,
                "your token does not allow this document",
            ));
        }
        Ok(())
    }

    fn replier(&self, id: u64) -> Replier {
        Replier::Conn {
            conn: self.addr.clone(),
            id,
        }
    }

    /// Handles a `doc.*` request. `None`: the document sends the reply.
    pub(crate) async fn doc_request(
        &mut self,
        id: u64,
        req: Request,
    ) -> Option<Result<Value, Fail>> {
        let svc = self.svc.clone();
        let r = match req {
            Request::DocOpen(a) => {
                if let Err(f) = self.check_doc(&a.doc) {
                    return Some(Err(f));
                }
                self.docs.insert(a.doc.clone());
                let msg = DocOpen {
                    conn: self.addr.clone(),
                    yjs: false,
                    read_only: !self.claims.may_write_doc(&a.doc),
                    req_id: id,
                    state_vector: a.state_vector.map(|b| b.0),
                };
                svc.tell::<DocActor, _>(&a.doc, msg).await
            }
            Request::DocUpdate(a) => {
                if let Err(f) = self.check_doc(&a.doc) {
                    return Some(Err(f));
                }
                if !self.claims.may_write_doc(&a.doc) {
                    svc.metrics.docs.refused.inc();
                    return Some(Err(Fail::new(
                        ErrorCode::DocReadOnly,
                        "your token may read this document but not write it",
                    )));
                }
                let max = svc.config.docs.max_update_bytes;
                if a.update.0.len() > max {
                    svc.metrics.docs.refused.inc();
                    return Some(Err(Fail::new(
                        ErrorCode::UpdateTooLarge,
                        format!(
                            "update of {} bytes over the {max} byte limit",
                            a.update.0.len()
                        ),
                    )));
                }
                if !self.doc_limiter.allow() {
                    svc.metrics.docs.refused.inc();
                    return Some(Err(Fail::new(
                        ErrorCode::DocRateLimited,
                        "too many document updates, slow down",
                    )));
                }
                let msg = DocApply {
                    origin: Some(self.addr.clone()),
                    update: a.update.0,
                    replier: self.replier(id),
                    close_origin: false,
                };
                svc.tell::<DocActor, _>(&a.doc, msg).await
            }
            Request::DocAwareness(a) => {
                if let Err(f) = self.check_doc(&a.doc) {
                    return Some(Err(f));
                }
                let msg = DocAwareness {
                    conn: self.addr.clone(),
                    update: a.update.0,
                    replier: self.replier(id),
                    close_origin: false,
                };
                svc.tell::<DocActor, _>(&a.doc, msg).await
            }
            Request::DocClose(a) => {
                if !self.docs.remove(&a.doc) {
                    return Some(Err(Fail::new(
                        ErrorCode::DocNotOpen,
                        "this connection has not opened that document",
                    )));
                }
                let msg = DocLeave {
                    conn: self.addr.clone(),
                    replier: self.replier(id),
                };
                svc.tell::<DocActor, _>(&a.doc, msg).await
            }
            _ => return None,
        };
        match r {
            Ok(()) => None,
            Err(f) => Some(Err(f)),
        }
    }

    /// The connection ended: every document it had open forgets it.
    pub(crate) async fn close_docs(&mut self) {
        for doc in std::mem::take(&mut self.docs) {
            let msg = DocLeave {
                conn: self.addr.clone(),
                replier: Replier::None,
            };
            let _ = self.svc.tell_if_active::<DocActor, _>(&doc, msg).await;
        }
    }
}
