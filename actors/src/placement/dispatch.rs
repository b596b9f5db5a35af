//! Sending to the actor of a key, wherever its owner is.
//!
//! A key owned by this node (in its view) is a local kameo tell or ask,
//! activating the actor if needed and retrying on a fresh activation when
//! the one found was stopping; a key owned elsewhere goes to the owner over
//! the peer link ([`crate::remote`]), and its reply comes back the same way.
//! The `_if_active` calls never activate: they reach an actor only if it is
//! running at its owner (unsubscribes, unwatches: nothing to undo otherwise).

use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::ErrorCode;
use kameo::actor::ActorRef;
use kameo::error::SendError;
use kameo::message::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::registry::stop_later;
use super::Placed;
use crate::remote::Wire;
use crate::services::Services;
use crate::Fail;

/// How often a message is retried against a fresh activation.
const ACTIVATION_RETRIES: usize = 5;

impl Services {
    /// The running actor of `key` here, activated if needed.
    pub fn activate<A: Placed>(self: &Arc<Self>, key: &str) -> ActorRef<A> {
        A::registry(self).get_or_spawn(key, || {
            let _guard = self.runtime().enter();
            A::spawn(self, key)
        })
    }

    /// Removes an idle actor from its registry, then stops it after its mailbox drains.
    pub(crate) fn passivate<A: Placed>(&self, key: &str, me: &ActorRef<A>) {
        if A::registry(self).remove_if(key, me) {
            stop_later(me.clone());
        }
    }

    /// Tells the actor of `key` at its owner, activating it there.
    pub async fn tell<A, M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
    where
        A: Placed + Message<M, Reply = ()>,
        M: Wire,
    {
        let owner = self.cluster.owner(&A::KIND.placement_key(key));
        if self.cluster.is_me(&owner) {
            self.tell_local::<A, M>(key, msg).await
        } else {
            self.tell_remote::<A, M>(&owner, key, msg, false).await
        }
    }

    /// Asks the actor of `key` at its owner, activating it there.
    pub async fn ask<A, M, T>(self: &Arc<Self>, key: &str, msg: M) -> Result<T, Fail>
    where
        A: Placed + Message<M, Reply = Result<T, Fail>>,
        M: Wire,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        let owner = self.cluster.owner(&A::KIND.placement_key(key));
        if self.cluster.is_me(&owner) {
            self.ask_local::<A, M, T>(key, msg).await
        } else {
            self.ask_remote::<A, M, T>(&owner, key, msg, false).await
        }
    }

    /// Tells the actor of `key` only if it is running at its owner.
    pub async fn tell_if_active<A, M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
    where
        A: Placed + Message<M, Reply = ()>,
        M: Wire,
    {
        let owner = self.cluster.owner(&A::KIND.placement_key(key));
        if self.cluster.is_me(&owner) {
            self.tell_if_active_here::<A, M>(key, msg).await
        } else {
            self.tell_remote::<A, M>(&owner, key, msg, true).await
        }
    }

    /// Asks the actor of `key` only if it is running at its owner: `None` if not.
    pub async fn ask_if_active<A, M, T>(
        self: &Arc<Self>,
        key: &str,
        msg: M,
    ) -> Result<Option<T>, Fail>
    where
        A: Placed + Message<M, Reply = Result<T, Fail>>,
        M: Wire,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        let owner = self.cluster.owner(&A::KIND.placement_key(key));
        if self.cluster.is_me(&owner) {
            self.ask_if_active_here::<A, M, T>(key, msg).await
        } else {
            self.ask_remote::<A, M, Option<T>>(&owner, key, msg, true)
                .await
        }
    }

    pub(crate) async fn tell_if_active_here<A, M>(&self, key: &str, msg: M) -> Result<(), Fail>
    where
        A: Placed + Message<M, Reply = ()>,
        M: Send + 'static,
    {
        match A::registry(self).get(key) {
            Some(r) => r.tell(msg).await.map_err(send_failed),
            None => Ok(()),
        }
    }

    pub(crate) async fn ask_if_active_here<A, M, T>(
        &self,
        key: &str,
        msg: M,
    ) -> Result<Option<T>, Fail>
    where
        A: Placed + Message<M, Reply = Result<T, Fail>>,
        M: Send + 'static,
        T: Send + 'static,
    {
        match A::registry(self).get(key) {
            Some(r) => match r.ask(msg).await {
                Ok(v) => Ok(Some(v)),
                Err(SendError::HandlerError(f)) => Err(f),
                Err(e) => Err(send_failed(e)),
            },
            None => Ok(None),
        }
    }

    /// Tells the actor of `key` on this node (activating it).
    pub(crate) async fn tell_local<A, M>(self: &Arc<Self>, key: &str, msg: M) -> Result<(), Fail>
    where
        A: Placed + Message<M, Reply = ()>,
        M: Send + 'static,
    {
        let mut msg = msg;
        for _ in 0..ACTIVATION_RETRIES {
            let r = self.activate::<A>(key);
            match r.tell(msg).await {
                Ok(()) => return Ok(()),
                Err(SendError::ActorNotRunning(m)) | Err(SendError::ActorRestarting(m)) => {
                    A::registry(self).remove_if(key, &r);
                    msg = m;
                }
                Err(e) => return Err(send_failed(e)),
            }
        }
        Err(Fail::new(
            ErrorCode::Overloaded,
            "actor is restarting, retry",
        ))
    }

    /// Asks the actor of `key` on this node (activating it).
    pub(crate) async fn ask_local<A, M, T>(self: &Arc<Self>, key: &str, msg: M) -> Result<T, Fail>
    where
        A: Placed + Message<M, Reply = Result<T, Fail>>,
        M: Send + 'static,
        T: Send + 'static,
    {
        let mut msg = msg;
        for _ in 0..ACTIVATION_RETRIES {
            let r = self.activate::<A>(key);
            match r.ask(msg).await {
                Ok(v) => return Ok(v),
                Err(SendError::HandlerError(f)) => return Err(f),
                Err(SendError::ActorNotRunning(m)) | Err(SendError::ActorRestarting(m)) => {
                    A::registry(self).remove_if(key, &r);
                    msg = m;
                }
                Err(e) => return Err(send_failed(e)),
            }
        }
        Err(Fail::new(
            ErrorCode::Overloaded,
            "actor is restarting, retry",
        ))
    }

    /// Stops, after their mailboxes drain, the actors of kind `A` whose key
    /// this node no longer owns. Returns how many.
    pub(crate) fn hand_over<A: Placed>(&self) -> usize {
        let cluster = &self.cluster;
        let moved = A::registry(self)
            .take_unless(|k| cluster.is_me(&cluster.owner(&A::KIND.placement_key(k))));
        let n = moved.len();
        moved.into_iter().for_each(stop_later);
        n
    }

    /// Stops every actor of kind `A` after its mailbox drains (in-flight
    /// writes complete and are acknowledged), waiting at most `timeout`.
    /// Returns how many did not stop in time.
    pub(crate) async fn stop_all<A: Placed>(&self, timeout: Duration) -> usize {
        let actors = A::registry(self).drain();
        for a in &actors {
            let _ = a.stop_gracefully().await;
        }
        let wait = async {
            for a in &actors {
                a.wait_for_shutdown().await;
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_ok() {
            return 0;
        }
        actors.iter().filter(|a| a.is_alive()).count()
    }
}

pub(crate) fn send_failed<M, E: std::fmt::Debug>(e: SendError<M, E>) -> Fail {
    match e {
        SendError::MailboxFull(_) | SendError::Timeout(_) => {
            Fail::new(ErrorCode::Overloaded, "server busy, retry")
        }
        SendError::ActorStopped => {
            Fail::new(ErrorCode::StoreUnavailable, "could not load state, retry")
        }
        other => {
            tracing::error!(error = ?other.map_msg(|_| ()), "actor send failed");
            Fail::new(ErrorCode::Internal, "internal error")
        }
    }
}
