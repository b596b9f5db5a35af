//! A connection's outbound queue: the hub and the node's actors push shared
//! frames into its bounded [`ConnSink`]; the connection's writer drains the
//! [`ConnOutbox`]. A close request (code and reason) travels beside it and is
//! observed with [`CloseWatch`].

use std::sync::Arc;

use chorus_protocol::{close, SharedFrame};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
